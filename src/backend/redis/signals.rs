//! One subscriber connection per backend, shared by every waiting slot.
//!
//! The connection is a RESP3 multiplexed connection with a push channel: redis-rs offers
//! `ssubscribe` only on its cluster connection, but on RESP3 a one-channel `SSUBSCRIBE` is answered
//! by one `ssubscribe` push, which the multiplexed connection hands back as the command's reply, so
//! the subscription is confirmed when the command returns. Messages (`smessage`) arrive on the push
//! channel, where a task owned by the connection dispatches them to a `broadcast` channel per slot.
//!
//! Per channel, a reference count and an async "gate": every `SSUBSCRIBE`/`SUNSUBSCRIBE` of one
//! channel is sent while holding its gate, so an unsubscribe of the last subscription can never
//! overtake the subscribe of the next. When the connection breaks, every channel's sender is
//! replaced, so every live subscription's `recv` returns `None` (the engine re-reads and
//! re-subscribes), and the next subscribe makes a new connection.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc};

use super::redis::aio::MultiplexedConnection;
use super::redis::{
    self, AsyncConnectionConfig, Client, ConnectionInfo, ErrorKind, PushInfo, PushKind, RedisError,
    Value,
};
use super::RECONNECT_BACKOFF;
use crate::backend::{BackendError, BackendResult, BoxFuture, Signal, SignalStream, Subscription};

const CHANNEL_CAPACITY: usize = 16;

type Gate = Arc<tokio::sync::Mutex<Option<u64>>>;

pub(super) struct Signals {
    client: Client,
    subscribe_cmd: &'static str,
    unsubscribe_cmd: &'static str,
    timeout: Duration,
    /// Serialises connecting; holds the time of the last failed attempt.
    connecting: tokio::sync::Mutex<Option<Instant>>,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// The server cannot do what we need (no RESP3, no sharded pub/sub): waiters poll.
    unavailable: AtomicBool,
}

struct State {
    current: Option<(u64, MultiplexedConnection)>,
    channels: HashMap<String, Chan>,
}

struct Chan {
    tx: broadcast::Sender<Signal>,
    refs: usize,
    /// The id of the connection this channel is subscribed on, if any; locked around every
    /// (un)subscribe command of this channel.
    gate: Gate,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Signals {
    pub(super) fn new(
        info: ConnectionInfo,
        sharded: bool,
        timeout: Duration,
    ) -> Result<Arc<Self>, RedisError> {
        let client = super::resp3_client(info)?;
        let (subscribe_cmd, unsubscribe_cmd) = if sharded {
            ("SSUBSCRIBE", "SUNSUBSCRIBE")
        } else {
            ("SUBSCRIBE", "UNSUBSCRIBE")
        };
        Ok(Arc::new(Signals {
            client,
            subscribe_cmd,
            unsubscribe_cmd,
            timeout,
            connecting: tokio::sync::Mutex::new(None),
            state: Mutex::new(State {
                current: None,
                channels: HashMap::new(),
            }),
            next_id: AtomicU64::new(1),
            unavailable: AtomicBool::new(false),
        }))
    }

    fn give_up(&self, why: &str) {
        if !self.unavailable.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                reason = why,
                "tower-stampede: Redis signals unavailable, waiters will poll instead \
                 (sharded pub/sub needs Redis >= 7; use `sharded_pubsub(false)` on Redis 6)"
            );
        }
    }

    /// Subscribes to `channel`; resolves once the server has confirmed the subscription.
    pub(super) async fn subscribe(
        self: &Arc<Self>,
        channel: String,
    ) -> BackendResult<Option<Subscription>> {
        for _ in 0..3 {
            if self.unavailable.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let (id, mut conn) = match self.connection().await? {
                Some(c) => c,
                None => return Ok(None),
            };
            let (rx, gate) = {
                let mut st = lock(&self.state);
                // The sender we subscribe to must belong to this connection, so that its
                // breaking closes our receiver.
                if st.current.as_ref().map(|(i, _)| *i) != Some(id) {
                    continue;
                }
                let ch = st.channels.entry(channel.clone()).or_insert_with(|| Chan {
                    tx: broadcast::channel(CHANNEL_CAPACITY).0,
                    refs: 0,
                    gate: Arc::new(tokio::sync::Mutex::new(None)),
                });
                ch.refs += 1;
                (ch.tx.subscribe(), ch.gate.clone())
            };
            // From here on, dropping `sub` (an error, or the caller giving up) gives the
            // reference back.
            let sub = RedisSubscription {
                signals: self.clone(),
                channel,
                rx,
            };
            let mut on = gate.lock().await;
            if *on != Some(id) {
                let mut cmd = redis::cmd(self.subscribe_cmd);
                cmd.arg(&sub.channel);
                match tokio::time::timeout(self.timeout, cmd.query_async::<Value>(&mut conn)).await
                {
                    Ok(Ok(_)) => *on = Some(id),
                    Ok(Err(e)) => {
                        if is_unknown_command(&e) {
                            self.give_up("the server does not know the subscribe command");
                            return Ok(None);
                        }
                        return Err(BackendError::with_source(
                            format!("redis {}", self.subscribe_cmd),
                            e,
                        ));
                    }
                    Err(_) => {
                        return Err(BackendError::new(format!(
                            "redis {}: timed out after {:?}",
                            self.subscribe_cmd, self.timeout
                        )))
                    }
                }
            }
            drop(on);
            return Ok(Some(Subscription::new(sub)));
        }
        Err(BackendError::new(
            "redis subscribe: the subscriber connection keeps breaking",
        ))
    }

    /// The subscriber connection, made if needed. `None` when signals are unavailable.
    async fn connection(self: &Arc<Self>) -> BackendResult<Option<(u64, MultiplexedConnection)>> {
        if let Some(c) = lock(&self.state).current.clone() {
            return Ok(Some(c));
        }
        let mut last_failure = self.connecting.lock().await;
        if let Some(c) = lock(&self.state).current.clone() {
            return Ok(Some(c));
        }
        if let Some(t) = *last_failure {
            if t.elapsed() < RECONNECT_BACKOFF {
                return Err(BackendError::new(
                    "redis subscriber: not connected (reconnecting)",
                ));
            }
        }
        let (tx, rx) = mpsc::unbounded_channel::<PushInfo>();
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_push_sender(tx);
        let made = tokio::time::timeout(
            self.timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&cfg),
        )
        .await;
        match made {
            Ok(Ok(conn)) => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                lock(&self.state).current = Some((id, conn.clone()));
                *last_failure = None;
                tokio::spawn(dispatch(Arc::downgrade(self), id, rx));
                Ok(Some((id, conn)))
            }
            Ok(Err(e)) => {
                *last_failure = Some(Instant::now());
                if e.kind() == ErrorKind::RESP3NotSupported || is_unknown_command(&e) {
                    self.give_up("the server does not speak RESP3");
                    return Ok(None);
                }
                Err(BackendError::with_source("redis subscriber connect", e))
            }
            Err(_) => {
                *last_failure = Some(Instant::now());
                Err(BackendError::new(format!(
                    "redis subscriber connect: timed out after {:?}",
                    self.timeout
                )))
            }
        }
    }

    /// The connection `id` broke: every live subscription ends (its sender is replaced).
    fn broken(&self, id: u64) {
        let mut st = lock(&self.state);
        if st.current.as_ref().map(|(i, _)| *i) != Some(id) {
            return;
        }
        st.current = None;
        for ch in st.channels.values_mut() {
            ch.tx = broadcast::channel(CHANNEL_CAPACITY).0;
        }
    }

    fn deliver(&self, channel: &[u8], payload: &[u8]) {
        let (Ok(channel), Some(signal)) = (std::str::from_utf8(channel), Signal::parse(payload))
        else {
            return;
        };
        if let Some(ch) = lock(&self.state).channels.get(channel) {
            let _ = ch.tx.send(signal);
        }
    }

    /// The last subscription of `channel` went away: unsubscribe, unless someone subscribed
    /// again meanwhile.
    async fn unsubscribe(self: Arc<Self>, channel: String, gate: Gate) {
        let mut on = gate.lock().await;
        let conn = {
            let st = lock(&self.state);
            match st.channels.get(&channel) {
                Some(ch) if ch.refs == 0 && Arc::ptr_eq(&ch.gate, &gate) => {}
                _ => return,
            }
            st.current.clone()
        };
        // Also when our gate says "not subscribed": a subscribe whose caller gave up may still
        // have reached the server. Unsubscribing an unknown channel is harmless.
        if let Some((_, mut c)) = conn {
            let mut cmd = redis::cmd(self.unsubscribe_cmd);
            cmd.arg(&channel);
            let _ = tokio::time::timeout(self.timeout, cmd.query_async::<Value>(&mut c)).await;
        }
        *on = None;
        let mut st = lock(&self.state);
        if matches!(st.channels.get(&channel), Some(ch) if ch.refs == 0 && Arc::ptr_eq(&ch.gate, &gate))
        {
            st.channels.remove(&channel);
        }
    }
}

fn is_unknown_command(e: &RedisError) -> bool {
    e.to_string()
        .to_ascii_lowercase()
        .contains("unknown command")
}

/// Owned by one subscriber connection: routes its messages; ends when it breaks.
async fn dispatch(signals: Weak<Signals>, id: u64, mut rx: mpsc::UnboundedReceiver<PushInfo>) {
    while let Some(push) = rx.recv().await {
        let Some(this) = signals.upgrade() else {
            return;
        };
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                if let [Value::BulkString(channel), Value::BulkString(payload)] = &push.data[..] {
                    this.deliver(channel, payload);
                }
            }
            PushKind::Disconnection => {
                this.broken(id);
                return;
            }
            _ => {}
        }
    }
    // The connection's driver ended without saying so.
    if let Some(this) = signals.upgrade() {
        this.broken(id);
    }
}

struct RedisSubscription {
    signals: Arc<Signals>,
    channel: String,
    rx: broadcast::Receiver<Signal>,
}

impl SignalStream for RedisSubscription {
    fn next(self: Pin<&mut Self>) -> BoxFuture<'_, Option<Signal>> {
        let this = self.get_mut();
        // Closed (the connection broke) or lagged (signals lost): `None`, the caller re-reads.
        Box::pin(async move { this.rx.recv().await.ok() })
    }
}

impl Drop for RedisSubscription {
    fn drop(&mut self) {
        let gate = {
            let mut st = lock(&self.signals.state);
            let Some(ch) = st.channels.get_mut(&self.channel) else {
                return;
            };
            ch.refs = ch.refs.saturating_sub(1);
            if ch.refs > 0 {
                return;
            }
            ch.gate.clone()
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(
                    self.signals
                        .clone()
                        .unsubscribe(std::mem::take(&mut self.channel), gate),
                );
            }
            Err(_) => {
                // No runtime to unsubscribe from: forget the channel here; the server side
                // goes with the connection.
                let mut st = lock(&self.signals.state);
                if matches!(st.channels.get(&self.channel), Some(ch) if ch.refs == 0) {
                    st.channels.remove(&self.channel);
                }
            }
        }
    }
}
