//! The Redis backend against real `redis-server` processes: the conformance suite, then the
//! engine on Redis (collapsing across instances, round trips, lease expiry, lost counters,
//! outages). Every test starts its own server on a free port, so they run in parallel.
#![cfg(feature = "redis")]

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use common::conformance::{self, Harness};
use common::servers::{Monitor, Server};
use common::{call, outage_config, Counter};
use tower_stampede::backend::redis::{redis, RedisBackend};
use tower_stampede::backend::{Acquire, Backend, Signal, WriteOutcome};
use tower_stampede::entry::Header;
use tower_stampede::{Config, Digest, Fill, Stampede, Status, Ttl};

async fn backend(server: &Server) -> RedisBackend {
    RedisBackend::builder(server.url())
        .connect()
        .await
        .expect("connect to the test's redis-server")
}

async fn raw_cmd<T: redis::FromRedisValue>(b: &RedisBackend, cmd: &redis::Cmd) -> T {
    let mut c = b.connection().await.unwrap();
    cmd.query_async::<T>(&mut c).await.unwrap()
}

async fn near_backend(server: &Server) -> RedisBackend {
    RedisBackend::builder(server.url())
        .near_cache(1 << 20)
        .connect()
        .await
        .expect("connect to the test's redis-server")
}

fn harness(b: RedisBackend) -> Harness {
    let b2 = b.clone();
    Harness {
        backend: Arc::new(b),
        short_lease: Duration::from_millis(100),
        expiry_slack: Duration::from_millis(50),
        signals: true,
        forget_counter: Arc::new(move |d| {
            let b = b2.clone();
            Box::pin(async move {
                let mut del = redis::cmd("DEL");
                del.arg(b.prefix().fence(&d));
                let n: i64 = raw_cmd(&b, &del).await;
                assert_eq!(n, 1, "the fence counter existed");
            })
        }),
    }
}

async fn plain_harness() -> (Harness, Server) {
    let server = Server::redis();
    (harness(backend(&server).await), server)
}

async fn near_harness() -> (Harness, Server) {
    let server = Server::redis();
    (harness(near_backend(&server).await), server)
}

conformance_suite!(conformance_plain, plain_harness);
// The suite again with the near cache on: it must not change any outcome the contract names.
conformance_suite!(conformance_near_cache, near_harness);

/// The fence in the header of the record stored for `key`.
async fn stored_fence(b: &RedisBackend, key: &str) -> Option<u64> {
    let f = b.fetch(&Digest::of_key(key), None).await.unwrap();
    f.entry
        .as_ref()
        .and_then(|e| Header::parse(e))
        .map(|h| h.fence)
}

async fn wait_for_lease(b: &RedisBackend, key: &str, present: bool) {
    let lease = b.prefix().lease(&Digest::of_key(key));
    for _ in 0..1000 {
        let mut exists = redis::cmd("EXISTS");
        exists.arg(&lease);
        let n: i64 = raw_cmd(b, &exists).await;
        if (n == 1) == present {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("lease of {key} never became present={present}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fill_for_1000_callers_over_four_engines() {
    let server = Server::redis();
    // Generous per-call timeout: this test is about collapsing, not about a slow machine
    // tipping calls into fail-open.
    let cfg = Config::default().backend_timeout(Duration::from_secs(2));
    let mut engines = Vec::new();
    for _ in 0..4 {
        engines.push(Stampede::with_config(backend(&server).await, cfg.clone()).unwrap());
    }
    let fills = Counter::default();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let engine = engines[i % 4].clone();
        let fills = fills.clone();
        tasks.push(tokio::spawn(async move {
            engine
                .get_or_fill("cold", move || async move {
                    fills.inc();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, std::io::Error>(Fill::store(
                        "the value",
                        Ttl::fresh(Duration::from_secs(60)),
                    ))
                })
                .await
        }));
    }
    let mut statuses = std::collections::HashMap::new();
    for t in tasks {
        let served = t.await.unwrap().expect("every caller is served");
        assert_eq!(&served.value[..], b"the value");
        *statuses.entry(format!("{:?}", served.status)).or_insert(0) += 1;
    }
    assert_eq!(
        fills.get(),
        1,
        "exactly one fill for 1,000 callers: {statuses:?}"
    );
    assert_eq!(statuses.get("Stored"), Some(&1), "{statuses:?}");
}

#[tokio::test]
async fn a_hit_is_one_command_and_a_filling_miss_at_most_three() {
    let server = Server::redis();
    let engine = Stampede::new(backend(&server).await);
    let fill =
        || async { Ok::<_, std::io::Error>(Fill::store("v", Ttl::fresh(Duration::from_secs(60)))) };
    let mut monitor = Monitor::start(&server);

    server.mark("m1");
    let miss = engine.get_or_fill("rt", fill).await.unwrap();
    server.mark("m2");
    let hit = engine.get_or_fill("rt", fill).await.unwrap();
    server.mark("m3");

    assert_eq!(miss.status, Status::Stored);
    assert_eq!(hit.status, Status::Hit);
    let on_miss = monitor.until("m1");
    assert!(
        on_miss.is_empty(),
        "nothing before the first call: {on_miss:?}"
    );
    let on_miss = monitor.until("m2");
    assert!(on_miss.len() <= 3, "a filling miss: {on_miss:#?}");
    assert!(on_miss[0].starts_with("\"GET\""), "{on_miss:#?}");
    assert!(
        on_miss[1..].iter().all(|c| c.starts_with("\"EVALSHA\"")),
        "{on_miss:#?}"
    );
    eprintln!("filling miss: {on_miss:#?}");
    let on_hit = monitor.until("m3");
    eprintln!("hit: {on_hit:#?}");
    assert_eq!(on_hit.len(), 1, "a hit: {on_hit:#?}");
    assert!(on_hit[0].starts_with("\"GET\""), "{on_hit:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_outlives_its_lease_is_refused_by_the_fence() {
    let server = Server::redis();
    let cfg = Config::default()
        .lease(Duration::from_millis(300))
        .extend_lease(false)
        .wait_timeout(Duration::from_secs(5))
        .fill_timeout(Duration::from_secs(10))
        .backend_timeout(Duration::from_secs(2));
    let (ba, bb) = (backend(&server).await, backend(&server).await);
    let probe = ba.clone();
    let a = Stampede::with_config(ba, cfg.clone()).unwrap();
    let b = Stampede::with_config(bb, cfg).unwrap();

    // t0: A takes the lease and starts a fill that takes longer than the lease.
    let slow = tokio::spawn(async move {
        a.get_or_fill("expiring", || async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, std::io::Error>(Fill::store("old", Ttl::fresh(Duration::from_secs(60))))
        })
        .await
    });
    wait_for_lease(&probe, "expiring", true).await;
    // The lease expires (no extension) while A is still filling.
    wait_for_lease(&probe, "expiring", false).await;
    // B finds no lease and no entry: it takes a new grant and fills first.
    let newer = b
        .get_or_fill("expiring", || async {
            Ok::<_, std::io::Error>(Fill::store("new", Ttl::fresh(Duration::from_secs(60))))
        })
        .await
        .unwrap();
    assert_eq!(newer.status, Status::Stored);
    let b_fence = stored_fence(&probe, "expiring").await.unwrap();
    // A's late fill lands on a newer fence and is refused.
    let late = slow.await.unwrap().unwrap();
    assert_eq!(&late.value[..], b"old", "A's caller still gets A's value");
    assert_eq!(
        late.status,
        Status::NotStored,
        "the fence refused A's write"
    );
    assert_eq!(stored_fence(&probe, "expiring").await, Some(b_fence));
    let c = Stampede::new(probe.clone());
    let now = c
        .get_or_fill("expiring", || async {
            Ok::<_, std::io::Error>(Fill::store("unused", Ttl::fresh(Duration::from_secs(60))))
        })
        .await
        .unwrap();
    assert_eq!(now.status, Status::Hit);
    assert_eq!(&now.value[..], b"new", "the newer fill is the one stored");
}

#[tokio::test]
async fn grants_stay_above_the_entry_after_the_counter_is_lost_or_redis_restarts() {
    let mut server = Server::redis();
    let cfg = Config::default().breaker(100, Duration::from_millis(100));
    let b = backend(&server).await;
    let engine = Stampede::with_config(b.clone(), cfg).unwrap();
    let key = "counter-lost";
    // Fresh for a moment, then kept for stale-if-error: stored but a miss for the engine.
    let ttl = Ttl::fresh(Duration::from_millis(100)).with_sie(Duration::from_secs(60));
    let fill =
        move |v: &'static str| move || async move { Ok::<_, std::io::Error>(Fill::store(v, ttl)) };

    let first = engine.get_or_fill(key, fill("one")).await.unwrap();
    assert_eq!(first.status, Status::Stored);
    let f1 = stored_fence(&b, key).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;

    // The counter is gone (eviction, failover): the next grant still goes above the entry.
    let mut del = redis::cmd("DEL");
    del.arg(b.prefix().fence(&Digest::of_key(key)));
    let n: i64 = raw_cmd(&b, &del).await;
    assert_eq!(n, 1);
    let second = engine.get_or_fill(key, fill("two")).await.unwrap();
    assert_eq!(
        second.status,
        Status::Stored,
        "the refill after a lost counter is stored"
    );
    assert_eq!(&second.value[..], b"two");
    let f2 = stored_fence(&b, key).await.unwrap();
    assert!(f2 > f1, "fence {f2} after {f1}");

    // A restart loses everything; fills resume and are served, without a new engine.
    server.restart();
    let mut stored = false;
    for _ in 0..50 {
        let s = engine.get_or_fill(key, fill("three")).await.unwrap();
        assert_eq!(&s.value[..], b"three");
        if s.status == Status::Stored {
            stored = true;
            break;
        }
        assert_eq!(
            s.status,
            Status::Bypass,
            "before reconnecting, calls fail open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(stored, "a fill after the restart is stored");
    let hit = engine.get_or_fill(key, fill("four")).await.unwrap();
    assert_eq!(hit.status, Status::Hit);
    assert_eq!(&hit.value[..], b"three");
    // And the backend's own grant goes above what is stored now.
    let f3 = stored_fence(&b, key).await.unwrap();
    match b
        .try_acquire(&Digest::of_key(key), Duration::from_secs(5), f3)
        .await
        .unwrap()
    {
        Acquire::Acquired { fence, .. } => assert!(fence > f3),
        other => panic!("{other:?}"),
    }
}

/// A restart without persistence loses the entry and the fence counter together; the grant's
/// floor (the server's clock) keeps a holder from before it from overwriting what came after.
#[tokio::test]
async fn a_holder_from_before_a_restart_cannot_overwrite_what_came_after() {
    let mut server = Server::redis();
    let b = backend(&server).await;
    conformance::a_holder_from_before_a_loss_cannot_overwrite_what_came_after(&b, || {
        server.restart()
    })
    .await;
}

/// Fences are Lua numbers in the scripts, exact below 2^53: a counter just under it still
/// grants exactly; one at it counts as no counter; a stored fence at it (only forged bytes put
/// one there) is an error before anything is written, the lease not taken.
#[tokio::test]
async fn fence_arithmetic_stops_at_2_pow_53() {
    let server = Server::redis();
    let b = backend(&server).await;
    const EXACT: u64 = 1 << 53;
    let set = |key: String, v: String| {
        let b = b.clone();
        async move {
            let mut set = redis::cmd("SET");
            set.arg(key).arg(v);
            let () = raw_cmd(&b, &set).await;
        }
    };
    let ttl = Duration::from_secs(30);

    let s = Digest::of_key("near-2-53");
    set(b.prefix().fence(&s), (EXACT - 2).to_string()).await;
    match b.try_acquire(&s, ttl, 0).await.unwrap() {
        Acquire::Acquired { fence, .. } => assert_eq!(fence, EXACT - 1),
        other => panic!("{other:?}"),
    }

    let s = Digest::of_key("at-2-53");
    set(b.prefix().fence(&s), EXACT.to_string()).await;
    match b.try_acquire(&s, ttl, 0).await.unwrap() {
        Acquire::Acquired { fence, .. } => assert!(fence < EXACT, "{fence}"),
        other => panic!("{other:?}"),
    }

    // A stored fence at or above 2^53 was never granted: forged bytes, and they count as no
    // fence. Before, every grant and every invalidation of the key failed for as long as the
    // bytes lived (for ever, without a TTL): the URL bypassed the cache, or answered 502.
    let forge = |s: Digest| {
        let b = b.clone();
        async move {
            let forged = conformance::entry(EXACT, tower_stampede::backend::Token::NONE, b"x");
            let mut put = redis::cmd("SET");
            put.arg(b.prefix().entry(&s)).arg(&forged[..]);
            let () = raw_cmd(&b, &put).await;
        }
    };
    let s = Digest::of_key("stored-2-53");
    forge(s).await;
    let (token, fence) = match b.try_acquire(&s, ttl, EXACT).await.unwrap() {
        Acquire::Acquired { token, fence } => (token, fence),
        other => panic!("{other:?}"),
    };
    assert!(fence < EXACT, "{fence}");
    let w = conformance::write(s, token, fence, b"real", ttl);
    assert_eq!(b.write(w).await.unwrap(), WriteOutcome::Stored);
    let got = b.fetch(&s, None).await.unwrap();
    assert_eq!(
        got.entry.as_deref().map(|e| &e[e.len() - 4..]),
        Some(&b"real"[..])
    );
    let s = Digest::of_key("stored-2-53-invalidated");
    forge(s).await;
    b.invalidate(&s, ttl)
        .await
        .expect("a forged fence is invalidated");
    match b.try_acquire(&s, ttl, 0).await.unwrap() {
        Acquire::Refreshed => {}
        other => panic!("the tombstone is what a grant now compares with: {other:?}"),
    }
}

/// Bytes at the fence counter that are not a plain number ('nan', '1e30', text) count as no
/// counter: the grant is a real fence and its holder can give the lease back.
#[tokio::test]
async fn a_garbage_fence_counter_is_no_counter() {
    let server = Server::redis();
    let b = backend(&server).await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    for (i, junk) in ["nan", "inf", "-5", "1e30", "99999999999999999999999", "x"]
        .into_iter()
        .enumerate()
    {
        let s = Digest::of_key(format!("junk-counter-{i}"));
        let mut set = redis::cmd("SET");
        set.arg(b.prefix().fence(&s)).arg(junk);
        let () = raw_cmd(&b, &set).await;
        let (token, fence) = match b.try_acquire(&s, Duration::from_secs(30), 0).await {
            Ok(Acquire::Acquired { token, fence }) => (token, fence),
            other => panic!("counter {junk:?}: {other:?}"),
        };
        // The floor is the server's clock (the same clock as ours here), not the junk.
        assert!(fence > before, "counter {junk:?}: fence {fence}");
        assert!(
            fence < before + 600_000_000,
            "counter {junk:?}: fence {fence}"
        );
        assert_eq!(
            b.write(conformance::write(
                s,
                token,
                fence,
                b"v",
                Duration::from_secs(60)
            ))
            .await
            .unwrap(),
            WriteOutcome::Stored,
            "counter {junk:?}"
        );
        let mut get = redis::cmd("GET");
        get.arg(b.prefix().fence(&s));
        let now: String = raw_cmd(&b, &get).await;
        assert_eq!(now, fence.to_string(), "counter {junk:?} repaired");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_fails_open_and_hits_come_back_after_a_restart() {
    let mut server = Server::redis();
    let engine = Stampede::with_config(backend(&server).await, outage_config()).unwrap();
    assert_eq!(call(&engine, "warm".into()).await.status, Status::Stored);
    assert_eq!(call(&engine, "warm".into()).await.status, Status::Hit);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..8 {
        let (engine, stop) = (engine.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                statuses.push(call(&engine, format!("load-{w}-{}", i % 16)).await.status);
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = call(&engine, "warm".into()).await;
    assert_eq!(
        during.status,
        Status::Bypass,
        "Redis is gone: served from the origin"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    for t in load {
        all.extend(t.await.expect("no load task panicked"));
    }
    assert!(
        all.contains(&Status::Bypass),
        "some calls ran during the outage"
    );

    server.restart();
    let mut back = false;
    for _ in 0..100 {
        if call(&engine, "warm".into()).await.status == Status::Hit {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        back,
        "hits come back after the restart, with the same engine"
    );
    assert!(!engine.breaker_open());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_opens_the_breaker_and_sigcont_closes_it() {
    let server = Server::redis();
    let engine = Stampede::with_config(backend(&server).await, outage_config()).unwrap();
    common::pause_fails_open_and_resume_brings_hits_back(&server, &engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_woken_by_the_filled_signal() {
    let server = Server::redis();
    let (ba, bb, observer) = (
        backend(&server).await,
        backend(&server).await,
        backend(&server).await,
    );
    let key = "woken";
    let mut sub = observer
        .subscribe(&Digest::of_key(key))
        .await
        .unwrap()
        .expect("the Redis backend has signals");
    // A holds a 60 s lease and B polls every 30 s, so B's first poll would come 30 s after it
    // starts waiting: only the `filled` signal can serve it sooner. The bound below (15 s, for
    // a fill of 0.5 s) is what tells the two apart; it is not a measurement (the bench is).
    let long = Config::default()
        .lease(Duration::from_secs(60))
        .backoff(Duration::from_secs(30), Duration::from_secs(30))
        .wait_timeout(Duration::from_secs(100));
    let a = Stampede::with_config(ba, long.clone()).unwrap();
    let b = Stampede::with_config(bb, long).unwrap();
    let fills = Counter::default();
    let fa = fills.clone();
    let holder = tokio::spawn(async move {
        a.get_or_fill(key, move || async move {
            fa.inc();
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok::<_, std::io::Error>(Fill::store("filled", Ttl::fresh(Duration::from_secs(60))))
        })
        .await
    });
    wait_for_lease(&observer, key, true).await;
    let fb = fills.clone();
    let started = std::time::Instant::now();
    let waiter = tokio::time::timeout(
        Duration::from_secs(15),
        b.get_or_fill(key, move || async move {
            fb.inc();
            Ok::<_, std::io::Error>(Fill::store(
                "waiter's own",
                Ttl::fresh(Duration::from_secs(60)),
            ))
        }),
    )
    .await
    .expect("the waiter was woken by the signal, not by its 30 s poll")
    .unwrap();
    eprintln!("waiter served after {:?}", started.elapsed());
    assert_eq!(waiter.status, Status::Collapsed);
    assert_eq!(&waiter.value[..], b"filled");
    assert_eq!(holder.await.unwrap().unwrap().status, Status::Stored);
    assert_eq!(fills.get(), 1);
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap(),
        Some(Signal::Filled),
        "the fill published `filled` on the slot's channel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fill_reaches_every_instance_at_once() {
    let server = Server::redis();
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(Arc::new(backend(&server).await) as Arc<dyn Backend>);
    }
    common::a_failure_reaches_every_instance_at_once(
        backends.try_into().ok().unwrap(),
        Config::default().backend_timeout(Duration::from_secs(2)),
    )
    .await;
}

#[tokio::test]
async fn subscriptions_end_when_the_connection_breaks_and_work_again_after() {
    let mut server = Server::redis();
    let b = backend(&server).await;
    let s = Digest::of_key("resubscribe");
    let mut sub = b.subscribe(&s).await.unwrap().unwrap();
    server.restart();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap(),
        None,
        "a broken subscriber connection ends every subscription"
    );
    drop(sub);
    let mut sub = None;
    for _ in 0..50 {
        if let Ok(s2) = b.subscribe(&s).await {
            sub = s2;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sub = sub.expect("subscribed again after the restart");
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(Acquire::Acquired { token, .. }) =
            b.try_acquire(&s, Duration::from_secs(10), 0).await
        {
            ok = b.release(&s, token, Signal::Released).await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "took and released the lease after the restart");
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap(),
        Some(Signal::Released)
    );
}

#[tokio::test]
async fn unsubscribes_when_the_last_subscription_drops() {
    let server = Server::redis();
    let b = backend(&server).await;
    let s = Digest::of_key("unsub");
    let channel = b.prefix().channel(&s);
    let numsub = |server: &Server| {
        // PUBSUB SHARDNUMSUB <channel> -> *2 $len channel :n
        let reply = server.raw(&format!("PUBSUB SHARDNUMSUB {channel}"));
        reply
            .trim_end()
            .rsplit(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let one = b.subscribe(&s).await.unwrap().unwrap();
    let two = b.subscribe(&s).await.unwrap().unwrap();
    assert_eq!(
        numsub(&server),
        "1",
        "one server subscription shared by both"
    );
    drop(one);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(numsub(&server), "1", "still one subscriber left");
    drop(two);
    let mut gone = false;
    for _ in 0..100 {
        if numsub(&server) == "0" {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(gone, "unsubscribed after the last subscription dropped");
}

#[tokio::test]
async fn garbage_and_foreign_types_are_a_miss_not_an_error() {
    let server = Server::redis();
    let b = backend(&server).await;
    let s = Digest::of_key("garbage");
    let entry = b.prefix().entry(&s);
    let mut set = redis::cmd("SET");
    set.arg(&entry)
        .arg("TS1E0000not-a-record-at-all-but-long-enough-to-look-like-one-xxxx");
    let _: () = raw_cmd(&b, &set).await;
    // Garbage reads as "nothing stored": a caller that saw fence 0 gets the lease.
    assert!(matches!(
        b.try_acquire(&s, Duration::from_secs(5), 0).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    let s = Digest::of_key("foreign-type");
    let mut hset = redis::cmd("HSET");
    hset.arg(b.prefix().entry(&s)).arg("f").arg("v");
    let _: i64 = raw_cmd(&b, &hset).await;
    assert!(matches!(
        b.try_acquire(&s, Duration::from_secs(5), 0).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    // A GET of it is the server's WRONGTYPE error; the backend reads it as absent, as the
    // scripts do, with or without a variant.
    assert!(b.fetch(&s, None).await.unwrap().entry.is_none());
    let v = Digest::of_key("v");
    let f = b.fetch(&s, Some(&v)).await.unwrap();
    assert!(f.entry.is_none() && f.variant.is_none());
}

/// A key of another type under the prefix (a foreign writer, a damaged store) is a miss that
/// fills and replaces it, with or without the near cache; never a backend error. Counted as one,
/// it kept the URL failing open until someone deleted the key and, with traffic, opened the
/// breaker for every key.
#[tokio::test]
async fn a_foreign_type_under_a_key_is_replaced_by_a_fill_and_never_opens_the_breaker() {
    let server = Server::redis();
    for near in [0, 1 << 20] {
        let b = RedisBackend::builder(server.url())
            .near_cache(near)
            .connect()
            .await
            .unwrap();
        let key = format!("foreign-{near}");
        let mut lpush = redis::cmd("LPUSH");
        lpush.arg(b.prefix().entry(&Digest::of_key(&key))).arg("x");
        let _: i64 = raw_cmd(&b, &lpush).await;
        // One failure would open this breaker.
        let cfg = Config::default().breaker(1, Duration::from_secs(600));
        let engine = Stampede::with_config(b, cfg).unwrap();
        let calls = Counter::default();
        for round in 0..3 {
            let c = calls.clone();
            let s = engine
                .get_or_fill(&key, move || async move {
                    c.inc();
                    Ok::<_, std::io::Error>(Fill::store("v", Ttl::fresh(Duration::from_secs(60))))
                })
                .await
                .unwrap();
            let want = if round == 0 {
                Status::Stored
            } else {
                Status::Hit
            };
            assert_eq!(s.status, want, "near {near}, round {round}");
            assert_eq!(&s.value[..], b"v");
        }
        assert_eq!(calls.get(), 1, "near {near}");
        assert!(!engine.breaker_open(), "near {near}");
        let other = engine
            .get_or_fill(format!("other-{near}"), || async {
                Ok::<_, std::io::Error>(Fill::store("o", Ttl::fresh(Duration::from_secs(60))))
            })
            .await
            .unwrap();
        assert_eq!(other.status, Status::Stored, "near {near}");
    }
}

#[tokio::test]
async fn too_large_records_are_refused_client_side() {
    let server = Server::redis();
    let b = RedisBackend::builder(server.url())
        .max_record_bytes(1024)
        .connect()
        .await
        .unwrap();
    let s = Digest::of_key("big");
    let Acquire::Acquired { token, fence } =
        b.try_acquire(&s, Duration::from_secs(5), 0).await.unwrap()
    else {
        panic!("free slot");
    };
    let w = conformance::write(s, token, fence, &[0u8; 4096], Duration::from_secs(60));
    assert_eq!(
        b.write(w).await.unwrap(),
        tower_stampede::backend::WriteOutcome::TooLarge
    );
    assert!(b.fetch(&s, None).await.unwrap().entry.is_none());
    assert!(
        b.extend(&s, token, Duration::from_secs(5)).await.unwrap(),
        "the lease is untouched"
    );
}

#[tokio::test]
async fn scripts_reload_after_script_flush() {
    let server = Server::redis();
    let b = backend(&server).await;
    let reply = server.raw("SCRIPT FLUSH");
    assert!(reply.contains("OK"), "{reply}");
    let s = Digest::of_key("noscript");
    assert!(matches!(
        b.try_acquire(&s, Duration::from_secs(5), 0).await.unwrap(),
        Acquire::Acquired { .. }
    ));
}

#[tokio::test]
async fn lazy_build_starts_without_redis_and_connects_later() {
    let mut server = Server::redis();
    let url = server.url();
    server.kill();
    let b = RedisBackend::builder(url.as_str())
        .timeout(Duration::from_millis(200))
        .build()
        .expect("no I/O at build time");
    assert!(b.fetch(&Digest::of_key("x"), None).await.is_err());
    server.restart();
    let mut ok = false;
    for _ in 0..50 {
        if b.fetch(&Digest::of_key("x"), None).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "connected once Redis was up");
}

#[tokio::test]
async fn a_users_pool_works_and_signals_need_the_pubsub_url() {
    let server = Server::redis();
    let pool = tower_stampede::backend::redis::deadpool_redis::Config::from_url(server.url())
        .create_pool(Some(
            tower_stampede::backend::redis::deadpool_redis::Runtime::Tokio1,
        ))
        .unwrap();
    let without = RedisBackend::builder_with_pool(pool.clone())
        .prefix("pool:")
        .connect()
        .await
        .unwrap();
    let s = Digest::of_key("pool");
    assert!(
        without.subscribe(&s).await.unwrap().is_none(),
        "no pubsub URL: waiters poll"
    );
    let with = RedisBackend::builder_with_pool(pool)
        .prefix("pool:")
        .pubsub(server.url())
        .connect()
        .await
        .unwrap();
    let mut sub = with.subscribe(&s).await.unwrap().expect("signals");
    let Acquire::Acquired { token, fence } = without
        .try_acquire(&s, Duration::from_secs(5), 0)
        .await
        .unwrap()
    else {
        panic!("free slot");
    };
    let w = conformance::write(s, token, fence, b"v", Duration::from_secs(60));
    without.write(w).await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap(),
        Some(Signal::Filled),
        "a backend without subscriptions still publishes"
    );
    assert!(with.prefix().as_str().starts_with("pool:"));
}

/// Captures what `tracing`'s fmt subscriber writes.
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

async fn startup_log(server: &Server) -> String {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    // A current-thread runtime: the backend connects on this thread, under this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);
    let b = backend(server).await;
    assert!(b
        .fetch(&Digest::of_key("x"), None)
        .await
        .unwrap()
        .entry
        .is_none());
    let out = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    out
}

#[tokio::test]
async fn warns_about_an_evicting_policy_without_failing() {
    let evicting = Server::redis_with(&["--maxmemory-policy", "volatile-lru"]);
    let log = startup_log(&evicting).await;
    assert!(
        log.contains("WARN") && log.contains("volatile-lru"),
        "a warning names the policy: {log:?}"
    );
    let safe = Server::redis();
    let log = startup_log(&safe).await;
    assert!(
        !log.contains("maxmemory"),
        "no warning under noeviction: {log:?}"
    );
}

/// `rediss://` against a redis-server with a throwaway CA made by the `openssl` CLI.
#[cfg(feature = "redis-tls")]
#[tokio::test]
async fn rediss_with_a_private_ca() {
    use std::process::Command;
    let dir = std::env::temp_dir().join(format!("ts-redis-tls-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    std::fs::write(p("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("the `openssl` CLI makes the test certificates");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.crt"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &p("server.key"),
        "-out",
        &p("server.csr"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &p("san.ext"),
        "-out",
        &p("server.crt"),
    ]);
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let server = Server::redis_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &p("server.crt"),
        "--tls-key-file",
        &p("server.key"),
        "--tls-ca-cert-file",
        &p("ca.crt"),
        "--tls-auth-clients",
        "no",
    ]);
    let client = redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{tls_port}"),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(p("ca.crt")).unwrap()),
        },
    )
    .unwrap();
    let b = RedisBackend::builder(client.get_connection_info().clone())
        .connect()
        .await
        .expect("TLS connection with the private CA");
    let h = Harness {
        backend: Arc::new(b),
        short_lease: Duration::from_millis(100),
        expiry_slack: Duration::from_millis(50),
        signals: true,
        forget_counter: Arc::new(|_| Box::pin(async {})),
    };
    conformance::fenced_fill_refuses_older_and_accepts_same_token(&h).await;
    conformance::signals_are_delivered(&h).await;
    // The TLS port speaks nothing else: the backend above really went through TLS.
    assert!(
        RedisBackend::builder(format!("redis://127.0.0.1:{tls_port}"))
            .timeout(Duration::from_millis(500))
            .connect()
            .await
            .is_err()
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A URL with a user, a password and a database number: the backend authenticates, and every
/// key lands in that database; a wrong password is a clear connect error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_with_user_password_and_db_is_honoured() {
    let server = Server::redis();
    let reply = server.raw("ACL SETUSER app on >s3cret ~* &* +@all");
    assert!(reply.starts_with("+OK"), "{reply}");
    let url = format!("redis://app:s3cret@127.0.0.1:{}/3", server.port());
    let engine = Stampede::new(RedisBackend::builder(url.as_str()).connect().await.unwrap());
    let served = call(&engine, "in-db-3".into()).await;
    assert_eq!(served.status, Status::Stored);
    assert_eq!(call(&engine, "in-db-3".into()).await.status, Status::Hit);

    let keys = |db: u8| {
        let url = format!("redis://app:s3cret@127.0.0.1:{}/{db}", server.port());
        async move {
            let client = redis::Client::open(url).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            redis::cmd("KEYS")
                .arg("*")
                .query_async::<Vec<String>>(&mut c)
                .await
                .unwrap()
        }
    };
    assert!(!keys(3).await.is_empty(), "the entry is in db 3");
    assert!(keys(0).await.is_empty(), "nothing in db 0");

    let wrong = format!("redis://app:nope@127.0.0.1:{}/3", server.port());
    let err = RedisBackend::builder(wrong.as_str())
        .connect()
        .await
        .expect_err("a wrong password cannot connect");
    eprintln!("{err}");
}

/// A connection whose setup (dial, handshake, loading the scripts) takes longer than the
/// engine's per-call timeout, while each command fits in it, is still made: the caller that
/// started it gives up, and the callers after use it. Before, each caller's timeout dropped
/// the half-made connection and the next caller started again, so the backend never connected
/// and every request bypassed the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_slower_to_set_up_than_a_calls_timeout_is_still_made() {
    let server = Server::redis();
    // 100 ms a round trip; a command takes one, the setup at least three.
    let port = common::slow_relay(server.addr(), Duration::from_millis(50)).await;
    let b = RedisBackend::builder(format!("redis://127.0.0.1:{port}"))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let e = Stampede::with_config(
        b,
        Config::default().backend_timeout(Duration::from_millis(250)),
    )
    .unwrap();
    let mut seen = Vec::new();
    for _ in 0..30 {
        let s = e
            .get_or_fill("far-away", || async {
                Ok::<_, std::io::Error>(Fill::store("v", Ttl::fresh(Duration::from_secs(60))))
            })
            .await
            .unwrap();
        seen.push(s.status);
        if s.status == Status::Hit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(seen.last(), Some(&Status::Hit), "{seen:?}");
}

/// The near cache (`RedisBackendBuilder::near_cache`): hits that cost no round trip, and
/// coherence: another instance's write, a `FLUSHALL`, and the loss of the tracking connection
/// each make the next read go back to Redis.
mod near_cache {
    use super::*;

    fn fresh(v: &'static str) -> Fill {
        Fill::store(v, Ttl::fresh(Duration::from_secs(600)))
    }

    /// Reads through `engine` until a read returns `want`, at most `tries` reads 10 ms apart.
    async fn until_served(engine: &Stampede, key: &str, want: &str, tries: usize) -> bool {
        for _ in 0..tries {
            let s = engine
                .get_or_fill(key, || async {
                    Ok::<_, std::io::Error>(Fill::store(
                        "refilled",
                        Ttl::fresh(Duration::from_secs(600)),
                    ))
                })
                .await
                .unwrap();
            if &s.value[..] == want.as_bytes() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Runs rounds of 20 `read`s (at most 100, 20 ms apart) until one round reads nothing from
    /// Redis; true when one did.
    async fn goes_quiet<F, Fut>(server: &Server, mut read: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut monitor = Monitor::start(server);
        for round in 0..100 {
            server.mark(&format!("a{round}"));
            for _ in 0..20 {
                read().await;
            }
            server.mark(&format!("b{round}"));
            let _ = monitor.until(&format!("a{round}"));
            if reads(&monitor.until(&format!("b{round}"))) == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Reads (GET/MGET) the server ran between two markers.
    fn reads(cmds: &[String]) -> usize {
        cmds.iter()
            .filter(|c| c.starts_with("\"GET\"") || c.starts_with("\"MGET\""))
            .count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hot_hits_cost_no_round_trip() {
        let server = Server::redis();
        let engine = Stampede::new(near_backend(&server).await);
        let first = engine
            .get_or_fill("hot", || async { Ok::<_, std::io::Error>(fresh("v1")) })
            .await
            .unwrap();
        assert_eq!(first.status, Status::Stored);
        let mut monitor = Monitor::start(&server);
        // Our own write's invalidation may land after the first read back, which is then not
        // kept; a later one is. Look for a run of 50 hits that reached Redis not once.
        let mut quiet = false;
        for round in 0..50 {
            server.mark(&format!("a{round}"));
            for _ in 0..50 {
                let s = engine
                    .get_or_fill("hot", || async { Ok::<_, std::io::Error>(fresh("other")) })
                    .await
                    .unwrap();
                assert_eq!(s.status, Status::Hit);
                assert_eq!(&s.value[..], b"v1");
            }
            server.mark(&format!("b{round}"));
            let _ = monitor.until(&format!("a{round}"));
            let cmds = monitor.until(&format!("b{round}"));
            if reads(&cmds) == 0 {
                quiet = true;
                break;
            }
        }
        assert!(quiet, "every round of 50 hits read from Redis");
    }

    /// A `warm_up` given up on (a timeout while Redis is paused) must not leave the near cache
    /// off for good: once Redis answers, hot hits stop reaching it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_warm_up_given_up_on_does_not_turn_the_near_cache_off() {
        let server = Server::redis();
        let b = RedisBackend::builder(server.url())
            .near_cache(1 << 20)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        server.pause();
        let gave_up = tokio::time::timeout(Duration::from_millis(300), b.warm_up()).await;
        server.resume();
        assert!(gave_up.is_err(), "warm_up finished while Redis was paused");

        let engine = Stampede::new(b);
        let quiet = goes_quiet(&server, || async {
            let s = engine
                .get_or_fill("warm", || async { Ok::<_, std::io::Error>(fresh("v")) })
                .await
                .unwrap();
            assert_eq!(&s.value[..], b"v");
        })
        .await;
        assert!(
            quiet,
            "every round of 20 hits read from Redis: the near cache stayed off"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_instances_write_reaches_this_ones_near_cache() {
        let server = Server::redis();
        let a = Stampede::new(near_backend(&server).await);
        let b = Stampede::new(near_backend(&server).await);
        let key = "shared";
        a.get_or_fill(key, || async { Ok::<_, std::io::Error>(fresh("old")) })
            .await
            .unwrap();
        // A keeps "old" (fresh for ten minutes): many reads, so it is kept.
        serves_n(&a, key, "old", 20).await;
        let gets = get_calls(&server);
        serves_n(&a, key, "old", 10).await;
        assert_eq!(get_calls(&server), gets, "A keeps its copy");
        // B invalidates it and fills "new"; without Redis's message A would serve "old" for ten
        // minutes.
        b.invalidate(key).await.unwrap();
        let s = b
            .get_or_fill(key, || async { Ok::<_, std::io::Error>(fresh("new")) })
            .await
            .unwrap();
        assert_eq!(s.status, Status::Stored);
        assert!(
            until_served(&a, key, "new", 200).await,
            "A kept serving its near copy after B's write"
        );
    }

    /// Reads `key` through `engine` `n` times, asserting each read serves `want`.
    async fn serves_n(engine: &Stampede, key: &str, want: &str, n: usize) {
        for _ in 0..n {
            let s = engine
                .get_or_fill(key, || async { Ok::<_, std::io::Error>(fresh("x")) })
                .await
                .unwrap();
            assert_eq!(&s.value[..], want.as_bytes());
        }
    }

    /// Fills `key` with `v` through `a`, reads it back until it is kept (ten reads in a row
    /// reach Redis not once), and asserts that it is.
    async fn fill_and_keep(
        server: &Server,
        a: &Stampede,
        backend: &RedisBackend,
        key: &str,
        v: &'static str,
    ) {
        a.get_or_fill(
            key,
            move || async move { Ok::<_, std::io::Error>(fresh(v)) },
        )
        .await
        .unwrap();
        let slot = Digest::of_key(key);
        for _ in 0..50 {
            let gets = get_calls(server);
            for _ in 0..10 {
                assert!(backend.fetch(&slot, None).await.unwrap().entry.is_some());
            }
            if get_calls(server) == gets {
                return;
            }
        }
        panic!("{key} was never kept");
    }

    /// `SET`s `key`'s entry to garbage behind the backend's back, then reads until the backend
    /// returns it (at most `tries` reads 10 ms apart).
    async fn garbage_is_seen(
        server: &Server,
        backend: &RedisBackend,
        key: &str,
        tries: usize,
    ) -> bool {
        let slot = Digest::of_key(key);
        let entry_key = backend.prefix().entry(&slot);
        let set = server.raw(&format!("SET {entry_key} garbage"));
        assert!(set.contains("OK"), "{set}");
        for _ in 0..tries {
            let e = backend.fetch(&slot, None).await.ok().and_then(|f| f.entry);
            if e.as_deref() == Some(&b"garbage"[..]) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flushall_and_a_lost_tracking_connection_drop_what_is_kept() {
        let server = Server::redis();
        let backend = near_backend(&server).await;
        let a = Stampede::new(backend.clone());
        let slot = Digest::of_key("k");
        fill_and_keep(&server, &a, &backend, "k", "v1").await;
        // FLUSHALL: Redis sends a null invalidation; the next read is a miss.
        let reply = server.raw("FLUSHALL");
        assert!(reply.contains("OK"), "{reply}");
        let mut gone = false;
        for _ in 0..200 {
            if backend.fetch(&slot, None).await.unwrap().entry.is_none() {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(gone, "a kept record survived FLUSHALL");

        // Fill again and have it kept, then kill the tracking connection and change the value
        // behind its back with a raw SET (Redis can no longer tell us): the loss alone must drop it.
        fill_and_keep(&server, &a, &backend, "k", "v2").await;
        let info: redis::Value = raw_cmd(&backend, redis::cmd("CLIENT").arg("TRACKINGINFO")).await;
        let redirect = tracking_redirect(&info).expect("the data connection is tracked");
        assert!(redirect > 0, "redirect id {redirect}");
        let killed = server.raw(&format!("CLIENT KILL ID {redirect}"));
        assert!(killed.contains(":1"), "CLIENT KILL: {killed}");
        let seen = garbage_is_seen(&server, &backend, "k", 200).await;
        assert!(seen, "the near copy outlived its tracking connection");

        // A new tracking connection is made and used: hits stop reaching Redis again.
        let quiet = goes_quiet(&server, || async {
            backend.fetch(&slot, None).await.unwrap();
        })
        .await;
        assert!(
            quiet,
            "the near cache never came back after its connection was lost"
        );
    }

    /// A failover behind one address: the server that answered is gone, and another with other
    /// data answers on the same address (here `kill -9` and a new, empty server on the port, into
    /// which the key's new bytes are written behind the backend's back). Nothing kept from the
    /// old server may be served once the new one answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_server_behind_the_same_address_drops_what_is_kept() {
        let mut server = Server::redis();
        let backend = near_backend(&server).await;
        let a = Stampede::new(backend.clone());
        fill_and_keep(&server, &a, &backend, "k", "v1").await;
        server.restart();
        let seen = garbage_is_seen(&server, &backend, "k", 300).await;
        assert!(
            seen,
            "a record kept from the old server was served after the new one took its address"
        );
    }

    /// The `redirect` field of `CLIENT TRACKINGINFO` (a flat array in RESP2).
    fn tracking_redirect(v: &redis::Value) -> Option<i64> {
        let redis::Value::Array(items) = v else {
            return None;
        };
        let mut it = items.iter();
        while let Some(k) = it.next() {
            let val = it.next()?;
            if matches!(k, redis::Value::BulkString(b) if b == b"redirect") {
                if let redis::Value::Int(i) = val {
                    return Some(*i);
                }
            }
        }
        None
    }

    /// Redis tracks keys per connection: when the data connection that read a kept record
    /// dies (here `CLIENT KILL`, as a server's idle `timeout` would), Redis can no longer say
    /// when it changes, so the record must go, although hot hits never use that connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_data_connection_drops_what_it_read() {
        let server = Server::redis();
        let backend = near_backend(&server).await;
        let a = Stampede::new(backend.clone());
        fill_and_keep(&server, &a, &backend, "k", "v1").await;
        let data_id: i64 = raw_cmd(&backend, redis::cmd("CLIENT").arg("ID")).await;
        let killed = server.raw(&format!("CLIENT KILL ID {data_id}"));
        assert!(killed.contains(":1"), "CLIENT KILL: {killed}");
        // Changed behind the dead connection's back: no invalidation can come.
        let seen = garbage_is_seen(&server, &backend, "k", 500).await;
        assert!(seen, "a record read on a dead connection was still served");
    }

    /// A user whose ACL forbids `CLIENT`: the near cache turns itself off once (a warning), and
    /// the backend works as without it, with no `CLIENT` command retried per read.
    #[tokio::test]
    async fn without_client_tracking_the_near_cache_turns_itself_off() {
        let server = Server::redis();
        let reply = server.raw("ACL SETUSER app on >s3cret ~* &* +@all -client");
        assert!(reply.starts_with("+OK"), "{reply}");
        let url = format!("redis://app:s3cret@127.0.0.1:{}", server.port());
        let backend = RedisBackend::builder(url.as_str())
            .near_cache(1 << 20)
            .connect()
            .await
            .expect("the backend connects; only its near cache is refused");
        let engine = Stampede::new(backend);
        let first = engine
            .get_or_fill("k", || async { Ok::<_, std::io::Error>(fresh("v")) })
            .await
            .unwrap();
        assert_eq!(first.status, Status::Stored);
        let refused_before = client_refusals(&server);
        let gets_before = get_calls(&server);
        // Spread over a second: ten times the reconnect backoff, so retries would show.
        for _ in 0..50 {
            let s = engine
                .get_or_fill("k", || async { Ok::<_, std::io::Error>(fresh("x")) })
                .await
                .unwrap();
            assert_eq!((s.status, &s.value[..]), (Status::Hit, &b"v"[..]));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(get_calls(&server) - gets_before, 50, "every hit read Redis");
        assert_eq!(
            client_refusals(&server),
            refused_before,
            "CLIENT was tried again after the refusal"
        );
    }

    /// `INFO commandstats` counters.
    fn commandstats(server: &Server) -> String {
        server.raw("INFO commandstats")
    }

    fn get_calls(server: &Server) -> u64 {
        stat_field(&commandstats(server), "cmdstat_get:", "calls=")
    }

    /// Every `CLIENT ...` call the ACL rejected.
    fn client_refusals(server: &Server) -> u64 {
        commandstats(server)
            .lines()
            .filter(|l| l.starts_with("cmdstat_client|"))
            .map(|l| stat_field(l, "", "rejected_calls="))
            .sum()
    }

    fn stat_field(text: &str, line_prefix: &str, field: &str) -> u64 {
        text.lines()
            .filter(|l| l.starts_with(line_prefix))
            .find_map(|l| l.split(field).nth(1))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// A URL that does not parse is reported as such, with or without the near cache (with it, the
/// near cache's own complaint about a missing tracking URL used to hide the cause).
#[test]
fn an_unusable_url_is_reported_as_the_url() {
    for near in [0, 1 << 20] {
        let err = RedisBackend::builder("redis://")
            .near_cache(near)
            .build()
            .expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains("redis URL"), "near {near}: {msg}");
        assert!(!msg.contains("pubsub"), "near {near}: {msg}");
    }
}

/// A Redis that answers and refuses the connection's setup (password, database) is told apart
/// from one that is down or paused: only the first is `is_config_rejected`, for good reason to
/// stop a start. A right setup connects.
#[tokio::test]
async fn a_refused_password_or_database_is_told_apart_from_an_outage() {
    let server = Server::redis();
    // A user kept from our keys by the ACL (it may run everything, on `other:*` only).
    let acl = "ACL SETUSER narrow on >pw ~other:* &* +@all";
    assert!(server.raw(acl).contains("OK"));
    // One that may read every key and write none, and one kept from every channel.
    let acl = "ACL SETUSER reader on >pw %R~* &* +@all";
    assert!(server.raw(acl).contains("OK"));
    let acl = "ACL SETUSER deaf on >pw ~* resetchannels +@all";
    assert!(server.raw(acl).contains("OK"));
    // Users kept from one command the scripts run (releases, lease repair, the fence's clock).
    for cmd in ["del", "pexpire", "pttl", "time"] {
        let acl = format!("ACL SETUSER no{cmd} on >pw ~* &* +@all -{cmd}");
        assert!(server.raw(&acl).contains("OK"));
    }
    assert!(server.raw("CONFIG SET requirepass sekret").contains("OK"));
    let port = server.port();
    let mut dead = Server::redis();
    let dead_port = dead.port();
    dead.kill();
    let paused = Server::redis();
    paused.pause();
    let cases = [
        (format!("redis://:wr0ng@127.0.0.1:{port}/0"), Some(true)),
        (format!("redis://127.0.0.1:{port}/0"), Some(true)),
        (format!("redis://:sekret@127.0.0.1:{port}/99"), Some(true)),
        (format!("redis://narrow:pw@127.0.0.1:{port}/0"), Some(true)),
        (format!("redis://reader:pw@127.0.0.1:{port}/0"), Some(true)),
        (format!("redis://deaf:pw@127.0.0.1:{port}/0"), Some(true)),
        (format!("redis://nodel:pw@127.0.0.1:{port}/0"), Some(true)),
        (
            format!("redis://nopexpire:pw@127.0.0.1:{port}/0"),
            Some(true),
        ),
        (format!("redis://nopttl:pw@127.0.0.1:{port}/0"), Some(true)),
        (format!("redis://notime:pw@127.0.0.1:{port}/0"), Some(true)),
        (format!("redis://127.0.0.1:{dead_port}/0"), Some(false)),
        (format!("{}/0", paused.url()), Some(false)),
        (format!("redis://:sekret@127.0.0.1:{port}/3"), None),
    ];
    for (url, rejected) in cases {
        let b = RedisBackend::builder(url.as_str())
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        match (b.warm_up().await, rejected) {
            (Ok(()), None) => {
                // Its write probe wrote nothing.
                let keys: i64 = raw_cmd(&b, &redis::cmd("DBSIZE")).await;
                assert_eq!(keys, 0, "{url}");
            }
            (Err(e), Some(want)) => assert_eq!(e.is_config_rejected(), want, "{url}: {e}"),
            (got, want) => panic!("{url}: {got:?}, wanted rejected = {want:?}"),
        }
    }

    paused.resume();
    // Full, refusing every write (`OOM`, noeviction): it still warms up, as hits are served.
    let full = Server::redis();
    assert!(full.raw("CONFIG SET maxmemory 1").contains("OK"));
    assert!(full.raw("SET k v").contains("OOM"), "the server is full");
    let b = RedisBackend::builder(full.url())
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    b.warm_up().await.expect("a full Redis warms up");
    // Busy running a script: its `SELECT` fails as `ERR` in redis-rs, yet it passes.
    let busy = Server::redis();
    assert!(busy
        .raw("CONFIG SET busy-reply-threshold 50")
        .contains("OK"));
    let addr = busy.addr();
    let looping = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"EVAL \"while true do end\" 0\r\n").unwrap();
        let mut buf = [0u8; 256];
        let _ = std::io::Read::read(&mut s, &mut buf);
    });
    std::thread::sleep(Duration::from_millis(200));
    let url = format!("{}/1", busy.url());
    let b = RedisBackend::builder(url.as_str())
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let e = b.warm_up().await.expect_err("busy");
    assert!(!e.is_config_rejected(), "{url}: {e}");
    assert!(busy.raw("SCRIPT KILL").contains("OK"));
    looping.join().unwrap();
}
