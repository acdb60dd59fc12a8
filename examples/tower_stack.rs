//! The stampede layer in a plain `tower::ServiceBuilder` stack, around a service that is not
//! axum: a `service_fn` standing in for a slow backend call.
//!
//! The stack: a concurrency limit, a timeout, then the cache. Fifty concurrent requests for one
//! cold URL reach the inner service once; the rest are collapsed or hit.
//!
//! Run with `cargo run --example tower_stack`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};
use tower_stampede::http::StampedeLayer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let backend = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let c = c.clone();
        async move {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(150)).await;
            let body = format!("{} rendered (call #{n})\n", req.uri().path());
            let res = Response::builder()
                .header("cache-control", "public, max-age=30")
                .body(Full::new(Bytes::from(body)))
                .expect("a valid response");
            Ok::<_, Infallible>(res)
        }
    });

    let svc = ServiceBuilder::new()
        .concurrency_limit(1_000)
        .timeout(Duration::from_secs(5))
        .layer(StampedeLayer::in_memory())
        .service(backend);

    let mut tasks = Vec::new();
    for _ in 0..50 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get("http://example.test/report")
                .body(Full::default())
                .expect("a valid request");
            let res = svc.oneshot(req).await?;
            let status = res
                .headers()
                .get("cache-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = res.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        }));
    }
    let mut by_status = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let (status, body) = t.await??;
        assert!(body.starts_with(b"/report rendered"));
        let kind = status.split("; ").skip(1).collect::<Vec<_>>().join("; ");
        let kind = kind.split("; ttl").next().unwrap_or("").to_string();
        *by_status.entry(kind).or_default() += 1;
    }
    println!(
        "50 concurrent requests -> {} call(s) to the inner service",
        calls.load(Ordering::SeqCst)
    );
    for (k, n) in by_status {
        println!("  {n:>3} x Cache-Status: tower-stampede; {k}");
    }
    Ok(())
}
