//! Client connections are spread over the proxy workers: each new one is served by a worker
//! serving the fewest, so a client that opens its keep-alive connections at once keeps every
//! worker busy instead of one. `latchkey_client_connections{worker}` shows the spread. At
//! shutdown the workers finish what they were given before they stop.

use std::time::Duration;

use std::collections::BTreeMap;

use crate::errors::metrics_text;
use crate::lifecycle::eventually;
use crate::support::*;

/// `latchkey_client_connections` by worker.
async fn per_worker(lk: &Latchkey) -> BTreeMap<String, f64> {
    metrics_text(lk)
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("latchkey_client_connections{worker=\""))
        .filter_map(|rest| {
            let (worker, value) = rest.split_once("\"} ")?;
            Some((worker.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn connections_are_spread_evenly_over_the_workers_and_counted() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "spread", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("workers = 3")).await;

    let idle: BTreeMap<String, f64> = (0..3).map(|w| (w.to_string(), 0.0)).collect();
    assert_eq!(per_worker(&lk).await, idle);

    // Six clients, each with its own keep-alive connection, all kept open.
    let mut clients = Vec::new();
    for _ in 0..6 {
        let client = http();
        let r = client.get(lk.url("/spread/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        clients.push(client);
    }
    let even: BTreeMap<String, f64> = (0..3).map(|w| (w.to_string(), 2.0)).collect();
    assert_eq!(per_worker(&lk).await, even);

    // Closed, they are no longer counted.
    drop(clients);
    eventually("every worker's count back to zero", || async {
        (per_worker(&lk).await == idle).then_some(())
    })
    .await;
}

/// Opened all at once, as a pool opens them: every worker accepts, and keeps a connection
/// only while no worker serves fewer, so the counts stay within one of each other.
#[tokio::test]
async fn connections_opened_at_once_are_spread_too() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "burst", &format!("http://{}", up.addr()));
    let lk = Latchkey::start(&bao, Opts::loopback().proxy("workers = 2")).await;

    let clients: Vec<reqwest::Client> = (0..16).map(|_| http()).collect();
    let answers =
        futures_util::future::join_all(clients.iter().map(|c| c.get(lk.url("/burst/x")).send()))
            .await;
    for r in answers {
        let r = r.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let counts: Vec<f64> = per_worker(&lk).await.into_values().collect();
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(counts.iter().sum::<f64>(), 16.0, "{counts:?}");
    assert!((counts[0] - counts[1]).abs() <= 1.0, "uneven: {counts:?}");
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish() {
    let bao = Bao::start().await;
    let up = echo().await;
    put_bearer(&bao, "slow", &format!("http://{}", up.addr()));
    let mut lk = Latchkey::start(&bao, Opts::loopback()).await;

    // A request the upstream takes 1.5 s to answer, under way when the signal comes.
    let url = lk.url("/slow/delay/1500");
    let in_flight = tokio::spawn(async move { http().get(url).send().await?.text().await });
    eventually("the upstream to have the request", || async {
        (up.requests() == 1).then_some(())
    })
    .await;
    lk.terminate();

    let body = echo_text(&in_flight.await.unwrap().unwrap());
    assert!(body.contains("/delay/1500"), "answer: {body}");
    let status = lk
        .exited_within(Duration::from_secs(15))
        .await
        .expect("latchkey did not exit after SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(
        std::net::TcpStream::connect(lk.proxy).is_err(),
        "the proxy port still accepts connections after exit"
    );
}
