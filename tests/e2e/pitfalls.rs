//! The "Common Pitfalls" of the reference page, each handled rather than documented away:
//!
//! - pasted whitespace: trimmed, reported as a notice, and the key then verifies; whitespace or
//!   control characters inside a value are refused naming the field;
//! - insufficient scopes: a read-only key passes verification, and its first write is reported
//!   on the connection with the connector's scope hint;
//! - sandbox vs production: a sandbox key on a production connection (or the reverse), or a
//!   sandbox base URL on a production connection, is refused before anything is called;
//! - silent expiry, and keys the service revoked: upstream 401s are counted and turn the
//!   connection `failed` without anyone running a verify (`expires_at` itself is in
//!   `lifecycle`).

use reqwest::Method;
use serde_json::{json, Value};

use crate::lifecycle::{assert_api_error, assert_masked, eventually, metric, World};
use crate::service_sim::KeyState;
use crate::support::*;

#[tokio::test]
async fn pasted_whitespace_is_trimmed_reported_and_the_key_then_verifies() {
    let w = World::start(Opts::loopback()).await;
    for (id, around, notice) in [
        ("newline", ("", "\n"), "trailing newline"),
        ("crlf", ("", "\r\n"), "trailing newline"),
        (
            "spaces",
            ("  ", " \t\n"),
            "whitespace and a trailing newline",
        ),
        ("leading", ("\t ", ""), "whitespace"),
    ] {
        let key = w.key(KeyState::ReadWrite);
        let pasted = format!("{}{key}{}", around.0, around.1);
        let r = w.create(&w.stripe(id, &pasted)).await;
        assert_eq!(r.status, 201, "{id}: {r:#?}");
        let j = r.json();
        assert_eq!(j["verification"]["outcome"], "verified", "{id}: {j}");
        assert_eq!(j["connection"]["status"], "active", "{id}: {j}");
        let notices: Vec<&str> = j["notices"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(notices.len(), 1, "{id}: {j}");
        assert!(
            notices[0].starts_with("api_key:") && notices[0].contains(notice),
            "{id}: {j}"
        );
        // The verification call carried the trimmed key, and so does Vault and every request.
        let verify = w.sim.last();
        assert_eq!(verify.path, "/v1/balance");
        assert_eq!(verify.key.as_deref(), Some(key.as_str()), "{id}");
        assert_eq!(w.stored(id)["api_key"], key.as_str(), "{id}");
        let a = w.call(id, Method::GET, "/v1/charges").await;
        w.assert_injected(&a, &key);
    }

    // The same on rotation.
    let key = w.key(KeyState::ReadWrite);
    let r = w.rotate("newline", &format!("{key}\n")).await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert!(
        r.json()["notices"][0]
            .as_str()
            .is_some_and(|n| n.contains("trailing newline")),
        "{r:#?}"
    );
    assert_eq!(w.stored("newline")["api_key"], key.as_str());
    let a = w.call("newline", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &key);
}

#[tokio::test]
async fn whitespace_or_control_characters_inside_a_value_are_refused_naming_the_field() {
    let w = World::start(Opts::loopback()).await;
    let cases: Vec<(String, &str, &str)> = {
        let mut v = Vec::new();
        for (inner, says) in [
            (" ", "whitespace"),
            ("\u{a0}", "whitespace"),
            ("\r\nX-Injected: 1\r\n", "control"),
            ("\n", "control"),
            ("\0", "control"),
            ("\t", "control"),
            ("\u{7f}", "control"),
            // Not ASCII: sent as bytes an upstream decodes its own way, and echoes unscrubbed.
            ("\u{e9}\u{e9}", "outside ASCII"),
        ] {
            let (x, y) = (w.fresh(), w.fresh());
            v.push((format!("sk_test_{x}{inner}{y}"), "api_key", says));
        }
        // So short that replacing it in answers would rewrite ordinary text.
        v.push(("e".to_string(), "api_key", "at least 8"));
        v
    };
    for (i, (value, field, says)) in cases.iter().enumerate() {
        let id = format!("ws{i}");
        let r = w.create(&w.stripe(&id, value)).await;
        assert_api_error(&r, 422, "invalid_field", Some(field));
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(says)),
            "case {i}: {r:#?}"
        );
        assert!(w.bao.get(&id).is_none(), "case {i}: saved anyway");
    }
    // A non-secret field may hold spaces, but never control characters.
    for (field, value) in [
        ("name", "Stripe\r\nX-Injected: 1"),
        ("environment", "sand\u{1b}box"),
    ] {
        let mut body = w.stripe("ctl", &w.key(KeyState::ReadWrite));
        body[field] = json!(value);
        let r = w.create(&body).await;
        assert_api_error(&r, 422, "invalid_field", Some(field));
    }
    assert!(w.bao.get("ctl").is_none());
    assert!(
        w.sim.seen().is_empty(),
        "a refused value reached the service: {:?}",
        w.sim.seen()
    );
}

#[tokio::test]
async fn a_sandbox_key_on_a_production_connection_is_refused() {
    let w = World::start(Opts::loopback()).await;
    let test_key = w.key(KeyState::ReadWrite);
    let live_key = w.live_key(KeyState::ReadWrite);
    let restricted_test = w.sim.new_key("rk_test_", KeyState::ReadWrite);
    w.secret(&restricted_test);

    for (id, env, key, key_env) in [
        ("prod-with-test", "production", &test_key, "sandbox"),
        (
            "prod-with-rk-test",
            "production",
            &restricted_test,
            "sandbox",
        ),
        ("sandbox-with-live", "sandbox", &live_key, "production"),
        // However the environment is written.
        ("prod-upper-with-test", "PRODUCTION", &test_key, "sandbox"),
        ("prod-title-with-test", "Production", &test_key, "sandbox"),
    ] {
        let mut body = w.stripe(id, key);
        body["environment"] = json!(env);
        let r = w.create(&body).await;
        assert_api_error(&r, 422, "invalid_field", Some("api_key"));
        let m = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(m.contains(key_env) && m.contains(env), "{id}: {m}");
        assert!(w.bao.get(id).is_none(), "{id}: saved anyway");
    }
    // An environment the connector does not know would have turned the check off.
    let mut body = w.stripe("prod-misspelt", &test_key);
    body["environment"] = json!("prodution");
    let r = w.create(&body).await;
    assert_api_error(&r, 422, "invalid_field", Some("environment"));
    let m = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(m.contains("production") && m.contains("sandbox"), "{m}");
    assert!(w.bao.get("prod-misspelt").is_none());
    assert!(
        w.sim.seen().is_empty(),
        "a mismatched key was sent to the service: {:?}",
        w.sim.seen()
    );

    // The matching pairs are fine.
    let mut body = w.stripe("prod", &live_key);
    body["environment"] = json!("production");
    let r = w.create(&body).await;
    assert_eq!(r.status, 201, "{r:#?}");

    // And a production connection cannot be rotated to a sandbox key.
    let r = w.rotate("prod", &test_key).await;
    assert_api_error(&r, 422, "invalid_field", Some("api_key"));
    assert_eq!(w.stored("prod")["api_key"], live_key.as_str());
    assert_eq!(w.stored_version("prod"), 1);
    let a = w.call("prod", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &live_key);
    // Nor switched to sandbox under its production key.
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/prod",
            Some(&json!({"environment": "sandbox"})),
        )
        .await;
    assert_api_error(&r, 422, "invalid_field", Some("api_key"));
}

#[tokio::test]
async fn a_sandbox_base_url_on_a_production_connection_is_refused() {
    // Square tells its environments apart by base URL. Refused before any call is made, so the
    // real hosts are never contacted.
    let w = World::start(Opts::loopback()).await;
    let key = format!("EAAA{}", w.fresh());
    for (id, env, base_url) in [
        (
            "sq-prod-on-sandbox-url",
            "production",
            Some("https://connect.squareupsandbox.com"),
        ),
        ("sq-sandbox-on-default-url", "sandbox", None),
        (
            "sq-sandbox-on-prod-url",
            "sandbox",
            Some("https://connect.squareup.com"),
        ),
    ] {
        let mut body = json!({
            "id": id, "connector": "square", "environment": env, "fields": {"api_key": key},
        });
        if let Some(u) = base_url {
            body["base_url"] = json!(u);
        }
        let r = w.create(&body).await;
        assert_api_error(&r, 422, "invalid_field", Some("base_url"));
        let m = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(m.contains(env), "{id}: {m}");
        assert!(w.bao.get(id).is_none());
    }
}

#[tokio::test]
async fn a_read_only_key_passes_verification_and_its_first_write_reports_the_scope() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadOnly);
    let j = w.create_ok("ro", &key).await;
    assert_eq!(j["verification"]["outcome"], "verified", "{j}");
    assert_eq!(j["connection"]["status"], "active");
    assert_eq!(j["connection"]["warnings"], json!([]));

    let a = w.call("ro", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &key);
    // The first write: the service's own 403 comes back as it is.
    let a = w.call("ro", Method::POST, "/v1/charges").await;
    assert_eq!(a.status, 403, "{a:#?}");
    assert_eq!(a.header("latchkey-error"), None, "{a:#?}");
    assert!(a.body.contains("read-only"), "{a:#?}");
    assert_eq!(w.sim.last().key.as_deref(), Some(key.as_str()));
    assert_eq!(
        metric(&w.lk, "latchkey_upstream_forbidden_total", "ro").await,
        Some(1.0)
    );

    // The connection says so, with the connector's scope hint; the key is not dead.
    let c = eventually("a scope warning on the connection", || async {
        let c = w.show("ro").await;
        c["warnings"]
            .as_array()
            .is_some_and(|ws| !ws.is_empty())
            .then_some(c)
    })
    .await;
    let warning = c["warnings"][0].as_str().unwrap();
    assert!(warning.contains("403"), "{c}");
    assert!(warning.contains("scope"), "{c}");
    assert!(
        warning.contains("Restricted keys"),
        "the connector's hint: {c}"
    );
    assert!(warning.contains("POST"), "which call: {c}");
    assert_eq!(c["status"], "active", "{c}");
    assert_masked(&c);
    assert!(
        w.custom_metadata("ro")["scope_warning"]
            .as_str()
            .is_some_and(|s| s.contains("scope")),
        "{}",
        w.custom_metadata("ro")
    );

    // A key with the write scope: the warning goes with the old key, and writes work.
    let rw = w.key(KeyState::ReadWrite);
    let r = w.rotate("ro", &rw).await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(r.json()["connection"]["warnings"], json!([]));
    assert_eq!(w.show("ro").await["warnings"], json!([]));
    assert!(w.custom_metadata("ro").get("scope_warning").is_none());
    let a = w.call("ro", Method::POST, "/v1/charges").await;
    w.assert_injected(&a, &rw);
}

#[tokio::test]
async fn a_403_on_the_request_path_does_not_undo_a_failed_verification() {
    // The service narrows a read-only key further: the verification call itself now answers
    // 403 and the connection is recorded failed. A workflow's write then gets its own 403;
    // recording that scope warning must not bring back the status the key had when latchkey
    // cached it.
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadOnly);
    w.create_ok("narrowed", &key).await;
    let a = w.call("narrowed", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &key);

    w.sim.deny_verify(&key);
    let r = w.verify("narrowed").await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(r.json()["verification"]["outcome"], "insufficient_scope");
    assert_eq!(w.custom_metadata("narrowed")["status"], "failed");

    let a = w.call("narrowed", Method::POST, "/v1/charges").await;
    assert_eq!(a.status, 403, "{a:#?}");
    let c = eventually("the scope warning", || async {
        let c = w.show("narrowed").await;
        c["warnings"]
            .as_array()
            .is_some_and(|ws| !ws.is_empty())
            .then_some(c)
    })
    .await;
    assert_eq!(
        c["status"], "failed",
        "the failed verification was undone by the request path: {c}"
    );
    assert!(
        c["last_error"].as_str().is_some_and(|e| e.contains("403")),
        "{c}"
    );
}

#[tokio::test]
async fn a_key_the_service_revoked_is_detected_by_upstream_401s() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("dead", &key).await;
    let a = w.call("dead", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &key);
    let verify_calls = |w: &World| {
        w.sim
            .seen()
            .iter()
            .filter(|s| s.path == "/v1/balance")
            .count()
    };
    let verifies = verify_calls(&w);
    assert_eq!(
        metric(&w.lk, "latchkey_upstream_unauthorized_total", "dead").await,
        None
    );

    // The service ages the key out.
    w.sim.revoke(&key);
    let a = w.call("dead", Method::GET, "/v1/charges").await;
    assert_eq!(a.status, 401, "{a:#?}");
    assert_eq!(
        a.header("latchkey-error"),
        None,
        "the service's own 401: {a:#?}"
    );
    assert_eq!(
        metric(&w.lk, "latchkey_upstream_unauthorized_total", "dead").await,
        Some(1.0)
    );

    let c = eventually("the connection to turn failed", || async {
        let c = w.show("dead").await;
        (c["status"] == "failed").then_some(c)
    })
    .await;
    assert!(
        c["last_error"].as_str().is_some_and(|e| e.contains("401")),
        "{c}"
    );
    assert_masked(&c);
    assert_eq!(verify_calls(&w), verifies, "someone ran a verification");
    let meta = w.custom_metadata("dead");
    assert_eq!(meta["status"], "failed", "{meta}");
    assert_eq!(w.stored_version("dead"), 1, "recording it wrote a version");
    let listed = w.list().await;
    assert_eq!(listed[0]["status"], "failed");

    let a = w.call("dead", Method::POST, "/v1/charges").await;
    assert_eq!(a.status, 401);
    assert_eq!(
        metric(&w.lk, "latchkey_upstream_unauthorized_total", "dead").await,
        Some(2.0)
    );

    // Rotating to a live key brings it back.
    let fresh = w.key(KeyState::ReadWrite);
    let r = w.rotate("dead", &fresh).await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(r.json()["connection"]["status"], "active");
    assert_eq!(w.show("dead").await["last_error"], Value::Null);
    let a = w.call("dead", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &fresh);
}

#[tokio::test]
async fn a_key_pasted_into_the_base_url_is_refused_without_echoing_it() {
    // `https://sk_test_...:@api.stripe.com` is how curl-minded people write a Stripe key.
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    let addr = w.sim.base_url().trim_start_matches("http://").to_string();
    for base_url in [
        format!("http://{key}:@{addr}"),
        format!("http://{key}@{addr}"),
        // Or the whole URL of a query-authenticated call, key and all.
        format!("http://{addr}/v1?key={key}"),
    ] {
        let mut body = w.stripe("in-url", &key);
        body["base_url"] = json!(base_url);
        // `checked` fails if the answer holds the key.
        let r = w.create(&body).await;
        assert_api_error(&r, 422, "invalid_field", Some("base_url"));
        assert!(w.bao.get("in-url").is_none());
    }
}

#[tokio::test]
async fn a_stored_base_url_holding_a_key_is_never_logged_or_echoed() {
    // Written with the Vault CLI, where nothing checks it first: the proxy refuses to use it,
    // and neither its answer nor its log may quote the key.
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    let addr = w.sim.base_url().trim_start_matches("http://").to_string();
    w.bao.put(
        "in-url",
        &[
            ("connector", "stripe"),
            ("base_url", &format!("http://{key}:@{addr}")),
            ("api_key", &key),
        ],
    );
    let a = w.call("in-url", Method::GET, "/v1/charges").await;
    a.assert_error(500, "connection_invalid");
    w.assert_clean("the proxy's answer", &a.body);
    // Its access line is written before the World's drop searches the log for the key.
    crate::lifecycle::eventually("the refused request's access line", || async {
        w.lk.access_log()
            .into_iter()
            .find(|l| l["connection"] == "in-url" && l["error"] == "connection_invalid")
    })
    .await;
    let c = w.show("in-url").await;
    assert_eq!(c["status"], "invalid", "{c}");
    w.assert_clean("the admin view", &c.to_string());
    // Dropping the World checks latchkey's whole log for the key.
}
