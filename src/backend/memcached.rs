//! The Memcached backend: leases by meta-protocol add and CAS, fences by meta arithmetic.
//!
//! Every key of one slot (lease `:l`, fence counter `:f`, entry `:e`, variants `:v:<digest>`)
//! carries the slot's hash tag `{<digest>}`, and the server of a pool is chosen by that digest
//! alone, so all parts of an entry share a server and the commands of one operation can be
//! pipelined on one connection.
//!
//! # Commands, per operation
//!
//! As sent (flag order as the client writes them). `;` separates commands pipelined in one
//! round trip, `then` starts another round trip. `<l>`, `<f>`, `<e>`, `<v>`: the slot's lease,
//! fence counter, entry and variant keys; `<s>`: the expiry in seconds (below).
//!
//! | operation | meta commands |
//! |---|---|
//! | `fetch` | `mg <e> v f`, shared by the fetches of that entry while it is in flight (with a variant, not shared: `mg <e> v f ; mg <v> v f`) |
//! | `try_acquire` | `ms <l> 16 ME c T<s>` (the value is our token) `; mg <l> f t ; mg <e> f ; ma <f> v D1 N2592000 J<max(seen+1, clock)> T2592000`. Lost the add (`NS`): `Held` with the remaining time from `t`. Won (`HD c<cas>`): flags equal to the low 32 bits of `seen_fence` mean the entry is the one the caller saw; otherwise the header decides (then `mg <e> v f`); if it differs from `seen_fence`, give the lease back (then `md <l> C<cas>`) -> `Refreshed`; if the counter is not above the entry's fence, then `ma <f> v D<gap> N2592000 J<fence+1> T2592000` |
//! | `extend` | `ms <l> 16 c T<s> C<cas>` with the CAS this process holds (without one, `mg <l> v c` first: our token, not marked failed); the new CAS is kept |
//! | `fail` | `ms <l> 16 c F1 T<s> C<cas>`: the lease, flagged failed (client flags 1), which `try_acquire`'s `mg <l> f t` reports; the CAS is not kept, so an `extend` reads the lease and refuses a failed one |
//! | `release` | `md <l> C<cas>` |
//! | `write` | `mg <e> v f c` (`; mg <v> v f c`): the headers decide; then the variant, if any, `ms <v> <len> c F<fence> T<s> C<cas>` (or `ME` when absent); then the entry the same way; every `EX`/`NS`/`NF` re-reads and re-checks that key; then, if asked, `md <l> C<cas>` |
//! | `invalidate` | `mg <e> v f c ; ma <f> v D1 N2592000 J<clock> T2592000`; then the tombstone `ms <e> 60 c F<fence> T<s> C<cas>` (or `ME`), all again on a lost race; then `md <l>` (the lease ends, live or failed) |
//! | `subscribe` | nothing: memcached has no pub/sub, waiters poll with backoff (and see a failed lease at their next poll) |
//!
//! Where the commands of one operation are several round trips, each step is guarded by CAS,
//! so none of them needs the others to be atomic with it.
//!
//! # Leases
//!
//! A lease is an add (`ms` mode `E`; mode `A` would *append*) of the holder's token with an
//! expiry; the server returns the item's CAS, which the holder keeps in a per-backend map
//! `(slot, token) -> cas`. Extend and release are conditional on that CAS, so they are atomic: a
//! holder whose lease expired and went to someone else gets `EX` and changes nothing (never
//! get-then-delete). When the CAS we hold is stale but the lease may still be ours (an extend
//! whose reply was lost), the stored token decides: `mg <l> v c`, and only if the value is our
//! token, the CAS-guarded `ms`/`md` with the CAS just read.
//!
//! # Fences
//!
//! The entry's fence is in its header (the first 60 bytes of the value), which decides every
//! write; so a write or an invalidation reads the stored value whole, in its first round trip
//! (an `mg` cannot read part of a value; the flags below cannot order fences). The item's
//! client flags carry the fence's low 32 bits, so the lease path can tell without reading the
//! value that the entry is still the one the caller saw: two fences of one key with the same
//! low bits are 2^32 grants apart, or a counter made anew from the clock at exactly such a
//! distance, while the caller read its fence moments ago; and a wrong guess grants a lease for
//! a fill that was not needed (its write, judged by the header, is then stored), never a wrong
//! value. A grant is `max(counter + 1, entry's fence + 1)`: the counter is
//! bumped by `ma` (created at `max(seen_fence + 1, clock)` when absent: memcached stores the
//! initial value without applying the delta); if the result is not above the entry's fence (the
//! counter was evicted, the server restarted), a second `ma` adds the gap. Every grant is the
//! result of an atomic increment, so grants are unique as well as above the entry. Counters
//! live 30 days after their last grant.
//!
//! `clock` is this process's clock in microseconds: memcached has no clock a client can read,
//! and a counter made anew must start above every grant made before it was lost. When the
//! server restarts (or evicts the entry and its counter), a holder that took its lease before
//! cannot then overwrite what a later holder stored, nor a tombstone: counters start at the
//! clock and grow by one a grant, so a grant is never ahead of the clock of the instance that
//! made the counter. This holds while the instances' clocks agree to better than the time
//! between a grant and the loss that follows it (NTP does; Redis uses the server's own `TIME`).
//!
//! # Expiry
//!
//! Memcached counts expiries in whole seconds on a clock that ticks once a second, so an item
//! set with `T<n>` lives between `n - 1` and `n` seconds. Every TTL is therefore sent as
//! `ceil(ttl) + 1` seconds, at least 2: a lease (or entry) never ends before its TTL, and may
//! outlive it by up to two seconds. TTLs are clamped to 30 days, beyond which memcached reads
//! the number as a Unix time.
//!
//! # Near cache
//!
//! [`MemcachedBuilder::near_cache`]`(bytes, max_age)` (off by default) keeps the records this
//! process reads and serves each for at most `max_age` after the read, and never past the
//! item's expiry (read with it: `mg <e> v f t`). Memcached has no way to tell a client that a
//! key changed, so unlike Redis's near cache this one is *bounded staleness*: another
//! instance's write or invalidation reaches this instance's hits up to `max_age` late. Its own
//! writes, invalidations and `Refreshed` leases drop its copies at once (a read in flight at
//! that moment is not kept). The engine still judges every record by its own freshness, so
//! nothing is served fresh past its TTL; what `max_age` delays is the *replacement* of a record
//! by a newer one written elsewhere (an early refresh, an invalidation, a `POST` through another
//! instance).
//!
//! # Item size
//!
//! Memcached refuses items over its item size limit (`-I`, 1 MiB by default), key and about 60
//! bytes of item header included, and answers a larger `ms` with `SERVER_ERROR object too
//! large` *after deleting the item stored under its key* (memcached 1.6.18), which may be a
//! newer holder's record. So records that do not fit are refused before anything is sent
//! ([`WriteOutcome::TooLarge`]). The limit is the configured
//! [`item_size_limit`](MemcachedBuilder::item_size_limit), or the server's own when that is
//! lower: each new connection reads it (`stats settings`, `item_size_max`) before its first
//! command, one round trip per connection, and a lower one is logged as a warning. A server
//! that does not say (mcrouter answers `CLIENT_ERROR`) is held to the configured limit, and
//! its `SERVER_ERROR object too large` gives the same outcome. Behind a proxy (memcached's
//! own proxy answers `stats settings` itself, with its own limit), never configure a limit
//! above the servers' `-I`.

mod client;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use self::client::{Client, Cmd, Cond, Item, Options, Reply};
use super::{
    fence_allows, Acquire, Backend, BackendError, BackendResult, BoxFuture, FencedWrite, Fetched,
    Signal, Subscription, Token, WriteOutcome,
};
use crate::backend::near::{self, NearStore};
use crate::coalesce::{outcome, Aborted, Flights, Join};
use crate::entry::{record_fence, Header, Kind, Record};
use crate::error::ConfigError;
use crate::key::{Digest, Prefix};

/// Memcached reads a relative expiry above 30 days as a Unix time.
const MAX_RELATIVE_SECS: u64 = 30 * 24 * 60 * 60;
/// How long a fence counter outlives its last grant.
const COUNTER_SECS: u32 = MAX_RELATIVE_SECS as u32;
/// Memcached's per-item overhead counted against the item size limit (item header, CAS, the
/// key's terminator, the value's CRLF, client flags), rounded up. Measured on 1.6.18: 59 bytes
/// without client flags, 63 with.
const ITEM_OVERHEAD: usize = 72;
/// CAS races a fenced write or an invalidation retries before it reports an error (marked as
/// the store answering: the engine gives a fill's lease back, and the breaker does not count it).
const CAS_ATTEMPTS: usize = 8;
/// The default item size limit: memcached's default `-I 1m`.
pub const DEFAULT_ITEM_SIZE_LIMIT: usize = 1024 * 1024;
/// The default number of connections per server. Each is pipelined (any number of commands in
/// flight), so one is usually best: every write and read then carries more commands. Hot-key
/// hits through the caching proxy (64 clients, 2 cores), five interleaved 8 s rounds: 1, 2 and 4
/// connections did 51.5k, 46.2k and 39.6k req/s on average (the first best in four rounds of
/// five); `memcache::exp`, one exchange per connection, did 34.3k with 32. More connections
/// keep a large value in transit from delaying the small commands behind it.
pub const DEFAULT_CONNECTIONS_PER_SERVER: usize = 1;
const DEFAULT_PORT: u16 = 11211;

/// The seconds sent for a TTL: `ceil(ttl) + 1`, at least 2, at most 30 days (see the module
/// docs, "Expiry").
pub fn expiry_secs(ttl: Duration) -> u32 {
    let ceil = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0));
    ceil.saturating_add(1).clamp(2, MAX_RELATIVE_SECS) as u32
}

/// The Memcached backend. Cloning shares the connection pools and the held-lease map.
///
/// Leases, fences and fenced writes follow the module docs. Expiries are whole seconds: a lease
/// of `ttl` is sent as `ceil(ttl) + 1` seconds (at least 2 s), so it lives at least `ttl` and at
/// most about two seconds more; a lease shorter than a second is not honoured precisely.
/// Memcached has no pub/sub: [`subscribe`](Backend::subscribe) returns `Ok(None)` and waiters
/// poll with backoff.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_stampede::backend::memcached::MemcachedBackend;
/// use tower_stampede::key::Prefix;
/// use tower_stampede::Stampede;
///
/// let backend = MemcachedBackend::builder("memcache://10.0.0.1:11211,10.0.0.2:11211")
///     .prefix(Prefix::new("shop:")?)
///     .connections_per_server(16)
///     .build()
///     .await?;
/// let engine = Stampede::new(backend);
/// # let _ = engine; Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemcachedBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    servers: Vec<String>,
    prefix: Prefix,
    item_size_limit: usize,
    held: Mutex<HeldLeases>,
    near: Option<Near>,
    /// Entry reads in flight, by slot: a fetch of a slot whose entry is being read joins that
    /// read instead of sending its own (see [`MemcachedBackend::read_entry`]).
    reads: Arc<Flights<Digest, SharedRead>>,
}

/// A shared entry read's result, as every fetch that joined it gets it.
#[derive(Clone)]
enum SharedRead {
    Got(Option<Bytes>),
    /// The error's text, and whether the store answered (see `BackendError::store_answered`).
    Failed(Arc<str>, bool),
    /// The read's own caller went away before it ended: the others read for themselves.
    Abandoned,
}

impl Aborted for SharedRead {
    fn aborted() -> Self {
        SharedRead::Abandoned
    }
}

/// The near cache: records read here, served from process memory for at most `max_age`.
struct Near {
    store: NearStore,
    max_age: Duration,
}

/// The CAS of every lease this process holds (it is the only proof of holding one).
struct HeldLeases {
    map: HashMap<(Digest, Token), HeldLease>,
    prune_at: usize,
}

#[derive(Clone, Copy)]
struct HeldLease {
    cas: u64,
    /// One above the number of the connection the CAS was read on: the CAS is only sent on a
    /// live connection numbered below it, to the same server process (see
    /// `Client::one_before`).
    bound: u64,
    until: Instant,
}

impl std::fmt::Debug for MemcachedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemcachedBackend")
            .field("servers", &self.inner.servers)
            .field("prefix", &self.inner.prefix.as_str())
            .field("item_size_limit", &self.inner.item_size_limit)
            .finish()
    }
}

/// Builds a [`MemcachedBackend`]; see [`MemcachedBackend::builder`].
#[derive(Debug, Clone)]
pub struct MemcachedBuilder {
    urls: Vec<String>,
    prefix: Prefix,
    item_size_limit: usize,
    opts: Options,
    near: Option<(usize, Duration)>,
}

impl MemcachedBuilder {
    /// Adds the servers of another `memcache://host:port[,host:port...]` URL.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.urls.push(url.into());
        self
    }

    /// The key prefix (default `ts:`); every key is `<prefix>v<version>:{<digest>}:<part>`.
    pub fn prefix(mut self, prefix: Prefix) -> Self {
        self.prefix = prefix;
        self
    }

    /// How many connections to hold per server (default
    /// [`DEFAULT_CONNECTIONS_PER_SERVER`], at least 1). Each one pipelines every concurrent
    /// command; commands go to them round-robin.
    pub fn connections_per_server(mut self, n: usize) -> Self {
        self.opts.connections_per_server = n.max(1);
        self
    }

    /// The largest item to store, key and item header included (default 1 MiB, memcached's
    /// default `-I`). A record that does not fit is refused as [`WriteOutcome::TooLarge`]
    /// before anything is written. A server whose own limit (`-I`) is lower holds its keys to
    /// that one: each connection reads it when it is made (see [Item size](self#item-size)).
    /// Values stored by others above this limit are not read: their keys' calls fail open.
    pub fn item_size_limit(mut self, bytes: usize) -> Self {
        self.item_size_limit = bytes;
        self
    }

    /// Keeps up to `bytes` of the records read from Memcached in process and serves each for at
    /// most `max_age` after it was read (never past the item's own expiry), so a hot key's hits
    /// cost no round trip; off by default. Memcached cannot tell a process that a key changed,
    /// so this is **bounded staleness**: a write or an invalidation made by *another* instance
    /// reaches this one's hits up to `max_age` late (this instance's own writes, invalidations
    /// and refreshed leases drop its copies at once). Freshness is never extended: the engine
    /// still judges every record by its own TTL. See the [module docs](self#near-cache).
    /// A zero `bytes` or `max_age` turns it off; `max_age` is capped at 30 days.
    pub fn near_cache(mut self, bytes: usize, max_age: Duration) -> Self {
        // Longer than memcached's longest relative expiry would mean nothing more.
        let max_age = max_age.min(Duration::from_secs(MAX_RELATIVE_SECS));
        self.near = (bytes > 0 && !max_age.is_zero()).then_some((bytes, max_age));
        self
    }

    /// How long resolving and dialling a server may take (default 1 s). The new connection's
    /// first round trip (reading the server's settings) is an I/O round trip, bounded by
    /// [`io_timeout`](Self::io_timeout).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.opts.connect_timeout = d;
        self
    }

    /// How long one round trip may take (default 1 s): a connection that owes a reply for
    /// longer is closed, within a quarter of this (at most 250 ms) after the reply was due, and
    /// every command on it fails. The engine's own per-call `backend_timeout` usually fires
    /// first.
    pub fn io_timeout(mut self, d: Duration) -> Self {
        self.opts.io_timeout = d;
        self
    }

    /// Parses the URLs. Nothing is resolved or dialled here: connections are made on first
    /// use, resolving their server's name (again at most once a second; the last addresses
    /// found are kept while it does not resolve), so a server that is down now (or whose name
    /// does not resolve yet) makes calls fail (and the engine fail open) until it is back, and
    /// one that comes back at another address (a container restarted) is found. A name must
    /// reach one memcached process: when it reaches a new address, the connections to the old
    /// one are closed.
    pub async fn build(self) -> BackendResult<MemcachedBackend> {
        let mut servers = Vec::new();
        for url in &self.urls {
            let parsed = parse_url(url)
                .map_err(|e| BackendError::with_source("memcached: invalid URL", e))?;
            servers.extend(parsed);
        }
        if servers.is_empty() {
            return Err(BackendError::new("memcached: no server given"));
        }
        let opts = Options {
            max_value: self.item_size_limit,
            ..self.opts
        };
        let client = Client::new(&servers, &opts)?;
        Ok(MemcachedBackend {
            inner: Arc::new(Inner {
                client,
                servers,
                prefix: self.prefix,
                item_size_limit: self.item_size_limit,
                held: Mutex::new(HeldLeases {
                    map: HashMap::new(),
                    prune_at: 1024,
                }),
                near: self.near.map(|(bytes, max_age)| Near {
                    store: NearStore::new(bytes),
                    max_age,
                }),
                reads: Arc::new(Flights::new()),
            }),
        })
    }
}

/// Parses `memcache://host:port[,host:port...]` (also `memcached://`; the port defaults to
/// 11211) into `host:port` strings.
fn parse_url(url: &str) -> Result<Vec<String>, ConfigError> {
    let bad = |why: &str| ConfigError::new(format!("memcached URL {url:?}: {why}"));
    let lower = url.to_ascii_lowercase();
    let rest = ["memcache://", "memcached://"]
        .iter()
        .find(|s| lower.starts_with(*s))
        .map(|s| &url[s.len()..])
        .ok_or_else(|| bad("expected memcache://host:port[,host:port...]"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('@') {
        // Not echoed: it may hold a password.
        return Err(ConfigError::new(
            "memcached URL: user and password are not supported (the meta protocol has no \
             authentication)",
        ));
    }
    let mut out = Vec::new();
    for part in rest.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(bad("empty server"));
        }
        let with_port = if part.ends_with(']') || !part.contains(':') {
            format!("{part}:{DEFAULT_PORT}")
        } else {
            part.to_string()
        };
        if !client::valid_host_port(&with_port) {
            return Err(bad(&format!("{part:?} is not host:port")));
        }
        out.push(with_port);
    }
    Ok(out)
}

impl MemcachedBackend {
    /// A backend on the servers of `url` (`memcache://host:port[,host:port...]`) with the
    /// defaults: prefix `ts:`, one pipelined connection per server, 1 MiB items.
    pub async fn connect(url: impl Into<String>) -> BackendResult<Self> {
        Self::builder(url).build().await
    }

    /// Starts a builder from a `memcache://host:port[,host:port...]` URL.
    pub fn builder(url: impl Into<String>) -> MemcachedBuilder {
        MemcachedBuilder {
            urls: vec![url.into()],
            prefix: Prefix::default(),
            item_size_limit: DEFAULT_ITEM_SIZE_LIMIT,
            near: None,
            opts: Options {
                connections_per_server: DEFAULT_CONNECTIONS_PER_SERVER,
                connect_timeout: Duration::from_secs(1),
                io_timeout: Duration::from_secs(1),
                max_value: DEFAULT_ITEM_SIZE_LIMIT,
            },
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &Prefix {
        &self.inner.prefix
    }

    /// The servers, as `host:port`, in configuration order.
    pub fn servers(&self) -> &[String] {
        &self.inner.servers
    }

    /// The index in [`servers`](Self::servers) of the server that holds every key of `slot`.
    pub fn server_of(&self, slot: &Digest) -> usize {
        client::server_index(
            self.inner.prefix.entry(slot).as_bytes(),
            &self.inner.servers,
        )
    }

    /// A plain `mg <key> v` on the key's server, through the same pool as every other call. For
    /// diagnostics and for benchmarks that compare the engine with the bare round trip.
    pub async fn meta_get(&self, key: &str) -> BackendResult<Option<Bytes>> {
        match self.cmd(get(key, true, false, false)).await? {
            Reply::Item(it) => Ok(it.value),
            Reply::Miss => Ok(None),
            other => Err(unexpected("mg", &other)),
        }
    }

    async fn cmd(&self, cmd: Cmd) -> BackendResult<Reply> {
        self.inner.client.one(cmd).await
    }

    /// Whether the record fits the item size limit: the configured one, or the key's server's
    /// own when that is lower (read by each connection when it is made).
    fn fits(&self, key: &str, record: &[u8]) -> bool {
        let limit = self.inner.item_size_limit;
        let limit = self
            .inner
            .client
            .item_size_max(key)
            .map_or(limit, |n| n.min(limit));
        key.len() + record.len() + ITEM_OVERHEAD <= limit
    }

    // --- the held-lease map -------------------------------------------------------------------

    fn held(&self) -> std::sync::MutexGuard<'_, HeldLeases> {
        // The map only caches CASes; a panic elsewhere cannot leave it inconsistent in a way
        // that matters (a missing CAS falls back to the token check).
        self.inner.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn keep(&self, slot: &Digest, token: Token, cas: u64, bound: u64, secs: u32) {
        let now = Instant::now();
        let mut h = self.held();
        if h.map.len() >= h.prune_at {
            // Leases that ended without a release (a failed fill keeps its lease) leave entries
            // behind; drop the expired ones.
            h.map.retain(|_, l| l.until > now);
            h.prune_at = (h.map.len() * 2).max(1024);
        }
        h.map.insert(
            (*slot, token),
            HeldLease {
                cas,
                bound,
                until: now + Duration::from_secs(u64::from(secs)),
            },
        );
    }

    /// The lease's CAS and its bound (see `HeldLease`).
    fn cas_of(&self, slot: &Digest, token: Token) -> Option<(u64, u64)> {
        self.held()
            .map
            .get(&(*slot, token))
            .map(|l| (l.cas, l.bound))
    }

    fn forget(&self, slot: &Digest, token: Token) -> Option<(u64, u64)> {
        self.held()
            .map
            .remove(&(*slot, token))
            .map(|l| (l.cas, l.bound))
    }

    /// Reads the lease and returns its CAS, with its bound (see `HeldLease`), if the stored
    /// token is ours (and the lease not marked failed, unless `failed_too`).
    async fn ours(
        &self,
        key: &str,
        token: Token,
        failed_too: bool,
    ) -> BackendResult<Option<(u64, u64)>> {
        match self
            .inner
            .client
            .one_on(get(key, true, true, false))
            .await?
        {
            (Reply::Item(it), conn)
                if it.value.as_deref() == Some(&token.to_hex()[..])
                    && (failed_too || it.flags != LEASE_FAILED) =>
            {
                Ok(Some((need_cas(&it)?, conn + 1)))
            }
            (Reply::Item(_) | Reply::Miss, _) => Ok(None),
            (other, _) => Err(unexpected("mg (lease)", &other)),
        }
    }

    /// `md <lease> C<cas>`, only while `token` holds it. A CAS is only ever sent to the server
    /// process it was read from (memcached numbers CAS values afresh at every restart, so after
    /// one an old CAS may be another holder's lease's): on a connection made before it was read.
    async fn release_lease(&self, slot: &Digest, token: Token) -> BackendResult<bool> {
        self.release_known(slot, token, self.forget(slot, token))
            .await
    }

    /// [`release_lease`](Self::release_lease) with the lease's CAS and bound, if known.
    async fn release_known(
        &self,
        slot: &Digest,
        token: Token,
        known: Option<(u64, u64)>,
    ) -> BackendResult<bool> {
        let key = self.inner.prefix.lease(slot);
        let client = &self.inner.client;
        if let Some((cas, bound)) = known {
            match client.one_before(del(&key, Some(cas)), bound).await? {
                Some((Reply::Done(_), _)) => return Ok(true),
                Some((Reply::NotFound, _)) => return Ok(false),
                // Another holder's lease -- or ours under a CAS we never saw (an extend whose
                // reply was lost); or no connection left from when the CAS was read. The
                // token tells.
                Some((Reply::Exists, _)) | None => {}
                Some((other, _)) => return Err(unexpected("md (lease)", &other)),
            }
        }
        let Some((cas, bound)) = self.ours(&key, token, true).await? else {
            return Ok(false);
        };
        match client.one_before(del(&key, Some(cas)), bound).await? {
            Some((Reply::Done(_), _)) => Ok(true),
            Some((Reply::Exists | Reply::NotFound, _)) | None => Ok(false),
            Some((other, _)) => Err(unexpected("md (lease)", &other)),
        }
    }

    /// Sets the lease to `ttl` from now, only while `token` holds it: `extend` (`failed`
    /// false: a lease marked failed is not ours to extend), or `fail` (marks it failed; its CAS
    /// is then forgotten, so a later `extend` reads the flag and refuses).
    async fn rewrite_lease(
        &self,
        slot: &Digest,
        token: Token,
        ttl: Duration,
        failed: bool,
    ) -> BackendResult<bool> {
        let key = self.inner.prefix.lease(slot);
        let secs = expiry_secs(ttl);
        let client = &self.inner.client;
        let mut known = self.cas_of(slot, token);
        for _ in 0..CAS_ATTEMPTS {
            let (cas, bound) = match known.take() {
                Some(c) => c,
                None => match self.ours(&key, token, failed).await? {
                    Some(c) => c,
                    None => {
                        self.forget(slot, token);
                        return Ok(false);
                    }
                },
            };
            let set = Cmd::Set {
                key: key.clone(),
                value: token_bytes(token),
                secs,
                flags: if failed { LEASE_FAILED } else { 0 },
                cond: Cond::Cas(cas),
            };
            // As for a release: the CAS only to the server process it was read from.
            match client.one_before(set, bound).await? {
                Some((Reply::Done(_), _)) if failed => {
                    self.forget(slot, token);
                    return Ok(true);
                }
                Some((Reply::Done(Some(new)), conn)) => {
                    self.forget(slot, token);
                    // `conn`, numbered below `bound`, answered after the CAS was read on the
                    // connection `bound` names: both reach the same process, so the higher
                    // bound still holds, and stays useful longer.
                    self.keep(slot, token, real_cas(new)?, bound.max(conn + 1), secs);
                    return Ok(true);
                }
                Some((Reply::Done(None), _)) => {
                    // Extended, but the new CAS is unknown: later calls go by the token.
                    self.forget(slot, token);
                    return Ok(true);
                }
                Some((Reply::NotFound, _)) => {
                    self.forget(slot, token);
                    return Ok(false);
                }
                // Changed since the CAS was read (by an extend of ours still in flight, say):
                // the token decides again.
                Some((Reply::Exists, _)) | None => continue,
                Some((other, _)) => return Err(unexpected("ms (extend)", &other)),
            }
        }
        // Still ours at the last read, but changed under every rewrite: not a lease that ended.
        self.forget(slot, token);
        Err(BackendError::new(format!(
            "memcached: the lease at {key} changed under {CAS_ATTEMPTS} rewrites in a row"
        ))
        .store_answered())
    }

    /// Ends `slot`'s lease, whoever holds it (after an invalidation: the next caller fills
    /// anew, and a fill from before it can neither mark the lease failed nor hold callers up;
    /// its write the tombstone fences). Best effort.
    async fn end_lease(&self, slot: &Digest) -> BackendResult<()> {
        let key = self.inner.prefix.lease(slot);
        self.cmd(del(&key, None)).await.map(|_| ())
    }

    // --- fences -------------------------------------------------------------------------------

    /// The fence of what is stored at `key`, from its header (0 for nothing or bytes that do
    /// not decode), read again when `reply` has no value. Returns the item's CAS with it.
    async fn stored_fence(&self, key: &str, reply: Reply) -> BackendResult<(u64, Option<u64>)> {
        let item = match reply {
            Reply::Miss => return Ok((0, None)),
            Reply::Item(it) => it,
            other => return Err(unexpected("mg (entry)", &other)),
        };
        if let Some(v) = &item.value {
            return Ok((record_fence(v), item.cas));
        }
        match self.cmd(get(key, true, true, false)).await? {
            Reply::Miss => Ok((0, None)),
            Reply::Item(it) => Ok((it.value.as_deref().map_or(0, record_fence), it.cas)),
            other => Err(unexpected("mg (entry)", &other)),
        }
    }

    /// Turns the reply of the pipelined `ma` into a grant above `stored`: repairs a counter that
    /// holds bytes that are not a number, and adds the gap when the counter is behind.
    async fn grant_fence(&self, slot: &Digest, stored: u64, incr: Reply) -> BackendResult<u64> {
        let key = self.inner.prefix.fence(slot);
        let floor = stored.saturating_add(1);
        let start = floor.max(clock_floor());
        let counter = match incr {
            Reply::Counter(v) => v,
            Reply::Rejected(_) => {
                // Not a number (bad bytes at the counter key): start it over above the entry.
                match self.cmd(del(&key, None)).await? {
                    Reply::Done(_) | Reply::NotFound => {}
                    other => return Err(unexpected("md (fence)", &other)),
                }
                match self.cmd(incr_cmd(&key, 1, start)).await? {
                    Reply::Counter(v) => v,
                    other => return Err(unexpected("ma (fence)", &other)),
                }
            }
            other => return Err(unexpected("ma (fence)", &other)),
        };
        if counter > stored {
            return Ok(counter);
        }
        // Behind the entry (the counter was evicted or the server restarted): one more atomic
        // increment by the gap, so this grant and every later one are above the entry, and
        // unique.
        match self.cmd(incr_cmd(&key, floor - counter, floor)).await? {
            Reply::Counter(v) => Ok(v.max(floor)),
            other => Err(unexpected("ma (fence)", &other)),
        }
    }

    // --- the operations -----------------------------------------------------------------------

    async fn do_fetch(&self, slot: &Digest, variant: Option<&Digest>) -> BackendResult<Fetched> {
        if let Some(near) = &self.inner.near {
            return self.fetch_near(near, slot, variant).await;
        }
        let p = &self.inner.prefix;
        let Some(v) = variant else {
            return Ok(Fetched {
                entry: self.read_entry(slot).await?,
                variant: None,
            });
        };
        let mut replies = self
            .inner
            .client
            .batch(vec![
                get(&p.entry(slot), true, false, false),
                get(&p.variant(slot, v), true, false, false),
            ])
            .await
            .into_iter();
        let entry = value_of(next(&mut replies)?)?;
        let variant = value_of(next(&mut replies)?)?;
        Ok(Fetched { entry, variant })
    }

    /// The entry of `slot`, read by one `mg` however many fetches ask for it while it is in
    /// flight: a hot key's hits then cost the server (and this process's connection) one read
    /// per round trip, not one per request. A fetch that joins gets the answer to a read sent
    /// before it started, so it can miss what another process wrote after the server answered
    /// that read and before the answer arrived here: a window of one reply in transit. This
    /// process's own writes, invalidations and refreshed leases end the sharing of a read in
    /// flight when they complete ([`changed`](Self::changed)), so a fetch that follows one of
    /// them reads anew.
    async fn read_entry(&self, slot: &Digest) -> BackendResult<Option<Bytes>> {
        let read = || async {
            value_of(
                self.cmd(get(&self.inner.prefix.entry(slot), true, false, false))
                    .await?,
            )
        };
        match self.inner.reads.join(slot) {
            Join::Leader(flight) => {
                let got = read().await;
                flight.finish(match &got {
                    Ok(v) => SharedRead::Got(v.clone()),
                    Err(e) => SharedRead::Failed(e.to_string().into(), e.is_store_answered()),
                });
                got
            }
            Join::Follower(mut rx) => match outcome(&mut rx).await {
                SharedRead::Got(v) => Ok(v),
                SharedRead::Failed(msg, answered) => {
                    let e = BackendError::new(msg.to_string());
                    Err(if answered { e.store_answered() } else { e })
                }
                SharedRead::Abandoned => read().await,
            },
        }
    }

    /// `fetch` through the near cache: kept copies when there are, else the same reads with the
    /// items' remaining TTLs, kept for at most `max_age`.
    async fn fetch_near(
        &self,
        near: &Near,
        slot: &Digest,
        variant: Option<&Digest>,
    ) -> BackendResult<Fetched> {
        let p = &self.inner.prefix;
        let entry_key = p.entry(slot);
        let variant_key = variant.map(|v| p.variant(slot, v));
        if let Some(f) = near::kept(|k| near.store.get(k), &entry_key, variant_key.as_deref()) {
            return Ok(f);
        }
        let entry_ticket = near.store.ticket(&entry_key);
        let variant = variant_key.as_deref().map(|k| (k, near.store.ticket(k)));
        let read_at = Instant::now();
        let mut cmds = vec![get(&entry_key, true, false, true)];
        if let Some((vk, _)) = variant {
            cmds.push(get(vk, true, false, true));
        }
        let mut replies = self.inner.client.batch(cmds).await.into_iter();
        let mut take = |key: &str, ticket: near::Ticket| -> BackendResult<Option<Bytes>> {
            match next(&mut replies)? {
                Reply::Item(it) => {
                    if let Some(v) = &it.value {
                        // The item's expiry in whole seconds, less memcached's slack second.
                        let keep = remaining(it.ttl, near.max_age);
                        if let Some(until) = read_at.checked_add(keep) {
                            near.store.put(ticket, key, v, Some(until));
                        }
                    }
                    Ok(it.value)
                }
                Reply::Miss => Ok(None),
                other => Err(unexpected("mg", &other)),
            }
        };
        let entry = take(&entry_key, entry_ticket)?;
        let variant = match variant {
            Some((vk, ticket)) => take(vk, ticket)?,
            None => None,
        };
        Ok(Fetched { entry, variant })
    }

    /// Drops this process's near copy of `key` (after its own write there).
    fn forget_near(&self, key: &str) {
        if let Some(near) = &self.inner.near {
            near.store.forget(key);
        }
    }

    /// After this process changed `slot`'s entry (`entry`: its key): its near copy is dropped,
    /// and a read of it in flight is no longer joined by later fetches.
    fn changed(&self, slot: &Digest, entry: &str) {
        self.forget_near(entry);
        self.inner.reads.detach(slot);
    }

    async fn do_acquire(&self, slot: &Digest, ttl: Duration, seen: u64) -> BackendResult<Acquire> {
        let p = &self.inner.prefix;
        let lease = p.lease(slot);
        let entry = p.entry(slot);
        let token = Token::random();
        let secs = expiry_secs(ttl);
        // One round trip: the add, then (already knowing who won) the lease's remaining time,
        // the entry's fence (from its flags) and a counter bump. A losing attempt burns a fence
        // number, which costs nothing: grants need only be unique and growing.
        let (replies, conn) = self
            .inner
            .client
            .batch_on(vec![
                Cmd::Set {
                    key: lease.clone(),
                    value: token_bytes(token),
                    secs,
                    flags: 0,
                    cond: Cond::Add,
                },
                get(&lease, false, true, true),
                get(&entry, false, false, false),
                incr_cmd(&p.fence(slot), 1, seen.saturating_add(1).max(clock_floor())),
            ])
            .await;
        let mut replies = replies.into_iter();
        // The lease's CAS goes back only to the server process it came from (see `HeldLease`).
        let bound = conn.map_or(0, |c| c + 1);
        let add = next(&mut replies);
        let held = next(&mut replies);
        let cas = match add {
            Ok(Reply::Done(Some(cas))) => real_cas(cas)?,
            Ok(Reply::NotStored) => {
                let (remaining, failed) = match held {
                    // A server without CAS says so here too, not only to the add that won.
                    Ok(Reply::Item(it)) if it.cas == Some(0) => return Err(cas_off()),
                    Ok(Reply::Item(it)) => (remaining(it.ttl, ttl), it.flags == LEASE_FAILED),
                    // Gone since the add: compete again soon.
                    Ok(Reply::Miss) => (Duration::ZERO, false),
                    _ => (ttl, false),
                };
                return Ok(Acquire::Held { remaining, failed });
            }
            Ok(other) => return Err(unexpected("ms (lease)", &other)),
            Err(e) => return Err(e),
        };
        // The lease is ours: every way out that does not grant it gives it back.
        let granted = async {
            let stored = match next(&mut replies)? {
                Reply::Miss => 0,
                // The flags say "the fence the caller saw" (see `flags_for`): no need to read
                // the value.
                Reply::Item(it) if it.flags != 0 && it.flags == low32(seen) => seen,
                // Otherwise the header decides, as it did for the caller's `seen` (flags that
                // disagree with bytes that do not decode must not refresh forever).
                Reply::Item(_) => {
                    let reply = self.cmd(get(&entry, true, false, false)).await?;
                    self.stored_fence(&entry, reply).await?.0
                }
                other => return Err(unexpected("mg (entry)", &other)),
            };
            if stored != seen {
                return Ok(None);
            }
            let incr = next(&mut replies)?;
            self.grant_fence(slot, stored, incr).await.map(Some)
        }
        .await;
        match granted {
            Ok(Some(fence)) => {
                self.keep(slot, token, cas, bound, secs);
                Ok(Acquire::Acquired { token, fence })
            }
            Ok(None) => {
                // A newer entry is stored: a near copy of the old one must not be read again
                // (before the await below, which a caller may give up).
                self.changed(slot, &entry);
                // Best effort: a lease we fail to give back ends at its expiry. As a release
                // (its CAS on a connection as old, else by the token): the add's connection is
                // often the one whose loss failed the grant.
                let _ = self.release_known(slot, token, Some((cas, bound))).await;
                Ok(Acquire::Refreshed)
            }
            Err(e) => {
                let _ = self.release_known(slot, token, Some((cas, bound))).await;
                Err(e)
            }
        }
    }

    /// May a write with `(fence, token)` replace what `reply` shows at `key`?
    async fn judge(
        &self,
        key: &str,
        reply: Reply,
        fence: u64,
        token: Token,
    ) -> BackendResult<Verdict> {
        let item = match reply {
            Reply::Miss => return Ok(Verdict::Absent),
            Reply::Item(it) => it,
            other => return Err(unexpected("mg", &other)),
        };
        // The header decides (the flags are only a hint of the fence's low bits).
        let item = if item.value.is_some() {
            item
        } else {
            match self.cmd(get(key, true, true, false)).await? {
                Reply::Miss => return Ok(Verdict::Absent),
                Reply::Item(it) => it,
                other => return Err(unexpected("mg", &other)),
            }
        };
        let header = item.value.as_deref().and_then(Header::parse);
        Ok(if fence_allows(header.as_ref(), fence, token) {
            Verdict::Replace(need_cas(&item)?)
        } else {
            Verdict::Refused
        })
    }

    /// The CAS loop of one key: store `record` over what was judged, re-reading and re-judging
    /// after every lost race.
    async fn store(
        &self,
        key: &str,
        record: &Bytes,
        ttl: Duration,
        mut verdict: Verdict,
        fence: u64,
        token: Token,
    ) -> BackendResult<WriteOutcome> {
        let secs = expiry_secs(ttl);
        let flags = flags_for(record);
        for _ in 0..CAS_ATTEMPTS {
            let cond = match verdict {
                Verdict::Refused => return Ok(WriteOutcome::Fenced),
                Verdict::Absent => Cond::Add,
                Verdict::Replace(cas) => Cond::Cas(cas),
            };
            // Again before each `ms`: a re-read may have dialled a server restarted with a
            // lower limit.
            if !self.fits(key, record) {
                return Ok(WriteOutcome::TooLarge);
            }
            let set = Cmd::Set {
                key: key.to_string(),
                value: record.clone(),
                secs,
                flags,
                cond,
            };
            match self.cmd(set).await? {
                Reply::Done(_) => return Ok(WriteOutcome::Stored),
                Reply::TooLarge => return Ok(WriteOutcome::TooLarge),
                Reply::NotStored | Reply::Exists | Reply::NotFound => {
                    let now = self.cmd(get(key, true, true, false)).await?;
                    verdict = self.judge(key, now, fence, token).await?;
                }
                other => return Err(unexpected("ms", &other)),
            }
        }
        // The store answered every time: this key's data is busy, the store is not down (the
        // engine gives the lease back, and the breaker does not count it).
        Err(BackendError::new(format!(
            "memcached: the fenced write to {key} lost {CAS_ATTEMPTS} CAS races in a row"
        ))
        .store_answered())
    }

    async fn do_write(&self, w: FencedWrite) -> BackendResult<WriteOutcome> {
        let p = &self.inner.prefix;
        let entry_key = p.entry(&w.slot);
        let variant = w
            .variant
            .as_ref()
            .map(|(d, bytes)| (p.variant(&w.slot, d), bytes));
        // Stored or fenced, our near copies of these keys are out of date; also when the caller
        // gives the write up halfway (the engine's backend timeout), as it may have landed.
        let _changed = OnDrop(|| {
            self.changed(&w.slot, &entry_key);
            if let Some((k, _)) = &variant {
                self.forget_near(k);
            }
        });
        self.write_keys(&w, &entry_key, variant.as_ref()).await
    }

    /// The fenced write of `w` at its entry key and, if any, its variant key.
    async fn write_keys(
        &self,
        w: &FencedWrite,
        entry_key: &str,
        variant: Option<&(String, &Bytes)>,
    ) -> BackendResult<WriteOutcome> {
        // Nothing written, the lease untouched, no signal (see WriteOutcome::TooLarge).
        let too_large = || {
            !self.fits(entry_key, &w.entry)
                || variant.as_ref().is_some_and(|(k, b)| !self.fits(k, b))
        };
        if too_large() {
            return Ok(WriteOutcome::TooLarge);
        }
        let mut reads = vec![get(entry_key, true, true, false)];
        if let Some((k, _)) = variant {
            reads.push(get(k, true, true, false));
        }
        let mut replies = self.inner.client.batch(reads).await.into_iter();
        // Again after the read, which dialled the server if nothing had: a new connection
        // reads the server's own limit, and a larger `ms` would delete what the key holds.
        if too_large() {
            return Ok(WriteOutcome::TooLarge);
        }
        let entry_verdict = self
            .judge(entry_key, next(&mut replies)?, w.fence, w.token)
            .await?;
        let variant_verdict = match variant {
            Some((k, _)) => Some(self.judge(k, next(&mut replies)?, w.fence, w.token).await?),
            None => None,
        };
        let refused = matches!(entry_verdict, Verdict::Refused)
            || matches!(variant_verdict, Some(Verdict::Refused));
        let mut outcome = if refused {
            WriteOutcome::Fenced
        } else {
            WriteOutcome::Stored
        };
        if !refused {
            // The variant first: if it cannot be stored nothing is, and the entry (the head that
            // makes it visible to lookups) lands last.
            if let (Some((k, bytes)), Some(v)) = (variant, variant_verdict) {
                outcome = self
                    .store(k, bytes, w.variant_ttl, v, w.fence, w.token)
                    .await?;
            }
            if outcome == WriteOutcome::TooLarge {
                return Ok(outcome);
            }
            if outcome == WriteOutcome::Stored {
                outcome = self
                    .store(
                        entry_key,
                        &w.entry,
                        w.entry_ttl,
                        entry_verdict,
                        w.fence,
                        w.token,
                    )
                    .await?;
                if outcome == WriteOutcome::TooLarge {
                    return Ok(outcome);
                }
            }
        }
        if w.release {
            if let Err(e) = self.release_lease(&w.slot, w.token).await {
                // Written; the lease now ends at its expiry instead.
                tracing::debug!(error = %e, "memcached: releasing the lease after a write failed");
            }
        }
        Ok(outcome)
    }

    async fn do_invalidate(&self, slot: &Digest, ttl: Duration) -> BackendResult<u64> {
        let entry = self.inner.prefix.entry(slot);
        // As for a write: also when the caller gives it up halfway.
        let _changed = OnDrop(|| self.changed(slot, &entry));
        let fence = self.tombstone(slot, &entry, ttl).await?;
        let _ = self.end_lease(slot).await;
        Ok(fence)
    }

    /// Bumps `slot`'s fence and writes a tombstone with it at `entry`.
    async fn tombstone(&self, slot: &Digest, entry: &str, ttl: Duration) -> BackendResult<u64> {
        let p = &self.inner.prefix;
        let secs = expiry_secs(ttl);
        for _ in 0..CAS_ATTEMPTS {
            let mut replies = self
                .inner
                .client
                .batch(vec![
                    get(entry, true, true, false),
                    incr_cmd(&p.fence(slot), 1, clock_floor()),
                ])
                .await
                .into_iter();
            let (stored, cas) = self.stored_fence(entry, next(&mut replies)?).await?;
            let fence = self.grant_fence(slot, stored, next(&mut replies)?).await?;
            let tomb = Record::encode_marker(Header {
                kind: Kind::Tombstone,
                fence,
                token: Token::NONE,
                epoch: fence,
            });
            let set = Cmd::Set {
                key: entry.to_string(),
                flags: flags_for(&tomb),
                value: tomb,
                secs,
                cond: cas.map_or(Cond::Add, Cond::Cas),
            };
            match self.cmd(set).await? {
                Reply::Done(_) => return Ok(fence),
                Reply::NotStored | Reply::Exists | Reply::NotFound => continue,
                other => return Err(unexpected("ms (tombstone)", &other)),
            }
        }
        Err(BackendError::new(format!(
            "memcached: the tombstone for {entry} lost {CAS_ATTEMPTS} CAS races in a row"
        ))
        .store_answered())
    }
}

/// Runs its closure when dropped: when the future holding it ends, or is dropped unfinished.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// What a fenced write may do at one key.
#[derive(Clone, Copy, Debug)]
enum Verdict {
    /// Nothing stored: add.
    Absent,
    /// Replace the item with this CAS.
    Replace(u64),
    /// A newer fence (or the same fence from another token) is stored.
    Refused,
}

fn get(key: &str, value: bool, cas: bool, ttl: bool) -> Cmd {
    Cmd::Get {
        key: key.to_string(),
        value,
        cas,
        ttl,
    }
}

fn del(key: &str, cas: Option<u64>) -> Cmd {
    Cmd::Delete {
        key: key.to_string(),
        cas,
    }
}

fn incr_cmd(key: &str, delta: u64, initial: u64) -> Cmd {
    Cmd::Incr {
        key: key.to_string(),
        delta,
        initial,
        secs: COUNTER_SECS,
    }
}

/// The client flags of a lease marked failed by `fail` (an add stores 0).
const LEASE_FAILED: u32 = 1;

fn token_bytes(token: Token) -> Bytes {
    Bytes::copy_from_slice(&token.to_hex())
}

/// The client flags stored with a record: its fence's low 32 bits (see the module docs on
/// fences), 0 for bytes that are not a record.
fn flags_for(record: &[u8]) -> u32 {
    Header::parse(record).map_or(0, |h| low32(h.fence))
}

/// The low 32 bits of a fence: what the client flags can carry.
fn low32(fence: u64) -> u32 {
    (fence & u64::from(u32::MAX)) as u32
}

/// This process's clock in microseconds since the Unix epoch: the floor of a counter made anew
/// (see the module docs on fences). 1 on a clock before 1970.
fn clock_floor() -> u64 {
    crate::clock::now_us().max(1)
}

fn need_cas(item: &Item) -> BackendResult<u64> {
    item.cas
        .ok_or_else(|| BackendError::new("memcached: a reply lacks the CAS it was asked for"))
        .and_then(real_cas)
}

/// A CAS value as the server reports it: 0 only from a server run with `-C` (CAS off), where
/// `md k C0` deletes whatever is stored and `ms k C0` never matches, so no lease or fenced
/// write would be safe. Refused as configuration, whatever the call.
fn real_cas(cas: u64) -> BackendResult<u64> {
    if cas == 0 {
        return Err(cas_off());
    }
    Ok(cas)
}

fn cas_off() -> BackendError {
    BackendError::new(
        "memcached: the server runs with CAS off (-C); leases and fenced writes need it",
    )
    .config_rejected()
}

/// The holder's remaining time as `mg ... t` reports it, less the second of slack we add.
fn remaining(t: Option<i64>, ttl: Duration) -> Duration {
    match t {
        Some(t) if t >= 1 => Duration::from_secs(t as u64 - 1).min(ttl),
        Some(0) => Duration::ZERO,
        // No expiry (someone else's item) or not reported: the configured lease.
        _ => ttl,
    }
}

fn value_of(reply: Reply) -> BackendResult<Option<Bytes>> {
    match reply {
        Reply::Item(it) => Ok(it.value),
        Reply::Miss => Ok(None),
        other => Err(unexpected("mg", &other)),
    }
}

/// The next reply of a pipeline (an error when the server's answers ran out).
fn next(replies: &mut impl Iterator<Item = BackendResult<Reply>>) -> BackendResult<Reply> {
    replies
        .next()
        .unwrap_or_else(|| Err(BackendError::new("memcached: a pipelined reply is missing")))
}

fn unexpected(what: &str, reply: &Reply) -> BackendError {
    let name = match reply {
        Reply::Item(_) => "a value".to_string(),
        Reply::Miss => "EN".to_string(),
        Reply::Done(_) => "HD".to_string(),
        Reply::NotStored => "NS".to_string(),
        Reply::Exists => "EX".to_string(),
        Reply::NotFound => "NF".to_string(),
        Reply::Counter(_) => "a counter".to_string(),
        Reply::TooLarge => "SERVER_ERROR object too large".to_string(),
        Reply::Rejected(m) => format!("CLIENT_ERROR {m}"),
    };
    BackendError::new(format!("memcached: unexpected reply to {what}: {name}"))
}

impl Backend for MemcachedBackend {
    fn name(&self) -> &'static str {
        "memcached"
    }

    fn fetch<'a>(
        &'a self,
        slot: &'a Digest,
        variant: Option<&'a Digest>,
    ) -> BoxFuture<'a, BackendResult<Fetched>> {
        Box::pin(self.do_fetch(slot, variant))
    }

    fn try_acquire<'a>(
        &'a self,
        slot: &'a Digest,
        ttl: Duration,
        seen_fence: u64,
    ) -> BoxFuture<'a, BackendResult<Acquire>> {
        Box::pin(self.do_acquire(slot, ttl, seen_fence))
    }

    fn extend<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        Box::pin(self.rewrite_lease(slot, token, ttl, false))
    }

    fn release<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        _signal: Signal,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        // No pub/sub: waiters see the release by polling.
        Box::pin(self.release_lease(slot, token))
    }

    fn write(&self, w: FencedWrite) -> BoxFuture<'_, BackendResult<WriteOutcome>> {
        Box::pin(self.do_write(w))
    }

    fn invalidate<'a>(
        &'a self,
        slot: &'a Digest,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<u64>> {
        Box::pin(self.do_invalidate(slot, ttl))
    }

    fn fail<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        // No pub/sub: waiters see the flag at their next poll.
        Box::pin(self.rewrite_lease(slot, token, ttl, true))
    }

    fn subscribe<'a>(
        &'a self,
        _slot: &'a Digest,
    ) -> BoxFuture<'a, BackendResult<Option<Subscription>>> {
        Box::pin(std::future::ready(Ok(None)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_ceil_plus_one_at_least_two_clamped() {
        assert_eq!(expiry_secs(Duration::ZERO), 2);
        assert_eq!(expiry_secs(Duration::from_millis(1)), 2);
        assert_eq!(expiry_secs(Duration::from_secs(1)), 2);
        assert_eq!(expiry_secs(Duration::from_millis(1001)), 3);
        assert_eq!(expiry_secs(Duration::from_secs(5)), 6);
        assert_eq!(
            expiry_secs(Duration::from_secs(400 * 24 * 3600)),
            MAX_RELATIVE_SECS as u32
        );
        assert_eq!(expiry_secs(Duration::MAX), MAX_RELATIVE_SECS as u32);
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("memcache://127.0.0.1:11211").unwrap(),
            ["127.0.0.1:11211"]
        );
        assert_eq!(
            parse_url("memcached://a:1, b ,[::1]/").unwrap(),
            ["a:1", "b:11211", "[::1]:11211"]
        );
        for bad in [
            "127.0.0.1:11211",
            "redis://a:1",
            "memcache://",
            "memcache://a:1,,b:2",
            "memcache://a:x",
            "memcache://a b:1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        // A password is refused without being repeated.
        let err = parse_url("memcache://user:s3cr3t@127.0.0.1:11211").unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn flags_carry_the_fences_low_32_bits() {
        let rec = Record::pass_with_fence;
        assert_eq!(flags_for(&rec(7)), 7);
        assert_eq!(flags_for(&rec(u64::from(u32::MAX))), u32::MAX);
        assert_eq!(flags_for(&rec(u64::from(u32::MAX) + 1)), 0);
        assert_eq!(flags_for(&rec((5 << 32) + 9)), 9);
        assert_eq!(flags_for(&rec(0)), 0);
        assert_eq!(flags_for(b"garbage"), 0);
    }

    #[test]
    fn remaining_drops_the_slack_second() {
        let ttl = Duration::from_secs(10);
        assert_eq!(remaining(Some(11), ttl), ttl);
        assert_eq!(remaining(Some(6), ttl), Duration::from_secs(5));
        assert_eq!(remaining(Some(0), ttl), Duration::ZERO);
        assert_eq!(remaining(Some(-1), ttl), ttl);
        assert_eq!(remaining(None, ttl), ttl);
    }
}
