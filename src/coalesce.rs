//! In-process single flight: one local flight per key; followers share its outcome.
//!
//! The flight itself runs in an engine-owned task; this module only tracks who leads and hands
//! the outcome to everyone who joined. The leader's [`FlightGuard`] publishes an `aborted`
//! outcome if it is dropped without finishing (the task panicked or the runtime shut down), so
//! a follower never waits on a flight that no longer exists.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// An outcome a flight can end with when its leader vanished.
pub(crate) trait Aborted {
    fn aborted() -> Self;
}

pub(crate) struct Flights<K, V> {
    map: Mutex<HashMap<K, Arc<watch::Sender<Option<V>>>>>,
}

pub(crate) enum Join<K: Eq + Hash + Clone, V: Clone + Aborted> {
    Leader(FlightGuard<K, V>),
    Follower(watch::Receiver<Option<V>>),
}

impl<K: Eq + Hash + Clone, V: Clone + Aborted> Flights<K, V> {
    pub(crate) fn new() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Joins the flight for `key`, or becomes its leader if none is running.
    pub(crate) fn join(self: &Arc<Self>, key: &K) -> Join<K, V> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(key) {
            return Join::Follower(tx.subscribe());
        }
        let (tx, _) = watch::channel(None);
        let tx = Arc::new(tx);
        map.insert(key.clone(), tx.clone());
        Join::Leader(FlightGuard {
            flights: self.clone(),
            key: key.clone(),
            tx,
            done: false,
        })
    }

    /// Ends the sharing of `key`'s flight, if one is running: callers that join from now on
    /// start a new one (the flight itself runs on, for those that joined it).
    pub(crate) fn detach(&self, key: &K) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// [`detach`](Self::detach) for every running flight whose key `matches`.
    pub(crate) fn detach_where(&self, matches: impl Fn(&K) -> bool) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| !matches(k));
    }

    /// How many flights are running.
    pub(crate) fn running(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether a flight for `key` is running.
    #[cfg(test)]
    pub(crate) fn is_running(&self, key: &K) -> bool {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
    }

    fn remove(&self, key: &K, tx: &Arc<watch::Sender<Option<V>>>) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(key).is_some_and(|cur| Arc::ptr_eq(cur, tx)) {
            map.remove(key);
        }
    }
}

/// The leader's handle: subscribe followers' receivers from it, then finish it.
pub(crate) struct FlightGuard<K: Eq + Hash + Clone, V: Clone + Aborted> {
    flights: Arc<Flights<K, V>>,
    key: K,
    tx: Arc<watch::Sender<Option<V>>>,
    done: bool,
}

impl<K: Eq + Hash + Clone, V: Clone + Aborted> FlightGuard<K, V> {
    /// A receiver for the leader itself.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<V>> {
        self.tx.subscribe()
    }

    /// Publishes the outcome and ends the flight. Callers that join after this start a new one.
    pub(crate) fn finish(mut self, v: V) {
        // Remove first: a caller that joins now must not receive this flight's outcome after
        // it was computed from an older read... it starts its own flight and reads again.
        self.flights.remove(&self.key, &self.tx);
        self.tx.send_replace(Some(v));
        self.done = true;
    }
}

impl<K: Eq + Hash + Clone, V: Clone + Aborted> Drop for FlightGuard<K, V> {
    fn drop(&mut self) {
        if !self.done {
            self.flights.remove(&self.key, &self.tx);
            self.tx.send_replace(Some(V::aborted()));
        }
    }
}

/// Waits for a flight's outcome; a vanished flight reads as aborted.
pub(crate) async fn outcome<V: Clone + Aborted>(rx: &mut watch::Receiver<Option<V>>) -> V {
    match rx.wait_for(|v| v.is_some()).await {
        Ok(v) => v.clone().unwrap_or_else(V::aborted),
        Err(_) => V::aborted(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    enum Out {
        Val(u32),
        Gone,
    }
    impl Aborted for Out {
        fn aborted() -> Self {
            Out::Gone
        }
    }

    #[tokio::test]
    async fn followers_share_and_dropped_leader_aborts() {
        let f: Arc<Flights<u32, Out>> = Arc::new(Flights::new());
        let Join::Leader(g) = f.join(&1) else {
            panic!("first join leads")
        };
        let Join::Follower(mut rx) = f.join(&1) else {
            panic!("second join follows")
        };
        g.finish(Out::Val(7));
        assert_eq!(outcome(&mut rx).await, Out::Val(7));
        assert!(!f.is_running(&1));

        let Join::Leader(g) = f.join(&1) else {
            panic!("a new flight after the first ended")
        };
        let Join::Follower(mut rx) = f.join(&1) else {
            panic!()
        };
        drop(g);
        assert_eq!(outcome(&mut rx).await, Out::Gone);
    }

    #[tokio::test]
    async fn a_detached_flight_is_not_joined_and_its_end_leaves_the_next_one() {
        let f: Arc<Flights<u32, Out>> = Arc::new(Flights::new());
        let Join::Leader(old) = f.join(&1) else {
            panic!("first join leads")
        };
        let Join::Follower(mut joined) = f.join(&1) else {
            panic!("second join follows")
        };
        f.detach(&1);
        let Join::Leader(new) = f.join(&1) else {
            panic!("after a detach, a join starts a new flight")
        };
        // The old flight still ends for those that joined it, and leaves the new one running.
        old.finish(Out::Val(1));
        assert_eq!(outcome(&mut joined).await, Out::Val(1));
        let Join::Follower(mut rx) = f.join(&1) else {
            panic!("the new flight is still joined")
        };
        new.finish(Out::Val(2));
        assert_eq!(outcome(&mut rx).await, Out::Val(2));
        assert!(!f.is_running(&1));
    }
}
