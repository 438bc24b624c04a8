//! The tunnel form: `CONNECT host:port`, then TLS that latchkey terminates with a certificate for
//! that host minted by its CA (or plain HTTP inside, which undici sends for `http://` URLs), and
//! every request inside served by the proxy's pipeline as a forward-form request held to the
//! CONNECT's host and port (SNI and `Host` alike; 421 otherwise).
//!
//! The CONNECT itself is checked by [`Proxy::connect`] (client, connection, host and port, the
//! address) before it is answered 200; a refusal is answered at once and nothing is dialled.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::body::{self, BoxBody, BoxError, ClientBody, LineAtClose, PendingLog};
use crate::ca::{Leaves, LeavesSlot};
use crate::destination::normalize_host;
use crate::downstream::{self, Outcome, Ready};
use crate::idle::{self, Activity, Counts, Limits, Watched};
use crate::proxy::{Opened, ProxySlot, Tunnel};
use crate::response::ProxyError;
use crate::strict::{Link, Strict};
use crate::telemetry;
use crate::upstream::MaybeTls;

/// How long a client has, once the CONNECT is answered, to send its first byte.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TLS handshake inside a tunnel may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The first byte of a TLS record carrying a handshake (the ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// The tunnel form's service: answers CONNECT requests and serves what goes through them.
pub struct Tunnels {
    /// The worker's proxy in force: each CONNECT and each request inside a tunnel loads it, so
    /// a reload reaches open tunnels too.
    proxy: ProxySlot,
    /// Leaf certificates minted by latchkey's CA; without a CA, CONNECT is refused.
    leaves: LeavesSlot,
    /// `proxy.idle_timeout` and `proxy.body_timeout`, for the connections inside tunnels too.
    idle: Limits,
    /// `proxy.header_read_timeout`, for the request heads inside tunnels too.
    header_read: Duration,
    /// HTTP/1.1 inside a tunnel is read by latchkey's own server (`proxy.http1_server`), as on
    /// client connections; h2 and what asks for an upgrade are hyper's.
    own_http1: bool,
    /// The worker's stop, which tunnels drain for as client connections do: hyper's
    /// connections are shut down gracefully (h2 sends `GOAWAY`, HTTP/1.1 ends after the request
    /// in flight), latchkey's own server closes once no request is in flight, and a tunnel
    /// still waiting for its first byte ends. The worker waits (within its grace) until every
    /// copy of this receiver is dropped: until every tunnel has ended.
    stop: watch::Receiver<()>,
}

impl Tunnels {
    pub fn new(
        proxy: ProxySlot,
        leaves: LeavesSlot,
        (idle, header_read): (Limits, Duration),
        own_http1: bool,
        stop: watch::Receiver<()>,
    ) -> Tunnels {
        Tunnels {
            proxy,
            leaves,
            idle,
            header_read,
            own_http1,
            stop,
        }
    }

    /// Answers a CONNECT: 200, and the tunnel served once hyper hands the connection over; or
    /// latchkey's refusal, with nothing dialled.
    pub async fn connect(self: &Arc<Self>, mut req: Request<ClientBody>) -> Response<BoxBody> {
        let Some(leaves) = self.leaves.get().cloned() else {
            return ProxyError::ConnectUnsupported.into_response();
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let (parts, _) = req.into_parts();
        // TLS inside unless the port is HTTP's; what the client really sends is seen later.
        let port_says_tls = parts.uri.port_u16() != Some(80);
        let proxy = self.proxy.load_full();
        let mut tunnel = match proxy.connect(&parts, port_says_tls).await {
            Ok(Opened::Tunnel(t)) => t,
            Ok(Opened::Splice(upstream, line)) => {
                return splice(upgrade, upstream, self.idle, line)
            }
            Err(e) => return e.into_response(),
        };
        let me = self.clone();
        tokio::spawn(async move {
            let upgraded = match upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "a CONNECT was answered but not upgraded");
                    return;
                }
            };
            let _open = telemetry::TunnelOpen::open();
            if let Err(e) = me.serve(TokioIo::new(upgraded), &mut tunnel, &leaves).await {
                tracing::debug!(connection = tunnel.connection(), host = %tunnel.host, error = %e, "tunnel ended with an error");
            }
        });
        let mut ok = Response::new(body::empty());
        *ok.status_mut() = StatusCode::OK;
        ok
    }

    /// Serves the tunnel's bytes: TLS or plain HTTP, told by the first byte.
    async fn serve<T>(&self, mut io: T, tunnel: &mut Tunnel, leaves: &Leaves) -> io::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut first = [0u8; 1];
        let mut stop = self.stop.clone();
        // Silence before the first byte is idleness: `proxy.idle_timeout` holds, when shorter.
        // A tunnel that has sent nothing yet holds nothing to drain at a stop.
        let read = tokio::time::timeout(
            FIRST_BYTE_TIMEOUT.min(self.idle.idle),
            io.read_exact(&mut first),
        );
        let read = tokio::select! {
            read = read => read,
            _ = stop.changed() => return Ok(()),
        };
        match read {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "no first byte")),
        }
        let io = Rewind::new(Bytes::copy_from_slice(&first), io);
        if first[0] != TLS_HANDSHAKE {
            tunnel.tls = false;
            return self
                .serve_http(io, Arc::new(tunnel.clone()), self.own_http1)
                .await;
        }
        tunnel.tls = true;
        let (config, minted) = match leaves.server_config(&tunnel.host) {
            Ok(got) => got,
            Err(e) => {
                // The client is left without a certificate: counted, so that it can be alerted on.
                telemetry::tunnel_leaf("failed");
                tracing::warn!(connection = tunnel.connection(), host = %tunnel.host, error = %e, "cannot mint a leaf certificate for the CONNECT host; the tunnel is closed");
                return Err(io::Error::other(e.to_string()));
            }
        };
        telemetry::tunnel_leaf(minted.as_str());
        let accepted = tokio::time::timeout(
            HANDSHAKE_TIMEOUT.min(self.idle.idle),
            tokio_rustls::TlsAcceptor::from(config).accept(io),
        )
        .await;
        let tls = match accepted {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = handshake_failure(&e);
                telemetry::tunnel_handshake_failed(reason);
                if reason == "untrusted_ca" {
                    tracing::info!(connection = tunnel.connection(), host = %tunnel.host, "the client does not trust latchkey's CA: install it (GET /ca.pem on the admin listener, or latchkey ca export)");
                } else {
                    tracing::debug!(connection = tunnel.connection(), host = %tunnel.host, reason, error = %e, "TLS handshake inside a tunnel failed");
                }
                return Ok(());
            }
            Err(_) => {
                telemetry::tunnel_handshake_failed("timeout");
                return Ok(());
            }
        };
        tunnel.sni_matches = match tls.get_ref().1.server_name() {
            Some(sni) => normalize_host(sni) == *tunnel.host,
            // Clients send no SNI for an IP address.
            None => tunnel.host.parse::<std::net::IpAddr>().is_ok() || tunnel.host.starts_with('['),
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        self.serve_http(tls, Arc::new(tunnel.clone()), self.own_http1 && !h2)
            .await
    }

    /// HTTP/1.1 or h2 (by ALPN or preface) inside the tunnel, every request through the proxy:
    /// with `own`, HTTP/1.1 is read by latchkey's own server until a request is hyper's (an
    /// upgrade, `Expect`, or an h2 preface sent without ALPN), which then serves the rest with
    /// every byte read so far.
    async fn serve_http<T>(&self, io: T, tunnel: Arc<Tunnel>, own: bool) -> io::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        Watched<T>: Ready,
    {
        let proxy = self.proxy.clone();
        let mut stop = self.stop.clone();
        let activity = Activity::new();
        let link = Link::new();
        // Strict HTTP/1.1 inside too, each head whole within `header_read` of its first byte.
        let mut io = Strict::new(
            Watched::new(io, activity.clone()),
            link.clone(),
            self.header_read,
        );
        // Requests latchkey's own server reads are counted in flight by it (`Ready::request`);
        // those hyper's server serves, after a hand-over, by `idle::track`.
        let serve_own = move |req: Box<Request<ClientBody>>| {
            let proxy = proxy.load_full();
            let tunnel = tunnel.clone();
            let serve =
                |req| async move { Ok::<_, Infallible>(proxy.handle_tunneled(req, &tunnel).await) };
            crate::proxy::checked(link.clone(), req, serve)
        };
        let handler = {
            let (activity, serve_own) = (activity.clone(), serve_own.clone());
            move |req: Box<Request<ClientBody>>| idle::track(&activity, serve_own(req))
        };
        let conn = async move {
            let mut read = Bytes::new();
            if own {
                let mut buf = BytesMut::new();
                let bad = crate::proxy::not_strict;
                match downstream::serve(&mut io, &mut buf, &serve_own, bad, &mut stop).await {
                    Outcome::Done(ended) => return ended.map_err(BoxError::from),
                    Outcome::Hyper => read = buf.freeze(),
                }
            }
            let service = service_fn(move |req: Request<Incoming>| {
                handler(Box::new(req.map(ClientBody::Hyper)))
            });
            // The client connections' settings; heads are timed by `Strict`.
            let builder = downstream::hyper_builder(None);
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(Rewind::new(read, io)), service);
            tokio::pin!(conn);
            tokio::select! {
                served = conn.as_mut() => return served,
                _ = stop.changed() => conn.as_mut().graceful_shutdown(),
            }
            conn.await
        };
        match idle::or_idle(conn, &activity, self.idle).await {
            Ok(served) => served.map_err(io::Error::other),
            Err(closed) => {
                telemetry::client_connection_closed(closed.reason());
                tracing::debug!(limits = ?self.idle, ?closed, "closed an idle or stalled connection inside a tunnel");
                Ok(())
            }
        }
    }
}

/// A tunnel's stream cannot tell that it has bytes without reading them: latchkey's own server
/// reads at once, and keeps its buffers while the tunnel is open (no quiet-spell release: the
/// TLS session beside them is larger).
impl<X> Ready for Watched<Rewind<X>> {
    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn quiet(&self) -> bool {
        false
    }

    fn holding(&self, _held: bool) {}

    fn request(&self) -> Option<idle::InFlight> {
        Some(self.watch.request())
    }
}

impl<X> Ready for Watched<tokio_rustls::server::TlsStream<X>> {
    fn poll_read_ready(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn quiet(&self) -> bool {
        false
    }

    fn holding(&self, _held: bool) {}

    fn request(&self) -> Option<idle::InFlight> {
        Some(self.watch.request())
    }
}

/// Answers 200 and, once hyper hands the client's connection over, copies bytes both ways
/// between it and the passthrough host until either side closes or no byte has moved for
/// `idle`: no TLS termination, no credential. The CONNECT's access line (`line`) is written
/// when the splice ends, with the bytes that went each way.
fn splice(
    upgrade: hyper::upgrade::OnUpgrade,
    mut upstream: MaybeTls,
    idle: Limits,
    line: PendingLog,
) -> Response<BoxBody> {
    tokio::spawn(async move {
        // Dropped unwritten (not upgraded, or a stop past its grace drops this task), it
        // writes the line all the same.
        let line = LineAtClose::new(Some(line));
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "a passthrough CONNECT was answered but not upgraded");
                return;
            }
        };
        let _open = telemetry::TunnelOpen::open();
        // Bytes are all a splice has to show: it is idle while none moves.
        let activity = Activity::splice();
        let mut client = Watched::new(
            TokioIo::new(upgraded),
            (activity.clone(), Counts::default()),
        );
        let spliced = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        match idle::or_idle(spliced, &activity, idle).await {
            Ok(Err(e)) => tracing::debug!(error = %e, "a passthrough tunnel ended with an error"),
            Ok(Ok(_)) => {}
            Err(closed) => {
                telemetry::client_connection_closed(closed.reason());
                tracing::debug!(limits = ?idle, ?closed, "closed an idle or stalled passthrough tunnel")
            }
        }
        let counts = &client.watch.1;
        line.close(counts.read, counts.written);
    });
    let mut ok = Response::new(body::empty());
    *ok.status_mut() = StatusCode::OK;
    ok
}

/// Why a client's TLS handshake failed, as a bounded metric label. A client that does not trust
/// latchkey's CA says so with an alert (unknown CA, bad or unknown certificate).
fn handshake_failure(e: &io::Error) -> &'static str {
    use rustls::AlertDescription as A;
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(
            A::UnknownCA | A::BadCertificate | A::CertificateUnknown,
        )) => "untrusted_ca",
        Some(rustls::Error::AlertReceived(_)) => "alert",
        Some(rustls::Error::NoApplicationProtocol) => "alpn",
        Some(_) => "protocol",
        None if e.kind() == io::ErrorKind::UnexpectedEof => "closed",
        None => "io",
    }
}

/// A stream with bytes already read from it put back in front.
struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    fn new(prefix: Bytes, inner: T) -> Rewind<T> {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
