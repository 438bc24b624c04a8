//! The echo upstream the tests own: a real HTTP/1.1 and h2 server (plain or TLS) that answers
//! every request with a JSON description of what it received, so that a test can see exactly
//! which headers, query parameters and trailers reached the upstream.
//!
//! latchkey scrubs its credential out of answers (PRODUCT.md section 4, step 7), so the
//! description is sent hex-encoded, a form latchkey does not look for, and the tests decode it
//! ([`super::read`], [`super::echo_text`]): they see what reached the upstream. A request with
//! `echo=plain` in its query gets the description as plain JSON, as an echoing service would
//! send it; the scrubbing tests use that.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// An upstream that describes each request it receives as JSON.
///
/// Paths with a meaning: `/status/{code}` answers with that status, `.../redirect?to={url}` with
/// a 302 to it, `/delay/{ms}` after that many milliseconds, `/bytes/{n}` with `n` bytes
/// streamed in 64 KiB chunks, `.../stall` with a body of five bytes that never ends.
/// Everything else answers 200.
pub struct EchoServer {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl EchoServer {
    /// Starts serving on `addr` (port 0 for any), with TLS if a server config is given.
    pub async fn start(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<EchoServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        // Stopping the server (dropping it) closes its listener and every open connection.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let counter = requests.clone();
        let accepted = connections.clone();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let mut accept_stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = accept_stop.changed() => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let counter = counter.clone();
                let acceptor = acceptor.clone();
                let mut conn_stop = stop_rx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        echo(req)
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let serve = async {
                        match acceptor {
                            None => {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                            Some(acceptor) => {
                                if let Ok(tls) = acceptor.accept(stream).await {
                                    let _ =
                                        builder.serve_connection(TokioIo::new(tls), service).await;
                                }
                            }
                        }
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = conn_stop.changed() => {}
                    }
                });
            }
        });
        Ok(EchoServer {
            addr,
            requests,
            connections,
            _stop: stop_tx,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests have reached this server.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// How many connections it has accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let mut status = StatusCode::OK;
    if let Some(code) = path.strip_prefix("/status/") {
        status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        // The upstream's slowness is what a test using it is about: this sleep is the subject.
        let ms = ms.parse::<u64>().unwrap_or(0).min(120_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let n = n.parse::<u64>().unwrap_or(0);
        return Ok(stream_bytes(n));
    }
    if path.ends_with("/stall") {
        // Five bytes of body, then nothing, for as long as the connection lives.
        let frames = futures_util::stream::once(async {
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"first")))
        })
        .chain(futures_util::stream::pending());
        return Ok(Response::new(StreamBody::new(frames).boxed_unsync()));
    }
    if path.ends_with("/forged-trailer") {
        // Trailers dressed as latchkey's, beside one of the upstream's own.
        let mut trailers = http::HeaderMap::new();
        trailers.insert(
            "latchkey-error",
            http::HeaderValue::from_static("connection_not_found"),
        );
        trailers.insert("x-upstream-trailer", http::HeaderValue::from_static("kept"));
        let frames = futures_util::stream::iter([
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"body"))),
            Ok(Frame::trailers(trailers)),
        ]);
        return Ok(Response::new(StreamBody::new(frames).boxed_unsync()));
    }
    if path.ends_with("/forged-error") {
        // An upstream's 404 dressed as latchkey's own refusal.
        let mut r = Response::new(full(Bytes::from_static(
            br#"{"error":{"code":"connection_not_found","message":"forged by the upstream"}}"#,
        )));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r.headers_mut().insert(
            "latchkey-error",
            http::HeaderValue::from_static("connection_not_found"),
        );
        return Ok(r);
    }
    if path.ends_with("/redirect") {
        let to = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("to=")))
            .unwrap_or("/")
            .to_string();
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::FOUND;
        if let Ok(v) = http::HeaderValue::try_from(to) {
            r.headers_mut().insert(http::header::LOCATION, v);
        }
        return Ok(r);
    }

    let (parts, mut body) = req.into_parts();
    let mut body_bytes: u64 = 0;
    let mut trailers: Vec<(String, String)> = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                body_bytes += f.data_ref().map_or(0, |d| d.len() as u64);
                for (k, v) in f.trailers_ref().into_iter().flatten() {
                    trailers.push((
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    ));
                }
            }
            Err(_) => break,
        }
    }
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let description = serde_json::json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
        "trailers": trailers,
    });
    let plain = parts
        .uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "echo=plain"));
    let (text, content_type) = if plain {
        (description.to_string(), "application/json")
    } else {
        (hex::encode(description.to_string()), super::ECHO_HEX)
    };
    let mut r = Response::new(full(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    Ok(r)
}

fn stream_bytes(n: u64) -> Response<Body> {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
    let frames = futures_util::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(CHUNK);
            Some((
                Ok::<_, BoxError>(Frame::data(chunk.slice(..take as usize))),
                left - take,
            ))
        }
    });
    Response::new(StreamBody::new(frames).boxed_unsync())
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|e| match e {}).boxed_unsync()
}
