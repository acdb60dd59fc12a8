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
    now_us() / 1000
}

/// Microseconds since the Unix epoch, advancing with `tokio::time`.
pub(crate) fn now_us() -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    let tokio_now = tokio::time::Instant::now().into_std();
    let real_now = std::time::Instant::now();
    // Microseconds (`now_ms` truncates once, at the end: two truncations to milliseconds could
    // put a reading a millisecond early); i64 arithmetic, no 128-bit division on every hit.
    let shift = match tokio_now.checked_duration_since(real_now) {
        Some(ahead) => ahead.as_micros() as i64,
        None => -(real_now.duration_since(tokio_now).as_micros() as i64),
    };
    wall.saturating_add(shift).max(0) as u64
}
