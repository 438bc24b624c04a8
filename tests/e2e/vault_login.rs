//! Vault login methods and the token's life, against an OpenBao of each test's own, configured
//! through its HTTP API with the root token: AppRole (plain and response-wrapped secret IDs),
//! JWT with a key pair the test makes and a JWT it signs, and the `kubernetes` method through
//! OpenBao's JWT method mounted at `kubernetes` (there is no Kubernetes API here; the login
//! call is the same). latchkey runs with `VAULT_TOKEN` empty: every token it has, it got by
//! logging in. No secret ID, wrapping token or JWT may appear in its output.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::*;

/// The policy latchkey's logins get: its connections and its CA under the `secret` mount.
const POLICY: &str = r#"
path "secret/data/*" { capabilities = ["create", "read", "update"] }
path "secret/metadata/*" { capabilities = ["read", "list", "update", "delete"] }
"#;

/// OpenBao's HTTP API with the root token.
struct Root<'a> {
    bao: &'a Bao,
    http: reqwest::Client,
}

impl Root<'_> {
    fn new(bao: &Bao) -> Root<'_> {
        Root { bao, http: http() }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Value {
        let resp = req
            .header("X-Vault-Token", &self.bao.token)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "OpenBao answered {status}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    async fn write(&self, path: &str, body: Value) -> Value {
        self.send(self.http.post(self.url(path)).json(&body)).await
    }

    /// A write whose answer OpenBao wraps: the wrapping token.
    async fn write_wrapped(&self, path: &str, body: Value) -> String {
        let v = self
            .send(
                self.http
                    .post(self.url(path))
                    .header("X-Vault-Wrap-TTL", "5m")
                    .json(&body),
            )
            .await;
        v["wrap_info"]["token"].as_str().unwrap().to_string()
    }

    async fn read(&self, path: &str) -> Value {
        self.send(self.http.get(self.url(path))).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.bao.addr)
    }

    async fn policy(&self) {
        self.write("sys/policies/acl/latchkey", json!({ "policy": POLICY }))
            .await;
    }

    /// AppRole at `approle` with the role `latchkey` (token TTLs as given); its role ID.
    async fn approle(&self, ttl: &str, max_ttl: &str) -> String {
        self.policy().await;
        self.write("sys/auth/approle", json!({"type": "approle"}))
            .await;
        self.write(
            "auth/approle/role/latchkey",
            json!({"token_policies": ["latchkey"], "token_ttl": ttl, "token_max_ttl": max_ttl}),
        )
        .await;
        let v = self.read("auth/approle/role/latchkey/role-id").await;
        v["data"]["role_id"].as_str().unwrap().to_string()
    }

    /// A new secret ID for the role `latchkey`.
    async fn secret_id(&self) -> String {
        let v = self
            .write("auth/approle/role/latchkey/secret-id", json!({}))
            .await;
        v["data"]["secret_id"].as_str().unwrap().to_string()
    }

    /// OpenBao's JWT method at `mount`, trusting `public_pem`, with the role `latchkey`.
    async fn jwt_method(&self, mount: &str, public_pem: &str) {
        self.policy().await;
        self.write(&format!("sys/auth/{mount}"), json!({"type": "jwt"}))
            .await;
        self.write(
            &format!("auth/{mount}/config"),
            json!({"jwt_validation_pubkeys": [public_pem], "bound_issuer": ISSUER}),
        )
        .await;
        self.write(
            &format!("auth/{mount}/role/latchkey"),
            json!({
                "role_type": "jwt",
                "bound_audiences": ["latchkey"],
                "user_claim": "sub",
                "token_policies": ["latchkey"],
                "token_ttl": "1h",
            }),
        )
        .await;
    }
}

const ISSUER: &str = "latchkey-e2e";

/// An ES256 key pair: the public key (PEM, for OpenBao) and a signer of JWTs.
struct JwtSigner {
    public_pem: String,
    key: ring::signature::EcdsaKeyPair,
}

impl JwtSigner {
    fn new() -> JwtSigner {
        let pair = rcgen::KeyPair::generate().unwrap();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pair.serialize_der(),
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        JwtSigner {
            public_pem: pair.public_key_pem(),
            key,
        }
    }

    /// A JWT for the subject `latchkey` and the audience `latchkey`, valid for an hour.
    fn sign(&self) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = json!({"alg": "ES256", "typ": "JWT"});
        let claims = json!({
            "iss": ISSUER, "sub": "latchkey", "aud": "latchkey",
            "iat": now, "nbf": now - 5, "exp": now + 3600,
        });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self
            .key
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", b64(sig.as_ref()))
    }
}

/// Options for a latchkey that logs in with `auth` (the lines of `[vault.auth]`), with no
/// `VAULT_TOKEN`.
/// [`login_opts`] for an AppRole login as `role_id` with the secret ID in `file`.
fn approle_opts(role_id: &str, file: &std::path::Path) -> Opts {
    login_opts(&format!(
        "method = \"approle\"\nrole_id = \"{role_id}\"\nsecret_id_file = \"{}\"\n",
        file.display()
    ))
}

fn login_opts(auth: &str) -> Opts {
    Opts::loopback()
        .env("VAULT_TOKEN", "")
        .extra(&format!("[vault.auth]\n{auth}"))
}

/// Writes a credential file in `dir`.
fn credential(dir: &tempfile::TempDir, name: &str, value: &str) -> PathBuf {
    write_file(dir.path(), name, &format!("{value}\n"))
}

/// Forbids a secret and, for the test's own, the root token in latchkey's output.
fn forbid_all(lk: &Latchkey, bao: &Bao, secrets: &[&str]) {
    for s in secrets {
        lk.forbid(s);
    }
    lk.forbid(&bao.token);
}

async fn ready(lk: &Latchkey) -> (u16, Value) {
    let resp = http().get(lk.admin_url("/readyz")).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The log lines latchkey printed with `message`, parsed.
fn log_lines(lk: &Latchkey, message: &str) -> Vec<Value> {
    lk.output()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

/// The logins latchkey logged, by reason.
fn logins(lk: &Latchkey, reason: &str) -> usize {
    log_lines(lk, "logged in to Vault")
        .iter()
        .filter(|v| v["reason"] == reason)
        .count()
}

/// `latchkey_vault_auth_total{op, outcome}` from `/metrics` (0 when absent).
async fn auth_count(lk: &Latchkey, op: &str, outcome: &str) -> u64 {
    let text = crate::errors::metrics_text(lk).await;
    text.lines()
        .filter(|l| l.starts_with("latchkey_vault_auth_total{"))
        .filter(|l| {
            l.contains(&format!("op=\"{op}\"")) && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn approle_login_serves_requests_without_vault_token() {
    let bao = Bao::start_own().await;
    let root = Root::new(&bao);
    let role_id = root.approle("1h", "4h").await;
    let secret_id = root.secret_id().await;
    let dir = tempfile::tempdir().unwrap();
    let file = credential(&dir, "secret-id", &secret_id);
    let up = echo().await;
    let key = put_bearer(&bao, "approle-conn", &format!("http://{}", up.addr()));

    let lk = Latchkey::start(&bao, approle_opts(&role_id, &file)).await;
    forbid_all(&lk, &bao, &[&secret_id]);

    let r = gateway_get(&lk, "/approle-conn/v1/x", &[]).await;
    assert_eq!(r.status, 200, "{:?}\n{}", r.json, lk.output());
    assert_eq!(r.header("authorization").unwrap(), format!("Bearer {key}"));
    assert_eq!(ready(&lk).await.0, 200);
    assert_eq!(logins(&lk, "start"), 1, "{}", lk.output());
    assert_eq!(auth_count(&lk, "login", "ok").await, 1);
}

/// A policy that covers some connections only (as the Deploy section narrows it): a connection
/// outside it is answered as not found, cached as such, and costs no login; Vault stays ready.
#[tokio::test]
async fn a_connection_the_policy_leaves_out_is_not_found_and_costs_no_login() {
    let bao = Bao::start_own().await;
    let root = Root::new(&bao);
    let role_id = root.approle("1h", "4h").await;
    let narrow = format!(
        "path \"secret/data/{0}/allowed\" {{ capabilities = [\"read\"] }}\n",
        bao.prefix
    );
    root.write("sys/policies/acl/latchkey", json!({ "policy": narrow }))
        .await;
    let secret_id = root.secret_id().await;
    let dir = tempfile::tempdir().unwrap();
    let file = credential(&dir, "secret-id", &secret_id);
    let up = echo().await;
    put_bearer(&bao, "allowed", &format!("http://{}", up.addr()));
    let other = put_bearer(&bao, "denied", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, approle_opts(&role_id, &file)).await;
    forbid_all(&lk, &bao, &[&secret_id, &other]);

    assert_eq!(gateway_get(&lk, "/allowed/x", &[]).await.status, 200);
    for _ in 0..5 {
        let r = gateway_get(&lk, "/denied/x", &[]).await;
        assert_eq!(r.status, 404, "{:?}", r.json);
        assert_eq!(r.latchkey_error.as_deref(), Some("connection_not_found"));
    }
    assert_eq!(gateway_get(&lk, "/allowed/y", &[]).await.status, 200);
    assert_eq!(auth_count(&lk, "login", "ok").await, 1, "{}", lk.output());
    assert_eq!(ready(&lk).await.0, 200);
    // Read once, then cached as not found; the operator is told why.
    let warned = log_lines(
        &lk,
        "Vault's policy for latchkey's token does not cover this connection's path: answered as not found",
    );
    assert_eq!(warned.len(), 1, "{}", lk.output());
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn a_wrapped_secret_id_is_unwrapped_and_a_second_use_of_its_wrapping_token_fails_clearly() {
    let bao = Bao::start_own().await;
    let root = Root::new(&bao);
    let role_id = root.approle("1h", "4h").await;
    // A secret ID the test knows, handed over wrapped as an orchestrator would: the test can
    // then forbid it as well as the wrapping token.
    let secret_id = format!("wrapped-secret-id-{}", free_port());
    let wrapping = root
        .write_wrapped(
            "auth/approle/role/latchkey/custom-secret-id",
            json!({ "secret_id": secret_id }),
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = credential(&dir, "wrapped-secret-id", &wrapping);
    let up = echo().await;
    let key = put_bearer(&bao, "wrapped-conn", &format!("http://{}", up.addr()));
    let auth = format!(
        "method = \"approle\"\nrole_id = \"{role_id}\"\nsecret_id_file = \"{}\"\nsecret_id_wrapped = true\n",
        file.display()
    );

    // Every request reads Vault, so that a re-login shows.
    let first = Latchkey::start(
        &bao,
        login_opts(&auth).extra("[cache]\nttl = \"1ms\"\nmax_stale = \"0s\""),
    )
    .await;
    forbid_all(&first, &bao, &[&secret_id, &wrapping]);
    let r = gateway_get(&first, "/wrapped-conn/v1/x", &[]).await;
    assert_eq!(r.status, 200, "{:?}\n{}", r.json, first.output());
    assert_eq!(r.header("authorization").unwrap(), format!("Bearer {key}"));
    assert_eq!(
        log_lines(&first, "unwrapped the AppRole secret ID").len(),
        1
    );

    // The same wrapping token again (a restart with the same file): OpenBao unwraps once.
    let second = Latchkey::start(&bao, login_opts(&auth)).await;
    forbid_all(&second, &bao, &[&secret_id, &wrapping]);
    let (status, body) = ready(&second).await;
    assert_eq!(status, 503, "{body}");
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.contains("unwrap")
            && reason.contains("once")
            && reason.contains(&file.display().to_string()),
        "{reason}"
    );
    let r = gateway_get(&second, "/wrapped-conn/v1/x", &[]).await;
    assert_eq!(r.status, 503, "{:?}", r.json);
    assert_eq!(
        r.latchkey_error.as_deref(),
        Some("secret_store_unavailable")
    );
    // The first logs in again with the secret ID it unwrapped, and keeps serving, when its
    // token is revoked (the wrapping token in its file is spent).
    root.write("sys/leases/revoke-prefix/auth/approle/login", json!({}))
        .await;
    let r = gateway_get(&first, "/wrapped-conn/v1/y", &[]).await;
    assert_eq!(r.status, 200, "{:?}\n{}", r.json, first.output());
    assert_eq!(logins(&first, "token_refused"), 1, "{}", first.output());
    assert_eq!(
        log_lines(&first, "unwrapped the AppRole secret ID").len(),
        1
    );
}

#[tokio::test]
async fn jwt_and_kubernetes_logins_with_a_jwt_the_test_signs_serve_requests() {
    let bao = Bao::start_own().await;
    let root = Root::new(&bao);
    let signer = JwtSigner::new();
    root.jwt_method("jwt", &signer.public_pem).await;
    // The kubernetes method's login is the JWT method's login at another mount: OpenBao's JWT
    // method mounted at `kubernetes` stands in for a cluster's service-account tokens.
    root.jwt_method("kubernetes", &signer.public_pem).await;
    let jwt = signer.sign();
    let signature = jwt.rsplit('.').next().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = credential(&dir, "jwt", &jwt);
    let up = echo().await;
    let key = put_bearer(&bao, "jwt-conn", &format!("http://{}", up.addr()));

    for auth in [
        format!(
            "method = \"jwt\"\nrole = \"latchkey\"\njwt_file = \"{}\"\n",
            file.display()
        ),
        format!(
            "method = \"kubernetes\"\nrole = \"latchkey\"\njwt_file = \"{}\"\n",
            file.display()
        ),
    ] {
        let lk = Latchkey::start(&bao, login_opts(&auth)).await;
        forbid_all(&lk, &bao, &[&jwt, &signature]);
        let r = gateway_get(&lk, "/jwt-conn/v1/x", &[]).await;
        assert_eq!(r.status, 200, "{auth}: {:?}\n{}", r.json, lk.output());
        assert_eq!(r.header("authorization").unwrap(), format!("Bearer {key}"));
        let line = &log_lines(&lk, "logged in to Vault")[0];
        let method = if auth.contains("kubernetes") {
            "kubernetes"
        } else {
            "jwt"
        };
        assert_eq!(line["method"], method, "{line}");
    }
}

#[tokio::test]
async fn wrong_credentials_leave_latchkey_not_ready_with_a_clear_reason_and_no_secret() {
    let bao = Bao::start_own().await;
    let root = Root::new(&bao);
    let role_id = root.approle("1h", "4h").await;
    let signer = JwtSigner::new();
    root.jwt_method("jwt", &signer.public_pem).await;
    let wrong_secret_id = "3f1c2d4e-0000-4000-8000-wrongsecret1";
    let jwt = signer.sign();
    let dir = tempfile::tempdir().unwrap();
    let sid_file = credential(&dir, "secret-id", wrong_secret_id);
    let jwt_file = credential(&dir, "jwt", &jwt);
    let up = echo().await;
    put_bearer(&bao, "wrong-conn", &format!("http://{}", up.addr()));

    let cases = [
        (
            format!(
                "method = \"approle\"\nrole_id = \"{role_id}\"\nsecret_id_file = \"{}\"\n",
                sid_file.display()
            ),
            "approle login",
            // What Vault said, too.
            "(status 400: \"invalid role or secret ID\"); check vault.auth.mount, vault.auth.role_id",
        ),
        (
            format!(
                "method = \"jwt\"\nrole = \"no-such-role\"\njwt_file = \"{}\"\n",
                jwt_file.display()
            ),
            "jwt login",
            "vault.auth.role",
        ),
        (
            format!(
                "method = \"approle\"\nrole_id = \"{role_id}\"\nsecret_id_file = \"{}\"\n",
                dir.path().join("missing").display()
            ),
            "vault.auth.secret_id_file",
            "missing",
        ),
    ];
    for (auth, what, names) in cases {
        let mut lk = Latchkey::start(&bao, login_opts(&auth)).await;
        forbid_all(&lk, &bao, &[wrong_secret_id, &jwt]);
        let (status, body) = ready(&lk).await;
        assert_eq!(status, 503, "{auth}: {body}");
        let reason = body["reason"].as_str().unwrap();
        assert!(
            reason.contains(what) && reason.contains(names),
            "{auth}: {reason}"
        );
        let r = gateway_get(&lk, "/wrong-conn/v1/x", &[]).await;
        assert_eq!(r.status, 503, "{auth}: {:?}", r.json);
        // The reason is in the log from the start, where an operator looks.
        let out = lk.stop_and_check();
        assert!(
            out.lines()
                .any(|l| l.contains("could not log in to Vault") && l.contains(what)),
            "{auth}:\n{out}"
        );
    }
}

#[tokio::test]
async fn a_token_vault_revokes_is_replaced_by_a_login_and_the_request_is_served() {
    let bao = Bao::start_own().await;
    let root = Root::new(&bao);
    let role_id = root.approle("1h", "4h").await;
    let secret_id = root.secret_id().await;
    let dir = tempfile::tempdir().unwrap();
    let file = credential(&dir, "secret-id", &secret_id);
    let up = echo().await;
    put_bearer(&bao, "revoked-conn", &format!("http://{}", up.addr()));
    // Every request reads Vault: nothing is served from the cache.
    let opts = login_opts(&format!(
        "method = \"approle\"\nrole_id = \"{role_id}\"\nsecret_id_file = \"{}\"\n",
        file.display()
    ))
    .extra("[cache]\nttl = \"1ms\"\nmax_stale = \"0s\"");
    let lk = Latchkey::start(&bao, opts).await;
    forbid_all(&lk, &bao, &[&secret_id]);
    let r = gateway_get(&lk, "/revoked-conn/v1/x", &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.json);

    // Every token the AppRole gave, revoked behind latchkey's back.
    root.write("sys/leases/revoke-prefix/auth/approle/login", json!({}))
        .await;
    let r = gateway_get(&lk, "/revoked-conn/v1/y", &[]).await;
    assert_eq!(r.status, 200, "{:?}\n{}", r.json, lk.output());
    // Logged before the request was served, but read from a pipe by another thread.
    lk.output_line("logging the login after the token was refused", |l| {
        l.contains("\"reason\":\"token_refused\"")
    })
    .await;
    assert_eq!(logins(&lk, "token_refused"), 1, "{}", lk.output());
    assert_eq!(auth_count(&lk, "login", "ok").await, 2);
}

/// A token with TTL 10 s and max TTL 30 s, under steady requests that each read Vault: renewed
/// before it expires, replaced by a new login before its max TTL, and no request fails.
#[tokio::test]
async fn a_token_with_ttl_10s_and_max_ttl_30s_is_renewed_and_replaced_with_no_failed_request() {
    let bao = Bao::start_own().await;
    let root = Root::new(&bao);
    let role_id = root.approle("10s", "30s").await;
    let secret_id = root.secret_id().await;
    let dir = tempfile::tempdir().unwrap();
    let file = credential(&dir, "secret-id", &secret_id);
    let up = echo().await;
    put_bearer(&bao, "ttl-conn", &format!("http://{}", up.addr()));
    let opts = login_opts(&format!(
        "method = \"approle\"\nrole_id = \"{role_id}\"\nsecret_id_file = \"{}\"\n",
        file.display()
    ))
    .extra("[cache]\nttl = \"1ms\"\nmax_stale = \"0s\"");
    let lk = Latchkey::start(&bao, opts).await;
    forbid_all(&lk, &bao, &[&secret_id]);

    let started = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let url = lk.url("/ttl-conn/v1/steady");
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = http();
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(format!(
                        "{} {:?}",
                        r.status(),
                        r.headers().get("latchkey-error")
                    )),
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        })
    };

    // Under load until latchkey has logged in again because the first token's max TTL neared,
    // the new token has been renewed too, and the first token's max TTL is well past.
    wait_until(
        "a login at the max TTL, then a renewal of the new token",
        Duration::from_secs(65),
        || {
            let out = lk.output();
            let relogin = out.find("\"reason\":\"max_ttl\"");
            let renewed_after = relogin
                .and_then(|at| out.get(at..))
                .is_some_and(|rest| rest.contains("renewed the Vault token"));
            std::future::ready(
                (renewed_after && started.elapsed() > Duration::from_secs(40)).then_some(()),
            )
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();

    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len() as u64
    );
    assert!(ok > 100, "only {ok} requests");
    assert!(auth_count(&lk, "renew", "ok").await >= 2);
    assert!(auth_count(&lk, "login", "ok").await >= 2);
    assert_eq!(auth_count(&lk, "renew", "refused").await, 0);
    // Renewal and re-login kept ahead of the token: Vault never refused it.
    assert_eq!(logins(&lk, "token_refused"), 0, "{}", lk.output());
}
