//! [`StampedeService`]: the request path.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, request::Parts, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use super::body::{buffer, Buffered, ResponseBody};
use super::cache_status::{self, CACHE_STATUS};
use super::freshness::{decide, Decision, DELTA_SECONDS_MAX};
use super::key::{
    authority_key, decode_unreserved, remove_dot_segments, url_slot, url_slot_as, user_slot,
    variant_of,
};
use super::layer::{CookiePolicy, Options, Shared};
use super::stored::{header_int, is_hop_by_hop, StoredResponse, MAX_HEADERS};
use crate::engine::{CacheKey, Fill, Prev, Select, Served, Status};
use crate::error::{BoxError, Error};
use crate::key::Digest;

/// The service made by [`StampedeLayer`](super::StampedeLayer).
pub struct StampedeService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for StampedeService<S> {
    fn clone(&self) -> Self {
        StampedeService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S> std::fmt::Debug for StampedeService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StampedeService").finish_non_exhaustive()
    }
}

impl<S> StampedeService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        StampedeService { inner, shared }
    }
}

/// The future of [`StampedeService`].
pub type ResponseFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqB, ResB> Service<Request<ReqB>> for StampedeService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    ReqB: Default + Send + 'static,
    ResB: Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<Self::Response, S::Error>;

    /// Always ready: a hit must not wait on the inner service's backpressure (a concurrency
    /// limit held by a slow fill). Readiness of the inner service is awaited where it is called:
    /// by a fill, or by a request that bypasses the cache.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let shared = self.shared.clone();
        let (slot, conditional, only_if_cached) = match classify(&req, &shared.opts) {
            Route::Cache {
                slot,
                conditional,
                only_if_cached,
            } => (slot, conditional, only_if_cached),
            Route::NotCached => {
                let res = not_cached(&shared.opts);
                return Box::pin(std::future::ready(Ok(res)));
            }
            Route::Bypass(detail) => {
                return Box::pin(bypass(shared, self.inner.clone(), req, detail));
            }
        };
        let (parts, _body) = req.into_parts();
        let state = Arc::new(ReqState {
            parts,
            conditional,
            side: Mutex::new(SideState::default()),
            inner: Mutex::new(Some(self.inner.clone())),
            shared,
        });
        let key = CacheKey::from_digest(slot).with_selector(state.clone());
        if only_if_cached {
            return Box::pin(async move { Ok(from_cache_only(state, key).await) });
        }
        let fill_state = state.clone();
        let fill = move |prev: Option<Prev>| {
            let inner = lock(&fill_state.inner).take();
            fill_from_origin(inner, fill_state, prev)
        };
        // Everything above is done before the future exists, so the future (one allocation per
        // request) holds only what lives across the engine's await.
        let arrived = tokio::time::Instant::now();
        Box::pin(async move {
            let served = state
                .shared
                .engine
                .get_or_fill_since(key, fill, arrived)
                .await;
            let opts = &state.shared.opts;
            Ok(match served {
                Ok(s) => match respond(opts, s, &state) {
                    Some(res) => res,
                    // Boxed: held inline, its store calls would grow every request's future.
                    None => Box::pin(unreadable(&state, arrived)).await,
                },
                Err(e) => error_response(opts, e, &state.parts, &state.side),
            })
        })
    }
}

enum Route {
    /// Through the cache, at this slot; `conditional` when the request has validators.
    Cache {
        slot: Digest,
        conditional: bool,
        /// `Cache-Control: only-if-cached`: a stored response or a 504, never the origin.
        only_if_cached: bool,
    },
    Bypass(&'static str),
    /// A GET or HEAD never served from the cache (no-store, Authorization, a body...) that asks
    /// for `only-if-cached`: nothing it may be answered with, and it must not reach the origin.
    NotCached,
}

fn classify<B>(req: &Request<B>, opts: &Options) -> Route {
    let m = req.method();
    if m != Method::GET && m != Method::HEAD {
        return Route::Bypass("method");
    }
    let h = req.headers();
    let scan = HeadScan::of(h);
    let bypass = |detail| {
        if scan.only_if_cached {
            Route::NotCached
        } else {
            Route::Bypass(detail)
        }
    };
    // More than one Host, or an absolute-form target naming another authority than Host: which
    // host the response is for depends on who reads which (RFC 9112 section 3.2 makes the first
    // a 400, section 3.2.2 has a proxy replace Host). Never keyed on a guess: a request that
    // could store one host's response under another's key is not cached.
    if scan.hosts > 1
        || scan
            .host
            .is_some_and(|h| !host_matches_target(req.uri(), h))
    {
        return bypass("host");
    }
    if scan.authorization {
        // Never served from or stored in the shared cache (RFC 9111 section 3.5, read
        // conservatively): and never a pass marker, so it cannot switch the URL's cache off.
        return bypass("authorization");
    }
    if scan.no_store {
        return bypass("no-store");
    }
    // A GET with a body is not a cacheable request shape (and its body is not in the key).
    if scan.body {
        return bypass("request-body");
    }
    if scan.cookie && opts.defaults.ttl.is_some() && has_relevant_cookie(h, &opts.cookies) {
        return bypass("cookie");
    }
    // Build the slot from the request head without consuming it.
    let slot = match &opts.key_fn {
        Some(f) => {
            let (parts, ()) = head_only(req).into_parts();
            match f(&parts) {
                Some(k) => user_slot(&k),
                None => return bypass("key"),
            }
        }
        None => url_slot(req.uri(), scan.host),
    };
    Route::Cache {
        slot,
        conditional: scan.conditional,
        only_if_cached: scan.only_if_cached,
    }
}

/// What the cache needs to know of a request's headers, found in one pass over them: a hit
/// would otherwise pay for about eight hash lookups, most of them for headers that are absent.
#[derive(Default)]
struct HeadScan<'a> {
    authorization: bool,
    /// `Cache-Control: no-store`.
    no_store: bool,
    /// `Cache-Control: only-if-cached`.
    only_if_cached: bool,
    /// `Transfer-Encoding`, or a `Content-Length` other than 0.
    body: bool,
    /// Any `Cookie` (which ones matter is [`has_relevant_cookie`]'s to say).
    cookie: bool,
    /// `If-None-Match` or `If-Modified-Since`: the response may be a 304.
    conditional: bool,
    /// The first `Host`.
    host: Option<&'a HeaderValue>,
    /// How many `Host` lines (saturating).
    hosts: u8,
}

impl<'a> HeadScan<'a> {
    fn of(h: &'a HeaderMap) -> Self {
        let mut s = HeadScan::default();
        for (name, v) in h {
            if name == header::HOST {
                s.host = s.host.or(Some(v));
                s.hosts = s.hosts.saturating_add(1);
            } else if name == header::AUTHORIZATION {
                s.authorization = true;
            } else if name == header::CACHE_CONTROL {
                let (no_store, only_if_cached) = request_directives(v);
                s.no_store |= no_store;
                s.only_if_cached |= only_if_cached;
            } else if name == header::TRANSFER_ENCODING {
                s.body = true;
            } else if name == header::CONTENT_LENGTH {
                s.body |= v != "0";
            } else if name == header::COOKIE {
                s.cookie = true;
            } else if name == header::IF_NONE_MATCH || name == header::IF_MODIFIED_SINCE {
                s.conditional = true;
            }
        }
        s
    }
}

/// Whether `host` names the target's authority, where the target has one (absolute form).
fn host_matches_target(uri: &http::Uri, host: &HeaderValue) -> bool {
    uri.authority().is_none_or(|a| {
        let scheme = uri.scheme_str().unwrap_or("http");
        authority_key(scheme, a.as_str().as_bytes()) == authority_key(scheme, host.as_bytes())
    })
}

fn head_only<B>(req: &Request<B>) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}

/// Whether a request's `Cache-Control` line holds `no-store`, and `only-if-cached` (read as
/// bytes: obs-text elsewhere on the line does not hide them).
fn request_directives(v: &HeaderValue) -> (bool, bool) {
    v.as_bytes()
        .split(|&b| b == b',')
        .fold((false, false), |(ns, oic), d| {
            let d = d.trim_ascii();
            (
                ns || d.eq_ignore_ascii_case(b"no-store"),
                oic || d.eq_ignore_ascii_case(b"only-if-cached"),
            )
        })
}

/// The answer to an `only-if-cached` request the cache has nothing for (RFC 9111 section
/// 5.2.1.7): a 504, with no `fwd` (RFC 9211 section 2.2): nothing was forwarded.
fn not_cached<B>(opts: &Options) -> Response<ResponseBody<B>> {
    plain_error(
        StatusCode::GATEWAY_TIMEOUT,
        cache_status::not_forwarded(&opts.name, "only-if-cached"),
        "not in the cache, and only-if-cached\n",
    )
}

/// A request with `Cache-Control: only-if-cached` (RFC 9111 section 5.2.1.7): the stored
/// response while it is fresh, else a 504. Nothing reaches the origin: no fill, no wait on
/// another request's fill, no refresh.
async fn from_cache_only<S, B>(
    state: Arc<ReqState<S, B>>,
    key: CacheKey,
) -> Response<ResponseBody<B>>
where
    S: Send,
    B: Send,
{
    let opts = &state.shared.opts;
    if let Some(served) = state.shared.engine.get_fresh(key).await {
        // An entry the layer cannot read is a miss here: refetching it would reach the origin.
        if let Some(res) = respond(opts, served, &state) {
            return res;
        }
    }
    not_cached(opts)
}

fn has_relevant_cookie(h: &HeaderMap, policy: &CookiePolicy) -> bool {
    let mut cookies = h.get_all(header::COOKIE).iter().peekable();
    if cookies.peek().is_none() {
        return false;
    }
    match policy {
        CookiePolicy::Cache => false,
        CookiePolicy::Bypass => true,
        CookiePolicy::Ignore(names) => cookies.any(|v| {
            let Ok(s) = v.to_str() else { return true };
            s.split(';').any(|c| {
                let name = c.split('=').next().unwrap_or("").trim();
                !name.is_empty() && !names.iter().any(|n| n == name)
            })
        }),
    }
}

/// What a caller's own fill leaves for it beyond the value: a body too large to buffer, and why
/// a response was passed.
struct SideState<B> {
    /// This request's own response, when it must not come from the shared value: a body too
    /// large to buffer, a passed response (with its `Set-Cookie`), the origin's own 5xx.
    own: Option<Response<ResponseBody<B>>>,
    detail: Option<&'static str>,
    /// This request's fill revalidated a stale entry, and the origin answered with this status.
    revalidated: Option<StatusCode>,
}

impl<B> Default for SideState<B> {
    fn default() -> Self {
        SideState {
            own: None,
            detail: None,
            revalidated: None,
        }
    }
}

type Side<B> = Mutex<SideState<B>>;

/// One request's head and side state, in one allocation shared by its selector, its fill and
/// its response.
struct ReqState<S, B> {
    parts: Parts,
    /// The request has validators (see [`HeadScan`]), so a stored 200 may be answered with 304.
    conditional: bool,
    side: Side<B>,
    /// The inner service, until a fill takes it: a hit leaves it here, for [`unreadable`].
    inner: Mutex<Option<S>>,
    /// The layer's shared state: held here so a request clones its `Arc` once (every clone is
    /// an atomic on a cache line all threads share).
    shared: Arc<Shared>,
}

/// A request's variant is picked by its own headers.
impl<S: Send, B: Send> Select for ReqState<S, B> {
    fn variant(&self, selector: &[u8]) -> Option<Digest> {
        variant_of(selector, &self.parts.headers)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request the cache does not handle: straight to the inner service, with its Cache-Status;
/// a successful unsafe method invalidates its URL.
async fn bypass<S, ReqB, ResB>(
    shared: Arc<Shared>,
    mut inner: S,
    req: Request<ReqB>,
    detail: &'static str,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    ReqB: Default + Send + 'static,
    ResB: Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Into<BoxError>,
{
    let opts = &shared.opts;
    metrics::counter!("stampede_http_bypass_total", "reason" => detail).increment(1);
    let unsafe_head = (opts.invalidate_on_unsafe && !req.method().is_safe())
        .then(|| head_only(&req).into_parts().0);
    std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
    let res = inner.call(req).await?;
    if let Some(head) = unsafe_head {
        if res.status().is_success() || res.status().is_redirection() {
            // RFC 9111 section 4.4: the target URI, and the URIs in `Location` and
            // `Content-Location` when they are of the target's origin (a redirect after a POST
            // then reads the new state, not the stored one).
            let mut slots: Vec<Digest> = Vec::new();
            let mut add = |head: &Parts| {
                for slot in slots_of(opts, head) {
                    if !slots.contains(&slot) {
                        slots.push(slot);
                    }
                }
            };
            add(&head);
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                let named = res.headers().get(name).and_then(|v| same_origin(&head, v));
                for uri in named.into_iter().flatten() {
                    let mut other = head.clone();
                    other.uri = uri;
                    add(&other);
                }
            }
            // On a task of its own, awaited: the origin has applied the request, so its
            // invalidations must all happen even if its client goes away (dropping this future)
            // halfway through them.
            let engine = shared.engine.clone();
            let _ = tokio::spawn(async move {
                for slot in slots {
                    // Best effort: a failed invalidation leaves the entry to expire, and the
                    // store is not asked again for this response (it is likely down), unless
                    // the store answered and only that key's data was in the way.
                    match engine.invalidate_slot(&slot).await {
                        Err(e) if !e.is_store_answered() => break,
                        _ => {}
                    }
                }
            })
            .await;
        }
    }
    let (mut parts, body) = res.into_parts();
    cache_status::add(&mut parts.headers, cache_status::bypass(&opts.name, detail));
    Ok(Response::from_parts(
        parts,
        ResponseBody::stream(VecDeque::new(), Box::pin(body)),
    ))
}

/// The slot a request's URL is stored at, `None` when the key function bypasses it.
fn slot_of(opts: &Options, head: &Parts) -> Option<Digest> {
    match &opts.key_fn {
        Some(f) => f(head).map(|k| user_slot(&k)),
        None => Some(url_slot(&head.uri, head.headers.get(header::HOST))),
    }
}

/// The slots a request's URL may be stored at, to invalidate: the key function's, or the URL's
/// under http and under https (see [`url_slot_as`]); none when the key function bypasses it.
fn slots_of(opts: &Options, head: &Parts) -> Vec<Digest> {
    match &opts.key_fn {
        Some(_) => slot_of(opts, head).into_iter().collect(),
        None => {
            let host = head.headers.get(header::HOST);
            // Its own scheme (as `url_slot` keys it), then whichever of these it is not.
            let own = head.uri.scheme_str().unwrap_or("http");
            std::iter::once(own)
                .chain(["http", "https"].into_iter().filter(|s| *s != own))
                .map(|scheme| url_slot_as(scheme, &head.uri, host))
                .collect()
        }
    }
}

/// A `Location` or `Content-Location` value as URIs of the request's origin, in the form of the
/// request's own target (origin-form targets are keyed with their `Host`); `None` for another
/// origin or for what it does not read (a network-path `//host/p`, a URI without an authority).
/// A relative reference is resolved against the request's path (RFC 3986 section 5.2). A path
/// with dot segments or escaped unreserved characters gives two URIs: as written (keys are the
/// raw target, so a stored `/a/../b` is this one) and normalized (section 6.2.2: `/b`, what a
/// client following it asks for; `/a/%2e%2e/b` too).
/// Against an origin-form target, whose scheme this layer cannot know (TLS may end in front of
/// it), the host and port decide.
fn same_origin(head: &Parts, v: &HeaderValue) -> Option<Vec<http::Uri>> {
    let v = v.to_str().ok()?;
    let v = v.split('#').next().unwrap_or_default().trim();
    // A colon before the first `/` or `?` starts a scheme (RFC 3986 section 4.2: a relative
    // path's first segment has none).
    let first_segment = &v[..v.find(['/', '?']).unwrap_or(v.len())];
    let path_and_query = if v.is_empty() || v.starts_with("//") {
        return None;
    } else if v.starts_with('/') {
        v.to_owned()
    } else if first_segment.contains(':') {
        let uri: http::Uri = v.parse().ok()?;
        let (scheme, authority) = (uri.scheme_str()?, uri.authority()?.as_str());
        // Each authority without its own scheme's default port (`a.test:80` is `a.test`).
        let theirs = authority_key(scheme, authority.as_bytes());
        let same = match head.uri.authority() {
            Some(a) => {
                let ours = head.uri.scheme_str().unwrap_or("http");
                scheme.eq_ignore_ascii_case(ours)
                    && theirs == authority_key(ours, a.as_str().as_bytes())
            }
            None => head
                .headers
                .get(header::HOST)
                .is_some_and(|h| theirs == authority_key("http", h.as_bytes())),
        };
        if !same {
            return None;
        }
        // `http://a.test` and `http://a.test?q` name the path `/` (RFC 9110 section 4.2.3).
        match uri.path_and_query().map_or("/", |pq| pq.as_str()) {
            pq if pq.starts_with('/') => pq.to_owned(),
            pq => format!("/{pq}"),
        }
    } else {
        // RFC 3986 section 5.2.2: `?q` keeps the request's path; a path replaces its last
        // segment.
        let base = head.uri.path();
        if v.starts_with('?') {
            format!("{base}{v}")
        } else {
            let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{v}")
        }
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query.as_str(), None),
    };
    let with_target = |pq: &str| {
        let mut parts = head.uri.clone().into_parts();
        parts.path_and_query = Some(pq.parse().ok()?);
        http::Uri::from_parts(parts).ok()
    };
    let mut uris = vec![with_target(&path_and_query)?];
    let normal = remove_dot_segments(&decode_unreserved(path)).into_owned();
    if normal != path {
        let normal = match query {
            Some(q) => format!("{normal}?{q}"),
            None => normal,
        };
        uris.extend(with_target(&normal));
    }
    Some(uris)
}

/// Request headers of a shared fill: no conditionals and no `Range`, so the leader's request
/// shape (a 304, a 206) is never handed to followers.
fn fill_headers(h: &HeaderMap) -> HeaderMap {
    let mut out = own_fill_headers(h);
    for n in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
        header::RANGE,
    ] {
        out.remove(n);
    }
    out
}

/// Request headers of a fill whose response goes to its caller alone (a pass fill on a URL
/// that is not cacheable): the caller's own, conditionals and `Range` included, so the origin
/// can answer it with a 304 or a 206 (RFC 9111 section 4.3.2: preconditions are the origin's to
/// evaluate when the cache does not), which are never stored.
fn own_fill_headers(h: &HeaderMap) -> HeaderMap {
    let mut out = h.clone();
    // The fill's body is empty, whatever the caller's framing said.
    out.remove(header::CONTENT_LENGTH);
    out.remove(header::TRANSFER_ENCODING);
    out
}

/// Put in the extensions of a response the inner service made itself, with no answer from the
/// origin behind it: a proxy's own 502 when the upstream is unreachable, its 504 when the
/// upstream timed out. The layer treats it as any other response of its status, but its
/// `Cache-Status` names no `fwd-status`, which RFC 9211 section 2.3 keeps for the status the
/// next hop returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NotForwarded;

/// An origin 5xx, carried as the fill's error so the engine applies stale-if-error and signals
/// `failed`. The response itself goes only to the request whose own fill received it (it may be
/// private); the others get a generic page with its status and its `Retry-After`.
#[derive(Debug)]
pub(crate) struct UpstreamFailure {
    status: StatusCode,
    retry_after: Option<HeaderValue>,
}

/// The origin's 5xx `res` as the fill's error: the response kept whole for this request alone,
/// its status and `Retry-After` for the others.
fn relay_failure<B>(side: &Side<B>, res: Response<ResponseBody<B>>) -> Box<UpstreamFailure> {
    let failure = Box::new(UpstreamFailure {
        status: res.status(),
        retry_after: res.headers().get(header::RETRY_AFTER).cloned(),
    });
    lock(side).own = Some(res);
    failure
}

impl std::fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "origin answered {}", self.status)
    }
}

impl std::error::Error for UpstreamFailure {}

async fn fill_from_origin<S, ReqB, ResB>(
    inner: Option<S>,
    state: Arc<ReqState<S, ResB>>,
    prev: Option<Prev>,
) -> Result<Fill, BoxError>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    ReqB: Default + Send + 'static,
    ResB: Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Into<BoxError>,
{
    // `None` cannot happen: a request's first fill takes its service, and a second try (see
    // `unreadable`) brings a clone.
    let mut inner = inner.ok_or("the request's service was already used by its fill")?;
    let opts = &state.shared.opts;
    let (parts, side) = (&state.parts, &state.side);
    let headers = fill_headers(&parts.headers);
    let mut policy_req = Request::new(());
    *policy_req.uri_mut() = parts.uri.clone();
    // On a URL that is not cacheable, nobody else gets this response (no stale copy is
    // revalidated either): HEAD stays HEAD, and the caller's conditionals and Range go too.
    let alone = crate::engine::fill_is_pass() && prev.is_none();
    let sent = if alone {
        own_fill_headers(&parts.headers)
    } else {
        headers.clone()
    };
    *policy_req.headers_mut() = headers;

    // HEAD becomes GET, so the entry serves both; but on a URL that is not cacheable nobody
    // else gets this response, and a GET would fetch a body only to drop it.
    let head_pass = parts.method == Method::HEAD && crate::engine::fill_is_pass();
    let request = |headers: HeaderMap| {
        let mut req = Request::new(ReqB::default());
        *req.method_mut() = if head_pass { Method::HEAD } else { Method::GET };
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = headers;
        // The leader's extensions (connection info...) travel with the fill, like its headers.
        *req.extensions_mut() = parts.extensions.clone();
        req
    };
    // Revalidate a stale entry with its validators.
    let mut prev_stored = prev.as_ref().and_then(|p| StoredResponse::decode(&p.value));
    let mut req = request(sent);
    if let Some(ps) = &prev_stored {
        if let Some(etag) = ps.headers.get(header::ETAG) {
            // `try_`: a caller's map may already hold all the names a `HeaderMap` can (an
            // in-process caller; a server refuses that many): then no validator, no panic.
            let _ = req
                .headers_mut()
                .try_insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(lm) = ps.headers.get(header::LAST_MODIFIED) {
            let _ = req
                .headers_mut()
                .try_insert(header::IF_MODIFIED_SINCE, lm.clone());
        }
    }

    std::future::poll_fn(|cx| inner.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    let mut res = inner.call(req).await.map_err(Into::into)?;
    // RFC 9111 section 4.3.4: a 304 whose entity-tag is not the stored response's (another
    // origin server's representation, answering the If-Modified-Since sent beside) must not
    // freshen it. Asked again without conditions, and that answer judged on its own.
    if let Some(ps) = &prev_stored {
        if res.status() == StatusCode::NOT_MODIFIED
            && !same_representation(
                ps.headers.get(header::ETAG),
                res.headers().get(header::ETAG),
            )
        {
            tracing::debug!(
                path = %parts.uri.path(),
                "a 304 named another entity-tag than the stored response's; asked again without \
                 conditions"
            );
            prev_stored = None;
            drop(res);
            std::future::poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            // A revalidation is never `alone`: it sent the policy request's headers, and
            // sends them again without the validators added above.
            res = inner
                .call(request(policy_req.headers().clone()))
                .await
                .map_err(Into::into)?;
        }
    }
    let (mut rparts, body) = res.into_parts();
    if prev.is_some() {
        lock(side).revalidated = Some(rparts.status);
    }
    // RFC 9110 section 6.6.1: a response without `Date` gets the time it was received, when
    // it is cached or forwarded, so a hit's `Date` is not the time of the hit. (`try_`: a
    // full map goes without.)
    if !rparts.headers.contains_key(header::DATE) {
        let now = httpdate::fmt_http_date(std::time::SystemTime::now());
        if let Ok(v) = HeaderValue::from_str(&now) {
            let _ = rparts.headers.try_insert(header::DATE, v);
        }
    }

    if rparts.status == StatusCode::NOT_MODIFIED {
        if let Some(ps) = prev_stored {
            // Past what is stored (a `HeaderMap` panics past 24,576 names): not merged, the
            // stored response served as it was, and the entry left to its expiry.
            if ps.headers.len() + rparts.headers.len() > MAX_HEADERS {
                let mut res = Response::new(ResponseBody::full(ps.body));
                *res.status_mut() = ps.status;
                *res.headers_mut() = ps.headers;
                return Ok(own(side, "too-many-headers", res));
            }
            // RFC 9111 section 4.3.4: freshen the stored response with the 304's headers.
            let mut merged = ps.headers.clone();
            for name in rparts.headers.keys() {
                if !is_hop_by_hop(name) && name != header::CONTENT_LENGTH {
                    merged.remove(name);
                }
            }
            for (name, v) in &rparts.headers {
                if !is_hop_by_hop(name) && name != header::CONTENT_LENGTH {
                    merged.append(name.clone(), v.clone());
                }
            }
            let mut probe = Response::new(());
            *probe.status_mut() = ps.status;
            *probe.headers_mut() = merged;
            let (probe, ()) = probe.into_parts();
            let detail = match decide(&policy_req, &probe, &opts.defaults) {
                Decision::Store { ttl, selector } => {
                    match StoredResponse::new(ps.status, &probe.headers, ps.body.clone()) {
                        Some(stored) => {
                            return Ok(Fill::Store {
                                value: stored.encode(),
                                ttl,
                                selector: selector.map(Bytes::from),
                            })
                        }
                        None => "too-many-headers",
                    }
                }
                Decision::Pass(detail) => detail,
            };
            let res = Response::from_parts(probe, ResponseBody::full(ps.body));
            return Ok(own(side, detail, res));
        }
    }

    let failed = rparts.status.is_server_error();
    if head_pass {
        // Never stored: a HEAD response has no body to serve a GET with.
        let detail = match decide(&policy_req, &rparts, &opts.defaults) {
            Decision::Pass(detail) => detail,
            Decision::Store { .. } => "head",
        };
        let res = Response::from_parts(rparts, ResponseBody::empty());
        if failed {
            return Err(relay_failure(side, res));
        }
        return Ok(own(side, detail, res));
    }
    // Decided from the headers alone, before the body: `None` for a failure (5xx).
    let store = if failed {
        None
    } else {
        match decide(&policy_req, &rparts, &opts.defaults) {
            Decision::Store { ttl, selector } => Some((ttl, selector)),
            // Its headers already say it is not stored: relay the body as it comes,
            // unbuffered, so a stream (server-sent events, a long poll, a large download marked
            // no-store) reaches its one caller at once and is not cut at `max_body`.
            Decision::Pass(detail) => {
                let body = ResponseBody::stream(VecDeque::new(), Box::pin(body));
                return Ok(own(side, detail, Response::from_parts(rparts, body)));
            }
        }
    };
    let buffered = match buffer(Box::pin(body), opts.max_body).await {
        Ok(b) => b,
        Err(e) => {
            // Once per fill: every request waiting on it gets the error response.
            // With its causes: hyper's own message ("error reading a body") does not say why.
            let mut why = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                why.push_str(": ");
                why.push_str(&c.to_string());
                cause = c.source();
            }
            tracing::warn!(
                path = %parts.uri.path(),
                status = rparts.status.as_u16(),
                error = %why,
                "the origin's response body failed before its end; nothing stored"
            );
            return Err(e);
        }
    };
    match buffered {
        Buffered::Overflow { prefix, rest } => {
            let res = Response::from_parts(rparts, ResponseBody::stream(prefix, rest));
            if failed {
                // Still a failure (stale-if-error, the failed signal), never a pass marker.
                return Err(relay_failure(side, res));
            }
            Ok(own(side, "too-large", res))
        }
        Buffered::Complete(bytes) => match store {
            Some((ttl, selector)) => {
                match StoredResponse::new(rparts.status, &rparts.headers, bytes.clone()) {
                    Some(stored) => Ok(Fill::Store {
                        value: stored.encode(),
                        ttl,
                        selector: selector.map(Bytes::from),
                    }),
                    None => {
                        let res = Response::from_parts(rparts, ResponseBody::full(bytes));
                        Ok(own(side, "too-many-headers", res))
                    }
                }
            }
            None => {
                let res = Response::from_parts(rparts, ResponseBody::full(bytes));
                Err(relay_failure(side, res))
            }
        },
    }
}

/// A response for this request alone (passed: never stored, never shared): kept whole, with its
/// `Set-Cookie`, in the caller's side state; the engine's value is empty.
fn own<B>(side: &Side<B>, detail: &'static str, res: Response<ResponseBody<B>>) -> Fill {
    let mut st = lock(side);
    st.detail = Some(detail);
    st.own = Some(res);
    Fill::Pass {
        value: Bytes::new(),
    }
}

/// The response for what the engine served; `None` when the stored value is not a response
/// this layer can read (see [`unreadable`]).
fn respond<S, B>(
    opts: &Options,
    served: Served,
    state: &ReqState<S, B>,
) -> Option<Response<ResponseBody<B>>> {
    let (req, side, conditional) = (&state.parts, &state.side, state.conditional);
    let (detail, revalidated) = {
        let s = lock(side);
        (s.detail, s.revalidated)
    };
    // Our own fill ran and its response is ours alone (passed, too large, or while the store
    // is down).
    if matches!(served.status, Status::Passed | Status::Bypass) {
        if let Some(res) = lock(side).own.take() {
            let cs = cache_status::for_status(&opts.name, served.status, None, detail);
            return Some(finish_own(res, cs, req));
        }
    }
    // `None` cannot happen for values this layer wrote; a foreign writer under our prefix (or
    // a damaged store) could leave one.
    let stored = decoded(served.value)?;
    let now = served.at_ms;
    let (age, ttl) = match &served.meta {
        Some(m) => (
            u64::from(stored.origin_age) + m.age_secs(now),
            Some(m.ttl_ms(now).div_euclid(1000)),
        ),
        None => (u64::from(stored.origin_age), None),
    };
    // RFC 9111 section 5.1: an Age too large to hold is sent as 2^31.
    let age = age.min(u64::from(DELTA_SECONDS_MAX));
    let cs = match (detail, revalidated) {
        (_, Some(code)) if served.status == Status::Stored => {
            cache_status::revalidated(&opts.name, code.as_u16(), ttl)
        }
        (None, _) => cache_status::for_status_memo(&opts.name, served.status, ttl),
        (Some(_), _) => cache_status::for_status(&opts.name, served.status, ttl, detail),
    };
    let StoredResponse {
        status,
        mut headers,
        body,
        ..
    } = stored;
    // Both set in place of the placeholders `decoded` may have left.
    if age > 0
        || matches!(
            served.status,
            Status::Hit | Status::Stale(_) | Status::Collapsed
        )
    {
        headers.insert(header::AGE, age_value(age));
    } else {
        headers.remove(header::AGE);
    }
    cache_status::add(&mut headers, cs);

    if status == StatusCode::OK && conditional && not_modified(&req.headers, &headers) {
        let mut res = Response::new(ResponseBody::empty());
        *res.status_mut() = StatusCode::NOT_MODIFIED;
        let h = res.headers_mut();
        for n in [
            header::CACHE_CONTROL,
            header::CONTENT_LOCATION,
            header::DATE,
            header::ETAG,
            header::EXPIRES,
            header::VARY,
            header::LAST_MODIFIED,
            header::AGE,
        ] {
            for v in headers.get_all(&n) {
                h.append(n.clone(), v.clone());
            }
        }
        if let Some(v) = headers.get(CACHE_STATUS) {
            h.insert(CACHE_STATUS, v.clone());
        }
        return Some(res);
    }

    // Stored with the entry since this version; entries written before it get one here.
    if status != StatusCode::NO_CONTENT
        && !status.is_informational()
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        headers.insert(header::CONTENT_LENGTH, header_int(body.len() as u64));
    }
    let body = if req.method == Method::HEAD {
        ResponseBody::empty()
    } else {
        ResponseBody::full(body)
    };
    let mut res = Response::new(body);
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    Some(res)
}

thread_local! {
    /// The last `Age` value built on this thread.
    static LAST_AGE: super::last::Last<u64> = const { std::cell::RefCell::new(None) };
}

/// `Age: age`, reusing the last value this thread built when it is the same.
fn age_value(age: u64) -> HeaderValue {
    super::last::reuse(&LAST_AGE, age, |a, _| *a == age, || header_int(age))
}

/// Values up to this size are decoded from a copy owned by the serving thread, and remembered
/// (see [`decoded`]).
const LOCAL_COPY_MAX: usize = 16 * 1024;
/// How many decoded values each thread remembers.
const MEMO_SLOTS: usize = 8;

#[derive(Default)]
struct MemoSlot {
    /// A value as served (this thread's own copy of it) and its decoded form.
    kept: Option<(Bytes, StoredResponse)>,
    /// The fingerprint of the last value decoded in this slot and not kept: a value is kept
    /// when it comes a second time in a row, so values served once each (many keys, or a cold
    /// store) do not pay for keeping one.
    seen: u64,
}

thread_local! {
    /// The values this thread decoded last.
    static DECODED: std::cell::RefCell<[MemoSlot; MEMO_SLOTS]> = Default::default();
}

/// A cheap fingerprint of a stored response: its length and a few of its bytes. It only
/// chooses a memo slot and notes what was seen; a memo hit compares the whole value.
fn fingerprint(v: &[u8]) -> u64 {
    let word = |at: usize| {
        let mut w = [0u8; 8];
        let part = &v[at.min(v.len())..];
        let n = part.len().min(8);
        w[..n].copy_from_slice(&part[..n]);
        u64::from_le_bytes(w)
    };
    let tail = word(v.len().saturating_sub(8));
    let mid = word(v.len() / 2);
    (v.len() as u64 ^ tail.rotate_left(17) ^ mid.rotate_left(41))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The stored response in `value`, decoded once per thread while the same value keeps being
/// served (a hot key), else decoded afresh. Its headers may hold placeholder `Age` and
/// `Cache-Status` values (empty; an earlier cache's stored `Cache-Status` is kept instead), for
/// the caller to replace: a clone of a `HeaderMap` has no spare room, and adding two names to it
/// would grow it on every hit.
///
/// A hot entry's buffer is shared by every request serving it, on every thread, and each clone
/// or drop of a slice of it is an atomic on one contended cache line (measured: 11% of a hit on
/// two threads). So a small value is decoded from a copy that only this thread counts
/// references on, and the memo keeps that copy, never the store's buffer (which may be a slice
/// of a connection's read buffer). A memo hit is a whole-value comparison: decoding depends on
/// the bytes alone, so equal bytes are the same response. At most `MEMO_SLOTS *
/// LOCAL_COPY_MAX` bytes per thread are held.
fn decoded(value: Bytes) -> Option<StoredResponse> {
    if value.len() > LOCAL_COPY_MAX {
        return StoredResponse::decode(&value);
    }
    let fp = fingerprint(&value);
    let slot = (fp >> 32) as usize % MEMO_SLOTS;
    crate::local::with(
        &DECODED,
        |memo| {
            let m = &mut memo[slot];
            if let Some((kept, stored)) = &m.kept {
                if kept[..] == value[..] {
                    return Some(stored.clone());
                }
            }
            let (copy, stored) = decode_copy(&value)?;
            if m.seen == fp {
                m.kept = Some((copy, stored.clone()));
            } else {
                m.seen = fp;
            }
            Some(stored)
        },
        || decode_copy(&value).map(|(_, stored)| stored),
    )
}

/// `value` decoded from this thread's own copy of it (returned too), with placeholder `Age` and
/// `Cache-Status` (see [`decoded`]).
fn decode_copy(value: &[u8]) -> Option<(Bytes, StoredResponse)> {
    let copy = Bytes::copy_from_slice(value);
    let mut stored = StoredResponse::decode(&copy)?;
    stored
        .headers
        .insert(header::AGE, HeaderValue::from_static(""));
    // An earlier cache's `Cache-Status`, stored with the response, stays: ours goes after it.
    if !stored.headers.contains_key(CACHE_STATUS) {
        stored
            .headers
            .insert(CACHE_STATUS, HeaderValue::from_static(""));
    }
    Some((copy, stored))
}

/// The store served a value under this URL that is not a response this layer wrote (a foreign
/// writer under the prefix, a damaged store): it is dropped (invalidated, so no request meets it
/// again until it expires) and this request goes through the cache once more, and fills. The
/// retry keeps the request's deadline (`wait_timeout` from its arrival), and uses a clone of
/// the request's service: a refresh the value started (stale, or XFetch)
/// may take the service itself at any time, and either must be able to fill. Only when the drop
/// fails, or the refresh already took the service, is the answer a 502 that says so.
async fn unreadable<S, ReqB, ResB>(
    state: &Arc<ReqState<S, ResB>>,
    arrived: tokio::time::Instant,
) -> Response<ResponseBody<ResB>>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    ReqB: Default + Send + 'static,
    ResB: Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Into<BoxError>,
{
    let opts = &state.shared.opts;
    let mut body = "the cache held an unreadable entry for this URL; it has been dropped, retry\n";
    // The slot `classify` keyed the request with (it served a value, so the key function, if
    // any, named one).
    if let Some(slot) = slot_of(opts, &state.parts) {
        // Cloned before the drop's round trip, while a refresh is least likely to have taken it.
        let inner = lock(&state.inner).clone();
        let dropped = state.shared.engine.invalidate_slot(&slot).await;
        tracing::warn!(
            %slot,
            dropped = dropped.is_ok(),
            "the store held a value under this URL that is not a stored response; dropped it"
        );
        if dropped.is_err() {
            body = "the cache holds an unreadable entry for this URL and the store failed to \
                    drop it; retry later\n";
        }
        if let (Ok(()), Some(inner)) = (dropped, inner) {
            // A side state of its own: a refresh still running writes into the first one.
            let again = Arc::new(ReqState {
                parts: state.parts.clone(),
                conditional: state.conditional,
                side: Mutex::new(SideState::default()),
                inner: Mutex::new(None),
                shared: state.shared.clone(),
            });
            let key = CacheKey::from_digest(slot).with_selector(again.clone());
            let fill_state = again.clone();
            let fill = move |prev: Option<Prev>| fill_from_origin(Some(inner), fill_state, prev);
            // The request's one deadline still counts from its arrival.
            let served = again.shared.engine.get_or_fill_since(key, fill, arrived);
            match served.await {
                Ok(s) => {
                    if let Some(mut res) = respond(opts, s, &again) {
                        cache_status::add_detail(res.headers_mut(), "replaced-unreadable-entry");
                        return res;
                    }
                }
                Err(e) => return error_response(opts, e, &again.parts, &again.side),
            }
        }
    }
    let cs = cache_status::error(&opts.name, None, "unreadable-entry");
    plain_error(StatusCode::BAD_GATEWAY, cs, body)
}

/// Does the client's conditional request match the stored response (RFC 9110 section 13)?
fn not_modified(req: &HeaderMap, stored: &HeaderMap) -> bool {
    let inm: Vec<&HeaderValue> = req.get_all(header::IF_NONE_MATCH).iter().collect();
    if inm.iter().any(|v| v.as_bytes().trim_ascii() == b"*") {
        // "*" matches any current representation, and we have one.
        return true;
    }
    if !inm.is_empty() {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let ours = weak(etag);
        // An origin that sends its ETag unquoted (not RFC 9110's syntax) is still matched, as
        // clients echo it: such a list is read split on commas.
        let quoted = ours.starts_with('"');
        return inm.iter().any(|v| {
            v.to_str()
                .map(|s| {
                    if quoted {
                        entity_tags(s).any(|t| weak(t) == ours)
                    } else {
                        s.split(',').any(|t| weak(t.trim()) == ours)
                    }
                })
                .unwrap_or(false)
        });
    }
    // Parse the stored Last-Modified only for a request that asks (a hit without conditionals
    // must not pay for a date parse).
    let Some(ims) = req
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| httpdate::parse_http_date(s).ok())
    else {
        return false;
    };
    let lm = stored
        .get(header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| httpdate::parse_http_date(s).ok());
    lm.is_some_and(|lm| lm <= ims)
}

/// The entity-tags of an `If-None-Match` list, as sent (`W/` kept). A tag may hold a comma
/// (RFC 9110 section 8.8.3: `etagc` is any visible byte but `"`), so the list is read tag by
/// tag, not split on commas; what is not a tag ends the list.
fn entity_tags(list: &str) -> impl Iterator<Item = &str> {
    let mut rest = list;
    std::iter::from_fn(move || {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        let start = rest;
        let body = rest.strip_prefix("W/").unwrap_or(rest).strip_prefix('"')?;
        let end = body.find('"')?;
        let (tag, after) = start.split_at(start.len() - body.len() + end + 1);
        rest = after;
        Some(tag)
    })
}

/// Whether a 304 with entity-tag `new` may freshen a stored response with entity-tag `stored`
/// (RFC 9111 section 4.3.4): a 304 without one may (the origin kept no validator, or answered
/// an If-Modified-Since); one with a tag needs the stored tag to be the same by the weak
/// comparison (RFC 9110 section 8.8.3.2). Weak, not strong, for a strong tag too: the origin
/// has just matched the stored tag we sent, and one that weakens its tag when it compresses
/// (nginx's gzip, by one report: its 304 is made before the tag is weakened) answers the
/// revalidation of a `W/"x"` copy with a 304 carrying `"x"`; a strict check would fetch every
/// such revalidation twice. What this refuses is a 304 for another tag altogether.
fn same_representation(stored: Option<&HeaderValue>, new: Option<&HeaderValue>) -> bool {
    let Some(new) = new else { return true };
    let Some(stored) = stored else { return false };
    fn opaque(t: &HeaderValue) -> &[u8] {
        let t = t.as_bytes().trim_ascii();
        t.strip_prefix(b"W/").unwrap_or(t)
    }
    opaque(new) == opaque(stored)
}

fn weak(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

fn error_response<B>(
    opts: &Options,
    e: Error,
    req: &Parts,
    side: &Side<B>,
) -> Response<ResponseBody<B>> {
    let (status, detail, body): (StatusCode, &str, &str) = match &e {
        Error::Fill(err) => {
            if let Some(up) = err.downcast_ref::<UpstreamFailure>() {
                // Our own fill got the origin's error: relay it whole.
                if let Some(res) = lock(side).own.take() {
                    let forwarded = res.extensions().get::<NotForwarded>().is_none();
                    let code = forwarded.then_some(up.status.as_u16());
                    let cs = cache_status::error(&opts.name, code, "origin-error");
                    return finish_own(res, cs, req);
                }
                // Others (waiting on that fill, or arriving while its lease runs) get its status
                // and Retry-After on a generic page (the error page may be private), and no
                // `fwd-status`: their own request was not forwarded (RFC 9211 section 2.3).
                let cs = cache_status::error(&opts.name, None, "origin-error");
                let mut res = plain_error(up.status, cs, "the origin failed\n");
                if let Some(ra) = &up.retry_after {
                    res.headers_mut().insert(header::RETRY_AFTER, ra.clone());
                }
                return res;
            }
            (StatusCode::BAD_GATEWAY, "origin-error", "origin error\n")
        }
        Error::Timeout(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            "wait-timeout",
            "timed out waiting for this URL's fill\n",
        ),
        Error::FailedElsewhere => (
            StatusCode::BAD_GATEWAY,
            "origin-failed-elsewhere",
            "the origin failed for another instance's fill\n",
        ),
        Error::FillTimeout(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            "fill-timeout",
            "the origin did not answer in time\n",
        ),
        Error::FillPanicked => (StatusCode::BAD_GATEWAY, "fill-failed", "the fill failed\n"),
    };
    tracing::debug!(error = %e, "serving an error response");
    plain_error(status, cache_status::error(&opts.name, None, detail), body)
}

/// A generic text page of ours with `status` and Cache-Status `cs`.
fn plain_error<B>(
    status: StatusCode,
    cs: HeaderValue,
    body: &'static str,
) -> Response<ResponseBody<B>> {
    let mut res = Response::new(ResponseBody::full(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    h.insert(CACHE_STATUS, cs);
    res
}

/// This request's own response: its Cache-Status, and no body for a HEAD.
fn finish_own<B>(
    mut res: Response<ResponseBody<B>>,
    cs: HeaderValue,
    req: &Parts,
) -> Response<ResponseBody<B>> {
    cache_status::add(res.headers_mut(), cs);
    if req.method == Method::HEAD {
        let (parts, _) = res.into_parts();
        return Response::from_parts(parts, ResponseBody::empty());
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(body: &'static [u8]) -> Bytes {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        StoredResponse::new(StatusCode::OK, &h, Bytes::from_static(body))
            .unwrap()
            .encode()
    }

    fn scan(pairs: &[(&'static str, &'static str)]) -> (bool, bool, bool, bool, bool, String) {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        let s = HeadScan::of(&h);
        let host = s.host.map(|v| v.to_str().unwrap().to_owned());
        (
            s.authorization,
            s.no_store,
            s.body,
            s.cookie,
            s.conditional,
            host.unwrap_or_default(),
        )
    }

    #[test]
    fn one_pass_over_the_request_headers_finds_what_a_hit_needs() {
        let none = (false, false, false, false, false, String::new());
        assert_eq!(scan(&[]), none);
        assert_eq!(scan(&[("accept", "*/*"), ("x-other", "1")]), none);
        assert!(scan(&[("authorization", "Basic x")]).0);
        // no-store in any Cache-Control line, in any case, among other directives.
        assert!(
            scan(&[
                ("cache-control", "max-age=0"),
                ("cache-control", "x, No-Store")
            ])
            .1
        );
        assert!(!scan(&[("cache-control", "no-cache, no-store-x")]).1);
        let only = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.append(header::CACHE_CONTROL, HeaderValue::from_static(v));
            HeadScan::of(&h).only_if_cached
        };
        assert!(only("max-stale, Only-If-Cached"));
        assert!(!only("only-if-cached-x, no-cache"));
        assert!(scan(&[("transfer-encoding", "chunked")]).2);
        // Every Content-Length counts, not only the first (the lookup this replaced read only
        // the first; hyper refuses conflicting values anyway).
        assert!(scan(&[("content-length", "0"), ("content-length", "5")]).2);
        assert!(!scan(&[("content-length", "0")]).2);
        assert!(scan(&[("cookie", "a=1")]).3);
        assert!(scan(&[("if-none-match", "\"e\"")]).4);
        assert!(scan(&[("if-modified-since", "Thu, 22 Oct 2015 07:28:00 GMT")]).4);
        assert!(!scan(&[("if-match", "\"e\""), ("if-range", "\"e\"")]).4);
        // The first Host, as `HeaderMap::get` gave.
        assert_eq!(scan(&[("host", "a.test"), ("host", "b.test")]).5, "a.test");
    }

    #[test]
    fn decoded_remembers_a_value_and_never_confuses_two() {
        // Two values that differ only where the fingerprint does not look: the same slot, the
        // same fingerprint, so only the whole-value comparison tells them apart.
        let body = |head: &str| -> &'static [u8] {
            Box::leak(
                format!("{head}{}", "x".repeat(200))
                    .into_bytes()
                    .into_boxed_slice(),
            )
        };
        let a = stored(body("first"));
        let b = stored(body("other"));
        assert_eq!(fingerprint(&a), fingerprint(&b));
        // Three times: kept at the second, the third answer comes from the memo.
        for _ in 0..3 {
            let d = decoded(a.clone()).unwrap();
            assert!(d.body.starts_with(b"first"));
            assert_eq!(d.headers.get(header::CONTENT_TYPE).unwrap(), "text/plain");
            assert_eq!(d.headers.get(header::CONTENT_LENGTH).unwrap(), "205");
            // The placeholders the caller replaces.
            assert_eq!(d.headers.get(header::AGE).unwrap(), "");
            assert_eq!(d.headers.get(CACHE_STATUS).unwrap(), "");
        }
        // The memo keeps its own copy, never the served buffer.
        assert!(a.is_unique());
        for _ in 0..3 {
            assert!(decoded(b.clone()).unwrap().body.starts_with(b"other"));
            assert!(decoded(a.clone()).unwrap().body.starts_with(b"first"));
        }
        // An equal value in another buffer is the same response.
        let a2 = Bytes::copy_from_slice(&a);
        assert!(decoded(a2).unwrap().body.starts_with(b"first"));
        // Garbage is `None`, however often it comes.
        let junk = Bytes::from_static(b"\xff\xff\x00\x00\x00\x00\x09\x00");
        for _ in 0..3 {
            assert!(decoded(junk.clone()).is_none());
        }
    }

    #[test]
    fn a_304_freshens_only_the_representation_it_names() {
        let h = |s: &'static str| Some(HeaderValue::from_static(s));
        let cases = [
            // (stored, 304's, may freshen)
            (h("\"a\""), h("\"a\""), true),
            (h("\"a\""), h(" \"a\" "), true),
            (h("\"a\""), h("\"b\""), false),
            // Compared weakly, either way (nginx's gzip: a W/ 200, a strong 304).
            (h("W/\"a\""), h("\"a\""), true),
            (h("\"a\""), h("W/\"a\""), true),
            (h("W/\"a\""), h("W/\"a\""), true),
            (h("W/\"a\""), h("W/\"b\""), false),
            // None stored: only a 304 without a tag.
            (None, h("\"a\""), false),
            (None, None, true),
            (h("\"a\""), None, true),
        ];
        for (stored, new, want) in cases {
            assert_eq!(
                same_representation(stored.as_ref(), new.as_ref()),
                want,
                "{stored:?} {new:?}"
            );
        }
    }

    #[test]
    fn entity_tags_may_hold_commas() {
        let tags: Vec<&str> = entity_tags(r#""a,b", W/"c" ,,"", "d"#).collect();
        assert_eq!(tags, [r#""a,b""#, r#"W/"c""#, r#""""#]);
        let mut stored = HeaderMap::new();
        stored.insert(header::ETAG, HeaderValue::from_static(r#""x,y""#));
        let mut req = HeaderMap::new();
        req.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static(r#""q", W/"x,y""#),
        );
        assert!(not_modified(&req, &stored));
        req.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static(r#""x", "y""#),
        );
        assert!(!not_modified(&req, &stored));
        // An unquoted ETag (not the RFC's syntax, but seen) is echoed by clients and matched.
        stored.insert(header::ETAG, HeaderValue::from_static("abc"));
        req.insert(header::IF_NONE_MATCH, HeaderValue::from_static("xyz, abc"));
        assert!(not_modified(&req, &stored));
    }

    #[test]
    fn age_values_are_the_age() {
        for age in [0, 0, 7, 7, 70, 0, u64::MAX] {
            assert_eq!(age_value(age), HeaderValue::from(age));
        }
    }

    #[test]
    fn a_value_beyond_the_copy_limit_is_decoded_in_place() {
        let body: &'static [u8] = Box::leak(vec![b'x'; LOCAL_COPY_MAX + 1].into_boxed_slice());
        let v = stored(body);
        let d = decoded(v.clone()).unwrap();
        assert_eq!(d.body.len(), LOCAL_COPY_MAX + 1);
        // Shared with the stored buffer, not copied.
        assert!(v.as_ptr_range().contains(&d.body.as_ptr()));
    }
}
