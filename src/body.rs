//! Bodies: the one boxed body type that latchkey sends both ways, and the wrappers of the
//! request path: a byte counter for what the client sends, and a response body that writes the
//! access-log line when it ends, fails or is dropped, so the line holds the true byte count and
//! duration of a streamed answer.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

use crate::telemetry::{self, AccessLog};

/// The error type of every body latchkey handles.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every request latchkey sends upstream and every response it sends a client.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body of these bytes.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|e| -> BoxError { match e {} })
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> BoxBody {
    Empty::<Bytes>::new()
        .map_err(|e| -> BoxError { match e {} })
        .boxed_unsync()
}

/// One piece of a request body as latchkey's own HTTP/1.1 server reads it off the client
/// connection ([`crate::downstream`]) and hands it to the request's [`ClientBody`].
#[derive(Debug)]
pub enum Piece {
    Data(Bytes),
    /// The body ended as its framing says: all of it was read.
    End,
    /// The client's bytes broke the framing, or the connection ended or failed mid-body.
    Failed(BoxError),
}

/// The body of a request a client sent, whichever HTTP server read it.
#[derive(Debug)]
pub enum ClientBody {
    /// Read by hyper (h2, the tunnel's inner requests, `proxy.http1_server = "hyper"`).
    Hyper(hyper::body::Incoming),
    /// Read by latchkey's own HTTP/1.1 server: its pieces come from the connection's task.
    Own(Piped),
    /// A request without a body.
    Empty,
}

impl From<hyper::body::Incoming> for ClientBody {
    fn from(body: hyper::body::Incoming) -> ClientBody {
        ClientBody::Hyper(body)
    }
}

/// A request body that the connection's task reads and hands over in [`Piece`]s. A channel
/// that closes without [`Piece::End`] is a failure, never a short body taken for a whole one.
#[derive(Debug)]
pub struct Piped {
    rx: tokio::sync::mpsc::Receiver<Piece>,
    /// Bytes still to come, when the framing says (`Content-Length`).
    left: Option<u64>,
    ended: bool,
}

impl Piped {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Piece>, length: Option<u64>) -> Piped {
        Piped {
            rx,
            left: length,
            ended: false,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Hyper(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BoxError::from))),
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Own(piped) => {
                if piped.ended {
                    return Poll::Ready(None);
                }
                match piped.rx.poll_recv(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Piece::Data(data))) => {
                        if let Some(left) = &mut piped.left {
                            *left = left.saturating_sub(data.len() as u64);
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Poll::Ready(Some(Piece::End)) => {
                        piped.ended = true;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Piece::Failed(e))) => {
                        piped.ended = true;
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Ready(None) => {
                        piped.ended = true;
                        Poll::Ready(Some(Err(
                            "the client connection ended in the middle of the request body".into(),
                        )))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(body) => body.is_end_stream(),
            ClientBody::Empty => true,
            ClientBody::Own(piped) => piped.ended || piped.left == Some(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(body) => body.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Own(piped) => match piped.left {
                Some(left) => SizeHint::with_exact(left),
                None => SizeHint::default(),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// Counts the data bytes that pass through.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        count: Arc<AtomicU64>,
    }
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Counted { inner, count }
    }
}

impl<B: Body<Data = Bytes>> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The count of a request's body bytes, shared with the body as it streams. Most requests
/// have no body: their count is never asked for, and nothing is allocated.
#[derive(Default)]
pub struct BytesIn(std::sync::OnceLock<Arc<AtomicU64>>);

impl BytesIn {
    /// The counter, for a body to add to.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.0.get_or_init(Arc::default).clone()
    }

    /// Adds what was counted elsewhere (an upgraded connection's bytes).
    pub fn add(&self, n: u64) {
        if n > 0 {
            self.counter().fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The bytes counted so far.
    pub fn load(&self) -> u64 {
        self.0.get().map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// The access-log record of a request whose response is still streaming.
pub struct PendingLog {
    pub log: AccessLog,
    pub started: Instant,
    pub bytes_in: BytesIn,
}

/// A request's access line until its answer is handed on. The future serving a request is
/// dropped before its answer when the client goes away or a stop past its grace cuts it: then
/// the line is written here, status 499 and error `client_closed` or `shutdown`, so that every
/// request has its line.
pub struct Unanswered {
    pub log: AccessLog,
    pub started: Instant,
    pub bytes_in: BytesIn,
    answered: bool,
}

impl Unanswered {
    pub fn new(log: AccessLog) -> Self {
        Unanswered {
            log,
            started: Instant::now(),
            bytes_in: BytesIn::default(),
            answered: false,
        }
    }

    /// The line, for whoever has the answer to write it.
    pub fn answered(&mut self) -> PendingLog {
        self.answered = true;
        PendingLog {
            log: std::mem::take(&mut self.log),
            started: self.started,
            bytes_in: std::mem::take(&mut self.bytes_in),
        }
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.log.status = 499;
        self.log.error = Some(if telemetry::cutting() {
            "shutdown"
        } else {
            "client_closed"
        });
        self.log.bytes_in = self.bytes_in.load();
        self.log.emit(self.started.elapsed());
    }
}

impl PendingLog {
    /// Writes the line of an answer dropped before its end, with `bytes_out`: one that a stop
    /// past its grace cut (its connection dropped by the worker) says `error=shutdown`.
    pub fn emit_unfinished(mut self, bytes_out: u64) {
        if telemetry::cutting() {
            self.log.error.get_or_insert("shutdown");
        }
        self.emit(bytes_out);
    }

    /// Writes the line, with what came in so far and `bytes_out`.
    pub fn emit(mut self, bytes_out: u64) {
        self.log.bytes_in = self.bytes_in.load();
        self.log.bytes_out = bytes_out;
        self.log.emit(self.started.elapsed());
    }
}

/// The access record of an upgraded connection or a splice until it closes: closed, it writes
/// the line with the bytes each way; dropped unwritten (a stop past its grace cuts the
/// connection), with `error=shutdown`.
pub struct LineAtClose(Option<PendingLog>);

impl LineAtClose {
    pub fn new(pending: Option<PendingLog>) -> LineAtClose {
        LineAtClose(pending)
    }

    /// Writes the line: `read` bytes came from the client, `written` went to it.
    pub fn close(mut self, read: u64, written: u64) {
        if let Some(pending) = self.0.take() {
            pending.bytes_in.add(read);
            pending.emit(written);
        }
    }
}

impl Drop for LineAtClose {
    fn drop(&mut self) {
        if let Some(pending) = self.0.take() {
            pending.emit_unfinished(0);
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that emits the access log once: at its end, on its failure, or when it
    /// is dropped unfinished.
    ///
    /// Its failure (the upstream reset or stalled mid-body) is handed on one poll late: hyper
    /// drops a connection whose body fails together with what it had not yet written, and
    /// it writes the head and the first chunks only when the body makes it wait. Without that
    /// wait, an upstream that failed at once cost the client the whole answer, head included:
    /// a connection closed with no status, not a body it can see was cut short.
    pub struct Logged<B> {
        #[pin]
        inner: B,
        bytes: u64,
        pending: Option<Box<PendingLog>>,
        failed: Option<BoxError>,
    }

    impl<B> PinnedDrop for Logged<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(p) = this.pending.take() {
                p.emit_unfinished(*this.bytes);
            }
        }
    }
}

impl<B: Body> Logged<B> {
    pub fn new(inner: B, pending: PendingLog) -> Self {
        Logged {
            inner,
            bytes: 0,
            pending: Some(Box::new(pending)),
            failed: None,
        }
    }
}

/// What the access log calls a response body's failure: `upstream_timeout` for a body cut
/// because nothing moved for the body timeout (the upstream client says so with an I/O error of
/// kind `TimedOut`), `upstream_body` for any other.
fn failure_code(e: &BoxError) -> &'static str {
    match e.downcast_ref::<std::io::Error>() {
        Some(e) if e.kind() == std::io::ErrorKind::TimedOut => "upstream_timeout",
        _ => "upstream_body",
    }
}

impl<B: Body<Data = Bytes, Error = BoxError>> Body for Logged<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = this.pending.take() {
                    p.emit(*this.bytes);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(mut p) = this.pending.take() {
                    p.log.error = Some(failure_code(e));
                    p.emit(*this.bytes);
                }
                // Let hyper write what it holds first (see the type's doc).
                if let Poll::Ready(Some(Err(e))) = polled {
                    *this.failed = Some(e);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.failed.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::{Wake, Waker};

    use super::*;

    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_failure_comes_one_wait_late_so_that_hyper_writes_what_it_holds() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"the first bytes"))),
            Err("the upstream reset the connection".into()),
        ];
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let log = PendingLog {
            log: AccessLog::default(),
            started: Instant::now(),
            bytes_in: BytesIn::default(),
        };
        let mut body = std::pin::pin!(Logged::new(inner, log));
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);

        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        // The failure: first a wait, with a wake-up so that the wait is short ...
        assert!(body.as_mut().poll_frame(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);
        assert!(!body.is_end_stream());
        // ... then the error itself.
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Err(_)))
        ));
    }
}
