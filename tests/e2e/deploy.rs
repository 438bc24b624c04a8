//! deploy/kubernetes, as an operator would apply it: `scripts/check-deploy` renders every
//! Kustomize directory with kubectl's kustomize and validates the objects against the
//! Kubernetes schemas (kubernetes-validate, offline); these tests read the rendered objects and
//! check what the schemas cannot: that the pieces point at each other (selectors, port names,
//! the ConfigMap the config path names), that the configuration in the ConfigMaps is one
//! latchkey accepts, and the properties issue 13 asks for (replicas, probes, hardening, egress,
//! the sidecar on loopback with the runner pointed at it).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use crate::support::TestCa;

/// The rendered objects of each check-deploy target, rendered once for all the tests.
fn rendered(target: &str) -> Vec<Value> {
    static OUT: OnceLock<(tempfile::TempDir, String)> = OnceLock::new();
    let (dir, _) = OUT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("scripts/check-deploy")
            .arg("--out")
            .arg(dir.path())
            .output()
            .expect("scripts/check-deploy runs (python3 with PyYAML and kubernetes-validate)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "scripts/check-deploy failed:\n{text}");
        (dir, text)
    });
    let file = dir.path().join(format!("{target}.json"));
    serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap()
}

fn check_deploy_output() -> String {
    rendered("gateway");
    Command::new("scripts/check-deploy")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap()
}

fn object<'a>(objects: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with(name_prefix)
        })
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}* among the rendered objects"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap()).collect())
        .unwrap_or_default()
}

/// The container `name` of a pod spec, among its containers or init containers.
fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_array()
        .into_iter()
        .chain(pod["initContainers"].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The file a container's `--config` argument names, read from the ConfigMap mounted there.
fn config_of(objects: &[Value], pod: &Value, c: &Value) -> (String, toml::Value) {
    let args = strings(&c["args"]);
    let path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let (dir, file) = path.rsplit_once('/').unwrap();
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let map = volume["configMap"]["name"].as_str().unwrap();
    let cm = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == map)
        .unwrap_or_else(|| panic!("the ConfigMap {map} is not among the rendered objects"));
    let text = cm["data"][file].as_str().unwrap().to_string();
    let parsed = toml::from_str(&text).unwrap();
    (text, parsed)
}

/// `latchkey check-config` on a configuration text: the error, if it refuses it. Vault's CA
/// file is in a ConfigMap of the cluster, so a test CA stands in for it (`VAULT_CACERT`
/// overrides `vault.ca_cert`); the tests check that the path is where that ConfigMap is mounted.
fn check_config(text: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("latchkey.toml");
    std::fs::write(&file, text).unwrap();
    let vault_ca = TestCa::new();
    let out = Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .arg("check-config")
        .arg(&file)
        .env("VAULT_CACERT", &vault_ca.pem_path)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn port_of(listen: &toml::Value) -> u16 {
    listen
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap()
}

fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().unwrap();
    !selector.is_empty() && selector.iter().all(|(k, v)| &labels[k] == v)
}

#[test]
fn rendered_manifests_validate_against_the_kubernetes_schemas() {
    let out = check_deploy_output();
    for line in [
        "gateway: Deployment/latchkey: valid for Kubernetes 1.30 and",
        "gateway: Service/latchkey: valid",
        "gateway: PodDisruptionBudget/latchkey: valid",
        "gateway: HorizontalPodAutoscaler/latchkey: valid",
        "gateway: NetworkPolicy/latchkey: valid",
        "gateway: ServiceAccount/latchkey: valid",
        "gateway: ConfigMap/latchkey-config-",
        "runner: Deployment/ci-runner: valid",
        "check-deploy: ok",
    ] {
        assert!(
            out.contains(line),
            "check-deploy did not say {line:?}:\n{out}"
        );
    }
}

#[test]
fn schema_check_refuses_an_unknown_field_and_a_wrong_type() {
    let mut deployment = object(&rendered("gateway"), "Deployment", "latchkey").clone();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deployment.yaml");
    let validate = |d: &Value| {
        // JSON is YAML.
        std::fs::write(&file, d.to_string()).unwrap();
        let out = Command::new("scripts/check-deploy")
            .arg("--validate")
            .arg(&file)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(
        validate(&deployment).0,
        "the rendered Deployment validates as it is"
    );

    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] =
        "/readyz".into();
    let (ok, err) = validate(&deployment);
    assert!(
        !ok && err.contains("readinessProbe.httpGet") && err.contains("pathh"),
        "{err}"
    );

    let mut deployment = object(&rendered("gateway"), "Deployment", "latchkey").clone();
    deployment["spec"]["replicas"] = "three".into();
    let (ok, err) = validate(&deployment);
    assert!(!ok && err.contains("spec.replicas"), "{err}");
}

#[test]
fn gateway_runs_three_hardened_replicas_probed_on_readyz_and_healthz() {
    let objects = rendered("gateway");
    let d = object(&objects, "Deployment", "latchkey");
    assert_eq!(d["metadata"]["namespace"], "latchkey");
    assert_eq!(d["spec"]["replicas"], 3);
    let pod = &d["spec"]["template"]["spec"];
    let c = container(pod, "latchkey");
    assert_eq!(c["image"], "latchkey:0.1.0");

    let (_, config) = config_of(&objects, pod, c);
    let admin = port_of(&config["admin"]["listen"]);
    let proxy = port_of(&config["proxy"]["listen"]);
    let named_port = |name: &str| {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["containerPort"].as_u64().unwrap())
    };
    assert_eq!(named_port("admin"), Some(u64::from(admin)));
    assert_eq!(named_port("proxy"), Some(u64::from(proxy)));
    for (probe, path) in [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "admin", "{probe}");
    }

    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_ne!(pod["securityContext"]["runAsUser"], 0);

    // Requests and limits for both resources, the limit at or above the request, and the
    // proxy's workers as many as the CPU limit's cores.
    let r = &c["resources"];
    for res in ["cpu", "memory"] {
        assert!(
            r["requests"][res].is_string() && r["limits"][res].is_string(),
            "{res}: {r}"
        );
    }
    assert_eq!(r["limits"]["cpu"], "2");
    assert_eq!(config["proxy"]["workers"].as_integer(), Some(2));
    assert_eq!(r["requests"]["cpu"], "500m");
    assert_eq!(
        (
            r["requests"]["memory"].as_str(),
            r["limits"]["memory"].as_str()
        ),
        (Some("64Mi"), Some("640Mi"))
    );
    // The cache's cap fits the limit beside the clients (docs/capacity.md: about 35 KiB per
    // cached connection).
    assert_eq!(config["cache"]["max_entries"].as_integer(), Some(5000));
}

#[test]
fn gateway_config_map_is_accepted_and_logs_in_by_the_kubernetes_method() {
    let objects = rendered("gateway");
    let d = object(&objects, "Deployment", "latchkey");
    let pod = &d["spec"]["template"]["spec"];
    let (text, config) = config_of(&objects, pod, container(pod, "latchkey"));
    check_config(&text).unwrap();

    let auth = &config["vault"]["auth"];
    assert_eq!(auth["method"].as_str(), Some("kubernetes"));
    assert_eq!(
        auth["jwt_file"].as_str(),
        Some(latchkey::config::KUBERNETES_TOKEN_FILE),
        "the pod's own service-account token"
    );
    assert_ne!(pod["automountServiceAccountToken"], false);
    let sa = pod["serviceAccountName"].as_str().unwrap();
    object(&objects, "ServiceAccount", sa);

    // Vault's CA file is in a mounted ConfigMap.
    let ca = config["vault"]["ca_cert"].as_str().unwrap();
    let c = container(pod, "latchkey");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| ca.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
        .unwrap_or_else(|| panic!("nothing mounted where vault.ca_cert ({ca}) is"));
    assert!(pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == mount["name"] && v["configMap"]["name"] == "vault-ca"));

    // Off loopback, so clients must present tokens; the example client's hash is no token's.
    assert!(config["proxy"]["listen"]
        .as_str()
        .unwrap()
        .starts_with("0.0.0.0:"));
    assert_eq!(
        config["clients"][0]["token_sha256"].as_str(),
        Some("0".repeat(64).as_str())
    );
}

#[test]
fn gateway_service_pdb_hpa_and_service_monitor_point_at_the_gateway_pods() {
    let objects = rendered("gateway");
    let d = object(&objects, "Deployment", "latchkey");
    let labels = &d["spec"]["template"]["metadata"]["labels"];
    let c = container(&d["spec"]["template"]["spec"], "latchkey");
    let port_names: BTreeSet<&str> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(selects(&d["spec"]["selector"]["matchLabels"], labels));

    let svc = object(&objects, "Service", "latchkey");
    assert!(selects(&svc["spec"]["selector"], labels));
    let svc_ports: Vec<&str> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert!(
                port_names.contains(p["targetPort"].as_str().unwrap()),
                "{p}"
            );
            p["name"].as_str().unwrap()
        })
        .collect();

    let pdb = object(&objects, "PodDisruptionBudget", "latchkey");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], labels));
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    let hpa = object(&objects, "HorizontalPodAutoscaler", "latchkey");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], d["metadata"]["name"]);
    assert_eq!(hpa["spec"]["minReplicas"], d["spec"]["replicas"]);
    assert_eq!(hpa["spec"]["metrics"][0]["resource"]["name"], "cpu");

    // The ServiceMonitor (a custom resource: no schema) selects the Service and scrapes a port
    // the Service has, at /metrics, in the Service's namespace.
    let sm = object(&objects, "ServiceMonitor", "latchkey");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["namespace"], svc["metadata"]["namespace"]);
    assert!(selects(
        &sm["spec"]["selector"]["matchLabels"],
        &svc["metadata"]["labels"]
    ));
    let endpoint = &sm["spec"]["endpoints"][0];
    assert!(svc_ports.contains(&endpoint["port"].as_str().unwrap()));
    assert_eq!(endpoint["path"], "/metrics");
    let svc_port = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == endpoint["port"])
        .unwrap();
    assert_eq!(
        svc_port["targetPort"], "admin",
        "metrics are on the admin listener"
    );
}

#[test]
fn gateway_network_policy_lets_out_only_https_vault_and_dns() {
    let objects = rendered("gateway");
    let d = object(&objects, "Deployment", "latchkey");
    let np = object(&objects, "NetworkPolicy", "latchkey");
    assert!(selects(
        &np["spec"]["podSelector"]["matchLabels"],
        &d["spec"]["template"]["metadata"]["labels"]
    ));
    assert!(strings(&np["spec"]["policyTypes"]).contains(&"Egress"));
    let mut allowed = BTreeSet::new();
    for rule in np["spec"]["egress"].as_array().unwrap() {
        let ports = rule["ports"]
            .as_array()
            .expect("an egress rule without ports opens all");
        let to = rule["to"].to_string();
        for p in ports {
            let port = p["port"].as_u64().unwrap();
            let proto = p["protocol"].as_str().unwrap();
            match port {
                443 => assert!(rule["to"].is_null(), "443 anywhere"),
                8200 => assert!(
                    to.contains("\"vault\""),
                    "8200 only to Vault's namespace: {to}"
                ),
                53 => assert!(to.contains("kube-dns"), "53 only to the cluster DNS: {to}"),
                other => panic!("egress to port {other} is not latchkey's"),
            }
            allowed.insert(format!("{port}/{proto}"));
        }
    }
    assert_eq!(
        allowed.into_iter().collect::<Vec<_>>(),
        ["443/TCP", "53/TCP", "53/UDP", "8200/TCP"]
    );
    // Vault's port is the one the configuration names.
    let (_, config) = config_of(
        &objects,
        &d["spec"]["template"]["spec"],
        container(&d["spec"]["template"]["spec"], "latchkey"),
    );
    assert!(config["vault"]["address"]
        .as_str()
        .unwrap()
        .ends_with(":8200"));
}

#[test]
fn sidecar_patch_keeps_latchkey_on_loopback_and_points_the_runner_at_it() {
    let objects = rendered("runner");
    let d = object(&objects, "Deployment", "ci-runner");
    let pod = &d["spec"]["template"]["spec"];
    let lk = container(pod, "latchkey");
    assert_eq!(
        lk["restartPolicy"], "Always",
        "a native sidecar, started before the runner"
    );
    assert_eq!(lk["image"], "latchkey:0.1.0");
    let runner = container(pod, "runner");
    for c in pod["containers"].as_array().unwrap() {
        assert!(
            c["image"].is_string(),
            "the patch added a container of its own: {c}"
        );
    }

    // latchkey: both listeners on loopback, open (no clients), a configuration it accepts.
    let (text, config) = config_of(&objects, pod, lk);
    check_config(&text).unwrap();
    for listener in ["proxy", "admin"] {
        let listen = config[listener]["listen"].as_str().unwrap();
        assert!(
            listen.starts_with("127.0.0.1:"),
            "{listener}.listen = {listen}"
        );
    }
    assert!(config.get("clients").is_none());

    // The runner: HTTPS_PROXY at latchkey's proxy port, and every CA variable naming the bundle
    // that the sidecar's startup probe (`latchkey env --ca-bundle`) writes into a volume
    // mounted in both containers.
    let env = |name: &str| {
        runner["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("the runner has no {name}"))
    };
    let proxy = format!("http://127.0.0.1:{}", port_of(&config["proxy"]["listen"]));
    assert_eq!(env("HTTPS_PROXY"), proxy);
    assert_eq!(env("https_proxy"), proxy);
    let probe = strings(&lk["startupProbe"]["exec"]["command"]);
    assert_eq!(
        probe[..3],
        ["/usr/local/bin/latchkey", "env", "--ca-bundle"]
    );
    let bundle = probe[3];
    for var in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GIT_SSL_CAINFO",
    ] {
        assert_eq!(env(var), bundle, "{var}");
    }
    let mount_of = |c: &Value, path: &str| -> Option<(String, bool)> {
        c["volumeMounts"].as_array().unwrap().iter().find_map(|m| {
            let dir = m["mountPath"].as_str().unwrap();
            path.starts_with(&format!("{dir}/")).then(|| {
                (
                    m["name"].as_str().unwrap().to_string(),
                    m["readOnly"] == true,
                )
            })
        })
    };
    let (lk_vol, lk_ro) = mount_of(lk, bundle).expect("the bundle is on a volume in latchkey");
    let (runner_vol, _) =
        mount_of(runner, bundle).expect("the bundle is on a volume in the runner");
    assert_eq!(lk_vol, runner_vol);
    assert!(!lk_ro, "latchkey writes the bundle");

    // The Vault login's token is mounted in latchkey's container only, and the pod has no
    // automounted service-account token for the runner to log in to Vault with.
    assert_eq!(
        config["vault"]["auth"]["method"].as_str(),
        Some("kubernetes")
    );
    let jwt = config["vault"]["auth"]["jwt_file"].as_str().unwrap();
    let (token_vol, _) = mount_of(lk, jwt).expect("the token file is mounted in latchkey");
    assert!(mount_of(runner, jwt).is_none());
    assert!(runner["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["name"] != token_vol.as_str()));
    assert_eq!(pod["automountServiceAccountToken"], false);
    let token = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == token_vol.as_str())
        .unwrap();
    assert!(token["projected"]["sources"][0]["serviceAccountToken"].is_object());
    assert_eq!(
        Path::new(jwt).file_name().unwrap(),
        token["projected"]["sources"][0]["serviceAccountToken"]["path"]
            .as_str()
            .unwrap()
    );
}

/// The README's Deploy section names the directories it tells an operator to apply.
#[test]
fn readme_deploy_commands_name_directories_that_render() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let deploy = readme
        .split("\n## Deploy\n")
        .nth(1)
        .expect("README has a Deploy section")
        .split("\n## ")
        .next()
        .unwrap();
    let mut dirs = BTreeSet::new();
    for word in deploy.split_whitespace() {
        let word = word.trim_start_matches(['`', '(', '[']);
        if let Some(dir) = word.strip_prefix("deploy/kubernetes/") {
            let dir = dir.trim_end_matches(['`', ',', '.', ')', ':', '/']);
            if PathBuf::from("deploy/kubernetes")
                .join(dir)
                .join("kustomization.yaml")
                .is_file()
            {
                dirs.insert(dir.to_string());
            }
        }
    }
    for dir in ["examples/gateway", "examples/runner", "sidecar", "gateway"] {
        assert!(
            dirs.contains(dir),
            "the Deploy section does not name deploy/kubernetes/{dir}"
        );
    }
}

/// The runner's side of the sidecar patch, live: latchkey open on loopback (as the sidecar's
/// configuration has it), the startup probe's command as the manifest gives it (`latchkey env
/// --ca-bundle ...`), then curl with exactly the runner's environment from the manifest (the
/// proxy's port and the bundle's directory moved to this test's): curl trusts the tunnel's
/// certificate through the bundle, and the upstream gets the connection's key.
#[tokio::test]
async fn sidecar_runner_environment_and_startup_probe_get_the_key_injected() {
    use crate::support::{Bao, Latchkey, Opts};
    use crate::tunnel::{assert_ours, stripe_key, stripe_upstream, Ca, ID, STRIPE};

    let objects = rendered("runner");
    let pod = &object(&objects, "Deployment", "ci-runner")["spec"]["template"]["spec"];
    let lk_spec = container(pod, "latchkey");
    let runner = container(pod, "runner");
    let (_, config) = config_of(&objects, pod, lk_spec);
    let manifest_proxy = config["proxy"]["listen"].as_str().unwrap().to_string();
    let manifest_admin = config["admin"]["listen"].as_str().unwrap().to_string();

    let bao = Bao::start().await;
    let up_ca = TestCa::new();
    let up = stripe_upstream(&up_ca).await;
    let key = stripe_key();
    bao.put(ID, &[("connector", "stripe"), ("api_key", &key)]);
    let ca = Ca::init().await;
    let lk = Latchkey::start(
        &bao,
        Opts::loopback()
            .root(&up_ca.pem_path)
            .proxy(&format!(
                "resolve = {{ \"{STRIPE}:443\" = \"{}\" }}",
                up.addr()
            ))
            .tls(&format!("ca_cert = {:?}", ca.cert.display().to_string()))
            .tls(&format!("ca_key = {:?}", ca.key.display().to_string())),
    )
    .await;
    ca.forbid_key(&lk);

    // The shared volume, here a directory of the test's.
    let volume = tempfile::tempdir().unwrap();
    let probe = strings(&lk_spec["startupProbe"]["exec"]["command"]);
    let (dir, _) = probe[3].rsplit_once('/').unwrap();
    let relocate = |v: &str| {
        v.replace(dir, volume.path().to_str().unwrap())
            .replace(&manifest_proxy, &lk.proxy.to_string())
    };
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(probe[1..].iter().map(|a| relocate(a)))
        // The probe reaches the admin listener at its default, the manifest's admin.listen.
        .env("LATCHKEY_API_URL", format!("http://{}", lk.admin))
        .env_remove("LATCHKEY_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "the startup probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        manifest_admin, "127.0.0.1:9090",
        "the probe relies on latchkey env's default --admin"
    );

    let mut curl = tokio::process::Command::new("curl");
    curl.env_clear().env("PATH", std::env::var("PATH").unwrap());
    for e in runner["env"].as_array().unwrap() {
        curl.env(
            e["name"].as_str().unwrap(),
            relocate(e["value"].as_str().unwrap()),
        );
    }
    let out = curl
        .args(["-sS", "-H", &format!("Authorization: Bearer latchkey.{ID}")])
        .arg(format!("https://{STRIPE}/v1/balance"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The echo upstream answers in hex, so that latchkey's scrubbing leaves what it saw alone.
    let echo = hex::decode(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let echo: Value = serde_json::from_slice(&echo).unwrap();
    assert_ours(&echo, &key);
    assert_eq!(echo["uri"], "/v1/balance");
    assert_eq!(up.requests(), 1);
}
