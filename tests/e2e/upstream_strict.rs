//! Issue 10, latchkey's own upstream HTTP/1.1 client: framing is read at least as strictly as
//! hyper reads it, a connection whose framing left any doubt never goes back to the pool (a
//! desynchronised connection would hand one request's answer to the next), a pooled connection
//! goes back only to requests of the connection it carried the key of (an unasked answer sent
//! too late to be seen quotes one connection's key to no other), a body that stalls either way is cut after
//! `proxy.body_timeout` (on h2 upstreams too, per stream), and idle pooled connections are closed after
//! `proxy.pool_idle_timeout` without a request to find them.
//!
//! The upstreams are raw TCP listeners that write exact bytes ([`Upstream`]); every test runs
//! one proxy worker, so that every request uses the one pool a kept connection would be in.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::errors::{raw, send};
use crate::support::*;
use crate::upstream_h1::{get_text, Upstream, OK};

/// How long a test waits for something that, without the fix, never happens.
const BOUND: Duration = Duration::from_secs(30);

/// An upstream that answers `GET /{i}` with `answers[i]` and anything else with [`OK`],
/// keeping each connection open until latchkey closes it; the count of connections latchkey
/// has closed.
async fn scripted(answers: &'static [&'static [u8]]) -> (Upstream, Arc<AtomicUsize>) {
    let closed = Arc::new(AtomicUsize::new(0));
    let counted = closed.clone();
    let up = Upstream::start(move |mut c| {
        let closed = counted.clone();
        async move {
            while let Some(head) = c.head().await {
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let answer = path
                    .trim_start_matches('/')
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| answers.get(i).copied())
                    .unwrap_or(OK);
                if !c.write(answer).await {
                    break;
                }
            }
            closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    (up, closed)
}

/// A GET's whole answer, or the error that cut it. The head is sent on before the body is
/// read; whether it reaches the client before the connection is cut is hyper's business (it
/// sends the head with the first data it has, and a body that fails at once has none).
async fn get_whole(client: &reqwest::Client, url: &str) -> reqwest::Result<bytes::Bytes> {
    client.get(url).send().await?.bytes().await
}

/// Latchkey with one worker and these `[proxy]` lines, and a connection `id` to `up`.
async fn latchkey(bao: &Bao, id: &str, up: &Upstream, proxy: &str) -> Latchkey {
    put_bearer(bao, id, &up.base_url());
    Latchkey::start(bao, Opts::loopback().proxy("workers = 1").proxy(proxy)).await
}

/// Each of `answers` (a 200 head, then a body that must be refused) reaches the client as an
/// answer that fails, logged as `upstream_body`, and the next request goes on another
/// connection.
async fn bodies_are_refused_and_not_reused(id: &str, answers: &'static [&'static [u8]]) {
    let bao = Bao::start().await;
    let (up, _) = scripted(answers).await;
    let lk = latchkey(&bao, id, &up, "").await;
    let client = http();
    for (i, answer) in answers.iter().enumerate() {
        let what = String::from_utf8_lossy(answer);
        let got = get_whole(&client, &lk.url(&format!("/{id}/{i}"))).await;
        assert!(got.is_err(), "{what}: the body was taken: {got:?}");
        lk.access_line(|l| l["path"] == format!("/{i}") && l["error"] == "upstream_body")
            .await;
        assert_eq!(
            get_text(&client, &lk.url(&format!("/{id}/after"))).await,
            (200, "ok".to_string())
        );
        // Answer i was on the connection that the request before it gave back (or on the
        // first); the request after it needed a new one.
        assert_eq!(up.connections(), i + 2, "{what}: its connection was reused");
    }
}

#[tokio::test]
async fn chunk_size_line_with_bare_lf_is_refused() {
    // httparse's chunk-size parser (which latchkey used) took the LF as part of the
    // extension: "3;a\nxyz" was one size line and "abc" the data, and the answer passed.
    bodies_are_refused_and_not_reused(
        "barelf",
        &[
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;a\nxyz\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
        ],
    )
    .await;
}

#[tokio::test]
async fn chunk_data_trailers_and_extensions_with_bare_lf_or_control_characters_are_refused() {
    bodies_are_refused_and_not_reused(
        "loosechunks",
        &[
            // The CRLF after a chunk's data, as a bare LF.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\n0\r\n\r\n",
            // A trailer line ended by a bare LF.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\n\r\n",
            // A NUL and an escape in chunk extensions.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;a=\x00\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;a=\x1b[2J\r\nabc\r\n0\r\n\r\n",
            // A bare CR in an extension, and a size past 64 bits.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;a\rb\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000003\r\nabc\r\n0\r\n\r\n",
        ],
    )
    .await;
}

#[tokio::test]
async fn response_head_with_bare_lf_or_obs_fold_is_refused() {
    let bao = Bao::start().await;
    let (up, _) = scripted(&[
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 2\r\n\r\nok",
    ])
    .await;
    let lk = latchkey(&bao, "loosehead", &up, "").await;
    for i in 0..3 {
        send(http().get(lk.url(&format!("/loosehead/{i}"))))
            .await
            .assert_error(502, "upstream_unreachable");
    }
    assert_eq!(
        up.connections(),
        3,
        "a refused head's connection was reused"
    );
}

#[tokio::test]
async fn transfer_encoding_on_http10_is_not_reused() {
    let bao = Bao::start().await;
    // RFC 9112 section 6.1: whatever else it says (keep-alive here), an HTTP/1.0 message with
    // a Transfer-Encoding has faulty framing and the connection closes after it.
    let (up, _) = scripted(&[
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ])
    .await;
    let lk = latchkey(&bao, "te10", &up, "").await;
    let client = http();
    for _ in 0..2 {
        assert_eq!(
            get_text(&client, &lk.url("/te10/0")).await,
            (200, "ok".to_string())
        );
    }
    assert_eq!(up.requests(), 2);
    assert_eq!(up.connections(), 2, "the connection was reused");
}

#[tokio::test]
async fn request_body_shorter_than_content_length_is_not_reused() {
    let bao = Bao::start().await;
    // The upstream takes the body by its Content-Length, then answers.
    let closed = Arc::new(AtomicUsize::new(0));
    let counted = closed.clone();
    let up = Upstream::start(move |mut c| {
        let closed = counted.clone();
        async move {
            while let Some(head) = c.head().await {
                c.body(&head).await;
                if !c.write(OK).await {
                    break;
                }
            }
            closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let lk = latchkey(&bao, "short", &up, "").await;
    // Ten bytes declared, four sent, and the client's side closed.
    let mut s = tokio::net::TcpStream::connect(lk.proxy).await.unwrap();
    s.write_all(b"POST /short/up HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nfour")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(BOUND, s.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    wait_until("latchkey to close the upstream connection", BOUND, || {
        std::future::ready((closed.load(Ordering::SeqCst) == 1).then_some(()))
    })
    .await;
    assert_eq!(
        get_text(&http(), &lk.url("/short/after")).await,
        (200, "ok".to_string())
    );
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn response_body_shorter_than_content_length_is_not_reused() {
    let bao = Bao::start().await;
    // Ten bytes declared, four sent, then the upstream's side closed (it still reads, to see
    // whether anything more is sent on the connection).
    let up = Upstream::start(|mut c| async move {
        if c.head().await.is_some() {
            c.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfour")
                .await;
            let _ = c.stream.shutdown().await;
            c.drain().await;
        }
    })
    .await;
    let lk = latchkey(&bao, "shortanswer", &up, "").await;
    let client = http();
    for i in 0..2 {
        let got = get_whole(&client, &lk.url("/shortanswer/x")).await;
        assert!(got.is_err(), "request {i}: the short body passed: {got:?}");
    }
    lk.access_lines(2, |l| l["path"] == "/x" && l["error"] == "upstream_body")
        .await;
    assert_eq!(up.requests(), 2, "a request went on the cut connection");
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn bytes_past_the_declared_end_of_a_response_are_not_reused() {
    let bao = Bao::start().await;
    let intruder: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nintruder";
    let late = Arc::new(Notify::new());
    let late_sent = Arc::new(AtomicUsize::new(0));
    let (go, sent) = (late.clone(), late_sent.clone());
    // `/glued`: an answer with another one glued after it, in one write. `/late`: an answer,
    // then, once the test says so (the first answer has been read), another one unasked.
    let up = Upstream::start(move |mut c| {
        let (go, sent) = (go.clone(), sent.clone());
        async move {
            while let Some(head) = c.head().await {
                if head.starts_with("GET /glued ") {
                    c.write(&[OK, intruder].concat()).await;
                } else if head.starts_with("GET /late ") {
                    c.write(OK).await;
                    go.notified().await;
                    c.write(intruder).await;
                    sent.fetch_add(1, Ordering::SeqCst);
                } else {
                    c.write(OK).await;
                }
            }
        }
    })
    .await;
    let lk = latchkey(&bao, "past", &up, "").await;
    let client = http();

    // Each unasked answer's connection is dropped: the request after it needs a new one.
    for (connections, path) in [(2, "/past/glued"), (3, "/past/late")] {
        assert_eq!(get_text(&client, &lk.url(path)).await, (200, "ok".into()));
        if path.ends_with("late") {
            late.notify_one();
            wait_until("the unasked answer to be written", BOUND, || {
                std::future::ready((late_sent.load(Ordering::SeqCst) == 1).then_some(()))
            })
            .await;
        }
        assert_eq!(
            get_text(&client, &lk.url("/past/next")).await,
            (200, "ok".into()),
            "after {path}"
        );
        assert_eq!(
            up.connections(),
            connections,
            "after {path}: the connection was reused"
        );
    }
}

/// An upstream that sends an unasked answer late, after the next request was written on the
/// connection, desynchronises it undetectably; the answer it sends quotes the key of the request
/// before. A pooled connection is lent again only to requests of the connection (ID and
/// version) it was lent to, so that answer never reaches another connection's request, whose
/// scrubber does not know the key: the other connection gets a connection of its own.
#[tokio::test]
async fn a_late_unasked_answer_never_reaches_another_connection() {
    let bao = Bao::start().await;
    let up = Upstream::start(|mut c| async move {
        let mut quoted = None;
        while let Some(head) = c.head().await {
            let auth = head
                .lines()
                .find_map(|l| l.strip_prefix("authorization: Bearer "))
                .unwrap_or_default()
                .to_string();
            if let Some(key) = quoted.take() {
                // The next request on this connection: answered with the last one's key.
                let body = format!("stolen={key}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                c.write(answer.as_bytes()).await;
            } else {
                c.write(OK).await;
                if head.starts_with("GET /late ") {
                    quoted = Some(auth);
                }
            }
        }
    })
    .await;
    let key_a = put_bearer(&bao, "tenant-a", &up.base_url());
    let key_b = put_bearer(&bao, "tenant-b", &up.base_url());
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("workers = 1")).await;
    let client = http();
    assert_eq!(
        get_text(&client, &lk.url("/tenant-a/late")).await,
        (200, "ok".into())
    );
    // Another connection to the same host: not the connection tenant-a's answer came on.
    let (status, body) = get_text(&client, &lk.url("/tenant-b/next")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ok"),
        "tenant-b was answered on tenant-a's connection"
    );
    assert!(!body.contains(&key_a) && !body.contains(&key_b));
    assert_eq!(up.connections(), 2);
    // tenant-a's next request takes its connection back, and meets the unasked answer: its own
    // key, which its scrubber replaces.
    let (status, body) = get_text(&client, &lk.url("/tenant-a/next")).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("stolen="), "{body}");
    assert!(!body.contains(&key_a), "{body}");
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn stalled_upstream_body_is_cut_after_body_timeout() {
    let bao = Bao::start().await;
    // One chunk, then nothing (the upstream reads on, to see when latchkey lets go).
    let closed = Arc::new(AtomicUsize::new(0));
    let counted = closed.clone();
    let up = Upstream::start(move |mut c| {
        let closed = counted.clone();
        async move {
            if c.head().await.is_some() {
                c.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                    .await;
                c.drain().await;
                closed.fetch_add(1, Ordering::SeqCst);
            }
        }
    })
    .await;
    let lk = latchkey(
        &bao,
        "stalled",
        &up,
        "body_timeout = \"1s\"\nrequest_timeout = \"10m\"\nidle_timeout = \"10m\"",
    )
    .await;
    let r = http().get(lk.url("/stalled/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    // The body ends abnormally: no terminating chunk reaches the client. What came before is
    // the chunk sent (less a tail the scrubber may hold back, in case it began the key).
    let mut got = Vec::new();
    let rest = tokio::time::timeout(BOUND, async {
        loop {
            match body.next().await {
                Some(Ok(b)) => got.extend_from_slice(&b),
                other => return other,
            }
        }
    })
    .await
    .expect("the stalled body was not cut");
    assert!(matches!(rest, Some(Err(_))), "{rest:?}");
    assert!(b"first".starts_with(&got), "{got:?}");
    wait_until("latchkey to close the upstream connection", BOUND, || {
        std::future::ready((closed.load(Ordering::SeqCst) == 1).then_some(()))
    })
    .await;
    let line = lk
        .access_line(|l| l["path"] == "/x" && l["error"] == "upstream_timeout")
        .await;
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes_out"], got.len() as u64);
}

#[tokio::test]
async fn stalled_upload_is_cut_after_body_timeout() {
    let bao = Bao::start().await;
    // The upstream reads the head and whatever comes, and answers nothing.
    let closed = Arc::new(AtomicUsize::new(0));
    let counted = closed.clone();
    let up = Upstream::start(move |mut c| {
        let closed = counted.clone();
        async move {
            while c.fill().await > 0 {}
            closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let lk = latchkey(
        &bao,
        "upload",
        &up,
        "body_timeout = \"1s\"\nrequest_timeout = \"10m\"\nidle_timeout = \"10m\"",
    )
    .await;
    // A hundred bytes declared, ten sent, and the client's side kept open: the client is the
    // one that stalled, and is told so (408), not the upstream blamed (504).
    let answer = raw(
        lk.proxy,
        "POST /upload/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nten bytes.",
    )
    .await;
    answer.assert_error(408, "request_timeout");
    wait_until("latchkey to close the upstream connection", BOUND, || {
        std::future::ready((closed.load(Ordering::SeqCst) == 1).then_some(()))
    })
    .await;
    let line = lk.access_line(|l| l["path"] == "/x").await;
    assert_eq!(line["status"], 408);
    assert_eq!(line["error"], "request_timeout");
}

#[tokio::test]
async fn upload_the_upstream_stops_taking_is_cut_after_body_timeout() {
    let bao = Bao::start().await;
    // The upstream reads the head, then nothing until the test has its answer; then it reads
    // to the end, to see latchkey close the connection.
    let answered = Arc::new(Notify::new());
    let closed = Arc::new(AtomicUsize::new(0));
    let (go, counted) = (answered.clone(), closed.clone());
    let up = Upstream::start(move |mut c| {
        let (go, closed) = (go.clone(), counted.clone());
        async move {
            c.head().await;
            go.notified().await;
            while c.fill().await > 0 {}
            closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let lk = latchkey(
        &bao,
        "notaking",
        &up,
        "body_timeout = \"1s\"\nrequest_timeout = \"10m\"\nidle_timeout = \"10m\"",
    )
    .await;
    // Far more than the socket buffers on the way hold, made as it is sent.
    let frames = futures_util::stream::iter(0..256)
        .map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'u'; 1 << 20])));
    let answer = tokio::time::timeout(
        BOUND,
        send(
            http()
                .post(lk.url("/notaking/x"))
                .body(reqwest::Body::wrap_stream(frames)),
        ),
    )
    .await
    .expect("the stalled upload was not cut");
    answer.assert_error(504, "upstream_timeout");
    answered.notify_one();
    wait_until("latchkey to close the upstream connection", BOUND, || {
        std::future::ready((closed.load(Ordering::SeqCst) == 1).then_some(()))
    })
    .await;
}

#[tokio::test]
async fn idle_pooled_connections_are_reaped() {
    let bao = Bao::start().await;
    let (up, closed) = scripted(&[]).await;
    let lk = latchkey(&bao, "reaped", &up, "pool_idle_timeout = \"1s\"").await;
    let client = http();
    assert_eq!(
        get_text(&client, &lk.url("/reaped/x")).await,
        (200, "ok".to_string())
    );
    // No request comes to find the idle connection: it is closed all the same.
    wait_until(
        "latchkey to close the idle upstream connection",
        BOUND,
        || std::future::ready((closed.load(Ordering::SeqCst) == 1).then_some(())),
    )
    .await;
    // And the pool carries on with a new one, then reaps that too.
    assert_eq!(
        get_text(&client, &lk.url("/reaped/y")).await,
        (200, "ok".to_string())
    );
    assert_eq!(up.connections(), 2);
    wait_until(
        "latchkey to close the second idle connection",
        BOUND,
        || std::future::ready((closed.load(Ordering::SeqCst) == 2).then_some(())),
    )
    .await;
}

/// An h2 upstream (TLS, ALPN `h2`) on a connection of its own, and latchkey with a 1 s
/// `body_timeout`.
async fn h2_upstream(bao: &Bao, id: &str) -> (EchoServer, Latchkey) {
    let ca = TestCa::new();
    let up = echo_tls(&ca, &[b"h2"]).await;
    put_bearer(bao, id, &format!("https://localhost:{}", up.addr().port()));
    let lk = Latchkey::start(
        bao,
        Opts::loopback()
            .root(&ca.pem_path)
            .proxy("workers = 1")
            .proxy("body_timeout = \"1s\"\nrequest_timeout = \"10m\"\nidle_timeout = \"10m\""),
    )
    .await;
    (up, lk)
}

#[tokio::test]
async fn stalled_h2_upstream_body_is_cut_after_body_timeout() {
    let bao = Bao::start().await;
    let (_up, lk) = h2_upstream(&bao, "h2stall").await;
    let r = http().get(lk.url("/h2stall/x/stall")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut got = Vec::new();
    let rest = tokio::time::timeout(BOUND, async {
        loop {
            match body.next().await {
                Some(Ok(b)) => got.extend_from_slice(&b),
                other => return other,
            }
        }
    })
    .await
    .expect("the stalled h2 body was not cut");
    assert!(matches!(rest, Some(Err(_))), "{rest:?}");
    assert!(b"first".starts_with(&got), "{got:?}");
    let line = lk
        .access_line(|l| l["path"] == "/x/stall" && l["error"] == "upstream_timeout")
        .await;
    assert_eq!(line["upstream_version"], "h2");
    // The connection itself is fine: the next request on it is answered.
    let next = gateway_get(&lk, "/h2stall/after", &[]).await;
    assert_eq!(next.status, 200);
}

#[tokio::test]
async fn stalled_upload_to_an_h2_upstream_is_cut_after_body_timeout() {
    let bao = Bao::start().await;
    let (up, lk) = h2_upstream(&bao, "h2upload").await;
    // A hundred bytes declared, ten sent, and the client's side kept open: the client stalled,
    // and is told so (408).
    let answer = raw(
        lk.proxy,
        "POST /h2upload/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nten bytes.",
    )
    .await;
    answer.assert_error(408, "request_timeout");
    let line = lk.access_line(|l| l["path"] == "/x").await;
    assert_eq!(line["status"], 408);
    // The upstream got the request and its stream was reset; the connection serves on.
    let next = gateway_get(&lk, "/h2upload/after", &[]).await;
    assert_eq!(next.status, 200);
    assert_eq!(up.connections(), 1);
}

/// A body sent in `pieces` pieces of 1 KiB, `gap` apart, with its `Content-Length`.
fn slow_body(pieces: usize, gap: Duration) -> reqwest::Body {
    let frames = futures_util::stream::iter(0..pieces).then(move |i| async move {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'u'; 1024]))
    });
    reqwest::Body::wrap_stream(frames)
}

/// The request timeout bounds the wait for an answer, not the client's upload: an upload that
/// keeps moving (each piece within the body timeout) may take longer than the request timeout,
/// to an HTTP/1.1 upstream and to an h2 one; once the body has gone, an answer that does not
/// come is cut at the request timeout as before.
#[tokio::test]
async fn an_upload_that_keeps_moving_may_outlast_the_request_timeout() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    let plain = echo().await;
    let h2 = echo_tls(&ca, &[b"h2"]).await;
    put_bearer(&bao, "slow-h1", &format!("http://{}", plain.addr()));
    put_bearer(
        &bao,
        "slow-h2",
        &format!("https://localhost:{}", h2.addr().port()),
    );
    // Reads the request and its body, then answers nothing.
    let silent = Upstream::start(|mut c| async move {
        if let Some(head) = c.head().await {
            c.body(&head).await;
            c.drain().await;
        }
    })
    .await;
    put_bearer(&bao, "silent", &silent.base_url());
    let lk = Latchkey::start(
        &bao,
        Opts::loopback()
            .root(&ca.pem_path)
            .proxy("request_timeout = \"1s\"\nbody_timeout = \"10s\""),
    )
    .await;
    // Eight pieces 400 ms apart: 2.8 s of upload against a 1 s request timeout.
    for (id, version) in [("slow-h1", "http/1.1"), ("slow-h2", "h2")] {
        let r = tokio::time::timeout(
            BOUND,
            send(
                http()
                    .post(lk.url(&format!("/{id}/upload")))
                    .header("content-length", 8 * 1024)
                    .body(slow_body(8, Duration::from_millis(400))),
            ),
        )
        .await
        .expect("no answer");
        assert_eq!(r.status, 200, "{id}: {r:#?}");
        assert_eq!(r.json()["body_bytes"], 8 * 1024, "{id}: {r:#?}");
        let line = lk.access_line(|l| l["connection"] == id).await;
        assert_eq!(line["upstream_version"], version, "{line}");
    }
    let r = tokio::time::timeout(
        BOUND,
        send(
            http()
                .post(lk.url("/silent/upload"))
                .header("content-length", 2 * 1024)
                .body(slow_body(2, Duration::from_millis(400))),
        ),
    )
    .await
    .expect("the answer that never came was not cut");
    r.assert_error(504, "upstream_timeout");
}

/// An h2 upstream that takes requests and grants no window for their bodies (and answers
/// nothing): an upload to it cannot move, and is cut after the body timeout as an upload an
/// HTTP/1.1 upstream stops taking is (504), though the request timeout is far off.
#[tokio::test]
async fn an_upload_an_h2_upstream_grants_no_window_for_is_cut_after_body_timeout() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(&["localhost"], &[b"h2"]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let streams = Arc::new(AtomicUsize::new(0));
    let seen = streams.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::Builder::new()
                    .initial_window_size(0)
                    .handshake::<_, bytes::Bytes>(tls)
                    .await
                else {
                    return;
                };
                let mut held = Vec::new();
                while let Some(Ok(stream)) = conn.accept().await {
                    seen.fetch_add(1, Ordering::SeqCst);
                    held.push(stream);
                }
            });
        }
    });
    put_bearer(&bao, "nowindow", &format!("https://localhost:{port}"));
    let lk = Latchkey::start(
        &bao,
        Opts::loopback()
            .root(&ca.pem_path)
            .proxy("body_timeout = \"1s\"\nrequest_timeout = \"10m\"\nidle_timeout = \"10m\""),
    )
    .await;
    let answer = tokio::time::timeout(
        BOUND,
        send(
            http()
                .post(lk.url("/nowindow/x"))
                // More than the default window (64 KiB) that the upstream's settings take
                // away once they arrive.
                .body(vec![b'u'; 1 << 20]),
        ),
    )
    .await
    .expect("the upload no window was granted for was not cut");
    answer.assert_error(504, "upstream_timeout");
    // The request reached the h2 upstream as one stream, and was cut there.
    assert_eq!(streams.load(Ordering::SeqCst), 1);
    let line = lk.access_line(|l| l["path"] == "/x").await;
    assert_eq!(line["error"], "upstream_timeout", "{line}");
}
