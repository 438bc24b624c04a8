//! Closing client connections that hold latchkey's resources for free (PRODUCT.md 10.9):
//!
//! - **Idle**: a connection with no request in flight for `proxy.idle_timeout`, silent or not,
//!   is closed: whether it never sent a byte, stopped half-way through a request head, sits
//!   idle between keep-alive requests, or keeps an h2 connection open with PINGs and no
//!   stream. A request in flight keeps its connection however long it takes (a slow upstream,
//!   a server-sent event stream with long gaps): it counts from the moment its head has been
//!   read until its response body has been sent or dropped. A spliced connection (a
//!   passthrough tunnel: no requests latchkey sees) is idle while no byte moves.
//! - **Stalled**: a connection whose client stops taking its answer is closed after
//!   `proxy.body_timeout` with no progress: a write to it that waits (its receive window
//!   full), or an answer handed to the HTTP server whose body the server has not asked for
//!   since (an h2 client that opens no window). An upstream that stalls is the upstream
//!   side's to cut; this is the client's side of "no byte moving either way".
//!
//! [`Watched`] notes every byte read or written and every write that waits;
//! [`Activity::request`] marks a request in flight until the guard (kept in the response body,
//! [`Tracked`]) is dropped; [`Activity::idle_for`] completes once the connection has been
//! idle or stalled that long (checked four times per timeout, so between the timeout and a
//! quarter more).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::BoxBody;

/// When a client connection is closed: idle this long (`proxy.idle_timeout`), or stalled this
/// long (`proxy.body_timeout`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub idle: Duration,
    pub stall: Duration,
}

/// What one client connection has been doing. Moving a byte only sets a flag (no clock is read
/// on the hot path); the watchdog looks at it a few times per timeout.
#[derive(Debug)]
pub struct Activity {
    /// Set by every byte read or written and every request finished; cleared by the watchdog.
    moved: AtomicBool,
    /// Set by every request begun or finished; cleared by the watchdog.
    requested: AtomicBool,
    /// Whether moving bytes is activity (a splice), or only requests are (HTTP).
    bytes_count: bool,
    /// Set by every byte written to the client and every response body the server asks for;
    /// cleared by the watchdog.
    sent: AtomicBool,
    /// The last write to the client waited (its receive window full).
    write_waiting: AtomicBool,
    /// Answers handed to the HTTP server whose body it has not asked for since.
    handed: AtomicUsize,
    in_flight: AtomicUsize,
    /// Requests answered so far: their response body sent or dropped.
    finished: AtomicUsize,
    /// A turn is under way ([`crate::release`]): the watchdog looks every [`QUIET_SPELL`].
    in_turn: AtomicBool,
    /// Nothing moved and nothing was in flight over the watchdog's last look.
    quiet: AtomicBool,
    /// Wakes the watchdog from a look between turns when a turn begins.
    turn_begun: tokio::sync::Notify,
}

/// How long a connection served in turns ([`crate::release`]) must be quiet before its turn
/// ends and its HTTP machinery is let go: a connection that is sent a request at least this
/// often stays in one turn (and pays for no rebuild), one that waits longer holds only its
/// socket and a few hundred bytes.
pub const QUIET_SPELL: Duration = Duration::from_secs(1);

/// How many looks the watchdog takes per timeout: a connection is closed after being idle
/// between the timeout and a quarter more.
const LOOKS: u32 = 4;

impl Activity {
    /// An HTTP connection's: idle while no request is in flight, whatever bytes move.
    pub fn new() -> Arc<Activity> {
        Activity::with(false)
    }

    /// A splice's: idle while no byte moves.
    pub fn splice() -> Arc<Activity> {
        Activity::with(true)
    }

    fn with(bytes_count: bool) -> Arc<Activity> {
        Arc::new(Activity {
            moved: AtomicBool::new(true),
            requested: AtomicBool::new(true),
            bytes_count,
            sent: AtomicBool::new(true),
            write_waiting: AtomicBool::new(false),
            handed: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            in_turn: AtomicBool::new(false),
            quiet: AtomicBool::new(false),
            turn_begun: tokio::sync::Notify::new(),
        })
    }

    fn touch(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }

    /// A request in flight until the returned guard is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.requested.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// How many requests have been answered (their response body sent or dropped).
    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::Relaxed)
    }

    /// Marks a turn of [`crate::release`] as begun (`true`) or over.
    pub fn set_in_turn(&self, in_turn: bool) {
        self.in_turn.store(in_turn, Ordering::Relaxed);
        if in_turn {
            self.turn_begun.notify_one();
        }
    }

    /// Whether the connection has been quiet for a [`QUIET_SPELL`] or more: nothing in flight,
    /// no byte moved over the watchdog's last look nor since.
    pub fn quiet(&self) -> bool {
        self.quiet.load(Ordering::Relaxed) && !self.moved.load(Ordering::Relaxed)
    }

    /// Completes once the connection has been idle for `limits.idle` or stalled for
    /// `limits.stall` (give or take a quarter of either; see the module's notes), saying which.
    /// During a turn ([`crate::release`]) it looks every [`QUIET_SPELL`] and marks the
    /// connection [`quiet`](Self::quiet) when nothing moved and nothing was in flight.
    pub async fn idle_for(&self, limits: Limits) -> Closed {
        let look = (limits.idle / LOOKS).min(limits.stall / LOOKS);
        let mut idle_for = Duration::ZERO;
        let mut stalled_for = Duration::ZERO;
        loop {
            let step = if self.in_turn.load(Ordering::Relaxed) {
                let step = look.min(QUIET_SPELL);
                tokio::time::sleep(step).await;
                step
            } else {
                // A turn that begins now is looked at within a quiet spell, not a long look.
                tokio::select! {
                    () = tokio::time::sleep(look) => look,
                    () = self.turn_begun.notified() => {
                        idle_for = Duration::ZERO;
                        continue;
                    }
                }
            };
            let in_flight = self.in_flight.load(Ordering::Relaxed) > 0;
            let moved = self.moved.swap(false, Ordering::Relaxed);
            let requested = self.requested.swap(false, Ordering::Relaxed);
            let sent = self.sent.swap(false, Ordering::Relaxed);
            let quiet = !moved && !in_flight;
            self.quiet.store(quiet, Ordering::Relaxed);

            let busy = in_flight || requested || (self.bytes_count && moved);
            idle_for = if busy {
                Duration::ZERO
            } else {
                idle_for + step
            };
            if idle_for >= limits.idle {
                return Closed::Idle;
            }
            let waiting = self.write_waiting.load(Ordering::Relaxed)
                || self.handed.load(Ordering::Relaxed) > 0;
            stalled_for = if waiting && !sent {
                stalled_for + step
            } else {
                Duration::ZERO
            };
            if stalled_for >= limits.stall {
                return Closed::Stalled;
            }
        }
    }
}

/// Why [`or_idle`] closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No request in flight (or, spliced, no byte moving) for `proxy.idle_timeout`.
    Idle,
    /// Its client took none of its answer for `proxy.body_timeout`.
    Stalled,
}

impl Closed {
    /// Its label in `latchkey_client_connections_closed_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Closed::Idle => "idle",
            Closed::Stalled => "stalled",
        }
    }
}

/// A request in flight on its connection; dropping it ends that (and counts as activity).
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.finished.fetch_add(1, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a [`Watched`] stream tells of the bytes it moves.
pub trait Watch {
    /// `read` bytes were read, `written` written (one of them is 0).
    fn moved(&mut self, read: usize, written: usize);

    /// A write waits: the peer is not taking bytes.
    fn waits(&mut self) {}
}

/// The bytes a connection carried each way.
#[derive(Default)]
pub struct Counts {
    pub read: u64,
    pub written: u64,
}

impl Watch for Counts {
    fn moved(&mut self, read: usize, written: usize) {
        self.read += read as u64;
        self.written += written as u64;
    }
}

/// Two watches of one connection: each told everything.
impl<A: Watch, B: Watch> Watch for (A, B) {
    fn moved(&mut self, read: usize, written: usize) {
        self.0.moved(read, written);
        self.1.moved(read, written);
    }

    fn waits(&mut self) {
        self.0.waits();
        self.1.waits();
    }
}

/// Any byte moved is activity; a byte written is progress towards the client.
impl Watch for Arc<Activity> {
    fn moved(&mut self, read: usize, written: usize) {
        if read + written > 0 {
            self.touch();
        }
        if written > 0 {
            self.sent.store(true, Ordering::Relaxed);
            self.write_waiting.store(false, Ordering::Relaxed);
        }
    }

    fn waits(&mut self) {
        self.write_waiting.store(true, Ordering::Relaxed);
    }
}

/// A stream that tells `watch` of every byte it moves either way: a client connection's, for
/// its [`Activity`] (or, in `websocket`, for the bytes an upgraded connection carried).
pub struct Watched<T, W = Arc<Activity>> {
    inner: T,
    pub watch: W,
}

impl<T, W> Watched<T, W> {
    pub fn new(inner: T, watch: W) -> Watched<T, W> {
        Watched { inner, watch }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin, W: Watch + Unpin> AsyncRead for Watched<T, W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.watch.moved(buf.filled().len() - before, 0);
        polled
    }
}

impl<T: AsyncWrite + Unpin, W: Watch + Unpin> AsyncWrite for Watched<T, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        match polled {
            Poll::Ready(Ok(n)) => this.watch.moved(0, n),
            Poll::Pending => this.watch.waits(),
            Poll::Ready(Err(_)) => {}
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        match polled {
            Poll::Ready(Ok(n)) => this.watch.moved(0, n),
            Poll::Pending => this.watch.waits(),
            Poll::Ready(Err(_)) => {}
        }
        polled
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

/// A response body that keeps its request in flight until it has been sent or dropped, and
/// tells the watchdog whether the server has it in hand: from when the answer is handed over,
/// and after each frame, until the server asks for more (a client that takes nothing leaves
/// it so, see [`Closed::Stalled`]).
pub struct Tracked<B> {
    inner: B,
    in_flight: InFlight,
    /// Counted in [`Activity::handed`].
    handed: bool,
}

impl<B: Body> Tracked<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Tracked<B> {
        // A body with nothing to send (a `HEAD`'s, a 204's) is not waited for: the server
        // need never ask for it.
        let handed = !inner.is_end_stream();
        if handed {
            in_flight.0.handed.fetch_add(1, Ordering::Relaxed);
        }
        Tracked {
            inner,
            in_flight,
            handed,
        }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        if self.handed {
            self.in_flight.0.handed.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let activity = &this.in_flight.0;
        activity.sent.store(true, Ordering::Relaxed);
        if std::mem::take(&mut this.handed) {
            activity.handed.fetch_sub(1, Ordering::Relaxed);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = polled {
            this.handed = true;
            activity.handed.fetch_add(1, Ordering::Relaxed);
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

/// A service's answer to one request, with the request counted in flight on `activity` from
/// now until its response body has been sent or dropped. (The body is boxed again: a generic
/// body type here trips a known rustc limit on `Send` proofs inside spawned futures.)
pub fn track<E, F>(activity: &Arc<Activity>, answer: F) -> Track<F>
where
    F: std::future::Future<Output = Result<http::Response<BoxBody>, E>>,
{
    Track {
        answer,
        in_flight: Some(activity.request()),
    }
}

pin_project_lite::pin_project! {
    /// [`track`]'s future. Written out rather than an `async` block: an `async` block that
    /// awaits a future it was given holds it twice (as what it captured and as what it awaits),
    /// and the request path's future is some 6 KiB, which hyper keeps room for while a
    /// connection lives.
    pub struct Track<F> {
        #[pin]
        answer: F,
        in_flight: Option<InFlight>,
    }
}

impl<E, F> std::future::Future for Track<F>
where
    F: std::future::Future<Output = Result<http::Response<BoxBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let answered = std::task::ready!(this.answer.poll(cx));
        // The guard goes with the body (a future is not polled again once it is ready).
        let in_flight = this.in_flight.take();
        Poll::Ready(answered.map(|r| {
            r.map(|b| match in_flight {
                Some(in_flight) => Tracked::new(b, in_flight).boxed_unsync(),
                None => b,
            })
        }))
    }
}

/// Runs `conn` (a connection being served) until it ends, or until it has been idle or
/// stalled as long as `limits` allow (then it is dropped, which closes it): `Err` says which.
///
/// The watchdog ([`Activity::idle_for`]) is polled only when something it waits on (its timer,
/// the start of a turn) woke it, not on every wake-up of the connection's task: a busy
/// connection is woken twice per request, and each poll of the watchdog polled its timer and
/// its notification for nothing.
pub async fn or_idle<F: std::future::Future>(
    conn: F,
    activity: &Activity,
    limits: Limits,
) -> Result<F::Output, Closed> {
    let watchdog = activity.idle_for(limits);
    let (mut watchdog, mut conn) = (std::pin::pin!(watchdog), std::pin::pin!(conn));
    let woken = Arc::new(Woken {
        fired: AtomicBool::new(true),
        task: AtomicWaker::new(),
    });
    let waker = std::task::Waker::from(woken.clone());
    std::future::poll_fn(|cx| {
        woken.task.register(cx.waker());
        // The watchdog first: a look that finds the connection quiet is seen by the
        // connection's reads in the same wake-up ([`crate::release`]).
        if woken.fired.swap(false, Ordering::AcqRel) {
            let mut own = Context::from_waker(&waker);
            if let Poll::Ready(closed) = watchdog.as_mut().poll(&mut own) {
                return Poll::Ready(Err(closed));
            }
        }
        conn.as_mut().poll(cx).map(Ok)
    })
    .await
}

/// The watchdog's waker: notes that the watchdog has something to look at, and wakes the
/// connection's task.
struct Woken {
    fired: AtomicBool,
    task: AtomicWaker,
}

impl std::task::Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(idle: u64, stall: u64) -> Limits {
        Limits {
            idle: Duration::from_secs(idle),
            stall: Duration::from_secs(stall),
        }
    }

    /// The watchdog, polled only when its own timer or notification woke it, still closes a
    /// connection that does nothing, and still leaves one with a request in flight; a
    /// connection whose task is woken again and again by its own work does not hide it.
    #[tokio::test(start_paused = true)]
    async fn or_idle_closes_a_connection_only_when_it_is_idle() {
        let a = Activity::new();
        let l = limits(60, 60);
        let started = tokio::time::Instant::now();
        let closed = or_idle(std::future::pending::<()>(), &a, l).await;
        assert_eq!(closed, Err(Closed::Idle));
        assert!(started.elapsed() >= l.idle);

        assert_eq!(or_idle(async { 7 }, &a, l).await, Ok(7));

        let req = a.request();
        let busy = or_idle(std::future::pending::<()>(), &a, l);
        assert!(tokio::time::timeout(Duration::from_secs(600), busy)
            .await
            .is_err());
        drop(req);

        // Woken every second by itself, moving nothing: closed all the same.
        let started = tokio::time::Instant::now();
        let spinning = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        assert_eq!(or_idle(spinning, &a, l).await, Err(Closed::Idle));
        assert!(started.elapsed() >= l.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_only_with_nothing_in_flight() {
        let a = Activity::new();
        let l = limits(60, 60);
        // A request in flight holds the connection, however long.
        let req = a.request();
        let waited = tokio::time::timeout(Duration::from_secs(600), a.idle_for(l)).await;
        assert!(waited.is_err(), "closed with a request in flight");
        drop(req);
        // Then the full timeout counts from the request's end.
        let started = tokio::time::Instant::now();
        assert_eq!(a.idle_for(l).await, Closed::Idle);
        assert!(started.elapsed() >= l.idle);
    }

    /// PRODUCT.md 7: idle is "no request in flight, silent or not". Bytes that are no request
    /// (h2 PINGs, SETTINGS) do not keep an HTTP connection; they keep a splice, whose bytes
    /// are all there is.
    #[tokio::test(start_paused = true)]
    async fn bytes_keep_a_splice_not_an_http_connection() {
        let l = limits(60, 60);
        for (activity, kept) in [(Activity::new(), false), (Activity::splice(), true)] {
            let mut watch = activity.clone();
            let pinging = async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    watch.moved(17, 0);
                    watch.moved(0, 17);
                }
            };
            let ended =
                tokio::time::timeout(Duration::from_secs(600), or_idle(pinging, &activity, l))
                    .await;
            assert_eq!(ended.is_err(), kept, "bytes_count {}", activity.bytes_count);
        }
    }

    /// A client that takes none of its answer: closed after the stall limit, though a request
    /// is in flight; one that takes it slowly is not.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_taking_its_answer_is_closed() {
        let l = limits(600, 60);
        // A write that waits and never goes on.
        let a = Activity::new();
        let _req = a.request();
        let mut watch = a.clone();
        watch.moved(0, 1000);
        watch.waits();
        let started = tokio::time::Instant::now();
        assert_eq!(a.idle_for(l).await, Closed::Stalled);
        assert!(started.elapsed() >= l.stall && started.elapsed() < l.idle);

        // A write that waits but goes on, a byte every 10 s: kept.
        let a = Activity::new();
        let _req = a.request();
        let mut watch = a.clone();
        let slow = async move {
            loop {
                watch.waits();
                tokio::time::sleep(Duration::from_secs(10)).await;
                watch.moved(0, 1);
            }
        };
        let kept = tokio::time::timeout(Duration::from_secs(900), or_idle(slow, &a, l)).await;
        assert!(kept.is_err(), "a slow reader was cut");

        // An answer handed to the server, its body never asked for (an h2 client that opens
        // no window): closed; asked for now and then: kept.
        let a = Activity::new();
        let body = Tracked::new(crate::body::full("an answer"), a.request());
        let started = tokio::time::Instant::now();
        assert_eq!(a.idle_for(l).await, Closed::Stalled);
        assert!(started.elapsed() >= l.stall);
        drop(body);
        assert_eq!(a.handed.load(Ordering::Relaxed), 0);

        let a = Activity::new();
        let endless = http_body_util::StreamBody::new(futures_util::stream::repeat_with(|| {
            Ok::<_, std::convert::Infallible>(Frame::data(bytes::Bytes::from_static(b"x")))
        }));
        let mut body = Tracked::new(endless, a.request());
        let asks = async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let _ = body.frame().await;
            }
        };
        let kept = tokio::time::timeout(Duration::from_secs(900), or_idle(asks, &a, l)).await;
        assert!(kept.is_err(), "a body asked for was cut");
    }
}
