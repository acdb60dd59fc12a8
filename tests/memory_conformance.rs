//! The conformance suite on the in-memory backend.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::conformance::{self, Harness};
use tower_stampede::backend::memory::MemoryBackend;

fn harness() -> Harness {
    let mem = MemoryBackend::default();
    let m2 = mem.clone();
    Harness {
        backend: Arc::new(mem),
        short_lease: Duration::from_millis(100),
        expiry_slack: Duration::from_millis(50),
        signals: true,
        forget_counter: Arc::new(move |d| {
            m2.forget_fence_counter(&d);
            Box::pin(async {})
        }),
    }
}

/// The harness, and nothing that must outlive a test.
async fn made() -> (Harness, ()) {
    (harness(), ())
}

conformance_suite!(suite, made);

#[tokio::test]
async fn budget_evicts_least_recently_used() {
    use tower_stampede::backend::{Acquire, Backend};
    let mem = MemoryBackend::new(64 * 1024);
    let value = vec![7u8; 1024];
    let ttl = Duration::from_secs(60);
    let slot = |i: u32| tower_stampede::Digest::of_key(i.to_le_bytes());
    for i in 0..500u32 {
        let s = slot(i);
        let Acquire::Acquired { token, fence } = mem.try_acquire(&s, ttl, 0).await.unwrap() else {
            panic!("fresh slot must be free")
        };
        let w = conformance::write(s, token, fence, &value, ttl);
        mem.write(w).await.unwrap();
        // Slot 0 is read before every write: always the most recently used.
        assert!(
            mem.fetch(&slot(0), None).await.unwrap().entry.is_some(),
            "slot 0, read before every write, was evicted at write {i}"
        );
    }
    let used = mem.used_bytes();
    assert!(
        used <= 64 * 1024,
        "store holds {used} bytes over its 64 KiB budget"
    );
    // The most recent write is still there; the early slots nobody read again are gone (the
    // eviction samples, so allow a few survivors).
    assert!(mem.fetch(&slot(499), None).await.unwrap().entry.is_some());
    let mut early = 0;
    for i in 1..=100 {
        early += mem.fetch(&slot(i), None).await.unwrap().entry.is_some() as usize;
    }
    assert!(
        early <= 10,
        "{early} of the 100 oldest unread slots survived"
    );
}

/// A record of exactly `max_record_bytes` is kept and one byte more is refused, so what the
/// proxy warns about at start is what the store does.
#[tokio::test]
async fn max_record_bytes_is_the_largest_record_kept() {
    use tower_stampede::backend::{Acquire, Backend, WriteOutcome};
    use tower_stampede::Digest;
    let mem = MemoryBackend::new(16 * 4096);
    let max = mem.max_record_bytes();
    assert_eq!(max, 4096 - 96);
    for (i, extra) in [(0u8, 0usize), (1, 1)] {
        let slot = Digest::of_key([i]);
        let Acquire::Acquired { token, fence } = mem
            .try_acquire(&slot, Duration::from_secs(5), 0)
            .await
            .unwrap()
        else {
            panic!("free slot");
        };
        let header = conformance::write(slot, token, fence, b"", Duration::from_secs(60))
            .entry
            .len();
        let value = vec![b'x'; max - header + extra];
        let w = conformance::write(slot, token, fence, &value, Duration::from_secs(60));
        assert_eq!(w.entry.len(), max + extra);
        let want = if extra == 0 {
            WriteOutcome::Stored
        } else {
            WriteOutcome::TooLarge
        };
        assert_eq!(mem.write(w).await.unwrap(), want, "record of max + {extra}");
    }
}
