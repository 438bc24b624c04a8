//! TLS on the admin listener (`admin.tls_cert`, `admin.tls_key`): health, the API and the web
//! page's sign-in over HTTPS (HTTP/2 and HTTP/1.1), the session cookie `Secure`, nothing
//! answered in the clear, a bad key file refused at start without quoting it, and shutdown
//! not held up by a handshake that never ends. `admin.secure_cookie` without TLS is for a
//! listener behind a proxy that terminates TLS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::lifecycle::eventually;
use crate::support::*;

/// A certificate for 127.0.0.1 and its key, written in `dir`; the CA that signed it.
fn admin_cert(dir: &Path) -> (TestCa, PathBuf, PathBuf) {
    let ca = TestCa::new();
    let (cert, key) = ca.issue(&["127.0.0.1", "localhost"]);
    let cert = write_file(dir, "admin.pem", &cert);
    let key = write_file(dir, "admin.key", &key);
    (ca, cert, key)
}

fn tls_opts(cert: &Path, key: &Path) -> Opts {
    Opts::loopback()
        .admin(&format!("tls_cert = {:?}", cert.display().to_string()))
        .admin(&format!("tls_key = {:?}", key.display().to_string()))
}

/// A client that trusts `ca` (and goes to latchkey directly); HTTP/2 when the server offers it.
fn trusting(ca: &TestCa) -> reqwest::ClientBuilder {
    let pem = std::fs::read(&ca.pem_path).unwrap();
    reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
}

/// GET `path` on the admin listener over HTTPS; the answer, which must arrive.
async fn get(client: &reqwest::Client, lk: &Latchkey, path: &str) -> reqwest::Response {
    client.get(lk.admin_https_url(path)).send().await.unwrap()
}

/// The `Set-Cookie` of a form sign-in with the admin token, which must succeed.
async fn sign_in(client: &reqwest::Client, url: String, origin: Option<&str>) -> String {
    let mut req = client
        .post(url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("token={ADMIN_TOKEN}"));
    if let Some(o) = origin {
        req = req.header("Origin", o);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "sign-in refused");
    resp.headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn the_admin_listener_speaks_tls_and_the_session_cookie_is_secure() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = admin_cert(dir.path());
    let bao = Bao::start().await;
    let lk = Latchkey::start(&bao, tls_opts(&cert, &key)).await;
    let client = trusting(&ca).build().unwrap();

    // Health over HTTPS; HTTP/2 is offered, as it is served in the clear, and HTTP/1.1 too.
    let resp = get(&client, &lk, "/healthz").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let h1 = trusting(&ca).http1_only().build().unwrap();
    let resp = get(&h1, &lk, "/healthz").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);

    // The page's sign-in: over HTTP/2 there is no Host header, and the browser's Origin is
    // compared with the request's authority.
    let origin = format!("https://{}", lk.admin);
    let cookie = sign_in(&client, lk.admin_https_url("/session"), Some(&origin)).await;
    for part in ["HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    let h1_cookie = sign_in(&h1, lk.admin_https_url("/session"), Some(&origin)).await;
    assert!(h1_cookie.contains("Secure"), "{h1_cookie}");

    // The API with the bearer token, and with the cookie just given.
    let resp = client
        .get(lk.admin_https_url("/v1/connections"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let list: serde_json::Value = resp.json().await.unwrap();
    assert!(list["connections"].is_array(), "{list}");
    let pair = cookie.split(';').next().unwrap().to_string();
    let resp = client
        .get(lk.admin_https_url("/v1/connections"))
        .header("Cookie", pair)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = get(&client, &lk, "/v1/connections").await;
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn in_chromium_the_page_signs_in_over_https_with_a_secure_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, cert, key) = admin_cert(dir.path());
    let bao = Bao::start().await;
    let lk = Latchkey::start(&bao, tls_opts(&cert, &key)).await;
    let v = crate::web::browser_script(
        "web_tls.mjs",
        &[
            (
                "LATCHKEY_ADMIN",
                lk.admin_https_url("").trim_end_matches('/').to_string(),
            ),
            ("ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        ],
    )
    .await;
    assert_eq!(v["failure"], serde_json::Value::Null, "{v:#}");
    assert_eq!(v["problems"], serde_json::json!([]), "{v:#}");
    assert_eq!(v["protocol"], "h2", "{v:#}");
    assert_eq!(v["who"], "Signed in as admin", "{v:#}");
    let cookie = v["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "latchkey_session")
        .unwrap_or_else(|| panic!("no session cookie: {v:#}"));
    assert_eq!(cookie["secure"], true, "{v:#}");
    assert_eq!(cookie["httpOnly"], true, "{v:#}");
    assert_eq!(cookie["sameSite"], "Strict", "{v:#}");
    assert_eq!(v["script_sees_cookie"], "", "{v:#}");
    assert_eq!(v["signed_out"], true, "{v:#}");
}

#[tokio::test]
async fn plain_http_to_the_tls_admin_listener_gets_no_http_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = admin_cert(dir.path());
    let bao = Bao::start().await;
    let lk = Latchkey::start(&bao, tls_opts(&cert, &key)).await;

    let plain = http().get(lk.admin_url("/healthz")).send().await;
    assert!(plain.is_err(), "answered in the clear: {plain:?}");
    let plain = http()
        .post(lk.admin_url("/session"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("token={ADMIN_TOKEN}"))
        .send()
        .await;
    assert!(plain.is_err(), "answered in the clear: {plain:?}");

    // Logged at debug, and the listener goes on serving.
    eventually("the failed handshake to be logged", || {
        std::future::ready(
            lk.output()
                .contains("admin TLS handshake failed")
                .then_some(()),
        )
    })
    .await;
    let client = trusting(&ca).build().unwrap();
    let resp = get(&client, &lk, "/healthz").await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn secure_cookie_without_tls_is_for_tls_terminated_in_front() {
    let bao = Bao::start().await;
    let lk = Latchkey::start(&bao, Opts::loopback().admin("secure_cookie = true")).await;
    let cookie = sign_in(&http(), lk.admin_url("/session"), None).await;
    for part in ["HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(cookie.contains(part), "{cookie}");
    }

    // And without the key, plain HTTP keeps a cookie that is not `Secure`.
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let cookie = sign_in(&http(), lk.admin_url("/session"), None).await;
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(!cookie.contains("Secure"), "{cookie}");
}

#[tokio::test]
async fn a_bad_admin_key_file_stops_the_start_naming_the_key_without_quoting_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, cert, _key) = admin_cert(dir.path());
    let bao = Bao::start().await;

    // Not PEM: the start fails naming admin.tls_key and the file, and never shows its text.
    let inside = "not-a-key-but-secret-all-the-same-4d1b";
    let bad = write_file(
        dir.path(),
        "bad.key",
        &format!("-----BEGIN PRIVATE KEY-----\n{inside}\n-----END PRIVATE KEY-----\n"),
    );
    let out = match Latchkey::try_start(&bao, tls_opts(&cert, &bad)).await {
        Ok(_) => panic!("latchkey started with a key file that is not a key"),
        Err(out) => out,
    };
    assert!(out.contains("admin.tls_key"), "{out}");
    assert!(out.contains(&bad.display().to_string()), "{out}");
    assert!(
        !out.contains(inside),
        "the key file's text was shown:\n{out}"
    );

    // A real key, but not the certificate's.
    let other = TestCa::new().issue(&["127.0.0.1"]).1;
    let other = write_file(dir.path(), "other.key", &other);
    let out = match Latchkey::try_start(&bao, tls_opts(&cert, &other)).await {
        Ok(_) => panic!("latchkey started with a key that is not the certificate's"),
        Err(out) => out,
    };
    assert!(out.contains("admin.tls_key"), "{out}");

    // A certificate file with no certificate in it.
    let out = match Latchkey::try_start(&bao, tls_opts(&bad, &other)).await {
        Ok(_) => panic!("latchkey started with no certificate"),
        Err(out) => out,
    };
    assert!(out.contains("admin.tls_cert"), "{out}");
}

#[tokio::test]
async fn a_handshake_that_never_ends_does_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = admin_cert(dir.path());
    let bao = Bao::start().await;
    // Long enough that only shutdown, not the handshake deadline, can end the handshake.
    let opts = tls_opts(&cert, &key).proxy("header_read_timeout = \"120s\"");
    let mut lk = Latchkey::start(&bao, opts).await;

    // An idle TLS connection after a request, and one that never says a word.
    let client = trusting(&ca).build().unwrap();
    let resp = get(&client, &lk, "/healthz").await;
    assert_eq!(resp.status(), 200);
    let _silent = tokio::net::TcpStream::connect(lk.admin).await.unwrap();

    lk.terminate();
    let status = lk
        .exited_within(Duration::from_secs(30))
        .await
        .expect("latchkey to exit");
    assert!(status.success(), "{status:?}\n{}", lk.output());
    let out = lk.output();
    assert!(out.contains("\"stopped\""), "{out}");
    assert!(
        !out.contains("admin connections were not waited for"),
        "{out}"
    );
}
