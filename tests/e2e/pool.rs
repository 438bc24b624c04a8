//! The upstream connection pool: connections are reused once a response has been read to the
//! end, an unfinished response's connection is not, a connection the upstream closed is
//! replaced without the request failing, h2 upstreams share one connection, and a new TLS
//! connection resumes a session an earlier one saved.

use futures_util::StreamExt;

use crate::support::*;

/// Sends `n` gateway requests one after another on one client connection.
async fn sequential(lk: &Latchkey, path: &str, n: usize) {
    let client = http();
    for _ in 0..n {
        let r = client.get(lk.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
}

/// An HTTPS echo upstream offering `alpn` under a test CA, connection `id` on it (generic
/// bearer, `key`), and a latchkey with one worker (so one pool) trusting the CA.
async fn one_worker_to_tls(
    bao: &Bao,
    id: &str,
    alpn: &[&[u8]],
    key: &str,
) -> (TestCa, EchoServer, Latchkey) {
    let ca = TestCa::new();
    let up = echo_tls(&ca, alpn).await;
    bao.put(
        id,
        &[
            ("connector", "generic-bearer"),
            (
                "base_url",
                &format!("https://localhost:{}", up.addr().port()),
            ),
            ("api_key", key),
        ],
    );
    let lk = Latchkey::start(
        bao,
        Opts::loopback().root(&ca.pem_path).proxy("workers = 1"),
    )
    .await;
    (ca, up, lk)
}

#[tokio::test]
async fn finished_responses_give_their_connection_back() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "reuse", &format!("http://{}", up.addr()));
    // One worker, so that every request uses the same pool.
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("workers = 1")).await;
    sequential(&lk, "/reuse/a", 20).await;
    assert_eq!(up.requests(), 20);
    assert_eq!(
        up.connections(),
        1,
        "sequential requests should reuse one upstream connection"
    );

    // Empty bodies (204-like: /bytes/0) end before they start; the connection still returns.
    sequential(&lk, "/reuse/bytes/0", 5).await;
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn an_unfinished_response_does_not_return_its_connection() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "partial", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("workers = 1")).await;

    // Read a little of a large body, then drop it: that connection holds unread bytes.
    let r = http()
        .get(lk.url("/partial/bytes/67108864"))
        .send()
        .await
        .unwrap();
    let mut stream = r.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    sequential(&lk, "/partial/after", 3).await;
    assert_eq!(
        up.connections(),
        2,
        "the next request needs a fresh connection"
    );
    // All three logged, all answered 200.
    let after = crate::lifecycle::eventually("three access lines for /after", || async {
        let lines: Vec<_> = lk
            .access_log()
            .into_iter()
            .filter(|l| l["path"] == "/after")
            .collect();
        (lines.len() == 3).then_some(lines)
    })
    .await;
    assert!(after.iter().all(|l| l["status"] == 200), "{after:?}");
}

#[tokio::test]
async fn a_connection_closed_by_the_upstream_is_replaced() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    // The h1-only TLS upstream is restarted between requests: its pooled connection dies.
    let up = echo_tls(&ca, &[b"http/1.1"]).await;
    let port = up.addr().port();
    bao.put(
        "restart",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &format!("https://localhost:{port}")),
            ("api_key", "restart_key_1234"),
        ],
    );
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().root(&ca.pem_path).proxy("workers = 1"),
    )
    .await;
    sequential(&lk, "/restart/one", 2).await;
    drop(up);
    // The old listener closes as its task ends; bind again as soon as the port is free.
    let up2 = wait_until(
        "the old upstream's port to be free again",
        std::time::Duration::from_secs(30),
        || async {
            EchoServer::start(
                format!("127.0.0.1:{port}").parse().unwrap(),
                Some(ca.server_config(&["localhost", "127.0.0.1"], &[b"http/1.1"])),
            )
            .await
            .ok()
        },
    )
    .await;
    sequential(&lk, "/restart/two", 3).await;
    assert_eq!(up2.requests(), 3);
}

#[tokio::test]
async fn h2_upstreams_share_one_connection() {
    let bao = Bao::start().await;
    let (_ca, up, lk) = one_worker_to_tls(&bao, "h2-shared", &[b"h2"], "h2_shared_key_1234").await;
    sequential(&lk, "/h2-shared/x", 1).await;
    let client = http();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let req = client.get(lk.url(&format!("/h2-shared/c/{i}")));
        tasks.spawn(async move { read(req.send().await.unwrap()).await });
    }
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json["version"], "HTTP/2.0");
    }
    assert_eq!(up.requests(), 21);
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn new_tls_connections_resume_the_sessions_earlier_ones_saved() {
    let bao = Bao::start().await;
    // rustls as the upstream: two TLS 1.3 tickets after each handshake, each good once.
    let (_ca, up, lk) = one_worker_to_tls(&bao, "resume", &[b"http/1.1"], "resume_key_1234").await;
    sequential(&lk, "/resume/first", 1).await;
    // Three times: a response left unread keeps its connection from the pool, so the next
    // request opens a new one.
    for n in 0..3 {
        let r = http()
            .get(lk.url("/resume/bytes/67108864"))
            .send()
            .await
            .unwrap();
        let mut stream = r.bytes_stream();
        stream.next().await.unwrap().unwrap();
        drop(stream);
        sequential(&lk, &format!("/resume/after/{n}"), 1).await;
    }
    assert_eq!(
        up.connections(),
        4,
        "each unread response cost a connection"
    );
    let metrics = crate::errors::metrics_text(&lk).await;
    assert!(
        metrics.contains("latchkey_upstream_tls_handshakes_total{kind=\"full\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("latchkey_upstream_tls_handshakes_total{kind=\"resumed\"} 3\n"),
        "{metrics}"
    );
    // The metrics are counted before the lines are logged, and the output is read from a pipe
    // by another thread: the four lines are waited for.
    let established = "\"message\":\"TLS with an upstream established\"";
    let resumed = lk
        .output_lines("of TLS established with the upstream", 4, |l| {
            l.contains(established)
        })
        .await
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|l| l["resumed"].as_bool())
        .collect::<Vec<_>>();
    assert_eq!(resumed, [Some(false), Some(true), Some(true), Some(true)]);
}
