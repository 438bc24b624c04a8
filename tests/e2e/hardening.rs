//! Issue 10's findings that are neither about destinations nor about the tunnel, each a test
//! named after it: what a stored record, a client or an upstream can do to latchkey.

use std::time::Duration;

use crate::support::*;

/// A stored record written by another tool with a field that is a JSON list: that connection
/// cannot be used (500 `connection_invalid`, naming the field), while every other connection,
/// the connection list and `/readyz` go on. (It was 503 `secret_store_unavailable` for the
/// connection and for the whole `GET /v1/connections`, while `/readyz` said ready.)
#[tokio::test]
async fn a_field_stored_as_a_json_list_spoils_only_its_own_connection() {
    let bao = Bao::start().await;
    let up = echo().await;
    let good_key = put_bearer(&bao, "good", &format!("http://{}", up.addr()));
    let r = http()
        .post(format!("{}/v1/secret/data/{}", bao.addr, bao.path("listy")))
        .header("X-Vault-Token", &bao.token)
        .json(&serde_json::json!({ "data": {
            "connector": "generic-bearer",
            "base_url": format!("http://{}", up.addr()),
            "api_key": ["sk-part-one", "sk-part-two"],
        }}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{r:?}");
    let lk = Latchkey::start(&bao, Opts::loopback()).await;

    let r = gateway_get(&lk, "/listy/x", &[]).await;
    assert_eq!(r.status, 500, "{:?}", r.json);
    assert_eq!(r.latchkey_error.as_deref(), Some("connection_invalid"));
    let message = r.json["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("api_key"), "{message}");
    assert!(!message.contains("sk-part"), "{message}");

    let r = gateway_get(&lk, "/good/x", &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {good_key}"))
    );

    let list = http()
        .get(lk.admin_url("/v1/connections"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 200);
    let list: serde_json::Value = list.json().await.unwrap();
    let listy = list["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "listy")
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(listy["status"], "invalid", "{listy}");
    assert_eq!(listy["problem"]["field"], "api_key", "{listy}");
    assert!(!list.to_string().contains("sk-part"), "{list}");

    let ready = http().get(lk.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(up.requests(), 1);
}

/// A request body with a chunk size that overflows is the client's error: 400 `bad_request`,
/// said once. (It was 502 `upstream_unreachable`, with the message twice.) Arriving with its
/// head, such a body is refused before anything is sent (`src/strict.rs`); one that comes later
/// fails the body, which latchkey streams: the upstream has had the head by then.
#[tokio::test]
async fn a_malformed_chunked_request_body_is_the_clients_error() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "chunks", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    for size in ["fffffffffffffffffffff", "zz", "-1"] {
        let r = crate::destination::raw(
            &lk,
            &format!(
                "POST /chunks/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{size}\r\nabc\r\n0\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(r.status, 400, "{size}: {r:?}");
        assert_eq!(r.header("latchkey-error"), Some("bad_request"), "{r:?}");
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            message.starts_with("the request body could not be read")
                || message.starts_with("the request is not strict HTTP/1.1: a chunk"),
            "{message}"
        );
        let said = message.matches("invalid").count();
        assert!(said <= 1, "said more than once: {message}");
    }
}

/// A gateway path climbed out of the base URL's path: `/conn/../x` reached the upstream as
/// `/api/../x`. A dot segment, plain or percent-encoded, or an encoded slash is refused, and
/// nothing is sent (PRODUCT.md 10.1).
#[tokio::test]
async fn a_gateway_path_cannot_climb_out_of_the_base_url_path() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "climb", &format!("http://{}/api", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    for path in [
        "/climb/../admin",
        "/climb/%2e%2e/admin",
        "/climb/.%2E/admin",
        "/climb/v1/%2E%2e",
        "/climb/./admin",
        "/climb/..%2fadmin",
        "/climb/a%2F..%2Fadmin?x=1",
    ] {
        let r = crate::destination::raw(
            &lk,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, 400, "{path}: {r:?}");
        assert_eq!(
            r.header("latchkey-error"),
            Some("bad_request"),
            "{path}: {r:?}"
        );
    }
    // curl sends the path as it is with --path-as-is.
    let (status, text) = curl(&["--path-as-is", &lk.url("/climb/../admin")]).await;
    assert_eq!(status, 400, "{text}");
    assert_eq!(up.requests(), 0);

    // Names that merely hold dots are paths like any other.
    let r = gateway_get(&lk, "/climb/v1/a.b/..c/.well-known", &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.uri(), "/api/v1/a.b/..c/.well-known");
    // An encoded slash inside a name (GitLab's `group%2Fproject`) is a name.
    let r = gateway_get(&lk, "/climb/projects/group%2Fproject", &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.uri(), "/api/projects/group%2Fproject");
}

/// Gateway form: an upstream answering `302 Location: /other-conn/...` made a client that
/// follows redirects send its next request through another connection, with that connection's
/// key. A `Location` is resolved against the upstream URL asked: on the base URL and under its
/// path it becomes `/{connection_id}/...`; on that origin but outside the path, the upstream's
/// absolute URL (reached without latchkey, so without any key); elsewhere, as it was.
#[tokio::test]
async fn a_relative_redirect_never_switches_connections() {
    let bao = Bao::start().await;
    let up = echo().await;
    let origin = format!("http://{}", up.addr());
    put_bearer(&bao, "redir-api", &format!("{origin}/api"));
    put_bearer(&bao, "redir-root", &origin);
    let other_key = put_bearer(&bao, "other-conn", &origin);
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let no_follow = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let location = |id: &'static str, to: &'static str| {
        let no_follow = no_follow.clone();
        let url = lk.url(&format!("/{id}/a/redirect?to={to}"));
        async move {
            let r = no_follow.get(url).send().await.unwrap();
            assert_eq!(r.status(), 302, "{id} {to}");
            r.headers()["location"].to_str().unwrap().to_string()
        }
    };
    // The echo answers /redirect wherever it is asked: /api/a/redirect here.
    assert_eq!(
        location("redir-root", "/other-conn/x").await,
        "/redir-root/other-conn/x"
    );
    assert_eq!(location("redir-api", "/api/v2/x").await, "/redir-api/v2/x");
    assert_eq!(location("redir-api", "next").await, "/redir-api/a/next");
    assert_eq!(
        location("redir-api", "/other-conn/x").await,
        format!("{origin}/other-conn/x")
    );
    assert_eq!(
        location("redir-api", "../../other-conn/x").await,
        format!("{origin}/other-conn/x")
    );
    assert_eq!(
        location("redir-api", "https://elsewhere.example/x").await,
        "https://elsewhere.example/x"
    );

    // httpx follows redirects keeping Proxy-Authorization on the same origin: it stays on the
    // connection it named, and never gets the other connection's key.
    let out = python(
        "import os, httpx\n\
         c = httpx.Client(trust_env=False, follow_redirects=True)\n\
         r = c.get(os.environ['URL'])\n\
         print(r.json()['uri'])\n\
         print(r.text)\n",
        &[("URL", &lk.url("/redir-root/redirect?to=/other-conn/secret"))],
    )
    .await;
    let (uri, body) = out.split_once('\n').unwrap();
    assert_eq!(uri, "/other-conn/secret", "{out}");
    assert!(!body.contains(&other_key), "{body}");
    let lines = lk
        .access_lines(1, |l| l["path"] == "/other-conn/secret")
        .await;
    assert_eq!(lines[0]["connection"], "redir-root", "{lines:?}");
}

/// The open client connections latchkey counts, over all workers.
async fn client_connections(lk: &Latchkey) -> u64 {
    crate::errors::metrics_text(lk)
        .await
        .lines()
        .filter(|l| l.starts_with("latchkey_client_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Issue 10: 4,000 connections that never sent a byte, without a token, held 4,000
/// descriptors for as long as they liked. A client connection with no request in flight and
/// no byte moving for `proxy.idle_timeout` is closed: silent ones, one that stopped half-way
/// through a head, and an idle keep-alive one; a normal request is served meanwhile, and a
/// request in flight longer than the timeout (a slow upstream) is never cut.
#[tokio::test]
async fn silent_sockets_are_closed_after_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SILENT: usize = 4_000;
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "idle", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("idle_timeout = \"2s\"")).await;

    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(tokio::net::TcpStream::connect(lk.proxy).await.unwrap());
    }
    let mut half = tokio::net::TcpStream::connect(lk.proxy).await.unwrap();
    half.write_all(b"GET /idle/x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut kept = tokio::net::TcpStream::connect(lk.proxy).await.unwrap();
    kept.write_all(b"GET /idle/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 4096];
    let n = kept.read(&mut answer).await.unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    let connected = client_connections(&lk).await;

    // Meanwhile: a normal request, and one in flight for longer than the timeout.
    let r = gateway_get(&lk, "/idle/x", &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    let r = gateway_get(&lk, "/idle/delay/3500", &[]).await;
    assert_eq!(r.status, 200, "a request in flight was cut: {:?}", r.json);

    // Every one of them is closed by latchkey: EOF (or a reset), no answer.
    for (i, s) in silent.iter_mut().chain([&mut half, &mut kept]).enumerate() {
        let read = tokio::time::timeout(Duration::from_secs(30), s.read(&mut answer)).await;
        match read {
            Ok(Ok(0)) => {}
            Ok(Err(e)) => panic!("socket {i} was reset, not closed: {e}"),
            Ok(Ok(n)) => panic!(
                "socket {i} got an answer: {:?}",
                String::from_utf8_lossy(&answer[..n])
            ),
            Err(_) => panic!("socket {i} is still open 30 s on"),
        }
    }
    wait_until(
        "latchkey counts them closed",
        Duration::from_secs(30),
        || async { (client_connections(&lk).await == 0).then_some(()) },
    )
    .await;
    eprintln!("client connections counted while the silent sockets were open: {connected}");
}

/// Look-alike credential names (`X_Api_Key`, `key[]=`, `key;x=`) passed next to ours, and
/// servers that map `_` to `-` (CGI, WSGI, Rack) or read arrays and `;` read them as ours.
#[tokio::test]
async fn look_alike_credential_names_do_not_pass_next_to_ours() {
    let bao = Bao::start().await;
    let up = echo().await;
    let base = format!("http://{}", up.addr());
    bao.put(
        "looks",
        &[
            ("connector", "anthropic"),
            ("base_url", &base),
            ("api_key", "sk-ant-looks-ours"),
        ],
    );
    bao.put(
        "looks-q",
        &[
            ("connector", "google-maps"),
            ("base_url", &base),
            ("api_key", "AIzaLooksOurs"),
        ],
    );
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let (status, text) = curl(&[
        "-H",
        "X_Api_Key: theirs-underscore",
        "-H",
        "x-api_key: theirs-mixed",
        &lk.url("/looks/v1/messages"),
    ])
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(!text.contains("theirs-"), "{text}");
    let r = gateway_get(
        &lk,
        "/looks-q/geo?key[]=theirs1&key%5B0%5D=theirs2&key;x=theirs3&q=1",
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert!(!r.uri().contains("theirs"), "{}", r.uri());
    assert_eq!(
        r.uri().matches("key=AIzaLooksOurs").count(),
        1,
        "{}",
        r.uri()
    );
}

/// Issue 10: a client granted `acme-*` could make latchkey read Vault once for every ID it
/// invented (the negative cache helps only with IDs asked before). Vault reads that find
/// nothing are limited per client (`cache.miss_rate`, `cache.miss_burst`): past the burst the
/// client gets `429 too_many_misses` and Vault is not read, while a connection the cache holds
/// keeps working for it, and another client is not limited.
#[tokio::test]
async fn a_client_inventing_connection_ids_cannot_make_latchkey_read_vault_without_bound() {
    const BURST: usize = 5;
    const INVENTED: usize = 40;
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "acme-known", &format!("http://{}", up.addr()));
    let (mallory, alice) = ("mallory-token-0123456789", "alice-token-0123456789");
    let lk = Latchkey::start(
        &bao,
        Opts::loopback().extra(&format!(
            // One miss per 1,000 s after the burst: no refill within the test.
            "[cache]\nmiss_rate = 0.001\nmiss_burst = {BURST}\n\n\
             [[clients]]\nname = \"mallory\"\ntoken_sha256 = \"{}\"\nconnections = [\"acme-*\"]\n\n\
             [[clients]]\nname = \"alice\"\ntoken_sha256 = \"{}\"\nconnections = [\"acme-*\"]\n",
            latchkey::auth::sha256_hex(mallory),
            latchkey::auth::sha256_hex(alice),
        )),
    )
    .await;
    let as_client = |token: &'static str, path: String| {
        let url = lk.url(&path);
        async move {
            read(
                http()
                    .get(url)
                    .header("Proxy-Authorization", format!("Bearer {token}"))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };

    // The known connection, read once and cached.
    let r = as_client(mallory, "/acme-known/x".into()).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(bao.reads_of("acme-known"), 1);

    let mut not_found = 0;
    let mut limited = 0;
    for i in 0..INVENTED {
        let id = format!("acme-invented-{i}");
        let r = as_client(mallory, format!("/{id}/x")).await;
        match r.status {
            404 => {
                not_found += 1;
                assert_eq!(bao.reads_of(&id), 1, "{id}");
            }
            429 => {
                limited += 1;
                assert_eq!(r.latchkey_error.as_deref(), Some("too_many_misses"));
                assert_eq!(r.error_code(), Some("too_many_misses"));
                assert_eq!(bao.reads_of(&id), 0, "{id} was read from Vault after a 429");
            }
            other => panic!("{id}: {other} {:?}", r.json),
        }
        if i % 10 == 0 {
            // The connection the cache holds keeps working for the same client meanwhile.
            let r = as_client(mallory, "/acme-known/x".into()).await;
            assert_eq!(r.status, 200, "{:?}", r.json);
        }
    }
    assert_eq!(
        not_found, BURST,
        "Vault reads for invented IDs did not stop"
    );
    assert_eq!(limited, INVENTED - BURST);
    let reads: usize = (0..INVENTED)
        .map(|i| bao.reads_of(&format!("acme-invented-{i}")))
        .sum();
    assert_eq!(reads, BURST);
    assert_eq!(bao.reads_of("acme-known"), 1);

    // Another client is not limited: its unknown ID is read, and is a 404.
    let r = as_client(alice, "/acme-alices-own/x".into()).await;
    assert_eq!(r.status, 404, "{:?}", r.json);
    assert_eq!(bao.reads_of("acme-alices-own"), 1);

    let line = lk.access_line(|l| l["error"] == "too_many_misses").await;
    assert_eq!(line["client"], "mallory", "{line}");
    assert_eq!(line["status"], 429, "{line}");
}

/// Issue 10: a client sending its request head one byte at a time (slowloris) moves bytes, so
/// the idle timeout never closes it; `proxy.header_read_timeout` (default 10 s; it was a fixed
/// 30 s) bounds the whole head. The connection is closed long before the head would be done,
/// and a normal request is served meanwhile.
#[tokio::test]
async fn a_slowloris_head_is_cut_at_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // At one byte per 200 ms, the head takes 20 s: within the old fixed 30 s, it was read to
    // its end and answered.
    const SLOW_BYTES: usize = 100;
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "slow", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("header_read_timeout = \"1s\"")).await;

    let mut slow = tokio::net::TcpStream::connect(lk.proxy).await.unwrap();
    slow.write_all(b"GET /slow/x HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut answer = [0u8; 1024];
    let mut sent = 0;
    let cut = loop {
        if sent == SLOW_BYTES {
            break false;
        }
        // The read's time limit paces the bytes; it is not what the test asserts.
        match tokio::time::timeout(Duration::from_millis(200), slow.read(&mut answer)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => panic!(
                "the slow head got an answer: {:?}",
                String::from_utf8_lossy(&answer[..n])
            ),
        }
        if slow.write_all(b"a").await.is_err() {
            break true;
        }
        sent += 1;
        if sent == 2 {
            // Meanwhile a normal request is served.
            let r = gateway_get(&lk, "/slow/x", &[]).await;
            assert_eq!(r.status, 200, "{:?}", r.json);
        }
    };
    assert!(
        cut,
        "latchkey read a {SLOW_BYTES}-byte slow header to its end"
    );
    assert!(sent < SLOW_BYTES);
    assert_eq!(up.requests(), 1, "the slow request reached the upstream");
}

/// A burst of new connections while latchkey is not accepting (a frozen process stands for a
/// busy accept loop) is held by the kernel up to the listener's backlog, not cut at the
/// standard library's 128, where each connection over it waits a second for its SYN to be
/// sent again.
#[tokio::test]
async fn a_burst_of_new_connections_fits_in_the_listen_backlog() {
    const BURST: usize = 600;
    let bao = Bao::start().await;
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    lk.freeze().await;
    let connects: Vec<_> = (0..BURST)
        .map(|_| {
            let addr = lk.proxy;
            tokio::spawn(async move {
                // Within the second after which a dropped SYN would be sent again.
                tokio::time::timeout(
                    Duration::from_millis(700),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
            })
        })
        .collect();
    let mut held = Vec::new();
    for c in connects {
        if let Ok(Ok(stream)) = c.await.unwrap() {
            held.push(stream);
        }
    }
    lk.thaw();
    assert_eq!(held.len(), BURST, "connections completed by the kernel");
    drop(held);
    // Thawed, it takes them and serves as before.
    let r = crate::errors::send(http().get(lk.admin_url("/healthz"))).await;
    assert_eq!(r.status, 200, "{r:#?}");
}
