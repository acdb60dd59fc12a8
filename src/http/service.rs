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
use super::freshness::{decide, Decision};
use super::key::{url_slot, user_slot, variant_of};
use super::layer::{CookiePolicy, Options, Shared};
use super::stored::{is_hop_by_hop, StoredResponse};
use crate::clock::now_ms;
use crate::engine::{CacheKey, Fill, Prev, Served, Status};
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

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The ready service is the one we were polled on; leave a fresh clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(handle(self.shared.clone(), inner, req))
    }
}

enum Route {
    Cache(Digest),
    Bypass(&'static str),
}

fn classify<B>(req: &Request<B>, opts: &Options) -> Route {
    let m = req.method();
    if m != Method::GET && m != Method::HEAD {
        return Route::Bypass("method");
    }
    let h = req.headers();
    if h.contains_key(header::AUTHORIZATION) {
        // Never served from or stored in the shared cache (RFC 9111 section 3.5, read
        // conservatively): and never a pass marker, so it cannot switch the URL's cache off.
        return Route::Bypass("authorization");
    }
    if request_no_store(h) {
        return Route::Bypass("no-store");
    }
    if opts.defaults.ttl.is_some() && has_relevant_cookie(h, &opts.cookies) {
        return Route::Bypass("cookie");
    }
    // Build the slot from the request head without consuming it.
    let slot = match &opts.key_fn {
        Some(f) => {
            let (parts, ()) = head_only(req).into_parts();
            match f(&parts) {
                Some(k) => user_slot(&k),
                None => return Route::Bypass("key"),
            }
        }
        None => url_slot(req.uri(), h),
    };
    Route::Cache(slot)
}

fn head_only<B>(req: &Request<B>) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}

fn request_no_store(h: &HeaderMap) -> bool {
    h.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str()
            .map(|s| {
                s.split(',')
                    .any(|d| d.trim().eq_ignore_ascii_case("no-store"))
            })
            .unwrap_or(false)
    })
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
    streamed: Option<Response<ResponseBody<B>>>,
    detail: Option<&'static str>,
}

type Side<B> = Arc<Mutex<SideState<B>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn handle<S, ReqB, ResB>(
    shared: Arc<Shared>,
    mut inner: S,
    req: Request<ReqB>,
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
    let slot = match classify(&req, opts) {
        Route::Cache(slot) => slot,
        Route::Bypass(detail) => {
            let invalidate = (opts.invalidate_on_unsafe && !req.method().is_safe())
                .then(|| url_slot(req.uri(), req.headers()));
            let res = inner.call(req).await?;
            if let Some(slot) = invalidate {
                if res.status().is_success() || res.status().is_redirection() {
                    // Best effort: a failed invalidation leaves the entry to expire.
                    let _ = shared.engine.invalidate_slot(&slot).await;
                }
            }
            let (mut parts, body) = res.into_parts();
            parts
                .headers
                .insert(CACHE_STATUS, cache_status::bypass(&opts.name, detail));
            return Ok(Response::from_parts(
                parts,
                ResponseBody::stream(VecDeque::new(), Box::pin(body)),
            ));
        }
    };

    let (parts, _body) = req.into_parts();
    let parts = Arc::new(parts);
    let sel_parts = parts.clone();
    let key = CacheKey::from_digest(slot).with_selector(Arc::new(move |sel: &[u8]| {
        variant_of(sel, &sel_parts.headers)
    }));
    let side: Side<ResB> = Arc::new(Mutex::new(SideState {
        streamed: None,
        detail: None,
    }));
    let fill = {
        let parts = parts.clone();
        let side = side.clone();
        let shared = shared.clone();
        move |prev: Option<Prev>| fill_from_origin(inner, parts, prev, shared, side)
    };
    let served = shared.engine.get_or_fill_with(key, fill).await;
    Ok(match served {
        Ok(s) => respond(opts, s, &parts, &side),
        Err(e) => error_response(opts, e),
    })
}

/// Request headers of a shared fill: no conditionals and no `Range`, so the leader's request
/// shape (a 304, a 206) is never handed to followers.
fn fill_headers(h: &HeaderMap) -> HeaderMap {
    let mut out = h.clone();
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

/// An origin 5xx, carried as the fill's error so the engine applies stale-if-error and signals
/// `failed`; the service relays the response itself when there is no stale copy.
#[derive(Debug)]
pub(crate) struct UpstreamFailure(Bytes, StatusCode);

impl std::fmt::Display for UpstreamFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "origin answered {}", self.1)
    }
}

impl std::error::Error for UpstreamFailure {}

async fn fill_from_origin<S, ReqB, ResB>(
    mut inner: S,
    parts: Arc<Parts>,
    prev: Option<Prev>,
    shared: Arc<Shared>,
    side: Side<ResB>,
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
    let opts = &shared.opts;
    let headers = fill_headers(&parts.headers);
    let mut policy_req = Request::new(());
    *policy_req.uri_mut() = parts.uri.clone();
    *policy_req.headers_mut() = headers.clone();

    let mut req = Request::new(ReqB::default());
    *req.method_mut() = Method::GET; // HEAD becomes GET: the entry serves both
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = headers;
    // The leader's extensions (connection info...) travel with the fill, like its headers.
    *req.extensions_mut() = parts.extensions.clone();
    // Revalidate a stale entry with its validators.
    let prev_stored = prev.as_ref().and_then(|p| StoredResponse::decode(&p.value));
    if let Some(ps) = &prev_stored {
        if let Some(etag) = ps.headers.get(header::ETAG) {
            req.headers_mut()
                .insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(lm) = ps.headers.get(header::LAST_MODIFIED) {
            req.headers_mut()
                .insert(header::IF_MODIFIED_SINCE, lm.clone());
        }
    }

    std::future::poll_fn(|cx| inner.poll_ready(cx))
        .await
        .map_err(Into::into)?;
    let res = inner.call(req).await.map_err(Into::into)?;
    let (rparts, body) = res.into_parts();

    if rparts.status == StatusCode::NOT_MODIFIED {
        if let Some(ps) = prev_stored {
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
            *probe.headers_mut() = merged.clone();
            let (probe, ()) = probe.into_parts();
            let value = StoredResponse::new(ps.status, &merged, ps.body).encode();
            return Ok(to_fill(
                decide(&policy_req, &probe, &opts.defaults),
                value,
                &side,
            ));
        }
    }

    match buffer(Box::pin(body), opts.max_body).await? {
        Buffered::Overflow { prefix, rest } => {
            let mut st = lock(&side);
            st.detail = Some("too-large");
            st.streamed = Some(Response::from_parts(
                rparts,
                ResponseBody::stream(prefix, rest),
            ));
            Ok(Fill::Pass {
                value: Bytes::new(),
            })
        }
        Buffered::Complete(bytes) => {
            let stored = StoredResponse::new(rparts.status, &rparts.headers, bytes);
            if rparts.status.is_server_error() {
                return Err(Box::new(UpstreamFailure(stored.encode(), rparts.status)));
            }
            let decision = decide(&policy_req, &rparts, &opts.defaults);
            Ok(to_fill(decision, stored.encode(), &side))
        }
    }
}

fn to_fill<B>(decision: Decision, value: Bytes, side: &Side<B>) -> Fill {
    match decision {
        Decision::Store { ttl, selector } => Fill::Store {
            value,
            ttl,
            selector: selector.map(Bytes::from),
        },
        Decision::Pass(detail) => {
            lock(side).detail = Some(detail);
            Fill::Pass { value }
        }
    }
}

fn respond<B>(
    opts: &Options,
    served: Served,
    req: &Parts,
    side: &Side<B>,
) -> Response<ResponseBody<B>> {
    let detail = lock(side).detail;
    // Our own fill ran and its body was too large to buffer: stream it (passed, or bypassed
    // because the backend is down).
    if matches!(served.status, Status::Passed | Status::Bypass) {
        if let Some(mut res) = lock(side).streamed.take() {
            res.headers_mut().insert(
                CACHE_STATUS,
                cache_status::for_status(&opts.name, served.status, None, detail),
            );
            return res;
        }
    }
    let Some(stored) = StoredResponse::decode(&served.value) else {
        // Cannot happen for values this layer wrote; a foreign writer under our prefix could.
        return error_response(opts, Error::FillPanicked);
    };
    let now = now_ms();
    let (age, ttl) = match &served.meta {
        Some(m) => (
            u64::from(stored.origin_age) + m.age_secs(now),
            Some(m.ttl_ms(now).div_euclid(1000)),
        ),
        None => (u64::from(stored.origin_age), None),
    };
    let cs = cache_status::for_status(&opts.name, served.status, ttl, detail);
    let StoredResponse {
        status,
        mut headers,
        body,
        ..
    } = stored;
    if age > 0
        || matches!(
            served.status,
            Status::Hit | Status::Stale(_) | Status::Collapsed
        )
    {
        headers.insert(header::AGE, HeaderValue::from(age));
    }
    headers.insert(CACHE_STATUS, cs);

    if status == StatusCode::OK && not_modified(&req.headers, &headers) {
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
        return res;
    }

    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let body = if req.method == Method::HEAD {
        ResponseBody::empty()
    } else {
        ResponseBody::full(body)
    };
    let mut res = Response::new(body);
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    res
}

/// Does the client's conditional request match the stored response (RFC 9110 section 13)?
fn not_modified(req: &HeaderMap, stored: &HeaderMap) -> bool {
    let inm: Vec<&HeaderValue> = req.get_all(header::IF_NONE_MATCH).iter().collect();
    if !inm.is_empty() {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let ours = weak(etag);
        return inm.iter().any(|v| {
            v.to_str()
                .map(|s| {
                    s.split(',')
                        .any(|t| t.trim() == "*" || weak(t.trim()) == ours)
                })
                .unwrap_or(false)
        });
    }
    let ims = req
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| httpdate::parse_http_date(s).ok());
    let lm = stored
        .get(header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| httpdate::parse_http_date(s).ok());
    matches!((ims, lm), (Some(ims), Some(lm)) if lm <= ims)
}

fn weak(tag: &str) -> &str {
    tag.strip_prefix("W/").unwrap_or(tag)
}

fn error_response<B>(opts: &Options, e: Error) -> Response<ResponseBody<B>> {
    let (status, detail, body): (StatusCode, &str, &str) = match &e {
        Error::Fill(err) => {
            if let Some(up) = err.downcast_ref::<UpstreamFailure>() {
                if let Some(stored) = StoredResponse::decode(&up.0) {
                    let mut headers = stored.headers;
                    headers.insert(
                        CACHE_STATUS,
                        cache_status::error(
                            &opts.name,
                            Some(stored.status.as_u16()),
                            "origin-error",
                        ),
                    );
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(stored.body.len()));
                    let mut res = Response::new(ResponseBody::full(stored.body));
                    *res.status_mut() = stored.status;
                    *res.headers_mut() = headers;
                    return res;
                }
            }
            (StatusCode::BAD_GATEWAY, "origin-error", "origin error\n")
        }
        Error::Timeout(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            "wait-timeout",
            "timed out waiting for another request's fill\n",
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
    let mut res = Response::new(ResponseBody::full(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    h.insert(CACHE_STATUS, cache_status::error(&opts.name, None, detail));
    res
}
