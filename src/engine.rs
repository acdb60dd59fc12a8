//! The stampede engine: `get_or_fill` and the lease protocol of DESIGN.md.
//!
//! ```text
//! lookup -> fresh                     : hit (XFetch may start one background refresh)
//!        -> stale inside its swr window: serve stale now; one background refresh under the lease
//!        -> pass marker                : call the source without the lease (may store: hit-for-miss)
//!        -> missing / beyond policy    : join the local flight, which runs try_acquire:
//!             Refreshed -> read again
//!             Acquired  -> fill detached, extend the lease, fenced write, signal
//!             Held      -> marked failed: the fallback now; in-policy stale copy: serve it;
//!                          else wait (signal + backoff polling)
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::{
    Acquire, Backend, BackendError, BackendResult, BoxFuture, FencedWrite, Signal, Subscription,
    Token, WriteOutcome,
};
use crate::backoff::jitter;
use crate::clock::now_ms;
use crate::coalesce::{outcome, Aborted, Flights, Join};
use crate::entry::{Header, Kind, Meta, Record, Ttl};
use crate::error::{BoxError, ConfigError, Error};
use crate::key::Digest;
use crate::policy::Config;

/// Maps a stored selector (HTTP: the `Vary` header names) to this caller's variant digest, or
/// `None` when this caller can never match a stored variant (HTTP: `Vary: *`).
///
/// Any `Fn(&[u8]) -> Option<Digest>` closure is one; a type of the caller's own can be too, so
/// that the state a request already shares doubles as its selector (no allocation of its own).
pub trait Select: Send + Sync {
    /// This caller's variant digest for `selector`.
    fn variant(&self, selector: &[u8]) -> Option<Digest>;
}

impl<F: Fn(&[u8]) -> Option<Digest> + Send + Sync> Select for F {
    fn variant(&self, selector: &[u8]) -> Option<Digest> {
        self(selector)
    }
}

/// A shared [`Select`]: `Arc::new(|selector: &[u8]| ...)` or an `Arc` of a `Select` type.
///
/// ```
/// use std::sync::Arc;
/// use tower_stampede::{key::Digest, CacheKey, Selector};
///
/// // This caller's variant: its language, for a value stored per `accept-language`.
/// let lang = "de".to_string();
/// let select: Selector = Arc::new(move |selector: &[u8]| {
///     (selector == b"accept-language").then(|| Digest::of_key(&lang))
/// });
/// let key = CacheKey::new("/home").with_selector(select);
/// # let _ = key;
/// ```
pub type Selector = Arc<dyn Select>;

/// What a call is about: the slot (the logical key) and, for values that vary by request, how
/// to pick this caller's variant.
#[derive(Clone)]
pub struct CacheKey {
    slot: Digest,
    select: Option<Selector>,
}

impl CacheKey {
    /// A plain application key.
    pub fn new(key: impl AsRef<[u8]>) -> Self {
        CacheKey {
            slot: Digest::of_key(key),
            select: None,
        }
    }

    /// A key from an already computed digest.
    pub fn from_digest(slot: Digest) -> Self {
        CacheKey { slot, select: None }
    }

    /// Adds a variant selector (see [`Selector`]).
    pub fn with_selector(mut self, select: Selector) -> Self {
        self.select = Some(select);
        self
    }

    /// The slot digest.
    pub fn slot(&self) -> &Digest {
        &self.slot
    }

    fn variant_for(&self, selector: &[u8]) -> Option<Digest> {
        self.select.as_ref().and_then(|s| s.variant(selector))
    }
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheKey")
            .field("slot", &self.slot)
            .field("varies", &self.select.is_some())
            .finish()
    }
}

/// What a fill produced.
#[derive(Clone, Debug)]
pub enum Fill {
    /// A cacheable value: store it and hand it to every waiter.
    Store {
        /// The value.
        value: Bytes,
        /// Its freshness windows.
        ttl: Ttl,
        /// For a value that varies by request: the selector that names what it varies on.
        selector: Option<Bytes>,
    },
    /// Not cacheable by its nature (HTTP: `private`, `no-store`, `Set-Cookie`): a short pass
    /// marker sends callers to the source in parallel until it expires. Never handed to another
    /// caller.
    Pass {
        /// The value, for this caller alone.
        value: Bytes,
    },
    /// Not cacheable because of this caller (HTTP: its `Authorization`): returned to this caller
    /// alone; no pass marker, so one odd caller cannot turn caching off for everyone.
    Unshared {
        /// The value, for this caller alone.
        value: Bytes,
    },
}

impl Fill {
    /// A cacheable value.
    pub fn store(value: impl Into<Bytes>, ttl: Ttl) -> Self {
        Fill::Store {
            value: value.into(),
            ttl,
            selector: None,
        }
    }

    /// A value that must not be cached for anyone.
    pub fn pass(value: impl Into<Bytes>) -> Self {
        Fill::Pass {
            value: value.into(),
        }
    }
}

/// The previous value, handed to a fill so it can revalidate (HTTP: conditional request).
#[derive(Clone, Debug)]
pub struct Prev {
    /// The stored value.
    pub value: Bytes,
    /// Its metadata.
    pub meta: Meta,
}

/// How a call was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// A fresh stored value.
    Hit,
    /// A stale stored value, inside its policy.
    Stale(StaleReason),
    /// This call's fill ran, and its value was stored.
    Stored,
    /// This call's fill ran; the value was cacheable but not stored (a newer fence had landed, or
    /// the store refused its size).
    NotStored,
    /// This call's fill ran; the value was cacheable, but the store failed the write (slow,
    /// down or full, or this key's data in the way): not stored.
    WriteFailed,
    /// Another call's fill, in this process or another instance.
    Collapsed,
    /// This call's fill ran, and its value was not cacheable.
    Passed,
    /// The backend was unavailable: served from this process's fill, not cached.
    Bypass,
}

/// Why a stale value was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaleReason {
    /// Inside stale-while-revalidate; a refresh runs in the background.
    Revalidating,
    /// Inside stale-if-error; the fill failed.
    Error,
    /// The call's deadline passed while another caller's fill was still running.
    Deadline,
}

/// A served value. Made by the engine only (`#[non_exhaustive]`: fields may be added).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Served {
    /// The value.
    pub value: Bytes,
    /// Its metadata, when it came from (or went to) the store.
    pub meta: Option<Meta>,
    /// How it was served.
    pub status: Status,
    /// When the engine decided how to serve it, in Unix milliseconds on the engine's clock
    /// (which follows `tokio::time`): `meta`'s age and remaining TTL are relative to this, so a
    /// caller need not read the clock again.
    pub at_ms: u64,
}

impl Served {
    /// Served at this moment: `at_ms` is read from the engine's clock.
    fn now(value: Bytes, meta: Option<Meta>, status: Status) -> Self {
        Served {
            value,
            meta,
            status,
            at_ms: now_ms(),
        }
    }
}

/// The stampede engine. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Stampede {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Stampede {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stampede")
            .field("backend", &self.inner.backend.name())
            .field("config", &self.inner.cfg)
            .finish()
    }
}

struct Inner {
    backend: Arc<dyn Backend>,
    cfg: Config,
    flights: Arc<Flights<(Digest, Option<Digest>), Shared>>,
    breaker: Breaker,
    /// The last `Vary` selector seen per slot, so a hit on a varying entry is one round trip.
    /// Sharded: every HTTP lookup reads it.
    memo: Vec<Mutex<HashMap<Digest, Bytes>>>,
    /// Whether any selector was ever memoized: until one is, a lookup takes no memo lock (a hot
    /// slot's shard lock is a cache line every thread writes).
    memo_used: AtomicBool,
    /// Slots whose lease is held by a failed fill, until about when it expires. Read only when a
    /// lease is found held.
    /// With each: whether the store has the lease marked failed (see [`Backend::fail`]); if it
    /// does, the store's word wins, so an invalidation elsewhere that ended it ends it here.
    failed: Mutex<HashMap<Digest, (Instant, Failure, bool)>>,
    /// Per-request metric handles, registered with the `metrics` recorder on the first call:
    /// looking a labelled counter up in the registry on every hit costs more than the hit.
    hot: std::sync::OnceLock<HotMetrics>,
}

const OUTCOMES: [&str; 9] = [
    "hit",
    "stale",
    "stored",
    "not_stored",
    "collapsed",
    "passed",
    "bypass",
    "error",
    "write_failed",
];

/// The index in [`OUTCOMES`] of a call that ended in an error.
const ERROR_OUTCOME: usize = 7;

struct HotMetrics {
    /// `stampede_requests_total{outcome}`, indexed like [`OUTCOMES`].
    requests: [metrics::Counter; OUTCOMES.len()],
    call_seconds: metrics::Histogram,
}

impl HotMetrics {
    fn register() -> Self {
        HotMetrics {
            requests: OUTCOMES
                .map(|o| metrics::counter!("stampede_requests_total", "outcome" => o)),
            call_seconds: metrics::histogram!("stampede_call_seconds"),
        }
    }
}

const MEMO_SHARDS: usize = 16;
const MEMO_CAP: usize = 16_384 / MEMO_SHARDS;

pin_project_lite::pin_project! {
    /// The future of [`Stampede::get_or_fill_with`]: the call, then its outcome counted. A
    /// struct rather than an `async` block, which would hold the call's future twice.
    struct Counted<'a, T> {
        #[pin]
        call: tracing::instrument::Instrumented<T>,
        engine: &'a Stampede,
        started: Instant,
    }
}

impl<T: Future<Output = Result<Served, Error>>> Future for Counted<'_, T> {
    type Output = T::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T::Output> {
        let mut this = self.project();
        let std::task::Poll::Ready(res) = this.call.as_mut().poll(cx) else {
            return std::task::Poll::Pending;
        };
        let i = match &res {
            Ok(s) => status_index(s.status),
            Err(_) => ERROR_OUTCOME,
        };
        this.call.span().record("outcome", OUTCOMES[i]);
        let hot = this.engine.inner.hot.get_or_init(HotMetrics::register);
        hot.requests[i].increment(1);
        // Hits are counted above; timing them would cost more than it tells.
        if i != 0 {
            hot.call_seconds
                .record(this.started.elapsed().as_secs_f64());
        }
        std::task::Poll::Ready(res)
    }
}

/// A flight's outcome, shared by every caller that joined it.
#[derive(Clone, Debug)]
enum Shared {
    Value {
        value: Bytes,
        meta: Option<Meta>,
        selector: Option<Bytes>,
        variant: Option<Digest>,
        /// What became of the value (`Stored`, `NotStored` or `WriteFailed`), when this flight
        /// ran the fill: the status of the caller that ran it.
        filled: Option<Status>,
        bypass: bool,
    },
    Stale {
        value: Bytes,
        meta: Meta,
        selector: Option<Bytes>,
        variant: Option<Digest>,
    },
    Failed(Failure),
    Pass,
    Recompete,
    TimedOut,
    GaveUp,
    Aborted,
}

impl Aborted for Shared {
    fn aborted() -> Self {
        Shared::Aborted
    }
}

#[derive(Clone, Debug)]
enum Failure {
    Fill(Arc<dyn std::error::Error + Send + Sync>),
    Elsewhere,
    Timeout(Duration),
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::Fill(e) => Error::Fill(e),
            Failure::Elsewhere => Error::FailedElsewhere,
            Failure::Timeout(d) => Error::FillTimeout(d),
        }
    }
}

/// What the leader of a flight gets beyond the shared outcome.
enum Own {
    Value(Bytes),
    Panicked,
}

/// A lookup's view of a slot.
#[derive(Clone, Debug, Default)]
struct Looked {
    seen_fence: u64,
    epoch: u64,
    variant: Option<Digest>,
    selector: Option<Bytes>,
    found: Found,
}

#[derive(Clone, Debug, Default)]
enum Found {
    #[default]
    Nothing,
    Pass,
    Entry {
        value: Bytes,
        meta: Meta,
        fence: u64,
    },
}

impl Looked {
    fn entry(&self) -> Option<(&Bytes, &Meta, u64)> {
        match &self.found {
            Found::Entry { value, meta, fence } => Some((value, meta, *fence)),
            _ => None,
        }
    }

    fn prev(&self) -> Option<Prev> {
        self.entry().map(|(v, m, _)| Prev {
            value: v.clone(),
            meta: *m,
        })
    }

    fn stale_in(&self, now: u64, any_window: bool) -> Option<(Bytes, Meta)> {
        self.entry().and_then(|(v, m, _)| {
            let ok = m.in_swr(now) || (any_window && m.in_sie(now));
            ok.then(|| (v.clone(), *m))
        })
    }

    /// A value that landed after `before` was read, or any fresh one.
    fn landed_since(&self, before: &Looked, now: u64) -> bool {
        match self.entry() {
            Some((_, m, fence)) => m.is_fresh(now) || fence > before.seen_fence,
            None => false,
        }
    }
}

impl Stampede {
    /// An engine on `backend` with the default [`Config`].
    pub fn new(backend: impl Backend) -> Self {
        Self::with_config(backend, Config::default()).expect("the default config is valid")
    }

    /// An engine on `backend` with `config`, validated.
    pub fn with_config(backend: impl Backend, config: Config) -> Result<Self, ConfigError> {
        Self::from_arc(Arc::new(backend), config)
    }

    /// An engine on a shared backend.
    pub fn from_arc(backend: Arc<dyn Backend>, config: Config) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Stampede {
            inner: Arc::new(Inner {
                backend,
                breaker: Breaker::new(config.breaker_threshold, config.breaker_cooldown),
                cfg: config,
                flights: Arc::new(Flights::new()),
                memo: (0..MEMO_SHARDS)
                    .map(|_| Mutex::new(HashMap::new()))
                    .collect(),
                memo_used: AtomicBool::new(false),
                failed: Mutex::new(HashMap::new()),
                hot: std::sync::OnceLock::new(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// Waits until no flight (fill, wait or background refresh) of this engine is running, at
    /// most `timeout`; returns whether it got there. Call it on shutdown after the server
    /// stopped taking requests: running fills finish and their writes release their leases,
    /// instead of leaving them to expire.
    pub async fn drain(&self, timeout: Duration) -> bool {
        // A timeout beyond what an instant can hold waits as long as it takes.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if self.inner.flights.running() == 0 {
                return true;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the circuit breaker is open (the backend is being skipped).
    pub fn breaker_open(&self) -> bool {
        self.inner.breaker.is_open()
    }

    /// Returns the value for `key`, calling `fill` at most once across every caller and every
    /// instance sharing the backend while the value is missing.
    ///
    /// ```
    /// # use std::time::Duration;
    /// use tower_stampede::{Fill, Stampede, Ttl, backend::memory::MemoryBackend};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let engine = Stampede::new(MemoryBackend::default());
    /// let served = engine
    ///     .get_or_fill("user:42", || async {
    ///         // an expensive query
    ///         Ok::<_, std::io::Error>(Fill::store("Ada", Ttl::fresh(Duration::from_secs(60))))
    ///     })
    ///     .await
    ///     .unwrap();
    /// assert_eq!(&served.value[..], b"Ada");
    /// # }
    /// ```
    pub async fn get_or_fill<F, Fut, E>(
        &self,
        key: impl AsRef<[u8]>,
        fill: F,
    ) -> Result<Served, Error>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fill, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        self.get_or_fill_with(CacheKey::new(key), move |_prev| fill())
            .await
    }

    /// Like [`get_or_fill`](Self::get_or_fill), with a [`CacheKey`] (variants) and a fill that
    /// sees the previous value, if any, so it can revalidate instead of rebuilding.
    ///
    /// The `wait_timeout` deadline counts from this call, not from the first poll of the future
    /// it returns.
    // A function returning a future rather than an `async fn`, so that `key` and `fill` are
    // stored once in the future, not once per layer: it is allocated on every request.
    pub fn get_or_fill_with<F, Fut, E>(
        &self,
        key: CacheKey,
        fill: F,
    ) -> impl Future<Output = Result<Served, Error>> + Send + '_
    where
        F: FnOnce(Option<Prev>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fill, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        self.get_or_fill_since(key, fill, Instant::now())
    }

    /// [`get_or_fill_with`](Self::get_or_fill_with) for a caller that arrived at `arrived`: its
    /// `wait_timeout` deadline counts from then (a request that tries a second time keeps the
    /// deadline of its first try).
    pub(crate) fn get_or_fill_since<F, Fut, E>(
        &self,
        key: CacheKey,
        fill: F,
        arrived: Instant,
    ) -> impl Future<Output = Result<Served, Error>> + Send + '_
    where
        F: FnOnce(Option<Prev>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fill, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let span =
            tracing::debug_span!("stampede", key = %key.slot, outcome = tracing::field::Empty);
        Counted {
            call: self.call(key, fill, arrived).instrument(span),
            engine: self,
            started: arrived,
        }
    }

    /// The value stored under `key` while it is fresh, without calling a source, taking a
    /// lease, waiting or starting a refresh: `None` on a miss, past freshness (stale windows
    /// included), for a pass marker, and when the store fails or the breaker skips it. For
    /// callers that must not reach the source, such as HTTP's `Cache-Control: only-if-cached`.
    /// A value served is counted as a hit.
    pub async fn get_fresh(&self, key: CacheKey) -> Option<Served> {
        let looked = self.lookup(&key).await.ok()?;
        let Found::Entry { value, meta, .. } = looked.found else {
            return None;
        };
        let now = now_ms();
        if !meta.is_fresh(now) {
            return None;
        }
        let hot = self.inner.hot.get_or_init(HotMetrics::register);
        hot.requests[status_index(Status::Hit)].increment(1);
        Some(Served {
            value,
            meta: Some(meta),
            status: Status::Hit,
            at_ms: now,
        })
    }

    /// Invalidates `key` everywhere: bumps its fence and writes a tombstone, so a fill that
    /// started before this cannot write old content back.
    pub async fn invalidate(&self, key: impl AsRef<[u8]>) -> Result<(), BackendError> {
        self.invalidate_slot(&Digest::of_key(key)).await
    }

    /// Invalidates a slot by digest (see [`invalidate`](Self::invalidate)).
    pub async fn invalidate_slot(&self, slot: &Digest) -> Result<(), BackendError> {
        self.memo_forget(slot);
        // A failed fill's lease ends with the invalidation (the store's part): so does this
        // instance's memory of it, or a purge would be answered with the old failure.
        self.forget_failure(slot);
        // Long enough to outlive every fill that started before it, write included: the fence
        // only orders a write against what is stored, and once the tombstone is gone that
        // fill's older content would land.
        let cfg = &self.inner.cfg;
        let ttl = cfg
            .tombstone_ttl
            .max(cfg.fill_timeout.saturating_add(cfg.backend_timeout * 2));
        // A fill that started before this serves what it got to those that joined it, but no
        // caller from now on joins it: they start afresh and meet the tombstone. Before the
        // store call too, so a caller that gives this call up halfway (a client gone during
        // its POST) has detached them even if the tombstone landed.
        self.inner.flights.detach_where(|(s, _)| s == slot);
        let done = self
            .bcall(self.inner.backend.invalidate(slot, ttl))
            .await
            .map(|_| ());
        self.inner.flights.detach_where(|(s, _)| s == slot);
        done
    }

    /// The hit path: one lookup, and the value when it is fresh or inside stale-while-revalidate.
    /// Everything else continues in [`miss`](Self::miss), boxed, so a hit neither builds nor
    /// moves the miss path's large state machine.
    fn call<F, Fut, E>(
        &self,
        key: CacheKey,
        fill: F,
        arrived: Instant,
    ) -> impl Future<Output = Result<Served, Error>> + Send + '_
    where
        F: FnOnce(Option<Prev>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fill, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let deadline = arrived + self.inner.cfg.wait_timeout;
        // Moved into the future once (an `async fn` would hold `fill` twice).
        let mut fill = Some(fill);
        async move {
            let mut first = self.lookup(&key).await;
            if let Ok(looked) = &mut first {
                if let Some(served) = self.serve_stored(&key, looked, now_ms(), || fill.take()) {
                    return Ok(served);
                }
            }
            let Some(fill) = fill else {
                return Err(Error::FillPanicked);
            };
            Box::pin(self.miss(key, fill, deadline, first)).await
        }
    }

    /// A fresh entry (refreshed early when XFetch says so), or one inside stale-while-revalidate
    /// (refreshed in the background); `None` for anything else. The value served is moved out
    /// of `looked`, which the caller then drops.
    fn serve_stored<F, Fut, E>(
        &self,
        key: &CacheKey,
        looked: &mut Looked,
        now: u64,
        take_fill: impl FnOnce() -> Option<F>,
    ) -> Option<Served>
    where
        F: FnOnce(Option<Prev>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fill, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let Found::Entry { meta, .. } = &looked.found else {
            return None;
        };
        let meta = *meta;
        let status = if meta.is_fresh(now) {
            if self.xfetch_due(&meta, now) {
                if let Some(f) = take_fill() {
                    metrics::counter!("stampede_early_refresh_total").increment(1);
                    self.spawn_refresh(key.clone(), looked.clone(), f);
                }
            }
            Status::Hit
        } else if meta.in_swr(now) {
            metrics::counter!("stampede_stale_served_total", "reason" => "swr").increment(1);
            if let Some(f) = take_fill() {
                self.spawn_refresh(key.clone(), looked.clone(), f);
            }
            Status::Stale(StaleReason::Revalidating)
        } else {
            return None;
        };
        let Found::Entry { value, .. } = &mut looked.found else {
            return None;
        };
        Some(Served {
            value: std::mem::take(value),
            meta: Some(meta),
            status,
            at_ms: now,
        })
    }

    /// Everything but a hit: `first` is the lookup [`call`](Self::call) made (so a miss costs no
    /// second read); later rounds look up again.
    async fn miss<F, Fut, E>(
        &self,
        key: CacheKey,
        fill: F,
        deadline: Instant,
        first: BackendResult<Looked>,
    ) -> Result<Served, Error>
    where
        F: FnOnce(Option<Prev>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fill, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let fill = FillCell::new(fill);
        let mut last_stale: Option<(Bytes, Meta)> = None;
        let mut first = Some(first);
        loop {
            if Instant::now() >= deadline {
                return self.fallback(&key, last_stale, fill.take()).await;
            }
            let looked = match first.take() {
                Some(r) => r,
                None => self.lookup(&key).await,
            };
            let mut looked = match looked {
                Ok(l) => l,
                Err(_) => {
                    let Some(fill) = fill.take() else {
                        return Err(Error::FillPanicked);
                    };
                    return self.fail_open(key, fill, deadline, None).await;
                }
            };
            let now = now_ms();
            if let Some(st) = looked.stale_in(now, true) {
                last_stale = Some(st);
            }
            if let Some(served) = self.serve_stored(&key, &mut looked, now, || fill.take()) {
                return Ok(served);
            }
            if let Found::Pass = &looked.found {
                let Some(f) = fill.take() else {
                    return Err(Error::FillPanicked);
                };
                return self
                    .run_passed(&key, f, last_stale, looked.seen_fence)
                    .await;
            }
            metrics::counter!("stampede_misses_total").increment(1);

            let fkey = (key.slot, looked.variant);
            let seen_fence = looked.seen_fence;
            let (shared, own, leader) = match self.inner.flights.join(&fkey) {
                Join::Leader(guard) => {
                    if !fill.is_some() {
                        return Err(Error::FillPanicked);
                    }
                    let f = fill.clone();
                    let mut rx = guard.subscribe();
                    let (own_tx, mut own_rx) = oneshot::channel();
                    let this = self.clone();
                    let k = key.clone();
                    tokio::spawn(
                        async move {
                            let (shared, own) = this.flight(k, looked, f, deadline).await;
                            if let Some(o) = own {
                                let _ = own_tx.send(o);
                            }
                            guard.finish(shared);
                        }
                        .in_current_span(),
                    );
                    let shared = match tokio::time::timeout_at(deadline, outcome(&mut rx)).await {
                        Ok(s) => s,
                        Err(_) => return self.fallback(&key, last_stale, fill.take()).await,
                    };
                    (shared, own_rx.try_recv().ok(), true)
                }
                Join::Follower(mut rx) => {
                    match tokio::time::timeout_at(deadline, outcome(&mut rx)).await {
                        Ok(s) => (s, None, false),
                        Err(_) => return self.fallback(&key, last_stale, fill.take()).await,
                    }
                }
            };

            match shared {
                Shared::Value {
                    value,
                    meta,
                    selector,
                    variant,
                    filled,
                    bypass,
                } => {
                    if !self.matches(&key, selector.as_deref(), variant) {
                        // Our own fill's, unkeyable (see `fill_uncached`): ours all the same.
                        if let (true, Some(Own::Value(value))) = (leader, own) {
                            return Ok(Served::now(value, None, Status::Bypass));
                        }
                        // Another variant's value: re-read, now with the selector memoised.
                        continue;
                    }
                    let status = match (leader, filled, bypass) {
                        (_, _, true) => Status::Bypass,
                        (true, Some(filled), _) => filled,
                        _ => Status::Collapsed,
                    };
                    if status == Status::Collapsed {
                        metrics::counter!("stampede_collapsed_total").increment(1);
                    }
                    return Ok(Served::now(value, meta, status));
                }
                Shared::Stale {
                    value,
                    meta,
                    selector,
                    variant,
                } => {
                    if !self.matches(&key, selector.as_deref(), variant) {
                        continue;
                    }
                    metrics::counter!("stampede_stale_served_total", "reason" => "held")
                        .increment(1);
                    return Ok(Served::now(
                        value,
                        Some(meta),
                        Status::Stale(StaleReason::Revalidating),
                    ));
                }
                Shared::Failed(f) => {
                    return match fresh_stale(last_stale, true) {
                        Some((value, meta)) => {
                            metrics::counter!("stampede_stale_served_total", "reason" => "error")
                                .increment(1);
                            Ok(Served::now(
                                value,
                                Some(meta),
                                Status::Stale(StaleReason::Error),
                            ))
                        }
                        None => Err(f.into_error()),
                    };
                }
                Shared::Pass => {
                    match own {
                        Some(Own::Value(value)) => {
                            return Ok(Served::now(value, None, Status::Passed))
                        }
                        Some(Own::Panicked) => return Err(Error::FillPanicked),
                        // A pass we waited on (another caller's fill): go to the source.
                        None => {}
                    }
                    let Some(f) = fill.take() else {
                        return Err(Error::FillPanicked);
                    };
                    // The fence we saw before the flight: the marker it wrote (if any) is newer,
                    // so a hit-for-miss store is refreshed away, never written over a change.
                    return self.run_passed(&key, f, last_stale, seen_fence).await;
                }
                Shared::Recompete => {
                    match own {
                        Some(Own::Value(value)) => {
                            return Ok(Served::now(value, None, Status::Passed))
                        }
                        Some(Own::Panicked) => return Err(Error::FillPanicked),
                        // Our fill was not used (or we followed): compete again.
                        None if fill.is_some() => continue,
                        None => return Err(Error::FillPanicked),
                    }
                }
                // The flight waited up to its leader's deadline; ours may be later.
                Shared::TimedOut if Instant::now() < deadline && fill.is_some() => continue,
                Shared::TimedOut => return self.fallback(&key, last_stale, fill.take()).await,
                Shared::GaveUp | Shared::Aborted => {
                    if !fill.is_some() {
                        return Err(Error::FillPanicked);
                    }
                    // A background refresh that could not take the lease, or a vanished
                    // flight: compete ourselves, one backoff step later.
                    tokio::time::sleep(jitter(self.inner.cfg.backoff.min)).await;
                    continue;
                }
            }
        }
    }

    fn matches(&self, key: &CacheKey, selector: Option<&[u8]>, variant: Option<Digest>) -> bool {
        match selector {
            None => true,
            Some(sel) => key.variant_for(sel) == variant && variant.is_some(),
        }
    }

    /// The deadline passed: an in-policy stale copy, else the opt-in direct call, else the error.
    async fn fallback<F, Fut, E>(
        &self,
        key: &CacheKey,
        last_stale: Option<(Bytes, Meta)>,
        fill: Option<F>,
    ) -> Result<Served, Error>
    where
        F: FnOnce(Option<Prev>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fill, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        metrics::counter!("stampede_deadline_total").increment(1);
        if let Some((value, meta)) = fresh_stale(last_stale, true) {
            return Ok(Served::now(
                value,
                Some(meta),
                Status::Stale(StaleReason::Deadline),
            ));
        }
        match fill {
            Some(f) if self.inner.cfg.source_after_deadline => {
                // Not stored: the lease holder may still be filling.
                tracing::debug!(key = %key.slot, "deadline passed: calling the source (opt-in)");
                match call_fill(f, None, self.inner.cfg.fill_timeout).await {
                    FillRun::Done(Ok(fill)) => {
                        Ok(Served::now(fill_value(fill), None, Status::Passed))
                    }
                    FillRun::Done(Err(e)) => Err(Error::Fill(Arc::from(e))),
                    FillRun::Panicked => Err(Error::FillPanicked),
                    FillRun::TimedOut => Err(Error::FillTimeout(self.inner.cfg.fill_timeout)),
                }
            }
            _ => Err(Error::Timeout(self.inner.cfg.wait_timeout)),
        }
    }

    /// A pass marker is stored (or a flight ended in one): call the source ourselves, without
    /// the lease. A cacheable result may be stored if the lease is free (hit-for-miss), and only
    /// if the slot's fence is still `seen_fence`, read before the source was called: an
    /// invalidation (or any write) while it ran refreshes the lease away, so content from
    /// before it is never stored after it.
    async fn run_passed<F, Fut, E>(
        &self,
        key: &CacheKey,
        fill: F,
        last_stale: Option<(Bytes, Meta)>,
        seen_fence: u64,
    ) -> Result<Served, Error>
    where
        F: FnOnce(Option<Prev>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fill, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        metrics::counter!("stampede_pass_total").increment(1);
        let started = Instant::now();
        let fill = move |prev| PASSING.scope((), fill(prev));
        match call_fill(fill, None, self.inner.cfg.fill_timeout).await {
            FillRun::Done(Ok(Fill::Store {
                value,
                ttl,
                selector,
            })) if ttl.physical() > Duration::ZERO => {
                let ttl = ttl.clamped();
                // Hit-for-miss: the URL turned cacheable. Store it only under a fresh lease, so
                // the fence still orders the write; in an engine-owned task, so a caller that
                // goes away cannot strand the lease between acquire and write.
                let this = self.clone();
                let k = key.clone();
                let v = value.clone();
                let fill_time = started.elapsed();
                let store = tokio::spawn(async move {
                    // Read the head again (for its epoch and selector, and to leave an entry
                    // that landed meanwhile alone); the lease is asked with the fence seen
                    // before the source was called, not this one.
                    let looked = this.lookup(&k).await.ok()?;
                    if matches!(looked.found, Found::Entry { .. }) {
                        return None;
                    }
                    let acq = this.acquire(k.slot, seen_fence).await;
                    let Ok(Acquire::Acquired { token, fence }) = acq else {
                        return None;
                    };
                    let (w, meta) = this.build_write(
                        &k,
                        &looked,
                        token,
                        fence,
                        &v,
                        &ttl,
                        selector.as_ref(),
                        fill_time,
                    );
                    let stored = match w {
                        Some(w) => matches!(
                            this.bcall(this.inner.backend.write(w)).await,
                            Ok(WriteOutcome::Stored)
                        ),
                        None => false,
                    };
                    if !stored {
                        let _ = this
                            .bcall(this.inner.backend.release(&k.slot, token, Signal::Released))
                            .await;
                    }
                    stored.then_some(meta)
                });
                let meta_out = store.await.ok().flatten();
                let status = if meta_out.is_some() {
                    Status::Stored
                } else {
                    Status::Passed
                };
                Ok(Served::now(value, meta_out, status))
            }
            FillRun::Done(Ok(fill)) => Ok(Served::now(fill_value(fill), None, Status::Passed)),
            FillRun::Done(Err(e)) => stale_or(last_stale, Error::Fill(Arc::from(e))),
            FillRun::Panicked => Err(Error::FillPanicked),
            FillRun::TimedOut => {
                stale_or(last_stale, Error::FillTimeout(self.inner.cfg.fill_timeout))
            }
        }
    }

    /// The backend is unavailable: fill without caching, still coalesced in process.
    async fn fail_open<F, Fut, E>(
        &self,
        key: CacheKey,
        fill: F,
        deadline: Instant,
        _looked: Option<Looked>,
    ) -> Result<Served, Error>
    where
        F: FnOnce(Option<Prev>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fill, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        metrics::counter!("stampede_bypass_total", "reason" => "backend").increment(1);
        let variant = self.memo_variant(&key);
        let fkey = (key.slot, variant);
        let (shared, own, leader, fill) = match self.inner.flights.join(&fkey) {
            Join::Leader(guard) => {
                let mut rx = guard.subscribe();
                let (own_tx, mut own_rx) = oneshot::channel();
                let this = self.clone();
                let k = key.clone();
                tokio::spawn(async move {
                    let (shared, own) = this.fill_uncached(&k, variant, fill).await;
                    if let Some(o) = own {
                        let _ = own_tx.send(o);
                    }
                    guard.finish(shared);
                });
                let shared = tokio::time::timeout_at(deadline, outcome(&mut rx))
                    .await
                    .unwrap_or(Shared::TimedOut);
                (shared, own_rx.try_recv().ok(), true, None)
            }
            Join::Follower(mut rx) => {
                let shared = tokio::time::timeout_at(deadline, outcome(&mut rx))
                    .await
                    .unwrap_or(Shared::TimedOut);
                (shared, None, false, Some(fill))
            }
        };
        match shared {
            Shared::Value {
                value,
                meta,
                selector,
                variant,
                ..
            } if self.matches(&key, selector.as_deref(), variant) => {
                Ok(Served::now(value, meta, Status::Bypass))
            }
            Shared::Failed(f) => Err(f.into_error()),
            Shared::TimedOut => Err(Error::Timeout(self.inner.cfg.wait_timeout)),
            _ if leader => match own {
                Some(Own::Value(value)) => Ok(Served::now(value, None, Status::Bypass)),
                _ => Err(Error::FillPanicked),
            },
            _ => {
                // Not shareable (a pass, another variant): run our own fill.
                let Some(fill) = fill else {
                    return Err(Error::FillPanicked);
                };
                match call_fill(fill, None, self.inner.cfg.fill_timeout).await {
                    FillRun::Done(Ok(fill)) => {
                        Ok(Served::now(fill_value(fill), None, Status::Bypass))
                    }
                    FillRun::Done(Err(e)) => Err(Error::Fill(Arc::from(e))),
                    FillRun::Panicked => Err(Error::FillPanicked),
                    FillRun::TimedOut => Err(Error::FillTimeout(self.inner.cfg.fill_timeout)),
                }
            }
        }
    }

    async fn fill_uncached<F, Fut, E>(
        &self,
        key: &CacheKey,
        variant: Option<Digest>,
        fill: F,
    ) -> (Shared, Option<Own>)
    where
        F: FnOnce(Option<Prev>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fill, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        metrics::counter!("stampede_fills_total", "outcome" => "uncached").increment(1);
        match call_fill(fill, None, self.inner.cfg.fill_timeout).await {
            FillRun::Done(Ok(Fill::Store {
                value, selector, ..
            })) => {
                let variant = match &selector {
                    Some(sel) => key.variant_for(sel),
                    None => variant,
                };
                // A value its own caller's key cannot place (its selector names no variant) is
                // still that caller's: handed over on the side, as no one can match it.
                let own =
                    (selector.is_some() && variant.is_none()).then(|| Own::Value(value.clone()));
                (
                    Shared::Value {
                        value,
                        meta: None,
                        selector,
                        variant,
                        filled: Some(Status::NotStored),
                        bypass: true,
                    },
                    own,
                )
            }
            FillRun::Done(Ok(Fill::Pass { value })) => (Shared::Pass, Some(Own::Value(value))),
            FillRun::Done(Ok(Fill::Unshared { value })) => {
                (Shared::Recompete, Some(Own::Value(value)))
            }
            FillRun::Done(Err(e)) => (Shared::Failed(Failure::Fill(Arc::from(e))), None),
            FillRun::Panicked => (Shared::Recompete, Some(Own::Panicked)),
            FillRun::TimedOut => (
                Shared::Failed(Failure::Timeout(self.inner.cfg.fill_timeout)),
                None,
            ),
        }
    }

    /// One local flight: compete for the lease, fill or wait. Runs in an engine-owned task.
    async fn flight<F, Fut, E>(
        &self,
        key: CacheKey,
        mut looked: Looked,
        fill: FillCell<F>,
        deadline: Instant,
    ) -> (Shared, Option<Own>)
    where
        F: FnOnce(Option<Prev>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fill, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let cfg = &self.inner.cfg;
        let mut backoff = cfg.backoff.iter();
        let mut sub: Option<Subscription> = None;
        let mut subscribed_once = false;
        let wait_started = Instant::now();
        let mut waited = false;
        loop {
            if Instant::now() >= deadline {
                return (Shared::TimedOut, None);
            }
            let asked = Instant::now();
            let acq = match self.acquire(key.slot, looked.seen_fence).await {
                Ok(a) => a,
                Err(_) => {
                    let Some(f) = fill.take() else {
                        return (Shared::Recompete, None);
                    };
                    return self.fill_uncached(&key, looked.variant, f).await;
                }
            };
            match acq {
                Acquire::Refreshed => {
                    metrics::counter!("stampede_lease_total", "outcome" => "refreshed")
                        .increment(1);
                    let before = looked;
                    looked = match self.lookup(&key).await {
                        Ok(l) => l,
                        Err(_) => {
                            let Some(f) = fill.take() else {
                                return (Shared::Recompete, None);
                            };
                            return self.fill_uncached(&key, before.variant, f).await;
                        }
                    };
                    if let Some(s) = self.settled(&looked, &before) {
                        return (s, None);
                    }
                }
                Acquire::Acquired { token, fence } => {
                    metrics::counter!("stampede_lease_total", "outcome" => "won").increment(1);
                    if waited {
                        metrics::histogram!("stampede_wait_seconds")
                            .record(wait_started.elapsed().as_secs_f64());
                    }
                    let Some(f) = fill.take() else {
                        // Our caller gave up and took its fill back: let others compete.
                        let _ = self
                            .bcall(
                                self.inner
                                    .backend
                                    .release(&key.slot, token, Signal::Released),
                            )
                            .await;
                        return (Shared::Recompete, None);
                    };
                    return self.run_fill(&key, &looked, f, token, fence, asked).await;
                }
                Acquire::Held { remaining, failed } => {
                    metrics::counter!("stampede_lease_total", "outcome" => "held").increment(1);
                    // The lease is held by a fill that failed (marked so in the store, or only
                    // known here): take the fallback now instead of waiting out the lease.
                    match self.recent_failure(&key.slot) {
                        // Our own fill's error or one known before, or one the store could
                        // not be told of (only this instance knows).
                        Some((f, stored)) if failed || !stored => return (Shared::Failed(f), None),
                        // The store no longer has that lease marked: it ended (an invalidation
                        // on another instance, say), and another holder is filling.
                        Some(_) => self.forget_failure(&key.slot),
                        None => {}
                    }
                    if failed {
                        // A value may have landed since our lookup (a late write of an earlier
                        // holder, which its fence let through): serve it rather than the error.
                        if let Ok(l) = self.lookup(&key).await {
                            if let Some(s) = self.settled(&l, &looked) {
                                return (s, None);
                            }
                        }
                        self.remember_failure(&key.slot, remaining, &Failure::Elsewhere, true);
                        return (Shared::Failed(Failure::Elsewhere), None);
                    }
                    waited = true;
                    if let Some((value, meta)) = looked.stale_in(now_ms(), false) {
                        return (
                            Shared::Stale {
                                value,
                                meta,
                                selector: looked.selector.clone(),
                                variant: looked.variant,
                            },
                            None,
                        );
                    }
                    if sub.is_none() {
                        // Subscribe before the last re-check, so a signal sent after the re-read
                        // cannot be missed.
                        sub = self
                            .bcall(self.inner.backend.subscribe(&key.slot))
                            .await
                            .ok()
                            .flatten();
                        if sub.is_some() || !subscribed_once {
                            subscribed_once = true;
                            let before = looked.clone();
                            if let Ok(l) = self.lookup(&key).await {
                                looked = l;
                                if let Some(s) = self.settled(&looked, &before) {
                                    return (s, None);
                                }
                            }
                        }
                    }
                    let step = backoff
                        .next_step()
                        .min(remaining.saturating_add(jitter(cfg.backoff.min)));
                    let wake = (Instant::now() + step).min(deadline);
                    let signal = match sub.as_mut() {
                        Some(s) => tokio::select! {
                            sig = s.recv() => Some(sig),
                            _ = tokio::time::sleep_until(wake) => None,
                        },
                        None => {
                            tokio::time::sleep_until(wake).await;
                            None
                        }
                    };
                    match signal {
                        Some(Some(sig)) => {
                            metrics::counter!("stampede_signals_total", "signal" => sig.as_str())
                                .increment(1);
                            if sig == Signal::Failed {
                                self.remember_failure(
                                    &key.slot,
                                    remaining,
                                    &Failure::Elsewhere,
                                    true,
                                );
                                return (Shared::Failed(Failure::Elsewhere), None);
                            }
                            // Uncacheable: to the source without the lease. (The holder may
                            // have kept an in-policy stale copy instead of writing a marker,
                            // so a re-read need not show it.)
                            if sig == Signal::Pass {
                                return (Shared::Pass, None);
                            }
                        }
                        // The subscription broke (reconnect, lag): re-read, and subscribe again.
                        Some(None) => sub = None,
                        None => {}
                    }
                    let before = looked;
                    looked = match self.lookup(&key).await {
                        Ok(l) => l,
                        Err(_) => {
                            let Some(f) = fill.take() else {
                                return (Shared::Recompete, None);
                            };
                            return self.fill_uncached(&key, before.variant, f).await;
                        }
                    };
                    if let Some(s) = self.settled(&looked, &before) {
                        return (s, None);
                    }
                }
            }
        }
    }

    /// After a re-read: has something landed that ends the wait?
    fn settled(&self, looked: &Looked, before: &Looked) -> Option<Shared> {
        match &looked.found {
            Found::Pass => Some(Shared::Pass),
            Found::Entry { value, meta, .. } if looked.landed_since(before, now_ms()) => {
                Some(Shared::Value {
                    value: value.clone(),
                    meta: Some(*meta),
                    selector: looked.selector.clone(),
                    variant: looked.variant,
                    filled: None,
                    bypass: false,
                })
            }
            _ => None,
        }
    }

    /// We hold the lease: run the fill detached, extend the lease meanwhile, write fenced.
    async fn run_fill<F, Fut, E>(
        &self,
        key: &CacheKey,
        looked: &Looked,
        fill: F,
        token: Token,
        fence: u64,
        asked: Instant,
    ) -> (Shared, Option<Own>)
    where
        F: FnOnce(Option<Prev>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fill, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let cfg = &self.inner.cfg;
        let started = Instant::now();
        // Until when the lease is surely still ours: one lease from when it was asked for
        // (`asked`, before the grant), moved on by each extension the store confirmed, and
        // `None` once one was refused (the lease expired, and another holder may have it now).
        let held_until = Arc::new(Mutex::new(Some(asked + cfg.lease)));
        let extender = cfg.extend_lease.then(|| {
            let this = self.clone();
            let slot = key.slot;
            let held_until = held_until.clone();
            tokio::spawn(async move {
                let every = (this.inner.cfg.lease / 3).max(Duration::from_millis(1));
                loop {
                    tokio::time::sleep(every).await;
                    let asked = Instant::now();
                    let ok = this
                        .bcall(
                            this.inner
                                .backend
                                .extend(&slot, token, this.inner.cfg.lease),
                        )
                        .await;
                    let mut held = held_until.lock().unwrap_or_else(|e| e.into_inner());
                    match ok {
                        Ok(true) => {
                            metrics::counter!("stampede_lease_extended_total").increment(1);
                            if held.is_some() {
                                *held = Some(asked + this.inner.cfg.lease);
                            }
                        }
                        // Keep filling: the fence decides whether the write lands.
                        Ok(false) => {
                            metrics::counter!("stampede_lease_extend_failed_total").increment(1);
                            *held = None;
                        }
                        Err(_) => {
                            metrics::counter!("stampede_lease_extend_failed_total").increment(1)
                        }
                    }
                }
            })
        });
        let run = call_fill(fill, looked.prev(), cfg.fill_timeout).await;
        if let Some(e) = extender {
            e.abort();
        }
        let fill_time = started.elapsed();
        metrics::histogram!("stampede_fill_seconds").record(fill_time.as_secs_f64());
        let backend = &self.inner.backend;
        match run {
            FillRun::Panicked => {
                metrics::counter!("stampede_fills_total", "outcome" => "panicked").increment(1);
                let _ = self
                    .bcall(backend.release(&key.slot, token, Signal::Released))
                    .await;
                (Shared::Recompete, Some(Own::Panicked))
            }
            FillRun::TimedOut => {
                metrics::counter!("stampede_fills_total", "outcome" => "timeout").increment(1);
                let f = Failure::Timeout(cfg.fill_timeout);
                self.failed_holding(&key.slot, token, &held_until, &f).await;
                (Shared::Failed(f), None)
            }
            FillRun::Done(Err(e)) => {
                metrics::counter!("stampede_fills_total", "outcome" => "error").increment(1);
                let f = Failure::Fill(Arc::from(e));
                self.failed_holding(&key.slot, token, &held_until, &f).await;
                (Shared::Failed(f), None)
            }
            FillRun::Done(Ok(Fill::Unshared { value })) => {
                metrics::counter!("stampede_fills_total", "outcome" => "unshared").increment(1);
                let _ = self
                    .bcall(backend.release(&key.slot, token, Signal::Released))
                    .await;
                (Shared::Recompete, Some(Own::Value(value)))
            }
            FillRun::Done(Ok(Fill::Store {
                value,
                ttl,
                selector,
            })) if ttl.physical() > Duration::ZERO => {
                let ttl = ttl.clamped();
                let (w, meta) = self.build_write(
                    key,
                    looked,
                    token,
                    fence,
                    &value,
                    &ttl,
                    selector.as_ref(),
                    fill_time,
                );
                let Some(w) = w else {
                    // The value varies in a way this caller cannot key (HTTP `Vary: *`).
                    return self.pass(key, looked, token, fence, value).await;
                };
                let variant = w.variant.as_ref().map(|(d, _)| *d);
                let filled = match self.bcall(backend.write(w)).await {
                    Ok(WriteOutcome::Stored) => {
                        metrics::counter!("stampede_fills_total", "outcome" => "stored")
                            .increment(1);
                        self.forget_failure(&key.slot);
                        if let Some(sel) = &selector {
                            self.memo_set(&key.slot, sel.clone());
                        }
                        Status::Stored
                    }
                    Ok(WriteOutcome::Fenced) => {
                        metrics::counter!("stampede_fence_rejections_total").increment(1);
                        Status::NotStored
                    }
                    Ok(WriteOutcome::TooLarge) => {
                        metrics::counter!("stampede_fills_total", "outcome" => "too_large")
                            .increment(1);
                        self.write_pass_marker(key, looked, token, fence).await;
                        Status::NotStored
                    }
                    // The store is up, but this key's data is in the way (see
                    // `BackendError::is_store_answered`): give the lease back, as nothing
                    // will be written under it. Any other error keeps it (the store is likely
                    // down; it ends at its expiry).
                    Err(e) if e.is_store_answered() => {
                        let _ = self
                            .bcall(backend.release(&key.slot, token, Signal::Released))
                            .await;
                        Status::WriteFailed
                    }
                    Err(_) => Status::WriteFailed,
                };
                (
                    Shared::Value {
                        value,
                        meta: Some(meta),
                        selector,
                        variant,
                        filled: Some(filled),
                        bypass: false,
                    },
                    None,
                )
            }
            FillRun::Done(Ok(fill)) => {
                let value = fill_value(fill);
                self.pass(key, looked, token, fence, value).await
            }
        }
    }

    /// Our fill failed. The lease is kept until it expires, so the source sees at most one call
    /// per lease: while it is surely still ours, it is marked failed in the store (every waiter
    /// is told, and every instance's callers that find it held take their fallback at once)
    /// and this instance's callers fail at once until it ends. A lease that may have passed to
    /// another holder is not ours to speak for: its waiters wait on that holder's fill.
    async fn failed_holding(
        &self,
        slot: &Digest,
        token: Token,
        held_until: &Mutex<Option<Instant>>,
        f: &Failure,
    ) {
        let until = *held_until.lock().unwrap_or_else(|e| e.into_inner());
        let Some(left) = until
            .and_then(|u| u.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
        else {
            return;
        };
        // Marked for the rest of the lease as this instance counts it, which is no longer than
        // the store's. If the store says the lease is not ours after all (it ended early: a
        // restart, an eviction), the slot is free: this instance's callers compete again. If
        // the store could not be told, this instance still keeps to one call per lease.
        match self.bcall(self.inner.backend.fail(slot, token, left)).await {
            Ok(true) => self.remember_failure(slot, left, f, true),
            Ok(false) => {}
            Err(_) => self.remember_failure(slot, left, f, false),
        }
    }

    /// The fill was not cacheable: a pass marker, unless an in-policy stale copy is stored.
    async fn pass(
        &self,
        key: &CacheKey,
        looked: &Looked,
        token: Token,
        fence: u64,
        value: Bytes,
    ) -> (Shared, Option<Own>) {
        metrics::counter!("stampede_fills_total", "outcome" => "pass").increment(1);
        self.write_pass_marker(key, looked, token, fence).await;
        (Shared::Pass, Some(Own::Value(value)))
    }

    async fn write_pass_marker(&self, key: &CacheKey, looked: &Looked, token: Token, fence: u64) {
        let now = now_ms();
        let servable = looked
            .entry()
            .is_some_and(|(_, m, _)| m.is_fresh(now) || m.in_swr(now) || m.in_sie(now));
        if servable || looked.selector.is_some() {
            // Never over a copy that may still be served, nor over a vary head that other
            // variants hang from: no marker, but waiters still go to the source in parallel.
            let _ = self
                .bcall(self.inner.backend.release(&key.slot, token, Signal::Pass))
                .await;
            return;
        }
        let marker = Record::encode_marker(Header {
            kind: Kind::Pass,
            fence,
            token,
            // Never above our fence (see `build_write`).
            epoch: looked.epoch.min(fence),
        });
        let w = FencedWrite {
            slot: key.slot,
            token,
            fence,
            entry: marker,
            entry_ttl: self.inner.cfg.pass_ttl,
            variant: None,
            variant_ttl: Duration::ZERO,
            release: true,
            signal: Signal::Pass,
        };
        if !matches!(
            self.bcall(self.inner.backend.write(w)).await,
            Ok(WriteOutcome::Stored)
        ) {
            let _ = self
                .bcall(
                    self.inner
                        .backend
                        .release(&key.slot, token, Signal::Released),
                )
                .await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn build_write(
        &self,
        key: &CacheKey,
        looked: &Looked,
        token: Token,
        fence: u64,
        value: &Bytes,
        ttl: &Ttl,
        selector: Option<&Bytes>,
        fill_time: Duration,
    ) -> (Option<FencedWrite>, Meta) {
        let meta = Meta::new(now_ms(), ttl, fill_time);
        // Variants hang from a vary head; only one we found carries its epoch forward. Over
        // anything else (nothing, a tombstone, a plain entry) start a new epoch at our fence, so
        // variants written before an invalidation whose tombstone has since expired stay void.
        // Never above our fence: an epoch is the fence of an invalidation before this grant,
        // and a head whose epoch is above (forged or damaged bytes) would void every variant
        // written under it, ours first, so that every request filled again.
        let epoch = if looked.selector.is_some() {
            looked.epoch.min(fence)
        } else {
            fence
        };
        let header = Header {
            kind: Kind::Entry,
            fence,
            token,
            epoch,
        };
        let physical = ttl.physical();
        let w = match selector.filter(|_| key.select.is_some()) {
            None => Some(FencedWrite {
                slot: key.slot,
                token,
                fence,
                entry: Record::encode_entry(header, &meta, value),
                entry_ttl: physical,
                variant: None,
                variant_ttl: Duration::ZERO,
                release: true,
                signal: Signal::Filled,
            }),
            Some(sel) => key.variant_for(sel).map(|vd| FencedWrite {
                slot: key.slot,
                token,
                fence,
                entry: Record::encode_vary_head(header, sel),
                entry_ttl: physical,
                variant: Some((vd, Record::encode_entry(header, &meta, value))),
                variant_ttl: physical,
                release: true,
                signal: Signal::Filled,
            }),
        };
        (w, meta)
    }

    /// A background refresh (stale-while-revalidate, XFetch): one per key per process, and only
    /// under the lease; it gives up when someone else holds it.
    fn spawn_refresh<F, Fut, E>(&self, key: CacheKey, looked: Looked, fill: F)
    where
        F: FnOnce(Option<Prev>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Fill, E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let fkey = (key.slot, looked.variant);
        let Join::Leader(guard) = self.inner.flights.join(&fkey) else {
            return;
        };
        let this = self.clone();
        tokio::spawn(
            async move {
                metrics::counter!("stampede_refresh_total").increment(1);
                let asked = Instant::now();
                let acq = this.acquire(key.slot, looked.seen_fence).await;
                let shared = match acq {
                    Ok(Acquire::Acquired { token, fence }) => {
                        this.run_fill(&key, &looked, fill, token, fence, asked)
                            .await
                            .0
                    }
                    _ => Shared::GaveUp,
                };
                guard.finish(shared);
            }
            .in_current_span(),
        );
    }

    fn xfetch_due(&self, meta: &Meta, now: u64) -> bool {
        let beta = self.inner.cfg.xfetch_beta;
        if beta <= 0.0 || meta.fill_ms == 0 {
            return false;
        }
        // XFetch: now - delta * beta * ln(rand) >= expiry; ln(rand) <= 0.
        let r = fastrand::f64().max(f64::MIN_POSITIVE);
        let early = -(meta.fill_ms as f64) * beta * r.ln();
        now as f64 + early >= meta.fresh_until_ms as f64
    }

    async fn lookup(&self, key: &CacheKey) -> BackendResult<Looked> {
        let backend = &self.inner.backend;
        let v0 = self.memo_variant(key);
        let fetched = self.bcall(backend.fetch(&key.slot, v0.as_ref())).await?;
        let Some(bytes) = fetched.entry else {
            return Ok(Looked {
                variant: v0,
                ..Looked::default()
            });
        };
        // One parse of the record, which keeps `bytes` as the value: no second handle on it.
        let (header, record) = Record::decode_owned(bytes);
        let mut looked = Looked {
            seen_fence: header.map_or(0, |h| h.fence),
            epoch: header.map_or(0, |h| h.epoch),
            variant: v0,
            selector: None,
            found: Found::Nothing,
        };
        match record {
            None => {
                metrics::counter!("stampede_undecodable_total").increment(1);
            }
            Some(Record::Entry {
                header,
                meta,
                value,
            }) => {
                looked.variant = None;
                looked.found = Found::Entry {
                    value,
                    meta,
                    fence: header.fence,
                };
            }
            Some(Record::Pass { .. }) => looked.found = Found::Pass,
            Some(Record::Tombstone { .. }) => {}
            Some(Record::VaryHead { header, selector }) => {
                let v = key.variant_for(&selector);
                looked.selector = Some(selector.clone());
                looked.variant = v;
                let Some(v) = v else {
                    return Ok(looked);
                };
                self.memo_set(&key.slot, selector);
                let vbytes = if Some(v) == v0 {
                    fetched.variant
                } else {
                    // Boxed: its state would otherwise make every lookup's future, and so
                    // every request's, larger.
                    Box::pin(self.bcall(backend.fetch(&key.slot, Some(&v))))
                        .await?
                        .variant
                };
                match vbytes.as_ref().and_then(Record::decode) {
                    Some(Record::Entry {
                        header: vh,
                        meta,
                        value,
                    }) if vh.fence >= header.epoch => {
                        looked.found = Found::Entry {
                            value,
                            meta,
                            fence: vh.fence,
                        };
                    }
                    Some(_) => {
                        metrics::counter!("stampede_undecodable_total").increment(1);
                    }
                    None => {}
                }
            }
        }
        Ok(looked)
    }

    /// Remembers that the lease on `slot` is held by a failed fill for about `for_` (`stored`:
    /// and that the store has it marked so), so callers of this process that find it held take
    /// their fallback at once, with this failure.
    fn remember_failure(&self, slot: &Digest, for_: Duration, f: &Failure, stored: bool) {
        let mut m = self.inner.failed.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MEMO_CAP {
            let now = Instant::now();
            m.retain(|_, (until, _, _)| *until > now);
        }
        // A backend may report any remaining time: never longer than one lease of ours.
        let until = Instant::now() + for_.min(self.inner.cfg.lease);
        m.insert(*slot, (until, f.clone(), stored));
    }

    fn recent_failure(&self, slot: &Digest) -> Option<(Failure, bool)> {
        let m = self.inner.failed.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(slot) {
            Some((until, f, stored)) if *until > Instant::now() => Some((f.clone(), *stored)),
            _ => None,
        }
    }

    fn forget_failure(&self, slot: &Digest) {
        self.inner
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(slot);
    }

    fn memo_shard(&self, slot: &Digest) -> std::sync::MutexGuard<'_, HashMap<Digest, Bytes>> {
        self.inner.memo[slot.as_bytes()[0] as usize % MEMO_SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn memo_variant(&self, key: &CacheKey) -> Option<Digest> {
        key.select.as_ref()?;
        // The memo is only a shortcut: a lookup that misses it reads the vary head instead.
        if !self.inner.memo_used.load(Ordering::Relaxed) {
            return None;
        }
        let sel = self.memo_shard(&key.slot).get(&key.slot).cloned();
        sel.and_then(|sel| key.variant_for(&sel))
    }

    fn memo_set(&self, slot: &Digest, selector: Bytes) {
        let mut memo = self.memo_shard(slot);
        if memo.get(slot) == Some(&selector) {
            return;
        }
        self.inner.memo_used.store(true, Ordering::Relaxed);
        if memo.len() >= MEMO_CAP {
            memo.clear();
        }
        memo.insert(*slot, selector);
    }

    fn memo_forget(&self, slot: &Digest) {
        self.memo_shard(slot).remove(slot);
    }

    /// `try_acquire` of one lease under the per-call timeout. A grant its caller gave up on
    /// (the store answered after the timeout) would be a lease nobody holds, its token known
    /// to no one: every instance would wait it out, then fill again. So a call that does not
    /// answer on its first poll (an in-process store does, and pays nothing more) goes on on a
    /// task of its own, bounded by one lease (a grant later than that is moot), and a grant
    /// its caller no longer takes is given back at once. Nothing runs while the breaker is
    /// open: the call is made inside `bcall`.
    async fn acquire(&self, slot: Digest, seen_fence: u64) -> BackendResult<Acquire> {
        let backend = self.inner.backend.clone();
        let lease = self.inner.cfg.lease;
        self.bcall(Box::pin(async move {
            let mut call: BoxFuture<'static, BackendResult<Acquire>> = {
                let backend = backend.clone();
                Box::pin(async move { backend.try_acquire(&slot, lease, seen_fence).await })
            };
            if let Some(v) = poll_once(&mut call).await {
                return v;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let giver = backend.clone();
            tokio::spawn(async move {
                let got = tokio::time::timeout(lease, call).await.unwrap_or_else(|_| {
                    Err(BackendError::new("try_acquire: no answer within a lease"))
                });
                if let Err(Ok(Acquire::Acquired { token, .. })) = tx.send(got) {
                    give_back(giver, slot, token, lease).await;
                }
            });
            let mut pending = PendingGrant {
                rx: Some(rx),
                backend,
                slot,
                lease,
            };
            pending.take().await
        }))
        .await
    }

    /// One backend call: the breaker, the per-call timeout, the error count.
    async fn bcall<T>(&self, mut fut: BoxFuture<'_, BackendResult<T>>) -> BackendResult<T> {
        let breaker = &self.inner.breaker;
        let Some(_permit) = breaker.allow() else {
            return Err(BackendError::new("circuit breaker open"));
        };
        // An in-process backend answers on the first poll: skip arming a timer for it.
        let res = match poll_once(&mut fut).await {
            Some(v) => Ok(v),
            // Boxed: a timer is several hundred bytes, and held inline it would make every
            // request's future that large, hits from an in-process store included.
            None => Box::pin(tokio::time::timeout(self.inner.cfg.backend_timeout, fut)).await,
        };
        match res {
            Ok(Ok(v)) => {
                breaker.success();
                Ok(v)
            }
            Ok(Err(e)) => {
                metrics::counter!("stampede_backend_errors_total").increment(1);
                tracing::debug!(error = %e, "backend error");
                if e.is_store_answered() {
                    breaker.success();
                } else {
                    breaker.failure();
                }
                Err(e)
            }
            Err(_) => {
                metrics::counter!("stampede_backend_errors_total").increment(1);
                breaker.failure();
                Err(BackendError::new(format!(
                    "backend call timed out after {:?}",
                    self.inner.cfg.backend_timeout
                )))
            }
        }
    }
}

/// The index of a status's label in [`OUTCOMES`].
fn status_index(s: Status) -> usize {
    match s {
        Status::Hit => 0,
        Status::Stale(_) => 1,
        Status::Stored => 2,
        Status::NotStored => 3,
        Status::Collapsed => 4,
        Status::Passed => 5,
        Status::Bypass => 6,
        Status::WriteFailed => 8,
    }
}

fn fill_value(f: Fill) -> Bytes {
    match f {
        Fill::Store { value, .. } | Fill::Pass { value } | Fill::Unshared { value } => value,
    }
}

/// The stale copy, if it is still inside a window at this moment.
fn fresh_stale(st: Option<(Bytes, Meta)>, any_window: bool) -> Option<(Bytes, Meta)> {
    let now = now_ms();
    st.filter(|(_, m)| m.in_swr(now) || (any_window && m.in_sie(now)))
}

fn stale_or(st: Option<(Bytes, Meta)>, err: Error) -> Result<Served, Error> {
    match fresh_stale(st, true) {
        Some((value, meta)) => Ok(Served::now(
            value,
            Some(meta),
            Status::Stale(StaleReason::Error),
        )),
        None => Err(err),
    }
}

/// Polls `fut` once: its output when it is ready at once (an in-process store's call), else
/// `None`, and `fut` is left to be polled again.
fn poll_once<F: Future + Unpin>(fut: &mut F) -> impl Future<Output = Option<F::Output>> + '_ {
    std::future::poll_fn(move |cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut *fut).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
}

/// A grant on its way from a `try_acquire` task (see `Stampede::acquire`). Dropped before it
/// was taken (its caller gave up, even with the grant already in the channel), it closes the
/// channel, so a grant sent later fails to arrive and its task gives it back, and it gives back
/// one that had arrived.
struct PendingGrant {
    rx: Option<tokio::sync::oneshot::Receiver<BackendResult<Acquire>>>,
    backend: Arc<dyn Backend>,
    slot: Digest,
    lease: Duration,
}

impl PendingGrant {
    async fn take(&mut self) -> BackendResult<Acquire> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(BackendError::new("try_acquire: taken already"));
        };
        let got = rx
            .await
            .unwrap_or_else(|_| Err(BackendError::new("try_acquire: its task ended")));
        self.rx = None;
        got
    }
}

impl Drop for PendingGrant {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        rx.close();
        if let Ok(Ok(Acquire::Acquired { token, .. })) = rx.try_recv() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(give_back(
                    self.backend.clone(),
                    self.slot,
                    token,
                    self.lease,
                ));
            }
        }
    }
}

/// Releases a lease granted to a caller that gave up on it, so others need not wait it out.
async fn give_back(backend: Arc<dyn Backend>, slot: Digest, token: Token, lease: Duration) {
    metrics::counter!("stampede_lease_given_back_total").increment(1);
    let _ = tokio::time::timeout(lease, backend.release(&slot, token, Signal::Released)).await;
}

enum FillRun {
    Done(Result<Fill, BoxError>),
    Panicked,
    TimedOut,
}

tokio::task_local! {
    /// Set while a fill runs for a key that is not cacheable (see [`fill_is_pass`]).
    static PASSING: ();
}

/// Whether the fill now running was called because its key is not cacheable: a pass marker
/// was found, or the fill this caller waited on ended in one. Its result goes to its caller
/// alone (only a `Fill::Store` may still be stored: hit-for-miss), so it may do less than a
/// shared fill would: the HTTP layer sends a `HEAD` as `HEAD` instead of fetching the body.
/// `false` outside such a fill.
pub(crate) fn fill_is_pass() -> bool {
    PASSING.try_with(|_| ()).is_ok()
}

/// Runs a fill in its own task (a panic there cannot take the flight down), bounded by
/// `fill_timeout`.
async fn call_fill<F, Fut, E>(fill: F, prev: Option<Prev>, limit: Duration) -> FillRun
where
    F: FnOnce(Option<Prev>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Fill, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    // Aborted when this future ends or is dropped: a caller that goes away (a passed request,
    // the opt-in call after a deadline) takes its source call with it. Shared fills are called
    // from an engine-owned task, which nothing drops.
    let mut handle = AbortOnDrop(tokio::spawn(async move {
        fill(prev).await.map_err(|e| e.into())
    }));
    match tokio::time::timeout(limit, &mut handle.0).await {
        Ok(Ok(r)) => FillRun::Done(r),
        Ok(Err(_)) => FillRun::Panicked,
        Err(_) => FillRun::TimedOut,
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A fill shared by a caller and the flight it leads. The flight takes it only once it holds
/// the lease (or must fail open), so a caller whose deadline passes while the flight still
/// waits keeps its fill for the opt-in direct call, and can compete again after a flight that
/// never used it.
struct FillCell<F>(Arc<Mutex<Option<F>>>);

impl<F> Clone for FillCell<F> {
    fn clone(&self) -> Self {
        FillCell(self.0.clone())
    }
}

impl<F> FillCell<F> {
    fn new(f: F) -> Self {
        FillCell(Arc::new(Mutex::new(Some(f))))
    }

    fn take(&self) -> Option<F> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn is_some(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

/// A consecutive-failure circuit breaker. Open: every backend call fails at once, so an outage
/// adds no latency. After the cooldown one call goes through as a probe (half-open): its success
/// closes the breaker, its failure opens it for another cooldown; the others keep failing fast
/// meanwhile.
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: AtomicU32,
    /// 0 when closed; else when the cooldown ends.
    open_until_ms: AtomicU64,
    probing: std::sync::atomic::AtomicBool,
}

/// A backend call the breaker let through. A probe's permit, dropped before the probe's
/// outcome was recorded (its caller went away), lets the next call probe: otherwise the breaker
/// would stay open for good.
struct Permit<'a>(Option<&'a Breaker>);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.0 {
            // After `success` or `failure` this is already false (and no other probe can have
            // started: the breaker is closed, or open for a new cooldown).
            b.probing.store(false, Ordering::Release);
        }
    }
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            threshold,
            cooldown,
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// `None` while open; a call's permit otherwise, the half-open probe's included (one at a
    /// time).
    fn allow(&self) -> Option<Permit<'_>> {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return Some(Permit(None));
        }
        if now_ms() < until {
            return None;
        }
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            .then_some(Permit(Some(self)))
    }

    fn is_open(&self) -> bool {
        self.open_until_ms.load(Ordering::Acquire) != 0
    }

    fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.open_until_ms.load(Ordering::Acquire) != 0 {
            self.open_until_ms.store(0, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            tracing::info!("backend circuit breaker closed");
        }
    }

    fn failure(&self) {
        let probe_failed = self.probing.load(Ordering::Acquire);
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.threshold || probe_failed {
            self.open_until_ms.store(
                now_ms() + self.cooldown.as_millis() as u64,
                Ordering::Release,
            );
            self.failures.store(0, Ordering::Relaxed);
            self.probing.store(false, Ordering::Release);
            if !probe_failed {
                metrics::counter!("stampede_breaker_opened_total").increment(1);
                tracing::warn!(cooldown = ?self.cooldown, "backend circuit breaker opened");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every outcome is counted under its own name. (A `write_failed` appended after `error`
    /// once made every error count as `write_failed`.)
    #[test]
    fn outcomes_are_counted_under_their_names() {
        let names = [
            (Status::Hit, "hit"),
            (Status::Stale(StaleReason::Error), "stale"),
            (Status::Stored, "stored"),
            (Status::NotStored, "not_stored"),
            (Status::Collapsed, "collapsed"),
            (Status::Passed, "passed"),
            (Status::Bypass, "bypass"),
            (Status::WriteFailed, "write_failed"),
        ];
        for (status, name) in names {
            assert_eq!(OUTCOMES[status_index(status)], name, "{status:?}");
        }
        assert_eq!(OUTCOMES[ERROR_OUTCOME], "error");
    }
}
