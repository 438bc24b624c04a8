//! docker-compose.yml cannot run here (no Docker engine), so it is parsed and checked: the
//! services the README promises, the Dockerfile it builds, a latchkey config that
//! `check-config` accepts, and Prometheus and Grafana wired to latchkey, the alert rules and
//! the dashboard.

use std::process::Command;

/// A YAML file as JSON, read by PyYAML: the crate has no YAML parser of its own.
pub fn yaml(file: impl AsRef<std::path::Path>) -> serde_json::Value {
    let file = file.as_ref();
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(file)
        .output()
        .expect("python3 with PyYAML is needed");
    assert!(
        out.status.success(),
        "{} does not parse: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn compose() -> serde_json::Value {
    yaml("docker-compose.yml")
}

/// A service's bind mounts: (file in the repository, path in the container).
fn mounts(service: &serde_json::Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let mut parts = v.as_str().unwrap().split(':');
            let host = parts.next().unwrap().trim_start_matches("./").to_string();
            (host, parts.next().unwrap().to_string())
        })
        .collect()
}

#[test]
fn compose_file_brings_up_openbao_latchkey_and_an_upstream() {
    let c = compose();
    let services = c["services"].as_object().unwrap();
    for name in ["openbao", "seed", "upstream", "latchkey"] {
        assert!(services.contains_key(name), "no {name} service");
    }
    let bao = &services["openbao"];
    let cmd: Vec<&str> = bao["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(cmd.contains(&"-dev"), "OpenBao runs in dev mode");

    let lk = &services["latchkey"];
    assert_eq!(lk["build"]["dockerfile"], "Dockerfile");
    assert!(std::path::Path::new("Dockerfile").is_file());
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    assert!(dockerfile.contains("cargo build --release"));
    assert_eq!(lk["environment"]["VAULT_ADDR"], "http://openbao:8200");
    let token = lk["environment"]["VAULT_TOKEN"].as_str().unwrap();
    assert_eq!(
        bao["command"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|v| v.as_str().unwrap().strip_prefix("-dev-root-token-id="))
            .unwrap(),
        token
    );

    // The seeded connection names the upstream service, and its config is valid.
    let seed: Vec<&str> = services["seed"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(seed.contains(&"latchkey/connections/demo"));
    assert!(seed.contains(&"base_url=http://upstream:8000"));
    let volume = lk["volumes"][0].as_str().unwrap();
    let host_path = volume.split(':').next().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .arg("check-config")
        .arg(host_path)
        .env("VAULT_TOKEN", token)
        .env("VAULT_ADDR", "http://openbao:8200")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{host_path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_runs_prometheus_on_latchkeys_metrics_and_rules_and_grafana_on_the_dashboard() {
    let c = compose();
    let services = c["services"].as_object().unwrap();

    // Prometheus scrapes the latchkey service on its admin port, and loads the rules file
    // mounted from deploy/prometheus/alerts.yml.
    let prom = &services["prometheus"];
    let prom_mounts = mounts(prom);
    let config_in = |file: &str| {
        prom_mounts
            .iter()
            .find(|(host, _)| host == file)
            .map(|(_, inside)| inside.clone())
            .unwrap_or_else(|| panic!("prometheus does not mount {file}"))
    };
    let config_path = config_in("deploy/compose/prometheus.yml");
    assert!(strings(&prom["command"]).contains(&format!("--config.file={config_path}").as_str()));
    let rules_path = config_in("deploy/prometheus/alerts.yml");
    let config = yaml("deploy/compose/prometheus.yml");
    assert_eq!(strings(&config["rule_files"]), [rules_path.as_str()]);
    let admin = std::fs::read_to_string("config/docker.toml").unwrap();
    let admin: toml::Value = toml::from_str(&admin).unwrap();
    let admin_port = admin["admin"]["listen"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1;
    let job = &config["scrape_configs"][0];
    assert_eq!(
        strings(&job["static_configs"][0]["targets"]),
        [format!("latchkey:{admin_port}").as_str()]
    );
    assert_eq!(job["metrics_path"], "/metrics");

    // Grafana: the data source is that Prometheus, and the dashboards folder it provisions from
    // holds deploy/grafana/latchkey.json.
    let grafana = &services["grafana"];
    let grafana_mounts = mounts(grafana);
    let inside = |file: &str| {
        grafana_mounts
            .iter()
            .find(|(host, _)| host == file)
            .map(|(_, inside)| inside.clone())
            .unwrap_or_else(|| panic!("grafana does not mount {file}"))
    };
    assert!(inside("deploy/compose/grafana/datasources.yml")
        .starts_with("/etc/grafana/provisioning/datasources/"));
    assert!(inside("deploy/compose/grafana/dashboards.yml")
        .starts_with("/etc/grafana/provisioning/dashboards/"));
    let sources = yaml("deploy/compose/grafana/datasources.yml");
    assert_eq!(sources["datasources"][0]["type"], "prometheus");
    assert_eq!(sources["datasources"][0]["url"], "http://prometheus:9090");
    let providers = yaml("deploy/compose/grafana/dashboards.yml");
    let folder = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    assert_eq!(
        inside("deploy/grafana/latchkey.json"),
        format!("{folder}/latchkey.json")
    );
}

/// Every file the compose services mount from the repository is there (the alert rules and the
/// dashboard among them).
#[test]
fn compose_mounts_only_files_the_repository_has() {
    let c = compose();
    for (name, service) in c["services"].as_object().unwrap() {
        if service["volumes"].is_array() {
            for (host, _) in mounts(service) {
                assert!(
                    std::path::Path::new(&host).is_file(),
                    "the {name} service mounts {host}, which is not in the repository"
                );
            }
        }
    }
}

fn strings(v: &serde_json::Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}
