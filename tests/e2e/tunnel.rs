//! PRODUCT.md section 1, the tunnel form: `CONNECT api.stripe.com:443` with the connection ID
//! as the proxy user, then TLS to latchkey (a leaf certificate minted by latchkey's own CA), and
//! every inner request goes out with the connection's credential in place of the client's.
//! Also: the CA (`latchkey ca init`, `ca export`, `GET /ca.pem`, its key never shown), each
//! refusal of a CONNECT (407, 403, 404, 400) and of an inner request whose SNI or `Host` is not
//! the CONNECT host (421), plain HTTP inside a CONNECT, and the access lines of all of these.
//!
//! "api.stripe.com" is an echo upstream on loopback with a certificate for that name from a
//! test CA, reached through `proxy.resolve`; the real Stripe is never dialled.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;

use crate::errors::{client_toml, metrics_text, Answer};
use crate::support::*;

pub(crate) const STRIPE: &str = "api.stripe.com";
pub(crate) const ID: &str = "stripe-prod";
const TOKEN: &str = "tunnel-client-token-0123456789";

// ---------------------------------------------------------------------------------------------
// Helpers

/// latchkey's CA, made with `latchkey ca init` in a directory of its own.
pub(crate) struct Ca {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    _dir: tempfile::TempDir,
}

/// What a run of the latchkey binary printed.
pub(crate) struct Run {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `latchkey {args}` (no config, no Vault needed).
async fn latchkey_cli(args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(args)
        .env_remove("VAULT_ADDR")
        .env_remove("VAULT_TOKEN")
        .output()
        .await
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ca_init(cert: &Path, key: &Path) -> Run {
    latchkey_cli(&[
        "ca",
        "init",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ])
    .await
}

impl Ca {
    pub(crate) async fn init() -> Ca {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("ca.pem");
        let key = dir.path().join("ca-key.pem");
        let run = ca_init(&cert, &key).await;
        assert_eq!(
            run.code,
            Some(0),
            "latchkey ca init failed:\n{}{}",
            run.stdout,
            run.stderr
        );
        Ca {
            cert,
            key,
            _dir: dir,
        }
    }

    /// `opts` with this CA as latchkey's (`tls.ca_cert`, `tls.ca_key`): the tunnel form needs
    /// one configured, even for a tunnel that turns out plain.
    pub(crate) fn configured(&self, opts: Opts) -> Opts {
        opts.tls(&format!("ca_cert = {:?}", self.cert.display().to_string()))
            .tls(&format!("ca_key = {:?}", self.key.display().to_string()))
    }

    fn cert_pem(&self) -> String {
        std::fs::read_to_string(&self.cert).unwrap()
    }

    fn key_pem(&self) -> String {
        std::fs::read_to_string(&self.key).unwrap()
    }

    /// The forms in which the CA key could leak: the whole PEM text and each line of its
    /// base64 body (short last lines left out: they could match by chance).
    fn key_forms(&self) -> Vec<String> {
        key_forms(&self.key_pem())
    }

    /// Registers the CA key with latchkey's leak check.
    pub(crate) fn forbid_key(&self, lk: &Latchkey) {
        for form in self.key_forms() {
            lk.forbid(&form);
        }
    }

    fn assert_key_absent(&self, text: &str, what: &str) {
        for form in self.key_forms() {
            assert!(!text.contains(&form), "{what} holds the CA private key");
        }
    }
}

pub(crate) fn key_forms(pem: &str) -> Vec<String> {
    let mut forms = vec![pem.trim().to_string()];
    forms.extend(
        pem.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .map(str::to_string),
    );
    forms
}

/// A Stripe key of the built-in connector's pattern, unique to the test.
pub(crate) fn stripe_key() -> String {
    format!("sk_test_{}x{}tunnel", std::process::id(), free_port())
}

/// An HTTPS echo upstream on 127.0.0.1 with a certificate for `api.stripe.com` from `ca`,
/// offering h2 and HTTP/1.1.
pub(crate) async fn stripe_upstream(ca: &TestCa) -> EchoServer {
    EchoServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Some(ca.server_config(&[STRIPE], &[b"h2", b"http/1.1"])),
    )
    .await
    .unwrap()
}

/// `base` with what a tunnel needs: the upstream's CA as a root, `api.stripe.com:443` pinned
/// to `to` (and `:80`, which a CONNECT to port 80 checks; what goes inside is sent over TLS to
/// 443), and latchkey's CA.
fn tunnel_opts(base: Opts, up_ca: &TestCa, ca: &Ca, to: SocketAddr) -> Opts {
    base.root(&up_ca.pem_path)
        .proxy(&format!(
            "resolve = {{ \"{STRIPE}:443\" = \"{to}\", \"{STRIPE}:80\" = \"{to}\" }}"
        ))
        .tls(&format!("ca_cert = {:?}", ca.cert.display().to_string()))
        .tls(&format!("ca_key = {:?}", ca.key.display().to_string()))
}

/// The world of most tests: connection `stripe-prod` (built-in `stripe` connector) in
/// OpenBao, "api.stripe.com" as an echo upstream, latchkey with its CA and `proxy.resolve`.
pub(crate) struct Stripe {
    // Dropped first: its drop checks its output for every secret, the CA key included.
    lk: Latchkey,
    up: EchoServer,
    pub(crate) key: String,
    ca: Ca,
    _up_ca: TestCa,
    _bao: Bao,
}

impl Stripe {
    /// Starts it all; `base` is `Opts::loopback()` (the upstream is on loopback) plus whatever
    /// the test adds (`[[clients]]`).
    pub(crate) async fn start(base: Opts) -> Stripe {
        let bao = Bao::start().await;
        let up_ca = TestCa::new();
        let up = stripe_upstream(&up_ca).await;
        let key = stripe_key();
        bao.put(ID, &[("connector", "stripe"), ("api_key", &key)]);
        let ca = Ca::init().await;
        let lk = Latchkey::start(&bao, tunnel_opts(base, &up_ca, &ca, up.addr())).await;
        ca.forbid_key(&lk);
        Stripe {
            lk,
            up,
            key,
            ca,
            _up_ca: up_ca,
            _bao: bao,
        }
    }

    /// curl through the tunnel to `https://api.stripe.com{path}` with `user` (`id:token`) as
    /// its proxy credentials and latchkey's CA as its only trust; `extra` goes before the URL.
    async fn curl(&self, user: &str, extra: &[&str], path: &str) -> (u16, String) {
        let proxy = format!("http://{}", self.lk.proxy);
        let cacert = self.ca.cert.display().to_string();
        let url = format!("https://{STRIPE}{path}");
        let mut args = vec![
            "--proxy",
            proxy.as_str(),
            "--proxy-user",
            user,
            "--cacert",
            cacert.as_str(),
        ];
        args.extend_from_slice(extra);
        args.push(url.as_str());
        curl(&args).await
    }

    /// A raw exchange through latchkey (see [`exchange`]), TLS verified against its CA.
    /// `CONNECT target` as `user` (no token); if accepted, TLS naming api.stripe.com and a
    /// `GET /v1/x` inside.
    async fn connect_as(&self, target: &str, user: &str) -> Exchange {
        self.exchange(
            &connect_head(target, Some((user, ""))),
            Some(STRIPE),
            &inner_get("/v1/x", STRIPE),
        )
        .await
    }

    pub(crate) async fn exchange(
        &self,
        connect: &str,
        sni: Option<&str>,
        request: &str,
    ) -> Exchange {
        exchange(
            &self.lk,
            connect,
            sni.map(|s| (self.ca.cert.as_path(), s)),
            request,
        )
        .await
    }
}

/// Asserts that the echo upstream saw exactly our credential and none of the client's.
#[track_caller]
pub(crate) fn assert_ours(echo: &serde_json::Value, key: &str) {
    let echoed = Echoed {
        status: 200,
        json: echo.clone(),
        latchkey_error: None,
    };
    assert_eq!(
        echoed.header_values("authorization"),
        vec![format!("Bearer {key}")],
        "the upstream's Authorization: {echo}"
    );
    assert!(
        echoed.header_values("proxy-authorization").is_empty(),
        "Proxy-Authorization reached the upstream: {echo}"
    );
}

/// The status line of the last answer in curl -i output (`HTTP/2 200`, `HTTP/1.1 200 OK`).
fn last_status_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| l.starts_with("HTTP/"))
        .unwrap_or_default()
}

/// `Proxy-Authorization: Basic base64(user:password)`.
fn basic(user: &str, password: &str) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {b}")
}

/// A CONNECT request head to `target`, with Basic proxy credentials if given.
pub(crate) fn connect_head(target: &str, auth: Option<(&str, &str)>) -> String {
    let auth = auth.map_or(String::new(), |(u, p)| {
        format!("Proxy-Authorization: {}\r\n", basic(u, p))
    });
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n")
}

/// An inner request (HTTP/1.1, closing) for `path` with the given `Host`.
pub(crate) fn inner_get(path: &str, host: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}

/// What a raw CONNECT exchange got: latchkey's answer to the CONNECT, and the answer to the
/// inner request when the CONNECT was accepted.
#[derive(Debug)]
pub(crate) struct Exchange {
    pub(crate) connect: Answer,
    inner: Option<Answer>,
}

impl Exchange {
    /// The CONNECT itself was refused with latchkey's error `status` / `code`.
    #[track_caller]
    pub(crate) fn assert_connect_refused(&self, status: u16, code: &str) {
        assert!(
            self.inner.is_none(),
            "the CONNECT was accepted, wanted {status} {code}: {self:#?}"
        );
        self.connect.assert_error(status, code);
    }

    /// The CONNECT was accepted with 200; the inner answer.
    #[track_caller]
    pub(crate) fn inner(&self) -> &Answer {
        assert_eq!(self.connect.status, 200, "{self:#?}");
        self.inner
            .as_ref()
            .unwrap_or_else(|| panic!("no inner answer: {self:#?}"))
    }
}

/// Python's `socket` and `ssl`, byte by byte: sends the CONNECT head, reads the answer; if it
/// is 200, wraps the socket in TLS (when `SNI` is set: latchkey's CA trusted, the name not
/// checked, so that any SNI can be sent) and sends `REQUEST` as it is. Prints both answers.
const EXCHANGE_PY: &str = r#"
import json, os, socket, ssl

def dechunk(raw):
    out = b''
    while raw:
        size, _, rest = raw.partition(b'\r\n')
        n = int(size.split(b';')[0].strip() or b'0', 16)
        if n == 0:
            break
        out += rest[:n]
        raw = rest[n + 2:]
    return out

def read_answer(sock, connect=False):
    head = b''
    while b'\r\n\r\n' not in head:
        c = sock.recv(1)
        if not c:
            raise SystemExit('closed before an answer: %r' % head)
        head += c
    lines = head.decode('latin-1').split('\r\n')
    status = int(lines[0].split(' ')[1])
    headers = [[k.strip(), v.strip()] for k, v in (l.split(':', 1) for l in lines[1:] if ':' in l)]
    h = {k.lower(): v for k, v in headers}
    body = b''
    if connect and status == 200:
        pass
    elif 'content-length' in h:
        n = int(h['content-length'])
        while len(body) < n:
            c = sock.recv(n - len(body))
            if not c:
                break
            body += c
    elif h.get('transfer-encoding', '').lower() == 'chunked':
        raw = b''
        while not raw.endswith(b'0\r\n\r\n'):
            c = sock.recv(65536)
            if not c:
                break
            raw += c
        body = dechunk(raw)
    else:
        while True:
            try:
                c = sock.recv(65536)
            except (ssl.SSLError, OSError):
                break
            if not c:
                break
            body += c
    return {'status': status, 'headers': headers, 'body': body.decode('utf-8', 'replace')}

s = socket.create_connection(('127.0.0.1', int(os.environ['LK_PORT'])), timeout=30)
s.sendall(os.environ['CONNECT'].encode())
connect = read_answer(s, connect=True)
inner = None
if connect['status'] == 200:
    sock = s
    if os.environ.get('SNI'):
        ctx = ssl.create_default_context(cafile=os.environ['CA'])
        ctx.check_hostname = False
        sock = ctx.wrap_socket(s, server_hostname=os.environ['SNI'])
    sock.sendall(os.environ['REQUEST'].encode())
    inner = read_answer(sock)
print(json.dumps({'connect': connect, 'inner': inner}))
"#;

/// Sends `connect` (a CONNECT head) to latchkey's proxy listener; if it is accepted, sends
/// `request` inside: over TLS with `tls = (latchkey CA, SNI)`, in the clear without.
pub(crate) async fn exchange(
    lk: &Latchkey,
    connect: &str,
    tls: Option<(&Path, &str)>,
    request: &str,
) -> Exchange {
    let port = lk.proxy.port().to_string();
    let (ca, sni) = tls.map_or((String::new(), String::new()), |(ca, sni)| {
        (ca.display().to_string(), sni.to_string())
    });
    let out = python(
        EXCHANGE_PY,
        &[
            ("LK_PORT", &port),
            ("CONNECT", connect),
            ("REQUEST", request),
            ("CA", &ca),
            ("SNI", &sni),
        ],
    )
    .await;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out}"));
    Exchange {
        connect: answer(&v["connect"]),
        inner: (!v["inner"].is_null()).then(|| answer(&v["inner"])),
    }
}

fn answer(v: &serde_json::Value) -> Answer {
    Answer {
        status: v["status"].as_u64().unwrap() as u16,
        headers: v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h[0].as_str().unwrap().to_string(),
                    h[1].as_str().unwrap().to_string(),
                )
            })
            .collect(),
        body: v["body"].as_str().unwrap_or_default().to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Through the tunnel

#[tokio::test]
async fn curl_through_the_tunnel_gets_the_connection_key_over_h2_and_http1() {
    let s = Stripe::start(Opts::loopback()).await;

    // No [[clients]], on loopback: open, so the token may be empty or anything.
    for (user, version, client_line) in [
        (format!("{ID}:"), "--http2", "HTTP/2 200"),
        (format!("{ID}:anything"), "--http1.1", "HTTP/1.1 200"),
    ] {
        let (status, text) = s.curl(&user, &[version], "/v1/charges?limit=3").await;
        assert_eq!(status, 200, "{version}: {text}");
        assert!(
            last_status_line(&text).starts_with(client_line),
            "{version}: the client spoke {:?} inside the tunnel: {text}",
            last_status_line(&text)
        );
        let echo = body_json(&text);
        assert_ours(&echo, &s.key);
        assert_eq!(echo["uri"], "/v1/charges?limit=3", "{version}: {echo}");
        if version == "--http2" {
            assert_eq!(echo["version"], "HTTP/2.0", "{echo}");
        }
        // (The echo upstream quotes the key back in its body; keeping an upstream's echo of the
        // key from the client is response scrubbing, PRODUCT.md section 4 step 7, issue 10.)
    }
    assert_eq!(s.up.requests(), 2);
}

#[tokio::test]
async fn curl_through_the_tunnel_with_a_configured_client_token() {
    let clients = client_toml("t", TOKEN, &["stripe-*"]);
    let s = Stripe::start(Opts::loopback().extra(&clients)).await;
    s.lk.forbid(TOKEN);

    let (status, text) = s
        .curl(&format!("{ID}:{TOKEN}"), &[], "/v1/charges?limit=3")
        .await;
    assert_eq!(status, 200, "{text}");
    let echo = body_json(&text);
    assert_ours(&echo, &s.key);
    assert_eq!(echo["uri"], "/v1/charges?limit=3", "{echo}");
    assert!(!text.contains(TOKEN), "the client token came back: {text}");

    // The token given to the SDK as well, where other connectors' keys go: taken out, not sent
    // on (the echo would quote it; the access log would hold the query: `forbid`).
    let (status, text) = s
        .curl(
            &format!("{ID}:{TOKEN}"),
            &[
                "-H",
                &format!("x-api-key: {TOKEN}"),
                "-H",
                &format!("x-trace: run {TOKEN}"),
            ],
            &format!("/v1/charges?limit=3&key={TOKEN}"),
        )
        .await;
    assert_eq!(status, 200, "{text}");
    let echo = body_json(&text);
    assert_ours(&echo, &s.key);
    assert_eq!(echo["uri"], "/v1/charges?limit=3", "{echo}");
    assert!(!text.contains(TOKEN), "the client token went on: {text}");
    assert_eq!(s.up.requests(), 2);
}

#[tokio::test]
async fn python_requests_through_https_proxy_has_its_authorization_replaced() {
    let s = Stripe::start(Opts::loopback()).await;
    s.lk.forbid(TOKEN);
    let proxy = format!("http://{ID}:{TOKEN}@{}", s.lk.proxy);
    let ca = s.ca.cert.display().to_string();
    let out = python(
        "import json, requests\n\
         r = requests.get('https://api.stripe.com/v1/balance',\n\
                          headers={'Authorization': 'Bearer sk_test_placeholder_from_client'})\n\
         print(json.dumps({'status': r.status_code, 'echo': r.json()}))\n",
        &[
            ("HTTPS_PROXY", &proxy),
            ("https_proxy", &proxy),
            ("NO_PROXY", ""),
            ("no_proxy", ""),
            ("REQUESTS_CA_BUNDLE", &ca),
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["status"], 200, "{v}");
    assert_ours(&v["echo"], &s.key);
    assert_eq!(v["echo"]["uri"], "/v1/balance", "{v}");
    assert!(
        !v["echo"].to_string().contains("placeholder_from_client"),
        "the client's Authorization reached the upstream: {v}"
    );
    assert_eq!(s.up.requests(), 1);
}

/// latchkey with a CA, and a connection `plain` to a plain HTTP echo upstream: for what goes
/// in the clear inside a CONNECT.
struct PlainTunnel {
    lk: Latchkey,
    up: EchoServer,
    addr: std::net::SocketAddr,
    key: String,
    _ca: Ca,
    _bao: Bao,
}

impl PlainTunnel {
    async fn start() -> PlainTunnel {
        let bao = Bao::start().await;
        let up = echo().await;
        let addr = up.addr();
        let key = put_bearer(&bao, "plain", &format!("http://{addr}"));
        let ca = Ca::init().await;
        let lk = Latchkey::start(&bao, ca.configured(Opts::loopback())).await;
        PlainTunnel {
            lk,
            up,
            addr,
            key,
            _ca: ca,
            _bao: bao,
        }
    }
}

#[tokio::test]
async fn plain_http_inside_a_connect_gets_the_connection_key() {
    let PlainTunnel {
        lk, up, addr, key, ..
    } = PlainTunnel::start().await;
    let x = exchange(
        &lk,
        &connect_head(&addr.to_string(), Some(("plain", ""))),
        None,
        &inner_get("/x", &addr.to_string()),
    )
    .await;
    let inner = x.inner();
    assert_eq!(inner.status, 200, "{x:#?}");
    assert_ours(&inner.json(), &key);
    assert_eq!(inner.json()["uri"], "/x");
    assert_eq!(up.requests(), 1);
}

/// A request inside a tunnel whose target is a host and port alone (authority-form, CONNECT's
/// target) is malformed: 400, not a host to compare with the tunnel's.
#[tokio::test]
async fn an_authority_form_target_inside_a_tunnel_is_400() {
    let PlainTunnel { lk, up, addr, .. } = PlainTunnel::start().await;
    for target in ["foo", &addr.to_string()] {
        let x = exchange(
            &lk,
            &connect_head(&addr.to_string(), Some(("plain", ""))),
            None,
            &inner_get(target, &addr.to_string()),
        )
        .await;
        x.inner().assert_error(400, "bad_request");
    }
    assert_eq!(up.requests(), 0);
}

/// A CONNECT inside a tunnel is not sent on (it was, as `CONNECT /`, with the key): 405.
#[tokio::test]
async fn a_connect_inside_a_tunnel_is_405() {
    let PlainTunnel { lk, up, addr, .. } = PlainTunnel::start().await;
    let x = exchange(
        &lk,
        &connect_head(&addr.to_string(), Some(("plain", ""))),
        None,
        &format!("CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    x.inner().assert_error(405, "method_not_allowed");
    assert_eq!(up.requests(), 0);
}

/// h2 with prior knowledge inside a plain CONNECT (no TLS, so no ALPN to say it): the
/// connection preface is seen for what it is and every request on it is served, with the key.
#[tokio::test]
async fn h2_with_prior_knowledge_inside_a_plain_connect_gets_the_connection_key() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let PlainTunnel {
        lk, up, addr, key, ..
    } = PlainTunnel::start().await;

    let mut tcp = tokio::net::TcpStream::connect(lk.proxy).await.unwrap();
    tcp.write_all(connect_head(&addr.to_string(), Some(("plain", ""))).as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(tcp.read(&mut byte).await.unwrap(), 1, "{head:?}");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    let mut sender = h2_over(tcp).await;
    for path in ["/first", "/second"] {
        let req = http::Request::get(format!("http://{addr}{path}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let text = echo_text(&String::from_utf8_lossy(&body));
        let echo: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert_ours(&echo, &key);
        assert_eq!(echo["uri"], path);
    }
    assert_eq!(up.requests(), 2);
}

// ---------------------------------------------------------------------------------------------
// The CA

#[tokio::test]
async fn ca_init_export_and_ca_pem_give_the_certificate_never_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("ca.pem");
    let key = dir.path().join("ca-key.pem");

    // init writes both files.
    let run = ca_init(&cert, &key).await;
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    let cert_pem = std::fs::read_to_string(&cert).unwrap();
    let key_pem = std::fs::read_to_string(&key).unwrap();
    assert!(
        cert_pem.contains("-----BEGIN CERTIFICATE-----"),
        "{cert_pem}"
    );
    assert!(key_pem.contains("PRIVATE KEY-----"), "not a PEM key");
    let forms = key_forms(&key_pem);
    assert!(forms.len() > 1, "a key of no body");
    for form in &forms {
        assert!(!run.stdout.contains(form) && !run.stderr.contains(form));
    }

    // init refuses to overwrite either file, and leaves them as they were.
    let again = ca_init(&cert, &key).await;
    assert!(
        again.code.is_some_and(|c| c != 0),
        "ca init overwrote an existing CA"
    );
    let other_cert = dir.path().join("other.pem");
    let half = ca_init(&other_cert, &key).await;
    assert!(
        half.code.is_some_and(|c| c != 0),
        "ca init overwrote an existing key"
    );
    let other_key = dir.path().join("other-key.pem");
    let half = ca_init(&cert, &other_key).await;
    assert!(
        half.code.is_some_and(|c| c != 0),
        "ca init overwrote an existing certificate"
    );
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), cert_pem);
    assert_eq!(std::fs::read_to_string(&key).unwrap(), key_pem);
    for run in [&again, &half] {
        for form in &forms {
            assert!(!run.stdout.contains(form) && !run.stderr.contains(form));
        }
    }

    // export prints the certificate.
    let export = latchkey_cli(&["ca", "export", "--cert", cert.to_str().unwrap()]).await;
    assert_eq!(export.code, Some(0), "{}", export.stderr);
    assert_eq!(export.stdout.trim(), cert_pem.trim());
    for form in &forms {
        assert!(!export.stdout.contains(form) && !export.stderr.contains(form));
    }

    // The admin listener serves it, without the admin token; the key is nowhere.
    let s = Stripe::start(Opts::loopback()).await;
    let r = http().get(s.lk.admin_url("/ca.pem")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string()),
        Some("application/x-pem-file".to_string())
    );
    let served = r.text().await.unwrap();
    assert_eq!(served.trim(), s.ca.cert_pem().trim());
    s.ca.assert_key_absent(&served, "GET /ca.pem");

    let (status, text) = s.curl(&format!("{ID}:"), &[], "/v1/charges").await;
    assert_eq!(status, 200, "{text}");
    s.ca.assert_key_absent(&text, "a tunnelled answer");
    let metrics = metrics_text(&s.lk).await;
    s.ca.assert_key_absent(&metrics, "/metrics");
    // The tunnelled request is timed under its own form, as it is counted.
    for metric in [
        "latchkey_requests_total{",
        "latchkey_request_duration_seconds_count{",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(metric) && l.contains(r#"form="tunnel""#)),
            "no {metric}form=\"tunnel\"...}}:\n{metrics}"
        );
    }
    // latchkey's own output is checked for the key when `s` is dropped (forbid_key).
}

// ---------------------------------------------------------------------------------------------
// Refusals

#[tokio::test]
async fn a_connect_without_a_token_is_407_when_clients_are_configured() {
    let clients = client_toml("t", TOKEN, &["stripe-*"]);
    let s = Stripe::start(Opts::loopback().extra(&clients)).await;
    s.lk.forbid(TOKEN);

    let target = format!("{STRIPE}:443");
    for auth in [None, Some((ID, "")), Some((ID, "wrong-token-0123456789"))] {
        let x = s
            .exchange(
                &connect_head(&target, auth),
                Some(STRIPE),
                &inner_get("/v1/x", STRIPE),
            )
            .await;
        x.assert_connect_refused(407, "proxy_auth_required");
        assert!(
            x.connect.header("proxy-authenticate").is_some(),
            "407 without Proxy-Authenticate: {x:#?}"
        );
    }
    assert_eq!(s.up.requests(), 0);
}

/// A CONNECT target is `host:port` and nothing else (RFC 9112 section 3.2.3): user
/// information, a scheme, a path or a port that is not digits is 400, before anything else.
#[tokio::test]
async fn a_connect_target_other_than_host_and_port_is_400() {
    let s = Stripe::start(Opts::loopback()).await;
    for target in [
        format!("other.test@{STRIPE}:443"),
        format!("http://{STRIPE}:443/"),
        format!("{STRIPE}:+443"),
        ":443".to_string(),
    ] {
        let x = s
            .exchange(
                &connect_head(&target, Some((ID, ""))),
                Some(STRIPE),
                &inner_get("/v1/x", STRIPE),
            )
            .await;
        x.assert_connect_refused(400, "bad_request");
    }
    assert_eq!(s.up.requests(), 0);
}

#[tokio::test]
async fn a_connect_to_a_host_the_connection_does_not_cover_is_403() {
    let s = Stripe::start(Opts::loopback()).await;
    let x = s
        .exchange(
            &connect_head("evil.example.com:443", Some((ID, ""))),
            Some("evil.example.com"),
            &inner_get("/v1/x", "evil.example.com"),
        )
        .await;
    x.assert_connect_refused(403, "host_not_allowed");
    assert_eq!(s.up.requests(), 0);
}

#[tokio::test]
async fn a_connect_to_another_port_of_the_connection_host_is_403() {
    let s = Stripe::start(Opts::loopback()).await;
    let x = s
        .exchange(
            &connect_head(&format!("{STRIPE}:8443"), Some((ID, ""))),
            Some(STRIPE),
            &inner_get("/v1/x", &format!("{STRIPE}:8443")),
        )
        .await;
    x.assert_connect_refused(403, "host_not_allowed");
    assert_eq!(s.up.requests(), 0);
}

#[tokio::test]
async fn a_connect_to_a_blocked_address_is_403_destination_blocked() {
    // api.stripe.com pinned to 127.0.0.1, and loopback not allowed.
    let s = Stripe::start(Opts::default()).await;
    let x = s.connect_as(&format!("{STRIPE}:443"), ID).await;
    x.assert_connect_refused(403, "destination_blocked");
    assert_eq!(s.up.requests(), 0);
    assert_eq!(s.up.connections(), 0);
}

#[tokio::test]
async fn a_connect_naming_an_unknown_connection_is_404() {
    let s = Stripe::start(Opts::loopback()).await;
    let x = s.connect_as(&format!("{STRIPE}:443"), "stripe-nope").await;
    x.assert_connect_refused(404, "connection_not_found");
    assert_eq!(s.up.requests(), 0);
}

#[tokio::test]
async fn a_connect_naming_a_malformed_connection_id_is_400() {
    let s = Stripe::start(Opts::loopback()).await;
    let x = s.connect_as(&format!("{STRIPE}:443"), "bad*id").await;
    x.assert_connect_refused(400, "bad_connection_id");
    assert_eq!(s.up.requests(), 0);
}

#[tokio::test]
async fn an_sni_other_than_the_connect_host_is_421_host_mismatch() {
    let s = Stripe::start(Opts::loopback()).await;
    let x = s
        .exchange(
            &connect_head(&format!("{STRIPE}:443"), Some((ID, ""))),
            Some("evil.example.com"),
            &inner_get("/v1/x", STRIPE),
        )
        .await;
    x.inner().assert_error(421, "host_mismatch");
    assert_eq!(s.up.requests(), 0);
}

#[tokio::test]
async fn an_inner_host_other_than_the_connect_host_is_421_host_mismatch() {
    let s = Stripe::start(Opts::loopback()).await;
    let x = s
        .exchange(
            &connect_head(&format!("{STRIPE}:443"), Some((ID, ""))),
            Some(STRIPE),
            &inner_get("/v1/x", "evil.example.com"),
        )
        .await;
    x.inner().assert_error(421, "host_mismatch");
    assert_eq!(s.up.requests(), 0);

    // The same exchange with the right Host goes through: only the Host refused it.
    let x = s.connect_as(&format!("{STRIPE}:443"), ID).await;
    assert_eq!(x.inner().status, 200, "{x:#?}");
    assert_ours(&x.inner().json(), &s.key);
    assert_eq!(s.up.requests(), 1);
}

// ---------------------------------------------------------------------------------------------
// The access log

#[tokio::test]
async fn connects_and_their_inner_requests_are_logged_as_the_tunnel_form() {
    let s = Stripe::start(Opts::loopback()).await;
    let (status, text) = s
        .curl(&format!("{ID}:"), &["--http1.1"], "/v1/charges?limit=3")
        .await;
    assert_eq!(status, 200, "{text}");

    let inner =
        s.lk.access_line(|l| l["method"] == "GET" && l["form"] == "tunnel")
            .await;
    assert_eq!(inner["connection"], ID, "{inner}");
    assert_eq!(inner["host"], STRIPE, "{inner}");
    assert_eq!(inner["path"], "/v1/charges?limit=3", "{inner}");
    assert_eq!(inner["status"], 200, "{inner}");
    assert_eq!(inner["error"], "-", "{inner}");

    let connect =
        s.lk.access_line(|l| l["method"] == "CONNECT" && l["error"] == "-")
            .await;
    assert_eq!(connect["form"], "tunnel", "{connect}");
    assert_eq!(connect["connection"], ID, "{connect}");
    assert_eq!(connect["host"], STRIPE, "{connect}");

    // A refused CONNECT is logged too, with its error code.
    let x = s
        .exchange(
            &connect_head("evil.example.com:443", Some((ID, ""))),
            Some("evil.example.com"),
            &inner_get("/v1/x", "evil.example.com"),
        )
        .await;
    x.assert_connect_refused(403, "host_not_allowed");
    let refused =
        s.lk.access_line(|l| l["method"] == "CONNECT" && l["error"] == "host_not_allowed")
            .await;
    assert_eq!(refused["form"], "tunnel", "{refused}");
    assert_eq!(refused["status"], 403, "{refused}");
    assert_eq!(refused["connection"], ID, "{refused}");
    assert_eq!(refused["host"], "evil.example.com", "{refused}");
    assert_eq!(s.up.requests(), 1);
}

/// Python requests through a tunnel that names no connection, in the environment an SDK runs
/// in: `proxy` as HTTPS_PROXY, an `Authorization` header; returns the status and the echo.
async fn requests_with(s: &Stripe, proxy: &str, authorization: &str) -> serde_json::Value {
    let ca = s.ca.cert.display().to_string();
    let out = python(
        "import json, os, requests\n\
         r = requests.get('https://api.stripe.com/v1/balance',\n\
                          headers={'Authorization': os.environ['AUTHZ']})\n\
         print(json.dumps({'status': r.status_code, 'body': r.json()}))\n",
        &[
            ("HTTPS_PROXY", proxy),
            ("https_proxy", proxy),
            ("NO_PROXY", ""),
            ("no_proxy", ""),
            ("REQUESTS_CA_BUNDLE", &ca),
            ("AUTHZ", authorization),
        ],
    )
    .await;
    serde_json::from_str(out.trim()).unwrap()
}

#[tokio::test]
async fn a_latchkey_placeholder_where_the_key_goes_picks_the_connection() {
    // An SDK configured with api_key = "latchkey.stripe-prod" and a proxy with no user name.
    let s = Stripe::start(Opts::loopback()).await;
    let proxy = format!("http://{}", s.lk.proxy);
    let v = requests_with(&s, &proxy, &format!("Bearer latchkey.{ID}")).await;
    assert_eq!(v["status"], 200, "{v}");
    assert_ours(&v["body"], &s.key);
    assert!(!v["body"].to_string().contains("latchkey."), "{v}");

    // Neither a user name nor a placeholder: the one connection covering the host (the
    // ambiguous case is in `choose`).
    let v = requests_with(&s, &proxy, "Bearer sk_test_whatever").await;
    assert_eq!(v["status"], 200, "{v}");
    assert_ours(&v["body"], &s.key);
    assert_eq!(s.up.requests(), 2);
}

#[tokio::test]
async fn a_placeholder_is_held_to_what_the_client_may_use() {
    let clients = client_toml("t", TOKEN, &["stripe-*"]);
    let s = Stripe::start(Opts::loopback().extra(&clients)).await;
    s.lk.forbid(TOKEN);
    let proxy = format!("http://_:{TOKEN}@{}", s.lk.proxy);
    let v = requests_with(&s, &proxy, &format!("Bearer latchkey.{ID}")).await;
    assert_eq!(v["status"], 200, "{v}");
    assert_ours(&v["body"], &s.key);

    // A connection outside the client's grant, named by a placeholder, is refused inside.
    let v = requests_with(&s, &proxy, "Bearer latchkey.github-ci").await;
    assert_eq!(v["status"], 403, "{v}");
    assert_eq!(v["body"]["error"]["code"], "connection_forbidden", "{v}");
    assert_eq!(s.up.requests(), 1);
}

/// `latchkey run` puts an unmodified program behind the tunnel in one line (the CA fetched from
/// the admin listener, HTTPS_PROXY and the CA variables set); `latchkey env` prints those lines.
#[tokio::test]
async fn latchkey_run_and_env_put_a_program_behind_the_tunnel() {
    let s = Stripe::start(Opts::loopback()).await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem").display().to_string();
    let proxy = s.lk.proxy.to_string();
    let admin = s.lk.admin_url("");
    let common = [
        "--connection",
        ID,
        "--proxy",
        &proxy,
        "--admin",
        &admin,
        "--ca-bundle",
        &bundle,
    ];
    let latchkey = || {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"));
        for k in [
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "LATCHKEY_TOKEN",
        ] {
            c.env_remove(k);
        }
        c.env("NO_PROXY", "").env("no_proxy", "");
        c
    };

    let out = latchkey()
        .arg("run")
        .args(common)
        .args(["--", "python3", "-c"])
        .arg(
            "import json, requests\n\
             r = requests.get('https://api.stripe.com/v1/balance')\n\
             print(bytes.fromhex(r.text).decode())",
        )
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "latchkey run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echo: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_ours(&echo, &s.key);
    assert_eq!(echo["uri"], "/v1/balance", "{echo}");
    // The bundle holds latchkey's CA (after the system's roots).
    let ca = std::fs::read_to_string(&s.ca.cert).unwrap();
    assert!(std::fs::read_to_string(&bundle).unwrap().ends_with(&ca));

    let out = latchkey().arg("env").args(common).output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("export HTTPS_PROXY='http://{ID}:@{proxy}'")),
        "{text}"
    );
    for var in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GIT_SSL_CAINFO",
    ] {
        assert!(
            text.contains(&format!("export {var}='{bundle}'")),
            "{var}: {text}"
        );
    }
    // A connection ID that is not one is refused, not printed into a proxy URL.
    for sub in ["env", "run"] {
        let mut cmd = latchkey();
        cmd.args([sub, "--connection", "bad id"]);
        if sub == "run" {
            cmd.args(["--", "true"]);
        }
        let out = cmd.output().await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{sub}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is not a connection ID"), "{sub}: {err}");
        assert!(out.stdout.is_empty(), "{sub}");
    }
    assert_eq!(s.up.requests(), 1);
}

mod choose;

/// SIGTERM with requests in flight inside tunnels (the sidecar form: SDKs through
/// `HTTPS_PROXY`): those that end within the grace period are answered in full, over HTTP/1.1
/// and h2 inside; one that would not is cut when the grace ends, and its access line says so
/// (status 499, error `shutdown`); latchkey exits 0. Tunnels were cut within milliseconds of the
/// signal, and a request cut had no access line.
#[tokio::test]
async fn sigterm_drains_requests_inside_tunnels_and_logs_those_it_cuts() {
    let mut s = Stripe::start(Opts::loopback()).await;
    let user = format!("{ID}:");
    let (h1, h2, cut) = {
        let s = &s;
        let user = user.as_str();
        let term = async {
            wait_until(
                "the three requests to reach the upstream",
                Duration::from_secs(30),
                || std::future::ready((s.up.requests() >= 3).then_some(())),
            )
            .await;
            s.lk.terminate();
        };
        let (h1, h2, cut, ()) = tokio::join!(
            s.curl(user, &["--http1.1"], "/delay/2000"),
            s.curl(user, &["--http2"], "/delay/2000"),
            s.curl(user, &["--http1.1"], "/delay/60000"),
            term
        );
        (h1, h2, cut)
    };
    for (what, (status, text)) in [("HTTP/1.1", h1), ("h2", h2)] {
        assert_eq!(status, 200, "{what}: {text}");
        assert_eq!(body_json(&text)["uri"], "/delay/2000", "{what}: {text}");
    }
    // Only the CONNECT's own 200 came: no answer inside.
    assert_eq!(cut.1.matches("HTTP/").count(), 1, "{}", cut.1);
    assert!(body_json(&cut.1).is_null(), "{}", cut.1);
    let status =
        s.lk.exited_within(Duration::from_secs(30))
            .await
            .expect("latchkey to exit within its grace period");
    assert!(status.success(), "{status:?}\n{}", s.lk.output());
    let line = s.lk.access_line(|l| l["path"] == "/delay/60000").await;
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["error"], "shutdown", "{line}");
    assert_eq!(line["form"], "tunnel", "{line}");
}

/// A CONNECT that latchkey cannot open (a passthrough host that refuses the connection) is its
/// `502`, and the log says why at `warn`, as for requests (`request failed`): the cause reached
/// only the client's answer.
#[tokio::test]
async fn a_connect_that_fails_upstream_is_502_and_its_cause_is_logged() {
    let port = free_port();
    let s = Stripe::start(Opts::loopback().proxy(&format!("passthrough = [\"localhost:{port}\"]")))
        .await;
    let x = s
        .exchange(
            &connect_head(&format!("localhost:{port}"), Some(("_", ""))),
            None,
            "",
        )
        .await;
    x.assert_connect_refused(502, "upstream_unreachable");
    let line = s.lk.log_line("CONNECT failed").await;
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["code"], "upstream_unreachable", "{line}");
    assert!(
        line["cause"]
            .as_str()
            .unwrap_or_default()
            .contains(&port.to_string()),
        "{line}"
    );
}
