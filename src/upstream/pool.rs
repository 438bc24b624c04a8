//! The upstream connection pool: one per proxy worker, keyed by scheme and authority.
//!
//! An HTTP/1.1 connection is taken from its host's idle list (most recently used first, among
//! those lent before to the request's [`Tenant`]; one the upstream closed meanwhile is dropped
//! there), the exchange is latchkey's own client
//! ([`super::h1`]), and the connection goes back to the list only when its response body has
//! been read to the end ([`Home`]). A request the upstream closed a reused connection on
//! without answering is sent again on another one when that is safe (nothing of it was taken,
//! and the method is idempotent or the head was never written). An h2 connection (ALPN) is
//! hyper's and is shared by every request to its host. Requests to HTTP/1.1 upstreams go in
//! origin form with a `Host` header; to h2 upstreams, with `:authority` and `:scheme`.
//!
//! A request that finds no idle connection dials, unless [`MAX_DIALS_PER_HOST`] dials to its
//! host are under way on this worker: then it waits for a connection to come back or a dial to
//! end, [`DIAL_WAIT`] at most, and dials after that. A burst on a cold pool (after the idle
//! limit, every connection closed) so makes a few connections and reuses them, instead of a TLS
//! handshake per request racing for the cores (`bench/tail.py`, issue 15). The handshakes
//! that are made resume a saved TLS session ([`super::sessions`]). A host whose last answer
//! said it closes its connection (`Connection: close`, HTTP/1.0 without keep-alive, a body
//! that ends at the close) returns none to wait for: its requests dial at once, until one of
//! its connections comes back.
//!
//! An idle connection older than the pool's idle limit is dropped when it would be taken, and
//! by a reaper task that runs while the pool has idle connections (so that an upstream is not
//! held open by a pool nobody sends through); the task holds the pool only weakly and ends
//! with it.
//!
//! A reload that changes how upstreams are dialled (trusted roots, address policy, pins,
//! connect timeout) gives the pool a new dialer ([`Pool::redial`]): its idle connections and
//! shared h2 connections are dropped, and a connection lent out before is not taken back, so
//! that no request after the reload goes on a connection the new settings would not make.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme as UriScheme};
use http::{Method, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use super::dial::{DialError, Dialer};
use super::h1::{self, Checkin, Deadline, H1Body, H1Conn, H1Error, Pump, RequestFraming};
use super::replay::{connection_lost, unprocessed, Replay};
use crate::body::{self as body, BoxBody as UpstreamBody, BoxError};
use crate::hop_by_hop;
use zeroize::Zeroizing;

/// How often, per idle limit, the reaper looks: a connection is closed between the limit and a
/// quarter more after its last use (or [`RELEASE_AFTER`] more, if that is shorter).
const REAPS: u32 = 4;
/// An idle connection resting this long lets go of its read buffer ([`H1Conn::release_buffers`]):
/// a pool of a few hundred idle connections holds kilobytes, not megabytes, while one in use
/// keeps its buffer between requests. The reaper looks at least this often.
const RELEASE_AFTER: Duration = Duration::from_secs(1);
/// Idle HTTP/1.1 connections kept per host, per worker, whichever tenants they are lent to
/// (the least recently used goes first): enough for a worker's share of a few hundred
/// concurrent requests, few enough that a burst, or many tenants, do not leave thousands open.
const MAX_IDLE_PER_HOST: usize = 64;

/// Dials to one host under way at once, per worker. A request that finds no idle connection
/// beyond them waits for a connection to come back or a dial to end ([`DIAL_WAIT`] at most),
/// so that a burst on a cold pool makes a few connections and reuses them rather than racing a
/// TLS handshake per request on cores the handshakes themselves keep busy.
const MAX_DIALS_PER_HOST: usize = 4;
/// How long a request waits for a connection beyond [`MAX_DIALS_PER_HOST`] before it dials
/// anyway (an upstream whose answers take long returns no connection soon).
const DIAL_WAIT: Duration = Duration::from_millis(20);

/// Why a request could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Dial(#[from] DialError),
    #[error("{0}")]
    H1(#[from] H1Error),
    #[error("{0}")]
    H2(#[from] hyper::Error),
    #[error("the upstream URL has no host")]
    NoAuthority,
    #[error("{0}")]
    Upgrade(String),
    /// The request timeout passed before a connection was had or an h2 answer came.
    #[error("the upstream did not answer within {0:?}")]
    Timeout(Duration),
}

impl SendError {
    /// Whether the request timeout passed ([`Pool::send`]'s `within`).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            SendError::Timeout(_) | SendError::H1(H1Error::NoAnswer(_))
        )
    }

    /// The message with the chain of causes (hyper's errors say little at the top level), each
    /// said once: a variant that only wraps its cause says what the cause says.
    pub fn describe(&self) -> String {
        let mut message = String::from("the upstream connection failed");
        let mut said = String::new();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            let text = e.to_string();
            if text != said {
                message.push_str(": ");
                message.push_str(&text);
                said = text;
            }
            cur = e.source();
        }
        message
    }
}

/// Which upstream: `https` and the authority as written in the request URI (latchkey writes
/// it in lower case). The maps are looked up by the authority's text: `Authority`'s own `Hash`
/// and `Eq` fold case byte by byte, which showed in the profile.
#[derive(Clone)]
struct Key {
    https: bool,
    authority: Authority,
    tenant: Tenant,
}

/// Whose credential a request carries: its connection's ID and version. An HTTP/1.1
/// connection is lent again only to requests of the tenant it was lent to before: an upstream
/// that sends bytes past the end of an answer it framed (a body after a `HEAD`'s head, a
/// `Content-Length` short of the body), late enough that the check when the connection is
/// taken sees nothing, has them read as the next request's answer on that connection, and
/// an answer that quotes one connection's key must not reach a request that the other
/// connection's scrubber guards (PRODUCT.md 10.8). A new version of a connection is a new
/// tenant: a rotated key's connections are not reused by the new key's requests. h2
/// connections stay shared by every request to their host: each answer comes on its own
/// stream, nothing of one is read as another's.
#[derive(Clone, Debug)]
pub struct Tenant {
    id: Arc<str>,
    version: u64,
}

impl Tenant {
    pub fn new(id: Arc<str>, version: u64) -> Tenant {
        Tenant { id, version }
    }

    fn is(&self, other: &Tenant) -> bool {
        self.version == other.version && (Arc::ptr_eq(&self.id, &other.id) || self.id == other.id)
    }
}

type ByHost<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// An h2 connection that a host's requests share, and which one it is: a request that found
/// it retired takes it off the map only if it is still the one there.
#[derive(Clone)]
struct SharedH2 {
    id: u64,
    sender: http2::SendRequest<UpstreamBody>,
}

struct Idle {
    conn: H1Conn,
    since: Instant,
    tenant: Tenant,
}

/// Per scheme (index 0: http, 1: https), per authority.
#[derive(Default)]
struct State {
    idle: [ByHost<Vec<Idle>>; 2],
    h2: [ByHost<SharedH2>; 2],
    /// h2 connections made with an earlier dialer ([`Pool::redial`]), no longer lent.
    retired: Vec<http2::SendRequest<UpstreamBody>>,
    /// A reaper task is running.
    reaping: bool,
    /// Dials under way, per scheme and authority.
    dialing: [ByHost<usize>; 2],
    /// Hosts whose last answer closed its connection, per scheme: their requests are not held
    /// by [`MAX_DIALS_PER_HOST`] (no connection comes back to wait for). A connection put back
    /// takes its host off.
    closing: [ByHost<()>; 2],
}

/// The pool's limits (`proxy.pool_idle_timeout`, `proxy.body_timeout`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long an idle HTTP/1.1 connection is kept.
    pub idle: Duration,
    /// How long a body may go with no byte moving either way.
    pub body: Duration,
}

/// The pool. Cheap to share; a worker's requests all use its own.
pub struct Pool {
    dialer: arc_swap::ArcSwap<Dialer>,
    /// Counts the dialers the pool has had: a connection made with an earlier one is not
    /// pooled again.
    generation: AtomicU64,
    limits: Limits,
    state: Mutex<State>,
    /// Requests waiting for a connection to come back or a dial to end ([`MAX_DIALS_PER_HOST`]).
    waiting: std::sync::atomic::AtomicUsize,
    /// Wakes them.
    changed: tokio::sync::Notify,
    /// Numbers the h2 connections ([`SharedH2::id`]).
    h2_made: AtomicU64,
}

/// What a request that found no idle connection may do.
enum Turn {
    /// Dial, holding this slot while it does.
    Dial(Option<DialSlot>),
    /// Look for an idle connection again.
    Again,
}

/// One of a host's [`MAX_DIALS_PER_HOST`] dials, while it is under way.
struct DialSlot {
    pool: Arc<Pool>,
    key: Key,
}

impl Drop for DialSlot {
    fn drop(&mut self) {
        {
            let mut state = self.pool.state();
            if let Some(n) =
                state.dialing[usize::from(self.key.https)].get_mut(self.key.authority.as_str())
            {
                *n = n.saturating_sub(1);
            }
        }
        self.pool.wake();
    }
}

/// Where an HTTP/1.1 connection lent to a response goes back to when its body has ended.
pub struct Home {
    pool: Weak<Pool>,
    key: Key,
    generation: u64,
}

impl Checkin for Home {
    fn checkin(self, conn: H1Conn) {
        if let Some(pool) = self.pool.upgrade() {
            if pool.generation.load(Ordering::Acquire) == self.generation {
                pool.put(self.key, conn);
            }
        }
    }
}

/// A response body from an upstream.
pub enum ResponseBody {
    Empty,
    H1(H1Body<Home>),
    /// An h2 answer; its stream fails after `proxy.body_timeout` without a frame.
    H2(Stall<Incoming>),
    /// An answer read by hyper's HTTP/1.1 client (a WebSocket handshake the upstream refused).
    Http1(Incoming),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::H1(b) => Pin::new(b).poll_frame(cx),
            ResponseBody::H2(b) => Pin::new(b).poll_frame(cx),
            ResponseBody::Http1(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(BoxError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Empty => true,
            ResponseBody::H1(b) => b.is_end_stream(),
            ResponseBody::H2(b) => b.is_end_stream(),
            ResponseBody::Http1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Empty => SizeHint::with_exact(0),
            ResponseBody::H1(b) => b.size_hint(),
            ResponseBody::H2(b) => b.size_hint(),
            ResponseBody::Http1(b) => b.size_hint(),
        }
    }
}

/// An h2 body that fails once it has been waited on for `timeout` with no frame coming: what
/// `proxy.body_timeout` is for an HTTP/1.1 body, on one h2 stream (h2's pings see a connection
/// alive while one of its streams stalls). Only waiting counts: time the reader takes between
/// frames (a slow client) does not.
pub struct Stall<B> {
    inner: B,
    timer: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    /// Whether the last poll found nothing, so the timer runs.
    waiting: bool,
    /// The error when it fires: which side stalled.
    stalled: fn(Duration) -> BoxError,
    /// Set when it fired (hyper reports an upload's error as a reset stream, not as this).
    fired: Arc<AtomicBool>,
    /// For an upload: when it has been sent whole.
    sent: Option<Arc<Sent>>,
}

/// How an h2 request's body is being sent: when it was sent whole (no answer is due before:
/// the request timeout runs from then, [`answer_by`]), when a piece of it last went, and
/// whether the client is the one being waited for.
pub struct Sent {
    at: std::sync::OnceLock<Instant>,
    notify: tokio::sync::Notify,
    start: Instant,
    /// When a piece last went, as time since `start`, in milliseconds.
    moved: std::sync::atomic::AtomicU64,
    /// The last poll of the body found nothing: the client's turn.
    client_turn: AtomicBool,
}

impl Default for Sent {
    fn default() -> Sent {
        Sent {
            at: std::sync::OnceLock::new(),
            notify: tokio::sync::Notify::new(),
            start: Instant::now(),
            moved: std::sync::atomic::AtomicU64::new(0),
            client_turn: AtomicBool::new(false),
        }
    }
}

impl Sent {
    fn mark(&self) {
        if self.at.set(Instant::now()).is_ok() {
            self.notify.notify_waiters();
        }
    }

    fn moved(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.moved.store(ms, Ordering::Relaxed);
        self.client_turn.store(false, Ordering::Relaxed);
    }

    /// When a piece of the body last went (or the body was made).
    fn last_moved(&self) -> Instant {
        self.start + Duration::from_millis(self.moved.load(Ordering::Relaxed))
    }

    /// When the body was sent whole, once it has been.
    async fn whole(&self) -> Instant {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(at) = self.at.get() {
                return *at;
            }
            notified.await;
        }
    }
}

/// `answer`, an h2 exchange, failed with [`SendError::Timeout`] once its answer's head has not
/// come by `deadline`, or `deadline.within` after its request body was sent whole if that is
/// later: a slow upload that keeps moving is not cut. While the body is being sent, the body
/// timeout bounds it instead: one the upstream stops taking (no window granted) for that long
/// is cut here; one the client stops sending, by its [`Stall`] (408).
async fn answer_by<T>(
    deadline: Deadline,
    sent: &Sent,
    body_timeout: Duration,
    answer: impl std::future::Future<Output = T>,
) -> Result<T, SendError> {
    tokio::pin!(answer);
    let body_timeout = body_timeout.min(h1::MAX_BODY_TIMEOUT);
    let by = async {
        loop {
            if let Some(whole) = sent.at.get() {
                let at = deadline
                    .at
                    .max(*whole + deadline.within.min(h1::MAX_BODY_TIMEOUT));
                tokio::time::sleep_until(at).await;
                return SendError::Timeout(deadline.within);
            }
            let still = sent.last_moved() + body_timeout;
            if Instant::now() >= still && !sent.client_turn.load(Ordering::Relaxed) {
                return SendError::H1(H1Error::UpstreamStalled(body_timeout));
            }
            // Looked at again when the body is whole, or when it may have stalled (at least
            // 10 ms on, so that a client's turn is not looked at in a loop).
            let again = still.max(Instant::now() + Duration::from_millis(10));
            tokio::select! {
                _ = sent.whole() => {}
                () = tokio::time::sleep_until(again) => {}
            }
        }
    };
    tokio::select! {
        biased;
        out = &mut answer => Ok(out),
        e = by => Err(e),
    }
}

impl<B> Stall<B> {
    fn new(inner: B, timeout: Duration, stalled: fn(Duration) -> BoxError) -> Stall<B> {
        let timeout = timeout.min(h1::MAX_BODY_TIMEOUT);
        Stall {
            inner,
            timer: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            waiting: false,
            stalled,
            fired: Arc::new(AtomicBool::new(false)),
            sent: None,
        }
    }

    /// An upstream's answer: a stall is the upstream's (504 `upstream_timeout` when nothing
    /// went back yet; in the access log, a timeout either way).
    fn answer(inner: B, timeout: Duration) -> Stall<B> {
        Stall::new(inner, timeout, |t| {
            Box::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                H1Error::UpstreamStalled(t),
            ))
        })
    }

    /// A client's upload: a stall is the client's (408 `request_timeout`).
    fn upload(inner: B, timeout: Duration) -> Stall<B>
    where
        B: Body,
    {
        let sent = Arc::new(Sent::default());
        if inner.is_end_stream() {
            sent.mark();
        }
        Stall {
            sent: Some(sent),
            ..Stall::new(inner, timeout, |t| Box::new(H1Error::ClientStalled(t)))
        }
    }
}

impl<B> Body for Stall<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                if let Some(sent) = &this.sent {
                    sent.moved();
                    if frame.is_none() || this.inner.is_end_stream() {
                        sent.mark();
                    }
                }
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                if let Some(sent) = &this.sent {
                    sent.client_turn.store(true, Ordering::Relaxed);
                }
                if !this.waiting {
                    this.waiting = true;
                    this.timer.as_mut().reset(Instant::now() + this.timeout);
                }
                match std::future::Future::poll(this.timer.as_mut(), cx) {
                    Poll::Ready(()) => {
                        this.fired.store(true, Ordering::Relaxed);
                        Poll::Ready(Some(Err((this.stalled)(this.timeout))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Pool {
    pub fn new(dialer: Dialer, limits: Limits) -> Arc<Pool> {
        Arc::new(Pool {
            dialer: arc_swap::ArcSwap::from_pointee(dialer),
            generation: AtomicU64::new(0),
            limits,
            state: Mutex::new(State::default()),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            changed: tokio::sync::Notify::new(),
            h2_made: AtomicU64::new(0),
        })
    }

    /// The dialer in force.
    pub fn dialer(&self) -> Dialer {
        Dialer::clone(&self.dialer.load())
    }

    /// Dials with `dialer` from now on; the connections made with the one before are closed
    /// once no request uses them.
    pub fn redial(&self, dialer: Dialer) {
        self.dialer.store(Arc::new(dialer));
        // Under the lock, so that a request that reads the new generation finds the idle list
        // already emptied.
        let idle = {
            let mut state = self.state();
            self.generation.fetch_add(1, Ordering::AcqRel);
            // An h2 connection may carry streams in flight (a response still streaming): its
            // handle is kept, unused, until the upstream closes the connection.
            let h2: Vec<_> = state
                .h2
                .iter_mut()
                .flat_map(|m| m.drain())
                .map(|(_, s)| s.sender)
                .collect();
            state.retired.retain(|s| !s.is_closed());
            state.retired.extend(h2);
            std::mem::take(&mut state.idle)
        };
        // Idle HTTP/1.1 connections carry nothing: closed, outside the lock.
        drop(idle);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Sends a request whose URI is absolute (scheme and authority name the upstream), and
    /// fails with [`SendError::Timeout`] or [`H1Error::NoAnswer`] when its answer's head has
    /// not come `within` (the request timeout: waiting for a connection, dialling, sending and
    /// waiting alike), or `within` after its body was sent whole if that is later (a body that
    /// keeps moving is not cut; the body timeout bounds it). The answer's hop-by-hop and
    /// framing headers are already gone.
    ///
    /// On a pooled HTTP/1.1 connection the timeout is the connection's own timer
    /// ([`H1Conn::exchange`]), armed once and moved rarely; a timer per request was a wheel
    /// insertion and removal each time. The rarer paths (h2, dialling) take a timer of their
    /// own.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
        tenant: Tenant,
        within: Duration,
    ) -> Result<Response<ResponseBody>, SendError> {
        let now = Instant::now();
        let deadline = Deadline::after(now, within);
        let generation = self.generation.load(Ordering::Acquire);
        let key = Key {
            https: req.uri().scheme() == Some(&UriScheme::HTTPS),
            authority: req
                .uri()
                .authority()
                .cloned()
                .ok_or(SendError::NoAuthority)?,
            tenant,
        };

        if let Some(shared) = self.shared_h2(&key) {
            // Boxed: the h2 exchange is the rarer path, and the request path's future stays
            // small without it.
            match Box::pin(self.on_shared_h2(shared, req, &key, deadline)).await? {
                OnShared::Answered(resp) => return Ok(resp),
                OnShared::Back(back) => req = back,
            }
        }

        let (mut parts, body) = req.into_parts();
        let mut exchange = Exchange::new(&parts, body, &key);
        let idempotent = is_idempotent(&parts.method);
        let slot = loop {
            while let Some(mut conn) = self.take_idle(&key, now) {
                match conn
                    .exchange(
                        &exchange.head,
                        &mut exchange.pump,
                        exchange.to_head,
                        idempotent,
                        deadline,
                    )
                    .await
                {
                    Ok(head) => {
                        // The request's head has been written; its map is kept for the next.
                        crate::spare::keep(parts.headers);
                        return Ok(self.respond(key, conn, head, exchange.pump, generation));
                    }
                    Err(f) if f.retryable => {
                        tracing::debug!(error = %f.error, "a pooled upstream connection had closed; sending again");
                    }
                    Err(f) => return Err(f.error.into()),
                }
            }
            let turn = tokio::time::timeout_at(deadline.at, Box::pin(self.dial_or_wait(&key)));
            match turn.await.map_err(|_| SendError::Timeout(within))? {
                Turn::Dial(slot) => break slot,
                // A dial that ended may have made the host's shared h2 connection: the request
                // goes on it, so that a burst of requests to an h2 host (its first ones, or
                // those it turned away retiring a connection) opens a few connections, not one
                // each.
                Turn::Again if !exchange.pump.started() => {
                    if let Some(shared) = self.shared_h2(&key) {
                        let body = exchange.pump.into_body().unwrap_or_else(body::empty);
                        let req = Request::from_parts(parts, body);
                        match Box::pin(self.on_shared_h2(shared, req, &key, deadline)).await? {
                            OnShared::Answered(resp) => return Ok(resp),
                            OnShared::Back(back) => {
                                let (p, b) = back.into_parts();
                                exchange = Exchange::new(&p, b, &key);
                                parts = p;
                            }
                        }
                    }
                }
                Turn::Again => {}
            }
        };

        // Dialing (DNS, TCP, TLS, the HTTP handshake) is the large part of this future and the
        // rare one: boxed, it is allocated only when it runs, and every proxied request's
        // future (kept per client connection by hyper) stays small.
        // Each step bounds itself: the dial and the h2 handshake by the deadline, an exchange
        // by it or by the request timeout after its body was sent.
        Box::pin(self.connect_and_send(key, parts, exchange, generation, slot, deadline)).await
    }

    /// Sends `req` on the host's shared h2 connection `shared`. A request the upstream did not
    /// process (it retired the connection: [`super::replay`]) is sent once more, on the next
    /// shared connection if another request made one meanwhile; the request is given back
    /// when no shared connection takes it (closed before it took it, or none left).
    async fn on_shared_h2(
        self: &Arc<Self>,
        shared: SharedH2,
        mut req: Request<UpstreamBody>,
        key: &Key,
        deadline: Deadline,
    ) -> Result<OnShared, SendError> {
        let mut again = req.method() != Method::CONNECT;
        let idempotent = is_idempotent(req.method());
        let mut next = Some(shared);
        while let Some(shared) = next {
            let mut sender = shared.sender;
            let replay = again.then(|| Replay::wrap(req.body_mut()));
            let (stalled, sent) = for_h2(&mut req, key, self.limits.body);
            let head = replay.as_ref().map(|_| head_of(&req));
            let to_head = req.method() == Method::HEAD;
            again = false;
            match answer_by(
                deadline,
                &sent,
                self.limits.body,
                sender.try_send_request(req),
            )
            .await?
            {
                Ok(resp) => {
                    return Ok(OnShared::Answered(from_h2(resp, to_head, self.limits.body)))
                }
                Err(mut e) => match e.take_message() {
                    Some(back) => {
                        self.forget_h2(key, shared.id);
                        req = back;
                    }
                    None => {
                        let error = e.into_error();
                        let resend = unprocessed(&error) || (idempotent && connection_lost(&error));
                        let again = match replay.zip(head).filter(|_| resend) {
                            Some((replay, head)) => {
                                let body = tokio::time::timeout_at(deadline.at, replay.body());
                                body.await.ok().flatten().map(|body| (head, body))
                            }
                            None => None,
                        };
                        let Some((head, body)) = again else {
                            return Err(h2_error(error, &stalled, self.limits.body));
                        };
                        tracing::debug!(%error, "the upstream did not process the request (it retired the h2 connection), or lost the connection under an idempotent one; sending it again");
                        self.forget_h2(key, shared.id);
                        req = Request::from_parts(head, body);
                    }
                },
            }
            next = self.shared_h2(key);
        }
        Ok(OnShared::Back(req))
    }

    async fn connect_and_send(
        self: &Arc<Self>,
        key: Key,
        parts: http::request::Parts,
        mut exchange: Exchange,
        generation: u64,
        slot: Option<DialSlot>,
        deadline: Deadline,
    ) -> Result<Response<ResponseBody>, SendError> {
        tracing::debug!(authority = %key.authority, "opening an upstream connection");
        let dialer = self.dialer();
        let timeout = || SendError::Timeout(deadline.within);
        let dialed = tokio::time::timeout_at(deadline.at, dialer.dial(key.https, &key.authority))
            .await
            .map_err(|_| timeout());
        let mut slot = slot;
        let io = match dialed {
            Ok(Ok(io)) if io.is_h2() => io,
            dialed => {
                slot = None;
                dialed??
            }
        };
        if io.is_h2() {
            let handshake = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(io));
            let (sender, conn) = tokio::time::timeout_at(deadline.at, handshake)
                .await
                .map_err(|_| timeout())??;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
            });
            {
                let id = self.h2_made.fetch_add(1, Ordering::Relaxed);
                let mut state = self.state();
                if self.generation.load(Ordering::Acquire) == generation {
                    let shared = SharedH2 {
                        id,
                        sender: sender.clone(),
                    };
                    state.h2[usize::from(key.https)].insert(key.authority.as_str().into(), shared);
                }
            }
            // Held until the connection is shared: the requests waiting for it to end then
            // find the connection ([`Pool::dial_or_wait`]) rather than dial one each.
            drop(slot);
            let mut sender = sender;
            let body = exchange.pump.into_body().unwrap_or_else(body::empty);
            let mut req = Request::from_parts(parts, body);
            let (stalled, sent) = for_h2(&mut req, &key, self.limits.body);
            let resp = answer_by(deadline, &sent, self.limits.body, sender.send_request(req))
                .await?
                .map_err(|e| h2_error(e, &stalled, self.limits.body))?;
            return Ok(from_h2(resp, exchange.to_head, self.limits.body));
        }
        let mut conn = H1Conn::new(io, self.limits.body);
        match conn
            .exchange(
                &exchange.head,
                &mut exchange.pump,
                exchange.to_head,
                false,
                deadline,
            )
            .await
        {
            Ok(head) => Ok(self.respond(key, conn, head, exchange.pump, generation)),
            Err(f) => Err(f.error.into()),
        }
    }

    fn respond(
        self: &Arc<Self>,
        key: Key,
        conn: H1Conn,
        head: h1::Head,
        pump: Pump,
        generation: u64,
    ) -> Response<ResponseBody> {
        if !head.reusable {
            self.closes(&key);
        }
        let home = Home {
            pool: Arc::downgrade(self),
            key,
            generation,
        };
        let body = match H1Body::new(conn, &head, pump, home) {
            Some(body) => ResponseBody::H1(body),
            None => ResponseBody::Empty,
        };
        head.response.map(|()| body)
    }

    /// Takes `key`'s shared h2 connection off the map, if it is still the one numbered `id`.
    fn forget_h2(&self, key: &Key, id: u64) {
        let mut state = self.state();
        let map = &mut state.h2[usize::from(key.https)];
        if map.get(key.authority.as_str()).is_some_and(|s| s.id == id) {
            map.remove(key.authority.as_str());
        }
    }

    fn shared_h2(&self, key: &Key) -> Option<SharedH2> {
        let mut state = self.state();
        let map = &mut state.h2[usize::from(key.https)];
        if map.is_empty() {
            return None;
        }
        match map.get(key.authority.as_str()) {
            Some(s) if !s.sender.is_closed() => Some(s.clone()),
            Some(_) => {
                map.remove(key.authority.as_str());
                None
            }
            None => None,
        }
    }

    /// For a request that found no idle connection: a dial slot if the host has one free, or
    /// else a wait for a connection of its tenant to come back or a dial to end, then `Again`;
    /// after [`DIAL_WAIT`] with neither (other tenants' connections coming back do not extend
    /// it), a dial with no slot. A host whose connections do not come back ([`Pool::closes`])
    /// is not waited for: a dial with no slot at once.
    async fn dial_or_wait(self: &Arc<Self>, key: &Key) -> Turn {
        let until = Instant::now() + DIAL_WAIT;
        let mut said = false;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.state();
                let https = usize::from(key.https);
                // One came back for this tenant meanwhile (another tenant's is not this one's),
                // or a dial made the host's shared h2 connection.
                if state.idle[https]
                    .get(key.authority.as_str())
                    .is_some_and(|l| l.iter().any(|idle| idle.tenant.is(&key.tenant)))
                    || state.h2[https]
                        .get(key.authority.as_str())
                        .is_some_and(|s| !s.sender.is_closed())
                {
                    return Turn::Again;
                }
                let dialing = match state.dialing[https].get_mut(key.authority.as_str()) {
                    Some(n) => n,
                    None => state.dialing[https]
                        .entry(key.authority.as_str().into())
                        .or_default(),
                };
                if *dialing < MAX_DIALS_PER_HOST {
                    *dialing += 1;
                    return Turn::Dial(Some(DialSlot {
                        pool: self.clone(),
                        key: key.clone(),
                    }));
                }
                if state.closing[https].contains_key(key.authority.as_str()) {
                    return Turn::Dial(None);
                }
            }
            if !said {
                said = true;
                tracing::debug!(
                    authority = %key.authority,
                    "every dial this worker may make to the upstream at once is under way; waiting for a connection to come back"
                );
            }
            self.waiting.fetch_add(1, Ordering::AcqRel);
            let woken = tokio::time::timeout_at(until, notified).await;
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            if woken.is_err() {
                return Turn::Dial(None);
            }
        }
    }

    /// `key`'s last answer closed its connection: its requests dial at once from now on, and
    /// those waiting for a connection to come back stop waiting.
    fn closes(&self, key: &Key) {
        {
            let mut state = self.state();
            let closing = &mut state.closing[usize::from(key.https)];
            if closing.contains_key(key.authority.as_str()) {
                return;
            }
            closing.insert(key.authority.as_str().into(), ());
        }
        self.wake();
    }

    /// Wakes the requests waiting in [`Pool::dial_or_wait`], if any.
    fn wake(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// The most recently used idle connection to `key`'s host, lent before to `key`'s tenant,
    /// that is still good `now`.
    fn take_idle(&self, key: &Key, now: Instant) -> Option<H1Conn> {
        let mut state = self.state();
        let list = state.idle[usize::from(key.https)].get_mut(key.authority.as_str())?;
        while let Some(at) = list.iter().rposition(|idle| idle.tenant.is(&key.tenant)) {
            let mut idle = list.remove(at);
            if now.saturating_duration_since(idle.since) < self.limits.idle && idle.conn.is_usable()
            {
                return Some(idle.conn);
            }
            tracing::debug!("an idle upstream connection was closed or too old; dropped");
        }
        None
    }

    fn put(self: &Arc<Self>, key: Key, conn: H1Conn) {
        let mut state = self.state();
        let closing = &mut state.closing[usize::from(key.https)];
        if !closing.is_empty() {
            closing.remove(key.authority.as_str());
        }
        let map = &mut state.idle[usize::from(key.https)];
        let list = match map.get_mut(key.authority.as_str()) {
            Some(list) => list,
            None => map.entry(key.authority.as_str().into()).or_default(),
        };
        if list.len() >= MAX_IDLE_PER_HOST {
            // The least recently used makes room.
            drop(list.remove(0));
        }
        list.push(Idle {
            conn,
            since: Instant::now(),
            tenant: key.tenant,
        });
        if self.waiting.load(Ordering::Acquire) > 0 {
            drop(state);
            self.wake();
            state = self.state();
        }
        if state.reaping {
            return;
        }
        // The first idle connection since the reaper last stopped: start it (outside a runtime
        // there is none to run it on; the next connection put back tries again).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            state.reaping = true;
            drop(state);
            let every = (self.limits.idle / REAPS)
                .min(RELEASE_AFTER)
                .max(Duration::from_millis(10));
            runtime.spawn(reap(Arc::downgrade(self), every));
        }
    }

    /// Drops the idle connections older than the idle limit, and those the upstream closed.
    /// Whether any is left (when none is, the reaper stops).
    fn reap_idle(&self) -> bool {
        let mut reaped = Vec::new();
        let mut state = self.state();
        let now = Instant::now();
        for map in &mut state.idle {
            map.retain(|_, list| {
                let mut i = 0;
                while i < list.len() {
                    let idle = &mut list[i];
                    let rested = now.saturating_duration_since(idle.since);
                    if rested < self.limits.idle && idle.conn.is_usable() {
                        if rested >= RELEASE_AFTER {
                            idle.conn.release_buffers();
                        }
                        i += 1;
                    } else {
                        reaped.push(list.remove(i));
                    }
                }
                !list.is_empty()
            });
        }
        let left = state.idle.iter().any(|map| !map.is_empty());
        state.reaping = left;
        drop(state);
        if !reaped.is_empty() {
            tracing::debug!(
                closed = reaped.len(),
                "idle upstream connections past the pool's idle limit or closed by the upstream"
            );
        }
        left
    }
}

/// The reaper: every `every`, the pool's idle connections past their limit are closed; it ends
/// when the pool is gone or has no idle connection left.
async fn reap(pool: Weak<Pool>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match pool.upgrade() {
            Some(pool) if pool.reap_idle() => {}
            _ => return,
        }
    }
}

/// An HTTP/1.1 request, encoded, with its body.
struct Exchange {
    head: Zeroizing<Vec<u8>>,
    to_head: bool,
    pump: Pump,
}

impl Exchange {
    fn new(parts: &http::request::Parts, body: UpstreamBody, key: &Key) -> Exchange {
        let framing = RequestFraming::of(&parts.method, &body);
        Exchange {
            head: h1::encode_head(parts, key.authority.as_str(), framing),
            to_head: parts.method == Method::HEAD,
            pump: Pump::new(body, framing),
        }
    }
}

/// RFC 9110 section 9.2.2: a request a proxy may send again when its connection failed under it.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// What [`Pool::on_shared_h2`] did with a request.
enum OnShared {
    Answered(Response<ResponseBody>),
    /// No shared h2 connection took it.
    Back(Request<UpstreamBody>),
}

/// An h2 answer, with its hop-by-hop headers gone and its body bounded by `body_timeout`.
fn from_h2(
    resp: Response<Incoming>,
    to_head: bool,
    body_timeout: Duration,
) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    hop_by_hop::strip_response(&mut parts.headers, to_head);
    Response::from_parts(parts, ResponseBody::H2(Stall::answer(body, body_timeout)))
}

/// An h2 exchange's failure: the client's, when its upload stalled (hyper says only that the
/// stream was reset).
fn h2_error(e: hyper::Error, stalled: &AtomicBool, body_timeout: Duration) -> SendError {
    if stalled.load(Ordering::Relaxed) {
        SendError::H1(H1Error::ClientStalled(
            body_timeout.min(h1::MAX_BODY_TIMEOUT),
        ))
    } else {
        SendError::H2(e)
    }
}

/// A copy of a request's head, to send it again ([`super::replay`]).
fn head_of<B>(req: &Request<B>) -> http::request::Parts {
    let mut copy = Request::new(());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy.into_parts().0
}

/// h2: an absolute URI (`:scheme`, `:authority`), no `Host`; the upload bounded by
/// `body_timeout`. Returns what says whether the upload stalled.
fn for_h2(
    req: &mut Request<UpstreamBody>,
    key: &Key,
    body_timeout: Duration,
) -> (Arc<AtomicBool>, Arc<Sent>) {
    let upload = Stall::upload(
        std::mem::replace(req.body_mut(), body::empty()),
        body_timeout,
    );
    let stalled = upload.fired.clone();
    let sent = upload.sent.clone().unwrap_or_default();
    *req.body_mut() = BodyExt::boxed_unsync(upload);
    req.headers_mut().remove(http::header::HOST);
    if req.uri().authority().is_none() {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let scheme = if key.https {
            UriScheme::HTTPS
        } else {
            UriScheme::HTTP
        };
        if let Ok(uri) = Uri::builder()
            .scheme(scheme)
            .authority(key.authority.clone())
            .path_and_query(pq)
            .build()
        {
            *req.uri_mut() = uri;
        }
    }
    *req.version_mut() = Version::HTTP_2;
    (stalled, sent)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::destination::AddressPolicy;
    use crate::upstream::dial::{tls_config, MaybeTls};

    #[test]
    fn a_failure_says_each_cause_once() {
        // SendError and H1Error each only wrap the io::Error: its text was said three times.
        let e = SendError::H1(H1Error::Io(std::io::Error::other("reset by peer")));
        assert_eq!(
            e.describe(),
            "the upstream connection failed: reset by peer"
        );
        let e = SendError::H1(H1Error::Closed);
        assert_eq!(
            e.describe(),
            "the upstream connection failed: the upstream closed the connection before it answered"
        );
    }

    fn pool(idle: Duration) -> Arc<Pool> {
        let dialer = Dialer::new(
            AddressPolicy::new(Vec::new()),
            HashMap::new(),
            Arc::new(tls_config(&[]).unwrap()),
            Duration::from_secs(5),
        );
        let body = Duration::from_secs(60);
        Pool::new(dialer, Limits { idle, body })
    }

    /// A connection on loopback, as the pool holds it, and the upstream's end of it.
    async fn connection() -> (H1Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (theirs, _) = listener.accept().await.unwrap();
        let conn = H1Conn::new(MaybeTls::Plain(ours), Duration::from_secs(60));
        (conn, theirs)
    }

    fn key() -> Key {
        Key {
            https: false,
            authority: Authority::from_static("upstream.test:80"),
            tenant: Tenant::new(Arc::from("tenant-a"), 1),
        }
    }

    /// An idle connection goes back only to requests of the tenant (connection and version)
    /// it was lent to; the least recently used makes room when the host's list is full.
    #[tokio::test]
    async fn an_idle_connection_is_lent_only_to_its_tenant() {
        let pool = pool(Duration::from_secs(90));
        let a = key();
        let with = |id: &str, version| Key {
            tenant: Tenant::new(Arc::from(id), version),
            ..key()
        };
        let (conn, _upstream) = connection().await;
        pool.put(a.clone(), conn);
        let now = Instant::now();
        assert!(pool.take_idle(&with("tenant-b", 1), now).is_none());
        // A rotated key is another tenant too.
        assert!(pool.take_idle(&with("tenant-a", 2), now).is_none());
        // The same ID in another allocation is the same tenant.
        let conn = pool
            .take_idle(&with("tenant-a", 1), now)
            .expect("its own tenant's");
        pool.put(a.clone(), conn);

        // Full: the least recently used goes, whoever's it was.
        let mut upstreams = Vec::new();
        for i in 1..MAX_IDLE_PER_HOST {
            let (conn, upstream) = connection().await;
            upstreams.push(upstream);
            pool.put(with(&format!("t{i}"), 1), conn);
        }
        let (conn, _b) = connection().await;
        pool.put(with("tenant-b", 1), conn);
        assert_eq!(
            pool.state().idle[0]["upstream.test:80"].len(),
            MAX_IDLE_PER_HOST
        );
        assert!(pool.take_idle(&a, now).is_none(), "the oldest was kept");
        assert!(pool.take_idle(&with("tenant-b", 1), now).is_some());
        assert!(pool.take_idle(&with("t1", 1), now).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_resting_in_the_pool_lets_go_of_its_read_buffer() {
        let pool = pool(Duration::from_secs(90));
        let (mut conn, _upstream) = connection().await;
        // A connection that has read (an answer): its buffer is grown.
        assert!(conn.is_usable());
        assert!(conn.buffer_capacity() >= 16 * 1024);
        pool.put(key(), conn);
        let held = |pool: &Pool| {
            pool.state().idle[0]["upstream.test:80"][0]
                .conn
                .buffer_capacity()
        };
        assert!(held(&pool) >= 16 * 1024);
        // Still held just before a second's rest; let go after it, the connection kept.
        tokio::time::sleep(RELEASE_AFTER - Duration::from_millis(100)).await;
        assert!(held(&pool) >= 16 * 1024);
        tokio::time::sleep(RELEASE_AFTER).await;
        assert_eq!(held(&pool), 0);
        let mut conn = pool.take_idle(&key(), Instant::now()).unwrap();
        // Usable as before: its next read allocates again.
        assert!(conn.is_usable());
        assert!(conn.buffer_capacity() >= 16 * 1024);
    }

    /// Whether, within `looks` looks of the reaper (`every` apart, on the paused clock), no
    /// task but the test's own is alive.
    async fn reaper_gone(every: Duration, looks: usize) -> bool {
        let metrics = tokio::runtime::Handle::current().metrics();
        for _ in 0..looks {
            if metrics.num_alive_tasks() == 0 {
                return true;
            }
            tokio::time::sleep(every).await;
        }
        metrics.num_alive_tasks() == 0
    }

    /// What [`Pool::dial_or_wait`] decided for `key`, and how long (on the paused clock) it
    /// took to.
    async fn turn(pool: &Arc<Pool>, key: &Key) -> (&'static str, Duration) {
        let start = Instant::now();
        let turn = match pool.dial_or_wait(key).await {
            Turn::Dial(Some(_)) => "dial with a slot",
            Turn::Dial(None) => "dial with no slot",
            Turn::Again => "look again",
        };
        (turn, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_whose_connections_do_not_come_back_is_not_held_by_the_dial_limit() {
        let pool = pool(Duration::from_secs(60));
        let key = key();
        pool.state().dialing[0].insert(key.authority.as_str().into(), MAX_DIALS_PER_HOST);

        // Every slot taken: a request waits for a connection to come back, then dials.
        assert_eq!(turn(&pool, &key).await, ("dial with no slot", DIAL_WAIT));

        // The host's last answer closed its connection: nothing will come back, no wait.
        pool.closes(&key);
        assert_eq!(
            turn(&pool, &key).await,
            ("dial with no slot", Duration::ZERO)
        );

        // A request already waiting when that is learnt stops waiting and dials.
        pool.state().closing[0].clear();
        let (waited, ()) = tokio::join!(turn(&pool, &key), async {
            tokio::time::sleep(DIAL_WAIT / 4).await;
            pool.closes(&key);
        });
        assert_eq!(waited, ("dial with no slot", DIAL_WAIT / 4));

        // Another tenant's connection coming back neither ends the wait nor extends it; one of
        // the waiting request's own tenant ends it.
        pool.state().closing[0].clear();
        let (mut theirs, mut ours) = (Vec::new(), Vec::new());
        let (waited, ()) = tokio::join!(turn(&pool, &key), async {
            for _ in 0..3 {
                tokio::time::sleep(DIAL_WAIT / 2).await;
                let (conn, upstream) = connection().await;
                theirs.push(upstream);
                let other = Key {
                    tenant: Tenant::new(Arc::from("tenant-b"), 1),
                    ..key.clone()
                };
                pool.put(other, conn);
            }
        });
        assert_eq!(waited, ("dial with no slot", DIAL_WAIT));
        let (waited, ()) = tokio::join!(turn(&pool, &key), async {
            tokio::time::sleep(DIAL_WAIT / 4).await;
            let (conn, upstream) = connection().await;
            ours.push(upstream);
            pool.put(key.clone(), conn);
        });
        assert_eq!(waited, ("look again", DIAL_WAIT / 4));
        assert!(pool.take_idle(&key, Instant::now()).is_some());

        // One of its connections put back: the host is waited for again.
        let (conn, _upstream) = connection().await;
        pool.put(key.clone(), conn);
        assert!(pool.take_idle(&key, Instant::now()).is_some());
        assert_eq!(turn(&pool, &key).await, ("dial with no slot", DIAL_WAIT));
        // And other hosts never were held.
        let other = Key {
            https: true,
            ..key.clone()
        };
        assert_eq!(
            turn(&pool, &other).await,
            ("dial with a slot", Duration::ZERO)
        );
    }

    /// An upstream on loopback that answers the requests it reads with `answers`, in turn, one
    /// connection at a time: a connection is closed after an answer saying `Connection: close`.
    async fn answering(answers: &'static [&'static [u8]]) -> std::net::SocketAddr {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            for answer in answers {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    if conn.read(&mut byte).await.unwrap() == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                conn.write_all(answer).await.unwrap();
                if answer.windows(17).any(|w| w == b"Connection: close") {
                    drop(conn);
                    conn = listener.accept().await.unwrap().0;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_answer_that_closes_its_connection_marks_its_host_until_one_comes_back() {
        let addr = answering(&[
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ])
        .await;
        let dialer = Dialer::new(
            AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]),
            HashMap::new(),
            Arc::new(tls_config(&[]).unwrap()),
            Duration::from_secs(5),
        );
        let limits = Limits {
            idle: Duration::from_secs(60),
            body: Duration::from_secs(60),
        };
        let pool = Pool::new(dialer, limits);
        let host = addr.to_string();
        let marked = |pool: &Arc<Pool>| pool.state().closing[0].contains_key(host.as_str());
        for (n, closes) in [(1, true), (2, false)] {
            let req = Request::get(format!("http://{addr}/{n}"))
                .body(body::empty())
                .unwrap();
            let resp = pool
                .send(req, key().tenant, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
            assert_eq!(marked(&pool), closes, "after answer {n}");
        }
        assert_eq!(pool.state().idle[0][host.as_str()].len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_reaper_runs_while_connections_are_idle_and_ends_with_the_pool() {
        let idle = Duration::from_secs(3600);
        let every = idle / REAPS;
        let pool = pool(idle);
        let alive = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };

        // An idle connection starts the reaper, which closes it once it is past the limit
        // (the upstream reads the end of the connection), then stops, with nothing to do.
        let (conn, mut upstream) = connection().await;
        pool.put(key(), conn);
        assert_eq!(alive(), 1);
        assert_eq!(upstream.read(&mut [0u8; 1]).await.unwrap(), 0);
        assert!(pool.state().idle[0].is_empty());
        assert!(
            reaper_gone(every, 1).await,
            "the reaper runs on, with nothing to do"
        );

        // The next one starts it again; dropping the pool ends it at its next look (it holds
        // the pool weakly), long before the connection would have been past the limit.
        let (conn, _upstream) = connection().await;
        pool.put(key(), conn);
        assert_eq!(alive(), 1);
        drop(pool);
        assert!(reaper_gone(every, 2).await, "the reaper outlived its pool");
    }
}
