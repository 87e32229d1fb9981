//! Client pacing while a migration's dirty passes run: each client write
//! that dirties clean blocks is charged what sending them will cost, divided
//! by [`CLIENT_SHARE`], against a clock; a write ahead of the clock by more
//! than [`PACE_BURST`] waits for it.
//!
//! The migration's policy decides the rates; this module only needs the
//! numbers ([`PaceRates`]), so the storage layer does not depend on it.

use std::time::{Duration, Instant};

/// The share of the destination's time that clients' new dirt may cost.
pub const CLIENT_SHARE: f64 = 0.5;
/// Pacing lets a client run this far ahead of its budget without waiting,
/// so a write only sleeps when the debt is worth a timer (which has
/// millisecond resolution).
pub const PACE_BURST: Duration = Duration::from_millis(5);
/// A single client write never waits longer than this for pacing: pacing
/// exists to keep client writes from stalling, so it must not stall them
/// itself.
pub const MAX_PACE_WAIT: Duration = Duration::from_millis(100);

/// What one write costs the migration: `per_request` seconds plus
/// `per_byte` seconds for each byte at the destination, and no faster than
/// `rate` bytes per second on the way there (infinite: no such limit; 0: the
/// copy is paused).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PaceRates {
    pub per_request: f64,
    pub per_byte: f64,
    pub rate: f64,
}

impl PaceRates {
    /// How long `requests` writes of `bytes` in all take: the slower of the
    /// destination and the link, which work at the same time.
    pub fn time(&self, requests: u64, bytes: u64) -> Duration {
        let secs = requests as f64 * self.per_request + bytes as f64 * self.per_byte;
        let at_destination = Duration::from_secs_f64(secs.clamp(0.0, 1e6));
        if bytes == 0 || self.rate.is_infinite() {
            return at_destination;
        }
        let on_link = if self.rate > 0.0 {
            Duration::from_secs_f64((bytes as f64 / self.rate).clamp(0.0, 1e6))
        } else {
            Duration::from_secs(1_000_000)
        };
        on_link.max(at_destination)
    }
}

/// The pacing clock of one image.
#[derive(Debug, Default)]
pub struct ClientPace {
    rates: Option<PaceRates>,
    /// When the writes charged so far have used up their budget.
    due: Option<Instant>,
}

impl ClientPace {
    /// Starts pacing at `rates`, or (`None`) stops.
    pub fn set(&mut self, rates: Option<PaceRates>) {
        if rates.is_none() {
            self.due = None;
        }
        self.rates = rates;
    }

    pub fn is_on(&self) -> bool {
        self.rates.is_some()
    }

    /// Charges a write that dirties `runs` clean ranges of `bytes` in all,
    /// at `now`; returns how long it must wait first.
    pub fn charge(&mut self, runs: u64, bytes: u64, now: Instant) -> Duration {
        let Some(rates) = self.rates else {
            return Duration::ZERO;
        };
        if bytes == 0 {
            return Duration::ZERO;
        }
        let cost = rates.time(runs, bytes).as_secs_f64() / CLIENT_SHARE;
        let start = self.due.map_or(now, |due| due.max(now));
        // The debt is capped where the waits are: clients that write faster
        // than the migration can carry (it then cannot converge) must not
        // run up a debt that keeps pacing them long after the capacity grew
        // (a raised speed limit) or they slowed down.
        let due = (start + Duration::from_secs_f64(cost.min(MAX_PACE_WAIT.as_secs_f64())))
            .min(now + MAX_PACE_WAIT + PACE_BURST);
        self.due = Some(due);
        due.saturating_duration_since(now)
            .saturating_sub(PACE_BURST)
            .min(MAX_PACE_WAIT)
    }
}
