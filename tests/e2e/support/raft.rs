//! A real OpenBao cluster on loopback: `bao server -config` per node, with integrated (raft)
//! storage in a temporary directory, initialised with one key share, unsealed, and the other
//! nodes joined to the first, until every node is a voter, a leader is known and every node
//! serves a KV v2 read at the mount `secret`.
//!
//! Elections are made quick for a test (`performance_multiplier = 1`: a dead leader is noticed
//! within about a second) and autopilot promotes joined nodes to voters after a second of
//! stability instead of ten. With TLS, each node's API listener has a certificate from a
//! [`TestCa`]; a second, plain listener per node is for the test's own calls.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{bao_program, free_port, try_wait_until, Bao, Secrets, Server, TestCa};

/// How a cluster is set up.
#[derive(Clone, Copy)]
pub struct Setup<'a> {
    pub nodes: usize,
    /// API listeners with a certificate from this CA for `127.0.0.1`.
    pub tls: Option<&'a TestCa>,
    /// Whether standbys serve reads themselves (OpenBao's default); `false` sets
    /// `disable_standby_reads`, and standbys forward every request to the active node.
    pub standby_reads: bool,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            nodes: 3,
            tls: None,
            standby_reads: true,
        }
    }
}

struct Node {
    /// The API address clients are given (`https://` with TLS).
    addr: String,
    /// A plain-HTTP listener of the same node, for the test's own calls.
    plain: String,
    child: Option<Child>,
    log: PathBuf,
}

/// A running cluster; its processes are killed when it is dropped.
pub struct Cluster {
    nodes: Vec<Node>,
    /// The root token `operator init` printed, which latchkey is given.
    pub token: String,
    root: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts and forms a cluster. One that does not form (a port picked for a node taken by
    /// another process before the node bound it, on a busy machine) is torn down and a fresh
    /// one started, with new ports, up to three times; each failure is printed with the nodes'
    /// logs.
    #[expect(
        clippy::print_stderr,
        reason = "a retried cluster is reported in the test's output"
    )]
    pub async fn start(setup: Setup<'_>) -> Cluster {
        assert!(setup.nodes >= 1);
        let mut failures = Vec::new();
        for attempt in 1..=3 {
            let mut cluster = Cluster::launch(setup).await;
            match cluster.form().await {
                Ok(()) => return cluster,
                Err(e) => {
                    let failure = format!("attempt {attempt}: {e}\n{}", cluster.logs());
                    eprintln!("the OpenBao cluster did not form, {failure}");
                    failures.push(failure);
                }
            }
        }
        panic!(
            "the OpenBao cluster did not form in three attempts:\n{}",
            failures.join("\n")
        );
    }

    async fn launch(setup: Setup<'_>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let (cert, key) = match setup.tls {
            Some(ca) => {
                let (cert, key) = ca.issue(&["127.0.0.1", "localhost"]);
                (
                    Some(super::write_file(dir.path(), "node.pem", &cert)),
                    Some(super::write_file(dir.path(), "node.key", &key)),
                )
            }
            None => (None, None),
        };
        let mut nodes = Vec::new();
        for i in 0..setup.nodes {
            let node = launch(dir.path(), i, setup, cert.as_deref(), key.as_deref(), &http).await;
            nodes.push(node);
        }
        Cluster {
            nodes,
            token: String::new(),
            root: String::new(),
            http,
            _dir: dir,
        }
    }

    /// Init, unseal, join, and wait until the cluster serves KV v2 reads on every node; what
    /// did not happen, if something did not.
    async fn form(&mut self) -> Result<(), String> {
        let first = self.nodes[0].plain.clone();
        let init = self
            .step(
                &first,
                &[
                    "operator",
                    "init",
                    "-key-shares=1",
                    "-key-threshold=1",
                    "-format=json",
                ],
            )
            .await?;
        let init: serde_json::Value = serde_json::from_str(&init).unwrap();
        let key = init["unseal_keys_b64"][0].as_str().unwrap().to_string();
        self.root = init["root_token"].as_str().unwrap().to_string();

        self.step(&first, &["operator", "unseal", &key]).await?;
        let active = try_wait_until(Duration::from_secs(30), || {
            let health = self.http.get(format!("{first}/v1/sys/health")).send();
            async move { (health.await.ok()?.status() == 200).then_some(()) }
        })
        .await;
        active.ok_or("the first node did not become active in 30 s")?;
        // Joined nodes become voters after this long without trouble (ten seconds by default).
        let autopilot = try_wait_until(Duration::from_secs(30), || {
            self.try_bao(
                &first,
                &[
                    "operator",
                    "raft",
                    "autopilot",
                    "set-config",
                    "-server-stabilization-time=1s",
                ],
            )
        })
        .await;
        autopilot.ok_or("autopilot did not take its config in 30 s")?;
        for node in &self.nodes[1..] {
            self.step(&node.plain, &["operator", "raft", "join", &first])
                .await?;
            self.step(&node.plain, &["operator", "unseal", &key])
                .await?;
        }
        let count = self.nodes.len();
        let last = std::sync::Mutex::new(String::new());
        let formed = try_wait_until(Duration::from_secs(40), || async {
            let peers = self
                .run(&first, &["operator", "raft", "list-peers", "-format=json"])
                .await;
            let peers = match peers {
                Ok(peers) => peers,
                Err(e) => {
                    *last.lock().unwrap() = e;
                    return None;
                }
            };
            *last.lock().unwrap() = peers.clone();
            let peers: serde_json::Value = serde_json::from_str(&peers).ok()?;
            let servers = peers["data"]["config"]["servers"].as_array()?;
            let voters = servers.iter().filter(|s| s["voter"] == true).count();
            let leaders = servers.iter().filter(|s| s["leader"] == true).count();
            (servers.len() == count && voters == count && leaders == 1).then_some(())
        })
        .await;
        if formed.is_none() {
            return Err(format!(
                "not every node was a voter, with a leader, in 40 s; the last list-peers: {}",
                last.lock().unwrap()
            ));
        }
        self.step(&first, &["secrets", "enable", "-path=secret", "kv-v2"])
            .await?;
        self.step(
            &first,
            &["kv", "put", "-mount=secret", "cluster-ready", "ok=1"],
        )
        .await?;
        // latchkey is given the root token `operator init` printed: its lookup has no
        // `issue_time`, which vaultrs' own lookup type insists on (latchkey reads only the
        // fields it uses).
        self.token = self.root.clone();
        // A standby serves KV reads only once it has the mount, the upgraded layout and the
        // token.
        for i in 0..count {
            let url = format!("{}/v1/secret/data/cluster-ready", self.nodes[i].plain);
            let last = std::sync::Mutex::new(String::new());
            let served = try_wait_until(Duration::from_secs(30), || {
                let read = self
                    .http
                    .get(&url)
                    .header("X-Vault-Token", &self.token)
                    .send();
                let last = &last;
                async move {
                    let r = read.await;
                    let status = r.as_ref().map(|r| r.status().as_u16());
                    *last.lock().unwrap() = format!("{status:?}");
                    (status.ok()? == 200).then_some(())
                }
            })
            .await;
            if served.is_none() {
                return Err(format!(
                    "node {i} does not serve a KV read (last: {})",
                    last.lock().unwrap()
                ));
            }
        }
        Ok(())
    }

    /// One `bao` command of forming the cluster; its error names it.
    async fn step(&self, addr: &str, args: &[&str]) -> Result<String, String> {
        self.run(addr, args)
            .await
            .map_err(|e| format!("bao {}: {e}", args[..2].join(" ")))
    }

    /// Every node's API address, in node order (what latchkey is given).
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    pub fn addr(&self, node: usize) -> &str {
        &self.nodes[node].addr
    }

    /// The node that is active now, by asking the live nodes (`None` while there is none).
    pub async fn leader(&self) -> Option<usize> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let Ok(r) = self
                .http
                .get(format!("{}/v1/sys/leader", node.plain))
                .send()
                .await
            else {
                continue;
            };
            let Ok(v) = r.json::<serde_json::Value>().await else {
                continue;
            };
            let leader = v["leader_address"].as_str().unwrap_or_default();
            if let Some(i) = self.nodes.iter().position(|n| n.addr == leader) {
                if self.nodes[i].child.is_some() {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Kills a node with SIGKILL, as a crash would.
    pub fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A handle for [`super::Latchkey::start`] and the secret checks: the root token, a prefix,
    /// and a live node's plain address for the test's own calls.
    pub fn handle(&self) -> Bao {
        let addr = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .map(|n| n.plain.clone())
            .unwrap();
        Bao {
            addr,
            token: self.token.clone(),
            prefix: "ha/connections".into(),
            server: Server::Cluster,
            secrets: Secrets::default(),
        }
    }

    /// Writes a connection through a live node's API (faster than the CLI, for many of them);
    /// its non-reserved values are registered as secrets no latchkey output may contain.
    pub async fn put(&self, bao: &Bao, id: &str, fields: &[(&str, &str)]) {
        let mut data = serde_json::Map::new();
        for (k, v) in fields {
            if !super::RESERVED.contains(k) {
                bao.secrets.add(*v);
            }
            data.insert(k.to_string(), serde_json::Value::String(v.to_string()));
        }
        let node = self.nodes.iter().find(|n| n.child.is_some()).unwrap();
        let r = self
            .http
            .post(format!("{}/v1/secret/data/{}", node.plain, bao.path(id)))
            .header("X-Vault-Token", &self.token)
            .json(&serde_json::json!({ "data": data }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "put {id}: {}", r.status());
    }

    /// The fields of a connection as node `node` reads it (`None` if it has none).
    pub async fn get(&self, node: usize, bao: &Bao, id: &str) -> Option<serde_json::Value> {
        let r = self
            .http
            .get(format!(
                "{}/v1/secret/data/{}",
                self.nodes[node].plain,
                bao.path(id)
            ))
            .header("X-Vault-Token", &self.token)
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        let v: serde_json::Value = r.json().await.ok()?;
        Some(v["data"]["data"].clone())
    }

    async fn try_bao(&self, addr: &str, args: &[&str]) -> Option<String> {
        self.run(addr, args).await.ok()
    }

    async fn run(&self, addr: &str, args: &[&str]) -> Result<String, String> {
        let out = tokio::process::Command::new(bao_program())
            .args(args)
            .env("BAO_ADDR", addr)
            .env("VAULT_ADDR", addr)
            .env("BAO_TOKEN", &self.root)
            .env("VAULT_TOKEN", &self.root)
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The tail of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let log = std::fs::read_to_string(&node.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            out.push_str(&format!("--- node {i} ({})\n", node.addr));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Starts node `i` and waits until its API answers; on a port that another process took in the
/// meantime (the node exits), tries again with other ports.
async fn launch(
    dir: &Path,
    i: usize,
    setup: Setup<'_>,
    cert: Option<&Path>,
    key: Option<&Path>,
    http: &reqwest::Client,
) -> Node {
    let data = dir.join(format!("n{i}"));
    std::fs::create_dir_all(&data).unwrap();
    let log = dir.join(format!("n{i}.log"));
    for _attempt in 0..3 {
        let (api, cluster, extra) = (free_port(), free_port(), free_port());
        let scheme = if cert.is_some() { "https" } else { "http" };
        let addr = format!("{scheme}://127.0.0.1:{api}");
        let (tls, plain_listener, plain) = match (cert, key) {
            (Some(cert), Some(key)) => (
                format!(
                    "tls_cert_file = \"{}\"\n  tls_key_file = \"{}\"",
                    cert.display(),
                    key.display()
                ),
                format!(
                    "listener \"tcp\" {{\n  address = \"127.0.0.1:{extra}\"\n  tls_disable = true\n}}\n"
                ),
                format!("http://127.0.0.1:{extra}"),
            ),
            _ => ("tls_disable = true".to_string(), String::new(), addr.clone()),
        };
        let config = format!(
            "storage \"raft\" {{\n  path = \"{data}\"\n  node_id = \"n{i}\"\n  \
             performance_multiplier = 1\n  autopilot_reconcile_interval = \"1s\"\n  \
             autopilot_update_interval = \"500ms\"\n}}\n\
             listener \"tcp\" {{\n  address = \"127.0.0.1:{api}\"\n  \
             cluster_address = \"127.0.0.1:{cluster}\"\n  {tls}\n}}\n\
             {plain_listener}\
             api_addr = \"{addr}\"\ncluster_addr = \"https://127.0.0.1:{cluster}\"\n\
             disable_mlock = true\ndisable_standby_reads = {}\n",
            !setup.standby_reads,
            data = data.display(),
        );
        let config_path = super::write_file(dir, &format!("n{i}.hcl"), &config);
        let out = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(bao_program())
            .arg("server")
            .arg(format!("-config={}", config_path.display()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        // Any answer will do: an uninitialised node answers 501.
        let up = try_wait_until(Duration::from_secs(15), || {
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            let health = http.get(format!("{plain}/v1/sys/health")).send();
            async move {
                if exited {
                    return Some(false);
                }
                health.await.ok().map(|_| true)
            }
        })
        .await;
        if up == Some(true) {
            return Node {
                addr,
                plain,
                child: Some(child),
                log,
            };
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!(
        "OpenBao node {i} did not start:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
