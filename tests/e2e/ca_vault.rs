//! PRODUCT.md section 1, the CA kept in Vault: `latchkey ca init` (no files) stores it at
//! `secret/latchkey/ca`, a latchkey without `tls.ca_cert` reads it at start, every replica on
//! that Vault presents leaves from it, `latchkey ca export` and `GET /ca.pem` give only its
//! certificate. A second `ca init` (even two racing) never replaces it; a broken record is a start
//! error naming the path; the record is never a connection; the key is in no output.
//!
//! Each test has an OpenBao of its own: the CA's path is one per mount, and the shared server's
//! other tests must keep seeing no CA there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;
use crate::tunnel::{
    assert_ours, connect_head, exchange, inner_get, key_forms, stripe_key, stripe_upstream, Run,
    ID, STRIPE,
};

/// `latchkey {args}` with the test's OpenBao in `VAULT_ADDR` / `VAULT_TOKEN` and no config.
async fn cli(bao: &Bao, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(args)
        .env("VAULT_ADDR", &bao.addr)
        .env("VAULT_TOKEN", &bao.token)
        .env_remove("LATCHKEY_CONFIG")
        .env("HTTP_PROXY", "http://127.0.0.1:9")
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .output()
        .await
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `latchkey ca init` into the test's OpenBao; asserts it worked and said where the CA went.
async fn ca_init(bao: &Bao) -> Run {
    let run = cli(bao, &["ca", "init"]).await;
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("secret/latchkey/ca"),
        "init does not say where the CA went: {}",
        run.stderr
    );
    run
}

/// The Vault API at `secret/data/{path}` (KV v2), directly: what an operator's tools see.
fn kv_url(bao: &Bao, path: &str) -> String {
    format!("{}/v1/secret/data/{path}", bao.addr)
}

/// The CA record's data and version, or `None`.
async fn ca_record(bao: &Bao) -> Option<(serde_json::Value, u64)> {
    let r = http()
        .get(kv_url(bao, "latchkey/ca"))
        .header("X-Vault-Token", &bao.token)
        .send()
        .await
        .unwrap();
    if r.status() == 404 {
        return None;
    }
    assert!(r.status().is_success(), "{r:?}");
    let v: serde_json::Value = r.json().await.unwrap();
    let version = v["data"]["metadata"]["version"].as_u64().unwrap();
    Some((v["data"]["data"].clone(), version))
}

/// Writes `fields` at `secret/{path}` (a new version, whatever was there).
async fn kv_put(bao: &Bao, path: &str, fields: serde_json::Value) {
    let r = http()
        .post(kv_url(bao, path))
        .header("X-Vault-Token", &bao.token)
        .json(&serde_json::json!({ "data": fields }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{r:?}");
}

/// The CA key stored in Vault, registered with `lk`'s leak check.
fn forbid_key(lk: &Latchkey, key_pem: &str) {
    for form in key_forms(key_pem) {
        lk.forbid(&form);
    }
}

#[track_caller]
fn assert_no_key(text: &str, key_pem: &str, what: &str) {
    for form in key_forms(key_pem) {
        assert!(!text.contains(&form), "{what} holds the CA private key");
    }
}

/// latchkey with `api.stripe.com:443` pinned to `to` and the upstream's CA trusted; no CA
/// files.
fn opts(up_ca: &TestCa, to: std::net::SocketAddr) -> Opts {
    Opts::loopback()
        .root(&up_ca.pem_path)
        .proxy(&format!("resolve = {{ \"{STRIPE}:443\" = \"{to}\" }}"))
}

/// curl to `https://api.stripe.com/v1/charges` the way a workflow does: `HTTPS_PROXY` naming
/// the connection, and `ca` (only) trusted. Its status and body.
async fn curl_via_https_proxy(lk: &Latchkey, ca: &Path) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "30", "-w", "\n%{http_code}", "--cacert"])
        .arg(ca)
        .arg(format!("https://{STRIPE}/v1/charges"))
        .env("HTTPS_PROXY", format!("http://{ID}:@{}", lk.proxy))
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), echo_text(body))
}

/// `latchkey ca export` into a file of `dir`; its path and text.
async fn export(bao: &Bao, dir: &Path) -> (PathBuf, String) {
    let run = cli(bao, &["ca", "export"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("-----BEGIN CERTIFICATE-----"));
    let path = write_file(dir, "exported-ca.pem", &run.stdout);
    (path, run.stdout)
}

#[tokio::test]
async fn ca_init_into_vault_then_a_tunnel_works_without_ca_files() {
    let bao = Bao::start_own().await;
    let up_ca = TestCa::new();
    let up = stripe_upstream(&up_ca).await;
    let key = stripe_key();
    bao.put(ID, &[("connector", "stripe"), ("api_key", &key)]);

    // No CA yet: the tunnel form is off, and says how to turn it on.
    let mut before = Latchkey::start(&bao, opts(&up_ca, up.addr())).await;
    let x = exchange(
        &before,
        &connect_head(&format!("{STRIPE}:443"), Some((ID, ""))),
        None,
        &inner_get("/", STRIPE),
    )
    .await;
    x.assert_connect_refused(405, "method_not_allowed");
    assert!(x.connect.body.contains("latchkey ca init"), "{x:#?}");
    let r = http()
        .get(before.admin_url("/ca.pem"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("latchkey ca init"));
    before.stop_and_check();

    let init = ca_init(&bao).await;
    let (data, version) = ca_record(&bao).await.expect("ca init stored nothing");
    assert_eq!(version, 1);
    let key_pem = data["private_key"].as_str().unwrap().to_string();
    assert!(key_pem.contains("PRIVATE KEY"), "{}", data["certificate"]);
    assert_no_key(
        &format!("{}{}", init.stdout, init.stderr),
        &key_pem,
        "ca init",
    );

    let dir = tempfile::tempdir().unwrap();
    let (exported, cert_pem) = export(&bao, dir.path()).await;
    assert_eq!(
        cert_pem.trim(),
        data["certificate"]
            .as_str()
            .unwrap()
            .replace("\r\n", "\n")
            .trim()
    );
    assert!(!cert_pem.contains("PRIVATE"), "ca export printed a key");

    let lk = Latchkey::start(&bao, opts(&up_ca, up.addr())).await;
    forbid_key(&lk, &key_pem);
    let (status, body) = curl_via_https_proxy(&lk, &exported).await;
    assert_eq!(status, 200, "{body}\n{}", lk.output());
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_ours(&echo, &key);
    assert_eq!(echo["uri"], "/v1/charges");
    assert_eq!(up.requests(), 1);

    // `/ca.pem` is the exported certificate; neither it nor `/metrics` holds the key.
    let served = http()
        .get(lk.admin_url("/ca.pem"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(served.trim(), cert_pem.trim());
    let metrics = http()
        .get(lk.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("latchkey_tunnel"), "{metrics}");
    for text in [&served, &metrics] {
        assert_no_key(text, &key_pem, "an admin answer");
    }
    lk.output_line("naming where the CA is kept", |l| {
        l.contains("secret/latchkey/ca")
    })
    .await;
}

#[tokio::test]
async fn two_latchkeys_on_one_vault_present_leaves_from_the_same_ca() {
    let bao = Bao::start_own().await;
    let up_ca = TestCa::new();
    let up = stripe_upstream(&up_ca).await;
    let key = stripe_key();
    bao.put(ID, &[("connector", "stripe"), ("api_key", &key)]);
    ca_init(&bao).await;
    let key_pem = ca_record(&bao).await.unwrap().0["private_key"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let (exported, cert_pem) = export(&bao, dir.path()).await;

    let a = Latchkey::start(&bao, opts(&up_ca, up.addr())).await;
    let b = Latchkey::start(&bao, opts(&up_ca, up.addr())).await;
    for lk in [&a, &b] {
        forbid_key(lk, &key_pem);
        // The one exported certificate verifies each replica's leaf.
        let (status, body) = curl_via_https_proxy(lk, &exported).await;
        assert_eq!(status, 200, "{body}\n{}", lk.output());
        assert_ours(&serde_json::from_str(&body).unwrap(), &key);
        let served = http()
            .get(lk.admin_url("/ca.pem"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(served.trim(), cert_pem.trim());
    }
    assert_eq!(up.requests(), 2);

    // A CA of another latchkey (files, never stored here) does not verify them: the check
    // above can fail.
    let other = dir.path().join("other.pem");
    let run = cli(
        &bao,
        &[
            "ca",
            "init",
            "--cert",
            other.to_str().unwrap(),
            "--key",
            dir.path().join("other-key.pem").to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let (status, _) = curl_via_https_proxy(&a, &other).await;
    assert_ne!(status, 200, "a foreign CA verified the replica's leaf");
}

#[tokio::test]
async fn a_second_ca_init_refuses_and_leaves_the_first_in_place() {
    let bao = Bao::start_own().await;
    ca_init(&bao).await;
    let (first, version) = ca_record(&bao).await.unwrap();
    let key_pem = first["private_key"].as_str().unwrap().to_string();

    let again = cli(&bao, &["ca", "init"]).await;
    assert!(
        again.code.is_some_and(|c| c != 0),
        "a second ca init succeeded"
    );
    assert!(
        again.stderr.contains("already exists") && again.stderr.contains("secret/latchkey/ca"),
        "{}",
        again.stderr
    );
    assert_no_key(
        &format!("{}{}", again.stdout, again.stderr),
        &key_pem,
        "ca init",
    );
    assert_eq!(ca_record(&bao).await.unwrap(), (first, version));

    // Two racing on an empty Vault: exactly one wins (check-and-set), and the CA stored is
    // whole.
    let bao = Bao::start_own().await;
    let runs: Vec<Run> =
        futures_util::future::join_all((0..4).map(|_| cli(&bao, &["ca", "init"]))).await;
    let won = runs.iter().filter(|r| r.code == Some(0)).count();
    assert_eq!(
        won,
        1,
        "{:?}",
        runs.iter().map(|r| &r.stderr).collect::<Vec<_>>()
    );
    let (data, version) = ca_record(&bao).await.unwrap();
    assert_eq!(version, 1);
    for r in &runs {
        assert_no_key(
            &format!("{}{}", r.stdout, r.stderr),
            data["private_key"].as_str().unwrap(),
            "ca init",
        );
    }
}

#[tokio::test]
async fn a_broken_ca_record_is_a_start_error_naming_the_path_never_the_key() {
    let bao = Bao::start_own().await;
    // A real CA, to take parts from.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("a.pem"), dir.path().join("a-key.pem"));
    let (other_cert, other_key) = (dir.path().join("b.pem"), dir.path().join("b-key.pem"));
    for (c, k) in [(&cert, &key), (&other_cert, &other_key)] {
        let run = cli(
            &bao,
            &[
                "ca",
                "init",
                "--cert",
                c.to_str().unwrap(),
                "--key",
                k.to_str().unwrap(),
            ],
        )
        .await;
        assert_eq!(run.code, Some(0), "{}", run.stderr);
    }
    let cert = std::fs::read_to_string(cert).unwrap();
    let key = std::fs::read_to_string(key).unwrap();
    let other_key = std::fs::read_to_string(other_key).unwrap();
    let spoiled = key.replacen("-----\n", "-----\n!", 1);

    for (fields, says) in [
        (
            serde_json::json!({ "certificate": cert }),
            "`private_key` is missing",
        ),
        (
            serde_json::json!({ "private_key": key }),
            "`certificate` is missing",
        ),
        (
            serde_json::json!({ "certificate": cert, "private_key": other_key }),
            "does not belong to the CA certificate",
        ),
        (
            serde_json::json!({ "certificate": cert, "private_key": spoiled }),
            "not a PKCS#8 PEM private key",
        ),
        (
            serde_json::json!({ "certificate": "not a certificate", "private_key": key }),
            "certificate",
        ),
        (
            serde_json::json!({ "certificate": cert, "private_key": { "pem": key } }),
            "not a string",
        ),
    ] {
        kv_put(&bao, "latchkey/ca", fields.clone()).await;
        let out = match Latchkey::try_start(&bao, Opts::loopback()).await {
            Ok(mut lk) => panic!(
                "latchkey started with a broken CA ({fields}):\n{}",
                lk.stop_and_check()
            ),
            Err(out) => out,
        };
        assert!(
            out.contains("secret/latchkey/ca") && out.contains(says),
            "{says}: {out}"
        );
        for k in [&key, &other_key] {
            assert_no_key(&out, k, "the start error");
        }
        assert!(!out.contains("!MI"), "the spoiled key is quoted: {out}");
    }
}

#[tokio::test]
async fn the_ca_record_is_never_a_connection() {
    let bao = Bao::start_own().await;
    ca_init(&bao).await;
    let key_pem = ca_record(&bao).await.unwrap().0["private_key"]
        .as_str()
        .unwrap()
        .to_string();
    let admin = |lk: &Latchkey, method: reqwest::Method, path: &str| {
        http()
            .request(method, lk.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
    };

    // The usual layout: connections under their prefix, the CA beside it.
    let key = put_bearer(&bao, "listed", "http://127.0.0.1:9");
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    forbid_key(&lk, &key_pem);
    lk.forbid(&key);
    let list = admin(&lk, reqwest::Method::GET, "/v1/connections")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let ids: Vec<&str> = v["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("{list}"))
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["listed"], "{list}");
    drop(lk);

    // A prefix of `latchkey` puts the connections beside the CA: `ca` is still not one.
    kv_put(
        &bao,
        "latchkey/beside",
        serde_json::json!({ "connector": "generic-bearer", "base_url": "http://127.0.0.1:9", "api_key": "beside-key-0123456789" }),
    )
    .await;
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().env("LATCHKEY_VAULT_PREFIX", "latchkey"),
    )
    .await;
    forbid_key(&lk, &key_pem);
    lk.forbid("beside-key-0123456789");
    let list = admin(&lk, reqwest::Method::GET, "/v1/connections")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let ids: Vec<&str> = v["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("{list}"))
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["beside"], "{list}");
    let one = admin(&lk, reqwest::Method::GET, "/v1/connections/ca")
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 404);
    let gone = admin(&lk, reqwest::Method::DELETE, "/v1/connections/ca")
        .send()
        .await
        .unwrap();
    assert!(!gone.status().is_success(), "{gone:?}");
    let through = gateway_get(&lk, "/ca/v1/x", &[]).await;
    assert_eq!(through.status, 404, "{:?}", through.json);
    assert_eq!(through.error_code(), Some("connection_not_found"));
    assert_no_key(&list, &key_pem, "the connection list");
    // Still there, untouched.
    assert_eq!(ca_record(&bao).await.unwrap().1, 1);
}

/// `latchkey {args}` with `env` and nothing else of Vault's or latchkey's from the environment:
/// exit code, stderr, stdout.
async fn bare(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(args)
        .env_remove("VAULT_ADDR")
        .env_remove("VAULT_TOKEN")
        .env_remove("LATCHKEY_CONFIG")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn ca_init_and_export_say_what_is_missing_and_follow_the_config() {
    // No token, no config, no files: each way out is named.
    let (code, err, _) = bare(&["ca", "init"], &[]).await;
    assert_ne!(code, Some(0));
    for named in ["VAULT_TOKEN", "--config", "--cert"] {
        assert!(err.contains(named), "{named}: {err}");
    }
    // Half of the files.
    let (code, err, _) = bare(&["ca", "init", "--cert", "/tmp/only-a-cert.pem"], &[]).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("--key"), "{err}");

    // Through a configuration file: its [vault] table, the token from VAULT_TOKEN.
    let bao = Bao::start_own().await;
    let token = [("VAULT_TOKEN", bao.token.as_str())];
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "latchkey.toml",
        &format!("[vault]\naddress = \"{}\"\n", bao.addr),
    );
    let config = config.to_str().unwrap();
    let (code, err, _) = bare(&["ca", "export", "--config", config], &token).await;
    assert_ne!(code, Some(0));
    assert!(
        err.contains("no CA at secret/latchkey/ca") && err.contains("latchkey ca init"),
        "{err}"
    );
    let (code, err, _) = bare(&["ca", "init", "--config", config], &token).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains(&bao.addr), "{err}");
    let (data, _) = ca_record(&bao).await.unwrap();
    let (code, err, out) = bare(&["ca", "export", "--config", config], &token).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out.trim(),
        data["certificate"]
            .as_str()
            .unwrap()
            .replace("\r\n", "\n")
            .trim()
    );
    assert_no_key(
        &format!("{err}{out}"),
        data["private_key"].as_str().unwrap(),
        "ca export",
    );

    // A configuration that keeps the CA in files: export prints that file, init refuses.
    let (cert, key) = (dir.path().join("f.pem"), dir.path().join("f-key.pem"));
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let (code, err, _) = bare(&["ca", "init", "--cert", cert, "--key", key], &[]).await;
    assert_eq!(code, Some(0), "{err}");
    let files = write_file(
        dir.path(),
        "files.toml",
        &format!(
            "[vault]\naddress = \"{}\"\n[tls]\nca_cert = {cert:?}\nca_key = {key:?}\n",
            bao.addr
        ),
    );
    let files = files.to_str().unwrap();
    let (code, err, out) = bare(&["ca", "export", "--config", files], &token).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, std::fs::read_to_string(cert).unwrap());
    let (code, err, _) = bare(&["ca", "init", "--config", files], &token).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("tls.ca_cert"), "{err}");
}

#[tokio::test]
async fn a_latchkey_started_while_vault_was_down_gets_the_ca_once_vault_answers() {
    let bao = Bao::start_own().await;
    let up_ca = TestCa::new();
    let up = stripe_upstream(&up_ca).await;
    let key = stripe_key();
    bao.put(ID, &[("connector", "stripe"), ("api_key", &key)]);
    ca_init(&bao).await;
    let key_pem = ca_record(&bao).await.unwrap().0["private_key"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let (exported, cert_pem) = export(&bao, dir.path()).await;

    bao.freeze().await;
    let lk = Latchkey::start(&bao, opts(&up_ca, up.addr())).await;
    forbid_key(&lk, &key_pem);
    let r = http().get(lk.admin_url("/ca.pem")).send().await.unwrap();
    assert_eq!(r.status(), 404, "a CA without Vault?");
    lk.output_line("warning that the tunnel form waits for Vault", |l| {
        l.contains("asking again")
    })
    .await;
    bao.thaw();

    let served = wait_until(
        "latchkey to get its CA",
        Duration::from_secs(30),
        || async {
            let r = http().get(lk.admin_url("/ca.pem")).send().await.ok()?;
            (r.status() == 200).then_some(r.text().await.ok()?)
        },
    )
    .await;
    assert_eq!(served.trim(), cert_pem.trim());
    let (status, body) = curl_via_https_proxy(&lk, &exported).await;
    assert_eq!(status, 200, "{body}\n{}", lk.output());
    assert_ours(&serde_json::from_str(&body).unwrap(), &key);
}
