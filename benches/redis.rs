//! Redis backend benches, against a `redis-server` this bench starts on a free port:
//! - a hit through the engine (`get_or_fill` -> one `GET`) vs a raw `GET` of the same key on the
//!   same held multiplexed connection (the backend holds one connection here);
//! - the time from a fill's end to a waiter in another engine instance being served, woken by
//!   the backend's pub/sub signal vs by backoff polling alone (a backend built from a pool
//!   without a pub/sub URL has no signals).
//!
//! Both are printed as ratios at the end, measured in the same run.
//!
//! Run with `cargo bench --features redis --bench redis`.

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/common/servers.rs"]
mod servers;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::Criterion;
use tower_stampede::backend::redis::{deadpool_redis, redis, RedisBackend};
use tower_stampede::{Config, Digest, Fill, Stampede, Status, Ttl};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

const VALUE_LEN: usize = 1024;

async fn hit_once(e: &Stampede) {
    let s = e
        .get_or_fill("hot", || async {
            Ok::<_, std::io::Error>(Fill::store("miss?", Ttl::fresh(Duration::from_secs(1))))
        })
        .await
        .unwrap();
    assert_eq!(s.status, Status::Hit);
}

type Origin = tower::util::BoxCloneSyncService<
    http::Request<http_body_util::Full<bytes::Bytes>>,
    http::Response<http_body_util::Full<bytes::Bytes>>,
    std::convert::Infallible,
>;

/// The HTTP layer on the same engine, in front of an origin with a 1 KiB cacheable body.
fn layer_on(e: &Stampede) -> tower_stampede::http::StampedeService<Origin> {
    use tower_layer::Layer;
    let origin = tower::service_fn(
        |_req: http::Request<http_body_util::Full<bytes::Bytes>>| async {
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .header("cache-control", "max-age=3600")
                    .body(http_body_util::Full::new(bytes::Bytes::from(vec![
                        b'x';
                        VALUE_LEN
                    ])))
                    .unwrap(),
            )
        },
    );
    tower_stampede::http::StampedeLayer::new(e.clone()).layer(Origin::new(origin))
}

async fn layer_hit(svc: &tower_stampede::http::StampedeService<Origin>) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let req = http::Request::get("http://bench.test/hot")
        .body(http_body_util::Full::default())
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    let b = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(b.len(), VALUE_LEN);
}

async fn raw_get(conn: &redis::aio::MultiplexedConnection, key: &str) {
    let mut c = conn.clone();
    let v: Vec<u8> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(v.len() > VALUE_LEN);
}

/// Mean time of `n` calls of `f`, run in alternating blocks so drift hits both sides alike.
fn mean_of<F: Fn() -> Duration>(f: F, n: u32) -> Duration {
    (0..n).map(|_| f()).sum::<Duration>() / n
}

fn hit(c: &mut Criterion, server: &servers::Server) -> (Duration, Duration, Duration) {
    let rt = rt();
    let backend = rt.block_on(async {
        RedisBackend::builder(server.url())
            .connections(1)
            .connect()
            .await
            .unwrap()
    });
    let key = backend.prefix().entry(&Digest::of_key("hot"));
    let conn = rt.block_on(backend.connection()).unwrap();
    let e = Stampede::new(backend);
    rt.block_on(async {
        e.get_or_fill("hot", || async {
            Ok::<_, std::io::Error>(Fill::store(
                vec![b'x'; VALUE_LEN],
                Ttl::fresh(Duration::from_secs(3600)),
            ))
        })
        .await
        .unwrap();
    });
    let svc = layer_on(&e);
    rt.block_on(layer_hit(&svc)); // the layer's first request fills its own entry
    let mut g = c.benchmark_group("redis_hit_1KiB");
    g.bench_function("raw_get_same_connection", |b| {
        b.to_async(&rt).iter(|| raw_get(&conn, &key))
    });
    g.bench_function("engine_hit", |b| b.to_async(&rt).iter(|| hit_once(&e)));
    g.bench_function("layer_hit", |b| b.to_async(&rt).iter(|| layer_hit(&svc)));
    g.finish();

    // The ratio, from one interleaved run (criterion's figures above are the detailed ones).
    let block = 2_000u32;
    let (mut raw, mut eng, mut lay) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for _ in 0..5 {
        lay += rt.block_on(async {
            let t = Instant::now();
            for _ in 0..block {
                layer_hit(&svc).await;
            }
            t.elapsed() / block
        });
        raw += rt.block_on(async {
            let t = Instant::now();
            for _ in 0..block {
                raw_get(&conn, &key).await;
            }
            t.elapsed() / block
        });
        eng += rt.block_on(async {
            let t = Instant::now();
            for _ in 0..block {
                hit_once(&e).await;
            }
            t.elapsed() / block
        });
    }
    (raw / 5, eng / 5, lay / 5)
}

/// One waiter's wait: A fills `key` (20 ms), B waits on A's lease; returns the time from the end
/// of A's fill to B being served.
async fn one_wakeup(a: &Stampede, b: &Stampede, probe: &RedisBackend, key: String) -> Duration {
    let fill_end: Arc<Mutex<Option<Instant>>> = Arc::default();
    let fe = fill_end.clone();
    let (a, k) = (a.clone(), key.clone());
    let holder = tokio::spawn(async move {
        a.get_or_fill(k, move || async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            *fe.lock().unwrap() = Some(Instant::now());
            Ok::<_, std::io::Error>(Fill::store("v", Ttl::fresh(Duration::from_secs(60))))
        })
        .await
    });
    // B arrives while A holds the lease.
    let lease = probe.prefix().lease(&Digest::of_key(&key));
    let mut conn = probe.connection().await.unwrap();
    loop {
        let n: i64 = redis::cmd("EXISTS")
            .arg(&lease)
            .query_async(&mut conn)
            .await
            .unwrap();
        if n == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let served = b
        .get_or_fill(key, || async {
            Ok::<_, std::io::Error>(Fill::store("b", Ttl::fresh(Duration::from_secs(60))))
        })
        .await
        .unwrap();
    let served_at = Instant::now();
    assert_eq!(served.status, Status::Collapsed);
    holder.await.unwrap().unwrap();
    let end = fill_end.lock().unwrap().expect("A's fill ran");
    served_at.saturating_duration_since(end)
}

fn wakeup(c: &mut Criterion, server: &servers::Server) -> (Duration, Duration) {
    let rt = rt();
    let (a, signalled, polling, probe) = rt.block_on(async {
        let a = Stampede::new(RedisBackend::builder(server.url()).connect().await.unwrap());
        let signalled = Stampede::new(RedisBackend::builder(server.url()).connect().await.unwrap());
        let pool = deadpool_redis::Config::from_url(server.url())
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .unwrap();
        let polling_backend = RedisBackend::builder_with_pool(pool)
            .connect()
            .await
            .unwrap();
        let polling = Stampede::with_config(polling_backend, Config::default()).unwrap();
        let probe = RedisBackend::builder(server.url()).connect().await.unwrap();
        (a, signalled, polling, probe)
    });
    let seq = std::sync::atomic::AtomicU64::new(0);
    let next_key = || {
        format!(
            "wake-{}",
            seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    };
    let mut g = c.benchmark_group("redis_fill_to_waiter");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    for (name, waiter) in [("pubsub", &signalled), ("polling_only", &polling)] {
        g.bench_function(name, |bch| {
            bch.to_async(&rt).iter_custom(|iters| {
                let keys: Vec<String> = (0..iters).map(|_| next_key()).collect();
                let (a, waiter, probe) = (&a, waiter, &probe);
                async move {
                    let mut total = Duration::ZERO;
                    for k in keys {
                        total += one_wakeup(a, waiter, probe, k).await;
                    }
                    total
                }
            })
        });
    }
    g.finish();

    let n = 40;
    let sig = mean_of(
        || rt.block_on(one_wakeup(&a, &signalled, &probe, next_key())),
        n,
    );
    let poll = mean_of(
        || rt.block_on(one_wakeup(&a, &polling, &probe, next_key())),
        n,
    );
    (sig, poll)
}

fn main() {
    let server = servers::Server::redis();
    let mut c = Criterion::default().configure_from_args();
    let (raw, eng, lay) = hit(&mut c, &server);
    let (sig, poll) = wakeup(&mut c, &server);
    c.final_summary();
    println!();
    println!(
        "redis hit: engine {eng:?} vs raw GET {raw:?} on the same connection: ratio {:.2}",
        eng.as_secs_f64() / raw.as_secs_f64()
    );
    println!(
        "redis hit through the HTTP layer {lay:?} vs raw GET {raw:?}: ratio {:.2}",
        lay.as_secs_f64() / raw.as_secs_f64()
    );
    println!(
        "fill -> waiter served: pub/sub {sig:?} vs polling only {poll:?}: polling/pubsub ratio {:.1}",
        poll.as_secs_f64() / sig.as_secs_f64()
    );
}
