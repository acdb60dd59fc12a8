//! The backend contract: what a store must do for the engine, and the stores that do it.
//!
//! A backend keeps, per logical key (a *slot*, named by its [`Digest`]): the entry record (or a
//! vary head, pass marker or tombstone), any number of variant records, one lease and one fence
//! counter. Each operation that the protocol needs to be atomic is one call here; how a backend
//! makes it atomic is its own business (Redis: one Lua script; Memcached: CAS; memory: one lock).
//!
//! Every backend runs the same conformance suite (`tests/common/conformance.rs`); a backend is
//! done when the suite passes on it.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;

use crate::key::Digest;

#[cfg(feature = "memcached")]
pub mod memcached;
pub mod memory;
#[cfg(any(feature = "redis", feature = "memcached"))]
pub(crate) mod near;
#[cfg(feature = "redis")]
pub mod redis;

/// A boxed, `Send` future, as returned by [`Backend`] methods (the trait is object safe so one
/// engine can hold any backend chosen at run time).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An error from a backend: connection refused, timeout, protocol error... The engine treats
/// every one the same way: fail open (serve from the source, coalesced in process).
#[derive(Debug)]
pub struct BackendError {
    msg: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
    config_rejected: bool,
    answered: bool,
}

impl BackendError {
    /// An error with a message.
    pub fn new(msg: impl Into<String>) -> Self {
        BackendError {
            msg: msg.into(),
            source: None,
            config_rejected: false,
            answered: false,
        }
    }

    /// An error with a message and a cause.
    pub fn with_source(
        msg: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        BackendError {
            msg: msg.into(),
            source: Some(Box::new(source)),
            config_rejected: false,
            answered: false,
        }
    }

    /// This error, marked as the store answering as a healthy store does (see
    /// [`is_store_answered`](Self::is_store_answered)).
    #[must_use]
    pub fn store_answered(mut self) -> Self {
        self.answered = true;
        self
    }

    /// The store is up and answered, but what it holds for this key cannot be used here (a
    /// Memcached value over this backend's item size limit, say): the engine fails open for
    /// this call, and the error does not count against the store's health (the circuit
    /// breaker), as one key's data says nothing about the others.
    pub fn is_store_answered(&self) -> bool {
        self.answered
    }

    /// This error, marked as the store refusing this client's configuration (see
    /// [`is_config_rejected`](Self::is_config_rejected)).
    #[must_use]
    pub fn config_rejected(mut self) -> Self {
        self.config_rejected = true;
        self
    }

    /// The store answered, and refused this client's configuration: a wrong password, a
    /// database that does not exist, a command it may not run. Retrying will not help until the
    /// configuration changes, so a program may refuse to start on it (the caching proxy
    /// example does). The engine fails open on it like on any backend error.
    pub fn is_config_rejected(&self) -> bool {
        self.config_rejected
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{}: {s}", self.msg),
            None => f.write_str(&self.msg),
        }
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The result type of backend calls.
pub type BackendResult<T> = Result<T, BackendError>;

/// A lease token: random, unique per grant, written into the records its holder stores.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(u64);

impl Token {
    /// A fresh random token (never zero: zero marks "no token" in stored headers).
    pub fn random() -> Self {
        loop {
            let v = fastrand::u64(..);
            if v != 0 {
                return Token(v);
            }
        }
    }

    /// The "no token" value, used in records written without a lease.
    pub const NONE: Token = Token(0);

    /// From a raw value.
    pub fn from_u64(v: u64) -> Self {
        Token(v)
    }

    /// The raw value.
    pub fn as_u64(&self) -> u64 {
        self.0
    }

    /// 16 lower-case hex digits.
    pub fn to_hex(&self) -> [u8; 16] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = HEX[((self.0 >> (60 - 4 * i)) & 15) as usize];
        }
        out
    }

    /// Parses 16 hex digits.
    pub fn from_hex(b: &[u8]) -> Option<Self> {
        if b.len() != 16 {
            return None;
        }
        let mut v = 0u64;
        for &c in b {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                _ => return None,
            };
            v = (v << 4) | u64::from(d);
        }
        Some(Token(v))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", String::from_utf8_lossy(&self.to_hex()))
    }
}

/// What [`Backend::fetch`] read, in one round trip.
#[derive(Clone, Debug, Default)]
pub struct Fetched {
    /// The bytes at the entry key (an entry, vary head, pass marker or tombstone), if any.
    pub entry: Option<Bytes>,
    /// The bytes at the requested variant key, if one was asked for and exists.
    pub variant: Option<Bytes>,
}

/// The outcome of [`Backend::try_acquire`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// The lease is ours. Fill, then write with this token and fence.
    Acquired {
        /// Our token; `extend` and `release` need it.
        token: Token,
        /// Our fence: `max(counter + 1, stored entry's fence + 1)`.
        fence: u64,
    },
    /// Someone else holds the lease: serve an in-policy stale copy or wait.
    Held {
        /// How long the lease has left, as the store sees it.
        remaining: Duration,
        /// The holder's fill failed and it keeps the lease until it ends (see
        /// [`Backend::fail`]): take your fallback now instead of waiting.
        failed: bool,
    },
    /// The entry changed since the caller's lookup (its fence differs from the one seen): read
    /// again instead of filling a value that just landed. No lease was taken.
    Refreshed,
}

/// Every end of a lease is an event, so waiters never wait on a timer alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    /// A value was stored: read it.
    Filled,
    /// The fill was not cacheable and a pass marker is stored: go to the source yourself.
    Pass,
    /// The fill failed; its lease is kept until it expires, marked failed (see
    /// [`Backend::fail`]): take your fallback now.
    Failed,
    /// The lease was released with nothing stored: compete again.
    Released,
}

impl Signal {
    /// The one-byte wire form used by backends with pub/sub.
    pub fn as_str(&self) -> &'static str {
        match self {
            Signal::Filled => "F",
            Signal::Pass => "P",
            Signal::Failed => "X",
            Signal::Released => "R",
        }
    }

    /// Parses the wire form.
    pub fn parse(s: &[u8]) -> Option<Signal> {
        Some(match s {
            b"F" => Signal::Filled,
            b"P" => Signal::Pass,
            b"X" => Signal::Failed,
            b"R" => Signal::Released,
            _ => return None,
        })
    }
}

/// A fenced write: store `entry` (and `variant`) only if the stored entry's fence is lower than
/// `fence`, or equal with the same `token`; then release the lease if it is still ours, and
/// signal the outcome. Atomic per slot.
#[derive(Clone, Debug)]
pub struct FencedWrite {
    /// The slot.
    pub slot: Digest,
    /// The writer's lease token.
    pub token: Token,
    /// The writer's fence (must equal the fence in `entry`'s header).
    pub fence: u64,
    /// The record for the entry key: an entry, a vary head or a pass marker.
    pub entry: Bytes,
    /// How long the store keeps `entry`.
    pub entry_ttl: Duration,
    /// For a `Vary`ing value: the variant key and its record.
    pub variant: Option<(Digest, Bytes)>,
    /// How long the store keeps the variant.
    pub variant_ttl: Duration,
    /// Release the lease (if the token is still ours) after writing.
    pub release: bool,
    /// The signal to publish when the write is done (whether or not it was stored).
    pub signal: Signal,
}

/// The outcome of a fenced write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written.
    Stored,
    /// Refused: the stored entry carries a newer fence (or the same fence from another token).
    Fenced,
    /// Refused: the record is larger than the store takes (memcached's item size limit, the
    /// memory store's budget). Nothing was written, the lease is untouched and no signal was
    /// sent; the engine then stores a pass marker so callers stop waiting for a value that
    /// cannot land.
    TooLarge,
}

/// A subscription to the signals of one slot. Dropping it unsubscribes.
pub struct Subscription {
    inner: Pin<Box<dyn SignalStream>>,
}

/// Where a [`Subscription`] gets its signals from; implemented by backends with pub/sub.
pub trait SignalStream: Send {
    /// The next signal; `None` when the subscription is broken (reconnect): the caller re-reads.
    fn next(self: Pin<&mut Self>) -> BoxFuture<'_, Option<Signal>>;
}

impl Subscription {
    /// Wraps a backend's stream.
    pub fn new(stream: impl SignalStream + 'static) -> Self {
        Subscription {
            inner: Box::pin(stream),
        }
    }

    /// Waits for the next signal; `None` when the subscription broke.
    pub async fn recv(&mut self) -> Option<Signal> {
        self.inner.as_mut().next().await
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Subscription")
    }
}

/// The store behind the engine. See the module docs and DESIGN.md "The backend contract".
///
/// Times are the store's own (a lease's `ttl` is counted by the store), so instances with skewed
/// clocks still agree on who holds a lease.
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and metrics ("memory", "redis", "memcached").
    fn name(&self) -> &'static str;

    /// Reads the entry record and, if `variant` is given, that variant, in one round trip.
    fn fetch<'a>(
        &'a self,
        slot: &'a Digest,
        variant: Option<&'a Digest>,
    ) -> BoxFuture<'a, BackendResult<Fetched>>;

    /// Takes the lease for `ttl` if free, granting a fence of
    /// `max(counter + 1, stored entry's fence + 1)`; returns `Refreshed` instead when the stored
    /// entry's fence is not `seen_fence` (0 when the caller saw nothing).
    fn try_acquire<'a>(
        &'a self,
        slot: &'a Digest,
        ttl: Duration,
        seen_fence: u64,
    ) -> BoxFuture<'a, BackendResult<Acquire>>;

    /// Pushes the lease's expiry to `ttl` from now, only while `token` holds it. Returns whether
    /// it did.
    fn extend<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>>;

    /// Deletes the lease, only while `token` holds it, and publishes `signal`. Returns whether it
    /// did.
    fn release<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        signal: Signal,
    ) -> BoxFuture<'a, BackendResult<bool>>;

    /// The fenced fill: see [`FencedWrite`].
    fn write(&self, w: FencedWrite) -> BoxFuture<'_, BackendResult<WriteOutcome>>;

    /// Invalidates a slot: bumps the fence counter past the stored entry's fence and writes a
    /// tombstone with that fence for `ttl`, so a fill that started before cannot write old
    /// content back; and ends the lease, live or marked failed (see [`fail`](Self::fail)), so
    /// the next caller fills anew, and a fill from before can neither mark it failed nor hold
    /// callers up (publishing `Released` where there are signals). Returns the tombstone's
    /// fence.
    fn invalidate<'a>(
        &'a self,
        slot: &'a Digest,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<u64>>;

    /// The holder's fill failed: marks the lease failed, only while `token` holds it, with `ttl`
    /// left, and publishes [`Signal::Failed`]. Until the lease ends, `try_acquire` answers
    /// `Held { failed: true }` on every instance, so callers that arrive after the signal take
    /// their fallback at once too, and the source still sees one call per lease. A failed lease
    /// stays failed: `extend` refuses it (`false`), `release` by its token ends it. Returns
    /// whether it marked the lease (`false`: the lease had ended, or another holder has it, and
    /// nothing was published). An `invalidate` ends a failed lease.
    fn fail<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>>;

    /// Subscribes to a slot's signals. `Ok(None)` when the backend has no signals (waiters poll).
    /// The subscription is live when the future resolves, so a caller that subscribes, then
    /// re-reads, then waits cannot miss a signal sent after its re-read.
    fn subscribe<'a>(
        &'a self,
        slot: &'a Digest,
    ) -> BoxFuture<'a, BackendResult<Option<Subscription>>>;
}

impl<B: Backend + ?Sized> Backend for std::sync::Arc<B> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn fetch<'a>(
        &'a self,
        slot: &'a Digest,
        variant: Option<&'a Digest>,
    ) -> BoxFuture<'a, BackendResult<Fetched>> {
        (**self).fetch(slot, variant)
    }
    fn try_acquire<'a>(
        &'a self,
        slot: &'a Digest,
        ttl: Duration,
        seen_fence: u64,
    ) -> BoxFuture<'a, BackendResult<Acquire>> {
        (**self).try_acquire(slot, ttl, seen_fence)
    }
    fn extend<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        (**self).extend(slot, token, ttl)
    }
    fn release<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        signal: Signal,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        (**self).release(slot, token, signal)
    }
    fn write(&self, w: FencedWrite) -> BoxFuture<'_, BackendResult<WriteOutcome>> {
        (**self).write(w)
    }
    fn invalidate<'a>(
        &'a self,
        slot: &'a Digest,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<u64>> {
        (**self).invalidate(slot, ttl)
    }
    fn fail<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        (**self).fail(slot, token, ttl)
    }
    fn subscribe<'a>(
        &'a self,
        slot: &'a Digest,
    ) -> BoxFuture<'a, BackendResult<Option<Subscription>>> {
        (**self).subscribe(slot)
    }
}

/// The fence rule shared by every backend: may a write with `(fence, token)` replace a stored
/// record whose header is `stored` (`None`: nothing stored, or bytes that do not decode)?
pub fn fence_allows(stored: Option<&crate::entry::Header>, fence: u64, token: Token) -> bool {
    match stored {
        None => true,
        Some(h) => h.fence < fence || (h.fence == fence && h.token == token),
    }
}

/// The fence a grant gets: `max(counter + 1, stored entry's fence + 1)`.
pub fn next_fence(counter: u64, stored_fence: u64) -> u64 {
    counter.max(stored_fence).saturating_add(1)
}
