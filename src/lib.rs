//! latchkey: an HTTP proxy that holds API keys so that workflows never do.
//!
//! A workflow sends its request tagged with a connection ID; latchkey reads the connection from
//! Vault (or OpenBao) into an in-memory cache, injects the credential the way the service
//! expects it, forwards the request over TLS and streams the answer back. The contract is
//! `PRODUCT.md`; the README shows how to run it.
//!
//! # Layout
//!
//! - [`config`]: the TOML file and environment, validated into [`config::Config`]; every error
//!   names its key.
//! - [`catalog`]: connectors (fields, base URL templates, injection schemes, verification calls);
//!   the built-in catalog is `config/connectors.toml`.
//! - [`connection`]: the strict [`connection::ConnectionId`], the record stored in Vault, and the
//!   loaded [`connection::Connection`] with its credential rendered.
//! - [`secret`]: the [`secret::Secret`] type: redacted, zeroized on drop.
//! - [`vault`]: the shared Vault client: token auth, KV v2 reads and writes.
//! - [`cache`]: the read-through secret cache: TTL, refresh ahead, single flight, stale-if-error.
//! - [`auth`]: client tokens and which connections each client may use.
//! - [`inject`]: the pure request rewrite: strip, then inject.
//! - [`destination`]: host allow-lists and the check on the dialled address.
//! - [`proxy`]: the request path as named phases, the upstream client, errors as responses.
//! - [`lifecycle`]: create, read masked, change, rotate, verify and delete connections, and
//!   what the request path learns about them (upstream 401s and 403s).
//! - [`verify`]: the verification call and what its answer means.
//! - [`admin`]: health, readiness, metrics and the admin API over [`lifecycle`].
//! - [`telemetry`]: logging, the access log, metric names.
//! - [`cli`]: `latchkey connections ...`, the lifecycle over the admin API.
//! - [`dev`]: the demo: a local OpenBao, an echo upstream, and latchkey between them.
//!
//! [`Server::bind`] then [`Server::run`] is what `main` and the tests call.

pub mod admin;
pub mod auth;
pub mod cache;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod connection;
pub mod destination;
pub mod dev;
pub mod inject;
pub mod lifecycle;
pub mod proxy;
pub mod secret;
pub mod telemetry;
pub mod vault;
pub mod verify;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::Admin;
use crate::auth::Clients;
use crate::cache::{Cache, VaultSource};
use crate::config::Config;
use crate::destination::AddressPolicy;
use crate::lifecycle::Lifecycle;
use crate::proxy::pool::Pool;
use crate::proxy::upstream::{self, Dialer};
use crate::proxy::Proxy;
use crate::vault::Vault;

/// Why latchkey could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("vault: {0}")]
    Vault(#[from] vault::VaultError),
    #[error("tls.extra_roots: {0}")]
    Tls(String),
    #[error("cannot start a proxy worker: {source}")]
    Runtime { source: std::io::Error },
}

/// How long open connections get to finish after shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A latchkey whose listeners are bound and whose parts are built, ready to run.
///
/// The proxy listeners are served by `proxy.workers` threads, each with a single-threaded
/// runtime of its own and its own pool of upstream connections: a request, its upstream
/// connection and their tasks stay on one thread, with no cross-thread wake-ups on the hot
/// path (the way nginx's workers run). The cache, the Vault client and the admin listener are
/// shared, on the runtime that calls [`Server::run`].
pub struct Server {
    proxy_listeners: Vec<std::net::TcpListener>,
    admin_listener: TcpListener,
    workers: usize,
    parts: ProxyParts,
    admin: Arc<Admin>,
    cache: Cache,
    vault: Arc<Vault>,
}

/// What each worker builds its [`Proxy`] from.
struct ProxyParts {
    cache: Cache,
    lifecycle: Arc<Lifecycle>,
    clients: Clients,
    dialer: Dialer,
    request_timeout: Duration,
}

impl ProxyParts {
    /// A proxy with a connection pool of its own.
    fn proxy(&self) -> Proxy {
        Proxy::new(
            self.cache.clone(),
            self.lifecycle.clone(),
            self.clients.clone(),
            Pool::new(self.dialer.clone()),
            self.request_timeout,
        )
    }
}

impl Server {
    /// Builds everything and binds the listeners; makes no request to Vault yet.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        // Both ring (ours) and whatever a dependency enables may be compiled in; one provider
        // for the whole process. A second call (tests start several servers) changes nothing.
        let _ = rustls::crypto::ring::default_provider().install_default();
        telemetry::metrics_handle();

        let vault = Arc::new(Vault::new(&config.vault)?);
        let catalog = Arc::new(config.catalog.clone());
        let cache = Cache::new(
            &config.cache,
            Arc::new(VaultSource {
                vault: vault.clone(),
                catalog: catalog.clone(),
            }),
        );
        let tls = upstream::tls_config(&config.tls.extra_roots).map_err(StartError::Tls)?;
        let dialer = Dialer::new(
            AddressPolicy::new(config.proxy.allow_private_destinations.clone()),
            Arc::new(tls),
            config.proxy.connect_timeout,
        );
        let lifecycle = Arc::new(Lifecycle::new(
            vault.clone(),
            catalog.clone(),
            cache.clone(),
            Pool::new(dialer.clone()),
            config.proxy.request_timeout,
            config.admin.expiry_warning,
        ));
        let admin = Arc::new(Admin::new(
            vault.clone(),
            lifecycle.clone(),
            config.admin.tokens.clone(),
        ));
        let parts = ProxyParts {
            cache: cache.clone(),
            lifecycle,
            clients: Clients::new(config.clients.clone()),
            dialer,
            request_timeout: config.proxy.request_timeout,
        };

        let mut proxy_listeners = Vec::with_capacity(config.proxy.listen.len());
        for addr in &config.proxy.listen {
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .map_err(|source| StartError::Bind {
                    addr: *addr,
                    source,
                })?;
            proxy_listeners.push(listener);
        }
        let admin_listener = bind(config.admin.listen).await?;
        Ok(Server {
            proxy_listeners,
            admin_listener,
            workers: config.proxy.workers,
            parts,
            admin,
            cache,
            vault,
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

    /// Serves until `shutdown` completes, then lets open connections finish (up to a grace
    /// period).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let proxy_addrs: Vec<String> = self.proxy_addrs().iter().map(|a| a.to_string()).collect();
        let admin_addr = self.admin_addr().map(|a| a.to_string()).unwrap_or_default();

        let (stop_tx, stop_rx) = watch::channel(false);
        let mut workers = Vec::with_capacity(self.workers);
        for n in 0..self.workers {
            let mut listeners = Vec::with_capacity(self.proxy_listeners.len());
            for l in &self.proxy_listeners {
                // Every worker accepts on the same sockets; the kernel hands each connection
                // to one of them.
                listeners.push(l.try_clone().map_err(|source| {
                    StartError::Bind {
                        addr: l
                            .local_addr()
                            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
                        source,
                    }
                })?);
            }
            workers.push(spawn_worker(
                n,
                listeners,
                self.parts.proxy(),
                stop_rx.clone(),
            )?);
        }
        drop(self.proxy_listeners);

        tracing::info!(
            proxy = %proxy_addrs.join(","),
            admin = %admin_addr,
            vault = %self.vault.address(),
            workers = self.workers,
            "listening"
        );
        match self.vault.check_token().await {
            Ok(_) => tracing::info!("vault reachable and token accepted"),
            Err(e) => {
                tracing::warn!(error = %e, "vault check failed at start; /readyz will say so")
            }
        }

        let graceful = Arc::new(GracefulShutdown::new());
        let mut tasks = tokio::task::JoinSet::new();
        {
            let admin = self.admin.clone();
            let handler = move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            };
            tasks.spawn(accept_loop(
                self.admin_listener,
                handler,
                graceful.clone(),
                stopped(stop_rx.clone()),
            ));
        }
        tasks.spawn(self.cache.clone().maintain(stopped(stop_rx.clone())));
        tasks.spawn(
            self.vault
                .clone()
                .renew_token_until(stopped(stop_rx.clone())),
        );

        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        for done in workers {
            let _ = done.await;
        }
        if let Ok(graceful) = Arc::try_unwrap(graceful) {
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await;
        }
        Ok(())
    }
}

/// Completes once the stop signal is given.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Starts one proxy worker thread; the returned receiver completes when it has finished.
fn spawn_worker(
    n: usize,
    listeners: Vec<std::net::TcpListener>,
    proxy: Proxy,
    stop: watch::Receiver<bool>,
) -> Result<tokio::sync::oneshot::Receiver<()>, StartError> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| StartError::Runtime { source })?;
    std::thread::Builder::new()
        .name(format!("latchkey-proxy-{n}"))
        .spawn(move || {
            runtime.block_on(async move {
                let proxy = Arc::new(proxy);
                let graceful = Arc::new(GracefulShutdown::new());
                let mut loops = tokio::task::JoinSet::new();
                for listener in listeners {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "a proxy worker could not use its listener");
                            continue;
                        }
                    };
                    let proxy = proxy.clone();
                    let handler = move |req| {
                        let proxy = proxy.clone();
                        async move { Ok::<_, Infallible>(proxy.handle(req).await) }
                    };
                    loops.spawn(accept_loop(listener, handler, graceful.clone(), stopped(stop.clone())));
                }
                while loops.join_next().await.is_some() {}
                if let Ok(graceful) = Arc::try_unwrap(graceful) {
                    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
                        .await
                        .is_err()
                    {
                        tracing::warn!("connections still open after the grace period were closed");
                    }
                }
            });
            let _ = done_tx.send(());
        })
        .map_err(|source| StartError::Runtime { source })?;
    Ok(done_rx)
}

/// Binds and runs latchkey until `shutdown`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    Server::bind(config).await?.run(shutdown).await
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

async fn accept_loop<H, F>(
    listener: TcpListener,
    handler: H,
    graceful: Arc<GracefulShutdown>,
    stop: impl Future<Output = ()>,
) where
    H: Fn(http::Request<hyper::body::Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<http::Response<proxy::ProxyBody>, Infallible>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(TokioIo::new(stream), service_fn(handler.clone()));
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
