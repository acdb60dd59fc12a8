//! The embedded in-process backend: the default.
//!
//! Bounded by a byte budget with sampled-LRU eviction (the approximation Redis uses: sample a few
//! slots, evict the least recently used one that holds no live lease). Entries and leases expire
//! on `tokio::time`, so tests can drive them with a paused clock. Signals go through
//! `tokio::sync::broadcast`, one channel per slot with waiters.
//!
//! One lock per shard makes every contract operation atomic. Two engines that share one
//! `MemoryBackend` (clone it) behave like two instances sharing one Redis, which is how the
//! engine's cross-instance tests run without a server.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{
    fence_allows, next_fence, Acquire, Backend, BackendResult, BoxFuture, FencedWrite, Fetched,
    Signal, SignalStream, Subscription, Token, WriteOutcome,
};
use crate::entry::{Header, Kind, Record};
use crate::key::Digest;

const SHARDS: usize = 16;
const SLOT_OVERHEAD: usize = 96;
const EVICTION_SAMPLES: usize = 5;

/// The in-memory backend. Cloning shares the store.
#[derive(Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

struct Shared {
    shards: Vec<Mutex<Shard>>,
    shard_budget: usize,
    signals: Mutex<HashMap<Digest, broadcast::Sender<Signal>>>,
}

#[derive(Default)]
struct Shard {
    slots: HashMap<Digest, Slot>,
    order: Vec<Digest>,
    bytes: usize,
    /// The highest fence of any slot evicted from this shard. New slots start their counter
    /// here, so evicting a slot (its counter and its tombstone with it) never lets a later grant
    /// fall below a fence that a stalled holder may still write with.
    fence_floor: u64,
}

struct Slot {
    entry: Option<Item>,
    variants: Vec<(Digest, Item)>,
    lease: Option<Lease>,
    counter: u64,
    last_used: Instant,
    idx: usize,
    accounted: usize,
}

#[derive(Clone, Copy)]
struct Lease {
    token: Token,
    expires: Instant,
    /// Marked by [`Backend::fail`]: the holder's fill failed.
    failed: bool,
}

struct Item {
    bytes: Bytes,
    expires: Instant,
}

impl Item {
    fn live(&self, now: Instant) -> bool {
        now < self.expires
    }
}

impl Slot {
    fn size(&self) -> usize {
        SLOT_OVERHEAD
            + self.entry.as_ref().map_or(0, |i| i.bytes.len())
            + self
                .variants
                .iter()
                .map(|(_, i)| i.bytes.len() + 48)
                .sum::<usize>()
    }

    fn live_lease(&self, now: Instant) -> Option<Lease> {
        self.lease.filter(|l| now < l.expires)
    }

    fn entry_header(&self, now: Instant) -> Option<Header> {
        self.entry
            .as_ref()
            .filter(|i| i.live(now))
            .and_then(|i| Header::parse(&i.bytes))
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new(64 * 1024 * 1024)
    }
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("budget", &(self.shared.shard_budget * SHARDS))
            .finish()
    }
}

impl MemoryBackend {
    /// A store that keeps at most about `budget_bytes` of records (keys, values and a small
    /// per-key overhead), evicting the least recently used beyond that. The budget is split
    /// over 16 shards and a record must fit one: a larger one is refused
    /// ([`WriteOutcome::TooLarge`], so its key is passed through); see
    /// [`max_record_bytes`](Self::max_record_bytes).
    pub fn new(budget_bytes: usize) -> Self {
        MemoryBackend {
            shared: Arc::new(Shared {
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                shard_budget: (budget_bytes / SHARDS).max(1),
                signals: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The bytes currently accounted to the store.
    pub fn used_bytes(&self) -> usize {
        self.shared.shards.iter().map(|s| lock(s).bytes).sum()
    }

    /// Deletes a slot's fence counter, as an eviction or a restart of an external store would.
    /// For tests of the rule that fences never go backwards.
    pub fn forget_fence_counter(&self, slot: &Digest) {
        if let Some(s) = lock(self.shard(slot)).slots.get_mut(slot) {
            s.counter = 0;
        }
    }

    /// Deletes everything stored for a slot (entry, variants, lease, counter), as an eviction
    /// would.
    pub fn evict(&self, slot: &Digest) {
        let mut shard = lock(self.shard(slot));
        shard.remove(slot);
    }

    /// The largest record (the encoded value, with the engine's header and metadata) this
    /// store keeps: one shard's share of the budget, less a slot's overhead.
    pub fn max_record_bytes(&self) -> usize {
        self.shared.shard_budget.saturating_sub(SLOT_OVERHEAD)
    }

    /// Writes raw bytes at a slot's entry key, bypassing every check. For tests that put garbage
    /// in the store.
    pub fn put_raw(&self, slot: &Digest, bytes: Bytes, ttl: Duration) {
        let now = Instant::now();
        let mut shard = lock(self.shard(slot));
        let s = shard.slot_mut(slot, now);
        s.entry = Some(Item {
            bytes,
            expires: until(now, ttl),
        });
        shard.account(slot);
        shard.evict_over(self.shared.shard_budget, now);
    }

    fn shard(&self, slot: &Digest) -> &Mutex<Shard> {
        &self.shared.shards[slot.as_bytes()[0] as usize % SHARDS]
    }

    /// Sets the lease to end `ttl` from now, only while `token` holds it: `extend` (`failed`
    /// false: a lease marked failed is not extended) or `fail` (marks it failed).
    fn rewrite_lease(&self, slot: &Digest, token: Token, ttl: Duration, failed: bool) -> bool {
        let now = Instant::now();
        let mut shard = lock(self.shard(slot));
        let Some(s) = shard.slots.get_mut(slot) else {
            return false;
        };
        match s.live_lease(now) {
            Some(l) if l.token == token && (failed || !l.failed) => {
                s.lease = Some(Lease {
                    token,
                    expires: until(now, ttl),
                    failed,
                });
                true
            }
            _ => false,
        }
    }

    fn publish(&self, slot: &Digest, signal: Signal) {
        let mut map = self
            .shared
            .signals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(slot) {
            if tx.send(signal).is_err() {
                map.remove(slot);
            }
        }
    }
}

/// `now + ttl`, saturating far in the future instead of overflowing.
fn until(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(10 * 365 * 24 * 3600))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a slot half-written in a way that matters
    // more than losing the process's cache, so keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shard {
    fn slot_mut(&mut self, slot: &Digest, now: Instant) -> &mut Slot {
        if !self.slots.contains_key(slot) {
            let idx = self.order.len();
            self.order.push(*slot);
            self.bytes += SLOT_OVERHEAD;
            self.slots.insert(
                *slot,
                Slot {
                    entry: None,
                    variants: Vec::new(),
                    lease: None,
                    counter: self.fence_floor,
                    last_used: now,
                    idx,
                    accounted: SLOT_OVERHEAD,
                },
            );
        }
        let s = self.slots.get_mut(slot).expect("inserted above");
        s.last_used = now;
        s
    }

    /// Recomputes a slot's accounted size after a change.
    fn account(&mut self, slot: &Digest) {
        if let Some(s) = self.slots.get_mut(slot) {
            let now = s.size();
            self.bytes = (self.bytes + now).saturating_sub(s.accounted);
            s.accounted = now;
        }
    }

    fn remove(&mut self, slot: &Digest) {
        if let Some(s) = self.slots.remove(slot) {
            let entry_fence = s
                .entry
                .as_ref()
                .and_then(|i| Header::parse(&i.bytes))
                .map_or(0, |h| h.fence);
            self.fence_floor = self.fence_floor.max(s.counter).max(entry_fence);
            self.bytes = self.bytes.saturating_sub(s.accounted);
            let idx = s.idx;
            self.order.swap_remove(idx);
            if let Some(moved) = self.order.get(idx).copied() {
                if let Some(m) = self.slots.get_mut(&moved) {
                    m.idx = idx;
                }
            }
        }
    }

    fn evict_over(&mut self, budget: usize, now: Instant) {
        let mut rounds = 0;
        while self.bytes > budget && !self.order.is_empty() && rounds < 64 {
            rounds += 1;
            let mut victim: Option<(Digest, Instant)> = None;
            // A small shard is scanned whole (exact LRU); a larger one sampled. Sampling a
            // handful of slots with replacement could otherwise draw the same recently used
            // slot every time and evict it.
            let n = self.order.len();
            let exact = n <= EVICTION_SAMPLES;
            for k in 0..EVICTION_SAMPLES.min(n) {
                let d = self.order[if exact { k } else { fastrand::usize(..n) }];
                let s = &self.slots[&d];
                if s.live_lease(now).is_some() {
                    continue;
                }
                if victim.is_none_or(|(_, t)| s.last_used < t) {
                    victim = Some((d, s.last_used));
                }
            }
            match victim {
                Some((d, _)) => {
                    self.remove(&d);
                    metrics::counter!("stampede_memory_evictions_total").increment(1);
                }
                None => continue,
            }
        }
    }
}

impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn fetch<'a>(
        &'a self,
        slot: &'a Digest,
        variant: Option<&'a Digest>,
    ) -> BoxFuture<'a, BackendResult<Fetched>> {
        let now = Instant::now();
        let mut shard = lock(self.shard(slot));
        let out = match shard.slots.get_mut(slot) {
            None => Fetched::default(),
            Some(s) => {
                s.last_used = now;
                let entry = s
                    .entry
                    .as_ref()
                    .filter(|i| i.live(now))
                    .map(|i| i.bytes.clone());
                let variant = variant.and_then(|v| {
                    s.variants
                        .iter()
                        .find(|(d, i)| d == v && i.live(now))
                        .map(|(_, i)| i.bytes.clone())
                });
                Fetched { entry, variant }
            }
        };
        drop(shard);
        Box::pin(std::future::ready(Ok(out)))
    }

    fn try_acquire<'a>(
        &'a self,
        slot: &'a Digest,
        ttl: Duration,
        seen_fence: u64,
    ) -> BoxFuture<'a, BackendResult<Acquire>> {
        let now = Instant::now();
        let mut shard = lock(self.shard(slot));
        let s = shard.slot_mut(slot, now);
        let out = if let Some(l) = s.live_lease(now) {
            Acquire::Held {
                remaining: l.expires - now,
                failed: l.failed,
            }
        } else {
            let stored = s.entry_header(now).map_or(0, |h| h.fence);
            if stored != seen_fence {
                Acquire::Refreshed
            } else {
                let fence = next_fence(s.counter, stored);
                s.counter = fence;
                let token = Token::random();
                s.lease = Some(Lease {
                    token,
                    expires: until(now, ttl),
                    failed: false,
                });
                Acquire::Acquired { token, fence }
            }
        };
        // A slot made here (a lease with no write yet, e.g. a failing fill) counts against the
        // budget like any other.
        shard.evict_over(self.shared.shard_budget, now);
        drop(shard);
        Box::pin(std::future::ready(Ok(out)))
    }

    fn extend<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        let ok = self.rewrite_lease(slot, token, ttl, false);
        Box::pin(std::future::ready(Ok(ok)))
    }

    fn release<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        signal: Signal,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        let now = Instant::now();
        let mut shard = lock(self.shard(slot));
        let ok = match shard.slots.get_mut(slot) {
            Some(s) => match s.live_lease(now) {
                Some(l) if l.token == token => {
                    s.lease = None;
                    true
                }
                _ => false,
            },
            None => false,
        };
        drop(shard);
        if ok {
            self.publish(slot, signal);
        }
        Box::pin(std::future::ready(Ok(ok)))
    }

    fn write(&self, w: FencedWrite) -> BoxFuture<'_, BackendResult<WriteOutcome>> {
        let now = Instant::now();
        let size = w.entry.len() + w.variant.as_ref().map_or(0, |(_, b)| b.len());
        let mut shard = lock(self.shard(&w.slot));
        let s = shard.slot_mut(&w.slot, now);
        let outcome = if !fence_allows(s.entry_header(now).as_ref(), w.fence, w.token) {
            WriteOutcome::Fenced
        } else if size + SLOT_OVERHEAD > self.shared.shard_budget {
            WriteOutcome::TooLarge
        } else {
            s.entry = Some(Item {
                bytes: w.entry.clone(),
                expires: until(now, w.entry_ttl),
            });
            s.counter = s.counter.max(w.fence);
            if let Some((vd, vb)) = &w.variant {
                s.variants.retain(|(d, i)| d != vd && i.live(now));
                s.variants.push((
                    *vd,
                    Item {
                        bytes: vb.clone(),
                        expires: until(now, w.variant_ttl),
                    },
                ));
            }
            WriteOutcome::Stored
        };
        if outcome == WriteOutcome::TooLarge {
            // Nothing written, lease untouched, no signal: the engine writes a pass marker next.
            drop(shard);
            return Box::pin(std::future::ready(Ok(outcome)));
        }
        if w.release && matches!(s.live_lease(now), Some(l) if l.token == w.token) {
            s.lease = None;
        }
        shard.account(&w.slot);
        shard.evict_over(self.shared.shard_budget, now);
        drop(shard);
        self.publish(&w.slot, w.signal);
        Box::pin(std::future::ready(Ok(outcome)))
    }

    fn invalidate<'a>(
        &'a self,
        slot: &'a Digest,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<u64>> {
        let now = Instant::now();
        let mut shard = lock(self.shard(slot));
        let s = shard.slot_mut(slot, now);
        let stored = s.entry_header(now).map_or(0, |h| h.fence);
        let fence = next_fence(s.counter, stored);
        s.counter = fence;
        s.entry = Some(Item {
            bytes: Record::encode_marker(Header {
                kind: Kind::Tombstone,
                fence,
                token: Token::NONE,
                epoch: fence,
            }),
            expires: until(now, ttl),
        });
        s.variants.clear();
        // The lease ends with it, live or failed: the next caller fills anew, and a fill from
        // before can neither mark it failed nor hold callers up (its write the tombstone fences).
        let ended = s.lease.take().is_some_and(|l| now < l.expires);
        shard.account(slot);
        shard.evict_over(self.shared.shard_budget, now);
        drop(shard);
        if ended {
            self.publish(slot, Signal::Released);
        }
        Box::pin(std::future::ready(Ok(fence)))
    }

    fn fail<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        let ok = self.rewrite_lease(slot, token, ttl, true);
        if ok {
            self.publish(slot, Signal::Failed);
        }
        Box::pin(std::future::ready(Ok(ok)))
    }

    fn subscribe<'a>(
        &'a self,
        slot: &'a Digest,
    ) -> BoxFuture<'a, BackendResult<Option<Subscription>>> {
        let rx = {
            let mut map = self
                .shared
                .signals
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            map.entry(*slot)
                .or_insert_with(|| broadcast::channel(16).0)
                .subscribe()
        };
        let sub = Subscription::new(MemorySubscription {
            rx: Some(rx),
            slot: *slot,
            shared: self.shared.clone(),
        });
        Box::pin(std::future::ready(Ok(Some(sub))))
    }
}

struct MemorySubscription {
    rx: Option<broadcast::Receiver<Signal>>,
    slot: Digest,
    shared: Arc<Shared>,
}

impl SignalStream for MemorySubscription {
    fn next(self: Pin<&mut Self>) -> BoxFuture<'_, Option<Signal>> {
        let this = self.get_mut();
        Box::pin(async move {
            // Lagged (some signals lost) reads as a broken subscription: the caller re-reads,
            // as after a reconnect.
            match this.rx.as_mut() {
                Some(rx) => rx.recv().await.ok(),
                None => None,
            }
        })
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        let mut map = self
            .shared
            .signals
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Drop our receiver under the lock, so two subscriptions dropping at once cannot both
        // see the other still there and leave the channel behind.
        drop(self.rx.take());
        if map
            .get(&self.slot)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            map.remove(&self.slot);
        }
    }
}
