//! The connection lifecycle through the admin API, end to end: every call with its success and
//! failure paths, verification outcomes, rotation and deletion against a long cache TTL,
//! `expires_at`, interplay with `bao kv`, and the audit log.
//!
//! [`World`] is what these tests (and `pitfalls` and `cli`) share: a real OpenBao, the simulated
//! service of `service_sim`, a real latchkey, and an admin API client that checks every answer
//! for every secret the test has registered (on top of the harness's check of latchkey's log).

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::Method;
use serde_json::{json, Value};

use crate::errors::{metrics_text, send, Answer};
use crate::service_sim::{random_hex, KeyState, ServiceSim, SLOW, SLOW_PREFIX, WRONG_PREFIX};
use crate::support::*;

/// A real OpenBao, the simulated service and a real latchkey.
pub struct World {
    // Dropped first: latchkey's output is checked for secrets when it stops.
    pub lk: Latchkey,
    pub sim: ServiceSim,
    pub bao: Bao,
    secrets: Mutex<Vec<String>>,
}

impl World {
    /// On a fresh prefix of the shared OpenBao.
    pub async fn start(opts: Opts) -> World {
        Self::on(Bao::start().await, opts).await
    }

    /// On an OpenBao of the test's own (one it may freeze).
    pub async fn start_own(opts: Opts) -> World {
        Self::on(Bao::start_own().await, opts).await
    }

    async fn on(bao: Bao, opts: Opts) -> World {
        let sim = ServiceSim::start().await;
        let lk = Latchkey::start(&bao, opts).await;
        World {
            lk,
            sim,
            bao,
            secrets: Mutex::new(Vec::new()),
        }
    }

    /// Registers a value that no admin answer and no line of latchkey's output may contain.
    pub fn secret(&self, s: &str) {
        self.lk.forbid(s);
        self.secrets.lock().unwrap().push(s.to_string());
    }

    /// A new sandbox key (`sk_test_...`) that the service holds in `state`; registered secret.
    pub fn key(&self, state: KeyState) -> String {
        let k = self.sim.new_key("sk_test_", state);
        self.secret(&k);
        k
    }

    /// A new production key (`sk_live_...`).
    pub fn live_key(&self, state: KeyState) -> String {
        let k = self.sim.new_key("sk_live_", state);
        self.secret(&k);
        k
    }

    /// A well-formed sandbox key that the service has never issued (it answers 401).
    pub fn unknown_key(&self) -> String {
        let k = format!("sk_test_{}", random_hex(12));
        self.secret(&k);
        k
    }

    /// A random value, registered as secret (for the parts of malformed keys).
    pub fn fresh(&self) -> String {
        let s = random_hex(10);
        self.secret(&s);
        s
    }

    /// Panics if `text` holds a registered secret, raw or in base64.
    #[track_caller]
    pub fn assert_clean(&self, what: &str, text: &str) {
        for s in self.secrets.lock().unwrap().iter() {
            let forms = [
                s.clone(),
                base64::engine::general_purpose::STANDARD
                    .encode(s)
                    .trim_end_matches('=')
                    .to_string(),
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s),
            ];
            for f in forms {
                assert!(
                    !text.contains(&f),
                    "{what} contains a secret ({s:?}): {text}"
                );
            }
        }
    }

    /// Checks an admin answer, body and headers, for every registered secret.
    #[track_caller]
    pub fn checked(&self, a: Answer) -> Answer {
        self.assert_clean("an admin API answer", &a.body);
        for (n, v) in &a.headers {
            self.assert_clean(&format!("the admin API header {n}"), v);
        }
        a
    }

    /// An admin API call with the admin token.
    pub async fn api(&self, method: Method, path: &str, body: Option<&Value>) -> Answer {
        let mut req = http()
            .request(method, self.lk.admin_url(path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(b);
        }
        self.checked(send(req).await)
    }

    /// An admin API call with a raw body and any `Authorization` value (or none).
    pub async fn api_raw(
        &self,
        method: Method,
        path: &str,
        authorization: Option<&str>,
        body: Option<String>,
    ) -> Answer {
        let mut req = http().request(method, self.lk.admin_url(path));
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b);
        }
        self.checked(send(req).await)
    }

    /// A create request for a Stripe sandbox connection to the simulated service.
    pub fn stripe(&self, id: &str, key: &str) -> Value {
        json!({
            "id": id,
            "connector": "stripe",
            "name": format!("Stripe - {id}"),
            "environment": "sandbox",
            "base_url": self.sim.base_url(),
            "fields": {"api_key": key},
        })
    }

    pub async fn create(&self, body: &Value) -> Answer {
        self.api(Method::POST, "/v1/connections", Some(body)).await
    }

    /// Creates a Stripe sandbox connection and insists on 201.
    pub async fn create_ok(&self, id: &str, key: &str) -> Value {
        let a = self.create(&self.stripe(id, key)).await;
        assert_eq!(a.status, 201, "create {id}: {a:#?}");
        a.json()
    }

    /// Writes a Stripe sandbox connection with `key` straight to Vault, behind the API's back
    /// (as the Vault CLI would).
    pub fn put_behind(&self, id: &str, key: &str) {
        self.bao.put(
            id,
            &[
                ("connector", "stripe"),
                ("environment", "sandbox"),
                ("base_url", &self.sim.base_url()),
                ("api_key", key),
            ],
        );
    }

    /// `GET /v1/connections/{id}`, insisting on 200; the connection.
    pub async fn show(&self, id: &str) -> Value {
        let a = self
            .api(Method::GET, &format!("/v1/connections/{id}"), None)
            .await;
        assert_eq!(a.status, 200, "show {id}: {a:#?}");
        a.json()["connection"].clone()
    }

    /// `GET /v1/connections`: the list.
    pub async fn list(&self) -> Vec<Value> {
        let a = self.api(Method::GET, "/v1/connections", None).await;
        assert_eq!(a.status, 200, "list: {a:#?}");
        a.json()["connections"]
            .as_array()
            .unwrap_or_else(|| panic!("no list in {a:#?}"))
            .clone()
    }

    pub async fn rotate(&self, id: &str, key: &str) -> Answer {
        self.api(
            Method::PUT,
            &format!("/v1/connections/{id}/secret"),
            Some(&json!({"fields": {"api_key": key}})),
        )
        .await
    }

    pub async fn verify(&self, id: &str) -> Answer {
        self.api(Method::POST, &format!("/v1/connections/{id}/verify"), None)
            .await
    }

    /// A request through the proxy, gateway form.
    pub async fn call(&self, id: &str, method: Method, path: &str) -> Answer {
        send(http().request(method, self.lk.url(&format!("/{id}{path}")))).await
    }

    /// Asserts that a proxied request reached the service with `key`, and only it.
    #[track_caller]
    pub fn assert_injected(&self, a: &Answer, key: &str) {
        assert_eq!(a.status, 200, "{a:#?}");
        assert_eq!(
            a.json()["key_sha256"],
            latchkey::auth::sha256_hex(key),
            "the service saw another key: {a:#?}"
        );
        let last = self.sim.last();
        assert_eq!(last.key.as_deref(), Some(key), "{last:?}");
        assert_eq!(last.authorizations, 1, "{last:?}");
    }

    /// `custom_metadata` of a connection, by `bao kv get`.
    pub fn custom_metadata(&self, id: &str) -> Value {
        let v = self
            .bao
            .get(id)
            .unwrap_or_else(|| panic!("{id} is not in Vault"));
        v["data"]["metadata"]["custom_metadata"].clone()
    }

    /// The stored fields of a connection, by `bao kv get`.
    pub fn stored(&self, id: &str) -> Value {
        let v = self
            .bao
            .get(id)
            .unwrap_or_else(|| panic!("{id} is not in Vault"));
        v["data"]["data"].clone()
    }

    pub fn stored_version(&self, id: &str) -> u64 {
        let v = self
            .bao
            .get(id)
            .unwrap_or_else(|| panic!("{id} is not in Vault"));
        v["data"]["metadata"]["version"]
            .as_u64()
            .unwrap_or_else(|| panic!("no version in {v}"))
    }
}

/// Asserts an admin API error: status, `{"error":{"code","message","field"?}}` and nothing else.
#[track_caller]
pub fn assert_api_error(a: &Answer, status: u16, code: &str, field: Option<&str>) {
    assert_eq!(a.status, status, "wanted {status} {code}: {a:#?}");
    assert!(
        a.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{a:#?}"
    );
    let j = a.json();
    assert_eq!(j.as_object().map(|o| o.len()), Some(1), "{j}");
    let e = &j["error"];
    assert_eq!(e["code"], code, "{j}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message: {j}"
    );
    if let Some(f) = field {
        assert_eq!(e["field"], f, "the error names another field: {j}");
    }
}

/// Asserts that a connection view shows its key only as `{"set": true}`.
#[track_caller]
pub fn assert_masked(conn: &Value) {
    assert_eq!(
        conn["fields"]["api_key"],
        json!({"set": true}),
        "api_key is not masked: {conn}"
    );
}

/// Polls `f` until it gives a value; fails after 30 s.
pub async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_until(what, Duration::from_secs(30), f).await
}

/// The value of the sample of `name` labelled `connection="{connection}"`, if there is one.
pub async fn metric(lk: &Latchkey, name: &str, connection: &str) -> Option<f64> {
    let text = metrics_text(lk).await;
    let prefix = format!("{name}{{");
    let label = format!("connection=\"{connection}\"");
    text.lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&label))
        .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
}

/// Runs the real `bao` CLI against the test's OpenBao; its JSON output if it succeeded.
pub async fn bao_json(bao: &Bao, args: &[&str]) -> Option<Value> {
    let out = tokio::process::Command::new(find_program("bao").expect("bao is needed"))
        .env("VAULT_ADDR", &bao.addr)
        .env("VAULT_TOKEN", &bao.token)
        .env("BAO_ADDR", &bao.addr)
        .env("BAO_TOKEN", &bao.token)
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .args(args)
        .output()
        .await
        .unwrap();
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// An RFC 3339 time `seconds` from now (negative: in the past).
pub fn rfc3339_in(seconds: i64) -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds))
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The audit lines latchkey has printed so far.
pub fn audit_lines(lk: &Latchkey) -> Vec<Value> {
    lk.output()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "latchkey::audit")
        .collect()
}

/// A long cache TTL: anything a request sees differently after an admin action comes from the
/// action, never from an expiry.
pub fn long_ttl() -> Opts {
    Opts::loopback().extra("[cache]\nttl = \"1h\"")
}

const DAY: i64 = 86_400;

// ---------------------------------------------------------------------------------------------
// Authentication

#[tokio::test]
async fn every_admin_call_needs_the_admin_token() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("guarded", &key).await;
    let before = w.sim.seen().len();

    let other = w.key(KeyState::ReadWrite);
    let create = w.stripe("sneaky", &other).to_string();
    let rotate = json!({"fields": {"api_key": other}}).to_string();
    let patch = json!({"name": "taken over"}).to_string();
    let calls: Vec<(Method, &str, Option<String>)> = vec![
        (Method::GET, "/v1/connectors", None),
        (Method::POST, "/v1/connections", Some(create)),
        (Method::GET, "/v1/connections", None),
        (Method::GET, "/v1/connections/guarded", None),
        (Method::PATCH, "/v1/connections/guarded", Some(patch)),
        (Method::PUT, "/v1/connections/guarded/secret", Some(rotate)),
        (Method::POST, "/v1/connections/guarded/verify", None),
        (Method::DELETE, "/v1/connections/guarded", None),
    ];
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("admin:{ADMIN_TOKEN}"))
    );
    let bad_auth = [
        None,
        Some("Bearer not-the-admin-token".to_string()),
        Some(format!("Bearer {ADMIN_TOKEN}x")),
        Some(ADMIN_TOKEN.to_string()),
        Some(basic),
    ];
    for (method, path, body) in &calls {
        for auth in &bad_auth {
            let a = w
                .api_raw(method.clone(), path, auth.as_deref(), body.clone())
                .await;
            assert_api_error(&a, 401, "unauthorized", None);
            assert!(
                a.header("www-authenticate")
                    .is_some_and(|h| h.starts_with("Bearer")),
                "{method} {path}: {a:#?}"
            );
            assert!(!a.body.contains("guarded"), "{a:#?}");
        }
    }

    // Nothing happened: no connection created, none changed or deleted, no verification call.
    assert!(w.bao.get("sneaky").is_none());
    assert_eq!(w.stored_version("guarded"), 1);
    assert_eq!(w.stored("guarded")["api_key"], key.as_str());
    assert_eq!(w.stored("guarded")["name"], "Stripe - guarded");
    assert_eq!(
        w.sim.seen().len(),
        before,
        "a refused call reached the service"
    );
    let a = w.call("guarded", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &key);

    // The same calls with the token are answered (the 401s were not about anything else).
    let a = w.api(Method::GET, "/v1/connections/guarded", None).await;
    assert_eq!(a.status, 200, "{a:#?}");
}

// ---------------------------------------------------------------------------------------------
// GET /v1/connectors

#[tokio::test]
async fn connectors_describe_fields_verification_and_environments() {
    let w = World::start(Opts::loopback()).await;
    let a = w.api(Method::GET, "/v1/connectors", None).await;
    assert_eq!(a.status, 200, "{a:#?}");
    let j = a.json();
    let list = j["connectors"].as_array().unwrap();
    let get = |id: &str| {
        list.iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("no {id} in {j}"))
            .clone()
    };
    let stripe = get("stripe");
    assert_eq!(
        stripe["verify"],
        json!({"method": "GET", "path": "/v1/balance"})
    );
    assert_eq!(stripe["environments"]["production"], "^(sk|rk)_live_");
    assert_eq!(stripe["environments"]["sandbox"], "^(sk|rk)_test_");
    let key = &stripe["fields"][0];
    assert_eq!(key["name"], "api_key");
    assert_eq!(key["secret"], true);
    assert_eq!(key["pattern"], "^(sk|rk)_(live|test)_[0-9A-Za-z]+$");
    assert!(stripe["scopes"].as_str().is_some_and(|s| !s.is_empty()));
    let square = get("square");
    assert!(square["environment_urls"]["sandbox"]
        .as_str()
        .is_some_and(|u| u.contains("squareupsandbox")));
    assert_eq!(get("slack")["verify"]["method"], "POST");

    let a = w
        .api(Method::POST, "/v1/connectors", Some(&json!({})))
        .await;
    assert_eq!(a.status, 405, "{a:#?}");
}

// ---------------------------------------------------------------------------------------------
// POST /v1/connections

#[tokio::test]
async fn create_verifies_through_latchkey_stores_in_vault_and_masks_the_key() {
    let w = World::start(Opts::loopback()).await;
    // Asked for before it exists: 404, and that answer is not cached past the create.
    let a = w.call("stripe-sandbox", Method::GET, "/v1/charges").await;
    a.assert_error(404, "connection_not_found");
    let key = w.key(KeyState::ReadWrite);
    let j = w.create_ok("stripe-sandbox", &key).await;

    let c = &j["connection"];
    assert_eq!(c["id"], "stripe-sandbox");
    assert_eq!(c["connector"], "stripe");
    assert_eq!(c["name"], "Stripe - stripe-sandbox");
    assert_eq!(c["environment"], "sandbox");
    assert_eq!(c["base_url"], w.sim.base_url());
    assert_eq!(c["status"], "active", "{j}");
    assert_eq!(c["version"], 1);
    assert!(c["verified_at"].is_string(), "{j}");
    assert_masked(c);
    assert_eq!(j["notices"], json!([]));
    assert_eq!(j["verification"]["outcome"], "verified", "{j}");
    assert_eq!(j["verification"]["passed"], true);
    assert_eq!(j["verification"]["http_status"], 200);

    // The verification call: one, with the key, made by latchkey.
    let seen = w.sim.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path, "/v1/balance");
    assert_eq!(seen[0].key.as_deref(), Some(key.as_str()));
    assert_eq!(seen[0].authorizations, 1);
    assert_eq!(seen[0].user_agent.as_deref(), Some("latchkey-verify"));

    // In Vault: flat string fields, and the status in custom_metadata.
    assert_eq!(
        w.stored("stripe-sandbox"),
        json!({
            "connector": "stripe",
            "name": "Stripe - stripe-sandbox",
            "environment": "sandbox",
            "base_url": w.sim.base_url(),
            "api_key": key,
        })
    );
    let meta = w.custom_metadata("stripe-sandbox");
    assert_eq!(meta["status"], "active", "{meta}");
    assert_eq!(meta["verified_at"], c["verified_at"], "{meta}");
    assert_eq!(w.stored_version("stripe-sandbox"), 1);

    // Every later read shows the key only as set.
    let shown = w.show("stripe-sandbox").await;
    assert_masked(&shown);
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["verified_at"], c["verified_at"]);
    let list = w.list().await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], "stripe-sandbox");
    assert_masked(&list[0]);

    // And it works.
    let a = w.call("stripe-sandbox", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &key);
}

#[tokio::test]
async fn create_refuses_what_the_connector_does_not_allow_and_names_the_field() {
    let w = World::start(Opts::loopback()).await;
    let base = w.sim.base_url();
    let publishable = format!("pk_test_{}", w.fresh());
    let top_level = format!("sk_test_{}", w.fresh());
    let (a, b) = (w.fresh(), w.fresh());
    let spaced = format!("sk_test_{a} {b}");

    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "no key",
            json!({"id": "c1", "connector": "stripe", "base_url": base, "fields": {}}),
            "api_key",
        ),
        (
            "a publishable key where the secret key goes",
            json!({"id": "c1", "connector": "stripe", "base_url": base, "fields": {"api_key": publishable}}),
            "api_key",
        ),
        (
            "inner whitespace",
            json!({"id": "c1", "connector": "stripe", "base_url": base, "fields": {"api_key": spaced}}),
            "api_key",
        ),
        (
            "an unknown connector",
            json!({"id": "c1", "connector": "no-such-service", "fields": {"api_key": "sk_test_abc"}}),
            "connector",
        ),
        (
            "an unknown field",
            json!({"id": "c1", "connector": "stripe", "base_url": base, "fields": {"api_key": "sk_test_abc", "region": "eu"}}),
            "region",
        ),
        (
            "a reserved field among the fields",
            json!({"id": "c1", "connector": "stripe", "fields": {"api_key": "sk_test_abc", "base_url": base}}),
            "fields.base_url",
        ),
        (
            "a base URL that is not one",
            json!({"id": "c1", "connector": "stripe", "base_url": "ftp://files.example.com", "fields": {"api_key": "sk_test_abc"}}),
            "base_url",
        ),
        (
            "an expiry that is not RFC 3339",
            json!({"id": "c1", "connector": "stripe", "base_url": base, "expires_at": "next tuesday", "fields": {"api_key": "sk_test_abc"}}),
            "expires_at",
        ),
    ];
    for (what, body, field) in &cases {
        let r = w.create(body).await;
        assert_api_error(&r, 422, "invalid_field", Some(field));
        assert!(w.bao.get("c1").is_none(), "{what}: saved anyway");
    }
    let r = w
        .create(&json!({"id": "c1", "connector": "stripe", "base_url": base, "fields": {"api_key": "pk_test_abc123"}}))
        .await;
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("pattern")),
        "{r:#?}"
    );

    // Malformed requests: 400, never quoting a value.
    let r = w
        .create(&json!({"id": "../etc/passwd", "connector": "stripe", "fields": {"api_key": "sk_test_abc"}}))
        .await;
    assert_api_error(&r, 400, "bad_connection_id", Some("id"));
    let r = w
        .create(&json!({"id": "c1", "fields": {"api_key": "sk_test_abc"}}))
        .await;
    assert_api_error(&r, 400, "bad_request", None);
    assert!(r.body.contains("connector"), "{r:#?}");
    let r = w
        .create(&json!({"id": "c1", "connector": "stripe", "api_key": top_level}))
        .await;
    assert_api_error(&r, 400, "bad_request", None);
    assert!(
        r.body.contains("api_key"),
        "the answer names the field: {r:#?}"
    );
    let r = w
        .create(
            &json!({"id": "c1", "connector": "stripe", "fields": {"api_key": 4_242_424_242_u64}}),
        )
        .await;
    assert_api_error(&r, 400, "bad_request", Some("fields.api_key"));
    assert!(!r.body.contains("4242424242"), "{r:#?}");
    let r = w
        .api_raw(
            Method::POST,
            "/v1/connections",
            Some(&format!("Bearer {ADMIN_TOKEN}")),
            Some(format!(
                "{{\"id\": \"c1\", \"connector\": \"stripe\", \"fields\": {{\"api_key\": \"{top_level}\"}}"
            )),
        )
        .await;
    assert_api_error(&r, 400, "bad_request", None);
    // A key given twice: refused naming it, never read as its last value; an ID given twice
    // is said to be given twice.
    for (body, field) in [
        (
            format!("{{\"id\": \"c1\", \"connector\": \"stripe\", \"fields\": {{\"api_key\": \"{top_level}\", \"api_key\": \"{spaced}\"}}}}"),
            "fields",
        ),
        (
            format!("{{\"id\": \"c1\", \"id\": \"c2\", \"connector\": \"stripe\", \"fields\": {{\"api_key\": \"{top_level}\"}}}}"),
            ".",
        ),
    ] {
        let r = w
            .api_raw(
                Method::POST,
                "/v1/connections",
                Some(&format!("Bearer {ADMIN_TOKEN}")),
                Some(body),
            )
            .await;
        assert_api_error(&r, 400, "bad_request", (field != ".").then_some(field));
        assert!(r.body.contains("duplicate field"), "{r:#?}");
        assert!(!r.body.contains("sk_test_"), "{r:#?}");
    }

    assert!(w.bao.get("c1").is_none());
    assert!(
        w.sim.seen().is_empty(),
        "a refused create made a verification call: {:?}",
        w.sim.seen()
    );
}

#[tokio::test]
async fn a_duplicate_id_is_409_and_leaves_the_first_connection_alone() {
    let w = World::start(Opts::loopback()).await;
    let first = w.key(KeyState::ReadWrite);
    let second = w.key(KeyState::ReadWrite);
    w.create_ok("dup", &first).await;

    let r = w.create(&w.stripe("dup", &second)).await;
    assert_api_error(&r, 409, "connection_exists", Some("id"));
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("PUT /v1/connections/dup/secret")),
        "the answer says how to rotate instead: {r:#?}"
    );
    assert_eq!(w.stored_version("dup"), 1);
    assert_eq!(w.stored("dup")["api_key"], first.as_str());
    assert_eq!(w.sim.uses_of(&second), 0, "the duplicate was verified");
    let a = w.call("dup", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &first);

    // One written with `bao kv put` is just as taken.
    let outside = w.key(KeyState::ReadWrite);
    w.bao.put(
        "from-bao",
        &[
            ("connector", "stripe"),
            ("base_url", &w.sim.base_url()),
            ("api_key", &outside),
        ],
    );
    let r = w.create(&w.stripe("from-bao", &second)).await;
    assert_api_error(&r, 409, "connection_exists", Some("id"));
    assert_eq!(w.stored("from-bao")["api_key"], outside.as_str());
    assert_eq!(w.stored_version("from-bao"), 1);
}

#[tokio::test]
async fn verify_false_saves_unverified_without_calling_the_service() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::Revoked);
    let mut body = w.stripe("later", &key);
    body["verify"] = json!(false);
    let r = w.create(&body).await;
    assert_eq!(r.status, 201, "{r:#?}");
    let j = r.json();
    assert_eq!(j["connection"]["status"], "unverified", "{j}");
    assert_eq!(j["verification"], Value::Null);
    assert_masked(&j["connection"]);
    assert!(w.sim.seen().is_empty(), "{:?}", w.sim.seen());
    assert_eq!(w.custom_metadata("later")["status"], "unverified");
}

// ---------------------------------------------------------------------------------------------
// POST /v1/connections/{id}/verify

#[tokio::test]
async fn verify_runs_the_call_again_and_records_the_result_in_custom_metadata() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("checked", &key).await;
    let calls = w.sim.uses_of(&key);

    // The service revoked the key: verify says so, and records it without a new version.
    w.sim.revoke(&key);
    let r = w.verify("checked").await;
    assert_eq!(r.status, 200, "{r:#?}");
    let j = r.json();
    assert_eq!(
        w.sim.uses_of(&key),
        calls + 1,
        "no verification call was made"
    );
    assert_eq!(w.sim.last().path, "/v1/balance");
    assert_eq!(j["verification"]["outcome"], "key_rejected", "{j}");
    assert_eq!(j["verification"]["passed"], false);
    assert_eq!(j["connection"]["status"], "failed");
    assert_masked(&j["connection"]);
    let meta = w.custom_metadata("checked");
    assert_eq!(meta["status"], "failed", "{meta}");
    assert!(
        meta["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("401")),
        "{meta}"
    );
    assert!(meta["last_error_at"].is_string(), "{meta}");
    assert_eq!(w.stored_version("checked"), 1);
    let shown = w.show("checked").await;
    assert_eq!(shown["status"], "failed");
    assert!(shown["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("401")));

    // Reinstated: verify clears the error.
    w.sim.set(&key, KeyState::ReadWrite);
    let r = w.verify("checked").await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(r.json()["verification"]["outcome"], "verified");
    assert_eq!(r.json()["connection"]["status"], "active");
    let meta = w.custom_metadata("checked");
    assert_eq!(meta["status"], "active", "{meta}");
    assert!(meta.get("last_error").is_none(), "{meta}");
    assert!(meta["verified_at"].is_string(), "{meta}");
    let shown = w.show("checked").await;
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["last_error"], Value::Null);
    assert_eq!(w.stored_version("checked"), 1);

    let r = w.verify("missing").await;
    assert_api_error(&r, 404, "connection_not_found", None);
    let r = w.verify("bad.id").await;
    assert_api_error(&r, 400, "bad_connection_id", None);
    let r = w
        .api(Method::GET, "/v1/connections/checked/verify", None)
        .await;
    assert_eq!(r.status, 405, "{r:#?}");
}

#[tokio::test]
async fn verification_outcomes_tell_the_causes_apart_and_say_what_to_check() {
    let w = World::start(Opts::loopback().proxy("request_timeout = \"1s\"")).await;
    let sim = w.sim.base_url();
    let good = w.key(KeyState::ReadWrite);
    let unscoped = w.key(KeyState::ReadWrite);
    w.sim.deny_verify(&unscoped);
    let closed = format!("http://127.0.0.1:{}", free_port());

    struct Case {
        what: &'static str,
        key: String,
        base_url: String,
        outcome: &'static str,
        http_status: Value,
        message_has: &'static str,
        hint_has: &'static str,
    }
    let cases = [
        Case {
            what: "key rejected",
            key: w.unknown_key(),
            base_url: sim.clone(),
            outcome: "key_rejected",
            http_status: json!(401),
            message_has: "rejected the key",
            hint_has: "paste",
        },
        Case {
            what: "key lacks scope",
            key: unscoped.clone(),
            base_url: sim.clone(),
            outcome: "insufficient_scope",
            http_status: json!(403),
            message_has: "scope",
            hint_has: "Restricted keys",
        },
        Case {
            what: "wrong base URL",
            key: good.clone(),
            base_url: format!("{sim}{WRONG_PREFIX}"),
            outcome: "wrong_base_url",
            http_status: json!(404),
            message_has: "404",
            hint_has: "base URL",
        },
        Case {
            what: "unreachable",
            key: good.clone(),
            base_url: closed,
            outcome: "unreachable",
            http_status: Value::Null,
            message_has: "/v1/balance",
            hint_has: "base URL",
        },
        Case {
            what: "timed out",
            key: good.clone(),
            base_url: format!("{sim}{SLOW_PREFIX}"),
            outcome: "timeout",
            http_status: Value::Null,
            message_has: "did not answer",
            hint_has: "retry",
        },
    ];
    let mut hints = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let id = format!("v{i}");
        let mut body = w.stripe(&id, &c.key);
        body["base_url"] = json!(c.base_url);
        let started = Instant::now();
        let r = w.create(&body).await;
        let took = started.elapsed();
        assert_api_error(&r, 422, "verification_failed", Some("api_key"));
        let j = r.json();
        let v = &j["error"]["verification"];
        assert_eq!(v["outcome"], c.outcome, "{}: {j}", c.what);
        assert_eq!(v["passed"], false, "{}: {j}", c.what);
        assert_eq!(v["http_status"], c.http_status, "{}: {j}", c.what);
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains(c.message_has)),
            "{}: {j}",
            c.what
        );
        let hint = v["hint"].as_str().unwrap_or_default().to_string();
        assert!(hint.contains(c.hint_has), "{}: {j}", c.what);
        hints.push(hint);
        assert!(w.bao.get(&id).is_none(), "{}: saved anyway", c.what);
        if c.outcome == "timeout" {
            assert!(
                took < SLOW / 2,
                "the verification waited {took:?}, not request_timeout"
            );
        }
    }
    hints.sort();
    hints.dedup();
    assert!(hints.len() >= 4, "the hints do not differ: {hints:?}");

    // The same service and key that passes: active.
    let j = w.create_ok("v-ok", &good).await;
    assert_eq!(j["connection"]["status"], "active");
}

#[tokio::test]
async fn verification_reads_the_ok_field_of_services_that_answer_200() {
    let w = World::start(Opts::loopback()).await;
    let body = |id: &str, key: &str| json!({"id": id, "connector": "slack", "base_url": w.sim.base_url(), "fields": {"api_key": key}});
    let good = w.sim.new_key("xoxb-", KeyState::ReadWrite);
    w.secret(&good);
    let r = w.create(&body("slack-ok", &good)).await;
    assert_eq!(r.status, 201, "{r:#?}");
    assert_eq!(r.json()["verification"]["outcome"], "verified");
    assert_eq!(w.sim.last().method, "POST");
    assert_eq!(w.sim.last().path, "/auth.test");

    let bad = format!("xoxb-{}", w.fresh());
    let r = w.create(&body("slack-bad", &bad)).await;
    assert_api_error(&r, 422, "verification_failed", Some("api_key"));
    assert_eq!(
        r.json()["error"]["verification"]["outcome"],
        "key_rejected",
        "{r:#?}"
    );
    assert!(r.body.contains("invalid_auth"), "{r:#?}");

    let unscoped = w.sim.new_key("xoxb-", KeyState::ReadWrite);
    w.secret(&unscoped);
    w.sim.deny_verify(&unscoped);
    let r = w.create(&body("slack-scope", &unscoped)).await;
    assert_api_error(&r, 422, "verification_failed", Some("api_key"));
    assert_eq!(
        r.json()["error"]["verification"]["outcome"],
        "insufficient_scope",
        "{r:#?}"
    );
    assert!(w.bao.get("slack-bad").is_none());
    assert!(w.bao.get("slack-scope").is_none());
}

#[tokio::test]
async fn the_verification_call_goes_through_latchkeys_destination_checks() {
    // No private destinations allowed: the simulated service on 127.0.0.1 is off limits, to
    // the verification call as to any request.
    let w = World::start(Opts::default()).await;
    let key = w.key(KeyState::ReadWrite);
    let r = w.create(&w.stripe("blocked", &key)).await;
    assert_api_error(&r, 422, "verification_failed", Some("api_key"));
    let v = &r.json()["error"]["verification"];
    assert_eq!(v["outcome"], "unreachable", "{r:#?}");
    assert!(
        v["hint"]
            .as_str()
            .is_some_and(|h| h.contains("allow_private_destinations")),
        "{r:#?}"
    );
    assert!(w.sim.seen().is_empty(), "{:?}", w.sim.seen());
    assert!(w.bao.get("blocked").is_none());
}

// ---------------------------------------------------------------------------------------------
// PATCH /v1/connections/{id}

#[tokio::test]
async fn patch_changes_non_secret_fields_and_nothing_else() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("p", &key).await;

    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/p",
            Some(&json!({"name": "  Stripe - renamed\n"})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    let j = r.json();
    assert_eq!(j["connection"]["name"], "Stripe - renamed");
    assert_eq!(j["connection"]["version"], 2);
    assert_eq!(j["connection"]["status"], "active");
    assert_masked(&j["connection"]);
    let notices = j["notices"].as_array().unwrap();
    assert!(
        notices.len() == 1 && notices[0].as_str().unwrap().starts_with("name:"),
        "{j}"
    );
    assert_eq!(w.stored_version("p"), 2);
    let stored = w.stored("p");
    assert_eq!(stored["name"], "Stripe - renamed");
    assert_eq!(stored["api_key"], key.as_str());
    assert_eq!(w.custom_metadata("p")["status"], "active");

    // A secret field is not PATCHed: the answer says where it goes.
    let other = w.key(KeyState::ReadWrite);
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/p",
            Some(&json!({"fields": {"api_key": other}})),
        )
        .await;
    assert_api_error(&r, 422, "invalid_field", Some("api_key"));
    assert!(r.body.contains("PUT /v1/connections/p/secret"), "{r:#?}");

    // A change that no longer fits the key.
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/p",
            Some(&json!({"environment": "production"})),
        )
        .await;
    assert_api_error(&r, 422, "invalid_field", Some("api_key"));

    // A change verified first, and refused when it fails.
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/p",
            Some(
                &json!({"base_url": format!("{}{WRONG_PREFIX}", w.sim.base_url()), "verify": true}),
            ),
        )
        .await;
    assert_api_error(&r, 422, "verification_failed", Some("api_key"));
    assert_eq!(
        r.json()["error"]["verification"]["outcome"],
        "wrong_base_url"
    );
    assert_eq!(w.stored_version("p"), 2);
    assert_eq!(w.stored("p"), stored);
    assert_eq!(w.sim.uses_of(&other), 0);

    // null removes.
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/p",
            Some(&json!({"name": null})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(r.json()["connection"]["name"], Value::Null);
    assert!(w.stored("p").get("name").is_none());
    assert_eq!(w.stored_version("p"), 3);

    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/nope",
            Some(&json!({"name": "x"})),
        )
        .await;
    assert_api_error(&r, 404, "connection_not_found", None);
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/p",
            Some(&json!({"colour": "blue"})),
        )
        .await;
    assert_api_error(&r, 400, "bad_request", None);

    // Still the same key, still working.
    let a = w.call("p", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &key);
}

/// The admin token alone does not send a saved key to a new host (and so read it back): a
/// PATCH that lets the key go where it could not before (another base URL host or port, an
/// added allowed host) takes every secret field again; one that only narrows does not.
#[tokio::test]
async fn a_patch_that_sends_the_key_to_a_new_host_needs_the_key_again() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("p", &key).await;
    let stored = w.stored("p");
    // Another service: the same address, another port, so another destination.
    let elsewhere = crate::service_sim::ServiceSim::start().await;
    let there = elsewhere.base_url();
    let there_host = there.trim_start_matches("http://").to_string();

    for (what, patch) in [
        ("base_url", json!({"base_url": there})),
        (
            "base_url, verified",
            json!({"base_url": there, "verify": true}),
        ),
        ("allowed_hosts", json!({"allowed_hosts": [there_host]})),
        (
            "another port of the same host",
            json!({"base_url": format!("http://127.0.0.1:{}", free_port())}),
        ),
    ] {
        let r = w
            .api(Method::PATCH, "/v1/connections/p", Some(&patch))
            .await;
        assert_api_error(&r, 422, "invalid_field", Some("api_key"));
        assert!(r.body.contains("must be given again"), "{what}: {r:#?}");
        assert!(!r.body.contains(&key), "{what}: {r:#?}");
    }
    assert!(elsewhere.seen().is_empty(), "{:?}", elsewhere.seen());
    assert_eq!(w.stored("p"), stored);
    assert_eq!(w.stored_version("p"), 1);

    // With the key given again (here a new one), the change is made and the key goes there.
    let new_key = elsewhere.new_key("sk_test_", KeyState::ReadWrite);
    w.secret(&new_key);
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/p",
            Some(&json!({"base_url": there, "allowed_hosts": [w.sim.base_url().trim_start_matches("http://")], "fields": {"api_key": new_key}, "verify": false})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_masked(&r.json()["connection"]);
    // Saved without a verification, the new key is shown unverified: the status and time
    // the old key was verified at are not its own.
    assert_eq!(w.custom_metadata("p")["status"], "unverified");
    assert_eq!(r.json()["connection"]["status"], "unverified", "{r:#?}");
    assert!(r.json()["connection"]["verified_at"].is_null(), "{r:#?}");
    let a = w.call("p", Method::GET, "/v1/charges").await;
    assert_eq!(a.status, 200, "{a:#?}");
    assert_eq!(elsewhere.uses_of(&new_key), 1);

    // Narrowing (the old service's host taken off again) needs nothing.
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/p",
            Some(&json!({"allowed_hosts": null})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(w.stored_version("p"), 3);
}

/// From HTTPS to plain HTTP on the same host and port is a change that lets the key go where
/// it could not before (across the network in clear): the key is asked for again. Back to
/// HTTPS needs nothing.
#[tokio::test]
async fn a_patch_from_https_to_plain_http_needs_the_key_again() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.secret(&key);
    let port = free_port();
    let r = w
        .api(
            Method::POST,
            "/v1/connections",
            Some(&json!({"id": "tls", "connector": "generic-bearer",
                "base_url": format!("https://127.0.0.1:{port}"),
                "fields": {"api_key": key}, "verify": false})),
        )
        .await;
    assert_eq!(r.status, 201, "{r:#?}");
    let plain = json!({"base_url": format!("http://127.0.0.1:{port}")});
    let r = w
        .api(Method::PATCH, "/v1/connections/tls", Some(&plain))
        .await;
    assert_api_error(&r, 422, "invalid_field", Some("api_key"));
    assert!(r.body.contains("plain HTTP"), "{r:#?}");
    assert!(!r.body.contains(&key), "{r:#?}");
    assert_eq!(w.stored_version("tls"), 1);

    // With the key given again, the change is made; and back to HTTPS needs nothing.
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/tls",
            Some(&json!({"base_url": format!("http://127.0.0.1:{port}"), "fields": {"api_key": key}, "verify": false})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    // A key saved unverified is shown unverified, whatever the status before said.
    assert_eq!(r.json()["connection"]["status"], "unverified", "{r:#?}");
    assert!(r.json()["connection"]["verified_at"].is_null(), "{r:#?}");
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/tls",
            Some(&json!({"base_url": format!("https://127.0.0.1:{port}"), "verify": false})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(w.stored_version("tls"), 3);
}

// ---------------------------------------------------------------------------------------------
// PUT /v1/connections/{id}/secret

#[tokio::test]
async fn rotation_to_a_failing_key_leaves_the_old_key_in_force() {
    let w = World::start(long_ttl()).await;
    let old = w.key(KeyState::ReadWrite);
    w.create_ok("rot", &old).await;
    let a = w.call("rot", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &old);

    let rejected = w.unknown_key();
    let unscoped = w.key(KeyState::ReadWrite);
    w.sim.deny_verify(&unscoped);
    let live = w.live_key(KeyState::ReadWrite);
    let (x, y) = (w.fresh(), w.fresh());
    let spaced = format!("sk_test_{x} {y}");
    let cases: [(&str, &str, u16, &str, Option<&str>); 4] = [
        (
            "rejected",
            &rejected,
            422,
            "verification_failed",
            Some("key_rejected"),
        ),
        (
            "no scope",
            &unscoped,
            422,
            "verification_failed",
            Some("insufficient_scope"),
        ),
        ("production key", &live, 422, "invalid_field", None),
        ("inner space", &spaced, 422, "invalid_field", None),
    ];
    for (what, new, status, code, outcome) in cases {
        let r = w.rotate("rot", new).await;
        assert_api_error(&r, status, code, Some("api_key"));
        if let Some(o) = outcome {
            assert_eq!(r.json()["error"]["verification"]["outcome"], o, "{what}");
        }
        assert_eq!(w.stored_version("rot"), 1, "{what}: a version was written");
        assert_eq!(w.stored("rot")["api_key"], old.as_str(), "{what}");
        let a = w.call("rot", Method::GET, "/v1/charges").await;
        w.assert_injected(&a, &old);
    }
    assert_eq!(w.sim.uses_of(&live), 0, "a refused key was sent");
    assert_eq!(w.show("rot").await["status"], "active");

    let r = w
        .api(
            Method::PUT,
            "/v1/connections/rot/secret",
            Some(&json!({"fields": {}})),
        )
        .await;
    assert_api_error(&r, 422, "invalid_field", Some("fields"));
    let r = w.rotate("missing", &old).await;
    assert_api_error(&r, 404, "connection_not_found", None);
}

#[tokio::test]
async fn rotation_refuses_non_secret_fields_and_points_to_patch() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("rot-np", &key).await;
    let r = w
        .api(
            Method::PUT,
            "/v1/connections/rot-np/secret",
            Some(&json!({"fields": {"name": "x"}})),
        )
        .await;
    assert_api_error(&r, 422, "invalid_field", Some("name"));
    assert_eq!(w.stored_version("rot-np"), 1);
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("PATCH /v1/connections/rot-np"),
        "the answer should name the call to use, for this connection: {message:?}"
    );
}

#[tokio::test]
async fn rotation_to_a_good_key_is_used_by_the_very_next_request() {
    let w = World::start(long_ttl()).await;
    let old = w.key(KeyState::ReadWrite);
    w.create_ok("rot", &old).await;
    let a = w.call("rot", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &old);

    let new = w.key(KeyState::ReadWrite);
    let r = w.rotate("rot", &format!("{new}\n")).await;
    assert_eq!(r.status, 200, "{r:#?}");
    let j = r.json();
    assert_eq!(j["connection"]["version"], 2);
    assert_eq!(j["connection"]["status"], "active");
    assert_masked(&j["connection"]);
    assert_eq!(j["verification"]["outcome"], "verified");
    assert_eq!(j["notices"].as_array().map(Vec::len), Some(1), "{j}");
    // Verified before it was saved.
    let last = w.sim.last();
    assert_eq!(
        (last.path.as_str(), last.key.as_deref()),
        ("/v1/balance", Some(new.as_str()))
    );

    let before = w.sim.uses_of(&old);
    for _ in 0..3 {
        let a = w.call("rot", Method::POST, "/v1/charges").await;
        w.assert_injected(&a, &new);
    }
    assert_eq!(
        w.sim.uses_of(&old),
        before,
        "the old key was used after rotation"
    );

    // A new KV version; the old one is kept.
    assert_eq!(w.stored_version("rot"), 2);
    assert_eq!(w.stored("rot")["api_key"], new.as_str());
    let v1 = bao_json(
        &w.bao,
        &[
            "kv",
            "get",
            "-format=json",
            "-mount=secret",
            "-version=1",
            &w.bao.path("rot"),
        ],
    )
    .await
    .expect("version 1 is kept");
    assert_eq!(v1["data"]["data"]["api_key"], old.as_str());
    assert_eq!(w.custom_metadata("rot")["status"], "active");

    // The cache really holds for an hour: a key changed in Vault behind latchkey's back is not
    // seen, so the rotation above took effect through the API, not through an expiry.
    let behind = w.key(KeyState::ReadWrite);
    w.put_behind("rot", &behind);
    let a = w.call("rot", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &new);
}

#[tokio::test]
async fn concurrent_rotations_one_wins_and_the_other_is_409() {
    let w = World::start(long_ttl()).await;
    let old = w.key(KeyState::ReadWrite);
    w.create_ok("race", &old).await;
    // A rotation reads the stored version before it verifies the new key. Neither verification
    // is answered before both have arrived, so both rotations read version 1 before either
    // writes, however the two requests are scheduled.
    let (a, b) = (w.key(KeyState::ReadWrite), w.key(KeyState::ReadWrite));
    w.sim.gate_verify(&[&a, &b]);
    let (ra, rb) = tokio::join!(w.rotate("race", &a), w.rotate("race", &b));
    let (winner, loser) = match (ra.status, rb.status) {
        (200, 409) => ((&a, &ra), (&b, &rb)),
        (409, 200) => ((&b, &rb), (&a, &ra)),
        other => panic!("wanted one 200 and one 409, got {other:?}: {ra:#?} {rb:#?}"),
    };
    assert_api_error(loser.1, 409, "conflict", None);
    assert_eq!(winner.1.json()["connection"]["version"], 2);
    assert_eq!(w.stored_version("race"), 2);
    assert_eq!(w.stored("race")["api_key"], winner.0.as_str());
    let r = w.call("race", Method::GET, "/v1/charges").await;
    w.assert_injected(&r, winner.0);
    assert_eq!(w.sim.uses_of(loser.0), 1, "only its verification call");
}

// ---------------------------------------------------------------------------------------------
// DELETE /v1/connections/{id}

#[tokio::test]
async fn delete_removes_every_version_and_evicts_at_once() {
    let w = World::start(long_ttl()).await;
    let first = w.key(KeyState::ReadWrite);
    let second = w.key(KeyState::ReadWrite);
    w.create_ok("gone", &first).await;
    assert_eq!(w.rotate("gone", &second).await.status, 200);
    let a = w.call("gone", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &second);
    let seen = w.sim.seen().len();

    let r = w.api(Method::DELETE, "/v1/connections/gone", None).await;
    assert_eq!(r.status, 204, "{r:#?}");
    assert!(r.body.is_empty(), "{r:#?}");

    // The very next request: not found, with an hour of cache TTL left.
    let a = w.call("gone", Method::GET, "/v1/charges").await;
    a.assert_error(404, "connection_not_found");
    assert_eq!(w.sim.seen().len(), seen, "a request reached the service");

    let r = w.api(Method::GET, "/v1/connections/gone", None).await;
    assert_api_error(&r, 404, "connection_not_found", None);
    assert!(w.list().await.is_empty());
    assert!(w.bao.get("gone").is_none());
    let path = w.bao.path("gone");
    for args in [
        &[
            "kv",
            "metadata",
            "get",
            "-format=json",
            "-mount=secret",
            &path,
        ][..],
        &[
            "kv",
            "get",
            "-format=json",
            "-mount=secret",
            "-version=1",
            &path,
        ][..],
    ] {
        assert!(
            bao_json(&w.bao, args).await.is_none(),
            "{args:?} still finds something"
        );
    }

    let r = w.api(Method::DELETE, "/v1/connections/gone", None).await;
    assert_api_error(&r, 404, "connection_not_found", None);
    let r = w.api(Method::DELETE, "/v1/connections/a%2Fb", None).await;
    assert_eq!(r.status, 400, "{r:#?}");

    // The ID can be used again, and the new connection is served at once.
    let third = w.key(KeyState::ReadWrite);
    let j = w.create_ok("gone", &third).await;
    assert_eq!(j["connection"]["version"], 1);
    let a = w.call("gone", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &third);
}

// ---------------------------------------------------------------------------------------------
// Vault unreachable

#[tokio::test]
async fn with_vault_unreachable_the_api_answers_503_and_writes_nothing() {
    let w = World::start_own(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("kept", &key).await;
    let other = w.key(KeyState::ReadWrite);

    w.bao.freeze().await;
    let calls = [
        w.api(Method::GET, "/v1/connections", None).await,
        w.api(Method::GET, "/v1/connections/kept", None).await,
        w.create(&w.stripe("during", &other)).await,
        w.rotate("kept", &other).await,
        w.verify("kept").await,
        w.api(Method::DELETE, "/v1/connections/kept", None).await,
    ];
    w.bao.thaw();
    for a in &calls {
        assert_api_error(a, 503, "secret_store_unavailable", None);
    }
    assert!(w.bao.get("during").is_none());
    assert_eq!(w.stored_version("kept"), 1);
    assert_eq!(w.stored("kept")["api_key"], key.as_str());
    assert_eq!(w.list().await.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// expires_at

#[tokio::test]
async fn expires_at_shows_in_reads_warns_before_it_passes_and_is_a_metric() {
    let w = World::start(Opts::loopback()).await;
    let name = "latchkey_connection_expiry_seconds";
    for (id, offset, status) in [
        ("soon", 3 * DAY, "expiring"),
        ("later", 60 * DAY, "active"),
        ("past", -DAY, "expired"),
    ] {
        let key = w.key(KeyState::ReadWrite);
        let at = rfc3339_in(offset);
        let mut body = w.stripe(id, &key);
        body["expires_at"] = json!(at);
        let r = w.create(&body).await;
        assert_eq!(r.status, 201, "{id}: {r:#?}");
        assert_eq!(r.json()["connection"]["status"], status, "{id}: {r:#?}");

        let c = w.show(id).await;
        assert_eq!(c["status"], status, "{id}: {c}");
        assert_eq!(
            time::OffsetDateTime::parse(
                c["expires_at"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339
            )
            .unwrap(),
            time::OffsetDateTime::parse(&at, &time::format_description::well_known::Rfc3339)
                .unwrap(),
            "{id}: {c}"
        );
        let left = c["expires_in_seconds"].as_i64().unwrap();
        assert!((offset - 120..=offset).contains(&left), "{id}: {c}");
        let warnings: Vec<&str> = c["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        match status {
            "expiring" => assert!(
                warnings
                    .iter()
                    .any(|w| w.contains("expires") && w.contains("rotate")),
                "{c}"
            ),
            "expired" => assert!(warnings.iter().any(|w| w.contains("expired")), "{c}"),
            _ => assert!(warnings.is_empty(), "{c}"),
        }
        let listed = w.list().await;
        let l = listed.iter().find(|c| c["id"] == id).unwrap();
        assert_eq!(l["status"], status);

        let m = metric(&w.lk, name, id)
            .await
            .unwrap_or_else(|| panic!("no {name} for {id}"));
        assert!(
            ((offset - 120) as f64..=offset as f64).contains(&m),
            "{id}: {name} = {m}"
        );
    }

    // A connection written with `bao kv put` and only ever used through the proxy: the metric
    // is there without anyone reading it through the API.
    let key = w.key(KeyState::ReadWrite);
    w.bao.put(
        "from-bao",
        &[
            ("connector", "stripe"),
            ("base_url", &w.sim.base_url()),
            ("expires_at", &rfc3339_in(2 * DAY)),
            ("api_key", &key),
        ],
    );
    let a = w.call("from-bao", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &key);
    let m = eventually("the expiry metric of a connection in use", || async {
        metric(&w.lk, name, "from-bao").await
    })
    .await;
    assert!(
        ((2 * DAY - 120) as f64..=(2 * DAY) as f64).contains(&m),
        "{name} = {m}"
    );
    assert_eq!(w.show("from-bao").await["status"], "expiring");
}

#[tokio::test]
async fn the_expiry_metric_goes_when_the_expiry_does() {
    // An alert on `latchkey_connection_expiry_seconds < 7 days` must stop firing once the
    // expiry is removed or the connection deleted.
    let w = World::start(Opts::loopback()).await;
    let name = "latchkey_connection_expiry_seconds";
    for id in ["cleared", "deleted"] {
        let mut body = w.stripe(id, &w.key(KeyState::ReadWrite));
        body["expires_at"] = json!(rfc3339_in(3 * DAY));
        assert_eq!(w.create(&body).await.status, 201);
        assert!(
            metric(&w.lk, name, id).await.is_some(),
            "no {name} for {id}"
        );
        let a = w.call(id, Method::GET, "/v1/charges").await;
        assert_eq!(a.status, 200, "{a:#?}");
    }
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/cleared",
            Some(&json!({"expires_at": null})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(r.json()["connection"]["status"], "active", "{r:#?}");
    assert_eq!(w.show("cleared").await["expires_at"], Value::Null);
    let r = w.api(Method::DELETE, "/v1/connections/deleted", None).await;
    assert_eq!(r.status, 204, "{r:#?}");
    // Polled: the cache's upkeep runs every 5 s at the default TTL, later on a loaded machine.
    let stale = || async {
        let mut stale = Vec::new();
        for id in ["cleared", "deleted"] {
            if let Some(v) = metric(&w.lk, name, id).await {
                stale.push(format!("{name}{{connection=\"{id}\"}} = {v}"));
            }
        }
        stale
    };
    let gone = try_wait_until(Duration::from_secs(30), || async {
        stale().await.is_empty().then_some(())
    })
    .await;
    assert!(gone.is_some(), "still exported: {:?}", stale().await);
}

// ---------------------------------------------------------------------------------------------
// Interplay with the Vault CLI

#[tokio::test]
async fn a_connection_written_with_bao_kv_put_is_listed_and_usable() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.bao.put(
        "vault-made",
        &[
            ("connector", "stripe"),
            ("name", "Stripe - Vault CLI"),
            ("environment", "sandbox"),
            ("base_url", &w.sim.base_url()),
            ("api_key", &key),
        ],
    );

    let list = w.list().await;
    assert_eq!(list.len(), 1, "{list:?}");
    let c = &list[0];
    assert_eq!(c["id"], "vault-made");
    assert_eq!(c["connector"], "stripe");
    assert_eq!(c["name"], "Stripe - Vault CLI");
    assert_eq!(c["environment"], "sandbox");
    assert_eq!(c["status"], "unverified");
    assert_eq!(c["version"], 1);
    assert_masked(c);
    assert_eq!(&w.show("vault-made").await, c);

    let a = w.call("vault-made", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &key);

    let r = w.verify("vault-made").await;
    assert_eq!(r.status, 200, "{r:#?}");
    assert_eq!(r.json()["connection"]["status"], "active");
    assert_eq!(w.custom_metadata("vault-made")["status"], "active");
    assert_eq!(w.stored_version("vault-made"), 1);

    // Rotated through the API: the fields written with the CLI are kept.
    let new = w.key(KeyState::ReadWrite);
    assert_eq!(w.rotate("vault-made", &new).await.status, 200);
    assert_eq!(
        w.stored("vault-made"),
        json!({
            "connector": "stripe",
            "name": "Stripe - Vault CLI",
            "environment": "sandbox",
            "base_url": w.sim.base_url(),
            "api_key": new,
        })
    );

    // One that cannot be used is listed too, as invalid, still without its value.
    let (x, y) = (w.fresh(), w.fresh());
    w.bao.put(
        "broken",
        &[
            ("connector", "stripe"),
            ("base_url", &w.sim.base_url()),
            ("api_key", &format!("sk_test_{x}\r\nX-Injected: {y}")),
        ],
    );
    let list = w.list().await;
    let b = list
        .iter()
        .find(|c| c["id"] == "broken")
        .unwrap_or_else(|| panic!("broken is not listed: {list:?}"));
    assert_eq!(b["status"], "invalid", "{b}");
    assert_masked(b);
    assert_eq!(b["problem"]["field"], "api_key", "{b}");
}

#[tokio::test]
async fn a_connection_created_through_the_api_reads_back_with_bao_kv_get() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    let expires = rfc3339_in(90 * DAY);
    let body = json!({
        "id": "api-made",
        "connector": "stripe",
        "name": "Stripe - API",
        "environment": "sandbox",
        "base_url": w.sim.base_url(),
        "allowed_hosts": ["files.example.com", "*.cdn.example.com"],
        "expires_at": expires,
        "fields": {"api_key": format!("{key}\n")},
        "verify": true,
    });
    let r = w.create(&body).await;
    assert_eq!(r.status, 201, "{r:#?}");

    let v = w.bao.get("api-made").expect("bao kv get finds it");
    assert_eq!(
        v["data"]["data"],
        json!({
            "connector": "stripe",
            "name": "Stripe - API",
            "environment": "sandbox",
            "base_url": w.sim.base_url(),
            "allowed_hosts": "files.example.com,*.cdn.example.com",
            "expires_at": expires,
            "api_key": key,
        }),
        "{v}"
    );
    assert_eq!(v["data"]["metadata"]["version"], 1);
    let meta = &v["data"]["metadata"]["custom_metadata"];
    assert_eq!(meta["status"], "active", "{v}");
    assert!(
        meta["verified_at"]
            .as_str()
            .is_some_and(|t| time::OffsetDateTime::parse(
                t,
                &time::format_description::well_known::Rfc3339
            )
            .is_ok()),
        "{v}"
    );
    // The API reads back what bao shows.
    let c = w.show("api-made").await;
    assert_eq!(c["verified_at"], meta["verified_at"]);
    let hosts = c["allowed_hosts"].as_array().unwrap();
    assert!(hosts.iter().any(|h| h == "files.example.com"), "{c}");
}

// ---------------------------------------------------------------------------------------------
// Upstream 401 after a rotation elsewhere

#[tokio::test]
async fn a_401_after_a_rotation_in_vault_picks_up_the_new_key_instead_of_failing() {
    let w = World::start(long_ttl()).await;
    let old = w.key(KeyState::ReadWrite);
    w.create_ok("elsewhere", &old).await;
    let a = w.call("elsewhere", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &old);
    let control_key = w.key(KeyState::ReadWrite);
    w.create_ok("control", &control_key).await;
    let a = w.call("control", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &control_key);

    // Rotated with the Vault CLI, and the old key revoked at the service.
    let new = w.key(KeyState::ReadWrite);
    w.put_behind("elsewhere", &new);
    w.sim.revoke(&old);
    let a = w.call("elsewhere", Method::GET, "/v1/charges").await;
    assert_eq!(a.status, 401, "{a:#?}");
    eventually("the new key to be used", || async {
        let a = w.call("elsewhere", Method::GET, "/v1/charges").await;
        (a.status == 200 && w.sim.last().key.as_deref() == Some(new.as_str())).then_some(())
    })
    .await;
    // The 401 was the old key's: the connection did not turn failed. Rather than watch it for
    // a fixed time, a control connection whose current key the service refuses gets its 401
    // now, after the one above was handled: once the control shows `failed`, a `failed` from
    // the earlier 401 would have been written too, however slow the machine.
    w.sim.revoke(&control_key);
    let a = w.call("control", Method::GET, "/v1/charges").await;
    assert_eq!(a.status, 401, "{a:#?}");
    eventually("the control connection to turn failed", || async {
        (w.show("control").await["status"] == "failed").then_some(())
    })
    .await;
    assert_ne!(w.show("elsewhere").await["status"], "failed");
    assert_eq!(w.custom_metadata("elsewhere")["status"], "active");
}

/// `failed` is what an upstream's 401 to the current key says, and no more: a later success
/// with the same key clears it (with the default cache TTL: the failure's write makes the next
/// request read the connection again), and a key rotated in Vault directly is not shown as
/// failed for the old one's 401.
#[tokio::test]
async fn failed_clears_when_the_key_works_again_and_is_not_carried_to_a_new_version() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("flaky", &key).await;

    // Refused until it shows failed (401s re-read the connection at most every 5 s, and the
    // failure is written after the re-read).
    let refused_until_failed = |what: &'static str| {
        eventually(what, || async {
            let a = w.call("flaky", Method::GET, "/v1/charges").await;
            assert_eq!(a.status, 401, "{a:#?}");
            (w.show("flaky").await["status"] == "failed").then_some(())
        })
    };
    w.sim.revoke(&key);
    refused_until_failed("the connection to turn failed").await;
    // The service takes the key back: requests succeed, and the status follows.
    w.sim.set(&key, KeyState::ReadWrite);
    eventually("a success to clear failed", || async {
        let a = w.call("flaky", Method::GET, "/v1/charges").await;
        assert_eq!(a.status, 200, "{a:#?}");
        (w.show("flaky").await["status"] == "active").then_some(())
    })
    .await;
    let meta = w.custom_metadata("flaky");
    assert_eq!(meta["status"], "active", "{meta}");
    assert!(meta.get("last_error").is_none(), "{meta}");

    // Failed again, then rotated with the Vault CLI: the new version is not failed.
    w.sim.revoke(&key);
    refused_until_failed("the connection to turn failed again").await;
    let new = w.key(KeyState::ReadWrite);
    w.put_behind("flaky", &new);
    let shown = w.show("flaky").await;
    assert_eq!(shown["status"], "unverified", "{shown}");
    assert_eq!(shown["version"], 2, "{shown}");
}

/// A connection whose latest version was deleted in Vault (`bao kv delete`, Terraform's
/// destroy, `delete_version_after`) is absent to the API, and the API can still create it
/// again and delete what is left of it.
#[tokio::test]
async fn a_connection_soft_deleted_in_vault_can_be_created_again_and_deleted() {
    let w = World::start(Opts::loopback()).await;
    let first = w.key(KeyState::ReadWrite);
    w.create_ok("soft", &first).await;
    let path = w.bao.path("soft");
    let soft_delete = || w.bao.cli_ok(&["kv", "delete", "-mount=secret", &path]);
    soft_delete();
    let r = w.api(Method::GET, "/v1/connections/soft", None).await;
    assert_api_error(&r, 404, "connection_not_found", None);

    // Created again over the deleted version.
    let second = w.key(KeyState::ReadWrite);
    let j = w.create_ok("soft", &second).await;
    assert_eq!(j["connection"]["version"], 2, "{j}");
    let a = w.call("soft", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &second);

    // Deleted in Vault again, then through the API: nothing of it is left.
    soft_delete();
    let r = w.api(Method::DELETE, "/v1/connections/soft", None).await;
    assert_eq!(r.status, 204, "{r:#?}");
    let meta = [
        "kv",
        "metadata",
        "get",
        "-format=json",
        "-mount=secret",
        &path,
    ];
    assert!(bao_json(&w.bao, &meta).await.is_none(), "metadata left");
    let r = w.api(Method::DELETE, "/v1/connections/soft", None).await;
    assert_api_error(&r, 404, "connection_not_found", None);
}

/// A credential made of two fields (Twilio's account SID and auth token) moves to another
/// account in one write: `PUT .../secret` takes the fields the credential is made with beside
/// its secret, so no request ever carries a mismatched pair. Alone, such a field is refused.
#[tokio::test]
async fn a_two_field_credential_is_replaced_in_one_write() {
    let bao = Bao::start().await;
    let up = echo().await;
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let admin = |method: Method, path: &str, body: Value| {
        http()
            .request(method, lk.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    let (sid1, tok1) = (
        "AC0123456789abcdef0123456789abcdef",
        "0123456789abcdef0123456789abcdef",
    );
    let (sid2, tok2) = (
        "ACfedcba9876543210fedcba9876543210",
        "fedcba9876543210fedcba9876543210",
    );
    let r = admin(
        Method::POST,
        "/v1/connections",
        json!({"id": "tw", "connector": "twilio", "base_url": format!("http://{}", up.addr()),
               "fields": {"account_sid": sid1, "auth_token": tok1}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    let r = admin(
        Method::PUT,
        "/v1/connections/tw/secret",
        json!({"fields": {"account_sid": sid2, "auth_token": tok2}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let basic = |u: &str, p: &str| {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    };
    let got = gateway_get(&lk, "/tw/2010-04-01/Accounts.json", &[]).await;
    assert_eq!(got.header("authorization"), Some(basic(sid2, tok2)));

    // The SID alone is not a rotation: it goes with PATCH, or beside the secret here.
    let r = admin(
        Method::PUT,
        "/v1/connections/tw/secret",
        json!({"fields": {"account_sid": sid1}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["field"], "fields", "{v}");
    // A field the credential is not made with is still PATCH's.
    let r = admin(
        Method::PUT,
        "/v1/connections/tw/secret",
        json!({"fields": {"auth_token": tok1, "name": "x"}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 422);

    // The CLI does the same in one write: the secret read from standard input, the field
    // beside it given as NAME=VALUE.
    let url = lk.admin_url("");
    let env = [
        ("LATCHKEY_API_URL", url.as_str()),
        ("LATCHKEY_API_TOKEN", ADMIN_TOKEN),
    ];
    let sid = format!("--field=account_sid={sid1}");
    let r = crate::cli::run(
        &["rotate", "tw", "--field", "auth_token", &sid],
        Some(tok1),
        &env,
    )
    .await;
    assert_eq!(r.code, 0, "{r:#?}");
    let got = gateway_get(&lk, "/tw/2010-04-01/Accounts.json", &[]).await;
    assert_eq!(got.header("authorization"), Some(basic(sid1, tok1)));
    // A secret is never taken from the command line.
    let token = format!("--field=auth_token={tok2}");
    let r = crate::cli::run(&["rotate", "tw", &token], None, &env).await;
    assert_eq!(r.code, 2, "{r:#?}");
    assert!(r.stderr.contains("never from the command line"), "{r:#?}");
}

/// A PATCH that names nothing to change is refused, and writes no new version.
#[tokio::test]
async fn an_empty_patch_is_refused_and_writes_nothing() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("same", &key).await;
    for body in [json!({}), json!({"verify": true}), json!({"fields": {}})] {
        let r = w
            .api(Method::PATCH, "/v1/connections/same", Some(&body))
            .await;
        assert_api_error(&r, 422, "invalid_field", Some("fields"));
    }
    assert_eq!(w.stored_version("same"), 1);
}

// ---------------------------------------------------------------------------------------------
// Audit

fn audit_tuple(v: &Value) -> (String, String, String, String) {
    let s = |k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    (s("action"), s("connection"), s("version"), s("outcome"))
}

#[tokio::test]
async fn every_admin_action_leaves_one_audit_line_without_values() {
    let w = World::start(Opts::loopback()).await;
    let a = w.key(KeyState::ReadWrite);
    let b = w.key(KeyState::ReadWrite);
    let rejected = w.unknown_key();

    assert_eq!(w.create(&w.stripe("aud", &a)).await.status, 201);
    assert_eq!(w.create(&w.stripe("aud", &b)).await.status, 409);
    let bad = format!("pk_test_{}", w.fresh());
    assert_eq!(w.create(&w.stripe("aud-bad", &bad)).await.status, 422);
    assert_eq!(w.create(&w.stripe("aud-rej", &rejected)).await.status, 422);
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/aud",
            Some(&json!({"name": "renamed"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/aud",
            Some(&json!({"fields": {"api_key": b}})),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(w.rotate("aud", &rejected).await.status, 422);
    assert_eq!(w.rotate("aud", &b).await.status, 200);
    assert_eq!(w.verify("aud").await.status, 200);
    // Reads are not actions.
    w.show("aud").await;
    w.list().await;
    let r = w.api(Method::DELETE, "/v1/connections/aud", None).await;
    assert_eq!(r.status, 204);

    let expected: Vec<(&str, &str, &str, &str)> = vec![
        ("create", "aud", "1", "ok"),
        ("create", "aud", "-", "exists"),
        ("create", "aud-bad", "-", "invalid"),
        ("create", "aud-rej", "-", "verification_failed"),
        ("patch", "aud", "2", "ok"),
        ("patch", "aud", "-", "invalid"),
        ("rotate", "aud", "-", "verification_failed"),
        ("rotate", "aud", "3", "ok"),
        ("verify", "aud", "3", "verified"),
        ("delete", "aud", "3", "ok"),
    ];
    let lines = eventually("every audit line", || async {
        let lines = audit_lines(&w.lk);
        (lines.len() >= expected.len()).then_some(lines)
    })
    .await;
    let got: Vec<_> = lines.iter().map(audit_tuple).collect();
    let want: Vec<_> = expected
        .iter()
        .map(|(a, c, v, o)| (a.to_string(), c.to_string(), v.to_string(), o.to_string()))
        .collect();
    assert_eq!(got, want, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["admin"], "admin", "{l}");
        assert_eq!(l["level"], "INFO", "{l}");
        w.assert_clean("an audit line", &l.to_string());
    }

    // And nothing in the whole log holds a key (the harness checks every registered one).
    let mut lk = w.lk;
    let out = lk.stop_and_check();
    for k in [&a, &b, &rejected, &bad] {
        assert!(!out.contains(k.as_str()));
    }
}

#[tokio::test]
async fn admin_actions_on_a_missing_connection_are_audited_too() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    let r = w.api(Method::DELETE, "/v1/connections/ghost", None).await;
    assert_api_error(&r, 404, "connection_not_found", None);
    let r = w.rotate("ghost", &key).await;
    assert_api_error(&r, 404, "connection_not_found", None);
    let r = w.verify("ghost").await;
    assert_api_error(&r, 404, "connection_not_found", None);
    let r = w
        .api(
            Method::PATCH,
            "/v1/connections/ghost",
            Some(&json!({"name": "x"})),
        )
        .await;
    assert_api_error(&r, 404, "connection_not_found", None);
    // A marker action that is audited, so that the log is known to be caught up.
    w.create_ok("marker", &key).await;
    let lines = eventually("the marker's audit line", || async {
        let lines = audit_lines(&w.lk);
        lines
            .iter()
            .any(|l| l["connection"] == "marker")
            .then_some(lines)
    })
    .await;
    for action in ["delete", "rotate", "verify", "patch"] {
        assert!(
            lines.iter().any(|l| l["action"] == action
                && l["connection"] == "ghost"
                && l["outcome"] != "ok"),
            "no audit line for the refused {action} of a missing connection: {lines:#?}"
        );
    }
}

#[tokio::test]
async fn audit_lines_name_the_admin_token_used() {
    let ops_token = format!("ops-token-{}", random_hex(8));
    let w = World::start(Opts::loopback().extra(&format!(
        "[[admin.tokens]]\nname = \"ops-alice\"\ntoken_sha256 = \"{}\"",
        latchkey::auth::sha256_hex(&ops_token)
    )))
    .await;
    w.secret(&ops_token);
    let key = w.key(KeyState::ReadWrite);
    let r = w
        .api_raw(
            Method::POST,
            "/v1/connections",
            Some(&format!("Bearer {ops_token}")),
            Some(w.stripe("named", &key).to_string()),
        )
        .await;
    assert_eq!(r.status, 201, "{r:#?}");
    let r = w.api(Method::DELETE, "/v1/connections/named", None).await;
    assert_eq!(r.status, 204, "{r:#?}");
    let lines = eventually("two audit lines", || async {
        let lines = audit_lines(&w.lk);
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    let who: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l["admin"].as_str().unwrap(), l["action"].as_str().unwrap()))
        .collect();
    assert_eq!(
        who,
        [("ops-alice", "create"), ("admin", "delete")],
        "{lines:#?}"
    );
}
