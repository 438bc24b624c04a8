//! PRODUCT.md 10.7: connection IDs never reach a Vault path unvalidated. `errors` tries
//! `bad.id`, `-lead`, `pct%2Dprod`, `..%2Fvictim`, 129 characters in the gateway path and
//! `x/../victim` as the forward-form proxy user; `tunnel` one malformed CONNECT user. Attacks
//! tried here, each against a connection `victim` that exists, with OpenBao's audit log as the
//! witness (every path latchkey asked for under the test's prefix must end in a valid ID):
//!
//! - traversal: `..`, `.`, `../victim`, `./victim`, `victim/../victim`, `../../sys/raw`,
//!   `sys/policy`, `victim%2F..%2F..%2Fsys`;
//! - NUL (raw and `%00`), CR LF, TAB, spaces before and after, a zero-width space;
//! - look-alikes: Cyrillic `і`, full-width `ｖ`, `%76ictim`;
//! - `victim.`, `victim/`, `victim?x`, `victim#x`, a leading `-` or `_`;
//! - 129 and 10,000 characters;
//! - in every place an ID comes from: the gateway path (raw and percent-encoded), the forward
//!   and CONNECT proxy user, a `latchkey.{id}` placeholder (forward and tunnel, header and
//!   query), and every admin API call (`GET`, `PATCH`, `DELETE`, `PUT .../secret`,
//!   `POST .../verify`, and `POST` with the ID in the body);
//! - valid IDs that differ from `victim` only in case or by a character are read as
//!   themselves, never normalized to it.

use serde_json::json;

use super::*;

fn bad_ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        "..",
        ".",
        "../victim",
        "./victim",
        "victim/../victim",
        "../../sys/raw",
        "sys/policy",
        "victim%2F..%2F..%2Fsys",
        "victim%00",
        "victim\0",
        "victim\0x",
        "victim\r\nX-Injected: 1",
        "victim\t",
        "victim ",
        " victim",
        "victim\u{200b}",
        "v\u{456}ctim",
        "\u{ff56}ictim",
        "%76ictim",
        "victim.",
        "victim/",
        "victim?x",
        "victim#x",
        "-victim",
        "_victim",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    ids.push("a".repeat(129));
    ids.push("b".repeat(10_000));
    ids
}

/// Every byte outside RFC 3986's unreserved set, percent-encoded.
fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The IDs whose Vault paths latchkey asked for under `bao`'s prefix, and whether each is
/// valid.
fn asked(bao: &Bao) -> Vec<String> {
    bao.audited_paths()
        .into_iter()
        .filter_map(|p| {
            let (_, rest) = p.split_once(bao.prefix.as_str())?;
            // The prefix itself (a LIST of the connections) names no connection.
            let id = rest.strip_prefix('/')?;
            (!id.is_empty()).then(|| id.to_string())
        })
        .collect()
}

#[tokio::test]
async fn malformed_ids_never_reach_a_vault_path_from_the_proxy_in_any_form() {
    let w = World::start(Opts::loopback(), |bao, _, secure| {
        put_bearer(bao, "victim", secure);
    })
    .await;
    let authority = w.secure_authority();
    let mut wrong = Vec::new();
    for id in bad_ids() {
        let mut tries: Vec<(String, Option<Answer>)> = Vec::new();
        // The gateway path, percent-encoded, and as it is where it can be sent at all.
        tries.push((
            "gateway, encoded".into(),
            gateway_get_raw(&w.lk, &format!("/{}/x", enc(&id))).await,
        ));
        if id.bytes().all(|b| b.is_ascii_graphic()) {
            tries.push((
                "gateway".into(),
                gateway_get_raw(&w.lk, &format!("/{id}/x")).await,
            ));
        }
        // The proxy user, in forward form and at CONNECT (Basic carries any byte).
        let req = Req::get(&id, "/x");
        tries.push((
            "forward".into(),
            send(&w.lk, Form::Forward, &authority, &req).await,
        ));
        tries.push((
            "CONNECT".into(),
            send(&w.lk, Form::Tunnel, &authority, &req).await,
        ));
        // A placeholder where the key goes, the connection left to be chosen.
        if !id.contains(['\0', '\r', '\n']) {
            let header = format!("Authorization: Bearer latchkey.{id}\r\n");
            let query = format!("/x?api_key=latchkey.{}", enc(&id));
            for form in [Form::Forward, Form::Tunnel] {
                let by_header = Req::get("_", "/x").headers(&header);
                tries.push((
                    format!("{form:?} placeholder header"),
                    send(&w.lk, form, &authority, &by_header).await,
                ));
                let by_query = Req::get("_", &query);
                tries.push((
                    format!("{form:?} placeholder query"),
                    send(&w.lk, form, &authority, &by_query).await,
                ));
            }
        }
        // What is asked of Vault is the witness (below); here, only that every try was answered.
        for (how, got) in tries {
            if got.is_none() {
                wrong.push(format!("{how} {id:?}: closed without an answer"));
            }
        }
    }
    let asked = asked(&w.bao);
    for id in &asked {
        if !latchkey::connection_id::ConnectionId::is_valid(id) {
            wrong.push(format!("Vault was asked for {id:?}"));
        }
    }
    // The witness works: `/sys/policy/x` is connection `sys` and path `/policy/x`, and `sys`
    // was asked for.
    assert!(asked.iter().any(|id| id == "sys"), "{asked:?}");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

async fn gateway_get_raw(lk: &Latchkey, path: &str) -> Option<Answer> {
    raw(
        lk.proxy,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

#[tokio::test]
async fn malformed_ids_never_reach_a_vault_path_from_the_admin_api() {
    let w = crate::lifecycle::World::start(Opts::loopback()).await;
    let key = w.key(crate::service_sim::KeyState::ReadWrite);
    w.create_ok("victim", &key).await;
    let before = asked(&w.bao).len();
    let mut wrong = Vec::new();
    for id in bad_ids() {
        let e = enc(&id);
        for (method, path, body) in [
            ("GET", format!("/v1/connections/{e}"), None),
            (
                "PATCH",
                format!("/v1/connections/{e}"),
                Some(json!({"name": "x"})),
            ),
            ("DELETE", format!("/v1/connections/{e}"), None),
            (
                "PUT",
                format!("/v1/connections/{e}/secret"),
                Some(json!({"fields": {"api_key": "sk_test_x"}})),
            ),
            ("POST", format!("/v1/connections/{e}/verify"), None),
            (
                "POST",
                "/v1/connections".to_string(),
                Some(w.stripe(&id, &key)),
            ),
        ] {
            // Exact bytes: an HTTP client library would resolve `%2E` and `..` in the path.
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let a = raw(w.lk.admin, request.as_bytes()).await;
            let a = w.checked(a.unwrap_or_else(|| panic!("{method} {path}: no answer")));
            if a.status < 400 || (a.status == 404 && a.body.contains("connection_not_found")) {
                wrong.push(format!("{method} {path} ({id:?}): {} {}", a.status, a.body));
            }
        }
    }
    // The witness works: a well-formed unknown ID is asked for.
    let got = raw(
        w.lk.admin,
        format!(
            "GET /v1/connections/well-formed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(got.map(|a| a.status), Some(404));
    let after = asked(&w.bao);
    assert!(
        after[before..].iter().any(|id| id == "well-formed"),
        "{after:?}"
    );
    for id in &after[before..] {
        if !latchkey::connection_id::ConnectionId::is_valid(id) {
            wrong.push(format!("Vault was asked for {id:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // `victim` is as it was.
    assert_eq!(w.stored_version("victim"), 1);
}

#[tokio::test]
async fn valid_ids_that_look_like_another_are_read_as_themselves() {
    let w = World::start(Opts::loopback(), |bao, _, secure| {
        put_bearer(bao, "victim", secure);
    })
    .await;
    let authority = w.secure_authority();
    for id in [
        "VICTIM", "Victim", "victim-", "victim_", "victim0", "v1ctim",
    ] {
        for form in [Form::Gateway, Form::Forward, Form::Tunnel] {
            let got = send(&w.lk, form, &authority, &Req::get(id, "/x")).await;
            assert_refused(&got, 404, "connection_not_found", &format!("{form:?} {id}"));
        }
        assert!(w.bao.reads_of(id) >= 1, "{id} was not read as itself");
    }
    assert_eq!(w.bao.reads_of("victim"), 0);
    assert_eq!(w.upstream_requests(), 0);
}
