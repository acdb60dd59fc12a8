//! End to end: the built `caching_proxy` example as child processes, in front of an upstream
//! this test runs (it counts calls and concurrent calls), sharing a real `redis-server`.

mod common;

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

fn proxy_bin() -> PathBuf {
    // tests run from target/<profile>/deps; examples are built into target/<profile>/examples.
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("examples").join("caching_proxy");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} is missing: `cargo test` builds the examples first (run the README's test \
                 command)",
                bin.display()
            )
        });
    // `cargo test --test proxy_e2e` alone does not rebuild the example: never test an old one.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = vec![
        root.join("Cargo.toml"),
        root.join("examples/caching_proxy.rs"),
    ];
    let mut dirs = vec![root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                sources.push(path);
            }
        }
    }
    for src in sources {
        let changed = std::fs::metadata(&src).and_then(|m| m.modified());
        assert!(
            changed.map_or(true, |t| t <= built),
            "{} is older than {}: run `cargo build --all-features --examples` (or the README's \
             test command) first",
            bin.display(),
            src.display()
        );
    }
    bin
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A proxy process, killed on drop.
struct Proxy {
    child: Child,
    port: u16,
}

impl Proxy {
    fn start(upstream: SocketAddr, extra: &[&str]) -> Proxy {
        let up = format!("http://{upstream}");
        let mut args = vec!["--upstream", up.as_str()];
        args.extend_from_slice(extra);
        Proxy::spawn(&args, &[])
    }

    /// The proxy with exactly these arguments (and `--listen`) and environment variables.
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Proxy {
        Proxy::spawn_to(args, env, Stdio::null())
    }

    /// [`Proxy::spawn`], its output (the start line, warnings) going to `stdout`; with
    /// `Stdio::piped()`, [`Proxy::output`] reads it.
    fn spawn_to(args: &[&str], env: &[(&str, &str)], stdout: Stdio) -> Proxy {
        Proxy::spawn_at("127.0.0.1", args, env, stdout)
    }

    /// [`Proxy::spawn_to`], listening on `host` (`[::]`: dual stack) at a free port; it is
    /// reached on 127.0.0.1.
    fn spawn_at(host: &str, args: &[&str], env: &[(&str, &str)], stdout: Stdio) -> Proxy {
        let port = free_port();
        let child = Command::new(proxy_bin())
            .args(["--listen", &format!("{host}:{port}")])
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn caching_proxy");
        let mut p = Proxy { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("the proxy exited before listening ({status}); its stderr is above");
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not listen within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the proxy and returns what it printed (spawned with a piped stdout).
    fn output(mut self) -> String {
        self.kill9();
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
        }
        out
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The upstream: `/slow?ms=N` (cacheable for 60 s), `/nocache?ms=N` (`no-store`), `/plain` (no
/// `Cache-Control`) and `/big` (endless, streamed), counting calls and the peak of concurrent
/// calls.
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    /// Requests that arrived with Via, X-Forwarded-For and Forwarded, and no Connection header.
    forwarded: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    /// Every request's body, as it arrived.
    bodies: Arc<std::sync::Mutex<Vec<Bytes>>>,
    /// `/big` bodies dropped before their end (their connection went away).
    abandoned: Arc<AtomicUsize>,
    /// Requests that arrived in HTTP/1.0.
    http10: Arc<AtomicUsize>,
    /// Requests that arrived as HEAD.
    heads: Arc<AtomicUsize>,
    /// While set, every answer is a 500.
    failing: Arc<std::sync::atomic::AtomicBool>,
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `/big`'s body: `left` bytes in 64 KiB chunks, counted in `abandoned` when dropped unfinished.
struct Big {
    left: usize,
    abandoned: Arc<AtomicUsize>,
}

static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];

impl hyper::body::Body for Big {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(CHUNK.len());
        self.left -= n;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            &CHUNK[..n],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

impl Drop for Big {
    fn drop(&mut self) {
        if self.left > 0 {
            self.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Upstream {
    async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let this = this.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let this = this.clone();
                    async move {
                        let n = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
                        let (req, body) = req.into_parts();
                        if req.version == http::Version::HTTP_10 {
                            this.http10.fetch_add(1, Ordering::SeqCst);
                        }
                        if req.method == http::Method::HEAD {
                            this.heads.fetch_add(1, Ordering::SeqCst);
                        }
                        let body = body.collect().await.map(|b| b.to_bytes());
                        this.bodies
                            .lock()
                            .unwrap()
                            .push(body.unwrap_or_else(|e| Bytes::from(format!("error: {e}"))));
                        let h = &req.headers;
                        if h.contains_key("via")
                            && h.get("x-forwarded-for").is_some_and(|v| v == "127.0.0.1")
                            && h.contains_key("forwarded")
                            && !h.contains_key("x-hop")
                        {
                            this.forwarded.fetch_add(1, Ordering::SeqCst);
                        }
                        let r = this.running.fetch_add(1, Ordering::SeqCst) + 1;
                        this.peak.fetch_max(r, Ordering::SeqCst);
                        let ms = req
                            .uri
                            .query()
                            .and_then(|q| q.strip_prefix("ms="))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(200);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        this.running.fetch_sub(1, Ordering::SeqCst);
                        let (cc, body): (_, UpBody) = match req.uri.path() {
                            "/nocache" => (
                                "no-store",
                                Full::new(Bytes::from(format!("call {n}"))).boxed(),
                            ),
                            "/big" => (
                                "max-age=60",
                                Big {
                                    left: usize::MAX,
                                    abandoned: this.abandoned.clone(),
                                }
                                .boxed(),
                            ),
                            "/plain" => ("", Full::new(Bytes::from(format!("call {n}"))).boxed()),
                            _ => (
                                "max-age=60",
                                Full::new(Bytes::from(format!("call {n}"))).boxed(),
                            ),
                        };
                        let mut res = Response::builder();
                        if this.failing.load(Ordering::SeqCst) {
                            let down = Full::new(Bytes::from_static(b"down")).boxed();
                            return Ok(res.status(500).body(down).unwrap());
                        }
                        if !cc.is_empty() {
                            res = res.header("cache-control", cc);
                        }
                        Ok::<_, Infallible>(res.body(body).unwrap())
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(c: &HttpClient, url: String) -> Result<(StatusCode, Bytes), String> {
    // One public host name, as behind a load balancer: the cache key includes it, so requests
    // through both proxies name the same entry.
    let req = Request::get(url)
        .header("host", "app.test")
        .body(Empty::new())
        .unwrap();
    let res = c.request(req).await.map_err(|e| e.to_string())?;
    let status = res.status();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_via_whether_fetched_or_hit() {
    let up = Upstream::default();
    let addr = up.start().await;
    let proxy = Proxy::start(addr, &[]);
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let req = Request::get(proxy.url("/slow?ms=1"))
            .header("host", "app.test")
            .body(Empty::new())
            .unwrap();
        let res = c.request(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let h = res.headers();
        let via: Vec<_> = h.get_all("via").iter().collect();
        assert_eq!(via, ["1.1 tower-stampede"], "one Via of ours");
        let cs = h.get("cache-status").unwrap().to_str().unwrap().to_string();
        seen.push(cs.split("; ").nth(1).unwrap_or_default().to_string());
    }
    assert_eq!(seen, ["fwd=uri-miss", "hit"]);
    assert_eq!(up.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncacheable_url_is_not_serialized() {
    let up = Upstream::default();
    let addr = up.start().await;
    let proxy = Proxy::start(addr, &[]);
    let c = client();
    // The first response reveals the URL is uncacheable (a pass marker is stored).
    let (s, _) = get(&c, proxy.url("/nocache?ms=3000")).await.unwrap();
    assert_eq!(s, StatusCode::OK);
    up.peak.store(0, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let c = c.clone();
        let u = proxy.url("/nocache?ms=3000");
        tasks.push(tokio::spawn(async move { get(&c, u).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().0, StatusCode::OK);
    }
    assert_eq!(up.calls(), 101);
    assert_eq!(
        up.forwarded.load(Ordering::SeqCst),
        101,
        "Via, X-Forwarded-For and Forwarded added; headers named in Connection stripped"
    );
    assert_eq!(
        up.peak.load(Ordering::SeqCst),
        100,
        "the upstream saw 100 requests at once"
    );
}

/// A HEAD on a URL known to be uncacheable goes upstream as HEAD; on a cold URL it is a GET,
/// whose response fills the entry for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_goes_upstream_as_head_only_on_an_uncacheable_url() {
    let up = Upstream::default();
    let proxy = Proxy::start(up.start().await, &[]);
    let c = client();
    for (path, heads, calls) in [
        ("/nocache?ms=1", 0, 1),
        ("/nocache?ms=1", 1, 2),
        ("/nocache?ms=1", 2, 3),
        ("/cacheable?ms=1", 2, 4),
        ("/cacheable?ms=1", 2, 4),
    ] {
        let (s, h, body) = send(&c, http::Method::HEAD, proxy.url(path)).await;
        assert_eq!((s, body.len()), (StatusCode::OK, 0));
        assert!(cache_status(&h).starts_with("tower-stampede; "), "{h:?}");
        assert_eq!(
            (up.heads.load(Ordering::SeqCst), up.calls()),
            (heads, calls),
            "HEAD {path}"
        );
    }
    let (_, _, body) = send(&c, http::Method::GET, proxy.url("/cacheable?ms=1")).await;
    assert_eq!(&body[..], b"call 4");
    assert_eq!(up.calls(), 4);
}

async fn send(
    c: &HttpClient,
    method: http::Method,
    url: String,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("host", "app.test")
        .body(Empty::new())
        .unwrap();
    let res = c.request(req).await.expect("the proxy answers");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

fn cache_status(h: &http::HeaderMap) -> &str {
    h.get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_broken_upstream_is_a_502_and_a_hanging_one_a_504() {
    let c = client();
    // Nothing listens on this port.
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dead = Proxy::start(closed, &[]);
    let (s, h, body) = send(&c, http::Method::GET, dead.url("/x")).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{body:?}");
    assert_eq!(body, "upstream unreachable\n");
    // The proxy's own page: no upstream status to name (RFC 9211 section 2.3).
    assert_eq!(
        cache_status(&h),
        "tower-stampede; fwd=uri-miss; detail=origin-error"
    );

    // Connected, but what comes back is not HTTP, or a head hyper refuses, or nothing.
    let bad = common::raw_server(|mut s| async move {
        use tokio::io::AsyncWriteExt;
        let Some(head) = read_head(&mut s).await else {
            return;
        };
        let reply: &[u8] = if head.starts_with(b"GET /garbage") {
            b"NOT HTTP AT ALL\r\n\r\n"
        } else if head.starts_with(b"GET /two-lengths") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"
        } else {
            b""
        };
        let _ = s.write_all(reply).await;
    })
    .await;
    let bad = Proxy::start(bad, &[]);
    for path in ["/garbage", "/two-lengths", "/closed"] {
        let (s, _, body) = send(&c, http::Method::GET, bad.url(path)).await;
        assert_eq!(s, StatusCode::BAD_GATEWAY, "{path}");
        assert_eq!(body, "upstream sent no valid response\n", "{path}");
    }

    let up = Upstream::default();
    let addr = up.start().await;
    let slow = Proxy::start(addr, &["--fill-timeout", "300ms"]);
    let (s, h, _) = send(&c, http::Method::GET, slow.url("/slow?ms=5000")).await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{}", cache_status(&h));
    assert_eq!(up.calls(), 1);
}

/// An upstream that closes a kept-alive connection as the next request goes on it (its idle
/// timeout racing the reuse) answers nothing; a safe request without a body is sent once more
/// and answered. A POST is not sent again, nor a request whose connection was a new one (the
/// upstream failed that request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_closed_under_a_request_is_retried_once() {
    let heads = Heads::default();
    let seen = heads.clone();
    // Answers the first request of each connection, keeping it alive, then reads the next
    // and closes without an answer.
    let addr = common::raw_server(move |mut s| {
        let seen = seen.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            let Some(head) = read_head(&mut s).await else {
                return;
            };
            let fails = head.starts_with(b"GET /fails ");
            seen.lock().unwrap().push(head);
            if fails {
                return;
            }
            let ok = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\n\r\nok";
            if s.write_all(ok).await.is_err() {
                return;
            }
            if let Some(head) = read_head(&mut s).await {
                seen.lock().unwrap().push(head);
            }
        }
    })
    .await;
    let proxy = Proxy::start(addr, &[]);
    let c = client();
    for path in ["/warm", "/next", "/third"] {
        let (s, h, body) = send(&c, http::Method::GET, proxy.url(path)).await;
        assert_eq!(
            (s, &body[..]),
            (StatusCode::OK, &b"ok"[..]),
            "{path}: {}",
            cache_status(&h)
        );
    }
    let paths: Vec<String> = heads
        .lock()
        .unwrap()
        .iter()
        .map(|h| String::from_utf8_lossy(h.split(|&b| b == b' ').nth(1).unwrap()).into_owned())
        .collect();
    // Each later request went on the kept connection first, then on a new one.
    assert_eq!(paths, ["/warm", "/next", "/next", "/third", "/third"]);

    // A POST that meets the closing connection is not sent again: 502.
    let (s, _, _) = send(&c, http::Method::POST, proxy.url("/post")).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(heads.lock().unwrap().len(), 6, "the POST went once");
    // The pool is empty now: a GET goes on a new connection, which the upstream closes on it.
    let (s, _, _) = send(&c, http::Method::GET, proxy.url("/fails")).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert_eq!(heads.lock().unwrap().len(), 7, "the failed GET went once");
}

/// The client's `Upgrade` is not passed on (no tunnels here), so an upstream's 101 switches to
/// a protocol nobody asked for (RFC 9110 section 15.2.2): 502, never relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_101_is_a_502() {
    let (addr, heads) = recording_upstream_answering(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    )
    .await;
    let proxy = Proxy::start(addr, &[]);
    let res = exchange(
        &proxy,
        "GET /ws HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: upgrade, close\r\n\r\n",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 502"), "{res}");
    assert!(res.contains("upstream switched protocols"), "{res}");
    let heads = heads.lock().unwrap();
    assert_eq!(heads.len(), 1);
    assert!(
        values(&heads[0], "upgrade").is_empty(),
        "Upgrade went upstream"
    );
}

/// An upstream that closes in the middle of a body it announced: the client gets a 502 (not
/// the part that came), nothing is stored, and the proxy says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_upstream_body_is_a_502_never_stored_and_logged() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let addr = common::raw_server(move |mut s| {
        let seen = seen.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            if read_head(&mut s).await.is_some() {
                seen.fetch_add(1, Ordering::SeqCst);
                let res = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 10\r\n\r\nabc";
                let _ = s.write_all(res).await;
            }
        }
    })
    .await;
    let up = format!("http://{addr}");
    let p = Proxy::spawn_to(&["--upstream", &up], &[], Stdio::piped());
    let c = client();
    // The second comes while the failed fill's lease runs: it shares that failure (one
    // upstream call per lease for a failing URL), and finds no `abc` stored.
    for _ in 0..2 {
        let (s, h, body) = send(&c, http::Method::GET, p.url("/t")).await;
        assert_eq!(s, StatusCode::BAD_GATEWAY, "{body:?}");
        assert!(cache_status(&h).contains("detail=origin-error"), "{h:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
    let out = p.output();
    assert!(
        out.contains("the origin's response body failed")
            && out.contains("path=/t")
            && out.contains("end of file"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_post_passes_through_and_invalidates_the_url() {
    let up = Upstream::default();
    let addr = up.start().await;
    let proxy = Proxy::start(addr, &[]);
    let c = client();
    let url = || proxy.url("/slow?ms=1");
    let (_, h, body) = send(&c, http::Method::GET, url()).await;
    assert_eq!(
        (cache_status(&h).contains("stored"), &body[..]),
        (true, &b"call 1"[..])
    );
    let (_, h, body) = send(&c, http::Method::GET, url()).await;
    assert_eq!(
        (cache_status(&h).contains("hit"), &body[..]),
        (true, &b"call 1"[..])
    );
    let (s, h, body) = send(&c, http::Method::POST, url()).await;
    assert_eq!((s, &body[..]), (StatusCode::OK, &b"call 2"[..]));
    assert!(
        cache_status(&h).contains("fwd=bypass"),
        "{}",
        cache_status(&h)
    );
    let (_, h, body) = send(&c, http::Method::GET, url()).await;
    assert_eq!(
        (cache_status(&h).contains("stored"), &body[..]),
        (true, &b"call 3"[..]),
        "the POST invalidated the entry"
    );
    assert_eq!(up.calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_reach_the_upstream_whole() {
    let up = Upstream::default();
    let addr = up.start().await;
    let proxy = Proxy::start(addr, &[]);
    let c: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    // Larger than any one read, and every byte distinct in its position.
    let big: Bytes = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut sent = Vec::new();
    for (method, body) in [
        (http::Method::POST, big),
        (http::Method::PUT, Bytes::from_static(b"small")),
        (http::Method::POST, Bytes::new()),
        (http::Method::GET, Bytes::new()),
    ] {
        let req = Request::builder()
            .method(method.clone())
            .uri(proxy.url("/slow?ms=1"))
            .header("host", "app.test")
            .body(Full::new(body.clone()))
            .unwrap();
        let res = c.request(req).await.expect("the proxy answers");
        assert_eq!(res.status(), StatusCode::OK, "{method}");
        sent.push(body);
    }
    // Chunked bodies, of a GET and a HEAD too (hyper's client sends no body of unknown length
    // for those unless told to chunk it).
    for method in ["GET", "HEAD", "DELETE"] {
        let res = exchange(
            &proxy,
            format!(
                "{method} /slow?ms=1 HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\
                 Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            ),
        )
        .await;
        assert!(res.starts_with("HTTP/1.1 200"), "{method}: {res}");
        sent.push(Bytes::from_static(b"hello world"));
    }
    let got = up.bodies.lock().unwrap().clone();
    assert_eq!(got.len(), sent.len(), "one upstream call per request");
    for (i, (got, sent)) in got.iter().zip(&sent).enumerate() {
        assert!(
            got == sent,
            "request {i}: {} bytes arrived of {}",
            got.len(),
            sent.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_from_the_environment_serves_metrics_and_healthz_never_proxied() {
    let up = Upstream::default();
    let addr = up.start().await;
    let admin = format!("127.0.0.1:{}", free_port());
    let upstream = format!("http://{addr}");
    // Every flag can come from the environment: here the upstream and the admin address.
    let proxy = Proxy::spawn(
        &[],
        &[("STAMPEDE_UPSTREAM", &upstream), ("STAMPEDE_ADMIN", &admin)],
    );
    let c = client();
    let (s, _, body) = send(&c, http::Method::GET, proxy.url("/slow?ms=1")).await;
    assert_eq!((s, &body[..]), (StatusCode::OK, &b"call 1"[..]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&admin).is_err() {
        assert!(Instant::now() < deadline, "the admin port never opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A request that ends in an error (the origin's 500, relayed) is counted as one.
    up.failing.store(true, Ordering::SeqCst);
    let (s, _, _) = send(&c, http::Method::GET, proxy.url("/failing?ms=1")).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    up.failing.store(false, Ordering::SeqCst);
    // Requests the layer does not handle are counted by reason.
    for _ in 0..2 {
        let (s, _, _) = send(&c, http::Method::POST, proxy.url("/slow?ms=1")).await;
        assert_eq!(s, StatusCode::OK);
    }
    let (s, _, _) = send(&c, http::Method::GET, format!("http://{admin}/healthz")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, h, metrics) = send(&c, http::Method::GET, format!("http://{admin}/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert_eq!(s, StatusCode::OK);
    // The text exposition format's type: Prometheus 3 refuses a scrape without a Content-Type.
    assert_eq!(
        h.get("content-type").map(|v| v.to_str().unwrap()),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(
        metrics.contains("stampede_requests_total{outcome=\"stored\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stampede_requests_total{outcome=\"error\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("stampede_requests_total{outcome=\"write_failed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stampede_http_bypass_total{reason=\"method\"} 2"),
        "{metrics}"
    );
    assert_eq!(
        up.calls(),
        4,
        "the admin endpoints never reach the upstream"
    );
}

/// After SIGTERM, while a request in flight finishes, `/healthz` answers 503, so a load
/// balancer stops sending new requests to a proxy that has stopped accepting them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_draining_after_sigterm_while_requests_finish() {
    let up = Upstream::default();
    let addr = up.start().await;
    let admin = format!("127.0.0.1:{}", free_port());
    let mut p = Proxy::start(addr, &["--admin", &admin]);
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&admin).is_err() {
        assert!(Instant::now() < deadline, "the admin port never opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let healthz = format!("http://{admin}/healthz");
    assert_eq!(
        send(&c, http::Method::GET, healthz.clone()).await.0,
        StatusCode::OK
    );
    let first = in_flight(&up, &c, p.url("/slow?ms=3000")).await;
    let killed = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Until the in-flight request is answered, the proxy is draining: a 503 must show.
    let mut seen = Vec::new();
    while !first.is_finished() && p.child.try_wait().unwrap().is_none() {
        let req = Request::get(&healthz).body(Empty::new()).unwrap();
        if let Ok(res) = c.request(req).await {
            seen.push(res.status());
            if res.status() == StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        seen.last(),
        Some(&StatusCode::SERVICE_UNAVAILABLE),
        "{seen:?}"
    );
    let (s, body) = first
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!((s, &body[..]), (StatusCode::OK, &b"call 1"[..]));
    p.kill9();
}

/// The tuning flags reach the layer, from the command line or the environment: `--ttl` caches
/// what the origin gives no freshness (without it, `no-ttl`), and `--max-body` streams a larger
/// body through uncached, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tuning_flags_reach_the_layer() {
    let up = Upstream::default();
    let addr = up.start().await;
    let c = client();
    let plain = Proxy::start(addr, &[]);
    for _ in 0..2 {
        let (_, h, _) = send(&c, http::Method::GET, plain.url("/plain?ms=1")).await;
        assert!(cache_status(&h).ends_with("detail=no-ttl"), "{h:?}");
    }
    assert_eq!(up.calls(), 2);
    let upstream = format!("http://{addr}");
    let tuned = Proxy::spawn(
        &["--max-body", "4"],
        &[("STAMPEDE_UPSTREAM", &upstream), ("STAMPEDE_TTL", "60s")],
    );
    let (_, h, body) = send(&c, http::Method::GET, tuned.url("/plain?ms=1")).await;
    assert_eq!(&body[..], b"call 3", "{h:?}");
    assert!(cache_status(&h).contains("too-large"), "{h:?}");
    let (_, h, body) = send(&c, http::Method::GET, tuned.url("/plain?ms=1")).await;
    assert_eq!(&body[..], b"call 4", "too large to store: {h:?}");
    let fits = Proxy::spawn(
        &["--max-body", "1k", "--upstream", &upstream, "--ttl", "60s"],
        &[],
    );
    for want in ["stored", "; hit"] {
        let (_, h, body) = send(&c, http::Method::GET, fits.url("/plain?ms=1")).await;
        assert_eq!(&body[..], b"call 5");
        assert!(cache_status(&h).contains(want), "{h:?}");
    }
    assert_eq!(up.calls(), 5);
}

/// `--swr` and `--sie` reach the layer too: past `--ttl`, with `--swr` a stale copy is served at
/// once while one refresh runs; with `--sie` and the origin failing, it is served instead of the
/// 500. Without them the 500 goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_flags_reach_the_layer() {
    let up = Upstream::default();
    let addr = up.start().await;
    let c = client();
    let swr = Proxy::start(addr, &["--ttl", "1s", "--swr", "60s"]);
    let sie = Proxy::start(addr, &["--ttl", "1s", "--sie", "60s"]);
    let strict = Proxy::start(addr, &["--ttl", "1s"]);
    for p in [&swr, &sie, &strict] {
        let (_, h, _) = send(&c, http::Method::GET, p.url("/plain?ms=1")).await;
        assert!(cache_status(&h).contains("stored"), "{h:?}");
    }
    assert_eq!(up.calls(), 3);
    // Past the TTL (the entries are a second fresh).
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let (_, h, body) = send(&c, http::Method::GET, swr.url("/plain?ms=1")).await;
    assert_eq!(&body[..], b"call 1");
    assert!(cache_status(&h).contains("stale-while-revalidate"), "{h:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.calls() < 4 {
        assert!(Instant::now() < deadline, "no background refresh");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    up.failing.store(true, Ordering::SeqCst);
    let (s, h, body) = send(&c, http::Method::GET, sie.url("/plain?ms=1")).await;
    assert_eq!((s, &body[..]), (StatusCode::OK, &b"call 2"[..]), "{h:?}");
    assert!(cache_status(&h).contains("stale-if-error"), "{h:?}");
    let (s, _, body) = send(&c, http::Method::GET, strict.url("/plain?ms=1")).await;
    assert_eq!(
        (s, &body[..]),
        (StatusCode::INTERNAL_SERVER_ERROR, &b"down"[..])
    );
    assert_eq!(up.calls(), 6);
}

/// Values that cannot work are refused at start with a message that names them (exit code 2
/// from the argument parser, 1 from the engine's checks), never a panic, never a proxy that
/// runs on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_flag_values_are_refused_at_start() {
    // Held for the test, so `--listen` on it fails.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let cases: [(&[&str], &str); 10] = [
        (&["--ttl", "soon"], "--ttl"),
        (&["--max-body", "1.5m"], "expected a size"),
        (&["--max-body", "99999999999999999999g"], "expected a size"),
        (&["--backoff", "10ms"], "expected MIN..MAX"),
        (&["--backoff", "500ms..10ms"], "min <= max"),
        (
            &["--backoff", "1ms..18446744073709551615s"],
            "at most 100 years",
        ),
        (
            &["--lease", "10s", "--wait-timeout", "5s"],
            "must exceed lease",
        ),
        // A base path would be dropped from every request.
        (&["--upstream", "http://127.0.0.1:9/prefix"], "no path"),
        (&["--upstream", "http://127.0.0.1:9/?a=1"], "no path"),
        (&["--listen", &taken], "--listen 127.0.0.1:"),
    ];
    for (args, says) in cases {
        let mut cmd = Command::new(proxy_bin());
        if !args.contains(&"--listen") {
            cmd.args(["--listen", &format!("127.0.0.1:{}", free_port())]);
        }
        if !args.contains(&"--upstream") {
            cmd.args(["--upstream", "http://127.0.0.1:9"]);
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn caching_proxy");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{args:?}: the proxy started instead of refusing");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{args:?}: {status}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        // The error's message, not its Debug form (`ConfigError("...")`, `Os { code: 98 ..`).
        assert!(
            !err.contains("Error(") && !err.contains("Os {"),
            "{args:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_upstream_it_runs_its_demo_upstream() {
    let proxy = Proxy::spawn(&[], &[]);
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let c = c.clone();
        let u = proxy.url("/slow");
        tasks.push(tokio::spawn(
            async move { send(&c, http::Method::GET, u).await },
        ));
    }
    for t in tasks {
        let (s, _, body) = t.await.unwrap();
        assert_eq!((s, &body[..]), (StatusCode::OK, &b"slow response #1\n"[..]));
    }
    let (_, _, count) = send(&c, http::Method::GET, proxy.url("/count")).await;
    let count = String::from_utf8_lossy(&count);
    assert!(count.starts_with("upstream calls: 1 (/slow)"), "{count}");
}

/// A request head read off `s` by a hand-written upstream; `None` if it closes first.
async fn read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    Some(got)
}

/// Reads `s` until the proxy closes it (end of stream or reset): what it sent before, or `None`
/// if it was still open after `within`.
async fn until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(got)
}

/// A connection to the proxy on which `head` has been sent (as much of it as the proxy took: a
/// refused head may be answered, and the connection closed, before it is all sent).
async fn connect(p: &Proxy, head: impl AsRef<[u8]>) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
        .await
        .unwrap();
    let _ = s.write_all(head.as_ref()).await;
    s
}

/// `head` sent on a connection of its own: all the proxy answered until it closed, as text.
async fn exchange(p: &Proxy, head: impl AsRef<[u8]>) -> String {
    let mut s = connect(p, head).await;
    let got = until_closed(&mut s, Duration::from_secs(20))
        .await
        .expect("the proxy answers and closes");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_unfinished_connections_are_closed_but_not_a_slow_request() {
    let up = Upstream::default();
    let proxy = Proxy::start(up.start().await, &["--idle-timeout", "1s"]);
    let mut silent = connect(&proxy, "").await;
    let mut unfinished = connect(&proxy, "GET /slow?ms=0 HTTP/1.1\r\nHost: app.test\r\n").await;
    let mut kept_alive = connect(&proxy, "GET /slow?ms=0 HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    // Served for 3 s, three times the idle timeout: a request being served is progress.
    let mut slow = connect(
        &proxy,
        "GET /slow?ms=3000 HTTP/1.1\r\nHost: app.test\r\n\r\n",
    )
    .await;
    // Not closed early (a loaded machine can only make the close later).
    assert!(until_closed(&mut silent, Duration::from_millis(300))
        .await
        .is_none());
    let bound = Duration::from_secs(20);
    for (name, s, answered) in [
        ("silent", &mut silent, false),
        ("unfinished head", &mut unfinished, false),
        ("idle after its response", &mut kept_alive, true),
        ("slow request", &mut slow, true),
    ] {
        let got = until_closed(s, bound)
            .await
            .unwrap_or_else(|| panic!("{name}: still open after {bound:?}"));
        let got = String::from_utf8_lossy(&got);
        if answered {
            assert!(got.starts_with("HTTP/1.1 200"), "{name}: {got}");
            assert!(
                got.ends_with("call 1") || got.ends_with("call 2"),
                "{name}: {got}"
            );
        } else {
            assert!(got.is_empty(), "{name}: {got}");
        }
    }
    assert_eq!(up.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_the_upstream_body_with_it() {
    let up = Upstream::default();
    let proxy = Proxy::start(up.start().await, &["--idle-timeout", "1s"]);
    // An endless body: whatever the sockets on the way hold, the proxy's writes stall.
    let mut s = connect(&proxy, "GET /big?ms=0 HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while up.abandoned.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the stalled response still holds the upstream's body"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.calls(), 1);
    let got = until_closed(&mut s, Duration::from_secs(20))
        .await
        .expect("the stalled connection is closed");
    assert!(got.starts_with(b"HTTP/1.1 200"));
}

/// One request on its own connection (`Connection: close`): the status line and `Cache-Status`.
async fn raw_get(p: &Proxy, target: &[u8]) -> (String, String) {
    let mut head = b"GET ".to_vec();
    head.extend_from_slice(target);
    head.extend_from_slice(b" HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
    let got = exchange(p, head).await;
    let status = got.lines().next().unwrap_or("").to_string();
    let cs = got
        .lines()
        .find_map(|l| l.strip_prefix("cache-status: "))
        .unwrap_or("")
        .to_string();
    (status, cs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_and_odd_request_targets_get_a_clear_answer_and_the_proxy_stays_up() {
    let up = Upstream::default();
    let proxy = Proxy::start(up.start().await, &[]);
    let long = format!("/slow?ms=0&q={}", "a%2F".repeat(2048)).into_bytes();
    let (status, cs) = raw_get(&proxy, &long).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(cs.contains("stored"), "{cs}");
    let (status, cs) = raw_get(&proxy, &long).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(cs.contains("hit"), "{cs}");
    assert_eq!(up.calls(), 1);

    for (target, want) in [
        // Beyond what a URI can hold (`http` refuses over 64 KiB).
        (
            format!("/slow?q={}", "b".repeat(200_000)).into_bytes(),
            "414",
        ),
        // Beyond hyper's buffer for a request head (about 408 KiB).
        (
            format!("/slow?q={}", "c".repeat(600_000)).into_bytes(),
            "431",
        ),
        // Bytes that are not a URI.
        (b"/slow?q=\xff\xfe".to_vec(), "400"),
        // The asterisk-form, which only OPTIONS may use.
        (b"*".to_vec(), "400"),
        // Percent-encoded NUL and 0xFF, and raw UTF-8, are a URI: passed on.
        (b"/slow?ms=0&q=%FF%00".to_vec(), "200"),
        ("/slow?ms=0&q=\u{fc}\u{f8}".as_bytes().to_vec(), "200"),
    ] {
        let (status, _) = raw_get(&proxy, &target).await;
        assert!(
            status.starts_with(&format!("HTTP/1.1 {want}")),
            "{}...: {status}",
            String::from_utf8_lossy(&target[..target.len().min(20)])
        );
    }
    assert_eq!(up.calls(), 3);
    let (status, _) = raw_get(&proxy, b"/slow?ms=0").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(up.calls(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_the_proxys_own_http_version() {
    // An HTTP/1.0 upstream, as Python's http.server is by default.
    let addr = common::raw_server(|mut s| async move {
        use tokio::io::AsyncWriteExt;
        let Some(head) = read_head(&mut s).await else {
            return;
        };
        let cc = if head.starts_with(b"GET /nocache") {
            "no-store"
        } else {
            "max-age=60"
        };
        let res = format!("HTTP/1.0 200 OK\r\nCache-Control: {cc}\r\nContent-Length: 2\r\n\r\nok");
        let _ = s.write_all(res.as_bytes()).await;
    })
    .await;
    let proxy = Proxy::start(addr, &[]);
    // Passed through, stored, then a hit: each answered in the proxy's own HTTP/1.1 (RFC 9110
    // section 6.2), its Via naming the version it was received in (section 7.6.3).
    for (target, want) in [
        ("/nocache", "no-store"),
        ("/cached", "stored"),
        ("/cached", "hit"),
    ] {
        let head = format!("GET {target} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
        let got = exchange(&proxy, head).await;
        assert!(got.starts_with("HTTP/1.1 200 OK"), "{target}: {got}");
        assert!(
            values(got.as_bytes(), "cache-status")
                .concat()
                .contains(want),
            "{target}: {got}"
        );
        assert_eq!(
            values(got.as_bytes(), "via"),
            ["1.0 tower-stampede"],
            "{target}: {got}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_client_is_answered_in_10_and_forwarded_in_11() {
    let up = Upstream::default();
    let proxy = Proxy::start(up.start().await, &[]);
    for target in ["/nocache?ms=0", "/slow?ms=0", "/slow?ms=0"] {
        let head = format!("GET {target} HTTP/1.0\r\nHost: app.test\r\n\r\n");
        // A 1.0 connection is closed after its response.
        let got = exchange(&proxy, &head).await;
        assert!(got.starts_with("HTTP/1.0 200 OK"), "{target}: {got}");
    }
    assert_eq!(up.calls(), 2);
    assert_eq!(up.http10.load(Ordering::SeqCst), 0);
    // Its Via names the version it was received in (RFC 9110 section 7.6.3).
    let (addr, heads) = recording_upstream().await;
    let proxy = Proxy::start(addr, &[]);
    let got = exchange(&proxy, "GET /v HTTP/1.0\r\nHost: app.test\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.0 200 OK"), "{got}");
    {
        let heads = heads.lock().unwrap();
        assert!(heads[0].starts_with(b"GET /v HTTP/1.1\r\n"));
        assert_eq!(values(&heads[0], "via"), ["1.0 tower-stampede"]);
    }
    // Without a Host (1.0 may leave it out) a client's X-Forwarded-Host is dropped, not passed.
    let got = exchange(
        &proxy,
        "GET /w HTTP/1.0\r\nX-Forwarded-Host: evil.test\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.0 200 OK"), "{got}");
    let heads = heads.lock().unwrap();
    assert_eq!(heads.len(), 2);
    assert!(values(&heads[1], "x-forwarded-host").is_empty());
}

type Heads = Arc<std::sync::Mutex<Vec<Vec<u8>>>>;

/// A hand-written upstream that keeps each request head as it arrived and answers `ok`,
/// cacheable for 60 s.
async fn recording_upstream() -> (SocketAddr, Heads) {
    recording_upstream_answering(
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\n\r\nok",
    )
    .await
}

/// [`recording_upstream`] answering every request with `res`.
async fn recording_upstream_answering(res: &'static [u8]) -> (SocketAddr, Heads) {
    let heads = Heads::default();
    let seen = heads.clone();
    let addr = common::raw_server(move |mut s| {
        let seen = seen.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            while let Some(head) = read_head(&mut s).await {
                seen.lock().unwrap().push(head);
                if s.write_all(res).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, heads)
}

/// Each value of header `name` in a request head, as text (a byte that is not UTF-8 shown as
/// U+FFFD).
fn values(head: &[u8], name: &str) -> Vec<String> {
    head.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter_map(|l| {
            let (n, v) = l.split_at(l.iter().position(|&b| b == b':')?);
            n.eq_ignore_ascii_case(name.as_bytes())
                .then(|| String::from_utf8_lossy(v[1..].trim_ascii()).into_owned())
        })
        .collect()
}

/// Hop-by-hop headers (RFC 9110 section 7.6.1: the fixed ones and those `Connection` names) are
/// stripped both ways: from the request before it goes upstream, and from the response whether
/// it was fetched, stored and hit, or passed through for a POST. Others pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let (addr, heads) = recording_upstream_answering(
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nConnection: x-resp-hop\r\n\
          X-Resp-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n\
          X-Resp-Keep: 1\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let proxy = Proxy::start(addr, &[]);
    let request = |method: &str| {
        format!(
            "{method} /h HTTP/1.1\r\nHost: app.test\r\nConnection: close, x-req-hop\r\n\
             X-Req-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eA==\r\n\
             TE: trailers\r\nX-Req-Keep: 1\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let mut statuses = Vec::new();
    for method in ["GET", "GET", "POST"] {
        let answer = exchange(&proxy, request(method)).await;
        let (head, body) = answer.split_once("\r\n\r\n").expect("a response head");
        let head = head.as_bytes();
        for hop in ["x-resp-hop", "keep-alive", "proxy-authenticate"] {
            assert!(values(head, hop).is_empty(), "{method}: {hop} in\n{answer}");
        }
        // What the proxy says of its own connection to this client, nothing of the upstream's.
        assert_eq!(values(head, "connection"), ["close"], "{answer}");
        assert_eq!(values(head, "x-resp-keep"), ["1"], "{answer}");
        assert_eq!(body, "ok");
        statuses.push(values(head, "cache-status").concat());
    }
    assert!(statuses[0].contains("stored"), "{statuses:?}");
    assert!(statuses[1].contains("; hit"), "{statuses:?}");
    assert!(statuses[2].contains("detail=method"), "{statuses:?}");
    let heads = heads.lock().unwrap();
    assert_eq!(heads.len(), 2, "the GET fill and the POST");
    for head in heads.iter() {
        for hop in ["x-req-hop", "keep-alive", "proxy-authorization", "te"] {
            assert!(
                values(head, hop).is_empty(),
                "{hop} went upstream:\n{}",
                String::from_utf8_lossy(head)
            );
        }
        assert!(!values(head, "connection").concat().contains("x-req-hop"));
        assert_eq!(values(head, "x-req-keep"), ["1"]);
    }
}

/// A transfer coding other than `chunked` (RFC 9112 section 7) is not passed on as if the bytes
/// were the content: hyper takes the chunked framing off and the coding's name went with the
/// other hop-by-hop headers, so an upstream got gzip bytes as the body, and a client got (and
/// the cache kept) them as the content. A request with one is a 501 (section 6.1; nginx does the
/// same), a response with one a 502, never stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_coding_other_than_chunked_is_refused_both_ways() {
    let up = Upstream::default();
    let proxy = Proxy::start(up.start().await, &[]);
    let post = |te: &str| {
        format!(
            "POST /slow?ms=0 HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: {te}\r\n\
             Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
    };
    for te in ["gzip, chunked", "chunked, chunked", "x-custom,chunked"] {
        let got = exchange(&proxy, post(te)).await;
        assert!(got.starts_with("HTTP/1.1 501 "), "{te}: {got}");
        assert!(got.contains("transfer coding"), "{te}: {got}");
    }
    assert_eq!(up.calls(), 0, "none went upstream");
    // The plain chunked framing, in any case, is a body like any other.
    for te in ["chunked", "Chunked"] {
        let got = exchange(&proxy, post(te)).await;
        assert!(got.starts_with("HTTP/1.1 200 "), "{te}: {got}");
    }
    assert_eq!(up.calls(), 2);
    assert_eq!(*up.bodies.lock().unwrap(), [&b"hello"[..], &b"hello"[..]]);

    // An upstream answering with one: `gzip, chunked` (hyper takes the chunks off), or `gzip`
    // alone (the body runs to the connection's close).
    for (te, body) in [("gzip, chunked", "2\r\nok\r\n0\r\n\r\n"), ("gzip", "ok")] {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let addr = common::raw_server(move |mut s| {
            let calls = counted.clone();
            async move {
                use tokio::io::AsyncWriteExt;
                if read_head(&mut s).await.is_some() {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let res = format!(
                        "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n\
                         Transfer-Encoding: {te}\r\n\r\n{body}"
                    );
                    let _ = s.write_all(res.as_bytes()).await;
                }
            }
        })
        .await;
        let proxy = Proxy::start(addr, &[]);
        let get = "GET /c HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n";
        let got = exchange(&proxy, get).await;
        assert!(got.starts_with("HTTP/1.1 502 "), "{te}: {got}");
        assert!(got.contains("transfer coding"), "{te}: {got}");
        // Not stored: a failure again (the failed fill's, inside its lease), not a hit.
        let got = exchange(&proxy, get).await;
        assert!(got.starts_with("HTTP/1.1 502 "), "{te}: {got}");
        assert!(got.contains("detail=origin-error"), "{te}: {got}");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{te}");
    }
}

/// RFC 9112 section 6.3: an upstream response with both `Transfer-Encoding: chunked` and a
/// `Content-Length` is framed by its chunks, and an intermediary removes the `Content-Length`
/// before forwarding. hyper's client keeps the header, so the proxy framed the body by the
/// upstream's wrong length: a passed response was cut short, and a buffered one was sent with a
/// length that did not match its body. Two requests on one connection, every way a response
/// goes: each answer must arrive whole and framed right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_beside_chunked_framing_is_not_passed_on() {
    for (what, res) in [
        (
            "a 5xx (buffered, not stored)",
            &b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\
               Content-Length: 2\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        ),
        (
            "no-store (streamed)",
            b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nTransfer-Encoding: chunked\r\n\
              Content-Length: 2\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "max-age (stored, then a hit)",
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n\
              Content-Length: 2\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ] {
        let (addr, heads) = recording_upstream_answering(res).await;
        let proxy = Proxy::start(addr, &[]);
        let two = "GET /te HTTP/1.1\r\nHost: app.test\r\n\r\n\
                   GET /te HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n";
        let got = exchange(&proxy, two).await;
        let answers: Vec<&str> = got.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(answers.len(), 2, "{what}: {got}");
        // Each answer framed by its own body: the upstream's `hello`, or (after a 5xx, inside
        // the failed fill's lease) the layer's own error page.
        for (i, a) in answers.iter().enumerate() {
            let (head, body) = a.split_once("\r\n\r\n").expect("a response head");
            let body = match values(head.as_bytes(), "content-length").as_slice() {
                [] => body
                    .strip_suffix("\r\n0\r\n\r\n")
                    .and_then(|b| b.split_once("\r\n"))
                    .map(|(_, b)| b)
                    .unwrap_or("?"),
                [n] => {
                    assert_eq!(n.parse::<usize>().ok(), Some(body.len()), "{what}: {got}");
                    body
                }
                more => panic!("{what}: framed by {more:?}: {got}"),
            };
            if i == 0 || !what.starts_with("a 5xx") {
                assert_eq!(body, "hello", "{what}: {got}");
            }
        }
        let fetched = heads.lock().unwrap().len();
        let want = if what.starts_with("no-store") { 2 } else { 1 };
        assert_eq!(fetched, want, "{what}: {got}");
    }
}

/// What `Connection` names is not forwarded (RFC 9110 section 7.6.1), so the cache keys and
/// varies the request on what goes upstream. Before, the layer saw the named headers and the
/// upstream did not: a client sending `Accept-Language: fr` with `Connection: accept-language`
/// had the upstream's answer to a request without a language stored as the `fr` variant, and
/// one naming `Host` had the upstream's default host's page stored under its Host. Either
/// poisoned the entry every later client hit. Host and the body's framing headers are never
/// dropped for being named (a first fix dropped them before the layer too: an absolute-form
/// target still lost its Host upstream, and a named Transfer-Encoding got past the 501).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_that_connection_names_neither_key_nor_vary_the_cache() {
    let (addr, heads) = recording_upstream_answering(
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nVary: Accept-Language\r\n\
          Content-Length: 2\r\n\r\nok",
    )
    .await;
    let proxy = Proxy::start(addr, &[]);
    let get = |extra: &str| {
        format!("GET /v HTTP/1.1\r\nHost: app.test\r\n{extra}Connection: close\r\n\r\n")
    };
    // A client naming its Accept-Language in Connection: the upstream gets none.
    let first = exchange(
        &proxy,
        get("Accept-Language: fr\r\nConnection: accept-language\r\n"),
    )
    .await;
    assert!(first.starts_with("HTTP/1.1 200 "), "{first}");
    // A French client after it: its variant was never filled, so it goes upstream with it.
    let fr = exchange(&proxy, get("Accept-Language: fr\r\n")).await;
    let cs = values(fr.as_bytes(), "cache-status").concat();
    assert!(
        !cs.contains("; hit"),
        "the fr variant held a languageless answer: {fr}"
    );
    {
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len(), 2, "{fr}");
        assert!(values(&heads[0], "accept-language").is_empty());
        assert_eq!(values(&heads[1], "accept-language"), ["fr"]);
    }
    // A client naming Host, in origin form and in absolute form: Host is not this hop's to drop.
    // Every request goes upstream with the Host the cache keyed it on, so what is stored under
    // victim.test is victim.test's page, never the upstream's default host's.
    for (i, named) in [
        "GET /h HTTP/1.1\r\nHost: victim.test\r\nConnection: close, host\r\n\r\n",
        "GET http://victim.test/k HTTP/1.1\r\nHost: victim.test\r\nConnection: close, host\r\n\r\n",
    ]
    .into_iter()
    .enumerate()
    {
        let got = exchange(&proxy, named).await;
        assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len(), 3 + i, "{got}");
        assert_eq!(values(&heads[2 + i], "host"), ["victim.test"], "{named}");
    }
    // Nor are the body's framing headers: `Transfer-Encoding: gzip, chunked` named in
    // Connection is still refused (501), not passed on as if gzip bytes were the content.
    let post = "POST /p HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: gzip, chunked\r\n\
                Connection: close, transfer-encoding\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let got = exchange(&proxy, post).await;
    assert!(got.starts_with("HTTP/1.1 501 "), "{got}");
    assert_eq!(heads.lock().unwrap().len(), 4, "nothing more went upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_keep_the_whole_chain_and_quote_the_host() {
    let (addr, heads) = recording_upstream().await;
    let proxy = Proxy::start(addr, &[]);
    // Two X-Forwarded-For lines, one with a byte that is not UTF-8.
    let got = exchange(
        &proxy,
        b"GET /a HTTP/1.1\r\nHost: app.test:8080\r\nX-Forwarded-For: 10.0.0.1\r\n\
          X-Forwarded-For: 10.0.0.2, \x80x\r\nX-Forwarded-Host: evil.test\r\n\
          Connection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
    {
        let seen = heads.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            values(&seen[0], "x-forwarded-for"),
            ["10.0.0.1, 10.0.0.2, \u{fffd}x, 127.0.0.1"],
            "the whole chain, then the client"
        );
        assert_eq!(
            values(&seen[0], "forwarded"),
            [r#"for=127.0.0.1;proto=http;host="app.test:8080""#],
            "RFC 7239: the host a quoted-string (it may hold a colon)"
        );
        // The Host the cache keyed it on, not the one the client named: an origin building
        // links from it would have stored them under app.test for everyone.
        assert_eq!(values(&seen[0], "x-forwarded-host"), ["app.test:8080"]);
    }
    // On a dual-stack listener an IPv4 client is an IPv4-mapped IPv6 address to the socket
    // (`::ffff:127.0.0.1`); the upstream is told the IPv4 address it is.
    let dual = Proxy::spawn_at(
        "[::]",
        &["--upstream", &format!("http://{addr}")],
        &[],
        Stdio::null(),
    );
    let got = exchange(
        &dual,
        "GET /b HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
    let heads = heads.lock().unwrap();
    assert_eq!(heads.len(), 2);
    assert_eq!(values(&heads[1], "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(
        values(&heads[1], "forwarded"),
        [r#"for=127.0.0.1;proto=http;host="app.test""#]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_per_request_and_an_absolute_target_names_it() {
    let (addr, heads) = recording_upstream().await;
    let proxy = Proxy::start(addr, &[]);
    // RFC 9112 section 3.2: two Hosts, none in HTTP/1.1, or one that is not a host: 400, and
    // nothing goes upstream.
    for head in [
        "GET /p HTTP/1.1\r\nHost: victim.test\r\nHost: attacker.test\r\nConnection: close\r\n\r\n",
        "GET /p HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /p HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
        "GET /p HTTP/1.1\r\nHost: user@victim.test\r\nConnection: close\r\n\r\n",
    ] {
        let got = exchange(&proxy, head).await;
        assert!(got.starts_with("HTTP/1.1 400"), "{head:?}: {got}");
    }
    assert_eq!(heads.lock().unwrap().len(), 0);
    // Section 3.2.2: the absolute-form's authority replaces Host, so what is stored under
    // victim.test's key was asked of the upstream for victim.test.
    let got = exchange(
        &proxy,
        "GET http://victim.test/p HTTP/1.1\r\nHost: attacker.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let got = exchange(
        &proxy,
        "GET /p HTTP/1.1\r\nHost: victim.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(got.contains("hit"), "{got}");
    // HTTP/1.0 may leave Host out.
    let got = exchange(&proxy, "GET /q HTTP/1.0\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.0 200"), "{got}");
    let heads = heads.lock().unwrap();
    assert_eq!(heads.len(), 2);
    assert_eq!(values(&heads[0], "host"), ["victim.test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_and_max_forwards_is_honoured() {
    let (addr, heads) = recording_upstream().await;
    let proxy = Proxy::start(addr, &[]);
    for (head, want) in [
        (
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 501",
        ),
        // RFC 9110 section 7.6.2: at 0 the proxy is the final recipient.
        (
            "OPTIONS /p HTTP/1.1\r\nHost: app.test\r\nMax-Forwards: 0\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 200",
        ),
        (
            "TRACE /p HTTP/1.1\r\nHost: app.test\r\nMax-Forwards: 0\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 405",
        ),
    ] {
        let got = exchange(&proxy, head).await;
        assert!(got.starts_with(want), "{head:?}: {got}");
    }
    assert_eq!(heads.lock().unwrap().len(), 0, "nothing went upstream");
    // Otherwise forwarded, one less.
    let got = exchange(
        &proxy,
        "TRACE /p HTTP/1.1\r\nHost: app.test\r\nMax-Forwards: 3\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let heads = heads.lock().unwrap();
    assert_eq!(values(&heads[0], "max-forwards"), ["2"]);
}

/// Sends a request in the background and returns once it has reached the upstream.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
async fn in_flight(
    up: &Upstream,
    c: &HttpClient,
    url: String,
) -> tokio::task::JoinHandle<Result<(StatusCode, Bytes), String>> {
    let before = up.calls();
    let c = c.clone();
    let task = tokio::spawn(async move { get(&c, url).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.calls() == before {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task
}

/// An upstream and two proxies sharing `store`, each with its own extra flags.
#[cfg(any(feature = "redis", feature = "memcached"))]
async fn two_proxies(store: &str, a_extra: &[&str], b_extra: &[&str]) -> (Upstream, Proxy, Proxy) {
    let up = Upstream::default();
    let addr = up.start().await;
    let start = |extra: &[&str]| {
        let mut args = vec!["--store", store];
        args.extend_from_slice(extra);
        Proxy::start(addr, &args)
    };
    let (a, b) = (start(a_extra), start(b_extra));
    (up, a, b)
}

/// Two proxies sharing `store`, the upstream failing: once a fill through A has failed, B
/// answers from what is left at once (its stale-if-error copy, else a 502 saying the origin
/// failed elsewhere), with no upstream call and no wait for A's lease (10 s) to end. Before,
/// B found the lease held, waited it out, and called the upstream itself.
#[cfg(any(feature = "redis", feature = "memcached"))]
async fn a_failure_through_one_proxy_is_the_others_fallback_at_once(store: &str) {
    let flags = [
        "--ttl",
        "1s",
        "--sie",
        "60s",
        "--lease",
        "10s",
        "--wait-timeout",
        "12s",
    ];
    let (up, a, b) = two_proxies(store, &flags, &flags).await;
    let c = client();
    let (_, h, _) = send(&c, http::Method::GET, a.url("/plain?ms=1")).await;
    assert!(cache_status(&h).contains("stored"), "{h:?}");
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    up.failing.store(true, Ordering::SeqCst);
    // Well under the lease, which a wait would have to see out.
    let bound = Duration::from_secs(5);
    let (s, h, body) = send(&c, http::Method::GET, a.url("/plain?ms=1")).await;
    assert_eq!((s, &body[..]), (StatusCode::OK, &b"call 1"[..]), "{h:?}");
    assert!(cache_status(&h).contains("stale-if-error"), "{h:?}");
    assert_eq!(up.calls(), 2, "A's failed fill");
    let (s, h, body) =
        tokio::time::timeout(bound, send(&c, http::Method::GET, b.url("/plain?ms=1")))
            .await
            .expect("B answered without waiting out A's failed lease");
    assert_eq!((s, &body[..]), (StatusCode::OK, &b"call 1"[..]), "{h:?}");
    assert!(cache_status(&h).contains("stale-if-error"), "{h:?}");
    assert_eq!(up.calls(), 2, "B did not call the upstream");
    // A URL with nothing stored: A relays the origin's 500, B says where it failed.
    let (s, _, body) = send(&c, http::Method::GET, a.url("/slow?ms=1")).await;
    assert_eq!(
        (s, &body[..]),
        (StatusCode::INTERNAL_SERVER_ERROR, &b"down"[..])
    );
    let (s, h, _) = tokio::time::timeout(bound, send(&c, http::Method::GET, b.url("/slow?ms=1")))
        .await
        .expect("B answered without waiting out A's failed lease");
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{h:?}");
    assert!(
        cache_status(&h).contains("origin-failed-elsewhere"),
        "{h:?}"
    );
    assert_eq!(
        up.calls(),
        3,
        "one upstream call per failed lease, none from B"
    );
}

#[cfg(feature = "redis")]
mod with_redis {
    use super::*;
    use common::servers::Server;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failure_through_one_proxy_sharing_redis_is_the_others_fallback_at_once() {
        let redis = Server::redis();
        a_failure_through_one_proxy_is_the_others_fallback_at_once(&redis.url()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_proxies_sharing_redis_reach_the_upstream_once() {
        let redis = Server::redis();
        let (up, a, b) = two_proxies(&redis.url(), &[], &[]).await;
        let c = client();
        let mut tasks = Vec::new();
        for i in 0..500 {
            let c = c.clone();
            let u = if i % 2 == 0 {
                a.url("/slow?ms=500")
            } else {
                b.url("/slow?ms=500")
            };
            tasks.push(tokio::spawn(async move { get(&c, u).await }));
        }
        for t in tasks {
            let (s, body) = t.await.unwrap().unwrap();
            assert_eq!((s, &body[..]), (StatusCode::OK, &b"call 1"[..]));
        }
        assert_eq!(
            up.calls(),
            1,
            "500 requests through two proxies, one upstream call"
        );
    }

    /// Both proxies run with their default near cache (records kept in process, invalidated by
    /// Redis): a POST through one must reach what the other keeps.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_post_through_one_proxy_invalidates_what_the_other_keeps() {
        let redis = Server::redis();
        let (up, a, b) = two_proxies(&redis.url(), &[], &[]).await;
        let c = client();
        let (_, h, body) = send(&c, http::Method::GET, b.url("/slow?ms=1")).await;
        assert_eq!(
            (cache_status(&h).contains("stored"), &body[..]),
            (true, &b"call 1"[..])
        );
        // Hits on B until they stop reaching Redis (B keeps the entry).
        let before: u64 = get_calls(&redis);
        let mut kept = false;
        for _ in 0..100 {
            let mark = get_calls(&redis);
            for _ in 0..10 {
                let (_, h, body) = send(&c, http::Method::GET, b.url("/slow?ms=1")).await;
                assert!(cache_status(&h).contains("hit"), "{}", cache_status(&h));
                assert_eq!(&body[..], b"call 1");
            }
            if get_calls(&redis) == mark {
                kept = true;
                break;
            }
        }
        assert!(
            kept,
            "B's hits kept reaching Redis (GETs since the fill: {})",
            get_calls(&redis) - before
        );
        let (s, _, body) = send(&c, http::Method::POST, a.url("/slow?ms=1")).await;
        assert_eq!((s, &body[..]), (StatusCode::OK, &b"call 2"[..]));
        // B's copy is fresh for 60 s; only Redis's invalidation can make B fetch again.
        let mut refetched = false;
        for _ in 0..200 {
            let (_, h, body) = send(&c, http::Method::GET, b.url("/slow?ms=1")).await;
            if &body[..] != b"call 1" {
                assert_eq!(&body[..], b"call 3", "{}", cache_status(&h));
                refetched = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            refetched,
            "B served its kept copy after A's POST invalidated the URL"
        );
        assert_eq!(up.calls(), 3);
    }

    /// `--prefix` names every key the proxy writes; the default prefix is then unused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_prefix_flag_names_the_keys_in_redis() {
        let redis = Server::redis();
        let up = Upstream::default();
        let store = redis.url();
        let p = Proxy::start(up.start().await, &["--store", &store, "--prefix", "myapp:"]);
        let (_, h, _) = send(&client(), http::Method::GET, p.url("/slow?ms=1")).await;
        assert!(cache_status(&h).contains("stored"), "{h:?}");
        assert_ne!(redis.raw("KEYS myapp:*"), "*0\r\n");
        assert_eq!(redis.raw("KEYS ts:*"), "*0\r\n");
    }

    /// `GET`s the server has run (`INFO commandstats`).
    fn get_calls(redis: &Server) -> u64 {
        let info = redis.raw("INFO commandstats");
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_finishes_the_fill_in_flight_and_leaves_no_lease() {
        sigterm_with_a_fill_in_flight(true).await;
    }

    /// The fill of a client that has gone is not the connection's any more, only the engine's:
    /// the proxy drains it on SIGTERM, so its entry is stored and its lease released rather than
    /// left to expire.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_drains_a_fill_whose_client_has_gone() {
        sigterm_with_a_fill_in_flight(false).await;
    }

    /// SIGTERM while a fill runs, its client still waiting for it or gone: the proxy exits by
    /// itself, the entry is stored, and no lease is left behind.
    async fn sigterm_with_a_fill_in_flight(client_stays: bool) {
        let redis = Server::redis();
        let up = Upstream::default();
        let addr = up.start().await;
        let store = redis.url();
        // A long lease: a lease left behind would still be there when we look.
        let args = [
            "--store",
            store.as_str(),
            "--lease",
            "20s",
            "--wait-timeout",
            "30s",
        ];
        let mut a = Proxy::start(addr, &args);
        let c = client();
        let first = if client_stays {
            Some(in_flight(&up, &c, a.url("/slow?ms=1500")).await)
        } else {
            let gone = connect(&a, "GET /slow?ms=1500 HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
            let deadline = Instant::now() + Duration::from_secs(10);
            while up.calls() == 0 {
                assert!(
                    Instant::now() < deadline,
                    "the fill never reached the upstream"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            drop(gone);
            None
        };
        let killed = Command::new("kill")
            .args(["-TERM", &a.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        if let Some(first) = first {
            let (s, body) = first
                .await
                .unwrap()
                .expect("the request in flight is answered");
            assert_eq!((s, &body[..]), (StatusCode::OK, &b"call 1"[..]));
        }
        // The process exits by itself, successfully (the bound only keeps a hang from hanging
        // the suite).
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = a.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "exit status {status}");
        // Its fill was stored and its lease released: nothing of it is left but the entry.
        let leases = redis.raw("KEYS *:l");
        assert_eq!(leases, "*0\r\n", "no lease left behind");
        let b = Proxy::start(addr, &args);
        let (s, body) = get(&c, b.url("/slow?ms=1500")).await.unwrap();
        assert_eq!((s, &body[..]), (StatusCode::OK, &b"call 1"[..]));
        assert_eq!(
            up.calls(),
            1,
            "the other proxy is served from the stored entry"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killing_the_lease_holder_costs_at_most_one_lease() {
        let redis = Server::redis();
        let up = Upstream::default();
        let addr = up.start().await;
        let store = redis.url();
        let args = [
            "--store",
            store.as_str(),
            "--lease",
            "1s",
            "--wait-timeout",
            "10s",
        ];
        let mut a = Proxy::start(addr, &args);
        let b = Proxy::start(addr, &args);
        let c = client();
        // A takes the lease and starts a 3 s fill.
        let first = in_flight(&up, &c, a.url("/slow?ms=3000")).await;
        // B's requests wait on A's lease...
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let c = c.clone();
            let u = b.url("/slow?ms=3000");
            tasks.push(tokio::spawn(async move { get(&c, u).await }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // ...and A dies holding it.
        a.kill9();
        assert!(
            first.await.unwrap().is_err(),
            "A's own client lost its connection"
        );
        // All of them from B's own fill, once A's lease ran out (a wait past the 10 s deadline
        // would be a 504: A's 3 s fill never lands).
        for t in tasks {
            let (s, body) = t.await.unwrap().expect("no request through B fails");
            assert_eq!((s, &body[..]), (StatusCode::OK, &b"call 2"[..]));
        }
        assert!(up.calls() <= 2, "the upstream saw {} calls", up.calls());
        assert_eq!(up.calls(), 2, "B took over after A's lease expired");
    }
}

#[cfg(feature = "memcached")]
mod with_memcached {
    use super::*;
    use common::servers::Server;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failure_through_one_proxy_sharing_memcached_is_the_others_fallback_at_once() {
        let mc = Server::memcached();
        a_failure_through_one_proxy_is_the_others_fallback_at_once(&mc.url()).await;
    }

    /// `--near-max-age` turns the Memcached near cache on: hits stop reaching memcached, and a
    /// POST through another proxy reaches them within a bounded time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn near_max_age_keeps_hits_in_process_and_bounds_staleness() {
        let mc = Server::memcached();
        let (up, a, b) = two_proxies(&mc.url(), &["--near-max-age", "300ms"], &[]).await;
        let c = client();
        let (_, h, body) = send(&c, http::Method::GET, a.url("/slow?ms=1")).await;
        assert_eq!(
            (cache_status(&h).contains("stored"), &body[..]),
            (true, &b"call 1"[..])
        );
        // The fill's own write dropped A's copy: one read brings it back, then none.
        let (_, h, _) = send(&c, http::Method::GET, a.url("/slow?ms=1")).await;
        assert!(cache_status(&h).contains("hit"), "{}", cache_status(&h));
        let gets = mc.stat("cmd_get");
        for _ in 0..20 {
            let (_, h, body) = send(&c, http::Method::GET, a.url("/slow?ms=1")).await;
            assert!(cache_status(&h).contains("hit"), "{}", cache_status(&h));
            assert_eq!(&body[..], b"call 1");
        }
        assert_eq!(mc.stat("cmd_get"), gets, "20 hits reached memcached");
        // A POST through B invalidates the URL in memcached; A's copy (fresh for 60 s) ends
        // with its max age. Thirty times that bounds the wait.
        let (s, _, body) = send(&c, http::Method::POST, b.url("/slow?ms=1")).await;
        assert_eq!((s, &body[..]), (StatusCode::OK, &b"call 2"[..]));
        let deadline = Instant::now() + Duration::from_millis(300) * 30;
        loop {
            let (_, _, body) = send(&c, http::Method::GET, a.url("/slow?ms=1")).await;
            if &body[..] != b"call 1" {
                assert_eq!(&body[..], b"call 3");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "A served its copy long after B's POST invalidated the URL"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(up.calls(), 3);
    }
}

/// `--fill-timeout` bounds the upstream, not the client's upload: a body that keeps arriving
/// (a chunk every 300 ms, 2.4 s in all, against a 1 s timeout) reaches the upstream whole and its
/// answer comes back; one that stops arriving gets 408 and a closed connection, not a 504 that
/// blames the upstream, and nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_an_upstream_timeout_and_a_stalled_one_is_a_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::default();
    let addr = up.start().await;
    let proxy = Proxy::start(addr, &["--fill-timeout", "1s"]);
    let port = proxy.url("").rsplit(':').next().unwrap().to_string();
    let head = "POST /slow?ms=1 HTTP/1.1\r\nHost: app.test\r\nContent-Length: 80\r\n\r\n";
    // Slow but steady: eight 10-byte chunks, 300 ms apart.
    let mut s = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    for i in 0..8u8 {
        s.write_all(&[b'a' + i; 10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.calls(), 1);
    assert_eq!(up.bodies.lock().unwrap()[0].len(), 80);
    // Stalled: 10 of 80 bytes, then nothing.
    let mut s = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&[b'z'; 10]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("an answer, then the connection closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("the request body stopped arriving"),
        "{answer}"
    );
    // The upstream may have seen the request start, never a second whole body.
    let bodies = up.bodies.lock().unwrap().clone();
    assert_eq!(
        bodies.iter().filter(|b| b.len() == 80).count(),
        1,
        "{bodies:?}"
    );
}

/// An upstream that takes a request's head and stops reading its body stalls the upload, but
/// that is the upstream's fault (504), not the client's (408): the client still has body to
/// send, and the proxy stopped asking for it. Before, the stall was blamed on the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_reading_the_body_is_a_504_not_a_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = common::raw_server(|mut s| async move {
        if read_head(&mut s).await.is_some() {
            // Holds the connection, reads nothing more.
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    })
    .await;
    let proxy = Proxy::start(addr, &["--fill-timeout", "1s"]);
    let len: usize = 256 << 20;
    let s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    let (mut rd, mut wr) = s.into_split();
    // The client sends as fast as it can take it, far more than the sockets in between hold.
    let sender = tokio::spawn(async move {
        let head = format!("POST /up HTTP/1.1\r\nHost: app.test\r\nContent-Length: {len}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..len >> 20 {
            wr.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rd.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!(
                "no answer: {other:?}, got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    let answer = String::from_utf8_lossy(&got).to_string();
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    sender.abort();
}

/// A store that cannot be reached at start is said so at once (the proxy starts anyway and fails
/// open), for Memcached as for Redis; a reachable one is not complained about.
#[cfg(feature = "memcached")]
/// What the proxy prints (its start line and warnings) until it listens, with `--store store`.
fn start_output(store: &str) -> String {
    let args = ["--upstream", "http://127.0.0.1:9", "--store", store];
    Proxy::spawn_to(&args, &[], Stdio::piped()).output()
}

/// A Redis that answers but refuses the URL's password or database would refuse it for good:
/// the proxy says so and does not start (it starts, failing open, when Redis is only down). The
/// password is never printed, neither in the error nor in the start line.
#[test]
fn a_redis_refusing_the_urls_password_or_database_stops_the_start_and_no_password_is_printed() {
    let server = common::servers::Server::redis();
    assert!(server.raw("CONFIG SET requirepass sekret").contains("OK"));
    let port = server.port();
    let cases = [
        (format!("redis://:wr0ngpw@127.0.0.1:{port}/0"), "wr0ngpw"),
        (format!("redis://127.0.0.1:{port}/0"), "sekret"),
        (format!("redis://:sekret@127.0.0.1:{port}/99"), "sekret"),
    ];
    for (store, secret) in &cases {
        let mut child = Command::new(proxy_bin())
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--upstream", "http://127.0.0.1:9", "--store", store])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn caching_proxy");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{store}: the proxy started instead of refusing");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (mut out, mut err) = (String::new(), String::new());
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{store}: {status}");
        assert!(
            err.contains("--store: redis refused this configuration"),
            "{store}: {err}"
        );
        assert!(
            !(out.clone() + &err).contains(secret),
            "{store}: {out}{err}"
        );
    }
    // The right password starts it, and the start line shows it as `***`.
    let out = start_output(&format!("redis://:sekret@127.0.0.1:{}/0", server.port()));
    assert!(out.contains("(store: redis://:***@127.0.0.1:"), "{out}");
    assert!(!out.contains("sekret"), "{out}");
    assert!(!out.contains("unreachable"), "{out}");
}

/// However a store URL carries a password, a refusal to start never prints it, nor does
/// `--help` with the store in the environment. Forms found by a review helper.
#[test]
fn a_password_in_any_store_form_is_never_printed() {
    let stores = [
        "redis+unix:///tmp/r.sock?db=0&pass=s3cr3t",
        "unix:///tmp/r.sock?password=s3cr3t",
        ":s3cr3t@127.0.0.1:6379",
        "redis:/user:s3cr3t@h:1",
        "memcache://user:s3cr3t@127.0.0.1:11211",
        "memcache://s3cr3t@127.0.0.1:11211",
    ];
    for store in stores {
        let out = Command::new(proxy_bin())
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--upstream", "http://127.0.0.1:9", "--store", store])
            .stdin(Stdio::null())
            .output()
            .expect("run caching_proxy");
        let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{store}: {text}");
        assert!(text.contains("Error:"), "{store}: {text}");
        assert!(!text.contains("s3cr3t"), "{store}: {text}");
    }
    let out = Command::new(proxy_bin())
        .arg("--help")
        .env("STAMPEDE_STORE", "redis://:s3cr3t@127.0.0.1:6379")
        .output()
        .expect("run caching_proxy");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("STAMPEDE_STORE"), "{text}");
    assert!(!text.contains("s3cr3t"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_memcached_at_start_is_warned_about() {
    let server = common::servers::Server::memcached();
    let closed = format!("memcache://127.0.0.1:{}", free_port());
    let live = format!("memcache://127.0.0.1:{}", server.port());
    for (store, warned) in [(closed.as_str(), true), (live.as_str(), false)] {
        let out = start_output(store);
        assert_eq!(
            out.contains("memcached unreachable or failing at start"),
            warned,
            "{store}: {out}"
        );
    }
}

/// An event stream (`no-store`) goes through as it comes: the first event reaches the client
/// while the upstream still holds the stream open, not when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_reaches_the_client_as_it_comes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let release = Arc::new(tokio::sync::Notify::new());
    let upstream_release = release.clone();
    let addr = common::raw_server(move |mut s| {
        let release = upstream_release.clone();
        async move {
            if read_head(&mut s).await.is_none() {
                return;
            }
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                        Cache-Control: no-store\r\nTransfer-Encoding: chunked\r\n\r\n";
            let first = "9\r\ndata: 1\n\n\r\n";
            if s.write_all(format!("{head}{first}").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            release.notified().await;
            let _ = s.write_all(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n").await;
        }
    })
    .await;
    let proxy = Proxy::start(addr, &[]);
    let mut s = connect(
        &proxy,
        "GET /events HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    // Reads until `want` has arrived, within a bounded wait.
    async fn until(s: &mut tokio::net::TcpStream, got: &mut Vec<u8>, want: &str) -> bool {
        let mut buf = [0u8; 4096];
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            while !String::from_utf8_lossy(got).contains(want) {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            true
        })
        .await;
        found.unwrap_or(false)
    }
    let mut got = Vec::new();
    assert!(
        until(&mut s, &mut got, "data: 1").await,
        "the first event did not arrive while the stream was open: {}",
        String::from_utf8_lossy(&got)
    );
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.contains("data: 2"), "{text}");
    release.notify_one();
    assert!(
        until(&mut s, &mut got, "data: 2").await,
        "{}",
        String::from_utf8_lossy(&got)
    );
}
