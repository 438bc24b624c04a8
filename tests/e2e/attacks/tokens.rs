//! PRODUCT.md 10.6: client tokens and the admin token are stored hashed and compared in constant
//! time. Time is not asserted (no timed tests); what is observable is: the configuration takes
//! only hashes, and every wrong token gets the same answer, whatever it shares with the right
//! one. `config_cli` already refuses a `token_sha256` that is not hex. Attacks tried here:
//!
//! - a plain token where the configuration wants a hash: `token = ...` in `[[clients]]` and in
//!   `[admin]`, a plain value as `admin.token_sha256`, in `[[admin.tokens]]`, and through
//!   `LATCHKEY_ADMIN_TOKEN_SHA256`: refused at `check-config`, and the value never echoed;
//! - wrong client tokens that share with the right one its length (last or first character
//!   changed), its prefix (one short, half), its whole (one more character), its letters (upper
//!   case), or that are its SHA-256 (what the configuration holds), or the token with a NUL
//!   after it; in gateway form (Bearer, Basic, the key's place), forward form and at
//!   CONNECT: all refused with the same answer, byte for byte, and not one Vault read;
//! - the same against the admin token on the admin API.

use std::process::Command;

use super::*;

const TOKEN: &str = "client-token-ab12cd34ef56ab12cd34";

/// Wrong tokens that share something with `token`.
fn wrong(token: &str) -> Vec<(String, String)> {
    let n = token.len();
    let last = if token.ends_with('x') { "y" } else { "x" };
    vec![
        (
            "same length, last changed".into(),
            format!("{}{last}", &token[..n - 1]),
        ),
        (
            "same length, first changed".into(),
            format!("X{}", &token[1..]),
        ),
        ("one short".into(), token[..n - 1].to_string()),
        ("half".into(), token[..n / 2].to_string()),
        ("one more".into(), format!("{token}0")),
        ("upper case".into(), token.to_ascii_uppercase()),
        ("its SHA-256".into(), latchkey::auth::sha256_hex(token)),
        ("with a NUL after".into(), format!("{token}\0")),
    ]
}

/// An answer as a refusal is compared: status, `Latchkey-Error`, `Proxy-Authenticate`,
/// `WWW-Authenticate` and body (not `Date`).
fn shape(a: &Option<Answer>) -> String {
    match a {
        None => "closed".into(),
        Some(a) => format!(
            "{} {:?} {:?} {:?} {}",
            a.status,
            a.header("latchkey-error"),
            a.header("proxy-authenticate"),
            a.header("www-authenticate"),
            a.body
        ),
    }
}

fn check(text: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "c.toml", text);
    let mut c = Command::new(env!("CARGO_BIN_EXE_latchkey"));
    c.env_remove("VAULT_ADDR").env("VAULT_TOKEN", "t");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.arg("check-config").arg(&path).output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), all)
}

#[test]
fn the_configuration_takes_hashes_only_and_never_echoes_a_plain_token() {
    let plain = "plain-token-written-by-mistake-0123";
    let hash = latchkey::auth::sha256_hex(plain);
    for (text, env) in [
        (
            format!("[[clients]]\nname = \"a\"\ntoken = \"{plain}\"\nconnections = [\"*\"]\n"),
            vec![],
        ),
        (
            format!(
                "[[clients]]\nname = \"a\"\ntoken_sha256 = \"{plain}\"\nconnections = [\"*\"]\n"
            ),
            vec![],
        ),
        (format!("[admin]\ntoken = \"{plain}\"\n"), vec![]),
        (format!("[admin]\ntoken_sha256 = \"{plain}\"\n"), vec![]),
        (
            format!("[[admin.tokens]]\nname = \"ops\"\ntoken_sha256 = \"{plain}\"\n"),
            vec![],
        ),
        (
            format!("[admin]\ntoken_sha256 = \"{hash}\"\n"),
            vec![("LATCHKEY_ADMIN_TOKEN_SHA256", plain)],
        ),
    ] {
        let (code, out) = check(&text, &env);
        assert_eq!(
            code, 64,
            "a plain token was accepted:\n{text}\n{env:?}\n{out}"
        );
        assert!(
            !out.contains(plain),
            "the refusal quotes the plain token: {out}"
        );
    }
    // The hash itself is what it takes.
    let (code, out) = check(
        &format!("[[clients]]\nname = \"a\"\ntoken_sha256 = \"{hash}\"\nconnections = [\"*\"]\n"),
        &[],
    );
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn every_wrong_client_token_gets_the_same_answer_in_every_form() {
    let w = World::start(
        Opts::loopback().extra(&crate::errors::client_toml("ci", TOKEN, &["*"])),
        |bao, _, secure| {
            put_bearer(bao, "tok", secure);
        },
    )
    .await;
    w.lk.forbid(TOKEN);
    let authority = w.secure_authority();
    for (_, bad) in wrong(TOKEN) {
        w.lk.forbid(&bad);
    }
    // (form, how the token is sent)
    let mut shapes: std::collections::BTreeMap<String, Vec<(String, String)>> = Default::default();
    for (what, bad) in wrong(TOKEN) {
        let mut tries: Vec<(String, Option<Answer>)> = Vec::new();
        let gateway = |auth: String| {
            let lk = &w.lk;
            async move {
                raw(
                    lk.proxy,
                    format!("GET /tok/x HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
            }
        };
        // A NUL cannot be in a header value: those tokens go in Basic only.
        if !bad.contains('\0') {
            tries.push((
                "gateway Bearer".into(),
                gateway(format!("Proxy-Authorization: Bearer {bad}\r\n")).await,
            ));
            tries.push((
                "gateway, the key's place".into(),
                gateway(format!("Authorization: Bearer {bad}\r\n")).await,
            ));
        }
        tries.push((
            "gateway Basic".into(),
            gateway(format!(
                "Proxy-Authorization: {}\r\n",
                basic("anyone", &bad)
            ))
            .await,
        ));
        let req = Req::get("tok", "/x").token(&bad);
        tries.push((
            "forward".into(),
            send(&w.lk, Form::Forward, &authority, &req).await,
        ));
        tries.push((
            "CONNECT".into(),
            send(&w.lk, Form::Tunnel, &authority, &req).await,
        ));
        for (how, got) in tries {
            assert_refused(&got, 407, "proxy_auth_required", &format!("{how}, {what}"));
            shapes
                .entry(how)
                .or_default()
                .push((what.clone(), shape(&got)));
        }
    }
    for (how, answers) in &shapes {
        let first = &answers[0].1;
        for (what, s) in answers {
            assert_eq!(
                s, first,
                "{how}: the answer to a wrong token ({what}) differs"
            );
        }
    }
    assert_eq!(
        w.bao.reads_of("tok"),
        0,
        "a wrong token made latchkey read Vault"
    );
    assert_eq!(w.upstream_requests(), 0);
    // The right token, in the same places, works.
    let got = w
        .send(Form::Forward, &Req::get("tok", "/x").token(TOKEN))
        .await;
    echoed(&got, "the right token");
}

#[tokio::test]
async fn every_wrong_admin_token_gets_the_same_answer() {
    let bao = Bao::start().await;
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let mut answers = Vec::new();
    for (what, bad) in wrong(ADMIN_TOKEN) {
        if bad.contains('\0') {
            continue;
        }
        lk.forbid(&bad);
        for path in ["/v1/connections", "/v1/connectors", "/v1/connections/x"] {
            let got = raw(
                lk.admin,
                format!(
                    "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bad}\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
            let a = got.as_ref().unwrap();
            assert_eq!(a.status, 401, "{what} {path}: {a:#?}");
            answers.push((format!("{what} {path}"), shape(&got)));
        }
    }
    let first = &answers[0].1;
    for (what, s) in &answers {
        assert_eq!(
            s, first,
            "the answer to a wrong admin token ({what}) differs"
        );
    }
    let ok = raw(
        lk.admin,
        format!(
            "GET /v1/connectors HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(ok.map(|a| a.status), Some(200));
}
