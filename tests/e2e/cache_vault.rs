//! The secret cache against a real OpenBao: one read for a cold burst, negative caching, key
//! rotation taking effect after the TTL, stale serving while Vault is down (bounded by
//! `max_stale`), Vault traffic ignoring `HTTP(S)_PROXY`, and the access log's fields.

use std::cell::Cell;
use std::time::{Duration, Instant};

use crate::errors::{client_toml, send, Answer};
use crate::support::*;

/// The access-log lines of `connection`, once there are at least `n`: a line is written when
/// the response body has ended, which may be just after the client saw it.
async fn access_lines(lk: &Latchkey, connection: &str, n: usize) -> Vec<serde_json::Value> {
    lk.access_lines(n, |l| l["connection"] == connection).await
}

/// The access line of the request to `path` on `connection`.
async fn access_line(lk: &Latchkey, connection: &str, path: &str) -> serde_json::Value {
    lk.access_line(|l| l["connection"] == connection && l["path"] == path)
        .await
}

/// How many times latchkey has logged loading `connection` from Vault (the line is written
/// once the cache entry holds what was read).
fn loads(lk: &Latchkey, connection: &str) -> usize {
    lk.output()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "connection loaded" && v["connection"] == connection)
        .count()
}

/// How long a request on an expired entry waits for its re-read while Vault is healthy,
/// before it is served stale (`latchkey::cache::EXPIRED_WAIT`).
const EXPIRED_WAIT: Duration = Duration::from_millis(250);

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
    let loads = loads(lk, id);
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
    let base = format!("http://{}", up.addr());
    let negative_ttl = Duration::from_secs(3);
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().extra("[cache]\nnegative_ttl = \"3s\"\n"),
    )
    .await;

    // What holds within negative_ttl is asserted only for an attempt that provably fits in it:
    // `asked` is taken before the first lookup, so the negative entry lasts at least until
    // `asked + negative_ttl`, and anything answered before then was looked up before then. An
    // attempt that a slow machine stretched past it proves nothing; a fresh connection tries
    // again.
    let mut proven = false;
    let mut last = None;
    for attempt in 0..5 {
        let id = format!("later-{attempt}");
        let path = format!("/{id}/v1/x");
        let asked = Instant::now();
        let first = gateway_get(&lk, &path, &[]).await;
        assert_eq!(first.status, 404);
        assert_eq!(
            first.latchkey_error.as_deref(),
            Some("connection_not_found")
        );
        let second = gateway_get(&lk, &path, &[]).await;
        assert_eq!(second.status, 404);
        assert_eq!(second.error_code(), Some("connection_not_found"));
        let reads_after_second = bao.reads_of(&id);

        // Created meanwhile: within negative_ttl it is still unknown to latchkey ...
        let key = put_bearer(&bao, &id, &base);
        let third = gateway_get(&lk, &path, &[]).await;
        let reads_after_third = bao.reads_of(&id);
        if asked.elapsed() < negative_ttl {
            assert_eq!(reads_after_second, 1, "the second lookup asked Vault again");
            let lines = access_lines(&lk, &id, 2).await;
            assert_eq!(lines[0]["cache"], "miss");
            assert_eq!(lines[1]["cache"], "negative");
            assert_eq!(third.status, 404, "{:?}", third.json);
            assert_eq!(reads_after_third, 1);
            proven = true;
        } else {
            eprintln!("{id}: took longer than negative_ttl, so it proves nothing; again");
        }
        last = Some((id, key, asked));
        if proven {
            break;
        }
    }
    if !proven {
        eprintln!("no attempt fitted within negative_ttl: the machine is too slow to show it");
    }

    // ... and once it has passed, it is read and used. Polled; nothing answered before
    // negative_ttl could have passed may be anything but the remembered 404.
    let (id, key, asked) = last.unwrap();
    let path = format!("/{id}/v1/x");
    let r = wait_until(
        "the connection to be used once negative_ttl passed",
        Duration::from_secs(30),
        || async {
            let r = gateway_get(&lk, &path, &[]).await;
            if r.status == 404 {
                return None;
            }
            assert!(
                asked.elapsed() >= negative_ttl,
                "served {:?} after the first lookup, within negative_ttl: {:?}",
                asked.elapsed(),
                r.json
            );
            Some(r)
        },
    )
    .await;
    assert_eq!(injected(&r), format!("Bearer {key}"));
    assert_eq!(bao.reads_of(&id), 2);
}

#[tokio::test]
async fn a_key_rotated_in_vault_is_in_use_after_the_ttl() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    let ttl = Duration::from_secs(3);
    // latchkey re-reads an entry ahead of expiry, from 80% of the TTL on (on a request, or on
    // its own for an entry in use).
    let refresh_at = ttl.mul_f64(0.8);
    let lk = Latchkey::start(&bao, Opts::loopback().extra("[cache]\nttl = \"3s\"\n")).await;

    // Straight after the rotation (a `bao` CLI run) the cached key is still in use and Vault
    // was not asked again: asserted for an attempt whose checks all came before `refresh_at`
    // since `loaded` (taken before the load, so before latchkey could re-read anything). An
    // attempt that a slow machine stretched past it proves nothing; a fresh connection tries
    // again.
    let mut proven = false;
    let mut last = None;
    for attempt in 0..5 {
        let id = format!("rotating-{attempt}");
        let path = format!("/{id}/v1/x");
        let old = put_bearer(&bao, &id, &base);
        let loaded = Instant::now();
        let r = gateway_get(&lk, &path, &[]).await;
        assert_eq!(injected(&r), format!("Bearer {old}"));
        let new = format!("key_rotated_{}", free_port());
        bao.put(
            &id,
            &[
                ("connector", "generic-bearer"),
                ("base_url", &base),
                ("api_key", &new),
            ],
        );
        let rotated = Instant::now();
        let r = gateway_get(&lk, &path, &[]).await;
        let reads = bao.reads_of(&id);
        if loaded.elapsed() < refresh_at {
            assert_eq!(injected(&r), format!("Bearer {old}"));
            assert_eq!(
                reads,
                1,
                "{:?} after the load; latchkey's log of {id}:\n{}",
                loaded.elapsed(),
                lk.output()
                    .lines()
                    .filter(|l| l.contains(id.as_str()))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            proven = true;
        } else {
            eprintln!("{id}: took longer than 80% of the TTL, so it proves nothing; again");
        }
        last = Some((id, old, new, rotated));
        if proven {
            break;
        }
    }
    if !proven {
        eprintln!("no attempt fitted within 80% of the TTL: the machine is too slow to show it");
    }

    // Once the TTL has passed since the rotation, the new key is the one injected. Polled: a
    // request may bring it earlier (the refresh ahead of expiry reads the new key); one sent
    // after the TTL may carry the old key only served stale, when its re-read took longer
    // than latchkey waits for it (then the next request has the new key). Every re-read of
    // a proven attempt started after the rotation, so an old key as a hit past the TTL is
    // the cache not expiring.
    let (id, old, new, rotated) = last.unwrap();
    let sample = Cell::new(0);
    wait_until(
        "the rotated key to be in use",
        Duration::from_secs(30),
        || async {
            let n = sample.get();
            sample.set(n + 1);
            let path = format!("/v1/after/{n}");
            let sent = Instant::now();
            let r = gateway_get(&lk, &format!("/{id}{path}"), &[]).await;
            let took = sent.elapsed();
            let key = injected(&r);
            if key == format!("Bearer {new}") {
                return Some(());
            }
            assert_eq!(key, format!("Bearer {old}"));
            if proven && sent >= rotated + ttl {
                let line = access_line(&lk, &id, &path).await;
                assert_eq!(
                    line["cache"],
                    "stale",
                    "the old key {:?} after the rotation (TTL {ttl:?}): {line}",
                    sent - rotated
                );
                assert!(took >= EXPIRED_WAIT, "served stale at once: {line}");
            }
            None
        },
    )
    .await;
    assert!(bao.reads_of(&id) >= 2);
}

/// A connection used once and then left idle: its entry ages past the TTL while Vault is up.
/// A key rotated in Vault must still be the one in use once the TTL has passed since the
/// rotation: an entry past its TTL is served stale only while Vault is unreachable (or slower
/// to answer than latchkey waits for it).
#[tokio::test]
async fn a_key_rotated_while_the_connection_is_idle_is_in_use_after_the_ttl() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    let old = put_bearer(&bao, "idle", &base);
    let ttl = Duration::from_secs(2);
    let lk = Latchkey::start(&bao, Opts::loopback().extra("[cache]\nttl = \"2s\"\n")).await;

    let r = gateway_get(&lk, "/idle/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {old}"));
    // A first load counts as a use, so latchkey re-reads the entry once ahead of expiry on its
    // own. Let that happen first (its load is logged once the entry holds it), so that the
    // rotation below comes after everything latchkey has read; from then on the entry is idle.
    wait_until(
        "latchkey's own re-read ahead of expiry",
        Duration::from_secs(30),
        || std::future::ready((loads(&lk, "idle") >= 2).then_some(())),
    )
    .await;
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
    // The subject: no request for a TTL since the rotation (and so since the last read).
    // Later is as good, so a slow machine cannot make this fail.
    tokio::time::sleep_until((rotated + ttl + Duration::from_millis(100)).into()).await;
    let sent = Instant::now();
    let r = gateway_get(&lk, "/idle/v1/y", &[]).await;
    let took = sent.elapsed();
    let line = access_line(&lk, "idle", "/v1/y").await;
    if injected(&r) != format!("Bearer {new}") {
        // Only as latchkey allows it: served stale after waiting for the re-read, which then
        // brings the new key.
        assert!(
            line["cache"] == "stale" && took >= EXPIRED_WAIT,
            "the key rotated {:?} ago (TTL 2s) is not in use; Vault reads before/after the \
             rotation: {reads_before}/{}; the request took {took:?}: {line}",
            rotated.elapsed(),
            bao.reads_of("idle"),
        );
        wait_until(
            "the new key after a slow re-read",
            Duration::from_secs(30),
            || async {
                let r = gateway_get(&lk, "/idle/v1/z", &[]).await;
                (injected(&r) == format!("Bearer {new}")).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test]
async fn with_vault_down_a_cached_connection_serves_stale_until_max_stale() {
    // Frozen during the test: an OpenBao of its own.
    let bao = Bao::start_own().await;
    let up = echo().await;
    let key = put_bearer(&bao, "stale", &format!("http://{}", up.addr()));
    let (ttl, max_stale) = (Duration::from_secs(2), Duration::from_secs(4));
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().extra("[cache]\nttl = \"2s\"\nmax_stale = \"4s\"\n"),
    )
    .await;

    // The entry is fetched between `asked` and `loaded`: it is fresh until at least
    // `asked + ttl`, expired from `loaded + ttl` at the latest, and usable until at least
    // `asked + ttl + max_stale`, gone from `loaded + ttl + max_stale`.
    let asked = Instant::now();
    let r = gateway_get(&lk, "/stale/v1/x", &[]).await;
    let loaded = Instant::now();
    assert_eq!(injected(&r), format!("Bearer {key}"));
    assert_eq!(access_line(&lk, "stale", "/v1/x").await["cache"], "miss");
    bao.freeze().await;

    // Polled, one request at a time, through the three ages of the entry: what each request
    // must get is asserted only where its timing decides it.
    let sample = Cell::new(0);
    let served = Cell::new(0);
    let seen_hit = Cell::new(false);
    let seen_stale = Cell::new(false);
    let r = wait_until(
        "the entry to be gone past ttl + max_stale",
        Duration::from_secs(60),
        || async {
            let n = sample.get();
            sample.set(n + 1);
            let path = format!("/v1/s/{n}");
            let sent = Instant::now();
            let r = gateway_get(&lk, &format!("/stale{path}"), &[]).await;
            let answered = Instant::now();
            if r.status != 200 {
                // Nothing usable is cached any more: only past ttl + max_stale.
                assert!(
                    answered >= asked + ttl + max_stale,
                    "{} {:?} after the load: {:?}",
                    r.status,
                    answered - asked,
                    r.json
                );
                return Some(r);
            }
            served.set(served.get() + 1);
            assert_eq!(injected(&r), format!("Bearer {key}"));
            let cache = access_line(&lk, "stale", &path).await["cache"].clone();
            if answered < asked + ttl {
                // Within the TTL: a hit, Vault is not needed.
                assert_eq!(cache, "hit", "{:?} after the load", answered - asked);
                seen_hit.set(true);
            } else if sent >= loaded + ttl {
                // Past the TTL, Vault still down: served stale.
                assert_eq!(cache, "stale", "{:?} after the load", sent - loaded);
                seen_stale.set(true);
            }
            assert!(
                sent < loaded + ttl + max_stale,
                "served {:?} after the load, past ttl + max_stale",
                sent - loaded
            );
            None
        },
    )
    .await;
    bao.thaw();
    if !seen_hit.get() || !seen_stale.get() {
        eprintln!(
            "too slow to sample every age of the entry (hit {}, stale {})",
            seen_hit.get(),
            seen_stale.get()
        );
    }
    assert_eq!(r.status, 503, "{:?}", r.json);
    assert_eq!(
        r.latchkey_error.as_deref(),
        Some("secret_store_unavailable")
    );
    assert_eq!(r.error_code(), Some("secret_store_unavailable"));
    // One request went upstream per 200 above, none for the 503.
    assert_eq!(up.requests(), 1 + served.get());

    // Vault back: the connection is read again and works.
    let r = wait_until(
        "the connection to work again with Vault back",
        Duration::from_secs(30),
        || async {
            let r = gateway_get(&lk, "/stale/v1/x", &[]).await;
            (r.status == 200).then_some(r)
        },
    )
    .await;
    assert_eq!(injected(&r), format!("Bearer {key}"));
}

/// The lines latchkey logged whose message starts with `start`.
fn logged(lk: &Latchkey, start: &str) -> usize {
    lk.output()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with(start)))
        .count()
}

/// Issue 12: with OpenBao SIGSTOPped under steady load, every request on an expired entry
/// waited up to 250 ms for a re-read, until Vault's own timeout (seconds later) marked it
/// unhealthy. A hang must be noticed once: from then on expired entries are served stale at
/// once, until Vault answers again. Counted, not timed: the requests that waited for Vault are
/// at most the ones in flight when the hang was noticed (one per client), and the hang is
/// logged once.
#[tokio::test]
async fn a_hung_vault_is_noticed_once_and_expired_entries_are_served_stale_without_waiting() {
    let bao = Bao::start_own().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    let key = put_bearer(&bao, "hung", &base);
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().extra("[cache]\nttl = \"1s\"\nmax_stale = \"1h\"\n"),
    )
    .await;
    assert_eq!(
        injected(&gateway_get(&lk, "/hung/v1/warm", &[]).await),
        format!("Bearer {key}")
    );

    const CLIENTS: usize = 4;
    let url = lk.url("/hung/v1/load");
    let load = SteadyLoad::start(CLIENTS, move |client, c, n| {
        client.get(format!("{url}/{c}/{n}"))
    });
    load.more(20).await;
    bao.freeze().await;
    // Past the point where latchkey used to stop waiting: Vault's own timeout (vault.timeout,
    // 2s here) has ended a read.
    wait_until(
        "a Vault read to time out",
        Duration::from_secs(60),
        || async {
            let text = crate::errors::metrics_text(&lk).await;
            text.lines()
                .any(|l| {
                    l.starts_with("latchkey_vault_requests_total{")
                        && l.contains("op=\"read\"")
                        && l.contains("outcome=\"timeout\"")
                })
                .then_some(())
        },
    )
    .await;
    load.more(100).await;
    // Access lines are written as each answer's body ends: waited for (Latchkey::access_lines).
    let stale_while_hung = lk
        .access_lines(90, |l| l["connection"] == "hung" && l["cache"] == "stale")
        .await
        .len();
    bao.thaw();
    let (ok, failed) = load.stop().await;
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), failed);
    assert!(ok >= 120);
    assert!(stale_while_hung >= 90, "{stale_while_hung} served stale");
    assert_eq!(logged(&lk, "Vault hung"), 1, "the hang is noticed once");
    let waited = logged(&lk, "no answer to an expired connection's re-read");
    assert!(
        (1..=CLIENTS).contains(&waited),
        "{waited} requests waited for a hung Vault; at most one per client may"
    );
    let text = crate::errors::metrics_text(&lk).await;
    assert!(
        text.lines().any(|l| l == "latchkey_vault_stalls_total 1"),
        "{text}"
    );

    // Vault answers again: noticed, and a key rotated now is in use once the TTL has passed.
    let new = format!("key_after_thaw_{}", free_port());
    bao.put(
        "hung",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &base),
            ("api_key", &new),
        ],
    );
    wait_until(
        "the rotated key after the thaw",
        Duration::from_secs(30),
        || async {
            let r = gateway_get(&lk, "/hung/v1/after", &[]).await;
            (injected(&r) == format!("Bearer {new}")).then_some(())
        },
    )
    .await;
    wait_until(
        "latchkey to notice Vault answers again",
        Duration::from_secs(30),
        || std::future::ready((logged(&lk, "Vault answers again") == 1).then_some(())),
    )
    .await;
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
    // The echo upstream sends its description hex-encoded; `send` decoded it.
    assert_eq!(a["bytes_out"], 2 * first.body.len() as u64);
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
