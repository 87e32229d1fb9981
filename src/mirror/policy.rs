//! When to cut clients off: a plain decision that tests drive without
//! sockets.
//!
//! Clients are locked out from the cut-off until the hand-off, and what is
//! still dirty at the cut-off is sent during that time; so the cut-off waits
//! until the remainder would take only a few milliseconds to send. If
//! clients keep dirtying faster than that, the allowance doubles every
//! second (up to the C flexnbd's 5 s), so a migration always converges.

use std::time::{Duration, Instant};

/// The allowance at first: remainders that send within this.
pub const FIRST_ALLOWANCE: Duration = Duration::from_millis(10);
/// The allowance never grows past this (MS_CONVERGE_TIME_SECS in C).
pub const MAX_ALLOWANCE: Duration = Duration::from_secs(5);
/// A remainder this small is always ready, whatever the measured speed.
pub const SMALL_REMAINDER: u64 = 256 * 1024;

#[derive(Clone, Debug)]
pub struct Convergence {
    started: Instant,
}

impl Convergence {
    pub fn new(now: Instant) -> Convergence {
        Convergence { started: now }
    }

    /// The allowance `now`: doubling every second since the dirty passes began.
    pub fn allowance(&self, now: Instant) -> Duration {
        let secs = now
            .saturating_duration_since(self.started)
            .as_secs()
            .min(16) as u32;
        FIRST_ALLOWANCE.saturating_mul(1 << secs).min(MAX_ALLOWANCE)
    }

    /// Whether to cut off now, with `remaining` bytes still to send at
    /// `bytes_per_sec`.
    pub fn ready(&self, remaining: u64, bytes_per_sec: f64, now: Instant) -> bool {
        if remaining <= SMALL_REMAINDER {
            return true;
        }
        if bytes_per_sec <= 0.0 {
            return false;
        }
        Duration::from_secs_f64(remaining as f64 / bytes_per_sec) <= self.allowance(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_remainders_are_always_ready() {
        let t = Instant::now();
        let c = Convergence::new(t);
        assert!(c.ready(0, 0.0, t));
        assert!(c.ready(SMALL_REMAINDER, 1.0, t));
    }

    #[test]
    fn large_remainders_wait_for_a_short_eta() {
        let t = Instant::now();
        let c = Convergence::new(t);
        // 100 MiB at 1 GB/s is ~100 ms: too long at first.
        assert!(!c.ready(100 << 20, 1e9, t));
        // 5 MiB at 1 GB/s is ~5 ms: fine.
        assert!(c.ready(5 << 20, 1e9, t));
    }

    #[test]
    fn the_allowance_doubles_until_five_seconds() {
        let t = Instant::now();
        let c = Convergence::new(t);
        assert_eq!(c.allowance(t), FIRST_ALLOWANCE);
        assert_eq!(c.allowance(t + Duration::from_secs(1)), FIRST_ALLOWANCE * 2);
        assert_eq!(c.allowance(t + Duration::from_secs(3)), FIRST_ALLOWANCE * 8);
        assert_eq!(c.allowance(t + Duration::from_secs(60)), MAX_ALLOWANCE);
        // So a busy disc converges eventually: 100 MiB at 100 MB/s (~1 s).
        assert!(!c.ready(100 << 20, 1e8, t));
        assert!(c.ready(100 << 20, 1e8, t + Duration::from_secs(7)));
    }
}
