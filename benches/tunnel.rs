//! What a tunnel costs in TLS: minting a host's leaf, and the handshake with a cached one.
//!
//!     cargo bench --bench tunnel
//!
//! Last figures (2026-12-02, this machine: 2 cores, release build, criterion's median of 100
//! samples). A tunnel's first use of a host costs a mint plus a handshake; every later tunnel
//! to it, the cache hit plus a handshake:
//!
//! | bench | time |
//! |---|---:|
//! | `tunnel/mint_leaf` (a P-256 key, the leaf signed by the CA, its `ServerConfig`) | 110 µs |
//! | `tunnel/cached_config` (a warm host's `ServerConfig` from the cache) | 269 ns |
//! | `tunnel/handshake_tls13_h2` (a full handshake over an in-memory pipe, no resumption) | 481 µs |
//! | `tunnel/handshake_tls12_h2` (the same, TLS 1.2) | 603 µs |

#![expect(clippy::unwrap_used, reason = "a benchmark's set-up fails loudly")]

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use latchkey::ca::{Ca, Leaves, Minted};
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn mint(c: &mut Criterion) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = Arc::new(Ca::generate("latchkey bench CA").unwrap());
    let mut group = c.benchmark_group("tunnel");

    // One entry and two hosts taking turns: every call evicts the other host and mints.
    let leaves = Leaves::new(ca.clone(), 1);
    let hosts = ["a.example.com", "b.example.com"];
    let mut turn = 0usize;
    group.bench_function("mint_leaf", |b| {
        b.iter(|| {
            turn += 1;
            let (config, minted) = leaves.server_config(hosts[turn % 2]).unwrap();
            assert_eq!(minted, Minted::Minted);
            black_box(config)
        })
    });

    let leaves = Leaves::new(ca, 1024);
    leaves.server_config("api.example.com").unwrap();
    group.bench_function("cached_config", |b| {
        b.iter(|| black_box(leaves.server_config("api.example.com").unwrap()))
    });
    group.finish();
}

/// A client as a new tunnel's is: trusts the CA, offers h2 and http/1.1, and has no session to
/// resume.
fn client(ca: &Ca, versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let mut client = ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    client.resumption = Resumption::disabled();
    Arc::new(client)
}

/// One handshake over an in-memory pipe, then a byte each way so that both ends are done.
async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let serve = async move {
        let mut tls = TlsAcceptor::from(server).accept(server_io).await.unwrap();
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.unwrap();
        tls.write_all(&byte).await.unwrap();
    };
    let connect = async move {
        let name = ServerName::try_from("api.example.com").unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(name, client_io)
            .await
            .unwrap();
        tls.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    };
    tokio::join!(serve, connect);
}

fn handshakes(c: &mut Criterion) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let ca = Arc::new(Ca::generate("latchkey bench CA").unwrap());
    let leaves = Leaves::new(ca.clone(), 16);
    let (server, _) = leaves.server_config("api.example.com").unwrap();

    let mut group = c.benchmark_group("tunnel");
    for (name, version) in [
        ("handshake_tls13_h2", &rustls::version::TLS13),
        ("handshake_tls12_h2", &rustls::version::TLS12),
    ] {
        let client = client(&ca, &[version]);
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| handshake(server.clone(), client.clone()))
        });
    }
    group.finish();
}

criterion_group!(benches, mint, handshakes);
criterion_main!(benches);
