//! The in-process store behind the near caches of the Redis and Memcached backends: records
//! read from the store, by key, under a byte budget, each with a deadline.
//!
//! Every removal (invalidation, flush) bumps its shard's epoch *before* it removes anything; a
//! read takes a [`Ticket`] (its key's shard and that shard's epoch) before it is sent, and
//! [`NearStore::put`] keeps its value only if the epoch is unchanged, checked under the shard's
//! lock that the removal takes too. So a value read before an invalidation was applied is never
//! kept after it; at worst a hot key's value is not kept this time and is read again. Epochs are
//! per shard so that invalidations of other keys rarely void a read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;

use super::Fetched;
use crate::entry::record_fence;

const SHARDS: usize = 16;
/// The bookkeeping cost of one kept record beyond its key and value.
const OVERHEAD: usize = 64;

pub(crate) struct NearStore {
    shard_budget: usize,
    max_cost: usize,
    /// One per shard, bumped before anything is removed from it.
    epochs: Box<[AtomicU64]>,
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

/// What a read of one key remembers from before it was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket {
    shard: usize,
    epoch: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NearStore {
    pub(crate) fn new(budget: usize) -> Self {
        let shard_budget = budget / SHARDS;
        NearStore {
            shard_budget,
            // A record costing more than a sixteenth of its shard (a 256th of the budget) is
            // not kept: one huge value must not push out everything else.
            max_cost: shard_budget / 16,
            epochs: (0..SHARDS).map(|_| AtomicU64::new(0)).collect(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    fn index(key: &str) -> usize {
        // Keys end in a hex digest and a part name: hash the bytes just before the last two.
        let h = key
            .as_bytes()
            .iter()
            .rev()
            .skip(2)
            .take(8)
            .fold(0usize, |h, &c| h.wrapping_mul(31).wrapping_add(c as usize));
        h % SHARDS
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        &self.shards[Self::index(key)]
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

    /// To take before sending a read of `key` whose value may be kept.
    pub(crate) fn ticket(&self, key: &str) -> Ticket {
        let shard = Self::index(key);
        Ticket {
            shard,
            epoch: self.epochs[shard].load(Ordering::SeqCst),
        }
    }

    /// Keeps `value` of `key`, read under `ticket` (taken for `key`), until `until`, unless
    /// anything was removed from its shard since, or a record with a newer fence is kept for
    /// `key` (two reads in flight at once: the one sent first may answer last, with the older
    /// record, which must not replace the newer one that was already served).
    pub(crate) fn put(&self, ticket: Ticket, key: &str, value: &Bytes, until: Option<Instant>) {
        let cost = key.len() + value.len() + OVERHEAD;
        if cost > self.max_cost || ticket.shard != Self::index(key) {
            return;
        }
        // A copy: `value` may be a slice of a connection's read buffer (the Memcached client
        // hands values over without copying), which a kept slice would hold whole, 16 KiB or
        // more for a value of a few bytes, for as long as the record is kept. Made before the
        // shard's lock, which hits of this shard wait on.
        let owned = Bytes::copy_from_slice(value);
        let fence = record_fence(value);
        let mut shard = lock(&self.shards[ticket.shard]);
        if self.epochs[ticket.shard].load(Ordering::SeqCst) != ticket.epoch {
            return;
        }
        if shard
            .map
            .get(key)
            .is_some_and(|(kept, _)| record_fence(kept) > fence)
        {
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
        shard.map.insert(key.into(), (owned, until));
        shard.bytes += cost;
    }

    /// Drops `key` (and voids the tickets of reads in flight).
    pub(crate) fn forget(&self, key: &str) {
        let i = Self::index(key);
        self.epochs[i].fetch_add(1, Ordering::SeqCst);
        lock(&self.shards[i]).remove(key);
    }

    /// Drops everything (and voids the tickets of reads in flight).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn flush(&self) {
        for e in self.epochs.iter() {
            e.fetch_add(1, Ordering::SeqCst);
        }
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
        let ticket = n.ticket("ts:{ab}:e");
        n.forget("ts:{ab}:e");
        n.put(ticket, "ts:{ab}:e", &Bytes::from_static(b"old"), None);
        assert_eq!(n.get("ts:{ab}:e"), None);
        let ticket = n.ticket("ts:{ab}:e");
        n.put(ticket, "ts:{ab}:e", &Bytes::from_static(b"new"), None);
        assert_eq!(n.get("ts:{ab}:e").as_deref(), Some(&b"new"[..]));
        n.flush();
        assert_eq!(n.get("ts:{ab}:e"), None);
    }

    #[test]
    fn an_older_record_read_last_does_not_replace_a_newer_one() {
        let rec = crate::entry::Record::pass_with_fence;
        let n = NearStore::new(1 << 20);
        let k = "ts:{ab}:e";
        // Two reads sent one after the other; the second answers first, with the newer record.
        let (first, second) = (n.ticket(k), n.ticket(k));
        n.put(second, k, &rec(7), None);
        n.put(first, k, &rec(6), None);
        assert_eq!(n.get(k), Some(rec(7)));
        // A newer one replaces it.
        n.put(n.ticket(k), k, &rec(8), None);
        assert_eq!(n.get(k), Some(rec(8)));
    }

    #[test]
    fn a_kept_record_does_not_hold_the_buffer_it_was_read_into() {
        let n = NearStore::new(1 << 20);
        let buffer = Bytes::from(vec![b'x'; 64 * 1024]);
        let value = buffer.slice(100..200);
        n.put(n.ticket("ts:{ab}:e"), "ts:{ab}:e", &value, None);
        let kept = n.get("ts:{ab}:e").unwrap();
        assert_eq!(kept, value);
        let inside = buffer.as_ptr_range();
        assert!(
            !inside.contains(&kept.as_ptr()),
            "the kept record is a slice of the buffer"
        );
    }

    #[test]
    fn a_removal_in_another_shard_does_not_void_a_read() {
        let n = NearStore::new(1 << 20);
        let (a, b) = ("ts:{aaaaaaaa}:e", "ts:{bbbbbbbb}:e");
        assert_ne!(NearStore::index(a), NearStore::index(b));
        let ticket = n.ticket(a);
        n.forget(b);
        n.put(ticket, a, &Bytes::from_static(b"v"), None);
        assert!(n.get(a).is_some());
        // A ticket taken for another key keeps nothing.
        n.put(n.ticket(b), a, &Bytes::from_static(b"w"), None);
        assert_eq!(n.get(a).as_deref(), Some(&b"v"[..]));
    }

    #[test]
    fn a_record_is_not_served_past_its_deadline() {
        let n = NearStore::new(1 << 20);
        let t = n.ticket("ts:{ab}:e");
        n.put(
            t,
            "ts:{ab}:e",
            &Bytes::from_static(b"v"),
            Some(Instant::now()),
        );
        assert_eq!(n.get("ts:{ab}:e"), None);
        assert_eq!(n.len(), 0);
        let later = Instant::now() + Duration::from_secs(60);
        let t = n.ticket("ts:{cd}:e");
        n.put(t, "ts:{cd}:e", &Bytes::from_static(b"v"), Some(later));
        assert!(n.get("ts:{cd}:e").is_some());
    }

    #[test]
    fn the_budget_holds_and_large_values_are_not_kept() {
        let n = NearStore::new(SHARDS * 4096);
        let big = Bytes::from(vec![b'x'; 4096 / 16]);
        n.put(n.ticket("ts:{big}:e"), "ts:{big}:e", &big, None);
        assert_eq!(n.get("ts:{big}:e"), None);
        let v = Bytes::from(vec![b'y'; 100]);
        for i in 0..2000 {
            let k = format!("ts:{{{i:08x}}}:e");
            n.put(n.ticket(&k), &k, &v, None);
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
