//! Closing client connections that hold latchkey's resources for free (PRODUCT.md 10.9): a
//! connection with no request in flight whose bytes have not moved for `proxy.idle_timeout` is
//! closed, whether it never sent a byte, stopped half-way through a request head, or sits idle
//! between keep-alive requests. A request in flight keeps its connection however long it takes
//! (a slow upstream, a server-sent event stream with long gaps): it counts from the moment its
//! head has been read until its response body has been sent or dropped.
//!
//! [`Watched`] notes every byte read or written; [`Activity::request`] marks a request in
//! flight until the guard (kept in the response body, [`Tracked`]) is dropped;
//! [`Activity::idle_for`] completes once the connection has been idle that long (checked four
//! times per timeout, so between the timeout and a quarter more).

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

/// What one client connection has been doing. Moving a byte only sets a flag (no clock is read
/// on the hot path); the watchdog looks at it a few times per timeout.
#[derive(Debug)]
pub struct Activity {
    /// Set by every byte read or written and every request finished; cleared by the watchdog.
    moved: AtomicBool,
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
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            moved: AtomicBool::new(true),
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

    /// Completes once no request has been in flight and no byte has moved for `timeout` (give
    /// or take a quarter of it). During a turn ([`crate::release`]) it looks every
    /// [`QUIET_SPELL`] and marks the connection [`quiet`](Self::quiet) when it is.
    pub async fn idle_for(&self, timeout: Duration) {
        let look = timeout / LOOKS;
        let mut quiet_for = Duration::ZERO;
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
                        quiet_for = Duration::ZERO;
                        continue;
                    }
                }
            };
            let moved = self.moved.swap(false, Ordering::Relaxed);
            if moved || self.in_flight.load(Ordering::Relaxed) > 0 {
                quiet_for = Duration::ZERO;
                self.quiet.store(false, Ordering::Relaxed);
                continue;
            }
            self.quiet.store(true, Ordering::Relaxed);
            quiet_for += step;
            if quiet_for >= timeout {
                return;
            }
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
}

/// Any byte moved is activity.
impl Watch for Arc<Activity> {
    fn moved(&mut self, read: usize, written: usize) {
        if read + written > 0 {
            self.touch();
        }
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
        if let Poll::Ready(Ok(n)) = polled {
            this.watch.moved(0, n);
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
        if let Poll::Ready(Ok(n)) = polled {
            this.watch.moved(0, n);
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

/// A response body that keeps its request in flight until it has been sent or dropped.
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Tracked<B> {
        Tracked {
            inner,
            _in_flight: in_flight,
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
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
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

/// Runs `conn` (a connection being served) until it ends, or until it has been idle for
/// `timeout` (then it is dropped, which closes it): `None`.
///
/// The watchdog ([`Activity::idle_for`]) is polled only when something it waits on (its timer,
/// the start of a turn) woke it, not on every wake-up of the connection's task: a busy
/// connection is woken twice per request, and each poll of the watchdog polled its timer and
/// its notification for nothing.
pub async fn or_idle<F: std::future::Future>(
    conn: F,
    activity: &Activity,
    timeout: Duration,
) -> Option<F::Output> {
    let watchdog = activity.idle_for(timeout);
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
            if watchdog.as_mut().poll(&mut own).is_ready() {
                return Poll::Ready(None);
            }
        }
        conn.as_mut().poll(cx).map(Some)
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

    /// The watchdog, polled only when its own timer or notification woke it, still closes a
    /// connection that does nothing, and still leaves one with a request in flight; a
    /// connection whose task is woken again and again by its own work does not hide it.
    #[tokio::test(start_paused = true)]
    async fn or_idle_closes_a_connection_only_when_it_is_idle() {
        let a = Activity::new();
        let t = Duration::from_secs(60);
        let started = tokio::time::Instant::now();
        assert!(or_idle(std::future::pending::<()>(), &a, t).await.is_none());
        assert!(started.elapsed() >= t);

        assert_eq!(or_idle(async { 7 }, &a, t).await, Some(7));

        let req = a.request();
        let busy = or_idle(std::future::pending::<()>(), &a, t);
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
        assert!(or_idle(spinning, &a, t).await.is_none());
        assert!(started.elapsed() >= t);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_only_with_nothing_in_flight_and_nothing_moving() {
        let a = Activity::new();
        let t = Duration::from_secs(60);
        // A request in flight holds the connection, however long.
        let req = a.request();
        let waited = tokio::time::timeout(Duration::from_secs(600), a.idle_for(t)).await;
        assert!(waited.is_err(), "closed with a request in flight");
        drop(req);
        // Then the full timeout counts from the request's end.
        let started = tokio::time::Instant::now();
        a.idle_for(t).await;
        assert!(started.elapsed() >= t);
    }
}
