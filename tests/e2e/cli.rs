//! `latchkey connections add|list|show|rotate|verify|delete`, run as the real binary against a
//! real latchkey's admin API. Secret values go in on standard input (or a hidden prompt on a
//! terminal), never on the command line; the address comes from `--url` or `LATCHKEY_API_URL`,
//! the token from `LATCHKEY_API_TOKEN` or `--token-file`.
//!
//! The binary runs under `tokio::process`, so that the simulated service on the test's runtime
//! keeps answering latchkey's verification calls meanwhile.

use std::process::Stdio;

use reqwest::Method;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::lifecycle::{assert_masked, World};
use crate::service_sim::KeyState;
use crate::support::*;

/// What one run of the CLI did.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs `latchkey connections {args}` with `stdin` (None: no standard input at all) and the
/// environment `env` on top of a clean one.
pub(crate) async fn run(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"));
    cmd.arg("connections")
        .args(args)
        .env_remove("LATCHKEY_API_URL")
        .env_remove("LATCHKEY_API_TOKEN")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the CLI did not finish within 60s")
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the CLI against `w`'s admin API, address and token from the environment; checks that
/// what it printed holds no secret.
async fn cli(w: &World, args: &[&str], stdin: Option<&str>) -> Run {
    let url = w.lk.admin_url("");
    let r = run(
        args,
        stdin,
        &[
            ("LATCHKEY_API_URL", url.as_str()),
            ("LATCHKEY_API_TOKEN", ADMIN_TOKEN),
        ],
    )
    .await;
    w.assert_clean("the CLI's output", &r.stdout);
    w.assert_clean("the CLI's errors", &r.stderr);
    r
}

#[tokio::test]
async fn add_reads_the_key_from_standard_input_never_from_the_command_line() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    let base = w.sim.base_url();
    let add = [
        "add",
        "cli-stripe",
        "--connector",
        "stripe",
        "--environment",
        "sandbox",
        "--base-url",
        &base,
        "--name",
        "Stripe - CLI",
    ];
    // As `pbpaste | latchkey connections add ...` sends it: with a trailing newline.
    let r = cli(&w, &add, Some(&format!("{key}\n"))).await;
    assert_eq!(r.code, 0, "{r:#?}");
    assert!(r.stdout.contains("api_key = (set)"), "{r:#?}");
    assert!(r.stdout.contains("active"), "{r:#?}");
    assert!(r.stdout.contains("trailing newline"), "the notice: {r:#?}");
    assert!(r.stdout.contains("verification verified"), "{r:#?}");
    assert_eq!(w.stored("cli-stripe")["api_key"], key.as_str());
    assert_eq!(w.stored("cli-stripe")["name"], "Stripe - CLI");
    let a = w.call("cli-stripe", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &key);

    // A secret on the command line is refused before anything is sent.
    let other = w.key(KeyState::ReadWrite);
    let field = format!("api_key={other}");
    let mut args = add.to_vec();
    args[1] = "cli-argv";
    args.extend(["--field", &field]);
    let r = run(
        &args,
        Some(""),
        &[
            ("LATCHKEY_API_URL", w.lk.admin_url("").as_str()),
            ("LATCHKEY_API_TOKEN", ADMIN_TOKEN),
        ],
    )
    .await;
    assert_eq!(r.code, 2, "{r:#?}");
    assert!(r.stderr.contains("standard input"), "{r:#?}");
    assert!(!r.stderr.contains(&other) && !r.stdout.contains(&other));
    assert!(w.bao.get("cli-argv").is_none());
    assert_eq!(w.sim.uses_of(&other), 0);

    // A key that fails verification: exit 1, what failed and what to check.
    let bad = w.unknown_key();
    let mut args = add.to_vec();
    args[1] = "cli-bad";
    let r = cli(&w, &args, Some(&bad)).await;
    assert_eq!(r.code, 1, "{r:#?}");
    assert!(r.stdout.contains("error (422)"), "{r:#?}");
    assert!(r.stdout.contains("key_rejected"), "{r:#?}");
    assert!(r.stdout.contains("hint"), "{r:#?}");
    assert!(w.bao.get("cli-bad").is_none());

    // A sandbox key for production: refused, naming the field.
    let mut args = add.to_vec();
    args[1] = "cli-prod";
    args[5] = "production";
    let r = cli(&w, &args, Some(&w.key(KeyState::ReadWrite))).await;
    assert_eq!(r.code, 1, "{r:#?}");
    assert!(r.stdout.contains("field: api_key"), "{r:#?}");
    assert!(w.bao.get("cli-prod").is_none());
}

#[tokio::test]
async fn list_show_verify_rotate_and_delete_through_the_cli() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("cli-conn", &key).await;

    let r = cli(&w, &["list"], None).await;
    assert_eq!(r.code, 0, "{r:#?}");
    let row = r
        .stdout
        .lines()
        .find(|l| l.starts_with("cli-conn "))
        .unwrap_or_else(|| panic!("no row: {r:#?}"));
    for col in ["stripe", "sandbox", "active", "Stripe - cli-conn"] {
        assert!(row.contains(col), "{col} in {row:?}");
    }
    let r = cli(&w, &["--json", "list"], None).await;
    assert_eq!(r.code, 0, "{r:#?}");
    assert_masked(&r.json()["connections"][0]);

    let r = cli(&w, &["show", "cli-conn"], None).await;
    assert_eq!(r.code, 0, "{r:#?}");
    assert!(r.stdout.contains("api_key = (set)"), "{r:#?}");
    assert!(r.stdout.contains("status       active"), "{r:#?}");
    let r = cli(&w, &["show", "cli-conn", "--json"], None).await;
    assert_masked(&r.json()["connection"]);

    let r = cli(&w, &["verify", "cli-conn"], None).await;
    assert_eq!(r.code, 0, "{r:#?}");
    assert!(r.stdout.contains("verification verified"), "{r:#?}");

    // Rotation to a key the service rejects: exit 1, the old key stays.
    let rejected = w.unknown_key();
    let r = cli(&w, &["rotate", "cli-conn"], Some(&rejected)).await;
    assert_eq!(r.code, 1, "{r:#?}");
    assert!(r.stdout.contains("key_rejected"), "{r:#?}");
    let a = w.call("cli-conn", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &key);

    // Rotation to a good one: used by the next request.
    let new = w.key(KeyState::ReadWrite);
    let r = cli(&w, &["rotate", "cli-conn"], Some(&format!("{new}\n"))).await;
    assert_eq!(r.code, 0, "{r:#?}");
    assert!(r.stdout.contains("version      2"), "{r:#?}");
    let a = w.call("cli-conn", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &new);
    let r = cli(&w, &["rotate", "cli-conn", "--field", "name"], Some(&new)).await;
    assert_eq!(r.code, 2, "not a secret field: {r:#?}");

    let r = cli(&w, &["delete", "cli-conn"], None).await;
    assert_eq!(r.code, 0, "{r:#?}");
    assert!(r.stdout.contains("deleted"), "{r:#?}");
    let a = w.call("cli-conn", Method::GET, "/v1/charges").await;
    a.assert_error(404, "connection_not_found");
    assert!(w.bao.get("cli-conn").is_none());

    for args in [
        &["show", "cli-conn"][..],
        &["delete", "cli-conn"],
        &["verify", "cli-conn"],
    ] {
        let r = cli(&w, args, None).await;
        assert_eq!(r.code, 1, "{args:?}: {r:#?}");
        assert!(r.stdout.contains("error (404)"), "{args:?}: {r:#?}");
    }
    let r = cli(&w, &["rotate", "cli-conn"], Some(&new)).await;
    assert_eq!(r.code, 1, "{r:#?}");
}

#[tokio::test]
async fn verify_exits_nonzero_when_the_key_is_rejected() {
    // `latchkey connections verify x && deploy` must not deploy on a dead key.
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("cli-dead", &key).await;
    w.sim.revoke(&key);
    let r = cli(&w, &["verify", "cli-dead"], None).await;
    assert!(r.stdout.contains("key_rejected"), "{r:#?}");
    assert_eq!(w.show("cli-dead").await["status"], "failed");
    assert_ne!(r.code, 0, "verify exited 0 on a rejected key: {r:#?}");
}

#[tokio::test]
async fn the_address_and_token_come_from_flags_or_the_environment() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("cli-auth", &key).await;
    let url = w.lk.admin_url("");
    let dead = format!("http://127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let token_file = write_file(dir.path(), "token", &format!("{ADMIN_TOKEN}\n"));
    let token_file = token_file.to_str().unwrap();

    // --url and --token-file, with the environment pointing elsewhere.
    let r = run(
        &["--url", &url, "--token-file", token_file, "list"],
        None,
        &[("LATCHKEY_API_URL", &dead)],
    )
    .await;
    assert_eq!(r.code, 0, "{r:#?}");
    assert!(r.stdout.contains("cli-auth"), "{r:#?}");

    // The environment alone.
    let r = run(
        &["list"],
        None,
        &[
            ("LATCHKEY_API_URL", &url),
            ("LATCHKEY_API_TOKEN", ADMIN_TOKEN),
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{r:#?}");
    assert!(r.stdout.contains("cli-auth"), "{r:#?}");

    // No token, or an empty one: refused before any call, saying where the token comes from.
    let r = run(&["list"], None, &[("LATCHKEY_API_URL", &url)]).await;
    assert_eq!(r.code, 2, "{r:#?}");
    assert!(r.stderr.contains("LATCHKEY_API_TOKEN"), "{r:#?}");
    let r = run(
        &["list"],
        None,
        &[("LATCHKEY_API_URL", &url), ("LATCHKEY_API_TOKEN", " ")],
    )
    .await;
    assert_eq!(r.code, 2, "{r:#?}");
    assert!(r.stderr.contains("empty"), "{r:#?}");

    // An ID that is not one (it goes into the URL's path) is refused here, whatever it names.
    for bad in ["no-such/../cli-auth", "../x", "a b"] {
        let r = run(
            &["show", bad],
            None,
            &[
                ("LATCHKEY_API_URL", &url),
                ("LATCHKEY_API_TOKEN", ADMIN_TOKEN),
            ],
        )
        .await;
        assert_eq!(r.code, 2, "{bad}: {r:#?}");
        assert!(r.stderr.contains("bad connection ID"), "{bad}: {r:#?}");
        assert!(!r.stdout.contains("cli-auth"), "{bad}: {r:#?}");
    }

    // Text stored in Vault with a terminal escape (the API refuses one; Vault does not) is
    // shown escaped, never sent to the terminal.
    w.bao.put(
        "cli-escape",
        &[
            ("connector", "generic-bearer"),
            ("base_url", "http://127.0.0.1:1"),
            ("api_key", "cli_escape_key_0123456789"),
            ("name", "plain \u{1b}[2J name"),
        ],
    );
    for args in [&["show", "cli-escape"][..], &["list"]] {
        let r = run(
            args,
            None,
            &[
                ("LATCHKEY_API_URL", &url),
                ("LATCHKEY_API_TOKEN", ADMIN_TOKEN),
            ],
        )
        .await;
        assert_eq!(r.code, 0, "{args:?}: {r:#?}");
        assert!(r.stdout.contains("cli-escape"), "{args:?}: {r:#?}");
        assert!(!r.stdout.contains('\u{1b}'), "{args:?}: {r:#?}");
    }
    // A wrong token: the API's 401.
    let r = run(
        &["show", "cli-auth"],
        None,
        &[("LATCHKEY_API_URL", &url), ("LATCHKEY_API_TOKEN", "wrong")],
    )
    .await;
    assert_eq!(r.code, 1, "{r:#?}");
    assert!(r.stdout.contains("error (401)"), "{r:#?}");
    // Nothing listening.
    let r = run(
        &["list"],
        None,
        &[
            ("LATCHKEY_API_URL", &dead),
            ("LATCHKEY_API_TOKEN", ADMIN_TOKEN),
        ],
    )
    .await;
    assert_eq!(r.code, 2, "{r:#?}");
    assert!(
        r.stderr.contains("cannot reach the admin listener"),
        "{r:#?}"
    );
    // A wrong token never gets as far as deleting.
    let r = run(
        &["delete", "cli-auth"],
        None,
        &[("LATCHKEY_API_URL", &url), ("LATCHKEY_API_TOKEN", "wrong")],
    )
    .await;
    assert_eq!(r.code, 1, "{r:#?}");
    assert!(w.bao.get("cli-auth").is_some());
}

/// Runs the CLI on a pseudo-terminal; types `KEY` once the prompt shows and echo is off.
/// Prints everything the terminal showed, then `EXIT {code}`.
const ON_A_TERMINAL: &str = r#"
import os, pty, select, sys, termios, time
argv = sys.argv[1:]
pid, fd = pty.fork()
if pid == 0:
    os.execv(argv[0], argv)
out = b""
deadline = time.time() + 30
def pump(until):
    global out
    while time.time() < deadline and not until():
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                return False
            if not chunk:
                return False
            out += chunk
    return until()
if not pump(lambda: b"(api_key): " in out):
    sys.stdout.write(out.decode(errors="replace") + "\nNO PROMPT\n")
    sys.exit(3)
while time.time() < deadline and termios.tcgetattr(fd)[3] & termios.ECHO:
    time.sleep(0.01)
os.write(fd, os.environ["KEY"].encode() + b"\n")
pump(lambda: False)
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
sys.stdout.write("\nEXIT %d\n" % os.waitstatus_to_exitcode(status))
"#;

#[tokio::test]
async fn on_a_terminal_the_key_is_read_from_a_hidden_prompt() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    let base = w.sim.base_url();
    let url = w.lk.admin_url("");
    let out = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(ON_A_TERMINAL)
        .args([
            env!("CARGO_BIN_EXE_latchkey"),
            "connections",
            "add",
            "cli-tty",
            "--connector",
            "stripe",
            "--environment",
            "sandbox",
            "--base-url",
            &base,
        ])
        .env("KEY", &key)
        .env("LATCHKEY_API_URL", &url)
        .env("LATCHKEY_API_TOKEN", ADMIN_TOKEN)
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .output()
        .await
        .expect("python3 is needed");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        shown.contains("Secret key (api_key): "),
        "the prompt names the field: {shown}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Hidden: the terminal never showed what was typed.
    w.assert_clean("the terminal", &shown);
    assert!(shown.contains("EXIT 0"), "{shown}");
    assert!(shown.contains("verification verified"), "{shown}");
    assert_eq!(w.stored("cli-tty")["api_key"], key.as_str());
    let a = w.call("cli-tty", Method::GET, "/v1/charges").await;
    w.assert_injected(&a, &key);
}

/// An admin listener that accepts connections and never answers (a wedged port-forward) is
/// given up on after `--timeout`, with exit status 2 from `connections` and a failure from
/// `env` and `run`, each saying so; none waits for ever.
#[tokio::test]
async fn an_admin_listener_that_never_answers_is_given_up_on() {
    // Never accepted: the kernel completes each connection, nobody reads it.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", hole.local_addr().unwrap());
    let r = run(
        &["--timeout", "1", "list"],
        None,
        &[
            ("LATCHKEY_API_URL", &url),
            ("LATCHKEY_API_TOKEN", ADMIN_TOKEN),
        ],
    )
    .await;
    assert_eq!(r.code, 2, "{r:#?}");
    assert!(
        r.stderr.contains(&format!(
            "the admin listener at {url} did not answer within 1s"
        )),
        "{r:#?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    let common = [
        "--admin",
        &url,
        "--timeout",
        "1",
        "--ca-bundle",
        bundle.to_str().unwrap(),
    ];
    for command in [&["env"][..], &["run", "--", "true"][..]] {
        let (sub, rest) = command.split_first().unwrap();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
            .arg(sub)
            .args(common)
            .args(rest)
            .env_remove("LATCHKEY_TOKEN")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(std::time::Duration::from_secs(60), out)
            .await
            .unwrap_or_else(|_| panic!("latchkey {sub} waited for ever"))
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sub}: {stderr}");
        assert!(
            stderr.contains("did not answer within 1s"),
            "{sub}: {stderr}"
        );
        assert!(!bundle.exists(), "{sub} wrote a bundle");
    }
    drop(hole);
}

/// `show` of a connection latchkey cannot use says why, as the API does: the field and the
/// reason, in the text output too.
#[tokio::test]
async fn show_says_why_an_invalid_connection_cannot_be_used() {
    let w = World::start(Opts::loopback()).await;
    let key = w.fresh();
    w.bao.put("no-connector", &[("api_key", &key)]);
    let r = cli(&w, &["show", "no-connector"], None).await;
    assert_eq!(r.code, 0, "{r:#?}");
    assert!(r.stdout.contains("status       invalid"), "{r:#?}");
    let problem = r
        .stdout
        .lines()
        .find(|l| l.starts_with("problem      "))
        .unwrap_or_else(|| panic!("no problem line: {r:#?}"));
    assert!(problem.contains("connector"), "{problem}");
}

/// A reader that stops reading (`latchkey connections list | head -1`) is no failure: exit
/// status 0 and nothing on standard error, not 2, which says the API could not be reached.
#[tokio::test]
async fn a_reader_that_went_away_is_no_failure() {
    let w = World::start(Opts::loopback()).await;
    let (reader, writer) = std::io::pipe().unwrap();
    // Gone before the CLI writes a byte: its first write fails with EPIPE.
    drop(reader);
    let url = w.lk.admin_url("");
    // Spawned, not `output()`, which would give the child a standard output of its own.
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["connections", "list"])
        .env("LATCHKEY_API_URL", &url)
        .env("LATCHKEY_API_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = child.wait_with_output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), out)
        .await
        .expect("the CLI did not finish within 60s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "");
}

/// `--url` naming a server that is not latchkey's admin listener: exit status 1 and a message
/// that says so, with what the server sent, instead of an empty one.
#[tokio::test]
async fn a_url_that_is_not_the_admin_api_is_said_to_be_so() {
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", other.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut s, _)) = other.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let page = "<html><body>Not Found</body></html>";
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                        page.len()
                    )
                    .as_bytes(),
                )
                .await;
        }
    });
    let env = [
        ("LATCHKEY_API_URL", url.as_str()),
        ("LATCHKEY_API_TOKEN", ADMIN_TOKEN),
    ];
    for args in [&["list"][..], &["show", "x"][..]] {
        let r = run(args, None, &env).await;
        assert_eq!(r.code, 1, "{args:?}: {r:#?}");
        assert!(
            r.stdout
                .contains("error (404): this is not an answer of latchkey's admin API")
                && r.stdout.contains("Not Found"),
            "{args:?}: {r:#?}"
        );
    }
    // `add` asks for the catalog first.
    let r = run(
        &["add", "x", "--connector", "stripe"],
        Some("sk_test_1\n"),
        &env,
    )
    .await;
    assert_ne!(r.code, 0, "{r:#?}");
    assert!(
        r.stderr.contains("not an answer of latchkey's admin API"),
        "{r:#?}"
    );
}

/// `edit` changes what its flags name and nothing else (the reference's "edit" and "expiry"):
/// a name and an expiry, then the expiry cleared; a secret field given on the command line is
/// refused without a call and without repeating it; no flag at all is refused.
#[tokio::test]
async fn edit_changes_the_name_and_expiry_and_never_takes_a_secret_from_the_command_line() {
    let w = World::start(Opts::loopback()).await;
    let key = w.key(KeyState::ReadWrite);
    w.create_ok("cli-edit", &key).await;
    let version = w.show("cli-edit").await["version"].clone();

    let r = cli(
        &w,
        &[
            "edit",
            "cli-edit",
            "--name",
            "Payments, renamed",
            "--expires-at",
            "2031-05-01T00:00:00Z",
        ],
        None,
    )
    .await;
    assert_eq!(r.code, 0, "{r:#?}");
    assert!(r.stdout.contains("Payments, renamed"), "{r:#?}");
    let shown = w.show("cli-edit").await;
    assert_eq!(shown["name"], "Payments, renamed", "{shown:#}");
    assert_eq!(shown["expires_at"], "2031-05-01T00:00:00Z", "{shown:#}");
    assert_eq!(shown["environment"], "sandbox", "{shown:#}");
    assert_ne!(shown["version"], version, "{shown:#}");

    let r = cli(&w, &["edit", "cli-edit", "--clear", "expires_at"], None).await;
    assert_eq!(r.code, 0, "{r:#?}");
    let shown = w.show("cli-edit").await;
    assert_eq!(shown["expires_at"], Value::Null, "{shown:#}");
    assert_eq!(shown["name"], "Payments, renamed", "{shown:#}");

    let pasted = format!("sk_test_{}", w.fresh());
    w.secret(&pasted);
    let r = cli(
        &w,
        &["edit", "cli-edit", "--field", &format!("api_key={pasted}")],
        None,
    )
    .await;
    assert_eq!(r.code, 2, "{r:#?}");
    assert!(r.stderr.contains("api_key is secret"), "{r:#?}");
    assert_eq!(w.show("cli-edit").await["version"], shown["version"]);

    // A name mistyped, or not a field at all: refused, and no new version written.
    for name in ["expiry", "connector"] {
        let r = cli(&w, &["edit", "cli-edit", "--clear", name], None).await;
        assert_eq!(r.code, 1, "{name}: {r:#?}");
        assert!(
            r.stdout.contains("error (422)") && r.stdout.contains("is not set"),
            "{name}: {r:#?}"
        );
    }
    assert_eq!(w.show("cli-edit").await["version"], shown["version"]);

    let r = cli(&w, &["edit", "cli-edit"], None).await;
    assert_eq!(r.code, 2, "{r:#?}");
    assert!(r.stderr.contains("nothing to change"), "{r:#?}");
    let r = cli(&w, &["edit", "cli-none", "--name", "x"], None).await;
    assert_eq!(r.code, 1, "{r:#?}");
    assert!(r.stdout.contains("error (404)"), "{r:#?}");
}
