//! The HTTP layer on a real Redis: several layer instances (as several app instances) sharing
//! one `redis-server`, and fail-open with `Cache-Status: ...; fwd=bypass` when it is gone.
#![cfg(feature = "redis")]

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::servers::Server;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_layer::Layer;
use tower_stampede::backend::redis::RedisBackend;
use tower_stampede::http::StampedeLayer;
use tower_stampede::{Config, Stampede};

fn origin(
    calls: Arc<AtomicUsize>,
    delay: Duration,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let calls = calls.clone();
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(
                Response::builder()
                    .header("cache-control", "max-age=60")
                    .body(Full::new(Bytes::from(format!("call {n}"))))
                    .unwrap(),
            )
        }
    })
}

async fn layer(server: &Server, cfg: Config) -> StampedeLayer {
    let b = RedisBackend::builder(server.url()).connect().await.unwrap();
    StampedeLayer::new(Stampede::with_config(b, cfg).unwrap())
}

async fn send<S>(svc: S, path: &str) -> (String, Bytes)
where
    S: Service<
        Request<Full<Bytes>>,
        Response = Response<tower_stampede::http::ResponseBody<Full<Bytes>>>,
    >,
    S::Error: std::fmt::Debug,
{
    send_with(svc, path, &[]).await
}

async fn send_with<S>(svc: S, path: &str, headers: &[(&str, &str)]) -> (String, Bytes)
where
    S: Service<
        Request<Full<Bytes>>,
        Response = Response<tower_stampede::http::ResponseBody<Full<Bytes>>>,
    >,
    S::Error: std::fmt::Debug,
{
    let mut req = Request::get(path).header("host", "app.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = svc
        .oneshot(req.body(Full::default()).unwrap())
        .await
        .unwrap();
    let cs = res
        .headers()
        .get("cache-status")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    (cs, res.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_instances_one_fill_through_the_layer() {
    let redis = Server::redis();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut svcs = Vec::new();
    for _ in 0..4 {
        svcs.push(
            layer(&redis, Config::default())
                .await
                .layer(origin(calls.clone(), Duration::from_millis(200))),
        );
    }
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let svc = svcs[i % 4].clone();
        tasks.push(tokio::spawn(async move { send(svc, "/hot").await }));
    }
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let (cs, body) = t.await.unwrap();
        assert_eq!(&body[..], b"call 1", "{cs}");
        let kind = cs.split("; ttl").next().unwrap().to_string();
        *statuses.entry(kind).or_default() += 1;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{statuses:?}");
    assert_eq!(
        statuses.get("tower-stampede; fwd=uri-miss; stored"),
        Some(&1),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gone_means_bypass_from_the_origin_then_caching_resumes() {
    let mut redis = Server::redis();
    let calls = Arc::new(AtomicUsize::new(0));
    let cfg = Config::default()
        .backend_timeout(Duration::from_millis(100))
        .breaker(3, Duration::from_millis(300));
    let svc = layer(&redis, cfg)
        .await
        .layer(origin(calls.clone(), Duration::from_millis(5)));
    let (cs, _) = send(svc.clone(), "/r").await;
    assert!(cs.contains("stored"), "{cs}");
    redis.kill();
    for _ in 0..20 {
        let (cs, body) = send(svc.clone(), "/r").await;
        assert!(cs.contains("fwd=bypass; detail=backend-down"), "{cs}");
        assert!(body.starts_with(b"call "));
    }
    redis.restart();
    // The breaker's cooldown passes; the connection is remade; caching resumes by itself.
    let mut resumed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (cs, _) = send(svc.clone(), "/r").await;
        if cs.contains("; hit") {
            resumed = true;
            break;
        }
    }
    assert!(resumed, "hits came back after Redis restarted");
}

/// A hit on a `Vary` URL is one command (`MGET` of the entry's Vary head and the variant) once
/// the process knows the URL's Vary list; the first hit in a process that never saw the URL
/// needs the head first (`GET`, then `MGET`): the variant's key is a digest of the request
/// headers the head names, which a script could not compute on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vary_hit_is_one_command_once_the_process_knows_the_vary_list() {
    use common::servers::Monitor;
    const GZIP: &[(&str, &str)] = &[("accept-encoding", "gzip")];
    let server = Server::redis();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let origin = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("cache-control", "max-age=60")
                    .header("vary", "accept-encoding")
                    .body(Full::new(Bytes::from(format!("call {n}"))))
                    .unwrap(),
            )
        }
    });
    let filler = layer(&server, Config::default())
        .await
        .layer(origin.clone());
    let (cs, body) = send_with(filler, "/v", GZIP).await;
    assert!(cs.contains("stored"), "{cs}");
    assert_eq!(&body[..], b"call 1");

    // Another process: its own backend and engine, nothing in memory about "/v".
    let other = layer(&server, Config::default()).await;
    let mut monitor = Monitor::start(&server);
    server.mark("m1");
    let (cs1, _) = send_with(other.layer(origin.clone()), "/v", GZIP).await;
    server.mark("m2");
    let (cs2, body2) = send_with(other.layer(origin.clone()), "/v", GZIP).await;
    server.mark("m3");
    assert!(
        cs1.contains("; hit") && cs2.contains("; hit"),
        "{cs1} / {cs2}"
    );
    assert_eq!(&body2[..], b"call 1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(monitor.until("m1").is_empty());
    let first = monitor.until("m2");
    assert_eq!(first.len(), 2, "first hit in the process: {first:#?}");
    assert!(
        first[0].starts_with("\"GET\"") && first[1].starts_with("\"MGET\""),
        "{first:#?}"
    );
    let then = monitor.until("m3");
    assert_eq!(then.len(), 1, "every later hit: {then:#?}");
    assert!(then[0].starts_with("\"MGET\""), "{then:#?}");
}
