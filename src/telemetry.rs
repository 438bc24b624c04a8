//! Logging and metrics: the tracing set-up, the access log line, and every metric name.
//!
//! Labels are bounded: connection IDs appear only once a connection has been found in Vault,
//! client names come from the configuration, and errors are labelled by their code, never by a
//! message. No value recorded here is derived from a credential.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::uri::PathAndQuery;
use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Metric names, in one place.
pub mod names {
    pub const REQUESTS: &str = "latchkey_requests_total";
    pub const REQUEST_DURATION: &str = "latchkey_request_duration_seconds";
    pub const REQUEST_BYTES: &str = "latchkey_request_bytes_total";
    pub const ERRORS: &str = "latchkey_errors_total";
    pub const CACHE_LOOKUPS: &str = "latchkey_cache_lookups_total";
    pub const CACHE_ENTRIES: &str = "latchkey_cache_entries";
    pub const VAULT_REQUESTS: &str = "latchkey_vault_requests_total";
    pub const VAULT_DURATION: &str = "latchkey_vault_request_duration_seconds";
    pub const VAULT_AUTH: &str = "latchkey_vault_auth_total";
    pub const UPSTREAM_ERRORS: &str = "latchkey_upstream_errors_total";
    pub const UPSTREAM_UNAUTHORIZED: &str = "latchkey_upstream_unauthorized_total";
    pub const UPSTREAM_FORBIDDEN: &str = "latchkey_upstream_forbidden_total";
    pub const RESPONSE_SCRUBBED: &str = "latchkey_response_scrubbed_total";
    pub const CONNECTION_EXPIRY: &str = "latchkey_connection_expiry_seconds";
    pub const CLIENT_CONNECTIONS: &str = "latchkey_client_connections";
    pub const CLIENT_CONNECTIONS_CLOSED: &str = "latchkey_client_connections_closed_total";
    pub const TUNNELS_OPEN: &str = "latchkey_tunnels_open";
    pub const TUNNEL_LEAVES: &str = "latchkey_tunnel_leaf_certificates_total";
    pub const TUNNEL_HANDSHAKE_FAILURES: &str = "latchkey_tunnel_handshake_failures_total";
    pub const WEBSOCKETS_OPEN: &str = "latchkey_websockets_open";
    pub const VAULT_STALLS: &str = "latchkey_vault_stalls_total";
    pub const CONFIG_RELOADS: &str = "latchkey_config_reloads_total";
    pub const UPSTREAM_TLS_HANDSHAKES: &str = "latchkey_upstream_tls_handshakes_total";
}

/// Counts an upgraded WebSocket as open (`latchkey_websockets_open`) until dropped: once
/// upgraded, it is no longer one of the server's client connections.
pub struct WebSocketOpen(());

impl WebSocketOpen {
    pub fn open() -> WebSocketOpen {
        gauge!(names::WEBSOCKETS_OPEN).increment(1.0);
        WebSocketOpen(())
    }
}

impl Drop for WebSocketOpen {
    fn drop(&mut self) {
        gauge!(names::WEBSOCKETS_OPEN).decrement(1.0);
    }
}

/// Counts a tunnel as open (`latchkey_tunnels_open`) until dropped.
pub struct TunnelOpen(());

impl TunnelOpen {
    pub fn open() -> TunnelOpen {
        gauge!(names::TUNNELS_OPEN).increment(1.0);
        TunnelOpen(())
    }
}

impl Drop for TunnelOpen {
    fn drop(&mut self) {
        gauge!(names::TUNNELS_OPEN).decrement(1.0);
    }
}

/// A tunnel's leaf certificate: `hit` (cached), `minted`, or `failed` (none could be made for
/// the CONNECT host: the client got no certificate).
pub fn tunnel_leaf(outcome: &'static str) {
    counter!(names::TUNNEL_LEAVES, "outcome" => outcome).increment(1);
}

/// A TLS handshake with an upstream completed: `resumed` from a saved session, or `full`.
pub fn upstream_tls_handshake(resumed: bool) {
    let kind = if resumed { "resumed" } else { "full" };
    counter!(names::UPSTREAM_TLS_HANDSHAKES, "kind" => kind).increment(1);
}

/// A client's TLS handshake inside a tunnel failed, by reason (`untrusted_ca`, `alert`, ...).
pub fn tunnel_handshake_failed(reason: &'static str) {
    counter!(names::TUNNEL_HANDSHAKE_FAILURES, "reason" => reason).increment(1);
}

/// The gauge of client connections open on proxy worker `worker`.
pub fn client_connections(worker: usize) -> metrics::Gauge {
    gauge!(names::CLIENT_CONNECTIONS, "worker" => worker.to_string())
}

/// latchkey closed a client connection (or tunnel) of its own accord, for `reason` (`idle`,
/// `stalled`: the reasons of the idle watch).
pub fn client_connection_closed(reason: &'static str) {
    counter!(names::CLIENT_CONNECTIONS_CLOSED, "reason" => reason).increment(1);
}

/// Sets up logging: JSON lines on standard error, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::new(log_directives(
        std::env::var("RUST_LOG").ok().as_deref(),
    ));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    // The default hook prints the panic's message, which could quote a value; this one says
    // where it happened and nothing else.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(%location, "panic (message withheld)");
    }));
}

/// The log filter's directives: `RUST_LOG` (`info` without it), with vaultrs and rustify off
/// unless it names them. They log every failed Vault call (a 404 for an unknown connection, so
/// one per guessed ID, and every call while Vault is sealed) at ERROR; latchkey logs its own
/// classified line instead.
fn log_directives(rust_log: Option<&str>) -> String {
    let mut directives = match rust_log.map(str::trim) {
        Some(given) if !given.is_empty() => given.to_string(),
        _ => "info".to_string(),
    };
    for noisy in ["vaultrs", "rustify"] {
        if !directives.contains(noisy) {
            directives.push_str(&format!(",{noisy}=off"));
        }
    }
    directives
}

/// The process's Prometheus recorder, installed on first use.
pub fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        const BUCKETS: &[f64] = &[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0,
        ];
        let builder = PrometheusBuilder::new();
        let builder = builder
            .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // A second install (several servers in one test process) keeps the first recorder.
        if metrics::set_global_recorder(recorder).is_ok() {
            describe();
            spawn_upkeep(handle.clone());
        }
        handle
    })
}

/// Each metric's `# HELP` line (`promtool check metrics` wants one), and zero for those with no
/// label, so that a dashboard or an `absent()` alert sees 0 rather than no series before the
/// first tunnel, WebSocket or Vault stall.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    use names::*;
    describe_counter!(
        REQUESTS,
        "Requests answered, by form, connection, client and status."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from a request's head to its answer's end, by form."
    );
    describe_counter!(
        REQUEST_BYTES,
        Unit::Bytes,
        "Body bytes proxied, by direction."
    );
    describe_counter!(ERRORS, "Answers with a Latchkey-Error, by code.");
    describe_counter!(CACHE_LOOKUPS, "Connection cache lookups, by outcome.");
    describe_gauge!(CACHE_ENTRIES, "Connections in the cache.");
    describe_counter!(VAULT_REQUESTS, "Calls to Vault, by op and outcome.");
    describe_histogram!(
        VAULT_DURATION,
        Unit::Seconds,
        "Time of a call to Vault, by op."
    );
    describe_counter!(
        VAULT_AUTH,
        "Vault logins and token renewals, by op and outcome."
    );
    describe_counter!(
        UPSTREAM_ERRORS,
        "Upstream failures, by Latchkey-Error code."
    );
    describe_counter!(
        UPSTREAM_UNAUTHORIZED,
        "Upstream 401 answers, by connection."
    );
    describe_counter!(UPSTREAM_FORBIDDEN, "Upstream 403 answers, by connection.");
    describe_counter!(
        RESPONSE_SCRUBBED,
        "Forms of a connection's key replaced in upstream answers, by connection."
    );
    describe_gauge!(
        CONNECTION_EXPIRY,
        Unit::Seconds,
        "Seconds until a connection's expires_at, by connection."
    );
    describe_gauge!(
        CLIENT_CONNECTIONS,
        "Open client connections, by proxy worker."
    );
    describe_counter!(
        CLIENT_CONNECTIONS_CLOSED,
        "Client connections latchkey closed, by reason (idle or stalled)."
    );
    describe_gauge!(TUNNELS_OPEN, "Open CONNECT tunnels.");
    describe_counter!(TUNNEL_LEAVES, "Leaf certificates for tunnels, by outcome.");
    describe_counter!(
        TUNNEL_HANDSHAKE_FAILURES,
        "TLS handshakes inside tunnels that failed, by reason."
    );
    describe_gauge!(WEBSOCKETS_OPEN, "Open WebSocket upgrades.");
    describe_counter!(
        VAULT_STALLS,
        "Times Vault was found hung (a re-read kept a request waiting)."
    );
    describe_counter!(
        CONFIG_RELOADS,
        "Configuration reloads (SIGHUP), by outcome."
    );
    describe_counter!(
        UPSTREAM_TLS_HANDSHAKES,
        "TLS handshakes with upstreams, by kind (full or resumed)."
    );
    metrics::gauge!(TUNNELS_OPEN).set(0.0);
    metrics::gauge!(WEBSOCKETS_OPEN).set(0.0);
    metrics::gauge!(CACHE_ENTRIES).set(0.0);
    metrics::counter!(VAULT_STALLS).absolute(0);
}

/// How often the recorder folds the samples histograms have taken into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the recorder's upkeep on a thread of its own. Without it a histogram keeps every sample
/// it is given until `/metrics` is next rendered: a gateway never scraped would grow by 8 bytes
/// per request.
fn spawn_upkeep(handle: PrometheusHandle) {
    let started = std::thread::Builder::new()
        .name("latchkey-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms grow until /metrics is read");
    }
}

/// The path the access log shows: the upstream path itself when it carries no secret, or a
/// copy with the credential's query value masked.
#[derive(Debug, Clone)]
pub enum LogPath {
    Shared(PathAndQuery),
    Masked(String),
}

impl LogPath {
    pub fn as_str(&self) -> &str {
        match self {
            LogPath::Shared(p) => p.as_str(),
            LogPath::Masked(s) => s,
        }
    }
}

impl std::fmt::Display for LogPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for LogPath {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Cache lookup outcomes, as logged and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
    Stale,
    Negative,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Stale => "stale",
            CacheOutcome::Negative => "negative",
        }
    }
}

pub fn cache_lookup(outcome: CacheOutcome) {
    let i = match outcome {
        CacheOutcome::Hit => 0,
        CacheOutcome::Miss => 1,
        CacheOutcome::Stale => 2,
        CacheOutcome::Negative => 3,
    };
    hot().cache[i].increment(1);
}

pub fn cache_entries(n: usize) {
    gauge!(names::CACHE_ENTRIES).set(n as f64);
}

pub fn vault_call(op: &'static str, outcome: &'static str, elapsed: Duration) {
    counter!(names::VAULT_REQUESTS, "op" => op, "outcome" => outcome).increment(1);
    histogram!(names::VAULT_DURATION, "op" => op).record(elapsed.as_secs_f64());
}

/// A login to Vault (`op` `login`) or a renewal of latchkey's token (`renew`), by outcome: `ok`,
/// `refused` (Vault answered no) or `error` (no answer, or one that could not be read).
pub fn vault_auth(op: &'static str, outcome: &'static str) {
    counter!(names::VAULT_AUTH, "op" => op, "outcome" => outcome).increment(1);
}

/// A configuration reload (SIGHUP): `ok` or `failed` (the file was refused).
pub fn config_reload(outcome: &'static str) {
    counter!(names::CONFIG_RELOADS, "outcome" => outcome).increment(1);
}

/// Vault was noticed hanging: expired connections are served stale without waiting from now on.
pub fn vault_stalled() {
    counter!(names::VAULT_STALLS).increment(1);
}

pub fn upstream_forbidden(connection: &str) {
    counter!(names::UPSTREAM_FORBIDDEN, "connection" => connection.to_string()).increment(1);
}

/// When each known connection's key expires. `latchkey_connection_expiry_seconds` is computed
/// from this at every scrape, so it counts down and disappears with the expiry (a gauge set
/// once would freeze and outlive a deleted connection).
fn expiries() -> &'static dashmap::DashMap<String, time::OffsetDateTime> {
    static EXPIRIES: OnceLock<dashmap::DashMap<String, time::OffsetDateTime>> = OnceLock::new();
    EXPIRIES.get_or_init(dashmap::DashMap::new)
}

/// Records (or, with `None`, forgets) when a connection's key expires.
pub fn connection_expiry(connection: &str, expires_at: Option<time::OffsetDateTime>) {
    match expires_at {
        Some(at) => {
            expiries().insert(connection.to_string(), at);
        }
        None => {
            expiries().remove(connection);
        }
    }
}

/// The Prometheus text of every metric, the expiry gauge included.
pub fn render_metrics() -> String {
    let mut text = metrics_handle().render();
    let now = time::OffsetDateTime::now_utc();
    let mut lines: Vec<(String, i64)> = expiries()
        .iter()
        .map(|e| (e.key().clone(), (*e.value() - now).whole_seconds()))
        .collect();
    if !lines.is_empty() {
        lines.sort();
        text.push_str(&format!(
            "# HELP {0} Seconds until the connection's key expires (negative once it has).\n# TYPE {0} gauge\n",
            names::CONNECTION_EXPIRY
        ));
        // Connection IDs are letters, digits, '-' and '_': nothing to escape in a label.
        for (id, left) in lines {
            text.push_str(&format!(
                "{}{{connection=\"{id}\"}} {left}\n",
                names::CONNECTION_EXPIRY
            ));
        }
    }
    text
}

/// `n` forms of a connection's credential replaced in an upstream's answer.
pub fn response_scrubbed(connection: &str, n: u64) {
    counter!(names::RESPONSE_SCRUBBED, "connection" => connection.to_string()).increment(n);
}

pub fn upstream_unauthorized(connection: &str) {
    counter!(names::UPSTREAM_UNAUTHORIZED, "connection" => connection.to_string()).increment(1);
}

/// One request's access-log record, filled in as the request goes and emitted once. Its
/// fields are shared or static where they can be, so that filling it allocates little.
#[derive(Debug, Clone)]
pub struct AccessLog {
    pub form: &'static str,
    pub connection: Option<Arc<str>>,
    /// The connection was found, so its ID may label metrics.
    pub connection_known: bool,
    pub client: Option<Arc<str>>,
    pub method: http::Method,
    pub host: Option<Arc<str>>,
    pub path: Option<LogPath>,
    pub status: u16,
    pub error: Option<&'static str>,
    pub cache: Option<CacheOutcome>,
    pub upstream_version: Option<&'static str>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog {
            form: "-",
            connection: None,
            connection_known: false,
            client: None,
            method: http::Method::GET,
            host: None,
            path: None,
            status: 0,
            error: None,
            cache: None,
            upstream_version: None,
            bytes_in: 0,
            bytes_out: 0,
        }
    }
}

impl AccessLog {
    /// Writes the access line and records the request's metrics.
    pub fn emit(&self, elapsed: Duration) {
        tracing::info!(
            target: "latchkey::access",
            form = self.form,
            connection = self.connection.as_deref().unwrap_or("-"),
            client = self.client.as_deref().unwrap_or("-"),
            method = self.method.as_str(),
            host = self.host.as_deref().unwrap_or("-"),
            path = self.path.as_ref().map_or("-", |p| p.as_str()),
            status = self.status,
            error = self.error.unwrap_or("-"),
            cache = self.cache.map_or("-", CacheOutcome::as_str),
            upstream_version = self.upstream_version.unwrap_or("-"),
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            "access"
        );
        let connection = self.connection.as_ref().filter(|_| self.connection_known);
        count_request(self.form, connection, self.client.as_ref(), self.status);
        let hot = hot();
        hot.duration(self.form).record(elapsed.as_secs_f64());
        // Most requests have no body: an increment by nothing is still two atomic writes.
        if self.bytes_in > 0 {
            hot.bytes_in.increment(self.bytes_in);
        }
        if self.bytes_out > 0 {
            hot.bytes_out.increment(self.bytes_out);
        }
        if let Some(code) = self.error {
            counter!(names::ERRORS, "code" => code).increment(1);
            if code.starts_with("upstream_") || code == "destination_blocked" {
                counter!(names::UPSTREAM_ERRORS, "code" => code).increment(1);
            }
        }
    }
}

/// Handles of the metrics every request records, registered once. Looking a labelled metric
/// up in the registry on every request (building its key, hashing its labels) was a visible
/// share of the request path.
struct Hot {
    duration_gateway: Histogram,
    duration_forward: Histogram,
    duration_tunnel: Histogram,
    duration_passthrough: Histogram,
    duration_other: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
    cache: [Counter; 4],
}

impl Hot {
    fn duration(&self, form: &str) -> &Histogram {
        match form {
            "gateway" => &self.duration_gateway,
            "forward" => &self.duration_forward,
            "tunnel" => &self.duration_tunnel,
            "passthrough" => &self.duration_passthrough,
            _ => &self.duration_other,
        }
    }
}

fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(|| {
        metrics_handle();
        Hot {
            duration_gateway: histogram!(names::REQUEST_DURATION, "form" => "gateway"),
            duration_forward: histogram!(names::REQUEST_DURATION, "form" => "forward"),
            duration_tunnel: histogram!(names::REQUEST_DURATION, "form" => "tunnel"),
            duration_passthrough: histogram!(names::REQUEST_DURATION, "form" => "passthrough"),
            duration_other: histogram!(names::REQUEST_DURATION, "form" => "-"),
            bytes_in: counter!(names::REQUEST_BYTES, "direction" => "in"),
            bytes_out: counter!(names::REQUEST_BYTES, "direction" => "out"),
            cache: [
                CacheOutcome::Hit,
                CacheOutcome::Miss,
                CacheOutcome::Stale,
                CacheOutcome::Negative,
            ]
            .map(|o| counter!(names::CACHE_LOOKUPS, "outcome" => o.as_str())),
        }
    })
}

#[derive(PartialEq, Eq, Hash)]
struct RequestKey {
    form: &'static str,
    connection: Option<Arc<str>>,
    client: Option<Arc<str>>,
    status: u16,
}

/// Entries a worker keeps before it starts over; the labels are bounded, this bounds memory.
const REQUEST_COUNTERS_MAX: usize = 65_536;

thread_local! {
    /// Set while this thread drops what was still open at a stop past its grace.
    static CUTTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the requests ending now on this thread are cut by a stop past its grace (their
/// access lines say `shutdown`), not ended by their client or upstream.
pub fn cutting() -> bool {
    CUTTING.with(std::cell::Cell::get)
}

/// Runs `f` (a worker dropping its runtime, and with it every connection still open) with
/// [`cutting`] true on this thread.
pub fn cut<T>(f: impl FnOnce() -> T) -> T {
    CUTTING.with(|c| c.set(true));
    let t = f();
    CUTTING.with(|c| c.set(false));
    t
}

thread_local! {
    /// `latchkey_requests_total` handles by label set, per thread (no lock on the hot path).
    static REQUEST_COUNTERS: RefCell<HashMap<RequestKey, Counter, foldhash::fast::RandomState>> =
        RefCell::new(HashMap::with_hasher(foldhash::fast::RandomState::default()));
}

fn count_request(
    form: &'static str,
    connection: Option<&Arc<str>>,
    client: Option<&Arc<str>>,
    status: u16,
) {
    let key = RequestKey {
        form,
        connection: connection.cloned(),
        client: client.cloned(),
        status,
    };
    REQUEST_COUNTERS.with(|map| {
        let mut map = map.borrow_mut();
        if let Some(c) = map.get(&key) {
            c.increment(1);
            return;
        }
        if map.len() >= REQUEST_COUNTERS_MAX {
            map.clear();
        }
        let c = counter!(
            names::REQUESTS,
            "form" => form,
            "connection" => key.connection.as_deref().unwrap_or("-").to_string(),
            "client" => key.client.as_deref().unwrap_or("-").to_string(),
            "status" => status_label(status)
        );
        c.increment(1);
        map.insert(key, c);
    })
}

/// Status codes as static labels, so that recording one allocates nothing.
fn status_label(status: u16) -> &'static str {
    const LABELS: [&str; 6] = ["0xx", "1xx", "2xx", "3xx", "4xx", "5xx"];
    match status {
        200 => "200",
        201 => "201",
        204 => "204",
        301 => "301",
        302 => "302",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        407 => "407",
        409 => "409",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        s => LABELS.get(usize::from(s / 100)).copied().unwrap_or("other"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vault_clients_error_lines_are_off_unless_named() {
        assert_eq!(log_directives(None), "info,vaultrs=off,rustify=off");
        assert_eq!(log_directives(Some(" ")), "info,vaultrs=off,rustify=off");
        assert_eq!(log_directives(Some("info")), "info,vaultrs=off,rustify=off");
        assert_eq!(
            log_directives(Some("trace,vaultrs=debug")),
            "trace,vaultrs=debug,rustify=off"
        );
    }
}
