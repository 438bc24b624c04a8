//! The load client of the load benchmark's TLS variants (bench/load.py runs it): closed loop,
//! HTTP/1.1 over TLS, either through a tunnel (`CONNECT host:port` to a proxy, then TLS to the
//! proxy) or straight to a TLS server such as nginx, so that both sides of the comparison are
//! driven by the same client.
//!
//!     cargo run --release --example tunnel_load -- --connect 127.0.0.1:8080 \
//!         --host api.example.com --tunnel-port 443 --cacert ca.pem --duration 10
//!
//! Each of `--connections` tasks sends one request at a time until `--duration` is over: on one
//! connection (one tunnel) kept alive, or with `--new-connections`, every request on a new TCP
//! connection, a new CONNECT and a new TLS handshake, with `Connection: close`. The client
//! never resumes a TLS session (no tickets, no session IDs), so every handshake is a full one.
//! It prints one JSON object: requests answered 200, req/s, latency percentiles (a request's
//! latency includes the connection, CONNECT and handshake when it opened one), errors.

#![expect(
    clippy::print_stdout,
    reason = "the figures go to stdout, as JSON, for bench/load.py"
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Parser)]
#[command(about = "Closed-loop HTTP/1.1 load over TLS, through a tunnel or straight")]
struct Args {
    /// The address dialled: the proxy (with --tunnel-port) or the TLS server.
    #[arg(long)]
    connect: SocketAddr,
    /// The service's name: the CONNECT host, the TLS server name and the `Host` header.
    #[arg(long)]
    host: String,
    /// Open a tunnel first: `CONNECT {host}:{tunnel_port}` to --connect.
    #[arg(long)]
    tunnel_port: Option<u16>,
    /// The CONNECT's `Proxy-Authorization` value.
    #[arg(long)]
    proxy_authorization: Option<String>,
    /// PEM certificates trusted as roots (repeatable); nothing else is trusted.
    #[arg(long, required = true)]
    cacert: Vec<PathBuf>,
    /// The path requested.
    #[arg(long, default_value = "/")]
    path: String,
    /// Concurrent connections (each one request at a time).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Every request on a new connection (a new tunnel and handshake), `Connection: close`.
    #[arg(long)]
    new_connections: bool,
    /// Seconds after which a request (with its connection set-up) counts as an error.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
}

/// What every task shares.
struct Ctx {
    args: Args,
    tls: TlsConnector,
    name: ServerName<'static>,
    connect_head: Option<Vec<u8>>,
}

/// One task's figures.
#[derive(Default)]
struct Tally {
    /// Latency of each request answered 200, in microseconds.
    latencies_us: Vec<u32>,
    non200: u64,
    errors: BTreeMap<String, u64>,
    opened: u64,
}

impl Tally {
    fn error(&mut self, e: &anyhow::Error) {
        // The step (connect, CONNECT, TLS handshake, request) and its cause.
        *self.errors.entry(format!("{e:#}")).or_default() += 1;
    }
}

type Sender = SendRequest<Empty<Bytes>>;

impl Ctx {
    fn new(args: Args) -> anyhow::Result<Ctx> {
        let mut roots = RootCertStore::empty();
        for path in &args.cacert {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                roots.add(cert.with_context(|| format!("parsing {}", path.display()))?)?;
            }
        }
        if roots.is_empty() {
            bail!("no certificate in --cacert");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = Resumption::disabled();
        let name = ServerName::try_from(args.host.clone())?;
        let connect_head = args.tunnel_port.map(|port| {
            let mut head = format!(
                "CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n",
                host = args.host
            );
            if let Some(auth) = &args.proxy_authorization {
                head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
            }
            head.push_str("\r\n");
            head.into_bytes()
        });
        Ok(Ctx {
            args,
            tls: TlsConnector::from(Arc::new(config)),
            name,
            connect_head,
        })
    }

    /// A new connection: TCP, the CONNECT when tunnelling, TLS, HTTP/1.1.
    async fn open(&self) -> anyhow::Result<Sender> {
        let mut tcp = TcpStream::connect(self.args.connect)
            .await
            .context("connect")?;
        tcp.set_nodelay(true).context("connect")?;
        if let Some(head) = &self.connect_head {
            tcp.write_all(head).await.context("CONNECT")?;
            connect_answer(&mut tcp).await.context("CONNECT")?;
        }
        let tls = self
            .tls
            .connect(self.name.clone(), tcp)
            .await
            .context("TLS handshake")?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .context("HTTP/1.1")?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// One request on `sender`; its status once the body is read to the end.
    async fn request(&self, sender: &mut Sender) -> anyhow::Result<u16> {
        sender.ready().await.context("request")?;
        let mut req = hyper::Request::get(self.args.path.as_str())
            .header(hyper::header::HOST, self.args.host.as_str());
        if self.args.new_connections {
            req = req.header(hyper::header::CONNECTION, "close");
        }
        let resp = sender
            .send_request(req.body(Empty::new())?)
            .await
            .context("request")?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await.context("response body")?;
        Ok(status)
    }

    async fn run(self: Arc<Self>, deadline: Instant) -> Tally {
        let timeout = Duration::from_secs_f64(self.args.timeout);
        let mut tally = Tally::default();
        let mut kept: Option<Sender> = None;
        while Instant::now() < deadline {
            let started = Instant::now();
            let once = async {
                let mut sender = match kept.take() {
                    Some(sender) => sender,
                    None => {
                        tally.opened += 1;
                        self.open().await?
                    }
                };
                let status = self.request(&mut sender).await?;
                anyhow::Ok((status, sender))
            };
            match tokio::time::timeout(timeout, once).await {
                Ok(Ok((status, sender))) => {
                    if status == 200 {
                        let us = started.elapsed().as_micros();
                        tally
                            .latencies_us
                            .push(u32::try_from(us).unwrap_or(u32::MAX));
                    } else {
                        tally.non200 += 1;
                    }
                    if !self.args.new_connections {
                        kept = Some(sender);
                    }
                }
                Ok(Err(e)) => tally.error(&e),
                Err(_) => tally.error(&anyhow::anyhow!("timeout")),
            }
        }
        tally
    }
}

/// Reads a CONNECT's answer up to its blank line and wants a 200. Nothing follows it before
/// the client speaks, so reading past the head cannot swallow TLS bytes.
async fn connect_answer(tcp: &mut TcpStream) -> anyhow::Result<()> {
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            bail!("the proxy closed the connection");
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 16 * 1024 {
            bail!("answer head too long");
        }
    }
    let status = head.split(|&b| b == b' ').nth(1).unwrap_or_default();
    if status != b"200" {
        bail!("answered {}", String::from_utf8_lossy(status));
    }
    Ok(())
}

/// The latency at quantile `q` of sorted microseconds, in milliseconds.
fn quantile_ms(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    let i = rank.clamp(1, sorted.len()) - 1;
    sorted.get(i).copied().unwrap_or_default() as f64 / 1e3
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let connections = args.connections.max(1);
    let duration = Duration::from_secs_f64(args.duration);
    let ctx = Arc::new(Ctx::new(args)?);
    let (tallies, elapsed) = runtime.block_on(async {
        let started = Instant::now();
        let deadline = started + duration;
        let tasks: Vec<_> = (0..connections)
            .map(|_| tokio::spawn(ctx.clone().run(deadline)))
            .collect();
        let mut tallies = Vec::with_capacity(tasks.len());
        for task in tasks {
            tallies.push(task.await?);
        }
        anyhow::Ok((tallies, started.elapsed()))
    })?;

    let mut latencies = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut non200, mut opened) = (0, 0);
    for t in tallies {
        latencies.extend_from_slice(&t.latencies_us);
        non200 += t.non200;
        opened += t.opened;
        for (k, v) in t.errors {
            *errors.entry(k).or_default() += v;
        }
    }
    latencies.sort_unstable();
    let seconds = elapsed.as_secs_f64();
    let out = serde_json::json!({
        "requests": latencies.len(),
        "seconds": seconds,
        "rps": latencies.len() as f64 / seconds,
        "p50_ms": quantile_ms(&latencies, 0.50),
        "p99_ms": quantile_ms(&latencies, 0.99),
        "p999_ms": quantile_ms(&latencies, 0.999),
        "max_ms": quantile_ms(&latencies, 1.0),
        "non200": non200,
        "errors": errors.values().sum::<u64>(),
        "error_kinds": errors,
        "connections_opened": opened,
    });
    println!("{out}");
    Ok(())
}
