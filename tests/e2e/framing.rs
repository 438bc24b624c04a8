//! Framing headers are latchkey's to write, with one exception: the answer to a `HEAD` keeps
//! the upstream's `Content-Length`, which there gives the size of the resource rather than
//! framing anything. Answers without a body (a 304) pass through and the connection carries
//! on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

/// An upstream that answers from a script, so that the exact bytes are known: `HEAD` gets a
/// 200 with `Content-Length: 5678` and no body, `GET /not-modified` a 304 with
/// `Content-Length: 1234`, anything else a 200 with `ok`. Keep-alive, one request at a time.
/// Returns its address and the count of connections it has accepted.
async fn scripted_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let answer: &[u8] = if head.starts_with("HEAD ") {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5678\r\nContent-Type: text/plain\r\n\r\n"
                    } else if head.starts_with("GET /not-modified ") {
                        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: \"v1\"\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    };
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn head_answers_keep_the_upstreams_content_length() {
    let bao = Bao::start().await;
    let (up, connections) = scripted_upstream().await;
    put_bearer(&bao, "framing", &format!("http://{up}"));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let client = http();

    let r = client.head(lk.url("/framing/file")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "5678");
    assert_eq!(r.headers()["content-type"], "text/plain");

    let r = client
        .get(lk.url("/framing/not-modified"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"], "\"v1\"");
    assert_eq!(r.bytes().await.unwrap().len(), 0);

    // The same client connection, and the same upstream connection, carry on framed as before.
    let r = client.get(lk.url("/framing/after")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "2");
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}
