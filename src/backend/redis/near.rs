//! The near cache: records read from Redis kept in process, coherent through Redis's
//! server-assisted client-side caching (`CLIENT TRACKING ... REDIRECT`, Redis >= 6).
//!
//! One RESP3 connection per backend receives the invalidations. Each data connection (RESP2,
//! unchanged) is told `CLIENT TRACKING ON REDIRECT <that connection's id>`, so Redis remembers
//! every key it reads and, when one of them changes, expires, is evicted or deleted, pushes an
//! `invalidate` message to us; `FLUSHDB`/`FLUSHALL` push one that drops everything.
//!
//! **When a value is kept.** A read may race an invalidation of the key it read (the reply comes
//! on the data connection, the invalidation on ours). The store's epoch (see
//! [`NearStore`](crate::backend::near::NearStore)) and the tracking generation, both taken
//! before the read is sent, decide: its value is kept only if neither changed. A value is
//! therefore never kept past an invalidation sent after the read; at worst a hot key's value is
//! not kept this time and is read from Redis again.
//!
//! **When the tracking connection is lost** (closed, or a `PING` unanswered within the
//! backend's timeout, checked every second), everything is dropped and nothing is kept until a
//! new connection is made and each data connection has been pointed at it. The remaining
//! window is the delivery time of an invalidation: after another instance writes a key, this
//! process may serve the old record until Redis's message arrives (on loopback, well under a
//! millisecond), the same as a `GET` racing that write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::redis::aio::MultiplexedConnection;
use super::redis::{
    self, AsyncConnectionConfig, Client, ConnectionInfo, PushInfo, PushKind, RedisError, Value,
};
use super::RECONNECT_BACKOFF;
use crate::backend::near::{self, NearStore};

/// How often the tracking connection (and, with a near cache, every held data connection) is
/// checked with a `PING`.
pub(super) const PING_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Near {
    client: Client,
    timeout: Duration,
    store: NearStore,
    /// The generation of the live tracking connection; 0 while there is none.
    live: AtomicU64,
    next_gen: AtomicU64,
    /// The live tracking connection's Redis client id, with its generation.
    redirect: Mutex<Option<(u64, i64)>>,
    connecting: AtomicBool,
    last_failure: Mutex<Option<Instant>>,
    /// The server refused what the near cache needs (RESP3, `CLIENT ID`, `CLIENT TRACKING`:
    /// Redis < 6, or an ACL): it stays off, and nothing more is tried.
    unavailable: AtomicBool,
}

/// What a read remembers from before it was sent.
#[derive(Clone, Copy, Debug)]
pub(super) struct Ticket {
    generation: u64,
    store: near::Ticket,
}

/// Which tracking generation a data connection reports to (0: none yet, or retired).
#[derive(Debug, Default)]
pub(super) struct Tracked {
    generation: AtomicU64,
    busy: AtomicBool,
}

impl Tracked {
    /// The connection is being dropped: nothing read on it may be kept from now on (a read in
    /// flight on it would otherwise be kept after the flush that follows).
    pub(super) fn retire(&self) {
        self.generation.store(0, Ordering::SeqCst);
    }
}

/// A flag set while one task does something, cleared when that task is done or dropped.
struct Claim<'a>(&'a AtomicBool);

impl<'a> Claim<'a> {
    /// Sets `flag`, or `None` when another task holds it.
    fn take(flag: &'a AtomicBool) -> Option<Self> {
        // Not `then_some`: its argument is built either way, and a `Claim` dropped on the
        // refusal would clear the flag under the task that holds it.
        (!flag.swap(true, Ordering::AcqRel)).then(|| Claim(flag))
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Near {
    pub(super) fn new(
        info: ConnectionInfo,
        budget: usize,
        timeout: Duration,
    ) -> Result<Arc<Self>, RedisError> {
        let client = super::resp3_client(info)?;
        Ok(Arc::new(Near {
            client,
            timeout,
            store: NearStore::new(budget),
            live: AtomicU64::new(0),
            next_gen: AtomicU64::new(1),
            redirect: Mutex::new(None),
            connecting: AtomicBool::new(false),
            last_failure: Mutex::new(None),
            unavailable: AtomicBool::new(false),
        }))
    }

    /// A kept record, while the tracking connection is live.
    pub(super) fn get(&self, key: &str) -> Option<Bytes> {
        if self.live.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.store.get(key)
    }

    /// What a read on a connection tracked as `tracked` must remember; `None` when its value
    /// may not be kept (no live tracking connection, or this connection not yet pointed at it).
    pub(super) fn ticket(&self, tracked: &Tracked, key: &str) -> Option<Ticket> {
        let generation = self.live.load(Ordering::SeqCst);
        if generation == 0 || tracked.generation.load(Ordering::SeqCst) != generation {
            return None;
        }
        Some(Ticket {
            generation,
            store: self.store.ticket(key),
        })
    }

    /// Keeps `value` of `key` read under `ticket` on the connection tracked as `tracked`, until
    /// `until` (the key's expiry in Redis), unless anything was invalidated, the tracking
    /// connection changed, or that data connection was retired since.
    pub(super) fn put(
        &self,
        ticket: Ticket,
        tracked: &Tracked,
        key: &str,
        value: &Bytes,
        until: Option<Instant>,
    ) {
        if self.live.load(Ordering::SeqCst) != ticket.generation
            || tracked.generation.load(Ordering::SeqCst) != ticket.generation
        {
            return;
        }
        self.store.put(ticket.store, key, value, until);
    }

    /// Drops `key` (our own write or a refreshed entry: no need to wait for Redis's message).
    pub(super) fn forget(&self, key: &str) {
        self.store.forget(key);
    }

    /// Drops everything (a data connection that read some of it is gone).
    pub(super) fn flush(&self) {
        self.store.flush();
    }

    /// The live tracking connection's generation and client id.
    pub(super) fn redirect(&self) -> Option<(u64, i64)> {
        *lock(&self.redirect)
    }

    /// Points a data connection at the live tracking connection, once per generation. Called
    /// before a read whose connection is not yet tracked; the read itself is not kept.
    pub(super) async fn track(&self, tracked: &Tracked, conn: &mut MultiplexedConnection) {
        let Some((generation, id)) = self.redirect() else {
            return;
        };
        if tracked.generation.load(Ordering::SeqCst) == generation {
            return;
        }
        // Cleared on every way out, also when the caller gives up on the read (a timeout drops
        // this future at the await below): a flag left set would keep this connection from
        // ever being tracked, and the near cache from keeping anything read on it.
        let Some(_busy) = Claim::take(&tracked.busy) else {
            return;
        };
        let mut cmd = redis::cmd("CLIENT");
        cmd.arg("TRACKING").arg("ON").arg("REDIRECT").arg(id);
        match tokio::time::timeout(self.timeout, cmd.query_async::<Value>(conn)).await {
            Ok(Ok(_)) => tracked.generation.store(generation, Ordering::SeqCst),
            Ok(Err(e)) if refused(&e) => self.give_up(&e),
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
                ) =>
            {
                // An error reply that is not a refusal: most likely our tracking connection's id
                // does not exist on the server this connection reached (a failover behind one
                // address). Make a new tracking connection.
                tracing::debug!(error = %e, "redis CLIENT TRACKING failed; new tracking connection");
                self.broken(generation);
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "redis CLIENT TRACKING failed"),
            Err(_) => tracing::debug!("redis CLIENT TRACKING timed out"),
        }
    }

    /// Makes the tracking connection in the background when there is none (at most one attempt
    /// at a time, none within the reconnect backoff of a failure).
    pub(super) fn kick(self: &Arc<Self>) {
        if self.live.load(Ordering::Acquire) != 0
            || self.connecting.load(Ordering::Acquire)
            || self.unavailable.load(Ordering::Acquire)
        {
            return;
        }
        if let Some(t) = *lock(&self.last_failure) {
            if t.elapsed() < RECONNECT_BACKOFF {
                return;
            }
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        handle.spawn(async move { this.connect().await });
    }

    /// Makes the tracking connection now, unless there is one or another call is making it;
    /// true when there is one afterwards.
    pub(super) async fn connect(self: &Arc<Self>) -> bool {
        if self.live.load(Ordering::Acquire) != 0 {
            return true;
        }
        if self.unavailable.load(Ordering::Acquire) {
            return false;
        }
        // Cleared also when the caller gives up (`warm_up` under a timeout): left set, no
        // tracking connection would ever be made again and the near cache would stay empty.
        let Some(_connecting) = Claim::take(&self.connecting) else {
            return false;
        };
        let ok = self.make().await;
        *lock(&self.last_failure) = if ok { None } else { Some(Instant::now()) };
        ok
    }

    async fn make(self: &Arc<Self>) -> bool {
        let (tx, rx) = mpsc::unbounded_channel::<PushInfo>();
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_push_sender(tx);
        let made = tokio::time::timeout(self.timeout, async {
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await?;
            let id: i64 = redis::cmd("CLIENT")
                .arg("ID")
                .query_async(&mut conn)
                .await?;
            Ok::<_, RedisError>((conn, id))
        })
        .await;
        let (conn, id) = match made {
            Ok(Ok(x)) => x,
            Ok(Err(e)) if refused(&e) => {
                self.give_up(&e);
                return false;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis near cache: tracking connection failed");
                return false;
            }
            Err(_) => {
                tracing::debug!("redis near cache: tracking connection timed out");
                return false;
            }
        };
        let generation = self.next_gen.fetch_add(1, Ordering::Relaxed);
        // Nothing kept under an earlier generation survives (it was flushed when that one was
        // lost; this covers a loss we did not see).
        self.store.flush();
        *lock(&self.redirect) = Some((generation, id));
        self.live.store(generation, Ordering::SeqCst);
        tokio::spawn(dispatch(Arc::downgrade(self), generation, rx));
        tokio::spawn(watch(Arc::downgrade(self), generation, conn));
        true
    }

    /// Ends the current tracking generation (a data connection now reaches another server,
    /// e.g. `READONLY` after a failover): everything kept goes, and a new tracking connection
    /// is made on the next miss.
    pub(super) fn reset(&self) {
        self.end_generation(&mut lock(&self.redirect));
    }

    /// No live tracking connection from now on, and nothing kept (the caller holds the
    /// `redirect` lock, so a generation ends once).
    fn end_generation(&self, redirect: &mut Option<(u64, i64)>) {
        *redirect = None;
        self.live.store(0, Ordering::SeqCst);
        self.store.flush();
    }

    fn give_up(&self, e: &RedisError) {
        if !self.unavailable.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                error = %e,
                "tower-stampede: the Redis near cache is off (it needs Redis >= 6 with RESP3, \
                 CLIENT ID and CLIENT TRACKING allowed); every read goes to Redis"
            );
        }
        self.end_generation(&mut lock(&self.redirect));
    }

    /// The tracking connection of `generation` is gone: drop everything, keep nothing until
    /// the next one.
    fn broken(&self, generation: u64) {
        let mut r = lock(&self.redirect);
        if r.map(|(g, _)| g) != Some(generation) {
            return;
        }
        self.end_generation(&mut r);
        tracing::debug!("redis near cache: tracking connection lost; flushed");
    }

    fn invalidate(&self, keys: &[Value]) {
        for k in keys {
            match k {
                Value::BulkString(b) => match std::str::from_utf8(b) {
                    Ok(key) => self.store.forget(key),
                    Err(_) => self.store.flush(),
                },
                Value::SimpleString(key) => self.store.forget(key),
                // A key we cannot name: drop everything rather than keep it.
                _ => self.store.flush(),
            }
        }
    }
}

/// A refusal that will not change by trying again: no RESP3 (Redis < 6), a command or
/// subcommand the server does not know, or one an ACL denies. Anything else (a broken or slow
/// connection, "the client ID you want redirect to does not exist" after a failover) is worth
/// another tracking connection.
fn refused(e: &RedisError) -> bool {
    if matches!(
        e.kind(),
        redis::ErrorKind::RESP3NotSupported
            | redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)
    ) {
        return true;
    }
    let text = e.to_string().to_ascii_lowercase();
    text.contains("noperm")
        || text.contains("unknown command")
        || text.contains("unknown subcommand")
}

/// Owned by one tracking connection: applies its invalidations; ends when it breaks.
async fn dispatch(near: Weak<Near>, generation: u64, mut rx: mpsc::UnboundedReceiver<PushInfo>) {
    while let Some(push) = rx.recv().await {
        let Some(this) = near.upgrade() else {
            return;
        };
        match push.kind {
            PushKind::Invalidate => match push.data.first() {
                Some(Value::Array(keys)) | Some(Value::Set(keys)) => this.invalidate(keys),
                // `FLUSHALL` / `FLUSHDB`: a null list.
                _ => this.store.flush(),
            },
            PushKind::Disconnection => {
                this.broken(generation);
                return;
            }
            _ => {}
        }
    }
    if let Some(this) = near.upgrade() {
        this.broken(generation);
    }
}

/// Checks the tracking connection every second; an unanswered `PING` counts as lost (a silent
/// network failure would otherwise keep invalidations from arriving while hits are served).
async fn watch(near: Weak<Near>, generation: u64, mut conn: MultiplexedConnection) {
    loop {
        tokio::time::sleep(PING_EVERY).await;
        let Some(this) = near.upgrade() else {
            return;
        };
        if this.live.load(Ordering::Acquire) != generation {
            return;
        }
        let timeout = this.timeout;
        drop(this);
        if !super::answers_ping(&mut conn, timeout).await {
            if let Some(this) = near.upgrade() {
                this.broken(generation);
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_exclusive_and_ends_with_its_holder() {
        let flag = AtomicBool::new(false);
        let first = Claim::take(&flag).expect("free");
        assert!(Claim::take(&flag).is_none(), "held");
        assert!(
            flag.load(Ordering::Acquire),
            "a refused take leaves the holder's flag set"
        );
        assert!(Claim::take(&flag).is_none(), "still held");
        drop(first);
        assert!(!flag.load(Ordering::Acquire));
        assert!(Claim::take(&flag).is_some(), "free again");
    }

    fn near() -> Arc<Near> {
        let info = "redis://127.0.0.1:1"
            .parse::<ConnectionInfo>()
            .expect("a URL");
        Near::new(info, 1 << 20, Duration::from_millis(50)).expect("a client")
    }

    fn live(n: &Near) -> Tracked {
        n.live.store(7, Ordering::SeqCst);
        *lock(&n.redirect) = Some((7, 1));
        let t = Tracked::default();
        t.generation.store(7, Ordering::SeqCst);
        t
    }

    #[test]
    fn nothing_is_kept_or_served_without_a_live_tracking_connection() {
        let n = near();
        assert!(n.ticket(&Tracked::default(), "ts:{ab}:e").is_none());
        let t = live(&n);
        let ticket = n.ticket(&t, "ts:{ab}:e").expect("tracked");
        n.put(ticket, &t, "ts:{ab}:e", &Bytes::from_static(b"v"), None);
        assert_eq!(n.get("ts:{ab}:e").as_deref(), Some(&b"v"[..]));
        n.broken(7);
        assert_eq!(n.get("ts:{ab}:e"), None);
        assert_eq!(n.store.len(), 0);
        assert!(n.ticket(&t, "ts:{ab}:e").is_none());
    }

    #[test]
    fn an_invalidation_between_read_and_insert_wins() {
        let n = near();
        let t = live(&n);
        let ticket = n.ticket(&t, "ts:{ab}:e").expect("tracked");
        n.invalidate(&[Value::BulkString(b"ts:{ab}:e".to_vec())]);
        n.put(ticket, &t, "ts:{ab}:e", &Bytes::from_static(b"old"), None);
        assert_eq!(n.get("ts:{ab}:e"), None);
        let ticket = n.ticket(&t, "ts:{ab}:e").expect("tracked");
        n.put(ticket, &t, "ts:{ab}:e", &Bytes::from_static(b"new"), None);
        assert_eq!(n.get("ts:{ab}:e").as_deref(), Some(&b"new"[..]));
        n.invalidate(&[Value::BulkString(b"ts:{ab}:e".to_vec())]);
        assert_eq!(n.get("ts:{ab}:e"), None);
    }

    #[test]
    fn a_read_across_a_new_generation_is_not_kept() {
        let n = near();
        let t = live(&n);
        let ticket = n.ticket(&t, "ts:{ab}:e").expect("tracked");
        n.live.store(8, Ordering::SeqCst);
        assert!(n.ticket(&t, "ts:{ab}:e").is_none());
        n.put(ticket, &t, "ts:{ab}:e", &Bytes::from_static(b"v"), None);
        n.live.store(7, Ordering::SeqCst);
        assert_eq!(n.get("ts:{ab}:e"), None);
    }

    #[test]
    fn only_lasting_refusals_turn_the_near_cache_off() {
        use redis::{ErrorKind, ServerErrorKind};
        let err = |kind, detail: &str| RedisError::from((kind, "ERR", detail.to_string()));
        let reply = ErrorKind::Server(ServerErrorKind::ResponseError);
        // After a failover the redirect id is unknown on the new server: try a new connection.
        assert!(!refused(&err(
            reply,
            "The client ID you want redirect to does not exist"
        )));
        assert!(!refused(&RedisError::from((
            ErrorKind::Io,
            "connection closed"
        ))));
        assert!(refused(&err(
            reply,
            "unknown subcommand 'TRACKING'. Try CLIENT HELP."
        )));
        assert!(refused(&err(
            ErrorKind::Server(ServerErrorKind::NoPerm),
            "this user has no permissions to run the 'client|id' command"
        )));
        assert!(refused(&RedisError::from((
            ErrorKind::RESP3NotSupported,
            "no RESP3"
        ))));
    }

    #[test]
    fn a_read_on_a_retired_connection_is_not_kept() {
        let n = near();
        let t = live(&n);
        let ticket = n.ticket(&t, "ts:{ab}:e").expect("tracked");
        t.retire();
        n.put(ticket, &t, "ts:{ab}:e", &Bytes::from_static(b"v"), None);
        assert_eq!(n.get("ts:{ab}:e"), None);
    }
}
