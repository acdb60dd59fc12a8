//! Engine benches on the memory backend:
//! - a hit through `get_or_fill`;
//! - the time from a fill landing to a waiting follower in *another instance* getting the value,
//!   woken by the backend's signal vs by backoff polling alone.
//!
//! Run with `cargo bench --bench engine`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tower_stampede::backend::memory::MemoryBackend;
use tower_stampede::backend::{
    Acquire, Backend, BackendResult, BoxFuture, FencedWrite, Fetched, Signal, Subscription, Token,
    WriteOutcome,
};
use tower_stampede::{Config, Digest, Fill, Stampede, Ttl};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn hit(c: &mut Criterion) {
    let rt = rt();
    let e = Stampede::new(MemoryBackend::default());
    let value = vec![b'x'; 1024];
    rt.block_on(async {
        let v = value.clone();
        e.get_or_fill("hot", move || async move {
            Ok::<_, std::io::Error>(Fill::store(v, Ttl::fresh(Duration::from_secs(3600))))
        })
        .await
        .unwrap();
    });
    c.bench_function("engine_hit_memory_1KiB", |b| {
        b.to_async(&rt).iter(|| async {
            let s = e
                .get_or_fill("hot", || async {
                    Ok::<_, std::io::Error>(Fill::store(
                        "miss?",
                        Ttl::fresh(Duration::from_secs(1)),
                    ))
                })
                .await
                .unwrap();
            assert_eq!(s.value.len(), 1024);
        })
    });
}

/// The memory backend with its signals hidden: waiters can only poll.
struct PollingOnly(MemoryBackend);

impl Backend for PollingOnly {
    fn name(&self) -> &'static str {
        "memory-polling"
    }
    fn fetch<'a>(
        &'a self,
        s: &'a Digest,
        v: Option<&'a Digest>,
    ) -> BoxFuture<'a, BackendResult<Fetched>> {
        self.0.fetch(s, v)
    }
    fn try_acquire<'a>(
        &'a self,
        s: &'a Digest,
        t: Duration,
        f: u64,
    ) -> BoxFuture<'a, BackendResult<Acquire>> {
        self.0.try_acquire(s, t, f)
    }
    fn extend<'a>(
        &'a self,
        s: &'a Digest,
        t: Token,
        d: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        self.0.extend(s, t, d)
    }
    fn release<'a>(
        &'a self,
        s: &'a Digest,
        t: Token,
        g: Signal,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        self.0.release(s, t, g)
    }
    fn write(&self, w: FencedWrite) -> BoxFuture<'_, BackendResult<WriteOutcome>> {
        self.0.write(w)
    }
    fn invalidate<'a>(&'a self, s: &'a Digest, t: Duration) -> BoxFuture<'a, BackendResult<u64>> {
        self.0.invalidate(s, t)
    }
    fn fail<'a>(
        &'a self,
        s: &'a Digest,
        t: Token,
        d: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        self.0.fail(s, t, d)
    }
    fn subscribe<'a>(
        &'a self,
        _s: &'a Digest,
    ) -> BoxFuture<'a, BackendResult<Option<Subscription>>> {
        Box::pin(async { Ok(None) })
    }
}

/// One round: instance A fills (released by a trigger), instance B waits; returns the time from
/// the trigger to B's answer.
async fn wake_once(a: &Stampede, b: &Stampede, key: String) -> Duration {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let ka = key.clone();
    let a = a.clone();
    let filler = tokio::spawn(async move {
        a.get_or_fill(ka, move || async move {
            let _ = rx.await;
            Ok::<_, std::io::Error>(Fill::store("v", Ttl::fresh(Duration::from_secs(60))))
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(2)).await;
    let b2 = b.clone();
    let waiter = tokio::spawn(async move {
        b2.get_or_fill(key, || async {
            Ok::<_, std::io::Error>(Fill::store("b", Ttl::fresh(Duration::from_secs(60))))
        })
        .await
    });
    // Let the waiter settle into its wait (several backoff steps in).
    tokio::time::sleep(Duration::from_millis(40)).await;
    let t0 = Instant::now();
    tx.send(()).unwrap();
    let s = waiter.await.unwrap().unwrap();
    let dt = t0.elapsed();
    assert_eq!(&s.value[..], b"v");
    filler.await.unwrap().unwrap();
    dt
}

fn wake(c: &mut Criterion) {
    let rt = rt();
    let cfg = Config::default().backoff(Duration::from_millis(10), Duration::from_millis(500));
    let mem = MemoryBackend::default();
    let sig_a = Stampede::with_config(mem.clone(), cfg.clone()).unwrap();
    let sig_b = Stampede::with_config(mem, cfg.clone()).unwrap();
    let mem = MemoryBackend::default();
    let poll_a = Stampede::with_config(PollingOnly(mem.clone()), cfg.clone()).unwrap();
    let poll_b = Stampede::with_config(PollingOnly(mem), cfg).unwrap();
    let mut g = c.benchmark_group("fill_to_waiter");
    g.sample_size(10);
    let pairs: [(&str, &Stampede, &Stampede); 2] =
        [("signal", &sig_a, &sig_b), ("polling", &poll_a, &poll_b)];
    for (name, a, b) in pairs {
        let a = a.clone();
        let b = b.clone();
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        g.bench_function(name, |bench| {
            bench.to_async(&rt).iter_custom(|iters| {
                let (a, b, n) = (a.clone(), b.clone(), n.clone());
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let k = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        total += wake_once(&a, &b, format!("wake-{k}")).await;
                    }
                    total
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, hit, wake);
criterion_main!(benches);
