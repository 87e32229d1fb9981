//! When to cut clients off, how fast clients may dirty the image until then,
//! and how far apart dirty ranges may be and still travel as one write:
//! plain decisions that tests drive without sockets.
//!
//! Clients are locked out from the cut-off until the hand-off, and what is
//! still dirty at the cut-off is sent during that time. So the cut-off waits
//! until the destination would absorb the remainder within [`LOCKOUT_GOAL`].
//! That time comes from a [`CostModel`] of the destination, measured from
//! its replies: every write costs it a fixed time plus a time per byte. The
//! fixed part is what tells destinations apart: a C flexnbd syncs every
//! write, about half a millisecond or more each, while ours takes
//! microseconds. A rate in bytes per second alone (what the sweep's big
//! writes show) would make a remainder of scattered 4 KiB blocks look a
//! hundred times cheaper than it is to a C destination.
//!
//! A destination slower than the clients never catches up by itself: while
//! the dirty passes run, clients' writes are paced ([`ClientPace`]) so that
//! the destination time they cause is at most [`CLIENT_SHARE`] of the time
//! passing; each pass then leaves at most about that share of itself for the
//! next, and the remainder shrinks geometrically. Clients see slower writes
//! for a while instead of being shut out for seconds.
//!
//! The destination is not the only bottleneck: a speed limit (`--max-speed`,
//! or `mirror-speed` in the middle of a migration) or a link slower than the
//! destination's disk caps how fast the remainder can travel. So every
//! decision uses a [`Capacity`]: the slowest of the destination's costs, the
//! speed limit, and the throughput measured on the connection. A model that
//! ignored the limit would let clients dirty faster than the limit sends,
//! and then cut off with seconds of data left.
//!
//! The model can be wrong (a destination whose speed changes, a noisy
//! machine), so after [`PATIENCE`] without progress the allowance doubles every
//! second, but only up to [`MAX_ALLOWANCE`]: a lock-out stays short whatever
//! happens. A migration whose clients write faster than the capacity allows
//! (even paced) does not cut off: it keeps pacing and says why in `status`
//! ([`Estimate`]); `break` still ends it. (The C flexnbd instead cuts off
//! after 5 s whatever is left, which is what turns a speed limit into
//! seconds of shut-out.)

use std::time::{Duration, Instant};

/// The longest the remainder at the cut-off should take the destination.
/// Entrust (or FLUSH), the unlink and closing the server also fall in the
/// lock-out, so this leaves room for them under 100 ms.
pub const LOCKOUT_GOAL: Duration = Duration::from_millis(25);
/// Converging this long without reaching the goal starts the backstop.
pub const PATIENCE: Duration = Duration::from_secs(4);
/// The allowance never grows past this: with entrust, the unlink and a
/// client's reconnection on top, a lock-out stays well under 250 ms.
pub const MAX_ALLOWANCE: Duration = Duration::from_millis(100);
pub use crate::core::pace::{ClientPace, CLIENT_SHARE, MAX_PACE_WAIT, PACE_BURST};
/// Gaps between dirty ranges are sent along with them up to this size.
pub const MAX_GAP: u64 = 1024 * 1024;

/// The destination's cost of one write: `per_request` seconds plus
/// `per_byte` seconds for each byte.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Costs {
    pub per_request: f64,
    pub per_byte: f64,
}

impl Costs {
    /// How long the destination takes for `requests` writes of `bytes` in all.
    pub fn time(&self, requests: u64, bytes: u64) -> Duration {
        let secs = requests as f64 * self.per_request + bytes as f64 * self.per_byte;
        Duration::from_secs_f64(secs.clamp(0.0, 1e6))
    }

    /// The largest clean gap worth sending between two dirty ranges: one
    /// write over both costs the gap's bytes, two writes cost one more fixed
    /// part. Whole blocks, at most [`MAX_GAP`].
    pub fn gap(&self, block: u64) -> u64 {
        let gap = if self.per_byte.is_infinite() {
            0
        } else if self.per_byte > 0.0 {
            (self.per_request / self.per_byte).min(MAX_GAP as f64) as u64
        } else {
            MAX_GAP
        };
        gap / block * block
    }
}

/// What limits the migration's speed for a given remainder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Bottleneck {
    /// Nothing measured yet.
    Unknown = 0,
    /// The destination's own costs.
    Destination = 1,
    /// The speed limit (`--max-speed`, `mirror-speed`).
    SpeedLimit = 2,
    /// The throughput measured on the connection.
    Link = 3,
}

impl Bottleneck {
    pub fn name(self) -> &'static str {
        match self {
            Bottleneck::Unknown => "unknown",
            Bottleneck::Destination => "destination",
            Bottleneck::SpeedLimit => "speed_limit",
            Bottleneck::Link => "link",
        }
    }

    pub fn from_u8(v: u8) -> Option<Bottleneck> {
        [
            Bottleneck::Unknown,
            Bottleneck::Destination,
            Bottleneck::SpeedLimit,
            Bottleneck::Link,
        ]
        .into_iter()
        .find(|b| *b as u8 == v)
    }
}

/// How fast the migration can move data: the destination's costs, and a
/// rate in bytes per second that no write goes faster than (the lower of
/// the speed limit and the connection's measured throughput). A write's
/// time is the larger of the two: the destination and the link work at
/// the same time, so the slower one decides.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Capacity {
    pub destination: Costs,
    /// Bytes per second; infinite when neither a limit nor a measurement
    /// says otherwise, 0 when a limit of 0 pauses the copy.
    pub rate: f64,
    /// Whether `rate` is the speed limit (else the measured throughput).
    rate_is_limit: bool,
    /// The connection's round trip: the quickest reply seen (zero when
    /// none was timed).
    pub round_trip: Duration,
}

impl Capacity {
    /// The slowest of `destination`, the speed limit `limit` (bytes per
    /// second) and the `measured` throughput (bytes per second).
    pub fn new(destination: Costs, limit: Option<u64>, measured: Option<f64>) -> Capacity {
        let limit = limit.map_or(f64::INFINITY, |l| l as f64);
        let measured = measured
            .filter(|m| m.is_finite() && *m > 0.0)
            .unwrap_or(f64::INFINITY);
        Capacity {
            destination,
            rate: limit.min(measured),
            rate_is_limit: limit <= measured,
            round_trip: Duration::ZERO,
        }
    }

    /// The same capacity over a connection whose round trip is `rtt`.
    pub fn with_round_trip(self, rtt: Duration) -> Capacity {
        Capacity {
            round_trip: rtt,
            ..self
        }
    }

    /// The numbers client pacing charges writes by: the same time as
    /// [`Capacity::time`].
    pub fn pace_rates(&self) -> crate::core::pace::PaceRates {
        crate::core::pace::PaceRates {
            per_request: self.destination.per_request,
            per_byte: self.destination.per_byte,
            rate: self.rate,
        }
    }

    /// How long `requests` writes of `bytes` in all take to reach the
    /// destination and be stored there.
    pub fn time(&self, requests: u64, bytes: u64) -> Duration {
        self.time_and_bottleneck(requests, bytes).0
    }

    /// [`Capacity::time`], and which limit set it.
    pub fn time_and_bottleneck(&self, requests: u64, bytes: u64) -> (Duration, Bottleneck) {
        let at_destination = self.destination.time(requests, bytes);
        if bytes == 0 || self.rate.is_infinite() {
            return (at_destination, Bottleneck::Destination);
        }
        let on_link = if self.rate > 0.0 {
            Duration::from_secs_f64((bytes as f64 / self.rate).clamp(0.0, 1e6))
        } else {
            Duration::from_secs(1_000_000)
        };
        if on_link > at_destination {
            let which = if self.rate_is_limit {
                Bottleneck::SpeedLimit
            } else {
                Bottleneck::Link
            };
            (on_link, which)
        } else {
            (at_destination, Bottleneck::Destination)
        }
    }

    /// The largest clean gap worth sending between two dirty ranges, with
    /// each byte costing the slower of the destination and the link.
    pub fn gap(&self, block: u64) -> u64 {
        let per_byte = if self.rate > 0.0 {
            self.destination.per_byte.max(1.0 / self.rate)
        } else {
            f64::INFINITY
        };
        Costs {
            per_request: self.destination.per_request,
            per_byte,
        }
        .gap(block)
    }
}

/// Measurements fade with this time constant: the model follows a
/// destination that speeds up or slows down within a second or two, and
/// averages over the bursts in which some destinations answer (the first
/// reply of a burst carries the time of all of them).
const MEMORY: Duration = Duration::from_secs(2);
/// Sizes that vary less than this (relative to their mean) cannot tell the
/// fixed cost from the cost per byte.
const MIN_SPREAD: f64 = 0.25;
/// From this mean size up, writes are big enough that the fixed cost hardly
/// shows beside their bytes.
const BIG: f64 = 256.0 * 1024.0;

/// What the destination's replies say about its speed: a least-squares line
/// through (size, service time) of each data write, with older measurements
/// fading. The service time is the time from when the destination could
/// start on a write (the later of its sending and the previous reply) to
/// its reply.
#[derive(Clone, Debug, Default)]
pub struct CostModel {
    /// Decayed sums of 1, x, y, x*x and x*y (x: bytes, y: seconds).
    n: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
    /// Decayed sums of bytes and seconds of the big writes alone (at least
    /// [`BIG`]), for [`CostModel::throughput`].
    big_x: f64,
    big_y: f64,
    last: Option<Instant>,
}

impl CostModel {
    pub fn record(&mut self, len: u64, service: Duration, now: Instant) {
        if let Some(last) = self.last {
            let age = now.saturating_duration_since(last).as_secs_f64();
            let keep = (-age / MEMORY.as_secs_f64()).exp();
            self.n *= keep;
            self.x *= keep;
            self.y *= keep;
            self.xx *= keep;
            self.xy *= keep;
            self.big_x *= keep;
            self.big_y *= keep;
        }
        self.last = Some(now);
        let (x, y) = (len as f64, service.as_secs_f64());
        self.n += 1.0;
        self.x += x;
        self.y += y;
        self.xx += x * x;
        self.xy += x * y;
        if x >= BIG {
            self.big_x += x;
            self.big_y += y;
        }
    }

    /// Bytes per second over the time the destination was busy with big
    /// writes (older ones fading): what the connection carries, link and
    /// destination together. Only big writes count: over small ones the
    /// fixed cost per write would pass for slow bytes, and a remainder sent
    /// as large ranges would be charged for it twice.
    pub fn throughput(&self) -> Option<f64> {
        (self.big_y > 0.0 && self.big_x > 0.0).then(|| self.big_x / self.big_y)
    }

    /// The costs, once any write was measured.
    ///
    /// The fitted line when the sizes measured vary enough. Otherwise one
    /// point is known, the mean: for big writes everything is taken to be
    /// per byte (the fixed part is small beside their bytes, and the dirty
    /// passes' small writes soon measure it); for small ones half of their
    /// time is taken to be fixed, a guess that merges gaps up to about
    /// their size.
    pub fn costs(&self) -> Option<Costs> {
        if self.n <= 0.0 || self.last.is_none() {
            return None;
        }
        let mean_x = (self.x / self.n).max(1.0);
        let mean_y = (self.y / self.n).max(0.0);
        let one_point = if mean_x >= BIG {
            Costs {
                per_request: 0.0,
                per_byte: mean_y / mean_x,
            }
        } else {
            Costs {
                per_request: mean_y / 2.0,
                per_byte: mean_y / 2.0 / mean_x,
            }
        };
        let var_x = self.xx / self.n - mean_x * mean_x;
        if var_x <= (MIN_SPREAD * mean_x).powi(2) {
            return Some(one_point);
        }
        let per_byte = (self.xy / self.n - mean_x * mean_y) / var_x;
        let per_request = mean_y - per_byte * mean_x;
        if per_byte <= 0.0 || per_request < 0.0 {
            // Noise, or a destination whose costs are not of this form: the
            // mean alone is safer than a line that says something is free.
            return Some(one_point);
        }
        Some(Costs {
            per_request,
            per_byte,
        })
    }
}

/// What the cut-off decision saw: how long the remainder would take, what
/// it may take, and what limits it. `status` shows it while a migration
/// converges, so an operator can see why it has not cut off yet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// The remainder's time at the current capacity (`None`: nothing
    /// measured yet). When many scattered writes remain this counts only
    /// as many as the allowance could hold, so it is a lower bound.
    pub remainder: Option<Duration>,
    pub allowance: Duration,
    pub bottleneck: Bottleneck,
    /// How long until the cut-off, expected: clients paced to
    /// [`CLIENT_SHARE`] of the capacity dirty at most that share of each
    /// pass for the next, so the passes ahead take the remainder's time
    /// ÷ (1 − share). `None` while nothing is measured, and once the
    /// remainder stopped falling (the backstop's patience ran out): then
    /// no time can be promised, and the log says why.
    pub eta: Option<Duration>,
}

impl Estimate {
    /// Whether to cut off now.
    pub fn ready(&self) -> bool {
        self.remainder.is_some_and(|r| r <= self.allowance)
    }
}

/// Whether to cut off: the remainder against an allowance that is the goal
/// until [`PATIENCE`] has passed without progress, then doubles every
/// second up to [`MAX_ALLOWANCE`]. Progress is the remainder falling to
/// [`PROGRESS`] of its lowest so far: a migration whose dirty passes keep
/// shrinking it (a slow link, where the first pass after the sweep alone
/// takes tens of seconds) is converging, and cutting it off with four
/// times the goal left would only lengthen the lock-out.
#[derive(Clone, Debug)]
pub struct Convergence {
    /// When the remainder last made progress (or converging began).
    since: Instant,
    /// The lowest remainder so far, in bytes.
    lowest: Option<u64>,
}

/// The remainder made progress when it fell to this share of its lowest.
pub const PROGRESS: f64 = 0.75;

impl Convergence {
    pub fn new(now: Instant) -> Convergence {
        Convergence {
            since: now,
            lowest: None,
        }
    }

    /// The remainder is `bytes` `now`: progress restarts the patience.
    pub fn note(&mut self, bytes: u64, now: Instant) {
        match self.lowest {
            Some(low) if (bytes as f64) > low as f64 * PROGRESS => {}
            _ => {
                self.lowest = Some(bytes);
                self.since = now;
            }
        }
    }

    /// The allowance `now`.
    pub fn allowance(&self, now: Instant) -> Duration {
        let waited = now.saturating_duration_since(self.since);
        match waited.checked_sub(PATIENCE) {
            None => LOCKOUT_GOAL,
            Some(over) => LOCKOUT_GOAL
                .saturating_mul(2u32.saturating_pow(over.as_secs().min(16) as u32 + 1))
                .min(MAX_ALLOWANCE),
        }
    }

    /// Whether to cut off now, with `bytes` still to send, as writes that
    /// `requests` counts: it is called with the most requests worth
    /// counting, and may stop counting there.
    pub fn estimate(
        &self,
        bytes: u64,
        requests: impl FnOnce(u64) -> u64,
        capacity: Option<Capacity>,
        now: Instant,
    ) -> Estimate {
        let (remainder, bottleneck) = self.remainder(bytes, requests, capacity, now);
        let allowance = self.allowance(now);
        let eta = match remainder {
            Some(r) if r <= allowance => Some(Duration::ZERO),
            _ if now.saturating_duration_since(self.since) >= PATIENCE => None,
            Some(r) => Some(r.div_f64(1.0 - CLIENT_SHARE)),
            None => None,
        };
        Estimate {
            remainder,
            allowance,
            bottleneck,
            eta,
        }
    }

    fn remainder(
        &self,
        bytes: u64,
        requests: impl FnOnce(u64) -> u64,
        capacity: Option<Capacity>,
        now: Instant,
    ) -> (Option<Duration>, Bottleneck) {
        if bytes == 0 {
            let bottleneck = capacity.map_or(Bottleneck::Unknown, |_| Bottleneck::Destination);
            return (Some(Duration::ZERO), bottleneck);
        }
        // Nothing measured yet: the writes in flight will tell.
        let Some(capacity) = capacity else {
            return (None, Bottleneck::Unknown);
        };
        let allowance = self.allowance(now);
        let (bytes_only, bottleneck) = capacity.time_and_bottleneck(0, bytes);
        if bytes_only > allowance {
            return (Some(bytes_only), bottleneck);
        }
        let most = most_requests(allowance, &capacity);
        let (remainder, bottleneck) = capacity.time_and_bottleneck(requests(most), bytes);
        (Some(remainder), bottleneck)
    }

    /// The `most` that [`Convergence::estimate`] would call its `requests`
    /// with, for the same `bytes`, `capacity` and `now`; `None` when it
    /// would not count requests at all. Code that cannot hand `estimate` a
    /// closure over the dirty map (the sans-IO source) asks for the count
    /// first, and only when it is needed: counting may scan the whole map.
    pub fn requests_wanted(
        &self,
        bytes: u64,
        capacity: Option<Capacity>,
        now: Instant,
    ) -> Option<u64> {
        let capacity = capacity?;
        let allowance = self.allowance(now);
        if bytes == 0 || capacity.time_and_bottleneck(0, bytes).0 > allowance {
            return None;
        }
        Some(most_requests(allowance, &capacity))
    }

    /// [`Convergence::estimate`]'s verdict alone.
    pub fn ready(
        &self,
        bytes: u64,
        requests: impl FnOnce(u64) -> u64,
        capacity: Option<Capacity>,
        now: Instant,
    ) -> bool {
        self.estimate(bytes, requests, capacity, now).ready()
    }
}

/// A remainder this quick to send is cut off at once.
pub const QUICK_REMAINDER: Duration = Duration::from_millis(2);
/// Dirty passes after the remainder was first small enough, at most.
pub const MAX_EXTRA_PASSES: u32 = 3;

/// Once the remainder is small enough to cut off, whether one more dirty
/// pass first is worth it. The pass takes about the remainder's time, and
/// clients dirty at most [`CLIENT_SHARE`] of that meanwhile, so what is left
/// after it is usually a fraction of what is left now; the shut-out is then
/// that fraction, not wherever between the goal and its fraction the pass
/// before happened to end. It is not worth it when the remainder is already
/// quick (the entrust's sync costs more), when the last extra pass did not
/// shrink it by a quarter (clients dirty as fast as the pass sends: the
/// speed limit, a slow link, the backstop's larger allowance), or after
/// [`MAX_EXTRA_PASSES`]. `previous` is the remainder before the last extra
/// pass (`None` before the first); `passes` counts the extra passes so far.
/// Each costs the migration about a remainder's time, never the clients.
pub fn another_pass(remainder: Duration, previous: Option<Duration>, passes: u32) -> bool {
    remainder > QUICK_REMAINDER
        && passes < MAX_EXTRA_PASSES
        && previous.is_none_or(|p| remainder.as_secs_f64() <= p.as_secs_f64() * 0.75)
}

/// The most requests worth counting: as many as `allowance` holds at the
/// destination's per-request cost (more could not make the estimate ready).
fn most_requests(allowance: Duration, capacity: &Capacity) -> u64 {
    let per_request = capacity.destination.per_request;
    if per_request > 0.0 {
        (allowance.as_secs_f64() / per_request) as u64 + 1
    } else {
        u64::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1e-3;

    /// A C-like destination: 0.5 ms a write plus 2.5 ns a byte (400 MB/s).
    fn c_like() -> CostModel {
        let mut m = CostModel::default();
        let t = Instant::now();
        for i in 0..100 {
            let at = t + Duration::from_millis(i);
            m.record(1 << 20, cost(1 << 20), at);
            m.record(4096, cost(4096), at);
        }
        m
    }

    fn cost(len: u64) -> Duration {
        Duration::from_secs_f64(0.5 * MS + 2.5e-9 * len as f64)
    }

    #[test]
    fn another_pass_while_the_remainder_is_over_quick_and_shrinking() {
        let ms = Duration::from_millis;
        // The first time small enough: one more pass, unless already quick.
        assert!(another_pass(ms(20), None, 0));
        assert!(another_pass(ms(3), None, 0));
        assert!(!another_pass(QUICK_REMAINDER, None, 0));
        // After an extra pass: again only if it shrank by a quarter.
        assert!(another_pass(ms(15), Some(ms(20)), 1));
        assert!(!another_pass(ms(16), Some(ms(20)), 1));
        // At most MAX_EXTRA_PASSES.
        assert!(another_pass(ms(4), Some(ms(8)), MAX_EXTRA_PASSES - 1));
        assert!(!another_pass(ms(4), Some(ms(8)), MAX_EXTRA_PASSES));
    }

    #[test]
    fn the_model_recovers_fixed_and_per_byte_costs() {
        let c = c_like().costs().unwrap();
        assert!((c.per_request - 0.5 * MS).abs() < 0.01 * MS, "{c:?}");
        assert!((c.per_byte - 2.5e-9).abs() < 0.01e-9, "{c:?}");
        // Merging pays up to a gap of per_request / per_byte = 200 kB.
        assert_eq!(c.gap(4096), 200_000 / 4096 * 4096);
    }

    #[test]
    fn replies_in_bursts_give_the_same_costs() {
        // A destination that answers 16 writes at once: the first reply
        // carries the time of all of them, the others none.
        let mut m = CostModel::default();
        let t = Instant::now();
        for i in 0..64u64 {
            let len = if i % 2 == 0 { 1 << 20 } else { 4096 };
            let burst: Duration = (0..16).map(|_| cost(len)).sum();
            for j in 0..16 {
                let at = t + Duration::from_millis(10 * i);
                m.record(len, if j == 0 { burst } else { Duration::ZERO }, at);
            }
        }
        let c = m.costs().unwrap();
        assert!((c.per_request - 0.5 * MS).abs() < 0.05 * MS, "{c:?}");
        assert!((c.per_byte - 2.5e-9).abs() < 0.1e-9, "{c:?}");
    }

    #[test]
    fn old_measurements_fade() {
        let mut m = c_like();
        let later = Instant::now() + Duration::from_secs(60);
        // The destination became ten times slower per byte, and has no
        // fixed cost any more.
        for i in 0..100 {
            let at = later + Duration::from_millis(i);
            m.record(
                1 << 20,
                Duration::from_secs_f64(25e-9 * (1 << 20) as f64),
                at,
            );
            m.record(4096, Duration::from_secs_f64(25e-9 * 4096.0), at);
        }
        let c = m.costs().unwrap();
        assert!(c.per_request < 0.01 * MS, "{c:?}");
        assert!((c.per_byte - 25e-9).abs() < 1e-9, "{c:?}");
    }

    #[test]
    fn with_one_size_only_the_mean_decides() {
        let t = Instant::now();
        let mut m = CostModel::default();
        assert_eq!(m.costs(), None);
        m.record(1 << 20, Duration::from_millis(1), t);
        let c = m.costs().unwrap();
        assert_eq!(c.per_request, 0.0, "big writes: all per byte");
        assert_eq!(c.gap(4096), 0);
        let mut m = CostModel::default();
        m.record(4096, Duration::from_millis(1), t);
        let c = m.costs().unwrap();
        assert_eq!(c.per_request, 0.5 * MS, "small writes: half fixed");
        assert_eq!(c.gap(4096), 4096);
    }

    #[test]
    fn a_scattered_remainder_waits_where_a_byte_rate_alone_would_cut_off() {
        let t = Instant::now();
        let conv = Convergence::new(t);
        let costs = c_like().costs().map(|c| Capacity::new(c, None, None));
        // 1 MiB in 256 scattered blocks: 2.6 ms of bytes, but 128 ms of
        // fixed costs to a C destination.
        assert!(!conv.ready(1 << 20, |_| 256, costs, t));
        // The same megabyte as one range is cheap.
        assert!(conv.ready(1 << 20, |_| 1, costs, t));
        // Counting stops at what the allowance can hold: 25 ms / 0.5 ms.
        let mut asked = 0;
        conv.ready(
            1 << 20,
            |most| {
                asked = most;
                most
            },
            costs,
            t,
        );
        assert_eq!(asked, 51);
        // Nothing left is always ready; nothing measured never is.
        assert!(conv.ready(0, |_| 0, None, t));
        assert!(!conv.ready(4096, |_| 1, None, t));
    }

    #[test]
    fn the_allowance_is_the_goal_then_doubles_up_to_its_cap() {
        let t = Instant::now();
        let c = Convergence::new(t);
        assert_eq!(c.allowance(t), LOCKOUT_GOAL);
        assert_eq!(
            c.allowance(t + PATIENCE - Duration::from_millis(1)),
            LOCKOUT_GOAL
        );
        assert_eq!(c.allowance(t + PATIENCE), LOCKOUT_GOAL * 2);
        assert_eq!(
            c.allowance(t + PATIENCE + Duration::from_secs(1)),
            LOCKOUT_GOAL * 4
        );
        assert_eq!(c.allowance(t + Duration::from_secs(60)), MAX_ALLOWANCE);
        assert_eq!(c.allowance(t + Duration::from_secs(86_400)), MAX_ALLOWANCE);
        // A model that is a little off still converges: 8 MiB at 100 MB/s
        // (84 ms) is over the goal but within the grown allowance.
        let capacity = Some(Capacity::new(
            Costs {
                per_request: 0.0,
                per_byte: 1e-8,
            },
            None,
            None,
        ));
        assert!(!c.ready(8 << 20, |_| 1, capacity, t));
        assert!(c.ready(8 << 20, |_| 1, capacity, t + Duration::from_secs(60)));
        // But a remainder of a second never cuts off, however long it waits.
        assert!(!c.ready(100 << 20, |_| 1, capacity, t + Duration::from_secs(86_400)));
    }

    #[test]
    fn the_time_to_the_cut_off_is_the_passes_ahead_while_the_remainder_falls() {
        let t = Instant::now();
        let mut c = Convergence::new(t);
        // 10 MB at 10 MB/s: a second of remainder; paced clients dirty half
        // of each pass, so the passes ahead take two.
        let capacity = Some(Capacity::new(
            Costs {
                per_request: 0.0,
                per_byte: 1e-7,
            },
            None,
            None,
        ));
        c.note(10_000_000, t);
        let e = c.estimate(10_000_000, |_| 1, capacity, t);
        assert_eq!(e.eta, Some(Duration::from_secs(2)));
        // Ready: the cut-off is now.
        assert_eq!(
            c.estimate(1000, |_| 1, capacity, t).eta,
            Some(Duration::ZERO)
        );
        // Nothing measured: unknown.
        assert_eq!(c.estimate(10_000_000, |_| 1, None, t).eta, None);
        // No progress for the patience: no promise.
        let late = t + PATIENCE;
        c.note(9_000_000, late);
        assert_eq!(c.estimate(9_000_000, |_| 1, capacity, late).eta, None);
    }

    #[test]
    fn progress_restarts_the_patience_and_only_progress() {
        let t = Instant::now();
        let mut c = Convergence::new(t);
        c.note(1 << 30, t);
        // The first pass after a sweep over a slow link: 40 s, then the
        // remainder is half what it was. Still converging: the goal holds.
        let later = t + Duration::from_secs(40);
        assert_eq!(c.allowance(later), MAX_ALLOWANCE);
        c.note(1 << 29, later);
        assert_eq!(c.allowance(later), LOCKOUT_GOAL);
        // Shrinking by less than a quarter is not progress...
        c.note((1 << 29) / 10 * 8, later + Duration::from_secs(1));
        assert_eq!(
            c.allowance(later + PATIENCE + Duration::from_millis(1)),
            LOCKOUT_GOAL * 2
        );
        // ...nor is growing again after progress.
        let mut d = Convergence::new(t);
        d.note(1000, t);
        d.note(700, t + Duration::from_secs(1));
        d.note(5000, t + Duration::from_secs(2));
        assert_eq!(d.allowance(t + Duration::from_secs(5)), LOCKOUT_GOAL * 2);
    }

    /// The destination measured in the field: 0.171 ms a write plus 493 MB/s.
    fn fast_destination() -> Costs {
        Costs {
            per_request: 0.171 * MS,
            per_byte: 1.0 / 493e6,
        }
    }

    #[test]
    fn a_speed_limit_slower_than_the_destination_decides_the_cut_off() {
        let t = Instant::now();
        let c = Convergence::new(t);
        let limited = Some(Capacity::new(fast_destination(), Some(10_000_000), None));
        // 60 MB left: 0.12 s to this destination, but 6 s at 10 MB/s. The
        // destination alone would cut off once the allowance grew; with
        // the limit it never does.
        let unlimited = Some(Capacity::new(fast_destination(), None, None));
        let later = t + Duration::from_secs(3600);
        assert!(
            c.estimate(60_000_000, |_| 1, unlimited, later).remainder < Some(MAX_ALLOWANCE * 2)
        );
        let e = c.estimate(60_000_000, |_| 1, limited, later);
        assert!(!e.ready());
        assert_eq!(e.bottleneck, Bottleneck::SpeedLimit);
        assert_eq!(e.remainder, Some(Duration::from_secs(6)));
        // 200 kB is 20 ms at the limit: within the goal.
        let e = c.estimate(200_000, |_| 1, limited, t);
        assert!(e.ready(), "{e:?}");
        assert_eq!(e.bottleneck, Bottleneck::SpeedLimit);
        // Many scattered writes: the destination's fixed costs decide.
        let e = c.estimate(4096, |_| 1000, limited, t);
        assert_eq!(e.bottleneck, Bottleneck::Destination);
        assert!(!e.ready());
        // A limit of 0 pauses the copy: nothing but an empty remainder is
        // ever ready.
        let paused = Some(Capacity::new(fast_destination(), Some(0), None));
        assert!(!c.ready(4096, |_| 1, paused, later));
        assert!(c.ready(0, |_| 0, paused, t));
    }

    #[test]
    fn a_link_slower_than_the_destination_and_the_limit_decides() {
        let t = Instant::now();
        let c = Convergence::new(t);
        // The connection carried 1 MB/s although the limit allows 10.
        let capacity = Capacity::new(fast_destination(), Some(10_000_000), Some(1e6));
        assert_eq!(capacity.rate, 1e6);
        let e = c.estimate(100_000, |_| 1, Some(capacity), t);
        assert_eq!(e.bottleneck, Bottleneck::Link);
        assert_eq!(e.remainder, Some(Duration::from_millis(100)));
        assert!(!e.ready());
        // Gaps worth merging shrink with the slower bytes: the fixed cost
        // of 0.171 ms buys 171 bytes at 1 MB/s, less than a block.
        assert_eq!(capacity.gap(4096), 0);
        assert!(Capacity::new(fast_destination(), None, None).gap(4096) > 4096);
    }

    #[test]
    fn every_bottleneck_round_trips_and_the_readme_names_it() {
        let readme = include_str!("../../README.md");
        for v in 0..=u8::MAX {
            let Some(b) = Bottleneck::from_u8(v) else {
                continue;
            };
            assert_eq!(b as u8, v);
            assert!(
                readme.contains(&format!("`{}`", b.name())),
                "README.md must explain migration_bottleneck={}",
                b.name()
            );
        }
        assert_eq!(Bottleneck::from_u8(Bottleneck::Link as u8 + 1), None);
    }

    #[test]
    fn the_measured_throughput_is_bytes_over_busy_time_of_big_writes() {
        let t = Instant::now();
        let mut m = CostModel::default();
        assert_eq!(m.throughput(), None);
        // Small writes alone say nothing about the rate of bytes.
        m.record(4096, Duration::from_millis(1), t);
        assert_eq!(m.throughput(), None);
        m.record(1_000_000, Duration::from_millis(100), t);
        m.record(1_000_000, Duration::from_millis(100), t);
        // The small write's fixed cost is not taken for slow bytes.
        assert!((m.throughput().unwrap() - 10e6).abs() < 1.0);
        // Fading keeps the rate: both sums fade alike.
        m.record(4096, Duration::from_millis(1), t + Duration::from_secs(3));
        assert!((m.throughput().unwrap() - 10e6).abs() < 1.0);
    }

    #[test]
    fn pacing_charges_what_the_capacity_says_a_write_takes() {
        let capacities = [
            Capacity::new(fast_destination(), None, None),
            Capacity::new(fast_destination(), Some(10_000_000), None),
            Capacity::new(fast_destination(), Some(0), None),
            Capacity::new(
                Costs {
                    per_request: MS,
                    per_byte: 1e-9,
                },
                None,
                Some(5e6),
            ),
        ];
        for capacity in capacities {
            let rates = capacity.pace_rates();
            for (requests, bytes) in [(0, 0), (1, 4096), (3, 1 << 20), (100, 1 << 30)] {
                assert_eq!(
                    rates.time(requests, bytes),
                    capacity.time(requests, bytes),
                    "{capacity:?}: {requests} writes of {bytes} bytes"
                );
            }
        }
    }

    #[test]
    fn pacing_under_a_speed_limit_charges_the_limit() {
        let t = Instant::now();
        let mut p = ClientPace::default();
        p.set(Some(
            Capacity::new(fast_destination(), Some(10_000_000), None).pace_rates(),
        ));
        // A new dirty 4 KiB block costs 0.41 ms at 10 MB/s, so 0.82 ms of
        // the budget; 100 of them are due after 82 ms.
        let mut waited = Duration::ZERO;
        for _ in 0..100 {
            waited = p.charge(1, 4096, t);
        }
        let due = Duration::from_secs_f64(100.0 * 4096.0 / 10e6 / CLIENT_SHARE);
        assert!(
            (waited.as_secs_f64() - (due - PACE_BURST).as_secs_f64()).abs() < 1e-6,
            "{waited:?}"
        );
    }

    #[test]
    fn pacing_holds_clients_to_their_share_of_the_destination() {
        let t = Instant::now();
        let mut p = ClientPace::default();
        // Off: never waits.
        assert_eq!(p.charge(1, 4096, t), Duration::ZERO);
        p.set(Some(
            Capacity::new(
                Costs {
                    per_request: MS,
                    per_byte: 0.0,
                },
                None,
                None,
            )
            .pace_rates(),
        ));
        assert!(p.is_on());
        // Each new dirty block costs 1 ms of the destination, so 2 ms of
        // budget: the first writes run within the burst, then each waits.
        let mut waited = Duration::ZERO;
        for _ in 0..40 {
            waited = p.charge(1, 4096, t);
        }
        // 40 writes are due after 80 ms; all but the burst is waiting.
        assert_eq!(waited, Duration::from_millis(80) - PACE_BURST);
        // Rewrites of dirty blocks cost nothing.
        assert_eq!(p.charge(0, 0, t), Duration::ZERO);
        // Time passing pays the debt off.
        assert_eq!(
            p.charge(1, 4096, t + Duration::from_secs(1)),
            Duration::ZERO
        );
        p.set(None);
        assert_eq!(p.charge(1, 4096, t), Duration::ZERO);
    }

    #[test]
    fn a_huge_write_waits_at_most_the_cap() {
        let t = Instant::now();
        let mut p = ClientPace::default();
        p.set(Some(
            Capacity::new(
                Costs {
                    per_request: 0.0,
                    per_byte: 1e-6,
                },
                None,
                None,
            )
            .pace_rates(),
        ));
        assert_eq!(p.charge(1, 1 << 30, t), MAX_PACE_WAIT - PACE_BURST);
        assert_eq!(p.charge(1, 1 << 30, t), MAX_PACE_WAIT);
        // Many more run up no debt past the cap: a moment after the cap's
        // time has passed, writes run freely again.
        for _ in 0..1000 {
            assert_eq!(p.charge(1, 1 << 30, t), MAX_PACE_WAIT);
        }
        let later = t + MAX_PACE_WAIT + PACE_BURST;
        p.set(Some(
            Capacity::new(
                Costs {
                    per_request: 0.0,
                    per_byte: 1e-12,
                },
                None,
                None,
            )
            .pace_rates(),
        ));
        assert_eq!(p.charge(1, 4096, later), Duration::ZERO);
    }

    #[test]
    fn requests_wanted_is_what_estimate_counts_with() {
        let t = Instant::now();
        let c = Convergence::new(t);
        let slow = Capacity::new(
            Costs {
                per_request: 1e-3,
                per_byte: 1e-9,
            },
            None,
            None,
        );
        for (bytes, capacity) in [
            (0, Some(slow)),
            (4096, None),
            (4096, Some(slow)),
            (10_000_000_000, Some(slow)),
            (4096, Some(Capacity::new(fast_destination(), None, None))),
        ] {
            let mut asked = None;
            c.estimate(
                bytes,
                |most| {
                    asked = Some(most);
                    0
                },
                capacity,
                t,
            );
            assert_eq!(
                c.requests_wanted(bytes, capacity, t),
                asked,
                "{bytes} bytes at {capacity:?}"
            );
        }
        // 25 ms at 1 ms a request: 25 requests and one more are worth counting.
        assert_eq!(c.requests_wanted(4096, Some(slow), t), Some(26));
    }
}
