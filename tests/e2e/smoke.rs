use crate::support::*;

#[tokio::test]
async fn gateway_and_forward_inject_a_bearer_key() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "smoke", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    let r = gateway_get(
        &lk,
        "/smoke/v1/things?limit=3",
        &[("Authorization", "Bearer theirs")],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.header("authorization").unwrap(), format!("Bearer {key}"));
    assert_eq!(r.uri(), "/v1/things?limit=3");

    let (status, text) = curl(&[
        "-x",
        &lk.url(""),
        "--proxy-user",
        "smoke:anything",
        &format!("http://{}/forward?x=1", up.addr()),
    ])
    .await;
    assert_eq!(status, 200, "{text}");
    let json = body_json(&text);
    assert_eq!(json["uri"], "/forward?x=1");
    assert_eq!(bao.reads_of("smoke"), 1);
}
