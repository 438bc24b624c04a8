//! The server: the proxy and admin listeners, the worker threads that serve proxy connections,
//! the balancer that hands each accepted connection to the least busy worker, and shutdown.
//!
//! [`Server::bind`] builds every part from a [`Config`] and binds the listeners; [`Server::run`]
//! serves until its shutdown future completes, then lets open connections finish.
//! [`Server::reloader`] applies a configuration read again (SIGHUP) while it serves.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use bytes::BytesMut;

use crate::admin::Admin;
use crate::body::{BoxError, ClientBody};
use crate::ca::{Ca, Leaves, LeavesSlot};
use crate::cache::{Cache, VaultSource};
use crate::config::{CaFiles, Config, Http1Server, TlsFiles};
use crate::coverage::Coverage;
use crate::downstream::{self, Outcome};
use crate::idle::{self, Activity, Limits, Watched};
use crate::lifecycle::Lifecycle;
use crate::proxy::{self, ProxySlot};
use crate::release::{self, First, Served};
use crate::reload::{self, Reloader};
use crate::secret::Secret;
use crate::strict::{Link, Strict};
use crate::telemetry;
use crate::tunnel::Tunnels;
use crate::upstream::{Pool, PoolLimits};
use crate::vault;
use crate::vault::Vault;

/// Why latchkey could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: cannot listen on {addr}: {cause}")]
    Bind {
        /// The configuration key that names the address.
        key: &'static str,
        addr: SocketAddr,
        /// Said in the message, so not the error's source (which a printed chain says again).
        cause: std::io::Error,
    },
    #[error("vault: {0}")]
    Vault(#[from] vault::VaultError),
    #[error("tls.extra_roots: {0}")]
    Tls(String),
    #[error("tls.ca_cert / tls.ca_key: {0}")]
    Ca(String),
    /// `key` is `admin.tls_cert` or `admin.tls_key`; `reason` never quotes the key file.
    #[error("{key}: {path}: {reason}")]
    AdminTls {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error("latchkey's CA at {path} in Vault is unusable: {reason} (its key is never shown; replace the record with a CA that `latchkey ca init` makes, or delete it to run without the tunnel form)")]
    VaultCa { path: String, reason: String },
    #[error("cannot start a proxy worker: {source}")]
    Runtime { source: std::io::Error },
}

/// Hosts whose leaf certificate the tunnel form keeps at once.
const MAX_LEAVES: usize = 10_000;

/// How often latchkey asks Vault again for its CA when Vault did not answer at start.
const CA_RETRY: Duration = Duration::from_secs(5);

/// How long open connections get to finish after shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A latchkey whose listeners are bound and whose parts are built, ready to run.
///
/// The proxy listeners are served by `proxy.workers` threads, each with a single-threaded
/// runtime of its own and its own pool of upstream connections: a request, its upstream
/// connection and their tasks stay on one thread, with no cross-thread wake-ups on the hot
/// path (the way nginx's workers run). Each worker accepts on the proxy listeners itself and
/// keeps a connection while no worker serves fewer, or hands it to the one that does
/// ([`Balancer`]). The cache, the Vault client and the admin listener are shared, on the
/// runtime that calls [`Server::run`].
pub struct Server {
    proxy_listeners: Vec<std::net::TcpListener>,
    admin_listener: TcpListener,
    /// With `admin.tls_cert`, the admin listener speaks only TLS.
    admin_tls: Option<tokio_rustls::TlsAcceptor>,
    /// Each worker's proxy, and what reloads them.
    reloader: Reloader,
    /// The tunnel form's leaf certificates, shared by every worker; empty without a CA.
    leaves: LeavesSlot,
    /// `proxy.idle_timeout`: a client connection idle this long is closed.
    idle_timeout: Duration,
    /// `proxy.header_read_timeout`: how long a client has to send a whole request head.
    header_read_timeout: Duration,
    /// `proxy.body_timeout`: a client that takes none of its answer this long is cut.
    body_timeout: Duration,
    /// How client connections are served.
    serving: Serving,
    admin: Arc<Admin>,
    cache: Cache,
    vault: Arc<Vault>,
    /// Vault did not answer when asked for the CA at start: ask again until it does.
    ca_retry: bool,
}

impl Server {
    /// Builds everything and binds the listeners. Without `tls.ca_cert`, reads latchkey's CA
    /// from Vault: the one request made to Vault before serving.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        // Both ring (ours) and whatever a dependency enables may be compiled in; one provider
        // for the whole process. A second call (tests start several servers) changes nothing.
        let _ = rustls::crypto::ring::default_provider().install_default();
        telemetry::metrics_handle();

        let vault = Arc::new(Vault::new(&config.vault)?);
        let catalog = Arc::new(arc_swap::ArcSwap::from_pointee(config.catalog.clone()));
        let cache = Cache::new(
            &config.cache,
            Arc::new(VaultSource {
                vault: vault.clone(),
                catalog: catalog.clone(),
            }),
        );
        let dialer = reload::dialer(&config).map_err(|e| StartError::Tls(e.message))?;
        let (ca, ca_retry) = match &config.tls.ca {
            Some(files) => (Some(load_ca(files)?), false),
            None => match read_vault_ca(&vault).await? {
                VaultCa::Loaded(ca) => (Some(*ca), false),
                VaultCa::Absent => (None, false),
                VaultCa::Unanswered(e) => {
                    tracing::warn!(ca = %vault.ca_location(), error = %e, "cannot read latchkey's CA from Vault: the tunnel form (CONNECT) is off until Vault answers; asking again every {}s", CA_RETRY.as_secs());
                    (None, true)
                }
            },
        };
        let leaves = LeavesSlot::new(ca.map(|ca| Leaves::new(Arc::new(ca), MAX_LEAVES)));
        let pool_limits = PoolLimits {
            idle: config.proxy.pool_idle_timeout,
            body: config.proxy.body_timeout,
        };
        let lifecycle_pool = Pool::new(dialer.clone(), pool_limits);
        let lifecycle = Arc::new(Lifecycle::new(
            vault.clone(),
            catalog.clone(),
            cache.clone(),
            lifecycle_pool.clone(),
            config.proxy.request_timeout,
            config.admin.expiry_warning,
        ));
        let admin_tls = config
            .admin
            .tls
            .as_ref()
            .map(load_admin_tls)
            .transpose()?
            .map(tokio_rustls::TlsAcceptor::from);
        let admin = Arc::new(Admin::new(
            vault.clone(),
            lifecycle.clone(),
            config.admin.tokens.clone(),
            leaves.clone(),
            (config.admin.secure_cookie, config.proxy.body_timeout),
        ));

        let mut proxy_listeners = Vec::with_capacity(config.proxy.listen.len());
        for addr in &config.proxy.listen {
            let listener = listen(*addr).map_err(|cause| StartError::Bind {
                key: "proxy.listen",
                addr: *addr,
                cause,
            })?;
            proxy_listeners.push(listener);
        }
        let admin_listener = bind("admin.listen", config.admin.listen).await?;
        let (idle_timeout, header_read_timeout, body_timeout) = (
            config.proxy.idle_timeout,
            config.proxy.header_read_timeout,
            config.proxy.body_timeout,
        );
        let serving = Serving {
            idle_release: config.proxy.idle_release,
            own_http1: config.proxy.http1_server == Http1Server::Latchkey,
        };
        let parts = reload::Parts {
            catalog,
            cache: cache.clone(),
            coverage: Arc::new(Coverage::new(
                vault.clone(),
                cache.clone(),
                config.cache.ttl,
            )),
            lifecycle,
            lifecycle_pool,
            pools: (0..config.proxy.workers)
                .map(|_| Pool::new(dialer.clone(), pool_limits))
                .collect(),
            listening: proxy_listeners
                .iter()
                .filter_map(|l| l.local_addr().ok())
                .collect(),
        };
        Ok(Server {
            proxy_listeners,
            admin_listener,
            admin_tls,
            reloader: Reloader::new(config, parts),
            leaves,
            idle_timeout,
            header_read_timeout,
            body_timeout,
            serving,
            admin,
            cache,
            vault,
            ca_retry,
        })
    }

    pub fn proxy_addrs(&self) -> Vec<SocketAddr> {
        self.proxy_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener.local_addr().ok()
    }

    /// What applies a configuration read again (SIGHUP) to this server while it runs.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Serves until `shutdown` completes, then lets open connections finish (up to a grace
    /// period).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let proxy_addrs: Vec<String> = self.proxy_addrs().iter().map(|a| a.to_string()).collect();
        let admin_addr = self.admin_addr().map(|a| a.to_string()).unwrap_or_default();

        let (stop_tx, stop_rx) = watch::channel(false);
        let limits = Limits {
            idle: self.idle_timeout,
            stall: self.body_timeout,
        };
        let timeouts = (limits, self.header_read_timeout);
        let workers = start_workers(
            self.reloader.slots(),
            &self.leaves,
            &self.proxy_listeners,
            &stop_rx,
            timeouts,
            self.serving,
        )?;
        drop(self.proxy_listeners);
        let mut tasks = tokio::task::JoinSet::new();

        tracing::info!(
            proxy = %proxy_addrs.join(","),
            admin = %admin_addr,
            admin_tls = self.admin_tls.is_some(),
            vault = %self.vault.address(),
            workers = self.reloader.slots().len(),
            "listening"
        );
        let graceful = Arc::new(GracefulShutdown::new());
        {
            let admin = self.admin.clone();
            let handler = move |req: Box<http::Request<hyper::body::Incoming>>| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(*req).await) }
            };
            tasks.spawn(accept_loop(
                self.admin_listener,
                self.admin_tls,
                handler,
                graceful.clone(),
                stopped(stop_rx.clone()),
                timeouts,
            ));
        }
        // Upkeep, which holds nothing a client waits for: ended at once at shutdown, even in the
        // middle of a call to a Vault that hangs.
        let mut background = tokio::task::JoinSet::new();
        // Reported, not waited for: `/healthz` answers while a Vault that hangs is asked (up to
        // `vault.timeout` for each of its addresses).
        let vault = self.vault.clone();
        background.spawn(async move {
            match vault.check().await {
                Ok(_) => {
                    tracing::info!("vault reachable, token accepted, KV version 2 mount found")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "vault check failed at start; /readyz will say so")
                }
            }
        });
        background.spawn(self.cache.clone().maintain(stopped(stop_rx.clone())));
        if self.ca_retry {
            background.spawn(retry_vault_ca(
                self.vault.clone(),
                self.leaves.clone(),
                stopped(stop_rx.clone()),
            ));
        }
        background.spawn(
            self.vault
                .clone()
                .renew_token_until(stopped(stop_rx.clone())),
        );

        shutdown.await;
        tracing::info!("shutting down");
        // One grace period for everything: the proxy workers and the admin listener finish
        // their requests in flight side by side, not one after the other.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        let _ = stop_tx.send(true);
        background.abort_all();
        while tasks.join_next().await.is_some() {}
        // Each worker stops accepting, serves what was handed to it until no worker accepts
        // any more, closes its idle connections, lets requests in flight finish (for at most
        // SHUTDOWN_GRACE), then stops.
        let workers = async {
            for done in workers {
                let _ = done.await;
            }
        };
        let admin = async {
            match Arc::try_unwrap(graceful) {
                Ok(graceful) => {
                    let _ = tokio::time::timeout_at(deadline, graceful.shutdown()).await;
                }
                // Only the admin acceptor holds another, and it has returned: never expected.
                Err(_) => tracing::warn!("admin connections were not waited for"),
            }
        };
        tokio::join!(workers, admin);
        while background.join_next().await.is_some() {}
        tracing::info!("stopped");
        Ok(())
    }
}

/// Starts a proxy worker for each slot, each accepting on its own copy of every proxy
/// listener until `stop`; returns what completes when each has finished.
fn start_workers(
    slots: &[ProxySlot],
    leaves: &LeavesSlot,
    listeners: &[std::net::TcpListener],
    stop: &watch::Receiver<bool>,
    timeouts: (Limits, Duration),
    serving: Serving,
) -> Result<Vec<tokio::sync::oneshot::Receiver<()>>, StartError> {
    let mut receivers = Vec::with_capacity(slots.len());
    let mut handles = Vec::with_capacity(slots.len());
    for _ in slots {
        let (tx, rx) = mpsc::unbounded_channel();
        receivers.push(rx);
        handles.push(WorkerHandle {
            tx,
            open: Arc::new(AtomicUsize::new(0)),
        });
    }
    let balancer = Arc::new(Balancer::new(handles));
    let mut workers = Vec::with_capacity(slots.len());
    for (n, (slot, rx)) in slots.iter().zip(receivers).enumerate() {
        let copies = listeners
            .iter()
            .map(|l| {
                l.try_clone().map_err(|cause| StartError::Bind {
                    key: "proxy.listen",
                    addr: l
                        .local_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
                    cause,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let worker = Worker {
            n,
            listeners: copies,
            handed: rx,
            balancer: balancer.clone(),
            stop: stop.clone(),
        };
        workers.push(spawn_worker(
            worker,
            slot.clone(),
            leaves.clone(),
            timeouts,
            serving,
        )?);
    }
    Ok(workers)
}

/// Loads what the configuration names on disk as [`Server::bind`] does, without binding or
/// asking Vault: the upstream trust (`tls.extra_roots`), latchkey's CA files, the admin
/// listener's certificate and key. For `check-config`, and for `serve` before it starts (a
/// file that fails here is a configuration refused: exit status 64).
pub fn check_files(config: &Config) -> Result<(), StartError> {
    reload::dialer(config).map_err(|e| StartError::Tls(e.message))?;
    if let Some(files) = &config.tls.ca {
        load_ca(files)?;
    }
    if let Some(files) = &config.admin.tls {
        load_admin_tls(files)?;
    }
    Ok(())
}

/// Reads latchkey's CA from its files (`tls.ca_cert`, `tls.ca_key`).
fn load_ca(files: &CaFiles) -> Result<Ca, StartError> {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|e| StartError::Ca(format!("cannot read {}: {e}", path.display())))
    };
    let cert = read(&files.cert)?;
    let key = Secret::from(read(&files.key)?);
    Ca::from_pem(&cert, &key).map_err(|e| StartError::Ca(e.to_string()))
}

/// The admin listener's TLS settings from its PEM files (`admin.tls_cert`, `admin.tls_key`):
/// the certificate chain, leaf first, and the private key (PKCS#8, PKCS#1 or SEC1) that goes
/// with it. ALPN offers what the listener serves in the clear too: HTTP/2 and HTTP/1.1.
fn load_admin_tls(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, StartError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let cert_error = |reason: String| StartError::AdminTls {
        key: "admin.tls_cert",
        path: files.cert.display().to_string(),
        reason,
    };
    let key_error = |reason: String| StartError::AdminTls {
        key: "admin.tls_key",
        path: files.key.display().to_string(),
        reason,
    };
    let cert_pem =
        std::fs::read(&files.cert).map_err(|e| cert_error(format!("cannot read it: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(cert_error(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let key_pem = Secret::from(
        std::fs::read_to_string(&files.key)
            .map_err(|e| key_error(format!("cannot read it: {e}")))?,
    );
    // The PEM parser's own error may quote a line of the file: it is not shown.
    let key = PrivateKeyDer::from_pem_slice(key_pem.expose().as_bytes()).map_err(|_| {
        key_error(
            "holds no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)".into(),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_error(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            key_error(format!(
                "cannot be used with the certificate in admin.tls_cert: {e}"
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What Vault said about latchkey's CA.
enum VaultCa {
    Loaded(Box<Ca>),
    Absent,
    /// Vault did not answer, or refused latchkey's token.
    Unanswered(vault::VaultError),
}

/// Reads latchkey's CA from Vault (`{mount}/latchkey/ca`). A record that is there but
/// unusable is an error, which stops a start.
async fn read_vault_ca(vault: &Vault) -> Result<VaultCa, StartError> {
    let path = vault.ca_location();
    match vault.read_ca().await {
        Ok(Some(record)) => {
            let ca = record.load().map_err(|reason| StartError::VaultCa {
                path: path.clone(),
                reason,
            })?;
            tracing::info!(ca = %path, "the tunnel form's CA comes from Vault");
            Ok(VaultCa::Loaded(Box::new(ca)))
        }
        Ok(None) => {
            tracing::info!(ca = %path, "no CA in Vault: the tunnel form (CONNECT) is off until `latchkey ca init` makes one and latchkey restarts");
            Ok(VaultCa::Absent)
        }
        // A record Vault holds but latchkey cannot read (a field not a string) is broken too.
        // An answer that is not one (not JSON, cut short, too long) is Vault's trouble, not
        // the record's: asked again, as a Vault that does not answer is.
        Err(e @ vault::VaultError::NotText) => Err(StartError::VaultCa {
            path,
            reason: e.to_string(),
        }),
        Err(e) => Ok(VaultCa::Unanswered(e)),
    }
}

/// Asks Vault for the CA every [`CA_RETRY`] until it answers (or `stop`), and turns the tunnel
/// form on if the CA is there: a replica that started while Vault was down ends up with the
/// same CA as the others, without a restart.
async fn retry_vault_ca(vault: Arc<Vault>, leaves: LeavesSlot, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(CA_RETRY) => {}
        }
        match read_vault_ca(&vault).await {
            Ok(VaultCa::Loaded(ca)) => {
                leaves.set(Leaves::new(Arc::from(ca), MAX_LEAVES));
                return;
            }
            Ok(VaultCa::Absent) => return,
            Ok(VaultCa::Unanswered(e)) => {
                tracing::debug!(ca = %vault.ca_location(), error = %e, "Vault still does not answer for the CA");
            }
            Err(e) => {
                tracing::error!(error = %e, "the tunnel form (CONNECT) stays off");
                return;
            }
        }
    }
}

/// Completes once the stop signal is given.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// An accepted proxy connection on its way to a worker.
type Accepted = (std::net::TcpStream, SocketAddr);

/// A worker as the others see it: where to send a connection, and how many it serves.
struct WorkerHandle {
    tx: mpsc::UnboundedSender<Accepted>,
    open: Arc<AtomicUsize>,
}

/// Keeps the proxy workers level: each connection is served by a worker serving the fewest.
///
/// Every worker accepts on the proxy listeners itself. Left at that, the load went to chance:
/// the first to wake took every connection waiting, so a client that opened its keep-alive
/// connections at once (a connection pool, a load generator) could have all of them served
/// by one thread while the others idled. So a worker keeps a connection it accepted only when
/// no other serves fewer ([`Balancer::keeps`]), and otherwise hands it to the one serving the
/// fewest ([`Balancer::dispatch`]): one hand-off between threads, when the counts are
/// uneven, and nothing per request. (Accepting on one thread and handing every connection
/// over cost each new connection two wake-ups across threads.)
struct Balancer {
    workers: Vec<WorkerHandle>,
    /// Where the search for the least busy worker starts, so that ties take turns.
    next: AtomicUsize,
    /// How many workers still accept: once none does, none hands a connection over.
    accepting: watch::Sender<usize>,
}

impl Balancer {
    fn new(workers: Vec<WorkerHandle>) -> Balancer {
        let (accepting, _) = watch::channel(workers.len());
        Balancer {
            workers,
            next: AtomicUsize::new(0),
            accepting,
        }
    }

    /// Whether worker `n` serves a connection it accepted: no worker serves fewer. It is
    /// counted on `n` if so.
    fn keeps(&self, n: usize) -> bool {
        let mine = self.workers[n].open.load(Ordering::Relaxed);
        let fewest = self
            .workers
            .iter()
            .all(|w| w.open.load(Ordering::Relaxed) >= mine);
        if fewest {
            self.workers[n].open.fetch_add(1, Ordering::Relaxed);
        }
        fewest
    }

    fn dispatch(&self, mut accepted: Accepted) {
        let n = self.workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        // Stable: among equally busy workers, the turn order holds.
        order.sort_by_key(|&i| self.workers[i].open.load(Ordering::Relaxed));
        for i in order {
            let worker = &self.workers[i];
            worker.open.fetch_add(1, Ordering::Relaxed);
            match worker.tx.send(accepted) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => {
                    // That worker has stopped (shutting down); another may take it.
                    worker.open.fetch_sub(1, Ordering::Relaxed);
                    accepted = back;
                }
            }
        }
        tracing::debug!(peer = %accepted.1, "no proxy worker to take a connection; closed");
    }
}

/// Counts a connection as open on its worker (for the balancer and in
/// `latchkey_client_connections`) until dropped. The balancer counted it when it handed it
/// over; the gauge counts it from here.
struct OpenConnection {
    open: Arc<AtomicUsize>,
    gauge: metrics::Gauge,
}

impl OpenConnection {
    fn new(open: Arc<AtomicUsize>, gauge: &metrics::Gauge) -> OpenConnection {
        gauge.increment(1.0);
        OpenConnection {
            open,
            gauge: gauge.clone(),
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.gauge.decrement(1.0);
    }
}

/// A proxy worker's share of the listening: its copies of the proxy listeners, the
/// connections other workers hand it, and when to stop.
struct Worker {
    n: usize,
    listeners: Vec<std::net::TcpListener>,
    handed: mpsc::UnboundedReceiver<Accepted>,
    balancer: Arc<Balancer>,
    stop: watch::Receiver<bool>,
}

/// The next connection on any of `listeners`, with `TCP_NODELAY` set.
async fn accept_any(listeners: &[TcpListener]) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
    let accepted = std::future::poll_fn(|cx| {
        for listener in listeners {
            if let Poll::Ready(accepted) = listener.poll_accept(cx) {
                return Poll::Ready(accepted);
            }
        }
        Poll::Pending
    })
    .await;
    if let Ok((stream, _)) = &accepted {
        let _ = stream.set_nodelay(true);
        progress_in_steps(stream);
    }
    accepted
}

/// How much of an answer may wait unsent in a client socket's buffer (`TCP_NOTSENT_LOWAT`).
/// Without it, Linux wakes a writer only once a third of the send buffer is free, and the
/// buffer grows to 4 MiB: a client reading 16 KB/s showed latchkey no progress for over a
/// minute, and was cut as stalled ([`idle::Closed::Stalled`]). With it, a write goes on for
/// every 128 KiB the client takes; the kernel still sends from the whole buffer.
const UNSENT_LOW: u32 = 128 * 1024;

/// Sets [`UNSENT_LOW`] on a client socket (where the system has it).
fn progress_in_steps(stream: &tokio::net::TcpStream) {
    #[cfg(target_os = "linux")]
    {
        let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(UNSENT_LOW);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = stream;
}

/// Starts one proxy worker thread, serving the connections it accepts and those handed to it
/// until `worker.stop`; the returned receiver completes when it has finished.
fn spawn_worker(
    worker: Worker,
    proxy: ProxySlot,
    leaves: LeavesSlot,
    (idle, header_read): (Limits, Duration),
    serving: Serving,
) -> Result<tokio::sync::oneshot::Receiver<()>, StartError> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    // Shown at 0 from the start, before the worker's thread runs: the start returns, and
    // `/metrics` can be read, before every thread has.
    telemetry::client_connections(worker.n).set(0.0);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| StartError::Runtime { source })?;
    std::thread::Builder::new()
        .name(format!("latchkey-proxy-{}", worker.n))
        .spawn(move || {
            runtime.block_on(async move {
                let graceful = GracefulShutdown::new();
                // Connections served in turns close at once when idle, on this signal.
                let (stop, _) = watch::channel(());
                let tunnels = Arc::new(Tunnels::new(
                    proxy.clone(),
                    leaves,
                    (idle, header_read),
                    serving.own_http1,
                    stop.subscribe(),
                ));
                let handler = move |req: Box<http::Request<ClientBody>>| {
                    // The proxy in force when the request starts serves it to its end.
                    let proxy = proxy.load_full();
                    let tunnels = tunnels.clone();
                    async move {
                        // An h2 extended CONNECT (`:protocol`, a WebSocket) is a request.
                        let tunnel = req.method() == http::Method::CONNECT
                            && req.extensions().get::<hyper::ext::Protocol>().is_none();
                        Ok::<_, Infallible>(if tunnel {
                            tunnels.connect(*req).await
                        } else {
                            proxy.handle(req).await
                        })
                    }
                };
                // Request heads are timed by `Strict`, from their first byte; an idle
                // keep-alive connection is `idle`'s.
                let builders = Arc::new(Builders {
                    auto: downstream::hyper_builder(None),
                    http1: http1_builder(),
                });
                let Worker { n, listeners, mut handed, balancer, stop: mut stopping } = worker;
                let gauge = telemetry::client_connections(n);
                let open = balancer.workers[n].open.clone();
                let take = |stream: tokio::net::TcpStream, peer: SocketAddr| {
                    let guard = OpenConnection::new(open.clone(), &gauge);
                    if serving.own_http1 {
                        serve_own(&builders, &graceful, &stop, stream, (peer, idle, header_read), handler.clone(), guard)
                    } else if serving.idle_release {
                        serve_in_turns(&builders, &graceful, &stop, stream, (peer, idle, header_read), handler.clone(), guard)
                    } else {
                        serve(&builders.auto, &graceful, stream, (peer, idle, Some(header_read)), handler.clone(), guard)
                    }
                };
                let take_handed = |(stream, peer): Accepted| match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => take(stream, peer),
                    Err(e) => {
                        // Counted by the worker that handed it over.
                        open.fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!(%peer, error = %e, "a proxy worker could not take a connection")
                    }
                };
                let mut listeners: Vec<TcpListener> = listeners
                    .into_iter()
                    .filter_map(|l| match TcpListener::from_std(l) {
                        Ok(l) => Some(l),
                        Err(e) => {
                            tracing::error!(worker = n, error = %e, "a proxy worker cannot accept on a listener; the others do");
                            None
                        }
                    })
                    .collect();
                let mut accepting = balancer.accepting.subscribe();
                let mut failures = AcceptFailures::default();
                let mut listening = !listeners.is_empty();
                if !listening {
                    balancer.accepting.send_modify(|left| *left -= 1);
                }
                loop {
                    tokio::select! {
                        biased;
                        Some(handed) = handed.recv() => take_handed(handed),
                        _ = stopping.wait_for(|s| *s), if listening => {
                            listening = false;
                            listeners.clear();
                            balancer.accepting.send_modify(|left| *left -= 1);
                        }
                        accepted = accept_any(&listeners), if listening => match accepted {
                            Ok((stream, peer)) if balancer.keeps(n) => take(stream, peer),
                            Ok((stream, peer)) => match stream.into_std() {
                                Ok(stream) => balancer.dispatch((stream, peer)),
                                Err(e) => tracing::warn!(%peer, error = %e, "an accepted connection could not be handed over"),
                            },
                            Err(e) => {
                                // Out of descriptors and the like: wait a little rather than spin.
                                failures.note(&e);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        },
                        // No worker accepts any more, so nothing more is handed over: what
                        // was is served, none is dropped unanswered.
                        _ = accepting.wait_for(|left| *left == 0), if !listening => break,
                    }
                }
                handed.close();
                while let Some(left) = handed.recv().await {
                    take_handed(left);
                }
                let _ = stop.send(());
                // The worker's own hold on the tunnels and their receiver of `stop`: from here,
                // each connection or tunnel still open keeps `stop` open, until it ends.
                drop(handler);
                let drained = async {
                    tokio::join!(graceful.shutdown(), stop.closed());
                };
                if tokio::time::timeout(SHUTDOWN_GRACE, drained)
                    .await
                    .is_err()
                {
                    tracing::warn!("connections still open after the grace period are closed; their requests' access lines say error=shutdown");
                }
            });
            // The connections still open are dropped here, on this thread, before the process
            // may exit: each request cut writes its access line.
            telemetry::cut(|| drop(runtime));
            let _ = done_tx.send(());
        })
        .map_err(|source| StartError::Runtime { source })?;
    Ok(done_rx)
}

/// Binds and runs latchkey until `shutdown`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    Server::bind(config).await?.run(shutdown).await
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    listen(addr)
        .and_then(TcpListener::from_std)
        .map_err(|cause| StartError::Bind { key, addr, cause })
}

/// How many connections the kernel completes for a listener before latchkey accepts them.
/// The standard library asks for 128, which a burst of new clients overflows (each dropped
/// SYN waits a second for its retransmission); the kernel caps this at `net.core.somaxconn`.
const BACKLOG: i32 = 4096;

/// A non-blocking listener on `addr` with [`BACKLOG`], address reuse as the standard library
/// sets it.
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The HTTP/1 settings of a proxy connection served in turns: those of [`downstream::hyper_builder`].
fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .half_close(true);
    builder
}

/// How a proxy worker serves its client connections (`proxy.idle_release`,
/// `proxy.http1_server`).
#[derive(Debug, Clone, Copy)]
struct Serving {
    /// HTTP/1.1 client connections are served in turns ([`release`]).
    idle_release: bool,
    /// HTTP/1.1 client connections are read by latchkey's own server ([`downstream`]).
    own_http1: bool,
}

/// A proxy worker's HTTP server settings, shared by its connections' tasks.
struct Builders {
    auto: auto::Builder<TokioExecutor>,
    http1: http1::Builder,
}

/// A client connection's service: each request held to strict framing ([`Checked`]) and
/// counted in `activity` while in flight. Its future is not boxed: hyper keeps room for it (some
/// 12 KiB) for as long as its connection lives, which in turns ([`release`]) is a busy spell,
/// and boxing it here would copy all of it once per request.
fn service<B, H, F>(
    activity: &Arc<Activity>,
    checked: Checked<H>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<crate::body::BoxBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<crate::body::BoxBody>, Infallible>>
                 + Send
                 + 'static,
> + Clone
       + Send
       + Sync
       + Unpin
       + 'static
where
    B: From<hyper::body::Incoming> + Send + 'static,
    H: Fn(Box<http::Request<B>>) -> F + Clone + Send + Sync + Unpin + 'static,
    F: Future<Output = Result<http::Response<crate::body::BoxBody>, Infallible>> + Send + 'static,
{
    let activity = activity.clone();
    service_fn(move |req: http::Request<hyper::body::Incoming>| {
        idle::track(&activity, checked.call(Box::new(req.map(B::from))))
    })
}

/// A connection's handler, each of its requests held to strict framing ([`proxy::checked`]).
#[derive(Clone)]
struct Checked<H> {
    link: Arc<Link>,
    handler: H,
}

impl<H> Checked<H> {
    fn call<B, F>(
        &self,
        req: Box<http::Request<B>>,
    ) -> impl Future<Output = Result<http::Response<crate::body::BoxBody>, Infallible>> + use<B, F, H>
    where
        H: Fn(Box<http::Request<B>>) -> F + Clone,
        F: Future<Output = Result<http::Response<crate::body::BoxBody>, Infallible>>,
    {
        proxy::checked(self.link.clone(), req, self.handler.clone())
    }
}

/// Serves one proxy client connection in turns ([`release`]): between requests an HTTP/1.1
/// connection holds no hyper connection and none of its buffers. An h2 connection is served as
/// [`serve`] serves it. Idle timeout, strict framing and shutdown are as there.
fn serve_in_turns<B, H, F>(
    builders: &Arc<Builders>,
    graceful: &GracefulShutdown,
    stop: &watch::Sender<()>,
    stream: tokio::net::TcpStream,
    (peer, idle, header_read): (SocketAddr, Limits, Duration),
    handler: H,
    guard: impl Send + 'static,
) where
    B: From<hyper::body::Incoming> + Send + 'static,
    H: Fn(Box<http::Request<B>>) -> F + Clone + Send + Sync + Unpin + 'static,
    F: Future<Output = Result<http::Response<crate::body::BoxBody>, Infallible>> + Send + 'static,
{
    let activity = Activity::new();
    let link = Link::new();
    let io = Box::new(release::Lease::new(
        Strict::new(
            Watched::new(stream, activity.clone()),
            link.clone(),
            header_read,
        ),
        activity.clone(),
    ));
    let service = service(&activity, Checked { link, handler });
    // Held until the connection ends, so that shutdown waits for it as for the others.
    let watcher = graceful.watcher();
    let (builders, mut stop) = (builders.clone(), stop.subscribe());
    // Boxed, and built outside the task: the task then holds a pointer to it, not a copy per
    // await point (the task itself stays a few hundred bytes).
    let conn: Connection = Box::pin({
        async move {
            let served = release::serve(io, &builders.http1, service.clone(), &mut stop).await;
            match served {
                Served::Done(ended, turns) => {
                    tracing::trace!(%peer, turns, "connection served in turns ended");
                    ended.map_err(BoxError::from)
                }
                Served::H2(io) => serve_h2(&builders.auto, watcher, io, service).await,
            }
        }
    });
    spawn_connection(conn, activity, (peer, idle), guard);
}

/// Serves one proxy client connection with latchkey's own HTTP/1.1 server ([`downstream`]),
/// until a request comes that is hyper's (an upgrade, CONNECT, `Expect`): from then on it is
/// served in turns by hyper ([`release`]). An h2 connection is served as [`serve`] serves it.
/// Idle timeout, strict framing and shutdown are as there.
fn serve_own<H, F>(
    builders: &Arc<Builders>,
    graceful: &GracefulShutdown,
    stop: &watch::Sender<()>,
    stream: tokio::net::TcpStream,
    (peer, idle, header_read): (SocketAddr, Limits, Duration),
    handler: H,
    guard: impl Send + 'static,
) where
    H: Fn(Box<http::Request<ClientBody>>) -> F + Clone + Send + Sync + Unpin + 'static,
    F: Future<Output = Result<http::Response<crate::body::BoxBody>, Infallible>> + Send + 'static,
{
    let activity = Activity::new();
    let link = Link::new();
    let mut io = Strict::new(
        Watched::new(stream, activity.clone()),
        link.clone(),
        header_read,
    );
    let own = Checked { link, handler };
    let watcher = graceful.watcher();
    let (builders, mut stop) = (builders.clone(), stop.subscribe());
    // What the task holds across its awaits is what every idle connection costs: the handler
    // is held, not hyper's service around it, which is built only for a hand-over.
    let conn: Connection = Box::pin({
        let activity = activity.clone();
        async move {
            match release::first_bytes(io.get_ref().get_ref(), &mut stop).await {
                First::Closed => return Ok(()),
                First::H2 => {
                    let service = service(&activity, own);
                    let lease = Box::new(release::Lease::new(io, activity));
                    return serve_h2(&builders.auto, watcher, lease, service).await;
                }
                First::Http1 => {}
            }
            let mut buf = BytesMut::new();
            // In flight is counted by `downstream::serve` itself (`Ready::request`).
            let handler = |req| own.call(req);
            match downstream::serve(&mut io, &mut buf, &handler, proxy::not_strict, &mut stop).await
            {
                Outcome::Done(ended) => ended.map_err(BoxError::from),
                Outcome::Hyper => {
                    tracing::trace!("a request for hyper's server: the connection is handed over");
                    // Requests hyper serves, from here on.
                    let service = service(&activity, own);
                    let lease = Box::new(release::Lease::handed_over(io, activity, buf.freeze()));
                    match release::serve_turns(lease, &builders.http1, service, &mut stop).await {
                        Served::Done(ended, _) => ended.map_err(BoxError::from),
                        // Only a connection's first bytes are looked at for h2.
                        Served::H2(_) => Ok(()),
                    }
                }
            }
        }
    });
    spawn_connection(conn, activity, (peer, idle), guard);
}

/// Runs a client connection's task: `conn` until it ends or has been idle for `idle`
/// ([`idle::or_idle`]); `guard` lives as long as it does.
fn spawn_connection<C>(
    conn: C,
    activity: Arc<Activity>,
    (peer, idle): (SocketAddr, Limits),
    guard: impl Send + 'static,
) where
    C: Future<Output = Result<(), BoxError>> + Send + 'static,
{
    tokio::spawn(async move {
        match idle::or_idle(conn, &activity, idle).await {
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "connection ended with an error"),
            Ok(Ok(())) => {}
            Err(closed) => {
                telemetry::client_connection_closed(closed.reason());
                match closed {
                    idle::Closed::Idle => {
                        tracing::debug!(%peer, timeout = ?idle.idle, "closed an idle client connection")
                    }
                    idle::Closed::Stalled => {
                        tracing::debug!(%peer, timeout = ?idle.stall, "closed a client connection that took none of its answer")
                    }
                }
            }
        }
        drop(guard);
    });
}

/// A client connection being served, boxed.
type Connection = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// An h2 connection found by [`serve_in_turns`], served as [`serve`] serves it. Not `async`:
/// hyper's connection is built straight into its box, not in the caller's future.
fn serve_h2<S>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: Box<release::Lease<Watched<tokio::net::TcpStream>>>,
    service: S,
) -> Connection
where
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::body::BoxBody>,
            Error = Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io.into_inner()), service);
    Box::pin(watcher.watch(conn.into_owned()))
}

/// Serves one client connection on the current runtime; `guard` lives as long as it does. A
/// connection with no request in flight and no byte moving for `idle` is closed ([`idle`]).
/// With `strict` (the proxy listener), what the client sends is held to strict HTTP/1.1
/// framing ([`strict`]) and each request head must be whole within that long.
fn serve<S, B, H, F>(
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    stream: S,
    (peer, idle, strict): (SocketAddr, Limits, Option<Duration>),
    handler: H,
    guard: impl Send + 'static,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: From<hyper::body::Incoming> + Send + 'static,
    H: Fn(Box<http::Request<B>>) -> F + Clone + Send + Sync + Unpin + 'static,
    F: Future<Output = Result<http::Response<crate::body::BoxBody>, Infallible>> + Send + 'static,
{
    let activity = Activity::new();
    let link = Link::new();
    let watched = Watched::new(stream, activity.clone());
    let io = TokioIo::new(match strict {
        Some(header_read) => Strict::new(watched, link.clone(), header_read),
        None => Strict::unchecked(watched),
    });
    let service = service(&activity, Checked { link, handler });
    let conn = builder.serve_connection_with_upgrades(io, service);
    // Boxed too, so that the task holds it once (about 2 KiB), not a copy per await point.
    let conn = Box::pin(graceful.watch(conn.into_owned()));
    spawn_connection(conn, activity, (peer, idle), guard);
}

/// Accepts and serves connections on the current runtime (the admin listener); with `tls`, each
/// connection is a TLS one, and a client that does not complete the handshake within
/// `header_read` (the time it would have to send a request head) is dropped.
async fn accept_loop<H, F>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: H,
    graceful: Arc<GracefulShutdown>,
    stop: impl Future<Output = ()>,
    (idle, header_read): (Limits, Duration),
) where
    H: Fn(Box<http::Request<hyper::body::Incoming>>) -> F + Clone + Send + Sync + Unpin + 'static,
    F: Future<Output = Result<http::Response<crate::body::BoxBody>, Infallible>> + Send + 'static,
{
    let builder = downstream::hyper_builder(Some(header_read));
    // Handshakes under way. They hold `graceful`, which shutdown needs back whole: at stop they
    // are ended (no request has been read on them yet) before this returns.
    let mut handshakes = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    while let Some((stream, peer)) = next_connection(&listener, stop.as_mut()).await {
        while handshakes.try_join_next().is_some() {}
        let Some(tls) = &tls else {
            serve(
                &builder,
                &graceful,
                stream,
                (peer, idle, None),
                handler.clone(),
                (),
            );
            continue;
        };
        let accept = tls.accept(stream);
        let (builder, graceful, handler) = (builder.clone(), graceful.clone(), handler.clone());
        handshakes.spawn(async move {
            match tokio::time::timeout(header_read, accept).await {
                Ok(Ok(stream)) => serve(
                    &builder,
                    &graceful,
                    stream,
                    (peer, idle, None),
                    handler,
                    (),
                ),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "admin TLS handshake failed; connection closed")
                }
                Err(_) => {
                    tracing::debug!(%peer, ?header_read, "admin TLS handshake not done in time; connection closed")
                }
            }
        });
    }
    handshakes.abort_all();
    while handshakes.join_next().await.is_some() {}
}

/// How often at most a listener's failed accepts are told of: out of descriptors, it fails
/// every 50 ms for as long as that lasts.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

/// A listener's failed accepts, told of at most once per [`ACCEPT_WARN_EVERY`] with how many
/// went untold since.
#[derive(Default)]
struct AcceptFailures {
    last: Option<std::time::Instant>,
    untold: u64,
}

impl AcceptFailures {
    fn note(&mut self, e: &std::io::Error) {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < ACCEPT_WARN_EVERY)
        {
            self.untold += 1;
            return;
        }
        tracing::warn!(error = %e, untold = self.untold, "accept failed; new connections wait (told at most every 10 s, with how many failures went untold)");
        self.last = Some(now);
        self.untold = 0;
    }
}

/// The next connection on `listener` (with `TCP_NODELAY` set), or `None` once `stop` has
/// completed.
async fn next_connection<S: Future<Output = ()>>(
    listener: &TcpListener,
    mut stop: std::pin::Pin<&mut S>,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    let mut failures = AcceptFailures::default();
    loop {
        tokio::select! {
            _ = &mut stop => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    progress_in_steps(&stream);
                    return Some((stream, peer));
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    failures.note(&e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker() -> (WorkerHandle, mpsc::UnboundedReceiver<Accepted>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let open = Arc::new(AtomicUsize::new(0));
        (WorkerHandle { tx, open }, rx)
    }

    fn accepted(listener: &std::net::TcpListener) -> Accepted {
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let peer = stream.local_addr().unwrap();
        (stream, peer)
    }

    fn received(rx: &mut mpsc::UnboundedReceiver<Accepted>) -> usize {
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    fn open(b: &Balancer) -> Vec<usize> {
        b.workers
            .iter()
            .map(|w| w.open.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn connections_go_to_the_least_busy_worker_and_ties_take_turns() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (handles, mut rxs): (Vec<_>, Vec<_>) = (0..3).map(|_| worker()).unzip();
        let b = Balancer::new(handles);

        // Opened at once, as a client's pool opens them: spread evenly.
        for _ in 0..6 {
            b.dispatch(accepted(&listener));
        }
        assert_eq!(open(&b), [2, 2, 2]);
        let got: Vec<usize> = rxs.iter_mut().map(received).collect();
        assert_eq!(got, [2, 2, 2]);

        // Worker 1's connections close: the next two go to it, not by turn.
        b.workers[1].open.store(0, Ordering::Relaxed);
        b.dispatch(accepted(&listener));
        b.dispatch(accepted(&listener));
        assert_eq!(open(&b), [2, 2, 2]);
        let got: Vec<usize> = rxs.iter_mut().map(received).collect();
        assert_eq!(got, [0, 2, 0]);

        // A worker that has stopped is passed over, and its count is left as it was.
        drop(rxs.remove(0));
        b.workers[0].open.store(0, Ordering::Relaxed);
        b.dispatch(accepted(&listener));
        assert_eq!(open(&b)[0], 0);
        let got: Vec<usize> = rxs.iter_mut().map(received).collect();
        assert_eq!(got.iter().sum::<usize>(), 1);
    }

    #[test]
    fn a_worker_keeps_what_it_accepted_only_while_no_worker_serves_fewer() {
        let (handles, _rxs): (Vec<_>, Vec<_>) = (0..3).map(|_| worker()).unzip();
        let b = Balancer::new(handles);

        // All level: worker 2 keeps its connection, and it is counted.
        assert!(b.keeps(2));
        assert_eq!(open(&b), [0, 0, 1]);
        // Now it serves more than the others: it keeps no more, and nothing is counted.
        assert!(!b.keeps(2));
        assert_eq!(open(&b), [0, 0, 1]);
        // The others keep theirs until they are level with it; then it keeps again.
        assert!(b.keeps(0));
        assert!(!b.keeps(0));
        assert!(b.keeps(1));
        assert_eq!(open(&b), [1, 1, 1]);
        assert!(b.keeps(2));
        assert_eq!(open(&b), [1, 1, 2]);
    }
}
