//! Bodies stream both ways without being buffered whole, and the gateway speaks h2 to clients
//! that use it. (Memory while streaming 1 GiB is measured by the benchmarks, not asserted here.)

use futures_util::StreamExt;

use crate::support::*;

const SIZE: u64 = 64 * 1024 * 1024;

#[tokio::test]
async fn large_bodies_stream_through_in_both_directions() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "big", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    // Download: counted as it arrives.
    let resp = http()
        .get(lk.url(&format!("/big/bytes/{SIZE}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut got = 0u64;
    let mut chunks = 0u64;
    while let Some(chunk) = stream.next().await {
        got += chunk.unwrap().len() as u64;
        chunks += 1;
    }
    assert_eq!(got, SIZE);
    assert!(chunks > 1, "the body arrived in one piece");

    // Upload: a streamed body with no length (chunked), generated as it is sent.
    let frames = futures_util::stream::iter(0..(SIZE / 65536))
        .map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 65536])));
    let r = read(
        http()
            .post(lk.url("/big/upload"))
            .body(reqwest::Body::wrap_stream(frames))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["body_bytes"], SIZE);
    // No length was known, so hyper framed the forwarded body itself.
    assert_eq!(r.header("transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(r.header("content-length"), None);

    // The access log counts what went each way.
    let download = lk
        .access_line(|l| l["path"] == format!("/bytes/{SIZE}"))
        .await;
    assert_eq!(download["bytes_out"], SIZE);
    let upload = lk.access_line(|l| l["path"] == "/upload").await;
    assert_eq!(upload["bytes_in"], SIZE);
}

#[tokio::test]
async fn a_known_length_upload_keeps_its_length() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "sized", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let r = read(
        http()
            .put(lk.url("/sized/put"))
            .body(vec![b'z'; 12345])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["body_bytes"], 12345);
    assert_eq!(r.header("content-length").as_deref(), Some("12345"));
    assert_eq!(r.header("transfer-encoding"), None);
}

#[tokio::test]
async fn gateway_serves_h2_clients() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "h2c", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = client.get(lk.url("/h2c/v1/x?q=1")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let r = read(resp).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.uri(), "/v1/x?q=1");
    assert_eq!(r.header("authorization").unwrap(), format!("Bearer {key}"));
}

/// An upstream that proves bodies flow before they end. `GET` answers 128 KiB: the first half
/// at once, the second only when `release` fires. `POST` reads the upload and fires
/// `first_half` once 64 KiB of it have arrived, then answers with the total length.
struct Holding {
    addr: std::net::SocketAddr,
    release: tokio::sync::Notify,
    first_half: tokio::sync::Notify,
}

const HALF: usize = 64 * 1024;

async fn holding_upstream() -> std::sync::Arc<Holding> {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = std::sync::Arc::new(Holding {
        addr: listener.local_addr().unwrap(),
        release: tokio::sync::Notify::new(),
        first_half: tokio::sync::Notify::new(),
    });
    let state = h.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let state = state.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            if req.method() == http::Method::GET {
                                let (tx, rx) = tokio::sync::mpsc::channel::<
                                    Result<Frame<bytes::Bytes>, std::convert::Infallible>,
                                >(2);
                                tokio::spawn(async move {
                                    let _ = tx
                                        .send(Ok(Frame::data(bytes::Bytes::from(vec![b'a'; HALF]))))
                                        .await;
                                    state.release.notified().await;
                                    let _ = tx
                                        .send(Ok(Frame::data(bytes::Bytes::from(vec![b'b'; HALF]))))
                                        .await;
                                });
                                let body = StreamBody::new(tokio_stream_from(rx)).boxed_unsync();
                                let mut resp = http::Response::new(body);
                                resp.headers_mut()
                                    .insert("content-length", (2 * HALF).into());
                                return Ok::<_, std::convert::Infallible>(resp);
                            }
                            let mut body = req.into_body();
                            let mut got = 0usize;
                            let mut told = false;
                            while let Some(frame) = body.frame().await {
                                if let Ok(data) = frame.unwrap().into_data() {
                                    got += data.len();
                                }
                                if got >= HALF && !told {
                                    state.first_half.notify_one();
                                    told = true;
                                }
                            }
                            let text =
                                http_body_util::Full::new(bytes::Bytes::from(got.to_string()))
                                    .map_err(|never| match never {})
                                    .boxed_unsync();
                            Ok(http::Response::new(text))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    h
}

/// An mpsc receiver as a stream of frames.
fn tokio_stream_from<T>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}

#[tokio::test]
async fn bodies_flow_before_they_end_in_both_directions() {
    let bao = Bao::start().await;
    let up = holding_upstream().await;
    put_bearer(&bao, "flow", &format!("http://{}", up.addr));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let wait = std::time::Duration::from_secs(20);

    // Download: the first half reaches the client while the upstream still holds the second;
    // all of it but a tail that could begin a form of the key (held back by the scrubber until
    // the next bytes show whether it does; PRODUCT.md section 4, step 7).
    let resp = http().get(lk.url("/flow/file")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut got = 0usize;
    tokio::time::timeout(wait, async {
        while got < HALF - 256 {
            got += stream.next().await.unwrap().unwrap().len();
        }
    })
    .await
    .expect("the first half of the answer did not arrive while the upstream held the rest");
    assert!(
        got <= HALF,
        "more than the first half arrived before it was released"
    );
    up.release.notify_one();
    while let Some(chunk) = stream.next().await {
        got += chunk.unwrap().len();
    }
    assert_eq!(got, 2 * HALF);

    // Upload: the upstream has the first half before the client has sent the second.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let url = lk.url("/flow/upload");
    let upload =
        tokio::spawn(async move { http().post(url).body(body).send().await?.text().await });
    tx.send(Ok(vec![b'c'; HALF])).await.unwrap();
    tokio::time::timeout(wait, up.first_half.notified())
        .await
        .expect("the upstream did not get the first half before the client sent the rest");
    tx.send(Ok(vec![b'd'; HALF])).await.unwrap();
    drop(tx);
    assert_eq!(upload.await.unwrap().unwrap(), (2 * HALF).to_string());
}
