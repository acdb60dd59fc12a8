//! Errors.

use std::sync::Arc;
use std::time::Duration;

/// A boxed error from a fill (the source: a database query, an HTTP origin...).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a call to the engine can fail with. Backend trouble is not here: the engine fails open
/// (serves from the source) instead.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The call's deadline (`wait_timeout` from arrival) passed while another caller was filling
    /// the value, and no stale copy was inside its policy.
    #[error(
        "gave up after {0:?} waiting for another caller's fill, and no stale copy may be served"
    )]
    Timeout(Duration),
    /// The fill failed (the leader's error, shared with every caller that waited on it), and no
    /// stale copy was inside its stale-if-error window.
    #[error("the fill failed: {0}")]
    Fill(Arc<dyn std::error::Error + Send + Sync>),
    /// Another instance's fill failed (it signalled `failed`), and no stale copy was inside its
    /// stale-if-error window.
    #[error("the fill failed in another instance, and no stale copy may be served")]
    FailedElsewhere,
    /// The fill did not finish within `fill_timeout`.
    #[error("the fill did not finish within {0:?}")]
    FillTimeout(Duration),
    /// The fill panicked. Callers that waited on it compete again.
    #[error("the fill panicked")]
    FillPanicked,
}

/// An invalid configuration, reported when the engine or layer is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tower-stampede configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        ConfigError(msg.into())
    }
}
