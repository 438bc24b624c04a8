//! HTTP/1.1 client connections that hold no HTTP machinery while idle (`proxy.idle_release`,
//! issue 15).
//!
//! hyper keeps, for as long as a connection is open and used or not, its read and write
//! buffers (8 KiB each), the header map of the last response for reuse, and its dispatcher; a
//! proxy with many idle keep-alive clients pays that for every one of them. Here a client
//! connection is served in turns: a hyper connection is built once the socket is readable, serves
//! requests as long as they keep coming, and is taken apart without closing the socket once
//! every request handed to it has been answered, the answers flushed, and nothing has moved for
//! a quiet spell ([`QUIET_SPELL`](crate::idle::QUIET_SPELL), one second: the connection's
//! watchdog looks that often during a turn). A busy connection stays in one turn and costs what
//! hyper's connection costs; one that waits longer holds no buffer. Between turns the
//! connection's task waits for the socket to be readable again (no buffer: readiness only), and
//! holds the socket and latchkey's own small state ([`Strict`], the idle bookkeeping).
//!
//! hyper learns that a turn is over from the end of the stream: [`Lease`] answers its next read
//! with end-of-stream when it sits between requests, and hyper ends the connection the way it
//! does when a client closes an idle keep-alive connection: the responses were sent as they
//! were (no `Connection: close`: that is decided when a head is written, and keep-alive is
//! never turned off here), nothing is written after them, and the shutdown that follows leaves
//! the socket open. Whatever hyper had read and not parsed comes back in its `Parts` and is read
//! first in the next turn.
//!
//! Upgrades (CONNECT, WebSocket) are hyper's as before: once [`Strict`] hands on anything that is
//! not HTTP/1 the turn never ends. A connection whose first bytes may be h2's preface is not
//! served in turns: [`serve`] gives it back ([`Served::H2`]) for the auto-detecting builder.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::idle::{Activity, Watched};
use crate::strict::Strict;

/// What h2 opens with; a connection whose first bytes could be its start is not served in turns.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client connection's checked stream as one turn's hyper connection sees it: its reads end
/// the stream once the turn is over.
pub struct Lease<T> {
    inner: Strict<T>,
    activity: Arc<Activity>,
    /// What the last turn's hyper connection had read and not used: read first.
    unread: Bytes,
    /// Request heads handed on when this turn began: a turn serves at least one request.
    start: usize,
    /// Requests answered when hyper last flushed with nothing written since; `None` once it has
    /// written since.
    flushed: Option<usize>,
    /// The turn is over: reads end the stream, and shutting down leaves the socket open.
    ended: bool,
}

impl<T> Lease<T> {
    pub fn new(inner: Strict<T>, activity: Arc<Activity>) -> Lease<T> {
        let start = inner.heads();
        Lease {
            inner,
            activity,
            unread: Bytes::new(),
            start,
            flushed: None,
            ended: false,
        }
    }

    /// A connection whose reads latchkey's own server ([`crate::downstream`]) began: `unread`
    /// is what it read and did not use, starting with a request head that the checked stream
    /// has counted already.
    pub fn handed_over(inner: Strict<T>, activity: Arc<Activity>, unread: Bytes) -> Lease<T> {
        let mut lease = Lease::new(inner, activity);
        lease.unread = unread;
        lease.start = lease.start.saturating_sub(1);
        lease
    }

    pub fn get_ref(&self) -> &T {
        self.inner.get_ref()
    }

    /// The checked stream, for a connection that is not served in turns after all.
    pub fn into_inner(self) -> Strict<T> {
        self.inner
    }

    /// Whether the turn ended here (rather than hyper closing the connection).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Between requests, for a quiet spell: at least one request this turn, every request handed
    /// on answered, the answers flushed, nothing read that hyper has not had, and nothing moved
    /// for [`QUIET_SPELL`](crate::idle::QUIET_SPELL).
    fn between(&mut self) -> bool {
        if !self.unread.is_empty() || !self.inner.at_rest() {
            return false;
        }
        let heads = self.inner.heads();
        heads > self.start
            && self.activity.finished() == heads
            && self.flushed == Some(heads)
            && self.activity.quiet()
    }

    /// Ready for the next turn, which reads `unread` first.
    fn next_turn(&mut self, unread: Bytes) {
        // Copied (or dropped when empty): it is a view into hyper's whole 8 KiB read buffer,
        // which would otherwise stay allocated for as long as the connection idles.
        self.unread = if unread.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&unread)
        };
        self.start = self.inner.heads();
        self.flushed = None;
        self.ended = false;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Lease<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(this.unread.get(..n).unwrap_or_default());
            this.unread.advance(n);
            if this.unread.is_empty() {
                this.unread = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        if this.ended || this.between() {
            // The end of the stream, for this turn's hyper connection only.
            this.ended = true;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lease<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flushed = None;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.flushed = None;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            // hyper flushes its stream only once its own buffer is empty: everything it has
            // buffered, the answers finished so far included, is written.
            this.flushed = Some(this.activity.finished());
            if this.between() {
                // hyper may be waiting on a read that went to the socket before this flush:
                // have it read again, and find the end of the turn.
                cx.waker().wake_by_ref();
            }
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// How a connection served in turns ended.
pub enum Served<T> {
    /// It is over (the client closed it, an error, an upgrade took it, or shutdown); with the
    /// number of turns it was served in.
    Done(Result<(), hyper::Error>, usize),
    /// Its first bytes may open an h2 connection: it is for the auto-detecting builder.
    H2(Box<Lease<T>>),
}

/// Serves an HTTP/1.1 client connection in turns, until it ends or `stop` changes (shutdown:
/// an idle connection is closed at once, a turn under way finishes its requests without
/// keep-alive). `service` must count its requests in the [`Activity`] that `io` was made with
/// ([`crate::idle::track`]). `io` is boxed: the future holds a pointer, not the stream's state
/// once per await point.
pub async fn serve<S>(
    io: Box<Lease<Watched<TcpStream>>>,
    http1: &http1::Builder,
    service: S,
    stop: &mut watch::Receiver<()>,
) -> Served<Watched<TcpStream>>
where
    S: HttpService<Incoming> + Clone + Unpin + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: Send + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match first_bytes(io.get_ref().get_ref(), stop).await {
        First::Closed => Served::Done(Ok(()), 0),
        First::H2 => Served::H2(io),
        First::Http1 => serve_turns(io, http1, service, stop).await,
    }
}

/// What a client connection's first bytes say.
pub enum First {
    /// It closed (or failed) before sending any, or shutdown came first.
    Closed,
    /// They may open an h2 connection.
    H2,
    Http1,
}

/// Waits for a client connection's first bytes (without reading them) and says what they are.
pub async fn first_bytes(stream: &TcpStream, stop: &mut watch::Receiver<()>) -> First {
    let mut first = [0u8; H2_PREFACE.len()];
    let peeked = tokio::select! {
        peeked = stream.peek(&mut first) => peeked,
        _ = stop.changed() => return First::Closed,
    };
    match peeked {
        Ok(0) | Err(_) => First::Closed,
        Ok(n) if H2_PREFACE.starts_with(first.get(..n).unwrap_or_default()) => First::H2,
        Ok(_) => First::Http1,
    }
}

/// [`serve`] once the connection is known to be HTTP/1 (its first turn may begin with bytes
/// already read, [`Lease::handed_over`]).
pub async fn serve_turns<S>(
    mut io: Box<Lease<Watched<TcpStream>>>,
    http1: &http1::Builder,
    service: S,
    stop: &mut watch::Receiver<()>,
) -> Served<Watched<TcpStream>>
where
    S: HttpService<Incoming> + Clone + Unpin + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: Send + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut turns = 0;
    loop {
        turns += 1;
        io.activity.set_in_turn(true);
        let mut conn = Box::new(
            http1
                .serve_connection(TokioIo::new(io), service.clone())
                .with_upgrades(),
        );
        let (ended, stopping) = tokio::select! {
            ended = &mut *conn => (ended, false),
            _ = stop.changed() => {
                Pin::new(&mut *conn).graceful_shutdown();
                ((&mut *conn).await, true)
            }
        };
        if let Err(e) = ended {
            return Served::Done(Err(e), turns);
        }
        // `None`: upgraded, the stream is the upgrade's now. Taken apart at once: what is left
        // of `Parts` would otherwise be held while the connection idles.
        let Some((back, unread)) = conn.into_parts().map(|p| (p.io.into_inner(), p.read_buf))
        else {
            return Served::Done(Ok(()), turns);
        };
        io = back;
        io.activity.set_in_turn(false);
        if !io.ended() || stopping {
            return Served::Done(Ok(()), turns);
        }
        io.next_turn(unread);
        tracing::trace!(
            turns,
            "a quiet client connection let go of its HTTP machinery"
        );
        if io.unread.is_empty() {
            // Idle: nothing of hyper's exists until the client sends again.
            tokio::select! {
                ready = io.get_ref().get_ref().readable() => {
                    if ready.is_err() {
                        return Served::Done(Ok(()), turns);
                    }
                }
                _ = stop.changed() => return Served::Done(Ok(()), turns),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::body::full;
    use crate::idle;
    use crate::strict::Link;

    type Answer = Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<http::Response<crate::body::BoxBody>, Infallible>,
                > + Send,
        >,
    >;

    /// An accepted stream as [`serve`] takes it.
    fn lease(stream: TcpStream, activity: &Arc<Activity>) -> Box<Lease<Watched<TcpStream>>> {
        Box::new(Lease::new(
            Strict::new(
                Watched::new(stream, activity.clone()),
                Link::new(),
                Duration::from_secs(5),
            ),
            activity.clone(),
        ))
    }

    /// Serves one connection in turns on loopback, answering each request with its path; the
    /// receiver gets the number of turns once the connection has ended.
    async fn one_connection() -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let activity = Activity::new();
            let io = lease(stream, &activity);
            let service = {
                let activity = activity.clone();
                // Boxed, with its type written out: the known rustc limit on `Send` proofs (see
                // `idle::track`) trips on the inferred one inside `tokio::spawn`.
                hyper::service::service_fn(move |req: http::Request<Incoming>| -> Answer {
                    let path = req.uri().path().to_string();
                    Box::pin(idle::track(&activity, async move {
                        Ok::<_, Infallible>(http::Response::new(full(path)))
                    }))
                })
            };
            let (_stop_tx, mut stop) = watch::channel(());
            let http1 = http1::Builder::new();
            let served = idle::or_idle(
                serve(io, &http1, service, &mut stop),
                &activity,
                idle::Limits {
                    idle: Duration::from_secs(60),
                    stall: Duration::from_secs(60),
                },
            );
            match served.await.expect("closed as idle") {
                Served::Done(ended, turns) => {
                    ended.unwrap();
                    let _ = tx.send(turns);
                }
                Served::H2(_) => panic!("taken for h2"),
            }
        });
        (addr, rx)
    }

    /// Reads one response (with a `content-length`): its head, lower-cased, and its body.
    async fn response(c: &mut TcpStream, buf: &mut Vec<u8>) -> (String, String) {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if buf.len() >= end + 4 + len {
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                    buf.drain(..end + 4 + len);
                    return (head, body);
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "the connection closed before a whole response");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends `GET {path}` and checks the answer: the path, keep-alive kept.
    async fn get(c: &mut TcpStream, buf: &mut Vec<u8>, path: &str) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
        let (head, body) = response(c, buf).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        assert_eq!(body, path);
    }

    // The clock is paused: the quiet spells below pass in the runtime's time, not the test's.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_spell_ends_a_turn_and_keep_alive_is_kept() {
        let (addr, turns) = one_connection().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        for path in ["/a", "/b"] {
            get(&mut c, &mut buf, path).await;
            tokio::time::sleep(idle::QUIET_SPELL * 3).await;
        }
        c.shutdown().await.unwrap();
        // Two turns of one request each, then one that found the end of the stream.
        let turns = tokio::time::timeout(Duration::from_secs(5), turns).await;
        assert_eq!(turns.unwrap().unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_that_keep_coming_are_served_in_one_turn() {
        let (addr, turns) = one_connection().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        for i in 0..20 {
            get(&mut c, &mut buf, &format!("/{i}")).await;
            tokio::time::sleep(idle::QUIET_SPELL / 4).await;
        }
        c.shutdown().await.unwrap();
        let turns = tokio::time::timeout(Duration::from_secs(5), turns).await;
        assert_eq!(turns.unwrap().unwrap(), 1);
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let (addr, turns) = one_connection().await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        for path in ["/a", "/b", "/c"] {
            let (head, body) = response(&mut c, &mut buf).await;
            assert!(!head.contains("connection: close"), "{head}");
            assert_eq!(body, path);
        }
        // A request with a body its service never reads, then one more.
        c.write_all(b"POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /e HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        for path in ["/d", "/e"] {
            let (head, body) = response(&mut c, &mut buf).await;
            assert!(!head.contains("connection: close"), "{head}");
            assert_eq!(body, path);
        }
        c.shutdown().await.unwrap();
        let turns = tokio::time::timeout(Duration::from_secs(5), turns).await;
        assert_eq!(turns.unwrap().unwrap(), 1);
    }

    #[tokio::test]
    async fn a_connection_that_may_be_h2_is_given_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        c.write_all(&H2_PREFACE[..10]).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let io = lease(stream, &Activity::new());
        let service = hyper::service::service_fn(|_req: http::Request<Incoming>| async {
            Ok::<_, Infallible>(http::Response::new(full("")))
        });
        let (_stop_tx, mut stop) = watch::channel(());
        let served = serve(io, &http1::Builder::new(), service, &mut stop).await;
        assert!(matches!(served, Served::H2(_)));
    }
}
