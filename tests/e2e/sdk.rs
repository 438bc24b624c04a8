//! PRODUCT.md section 1: with `HTTPS_PROXY` set and latchkey's CA trusted, "an official SDK runs
//! unmodified, with its usual `https://` base URL". Real clients through the tunnel form, each
//! set up as `latchkey env` prints it and as the README's "Use it from your code" shows: httpx,
//! aiohttp (`trust_env=True`), undici (`EnvHttpProxyAgent`, `ProxyAgent`), axios (by itself
//! and with `https-proxy-agent`), and the official openai, anthropic and stripe Python SDKs,
//! each making a call with a placeholder key `latchkey.{connection_id}`. (curl over HTTP/1.1
//! and h2, and requests, are in `tunnel.rs`.) The same three SDKs in gateway form: base URL
//! `http://latchkey/{connection_id}`, API key = the client token. Also: server-sent events
//! arrive event by event, and 100 MiB goes up and down with latchkey's memory flat.
//!
//! "api.openai.com", "api.anthropic.com" and "api.stripe.com" are one HTTPS upstream on loopback
//! with a certificate for the three names from a test CA, reached through `proxy.resolve`; the
//! real services are never dialled. The upstream records every request as it received it (the
//! assertions read that record, not an echo that latchkey may rewrite on its way back), and
//! answers each SDK's call with a small canned body of the shape that SDK parses.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::io::AsyncBufReadExt as _;

use crate::errors::client_toml;
use crate::support::*;
use crate::tunnel::Ca;

/// The client token of the one configured client (granted `*-prod`).
const TOKEN: &str = "sdk-client-token-0123456789";

/// A connection of the world: its ID, its built-in connector and the service's host.
struct Conn {
    id: &'static str,
    connector: &'static str,
    host: &'static str,
}

const OPENAI: Conn = Conn {
    id: "openai-prod",
    connector: "openai",
    host: "api.openai.com",
};
const ANTHROPIC: Conn = Conn {
    id: "anthropic-prod",
    connector: "anthropic",
    host: "api.anthropic.com",
};
const STRIPE: Conn = Conn {
    id: "stripe-prod",
    connector: "stripe",
    host: "api.stripe.com",
};
const CONNS: [&Conn; 3] = [&OPENAI, &ANTHROPIC, &STRIPE];

/// A key of the connector's pattern, unique to the test.
fn key_for(conn: &Conn) -> String {
    let unique = format!("{}x{}sdk", std::process::id(), free_port());
    match conn.connector {
        "openai" => format!("sk-proj-{unique}"),
        "anthropic" => format!("sk-ant-api03-{unique}"),
        _ => format!("sk_test_{unique}"),
    }
}

/// Where the connector puts the key upstream, and the value it puts there.
fn credential(conn: &Conn, key: &str) -> (&'static str, String) {
    match conn.connector {
        "anthropic" => ("x-api-key", key.to_string()),
        _ => ("authorization", format!("Bearer {key}")),
    }
}

// ---------------------------------------------------------------------------------------------
// The services' stand-in

/// One request as the upstream received it.
#[derive(Clone, Debug)]
struct Seen {
    host: String,
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    /// Every value of a header, by case-insensitive name.
    fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Bytes and SHA-256 (hex) of a body.
type Digest = (u64, String);

struct State {
    seen: Mutex<Vec<Seen>>,
    /// One permit for each server-sent event the upstream may send.
    release: tokio::sync::Semaphore,
    /// What `/upload` received, and what `/download/{n}` sent.
    uploaded: Mutex<Option<Digest>>,
    sent: Mutex<Option<Digest>>,
}

/// HTTPS on 127.0.0.1 with a certificate for the three service names.
///
/// Paths: `/v1/chat/completions` (a chat completion; with `"stream": true` in the request,
/// server-sent events, each sent only when the test releases it), `/v1/messages` (an Anthropic
/// message), `/v1/balance` (a Stripe balance), `/upload` (the body's length and SHA-256),
/// `/download/{n}` (`n` bytes, streamed in 64 KiB chunks); anything else `{"ok": true}`.
struct Service {
    addr: SocketAddr,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Service {
    /// Starts it, offering the protocols `alpn` (`h2`, `http/1.1`).
    async fn start(ca: &TestCa, alpn: &[&[u8]]) -> Service {
        let names: Vec<&str> = CONNS.iter().map(|c| c.host).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(&names, alpn));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            seen: Mutex::new(Vec::new()),
            release: tokio::sync::Semaphore::new(0),
            uploaded: Mutex::new(None),
            sent: Mutex::new(None),
        });
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, st) = (acceptor.clone(), st.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| answer(req, st.clone()));
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Service {
            addr,
            state,
            accept,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Lets the upstream send one more server-sent event.
    fn release(&self) {
        self.state.release.add_permits(1);
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// SHA-256 by ring, through rustls: the sha2 crate, unoptimized as tests build it, takes seconds
/// over 100 MiB.
fn sha256() -> Box<dyn rustls::crypto::hash::Context> {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    suite.tls13().unwrap().common.hash_provider.start()
}

async fn answer(
    req: http::Request<Incoming>,
    st: Arc<State>,
) -> Result<http::Response<Body>, Infallible> {
    let (parts, mut body) = req.into_parts();
    // h2 names the host in `:authority`, HTTP/1.1 in `Host`.
    let host = parts.uri.host().map(str::to_string).unwrap_or_else(|| {
        let h = parts.headers.get(http::header::HOST);
        let h = h.and_then(|v| v.to_str().ok()).unwrap_or_default();
        h.split(':').next().unwrap_or_default().to_string()
    });
    st.seen.lock().unwrap().push(Seen {
        host,
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    });
    let path = parts.uri.path();
    if let Some(n) = path.strip_prefix("/download/") {
        return Ok(download(n.parse().unwrap_or(0), st));
    }

    // The body, counted and hashed as it comes; its start kept to read `"stream": true`.
    let mut hash = sha256();
    let mut bytes = 0u64;
    let mut head = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            hash.update(&data);
            bytes += data.len() as u64;
            if head.len() < 65536 {
                head.extend_from_slice(&data);
            }
        }
    }
    if path == "/upload" {
        let digest = hex::encode(hash.finish());
        *st.uploaded.lock().unwrap() = Some((bytes, digest.clone()));
        return Ok(json(
            serde_json::json!({ "bytes": bytes, "sha256": digest }).to_string(),
        ));
    }
    let streaming = serde_json::from_slice::<serde_json::Value>(&head)
        .is_ok_and(|v| v["stream"] == serde_json::Value::Bool(true));
    Ok(match path {
        "/v1/chat/completions" if streaming => events(st),
        "/v1/chat/completions" => canned(CHAT),
        "/v1/messages" => canned(MESSAGE),
        "/v1/balance" => canned(BALANCE),
        _ => json(serde_json::json!({ "ok": true, "path": path }).to_string()),
    })
}

const CHAT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,
"model":"gpt-4o-mini","choices":[{"index":0,"finish_reason":"stop",
"message":{"role":"assistant","content":"hello from the stand-in"}}],
"usage":{"prompt_tokens":1,"completion_tokens":4,"total_tokens":5}}"#;

const MESSAGE: &str = r#"{"id":"msg_1","type":"message","role":"assistant",
"model":"claude-sonnet-4-5","content":[{"type":"text","text":"hello from the stand-in"}],
"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":4}}"#;

const BALANCE: &str = r#"{"object":"balance","livemode":false,
"available":[{"amount":4242,"currency":"usd","source_types":{"card":4242}}],
"pending":[{"amount":0,"currency":"usd","source_types":{"card":0}}]}"#;

/// How many content events a streamed chat completion has (then `[DONE]`).
const EVENTS: usize = 3;

/// A canned answer, as a service sends it: on one line.
fn canned(text: &str) -> http::Response<Body> {
    json(
        serde_json::from_str::<serde_json::Value>(text)
            .unwrap()
            .to_string(),
    )
}

fn json(text: String) -> http::Response<Body> {
    let mut r = http::Response::new(Full::new(Bytes::from(text)).boxed_unsync());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// A streamed chat completion: `EVENTS` chunks and `[DONE]`, each sent only once released.
fn events(st: Arc<State>) -> http::Response<Body> {
    let frames = futures_util::stream::unfold(0usize, move |i| {
        let st = st.clone();
        async move {
            if i > EVENTS {
                return None;
            }
            st.release.acquire().await.ok()?.forget();
            let data = if i == EVENTS {
                "[DONE]".to_string()
            } else {
                serde_json::json!({
                    "id": "chatcmpl-1", "object": "chat.completion.chunk",
                    "created": 1700000000, "model": "gpt-4o-mini",
                    "choices": [{"index": 0, "finish_reason": null,
                                 "delta": {"content": format!("event-{i}")}}],
                })
                .to_string()
            };
            let frame = Frame::data(Bytes::from(format!("data: {data}\n\n")));
            Some((Ok::<_, Infallible>(frame), i + 1))
        }
    });
    let mut r = http::Response::new(StreamBody::new(frames).boxed_unsync());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// `n` bytes in 64 KiB chunks: one pseudo-random block with each chunk's index in its first
/// 8 bytes (so that a lost, repeated or reordered chunk changes the digest), hashed as sent.
fn download(n: u64, st: Arc<State>) -> http::Response<Body> {
    const CHUNK: u64 = 64 * 1024;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let block: Vec<u8> = (0..CHUNK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    let start = (0u64, n, sha256());
    let frames = futures_util::stream::unfold(start, move |(i, left, mut hash)| {
        let (st, mut chunk) = (st.clone(), block.clone());
        async move {
            if left == 0 {
                *st.sent.lock().unwrap() = Some((n, hex::encode(hash.finish())));
                return None;
            }
            chunk[..8].copy_from_slice(&i.to_le_bytes());
            chunk.truncate(left.min(CHUNK) as usize);
            hash.update(&chunk);
            let frame = Frame::data(Bytes::from(chunk));
            Some((
                Ok::<_, Infallible>(frame),
                (i + 1, left - CHUNK.min(left), hash),
            ))
        }
    });
    http::Response::new(StreamBody::new(frames).boxed_unsync())
}

// ---------------------------------------------------------------------------------------------
// The world

/// The three connections in OpenBao, the stand-in upstream, latchkey with its CA, `proxy.resolve`
/// and one client (token [`TOKEN`], granted `*-prod`).
struct World {
    // Dropped first: its drop checks its output for every secret, the CA key included.
    lk: Latchkey,
    up: Service,
    keys: BTreeMap<&'static str, String>,
    dir: tempfile::TempDir,
    _ca: Ca,
    _up_ca: TestCa,
    _bao: Bao,
}

impl World {
    async fn start() -> World {
        Self::with_upstream(&[b"h2", b"http/1.1"]).await
    }

    /// The world with an upstream that offers only the protocols `alpn`.
    async fn with_upstream(alpn: &[&[u8]]) -> World {
        let bao = Bao::start().await;
        let up_ca = TestCa::new();
        let up = Service::start(&up_ca, alpn).await;
        let mut keys = BTreeMap::new();
        for c in CONNS {
            let key = key_for(c);
            bao.put(c.id, &[("connector", c.connector), ("api_key", &key)]);
            keys.insert(c.id, key);
        }
        let ca = Ca::init().await;
        let to = up.addr;
        let pins: Vec<String> = CONNS
            .iter()
            .map(|c| format!("\"{}:443\" = \"{to}\"", c.host))
            .collect();
        let opts = Opts::loopback()
            .extra(&client_toml("sdk", TOKEN, &["*-prod"]))
            .root(&up_ca.pem_path)
            .proxy(&format!("resolve = {{ {} }}", pins.join(", ")))
            .tls(&format!("ca_cert = {:?}", ca.cert.display().to_string()))
            .tls(&format!("ca_key = {:?}", ca.key.display().to_string()));
        let lk = Latchkey::start(&bao, opts).await;
        lk.forbid(TOKEN);
        ca.forbid_key(&lk);
        World {
            lk,
            up,
            keys,
            dir: tempfile::tempdir().unwrap(),
            _ca: ca,
            _up_ca: up_ca,
            _bao: bao,
        }
    }

    /// The variables that `latchkey env` prints (with the client token in `LATCHKEY_TOKEN`) for
    /// a program whose requests use `connection`; `None` gives the proxy user `_`, so that each
    /// request names its connection with a placeholder key.
    async fn env(&self, connection: Option<&str>) -> Vec<(String, String)> {
        let bundle = self.dir.path().join("bundle.pem");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"));
        cmd.arg("env")
            .args(["--proxy", &self.lk.proxy.to_string()])
            .args(["--admin", &self.lk.admin_url("")])
            .arg("--ca-bundle")
            .arg(&bundle)
            .env("LATCHKEY_TOKEN", TOKEN);
        if let Some(c) = connection {
            cmd.args(["--connection", c]);
        }
        let out = cmd.output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "latchkey env failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.lines()
            .map(|l| {
                let (k, v) = l
                    .strip_prefix("export ")
                    .and_then(|l| l.split_once('='))
                    .unwrap_or_else(|| panic!("not an export line: {l}"));
                (k.to_string(), v.trim_matches('\'').to_string())
            })
            .collect()
    }

    /// The one request the upstream saw for `conn`'s host, checked with [`assert_only_ours`].
    #[track_caller]
    fn the_request_to(&self, conn: &Conn) -> Seen {
        let seen: Vec<Seen> = self
            .up
            .seen()
            .into_iter()
            .filter(|s| s.host == conn.host)
            .collect();
        assert_eq!(seen.len(), 1, "requests to {}: {seen:#?}", conn.host);
        self.assert_only_ours(&seen[0], conn);
        seen[0].clone()
    }

    /// The upstream saw exactly one credential, the connection's, in the connector's place;
    /// nowhere a placeholder, the client token, proxy credentials or a key the workflow sent.
    #[track_caller]
    fn assert_only_ours(&self, seen: &Seen, conn: &Conn) {
        let key = &self.keys[conn.id];
        let (place, value) = credential(conn, key);
        assert_eq!(seen.values(place), vec![value.as_str()], "{seen:#?}");
        let carrying = seen
            .headers
            .iter()
            .filter(|(_, v)| v.contains(key.as_str()));
        assert_eq!(
            carrying.count(),
            1,
            "the key arrived more than once: {seen:#?}"
        );
        for other in ["authorization", "x-api-key", "proxy-authorization"] {
            if other != place {
                assert!(seen.values(other).is_empty(), "{other} arrived: {seen:#?}");
            }
        }
        let everything = format!("{} {:?}", seen.uri, seen.headers);
        for never in ["latchkey.", TOKEN, "from_the_workflow"] {
            assert!(!everything.contains(never), "{never} arrived: {seen:#?}");
        }
    }
}

/// Variables of the test's own environment that a client must not see: the proxy and CA
/// settings come from `latchkey env` alone, and no SDK setting points anywhere else.
const CLEARED: [&str; 20] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "STRIPE_API_KEY",
    "NODE_OPTIONS",
];

/// A client program with the environment `env` and nothing of [`CLEARED`] from the test's own.
fn client(program: &str, env: &[(String, String)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    for k in CLEARED {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// Runs a client to its end; the JSON of its last line of output.
async fn run(mut cmd: tokio::process::Command) -> serde_json::Value {
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|_| panic!("not JSON: {stdout}"))
}

async fn python(script: &str, env: &[(String, String)]) -> serde_json::Value {
    let mut cmd = client("python3", env);
    cmd.arg("-c").arg(script);
    run(cmd).await
}

/// The directory of the Node clients (`npm ci` there is scripts/install-deps' job).
fn node_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        dir.join("node_modules").is_dir(),
        "tests/node/node_modules is missing: run scripts/install-deps"
    );
    dir
}

/// Runs an ES module with Node in `tests/node`, where its imports resolve.
async fn node(script: &str, env: &[(String, String)]) -> serde_json::Value {
    let mut cmd = client("node", env);
    cmd.current_dir(node_dir())
        .args(["--input-type=module", "-e", script]);
    run(cmd).await
}

// ---------------------------------------------------------------------------------------------
// curl and requests, with nothing but what `latchkey env` prints (tunnel.rs gives them flags)

#[tokio::test]
async fn curl_and_requests_with_only_what_latchkey_env_prints() {
    let w = World::start().await;
    let env = w.env(None).await;
    let mut cmd = client("curl", &env);
    cmd.args(["-sS", "--fail", "--max-time", "30"])
        .args(["-H", "Authorization: Bearer latchkey.stripe-prod"])
        .arg("https://api.stripe.com/v1/balance");
    let v = run(cmd).await;
    assert_eq!(v["object"], "balance", "{v}");
    let v = python(
        "import json, requests\n\
         r = requests.get('https://api.openai.com/v1/models',\n\
         \x20                headers={'Authorization': 'Bearer latchkey.openai-prod'})\n\
         print(json.dumps({'status': r.status_code, 'body': r.json()}))\n",
        &env,
    )
    .await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(w.the_request_to(&STRIPE).uri, "/v1/balance");
    assert_eq!(w.the_request_to(&OPENAI).uri, "/v1/models");
}

// ---------------------------------------------------------------------------------------------
// Python clients

#[tokio::test]
async fn httpx_through_the_tunnel_with_a_placeholder_key() {
    let w = World::start().await;
    let env = w.env(None).await;
    let v = python(
        "import json, httpx\n\
         r = httpx.get('https://api.openai.com/v1/models',\n\
                       headers={'Authorization': 'Bearer latchkey.openai-prod'})\n\
         print(json.dumps({'status': r.status_code, 'body': r.json()}))\n",
        &env,
    )
    .await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["body"]["path"], "/v1/models", "{v}");
    let seen = w.the_request_to(&OPENAI);
    assert_eq!(seen.uri, "/v1/models");
    assert_eq!(w.up.seen().len(), 1);
}

#[tokio::test]
async fn aiohttp_with_trust_env_through_the_tunnel_named_by_the_proxy_user() {
    let w = World::start().await;
    let env = w.env(Some(STRIPE.id)).await;
    // The workflow's own key, wherever it came from, is replaced.
    let v = python(
        "import asyncio, json, aiohttp\n\
         async def main():\n\
         \x20   async with aiohttp.ClientSession(trust_env=True) as s:\n\
         \x20       async with s.get('https://api.stripe.com/v1/charges?limit=3', headers={\n\
         \x20               'Authorization': 'Bearer sk_test_from_the_workflow'}) as r:\n\
         \x20           print(json.dumps({'status': r.status, 'body': await r.json()}))\n\
         asyncio.run(main())\n",
        &env,
    )
    .await;
    assert_eq!(v["status"], 200, "{v}");
    let seen = w.the_request_to(&STRIPE);
    assert_eq!(seen.uri, "/v1/charges?limit=3");
}

#[tokio::test]
async fn the_openai_sdk_through_the_tunnel_with_a_placeholder_key() {
    let w = World::start().await;
    let env = w.env(None).await;
    let v = python(
        "import json\n\
         from openai import OpenAI\n\
         client = OpenAI(api_key='latchkey.openai-prod')\n\
         r = client.chat.completions.create(model='gpt-4o-mini',\n\
         \x20   messages=[{'role': 'user', 'content': 'hello'}])\n\
         print(json.dumps({'content': r.choices[0].message.content}))\n",
        &env,
    )
    .await;
    assert_eq!(v["content"], "hello from the stand-in", "{v}");
    let seen = w.the_request_to(&OPENAI);
    assert_eq!(
        (seen.method.as_str(), seen.uri.as_str()),
        ("POST", "/v1/chat/completions")
    );
}

#[tokio::test]
async fn the_anthropic_sdk_through_the_tunnel_gets_x_api_key_in_place_of_its_bearer() {
    let w = World::start().await;
    let env = w.env(None).await;
    let v = python(
        "import json\n\
         from anthropic import Anthropic\n\
         client = Anthropic(api_key='latchkey.anthropic-prod')\n\
         m = client.messages.create(model='claude-sonnet-4-5', max_tokens=16,\n\
         \x20   messages=[{'role': 'user', 'content': 'hello'}])\n\
         print(json.dumps({'text': m.content[0].text}))\n",
        &env,
    )
    .await;
    assert_eq!(v["text"], "hello from the stand-in", "{v}");
    // The SDK sent its placeholder as Authorization: Bearer; the connector strips that and
    // injects x-api-key (checked by the_request_to). anthropic-version arrives once.
    let seen = w.the_request_to(&ANTHROPIC);
    assert_eq!(
        (seen.method.as_str(), seen.uri.as_str()),
        ("POST", "/v1/messages")
    );
    assert_eq!(seen.values("anthropic-version").len(), 1, "{seen:#?}");
}

#[tokio::test]
async fn the_stripe_sdk_through_the_tunnel_with_its_ca_bundle_set() {
    let w = World::start().await;
    let env = w.env(Some(STRIPE.id)).await;
    // The Stripe SDK verifies against its own bundled roots, not REQUESTS_CA_BUNDLE: it is
    // given the bundle that `latchkey env` wrote.
    let v = python(
        "import json, os, stripe\n\
         stripe.ca_bundle_path = os.environ['SSL_CERT_FILE']\n\
         client = stripe.StripeClient('latchkey.stripe-prod')\n\
         b = client.v1.balance.retrieve()\n\
         print(json.dumps({'object': b.object, 'amount': b.available[0].amount}))\n",
        &env,
    )
    .await;
    assert_eq!(v["object"], "balance", "{v}");
    assert_eq!(v["amount"], 4242, "{v}");
    let seen = w.the_request_to(&STRIPE);
    assert_eq!(
        (seen.method.as_str(), seen.uri.as_str()),
        ("GET", "/v1/balance")
    );
}

// ---------------------------------------------------------------------------------------------
// Node clients

#[tokio::test]
async fn undici_env_http_proxy_agent_through_the_tunnel() {
    let w = World::start().await;
    let env = w.env(None).await;
    let v = node(
        "import { EnvHttpProxyAgent, fetch } from 'undici';\n\
         const r = await fetch('https://api.anthropic.com/v1/messages', {\n\
         \x20 method: 'POST', dispatcher: new EnvHttpProxyAgent(),\n\
         \x20 headers: { 'x-api-key': 'latchkey.anthropic-prod',\n\
         \x20            'content-type': 'application/json' },\n\
         \x20 body: JSON.stringify({ model: 'claude-sonnet-4-5', max_tokens: 16,\n\
         \x20                        messages: [{ role: 'user', content: 'hello' }] }),\n\
         });\n\
         console.log(JSON.stringify({ status: r.status, body: await r.json() }));\n",
        &env,
    )
    .await;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(
        v["body"]["content"][0]["text"], "hello from the stand-in",
        "{v}"
    );
    let seen = w.the_request_to(&ANTHROPIC);
    assert_eq!(seen.uri, "/v1/messages");
}

#[tokio::test]
async fn undici_proxy_agent_through_the_tunnel_named_by_the_proxy_user() {
    let w = World::start().await;
    let env = w.env(Some(OPENAI.id)).await;
    let v = node(
        "import { ProxyAgent, fetch } from 'undici';\n\
         const dispatcher = new ProxyAgent(process.env.HTTPS_PROXY);\n\
         const r = await fetch('https://api.openai.com/v1/models', {\n\
         \x20 dispatcher, headers: { authorization: 'Bearer sk-from_the_workflow' },\n\
         });\n\
         console.log(JSON.stringify({ status: r.status, body: await r.json() }));\n",
        &env,
    )
    .await;
    assert_eq!(v["status"], 200, "{v}");
    let seen = w.the_request_to(&OPENAI);
    assert_eq!(seen.uri, "/v1/models");
}

/// axios tunnels by itself from 1.16.1 on (older versions send an `https://` request to the
/// proxy in cleartext); `https-proxy-agent` with `proxy: false` is the setup for any version.
#[tokio::test]
async fn axios_through_the_tunnel_by_itself_and_with_https_proxy_agent() {
    let w = World::start().await;
    let env = w.env(None).await;
    let v = node(
        "import axios from 'axios';\n\
         import { HttpsProxyAgent } from 'https-proxy-agent';\n\
         const headers = { Authorization: 'Bearer latchkey.stripe-prod' };\n\
         const url = 'https://api.stripe.com/v1/balance';\n\
         const own = await axios.get(url, { headers });\n\
         const agent = new HttpsProxyAgent(process.env.HTTPS_PROXY);\n\
         const r = await axios.get(url, { headers, httpsAgent: agent, proxy: false });\n\
         console.log(JSON.stringify({ own: own.data, agent: r.data }));\n",
        &env,
    )
    .await;
    assert_eq!(v["own"]["object"], "balance", "{v}");
    assert_eq!(v["agent"]["object"], "balance", "{v}");
    let seen = w.up.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    for s in &seen {
        assert_eq!(
            (s.host.as_str(), s.uri.as_str()),
            (STRIPE.host, "/v1/balance")
        );
        w.assert_only_ours(s, &STRIPE);
    }
    // Both went through CONNECT (nothing in cleartext to the proxy).
    let lines = w.lk.access_lines(2, |l| l["method"] == "GET").await;
    assert!(lines.iter().all(|l| l["form"] == "tunnel"), "{lines:#?}");
    let connects = w.lk.access_lines(2, |l| l["method"] == "CONNECT").await;
    assert!(
        connects.iter().all(|l| l["host"] == STRIPE.host),
        "{connects:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Gateway form: base URL `http://latchkey/{connection_id}`, API key = the client token

impl World {
    /// What an SDK in gateway form is given: no proxy, no CA, the client token as its key and
    /// latchkey's gateway URL for the connection as its base URL.
    fn gateway_env(&self, conn: &Conn) -> Vec<(String, String)> {
        vec![
            ("TOKEN".to_string(), TOKEN.to_string()),
            ("BASE".to_string(), self.lk.url(&format!("/{}", conn.id))),
        ]
    }
}

#[tokio::test]
async fn the_openai_sdk_in_gateway_form_with_the_client_token_as_its_key() {
    let w = World::start().await;
    let v = python(
        "import json, os\n\
         from openai import OpenAI\n\
         client = OpenAI(base_url=os.environ['BASE'] + '/v1', api_key=os.environ['TOKEN'])\n\
         r = client.chat.completions.create(model='gpt-4o-mini',\n\
         \x20   messages=[{'role': 'user', 'content': 'hello'}])\n\
         print(json.dumps({'content': r.choices[0].message.content}))\n",
        &w.gateway_env(&OPENAI),
    )
    .await;
    assert_eq!(v["content"], "hello from the stand-in", "{v}");
    let seen = w.the_request_to(&OPENAI);
    assert_eq!(
        (seen.method.as_str(), seen.uri.as_str()),
        ("POST", "/v1/chat/completions")
    );
}

#[tokio::test]
async fn the_anthropic_sdk_in_gateway_form_with_the_client_token_as_its_key() {
    let w = World::start().await;
    let v = python(
        "import json, os\n\
         from anthropic import Anthropic\n\
         client = Anthropic(base_url=os.environ['BASE'], api_key=os.environ['TOKEN'])\n\
         m = client.messages.create(model='claude-sonnet-4-5', max_tokens=16,\n\
         \x20   messages=[{'role': 'user', 'content': 'hello'}])\n\
         print(json.dumps({'text': m.content[0].text}))\n",
        &w.gateway_env(&ANTHROPIC),
    )
    .await;
    assert_eq!(v["text"], "hello from the stand-in", "{v}");
    let seen = w.the_request_to(&ANTHROPIC);
    assert_eq!(
        (seen.method.as_str(), seen.uri.as_str()),
        ("POST", "/v1/messages")
    );
}

#[tokio::test]
async fn the_stripe_sdk_in_gateway_form_with_the_client_token_as_its_key() {
    let w = World::start().await;
    let v = python(
        "import json, os, stripe\n\
         client = stripe.StripeClient(os.environ['TOKEN'],\n\
         \x20   base_addresses={'api': os.environ['BASE']})\n\
         b = client.v1.balance.retrieve()\n\
         print(json.dumps({'object': b.object, 'amount': b.available[0].amount}))\n",
        &w.gateway_env(&STRIPE),
    )
    .await;
    assert_eq!(v["object"], "balance", "{v}");
    assert_eq!(v["amount"], 4242, "{v}");
    let seen = w.the_request_to(&STRIPE);
    assert_eq!(
        (seen.method.as_str(), seen.uri.as_str()),
        ("GET", "/v1/balance")
    );
    // The key the SDK sent was taken as the client's token (latchkey is not open here).
    let line = w.lk.access_line(|l| l["connection"] == STRIPE.id).await;
    assert_eq!(
        (&line["client"], &line["form"]),
        (&"sdk".into(), &"gateway".into())
    );
}

// ---------------------------------------------------------------------------------------------
// Streaming

/// The openai SDK with `stream=True` prints each event as it arrives; the upstream sends each
/// event only once the test has read the one before. Buffered anywhere on the way, the first
/// event would never show, and the test would fail at its (generous) limit.
#[tokio::test]
async fn server_sent_events_through_the_tunnel_arrive_event_by_event() {
    let w = World::start().await;
    let env = w.env(None).await;
    let mut cmd = client("python3", &env);
    cmd.arg("-c")
        .arg(
            "import json\n\
             from openai import OpenAI\n\
             client = OpenAI(api_key='latchkey.openai-prod')\n\
             stream = client.chat.completions.create(model='gpt-4o-mini', stream=True,\n\
             \x20   messages=[{'role': 'user', 'content': 'hello'}])\n\
             for chunk in stream:\n\
             \x20   print(json.dumps({'content': chunk.choices[0].delta.content}), flush=True)\n\
             print(json.dumps({'done': True}), flush=True)\n",
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let limit = Duration::from_secs(30);
    for i in 0..EVENTS {
        w.up.release();
        let line = tokio::time::timeout(limit, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("event {i} did not arrive before the next was sent"))
            .unwrap();
        let Some(line) = line else {
            let out = child.wait_with_output().await.unwrap();
            panic!("the client ended: {}", String::from_utf8_lossy(&out.stderr));
        };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["content"], format!("event-{i}"), "{line}");
    }
    w.up.release(); // [DONE]
    let line = tokio::time::timeout(limit, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line.as_deref(), Some(r#"{"done": true}"#));
    let status = tokio::time::timeout(limit, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let seen = w.the_request_to(&OPENAI);
    assert_eq!(seen.uri, "/v1/chat/completions");
}

/// 100 MiB.
const BIG: u64 = 100 * 1024 * 1024;

/// `sha256sum FILE`: the hex digest.
async fn sha256_file(path: &Path) -> String {
    let out = tokio::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().unwrap().to_string()
}

/// Runs curl (with `--fail`) to its end; its standard output.
async fn curl_ok(mut cmd: tokio::process::Command) -> String {
    let out = cmd.output().await.unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// HTTP/1.1 on both sides of latchkey: through the debug builds that the tests run, h2 moves
/// 100 MiB about ten times slower (its frames, not latchkey's buffering: memory stays flat
/// there too), and the protocol is not the subject here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_upload_and_download_through_the_tunnel_keep_memory_flat() {
    let w = World::with_upstream(&[b"http/1.1"]).await;
    let env = w.env(Some(STRIPE.id)).await;
    let curl = |args: &[&str]| {
        let mut cmd = client("curl", &env);
        cmd.args(["-sS", "--fail", "--max-time", "60", "--http1.1"])
            .args(args);
        cmd
    };

    // Warm: the leaf certificate minted, the pools and the buffers of one exchange allocated.
    let text = curl_ok(curl(&["https://api.stripe.com/v1/balance"])).await;
    assert!(text.contains("balance"), "{text}");
    let before = peak_rss_kib(w.lk.pid());

    // Upload: a file of random bytes, PUT with its length.
    let up = w.dir.path().join("up.bin");
    let made = tokio::process::Command::new("head")
        .args(["-c", &BIG.to_string(), "/dev/urandom"])
        .stdout(std::fs::File::create(&up).unwrap())
        .status()
        .await
        .unwrap();
    assert!(made.success());
    let up_arg = up.display().to_string();
    let text = curl_ok(curl(&["-T", &up_arg, "https://api.stripe.com/upload"])).await;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sent = sha256_file(&up).await;
    assert_eq!(v["bytes"], BIG, "{v}");
    assert_eq!(v["sha256"], sent.as_str(), "{v}");
    assert_eq!(
        w.up.state.uploaded.lock().unwrap().clone(),
        Some((BIG, sent))
    );

    // Download: to a file, compared with what the upstream sent.
    let down = w.dir.path().join("down.bin");
    let down_arg = down.display().to_string();
    let url = format!("https://api.stripe.com/download/{BIG}");
    let size = curl_ok(curl(&["-o", &down_arg, "-w", "%{size_download}", &url])).await;
    assert_eq!(size.trim(), BIG.to_string());
    let got = (
        std::fs::metadata(&down).unwrap().len(),
        sha256_file(&down).await,
    );
    assert_eq!(w.up.state.sent.lock().unwrap().clone(), Some(got));

    // Neither body was held whole: latchkey's peak memory grew by far less than 100 MiB.
    let after = peak_rss_kib(w.lk.pid());
    let grew_mib = after.saturating_sub(before) / 1024;
    assert!(
        grew_mib < 40,
        "latchkey's peak RSS grew by {grew_mib} MiB ({before} KiB -> {after} KiB)"
    );
    for s in w.up.seen() {
        w.assert_only_ours(&s, &STRIPE);
    }
    assert_eq!(w.up.seen().len(), 3);
}
