//! PRODUCT.md 10.9 from the other side: clients and peers that hold latchkey's resources by
//! taking nothing, or by sending too much.
//!
//! - a client that stops reading its answer (HTTP/1.1, its receive window full; h2, a window
//!   it never opens) is closed after `proxy.body_timeout`, and the upstream connections its
//!   requests held go with it; each close is counted as `stalled`;
//! - an h2 connection kept busy with PINGs and no stream is closed at `proxy.idle_timeout`
//!   ("silent or not"), and counted as `idle`;
//! - a request body to the admin listener that stops coming is answered `408` after
//!   `proxy.body_timeout` and its connection closed (the sign-in form, the API's JSON);
//! - concurrent requests for invented IDs meet the per-client miss limit as sequential ones do;
//! - a Vault (or whatever answers in its place) that sends an endless answer costs a bounded
//!   read, not memory without end; one that stops half-way through an answer at start is
//!   asked again, not taken for a broken CA record.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::support::*;

/// Short timeouts: a stall is cut after 2 s without progress, an idle connection after 2 s.
fn short() -> Opts {
    Opts::loopback()
        .proxy("body_timeout = \"2s\"")
        .proxy("idle_timeout = \"2s\"")
}

/// How long a test waits for latchkey to act on a 2 s timeout.
const GIVE_UP: Duration = Duration::from_secs(30);

/// An upstream that answers every request with an endless chunked body (or, `/sized`, a
/// body of [`SIZED`] bytes), and counts the connections it still writes to (one that
/// latchkey closed fails its next write).
struct Endless {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
}

impl Endless {
    async fn start() -> Endless {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let (o, s) = (open.clone(), served.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut io, _)) = listener.accept().await else {
                    return;
                };
                let (open, served) = (o.clone(), s.clone());
                tokio::spawn(async move {
                    let head = read_head(&mut io).await;
                    if !head.ends_with(b"\r\n\r\n") {
                        return;
                    }
                    open.fetch_add(1, Ordering::SeqCst);
                    served.fetch_add(1, Ordering::SeqCst);
                    if head.starts_with(b"GET /sized") {
                        let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZED}\r\n\r\n");
                        let mut wrote = io.write_all(answer.as_bytes()).await;
                        let block = vec![b'x'; 0x10000];
                        for _ in 0..SIZED / block.len() {
                            if wrote.is_err() {
                                break;
                            }
                            wrote = io.write_all(&block).await;
                        }
                        open.fetch_sub(1, Ordering::SeqCst);
                        return;
                    }
                    let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
                    let mut wrote = io
                        .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                        .await;
                    while wrote.is_ok() {
                        wrote = io.write_all(chunk.as_bytes()).await;
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Endless { addr, open, served }
    }

    /// Waits until `n` requests have been answered and then until none is still written to.
    async fn let_go(&self, n: usize, what: &str) {
        wait_until("the upstream to be asked", GIVE_UP, || async {
            (self.served.load(Ordering::SeqCst) >= n).then_some(())
        })
        .await;
        wait_until(what, GIVE_UP, || async {
            (self.open.load(Ordering::SeqCst) == 0).then_some(())
        })
        .await;
    }
}

/// Waits until latchkey has counted `n` client connections closed for `reason`.
async fn counted_closed(lk: &Latchkey, reason: &str, n: u64) {
    let sample = format!("latchkey_client_connections_closed_total{{reason=\"{reason}\"}} ");
    let what = format!("{n} client connection(s) counted as closed {reason}");
    wait_until(&what, GIVE_UP, || {
        let sample = sample.clone();
        async move {
            let text = crate::errors::metrics_text(lk).await;
            let count = text
                .lines()
                .find_map(|l| l.strip_prefix(&sample)?.parse::<f64>().ok())
                .unwrap_or(0.0);
            (count >= n as f64).then_some(())
        }
    })
    .await
}

/// A client connection to latchkey's proxy with a receive buffer of `rcvbuf` bytes, `request`
/// sent on it.
async fn asking(lk: &Latchkey, rcvbuf: u32, request: &[u8]) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(rcvbuf).unwrap();
    let mut client = socket.connect(lk.proxy).await.unwrap();
    client.write_all(request).await.unwrap();
    client
}

#[tokio::test]
async fn a_client_that_reads_nothing_is_closed_with_its_upstream_connection() {
    let bao = Bao::start().await;
    let up = Endless::start().await;
    put_bearer(&bao, "endless", &format!("http://{}", up.addr));
    let lk = Latchkey::start(&bao, short()).await;

    // HTTP/1.1: a request, then nothing read, ever.
    let client = asking(
        &lk,
        4096,
        b"GET /endless/big HTTP/1.1\r\nHost: latchkey\r\n\r\n",
    )
    .await;
    up.let_go(1, "latchkey to let go of the HTTP/1.1 client's upstream")
        .await;
    drop(client);
    counted_closed(&lk, "stalled", 1).await;

    // h2: three streams, no window ever opened for their bodies.
    let io = tokio::net::TcpStream::connect(lk.proxy).await.unwrap();
    let (mut h2, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(io)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let mut streams = Vec::new();
    for _ in 0..3 {
        h2 = h2.ready().await.unwrap();
        let req = http::Request::get(format!("http://{}/endless/big", lk.proxy))
            .body(())
            .unwrap();
        streams.push(h2.send_request(req, true).unwrap().0);
    }
    // The answers are kept, bodies unread: dropping one would cancel its stream.
    let mut answers = Vec::new();
    for s in streams {
        let answer = s.await.unwrap();
        assert_eq!(answer.status(), 200);
        answers.push(answer);
    }
    up.let_go(4, "latchkey to let go of the h2 client's upstreams")
        .await;
    // And the connection itself is closed.
    let ended = tokio::time::timeout(GIVE_UP, driver).await;
    assert!(ended.is_ok(), "the h2 connection is still open");
    counted_closed(&lk, "stalled", 2).await;
    drop(answers);
}

/// The size of the upstream's `/sized` answer: a multiple of 64 KiB.
const SIZED: usize = 6 * 1024 * 1024;

/// A client that reads slowly but steadily is not taken for one that stopped: the whole answer
/// comes, though each pause between its reads is a fifth of `body_timeout` and the kernel's
/// send buffer could hold far more than the client takes in `body_timeout`.
#[tokio::test]
async fn a_slow_but_steady_reader_gets_its_whole_answer() {
    let bao = Bao::start().await;
    let up = Endless::start().await;
    put_bearer(&bao, "sized", &format!("http://{}", up.addr));
    let lk = Latchkey::start(&bao, short()).await;
    let mut client = asking(
        &lk,
        32 * 1024,
        b"GET /sized/sized HTTP/1.1\r\nHost: latchkey\r\nConnection: close\r\n\r\n",
    )
    .await;
    // 192 KiB every 400 ms: the whole answer in some 13 s.
    let mut got = 0usize;
    let mut done = false;
    let mut buf = vec![0u8; 192 * 1024];
    let started = std::time::Instant::now();
    while !done {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut turn = 0;
        while turn < buf.len() {
            let read = tokio::io::AsyncReadExt::read(&mut client, &mut buf[turn..]);
            match tokio::time::timeout(Duration::from_millis(50), read).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    done = true;
                    break;
                }
                Ok(Ok(n)) => turn += n,
                Err(_) => break,
            }
        }
        got += turn;
        assert!(started.elapsed() < Duration::from_secs(120), "too slow");
    }
    assert!(
        got > SIZED,
        "the answer was cut after {got} bytes (head and body: more than {SIZED})"
    );
}

/// PRODUCT.md 7: `idle_timeout` closes a connection with no request in flight, silent or not.
#[tokio::test]
async fn an_h2_connection_kept_busy_with_pings_and_no_stream_is_closed() {
    let bao = Bao::start().await;
    let lk = Latchkey::start(&bao, short()).await;
    let io = tokio::net::TcpStream::connect(lk.proxy).await.unwrap();
    let (_h2, mut conn) = h2::client::handshake(io).await.unwrap();
    let mut pings = conn.ping_pong().unwrap();
    let driver = tokio::spawn(conn);
    let pinging = tokio::spawn(async move {
        let mut answered = 0;
        while pings.ping(h2::Ping::opaque()).await.is_ok() {
            answered += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        answered
    });
    let ended = tokio::time::timeout(GIVE_UP, driver).await;
    assert!(ended.is_ok(), "PINGs kept a connection with no stream open");
    counted_closed(&lk, "idle", 1).await;
    let answered = pinging.await.unwrap();
    assert!(
        answered >= 3,
        "the PINGs were not answered ({answered}): nothing was tried"
    );
}

/// PRODUCT.md 10.9 on the admin listener: a body that stops coming, unauthenticated (the
/// sign-in form) or not (the API's JSON), does not hold its connection: `408 request_timeout`
/// after `proxy.body_timeout`, and the connection closes. (Held for ever before: 19,000 such
/// connections took every descriptor latchkey had.)
#[tokio::test]
async fn an_admin_request_body_that_stops_coming_is_answered_408_and_closed() {
    use tokio::io::AsyncReadExt;
    let bao = Bao::start().await;
    let lk = Latchkey::start(&bao, short()).await;
    let heads = [
        "POST /session HTTP/1.1\r\nHost: a\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: 100\r\n\r\ntoken="
            .to_string(),
        format!(
            "POST /v1/connections HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"id\": "
        ),
    ];
    for head in heads {
        let mut c = tokio::net::TcpStream::connect(lk.admin).await.unwrap();
        c.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(GIVE_UP, c.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "{head}: no answer and not closed");
        let answer = String::from_utf8_lossy(&answer).to_lowercase();
        assert!(answer.starts_with("http/1.1 408"), "{head}: {answer}");
        assert!(
            answer.contains("latchkey-error: request_timeout"),
            "{head}: {answer}"
        );
    }
}

/// Concurrent misses are limited as sequential ones are: 60 invented IDs at once from one
/// client cost at most the burst (and what refills meanwhile) Vault reads.
#[tokio::test]
async fn concurrent_invented_ids_meet_the_miss_limit() {
    let bao = Bao::start().await;
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().extra("[cache]\nmiss_rate = 1\nmiss_burst = 5\n"),
    )
    .await;
    let started = std::time::Instant::now();
    let answers = futures_util::future::join_all((0..60).map(|i| {
        let url = lk.url(&format!("/invented-{i}/x"));
        async move { http().get(url).send().await.unwrap().status().as_u16() }
    }))
    .await;
    let refilled = started.elapsed().as_secs() as usize + 1;
    let read = answers.iter().filter(|&&s| s == 404).count();
    let limited = answers.iter().filter(|&&s| s == 429).count();
    assert_eq!(read + limited, 60, "{answers:?}");
    assert!(
        read <= 5 + refilled,
        "{read} of 60 concurrent misses were read from Vault (burst 5): {answers:?}"
    );
}

/// The limit is on reads that find nothing: a client starting with more real connections at
/// once than its burst has every one of them served (the requests past the burst wait for the
/// reads under way, which give their tokens back).
#[tokio::test]
async fn concurrent_first_requests_on_real_connections_are_all_served() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    for i in 0..30 {
        put_bearer(&bao, &format!("real-{i}"), &base);
    }
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().extra("[cache]\nmiss_rate = 0.01\nmiss_burst = 5\n"),
    )
    .await;
    let answers = futures_util::future::join_all((0..30).map(|i| {
        let url = lk.url(&format!("/real-{i}/x"));
        async move { http().get(url).send().await.unwrap().status().as_u16() }
    }))
    .await;
    assert!(answers.iter().all(|&s| s == 200), "{answers:?}");
}

/// A stand-in for Vault that answers the first request on each connection with `200` and, for
/// `Endless`, an endless body of spaces, or for `Trickle` a 100,000-byte body a byte at a time
/// (latchkey's calls to Vault are `GET`s without a body here).
async fn broken_vault(kind: Broken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut io, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let head = read_head(&mut io).await;
                if !head.ends_with(b"\r\n\r\n") {
                    return;
                }
                match kind {
                    Broken::Endless => {
                        let _ = io
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                                .await;
                        let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
                        while io.write_all(chunk.as_bytes()).await.is_ok() {}
                    }
                    Broken::Trickle => {
                        let _ = io
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
                                .await;
                        loop {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            if io.write_all(b" ").await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

#[derive(Clone, Copy)]
enum Broken {
    Endless,
    Trickle,
}

#[tokio::test]
async fn an_endless_answer_from_vault_is_refused_unread() {
    let bao = Bao::start().await;
    let vault = broken_vault(Broken::Endless).await;
    let opts = Opts {
        vault_address: Some(format!("http://{vault}")),
        ..Opts::loopback()
    };
    let lk = Latchkey::start(&bao, opts).await;
    let r = gateway_get(&lk, "/anything/x", &[]).await;
    assert_eq!(r.status, 503, "{:?}", r.json);
    assert_eq!(
        r.latchkey_error.as_deref(),
        Some("secret_store_unavailable")
    );
    // At loopback speed, two seconds of an endless answer are gigabytes.
    let peak = peak_rss_kib(lk.pid());
    assert!(
        peak < 200 * 1024,
        "latchkey grew to {peak} KiB reading Vault"
    );
    lk.output_line("the refusal of the long answer", |l| {
        l.contains("an answer longer than 1048576 bytes")
    })
    .await;
}

/// Vault stopping half-way through its answer to the CA read at start is Vault's trouble: the
/// start goes on without the tunnel form and asks again, rather than stopping on a CA record
/// it takes for broken.
#[tokio::test]
async fn an_answer_cut_short_at_start_is_asked_again_not_taken_for_a_broken_ca() {
    let bao = Bao::start().await;
    let vault = broken_vault(Broken::Trickle).await;
    let opts = Opts {
        vault_address: Some(format!("http://{vault}")),
        ..Opts::loopback()
    };
    let lk = Latchkey::try_start(&bao, opts)
        .await
        .unwrap_or_else(|out| panic!("latchkey did not start:\n{out}"));
    lk.output_line("the CA asked for again", |l| {
        l.contains("cannot read latchkey's CA from Vault") && l.contains("asking again")
    })
    .await;
    assert!(!lk.output().contains("is unusable"), "{}", lk.output());
}
