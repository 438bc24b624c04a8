//! The upstream connection pool: one per proxy worker, keyed by scheme and authority.
//!
//! It replaces hyper-util's general-purpose client on the hot path, which paid three SipHash
//! lookups, a pool lock and a client clone per request. Here an HTTP/1.1 connection is taken
//! from its host's idle list (most recently used first), the request is sent with
//! `try_send_request` (so a request that never left because the upstream had just closed the
//! connection is sent again on another one, as hyper-util's client does), and the connection
//! goes back to the list only when its response body has been read to the end ([`Pooled`]).
//! An h2 connection is shared by every request to its host. Requests to HTTP/1.1 upstreams go
//! in origin form with a `Host` header; to h2 upstreams, with `:authority` and `:scheme`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme as UriScheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use super::upstream::{DialError, Dialer, UpstreamBody};

/// How long an idle connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1.1 connections kept per host, per worker: enough for a worker's share of a few
/// hundred concurrent requests, few enough that a burst does not leave thousands open.
const MAX_IDLE_PER_HOST: usize = 64;

/// Why a request could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Dial(#[from] DialError),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("the upstream URL has no host")]
    NoAuthority,
}

impl SendError {
    /// The message with the chain of causes (hyper's errors say little at the top level).
    pub fn describe(&self) -> String {
        let mut message = String::from("the upstream connection failed");
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            message.push_str(": ");
            message.push_str(&e.to_string());
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
}

type ByHost<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

struct Idle {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

/// Per scheme (index 0: http, 1: https), per authority.
#[derive(Default)]
struct State {
    idle: [ByHost<Vec<Idle>>; 2],
    h2: [ByHost<http2::SendRequest<UpstreamBody>>; 2],
}

/// The pool. Cheap to share; a worker's requests all use its own.
pub struct Pool {
    dialer: Dialer,
    state: Mutex<State>,
}

/// An HTTP/1.1 connection lent to one response; [`Pooled::release`] returns it once the
/// response body has ended. Dropped instead (an unfinished body), the connection is closed.
pub struct Pooled {
    pool: Weak<Pool>,
    key: Key,
    sender: http1::SendRequest<UpstreamBody>,
}

impl Pooled {
    pub fn release(self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.put(self.key, self.sender);
        }
    }
}

impl Pool {
    pub fn new(dialer: Dialer) -> Arc<Pool> {
        Arc::new(Pool {
            dialer,
            state: Mutex::new(State::default()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Sends a request whose URI is absolute (scheme and authority name the upstream).
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Option<Pooled>), SendError> {
        let key = Key {
            https: req.uri().scheme() == Some(&UriScheme::HTTPS),
            authority: req
                .uri()
                .authority()
                .cloned()
                .ok_or(SendError::NoAuthority)?,
        };

        if let Some(mut sender) = self.shared_h2(&key) {
            for_h2(&mut req, &key);
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, None)),
                Err(mut e) => match e.take_message() {
                    Some(back) => {
                        self.state().h2[usize::from(key.https)].remove(key.authority.as_str());
                        req = back;
                    }
                    None => return Err(e.into_error().into()),
                },
            }
        }

        while let Some(mut sender) = self.take_idle(&key) {
            if let Err(e) = sender.ready().await {
                tracing::debug!(error = %e, "a pooled upstream connection was not usable");
                continue;
            }
            for_h1(&mut req, &key);
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Some(self.lend(key, sender)))),
                // Not sent: the connection had closed. Another one gets it.
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(e.into_error().into()),
                },
            }
        }

        // Dialing (DNS, TCP, TLS, the HTTP handshake) is the large part of this future and the
        // rare one: boxed, it is allocated only when it runs, and every proxied request's
        // future (kept per client connection by hyper) stays small.
        Box::pin(self.connect_and_send(key, req)).await
    }

    async fn connect_and_send(
        self: &Arc<Self>,
        key: Key,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Option<Pooled>), SendError> {
        tracing::debug!(authority = %key.authority, "opening an upstream connection");
        let io = self.dialer.dial(key.https, &key.authority).await?;
        if io.is_h2() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(TokioIo::new(io))
                .await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
            });
            self.state().h2[usize::from(key.https)]
                .insert(key.authority.as_str().into(), sender.clone());
            let mut sender = sender;
            for_h2(&mut req, &key);
            return Ok((sender.send_request(req).await?, None));
        }
        let (mut sender, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        for_h1(&mut req, &key);
        let resp = sender.send_request(req).await?;
        Ok((resp, Some(self.lend(key, sender))))
    }

    fn lend(self: &Arc<Self>, key: Key, sender: http1::SendRequest<UpstreamBody>) -> Pooled {
        Pooled {
            pool: Arc::downgrade(self),
            key,
            sender,
        }
    }

    fn shared_h2(&self, key: &Key) -> Option<http2::SendRequest<UpstreamBody>> {
        let mut state = self.state();
        let map = &mut state.h2[usize::from(key.https)];
        if map.is_empty() {
            return None;
        }
        match map.get(key.authority.as_str()) {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                map.remove(key.authority.as_str());
                None
            }
            None => None,
        }
    }

    fn take_idle(&self, key: &Key) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut state = self.state();
        let list = state.idle[usize::from(key.https)].get_mut(key.authority.as_str())?;
        let now = Instant::now();
        while let Some(idle) = list.pop() {
            if !idle.sender.is_closed() && now.saturating_duration_since(idle.since) < IDLE_TIMEOUT
            {
                return Some(idle.sender);
            }
        }
        None
    }

    fn put(&self, key: Key, sender: http1::SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            tracing::debug!("an upstream connection closed before it could be reused");
            return;
        }
        let mut state = self.state();
        let map = &mut state.idle[usize::from(key.https)];
        let list = match map.get_mut(key.authority.as_str()) {
            Some(list) => list,
            None => map.entry(key.authority.as_str().into()).or_default(),
        };
        if list.len() < MAX_IDLE_PER_HOST {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// HTTP/1.1: origin-form target and a `Host` header.
fn for_h1(req: &mut Request<UpstreamBody>, key: &Key) {
    if let Ok(host) = HeaderValue::from_str(key.authority.as_str()) {
        req.headers_mut().insert(http::header::HOST, host);
    }
    if req.uri().authority().is_some() {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
    }
    *req.version_mut() = Version::HTTP_11;
}

/// h2: an absolute URI (`:scheme`, `:authority`), no `Host`.
fn for_h2(req: &mut Request<UpstreamBody>, key: &Key) {
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
}
