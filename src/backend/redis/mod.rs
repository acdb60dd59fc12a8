//! The Redis backend (cargo feature `redis`).
//!
//! Every contract operation that must be atomic is one Lua script, loaded once per connection
//! (`SCRIPT LOAD`) and called by `EVALSHA` (reloaded on `NOSCRIPT`, e.g. after a restart or a
//! failover). Every key a script touches is passed in `KEYS`, and all keys of one slot share the
//! hash tag `{<digest>}`, so the scripts are Redis Cluster safe.
//!
//! | operation | round trips | what runs |
//! |---|---|---|
//! | [`fetch`](Backend::fetch) | 1 | `GET entry`, or `MGET entry variant` |
//! | [`try_acquire`](Backend::try_acquire) | 1 | `acquire.lua`: lease `SET NX PX` + fence grant + `Refreshed` check |
//! | [`extend`](Backend::extend) / [`release`](Backend::release) | 1 | token-checked `PEXPIRE` / `DEL` (+ publish) |
//! | [`write`](Backend::write) | 1 | `write.lua`: fenced `SET PX` (+ variant), release, publish |
//! | [`invalidate`](Backend::invalidate) | 1 | `invalidate.lua`: fence bump + tombstone; the lease ends (live or failed) |
//! | [`fail`](Backend::fail) | 1 | `fail.lua`: token-checked rewrite of the lease as failed (its token and `!`, `SET PX`) + publish |
//!
//! **Connections.** The hit path never checks a connection out of the pool (a deadpool checkout
//! pings the server first, which doubles the cost of a `GET`). The backend holds one multiplexed
//! connection (or a few, used round-robin), and uses the pool only to make one and to replace
//! it when it breaks (connection dropped, `READONLY` after a failover). Connections are made
//! lazily, so an engine starts even when Redis is down (it fails open until Redis is back);
//! [`RedisBackendBuilder::connect`] makes them eagerly instead and reports an unreachable server.
//!
//! **Signals** use sharded pub/sub (`SPUBLISH` / `SSUBSCRIBE`, Redis >= 7) on the channel
//! `<prefix>{<digest>}:s`, so a Cluster does not broadcast every signal to every node. redis-rs
//! only offers `ssubscribe` on its cluster connection, so the backend keeps one RESP3 multiplexed
//! connection with a push channel for all its subscriptions and sends `SSUBSCRIBE` on it itself.
//! For Redis 6, [`RedisBackendBuilder::sharded_pubsub`]`(false)` switches to plain
//! `PUBLISH` / `SUBSCRIBE` (fine on a single node). Waiters also poll, so a lost message costs
//! latency, never correctness.
//!
//! **Fences** are kept as 20-digit strings in the record header and compared as strings (exact
//! for every `u64`); the grant `max(counter, stored fence, server clock in µs) + 1` is computed
//! with Lua numbers, exact below 2^53. The fence counter of a key lives for
//! [`RedisBackendBuilder::fence_ttl`] after its last grant (one day by default), so idle keys do
//! not pile up counters; once it is gone, the stored entry's fence still keeps grants from going
//! backwards, and when both are gone (a restart without persistence, a failover to a replica
//! that had not seen them, eviction) the server's clock (`TIME`) does: a holder that started
//! before the loss cannot overwrite what a later holder stored, unless the server's clock
//! stepped back by more than the time between the two grants. A counter that holds anything but
//! a plain number counts as absent, and so does a stored fence at or above 2^53, which no grant
//! reaches (only forged or damaged bytes hold one): a grant goes on from the counter and the
//! clock, and a write or an invalidation replaces it.
//!
//! **Invalidation** writes a tombstone whose epoch is its fence; variants of a `Vary`ing entry are
//! separate keys that a script cannot enumerate Cluster-safely, so they are not deleted: the
//! epoch voids them and they expire on their own TTL.
//!
//! **Sizes.** A record larger than [`RedisBackendBuilder::max_record_bytes`] (512 MiB less 64
//! KiB by default, just under Redis's default `proto-max-bulk-len`) is refused client-side with
//! [`WriteOutcome::TooLarge`], so a huge value can never make the server drop a shared connection.
//!
//! **Eviction.** Under a `volatile-*` or `allkeys-*` `maxmemory-policy`, Redis may evict a lease
//! (it has a TTL); the backend logs a warning at its first connection. A lost lease costs one
//! extra fill, never a wrong value: the fence still orders the writes.
//!
//! **TLS.** With the cargo feature `redis-tls`, `rediss://` URLs work (rustls with the ring
//! provider, the system's root certificates; no system TLS library). For a private CA, build the
//! connection info with `redis::Client::build_with_tls` and pass
//! `client.get_connection_info().clone()` to [`RedisBackend::builder`].
//!
//! The backend re-exports the `redis` and `deadpool_redis` crates it is built on, so your versions
//! cannot drift from ours.
//!
//! # Near cache
//!
//! With [`RedisBackendBuilder::near_cache`]`(bytes)` the backend keeps the records it reads (up
//! to `bytes`, none larger than a 256th of it) in process, so a hot key's hits cost no round
//! trip. It uses Redis's server-assisted client-side caching: one extra RESP3 connection receives
//! invalidations, and each data connection sends `CLIENT TRACKING ON REDIRECT <its id>`, so
//! Redis pushes the name of every key this process read once that key changes, expires, is
//! evicted or deleted (and a flush on `FLUSHALL`); the record is dropped when the message
//! arrives. A read that raced an invalidation is not kept (an epoch bumped before every removal
//! decides), a kept record also expires with the key's own `PTTL`, read with it, and losing the
//! tracking connection (closed, or a `PING` unanswered within the timeout, checked every second)
//! drops everything until a new one is made and every data connection points at it. Redis
//! tracks keys per data connection, so losing one of those drops everything too; they are
//! checked with a `PING` every second as well, since hot hits never use them (which also keeps a
//! server's idle `timeout` from closing them). The tracking connection and the data connections
//! must reach the same server: after `READONLY` (a failover behind one address), or when
//! `CLIENT TRACKING` is answered with an error that is not a refusal (the redirect id unknown
//! there), everything kept is dropped and a new tracking connection is made. Our own
//! writes and invalidations drop our copies at once. The remaining window: after another
//! instance writes a key, this one may serve the old record until Redis's message arrives (on
//! loopback well under a millisecond), as a `GET` racing that write would.
//!
//! Costs: a miss that will be kept reads the key's `PTTL` with it (one pipeline, one round
//! trip); Redis remembers the keys each connection read (its `tracking-table-max-keys`, one
//! million by default, bounds that; past it Redis invalidates the oldest); and a key served
//! only from near caches is not touched in Redis, so an `allkeys-lru` Redis may evict it first
//! (which invalidates it: one more fill, nothing wrong served). Redis >= 6; on a server without
//! `CLIENT TRACKING` the near cache stays empty and every read goes to Redis.
//!
//! # Examples
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_stampede::backend::redis::RedisBackend;
//! use tower_stampede::{Fill, Stampede, Ttl};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = RedisBackend::builder("redis://127.0.0.1:6379/0")
//!     .prefix("myapp:")
//!     .connections(1)
//!     .build()?;
//! let engine = Stampede::new(backend);
//! let served = engine
//!     .get_or_fill("user:42", || async {
//!         Ok::<_, std::io::Error>(Fill::store("Ada", Ttl::fresh(Duration::from_secs(60))))
//!     })
//!     .await?;
//! assert_eq!(&served.value[..], b"Ada");
//! # Ok(()) }
//! ```

mod near;
mod signals;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
pub use deadpool_redis;
pub use deadpool_redis::redis;

use self::near::{Near, Tracked};
use self::redis::aio::MultiplexedConnection;
use self::redis::{
    AsyncConnectionConfig, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisError, Script,
    ServerErrorKind, Value,
};
use self::signals::Signals;
use super::{
    Acquire, Backend, BackendError, BackendResult, BoxFuture, FencedWrite, Fetched, Signal,
    Subscription, Token, WriteOutcome,
};
use crate::entry::FORMAT_VERSION;
use crate::error::ConfigError;
use crate::key::{Digest, Prefix};

const COMMON_LUA: &str = include_str!("common.lua");
const ACQUIRE_LUA: &str = include_str!("acquire.lua");
const EXTEND_LUA: &str = include_str!("extend.lua");
const RELEASE_LUA: &str = include_str!("release.lua");
const FAIL_LUA: &str = include_str!("fail.lua");
const WRITE_LUA: &str = include_str!("write.lua");
const INVALIDATE_LUA: &str = include_str!("invalidate.lua");

/// After a failed attempt to connect, calls fail at once for this long instead of each trying
/// again (the engine fails open meanwhile; its breaker does the rest).
const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);
/// Longest TTL sent to Redis (about 300 years): far beyond any cache policy, far below the
/// overflow Redis rejects.
const MAX_TTL_MS: u64 = 10_000_000_000_000;

/// The Redis backend. Cloning shares the connections. See the [module docs](self).
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: deadpool_redis::Pool,
    held: Box<[Held]>,
    rr: AtomicUsize,
    next_id: AtomicU64,
    prefix: Prefix,
    scripts: Scripts,
    publish: &'static str,
    timeout: Duration,
    fence_ttl_ms: u64,
    max_record_bytes: usize,
    signals: Option<Arc<Signals>>,
    near: Option<Arc<Near>>,
    /// Whether the held-connection watch of the near cache runs.
    watching: AtomicBool,
    policy_checked: AtomicBool,
}

/// A held connection: its id, the connection, and where it reports the keys it reads.
#[derive(Clone)]
struct Live {
    id: u64,
    conn: MultiplexedConnection,
    tracked: Arc<Tracked>,
}

/// One held multiplexed connection (or the hole where a broken one was).
struct Held {
    conn: Mutex<Option<Live>>,
    /// Serialises (re)connecting this slot; holds the time of the last failed attempt.
    connecting: Arc<tokio::sync::Mutex<Option<Instant>>>,
}

struct Scripts {
    acquire: Lua,
    extend: Lua,
    release: Lua,
    fail: Lua,
    write: Lua,
    invalidate: Lua,
}

/// A script's source and its SHA1 (redis-rs's `Script` does not hand its source back).
struct Lua {
    code: String,
    script: Script,
}

impl Scripts {
    fn new(publish: &str) -> Self {
        let build = |body: &str| {
            let code = format!("{COMMON_LUA}\n{body}")
                .replace("{{MAGIC}}", &format!("TS{FORMAT_VERSION}"))
                .replace("{{PUBLISH}}", publish);
            let script = Script::new(&code);
            Lua { code, script }
        };
        Scripts {
            acquire: build(ACQUIRE_LUA),
            extend: build(EXTEND_LUA),
            release: build(RELEASE_LUA),
            fail: build(FAIL_LUA),
            write: build(WRITE_LUA),
            invalidate: build(INVALIDATE_LUA),
        }
    }

    fn all(&self) -> [&Lua; 6] {
        [
            &self.acquire,
            &self.extend,
            &self.release,
            &self.fail,
            &self.write,
            &self.invalidate,
        ]
    }
}

enum Source {
    Info(Box<Result<ConnectionInfo, String>>),
    Pool(deadpool_redis::Pool),
}

/// Builds a [`RedisBackend`]; see [`RedisBackend::builder`] and [`RedisBackend::builder_with_pool`].
#[must_use]
pub struct RedisBackendBuilder {
    source: Source,
    pubsub: Option<Result<ConnectionInfo, String>>,
    prefix: Result<Prefix, ConfigError>,
    connections: usize,
    timeout: Duration,
    fence_ttl: Duration,
    max_record_bytes: usize,
    sharded: bool,
    near_cache: usize,
}

impl fmt::Debug for RedisBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackendBuilder")
            .field("prefix", &self.prefix)
            .field("connections", &self.connections)
            .field("timeout", &self.timeout)
            .field("sharded_pubsub", &self.sharded)
            .field("near_cache", &self.near_cache)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// A builder for a backend on the server at `url`: `redis://[user:password@]host:port[/db]`
    /// (or a `redis::ConnectionInfo`). The URL is checked by [`RedisBackendBuilder::build`].
    pub fn builder(url: impl IntoConnectionInfo) -> RedisBackendBuilder {
        let info = url.into_connection_info().map_err(|e| e.to_string());
        RedisBackendBuilder::new(Source::Info(Box::new(info.clone())), Some(info))
    }

    /// A builder for a backend that makes its connections from your pool.
    ///
    /// A pool does not reveal where it connects, so signals (pub/sub wake-ups) need
    /// [`RedisBackendBuilder::pubsub`]; without it waiters poll (with backoff) instead of being
    /// woken, and the backend still publishes for instances that do subscribe.
    pub fn builder_with_pool(pool: deadpool_redis::Pool) -> RedisBackendBuilder {
        RedisBackendBuilder::new(Source::Pool(pool), None)
    }

    /// A backend on `url` with the defaults, connections made lazily.
    pub fn new(url: impl IntoConnectionInfo) -> Result<Self, ConfigError> {
        Self::builder(url).build()
    }

    /// The key prefix (every key is `<prefix>{<digest>}:<part>`).
    pub fn prefix(&self) -> &Prefix {
        &self.inner.prefix
    }

    /// One of the held multiplexed connections (round-robin), made if needed: for your own
    /// commands next to the cache's, without a pool checkout.
    pub async fn connection(&self) -> BackendResult<MultiplexedConnection> {
        self.inner.conn().await.map(|(_, live)| live.conn)
    }

    /// Makes every held connection now (and loads the scripts, and checks the eviction policy),
    /// then checks that the ACL lets the user read and write keys under the prefix, publish on
    /// its channels and run what the scripts run (a read; a `SET .. XX`, `DEL`, `PEXPIRE` and
    /// `PTTL` of a key that never exists; `TIME`; a publish nobody hears); a
    /// refusal is [`BackendError::is_config_rejected`]. A Redis refusing writes for another
    /// reason (full, a read-only replica) passes. With a near cache, also makes its tracking
    /// connection (best effort: without it the near cache stays empty and every read goes to
    /// Redis).
    pub async fn warm_up(&self) -> BackendResult<()> {
        if let Some(near) = &self.inner.near {
            near.connect().await;
            self.inner.watch_held();
        }
        let mut first = None;
        for i in 0..self.inner.held.len() {
            let mut live = self.inner.reconnect(i, true).await?;
            if let Some(near) = &self.inner.near {
                near.track(&live.tracked, &mut live.conn).await;
            }
            first.get_or_insert(live);
        }
        // One read under the prefix, writes and one publish: a user the ACL keeps from these
        // keys, lets only read them or keeps from our channels is refused now (`NOPERM`), not
        // on every fill. The write is a `SET .. XX` of a key no part of this backend uses
        // (`probe`), so it never exists and nothing is written, and the publish goes to a
        // channel nobody subscribes to; the ACL checks both all the same. Their other errors
        // (a full Redis refusing writes, a read-only replica) do not fail the warm-up: hits are
        // still served there, as they were before these probes.
        if let Some(mut live) = first {
            let slot = Digest::of_key("warm-up");
            redis::cmd("EXISTS")
                .arg(self.inner.prefix.entry(&slot))
                .query_async::<i64>(&mut live.conn)
                .await
                .map_err(|e| setup_err("EXISTS", e))?;
            let probe = self.inner.prefix.key(&slot, "probe");
            let mut set = redis::cmd("SET");
            set.arg(&probe).arg("").arg("XX").arg("PX").arg(1);
            let mut publish = redis::cmd(self.inner.publish);
            publish.arg(&probe).arg("");
            // And the other commands the scripts run, each a no-op on a key that does not
            // exist: an ACL that refuses one of them would fail every release or grant.
            let mut del = redis::cmd("DEL");
            del.arg(&probe);
            let mut pexpire = redis::cmd("PEXPIRE");
            pexpire.arg(&probe).arg(1);
            let mut pttl = redis::cmd("PTTL");
            pttl.arg(&probe);
            let probes = [
                ("SET", set),
                (self.inner.publish, publish),
                ("DEL", del),
                ("PEXPIRE", pexpire),
                ("PTTL", pttl),
                ("TIME", redis::cmd("TIME")),
            ];
            for (what, cmd) in probes {
                match cmd.query_async::<Value>(&mut live.conn).await {
                    Err(e) if refuses_setup(&e) => return Err(setup_err(what, e)),
                    Err(e) => tracing::debug!(error = %e, "redis {what} probe at warm-up"),
                    Ok(_) => {}
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.inner.prefix.as_str())
            .field("connections", &self.inner.held.len())
            .field("signals", &self.inner.signals.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisBackendBuilder {
    fn new(source: Source, pubsub: Option<Result<ConnectionInfo, String>>) -> Self {
        RedisBackendBuilder {
            source,
            pubsub,
            prefix: Ok(Prefix::default()),
            connections: 1,
            timeout: Duration::from_secs(1),
            fence_ttl: Duration::from_secs(24 * 3600),
            max_record_bytes: 512 * 1024 * 1024 - 64 * 1024,
            sharded: true,
            near_cache: 0,
        }
    }

    /// The key prefix (default `ts:`), validated by [`Prefix::new`]; an invalid one is reported
    /// by [`build`](Self::build).
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = Prefix::new(prefix);
        self
    }

    /// How many multiplexed connections to hold (default 1, at least 1). Each one pipelines
    /// every concurrent command, so one is usually best: with one, every write and read carries
    /// more commands (hot-key hits through the caching proxy, 64 clients, 2 cores, six
    /// interleaved 8 s rounds: one connection 54.7k req/s on average, two 46.4k). More than one
    /// keeps a large value in transit from delaying the small commands queued behind it.
    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n.max(1);
        self
    }

    /// The connect and response timeout of the connections this backend makes (default 1 s).
    /// The engine's own per-call timeout (`Config::backend_timeout`) is usually the shorter one.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d.max(Duration::from_millis(1));
        self
    }

    /// How long a key's fence counter outlives its last grant or write (default 1 day).
    pub fn fence_ttl(mut self, d: Duration) -> Self {
        self.fence_ttl = d;
        self
    }

    /// The largest record (entry or variant) sent to Redis; larger writes return
    /// [`WriteOutcome::TooLarge`]. Keep it at or below the server's `proto-max-bulk-len`.
    pub fn max_record_bytes(mut self, n: usize) -> Self {
        self.max_record_bytes = n;
        self
    }

    /// Sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`, Redis >= 7; the default) or plain
    /// `PUBLISH`/`SUBSCRIBE` (Redis 6, or when a Cluster's broadcast does not matter).
    pub fn sharded_pubsub(mut self, on: bool) -> Self {
        self.sharded = on;
        self
    }

    /// Keeps up to `bytes` of records read from Redis in process, so a hot key's hits cost no
    /// round trip; 0 (the default) turns it off. Coherent through Redis's server-assisted
    /// client-side caching (`CLIENT TRACKING ... REDIRECT`, Redis >= 6): Redis tells this process
    /// when a key it read changes, expires, is evicted or deleted, and the record is dropped; if
    /// the connection carrying those messages is lost, everything is dropped until it is back.
    /// After another instance writes a key, this one may serve the old record for the time
    /// Redis's message takes to arrive (the same window as a read racing that write). See the
    /// [module docs](self#near-cache). Needs [`RedisBackend::builder`] (a URL), or
    /// [`pubsub`](Self::pubsub) pointing at the same server as the pool.
    pub fn near_cache(mut self, bytes: usize) -> Self {
        self.near_cache = bytes;
        self
    }

    /// Where the subscriber connection goes (a URL or `redis::ConnectionInfo`). Set by
    /// [`RedisBackend::builder`]; needed with [`RedisBackend::builder_with_pool`] for signals.
    /// The subscriber always speaks RESP3 (Redis >= 6).
    pub fn pubsub(mut self, url: impl IntoConnectionInfo) -> Self {
        self.pubsub = Some(url.into_connection_info().map_err(|e| e.to_string()));
        self
    }

    /// Builds the backend. Connects lazily: no I/O here, so an engine can start while Redis is
    /// down. Needs a Tokio runtime when used.
    pub fn build(self) -> Result<RedisBackend, ConfigError> {
        let prefix = self.prefix?;
        // redis-rs builds its rustls config with the process-wide default provider; make sure
        // there is one (ours, unless the application installed another first).
        #[cfg(feature = "redis-tls")]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let conn_cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let near_info = match (&self.source, &self.pubsub) {
            // A URL that does not parse is the error to report, not the near cache's.
            (Source::Info(info), _) => Some(
                info.as_ref()
                    .clone()
                    .map_err(|e| ConfigError::new(format!("redis URL: {e}")))?,
            ),
            (Source::Pool(_), Some(p)) => p.clone().ok(),
            (Source::Pool(_), None) => None,
        };
        let near = match (self.near_cache, near_info) {
            (0, _) => None,
            (bytes, Some(info)) => Some(
                Near::new(info, bytes, self.timeout)
                    .map_err(|e| ConfigError::new(format!("redis near cache: {e}")))?,
            ),
            (_, None) => {
                return Err(ConfigError::new(
                    "redis near cache: a backend built from a pool needs `pubsub(url)` (the \
                     same server) for its tracking connection",
                ))
            }
        };
        let pool = match self.source {
            Source::Pool(p) => p,
            Source::Info(info) => {
                let info = (*info).map_err(|e| ConfigError::new(format!("redis URL: {e}")))?;
                let manager = deadpool_redis::Manager::new_with_config(info, conn_cfg)
                    .map_err(|e| ConfigError::new(format!("redis URL: {e}")))?;
                deadpool_redis::Pool::builder(manager)
                    .max_size(self.connections)
                    .runtime(deadpool_redis::Runtime::Tokio1)
                    .build()
                    .map_err(|e| ConfigError::new(format!("redis pool: {e}")))?
            }
        };
        let signals = match self.pubsub {
            None => None,
            Some(info) => {
                let info = info.map_err(|e| ConfigError::new(format!("redis pubsub URL: {e}")))?;
                Some(
                    Signals::new(info, self.sharded, self.timeout)
                        .map_err(|e| ConfigError::new(format!("redis pubsub URL: {e}")))?,
                )
            }
        };
        let publish = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                pool,
                held: (0..self.connections)
                    .map(|_| Held {
                        conn: Mutex::new(None),
                        connecting: Arc::new(tokio::sync::Mutex::new(None)),
                    })
                    .collect(),
                rr: AtomicUsize::new(0),
                next_id: AtomicU64::new(1),
                prefix,
                scripts: Scripts::new(publish),
                publish,
                timeout: self.timeout,
                fence_ttl_ms: ttl_ms(self.fence_ttl),
                max_record_bytes: self.max_record_bytes,
                signals,
                near,
                watching: AtomicBool::new(false),
                policy_checked: AtomicBool::new(false),
            }),
        })
    }

    /// Builds the backend and makes its connections now ([`RedisBackend::warm_up`]): fails if
    /// Redis cannot be reached, or refuses the URL's password, database or the ACL our keys
    /// and channels need ([`BackendError::is_config_rejected`]).
    pub async fn connect(self) -> BackendResult<RedisBackend> {
        let b = self
            .build()
            .map_err(|e| BackendError::with_source("redis backend configuration", e))?;
        b.warm_up().await?;
        Ok(b)
    }
}

/// A client for `info` that speaks RESP3 (push messages: signals, invalidations).
fn resp3_client(info: ConnectionInfo) -> Result<redis::Client, RedisError> {
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    redis::Client::open(info.set_redis_settings(settings))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data is a connection handle or a map; a panic elsewhere cannot leave it in a
    // state worse than "reconnect".
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Milliseconds for a TTL: rounded up (a sub-millisecond TTL is not zero, which Redis rejects),
/// at least 1, capped.
fn ttl_ms(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    (ms.min(u128::from(MAX_TTL_MS)) as u64).max(1)
}

fn fence20(f: u64) -> String {
    format!("{f:020}")
}

/// Whether a connection's setup (`AUTH`, `SELECT`, `SCRIPT LOAD`, the warm-up read) failed because the server
/// refuses this client's configuration: a wrong or missing password, a database that does not
/// exist, a command the user may not run. That is an answer, not a network fault or a passing
/// state, so trying again cannot help. Only errors known to be such count: redis-rs reports a
/// failed `SELECT` as `ERR` whatever the server said (`BUSY` running a script, say), so there
/// the message decides, and a state that passes must never stop a start.
fn refuses_setup(e: &RedisError) -> bool {
    const REFUSALS: [&str; 3] = ["NOAUTH", "WRONGPASS", "NOPERM"];
    match e.kind() {
        // redis-rs's reading of a refused `AUTH` (`AUTH` is answered even while Redis is
        // loading or busy).
        ErrorKind::AuthenticationFailed => true,
        // A refusal of its own (`NOPERM` on our keys), or `SELECT` of a database that does not
        // exist, or `SELECT` on a cluster node.
        ErrorKind::Server(_) => {
            e.code().is_some_and(|c| REFUSALS.contains(&c))
                || e.detail().is_some_and(|d| {
                    d.contains("DB index is out of range")
                        || d.contains("not allowed in cluster mode")
                })
        }
        // A pipeline's (`SCRIPT LOAD`'s) errors keep their codes.
        _ => e
            .clone()
            .into_server_errors()
            .is_some_and(|errs| errs.iter().any(|(_, s)| REFUSALS.contains(&s.code()))),
    }
}

/// An error of a connection's setup, marked when the server refuses the configuration.
fn setup_err(what: &str, e: RedisError) -> BackendError {
    let rejected = refuses_setup(&e);
    let err = redis_err(what, e);
    if rejected {
        err.config_rejected()
    } else {
        err
    }
}

fn redis_err(what: &str, e: RedisError) -> BackendError {
    BackendError::with_source(format!("redis {what}"), e)
}

fn unexpected(what: &str, v: &Value) -> BackendError {
    BackendError::new(format!("redis {what}: unexpected reply {v:?}"))
}

/// A reply that must be bytes or nil.
fn bytes_of(what: &str, v: Value) -> BackendResult<Option<Bytes>> {
    match v {
        Value::Nil => Ok(None),
        Value::BulkString(b) => Ok(Some(Bytes::from(b))),
        Value::SimpleString(s) => Ok(Some(Bytes::from(s))),
        other => Err(unexpected(what, &other)),
    }
}

fn int_of(what: &str, v: &Value) -> BackendResult<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(unexpected(what, other)),
    }
}

impl Inner {
    /// A held connection, round-robin. A broken slot is replaced in the background while the
    /// call uses a live one; with none live, this call (re)connects.
    async fn conn(self: &Arc<Self>) -> BackendResult<(usize, Live)> {
        let n = self.held.len();
        let start = self.rr.fetch_add(1, Ordering::Relaxed) % n;
        if let Some(live) = lock(&self.held[start].conn).clone() {
            return Ok((start, live));
        }
        for k in 1..n {
            let i = (start + k) % n;
            if let Some(live) = lock(&self.held[i].conn).clone() {
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    let this = self.clone();
                    handle.spawn(async move {
                        let _ = this.reconnect(start, false).await;
                    });
                }
                return Ok((i, live));
            }
        }
        // On a task of its own: a caller gives up at the engine's per-call timeout, and a
        // connection whose setup (dial, TLS, AUTH, the scripts) takes longer than that would
        // otherwise be dropped half-made by every caller in turn, and never be made. The task
        // finishes it (bounded by this backend's own connect and response timeouts) for the
        // callers after. Only one at a time: while one runs, a caller waits for it (within its
        // own timeout) instead of queueing a task of its own, so an outage under load does not
        // pile up tasks that outlive their callers.
        let idle = self.held[start].connecting.clone().try_lock_owned();
        let live = match (tokio::runtime::Handle::try_current(), idle) {
            (Ok(handle), Ok(guard)) => {
                let this = self.clone();
                handle
                    .spawn(async move { this.reconnect_locked(start, false, guard).await })
                    .await
                    .map_err(|e| BackendError::with_source("redis connect", e))??
            }
            _ => self.reconnect(start, false).await?,
        };
        Ok((start, live))
    }

    /// Makes slot `i`'s connection if it has none. `force` ignores the failure backoff.
    async fn reconnect(&self, i: usize, force: bool) -> BackendResult<Live> {
        let guard = self.held[i].connecting.clone().lock_owned().await;
        self.reconnect_locked(i, force, guard).await
    }

    /// [`reconnect`](Self::reconnect) with slot `i`'s connecting lock held.
    async fn reconnect_locked(
        &self,
        i: usize,
        force: bool,
        mut last_failure: tokio::sync::OwnedMutexGuard<Option<Instant>>,
    ) -> BackendResult<Live> {
        let held = &self.held[i];
        if let Some(live) = lock(&held.conn).clone() {
            return Ok(live);
        }
        if let Some(t) = *last_failure {
            if !force && t.elapsed() < RECONNECT_BACKOFF {
                return Err(BackendError::new("redis: not connected (reconnecting)"));
            }
        }
        match self.make_conn().await {
            Ok(mut conn) => {
                let tracked = Arc::new(Tracked::default());
                if let Some(near) = &self.near {
                    near.track(&tracked, &mut conn).await;
                }
                let live = Live {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    conn,
                    tracked,
                };
                *lock(&held.conn) = Some(live.clone());
                *last_failure = None;
                Ok(live)
            }
            Err(e) => {
                *last_failure = Some(Instant::now());
                Err(e)
            }
        }
    }

    /// One new connection from the pool, taken out of it, with the scripts loaded.
    async fn make_conn(&self) -> BackendResult<MultiplexedConnection> {
        let obj = match tokio::time::timeout(self.timeout, self.pool.get()).await {
            Ok(Ok(obj)) => obj,
            Ok(Err(e)) => {
                let rejected =
                    matches!(&e, deadpool_redis::PoolError::Backend(re) if refuses_setup(re));
                let err = BackendError::with_source("redis connect", e);
                return Err(if rejected { err.config_rejected() } else { err });
            }
            Err(_) => {
                return Err(BackendError::new(format!(
                    "redis connect: timed out after {:?}",
                    self.timeout
                )))
            }
        };
        let mut conn = deadpool_redis::Connection::take(obj);
        conn.set_response_timeout(self.timeout);
        // Load every script now, in one round trip, so the steady state is EVALSHA alone.
        let mut pipe = redis::pipe();
        for s in self.scripts.all() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(&s.code).ignore();
        }
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| setup_err("SCRIPT LOAD", e))?;
        if !self.policy_checked.swap(true, Ordering::Relaxed) {
            check_eviction_policy(&mut conn).await;
        }
        Ok(conn)
    }

    /// Forgets a connection that cannot be used again (dropped, or a replica after a failover).
    fn on_error(&self, i: usize, id: u64, e: &RedisError) {
        let read_only = e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly);
        if e.is_unrecoverable_error() || read_only {
            self.drop_conn(i, id);
        }
        if read_only {
            // A failover: the next connection may reach another server than the tracking one.
            if let Some(near) = &self.near {
                near.reset();
            }
        }
    }

    /// Forgets held connection `id` in slot `i`. Redis tracked the keys read on it for this
    /// connection alone, and will not tell anyone when they change now: with a near cache,
    /// everything it kept goes too.
    fn drop_conn(&self, i: usize, id: u64) {
        let mut slot = lock(&self.held[i].conn);
        if matches!(&*slot, Some(cur) if cur.id == id) {
            if let Some(cur) = slot.take() {
                cur.tracked.retire();
            }
            drop(slot);
            if let Some(near) = &self.near {
                near.flush();
            }
        }
    }

    /// With a near cache: starts (once) the task that checks every held connection each
    /// second, so one that died while hot hits never used it is noticed, and what it kept
    /// dropped, within about a second (and a server's idle `timeout` never closes it).
    fn watch_held(self: &Arc<Self>) {
        // A load first: this runs on every read from Redis, and a swap would write the shared
        // cache line each time.
        if self.near.is_none()
            || self.watching.load(Ordering::Acquire)
            || self.watching.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.watching.store(false, Ordering::Release);
            return;
        };
        handle.spawn(watch_held(Arc::downgrade(self)));
    }

    /// A reply from held connection `id` in slot `i`: an error also tells the slot (see
    /// [`on_error`](Self::on_error)).
    fn checked<T>(
        &self,
        i: usize,
        id: u64,
        what: &str,
        res: Result<T, RedisError>,
    ) -> BackendResult<T> {
        res.map_err(|e| {
            self.on_error(i, id, &e);
            redis_err(what, e)
        })
    }

    /// `EVALSHA`, loading the script and retrying once on `NOSCRIPT`.
    async fn eval(
        self: &Arc<Self>,
        what: &str,
        lua: &Lua,
        keys: &[&str],
        args: &[&[u8]],
    ) -> BackendResult<Value> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(lua.script.get_hash()).arg(keys.len());
        for k in keys {
            cmd.arg(*k);
        }
        for a in args {
            cmd.arg(*a);
        }
        let (
            i,
            Live {
                id, conn: mut c, ..
            },
        ) = self.conn().await?;
        let first = cmd.query_async::<Value>(&mut c).await;
        let res = match first {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                match lua.script.load_async(&mut c).await {
                    Ok(_) => cmd.query_async::<Value>(&mut c).await,
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        self.checked(i, id, what, res)
    }
}

/// See [`Inner::watch_held`]: ends when the backend is dropped.
async fn watch_held(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(near::PING_EVERY).await;
        let Some(this) = inner.upgrade() else {
            return;
        };
        let lives: Vec<(usize, Live)> = (0..this.held.len())
            .filter_map(|i| lock(&this.held[i].conn).clone().map(|l| (i, l)))
            .collect();
        for (i, mut live) in lives {
            if !answers_ping(&mut live.conn, this.timeout).await {
                tracing::debug!("redis: a held connection did not answer PING; replacing it");
                this.drop_conn(i, live.id);
            }
        }
    }
}

/// Whether `conn` answers a `PING` within `timeout`.
async fn answers_ping(conn: &mut MultiplexedConnection, timeout: Duration) -> bool {
    let ping = redis::cmd("PING");
    matches!(
        tokio::time::timeout(timeout, ping.query_async::<Value>(conn)).await,
        Ok(Ok(_))
    )
}

async fn check_eviction_policy(conn: &mut MultiplexedConnection) {
    let reply = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async::<Value>(conn)
        .await;
    let value = match reply {
        Ok(Value::Array(items)) => items.into_iter().nth(1),
        Ok(Value::Map(pairs)) => pairs.into_iter().next().map(|(_, v)| v),
        // CONFIG may be renamed or denied (managed Redis): not our business to fail on.
        _ => None,
    };
    let policy = match value {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
        Some(Value::SimpleString(s)) => s,
        _ => return,
    };
    if policy.starts_with("volatile-") || policy.starts_with("allkeys-") {
        tracing::warn!(
            maxmemory_policy = %policy,
            "Redis may evict tower-stampede leases under this maxmemory-policy: a lease lost \
             to eviction costs an extra fill (fences keep the stored value correct); \
             `noeviction` or enough memory avoids it"
        );
    }
}

/// A key of another type than string under our prefix (foreign data, or a damaged store):
/// `GET` of it is the server's `WRONGTYPE` error, which says nothing of the server's health, so
/// it reads as absent, as the scripts' `get` reads it. A miss then fills, and the fill's `SET`
/// replaces the key. (`MGET` answers nil for such a key by itself.) Counted as an error, it
/// would fail the URL open for good and, repeated, open the breaker for every key.
/// In a pipeline (the near cache's `GET` and `PTTL`), every failed command must be that.
fn foreign_type<T>(res: &Result<T, RedisError>) -> bool {
    let Err(e) = res else { return false };
    e.clone()
        .into_server_errors()
        .is_some_and(|errs| !errs.is_empty() && errs.iter().all(|(_, s)| s.code() == "WRONGTYPE"))
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn fetch<'a>(
        &'a self,
        slot: &'a Digest,
        variant: Option<&'a Digest>,
    ) -> BoxFuture<'a, BackendResult<Fetched>> {
        Box::pin(async move {
            let inner = &self.inner;
            let p = &inner.prefix;
            let entry_key = p.entry(slot);
            let variant_key = variant.map(|vd| p.variant(slot, vd));
            if let Some(near) = &inner.near {
                let kept =
                    crate::backend::near::kept(|k| near.get(k), &entry_key, variant_key.as_deref());
                if let Some(f) = kept {
                    return Ok(f);
                }
            }
            let (i, mut live) = inner.conn().await?;
            // With a near cache and a connection pointed at the live tracking connection: the
            // tickets of the keys read, taken before the read is sent.
            let keep = match &inner.near {
                None => None,
                Some(near) => {
                    near.kick();
                    inner.watch_held();
                    match near.ticket(&live.tracked, &entry_key) {
                        None => {
                            near.track(&live.tracked, &mut live.conn).await;
                            None
                        }
                        Some(e) => {
                            let v = variant_key
                                .as_deref()
                                .and_then(|k| near.ticket(&live.tracked, k));
                            Some((near, e, v, &live.tracked))
                        }
                    }
                }
            };
            if let Some((near, entry_ticket, variant_ticket, tracked)) = keep {
                // A read to keep: with each key's remaining TTL, so a kept record expires
                // when Redis's does (Redis's own message comes only when it deletes the key).
                let mut pipe = redis::pipe();
                pipe.cmd("GET").arg(&entry_key).cmd("PTTL").arg(&entry_key);
                if let Some(vk) = &variant_key {
                    pipe.cmd("GET").arg(vk).cmd("PTTL").arg(vk);
                }
                // The TTL counts from before the read: a kept copy never outlives the key.
                let sent_at = Instant::now();
                let id = live.id;
                let res = pipe.query_async::<Vec<Value>>(&mut live.conn).await;
                if foreign_type(&res) {
                    return Ok(Fetched::default());
                }
                let replies = inner.checked(i, id, "GET", res)?;
                let mut it = replies.into_iter();
                let mut take = |key: &str, ticket: Option<near::Ticket>| {
                    let (Some(v), Some(ttl)) = (it.next(), it.next()) else {
                        return Err(BackendError::new("redis GET: short pipeline reply"));
                    };
                    let v = bytes_of("GET", v)?;
                    if let (Some(bytes), Value::Int(ms), Some(t)) = (&v, ttl, ticket) {
                        // -1: no expiry; -2: gone since the GET (not kept).
                        let until = match ms {
                            -1 => Some(None),
                            ms if ms >= 0 => sent_at
                                .checked_add(Duration::from_millis(ms as u64))
                                .map(Some),
                            _ => None,
                        };
                        if let Some(until) = until {
                            near.put(t, tracked, key, bytes, until);
                        }
                    }
                    Ok(v)
                };
                let entry = take(&entry_key, Some(entry_ticket))?;
                let variant = match &variant_key {
                    Some(vk) => take(vk, variant_ticket)?,
                    None => None,
                };
                return Ok(Fetched { entry, variant });
            }
            let fetched = match &variant_key {
                None => {
                    let mut cmd = redis::cmd("GET");
                    cmd.arg(&entry_key);
                    let res = cmd.query_async::<Value>(&mut live.conn).await;
                    if foreign_type(&res) {
                        return Ok(Fetched::default());
                    }
                    let v = inner.checked(i, live.id, "GET", res)?;
                    Fetched {
                        entry: bytes_of("GET", v)?,
                        variant: None,
                    }
                }
                Some(vk) => {
                    let mut cmd = redis::cmd("MGET");
                    cmd.arg(&entry_key).arg(vk);
                    let res = cmd.query_async::<Value>(&mut live.conn).await;
                    match inner.checked(i, live.id, "MGET", res)? {
                        Value::Array(items) if items.len() == 2 => {
                            let mut it = items.into_iter();
                            let (Some(e), Some(v)) = (it.next(), it.next()) else {
                                return Err(BackendError::new("redis MGET: short reply"));
                            };
                            Fetched {
                                entry: bytes_of("MGET", e)?,
                                variant: bytes_of("MGET", v)?,
                            }
                        }
                        other => return Err(unexpected("MGET", &other)),
                    }
                }
            };
            Ok(fetched)
        })
    }

    fn try_acquire<'a>(
        &'a self,
        slot: &'a Digest,
        ttl: Duration,
        seen_fence: u64,
    ) -> BoxFuture<'a, BackendResult<Acquire>> {
        Box::pin(async move {
            let inner = &self.inner;
            let p = &inner.prefix;
            let token = Token::random();
            let lease_ms = ttl_ms(ttl);
            let counter_ms = inner.fence_ttl_ms.max(lease_ms);
            let (lease, fence, entry) = (p.lease(slot), p.fence(slot), p.entry(slot));
            let v = inner
                .eval(
                    "acquire",
                    &inner.scripts.acquire,
                    &[&lease, &fence, &entry],
                    &[
                        &token.to_hex(),
                        lease_ms.to_string().as_bytes(),
                        fence20(seen_fence).as_bytes(),
                        counter_ms.to_string().as_bytes(),
                    ],
                )
                .await?;
            let Value::Array(items) = &v else {
                return Err(unexpected("acquire", &v));
            };
            match items.as_slice() {
                [code, pttl, failed] if int_of("acquire", code)? == 0 => Ok(Acquire::Held {
                    remaining: Duration::from_millis(int_of("acquire", pttl)?.max(0) as u64),
                    failed: int_of("acquire", failed)? == 1,
                }),
                [code, fence] if int_of("acquire", code)? == 1 => {
                    let fence = int_of("acquire", fence)?;
                    if fence < 1 {
                        return Err(unexpected("acquire", &v));
                    }
                    Ok(Acquire::Acquired {
                        token,
                        fence: fence as u64,
                    })
                }
                [code] if int_of("acquire", code)? == 2 => {
                    // Redis has a newer entry than the one we saw: if ours came from the near
                    // cache, its invalidation is on the way; do not read the old one again.
                    if let Some(near) = &inner.near {
                        near.forget(&entry);
                    }
                    Ok(Acquire::Refreshed)
                }
                _ => Err(unexpected("acquire", &v)),
            }
        })
    }

    fn extend<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        Box::pin(async move {
            let inner = &self.inner;
            let lease = inner.prefix.lease(slot);
            let v = inner
                .eval(
                    "extend",
                    &inner.scripts.extend,
                    &[&lease],
                    &[&token.to_hex(), ttl_ms(ttl).to_string().as_bytes()],
                )
                .await?;
            Ok(int_of("extend", &v)? == 1)
        })
    }

    fn release<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        signal: Signal,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        Box::pin(async move {
            let inner = &self.inner;
            let lease = inner.prefix.lease(slot);
            let channel = inner.prefix.channel(slot);
            let v = inner
                .eval(
                    "release",
                    &inner.scripts.release,
                    &[&lease],
                    &[
                        &token.to_hex(),
                        channel.as_bytes(),
                        signal.as_str().as_bytes(),
                    ],
                )
                .await?;
            Ok(int_of("release", &v)? == 1)
        })
    }

    fn write(&self, w: FencedWrite) -> BoxFuture<'_, BackendResult<WriteOutcome>> {
        Box::pin(async move {
            let inner = &self.inner;
            let too_large = w.entry.len() > inner.max_record_bytes
                || w.variant
                    .as_ref()
                    .is_some_and(|(_, b)| b.len() > inner.max_record_bytes);
            if too_large {
                // Nothing written, lease untouched, no signal: the engine stores a pass marker.
                return Ok(WriteOutcome::TooLarge);
            }
            let p = &inner.prefix;
            let (entry, lease, fence) = (p.entry(&w.slot), p.lease(&w.slot), p.fence(&w.slot));
            let channel = p.channel(&w.slot);
            let variant_key = w.variant.as_ref().map(|(vd, _)| p.variant(&w.slot, vd));
            let counter_ms = inner.fence_ttl_ms.to_string();
            let fence_s = fence20(w.fence);
            let token = w.token.to_hex();
            let entry_ttl = ttl_ms(w.entry_ttl).to_string();
            let variant_ttl = ttl_ms(w.variant_ttl).to_string();
            let mut keys: Vec<&str> = vec![&entry, &lease, &fence];
            let mut args: Vec<&[u8]> = vec![
                fence_s.as_bytes(),
                &token,
                &w.entry,
                entry_ttl.as_bytes(),
                if w.release { b"1" } else { b"0" },
                channel.as_bytes(),
                w.signal.as_str().as_bytes(),
                counter_ms.as_bytes(),
            ];
            if let (Some(k), Some((_, b))) = (&variant_key, &w.variant) {
                keys.push(k);
                args.push(b);
                args.push(variant_ttl.as_bytes());
            }
            let v = inner
                .eval("write", &inner.scripts.write, &keys, &args)
                .await;
            // Stored or fenced, our kept copies of these keys are out of date (Redis's
            // invalidation is on the way; this saves serving them until it arrives).
            if let Some(near) = &inner.near {
                near.forget(&entry);
                if let Some(k) = &variant_key {
                    near.forget(k);
                }
            }
            let v = v?;
            match int_of("write", &v)? {
                1 => Ok(WriteOutcome::Stored),
                0 => Ok(WriteOutcome::Fenced),
                _ => Err(unexpected("write", &v)),
            }
        })
    }

    fn invalidate<'a>(
        &'a self,
        slot: &'a Digest,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<u64>> {
        Box::pin(async move {
            let inner = &self.inner;
            let (entry, fence) = (inner.prefix.entry(slot), inner.prefix.fence(slot));
            let lease = inner.prefix.lease(slot);
            let v = inner
                .eval(
                    "invalidate",
                    &inner.scripts.invalidate,
                    &[&entry, &fence, &lease],
                    &[
                        ttl_ms(ttl).to_string().as_bytes(),
                        inner.fence_ttl_ms.to_string().as_bytes(),
                        inner.prefix.channel(slot).as_bytes(),
                        Signal::Released.as_str().as_bytes(),
                    ],
                )
                .await;
            if let Some(near) = &inner.near {
                near.forget(&entry);
            }
            let v = v?;
            match int_of("invalidate", &v)? {
                f if f >= 1 => Ok(f as u64),
                _ => Err(unexpected("invalidate", &v)),
            }
        })
    }

    fn fail<'a>(
        &'a self,
        slot: &'a Digest,
        token: Token,
        ttl: Duration,
    ) -> BoxFuture<'a, BackendResult<bool>> {
        Box::pin(async move {
            let inner = &self.inner;
            let lease = inner.prefix.lease(slot);
            let channel = inner.prefix.channel(slot);
            let v = inner
                .eval(
                    "fail",
                    &inner.scripts.fail,
                    &[&lease],
                    &[
                        &token.to_hex(),
                        ttl_ms(ttl).to_string().as_bytes(),
                        channel.as_bytes(),
                        Signal::Failed.as_str().as_bytes(),
                    ],
                )
                .await?;
            Ok(int_of("fail", &v)? == 1)
        })
    }

    fn subscribe<'a>(
        &'a self,
        slot: &'a Digest,
    ) -> BoxFuture<'a, BackendResult<Option<Subscription>>> {
        Box::pin(async move {
            match &self.inner.signals {
                None => Ok(None),
                Some(s) => s.subscribe(self.inner.prefix.channel(slot)).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_and_are_never_zero() {
        assert_eq!(ttl_ms(Duration::ZERO), 1);
        assert_eq!(ttl_ms(Duration::from_micros(1)), 1);
        assert_eq!(ttl_ms(Duration::from_micros(1500)), 2);
        assert_eq!(ttl_ms(Duration::from_secs(2)), 2000);
        assert_eq!(ttl_ms(Duration::MAX), MAX_TTL_MS);
    }

    #[test]
    fn scripts_are_templated() {
        let s = Scripts::new("SPUBLISH");
        for script in s.all() {
            assert!(!script.code.contains("{{"), "untemplated placeholder");
        }
        assert!(s.release.code.contains("'SPUBLISH'"));
        assert!(s.acquire.code.contains(&format!("'TS{FORMAT_VERSION}'")));
    }

    #[test]
    fn bad_prefix_and_url_are_config_errors() {
        assert!(RedisBackend::builder("redis://127.0.0.1:1")
            .prefix("a b")
            .build()
            .is_err());
        assert!(RedisBackend::builder("nonsense://x").build().is_err());
    }
}
