//! Exponential backoff with jitter, for waiters that poll.

use std::time::Duration;

/// The polling schedule of a waiter: it starts at `min`, doubles up to `max`, and every step is
/// jittered into `[step/2, step]` so waiters that started together do not poll together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first step.
    pub min: Duration,
    /// The largest step.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(10),
            max: Duration::from_millis(500),
        }
    }
}

impl Backoff {
    /// A schedule from `min` to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max }
    }

    pub(crate) fn iter(&self) -> BackoffIter {
        BackoffIter {
            next: self.min,
            max: self.max,
        }
    }
}

/// The steps of one waiter.
#[derive(Debug)]
pub(crate) struct BackoffIter {
    next: Duration,
    max: Duration,
}

impl BackoffIter {
    /// The next sleep, jittered.
    pub(crate) fn next_step(&mut self) -> Duration {
        let step = self.next.min(self.max);
        self.next = (self.next * 2).min(self.max);
        jitter(step)
    }
}

/// A duration in `[d/2, d]`.
pub(crate) fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        let mut it = b.iter();
        let steps: Vec<_> = (0..6).map(|_| it.next_step()).collect();
        for (s, cap) in steps.iter().zip([10u64, 20, 40, 80, 80, 80]) {
            assert!(*s <= Duration::from_millis(cap), "{s:?} > {cap}");
            assert!(*s >= Duration::from_millis(cap) / 2, "{s:?} < {cap}/2");
        }
    }
}
