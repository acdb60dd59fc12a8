//! Shared test support: real server processes and the backend conformance suite.
#![allow(dead_code, unreachable_pub)]

pub mod conformance;
pub mod servers;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Counts calls to a fill (the "origin calls" that the invariants are about).
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    pub fn inc(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}
