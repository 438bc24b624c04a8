//! PRODUCT.md 10.3: the credential appears in no log line, metric or error body, at any log
//! level including `trace`. Real traffic through every form and scheme, from curl, Python
//! `requests` and reqwest, successes and failures, with latchkey at `RUST_LOG=trace`; then all
//! of its output, its metrics and every error body are searched for each secret, raw, base64
//! and inside Basic credentials.

use crate::support::*;

const CLIENT_TOKEN: &str = "client-token-9f8e7d6c5b4a";

#[tokio::test]
async fn no_secret_in_trace_output_metrics_or_error_bodies() {
    let bao = Bao::start().await;
    let ca = TestCa::new();
    let plain = echo().await;
    let tls = echo_tls(&ca, &[b"h2", b"http/1.1"]).await;
    let p = format!("http://{}", plain.addr());
    let t = format!("https://localhost:{}", tls.addr().port());

    bao.put(
        "stripe-bearer",
        &[
            ("connector", "stripe"),
            ("base_url", &t),
            ("api_key", "sk_test_LeakCanary0001"),
        ],
    );
    bao.put(
        "anthropic-header",
        &[
            ("connector", "anthropic"),
            ("base_url", &p),
            ("api_key", "sk-ant-LeakCanary0002"),
        ],
    );
    bao.put(
        "twilio-basic",
        &[
            ("connector", "twilio"),
            ("base_url", &t),
            ("account_sid", "AC0123456789abcdef0123456789abcdef"),
            ("auth_token", "fedcba9876543210fedcba9876543210"),
        ],
    );
    bao.put(
        "maps-query",
        &[
            ("connector", "google-maps"),
            ("base_url", &p),
            ("api_key", "AIzaLeakCanary000000000000000000000003"),
        ],
    );
    bao.put(
        "mailchimp-basic",
        &[
            ("connector", "mailchimp"),
            ("base_url", &p),
            ("dc", "us6"),
            ("api_key", "0123456789abcdef0123456789abcdef-us6"),
        ],
    );
    // An upstream that is gone (nothing listens on the port): 502, and the key stays unsaid.
    let gone = free_port();
    bao.put(
        "gone",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &format!("http://127.0.0.1:{gone}")),
            ("api_key", "LeakCanary0005gone"),
        ],
    );
    // A stored value with CR LF: refused, and its text must not surface in the error either.
    bao.put(
        "broken",
        &[
            ("connector", "generic-bearer"),
            ("base_url", &p),
            ("api_key", "LeakCanary0004\r\nX-Injected: 1"),
        ],
    );

    let clients = format!(
        "[[clients]]\nname = \"workflows\"\ntoken_sha256 = \"{}\"\nconnections = [\"*\"]\n",
        latchkey::auth::sha256_hex(CLIENT_TOKEN)
    );
    let lk = Latchkey::start(&bao, Opts::loopback().root(&ca.pem_path).extra(&clients)).await;
    lk.forbid(CLIENT_TOKEN);
    lk.forbid("latchkey:0123456789abcdef0123456789abcdef-us6");
    lk.forbid("LeakCanary0004");

    let bearer = format!("Bearer {CLIENT_TOKEN}");
    let auth = [("Proxy-Authorization", bearer.as_str())];
    let mut bodies = Vec::new();

    // Gateway form, reqwest, every connection, plus the query scheme with a client's own key.
    for path in [
        "/stripe-bearer/v1/charges",
        "/anthropic-header/v1/messages",
        "/twilio-basic/2010-04-01/Accounts.json",
        "/maps-query/maps/api/geocode/json?address=x&key=client-supplied",
        "/mailchimp-basic/ping",
    ] {
        let r = gateway_get(&lk, path, &auth).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.json);
    }
    // The key written by the client itself into the path and the query, as it is, in base64
    // and percent-encoded: sent on as written, and never logged (PRODUCT.md 4.8).
    let quoted = "/stripe-bearer/v1/sk_test_LeakCanary0001?note=sk_test_LeakCanary0001\
                  &b=c2tfdGVzdF9MZWFrQ2FuYXJ5MDAwMQ%3D%3D&p=sk%5Ftest%5FLeakCanary0001";
    let r = gateway_get(&lk, quoted, &auth).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    // Failures: upstream 401 (re-read), unknown connection, invalid connection, an upstream
    // that is gone; then a bad token and a host the connection does not name.
    let r = gateway_get(&lk, "/stripe-bearer/status/401", &auth).await;
    // The upstream's own 401 echoes what it received; only latchkey's answers count here.
    assert_eq!(r.status, 401, "{:?}", r.json);
    assert_eq!(r.latchkey_error, None);
    for (path, status) in [("/nope/x", 404), ("/broken/x", 500), ("/gone/x", 502)] {
        let r = gateway_get(&lk, path, &auth).await;
        assert_eq!(r.status, status, "{path}: {:?}", r.json);
        assert!(r.latchkey_error.is_some(), "{path}: not latchkey's answer");
        bodies.push(r.json.to_string());
    }
    let r = gateway_get(
        &lk,
        "/stripe-bearer/x",
        &[("Proxy-Authorization", "Bearer wrong-token-123")],
    )
    .await;
    assert_eq!(r.status, 407);
    bodies.push(r.json.to_string());

    // Forward form from curl, to the plain upstream, and to a host the connection does not name.
    let proxy_user = format!("anthropic-header:{CLIENT_TOKEN}");
    let (status, text) = curl(&[
        "-x",
        &lk.url(""),
        "--proxy-user",
        &proxy_user,
        &format!("{p}/v1/complete"),
    ])
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = curl(&[
        "-x",
        &lk.url(""),
        "--proxy-user",
        &proxy_user,
        "http://127.0.0.3:9/elsewhere",
    ])
    .await;
    assert_eq!(status, 403, "{text}");
    bodies.push(text);

    // Forward form from Python requests, configured only through HTTP_PROXY, upgraded to https.
    let proxy_env = format!("http://stripe-bearer:{CLIENT_TOKEN}@{}", lk.proxy);
    let out = python(
        &format!(
            "import requests\nr = requests.get('http://localhost:{}/v1/balance')\nprint(r.status_code)",
            tls.addr().port()
        ),
        &[("HTTP_PROXY", &proxy_env), ("NO_PROXY", "")],
    )
    .await;
    assert_eq!(out.trim(), "200");

    let metrics = http()
        .get(lk.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("latchkey_requests_total"));

    let mut lk = lk;
    let output = lk.stop_and_check();
    // The check above only means something if trace output was produced and traffic logged.
    assert!(
        output.contains("\"level\":\"TRACE\""),
        "no trace output at all"
    );
    assert!(
        lk.access_log().len() >= 12,
        "expected an access line per request"
    );
    for secret in [
        "sk_test_LeakCanary0001",
        "sk-ant-LeakCanary0002",
        "fedcba9876543210fedcba9876543210",
        "AIzaLeakCanary000000000000000000000003",
        "0123456789abcdef0123456789abcdef-us6",
        "LeakCanary0004",
        CLIENT_TOKEN,
    ] {
        assert!(!metrics.contains(secret), "metrics contain a secret");
        for body in &bodies {
            assert!(
                !body.contains(secret),
                "an error body contains a secret: {body}"
            );
        }
    }
    // The masked query credential is what the access log shows.
    let maps = lk
        .access_log()
        .into_iter()
        .find(|l| l["connection"] == "maps-query")
        .unwrap();
    assert_eq!(
        maps["path"],
        "/maps/api/geocode/json?address=x&key=<redacted>"
    );
    let quoted = lk
        .access_log()
        .into_iter()
        .find(|l| l["path"].as_str().is_some_and(|p| p.contains("note=")))
        .expect("the access line of the request quoting the key");
    assert!(
        quoted["path"].as_str().unwrap().starts_with("/v1/"),
        "{quoted}"
    );
}

/// The harness's leak check finds a secret base64-encoded inside a longer value, whatever
/// comes before it: the Basic credentials `user:key`, `:key`, `key:` and others.
#[test]
fn the_leak_check_finds_a_key_inside_any_base64_value() {
    use base64::Engine as _;
    let key = "sk_live_0123456789abcdef";
    let cores = base64_cores(key.as_bytes());
    for prefix in ["", ":", "u:", "user:", "ab", "abc:"] {
        for suffix in ["", ":", "x", ":pw"] {
            let value = format!("{prefix}{key}{suffix}");
            for encoded in [
                base64::engine::general_purpose::STANDARD.encode(&value),
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&value),
            ] {
                assert!(
                    cores.iter().any(|c| encoded.contains(c.as_str())),
                    "{value:?} as {encoded} escapes the check"
                );
            }
        }
    }
}

/// A crash writes no core file holding the keys in memory: latchkey makes itself
/// non-dumpable. The control, another process under the same core limit, shows that this
/// machine writes core files where the check looks (`core_pattern` relative to the process's
/// directory), so the check cannot pass for want of core files at all.
#[tokio::test]
async fn a_crash_writes_no_core_file() {
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    assert!(
        !pattern.starts_with('|') && !pattern.contains('/'),
        "this test needs core files written in the crashing process's directory; core_pattern is {pattern:?}"
    );
    let cores = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("core"))
            .collect()
    };
    let abort_with_cores = |pid: u32| {
        let ok = std::process::Command::new("prlimit")
            .args(["--pid", &pid.to_string(), "--core=unlimited"])
            .status()
            .unwrap();
        assert!(ok.success());
        let ok = std::process::Command::new("kill")
            .args(["-ABRT", &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    };

    // The control.
    let dir = tempfile::tempdir().unwrap();
    let mut control = std::process::Command::new("sleep")
        .arg("60")
        .current_dir(dir.path())
        .spawn()
        .unwrap();
    abort_with_cores(control.id());
    control.wait().unwrap();
    assert!(
        !cores(dir.path()).is_empty(),
        "the control wrote no core file"
    );

    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "cored", &format!("http://{}", up.addr()));
    let mut lk = Latchkey::start(&bao, Opts::loopback()).await;
    let r = gateway_get(&lk, "/cored/x", &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        format!("{:?}", r.json).contains(&key),
        "the key was not used"
    );
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", lk.pid())).unwrap();
    let before = cores(&cwd);
    abort_with_cores(lk.pid());
    let status = lk
        .exited_within(std::time::Duration::from_secs(15))
        .await
        .expect("latchkey did not end on SIGABRT");
    assert!(!status.success());
    let written: Vec<String> = cores(&cwd)
        .into_iter()
        .filter(|c| !before.contains(c))
        .collect();
    for core in &written {
        let _ = std::fs::remove_file(cwd.join(core));
    }
    assert!(
        written.is_empty(),
        "core files were written in {}: {written:?}",
        cwd.display()
    );
}
