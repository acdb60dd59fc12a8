//! Wall-clock milliseconds that follow `tokio::time`.
//!
//! Stored metadata needs Unix time (instances share it), while tests drive time with tokio's
//! paused clock. A base pairs `SystemTime::now()` with `tokio::time::Instant::now()` at first use
//! on each thread; later readings advance with tokio's clock. Unpaused, every base tracks real
//! time, so threads agree to the millisecond; paused (a current-thread test runtime), the one
//! thread's base moves with the test's clock, so stored freshness follows `time::advance`.

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

thread_local! {
    static BASE: Cell<Option<(u64, Instant)>> = const { Cell::new(None) };
}

/// Milliseconds since the Unix epoch, advancing with `tokio::time`.
pub(crate) fn now_ms() -> u64 {
    let now = Instant::now();
    let (unix, at) = BASE.with(|b| match b.get() {
        Some(v) => v,
        None => {
            let unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            b.set(Some((unix, now)));
            (unix, now)
        }
    });
    unix + now.saturating_duration_since(at).as_millis() as u64
}
