//! PRODUCT.md 10.2: destination addresses are checked after resolution, on the address actually
//! dialled, whatever spelling names them. `destination` already tries `2130706433`, `127.1`,
//! `0x7f.0.0.1`, `0177.0.0.1`, `[::ffff:127.0.0.1]` and the metadata addresses in gateway and
//! forward form, and `tunnel` a CONNECT to a name pinned to loopback and to two IP literals.
//! Attacks tried here, each in gateway form (a stored base URL), forward form (an absolute URL
//! the connection's `allowed_hosts` names) and tunnel form (`CONNECT`, plain HTTP inside):
//!
//! - more spellings of 127.0.0.1: one hexadecimal or octal number (`0x7f000001`,
//!   `017700000001`), short forms (`127.0.1`, `0x7f.1`), zero-padded octets
//!   (`127.000.000.001`), IPv4-mapped in hex and in full (`[::ffff:7f00:1]`,
//!   `[0:0:0:0:0:ffff:127.0.0.1]`), capitals (`LOCALHOST`); with loopback allowed each of them
//!   does reach the upstream, so the refusals are the address check;
//! - trailing dots: `127.0.0.1.`, `localhost.`, `127.1.`, `0x7f000001.`;
//! - loopback carried inside IPv6 (IPv4-compatible `[::127.0.0.1]`, NAT64 `[64:ff9b::7f00:1]`,
//!   6to4 `[2002:7f00:1::]`);
//! - the unspecified address, which reaches the host's own listeners: `0`, `0x0`, `0.0`,
//!   `0.0.0.0` (in the tunnel form), `[::]`, `[0:0:0:0:0:0:0:0]`, `[::ffff:0.0.0.0]`, with
//!   loopback allowed;
//! - IPv6 loopback spelled out and with zone IDs (`[0:0:0:0:0:0:0:1]`, `[0::1]`,
//!   `[::1%25lo]`, `[fe80::1%25lo]`), with 127.0.0.0/8 allowed (not ::1);
//! - Unicode dots and full-width digits (`127。0。0。1`, `１２７.０.０.１`) and
//!   percent-encoded hosts (`127%2e0%2e0%2e1`, `loc%61lhost`);
//! - a name pinned to loopback with `proxy.resolve`, in gateway and forward form;
//! - a WebSocket handshake to a loopback spelling.

use super::*;

/// latchkey on `opts` with its CA; a connection `g-{i}` per spelling with the base URL
/// `http://{spelling}:{port}`, and `forms` (base URL `http://127.0.0.1:{port}`) whose allowed
/// hosts are every `{spelling}:{port}`.
async fn spelled(opts: Opts, spellings: &[(&str, u16)]) -> (Bao, Latchkey) {
    let bao = Bao::start().await;
    for (i, (h, p)) in spellings.iter().enumerate() {
        put_json(
            &bao,
            &format!("g-{i}"),
            &[
                ("connector", "generic-bearer"),
                ("base_url", &format!("http://{h}:{p}")),
                ("api_key", "spelled_gateway_key_0123"),
            ],
        )
        .await;
    }
    let hosts: Vec<String> = spellings.iter().map(|(h, p)| format!("{h}:{p}")).collect();
    put_json(
        &bao,
        "forms",
        &[
            ("connector", "generic-bearer"),
            ("base_url", "http://127.0.0.1:1"),
            ("allowed_hosts", &hosts.join(",")),
            ("api_key", "spelled_forms_key_0123"),
        ],
    )
    .await;
    let ca = Ca::init().await;
    let lk = Latchkey::start(&bao, with_ca(opts, &ca)).await;
    (bao, lk)
}

/// The answers to `GET /x` at each spelling, in each form: (what, answer).
async fn attempts(lk: &Latchkey, spellings: &[(&str, u16)]) -> Vec<(String, Option<Answer>)> {
    let mut out = Vec::new();
    for (i, (h, p)) in spellings.iter().enumerate() {
        let id = format!("g-{i}");
        let authority = format!("{h}:{p}");
        out.push((
            format!("gateway, base URL http://{authority}"),
            send(lk, Form::Gateway, &authority, &Req::get(&id, "/x")).await,
        ));
        for form in [Form::Forward, Form::PlainTunnel] {
            out.push((
                format!("{form:?} to {authority}"),
                send(lk, form, &authority, &Req::get("forms", "/x")).await,
            ));
        }
    }
    out
}

/// Every attempt was refused by latchkey before anything was dialled: 403
/// `destination_blocked`, a 400 or 500 for a spelling that is not a host at all, or a 502 for a
/// name that resolves to nothing. (Any other 502, or a 504, would mean a blocked address was
/// dialled.)
#[track_caller]
fn assert_blocked(got: &[(String, Option<Answer>)]) {
    let slipped: Vec<String> = got
        .iter()
        .filter(|(_, a)| {
            !a.as_ref().is_some_and(|a| {
                matches!(
                    (a.status, a.header("latchkey-error")),
                    (403, Some("destination_blocked"))
                        | (400, Some("bad_request" | "bad_connection_id"))
                        | (500, Some("connection_invalid"))
                ) || (a.status == 400 && a.header("latchkey-error").is_none())
                    || (a.status == 502
                        && a.json()["error"]["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("cannot resolve")))
            })
        })
        .map(|(what, a)| match a {
            Some(a) => format!("{what}: {} {}", a.status, a.body),
            None => format!("{what}: closed without an answer"),
        })
        .collect();
    assert!(
        slipped.is_empty(),
        "not refused at the address:\n{}",
        slipped.join("\n")
    );
}

#[tokio::test]
async fn more_spellings_of_loopback_are_blocked_in_every_form() {
    let up = echo().await;
    let p = up.addr().port();
    let spellings: Vec<(&str, u16)> = [
        "0x7f000001",
        "017700000001",
        "127.0.1",
        "0x7f.1",
        "127.000.000.001",
        "[::ffff:7f00:1]",
        "[0:0:0:0:0:ffff:127.0.0.1]",
        "LOCALHOST",
    ]
    .into_iter()
    .map(|h| (h, p))
    .collect();
    {
        let (_bao, lk) = spelled(Opts::default(), &spellings).await;
        assert_blocked(&attempts(&lk, &spellings).await);
        assert_eq!(up.requests(), 0);
    }
    // With loopback allowed, every spelling leads to the upstream: the refusals were the
    // address check, not a name that does not resolve.
    let (_bao, lk) = spelled(Opts::loopback(), &spellings).await;
    for (what, got) in attempts(&lk, &spellings).await {
        let status = got.as_ref().map(|a| a.status);
        assert_eq!(status, Some(200), "{what}: {got:#?}");
    }
}

/// Trailing dots: refused, or (a base URL's `127.0.0.1.` and `localhost.` are looked up in DNS
/// as names, and found nowhere) never dialled.
#[tokio::test]
async fn trailing_dot_spellings_of_loopback_are_blocked_in_every_form() {
    let up = echo().await;
    let p = up.addr().port();
    let spellings = [
        ("127.0.0.1.", p),
        ("localhost.", p),
        ("127.1.", p),
        ("0x7f000001.", p),
    ];
    let (_bao, lk) = spelled(Opts::default(), &spellings).await;
    assert_blocked(&attempts(&lk, &spellings).await);
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn loopback_carried_inside_ipv6_is_blocked_in_every_form() {
    let spellings = [
        ("[::127.0.0.1]", 80),
        ("[64:ff9b::7f00:1]", 80),
        ("[2002:7f00:1::]", 80),
        ("[::ffff:127.0.0.1]", 80),
    ];
    let (_bao, lk) = spelled(Opts::default(), &spellings).await;
    assert_blocked(&attempts(&lk, &spellings).await);
}

/// An echo upstream on [::1].
async fn echo_v6() -> EchoServer {
    EchoServer::start("[::1]:0".parse().unwrap(), None)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_unspecified_address_in_any_spelling_is_blocked_in_every_form() {
    // 0.0.0.0 and :: reach the host's own listeners: these upstreams, on loopback, which is
    // allowed here.
    let up = echo().await;
    let up6 = echo_v6().await;
    let (p, p6) = (up.addr().port(), up6.addr().port());
    let spellings = [
        ("0", p),
        ("0x0", p),
        ("0.0", p),
        ("00", p),
        ("0.0.0.0", p),
        ("[::]", p6),
        ("[0:0:0:0:0:0:0:0]", p6),
        ("[::ffff:0.0.0.0]", p),
    ];
    let (_bao, lk) = spelled(Opts::loopback(), &spellings).await;
    assert_blocked(&attempts(&lk, &spellings).await);
    assert_eq!(up.requests() + up6.requests(), 0);
}

#[tokio::test]
async fn ipv6_loopback_spelled_out_or_with_a_zone_id_is_blocked_in_every_form() {
    let up6 = echo_v6().await;
    let p6 = up6.addr().port();
    let spellings = [
        ("[::1]", p6),
        ("[0:0:0:0:0:0:0:1]", p6),
        ("[0::1]", p6),
        ("[::0:1]", p6),
        ("[::1%25lo]", p6),
        ("[fe80::1%25lo]", p6),
    ];
    // 127.0.0.0/8 is allowed; ::1 is not in it.
    let (_bao, lk) = spelled(Opts::loopback(), &spellings).await;
    assert_blocked(&attempts(&lk, &spellings).await);
    assert_eq!(up6.requests(), 0);
}

#[tokio::test]
async fn unicode_dots_fullwidth_digits_and_encoded_hosts_do_not_hide_loopback() {
    let up = echo().await;
    let p = up.addr().port();
    let spellings = [
        ("127\u{3002}0\u{3002}0\u{3002}1", p),
        ("127\u{ff0e}0\u{ff0e}0\u{ff0e}1", p),
        ("\u{ff11}\u{ff12}\u{ff17}.\u{ff10}.\u{ff10}.\u{ff11}", p),
        ("127%2e0%2e0%2e1", p),
        ("loc%61lhost", p),
        ("%31%32%37.0.0.1", p),
    ];
    let (_bao, lk) = spelled(Opts::default(), &spellings).await;
    assert_blocked(&attempts(&lk, &spellings).await);
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn a_name_pinned_to_loopback_by_proxy_resolve_is_blocked_in_every_form() {
    let up = echo().await;
    let p = up.addr().port();
    let name = "api.pinned.example";
    let pin = format!("resolve = {{ \"{name}:{p}\" = \"{}\" }}", up.addr());
    let spellings = [(name, p)];
    {
        let (_bao, lk) = spelled(Opts::default().proxy(&pin), &spellings).await;
        assert_blocked(&attempts(&lk, &spellings).await);
        assert_eq!(up.requests(), 0);
    }
    let (_bao, lk) = spelled(Opts::loopback().proxy(&pin), &spellings).await;
    for (what, got) in attempts(&lk, &spellings).await {
        assert_eq!(
            got.as_ref().map(|a| a.status),
            Some(200),
            "{what}: {got:#?}"
        );
    }
}

#[tokio::test]
async fn a_websocket_handshake_is_held_to_the_address_check() {
    let up = echo().await;
    let p = up.addr().port();
    let spellings = [("2130706433", p), ("[::ffff:7f00:1]", p)];
    let (_bao, lk) = spelled(Opts::default(), &spellings).await;
    let ws = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    for (i, (h, p)) in spellings.iter().enumerate() {
        let authority = format!("{h}:{p}");
        let id = format!("g-{i}");
        let mut got = vec![(
            format!("gateway {authority}"),
            send(
                &lk,
                Form::Gateway,
                &authority,
                &Req::get(&id, "/ws").headers(ws),
            )
            .await,
        )];
        for form in [Form::Forward, Form::PlainTunnel] {
            got.push((
                format!("{form:?} {authority}"),
                send(&lk, form, &authority, &Req::get("forms", "/ws").headers(ws)).await,
            ));
        }
        assert_blocked(&got);
    }
    assert_eq!(up.requests(), 0);
}
