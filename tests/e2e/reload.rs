//! SIGHUP (PRODUCT.md section 7): the file is read again; clients, connectors, cache and TLS
//! settings change under load without a failed request; a file that does not check changes
//! nothing and the log says which key and why; what needs a restart is named in a warning.

use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::errors::{client_toml, metrics_text};
use crate::support::*;

/// How many reloads latchkey has finished (applied or refused), by its log.
fn reloads(lk: &Latchkey) -> Vec<serde_json::Value> {
    lk.output()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["message"] == "configuration reloaded"
                || v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("configuration reload refused"))
        })
        .collect()
}

/// Sends SIGHUP and waits until latchkey has logged the outcome; returns that line.
async fn hangup(lk: &Latchkey) -> serde_json::Value {
    let before = reloads(lk).len();
    lk.hangup();
    wait_until("the reload to be logged", Duration::from_secs(30), || {
        std::future::ready(reloads(lk).get(before).cloned())
    })
    .await
}

/// The value of the sample `line` (a metric name with its labels) in latchkey's metrics.
async fn sample(lk: &Latchkey, line: &str) -> Option<f64> {
    let text = metrics_text(lk).await;
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// An operator connector `id` that puts the key in `X-Acme-Key`, as `value` says.
fn acme(id: &str, value: &str) -> String {
    format!("[connectors.{id}]\ninject = {{ scheme = \"header\", header = \"X-Acme-Key\", value = \"{value}\" }}\n")
}

#[tokio::test]
async fn sighup_adds_a_client_and_a_connector_under_load_without_a_failed_request() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    let (alpha, beta) = ("alpha-token-0123456789", "beta-token-0123456789");
    bao.secrets.add(alpha);
    bao.secrets.add(beta);
    put_bearer(&bao, "steady", &base);
    let acme_key = format!("acme_{}", free_port());
    // Two connections on operator connectors: `acme-v1` changes its header value at the
    // reload; `acme-v2` exists only after it.
    bao.put(
        "changed",
        &[
            ("connector", "acme-v1"),
            ("base_url", &base),
            ("api_key", &acme_key),
        ],
    );
    bao.put(
        "added",
        &[
            ("connector", "acme-v2"),
            ("base_url", &base),
            ("api_key", &acme_key),
        ],
    );
    let before = Opts::loopback()
        .extra(&client_toml(
            "alpha",
            alpha,
            &["steady", "changed", "added"],
        ))
        .extra(&acme("acme-v1", "v1 {api_key}"));
    let lk = Latchkey::start(&bao, before.clone()).await;

    let get = |path: &str, token: &str| {
        http()
            .get(lk.url(path))
            .header("proxy-authorization", bearer(token))
    };
    let r = read(get("/changed/x", alpha).send().await.unwrap()).await;
    assert_eq!(r.header("x-acme-key"), Some(format!("v1 {acme_key}")));
    // Not yet: beta is no client, acme-v2 no connector (and that answer is cached).
    let r = read(get("/added/x", beta).send().await.unwrap()).await;
    assert_eq!(r.status, 407, "{:?}", r.json);
    let r = read(get("/added/x", alpha).send().await.unwrap()).await;
    assert_eq!(r.status, 500, "{:?}", r.json);
    assert_eq!(r.latchkey_error.as_deref(), Some("connection_invalid"));

    // Steady load: four keep-alive clients on the steady connection.
    let url = lk.url("/steady/load");
    let load = SteadyLoad::start(4, move |client, c, n| {
        client
            .get(format!("{url}/{c}/{n}"))
            .header("proxy-authorization", bearer(alpha))
    });
    load.more(100).await;

    // The reload: a client and a connector added, a connector changed.
    let after = Opts::loopback()
        .extra(&client_toml(
            "alpha",
            alpha,
            &["steady", "changed", "added"],
        ))
        .extra(&client_toml("beta", beta, &["added"]))
        .extra(&acme("acme-v1", "v1b {api_key}"))
        .extra(&acme("acme-v2", "v2 {api_key}"));
    let first_file = lk.config();
    let second_file = first_file.replace(&before.extra, &after.extra);
    assert_ne!(first_file, second_file);
    lk.write_config(&second_file);
    let line = hangup(&lk).await;
    assert_eq!(line["message"], "configuration reloaded", "{line}");
    load.more(100).await;

    let r = read(get("/added/x", beta).send().await.unwrap()).await;
    assert_eq!(
        r.status, 200,
        "the new client on the new connector: {:?}",
        r.json
    );
    assert_eq!(r.header("x-acme-key"), Some(format!("v2 {acme_key}")));
    // The changed connector's cached connection was rebuilt.
    let r = read(get("/changed/x", alpha).send().await.unwrap()).await;
    assert_eq!(r.header("x-acme-key"), Some(format!("v1b {acme_key}")));
    // The admin API reads the same catalog.
    let connectors = http()
        .get(lk.admin_url("/v1/connectors"))
        .header("authorization", bearer(ADMIN_TOKEN))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(connectors.contains("\"acme-v2\""), "{connectors}");

    // A file that does not check: refused, the key named, nothing changed.
    lk.write_config(&format!("{second_file}\n[cache]\nttl = \"5 parsecs\"\n"));
    let line = hangup(&lk).await;
    assert!(
        line["message"]
            .as_str()
            .unwrap()
            .starts_with("configuration reload refused"),
        "{line}"
    );
    assert_eq!(line["key"], "cache.ttl", "{line}");
    assert!(
        line["reason"].as_str().unwrap().contains("not a duration"),
        "{line}"
    );
    load.more(100).await;
    let r = read(get("/added/x", beta).send().await.unwrap()).await;
    assert_eq!(r.status, 200, "still the reloaded clients: {:?}", r.json);
    assert_eq!(r.header("x-acme-key"), Some(format!("v2 {acme_key}")));
    assert_eq!(
        sample(&lk, "latchkey_config_reloads_total{outcome=\"failed\"}").await,
        Some(1.0)
    );
    assert_eq!(
        sample(&lk, "latchkey_config_reloads_total{outcome=\"ok\"}").await,
        Some(1.0)
    );

    let (ok, failed) = load.stop().await;
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), failed);
    assert!(ok >= 300, "{ok}");
    // Every request of the load reached the upstream with the steady key.
    let lines = lk.access_lines(ok, |l| l["connection"] == "steady").await;
    assert!(lines.iter().all(|l| l["status"] == 200));
}

#[tokio::test]
async fn sighup_changing_cache_ttl_takes_effect_and_a_new_listen_address_waits_for_a_restart() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    let old = put_bearer(&bao, "ttl", &base);
    let lk = Latchkey::start(&bao, Opts::loopback().extra("[cache]\nttl = \"1h\"\n")).await;
    let r = gateway_get(&lk, "/ttl/x", &[]).await;
    assert_eq!(r.header("authorization"), Some(format!("Bearer {old}")));

    // Rotated in Vault: with a TTL of an hour the cached key stays in use.
    let new = format!("key_rotated_{}", free_port());
    bao.put(
        "ttl",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &base),
            ("api_key", &new),
        ],
    );
    let r = gateway_get(&lk, "/ttl/y", &[]).await;
    assert_eq!(r.header("authorization"), Some(format!("Bearer {old}")));

    // cache.ttl becomes 1s, and the proxy listener another address.
    let elsewhere = free_port();
    let text = lk
        .config()
        .replace("[cache]\nttl = \"1h\"", "[cache]\nttl = \"1s\"")
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{elsewhere}\""),
            1,
        );
    assert!(text.contains("ttl = \"1s\"") && text.contains(&elsewhere.to_string()));
    lk.write_config(&text);
    let line = hangup(&lk).await;
    assert_eq!(line["message"], "configuration reloaded", "{line}");
    let warned = lk
        .output_line("warning that a key needs a restart", |l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v["level"] == "WARN" && v["message"].as_str().is_some_and(|m| m.contains("restart"))
            })
        })
        .await;
    let warned: serde_json::Value = serde_json::from_str(&warned).unwrap();
    assert_eq!(warned["keys"], "proxy.listen", "{warned}");

    // The new TTL: the rotated key is in use once the old entry is a second old.
    wait_until(
        "the rotated key, with ttl = 1s",
        Duration::from_secs(30),
        || async {
            let r = gateway_get(&lk, "/ttl/z", &[]).await;
            (r.header("authorization") == Some(format!("Bearer {new}"))).then_some(())
        },
    )
    .await;
    // Still where it started, and not at the new address.
    assert!(std::net::TcpStream::connect(("127.0.0.1", elsewhere)).is_err());
}

/// A plain-HTTP tunnel through latchkey to `target`, opened as `connection` with `token`.
async fn open_tunnel(
    lk: &Latchkey,
    target: &str,
    connection: &str,
    token: &str,
) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(lk.proxy).await.unwrap();
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("{connection}:{token}"));
    stream
        .write_all(
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {creds}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "closed during the CONNECT"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream
}

/// A client removed by a reload can no longer use a tunnel it opened before: every request
/// inside a tunnel is held to the clients in force, not to those of its CONNECT.
#[tokio::test]
async fn a_client_removed_by_a_reload_can_no_longer_use_the_tunnel_it_opened_before() {
    let bao = Bao::start().await;
    let up = echo().await;
    let target = up.addr().to_string();
    put_bearer(&bao, "plain", &format!("http://{target}"));
    // The tunnel form needs latchkey's CA configured, even for a tunnel that turns out plain.
    let ca = crate::tunnel::Ca::init().await;
    let (kept, removed) = ("kept-token-0123456789", "removed-token-0123456789");
    bao.secrets.add(kept);
    bao.secrets.add(removed);
    let removed_client = client_toml("removed", removed, &["plain"]);
    let lk = Latchkey::start(
        &bao,
        Opts::loopback()
            .tls(&format!("ca_cert = {:?}", ca.cert.display().to_string()))
            .tls(&format!("ca_key = {:?}", ca.key.display().to_string()))
            .extra(&client_toml("kept", kept, &["plain"]))
            .extra(&removed_client),
    )
    .await;

    let mut tunnel = open_tunnel(&lk, &target, "plain", removed).await;
    assert_eq!(
        crate::shutdown::exchange(&mut tunnel, &target, "/before").await,
        200
    );

    let text = lk.config().replace(&removed_client, "");
    assert!(!text.contains("removed"));
    lk.write_config(&text);
    let line = hangup(&lk).await;
    assert_eq!(line["message"], "configuration reloaded", "{line}");

    assert_eq!(
        crate::shutdown::exchange(&mut tunnel, &target, "/after").await,
        407
    );
    let mut other = open_tunnel(&lk, &target, "plain", kept).await;
    assert_eq!(
        crate::shutdown::exchange(&mut other, &target, "/kept").await,
        200
    );
    assert_eq!(up.requests(), 2, "/after never reached the upstream");
}
