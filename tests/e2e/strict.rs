//! Issue 10: what a client sends latchkey is held to strict HTTP/1.1 framing. An attack run
//! found that hyper, as latchkey runs it, takes a bare LF as a line end in a request head; a
//! proxy that passes on what its upstream may read differently invites request smuggling. Each
//! test sends raw bytes and expects `400` with `Latchkey-Error: bad_request` and latchkey's JSON
//! error body, and nothing of that request at the upstream.
//!
//! Probed with these requests against hyper 1.12 as latchkey ran it before its own check
//! (`src/strict.rs`). Accepted and forwarded: a bare LF as a line end, control characters (NUL,
//! DEL, ^A) in a chunk extension, two equal `Content-Length` headers, `Content-Length` beside
//! `Transfer-Encoding` (the length dropped), `Transfer-Encoding: gzip, chunked`, two `Host`
//! headers in gateway form. A bare LF in a trailer left the connection hanging with two requests
//! at the upstream. Refused by hyper's own bare `400` (no `Latchkey-Error`, no body): obs-fold,
//! a bare CR, a NUL in a header value, whitespace before a colon, `Content-Length: +3`. Refused
//! with latchkey's `400` but only after the head had gone upstream: a bare LF after a chunk size
//! or in an extension, junk after a chunk size, a folded trailer.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::destination::raw;
use crate::support::*;
use crate::tunnel::{connect_head, exchange, Ca};

/// Latchkey with connection `s` to an echo upstream.
async fn start() -> (Bao, EchoServer, Latchkey) {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "s", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    (bao, up, lk)
}

/// `request` is answered with latchkey's `400 bad_request`, whose message says what was wrong.
async fn refused(lk: &Latchkey, what: &str, request: &str, says: &str) {
    let r = raw(lk, request).await;
    assert_eq!(r.status, 400, "{what}: {r:?}");
    assert_eq!(
        r.header("latchkey-error"),
        Some("bad_request"),
        "{what}: {r:?}"
    );
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(r.json()["error"]["code"], "bad_request", "{what}: {r:?}");
    assert!(message.contains(says), "{what}: {message}");
}

#[tokio::test]
async fn a_bare_lf_line_end_in_a_request_head_is_refused() {
    let (_bao, up, lk) = start().await;
    refused(
        &lk,
        "every line",
        "GET /s/x HTTP/1.1\nHost: x\nConnection: close\n\n",
        "bare LF",
    )
    .await;
    refused(
        &lk,
        "one header line",
        "GET /s/x HTTP/1.1\r\nHost: x\nX-Smuggle: y\r\nConnection: close\r\n\r\n",
        "bare LF",
    )
    .await;
    refused(
        &lk,
        "the request line",
        "GET /s/x HTTP/1.1\nHost: x\r\nConnection: close\r\n\r\n",
        "bare LF",
    )
    .await;
    refused(
        &lk,
        "the blank line",
        "GET /s/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\n",
        "bare LF",
    )
    .await;
    assert_eq!(up.requests(), 0);
    // The same request with CRLF goes through.
    let r = raw(
        &lk,
        "GET /s/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn obs_fold_bare_cr_nul_and_space_before_colon_are_refused_by_latchkey() {
    let (_bao, up, lk) = start().await;
    refused(
        &lk,
        "obs-fold",
        "GET /s/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\nConnection: close\r\n\r\n",
        "folded",
    )
    .await;
    refused(
        &lk,
        "obs-fold with a tab",
        "GET /s/x HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\nConnection: close\r\n\r\n",
        "folded",
    )
    .await;
    refused(
        &lk,
        "bare CR",
        "GET /s/x HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\nConnection: close\r\n\r\n",
        "bare CR",
    )
    .await;
    refused(
        &lk,
        "NUL in a value",
        "GET /s/x HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\nConnection: close\r\n\r\n",
        "header value",
    )
    .await;
    refused(
        &lk,
        "space before the colon",
        "GET /s/x HTTP/1.1\r\nHost: x\r\nX-A : b\r\nConnection: close\r\n\r\n",
        "header name",
    )
    .await;
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn ambiguous_body_framing_is_refused() {
    let (_bao, up, lk) = start().await;
    refused(
        &lk,
        "two equal Content-Length",
        "POST /s/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        "Content-Length",
    )
    .await;
    refused(
        &lk,
        "Content-Length and Transfer-Encoding",
        "POST /s/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "both",
    )
    .await;
    refused(
        &lk,
        "a coding before chunked",
        "POST /s/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "chunked",
    )
    .await;
    refused(
        &lk,
        "a Content-Length that is not a number",
        "POST /s/x HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\nConnection: close\r\n\r\nabc",
        "Content-Length",
    )
    .await;
    refused(
        &lk,
        "two Host headers",
        "GET /s/x HTTP/1.1\r\nHost: x\r\nHost: y\r\nConnection: close\r\n\r\n",
        "Host",
    )
    .await;
    assert_eq!(up.requests(), 0);
}

/// A chunk extension with a control character, and chunk lines that end in a bare LF or
/// carry junk after the size, in a body that arrives with its head: refused before anything
/// is sent. Well-formed extensions pass.
#[tokio::test]
async fn a_chunk_extension_with_control_characters_is_refused() {
    let (_bao, up, lk) = start().await;
    let chunked = |lines: &str| {
        format!(
            "POST /s/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{lines}"
        )
    };
    for (what, body) in [
        ("a control character", "3;ext=\x01\r\nabc\r\n0\r\n\r\n"),
        ("a NUL", "3;\0\r\nabc\r\n0\r\n\r\n"),
        ("DEL", "3;a\x7f\r\nabc\r\n0\r\n\r\n"),
        ("a bare LF after the size", "3\nabc\r\n0\r\n\r\n"),
        ("a bare LF in the extension", "3;a\nabc\r\n0\r\n\r\n"),
        ("junk after the size", "3 x\r\nabc\r\n0\r\n\r\n"),
        ("data not ending in CRLF", "3\r\nabcX\r\n0\r\n\r\n"),
        ("a folded trailer", "3\r\nabc\r\n0\r\nX-T: a\r\n b\r\n\r\n"),
        ("a bare LF in a trailer", "3\r\nabc\r\n0\r\nX-T: a\n\r\n"),
    ] {
        refused(&lk, what, &chunked(body), "chunk").await;
    }
    assert_eq!(up.requests(), 0);

    let r = raw(
        &lk,
        &chunked("3;name=value;q=\"a b\"\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["body_bytes"], 5, "{r:?}");
    assert_eq!(up.requests(), 1);
}

/// Sends `bytes` on one connection (then shuts its writing side, with `half_close`) and reads
/// everything latchkey answers until it closes the connection.
async fn pipelined(lk: &Latchkey, bytes: &[u8], half_close: bool) -> String {
    let mut stream = tokio::net::TcpStream::connect(lk.proxy).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    if half_close {
        stream.shutdown().await.unwrap();
    }
    let mut buf = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        stream.read_to_end(&mut buf),
    )
    .await
    .expect("latchkey did not close the connection")
    .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

/// A request refused behind a good one on the same connection: the good one is answered and
/// forwarded, the bad one gets latchkey's 400, then the connection closes.
#[tokio::test]
async fn a_bad_request_pipelined_after_a_good_one_is_refused_alone() {
    let (_bao, up, lk) = start().await;
    let text = pipelined(
        &lk,
        b"GET /s/first HTTP/1.1\r\nHost: x\r\n\r\nGET /s/second HTTP/1.1\nHost: x\n\nGET /s/third HTTP/1.1\r\nHost: x\r\n\r\n",
        false,
    )
    .await;
    let statuses: Vec<&str> = text
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|a| a.get(..3).unwrap_or_default())
        .collect();
    assert_eq!(statuses, ["200", "400"], "{text}");
    assert!(text.contains("latchkey-error: bad_request"), "{text}");
    // The echo upstream's description is hex: `"uri":"/first"` in it.
    assert!(text.contains(&hex::encode("\"uri\":\"/first\"")), "{text}");
    assert_eq!(up.requests(), 1);
}

/// Inside a CONNECT tunnel (plain HTTP inside), the inner request is held to the same rules.
#[tokio::test]
async fn a_bare_lf_inside_a_tunnel_is_refused() {
    let bao = Bao::start().await;
    let up = echo().await;
    let addr = up.addr().to_string();
    put_bearer(&bao, "plain", &format!("http://{addr}"));
    let ca = Ca::init().await;
    let lk = Latchkey::start(&bao, ca.configured(Opts::loopback())).await;
    let x = exchange(
        &lk,
        &connect_head(&addr, Some(("plain", ""))),
        None,
        &format!("GET /x HTTP/1.1\nHost: {addr}\nConnection: close\n\n"),
    )
    .await;
    x.inner().assert_error(400, "bad_request");
    assert_eq!(up.requests(), 0);
}

/// Latchkey with connection `s` to an echo upstream, on the HTTP/1.1 server named.
async fn start_on(server: &str) -> (Bao, EchoServer, Latchkey) {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "s", &format!("http://{}", up.addr()));
    let opts = Opts::loopback().proxy(&format!("http1_server = {server:?}"));
    let lk = Latchkey::start(&bao, opts).await;
    (bao, up, lk)
}

/// A request target that is not a URI (which hyper's server would answer with a bare `400` of
/// its own, no `Latchkey-Error`, no body) gets latchkey's `400 bad_request` from either server,
/// a CONNECT's included.
#[tokio::test]
async fn a_request_target_that_is_not_a_uri_is_latchkeys_400_on_either_server() {
    for server in ["latchkey", "hyper"] {
        let (_bao, up, lk) = start_on(server).await;
        for target in ["/s/p<", "/s/p`", "http://", "http://[::1/"] {
            let r = raw(&lk, &format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
            assert_eq!(r.status, 400, "{server} {target}: {r:?}");
            assert_eq!(
                r.header("latchkey-error"),
                Some("bad_request"),
                "{server} {target}: {r:?}"
            );
        }
        let r = raw(&lk, "CONNECT [::1:443 HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(
            r.header("latchkey-error"),
            Some("bad_request"),
            "{server}: {r:?}"
        );
        assert_eq!(up.requests(), 0);
    }
}

/// A client that pipelines its requests and then shuts its writing side (waiting for the
/// answers) gets every answer from either server.
#[tokio::test]
async fn requests_before_a_half_close_are_all_answered_on_either_server() {
    for server in ["latchkey", "hyper"] {
        let (_bao, up, lk) = start_on(server).await;
        let text = pipelined(
            &lk,
            b"GET /s/one HTTP/1.1\r\nHost: x\r\n\r\nGET /s/two HTTP/1.1\r\nHost: x\r\n\r\n",
            true,
        )
        .await;
        assert_eq!(text.matches("HTTP/1.1 200 ").count(), 2, "{server}: {text}");
        assert_eq!(up.requests(), 2, "{server}");
    }
}

/// An HTTP/1.1 request without `Host` is refused with latchkey's `400` on either server, in
/// gateway and forward form (RFC 9112 section 3.2 asks a server to), and nothing reaches the
/// upstream; HTTP/1.0, where `Host` is optional, is served without one.
#[tokio::test]
async fn an_http_1_1_request_without_host_is_refused_on_either_server() {
    for server in ["latchkey", "hyper"] {
        let (_bao, up, lk) = start_on(server).await;
        let forward = format!("GET http://{}/p HTTP/1.1\r\n", up.addr());
        for head in ["GET /s/p HTTP/1.1\r\n", forward.as_str()] {
            let r = raw(
                &lk,
                &format!("{head}Proxy-Authorization: Basic czp4\r\nConnection: close\r\n\r\n"),
            )
            .await;
            assert_eq!(r.status, 400, "{server} {head}: {r:?}");
            assert_eq!(r.header("latchkey-error"), Some("bad_request"), "{r:?}");
            let message = r.json()["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(message.contains("Host header"), "{server}: {message}");
        }
        assert_eq!(up.requests(), 0, "{server}");
        let r = raw(&lk, "GET /s/p HTTP/1.0\r\n\r\n").await;
        assert_eq!(r.status, 200, "{server}: {r:?}");
        assert_eq!(up.requests(), 1, "{server}");
    }
}
