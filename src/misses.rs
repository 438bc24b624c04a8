//! How often a client may make latchkey read Vault for a connection that does not exist
//! (PRODUCT.md 10.9). A client granted a glob (`acme-*`) could otherwise invent a new ID per
//! request, each a Vault read that the negative cache cannot save.
//!
//! Each client has a token bucket (`cache.miss_rate` per second, up to `cache.miss_burst`). A
//! Vault read for an ID the cache does not hold (nor is reading already) takes one token
//! before it starts ([`MissLimit::take`]), and gives it back if it found a connection (usable
//! or not, [`Ticket::found`]): so concurrent requests for invented IDs meet the limit as one
//! after another would, and reads that Vault leaves unanswered count too. A request that finds
//! the bucket empty while reads of its client are under way waits for one of them to end (its
//! token may come back: a client starting with more real connections than the burst is not
//! refused); with none under way, it is served only from the cache until the bucket refills:
//! a connection the cache holds works as before, anything else is `429 too_many_misses`
//! without a Vault read. Buckets are only looked at on the way to Vault, never on a cache hit;
//! there is one per configured client (and one for everyone when latchkey runs open), so their
//! number is bounded by the configuration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::Notify;

/// The longest a request waits for its client's reads under way to give a token back. Each
/// read ends within `vault.timeout` per address; this only bounds the wait should one not.
const WAIT_FOR_READS: Duration = Duration::from_secs(30);

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
    /// Reads paid for and not yet ended.
    reading: usize,
    /// How many reads have ended: a waiter that saw one number and then another knows to look
    /// again, whenever its notification came.
    ended: u64,
    /// Wakes the requests waiting for a read to end.
    end: Arc<Notify>,
}

/// A read paid for: ended when dropped, its token kept unless [`Ticket::found`] says it found a
/// connection. (A request dropped half-way ends its read too.)
pub struct Ticket {
    limit: Arc<MissLimit>,
    client: Box<str>,
    found: bool,
}

impl Ticket {
    /// The read found a connection: the token comes back.
    pub fn found(mut self) {
        self.found = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.limit.end_at(&self.client, self.found, Instant::now());
    }
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
    /// there is none (and no read of its own under way gives one back), how long until there
    /// is.
    pub async fn take(self: &Arc<Self>, client: &str) -> Result<Ticket, Duration> {
        let deadline = tokio::time::Instant::now() + WAIT_FOR_READS;
        loop {
            let (end, seen) = match self.try_take(client, Instant::now()) {
                Taken::Yes => {
                    return Ok(Ticket {
                        limit: self.clone(),
                        client: client.into(),
                        found: false,
                    })
                }
                Taken::No(wait) => return Err(wait),
                Taken::AfterReads(end, seen) => (end, seen),
            };
            let notified = end.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // A read that ended between the look and `enable` is seen here.
            if self.ended(client) != seen {
                continue;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Duration::from_secs(1));
            }
        }
    }

    fn try_take(&self, client: &str, now: Instant) -> Taken {
        let mut bucket = self.buckets.entry(client.into()).or_insert_with(|| Bucket {
            tokens: self.burst,
            at: now,
            reading: 0,
            ended: 0,
            end: Arc::new(Notify::new()),
        });
        self.refill(&mut bucket, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.reading += 1;
            return Taken::Yes;
        }
        if bucket.reading > 0 {
            return Taken::AfterReads(bucket.end.clone(), bucket.ended);
        }
        Taken::No(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
    }

    fn ended(&self, client: &str) -> u64 {
        self.buckets.get(client).map_or(0, |b| b.ended)
    }

    fn end_at(&self, client: &str, found: bool, now: Instant) {
        if let Some(mut bucket) = self.buckets.get_mut(client) {
            self.refill(&mut bucket, now);
            if found {
                bucket.tokens = (bucket.tokens + 1.0).min(self.burst);
            }
            bucket.reading = bucket.reading.saturating_sub(1);
            bucket.ended += 1;
            bucket.end.notify_waiters();
        }
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
    }
}

/// What [`MissLimit::try_take`] found.
enum Taken {
    Yes,
    /// None now; wait for a read under way to end (the notification, and the count of ended
    /// reads seen).
    AfterReads(Arc<Notify>, u64),
    No(Duration),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: f64, burst: u32) -> Arc<MissLimit> {
        Arc::new(MissLimit::new(rate, burst))
    }

    #[tokio::test]
    async fn a_burst_then_the_rate_per_client() {
        let limit = limit(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(matches!(limit.try_take("a", t0), Taken::Yes));
            limit.end_at("a", false, t0);
        }
        let Taken::No(wait) = limit.try_take("a", t0) else {
            panic!("a fourth read at once");
        };
        assert_eq!(wait, Duration::from_millis(500));
        // Another client has its own bucket.
        assert!(matches!(limit.try_take("b", t0), Taken::Yes));

        // Half a second brings one token back, and no more than the burst ever.
        let t1 = t0 + Duration::from_millis(500);
        assert!(matches!(limit.try_take("a", t1), Taken::Yes));
        limit.end_at("a", false, t1);
        assert!(matches!(limit.try_take("a", t1), Taken::No(_)));
        let later = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(matches!(limit.try_take("a", later), Taken::Yes));
            limit.end_at("a", false, later);
        }
        assert!(matches!(limit.try_take("a", later), Taken::No(_)));
    }

    /// A read that found its connection costs nothing; one that did not, or got no answer,
    /// keeps its token. Reads under way make the next request wait rather than fail.
    #[tokio::test]
    async fn found_connections_give_the_token_back_and_readers_wait_for_them() {
        let limit = limit(0.001, 2);
        for _ in 0..10 {
            limit.take("a").await.ok().unwrap().found();
        }
        // Two reads under way take the burst; a third waits for one to end.
        let first = limit.take("a").await.ok().unwrap();
        let second = limit.take("a").await.ok().unwrap();
        let third = tokio::spawn({
            let limit = limit.clone();
            async move { limit.take("a").await.map(|t| t.found()) }
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        first.found();
        assert!(
            third.await.unwrap().is_ok(),
            "the refund went to the waiter"
        );
        // The second finds nothing: the token is spent, and with nothing under way the next
        // request is refused at once.
        drop(second);
        assert!(limit.take("a").await.is_ok());
        assert!(limit.take("a").await.is_err());
    }
}
