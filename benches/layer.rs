//! A hit through the HTTP layer on the memory backend vs the bare inner service, 1 KiB body.
//!
//! Run with `cargo bench --bench layer`; the ratio is layer / bare.

use std::convert::Infallible;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;
use tower_layer::Layer;
use tower_stampede::http::StampedeLayer;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = Bytes::from(vec![b'x'; 1024]);
    let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let body = body.clone();
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("cache-control", "max-age=3600")
                    .header("content-type", "text/plain")
                    .body(Full::new(body))
                    .unwrap(),
            )
        }
    });
    let cached = StampedeLayer::in_memory().layer(inner.clone());
    let req = || {
        Request::get("http://bench.test/hot")
            .header("accept", "*/*")
            .body(Full::default())
            .unwrap()
    };
    rt.block_on(async {
        let res = cached.clone().oneshot(req()).await.unwrap();
        res.into_body().collect().await.unwrap();
    });
    let mut g = c.benchmark_group("layer_1KiB");
    g.bench_function("bare_inner_service", |b| {
        b.to_async(&rt).iter(|| async {
            let res = inner.clone().oneshot(req()).await.unwrap();
            let b = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(b.len(), 1024);
        })
    });
    g.bench_function("stampede_layer_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let res = cached.clone().oneshot(req()).await.unwrap();
            assert!(res.headers().contains_key("cache-status"));
            let b = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(b.len(), 1024);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
