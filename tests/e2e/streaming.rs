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
    let log = lk.access_log();
    let download = log
        .iter()
        .find(|l| l["path"] == format!("/bytes/{SIZE}"))
        .unwrap();
    assert_eq!(download["bytes_out"], SIZE);
    let upload = log.iter().find(|l| l["path"] == "/upload").unwrap();
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
