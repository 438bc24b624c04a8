//! The credential does not come back to the client (PRODUCT.md section 4, step 7, and section
//! 10, property 8): upstreams that echo it, in a body (plain, chunked with the key split across
//! chunks, gzip, deflate, br), a response header, a trailer-less stream, or a redirect's
//! `Location`, hand the workflow the connection's placeholder `latchkey.{id}` instead, in every
//! request form; each replacement is counted in `latchkey_response_scrubbed_total`.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::clients::Httpbin;
use crate::errors::{metrics_text, send};
use crate::support::*;

/// A key with characters that base64, percent-encoding and JSON treat specially.
const KEY: &str = "sk_live_EchO/Me+9f3a=Q7x";

/// What an encoder that keeps `/` encodes (Python's `quote`, httpbin's `url`).
const KEEP_SLASH: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC.remove(b'/');

/// Every form the key must not come back in.
fn forms(secret: &str) -> Vec<String> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    let mut out = vec![
        secret.to_string(),
        STANDARD.encode(secret),
        URL_SAFE.encode(secret),
        percent_encoding::utf8_percent_encode(secret, percent_encoding::NON_ALPHANUMERIC)
            .to_string(),
        percent_encoding::utf8_percent_encode(secret, KEEP_SLASH).to_string(),
    ];
    out.extend(base64_cores(secret.as_bytes()));
    out
}

#[track_caller]
fn assert_clean(what: &str, text: &str) {
    for form in forms(KEY) {
        assert!(
            !text.contains(&form),
            "{what}: the key came back as {form:?}: {text}"
        );
    }
    // However an encoder spelled it: percent-decoded, `\/` read as `/`.
    let decoded = percent_encoding::percent_decode_str(text).decode_utf8_lossy();
    assert!(
        !decoded.replace("\\/", "/").contains(KEY),
        "{what}: the key came back percent-encoded or JSON-escaped: {text}"
    );
}

/// The count of `latchkey_response_scrubbed_total` for `connection`.
async fn scrubbed(lk: &Latchkey, connection: &str) -> u64 {
    let text = metrics_text(lk).await;
    let prefix = format!("latchkey_response_scrubbed_total{{connection=\"{connection}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn httpbin_echoes_come_back_with_the_placeholder_gzip_on_and_off() {
    let bao = Bao::start().await;
    let hb = Httpbin::start().await;
    let base = format!("http://127.0.0.1:{}", hb.port);
    for (id, connector) in [
        ("hb-bearer", "generic-bearer"),
        ("hb-header", "generic-header"),
        ("hb-query", "generic-query"),
    ] {
        bao.put(
            id,
            &[
                ("connector", connector),
                ("base_url", &base),
                ("api_key", KEY),
            ],
        );
    }
    bao.put(
        "hb-basic",
        &[
            ("connector", "generic-basic"),
            ("base_url", &base),
            ("username", "user"),
            ("api_key", KEY),
        ],
    );
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    for id in ["hb-bearer", "hb-header", "hb-query", "hb-basic"] {
        let placeholder = format!("latchkey.{id}");
        let before = scrubbed(&lk, id).await;
        let mut replaced = 0;
        for path in [
            "/headers",
            "/anything/x?a=1",
            // `url` holds the query as sent, `/` left as it is and `+` and `=` encoded.
            "/get",
            "/gzip",
            "/deflate",
            // The key's percent-encoded form comes back in a response header and in the body.
            &format!(
                "/response-headers?X-Echo={}",
                percent_encoding::utf8_percent_encode(KEY, percent_encoding::NON_ALPHANUMERIC)
            ),
        ] {
            for gzip in [false, true] {
                let mut req = http().get(lk.url(&format!("/{id}{path}")));
                if gzip {
                    req = req.header("accept-encoding", "gzip");
                }
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), 200, "{id}{path}");
                let headers = format!("{:?}", resp.headers());
                assert!(
                    resp.headers().get("content-encoding").is_none(),
                    "{id}{path}: the answer is decoded to be scanned: {headers}"
                );
                let text = resp.text().await.unwrap();
                assert_clean(&format!("{id}{path} headers"), &headers);
                assert_clean(&format!("{id}{path}"), &text);
                let hits =
                    text.matches(&placeholder).count() + headers.matches(&placeholder).count();
                // A query key shows only where httpbin echoes the query.
                let echoes_it = id != "hb-query"
                    || path.starts_with("/anything")
                    || path == "/get"
                    || path.starts_with("/response-headers");
                assert!(
                    hits > 0 || !echoes_it,
                    "{id}{path}: the echo shows no placeholder: {text}"
                );
                replaced += hits;
            }
        }
        let after = scrubbed(&lk, id).await;
        assert!(
            after - before >= replaced as u64,
            "{id}: the counter moved by {} for {replaced} placeholders seen",
            after - before
        );
    }
}

/// What the raw upstream sends back, for one request: `{echo}` in the templates is replaced by
/// the `Authorization` value or, for a query connection, the request's whole query.
struct Echoing {
    addr: SocketAddr,
}

impl Echoing {
    /// An HTTP/1.1 upstream that writes, for `GET /{kind}`, an answer carrying what it
    /// received: `chunked` splits it across chunks of 3 bytes, `gzip`/`deflate`/`br` compress
    /// it (announced in `Content-Encoding`), `redirect` puts it in a `Location`, `header` in a
    /// response header.
    async fn start() -> Echoing {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).into_owned();
                    let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                    let echo = head
                        .lines()
                        .find_map(|l| {
                            let (n, v) = l.split_once(':')?;
                            n.eq_ignore_ascii_case("authorization")
                                .then(|| v.trim().to_string())
                        })
                        .unwrap_or_else(|| query.to_string());
                    let body = format!("{{\"you sent\": \"{echo}\"}}");
                    let answer = answer(path.trim_start_matches('/'), &echo, body.as_bytes()).await;
                    let _ = s.write_all(&answer).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Echoing { addr }
    }
}

async fn answer(kind: &str, echo: &str, body: &[u8]) -> Vec<u8> {
    use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZlibEncoder};
    let mut out = Vec::new();
    let head = |extra: &str, len: Option<usize>| {
        let length = len.map_or("Transfer-Encoding: chunked\r\n".to_string(), |n| {
            format!("Content-Length: {n}\r\n")
        });
        format!("HTTP/1.1 200 OK\r\nConnection: close\r\n{extra}{length}\r\n").into_bytes()
    };
    match kind {
        "chunked" => {
            out.extend(head("", None));
            for piece in body.chunks(3) {
                out.extend(format!("{:x}\r\n", piece.len()).into_bytes());
                out.extend_from_slice(piece);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        }
        "gzip" | "deflate" | "br" => {
            let mut packed = Vec::new();
            match kind {
                "gzip" => GzipEncoder::new(body).read_to_end(&mut packed).await,
                "deflate" => ZlibEncoder::new(body).read_to_end(&mut packed).await,
                _ => BrotliEncoder::new(body).read_to_end(&mut packed).await,
            }
            .unwrap();
            out.extend(head(
                &format!("Content-Encoding: {kind}\r\nETag: \"v1\"\r\n"),
                Some(packed.len()),
            ));
            out.extend(packed);
        }
        "redirect" => {
            out.extend(head(
                &format!("Location: https://example.test/next?{echo}\r\n"),
                Some(0),
            ));
        }
        "header" => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(echo);
            out.extend(head(
                &format!("X-Debug: {echo}\r\nX-Debug-B64: {b64}\r\n"),
                Some(body.len()),
            ));
            out.extend_from_slice(body);
        }
        "tegzip" => {
            // A transfer coding rather than a content coding: the gzip bytes, chunked.
            let mut packed = Vec::new();
            GzipEncoder::new(body)
                .read_to_end(&mut packed)
                .await
                .unwrap();
            out.extend(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            );
            out.extend(format!("{:x}\r\n", packed.len()).into_bytes());
            out.extend(packed);
            out.extend_from_slice(b"\r\n0\r\n\r\n");
        }
        "zstd" => {
            out.extend(head("Content-Encoding: zstd\r\n", Some(body.len())));
            out.extend_from_slice(body);
        }
        _ => {
            out.extend(head("", Some(body.len())));
            out.extend_from_slice(body);
        }
    }
    out
}

#[tokio::test]
async fn echoed_keys_split_across_chunks_compressed_in_headers_and_redirects_are_replaced() {
    let bao = Bao::start().await;
    let up = Echoing::start().await;
    let base = format!("http://{}", up.addr);
    bao.put(
        "raw-bearer",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &base),
            ("api_key", KEY),
        ],
    );
    bao.put(
        "raw-query",
        &[
            ("connector", "generic-query"),
            ("base_url", &base),
            ("api_key", KEY),
        ],
    );
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    for id in ["raw-bearer", "raw-query"] {
        let placeholder = format!("latchkey.{id}");
        for kind in [
            "plain", "chunked", "gzip", "deflate", "br", "header", "redirect",
        ] {
            // Gateway and forward form alike.
            let gateway = http()
                .get(lk.url(&format!("/{id}/{kind}")))
                .send()
                .await
                .unwrap();
            let forward = reqwest::Client::builder()
                .proxy(reqwest::Proxy::http(lk.url("")).unwrap().basic_auth(id, ""))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap()
                .get(format!("{base}/{kind}"))
                .send()
                .await
                .unwrap();
            for (form, resp) in [("gateway", gateway), ("forward", forward)] {
                let what = format!("{id} {kind} {form}");
                let status = resp.status().as_u16();
                let headers = format!("{:?}", resp.headers());
                if matches!(kind, "gzip" | "deflate" | "br") {
                    assert!(resp.headers().get("content-encoding").is_none(), "{what}");
                    assert_eq!(resp.headers()["etag"], "W/\"v1\"", "{what}");
                }
                let text = resp.text().await.unwrap();
                assert_clean(&what, &headers);
                assert_clean(&what, &text);
                let seen = format!("{headers}{text}");
                assert!(seen.contains(&placeholder), "{what}: {status} {seen}");
            }
        }
    }
    assert!(scrubbed(&lk, "raw-bearer").await >= 14);
    assert!(scrubbed(&lk, "raw-query").await >= 14);
}

#[tokio::test]
async fn an_encoding_latchkey_cannot_decode_is_refused_not_passed_on() {
    let bao = Bao::start().await;
    let up = Echoing::start().await;
    bao.put(
        "raw-zstd",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &format!("http://{}", up.addr)),
            ("api_key", KEY),
        ],
    );
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let r = read(http().get(lk.url("/raw-zstd/zstd")).send().await.unwrap()).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.latchkey_error.as_deref(), Some("upstream_unreachable"));
    assert!(r.json.to_string().contains("zstd"), "{r:?}");
    assert_clean("zstd", &r.json.to_string());
    // The same for a transfer coding other than chunked: refused, not passed on as gzip bytes
    // that no header labels.
    let r = read(http().get(lk.url("/raw-zstd/tegzip")).send().await.unwrap()).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.latchkey_error.as_deref(), Some("upstream_unreachable"));
    assert!(r.json.to_string().contains("transfer coding"), "{r:?}");
    assert_clean("tegzip", &r.json.to_string());
}

#[tokio::test]
async fn upstreams_are_asked_for_identity_and_a_clean_answer_keeps_its_length() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "ident", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let resp = http()
        .get(lk.url("/ident/x"))
        .header("accept-encoding", "gzip, br")
        .send()
        .await
        .unwrap();
    // The echo's description is hex, which holds no form of the key: the same bytes, with
    // their length.
    assert!(resp.headers().get("content-length").is_some(), "{resp:?}");
    let r = read(resp).await;
    assert_eq!(r.header("accept-encoding").as_deref(), Some("identity"));
}

#[tokio::test]
async fn the_tunnel_form_scrubs_too() {
    let s = crate::tunnel::Stripe::start(Opts::loopback()).await;
    let x = s
        .exchange(
            &crate::tunnel::connect_head(
                &format!("{}:443", crate::tunnel::STRIPE),
                Some((crate::tunnel::ID, "")),
            ),
            Some(crate::tunnel::STRIPE),
            &crate::tunnel::inner_get("/v1/x?echo=plain", crate::tunnel::STRIPE),
        )
        .await;
    let inner = x.inner();
    assert_eq!(inner.status, 200, "{x:#?}");
    assert!(!inner.body.contains(&s.key), "{}", inner.body);
    assert!(
        inner
            .body
            .contains(&format!("Bearer latchkey.{}", crate::tunnel::ID)),
        "{}",
        inner.body
    );
}

/// A rotated key stays scrubbed. Services often keep a replaced key valid for a while; an
/// upstream that still quotes it hands the client the placeholder, whether the rotation went
/// through the admin API or straight to Vault (re-read after the TTL). One rotation back, not a
/// chain: the key two rotations ago is no longer looked for.
#[tokio::test]
async fn the_key_a_rotation_replaced_is_scrubbed_too() {
    const ID: &str = "rotates";
    let bao = Bao::start().await;
    let hb = Httpbin::start().await;
    let base = format!("http://127.0.0.1:{}", hb.port);
    let keys = [
        "sk_live_First/1+aaaaaaaa",
        "sk_live_Second/2+bbbbbbbb",
        "sk_live_Third/3+cccccccc",
    ];
    let put = |key: &str| {
        bao.put(
            ID,
            &[
                ("connector", "generic-bearer"),
                ("base_url", &base),
                ("api_key", key),
            ],
        )
    };
    put(keys[0]);
    let lk = Latchkey::start(&bao, Opts::loopback().extra("[cache]\nttl = \"1s\"\n")).await;
    for k in keys {
        lk.forbid(k);
    }
    let placeholder = format!("latchkey.{ID}");
    // What the client reads when httpbin echoes `key` in a response header and in its body.
    let echo = |key: &'static str| {
        let url = lk.url(&format!(
            "/{ID}/response-headers?X-Echo={}",
            percent_encoding::utf8_percent_encode(key, percent_encoding::NON_ALPHANUMERIC)
        ));
        async move {
            let resp = http().get(url).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let headers = format!("{:?}", resp.headers());
            format!("{headers}\n{}", resp.text().await.unwrap())
        }
    };
    let scrubbed = |text: &str, key: &str| !text.contains(key) && text.contains(&placeholder);
    let first = echo(keys[0]).await;
    assert!(scrubbed(&first, keys[0]), "{first}");

    // Through the admin API: the new key is cached at once, and the old one still found.
    let r = send(
        http()
            .put(lk.admin_url(&format!("/v1/connections/{ID}/secret")))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({"fields": {"api_key": keys[1]}})),
    )
    .await;
    assert_eq!(r.status, 200, "{r:#?}");
    let second = echo(keys[1]).await;
    assert!(scrubbed(&second, keys[1]), "{second}");
    let old = echo(keys[0]).await;
    assert!(scrubbed(&old, keys[0]), "the replaced key came back: {old}");

    // Behind latchkey's back, in Vault: once the entry is re-read (the third key is scrubbed),
    // the second is still found, the first no longer.
    put(keys[2]);
    wait_until("the third key in use", Duration::from_secs(10), || async {
        scrubbed(&echo(keys[2]).await, keys[2]).then_some(())
    })
    .await;
    let old = echo(keys[1]).await;
    assert!(scrubbed(&old, keys[1]), "the replaced key came back: {old}");
    let older = echo(keys[0]).await;
    assert!(
        older.contains(keys[0]),
        "two rotations back is not looked for (the test's premise): {older}"
    );
}
