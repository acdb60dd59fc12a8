//! Bounded load generators: a burst of N clients on N pre-opened keep-alive connections, an
//! open-loop constant rate, sequential requests, and `wrk` (or an in-process closed loop when
//! `wrk` is not installed) for throughput. Every request has a timeout; every loop a count.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::origin::now_ms;

/// One public host name for every request (as behind a load balancer): our cache key includes
/// the host, so both instances of a pair name the same entry.
pub const HOST: &str = "app.test";

/// How a system reports what its cache did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Nginx,
    Varnish,
    Ours,
}

/// A cache outcome label from the response headers: our `Cache-Status` without its `ttl`,
/// nginx's `$upstream_cache_status`, Varnish's hit/miss from `X-Varnish` (two ids on a hit).
pub fn cache_label(flavor: Flavor, h: &HeaderMap) -> String {
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    match flavor {
        Flavor::Ours => get("cache-status")
            .split(';')
            .map(str::trim)
            .filter(|p| !p.starts_with("ttl="))
            .collect::<Vec<_>>()
            .join("; "),
        Flavor::Nginx => match get("x-cache-status") {
            "" => "-".into(),
            s => s.to_string(),
        },
        Flavor::Varnish => {
            if get("x-varnish").split_whitespace().count() >= 2 {
                "hit".into()
            } else {
                "miss/pass".into()
            }
        }
    }
}

/// One request's outcome.
#[derive(Clone, Debug)]
pub struct Sample {
    pub status: u16,
    pub latency: Duration,
    pub cache: String,
    /// The origin's generation time of the content served (`x-gen-ms`).
    pub stamp: Option<u64>,
    /// Wall-clock ms when the whole body had arrived.
    pub recv_ms: u64,
    pub err: Option<String>,
}

impl Sample {
    pub fn ok(&self) -> bool {
        self.err.is_none() && self.status == 200
    }
    fn failed(latency: Duration, err: String) -> Sample {
        Sample {
            status: 0,
            latency,
            cache: String::new(),
            stamp: None,
            recv_ms: now_ms(),
            err: Some(err),
        }
    }
}

/// Summary of a set of samples.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub n: usize,
    pub ok: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub statuses: BTreeMap<u16, usize>,
    pub cache: BTreeMap<String, usize>,
    pub first_error: Option<String>,
}

pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

impl Stats {
    pub fn of(samples: &[Sample]) -> Stats {
        let mut lat: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
        lat.sort();
        let mut st = Stats {
            n: samples.len(),
            ok: samples.iter().filter(|s| s.ok()).count(),
            p50: percentile(&lat, 0.50),
            p99: percentile(&lat, 0.99),
            max: lat.last().copied().unwrap_or_default(),
            ..Stats::default()
        };
        for s in samples {
            *st.statuses.entry(s.status).or_default() += 1;
            if !s.cache.is_empty() {
                *st.cache.entry(s.cache.clone()).or_default() += 1;
            }
            if st.first_error.is_none() {
                st.first_error = s.err.clone();
            }
        }
        st
    }

    /// `statuses {200: 500}; cache {...}; first error ...` for the diagnostics.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "n={} ok={} p50={} p99={} max={} statuses {:?} cache {:?}",
            self.n,
            self.ok,
            crate::fmt_ms(self.p50),
            crate::fmt_ms(self.p99),
            crate::fmt_ms(self.max),
            self.statuses,
            self.cache
        );
        if let Some(e) = &self.first_error {
            s.push_str(&format!("; first error: {e}"));
        }
        s
    }
}

fn request(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header(header::HOST, HOST)
        .body(Empty::new())
        .expect("a valid request")
}

async fn read_response(
    flavor: Flavor,
    res: http::Response<hyper::body::Incoming>,
    started: Instant,
) -> Sample {
    let status = res.status().as_u16();
    let cache = cache_label(flavor, res.headers());
    let stamp = res
        .headers()
        .get("x-gen-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let err = res.into_body().collect().await.err().map(|e| e.to_string());
    Sample {
        status,
        latency: started.elapsed(),
        cache,
        stamp,
        recv_ms: now_ms(),
        err,
    }
}

/// `n` clients, each on its own keep-alive connection opened beforehand (round robin over
/// `ports`), then all send one `GET path` at once. The latency runs from each client's send
/// to the end of its body.
pub async fn burst(
    ports: &[u16],
    path: &str,
    n: usize,
    flavor: Flavor,
    timeout: Duration,
) -> Result<Vec<Sample>, String> {
    assert!(!ports.is_empty());
    let mut senders = Vec::with_capacity(n);
    let mut drivers = Vec::with_capacity(n);
    for i in 0..n {
        let port = ports[i % ports.len()];
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .map_err(|_| format!("connect to {port} timed out (client {i})"))?
        .map_err(|e| format!("connect to {port}: {e} (client {i})"))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        drivers.push(tokio::spawn(async move {
            let _ = conn.await;
        }));
        senders.push(sender);
    }
    // Let the servers accept every connection before the clock starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut tasks = Vec::with_capacity(n);
    for mut sender in senders {
        let req = request(path);
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let run = async {
                match sender.send_request(req).await {
                    Ok(res) => read_response(flavor, res, started).await,
                    Err(e) => Sample::failed(started.elapsed(), e.to_string()),
                }
            };
            match tokio::time::timeout(timeout, run).await {
                Ok(s) => s,
                Err(_) => Sample::failed(started.elapsed(), format!("timed out after {timeout:?}")),
            }
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(
            t.await
                .unwrap_or_else(|e| Sample::failed(Duration::ZERO, e.to_string())),
        );
    }
    for d in drivers {
        d.abort();
    }
    Ok(out)
}

pub type Pool = Client<HttpConnector, Empty<Bytes>>;

pub fn pool() -> Pool {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(c)
}

/// One `GET` through a pooled keep-alive client.
pub async fn get(pool: &Pool, port: u16, path: &str, flavor: Flavor, timeout: Duration) -> Sample {
    let started = Instant::now();
    let req = Request::get(format!("http://127.0.0.1:{port}{path}"))
        .header(header::HOST, HOST)
        .body(Empty::new())
        .expect("a valid request");
    let run = async {
        match pool.request(req).await {
            Ok(res) => read_response(flavor, res, started).await,
            Err(e) => Sample::failed(started.elapsed(), e.to_string()),
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(s) => s,
        Err(_) => Sample::failed(started.elapsed(), format!("timed out after {timeout:?}")),
    }
}

/// Open loop: `rps` requests a second for `secs` seconds (exactly `rps * secs` requests),
/// alternating over `ports`, each on the pooled client, not waiting for earlier ones.
pub async fn rate(ports: &[u16], path: &str, rps: u32, secs: u32, flavor: Flavor) -> Vec<Sample> {
    let client = pool();
    let total = (rps * secs) as usize;
    let mut iv = tokio::time::interval(Duration::from_secs(1) / rps);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        iv.tick().await;
        let client = client.clone();
        let port = ports[i % ports.len()];
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            get(&client, port, &path, flavor, Duration::from_secs(15)).await
        }));
    }
    let mut out = Vec::with_capacity(total);
    for t in tasks {
        out.push(
            t.await
                .unwrap_or_else(|e| Sample::failed(Duration::ZERO, e.to_string())),
        );
    }
    out
}

/// Throughput figures.
#[derive(Clone, Debug, Default)]
pub struct Throughput {
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub requests: u64,
    pub non2xx: u64,
    pub socket_errors: String,
    pub tool: &'static str,
}

fn parse_dur(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, mul) = if let Some(v) = s.strip_suffix("us") {
        (v, 1e-6)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60.0)
    } else {
        return None;
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .map(|v| Duration::from_secs_f64(v * mul))
}

pub fn parse_wrk(out: &str) -> Result<Throughput, String> {
    let mut t = Throughput {
        tool: "wrk",
        ..Throughput::default()
    };
    let mut got_rps = false;
    for line in out.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            t.rps = v.trim().parse().map_err(|e| format!("{v:?}: {e}"))?;
            got_rps = true;
        } else if let Some(v) = l.strip_prefix("50%") {
            t.p50 = parse_dur(v).unwrap_or_default();
        } else if let Some(v) = l.strip_prefix("99%") {
            t.p99 = parse_dur(v).unwrap_or_default();
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            t.non2xx = v.trim().parse().unwrap_or(0);
        } else if l.starts_with("Socket errors:") {
            t.socket_errors = l.to_string();
        } else if l.contains("requests in") {
            t.requests = l
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    if got_rps {
        Ok(t)
    } else {
        Err(format!("no Requests/sec in wrk's output:\n{out}"))
    }
}

/// `wrk -t<threads> -c<conns> -d<secs>s --latency` against `port` + `path` (blocking; bounded
/// by a kill after `secs + 30` s). Its output goes to `log`.
pub fn wrk(
    bin: &Path,
    port: u16,
    path: &str,
    threads: u32,
    conns: u32,
    secs: u32,
    log: &Path,
) -> Result<Throughput, String> {
    let out = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = Command::new(bin)
        .arg(format!("-t{threads}"))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency")
        .args(["-H", &format!("Host: {HOST}")])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawn wrk: {e}"))?;
    crate::procs::register(child.id(), false);
    let deadline = Instant::now() + Duration::from_secs(u64::from(secs) + 30);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => break Err("wrk did not finish in time".to_string()),
            Err(e) => break Err(e.to_string()),
        }
    };
    if status.is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
    crate::procs::unregister(child.id());
    let status = status?;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if !status.success() {
        return Err(format!("wrk exited with {status}:\n{text}"));
    }
    parse_wrk(&text)
}

/// The fallback without `wrk`: `conns` keep-alive connections in a closed loop for `secs`.
pub async fn closed_loop(port: u16, path: &str, conns: usize, secs: u64) -> Throughput {
    let done = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (done, bad, path) = (done.clone(), bad.clone(), path.to_string());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await else {
                return lat;
            };
            let _ = stream.set_nodelay(true);
            let Ok((mut sender, conn)) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
            else {
                return lat;
            };
            let driver = tokio::spawn(async move {
                let _ = conn.await;
            });
            // Bounded by the deadline and by a count.
            for _ in 0..10_000_000u64 {
                if Instant::now() >= deadline {
                    break;
                }
                let t0 = Instant::now();
                let res = tokio::time::timeout(Duration::from_secs(5), async {
                    let res = sender.send_request(request(&path)).await?;
                    let ok = res.status().is_success();
                    res.into_body().collect().await?;
                    Ok::<_, hyper::Error>(ok)
                })
                .await;
                match res {
                    Ok(Ok(true)) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        lat.push(t0.elapsed());
                    }
                    Ok(Ok(false)) => {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => break,
                }
            }
            driver.abort();
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(l) = t.await {
            all.extend(l);
        }
    }
    all.sort();
    let n = done.load(Ordering::Relaxed);
    Throughput {
        rps: n as f64 / started.elapsed().as_secs_f64(),
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        requests: n,
        non2xx: bad.load(Ordering::Relaxed),
        socket_errors: String::new(),
        tool: "in-process",
    }
}
