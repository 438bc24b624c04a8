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

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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
}

/// How many looks the watchdog takes per timeout: a connection is closed after being idle
/// between the timeout and a quarter more.
const LOOKS: u32 = 4;

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            moved: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
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

    /// Completes once no request has been in flight and no byte has moved for `timeout` (give
    /// or take a quarter of it).
    pub async fn idle_for(&self, timeout: Duration) {
        let look = timeout / LOOKS;
        let mut quiet = 0;
        loop {
            tokio::time::sleep(look).await;
            let moved = self.moved.swap(false, Ordering::Relaxed);
            if moved || self.in_flight.load(Ordering::Relaxed) > 0 {
                quiet = 0;
                continue;
            }
            quiet += 1;
            if quiet >= LOOKS {
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
pub fn track<E, F>(
    activity: &Arc<Activity>,
    answer: F,
) -> impl std::future::Future<Output = Result<http::Response<BoxBody>, E>>
where
    F: std::future::Future<Output = Result<http::Response<BoxBody>, E>>,
{
    let in_flight = activity.request();
    async move {
        answer
            .await
            .map(|r| r.map(|b| Tracked::new(b, in_flight).boxed_unsync()))
    }
}

/// Runs `conn` (a connection being served) until it ends, or until it has been idle for
/// `timeout` (then it is dropped, which closes it): `None`.
pub async fn or_idle<F: std::future::Future>(
    conn: F,
    activity: &Activity,
    timeout: Duration,
) -> Option<F::Output> {
    tokio::select! {
        out = conn => Some(out),
        () = activity.idle_for(timeout) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
