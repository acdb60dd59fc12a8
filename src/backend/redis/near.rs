//! The near cache: records read from Redis kept in process, coherent through Redis's
//! server-assisted client-side caching (`CLIENT TRACKING ... REDIRECT`, Redis >= 6).
//!
//! One RESP3 connection per backend receives the invalidations. Each data connection (RESP2,
//! unchanged) is told `CLIENT TRACKING ON REDIRECT <that connection's id>`, so Redis remembers
//! every key it reads and, when one of them changes, expires, is evicted or deleted, pushes an
//! `invalidate` message to us; `FLUSHDB`/`FLUSHALL` push one that drops everything.
//!
//! **When a value is kept.** A read may race an invalidation of the key it read (the reply comes
//! on the data connection, the invalidation on ours). Every invalidation, flush and loss of the
//! tracking connection bumps an epoch *before* it removes anything; a read remembers the epoch
//! and the tracking generation from before it was sent, and its value is kept only if both are
//! unchanged when it is inserted (checked under the shard's lock, which the removal takes too).
//! A value is therefore never kept past an invalidation sent after the read; at worst a hot
//! key's value is not kept this time and is read from Redis again.
//!
//! **When the tracking connection is lost** (closed, or a `PING` unanswered within the
//! backend's timeout, checked every second), everything is dropped and nothing is kept until a
//! new connection is made and each data connection has been pointed at it. The remaining
//! window is the delivery time of an invalidation: after another instance writes a key, this
//! process may serve the old record until Redis's message arrives (on loopback, well under a
//! millisecond), the same as a `GET` racing that write.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::redis::aio::MultiplexedConnection;
use super::redis::{
    self, AsyncConnectionConfig, Client, ConnectionInfo, PushInfo, PushKind, RedisError, Value,
};
use super::RECONNECT_BACKOFF;

const SHARDS: usize = 16;
/// How often the tracking connection is checked with a `PING`.
const PING_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Near {
    client: Client,
    timeout: Duration,
    shard_budget: usize,
    max_value: usize,
    /// The generation of the live tracking connection; 0 while there is none.
    live: AtomicU64,
    /// Bumped before every removal (invalidation, flush, loss of the tracking connection).
    epoch: AtomicU64,
    next_gen: AtomicU64,
    /// The live tracking connection's Redis client id, with its generation.
    redirect: Mutex<Option<(u64, i64)>>,
    connecting: AtomicBool,
    last_failure: Mutex<Option<Instant>>,
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Default)]
struct Shard {
    /// A record and when Redis expires it (`None`: no expiry).
    map: HashMap<Box<str>, (Bytes, Option<Instant>)>,
    bytes: usize,
}

/// What a read remembers from before it was sent.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ticket {
    generation: u64,
    epoch: u64,
}

/// Which tracking generation a data connection reports to (0: none yet).
#[derive(Debug, Default)]
pub(super) struct Tracked {
    generation: AtomicU64,
    busy: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The bookkeeping cost of one kept record beyond its key and value.
const OVERHEAD: usize = 64;

impl Near {
    pub(super) fn new(
        info: ConnectionInfo,
        budget: usize,
        timeout: Duration,
    ) -> Result<Arc<Self>, RedisError> {
        let client = super::resp3_client(info)?;
        let shard_budget = budget / SHARDS;
        Ok(Arc::new(Near {
            client,
            timeout,
            shard_budget,
            // A record larger than a sixteenth of its shard (a 256th of the budget) is not
            // kept: one huge value must not push out everything else.
            max_value: shard_budget / 16,
            live: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            next_gen: AtomicU64::new(1),
            redirect: Mutex::new(None),
            connecting: AtomicBool::new(false),
            last_failure: Mutex::new(None),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }))
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        // Keys end in a hex digest (and a part name): the bytes before the last ':' vary.
        let b = key.as_bytes();
        let h = b
            .iter()
            .rev()
            .skip(2)
            .take(8)
            .fold(0usize, |h, &c| h.wrapping_mul(31).wrapping_add(c as usize));
        &self.shards[h % SHARDS]
    }

    /// A kept record, while the tracking connection is live.
    pub(super) fn get(&self, key: &str) -> Option<Bytes> {
        if self.live.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut shard = lock(self.shard(key));
        match shard.map.get(key) {
            Some((v, None)) => Some(v.clone()),
            Some((v, Some(until))) => {
                if Instant::now() < *until {
                    return Some(v.clone());
                }
                let len = v.len();
                shard.map.remove(key);
                shard.bytes = shard.bytes.saturating_sub(key.len() + len + OVERHEAD);
                None
            }
            None => None,
        }
    }

    /// What a read on a connection tracked as `tracked` must remember; `None` when its value
    /// may not be kept (no live tracking connection, or this connection not yet pointed at it).
    pub(super) fn ticket(&self, tracked: &Tracked) -> Option<Ticket> {
        let generation = self.live.load(Ordering::SeqCst);
        if generation == 0 || tracked.generation.load(Ordering::SeqCst) != generation {
            return None;
        }
        Some(Ticket {
            generation,
            epoch: self.epoch.load(Ordering::SeqCst),
        })
    }

    /// Keeps `value` read under `ticket`, with the key's remaining TTL in Redis, unless
    /// anything was invalidated since.
    pub(super) fn put(&self, ticket: Ticket, key: &str, value: &Bytes, ttl: Option<Duration>) {
        if value.len() > self.max_value {
            return;
        }
        let until = ttl.map(|d| Instant::now() + d);
        let cost = key.len() + value.len() + OVERHEAD;
        let mut shard = lock(self.shard(key));
        if self.live.load(Ordering::SeqCst) != ticket.generation
            || self.epoch.load(Ordering::SeqCst) != ticket.epoch
        {
            return;
        }
        if shard.bytes + cost > self.shard_budget {
            // Over budget: drop about a quarter of the shard (arbitrary records; a hot one is
            // read back at its next use).
            let target = self.shard_budget * 3 / 4;
            let mut freed = 0usize;
            let over = (shard.bytes + cost).saturating_sub(target);
            shard.map.retain(|k, (v, _)| {
                if freed >= over {
                    return true;
                }
                freed += k.len() + v.len() + OVERHEAD;
                false
            });
            shard.bytes = shard.bytes.saturating_sub(freed);
        }
        if let Some((old, _)) = shard.map.insert(key.into(), (value.clone(), until)) {
            shard.bytes = shard.bytes.saturating_sub(key.len() + old.len() + OVERHEAD);
        }
        shard.bytes += cost;
    }

    /// Drops `key` (our own write or a refreshed entry: no need to wait for Redis's message).
    pub(super) fn forget(&self, key: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut shard = lock(self.shard(key));
        if let Some((old, _)) = shard.map.remove(key) {
            shard.bytes = shard.bytes.saturating_sub(key.len() + old.len() + OVERHEAD);
        }
    }

    fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for s in self.shards.iter() {
            let mut s = lock(s);
            s.map.clear();
            s.bytes = 0;
        }
    }

    /// The live tracking connection's generation and client id.
    pub(super) fn redirect(&self) -> Option<(u64, i64)> {
        *lock(&self.redirect)
    }

    /// Points a data connection at the live tracking connection, once per generation. Called
    /// before a read whose connection is not yet tracked; the read itself is not kept.
    pub(super) async fn track(&self, tracked: &Tracked, conn: &mut MultiplexedConnection) {
        let Some((generation, id)) = self.redirect() else {
            return;
        };
        if tracked.generation.load(Ordering::SeqCst) == generation
            || tracked.busy.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let mut cmd = redis::cmd("CLIENT");
        cmd.arg("TRACKING").arg("ON").arg("REDIRECT").arg(id);
        match tokio::time::timeout(self.timeout, cmd.query_async::<Value>(conn)).await {
            Ok(Ok(_)) => tracked.generation.store(generation, Ordering::SeqCst),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis CLIENT TRACKING failed; the near cache stays empty for this connection")
            }
            Err(_) => tracing::debug!("redis CLIENT TRACKING timed out"),
        }
        tracked.busy.store(false, Ordering::Release);
    }

    /// Makes the tracking connection in the background when there is none (at most one attempt
    /// at a time, none within the reconnect backoff of a failure).
    pub(super) fn kick(self: &Arc<Self>) {
        if self.live.load(Ordering::Acquire) != 0 || self.connecting.load(Ordering::Acquire) {
            return;
        }
        if let Some(t) = *lock(&self.last_failure) {
            if t.elapsed() < RECONNECT_BACKOFF {
                return;
            }
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        handle.spawn(async move { this.connect().await });
    }

    /// Makes the tracking connection now, unless there is one or another call is making it;
    /// true when there is one afterwards.
    pub(super) async fn connect(self: &Arc<Self>) -> bool {
        if self.live.load(Ordering::Acquire) != 0 {
            return true;
        }
        if self.connecting.swap(true, Ordering::AcqRel) {
            return false;
        }
        let ok = self.make().await;
        *lock(&self.last_failure) = if ok { None } else { Some(Instant::now()) };
        self.connecting.store(false, Ordering::Release);
        ok
    }

    async fn make(self: &Arc<Self>) -> bool {
        let (tx, rx) = mpsc::unbounded_channel::<PushInfo>();
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_push_sender(tx);
        let made = tokio::time::timeout(self.timeout, async {
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await?;
            let id: i64 = redis::cmd("CLIENT")
                .arg("ID")
                .query_async(&mut conn)
                .await?;
            Ok::<_, RedisError>((conn, id))
        })
        .await;
        let (conn, id) = match made {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis near cache: tracking connection failed");
                return false;
            }
            Err(_) => {
                tracing::debug!("redis near cache: tracking connection timed out");
                return false;
            }
        };
        let generation = self.next_gen.fetch_add(1, Ordering::Relaxed);
        // Nothing kept under an earlier generation survives (it was flushed when that one was
        // lost; this covers a loss we did not see).
        self.flush();
        *lock(&self.redirect) = Some((generation, id));
        self.live.store(generation, Ordering::SeqCst);
        tokio::spawn(dispatch(Arc::downgrade(self), generation, rx));
        tokio::spawn(watch(Arc::downgrade(self), generation, conn));
        true
    }

    /// The tracking connection of `generation` is gone: drop everything, keep nothing until
    /// the next one.
    fn broken(&self, generation: u64) {
        let mut r = lock(&self.redirect);
        if r.map(|(g, _)| g) != Some(generation) {
            return;
        }
        *r = None;
        self.live.store(0, Ordering::SeqCst);
        drop(r);
        self.flush();
        tracing::debug!("redis near cache: tracking connection lost; flushed");
    }

    fn invalidate(&self, keys: &[Value]) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for k in keys {
            let key = match k {
                Value::BulkString(b) => std::str::from_utf8(b).ok(),
                Value::SimpleString(s) => Some(s.as_str()),
                _ => None,
            };
            match key {
                Some(key) => {
                    let mut shard = lock(self.shard(key));
                    if let Some((old, _)) = shard.map.remove(key) {
                        shard.bytes = shard.bytes.saturating_sub(key.len() + old.len() + OVERHEAD);
                    }
                }
                // A key we cannot name: drop everything rather than keep it.
                None => self.flush(),
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }
}

/// Owned by one tracking connection: applies its invalidations; ends when it breaks.
async fn dispatch(near: Weak<Near>, generation: u64, mut rx: mpsc::UnboundedReceiver<PushInfo>) {
    while let Some(push) = rx.recv().await {
        let Some(this) = near.upgrade() else {
            return;
        };
        match push.kind {
            PushKind::Invalidate => match push.data.first() {
                Some(Value::Array(keys)) | Some(Value::Set(keys)) => this.invalidate(keys),
                // `FLUSHALL` / `FLUSHDB`: a null list.
                _ => this.flush(),
            },
            PushKind::Disconnection => {
                this.broken(generation);
                return;
            }
            _ => {}
        }
    }
    if let Some(this) = near.upgrade() {
        this.broken(generation);
    }
}

/// Checks the tracking connection every second; an unanswered `PING` counts as lost (a silent
/// network failure would otherwise keep invalidations from arriving while hits are served).
async fn watch(near: Weak<Near>, generation: u64, mut conn: MultiplexedConnection) {
    loop {
        tokio::time::sleep(PING_EVERY).await;
        let Some(this) = near.upgrade() else {
            return;
        };
        if this.live.load(Ordering::Acquire) != generation {
            return;
        }
        let timeout = this.timeout;
        drop(this);
        let ping = redis::cmd("PING");
        let ok = matches!(
            tokio::time::timeout(timeout, ping.query_async::<Value>(&mut conn)).await,
            Ok(Ok(_))
        );
        if !ok {
            if let Some(this) = near.upgrade() {
                this.broken(generation);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near(budget: usize) -> Arc<Near> {
        let info = "redis://127.0.0.1:1"
            .parse::<ConnectionInfo>()
            .expect("a URL");
        Near::new(info, budget, Duration::from_millis(50)).expect("a client")
    }

    fn live(n: &Near) -> Tracked {
        n.live.store(7, Ordering::SeqCst);
        *lock(&n.redirect) = Some((7, 1));
        let t = Tracked::default();
        t.generation.store(7, Ordering::SeqCst);
        t
    }

    #[test]
    fn nothing_is_kept_or_served_without_a_live_tracking_connection() {
        let n = near(1 << 20);
        assert!(n.ticket(&Tracked::default()).is_none());
        let t = live(&n);
        let ticket = n.ticket(&t).expect("tracked");
        n.put(ticket, "ts:{ab}:e", &Bytes::from_static(b"v"), None);
        assert_eq!(n.get("ts:{ab}:e").as_deref(), Some(&b"v"[..]));
        n.broken(7);
        assert_eq!(n.get("ts:{ab}:e"), None);
        assert_eq!(n.len(), 0);
        assert!(n.ticket(&t).is_none());
    }

    #[test]
    fn an_invalidation_between_read_and_insert_wins() {
        let n = near(1 << 20);
        let t = live(&n);
        let ticket = n.ticket(&t).expect("tracked");
        n.invalidate(&[Value::BulkString(b"ts:{ab}:e".to_vec())]);
        n.put(ticket, "ts:{ab}:e", &Bytes::from_static(b"old"), None);
        assert_eq!(n.get("ts:{ab}:e"), None);
        // A later read is kept, and a later invalidation removes it.
        let ticket = n.ticket(&t).expect("tracked");
        n.put(ticket, "ts:{ab}:e", &Bytes::from_static(b"new"), None);
        assert_eq!(n.get("ts:{ab}:e").as_deref(), Some(&b"new"[..]));
        n.invalidate(&[Value::BulkString(b"ts:{ab}:e".to_vec())]);
        assert_eq!(n.get("ts:{ab}:e"), None);
    }

    #[test]
    fn a_record_is_not_served_past_its_redis_ttl() {
        let n = near(1 << 20);
        let t = live(&n);
        let ticket = n.ticket(&t).expect("tracked");
        n.put(
            ticket,
            "ts:{ab}:e",
            &Bytes::from_static(b"v"),
            Some(Duration::ZERO),
        );
        assert_eq!(n.get("ts:{ab}:e"), None);
        assert_eq!(n.len(), 0);
        n.put(
            ticket,
            "ts:{cd}:e",
            &Bytes::from_static(b"v"),
            Some(Duration::from_secs(60)),
        );
        assert!(n.get("ts:{cd}:e").is_some());
    }

    #[test]
    fn a_connection_pointed_at_an_older_generation_gets_no_ticket() {
        let n = near(1 << 20);
        let t = live(&n);
        n.live.store(8, Ordering::SeqCst);
        assert!(n.ticket(&t).is_none());
    }

    #[test]
    fn the_budget_holds_and_large_values_are_not_kept() {
        let n = near(SHARDS * 4096);
        let t = live(&n);
        let big = Bytes::from(vec![b'x'; 4096 / 16 + 1]);
        n.put(n.ticket(&t).unwrap(), "ts:{big}:e", &big, None);
        assert_eq!(n.get("ts:{big}:e"), None);
        let v = Bytes::from(vec![b'y'; 100]);
        for i in 0..2000 {
            n.put(
                n.ticket(&t).unwrap(),
                &format!("ts:{{{i:08x}}}:e"),
                &v,
                None,
            );
        }
        for s in n.shards.iter() {
            let s = lock(s);
            assert!(s.bytes <= 4096, "shard holds {} bytes", s.bytes);
            let counted: usize = s
                .map
                .iter()
                .map(|(k, (v, _))| k.len() + v.len() + OVERHEAD)
                .sum();
            assert_eq!(counted, s.bytes);
        }
        assert!(n.len() > 0);
    }
}
