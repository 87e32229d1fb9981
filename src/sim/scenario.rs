//! What one seed simulates: the sizes, speeds, clients and faults of a run,
//! all drawn from the seed.

use faults::{PowerLoss, SplitMix64};

/// Where a fault strikes: at a virtual time, or when a step of the
/// hand-off happens for the `nth` time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    At(u64),
    On(Mark, u32),
}

/// Steps of a migration the simulator can strike at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mark {
    /// The source sent a data write to the destination.
    SentWrite,
    /// The source cut its clients off.
    CutOff,
    /// The source sent ENTRUST.
    SentEntrust,
    /// The destination answered ENTRUST.
    EntrustAnswered,
    /// The source unlinked its image.
    Unlinked,
    /// The source sent DISCONNECT.
    SentDisconnect,
    /// The destination completed the migration.
    Completed,
    /// The destination persisted its marker.
    MarkerPersisted,
    /// A client write was acknowledged on the destination after the
    /// hand-off.
    ServedOnDestination,
}

impl Mark {
    pub const ALL: [Mark; 9] = [
        Mark::SentWrite,
        Mark::CutOff,
        Mark::SentEntrust,
        Mark::EntrustAnswered,
        Mark::Unlinked,
        Mark::SentDisconnect,
        Mark::Completed,
        Mark::MarkerPersisted,
        Mark::ServedOnDestination,
    ];
}

/// A host: the source's (0) or the destination's (1).
pub const SOURCE: usize = 0;
pub const DEST: usize = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The connection is reset: both ends see it close.
    Reset,
    /// Packets vanish both ways for this long, without a reset.
    Blackhole { us: u64 },
    /// The process on the host dies (its page cache survives); a
    /// supervisor starts it again after `restart_us`.
    Crash { host: usize, restart_us: u64 },
    /// The host loses power: what was not durable may be lost.
    PowerCut {
        host: usize,
        loss: PowerLoss,
        restart_us: u64,
    },
    /// The operator runs `break`, then `mirror` again after `again_us`.
    Break { again_us: u64 },
}

impl FaultKind {
    /// Every kind's name, as [`FaultKind::name`] gives it.
    pub const NAMES: [&'static str; 5] = ["reset", "blackhole", "crash", "powercut", "break"];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Reset => "reset",
            FaultKind::Blackhole { .. } => "blackhole",
            FaultKind::Crash { .. } => "crash",
            FaultKind::PowerCut { .. } => "powercut",
            FaultKind::Break { .. } => "break",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub when: Trigger,
    pub what: FaultKind,
}

/// What `mirror` is told to do at the end.
pub use crate::core::source::MirrorAction;

#[derive(Clone, Debug)]
pub struct Scenario {
    /// Image size in 512-byte sectors (a multiple of 8).
    pub sectors: u64,
    /// One-way network latency, microseconds.
    pub latency_us: u64,
    /// Time the destination takes per request and per KiB, microseconds.
    pub per_request_us: u64,
    pub per_kib_us: u64,
    /// Time an fdatasync takes (a slow disk makes it long).
    pub sync_us: u64,
    pub clients: usize,
    /// Operations each client makes before it stops.
    pub ops: u32,
    /// Pause between a client's operations.
    pub think_us: u64,
    pub fua_percent: f64,
    pub flush_percent: f64,
    pub action: MirrorAction,
    /// The source plays an old (C) flexnbd: no ENTRUST.
    pub legacy_source: bool,
    pub faults: Vec<Fault>,
}

impl Scenario {
    pub fn draw(seed: u64) -> Scenario {
        let mut rng = SplitMix64::new(seed ^ 0x005e_ed0f_5ce7_a1e0);
        let mut pick = |n: u64| rng.next_u64() % n;
        let sectors = 8 * (16 + pick(48));
        let latency_us = [50, 200, 1000, 5000][pick(4) as usize];
        let per_request_us = 20 + pick(200);
        let per_kib_us = 1 + pick(20);
        let sync_us = if pick(5) == 0 {
            20_000 + pick(200_000)
        } else {
            100 + pick(5_000)
        };
        let clients = 1 + pick(3) as usize;
        let ops = 20 + pick(150) as u32;
        let think_us = 200 + pick(5_000);
        let fua_percent = [0.0, 20.0, 50.0][pick(3) as usize];
        let flush_percent = [0.0, 10.0, 25.0][pick(3) as usize];
        let action = match pick(10) {
            0..=5 => MirrorAction::Unlink,
            6..=8 => MirrorAction::Exit,
            _ => MirrorAction::Nothing,
        };
        // An old (C) source sends no ENTRUST: with --unlink it would unlink
        // before the destination made anything durable (a C flexnbd bug the
        // contract does not cover), so it migrates without.
        let legacy_source = pick(10) == 0;
        let action = if legacy_source {
            MirrorAction::Exit
        } else {
            action
        };
        let n_faults = match pick(10) {
            0 => 0,
            1..=6 => 1,
            _ => 2,
        };
        let mut faults = Vec::new();
        for _ in 0..n_faults {
            let when = if pick(4) == 0 {
                Trigger::At(1_000 + pick(400_000))
            } else {
                let mark = Mark::ALL[pick(Mark::ALL.len() as u64) as usize];
                let nth = if mark == Mark::SentWrite || mark == Mark::MarkerPersisted {
                    1 + pick(12) as u32
                } else {
                    1 + pick(2) as u32
                };
                Trigger::On(mark, nth)
            };
            let host = pick(2) as usize;
            let what = match pick(6) {
                0 => FaultKind::Reset,
                // Some outlast the source's 60 s no-progress limit.
                1 => FaultKind::Blackhole {
                    us: [100_000 + pick(3_000_000), 20_000_000 + pick(80_000_000)]
                        [pick(2) as usize],
                },
                2 => FaultKind::Crash {
                    host,
                    restart_us: 1_000 + pick(2_000_000),
                },
                3 | 4 => FaultKind::PowerCut {
                    host,
                    loss: [PowerLoss::All, PowerLoss::Torn, PowerLoss::Nothing][pick(3) as usize],
                    restart_us: 1_000 + pick(2_000_000),
                },
                _ => FaultKind::Break {
                    again_us: 1_000 + pick(1_000_000),
                },
            };
            faults.push(Fault { when, what });
        }
        Scenario {
            sectors,
            latency_us,
            per_request_us,
            per_kib_us,
            sync_us,
            clients,
            ops,
            think_us,
            fua_percent,
            flush_percent,
            action,
            legacy_source,
            faults,
        }
    }
}
