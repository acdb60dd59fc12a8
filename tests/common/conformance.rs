//! The backend conformance suite: plain async functions that every backend's tests call with a
//! [`Harness`]. A backend is done when every function here passes on it against a real server.
//!
//! Times are real (the servers count them), with margins wide enough for memcached's one-second
//! expiry granularity: each harness says how short a lease the backend can honour.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tower_stampede::backend::{Acquire, Backend, FencedWrite, Signal, Token, WriteOutcome};
use tower_stampede::entry::{Header, Kind, Meta, Record};
use tower_stampede::{Digest, Ttl};

type Hook = Arc<dyn Fn(Digest) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What the suite needs to know about one backend.
#[derive(Clone)]
pub struct Harness {
    pub backend: Arc<dyn Backend>,
    /// The shortest lease the backend honours precisely enough for an expiry test.
    pub short_lease: Duration,
    /// How long to wait past `short_lease` before asserting it expired.
    pub expiry_slack: Duration,
    /// Whether the backend has signals (pub/sub).
    pub signals: bool,
    /// Deletes the slot's fence counter (an eviction, a restart, a failover).
    pub forget_counter: Hook,
}

fn slot(name: &str) -> Digest {
    // Unique per run, so a suite can share one server with other tests.
    Digest::of_key(format!("{name}-{}", fastrand::u64(..)))
}

pub fn entry(fence: u64, token: Token, value: &[u8]) -> Bytes {
    let meta = Meta::new(0, &Ttl::fresh(Duration::from_secs(60)), Duration::ZERO);
    Record::encode_entry(
        Header {
            kind: Kind::Entry,
            fence,
            token,
            epoch: 0,
        },
        &meta,
        value,
    )
}

pub fn write(slot: Digest, token: Token, fence: u64, value: &[u8], ttl: Duration) -> FencedWrite {
    FencedWrite {
        slot,
        token,
        fence,
        entry: entry(fence, token, value),
        entry_ttl: ttl,
        variant: None,
        variant_ttl: Duration::ZERO,
        release: true,
        signal: Signal::Filled,
    }
}

fn value_of(b: &Option<Bytes>) -> Option<Vec<u8>> {
    match b.as_ref().and_then(Record::decode) {
        Some(Record::Entry { value, .. }) => Some(value.to_vec()),
        _ => None,
    }
}

async fn acquire(h: &Harness, s: &Digest, ttl: Duration, seen: u64) -> (Token, u64) {
    match h.backend.try_acquire(s, ttl, seen).await.unwrap() {
        Acquire::Acquired { token, fence } => (token, fence),
        other => panic!("expected Acquired, got {other:?}"),
    }
}

pub async fn lease_is_exclusive(h: &Harness) {
    let s = slot("exclusive");
    let ttl = Duration::from_secs(10);
    let (_t, f) = acquire(h, &s, ttl, 0).await;
    assert!(f >= 1);
    match h.backend.try_acquire(&s, ttl, 0).await.unwrap() {
        Acquire::Held { remaining, failed } => {
            assert!(
                remaining <= ttl && remaining > Duration::from_secs(5),
                "{remaining:?}"
            );
            assert!(!failed, "a fresh lease is not failed");
        }
        other => panic!("second acquire: {other:?}"),
    }
    // Many concurrent contenders: exactly one wins.
    let s = slot("exclusive-many");
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let b = h.backend.clone();
        tasks.push(tokio::spawn(async move {
            matches!(
                b.try_acquire(&s, ttl, 0).await.unwrap(),
                Acquire::Acquired { .. }
            )
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += t.await.unwrap() as usize;
    }
    assert_eq!(won, 1, "exactly one of 32 contenders holds the lease");
}

pub async fn lease_expires(h: &Harness) {
    let s = slot("expires");
    let (_t, f1) = acquire(h, &s, h.short_lease, 0).await;
    assert!(matches!(
        h.backend.try_acquire(&s, h.short_lease, 0).await.unwrap(),
        Acquire::Held { .. }
    ));
    tokio::time::sleep(h.short_lease + h.expiry_slack).await;
    let (_t, f2) = acquire(h, &s, h.short_lease, 0).await;
    assert!(f2 > f1, "fence grows: {f1} then {f2}");
}

pub async fn release_and_extend_need_the_token(h: &Harness) {
    let s = slot("token");
    let ttl = Duration::from_secs(10);
    let (t, _) = acquire(h, &s, ttl, 0).await;
    let other = Token::random();
    assert!(!h
        .backend
        .release(&s, other, Signal::Released)
        .await
        .unwrap());
    assert!(!h.backend.extend(&s, other, ttl).await.unwrap());
    assert!(matches!(
        h.backend.try_acquire(&s, ttl, 0).await.unwrap(),
        Acquire::Held { .. }
    ));
    assert!(h.backend.extend(&s, t, ttl).await.unwrap());
    assert!(h.backend.release(&s, t, Signal::Released).await.unwrap());
    // Released: free again, and releasing twice is refused.
    assert!(!h.backend.release(&s, t, Signal::Released).await.unwrap());
    let (t2, _) = acquire(h, &s, ttl, 0).await;
    assert_ne!(t, t2);

    // Extend keeps a lease alive past its first expiry.
    let s = slot("extend");
    let (t, _) = acquire(h, &s, h.short_lease, 0).await;
    assert!(h
        .backend
        .extend(&s, t, Duration::from_secs(30))
        .await
        .unwrap());
    tokio::time::sleep(h.short_lease + h.expiry_slack).await;
    assert!(
        matches!(
            h.backend.try_acquire(&s, ttl, 0).await.unwrap(),
            Acquire::Held { .. }
        ),
        "an extended lease is still held after its original expiry"
    );
    // An expired lease cannot be extended or released by its old holder.
    let s = slot("extend-late");
    let (t, _) = acquire(h, &s, h.short_lease, 0).await;
    tokio::time::sleep(h.short_lease + h.expiry_slack).await;
    let (t2, _) = acquire(h, &s, ttl, 0).await;
    assert!(!h.backend.extend(&s, t, ttl).await.unwrap());
    assert!(!h.backend.release(&s, t, Signal::Released).await.unwrap());
    assert!(
        h.backend.extend(&s, t2, ttl).await.unwrap(),
        "the new holder's lease survives"
    );
}

pub async fn fences_grow_also_after_the_counter_is_deleted(h: &Harness) {
    let s = slot("fences");
    let ttl = Duration::from_secs(10);
    let mut last = 0;
    for _ in 0..5 {
        let (t, f) = acquire(h, &s, ttl, 0).await;
        assert!(f > last, "fence {f} after {last}");
        last = f;
        assert!(h.backend.release(&s, t, Signal::Released).await.unwrap());
    }
    // Store an entry at the current fence, then lose the counter.
    let (t, f) = acquire(h, &s, ttl, 0).await;
    let out = h
        .backend
        .write(write(s, t, f, b"v", Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(out, WriteOutcome::Stored);
    // An entry whose fence is far above any clock floor (a backend whose grants start at a
    // clock would pass without looking at the entry otherwise).
    let high = f + 1_000_000_000_000_000;
    let out = h
        .backend
        .write(write(s, t, high, b"v", Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(out, WriteOutcome::Stored);
    (h.forget_counter)(s).await;
    let (_t, f2) = acquire(h, &s, ttl, high).await;
    assert!(
        f2 > high,
        "after the counter is gone the grant {f2} is still above the entry's {high}"
    );
}

pub async fn refreshed_after_a_concurrent_fill(h: &Harness) {
    let s = slot("refreshed");
    let ttl = Duration::from_secs(10);
    // B looked up and saw nothing (fence 0). Meanwhile A fills.
    let (t, f) = acquire(h, &s, ttl, 0).await;
    h.backend
        .write(write(s, t, f, b"a", Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(
        h.backend.try_acquire(&s, ttl, 0).await.unwrap(),
        Acquire::Refreshed,
        "B must read again, not fill"
    );
    // With the fence it now sees, B may take the lease.
    let (_t, f2) = acquire(h, &s, ttl, f).await;
    assert!(f2 > f);
}

pub async fn fenced_fill_refuses_older_and_accepts_same_token(h: &Harness) {
    let s = slot("fenced");
    let ttl = Duration::from_secs(60);
    let (ta, fa) = acquire(h, &s, h.short_lease, 0).await;
    tokio::time::sleep(h.short_lease + h.expiry_slack).await;
    let (tb, fb) = acquire(h, &s, h.short_lease, 0).await;
    assert!(fb > fa);
    assert_eq!(
        h.backend
            .write(write(s, tb, fb, b"new", ttl))
            .await
            .unwrap(),
        WriteOutcome::Stored
    );
    assert_eq!(
        h.backend
            .write(write(s, ta, fa, b"old", ttl))
            .await
            .unwrap(),
        WriteOutcome::Fenced,
        "the late holder's older fence is refused"
    );
    let got = h.backend.fetch(&s, None).await.unwrap();
    assert_eq!(value_of(&got.entry).as_deref(), Some(&b"new"[..]));
    // The same fence from the same token may rewrite (a retried write).
    assert_eq!(
        h.backend
            .write(write(s, tb, fb, b"new2", ttl))
            .await
            .unwrap(),
        WriteOutcome::Stored
    );
    // The same fence from another token may not.
    assert_eq!(
        h.backend
            .write(write(s, Token::random(), fb, b"forged", ttl))
            .await
            .unwrap(),
        WriteOutcome::Fenced
    );
    let got = h.backend.fetch(&s, None).await.unwrap();
    assert_eq!(value_of(&got.entry).as_deref(), Some(&b"new2"[..]));
}

pub async fn tombstone_blocks_an_older_fill(h: &Harness) {
    let s = slot("tombstone");
    let ttl = Duration::from_secs(60);
    let (t, f) = acquire(h, &s, Duration::from_secs(10), 0).await;
    let tomb = h.backend.invalidate(&s, ttl).await.unwrap();
    assert!(
        tomb > f,
        "tombstone fence {tomb} above the running fill's {f}"
    );
    assert_eq!(
        h.backend.write(write(s, t, f, b"old", ttl)).await.unwrap(),
        WriteOutcome::Fenced
    );
    let got = h.backend.fetch(&s, None).await.unwrap();
    match got.entry.as_ref().and_then(Record::decode) {
        Some(Record::Tombstone { header }) => assert_eq!(header.fence, tomb),
        other => panic!("expected the tombstone, got {other:?}"),
    }
}

pub async fn put_get_ttl_and_variants(h: &Harness) {
    let s = slot("ttl");
    let ttl = Duration::from_secs(10);
    assert!(h.backend.fetch(&s, None).await.unwrap().entry.is_none());
    let (t, f) = acquire(h, &s, ttl, 0).await;
    let v1 = Digest::of_key("variant-1");
    let v2 = Digest::of_key("variant-2");
    let head = Record::encode_vary_head(
        Header {
            kind: Kind::VaryHead,
            fence: f,
            token: t,
            epoch: 0,
        },
        b"accept-encoding",
    );
    let w = FencedWrite {
        slot: s,
        token: t,
        fence: f,
        entry: head,
        entry_ttl: h.short_lease,
        variant: Some((v1, entry(f, t, b"gzip body"))),
        variant_ttl: h.short_lease,
        release: true,
        signal: Signal::Filled,
    };
    assert_eq!(h.backend.write(w).await.unwrap(), WriteOutcome::Stored);
    let got = h.backend.fetch(&s, Some(&v1)).await.unwrap();
    assert!(matches!(
        got.entry.as_ref().and_then(Record::decode),
        Some(Record::VaryHead { .. })
    ));
    assert_eq!(value_of(&got.variant).as_deref(), Some(&b"gzip body"[..]));
    assert!(h
        .backend
        .fetch(&s, Some(&v2))
        .await
        .unwrap()
        .variant
        .is_none());
    // The write released the lease.
    let (t2, _) = acquire(h, &s, ttl, f).await;
    assert!(h.backend.release(&s, t2, Signal::Released).await.unwrap());
    tokio::time::sleep(h.short_lease + h.expiry_slack).await;
    let got = h.backend.fetch(&s, Some(&v1)).await.unwrap();
    assert!(got.entry.is_none(), "entry expired with its ttl");
    assert!(got.variant.is_none(), "variant expired with its ttl");
}

pub async fn a_failed_lease_is_reported_until_it_ends(h: &Harness) {
    let s = slot("failed");
    let ttl = Duration::from_secs(10);
    let held = |a: Acquire| match a {
        Acquire::Held { failed, .. } => Some(failed),
        _ => None,
    };
    let (t, _) = acquire(h, &s, ttl, 0).await;
    // Only the holder marks it.
    assert!(!h.backend.fail(&s, Token::random(), ttl).await.unwrap());
    assert_eq!(
        held(h.backend.try_acquire(&s, ttl, 0).await.unwrap()),
        Some(false)
    );
    assert!(h.backend.fail(&s, t, h.short_lease).await.unwrap());
    match h.backend.try_acquire(&s, ttl, 0).await.unwrap() {
        Acquire::Held { remaining, failed } => {
            assert!(failed, "every instance sees the failure");
            assert!(remaining <= h.short_lease + h.expiry_slack, "{remaining:?}");
        }
        other => panic!("a failed lease is still held: {other:?}"),
    }
    // A failed lease stays failed: it is not extended, even by its holder.
    assert!(!h.backend.extend(&s, t, ttl).await.unwrap());
    assert_eq!(
        held(h.backend.try_acquire(&s, ttl, 0).await.unwrap()),
        Some(true)
    );
    // It ends with the time `fail` gave it, and the next grant is a plain lease.
    tokio::time::sleep(h.short_lease + h.expiry_slack).await;
    let (t2, _) = acquire(h, &s, ttl, 0).await;
    assert!(
        !h.backend.fail(&s, t, ttl).await.unwrap(),
        "the old holder's is gone"
    );
    assert_eq!(
        held(h.backend.try_acquire(&s, ttl, 0).await.unwrap()),
        Some(false)
    );
    // Its holder can still release it.
    assert!(h.backend.fail(&s, t2, ttl).await.unwrap());
    assert!(h.backend.release(&s, t2, Signal::Released).await.unwrap());
    let (t3, f3) = acquire(h, &s, ttl, 0).await;
    // Or store a value, which releases it.
    assert!(h.backend.fail(&s, t3, ttl).await.unwrap());
    let stored = h
        .backend
        .write(write(s, t3, f3, b"late", Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(stored, WriteOutcome::Stored);
    let (t4, _) = acquire(h, &s, ttl, f3).await;

    // An invalidation ends a live lease (its holder can no longer mark it failed)...
    let tomb = h
        .backend
        .invalidate(&s, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(!h.backend.fail(&s, t4, ttl).await.unwrap());
    let (t5, _) = acquire(h, &s, ttl, tomb).await;
    // ...and a failed one.
    assert!(h.backend.fail(&s, t5, ttl).await.unwrap());
    let tomb = h
        .backend
        .invalidate(&s, Duration::from_secs(60))
        .await
        .unwrap();
    acquire(h, &s, ttl, tomb).await;
}

pub async fn signals_are_delivered(h: &Harness) {
    let s = slot("signals");
    let sub = h.backend.subscribe(&s).await.unwrap();
    if !h.signals {
        assert!(sub.is_none(), "a backend without signals says so");
        return;
    }
    let mut sub = sub.expect("a backend with signals returns a subscription");
    let ttl = Duration::from_secs(10);
    let within = Duration::from_secs(5);

    let (t, _) = acquire(h, &s, ttl, 0).await;
    assert!(h.backend.release(&s, t, Signal::Released).await.unwrap());
    assert_eq!(
        tokio::time::timeout(within, sub.recv()).await.unwrap(),
        Some(Signal::Released)
    );

    let (t, f) = acquire(h, &s, ttl, 0).await;
    assert!(h.backend.fail(&s, t, ttl).await.unwrap());
    assert_eq!(
        tokio::time::timeout(within, sub.recv()).await.unwrap(),
        Some(Signal::Failed)
    );
    assert!(
        matches!(
            h.backend.try_acquire(&s, ttl, 0).await.unwrap(),
            Acquire::Held { failed: true, .. }
        ),
        "failing keeps the lease, marked failed"
    );

    h.backend
        .write(write(s, t, f, b"v", Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(within, sub.recv()).await.unwrap(),
        Some(Signal::Filled)
    );

    let (t, f) = acquire(h, &s, ttl, f).await;
    let mut w = write(s, t, f, b"", Duration::from_secs(5));
    w.entry = Record::encode_marker(Header {
        kind: Kind::Pass,
        fence: f,
        token: t,
        epoch: 0,
    });
    w.signal = Signal::Pass;
    h.backend.write(w).await.unwrap();
    assert_eq!(
        tokio::time::timeout(within, sub.recv()).await.unwrap(),
        Some(Signal::Pass)
    );
}

/// The whole suite as tests: one `#[tokio::test]` per suite function, in a module `$module`.
/// Each awaits `$make()` (a function in scope where the macro is used) for the harness and
/// whatever must outlive the test (its server).
#[macro_export]
macro_rules! conformance_suite {
    ($module:ident, $make:ident) => {
        $crate::conformance_suite!(
            @tests $module, $make,
            lease_is_exclusive,
            lease_expires,
            release_and_extend_need_the_token,
            a_failed_lease_is_reported_until_it_ends,
            fences_grow_also_after_the_counter_is_deleted,
            refreshed_after_a_concurrent_fill,
            fenced_fill_refuses_older_and_accepts_same_token,
            tombstone_blocks_an_older_fill,
            put_get_ttl_and_variants,
            signals_are_delivered,
        );
    };
    (@tests $module:ident, $make:ident, $($name:ident),* $(,)?) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let (h, _keep) = $make().await;
                    $crate::common::conformance::$name(&h).await;
                }
            )*
        }
    };
}

/// Retries `op` until the backend has reconnected after a restart (at most 5 s).
async fn after_reconnect<T, F, Fut>(mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = tower_stampede::backend::BackendResult<T>>,
{
    for _ in 0..100 {
        if let Ok(v) = op().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the backend never reconnected");
}

/// Not in [`conformance_suite!`]: it needs the server to lose everything (`lose`: a restart without
/// persistence), which only the backend's own tests can do. The entry and the fence counter
/// go together; a holder that took its lease before and writes after a later holder (or an
/// invalidation) must still be refused, and the later grants must be above its fence.
pub async fn a_holder_from_before_a_loss_cannot_overwrite_what_came_after(
    b: &dyn Backend,
    mut lose: impl FnMut(),
) {
    let s = slot("loss-fence");
    let ttl = Duration::from_secs(30);
    let grant = |seen: u64| async move {
        match b.try_acquire(&s, ttl, seen).await? {
            Acquire::Acquired { token, fence } => Ok((token, fence)),
            other => panic!("{other:?}"),
        }
    };
    // A few grants and releases, as a busy key has, then the holder that will be late.
    for _ in 0..5 {
        let (t, _) = grant(0).await.unwrap();
        assert!(b.release(&s, t, Signal::Released).await.unwrap());
    }
    let (old_token, old_fence) = grant(0).await.unwrap();

    lose();
    let (new_token, new_fence) = after_reconnect(|| grant(0)).await;
    assert!(
        new_fence > old_fence,
        "grant {new_fence} after the loss is above {old_fence} from before it"
    );
    let w = |t, f, v: &[u8]| write(s, t, f, v, Duration::from_secs(60));
    assert_eq!(
        b.write(w(new_token, new_fence, b"new")).await.unwrap(),
        WriteOutcome::Stored
    );
    assert_eq!(
        b.write(w(old_token, old_fence, b"old")).await.unwrap(),
        WriteOutcome::Fenced,
        "the holder from before the loss is refused"
    );
    let stored = b.fetch(&s, None).await.unwrap();
    let header = stored.entry.as_deref().and_then(Header::parse);
    assert_eq!(header.map(|h| h.token), Some(new_token));

    // The same for an invalidation after a second loss: its tombstone stands.
    lose();
    let tomb = after_reconnect(|| b.invalidate(&s, Duration::from_secs(60))).await;
    assert!(tomb > new_fence, "tombstone {tomb} above {new_fence}");
    assert_eq!(
        b.write(w(new_token, new_fence, b"stale")).await.unwrap(),
        WriteOutcome::Fenced,
        "the holder from before the second loss is refused"
    );
}
