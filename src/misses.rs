//! How often a client may make latchkey read Vault for a connection that does not exist
//! (PRODUCT.md 10.9). A client granted a glob (`acme-*`) could otherwise invent a new ID per
//! request, each a Vault read that the negative cache cannot save.
//!
//! Each client has a token bucket (`cache.miss_rate` per second, up to `cache.miss_burst`). A
//! Vault read for an ID the cache does not hold (nor is reading already) takes one token
//! before it starts, and gives it back if it found one (usable or not): so concurrent requests for
//! invented IDs meet the limit as one after another would, and reads that Vault leaves
//! unanswered count too. A client whose bucket is empty is served only from the cache until it
//! refills: a connection the cache holds works as before, anything else is `429
//! too_many_misses` without a Vault read. Buckets are only looked at on the way to
//! Vault, never on a cache hit; there is one per configured client (and one for everyone when
//! latchkey runs open), so their number is bounded by the configuration.

use std::time::{Duration, Instant};

use dashmap::DashMap;

/// The buckets, shared by every worker.
pub struct MissLimit {
    /// Tokens per second.
    rate: f64,
    burst: f64,
    buckets: DashMap<Box<str>, Bucket, foldhash::fast::RandomState>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl MissLimit {
    pub fn new(rate: f64, burst: u32) -> MissLimit {
        MissLimit {
            rate,
            burst: f64::from(burst),
            buckets: DashMap::default(),
        }
    }

    /// A token for `client` to have latchkey read Vault for an ID the cache does not hold; if
    /// there is none, how long until there is.
    pub fn take(&self, client: &str) -> Result<(), Duration> {
        self.take_at(client, Instant::now())
    }

    /// The read [`MissLimit::take`] paid for found the connection: the token comes back.
    pub fn refund(&self, client: &str) {
        self.refund_at(client, Instant::now());
    }

    fn take_at(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let mut bucket = self.buckets.entry(client.into()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        self.refill(&mut bucket, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
    }

    fn refund_at(&self, client: &str, now: Instant) {
        if let Some(mut bucket) = self.buckets.get_mut(client) {
            self.refill(&mut bucket, now);
            bucket.tokens = (bucket.tokens + 1.0).min(self.burst);
        }
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_client() {
        let limit = MissLimit::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limit.take_at("a", t0), Ok(()));
        }
        let wait = limit.take_at("a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another client has its own bucket.
        assert_eq!(limit.take_at("b", t0), Ok(()));

        // Half a second brings one token back, and no more than the burst ever.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(limit.take_at("a", t1), Ok(()));
        assert!(limit.take_at("a", t1).is_err());
        let later = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(limit.take_at("a", later), Ok(()));
        }
        assert!(limit.take_at("a", later).is_err());
    }

    /// A read that found its connection costs nothing; one that did not, or got no answer,
    /// keeps its token, however many run at once.
    #[test]
    fn found_connections_give_the_token_back() {
        let limit = MissLimit::new(1.0, 2);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(limit.take_at("a", t0), Ok(()));
            limit.refund_at("a", t0);
        }
        // Concurrent reads: each takes before any ends.
        assert_eq!(limit.take_at("a", t0), Ok(()));
        assert_eq!(limit.take_at("a", t0), Ok(()));
        assert!(limit.take_at("a", t0).is_err());
        // Refunds never raise the bucket above its burst.
        for _ in 0..5 {
            limit.refund_at("a", t0);
        }
        assert_eq!(limit.take_at("a", t0), Ok(()));
        assert_eq!(limit.take_at("a", t0), Ok(()));
        assert!(limit.take_at("a", t0).is_err());
    }
}
