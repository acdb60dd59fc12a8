//! Shared test support: real server processes and the backend conformance suite.
#![allow(dead_code, unreachable_pub)]

pub mod conformance;
pub mod servers;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Counts calls to a fill (the "origin calls" that the invariants are about).
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    pub fn inc(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Outage tests: a short per-call backend timeout and a breaker that opens after 3 failures.
pub fn outage_config() -> tower_stampede::Config {
    tower_stampede::Config::default()
        .backend_timeout(std::time::Duration::from_millis(100))
        .breaker(3, std::time::Duration::from_millis(500))
}

/// One call whose fill always succeeds: whatever the store does, it must be served.
pub async fn call(engine: &tower_stampede::Stampede, key: String) -> tower_stampede::Served {
    engine
        .get_or_fill(key, || async {
            Ok::<_, std::io::Error>(tower_stampede::Fill::store(
                "origin",
                tower_stampede::Ttl::fresh(std::time::Duration::from_secs(60)),
            ))
        })
        .await
        .expect("every call is served from the origin, store or not")
}

/// SIGSTOP of the store: calls are served from the origin (`Bypass`) and the breaker opens;
/// SIGCONT: hits on `"k"` (stored before) come back with the same engine, breaker closed.
pub async fn pause_fails_open_and_resume_brings_hits_back(
    server: &servers::Server,
    engine: &tower_stampede::Stampede,
) {
    use tower_stampede::Status;
    assert_eq!(call(engine, "k".into()).await.status, Status::Stored);
    assert_eq!(call(engine, "k".into()).await.status, Status::Hit);
    server.pause();
    for i in 0..10 {
        let s = call(engine, format!("paused-{i}")).await;
        assert_eq!(s.status, Status::Bypass);
    }
    assert!(engine.breaker_open(), "a hung store opens the breaker");
    server.resume();
    let mut back = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if call(engine, "k".into()).await.status == Status::Hit {
            back = true;
            break;
        }
    }
    assert!(back, "caching resumes after SIGCONT and the cooldown");
    assert!(!engine.breaker_open());
}

/// Three instances (`a`, `b`, `c`: engines on backends of their own, one store) and a source
/// that fails. `a` holds the lease and fails; `b` was waiting on it, `c` comes after. Both take
/// their fallback at once -- the failure, marked on the lease in the store, reaches every
/// instance, with or without pub/sub -- and the source sees one call. Before the mark, `c` (and
/// with memcached `b`) waited the 30 s lease out and then called the source; the 15 s bound
/// fails the test then.
pub async fn a_failure_reaches_every_instance_at_once(
    backends: [std::sync::Arc<dyn tower_stampede::backend::Backend>; 3],
    config: tower_stampede::Config,
) {
    use std::time::Duration;
    use tower_stampede::{Error, Fill, Stampede};
    let config = config
        .lease(Duration::from_secs(30))
        .wait_timeout(Duration::from_secs(60))
        .fill_timeout(Duration::from_secs(60));
    let [a, b, c] = backends.map(|b| Stampede::from_arc(b, config.clone()).unwrap());
    let calls = Counter::default();
    let fill = |delay: u64| {
        let calls = calls.clone();
        move || async move {
            calls.inc();
            tokio::time::sleep(Duration::from_millis(delay)).await;
            Err::<Fill, _>(std::io::Error::other("origin down"))
        }
    };
    let key = "fails-everywhere";
    let holder = {
        let (a, f) = (a.clone(), fill(500));
        tokio::spawn(async move { a.get_or_fill(key, f).await })
    };
    // `b` starts waiting while `a` fills.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiter = {
        let (b, f) = (b.clone(), fill(0));
        tokio::spawn(async move { b.get_or_fill(key, f).await })
    };
    let held = holder.await.unwrap();
    assert!(matches!(held, Err(Error::Fill(_))), "{held:?}");
    let bound = Duration::from_secs(15);
    let waited = tokio::time::timeout(bound, waiter)
        .await
        .expect("the waiter was told of the failure, not left to wait out the lease")
        .unwrap();
    assert!(matches!(waited, Err(Error::FailedElsewhere)), "{waited:?}");
    let late = tokio::time::timeout(bound, c.get_or_fill(key, fill(0)))
        .await
        .expect("a later caller on another instance saw the failed lease at once");
    assert!(matches!(late, Err(Error::FailedElsewhere)), "{late:?}");
    assert_eq!(calls.get(), 1, "one source call for the lease");
}

/// A TCP server on a free loopback port that runs `serve` on each connection it accepts, for
/// peers that speak a protocol by hand (garbage, an old HTTP version). Returns its address.
pub async fn raw_server<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(serve(sock));
        }
    });
    addr
}

/// A TCP relay to `to` that holds every chunk `delay` before passing it on, both ways: a
/// server far away (each round trip at least `2 x delay`).
pub async fn slow_relay(to: String, delay: std::time::Duration) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pipe(
        mut r: tokio::net::tcp::OwnedReadHalf,
        mut w: tokio::net::tcp::OwnedWriteHalf,
        delay: std::time::Duration,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            tokio::time::sleep(delay).await;
            if w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&to).await else {
                    return;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, delay));
                pipe(sr, cw, delay).await;
            });
        }
    });
    port
}
