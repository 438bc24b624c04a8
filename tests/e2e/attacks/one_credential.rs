//! PRODUCT.md 10.4: exactly one credential header (or query parameter) reaches the upstream, and
//! it is ours; whatever the client sent under that name, in any case or repeated, is gone.
//! `inject` tries names in any case and repeated, encoded query names and `Proxy-Authorization`
//! in gateway and forward form; `hardening` the `X_Api_Key`, `key[]`, `key;x` look-alikes.
//! Attacks tried here:
//!
//! - the same inside a tunnel, over TLS and in plain HTTP, in HTTP/1.1 and h2, for a header, a
//!   bearer and a query connector, with `Connection` naming the credential header too;
//! - duplicates over h2 to the gateway (prior knowledge);
//! - a credential in the request's trailers (chunked HTTP/1.1 and h2), to HTTP/1.1 and h2
//!   upstreams;
//! - request smuggling that would carry a second request, with the client's own
//!   `Authorization`, past the strip: CL.TE, TE.CL, TE.TE with obfuscated `Transfer-Encoding`
//!   (`xchunked`, `chunked, identity`, `identity, chunked`, `"chunked"`, `chunk`, a second TE
//!   header, a space before the colon, an obs-fold, a tab, a bare LF, `Transfer_Encoding`),
//!   obfuscated `Content-Length` (`+5`, `0x5`, `5, 5`, `5, 6`, two headers, `-1`, `5.0`,
//!   `1e1`, 20 digits) and chunk sizes (`0x5`, `+5`, ` 5`, `5 `, LF-only lines, an extension),
//!   in gateway, forward and tunnel form, against an upstream that frames strictly; a request
//!   sent after each is answered with its own answer;
//! - the client token in two of the places a key goes at once (an SDK sending its key as a
//!   header and as a query parameter): neither reaches the upstream;
//! - query names that PHP reads as ours: `api.key`, `api+key`, `api%20key`, `api[key`
//!   (PHP turns `.`, space and an unclosed `[` in a name into `_`).

use super::*;

/// Connections `tb` (bearer), `th` (`X-API-Key`) and `tq` (query `api_key`) to the HTTPS echo.
async fn three_schemes(opts: Opts) -> World {
    World::start(opts, |bao, _, secure| {
        for (id, connector) in [
            ("tb", "generic-bearer"),
            ("th", "generic-header"),
            ("tq", "generic-query"),
        ] {
            bao.put(
                id,
                &[
                    ("connector", connector),
                    ("base_url", secure),
                    ("api_key", &format!("ours_{id}_0123456789")),
                ],
            );
        }
    })
    .await
}

/// The upstream saw exactly our credential for connection `id` under the credential's name,
/// and nothing the client sent under that name (or a look-alike of it).
#[track_caller]
fn assert_only_ours(e: &Echoed, id: &str, what: &str) {
    let ours = format!("ours_{id}_0123456789");
    match id {
        "tb" => assert_eq!(
            e.header_values("authorization"),
            vec![format!("Bearer {ours}")],
            "{what}: {}",
            e.json
        ),
        "th" => {
            assert_eq!(
                e.header_values("x-api-key"),
                vec![ours],
                "{what}: {}",
                e.json
            );
            assert!(
                e.header_values("x_api_key").is_empty(),
                "{what}: {}",
                e.json
            );
        }
        _ => {
            assert!(!e.uri().contains("theirs"), "{what}: {}", e.uri());
            assert_eq!(
                e.uri().matches(&format!("api_key={ours}")).count(),
                1,
                "{what}: {}",
                e.uri()
            );
        }
    }
}

const THEIRS_HEADERS: &str = "Authorization: theirs-1\r\nAUTHORIZATION: Bearer theirs-2\r\nauthorization: Basic dGhlaXJzOjM=\r\nX-API-Key: theirs-4\r\nx-api-key: theirs-5\r\nX-Api-Key: theirs-6\r\nX_Api_Key: theirs-7\r\n";

#[tokio::test]
async fn client_credentials_inside_a_tunnel_in_any_case_or_repeated_are_replaced() {
    let w = three_schemes(Opts::loopback()).await;
    let authority = w.secure_authority();
    for form in [Form::Tunnel, Form::PlainTunnel] {
        for id in ["tb", "th", "tq"] {
            for extra in ["", "Connection: Authorization, X-API-Key\r\n"] {
                let headers = format!("{THEIRS_HEADERS}{extra}");
                let req = Req::get(
                    id,
                    "/x?api_key=theirs-q1&API_KEY=theirs-q2&api%5Fkey=theirs-q3&a=1",
                )
                .headers(&headers);
                let got = w.send(form, &req).await;
                assert_only_ours(
                    &echoed(&got, &format!("{form:?} {id}")),
                    id,
                    &format!("{form:?} {id} {extra:?}"),
                );
            }
        }
    }
    // h2 inside the tunnel: the same names repeated (h2 names are lower case).
    for id in ["tb", "th", "tq"] {
        let req = http::Request::get(format!(
            "https://{authority}/x?api_key=theirs-q1&Api_Key=theirs-q2"
        ))
        .header("authorization", "theirs-1")
        .header("authorization", "Bearer theirs-2")
        .header("x-api-key", "theirs-3")
        .header("x-api-key", "theirs-4")
        .header("x_api_key", "theirs-5")
        .body(())
        .unwrap();
        let got = h2_in_tunnel(&w.lk, &authority, id, req, None, None)
            .await
            .unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        let e = Echoed {
            status: 200,
            json: serde_json::from_str(&echo_text(&got.body)).unwrap(),
            latchkey_error: None,
        };
        assert_only_ours(&e, id, &format!("h2 tunnel {id}"));
    }
}

#[tokio::test]
async fn client_credentials_repeated_over_h2_to_the_gateway_are_replaced() {
    let w = three_schemes(Opts::loopback()).await;
    for id in ["tb", "th", "tq"] {
        let io = TcpStream::connect(w.lk.proxy).await.unwrap();
        let req = http::Request::get(format!(
            "http://latchkey/{id}/x?api_key=theirs-q1&API_KEY=theirs-q2"
        ))
        .header("authorization", "theirs-1")
        .header("authorization", "Bearer theirs-2")
        .header("x-api-key", "theirs-3")
        .header("x-api-key", "theirs-4")
        .body(())
        .unwrap();
        let got = h2_request(io, req, None, None).await.unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        let e = Echoed {
            status: 200,
            json: serde_json::from_str(&echo_text(&got.body)).unwrap(),
            latchkey_error: None,
        };
        assert_only_ours(&e, id, &format!("h2 gateway {id}"));
    }
}

#[tokio::test]
async fn a_credential_in_the_request_trailers_never_reaches_the_upstream() {
    // The plain echo speaks HTTP/1.1; the secure one is reached over h2 (ALPN).
    let w = World::start(Opts::loopback(), |bao, plain, secure| {
        for (id, base) in [("tr-h1", plain), ("tr-h2", secure)] {
            bao.put(
                id,
                &[
                    ("connector", "generic-header"),
                    ("base_url", base),
                    ("api_key", &format!("ours_{id}_0123456789")),
                ],
            );
        }
    })
    .await;
    let chunked = "Transfer-Encoding: chunked\r\nTrailer: Authorization, X-API-Key\r\n";
    let body = b"5\r\nhello\r\n0\r\nAuthorization: Bearer theirs-trailer\r\nX-API-Key: theirs-trailer\r\n\r\n";
    let mut seen = Vec::new();
    for (id, authority) in [
        ("tr-h1", w.plain.addr().to_string()),
        ("tr-h2", w.secure_authority()),
    ] {
        let forms: &[Form] = if id == "tr-h1" {
            &[Form::Gateway, Form::Forward, Form::PlainTunnel]
        } else {
            &FORMS
        };
        for form in forms {
            let req = Req {
                id,
                token: "",
                method: "POST",
                path: "/t",
                headers: chunked,
                body,
            };
            let got = send(&w.lk, *form, &authority, &req).await;
            let e = echoed(&got, &format!("{id} {form:?}"));
            assert_eq!(e.json["body_bytes"], 5, "{id} {form:?}: {}", e.json);
            seen.push((format!("{id} {form:?}"), e.json.to_string()));
        }
    }
    // h2 from the client to the gateway, with trailers, to both upstreams.
    for id in ["tr-h1", "tr-h2"] {
        let io = TcpStream::connect(w.lk.proxy).await.unwrap();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("authorization", "Bearer theirs-h2-trailer".parse().unwrap());
        trailers.insert("x-api-key", "theirs-h2-trailer".parse().unwrap());
        let req = http::Request::post(format!("http://latchkey/{id}/t"))
            .body(())
            .unwrap();
        let got = h2_request(io, req, Some(b"hello"), Some(trailers))
            .await
            .unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        seen.push((format!("{id} h2 gateway"), got.body));
    }
    let carried: Vec<&(String, String)> =
        seen.iter().filter(|(_, s)| s.contains("theirs")).collect();
    assert!(
        carried.is_empty(),
        "trailers carried the client's credential: {carried:#?}"
    );
}

/// What follows a smuggling payload's framing: a whole second request with the client's own
/// credential.
const SMUGGLED: &str =
    "GET /smuggled HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer theirs-smuggled\r\nX-API-Key: theirs-smuggled\r\n\r\n";

/// (name, framing header lines, body) of each smuggling attempt.
fn smuggling_payloads() -> Vec<(String, String, Vec<u8>)> {
    let mut out = Vec::new();
    // CL.TE: a front end that reads the length sends all; one that reads the chunks stops at
    // `0` and leaves the rest as the next request.
    let cl_te_body = format!("0\r\n\r\n{SMUGGLED}");
    // TE.CL: the length covers the first chunk's size line only.
    let chunk = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    let te_cl_length = format!("{:x}\r\n", SMUGGLED.len()).len();
    let te_variants = [
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: xchunked",
        "Transfer-Encoding: chunked, identity",
        "Transfer-Encoding: identity, chunked",
        "Transfer-Encoding: \"chunked\"",
        "Transfer-Encoding: chunk",
        "Transfer-Encoding: CHUNKED",
        "Transfer-Encoding:  chunked",
        "Transfer-Encoding:\tchunked",
        "Transfer-Encoding: chunked\t",
        "Transfer-Encoding : chunked",
        "Transfer-Encoding:\r\n chunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: x",
        "Transfer-Encoding: x\r\nTransfer-Encoding: chunked",
        "X-Pad: x\nTransfer-Encoding: chunked",
        "Transfer_Encoding: chunked",
        "Transfer-Encoding: chunked;q=1",
    ];
    for te in te_variants {
        out.push((
            format!("CL.TE {te:?}"),
            format!("Content-Length: {}\r\n{te}\r\n", cl_te_body.len()),
            cl_te_body.clone().into_bytes(),
        ));
        out.push((
            format!("TE.CL {te:?}"),
            format!("{te}\r\nContent-Length: {te_cl_length}\r\n"),
            chunk.clone().into_bytes(),
        ));
        out.push((
            format!("TE alone {te:?}"),
            format!("{te}\r\n"),
            cl_te_body.clone().into_bytes(),
        ));
    }
    // Content-Length spelled so that parsers disagree on where the body ends.
    let five = format!("hello{SMUGGLED}");
    for cl in [
        "Content-Length: +5",
        "Content-Length: 0x5",
        "Content-Length: 5, 5",
        "Content-Length: 5, 6",
        "Content-Length: 5\r\nContent-Length: 5",
        "Content-Length: 5\r\nContent-Length: 6",
        "Content-Length: -1",
        "Content-Length: 5.0",
        "Content-Length: 1e1",
        "Content-Length: 5 6",
        "Content-Length: 00000000000000000005",
        "Content-Length: 99999999999999999999",
        "Content-Length : 5",
        "Content-Length:\r\n 5",
    ] {
        out.push((
            format!("{cl:?}"),
            format!("{cl}\r\n"),
            five.clone().into_bytes(),
        ));
    }
    // Chunk sizes spelled so that parsers disagree on where a chunk ends.
    for (name, body) in [
        ("chunk 0x5", format!("0x5\r\nhello\r\n0\r\n\r\n{SMUGGLED}")),
        ("chunk +5", format!("+5\r\nhello\r\n0\r\n\r\n{SMUGGLED}")),
        ("chunk ' 5'", format!(" 5\r\nhello\r\n0\r\n\r\n{SMUGGLED}")),
        ("chunk '5 '", format!("5 \r\nhello\r\n0\r\n\r\n{SMUGGLED}")),
        ("chunk LF lines", format!("5\nhello\n0\n\n{SMUGGLED}")),
        (
            "chunk extension",
            format!("5;a=\"0\r\n\r\n\"\r\nhello\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        (
            "chunk longer than said",
            format!("3\r\nhello\r\n0\r\n\r\n{SMUGGLED}"),
        ),
        ("chunk 0 then data", format!("0\r\nhello\r\n\r\n{SMUGGLED}")),
    ] {
        out.push((
            name.to_string(),
            "Transfer-Encoding: chunked\r\n".to_string(),
            body.into_bytes(),
        ));
    }
    out
}

#[tokio::test]
async fn smuggled_requests_never_reach_the_upstream_with_the_clients_credential() {
    let up = Recorder::start().await;
    let bao = Bao::start().await;
    bao.put(
        "sm",
        &[
            ("connector", "generic-header"),
            ("base_url", &format!("http://{}", up.addr)),
            ("api_key", "ours_sm_0123456789"),
        ],
    );
    let ca = Ca::init().await;
    // One worker: one pool of upstream connections, which a desync would poison.
    let lk = Latchkey::start(&bao, with_ca(Opts::loopback().proxy("workers = 1"), &ca)).await;
    let authority = up.addr.to_string();
    let mut wrong = Vec::new();
    let mut n = 0;
    for (name, framing, body) in smuggling_payloads() {
        for form in [Form::Gateway, Form::Forward, Form::PlainTunnel] {
            n += 1;
            let path = format!("/p{n}");
            let req = Req {
                id: "sm",
                token: "",
                method: "POST",
                path: &path,
                headers: &framing,
                body: &body,
            };
            let got = send(&lk, form, &authority, &req).await;
            // Refused, or answered with the upstream's answer to this very request.
            let line = format!("POST {path} HTTP/1.1");
            match &got {
                None => {}
                Some(a) if a.status == 400 => {}
                Some(a) if a.status == 200 && a.body == line => {}
                Some(a) => wrong.push(format!("{name} {form:?}: {} {:?}", a.status, a.body)),
            }
            // A request after it, on a new client connection, gets its own answer.
            let follow = format!("/follow{n}");
            let got = send(&lk, form, &authority, &Req::get("sm", &follow)).await;
            let want = format!("GET {follow} HTTP/1.1");
            if got.as_ref().map(|a| a.body.as_str()) != Some(want.as_str()) {
                wrong.push(format!("{name} {form:?}: the next request got {got:?}"));
            }
        }
    }
    for r in up.requests() {
        if r.line.contains("smuggled") {
            wrong.push(format!("the upstream read a smuggled request: {r:?}"));
        }
        let keys = r.values("x-api-key");
        if keys != ["ours_sm_0123456789"] || !r.values("authorization").is_empty() {
            wrong.push(format!("the upstream read another credential: {r:?}"));
        }
        if !r.values("content-length").is_empty() && !r.values("transfer-encoding").is_empty() {
            wrong.push(format!("both framings went upstream: {r:?}"));
        }
    }
    for t in up.trouble() {
        wrong.push(format!(
            "the upstream was sent what a strict server refuses: {t}"
        ));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn a_client_token_in_two_key_places_reaches_the_upstream_in_neither() {
    const TOKEN: &str = "client-token-in-two-places-0123";
    let w = World::start(
        Opts::loopback().extra(&crate::errors::client_toml("sdk", TOKEN, &["*"])),
        |bao, _, secure| {
            put_bearer(bao, "bearer", secure);
            bao.put(
                "anthropic",
                &[
                    ("connector", "anthropic"),
                    ("base_url", secure),
                    ("api_key", "sk-ant-two-places-0123"),
                ],
            );
            bao.put(
                "maps",
                &[
                    ("connector", "google-maps"),
                    ("base_url", secure),
                    ("api_key", "AIzaTwoPlaces0123456789abcdefghijklmnopq"),
                ],
            );
        },
    )
    .await;
    w.lk.forbid(TOKEN);
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
    let x_api_key = format!("x-api-key: {TOKEN}\r\n");
    let both_headers = format!("{bearer}{x_api_key}");
    let in_query = format!("/x?key={TOKEN}");
    let mut reached = Vec::new();
    for (id, path, headers) in [
        ("bearer", "/x", both_headers.as_str()),
        ("bearer", in_query.as_str(), bearer.as_str()),
        ("maps", in_query.as_str(), bearer.as_str()),
        ("maps", in_query.as_str(), x_api_key.as_str()),
        ("anthropic", in_query.as_str(), x_api_key.as_str()),
    ] {
        let got = w
            .send(Form::Gateway, &Req::get(id, path).headers(headers))
            .await;
        let e = echoed(&got, &format!("{id} {path} {headers:?}"));
        if e.json.to_string().contains(TOKEN) {
            reached.push(format!("{id} {path} {headers:?}: {}", e.json));
        }
    }
    assert!(
        reached.is_empty(),
        "the client token reached the upstream:\n{}",
        reached.join("\n")
    );
}

#[tokio::test]
async fn query_names_that_php_reads_as_ours_do_not_pass() {
    let w = three_schemes(Opts::loopback()).await;
    let mut passed = Vec::new();
    for form in FORMS {
        let req = Req::get(
            "tq",
            "/x?api.key=theirs-1&api+key=theirs-2&api%20key=theirs-3&api[key=theirs-4&api%2ekey=theirs-5&a=1",
        );
        let got = w.send(form, &req).await;
        let e = echoed(&got, &format!("{form:?}"));
        if e.uri().contains("theirs") {
            passed.push(format!("{form:?}: {}", e.uri()));
        }
    }
    assert!(
        passed.is_empty(),
        "look-alikes that reached the upstream:\n{}",
        passed.join("\n")
    );
}
