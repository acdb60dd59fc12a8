//! The engine's protocol on the memory backend, with tokio's paused clock where time matters.
//! Each test narrates its timeline; assertions are on fill counts, statuses and values.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::Counter;
use tokio::time::Instant;
use tower_stampede::backend::memory::MemoryBackend;
use tower_stampede::backend::{
    Acquire, Backend, BackendError, BackendResult, BoxFuture, FencedWrite, Fetched, Signal,
    Subscription, Token, WriteOutcome,
};
use tower_stampede::entry::{Header, Kind, Record};
use tower_stampede::{
    CacheKey, Config, Digest, Error, Fill, Selector, StaleReason, Stampede, Status, Ttl,
};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

fn engine(mem: &MemoryBackend, cfg: Config) -> Stampede {
    Stampede::with_config(mem.clone(), cfg).unwrap()
}

type FillFut = Pin<Box<dyn Future<Output = Result<Fill, std::io::Error>> + Send>>;

/// A fill that counts its calls, sleeps `delay`, and returns `value` fresh for `ttl`.
fn filler(
    calls: &Counter,
    delay: Duration,
    value: &'static str,
    ttl: Ttl,
) -> impl FnOnce() -> FillFut + Send + 'static {
    let calls = calls.clone();
    move || {
        Box::pin(async move {
            calls.inc();
            tokio::time::sleep(delay).await;
            Ok(Fill::store(value, ttl))
        })
    }
}

fn failing(calls: &Counter, delay: Duration) -> impl FnOnce() -> FillFut + Send + 'static {
    let calls = calls.clone();
    move || {
        Box::pin(async move {
            calls.inc();
            tokio::time::sleep(delay).await;
            Err(std::io::Error::other("origin down"))
        })
    }
}

/// `e.get_or_fill(key, fill)` on a task of its own.
fn spawn_fill<F, Fut, E>(
    e: &Stampede,
    key: &'static str,
    fill: F,
) -> tokio::task::JoinHandle<Result<tower_stampede::Served, Error>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Fill, E>> + Send + 'static,
    E: Into<tower_stampede::BoxError> + 'static,
{
    let e = e.clone();
    tokio::spawn(async move { e.get_or_fill(key, fill).await })
}

fn minute() -> Ttl {
    Ttl::fresh(secs(60))
}

#[tokio::test(start_paused = true)]
async fn thousand_concurrent_callers_one_fill() {
    let mem = MemoryBackend::default();
    let e = engine(&mem, Config::default());
    let calls = Counter::default();
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let e = e.clone();
        let f = filler(&calls, ms(200), "v1", minute());
        tasks.push(tokio::spawn(async move { e.get_or_fill("cold", f).await }));
    }
    let mut stored = 0;
    let mut collapsed = 0;
    for t in tasks {
        let s = t.await.unwrap().unwrap();
        assert_eq!(&s.value[..], b"v1");
        match s.status {
            Status::Stored => stored += 1,
            Status::Collapsed | Status::Hit => collapsed += 1,
            other => panic!("unexpected status {other:?}"),
        }
    }
    assert_eq!(calls.get(), 1, "one fill for 1,000 callers");
    assert_eq!(stored, 1);
    assert_eq!(collapsed, 999);
    // And now it is a hit.
    let s = e
        .get_or_fill("cold", filler(&calls, ms(1), "v2", minute()))
        .await
        .unwrap();
    assert_eq!(s.status, Status::Hit);
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn two_instances_sharing_a_backend_fill_once() {
    // Two engines with separate in-process state (flights, memo) share one store: only the
    // lease can keep the second from filling.
    let mem = MemoryBackend::default();
    let a = engine(&mem, Config::default());
    let b = engine(&mem, Config::default());
    let calls = Counter::default();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let e = if i % 2 == 0 { a.clone() } else { b.clone() };
        let f = filler(&calls, ms(300), "shared", minute());
        tasks.push(tokio::spawn(async move { e.get_or_fill("k", f).await }));
    }
    for t in tasks {
        assert_eq!(&t.await.unwrap().unwrap().value[..], b"shared");
    }
    assert_eq!(calls.get(), 1);
}

/// A backend whose first `try_acquire` first runs a hook: it lets a test land another
/// instance's fill between a caller's lookup and its acquire.
#[derive(Default)]
struct Gate {
    inner: MemoryBackend,
    hook: Mutex<Option<Pin<Box<dyn Future<Output = ()> + Send>>>>,
    /// Every `extend` fails (and is counted) when set.
    fail_extends: Option<Counter>,
    /// Every `try_acquire` finds the lease held for `Duration::MAX` (and is counted) when set: a
    /// backend of someone else's may report any remaining time.
    held_forever: Option<Counter>,
    /// Counts every `fetch`, and those that asked for a variant too.
    fetches: Counter,
    variant_fetches: Counter,
    /// While set, every `fetch` fails; or never answers.
    fail_fetch: AtomicBool,
    hang_fetch: AtomicBool,
    /// While set, every `try_acquire` fails.
    fail_acquire: AtomicBool,
    /// While set, every `write` fails as a store that answered (this key's data in the way).
    write_answered: AtomicBool,
    /// Every `try_acquire` answers this much later than the store decided (a slow network).
    late_acquire: Option<Duration>,
    /// Every `invalidate` answers this much later than the store wrote the tombstone.
    late_invalidate: Option<Duration>,
    /// Every `fail` answers that the lease is not the caller's (it ended early: a restart, an
    /// eviction), marking nothing.
    fail_not_ours: AtomicBool,
    /// Every `fail` fails (the store unreachable at that moment), marking nothing.
    fail_errors: AtomicBool,
}

impl Backend for Gate {
    fn name(&self) -> &'static str {
        "gate"
    }
    fn fetch<'a>(
        &'a self,
        s: &'a Digest,
        v: Option<&'a Digest>,
    ) -> BoxFuture<'a, BackendResult<Fetched>> {
        self.fetches.inc();
        if v.is_some() {
            self.variant_fetches.inc();
        }
        if self.fail_fetch.load(Ordering::SeqCst) {
            return Box::pin(async { Err(BackendError::new("fetch refused by the test")) });
        }
        if self.hang_fetch.load(Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        self.inner.fetch(s, v)
    }
    fn try_acquire<'a>(
        &'a self,
        s: &'a Digest,
        ttl: Duration,
        seen: u64,
    ) -> BoxFuture<'a, BackendResult<Acquire>> {
        if self.fail_acquire.load(Ordering::SeqCst) {
            return Box::pin(async { Err(BackendError::new("acquire refused by the test")) });
        }
        if let Some(n) = &self.held_forever {
            n.inc();
            return Box::pin(async {
                Ok(Acquire::Held {
                    remaining: Duration::MAX,
                    failed: false,
                })
            });
        }
        let hook = self.hook.lock().unwrap().take();
        Box::pin(async move {
            if let Some(h) = hook {
                h.await;
            }
            let got = self.inner.try_acquire(s, ttl, seen).await;
            if let Some(late) = self.late_acquire {
                tokio::time::sleep(late).await;
            }
            got
        })
    }
    fn extend<'a>(
        &'a self,
        s: &'a Digest,
        t: Token,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        if let Some(n) = &self.fail_extends {
            n.inc();
            return Box::pin(async { Err(BackendError::new("extend refused by the test")) });
        }
        self.inner.extend(s, t, ttl)
    }
    fn release<'a>(
        &'a self,
        s: &'a Digest,
        t: Token,
        sig: Signal,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        self.inner.release(s, t, sig)
    }
    fn write(&self, w: FencedWrite) -> BoxFuture<'_, BackendResult<WriteOutcome>> {
        if self.write_answered.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(BackendError::new("this key's data is in the way").store_answered())
            });
        }
        self.inner.write(w)
    }
    fn invalidate<'a>(&'a self, s: &'a Digest, ttl: Duration) -> BoxFuture<'a, BackendResult<u64>> {
        Box::pin(async move {
            let done = self.inner.invalidate(s, ttl).await;
            if let Some(late) = self.late_invalidate {
                tokio::time::sleep(late).await;
            }
            done
        })
    }
    fn fail<'a>(
        &'a self,
        s: &'a Digest,
        t: Token,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        if self.fail_not_ours.load(Ordering::SeqCst) {
            return Box::pin(async { Ok(false) });
        }
        if self.fail_errors.load(Ordering::SeqCst) {
            return Box::pin(async { Err(BackendError::new("fail refused by the test")) });
        }
        self.inner.fail(s, t, ttl)
    }
    fn subscribe<'a>(
        &'a self,
        s: &'a Digest,
    ) -> BoxFuture<'a, BackendResult<Option<Subscription>>> {
        self.inner.subscribe(s)
    }
}

/// A lease the store granted after its caller gave up on the call (the answer came after the
/// per-call timeout) is given back, so the next caller anywhere gets it. Before, nobody held
/// its token: every instance waited the whole lease out, and then the origin was called again.
#[tokio::test(start_paused = true)]
async fn a_lease_granted_after_its_caller_gave_up_is_given_back() {
    let mem = MemoryBackend::default();
    let gate = Arc::new(Gate {
        inner: mem.clone(),
        late_acquire: Some(ms(400)),
        ..Gate::default()
    });
    let cfg = Config::default()
        .backend_timeout(ms(250))
        .lease(secs(30))
        .wait_timeout(secs(40));
    let e = Stampede::from_arc(gate, cfg).unwrap();
    let calls = Counter::default();
    // The grant comes too late: this caller fills without the lease.
    let s = e
        .get_or_fill("late", filler(&calls, ms(1), "v", minute()))
        .await
        .unwrap();
    assert_eq!(s.status, Status::Bypass);
    tokio::time::sleep(secs(1)).await;
    // The lease is free again, not held for 30 s by nobody.
    match mem
        .try_acquire(&Digest::of_key("late"), secs(5), 0)
        .await
        .unwrap()
    {
        Acquire::Acquired { .. } => {}
        other => panic!("the late grant was kept: {other:?}"),
    }
}

/// A varying entry costs one fetch per hit once its selector is known (the engine's memo asks
/// for the variant with the entry), and a plain key one fetch whether or not the memo is in use.
#[tokio::test(start_paused = true)]
async fn a_varying_hit_is_one_fetch_once_its_selector_is_known() {
    let fetches = Counter::default();
    let variant_fetches = Counter::default();
    let e = Stampede::with_config(
        Gate {
            fetches: fetches.clone(),
            variant_fetches: variant_fetches.clone(),
            ..Gate::default()
        },
        Config::default(),
    )
    .unwrap();
    let plain = || {
        e.get_or_fill("plain", || async {
            Ok::<_, std::io::Error>(Fill::store("p", minute()))
        })
    };
    assert_eq!(plain().await.unwrap().status, Status::Stored);
    let before = fetches.get();
    assert_eq!(plain().await.unwrap().status, Status::Hit);
    assert_eq!(fetches.get() - before, 1, "a plain hit before any memo");

    let select: tower_stampede::Selector =
        Arc::new(|sel: &[u8]| Some(Digest::of_key([sel, b"=gzip"].concat())));
    let varying = || {
        let key = tower_stampede::CacheKey::new("varying").with_selector(select.clone());
        e.get_or_fill_with(key, |_| async {
            Ok::<_, std::io::Error>(Fill::Store {
                value: Bytes::from_static(b"v"),
                ttl: minute(),
                selector: Some(Bytes::from_static(b"accept-encoding")),
            })
        })
    };
    assert_eq!(varying().await.unwrap().status, Status::Stored);
    for round in 0..3 {
        let (f, vf) = (fetches.get(), variant_fetches.get());
        let s = varying().await.unwrap();
        assert_eq!(s.status, Status::Hit, "round {round}");
        assert_eq!(&s.value[..], b"v");
        assert_eq!(
            (fetches.get() - f, variant_fetches.get() - vf),
            (1, 1),
            "round {round}"
        );
    }
    let before = fetches.get();
    assert_eq!(plain().await.unwrap().status, Status::Hit);
    assert_eq!(
        fetches.get() - before,
        1,
        "a plain hit with the memo in use"
    );
}

/// A vary head whose epoch is above any grant (forged or damaged bytes) is not carried forward:
/// the fill's own variant counts, and the next request hits it. Before, the rewritten head kept
/// the epoch, every variant under it was void, and every request filled again.
#[tokio::test(start_paused = true)]
async fn a_vary_head_with_an_epoch_above_every_grant_is_not_carried_forward() {
    let mem = MemoryBackend::default();
    let slot = Digest::of_key("forged-epoch");
    let Acquire::Acquired { token, fence } = mem.try_acquire(&slot, secs(5), 0).await.unwrap()
    else {
        panic!("a fresh key's lease is free")
    };
    let head = Record::encode_vary_head(
        Header {
            kind: Kind::VaryHead,
            fence,
            token,
            epoch: u64::MAX - 1,
        },
        b"accept-encoding",
    );
    let w = FencedWrite {
        slot,
        token,
        fence,
        entry: head,
        entry_ttl: secs(60),
        variant: None,
        variant_ttl: Duration::ZERO,
        release: true,
        signal: Signal::Released,
    };
    assert_eq!(mem.write(w).await.unwrap(), WriteOutcome::Stored);
    let e = engine(&mem, Config::default());
    let select: Selector = Arc::new(|sel: &[u8]| Some(Digest::of_key([sel, b"=gzip"].concat())));
    let calls = Counter::default();
    let varying = || {
        let calls = calls.clone();
        let key = CacheKey::new("forged-epoch").with_selector(select.clone());
        e.get_or_fill_with(key, move |_| async move {
            calls.inc();
            Ok::<_, std::io::Error>(Fill::Store {
                value: Bytes::from_static(b"v"),
                ttl: minute(),
                selector: Some(Bytes::from_static(b"accept-encoding")),
            })
        })
    };
    assert_eq!(varying().await.unwrap().status, Status::Stored);
    assert_eq!(varying().await.unwrap().status, Status::Hit);
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_that_missed_just_before_another_fill_landed_gets_refreshed() {
    let mem = MemoryBackend::default();
    let b = engine(&mem, Config::default());
    let b_calls = Counter::default();
    let bf = filler(&b_calls, ms(10), "from-b", minute());
    // A's lookup misses; then, before A's try_acquire, B's whole fill lands.
    let b2 = b.clone();
    let gate = Gate {
        inner: mem.clone(),
        hook: Mutex::new(Some(Box::pin(async move {
            let s = b2.get_or_fill("race", bf).await.unwrap();
            assert_eq!(s.status, Status::Stored);
        }))),
        ..Gate::default()
    };
    let a = Stampede::with_config(gate, Config::default()).unwrap();
    let a_calls = Counter::default();
    let s = a
        .get_or_fill("race", filler(&a_calls, ms(10), "from-a", minute()))
        .await
        .unwrap();
    assert_eq!(&s.value[..], b"from-b", "A serves B's value");
    assert_eq!(s.status, Status::Collapsed);
    assert_eq!(a_calls.get(), 0, "A got Refreshed and did not fill");
    assert_eq!(b_calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let mem = MemoryBackend::default();
    let e = engine(&mem, Config::default());
    let calls = Counter::default();
    let ttl = Ttl::fresh(secs(1)).with_swr(secs(30));
    e.get_or_fill("swr", filler(&calls, ms(1), "old", ttl))
        .await
        .unwrap();
    tokio::time::advance(secs(2)).await;

    // Stale inside swr: served at once, one background refresh (slow: 1 s) starts.
    let mut served = Vec::new();
    for _ in 0..20 {
        let s = e
            .get_or_fill("swr", filler(&calls, secs(1), "new", ttl))
            .await
            .unwrap();
        served.push(s);
    }
    for s in &served {
        assert_eq!(&s.value[..], b"old");
        assert_eq!(s.status, Status::Stale(StaleReason::Revalidating));
    }
    // While the refresh runs, the entry disappears (evicted): a foreground miss for the same
    // key joins the running refresh instead of filling again.
    tokio::time::sleep(ms(10)).await; // the refresh has taken the lease
    mem.evict(&Digest::of_key("swr"));
    let s = e
        .get_or_fill("swr", filler(&calls, ms(1), "foreground", ttl))
        .await
        .unwrap();
    assert_eq!(&s.value[..], b"new");
    assert_eq!(s.status, Status::Collapsed);
    assert_eq!(calls.get(), 2, "the first fill and exactly one refresh");
    let s = e
        .get_or_fill("swr", filler(&calls, ms(1), "x", ttl))
        .await
        .unwrap();
    assert_eq!((&s.value[..], s.status), (&b"new"[..], Status::Hit));
}

#[tokio::test(start_paused = true)]
async fn the_fill_survives_its_caller_going_away() {
    let mem = MemoryBackend::default();
    let e = engine(&mem, Config::default());
    let calls = Counter::default();
    let leader = {
        let e = e.clone();
        let f = filler(&calls, secs(1), "detached", minute());
        tokio::spawn(async move { e.get_or_fill("gone", f).await })
    };
    tokio::time::sleep(ms(10)).await;
    let mut followers = Vec::new();
    for _ in 0..10 {
        let e = e.clone();
        let f = filler(&calls, secs(1), "follower", minute());
        followers.push(tokio::spawn(async move { e.get_or_fill("gone", f).await }));
    }
    tokio::time::sleep(ms(100)).await;
    leader.abort(); // the client disconnected
    for f in followers {
        let s = f.await.unwrap().unwrap();
        assert_eq!(&s.value[..], b"detached");
    }
    assert_eq!(
        calls.get(),
        1,
        "the leader's fill ran to the end and served everyone"
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_fill_lets_followers_compete_again() {
    let mem = MemoryBackend::default();
    let e = engine(&mem, Config::default());
    let calls = Counter::default();
    let c = calls.clone();
    let leader = {
        let e = e.clone();
        tokio::spawn(async move {
            e.get_or_fill("panic", move || async move {
                c.inc();
                tokio::time::sleep(ms(100)).await;
                panic!("the fill blew up");
                #[allow(unreachable_code)]
                Ok::<_, std::io::Error>(Fill::store("never", minute()))
            })
            .await
        })
    };
    tokio::time::sleep(ms(10)).await;
    let mut followers = Vec::new();
    for _ in 0..10 {
        let e = e.clone();
        let f = filler(&calls, ms(100), "second", minute());
        followers.push(tokio::spawn(async move { e.get_or_fill("panic", f).await }));
    }
    assert!(matches!(leader.await.unwrap(), Err(Error::FillPanicked)));
    for f in followers {
        assert_eq!(&f.await.unwrap().unwrap().value[..], b"second");
    }
    assert_eq!(calls.get(), 2, "the panicked fill and at most one more");
}

#[tokio::test(start_paused = true)]
async fn a_fill_longer_than_its_lease_keeps_it_by_extension() {
    let mem = MemoryBackend::default();
    let cfg = Config::default().lease(secs(1)).wait_timeout(secs(10));
    let a = engine(&mem, cfg.clone());
    let b = engine(&mem, cfg);
    let calls = Counter::default();
    let fa = filler(&calls, secs(4), "slow", minute());
    let ta = tokio::spawn({
        let a = a.clone();
        async move { a.get_or_fill("long", fa).await }
    });
    // Well past the first lease expiry, instance B asks.
    tokio::time::sleep(secs(2)).await;
    let s = b
        .get_or_fill("long", filler(&calls, ms(1), "b", minute()))
        .await
        .unwrap();
    assert_eq!(&s.value[..], b"slow");
    assert_eq!(s.status, Status::Collapsed);
    assert_eq!(ta.await.unwrap().unwrap().status, Status::Stored);
    assert_eq!(calls.get(), 1, "the extended lease kept B from filling");
}

/// A holder whose extends fail keeps filling: its lease lapses, another instance takes the next
/// lease and stores first, and the first holder's late write is refused by the fence.
#[tokio::test(start_paused = true)]
async fn a_failed_extend_does_not_stop_the_fill_and_the_fence_decides() {
    let mem = MemoryBackend::default();
    // The breaker would open on the failed extends and skip A's write (`WriteFailed`): kept
    // closed, so the write reaches the store and the fence refuses it.
    let cfg = Config::default()
        .lease(secs(1))
        .wait_timeout(secs(10))
        .backend_timeout(secs(5))
        .breaker(1000, secs(1));
    let extends = Counter::default();
    let a = Stampede::with_config(
        Gate {
            inner: mem.clone(),
            fail_extends: Some(extends.clone()),
            ..Gate::default()
        },
        cfg.clone(),
    )
    .unwrap();
    let b = engine(&mem, cfg);
    let calls = Counter::default();
    let fa = filler(&calls, secs(4), "from-a", minute());
    let ta = tokio::spawn(async move { a.get_or_fill("lapsed", fa).await });
    // A's lease has lapsed (its extends failed); B takes the next one and fills quickly.
    tokio::time::sleep(secs(2)).await;
    let sb = b
        .get_or_fill("lapsed", filler(&calls, ms(100), "from-b", minute()))
        .await
        .unwrap();
    assert_eq!((sb.status, &sb.value[..]), (Status::Stored, &b"from-b"[..]));
    let sa = ta.await.unwrap().unwrap();
    assert!(extends.get() >= 1, "A tried to extend");
    assert_eq!(&sa.value[..], b"from-a", "A's fill ran to the end");
    assert_eq!(sa.status, Status::NotStored, "A's older fence lost");
    assert_eq!(calls.get(), 2);
    let now = b
        .get_or_fill("lapsed", filler(&calls, ms(1), "again", minute()))
        .await
        .unwrap();
    assert_eq!((now.status, &now.value[..]), (Status::Hit, &b"from-b"[..]));
}

#[tokio::test(start_paused = true)]
async fn a_hung_fill_ends_at_fill_timeout_and_waiters_fall_back() {
    let mem = MemoryBackend::default();
    let cfg = Config::default()
        .lease(secs(2))
        .wait_timeout(secs(10))
        .fill_timeout(secs(3));
    let a = engine(&mem, cfg.clone());
    let b = engine(&mem, cfg);
    let calls = Counter::default();
    let start = Instant::now();
    let ta = spawn_fill(&a, "hung", filler(&calls, secs(3600), "never", minute()));
    tokio::time::sleep(ms(10)).await;
    let local = spawn_fill(&a, "hung", filler(&calls, ms(1), "x", minute()));
    let remote = b
        .get_or_fill("hung", filler(&calls, ms(1), "y", minute()))
        .await;
    assert!(matches!(ta.await.unwrap(), Err(Error::FillTimeout(_))));
    assert!(matches!(local.await.unwrap(), Err(Error::FillTimeout(_))));
    assert!(
        matches!(remote, Err(Error::FailedElsewhere)),
        "the other instance is told by the failed signal: {remote:?}"
    );
    assert!(
        start.elapsed() < secs(10),
        "everyone ended before their deadline"
    );
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_past_its_deadline_takes_the_fallback_without_calling_the_source() {
    let mem = MemoryBackend::default();
    let cfg = Config::default()
        .lease(secs(2))
        .wait_timeout(secs(5))
        .fill_timeout(secs(120));
    let a = engine(&mem, cfg.clone());
    let b = engine(&mem, cfg);
    let calls = Counter::default();

    // No stale copy: the error.
    spawn_fill(&a, "deadline", filler(&calls, secs(60), "slow", minute()));
    tokio::time::sleep(ms(10)).await;
    let r = b
        .get_or_fill("deadline", filler(&calls, ms(1), "b", minute()))
        .await;
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert_eq!(calls.get(), 1, "the waiter did not call the source");

    // With a stale copy inside stale-if-error: the stale copy.
    let ttl = Ttl::fresh(secs(1)).with_sie(secs(600));
    b.get_or_fill("deadline-stale", filler(&calls, ms(1), "old", ttl))
        .await
        .unwrap();
    tokio::time::advance(secs(2)).await;
    spawn_fill(&a, "deadline-stale", filler(&calls, secs(60), "slow", ttl));
    tokio::time::sleep(ms(10)).await;
    let s = b
        .get_or_fill("deadline-stale", filler(&calls, ms(1), "b", ttl))
        .await
        .unwrap();
    assert_eq!(&s.value[..], b"old");
    assert_eq!(s.status, Status::Stale(StaleReason::Deadline));
    assert_eq!(calls.get(), 3, "two fills by A, none by B");
}

/// A holder whose lease expired during its fill no longer speaks for the lease when the fill
/// fails: another holder took it and is filling. Before, its `Failed` signal ended the wait of
/// that holder's waiters with `FailedElsewhere`, and they (and the failed instance's later
/// callers) failed while the new holder's fill was about to land.
#[tokio::test(start_paused = true)]
async fn a_failure_after_the_lease_passed_on_does_not_fail_the_new_holders_waiters() {
    let mem = MemoryBackend::default();
    let cfg = Config::default().lease(secs(1)).wait_timeout(secs(10));
    // A's lease (1 s, not extended) ends during its 2.5 s fill, which then fails.
    let a = engine(&mem, cfg.clone().extend_lease(false).fill_timeout(secs(5)));
    let b = engine(&mem, cfg.clone());
    let c = engine(&mem, cfg);
    let calls = Counter::default();
    let ta = spawn_fill(&a, "passed-on", failing(&calls, ms(2500)));
    // B takes the expired lease at 1.2 s and fills for 2 s.
    tokio::time::sleep(ms(1200)).await;
    let tb = spawn_fill(&b, "passed-on", filler(&calls, secs(2), "new", minute()));
    // C comes at 1.5 s and waits on B's lease, across A's failure at 2.5 s.
    tokio::time::sleep(ms(300)).await;
    let rc = c
        .get_or_fill("passed-on", filler(&calls, ms(1), "c", minute()))
        .await;
    assert!(matches!(ta.await.unwrap(), Err(Error::Fill(_))));
    assert_eq!(tb.await.unwrap().unwrap().status, Status::Stored);
    let rc = rc.expect("C is served B's fill");
    assert_eq!(&rc.value[..], b"new");
    assert_eq!(calls.get(), 2, "A's fill and B's");
}

/// A caller that comes after an invalidation does not join a fill that started before it:
/// that fill's content is what the invalidation was for. Before, it was handed the old fill's
/// value (`Collapsed`), in the same process that had just invalidated the key. The same when
/// the invalidation's caller gives the call up after the tombstone landed (a client gone during
/// its POST).
#[tokio::test(start_paused = true)]
async fn a_caller_after_an_invalidation_does_not_join_a_fill_from_before_it() {
    for given_up in [false, true] {
        let gate = Arc::new(Gate {
            late_invalidate: given_up.then_some(secs(1)),
            ..Gate::default()
        });
        let e = Stampede::from_arc(gate, Config::default().wait_timeout(secs(30))).unwrap();
        let calls = Counter::default();
        let old = spawn_fill(&e, "inv", filler(&calls, secs(2), "old", minute()));
        tokio::time::sleep(secs(1)).await;
        if given_up {
            let gone = tokio::time::timeout(ms(100), e.invalidate("inv")).await;
            assert!(gone.is_err(), "the call was given up before it answered");
        } else {
            e.invalidate("inv").await.unwrap();
        }
        let after = e
            .get_or_fill("inv", filler(&calls, ms(10), "new", minute()))
            .await
            .unwrap();
        assert_eq!(
            &after.value[..],
            b"new",
            "given up {given_up}: {:?}",
            after.status
        );
        // The fill from before still answers the caller that started it.
        assert_eq!(&old.await.unwrap().unwrap().value[..], b"old");
        assert_eq!(calls.get(), 2);
        let s = e
            .get_or_fill("inv", filler(&calls, ms(10), "later", minute()))
            .await
            .unwrap();
        assert_eq!((&s.value[..], s.status), (&b"new"[..], Status::Hit));
    }
}

/// Through the HTTP layer: a POST the origin applied invalidates every slot of its URL even
/// when its client goes away while the store is still answering the first invalidation. Before,
/// the invalidations ran inside the request's future, and the rest were skipped: here the
/// https copy of the page (keyed apart from the POST's http one) stayed a hit.
#[tokio::test(start_paused = true)]
async fn a_posts_invalidations_all_happen_when_its_client_goes_away() {
    use http_body_util::{BodyExt, Full};
    use tower::ServiceExt;
    use tower_layer::Layer;
    let mem = MemoryBackend::default();
    let gate = Arc::new(Gate {
        inner: mem.clone(),
        late_invalidate: Some(ms(200)),
        ..Gate::default()
    });
    let runs = Counter::default();
    let origin = {
        let runs = runs.clone();
        tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
            runs.inc();
            let n = runs.get();
            async move {
                Ok::<_, std::convert::Infallible>(
                    http::Response::builder()
                        .header("cache-control", "max-age=60")
                        .body(Full::new(Bytes::from(format!("run {n}"))))
                        .unwrap(),
                )
            }
        })
    };
    let e = Stampede::from_arc(gate, Config::default()).unwrap();
    let svc = tower_stampede::http::StampedeLayer::new(e).layer(origin);
    let get = || {
        let svc = svc.clone();
        async move {
            let req = http::Request::get("https://a.test/p")
                .body(Full::default())
                .unwrap();
            let res = svc.oneshot(req).await.unwrap();
            res.into_body().collect().await.unwrap().to_bytes()
        }
    };
    assert_eq!(&get().await[..], b"run 1");
    assert_eq!(&get().await[..], b"run 1", "a hit");
    let post = http::Request::post("/p")
        .header("host", "a.test")
        .body(Full::default())
        .unwrap();
    let gone = tokio::time::timeout(ms(100), svc.clone().oneshot(post)).await;
    assert!(
        gone.is_err(),
        "the client went away during the invalidations"
    );
    tokio::time::sleep(secs(5)).await;
    assert_eq!(
        &get().await[..],
        b"run 3",
        "the https copy was invalidated too"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_fill_tells_waiters_at_once_and_keeps_its_lease() {
    let mem = MemoryBackend::default();
    let cfg = Config::default().lease(secs(5)).wait_timeout(secs(10));
    let a = engine(&mem, cfg.clone());
    let b = engine(&mem, cfg);
    let calls = Counter::default();
    let start = Instant::now();
    let ta = spawn_fill(&a, "fail", failing(&calls, ms(200)));
    tokio::time::sleep(ms(10)).await;
    let rb = b
        .get_or_fill("fail", filler(&calls, ms(1), "b", minute()))
        .await;
    assert!(matches!(ta.await.unwrap(), Err(Error::Fill(_))));
    assert!(matches!(rb, Err(Error::FailedElsewhere)), "{rb:?}");
    assert!(
        start.elapsed() < secs(1),
        "the failed signal, not the lease expiry, ended the wait"
    );
    assert_eq!(calls.get(), 1);

    // Inside the failed lease nobody calls the source again, and nobody waits the lease out:
    // a new call gets the fallback at once. Once the lease expires, the next call fills.
    let t0 = Instant::now();
    let r = b
        .get_or_fill("fail", filler(&calls, ms(1), "too early", minute()))
        .await;
    assert!(matches!(r, Err(Error::FailedElsewhere)), "{r:?}");
    assert!(t0.elapsed() < ms(100), "no waiting on a failed lease");
    assert_eq!(calls.get(), 1, "no second fill before the lease expires");
    tokio::time::sleep(secs(5)).await;
    let s = b
        .get_or_fill("fail", filler(&calls, ms(1), "recovered", minute()))
        .await
        .unwrap();
    assert_eq!(&s.value[..], b"recovered");
    assert_eq!(calls.get(), 2);

    // With a stale copy inside stale-if-error: the stale value, marked so.
    let ttl = Ttl::fresh(secs(1)).with_sie(secs(600));
    a.get_or_fill("fail-sie", filler(&calls, ms(1), "old", ttl))
        .await
        .unwrap();
    tokio::time::advance(secs(2)).await;
    let s = a
        .get_or_fill("fail-sie", failing(&calls, ms(1)))
        .await
        .unwrap();
    assert_eq!(&s.value[..], b"old");
    assert_eq!(s.status, Status::Stale(StaleReason::Error));
    // While that failed lease lives, more callers get the stale copy at once, with no call to
    // the source (one per lease).
    let before = calls.get();
    for _ in 0..10 {
        let t0 = Instant::now();
        let s = a
            .get_or_fill("fail-sie", failing(&calls, ms(1)))
            .await
            .unwrap();
        assert_eq!(s.status, Status::Stale(StaleReason::Error));
        assert!(t0.elapsed() < ms(100));
        tokio::time::sleep(ms(100)).await;
    }
    assert_eq!(calls.get(), before, "one source call per lease");
}

/// A failed fill's lease is marked failed in the store, so an instance that was not waiting
/// when the fill failed (no signal reached it) takes its fallback at once too: the error, or
/// its stale-if-error copy, with no call to the source and no wait for the lease to end.
/// Before, it found the lease held, waited it out, and then called the source.
#[tokio::test(start_paused = true)]
async fn an_instance_that_comes_after_a_failure_takes_its_fallback_at_once() {
    let mem = MemoryBackend::default();
    let cfg = Config::default().lease(secs(5)).wait_timeout(secs(10));
    let a = engine(&mem, cfg.clone());
    let c = engine(&mem, cfg.clone());
    let calls = Counter::default();
    let r = a.get_or_fill("late", failing(&calls, ms(200))).await;
    assert!(matches!(r, Err(Error::Fill(_))), "{r:?}");
    let rc = c
        .get_or_fill("late", filler(&calls, ms(1), "c", minute()))
        .await;
    assert!(matches!(rc, Err(Error::FailedElsewhere)), "{rc:?}");
    assert_eq!(
        calls.get(),
        1,
        "no call to the source inside the failed lease"
    );
    // C remembers it: its next callers do not ask the store again, nor call the source.
    let rc = c
        .get_or_fill("late", filler(&calls, ms(1), "c", minute()))
        .await;
    assert!(matches!(rc, Err(Error::FailedElsewhere)), "{rc:?}");
    assert_eq!(calls.get(), 1);
    tokio::time::sleep(secs(5)).await;
    let s = c
        .get_or_fill("late", filler(&calls, ms(1), "recovered", minute()))
        .await
        .unwrap();
    assert_eq!(
        (s.status, &s.value[..]),
        (Status::Stored, &b"recovered"[..])
    );

    // With a stale copy inside stale-if-error: another instance serves it, marked so.
    let d = engine(&mem, cfg);
    let ttl = Ttl::fresh(secs(1)).with_sie(secs(600));
    a.get_or_fill("late-sie", filler(&calls, ms(1), "old", ttl))
        .await
        .unwrap();
    tokio::time::advance(secs(2)).await;
    let before = calls.get();
    let s = a
        .get_or_fill("late-sie", failing(&calls, ms(1)))
        .await
        .unwrap();
    assert_eq!(s.status, Status::Stale(StaleReason::Error));
    let s = d
        .get_or_fill("late-sie", filler(&calls, ms(1), "new", ttl))
        .await
        .unwrap();
    assert_eq!(
        (s.status, &s.value[..]),
        (Status::Stale(StaleReason::Error), &b"old"[..])
    );
    assert_eq!(
        calls.get(),
        before + 1,
        "only A's failed fill called the source"
    );
}

/// An invalidation (a purge once the origin is fixed) ends a failed fill's lease: the next
/// caller on any instance, the failed one included, fills instead of taking the old failure's
/// fallback until the lease would have ended.
#[tokio::test(start_paused = true)]
async fn an_invalidation_ends_a_failed_lease_everywhere() {
    let mem = MemoryBackend::default();
    let cfg = Config::default().lease(secs(5)).wait_timeout(secs(10));
    let a = engine(&mem, cfg.clone());
    let b = engine(&mem, cfg);
    let calls = Counter::default();
    let r = a.get_or_fill("purged", failing(&calls, ms(10))).await;
    assert!(matches!(r, Err(Error::Fill(_))), "{r:?}");
    let r = b
        .get_or_fill("purged", filler(&calls, ms(1), "b", minute()))
        .await;
    assert!(matches!(r, Err(Error::FailedElsewhere)), "{r:?}");
    assert_eq!(calls.get(), 1);
    b.invalidate("purged").await.unwrap();
    let s = a
        .get_or_fill("purged", filler(&calls, ms(1), "fixed", minute()))
        .await
        .unwrap();
    assert_eq!((s.status, &s.value[..]), (Status::Stored, &b"fixed"[..]));
    let s = b
        .get_or_fill("purged", filler(&calls, ms(1), "b", minute()))
        .await
        .unwrap();
    assert_eq!((s.status, &s.value[..]), (Status::Hit, &b"fixed"[..]));
    assert_eq!(calls.get(), 2);
}

/// A failed fill whose mark the store could not take still keeps this instance to one source
/// call per lease: its callers take the fallback at once (the store shows the lease held, not
/// failed).
#[tokio::test(start_paused = true)]
async fn a_failure_the_store_could_not_mark_is_still_kept_here() {
    let gate = Arc::new(Gate {
        fail_errors: AtomicBool::new(true),
        ..Gate::default()
    });
    let e = Stampede::from_arc(gate, Config::default().lease(secs(5))).unwrap();
    let calls = Counter::default();
    let r = e.get_or_fill("unmarked", failing(&calls, ms(10))).await;
    assert!(matches!(r, Err(Error::Fill(_))), "{r:?}");
    let r = e
        .get_or_fill("unmarked", filler(&calls, ms(1), "v", minute()))
        .await;
    assert!(
        matches!(r, Err(Error::Fill(_))),
        "the fill's own error, at once: {r:?}"
    );
    assert_eq!(calls.get(), 1);
}

/// A purge while a fill runs ends that fill's lease: when the old fill then fails, it cannot
/// mark the lease failed, and the next caller on any instance fills from the (fixed) source.
/// Found by black-box testing: before, the late failure held every instance for a lease.
#[tokio::test(start_paused = true)]
async fn a_fill_that_fails_after_a_purge_does_not_fail_the_callers_after_it() {
    let mem = MemoryBackend::default();
    let cfg = Config::default().lease(secs(10)).wait_timeout(secs(15));
    let a = engine(&mem, cfg.clone());
    let b = engine(&mem, cfg.clone());
    let c = engine(&mem, cfg);
    let calls = Counter::default();
    let old = spawn_fill(&a, "purged-mid-fill", failing(&calls, secs(2)));
    tokio::time::sleep(ms(500)).await;
    b.invalidate("purged-mid-fill").await.unwrap();
    assert!(matches!(old.await.unwrap(), Err(Error::Fill(_))));
    let s = c
        .get_or_fill("purged-mid-fill", filler(&calls, ms(1), "fixed", minute()))
        .await
        .unwrap();
    assert_eq!((s.status, &s.value[..]), (Status::Stored, &b"fixed"[..]));
    assert_eq!(calls.get(), 2);
}

/// An instance that remembers a failed fill (its own) does not answer with it once another
/// instance's invalidation ended that lease and a new holder is filling: the store's word wins,
/// and its callers wait on the new fill.
#[tokio::test(start_paused = true)]
async fn a_remembered_failure_gives_way_to_a_new_holder_after_an_invalidation_elsewhere() {
    let mem = MemoryBackend::default();
    let cfg = Config::default().lease(secs(5)).wait_timeout(secs(10));
    let a = engine(&mem, cfg.clone());
    let b = engine(&mem, cfg);
    let calls = Counter::default();
    let r = a.get_or_fill("moved-on", failing(&calls, ms(10))).await;
    assert!(matches!(r, Err(Error::Fill(_))), "{r:?}");
    b.invalidate("moved-on").await.unwrap();
    waits_on_a_new_holders_fill(&a, &b, "moved-on", &calls).await;
}

/// While `other` fills `key` (taking its lease), a caller on `e` is served that fill
/// (`Collapsed`), not a failure `e` remembers; `calls` counts the one failed fill before.
async fn waits_on_a_new_holders_fill(
    e: &Stampede,
    other: &Stampede,
    key: &'static str,
    calls: &Counter,
) {
    let t = spawn_fill(other, key, filler(calls, ms(500), "new", minute()));
    tokio::time::sleep(ms(10)).await;
    let s = e
        .get_or_fill(key, filler(calls, ms(1), "mine", minute()))
        .await
        .unwrap();
    assert_eq!((s.status, &s.value[..]), (Status::Collapsed, &b"new"[..]));
    assert_eq!(t.await.unwrap().unwrap().status, Status::Stored);
    assert_eq!(calls.get(), 2);
}

/// A holder whose fill failed, and whose store says the lease is no longer its own (it ended
/// early), does not make its instance's callers fail for the rest of that lease: another
/// holder may be filling, and they wait on its fill.
#[tokio::test(start_paused = true)]
async fn a_failure_on_a_lease_the_store_no_longer_has_is_not_remembered() {
    let gate = Arc::new(Gate {
        fail_not_ours: AtomicBool::new(true),
        ..Gate::default()
    });
    let e = Stampede::from_arc(gate.clone(), Config::default().lease(secs(5))).unwrap();
    let calls = Counter::default();
    let r = e.get_or_fill("lost", failing(&calls, ms(10))).await;
    assert!(matches!(r, Err(Error::Fill(_))), "{r:?}");
    let slot = Digest::of_key("lost");
    let Acquire::Held { failed, .. } = gate.inner.try_acquire(&slot, secs(5), 0).await.unwrap()
    else {
        panic!("the holder keeps its lease");
    };
    assert!(!failed, "the gate marked nothing");
    // The lease ends early in the store, as the gate said it had, and another instance takes
    // it and fills.
    gate.inner.evict(&slot);
    let other = engine(&gate.inner, Config::default().lease(secs(5)));
    waits_on_a_new_holders_fill(&e, &other, "lost", &calls).await;
}

/// `get_fresh` serves a fresh value and nothing else: no fill, no lease, no refresh.
#[tokio::test(start_paused = true)]
async fn get_fresh_reads_a_fresh_value_and_never_fills() {
    let mem = MemoryBackend::default();
    let e = engine(&mem, Config::default());
    let key = || tower_stampede::CacheKey::new("fresh");
    assert!(e.get_fresh(key()).await.is_none(), "a miss");
    let calls = Counter::default();
    let ttl = Ttl::fresh(secs(1)).with_swr(secs(60));
    e.get_or_fill("fresh", filler(&calls, ms(1), "v", ttl))
        .await
        .unwrap();
    let s = e.get_fresh(key()).await.expect("fresh");
    assert_eq!((s.status, &s.value[..]), (Status::Hit, &b"v"[..]));
    tokio::time::advance(secs(2)).await;
    assert!(e.get_fresh(key()).await.is_none(), "stale, if inside swr");
    tokio::time::sleep(ms(100)).await;
    assert_eq!(calls.get(), 1, "nothing refreshed it");
    let slot = Digest::of_key("fresh");
    assert!(
        matches!(
            mem.try_acquire(&slot, secs(5), stored_fence(&mem, "fresh").0)
                .await
                .unwrap(),
            Acquire::Acquired { .. }
        ),
        "no lease was taken"
    );
}

fn stored_fence(mem: &MemoryBackend, key: &str) -> (u64, Option<Vec<u8>>) {
    let rt = mem.clone();
    let d = Digest::of_key(key);
    let f = futures_lite_block(async move { rt.fetch(&d, None).await.unwrap() });
    let b = f.entry.expect("an entry is stored");
    let h = Header::parse(&b).unwrap();
    let v = match Record::decode(&b) {
        Some(Record::Entry { value, .. }) => Some(value.to_vec()),
        _ => None,
    };
    (h.fence, v)
}

/// The memory backend answers synchronously; poll its future once.
fn futures_lite_block<T>(f: impl Future<Output = T>) -> T {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("memory backend futures are ready at once"),
    }
}

#[tokio::test(start_paused = true)]
async fn an_older_fence_cannot_overwrite_a_newer_entry() {
    // A's lease (1 s, no extension) expires during its 3 s fill; B takes over and stores.
    let mem = MemoryBackend::default();
    let cfg = Config::default()
        .lease(secs(1))
        .extend_lease(false)
        .wait_timeout(secs(10));
    let a = engine(&mem, cfg.clone());
    let b = engine(&mem, cfg);
    let calls = Counter::default();
    let ta = spawn_fill(&a, "fence", filler(&calls, secs(3), "older", minute()));
    tokio::time::sleep(ms(1500)).await;
    let sb = b
        .get_or_fill("fence", filler(&calls, ms(10), "newer", minute()))
        .await
        .unwrap();
    assert_eq!(sb.status, Status::Stored);
    let sa = ta.await.unwrap().unwrap();
    assert_eq!(sa.status, Status::NotStored, "A's late write was refused");
    assert_eq!(
        stored_fence(&mem, "fence").1.as_deref(),
        Some(&b"newer"[..])
    );
    assert_eq!(calls.get(), 2, "the lease expired on purpose: two fills");

    // Losing the counter never makes fences go backwards.
    let (f1, _) = stored_fence(&mem, "fence");
    mem.forget_fence_counter(&Digest::of_key("fence"));
    a.invalidate("fence").await.unwrap();
    let s = a
        .get_or_fill("fence", filler(&calls, ms(1), "after", minute()))
        .await
        .unwrap();
    assert_eq!(s.status, Status::Stored);
    let (f2, v) = stored_fence(&mem, "fence");
    assert!(f2 > f1, "fence {f2} after {f1}");
    assert_eq!(v.as_deref(), Some(&b"after"[..]));
}

#[tokio::test(start_paused = true)]
async fn a_tombstone_stops_a_fill_that_started_before_it() {
    let mem = MemoryBackend::default();
    let e = engine(&mem, Config::default());
    let calls = Counter::default();
    let t = spawn_fill(
        &e,
        "inv",
        filler(&calls, secs(2), "pre-invalidation", minute()),
    );
    tokio::time::sleep(secs(1)).await;
    e.invalidate("inv").await.unwrap();
    let s = t.await.unwrap().unwrap();
    assert_eq!(s.status, Status::NotStored);
    let s = e
        .get_or_fill("inv", filler(&calls, ms(1), "post", minute()))
        .await
        .unwrap();
    assert_eq!((&s.value[..], s.status), (&b"post"[..], Status::Stored));
}

#[tokio::test(start_paused = true)]
async fn a_pass_result_lets_followers_fill_in_parallel() {
    let mem = MemoryBackend::default();
    let e = engine(&mem, Config::default());
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let calls = Counter::default();
    let pass_fill = || {
        let (running, peak, calls) = (running.clone(), peak.clone(), calls.clone());
        move || async move {
            calls.inc();
            let n = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(secs(1)).await;
            running.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Fill::pass("private"))
        }
    };
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let e = e.clone();
        let f = pass_fill();
        tasks.push(tokio::spawn(async move { e.get_or_fill("pass", f).await }));
    }
    for t in tasks {
        let s = t.await.unwrap().unwrap();
        assert_eq!(s.status, Status::Passed);
    }
    assert_eq!(calls.get(), 20);
    assert!(
        peak.load(Ordering::SeqCst) >= 19,
        "after the first pass the other 19 ran together (peak {})",
        peak.load(Ordering::SeqCst)
    );
    // While the marker lives, callers go straight to the source: no waiting, in parallel.
    let s = e.get_or_fill("pass", pass_fill()).await.unwrap();
    assert_eq!(s.status, Status::Passed);

    // Hit-for-miss: a passed caller that gets a cacheable value stores it.
    let s = e
        .get_or_fill("pass", filler(&calls, ms(1), "now-public", minute()))
        .await
        .unwrap();
    assert_eq!(s.status, Status::Stored);
    let s = e
        .get_or_fill("pass", filler(&calls, ms(1), "x", minute()))
        .await
        .unwrap();
    assert_eq!((&s.value[..], s.status), (&b"now-public"[..], Status::Hit));
}

#[tokio::test(start_paused = true)]
async fn a_pass_marker_never_replaces_an_in_policy_stale_copy() {
    let mem = MemoryBackend::default();
    let e = engine(&mem, Config::default());
    let calls = Counter::default();
    let ttl = Ttl::fresh(secs(1)).with_sie(secs(600));
    e.get_or_fill("keep", filler(&calls, ms(1), "stale-ok", ttl))
        .await
        .unwrap();
    tokio::time::advance(secs(2)).await;
    let s = e
        .get_or_fill("keep", || async {
            Ok::<_, std::io::Error>(Fill::pass("uncacheable now"))
        })
        .await
        .unwrap();
    assert_eq!(s.status, Status::Passed);
    let d = Digest::of_key("keep");
    let got = mem.fetch(&d, None).await.unwrap();
    match got.entry.as_ref().and_then(Record::decode) {
        Some(Record::Entry { value, .. }) => assert_eq!(&value[..], b"stale-ok"),
        other => panic!("the stale entry was replaced: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn garbage_in_the_store_is_a_miss() {
    let mem = MemoryBackend::default();
    let e = engine(&mem, Config::default());
    let calls = Counter::default();
    let d = Digest::of_key("junk");
    let mut valid = Record::encode_marker(Header {
        kind: Kind::Pass,
        fence: 3,
        token: Token::random(),
        epoch: 0,
    })
    .to_vec();
    valid[3] = b'E'; // a header that parses, with no body behind it
    for junk in [
        Bytes::from_static(b""),
        Bytes::from_static(b"\xff\xfe garbage"),
        Bytes::from_static(b"TS1E0000"),
        Bytes::from(valid),
        Bytes::from(vec![0u8; 4096]),
    ] {
        mem.put_raw(&d, junk.clone(), secs(60));
        let s = e
            .get_or_fill("junk", filler(&calls, ms(1), "rebuilt", minute()))
            .await
            .unwrap();
        assert_eq!(&s.value[..], b"rebuilt", "junk {junk:?}");
        assert_eq!(s.status, Status::Stored, "junk {junk:?}");
    }
    assert_eq!(calls.get(), 5);
}

#[tokio::test(start_paused = true)]
async fn xfetch_refreshes_early_in_the_background() {
    let mem = MemoryBackend::default();
    // beta so large that any hit refreshes early.
    let e = engine(&mem, Config::default().xfetch_beta(1e9));
    let calls = Counter::default();
    e.get_or_fill("early", filler(&calls, ms(50), "v1", minute()))
        .await
        .unwrap();
    let s = e
        .get_or_fill("early", filler(&calls, ms(50), "v2", minute()))
        .await
        .unwrap();
    assert_eq!((&s.value[..], s.status), (&b"v1"[..], Status::Hit));
    tokio::time::sleep(secs(1)).await;
    assert_eq!(calls.get(), 2, "one early refresh ran");
    let s = Stampede::with_config(mem.clone(), Config::default())
        .unwrap()
        .get_or_fill("early", filler(&calls, ms(1), "v3", minute()))
        .await
        .unwrap();
    assert_eq!(&s.value[..], b"v2");
}

#[tokio::test(start_paused = true)]
async fn source_after_deadline_is_opt_in() {
    let mem = MemoryBackend::default();
    let cfg = Config::default()
        .lease(secs(2))
        .wait_timeout(secs(5))
        .source_after_deadline(true);
    let a = engine(&mem, cfg.clone());
    let b = engine(&mem, cfg);
    let calls = Counter::default();
    spawn_fill(&a, "optin", filler(&calls, secs(60), "slow", minute()));
    tokio::time::sleep(ms(10)).await;
    let s = b
        .get_or_fill("optin", filler(&calls, ms(1), "direct", minute()))
        .await
        .unwrap();
    assert_eq!((&s.value[..], s.status), (&b"direct"[..], Status::Passed));
    assert_eq!(calls.get(), 2);
}

#[test]
fn configuration_relations_are_checked() {
    let mem = MemoryBackend::default();
    let r = Stampede::with_config(mem, Config::default().lease(secs(10)).wait_timeout(secs(5)));
    assert!(r.is_err());
}

// Regressions found in review.

#[tokio::test(start_paused = true)]
async fn a_waiter_on_another_instances_pass_goes_to_the_source() {
    let mem = MemoryBackend::default();
    let a = engine(&mem, Config::default());
    let b = engine(&mem, Config::default());
    let calls = Counter::default();
    let c = calls.clone();
    let ta = tokio::spawn({
        let a = a.clone();
        async move {
            a.get_or_fill("p2", move || async move {
                c.inc();
                tokio::time::sleep(ms(500)).await;
                Ok::<_, std::io::Error>(Fill::pass("a's private"))
            })
            .await
        }
    });
    tokio::time::sleep(ms(10)).await;
    let s = b
        .get_or_fill("p2", filler(&calls, ms(1), "b's own", minute()))
        .await
        .unwrap();
    assert_eq!(&s.value[..], b"b's own", "B ran its own fill, not an error");
    assert_eq!(ta.await.unwrap().unwrap().status, Status::Passed);
}

#[tokio::test(start_paused = true)]
async fn a_late_follower_keeps_its_own_deadline() {
    let mem = MemoryBackend::default();
    let cfg = Config::default()
        .lease(secs(2))
        .wait_timeout(secs(10))
        .fill_timeout(secs(120));
    let a = engine(&mem, cfg.clone());
    let b = engine(&mem, cfg);
    let calls = Counter::default();
    spawn_fill(&a, "late", filler(&calls, secs(60), "slow", minute()));
    tokio::time::sleep(ms(10)).await;
    let start = Instant::now();
    let first = spawn_fill(&b, "late", filler(&calls, ms(1), "x", minute()));
    tokio::time::sleep(secs(8)).await;
    let late_start = Instant::now();
    let late = b
        .get_or_fill("late", filler(&calls, ms(1), "y", minute()))
        .await;
    assert!(matches!(late, Err(Error::Timeout(_))));
    assert!(
        late_start.elapsed() >= secs(10),
        "the late caller waited its own 10 s, not the first caller's remaining 2 s"
    );
    assert!(matches!(first.await.unwrap(), Err(Error::Timeout(_))));
    assert!(start.elapsed() >= secs(18));
    assert_eq!(calls.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_early_refresh_that_passes_keeps_the_fresh_entry() {
    let mem = MemoryBackend::default();
    let e = engine(&mem, Config::default().xfetch_beta(1e9));
    let calls = Counter::default();
    e.get_or_fill("xf", filler(&calls, ms(50), "fresh", minute()))
        .await
        .unwrap();
    e.get_or_fill("xf", || async {
        Ok::<_, std::io::Error>(Fill::pass("now private"))
    })
    .await
    .unwrap();
    tokio::time::sleep(secs(1)).await;
    let got = mem.fetch(&Digest::of_key("xf"), None).await.unwrap();
    assert!(
        matches!(
            got.entry.as_ref().and_then(Record::decode),
            Some(Record::Entry { .. })
        ),
        "the fresh entry survived the refresh's pass"
    );
}

#[tokio::test(start_paused = true)]
async fn failing_keys_do_not_grow_the_memory_store_past_its_budget() {
    let mem = MemoryBackend::new(16 * 1024);
    let e = engine(&mem, Config::default().lease(ms(100)).wait_timeout(secs(2)));
    let calls = Counter::default();
    for i in 0..2000 {
        let _ = e
            .get_or_fill(format!("fail-{i}"), failing(&calls, ms(1)))
            .await;
        if i % 100 == 0 {
            tokio::time::sleep(ms(200)).await; // leases expire
        }
    }
    tokio::time::sleep(ms(200)).await;
    let _ = e.get_or_fill("one-more", failing(&calls, ms(1))).await;
    assert!(
        mem.used_bytes() <= 16 * 1024 + 2048,
        "{} bytes",
        mem.used_bytes()
    );
}

/// `drain` waits for running fills; a timeout too long for a deadline means "as long as it
/// takes", not an overflow panic.
#[tokio::test(start_paused = true)]
async fn drain_waits_for_a_running_fill_even_without_a_usable_deadline() {
    let engine = Stampede::new(MemoryBackend::default());
    assert!(engine.drain(Duration::MAX).await, "nothing running");
    let e = engine.clone();
    let caller = tokio::spawn(async move {
        e.get_or_fill("k", || async {
            tokio::time::sleep(secs(3)).await;
            Ok::<_, std::io::Error>(Fill::store("v", minute()))
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The caller goes away; its fill is the engine's now, and drain waits for it.
    caller.abort();
    assert!(engine.drain(Duration::MAX).await);
    let served = engine
        .get_or_fill("k", || async {
            Ok::<_, std::io::Error>(Fill::store("other", minute()))
        })
        .await
        .unwrap();
    assert_eq!((&served.value[..], served.status), (&b"v"[..], Status::Hit));
}

/// A lease reported held for `Duration::MAX` (a backend of someone else's) is waited on with
/// backoff until the caller's deadline, not an overflow panic in the waiter after the first try.
#[tokio::test(start_paused = true)]
async fn a_lease_held_for_ever_is_waited_on_until_the_deadline() {
    let acquires = Counter::default();
    let e = Stampede::with_config(
        Gate {
            held_forever: Some(acquires.clone()),
            ..Gate::default()
        },
        Config::default(),
    )
    .unwrap();
    let calls = Counter::default();
    let r = e
        .get_or_fill("k", filler(&calls, ms(1), "v", minute()))
        .await;
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    assert_eq!(calls.get(), 0);
    // One try per backoff step (10 ms doubling to 500 ms, each jittered to at least half) in
    // the 10 s deadline: 20 to 60 tries. A waiter that panicked on the reply left its flight at
    // once, and the caller tried again without sleeping (over a thousand tries).
    let tries = acquires.get();
    assert!((20..=60).contains(&tries), "tried {tries} times");
}

/// A passed caller's fill that turns cacheable (hit-for-miss) is stored only under the fence seen
/// before the source was called: an invalidation while it ran keeps its older content out.
#[tokio::test(start_paused = true)]
async fn a_passed_fill_cannot_store_what_an_invalidation_made_old() {
    let mem = MemoryBackend::default();
    let e = engine(&mem, Config::default());
    let s = e
        .get_or_fill("k", || async { Ok::<_, std::io::Error>(Fill::pass("p")) })
        .await
        .unwrap();
    assert_eq!(s.status, Status::Passed);
    let calls = Counter::default();
    let t = spawn_fill(
        &e,
        "k",
        filler(&calls, secs(1), "pre-invalidation", minute()),
    );
    tokio::time::sleep(ms(10)).await;
    e.invalidate("k").await.unwrap();
    let s = t.await.unwrap().unwrap();
    assert_eq!(
        (&s.value[..], s.status),
        (&b"pre-invalidation"[..], Status::Passed),
        "its caller gets it, unstored"
    );
    let s = e
        .get_or_fill("k", filler(&calls, ms(1), "post", minute()))
        .await
        .unwrap();
    assert_eq!((&s.value[..], s.status), (&b"post"[..], Status::Stored));
    assert_eq!(calls.get(), 2);
}

/// The half-open breaker's probe whose caller goes away before the backend answers leaves the
/// next call free to probe: the breaker closes once the backend is back.
#[tokio::test(start_paused = true)]
async fn a_probe_given_up_by_its_caller_lets_the_next_call_probe() {
    let gate = Arc::new(Gate::default());
    let e = Stampede::from_arc(gate.clone(), Config::default().breaker(1, secs(1))).unwrap();
    let calls = Counter::default();
    gate.fail_fetch.store(true, Ordering::SeqCst);
    let s = e
        .get_or_fill("a", filler(&calls, ms(1), "v", minute()))
        .await
        .unwrap();
    assert_eq!(s.status, Status::Bypass);
    assert!(e.breaker_open());
    gate.fail_fetch.store(false, Ordering::SeqCst);
    tokio::time::advance(secs(2)).await;
    gate.hang_fetch.store(true, Ordering::SeqCst);
    let gone = tokio::time::timeout(
        ms(50),
        e.get_or_fill("b", filler(&calls, ms(1), "v", minute())),
    );
    assert!(gone.await.is_err(), "the probe's caller gave up");
    gate.hang_fetch.store(false, Ordering::SeqCst);
    let s = e
        .get_or_fill("c", filler(&calls, ms(1), "v", minute()))
        .await
        .unwrap();
    assert_eq!(s.status, Status::Stored);
    assert!(!e.breaker_open());
}

/// A `Failed` signal while the lease reports any remaining time (a backend of someone else's may
/// say `Duration::MAX`) is the fallback at once, not a panic in the flight.
#[tokio::test(start_paused = true)]
async fn a_failure_signal_under_an_endless_lease_is_the_fallback() {
    let mem = MemoryBackend::default();
    let gate = Arc::new(Gate {
        inner: mem.clone(),
        held_forever: Some(Counter::default()),
        ..Gate::default()
    });
    let e = Stampede::from_arc(gate, Config::default()).unwrap();
    let calls = Counter::default();
    // Another instance's holder, whose fill failed (the gate hides its lease from the flight).
    let slot = Digest::of_key("k");
    let Acquire::Acquired { token, .. } = mem.try_acquire(&slot, secs(60), 0).await.unwrap() else {
        panic!("the lease was free");
    };
    let t = spawn_fill(&e, "k", filler(&calls, ms(1), "v", minute()));
    tokio::time::sleep(ms(5)).await;
    assert!(mem.fail(&slot, token, secs(60)).await.unwrap());
    let r = t.await.unwrap();
    assert!(matches!(r, Err(Error::FailedElsewhere)), "{r:?}");
    assert_eq!(calls.get(), 0);
}

/// A fill run for its caller alone (a passed key) goes when its caller does: it is not left
/// running past `fill_timeout`.
#[tokio::test(start_paused = true)]
async fn a_passed_callers_fill_ends_with_its_caller() {
    let mem = MemoryBackend::default();
    let e = engine(&mem, Config::default().fill_timeout(secs(1)));
    e.get_or_fill("k", || async { Ok::<_, std::io::Error>(Fill::pass("p")) })
        .await
        .unwrap();
    let alive = Counter::default();
    struct Alive(Counter);
    impl Drop for Alive {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    let a = alive.clone();
    let gone = tokio::time::timeout(
        ms(100),
        e.get_or_fill("k", move || async move {
            a.inc();
            let _alive = Alive(a.clone());
            std::future::pending::<()>().await;
            Ok::<_, std::io::Error>(Fill::pass("never"))
        }),
    );
    assert!(gone.await.is_err());
    tokio::time::sleep(secs(3600)).await;
    assert_eq!(
        alive.get(),
        0,
        "the source call outlived its caller by an hour"
    );
}

/// A `pass` signalled by another instance's lease holder that kept an in-policy stale copy (no
/// marker to find) sends waiters to the source at once, together, not one lease after another.
#[tokio::test(start_paused = true)]
async fn a_pass_signal_without_a_marker_sends_other_instances_to_the_source() {
    let mem = MemoryBackend::default();
    let engines: Vec<Stampede> = (0..4).map(|_| engine(&mem, Config::default())).collect();
    engines[0]
        .get_or_fill("k", || async {
            Ok::<_, std::io::Error>(Fill::store("old", Ttl::fresh(secs(1)).with_sie(secs(600))))
        })
        .await
        .unwrap();
    tokio::time::advance(secs(2)).await;
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, e) in engines.iter().enumerate() {
        let (e, running, peak) = (e.clone(), running.clone(), peak.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(ms(i as u64 * 5)).await;
            e.get_or_fill("k", move || async move {
                let n = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(secs(2)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(Fill::pass("private"))
            })
            .await
        }));
    }
    for t in tasks {
        let s = t.await.unwrap().unwrap();
        assert_eq!((&s.value[..], s.status), (&b"private"[..], Status::Passed));
    }
    // The first holds the lease; the other three go to the source when its pass is signalled.
    assert_eq!(peak.load(Ordering::SeqCst), 3);
}

/// When the store is down and the caller's own selector names no variant for its fill's value,
/// the caller still gets that value (it was lost: `FillPanicked`).
#[tokio::test(start_paused = true)]
async fn an_unkeyable_value_of_ones_own_uncached_fill_is_served() {
    for fail_fetch in [true, false] {
        let gate = Arc::new(Gate::default());
        // Fetches fail (fail open at once), or only the lease does (inside the flight).
        gate.fail_fetch.store(fail_fetch, Ordering::SeqCst);
        gate.fail_acquire.store(!fail_fetch, Ordering::SeqCst);
        let e = Stampede::from_arc(gate, Config::default()).unwrap();
        let none: Selector = Arc::new(|_: &[u8]| None);
        let r = e
            .get_or_fill_with(CacheKey::new("v").with_selector(none), |_| async {
                Ok::<_, std::io::Error>(Fill::Store {
                    value: Bytes::from_static(b"body"),
                    ttl: minute(),
                    selector: Some(Bytes::from_static(b"x-other")),
                })
            })
            .await;
        let s = r.unwrap_or_else(|e| panic!("fail_fetch {fail_fetch}: {e:?}"));
        assert_eq!((&s.value[..], s.status), (&b"body"[..], Status::Bypass));
    }
}

/// A tombstone outlives every fill that started before it, however short `tombstone_ttl` is
/// set: a fill slower than it cannot write its older content once it expired.
#[tokio::test(start_paused = true)]
async fn a_short_tombstone_ttl_still_outlives_a_slow_fill() {
    let mem = MemoryBackend::default();
    let e = engine(&mem, Config::default().tombstone_ttl(secs(1)));
    let calls = Counter::default();
    let t = spawn_fill(
        &e,
        "k",
        filler(&calls, secs(5), "pre-invalidation", minute()),
    );
    tokio::time::sleep(secs(1)).await;
    e.invalidate("k").await.unwrap();
    let s = t.await.unwrap().unwrap();
    assert_eq!(s.status, Status::NotStored);
    let s = e
        .get_or_fill("k", filler(&calls, ms(1), "post", minute()))
        .await
        .unwrap();
    assert_eq!((&s.value[..], s.status), (&b"post"[..], Status::Stored));
}

/// A write the store answered and refused for this key's data (`store_answered`) gives the
/// lease back: nothing will be written under it, and the store is up, so the next caller need
/// not wait for the lease to expire. Nor does it count against the breaker.
#[tokio::test(start_paused = true)]
async fn a_write_refused_by_a_healthy_store_gives_the_lease_back() {
    let gate = Arc::new(Gate::default());
    gate.write_answered.store(true, Ordering::SeqCst);
    let e = Stampede::with_config(gate.clone(), Config::default()).unwrap();
    for _ in 0..10 {
        let s = e
            .get_or_fill("in-the-way", || async {
                Ok::<_, std::io::Error>(Fill::store("v", minute()))
            })
            .await
            .unwrap();
        assert_eq!(&s.value[..], b"v");
        // Not `NotStored` (fenced out, or too large): the write failed.
        assert_eq!(s.status, Status::WriteFailed);
    }
    assert!(!e.breaker_open());
    let slot = Digest::of_key("in-the-way");
    match gate
        .inner
        .try_acquire(&slot, Duration::from_secs(60), 0)
        .await
        .unwrap()
    {
        Acquire::Acquired { .. } => {}
        other => panic!("the lease was kept: {other:?}"),
    }
}
