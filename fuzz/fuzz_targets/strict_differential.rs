//! latchkey's strict request framing (`src/strict.rs`) against hyper's HTTP/1.1 server, which
//! sits behind it: a request strict lets through must reach hyper as strict read it.
//!
//! Input: the bytes a client sends before it closes its side. `strict::check` gives the bytes
//! that pass; what passed is read as requests on its own (each head with `httparse`, each body
//! by its framing). hyper's server (`hyper::server::conn::http1`, over an in-memory pipe) reads
//! the same bytes, unfiltered, and a service records each request's method, target, headers and
//! body and answers 200.
//!
//! A finding (a panic, which AFL keeps as a crash) is a request that strict passed whole that
//! hyper refuses or reads differently: another method, target or body, or requests cut at other
//! places (hyper has a request strict does not, among those strict passed). The comparison
//! stops after a request that ends the connection (`Connection: close`, HTTP/1.0 without
//! keep-alive: hyper reads nothing after it; strict checks on) or asks for an upgrade
//! (CONNECT, `Upgrade`: hyper hands the connection over after a 200 to a CONNECT).
//!
//! Allowed, one way only, is strict refusing what hyper reads, as it does on purpose:
//! - a bare LF or a bare CR as a line end (head, chunk-size line, after chunk data, trailers);
//! - obs-fold: a header or trailer line that starts with a space or a tab;
//! - a control character (other than HTAB) in a chunk extension;
//! - `Content-Length` beside `Transfer-Encoding`; two `Content-Length` headers, equal or not;
//!   a `Content-Length` that is not digits alone;
//! - a `Transfer-Encoding` other than `chunked` alone (`gzip, chunked`, two headers), or in
//!   HTTP/1.0;
//! - two `Host` headers;
//! - more than 8 empty lines before a request line; a chunk-size line over 4 KiB;
//! - a trailer name that is not a token, or a value with a control character.
//!
//! Those need no list here: strict refusing is never a finding. Nor is hyper refusing what
//! strict refused, or reading requests after a refusal (the connection ends there).
//!
//! One divergence the other way is allowed, not being one of framing: a request target that
//! `http::Uri` does not parse, which strict passes as httparse does (`chunked/`, `%after`,
//! `HT/after`): hyper answers `400` and ends the connection, having read no request from it,
//! so the comparison stops there. A target hyper does take is compared as hyper gives it on
//! (`/v#` becomes `/v`, `x://4` becomes `x://4/`).
//!
//! A run that would wait for ever (it should not: the client's side is closed) is cut off
//! through the runtime's paused clock, not the wall clock.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use latchkey::strict;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

#[path = "shared/walk.rs"]
mod walk;

/// Inputs beyond this are cut: small requests find the framing bugs, and runs stay fast.
const MAX_INPUT: usize = 16 * 1024;

/// What hyper's service saw of one request.
#[derive(Debug)]
struct Seen {
    method: String,
    target: String,
    body: Result<Vec<u8>, String>,
}

fn main() {
    // Time stands still and jumps ahead when every task waits: nothing here waits on a clock.
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    else {
        return;
    };
    afl::fuzz(true, |data: &[u8]| {
        let input = &data[..data.len().min(MAX_INPUT)];
        let verdict = strict::check(input);
        let passed = walk::walk(&input[..verdict.passed]);
        let seen = hyper(&rt, input);
        for (i, read) in passed.iter().enumerate() {
            if !read.whole {
                break;
            }
            // hyper takes the target as an `http::Uri`: one that does not parse is a `400` and
            // the end of the connection; one that does is compared as hyper gives it on (a
            // fragment dropped, `/` after an authority).
            let Ok(target) = read.target.parse::<http::Uri>() else {
                assert!(
                    seen.len() <= i,
                    "difference from hyper: hyper read a target it cannot parse"
                );
                return;
            };
            let Some(theirs) = seen.get(i) else {
                panic!(
                    "difference from hyper: strict passed request {i} whole, hyper did not read it\n\
                     strict: {passed:?}\nhyper:  {seen:?}"
                );
            };
            let same = theirs.method == read.method
                && theirs.target == target.to_string()
                && theirs.body.as_deref() == Ok(read.body.as_slice());
            assert!(
                same,
                "difference from hyper: hyper read request {i} otherwise\nstrict: {read:?}\nhyper:  {theirs:?}"
            );
            if read.upgrade() || read.last() {
                return;
            }
        }
        // Every request strict passed was whole and the rest was refused or an unfinished
        // head: hyper must not have found a request inside what strict passed.
        let all_whole = passed.iter().all(|r| r.whole);
        if all_whole && verdict.stop.is_none() {
            assert!(
                seen.len() <= passed.len(),
                "difference from hyper: hyper read more requests than strict passed\nstrict: {passed:?}\nhyper:  {seen:?}"
            );
        }
    });
}

/// hyper's server on `input`, sent whole and then closed: each request it handed the service.
fn hyper(rt: &Runtime, input: &[u8]) -> Vec<Seen> {
    let input = input.to_vec();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(MAX_INPUT + 4096);
        let service = service_fn(move |req: Request<Incoming>| {
            let record = record.clone();
            async move {
                let method = req.method().to_string();
                let target = req.uri().to_string();
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes().to_vec())
                    .map_err(|e| e.to_string());
                if let Ok(mut seen) = record.lock() {
                    seen.push(Seen {
                        method,
                        target,
                        body,
                    });
                }
                Response::builder().status(200).body(Empty::<Bytes>::new())
            }
        });
        // The client closes its side after sending: hyper must still answer what came before
        // (else it drops the request whose read met the end, service and all).
        let conn = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .serve_connection(TokioIo::new(server), service);
        let (mut reader, mut writer) = tokio::io::split(client);
        let send = async move {
            let _ = writer.write_all(&input).await;
            let _ = writer.shutdown().await;
            // Kept open for reading until hyper is done.
            writer
        };
        let drain = async move {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink).await;
        };
        let serve = async move {
            let _ = conn.await;
        };
        // Paused time jumps to this deadline as soon as every task waits: a run that would
        // wait for ever ends at once, the same way each time.
        let all = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            tokio::join!(send, serve, drain)
        });
        let _ = all.await;
    });
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()));
    seen
}
