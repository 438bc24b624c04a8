//! The red-team suite of PRODUCT.md section 10: one file per security property, each holding
//! the attacks on that property as tests, named after what they try. A test that fails is an
//! attack that worked.
//!
//! | property | file |
//! |---|---|
//! | 10.1 hosts, ports, redirects, path climbing | `hosts` |
//! | 10.2 the address check after resolution | `addresses` |
//! | 10.3 no secret in logs, metrics, errors, admin answers | `logs` |
//! | 10.4 exactly one credential, ours | `one_credential` |
//! | 10.5 control characters in stored values | `stored_values` |
//! | 10.6 tokens hashed, compared alike | `tokens` |
//! | 10.7 connection IDs and Vault paths | `ids` |
//! | 10.8 no credential back to the client | `echo` |
//! | 10.9 nobody holds resources for free | `resources` |
//!
//! (10.10, fuzzing, is the fuzz targets' own.) The attacks are written here from the published
//! technique lists (request smuggling, SSRF address forms, path traversal, header injection),
//! as exact bytes on raw sockets where the bytes are the point, inside tunnels too, and with
//! real clients (curl, Python requests) where a client's habits are. Each attack goes through
//! every request form it applies to: gateway (`/{id}/path`), forward (absolute-form with
//! `Proxy-Authorization`) and tunnel (`CONNECT`, then TLS or plain HTTP inside).
//!
//! This module holds what the files share: [`World`] (latchkey with its CA in front of a plain
//! and an HTTPS echo upstream), [`send`] in each [`Form`], a reader of one HTTP/1.1 answer off
//! any stream, a TLS client for tunnels that sends whatever SNI it is told, an upstream that
//! records the exact bytes it receives ([`Recorder`]), and [`assert_unsaid`], which looks for a
//! secret raw, in base64 and percent-encoded.

mod addresses;
mod echo;
mod hosts;
mod ids;
mod logs;
mod one_credential;
mod resources;
mod stored_values;
mod tokens;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub(crate) use crate::errors::Answer;
use crate::support::*;
use crate::tunnel::Ca;

// ---------------------------------------------------------------------------------------------
// Reading answers off raw streams

/// Reads one HTTP/1.x answer from `s` (bytes already read are in `buf`, and what follows the
/// answer is left there). `None` when the peer closed (or reset) before a whole head came.
/// Interim (1xx) answers are skipped. The body is framed by `Content-Length`, chunked, or read
/// to the end; `to_head` says that it has none.
pub(crate) async fn read_answer<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    to_head: bool,
) -> Option<Answer> {
    read_answer_to(s, buf, if to_head { "HEAD" } else { "GET" }).await
}

/// [`read_answer`] for an answer to `method`: to `HEAD` it has no body, nor to a `CONNECT`
/// when it is a 2xx.
pub(crate) async fn read_answer_to<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    method: &str,
) -> Option<Answer> {
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if fill(s, buf).await == 0 {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let no_body = method == "HEAD" || (method == "CONNECT" && (200..300).contains(&status));
        let chunked = get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        let length = get("content-length").and_then(|v| v.parse::<usize>().ok());
        let mut headers = headers;
        let body = if no_body || status == 204 || status == 304 || status == 101 {
            Vec::new()
        } else if chunked {
            let (body, trailers) = read_chunked(s, buf).await;
            // Trailers are kept with the headers, so that a search of the answer sees them.
            headers.extend(trailers);
            body
        } else if let Some(n) = length {
            while buf.len() < n {
                if fill(s, buf).await == 0 {
                    break;
                }
            }
            let n = n.min(buf.len());
            buf.drain(..n).collect()
        } else {
            while fill(s, buf).await > 0 {}
            std::mem::take(buf)
        };
        return Some(Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
}

/// Reads once into `buf`; 0 at the end, on an error, or after 30 s without a byte.
async fn fill<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 16 * 1024];
    match tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk)).await {
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            n
        }
        Ok(Err(_)) => 0,
        Err(_) => panic!("no byte for 30 s while reading an answer"),
    }
}

async fn read_line<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.drain(..i + 2);
            return Some(line);
        }
        if fill(s, buf).await == 0 {
            return None;
        }
    }
}

/// A chunked body and its trailers.
async fn read_chunked<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> (Vec<u8>, Vec<(String, String)>) {
    let mut body = Vec::new();
    let mut trailers = Vec::new();
    loop {
        let Some(line) = read_line(s, buf).await else {
            return (body, trailers);
        };
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("not a chunk size: {line:?}"));
        if size == 0 {
            // Trailers, up to the empty line.
            while let Some(l) = read_line(s, buf).await {
                if l.is_empty() {
                    break;
                }
                if let Some((n, v)) = l.split_once(':') {
                    trailers.push((n.trim().to_string(), v.trim().to_string()));
                }
            }
            return (body, trailers);
        }
        while buf.len() < size + 2 {
            if fill(s, buf).await == 0 {
                return (body, trailers);
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

/// Writes `bytes` as they are to `addr` and reads one answer (`None`: closed without one).
pub(crate) async fn raw(addr: SocketAddr, bytes: &[u8]) -> Option<Answer> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_answer(&mut s, &mut Vec::new(), false).await
}

// ---------------------------------------------------------------------------------------------
// A TLS client for tunnels

/// Accepts any certificate: the tests look at what latchkey does with the names a client
/// sends, so the client must be able to send any SNI (the leaf is latchkey's CA's either way).
#[derive(Debug)]
struct AnyCertificate;

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TLS over `io` with `sni` as the server name (none for an IP address), offering `alpn`.
pub(crate) async fn tls_client<IO>(
    io: IO,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, io)
        .await
}

/// Sends a CONNECT head to latchkey; the stream when it answers 200, its answer otherwise.
pub(crate) async fn open_tunnel(lk: &Latchkey, connect: &[u8]) -> Result<TcpStream, Answer> {
    let mut s = TcpStream::connect(lk.proxy).await.unwrap();
    s.write_all(connect).await.unwrap();
    let mut buf = Vec::new();
    let answer = read_answer_to(&mut s, &mut buf, "CONNECT")
        .await
        .expect("latchkey closed the connection without answering the CONNECT");
    if answer.status != 200 {
        return Err(answer);
    }
    assert!(buf.is_empty(), "bytes after the CONNECT's 200: {buf:?}");
    Ok(s)
}

/// `CONNECT {target}` with Basic proxy credentials `user:token` (none if `None`).
pub(crate) fn connect_head(target: &str, auth: Option<(&str, &str)>) -> Vec<u8> {
    let auth = auth.map_or(String::new(), |(u, t)| {
        format!("Proxy-Authorization: {}\r\n", basic(u, t))
    });
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n").into_bytes()
}

pub(crate) fn basic(user: &str, token: &str) -> String {
    crate::errors::basic(user, token)
}

// ---------------------------------------------------------------------------------------------
// The world most attacks run in, and the request forms

/// The request forms of PRODUCT.md section 1, and the tunnel's two kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// `/{id}{path}` to the proxy listener.
    Gateway,
    /// `http://{authority}{path}` with `Proxy-Authorization: Basic id:token`.
    Forward,
    /// `CONNECT {authority}` as `id:token`, then TLS (SNI the authority's host), then the request.
    Tunnel,
    /// `CONNECT {authority}`, then the request in plain HTTP.
    PlainTunnel,
}

pub(crate) const FORMS: [Form; 4] = [
    Form::Gateway,
    Form::Forward,
    Form::Tunnel,
    Form::PlainTunnel,
];

/// One request, as a client would write it in any form.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Req<'a> {
    pub id: &'a str,
    pub token: &'a str,
    pub method: &'a str,
    /// Path and query, as sent (in gateway form, what follows `/{id}`).
    pub path: &'a str,
    /// Further header lines, each ending in CRLF. When they hold a `Content-Length` or a
    /// `Transfer-Encoding`, the body goes as it is; otherwise a `Content-Length` is added for a
    /// body.
    pub headers: &'a str,
    pub body: &'a [u8],
}

impl<'a> Req<'a> {
    pub fn get(id: &'a str, path: &'a str) -> Req<'a> {
        Req {
            id,
            token: "",
            method: "GET",
            path,
            headers: "",
            body: b"",
        }
    }

    pub fn headers(mut self, headers: &'a str) -> Req<'a> {
        self.headers = headers;
        self
    }

    pub fn token(mut self, token: &'a str) -> Req<'a> {
        self.token = token;
        self
    }
}

/// The bytes of `req` with request target `target`, `Host: host`, and `auth` (a whole
/// `Proxy-Authorization` line or nothing); closing.
pub(crate) fn request_bytes(req: &Req<'_>, target: &str, host: &str, auth: &str) -> Vec<u8> {
    let lower = req.headers.to_ascii_lowercase();
    let framed = lower.contains("content-length") || lower.contains("transfer-encoding");
    let closing = if lower.starts_with("connection:") || lower.contains("\nconnection:") {
        ""
    } else {
        "Connection: close\r\n"
    };
    let length = if !framed && !req.body.is_empty() {
        format!("Content-Length: {}\r\n", req.body.len())
    } else {
        String::new()
    };
    let mut out = format!(
        "{} {target} HTTP/1.1\r\nHost: {host}\r\n{auth}{}{length}{closing}\r\n",
        req.method, req.headers
    )
    .into_bytes();
    out.extend_from_slice(req.body);
    out
}

/// Latchkey (with its CA, so that the tunnel form is on) in front of a plain echo upstream on
/// 127.0.0.1 and an HTTPS one (h2 and HTTP/1.1, a certificate for `localhost` and
/// `127.0.0.1`), on a prefix of the process's shared OpenBao.
pub(crate) struct World {
    // Dropped first: its drop checks its output for every secret.
    pub lk: Latchkey,
    pub plain: EchoServer,
    pub secure: EchoServer,
    _ca: Ca,
    _up_ca: TestCa,
    pub bao: Bao,
}

impl World {
    /// Starts the upstreams, lets `setup` write connections (it gets the OpenBao handle, the
    /// plain base URL `http://127.0.0.1:P` and the secure one `https://localhost:Q`), then
    /// starts latchkey with `opts` (plus the upstreams' CA as a root and latchkey's CA).
    pub async fn start(opts: Opts, setup: impl FnOnce(&Bao, &str, &str)) -> World {
        let bao = Bao::start().await;
        let up_ca = TestCa::new();
        let plain = echo().await;
        let secure = echo_tls(&up_ca, &[b"h2", b"http/1.1"]).await;
        let plain_base = format!("http://{}", plain.addr());
        let secure_base = format!("https://localhost:{}", secure.addr().port());
        setup(&bao, &plain_base, &secure_base);
        let ca = Ca::init().await;
        let lk = Latchkey::start(&bao, with_ca(opts.root(&up_ca.pem_path), &ca)).await;
        ca.forbid_key(&lk);
        World {
            lk,
            plain,
            secure,
            _ca: ca,
            _up_ca: up_ca,
            bao,
        }
    }

    /// `localhost:Q`, the HTTPS upstream as forward and tunnel requests name it.
    pub fn secure_authority(&self) -> String {
        format!("localhost:{}", self.secure.addr().port())
    }

    /// Sends `req` in `form` to the HTTPS upstream's connection `req.id` (forward and tunnel
    /// forms name `localhost:Q`; forward form is upgraded to TLS by the https base URL).
    /// `None`: latchkey closed the connection without an answer. A refused CONNECT is its
    /// answer.
    pub async fn send(&self, form: Form, req: &Req<'_>) -> Option<Answer> {
        send(&self.lk, form, &self.secure_authority(), req).await
    }

    /// Requests to both upstreams so far.
    pub fn upstream_requests(&self) -> u64 {
        self.plain.requests() + self.secure.requests()
    }
}

/// `opts` with latchkey's CA (`tls.ca_cert`, `tls.ca_key`).
pub(crate) fn with_ca(opts: Opts, ca: &Ca) -> Opts {
    opts.tls(&format!("ca_cert = {:?}", ca.cert.display().to_string()))
        .tls(&format!("ca_key = {:?}", ca.key.display().to_string()))
}

/// Sends `req` in `form`, to `authority` in forward and tunnel forms.
pub(crate) async fn send(
    lk: &Latchkey,
    form: Form,
    authority: &str,
    req: &Req<'_>,
) -> Option<Answer> {
    let auth = format!("Proxy-Authorization: {}\r\n", basic(req.id, req.token));
    let to_head = req.method == "HEAD";
    match form {
        Form::Gateway => {
            let target = format!("/{}{}", req.id, req.path);
            let auth = if req.token.is_empty() {
                String::new()
            } else {
                format!("Proxy-Authorization: Bearer {}\r\n", req.token)
            };
            let bytes = request_bytes(req, &target, "latchkey", &auth);
            raw(lk.proxy, &bytes).await
        }
        Form::Forward => {
            let target = format!("http://{authority}{}", req.path);
            raw(lk.proxy, &request_bytes(req, &target, authority, &auth)).await
        }
        Form::Tunnel | Form::PlainTunnel => {
            let s = match open_tunnel(lk, &connect_head(authority, Some((req.id, req.token)))).await
            {
                Ok(s) => s,
                Err(answer) => return Some(answer),
            };
            let bytes = request_bytes(req, req.path, authority, "");
            if form == Form::PlainTunnel {
                let mut s = s;
                s.write_all(&bytes).await.unwrap();
                return read_answer(&mut s, &mut Vec::new(), to_head).await;
            }
            let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
            let mut tls = tls_client(s, host.trim_matches(['[', ']']), &[b"http/1.1"])
                .await
                .unwrap();
            tls.write_all(&bytes).await.unwrap();
            read_answer(&mut tls, &mut Vec::new(), to_head).await
        }
    }
}

/// Asserts that latchkey refused with `status` and `code`, its own error.
#[track_caller]
pub(crate) fn assert_refused(got: &Option<Answer>, status: u16, code: &str, what: &str) {
    let a = got
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: closed without an answer, wanted {status} {code}"));
    assert_eq!(
        (a.status, a.header("latchkey-error")),
        (status, Some(code)),
        "{what}: {a:#?}"
    );
}

/// The echo upstream's description of what it received, from an answer.
#[track_caller]
pub(crate) fn echoed(got: &Option<Answer>, what: &str) -> Echoed {
    let a = got
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: closed without an answer"));
    assert_eq!(a.status, 200, "{what}: {a:#?}");
    assert_eq!(a.header("latchkey-error"), None, "{what}: {a:#?}");
    Echoed {
        status: a.status,
        json: a.json(),
        latchkey_error: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Vault

/// Writes connection `id` through OpenBao's HTTP API (so that any string can be stored, NUL
/// included: the CLI takes arguments). Every value of a non-reserved field is registered as a
/// secret latchkey must never print.
pub(crate) async fn put_json(bao: &Bao, id: &str, fields: &[(&str, &str)]) {
    let reserved = latchkey::record::RESERVED_FIELDS;
    let mut data = serde_json::Map::new();
    for (k, v) in fields {
        if !reserved.contains(k) {
            bao.secrets.add(*v);
        }
        data.insert(k.to_string(), serde_json::Value::String(v.to_string()));
    }
    let r = http()
        .post(format!("{}/v1/secret/data/{}", bao.addr, bao.path(id)))
        .header("X-Vault-Token", &bao.token)
        .json(&serde_json::json!({ "data": data }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "writing {id}: {r:?}");
}

/// Latchkey's own count of Vault reads of connections, from its metrics.
pub(crate) async fn vault_reads(lk: &Latchkey) -> f64 {
    crate::errors::metrics_text(lk)
        .await
        .lines()
        .filter(|l| l.starts_with("latchkey_vault_requests_total{") && l.contains("op=\"read\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Secrets in text

/// Every form in which `secret` could be said: raw, percent-encoded (upper and lower case hex,
/// `+` for space or not), and base64 (standard and URL-safe, alone or inside a longer value).
pub(crate) fn spellings(secret: &str) -> Vec<String> {
    let mut out = vec![secret.to_string()];
    let pct: String =
        percent_encoding::utf8_percent_encode(secret, percent_encoding::NON_ALPHANUMERIC).collect();
    out.push(pct.clone());
    out.push(lower_hex_escapes(&pct));
    let unreserved: String = percent_encoding::utf8_percent_encode(secret, QUERY).collect();
    out.push(unreserved.clone());
    out.push(lower_hex_escapes(&unreserved));
    for b in [
        base64::engine::general_purpose::STANDARD.encode(secret),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
    ] {
        out.push(b.trim_end_matches('=').to_string());
    }
    out.extend(base64_cores(secret.as_bytes()));
    out.sort();
    out.dedup();
    out
}

/// What a query value encoder leaves alone: RFC 3986's unreserved characters.
const QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn lower_hex_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '%' {
            for _ in 0..2 {
                if let Some(h) = chars.next() {
                    out.push(h.to_ascii_lowercase());
                }
            }
        }
    }
    out
}

/// Panics if `text` says `secret` in any of its [`spellings`].
#[track_caller]
pub(crate) fn assert_unsaid(text: &str, secret: &str, what: &str) {
    for form in spellings(secret) {
        assert!(
            !text.contains(&form),
            "{what} holds the secret {secret:?} (as {form:?}): {text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// An upstream that records exact bytes

/// One request as a [`Recorder`] read it.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    /// The request line.
    pub line: String,
    /// Header lines as received (name and value).
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What a [`Recorder`] has seen: the requests it parsed, and per connection every byte.
#[derive(Default)]
pub(crate) struct Seen {
    pub requests: Vec<Recorded>,
    pub connections: Vec<Vec<u8>>,
    /// What a strict server would have refused, one entry per connection it ended.
    pub trouble: Vec<String>,
}

/// A raw HTTP/1.1 upstream on 127.0.0.1 that keeps every byte it receives and parses requests
/// strictly by RFC 9112 (one `Content-Length`, or `Transfer-Encoding: chunked` alone), so that
/// what latchkey sends is seen as a strict server sees it. Each request gets a 200 whose body
/// is its request line; anything it cannot frame ends the connection and is kept as trouble.
pub(crate) struct Recorder {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
}

impl Recorder {
    pub async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = {
                    let mut s = shared.lock().unwrap();
                    s.connections.push(Vec::new());
                    s.connections.len() - 1
                };
                tokio::spawn(record(stream, shared.clone(), index));
            }
        });
        Recorder { addr, seen }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().requests.clone()
    }

    /// What a strict server would have refused.
    pub fn trouble(&self) -> Vec<String> {
        self.seen.lock().unwrap().trouble.clone()
    }
}

async fn record(mut stream: TcpStream, seen: Arc<Mutex<Seen>>, index: usize) {
    if let Err(trouble) = record_requests(&mut stream, &seen, index).await {
        let _ = stream
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        seen.lock().unwrap().trouble.push(trouble);
    }
}

/// Reads requests until the connection ends between two of them or inside a body (`Ok`: a
/// sender that gives up on a body it cannot finish closes the connection), or until something a
/// strict server would refuse comes (`Err`, saying what).
async fn record_requests(
    stream: &mut TcpStream,
    seen: &Mutex<Seen>,
    index: usize,
) -> Result<(), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    // Reads more; `Ok(false)` at the end of the connection.
    macro_rules! more {
        () => {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => false,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    seen.lock().unwrap().connections[index].extend_from_slice(&chunk[..n]);
                    true
                }
            }
        };
    }
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if !more!() {
                return if buf.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "the connection ended inside a head: {:?}",
                        String::from_utf8_lossy(&buf)
                    ))
                };
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        for l in lines {
            let Some((n, v)) = l.split_once(':') else {
                return Err(format!("not a header line: {l:?}"));
            };
            if n.is_empty() || n.ends_with([' ', '\t']) || l.contains('\n') {
                return Err(format!("not a header line: {l:?}"));
            }
            headers.push((n.to_string(), v.trim().to_string()));
        }
        let named = |name: &str| -> Vec<String> {
            headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .collect()
        };
        let te = named("transfer-encoding");
        let cl = named("content-length");
        // The body is read to find where the next request starts; only its framing matters.
        match (te.as_slice(), cl.as_slice()) {
            ([], []) => {}
            ([], [n]) => {
                let n: usize = n.parse().map_err(|_| format!("Content-Length {n:?}"))?;
                while buf.len() < n {
                    if !more!() {
                        return Ok(()); // latchkey gave up on the body: nothing more is sent
                    }
                }
                buf.drain(..n);
            }
            ([t], []) if t.eq_ignore_ascii_case("chunked") => loop {
                let line_end = loop {
                    if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    if !more!() {
                        return Ok(()); // latchkey gave up on the body
                    }
                };
                let size_line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
                buf.drain(..line_end + 2);
                let size = usize::from_str_radix(&size_line, 16)
                    .map_err(|_| format!("chunk size {size_line:?}"))?;
                while buf.len() < size + 2 {
                    if !more!() {
                        return Ok(()); // latchkey gave up on the body
                    }
                }
                if &buf[size..size + 2] != b"\r\n" {
                    return Err("a chunk longer than its size".into());
                }
                buf.drain(..size + 2);
                if size == 0 {
                    break;
                }
            },
            _ => return Err(format!("framing {te:?} {cl:?}")),
        }
        let answer = line.clone();
        seen.lock()
            .unwrap()
            .requests
            .push(Recorded { line, headers });
        let out = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if stream.write_all(out.as_bytes()).await.is_err() {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// An upstream that answers from a script

/// What a [`ScriptedUpstream`] answers: a status, header lines, and the body as frames (each
/// its own chunk in HTTP/1.1 when no `Content-Length` is given, its own DATA frame in h2).
pub(crate) struct Scripted {
    pub status: u16,
    /// An HTTP/1.1 reason phrase other than the status's own.
    pub reason: Option<String>,
    pub headers: Vec<(String, String)>,
    pub frames: Vec<Vec<u8>>,
    pub trailers: Vec<(String, String)>,
}

impl Scripted {
    pub fn new(status: u16) -> Scripted {
        Scripted {
            status,
            reason: None,
            headers: Vec::new(),
            frames: Vec::new(),
            trailers: Vec::new(),
        }
    }

    pub fn reason(mut self, reason: &str) -> Scripted {
        self.reason = Some(reason.to_string());
        self
    }

    pub fn trailer(mut self, name: &str, value: &str) -> Scripted {
        self.trailers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Scripted {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn frame(mut self, bytes: impl Into<Vec<u8>>) -> Scripted {
        self.frames.push(bytes.into());
        self
    }
}

type ScriptFn = dyn Fn(&http::request::Parts) -> Scripted + Send + Sync;

/// A real HTTP/1.1 and h2 server (plain, or TLS with a certificate for `localhost` and
/// `127.0.0.1`) on 127.0.0.1 that answers each request as `script` says, from its head.
pub(crate) struct ScriptedUpstream {
    pub addr: SocketAddr,
    requests: Arc<std::sync::atomic::AtomicU64>,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl ScriptedUpstream {
    pub async fn start(
        tls: Option<Arc<rustls::ServerConfig>>,
        script: impl Fn(&http::request::Parts) -> Scripted + Send + Sync + 'static,
    ) -> ScriptedUpstream {
        use http_body_util::BodyExt as _;
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let script: Arc<ScriptFn> = Arc::new(script);
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let counter = requests.clone();
        tokio::spawn(async move {
            loop {
                let mut stop = stopped.clone();
                let stream = tokio::select! {
                    _ = stop.changed() => return,
                    r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                };
                let _ = stream.set_nodelay(true);
                let script = script.clone();
                let counter = counter.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let (parts, body) = req.into_parts();
                            let s = script(&parts);
                            async move {
                                // The request body is read first, as a server does before it answers.
                                let _ = body.collect().await;
                                let mut trailers = http::HeaderMap::new();
                                for (n, v) in &s.trailers {
                                    trailers.append(
                                        http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                                        http::HeaderValue::from_bytes(v.as_bytes()).unwrap(),
                                    );
                                }
                                let mut frames: Vec<hyper::body::Frame<bytes::Bytes>> = s
                                    .frames
                                    .into_iter()
                                    .map(|f| hyper::body::Frame::data(bytes::Bytes::from(f)))
                                    .collect();
                                if !trailers.is_empty() {
                                    frames.push(hyper::body::Frame::trailers(trailers));
                                }
                                let frames = futures_util::stream::iter(
                                    frames.into_iter().map(Ok::<_, std::convert::Infallible>),
                                );
                                let mut r =
                                    http::Response::new(http_body_util::StreamBody::new(frames));
                                *r.status_mut() = http::StatusCode::from_u16(s.status).unwrap();
                                if let Some(reason) = s.reason {
                                    let reason =
                                        hyper::ext::ReasonPhrase::try_from(reason.into_bytes())
                                            .unwrap();
                                    r.extensions_mut().insert(reason);
                                }
                                for (n, v) in s.headers {
                                    r.headers_mut().append(
                                        http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                                        http::HeaderValue::from_bytes(v.as_bytes()).unwrap(),
                                    );
                                }
                                Ok::<_, std::convert::Infallible>(r)
                            }
                        },
                    );
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
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
                        _ = stop.changed() => {}
                    }
                });
            }
        });
        ScriptedUpstream {
            addr,
            requests,
            _stop: stop,
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------------
// h2

/// What an h2 exchange got: the status, headers and body, or the stream's error (a reset).
#[derive(Debug)]
pub(crate) struct H2Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
    pub trailers: Option<http::HeaderMap>,
}

impl H2Answer {
    pub fn latchkey_error(&self) -> Option<&str> {
        self.headers
            .get("latchkey-error")
            .and_then(|v| v.to_str().ok())
    }
}

/// Sends one h2 request over `io` (prior knowledge on a plain socket, or TLS with ALPN h2),
/// with `body` (and `trailers`) if given.
pub(crate) async fn h2_request<IO>(
    io: IO,
    req: http::Request<()>,
    body: Option<&[u8]>,
    trailers: Option<http::HeaderMap>,
) -> Result<H2Answer, String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (client, conn) = h2::client::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let ends = body.is_none() && trailers.is_none();
    let (response, mut stream) = client.send_request(req, ends).map_err(|e| e.to_string())?;
    if let Some(body) = body {
        stream
            .send_data(bytes::Bytes::copy_from_slice(body), trailers.is_none())
            .map_err(|e| e.to_string())?;
    }
    if let Some(t) = trailers {
        stream.send_trailers(t).map_err(|e| e.to_string())?;
    }
    let response = tokio::time::timeout(Duration::from_secs(30), response)
        .await
        .map_err(|_| "no h2 answer within 30 s".to_string())?
        .map_err(|e| e.to_string())?;
    let (parts, mut body) = response.into_parts();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    let mut text = String::from_utf8_lossy(&out).into_owned();
    // The echo upstream's description, hex-encoded so that scrubbing leaves it alone, read as
    // the JSON it is (as `read` and `Answer::json` do for HTTP/1.1 answers).
    let hex_echo = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == ECHO_HEX.as_bytes());
    if hex_echo {
        text = echo_text(&text);
    }
    Ok(H2Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: text,
        trailers,
    })
}

/// An h2 request inside a TLS tunnel to `authority` as `id` (no token).
pub(crate) async fn h2_in_tunnel(
    lk: &Latchkey,
    authority: &str,
    id: &str,
    req: http::Request<()>,
    body: Option<&[u8]>,
    trailers: Option<http::HeaderMap>,
) -> Result<H2Answer, String> {
    let s = open_tunnel(lk, &connect_head(authority, Some((id, ""))))
        .await
        .map_err(|a| format!("CONNECT refused: {a:?}"))?;
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let tls = tls_client(s, host, &[b"h2"])
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "latchkey did not choose h2 inside the tunnel"
    );
    h2_request(tls, req, body, trailers).await
}
