//! A hit through the engine on Memcached vs a raw meta get of the same key.
//!
//! - `raw_mg_same_connection`: `MemcachedBackend::meta_get`, one `mg <key> v` through the
//!   backend's pool, set to one connection, so it is the connection the engine's hit uses;
//! - `engine_hit`: `Stampede::get_or_fill` on the same key (one `mg <key> v f`, the record
//!   decode, the freshness check, metrics and the tracing span);
//! - `raw_mg_bare_tcp`: the same `mg` written on a bare `TcpStream` with a minimal parser, the
//!   floor under the client library.
//!
//! The value is 1 KiB. Starts its own `memcached` on a free port. After the criterion group the
//! three are timed again interleaved, round by round, and the medians and ratios printed (the
//! ratio to report is `engine_hit / raw_mg_same_connection`). Run with
//! `cargo bench --features memcached --bench memcached`.

#[path = "../tests/common/servers.rs"]
#[allow(dead_code, unreachable_pub)]
mod servers;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tower_stampede::backend::memcached::MemcachedBackend;
use tower_stampede::{Digest, Fill, Stampede, Ttl};

const KEY: &str = "bench:hot";
const VALUE_LEN: usize = 1024;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `mg <key> v` on a bare connection; returns the value's length.
async fn bare_mg(conn: &mut BufReader<TcpStream>, cmd: &[u8]) -> usize {
    conn.get_mut().write_all(cmd).await.unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).await.unwrap();
    let len: usize = line
        .strip_prefix("VA ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected reply {line:?}"));
    let mut data = vec![0u8; len + 2];
    conn.read_exact(&mut data).await.unwrap();
    len
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

fn hit(c: &mut Criterion) {
    let rt = rt();
    let server = servers::Server::memcached();
    let backend = rt
        .block_on(
            MemcachedBackend::builder(server.url())
                .connections_per_server(1)
                .build(),
        )
        .unwrap();
    let engine = Stampede::new(backend.clone());
    rt.block_on(async {
        engine
            .get_or_fill(KEY, || async {
                Ok::<_, std::io::Error>(Fill::store(
                    vec![b'x'; VALUE_LEN],
                    Ttl::fresh(Duration::from_secs(3600)),
                ))
            })
            .await
            .unwrap();
    });
    let entry_key = backend.prefix().entry(&Digest::of_key(KEY));
    let record_len = rt
        .block_on(backend.meta_get(&entry_key))
        .unwrap()
        .expect("the value is stored")
        .len();
    let bare = rt.block_on(async {
        Mutex::new(BufReader::new(
            TcpStream::connect(server.addr()).await.unwrap(),
        ))
    });
    let bare_cmd = format!("mg {entry_key} v\r\n").into_bytes();

    let svc = layer_on(&engine);
    rt.block_on(layer_hit(&svc)); // the layer's first request fills its own entry
    let mut g = c.benchmark_group("memcached_hit_1KiB");
    g.bench_function("layer_hit", |b| b.to_async(&rt).iter(|| layer_hit(&svc)));
    g.bench_function("raw_mg_same_connection", |b| {
        b.to_async(&rt).iter(|| async {
            let v = backend.meta_get(&entry_key).await.unwrap().unwrap();
            assert_eq!(v.len(), record_len);
        })
    });
    g.bench_function("engine_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let s = engine
                .get_or_fill(KEY, || async {
                    Ok::<_, std::io::Error>(Fill::store("miss?", Ttl::default()))
                })
                .await
                .unwrap();
            assert_eq!(s.value.len(), VALUE_LEN);
        })
    });
    g.bench_function("raw_mg_bare_tcp", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = bare.lock().await;
            assert_eq!(bare_mg(&mut conn, &bare_cmd).await, record_len);
        })
    });
    g.finish();

    // The machine these run on is shared, so the three are also timed interleaved, round by
    // round, and compared by their medians: drift in the load then hits all three alike.
    let rounds = 20_000;
    let (raw, eng, tcp, lay) = rt.block_on(async {
        let (mut raw, mut eng, mut tcp, mut lay) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut conn = bare.lock().await;
        for i in 0..rounds {
            for step in 0..4 {
                let t0 = Instant::now();
                match (step + i) % 4 {
                    3 => {
                        layer_hit(&svc).await;
                        lay.push(t0.elapsed());
                    }
                    0 => {
                        backend.meta_get(&entry_key).await.unwrap().unwrap();
                        raw.push(t0.elapsed());
                    }
                    1 => {
                        let s = engine
                            .get_or_fill(KEY, || async {
                                Ok::<_, std::io::Error>(Fill::store("miss?", Ttl::default()))
                            })
                            .await
                            .unwrap();
                        assert_eq!(s.value.len(), VALUE_LEN);
                        eng.push(t0.elapsed());
                    }
                    _ => {
                        bare_mg(&mut conn, &bare_cmd).await;
                        tcp.push(t0.elapsed());
                    }
                }
            }
        }
        (median(raw), median(eng), median(tcp), median(lay))
    });
    println!(
        "interleaved medians: layer_hit {lay:?}; layer_hit / raw_mg_same_connection = {:.2}",
        lay.as_secs_f64() / raw.as_secs_f64()
    );
    println!(
        "interleaved medians over {rounds} rounds: raw_mg_same_connection {raw:?}, engine_hit \
         {eng:?}, raw_mg_bare_tcp {tcp:?}; engine_hit / raw_mg_same_connection = {:.2}, \
         raw_mg_same_connection / raw_mg_bare_tcp = {:.2}",
        eng.as_secs_f64() / raw.as_secs_f64(),
        raw.as_secs_f64() / tcp.as_secs_f64(),
    );
    drop(server);
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

criterion_group!(benches, hit);
criterion_main!(benches);
