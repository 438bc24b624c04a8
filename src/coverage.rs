//! Which connections cover a host and port: how a tunnel or forward-form request that names no
//! connection finds the one granted connection whose hosts include its destination
//! (PRODUCT.md section 1, the third rule of "how a request picks its connection").
//!
//! The index holds every stored connection's hosts and ports, and nothing secret. It is built
//! from a Vault LIST and a read of each connection through the cache, and rebuilt when it is
//! older than the cache's TTL or a connection was written or deleted through this instance
//! since, or when a lookup finds nothing and it is older than
//! [`MIN_REBUILD_INTERVAL`] (so that a connection just created is found at once, while a client
//! asking for hosts nobody covers costs at most one rebuild a second). One rebuild runs at a
//! time; everyone else waits for it. When Vault cannot list, the last index is used.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::auth::Client;
use crate::cache::Cache;
use crate::connection::Reach;
use crate::connection_id::ConnectionId;
use crate::destination::Scheme;
use crate::vault::{Vault, VaultError};

/// The shortest time between two rebuilds of the index caused by a lookup that found nothing.
pub const MIN_REBUILD_INTERVAL: Duration = Duration::from_secs(1);
/// How many connections one rebuild reads at once.
const READS_AT_ONCE: usize = 8;

/// The index of which connection covers which host and port.
pub struct Coverage {
    vault: Arc<Vault>,
    cache: Cache,
    /// Milliseconds; `cache.ttl`, which a reload may change.
    max_age: AtomicU64,
    /// Counts reloads: an index built before the last one is not current.
    generation: AtomicU64,
    index: RwLock<Option<Arc<Index>>>,
    rebuilding: tokio::sync::Mutex<()>,
}

struct Index {
    built: Instant,
    generation: u64,
    /// [`Cache::writes`] when the build began: a connection created, changed or deleted
    /// through this instance since makes the index out of date at once.
    writes: u64,
    reaches: Vec<Reach>,
}

impl Index {
    fn current(&self, age: Duration, generation: u64, writes: u64) -> bool {
        self.built.elapsed() < age && self.generation == generation && self.writes == writes
    }
}

impl Coverage {
    pub fn new(vault: Arc<Vault>, cache: Cache, max_age: Duration) -> Coverage {
        Coverage {
            vault,
            cache,
            max_age: AtomicU64::new(millis(max_age)),
            generation: AtomicU64::new(0),
            index: RwLock::new(None),
            rebuilding: tokio::sync::Mutex::new(()),
        }
    }

    /// After a reload: the index is rebuilt at its next use (connectors may have changed what
    /// a connection covers), and then kept for `max_age`.
    pub fn reconfigure(&self, max_age: Duration) {
        self.max_age.store(millis(max_age), Ordering::Relaxed);
        // The index is kept, to choose from while Vault cannot list, but is no longer current.
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// The connections that `client` may use (every one when latchkey is open) and whose
    /// hosts include `host` on the port a request would go to ([`Reach::covers`]: `port`, or
    /// with `None` the default port of `scheme`, or of https for a connection whose base URL
    /// is https), sorted by ID.
    pub async fn candidates(
        &self,
        client: Option<&Client>,
        host: &str,
        (port, scheme): (Option<u16>, Scheme),
    ) -> Result<Vec<ConnectionId>, VaultError> {
        let max_age = Duration::from_millis(self.max_age.load(Ordering::Relaxed));
        let index = self.index_younger_than(max_age).await?;
        let found = matching(&index, client, host, (port, scheme));
        if !found.is_empty() || index.built.elapsed() < MIN_REBUILD_INTERVAL {
            return Ok(found);
        }
        let index = self.index_younger_than(MIN_REBUILD_INTERVAL).await?;
        Ok(matching(&index, client, host, (port, scheme)))
    }

    /// The current index if it is younger than `age`; otherwise a new one (or, when Vault
    /// cannot list, the last one there is).
    async fn index_younger_than(&self, age: Duration) -> Result<Arc<Index>, VaultError> {
        let current = |i: &Arc<Index>| {
            i.current(
                age,
                self.generation.load(Ordering::Relaxed),
                self.cache.writes(),
            )
        };
        if let Some(index) = self.current().filter(current) {
            return Ok(index);
        }
        let _one_at_a_time = self.rebuilding.lock().await;
        // Someone else may have rebuilt it while this one waited.
        if let Some(index) = self.current().filter(current) {
            return Ok(index);
        }
        match self.build().await {
            Ok(index) => {
                let index = Arc::new(index);
                if let Ok(mut slot) = self.index.write() {
                    *slot = Some(index.clone());
                }
                Ok(index)
            }
            Err(e) => match self.current() {
                Some(last) => {
                    tracing::warn!(error = %e, "cannot list connections; choosing from the last list");
                    Ok(last)
                }
                None => Err(e),
            },
        }
    }

    fn current(&self) -> Option<Arc<Index>> {
        self.index.read().ok().and_then(|slot| slot.clone())
    }

    /// Lists the stored connections and reads each through the cache. A connection that cannot
    /// be read or used covers nothing.
    async fn build(&self) -> Result<Index, VaultError> {
        let generation = self.generation.load(Ordering::Relaxed);
        let writes = self.cache.writes();
        let ids = self.vault.list().await?;
        let mut reaches = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(READS_AT_ONCE) {
            let reads = chunk.iter().map(|id| self.cache.get(id));
            let loaded = futures_util::future::join_all(reads).await;
            reaches.extend(loaded.into_iter().flatten().map(|(conn, _)| conn.reach()));
        }
        tracing::debug!(
            connections = reaches.len(),
            "rebuilt the index of connection hosts"
        );
        Ok(Index {
            built: Instant::now(),
            generation,
            writes,
            reaches,
        })
    }
}

fn matching(
    index: &Index,
    client: Option<&Client>,
    host: &str,
    (port, scheme): (Option<u16>, Scheme),
) -> Vec<ConnectionId> {
    let mut found: Vec<ConnectionId> = index
        .reaches
        .iter()
        .filter(|r| client.is_none_or(|c| c.may_use(r.id.as_str())))
        .filter(|r| r.covers(host, port, scheme))
        .map(|r| r.id.clone())
        .collect();
    found.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    found
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
