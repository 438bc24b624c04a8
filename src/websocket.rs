//! WebSocket upgrades: a handshake that went through the request path like any request (client,
//! connection, host and port, strip, the credential injected) is sent to the upstream on a
//! connection of its own, and once the upstream answers 101 the two upgraded streams are
//! spliced both ways until either side closes.
//!
//! - HTTP/1.1 (`GET` with `Upgrade: websocket` and `Connection: upgrade`): the upstream's 101 is
//!   passed on with its `Upgrade`, `Connection` and `Sec-WebSocket-Accept`, `-Protocol` and
//!   `-Extensions` headers, and no other.
//! - h2 extended CONNECT (RFC 8441, `:protocol websocket`): sent upstream as an HTTP/1.1
//!   upgrade with a key of latchkey's own; the upstream's `Sec-WebSocket-Accept` is checked and
//!   the client gets 200, its h2 stream spliced to the upgraded connection.
//!
//! The upstream connection is dialled by the proxy's [`Dialer`] (the address check on the
//! dialled address, TLS verified) with ALPN `http/1.1` only, and never pooled: it belongs to
//! this WebSocket. Any answer but 101 goes back as an ordinary response. The request timeout
//! bounds the handshake, not the WebSocket: an open one lasts until a side closes it.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Empty;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use crate::body::{LineAtClose, PendingLog};
use crate::hop_by_hop;
use crate::idle::{Counts, Watched};
use crate::telemetry;
use crate::upstream::dial::Dialer;
use crate::upstream::pool::{ResponseBody, SendError};

/// The key the RFC 6455 handshake hashes with the client's `Sec-WebSocket-Key`.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// How a client asked for a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// HTTP/1.1 `GET` with `Upgrade: websocket`; answered 101.
    Upgrade,
    /// h2 extended CONNECT with `:protocol websocket`; answered 200.
    ExtendedConnect,
}

/// Whether `parts` asks for a WebSocket, and how. Any other `Upgrade` (h2c and the like) is
/// not honoured: the rewrite strips it as a hop-by-hop header.
pub fn asks(parts: &http::request::Parts) -> Option<Ask> {
    ask(
        parts.version,
        &parts.method,
        &parts.headers,
        &parts.extensions,
    )
}

/// [`asks`], of a whole request.
pub fn request_asks<B>(req: &http::Request<B>) -> Option<Ask> {
    ask(req.version(), req.method(), req.headers(), req.extensions())
}

fn ask(
    version: Version,
    method: &Method,
    headers: &HeaderMap,
    extensions: &http::Extensions,
) -> Option<Ask> {
    if version == Version::HTTP_11
        && method == Method::GET
        && has_token(headers, &header::UPGRADE, "websocket")
        && has_token(headers, &header::CONNECTION, "upgrade")
    {
        return Some(Ask::Upgrade);
    }
    if version == Version::HTTP_2
        && method == Method::CONNECT
        && extensions
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
    {
        return Some(Ask::ExtendedConnect);
    }
    None
}

/// Whether a comma-separated header holds `token` (case-insensitive) in any of its values.
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// The client's side of the upgrade, taken from its request before the rewrite.
pub struct ClientSide {
    ask: Ask,
    on_upgrade: OnUpgrade,
}

impl ClientSide {
    /// Takes the client's upgrade out of a request that [`asks`] for a WebSocket; `None` when
    /// the server that read it cannot upgrade it (then it is served as an ordinary request).
    pub fn take(parts: &mut http::request::Parts) -> Option<ClientSide> {
        let ask = asks(parts)?;
        let on_upgrade = parts.extensions.remove::<OnUpgrade>()?;
        Some(ClientSide { ask, on_upgrade })
    }
}

/// Sent with a 101 (or an extended CONNECT's 200) in the response's extensions: the access
/// log's record goes to the splice, which writes the line when the WebSocket closes, with the
/// bytes that went each way.
/// (Shared, because response extensions must be `Clone`; only the first send counts.)
#[derive(Clone)]
pub struct LogAtClose(Arc<Mutex<Option<oneshot::Sender<PendingLog>>>>);

impl LogAtClose {
    fn new(tx: oneshot::Sender<PendingLog>) -> LogAtClose {
        LogAtClose(Arc::new(Mutex::new(Some(tx))))
    }

    pub fn send(self, pending: PendingLog) {
        let tx = match self.0.lock() {
            Ok(mut tx) => tx.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        // The splice has ended already if nobody receives: the line is written here then.
        let unsent = match tx {
            Some(tx) => tx.send(pending).err(),
            None => Some(pending),
        };
        if let Some(pending) = unsent {
            pending.emit(0);
        }
    }
}

/// Why the upstream's answer to a handshake cannot be passed on.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the upstream answered 101 without Upgrade: websocket")]
    NotWebSocket,
    #[error("the upstream's Sec-WebSocket-Accept does not match the key sent")]
    BadAccept,
}

/// Sends the handshake in `parts` (already rewritten: absolute URI, the credential injected,
/// hop-by-hop headers gone) to the upstream on a connection of its own. On 101 the answer to
/// the client is returned and the splice starts once both sides have upgraded; any other
/// answer is returned as it is, its hop-by-hop headers gone.
pub async fn open(
    dialer: &Dialer,
    mut parts: http::request::Parts,
    client: ClientSide,
) -> Result<Response<ResponseBody>, SendError> {
    let https = parts.uri.scheme() == Some(&http::uri::Scheme::HTTPS);
    let authority = parts
        .uri
        .authority()
        .cloned()
        .ok_or(SendError::NoAuthority)?;

    // The upstream gets an HTTP/1.1 handshake whatever the client spoke.
    let key = match client.ask {
        Ask::Upgrade => None,
        Ask::ExtendedConnect => {
            let key = new_key();
            parts
                .headers
                .insert(HeaderName::from_static("sec-websocket-key"), key.clone());
            parts.headers.insert(
                HeaderName::from_static("sec-websocket-version"),
                HeaderValue::from_static("13"),
            );
            Some(key)
        }
    };
    parts.method = Method::GET;
    parts.version = Version::HTTP_11;
    parts
        .headers
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let host = HeaderValue::from_str(authority.as_str()).map_err(|_| SendError::NoAuthority)?;
    parts.headers.insert(header::HOST, host);
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    let req = Request::from_parts(parts, Empty::<Bytes>::new());

    let io = dialer.dial_http1(https, &authority).await?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream WebSocket handshake connection ended");
        }
    });
    let mut resp = sender.send_request(req).await?;

    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = resp.into_parts();
        hop_by_hop::strip_response(&mut parts.headers, false);
        return Ok(Response::from_parts(parts, ResponseBody::Http1(body)));
    }
    if !has_token(resp.headers(), &header::UPGRADE, "websocket") {
        return Err(handshake_failed(HandshakeError::NotWebSocket));
    }
    if let Some(key) = &key {
        let accept = resp.headers().get("sec-websocket-accept");
        if accept.map(HeaderValue::as_bytes) != Some(accept_for(key.as_bytes()).as_bytes()) {
            return Err(handshake_failed(HandshakeError::BadAccept));
        }
    }
    let upstream = hyper::upgrade::on(&mut resp);

    // The client gets what the WebSocket needs and nothing else of the 101: its other
    // headers are the upstream's to a handshake latchkey made with the credential in it.
    let mut answer = Response::new(ResponseBody::Empty);
    let kept: &[&str] = match client.ask {
        Ask::Upgrade => {
            *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = answer.headers_mut();
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            &[
                "sec-websocket-accept",
                "sec-websocket-protocol",
                "sec-websocket-extensions",
            ]
        }
        // h2 has no Upgrade handshake: the key and the accept were latchkey's own.
        Ask::ExtendedConnect => &["sec-websocket-protocol", "sec-websocket-extensions"],
    };
    for name in kept {
        for value in resp.headers().get_all(*name) {
            answer.headers_mut().append(*name, value.clone());
        }
    }
    let (log_tx, log_rx) = oneshot::channel();
    answer.extensions_mut().insert(LogAtClose::new(log_tx));
    tokio::spawn(splice(client.on_upgrade, upstream, log_rx));
    Ok(answer)
}

fn handshake_failed(e: HandshakeError) -> SendError {
    SendError::Upgrade(e.to_string())
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64.
fn new_key() -> HeaderValue {
    let mut raw = [0u8; 16];
    let random = ring::rand::SystemRandom::new();
    if ring::rand::SecureRandom::fill(&random, &mut raw).is_err() {
        // The key only guards against caches replaying a handshake; any value does that.
        raw = *b"latchkey-ws-key!";
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static("bGF0Y2hrZXk="))
}

/// The `Sec-WebSocket-Accept` that answers `key` (RFC 6455 section 4.2.2).
fn accept_for(key: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

/// Waits for both sides to upgrade, then copies bytes both ways until either side closes, and
/// writes the access line with the bytes each way.
async fn splice(client: OnUpgrade, upstream: OnUpgrade, log: oneshot::Receiver<PendingLog>) {
    // The record comes with the answer, before either side upgrades; held where a stop past
    // its grace, which drops this task, still writes the line.
    let line = LineAtClose::new(log.await.ok());
    let mut read = 0;
    let mut written = 0;
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let _open = telemetry::WebSocketOpen::open();
            let mut client = Watched::new(TokioIo::new(client), Counts::default());
            let mut upstream = TokioIo::new(upstream);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "a WebSocket ended with an error");
            }
            read = client.watch.read;
            written = client.watch.written;
        }
        Err(e) => {
            tracing::debug!(error = %e, "a WebSocket handshake was answered but not upgraded")
        }
    }
    line.close(read, written);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: Request<()>) -> http::request::Parts {
        req.into_parts().0
    }

    #[test]
    fn the_accept_of_the_rfc_example() {
        assert_eq!(
            accept_for(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(new_key().len(), 24);
    }

    #[test]
    fn only_a_websocket_upgrade_is_asked() {
        let get = |upgrade: &str, connection: &str| {
            parts(
                Request::get("/x")
                    .header("upgrade", upgrade)
                    .header("connection", connection)
                    .body(())
                    .unwrap(),
            )
        };
        assert_eq!(asks(&get("websocket", "Upgrade")), Some(Ask::Upgrade));
        assert_eq!(
            asks(&get("WebSocket", "keep-alive, upgrade")),
            Some(Ask::Upgrade)
        );
        assert_eq!(asks(&get("h2c", "Upgrade, HTTP2-Settings")), None);
        assert_eq!(asks(&get("websocket", "keep-alive")), None);
        let post = parts(
            Request::post("/x")
                .header("upgrade", "websocket")
                .header("connection", "upgrade")
                .body(())
                .unwrap(),
        );
        assert_eq!(asks(&post), None);
        let mut h2 = parts(Request::connect("/x").body(()).unwrap());
        h2.version = Version::HTTP_2;
        assert_eq!(asks(&h2), None);
        h2.extensions
            .insert(hyper::ext::Protocol::from_static("websocket"));
        assert_eq!(asks(&h2), Some(Ask::ExtendedConnect));
    }
}
