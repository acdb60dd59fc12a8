//! The in-process store behind the near caches of the Redis and Memcached backends: records
//! read from the store, by key, under a byte budget, each with a deadline.
//!
//! Every removal (invalidation, flush) bumps an epoch *before* it removes anything; a read takes
//! a [`Ticket`] (the epoch) before it is sent, and [`NearStore::put`] keeps its value only if the
//! epoch is unchanged, checked under the shard's lock that the removal takes too. So a value read
//! before an invalidation was applied is never kept after it; at worst a hot key's value is not
//! kept this time and is read again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;

use super::Fetched;

const SHARDS: usize = 16;
/// The bookkeeping cost of one kept record beyond its key and value.
const OVERHEAD: usize = 64;

pub(crate) struct NearStore {
    shard_budget: usize,
    max_value: usize,
    epoch: AtomicU64,
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Default)]
struct Shard {
    /// A record and when it stops being served (`None`: only an invalidation removes it).
    map: HashMap<Box<str>, (Bytes, Option<Instant>)>,
    bytes: usize,
}

impl Shard {
    fn remove(&mut self, key: &str) {
        if let Some((old, _)) = self.map.remove(key) {
            self.bytes = self.bytes.saturating_sub(key.len() + old.len() + OVERHEAD);
        }
    }
}

/// A whole `fetch` answered from kept records (the entry, and the variant when one is asked
/// for), or `None` when any of them is not kept.
pub(crate) fn kept(
    get: impl Fn(&str) -> Option<Bytes>,
    entry_key: &str,
    variant_key: Option<&str>,
) -> Option<Fetched> {
    let entry = Some(get(entry_key)?);
    let variant = match variant_key {
        Some(k) => Some(get(k)?),
        None => None,
    };
    Some(Fetched { entry, variant })
}

/// What a read remembers from before it was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NearStore {
    pub(crate) fn new(budget: usize) -> Self {
        let shard_budget = budget / SHARDS;
        NearStore {
            shard_budget,
            // A record larger than a sixteenth of its shard (a 256th of the budget) is not
            // kept: one huge value must not push out everything else.
            max_value: shard_budget / 16,
            epoch: AtomicU64::new(0),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        // Keys end in a hex digest and a part name: hash the bytes just before the last two.
        let h = key
            .as_bytes()
            .iter()
            .rev()
            .skip(2)
            .take(8)
            .fold(0usize, |h, &c| h.wrapping_mul(31).wrapping_add(c as usize));
        &self.shards[h % SHARDS]
    }

    /// A kept record, unless past its deadline.
    pub(crate) fn get(&self, key: &str) -> Option<Bytes> {
        let mut shard = lock(self.shard(key));
        match shard.map.get(key) {
            Some((v, None)) => Some(v.clone()),
            Some((v, Some(until))) if Instant::now() < *until => Some(v.clone()),
            Some(_) => {
                shard.remove(key);
                None
            }
            None => None,
        }
    }

    /// To take before sending a read whose value may be kept.
    pub(crate) fn ticket(&self) -> Ticket {
        Ticket(self.epoch.load(Ordering::SeqCst))
    }

    /// Keeps `value`, read under `ticket`, until `until`, unless anything was removed since.
    pub(crate) fn put(&self, ticket: Ticket, key: &str, value: &Bytes, until: Option<Instant>) {
        if value.len() > self.max_value {
            return;
        }
        let cost = key.len() + value.len() + OVERHEAD;
        let mut shard = lock(self.shard(key));
        if self.epoch.load(Ordering::SeqCst) != ticket.0 {
            return;
        }
        if shard.bytes + cost > self.shard_budget {
            // Over budget: drop about a quarter of the shard (arbitrary records; a hot one is
            // read back at its next use).
            let over = (shard.bytes + cost).saturating_sub(self.shard_budget * 3 / 4);
            let mut freed = 0usize;
            shard.map.retain(|k, (v, _)| {
                if freed >= over {
                    return true;
                }
                freed += k.len() + v.len() + OVERHEAD;
                false
            });
            shard.bytes = shard.bytes.saturating_sub(freed);
        }
        shard.remove(key);
        shard.map.insert(key.into(), (value.clone(), until));
        shard.bytes += cost;
    }

    /// Drops `key` (and voids the tickets of reads in flight).
    pub(crate) fn forget(&self, key: &str) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        lock(self.shard(key)).remove(key);
    }

    /// Drops everything (and voids the tickets of reads in flight).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for s in self.shards.iter() {
            let mut s = lock(s);
            s.map.clear();
            s.bytes = 0;
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).map.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_removal_between_read_and_insert_wins() {
        let n = NearStore::new(1 << 20);
        let ticket = n.ticket();
        n.forget("ts:{ab}:e");
        n.put(ticket, "ts:{ab}:e", &Bytes::from_static(b"old"), None);
        assert_eq!(n.get("ts:{ab}:e"), None);
        let ticket = n.ticket();
        n.put(ticket, "ts:{ab}:e", &Bytes::from_static(b"new"), None);
        assert_eq!(n.get("ts:{ab}:e").as_deref(), Some(&b"new"[..]));
        n.flush();
        assert_eq!(n.get("ts:{ab}:e"), None);
    }

    #[test]
    fn a_record_is_not_served_past_its_deadline() {
        let n = NearStore::new(1 << 20);
        let t = n.ticket();
        n.put(
            t,
            "ts:{ab}:e",
            &Bytes::from_static(b"v"),
            Some(Instant::now()),
        );
        assert_eq!(n.get("ts:{ab}:e"), None);
        assert_eq!(n.len(), 0);
        let later = Instant::now() + Duration::from_secs(60);
        n.put(t, "ts:{cd}:e", &Bytes::from_static(b"v"), Some(later));
        assert!(n.get("ts:{cd}:e").is_some());
    }

    #[test]
    fn the_budget_holds_and_large_values_are_not_kept() {
        let n = NearStore::new(SHARDS * 4096);
        let big = Bytes::from(vec![b'x'; 4096 / 16 + 1]);
        n.put(n.ticket(), "ts:{big}:e", &big, None);
        assert_eq!(n.get("ts:{big}:e"), None);
        let v = Bytes::from(vec![b'y'; 100]);
        for i in 0..2000 {
            n.put(n.ticket(), &format!("ts:{{{i:08x}}}:e"), &v, None);
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
