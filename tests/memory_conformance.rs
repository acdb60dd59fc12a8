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
