//! The origin: an in-process hyper 1 server with one route per (scenario, system), each with its
//! own delay, `Cache-Control` and failure switch, counting calls and the peak of concurrent
//! calls. Every response carries its generation time (`x-gen-ms`, Unix ms), so a client can tell
//! how old the content it was served is.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How one route answers.
#[derive(Clone, Debug)]
pub struct RouteCfg {
    /// Time before the response is produced.
    pub delay: Duration,
    /// The `Cache-Control` of a successful response.
    pub cache_control: &'static str,
    /// A fixed body of this many bytes; 0 = a short body naming the call and its stamp.
    pub body_len: usize,
}

impl RouteCfg {
    pub fn new(delay_ms: u64, cache_control: &'static str) -> Self {
        RouteCfg {
            delay: Duration::from_millis(delay_ms),
            cache_control,
            body_len: 0,
        }
    }
}

/// One route's configuration and counters.
pub struct Route {
    name: String,
    cfg: RouteCfg,
    fixed: Bytes,
    calls: AtomicU64,
    running: AtomicU64,
    peak: AtomicU64,
    fail: AtomicBool,
}

impl Route {
    /// The request path.
    pub fn path(&self) -> String {
        format!("/r/{}", self.name)
    }
    /// Calls received so far (successful or failed).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
    /// The largest number of calls that ran at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
    /// From now on answer 500 (after the same delay), or succeed again.
    pub fn set_failing(&self, on: bool) {
        self.fail.store(on, Ordering::SeqCst);
    }
}

type Routes = Arc<Mutex<HashMap<String, Arc<Route>>>>;

/// The running origin; stops accepting on drop.
pub struct Origin {
    pub addr: SocketAddr,
    routes: Routes,
    accept: JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Decrements the running count however the request ends (a client may go away mid-delay).
struct Running(Arc<Route>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Origin {
    pub async fn start() -> std::io::Result<Origin> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let routes: Routes = Arc::default();
        let r = routes.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let r = r.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    handle(r.clone(), req)
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Origin {
            addr,
            routes,
            accept,
        })
    }

    /// Registers a route (its name must be new: every measurement uses a cold key).
    pub fn route(&self, name: &str, cfg: RouteCfg) -> Arc<Route> {
        let fixed = Bytes::from(vec![b'x'; cfg.body_len]);
        let route = Arc::new(Route {
            name: name.to_string(),
            cfg,
            fixed,
            calls: AtomicU64::new(0),
            running: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            fail: AtomicBool::new(false),
        });
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            routes.insert(name.to_string(), route.clone()).is_none(),
            "route {name} registered twice"
        );
        route
    }
}

async fn handle(
    routes: Routes,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let route = req.uri().path().strip_prefix("/r/").and_then(|n| {
        routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(n)
            .cloned()
    });
    let Some(route) = route else {
        let mut res = Response::new(Full::new(Bytes::from_static(b"no such route\n")));
        *res.status_mut() = StatusCode::NOT_FOUND;
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return Ok(res);
    };
    let n = route.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let now_running = route.running.fetch_add(1, Ordering::SeqCst) + 1;
    route.peak.fetch_max(now_running, Ordering::SeqCst);
    let _running = Running(route.clone());
    tokio::time::sleep(route.cfg.delay).await;
    let stamp = now_ms();
    let failing = route.fail.load(Ordering::SeqCst);
    let body = if failing {
        Bytes::from(format!("origin failure, call {n}\n"))
    } else if route.cfg.body_len > 0 {
        route.fixed.clone()
    } else {
        Bytes::from(format!("gen={stamp} call={n}\n"))
    };
    let mut res = Response::new(Full::new(body));
    let h = res.headers_mut();
    h.insert("x-gen-ms", HeaderValue::from(stamp));
    h.insert("x-origin-call", HeaderValue::from(n));
    if failing {
        *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    } else {
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static(route.cfg.cache_control),
        );
    }
    Ok(res)
}

/// The ceiling: a bare hyper 1 server answering every request with the same 1 KiB body.
pub async fn bare_hyper(body_len: usize) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let body = Bytes::from(vec![b'x'; body_len]);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let mut res = Response::new(Full::new(body.clone()));
                res.headers_mut().insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=3600"),
                );
                std::future::ready(Ok::<_, Infallible>(res))
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, task))
}

/// The second ceiling: hyper 1 plus one Redis `GET` per request on a held multiplexed
/// connection (the least a Redis-backed hit can cost).
pub async fn hyper_redis_get(
    redis_url: &str,
    body_len: usize,
) -> Result<(SocketAddr, JoinHandle<()>), String> {
    use tower_stampede::backend::redis::redis;
    let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let value = vec![b'x'; body_len];
    redis::cmd("SET")
        .arg("loadtest:ceiling")
        .arg(&value)
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = conn.clone();
            let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let mut conn = conn.clone();
                async move {
                    let got: Result<Vec<u8>, _> = redis::cmd("GET")
                        .arg("loadtest:ceiling")
                        .query_async(&mut conn)
                        .await;
                    let mut res = match got {
                        Ok(v) => Response::new(Full::new(Bytes::from(v))),
                        Err(_) => {
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = StatusCode::BAD_GATEWAY;
                            r
                        }
                    };
                    res.headers_mut().insert(
                        header::CACHE_CONTROL,
                        HeaderValue::from_static("public, max-age=3600"),
                    );
                    Ok::<_, Infallible>(res)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, task))
}
