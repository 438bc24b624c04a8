//! PRODUCT.md 10.3: the credential appears in no log line, metric, error body or admin answer,
//! at any level. Every latchkey these tests start runs at `trace` and has all of its output
//! searched, when it stops, for every stored secret (raw and base64); `leaks` drives gateway
//! and forward traffic of every scheme through it. Attacks tried here, with the output also
//! searched percent-encoded ([`assert_unsaid`]):
//!
//! - near misses of the client token (one character changed, one short, one long) in every
//!   place a token goes: `Proxy-Authorization` Bearer and Basic, the key's place in gateway
//!   form (`Authorization`, `x-api-key`, a query parameter), forward form, CONNECT;
//! - a query-parameter key whose characters percent-encode, in every form (the tunnel too):
//!   its access lines show `<redacted>`, and no output holds it in any encoding;
//! - a verification answer that quotes the key as its error code (`{"ok":false,"error":KEY}`,
//!   the Slack form, for an operator connector whose key is letters and digits): the admin
//!   answers and the connection's metadata must not carry it;
//! - upstream failures whose bytes carry the request (and so the key): not HTTP at all, a head
//!   too large, a header line that is not one, a reset after the head; in every form, latchkey's
//!   error answer and its log must not quote them;
//! - h2 and HTTP/1.1 inside a TLS tunnel to an h2 upstream, at `trace`.

use std::collections::BTreeSet;

use super::*;

const TOKEN: &str = "tok+en/With=Chars-0123456789abcdef";

/// The real token with one character changed, one missing, one more.
fn near_misses() -> Vec<String> {
    let mut out = Vec::new();
    let (head, last) = TOKEN.split_at(TOKEN.len() - 1);
    out.push(format!("{head}{}", if last == "f" { "e" } else { "f" }));
    out.push(format!("X{}", &TOKEN[1..]));
    out.push(head.to_string());
    out.push(format!("{TOKEN}0"));
    out
}

#[tokio::test]
async fn near_misses_of_the_client_token_are_never_logged() {
    let w = World::start(
        Opts::loopback().extra(&crate::errors::client_toml("ci", TOKEN, &["*"])),
        |bao, _, secure| {
            put_bearer(bao, "bearer", secure);
            bao.put(
                "anthropic",
                &[
                    ("connector", "anthropic"),
                    ("base_url", secure),
                    ("api_key", "sk-ant-near-miss-0123"),
                ],
            );
            bao.put(
                "maps",
                &[
                    ("connector", "google-maps"),
                    ("base_url", secure),
                    ("api_key", "AIzaNearMiss0123456789abcdefghijklmnopq"),
                ],
            );
        },
    )
    .await;
    w.lk.forbid(TOKEN);
    let misses = near_misses();
    for miss in &misses {
        w.lk.forbid(miss);
        let q = percent_encoding::utf8_percent_encode(miss, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
        let bearer = format!("Authorization: Bearer {miss}\r\n");
        let api_key = format!("x-api-key: {miss}\r\n");
        let query = format!("/geo?key={q}");
        let attempts = [
            (Form::Gateway, Req::get("bearer", "/x").token(miss)),
            (Form::Gateway, Req::get("bearer", "/x").headers(&bearer)),
            (Form::Gateway, Req::get("anthropic", "/x").headers(&api_key)),
            (Form::Gateway, Req::get("maps", &query)),
            (Form::Forward, Req::get("bearer", "/x").token(miss)),
            (Form::Tunnel, Req::get("bearer", "/x").token(miss)),
        ];
        for (form, req) in attempts {
            let got = w.send(form, &req).await;
            assert_refused(
                &got,
                407,
                "proxy_auth_required",
                &format!("{form:?} {req:?}"),
            );
            let a = got.unwrap();
            assert_unsaid(&format!("{a:?}"), miss, "the 407");
        }
        // Basic, with the near miss as the password, in gateway form.
        let got = raw(
            w.lk.proxy,
            format!(
                "GET /bearer/x HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
                basic("whoever", miss)
            )
            .as_bytes(),
        )
        .await;
        assert_refused(&got, 407, "proxy_auth_required", "gateway Basic");
    }
    assert_eq!(w.upstream_requests(), 0);
    let out = w.lk.output();
    for miss in &misses {
        assert_unsaid(&out, miss, "latchkey's output");
    }
    assert_unsaid(&out, TOKEN, "latchkey's output");
}

#[tokio::test]
async fn a_query_key_is_masked_in_every_forms_access_line_and_said_nowhere() {
    let key = "gq+Key/With=Chars_0123456789";
    let w = World::start(Opts::loopback(), |bao, _, secure| {
        bao.put(
            "gq",
            &[
                ("connector", "generic-query"),
                ("base_url", secure),
                ("api_key", key),
            ],
        );
    })
    .await;
    for form in FORMS {
        let path = format!("/{form:?}?q=1&api_key=the-clients-own");
        let got = w.send(form, &Req::get("gq", &path)).await;
        let e = echoed(&got, &format!("{form:?}"));
        assert!(
            e.uri()
                .contains("api_key=gq%2BKey%2FWith%3DChars_0123456789"),
            "{form:?}: {}",
            e.uri()
        );
        let line =
            w.lk.access_line(|l| {
                l["path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(&format!("/{form:?}")))
            })
            .await;
        assert_eq!(
            line["path"],
            format!("/{form:?}?q=1&api_key=<redacted>"),
            "{form:?}: {line}"
        );
    }
    assert_unsaid(&w.lk.output(), key, "latchkey's output");
    assert_unsaid(&crate::errors::metrics_text(&w.lk).await, key, "/metrics");
}

#[tokio::test]
async fn a_verification_answer_quoting_the_key_never_reaches_the_admin_api() {
    // A service that answers its verification call the Slack way, quoting what it was sent as
    // its error code.
    let up = ScriptedUpstream::start(None, |parts| {
        let sent = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .to_string();
        Scripted::new(200)
            .header("content-type", "application/json")
            .frame(serde_json::json!({"ok": false, "error": sent}).to_string())
    })
    .await;
    let connector = "[connectors.op-slacky]\nname = \"Slack-like\"\ninject = { scheme = \"bearer\" }\nverify = { method = \"POST\", path = \"/auth.test\", json_ok_field = \"ok\" }\n";
    let w = crate::lifecycle::World::start(Opts::loopback().extra(connector)).await;
    let key = "0123456789abcdef0123456789abcdef";
    w.secret(key);
    let body = serde_json::json!({
        "id": "quoted",
        "connector": "op-slacky",
        "base_url": format!("http://{}", up.addr),
        "fields": {"api_key": key},
    });
    // `checked` fails if an answer holds the key.
    let created = w.create(&body).await;
    assert!(
        up.requests() >= 1,
        "no verification call was made: {created:#?}"
    );
    if created.status == 201 {
        w.show("quoted").await;
        w.list().await;
        let verified = w
            .api(reqwest::Method::POST, "/v1/connections/quoted/verify", None)
            .await;
        assert_eq!(verified.status, 200, "{verified:#?}");
        w.assert_clean(
            "the connection's metadata",
            &w.custom_metadata("quoted").to_string(),
        );
    }
}

/// An upstream that misbehaves on purpose, by path, with the request it read in its answer:
/// `/garbage` answers it back as text that is not HTTP, `/big-head` in a response head larger
/// than latchkey reads, `/bad-header` in a header line without a colon, `/reset` resets the
/// connection after reading it.
async fn misbehaving(tls: Option<Arc<rustls::ServerConfig>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    None => misbehave(stream).await,
                    Some(a) => {
                        if let Ok(tls) = a.accept(stream).await {
                            misbehave(tls).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn misbehave<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    let one_line = head.replace("\r\n", " | ");
    let answer = if path.ends_with("/garbage") {
        format!("SORRY I HEARD {one_line}\r\n\r\n")
    } else if path.ends_with("/big-head") {
        let mut a = String::from("HTTP/1.1 200 OK\r\n");
        while a.len() < 200 * 1024 {
            a.push_str(&format!("X-Echo: {one_line}\r\n"));
        }
        a.push_str("Content-Length: 0\r\n\r\n");
        a
    } else if path.ends_with("/bad-header") {
        format!("HTTP/1.1 200 OK\r\n{one_line}\r\nContent-Length: 0\r\n\r\n")
    } else {
        // `/reset`: nothing, and the connection dropped.
        return;
    };
    let _ = s.write_all(answer.as_bytes()).await;
    let _ = s.shutdown().await;
}

#[tokio::test]
async fn upstream_failures_that_carry_the_key_are_not_quoted_in_any_form() {
    let up_ca = TestCa::new();
    let plain = misbehaving(None).await;
    let secure = misbehaving(Some(up_ca.server_config(&["localhost"], &[b"http/1.1"]))).await;
    let bao = Bao::start().await;
    let key = "sk_test_QuotedByAFailingUpstream0123";
    for (id, base) in [
        ("plain", format!("http://{plain}")),
        ("secure", format!("https://localhost:{}", secure.port())),
    ] {
        bao.put(
            id,
            &[
                ("connector", "stripe"),
                ("base_url", &base),
                ("api_key", key),
            ],
        );
    }
    let ca = Ca::init().await;
    let lk = Latchkey::start(&bao, with_ca(Opts::loopback().root(&up_ca.pem_path), &ca)).await;
    let mut codes = BTreeSet::new();
    for (id, authority, forms) in [
        (
            "plain",
            plain.to_string(),
            &[Form::Gateway, Form::Forward, Form::PlainTunnel][..],
        ),
        ("secure", format!("localhost:{}", secure.port()), &FORMS[..]),
    ] {
        for form in forms {
            for path in ["/garbage", "/big-head", "/bad-header", "/reset"] {
                let got = send(&lk, *form, &authority, &Req::get(id, path)).await;
                let a = got.unwrap_or_else(|| panic!("{id} {form:?} {path}: no answer"));
                assert!(
                    a.status >= 500 && a.header("latchkey-error").is_some(),
                    "{id} {form:?} {path}: {a:#?}"
                );
                codes.insert(a.header("latchkey-error").unwrap_or_default().to_string());
                assert_unsaid(&format!("{a:?}"), key, &format!("{id} {form:?} {path}"));
            }
        }
    }
    assert_unsaid(&lk.output(), key, "latchkey's output");
    assert!(codes.contains("upstream_unreachable"), "{codes:?}");
}

#[tokio::test]
async fn tunnels_over_h2_and_http11_at_trace_say_the_key_nowhere() {
    let key = "sk_test_TunnelTrace+/=0123";
    let w = World::start(Opts::loopback(), |bao, _, secure| {
        bao.put(
            "tr",
            &[
                ("connector", "generic-bearer"),
                ("base_url", secure),
                ("api_key", key),
            ],
        );
    })
    .await;
    let authority = w.secure_authority();
    let got = w.send(Form::Tunnel, &Req::get("tr", "/h1")).await;
    echoed(&got, "HTTP/1.1 in the tunnel");
    let req = http::Request::get(format!("https://{authority}/h2"))
        .header("authorization", "Bearer sk_test_placeholder")
        .body(())
        .unwrap();
    let got = h2_in_tunnel(&w.lk, &authority, "tr", req, Some(b"body"), None)
        .await
        .unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    let out = w.lk.output();
    assert!(out.contains("\"level\":\"TRACE\""), "no trace output");
    assert_unsaid(&out, key, "latchkey's output");
    assert_unsaid(&crate::errors::metrics_text(&w.lk).await, key, "/metrics");
}
