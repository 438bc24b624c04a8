//! The hot functions of the request path, one by one.
//!
//!     cargo bench --bench hot_path
//!
//! Last figures (2026-11-29, this machine: 2 cores, release build, criterion's median of 100
//! samples; the README's performance section has them too):
//!
//! | bench | time |
//! |---|---:|
//! | `strip_and_inject/bearer` (Stripe: strip a 9-header client head, inject, set the URI) | 628 ns |
//! | `strip_and_inject/header` (Anthropic: API key header plus the version header) | 745 ns |
//! | `strip_and_inject/basic` (Twilio: Basic from two fields) | 632 ns |
//! | `strip_and_inject/query` (Google Maps: drop the client's `key`, append ours, mask the log path) | 743 ns |
//! | `destination/address_public` (a public IPv4 address against the blocked ranges) | 37 ns |
//! | `destination/address_mapped_metadata` (`::ffff:169.254.169.254`, refused) | 46 ns |
//! | `destination/host_allow_list` (a host against a connection's globs) | 49 ns |
//! | `cache_hit` (a warm connection from the cache) | 93 ns |
//! | `access_log_emit` (the JSON access line into a sink, and the request's metrics) | 2.69 µs |
//! | `upstream_h1/encode_request_head` (the head latchkey's client writes, 8 headers) | 108 ns |
//! | `upstream_h1/parse_response_head` (a 10-header answer into a header map; allocation included) | 926 ns |
//! | `scrub/build` (a connection's matcher, 48-character key; 2026-12-02, a busy machine) | 117 µs |
//! | `scrub/headers_10` (an answer's 10 headers, no form in them) | 124 ns |
//! | `scrub/body_16k` (16 KiB of JSON in four chunks, no form in it) | 3.0 µs |

#![expect(clippy::unwrap_used, reason = "a benchmark's set-up fails loudly")]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::future::{BoxFuture, FutureExt};
use latchkey::cache::{Cache, CacheError, Source};
use latchkey::catalog::Catalog;
use latchkey::config::CacheConfig;
use latchkey::connection::Connection;
use latchkey::connection_id::ConnectionId;
use latchkey::destination::{AddressPolicy, HostAllowList};
use latchkey::inject::{self, Target};
use latchkey::record::StoredConnection;
use latchkey::scrub::Scrubber;
use latchkey::secret::Secret;
use latchkey::telemetry::{AccessLog, CacheOutcome};
use latchkey::upstream::h1;

fn connection(catalog: &Catalog, fields: &[(&str, &str)]) -> Connection {
    Connection::from_stored(
        ConnectionId::parse("bench").unwrap(),
        StoredConnection {
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), Secret::new(*v)))
                .collect::<BTreeMap<_, _>>(),
            version: 1,
            custom_metadata: BTreeMap::new(),
            not_text: Vec::new(),
        },
        catalog,
    )
    .unwrap()
}

/// A request head as a typical client sends it, with a credential header of its own to strip.
fn client_head() -> http::request::Parts {
    http::Request::builder()
        .method("POST")
        .uri("/bench/v1/charges?limit=3")
        .header("host", "127.0.0.1:8080")
        .header("user-agent", "workflow-runner/1.0")
        .header("accept", "application/json")
        .header("content-type", "application/json")
        .header("authorization", "Bearer client-supplied")
        .header("x-request-id", "7d1f6a4e-0c2b-4a8e-9c1d-3f5e6a7b8c9d")
        .header("connection", "keep-alive")
        .header("proxy-authorization", "Bearer token")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn rewrite(c: &mut Criterion) {
    let catalog = Catalog::builtin().unwrap();
    let cases = [
        (
            "bearer",
            connection(
                &catalog,
                &[
                    ("connector", "stripe"),
                    ("api_key", "sk_test_0123456789abcdef"),
                ],
            ),
        ),
        (
            "header",
            connection(
                &catalog,
                &[
                    ("connector", "anthropic"),
                    ("api_key", "sk-ant-0123456789abcdef"),
                ],
            ),
        ),
        (
            "basic",
            connection(
                &catalog,
                &[
                    ("connector", "twilio"),
                    ("account_sid", "AC0123456789abcdef0123456789abcdef"),
                    ("auth_token", "0123456789abcdef0123456789abcdef"),
                ],
            ),
        ),
        (
            "query",
            connection(
                &catalog,
                &[
                    ("connector", "google-maps"),
                    ("api_key", "AIza0123456789abcdef0123456789abcdef012"),
                ],
            ),
        ),
    ];
    let mut group = c.benchmark_group("strip_and_inject");
    for (name, conn) in &cases {
        let target = Target {
            scheme: conn.base.scheme,
            authority: &conn.base.authority,
            path_prefix: &conn.base.path,
        };
        let head = client_head();
        group.bench_function(*name, |b| {
            b.iter_batched(
                || head.clone(),
                |mut parts| {
                    let log = inject::rewrite(
                        &mut parts,
                        "/v1/charges?limit=3&key=x",
                        target,
                        &conn.credential,
                        &conn.connector,
                    )
                    .unwrap();
                    black_box((parts, log))
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn destination(c: &mut Criterion) {
    let policy = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
    let public: IpAddr = "93.184.216.34".parse().unwrap();
    let mapped: IpAddr = "::ffff:169.254.169.254".parse().unwrap();
    let mut hosts = HostAllowList::new("api.stripe.com", 443, 443);
    hosts.push("files.stripe.com").unwrap();
    hosts.push("*.stripe.com").unwrap();
    let mut group = c.benchmark_group("destination");
    group.bench_function("address_public", |b| {
        b.iter(|| black_box(policy.check(black_box(public))))
    });
    group.bench_function("address_mapped_metadata", |b| {
        b.iter(|| black_box(policy.check(black_box(mapped))))
    });
    group.bench_function("host_allow_list", |b| {
        b.iter(|| black_box(hosts.allows(black_box("uploads.stripe.com"))))
    });
    group.finish();
}

struct Fixed(Arc<Catalog>);

impl Source for Fixed {
    fn load(&self, id: ConnectionId) -> BoxFuture<'static, Result<Option<Connection>, CacheError>> {
        let catalog = self.0.clone();
        async move {
            Ok(Some(
                Connection::from_stored(
                    id,
                    StoredConnection {
                        fields: [
                            ("connector", "stripe"),
                            ("api_key", "sk_test_0123456789abcdef"),
                        ]
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), Secret::new(v)))
                        .collect(),
                        version: 1,
                        custom_metadata: BTreeMap::new(),
                        not_text: Vec::new(),
                    },
                    &catalog,
                )
                .unwrap(),
            ))
        }
        .boxed()
    }
}

fn cache_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cache = Cache::new(
        &CacheConfig {
            ttl: Duration::from_secs(3600),
            max_stale: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(10),
            max_entries: 100_000,
            miss_rate: 10.0,
            miss_burst: 20,
        },
        Arc::new(Fixed(Arc::new(Catalog::builtin().unwrap()))),
    );
    let ids: Vec<ConnectionId> = (0..1000)
        .map(|i| ConnectionId::parse(&format!("conn-{i}")).unwrap())
        .collect();
    rt.block_on(async {
        for id in &ids {
            cache.get(id).await.unwrap();
        }
    });
    let id = ids[500].clone();
    c.bench_function("cache_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(cache.get(&id).await.is_ok()) })
    });
}

fn access_log(c: &mut Criterion) {
    // The Prometheus recorder (the access log also records the request's metrics), and a JSON
    // subscriber writing to a sink: the formatting cost without the I/O.
    latchkey::telemetry::metrics_handle();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(std::io::sink)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let log = AccessLog {
        form: "gateway",
        connection: Some("stripe-prod".into()),
        connection_known: true,
        client: Some("billing-workflows".into()),
        method: http::Method::POST,
        host: Some("api.stripe.com".into()),
        path: Some(latchkey::telemetry::LogPath::Masked(
            "/v1/charges?limit=3".into(),
        )),
        status: 200,
        error: None,
        cache: Some(CacheOutcome::Hit),
        upstream_version: Some("h2"),
        bytes_in: 512,
        bytes_out: 2048,
    };
    c.bench_function("access_log_emit", |b| {
        b.iter(|| log.emit(black_box(Duration::from_micros(850))))
    });
}

/// latchkey's HTTP/1.1 client: the request head it writes and the response head it reads.
fn upstream_h1(c: &mut Criterion) {
    let mut group = c.benchmark_group("upstream_h1");
    let catalog = Catalog::builtin().unwrap();
    let conn = connection(
        &catalog,
        &[
            ("connector", "stripe"),
            ("api_key", "sk_test_bench_0123456789abcdef"),
        ],
    );
    let mut parts = client_head();
    let target = Target {
        scheme: conn.base.scheme,
        authority: &conn.base.authority,
        path_prefix: &conn.base.path,
    };
    inject::rewrite(
        &mut parts,
        "/v1/charges?limit=3",
        target,
        &conn.credential,
        &conn.connector,
    )
    .unwrap();
    group.bench_function("encode_request_head", |b| {
        b.iter(|| {
            h1::encode_head(
                black_box(&parts),
                "api.stripe.com",
                h1::RequestFraming::Length(512),
            )
        })
    });
    const ANSWER: &[u8] =
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 29 Nov 2026 20:00:00 GMT\r\n\
Content-Type: application/json\r\nContent-Length: 512\r\nConnection: keep-alive\r\n\
Request-Id: req_0123456789abcdef\r\nStripe-Version: 2024-06-20\r\n\
Cache-Control: no-cache, no-store\r\nAccess-Control-Allow-Origin: *\r\n\r\n";
    let mut spans = Vec::new();
    group.bench_function("parse_response_head", |b| {
        b.iter_batched(
            || BytesMut::from(ANSWER),
            |mut buf| {
                h1::parse_head(&mut buf, &mut spans, false)
                    .unwrap()
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Scrubbing an answer (section 10): a connection's matcher built once per cache fill, then
/// every answer's headers and body searched for the credential's forms (none found: the usual
/// case, and the cost every answer pays).
fn scrub(c: &mut Criterion) {
    let key = b"sk_live_51Hx0123456789abcdefGHIJKLmnopqrSTUVwxyz";
    let mut group = c.benchmark_group("scrub");
    group.bench_function("build", |b| {
        b.iter(|| Scrubber::new([black_box(&key[..])], [], "stripe-prod").unwrap())
    });
    let scrubber = Scrubber::new([&key[..]], [], "stripe-prod").unwrap();
    let mut headers = http::HeaderMap::new();
    for (k, v) in [
        ("server", "nginx"),
        ("date", "Sun, 29 Nov 2026 20:00:00 GMT"),
        ("content-type", "application/json"),
        ("content-length", "16384"),
        ("request-id", "req_0123456789abcdef"),
        ("stripe-version", "2024-06-20"),
        ("cache-control", "no-cache, no-store"),
        ("access-control-allow-origin", "*"),
        ("idempotency-key", "0b5e7a3c-5d9f-4c1e-9a57-2f8e4d6b1c0a"),
        (
            "x-stripe-routing-context-priority-tier",
            "livemode-critical",
        ),
    ] {
        headers.insert(k, http::HeaderValue::from_static(v));
    }
    group.bench_function("headers_10", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| scrubber.headers(&mut h),
            BatchSize::SmallInput,
        )
    });
    // 16 KiB of a JSON list, in four chunks as they come off the wire.
    let item = br#"{"id":"ch_3Nx0123456789","object":"charge","amount":2000,"currency":"usd","status":"succeeded","metadata":{"order":"6735"}},"#;
    let body: Vec<u8> = item.iter().copied().cycle().take(16 * 1024).collect();
    let chunks: Vec<Bytes> = body.chunks(4096).map(Bytes::copy_from_slice).collect();
    group.bench_function("body_16k", |b| {
        b.iter(|| {
            let mut stream = scrubber.stream();
            let mut n = 0;
            for chunk in &chunks {
                n += stream.push(chunk.clone()).len();
            }
            n + stream.finish().len()
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    rewrite,
    destination,
    cache_hit,
    access_log,
    upstream_h1,
    scrub
);
criterion_main!(benches);
