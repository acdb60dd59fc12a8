//! The HTTP layer against an in-process origin service: counts of origin calls, Cache-Status
//! values and bodies. Paused tokio clock where time matters.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_layer::Layer;
use tower_stampede::http::{CookiePolicy, StampedeLayer};

type Req = Request<Full<Bytes>>;
type Handler = Arc<dyn Fn(&Req, usize) -> Response<Full<Bytes>> + Send + Sync>;

/// An origin that counts calls and concurrent calls, records the requests it saw, sleeps
/// `delay`, and answers with `handler(request, call_number)`.
#[derive(Clone)]
struct Origin {
    calls: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<(Method, HeaderMap)>>>,
    delay: Duration,
    handler: Handler,
}

impl Origin {
    fn new(
        delay: Duration,
        handler: impl Fn(&Req, usize) -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) -> Self {
        Origin {
            calls: Default::default(),
            running: Default::default(),
            peak: Default::default(),
            seen: Default::default(),
            delay,
            handler: Arc::new(handler),
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
    /// The methods of the requests it saw, in order.
    fn methods(&self) -> Vec<Method> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(m, _)| m.clone())
            .collect()
    }
    fn service(
        &self,
    ) -> impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible, Future = impl Send>
           + Clone
           + Send
           + 'static {
        let o = self.clone();
        tower::service_fn(move |req: Req| {
            let o = o.clone();
            async move {
                let n = o.calls.fetch_add(1, Ordering::SeqCst) + 1;
                let r = o.running.fetch_add(1, Ordering::SeqCst) + 1;
                o.peak.fetch_max(r, Ordering::SeqCst);
                o.seen
                    .lock()
                    .unwrap()
                    .push((req.method().clone(), req.headers().clone()));
                tokio::time::sleep(o.delay).await;
                o.running.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Infallible>((o.handler)(&req, n))
            }
        })
    }
}

fn ok(cc: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    if !cc.is_empty() {
        r.headers_mut()
            .insert(header::CACHE_CONTROL, cc.parse().unwrap());
    }
    r
}

fn get(uri: &str) -> Req {
    Request::get(uri).body(Full::default()).unwrap()
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Got {
    fn cs(&self) -> String {
        self.headers
            .get("cache-status")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }
}

async fn send<S, B>(svc: &S, req: Req) -> Got
where
    S: Service<Req, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

#[tokio::test(start_paused = true)]
async fn a_thousand_requests_for_one_cold_url_reach_the_origin_once() {
    let origin = Origin::new(ms(200), |_, n| ok("max-age=60", format!("run {n}")));
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            send(&svc, get("http://a.test/cold")).await
        }));
    }
    let (mut stored, mut collapsed) = (0, 0);
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(&g.body[..], b"run 1");
        let cs = g.cs();
        if cs.contains("stored") {
            stored += 1;
        } else if cs.contains("collapsed") || cs.contains("; hit") {
            collapsed += 1;
        } else {
            panic!("unexpected Cache-Status {cs}");
        }
    }
    assert_eq!(origin.calls(), 1);
    assert_eq!((stored, collapsed), (1, 999));
    let g = send(&svc, get("http://a.test/cold")).await;
    assert!(
        g.cs().starts_with("tower-stampede; hit; ttl="),
        "{}",
        g.cs()
    );
}

fn vary_origin(delay: Duration) -> Origin {
    Origin::new(delay, |req, _| {
        let enc = req
            .headers()
            .get(header::ACCEPT_ENCODING)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let mut r = ok("max-age=60", format!("enc:{enc}"));
        r.headers_mut()
            .insert(header::VARY, "Accept-Encoding".parse().unwrap());
        r
    })
}

fn with_enc(uri: &str, enc: &str) -> Req {
    Request::get(uri)
        .header(header::ACCEPT_ENCODING, enc)
        .body(Full::default())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn vary_keeps_one_entry_per_variant() {
    let origin = vary_origin(ms(10));
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let u = "http://a.test/v";
    assert_eq!(&send(&svc, with_enc(u, "gzip")).await.body[..], b"enc:gzip");
    assert_eq!(&send(&svc, with_enc(u, "br")).await.body[..], b"enc:br");
    assert_eq!(origin.calls(), 2);
    let g = send(&svc, with_enc(u, "gzip")).await;
    assert_eq!(
        (&g.body[..], g.cs().contains("; hit")),
        (&b"enc:gzip"[..], true)
    );
    let g = send(&svc, with_enc(u, "br")).await;
    assert_eq!(
        (&g.body[..], g.cs().contains("; hit")),
        (&b"enc:br"[..], true)
    );
    assert_eq!(origin.calls(), 2);
    // Matching neither variant: a miss.
    let g = send(&svc, with_enc(u, "deflate")).await;
    assert_eq!(&g.body[..], b"enc:deflate");
    assert_eq!(origin.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_follower_with_other_vary_headers_is_not_handed_the_leaders_variant() {
    let origin = vary_origin(ms(200));
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let u = "http://a.test/vf";
    let mut tasks = Vec::new();
    for i in 0..40 {
        let svc = svc.clone();
        let enc = if i % 2 == 0 { "gzip" } else { "br" };
        tasks.push(tokio::spawn(async move {
            (enc, send(&svc, with_enc(u, enc)).await)
        }));
    }
    for t in tasks {
        let (enc, g) = t.await.unwrap();
        assert_eq!(g.body, Bytes::from(format!("enc:{enc}")), "{}", g.cs());
    }
    assert_eq!(origin.calls(), 2, "one fill per variant");
}

#[tokio::test(start_paused = true)]
async fn private_and_set_cookie_responses_are_never_shared() {
    for (cc, cookie) in [("private, max-age=60", false), ("max-age=60", true)] {
        let origin = Origin::new(ms(100), move |req, _| {
            let user = req
                .headers()
                .get("x-user")
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            let mut r = ok(cc, format!("secret of {user}"));
            if cookie {
                r.headers_mut()
                    .insert(header::SET_COOKIE, format!("s={user}").parse().unwrap());
            }
            r
        });
        let svc = StampedeLayer::in_memory().layer(origin.service());
        let mut tasks = Vec::new();
        for i in 0..50 {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let req = Request::get("http://a.test/me")
                    .header("x-user", i.to_string())
                    .body(Full::default())
                    .unwrap();
                (i, send(&svc, req).await)
            }));
        }
        for t in tasks {
            let (i, g) = t.await.unwrap();
            assert_eq!(
                g.body,
                Bytes::from(format!("secret of {i}")),
                "{cc} cookie={cookie}"
            );
        }
        assert_eq!(origin.calls(), 50);
        // Nothing was stored.
        let req = Request::get("http://a.test/me")
            .header("x-user", "later")
            .body(Full::default())
            .unwrap();
        assert_eq!(&send(&svc, req).await.body[..], b"secret of later");
    }
}

#[tokio::test(start_paused = true)]
async fn an_authorization_request_bypasses_and_sets_no_pass_marker() {
    let origin = Origin::new(ms(100), |req, _| {
        if req.headers().contains_key(header::AUTHORIZATION) {
            ok("private", "for the user")
        } else {
            ok("max-age=60", "public page")
        }
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let req = Request::get("http://a.test/p")
        .header(header::AUTHORIZATION, "Bearer x")
        .body(Full::default())
        .unwrap();
    let g = send(&svc, req).await;
    assert_eq!(&g.body[..], b"for the user");
    assert!(
        g.cs().contains("fwd=bypass; detail=authorization"),
        "{}",
        g.cs()
    );
    // The anonymous crowd after it is still collapsed into one fill.
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            send(&svc, get("http://a.test/p")).await
        }));
    }
    for t in tasks {
        assert_eq!(&t.await.unwrap().body[..], b"public page");
    }
    assert_eq!(origin.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn cookies_bypass_when_the_ttl_is_ours() {
    let origin = Origin::new(ms(1), |_, n| ok("", format!("run {n}")));
    let layer = StampedeLayer::in_memory().default_ttl(Duration::from_secs(60));
    let svc = layer.clone().layer(origin.service());
    let with_cookie = |c: &str| {
        Request::get("http://a.test/c")
            .header(header::COOKIE, c)
            .body(Full::default())
            .unwrap()
    };
    let g = send(&svc, with_cookie("session=abc")).await;
    assert!(g.cs().contains("detail=cookie"), "{}", g.cs());
    let g = send(&svc, with_cookie("session=abc")).await;
    assert!(g.cs().contains("detail=cookie"));
    assert_eq!(origin.calls(), 2);

    // Ignored cookie names are cached like no cookie at all.
    let origin = Origin::new(ms(1), |_, n| ok("", format!("run {n}")));
    let svc = layer
        .cookies(CookiePolicy::Ignore(vec!["_ga".into()]))
        .layer(origin.service());
    send(&svc, with_cookie("_ga=1")).await;
    let g = send(&svc, with_cookie("_ga=2")).await;
    assert!(g.cs().contains("; hit"), "{}", g.cs());
    let g = send(&svc, with_cookie("_ga=1; session=x")).await;
    assert!(g.cs().contains("detail=cookie"), "{}", g.cs());
    assert_eq!(origin.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_leaders_conditional_range_or_head_never_reach_followers() {
    let origin = Origin::new(ms(200), |_, _| {
        let mut r = ok("max-age=60", "the full body");
        r.headers_mut()
            .insert(header::ETAG, "\"v1\"".parse().unwrap());
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let u = "http://a.test/n";
    let leader = {
        let svc = svc.clone();
        tokio::spawn(async move {
            let req = Request::get(u)
                .header(header::IF_NONE_MATCH, "\"v1\"")
                .header(header::RANGE, "bytes=0-3")
                .body(Full::default())
                .unwrap();
            send(&svc, req).await
        })
    };
    tokio::time::sleep(ms(1)).await;
    let head = {
        let svc = svc.clone();
        tokio::spawn(async move {
            let req = Request::head(u).body(Full::default()).unwrap();
            send(&svc, req).await
        })
    };
    let mut followers = Vec::new();
    for _ in 0..20 {
        let svc = svc.clone();
        followers.push(tokio::spawn(async move { send(&svc, get(u)).await }));
    }
    let l = leader.await.unwrap();
    assert_eq!(
        l.status,
        StatusCode::NOT_MODIFIED,
        "the leader's own conditional is answered"
    );
    let h = head.await.unwrap();
    assert_eq!((h.status, h.body.len()), (StatusCode::OK, 0));
    assert_eq!(h.headers.get(header::CONTENT_LENGTH).unwrap(), "13");
    for f in followers {
        let g = f.await.unwrap();
        assert_eq!(
            (g.status, &g.body[..]),
            (StatusCode::OK, &b"the full body"[..])
        );
    }
    assert_eq!(origin.calls(), 1);
    let seen = origin.seen.lock().unwrap();
    let (m, h) = &seen[0];
    assert_eq!(m, Method::GET);
    assert!(!h.contains_key(header::IF_NONE_MATCH) && !h.contains_key(header::RANGE));
}

/// On a URL known not to be cacheable, each request's fill is its own, so its conditionals and
/// Range reach the origin (RFC 9111 section 4.3.2): an `always revalidate` page (no-cache with
/// an ETag) answers a browser's revalidation with a 304, and a large download (over max_body)
/// a seek with a 206. Before, both were stripped as for a shared fill: every revalidation got
/// the whole body, and every seek the whole file from its start. Nothing of either is stored.
#[tokio::test(start_paused = true)]
async fn a_passed_url_forwards_the_callers_conditionals_and_range() {
    let origin = Origin::new(ms(1), |req, n| {
        let h = req.headers();
        let cc = if req.uri().path() == "/big" {
            "max-age=60"
        } else {
            "no-cache"
        };
        let body = if req.uri().path() == "/big" {
            "0123456789".repeat(20)
        } else {
            format!("page {n}")
        };
        let mut r = if h.get(header::IF_NONE_MATCH).is_some_and(|v| v == "\"v1\"") {
            let mut r = ok(cc, "");
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r
        } else if let Some(range) = h.get(header::RANGE) {
            assert_eq!(range, "bytes=10-19");
            let mut r = ok(cc, body[10..20].to_string());
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                format!("bytes 10-19/{}", body.len()).parse().unwrap(),
            );
            r
        } else {
            ok(cc, body)
        };
        r.headers_mut()
            .insert(header::ETAG, "\"v1\"".parse().unwrap());
        r
    });
    let svc = StampedeLayer::in_memory()
        .max_body(100)
        .layer(origin.service());
    let with = |path: &str, name: header::HeaderName, value: &str| {
        Request::get(format!("http://a.test{path}"))
            .header(name, value)
            .body(Full::default())
            .unwrap()
    };
    // The first request of each URL is a shared fill: it learns the URL is not cacheable.
    let g = send(&svc, get("http://a.test/page")).await;
    assert_eq!((g.status, &g.body[..]), (StatusCode::OK, &b"page 1"[..]));
    let g = send(&svc, get("http://a.test/big")).await;
    assert_eq!((g.status, g.body.len()), (StatusCode::OK, 200));
    assert!(g.cs().contains("too-large"), "{}", g.cs());
    // Then each request is its own fill, with its preconditions.
    let g = send(&svc, with("/page", header::IF_NONE_MATCH, "\"v1\"")).await;
    assert_eq!(g.status, StatusCode::NOT_MODIFIED, "{}", g.cs());
    let g = send(&svc, with("/big", header::RANGE, "bytes=10-19")).await;
    assert_eq!(
        (g.status, &g.body[..]),
        (StatusCode::PARTIAL_CONTENT, &b"0123456789"[..])
    );
    // None of it was stored: a plain request gets the whole response again, from the origin.
    let g = send(&svc, get("http://a.test/page")).await;
    assert_eq!((g.status, &g.body[..]), (StatusCode::OK, &b"page 5"[..]));
    assert_eq!(origin.calls(), 5);
}

#[tokio::test(start_paused = true)]
async fn an_uncacheable_url_is_not_serialized() {
    let origin = Origin::new(ms(200), |_, n| ok("no-store", format!("run {n}")));
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let u = "http://a.test/u";
    let wave = |svc: &_| {
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let svc: tower_stampede::http::StampedeService<_> = Clone::clone(svc);
            tasks.push(tokio::spawn(async move { send(&svc, get(u)).await }));
        }
        tasks
    };
    // Cold: the first response reveals the URL is uncacheable; the 99 waiters then go together.
    for t in wave(&svc) {
        assert_eq!(t.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(origin.calls(), 100);
    assert!(origin.peak() >= 99, "peak {}", origin.peak());
    // Warm (pass marker set): all 100 at once.
    origin.peak.store(0, Ordering::SeqCst);
    for t in wave(&svc) {
        let g = t.await.unwrap();
        assert!(g.cs().contains("fwd=uri-miss; detail="), "{}", g.cs());
    }
    assert_eq!(origin.calls(), 200);
    assert_eq!(origin.peak(), 100, "100 requests ran in parallel");
}

#[tokio::test(start_paused = true)]
async fn an_origin_500_serves_the_stale_copy_inside_stale_if_error() {
    let origin = Origin::new(ms(1), |_, n| {
        if n == 1 {
            ok("max-age=1, stale-if-error=60", "good")
        } else {
            let mut r = ok("", "boom");
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let u = "http://a.test/e";
    assert_eq!(&send(&svc, get(u)).await.body[..], b"good");
    tokio::time::advance(Duration::from_secs(2)).await;
    let g = send(&svc, get(u)).await;
    assert_eq!((g.status, &g.body[..]), (StatusCode::OK, &b"good"[..]));
    assert!(g.cs().contains("fwd=stale"), "{}", g.cs());
    // Beyond the window: the origin's 500 itself.
    tokio::time::advance(Duration::from_secs(120)).await;
    let g = send(&svc, get(u)).await;
    assert_eq!(
        (g.status, &g.body[..]),
        (StatusCode::INTERNAL_SERVER_ERROR, &b"boom"[..])
    );
    assert!(g.cs().contains("fwd-status=500"), "{}", g.cs());
}

/// A 5xx the inner service made itself (marked `NotForwarded`: a proxy's own 502 when its
/// upstream is unreachable) is relayed with no `fwd-status`, which names the next hop's status
/// (RFC 9211 section 2.3); an origin's own 5xx keeps it.
#[tokio::test(start_paused = true)]
async fn a_5xx_the_inner_service_made_itself_names_no_fwd_status() {
    let origin = Origin::new(ms(1), |req, _| {
        let mut r = ok("", "unreachable");
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        if req.uri().path() == "/own" {
            r.extensions_mut()
                .insert(tower_stampede::http::NotForwarded);
        }
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let g = send(&svc, get("http://a.test/own")).await;
    assert_eq!(
        (g.status, &g.body[..]),
        (StatusCode::BAD_GATEWAY, &b"unreachable"[..])
    );
    assert_eq!(g.cs(), "tower-stampede; fwd=uri-miss; detail=origin-error");
    let g = send(&svc, get("http://a.test/origin")).await;
    assert_eq!(
        g.cs(),
        "tower-stampede; fwd=uri-miss; fwd-status=502; detail=origin-error"
    );
}

#[tokio::test(start_paused = true)]
async fn conditional_requests_are_answered_from_the_entry() {
    let origin = Origin::new(ms(1), |_, _| {
        let mut r = ok("max-age=60", "body");
        r.headers_mut()
            .insert(header::ETAG, "W/\"e1\"".parse().unwrap());
        r.headers_mut().insert(
            header::LAST_MODIFIED,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let u = "http://a.test/c304";
    send(&svc, get(u)).await;
    let req = Request::get(u)
        .header(header::IF_NONE_MATCH, "\"other\", \"e1\"")
        .body(Full::default())
        .unwrap();
    let g = send(&svc, req).await;
    assert_eq!((g.status, g.body.len()), (StatusCode::NOT_MODIFIED, 0));
    assert_eq!(g.headers.get(header::ETAG).unwrap(), "W/\"e1\"");
    let req = Request::get(u)
        .header(header::IF_MODIFIED_SINCE, "Thu, 22 Oct 2015 07:28:00 GMT")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&svc, req).await.status, StatusCode::NOT_MODIFIED);
    let req = Request::get(u)
        .header(header::IF_NONE_MATCH, "\"nope\"")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&svc, req).await.status, StatusCode::OK);
    assert_eq!(origin.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stale_entry_is_revalidated_with_its_validators() {
    let origin = Origin::new(ms(1), |req, n| {
        if n > 1
            && req
                .headers()
                .get(header::IF_NONE_MATCH)
                .is_some_and(|v| v == "\"e1\"")
        {
            let mut r = Response::new(Full::default());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r.headers_mut()
                .insert(header::CACHE_CONTROL, "max-age=60".parse().unwrap());
            return r;
        }
        let mut r = ok("max-age=1", "original body");
        r.headers_mut()
            .insert(header::ETAG, "\"e1\"".parse().unwrap());
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let u = "http://a.test/reval";
    send(&svc, get(u)).await;
    tokio::time::advance(Duration::from_secs(2)).await;
    let g = send(&svc, get(u)).await;
    assert_eq!(
        (g.status, &g.body[..]),
        (StatusCode::OK, &b"original body"[..])
    );
    assert!(g.cs().contains("stored"), "{}", g.cs());
    // RFC 9211: forwarded because the entry was stale, and the origin's 304.
    assert!(
        g.cs()
            .contains("; fwd=stale; fwd-status=304; stored; ttl=60"),
        "{}",
        g.cs()
    );
    assert_eq!(origin.calls(), 2);
    assert!(origin.seen.lock().unwrap()[1]
        .1
        .contains_key(header::IF_NONE_MATCH));
    // Freshened by the 304's max-age=60. (Half a second more than the Age asserted: the
    // clocks are read in whole milliseconds, and Age is rounded down.)
    tokio::time::advance(ms(10_500)).await;
    let g = send(&svc, get(u)).await;
    assert!(g.cs().contains("; hit"), "{}", g.cs());
    assert_eq!(&g.body[..], b"original body");
    assert_eq!(g.headers.get(header::AGE).unwrap(), "10");
    assert_eq!(origin.calls(), 2);
}

/// RFC 9111 section 4.3.4: a 304 that names another entity-tag (here an origin that moved to
/// "e2" and answers any conditional request with 304) does not freshen the stored "e1"
/// response: the layer asks again without conditions and stores what it gets.
#[tokio::test(start_paused = true)]
async fn a_304_for_another_entity_tag_does_not_freshen_the_stored_response() {
    let origin = Origin::new(ms(1), |req, n| {
        let tag = if n == 1 { "\"e1\"" } else { "\"e2\"" };
        let mut r = if req.headers().contains_key(header::IF_NONE_MATCH) {
            let mut r = Response::new(Full::default());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            r.headers_mut()
                .insert(header::CACHE_CONTROL, "max-age=60".parse().unwrap());
            r
        } else {
            ok("max-age=60", format!("body of {tag}"))
        };
        r.headers_mut().insert(header::ETAG, tag.parse().unwrap());
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let u = "http://a.test/moved";
    send(&svc, get(u)).await;
    tokio::time::advance(Duration::from_secs(61)).await;
    let g = send(&svc, get(u)).await;
    assert_eq!(&g.body[..], b"body of \"e2\"", "{}", g.cs());
    assert_eq!(g.headers.get(header::ETAG).unwrap(), "\"e2\"");
    assert!(g.cs().contains("fwd-status=200; stored"), "{}", g.cs());
    assert_eq!(
        origin.calls(),
        3,
        "the 304, then the request without conditions"
    );
    {
        let seen = origin.seen.lock().unwrap();
        assert!(seen[1].1.contains_key(header::IF_NONE_MATCH));
        assert!(!seen[2].1.contains_key(header::IF_NONE_MATCH));
        assert!(!seen[2].1.contains_key(header::IF_MODIFIED_SINCE));
    }
    let g = send(&svc, get(u)).await;
    assert!(g.cs().contains("; hit"), "{}", g.cs());
    assert_eq!(&g.body[..], b"body of \"e2\"");
}

#[tokio::test(start_paused = true)]
async fn bodies_above_max_body_stream_through_uncached() {
    let big = Bytes::from(vec![b'x'; 10_000]);
    let b2 = big.clone();
    let origin = Origin::new(ms(1), move |_, _| ok("max-age=60", b2.clone()));
    let svc = StampedeLayer::in_memory()
        .max_body(1024)
        .layer(origin.service());
    let u = "http://a.test/big";
    for i in 1..=3 {
        let g = send(&svc, get(u)).await;
        assert_eq!(g.body, big);
        assert!(g.cs().contains("detail=too-large"), "{}", g.cs());
        assert_eq!(origin.calls(), i);
    }
}

#[tokio::test(start_paused = true)]
async fn age_counts_time_in_the_cache() {
    let origin = Origin::new(ms(1), |_, _| ok("max-age=60", "x"));
    let svc = StampedeLayer::in_memory().layer(origin.service());
    send(&svc, get("http://a.test/age")).await;
    // Half a second more than the Age asserted: the clocks are read in whole milliseconds,
    // and Age is rounded down (an exact 5 s could read 4.999 s).
    tokio::time::advance(ms(5_500)).await;
    let g = send(&svc, get("http://a.test/age")).await;
    assert_eq!(g.headers.get(header::AGE).unwrap(), "5");
    assert_eq!(g.cs(), "tower-stampede; hit; ttl=54");
}

/// RFC 9110 section 6.6.1: an origin response without `Date` gets the time it was received,
/// stored with it, so a hit carries the fill's `Date`; an origin's own `Date` is kept as sent.
#[tokio::test(start_paused = true)]
async fn a_response_without_date_is_stored_with_the_time_it_was_received() {
    const DATED: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
    let origin = Origin::new(ms(1), |req, _| {
        let mut r = ok("max-age=60", "x");
        if req.uri().path() == "/dated" {
            r.headers_mut()
                .insert(header::DATE, http::HeaderValue::from_static(DATED));
        }
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let filled = send(&svc, get("http://a.test/undated")).await;
    let date = filled
        .headers
        .get(header::DATE)
        .expect("a Date was added")
        .clone();
    assert!(
        httpdate::parse_http_date(date.to_str().unwrap()).is_ok(),
        "{date:?}"
    );
    let hit = send(&svc, get("http://a.test/undated")).await;
    assert!(hit.cs().contains("; hit"), "{}", hit.cs());
    assert_eq!(
        hit.headers.get_all(header::DATE).iter().collect::<Vec<_>>(),
        [&date]
    );
    for _ in 0..2 {
        let g = send(&svc, get("http://a.test/dated")).await;
        assert_eq!(
            g.headers.get_all(header::DATE).iter().collect::<Vec<_>>(),
            [DATED]
        );
    }
    assert_eq!(origin.calls(), 2);
}

/// Hits decode a hot entry once per thread and remember it: every hit still gets its own `Age`
/// and `Cache-Status` (one of each), the response that stored the entry has no `Age`, and a new
/// value for the URL, of the same length, is served instead of the remembered one.
#[tokio::test(start_paused = true)]
async fn remembered_hits_get_their_own_headers_and_a_new_value_replaces_them() {
    let origin = Origin::new(ms(1), |_, n| ok("max-age=60", format!("run {n}")));
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let u = "http://a.test/memo";
    let g = send(&svc, get(u)).await;
    assert!(g.cs().ends_with("; stored; ttl=60"), "{}", g.cs());
    assert!(g.headers.get(header::AGE).is_none());
    // The first hit notes the value, the second keeps it, the third is served from the memo.
    for age in ["2", "4", "6"] {
        tokio::time::advance(ms(2_250)).await;
        let g = send(&svc, get(u)).await;
        assert_eq!(&g.body[..], b"run 1");
        assert_eq!(
            g.headers.get_all(header::AGE).iter().collect::<Vec<_>>(),
            [age]
        );
        assert_eq!(g.headers.get_all("cache-status").iter().count(), 1);
        assert!(g.cs().contains("; hit; ttl=5"), "{}", g.cs());
        assert_eq!(g.headers.get(header::CONTENT_LENGTH).unwrap(), "5");
    }
    let post = Request::post(u).body(Full::default()).unwrap();
    send(&svc, post).await;
    for cs in ["stored", "hit"] {
        let g = send(&svc, get(u)).await;
        assert_eq!(&g.body[..], b"run 3");
        assert!(g.cs().contains(cs), "{}", g.cs());
    }
    assert_eq!(origin.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn an_unsafe_method_invalidates_the_url() {
    let origin = Origin::new(ms(1), |_, n| ok("max-age=60", format!("run {n}")));
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let u = "http://a.test/inv";
    send(&svc, get(u)).await;
    assert!(send(&svc, get(u)).await.cs().contains("; hit"));
    let post = Request::post(u).body(Full::default()).unwrap();
    let g = send(&svc, post).await;
    assert!(g.cs().contains("detail=method"), "{}", g.cs());
    let g = send(&svc, get(u)).await;
    assert_eq!(&g.body[..], b"run 3");
    assert!(g.cs().contains("stored"), "{}", g.cs());
}

/// An HTTP/2 request brings its `https` scheme and authority (`https://a.test/p`), an HTTP/1.1
/// one a path and a Host, keyed as http: one page, two entries. An unsafe request through
/// either clears both. Before, a POST over HTTP/1.1 left the copy HTTP/2 clients were served,
/// and the reverse, until it expired.
#[tokio::test(start_paused = true)]
async fn an_unsafe_request_clears_the_url_under_either_scheme() {
    let origin = Origin::new(ms(1), |_, n| ok("max-age=60", format!("run {n}")));
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let h1 = |method: Method, path: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "a.test")
            .body(Full::default())
            .unwrap()
    };
    let h2 = |method: Method, path: &str| {
        Request::builder()
            .method(method)
            .uri(format!("https://a.test{path}"))
            .body(Full::default())
            .unwrap()
    };
    // Stored over HTTP/2, cleared over HTTP/1.1.
    assert_eq!(&send(&svc, h2(Method::GET, "/p")).await.body[..], b"run 1");
    assert!(send(&svc, h2(Method::GET, "/p"))
        .await
        .cs()
        .contains("; hit"));
    send(&svc, h1(Method::POST, "/p")).await;
    let g = send(&svc, h2(Method::GET, "/p")).await;
    assert_eq!(&g.body[..], b"run 3", "{}", g.cs());
    // Stored over HTTP/1.1, cleared over HTTP/2.
    assert_eq!(&send(&svc, h1(Method::GET, "/q")).await.body[..], b"run 4");
    send(&svc, h2(Method::POST, "/q")).await;
    let g = send(&svc, h1(Method::GET, "/q")).await;
    assert_eq!(&g.body[..], b"run 6", "{}", g.cs());
    // An absolute target of another scheme is keyed, and cleared, under its own.
    let other = |method: Method| {
        Request::builder()
            .method(method)
            .uri("ftp://a.test/r")
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(&send(&svc, other(Method::GET)).await.body[..], b"run 7");
    assert!(send(&svc, other(Method::GET)).await.cs().contains("; hit"));
    send(&svc, other(Method::POST)).await;
    assert_eq!(&send(&svc, other(Method::GET)).await.body[..], b"run 9");
}

#[tokio::test(start_paused = true)]
async fn without_a_ttl_from_anyone_nothing_is_cached() {
    let origin = Origin::new(ms(1), |_, n| ok("", format!("run {n}")));
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let g = send(&svc, get("http://a.test/nt")).await;
    assert!(g.cs().contains("detail=no-ttl"), "{}", g.cs());
    send(&svc, get("http://a.test/nt")).await;
    assert_eq!(origin.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_key_function_can_bypass() {
    let origin = Origin::new(ms(1), |_, n| ok("max-age=60", format!("run {n}")));
    let svc = StampedeLayer::in_memory()
        .key_fn(|p| (!p.uri.path().starts_with("/admin")).then(|| p.uri.path().as_bytes().to_vec()))
        .layer(origin.service());
    let g = send(&svc, get("http://a.test/admin/x")).await;
    assert!(g.cs().contains("fwd=bypass; detail=key"), "{}", g.cs());
    // The key ignores the query string here.
    send(&svc, get("http://a.test/page?a=1")).await;
    let g = send(&svc, get("http://a.test/page?a=2")).await;
    assert!(g.cs().contains("; hit"), "{}", g.cs());
}

#[tokio::test(start_paused = true)]
async fn works_on_an_axum_router() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = slow_route(runs.clone())
        .route_layer(StampedeLayer::in_memory().default_ttl(Duration::from_secs(10)));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let req = Request::get("/slow")
            .body(axum::body::Body::empty())
            .unwrap();
        tasks.push(tokio::spawn(send_axum(app.clone(), req)));
    }
    for t in tasks {
        assert_eq!(&t.await.unwrap()[..], b"handler ran 1 times");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// `GET /slow`: 200 ms, and a body that says how many times the handler has run.
fn slow_route(runs: Arc<AtomicUsize>) -> axum::Router {
    use axum::routing::get as aget;
    axum::Router::new().route(
        "/slow",
        aget(move || {
            let r = runs.clone();
            async move {
                tokio::time::sleep(ms(200)).await;
                format!("handler ran {} times", r.fetch_add(1, Ordering::SeqCst) + 1)
            }
        }),
    )
}

async fn send_axum(app: axum::Router, req: Request<axum::body::Body>) -> Bytes {
    let res = app.oneshot(req).await.unwrap();
    res.into_body().collect().await.unwrap().to_bytes()
}

/// A store that is always down.
/// A store that answers every call with an error, counting invalidations.
#[derive(Default)]
struct Down {
    invalidations: Arc<AtomicUsize>,
}

impl tower_stampede::backend::Backend for Down {
    fn name(&self) -> &'static str {
        "down"
    }
    fn fetch<'a>(
        &'a self,
        _: &'a tower_stampede::Digest,
        _: Option<&'a tower_stampede::Digest>,
    ) -> tower_stampede::backend::BoxFuture<
        'a,
        tower_stampede::backend::BackendResult<tower_stampede::backend::Fetched>,
    > {
        Box::pin(async { Err(tower_stampede::backend::BackendError::new("down")) })
    }
    fn try_acquire<'a>(
        &'a self,
        _: &'a tower_stampede::Digest,
        _: Duration,
        _: u64,
    ) -> tower_stampede::backend::BoxFuture<
        'a,
        tower_stampede::backend::BackendResult<tower_stampede::backend::Acquire>,
    > {
        Box::pin(async { Err(tower_stampede::backend::BackendError::new("down")) })
    }
    fn extend<'a>(
        &'a self,
        _: &'a tower_stampede::Digest,
        _: tower_stampede::backend::Token,
        _: Duration,
    ) -> tower_stampede::backend::BoxFuture<'a, tower_stampede::backend::BackendResult<bool>> {
        Box::pin(async { Err(tower_stampede::backend::BackendError::new("down")) })
    }
    fn release<'a>(
        &'a self,
        _: &'a tower_stampede::Digest,
        _: tower_stampede::backend::Token,
        _: tower_stampede::backend::Signal,
    ) -> tower_stampede::backend::BoxFuture<'a, tower_stampede::backend::BackendResult<bool>> {
        Box::pin(async { Err(tower_stampede::backend::BackendError::new("down")) })
    }
    fn write(
        &self,
        _: tower_stampede::backend::FencedWrite,
    ) -> tower_stampede::backend::BoxFuture<
        '_,
        tower_stampede::backend::BackendResult<tower_stampede::backend::WriteOutcome>,
    > {
        Box::pin(async { Err(tower_stampede::backend::BackendError::new("down")) })
    }
    fn invalidate<'a>(
        &'a self,
        _: &'a tower_stampede::Digest,
        _: Duration,
    ) -> tower_stampede::backend::BoxFuture<'a, tower_stampede::backend::BackendResult<u64>> {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(tower_stampede::backend::BackendError::new("down")) })
    }
    fn fail<'a>(
        &'a self,
        _: &'a tower_stampede::Digest,
        _: tower_stampede::backend::Token,
        _: Duration,
    ) -> tower_stampede::backend::BoxFuture<'a, tower_stampede::backend::BackendResult<bool>> {
        Box::pin(async { Err(tower_stampede::backend::BackendError::new("down")) })
    }
    fn subscribe<'a>(
        &'a self,
        _: &'a tower_stampede::Digest,
    ) -> tower_stampede::backend::BoxFuture<
        'a,
        tower_stampede::backend::BackendResult<Option<tower_stampede::backend::Subscription>>,
    > {
        Box::pin(async { Err(tower_stampede::backend::BackendError::new("down")) })
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_store_fails_open_still_coalesced_in_process() {
    let origin = Origin::new(ms(200), |req, n| {
        if req.uri().path() == "/big" {
            ok("max-age=60", vec![b'b'; 5000])
        } else {
            ok("max-age=60", format!("run {n}"))
        }
    });
    let engine = tower_stampede::Stampede::new(Down::default());
    let svc = StampedeLayer::new(engine.clone())
        .max_body(1024)
        .layer(origin.service());
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            send(&svc, get("http://a.test/down")).await
        }));
    }
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!(g.status, StatusCode::OK);
        assert!(
            g.cs().contains("fwd=bypass; detail=backend-down"),
            "{}",
            g.cs()
        );
    }
    assert_eq!(
        origin.calls(),
        1,
        "coalesced in process while the store is down"
    );
    assert!(engine.breaker_open(), "the breaker opened");
    // A body too large to buffer still streams whole.
    let g = send(&svc, get("http://a.test/big")).await;
    assert_eq!((g.status, g.body.len()), (StatusCode::OK, 5000));
}

// Regressions found in review.

#[tokio::test(start_paused = true)]
async fn an_origin_error_page_goes_only_to_the_request_that_got_it() {
    let origin = Origin::new(ms(100), |req, _| {
        let user = req
            .headers()
            .get("x-user")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let mut r = ok("private", format!("error page for {user}"));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r.headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("7"));
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let mut tasks = Vec::new();
    for i in 0..5 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get("http://a.test/err")
                .header("x-user", i.to_string())
                .body(Full::default())
                .unwrap();
            (i, send(&svc, req).await)
        }));
    }
    let mut others = 0;
    for t in tasks {
        let (i, g) = t.await.unwrap();
        let own = Bytes::from(format!("error page for {i}"));
        if g.body != own {
            others += 1;
            // The origin's status and Retry-After, on a page of ours.
            assert_eq!(g.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", g.cs());
            assert_eq!(g.headers.get(header::RETRY_AFTER).unwrap(), "7");
            assert!(
                !g.body.starts_with(b"error page"),
                "another user's page leaked"
            );
            // Not forwarded: no fwd-status (RFC 9211 section 2.3).
            assert!(!g.cs().contains("fwd-status"), "{}", g.cs());
            assert!(g.cs().contains("detail=origin-error"), "{}", g.cs());
        } else {
            assert!(g.cs().contains("fwd-status=500"), "{}", g.cs());
        }
    }
    assert_eq!(others, 4, "one fill, four waiting on it");
}

#[tokio::test(start_paused = true)]
async fn absurd_max_age_values_do_not_panic() {
    let origin = Origin::new(ms(1), |_, n| {
        ok(
            "max-age=18446744073709551615, stale-while-revalidate=18446744073709551615, stale-if-error=99999999999999999999",
            format!("run {n}"),
        )
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let g = send(&svc, get("http://a.test/huge")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.cs());
    let g = send(&svc, get("http://a.test/huge")).await;
    assert!(g.cs().contains("; hit"), "{}", g.cs());
    assert_eq!(origin.calls(), 1);
}

/// A response with more header lines than a record holds (8,192) is passed, whole, to the
/// request that got it. Before, 30,000 lines panicked the fill (`HeaderMap::with_capacity`
/// past its limit) and the request got a 502.
#[tokio::test(start_paused = true)]
async fn a_response_with_too_many_headers_is_passed_whole() {
    let origin = Origin::new(ms(1), |req, n| {
        let mut r = ok("max-age=60", format!("run {n}"));
        if req.uri().path() == "/many" {
            for i in 0..30_000u32 {
                r.headers_mut().append("x-many", i.into());
            }
        } else {
            // As many names as a `HeaderMap` holds: none left for a Cache-Status.
            let mut i = 0u32;
            while let Ok(h) = http::HeaderName::try_from(format!("x-{i}")) {
                if r.headers_mut().try_append(h, i.into()).is_err() {
                    break;
                }
                i += 1;
            }
        }
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    for n in 1..=2 {
        let g = send(&svc, get("http://a.test/many")).await;
        assert_eq!(g.status, StatusCode::OK, "{}", g.cs());
        assert_eq!(g.body, format!("run {n}"));
        assert_eq!(g.headers.get_all("x-many").iter().count(), 30_000);
        assert!(g.cs().contains("detail="), "{}", g.cs());
    }
    assert_eq!(origin.calls(), 2);
    let g = send(&svc, get("http://a.test/names")).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.body, "run 3");
    assert_eq!(g.headers.keys_len(), 24_576);

    // A request as full (an in-process caller's) revalidating a stale entry with an ETag: its
    // fill gets no room for If-None-Match, and goes without it instead of panicking.
    let origin = Origin::new(ms(1), |_, n| {
        let mut r = ok("max-age=1", format!("run {n}"));
        r.headers_mut()
            .insert(header::ETAG, "\"e\"".parse().unwrap());
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    assert_eq!(send(&svc, get("http://a.test/full")).await.body, "run 1");
    tokio::time::sleep(ms(1500)).await;
    let mut req = get("http://a.test/full");
    let mut i = 0u32;
    while let Ok(h) = http::HeaderName::try_from(format!("x-{i}")) {
        if req.headers_mut().try_append(h, i.into()).is_err() {
            break;
        }
        i += 1;
    }
    let g = send(&svc, req).await;
    assert_eq!(
        (g.status, &g.body[..]),
        (StatusCode::OK, &b"run 2"[..]),
        "{}",
        g.cs()
    );
}

#[tokio::test(start_paused = true)]
async fn an_oversized_5xx_is_a_failure_not_a_pass() {
    let origin = Origin::new(ms(200), |_, _| {
        let mut r = ok("", vec![b'e'; 10_000]);
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r
    });
    let svc = StampedeLayer::in_memory()
        .max_body(1024)
        .layer(origin.service());
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            send(&svc, get("http://a.test/big5xx")).await
        }));
    }
    let mut own = 0;
    for t in tasks {
        let g = t.await.unwrap();
        assert!(g.status.is_server_error());
        own += (g.body.len() == 10_000) as usize;
    }
    assert_eq!(own, 1, "the leader relays its own 503 whole");
    // No pass marker: within the failed lease nobody else calls the origin.
    let g = send(&svc, get("http://a.test/big5xx")).await;
    assert!(g.status.is_server_error());
    assert_ne!(
        g.body.len(),
        10_000,
        "another request's 503 body is not relayed"
    );
    assert_eq!(origin.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_passed_response_keeps_its_set_cookie() {
    let origin = Origin::new(ms(1), |_, _| {
        let mut r = ok("max-age=60", "logged in");
        r.headers_mut()
            .insert(header::SET_COOKIE, "session=abc".parse().unwrap());
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let g = send(&svc, get("http://a.test/login")).await;
    assert_eq!(g.headers.get(header::SET_COOKIE).unwrap(), "session=abc");
    assert!(g.cs().contains("detail=set-cookie"), "{}", g.cs());
}

#[tokio::test(start_paused = true)]
async fn hits_do_not_wait_on_the_inner_services_backpressure() {
    let origin = Origin::new(Duration::from_secs(8), |_, n| {
        ok("max-age=600", format!("run {n}"))
    });
    let svc = tower::ServiceBuilder::new()
        .layer(StampedeLayer::in_memory())
        .concurrency_limit(1)
        .service(origin.service());
    // Store /a (takes 8 s), then start a slow fill of /b that holds the only permit.
    send(&svc, get("http://a.test/a")).await;
    let slow = {
        let svc = svc.clone();
        tokio::spawn(async move { send(&svc, get("http://a.test/b")).await })
    };
    tokio::time::sleep(ms(10)).await;
    let start = tokio::time::Instant::now();
    let g = send(&svc, get("http://a.test/a")).await;
    assert!(g.cs().contains("; hit"), "{}", g.cs());
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "the hit waited for the permit"
    );
    slow.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_get_with_a_body_bypasses() {
    let origin = Origin::new(ms(1), |_, n| ok("max-age=60", format!("run {n}")));
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let req = Request::get("http://a.test/body")
        .header(header::CONTENT_LENGTH, "3")
        .body(Full::new(Bytes::from_static(b"abc")))
        .unwrap();
    let g = send(&svc, req).await;
    assert!(g.cs().contains("detail=request-body"), "{}", g.cs());
}

#[tokio::test(start_paused = true)]
async fn works_as_a_router_wide_layer_too() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = slow_route(runs.clone())
        .layer(StampedeLayer::in_memory().default_ttl(Duration::from_secs(10)));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let req = Request::get("/slow")
            .body(axum::body::Body::empty())
            .unwrap();
        let app = app.clone();
        tasks.push(tokio::spawn(async move { send_axum(app, req).await }));
    }
    for t in tasks {
        assert_eq!(&t.await.unwrap()[..], b"handler ran 1 times");
    }
    // A route the router does not have: its 404 comes through the layer too.
    let req = Request::get("/nope")
        .body(axum::body::Body::empty())
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert!(res.headers().contains_key("cache-status"));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_vary_star_response_is_never_stored() {
    let origin = Origin::new(ms(10), |_, n| {
        let mut r = ok("max-age=60", format!("run {n}"));
        r.headers_mut().insert(header::VARY, "*".parse().unwrap());
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let a = send(&svc, get("http://a.test/star")).await;
    let b = send(&svc, get("http://a.test/star")).await;
    assert!(a.cs().contains("detail=vary-star"), "{}", a.cs());
    assert_eq!((&a.body[..], &b.body[..]), (&b"run 1"[..], &b"run 2"[..]));
    assert_eq!(origin.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_serves_the_stale_copy_and_refreshes_once() {
    let origin = Origin::new(ms(100), |_, n| {
        ok("max-age=1, stale-while-revalidate=30", format!("run {n}"))
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    assert_eq!(
        &send(&svc, get("http://a.test/swr")).await.body[..],
        b"run 1"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            send(&svc, get("http://a.test/swr")).await
        }));
    }
    for t in tasks {
        let g = t.await.unwrap();
        assert_eq!(&g.body[..], b"run 1", "the stale copy at once");
        assert!(
            g.cs().contains("; hit") && g.cs().contains("detail=stale-while-revalidate"),
            "{}",
            g.cs()
        );
    }
    // One background refresh for all fifty.
    tokio::time::sleep(ms(500)).await;
    assert_eq!(origin.calls(), 2);
    let g = send(&svc, get("http://a.test/swr")).await;
    assert_eq!(&g.body[..], b"run 2");
    assert!(g.cs().contains("; hit"), "{}", g.cs());
}

#[tokio::test(start_paused = true)]
async fn freshness_comes_from_s_maxage_expires_and_no_cache_is_not_stored() {
    let far = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(600));
    let cc = header::CACHE_CONTROL;
    let cases = [
        // A shared cache uses s-maxage over max-age.
        (
            "s-maxage",
            cc.clone(),
            "max-age=0, s-maxage=60".to_string(),
            true,
        ),
        ("expires", header::EXPIRES, far, true),
        ("no-cache", cc.clone(), "max-age=60, no-cache".into(), false),
        ("no-store", cc, "max-age=60, no-store".into(), false),
    ];
    for (name, k, v, cached) in cases {
        let origin = Origin::new(ms(1), move |_, n| {
            let mut r = ok("", format!("run {n}"));
            r.headers_mut().insert(k.clone(), v.parse().unwrap());
            r
        });
        let svc = StampedeLayer::in_memory().layer(origin.service());
        let first = send(&svc, get("http://a.test/f")).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let second = send(&svc, get("http://a.test/f")).await;
        if cached {
            assert!(first.cs().contains("stored"), "{name}: {}", first.cs());
            assert!(second.cs().contains("; hit"), "{name}: {}", second.cs());
            assert_eq!(origin.calls(), 1, "{name}");
        } else {
            assert!(
                first.cs().contains(&format!("detail={name}")),
                "{name}: {}",
                first.cs()
            );
            assert_eq!(&second.body[..], b"run 2", "{name}");
            assert_eq!(origin.calls(), 2, "{name}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn cookie_and_authorization_requests_under_concurrency_get_their_own_answers() {
    // The origin answers per user, and says the answer is cacheable: the layer still never
    // shares it, because of the request.
    let origin = Origin::new(ms(100), |req, _| {
        let who = req
            .headers()
            .get(header::AUTHORIZATION)
            .or_else(|| req.headers().get(header::COOKIE))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        ok("", format!("for {who}"))
    });
    let svc = StampedeLayer::in_memory()
        .default_ttl(Duration::from_secs(60))
        .layer(origin.service());
    let mut tasks = Vec::new();
    for i in 0..100 {
        let svc = svc.clone();
        let (name, value) = if i % 2 == 0 {
            (header::AUTHORIZATION, format!("Bearer {i}"))
        } else {
            (header::COOKIE, format!("session={i}"))
        };
        tasks.push(tokio::spawn(async move {
            let req = Request::get("http://a.test/me")
                .header(name, &value)
                .body(Full::default())
                .unwrap();
            (value, send(&svc, req).await)
        }));
    }
    for t in tasks {
        let (value, g) = t.await.unwrap();
        assert_eq!(g.body, Bytes::from(format!("for {value}")));
        assert!(g.cs().contains("fwd=bypass"), "{}", g.cs());
    }
    assert_eq!(origin.calls(), 100);
    assert_eq!(origin.peak(), 100, "bypassed requests run in parallel");
}

#[tokio::test(start_paused = true)]
async fn cookie_policy_cache_opts_in() {
    let origin = Origin::new(ms(1), |_, n| ok("", format!("run {n}")));
    let svc = StampedeLayer::in_memory()
        .default_ttl(Duration::from_secs(60))
        .cookies(CookiePolicy::Cache)
        .layer(origin.service());
    for c in ["session=a", "session=b"] {
        let req = Request::get("http://a.test/c")
            .header(header::COOKIE, c)
            .body(Full::default())
            .unwrap();
        assert_eq!(&send(&svc, req).await.body[..], b"run 1");
    }
    assert_eq!(origin.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_ambiguous_host_is_never_keyed_and_an_empty_query_is_its_own_url() {
    // The origin answers for the last Host it sees, as a virtual-hosting server might.
    let origin = Origin::new(ms(1), |req, n| {
        let host = req
            .headers()
            .get_all(header::HOST)
            .iter()
            .next_back()
            .cloned();
        let host = host.map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
        ok("max-age=60", format!("{} {n}", host.unwrap_or_default()))
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let with_hosts = |uri: &str, hosts: &[&[u8]]| {
        let mut r = get(uri);
        for h in hosts {
            r.headers_mut()
                .append(header::HOST, http::HeaderValue::from_bytes(h).unwrap());
        }
        r
    };
    // Two Host lines, and an absolute-form target naming another host than Host's: bypassed,
    // so neither can store the other host's page under victim.test's key.
    let g = send(&svc, with_hosts("/p", &[b"victim.test", b"attacker.test"])).await;
    assert!(g.cs().contains("fwd=bypass; detail=host"), "{}", g.cs());
    let g = send(
        &svc,
        with_hosts("http://victim.test/p", &[b"attacker.test"]),
    )
    .await;
    assert!(g.cs().contains("fwd=bypass; detail=host"), "{}", g.cs());
    let g = send(&svc, with_hosts("/p", &[b"victim.test"])).await;
    assert_eq!(&g.body[..], b"victim.test 3", "{}", g.cs());
    assert!(g.cs().contains("stored"), "{}", g.cs());
    // The absolute form naming the same host (in another case) is the same URL: a hit.
    let g = send(&svc, with_hosts("http://Victim.test/p", &[b"victim.test"])).await;
    assert_eq!(&g.body[..], b"victim.test 3", "{}", g.cs());
    assert!(g.cs().contains("hit"), "{}", g.cs());
    // A Host that is not text is a host of its own, not the same as no Host.
    let g = send(&svc, with_hosts("/q", &[])).await;
    assert_eq!(&g.body[..], b" 4");
    let g = send(&svc, with_hosts("/q", &[b"\xff"])).await;
    assert_eq!(&g.body[..], "\u{fffd} 5".as_bytes(), "{}", g.cs());
    // RFC 3986 section 6.2.3: `/q?` is not `/q`.
    let g = send(&svc, with_hosts("/q?", &[])).await;
    assert_eq!(&g.body[..], b" 6", "{}", g.cs());
    assert_eq!(origin.calls(), 6);
}

/// An origin behind caches of its own: their `Cache-Status` members (two lines here) stay, in
/// order, and ours goes last (RFC 9211 section 2), on stored, remembered, large, 304, passed,
/// bypassed and relayed error responses alike.
#[tokio::test(start_paused = true)]
async fn an_earlier_caches_cache_status_is_kept_before_ours() {
    let big = "x".repeat(20_000);
    let origin = Origin::new(ms(1), move |req, _| {
        let (cc, body, status) = match req.uri().path() {
            "/big" => ("max-age=60", big.clone(), StatusCode::OK),
            "/private" => ("no-store", "p".to_string(), StatusCode::OK),
            "/fail" => ("", "down".to_string(), StatusCode::SERVICE_UNAVAILABLE),
            _ => ("max-age=60", "small".to_string(), StatusCode::OK),
        };
        let mut r = ok(cc, body);
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.append("cache-status", "edge; hit".parse().unwrap());
        h.append("cache-status", "shield; fwd=miss".parse().unwrap());
        h.insert(header::ETAG, "\"v1\"".parse().unwrap());
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let one = |g: &Got| {
        assert_eq!(g.headers.get_all("cache-status").iter().count(), 1);
        g.cs()
    };
    let up = "edge; hit, shield; fwd=miss, tower-stampede; ";
    for path in ["/small", "/big"] {
        let u = format!("http://a.test{path}");
        let g = send(&svc, get(&u)).await;
        assert_eq!(one(&g), format!("{up}fwd=uri-miss; stored; ttl=60"));
        // Noted, kept, then answered from the memo (the large value is decoded every time).
        for _ in 0..3 {
            let g = send(&svc, get(&u)).await;
            assert!(one(&g).starts_with(&format!("{up}hit; ttl=")), "{}", g.cs());
        }
        let mut req = get(&u);
        req.headers_mut()
            .insert(header::IF_NONE_MATCH, "\"v1\"".parse().unwrap());
        let g = send(&svc, req).await;
        assert_eq!(g.status, StatusCode::NOT_MODIFIED);
        assert!(one(&g).starts_with(&format!("{up}hit; ttl=")), "{}", g.cs());
    }
    assert_eq!(origin.calls(), 2);

    let g = send(&svc, get("http://a.test/private")).await;
    assert_eq!(one(&g), format!("{up}fwd=uri-miss; detail=no-store"));
    let post = Request::post("http://a.test/small")
        .body(Full::default())
        .unwrap();
    let g = send(&svc, post).await;
    assert_eq!(one(&g), format!("{up}fwd=bypass; detail=method"));
    let g = send(&svc, get("http://a.test/fail")).await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        one(&g),
        format!("{up}fwd=uri-miss; fwd-status=503; detail=origin-error")
    );
}

/// A HEAD on a URL already known to be uncacheable (a pass marker) goes upstream as HEAD: nobody
/// else gets its response, so a GET would fetch a body only to drop it. A HEAD response is never
/// stored, even when it says the URL turned cacheable: the GET after it still gets the body and
/// stores it. A HEAD on a cold URL stays a GET (the entry serves both), and an origin error on a
/// passed HEAD is relayed.
#[tokio::test(start_paused = true)]
async fn a_head_on_an_uncacheable_url_goes_upstream_as_head() {
    let origin = Origin::new(ms(1), |req, n| {
        let cc = match req.uri().path() {
            "/fails" => "no-store",
            _ if n >= 3 => "max-age=60",
            _ => "no-store",
        };
        let mut r = if req.method() == Method::HEAD {
            ok(cc, "")
        } else {
            ok(cc, format!("body {n}"))
        };
        if req.uri().path() == "/fails" && req.method() == Method::HEAD {
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, "6".parse().unwrap());
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let head = |u: &str| Request::head(u).body(Full::default()).unwrap();
    let u = "http://a.test/p";

    // Call 1, a HEAD on a cold URL: sent as GET; its no-store sets the pass marker.
    let g = send(&svc, head(u)).await;
    assert_eq!((g.status, g.body.len()), (StatusCode::OK, 0));
    assert_eq!(g.cs(), "tower-stampede; fwd=uri-miss; detail=no-store");
    // Call 2: the pass marker is there, so the HEAD goes as HEAD.
    let g = send(&svc, head(u)).await;
    assert_eq!((g.status, g.body.len()), (StatusCode::OK, 0));
    assert_eq!(g.headers.get(header::CONTENT_LENGTH).unwrap(), "6");
    assert_eq!(g.cs(), "tower-stampede; fwd=uri-miss; detail=no-store");
    // Call 3: the HEAD says max-age=60 now, and is still not stored.
    let g = send(&svc, head(u)).await;
    assert_eq!((g.status, g.body.len()), (StatusCode::OK, 0));
    assert_eq!(g.cs(), "tower-stampede; fwd=uri-miss; detail=head");
    // Call 4, a GET: still a pass-marked URL; it stores (hit-for-miss), with its body.
    let g = send(&svc, get(u)).await;
    assert_eq!(&g.body[..], b"body 4");
    assert!(g.cs().ends_with("; stored; ttl=60"), "{}", g.cs());
    let g = send(&svc, get(u)).await;
    assert_eq!(&g.body[..], b"body 4");
    assert!(g.cs().contains("; hit; ttl="), "{}", g.cs());
    let g = send(&svc, head(u)).await;
    assert_eq!((g.status, g.body.len()), (StatusCode::OK, 0));
    assert!(g.cs().contains("; hit; ttl="), "{}", g.cs());
    assert_eq!(
        origin.methods(),
        [Method::GET, Method::HEAD, Method::HEAD, Method::GET]
    );

    // A passed HEAD whose origin fails: its status, relayed.
    let f = "http://a.test/fails";
    send(&svc, get(f)).await;
    let g = send(&svc, head(f)).await;
    assert_eq!(
        (g.status, g.body.len()),
        (StatusCode::SERVICE_UNAVAILABLE, 0)
    );
    assert_eq!(
        g.cs(),
        "tower-stampede; fwd=uri-miss; fwd-status=503; detail=origin-error"
    );
    assert_eq!(origin.methods()[4..], [Method::GET, Method::HEAD]);
}

/// An earlier cache's `Cache-Status` lines are trimmed, and a line that is not a well-formed
/// list (a trailing comma, only spaces, an open string, bytes outside ASCII) is dropped, so it
/// can neither swallow our member nor make a parser drop the whole field; on hits too.
#[tokio::test(start_paused = true)]
async fn a_malformed_earlier_cache_status_is_dropped_not_joined() {
    let origin = Origin::new(ms(1), |req, _| {
        let mut r = ok("max-age=60", "x");
        let lines: &[&[u8]] = match req.uri().path() {
            "/comma" => &[b"edge; hit,"],
            "/space" => &[b" "],
            "/quote" => &[b"edge; detail=\"open"],
            "/latin1" => &[b"edge; detail=caf\xe9"],
            _ => &[b"  edge; hit  ", b"a, b,", b"cdn; detail=\"x, y\""],
        };
        for l in lines {
            r.headers_mut()
                .append("cache-status", http::HeaderValue::from_bytes(l).unwrap());
        }
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    for (path, earlier) in [
        ("/comma", ""),
        ("/space", ""),
        ("/quote", ""),
        ("/latin1", ""),
        ("/mixed", "edge; hit, cdn; detail=\"x, y\", "),
    ] {
        let u = format!("http://a.test{path}");
        let g = send(&svc, get(&u)).await;
        assert_eq!(
            g.cs(),
            format!("{earlier}tower-stampede; fwd=uri-miss; stored; ttl=60")
        );
        for _ in 0..3 {
            let g = send(&svc, get(&u)).await;
            let want = format!("{earlier}tower-stampede; hit; ttl=");
            assert!(g.cs().starts_with(&want), "{path}: {}", g.cs());
        }
    }
}

/// The flag that sends a passed HEAD upstream as HEAD is the outer layer's alone: behind it, an
/// inner layer that misses still fills with a GET and stores it (the flag is set only while the
/// passed fill's own future is polled, and the inner layer's fill runs in a task of its own).
#[tokio::test(start_paused = true)]
async fn a_passed_head_does_not_make_an_inner_layers_fill_a_head() {
    let origin = Origin::new(ms(1), |req, n| {
        let body = if req.method() == Method::HEAD {
            String::new()
        } else {
            format!("body {n}")
        };
        ok("", body)
    });
    // No Cache-Control: the inner layer stores for its default 1 s, the outer one passes.
    let inner = StampedeLayer::in_memory()
        .cache_name("inner")
        .default_ttl(Duration::from_secs(1))
        .stale_while_revalidate(Duration::ZERO)
        .layer(origin.service());
    let outer = StampedeLayer::in_memory().cache_name("outer").layer(inner);
    let u = "http://a.test/n";
    let g = send(&outer, get(u)).await;
    assert_eq!(
        g.cs(),
        "inner; fwd=uri-miss; stored; ttl=1, outer; fwd=uri-miss; detail=no-ttl"
    );
    // The inner entry expires; the outer pass marker (5 s) stays.
    tokio::time::advance(Duration::from_secs(2)).await;
    let head = Request::head(u).body(Full::default()).unwrap();
    let g = send(&outer, head).await;
    assert_eq!((g.status, g.body.len()), (StatusCode::OK, 0));
    assert!(
        g.cs().starts_with("inner; fwd=uri-miss; stored"),
        "{}",
        g.cs()
    );
    let g = send(&outer, get(u)).await;
    assert_eq!(&g.body[..], b"body 2");
    assert!(g.cs().starts_with("inner; hit"), "{}", g.cs());
    assert_eq!(origin.methods(), [Method::GET, Method::GET]);
}

/// RFC 9111 section 4.4: a successful unsafe request invalidates its target and the URIs in
/// `Location` and `Content-Location` when they are of the target's origin (so a redirect after a
/// POST reads the new state), relative ones too; never another origin's, never after an error
/// status.
#[tokio::test(start_paused = true)]
async fn an_unsafe_method_invalidates_its_location_and_content_location_of_the_same_origin() {
    // GETs are cacheable; a POST answers `/do?status=..&loc=..&cl=..` as told.
    let origin = Origin::new(ms(1), |req, n| {
        if req.method() == Method::GET {
            return ok("max-age=60", format!("run {n}"));
        }
        let mut r = ok("", "done");
        for pair in req.uri().query().unwrap_or("").split('&') {
            match pair.split_once('=') {
                Some(("status", v)) => *r.status_mut() = v.parse().unwrap(),
                Some(("loc", v)) => {
                    r.headers_mut().insert(header::LOCATION, v.parse().unwrap());
                }
                Some(("cl", v)) => {
                    r.headers_mut()
                        .insert(header::CONTENT_LOCATION, v.parse().unwrap());
                }
                _ => {}
            }
        }
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let urls = [
        "http://a.test/item/1",
        "http://a.test/item/2",
        "http://a.test/item/3",
        "http://a.test/item/4",
        "http://other.test/item/1",
        "http://a.test/?x",
    ];
    // GETs every URL; the ones that were not hits (and are stored again now).
    let refetched = |svc| async move {
        let mut out = Vec::new();
        for u in urls {
            if !send(&svc, get(u)).await.cs().contains("; hit") {
                out.push(u);
            }
        }
        out
    };
    assert_eq!(refetched(svc.clone()).await, urls);
    let post = |target: &str| {
        Request::post(target)
            .header(header::HOST, "a.test")
            .body(Full::default())
            .unwrap()
    };
    for (target, expect) in [
        (
            "http://a.test/do?status=303&loc=/item/1",
            &["http://a.test/item/1"][..],
        ),
        (
            "http://a.test/do?status=201&loc=http://A.test/item/2#new",
            &["http://a.test/item/2"],
        ),
        ("http://a.test/do?cl=/item/3", &["http://a.test/item/3"]),
        (
            "http://a.test/do?status=303&loc=http://other.test/item/1",
            &[],
        ),
        ("http://a.test/do?status=303&loc=https://a.test/item/4", &[]),
        ("http://a.test/do?status=500&loc=/item/4", &[]),
        // A relative reference resolves against the target's path (RFC 3986 section 5.2), dot
        // segments removed.
        (
            "http://a.test/do?status=303&loc=item/4",
            &["http://a.test/item/4"],
        ),
        (
            "http://a.test/item/2/edit?status=303&loc=../1",
            &["http://a.test/item/1"],
        ),
        (
            "http://a.test/do?status=303&loc=/item/x/./../3",
            &["http://a.test/item/3"],
        ),
        ("http://a.test/?status=303&loc=?x", &["http://a.test/?x"]),
        // A network-path reference is not read.
        ("http://a.test/do?status=303&loc=//a.test/item/1", &[]),
        // Origin-form, keyed with its Host: the host decides.
        (
            "/do?status=303&loc=http://a.test/item/4",
            &["http://a.test/item/4"],
        ),
        (
            "/do?status=303&loc=/item/1&cl=http://a.test:8080/item/2",
            &["http://a.test/item/1"],
        ),
        // No path is the path `/`.
        ("/do?status=303&loc=http://a.test?x", &["http://a.test/?x"]),
    ] {
        let g = send(&svc, post(target)).await;
        assert!(g.cs().contains("fwd=bypass; detail=method"), "{}", g.cs());
        assert_eq!(refetched(svc.clone()).await, expect, "POST {target}");
    }
}

/// With the store down, a POST whose response names other URLs asks the store once, not once per
/// URL: each failed invalidation would cost it a backend timeout.
#[tokio::test(start_paused = true)]
async fn a_dead_store_is_asked_to_invalidate_once_per_response() {
    let origin = Origin::new(ms(1), |_, _| {
        let mut r = ok("", "done");
        *r.status_mut() = StatusCode::SEE_OTHER;
        let h = r.headers_mut();
        h.insert(header::LOCATION, "/item/1".parse().unwrap());
        h.insert(header::CONTENT_LOCATION, "/item/2".parse().unwrap());
        r
    });
    let down = Down::default();
    let invalidations = down.invalidations.clone();
    let svc = StampedeLayer::new(tower_stampede::Stampede::new(down)).layer(origin.service());
    let post = Request::post("http://a.test/do")
        .body(Full::default())
        .unwrap();
    let g = send(&svc, post).await;
    assert_eq!(g.status, StatusCode::SEE_OTHER);
    assert_eq!(invalidations.load(Ordering::SeqCst), 1);
}

/// A value under the layer's key that the engine reads (a well-formed record) but that is not a
/// response the layer wrote, as a foreign writer under the prefix or a damaged store could leave:
/// never a panic; the entry is dropped and the request that met it fills, fresh or stale.
#[tokio::test(start_paused = true)]
async fn an_unreadable_stored_response_is_dropped_and_refilled() {
    use tower_stampede::backend::{memory::MemoryBackend, Token};
    use tower_stampede::entry::{Header, Kind, Meta, Record};
    use tower_stampede::key::Digest;

    /// A response record as the layer lays it out: status, origin age, header count, headers.
    fn response(status: u16, count: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&status.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        for (n, v) in headers {
            out.extend_from_slice(&(n.len() as u16).to_le_bytes());
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out.extend_from_slice(body);
        out
    }
    let mem = MemoryBackend::default();
    let origin = Origin::new(ms(1), |_, n| ok("max-age=60", format!("run {n}")));
    let svc = StampedeLayer::new(tower_stampede::Stampede::new(mem.clone()))
        .key_fn(|p| Some(p.uri.path().as_bytes().to_vec()))
        .layer(origin.service());
    let slot = Digest::of_fields([&b"http-user"[..], b"/p"]);
    let cl = [("content-length", "3")];
    let unreadable = [
        // More headers claimed than `HeaderMap` can hold (it panics on the capacity).
        response(200, u16::MAX, &cl, b"abc"),
        // A Content-Length that is not the body's: hyper would frame the body wrongly.
        response(200, 1, &[("content-length", "9")], b"abc"),
        response(
            200,
            2,
            &[("content-length", "3"), ("transfer-encoding", "chunked")],
            b"abc",
        ),
        // An informational status, a header name that is not one, status 0.
        response(103, 1, &cl, b"abc"),
        response(200, 1, &[("bad name", "x")], b""),
        response(0, 0, &[], b""),
    ];
    let meta = Meta {
        stored_at_ms: 0,
        fresh_until_ms: u64::MAX / 2,
        swr_ms: 0,
        sie_ms: 0,
        fill_ms: 1,
    };
    let put = |meta: &Meta, value: &[u8]| {
        let header = Header {
            kind: Kind::Entry,
            fence: 1,
            token: Token::random(),
            epoch: 0,
        };
        let record = Record::encode_entry(header, meta, value);
        mem.put_raw(&slot, record, Duration::from_secs(600));
    };
    for (i, value) in unreadable.iter().enumerate() {
        put(&meta, value);
        // The request that meets it is served: the entry is dropped and this request fills.
        let g = send(&svc, get("http://a.test/p")).await;
        assert_eq!(g.status, StatusCode::OK, "value {i}");
        assert_eq!(
            &g.body[..],
            format!("run {}", i + 1).as_bytes(),
            "value {i}"
        );
        assert!(
            g.cs().contains("fwd=uri-miss; stored")
                && g.cs().ends_with("; detail=replaced-unreadable-entry"),
            "value {i}: {}",
            g.cs()
        );
        assert_eq!(origin.calls(), i + 1, "value {i}");
        let g = send(&svc, get("http://a.test/p")).await;
        assert!(g.cs().contains("; hit"), "value {i}: {}", g.cs());
        assert!(!g.cs().contains("unreadable"), "value {i}: {}", g.cs());
    }
    // Stale, inside its stale-while-revalidate window: a refresh starts for it, and this
    // request retries with a clone of its service, so either can fill; the request is served.
    let stale = Meta {
        fresh_until_ms: 1,
        swr_ms: u64::MAX / 4,
        ..meta
    };
    put(&stale, &unreadable[0]);
    let n = unreadable.len();
    let g = send(&svc, get("http://a.test/p")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.cs());
    assert_eq!(&g.body[..], format!("run {}", n + 1).as_bytes());
    assert_eq!(
        origin.calls(),
        n + 1,
        "the refresh gave up: the drop changed the fence"
    );
    let g = send(&svc, get("http://a.test/p")).await;
    assert!(g.cs().contains("; hit"), "{}", g.cs());
}

/// A request's `Cache-Control: no-cache` or `max-age=0` (a reload) is a preference (RFC 9111
/// section 5.2.1.4), served from the cache: honoured, any client could send the herd to the
/// origin. `no-store` bypasses the cache.
#[tokio::test(start_paused = true)]
async fn a_request_asking_for_no_cache_is_served_from_the_cache_and_no_store_bypasses_it() {
    let origin = Origin::new(ms(1), |_, n| ok("max-age=60", format!("run {n}")));
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let g = send(&svc, get("http://a.test/r")).await;
    assert_eq!(&g.body[..], b"run 1");
    for cc in [
        "no-cache",
        "max-age=0",
        "no-cache, max-age=0",
        "must-revalidate",
    ] {
        let req = Request::get("http://a.test/r")
            .header("cache-control", cc)
            .body(Full::default())
            .unwrap();
        let g = send(&svc, req).await;
        assert_eq!(&g.body[..], b"run 1", "{cc}");
        assert!(g.cs().contains("; hit"), "{cc}: {}", g.cs());
    }
    assert_eq!(origin.calls(), 1);
    let req = Request::get("http://a.test/r")
        .header("cache-control", "no-store")
        .body(Full::default())
        .unwrap();
    let g = send(&svc, req).await;
    assert_eq!(&g.body[..], b"run 2");
    assert!(g.cs().contains("fwd=bypass; detail=no-store"), "{}", g.cs());
    assert_eq!(origin.calls(), 2);
}

/// `Cache-Control: only-if-cached` (RFC 9111 section 5.2.1.7): the stored response while it is
/// fresh (a 304 to a conditional request), else a 504; the origin is never called for it, not
/// even for a stale copy's refresh. Before, such a request was filled like any other.
#[tokio::test(start_paused = true)]
async fn only_if_cached_is_a_stored_response_or_a_504_and_never_the_origin() {
    let origin = Origin::new(ms(1), |_, n| {
        let mut r = ok("max-age=60, stale-while-revalidate=600", format!("run {n}"));
        r.headers_mut()
            .insert(header::ETAG, "\"e\"".parse().unwrap());
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let only = |extra: Option<(&'static str, &'static str)>| {
        let mut b =
            Request::get("http://a.test/o").header("cache-control", "max-stale, only-if-cached");
        if let Some((n, v)) = extra {
            b = b.header(n, v);
        }
        b.body(Full::default()).unwrap()
    };
    let g = send(&svc, only(None)).await;
    assert_eq!(g.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(g.cs(), "tower-stampede; detail=only-if-cached");
    assert_eq!(origin.calls(), 0, "a miss does not reach the origin");
    assert_eq!(&send(&svc, get("http://a.test/o")).await.body[..], b"run 1");
    let g = send(&svc, only(None)).await;
    assert_eq!((g.status, &g.body[..]), (StatusCode::OK, &b"run 1"[..]));
    assert!(g.cs().contains("; hit"), "{}", g.cs());
    let g = send(&svc, only(Some(("if-none-match", "\"e\"")))).await;
    assert_eq!(g.status, StatusCode::NOT_MODIFIED);
    assert_eq!(origin.calls(), 1);
    // Stale (inside stale-while-revalidate): a 504, and no refresh started.
    tokio::time::advance(Duration::from_secs(61)).await;
    let g = send(&svc, only(None)).await;
    assert_eq!(g.status, StatusCode::GATEWAY_TIMEOUT, "{}", g.cs());
    tokio::time::sleep(ms(100)).await;
    assert_eq!(
        origin.calls(),
        1,
        "no refresh for an only-if-cached request"
    );
    // A request the cache would not serve (no-store, Authorization) and that asks for
    // only-if-cached is a 504 too, never the origin; obs-text on the line hides nothing.
    for (n, v) in [
        ("cache-control", "no-store, only-if-cached"),
        ("authorization", "Basic eA=="),
    ] {
        let req = Request::get("http://a.test/o")
            .header("cache-control", "only-if-cached")
            .header(n, v)
            .body(Full::default())
            .unwrap();
        let g = send(&svc, req).await;
        assert_eq!(g.status, StatusCode::GATEWAY_TIMEOUT, "{n}: {}", g.cs());
    }
    let obs = http::HeaderValue::from_bytes(b"only-if-cached, x=\"caf\xe9\"").unwrap();
    let req = Request::get("http://a.test/never")
        .header("cache-control", obs)
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&svc, req).await.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(origin.calls(), 1);
    // Any other request refreshes it as before.
    let g = send(&svc, get("http://a.test/o")).await;
    assert!(g.cs().contains("stale-while-revalidate"), "{}", g.cs());
    tokio::time::sleep(ms(100)).await;
    assert_eq!(origin.calls(), 2);
}

/// `Host: a.test:80`, `Host: A.test` and an absolute `http://a.test:80/` target name one origin
/// (RFC 3986 section 6.2.3): one entry, and a POST through any of them invalidates it. Another
/// port is another origin.
#[tokio::test(start_paused = true)]
async fn a_default_port_or_an_upper_case_host_is_the_same_url() {
    let origin = Origin::new(ms(1), |_, n| ok("max-age=60", format!("run {n}")));
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let with_host = |method: Method, uri: &str, host: &'static str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("host", host)
            .body(Full::default())
            .unwrap()
    };
    let g = send(&svc, with_host(Method::GET, "/p", "a.test:80")).await;
    assert_eq!(&g.body[..], b"run 1");
    for (uri, host) in [
        ("/p", "a.test"),
        ("/p", "A.Test"),
        ("http://a.test:80/p", "a.test"),
        ("http://a.test/p", "a.test:80"),
    ] {
        let g = send(&svc, with_host(Method::GET, uri, host)).await;
        assert!(g.cs().contains("; hit"), "{uri} {host}: {}", g.cs());
    }
    assert_eq!(origin.calls(), 1);
    let g = send(&svc, with_host(Method::GET, "/p", "a.test:8080")).await;
    assert_eq!(&g.body[..], b"run 2", "another port, another origin");
    let g = send(&svc, with_host(Method::POST, "/p", "A.test:80")).await;
    assert_eq!(g.status, StatusCode::OK);
    let g = send(&svc, with_host(Method::GET, "/p", "a.test")).await;
    assert_eq!(&g.body[..], b"run 4", "invalidated by the POST: {}", g.cs());
}

/// The memory store with a round trip on `invalidate` alone, so a refresh that starts with a
/// request can reach the store before that request's invalidation does; with `fail`, the
/// invalidation errs after it.
#[derive(Clone)]
struct SlowInvalidate(tower_stampede::backend::memory::MemoryBackend, bool);

mod slow_invalidate {
    use super::SlowInvalidate;
    use std::time::Duration;
    use tower_stampede::backend::{
        Acquire, Backend, BackendError, BackendResult, BoxFuture, FencedWrite, Fetched, Signal,
        Subscription, Token, WriteOutcome,
    };
    use tower_stampede::key::Digest;

    impl Backend for SlowInvalidate {
        fn name(&self) -> &'static str {
            "slow-invalidate"
        }
        fn fetch<'a>(
            &'a self,
            s: &'a Digest,
            v: Option<&'a Digest>,
        ) -> BoxFuture<'a, BackendResult<Fetched>> {
            self.0.fetch(s, v)
        }
        fn try_acquire<'a>(
            &'a self,
            s: &'a Digest,
            ttl: Duration,
            seen: u64,
        ) -> BoxFuture<'a, BackendResult<Acquire>> {
            self.0.try_acquire(s, ttl, seen)
        }
        fn extend<'a>(
            &'a self,
            s: &'a Digest,
            t: Token,
            ttl: Duration,
        ) -> BoxFuture<'a, BackendResult<bool>> {
            self.0.extend(s, t, ttl)
        }
        fn release<'a>(
            &'a self,
            s: &'a Digest,
            t: Token,
            sig: Signal,
        ) -> BoxFuture<'a, BackendResult<bool>> {
            self.0.release(s, t, sig)
        }
        fn write(&self, w: FencedWrite) -> BoxFuture<'_, BackendResult<WriteOutcome>> {
            self.0.write(w)
        }
        fn invalidate<'a>(
            &'a self,
            s: &'a Digest,
            ttl: Duration,
        ) -> BoxFuture<'a, BackendResult<u64>> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if self.1 {
                    return Err(BackendError::new("invalidation refused by the test"));
                }
                self.0.invalidate(s, ttl).await
            })
        }
        fn fail<'a>(
            &'a self,
            s: &'a Digest,
            t: Token,
            d: Duration,
        ) -> BoxFuture<'a, BackendResult<bool>> {
            self.0.fail(s, t, d)
        }
        fn subscribe<'a>(
            &'a self,
            s: &'a Digest,
        ) -> BoxFuture<'a, BackendResult<Option<Subscription>>> {
            self.0.subscribe(s)
        }
    }
}

/// A request that waited out its deadline on another instance's lease, was handed the stale
/// copy and found it unreadable, retries with the deadline it already has: it gets its 504 at
/// once, not after a second `wait_timeout`.
#[tokio::test(start_paused = true)]
async fn a_retry_after_an_unreadable_entry_keeps_the_requests_deadline() {
    use tower_stampede::backend::{memory::MemoryBackend, Acquire, Backend, Token};
    use tower_stampede::entry::{Header, Kind, Meta, Record};
    use tower_stampede::key::Digest;

    let mem = MemoryBackend::default();
    let origin = Origin::new(ms(1), |_, n| ok("max-age=60", format!("run {n}")));
    let cfg = tower_stampede::Config::default();
    let wait = cfg.wait_timeout_duration();
    let engine = tower_stampede::Stampede::with_config(mem.clone(), cfg).unwrap();
    let svc = StampedeLayer::new(engine)
        .key_fn(|p| Some(p.uri.path().as_bytes().to_vec()))
        .layer(origin.service());
    let slot = Digest::of_fields([&b"http-user"[..], b"/p"]);
    // Stale, inside a long stale-if-error window: what a deadline may serve. Not a response.
    let meta = Meta {
        stored_at_ms: 0,
        fresh_until_ms: 1,
        swr_ms: 0,
        sie_ms: u64::MAX / 4,
        fill_ms: 1,
    };
    let header = Header {
        kind: Kind::Entry,
        fence: 1,
        token: Token::random(),
        epoch: 0,
    };
    let record = Record::encode_entry(header, &meta, b"not a stored response");
    mem.put_raw(&slot, record, Duration::from_secs(600));
    // Another instance holds the rebuild lease and never finishes.
    let held = mem
        .try_acquire(&slot, Duration::from_secs(600), 1)
        .await
        .unwrap();
    assert!(matches!(held, Acquire::Acquired { .. }), "{held:?}");

    let started = tokio::time::Instant::now();
    let g = send(&svc, get("http://a.test/p")).await;
    let took = started.elapsed();
    assert_eq!(g.status, StatusCode::GATEWAY_TIMEOUT, "{}", g.cs());
    assert_eq!(origin.calls(), 0);
    // On the paused clock: one deadline, not two.
    assert!(took < wait + wait / 2, "answered after {took:?}");
}

/// An unreadable fresh value under the path `/p` (a layer keyed on the path alone): a
/// well-formed record whose response has status 0, its fill having taken `fill_ms`.
fn put_status_zero(mem: &tower_stampede::backend::memory::MemoryBackend, fill_ms: u32) {
    use tower_stampede::backend::Token;
    use tower_stampede::entry::{Header, Kind, Meta, Record};
    use tower_stampede::key::Digest;

    let meta = Meta {
        stored_at_ms: 0,
        fresh_until_ms: u64::MAX / 2,
        swr_ms: 0,
        sie_ms: 0,
        fill_ms,
    };
    let header = Header {
        kind: Kind::Entry,
        fence: 1,
        token: Token::random(),
        epoch: 0,
    };
    let record = Record::encode_entry(header, &meta, &[0u8; 8]);
    let slot = Digest::of_fields([&b"http-user"[..], b"/p"]);
    mem.put_raw(&slot, record, Duration::from_secs(600));
}

/// An unreadable fresh value whose XFetch refresh takes the lease (and the request's service)
/// while the request's invalidation is on its way: the request still fills with its own clone
/// of the service and is served, never a 502 for the lease's length. Found by a review helper.
#[tokio::test(start_paused = true)]
async fn an_unreadable_value_whose_xfetch_refresh_wins_the_lease_is_still_served() {
    let mem = tower_stampede::backend::memory::MemoryBackend::default();
    let origin = Origin::new(ms(1), |_, n| ok("max-age=60", format!("run {n}")));
    // XFetch always due: the deterministic form of a rare draw.
    let config = tower_stampede::Config::default().xfetch_beta(1e18);
    let engine =
        tower_stampede::Stampede::with_config(SlowInvalidate(mem.clone(), false), config).unwrap();
    let svc = StampedeLayer::new(engine)
        .key_fn(|p| Some(p.uri.path().as_bytes().to_vec()))
        .layer(origin.service());
    put_status_zero(&mem, 1000);
    let g = send(&svc, get("http://a.test/p")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.cs());
    assert!(g.cs().contains("fwd=uri-miss; stored"), "{}", g.cs());
    let served = g.body;
    assert!(origin.calls() <= 2, "{} calls", origin.calls());
    tokio::time::sleep(ms(100)).await;
    let g = send(&svc, get("http://a.test/p")).await;
    assert!(g.cs().contains("; hit"), "{}", g.cs());
    assert_eq!(g.body, served);
}

/// An unreadable value the store fails to drop: a 502 that says the drop failed (not "dropped,
/// retry"), the origin is not called, and the next request meets the same answer until the
/// store can drop it.
#[tokio::test(start_paused = true)]
async fn an_unreadable_value_the_store_cannot_drop_is_a_502_that_says_so() {
    let mem = tower_stampede::backend::memory::MemoryBackend::default();
    let origin = Origin::new(ms(1), |_, n| ok("max-age=60", format!("run {n}")));
    let engine = tower_stampede::Stampede::new(SlowInvalidate(mem.clone(), true));
    let svc = StampedeLayer::new(engine)
        .key_fn(|p| Some(p.uri.path().as_bytes().to_vec()))
        .layer(origin.service());
    put_status_zero(&mem, 1);
    for _ in 0..2 {
        let g = send(&svc, get("http://a.test/p")).await;
        assert_eq!(g.status, StatusCode::BAD_GATEWAY);
        assert!(g.cs().contains("detail=unreadable-entry"), "{}", g.cs());
        let body = String::from_utf8_lossy(&g.body);
        assert!(body.contains("failed to drop it"), "{body}");
        assert!(!body.contains("has been dropped"), "{body}");
    }
    assert_eq!(origin.calls(), 0);
}

/// Keys are the raw target, so a GET of `/item/x/../3` is stored under it: a `Location` naming
/// it byte for byte invalidates it, and its normalized form `/item/3` too (a client following
/// the redirect asks for that), escaped dots included. Found by a review helper.
#[tokio::test(start_paused = true)]
async fn a_location_with_dot_segments_invalidates_it_as_written_and_without_them() {
    let origin = Origin::new(ms(1), |req, n| {
        if req.method() == Method::GET {
            return ok("max-age=60", format!("run {n}"));
        }
        let mut r = ok("", "done");
        *r.status_mut() = StatusCode::SEE_OTHER;
        let loc = if req.uri().path() == "/do" {
            "/item/x/../3"
        } else {
            "/item/y/%2E%2e/%34"
        };
        r.headers_mut()
            .insert(header::LOCATION, loc.parse().unwrap());
        r
    });
    let svc = StampedeLayer::in_memory().layer(origin.service());
    let urls = ["http://a.test/item/x/../3", "http://a.test/item/3"];
    for u in urls {
        send(&svc, get(u)).await;
        assert!(send(&svc, get(u)).await.cs().contains("; hit"), "{u}");
    }
    let post = Request::post("http://a.test/do")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&svc, post).await.status, StatusCode::SEE_OTHER);
    for u in urls {
        let g = send(&svc, get(u)).await;
        assert!(g.cs().contains("fwd=uri-miss; stored"), "{u}: {}", g.cs());
    }
    // Escaped unreserved characters are normalized too (RFC 3986 section 6.2.2.2): `%2E%2e`
    // is `..` and `%34` is `4`.
    let u = "http://a.test/item/4";
    send(&svc, get(u)).await;
    assert!(send(&svc, get(u)).await.cs().contains("; hit"));
    let post = Request::post("http://a.test/do-escaped")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&svc, post).await.status, StatusCode::SEE_OTHER);
    let g = send(&svc, get(u)).await;
    assert!(g.cs().contains("fwd=uri-miss; stored"), "{u}: {}", g.cs());
}

/// A bounded wait's result, so something held back fails the test instead of hanging it.
fn within<T>(r: Result<T, tokio::time::error::Elapsed>, what: &str) -> T {
    r.unwrap_or_else(|_| panic!("{what}"))
}

/// A body the test feeds one chunk at a time; it ends when the sender is dropped.
struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Fed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// A response whose headers say it is not stored (server-sent events, `no-store`) reaches its
/// caller as it comes: its headers and each event while the stream is still open, not once it
/// ends (which an event stream never does) or is cut at `max_body`.
#[tokio::test]
async fn a_passed_stream_reaches_its_caller_as_it_comes() {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let origin = tower::service_fn(move |_req: Req| {
        let rx = rx.lock().unwrap().take();
        async move {
            let rx = rx.expect("the origin is called once");
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .header("cache-control", "no-store")
                    .body(Fed(rx))
                    .unwrap(),
            )
        }
    });
    let svc = StampedeLayer::in_memory().max_body(64).layer(origin);
    tx.send(Bytes::from_static(b"data: 0\n\n")).await.unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), svc.oneshot(get("/events"))).await;
    let res = within(res, "no response head while the stream is open").unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let cs = res.headers()["cache-status"].to_str().unwrap().to_string();
    assert!(cs.contains("detail=no-store"), "{cs}");
    let mut body = res.into_body();
    // 20 events, 180 bytes in all: past max_body, and each read before the next is sent.
    for i in 0..20 {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame()).await;
        let frame = within(frame, "an event held back while the stream is open")
            .expect("the stream ended early")
            .unwrap();
        assert_eq!(
            frame.into_data().unwrap(),
            format!("data: {i}\n\n").as_bytes()
        );
        if i < 19 {
            tx.send(Bytes::from(format!("data: {}\n\n", i + 1)))
                .await
                .unwrap();
        }
    }
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(10), body.frame()).await;
    assert!(
        within(end, "the end held back").is_none(),
        "the stream ends"
    );
}
