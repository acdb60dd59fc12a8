//! A caching reverse proxy on hyper 1, wrapped in the stampede layer.
//!
//! With no `--upstream` it starts a small demo upstream of its own (`/slow` takes 200 ms and
//! counts its calls, `/nocache` is uncacheable, `/count` tells how many upstream calls were
//! made), so it shows the protection on a fresh machine with nothing else installed:
//!
//! ```sh
//! cargo run --release --example caching_proxy
//! seq 500 | xargs -P 500 -I{} curl -s -o /dev/null http://127.0.0.1:8080/slow
//! curl -s http://127.0.0.1:8080/count      # -> upstream calls: 1 (/slow) ...
//! ```
//!
//! Every flag can also be set from the environment (`STAMPEDE_<FLAG>`, e.g.
//! `STAMPEDE_UPSTREAM`). Stores: `memory` (default), `redis://host:port/db` (feature `redis`),
//! `memcache://host:port[,host:port]` (feature `memcached`). Logs through `RUST_LOG`
//! (`RUST_LOG=debug` prints one line per request).
//!
//! Run with `cargo run --example caching_proxy -- --help`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{
    capture_connection, CaptureConnection, HttpConnector, HttpInfo,
};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::Service;
use tower_layer::Layer;
use tower_stampede::backend::memory::MemoryBackend;
use tower_stampede::backend::Backend;
use tower_stampede::http::{StampedeLayer, StampedeService};
use tower_stampede::{BoxError, Config, Stampede};

type Body = BoxBody<Bytes, BoxError>;

#[derive(Parser, Debug, Clone)]
#[command(about = "A caching reverse proxy that stops cache stampedes (tower-stampede).")]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "STAMPEDE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The origin, e.g. http://127.0.0.1:9000. Without it a demo upstream is started.
    #[arg(long, env = "STAMPEDE_UPSTREAM")]
    upstream: Option<String>,
    /// memory | redis://host:port[/db] | memcache://host:port[,host:port]
    #[arg(
        long,
        env = "STAMPEDE_STORE",
        hide_env_values = true,
        default_value = "memory"
    )]
    store: String,
    /// Freshness for responses whose origin sets none (default: such responses are not cached).
    #[arg(long, env = "STAMPEDE_TTL", value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Lease on a rebuild: how long before another instance may take over a fill.
    #[arg(long, env = "STAMPEDE_LEASE", default_value = "5s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// stale-while-revalidate for responses that set none.
    #[arg(long, env = "STAMPEDE_SWR", default_value = "0s", value_parser = humantime::parse_duration)]
    swr: Duration,
    /// stale-if-error for responses that set none.
    #[arg(long, env = "STAMPEDE_SIE", default_value = "0s", value_parser = humantime::parse_duration)]
    sie: Duration,
    /// One deadline per request while another request fills (then stale, else 504).
    #[arg(long, env = "STAMPEDE_WAIT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    wait_timeout: Duration,
    /// An upstream call running longer is abandoned (504, or stale inside stale-if-error).
    #[arg(long, env = "STAMPEDE_FILL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    fill_timeout: Duration,
    /// Waiters' polling backoff, MIN..MAX (they also wake on signals where the store has them).
    #[arg(long, env = "STAMPEDE_BACKOFF", default_value = "10ms..500ms", value_parser = parse_backoff)]
    backoff: (Duration, Duration),
    /// Largest body cached, in bytes (k/m suffixes allowed); larger ones stream through.
    #[arg(long, env = "STAMPEDE_MAX_BODY", default_value = "1m", value_parser = parse_bytes)]
    max_body: usize,
    /// Key prefix in Redis or Memcached.
    #[arg(long, env = "STAMPEDE_PREFIX", default_value = "ts:")]
    prefix: String,
    /// Byte budget of the memory store.
    #[arg(long, env = "STAMPEDE_MEMORY", default_value = "64m", value_parser = parse_bytes)]
    memory: usize,
    /// Keep up to this many bytes of records read from the store in process, so hot hits skip
    /// the round trip; 0 turns it off. Redis keeps it coherent (client-side caching with
    /// `CLIENT TRACKING`); Memcached cannot, so there it is used only with --near-max-age.
    #[arg(long, env = "STAMPEDE_NEAR_CACHE", default_value = "32m", value_parser = parse_bytes)]
    near_cache: usize,
    /// Memcached only: serve a record kept in process for at most this long (bounded
    /// staleness: another instance's writes reach this one up to this late); 0 (the default)
    /// keeps nothing.
    #[arg(long, env = "STAMPEDE_NEAR_MAX_AGE", default_value = "0s", value_parser = humantime::parse_duration)]
    near_max_age: Duration,
    /// Per-call timeout of the store (slower counts as a store error; the proxy then fails open).
    #[arg(long, env = "STAMPEDE_BACKEND_TIMEOUT", default_value = "250ms", value_parser = humantime::parse_duration)]
    backend_timeout: Duration,
    /// Close a client connection that makes no progress for this long (0 turns it off): no
    /// request being served and no byte written to it, as on an idle keep-alive connection, a
    /// request head never finished, or a response the client stopped reading.
    #[arg(long, env = "STAMPEDE_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Serve /metrics (Prometheus) and /healthz here; never proxied.
    #[arg(long, env = "STAMPEDE_ADMIN")]
    admin: Option<SocketAddr>,
    /// Run only the demo upstream, on this address (docker-compose uses it as the origin).
    #[arg(long, env = "STAMPEDE_DEMO_UPSTREAM_ONLY")]
    demo_upstream_only: Option<SocketAddr>,
}

fn parse_backoff(s: &str) -> Result<(Duration, Duration), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("expected MIN..MAX, e.g. 10ms..500ms, got {s:?}"))?;
    let a = humantime::parse_duration(a.trim()).map_err(|e| format!("{a:?}: {e}"))?;
    let b = humantime::parse_duration(b.trim()).map_err(|e| format!("{b:?}: {e}"))?;
    Ok((a, b))
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1024),
        Some('m') => (&t[..t.len() - 1], 1024 * 1024),
        Some('g') => (&t[..t.len() - 1], 1024 * 1024 * 1024),
        _ => (t, 1),
    };
    num.trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("expected a size like 1048576, 512k or 1m, got {s:?}"))
}

/// Forwards to the upstream over a pooled keep-alive client. Never fails: an unreachable or
/// hanging upstream is a 502 or 504 response, which the layer treats like any 5xx (stale-if-error,
/// the failed signal).
/// One per connection, so it knows the client's address for the forwarding headers; cloned
/// for every request by the layer (a fill owns its service), so it is one `Arc` and an address.
#[derive(Clone)]
struct Proxy {
    shared: Arc<ProxyInner>,
    peer: SocketAddr,
}

struct ProxyInner {
    client: Client<HttpConnector, Body>,
    upstream: Uri,
    timeout: Duration,
    /// The local addresses of upstream connections that have carried an answer: a request
    /// that fails on one of those went on a reused connection (see `closed_unanswered`).
    answered_on: std::sync::Mutex<std::collections::HashSet<SocketAddr>>,
}

/// How many upstream connections `ProxyInner::answered_on` remembers before it starts again
/// (forgetting one only costs a retry it would have made).
const ANSWERED_ON_MAX: usize = 4096;

impl ProxyInner {
    /// Notes that the connection `res` came on has carried an answer.
    fn answered(&self, res: &Response<hyper::body::Incoming>) {
        if let Some(info) = res.extensions().get::<HttpInfo>() {
            let mut seen = lock(&self.answered_on);
            if seen.len() >= ANSWERED_ON_MAX {
                seen.clear();
            }
            seen.insert(info.local_addr());
        }
    }

    /// Whether the captured connection had carried an answer before: reused.
    fn reused(&self, captured: &CaptureConnection) -> bool {
        let Some(local) = captured.connection_metadata().as_ref().and_then(|c| {
            let mut ext = http::Extensions::new();
            c.get_extras(&mut ext);
            ext.get::<HttpInfo>().map(HttpInfo::local_addr)
        }) else {
            return false;
        };
        let seen = lock(&self.answered_on);
        seen.contains(&local)
    }
}

impl Service<Request<Body>> for Proxy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // Checked here, where a request is about to go upstream, not before the layer, so a hit
        // pays nothing for it: the layer never keys a request with two Hosts (it bypasses
        // them to here), and a Host this refuses never has an entry to hit. (An HTTP/1.1
        // request without Host can hit what an HTTP/1.0 one without it stored.)
        if !host_ok(req.headers(), req.version()) {
            let res = status(StatusCode::BAD_REQUEST, "bad or missing Host\n");
            return Box::pin(std::future::ready(Ok(res)));
        }
        // RFC 9112 section 6.1 (nginx answers so too): hyper has taken the chunked framing
        // off, and Transfer-Encoding is not passed on, so another coding's bytes would reach
        // the upstream as if they were the content.
        if !only_chunked(req.headers()) {
            let res = status(
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not supported\n",
            );
            return Box::pin(std::future::ready(Ok(res)));
        }
        let this = self.clone();
        let received = req.version();
        // RFC 9110 section 6.2: our own HTTP version, whatever the client's.
        *req.version_mut() = http::Version::HTTP_11;
        strip_hop_by_hop(req.headers_mut());
        add_forwarding(req.headers_mut(), self.peer, received);
        Box::pin(async move {
            // RFC 9112 section 3.2.4: the asterisk-form is for a server-wide OPTIONS alone.
            if req.uri() == "*" && req.method() != http::Method::OPTIONS {
                return Ok(status(StatusCode::BAD_REQUEST, "bad request target\n"));
            }
            // A tunnel is not what a reverse proxy is for (RFC 9110 section 9.3.6).
            if req.method() == http::Method::CONNECT {
                return Ok(status(
                    StatusCode::NOT_IMPLEMENTED,
                    "CONNECT is not supported by this proxy\n",
                ));
            }
            if let Some(res) = max_forwards(&mut req) {
                return Ok(res);
            }
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .to_string();
            let mut parts = this.shared.upstream.clone().into_parts();
            parts.path_and_query = pq.parse().ok();
            *req.uri_mut() = match Uri::from_parts(parts) {
                Ok(u) => u,
                Err(_) => return Ok(status(StatusCode::BAD_REQUEST, "bad request target\n")),
            };
            // A request body is the client's to send: while it arrives, the upstream is not
            // late. So the bound is `timeout` from the body's last progress (from the start
            // without one). A body that stalls for that long while the proxy waits on the
            // client for more is the client's fault (408); one the upstream stopped reading
            // (its socket full, no more asked for) is the upstream's (504).
            let progress = (!hyper::body::Body::is_end_stream(req.body())).then(|| {
                // A body of unknown length goes on chunked: hyper's client chunks it by itself
                // for most methods, but sends none at all for a GET or HEAD unless told to.
                if hyper::body::Body::size_hint(req.body()).exact().is_none()
                    && !req.headers().contains_key(header::CONTENT_LENGTH)
                {
                    req.headers_mut().insert(
                        header::TRANSFER_ENCODING,
                        HeaderValue::from_static("chunked"),
                    );
                }
                let p = Arc::new(Progress::default());
                let body = std::mem::take(req.body_mut());
                *req.body_mut() = BodyExt::boxed(Tracked {
                    inner: body,
                    progress: p.clone(),
                });
                p
            });
            // A safe request without a body, kept to be sent once more if the reused
            // connection it went on closes before an answer (below), with a handle on that
            // connection.
            let again = (progress.is_none() && req.method().is_safe()).then(|| {
                let mut again = Request::new(Body::default());
                *again.method_mut() = req.method().clone();
                *again.uri_mut() = req.uri().clone();
                *again.headers_mut() = req.headers().clone();
                (again, capture_connection(&mut req))
            });
            let timeout = this.shared.timeout;
            let call = this.shared.client.request(req);
            tokio::pin!(call);
            let mut deadline = tokio::time::Instant::now() + timeout;
            // `Err(true)`: the client's body stalled; `Err(false)`: the upstream is late.
            let answered = loop {
                if let Ok(r) = tokio::time::timeout_at(deadline, call.as_mut()).await {
                    break Ok(r);
                }
                let Some(p) = &progress else { break Err(false) };
                let until = p.last() + timeout;
                if until <= tokio::time::Instant::now() {
                    break Err(!p.done.load(Ordering::Relaxed) && p.waiting.load(Ordering::Relaxed));
                }
                deadline = until;
            };
            // RFC 9112 section 9.3.1.1: a kept-alive connection the upstream closed as the
            // request went on it (its idle timeout racing our reuse) ends with no answer. A
            // safe request is sent once more, within the same deadline, as nginx and Go's
            // client do: only when that connection had carried an answer before (a new
            // connection closed on a request is the upstream failing it).
            let answered = match (answered, again) {
                (Ok(Err(e)), Some((again, captured)))
                    if closed_unanswered(&e) && this.shared.reused(&captured) =>
                {
                    tracing::debug!(error = ?e, "a reused upstream connection closed before an answer; sending the request again");
                    tokio::time::timeout_at(deadline, this.shared.client.request(again))
                        .await
                        .map_err(|_| false)
                }
                (answered, _) => answered,
            };
            if let Ok(Ok(res)) = &answered {
                this.shared.answered(res);
            }
            match answered {
                // As for requests: the coding's bytes would be served, and stored, as the
                // content. An upstream may only use one the request's TE offered (RFC 9112
                // section 7.4), and we send no TE.
                Ok(Ok(res)) if !only_chunked(res.headers()) => {
                    tracing::warn!(
                        transfer_encoding = ?res.headers().get_all(header::TRANSFER_ENCODING),
                        "upstream used a transfer coding other than chunked"
                    );
                    Ok(status(
                        StatusCode::BAD_GATEWAY,
                        "upstream used a transfer coding other than chunked\n",
                    ))
                }
                // The client's Upgrade is not passed on (hop-by-hop, and no tunnel here), so a
                // 101 answers a switch nobody asked for (RFC 9110 section 15.2.2).
                Ok(Ok(res)) if res.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    tracing::warn!("upstream answered 101 to a request that asked no upgrade");
                    Ok(status(
                        StatusCode::BAD_GATEWAY,
                        "upstream switched protocols, which this proxy does not relay\n",
                    ))
                }
                Ok(Ok(res)) => {
                    let (mut parts, body) = res.into_parts();
                    let received = parts.version;
                    // RFC 9110 section 6.2 again: not the upstream's version (an HTTP/1.0 one,
                    // say); hyper still answers a 1.0 client in 1.0.
                    parts.version = http::Version::HTTP_11;
                    // RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length, and an
                    // intermediary must remove the Content-Length before forwarding. hyper's
                    // client reads the chunked framing but keeps the header, which would frame
                    // the body we send (or store) by the upstream's wrong length.
                    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
                        parts.headers.remove(header::CONTENT_LENGTH);
                    }
                    strip_hop_by_hop(&mut parts.headers);
                    // RFC 9110 section 7.6.3: in every message forwarded, responses too. It is
                    // stored with the response, so hits carry it at no cost.
                    parts.headers.append(header::VIA, via(received));
                    Ok(Response::from_parts(parts, body.map_err(box_err).boxed()))
                }
                Ok(Err(e)) if e.is_connect() => {
                    // `?`: the cause (refused, no such host) is in the error's chain.
                    tracing::warn!(upstream = %this.shared.upstream, error = ?e, "upstream unreachable");
                    Ok(status(StatusCode::BAD_GATEWAY, "upstream unreachable\n"))
                }
                // Connected, but no valid response: not HTTP, a malformed head, or closed early.
                Ok(Err(e)) => {
                    tracing::warn!(error = ?e, "upstream sent no valid response");
                    Ok(status(
                        StatusCode::BAD_GATEWAY,
                        "upstream sent no valid response\n",
                    ))
                }
                Err(false) => Ok(status(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n")),
                Err(true) => {
                    // RFC 9110 section 15.5.9: and the connection closes, as the rest of the
                    // body may still come.
                    let mut res = status(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request body stopped arriving\n",
                    );
                    res.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    Ok(res)
                }
            }
        })
    }
}

/// When a request body last made progress, whether it has ended, and whether the proxy is
/// waiting on the client for more of it.
struct Progress {
    /// `tokio::time::Instant` of the last frame (or of the start).
    last: std::sync::Mutex<tokio::time::Instant>,
    done: AtomicBool,
    /// The body was last asked for more and had none: the client is late. Clear when the
    /// upstream has stopped asking (it does not read), which is not the client's fault.
    waiting: AtomicBool,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            last: std::sync::Mutex::new(tokio::time::Instant::now()),
            done: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
        }
    }
}

impl Progress {
    fn last(&self) -> tokio::time::Instant {
        *lock(&self.last)
    }
    fn advance(&self) {
        *lock(&self.last) = tokio::time::Instant::now();
    }
}

/// Locks `m`; a panic elsewhere while it was held leaves nothing half-done in what these
/// mutexes guard (a time, a set of addresses).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request body that records its progress (see [`Progress`]).
struct Tracked {
    inner: Body,
    progress: Arc<Progress>,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        self.progress
            .waiting
            .store(polled.is_pending(), Ordering::Relaxed);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                self.progress.advance();
                if self.inner.is_end_stream() {
                    self.progress.done.store(true, Ordering::Relaxed);
                }
            }
            Poll::Ready(_) => self.progress.done.store(true, Ordering::Relaxed),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// RFC 9110 section 7.6.2: `Max-Forwards` on OPTIONS and TRACE. At 0 this proxy is the final
/// recipient and answers itself (OPTIONS with what it allows; TRACE it does not reflect);
/// otherwise it forwards the value less one.
fn max_forwards(req: &mut Request<Body>) -> Option<Response<Body>> {
    let m = req.method();
    if m != http::Method::OPTIONS && m != http::Method::TRACE {
        return None;
    }
    let n: u64 = req
        .headers()
        .get(header::MAX_FORWARDS)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if n > 0 {
        req.headers_mut()
            .insert(header::MAX_FORWARDS, HeaderValue::from(n - 1));
        return None;
    }
    let (code, msg) = if req.method() == http::Method::OPTIONS {
        (StatusCode::OK, "")
    } else {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "TRACE is not answered by this proxy\n",
        )
    };
    let mut r = status(code, msg);
    r.headers_mut().insert(
        header::ALLOW,
        HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
    );
    Some(r)
}

fn status(code: StatusCode, msg: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(msg.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    // Made here, not the upstream's: the layer's Cache-Status names no fwd-status for it.
    r.extensions_mut()
        .insert(tower_stampede::http::NotForwarded);
    r
}

fn box_err(e: hyper::Error) -> BoxError {
    Box::new(e)
}

/// RFC 9110 section 7.6.1: the headers named in `Connection` (this hop's alone).
fn strip_connection_named(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = list_items(h, header::CONNECTION)
        .filter_map(|n| HeaderName::from_bytes(n).ok())
        // What says where a message goes and how it is framed is this proxy's to handle, not a
        // client's to have dropped: without Host the upstream would get its default host's
        // page under the Host the cache keyed on, and without Transfer-Encoding a body in
        // another coding would pass the check that refuses it (RFC 9110 section 7.6.1: a
        // sender must not name a field meant for every recipient).
        .filter(|n| {
            *n != header::HOST && *n != header::CONTENT_LENGTH && *n != header::TRANSFER_ENCODING
        })
        .collect();
    for n in named {
        h.remove(n);
    }
}

/// The items of every line of the comma-separated list header `name`, trimmed, empty ones
/// skipped (RFC 9110 section 5.6.1).
fn list_items(h: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &[u8]> {
    h.get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|n| !n.is_empty())
}

/// Whether `Connection` names a header (an option other than `close` and `keep-alive`, which
/// name none and are what most clients send).
fn names_headers(h: &HeaderMap) -> bool {
    list_items(h, header::CONNECTION)
        .any(|n| !n.eq_ignore_ascii_case(b"close") && !n.eq_ignore_ascii_case(b"keep-alive"))
}

/// RFC 9110 section 7.6.1: the fixed hop-by-hop headers and those named in `Connection`.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    strip_connection_named(h);
    for n in [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

/// Whether the upstream connection closed before the response was complete (hyper's
/// `IncompleteMessage`), the request having gone on it.
fn closed_unanswered(e: &hyper_util::client::legacy::Error) -> bool {
    !e.is_connect()
        && std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<hyper::Error>())
            .is_some_and(hyper::Error::is_incomplete_message)
}

/// Whether `h` has no Transfer-Encoding, or only the chunked framing (in any case, once).
fn only_chunked(h: &HeaderMap) -> bool {
    let mut codings = list_items(h, header::TRANSFER_ENCODING);
    match codings.next() {
        None => true,
        Some(c) => c.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    }
}

/// What this proxy adds to `Via` (RFC 9110 section 7.6.3), on requests and responses: the
/// protocol version of the message as it was received, and this proxy's name.
fn via(received: http::Version) -> HeaderValue {
    HeaderValue::from_static(if received == http::Version::HTTP_10 {
        "1.0 tower-stampede"
    } else {
        "1.1 tower-stampede"
    })
}

/// Via, X-Forwarded-For and Forwarded on the way in, for a request received in `received`.
fn add_forwarding(h: &mut HeaderMap, peer: SocketAddr, received: http::Version) {
    // An IPv4 client of a dual-stack listener (`--listen [::]:8080`) is an IPv4-mapped IPv6
    // address to the socket; the upstream is told the IPv4 address.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let ip = peer.ip().to_string();
    // The chain so far, every X-Forwarded-For line of it, byte for byte (what it holds is the
    // upstream's to judge), then the client's address.
    let mut xff = Vec::new();
    for v in h.get_all("x-forwarded-for") {
        xff.extend_from_slice(v.as_bytes());
        xff.extend_from_slice(b", ");
    }
    xff.extend_from_slice(ip.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&xff) {
        h.insert("x-forwarded-for", v);
    }
    let mut fwd = if peer.is_ipv6() {
        format!("for=\"[{ip}]\";proto=http").into_bytes()
    } else {
        format!("for={ip};proto=http").into_bytes()
    };
    // The Host the cache keyed this request on, in place of any the client sent: an origin that
    // builds its links from X-Forwarded-Host (as many frameworks do) would otherwise store, under
    // this Host, a page with links to whatever host one client named.
    match h.get(header::HOST).cloned() {
        Some(host) => h.insert("x-forwarded-host", host),
        None => h.remove("x-forwarded-host"),
    };
    // RFC 7239 section 4: the Host as a quoted-string (it may hold a colon). `host_ok` let in
    // no quote or backslash that would need escaping.
    if let Some(host) = h.get(header::HOST) {
        fwd.extend_from_slice(b";host=\"");
        fwd.extend_from_slice(host.as_bytes());
        fwd.push(b'"');
    }
    if let Ok(v) = HeaderValue::from_bytes(&fwd) {
        h.append("forwarded", v);
    }
    h.append(header::VIA, via(received));
}

async fn backend(args: &Args) -> Result<Arc<dyn Backend>, BoxError> {
    let store = args.store.as_str();
    if store == "memory" {
        let mem = MemoryBackend::new(args.memory);
        if args.max_body > mem.max_record_bytes() {
            tracing::warn!(
                memory = args.memory,
                max_body = args.max_body,
                "responses over about {} bytes will not be stored: the memory store splits \
                 --memory over 16 shards and a response must fit one; raise --memory to at \
                 least 16 x --max-body",
                mem.max_record_bytes()
            );
        }
        return Ok(Arc::new(mem));
    }
    if store.starts_with("redis://") || store.starts_with("rediss://") {
        #[cfg(feature = "redis")]
        {
            // Connects lazily: the proxy starts (and fails open) while Redis is down.
            let b = tower_stampede::backend::redis::RedisBackend::builder(store)
                .prefix(&args.prefix)
                .near_cache(args.near_cache)
                .build()?;
            // Make the connections before taking traffic, so the first requests do not pay
            // for them (or fail open while they are made); if Redis is down, start anyway. A
            // Redis that refuses the URL's password or database would refuse it for good.
            probe_at_start("redis", b.warm_up(), |e| e.is_config_rejected()).await?;
            return Ok(Arc::new(b));
        }
        #[cfg(not(feature = "redis"))]
        return Err(
            "this proxy was built without the `redis` feature (cargo run --features redis ...)"
                .into(),
        );
    }
    if store.starts_with("memcache://") {
        #[cfg(feature = "memcached")]
        {
            let b = tower_stampede::backend::memcached::MemcachedBackend::builder(store)
                .prefix(tower_stampede::key::Prefix::new(&args.prefix)?)
                .near_cache(args.near_cache, args.near_max_age)
                .build()
                .await?;
            // Connections are made on first use: one read says now whether the cache will work.
            let probe_key = format!("{}probe", args.prefix);
            probe_at_start("memcached", b.meta_get(&probe_key), |_| false).await?;
            return Ok(Arc::new(b));
        }
        #[cfg(not(feature = "memcached"))]
        return Err("this proxy was built without the `memcached` feature (cargo run --features memcached ...)".into());
    }
    Err(format!(
        "unknown --store {:?}: expected memory, redis://... or memcache://...",
        redacted(store)
    )
    .into())
}

/// `url` as the proxy prints it, never with a credential: a userinfo's password
/// (`scheme://user:password@host`) as `***`, a userinfo without `:` (perhaps a password alone)
/// as `***` whole, and `pass=` / `password=` query values (redis-rs reads a Unix socket's
/// password there) as `***`. Without `://` (a typo, no scheme) everything before an `@` is the
/// userinfo.
fn redacted(url: &str) -> String {
    let (head, query) = match url.find(['?', '#']) {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let start = head.find("://").map_or(0, |i| i + 3);
    let head = match head[start..].rfind('@') {
        Some(at) => {
            let user = match head[start..start + at].split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_owned(),
            };
            format!("{}{user}{}", &head[..start], &head[start + at..])
        }
        None => head.to_owned(),
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _))
                if ["pass", "password"].contains(
                    &name
                        .trim_start_matches(['?', '#'])
                        .to_ascii_lowercase()
                        .as_str(),
                ) =>
            {
                format!("{name}=***")
            }
            _ => pair.to_owned(),
        })
        .collect();
    head + &query.join("&")
}

/// Waits up to 3 s for `probe`, a first call to the store, and warns when it fails: the proxy
/// starts either way and fails open until the store is back. Only an error that `fatal` says no
/// retry can cure (the store refusing the configuration) stops the start.
#[cfg(any(feature = "redis", feature = "memcached"))]
async fn probe_at_start<T, E: std::fmt::Display>(
    store: &str,
    probe: impl std::future::Future<Output = Result<T, E>>,
    fatal: impl FnOnce(&E) -> bool,
) -> Result<(), BoxError> {
    match tokio::time::timeout(Duration::from_secs(3), probe).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if fatal(&e) => {
            return Err(format!("--store: {store} refused this configuration: {e}").into())
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "{store} unreachable or failing at start; failing open until it is back")
        }
        Err(_) => {
            tracing::warn!("{store} did not answer within 3 s at start; failing open until it does")
        }
    }
    Ok(())
}

/// The demo upstream: `/slow` (200 ms, counted, cacheable for 5 s), `/nocache` (200 ms,
/// `no-store`), `/count` (the upstream calls so far).
async fn demo_upstream(bind: SocketAddr) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let slow = Arc::new(AtomicU64::new(0));
    let nocache = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, say: do not spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let (slow, nocache) = (slow.clone(), nocache.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (slow, nocache) = (slow.clone(), nocache.clone());
                async move {
                    let (cc, body) = match req.uri().path() {
                        "/slow" => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            let n = slow.fetch_add(1, Ordering::SeqCst) + 1;
                            (
                                "public, max-age=5, stale-while-revalidate=30",
                                format!("slow response #{n}\n"),
                            )
                        }
                        "/nocache" => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            let n = nocache.fetch_add(1, Ordering::SeqCst) + 1;
                            ("no-store", format!("uncacheable response #{n}\n"))
                        }
                        "/count" => (
                            "no-store",
                            format!(
                                "upstream calls: {} (/slow), {} (/nocache)\n",
                                slow.load(Ordering::SeqCst),
                                nocache.load(Ordering::SeqCst)
                            ),
                        ),
                        _ => (
                            "no-store",
                            "demo upstream: try /slow, /nocache, /count\n".to_string(),
                        ),
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header(header::CACHE_CONTROL, cc)
                            .body(Full::new(Bytes::from(body)))
                            .expect("a valid response"),
                    )
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Serves `/metrics` and `/healthz` on `addr`. The metrics recorder exists only with an admin
/// address: without one the engine's counters are no-ops.
/// The admin endpoints: `/metrics` (Prometheus text format) and `/healthz`, which answers 503
/// once `draining` is set (after SIGTERM, while in-flight requests finish), so a load balancer
/// stops sending new ones.
async fn admin(
    addr: SocketAddr,
    idle: Duration,
    draining: Arc<AtomicBool>,
) -> Result<(), BoxError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--admin {addr}: {e}"))?;
    let prom = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    // Histogram samples pile up in the recorder until something drains them: a scrape does,
    // and so does this, so a proxy nobody scrapes does not grow without bound.
    let upkeep = prom.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    tracing::info!(
        "admin on http://{}/metrics and /healthz",
        listener.local_addr()?
    );
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, say: do not spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let prom = prom.clone();
            let draining = draining.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let prom = prom.clone();
                let draining = draining.load(Ordering::Relaxed);
                async move {
                    let (code, body, kind) = match req.uri().path() {
                        // The exposition format's own type; Prometheus 3 refuses a scrape
                        // without one unless told a fallback.
                        "/metrics" => (StatusCode::OK, prom.render(), PROMETHEUS_TEXT),
                        "/healthz" if draining => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "draining\n".to_string(),
                            PLAIN,
                        ),
                        "/healthz" => (StatusCode::OK, "ok\n".to_string(), PLAIN),
                        _ => (StatusCode::NOT_FOUND, "not found\n".to_string(), PLAIN),
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = code;
                    r.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
                    Ok::<_, Infallible>(r)
                }
            });
            spawn_watched(stream, idle, |io, _| async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    Ok(())
}

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const PLAIN: &str = "text/plain; charset=utf-8";

type Served = Response<OutBody>;

/// The layer's body with a concrete error type (see `serve`), without boxing it again.
struct OutBody(tower_stampede::http::ResponseBody<Body>);

impl hyper::body::Body for OutBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        Pin::new(&mut self.0)
            .poll_frame(cx)
            .map_err(std::io::Error::other)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0.size_hint()
    }
}

/// One request through the stack. A plain function returning a named future, and a body with a
/// concrete error type, so the connection future spawned per connection stays provably `Send`
/// (rustc cannot see through nested async blocks otherwise). A hit allocates neither a second
/// future nor a boxed request body.
fn serve(mut svc: StampedeService<Proxy>, req: Request<Incoming>, conn: &Arc<Activity>) -> Serve {
    // Forwarding headers are added by `Proxy` only when a request actually goes upstream, so
    // a hit costs no header rewriting.
    let (mut parts, body) = req.into_parts();
    // RFC 9110 section 7.6.1: what `Connection` names is not forwarded, so it goes before the
    // layer keys and varies the request: else a client could have the upstream's answer to a
    // request without its `Accept-Language` stored as that language's variant. One lookup on a
    // hit without `Connection`, no allocation with `close` or `keep-alive`.
    if names_headers(&parts.headers) {
        strip_connection_named(&mut parts.headers);
    }
    // RFC 9112 section 3.2.2: an absolute-form target names the host; Host is replaced by it,
    // so the cache key and the upstream agree on which host the response is for.
    if let Some(a) = parts.uri.authority() {
        let host = match a.port() {
            Some(p) => format!("{}:{p}", a.host()),
            None => a.host().to_string(),
        };
        if let Ok(v) = HeaderValue::try_from(host) {
            parts.headers.insert(header::HOST, v);
        }
    }
    // What the access log line needs, taken only when it is on.
    let log = tracing::enabled!(tracing::Level::DEBUG).then(|| {
        (
            std::time::Instant::now(),
            parts.method.clone(),
            parts.uri.path().to_string(),
        )
    });
    // A request without a body (most GETs) gets the empty body, which boxes a zero-sized value.
    let body = if hyper::body::Body::is_end_stream(&body) {
        Body::default()
    } else {
        body.map_err(box_err).boxed()
    };
    // Both the layer and the proxy service are always ready: no poll_ready to drive.
    Serve {
        fut: svc.call(Request::from_parts(parts, body)),
        log,
        busy: Some(Busy::new(conn)),
    }
}

/// RFC 9112 section 3.2: an HTTP/1.1 request needs exactly one Host, and it must be a host
/// (`host[:port]`, no user info, no spaces); HTTP/1.0 may leave it out.
fn host_ok(headers: &HeaderMap, version: http::Version) -> bool {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        // RFC 3986's reg-name, IP literal and port characters.
        (Some(h), None) => h.as_bytes().iter().all(|&b| {
            matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~'
                | b'!' | b'$' | b'&' | b'\''..=b',' | b';' | b'=' | b':' | b'[' | b']' | b'%')
        }),
        (None, _) => version < http::Version::HTTP_11,
        _ => false,
    }
}

/// The future of [`serve`]: the layer's own (boxed once, so `Unpin`), the access log line, and
/// the connection's busy mark, cleared when the response head is ready (or the request dropped).
struct Serve {
    fut: <StampedeService<Proxy> as Service<Request<Body>>>::Future,
    log: Option<(std::time::Instant, http::Method, String)>,
    busy: Option<Busy>,
}

impl std::future::Future for Serve {
    type Output = Result<Served, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = std::task::ready!(Pin::new(&mut self.fut).poll(cx))?;
        self.busy = None;
        if let Some((started, method, path)) = self.log.take() {
            tracing::debug!(
                %method, %path, status = res.status().as_u16(),
                cache = res.headers().get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or(""),
                ms = started.elapsed().as_millis() as u64,
                "request"
            );
        }
        Poll::Ready(Ok(res.map(OutBody)))
    }
}

/// What a connection's watchdog looks at: whether the connection made progress since its last
/// look (wrote to the client, or finished serving a request), and whether a request is being
/// served. hyper's HTTP/1 server serves one request at a time per connection (its dispatcher
/// holds one in-flight future), so `busy` is a flag, not a count.
#[derive(Default)]
struct Activity {
    progress: AtomicBool,
    busy: AtomicBool,
}

/// Marks a connection busy while its request is served (see [`Serve`]).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(conn: &Arc<Activity>) -> Busy {
        conn.busy.store(true, Ordering::Relaxed);
        Busy(conn.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // Progress too, so that the idle time is counted from here, not from the last tick.
        self.0.progress.store(true, Ordering::Relaxed);
        self.0.busy.store(false, Ordering::Relaxed);
    }
}

/// A client connection's socket, noting every write that moves bytes.
struct Watched {
    io: tokio::net::TcpStream,
    activity: Arc<Activity>,
}

impl Watched {
    fn noted(&self, r: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.activity.progress.store(true, Ordering::Relaxed);
            }
        }
        r
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.noted(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.noted(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Runs a connection on its own task -- `conn` is given the socket, wrapped to note writes, and the
/// connection's [`Activity`] for its requests' [`Busy`] marks -- and, unless `idle` is zero, a
/// watchdog beside it that closes the connection (drops its future) once it has made no progress
/// for `idle`: no request being served and nothing written to the client. That bounds an idle
/// keep-alive connection, a request head that never ends (slowloris), a client that stops reading
/// its response, and an upstream body that stalls mid-way (a streamed one, passed or over
/// `--max-body`, is cut when it pauses longer than `idle`). A request waiting for its response head
/// (up to `--max-body` of a cacheable body is buffered before it) is bounded by the fill and wait
/// timeouts instead, so a slow origin is never cut off here.
///
/// The watchdog looks every quarter of `idle`, so a connection is closed between `idle` and
/// 1.25 x `idle` after its last progress (nominally: a loaded runtime runs ticks late, and a tick
/// is at least 1 ms). It is a task of its own, woken only by its ticks and by the connection's
/// end: a request pays an `Arc` clone and drop and three flag writes, and each write to the
/// client one more, never a timer.
fn spawn_watched<F, C>(stream: tokio::net::TcpStream, idle: Duration, conn: F)
where
    F: FnOnce(TokioIo<Watched>, Arc<Activity>) -> C,
    C: std::future::Future<Output = ()> + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let io = TokioIo::new(Watched {
        io: stream,
        activity: activity.clone(),
    });
    let mut task = tokio::spawn(conn(io, activity.clone()));
    if idle.is_zero() {
        return;
    }
    let every = (idle / 4).max(Duration::from_millis(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut quiet = 0;
        loop {
            tokio::select! {
                _ = &mut task => return,
                _ = tick.tick() => {
                    let progress = activity.progress.swap(false, Ordering::Relaxed);
                    if progress || activity.busy.load(Ordering::Relaxed) {
                        quiet = 0;
                        continue;
                    }
                    quiet += 1;
                    if quiet == 4 {
                        tracing::debug!(?idle, "closing a connection that made no progress");
                        task.abort();
                        return;
                    }
                }
            }
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message, not its `Debug` form.
            eprintln!("Error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Some(bind) = args.demo_upstream_only {
        let addr = demo_upstream(bind).await?;
        println!("demo upstream only, on http://{addr} (/slow, /nocache, /count)");
        shutdown_signal().await;
        return Ok(());
    }

    let upstream = match &args.upstream {
        Some(u) => u.clone(),
        None => {
            let addr = demo_upstream(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            println!(
                "no --upstream given: started a demo upstream on http://{addr} \
                 (/slow takes 200 ms and counts its calls; /nocache; /count)"
            );
            format!("http://{addr}")
        }
    };
    let upstream: Uri = upstream
        .parse()
        .map_err(|e| format!("--upstream {upstream:?}: {e}"))?;
    if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
        return Err(format!("--upstream must be http://host:port, got {upstream}").into());
    }
    // Requests keep their own path and query; a base path would be silently dropped.
    if upstream.path() != "/" || upstream.query().is_some() {
        return Err(format!(
            "--upstream must be http://host:port with no path or query (requests keep their \
             own), got {upstream}"
        )
        .into());
    }

    let config = Config::default()
        .lease(args.lease)
        .wait_timeout(args.wait_timeout)
        .fill_timeout(args.fill_timeout)
        .backoff(args.backoff.0, args.backoff.1)
        .backend_timeout(args.backend_timeout);
    let engine = Stampede::from_arc(backend(&args).await?, config)?;
    let mut layer = StampedeLayer::new(engine.clone())
        .max_body(args.max_body)
        .stale_while_revalidate(args.swr)
        .stale_if_error(args.sie);
    if let Some(ttl) = args.ttl {
        layer = layer.default_ttl(ttl);
    }
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let proxy = Arc::new(ProxyInner {
        client,
        upstream,
        timeout: args.fill_timeout,
        answered_on: Default::default(),
    });

    let draining = Arc::new(AtomicBool::new(false));
    if let Some(a) = args.admin {
        admin(a, args.idle_timeout, draining.clone()).await?;
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    println!(
        "tower-stampede caching proxy on http://{} -> {} (store: {})",
        listener.local_addr()?,
        args.upstream.as_deref().unwrap_or("demo upstream"),
        redacted(&args.store)
    );

    // Graceful shutdown: stop accepting, ask every connection to finish its in-flight request,
    // wait for them, then for the engine's running fills (whose writes release their leases).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let live = Arc::new(());
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let svc = layer.layer(Proxy { shared: proxy.clone(), peer });
                let mut stop = stop_rx.clone();
                let guard = live.clone();
                spawn_watched(stream, args.idle_timeout, |io, busy| async move {
                    let conn_svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        serve(svc.clone(), req, &busy)
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, conn_svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = stop.changed() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                    drop(guard);
                });
            }
            _ = &mut shutdown => break,
        }
    }
    println!("shutting down: finishing in-flight requests");
    draining.store(true, Ordering::Relaxed);
    drop(listener);
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while Arc::strong_count(&live) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if !engine.drain(Duration::from_secs(10)).await {
        eprintln!("some fills were still running after 10 s; their leases will expire");
    }
    Ok(())
}
