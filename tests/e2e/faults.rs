//! Faults under load, the short version of `scripts/chaos` (README, "Reliability"): OpenBao
//! frozen, killed, sealed, or refusing latchkey's token; upstreams that reset, stall, answer
//! slowly, close kept-alive connections or run out of descriptors; clients that go away
//! mid-stream; SIGTERM. Each test counts the outcome of every request it sends, and where a
//! fault makes latchkey hold sockets, waits until its open descriptors are back to what they
//! were before (`/proc/PID/fd`).
//!
//! The misbehaving upstream is `bench/fault_upstream.py`, the one `scripts/chaos` uses; its
//! paths are described there.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// `bench/fault_upstream.py`, for one test.
struct FaultUpstream {
    proc: Service,
    port: u16,
}

impl FaultUpstream {
    async fn start() -> FaultUpstream {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/fault_upstream.py");
        let mut child = Command::new("python3")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is needed");
        let stdout = child.stdout.take().unwrap();
        let proc = Service(child);
        // It prints its port once it is listening.
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            line
        })
        .await
        .unwrap();
        let port = line
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("the fault upstream did not start: {line:?}"));
        FaultUpstream { proc, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// Its counters: `open` connections (this request's own included), `streams_open`,
    /// `in_flight` slow answers.
    async fn stats(&self) -> serde_json::Value {
        http()
            .get(format!("{}/_stats", self.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn stat(&self, name: &str) -> u64 {
        self.stats().await[name].as_u64().unwrap()
    }
}

/// The descriptors a process has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// How many sockets a process has open.
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// The lowest descriptor number a process has free: the next one it would get.
fn lowest_free_fd(pid: u32) -> usize {
    let used: std::collections::BTreeSet<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

/// latchkey's open descriptors once it is quiet: no client connection open
/// (`latchkey_client_connections` all 0) and no connection to `up` (its pool's idle limit is
/// short in these tests). Taken after a first request, so that whatever latchkey opens once
/// (its Vault connection on each runtime) is in.
async fn quiet_fds(lk: &Latchkey, up: &FaultUpstream) -> usize {
    wait_until("latchkey to be quiet", Duration::from_secs(20), || async {
        let text = crate::errors::metrics_text(lk).await;
        let clients: f64 = text
            .lines()
            .filter(|l| l.starts_with("latchkey_client_connections{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        // The stats request is a connection of its own.
        (clients == 0.0 && up.stat("open").await <= 1).then_some(())
    })
    .await;
    open_fds(lk.pid())
}

/// Waits until latchkey, quiet again, holds no more descriptors than `baseline`.
async fn fds_back_to(lk: &Latchkey, up: &FaultUpstream, baseline: usize) {
    quiet_fds(lk, up).await;
    let pid = lk.pid();
    let back = try_wait_until(Duration::from_secs(20), || {
        std::future::ready((open_fds(pid) <= baseline).then_some(()))
    })
    .await;
    assert!(
        back.is_some(),
        "latchkey holds {} descriptors, {baseline} before the fault",
        open_fds(pid)
    );
}

/// Outcomes of requests: `200`, `503 secret_store_unavailable` (status and `Latchkey-Error`),
/// `200 cut` (the body ended before its framing said), `error` (no answer), by count.
type Tally = BTreeMap<String, usize>;

async fn outcome(resp: reqwest::Result<reqwest::Response>) -> String {
    let resp = match resp {
        Ok(r) => r,
        Err(_) => return "error".into(),
    };
    let status = resp.status().as_u16();
    let code = resp
        .headers()
        .get("latchkey-error")
        .and_then(|v| v.to_str().ok())
        .map(|c| format!(" {c}"))
        .unwrap_or_default();
    match resp.bytes().await {
        Ok(_) => format!("{status}{code}"),
        Err(_) => format!("{status}{code} cut"),
    }
}

fn only(tally: &Tally, allowed: &[&str]) -> bool {
    tally.keys().all(|k| allowed.contains(&k.as_str()))
}

/// `clients` concurrent clients, each on a keep-alive connection of its own, sending GETs to
/// `paths` in turn until [`Load::finish`].
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Load {
    fn start(lk: &Latchkey, paths: &[String], clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let urls: Arc<Vec<String>> = Arc::new(paths.iter().map(|p| lk.url(p)).collect());
        let tasks = (0..clients)
            .map(|i| {
                let (stop, urls) = (stop.clone(), urls.clone());
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .pool_max_idle_per_host(1)
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                tokio::spawn(async move {
                    let mut tally = Tally::new();
                    let mut n = i;
                    while !stop.load(Ordering::Relaxed) {
                        let o = outcome(client.get(&urls[n % urls.len()]).send().await).await;
                        *tally.entry(o).or_default() += 1;
                        n += 1;
                    }
                    tally
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Tally::new();
        for t in self.tasks {
            for (k, v) in t.await.unwrap() {
                *all.entry(k).or_default() += v;
            }
        }
        all
    }
}

/// `latchkey_cache_lookups_total{outcome="stale"}`.
async fn stale_lookups(lk: &Latchkey) -> u64 {
    let text = crate::errors::metrics_text(lk).await;
    text.lines()
        .find(|l| l.starts_with("latchkey_cache_lookups_total{outcome=\"stale\"}"))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

async fn readyz(lk: &Latchkey) -> (u16, serde_json::Value) {
    let r = http().get(lk.admin_url("/readyz")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

async fn get(lk: &Latchkey, path: &str) -> String {
    outcome(http().get(lk.url(path)).send().await).await
}

// ---------------------------------------------------------------------------------------------
// Vault out

const CACHE_1S: &str = "[cache]\nttl = \"1s\"\n";

/// Stores connections `{prefix}-0..3` on `up`, and `{prefix}-new` that no test asks for
/// before Vault is out.
/// The setting of the Vault tests: an OpenBao of their own, four connections `{prefix}-{i}` on a
/// fault upstream, latchkey with a 1 s cache TTL, every connection cached; and their paths.
async fn vault_fault(prefix: &str) -> (Bao, FaultUpstream, Latchkey, Vec<String>) {
    let bao = Bao::start_own().await;
    let up = FaultUpstream::start().await;
    put_connections(&bao, &up, prefix);
    let lk = Latchkey::start(&bao, Opts::loopback().extra(CACHE_1S)).await;
    let paths = warm(&lk, prefix).await;
    (bao, up, lk, paths)
}

fn put_connections(bao: &Bao, up: &FaultUpstream, prefix: &str) {
    for i in 0..4 {
        put_bearer(bao, &format!("{prefix}-{i}"), &up.url());
    }
    put_bearer(bao, &format!("{prefix}-new"), &up.url());
}

/// Caches `{prefix}-0..3` with one request each; the load's paths over them.
async fn warm(lk: &Latchkey, prefix: &str) -> Vec<String> {
    let paths: Vec<String> = (0..4).map(|i| format!("/{prefix}-{i}/ok")).collect();
    for p in &paths {
        assert_eq!(get(lk, p).await, "200");
    }
    paths
}

/// Runs the load over the cached connections until their entries have been served stale a
/// few times (Vault being out, past the TTL); its tally.
async fn load_until_stale(lk: &Latchkey, paths: &[String]) -> Tally {
    let load = Load::start(lk, paths, 8);
    wait_until(
        "cached entries to be served stale under load",
        Duration::from_secs(30),
        || async { (stale_lookups(lk).await >= 20).then_some(()) },
    )
    .await;
    load.finish().await
}

/// What a test of Vault being out checks while it is out: every request on a cached connection
/// succeeded, a connection not cached is 503 secret_store_unavailable, and /readyz is 503.
async fn assert_out(lk: &Latchkey, tally: &Tally, prefix: &str) -> serde_json::Value {
    assert!(
        only(tally, &["200"]) && tally.get("200").is_some_and(|n| *n > 0),
        "cached connections with Vault out: {tally:?}"
    );
    assert_eq!(
        get(lk, &format!("/{prefix}-new/ok")).await,
        "503 secret_store_unavailable"
    );
    let (status, body) = readyz(lk).await;
    assert_eq!(status, 503, "{body}");
    body
}

/// Once Vault is back: the connection never cached works, and /readyz is 200.
async fn assert_back(lk: &Latchkey, prefix: &str) {
    let path = format!("/{prefix}-new/ok");
    wait_until(
        "a new connection to work with Vault back",
        Duration::from_secs(30),
        || async { (get(lk, &path).await == "200").then_some(()) },
    )
    .await;
    assert_eq!(readyz(lk).await.0, 200);
}

#[tokio::test]
async fn with_vault_frozen_under_load_no_request_on_a_cached_connection_fails() {
    let (bao, _up, lk, paths) = vault_fault("hang").await;

    bao.freeze().await;
    let tally = load_until_stale(&lk, &paths).await;
    assert_out(&lk, &tally, "hang").await;
    bao.thaw();
    assert_back(&lk, "hang").await;
}

#[tokio::test]
async fn with_vault_killed_cached_connections_serve_and_new_ones_are_503() {
    let (bao, _up, lk, paths) = vault_fault("dead").await;

    bao.kill();
    let tally = load_until_stale(&lk, &paths).await;
    let why = assert_out(&lk, &tally, "dead").await;
    assert!(
        why["reason"]
            .as_str()
            .is_some_and(|r| r.contains("cannot connect")),
        "{why}"
    );
}

#[tokio::test]
async fn with_vault_sealed_cached_connections_serve_and_new_ones_are_503_until_unsealed() {
    let (bao, _up, lk, paths) = vault_fault("sealed").await;

    let out = bao.cli().args(["operator", "seal"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tally = load_until_stale(&lk, &paths).await;
    let why = assert_out(&lk, &tally, "sealed").await;
    // The reason is Vault's own words, not a bare status.
    assert!(
        why["reason"]
            .as_str()
            .is_some_and(|r| r.to_ascii_lowercase().contains("sealed")),
        "{why}"
    );

    let log = bao.server_log();
    let key = log
        .lines()
        .find_map(|l| l.strip_prefix("Unseal Key: "))
        .expect("a dev server prints its unseal key")
        .trim()
        .to_string();
    let out = bao
        .cli()
        .args(["operator", "unseal", &key])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_back(&lk, "sealed").await;
}

#[tokio::test]
async fn with_its_token_revoked_cached_connections_serve_and_the_log_says_why() {
    let bao = Bao::start().await;
    let up = FaultUpstream::start().await;
    put_connections(&bao, &up, "revoked");
    let out = bao
        .cli()
        .args(["token", "create", "-policy=root", "-ttl=1h", "-format=json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = created["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().extra(CACHE_1S).env("VAULT_TOKEN", &token),
    )
    .await;
    lk.forbid(&token);
    let paths = warm(&lk, "revoked").await;

    let out = bao
        .cli()
        .args(["token", "revoke", &token])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tally = load_until_stale(&lk, &paths).await;
    let why = assert_out(&lk, &tally, "revoked").await;
    assert!(
        why["reason"]
            .as_str()
            .is_some_and(|r| r.contains("refused latchkey's token")),
        "{why}"
    );
    // Said where an operator running at the default level (info) sees it, as a warning. (The
    // token itself appears in no output: checked when `lk` is dropped.)
    lk.output_line("warning that Vault refused the token", |l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
            matches!(v["level"].as_str(), Some("WARN" | "ERROR"))
                && v.to_string().contains("refused latchkey's token")
        })
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Upstream faults

/// latchkey for the upstream faults: every timeout short, so that each fault ends soon.
/// The setting of the upstream tests: a fault upstream behind connection `id`, latchkey with
/// short timeouts, one request made; and latchkey's descriptors once quiet after it.
async fn upstream_fault(id: &str) -> (Bao, FaultUpstream, Latchkey, usize) {
    let bao = Bao::start().await;
    let up = FaultUpstream::start().await;
    put_bearer(&bao, id, &up.url());
    let lk = short_timeouts(&bao).await;
    let baseline = first_request(&lk, &up, id).await;
    (bao, up, lk, baseline)
}

async fn short_timeouts(bao: &Bao) -> Latchkey {
    Latchkey::start(
        bao,
        Opts::loopback()
            .proxy("request_timeout = \"1s\"")
            .proxy("body_timeout = \"1s\"")
            .proxy("pool_idle_timeout = \"1s\""),
    )
    .await
}

/// One request on `connection`, then latchkey's descriptors once it is quiet: the baseline.
async fn first_request(lk: &Latchkey, up: &FaultUpstream, connection: &str) -> usize {
    assert_eq!(get(lk, &format!("/{connection}/ok")).await, "200");
    quiet_fds(lk, up).await
}

/// Sends the same GET from `n` clients at once; the tally of their outcomes.
async fn at_once(lk: &Latchkey, path: &str, n: usize) -> Tally {
    let url = lk.url(path);
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                outcome(client.get(url).send().await).await
            })
        })
        .collect();
    let mut tally = Tally::new();
    for t in tasks {
        *tally.entry(t.await.unwrap()).or_default() += 1;
    }
    tally
}

#[tokio::test]
async fn an_upstream_reset_mid_body_reaches_the_client_as_a_body_cut_short() {
    let (_bao, up, lk, baseline) = upstream_fault("reset").await;

    // The head and 64 KiB of a 1 MiB body, then a TCP reset: the client sees the upstream's
    // status and a body that ends before its length (or a 502, when the reset beat the head
    // to latchkey); never its connection closed without a word.
    let tally = at_once(&lk, "/reset/reset?after=65536&length=1048576", 8).await;
    assert!(
        only(&tally, &["200 cut", "502 upstream_unreachable"]),
        "{tally:?}"
    );
    // A reset before any byte of the answer.
    assert_eq!(
        get(&lk, "/reset/reset-head").await,
        "502 upstream_unreachable"
    );
    // The connection itself is fine.
    assert_eq!(get(&lk, "/reset/ok").await, "200");
    fds_back_to(&lk, &up, baseline).await;
}

#[tokio::test]
async fn an_upstream_stalling_after_the_head_is_cut_at_the_body_timeout() {
    let (_bao, up, lk, baseline) = upstream_fault("stall").await;

    // The head and 1 KiB, then nothing: latchkey cuts the body (the client's own 30 s timeout
    // would show as `error`, or as a cut body with a timeout, never as this).
    let tally = at_once(&lk, "/stall/stall", 4).await;
    assert_eq!(tally, Tally::from([("200 cut".to_string(), 4)]));
    // ... and closes the upstream connections (the only one left is the stats request's own).
    wait_until(
        "the stalled upstream connections to be closed",
        Duration::from_secs(20),
        || async { (up.stat("open").await <= 1).then_some(()) },
    )
    .await;
    fds_back_to(&lk, &up, baseline).await;
}

#[tokio::test]
async fn a_slow_upstream_is_504_for_its_requests_only() {
    let (_bao, up, lk, baseline) = upstream_fault("slow").await;

    let load = Load::start(&lk, &["/slow/ok".to_string()], 2);
    let slow = at_once(&lk, "/slow/slow?ms=3000", 4).await;
    let fast = load.finish().await;
    assert_eq!(slow, Tally::from([("504 upstream_timeout".to_string(), 4)]));
    assert!(only(&fast, &["200"]), "{fast:?}");
    fds_back_to(&lk, &up, baseline).await;
}

#[tokio::test]
async fn an_upstream_closing_each_kept_alive_connection_fails_no_get_and_applies_nothing_twice() {
    let (_bao, up, lk, baseline) = upstream_fault("close").await;

    // Every answer is followed by the upstream closing its connection, without a
    // `Connection: close` to say so. GETs and POSTs, one after another on one client
    // connection, then GETs from several at once.
    let client = http();
    let url = lk.url("/close/close");
    let (mut gets, mut posts) = (Tally::new(), Tally::new());
    for _ in 0..20 {
        *gets
            .entry(outcome(client.get(&url).send().await).await)
            .or_default() += 1;
        let post = client.post(&url).body("x".repeat(100)).send().await;
        *posts.entry(outcome(post).await).or_default() += 1;
    }
    drop(client);
    let load = Load::start(&lk, &["/close/close".to_string()], 4);
    wait_until(
        "a hundred more requests",
        Duration::from_secs(30),
        || async { (up.stat("requests").await >= 150).then_some(()) },
    )
    .await;
    for (k, v) in load.finish().await {
        *gets.entry(k).or_default() += v;
    }
    // A GET that finds its pooled connection closed is sent again on a new one. A POST is not
    // (RFC 9112 section 9.3.1): one that took a connection in the instant the upstream closed
    // it is a 502.
    assert!(only(&gets, &["200"]), "{gets:?}");
    assert!(
        only(&posts, &["200", "502 upstream_unreachable"]),
        "{posts:?}"
    );
    // Every request the upstream answered is one success: none applied twice, none lost
    // unseen (the first request included).
    let succeeded = gets.get("200").unwrap_or(&0) + posts.get("200").unwrap_or(&0) + 1;
    assert_eq!(up.stat("requests").await, succeeded as u64);
    fds_back_to(&lk, &up, baseline).await;
}

#[tokio::test]
async fn an_upstream_out_of_descriptors_is_504_then_serves_again() {
    let (_bao, up, lk, baseline) = upstream_fault("nofile").await;
    // Its soft limit down to its lowest free descriptor: a new connection waits in the kernel's
    // backlog, never accepted, never answered.
    let limit = |soft: &str| {
        let out = Command::new("prlimit")
            .arg(format!("--pid={}", up.pid()))
            .arg(format!("--nofile={soft}:"))
            .output()
            .expect("prlimit (util-linux) is needed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let before = std::fs::read_to_string(format!("/proc/{}/limits", up.pid())).unwrap();
    let soft = before
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .to_string();
    // Once it holds no socket but its listener (the stats requests' connections closed), so
    // that no descriptor below the limit frees up afterwards.
    let pid = up.pid();
    wait_until(
        "the upstream to hold only its listener",
        Duration::from_secs(20),
        || std::future::ready((open_sockets(pid) == 1).then_some(())),
    )
    .await;
    limit(&lowest_free_fd(pid).to_string());
    // An accept the upstream was already blocked in took its descriptor before the limit came
    // down (the kernel reserves it first): one connection may still get through.
    let first = get(&lk, "/nofile/close").await;
    assert!(
        ["200", "504 upstream_timeout"].contains(&first.as_str()),
        "{first}"
    );
    let starved = at_once(&lk, "/nofile/close", 4).await;
    assert!(
        only(
            &starved,
            &["504 upstream_timeout", "502 upstream_unreachable"]
        ),
        "{starved:?}"
    );

    limit(&soft);
    wait_until(
        "the upstream to serve again",
        Duration::from_secs(30),
        || async { (get(&lk, "/nofile/close").await == "200").then_some(()) },
    )
    .await;
    fds_back_to(&lk, &up, baseline).await;
}

#[tokio::test]
async fn a_client_leaving_mid_stream_frees_the_upstream_connection() {
    let (_bao, up, lk, baseline) = upstream_fault("vanish").await;

    // Four clients start a 1 GiB download, read 256 KiB of it and go: two close their
    // connection, two reset it.
    for i in 0..4 {
        let mut s = tokio::net::TcpStream::connect(lk.proxy).await.unwrap();
        s.write_all(
            format!(
                "GET /vanish/stream?bytes={} HTTP/1.1\r\nhost: x\r\n\r\n",
                1u64 << 30
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < 256 * 1024 {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended early");
            got += n;
        }
        if i % 2 == 1 {
            s.set_zero_linger().unwrap();
        }
        drop(s);
    }
    wait_until(
        "the upstream's streams to be closed",
        Duration::from_secs(20),
        || async { (up.stat("streams_open").await == 0).then_some(()) },
    )
    .await;
    fds_back_to(&lk, &up, baseline).await;
    assert_eq!(get(&lk, "/vanish/ok").await, "200");
}

// ---------------------------------------------------------------------------------------------
// SIGTERM

#[tokio::test]
async fn sigterm_under_load_lets_requests_in_flight_finish_and_exits_0() {
    let bao = Bao::start().await;
    let up = FaultUpstream::start().await;
    put_bearer(&bao, "term", &up.url());
    let mut lk = Latchkey::start(&bao, Opts::loopback()).await;

    let load = Load::start(&lk, &["/term/ok".to_string()], 4);
    let url = lk.url("/term/slow?ms=1500");
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { outcome(http().get(url).send().await).await })
        })
        .collect();
    wait_until(
        "the slow requests to be at the upstream",
        Duration::from_secs(20),
        || async { (up.stat("in_flight").await == 4).then_some(()) },
    )
    .await;
    lk.terminate();
    let mut in_flight = Tally::new();
    for t in slow {
        *in_flight.entry(t.await.unwrap()).or_default() += 1;
    }
    let status = lk.exited_within(Duration::from_secs(30)).await;
    let tally = load.finish().await;
    assert_eq!(in_flight, Tally::from([("200".to_string(), 4)]));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    // Every request of the load was answered 200, or found latchkey gone.
    assert!(only(&tally, &["200", "error"]), "{tally:?}");
}
