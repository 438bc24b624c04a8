//! Every row of the error table of PRODUCT.md section 4 (tunnels aside), produced end to end:
//! each answer is checked for its status, its `Latchkey-Error` header and its JSON body
//! `{"error":{"code":...,"message":...}}`. Also: CONNECT is refused with 405, connection IDs are
//! validated before Vault is asked, and an unauthenticated request never reads Vault.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// One answer of latchkey, with its headers.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&echo_text(&self.body)).unwrap_or(serde_json::Value::Null)
    }

    /// Asserts that this is latchkey's own error answer with `status` and `code`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "wanted {status} {code}, got {self:#?}");
        assert_eq!(
            self.header("latchkey-error"),
            Some(code),
            "Latchkey-Error header of {self:#?}"
        );
        assert!(
            self.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "content type of {self:#?}"
        );
        let json = self.json();
        let error = json["error"]
            .as_object()
            .unwrap_or_else(|| panic!("no error object in {self:#?}"));
        assert_eq!(json.as_object().map(|o| o.len()), Some(1), "{json}");
        assert_eq!(error["code"], code, "{json}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "the error has no message: {json}"
        );
    }
}

/// Sends a reqwest request and keeps status, headers and body.
pub async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = echo_text(&resp.text().await.unwrap());
    Answer {
        status,
        headers,
        body,
    }
}

/// Writes `request` as it is to `addr` and reads one HTTP/1.1 answer (its body framed by
/// Content-Length, or up to EOF). For requests that HTTP clients will not send.
pub async fn raw(addr: SocketAddr, request: &str) -> Answer {
    tokio::time::timeout(Duration::from_secs(30), async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "connection closed before an answer: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse::<usize>().unwrap());
        let mut body = buf[head_end + 4..].to_vec();
        match length {
            Some(len) => {
                while body.len() < len {
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "connection closed inside the body");
                    body.extend_from_slice(&chunk[..n]);
                }
                body.truncate(len);
            }
            None => {
                s.read_to_end(&mut body).await.unwrap();
            }
        }
        Answer {
            status,
            headers,
            body: echo_text(&String::from_utf8_lossy(&body)),
        }
    })
    .await
    .expect("no answer within 30s")
}

pub fn basic(user: &str, token: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"))
    )
}

/// A `[[clients]]` entry.
pub fn client_toml(name: &str, token: &str, connections: &[&str]) -> String {
    let list: Vec<String> = connections.iter().map(|c| format!("{c:?}")).collect();
    format!(
        "[[clients]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\nconnections = [{}]\n",
        latchkey::auth::sha256_hex(token),
        list.join(", ")
    )
}

/// Prometheus text of latchkey's admin listener.
pub async fn metrics_text(lk: &Latchkey) -> String {
    http()
        .get(lk.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Whether any Vault read (of a connection) was counted in latchkey's metrics.
fn vault_reads_in_metrics(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("latchkey_vault_requests_total{") && l.contains("op=\"read\""))
        .map(str::to_string)
        .collect()
}

async fn get(lk: &Latchkey, path: &str) -> Answer {
    send(http().get(lk.url(path))).await
}

// ---------------------------------------------------------------------------------------------
// 400

#[tokio::test]
async fn malformed_connection_ids_are_400_bad_connection_id() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    // Connections a lenient parser could end up at.
    put_bearer(&bao, "pct-prod", &base);
    put_bearer(&bao, "victim", &base);
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    let too_long = "a".repeat(129);
    let bad_ids = [
        "bad.id",
        "bad!id",
        "bad~id",
        "-leading-dash",
        "_leading-underscore",
        too_long.as_str(),
        // Percent-encoded: `pct%2Dprod` is not `pct-prod`, and `..%2Fvictim` is no way out.
        "pct%2Dprod",
        "..%2Fvictim",
        "a%20b",
        "%61bc",
    ];
    for id in bad_ids {
        let r = get(&lk, &format!("/{id}/v1/things")).await;
        r.assert_error(400, "bad_connection_id");
        // The rejection names no Vault path, and the ID is still refused when it ends the path.
        let r = get(&lk, &format!("/{id}")).await;
        r.assert_error(400, "bad_connection_id");
    }
    // No ID at all.
    get(&lk, "//v1/things")
        .await
        .assert_error(400, "bad_connection_id");

    // Forward form: the Basic user name is the connection ID, held to the same rule.
    for id in ["bad.id", "x/../victim", "-lead", too_long.as_str()] {
        let r = raw(
            lk.proxy,
            &format!(
                "GET http://{addr}/v1/things HTTP/1.1\r\nHost: {addr}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
                basic(id, "tok"),
                addr = up.addr()
            ),
        )
        .await;
        r.assert_error(400, "bad_connection_id");
    }

    // 128 characters is the longest valid ID: it gets as far as Vault (and is not there).
    let longest = "b".repeat(128);
    get(&lk, &format!("/{longest}/v1/things"))
        .await
        .assert_error(404, "connection_not_found");
    assert_eq!(bao.reads_of(&longest), 1);

    assert_eq!(bao.reads_of("pct-prod"), 0);
    assert_eq!(bao.reads_of("victim"), 0);
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn connection_ids_are_validated_before_vault_is_asked() {
    let bao = Bao::start().await;
    let up = echo().await;
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    let bad = ["bad.id", "-lead", "pct%2Dprod", "..%2Fvictim"];
    for id in bad {
        get(&lk, &format!("/{id}/x"))
            .await
            .assert_error(400, "bad_connection_id");
    }
    let r = raw(
        lk.proxy,
        &format!(
            "GET http://{addr}/x HTTP/1.1\r\nHost: {addr}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            basic("x/../victim", "tok"),
            addr = up.addr()
        ),
    )
    .await;
    r.assert_error(400, "bad_connection_id");

    // At the Vault server: not one read of any of those paths (raw or decoded) ...
    for id in bad
        .iter()
        .copied()
        .chain(["pct-prod", "../victim", "victim", "x/../victim"])
    {
        assert_eq!(bao.reads_of(id), 0, "Vault was asked for {id:?}");
    }
    // ... and in latchkey's own count of Vault calls, no read at all.
    let metrics = metrics_text(&lk).await;
    let reads = vault_reads_in_metrics(&metrics);
    assert!(reads.is_empty(), "Vault reads were made: {reads:?}");

    // The counting works: a well-formed unknown ID costs exactly one read.
    get(&lk, "/well-formed/x")
        .await
        .assert_error(404, "connection_not_found");
    assert_eq!(bao.reads_of("well-formed"), 1);
    let metrics = metrics_text(&lk).await;
    assert!(
        !vault_reads_in_metrics(&metrics).is_empty(),
        "the read of a well-formed ID is not counted:\n{metrics}"
    );
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn malformed_requests_are_400_bad_request() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "fwd", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let auth = basic("fwd", "tok");
    let addr = up.addr();

    // The control: a well-formed forward request goes through.
    let ok = raw(
        lk.proxy,
        &format!(
            "GET http://{addr}/ok HTTP/1.1\r\nHost: {addr}\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:#?}");
    assert!(ok.body.contains(&format!("Bearer {key}")));
    assert_eq!(up.requests(), 1);

    let cases = [
        // The Host header disagrees with the absolute URI: host, then port.
        format!(
            "GET http://{addr}/x HTTP/1.1\r\nHost: evil.example\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        ),
        format!(
            "GET http://{addr}/x HTTP/1.1\r\nHost: 127.0.0.1:1\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        ),
        // Two Host headers.
        format!(
            "GET http://{addr}/x HTTP/1.1\r\nHost: {addr}\r\nHost: evil.example\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        ),
        // Not an http(s) URL.
        format!(
            "GET ftp://{addr}/x HTTP/1.1\r\nHost: {addr}\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        ),
        // User information in the URL.
        format!(
            "GET http://someone@{addr}/x HTTP/1.1\r\nHost: {addr}\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        ),
        // Neither /{connection_id}/path nor an absolute URL.
        format!("OPTIONS * HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", lk.proxy),
        // A host and port alone (authority-form) is CONNECT's target, no other method's.
        format!("GET fwd HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", lk.proxy),
        format!("GET {addr} HTTP/1.1\r\nHost: {addr}\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"),
    ];
    for request in &cases {
        let r = raw(lk.proxy, request).await;
        assert_eq!(r.status, 400, "{request:?} -> {r:#?}");
        r.assert_error(400, "bad_request");
    }
    assert_eq!(up.requests(), 1, "a refused request reached the upstream");
}

/// An h2 field value that starts or ends with whitespace makes the request malformed (RFC 9113
/// section 8.2.1), and an intermediary must not forward it: 400, nothing sent. HTTP/1's parser
/// trims such whitespace, so only h2 can carry it.
#[tokio::test]
async fn an_h2_field_value_with_outer_whitespace_is_400() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "spaced", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let tcp = tokio::net::TcpStream::connect(lk.proxy).await.unwrap();
    let mut sender = h2_over(tcp).await;
    let mut send = async |value: &'static str| {
        let req = http::Request::get(format!("http://{}/spaced/x", lk.proxy))
            .header("x-field", http::HeaderValue::from_static(value))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let code = resp
            .headers()
            .get("latchkey-error")
            .map(|v| v.to_str().unwrap().to_string());
        (status, code)
    };
    for value in [" lead", "trail ", "\ttab", "tab\t"] {
        assert_eq!(
            send(value).await,
            (400, Some("bad_request".to_string())),
            "{value:?}"
        );
    }
    assert_eq!(up.requests(), 0);
    // Whitespace inside a value is the value's own.
    assert_eq!(send("in side").await, (200, None));
    assert_eq!(up.requests(), 1);
}

// ---------------------------------------------------------------------------------------------
// 407, 403

#[tokio::test]
async fn missing_or_wrong_client_token_is_407_and_never_reads_vault() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "stripe-prod", &format!("http://{}", up.addr()));
    let token = "client-token-billing-0123456789";
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().extra(&client_toml("billing", token, &["stripe-*"])),
    )
    .await;
    let addr = up.addr();

    let answers = [
        // Gateway form: no token, a wrong token (Bearer and Basic), an unreadable header.
        get(&lk, "/stripe-prod/v1/charges").await,
        send(
            http()
                .get(lk.url("/stripe-prod/v1/charges"))
                .header("Proxy-Authorization", "Bearer not-the-token"),
        )
        .await,
        send(
            http()
                .get(lk.url("/stripe-prod/v1/charges"))
                .header("Proxy-Authorization", basic("anyone", "not-the-token")),
        )
        .await,
        send(
            http()
                .get(lk.url("/stripe-prod/v1/charges"))
                .header("Proxy-Authorization", "Digest whatever"),
        )
        .await,
        // Where the API key goes, a value that is not a client token (gateway form accepts the
        // client token there; `token_place` shows it).
        send(
            http()
                .get(lk.url("/stripe-prod/v1/charges"))
                .header("Authorization", "Bearer not-the-token"),
        )
        .await,
        // Forward form: no Proxy-Authorization at all, and a wrong token.
        raw(
            lk.proxy,
            &format!("GET http://{addr}/v1/charges HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
        )
        .await,
        raw(
            lk.proxy,
            &format!(
                "GET http://{addr}/v1/charges HTTP/1.1\r\nHost: {addr}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
                basic("stripe-prod", "not-the-token")
            ),
        )
        .await,
    ];
    for r in &answers {
        r.assert_error(407, "proxy_auth_required");
        let challenge = r
            .header("proxy-authenticate")
            .unwrap_or_else(|| panic!("407 without Proxy-Authenticate: {r:#?}"));
        assert!(
            challenge.to_ascii_lowercase().starts_with("basic"),
            "{challenge}"
        );
    }
    // Nobody unauthenticated made latchkey read Vault or reach the upstream.
    assert_eq!(bao.reads_of("stripe-prod"), 0);
    assert_eq!(up.requests(), 0);

    // The right token, in both forms, works (and costs one read).
    let r = send(
        http()
            .get(lk.url("/stripe-prod/v1/charges"))
            .header("Proxy-Authorization", format!("Bearer {token}")),
    )
    .await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert!(r.body.contains(&format!("Bearer {key}")));
    let r = raw(
        lk.proxy,
        &format!(
            "GET http://{addr}/v1/charges HTTP/1.1\r\nHost: {addr}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            basic("stripe-prod", token)
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(bao.reads_of("stripe-prod"), 1);
}

/// Open (no `[[clients]]`, loopback only): a forward-form request without a connection ID (no
/// Proxy-Authorization, or Bearer) uses the one connection covering its host; none covering is
/// 403, before anything is sent.
#[tokio::test]
async fn forward_form_without_a_connection_id_uses_the_one_covering_the_host_when_open() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "open", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let addr = up.addr();
    for auth in ["", "Proxy-Authorization: Bearer tok\r\n"] {
        let r = raw(
            lk.proxy,
            &format!(
                "GET http://{addr}/x HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(r.status, 200, "{r:#?}");
        assert!(r.body.contains(&format!("Bearer {key}")), "{r:#?}");
    }
    let r = raw(
        lk.proxy,
        "GET http://127.0.0.9:1/x HTTP/1.1\r\nHost: 127.0.0.9:1\r\nConnection: close\r\n\r\n",
    )
    .await;
    r.assert_error(403, "host_not_allowed");
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn a_client_outside_its_globs_is_403_connection_forbidden() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    put_bearer(&bao, "stripe-prod", &base);
    put_bearer(&bao, "github-ci", &base);
    put_bearer(&bao, "stripeprod", &base);
    let billing = "client-token-billing-0123456789";
    let ci = "client-token-ci-abcdefghijklmnop";
    let lk = Latchkey::start(
        &bao,
        Opts::loopback()
            .extra(&client_toml("billing", billing, &["stripe-*"]))
            .extra(&client_toml("ci", ci, &["github-ci"])),
    )
    .await;
    let as_client = |path: &str, token: &str| {
        http()
            .get(lk.url(path))
            .header("Proxy-Authorization", format!("Bearer {token}"))
    };

    send(as_client("/github-ci/x", billing))
        .await
        .assert_error(403, "connection_forbidden");
    // `stripe-*` does not match `stripeprod`.
    send(as_client("/stripeprod/x", billing))
        .await
        .assert_error(403, "connection_forbidden");
    send(as_client("/stripe-prod/x", ci))
        .await
        .assert_error(403, "connection_forbidden");
    // Forward form too.
    let addr = up.addr();
    raw(
        lk.proxy,
        &format!(
            "GET http://{addr}/x HTTP/1.1\r\nHost: {addr}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            basic("github-ci", billing)
        ),
    )
    .await
    .assert_error(403, "connection_forbidden");

    // Refused before Vault is asked, and nothing went upstream.
    assert_eq!(bao.reads_of("github-ci"), 0);
    assert_eq!(bao.reads_of("stripeprod"), 0);
    assert_eq!(bao.reads_of("stripe-prod"), 0);
    assert_eq!(up.requests(), 0);
    // The refusal's access line names the client refused, as the metric does.
    let line = lk
        .access_line(|l| l["connection"] == "github-ci" && l["status"] == 403)
        .await;
    assert_eq!(line["client"], "billing", "{line}");
    let metrics = metrics_text(&lk).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("latchkey_requests_total")
                && l.contains(r#"client="billing""#)
                && l.contains(r#"status="403""#)),
        "{metrics}"
    );

    // Each client can use its own.
    assert_eq!(send(as_client("/stripe-prod/x", billing)).await.status, 200);
    assert_eq!(send(as_client("/github-ci/x", ci)).await.status, 200);
}

#[tokio::test]
async fn a_host_outside_the_connection_is_403_host_not_allowed() {
    let bao = Bao::start().await;
    let up = echo().await;
    let other = echo().await;
    let key = put_bearer(&bao, "hosts", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let auth = basic("hosts", "tok");

    // `localhost` reaches the same machine, but it is not the connection's host; nor is another
    // name, nor another address.
    let other_port = other.addr().port();
    for target in [
        format!("localhost:{other_port}"),
        format!("127.0.0.2:{other_port}"),
        "api.example.com".to_string(),
    ] {
        let r = raw(
            lk.proxy,
            &format!(
                "GET http://{target}/steal HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        r.assert_error(403, "host_not_allowed");
        assert!(!r.body.contains(&key));
    }
    assert_eq!(other.requests(), 0);
    assert_eq!(up.requests(), 0);

    // The connection's own host is fine.
    let addr = up.addr();
    let r = raw(
        lk.proxy,
        &format!(
            "GET http://{addr}/fine HTTP/1.1\r\nHost: {addr}\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{r:#?}");
}

#[tokio::test]
async fn a_private_address_is_403_destination_blocked() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "local", &format!("http://{}", up.addr()));
    put_bearer(&bao, "metadata", "http://169.254.169.254");
    put_bearer(
        &bao,
        "decimal",
        &format!("http://2130706433:{}", up.addr().port()),
    );
    // No allow_private_destinations: loopback, link-local and metadata addresses are blocked.
    let lk = Latchkey::start(&bao, Opts::default()).await;

    for id in ["local", "metadata", "decimal"] {
        get(&lk, &format!("/{id}/latest/meta-data/"))
            .await
            .assert_error(403, "destination_blocked");
    }
    let addr = up.addr();
    raw(
        lk.proxy,
        &format!(
            "GET http://{addr}/x HTTP/1.1\r\nHost: {addr}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            basic("local", "tok")
        ),
    )
    .await
    .assert_error(403, "destination_blocked");
    assert_eq!(up.requests(), 0);
}

// ---------------------------------------------------------------------------------------------
// 404, 502, 503, 504

#[tokio::test]
async fn an_unknown_connection_is_404_connection_not_found() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "known", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    get(&lk, "/unknown-conn/v1/x")
        .await
        .assert_error(404, "connection_not_found");
    // Near misses of a stored ID are not it.
    get(&lk, "/Known/v1/x")
        .await
        .assert_error(404, "connection_not_found");
    let addr = up.addr();
    raw(
        lk.proxy,
        &format!(
            "GET http://{addr}/x HTTP/1.1\r\nHost: {addr}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            basic("known2", "tok")
        ),
    )
    .await
    .assert_error(404, "connection_not_found");
    assert_eq!(up.requests(), 0);
    assert_eq!(get(&lk, "/known/v1/x").await.status, 200);
}

/// ... and the log says why, at `warn` (the access line has the code alone): an operator
/// should not have to ask the client what its answer said.
#[tokio::test]
async fn a_closed_upstream_port_is_502_upstream_unreachable() {
    let bao = Bao::start().await;
    let port = free_port();
    put_bearer(&bao, "closed", &format!("http://127.0.0.1:{port}"));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    get(&lk, "/closed/v1/x")
        .await
        .assert_error(502, "upstream_unreachable");
    let line = lk.log_line("request failed").await;
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["code"], "upstream_unreachable", "{line}");
    assert_eq!(line["connection"], "closed", "{line}");
    let cause = line["cause"].as_str().unwrap_or_default();
    assert!(cause.contains(&format!("127.0.0.1:{port}")), "{line}");
}

#[tokio::test]
async fn an_untrusted_upstream_certificate_is_502_upstream_tls() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    let up = echo_tls(&ca, &[b"http/1.1"]).await;
    let key = put_bearer(
        &bao,
        "tls",
        &format!("https://127.0.0.1:{}", up.addr().port()),
    );

    // latchkey does not trust the test CA: the handshake fails, nothing is sent.
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let r = get(&lk, "/tls/v1/x").await;
    r.assert_error(502, "upstream_tls");
    assert!(!r.body.contains(&key));
    assert_eq!(up.requests(), 0);
    drop(lk);

    // The same upstream with the CA trusted: the failure was the certificate.
    let lk = Latchkey::start(&bao, Opts::loopback().root(&ca.pem_path)).await;
    let r = get(&lk, "/tls/v1/x").await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn https_to_a_plain_http_server_is_502_upstream_tls() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(
        &bao,
        "notls",
        &format!("https://127.0.0.1:{}", up.addr().port()),
    );
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    get(&lk, "/notls/v1/x")
        .await
        .assert_error(502, "upstream_tls");
}

#[tokio::test]
async fn vault_frozen_and_nothing_cached_is_503_secret_store_unavailable() {
    let bao = Bao::start_own().await;
    let up = echo().await;
    put_bearer(&bao, "cold", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    // latchkey is serving (its start-up Vault check is done) before Vault goes away.
    assert_eq!(
        http()
            .get(lk.admin_url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    bao.freeze().await;
    let r = get(&lk, "/cold/v1/x").await;
    bao.thaw();
    r.assert_error(503, "secret_store_unavailable");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn vault_at_a_dead_address_is_503_secret_store_unavailable() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "cold", &format!("http://{}", up.addr()));
    let dead = format!("http://127.0.0.1:{}", free_port());
    let lk = Latchkey::start(&bao, Opts::loopback().env("VAULT_ADDR", &dead)).await;
    get(&lk, "/cold/v1/x")
        .await
        .assert_error(503, "secret_store_unavailable");
    assert_eq!(bao.reads_of("cold"), 0);
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn a_slow_upstream_is_504_upstream_timeout() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "slow", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("request_timeout = \"1s\"")).await;

    // Within the timeout, fine.
    assert_eq!(get(&lk, "/slow/delay/50").await.status, 200);
    get(&lk, "/slow/delay/5000")
        .await
        .assert_error(504, "upstream_timeout");
    // Its access line says what was asked, as a successful request's does.
    let line = lk.access_line(|l| l["error"] == "upstream_timeout").await;
    assert_eq!(line["path"], "/delay/5000");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["status"], 504);
}

// ---------------------------------------------------------------------------------------------
// CONNECT

#[tokio::test]
/// Without latchkey's CA the tunnel form is off: a CONNECT is refused, naming the settings.
async fn connect_without_a_ca_is_refused_with_405_naming_the_settings() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "tunnel", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let addr = up.addr();
    let r = raw(
        lk.proxy,
        &format!(
            "CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\nProxy-Authorization: {}\r\n\r\n",
            basic("tunnel", "tok")
        ),
    )
    .await;
    assert_eq!(r.status, 405, "{r:#?}");
    let code = r
        .header("latchkey-error")
        .unwrap_or_else(|| panic!("405 without Latchkey-Error: {r:#?}"));
    assert_eq!(r.json()["error"]["code"], code, "{r:#?}");
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("tls.ca_cert"), "{message}");
    assert_eq!(up.requests(), 0);
    assert_eq!(bao.reads_of("tunnel"), 0);
}

/// `Latchkey-Error` is how a workflow tells latchkey's refusals from the upstream's own
/// answers (PRODUCT.md section 4): an upstream's answer carrying one loses it, over HTTP/1.1
/// and h2 upstreams, so the status and body reach the client as the upstream's.
#[tokio::test]
async fn an_upstream_cannot_forge_latchkey_error() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    let up = echo().await;
    let up_h2 = echo_tls(&ca, &[b"h2"]).await;
    put_bearer(&bao, "forge-h1", &format!("http://{}", up.addr()));
    put_bearer(
        &bao,
        "forge-h2",
        &format!("https://localhost:{}", up_h2.addr().port()),
    );
    let lk = Latchkey::start(&bao, Opts::loopback().root(&ca.pem_path)).await;
    for id in ["forge-h1", "forge-h2"] {
        let r = http()
            .get(lk.url(&format!("/{id}/forged-error")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{id}");
        assert_eq!(r.headers().get("latchkey-error"), None, "{id}: {r:?}");
        let body = r.text().await.unwrap();
        assert!(body.contains("forged by the upstream"), "{id}: {body}");
    }
    // Nor in trailers, which reach an h2 client (curl, h2 to latchkey, from an h2 upstream).
    let (status, out) = curl(&[
        "-v",
        "--http2-prior-knowledge",
        &lk.url("/forge-h2/forged-trailer"),
    ])
    .await;
    assert_eq!(status, 200, "{out}");
    assert!(
        out.contains("x-upstream-trailer"),
        "no trailers came: {out}"
    );
    assert!(
        !out.to_ascii_lowercase().contains("latchkey-error"),
        "{out}"
    );
    assert_eq!(up.requests() + up_h2.requests(), 3);
}

/// A client that goes away before its answer comes still gets its access line (status 499,
/// error `client_closed`): an h2 client that gives up on a slow answer (curl's `--max-time`
/// closes its connection) had none at all.
#[tokio::test]
async fn a_client_gone_before_its_answer_has_an_access_line_499_client_closed() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "s", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let url = lk.url("/s/delay/30000");
    let (status, text) = curl(&["--http2-prior-knowledge", "--max-time", "2", &url]).await;
    assert_eq!(status, 0, "curl gave up before any answer: {text}");
    assert_eq!(up.requests(), 1);
    let line = lk.access_line(|l| l["path"] == "/delay/30000").await;
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["error"], "client_closed", "{line}");
    assert_eq!(line["connection"], "s", "{line}");
    // It was logged when the client left, not when the upstream answered 30 s later.
    assert!(line["duration_ms"].as_f64().unwrap() < 30_000.0, "{line}");
}
