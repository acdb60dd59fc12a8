//! Wall-clock milliseconds that follow `tokio::time`.
//!
//! Stored metadata needs Unix time (instances share it), while tests drive time with tokio's
//! paused clock. `now_ms` is `SystemTime::now()` shifted by how far tokio's clock is from the
//! real monotonic clock: zero in production (so every thread and instance reads the system
//! clock, NTP steps included), and the virtual advance when a test paused the clock, so stored
//! freshness follows `time::advance`.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, advancing with `tokio::time`.
pub(crate) fn now_ms() -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    let tokio_now = tokio::time::Instant::now().into_std();
    let real_now = std::time::Instant::now();
    let shift = if tokio_now >= real_now {
        tokio_now.duration_since(real_now).as_nanos() as i128
    } else {
        -(real_now.duration_since(tokio_now).as_nanos() as i128)
    };
    ((wall + shift) / 1_000_000).clamp(0, i128::from(u64::MAX)) as u64
}
