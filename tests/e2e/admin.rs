//! The admin listener: `/healthz`, `/readyz` (Vault reachable and the token accepted),
//! `/metrics` (Prometheus text, no credential in it) and `/v1/connectors` behind the admin token.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;

use crate::errors::{send, Answer};
use crate::support::*;

async fn admin_get(lk: &Latchkey, path: &str) -> Answer {
    send(http().get(lk.admin_url(path))).await
}

/// One sample of Prometheus text: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses Prometheus text exposition, failing on any line that is not a comment, a blank or a
/// `name{label="value",...} number` sample.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim_start();
            assert!(
                comment.starts_with("TYPE ") || comment.starts_with("HELP "),
                "odd comment line: {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("not a number in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                let mut labels = BTreeMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label in {line:?}"));
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
        };
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The sum of the samples of `name` whose labels include `labels`.
fn total(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

fn has(samples: &[Sample], name: &str) -> bool {
    samples.iter().any(|s| s.name == name)
}

#[tokio::test]
async fn healthz_answers_200() {
    let bao = Bao::start().await;
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let r = admin_get(&lk, "/healthz").await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(r.json()["status"], "ok");
    // The admin listener is not the proxy: the proxy has no /healthz of its own.
    let r = send(http().get(lk.url("/healthz"))).await;
    assert_ne!(r.status, 200);
}

/// `/healthz` does not wait for Vault: with every Vault address accepting connections and never
/// answering, it answers as soon as the listeners are open, while the start-up check of Vault
/// (2 s per address here) is still unanswered.
#[tokio::test]
async fn healthz_answers_while_the_start_up_check_of_a_hung_vault_waits() {
    let bao = Bao::start().await;
    // Listeners that never accept: the kernel completes each connection, nobody reads it.
    let holes: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let opts = Opts {
        vault_addresses: holes
            .iter()
            .map(|h| format!("http://{}", h.local_addr().unwrap()))
            .collect(),
        ..Opts::loopback()
    };
    let lk = Latchkey::start(&bao, opts).await;
    let r = admin_get(&lk, "/healthz").await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert!(
        !lk.output().contains("vault check failed at start"),
        "/healthz waited for the check of Vault:\n{}",
        lk.output()
    );
    // The check does end, and says so.
    lk.output_line("the failed start-up check", |l| {
        l.contains("vault check failed at start")
    })
    .await;
    drop(holes);
}

/// `/readyz` asks Vault, but many at once share one check: 200 concurrent hits cost far
/// fewer than 200 token lookups.
#[tokio::test]
async fn concurrent_readyz_share_their_checks_of_vault() {
    let bao = Bao::start().await;
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let lookups = |text: &str| -> u64 {
        text.lines()
            .filter(|l| {
                l.starts_with("latchkey_vault_requests_total{") && l.contains("op=\"lookup_self\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = lookups(&crate::errors::metrics_text(&lk).await);
    let answers = futures_util::future::join_all(
        (0..200).map(|_| async { admin_get(&lk, "/readyz").await.status }),
    )
    .await;
    assert!(answers.iter().all(|&s| s == 200), "{answers:?}");
    let asked = lookups(&crate::errors::metrics_text(&lk).await) - before;
    assert!(
        (1..=50).contains(&asked),
        "200 concurrent /readyz asked Vault for the token {asked} times"
    );
}

/// Every admin endpoint answers HEAD as its GET without the body (load balancers check with
/// HEAD), and a method it does not take with 405 and the methods it takes in `Allow`.
#[tokio::test]
async fn head_is_served_and_other_methods_are_405_with_allow() {
    let bao = Bao::start().await;
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let url = |p: &str| format!("http://{}{p}", lk.admin);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/connectors",
        "/v1/connections",
    ] {
        let r = send(http().head(url(path)).header("authorization", &auth)).await;
        assert_eq!(r.status, 200, "HEAD {path}: {r:#?}");
        assert!(r.body.is_empty(), "HEAD {path}: {r:#?}");
    }
    for (method, path, allow) in [
        (http::Method::POST, "/healthz", "GET, HEAD"),
        (http::Method::DELETE, "/metrics", "GET, HEAD"),
        (http::Method::PUT, "/readyz", "GET, HEAD"),
        (http::Method::POST, "/ca.pem", "GET, HEAD"),
        (http::Method::DELETE, "/v1/connectors", "GET, HEAD"),
        (http::Method::PUT, "/v1/connections", "GET, HEAD, POST"),
        (
            http::Method::POST,
            "/v1/connections/x",
            "GET, HEAD, PATCH, DELETE",
        ),
        (http::Method::GET, "/v1/connections/x/secret", "PUT"),
        (http::Method::GET, "/v1/connections/x/verify", "POST"),
        // The web page's files.
        (http::Method::POST, "/", "GET, HEAD"),
        (http::Method::DELETE, "/index.html", "GET, HEAD"),
        (http::Method::PUT, "/app.js", "GET, HEAD"),
    ] {
        let r = send(
            http()
                .request(method.clone(), url(path))
                .header("authorization", &auth),
        )
        .await;
        assert_eq!(r.status, 405, "{method} {path}: {r:#?}");
        assert_eq!(r.json()["error"]["code"], "method_not_allowed", "{r:#?}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}: {r:#?}");
    }
    // A path that is no endpoint is still 404.
    let r = send(http().post(url("/nothing-here"))).await;
    assert_eq!(r.status, 404, "{r:#?}");
}

#[tokio::test]
async fn readyz_follows_vault() {
    let bao = Bao::start_own().await;
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let r = admin_get(&lk, "/readyz").await;
    assert_eq!(r.status, 200, "{r:#?}");

    // Vault frozen: it accepts connections and never answers; the 2s timeout makes it not
    // ready. Alive all the same.
    bao.freeze().await;
    let not_ready = admin_get(&lk, "/readyz").await;
    let alive = admin_get(&lk, "/healthz").await;
    bao.thaw();
    assert_eq!(not_ready.status, 503, "{not_ready:#?}");
    assert!(
        not_ready.json()["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{not_ready:#?}"
    );
    assert_eq!(alive.status, 200);

    // Thawed, ready again.
    wait_until(
        "/readyz to answer 200 again",
        Duration::from_secs(30),
        || async { (admin_get(&lk, "/readyz").await.status == 200).then_some(()) },
    )
    .await;
}

/// A `vault.mount` that is not there, or not KV version 2, is not ready (and says which): it
/// looked ready while every connection read as not found.
#[tokio::test]
async fn readyz_is_503_when_the_mount_is_missing_or_not_kv_version_2() {
    let bao = Bao::start().await;
    let mount = format!("kv1-{}", free_port());
    bao.cli_ok(&[
        "secrets",
        "enable",
        &format!("-path={mount}"),
        "-version=1",
        "kv",
    ]);
    for (mount, says) in [
        (mount.as_str(), "KV version 1"),
        ("no-such-mount", "no such mount"),
    ] {
        let lk = Latchkey::start(&bao, Opts::loopback().vault(&format!("mount = {mount:?}"))).await;
        let r = admin_get(&lk, "/readyz").await;
        assert_eq!(r.status, 503, "{mount}: {r:#?}");
        let reason = r.json()["reason"].as_str().unwrap_or_default().to_string();
        assert!(
            reason.contains(says) && reason.contains(mount),
            "{mount}: {reason}"
        );
    }
    // The default mount is ready.
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    assert_eq!(admin_get(&lk, "/readyz").await.status, 200);
}

#[tokio::test]
async fn readyz_is_503_when_vault_is_unreachable_or_refuses_the_token() {
    let bao = Bao::start().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let lk = Latchkey::start(&bao, Opts::loopback().env("VAULT_ADDR", &dead)).await;
    let r = admin_get(&lk, "/readyz").await;
    assert_eq!(r.status, 503, "{r:#?}");
    assert_eq!(admin_get(&lk, "/healthz").await.status, 200);
    drop(lk);

    // Reachable, but the token is not Vault's: not ready either.
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().env("VAULT_TOKEN", "not-a-valid-vault-token"),
    )
    .await;
    let r = admin_get(&lk, "/readyz").await;
    assert_eq!(r.status, 503, "{r:#?}");
}

#[tokio::test]
async fn metrics_cover_requests_cache_vault_and_errors_and_hold_no_key() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "metered", &format!("http://{}", up.addr()));
    let closed_key = put_bearer(&bao, "closed", &format!("http://127.0.0.1:{}", free_port()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    // A miss, then a hit; an unknown connection; an unreachable upstream.
    for _ in 0..2 {
        let r = gateway_get(&lk, "/metered/v1/x?key=1", &[]).await;
        assert_eq!(r.status, 200);
    }
    let r = gateway_get(&lk, "/nowhere/v1/x", &[]).await;
    assert_eq!(r.status, 404);
    let r = gateway_get(&lk, "/closed/v1/x", &[]).await;
    assert_eq!(r.status, 502);

    // Request metrics are recorded when the access line is written (at the body's end); wait
    // for all four lines.
    lk.access_lines(4, |_| true).await;

    let resp = http().get(lk.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = resp.text().await.unwrap();
    let samples = parse_prometheus(&text);

    for name in [
        "latchkey_requests_total",
        "latchkey_request_duration_seconds_bucket",
        "latchkey_request_duration_seconds_sum",
        "latchkey_request_duration_seconds_count",
        "latchkey_cache_lookups_total",
        "latchkey_vault_requests_total",
        "latchkey_vault_request_duration_seconds_count",
        "latchkey_errors_total",
        "latchkey_upstream_errors_total",
    ] {
        assert!(has(&samples, name), "no {name} in:\n{text}");
    }
    assert_eq!(
        total(
            &samples,
            "latchkey_requests_total",
            &[("connection", "metered"), ("status", "200")]
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        total(&samples, "latchkey_request_duration_seconds_count", &[]),
        4.0,
        "{text}"
    );
    assert!(
        total(
            &samples,
            "latchkey_cache_lookups_total",
            &[("outcome", "hit")]
        ) >= 1.0
    );
    assert!(
        total(
            &samples,
            "latchkey_cache_lookups_total",
            &[("outcome", "miss")]
        ) >= 3.0
    );
    // metered, nowhere (not found) and closed: three reads, each timed.
    assert_eq!(
        total(&samples, "latchkey_vault_requests_total", &[("op", "read")]),
        3.0,
        "{text}"
    );
    assert_eq!(
        total(
            &samples,
            "latchkey_vault_requests_total",
            &[("op", "read"), ("outcome", "not_found")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        total(
            &samples,
            "latchkey_vault_request_duration_seconds_count",
            &[("op", "read")]
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        total(
            &samples,
            "latchkey_errors_total",
            &[("code", "connection_not_found")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        total(
            &samples,
            "latchkey_errors_total",
            &[("code", "upstream_unreachable")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        total(
            &samples,
            "latchkey_upstream_errors_total",
            &[("code", "upstream_unreachable")]
        ),
        1.0,
        "{text}"
    );
    // An unknown ID labels nothing (labels stay bounded).
    assert!(!text.contains("nowhere"), "{text}");

    // No key, in any form.
    for k in [&key, &closed_key] {
        for form in [
            k.clone(),
            base64::engine::general_purpose::STANDARD.encode(k),
            base64::engine::general_purpose::STANDARD.encode(format!("{k}:")),
            base64::engine::general_purpose::STANDARD.encode(format!(":{k}")),
        ] {
            assert!(
                !text.contains(form.trim_end_matches('=')),
                "/metrics holds a key"
            );
        }
    }
}

#[tokio::test]
async fn connectors_need_the_admin_token_and_list_the_catalog_without_secrets() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "listed", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    // A connection in the cache, so that a leak would have something to leak.
    assert_eq!(gateway_get(&lk, "/listed/v1/x", &[]).await.status, 200);

    let url = lk.admin_url("/v1/connectors");
    let refused = [
        send(http().get(&url)).await,
        send(http().get(&url).bearer_auth("not-the-admin-token")).await,
        send(http().get(&url).header("Authorization", ADMIN_TOKEN)).await,
        send(http().get(&url).basic_auth("admin", Some(ADMIN_TOKEN))).await,
        // The proxy's header is not the admin's.
        send(
            http()
                .get(&url)
                .header("Proxy-Authorization", format!("Bearer {ADMIN_TOKEN}")),
        )
        .await,
    ];
    for r in &refused {
        r.assert_error(401, "unauthorized");
        assert!(!r.body.contains("stripe"), "{r:#?}");
    }

    let r = send(http().get(&url).bearer_auth(ADMIN_TOKEN)).await;
    assert_eq!(r.status, 200, "{r:#?}");
    let json = r.json();
    let list = json["connectors"]
        .as_array()
        .unwrap_or_else(|| panic!("no connector list: {json}"));
    let by_id: BTreeMap<&str, &serde_json::Value> = list
        .iter()
        .map(|c| (c["id"].as_str().unwrap_or_default(), c))
        .collect();
    for id in ["stripe", "github", "shopify", "generic-bearer"] {
        assert!(by_id.contains_key(id), "no {id} in {json}");
    }

    let stripe = by_id["stripe"];
    assert_eq!(stripe["name"], "Stripe");
    assert_eq!(stripe["base_url"], "https://api.stripe.com");
    assert_eq!(stripe["inject"]["scheme"], "bearer");
    let api_key = stripe["fields"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == "api_key"))
        .unwrap_or_else(|| panic!("stripe has no api_key field: {stripe}"));
    assert_eq!(api_key["secret"], true);

    let shopify = by_id["shopify"];
    assert!(
        shopify["base_url"]
            .as_str()
            .is_some_and(|b| b.contains("{store}")),
        "{shopify}"
    );
    let fields = shopify["fields"].as_array().unwrap();
    let store = fields
        .iter()
        .find(|f| f["name"] == "store")
        .unwrap_or_else(|| panic!("shopify has no store field: {shopify}"));
    assert_eq!(store["secret"], false);
    assert!(store["label"].as_str().is_some_and(|l| !l.is_empty()));
    assert!(fields
        .iter()
        .any(|f| f["name"] == "api_key" && f["secret"] == true));
    assert_eq!(shopify["inject"]["scheme"], "header");
    // Header names are case-insensitive; the API may show them lower-cased.
    assert!(
        shopify["inject"]["header"]
            .as_str()
            .is_some_and(|h| h.eq_ignore_ascii_case("X-Shopify-Access-Token")),
        "{shopify}"
    );

    // The catalog holds templates, never a value: no stored key, and no field carries a value.
    assert!(!r.body.contains(&key));
    for c in list {
        for f in c["fields"].as_array().into_iter().flatten() {
            assert!(f.get("value").is_none(), "a field with a value: {f}");
        }
    }
}
