//! PRODUCT.md 10.9: nobody holds latchkey's resources for free. A client connection that sends
//! nothing, or too little, is closed (`proxy.idle_timeout`, a header read timeout); a client
//! may not make latchkey read Vault without bound (misses on unknown IDs are limited per
//! client). `hardening` closes silent sockets, a half head and an idle keep-alive on the proxy
//! listener. Attacks tried here:
//!
//! - slowloris: a head dripped a byte at a time, never idle for long, never ending: on the
//!   proxy listener, as a CONNECT, inside a plain tunnel, inside a TLS tunnel, as a TLS
//!   ClientHello inside a tunnel, and on the admin listener;
//! - silence where the idle timeout has not been looked at: after a CONNECT's 200, and half-way
//!   through a TLS handshake inside a tunnel;
//! - an endless head, sent fast (a header line of megabytes, and a hundred thousand header lines):
//!   refused, not buffered;
//! - invented connection IDs, each a miss, from one client in gateway form, forward form, at
//!   CONNECT and as `latchkey.{id}` placeholders inside a tunnel: the Vault reads they cost are
//!   bounded, another client is still served, and none of them becomes a metrics label.
//!
//! The header read timeout is set as `proxy.header_read_timeout` ([`HEADER_READ_TIMEOUT`]).

use std::time::Instant;

use super::*;

/// The setting of the header read timeout, short for the tests.
const HEADER_READ_TIMEOUT: &str = "header_read_timeout = \"2s\"";
const IDLE_TIMEOUT: &str = "idle_timeout = \"2s\"";
/// How long a test waits for latchkey to close a connection whose timeouts are 2 s.
const GIVE_UP: Duration = Duration::from_secs(15);
/// How often a slow client sends its next byte: well inside the idle timeout.
const DRIP: Duration = Duration::from_millis(400);

/// Writes `first`, then a byte of `filler` every [`DRIP`], until latchkey ends the connection
/// (closes it, resets it, or answers); whether it did before [`GIVE_UP`].
async fn drip_until_closed<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    first: &[u8],
    filler: u8,
) -> bool {
    if s.write_all(first).await.is_err() {
        return true;
    }
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    while started.elapsed() < GIVE_UP {
        // The client's slowness is the subject here: this pause is the attack.
        match tokio::time::timeout(DRIP, s.read(&mut buf)).await {
            Ok(_) => return true,
            Err(_) => {
                if s.write_all(&[filler]).await.is_err() || s.flush().await.is_err() {
                    return true;
                }
            }
        }
    }
    false
}

/// Waits, sending nothing, for latchkey to end the connection; whether it did before
/// [`GIVE_UP`].
async fn closed_in_silence<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(GIVE_UP, s.read(&mut buf))
        .await
        .is_ok()
}

/// A TLS record header announcing a ClientHello longer than what will ever come.
const HELLO_START: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
];

#[tokio::test]
async fn a_head_dripped_a_byte_at_a_time_is_closed_by_the_header_read_timeout() {
    let w = World::start(
        Opts::loopback()
            .proxy(IDLE_TIMEOUT)
            .proxy(HEADER_READ_TIMEOUT),
        |bao, _, secure| {
            put_bearer(bao, "slow", secure);
        },
    )
    .await;
    let authority = w.secure_authority();
    let lk = &w.lk;
    let head = b"GET /slow/x HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let cases = [
        ("proxy listener", 0),
        ("CONNECT head", 1),
        ("inside a plain tunnel", 2),
        ("inside a TLS tunnel", 3),
        ("a ClientHello inside a tunnel", 4),
        ("admin listener", 5),
    ];
    let runs = cases.iter().map(|(what, case)| {
        let authority = authority.clone();
        async move {
            let closed = match case {
                0 => {
                    let mut s = TcpStream::connect(lk.proxy).await.unwrap();
                    drip_until_closed(&mut s, head, b'a').await
                }
                1 => {
                    let mut s = TcpStream::connect(lk.proxy).await.unwrap();
                    let connect =
                        format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nX-Slow: ");
                    drip_until_closed(&mut s, connect.as_bytes(), b'a').await
                }
                2 => {
                    let mut s = open_tunnel(lk, &connect_head(&authority, Some(("slow", ""))))
                        .await
                        .unwrap();
                    drip_until_closed(&mut s, head, b'a').await
                }
                3 => {
                    let s = open_tunnel(lk, &connect_head(&authority, Some(("slow", ""))))
                        .await
                        .unwrap();
                    let mut tls = tls_client(s, "localhost", &[b"http/1.1"]).await.unwrap();
                    drip_until_closed(&mut tls, head, b'a').await
                }
                4 => {
                    let mut s = open_tunnel(lk, &connect_head(&authority, Some(("slow", ""))))
                        .await
                        .unwrap();
                    drip_until_closed(&mut s, HELLO_START, 0).await
                }
                _ => {
                    let mut s = TcpStream::connect(lk.admin).await.unwrap();
                    drip_until_closed(&mut s, b"GET /metrics HTTP/1.1\r\nX-Slow: ", b'a').await
                }
            };
            (*what, closed)
        }
    });
    let results = futures_util::future::join_all(runs).await;
    let open: Vec<&str> = results
        .iter()
        .filter(|(_, c)| !c)
        .map(|(w, _)| *w)
        .collect();
    assert!(
        open.is_empty(),
        "still open after {GIVE_UP:?} of a head dripped every {DRIP:?}: {open:?}"
    );
}

#[tokio::test]
async fn silence_after_a_connect_or_inside_a_tls_handshake_is_closed_by_the_idle_timeout() {
    let w = World::start(Opts::loopback().proxy(IDLE_TIMEOUT), |bao, _, secure| {
        put_bearer(bao, "quiet", secure);
    })
    .await;
    let authority = w.secure_authority();
    let lk = &w.lk;
    let cases = [
        ("after the CONNECT's 200", 0),
        ("half-way through the ClientHello", 1),
        ("after the TLS handshake", 2),
    ];
    let runs = cases.iter().map(|(what, case)| {
        let authority = authority.clone();
        async move {
            let mut s = open_tunnel(lk, &connect_head(&authority, Some(("quiet", ""))))
                .await
                .unwrap();
            let closed = match case {
                0 => closed_in_silence(&mut s).await,
                1 => {
                    s.write_all(HELLO_START).await.unwrap();
                    closed_in_silence(&mut s).await
                }
                _ => {
                    let mut tls = tls_client(s, "localhost", &[b"http/1.1"]).await.unwrap();
                    closed_in_silence(&mut tls).await
                }
            };
            (*what, closed)
        }
    });
    let results = futures_util::future::join_all(runs).await;
    let open: Vec<&str> = results
        .iter()
        .filter(|(_, c)| !c)
        .map(|(w, _)| *w)
        .collect();
    assert!(
        open.is_empty(),
        "still open after {GIVE_UP:?} of silence: {open:?}"
    );
}

#[tokio::test]
async fn an_endless_head_sent_fast_is_refused_not_buffered() {
    let w = World::start(Opts::loopback(), |bao, _, secure| {
        put_bearer(bao, "big", secure);
    })
    .await;
    let authority = w.secure_authority();
    let long_line = {
        let mut h = b"GET /big/x HTTP/1.1\r\nHost: x\r\nX-Long: ".to_vec();
        h.extend(std::iter::repeat_n(b'a', 8 << 20));
        h
    };
    let many_lines = {
        let mut h = b"GET /big/x HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..100_000 {
            h.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        h
    };
    for (what, bytes) in [("a long line", &long_line), ("many lines", &many_lines)] {
        for tunnel in [false, true] {
            let mut s = if tunnel {
                open_tunnel(&w.lk, &connect_head(&authority, Some(("big", ""))))
                    .await
                    .unwrap()
            } else {
                TcpStream::connect(w.lk.proxy).await.unwrap()
            };
            // Written from a task of its own: latchkey may stop reading long before the end.
            let (mut rd, mut wr) = s.split();
            let write = async {
                let _ = wr.write_all(bytes).await;
            };
            let read = async {
                let mut buf = Vec::new();
                tokio::time::timeout(GIVE_UP, read_answer(&mut rd, &mut buf, false)).await
            };
            let (_, got) = tokio::join!(write, read);
            let got = got
                .unwrap_or_else(|_| panic!("{what} (tunnel: {tunnel}): no end after {GIVE_UP:?}"));
            if let Some(a) = got {
                assert!(
                    matches!(a.status, 400 | 413 | 431),
                    "{what} (tunnel: {tunnel}): {a:#?}"
                );
            }
        }
    }
    assert_eq!(w.upstream_requests(), 0);
}

/// The Vault reads latchkey has made, and the answers to `n` invented IDs from `token`'s
/// client, spread over gateway form, forward form, CONNECT, and placeholders inside a tunnel.
async fn invent(w: &World, token: &str, n: usize, stem: &str) -> Vec<u16> {
    let authority = w.secure_authority();
    let mut statuses = Vec::new();
    for i in 0..n {
        let id = format!("{stem}-{i}");
        let got = match i % 4 {
            0 => {
                send(
                    &w.lk,
                    Form::Gateway,
                    &authority,
                    &Req::get(&id, "/x").token(token),
                )
                .await
            }
            1 => {
                send(
                    &w.lk,
                    Form::Forward,
                    &authority,
                    &Req::get(&id, "/x").token(token),
                )
                .await
            }
            2 => {
                send(
                    &w.lk,
                    Form::Tunnel,
                    &authority,
                    &Req::get(&id, "/x").token(token),
                )
                .await
            }
            _ => {
                let header = format!("Authorization: Bearer latchkey.{id}\r\n");
                send(
                    &w.lk,
                    Form::Tunnel,
                    &authority,
                    &Req::get("_", "/x").token(token).headers(&header),
                )
                .await
            }
        };
        statuses.push(got.map_or(0, |a| a.status));
    }
    statuses
}

const FLOODER: &str = "flooder-token-0123456789abcdef";
const NEIGHBOUR: &str = "neighbour-token-0123456789abcdef";

async fn two_clients() -> World {
    let clients = format!(
        "{}{}",
        crate::errors::client_toml("flooder", FLOODER, &["*"]),
        crate::errors::client_toml("neighbour", NEIGHBOUR, &["*"])
    );
    let w = World::start(Opts::loopback().extra(&clients), |bao, _, secure| {
        put_bearer(bao, "real", secure);
    })
    .await;
    w.lk.forbid(FLOODER);
    w.lk.forbid(NEIGHBOUR);
    w
}

#[tokio::test]
async fn invented_connection_ids_cost_a_bounded_number_of_vault_reads_per_client() {
    const INVENTED: usize = 600;
    let w = two_clients().await;
    let before = vault_reads(&w.lk).await;
    let statuses = invent(&w, FLOODER, INVENTED, "invented").await;
    let reads = vault_reads(&w.lk).await - before;
    // Another client is not held back by the first one's misses: its own connection, not
    // cached yet, is read and served.
    let got = w
        .send(Form::Gateway, &Req::get("real", "/x").token(NEIGHBOUR))
        .await;
    echoed(&got, "the neighbour's request after the flood");
    let mut counts = std::collections::BTreeMap::new();
    for s in statuses {
        *counts.entry(s).or_insert(0) += 1;
    }
    assert!(
        reads <= (INVENTED / 3) as f64,
        "{INVENTED} invented IDs from one client cost {reads} Vault reads (answers: {counts:?})"
    );
}

#[tokio::test]
async fn invented_connection_ids_never_become_metrics_labels() {
    let w = two_clients().await;
    invent(&w, FLOODER, 40, "labelled").await;
    let metrics = crate::errors::metrics_text(&w.lk).await;
    let labelled: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("labelled-"))
        .collect();
    assert!(
        labelled.is_empty(),
        "invented IDs became labels:\n{}",
        labelled.join("\n")
    );
}
