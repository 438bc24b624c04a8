//! SIGTERM under load (issue 12): latchkey stops accepting at once, lets the requests in flight
//! finish (a slow upstream answer included), closes idle keep-alive connections, and exits 0
//! within its grace period.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// Sends one GET for `path` naming `host` on `stream` and reads its answer whole (by
/// `Content-Length`), leaving the connection idle and open; the status.
pub(crate) async fn exchange(stream: &mut tokio::net::TcpStream, host: &str, path: &str) -> u16 {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before the answer was whole");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let length: usize = text[..end]
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .expect("an answer with Content-Length");
        if buf.len() >= end + 4 + length {
            return text[9..12].parse().unwrap();
        }
    }
}

#[tokio::test]
async fn sigterm_under_load_finishes_requests_in_flight_refuses_new_ones_and_exits_0() {
    let bao = Bao::start().await;
    let (up, slow_up) = (echo().await, echo().await);
    put_bearer(&bao, "fast", &format!("http://{}", up.addr()));
    put_bearer(&bao, "slow", &format!("http://{}", slow_up.addr()));
    let mut lk = Latchkey::start(&bao, Opts::loopback()).await;

    // An idle keep-alive connection, open before the signal.
    let mut idle = tokio::net::TcpStream::connect(lk.proxy).await.unwrap();
    assert_eq!(exchange(&mut idle, "latchkey", "/fast/idle").await, 200);

    let url = lk.url("/fast/load");
    let load = SteadyLoad::start(4, move |client, c, n| client.get(format!("{url}/{c}/{n}")));
    load.more(100).await;

    // A request in flight: its upstream answers after 4 s.
    let slow_url = lk.url("/slow/delay/4000");
    let slow = tokio::spawn(async move { read(http().get(slow_url).send().await.unwrap()).await });
    wait_until(
        "the slow request to reach its upstream",
        Duration::from_secs(30),
        || std::future::ready((slow_up.requests() == 1).then_some(())),
    )
    .await;

    lk.terminate();
    // Accepting stops at once, well before the request in flight is answered.
    let proxy = lk.proxy;
    wait_until(
        "new connections to be refused",
        Duration::from_secs(10),
        || async move {
            tokio::net::TcpStream::connect(proxy)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    // The idle connection is closed by latchkey (not by its exit: the slow request is still
    // in flight).
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut byte))
        .await
        .expect("the idle keep-alive connection to be closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        !slow.is_finished(),
        "the slow request ended before the idle connection was closed"
    );

    // The request in flight is answered in full.
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.uri(), "/delay/4000");

    let status = lk
        .exited_within(Duration::from_secs(30))
        .await
        .expect("latchkey to exit within its grace period");
    assert!(status.success(), "{status:?}\n{}", lk.output());
    // Every request of the load that was answered was answered 200; the others were not
    // accepted (refused, or a keep-alive connection closed between two requests).
    let answered = load.answered_failures();
    let (ok, _) = load.stop().await;
    assert!(answered.is_empty(), "{answered:?}");
    assert!(ok >= 100);
}
