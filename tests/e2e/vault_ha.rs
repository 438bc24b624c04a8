//! Vault as a cluster: `vault.address` lists every node of a real three-node OpenBao raft
//! cluster; the active node is killed under load; a node listed first may be a standby or
//! down; Vault over TLS is trusted through the CA file only; `vault.namespace` reaches Vault as
//! `X-Vault-Namespace`; and a redirect from a node is never followed with the token.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::raft::{Cluster, Setup};
use crate::support::*;

/// The value of the `Authorization` header that reached the echo upstream.
fn injected(r: &Echoed) -> String {
    r.header("authorization").unwrap_or_default()
}

/// `latchkey_vault_requests_total{outcome="error"}`, over every operation.
async fn failed_vault_calls(lk: &Latchkey) -> f64 {
    let text = crate::errors::metrics_text(lk).await;
    text.lines()
        .filter(|l| {
            l.starts_with("latchkey_vault_requests_total{") && l.contains("outcome=\"error\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn ready(lk: &Latchkey) -> (u16, serde_json::Value) {
    let r = http().get(lk.admin_url("/readyz")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

/// What the load saw: every answer that was not a 200 with the right key.
#[derive(Default)]
struct Load {
    requests: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

/// Steady load: `clients` tasks, each with its own keep-alive client, cycling over the cached
/// connections until `stop`.
fn steady_load(
    lk: &Latchkey,
    cached: &[(String, String)],
    clients: usize,
    stop: &Arc<AtomicBool>,
    load: &Arc<Load>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let base = lk.url("");
            let cached = cached.to_vec();
            let (stop, load) = (stop.clone(), load.clone());
            tokio::spawn(async move {
                let client = http();
                let mut n = c;
                while !stop.load(Ordering::Relaxed) {
                    let (id, key) = &cached[n % cached.len()];
                    n += 1;
                    let sent = client.get(format!("{base}/{id}/v1/load/{n}")).send().await;
                    load.requests.fetch_add(1, Ordering::Relaxed);
                    let problem = match sent {
                        Err(e) => Some(format!("{id}: {e}")),
                        Ok(resp) => {
                            let r = read(resp).await;
                            (r.status != 200 || injected(&r) != format!("Bearer {key}"))
                                .then(|| format!("{id}: {} {:?}", r.status, r.latchkey_error))
                        }
                    };
                    if let Some(p) = problem {
                        load.failures.lock().unwrap().push(p);
                    }
                    // Steady, not flat out: a few hundred requests a second in all.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect()
}

/// The active node is killed (SIGKILL) under load. Latchkey lists the active node first, so
/// that it is the node latchkey talks to when it dies. Cached connections (TTL 1 s, so their
/// entries expire and are read again during the election) must see no failure; connections
/// never requested before are asked for one after another, each a new one, from the kill until
/// one is served; the time from the kill to that first success is the gap printed.
async fn kill_the_active_node_under_load(standby_reads: bool) -> String {
    let started = Instant::now();
    let mut cluster = Cluster::start(Setup {
        standby_reads,
        ..Setup::default()
    })
    .await;
    let bao = cluster.handle();
    let up = echo().await;
    let base_url = format!("http://{}", up.addr());
    let mut cached = Vec::new();
    for i in 0..6 {
        let (id, key) = (
            format!("cached-{i}"),
            format!("key-cached-{i}-{}", free_port()),
        );
        let fields = [
            ("connector", "generic-bearer"),
            ("base_url", &base_url),
            ("api_key", &key),
        ];
        cluster.put(&bao, &id, &fields).await;
        cached.push((id, key));
    }
    // Connections latchkey has never read: one per probe after the kill.
    let fresh: Vec<(String, String)> = (0..150)
        .map(|i| {
            (
                format!("fresh-{i}"),
                format!("key-fresh-{i}-{}", free_port()),
            )
        })
        .collect();
    for chunk in fresh.chunks(25) {
        let puts = chunk.iter().map(|(id, key)| {
            let fields = [
                ("connector", "generic-bearer"),
                ("base_url", &base_url),
                ("api_key", key),
            ];
            let (cluster, bao) = (&cluster, &bao);
            async move { cluster.put(bao, id, &fields).await }
        });
        futures_util::future::join_all(puts).await;
    }

    let set_up = started.elapsed();
    let leader = wait_until("a leader", Duration::from_secs(10), || cluster.leader()).await;
    let mut order = vec![leader];
    order.extend((0..3).filter(|&i| i != leader));
    let lk = Latchkey::start(
        &bao,
        Opts {
            vault_addresses: order.iter().map(|&i| cluster.addr(i).to_string()).collect(),
            ..Opts::loopback().extra("[cache]\nttl = \"1s\"\n")
        },
    )
    .await;
    for (id, key) in &cached {
        let r = gateway_get(&lk, &format!("/{id}/v1/warm"), &[]).await;
        assert_eq!(injected(&r), format!("Bearer {key}"), "{:?}", r.json);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load::default());
    let tasks = steady_load(&lk, &cached, 4, &stop, &load);
    // Under load for a moment before the kill, past one TTL.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = load.requests.load(Ordering::Relaxed);

    let killed = Instant::now();
    cluster.kill(leader);
    let probes = AtomicUsize::new(0);
    let failed_probes = Mutex::new(Vec::new());
    let served = try_wait_until(Duration::from_secs(30), || async {
        let n = probes.fetch_add(1, Ordering::Relaxed);
        let (id, key) = fresh.get(n)?;
        let r = gateway_get(&lk, &format!("/{id}/v1/probe"), &[]).await;
        if r.status == 200 {
            assert_eq!(injected(&r), format!("Bearer {key}"));
            return Some(killed.elapsed());
        }
        assert_eq!(
            (r.status, r.latchkey_error.as_deref()),
            (503, Some("secret_store_unavailable")),
            "{id}: {:?}",
            r.json
        );
        failed_probes.lock().unwrap().push(killed.elapsed());
        None
    })
    .await;
    let gap = served.unwrap_or_else(|| {
        panic!(
            "no new connection was served within 30 s of the kill ({} probes, {} connections \
             to probe with):\n{}\n{}",
            probes.load(Ordering::Relaxed),
            fresh.len(),
            cluster.logs(),
            tail(&lk.output(), 40)
        )
    });
    // Served again: the next new connections too.
    let next = probes.load(Ordering::Relaxed);
    for (id, key) in &fresh[next..next + 10] {
        let r = gateway_get(&lk, &format!("/{id}/v1/after"), &[]).await;
        assert_eq!(r.status, 200, "{id} after the first success: {:?}", r.json);
        assert_eq!(injected(&r), format!("Bearer {key}"));
    }
    let new_leader = wait_until("a new leader", Duration::from_secs(30), || cluster.leader()).await;
    let election = killed.elapsed();
    // The load goes on past the election for another TTL and more.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let total = load.requests.load(Ordering::Relaxed);
    let failures = load.failures.lock().unwrap().clone();
    let failed = failed_probes.lock().unwrap().len();
    let stale = lk
        .access_log()
        .iter()
        .filter(|l| l["cache"] == "stale")
        .count();
    let report = format!(
        "standby reads {}: active node killed under load; new connections served again {} ms \
         after the kill ({failed} new connections refused before); node {new_leader} active {} ms \
         after the kill; \
         cached connections: {} requests after the kill ({total} in all), {} failed, \
         {stale} served stale (cluster and connections set up in {} ms)",
        if standby_reads { "on" } else { "off" },
        gap.as_millis(),
        election.as_millis(),
        total - before,
        failures.len(),
        set_up.as_millis()
    );
    assert!(
        failures.is_empty(),
        "requests for cached connections failed: {:?}\n{report}",
        &failures[..failures.len().min(10)]
    );
    assert!(total > before, "no load ran after the kill");
    report
}

#[tokio::test]
async fn active_node_killed_under_load_cached_connections_never_fail_and_new_ones_are_served_by_read_enabled_standbys(
) {
    eprintln!("{}", kill_the_active_node_under_load(true).await);
}

#[tokio::test]
async fn active_node_killed_with_standby_reads_off_new_connections_wait_only_for_the_new_leader() {
    eprintln!("{}", kill_the_active_node_under_load(false).await);
}

#[tokio::test]
async fn a_cluster_serves_reads_and_writes_whichever_node_is_listed_first() {
    let cluster = Cluster::start(Setup::default()).await;
    let bao = cluster.handle();
    let up = echo().await;
    let base_url = format!("http://{}", up.addr());
    let key = format!("key-listed-{}", free_port());
    let fields = [
        ("connector", "generic-bearer"),
        ("base_url", &base_url),
        ("api_key", &key),
    ];
    cluster.put(&bao, "listed", &fields).await;
    let leader = wait_until("a leader", Duration::from_secs(10), || cluster.leader()).await;
    let dead = format!("http://127.0.0.1:{}", free_port());

    // Each node first (the standbys too), then a dead address first.
    let mut orders: Vec<Vec<String>> = (0..3)
        .map(|first| {
            (0..3)
                .map(|k| cluster.addr((first + k) % 3).to_string())
                .collect()
        })
        .collect();
    orders.push(std::iter::once(dead).chain(cluster.addrs()).collect());
    for (n, order) in orders.into_iter().enumerate() {
        let lk = Latchkey::start(
            &bao,
            Opts {
                vault_addresses: order.clone(),
                ..Opts::loopback()
            },
        )
        .await;
        let (status, body) = ready(&lk).await;
        assert_eq!(status, 200, "{order:?}: {body}");
        let r = gateway_get(&lk, "/listed/v1/x", &[]).await;
        assert_eq!(
            injected(&r),
            format!("Bearer {key}"),
            "{order:?}: {:?}",
            r.json
        );

        // A write through whichever node is first: a standby forwards it to the active node.
        let id = format!("created-{n}");
        let new_key = format!("key-created-{n}-{}", free_port());
        lk.forbid(&new_key);
        let created = http()
            .post(lk.admin_url("/v1/connections"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({
                "id": id,
                "connector": "generic-bearer",
                "base_url": base_url,
                "fields": {"api_key": new_key},
                "verify": false,
            }))
            .send()
            .await
            .unwrap();
        let status = created.status().as_u16();
        assert_eq!(status, 201, "{order:?}: {}", created.text().await.unwrap());
        let stored = cluster.get(leader, &bao, &id).await;
        assert_eq!(
            stored.as_ref().map(|s| s["api_key"].clone()),
            Some(json!(new_key)),
            "{order:?}"
        );
        let r = gateway_get(&lk, &format!("/{id}/v1/x"), &[]).await;
        assert_eq!(injected(&r), format!("Bearer {new_key}"), "{order:?}");
    }
}

#[tokio::test]
async fn vault_over_tls_is_trusted_through_the_ca_file_and_refused_without_it() {
    let ca = TestCa::new();
    let cluster = Cluster::start(Setup {
        nodes: 1,
        tls: Some(&ca),
        ..Setup::default()
    })
    .await;
    let bao = cluster.handle();
    let up = echo().await;
    let base_url = format!("http://{}", up.addr());
    let key = format!("key-tls-{}", free_port());
    let fields = [
        ("connector", "generic-bearer"),
        ("base_url", &base_url),
        ("api_key", &key),
    ];
    cluster.put(&bao, "tls", &fields).await;
    let address = cluster.addr(0).to_string();
    assert!(address.starts_with("https://"), "{address}");
    let pem = ca.pem_path.display().to_string();

    // Trusted through `vault.ca_cert`, and through VAULT_CACERT.
    for opts in [
        Opts::loopback().vault(&format!("ca_cert = {pem:?}")),
        Opts::loopback().env("VAULT_CACERT", &pem),
    ] {
        let lk = Latchkey::start(
            &bao,
            Opts {
                vault_address: Some(address.clone()),
                ..opts
            },
        )
        .await;
        let (status, body) = ready(&lk).await;
        assert_eq!(status, 200, "{body}");
        let r = gateway_get(&lk, "/tls/v1/x", &[]).await;
        assert_eq!(injected(&r), format!("Bearer {key}"), "{:?}", r.json);
    }

    // Without the CA: not ready, with the reason, and no connection is served.
    let lk = Latchkey::start(
        &bao,
        Opts {
            vault_address: Some(address.clone()),
            ..Opts::loopback()
        },
    )
    .await;
    let (status, body) = ready(&lk).await;
    assert_eq!(status, 503, "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&address)
            && reason.contains("not trusted")
            && reason.contains("VAULT_CACERT"),
        "{reason}"
    );
    let r = gateway_get(&lk, "/tls/v1/x", &[]).await;
    assert_eq!(r.status, 503, "{:?}", r.json);
    assert_eq!(
        r.latchkey_error.as_deref(),
        Some("secret_store_unavailable")
    );
}

#[tokio::test]
async fn vault_namespace_is_sent_with_every_request() {
    let bao = Bao::start().await;
    let ns = format!("ns-{}", bao.prefix.replace('/', "-"));
    let vault = http();
    let call = |method: reqwest::Method, path: &str, namespace: Option<&str>| {
        let mut req = vault
            .request(method, format!("{}/v1/{path}", bao.addr))
            .header("X-Vault-Token", &bao.token);
        if let Some(ns) = namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        req
    };
    let r = call(reqwest::Method::POST, &format!("sys/namespaces/{ns}"), None)
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "create the namespace: {}",
        r.status()
    );
    let r = call(reqwest::Method::POST, "sys/mounts/secret", Some(&ns))
        .json(&json!({"type": "kv", "options": {"version": "2"}}))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "mount KV in the namespace: {}",
        r.status()
    );
    let up = echo().await;
    let key = format!("key-ns-{}", free_port());
    bao.secrets.add(key.clone());
    let stored = wait_until(
        "the write in the namespace",
        Duration::from_secs(10),
        || {
            let put = call(
                reqwest::Method::POST,
                &format!("secret/data/{}", bao.path("in-ns")),
                Some(&ns),
            )
            .json(&json!({"data": {
                "connector": "generic-bearer",
                "base_url": format!("http://{}", up.addr()),
                "api_key": key,
            }}))
            .send();
            async move { put.await.ok().filter(|r| r.status().is_success()) }
        },
    )
    .await;
    assert!(stored.status().is_success());

    // Through `vault.namespace` and through VAULT_NAMESPACE.
    for opts in [
        Opts::loopback().vault(&format!("namespace = {ns:?}")),
        Opts::loopback().env("VAULT_NAMESPACE", &ns),
    ] {
        let lk = Latchkey::start(&bao, opts).await;
        let r = gateway_get(&lk, "/in-ns/v1/x", &[]).await;
        assert_eq!(injected(&r), format!("Bearer {key}"), "{:?}", r.json);
    }
    // Without it, the same path in the root namespace holds nothing.
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let r = gateway_get(&lk, "/in-ns/v1/x", &[]).await;
    assert_eq!(r.status, 404, "{:?}", r.json);
}

/// A loopback server that answers every request with `response`, counting connections and
/// keeping what it was sent.
async fn canned(response: String) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (count, seen) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let (c, s) = (count.clone(), seen.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::Relaxed);
            let (response, seen) = (response.clone(), s.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                seen.lock().unwrap().extend_from_slice(&head);
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), count, seen)
}

#[tokio::test]
async fn a_redirect_from_a_vault_node_moves_to_the_next_node_and_never_carries_the_token() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "redirected", &format!("http://{}", up.addr()));
    // Where a node would send the token if latchkey followed its redirect.
    let (elsewhere, reached, _) = canned(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            .to_string(),
    )
    .await;
    let (redirector, asked, sent) = canned(format!(
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: {elsewhere}/v1/secret/data/x\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    ))
    .await;
    let lk = Latchkey::start(
        &bao,
        Opts {
            vault_addresses: vec![redirector, bao.addr.clone()],
            ..Opts::loopback()
        },
    )
    .await;
    let r = gateway_get(&lk, "/redirected/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {key}"), "{:?}", r.json);
    assert!(
        asked.load(Ordering::Relaxed) >= 1,
        "the redirecting node was never asked"
    );
    // The redirecting node did get the token (it is listed): the test is that nothing else did.
    assert!(String::from_utf8_lossy(&sent.lock().unwrap()).contains(&bao.token));
    assert_eq!(
        reached.load(Ordering::Relaxed),
        0,
        "a redirect was followed"
    );
}

#[tokio::test]
async fn a_node_listed_first_that_is_down_at_start_does_not_stop_latchkey() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "second-node", &format!("http://{}", up.addr()));
    let dead = format!("http://127.0.0.1:{}", free_port());
    let lk = Latchkey::start(
        &bao,
        Opts {
            vault_addresses: vec![dead.clone(), bao.addr.clone()],
            ..Opts::loopback()
        },
    )
    .await;
    let (status, body) = ready(&lk).await;
    assert_eq!(status, 200, "{body}");
    let r = gateway_get(&lk, "/second-node/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {key}"), "{:?}", r.json);
    lk.output_line("logging the switch to the second node", |l| {
        l.contains("Vault calls now go to this node")
    })
    .await;
    // Sticky: the dead node is not tried again while the second answers.
    let failed = failed_vault_calls(&lk).await;
    assert!(failed >= 1.0, "the dead node was never tried");
    for i in 0..5 {
        let r = gateway_get(&lk, &format!("/not-stored-{i}/v1/x"), &[]).await;
        assert_eq!(r.status, 404, "{:?}", r.json);
    }
    assert_eq!(failed_vault_calls(&lk).await, failed);

    // Every node down: the reason names them all.
    let lk = Latchkey::start(
        &bao,
        Opts {
            vault_addresses: vec![dead.clone(), format!("http://127.0.0.1:{}", free_port())],
            ..Opts::loopback()
        },
    )
    .await;
    let (status, body) = ready(&lk).await;
    assert_eq!(status, 503, "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&dead) && reason.contains(", "), "{reason}");
}
