//! The Redis backend's near cache (`RedisBackendBuilder::near_cache`) against real
//! `redis-server` processes: hits that cost no round trip, and coherence: another instance's
//! write, a `FLUSHALL`, and the loss of the tracking connection each make the next read go back
//! to Redis. (The conformance suite runs on it too, in `redis_backend.rs`.)
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::servers::{Monitor, Server};
use tower_stampede::backend::redis::{redis, RedisBackend};
use tower_stampede::backend::Backend;
use tower_stampede::{Digest, Fill, Stampede, Status, Ttl};

async fn near_backend(server: &Server) -> RedisBackend {
    RedisBackend::builder(server.url())
        .near_cache(1 << 20)
        .connect()
        .await
        .expect("connect to the test's redis-server")
}

async fn raw_cmd<T: redis::FromRedisValue>(b: &RedisBackend, cmd: &redis::Cmd) -> T {
    let mut c = b.connection().await.unwrap();
    cmd.query_async::<T>(&mut c).await.unwrap()
}

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
    for _ in 0..20 {
        let s = a
            .get_or_fill(key, || async { Ok::<_, std::io::Error>(fresh("x")) })
            .await
            .unwrap();
        assert_eq!(&s.value[..], b"old");
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_and_a_lost_tracking_connection_drop_what_is_kept() {
    let server = Server::redis();
    let backend = near_backend(&server).await;
    let a = Stampede::new(backend.clone());
    let slot = Digest::of_key("k");
    a.get_or_fill("k", || async { Ok::<_, std::io::Error>(fresh("v1")) })
        .await
        .unwrap();
    for _ in 0..20 {
        assert!(backend.fetch(&slot, None).await.unwrap().entry.is_some());
    }
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
    a.get_or_fill("k", || async { Ok::<_, std::io::Error>(fresh("v2")) })
        .await
        .unwrap();
    for _ in 0..20 {
        assert!(backend.fetch(&slot, None).await.unwrap().entry.is_some());
    }
    let info: redis::Value = raw_cmd(&backend, redis::cmd("CLIENT").arg("TRACKINGINFO")).await;
    let redirect = tracking_redirect(&info).expect("the data connection is tracked");
    assert!(redirect > 0, "redirect id {redirect}");
    let killed = server.raw(&format!("CLIENT KILL ID {redirect}"));
    assert!(killed.contains(":1"), "CLIENT KILL: {killed}");
    let entry_key = backend.prefix().entry(&slot);
    let set = server.raw(&format!("SET {entry_key} garbage"));
    assert!(set.contains("OK"), "{set}");
    let mut seen = false;
    for _ in 0..200 {
        let e = backend.fetch(&slot, None).await.unwrap().entry;
        if e.as_deref() == Some(&b"garbage"[..]) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "the near copy outlived its tracking connection");

    // A new tracking connection is made and used: hits stop reaching Redis again.
    let mut monitor = Monitor::start(&server);
    let mut quiet = false;
    for round in 0..100 {
        server.mark(&format!("a{round}"));
        for _ in 0..20 {
            backend.fetch(&slot, None).await.unwrap();
        }
        server.mark(&format!("b{round}"));
        let _ = monitor.until(&format!("a{round}"));
        if reads(&monitor.until(&format!("b{round}"))) == 0 {
            quiet = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        quiet,
        "the near cache never came back after its connection was lost"
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
