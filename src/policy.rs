//! The engine's configuration: lease, waiting, timeouts, failure handling.

use std::time::Duration;

use crate::backoff::Backoff;
use crate::error::ConfigError;

/// How the engine leases, waits, and fails. Every knob has a default; [`Config::validate`] checks
/// the relations between them when the engine is built.
///
/// | knob | default | meaning |
/// |---|---|---|
/// | `lease` | 5 s | how long a fill's lease lives before someone else may take over |
/// | `extend_lease` | true | the holder extends its lease every `lease / 3` while its fill runs |
/// | `wait_timeout` | 10 s | one absolute deadline per call, from arrival, re-competing included |
/// | `fill_timeout` | 30 s | a fill still running after this is abandoned (a failure) |
/// | `backoff` | 10 ms .. 500 ms | polling schedule of waiters (they also wake on signals) |
/// | `pass_ttl` | 5 s | how long a pass marker sends callers straight to the source |
/// | `tombstone_ttl` | 60 s | how long an invalidation blocks fills that started before it (at least `fill_timeout` + 2 × `backend_timeout`) |
/// | `backend_timeout` | 250 ms | per backend call; slower counts as a backend error |
/// | `breaker_threshold` | 5 | consecutive backend errors that open the circuit breaker |
/// | `breaker_cooldown` | 5 s | how long an open breaker skips the backend |
/// | `xfetch_beta` | 0 (off) | probabilistic early refresh; 1.0 is the paper's default |
/// | `source_after_deadline` | false | call the source directly when the deadline passes (opt-in) |
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) lease: Duration,
    pub(crate) extend_lease: bool,
    pub(crate) wait_timeout: Duration,
    pub(crate) fill_timeout: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) pass_ttl: Duration,
    pub(crate) tombstone_ttl: Duration,
    pub(crate) backend_timeout: Duration,
    pub(crate) breaker_threshold: u32,
    pub(crate) breaker_cooldown: Duration,
    pub(crate) xfetch_beta: f64,
    pub(crate) source_after_deadline: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lease: Duration::from_secs(5),
            extend_lease: true,
            wait_timeout: Duration::from_secs(10),
            fill_timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
            pass_ttl: Duration::from_secs(5),
            tombstone_ttl: Duration::from_secs(60),
            backend_timeout: Duration::from_millis(250),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(5),
            xfetch_beta: 0.0,
            source_after_deadline: false,
        }
    }
}

impl Config {
    /// The defaults (see the table above).
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a lease lives before another caller may take over the fill.
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d;
        self
    }

    /// Whether the holder extends its lease while its fill runs (default true).
    pub fn extend_lease(mut self, on: bool) -> Self {
        self.extend_lease = on;
        self
    }

    /// One absolute deadline per call, from its arrival.
    pub fn wait_timeout(mut self, d: Duration) -> Self {
        self.wait_timeout = d;
        self
    }

    /// A fill still running after this is abandoned and counts as failed.
    pub fn fill_timeout(mut self, d: Duration) -> Self {
        self.fill_timeout = d;
        self
    }

    /// The waiters' polling schedule.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(min, max);
        self
    }

    /// How long a pass marker lives.
    pub fn pass_ttl(mut self, d: Duration) -> Self {
        self.pass_ttl = d;
        self
    }

    /// How long an invalidation's tombstone lives. Raised, when shorter, to `fill_timeout`
    /// plus twice `backend_timeout`: a fill that started before the invalidation may write
    /// until then, and the tombstone is what refuses its older content.
    pub fn tombstone_ttl(mut self, d: Duration) -> Self {
        self.tombstone_ttl = d;
        self
    }

    /// The per-call timeout of backend operations.
    pub fn backend_timeout(mut self, d: Duration) -> Self {
        self.backend_timeout = d;
        self
    }

    /// The circuit breaker: open after `threshold` consecutive backend errors, for `cooldown`.
    pub fn breaker(mut self, threshold: u32, cooldown: Duration) -> Self {
        self.breaker_threshold = threshold;
        self.breaker_cooldown = cooldown;
        self
    }

    /// Probabilistic early refresh (XFetch, VLDB 2015): a hit refreshes in the background when
    /// `now - fill_time * beta * ln(rand) >= expiry`. 0 turns it off; 1.0 is the usual choice.
    pub fn xfetch_beta(mut self, beta: f64) -> Self {
        self.xfetch_beta = beta;
        self
    }

    /// Call the source directly when a call's deadline passes with no stale copy, instead of
    /// returning [`Error::Timeout`](crate::Error::Timeout). Off by default: with a slow source this
    /// turns every waiter into an origin call at the same moment (a stampede on a timer).
    pub fn source_after_deadline(mut self, on: bool) -> Self {
        self.source_after_deadline = on;
        self
    }

    /// The lease duration.
    pub fn lease_duration(&self) -> Duration {
        self.lease
    }

    /// The per-call deadline.
    pub fn wait_timeout_duration(&self) -> Duration {
        self.wait_timeout
    }

    /// Checks the relations between knobs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Far beyond any sensible setting, and far inside what deadlines (`Instant + d`) and the
        // sums below can hold without overflowing.
        const LONGEST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
        for (name, d) in [
            ("lease", self.lease),
            ("wait_timeout", self.wait_timeout),
            ("fill_timeout", self.fill_timeout),
            ("backend_timeout", self.backend_timeout),
            ("pass_ttl", self.pass_ttl),
            ("tombstone_ttl", self.tombstone_ttl),
            ("backoff max", self.backoff.max),
            ("breaker cooldown", self.breaker_cooldown),
        ] {
            if d > LONGEST {
                return Err(ConfigError::new(format!(
                    "{name} must be at most 100 years (got {d:?})"
                )));
            }
        }
        let ms = Duration::from_millis(1);
        if self.lease < ms {
            return Err(ConfigError::new("lease must be at least 1 ms"));
        }
        if self.backoff.min < ms || self.backoff.min > self.backoff.max {
            return Err(ConfigError::new(format!(
                "backoff must satisfy 1 ms <= min <= max (got {:?}..{:?})",
                self.backoff.min, self.backoff.max
            )));
        }
        if self.wait_timeout <= self.lease + self.backoff.max {
            return Err(ConfigError::new(format!(
                "wait_timeout ({:?}) must exceed lease + max backoff ({:?}), or a dead lease holder \
                 would always end in the fallback",
                self.wait_timeout,
                self.lease + self.backoff.max
            )));
        }
        if self.fill_timeout < ms {
            return Err(ConfigError::new("fill_timeout must be at least 1 ms"));
        }
        if self.backend_timeout < ms {
            return Err(ConfigError::new("backend_timeout must be at least 1 ms"));
        }
        if self.pass_ttl < ms || self.tombstone_ttl < ms {
            return Err(ConfigError::new(
                "pass_ttl and tombstone_ttl must be at least 1 ms",
            ));
        }
        if !(self.xfetch_beta >= 0.0 && self.xfetch_beta.is_finite()) {
            return Err(ConfigError::new("xfetch_beta must be a finite number >= 0"));
        }
        if self.breaker_threshold == 0 {
            return Err(ConfigError::new("breaker threshold must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    /// Durations too long for a deadline are a clear error, not an overflow panic.
    #[test]
    fn absurd_durations_are_refused_not_overflowed() {
        let max = Duration::MAX;
        let ms = Duration::from_millis(1);
        let configs = [
            Config::default().lease(max),
            Config::default().wait_timeout(max),
            Config::default().fill_timeout(max),
            Config::default().backend_timeout(max),
            Config::default().pass_ttl(max),
            Config::default().tombstone_ttl(max),
            Config::default().backoff(ms, max),
            Config::default().backoff(max, max),
            Config::default().breaker(1, max),
        ];
        for c in configs {
            let e = c.validate().unwrap_err();
            assert!(e.to_string().contains("at most 100 years"), "{e}");
        }
        // A century is still taken.
        let century = Duration::from_secs(100 * 365 * 24 * 3600);
        Config::default()
            .wait_timeout(century)
            .fill_timeout(century)
            .validate()
            .unwrap();
    }

    #[test]
    fn wait_timeout_must_cover_a_dead_holder() {
        let c = Config::default()
            .lease(Duration::from_secs(5))
            .wait_timeout(Duration::from_secs(5));
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("wait_timeout"), "{e}");
    }

    #[test]
    fn bad_backoff_and_beta() {
        assert!(Config::default()
            .backoff(Duration::from_secs(1), Duration::from_millis(1))
            .validate()
            .is_err());
        assert!(Config::default().xfetch_beta(f64::NAN).validate().is_err());
    }
}
