//! The mirror's in-flight window: how many bytes of requests may await
//! their replies at once. Enough to fill the link at any round-trip time
//! (the bandwidth-delay product), and no more, so that a slow link does
//! not queue seconds of writes in front of a checkpoint, a speed-limit
//! change or the cut-off.
//!
//! It starts at [`START`] and grows by rounds, as TCP's slow start and
//! BBR's start-up do: a round is a window's worth of replies. A round in
//! which the sender had to wait for room in the window (so the window, not
//! the destination or the speed limit, was what held the copy back) and
//! whose delivery rate rose by at least [`RISE`] over the best so far
//! doubles the window; [`FLAT_ROUNDS`] such rounds without that rise stop
//! the growth for good (throughput stopped rising). A round in which the
//! window was never full says nothing about it and is not counted. The
//! window never passes [`MAX`]: it bounds memory and queues whatever the
//! link.

use std::time::Instant;

/// The window at the start: 8 MiB fills 1 Gbit/s at 60 ms round trip.
pub const START: u64 = 8 << 20;
/// The window never grows past this (it would then fill 10 Gbit/s at
/// 50 ms).
pub const MAX: u64 = 64 << 20;
/// The smallest rise in delivery rate, as a fraction, that counts as the
/// window holding the copy back.
pub const RISE: f64 = 0.125;
/// Full rounds without such a rise after which the window stops growing.
pub const FLAT_ROUNDS: u32 = 3;
/// Room is counted in units of this many bytes; every request takes at
/// least one (a WRITE_ZEROES carries no payload but still costs a slot).
pub const UNIT: u64 = 4096;

/// What a request of `len` bytes takes of the window, in [`UNIT`]s.
pub fn units(len: u64, payload: bool) -> u32 {
    if payload {
        len.div_ceil(UNIT).clamp(1, u32::MAX as u64) as u32
    } else {
        1
    }
}

#[derive(Clone, Debug)]
pub struct Window {
    bytes: u64,
    growing: bool,
    best_rate: f64,
    flat: u32,
    round_start: Option<Instant>,
    round_acked: u64,
    /// The sender waited for room during this round.
    round_full: bool,
}

impl Default for Window {
    fn default() -> Window {
        Window::new()
    }
}

impl Window {
    pub fn new() -> Window {
        Window {
            bytes: START,
            growing: true,
            best_rate: 0.0,
            flat: 0,
            round_start: None,
            round_acked: 0,
            round_full: false,
        }
    }

    /// The window now, in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether it may still grow.
    pub fn growing(&self) -> bool {
        self.growing
    }

    /// The sender found the window full and waits for room.
    pub fn full(&mut self) {
        self.round_full = true;
    }

    /// A reply freed `len` bytes at `now`. Returns by how many bytes the
    /// window grew (0 mostly).
    pub fn acked(&mut self, len: u64, now: Instant) -> u64 {
        if !self.growing {
            return 0;
        }
        let Some(start) = self.round_start else {
            self.round_start = Some(now);
            self.round_acked = 0;
            return 0;
        };
        self.round_acked += len;
        if self.round_acked < self.bytes {
            return 0;
        }
        let elapsed = now.saturating_duration_since(start).as_secs_f64();
        let (acked, full) = (self.round_acked, self.round_full);
        self.round_start = Some(now);
        self.round_acked = 0;
        self.round_full = false;
        if !full || elapsed <= 0.0 {
            return 0;
        }
        let rate = acked as f64 / elapsed;
        if rate >= self.best_rate * (1.0 + RISE) {
            self.best_rate = rate;
            self.flat = 0;
            let grown = (self.bytes * 2).min(MAX);
            let delta = grown - self.bytes;
            self.bytes = grown;
            if self.bytes == MAX {
                self.growing = false;
            }
            delta
        } else {
            self.best_rate = self.best_rate.max(rate);
            self.flat += 1;
            if self.flat >= FLAT_ROUNDS {
                self.growing = false;
            }
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Acks a whole round of the current window, `per_mib` apart per MiB.
    fn round(w: &mut Window, t: &mut Instant, per_mib: Duration, full: bool) -> u64 {
        let mut grew = 0;
        let mut left = w.bytes();
        if full {
            w.full();
        }
        while left > 0 {
            let n = left.min(1 << 20);
            *t += per_mib.mul_f64(n as f64 / (1 << 20) as f64);
            grew += w.acked(n, *t);
            left -= n;
        }
        grew
    }

    #[test]
    fn the_window_doubles_while_a_full_window_brings_more_throughput_then_stops() {
        let mut w = Window::new();
        let mut t = Instant::now();
        w.acked(0, t); // the first reply opens the first round
                       // Window-limited on a long round trip: each round takes as long
                       // as the round trip, whatever its size, so the rate doubles.
        let rtt = Duration::from_millis(50);
        let mut sizes = vec![w.bytes()];
        for _ in 0..2 {
            let per_mib = rtt.div_f64((w.bytes() >> 20) as f64);
            round(&mut w, &mut t, per_mib, true);
            sizes.push(w.bytes());
        }
        assert_eq!(sizes, [START, 2 * START, 4 * START]);
        // The link is full now: the rate stays flat, and after FLAT_ROUNDS
        // rounds the window stops growing.
        let per_mib = Duration::from_millis(8);
        for _ in 0..FLAT_ROUNDS + 2 {
            round(&mut w, &mut t, per_mib, true);
        }
        let settled = w.bytes();
        assert!(!w.growing());
        round(&mut w, &mut t, Duration::from_micros(1), true);
        assert_eq!(w.bytes(), settled, "it never grows again");
        assert!(settled <= MAX);
    }

    #[test]
    fn rounds_that_never_filled_the_window_say_nothing() {
        let mut w = Window::new();
        let mut t = Instant::now();
        w.acked(0, t);
        for _ in 0..10 {
            assert_eq!(round(&mut w, &mut t, Duration::from_millis(1), false), 0);
        }
        assert_eq!(w.bytes(), START);
        assert!(w.growing(), "no evidence either way");
    }

    #[test]
    fn the_window_never_passes_its_maximum() {
        let mut w = Window::new();
        let mut t = Instant::now();
        w.acked(0, t);
        let mut per_mib = Duration::from_millis(10);
        for _ in 0..20 {
            round(&mut w, &mut t, per_mib, true);
            per_mib /= 4; // ever faster: always a rise
        }
        assert_eq!(w.bytes(), MAX);
        assert!(!w.growing());
    }

    #[test]
    fn a_request_takes_its_payload_in_units_and_at_least_one() {
        assert_eq!(units(1 << 20, true), 256);
        assert_eq!(units(1, true), 1);
        assert_eq!(units(0, true), 1);
        assert_eq!(units(1 << 30, false), 1);
    }
}
