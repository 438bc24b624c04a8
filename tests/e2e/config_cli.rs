//! The configuration as the binary sees it: `check-config`, refusals at start naming the key,
//! the environment overrides, and the Vault token file.

use std::process::Command;

use crate::support::*;

fn latchkey() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_latchkey"));
    c.env_remove("VAULT_ADDR").env("VAULT_TOKEN", "t");
    c
}

fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "c.toml", text);
    let out = latchkey().arg("check-config").arg(&path).output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), all)
}

#[test]
fn check_config_accepts_the_shipped_examples() {
    for file in ["config/example.toml", "config/docker.toml"] {
        let out = latchkey().arg("check-config").arg(file).output().unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("ok"), "{text}");
        assert!(text.contains("connectors:"), "{text}");
    }
}

/// Issue 12: `check-config config/example.toml`, as that file's header says to run it, exited 64
/// without VAULT_TOKEN. Checking a file needs neither Vault nor a token; serving does.
#[test]
fn check_config_needs_no_vault_token_nor_any_vault_variable() {
    let mut c = Command::new(env!("CARGO_BIN_EXE_latchkey"));
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("VAULT_") || n.starts_with("LATCHKEY_") {
            c.env_remove(&name);
        }
    }
    let out = c
        .arg("check-config")
        .arg("config/example.toml")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn check_config_refuses_bad_files_naming_the_key() {
    let hash = latchkey::auth::sha256_hex("t");
    for (text, key, why) in [
        ("[proxy]\nlisten = \"127.0.0.1:1\"\nlisen = 1\n", "proxy.lisen", "unknown field"),
        ("[cache]\nttl = \"5 parsecs\"\n", "cache.ttl", "not a duration"),
        // A duration so long that a clock or timer would overflow at run time.
        ("[cache]\nnegative_ttl = \"18446744073709551615s\"\n", "cache.negative_ttl", "10 years"),
        ("[proxy]\nheader_read_timeout = \"3651d\"\n", "proxy.header_read_timeout", "10 years"),
        ("[proxy]\nhttp1_server = \"nginx\"\n", "proxy.http1_server", "unknown variant `nginx`, expected `hyper` or `latchkey`"),
        ("[proxy]\nallow_private_destinations = [\"10.0.0.0/33\"]\n", "proxy.allow_private_destinations", "not a CIDR"),
        (
            &format!("[[clients]]\nname = \"a\"\ntoken_sha256 = \"{hash}\"\nconnections = [\"stripe-[\"]\n"),
            "clients[0].connections",
            "not a connection pattern",
        ),
        ("[proxy]\nlisten = \"0.0.0.0:8080\"\n", "proxy.listen", "no [[clients]]"),
        ("[[clients]]\nname = \"a\"\ntoken_sha256 = \"secret\"\nconnections = \"x\"\n", "clients[0].token_sha256", "SHA-256"),
        (
            "[connectors.x]\ninject = { scheme = \"header\", header = \"X-Key\", value = \"{token}\" }\n",
            "connectors.x.inject.value",
            "not one of the connector's fields",
        ),
        ("[vault]\naddress = \"ftp://vault\"\n", "vault.address", "http"),
        ("[proxy\n", "line 1", "not valid TOML"),
    ] {
        let (code, out) = check(text);
        assert_eq!(code, 64, "expected exit 64 for:\n{text}\ngot: {out}");
        assert!(out.contains(key), "the error should name {key}: {out}");
        assert!(out.contains(why), "the error should say {why:?}: {out}");
    }
}

#[test]
fn serve_refuses_a_bad_config_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "c.toml", "[cache]\nttl = \"soon\"\n");
    let out = latchkey()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cache.ttl"), "{err}");

    let out = latchkey()
        .args(["serve", "--config", "/nonexistent/latchkey.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));

    // No token at all.
    let path = write_file(dir.path(), "ok.toml", "");
    let out = Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .env_remove("VAULT_TOKEN")
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vault.auth"));

    // A token file that is missing or empty: refused as configuration, naming the key.
    let empty = write_file(dir.path(), "empty-token", "\n");
    for file in [dir.path().join("missing-token"), empty] {
        let path = write_file(
            dir.path(),
            "file.toml",
            &format!(
                "[vault.auth]\nmethod = \"token\"\ntoken_file = {:?}\n",
                file.display().to_string()
            ),
        );
        let out = latchkey()
            .env_remove("VAULT_TOKEN")
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert!(
            err.contains("vault.auth.token_file") && err.contains(&file.display().to_string()),
            "{err}"
        );
    }
}

/// A certificate and a key that do not belong together (latchkey's CA, the admin listener's)
/// are refused by `check-config` as by `serve`, exit status 64, naming the key: `check-config`
/// loads them as a start does (it passed them, and `serve` then exited 1).
#[test]
fn a_certificate_and_a_key_that_do_not_belong_together_are_refused_by_check_config_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::support::TestCa::new();
    let ca_cert = ca.pem_path.clone();
    let (leaf, _) = ca.issue(&["127.0.0.1"]);
    let leaf = write_file(dir.path(), "leaf.pem", &leaf);
    let (_, other_key) = crate::support::TestCa::new().issue(&["127.0.0.1"]);
    let other_key = write_file(dir.path(), "other.key", &other_key);
    let cases = [
        (
            format!(
                "[tls]\nca_cert = {:?}\nca_key = {:?}\n",
                ca_cert.display().to_string(),
                other_key.display().to_string()
            ),
            "tls.ca_key",
        ),
        (
            format!(
                "[admin]\ntls_cert = {:?}\ntls_key = {:?}\n",
                leaf.display().to_string(),
                other_key.display().to_string()
            ),
            "admin.tls_key",
        ),
    ];
    for (text, key) in cases {
        let path = write_file(dir.path(), "pair.toml", &text);
        for args in [&["check-config"][..], &["serve", "--config"][..]] {
            let out = latchkey()
                .env("VAULT_TOKEN", "unused")
                .args(args)
                .arg(&path)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{args:?} {key}: {err}");
            assert!(err.contains(key), "{args:?} {key}: {err}");
        }
    }
}

/// An address that is taken is named with its key, and the reason is said once.
#[test]
fn a_listen_address_in_use_is_named_with_its_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (table, key) in [("proxy", "proxy.listen"), ("admin", "admin.listen")] {
        let other = if table == "proxy" { "admin" } else { "proxy" };
        let path = write_file(
            dir.path(),
            "taken.toml",
            &format!(
                "[{table}]\nlisten = \"{addr}\"\n[{other}]\nlisten = \"127.0.0.1:0\"\n\
                 [vault]\naddress = \"http://127.0.0.1:9\"\ntimeout = \"1s\"\n"
            ),
        );
        let out = latchkey()
            .env("VAULT_TOKEN", "unused")
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("latchkey: "))
            .unwrap_or_else(|| panic!("{err}"));
        assert!(
            line.contains(&format!("{key}: cannot listen on {addr}")),
            "{line}"
        );
        assert_eq!(
            line.matches("in use").count(),
            1,
            "the reason said more than once: {line}"
        );
    }
    drop(taken);
}

#[test]
fn hash_token_prints_what_token_sha256_wants() {
    let mut child = latchkey()
        .arg("hash-token")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"abc\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );

    // An empty token (an unset variable) is not hashed...
    for empty in [&b""[..], b"\n", b"  \n"] {
        let mut child = latchkey()
            .arg("hash-token")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(empty).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{empty:?}");
        assert!(out.stdout.is_empty(), "{empty:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("empty"),
            "{empty:?}"
        );
    }

    // ...and its hash, made some other way, is refused where a token's hash goes.
    let dir = tempfile::tempdir().unwrap();
    let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    for (name, toml) in [
        ("admin", format!("[admin]\ntoken_sha256 = \"{empty}\"\n")),
        (
            "clients",
            format!(
                "[[clients]]\nname = \"c\"\ntoken_sha256 = \"{empty}\"\nconnections = [\"*\"]\n"
            ),
        ),
    ] {
        let path = write_file(dir.path(), &format!("{name}.toml"), &toml);
        let out = latchkey().arg("check-config").arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {err}");
        assert!(
            err.contains("token_sha256") && err.contains("empty token"),
            "{name}: {err}"
        );
    }
}

#[tokio::test]
async fn environment_overrides_the_file() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "slow", &format!("http://{}", up.addr()));
    // The file points at a dead Vault and allows a minute per request; VAULT_ADDR and
    // LATCHKEY_PROXY_REQUEST_TIMEOUT override both.
    let mut opts = Opts::loopback()
        .proxy("request_timeout = \"60s\"")
        .env("VAULT_ADDR", &bao.addr)
        .env("LATCHKEY_PROXY_REQUEST_TIMEOUT", "1s")
        // A typo in the section: not applied, and said at start.
        .env("LATCHKEY_PROXYY_REQUEST_TIMEOUT", "2s");
    opts.vault_address = Some(format!("http://127.0.0.1:{}", free_port()));
    let lk = Latchkey::start(&bao, opts).await;
    lk.output_line("the warning about the typo", |l| {
        l.contains("LATCHKEY_PROXYY_REQUEST_TIMEOUT") && l.contains("not a configuration variable")
    })
    .await;
    let r = gateway_get(&lk, "/slow/delay/3000", &[]).await;
    assert_eq!(r.status, 504, "{:?}", r.json);
    assert_eq!(r.latchkey_error.as_deref(), Some("upstream_timeout"));
    let r = gateway_get(&lk, "/slow/fast", &[]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn vault_token_from_a_file_is_reread_when_refused() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "tf", &format!("http://{}", up.addr()));
    let dir = tempfile::tempdir().unwrap();
    let token_file = write_file(dir.path(), "token", "not-the-token\n");
    let opts = Opts::loopback().extra("").env("VAULT_TOKEN", "").env(
        "LATCHKEY_VAULT_AUTH",
        &format!(
            "{{ method = \"token\", token_file = {:?} }}",
            token_file.display().to_string()
        ),
    );
    let lk = Latchkey::start(&bao, opts).await;

    // The file's token is refused: nothing usable is cached, so 503.
    let r = gateway_get(&lk, "/tf/x", &[]).await;
    assert_eq!(r.status, 503, "{:?}", r.json);
    assert_eq!(
        r.latchkey_error.as_deref(),
        Some("secret_store_unavailable")
    );

    // The operator writes the right token; the next refusal makes latchkey re-read the file.
    write_file(dir.path(), "token", &format!("{}\n", bao.token));
    let r = gateway_get(&lk, "/tf/x", &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.header("authorization").unwrap(), format!("Bearer {key}"));
}
