//! The Memcached backend against real `memcached` processes, one per test: the conformance
//! suite, then what is particular to memcached (CAS-safe release, second-granularity expiry,
//! item size limit, server pools, restarts, garbage on the wire).
#![cfg(feature = "memcached")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::conformance::{self, Harness};
use common::servers::Server;
use common::{outage_config, Counter};
use tower_stampede::backend::memcached::MemcachedBackend;
use tower_stampede::backend::{Acquire, Backend, FencedWrite, Signal, Token, WriteOutcome};
use tower_stampede::entry::{Header, Kind, Record};
use tower_stampede::{CacheKey, Config, Digest, Fill, Stampede, Status, Ttl};

/// One raw command line on a fresh connection; returns what the server answered.
fn raw(port: u16, line: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(line).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Replies here are one line, or a VA line and its data block.
    loop {
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        let lines = text.matches("\r\n").count();
        if (text.starts_with("VA") && lines >= 2) || (!text.starts_with("VA") && lines >= 1) {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn raw_async(port: u16, line: String) -> String {
    tokio::task::spawn_blocking(move || raw(port, line.as_bytes()))
        .await
        .unwrap()
}

async fn connect(server: &Server) -> MemcachedBackend {
    MemcachedBackend::connect(server.url()).await.unwrap()
}

async fn near(server: &Server, max_age: Duration) -> MemcachedBackend {
    MemcachedBackend::builder(server.url())
        .near_cache(1 << 20, max_age)
        .build()
        .await
        .unwrap()
}

async fn harness() -> (Harness, Server) {
    harness_with(false).await
}

async fn harness_with(near_cache: bool) -> (Harness, Server) {
    let server = Server::memcached();
    let backend = if near_cache {
        // Longer than any wait in the suite: expiry must come from the items' own TTLs.
        near(&server, Duration::from_secs(600)).await
    } else {
        connect(&server).await
    };
    let port = server.port();
    let prefix = backend.prefix().clone();
    let h = Harness {
        backend: Arc::new(backend),
        // memcached counts whole seconds: a 2 s lease is sent as 3 s and lives 2..3 s.
        short_lease: Duration::from_secs(2),
        expiry_slack: Duration::from_millis(1500),
        signals: false,
        forget_counter: Arc::new(move |d| {
            let key = prefix.fence(&d);
            Box::pin(async move {
                let reply = raw_async(port, format!("md {key}\r\n")).await;
                assert!(reply.starts_with("HD"), "md {key}: {reply}");
            })
        }),
    };
    (h, server)
}

// --- the conformance suite, unchanged ---------------------------------------------------------

async fn near_harness() -> (Harness, Server) {
    harness_with(true).await
}

conformance_suite!(conformance_plain, harness);
// The suite again with the near cache on: it must not change any outcome the contract names.
conformance_suite!(conformance_near_cache, near_harness);

// --- the near cache -------------------------------------------------------------------------

async fn read(engine: &Stampede, key: &str) -> Bytes {
    engine
        .get_or_fill(key, || async {
            Ok::<_, std::io::Error>(Fill::store(
                "refilled",
                Ttl::fresh(Duration::from_secs(600)),
            ))
        })
        .await
        .unwrap()
        .value
}

async fn fill(engine: &Stampede, key: &str, v: &'static str) {
    let s = engine
        .get_or_fill(key, move || async move {
            Ok::<_, std::io::Error>(Fill::store(v, Ttl::fresh(Duration::from_secs(600))))
        })
        .await
        .unwrap();
    assert_eq!(s.status, Status::Stored);
}

#[tokio::test]
async fn near_hits_cost_no_round_trip_and_own_writes_are_seen_at_once() {
    let server = Server::memcached();
    let a = Stampede::with_config(near(&server, Duration::from_secs(600)).await, config()).unwrap();
    fill(&a, "k", "v1").await;
    assert_eq!(&read(&a, "k").await[..], b"v1");
    let gets = server.stat("cmd_get");
    for _ in 0..50 {
        assert_eq!(&read(&a, "k").await[..], b"v1");
    }
    assert_eq!(
        server.stat("cmd_get"),
        gets,
        "50 hits on a kept record reached memcached"
    );
    // Our own invalidation and refill replace the copy at once, whatever max_age says.
    a.invalidate("k").await.unwrap();
    fill(&a, "k", "v2").await;
    assert_eq!(&read(&a, "k").await[..], b"v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instances_write_is_seen_within_max_age() {
    let server = Server::memcached();
    let max_age = Duration::from_millis(300);
    let a = Stampede::with_config(near(&server, max_age).await, config()).unwrap();
    let b = Stampede::with_config(connect(&server).await, config()).unwrap();
    fill(&a, "k", "old").await;
    assert_eq!(&read(&a, "k").await[..], b"old");
    let gets = server.stat("cmd_get");
    assert_eq!(&read(&a, "k").await[..], b"old");
    assert_eq!(server.stat("cmd_get"), gets, "A keeps its copy");
    b.invalidate("k").await.unwrap();
    fill(&b, "k", "new").await;
    // The record is fresh for ten minutes: only max_age ends A's copy. Thirty times max_age
    // bounds the wait, so a copy kept for the record's TTL fails here.
    let deadline = std::time::Instant::now() + max_age * 30;
    loop {
        if &read(&a, "k").await[..] == b"new" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "A still served its copy 30 x max_age after B's write"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- engines on memcached ---------------------------------------------------------------------

fn config() -> Config {
    // A generous per-call timeout: the tests share two cores, and a slow call would count as
    // the backend being down (fail open, an uncached fill), which is not what they measure.
    Config::new().backend_timeout(Duration::from_secs(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_engines_share_one_memcached_and_fill_once() {
    let server = Server::memcached();
    let mut engines = Vec::new();
    for _ in 0..4 {
        // One backend per engine, as four instances of a service would have.
        let backend = connect(&server).await;
        engines.push(Stampede::with_config(backend, config()).unwrap());
    }
    let fills = Counter::default();
    let mut calls = Vec::new();
    for i in 0..1000 {
        let engine = engines[i % 4].clone();
        let fills = fills.clone();
        calls.push(tokio::spawn(async move {
            engine
                .get_or_fill("cold-key", move || async move {
                    fills.inc();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, std::io::Error>(Fill::store("v", Ttl::fresh(Duration::from_secs(60))))
                })
                .await
        }));
    }
    let mut stored = 0;
    for c in calls {
        let served = c.await.unwrap().expect("every call is served");
        assert_eq!(&served.value[..], b"v");
        assert_ne!(served.status, Status::Bypass, "the backend was never down");
        stored += usize::from(served.status == Status::Stored);
    }
    assert_eq!(fills.get(), 1, "1,000 cold calls over 4 engines: one fill");
    assert_eq!(stored, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fill_reaches_every_instance_at_once() {
    let server = Server::memcached();
    let mut backends = Vec::new();
    for _ in 0..3 {
        backends.push(Arc::new(connect(&server).await) as Arc<dyn Backend>);
    }
    common::a_failure_reaches_every_instance_at_once(backends.try_into().ok().unwrap(), config())
        .await;
}

/// `fail` racing extends of the same lease (one still in flight from a slow round, say): the
/// lease's CAS changes under it, and the token decides again, so it still marks the lease, and
/// no extend unmarks it. Before, after two lost races it reported the lease as not its own, and
/// the engine then had every caller wait the lease out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_marks_the_lease_though_extends_race_it() {
    let server = Server::memcached();
    let b = Arc::new(connect(&server).await);
    let ttl = Duration::from_secs(30);
    for round in 0..100 {
        let s = Digest::of_key(format!("race-{round}"));
        let (t, _) = acquire(&*b, &s, ttl, 0).await;
        let extends: Vec<_> = (0..3)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.extend(&s, t, ttl).await })
            })
            .collect();
        let failed = b.fail(&s, t, ttl).await.unwrap();
        for e in extends {
            let _ = e.await.unwrap();
        }
        assert!(failed, "round {round}: fail gave up on its own lease");
        match b.try_acquire(&s, ttl, 0).await.unwrap() {
            Acquire::Held { failed: true, .. } => {}
            other => panic!("round {round}: the mark was lost: {other:?}"),
        }
    }
}

#[tokio::test]
async fn keys_from_hostile_urls_work_end_to_end() {
    let server = Server::memcached();
    let backend = connect(&server).await;
    let prefix = backend.prefix().clone();
    let engine = Stampede::with_config(backend, config()).unwrap();
    let long = format!("https://example.com/{}", "a/%20?x=1&".repeat(820));
    assert!(long.len() > 8 * 1024);
    let keys: Vec<String> = vec![
        long,
        "GET /with space/and\ttab".into(),
        "line one\nline two\r\nthree".into(),
        "h\u{e9}llo w\u{f6}rld \u{2713} \u{1f600}".into(),
        "\0\u{1}\u{7f} nul and control".into(),
        String::new(),
    ];
    let fills = Counter::default();
    for (i, key) in keys.iter().enumerate() {
        let physical = prefix.entry(&Digest::of_key(key));
        assert!(physical.len() <= 250 && physical.bytes().all(|b| b.is_ascii_graphic()));
        let value = format!("value {i}");
        let (f, v) = (fills.clone(), value.clone());
        let first = engine
            .get_or_fill(key, move || async move {
                f.inc();
                Ok::<_, std::io::Error>(Fill::store(v, Ttl::fresh(Duration::from_secs(60))))
            })
            .await
            .unwrap();
        assert_eq!(first.status, Status::Stored, "key {i}");
        // The same key through CacheKey: a hit on what was stored.
        let again = engine
            .get_or_fill_with(CacheKey::new(key), |_| async {
                Ok::<_, std::io::Error>(Fill::store("refilled", Ttl::default()))
            })
            .await
            .unwrap();
        assert_eq!(again.status, Status::Hit, "key {i}");
        assert_eq!(again.value, Bytes::from(value));
        let reply = raw_async(server.port(), format!("mg {physical} s\r\n")).await;
        assert!(reply.starts_with("HD s"), "{physical}: {reply}");
    }
    assert_eq!(fills.get(), keys.len());
}

fn write_of(slot: Digest, token: Token, fence: u64, value: &[u8], release: bool) -> FencedWrite {
    let mut w = conformance::write(slot, token, fence, value, Duration::from_secs(60));
    w.release = release;
    w
}

async fn acquire(b: &dyn Backend, slot: &Digest, ttl: Duration, seen: u64) -> (Token, u64) {
    match b.try_acquire(slot, ttl, seen).await.unwrap() {
        Acquire::Acquired { token, fence } => (token, fence),
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// A relay to `server` that, before passing on each `ms` of `key` with a CAS (` C<cas>`),
/// stores the key's current value again on a connection of its own, as another writer racing
/// ours would: the CAS the client read is stale whenever its `ms` arrives. Counts the races.
async fn racing_relay(server: &Server, key: String) -> (u16, Counter) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn restore(side: &mut tokio::net::TcpStream, key: &str) {
        side.write_all(format!("mg {key} v f\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let (eol, len, flags) = loop {
            let n = side.read(&mut buf).await.unwrap();
            assert!(n > 0, "the side connection closed");
            got.extend_from_slice(&buf[..n]);
            if let Some(eol) = got.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&got[..eol]).into_owned();
                let mut t = line.split(' ');
                assert_eq!(t.next(), Some("VA"), "{line}");
                let len: usize = t.next().unwrap().parse().unwrap();
                let flags = t
                    .find_map(|f| f.strip_prefix('f'))
                    .unwrap_or("0")
                    .to_string();
                if got.len() >= eol + 2 + len + 2 {
                    break (eol, len, flags);
                }
            }
        };
        let value = got[eol + 2..eol + 2 + len].to_vec();
        let mut set = format!("ms {key} {len} F{flags} T0\r\n").into_bytes();
        set.extend_from_slice(&value);
        set.extend_from_slice(b"\r\n");
        side.write_all(&set).await.unwrap();
        let n = side.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HD"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    let to = server.addr();
    let races = Counter::default();
    let counted = races.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (to, key, races) = (to.clone(), key.clone(), counted.clone());
            tokio::spawn(async move {
                let upstream = tokio::net::TcpStream::connect(&to).await.unwrap();
                let mut side = tokio::net::TcpStream::connect(&to).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = upstream.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    match cr.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    // Whole commands only: a line, and an `ms`'s data block after it.
                    while let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") {
                        let line = String::from_utf8_lossy(&buf[..eol]).into_owned();
                        let t: Vec<&str> = line.split(' ').collect();
                        let mut len = eol + 2;
                        if t[0] == "ms" {
                            len += t[2].parse::<usize>().unwrap() + 2;
                            if buf.len() < len {
                                break;
                            }
                            if t[1] == key && t.iter().any(|f| f.starts_with('C')) {
                                races.inc();
                                restore(&mut side, &key).await;
                            }
                        }
                        let cmd: Vec<u8> = buf.drain(..len).collect();
                        if sw.write_all(&cmd).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, races)
}

/// A fill whose write loses every CAS race (another writer rewrites the entry each time) ends
/// with an error that says the store answered: the engine gives the lease back at once (the
/// store is not down; nothing will be written under it), instead of every instance waiting it
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_loses_every_cas_race_gives_its_lease_back() {
    let server = Server::memcached();
    let direct = connect(&server).await;
    let s = Digest::of_key("racing");
    // A tombstone to race over: the fill replaces it with a CAS.
    direct
        .invalidate(&s, Duration::from_secs(60))
        .await
        .unwrap();
    let (port, races) = racing_relay(&server, direct.prefix().entry(&s)).await;
    let raced = MemcachedBackend::connect(format!("memcache://127.0.0.1:{port}"))
        .await
        .unwrap();
    let engine = Stampede::with_config(raced, config()).unwrap();
    let served = engine
        .get_or_fill("racing", || async {
            Ok::<_, std::io::Error>(Fill::store("v", Ttl::fresh(Duration::from_secs(60))))
        })
        .await
        .unwrap();
    assert_eq!(&served.value[..], b"v");
    // The write runs after the value is served: wait for it.
    assert!(engine.drain(Duration::from_secs(10)).await);
    assert!(races.get() >= 8, "{} races", races.get());
    // Won, whatever it then says of the entry (`Refreshed`: the tombstone is not the fence
    // this caller saw); `Held` if the fill had kept its lease.
    let next = direct
        .try_acquire(&s, Duration::from_secs(10), 0)
        .await
        .unwrap();
    assert!(
        !matches!(next, Acquire::Held { .. }),
        "the lease was kept: {next:?}"
    );
    assert!(!engine.breaker_open());
}

/// A value over this backend's item size limit (the server takes larger items: another
/// writer's, or another instance's configured with a larger limit) is not read, and not taken
/// for "nothing stored" either: it may be a newer record of ours, so a write over it is refused
/// with an error, never judged blind. The shared connection stays up for the commands behind
/// it, and the errors do not count against the store's health: through the engine each call
/// fails open and the breaker stays closed.
#[tokio::test]
async fn a_stored_value_over_the_limit_is_an_error_that_keeps_the_connection() {
    let server = Server::memcached_with(&["-I", "4m"]);
    let backend = connect(&server).await;
    let s = Digest::of_key("foreign-big");
    let key = backend.prefix().entry(&s);
    let big = 3 * 1024 * 1024;
    store_raw(&server, &key, big).await;
    let port = server.port();

    // Its reads and other reads pipelined with them on the one connection all answer.
    let other = Digest::of_key("small-neighbour");
    let (t, f) = acquire(&backend, &other, Duration::from_secs(10), 0).await;
    assert_eq!(
        backend
            .write(write_of(other, t, f, b"small", true))
            .await
            .unwrap(),
        WriteOutcome::Stored
    );
    let reads = (0..20).map(|i| {
        let b = backend.clone();
        async move {
            let slot = if i % 2 == 0 { s } else { other };
            b.fetch(&slot, None).await
        }
    });
    for (i, r) in spawn_all(reads).await.into_iter().enumerate() {
        if i % 2 == 0 {
            let e = r.expect_err("the big value is not read");
            assert!(e.is_store_answered(), "read {i}: {e}");
            assert!(e.to_string().contains("item_size_limit"), "read {i}: {e}");
        } else {
            let fetched = r.unwrap_or_else(|e| panic!("read {i}: {e}"));
            assert_eq!(fetched.entry, Some(conformance::entry(f, t, b"small")));
        }
    }

    // A lease over it (whose grant must know the stored fence) and a write over it are refused
    // with the error; the value is still there, whole.
    let a = backend.try_acquire(&s, Duration::from_secs(10), 0).await;
    assert!(a.as_ref().is_err_and(|e| e.is_store_answered()), "{a:?}");
    let w = backend
        .write(write_of(s, Token::random(), u64::MAX / 2, b"ours", false))
        .await;
    assert!(w.as_ref().is_err_and(|e| e.is_store_answered()), "{w:?}");
    let size = raw_async(port, format!("mg {key} s\r\n")).await;
    assert!(size.starts_with(&format!("HD s{big}")), "{size}");

    // Through the engine: served from the source every time, the breaker closed.
    let engine = Stampede::with_config(backend.clone(), config()).unwrap();
    let fills = Counter::default();
    for _ in 0..30 {
        let fills = fills.clone();
        let served = engine
            .get_or_fill("foreign-big", move || async move {
                fills.inc();
                Ok::<_, std::io::Error>(Fill::store("v", Ttl::fresh(Duration::from_secs(60))))
            })
            .await
            .unwrap();
        assert_eq!(&served.value[..], b"v");
        assert_eq!(served.status, Status::Bypass);
    }
    assert_eq!(fills.get(), 30);
    assert!(!engine.breaker_open(), "one key's data opened the breaker");
}

/// Stores `len` bytes at `key` with a raw `ms`, as another writer would.
async fn store_raw(server: &Server, key: &str, len: usize) {
    let mut line = format!("ms {key} {len} T0\r\n").into_bytes();
    line.extend_from_slice(&vec![b'q'; len]);
    line.extend_from_slice(b"\r\n");
    let port = server.port();
    let stored = tokio::task::spawn_blocking(move || raw(port, &line))
        .await
        .unwrap();
    assert!(stored.starts_with("HD"), "{stored}");
}

/// Runs the futures at once and collects their outputs in order.
async fn spawn_all<F: std::future::Future + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn an_oversized_value_is_not_stored_and_the_engine_passes() {
    let server = Server::memcached();
    let backend = connect(&server).await;
    let ten = Duration::from_secs(10);

    // At the backend: refused before anything is written, the lease untouched.
    let s = Digest::of_key("big");
    let (t, f) = acquire(&backend, &s, ten, 0).await;
    let big = vec![b'x'; 1024 * 1024 + 1];
    assert_eq!(
        backend.write(write_of(s, t, f, &big, true)).await.unwrap(),
        WriteOutcome::TooLarge
    );
    assert!(backend.fetch(&s, None).await.unwrap().entry.is_none());
    assert!(matches!(
        backend.try_acquire(&s, ten, 0).await.unwrap(),
        Acquire::Held { .. }
    ));
    assert!(backend.extend(&s, t, ten).await.unwrap(), "still our lease");
    // Just under the limit is stored.
    let fits = vec![b'y'; 1024 * 1024 - 400];
    assert_eq!(
        backend.write(write_of(s, t, f, &fits, true)).await.unwrap(),
        WriteOutcome::Stored
    );
    assert_eq!(
        backend.fetch(&s, None).await.unwrap().entry.unwrap(),
        conformance::entry(f, t, &fits)
    );

    // A backend told the items may be larger than the server takes holds them to the server's
    // own limit, which its connection read: the server is never sent an item it would refuse
    // (memcached deletes what the key holds when it refuses one). Over a record stored first,
    // still there after.
    let optimistic = MemcachedBackend::builder(server.url())
        .item_size_limit(4 * 1024 * 1024)
        .build()
        .await
        .unwrap();
    let s = Digest::of_key("big-server-side");
    let (t, f) = acquire(&optimistic, &s, ten, 0).await;
    assert_eq!(
        optimistic
            .write(write_of(s, t, f, b"small", false))
            .await
            .unwrap(),
        WriteOutcome::Stored
    );
    let too_large = server.stat("store_too_large");
    assert_eq!(
        optimistic
            .write(write_of(s, t, f, &big, true))
            .await
            .unwrap(),
        WriteOutcome::TooLarge
    );
    assert_eq!(
        server.stat("store_too_large"),
        too_large,
        "the server was sent an item over its -I"
    );
    assert_eq!(
        optimistic.fetch(&s, None).await.unwrap().entry,
        Some(conformance::entry(f, t, b"small")),
        "the stored record was lost"
    );
    assert!(
        optimistic.extend(&s, t, ten).await.unwrap(),
        "still our lease"
    );

    // Through the engine: the call succeeds with the value, and a pass marker is stored.
    let engine = Stampede::with_config(backend.clone(), config()).unwrap();
    let fills = Counter::default();
    let call = |fills: Counter| {
        let big = Bytes::from(vec![b'z'; 1024 * 1024 + 1]);
        engine.get_or_fill("huge-page", move || async move {
            fills.inc();
            Ok::<_, std::io::Error>(Fill::store(big, Ttl::fresh(Duration::from_secs(60))))
        })
    };
    let served = call(fills.clone()).await.unwrap();
    assert_eq!(served.value.len(), 1024 * 1024 + 1);
    assert_eq!(served.status, Status::NotStored);
    let stored = backend
        .fetch(&Digest::of_key("huge-page"), None)
        .await
        .unwrap()
        .entry
        .expect("a pass marker");
    assert!(matches!(Record::decode(&stored), Some(Record::Pass { .. })));
    // Later calls go to the source without waiting for a value that cannot land.
    let served = call(fills.clone()).await.unwrap();
    assert_eq!(served.status, Status::Passed);
    assert_eq!(fills.get(), 2);
}

#[tokio::test]
async fn a_late_release_cannot_delete_the_next_holders_lease() {
    let server = Server::memcached();
    let a = connect(&server).await;
    let other_instance = connect(&server).await;
    let short = Duration::from_secs(2);
    let ten = Duration::from_secs(10);
    // B in another instance, then B in the same instance as A (which still holds A's CAS).
    for (name, b) in [("two instances", &other_instance), ("one instance", &a)] {
        let s = Digest::of_key(format!("race {name}"));
        // A acquires and stalls past its lease.
        let (ta, _) = acquire(&a, &s, short, 0).await;
        tokio::time::sleep(Duration::from_millis(3500)).await;
        // B takes the lease over.
        let (tb, _) = acquire(b, &s, ten, 0).await;
        // A wakes up and releases: the CAS it holds is stale, the stored token is B's.
        assert!(
            !a.release(&s, ta, Signal::Released).await.unwrap(),
            "{name}"
        );
        assert!(!a.extend(&s, ta, ten).await.unwrap(), "{name}");
        // B's lease survives.
        assert!(
            matches!(
                a.try_acquire(&s, ten, 0).await.unwrap(),
                Acquire::Held { .. }
            ),
            "{name}"
        );
        assert!(b.extend(&s, tb, ten).await.unwrap(), "{name}");
        assert!(b.release(&s, tb, Signal::Released).await.unwrap(), "{name}");
    }
}

#[tokio::test]
async fn a_lost_extend_reply_is_recovered_by_the_token() {
    let server = Server::memcached();
    let b = connect(&server).await;
    let ten = Duration::from_secs(10);
    let s = Digest::of_key("lost-reply");
    let lease = b.prefix().lease(&s);
    let (t, _) = acquire(&b, &s, ten, 0).await;
    // Our extend landed but its reply was lost: same token, a CAS we never saw.
    let token = String::from_utf8(t.to_hex().to_vec()).unwrap();
    let reply = raw_async(server.port(), format!("ms {lease} 16 T30\r\n{token}\r\n")).await;
    assert!(reply.starts_with("HD"), "{reply}");
    assert!(b.extend(&s, t, ten).await.unwrap());
    // Again, then release.
    raw_async(server.port(), format!("ms {lease} 16 T30\r\n{token}\r\n")).await;
    assert!(b.release(&s, t, Signal::Released).await.unwrap());
    assert!(raw_async(server.port(), format!("mg {lease}\r\n"))
        .await
        .starts_with("EN"));
    // Someone else's token under the key: never ours to release.
    let (t, _) = acquire(&b, &s, ten, 0).await;
    let foreign = "00000000000000aa";
    raw_async(server.port(), format!("ms {lease} 16 T30\r\n{foreign}\r\n")).await;
    assert!(!b.release(&s, t, Signal::Released).await.unwrap());
    assert!(!b.extend(&s, t, ten).await.unwrap());
    assert!(raw_async(server.port(), format!("mg {lease} v\r\n"))
        .await
        .contains(foreign));
}

#[tokio::test]
async fn a_counter_behind_the_entry_is_brought_up() {
    let server = Server::memcached();
    let b = connect(&server).await;
    let ten = Duration::from_secs(10);
    let s = Digest::of_key("behind");
    let mut last = 0;
    for _ in 0..3 {
        let (t, f) = acquire(&b, &s, ten, last).await;
        assert_eq!(
            b.write(write_of(s, t, f, b"v", true)).await.unwrap(),
            WriteOutcome::Stored
        );
        last = f;
    }
    // The counter restarts low (an eviction and a recreation elsewhere).
    let fence_key = b.prefix().fence(&s);
    raw_async(server.port(), format!("ms {fence_key} 1 T0\r\n1\r\n")).await;
    let (t, f) = acquire(&b, &s, ten, last).await;
    assert!(f > last, "{f} after {last}");
    assert!(b.release(&s, t, Signal::Released).await.unwrap());
    // ... and later grants keep growing from there.
    let (_t, f2) = acquire(&b, &s, ten, last).await;
    assert!(f2 > f, "{f2} after {f}");
    // Bytes that are not a number at the counter key: repaired (as if lost), the grant still
    // above the stored entry.
    raw_async(server.port(), format!("ms {fence_key} 3 T0\r\nabc\r\n")).await;
    let tomb = b.invalidate(&s, ten).await.unwrap();
    assert!(tomb > last, "{tomb} after the entry's {last}");
    let got = b.fetch(&s, None).await.unwrap().entry.unwrap();
    assert!(
        matches!(Record::decode(&got), Some(Record::Tombstone { header }) if header.fence == tomb)
    );
}

#[tokio::test]
async fn garbage_in_the_store_is_a_miss() {
    let server = Server::memcached();
    let backend = connect(&server).await;
    let prefix = backend.prefix().clone();
    let engine = Stampede::with_config(backend, config()).unwrap();
    for (i, junk) in [
        "x",
        "TS1E0000",
        "TS1Eabcdefghijklmnopqrstuvwxyz01234567890123456789012345678901234567890",
    ]
    .iter()
    .enumerate()
    {
        let key = format!("junk-{i}");
        let entry = prefix.entry(&Digest::of_key(&key));
        let reply = raw_async(
            server.port(),
            format!("ms {entry} {} T60 F3\r\n{junk}\r\n", junk.len()),
        )
        .await;
        assert!(reply.starts_with("HD"), "{reply}");
        let served = engine
            .get_or_fill(&key, || async {
                Ok::<_, std::io::Error>(Fill::store("good", Ttl::fresh(Duration::from_secs(60))))
            })
            .await
            .unwrap();
        assert_eq!(served.status, Status::Stored, "{junk}");
        let again = engine
            .get_or_fill(&key, || async {
                Ok::<_, std::io::Error>(Fill::store("again", Ttl::default()))
            })
            .await
            .unwrap();
        assert_eq!(
            (again.status, &again.value[..]),
            (Status::Hit, &b"good"[..])
        );
    }
}

#[tokio::test]
async fn ttls_over_thirty_days_are_clamped() {
    let server = Server::memcached();
    let b = connect(&server).await;
    let s = Digest::of_key("long-lived");
    let (t, f) = acquire(&b, &s, Duration::from_secs(10), 0).await;
    let mut w = write_of(s, t, f, b"v", true);
    w.entry_ttl = Duration::from_secs(400 * 24 * 3600);
    assert_eq!(b.write(w).await.unwrap(), WriteOutcome::Stored);
    // Unclamped, 400 days would read as a Unix time in 1971: expired at once.
    assert!(b.fetch(&s, None).await.unwrap().entry.is_some());
    let reply = raw_async(server.port(), format!("mg {} t\r\n", b.prefix().entry(&s))).await;
    let t: i64 = reply.trim()[4..].parse().unwrap();
    assert!((29 * 24 * 3600..=30 * 24 * 3600).contains(&t), "{reply}");
}

#[tokio::test]
async fn a_pool_keeps_every_part_of_a_slot_on_one_server() {
    let a = Server::memcached();
    let b = Server::memcached();
    let backend = MemcachedBackend::connect(format!(
        "memcache://127.0.0.1:{},127.0.0.1:{}",
        a.port(),
        b.port()
    ))
    .await
    .unwrap();
    let p = backend.prefix().clone();
    let ten = Duration::from_secs(10);
    let mut per_server = [0usize; 2];
    for i in 0..40 {
        let s = Digest::of_key(format!("pooled-{i}"));
        let v = Digest::of_key(format!("variant-{i}"));
        let (t, f) = acquire(&backend, &s, ten, 0).await;
        let head = Record::encode_vary_head(
            Header {
                kind: Kind::VaryHead,
                fence: f,
                token: t,
                epoch: 0,
            },
            b"accept",
        );
        let mut w = write_of(s, t, f, b"", false);
        w.entry = head;
        w.variant = Some((v, conformance::entry(f, t, b"body")));
        w.variant_ttl = Duration::from_secs(60);
        assert_eq!(backend.write(w).await.unwrap(), WriteOutcome::Stored);
        let home = backend.server_of(&s);
        per_server[home] += 1;
        for (idx, server) in [&a, &b].into_iter().enumerate() {
            for key in [p.lease(&s), p.fence(&s), p.entry(&s), p.variant(&s, &v)] {
                let reply = raw_async(server.port(), format!("mg {key}\r\n")).await;
                let here = reply.starts_with("HD");
                assert_eq!(here, idx == home, "{key} on server {idx}: {reply}");
            }
        }
        let got = backend.fetch(&s, Some(&v)).await.unwrap();
        assert!(got.entry.is_some() && got.variant.is_some());
    }
    assert!(per_server.iter().all(|&n| n > 5), "{per_server:?}");
}

/// A server run with `-C` (CAS off) reports every CAS as 0, and `md k C0` deletes whatever is
/// stored: no lease would be safe. The backend refuses it as configuration at the first lease,
/// instead of handing out leases that a late release deletes for their next holder.
#[tokio::test]
async fn a_server_without_cas_is_refused_as_configuration() {
    let server = Server::memcached_with(&["-C"]);
    let b = connect(&server).await;
    let s = Digest::of_key("no-cas");
    let err = b
        .try_acquire(&s, Duration::from_secs(10), 0)
        .await
        .expect_err("no lease without CAS");
    assert!(err.is_config_rejected(), "{err}");
    assert!(err.to_string().contains("-C"), "{err}");
    // The lease that add left behind does not turn the refusal into waiting.
    let err = b
        .try_acquire(&s, Duration::from_secs(10), 0)
        .await
        .expect_err("no lease without CAS, the second time either");
    assert!(err.is_config_rejected(), "{err}");
}

/// A held lease's CAS goes back on a connection from before it was read, never on a new one;
/// with several connections per server, made as they are first used, the release and the
/// extension must still find one. A first version sent it only on the slot round-robin chose,
/// and a slot with no connection yet dialled one that was too new: the release gave up, and the
/// lease stayed until its expiry.
#[tokio::test]
async fn a_lease_is_released_and_extended_on_a_fresh_backend_with_several_connections() {
    let server = Server::memcached();
    let ten = Duration::from_secs(10);
    for op in ["release", "extend"] {
        let b = MemcachedBackend::builder(server.url())
            .connections_per_server(8)
            .build()
            .await
            .unwrap();
        let s = Digest::of_key(format!("several {op}"));
        let (t, _) = acquire(&b, &s, ten, 0).await;
        // Every other slot now dials a connection newer than the one the CAS came on: those
        // are skipped, not used, and the CAS still goes back on its own.
        for _ in 0..16 {
            b.fetch(&s, None).await.unwrap();
        }
        let took = match op {
            "release" => b.release(&s, t, Signal::Released).await.unwrap(),
            _ => b.extend(&s, t, ten).await.unwrap(),
        };
        assert!(took, "{op}");
        if op == "extend" {
            assert!(b.release(&s, t, Signal::Released).await.unwrap());
        }
        let other = connect(&server).await;
        assert!(
            matches!(
                other.try_acquire(&s, ten, 0).await.unwrap(),
                Acquire::Acquired { .. }
            ),
            "{op}: the lease was given back"
        );
    }
}

/// Memcached numbers CAS values from one counter that starts again at every restart, so a CAS
/// remembered from before a restart may be another lease's after it. A holder from before the
/// restart must not release or extend the lease a new holder took: before, its remembered CAS
/// matched the new lease's, and its `md`/`ms` with it deleted or took over that lease.
#[tokio::test]
async fn a_lease_cas_from_before_a_restart_is_not_trusted_after_it() {
    let mut server = Server::memcached();
    let a = connect(&server).await;
    let s = Digest::of_key("restart-cas");
    let ten = Duration::from_secs(10);
    for op in ["release", "extend"] {
        let (ta, _) = acquire(&a, &s, ten, 0).await;
        server.restart();
        // A's connections to the old process are gone; it reaches the new one again.
        let mut back = false;
        for _ in 0..100 {
            if a.fetch(&s, None).await.is_ok() {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(back, "the backend reconnected");
        // Another instance takes the lease on the new process: the same CAS sequence.
        let b = connect(&server).await;
        let (tb, _) = acquire(&b, &s, ten, 0).await;
        let took = match op {
            "release" => a.release(&s, ta, Signal::Released).await.unwrap(),
            _ => a.extend(&s, ta, ten).await.unwrap(),
        };
        assert!(!took, "{op}: A's lease ended with the restart");
        assert!(
            matches!(
                b.try_acquire(&s, ten, 0).await.unwrap(),
                Acquire::Held { .. }
            ),
            "{op}: B's lease survives"
        );
        assert!(
            b.release(&s, tb, Signal::Released).await.unwrap(),
            "{op}: B still holds it"
        );
    }
}

/// A restart loses the entry and the fence counter together; the counter made anew starts at
/// the clock, so a holder from before it cannot overwrite what came after.
#[tokio::test]
async fn a_holder_from_before_a_restart_cannot_overwrite_what_came_after() {
    let mut server = Server::memcached();
    let b = connect(&server).await;
    conformance::a_holder_from_before_a_loss_cannot_overwrite_what_came_after(&b, || {
        server.restart()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_load_fails_no_call_and_refills_each_key_once() {
    const KEYS: usize = 16;
    // Per key: fills that ran under a lease (their call ended Stored or NotStored), and fills
    // that ran because the store was unavailable (Bypass).
    struct Fills {
        leased: Vec<AtomicUsize>,
        bypass: Vec<AtomicUsize>,
    }
    let mut server = Server::memcached();
    let backend = connect(&server).await;
    let engine =
        Stampede::with_config(backend, config().breaker(3, Duration::from_millis(200))).unwrap();
    let fills = Arc::new(Fills {
        leased: (0..KEYS).map(|_| AtomicUsize::new(0)).collect(),
        bypass: (0..KEYS).map(|_| AtomicUsize::new(0)).collect(),
    });
    let failures = Arc::new(AtomicUsize::new(0));
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..8 {
        let (engine, fills, failures, stopped) = (
            engine.clone(),
            fills.clone(),
            failures.clone(),
            stopped.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut i = w;
            while !stopped.load(Ordering::SeqCst) {
                let k = i % KEYS;
                i += 3;
                let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let r = ran.clone();
                let res = engine
                    .get_or_fill(format!("restart-{k}"), move || async move {
                        r.store(true, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, std::io::Error>(Fill::store(
                            format!("v{k}"),
                            Ttl::fresh(Duration::from_secs(300)),
                        ))
                    })
                    .await;
                match res {
                    Ok(s) => {
                        assert_eq!(s.value, Bytes::from(format!("v{k}")));
                        if ran.load(Ordering::SeqCst) {
                            let by = match s.status {
                                Status::Bypass => &fills.bypass,
                                _ => &fills.leased,
                            };
                            by[k].fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(e) => {
                        eprintln!("call failed: {e}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    let count = |v: &Vec<AtomicUsize>| -> Vec<usize> {
        v.iter().map(|f| f.load(Ordering::SeqCst)).collect()
    };
    // Conditions are awaited (bounded), never timed: the machine may be slow.
    let until = |what: &'static str, cond: &dyn Fn() -> bool| {
        let ok = (0..1000).any(|_| {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
            false
        });
        assert!(ok, "{what} (waited 20 s)");
    };
    // Up: one fill per key.
    tokio::task::block_in_place(|| {
        until("every key filled while up", &|| {
            count(&fills.leased).iter().all(|&n| n >= 1)
        })
    });
    let warm = count(&fills.leased);
    assert_eq!(warm, vec![1; KEYS], "one fill per key while up");
    // Down (every lease and entry gone): calls are served from the source.
    tokio::task::block_in_place(|| server.kill());
    tokio::task::block_in_place(|| {
        until("calls went to the source while memcached was down", &|| {
            count(&fills.bypass).iter().sum::<usize>() > 0
        })
    });
    // Back, still under load: every key is filled again under a lease.
    tokio::task::block_in_place(|| server.restart());
    tokio::task::block_in_place(|| {
        until("every key refilled after the restart", &|| {
            count(&fills.leased)
                .iter()
                .zip(&warm)
                .all(|(now, before)| now > before)
        })
    });
    assert!(!engine.breaker_open());
    stopped.store(true, Ordering::SeqCst);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0, "no call failed");
    let leased = count(&fills.leased);
    for k in 0..KEYS {
        assert_eq!(
            leased[k] - warm[k],
            1,
            "key {k}: one fill under a lease after the restart (bypass fills while down: {})",
            fills.bypass[k].load(Ordering::SeqCst)
        );
    }
    // Every key is cached again.
    for k in 0..KEYS {
        let s = engine
            .get_or_fill(format!("restart-{k}"), || async {
                Ok::<_, std::io::Error>(Fill::store("x", Ttl::default()))
            })
            .await
            .unwrap();
        assert_eq!(s.status, Status::Hit, "key {k}");
    }
}

/// A fake server that answers every line with the same garbage, then keeps reading.
async fn garbage_server(reply: &'static [u8], close: bool) -> String {
    let addr = common::raw_server(move |mut sock| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 65536];
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if sock.write_all(reply).await.is_err() || close {
                        return;
                    }
                }
            }
        }
    })
    .await;
    format!("memcache://{addr}")
}

#[tokio::test]
async fn garbage_replies_are_errors_never_panics() {
    let garbage: &[(&[u8], bool)] = &[
        (b"VA 99999999999999999999\r\n", false),
        (b"VA 5 c1\r\nab", true),
        (b"VA -3\r\n", false),
        (b"HD cXYZ\r\n", false),
        (b"HD c1\r\n", false),
        (b"HD c1", true),
        (b"EN\r\n", false),
        (b"NS\r\n", false),
        (b"VA 2 f4294967296\r\nxx\r\n", false),
        (b"VA 1 c1\r\n7\r\n", false),
        (b"\r\n", false),
        (b"\xff\xfe\x00 binary\r\n", false),
        (b"SERVER_ERROR out of memory\r\n", false),
        (b"CLIENT_ERROR bad command line format\r\n", false),
        (b"ERROR\r\n", false),
        (b"", true),
    ];
    let s = Digest::of_key("garbage");
    let ttl = Duration::from_secs(5);
    for (reply, close) in garbage {
        let url = garbage_server(reply, *close).await;
        let b = MemcachedBackend::builder(url)
            .io_timeout(Duration::from_millis(200))
            .connect_timeout(Duration::from_millis(200))
            .build()
            .await
            .unwrap();
        let t = Token::random();
        // Any answer is fine; what matters is that each call returns.
        let _ = b.fetch(&s, None).await;
        let _ = b.fetch(&s, Some(&s)).await;
        let _ = b.try_acquire(&s, ttl, 0).await;
        let _ = b.extend(&s, t, ttl).await;
        let _ = b.release(&s, t, Signal::Released).await;
        let _ = b.write(write_of(s, t, 1, b"v", true)).await;
        let _ = b.invalidate(&s, ttl).await;
        let _ = b.meta_get("k").await;
        // And the engine on top serves from the source.
        let engine = Stampede::with_config(b, config()).unwrap();
        let served = engine
            .get_or_fill("k", || async {
                Ok::<_, std::io::Error>(Fill::store("v", Ttl::fresh(Duration::from_secs(1))))
            })
            .await;
        assert!(
            served.is_ok(),
            "{:?}: {served:?}",
            String::from_utf8_lossy(reply)
        );
    }
}

#[tokio::test]
async fn a_server_that_is_down_is_an_error_and_the_engine_fails_open() {
    let mut server = Server::memcached();
    let url = server.url();
    server.kill();
    let b = MemcachedBackend::connect(url).await.unwrap();
    fails_open(b, "connect to 127.0.0.1:").await;
}

/// A server whose name does not resolve (yet: a container not started) is not an error of the
/// build: its calls fail, naming it, and the engine fails open; every dial resolves the name
/// again, so the server is reached once it does.
#[tokio::test]
async fn a_server_name_that_does_not_resolve_fails_the_calls_not_the_build() {
    let b = MemcachedBackend::builder("memcache://cache.invalid:11211")
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .expect("built without resolving");
    fails_open(b, "cache.invalid:11211").await;
}

/// A server far away (100 ms each way) behind a tight connect timeout: dialling is quick, and
/// the new connection's first round trip (reading the server's settings) is bounded by the
/// I/O timeout, not the connect timeout, so the server is reached; a server that answers
/// nothing is given up on at the I/O timeout, saying so.
#[tokio::test]
async fn a_far_server_is_reached_though_a_round_trip_exceeds_the_connect_timeout() {
    let server = Server::memcached();
    let port = common::slow_relay(server.addr(), Duration::from_millis(100)).await;
    let b = MemcachedBackend::builder(format!("memcache://127.0.0.1:{port}"))
        .connect_timeout(Duration::from_millis(50))
        .io_timeout(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    let s = Digest::of_key("far");
    let (t, f) = acquire(&b, &s, Duration::from_secs(10), 0).await;
    assert_eq!(
        b.write(write_of(s, t, f, b"v", true)).await.unwrap(),
        WriteOutcome::Stored
    );

    let silent = common::raw_server(|sock| async move {
        // Accepts, reads nothing, answers nothing, until the client goes.
        let mut sock = sock;
        let mut buf = [0u8; 64];
        use tokio::io::AsyncReadExt;
        while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let b = MemcachedBackend::builder(format!("memcache://{silent}"))
        .io_timeout(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let e = b.fetch(&s, None).await.expect_err("nothing answers");
    assert!(
        e.to_string().contains("no reply to stats settings") && e.to_string().contains("200ms"),
        "{e}"
    );
}

/// The backend's calls fail with an error that says `why`, and the engine serves from the
/// source (`Bypass`).
async fn fails_open(b: MemcachedBackend, why: &str) {
    let e = b
        .fetch(&Digest::of_key("x"), None)
        .await
        .expect_err("nothing to reach");
    assert!(e.to_string().contains(why), "{e}");
    let engine = Stampede::with_config(b, config()).unwrap();
    let served = engine
        .get_or_fill("x", || async {
            Ok::<_, std::io::Error>(Fill::store("v", Ttl::fresh(Duration::from_secs(1))))
        })
        .await
        .unwrap();
    assert_eq!(served.status, Status::Bypass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_fails_open_and_sigcont_brings_hits_back() {
    let server = Server::memcached();
    let backend = MemcachedBackend::builder(server.url())
        .io_timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    // The backend's own call to a stopped server ends with an error (bounded by its I/O
    // timeout; the outer timeout only keeps a regression from hanging the suite). Connected
    // first, so the call waits on a live connection.
    backend.fetch(&Digest::of_key("k"), None).await.unwrap();
    server.pause();
    let direct = tokio::time::timeout(
        Duration::from_secs(20),
        backend.fetch(&Digest::of_key("k"), None),
    )
    .await
    .expect("a call to a stopped memcached returns");
    // The connection's watchdog ended it, and the call says why.
    let e = direct.expect_err("a stopped memcached answers nothing");
    assert!(e.to_string().contains("no reply within 300ms"), "{e}");
    server.resume();
    let engine = Stampede::with_config(backend, outage_config()).unwrap();
    common::pause_fails_open_and_resume_brings_hits_back(&server, &engine).await;
}

/// Hundreds of concurrent calls pipelined on one connection, values from 1 byte to 300 KB
/// (replies split over many reads): every caller gets its own key's value. The server gets
/// 256 MB so that nothing is evicted between the rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pipelined_connection_keeps_every_reply_with_its_command() {
    const KEYS: usize = 300;
    let server = Server::memcached_with(&["-m", "256"]);
    let backend = MemcachedBackend::builder(server.url())
        .connections_per_server(1)
        .build()
        .await
        .unwrap();
    let engine = Stampede::with_config(backend, config()).unwrap();
    let value_of = |i: usize| -> Bytes {
        let len = 1 + (i * 7919) % 300_000;
        let mut v = format!("key-{i}:").into_bytes();
        v.extend((0..len).map(|j| b'a' + ((i + j) % 26) as u8));
        Bytes::from(v)
    };
    for round in 0..2 {
        let mut tasks = Vec::new();
        for i in 0..KEYS {
            let engine = engine.clone();
            let want = value_of(i);
            tasks.push(tokio::spawn(async move {
                let fill = want.clone();
                let s = engine
                    .get_or_fill(format!("pipe-{i}"), move || async move {
                        Ok::<_, std::io::Error>(Fill::store(
                            fill,
                            Ttl::fresh(Duration::from_secs(60)),
                        ))
                    })
                    .await
                    .unwrap();
                (i, s.status, s.value == want)
            }));
        }
        for t in tasks {
            let (i, status, same) = t.await.unwrap();
            assert!(same, "round {round}, key {i}: the value of another key");
            let expected = if round == 0 {
                Status::Stored
            } else {
                Status::Hit
            };
            assert_eq!(status, expected, "round {round}, key {i}");
        }
    }
}

fn curr_connections(server: &Server) -> u64 {
    let stats = server.raw("stats");
    stats
        .lines()
        .find_map(|l| l.strip_prefix("STAT curr_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no curr_connections in {stats:?}"))
}

/// `curr_connections` once it reads `want` (polled for up to 5 s), else its last reading.
/// memcached reaps a closed connection (the readiness probe, an earlier `stats` connection)
/// asynchronously, so one reading can still count one that is gone.
async fn connections_reach(server: &Server, want: impl Fn(u64) -> bool) -> u64 {
    let mut now = curr_connections(server);
    for _ in 0..200 {
        if want(now) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        now = curr_connections(server);
    }
    now
}

/// Dropping the backend closes its connections (their tasks end with the client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_backend_closes_its_connections() {
    let server = Server::memcached();
    // The lowest of a few readings: a connection memcached has not reaped yet (the readiness
    // probe's, an earlier reading's) only ever adds to the count.
    let mut before = curr_connections(&server);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        before = before.min(curr_connections(&server));
    }
    let b = MemcachedBackend::builder(server.url())
        .connections_per_server(3)
        .build()
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(b.meta_get("nothing").await.unwrap(), None);
    }
    assert_eq!(
        connections_reach(&server, |n| n == before + 3).await,
        before + 3,
        "three connections made"
    );
    drop(b);
    let after = connections_reach(&server, |n| n <= before).await;
    assert!(
        after <= before,
        "connections open after the drop: {after}, before it: {before}"
    );
}

/// Fetches of one entry while a read of it is in flight share that read: with the server
/// stopped, fifty fetches wait on one `mg` and all get the entry when it answers. A read whose
/// caller goes away leaves those that joined it to read for themselves, and a failed read
/// leaves nothing behind: the next fetch reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_of_one_entry_in_flight_share_one_read() {
    let server = Server::memcached();
    let backend = Arc::new(
        MemcachedBackend::builder(server.url())
            .io_timeout(Duration::from_secs(1))
            .build()
            .await
            .unwrap(),
    );
    let slot = Digest::of_key("hot");
    let (token, fence) = acquire(&*backend, &slot, Duration::from_secs(10), 0).await;
    let w = backend.write(write_of(slot, token, fence, b"v1", true));
    assert_eq!(w.await.unwrap(), WriteOutcome::Stored);
    let fetch = |b: &Arc<MemcachedBackend>| {
        let b = b.clone();
        tokio::spawn(async move { b.fetch(&slot, None).await.map(|f| f.entry) })
    };
    let value = |entry: Option<Bytes>| match entry.as_ref().and_then(Record::decode) {
        Some(Record::Entry { value, .. }) => value,
        other => panic!("expected the entry, got {other:?}"),
    };

    let reads = server.stat("cmd_get");
    server.pause();
    let fetches: Vec<_> = (0..50).map(|_| fetch(&backend)).collect();
    // Long enough for every task to have sent or joined its read (the server answers none).
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.resume();
    for f in fetches {
        assert_eq!(value(f.await.unwrap().unwrap()), &b"v1"[..]);
    }
    assert_eq!(server.stat("cmd_get") - reads, 1, "one mg for the fifty");

    // The leading fetch's caller goes away while its read is in flight.
    server.pause();
    let leader = fetch(&backend);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let follower = fetch(&backend);
    tokio::time::sleep(Duration::from_millis(100)).await;
    leader.abort();
    let _ = leader.await;
    server.resume();
    let got = tokio::time::timeout(Duration::from_secs(10), follower)
        .await
        .expect("the follower of an abandoned read reads for itself");
    assert_eq!(value(got.unwrap().unwrap()), &b"v1"[..]);

    // A read that fails (no reply within the I/O timeout) fails every fetch that joined it.
    server.pause();
    let fetches: Vec<_> = (0..10).map(|_| fetch(&backend)).collect();
    for f in fetches {
        let e = f
            .await
            .unwrap()
            .expect_err("a stopped server answers nothing");
        assert!(e.to_string().contains("no reply within"), "{e}");
    }
    server.resume();
    assert_eq!(value(fetch(&backend).await.unwrap().unwrap()), &b"v1"[..]);
}

/// A successful POST invalidates its target and the URL in its `Location`: a value over the
/// item size limit under the target (its invalidation fails, the store answering) does not keep
/// the other one from being invalidated.
#[tokio::test]
async fn an_unsafe_request_invalidates_past_a_key_whose_value_is_over_the_limit() {
    use http::{Method, Request, Response, StatusCode};
    use http_body_util::Full;
    use tower::ServiceExt;
    use tower_layer::Layer;
    use tower_stampede::http::StampedeLayer;

    let server = Server::memcached_with(&["-I", "4m"]);
    let backend = connect(&server).await;
    let calls = Counter::default();
    let origin = {
        let calls = calls.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let calls = calls.clone();
            async move {
                let res = if req.method() == Method::POST {
                    Response::builder()
                        .status(StatusCode::CREATED)
                        .header("location", "/items")
                        .body(Full::new(Bytes::new()))
                } else {
                    let n = calls.inc();
                    Response::builder()
                        .header("cache-control", "max-age=60")
                        .body(Full::new(Bytes::from(format!("list {n}"))))
                };
                Ok::<_, std::convert::Infallible>(res.unwrap())
            }
        })
    };
    let svc = StampedeLayer::new(Stampede::with_config(backend.clone(), config()).unwrap())
        .key_fn(|p| Some(p.uri.path().as_bytes().to_vec()))
        .layer(origin);
    let send = |method: Method, path: &str| {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://app.test{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        svc.clone().oneshot(req)
    };
    assert_eq!(
        send(Method::GET, "/items").await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        send(Method::GET, "/items").await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(calls.get(), 1, "the second GET is a hit");

    // A value over the limit under the POST's target.
    let target = Digest::of_fields([&b"http-user"[..], b"/items/1"]);
    let key = backend.prefix().entry(&target);
    store_raw(&server, &key, 2 * 1024 * 1024).await;

    let res = send(Method::POST, "/items/1").await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(
        send(Method::GET, "/items").await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(calls.get(), 2, "the Location's URL was invalidated");
}
