//! # tower-stampede
//!
//! Stops cache stampedes. On a miss, one caller -- across every instance sharing the backend --
//! takes a short **lease** and rebuilds the value, while the others serve the stale copy or wait
//! for the fresh one. Leases are not mutexes: a holder can pause past its lease, so every grant
//! carries a growing **fencing token** and the store refuses writes from an older one. The cost
//! of a lease lost is one extra rebuild, never wrong data or a request that hangs.
//!
//! The [`Stampede`] engine protects any async computation with
//! [`get_or_fill`](Stampede::get_or_fill); the [`http`] module wraps it as a Tower layer for
//! HTTP services (axum, hyper, any `ServiceBuilder` stack).
//!
//! Metrics are emitted through the `metrics` facade (`stampede_requests_total{outcome}`,
//! `stampede_fills_total{outcome}`, ...; the README lists them). Install the recorder before
//! the engine serves its first request: the per-request handles are registered then, once.
#![warn(missing_docs, rust_2018_idioms)]
#![deny(unreachable_pub)]
#![forbid(unsafe_code)]

pub mod backend;
mod backoff;
mod clock;
mod coalesce;
mod engine;
pub mod entry;
mod error;
pub mod http;
pub mod key;
mod local;
mod policy;

pub use backoff::Backoff;
pub use engine::{CacheKey, Fill, Prev, Select, Selector, Served, StaleReason, Stampede, Status};
pub use entry::{Meta, Ttl};
pub use error::{BoxError, ConfigError, Error};
pub use key::Digest;
pub use policy::Config;
