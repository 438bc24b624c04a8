//! The upstream connection pool: connections are reused once a response has been read to the
//! end, an unfinished response's connection is not, a connection the upstream closed is
//! replaced without the request failing, h2 upstreams share one connection, a new TLS
//! connection resumes a session an earlier one saved, and requests to an upstream that closes
//! every connection are not held by the limit on dials under way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

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

/// Sends `n` gateway GETs to `{path}/{i}` at once; each is answered 200, over h2 upstream.
async fn concurrent_h2_gets(lk: &Latchkey, path: &str, n: usize) {
    let client = http();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let req = client.get(lk.url(&format!("{path}/{i}")));
        tasks.spawn(async move { read(req.send().await.unwrap()).await });
    }
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json["version"], "HTTP/2.0");
    }
}

#[tokio::test]
async fn h2_upstreams_share_one_connection() {
    let bao = Bao::start().await;
    let (_ca, up, lk) = one_worker_to_tls(&bao, "h2-shared", &[b"h2"], "h2_shared_key_1234").await;
    sequential(&lk, "/h2-shared/x", 1).await;
    concurrent_h2_gets(&lk, "/h2-shared/c", 20).await;
    assert_eq!(up.requests(), 21);
    assert_eq!(up.connections(), 1);
}

/// A burst of first requests to an h2 host opens a few connections, not one each: a request
/// that waited for a dial to end goes on the shared connection it made.
#[tokio::test]
async fn a_burst_of_first_requests_to_an_h2_host_shares_the_connections_its_dials_made() {
    let bao = Bao::start().await;
    let (_ca, up, lk) = one_worker_to_tls(&bao, "h2-burst", &[b"h2"], "h2_burst_key_1234").await;
    concurrent_h2_gets(&lk, "/h2-burst/b", 40).await;
    assert_eq!(up.requests(), 40);
    // At most the dials under way at once (4 per host), and a few more that began in the
    // instant between a dial's end and its connection being shared: not 40.
    assert!(
        up.connections() <= 8,
        "{} connections for 40 requests",
        up.connections()
    );
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

/// An HTTPS upstream answering `ok` to every request, with `Connection: close` when `closes`.
/// It holds the TLS handshakes of new connections until `together` of them are open at once
/// (10 s at most): a burst is answered only once all its connections have been dialled.
struct Held {
    port: u16,
    together: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
}

impl Held {
    async fn start(ca: &TestCa, closes: bool) -> Held {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = tokio_rustls::TlsAcceptor::from(
            ca.server_config(&["localhost", "127.0.0.1"], &[b"http/1.1"]),
        );
        let together = Arc::new(AtomicUsize::new(1));
        let connections = Arc::new(AtomicUsize::new(0));
        let (want, count) = (together.clone(), connections.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            let mut since = tokio::time::Instant::now();
            loop {
                let accepted = if held.is_empty() {
                    let accepted = listener.accept().await.ok();
                    since = tokio::time::Instant::now();
                    accepted
                } else {
                    let until = since + Duration::from_secs(10);
                    tokio::time::timeout_at(until, listener.accept())
                        .await
                        .ok()
                        .and_then(Result::ok)
                };
                let timed_out = accepted.is_none();
                if let Some((stream, _)) = accepted {
                    count.fetch_add(1, Ordering::SeqCst);
                    held.push(stream);
                }
                if timed_out || held.len() >= want.load(Ordering::SeqCst) {
                    for stream in held.drain(..) {
                        tokio::spawn(Held::serve(acceptor.clone(), stream, closes));
                    }
                }
            }
        });
        Held {
            port,
            together,
            connections,
        }
    }

    async fn serve(
        acceptor: tokio_rustls::TlsAcceptor,
        stream: tokio::net::TcpStream,
        closes: bool,
    ) {
        let Ok(mut tls) = acceptor.accept(stream).await else {
            return;
        };
        loop {
            if !read_head(&mut tls).await.ends_with(b"\r\n\r\n") {
                return;
            }
            let answer: &[u8] = if closes {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            };
            if tls.write_all(answer).await.is_err() || closes {
                let _ = tls.shutdown().await;
                return;
            }
        }
    }
}

const WAITING: &str = "waiting for a connection to come back";

/// A one-worker latchkey in front of a [`Held`] upstream: when the upstream `closes`, one
/// request first (whose answer closes its connection); then a burst of eight at once, whose
/// handshakes the upstream finishes only when all eight connections are open, so that each
/// request needs a dial of its own while the others' are under way. Returns the lines
/// latchkey logged for requests that waited for a connection to come back.
async fn burst_of_new_connections(closes: bool) -> Vec<String> {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    let up = Held::start(&ca, closes).await;
    bao.put(
        "held",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &format!("https://localhost:{}", up.port)),
            ("api_key", "held_key_1234"),
        ],
    );
    let lk = Latchkey::start(
        &bao,
        Opts::loopback()
            .root(&ca.pem_path)
            .proxy("workers = 1")
            .env("RUST_LOG", "info,latchkey::upstream::pool=debug"),
    )
    .await;
    let client = http();
    let first = usize::from(closes);
    if closes {
        let r = client.get(lk.url("/held/first")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");
    }

    let burst = 8;
    up.together.store(burst, Ordering::SeqCst);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..burst {
        let req = client.get(lk.url(&format!("/held/burst/{i}")));
        tasks.spawn(async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.unwrap(), (200, "ok".to_string()));
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), first + burst);
    // Each request's access line is written after anything it logged before it.
    lk.access_lines(first + burst, |l| l["status"] == 200).await;
    lk.output()
        .lines()
        .filter(|l| l.contains(WAITING))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_burst_of_new_connections_to_a_host_dials_four_at_once_and_waits_for_the_rest() {
    // A cold pool: four dials under way, the other four requests wait (and dial when the
    // wait ends, since no connection comes back before the upstream has all eight).
    let waited = burst_of_new_connections(false).await;
    assert_eq!(waited.len(), 4, "{waited:#?}");
}

#[tokio::test]
async fn requests_to_an_upstream_that_closes_every_connection_dial_at_once() {
    // Once latchkey has seen an answer that closes its connection, no connection is waited for.
    let waited = burst_of_new_connections(true).await;
    assert!(waited.is_empty(), "{waited:#?}");
}

/// How an upstream that [`Retiring`] is turns a connection's second request away.
#[derive(Clone, Copy)]
enum Retire {
    /// `GOAWAY` with the first stream as the last one it processed.
    GoAway,
    /// `RST_STREAM` with `REFUSED_STREAM` on the second stream.
    Refuse,
    /// The connection closed at once, saying nothing of what it processed (a crash, a load
    /// balancer that drops it).
    Drop,
}

/// What [`Retiring`] answers for a request body: its length and FNV-1a hash (a short answer,
/// well within any flow-control window).
fn digest(body: &[u8]) -> String {
    let hash = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{} {hash:016x}", body.len())
}

/// An h2 upstream over TLS, written frame by frame (hyper's and h2's servers process a stream
/// once its headers arrive, so neither can be told to refuse one it has seen): each connection
/// answers its first request `200` with the [`digest`] of its body and turns the second away unread,
/// as a server retiring the connection does. Counts the streams it answered and turned away.
struct Retiring {
    port: u16,
    answered: Arc<AtomicUsize>,
    turned_away: Arc<AtomicUsize>,
}

impl Retiring {
    async fn start(ca: &TestCa, how: Retire) -> Retiring {
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(&["localhost"], &[b"h2"]));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let answered = Arc::new(AtomicUsize::new(0));
        let turned_away = Arc::new(AtomicUsize::new(0));
        let counts = (answered.clone(), turned_away.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, counts) = (acceptor.clone(), counts.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = Retiring::serve(tls, how, counts).await;
                    }
                });
            }
        });
        Retiring {
            port,
            answered,
            turned_away,
        }
    }

    async fn serve(
        mut io: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        how: Retire,
        (answered, turned_away): (Arc<AtomicUsize>, Arc<AtomicUsize>),
    ) -> std::io::Result<()> {
        use tokio::io::AsyncReadExt;
        fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
            let len = payload.len() as u32;
            let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
            f.extend_from_slice(&stream.to_be_bytes());
            f.extend_from_slice(payload);
            f
        }
        const DATA: u8 = 0;
        const HEADERS: u8 = 1;
        const RST_STREAM: u8 = 3;
        const SETTINGS: u8 = 4;
        const GOAWAY: u8 = 7;
        const WINDOW_UPDATE: u8 = 8;
        const END_STREAM: u8 = 0x1;
        const END_HEADERS: u8 = 0x4;

        let mut preface = [0u8; 24];
        io.read_exact(&mut preface).await?;
        io.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
        let mut first: Option<u32> = None;
        let mut body = Vec::new();
        loop {
            let mut head = [0u8; 9];
            io.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            io.read_exact(&mut payload).await?;
            match kind {
                SETTINGS if flags & 0x1 == 0 => io.write_all(&frame(SETTINGS, 0x1, 0, &[])).await?,
                HEADERS if first.is_none() => {
                    first = Some(stream);
                    if flags & END_STREAM != 0 {
                        Retiring::answer(&mut io, stream, &body, &answered).await?;
                    }
                }
                DATA if Some(stream) == first => {
                    body.extend_from_slice(&payload);
                    if !payload.is_empty() {
                        let more = (payload.len() as u32).to_be_bytes();
                        io.write_all(&frame(WINDOW_UPDATE, 0, 0, &more)).await?;
                        io.write_all(&frame(WINDOW_UPDATE, 0, stream, &more))
                            .await?;
                    }
                    if flags & END_STREAM != 0 {
                        Retiring::answer(&mut io, stream, &body, &answered).await?;
                    }
                }
                HEADERS => {
                    turned_away.fetch_add(1, Ordering::SeqCst);
                    match how {
                        Retire::GoAway => {
                            let mut away = first.unwrap().to_be_bytes().to_vec();
                            away.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
                            io.write_all(&frame(GOAWAY, 0, 0, &away)).await?;
                        }
                        Retire::Refuse => {
                            let refused = 0x7u32.to_be_bytes(); // REFUSED_STREAM
                            io.write_all(&frame(RST_STREAM, 0, stream, &refused))
                                .await?;
                        }
                        Retire::Drop => return Ok(()),
                    }
                }
                _ => {}
            }
            let _ = (END_HEADERS, HEADERS);
        }
    }

    /// `200` (`:status` is the static table's entry 8) with `body`.
    async fn answer(
        io: &mut (impl tokio::io::AsyncWrite + Unpin),
        stream: u32,
        body: &[u8],
        answered: &AtomicUsize,
    ) -> std::io::Result<()> {
        let head = |kind: u8, flags: u8, len: usize| {
            let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
            f.extend_from_slice(&stream.to_be_bytes());
            f
        };
        let body = digest(body);
        let body = body.as_bytes();
        let mut out = head(1, 0x4, 1);
        out.push(0x88);
        // DATA in frames of at most the default 16 KiB; the last ends the stream.
        let mut chunks = body.chunks(16 * 1024).peekable();
        if chunks.peek().is_none() {
            out.extend(head(0, 0x1, 0));
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            out.extend(head(0, u8::from(last), chunk.len()));
            out.extend_from_slice(chunk);
        }
        io.write_all(&out).await?;
        answered.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// An h2 upstream that retires a shared connection (`GOAWAY` above the streams it processed,
/// or `REFUSED_STREAM`) did not process the requests it turned away: each is sent again on a
/// new connection, its body whole, whatever its method, and the client never sees the refusal.
#[tokio::test]
async fn requests_an_h2_upstream_turned_away_unprocessed_are_sent_again() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    for (how, id) in [(Retire::GoAway, "h2-goaway"), (Retire::Refuse, "h2-refuse")] {
        let up = Retiring::start(&ca, how).await;
        put_bearer(&bao, id, &format!("https://localhost:{}", up.port));
        let lk = Latchkey::start(
            &bao,
            Opts::loopback().root(&ca.pem_path).proxy("workers = 1"),
        )
        .await;
        let client = http();
        // The first request opens the connection that the others then share.
        let r = read(
            client
                .get(lk.url(&format!("/{id}/first")))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200, "{id}: {r:?}");
        // A bodiless GET, a small POST, and a POST larger than both the stream's first window
        // (it is still being sent when it is turned away) and what latchkey keeps of a body to
        // send again (what it had not sent yet is sent from where it was).
        let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let bodies: [(reqwest::Method, Vec<u8>); 3] = [
            (reqwest::Method::GET, Vec::new()),
            (reqwest::Method::POST, b"{\"amount\": 100}".to_vec()),
            (reqwest::Method::POST, big),
        ];
        for (n, (method, body)) in bodies.into_iter().enumerate() {
            let r = client
                .request(method.clone(), lk.url(&format!("/{id}/again/{n}")))
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let status = r.status();
            let got = r.bytes().await.unwrap();
            assert_eq!(
                status,
                200,
                "{id} {method} {n}: {:?}",
                String::from_utf8_lossy(&got)
            );
            assert_eq!(
                String::from_utf8_lossy(&got),
                digest(&body),
                "{id} {method} {n}: the body sent again differs"
            );
        }
        // Each of the three was turned away once and answered on a new connection.
        assert_eq!(up.turned_away.load(Ordering::SeqCst), 3, "{id}");
        assert_eq!(up.answered.load(Ordering::SeqCst), 4, "{id}");
    }
}

/// An h2 upstream that drops a shared connection under a request, saying nothing of what it
/// processed: an idempotent request (GET, PUT, DELETE) is sent again on a new connection and
/// answered; a POST, which the upstream may have acted on, is not (RFC 9110 section 9.2.2), and
/// is `502 upstream_unreachable`.
#[tokio::test]
async fn an_idempotent_request_whose_h2_connection_dropped_under_it_is_sent_again() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    let up = Retiring::start(&ca, Retire::Drop).await;
    put_bearer(&bao, "h2-drop", &format!("https://localhost:{}", up.port));
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().root(&ca.pem_path).proxy("workers = 1"),
    )
    .await;
    let client = http();
    let mut sent = 0;
    for (method, body, answered) in [
        (reqwest::Method::GET, Vec::new(), true),
        (reqwest::Method::PUT, b"{\"name\": \"x\"}".to_vec(), true),
        (reqwest::Method::DELETE, Vec::new(), true),
        (reqwest::Method::POST, b"{\"amount\": 100}".to_vec(), false),
    ] {
        // A first request opens a connection that the next one then shares.
        let r = read(client.get(lk.url("/h2-drop/first")).send().await.unwrap()).await;
        assert_eq!(r.status, 200, "{r:?}");
        let r = client
            .request(method.clone(), lk.url("/h2-drop/dropped"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let got = String::from_utf8_lossy(&r.bytes().await.unwrap()).into_owned();
        sent += 1;
        if answered {
            assert_eq!(status, 200, "{method}: {got}");
            assert_eq!(got, digest(&body), "{method}: the body sent again differs");
        } else {
            assert_eq!(status, 502, "{method}: {got}");
            assert!(got.contains("upstream_unreachable"), "{method}: {got}");
        }
    }
    // Each request met a drop (the next round's first GET, on the connection a resend opened,
    // meets one too, and is sent again as well).
    assert!(up.turned_away.load(Ordering::SeqCst) >= sent);
}
