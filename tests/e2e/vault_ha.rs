//! Vault as several nodes: `vault.address` lists them; a node listed first that is down does not
//! stop latchkey, and calls stay on the node that answered; `vault.namespace` reaches Vault as
//! `X-Vault-Namespace`; and a redirect from a node is never followed with the token.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// The value of the `Authorization` header that reached the echo upstream.
fn injected(r: &Echoed) -> String {
    r.header("authorization").unwrap_or_default()
}

/// `latchkey_vault_requests_total{outcome="error"}`, over every operation.
async fn failed_vault_calls(lk: &Latchkey) -> f64 {
    let text = http()
        .get(lk.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("latchkey_vault_requests_total{") && l.contains("outcome=\"error\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn ready(lk: &Latchkey) -> (u16, serde_json::Value) {
    let r = http().get(lk.admin_url("/readyz")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

#[tokio::test]
async fn vault_namespace_is_sent_with_every_request() {
    let bao = Bao::start().await;
    let ns = format!("ns-{}", bao.prefix.replace('/', "-"));
    let vault = http();
    let call = |method: reqwest::Method, path: &str, namespace: Option<&str>| {
        let mut req = vault
            .request(method, format!("{}/v1/{path}", bao.addr))
            .header("X-Vault-Token", &bao.token);
        if let Some(ns) = namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        req
    };
    let r = call(reqwest::Method::POST, &format!("sys/namespaces/{ns}"), None)
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "create the namespace: {}",
        r.status()
    );
    let r = call(reqwest::Method::POST, "sys/mounts/secret", Some(&ns))
        .json(&json!({"type": "kv", "options": {"version": "2"}}))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "mount KV in the namespace: {}",
        r.status()
    );
    let up = echo().await;
    let key = format!("key-ns-{}", free_port());
    bao.secrets.add(key.clone());
    let stored = wait_until(
        "the write in the namespace",
        Duration::from_secs(10),
        || {
            let put = call(
                reqwest::Method::POST,
                &format!("secret/data/{}", bao.path("in-ns")),
                Some(&ns),
            )
            .json(&json!({"data": {
                "connector": "generic-bearer",
                "base_url": format!("http://{}", up.addr()),
                "api_key": key,
            }}))
            .send();
            async move { put.await.ok().filter(|r| r.status().is_success()) }
        },
    )
    .await;
    assert!(stored.status().is_success());

    // Through `vault.namespace` and through VAULT_NAMESPACE.
    for opts in [
        Opts::loopback().vault(&format!("namespace = {ns:?}")),
        Opts::loopback().env("VAULT_NAMESPACE", &ns),
    ] {
        let lk = Latchkey::start(&bao, opts).await;
        let r = gateway_get(&lk, "/in-ns/v1/x", &[]).await;
        assert_eq!(injected(&r), format!("Bearer {key}"), "{:?}", r.json);
    }
    // Without it, the same path in the root namespace holds nothing.
    let lk = Latchkey::start(&bao, Opts::loopback()).await;
    let r = gateway_get(&lk, "/in-ns/v1/x", &[]).await;
    assert_eq!(r.status, 404, "{:?}", r.json);
}

/// A loopback server that answers every request with `response`, counting connections and
/// keeping what it was sent.
async fn canned(response: String) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (count, seen) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let (c, s) = (count.clone(), seen.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::Relaxed);
            let (response, seen) = (response.clone(), s.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                seen.lock().unwrap().extend_from_slice(&head);
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), count, seen)
}

#[tokio::test]
async fn a_redirect_from_a_vault_node_moves_to_the_next_node_and_never_carries_the_token() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "redirected", &format!("http://{}", up.addr()));
    // Where a node would send the token if latchkey followed its redirect.
    let (elsewhere, reached, _) = canned(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
            .to_string(),
    )
    .await;
    let (redirector, asked, sent) = canned(format!(
        "HTTP/1.1 307 Temporary Redirect\r\nLocation: {elsewhere}/v1/secret/data/x\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    ))
    .await;
    let lk = Latchkey::start(
        &bao,
        Opts {
            vault_addresses: vec![redirector, bao.addr.clone()],
            ..Opts::loopback()
        },
    )
    .await;
    let r = gateway_get(&lk, "/redirected/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {key}"), "{:?}", r.json);
    assert!(
        asked.load(Ordering::Relaxed) >= 1,
        "the redirecting node was never asked"
    );
    // The redirecting node did get the token (it is listed): the test is that nothing else did.
    assert!(String::from_utf8_lossy(&sent.lock().unwrap()).contains(&bao.token));
    assert_eq!(
        reached.load(Ordering::Relaxed),
        0,
        "a redirect was followed"
    );
}

#[tokio::test]
async fn a_node_listed_first_that_is_down_at_start_does_not_stop_latchkey() {
    let bao = Bao::start().await;
    let up = echo().await;
    let key = put_bearer(&bao, "second-node", &format!("http://{}", up.addr()));
    let dead = format!("http://127.0.0.1:{}", free_port());
    let lk = Latchkey::start(
        &bao,
        Opts {
            vault_addresses: vec![dead.clone(), bao.addr.clone()],
            ..Opts::loopback()
        },
    )
    .await;
    let (status, body) = ready(&lk).await;
    assert_eq!(status, 200, "{body}");
    let r = gateway_get(&lk, "/second-node/v1/x", &[]).await;
    assert_eq!(injected(&r), format!("Bearer {key}"), "{:?}", r.json);
    assert!(
        lk.output().contains("Vault calls now go to this node"),
        "no switch to the second node was logged"
    );
    // Sticky: the dead node is not tried again while the second answers.
    let failed = failed_vault_calls(&lk).await;
    assert!(failed >= 1.0, "the dead node was never tried");
    for i in 0..5 {
        let r = gateway_get(&lk, &format!("/not-stored-{i}/v1/x"), &[]).await;
        assert_eq!(r.status, 404, "{:?}", r.json);
    }
    assert_eq!(failed_vault_calls(&lk).await, failed);

    // Every node down: the reason names them all.
    let lk = Latchkey::start(
        &bao,
        Opts {
            vault_addresses: vec![dead.clone(), format!("http://127.0.0.1:{}", free_port())],
            ..Opts::loopback()
        },
    )
    .await;
    let (status, body) = ready(&lk).await;
    assert_eq!(status, 503, "{body}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&dead) && reason.contains(", "), "{reason}");
}
