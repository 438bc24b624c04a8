//! latchkey's own HTTP/1.1 client, against upstreams that write exact bytes: a body that ends
//! when the upstream closes, a chunked body with extensions and trailers arriving in pieces,
//! interim (1xx) answers, upstreams that close kept-alive connections, answers that are not
//! HTTP or not coherent, an early answer to a large upload, the answer to `HEAD`, and headers
//! that the upstream's `Connection` header names.
//!
//! Each upstream is a raw TCP listener on 127.0.0.1 that counts the connections it accepts and
//! the request heads it reads, so that a test can tell a reused connection from a new one.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::errors::send;
use crate::support::*;

#[derive(Default)]
pub struct Counts {
    connections: AtomicUsize,
    requests: AtomicUsize,
}

/// A raw upstream: `serve` is run for every connection it accepts.
pub struct Upstream {
    pub addr: SocketAddr,
    counts: Arc<Counts>,
}

impl Upstream {
    pub async fn start<F, Fut>(serve: F) -> Upstream
    where
        F: Fn(Conn) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let shared = counts.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                // Every write goes out as it is written, so pieces stay pieces.
                stream.set_nodelay(true).unwrap();
                tokio::spawn(serve(Conn {
                    stream,
                    buf: Vec::new(),
                    counts: shared.clone(),
                }));
            }
        });
        Upstream { addr, counts }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// Request heads read so far, on all connections.
    pub fn requests(&self) -> usize {
        self.counts.requests.load(Ordering::SeqCst)
    }
}

/// One connection accepted by an [`Upstream`], with what was read on it past the last head.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    counts: Arc<Counts>,
}

impl Conn {
    /// Reads one request head; `None` when the connection ends first.
    pub async fn head(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                self.counts.requests.fetch_add(1, Ordering::SeqCst);
                return Some(head);
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// Reads the body of the request whose head is `head` (by its Content-Length); its size.
    pub async fn body(&mut self, head: &str) -> usize {
        let length = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.trim().parse::<usize>().unwrap());
        while self.buf.len() < length {
            if self.fill().await == 0 {
                break;
            }
        }
        let n = length.min(self.buf.len());
        self.buf.drain(..n);
        n
    }

    /// Reads once; how much was read (0 at the end or on an error).
    pub async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(_) => 0,
        }
    }

    /// Writes `bytes`; false when the connection is gone.
    pub async fn write(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Reads and counts request heads until the peer closes (what arrives after this side has
    /// said all it will).
    pub async fn drain(&mut self) {
        while self.head().await.is_some() {}
    }
}

pub const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// GET through the gateway: the status and the body.
pub async fn get_text(client: &reqwest::Client, url: &str) -> (u16, String) {
    let r = client.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn a_body_that_ends_at_the_upstreams_close_arrives_whole_and_its_connection_is_not_reused() {
    let bao = Bao::start().await;
    // No Content-Length, no Transfer-Encoding: the body ends at the upstream's close (its half
    // of the connection; it keeps reading, to see whether latchkey sends anything more on it).
    let up = Upstream::start(|mut c| async move {
        if c.head().await.is_some() {
            c.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
                .await;
            c.write(b"all of it, ").await;
            c.write(b"up to the close").await;
            let _ = c.stream.shutdown().await;
            c.drain().await;
        }
    })
    .await;
    put_bearer(&bao, "eof", &up.base_url());
    // One worker: one pool, that a wrongly kept connection would be taken from.
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("workers = 1")).await;
    let client = http();
    for _ in 0..2 {
        assert_eq!(
            get_text(&client, &lk.url("/eof/x")).await,
            (200, "all of it, up to the close".to_string())
        );
    }
    assert_eq!(up.connections(), 2, "each request needs its own connection");
    assert_eq!(
        up.requests(),
        2,
        "a request was sent on the connection whose body ended at its close"
    );
}

#[tokio::test]
async fn a_chunked_body_with_extensions_and_trailers_arriving_in_pieces_is_decoded_and_its_connection_reused(
) {
    let bao = Bao::start().await;
    // Split inside the status line, inside size lines, extensions, data, line ends and trailers.
    const PIECES: [&[u8]; 14] = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n",
        b"Content-Type: text/plain\r\n\r\n",
        b"5;name=\"quoted; value\"\r\nhel",
        b"lo\r",
        b"\n",
        b"1",
        b" ;ext\r\n \r\n",
        b"00a;a=1;b\r\n0123",
        b"456789",
        b"\r\n",
        b"0;last=1\r\nX-Checksum: ",
        b"abc\r\nX-More: 1\r",
        b"\n\r",
        b"\n",
    ];
    let up = Upstream::start(|mut c| async move {
        while c.head().await.is_some() {
            for piece in PIECES {
                if !c.write(piece).await {
                    return;
                }
                // Nothing latchkey does shows when it has read a piece of framing: a pause
                // lets each piece arrive on its own.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    })
    .await;
    put_bearer(&bao, "chunked", &up.base_url());
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("workers = 1")).await;
    let client = http();
    for _ in 0..2 {
        assert_eq!(
            get_text(&client, &lk.url("/chunked/x")).await,
            (200, "hello 0123456789".to_string())
        );
    }
    assert_eq!(up.requests(), 2);
    assert_eq!(
        up.connections(),
        1,
        "the connection was not reused after the chunked body ended"
    );
}

#[tokio::test]
async fn interim_answers_are_skipped_and_the_final_answer_reaches_the_client() {
    let bao = Bao::start().await;
    let up = Upstream::start(|mut c| async move {
        while let Some(head) = c.head().await {
            if head.starts_with("POST ") {
                // 100 Continue on its own, then the final answer once the body is in.
                c.write(b"HTTP/1.1 100 Continue\r\n\r\n").await;
                let n = c.body(&head).await;
                let body = format!("got {n} bytes");
                c.write(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
            } else {
                // Two interim answers and the final one, in one write.
                c.write(
                    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
                      HTTP/1.1 102 Processing\r\n\r\n\
                      HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
                )
                .await;
            }
        }
    })
    .await;
    put_bearer(&bao, "interim", &up.base_url());
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let client = http();

    let r = client
        .post(lk.url("/interim/upload"))
        .body(vec![b'p'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "got 1000 bytes");

    let r = client.get(lk.url("/interim/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("link").is_none(),
        "a header of the 103 reached the client: {:?}",
        r.headers()
    );
    assert_eq!(r.text().await.unwrap(), "final");
}

#[tokio::test]
async fn an_upstream_that_closes_every_connection_after_answering_fails_no_request() {
    let bao = Bao::start().await;
    // Content-Length and no `Connection: close`: the answer says the connection may carry
    // another request, and then the upstream closes it.
    let up = Upstream::start(|mut c| async move {
        if c.head().await.is_some() {
            c.write(OK).await;
        }
    })
    .await;
    put_bearer(&bao, "closer", &up.base_url());
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("workers = 1")).await;
    let client = http();
    for i in 0..5 {
        assert_eq!(
            get_text(&client, &lk.url("/closer/x")).await,
            (200, "ok".to_string()),
            "request {i}"
        );
    }
    assert_eq!(up.connections(), 5);
}

#[tokio::test]
async fn a_get_on_a_reused_connection_that_the_upstream_closes_without_answering_is_sent_again() {
    let bao = Bao::start().await;
    // Each connection answers its first request and keeps open; a second request on it is read
    // and the connection closed without an answer.
    let up = Upstream::start(|mut c| async move {
        if c.head().await.is_some() && c.write(OK).await {
            c.head().await;
        }
    })
    .await;
    put_bearer(&bao, "stale", &up.base_url());
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("workers = 1")).await;
    let client = http();
    for i in 0..5 {
        assert_eq!(
            get_text(&client, &lk.url("/stale/x")).await,
            (200, "ok".to_string()),
            "request {i}"
        );
    }
    // Requests 2 to 5 were each sent on the previous connection, unanswered, then again.
    assert_eq!(up.connections(), 5);
    assert_eq!(up.requests(), 9);
}

#[tokio::test]
async fn a_post_on_a_reused_connection_that_the_upstream_closes_without_answering_is_not_sent_again(
) {
    let bao = Bao::start().await;
    let up = Upstream::start(|mut c| async move {
        if let Some(head) = c.head().await {
            c.body(&head).await;
            if c.write(OK).await {
                c.head().await;
            }
        }
    })
    .await;
    put_bearer(&bao, "once", &up.base_url());
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("workers = 1")).await;
    let client = http();
    // Without a body (nothing of it could have been taken) and with one.
    for (i, body) in ["", "a body"].into_iter().enumerate() {
        let r = client
            .post(lk.url("/once/first"))
            .body("one")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "ok");

        send(client.post(lk.url("/once/second")).body(body))
            .await
            .assert_error(502, "upstream_unreachable");
        assert_eq!(up.requests(), 2 * (i + 1), "the POST was sent again");
        assert_eq!(up.connections(), i + 1);
    }
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_in_http_is_502_upstream_unreachable() {
    let bao = Bao::start().await;
    // An SSH server: its banner as soon as the connection is open, whatever is asked.
    let up = Upstream::start(|mut c| async move {
        c.write(b"SSH-2.0-x\r\n\r\n").await;
        c.drain().await;
    })
    .await;
    put_bearer(&bao, "ssh", &up.base_url());
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    send(http().get(lk.url("/ssh/x")))
        .await
        .assert_error(502, "upstream_unreachable");
    let line = lk
        .access_line(|l| l["error"] == "upstream_unreachable")
        .await;
    assert_eq!(line["status"], 502);
    assert_eq!(line["path"], "/x");
}

#[tokio::test]
async fn an_answer_with_two_different_content_lengths_is_502_upstream_unreachable() {
    let bao = Bao::start().await;
    let up = Upstream::start(|mut c| async move {
        if c.head().await.is_some() {
            c.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
                .await;
            c.drain().await;
        }
    })
    .await;
    put_bearer(&bao, "twolengths", &up.base_url());
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let r = send(http().get(lk.url("/twolengths/x"))).await;
    r.assert_error(502, "upstream_unreachable");
    assert!(!r.body.contains("abc"), "{r:#?}");
    let line = lk
        .access_line(|l| l["error"] == "upstream_unreachable")
        .await;
    assert_eq!(line["status"], 502);
    assert_eq!(line["path"], "/x");
}

#[tokio::test]
async fn an_upstream_refusing_a_large_upload_before_reading_it_is_answered_with_its_413() {
    let bao = Bao::start().await;
    // The 413 as soon as the head is read; the body is never read, the connection closed.
    let up = Upstream::start(|mut c| async move {
        while let Some(head) = c.head().await {
            if head.starts_with("POST ") {
                c.write(
                    b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n\
                      Content-Type: text/plain\r\nContent-Length: 9\r\n\r\ntoo large",
                )
                .await;
                return;
            }
            c.write(OK).await;
        }
    })
    .await;
    put_bearer(&bao, "toolarge", &up.base_url());
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let client = http();

    // 8 MiB, streamed: far more than the socket buffers hold, so most of it is still to be
    // sent when the 413 arrives.
    let frames = futures_util::stream::iter(0..128)
        .map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'u'; 64 * 1024])));
    let r = send(
        client
            .post(lk.url("/toolarge/upload"))
            .body(reqwest::Body::wrap_stream(frames)),
    )
    .await;
    assert_eq!(r.status, 413, "{r:#?}");
    assert_eq!(r.body, "too large");
    assert_eq!(r.header("latchkey-error"), None);

    // latchkey goes on serving. On a client connection of its own: the one that carried the
    // upload may be closed once its answer is out (the rest of the upload was never read), and
    // a client that reuses it races that close.
    assert_eq!(
        get_text(&http(), &lk.url("/toolarge/after")).await,
        (200, "ok".to_string())
    );
}

#[tokio::test]
async fn a_head_answer_keeps_its_content_length_and_its_connection_is_reused() {
    let bao = Bao::start().await;
    let up = Upstream::start(|mut c| async move {
        while let Some(head) = c.head().await {
            let answer: &[u8] = if head.starts_with("HEAD ") {
                b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: application/pdf\r\n\r\n"
            } else {
                OK
            };
            if !c.write(answer).await {
                return;
            }
        }
    })
    .await;
    put_bearer(&bao, "head", &up.base_url());
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("workers = 1")).await;
    let client = http();

    let r = client.head(lk.url("/head/file.pdf")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "1234");
    assert_eq!(r.headers()["content-type"], "application/pdf");
    assert_eq!(r.bytes().await.unwrap().len(), 0);

    assert_eq!(
        get_text(&client, &lk.url("/head/after")).await,
        (200, "ok".to_string())
    );
    assert_eq!(up.requests(), 2);
    assert_eq!(
        up.connections(),
        1,
        "the connection was not reused after the answer to HEAD"
    );
}

#[tokio::test]
async fn headers_named_by_the_upstreams_connection_header_and_keep_alive_do_not_reach_the_client() {
    let bao = Bao::start().await;
    let up = Upstream::start(|mut c| async move {
        while c.head().await.is_some() {
            let answer = b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\n\
                           Keep-Alive: timeout=5\r\nConnection: keep-alive, x-other-hop\r\n\
                           X-Other-Hop: 2\r\nX-Kept: yes\r\nContent-Type: text/plain\r\n\
                           Content-Length: 2\r\n\r\nok";
            if !c.write(answer).await {
                return;
            }
        }
    })
    .await;
    put_bearer(&bao, "hops", &up.base_url());
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let r = http().get(lk.url("/hops/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    for gone in ["x-hop", "x-other-hop", "keep-alive", "connection"] {
        assert!(
            headers.get(gone).is_none(),
            "{gone} reached the client: {headers:?}"
        );
    }
    assert_eq!(headers["x-kept"], "yes");
    assert_eq!(headers["content-type"], "text/plain");
    assert_eq!(r.text().await.unwrap(), "ok");
}
