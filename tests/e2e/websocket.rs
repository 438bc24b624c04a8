//! PRODUCT.md section 1: WebSocket upgrades through latchkey in gateway, forward and tunnel
//! form, the credential injected on the handshake (OpenAI's Realtime API and Slack's Socket Mode
//! are used that way).
//!
//! "api.openai.com" is a WebSocket echo server of the test's own (tungstenite) on loopback, with
//! a certificate for that name from a test CA, reached through `proxy.resolve`; it records the
//! headers of every handshake it sees. The clients are real: Python `websockets` (gateway, and
//! tunnel through `HTTPS_PROXY`), tungstenite over a raw absolute-form handshake (forward),
//! and the `h2` crate's extended CONNECT (RFC 8441).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::errors::{client_toml, metrics_text};
use crate::support::*;

const OPENAI: &str = "api.openai.com";
const ID: &str = "openai-rt";
const TOKEN: &str = "ws-client-token-0123456789";
/// What an SDK sends as its key when latchkey holds the real one.
const PLACEHOLDER: &str = "sk-placeholder-from-the-client";
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// The upstream

/// The headers of one handshake, as the upstream saw them (lower-case names).
type Handshake = Vec<(String, String)>;

/// A WebSocket echo server over TLS: every text and binary message comes back as it was.
struct WsEcho {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    connections: Arc<AtomicU64>,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl WsEcho {
    async fn start(tls: Arc<rustls::ServerConfig>) -> WsEcho {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let (seen, accepted) = (handshakes.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = stop_rx.changed() => return,
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    // The callback's signature is tungstenite's: its error type is large.
                    #[expect(clippy::result_large_err, reason = "tungstenite's callback type")]
                    let record = |req: &Request, mut resp: Response| {
                        // A debug header quoting the credential: it must not reach the client.
                        if let Some(auth) = req.headers().get("authorization") {
                            resp.headers_mut()
                                .insert("x-seen-authorization", auth.clone());
                        }
                        if req.headers().contains_key("sec-websocket-protocol") {
                            resp.headers_mut().insert(
                                "sec-websocket-protocol",
                                http::HeaderValue::from_static("realtime"),
                            );
                        }
                        // A 101 whose kept headers quote the credential.
                        if let (true, Some(auth)) = (
                            req.uri().path() == "/v1/quoting",
                            req.headers().get("authorization"),
                        ) {
                            let quoted = format!("realtime, {}", auth.to_str().unwrap());
                            for name in ["sec-websocket-protocol", "sec-websocket-extensions"] {
                                resp.headers_mut()
                                    .insert(name, http::HeaderValue::from_str(&quoted).unwrap());
                            }
                        }
                        let headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.as_str().to_string(),
                                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                )
                            })
                            .collect();
                        seen.lock().unwrap().push(headers);
                        if req.uri().path() == "/v1/refused" {
                            // A refusal that quotes what it was sent, in a header and the body.
                            let auth = req
                                .headers()
                                .get("authorization")
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default();
                            let mut no =
                                ErrorResponse::new(Some(format!("no WebSocket here for {auth}")));
                            *no.status_mut() = http::StatusCode::UNAUTHORIZED;
                            no.headers_mut().insert(
                                "www-authenticate",
                                http::HeaderValue::from_str(&format!("Bearer error=\"{auth}\""))
                                    .unwrap(),
                            );
                            return Err(no);
                        }
                        Ok::<_, ErrorResponse>(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tls, record).await else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        let echo = match msg {
                            Message::Text(_) | Message::Binary(_) => msg,
                            Message::Close(_) => return,
                            _ => continue,
                        };
                        if ws.send(echo).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        WsEcho {
            addr,
            handshakes,
            connections,
            _stop: stop_tx,
        }
    }

    fn handshakes(&self) -> Vec<Handshake> {
        self.handshakes.lock().unwrap().clone()
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Every value of header `name` in a handshake.
fn values(h: &Handshake, name: &str) -> Vec<String> {
    h.iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The world

/// latchkey's CA for the tunnel form, made with `latchkey ca init`.
struct Ca {
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ca {
    async fn init() -> Ca {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("ca.pem");
        let key = dir.path().join("ca-key.pem");
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
            .args(["ca", "init", "--cert"])
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN")
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "latchkey ca init failed: {out:?}");
        Ca {
            cert,
            key,
            _dir: dir,
        }
    }
}

/// Connection `openai-rt` (built-in `openai` connector), "api.openai.com" (and, for the
/// refusal, "api.stripe.com") pinned to the WebSocket echo, latchkey with its CA and a client.
struct World {
    // Dropped first: its drop checks its output for every secret.
    lk: Latchkey,
    up: WsEcho,
    key: String,
    ca: Ca,
    _up_ca: TestCa,
    _bao: Bao,
}

impl World {
    async fn start() -> World {
        let bao = Bao::start().await;
        let up_ca = TestCa::new();
        let up =
            WsEcho::start(up_ca.server_config(&[OPENAI, "api.stripe.com"], &[b"h2", b"http/1.1"]))
                .await;
        let key = format!("sk-ws{}x{}realtime", std::process::id(), free_port());
        bao.put(ID, &[("connector", "openai"), ("api_key", &key)]);
        let ca = Ca::init().await;
        let to = up.addr;
        let opts = Opts::loopback()
            .root(&up_ca.pem_path)
            .proxy(&format!(
                "resolve = {{ \"{OPENAI}:443\" = \"{to}\", \"api.stripe.com:443\" = \"{to}\" }}"
            ))
            .tls(&format!("ca_cert = {:?}", ca.cert.display().to_string()))
            .tls(&format!("ca_key = {:?}", ca.key.display().to_string()))
            .extra(&client_toml("realtime", TOKEN, &[ID]));
        let lk = Latchkey::start(&bao, opts).await;
        lk.forbid(TOKEN);
        World {
            lk,
            up,
            key,
            ca,
            _up_ca: up_ca,
            _bao: bao,
        }
    }

    /// The one handshake the upstream saw carried our credential and nothing of the client's.
    #[track_caller]
    fn assert_one_handshake_with_our_key(&self) {
        let seen = self.up.handshakes();
        assert_eq!(seen.len(), 1, "handshakes at the upstream: {seen:?}");
        let h = &seen[0];
        assert_eq!(
            values(h, "authorization"),
            vec![format!("Bearer {}", self.key)],
            "the upstream's Authorization"
        );
        assert!(values(h, "proxy-authorization").is_empty(), "{h:?}");
        let all: String = h.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
        assert!(!all.contains(PLACEHOLDER), "the client's key went upstream");
        assert!(!all.contains(TOKEN), "the client token went upstream");
        assert_eq!(values(h, "upgrade"), vec!["websocket"], "{h:?}");
        assert_eq!(values(h, "sec-websocket-version"), vec!["13"], "{h:?}");
        assert_eq!(values(h, "host"), vec![OPENAI], "{h:?}");
    }

    /// The access line of the upgrade in `form`: its status (101, or 200 for an h2 extended
    /// CONNECT) and the bytes of the whole WebSocket.
    async fn assert_access_line(&self, form: &str, method: &str, status: u16) {
        let line = self
            .lk
            .access_line(|v| {
                v["form"] == form
                    && v["status"] == status
                    && v["path"].as_str().is_some_and(|p| p.starts_with("/v1/"))
            })
            .await;
        let f = &line;
        assert_eq!(f["connection"], ID, "{line}");
        assert_eq!(f["client"], "realtime", "{line}");
        assert_eq!(f["method"], method, "{line}");
        assert_eq!(f["host"], OPENAI, "{line}");
        assert!(
            f["path"].as_str().unwrap().starts_with("/v1/realtime"),
            "{line}"
        );
        // Two 1 MiB messages each way, framed.
        assert!(f["bytes_in"].as_u64().unwrap() > 2 * MIB as u64, "{line}");
        assert!(f["bytes_out"].as_u64().unwrap() > 2 * MIB as u64, "{line}");
    }
}

/// Python `websockets`: connects to `URL` (extra headers in `HEADERS`, proxy from the
/// environment unless `NO_PROXY_WS` is set, latchkey's CA in `CA`), sends a short text, a short
/// binary, a 1 MiB text and a 1 MiB binary message, and prints whether each came back as sent.
const WEBSOCKETS_PY: &str = r#"
import asyncio, json, os, ssl
from websockets.asyncio.client import connect

async def main():
    kw = {'additional_headers': json.loads(os.environ['HEADERS']), 'max_size': None,
          'subprotocols': ['realtime']}
    if os.environ.get('NO_PROXY_WS'):
        kw['proxy'] = None
    if os.environ.get('CA'):
        kw['ssl'] = ssl.create_default_context(cafile=os.environ['CA'])
    results = []
    async with connect(os.environ['URL'], **kw) as ws:
        for msg in ['hello, realtime', bytes(range(256)), 'x' * (1 << 20), os.urandom(1 << 20)]:
            await ws.send(msg)
            back = await ws.recv()
            results.append(type(back) is type(msg) and back == msg)
        answer = {k.lower(): v for k, v in ws.response.headers.raw_items()}
    print(json.dumps({'echoed': results, 'subprotocol': ws.subprotocol, 'answer': answer}))

asyncio.run(main())
"#;

async fn websockets_py(url: &str, headers: serde_json::Value, env: &[(&str, &str)]) {
    let mut all = vec![("URL", url.to_string()), ("HEADERS", headers.to_string())];
    all.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
    let all: Vec<(&str, &str)> = all.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = python(WEBSOCKETS_PY, &all).await;
    let out: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        out["echoed"],
        serde_json::json!([true, true, true, true]),
        "echoed as sent"
    );
    assert_eq!(out["subprotocol"], "realtime", "{out}");
    assert_no_echoed_key(&out["answer"].to_string());
}

/// The upstream's 101 quoted the credential in a header of its own: not passed on.
#[track_caller]
fn assert_no_echoed_key(answer: &str) {
    let lower = answer.to_ascii_lowercase();
    assert!(!lower.contains("x-seen-authorization"), "{answer}");
    assert!(!lower.contains("bearer sk-ws"), "{answer}");
}

/// The same four messages over a tungstenite client stream.
async fn echo_four<S>(ws: &mut WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let big: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    for msg in [
        Message::Text("hello, realtime".into()),
        Message::Binary((0..=255).collect()),
        Message::Text("y".repeat(MIB)),
        Message::Binary(big),
    ] {
        ws.send(msg.clone()).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert!(back == msg, "a message came back changed");
    }
    ws.close(None).await.unwrap();
}

/// Sends a forward-form WebSocket handshake for `url` through latchkey and reads the answer's
/// head; the stream is returned with the head, ready for frames when it is a 101.
async fn forward_handshake(lk: &Latchkey, url: &str, host: &str) -> (TcpStream, String) {
    let mut tcp = TcpStream::connect(lk.proxy).await.unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{ID}:{TOKEN}"));
    let head = format!(
        "GET {url} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: realtime\r\n\
         Proxy-Authorization: Basic {auth}\r\nAuthorization: Bearer {PLACEHOLDER}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let answer = String::from_utf8_lossy(&read_head(&mut tcp).await).into_owned();
    (tcp, answer)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_through_the_gateway_gets_the_key_on_its_handshake() {
    let w = World::start().await;
    // An SDK with its base URL on latchkey and the client token as its API key: the token
    // arrives where the key goes and is replaced there. (The h2 test below sends the token as
    // Proxy-Authorization, with a key of the client's own.)
    let url = format!("ws://{}/{ID}/v1/realtime?model=gpt-realtime", w.lk.proxy);
    websockets_py(
        &url,
        serde_json::json!({"Authorization": format!("Bearer {TOKEN}")}),
        &[("NO_PROXY_WS", "1")],
    )
    .await;
    w.assert_one_handshake_with_our_key();
    w.assert_access_line("gateway", "GET", 101).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_in_forward_form_gets_the_key_on_its_handshake() {
    let w = World::start().await;
    let (tcp, head) = forward_handshake(
        &w.lk,
        &format!("http://{OPENAI}/v1/realtime?model=gpt-realtime"),
        OPENAI,
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    // The accept of the key sent (RFC 6455's example key), as the upstream computed it.
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "Sec-WebSocket-Accept: {head}"
    );
    assert!(lower.contains("sec-websocket-protocol: realtime"), "{head}");
    assert_no_echoed_key(&head);
    let mut ws = WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
    let open = |n: u32| {
        let lk = &w.lk;
        move || async move {
            let text = metrics_text(lk).await;
            text.lines()
                .any(|l| l == format!("latchkey_websockets_open {n}"))
                .then_some(())
        }
    };
    wait_until("one WebSocket open", Duration::from_secs(10), open(1)).await;
    echo_four(&mut ws).await;
    w.assert_one_handshake_with_our_key();
    w.assert_access_line("forward", "GET", 101).await;
    wait_until("no WebSocket open", Duration::from_secs(10), open(0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_through_https_proxy_gets_the_key_on_its_handshake() {
    let w = World::start().await;
    let proxy = format!("http://{ID}:{TOKEN}@{}", w.lk.proxy);
    let ca = w.ca.cert.display().to_string();
    websockets_py(
        &format!("wss://{OPENAI}/v1/realtime?model=gpt-realtime"),
        serde_json::json!({"Authorization": format!("Bearer {PLACEHOLDER}")}),
        &[("HTTPS_PROXY", &proxy), ("CA", &ca)],
    )
    .await;
    w.assert_one_handshake_with_our_key();
    w.assert_access_line("tunnel", "GET", 101).await;
    // Everything latchkey printed at trace, searched for the key and the client token.
    let mut w = w;
    let out = w.lk.stop_and_check();
    assert!(out.contains("latchkey::access"), "no access lines:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_to_a_host_the_connection_does_not_cover_is_refused() {
    let w = World::start().await;
    // api.stripe.com is pinned to the same echo server: a bug would reach it.
    let (_tcp, head) =
        forward_handshake(&w.lk, "http://api.stripe.com/v1/realtime", "api.stripe.com").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("latchkey-error: host_not_allowed"),
        "{head}"
    );
    let line = w.lk.access_line(|v| v["error"] == "host_not_allowed").await;
    assert_eq!(line["status"], 403, "{line}");
    assert_eq!(w.up.connections(), 0, "the upstream was dialled");
    assert!(w.up.handshakes().is_empty());
}

/// An h2 extended CONNECT for a WebSocket to `uri` over `io` (a connection to latchkey, or a
/// tunnel through it), the client token as Proxy-Authorization when given, a key of the
/// client's own as Authorization; then the four messages.
async fn h2_websocket<T>(io: T, uri: &str, token: Option<&str>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut client, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(conn);
    std::future::poll_fn(|cx| client.poll_ready(cx))
        .await
        .unwrap();
    // latchkey's SETTINGS say it takes extended CONNECT (RFC 8441 section 3).
    wait_until(
        "SETTINGS_ENABLE_CONNECT_PROTOCOL from latchkey",
        Duration::from_secs(10),
        || std::future::ready(client.is_extended_connect_protocol_enabled().then_some(())),
    )
    .await;
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(uri)
        .header("authorization", format!("Bearer {PLACEHOLDER}"))
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", "realtime");
    if let Some(token) = token {
        req = req.header("proxy-authorization", format!("Bearer {token}"));
    }
    let mut req = req.body(()).unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from("websocket"));
    let (answer, send) = client.send_request(req, false).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 200, "{answer:?}");
    assert!(answer.headers().get("sec-websocket-accept").is_none());
    assert_eq!(answer.headers()["sec-websocket-protocol"], "realtime");
    assert_no_echoed_key(&format!("{:?}", answer.headers()));
    let stream = H2Stream {
        send,
        recv: answer.into_body(),
        buf: bytes::Bytes::new(),
    };
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    echo_four(&mut ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_h2_extended_connect_gets_the_key_on_its_handshake() {
    let w = World::start().await;
    // h2 with prior knowledge, as a gateway request.
    let tcp = TcpStream::connect(w.lk.proxy).await.unwrap();
    let uri = format!("http://{}/{ID}/v1/realtime?model=gpt-realtime", w.lk.proxy);
    h2_websocket(tcp, &uri, Some(TOKEN)).await;
    w.assert_one_handshake_with_our_key();
    // The key upstream was latchkey's own: the client sent none.
    assert_eq!(values(&w.up.handshakes()[0], "sec-websocket-key").len(), 1);
    w.assert_access_line("gateway", "CONNECT", 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_h2_extended_connect_inside_a_tunnel_gets_the_key() {
    let w = World::start().await;
    // CONNECT as the connection's user, then TLS (latchkey's CA, ALPN h2), then h2 inside.
    let mut tcp = TcpStream::connect(w.lk.proxy).await.unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{ID}:{TOKEN}"));
    let head = format!(
        "CONNECT {OPENAI}:443 HTTP/1.1\r\nHost: {OPENAI}:443\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let answer = String::from_utf8_lossy(&read_head(&mut tcp).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&w.ca.cert).unwrap();
    use rustls::pki_types::pem::PemObject as _;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(OPENAI.try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    h2_websocket(
        tls,
        &format!("https://{OPENAI}/v1/realtime?model=gpt-realtime"),
        None,
    )
    .await;
    w.assert_one_handshake_with_our_key();
    w.assert_access_line("tunnel", "CONNECT", 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_the_handshake_is_answered_as_it_answered() {
    let w = World::start().await;
    let (mut tcp, head) =
        forward_handshake(&w.lk, &format!("http://{OPENAI}/v1/refused"), OPENAI).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(!lower.contains("latchkey-error"), "{head}");
    assert!(!lower.contains("upgrade: websocket"), "{head}");
    // The upstream's own body follows, and the key went to it on the handshake; where the
    // refusal quotes it, head and body, the client reads the placeholder.
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut body)).await;
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("no WebSocket here for Bearer latchkey.openai-rt"),
        "{head}{body}"
    );
    assert!(
        lower.contains("www-authenticate: bearer error=\"bearer latchkey.openai-rt\""),
        "{head}"
    );
    assert!(
        !head.contains(&w.key) && !body.contains(&w.key),
        "{head}{body}"
    );
    w.assert_one_handshake_with_our_key();
    let line = w.lk.access_line(|v| v["status"] == 401).await;
    assert_eq!(line["form"], "forward", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_answer_that_quotes_the_key_reaches_the_client_scrubbed() {
    let w = World::start().await;
    let (_tcp, head) =
        forward_handshake(&w.lk, &format!("http://{OPENAI}/v1/quoting"), OPENAI).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(!head.contains(&w.key), "{head}");
    let lower = head.to_ascii_lowercase();
    for name in ["sec-websocket-protocol", "sec-websocket-extensions"] {
        assert!(
            lower.contains(&format!("{name}: realtime, bearer latchkey.openai-rt")),
            "{name}: {head}"
        );
    }
    w.assert_one_handshake_with_our_key();
}

/// An h2 stream as a byte stream, for tungstenite.
struct H2Stream {
    send: h2::SendStream<bytes::Bytes>,
    recv: h2::RecvStream,
    buf: bytes::Bytes,
}

impl tokio::io::AsyncRead for H2Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        while this.buf.is_empty() {
            match this.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.buf = data;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(std::io::Error::other(e))),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for H2Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        let this = self.get_mut();
        this.send.reserve_capacity(buf.len());
        match this.send.poll_capacity(cx) {
            Poll::Ready(Some(Ok(n))) => {
                let n = n.min(buf.len());
                this.send
                    .send_data(bytes::Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(std::io::Error::other)?;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(std::io::Error::other(e))),
            Poll::Ready(None) => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let _ = self.get_mut().send.send_data(bytes::Bytes::new(), true);
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_other_than_a_websocket_get_are_not_honoured() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "plain-up", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let url = lk.url("/plain-up/v1/x");
    for (how, args) in [
        // curl asks an http:// URL for h2c with Upgrade, Connection and HTTP2-Settings.
        ("h2c", vec!["--http2", url.as_str()]),
        (
            "a websocket upgrade on a POST",
            vec![
                "-d",
                "x",
                "-H",
                "Upgrade: websocket",
                "-H",
                "Connection: Upgrade",
                "-H",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "-H",
                "Sec-WebSocket-Version: 13",
                url.as_str(),
            ],
        ),
    ] {
        let (status, text) = curl(&args).await;
        assert_eq!(status, 200, "{how}: {text}");
        assert!(
            last_status(&text).starts_with("HTTP/1.1 200"),
            "{how}: {text}"
        );
        let r = Echoed {
            status,
            json: body_json(&text),
            latchkey_error: None,
        };
        for name in ["upgrade", "connection", "http2-settings"] {
            assert!(
                r.header_values(name).is_empty(),
                "{how}: {name} reached the upstream: {}",
                r.json
            );
        }
        assert_eq!(r.json["version"], "HTTP/1.1", "{how}");
    }
    assert_eq!(up.requests(), 2);
}

/// The status line of the last answer in curl -i output.
fn last_status(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| l.starts_with("HTTP/"))
        .unwrap_or_default()
}

/// A WebSocket open when latchkey stops has its access line: with the bytes it carried when it
/// ends as the stop begins, or, still open when a worker drops its connections, from
/// `LineAtClose`'s drop with `error=shutdown` (which of the two depends on timing; an
/// operations probe found such WebSockets, in tunnels, with no line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_open_at_shutdown_has_its_access_line() {
    let mut w = World::start().await;
    let host = w.lk.proxy.to_string();
    let (tcp, head) = forward_handshake(
        &w.lk,
        &format!("/{ID}/v1/realtime?model=gpt-realtime"),
        &host,
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut ws = WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
    echo_four(&mut ws).await;
    w.lk.terminate();
    let status =
        w.lk.exited_within(Duration::from_secs(30))
            .await
            .expect("latchkey to exit");
    assert!(status.success(), "{status:?}");
    let line =
        w.lk.access_line(|v| v["status"] == 101 && v["form"] == "gateway")
            .await;
    assert_eq!(line["connection"], ID, "{line}");
    // Ended as the stop began (with its bytes), or still open when the worker dropped its
    // connections (which one depends on timing): either way it has its line, and a cut one
    // says so.
    assert!(
        line["error"] == "shutdown" || line["bytes_out"].as_u64().unwrap() > 0,
        "{line}"
    );
    drop(ws);
}
