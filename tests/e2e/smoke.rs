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

    // The setting LATCHKEY_E2E_PROXY asks for (scripts/test's second run) is the one latchkey
    // runs with: its "listening" line says how it serves HTTP/1.1.
    let want = std::env::var("LATCHKEY_E2E_PROXY")
        .is_ok_and(|p| p.replace(' ', "").contains("idle_release=true"));
    let out = lk.output();
    let line = out
        .lines()
        .find(|l| l.contains("listening"))
        .unwrap_or_else(|| panic!("no listening line: {out}"));
    assert!(
        line.contains(&format!("idle_release={want}"))
            || line.contains(&format!("\"idle_release\":{want}")),
        "{line}"
    );
}
