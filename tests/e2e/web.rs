//! The web page on the admin listener: served with a strict CSP and no outside loads, signed in
//! with the admin token for an `HttpOnly; SameSite=Strict` session cookie, writes with the cookie
//! only with the session's CSRF token, bearer callers unchanged, and no secret ever reaching the
//! page. The browser steps run Debian's Chromium, headless, through playwright-core
//! (`tests/node/web.mjs`); the rest is reqwest.

use std::path::Path;

use reqwest::Method;
use serde_json::{json, Value};

use crate::errors::{send, Answer};
use crate::lifecycle::{audit_lines, eventually, World};
use crate::service_sim::KeyState;
use crate::support::*;

/// A second admin token, by name, so that the audit line shows whose it is.
const OPS_TOKEN: &str = "ops-web-token-for-tests-9876543210";

fn with_ops_token() -> Opts {
    Opts::loopback().extra(&format!(
        "[[admin.tokens]]\nname = \"ops-web\"\ntoken_sha256 = \"{}\"",
        latchkey::auth::sha256_hex(OPS_TOKEN)
    ))
}

/// Signs in with `token` as the page does (a form); the answer, the cookie pair and the CSRF
/// token when it worked.
async fn sign_in(w: &World, token: &str) -> (Answer, Option<String>, Option<String>) {
    let a = send(
        http()
            .post(w.lk.admin_url("/session"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(format!("token={token}")),
    )
    .await;
    let cookie = a
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .map(str::to_string);
    let csrf = (a.status == 200).then(|| a.json()["csrf"].as_str().unwrap().to_string());
    (a, cookie, csrf)
}

async fn with_cookie(
    w: &World,
    method: Method,
    path: &str,
    cookie: &str,
    csrf: Option<&str>,
    body: Option<&Value>,
) -> Answer {
    let mut req = http()
        .request(method, w.lk.admin_url(path))
        .header("Cookie", cookie);
    if let Some(c) = csrf {
        req = req.header("X-CSRF-Token", c);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    w.checked(send(req).await)
}

#[tokio::test]
async fn the_page_is_served_with_a_strict_csp_and_loads_nothing_from_outside() {
    let w = World::start(Opts::loopback()).await;
    let page = send(http().get(w.lk.admin_url("/"))).await;
    assert_eq!(page.status, 200, "{page:#?}");
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let csp = page.header("content-security-policy").unwrap();
    for part in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
    // The page names only its own files, by path: no inline script or style, nothing outside.
    let html = &page.body;
    assert!(
        html.contains(r#"<script src="/app.js" defer></script>"#),
        "{html}"
    );
    assert!(
        html.contains(r#"<link rel="stylesheet" href="/app.css">"#),
        "{html}"
    );
    assert_eq!(html.matches("<script").count(), 1, "{html}");
    assert!(
        !html.contains("<style") && !html.contains(" style="),
        "{html}"
    );
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("//"));
    for (path, kind) in [("/app.js", "text/javascript"), ("/app.css", "text/css")] {
        let a = send(http().get(w.lk.admin_url(path))).await;
        assert_eq!(a.status, 200, "{path}");
        assert!(
            a.header("content-type").unwrap().starts_with(kind),
            "{path}"
        );
        assert!(
            !a.body.contains("http://") && !a.body.contains("https://"),
            "{path}"
        );
    }
    // API answers are never cached.
    let api = send(
        http()
            .get(w.lk.admin_url("/v1/connections"))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(api.status, 200);
    assert_eq!(api.header("cache-control"), Some("no-store"));
    assert_eq!(api.header("x-content-type-options"), Some("nosniff"));
}

#[tokio::test]
async fn a_write_with_the_session_cookie_needs_the_csrf_token_and_bearer_callers_do_not() {
    let w = World::start(with_ops_token()).await;
    w.secret(OPS_TOKEN);

    // A wrong token gets no cookie; another site's form gets none either.
    let (a, cookie, _) = sign_in(&w, "not-an-admin-token").await;
    assert_eq!(a.status, 401, "{a:#?}");
    assert!(cookie.is_none());
    let a = send(
        http()
            .post(w.lk.admin_url("/session"))
            .header("Origin", "https://elsewhere.test")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(format!("token={OPS_TOKEN}")),
    )
    .await;
    assert_eq!(a.status, 403, "{a:#?}");
    assert!(a.header("set-cookie").is_none());

    let (a, cookie, csrf) = sign_in(&w, OPS_TOKEN).await;
    assert_eq!(a.status, 200, "{a:#?}");
    w.assert_clean("the sign-in answer", &a.body);
    let set = a.header("set-cookie").unwrap();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(set.contains(part), "{set}");
    }
    assert!(
        !set.contains("Secure"),
        "the admin listener is plain HTTP here: {set}"
    );
    assert_eq!(a.json()["admin"], "ops-web");
    let (cookie, csrf) = (cookie.unwrap(), csrf.unwrap());

    // Reads need only the cookie.
    let r = with_cookie(&w, Method::GET, "/v1/connections", &cookie, None, None).await;
    assert_eq!(r.status, 200, "{r:#?}");

    // A write without the CSRF token, or with another, is refused and changes nothing.
    let key = w.key(KeyState::ReadWrite);
    let create = w.stripe("web-csrf", &key);
    for bad in [None, Some("not-the-token"), Some("")] {
        let r = with_cookie(
            &w,
            Method::POST,
            "/v1/connections",
            &cookie,
            bad,
            Some(&create),
        )
        .await;
        assert_eq!(r.status, 403, "{bad:?}: {r:#?}");
        assert_eq!(r.json()["error"]["code"], "csrf");
    }
    let r = w.api(Method::GET, "/v1/connections/web-csrf", None).await;
    assert_eq!(r.status, 404, "a refused write created it: {r:#?}");

    // With it, the write is made, and its audit line names the admin token that signed in.
    let r = with_cookie(
        &w,
        Method::POST,
        "/v1/connections",
        &cookie,
        Some(&csrf),
        Some(&create),
    )
    .await;
    assert_eq!(r.status, 201, "{r:#?}");
    let line = eventually("the audit line of the page's create", || async {
        audit_lines(&w.lk)
            .into_iter()
            .find(|l| l["action"] == "create" && l["connection"] == "web-csrf")
    })
    .await;
    assert_eq!(line["admin"], "ops-web", "{line}");
    assert_eq!(line["outcome"], "ok", "{line}");

    // Bearer callers are unchanged: no CSRF token, and a cookie does not stand in for a bad token.
    let r = w
        .api(Method::POST, "/v1/connections/web-csrf/verify", None)
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    let r = send(
        http()
            .get(w.lk.admin_url("/v1/connections"))
            .header("Cookie", &cookie)
            .bearer_auth("not-an-admin-token"),
    )
    .await;
    assert_eq!(r.status, 401, "{r:#?}");

    // Signing out needs the CSRF token too, and ends the session.
    let r = with_cookie(&w, Method::DELETE, "/session", &cookie, None, None).await;
    assert_eq!(r.status, 403, "{r:#?}");
    let r = with_cookie(&w, Method::DELETE, "/session", &cookie, Some(&csrf), None).await;
    assert_eq!(r.status, 204, "{r:#?}");
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    let r = with_cookie(&w, Method::GET, "/v1/connections", &cookie, None, None).await;
    assert_eq!(r.status, 401, "the session outlived sign-out: {r:#?}");
    let r = with_cookie(
        &w,
        Method::DELETE,
        "/v1/connections/web-csrf",
        &cookie,
        Some(&csrf),
        None,
    )
    .await;
    assert_eq!(r.status, 401, "{r:#?}");
    assert_eq!(w.show("web-csrf").await["id"], "web-csrf");
}

/// Runs `tests/node/web.mjs`; its JSON.
async fn browser(env: &[(&str, String)]) -> Value {
    browser_script("web.mjs", env).await
}

/// Runs a script of `tests/node` that drives Chromium; the JSON of its last line.
pub async fn browser_script(script: &str, env: &[(&str, String)]) -> Value {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "tests/node/node_modules/playwright-core is missing: run scripts/install-deps"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run scripts/install-deps (as root, it installs Debian's chromium)"
    );
    let mut cmd = tokio::process::Command::new("node");
    cmd.current_dir(&dir).arg(script).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser script failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|_| panic!("not JSON: {stdout}"))
}

#[tokio::test]
async fn in_chromium_sign_in_lists_connections_with_status_and_sign_out_and_no_secret_reaches_the_page(
) {
    let w = World::start(with_ops_token()).await;
    w.secret(OPS_TOKEN);
    let good = w.key(KeyState::ReadWrite);
    let revoked = w.key(KeyState::ReadWrite);
    w.create_ok("web-ok", &good).await;
    w.create_ok("web-failed", &revoked).await;
    w.sim.revoke(&revoked);
    let r = w.verify("web-failed").await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(w.show("web-failed").await["status"], "failed");

    let added = w.key(KeyState::ReadWrite);
    let rejected = w.unknown_key();
    let rotated = w.key(KeyState::ReadWrite);
    let sandbox = w.key(KeyState::ReadWrite);
    let unscoped = w.key(KeyState::ReadWrite);
    w.sim.deny_verify(&unscoped);
    // Saved without verification: Unverified.
    let unverified = w.key(KeyState::ReadWrite);
    let mut body = w.stripe("web-unverified", &unverified);
    body["verify"] = json!(false);
    let r = w.create(&body).await;
    assert_eq!(r.status, 201, "{r:#?}");
    // Written to Vault by hand with a key no service takes (a header smuggled in): Invalid.
    let broken_key = format!("sk_test_{}", w.fresh());
    w.bao.put(
        "web-invalid",
        &[
            ("connector", "stripe"),
            ("base_url", &w.sim.base_url()),
            (
                "api_key",
                &format!("{broken_key}\r\nX-Injected: {}", w.fresh()),
            ),
        ],
    );
    let secrets = json!([
        good, revoked, added, rejected, rotated, sandbox, unscoped, unverified, broken_key,
        OPS_TOKEN
    ])
    .to_string();
    // Inside the expiry warning window (14 days by default): the row turns Expiring.
    let expires = time::OffsetDateTime::now_utc() + time::Duration::days(5);
    let expires_on = format!(
        "{:04}-{:02}-{:02}",
        expires.year(),
        u8::from(expires.month()),
        expires.day()
    );
    // The screenshots of the README: kept where WEB_SCREENSHOTS says (docs/screenshots to
    // refresh them), else in a directory of the test's own, checked and removed.
    let scratch = tempfile::tempdir().unwrap();
    let shots = std::env::var("WEB_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| scratch.path().to_path_buf());
    std::fs::create_dir_all(&shots).unwrap();
    // The script runs in tests/node: give it the directory as an absolute path.
    let shots = shots.canonicalize().unwrap();
    let v = browser(&[
        ("SCREENSHOTS", shots.display().to_string()),
        ("EXPIRES_ON", expires_on.clone()),
        ("LATCHKEY_ADMIN", format!("http://{}", w.lk.admin)),
        ("ADMIN_TOKEN", OPS_TOKEN.to_string()),
        ("SECRETS", secrets),
        ("OK_ID", "web-ok".to_string()),
        ("FAILED_ID", "web-failed".to_string()),
        ("NEW_KEY", added.clone()),
        ("REJECTED_KEY", rejected.clone()),
        ("ROTATE_KEY", rotated.clone()),
        ("SANDBOX_KEY", sandbox.clone()),
        ("SCOPE_KEY", unscoped.clone()),
        (
            "WRONG_URL",
            format!("{}{}", w.sim.base_url(), crate::service_sim::WRONG_PREFIX),
        ),
        ("CLOSED_URL", format!("http://127.0.0.1:{}", free_port())),
        ("SIM_URL", w.sim.base_url()),
    ])
    .await;
    assert_eq!(v["failure"], Value::Null, "{v:#}");
    let steps = v["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "opened",
            "signed in",
            "added",
            "rejected",
            "other verdicts",
            "sandbox on production",
            "verified",
            "edit refused",
            "edited",
            "rotate refused",
            "rotated",
            "deleted",
            "filtered",
            "reloaded",
            "signed out"
        ],
        "{v:#}"
    );
    // After every step: no secret in the DOM, the storage or any response the page received.
    for s in steps {
        assert_eq!(s["found"], json!([]), "{}: {v:#}", s["step"]);
        assert!(s["responses"].as_u64().unwrap() > 0, "{v:#}");
    }
    assert_eq!(
        v["problems"],
        json!([]),
        "errors, CSP violations or outside loads: {v:#}"
    );
    let step = |n: &str| steps.iter().find(|s| s["step"] == n).unwrap();

    // The screenshots were taken: the list, the add form, a failed verification.
    for name in ["list", "add-form", "failed-verification"] {
        let png = std::fs::read(shots.join(format!("{name}.png")))
            .unwrap_or_else(|e| panic!("no screenshot {name}.png: {e}"));
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{name}.png is not a PNG"
        );
    }

    assert_eq!(step("opened")["sign_in_shown"], true, "{v:#}");
    // Keyboard alone, on a 320 px screen: the token input has the focus when the page opens,
    // Enter signs in, Tab reaches "+ Add connection", Enter opens the catalog with its search
    // focused, Tab and Enter pick a connector and focus its first field. Nothing scrolls
    // sideways, and every input, select and button has a name.
    let signed_in = step("signed in");
    assert_eq!(signed_in["focus_on_load"], "token", "{v:#}");
    let add = step("added");
    let keyboard = &add["keyboard"];
    assert!(keyboard["tabs_to_add"].as_u64().unwrap() <= 10, "{v:#}");
    assert_eq!(keyboard["add_focus"], "catalog-search", "{v:#}");
    assert_eq!(keyboard["pick_focus"], "field-api_key", "{v:#}");
    for l in [
        &signed_in["sign_in_layout"],
        &signed_in["list_layout"],
        &add["add_layout"],
    ] {
        assert_eq!(l["width"], 320, "{v:#}");
        assert!(
            l["overflow"].as_i64().unwrap() <= 0,
            "scrolls sideways at 320 px: {v:#}"
        );
        assert_eq!(l["unnamed"], json!([]), "{v:#}");
    }
    assert_eq!(
        step("edit refused")["edit_layout"]["unnamed"],
        json!([]),
        "{v:#}"
    );
    assert_eq!(step("edit refused")["edit_focus"], "edit-name", "{v:#}");
    // Pasted with a trailing newline (as a terminal copies a key): in the input without it, a
    // notice at once, and latchkey's own notice in the verdict. A value with a line break inside
    // is not pasted at all, and the notice says why.
    assert_eq!(add["pasted_ok"], true, "{v:#}");
    let notice = add["paste_notice"].as_str().unwrap();
    assert!(notice.contains("trailing newline"), "{notice}");
    assert_eq!(add["inner_newline"]["value"], "", "{v:#}");
    assert!(
        add["inner_newline"]["notice"]
            .as_str()
            .unwrap()
            .starts_with("Not pasted: the value has a line break inside it"),
        "{v:#}"
    );
    assert_eq!(add["notice_after_save"], false, "{v:#}");
    assert_eq!(signed_in["who"], "Signed in as ops-web", "{v:#}");
    // The check can see what the page shows: the connection's ID is in the DOM.
    assert_eq!(signed_in["dom_has_ok_id"], true, "{v:#}");
    let rows = signed_in["rows"].as_array().unwrap();
    let row = |id: &str| {
        rows.iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("no row {id}: {v:#}"))["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let ok = row("web-ok");
    assert!(
        ok.contains("Stripe - web-ok") && ok.contains("stripe") && ok.contains("sandbox"),
        "{ok}"
    );
    assert!(ok.contains("Active") && ok.contains("verified "), "{ok}");
    let unverified_row = row("web-unverified");
    assert!(unverified_row.contains("Unverified"), "{unverified_row}");
    let invalid_row = row("web-invalid");
    let problem = w.show("web-invalid").await;
    assert!(invalid_row.contains("Invalid"), "{invalid_row}");
    assert!(
        invalid_row.contains(problem["problem"]["message"].as_str().unwrap()),
        "the problem is shown: {invalid_row}"
    );
    // A write the page's own script makes without the CSRF token is refused, in the browser too.
    let csrfless = &step("signed in")["csrfless"];
    assert_eq!(csrfless["status"], 403, "{v:#}");
    assert!(
        csrfless["body"].as_str().unwrap().contains("\"csrf\""),
        "{v:#}"
    );
    let failed = row("web-failed");
    let want = w.show("web-failed").await;
    assert!(failed.contains("Failed"), "{failed}");
    assert!(
        failed.contains(want["last_error"].as_str().unwrap()),
        "the failure reason is shown: {failed}"
    );
    if let Some(hint) = want["last_error_hint"].as_str() {
        assert!(failed.contains(hint), "and its hint: {failed}");
    }
    // Added from the form: a password input whose show toggle makes no request, saved, verified,
    // Active, and stored with the key typed.
    assert_eq!(add["key_input_type"], "password", "{v:#}");
    assert_eq!(add["shown_type"], "text", "{v:#}");
    assert_eq!(add["toggle_requests"], 0, "{v:#}");
    let verdict = add["verdict"].as_str().unwrap();
    assert!(verdict.contains("Saved web-added: Active."), "{verdict}");
    assert!(
        verdict.contains("api_key: removed a trailing newline around the pasted value"),
        "{verdict}"
    );
    assert!(
        w.sim.uses_of(&added) > 0,
        "the verification used the typed key"
    );
    // A key the service rejects: refused, in words, with the 401, and nothing saved.
    let verdict = step("rejected")["verdict"].as_str().unwrap();
    assert!(
        verdict.starts_with("Not saved:") && verdict.contains("401"),
        "{verdict}"
    );
    assert!(verdict.contains("Field: api_key"), "{verdict}");
    let r = w
        .api(Method::GET, "/v1/connections/web-rejected", None)
        .await;
    assert_eq!(r.status, 404, "{r:#?}");
    // The other verdicts, each refused in its own words with its hint, and nothing saved.
    let verdicts = &step("other verdicts")["verdicts"];
    for (what, has) in [
        ("scope", ["403", "Restricted keys"]),
        ("wrong base URL", ["404", "base URL"]),
        ("unreachable", ["/v1/balance", "base URL"]),
    ] {
        let verdict = verdicts[what].as_str().unwrap();
        assert!(verdict.starts_with("Not saved:"), "{what}: {verdict}");
        for h in has {
            assert!(verdict.contains(h), "{what}: {verdict}");
        }
        let id = format!("web-{}", what.replace(' ', "-")).to_lowercase();
        let r = w
            .api(Method::GET, &format!("/v1/connections/{id}"), None)
            .await;
        assert_eq!(r.status, 404, "{r:#?}");
    }
    // A sandbox key on production: refused before any call, naming the field.
    let verdict = step("sandbox on production")["verdict"].as_str().unwrap();
    assert!(verdict.starts_with("Not saved:"), "{verdict}");
    assert!(
        verdict.contains("sandbox") && verdict.contains("production"),
        "{verdict}"
    );
    assert!(verdict.contains("Field: api_key"), "{verdict}");
    assert_eq!(
        w.sim.uses_of(&sandbox),
        0,
        "the refused key was sent to the service"
    );
    let r = w.api(Method::GET, "/v1/connections/web-prod", None).await;
    assert_eq!(r.status, 404, "{r:#?}");
    // Verify again, from its row.
    let status = step("verified")["status"].as_str().unwrap();
    assert!(status.starts_with("Verified web-ok: Active."), "{status}");
    // Edited: a sandbox key moved to production is refused naming the field, and nothing
    // changes; then a new name and an expiry 5 days out are saved, no secret input is shown,
    // and the row says Expiring with the warning.
    let status = step("edit refused")["status"].as_str().unwrap();
    assert!(status.starts_with("Not saved:"), "{status}");
    assert!(
        status.contains("sandbox") && status.contains("Field: api_key"),
        "{status}"
    );
    let edited = step("edited");
    assert_eq!(edited["secret_inputs"], 0, "{v:#}");
    let status = edited["status"].as_str().unwrap();
    assert!(
        status.starts_with("Saved web-ok: Expiring, version 2."),
        "{status}"
    );
    assert!(status.contains("rotate it before then"), "{status}");
    let row = edited["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "web-ok")
        .unwrap()["text"]
        .as_str()
        .unwrap();
    assert!(
        row.contains("Payments (sandbox)") && row.contains("Expiring"),
        "{row}"
    );
    assert!(
        row.contains(&format!("the key expires at {expires_on}"))
            && row.contains("rotate it before then"),
        "{row}"
    );
    let shown = w.show("web-ok").await;
    assert_eq!(shown["name"], "Payments (sandbox)");
    assert_eq!(shown["environment"], "sandbox");
    assert_eq!(shown["status"], "expiring");
    assert!(
        shown["expires_at"]
            .as_str()
            .unwrap()
            .starts_with(&expires_on),
        "{shown}"
    );
    // A rotation to a rejected key is refused in words, and the old key stays.
    let status = step("rotate refused")["status"].as_str().unwrap();
    assert!(
        status.starts_with("Not rotated; the old key stays in force:") && status.contains("401"),
        "{status}"
    );
    // Then rotated to a good key: version 2, and the service saw the new key.
    let status = step("rotated")["status"].as_str().unwrap();
    assert!(
        status.starts_with("Rotated web-added: Active, version 2."),
        "{status}"
    );
    assert_eq!(step("rotated")["form_shown"], false, "{v:#}");
    assert!(
        w.sim.uses_of(&rotated) > 0,
        "the rotation verified the typed key"
    );
    // Deleted after a confirmation naming it: gone from the list and from the API.
    let deleted = step("deleted");
    assert!(
        deleted["asked"].as_str().unwrap().contains("web-added"),
        "{v:#}"
    );
    assert_eq!(deleted["status"], "Deleted web-added.", "{v:#}");
    let r = w.api(Method::GET, "/v1/connections/web-added", None).await;
    assert_eq!(r.status, 404, "{r:#?}");
    // Each of those writes has its audit line, naming the admin token that signed in.
    let actions = eventually("the audit lines of the page's writes", || async {
        let lines: Vec<(String, String, String)> = audit_lines(&w.lk)
            .iter()
            .filter(|l| l["admin"] == "ops-web" && l["action"] != "sign_in")
            .map(|l| {
                let s = |k: &str| l[k].as_str().unwrap_or_default().to_string();
                (s("action"), s("connection"), s("outcome"))
            })
            .collect();
        (lines.len() >= 12).then_some(lines)
    })
    .await;
    let want: Vec<(String, String, String)> = [
        ("create", "web-added", "ok"),
        ("create", "web-rejected", "verification_failed"),
        ("create", "web-scope", "verification_failed"),
        ("create", "web-wrong-base-url", "verification_failed"),
        ("create", "web-unreachable", "verification_failed"),
        ("create", "web-prod", "invalid"),
        ("verify", "web-ok", "verified"),
        ("patch", "web-ok", "invalid"),
        ("patch", "web-ok", "ok"),
        ("rotate", "web-added", "verification_failed"),
        ("rotate", "web-added", "ok"),
        ("delete", "web-added", "ok"),
    ]
    .iter()
    .map(|(a, c, o)| (a.to_string(), c.to_string(), o.to_string()))
    .collect();
    assert_eq!(actions, want);
    // The filter keeps only the failed one.
    let filtered = step("filtered")["rows"].as_array().unwrap();
    assert_eq!(filtered.len(), 1, "{v:#}");
    assert_eq!(filtered[0]["id"], "web-failed");

    // The session survives a reload in an HttpOnly, SameSite=Strict cookie the script cannot read.
    let reloaded = step("reloaded");
    assert_eq!(reloaded["rows"], 4, "{v:#}");
    assert_eq!(reloaded["script_sees_cookie"], "", "{v:#}");
    let cookie = reloaded["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "latchkey_session")
        .unwrap_or_else(|| panic!("no session cookie: {v:#}"));
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    assert_eq!(cookie["path"], "/", "{cookie}");
    assert!(
        cookie["expires"].as_f64().unwrap() > 0.0,
        "a session cookie with an expiry: {cookie}"
    );

    // Signed out: the list is gone, and the old cookie opens nothing.
    assert_eq!(step("signed out")["rows"], 0, "{v:#}");
    assert_eq!(step("signed out")["list_shown"], false, "{v:#}");
    let old = format!("latchkey_session={}", cookie["value"].as_str().unwrap());
    let r = with_cookie(&w, Method::GET, "/v1/connections", &old, None, None).await;
    assert_eq!(r.status, 401, "the session outlived sign-out: {r:#?}");

    let line = eventually("the sign-in's audit line", || async {
        audit_lines(&w.lk)
            .into_iter()
            .find(|l| l["action"] == "sign_in")
    })
    .await;
    assert_eq!(line["admin"], "ops-web", "{line}");
}

#[tokio::test]
async fn failed_sign_ins_close_sign_in_for_the_window_and_bearer_callers_go_on() {
    let w = World::start(Opts::loopback()).await;
    let guesses: Vec<String> = (0..10)
        .map(|i| format!("guess-{i}-{}", w.fresh()))
        .collect();
    for g in &guesses {
        w.secret(g);
        let (a, cookie, _) = sign_in(&w, g).await;
        assert_eq!(a.status, 401, "{a:#?}");
        assert!(cookie.is_none());
    }
    // The eleventh, with the right token: refused too, without a look at the token, and saying
    // for how long.
    let (a, cookie, _) = sign_in(&w, ADMIN_TOKEN).await;
    assert_eq!(a.status, 429, "{a:#?}");
    assert!(cookie.is_none());
    assert_eq!(a.json()["error"]["code"], "too_many_sign_ins", "{a:#?}");
    let wait: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // The API with the bearer token is not affected.
    let r = w.api(Method::GET, "/v1/connections", None).await;
    assert_eq!(r.status, 200, "{r:#?}");
    // Each refused sign-in is logged, the token tried never.
    let refused = eventually("the refused sign-ins' log lines", || async {
        let n = audit_lines(&w.lk)
            .iter()
            .filter(|l| l["action"] == "sign_in" && l["outcome"] == "refused")
            .count();
        (n == 10).then_some(n)
    })
    .await;
    assert_eq!(refused, 10);
    let out = w.lk.output();
    for g in &guesses {
        assert!(!out.contains(g.as_str()), "a tried token is in the log");
    }
}

/// The page at its edges (`tests/node/web_edges.mjs`): a connector with no base URL of its own
/// asks for one, required, and saves a connection with no environment (its key pasted with
/// spaces before and a newline after, and the notice naming both); a connector that tells
/// environments apart by base URL alone offers them; a 3,000-character name wraps instead of
/// pushing every row's buttons off a 1280 px screen; an edit of the name sends the name alone
/// (no environment forced onto a connection that has none, no verification); latchkey out of
/// reach and a session that ended are said in words, with no uncaught error.
#[tokio::test]
async fn in_chromium_the_page_handles_generic_connectors_long_names_lost_sessions_and_no_latchkey()
{
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    let v = browser_script(
        "web_edges.mjs",
        &[
            ("LATCHKEY_ADMIN", format!("http://{}", w.lk.admin)),
            ("ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
            ("KEY", key.clone()),
            ("BASE_URL", w.sim.base_url()),
        ],
    )
    .await;
    assert_eq!(v["failure"], Value::Null, "{v:#}");
    assert_eq!(v["page_errors"], json!([]), "{v:#}");

    let form = &v["generic_form"];
    assert_eq!(form["base_url_label"], "Base URL", "{v:#}");
    assert_eq!(form["base_url_shown"], true, "{v:#}");
    assert_eq!(form["base_url_required"], true, "{v:#}");
    assert_eq!(form["environments"], json!([["", "(not set)"]]), "{v:#}");
    assert_eq!(form["key_autocomplete"], "new-password", "{v:#}");
    assert_eq!(v["paste"]["trimmed"], true, "{v:#}");
    assert!(
        v["paste"]["notice"]
            .as_str()
            .unwrap()
            .starts_with("Removed whitespace and a trailing newline"),
        "{v:#}"
    );
    let verdict = v["generic_verdict"].as_str().unwrap();
    assert!(verdict.starts_with("Saved edge-generic"), "{v:#}");
    let stored = w.show("edge-generic").await;
    assert_eq!(stored["base_url"], w.sim.base_url(), "{stored:#}");
    assert_eq!(stored["environment"], Value::Null, "{stored:#}");

    assert_eq!(
        v["square_environments"],
        json!([["production", "production"], ["sandbox", "sandbox"]]),
        "{v:#}"
    );

    let list = &v["list"];
    assert!(list["wrap_overflow"].as_i64().unwrap() <= 0, "{v:#}");
    assert!(list["page_overflow"].as_i64().unwrap() <= 0, "{v:#}");
    assert!(
        list["verify_right"].as_f64().unwrap() <= list["width"].as_f64().unwrap(),
        "{v:#}"
    );

    assert_eq!(v["edit_form"]["environment"], "", "{v:#}");
    assert_eq!(v["edit_form"]["base_url"], w.sim.base_url(), "{v:#}");
    let patch = v["writes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["method"] == "PATCH")
        .unwrap_or_else(|| panic!("no PATCH: {v:#}"));
    let body: Value = serde_json::from_str(patch["body"].as_str().unwrap()).unwrap();
    assert_eq!(body, json!({"name": "Generic, renamed"}), "{v:#}");
    assert!(
        v["edit_status"]
            .as_str()
            .unwrap()
            .starts_with("Saved edge-generic"),
        "{v:#}"
    );
    let stored = w.show("edge-generic").await;
    assert_eq!(stored["name"], "Generic, renamed", "{stored:#}");
    assert_eq!(stored["environment"], Value::Null, "{stored:#}");

    let unreachable = v["unreachable_status"].as_str().unwrap();
    assert!(unreachable.contains("could not be reached"), "{v:#}");
    let ended = &v["session_ended"];
    assert_eq!(ended["note_shown"], true, "{v:#}");
    assert!(
        ended["note"]
            .as_str()
            .unwrap()
            .contains("the last change was not made"),
        "{v:#}"
    );
    assert_eq!(v["signed_in_again_note_shown"], false, "{v:#}");
}
