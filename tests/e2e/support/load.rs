//! Steady load for the tests of what happens under it (a reload, a hung Vault, a shutdown): a
//! few clients, each a keep-alive connection of its own sending one request after another until
//! stopped, counting what succeeded and keeping what did not.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{read, wait_until};

/// `clients` clients sending requests until [`SteadyLoad::stop`].
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
    /// The failures that were answers (a status other than 200), not transport errors.
    answered: Arc<Mutex<Vec<String>>>,
    tasks: tokio::task::JoinSet<()>,
}

impl SteadyLoad {
    /// Starts `clients` clients; client `c`'s `n`th request is `request(client, c, n)`. A
    /// request succeeds when it is answered 200; any other status or a transport error is a
    /// failure, kept with what it was.
    pub fn start<F>(clients: usize, request: F) -> SteadyLoad
    where
        F: Fn(&reqwest::Client, usize, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
    {
        let request = Arc::new(request);
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..clients {
            let (request, stop, ok, failed, answered) = (
                request.clone(),
                stop.clone(),
                ok.clone(),
                failed.clone(),
                answered.clone(),
            );
            tasks.spawn(async move {
                // One connection per client, kept alive between its requests.
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .pool_max_idle_per_host(1)
                    .build()
                    .unwrap();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    match request(&client, c, n).send().await {
                        Ok(resp) => {
                            let r = read(resp).await;
                            if r.status == 200 {
                                ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                let what =
                                    format!("client {c} request {n}: {} {:?}", r.status, r.json);
                                answered.lock().unwrap().push(what.clone());
                                failed.lock().unwrap().push(what);
                            }
                        }
                        Err(e) => failed
                            .lock()
                            .unwrap()
                            .push(format!("client {c} request {n}: {e}")),
                    }
                    n += 1;
                }
            });
        }
        SteadyLoad {
            stop,
            ok,
            failed,
            answered,
            tasks,
        }
    }

    /// How many requests have succeeded so far.
    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// The failures so far.
    pub fn failures(&self) -> Vec<String> {
        self.failed.lock().unwrap().clone()
    }

    /// The failures that were answers other than 200 (no transport errors among them).
    pub fn answered_failures(&self) -> Vec<String> {
        self.answered.lock().unwrap().clone()
    }

    /// Waits until `n` more requests than now have succeeded (failing the test after a minute).
    pub async fn more(&self, n: usize) {
        let target = self.ok() + n;
        wait_until("the load to make progress", Duration::from_secs(60), || {
            std::future::ready((self.ok() >= target).then_some(()))
        })
        .await;
    }

    /// Stops the clients once their requests in flight are answered; how many succeeded, and
    /// the failures.
    pub async fn stop(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        while let Some(done) = self.tasks.join_next().await {
            done.unwrap();
        }
        (self.ok(), self.failures())
    }
}
