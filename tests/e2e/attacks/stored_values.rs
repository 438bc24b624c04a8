//! PRODUCT.md 10.5: a stored value with CR, LF, NUL or another control character is refused on
//! save and never turned into a header. `pitfalls` tries the admin API's create with a key
//! holding a space, NBSP, CR LF, LF, NUL, TAB or DEL and a name or environment with CR LF or
//! ESC; `leaks` one key with CR LF written by the Vault CLI. Attacks tried here:
//!
//! - values written past the admin API (OpenBao's HTTP API, so NUL too) holding CR, LF, NUL,
//!   TAB, VT, FF, ESC, DEL, the C1 controls NEL (U+0085) and CSI (U+009B), and in a secret
//!   the line separator U+2028, in every field that ends up in a request or a URL: a header
//!   key, a query key, a Basic user name, `base_url`, `allowed_hosts`, and the reserved `name`
//!   and `environment`; each used in gateway, forward and tunnel form: refused (500
//!   `connection_invalid` naming the field, never quoting the value), nothing sent;
//! - pasted CR, LF, spaces and tabs around a key written past the API: trimmed, and the key
//!   goes as itself, with nothing after it;
//! - through the admin API, the writes `pitfalls` does not try: create with C1 controls, VT,
//!   ESC or U+2028 in a key, CR LF in a Basic user name, `allowed_hosts`, `base_url` or
//!   `expires_at`; rotation (`PUT .../secret`) to a key with CR LF, NUL or NEL; `PATCH` of
//!   `name`, `environment`, `base_url`, `allowed_hosts` and a connector field with CR, LF,
//!   NUL or ESC. Each is 422 naming the field, the stored version is unchanged, the old key
//!   still in use.

use reqwest::Method;
use serde_json::json;

use super::*;
use crate::lifecycle::assert_api_error;
use crate::service_sim::KeyState;

/// Control characters, and what they are.
const CONTROLS: [(&str, &str); 10] = [
    ("\r", "CR"),
    ("\n", "LF"),
    ("\0", "NUL"),
    ("\t", "TAB"),
    ("\u{b}", "VT"),
    ("\u{c}", "FF"),
    ("\u{1b}", "ESC"),
    ("\u{7f}", "DEL"),
    ("\u{85}", "NEL"),
    ("\u{9b}", "CSI"),
];

/// A connection to store: its connector, the field at fault, and its fields.
type Row<'a> = (&'a str, &'a str, Vec<(&'a str, String)>);

#[tokio::test]
async fn control_characters_stored_past_the_api_spoil_only_their_connection_in_every_form() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    let mut cases: Vec<(String, &str)> = Vec::new();
    let mut i = 0;
    let controls = CONTROLS
        .iter()
        .copied()
        .chain([("\u{2028}", "LINE SEPARATOR")]);
    for (c, what) in controls {
        let bad = format!("ctl{i}{c}X-Injected: {what}");
        // (connector, field at fault, fields)
        let mut rows: Vec<Row> = vec![
            ("generic-header", "api_key", vec![("api_key", bad.clone())]),
            ("generic-query", "api_key", vec![("api_key", bad.clone())]),
        ];
        if c != "\u{2028}" {
            rows.extend([
                (
                    "generic-basic",
                    "username",
                    vec![
                        ("username", bad.clone()),
                        ("api_key", format!("basic_ok_{i}")),
                    ],
                ),
                (
                    "generic-bearer",
                    "name",
                    vec![("name", bad.clone()), ("api_key", format!("named_ok_{i}"))],
                ),
                (
                    "generic-bearer",
                    "environment",
                    vec![
                        ("environment", bad.clone()),
                        ("api_key", format!("env_ok_{i}")),
                    ],
                ),
                (
                    "generic-bearer",
                    "allowed_hosts",
                    vec![
                        ("allowed_hosts", format!("a{i}.example{c}.evil.example")),
                        ("api_key", format!("hosts_ok_{i}")),
                    ],
                ),
                (
                    "generic-bearer",
                    "base_url",
                    vec![
                        ("base_url", format!("{base}/p{c}X-Injected: {what}")),
                        ("api_key", format!("base_ok_{i}")),
                    ],
                ),
            ]);
        }
        for (connector, field, fields) in rows {
            let id = format!("ctl-{i}");
            i += 1;
            let mut all: Vec<(&str, &str)> = vec![("connector", connector)];
            if !fields.iter().any(|(k, _)| *k == "base_url") {
                all.push(("base_url", &base));
            }
            all.extend(fields.iter().map(|(k, v)| (*k, v.as_str())));
            put_json(&bao, &id, &all).await;
            cases.push((id, field));
        }
    }
    let ca = Ca::init().await;
    let lk = Latchkey::start(&bao, with_ca(Opts::loopback(), &ca)).await;
    let authority = up.addr().to_string();
    for (id, field) in &cases {
        for form in [Form::Gateway, Form::Forward, Form::PlainTunnel] {
            let got = send(&lk, form, &authority, &Req::get(id, "/x")).await;
            let what = format!("{id} ({field}) {form:?}");
            assert_refused(&got, 500, "connection_invalid", &what);
            let a = got.unwrap();
            let message = a.json()["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(message.contains(field), "{what}: {message}");
            assert!(!format!("{a:?}").contains("X-Injected"), "{what}: {a:#?}");
        }
    }
    assert_eq!(
        up.requests(),
        0,
        "a connection holding a control character was used"
    );
}

#[tokio::test]
async fn whitespace_pasted_around_a_key_stored_past_the_api_is_trimmed_and_nothing_follows_it() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    let pasted = [
        ("trail-crlf", "paste_key_1\r\n"),
        ("lead-crlf", "\r\npaste_key_2"),
        ("trail-lfs", "paste_key_3\n\n"),
        ("around", " \tpaste_key_4\t "),
        ("trail-cr", "paste_key_5\r"),
    ];
    for (id, value) in pasted {
        put_json(
            &bao,
            id,
            &[
                ("connector", "generic-header"),
                ("base_url", &base),
                ("api_key", value),
            ],
        )
        .await;
    }
    let ca = Ca::init().await;
    let lk = Latchkey::start(&bao, with_ca(Opts::loopback(), &ca)).await;
    for (id, value) in pasted {
        for form in [Form::Gateway, Form::Forward, Form::PlainTunnel] {
            let got = send(&lk, form, &up.addr().to_string(), &Req::get(id, "/x")).await;
            let e = echoed(&got, &format!("{id} {form:?}"));
            assert_eq!(
                e.header_values("x-api-key"),
                vec![value.trim().to_string()],
                "{id} {form:?}"
            );
            assert!(e.header_values("x-injected").is_empty());
        }
    }
}

#[tokio::test]
async fn the_admin_api_refuses_control_characters_in_every_write() {
    let w = crate::lifecycle::World::start(Opts::loopback()).await;
    let base = w.sim.base_url();

    // Create: C1 controls, VT, ESC and U+2028 in a key.
    for (i, c) in [
        "\u{85}", "\u{9b}", "\u{b}", "\u{1b}", "\u{2028}", "\u{2029}",
    ]
    .into_iter()
    .enumerate()
    {
        let (x, y) = (w.fresh(), w.fresh());
        let id = format!("c1-{i}");
        let r = w
            .create(&w.stripe(&id, &format!("sk_test_{x}{c}{y}")))
            .await;
        assert_api_error(&r, 422, "invalid_field", Some("api_key"));
        assert!(w.bao.get(&id).is_none(), "{id}: saved anyway");
    }
    // Create: CR LF in the other fields a request or a URL is made of.
    let generic = |id: &str| {
        json!({
            "id": id, "connector": "generic-basic", "base_url": base,
            "fields": {"username": "svc", "api_key": "generic_basic_key_0123"}, "verify": false,
        })
    };
    w.secret("generic_basic_key_0123");
    let mut body = generic("ctl-user");
    body["fields"]["username"] = json!("svc\r\nX-Injected: 1");
    let r = w.create(&body).await;
    assert_api_error(&r, 422, "invalid_field", Some("username"));
    for (field, value) in [
        ("allowed_hosts", json!(["a.example\r\nX-Injected: 1"])),
        ("base_url", json!(format!("{base}/p\r\nX-Injected: 1"))),
        ("expires_at", json!("2030-01-01T00:00:00Z\r\nX-Injected: 1")),
        ("name", json!("n\u{0}ame")),
    ] {
        let mut body = generic(&format!("ctl-{field}"));
        body[field] = value;
        let r = w.create(&body).await;
        assert_api_error(&r, 422, "invalid_field", Some(field));
        assert!(
            w.bao.get(&format!("ctl-{field}")).is_none(),
            "{field}: saved anyway"
        );
    }

    // A good connection, then rotation and PATCH with control characters.
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("good", &key).await;
    let version = w.stored_version("good");
    for c in ["\r\n", "\0", "\u{85}", "\u{1b}"] {
        let (x, y) = (w.fresh(), w.fresh());
        let r = w.rotate("good", &format!("sk_test_{x}{c}{y}")).await;
        assert_api_error(&r, 422, "invalid_field", Some("api_key"));
    }
    for (field, value) in [
        ("name", json!("Stripe\r\nX-Injected: 1")),
        ("name", json!("Stripe\u{0}")),
        ("environment", json!("sand\nbox")),
        ("environment", json!("sand\u{1b}box")),
        ("base_url", json!(format!("{base}\r\nX-Injected: 1"))),
        ("allowed_hosts", json!(["b.example\u{0}"])),
    ] {
        let r = w
            .api(
                Method::PATCH,
                "/v1/connections/good",
                Some(&json!({ field: value })),
            )
            .await;
        assert!(
            r.status == 422 && r.json()["error"]["field"] == field,
            "PATCH {field} = {value}: {r:#?}"
        );
    }
    assert_eq!(
        w.stored_version("good"),
        version,
        "a refused write made a version"
    );
    let a = w.call("good", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &key);
}
