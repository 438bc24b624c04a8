//! The dialer: resolve, check every address, connect, TLS. (The pool over it is `pool`.)
//!
//! The destination check lives here, where the socket address is known: hyper-util's own
//! `HttpConnector` parses literal IP hosts before any resolver runs, so a check in a resolver
//! would miss them. Every resolved address is judged by the
//! [`AddressPolicy`]; blocked ones are skipped, and if none is left the dial fails with the
//! first reason. TLS is rustls with the system roots plus `tls.extra_roots`, offering h2 and
//! HTTP/1.1 by ALPN.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Authority;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::destination::{AddressPolicy, Blocked};
use crate::telemetry;
use crate::upstream::sessions::Sessions;

/// Why a connection to an upstream could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}")]
    Blocked(Blocked),
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    /// What timed out: `connecting to {host}`, `the TLS handshake with {host}`.
    #[error("{0} timed out")]
    Timeout(String),
    #[error("TLS with {host} failed: {source}")]
    Tls { host: String, source: io::Error },
    #[error("the upstream URI has no host")]
    NoHost,
}

/// Builds the rustls client configuration for upstreams.
pub fn tls_config(extra_roots: &[PathBuf]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system store may hold certificates rustls cannot use; skip those.
        let _ = roots.add(cert);
    }
    for path in extra_roots {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("{}: not PEM: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: unusable certificate: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("{} holds no PEM certificate", path.display()));
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(upstream_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Room for the tickets of a pool's worth of connections per upstream (`sessions`).
    config.resumption = rustls::client::Resumption::store(Arc::new(Sessions::new()));
    Ok(config)
}

/// ring's cryptography, with TLS 1.3's AES-128-GCM with SHA-256 offered first (then the
/// default order: AES-256-GCM with SHA-384, ChaCha20-Poly1305, the TLS 1.2 suites). Most
/// upstreams take the client's order. SHA-256 runs on the CPU's SHA instructions where SHA-384
/// has none, and a handshake's key schedule and transcript are dozens of small hashes: with
/// SHA-384 first they were a tenth of latchkey's CPU in a burst of new upstream connections
/// (README, "The HTTPS tail"). AES-128 also takes fewer rounds per record than AES-256. It is
/// the suite every TLS 1.3 implementation must have (RFC 8446 section 9.1), and the key
/// exchange (X25519) is at the 128-bit level either way.
fn upstream_provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: only the one suite moves.
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

/// The connector: resolve, check every address, connect, then TLS for `https`.
#[derive(Clone)]
pub struct Dialer {
    inner: Arc<DialerInner>,
}

struct DialerInner {
    policy: AddressPolicy,
    /// `proxy.resolve`: where a host and port are dialled instead of what DNS says.
    resolve: HashMap<(String, u16), SocketAddr>,
    tls: TlsConnector,
    /// The same trust, offering HTTP/1.1 only: a WebSocket handshake is an HTTP/1.1 upgrade.
    tls_http1: TlsConnector,
    connect_timeout: Duration,
}

impl Dialer {
    pub fn new(
        policy: AddressPolicy,
        resolve: HashMap<(String, u16), SocketAddr>,
        tls: Arc<rustls::ClientConfig>,
        connect_timeout: Duration,
    ) -> Dialer {
        let mut http1 = (*tls).clone();
        http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Dialer {
            inner: Arc::new(DialerInner {
                policy,
                resolve,
                tls: TlsConnector::from(tls),
                tls_http1: TlsConnector::from(Arc::new(http1)),
                connect_timeout,
            }),
        }
    }
}

impl Dialer {
    /// Resolves, checks and connects to `authority`, with TLS when `https`.
    pub async fn dial(&self, https: bool, authority: &Authority) -> Result<MaybeTls, DialError> {
        self.inner.dial(https, authority, &self.inner.tls).await
    }

    /// [`Dialer::dial`], offering only HTTP/1.1 by ALPN (for a WebSocket's own connection).
    pub async fn dial_http1(
        &self,
        https: bool,
        authority: &Authority,
    ) -> Result<MaybeTls, DialError> {
        self.inner
            .dial(https, authority, &self.inner.tls_http1)
            .await
    }

    /// Resolves `host` and `port` and checks the addresses as a dial would, without
    /// connecting: a CONNECT to a blocked destination is refused before the tunnel opens.
    pub async fn check_destination(&self, host: &str, port: u16) -> Result<(), DialError> {
        let addrs = self.inner.resolve(host, port).await?;
        let mut first_block = None;
        for addr in addrs {
            match self.inner.policy.check(addr.ip()) {
                Ok(()) => return Ok(()),
                Err(blocked) => {
                    first_block.get_or_insert(blocked);
                }
            }
        }
        Err(first_block.map_or_else(
            || DialError::NoAddress(host.to_string()),
            DialError::Blocked,
        ))
    }
}

impl DialerInner {
    /// The addresses `host` and `port` are dialled at: `proxy.resolve`'s pin, the literal IP,
    /// or what DNS says.
    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DialError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Some(pinned) = self.resolve.get(&(bare.to_ascii_lowercase(), port)) {
            return Ok(vec![*pinned]);
        }
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                tokio::time::timeout(self.connect_timeout, tokio::net::lookup_host((bare, port)))
                    .await
                    .map_err(|_| DialError::Timeout(format!("connecting to {host}")))?
                    .map_err(|source| DialError::Resolve {
                        host: host.to_string(),
                        source,
                    })?
                    .collect()
            }
        };
        if addrs.is_empty() {
            return Err(DialError::NoAddress(host.to_string()));
        }
        Ok(addrs)
    }

    async fn dial(
        &self,
        https: bool,
        authority: &Authority,
        tls: &TlsConnector,
    ) -> Result<MaybeTls, DialError> {
        let host = authority.host();
        if host.is_empty() {
            return Err(DialError::NoHost);
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs = self.resolve(host, port).await?;

        let mut first_block = None;
        let mut last_error = None;
        let mut tcp = None;
        for addr in addrs {
            if let Err(blocked) = self.policy.check(addr.ip()) {
                tracing::debug!(%addr, range = blocked.range, "skipping a blocked address");
                first_block.get_or_insert(blocked);
                continue;
            }
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    tcp = Some(stream);
                    break;
                }
                Ok(Err(source)) => last_error = Some(DialError::Connect { addr, source }),
                Err(_) => last_error = Some(DialError::Timeout(format!("connecting to {addr}"))),
            }
        }
        let tcp = match (tcp, last_error, first_block) {
            (Some(tcp), _, _) => tcp,
            (None, Some(e), _) => return Err(e),
            (None, None, Some(blocked)) => return Err(DialError::Blocked(blocked)),
            (None, None, None) => return Err(DialError::NoAddress(host.to_string())),
        };
        let _ = tcp.set_nodelay(true);
        if !https {
            return Ok(MaybeTls::Plain(tcp));
        }

        let server_name =
            rustls::pki_types::ServerName::try_from(bare.to_string()).map_err(|_| {
                DialError::Tls {
                    host: host.to_string(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "not a valid TLS server name",
                    ),
                }
            })?;
        let tls = tokio::time::timeout(self.connect_timeout, tls.connect(server_name, tcp))
            .await
            .map_err(|_| DialError::Timeout(format!("the TLS handshake with {host}")))?
            .map_err(|source| DialError::Tls {
                host: host.to_string(),
                source,
            })?;
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        telemetry::upstream_tls_handshake(resumed);
        tracing::debug!(%host, resumed, "TLS with an upstream established");
        Ok(MaybeTls::Tls(Box::new(tls)))
    }
}

/// A plain or TLS connection to an upstream.
pub enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl MaybeTls {
    /// Whether TLS negotiated h2 by ALPN.
    pub fn is_h2(&self) -> bool {
        match self {
            MaybeTls::Plain(_) => false,
            MaybeTls::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_are_offered_aes_128_gcm_first_and_every_default_suite_after_it() {
        let ours: Vec<_> = upstream_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let defaults: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(ours[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let rest: Vec<_> = defaults
            .iter()
            .copied()
            .filter(|s| *s != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            .collect();
        assert_eq!(ours[1..], rest[..], "the others keep ring's order");
    }
}
