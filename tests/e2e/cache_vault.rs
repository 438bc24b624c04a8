//! The secret cache against a real OpenBao: one read for a cold burst, negative caching, key
//! rotation taking effect after the TTL, stale serving while Vault is down (bounded by
//! `max_stale`), Vault traffic ignoring `HTTP(S)_PROXY`, and the access log's fields.

use std::time::{Duration, Instant};

use crate::errors::{client_toml, send, Answer};
use crate::support::*;

/// The access-log lines of `connection`, waiting (bounded) until there are at least `n`: a
/// line is written when the response body has ended, which may be just after the client saw
/// it.
async fn access_lines(lk: &Latchkey, connection: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<_> = lk
            .access_log()
            .into_iter()
            .filter(|l| l["connection"] == connection)
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            assert!(
                lines.len() >= n,
                "{} access lines for {connection}, wanted {n}:\n{}",
                lines.len(),
                lk.output()
            );
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `Authorization` header the echo upstream received, from a gateway answer.
fn injected(r: &Echoed) -> String {
    assert_eq!(r.status, 200, "{:?}", r.json);
    r.header("authorization")
        .unwrap_or_else(|| panic!("no Authorization reached the upstream: {:?}", r.json))
}

/// Sends 200 concurrent requests on the cold connection `id` (released together) and checks
/// that each got `key` injected and that all of them together cost one Vault read.
async fn cold_burst(bao: &Bao, lk: &Latchkey, up: &EchoServer, id: &str, key: &str) {
    assert_eq!(bao.reads_of(id), 0);
    let upstream_before = up.requests();
    let client = http();
    let mut tasks = tokio::task::JoinSet::new();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(200));
    for i in 0..200 {
        let req = client.get(lk.url(&format!("/{id}/v1/n/{i}")));
        let barrier = barrier.clone();
        tasks.spawn(async move {
            barrier.wait().await;
            (i, read(req.send().await.unwrap()).await)
        });
    }
    let mut ok = 0;
    while let Some(done) = tasks.join_next().await {
        let (i, r) = done.unwrap();
        assert_eq!(injected(&r), format!("Bearer {key}"), "request {i}");
        assert_eq!(r.uri(), format!("/v1/n/{i}"));
        ok += 1;
    }
    assert_eq!(ok, 200);
    assert_eq!(up.requests() - upstream_before, 200);

    // Every request was logged once, as a miss (sharing the one read) or a hit, none an error.
    let lines = access_lines(lk, id, 200).await;
    assert_eq!(lines.len(), 200);
    assert!(lines.iter().all(|l| l["status"] == 200));
    assert!(lines
        .iter()
        .all(|l| l["cache"] == "miss" || l["cache"] == "hit"));
    let misses = lines.iter().filter(|l| l["cache"] == "miss").count();
    let loads = lk
        .output()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "connection loaded" && v["connection"] == id)
        .count();
    assert_eq!(
        bao.reads_of(id),
        1,
        "a cold burst on {id} cost more than one Vault read ({loads} loads in latchkey's log; \
         {misses} of 200 requests were misses)"
    );
    assert_eq!(loads, 1);
}

#[tokio::test]
async fn a_cold_burst_of_200_requests_costs_one_vault_read() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "burst", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    cold_burst(&bao, &lk, &up, "burst", &key).await;
}

/// The same, on ten cold connections one after another: a race between a load finishing and a
/// late miss joining it has ten chances to show.
#[tokio::test]
async fn cold_bursts_on_ten_connections_cost_one_read_each() {
    let bao = Bao::start().await;
    let up = echo().await;
    let keys: Vec<(String, String)> = (0..10)
        .map(|n| {
            let id = format!("burst-{n}");
            let key = put_bearer(&bao, &id, &format!("http://{}", up.addr()));
            (id, key)
        })
        .collect();
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    for (id, key) in &keys {
        cold_burst(&bao, &lk, &up, id, key).await;
    }
}

#[tokio::test]
async fn unknown_connections_are_negatively_cached() {
    let bao = Bao::start().await;
    let up = echo().await;
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().extra("[cache]\nnegative_ttl = \"3s\"\n"),
    )
    .await;

    let first = gateway_get(&lk, "/later/v1/x", &[]).await;
    assert_eq!(first.status, 404);
    assert_eq!(
        first.latchkey_error.as_deref(),
        Some("connection_not_found")
    );
    let second = gateway_get(&lk, "/later/v1/x", &[]).await;
    assert_eq!(second.status, 404);
    assert_eq!(second.error_code(), Some("connection_not_found"));
    assert_eq!(
        bao.reads_of("later"),
        1,
        "the second lookup asked Vault again"
    );
    let lines = access_lines(&lk, "later", 2).await;
    assert_eq!(lines[0]["cache"], "miss");
    assert_eq!(lines[1]["cache"], "negative");

    // Created meanwhile: within negative_ttl it is still unknown to latchkey ...
    let key = put_bearer(&bao, "later", &format!("http://{}", up.addr()));
    let third = gateway_get(&lk, "/later/v1/x", &[]).await;
    assert_eq!(third.status, 404);
    assert_eq!(bao.reads_of("later"), 1);
    // ... and once it has passed, it is read and used.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let r = gateway_get(&lk, "/later/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {key}"));
    assert_eq!(bao.reads_of("later"), 2);
}

#[tokio::test]
async fn a_key_rotated_in_vault_is_in_use_after_the_ttl() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    let old = put_bearer(&bao, "rotating", &base);
    // TTL 3s: latchkey refreshes ahead of expiry (at 80%), so the rotation (a `bao` CLI run)
    // and the next request must both fit well within 2.4s for "still the old key" to hold.
    let lk = Latchkey::start(&bao, Opts::loopback().extra("[cache]\nttl = \"3s\"\n")).await;

    let r = gateway_get(&lk, "/rotating/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {old}"));
    let new = format!("key_rotated_{}", free_port());
    bao.put(
        "rotating",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &base),
            ("api_key", &new),
        ],
    );
    let rotated = Instant::now();
    // Straight after the rotation the cached key is still in use; Vault was not asked again.
    let r = gateway_get(&lk, "/rotating/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {old}"));
    assert_eq!(bao.reads_of("rotating"), 1);

    // Once the TTL has passed since the rotation, the new key is the one injected.
    tokio::time::sleep(Duration::from_millis(3500).saturating_sub(rotated.elapsed())).await;
    let r = gateway_get(&lk, "/rotating/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {new}"));
    assert!(bao.reads_of("rotating") >= 2);
}

/// A connection used once and then left idle: its entry ages past the TTL while Vault is up.
/// A key rotated in Vault must still be the one in use once the TTL has passed since the
/// rotation: an entry past its TTL is served stale only while Vault is unreachable.
#[tokio::test]
async fn a_key_rotated_while_the_connection_is_idle_is_in_use_after_the_ttl() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    let old = put_bearer(&bao, "idle", &base);
    let lk = Latchkey::start(&bao, Opts::loopback().extra("[cache]\nttl = \"2s\"\n")).await;

    let r = gateway_get(&lk, "/idle/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {old}"));
    // latchkey may refresh the entry ahead of expiry on its own; let that happen first, so
    // that the rotation below comes after whatever it has read.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let reads_before = bao.reads_of("idle");

    let new = format!("key_rotated_{}", free_port());
    bao.put(
        "idle",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &base),
            ("api_key", &new),
        ],
    );
    let rotated = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(rotated.elapsed())).await;
    let r = gateway_get(&lk, "/idle/v1/x", &[]).await;
    let lines = access_lines(&lk, "idle", 2).await;
    assert_eq!(
        injected(&r),
        format!("Bearer {new}"),
        "the key rotated {:?} ago (TTL 2s) is not in use; Vault reads before/after the \
         rotation: {reads_before}/{}; the request's cache outcome: {}",
        rotated.elapsed(),
        bao.reads_of("idle"),
        lines[1]["cache"]
    );
}

#[tokio::test]
async fn with_vault_down_a_cached_connection_serves_stale_until_max_stale() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "stale", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().extra("[cache]\nttl = \"2s\"\nmax_stale = \"4s\"\n"),
    )
    .await;

    let r = gateway_get(&lk, "/stale/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {key}"));
    let loaded = Instant::now();
    bao.freeze();

    // Within the TTL: a hit, Vault is not needed.
    let r = gateway_get(&lk, "/stale/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {key}"));

    // Past the TTL, Vault still down: served stale.
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(loaded.elapsed())).await;
    let r = gateway_get(&lk, "/stale/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {key}"));
    let lines = access_lines(&lk, "stale", 3).await;
    assert_eq!(lines[0]["cache"], "miss");
    assert_eq!(lines[1]["cache"], "hit");
    assert_eq!(lines[2]["cache"], "stale", "{}", lines[2]);
    assert_eq!(lines[2]["status"], 200);

    // Past ttl + max_stale: nothing usable is cached any more.
    tokio::time::sleep(Duration::from_millis(6500).saturating_sub(loaded.elapsed())).await;
    let r = gateway_get(&lk, "/stale/v1/x", &[]).await;
    bao.thaw();
    assert_eq!(r.status, 503, "{:?}", r.json);
    assert_eq!(
        r.latchkey_error.as_deref(),
        Some("secret_store_unavailable")
    );
    assert_eq!(r.error_code(), Some("secret_store_unavailable"));
    // One request went upstream per 200 above, none for the 503.
    assert_eq!(up.requests(), 3);

    // Vault back: the connection is read again and works.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = gateway_get(&lk, "/stale/v1/x", &[]).await;
        if r.status == 200 {
            assert_eq!(injected(&r), format!("Bearer {key}"));
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {:?}", r.json);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn vault_traffic_ignores_http_proxy_variables() {
    // The harness starts latchkey with HTTP_PROXY, HTTPS_PROXY, their lower-case forms and
    // ALL_PROXY at 127.0.0.1:9. Nothing listens there, so Vault calls through it would fail.
    assert!(
        std::net::TcpStream::connect_timeout(
            &"127.0.0.1:9".parse().unwrap(),
            Duration::from_secs(1)
        )
        .is_err(),
        "something listens on 127.0.0.1:9; this test cannot tell direct from proxied"
    );
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "direct", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    let r = gateway_get(&lk, "/direct/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {key}"));
    assert_eq!(bao.reads_of("direct"), 1, "the read did not reach OpenBao");
    // The token lookup behind /readyz goes direct too.
    let ready = http()
        .get(lk.admin_url("/readyz"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(ready, 200);
}

#[tokio::test]
async fn the_access_log_line_has_every_field() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "logged", &format!("http://{}", up.addr()));
    let token = "client-token-logged-0123456789ab";
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().extra(&client_toml("billing", token, &["logged"])),
    )
    .await;

    let body = "hello world, 31 bytes of body!!";
    assert_eq!(body.len(), 31);
    let first: Answer = send(
        http()
            .post(lk.url("/logged/v1/charges?limit=3"))
            .header("Proxy-Authorization", format!("Bearer {token}"))
            .body(body),
    )
    .await;
    assert_eq!(first.status, 200, "{first:#?}");
    assert!(first.body.contains(&format!("Bearer {key}")));
    let second = send(
        http()
            .get(lk.url("/logged/bytes/1000"))
            .header("Proxy-Authorization", format!("Bearer {token}")),
    )
    .await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body.len(), 1000);

    let lines = access_lines(&lk, "logged", 2).await;
    let (a, b) = (&lines[0], &lines[1]);
    let host = up.addr().ip().to_string();

    assert_eq!(a["connection"], "logged");
    assert_eq!(a["client"], "billing");
    assert_eq!(a["method"], "POST");
    assert_eq!(a["host"], host.as_str());
    assert_eq!(a["path"], "/v1/charges?limit=3");
    assert_eq!(a["status"], 200);
    assert_eq!(a["form"], "gateway");
    assert_eq!(a["cache"], "miss");
    assert_eq!(a["bytes_in"], 31);
    assert_eq!(a["bytes_out"], first.body.len() as u64);
    assert!(a["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{a}");

    assert_eq!(b["connection"], "logged");
    assert_eq!(b["client"], "billing");
    assert_eq!(b["method"], "GET");
    assert_eq!(b["host"], host.as_str());
    assert_eq!(b["path"], "/bytes/1000");
    assert_eq!(b["status"], 200);
    assert_eq!(b["cache"], "hit");
    assert_eq!(b["bytes_in"], 0);
    assert_eq!(b["bytes_out"], 1000);
    assert!(b["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{b}");

    // A refused request is logged too, with its error code.
    let refused = send(http().get(lk.url("/logged/v1/x"))).await;
    refused.assert_error(407, "proxy_auth_required");
    let lines = access_lines(&lk, "logged", 3).await;
    assert_eq!(lines[2]["status"], 407);
    assert_eq!(lines[2]["error"], "proxy_auth_required");
    assert_eq!(lines[2]["client"], "-");
}
