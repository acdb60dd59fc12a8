//! One axum route behind the stampede layer.
//!
//! `GET /slow` takes about 200 ms and says how many times its handler has run. Fire 200
//! concurrent requests at a cold cache and the handler runs once:
//!
//! ```sh
//! cargo run --example axum_route &
//! seq 200 | xargs -P 200 -I{} curl -s http://127.0.0.1:3000/slow; echo
//! ```
//!
//! Run with `cargo run --example axum_route` (listens on `127.0.0.1:3000`, or on `$LISTEN`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::{routing::get, Router};
use tower_stampede::http::StampedeLayer;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs = Arc::new(AtomicUsize::new(0));
    let slow = {
        let runs = runs.clone();
        move || {
            let runs = runs.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                format!("the handler has run {n} time(s)\n")
            }
        }
    };
    // The handler sets no Cache-Control, so the layer's TTL applies (10 s fresh, then 30 s of
    // stale-while-revalidate: one background refresh while everyone else gets the stale copy).
    let cache = StampedeLayer::in_memory()
        .default_ttl(Duration::from_secs(10))
        .stale_while_revalidate(Duration::from_secs(30));
    let app = Router::new()
        .route("/slow", get(slow))
        .route_layer(cache)
        .route("/", get(|| async { "try GET /slow\n" }));

    let addr = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}/slow", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
