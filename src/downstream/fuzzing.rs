//! latchkey's own HTTP/1.1 server against hyper's, on the same bytes (cargo feature `fuzzing`
//! for the `downstream_differential` fuzz target, and the unit tests; not part of latchkey's
//! API).
//!
//! Both servers read through [`Strict`] as they do in latchkey, with the same service: it
//! records each request (method, target, version, every header in order, the body) and answers
//! `200`. The bytes are sent whole, then the client's side is closed. The two records must be
//! the same, request for request: a request one server reads and the other does not, or reads
//! otherwise, is a difference. A body is compared by its bytes when it was read whole, and
//! otherwise only in that it failed (the two servers word the failure differently).
//!
//! Time is the runtime's paused clock: a run that would wait for ever ends at once at the
//! bound, the same way each time.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use super::{serve, Outcome};
use crate::body::{full, BoxBody, ClientBody};
use crate::idle::Activity;
use crate::release::Lease;
use crate::strict::{Link, Strict};

/// What a server's service saw of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body's bytes, or `None` when reading it failed.
    pub body: Option<Vec<u8>>,
}

/// A runtime as the comparison wants it: one thread, its clock paused.
pub fn runtime() -> Option<Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .ok()
}

/// Both servers on `input`; `Err` describes how they differ.
pub fn compare(rt: &Runtime, input: &[u8]) -> Result<Vec<Seen>, String> {
    let theirs = run(rt, input, false);
    let ours = run(rt, input, true);
    if theirs == ours {
        return Ok(ours);
    }
    Err(format!(
        "the servers read {input:?} differently\nhyper:    {theirs:?}\nlatchkey: {ours:?}"
    ))
}

/// One server (`own`: latchkey's, else hyper's) on `input`: what its service saw.
pub fn run(rt: &Runtime, input: &[u8], own: bool) -> Vec<Seen> {
    let input = input.to_vec();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(input.len() + 64 * 1024);
        let link = Link::new();
        let strict = Strict::new(server, link.clone(), Duration::from_secs(10));
        let handler = move |req: Box<Request<ClientBody>>| {
            let record = record.clone();
            let link = link.clone();
            crate::proxy::checked(link, req, move |req| async move {
                Ok::<_, Infallible>(answer(&record, *req).await)
            })
        };
        let serve = async move {
            if own {
                own_server(strict, &handler).await;
            } else {
                hyper_server(strict, handler).await;
            }
        };
        let (mut reader, mut writer) = tokio::io::split(client);
        let send = async move {
            let _ = writer.write_all(&input).await;
            let _ = writer.shutdown().await;
            writer
        };
        let drain = async move {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink).await;
        };
        let all = tokio::time::timeout(Duration::from_secs(60), async {
            tokio::join!(send, serve, drain)
        });
        let _ = all.await;
    });
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    seen
}

/// Records the request and answers `200`.
async fn answer(record: &Mutex<Vec<Seen>>, req: Request<ClientBody>) -> Response<BoxBody> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.ok().map(|b| b.to_bytes().to_vec());
    let headers = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    if let Ok(mut seen) = record.lock() {
        seen.push(Seen {
            method: parts.method.to_string(),
            target: parts.uri.to_string(),
            version: format!("{:?}", parts.version),
            headers,
            body,
        });
    }
    Response::new(full("ok"))
}

/// latchkey's server, and hyper's after a hand-over, as `server::serve_own` runs them.
async fn own_server<H, F>(mut strict: Strict<DuplexStream>, handler: &H)
where
    H: Fn(Box<Request<ClientBody>>) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = Result<Response<BoxBody>, Infallible>> + Send + 'static,
{
    let (_stop_tx, mut stop) = watch::channel(());
    let mut buf = BytesMut::new();
    let bad = |_: &'static str| crate::proxy::not_strict("does not parse");
    if let Outcome::Hyper = serve(&mut strict, &mut buf, handler, bad, &mut stop).await {
        let lease = Lease::handed_over(strict, Activity::new(), buf.freeze());
        let handler = handler.clone();
        let service =
            service_fn(move |req: Request<Incoming>| handler(Box::new(req.map(ClientBody::from))));
        let _ = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(TokioIo::new(lease), service)
            .with_upgrades()
            .await;
    }
}

/// hyper's server, as latchkey runs it (after the client closes its side, it still answers
/// what came before).
async fn hyper_server<H, F>(strict: Strict<DuplexStream>, handler: H)
where
    H: Fn(Box<Request<ClientBody>>) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = Result<Response<BoxBody>, Infallible>> + Send + 'static,
{
    let service =
        service_fn(move |req: Request<Incoming>| handler(Box::new(req.map(ClientBody::from))));
    let _ = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .serve_connection(TokioIo::new(strict), service)
        .with_upgrades()
        .await;
}
