//! The secret cache: a read-through, in-memory map from connection ID to loaded connection.
//!
//! - A hit younger than `ttl` is served at once; past 80% of `ttl` a background re-read starts,
//!   and a maintenance task re-reads connections in use before they expire, so a key rotated in
//!   Vault is in use within `ttl` without any request waiting for Vault.
//! - Any number of concurrent misses share one load (one Vault read): the first request spawns
//!   it and stores its shared future in the entry; the others await the same future.
//! - Unknown (and invalid) connections are remembered for `negative_ttl`.
//! - An entry past `ttl` is re-read. While Vault is healthy the request waits for that read (at
//!   most [`EXPIRED_WAIT`]), so a key rotated in Vault is in use after `ttl` even on a connection
//!   that sat idle. When the read fails, or Vault is already known to be failing, the entry is
//!   served stale at once, up to `ttl + max_stale`, and the re-read goes on in the background.
//! - A hung Vault is noticed once: the first re-read that keeps a request waiting the whole
//!   [`EXPIRED_WAIT`] marks the store as stalled (logged once), and from then on every expired
//!   entry is served stale at once, without waiting, whatever Vault's own timeout is. The mark
//!   goes when a load is answered within [`EXPIRED_WAIT`] again (the re-reads that expired
//!   entries and the maintenance task start keep asking).
//! - At most `max_entries` entries; the least recently used of a sample is evicted first.
//! - A reload changes the settings in place ([`Cache::reconfigure`]): an entry's age is weighed
//!   against the new `ttl` at its next lookup. Entries whose connector a reload changed are
//!   dropped ([`Cache::forget_connectors`]), to be read again and checked against the new one.
//!
//! No map guard is ever held across an `.await`: every guard lives inside one synchronous block.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::catalog::CatalogSlot;
use crate::config::CacheConfig;
use crate::connection::{Connection, ConnectionError};
use crate::connection_id::ConnectionId;
use crate::telemetry::{self, CacheOutcome};
use crate::vault::{Vault, VaultError};

/// Where connections come from. Vault in production; a seam for unit tests.
pub trait Source: Send + Sync + 'static {
    fn load(&self, id: ConnectionId) -> BoxFuture<'static, Result<Option<Connection>, CacheError>>;

    /// Whether the last call to the source succeeded; an expired entry waits for its re-read
    /// only while this holds.
    fn healthy(&self) -> bool {
        true
    }
}

/// Loads connections from Vault and checks them against the catalog in force when Vault has
/// answered (so a load in flight across a reload is checked against the new one).
pub struct VaultSource {
    pub vault: Arc<Vault>,
    pub catalog: CatalogSlot,
}

impl Source for VaultSource {
    fn load(&self, id: ConnectionId) -> BoxFuture<'static, Result<Option<Connection>, CacheError>> {
        let vault = self.vault.clone();
        let catalog = self.catalog.clone();
        async move {
            match vault.read(&id).await {
                Ok(None) => Ok(None),
                Ok(Some(stored)) => Connection::from_stored(id, stored, &catalog.load())
                    .map(Some)
                    .map_err(CacheError::Invalid),
                Err(e) => Err(CacheError::Unavailable(e)),
            }
        }
        .boxed()
    }

    fn healthy(&self) -> bool {
        self.vault.is_healthy()
    }
}

/// Why no connection could be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error("no such connection")]
    NotFound,
    #[error("the stored connection cannot be used: {0}")]
    Invalid(ConnectionError),
    #[error("the secret store is unavailable: {0}")]
    Unavailable(VaultError),
    #[error("the connection could not be loaded")]
    Internal,
}

pub type Outcome = Result<Arc<Connection>, CacheError>;
/// A load of one connection, shared by everyone waiting for it.
pub type Load = Shared<BoxFuture<'static, Outcome>>;

/// Minimum time between two re-reads of one connection triggered by upstream 401s.
const UNAUTHORIZED_REREAD_INTERVAL: Duration = Duration::from_secs(5);
/// How long a request on an expired entry waits for its re-read while Vault is healthy, before
/// it is served the stale value instead. Vault answers reads in milliseconds; this bounds what
/// a Vault that has just started hanging costs the requests waiting when it starts, and marks
/// the store as stalled for every request after them.
pub const EXPIRED_WAIT: Duration = Duration::from_millis(250);
/// How many entries an eviction looks at to find the least recently used.
const EVICTION_SAMPLE: usize = 16;

#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

/// foldhash: seeded per map (unknown IDs land in the map as negative entries, so the hash
/// must not be predictable), and a fraction of SipHash's cost on the hit path.
type Hasher = foldhash::fast::RandomState;

struct Inner {
    map: DashMap<ConnectionId, Slot, Hasher>,
    source: Arc<dyn Source>,
    settings: arc_swap::ArcSwap<Settings>,
    epoch: Instant,
    next_generation: AtomicU64,
    /// Connections written or deleted through this instance ([`Cache::insert`],
    /// [`Cache::invalidate`]): what was built from the connections before is out of date.
    writes: AtomicU64,
    /// A re-read kept a request waiting [`EXPIRED_WAIT`] and no load has been answered promptly
    /// since: expired entries are served stale without waiting.
    stalled: AtomicBool,
    /// The first load generation after the last change of `stalled` either way. Only a load
    /// started after Vault was found hung says that it answers again, and only one started
    /// after that finds it hung again: reads stuck on a node that hangs while others answer
    /// (a cluster failing over) do not flip the state, and the log, back and forth.
    stalled_turned: AtomicU64,
}

/// The `[cache]` settings the cache runs with; a reload swaps them whole.
struct Settings {
    ttl: Duration,
    refresh_at: Duration,
    max_stale: Duration,
    negative_ttl: Duration,
    max_entries: usize,
}

impl Settings {
    fn new(config: &CacheConfig) -> Settings {
        Settings {
            ttl: config.ttl,
            refresh_at: config.ttl.mul_f64(0.8),
            max_stale: config.max_stale,
            negative_ttl: config.negative_ttl,
            max_entries: config.max_entries,
        }
    }
}

struct Slot {
    state: State,
    /// The load in flight and its generation; a finished load only updates the slot if it is
    /// still the slot's current one (an invalidation in between wins).
    inflight: Option<(u64, Load)>,
    /// Milliseconds since the cache's epoch of the last request that used this entry.
    last_used: AtomicU64,
    last_unauthorized_reread: Option<Instant>,
}

/// What a lookup found, taken out of the map before anything is awaited.
enum Found {
    Fresh(Arc<Connection>, bool),
    Expired(Arc<Connection>),
    Negative(CacheError),
    Nothing,
}

enum State {
    Empty,
    Ready {
        conn: Arc<Connection>,
        fetched: Instant,
    },
    Negative {
        err: CacheError,
        until: Instant,
    },
}

impl Cache {
    pub fn new(config: &CacheConfig, source: Arc<dyn Source>) -> Cache {
        Cache {
            inner: Arc::new(Inner {
                map: DashMap::with_hasher(Hasher::default()),
                source,
                settings: arc_swap::ArcSwap::from_pointee(Settings::new(config)),
                epoch: Instant::now(),
                next_generation: AtomicU64::new(1),
                writes: AtomicU64::new(0),
                stalled: AtomicBool::new(false),
                stalled_turned: AtomicU64::new(0),
            }),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.map.len()
    }

    /// The connection, and how the cache answered.
    pub async fn get(
        &self,
        id: &ConnectionId,
    ) -> Result<(Arc<Connection>, CacheOutcome), (CacheError, CacheOutcome)> {
        let answer = self.lookup(id).await;
        telemetry::cache_lookup(match &answer {
            Ok((_, o)) | Err((_, o)) => *o,
        });
        answer
    }

    /// The connection if the cache holds it fresh, as [`get`](Self::get) would answer it (a
    /// hit, and a re-read started once it is due), in one look at the map; `None` for anything
    /// else, which `get` answers.
    pub fn get_fresh(&self, id: &ConnectionId) -> Option<Arc<Connection>> {
        let now = Instant::now();
        let settings = self.inner.settings.load();
        match self.find(id, now, &settings) {
            Found::Fresh(conn, refresh) => {
                telemetry::cache_lookup(CacheOutcome::Hit);
                Some(self.hit(id, conn, refresh))
            }
            _ => None,
        }
    }

    /// A fresh hit, with its background re-read started once it is due.
    fn hit(&self, id: &ConnectionId, conn: Arc<Connection>, refresh: bool) -> Arc<Connection> {
        if refresh {
            drop(self.start_load(id, false));
        }
        conn
    }

    /// What the map holds for `id` at `now` (noting the use).
    fn find(&self, id: &ConnectionId, now: Instant, settings: &Settings) -> Found {
        let Some(slot) = self.inner.map.get(id) else {
            return Found::Nothing;
        };
        slot.last_used
            .store(self.inner.millis(now), Ordering::Relaxed);
        match &slot.state {
            State::Ready { conn, fetched } => {
                let age = now.saturating_duration_since(*fetched);
                if age < settings.ttl {
                    let refresh = age >= settings.refresh_at && slot.inflight.is_none();
                    Found::Fresh(conn.clone(), refresh)
                } else if age < settings.ttl + settings.max_stale {
                    Found::Expired(conn.clone())
                } else {
                    Found::Nothing
                }
            }
            State::Negative { err, until } if now < *until => Found::Negative(err.clone()),
            _ => Found::Nothing,
        }
    }

    async fn lookup(
        &self,
        id: &ConnectionId,
    ) -> Result<(Arc<Connection>, CacheOutcome), (CacheError, CacheOutcome)> {
        let now = Instant::now();
        let settings = self.inner.settings.load();
        match self.find(id, now, &settings) {
            Found::Fresh(conn, refresh) => Ok((self.hit(id, conn, refresh), CacheOutcome::Hit)),
            Found::Negative(err) => Err((err, CacheOutcome::Negative)),
            Found::Expired(stale) => {
                let load = self.start_load(id, false);
                // While Vault is known to be failing or hanging, never wait for it: serve the
                // stale value and let the re-read run in the background.
                if !self.inner.source.healthy() || self.inner.stalled.load(Ordering::Relaxed) {
                    return Ok((stale, CacheOutcome::Stale));
                }
                match tokio::time::timeout(EXPIRED_WAIT, load).await {
                    Ok(Ok(conn)) => Ok((conn, CacheOutcome::Miss)),
                    Ok(Err(e @ (CacheError::NotFound | CacheError::Invalid(_)))) => {
                        Err((e, CacheOutcome::Miss))
                    }
                    Ok(Err(_)) => Ok((stale, CacheOutcome::Stale)),
                    Err(_) => {
                        self.inner.stall(id);
                        Ok((stale, CacheOutcome::Stale))
                    }
                }
            }
            Found::Nothing => {
                if self.inner.map.len() >= settings.max_entries && !self.inner.map.contains_key(id)
                {
                    self.evict_one();
                }
                match self.start_load(id, true).await {
                    Ok(conn) => Ok((conn, CacheOutcome::Miss)),
                    Err(e) => Err((e, CacheOutcome::Miss)),
                }
            }
        }
    }

    /// Joins the load in flight for `id`, or spawns one. With `reuse`, a value (or a negative
    /// answer) that a load finished between the caller's lookup and now is returned as it is,
    /// so that a burst of misses costs one read however the loads interleave.
    fn start_load(&self, id: &ConnectionId, reuse: bool) -> Load {
        let now = Instant::now();
        let mut slot = match self.inner.map.entry(id.clone()) {
            Entry::Occupied(o) => o.into_ref(),
            Entry::Vacant(v) => v.insert(Slot {
                state: State::Empty,
                inflight: None,
                last_used: AtomicU64::new(self.inner.millis(now)),
                last_unauthorized_reread: None,
            }),
        };
        if let Some((_, load)) = &slot.inflight {
            return load.clone();
        }
        if reuse {
            match &slot.state {
                State::Ready { conn, fetched }
                    if now.saturating_duration_since(*fetched) < self.inner.settings.load().ttl =>
                {
                    return futures_util::future::ready(Ok(conn.clone()))
                        .boxed()
                        .shared();
                }
                State::Negative { err, until } if now < *until => {
                    return futures_util::future::ready(Err(err.clone()))
                        .boxed()
                        .shared();
                }
                _ => {}
            }
        }
        let generation = self.inner.next_generation.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.clone();
        let task_id = id.clone();
        let handle = tokio::spawn(async move { inner.load(task_id, generation).await });
        let load: Load = async move { handle.await.unwrap_or(Err(CacheError::Internal)) }
            .boxed()
            .shared();
        slot.inflight = Some((generation, load.clone()));
        load
    }

    /// Whether a lookup of `id` can be answered without a new Vault read for an unknown ID: the
    /// cache holds the connection (fresh or not), a negative answer still valid, or a load in
    /// flight that the lookup would join.
    pub fn holds(&self, id: &ConnectionId) -> bool {
        let now = Instant::now();
        self.inner.map.get(id).is_some_and(|slot| {
            slot.inflight.is_some()
                || match &slot.state {
                    State::Ready { .. } => true,
                    State::Negative { until, .. } => now < *until,
                    State::Empty => false,
                }
        })
    }

    /// Runs with the settings of a reloaded `[cache]` table from now on. `max_entries` lowered
    /// is reached by eviction as new entries come, not all at once.
    pub fn reconfigure(&self, config: &CacheConfig) {
        self.inner.settings.store(Arc::new(Settings::new(config)));
    }

    /// Drops the entries of connections whose connector is one of `connectors` (a reload
    /// changed, added or removed them), and every negative answer (a connection refused for an
    /// unknown connector may be usable now): each is read again at its next use, and checked
    /// against the catalog then in force. Dropped, not marked expired: a connection must never
    /// be served with a connector that is no longer the configured one, even stale.
    pub fn forget_connectors(&self, connectors: &[String]) {
        self.inner.map.retain(|_, slot| match &slot.state {
            State::Ready { conn, .. } => !connectors.iter().any(|c| *c == conn.connector.id),
            State::Negative { .. } => false,
            State::Empty => true,
        });
        telemetry::cache_entries(self.inner.map.len());
    }

    /// How many connections were written or deleted through this instance so far.
    pub fn writes(&self) -> u64 {
        self.inner.writes.load(Ordering::Acquire)
    }

    /// Drops a connection from the cache at once (after a rotation or delete).
    pub fn invalidate(&self, id: &ConnectionId) {
        self.inner.map.remove(id);
        self.inner.writes.fetch_add(1, Ordering::Release);
        telemetry::cache_entries(self.inner.map.len());
    }

    /// Puts a freshly written connection in the cache, so the next request uses it; the key it
    /// replaces is still scrubbed from answers ([`Connection::remember_previous`]).
    pub fn insert(&self, mut conn: Connection) {
        if let Some(previous) = self.inner.ready(&conn.id) {
            conn.remember_previous(&previous);
        }
        self.inner.writes.fetch_add(1, Ordering::Release);
        let id = conn.id.clone();
        let now = Instant::now();
        self.inner.map.insert(
            id,
            Slot {
                state: State::Ready {
                    conn: Arc::new(conn),
                    fetched: now,
                },
                inflight: None,
                last_used: AtomicU64::new(self.inner.millis(now)),
                last_unauthorized_reread: None,
            },
        );
    }

    /// An upstream answered 401 to a request made with this connection's cached key: re-read
    /// it, in case it was rotated elsewhere. At most one re-read at a time per connection, and
    /// at most one per [`UNAUTHORIZED_REREAD_INTERVAL`]. Returns the re-read, if one started.
    pub fn reread_after_unauthorized(&self, id: &ConnectionId) -> Option<Load> {
        let now = Instant::now();
        {
            let mut slot = self.inner.map.get_mut(id)?;
            if slot.inflight.is_some()
                || slot.last_unauthorized_reread.is_some_and(|t| {
                    now.saturating_duration_since(t) < UNAUTHORIZED_REREAD_INTERVAL
                })
            {
                return None;
            }
            slot.last_unauthorized_reread = Some(now);
        }
        Some(self.start_load(id, false))
    }

    /// Periodic upkeep, until `shutdown`: re-reads connections in use before they expire and
    /// removes entries that can no longer be served.
    pub async fn maintain(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            // Read each time: a reload may have changed the TTL.
            let ttl = self.inner.settings.load().ttl;
            let tick = (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(5));
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(tick) => self.sweep(),
            }
        }
    }

    fn sweep(&self) {
        let now = Instant::now();
        let inner = &self.inner;
        let settings = inner.settings.load();
        let mut refresh = Vec::new();
        let mut remove = Vec::new();
        for slot in inner.map.iter() {
            match &slot.state {
                State::Ready { fetched, .. } => {
                    let age = now.saturating_duration_since(*fetched);
                    let used_since_fetch =
                        slot.last_used.load(Ordering::Relaxed) >= inner.millis(*fetched);
                    if age >= settings.ttl + settings.max_stale && slot.inflight.is_none() {
                        remove.push(slot.key().clone());
                    } else if age >= settings.refresh_at
                        && slot.inflight.is_none()
                        && used_since_fetch
                    {
                        refresh.push(slot.key().clone());
                    }
                }
                State::Negative { until, .. } if now >= *until && slot.inflight.is_none() => {
                    remove.push(slot.key().clone());
                }
                _ => {}
            }
        }
        for id in remove {
            inner.map.remove_if(&id, |_, s| s.inflight.is_none());
        }
        for id in refresh {
            drop(self.start_load(&id, false));
        }
        telemetry::cache_entries(inner.map.len());
    }

    fn evict_one(&self) {
        let victim = self
            .inner
            .map
            .iter()
            .take(EVICTION_SAMPLE)
            .filter(|s| s.inflight.is_none())
            .min_by_key(|s| s.last_used.load(Ordering::Relaxed))
            .map(|s| s.key().clone());
        if let Some(id) = victim {
            self.inner.map.remove_if(&id, |_, s| s.inflight.is_none());
        }
    }
}

impl Inner {
    fn millis(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// A request waited [`EXPIRED_WAIT`] for `id`'s re-read in vain: the store is stalled,
    /// unless that re-read began before Vault was last found to answer again.
    fn stall(&self, id: &ConnectionId) {
        tracing::debug!(connection = %id, "no answer to an expired connection's re-read within {}ms; served stale", EXPIRED_WAIT.as_millis());
        let waited_on = self
            .map
            .get(id)
            .and_then(|s| s.inflight.as_ref().map(|(generation, _)| *generation))
            .unwrap_or(u64::MAX);
        if waited_on < self.stalled_turned.load(Ordering::Relaxed) {
            return;
        }
        if !self.stalled.swap(true, Ordering::Relaxed) {
            self.turned();
            telemetry::vault_stalled();
            tracing::warn!(connection = %id, "Vault hung: a re-read got no answer within {}ms; serving expired connections stale without waiting until Vault answers again", EXPIRED_WAIT.as_millis());
        }
    }

    /// Notes that `stalled` changed: loads started from now on are the ones that may change it
    /// back.
    fn turned(&self) {
        let next = self.next_generation.load(Ordering::Relaxed);
        self.stalled_turned.store(next, Ordering::Relaxed);
    }

    /// The connection cached for `id`, fresh or stale.
    fn ready(&self, id: &ConnectionId) -> Option<Arc<Connection>> {
        match &self.map.get(id)?.state {
            State::Ready { conn, .. } => Some(conn.clone()),
            _ => None,
        }
    }

    async fn load(self: Arc<Self>, id: ConnectionId, generation: u64) -> Outcome {
        let started = Instant::now();
        let result = self.source.load(id.clone()).await;
        let now = Instant::now();
        // Answered (whatever the answer) and promptly: Vault no longer hangs.
        let answered = !matches!(
            result,
            Err(CacheError::Unavailable(_) | CacheError::Internal)
        );
        if answered
            && now.saturating_duration_since(started) < EXPIRED_WAIT
            && generation >= self.stalled_turned.load(Ordering::Relaxed)
            && self.stalled.swap(false, Ordering::Relaxed)
        {
            self.turned();
            tracing::info!("Vault answers again: expired connections wait for their re-read again");
        }
        let outcome: Outcome = match result {
            Ok(Some(mut conn)) => {
                if let Some(previous) = self.ready(&id) {
                    conn.remember_previous(&previous);
                }
                Ok(Arc::new(conn))
            }
            Ok(None) => Err(CacheError::NotFound),
            Err(e) => Err(e),
        };
        if let Some(mut slot) = self.map.get_mut(&id) {
            if slot
                .inflight
                .as_ref()
                .is_some_and(|(g, _)| *g == generation)
            {
                slot.inflight = None;
                match &outcome {
                    Ok(conn) => {
                        // A first load counts as a use, so that a connection loaded by one
                        // request is re-read once before it expires.
                        if matches!(slot.state, State::Empty) {
                            slot.last_used.store(self.millis(now), Ordering::Relaxed);
                        }
                        slot.state = State::Ready {
                            conn: conn.clone(),
                            fetched: now,
                        }
                    }
                    Err(e @ (CacheError::NotFound | CacheError::Invalid(_))) => {
                        slot.state = State::Negative {
                            err: e.clone(),
                            until: now + self.settings.load().negative_ttl,
                        }
                    }
                    // An outage keeps whatever the slot had, to serve it stale.
                    Err(CacheError::Unavailable(_) | CacheError::Internal) => {}
                }
            }
        }
        match &outcome {
            Ok(conn) => {
                telemetry::connection_expiry(id.as_str(), conn.expires_at);
                tracing::debug!(connection = %id, "connection loaded")
            }
            Err(e) => {
                if matches!(e, CacheError::NotFound) {
                    telemetry::connection_expiry(id.as_str(), None);
                }
                tracing::debug!(connection = %id, error = %e, "connection load failed")
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::record::StoredConnection;
    use crate::secret::Secret;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// A source whose answers the test sets, counting loads, each taking `delay`.
    struct Fake {
        loads: AtomicUsize,
        answer: Mutex<Result<Option<&'static str>, CacheError>>,
        delay: Mutex<Duration>,
        healthy: std::sync::atomic::AtomicBool,
        catalog: Catalog,
    }

    impl Fake {
        fn new(delay: Duration) -> Arc<Fake> {
            Arc::new(Fake {
                loads: AtomicUsize::new(0),
                answer: Mutex::new(Ok(Some("sk_test_one"))),
                delay: Mutex::new(delay),
                healthy: std::sync::atomic::AtomicBool::new(true),
                catalog: Catalog::builtin().unwrap(),
            })
        }
        fn set(&self, a: Result<Option<&'static str>, CacheError>) {
            *self.answer.lock().unwrap() = a;
        }
        fn loads(&self) -> usize {
            self.loads.load(Ordering::SeqCst)
        }
    }

    impl Source for Arc<Fake> {
        fn load(
            &self,
            id: ConnectionId,
        ) -> BoxFuture<'static, Result<Option<Connection>, CacheError>> {
            let me = self.clone();
            async move {
                // Each load reads a newer version, as a rotation between loads would write.
                let version = me.loads.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                let answer = me.answer.lock().unwrap().clone();
                let delay = *me.delay.lock().unwrap();
                tokio::time::sleep(delay).await;
                me.healthy.store(
                    !matches!(answer, Err(CacheError::Unavailable(_))),
                    Ordering::SeqCst,
                );
                match answer {
                    Ok(Some(key)) => Ok(Some(
                        Connection::from_stored(
                            id,
                            StoredConnection {
                                fields: [("connector", "stripe"), ("api_key", key)]
                                    .into_iter()
                                    .map(|(k, v)| (k.to_string(), Secret::new(v)))
                                    .collect(),
                                version,
                                custom_metadata: Default::default(),
                                not_text: Vec::new(),
                            },
                            &me.catalog,
                        )
                        .unwrap(),
                    )),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                }
            }
            .boxed()
        }

        fn healthy(&self) -> bool {
            self.healthy.load(Ordering::SeqCst)
        }
    }

    fn config(ttl_ms: u64, stale_ms: u64) -> CacheConfig {
        CacheConfig {
            ttl: Duration::from_millis(ttl_ms),
            max_stale: Duration::from_millis(stale_ms),
            negative_ttl: Duration::from_millis(ttl_ms),
            max_entries: 1000,
            miss_rate: 10.0,
            miss_burst: 20,
        }
    }

    fn key_of(c: &Connection) -> String {
        match &c.credential {
            crate::inject::Credential::Header { value, .. } => value.to_str().unwrap().to_string(),
            crate::inject::Credential::Query { .. } => unreachable!(),
        }
    }

    fn id(s: &str) -> ConnectionId {
        ConnectionId::parse(s).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_share_one_load() {
        let fake = Fake::new(Duration::from_millis(50));
        let cache = Cache::new(&config(60_000, 60_000), Arc::new(fake.clone()));
        let tasks: Vec<_> = (0..1000)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&id("c1")).await.map(|(c, _)| key_of(&c)) })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "Bearer sk_test_one");
        }
        assert_eq!(fake.loads(), 1);
        let (_, outcome) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(outcome, CacheOutcome::Hit);
        assert_eq!(fake.loads(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_ahead_and_serves_stale_while_the_store_is_down() {
        let fake = Fake::new(Duration::from_millis(1));
        let cache = Cache::new(&config(1000, 5000), Arc::new(fake.clone()));
        cache.get(&id("c1")).await.unwrap();
        assert_eq!(fake.loads(), 1);

        // Past 80% of the TTL a hit starts a background re-read, which picks up a rotation.
        fake.set(Ok(Some("sk_test_two")));
        tokio::time::advance(Duration::from_millis(850)).await;
        let (c, o) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(
            (key_of(&c).as_str(), o),
            ("Bearer sk_test_one", CacheOutcome::Hit)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(fake.loads(), 2);
        let (c, _) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(key_of(&c), "Bearer sk_test_two");

        // The store goes down: past the TTL the entry is served stale, without waiting.
        fake.set(Err(CacheError::Unavailable(VaultError::Timeout(
            Duration::from_secs(1),
        ))));
        tokio::time::advance(Duration::from_millis(1500)).await;
        let (c, o) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(
            (key_of(&c).as_str(), o),
            ("Bearer sk_test_two", CacheOutcome::Stale)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (_, o) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(o, CacheOutcome::Stale);

        // Past ttl + max_stale, the outage shows.
        tokio::time::advance(Duration::from_millis(5000)).await;
        let (e, _) = cache.get(&id("c1")).await.unwrap_err();
        assert!(matches!(e, CacheError::Unavailable(_)));
    }

    /// `get_fresh` answers what `get` answers as a hit, and nothing else: not before the
    /// first read, not once the entry is past its TTL (stale), not a negative answer; and a
    /// fresh hit past 80% of the TTL starts the background re-read as `get`'s does.
    #[tokio::test(start_paused = true)]
    async fn get_fresh_is_gets_hit_and_only_that() {
        let fake = Fake::new(Duration::from_millis(1));
        let cache = Cache::new(&config(1000, 5000), Arc::new(fake.clone()));
        assert!(cache.get_fresh(&id("c1")).is_none());
        assert_eq!(fake.loads(), 0, "get_fresh read the store");
        cache.get(&id("c1")).await.unwrap();
        assert_eq!(
            key_of(&cache.get_fresh(&id("c1")).unwrap()),
            "Bearer sk_test_one"
        );

        fake.set(Ok(Some("sk_test_two")));
        tokio::time::advance(Duration::from_millis(850)).await;
        let c = cache.get_fresh(&id("c1")).unwrap();
        assert_eq!(key_of(&c), "Bearer sk_test_one");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(fake.loads(), 2, "no re-read started ahead of the TTL");
        assert_eq!(
            key_of(&cache.get_fresh(&id("c1")).unwrap()),
            "Bearer sk_test_two"
        );

        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(
            cache.get_fresh(&id("c1")).is_none(),
            "a stale entry was fresh"
        );

        fake.set(Ok(None));
        assert!(cache.get(&id("gone")).await.is_err());
        assert!(cache.get_fresh(&id("gone")).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_connections_are_remembered_briefly() {
        let fake = Fake::new(Duration::from_millis(1));
        fake.set(Ok(None));
        let cache = Cache::new(&config(1000, 0), Arc::new(fake.clone()));
        assert_eq!(
            cache.get(&id("nope")).await.unwrap_err(),
            (CacheError::NotFound, CacheOutcome::Miss)
        );
        assert_eq!(
            cache.get(&id("nope")).await.unwrap_err(),
            (CacheError::NotFound, CacheOutcome::Negative)
        );
        assert_eq!(fake.loads(), 1);
        tokio::time::advance(Duration::from_millis(1001)).await;
        fake.set(Ok(Some("sk_test_one")));
        assert!(cache.get(&id("nope")).await.is_ok());
        assert_eq!(fake.loads(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn unauthorized_rereads_are_rate_limited() {
        let fake = Fake::new(Duration::from_millis(1));
        let cache = Cache::new(&config(60_000, 0), Arc::new(fake.clone()));
        cache.get(&id("c1")).await.unwrap();
        fake.set(Ok(Some("sk_test_two")));
        assert!(cache.reread_after_unauthorized(&id("c1")).is_some());
        assert!(cache.reread_after_unauthorized(&id("c1")).is_none());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(cache.reread_after_unauthorized(&id("c1")).is_none());
        assert_eq!(fake.loads(), 2);
        let (c, _) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(key_of(&c), "Bearer sk_test_two");
        tokio::time::advance(UNAUTHORIZED_REREAD_INTERVAL).await;
        assert!(cache.reread_after_unauthorized(&id("c1")).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn invalidation_wins_over_a_load_in_flight() {
        let fake = Fake::new(Duration::from_millis(100));
        let cache = Cache::new(&config(60_000, 0), Arc::new(fake.clone()));
        let c2 = cache.clone();
        let first = tokio::spawn(async move { c2.get(&id("c1")).await.map(|(c, _)| key_of(&c)) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        cache.invalidate(&id("c1"));
        fake.set(Ok(Some("sk_test_two")));
        assert_eq!(first.await.unwrap().unwrap(), "Bearer sk_test_one");
        let (c, o) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(
            (key_of(&c).as_str(), o),
            ("Bearer sk_test_two", CacheOutcome::Miss)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_by_max_entries() {
        let fake = Fake::new(Duration::from_millis(1));
        let mut cfg = config(60_000, 0);
        cfg.max_entries = 10;
        let cache = Cache::new(&cfg, Arc::new(fake.clone()));
        for i in 0..50 {
            cache.get(&id(&format!("c{i}"))).await.unwrap();
        }
        assert!(cache.len() <= 10, "{} entries", cache.len());
    }

    #[tokio::test(start_paused = true)]
    async fn maintenance_rereads_connections_in_use() {
        let fake = Fake::new(Duration::from_millis(1));
        let cache = Cache::new(&config(1000, 60_000), Arc::new(fake.clone()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(cache.clone().maintain(async {
            let _ = stop_rx.await;
        }));
        cache.get(&id("c1")).await.unwrap();
        cache.get(&id("c1")).await.unwrap();
        fake.set(Ok(Some("sk_test_two")));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let (c, o) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(
            (key_of(&c).as_str(), o),
            ("Bearer sk_test_two", CacheOutcome::Hit)
        );
        stop_tx.send(()).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_entry_past_its_ttl_is_reread_before_it_is_served() {
        let fake = Fake::new(Duration::from_millis(5));
        let cache = Cache::new(&config(1000, 60_000), Arc::new(fake.clone()));
        cache.get(&id("c1")).await.unwrap();
        fake.set(Ok(Some("sk_test_two")));
        tokio::time::advance(Duration::from_millis(1500)).await;
        let (c, o) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(
            (key_of(&c).as_str(), o),
            ("Bearer sk_test_two", CacheOutcome::Miss)
        );
        assert_eq!(fake.loads(), 2);

        // Deleted in Vault meanwhile: the stale value is not served.
        fake.set(Ok(None));
        tokio::time::advance(Duration::from_millis(1500)).await;
        let (e, _) = cache.get(&id("c1")).await.unwrap_err();
        assert_eq!(e, CacheError::NotFound);
    }

    /// A rotated key stays scrubbed: the connection re-read with a new key also finds the one
    /// it replaced (in answers that still quote it), and not the one before that.
    #[tokio::test(start_paused = true)]
    async fn a_reread_connection_still_scrubs_the_key_it_replaced() {
        let quotes = |c: &Connection, key: &'static str| {
            let scrubber = c.scrubber.as_ref().unwrap();
            scrubber
                .header(&http::HeaderValue::from_static(key))
                .is_some()
        };
        let fake = Fake::new(Duration::from_millis(5));
        let cache = Cache::new(&config(1000, 60_000), Arc::new(fake.clone()));
        let (one, _) = cache.get(&id("c1")).await.unwrap();
        assert!(quotes(&one, "sk_test_one") && !quotes(&one, "sk_test_two"));
        fake.set(Ok(Some("sk_test_two")));
        tokio::time::advance(Duration::from_millis(1500)).await;
        let (two, _) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(key_of(&two), "Bearer sk_test_two");
        assert!(quotes(&two, "sk_test_two") && quotes(&two, "sk_test_one"));
        fake.set(Ok(Some("sk_test_three")));
        tokio::time::advance(Duration::from_millis(1500)).await;
        let (three, _) = cache.get(&id("c1")).await.unwrap();
        assert!(quotes(&three, "sk_test_three") && quotes(&three, "sk_test_two"));
        assert!(!quotes(&three, "sk_test_one"));
    }

    /// Issue 12: while a hung store's read had not yet timed out (Vault's own timeout, seconds),
    /// every request on an expired entry waited [`EXPIRED_WAIT`] for it again.
    #[tokio::test(start_paused = true)]
    async fn a_hang_is_noticed_once_then_nobody_waits_until_the_store_answers_promptly() {
        let fake = Fake::new(Duration::from_millis(5));
        let cache = Cache::new(&config(1000, 60_000), Arc::new(fake.clone()));
        cache.get(&id("c1")).await.unwrap();
        cache.get(&id("c2")).await.unwrap();
        // The store hangs: reads take a minute (and would then succeed: it is not known to be
        // down at any point).
        *fake.delay.lock().unwrap() = Duration::from_secs(60);
        tokio::time::advance(Duration::from_millis(1500)).await;
        let started = Instant::now();
        let (_, o) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(o, CacheOutcome::Stale);
        assert_eq!(started.elapsed(), EXPIRED_WAIT);
        // Noticed: another expired entry, and the same one again, are served stale at once,
        // while both reads are still hanging.
        for c in ["c2", "c1", "c2"] {
            let started = Instant::now();
            let (conn, o) = cache.get(&id(c)).await.unwrap();
            assert_eq!(
                (key_of(&conn).as_str(), o),
                ("Bearer sk_test_one", CacheOutcome::Stale)
            );
            assert_eq!(started.elapsed(), Duration::ZERO, "{c}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            fake.loads(),
            4,
            "one read per entry, each joined while it hangs"
        );
        // The hung reads are answered at last, late: that is no recovery yet.
        tokio::time::sleep(Duration::from_secs(61)).await;
        // The store answers promptly again: a load answered within EXPIRED_WAIT clears the mark
        // and an expired entry waits for its re-read again, picking up a rotation.
        *fake.delay.lock().unwrap() = Duration::from_millis(5);
        fake.set(Ok(Some("sk_test_two")));
        tokio::time::advance(Duration::from_millis(1500)).await;
        let (_, o) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(
            o,
            CacheOutcome::Stale,
            "the first re-read still runs unwaited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (conn, o) = cache.get(&id("c2")).await.unwrap();
        assert_eq!(
            (key_of(&conn).as_str(), o),
            ("Bearer sk_test_two", CacheOutcome::Miss)
        );
    }

    /// One node of a Vault cluster hangs while the others answer (a failover under way): a read
    /// stuck on it since before the store was found to answer again does not make it "hung"
    /// again. Each such read flipped the state, and the log, back and forth (13 times in 3 s).
    #[tokio::test(start_paused = true)]
    async fn a_read_stuck_from_before_a_recovery_does_not_mark_the_store_hung_again() {
        let fake = Fake::new(Duration::from_millis(5));
        let cache = Cache::new(&config(1000, 60_000), Arc::new(fake.clone()));
        for c in ["c1", "c2"] {
            cache.get(&id(c)).await.unwrap();
        }
        // c1's re-read goes to the node that hangs: found hung.
        *fake.delay.lock().unwrap() = Duration::from_secs(60);
        tokio::time::advance(Duration::from_millis(1500)).await;
        let (_, o) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(o, CacheOutcome::Stale);
        assert!(cache.inner.stalled.load(Ordering::Relaxed));
        // c2's re-read, started since, goes to a node that answers: the store answers again.
        *fake.delay.lock().unwrap() = Duration::from_millis(5);
        cache.get(&id("c2")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!cache.inner.stalled.load(Ordering::Relaxed));
        // c1 waits once more on its read stuck from before (and is served stale): not hung
        // again for that.
        let started = Instant::now();
        let (_, o) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(o, CacheOutcome::Stale);
        assert_eq!(started.elapsed(), EXPIRED_WAIT);
        assert!(!cache.inner.stalled.load(Ordering::Relaxed));
        // A read started after the recovery that hangs does.
        *fake.delay.lock().unwrap() = Duration::from_secs(60);
        tokio::time::advance(Duration::from_millis(1500)).await;
        cache.get(&id("c2")).await.unwrap();
        assert!(cache.inner.stalled.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_store_costs_one_short_wait_then_none() {
        let fake = Fake::new(Duration::from_millis(5));
        let cache = Cache::new(&config(1000, 60_000), Arc::new(fake.clone()));
        cache.get(&id("c1")).await.unwrap();
        // The store starts hanging (each read takes 5s, then fails).
        fake.set(Err(CacheError::Unavailable(VaultError::Timeout(
            Duration::from_secs(5),
        ))));
        *fake.delay.lock().unwrap() = Duration::from_secs(5);
        tokio::time::advance(Duration::from_millis(1500)).await;
        let started = Instant::now();
        let (c, o) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(
            (key_of(&c).as_str(), o),
            ("Bearer sk_test_one", CacheOutcome::Stale)
        );
        assert_eq!(started.elapsed(), EXPIRED_WAIT);
        // Once the read has failed, the store is known to be down: no wait at all.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let started = Instant::now();
        let (_, o) = cache.get(&id("c1")).await.unwrap();
        assert_eq!(o, CacheOutcome::Stale);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
