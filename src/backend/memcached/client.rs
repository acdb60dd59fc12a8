//! The adapter over `memcache::exp`, the crate's async meta-protocol client: the one file of the
//! backend that names it. The module is marked experimental (the version is pinned with `=`), so
//! the rest of the backend speaks the small [`Cmd`] / [`Reply`] vocabulary below, and a change of
//! client touches only this file.
//!
//! Every command maps to one meta command with exactly the flags listed on its variant; `exp`
//! adds `f` (client flags) to every `mg` and an `O<n>` opaque to each command of a batch, and
//! checks that the replies echo them in order.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use memcache::exp::{
    self as mc, AsyncMetaClient, GetStatus, MetaClientBuilder, MutationStatus, Op, OpResult, Router,
};

use crate::backend::{BackendError, BackendResult};

/// One meta command.
#[derive(Debug)]
pub(super) enum Cmd {
    /// `mg <key> f [v] [c] [t]`.
    Get {
        key: String,
        value: bool,
        cas: bool,
        ttl: bool,
    },
    /// `ms <key> <len> [ME] c F<flags> T<secs> [C<cas>]`: `Cond::Add` is mode `E` (add; mode `A`
    /// would append), `Cond::Cas` stores only over that exact item version.
    Set {
        key: String,
        value: Bytes,
        secs: u32,
        flags: u32,
        cond: Cond,
    },
    /// `md <key> [C<cas>]`.
    Delete { key: String, cas: Option<u64> },
    /// `ma <key> v D<delta> N<secs> J<initial> T<secs>`: increments, or creates the counter at
    /// `initial` (the delta is not applied to a created counter), and pushes its expiry.
    Incr {
        key: String,
        delta: u64,
        initial: u64,
        secs: u32,
    },
}

/// The condition of a [`Cmd::Set`].
#[derive(Debug, Clone, Copy)]
pub(super) enum Cond {
    /// Store only if the key is absent (mode `E`).
    Add,
    /// Store only if the item's CAS is this one.
    Cas(u64),
}

/// A stored item, as `mg` returned it.
#[derive(Debug, Clone, Default)]
pub(super) struct Item {
    /// The value, when it was asked for.
    pub(super) value: Option<Bytes>,
    /// The client flags (0 when none were stored).
    pub(super) flags: u32,
    /// The CAS, when it was asked for.
    pub(super) cas: Option<u64>,
    /// Seconds left, when asked for (`-1`: no expiry).
    pub(super) ttl: Option<i64>,
}

/// The server's answer to one command. Transport and protocol failures are `Err` instead.
#[derive(Debug)]
pub(super) enum Reply {
    /// `mg` hit.
    Item(Item),
    /// `mg` miss (`EN`).
    Miss,
    /// `ms` / `md` done (`HD`), with the new CAS when one was returned.
    Done(Option<u64>),
    /// `ms` in mode `E`: the key exists (`NS`).
    NotStored,
    /// CAS mismatch (`EX`).
    Exists,
    /// The key is absent (`NF`).
    NotFound,
    /// `ma`: the counter after the operation.
    Counter(u64),
    /// `SERVER_ERROR object too large for cache`: nothing was stored.
    TooLarge,
    /// `CLIENT_ERROR ...`: the server refused the command (e.g. `ma` on a non-numeric value).
    Rejected(String),
}

/// Connection settings.
#[derive(Debug, Clone)]
pub(super) struct Options {
    pub(super) connections_per_server: usize,
    pub(super) connect_timeout: Duration,
    pub(super) io_timeout: Duration,
}

/// A pooled client over one or more servers. Cheap to clone.
#[derive(Clone)]
pub(super) struct Client {
    inner: AsyncMetaClient,
}

impl Client {
    /// Resolves the servers (`host:port` each) and sets up the pools; connections are dialled
    /// lazily, so a server that is down now surfaces as errors on use, not here.
    pub(super) async fn new(servers: &[String], opts: &Options) -> BackendResult<Self> {
        let n = opts.connections_per_server.max(1);
        let inner = MetaClientBuilder::new()
            .router(SlotRouter)
            .max_idle(n)
            .max_connections(Some(n))
            .connect_timeout(Some(opts.connect_timeout))
            .io_timeout(Some(opts.io_timeout))
            .connect_multiple_async(servers.iter().cloned())
            .await
            .map_err(|e| BackendError::with_source("memcached: cannot resolve the servers", e))?;
        Ok(Client { inner })
    }

    /// One command.
    pub(super) async fn one(&self, cmd: Cmd) -> BackendResult<Reply> {
        let op = to_op(cmd);
        classify(self.inner.run(op).await)
    }

    /// Several commands pipelined in one round trip. They must share a server (the backend only
    /// batches the keys of one slot, which the router keeps together); the server runs them in
    /// order. One result per command, in order.
    pub(super) async fn batch(&self, mut cmds: Vec<Cmd>) -> Vec<BackendResult<Reply>> {
        if cmds.len() == 1 {
            if let Some(cmd) = cmds.pop() {
                return vec![self.one(cmd).await];
            }
        }
        let n = cmds.len();
        let ops: Vec<Op> = cmds.into_iter().map(to_op).collect();
        match self.inner.run_batch(ops).await {
            Ok(results) => results.into_iter().map(classify).collect(),
            Err(e) => {
                let msg = e.to_string();
                (0..n)
                    .map(|_| Err(BackendError::new(format!("memcached: {msg}"))))
                    .collect()
            }
        }
    }
}

fn to_op(cmd: Cmd) -> Op {
    match cmd {
        Cmd::Get {
            key,
            value,
            cas,
            ttl,
        } => {
            let mut meta = mc::Meta::NONE;
            if cas {
                meta = meta.cas();
            }
            if ttl {
                meta = meta.ttl();
            }
            let mut get = mc::Get::new(key).meta(meta);
            if !value {
                get = get.without_value();
            }
            get.into()
        }
        Cmd::Set {
            key,
            value,
            secs,
            flags,
            cond,
        } => {
            let set = mc::Set::new(key, &value[..])
                .client_flags(flags)
                .ttl(mc::Ttl::secs(secs.max(1)))
                .return_cas();
            match cond {
                Cond::Add => set.add(),
                Cond::Cas(cas) => set.compare_cas(cas),
            }
            .into()
        }
        Cmd::Delete { key, cas } => {
            let del = mc::Delete::new(key);
            match cas {
                Some(c) => del.compare_cas(c),
                None => del,
            }
            .into()
        }
        Cmd::Incr {
            key,
            delta,
            initial,
            secs,
        } => mc::Arithmetic::new(key)
            .delta(delta)
            .initial(initial, secs.max(1))
            .ttl(mc::Ttl::secs(secs.max(1)))
            .into(),
    }
}

fn classify(res: mc::Result<OpResult>) -> BackendResult<Reply> {
    match res {
        Ok(OpResult::Get(g)) => Ok(match g.status {
            GetStatus::Hit => Reply::Item(Item {
                value: g.value.map(Bytes::from),
                flags: g.client_flags.unwrap_or(0),
                cas: g.item.cas,
                ttl: g.item.ttl,
            }),
            // A zero-byte item carrying another client's lease flags, or any status this
            // version does not know: nothing of ours is there.
            _ => Reply::Miss,
        }),
        Ok(OpResult::Mutation(m)) => match m.status {
            MutationStatus::Applied => Ok(Reply::Done(m.cas)),
            MutationStatus::AlreadyExists => Ok(Reply::NotStored),
            MutationStatus::CasMismatch => Ok(Reply::Exists),
            MutationStatus::NotFound => Ok(Reply::NotFound),
            other => Err(BackendError::new(format!(
                "memcached: unexpected mutation status {other:?}"
            ))),
        },
        Ok(OpResult::Arithmetic(a)) => match (a.status, a.value) {
            (MutationStatus::Applied, Some(v)) => Ok(Reply::Counter(v)),
            (MutationStatus::NotFound, _) => Ok(Reply::NotFound),
            (MutationStatus::CasMismatch, _) => Ok(Reply::Exists),
            (status, _) => Err(BackendError::new(format!(
                "memcached: unexpected arithmetic reply {status:?}"
            ))),
        },
        Ok(other) => Err(BackendError::new(format!(
            "memcached: unexpected reply {other:?}"
        ))),
        Err(e) => {
            // A written command that failed is reported as `Ambiguous`; a server or client
            // error line means the server answered, so look at what it said.
            let said = match &e {
                mc::Error::Ambiguous { source, .. } => source.as_ref(),
                other => other,
            };
            match said {
                mc::Error::Server(msg) if msg.contains("too large") => Ok(Reply::TooLarge),
                mc::Error::Rejected(msg) => Ok(Reply::Rejected(msg.clone())),
                _ => Err(BackendError::with_source("memcached", e)),
            }
        }
    }
}

/// Routes every key by the hash tag `{<digest>}` it carries, so all parts of one slot (lease,
/// fence counter, entry, variants) share a server. Rendezvous hashing with a hash of our own
/// (FNV-1a + a SplitMix64 finaliser) rather than `std`'s `DefaultHasher`, whose output may change
/// between Rust releases: two instances built by different compilers must route alike.
struct SlotRouter;

impl Router for SlotRouter {
    fn route(&self, key: &[u8], servers: &[String]) -> usize {
        let tag = hash_tag(key);
        let k = fnv1a(tag);
        let mut best = (0usize, 0u64);
        for (i, s) in servers.iter().enumerate() {
            let score = mix(k ^ fnv1a(s.as_bytes()));
            if i == 0 || score > best.1 {
                best = (i, score);
            }
        }
        best.0
    }
}

/// The bytes between the first `{` and the next `}`, or the whole key without a tag.
pub(super) fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            return &key[open + 1..open + 1 + len];
        }
    }
    key
}

fn fnv1a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in b {
        h ^= u64::from(c);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Which of `servers` a key goes to (for tests and diagnostics).
pub(super) fn server_index(key: &[u8], servers: &[String]) -> usize {
    if servers.is_empty() {
        return 0;
    }
    SlotRouter.route(key, servers).min(servers.len() - 1)
}

/// Checks that `host:port` names a socket address or a resolvable host form (the port must be
/// a number); resolution itself happens in [`Client::new`].
pub(super) fn valid_host_port(s: &str) -> bool {
    if s.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(['/', '?', '#', '@', ' ', ','])
                && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_the_hash_tag_only() {
        let servers: Vec<String> = (0..5).map(|i| format!("10.0.0.{i}:11211")).collect();
        for i in 0..200u32 {
            let d = format!("{:032x}", u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let parts = ["l", "f", "e", "v:0123"];
            let first = server_index(format!("p:v1:{{{d}}}:l").as_bytes(), &servers);
            for p in parts {
                let key = format!("other:v1:{{{d}}}:{p}");
                assert_eq!(server_index(key.as_bytes(), &servers), first);
            }
        }
    }

    #[test]
    fn spreads_slots_over_servers() {
        let servers: Vec<String> = (0..4).map(|i| format!("10.0.0.{i}:11211")).collect();
        let mut counts = [0usize; 4];
        for i in 0..4000u32 {
            let key = format!("ts:v1:{{{:032x}}}:e", u128::from(i) << 64 | u128::from(i));
            counts[server_index(key.as_bytes(), &servers)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
    }

    #[test]
    fn hash_tag_edges() {
        assert_eq!(hash_tag(b"a{b}c"), b"b");
        assert_eq!(hash_tag(b"a{b"), b"a{b");
        assert_eq!(hash_tag(b"{}"), b"");
        assert_eq!(hash_tag(b""), b"");
    }

    #[test]
    fn host_port_forms() {
        for ok in ["127.0.0.1:11211", "[::1]:11211", "cache.local:1"] {
            assert!(valid_host_port(ok), "{ok}");
        }
        for bad in [
            "", "host", "host:", ":11211", "host:x", "host:0", "a/b:1", "h:70000",
        ] {
            assert!(!valid_host_port(bad), "{bad}");
        }
    }
}
