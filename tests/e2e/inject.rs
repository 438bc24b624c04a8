//! Issue item 1: the credential reaches the upstream exactly as the connector defines it, and
//! nothing the client sent can add a second one, leak the client token, or carry hop-by-hop
//! headers through. Every scheme (bearer, header, basic both ways, query) is checked with
//! built-in, generic and operator-defined connectors, over HTTP and HTTPS, in gateway and
//! forward form.

use base64::Engine as _;

use crate::support::*;

/// Where a case expects its credential.
enum Want {
    /// Exactly one header of this name with this value.
    Header(&'static str, String),
    /// This `name=value` pair appended to the query, and no credential header.
    Query(String),
}

/// One connection and what the upstream must see for it.
struct Case {
    id: &'static str,
    fields: Vec<(&'static str, String)>,
    want: Want,
    /// The path prefix a gateway request gets (from the base URL or the connector's).
    prefix: &'static str,
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Operator connectors covering every scheme, the second form of each, and a connector with
/// its own base URL (`own_base`) and default header.
fn operator_connectors(own_base: &str) -> String {
    format!(
        r#"
[connectors.op-token]
name = "Operator: Authorization token"
inject = {{ scheme = "header", header = "Authorization", value = "token {{api_key}}" }}

[connectors.op-basic-user]
name = "Operator: key as Basic user"
inject = {{ scheme = "basic", username = "{{api_key}}", password = "" }}

[connectors.op-basic-password]
name = "Operator: key as Basic password"
inject = {{ scheme = "basic", username = "", password = "{{api_key}}" }}

[connectors.op-query]
name = "Operator: key= query parameter"
inject = {{ scheme = "query", param = "key", value = "{{api_key}}" }}

[connectors.op-own]
name = "Operator: own base URL"
base_url = "{own_base}/own"
inject = {{ scheme = "header", header = "X-Internal-Key", value = "{{api_key}}" }}
headers = {{ "X-Tenant" = "acme" }}
"#
    )
}

/// The connections of the scheme tests, all pointing at `base` (`http://127.0.0.1:P` or
/// `https://localhost:P`).
fn cases(base: &str, tag: &str) -> Vec<Case> {
    let b = || ("base_url", base.to_string());
    let stripe = format!("sk_test_{tag}Stripe0123");
    let github = format!("ghp_{tag}Github0123");
    let anthropic = format!("sk-ant-{tag}-anthropic");
    let pagerduty = format!("{tag}pagerduty0123456789")[..20].to_string();
    let sid = "AC0123456789abcdef0123456789abcdef".to_string();
    let twilio = "fedcba9876543210fedcba9876543210".to_string();
    let mailchimp = "0123456789abcdef0123456789abcdef-us21".to_string();
    let gmaps = format!("AIza{tag}0123456789abcdefghijklmnopqrstuvwxyz")[..39].to_string();
    let g_bearer = format!("gen_bearer_{tag}");
    let g_header = format!("gen_header_{tag}");
    let g_user = format!("svc-user-{tag}");
    let g_basic = format!("gen_basic_{tag}");
    // Characters that must be percent-encoded in a query value.
    let g_query = format!("gen+q/{tag}=&x");
    let g_query_enc = g_query
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
        .replace('&', "%26");
    let o_token = format!("op_token_{tag}");
    let o_user = format!("op_user_{tag}");
    let o_pass = format!("op_pass_{tag}");
    let o_query = format!("op_query_{tag}");
    let o_own = format!("op_own_{tag}");
    vec![
        Case {
            id: "stripe",
            fields: vec![
                ("connector", "stripe".into()),
                b(),
                ("api_key", stripe.clone()),
            ],
            want: Want::Header("authorization", format!("Bearer {stripe}")),
            prefix: "",
        },
        Case {
            id: "github",
            fields: vec![
                ("connector", "github".into()),
                b(),
                ("api_key", github.clone()),
            ],
            want: Want::Header("authorization", format!("Bearer {github}")),
            prefix: "",
        },
        Case {
            id: "anthropic",
            fields: vec![
                ("connector", "anthropic".into()),
                b(),
                ("api_key", anthropic.clone()),
            ],
            want: Want::Header("x-api-key", anthropic),
            prefix: "",
        },
        Case {
            id: "pagerduty",
            fields: vec![
                ("connector", "pagerduty".into()),
                b(),
                ("api_key", pagerduty.clone()),
            ],
            want: Want::Header("authorization", format!("Token token={pagerduty}")),
            prefix: "",
        },
        Case {
            id: "twilio",
            fields: vec![
                ("connector", "twilio".into()),
                b(),
                ("account_sid", sid.clone()),
                ("auth_token", twilio.clone()),
            ],
            want: Want::Header("authorization", basic(&sid, &twilio)),
            prefix: "",
        },
        Case {
            id: "mailchimp",
            fields: vec![
                ("connector", "mailchimp".into()),
                b(),
                ("dc", "us21".into()),
                ("api_key", mailchimp.clone()),
            ],
            want: Want::Header("authorization", basic("latchkey", &mailchimp)),
            prefix: "",
        },
        Case {
            id: "gmaps",
            fields: vec![
                ("connector", "google-maps".into()),
                b(),
                ("api_key", gmaps.clone()),
            ],
            want: Want::Query(format!("key={gmaps}")),
            prefix: "",
        },
        Case {
            id: "gen-bearer",
            fields: vec![
                ("connector", "generic-bearer".into()),
                b(),
                ("api_key", g_bearer.clone()),
            ],
            want: Want::Header("authorization", format!("Bearer {g_bearer}")),
            prefix: "",
        },
        Case {
            id: "gen-header",
            fields: vec![
                ("connector", "generic-header".into()),
                b(),
                ("api_key", g_header.clone()),
            ],
            want: Want::Header("x-api-key", g_header),
            prefix: "",
        },
        Case {
            id: "gen-basic",
            fields: vec![
                ("connector", "generic-basic".into()),
                b(),
                ("username", g_user.clone()),
                ("api_key", g_basic.clone()),
            ],
            want: Want::Header("authorization", basic(&g_user, &g_basic)),
            prefix: "",
        },
        Case {
            id: "gen-query",
            fields: vec![
                ("connector", "generic-query".into()),
                b(),
                ("api_key", g_query),
            ],
            want: Want::Query(format!("api_key={g_query_enc}")),
            prefix: "",
        },
        Case {
            id: "op-token",
            fields: vec![
                ("connector", "op-token".into()),
                b(),
                ("api_key", o_token.clone()),
            ],
            want: Want::Header("authorization", format!("token {o_token}")),
            prefix: "",
        },
        Case {
            id: "op-basic-user",
            fields: vec![
                ("connector", "op-basic-user".into()),
                b(),
                ("api_key", o_user.clone()),
            ],
            want: Want::Header("authorization", basic(&o_user, "")),
            prefix: "",
        },
        Case {
            id: "op-basic-password",
            fields: vec![
                ("connector", "op-basic-password".into()),
                b(),
                ("api_key", o_pass.clone()),
            ],
            want: Want::Header("authorization", basic("", &o_pass)),
            prefix: "",
        },
        Case {
            id: "op-query",
            fields: vec![
                ("connector", "op-query".into()),
                b(),
                ("api_key", o_query.clone()),
            ],
            want: Want::Query(format!("key={o_query}")),
            prefix: "",
        },
        Case {
            // No base_url in the connection: the operator connector's own is used.
            id: "op-own",
            fields: vec![("connector", "op-own".into()), ("api_key", o_own.clone())],
            want: Want::Header("x-internal-key", o_own),
            prefix: "/own",
        },
    ]
}

fn put_case(bao: &Bao, case: &Case) {
    let fields: Vec<(&str, &str)> = case.fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    bao.put(case.id, &fields);
}

/// Checks what the upstream saw against the case: the credential exactly once, where the
/// connector puts it and nowhere else.
fn check(case: &Case, how: &str, r: &Echoed, path: &str) {
    assert_eq!(r.status, 200, "{} ({how}): {:?}", case.id, r.json);
    let text = r.json.to_string();
    match &case.want {
        Want::Header(name, value) => {
            assert_eq!(
                r.header_values(name),
                vec![value.clone()],
                "{} ({how}): the {name} header upstream",
                case.id
            );
            assert_eq!(
                r.uri(),
                path,
                "{} ({how}): no credential in the query",
                case.id
            );
            let json_value = serde_json::Value::String(value.clone()).to_string();
            let inner = &json_value[1..json_value.len() - 1];
            assert_eq!(
                text.matches(inner).count(),
                1,
                "{} ({how}): the credential appears once upstream: {text}",
                case.id
            );
        }
        Want::Query(pair) => {
            assert_eq!(
                r.uri(),
                format!("{path}&{pair}"),
                "{} ({how}): the query upstream",
                case.id
            );
            assert!(
                r.header_values("authorization").is_empty(),
                "{} ({how}): a query connector sends no Authorization",
                case.id
            );
        }
    }
}

/// Runs every case in gateway form (reqwest) and forward form (reqwest with a proxy), the
/// forward URL being `http://{authority}/...`.
async fn every_scheme(bao: &Bao, lk: &Latchkey, authority: &str, tag: &str, base: &str) {
    for case in cases(base, tag) {
        let r = gateway_get(lk, &format!("/{}/probe?x=1", case.id), &[]).await;
        check(&case, "gateway", &r, &format!("{}/probe?x=1", case.prefix));

        let client = reqwest::Client::builder()
            .proxy(
                reqwest::Proxy::http(lk.url(""))
                    .unwrap()
                    .basic_auth(case.id, "unused"),
            )
            .build()
            .unwrap();
        let r = read(
            client
                .get(format!("http://{authority}/forward?x=1"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        check(&case, "forward", &r, "/forward?x=1");
        // The same connection read once for both forms.
        assert_eq!(bao.reads_of(case.id), 1, "{}", case.id);
    }
}

#[tokio::test]
async fn every_scheme_reaches_an_http_upstream_as_its_connector_defines() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    for case in cases(&base, "h1") {
        put_case(&bao, &case);
    }
    let lk = Latchkey::start(&bao, Opts::loopback().extra(&operator_connectors(&base))).await;
    every_scheme(&bao, &lk, &up.addr().to_string(), "h1", &base).await;
    assert_eq!(up.requests(), 2 * cases(&base, "h1").len() as u64);
}

#[tokio::test]
async fn every_scheme_reaches_an_https_upstream_as_its_connector_defines() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    let up = echo_tls(&ca, &[b"h2", b"http/1.1"]).await;
    let authority = format!("localhost:{}", up.addr().port());
    let base = format!("https://{authority}");
    for case in cases(&base, "tls") {
        put_case(&bao, &case);
    }
    let lk = Latchkey::start(
        &bao,
        Opts::loopback()
            .root(&ca.pem_path)
            .extra(&operator_connectors(&base)),
    )
    .await;
    // Forward form names http://localhost:P; the https base URL makes it TLS (the upstream
    // speaks nothing else).
    every_scheme(&bao, &lk, &authority, "tls", &base).await;
    assert_eq!(up.requests(), 2 * cases(&base, "tls").len() as u64);
}

/// The value of a response header in curl -i output (the last response's), by name.
fn curl_header(text: &str, name: &str) -> Option<String> {
    let head = text.rsplit("HTTP/").next().unwrap_or_default();
    head.lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
}

/// An `Echoed` from curl -i output.
fn from_curl(status: u16, text: &str) -> Echoed {
    Echoed {
        status,
        json: body_json(text),
        latchkey_error: curl_header(text, "latchkey-error"),
    }
}

#[tokio::test]
async fn client_credential_headers_in_any_case_or_repeated_are_replaced_by_ours() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    let up = echo().await;
    let up_h2 = echo_tls(&ca, &[b"h2", b"http/1.1"]).await;
    let base = format!("http://{}", up.addr());
    let h2_authority = format!("localhost:{}", up_h2.addr().port());
    let h2_base = format!("https://{h2_authority}");
    // (connection, connector, header name as the client writes it, upstream value, upstream)
    let mut conns = Vec::new();
    for (id, connector, header, render, authority) in [
        (
            "rep-bearer",
            "generic-bearer",
            "Authorization",
            "Bearer {}",
            None,
        ),
        ("rep-header", "generic-header", "X-API-Key", "{}", None),
        ("rep-token", "op-token", "Authorization", "token {}", None),
        ("rep-anthropic", "anthropic", "X-Api-Key", "{}", None),
        ("rep-basic", "op-basic-user", "Authorization", "basic", None),
        // Over h2 the upstream sees lower-case names only: still exactly one.
        (
            "rep-h2",
            "generic-header",
            "X-API-Key",
            "{}",
            Some(&h2_authority),
        ),
    ] {
        let key = format!("{}_ours_{}", id.replace('-', "_"), up.addr().port());
        let key = if connector == "anthropic" {
            format!("sk-ant-{key}")
        } else {
            key
        };
        let conn_base = if authority.is_some() { &h2_base } else { &base };
        bao.put(
            id,
            &[
                ("connector", connector),
                ("base_url", conn_base),
                ("api_key", &key),
            ],
        );
        let want = if render == "basic" {
            basic(&key, "")
        } else {
            render.replace("{}", &key)
        };
        let authority = authority.cloned().unwrap_or(up.addr().to_string());
        conns.push((id, header, want, authority));
    }
    let lk = Latchkey::start(
        &bao,
        Opts::loopback()
            .root(&ca.pem_path)
            .extra(&operator_connectors(&base)),
    )
    .await;

    for (id, header, want, authority) in &conns {
        let lower = header.to_ascii_lowercase();
        let upper = header.to_ascii_uppercase();
        let hs = [
            format!("{header}: theirs-1"),
            format!("{upper}: Bearer theirs-2"),
            format!("{lower}: theirs-3"),
            format!("{lower}: Basic dGhlaXJzOjQ="),
        ];
        let mut gateway = Vec::new();
        for h in &hs {
            gateway.extend(["-H", h.as_str()]);
        }
        let gw_url = lk.url(&format!("/{id}/h"));
        gateway.push(&gw_url);
        let (status, text) = curl(&gateway).await;
        let r = from_curl(status, &text);
        assert_eq!(r.status, 200, "{id} gateway: {text}");
        assert_eq!(r.header_values(header), vec![want.clone()], "{id} gateway");
        assert!(!text.contains("theirs"), "{id} gateway: {text}");

        let proxy = lk.url("");
        let user = format!("{id}:x");
        let fw_url = format!("http://{authority}/h");
        let mut forward = vec!["-x", &proxy, "--proxy-user", &user];
        for h in &hs {
            forward.extend(["-H", h.as_str()]);
        }
        forward.push(&fw_url);
        let (status, text) = curl(&forward).await;
        let r = from_curl(status, &text);
        assert_eq!(r.status, 200, "{id} forward: {text}");
        assert_eq!(r.header_values(header), vec![want.clone()], "{id} forward");
        assert!(!text.contains("theirs"), "{id} forward: {text}");
    }
    assert_eq!(up_h2.requests(), 2);
}

#[tokio::test]
async fn client_credential_query_params_in_any_case_or_encoding_are_replaced_by_ours() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    let gmaps = "AIzaOurs0123456789abcdefghijklmnopqrstu";
    bao.put(
        "q-gmaps",
        &[
            ("connector", "google-maps"),
            ("base_url", &base),
            ("api_key", gmaps),
        ],
    );
    bao.put(
        "q-generic",
        &[
            ("connector", "generic-query"),
            ("base_url", &base),
            ("api_key", "generic_ours_key"),
        ],
    );
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    // The client's own copies: exact, upper case, mixed case, percent-encoded letters and
    // underscore, no value at all. Near-misses (`keys`, `my_key`) are other parameters.
    for (id, client_query, want) in [
        (
            "q-gmaps",
            "key=theirs1&KEY=theirs2&Key=theirs3&k%65y=theirs4&%4B%45%59=theirs5&key&a=1&keys=k&my_key=k",
            format!("a=1&keys=k&my_key=k&key={gmaps}"),
        ),
        (
            "q-generic",
            "api_key=theirs1&API_KEY=theirs2&Api%5FKey=theirs3&%61pi%5fkey=theirs4&api_key=&a=1&api_keys=k&my_api_key=k",
            "a=1&api_keys=k&my_api_key=k&api_key=generic_ours_key".to_string(),
        ),
    ] {
        let (status, text) = curl(&[&lk.url(&format!("/{id}/search?{client_query}"))]).await;
        assert_eq!(status, 200, "{id} gateway: {text}");
        let json = body_json(&text);
        assert_eq!(json["uri"], format!("/search?{want}"), "{id} gateway");
        assert!(!text.contains("theirs"), "{id} gateway: {text}");

        let (status, text) = curl(&[
            "-x",
            &lk.url(""),
            "--proxy-user",
            &format!("{id}:x"),
            &format!("http://{}/search?{client_query}", up.addr()),
        ])
        .await;
        assert_eq!(status, 200, "{id} forward: {text}");
        let json = body_json(&text);
        assert_eq!(json["uri"], format!("/search?{want}"), "{id} forward");
        assert!(!text.contains("theirs"), "{id} forward: {text}");
    }
}

#[tokio::test]
async fn proxy_authorization_never_reaches_the_upstream() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = "pa_upstream_key_0123";
    bao.put(
        "pa-one",
        &[
            ("connector", "generic-header"),
            ("base_url", &format!("http://{}", up.addr())),
            ("api_key", key),
        ],
    );
    let token = format!("client-token-{}", free_port());
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().extra(&format!(
            "[[clients]]\nname = \"workflows\"\ntoken_sha256 = \"{}\"\nconnections = [\"pa-*\"]\n",
            latchkey::auth::sha256_hex(&token)
        )),
    )
    .await;
    // The client token is a secret too: it must not appear in latchkey's output.
    lk.forbid(&token);

    // Without the token the clients table is in force: 407, and nothing goes upstream.
    let r = gateway_get(&lk, "/pa-one/x", &[]).await;
    assert_eq!(r.status, 407, "{:?}", r.json);
    assert_eq!(r.latchkey_error.as_deref(), Some("proxy_auth_required"));
    assert_eq!(up.requests(), 0);

    let no_proxy_auth = |r: &Echoed, how: &str| {
        assert_eq!(r.status, 200, "{how}: {:?}", r.json);
        assert!(
            r.header_values("proxy-authorization").is_empty(),
            "{how}: Proxy-Authorization reached the upstream"
        );
        assert!(
            !r.json.to_string().contains(&token),
            "{how}: the client token reached the upstream"
        );
        assert_eq!(r.header_values("x-api-key"), vec![key.to_string()], "{how}");
    };

    // Gateway form, Bearer and Basic (any user name).
    let bearer = format!("Bearer {token}");
    let r = gateway_get(&lk, "/pa-one/x", &[("Proxy-Authorization", &bearer)]).await;
    no_proxy_auth(&r, "gateway bearer");
    let b = basic("whoever", &token);
    let r = gateway_get(&lk, "/pa-one/x", &[("Proxy-Authorization", &b)]).await;
    no_proxy_auth(&r, "gateway basic");

    // Forward form, Basic connection:token, from curl and from Python requests.
    let (status, text) = curl(&[
        "-x",
        &lk.url(""),
        "--proxy-user",
        &format!("pa-one:{token}"),
        &format!("http://{}/fwd", up.addr()),
    ])
    .await;
    no_proxy_auth(&from_curl(status, &text), "forward curl");

    let out = python(
        "import json, os, requests\n\
         p = os.environ['PROXY']\n\
         r = requests.get(os.environ['URL'], proxies={'http': p})\n\
         print(json.dumps({'status': r.status_code, 'body': r.json()}))\n",
        &[
            ("PROXY", &format!("http://pa-one:{token}@{}", lk.proxy)),
            ("URL", &format!("http://{}/py", up.addr())),
            ("NO_PROXY", ""),
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let r = Echoed {
        status: v["status"].as_u64().unwrap() as u16,
        json: v["body"].clone(),
        latchkey_error: None,
    };
    no_proxy_auth(&r, "forward python");
    assert_eq!(r.uri(), "/py");
    assert_eq!(up.requests(), 4);
}

/// Hop-by-hop headers, as a client could send them.
const HOP: [&str; 10] = [
    "Connection: keep-alive, X-Hop-Named",
    "Connection: x-hop-second",
    "X-Hop-Named: 1",
    "X-Hop-Second: 2",
    "Keep-Alive: timeout=5, max=100",
    "TE: trailers",
    "Upgrade: websocket",
    "Proxy-Connection: keep-alive",
    "Trailer: X-Later",
    "X-End-To-End: kept",
];

fn assert_no_hop(r: &Echoed, how: &str) {
    assert_eq!(r.status, 200, "{how}: {:?}", r.json);
    for name in [
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
        "trailer",
        "x-hop-named",
        "x-hop-second",
    ] {
        assert!(
            r.header_values(name).is_empty(),
            "{how}: {name} reached the upstream: {:?}",
            r.json["headers"]
        );
    }
    assert_eq!(r.header_values("x-end-to-end"), vec!["kept"], "{how}");
}

#[tokio::test]
async fn hop_by_hop_headers_do_not_reach_the_upstream() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    let up = echo().await;
    let up_h2 = echo_tls(&ca, &[b"h2", b"http/1.1"]).await;
    put_bearer(&bao, "hop-h1", &format!("http://{}", up.addr()));
    let h2_authority = format!("localhost:{}", up_h2.addr().port());
    put_bearer(&bao, "hop-h2", &format!("https://{h2_authority}"));
    let lk = Latchkey::start(&bao, Opts::loopback().root(&ca.pem_path)).await;

    for (id, authority, version) in [
        ("hop-h1", up.addr().to_string(), "HTTP/1.1"),
        ("hop-h2", h2_authority, "HTTP/2.0"),
    ] {
        let mut gateway: Vec<&str> = Vec::new();
        for h in HOP {
            gateway.extend(["-H", h]);
        }
        let gw_url = lk.url(&format!("/{id}/hop"));
        gateway.push(&gw_url);
        let (status, text) = curl(&gateway).await;
        let r = from_curl(status, &text);
        assert_no_hop(&r, &format!("{id} gateway"));
        assert_eq!(r.json["version"], version, "{id}");

        // Forward form; curl adds its own Proxy-Connection here as well.
        let proxy = lk.url("");
        let user = format!("{id}:x");
        let fw_url = format!("http://{authority}/hop");
        let mut forward = vec!["-x", &proxy, "--proxy-user", &user];
        for h in HOP {
            forward.extend(["-H", h]);
        }
        forward.push(&fw_url);
        let (status, text) = curl(&forward).await;
        let r = from_curl(status, &text);
        assert_no_hop(&r, &format!("{id} forward"));
        assert_eq!(r.json["version"], version, "{id}");
    }
}

/// The access line of a request to `path` on `connection`, once it is written.
async fn access_line(lk: &Latchkey, connection: &str, path: &str) -> serde_json::Value {
    lk.access_line(|l| l["connection"] == connection && l["path"] == path)
        .await
}

#[tokio::test]
async fn h2_by_alpn_when_the_upstream_offers_it_and_http11_when_it_does_not() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    let both = echo_tls(&ca, &[b"h2", b"http/1.1"]).await;
    let h1_only = echo_tls(&ca, &[b"http/1.1"]).await;
    let no_alpn = echo_tls(&ca, &[]).await;
    let k_both = put_bearer(
        &bao,
        "alpn-both",
        &format!("https://localhost:{}", both.addr().port()),
    );
    let k_h1 = put_bearer(
        &bao,
        "alpn-h1",
        &format!("https://127.0.0.1:{}", h1_only.addr().port()),
    );
    let k_none = put_bearer(
        &bao,
        "alpn-none",
        &format!("https://localhost:{}", no_alpn.addr().port()),
    );
    let lk = Latchkey::start(&bao, Opts::loopback().root(&ca.pem_path)).await;

    for (id, key, version, logged) in [
        ("alpn-both", &k_both, "HTTP/2.0", "h2"),
        ("alpn-h1", &k_h1, "HTTP/1.1", "http/1.1"),
        ("alpn-none", &k_none, "HTTP/1.1", "http/1.1"),
    ] {
        // Twice: the second request goes over the pooled connection.
        for n in 0..2 {
            let path = format!("/v/{n}");
            let r = gateway_get(&lk, &format!("/{id}{path}"), &[]).await;
            assert_eq!(r.status, 200, "{id}: {:?}", r.json);
            assert_eq!(r.json["version"], version, "{id}");
            assert_eq!(r.header("authorization").unwrap(), format!("Bearer {key}"));
            let line = access_line(&lk, id, &path).await;
            assert_eq!(line["upstream_version"], logged, "{id}: {line}");
        }
    }
    assert_eq!(both.requests(), 2);
    assert_eq!(h1_only.requests(), 2);
    assert_eq!(no_alpn.requests(), 2);
}

#[tokio::test]
async fn forward_form_http_is_upgraded_to_https_when_the_base_url_is_https() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    // An upstream that speaks only TLS: a plain-HTTP request to it could not succeed.
    let up = echo_tls(&ca, &[b"h2", b"http/1.1"]).await;
    let h1 = echo_tls(&ca, &[b"http/1.1"]).await;
    let authority = format!("localhost:{}", up.addr().port());
    let h1_authority = format!("localhost:{}", h1.addr().port());
    let key = put_bearer(&bao, "upgrade", &format!("https://{authority}"));
    let key1 = put_bearer(
        &bao,
        "upgrade-h1",
        &format!("https://{h1_authority}/ignored"),
    );
    let lk = Latchkey::start(&bao, Opts::loopback().root(&ca.pem_path)).await;

    // curl
    let (status, text) = curl(&[
        "-x",
        &lk.url(""),
        "--proxy-user",
        "upgrade:x",
        &format!("http://{authority}/curl?a=1"),
    ])
    .await;
    assert_eq!(status, 200, "{text}");
    let json = body_json(&text);
    assert_eq!(json["uri"], "/curl?a=1");
    // h2 is only ever negotiated by TLS ALPN: the request went over TLS.
    assert_eq!(json["version"], "HTTP/2.0");
    let r = from_curl(status, &text);
    assert_eq!(r.header("authorization").unwrap(), format!("Bearer {key}"));

    // reqwest with a proxy
    let client = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(lk.url(""))
                .unwrap()
                .basic_auth("upgrade", "x"),
        )
        .build()
        .unwrap();
    let r = read(
        client
            .get(format!("http://{authority}/reqwest"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.uri(), "/reqwest");
    assert_eq!(r.json["version"], "HTTP/2.0");
    assert_eq!(r.header("authorization").unwrap(), format!("Bearer {key}"));

    // Python requests, to an upstream that offers only HTTP/1.1 over TLS.
    let out = python(
        "import json, os, requests\n\
         r = requests.get(os.environ['URL'], proxies={'http': os.environ['PROXY']})\n\
         print(json.dumps({'status': r.status_code, 'body': r.json()}))\n",
        &[
            ("PROXY", &format!("http://upgrade-h1:x@{}", lk.proxy)),
            ("URL", &format!("http://{h1_authority}/python")),
            ("NO_PROXY", ""),
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["status"], 200, "{v}");
    let r = Echoed {
        status: 200,
        json: v["body"].clone(),
        latchkey_error: None,
    };
    // Forward form keeps the client's path: no base-URL prefix.
    assert_eq!(r.uri(), "/python");
    assert_eq!(r.header("authorization").unwrap(), format!("Bearer {key1}"));
    assert_eq!(up.requests(), 2);
    assert_eq!(h1.requests(), 1);
}

#[tokio::test]
async fn connector_default_headers_are_added_when_absent_and_a_client_value_is_kept() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    bao.put(
        "notion",
        &[
            ("connector", "notion"),
            ("base_url", &base),
            ("api_key", "secret_notionKey0123"),
        ],
    );
    bao.put(
        "github",
        &[
            ("connector", "github"),
            ("base_url", &base),
            ("api_key", "ghp_githubKey0123"),
        ],
    );
    bao.put(
        "own",
        &[("connector", "op-own"), ("api_key", "own_key_0123")],
    );
    let lk = Latchkey::start(&bao, Opts::loopback().extra(&operator_connectors(&base))).await;

    // Absent: the connector's value, once.
    let r = gateway_get(&lk, "/notion/v1/users", &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.header_values("notion-version"), vec!["2022-06-28"]);
    assert_eq!(
        r.header("authorization").unwrap(),
        "Bearer secret_notionKey0123"
    );

    // Present, in any case: the client's value, and only it.
    let r = gateway_get(&lk, "/notion/v1/users", &[("Notion-Version", "2099-01-01")]).await;
    assert_eq!(r.header_values("notion-version"), vec!["2099-01-01"]);
    let (status, text) = curl(&[
        "-H",
        "NOTION-VERSION: 2001-02-03",
        &lk.url("/notion/v1/users"),
    ])
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        from_curl(status, &text).header_values("notion-version"),
        vec!["2001-02-03"]
    );

    // Forward form gets them too.
    let (status, text) = curl(&[
        "-x",
        &lk.url(""),
        "--proxy-user",
        "notion:x",
        &format!("{base}/v1/users"),
    ])
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        from_curl(status, &text).header_values("notion-version"),
        vec!["2022-06-28"]
    );

    // Two defaults: reqwest sends no User-Agent, so the connector's is added; curl's is kept.
    let r = gateway_get(&lk, "/github/user", &[]).await;
    assert_eq!(r.header_values("x-github-api-version"), vec!["2022-11-28"]);
    assert_eq!(r.header_values("user-agent"), vec!["latchkey"]);
    let (status, text) = curl(&[&lk.url("/github/user")]).await;
    let r = from_curl(status, &text);
    assert_eq!(r.header_values("x-github-api-version"), vec!["2022-11-28"]);
    let ua = r.header_values("user-agent");
    assert_eq!(ua.len(), 1, "{ua:?}");
    assert!(ua[0].starts_with("curl/"), "{ua:?}");

    // An operator connector's default header.
    let r = gateway_get(&lk, "/own/x", &[]).await;
    assert_eq!(r.header_values("x-tenant"), vec!["acme"]);
    assert_eq!(r.uri(), "/own/x");
    let r = gateway_get(&lk, "/own/x", &[("X-Tenant", "other")]).await;
    assert_eq!(r.header_values("x-tenant"), vec!["other"]);
}

#[tokio::test]
async fn gateway_prepends_the_base_url_path_and_passes_the_query_through() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "prefixed", &format!("http://{}/api/v2", up.addr()));
    put_bearer(&bao, "slashed", &format!("http://{}/api/v2/", up.addr()));
    put_bearer(&bao, "plain", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    for (request, upstream) in [
        ("/prefixed/items", "/api/v2/items"),
        ("/prefixed/items?limit=3", "/api/v2/items?limit=3"),
        (
            "/prefixed/items?a=1&a=2&b=x+y&c=%26%3D&d=&e",
            "/api/v2/items?a=1&a=2&b=x+y&c=%26%3D&d=&e",
        ),
        ("/prefixed/a%2Fb/c", "/api/v2/a%2Fb/c"),
        ("/prefixed/", "/api/v2/"),
        ("/prefixed", "/api/v2"),
        ("/slashed/items?x=1", "/api/v2/items?x=1"),
        ("/plain/items?x=1", "/items?x=1"),
        ("/plain/", "/"),
        ("/plain", "/"),
    ] {
        let (status, text) = curl(&[&lk.url(request)]).await;
        assert_eq!(status, 200, "{request}: {text}");
        assert_eq!(body_json(&text)["uri"], upstream, "{request}");
    }
}

/// `GET /{connection_id}?query`: the router ends the connection ID at `?` as well as at `/`,
/// so the query belongs to an empty path, which is the base URL's own.
#[tokio::test]
async fn gateway_passes_the_query_through_when_no_path_follows_the_connection_id() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "prefixed", &format!("http://{}/api/v2", up.addr()));
    put_bearer(&bao, "plain", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    for (request, upstream) in [
        ("/prefixed?x=1", "/api/v2?x=1"),
        ("/plain?x=1&y=2", "/?x=1&y=2"),
    ] {
        let (status, text) = curl(&[&lk.url(request)]).await;
        assert_eq!(status, 200, "{request}: {text}");
        assert_eq!(body_json(&text)["uri"], upstream, "{request}");
    }
    assert_eq!(up.requests(), 2);
}

/// Forward form, `GET http://host:port?x=1`: an absolute URI with an empty path is valid
/// (RFC 9112 3.2.2); the upstream gets `/?x=1`. curl and requests add the `/` themselves, so
/// this is sent raw.
#[tokio::test]
async fn forward_form_passes_the_query_through_when_the_url_has_no_path() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "nopath", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    let url = format!("http://{}", up.addr());
    let r = crate::destination::raw(
        &lk,
        &crate::destination::forward_request(&url, Some(&up.addr().to_string()), "nopath"),
    )
    .await;
    assert_eq!(r.status, 200, "{url}: {r:?}");
    assert_eq!(r.json()["uri"], "/");

    let url = format!("http://{}?x=1", up.addr());
    let r = crate::destination::raw(
        &lk,
        &crate::destination::forward_request(&url, Some(&up.addr().to_string()), "nopath"),
    )
    .await;
    assert_eq!(r.status, 200, "{url}: {r:?}");
    assert_eq!(r.json()["uri"], "/?x=1");
    assert_eq!(up.requests(), 2);
}

/// The Anthropic SDK sends its key as `Authorization: Bearer` too, where the service reads
/// `x-api-key`: the connector's strip list removes it, so only latchkey's credential arrives,
/// in gateway and in forward form.
#[tokio::test]
async fn a_connectors_strip_list_keeps_the_sdks_own_key_from_the_service() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = format!("sk-ant-ours{}", free_port());
    bao.put(
        "claude",
        &[
            ("connector", "anthropic"),
            ("base_url", &format!("http://{}", up.addr())),
            ("api_key", &key),
        ],
    );
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let placeholder = [
        ("authorization", "Bearer sk-ant-placeholder"),
        ("x-api-key", "sk-ant-placeholder"),
    ];
    let r = gateway_get(&lk, "/claude/v1/messages", &placeholder).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.header("x-api-key"), Some(key.clone()));
    assert_eq!(r.header("authorization"), None, "{:?}", r.json);
    assert_eq!(r.header("anthropic-version").as_deref(), Some("2023-06-01"));

    let mut req = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(lk.url(""))
                .unwrap()
                .basic_auth("claude", ""),
        )
        .build()
        .unwrap()
        .get(format!("http://{}/v1/messages", up.addr()));
    for (k, v) in placeholder {
        req = req.header(k, v);
    }
    let r = read(req.send().await.unwrap()).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.header("x-api-key"), Some(key));
    assert_eq!(r.header("authorization"), None, "{:?}", r.json);
    assert_eq!(up.requests(), 2);
}
