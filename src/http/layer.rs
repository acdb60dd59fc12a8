//! [`StampedeLayer`]: configuration and the `tower::Layer` impl.

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use tower_layer::Layer;

use super::cache_status::sanitize_name;
use super::freshness::Defaults;
use super::service::StampedeService;
use crate::backend::memory::MemoryBackend;
use crate::engine::Stampede;

/// A user key function: the bytes that identify the cached resource, or `None` to bypass the
/// cache for this request.
pub type KeyFn = Arc<dyn Fn(&Parts) -> Option<Vec<u8>> + Send + Sync>;

/// What to do with requests that carry a `Cookie` header when the TTL would come from the
/// layer's configuration (the origin said nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CookiePolicy {
    /// Bypass the cache (the default): a handler that personalises by cookie rarely says so in
    /// its headers.
    Bypass,
    /// Bypass unless every cookie in the request is one of these names (analytics cookies...).
    Ignore(Vec<String>),
    /// Cache them like any request (an explicit opt-in).
    Cache,
}

#[derive(Clone)]
pub(crate) struct Options {
    pub(crate) defaults: Defaults,
    pub(crate) max_body: usize,
    pub(crate) name: String,
    pub(crate) cookies: CookiePolicy,
    pub(crate) key_fn: Option<KeyFn>,
    pub(crate) invalidate_on_unsafe: bool,
}

#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) engine: Stampede,
    pub(crate) opts: Options,
}

/// A Tower layer that caches HTTP responses and stops stampedes.
///
/// GET and HEAD requests go through the cache; everything else passes through (and a successful
/// unsafe method invalidates the URL, RFC 9111 section 4.4). Every response carries
/// `Cache-Status` (RFC 9211).
///
/// | option | default |
/// |---|---|
/// | [`default_ttl`](Self::default_ttl) | none: responses whose origin says nothing are not cached |
/// | [`stale_while_revalidate`](Self::stale_while_revalidate) | 0 (origin's `stale-while-revalidate` wins) |
/// | [`stale_if_error`](Self::stale_if_error) | 0 (origin's `stale-if-error` wins) |
/// | [`revalidate_window`](Self::revalidate_window) | 5 min: stale responses with validators are kept this long to revalidate |
/// | [`max_body`](Self::max_body) | 1 MiB; larger bodies stream through uncached |
/// | [`cookies`](Self::cookies) | [`CookiePolicy::Bypass`] |
/// | [`cache_name`](Self::cache_name) | `tower-stampede` |
/// | [`invalidate_on_unsafe`](Self::invalidate_on_unsafe) | true |
///
/// Lease, waiting and backend options live on the engine's [`Config`](crate::Config).
#[derive(Clone)]
pub struct StampedeLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StampedeLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StampedeLayer")
            .field("engine", &self.shared.engine)
            .field("default_ttl", &self.shared.opts.defaults.ttl)
            .field("max_body", &self.shared.opts.max_body)
            .finish()
    }
}

impl StampedeLayer {
    /// A layer on `engine`.
    pub fn new(engine: Stampede) -> Self {
        StampedeLayer {
            shared: Arc::new(Shared {
                engine,
                opts: Options {
                    defaults: Defaults {
                        revalidate: Duration::from_secs(300),
                        ..Defaults::default()
                    },
                    max_body: 1024 * 1024,
                    name: "tower-stampede".into(),
                    cookies: CookiePolicy::Bypass,
                    key_fn: None,
                    invalidate_on_unsafe: true,
                },
            }),
        }
    }

    /// A layer on a default engine with the in-memory backend (64 MiB).
    pub fn in_memory() -> Self {
        Self::new(Stampede::new(MemoryBackend::default()))
    }

    /// The engine.
    pub fn engine(&self) -> &Stampede {
        &self.shared.engine
    }

    fn with(mut self, f: impl FnOnce(&mut Options)) -> Self {
        f(&mut Arc::make_mut(&mut self.shared).opts);
        self
    }

    /// The freshness of responses whose origin gives none (no `max-age`, `s-maxage` or
    /// `Expires`). Without it such responses are not cached.
    pub fn default_ttl(self, ttl: Duration) -> Self {
        self.with(|o| o.defaults.ttl = Some(ttl))
    }

    /// The stale-while-revalidate window for responses that do not set one.
    pub fn stale_while_revalidate(self, d: Duration) -> Self {
        self.with(|o| o.defaults.swr = d)
    }

    /// The stale-if-error window for responses that do not set one.
    pub fn stale_if_error(self, d: Duration) -> Self {
        self.with(|o| o.defaults.sie = d)
    }

    /// How long a stale response that has validators (`ETag`, `Last-Modified`) is kept past its
    /// freshness so the next fill can revalidate it with a conditional request instead of
    /// fetching it whole (default 5 minutes). It is never served on its own.
    pub fn revalidate_window(self, d: Duration) -> Self {
        self.with(|o| o.defaults.revalidate = d)
    }

    /// The largest body that is buffered and cached; larger ones stream through uncached and
    /// set the pass marker.
    pub fn max_body(self, bytes: usize) -> Self {
        self.with(|o| o.max_body = bytes)
    }

    /// The cache's name in `Cache-Status` (characters outside an RFC 8941 token become `-`).
    pub fn cache_name(self, name: &str) -> Self {
        let n = sanitize_name(name);
        self.with(|o| o.name = n)
    }

    /// What to do with requests that carry cookies (see [`CookiePolicy`]).
    pub fn cookies(self, policy: CookiePolicy) -> Self {
        self.with(|o| o.cookies = policy)
    }

    /// A key function: the bytes naming the resource, or `None` to bypass the cache. The default
    /// key is method class + scheme + authority + path + query.
    ///
    /// It is also asked for the keys an unsafe request invalidates: with that request's head,
    /// and, for a same-origin `Location` or `Content-Location` of its response, with the same
    /// head but that URL (method and headers still the unsafe request's).
    pub fn key_fn(self, f: impl Fn(&Parts) -> Option<Vec<u8>> + Send + Sync + 'static) -> Self {
        let f: KeyFn = Arc::new(f);
        self.with(|o| o.key_fn = Some(f))
    }

    /// Invalidate the URL after a successful unsafe method (POST, PUT, DELETE, PATCH...).
    pub fn invalidate_on_unsafe(self, on: bool) -> Self {
        self.with(|o| o.invalidate_on_unsafe = on)
    }
}

impl<S> Layer<S> for StampedeLayer {
    type Service = StampedeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StampedeService::new(inner, self.shared.clone())
    }
}
