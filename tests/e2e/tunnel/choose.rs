//! PRODUCT.md section 1, "how a tunnel or forward request picks its connection" when the proxy
//! user names none (`_` or empty): a placeholder where the key goes, else the one connection
//! granted to the client whose hosts include the destination host and port;
//! `connection_ambiguous` for several, 403 `host_not_allowed` at CONNECT for none. And
//! `proxy.passthrough`: hosts spliced byte for byte, without TLS termination or credential.

use std::time::Duration;

use super::*;
use crate::errors::client_toml;

const OTHER_TOKEN: &str = "tunnel-choose-other-token-4321";

fn clients(grants: &[&str]) -> String {
    format!(
        "{}{}",
        client_toml("runner", TOKEN, grants),
        client_toml("narrow", OTHER_TOKEN, &[ID])
    )
}

/// A second connection on api.stripe.com, `stripe-second`; its key.
fn stripe_second(s: &Stripe) -> String {
    let key = format!("sk_test_second{}", free_port());
    s._bao.put(
        "stripe-second",
        &[("connector", "stripe"), ("api_key", &key)],
    );
    s.lk.forbid(&key);
    key
}

/// `GET http://api.stripe.com/v1/balance` in forward form, reqwest with `_` as the proxy user.
async fn forward_balance(s: &Stripe) -> Echoed {
    let client = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(s.lk.url(""))
                .unwrap()
                .basic_auth("_", TOKEN),
        )
        .build()
        .unwrap();
    let r = client
        .get(format!("http://{STRIPE}/v1/balance"))
        .send()
        .await
        .unwrap();
    read(r).await
}

#[tokio::test]
async fn the_one_granted_connection_covering_the_host_is_used_without_being_named() {
    let s = Stripe::start(Opts::loopback().extra(&clients(&["stripe-*"]))).await;
    let user = format!("_:{TOKEN}");

    // Tunnel form, curl with an SDK's own placeholder key.
    let (status, text) = s
        .curl(
            &user,
            &["-H", "Authorization: Bearer sk_test_sdk_placeholder"],
            "/v1/charges",
        )
        .await;
    assert_eq!(status, 200, "{text}");
    assert_ours(&body_json(&text), &s.key);

    // Tunnel form, Python requests.
    let proxy = format!("http://_:{TOKEN}@{}", s.lk.proxy);
    let got = requests_with(&s, &proxy, "Bearer sk_test_sdk_placeholder").await;
    assert_eq!(got["status"], 200, "{got}");
    assert_ours(&got["body"], &s.key);

    // Forward form, reqwest with `_` as the proxy user.
    let r = forward_balance(&s).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_ours(&r.json, &s.key);

    let lines =
        s.lk.access_lines(3, |l| l["method"] == "GET" && l["status"] == 200)
            .await;
    assert!(lines.iter().all(|l| l["connection"] == ID), "{lines:?}");
    assert_eq!(s.up.requests(), 3);
}

#[tokio::test]
async fn two_granted_connections_on_the_host_are_ambiguous_until_one_is_named() {
    let s = Stripe::start(Opts::loopback().extra(&clients(&["stripe-*"]))).await;
    let second_key = stripe_second(&s);

    // Neither named: 400, naming both, and nothing sent.
    let (status, text) = s.curl(&format!("_:{TOKEN}"), &[], "/v1/charges").await;
    assert_eq!(status, 400, "{text}");
    let body = body_json(&text);
    assert_eq!(body["error"]["code"], "connection_ambiguous", "{text}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("stripe-prod") && message.contains("stripe-second"),
        "{message}"
    );
    assert_eq!(s.up.requests(), 0);

    // A placeholder names one.
    let (status, text) = s
        .curl(
            &format!("_:{TOKEN}"),
            &["-H", "Authorization: Bearer latchkey.stripe-second"],
            "/v1/charges",
        )
        .await;
    assert_eq!(status, 200, "{text}");
    assert_ours(&body_json(&text), &second_key);

    // A client granted only one of them has one candidate.
    let (status, text) = s
        .curl(&format!("_:{OTHER_TOKEN}"), &[], "/v1/charges")
        .await;
    assert_eq!(status, 200, "{text}");
    assert_ours(&body_json(&text), &s.key);
    assert_eq!(s.up.requests(), 2);

    // One deleted through latchkey's admin API is no candidate from then on, not only once
    // the index of hosts is older than the cache's TTL.
    let r = http()
        .delete(format!(
            "http://{}/v1/connections/stripe-second",
            s.lk.admin
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (status, text) = s.curl(&format!("_:{TOKEN}"), &[], "/v1/charges").await;
    assert_eq!(status, 200, "{text}");
    assert_ours(&body_json(&text), &s.key);
    assert_eq!(s.up.requests(), 3);
}

/// A request that names no port is sent to its scheme's default port (443 for a connection
/// whose base URL is https): a connection that covers the host only on another port is no
/// candidate for it, in forward form and in a CONNECT to port 80 (plain HTTP inside, as undici
/// sends an `http://` URL) alike; the one that covers it is chosen.
#[tokio::test]
async fn a_connection_covering_the_host_only_on_another_port_is_no_candidate() {
    let s = Stripe::start(Opts::loopback().extra(&clients(&["stripe-*"]))).await;
    let other_key = format!("sk_test_other_port{}", free_port());
    s._bao.put(
        "stripe-elsewhere",
        &[
            ("connector", "generic-bearer"),
            ("base_url", "https://elsewhere.example:8443"),
            ("allowed_hosts", &format!("{STRIPE}:8443")),
            ("api_key", &other_key),
        ],
    );
    s.lk.forbid(&other_key);

    // Forward form, `_`, no port in the URL: stripe-prod, not ambiguous.
    let r = forward_balance(&s).await;
    assert_eq!(r.status, 200, "{:?} {:?}", r.latchkey_error, r.json);
    assert_ours(&r.json, &s.key);

    // A CONNECT to port 80, `_`: plain HTTP inside goes to stripe-prod over TLS.
    let target = format!("{STRIPE}:80");
    let x = s
        .exchange(
            &connect_head(&target, Some(("_", TOKEN))),
            None,
            &inner_get("/v1/charges", STRIPE),
        )
        .await;
    assert_eq!(x.connect.status, 200, "{x:#?}");
    assert_eq!(x.inner().status, 200, "{x:#?}");
    assert_ours(&x.inner().json(), &s.key);
    assert_eq!(s.up.requests(), 2);
}

/// A placeholder counts only as the whole token where the key goes: the same text in another
/// header (a trace header, a `Referer` naming a host `latchkey.example.com`) or elsewhere in
/// the query names nothing, and never overrides the one where the key goes; a token
/// `latchkey.` followed by more than an ID is 400, not read as a shorter ID; placeholders
/// naming two connections are 400 `connection_ambiguous`.
#[tokio::test]
async fn a_placeholder_counts_only_where_the_key_goes() {
    let s = Stripe::start(Opts::loopback().extra(&clients(&["stripe-*"]))).await;
    stripe_second(&s);
    let user = format!("_:{TOKEN}");

    // Elsewhere only: nothing is named, and the two connections leave the choice open.
    for header in [
        "X-Trace: from latchkey.stripe-second sidecar",
        "Referer: https://latchkey.example.com/page",
    ] {
        let (status, text) = s.curl(&user, &["-H", header], "/v1/charges").await;
        assert_eq!(status, 400, "{header}: {text}");
        assert_eq!(
            body_json(&text)["error"]["code"],
            "connection_ambiguous",
            "{text}"
        );
    }
    let (status, text) = s
        .curl(
            &user,
            &[],
            "/v1/charges?next=https%3A%2F%2Flatchkey.stripe-second%2Fcb",
        )
        .await;
    assert_eq!(status, 400, "{text}");
    assert_eq!(
        body_json(&text)["error"]["code"],
        "connection_ambiguous",
        "{text}"
    );

    // Where the key goes, it wins over the same text elsewhere.
    let (status, text) = s
        .curl(
            &user,
            &[
                "-H",
                "X-Trace: from latchkey.stripe-second sidecar",
                "-H",
                &format!("Authorization: Bearer latchkey.{ID}"),
            ],
            "/v1/charges",
        )
        .await;
    assert_eq!(status, 200, "{text}");
    assert_ours(&body_json(&text), &s.key);

    // More than an ID after `latchkey.`: refused, not cut short.
    let (status, text) = s
        .curl(
            &user,
            &["-H", "Authorization: Bearer latchkey.stripe-second.extra"],
            "/v1/charges",
        )
        .await;
    assert_eq!(status, 400, "{text}");
    assert_eq!(
        body_json(&text)["error"]["code"],
        "bad_connection_id",
        "{text}"
    );

    // Placeholders in two key places: naming two connections is ambiguous, whichever place
    // comes first; naming one connection twice is that one.
    for (first, second) in [(ID, "stripe-second"), ("stripe-second", ID)] {
        let (status, text) = s
            .curl(
                &user,
                &[
                    "-H",
                    &format!("Authorization: Bearer latchkey.{first}"),
                    "-H",
                    &format!("x-api-key: latchkey.{second}"),
                ],
                "/v1/charges",
            )
            .await;
        assert_eq!(status, 400, "{text}");
        let error = &body_json(&text)["error"];
        assert_eq!(error["code"], "connection_ambiguous", "{text}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(ID) && message.contains("stripe-second"),
            "{text}"
        );
    }
    let (status, text) = s
        .curl(
            &user,
            &[
                "-H",
                &format!("Authorization: Bearer latchkey.{ID}"),
                "-H",
                &format!("x-api-key: latchkey.{ID}"),
            ],
            "/v1/charges",
        )
        .await;
    assert_eq!(status, 200, "{text}");
    assert_ours(&body_json(&text), &s.key);
    assert_eq!(s.up.requests(), 2);
}

#[tokio::test]
async fn a_connect_no_granted_connection_covers_is_refused_at_connect() {
    let s = Stripe::start(Opts::loopback().extra(&clients(&["stripe-*"]))).await;
    // A host no connection covers.
    let x = s
        .exchange(
            &connect_head("api.github.com:443", Some(("_", TOKEN))),
            Some("api.github.com"),
            &inner_get("/user", "api.github.com"),
        )
        .await;
    x.assert_connect_refused(403, "host_not_allowed");
    assert!(x.connect.body.contains("proxy.passthrough"), "{x:#?}");

    // A host only a connection this client may not use covers.
    let x = s
        .exchange(
            &connect_head(&format!("{STRIPE}:443"), Some(("", "no-such-client-token"))),
            Some(STRIPE),
            &inner_get("/v1/x", STRIPE),
        )
        .await;
    x.assert_connect_refused(407, "proxy_auth_required");
    let narrow = Stripe::start(Opts::loopback().extra(&client_toml(
        "elsewhere",
        OTHER_TOKEN,
        &["github-*"],
    )))
    .await;
    let x = narrow
        .exchange(
            &connect_head(&format!("{STRIPE}:443"), Some(("_", OTHER_TOKEN))),
            Some(STRIPE),
            &inner_get("/v1/x", STRIPE),
        )
        .await;
    x.assert_connect_refused(403, "host_not_allowed");
    assert_eq!(s.up.requests() + narrow.up.requests(), 0);

    let line =
        s.lk.access_line(|l| l["method"] == "CONNECT" && l["status"] == 403)
            .await;
    assert_eq!(line["host"], "api.github.com", "{line}");
    assert_eq!(line["client"], "runner", "{line}");
}

/// A connection created after the index of hosts was built is found by the next CONNECT that
/// would otherwise be refused (the index is rebuilt, at most once a second).
#[tokio::test]
async fn a_connection_created_later_is_found() {
    let s = Stripe::start(Opts::loopback().extra(&clients(&["*"]))).await;
    let other = echo().await;
    let target = format!("127.0.0.1:{}", other.addr().port());
    let x = s
        .exchange(
            &connect_head(&target, Some(("_", TOKEN))),
            None,
            &inner_get("/x", &target),
        )
        .await;
    x.assert_connect_refused(403, "host_not_allowed");

    let key = format!("late-key-{}", free_port());
    s._bao.put(
        "late",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &format!("http://{target}")),
            ("api_key", &key),
        ],
    );
    s.lk.forbid(&key);
    let status = wait_until(
        "the new connection is chosen",
        Duration::from_secs(20),
        || async {
            let x = s
                .exchange(
                    &connect_head(&target, Some(("_", TOKEN))),
                    None,
                    &inner_get("/x", &target),
                )
                .await;
            (x.connect.status == 200).then(|| x.inner().status)
        },
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(other.requests(), 1);
}

// ---------------------------------------------------------------------------------------------
// proxy.passthrough

const PYPI: &str = "pypi.org";

/// latchkey with `stripe-prod` and a client granted `stripe-*`, `pypi.org` (an echo upstream
/// with its own certificate from `pypi_ca`, not latchkey's) as a passthrough host, and
/// `blocked.example.net` as one that resolves to an address outside the allowed ranges.
struct Passthrough {
    s: Stripe,
    pypi: EchoServer,
    pypi_ca: TestCa,
}

async fn passthrough() -> Passthrough {
    let bao = Bao::start().await;
    let up_ca = TestCa::new();
    let up = stripe_upstream(&up_ca).await;
    let pypi_ca = TestCa::new();
    let pypi = EchoServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Some(pypi_ca.server_config(&[PYPI], &[b"http/1.1"])),
    )
    .await
    .unwrap();
    let key = stripe_key();
    bao.put(ID, &[("connector", "stripe"), ("api_key", &key)]);
    let ca = Ca::init().await;
    let opts = Opts::loopback()
        .extra(&clients(&["stripe-*"]))
        .root(&up_ca.pem_path)
        .proxy(&format!(
            "resolve = {{ \"{STRIPE}:443\" = \"{}\", \"{PYPI}:443\" = \"{}\", \"blocked.example.net:443\" = \"10.20.30.40:443\" }}",
            up.addr(),
            pypi.addr()
        ))
        .proxy("passthrough = [\"pypi.org\", \"blocked.example.net\"]")
        .tls(&format!("ca_cert = {:?}", ca.cert.display().to_string()))
        .tls(&format!("ca_key = {:?}", ca.key.display().to_string()));
    let lk = Latchkey::start(&bao, opts).await;
    ca.forbid_key(&lk);
    Passthrough {
        s: Stripe {
            lk,
            up,
            key,
            ca,
            _up_ca: up_ca,
            _bao: bao,
        },
        pypi,
        pypi_ca,
    }
}

impl Passthrough {
    /// curl to `https://pypi.org/simple/` through latchkey as `user`, trusting only `cacert`.
    async fn curl(&self, user: &str, cacert: &Path) -> (u16, String) {
        let proxy = format!("http://{}", self.s.lk.proxy);
        curl(&[
            "--proxy",
            &proxy,
            "--proxy-user",
            user,
            "--cacert",
            &cacert.display().to_string(),
            "-H",
            "Authorization: Bearer the-clients-own",
            &format!("https://{PYPI}/simple/"),
        ])
        .await
    }
}

#[tokio::test]
async fn a_passthrough_host_is_spliced_with_its_own_certificate_and_no_credential() {
    let p = passthrough().await;
    // With no connection named, and with a connection named that does not cover the host.
    let mut echoed = 0;
    for user in [format!("_:{TOKEN}"), format!("{ID}:{TOKEN}")] {
        let (status, text) = p.curl(&user, &p.pypi_ca.pem_path).await;
        assert_eq!(status, 200, "{user}: {text}");
        echoed = text.len() as u64;
        let echo = Echoed {
            status,
            json: body_json(&text),
            latchkey_error: None,
        };
        // Nothing added, nothing taken away: the client's own header, as it sent it.
        assert_eq!(
            echo.header_values("authorization"),
            vec!["Bearer the-clients-own".to_string()],
            "{text}"
        );
        assert!(!text.contains(&p.s.key));
    }
    assert_eq!(p.pypi.requests(), 2);

    // Trusting only latchkey's CA fails: latchkey did not terminate the TLS.
    // (curl -i prints the CONNECT's 200; the TLS inside fails, so no answer follows it.)
    let (_, text) = p.curl(&format!("_:{TOKEN}"), &p.s.ca.cert).await;
    assert!(!text.contains("the-clients-own"), "{text}");
    assert_eq!(p.pypi.requests(), 2);

    // The CONNECT's line is written when the splice closes, with the bytes each way: a TLS
    // handshake and a request in, the handshake's answer and the echo out.
    let line =
        p.s.lk
            .access_line(|l| l["method"] == "CONNECT" && l["form"] == "passthrough")
            .await;
    assert_eq!(line["host"], PYPI, "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["client"], "runner", "{line}");
    let (bytes_in, bytes_out) = (
        line["bytes_in"].as_u64().unwrap(),
        line["bytes_out"].as_u64().unwrap(),
    );
    assert!(bytes_in > 200, "{line}");
    assert!(bytes_out > echoed, "{line}");
}

#[tokio::test]
async fn passthrough_needs_a_client_token_and_the_address_check() {
    let p = passthrough().await;
    let x =
        p.s.exchange(&connect_head(&format!("{PYPI}:443"), None), None, "")
            .await;
    x.assert_connect_refused(407, "proxy_auth_required");
    let x =
        p.s.exchange(
            &connect_head("blocked.example.net:443", Some(("_", TOKEN))),
            None,
            "",
        )
        .await;
    x.assert_connect_refused(403, "destination_blocked");
    // Another port of a passthrough host is not one.
    let x =
        p.s.exchange(
            &connect_head(&format!("{PYPI}:8443"), Some(("_", TOKEN))),
            None,
            "",
        )
        .await;
    x.assert_connect_refused(403, "host_not_allowed");
    assert_eq!(p.pypi.requests(), 0);
}

/// A CONNECT to an IP literal outside the allowed ranges is refused at CONNECT, whether the
/// connection is named or chosen, even when a connection names that address as its host.
#[tokio::test]
async fn a_connect_to_an_ip_literal_outside_the_allowed_ranges_is_blocked() {
    let s = Stripe::start(Opts::default().extra(&clients(&["*"]))).await;
    let literals = [
        ("metadata", "169.254.169.254:443", "https://169.254.169.254"),
        (
            "mapped",
            "[::ffff:127.0.0.1]:443",
            "https://[::ffff:127.0.0.1]",
        ),
    ];
    // Both before the first CONNECT: the index of who covers what is rebuilt at most once a
    // second, so a connection written between two CONNECTs may not be in it yet.
    for (id, _, base) in literals {
        s._bao.put(
            id,
            &[
                ("connector", "generic-bearer"),
                ("base_url", base),
                ("api_key", "sk-literal-0123456789"),
            ],
        );
    }
    for (id, target, _) in literals {
        for user in [id, "_"] {
            let x = s
                .exchange(&connect_head(target, Some((user, TOKEN))), None, "")
                .await;
            x.assert_connect_refused(403, "destination_blocked");
        }
    }
    assert_eq!(s.up.requests(), 0);
}

/// Two connections `ids` with the fields `fields(id)` on one echo upstream (their base URL),
/// latchkey, and a client whose proxy user `_` names none of them.
async fn two_on_one_host(
    ids: [&str; 2],
    fields: impl Fn(&str) -> Vec<(&'static str, String)>,
) -> (Bao, EchoServer, Latchkey, reqwest::Client) {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    for id in ids {
        let mut f = fields(id);
        f.push(("base_url", base.clone()));
        let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
        bao.put(id, &f);
    }
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let client = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(lk.url(""))
                .unwrap()
                .basic_auth("_", ""),
        )
        .build()
        .unwrap();
    (bao, up, lk, client)
}

/// For a connector whose key is a query parameter, the placeholder goes in the query.
#[tokio::test]
async fn a_placeholder_in_the_query_picks_the_connection() {
    let (_bao, up, _lk, client) = two_on_one_host(["maps-a", "maps-b"], |id| {
        vec![
            ("connector", "google-maps".into()),
            ("api_key", format!("AIza-{id}-key")),
        ]
    })
    .await;
    let addr = up.addr();
    let r = read(
        client
            .get(format!("http://{addr}/geocode?key=latchkey.maps-b&q=1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert!(r.uri().contains("key=AIza-maps-b-key"), "{}", r.uri());
    assert!(!r.uri().contains("latchkey."), "{}", r.uri());
    let r = read(
        client
            .get(format!("http://{addr}/geocode?q=1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.json);
    assert_eq!(r.latchkey_error.as_deref(), Some("connection_ambiguous"));
    assert_eq!(up.requests(), 1);
}

/// For a Basic connector, the placeholder is the password an SDK sends (base64 in the pair):
/// it picks the connection as a bearer key's does, among several covering the host.
#[tokio::test]
async fn a_placeholder_as_the_basic_password_picks_the_connection() {
    let (_bao, up, _lk, client) = two_on_one_host(["basic-a", "basic-b"], |id| {
        vec![
            ("connector", "generic-basic".into()),
            ("username", "acct".into()),
            ("api_key", format!("pw-{id}-secret")),
        ]
    })
    .await;
    let url = format!("http://{}/v1/x", up.addr());
    let with_password = |password: &'static str| {
        let request = client.get(&url).basic_auth("acct", Some(password));
        async move { read(request.send().await.unwrap()).await }
    };
    let r = with_password("latchkey.basic-b").await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    use base64::Engine as _;
    let sent = base64::engine::general_purpose::STANDARD.encode("acct:pw-basic-b-secret");
    assert_eq!(r.header("authorization"), Some(format!("Basic {sent}")));
    // Without it, the two connections covering the host leave the choice open.
    let r = with_password("not-a-placeholder").await;
    assert_eq!(r.status, 400, "{:?}", r.json);
    assert_eq!(r.latchkey_error.as_deref(), Some("connection_ambiguous"));
    assert_eq!(up.requests(), 1);
}

/// A splice still open when latchkey stops is cut, and its CONNECT has its access line all the
/// same, saying so.
#[tokio::test]
async fn a_passthrough_splice_open_at_shutdown_has_its_access_line() {
    use tokio::io::AsyncWriteExt as _;
    let mut p = passthrough().await;
    let mut tcp = tokio::net::TcpStream::connect(p.s.lk.proxy).await.unwrap();
    let connect = connect_head(&format!("{PYPI}:443"), Some(("_", TOKEN)));
    tcp.write_all(connect.as_bytes()).await.unwrap();
    let head = String::from_utf8(read_head(&mut tcp).await).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Some bytes through, then silence: the splice stays open (its idle limit is a minute).
    tcp.write_all(b"hello").await.unwrap();
    let lk = &p.s.lk;
    wait_until("the splice open", Duration::from_secs(10), || async {
        let text = crate::errors::metrics_text(lk).await;
        text.lines()
            .any(|l| l == "latchkey_tunnels_open 1")
            .then_some(())
    })
    .await;
    p.s.lk.terminate();
    let status =
        p.s.lk
            .exited_within(Duration::from_secs(30))
            .await
            .expect("latchkey to exit");
    assert!(status.success(), "{status:?}");
    let line =
        p.s.lk
            .access_line(|l| l["method"] == "CONNECT" && l["form"] == "passthrough")
            .await;
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["error"], "shutdown", "{line}");
    drop(tcp);
}
