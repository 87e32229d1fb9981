//! The source's side of the hand-off (docs/handoff.md, source steps 1-6) as
//! a plain state machine: it decides what happens next and in which order,
//! and a driver carries each decision out. The machine does no I/O, reads
//! no clock (every input comes with `now`), keeps no globals and needs no
//! runtime, so the same machine runs under tokio (`mirror::supervise`) and
//! under a simulator playing the network, disks and clients on virtual time.
//!
//! # Protocol
//!
//! [`Source::start`] begins the first attempt; after that the driver calls
//! [`Source::handle`] with each event and the time it happened. Both return
//! a batch of [`Effect`]s, to be carried out in order. Every batch ends with
//! exactly one effect that waits for an answer ([`Effect::awaits`]) or with
//! [`Effect::Finish`]; all effects before it are done at once and answer
//! nothing. The answer to the last effect is the next event:
//!
//! | effect | answering event |
//! |---|---|
//! | [`Effect::Connect`] | [`Event::Connected`] or [`Event::ConnectFailed`] |
//! | [`Effect::QueryResume`] | [`Event::ResumeAnswer`] |
//! | [`Effect::MeasureCapacity`] | [`Event::Capacity`] |
//! | [`Effect::AskExtents`] | [`Event::Extents`] |
//! | [`Effect::SendData`], [`Effect::SendHole`] | [`Event::Sent`] |
//! | [`Effect::CompareData`] | [`Event::Compared`] |
//! | [`Effect::TakeDirty`] | [`Event::DirtyTaken`] |
//! | [`Effect::Measure`] | [`Event::Measured`] |
//! | [`Effect::WaitQueue`] | [`Event::QueueDrained`] |
//! | [`Effect::CountRuns`] | [`Event::Runs`] |
//! | [`Effect::WaitIdle`] | [`Event::Idle`] |
//! | [`Effect::Flush`], [`Effect::Entrust`] | [`Event::Reply`] |
//! | [`Effect::CutOffClients`] | [`Event::ClientsCutOff`] |
//! | [`Effect::CloseServer`] | [`Event::ServerClosed`] |
//! | [`Effect::Unlink`] | [`Event::Unlinked`] |
//! | [`Effect::Disconnect`] | [`Event::DisconnectSent`] |
//! | [`Effect::ArmRetry`] | [`Event::RetryTimerFired`] (or a [`Event::Tick`] at or past the delay) |
//!
//! [`Effect::SendCheckpoint`] awaits nothing: its answer comes later as
//! [`Event::CheckpointAnswered`], which the driver hands over just before
//! the answer to the effect awaited at that time (and so before
//! [`Event::Idle`] once everything is answered).
//!
//! Any effect that does I/O on the connection or the image may instead be
//! answered with [`Event::Failed`] (the connection broke, a request timed
//! out, the image could not be read): the attempt is then retried from
//! scratch. While an effect marked [`Effect::cancellable`] is outstanding,
//! `break` or a signal is [`Event::Cancel`]; once the hand-off is past the
//! point of no return (from [`Effect::Completing`] on) nothing is
//! cancellable and a cancel is ignored. An event that answers nothing
//! outstanding is ignored (no effects).

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use super::policy::{self, Bottleneck, Capacity, Convergence, Estimate};

/// Largest data write the sweep sends.
pub const CHUNK: u64 = 1024 * 1024;
/// Largest WRITE_ZEROES the sweep sends for a hole.
pub const ZERO_CHUNK: u64 = 1024 * 1024 * 1024;
/// The sweep clears dirty bits and reads extents a window at a time.
pub const WINDOW: u64 = 64 * 1024 * 1024;
/// A flush this quick, beyond the connection's round trip, means the
/// destination has little left to sync.
pub const QUICK_FLUSH: Duration = Duration::from_millis(10);
/// Flushes before the cut-off, at most (clients keep dirtying meanwhile).
pub const MAX_FLUSHES: u32 = 4;
/// At the cut-off, clients get this long to finish their current request
/// before their connections are torn down.
pub const CUTOFF_GRACE: Duration = Duration::from_secs(2);
/// Between a failed attempt and the next.
pub const RETRY_DELAY: Duration = Duration::from_secs(1);
/// After a retry at once, the next comes this soon, doubling to
/// [`RETRY_DELAY`].
pub const QUICK_RETRY: Duration = Duration::from_millis(100);
/// After the first "not converging" warning, the next comes this much later.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// A checkpoint after at least this much data sent since the last one...
pub const CHECKPOINT_MIN: u64 = 64 * 1024 * 1024;
/// ...or this share of the image, if more: an interrupted copy then sends
/// again at most this share beyond what was left, and a small image is not
/// held up by a sync every few megabytes.
pub const CHECKPOINT_SHARE: u64 = 64;
/// The first window an adaptive comparison judges.
pub const COMPARE_PROBE: u64 = 4 * 1024 * 1024;
/// The sweep compares this much at a time: the driver keeps 8 digests of
/// a mebibyte in flight, so a piece this long costs one round trip where
/// mebibyte pieces cost one each (the 4 MiB probe of an empty destination
/// took 200 ms over 50 ms).
pub const COMPARE_CHUNK: u64 = 8 * 1024 * 1024;
/// Checkpoints in the sweep come at least this far apart: a fast copy
/// does not rewrite the marker every few hundred milliseconds. (They used
/// to keep 100 round trips apart too, when each one left the link idle
/// for a round trip and its sync; sent ahead, they cost the link nothing,
/// and a long link's interrupted copy now loses 64 MiB, not 5 s of it.)
pub const CHECKPOINT_GAP: Duration = Duration::from_millis(250);
/// In the dirty passes a checkpoint is asked as soon as the last one is
/// answered, at most this often. Answered in the background, they keep
/// what the destination holds unsynced small, so the flush before the
/// cut-off, which waits for every reply first, syncs little: the sweep's
/// last stretch of clients' scattered writes took 340 ms to sync at that
/// flush, the link idle meanwhile. The bounds keep the marker's rewrite
/// (two fsyncs each) to ten a second, and to one per 4 MiB on a slow link
/// or under a speed limit.
pub const PASS_CHECKPOINT_GAP: Duration = Duration::from_millis(100);
pub const PASS_CHECKPOINT_MIN: u64 = 4 * 1024 * 1024;
/// NBD's EINVAL: what an old destination answers entrust with.
const EINVAL: u32 = crate::proto::errno::EINVAL;

/// How the first attempt ended, as the `mirror` caller is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstOutcome {
    Go,
    FailConnect,
    Rejected,
    NoHello,
    SizeMismatch,
}

/// What the source does once a migration has copied everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorAction {
    /// Hand off and exit.
    Exit,
    /// Hand off, unlinking the source file first, and exit.
    Unlink,
    /// Keep serving; no hand-off.
    Nothing,
}

/// How a mirror ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The first attempt failed; the caller was told and nothing is retried.
    FirstAttemptFailed(FirstOutcome),
    /// `break` or shutdown.
    Abandoned,
    /// Everything was copied and action `nothing` was asked: keep serving.
    CopiedAndKept,
    /// The destination was handed the image: the source must exit 0.
    HandedOff,
    /// Everything was durable at the destination but the DISCONNECT could
    /// not be sent: exit non-zero so nobody takes this for a completed
    /// migration.
    DisconnectFailed(String),
}

/// The phase an attempt is in (for status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Connecting = 0,
    Copying = 1,
    Converging = 2,
    Entrusting = 3,
    HandingOff = 4,
    Retrying = 5,
    Done = 6,
}

impl Phase {
    /// Every phase, each at the index of its discriminant: the one table
    /// [`Phase::from_u8`] decodes with (checked below when compiling).
    pub const ALL: [Phase; 7] = [
        Phase::Connecting,
        Phase::Copying,
        Phase::Converging,
        Phase::Entrusting,
        Phase::HandingOff,
        Phase::Retrying,
        Phase::Done,
    ];

    /// The phase stored as `v`; `None` for a byte no phase is stored as (a
    /// variant missing from [`Phase::ALL`]).
    pub fn from_u8(v: u8) -> Option<Phase> {
        Phase::ALL.get(usize::from(v)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Copying => "copying",
            Phase::Converging => "converging",
            Phase::Entrusting => "entrusting",
            Phase::HandingOff => "handing_off",
            Phase::Retrying => "retrying",
            Phase::Done => "done",
        }
    }
}

// A phase is stored as its discriminant and decoded by indexing ALL, so each
// must sit at its own index. A variant left out of ALL decodes as None, which
// is reported as a bug rather than read as another phase.
const _: () = {
    let mut i = 0;
    while i < Phase::ALL.len() {
        assert!(
            Phase::ALL[i] as usize == i,
            "Phase::ALL out of discriminant order"
        );
        i += 1;
    }
};

/// How loud a log line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
}

/// A point of the hand-off that fault plans may name; the driver announces
/// it to its probe when the effect comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Milestone {
    /// The DISCONNECT went out (`mirror.disconnect_sent`).
    DisconnectSent,
}

/// What one mirror is, and the rules it keeps.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// The destination, as log lines name it.
    pub target: String,
    /// The source image's path, as log lines name it.
    pub path: String,
    /// The export size in bytes.
    pub size: u64,
    pub action: MirrorAction,
    /// The dirty-tracking block size (dirty ranges' granularity).
    pub block: u64,
    pub window: u64,
    pub chunk: u64,
    pub zero_chunk: u64,
    pub quick_flush: Duration,
    pub max_flushes: u32,
    pub cutoff_grace: Duration,
    pub retry_delay: Duration,
    /// The migration's id (docs/handoff.md, "Resuming"), not 0.
    pub migration: u64,
    /// The last checkpoint of this migration the destination answered,
    /// from an earlier `mirror` (0: none, or nothing held).
    pub checkpoint: u64,
    /// Data sent between checkpoints...
    pub checkpoint_every: u64,
    /// ...and at least this long between them ([`CHECKPOINT_GAP`]).
    pub checkpoint_gap: Duration,
    /// In the dirty passes, checkpoints come this far apart at least
    /// ([`PASS_CHECKPOINT_GAP`]), after this much data at least
    /// ([`PASS_CHECKPOINT_MIN`]).
    pub pass_checkpoint_gap: Duration,
    pub pass_checkpoint_every: u64,
    /// `mirror --verify`: the sweep compares each data range's digest with
    /// the destination's and sends only what differs.
    pub verify: bool,
    /// Without `verify`, a destination that holds no checkpoint of this
    /// migration is compared a window at a time while at least half of
    /// each window's data matches (an earlier copy: the source restarted),
    /// and sent from the first window that mostly differs.
    pub compare_window: u64,
    /// The first window is this short: an empty destination (the common
    /// case) costs only this much comparing before the copy goes on as
    /// data.
    pub compare_probe: u64,
    /// The longest piece the sweep compares at once ([`COMPARE_CHUNK`]).
    pub compare_chunk: u64,
}

impl SourceConfig {
    /// A mirror with the standard rules (the constants above).
    pub fn new(target: String, path: String, size: u64, action: MirrorAction, block: u64) -> Self {
        SourceConfig {
            target,
            path,
            size,
            action,
            block,
            window: WINDOW,
            chunk: CHUNK,
            zero_chunk: ZERO_CHUNK,
            quick_flush: QUICK_FLUSH,
            max_flushes: MAX_FLUSHES,
            cutoff_grace: CUTOFF_GRACE,
            retry_delay: RETRY_DELAY,
            migration: 1,
            checkpoint: 0,
            checkpoint_every: (size / CHECKPOINT_SHARE).max(CHECKPOINT_MIN),
            checkpoint_gap: CHECKPOINT_GAP,
            pass_checkpoint_gap: PASS_CHECKPOINT_GAP,
            pass_checkpoint_every: PASS_CHECKPOINT_MIN,
            verify: false,
            compare_window: WINDOW,
            compare_probe: COMPARE_PROBE,
            compare_chunk: COMPARE_CHUNK,
        }
    }
}

/// What happened: the answer to the effect outstanding, or something from
/// outside (cancel, time passing).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Connected, greeted, size checked: the export's transmission `flags`,
    /// how the link was made (`link`, for the log: handshake, TLS), and
    /// whether the destination offered resuming (RESUME, CHECKPOINT and
    /// DIGEST; docs/handoff.md, "Resuming"): none of them goes to one that
    /// did not.
    Connected {
        flags: u16,
        link: String,
        resumable: bool,
    },
    /// The connection, the greeting or the size check failed.
    ConnectFailed {
        outcome: FirstOutcome,
        message: String,
    },
    /// The migration's capacity now (`None`: nothing measured yet), and the
    /// speed limit in bytes per second (`None`: unlimited).
    Capacity {
        capacity: Option<Capacity>,
        speed_limit: Option<u64>,
    },
    /// The destination's answer to the resume query: the checkpoint of this
    /// migration it durably holds (0: none), or `None` for an old
    /// destination that knows no checkpoints; `empty`: it said its image
    /// holds no data (a destination that was not asked says nothing).
    ResumeAnswer {
        checkpoint: Option<u64>,
        empty: bool,
    },
    /// The extents asked for, as (length, what) from its start.
    Extents(Vec<(u64, Extent)>),
    /// The data or hole went out (written to the connection; its reply
    /// comes later and is awaited by [`Effect::WaitIdle`]).
    Sent,
    /// A compared range: how many of its bytes matched the destination's,
    /// and how many were sent because they differed.
    Compared { same: u64, differed: u64 },
    /// The dirty ranges taken (their bits are cleared), as (offset, length).
    DirtyTaken(Vec<(u64, u64)>),
    /// What is left: bytes still dirty, and requests and bytes in flight,
    /// and of those the bytes still queued for the link (by the measured
    /// rate and when each request went out; a round trip's worth already
    /// past it costs the lock-out no link time, only the round trip it
    /// waits out anyway).
    Measured {
        dirty_bytes: u64,
        in_flight: u64,
        in_flight_bytes: u64,
        queued_bytes: u64,
    },
    /// The link carried what was queued for it (or the wait's bound came).
    QueueDrained,
    /// How many separate writes the dirty map would take (as counted for
    /// [`Effect::CountRuns`]).
    Runs(u64),
    /// Every request sent has been answered.
    Idle,
    /// The checkpoint of [`Effect::SendCheckpoint`] was answered without
    /// error; `held`: every request before it was too. `sync`: its time
    /// past the connection's round trip (the destination's sync, and the
    /// time on the link of what was sent ahead of it). It
    /// comes before the answer to the effect awaited at the time, never
    /// instead of it, and what it returns never awaits.
    CheckpointAnswered {
        checkpoint: u64,
        held: bool,
        sync: Duration,
    },
    /// A FLUSH's or entrust's reply, with its NBD error (0: success).
    Reply { error: u32 },
    /// No client write will be acknowledged any more.
    ClientsCutOff,
    /// The control and NBD listening sockets are closed.
    ServerClosed,
    /// The source image was unlinked and its directory synced, or why not.
    Unlinked(Result<(), String>),
    /// The DISCONNECT was sent, or why not.
    DisconnectSent(Result<(), String>),
    /// The connection or the image failed; `reason` says how.
    Failed { reason: String },
    /// `break` or a signal.
    Cancel,
    /// The retry delay has passed.
    RetryTimerFired,
    /// Time passed (`now` is the time); nothing else happened.
    Tick,
}

/// A piece of the image as the sweep sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    Data,
    Hole,
    /// The destination holds it (only when asked for): nothing to send.
    Held,
}

/// The answer to [`Effect::AskExtents`] from the image's `extents` (as
/// (length, is a hole)) and, when held pieces were asked for, what the
/// destination holds of the same range (as (length, held)). Held wins:
/// whatever the source has there, the destination has it too. A held run
/// is never sent again, however short: one write for it and its
/// neighbours would cost the destination less than two, but resuming
/// promises to send no more than what the destination cannot be trusted
/// to hold, and clients' writes scatter small changes over all of it (on
/// a 4 GiB image with a random writer, joining held runs shorter than the
/// measured gap sent a fifth more than the promise allows).
pub fn extents_with_held(
    extents: &[(u64, bool)],
    held: Option<&[(u64, bool)]>,
) -> Vec<(u64, Extent)> {
    let kind = |hole: bool| if hole { Extent::Hole } else { Extent::Data };
    let Some(held) = held else {
        return extents
            .iter()
            .map(|&(len, hole)| (len, kind(hole)))
            .collect();
    };
    // The pieces as (length, held, what the image has there).
    let mut pieces: Vec<(u64, bool, Extent)> = Vec::new();
    let (mut e, mut h) = (extents.iter().copied(), held.iter().copied());
    let (mut cur_e, mut cur_h) = (e.next(), h.next());
    while let (Some((elen, hole)), Some((hlen, is_held))) = (cur_e, cur_h) {
        let n = elen.min(hlen);
        match pieces.last_mut() {
            Some(last) if last.1 == is_held && last.2 == kind(hole) => last.0 += n,
            _ => pieces.push((n, is_held, kind(hole))),
        }
        cur_e = if elen > n {
            Some((elen - n, hole))
        } else {
            e.next()
        };
        cur_h = if hlen > n {
            Some((hlen - n, is_held))
        } else {
            h.next()
        };
    }
    // The held runs cover the range; should they fall short, the rest is
    // sent as the extents say.
    while let Some((len, hole)) = cur_e {
        pieces.push((len, false, kind(hole)));
        cur_e = e.next();
    }
    let mut out: Vec<(u64, Extent)> = Vec::new();
    for (len, is_held, what) in pieces {
        let k = if is_held { Extent::Held } else { what };
        match out.last_mut() {
            Some(last) if last.1 == k => last.0 += len,
            _ => out.push((len, k)),
        }
    }
    out
}

/// What the driver is to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// A new attempt begins (its number, from 1): status starts afresh
    /// (attempt count, start time, bytes sent, sweep offset, phase
    /// `connecting`).
    BeginAttempt {
        attempt: u64,
    },
    /// Connect, read the greeting, check the size.
    Connect,
    /// Ask the destination which checkpoint of `migration` it holds.
    QueryResume {
        migration: u64,
    },
    /// Begin the attempt's record of what was sent: from what the
    /// destination holds (`resume`), or from nothing, forgetting what was
    /// held.
    BeginHeld {
        resume: bool,
    },
    /// Ask for checkpoint `checkpoint` of `migration` without waiting for
    /// its answer: the copy goes on while the destination syncs. It
    /// covers what was sent before it (the driver records that as it
    /// sends it). The answer comes as [`Event::CheckpointAnswered`],
    /// delivered just before the answer to whatever effect is awaited
    /// then; an error answer fails the connection.
    SendCheckpoint {
        migration: u64,
        checkpoint: u64,
    },
    /// The destination answered the checkpoint asked last: what it covers
    /// is held.
    Held {
        checkpoint: u64,
    },
    /// Tell the `mirror` caller how the first attempt went.
    ReportFirst(FirstOutcome),
    StartTracking,
    StopTracking,
    SetPhase(Phase),
    /// Forget dirty marks in the range (the sweep sends it next).
    ClearDirty {
        offset: u64,
        len: u64,
    },
    MeasureCapacity,
    /// Pace client writes to `capacity` (`None`: stop pacing), those below
    /// `below` only.
    SetPace {
        capacity: Option<Capacity>,
        below: u64,
    },
    /// The extents of the range; with `held`, what the destination holds
    /// comes as [`Extent::Held`].
    AskExtents {
        offset: u64,
        len: u64,
        held: bool,
    },
    /// Send the image's bytes in the range (paced by the speed limit).
    SendData {
        offset: u64,
        len: u64,
    },
    /// Compare the range's digest with the destination's, piece by piece,
    /// and send the pieces that differ (DIGEST; an error answer counts as
    /// a difference).
    CompareData {
        offset: u64,
        len: u64,
    },
    /// Send a hole: WRITE_ZEROES if `zeroes`, else zero-filled WRITEs.
    SendHole {
        offset: u64,
        len: u64,
        zeroes: bool,
    },
    /// The sweep has sent everything before `offset` (for status).
    SweepProgress(u64),
    /// The sweep skipped this many bytes the destination holds (for status).
    SweepSkipped(u64),
    /// Take (and clear) dirty ranges: up to `max_bytes` in all, none longer
    /// than `max_run`, ranges less than `gap` apart joined into one.
    TakeDirty {
        max_bytes: u64,
        max_run: u64,
        gap: u64,
    },
    Measure,
    /// Wait (at most `max`) until the link has carried what is queued for
    /// it: what a pass just sent in a burst, which a measurement right
    /// after it would count again.
    WaitQueue {
        max: Duration,
    },
    /// Count the dirty map's writes with `gap`, stopping at `limit`.
    CountRuns {
        gap: u64,
        limit: u64,
    },
    /// The cut-off decision just made (for status).
    SetEstimate(Estimate),
    WaitIdle,
    Flush,
    Entrust,
    CutOffClients {
        grace: Duration,
    },
    AllowClients,
    /// Past the point of no return: `break` now answers "completed", a
    /// signal waits for the end.
    Completing,
    CloseServer,
    /// Unlink the source image and sync its directory.
    Unlink,
    /// Clients were shut out this long (status keeps the longest).
    RecordLockout(Duration),
    Disconnect,
    Milestone(Milestone),
    /// Answer with [`Event::RetryTimerFired`] after `delay`.
    ArmRetry {
        delay: Duration,
    },
    Log(Level, String),
    /// The mirror is over.
    Finish(Outcome),
}

impl Effect {
    /// Whether the driver must answer this effect with an event (it is then
    /// the last of its batch).
    pub fn awaits(&self) -> bool {
        matches!(
            self,
            Effect::Connect
                | Effect::QueryResume { .. }
                | Effect::MeasureCapacity
                | Effect::AskExtents { .. }
                | Effect::SendData { .. }
                | Effect::CompareData { .. }
                | Effect::SendHole { .. }
                | Effect::TakeDirty { .. }
                | Effect::Measure
                | Effect::WaitQueue { .. }
                | Effect::CountRuns { .. }
                | Effect::WaitIdle
                | Effect::Flush
                | Effect::Entrust
                | Effect::CutOffClients { .. }
                | Effect::CloseServer
                | Effect::Unlink
                | Effect::Disconnect
                | Effect::ArmRetry { .. }
        )
    }

    /// Whether `break` or a signal may interrupt this effect (then answered
    /// with [`Event::Cancel`]). The hand-off's own steps are not: past the
    /// point of no return the hand-off runs to its end.
    pub fn cancellable(&self) -> bool {
        matches!(
            self,
            Effect::Connect
                | Effect::QueryResume { .. }
                | Effect::SendData { .. }
                | Effect::CompareData { .. }
                | Effect::SendHole { .. }
                | Effect::WaitQueue { .. }
                | Effect::WaitIdle
                | Effect::Flush
                | Effect::Entrust
                | Effect::CutOffClients { .. }
                | Effect::ArmRetry { .. }
        )
    }
}

/// The answer the machine waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// Not started.
    Start,
    Connect,
    Resume,
    /// The sweep's window start: its capacity, then its extents.
    WindowCapacity,
    WindowExtents,
    /// A piece of the sweep went out; `data` tells which kind.
    SweepSent {
        data: bool,
    },
    /// The capacity after a data chunk of the sweep.
    ChunkCapacity,
    PassCapacity,
    PassTake,
    PassSent,
    /// After an extra pass: the link carries its burst, then a measure.
    PassQueue,
    PassMeasure,
    PassRuns,
    /// Idle before a flush (`true`) or with nothing dirty (`false`).
    PassIdle {
        flush: bool,
    },
    PassFlush,
    CutOff,
    FinalTake,
    FinalSent,
    Entrust,
    /// Entrust answered: every request before it answered too, then done.
    EntrustIdle,
    /// An old destination: idle, then a FLUSH in place of entrust.
    EntrustFlushIdle,
    EntrustFlush,
    CloseServer,
    Unlink,
    Disconnect,
    Retry,
    Done,
}

/// The state of one attempt; a retry starts from a fresh one.
#[derive(Clone, Debug)]
struct Attempt {
    can_zero: bool,
    started: Instant,
    window_start: u64,
    window_end: u64,
    extents: VecDeque<(u64, Extent)>,
    /// The current extent: where it starts, ends, whether a hole, and how
    /// far it has been sent.
    extent: Option<(u64, u64, bool, u64)>,
    /// Where the next extent starts.
    pos: u64,
    convergence: Option<Convergence>,
    converging_since: Option<Instant>,
    sweep_time: Duration,
    can_flush: bool,
    /// Whether this measurement came right after a flush that counts (a
    /// quick one, or the last one allowed): nothing sent before it is left
    /// for entrust to sync.
    flushed: bool,
    flushes: u32,
    flush_started: Option<Instant>,
    /// What the last flush before the cut-off took beyond the round trip.
    last_flush_sync: Option<Duration>,
    /// Whether the flushes before the cut-off are over, and whether the
    /// last was quick.
    flushes_done: bool,
    flush_quick: bool,
    warn_at: Option<Instant>,
    gap: u64,
    capacity: Option<Capacity>,
    speed_limit: Option<u64>,
    /// The connection's round trip, as last measured.
    round_trip: Duration,
    ranges: VecDeque<(u64, u64)>,
    took_any: bool,
    /// Bytes dirty or in flight (status shows them)...
    remaining: u64,
    /// ...and of them, what the lock-out would wait for the link to carry
    /// (what is in flight past the bottleneck costs it no link time).
    to_carry: u64,
    /// ...of which this much is in flight, still queued for the link.
    queued: u64,
    in_flight: u64,
    measured_at: Option<Instant>,
    cut_at: Option<Instant>,
    lockout: Duration,
    /// Whether the destination takes checkpoints (it answered the resume
    /// query), whether this attempt resumed, the next checkpoint's number,
    /// data sent since the last one, and whether the request before the
    /// cut-off that is awaited is a checkpoint (else a FLUSH).
    checkpoints: bool,
    resumed: bool,
    /// The sweep compares data by digest instead of sending it; `adaptive`:
    /// only while it mostly matches, judged a window at a time.
    compare: bool,
    adaptive: bool,
    /// Whether a first window was judged (the probe).
    judged: bool,
    window_same: u64,
    window_differed: u64,
    next_checkpoint: u64,
    since_checkpoint: u64,
    /// What the checkpoint outstanding covers: the data sent since the
    /// previous one.
    checkpoint_covers: u64,
    /// When the last checkpoint was asked for (or the attempt connected).
    last_checkpoint: Instant,
    /// The length of the sweep's data piece in flight.
    piece: u64,
    /// The checkpoint sent without waiting and not answered yet.
    checkpoint_out: Option<u64>,
    /// Seconds a byte of the last flush before the cut-off took the
    /// destination to sync (its time past the round trip over what it
    /// covered): what entrust's own sync will cost, clients shut out. And
    /// what that flush covered.
    sync_per_byte: Option<f64>,
    last_flush_covers: u64,
    /// The checkpoint outstanding is the flush before the cut-off, sent
    /// ahead: the dirty passes go on while the destination syncs.
    flush_out: bool,
    /// The last cut-off decision found the remainder small enough.
    ready: bool,
    /// What the sweep sent as data (compared, for --verify) and skipped
    /// as held, for the log.
    swept_data: u64,
    skipped: u64,
    /// Passes since the remainder was first small enough to cut off, and
    /// the remainder before the last of them (policy::another_pass).
    extra_passes: u32,
    before_extra: Option<Duration>,
}

impl Attempt {
    /// What entrust would sync now (sent since the last checkpoint, and
    /// the remainder), and how long that takes at the cost a byte the last
    /// flush showed (`None`: no flush measured it; a destination without
    /// FLUSH syncs as it goes).
    fn entrust_sync(&self) -> (u64, Option<Duration>) {
        let unsynced = self.since_checkpoint + self.to_carry;
        let sync = self
            .sync_per_byte
            .map(|s| Duration::from_secs_f64(s * unsynced as f64));
        (unsynced, sync)
    }

    /// Whether the flush before the cut-off is a checkpoint sent ahead
    /// ([`Source::converge_ahead`]): the destination takes both.
    fn pipelined(&self) -> bool {
        self.checkpoints && self.can_flush
    }

    fn note_round_trip(&mut self, capacity: Option<Capacity>) {
        if let Some(c) = capacity {
            self.round_trip = c.round_trip;
        }
    }

    fn new(flags: u16, now: Instant) -> Attempt {
        let can_flush = flags & crate::proto::flags::SEND_FLUSH != 0;
        Attempt {
            can_zero: flags & crate::proto::flags::SEND_WRITE_ZEROES != 0,
            started: now,
            window_start: 0,
            window_end: 0,
            extents: VecDeque::new(),
            extent: None,
            pos: 0,
            convergence: None,
            converging_since: None,
            sweep_time: Duration::ZERO,
            can_flush,
            flushed: false,
            flushes: 0,
            flush_started: None,
            last_flush_sync: None,
            flushes_done: false,
            flush_quick: false,
            warn_at: None,
            gap: 0,
            capacity: None,
            speed_limit: None,
            round_trip: Duration::ZERO,
            ranges: VecDeque::new(),
            took_any: false,
            remaining: 0,
            to_carry: 0,
            queued: 0,
            in_flight: 0,
            measured_at: None,
            cut_at: None,
            lockout: Duration::ZERO,
            extra_passes: 0,
            before_extra: None,
            checkpoints: false,
            resumed: false,
            compare: false,
            adaptive: false,
            judged: false,
            window_same: 0,
            window_differed: 0,
            next_checkpoint: 1,
            since_checkpoint: 0,
            checkpoint_covers: 0,
            last_checkpoint: now,
            piece: 0,
            checkpoint_out: None,
            sync_per_byte: None,
            last_flush_covers: 0,
            flush_out: false,
            ready: false,
            swept_data: 0,
            skipped: 0,
        }
    }
}

/// The source's hand-off, across attempts.
#[derive(Clone, Debug)]
pub struct Source {
    config: SourceConfig,
    wait: Wait,
    /// Attempts begun so far.
    attempts: u64,
    /// Whether the `mirror` caller has been told how the first attempt went.
    reported_first: bool,
    retry_at: Option<Instant>,
    attempt: Option<Attempt>,
    /// The last checkpoint the destination answered whose blocks are still
    /// counted as held (0: nothing held).
    held_checkpoint: u64,
    /// The delay before the next retry, unless the attempt ran long enough
    /// to retry at once.
    next_delay: Duration,
}

impl Source {
    pub fn new(config: SourceConfig) -> Source {
        Source {
            wait: Wait::Start,
            attempts: 0,
            reported_first: false,
            retry_at: None,
            attempt: None,
            held_checkpoint: config.checkpoint,
            next_delay: config.retry_delay,
            config,
        }
    }

    pub fn config(&self) -> &SourceConfig {
        &self.config
    }

    /// Whether the mirror is over (a [`Effect::Finish`] was returned).
    pub fn is_finished(&self) -> bool {
        self.wait == Wait::Done
    }

    /// Begins the first attempt.
    pub fn start(&mut self, _now: Instant) -> Vec<Effect> {
        if self.wait != Wait::Start {
            return Vec::new();
        }
        self.begin_attempt()
    }

    /// Takes `event`, which happened at `now`; returns what to do next.
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Effect> {
        match (self.wait, event) {
            (Wait::Start | Wait::Done, _) => Vec::new(),
            (
                _,
                Event::CheckpointAnswered {
                    checkpoint,
                    held,
                    sync,
                },
            ) => self.checkpoint_answered(now, checkpoint, held, sync),
            (Wait::Retry, Event::Cancel) => {
                self.finish(vec![Effect::StopTracking], Outcome::Abandoned)
            }
            (Wait::Retry, Event::RetryTimerFired) => self.begin_attempt(),
            (Wait::Retry, Event::Tick) if self.retry_at.is_some_and(|at| now >= at) => {
                self.begin_attempt()
            }
            (Wait::CloseServer | Wait::Unlink | Wait::Disconnect, Event::Cancel) => Vec::new(),
            (_, Event::Cancel) => self.finish(
                vec![Effect::StopTracking, Effect::AllowClients],
                Outcome::Abandoned,
            ),
            (
                Wait::Connect,
                Event::Connected {
                    flags,
                    link,
                    resumable,
                },
            ) => self.connected(now, flags, link, resumable),
            (Wait::Connect, Event::ConnectFailed { outcome, message }) => {
                self.connect_failed(now, outcome, message)
            }
            (Wait::Connect, Event::Failed { reason }) => {
                self.connect_failed(now, FirstOutcome::FailConnect, reason)
            }
            (
                Wait::Retry | Wait::CloseServer | Wait::Unlink | Wait::Disconnect,
                Event::Failed { .. },
            ) => Vec::new(),
            (_, Event::Failed { reason }) => self.retry(now, reason),
            (Wait::Resume, Event::ResumeAnswer { checkpoint, empty }) => {
                self.resume_answered(now, checkpoint, empty, true)
            }
            (Wait::WindowCapacity, Event::Capacity { capacity, .. }) => {
                let a = self.attempt_mut();
                a.note_round_trip(capacity);
                let (offset, len, below) =
                    (a.window_start, a.window_end - a.window_start, a.window_end);
                // Clients' changes behind the end of this window will have
                // to be sent again: pace them to what the destination can
                // take, as measured so far (policy.rs), so that the dirty
                // passes after the sweep start with little to do. Changes
                // ahead of it cost nothing.
                let held = a.resumed;
                self.wait = Wait::WindowExtents;
                vec![
                    Effect::SetPace { capacity, below },
                    Effect::AskExtents { offset, len, held },
                ]
            }
            (Wait::WindowExtents, Event::Extents(extents)) => {
                let a = self.attempt_mut();
                a.extents = extents.into();
                a.pos = a.window_start;
                self.sweep_next(now, Vec::new())
            }
            (Wait::SweepSent { data }, Event::Sent) => self.sweep_sent(now, data),
            (Wait::SweepSent { data }, Event::Compared { same, differed }) => {
                let line = self.compared(same, differed);
                let mut out = self.sweep_sent(now, data);
                if let Some(line) = line {
                    out.insert(0, Effect::Log(Level::Info, line));
                }
                out
            }
            (Wait::ChunkCapacity, Event::Capacity { capacity, .. }) => {
                self.attempt_mut().note_round_trip(capacity);
                let below = self.attempt_mut().window_end;
                self.sweep_next(now, vec![Effect::SetPace { capacity, below }])
            }
            (
                Wait::PassCapacity,
                Event::Capacity {
                    capacity,
                    speed_limit,
                },
            ) => {
                // The migration's speed as measured so far (the
                // destination's costs, the speed limit, the connection's
                // throughput) decides how far apart dirty ranges may be and
                // still go as one write, and how fast clients may dirty more
                // (policy.rs).
                let (window, chunk, block) =
                    (self.config.window, self.config.chunk, self.config.block);
                let a = self.attempt_mut();
                a.note_round_trip(capacity);
                a.capacity = capacity;
                a.speed_limit = speed_limit;
                a.gap = capacity.map_or(0, |c| c.gap(block));
                let gap = a.gap;
                self.wait = Wait::PassTake;
                vec![
                    Effect::SetPace {
                        capacity,
                        below: u64::MAX,
                    },
                    Effect::TakeDirty {
                        max_bytes: window,
                        max_run: chunk,
                        gap,
                    },
                ]
            }
            (Wait::PassTake, Event::DirtyTaken(ranges)) => {
                let a = self.attempt_mut();
                a.took_any = !ranges.is_empty();
                a.ranges = ranges.into();
                self.pass_next(now)
            }
            (Wait::PassSent, Event::Sent) => self.pass_next(now),
            (Wait::PassQueue, Event::QueueDrained) => {
                self.wait = Wait::PassMeasure;
                vec![Effect::Measure]
            }
            (
                Wait::PassMeasure,
                Event::Measured {
                    dirty_bytes,
                    in_flight,
                    in_flight_bytes,
                    queued_bytes,
                },
            ) => {
                let a = self.attempt_mut();
                a.remaining = dirty_bytes + in_flight_bytes;
                a.queued = queued_bytes.min(in_flight_bytes);
                a.to_carry = dirty_bytes + a.queued;
                // Requests as bytes: only those still queued cost the
                // cut-off any time. Counting every one in flight, a round
                // trip's worth of 4 KiB writes long past the link looked
                // like 58 ms of the destination's work at 50 ms.
                a.in_flight = if in_flight_bytes > 0 {
                    (in_flight as u128 * a.queued as u128).div_ceil(in_flight_bytes as u128) as u64
                } else {
                    in_flight
                };
                a.measured_at = Some(now);
                let convergence = a.convergence.as_ref().expect("converging");
                match convergence.requests_wanted(a.to_carry, a.capacity, now) {
                    Some(most) => {
                        let (gap, limit) = (a.gap, most.saturating_sub(a.in_flight));
                        self.wait = Wait::PassRuns;
                        vec![Effect::CountRuns { gap, limit }]
                    }
                    None => self.decide(0),
                }
            }
            (Wait::PassRuns, Event::Runs(runs)) => self.decide(runs),
            (Wait::PassIdle { flush: true }, Event::Idle) => {
                // A destination that takes checkpoints gets this plain
                // FLUSH only when no data went since its last checkpoint
                // (converge_ahead): there is nothing for a checkpoint to
                // hold, and its marker rewrite (two fsyncs) was an eighth
                // of a sparse 1 TiB migration.
                self.attempt_mut().flush_started = Some(now);
                self.wait = Wait::PassFlush;
                vec![Effect::Flush]
            }
            (Wait::PassIdle { flush: false }, Event::Idle) => self.pass_top(now, Vec::new()),
            (Wait::PassFlush, Event::Reply { error }) => {
                if error != 0 {
                    return self.retry(
                        now,
                        format!("the destination answered the final flush with error {error}"),
                    );
                }
                let mut out = Vec::new();
                let (quick, max) = (self.config.quick_flush, self.config.max_flushes);
                let a = self.attempt_mut();
                a.flushes += 1;
                let took = now.saturating_duration_since(a.flush_started.unwrap_or(now));
                let line = format!(
                    "flush {} before the cut-off answered in {:.1} ms (round trip {:.1} ms)",
                    a.flushes,
                    took.as_secs_f64() * 1e3,
                    a.round_trip.as_secs_f64() * 1e3
                );
                // The round trip is the link's, not the destination's
                // sync: over 50 ms no flush would ever be quick. And a
                // flush that syncs about as much as the one before shows
                // clients dirtying a round trip's worth each time: another
                // would sync as much again.
                let synced = took.saturating_sub(a.round_trip);
                let shrinking = a
                    .last_flush_sync
                    .is_none_or(|before| synced.as_secs_f64() <= before.as_secs_f64() * 0.75);
                a.last_flush_sync = Some(synced);
                if synced <= quick || !shrinking || a.flushes >= max {
                    // No more flushes: the cut-off comes once the
                    // remainder is small enough.
                    a.flushes_done = true;
                    a.flush_quick = synced <= quick;
                    if !a.flush_quick {
                        // What clients wrote during it gets passes of its own.
                        a.extra_passes = 0;
                        a.before_extra = None;
                    }
                    // Look again at once: a pass now would send, unsynced,
                    // what clients wrote during the flush, and give them
                    // that pass's time to write more.
                    a.flushed = true;
                    self.wait = Wait::PassMeasure;
                    out.extend([Effect::Log(Level::Info, line), Effect::Measure]);
                    return out;
                }
                // A slow flush: clients wrote meanwhile. Converge again,
                // extra passes and all.
                a.extra_passes = 0;
                a.before_extra = None;
                out.push(Effect::Log(Level::Info, line));
                self.pass_top(now, out)
            }
            (Wait::CutOff, Event::ClientsCutOff) => self.final_take(),
            (Wait::FinalTake, Event::DirtyTaken(ranges)) => {
                if ranges.is_empty() {
                    // Entrust right behind the last changes, without
                    // waiting a round trip for their replies: it tells the
                    // destination how many came before it, and is refused
                    // if one went missing or failed. Answered only once
                    // the destination has everything durable.
                    self.wait = Wait::Entrust;
                    return vec![Effect::SetPhase(Phase::Entrusting), Effect::Entrust];
                }
                self.attempt_mut().ranges = ranges.into();
                self.final_next()
            }
            (Wait::FinalSent, Event::Sent) => self.final_next(),
            (Wait::Entrust, Event::Reply { error: 0 }) => {
                // Done only once every change before it was answered
                // without error too (a destination answers in order; this
                // does not rely on it).
                self.wait = Wait::EntrustIdle;
                vec![Effect::WaitIdle]
            }
            (Wait::EntrustIdle, Event::Idle) => self.entrusted(now),
            (Wait::Entrust, Event::Reply { error: EINVAL }) => {
                // An old (C) destination: it syncs every write before its
                // reply, and FLUSH covers anything else once every write
                // is answered.
                self.wait = Wait::EntrustFlushIdle;
                vec![
                    Effect::Log(
                        Level::Info,
                        "destination does not know entrust; sending FLUSH instead".into(),
                    ),
                    Effect::WaitIdle,
                ]
            }
            (Wait::EntrustFlushIdle, Event::Idle) => {
                self.wait = Wait::EntrustFlush;
                vec![Effect::Flush]
            }
            (Wait::Entrust, Event::Reply { error }) => self.retry(
                now,
                format!("the destination answered entrust with error {error}"),
            ),
            (Wait::EntrustFlush, Event::Reply { error: 0 }) => self.entrusted(now),
            (Wait::EntrustFlush, Event::Reply { error }) => self.retry(
                now,
                format!("the destination answered the final flush with error {error}"),
            ),
            (Wait::CloseServer, Event::ServerClosed) => {
                if self.config.action == MirrorAction::Unlink {
                    self.wait = Wait::Unlink;
                    return vec![Effect::Unlink];
                }
                self.disconnect(now, Vec::new())
            }
            (Wait::Unlink, Event::Unlinked(Err(e))) => {
                // The source stays canonical (table row 1): do not hand off.
                let why = format!("cannot unlink {}: {e}", self.config.path);
                self.done(Vec::new(), Outcome::DisconnectFailed(why))
            }
            (Wait::Unlink, Event::Unlinked(Ok(()))) => {
                let line = format!("unlinked {}", self.config.path);
                self.disconnect(now, vec![Effect::Log(Level::Info, line)])
            }
            (Wait::Disconnect, Event::DisconnectSent(Ok(()))) => {
                let lockout = self.attempt_mut().lockout;
                let line = format!(
                    "migration complete: DISCONNECT sent to {}; clients were shut out for {lockout:?}",
                    self.config.target
                );
                self.done(
                    vec![
                        Effect::Log(Level::Info, line),
                        Effect::Milestone(Milestone::DisconnectSent),
                    ],
                    Outcome::HandedOff,
                )
            }
            (Wait::Disconnect, Event::DisconnectSent(Err(e))) => {
                let why = format!("sending DISCONNECT to {} failed: {e}", self.config.target);
                self.done(Vec::new(), Outcome::DisconnectFailed(why))
            }
            // Anything else answers nothing outstanding.
            _ => Vec::new(),
        }
    }

    fn attempt_mut(&mut self) -> &mut Attempt {
        self.attempt
            .as_mut()
            .expect("an attempt is connected in every state that answers to it")
    }

    fn begin_attempt(&mut self) -> Vec<Effect> {
        self.attempts += 1;
        self.attempt = None;
        self.retry_at = None;
        self.wait = Wait::Connect;
        vec![
            Effect::BeginAttempt {
                attempt: self.attempts,
            },
            Effect::Connect,
        ]
    }

    fn connect_failed(
        &mut self,
        now: Instant,
        outcome: FirstOutcome,
        message: String,
    ) -> Vec<Effect> {
        if self.reported_first {
            return self.retry(now, message);
        }
        self.reported_first = true;
        let line = format!("migration to {} failed: {message}", self.config.target);
        self.finish(
            vec![
                Effect::Log(Level::Warn, line),
                Effect::StopTracking,
                Effect::ReportFirst(outcome),
            ],
            Outcome::FirstAttemptFailed(outcome),
        )
    }

    fn connected(
        &mut self,
        now: Instant,
        flags: u16,
        link: String,
        resumable: bool,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        if !self.reported_first {
            self.reported_first = true;
            out.push(Effect::ReportFirst(FirstOutcome::Go));
        }
        out.push(Effect::Log(
            Level::Info,
            format!(
                "migration attempt {} connected to {} ({link}, flags 0x{flags:04x})",
                self.attempts, self.config.target
            ),
        ));
        self.attempt = Some(Attempt::new(flags, now));
        if !resumable {
            // The C flexnbd or an older one: it is asked nothing new.
            if self.config.verify {
                out.push(Effect::Log(
                    Level::Warn,
                    format!(
                        "{} does not offer digests (an older or C flexnbd): --verify cannot \
                         compare, copying everything",
                        self.config.target
                    ),
                ));
            }
            out.extend(self.resume_answered(now, None, false, false));
            return out;
        }
        self.wait = Wait::Resume;
        out.push(Effect::QueryResume {
            migration: self.config.migration,
        });
        out
    }

    /// The destination said which checkpoint of this migration it holds:
    /// resume from it when it is at least the one this source last saw
    /// answered (an older one, or none, and nothing is trusted).
    /// `offered`: the destination offered the extensions (else it was not
    /// asked, and nothing of them is used).
    fn resume_answered(
        &mut self,
        now: Instant,
        answer: Option<u64>,
        empty: bool,
        offered: bool,
    ) -> Vec<Effect> {
        let (migration, target) = (self.config.migration, self.config.target.clone());
        let verify = self.config.verify;
        let held = self.held_checkpoint;
        let resume = held > 0 && answer.is_some_and(|k| k >= held);
        let mut out = Vec::new();
        if !resume {
            self.held_checkpoint = 0;
        }
        match answer {
            None => {}
            Some(_) if resume => out.push(Effect::Log(
                Level::Info,
                format!(
                    "resuming migration {migration:016x} to {target} from checkpoint {held}: \
                     what it held then and no client changed since is not sent again"
                ),
            )),
            Some(k) if k > 0 => out.push(Effect::Log(
                Level::Info,
                format!(
                    "{target} holds checkpoint {k} of migration {migration:016x}, but this source \
                     trusts {}: copying everything",
                    if held == 0 {
                        "nothing of it".to_string()
                    } else {
                        format!("only checkpoint {held} and later")
                    }
                ),
            )),
            Some(_) => {}
        }
        let a = self.attempt_mut();
        a.checkpoints = answer.is_some();
        a.resumed = resume;
        // `--verify` compares everything. A flexnbd destination that holds
        // nothing of this migration may still hold an earlier copy (this
        // source restarted and drew a new id): compare while it matches,
        // unless it said its image holds no data at all (the probe of the
        // first window then only cost a round trip or two).
        a.compare = offered && (verify || (answer.is_some() && !resume && !empty));
        if answer.is_some() && !resume && empty && !verify {
            out.push(Effect::Log(
                Level::Info,
                format!("{target} holds no data: sending the image without comparing"),
            ));
        }
        a.adaptive = !verify && a.compare;
        a.next_checkpoint = held.max(answer.unwrap_or(0)) + 1;
        // Track changes from here on. The sweep need not wait for the
        // allocation map: until it is built, extents come from the file.
        out.push(Effect::StartTracking);
        out.push(Effect::BeginHeld { resume });
        out.push(Effect::SetPhase(Phase::Copying));
        self.next_window(now, out)
    }

    /// What a compared range showed; an adaptive comparison stops at the
    /// first window where less than half matched.
    fn compared(&mut self, same: u64, differed: u64) -> Option<String> {
        let (probe, window) = (self.config.compare_probe, self.config.compare_window);
        let target = self.config.target.clone();
        let a = self.attempt_mut();
        let window = if a.judged { window } else { probe };
        a.window_same += same;
        a.window_differed += differed;
        if !a.adaptive || a.window_same + a.window_differed < window {
            return None;
        }
        a.judged = true;
        let mut line = None;
        if a.window_same < a.window_differed {
            a.compare = false;
            line = Some(format!(
                "{target} holds little of this image ({} of the last {} bytes compared matched): sending the rest instead of comparing",
                a.window_same,
                a.window_same + a.window_differed
            ));
        }
        a.window_same = 0;
        a.window_differed = 0;
        line
    }

    /// A checkpoint is due: none is outstanding, the destination takes
    /// them, and enough data and time went by since the last was asked.
    fn checkpoint_due(&self, now: Instant) -> bool {
        let (every, gap) = (self.config.checkpoint_every, self.config.checkpoint_gap);
        self.attempt.as_ref().is_some_and(|a| {
            a.checkpoints
                && a.checkpoint_out.is_none()
                && a.since_checkpoint >= every
                && now.saturating_duration_since(a.last_checkpoint) >= gap
        })
    }

    /// A checkpoint is due at the top of a dirty pass: none is outstanding,
    /// enough data went since the last, and the pass gap has passed.
    fn pass_checkpoint_due(&self, now: Instant) -> bool {
        let (gap, every) = (
            self.config.pass_checkpoint_gap,
            self.config.pass_checkpoint_every,
        );
        self.attempt.as_ref().is_some_and(|a| {
            a.checkpoints
                && a.checkpoint_out.is_none()
                && a.since_checkpoint >= every.max(1)
                && now.saturating_duration_since(a.last_checkpoint) >= gap
        })
    }

    /// A checkpoint sent without waiting for its answer: the link stays
    /// busy while the destination syncs, where waiting for every reply and
    /// then the sync left it idle for a round trip and the sync each time
    /// (a sync of scattered writes took 200 ms at 1 Gbit/s).
    fn send_checkpoint(&mut self, now: Instant) -> Effect {
        let migration = self.config.migration;
        let a = self.attempt_mut();
        a.last_checkpoint = now;
        a.checkpoint_covers = std::mem::take(&mut a.since_checkpoint);
        a.checkpoint_out = Some(a.next_checkpoint);
        Effect::SendCheckpoint {
            migration,
            checkpoint: a.next_checkpoint,
        }
    }

    /// The checkpoint sent without waiting was answered without error.
    /// Held only if every request before it was answered without error
    /// too; either way the destination's marker now names it, so the next
    /// one takes the next number. Its sync over what it covered is what a
    /// byte costs entrust to sync; one sent as the flush before the
    /// cut-off (`flush_out`) now counts as that flush.
    fn checkpoint_answered(
        &mut self,
        now: Instant,
        checkpoint: u64,
        held: bool,
        sync: Duration,
    ) -> Vec<Effect> {
        let Some(a) = self.attempt.as_mut() else {
            return Vec::new();
        };
        if a.checkpoint_out != Some(checkpoint) {
            return Vec::new();
        }
        a.checkpoint_out = None;
        let flush = std::mem::take(&mut a.flush_out);
        let mut out = Vec::new();
        if flush && held && a.checkpoint_covers > 0 {
            // What it covered is what it synced (the link was nearly idle
            // when it went): the rate entrust's sync is judged by.
            a.sync_per_byte = Some(sync.as_secs_f64() / a.checkpoint_covers as f64);
            a.last_flush_covers = a.checkpoint_covers;
        }
        if flush {
            a.flushes += 1;
            a.flushed |= held;
            let took = now.saturating_duration_since(a.last_checkpoint);
            out.push(Effect::Log(
                Level::Info,
                format!(
                    "flush {} before the cut-off (checkpoint {checkpoint}, sent ahead) answered \
                     in {:.1} ms, {:.1} ms of it the destination's sync (round trip {:.1} ms)",
                    a.flushes,
                    took.as_secs_f64() * 1e3,
                    sync.as_secs_f64() * 1e3,
                    a.round_trip.as_secs_f64() * 1e3
                ),
            ));
        }
        if held {
            out.extend(self.checkpointed(now));
            return out;
        }
        a.next_checkpoint += 1;
        out.push(Effect::Log(
            Level::Warn,
            format!(
                "checkpoint {checkpoint} was answered while requests sent before it were \
                 still unanswered: what it covers is not counted as held"
            ),
        ));
        out
    }

    /// Checkpoint `k` was answered 0: everything sent is held. The log
    /// line says how much it covers: what an interruption before the next
    /// one may cost again.
    fn checkpointed(&mut self, now: Instant) -> Vec<Effect> {
        let migration = self.config.migration;
        let a = self.attempt_mut();
        let (k, covers) = (a.next_checkpoint, a.checkpoint_covers);
        let took = now.saturating_duration_since(a.last_checkpoint);
        a.next_checkpoint += 1;
        self.held_checkpoint = k;
        vec![
            Effect::Held { checkpoint: k },
            Effect::Log(
                Level::Info,
                format!(
                    "checkpoint {k} of migration {migration:016x} held ({:.1} ms after it was \
                     asked): {covers} bytes of data sent since the previous one are durable on \
                     the destination",
                    took.as_secs_f64() * 1e3
                ),
            ),
        ]
    }

    /// The sweep's next window, or the end of the sweep.
    fn next_window(&mut self, now: Instant, mut out: Vec<Effect>) -> Vec<Effect> {
        let (size, window) = (self.config.size, self.config.window);
        let a = self.attempt_mut();
        a.window_start = a.window_end;
        if a.window_start >= size {
            out.push(Effect::SweepProgress(size));
            return self.begin_converging(now, out);
        }
        a.window_end = a.window_start + window.min(size - a.window_start);
        // Clear first, then look: a write that lands after the clear is
        // either seen by the extents asked next or marked dirty again.
        out.push(Effect::ClearDirty {
            offset: a.window_start,
            len: a.window_end - a.window_start,
        });
        out.push(Effect::MeasureCapacity);
        self.wait = Wait::WindowCapacity;
        out
    }

    /// The sweep's next piece.
    fn sweep_next(&mut self, now: Instant, mut out: Vec<Effect>) -> Vec<Effect> {
        let (chunk, zero_chunk) = (self.config.chunk, self.config.zero_chunk);
        let (compare_window, compare_probe, compare_chunk) = (
            self.config.compare_window,
            self.config.compare_probe,
            self.config.compare_chunk,
        );
        let a = self.attempt_mut();
        while a.extent.is_none() {
            match a.extents.pop_front() {
                // The destination holds it: nothing to send.
                Some((len, Extent::Held)) => {
                    a.pos += len;
                    a.skipped += len;
                    out.push(Effect::SweepSkipped(len));
                    out.push(Effect::SweepProgress(a.pos));
                }
                Some((len, kind)) => {
                    a.extent = Some((a.pos, a.pos + len, kind == Extent::Hole, a.pos))
                }
                None => return self.next_window(now, out),
            }
        }
        let (start, end, hole, at) = a.extent.expect("an extent is current");
        if at >= end {
            // An empty extent: nothing to send.
            a.extent = None;
            a.pos = end;
            return self.sweep_next(now, out);
        }
        let piece = if !hole {
            // A chunk at a time, so status shows progress inside a long
            // extent (a throttled 8 MiB extent would otherwise show none).
            // Compared, a longer piece, up to where its window is judged.
            let n = if a.compare {
                let judged_at = if a.judged {
                    compare_window
                } else {
                    compare_probe
                };
                let left = judged_at.saturating_sub(a.window_same + a.window_differed);
                let left = if a.adaptive { left.max(1) } else { u64::MAX };
                (end - at).min(compare_chunk).min(left)
            } else {
                (end - at).min(chunk)
            };
            a.piece = n;
            if a.compare {
                Effect::CompareData { offset: at, len: n }
            } else {
                Effect::SendData { offset: at, len: n }
            }
        } else if a.can_zero {
            let n = (end - at).min(zero_chunk);
            Effect::SendHole {
                offset: at,
                len: n,
                zeroes: true,
            }
        } else if a.compare {
            // Without WRITE_ZEROES a hole would travel as zeros: compare
            // it instead (a hole digests without being read).
            Effect::CompareData {
                offset: start,
                len: end - start,
            }
        } else {
            // Zeros the destination recognises and keeps as holes; the
            // driver sends them in pieces the speed limit allows.
            Effect::SendHole {
                offset: start,
                len: end - start,
                zeroes: false,
            }
        };
        self.wait = Wait::SweepSent { data: !hole };
        out.push(piece);
        out
    }

    fn sweep_sent(&mut self, now: Instant, data: bool) -> Vec<Effect> {
        let zero_chunk = self.config.zero_chunk;
        let a = self.attempt_mut();
        let (start, end, hole, from) = a.extent.expect("a piece of an extent was sent");
        let at = match (hole, a.can_zero) {
            (false, _) => from + a.piece,
            (true, true) => from + (end - from).min(zero_chunk),
            (true, false) => end,
        };
        a.extent = Some((start, end, hole, at));
        let mut out = Vec::new();
        if at >= end {
            a.extent = None;
            a.pos = end;
        }
        if data {
            a.since_checkpoint += at - from;
            a.swept_data += at - from;
            out.push(Effect::SweepProgress(at));
            if self.checkpoint_due(now) {
                out.push(self.send_checkpoint(now));
            }
            out.push(Effect::MeasureCapacity);
            self.wait = Wait::ChunkCapacity;
            return out;
        }
        if at >= end {
            out.push(Effect::SweepProgress(end));
        }
        self.sweep_next(now, out)
    }

    /// Dirty passes until the remainder is small enough to cut off. The
    /// first time it is, FLUSH: the bulk becomes durable while clients
    /// still run, so the entrust after the cut-off syncs only a little.
    fn begin_converging(&mut self, now: Instant, mut out: Vec<Effect>) -> Vec<Effect> {
        let a = self.attempt_mut();
        a.converging_since = Some(now);
        a.sweep_time = now.saturating_duration_since(a.started);
        a.convergence = Some(Convergence::new(now));
        // When the first "not converging" warning is due (then every minute).
        a.warn_at = Some(now + policy::PATIENCE * 2);
        if a.resumed {
            out.push(Effect::Log(
                Level::Info,
                format!(
                    "resumed sweep done in {:.3} s: {} bytes of data sent, {} bytes the destination held skipped",
                    a.sweep_time.as_secs_f64(),
                    a.swept_data,
                    a.skipped
                ),
            ));
        }
        out.push(Effect::SetPhase(Phase::Converging));
        self.pass_top(now, out)
    }

    fn pass_top(&mut self, now: Instant, mut out: Vec<Effect>) -> Vec<Effect> {
        // Once the remainder is small enough to cut off (an extra pass),
        // the flush before the cut-off is the next checkpoint
        // (converge_ahead): one asked here would have to be waited for
        // first, a round trip and its sync with the link idle. (Not before:
        // asked only when the remainder is small, the flush would sync all
        // of the sweep's last changes, 57 MB or 110 ms at 1 Gbit/s and
        // 50 ms, where pass checkpoints in the meantime synced most.)
        if self.pass_checkpoint_due(now) && !self.attempt_mut().ready {
            out.push(self.send_checkpoint(now));
        }
        // What this pass sends comes after any flush so far. (Sent ahead,
        // a flush counts what went after it itself.)
        let a = self.attempt_mut();
        if !a.pipelined() {
            a.flushed = false;
        }
        self.wait = Wait::PassCapacity;
        out.push(Effect::MeasureCapacity);
        out
    }

    fn pass_next(&mut self, now: Instant) -> Vec<Effect> {
        let ready = self.attempt_mut().ready;
        match self.attempt_mut().ranges.pop_front() {
            Some((offset, len)) => {
                // Within a pass too: the first after the sweep sends what
                // clients changed during it, 64 MiB at a time, which the
                // next pass's checkpoint would have to sync all at once
                // (90 MB in 200 ms at 1 Gbit/s and 50 ms).
                let mut out = Vec::new();
                if self.pass_checkpoint_due(now) && !ready {
                    out.push(self.send_checkpoint(now));
                }
                self.attempt_mut().since_checkpoint += len;
                self.wait = Wait::PassSent;
                out.push(Effect::SendData { offset, len });
                out
            }
            // An extra pass sent its runs in one burst: measured at once,
            // they would count as still to carry, and the remainder could
            // never look smaller than the pass itself. Measured once the
            // link has carried them, it is what clients wrote meanwhile.
            None if self.attempt_mut().extra_passes > 0 => {
                self.wait = Wait::PassQueue;
                vec![Effect::WaitQueue {
                    max: policy::MAX_ALLOWANCE,
                }]
            }
            None => {
                self.wait = Wait::PassMeasure;
                vec![Effect::Measure]
            }
        }
    }

    /// The cut-off decision, with `runs` writes counted (when asked for).
    fn decide(&mut self, runs: u64) -> Vec<Effect> {
        let target = self.config.target.clone();
        let max_flushes = self.config.max_flushes;
        let a = self.attempt_mut();
        let now = a.measured_at.expect("measured before deciding");
        let in_flight = a.in_flight;
        let convergence = a.convergence.as_mut().expect("converging");
        convergence.note(a.to_carry, now);
        let estimate = convergence.estimate(a.to_carry, |_| in_flight + runs, a.capacity, now);
        a.ready = estimate.ready();
        let mut out = vec![Effect::SetEstimate(estimate)];
        let since = a.converging_since.expect("converging");
        if !estimate.ready() && a.warn_at.is_some_and(|w| now >= w) {
            a.warn_at = Some(now + WARN_EVERY);
            out.push(Effect::Log(
                Level::Warn,
                format!(
                    "migration to {target} not converging after {:.0} s: {}",
                    now.saturating_duration_since(since).as_secs_f64(),
                    not_converging_reason(&estimate, a.remaining, a.speed_limit)
                ),
            ));
        }
        if estimate.ready() {
            // Small enough to cut off. First, while it pays, more passes
            // make it smaller (policy::another_pass); then a FLUSH makes
            // everything sent durable while clients still run, so that
            // entrust, after the cut-off, syncs only the last changes.
            // Flushing repeats until one is quick, at most max_flushes
            // times. A destination without FLUSH syncs every write.
            let remainder = estimate.remainder.unwrap_or_default();
            let may_flush = a.can_flush && !a.flushes_done && a.flushes < max_flushes;
            // Extra passes come before the flush; after it only when it was
            // the last and not quick: over a long round trip clients dirty
            // a round trip's worth during every flush, and only passes
            // shrink that.
            let pipelined = a.pipelined();
            let passes_now = if pipelined {
                !a.flushed
            } else {
                !a.flushed || (a.flushes_done && !a.flush_quick)
            };
            if passes_now && policy::another_pass(remainder, a.before_extra, a.extra_passes) {
                a.extra_passes += 1;
                a.before_extra = Some(remainder);
                out.push(Effect::Log(
                    Level::Info,
                    format!(
                        "{} bytes left would take {:.1} ms: extra pass {} before the cut-off",
                        a.remaining,
                        remainder.as_secs_f64() * 1e3,
                        a.extra_passes
                    ),
                ));
                return self.pass_top(now, out);
            }
            if pipelined && (a.flushed || a.since_checkpoint > 0 || a.checkpoint_out.is_some()) {
                return self.converge_ahead(now, estimate, out);
            }
            if a.flushed || !may_flush {
                if a.checkpoint_out.is_some() {
                    // The destination answers entrust only after that
                    // checkpoint's sync: wait for it while clients still
                    // run, not while they are shut out.
                    self.wait = Wait::PassIdle { flush: false };
                    out.push(Effect::WaitIdle);
                    return out;
                }
                return self.converged(now, &estimate, out);
            }
            self.wait = Wait::PassIdle { flush: true };
            out.push(Effect::WaitIdle);
            return out;
        }
        let a = self.attempt_mut();
        if !a.took_any {
            if a.queued > 0 && a.capacity.is_some() {
                // Nothing dirty right now, and the last pass's burst still
                // queued for the link: look again once it went. Waiting for
                // every reply instead idled the link a round trip and a
                // pass checkpoint's sync each time (two gaps of 60 ms in
                // the last 300 ms of a migration over 50 ms).
                self.wait = Wait::PassQueue;
                out.push(Effect::WaitQueue {
                    max: policy::MAX_ALLOWANCE,
                });
                return out;
            }
            // Nothing dirty and nothing queued: wait for the writes in
            // flight, then look again.
            self.wait = Wait::PassIdle { flush: false };
            out.push(Effect::WaitIdle);
            return out;
        }
        self.pass_top(now, out)
    }

    /// The end of converging with a destination that takes checkpoints:
    /// the flush before the cut-off is a checkpoint sent ahead, and the
    /// dirty passes go on while the destination syncs. Waiting for every
    /// reply and then the flush left the link idle two round trips a
    /// flush: half a second of a 5 s migration over 50 ms.
    ///
    /// The cut-off comes once no checkpoint is outstanding and a flush
    /// sent with the remainder small was held, unless entrust's sync of
    /// what went since (at the cost a byte that flush showed) would not
    /// fit the allowance beside the remainder and is less than that flush
    /// covered: then another. (Cutting off without a flush, on the cost a
    /// byte an earlier checkpoint showed, once shut clients out for 57 ms
    /// against 25 at 0.2 ms: that cost came from other writes, or from
    /// answers the destination had sent in a batch.)
    fn converge_ahead(
        &mut self,
        now: Instant,
        estimate: Estimate,
        mut out: Vec<Effect>,
    ) -> Vec<Effect> {
        let max_flushes = self.config.max_flushes;
        let a = self.attempt_mut();
        if a.checkpoint_out.is_some() {
            if !a.flushed && !a.flush_out {
                // A pass checkpoint on its way serves as the flush: its
                // time past the round trip counts the queue ahead of it
                // too, so the cost a byte it shows errs high, and another
                // flush follows when what went after it would not fit.
                a.flush_out = true;
            }
            // Its answer comes before Idle: with nothing to send, wait.
            if a.took_any {
                return self.pass_top(now, out);
            }
            self.wait = Wait::PassIdle { flush: false };
            out.push(Effect::WaitIdle);
            return out;
        }
        let remainder = estimate.remainder.unwrap_or_default();
        let (unsynced, sync) = a.entrust_sync();
        let fits = sync.is_some_and(|s| remainder + s <= estimate.allowance);
        // One more flush pays only when entrust's sync would not fit and
        // less went since the last flush than that one covered: what went
        // during it is what clients wrote meanwhile, and another flush
        // would leave as much again.
        let shrinking =
            a.since_checkpoint.saturating_mul(4) <= a.last_flush_covers.saturating_mul(3);
        let again = !fits && shrinking && a.since_checkpoint > 0;
        if (a.flushed && !again) || a.flushes >= max_flushes {
            return self.converged(now, &estimate, out);
        }
        out.push(Effect::Log(
            Level::Info,
            match sync.filter(|_| a.flushed) {
                Some(s) => format!(
                    "{} bytes left would take {:.1} ms, and entrust's sync of the {unsynced} bytes \
                     sent since the last flush {:.1} ms more: flush {} first, sent ahead",
                    a.remaining,
                    remainder.as_secs_f64() * 1e3,
                    s.as_secs_f64() * 1e3,
                    a.flushes + 1
                ),
                None => format!(
                    "{} bytes left would take {:.1} ms: flush {} first, sent ahead",
                    a.remaining,
                    remainder.as_secs_f64() * 1e3,
                    a.flushes + 1
                ),
            },
        ));
        a.flush_out = true;
        out.push(self.send_checkpoint(now));
        if self.attempt_mut().took_any {
            return self.pass_top(now, out);
        }
        self.wait = Wait::PassIdle { flush: false };
        out.push(Effect::WaitIdle);
        out
    }

    /// The converged line, then the cut-off.
    fn converged(
        &mut self,
        now: Instant,
        estimate: &Estimate,
        mut out: Vec<Effect>,
    ) -> Vec<Effect> {
        let a = self.attempt_mut();
        let since = a.converging_since.expect("converging");
        let (unsynced, sync) = a.entrust_sync();
        out.push(Effect::Log(
            Level::Info,
            converged_line(
                now.saturating_duration_since(since),
                a.sweep_time,
                a.remaining,
                a.capacity,
                estimate,
                a.extra_passes,
                sync.map(|s| (unsynced, s)),
            ),
        ));
        self.cut_off(now, out)
    }

    /// Cut clients off, then send the last changes.
    fn cut_off(&mut self, now: Instant, mut out: Vec<Effect>) -> Vec<Effect> {
        let grace = self.config.cutoff_grace;
        self.attempt_mut().cut_at = Some(now);
        out.push(Effect::SetPace {
            capacity: None,
            below: u64::MAX,
        });
        out.push(Effect::CutOffClients { grace });
        self.wait = Wait::CutOff;
        out
    }

    fn final_take(&mut self) -> Vec<Effect> {
        let chunk = self.config.chunk;
        let gap = self.attempt_mut().gap;
        self.wait = Wait::FinalTake;
        vec![Effect::TakeDirty {
            max_bytes: u64::MAX,
            max_run: chunk,
            gap,
        }]
    }

    fn final_next(&mut self) -> Vec<Effect> {
        match self.attempt_mut().ranges.pop_front() {
            Some((offset, len)) => {
                self.wait = Wait::FinalSent;
                vec![Effect::SendData { offset, len }]
            }
            None => self.final_take(),
        }
    }

    /// Everything is durable at the destination.
    fn entrusted(&mut self, now: Instant) -> Vec<Effect> {
        let cut_at = self.attempt_mut().cut_at.expect("cut off before entrust");
        let lockout = now.saturating_duration_since(cut_at);
        if self.config.action == MirrorAction::Nothing {
            return self.done(
                vec![
                    Effect::Log(
                        Level::Info,
                        "migration copied everything; action 'nothing': serving on".into(),
                    ),
                    Effect::StopTracking,
                    Effect::AllowClients,
                    Effect::RecordLockout(lockout),
                ],
                Outcome::CopiedAndKept,
            );
        }
        // The hand-off. Past this point nothing is abandoned.
        self.wait = Wait::CloseServer;
        vec![
            Effect::Completing,
            Effect::SetPhase(Phase::HandingOff),
            Effect::CloseServer,
        ]
    }

    fn disconnect(&mut self, now: Instant, mut out: Vec<Effect>) -> Vec<Effect> {
        let a = self.attempt_mut();
        let cut_at = a.cut_at.expect("cut off before the hand-off");
        a.lockout = now.saturating_duration_since(cut_at);
        out.push(Effect::RecordLockout(a.lockout));
        out.push(Effect::Disconnect);
        self.wait = Wait::Disconnect;
        out
    }

    /// The attempt failed: retry it from scratch after the delay.
    fn retry(&mut self, now: Instant, reason: String) -> Vec<Effect> {
        // An attempt that ran for a while lost something that worked (a
        // blip, a destination restarted): try again at once, since a
        // resumed copy loses only what it would wait. Failing quickly
        // again backs off, doubling up to the retry delay, so a destination
        // that is down is asked about once a second, as ever.
        let ran = self
            .attempt
            .as_ref()
            .map(|a| now.saturating_duration_since(a.started));
        let delay = if ran.is_some_and(|r| r >= self.config.retry_delay) {
            self.next_delay = QUICK_RETRY.min(self.config.retry_delay);
            Duration::ZERO
        } else {
            let d = self.next_delay;
            self.next_delay = (d * 2).min(self.config.retry_delay);
            d
        };
        let when = if delay.is_zero() {
            "at once".to_string()
        } else if delay.subsec_millis() == 0 {
            format!("in {} s", delay.as_secs())
        } else {
            format!("in {:.1} s", delay.as_secs_f64())
        };
        let line = format!(
            "migration attempt {} to {} failed: {reason}; retrying {when}",
            self.attempts, self.config.target,
        );
        self.attempt = None;
        self.retry_at = Some(now + delay);
        self.wait = Wait::Retry;
        vec![
            Effect::Log(Level::Warn, line),
            Effect::SetPace {
                capacity: None,
                below: u64::MAX,
            },
            Effect::AllowClients,
            Effect::SetPhase(Phase::Retrying),
            Effect::ArmRetry { delay },
        ]
    }

    /// The attempt succeeded (as far as it can): tracking stops, the phase
    /// is done, and the mirror ends with `outcome`.
    fn done(&mut self, out: Vec<Effect>, outcome: Outcome) -> Vec<Effect> {
        let mut out = out;
        out.push(Effect::StopTracking);
        out.push(Effect::SetPhase(Phase::Done));
        self.finish(out, outcome)
    }

    fn finish(&mut self, mut out: Vec<Effect>, outcome: Outcome) -> Vec<Effect> {
        self.attempt = None;
        self.wait = Wait::Done;
        out.push(Effect::Finish(outcome));
        out
    }
}

/// The log line at the cut-off decision.
fn converged_line(
    converging: Duration,
    sweep: Duration,
    remaining: u64,
    capacity: Option<Capacity>,
    estimate: &Estimate,
    extra_passes: u32,
    sync: Option<(u64, Duration)>,
) -> String {
    let per = capacity.map_or(String::new(), |c| {
        format!(
            "; the destination takes {:.3} ms a write plus {:.0} MB/s{}",
            c.destination.per_request * 1e3,
            1e-6 / c.destination.per_byte.max(1e-15),
            if c.rate.is_finite() {
                format!(
                    ", the {} {:.1} MB/s",
                    if estimate.bottleneck == Bottleneck::Link {
                        "connection carries"
                    } else {
                        "copy is held to"
                    },
                    c.rate * 1e-6
                )
            } else {
                String::new()
            }
        )
    });
    // How long the remainder should take, and how many passes went to
    // making it smaller once it was small enough (policy::another_pass):
    // with the shut-out the log reports next, a model that is off shows.
    let expect = estimate.remainder.map_or(String::new(), |r| {
        format!(
            " (expected to take {:.1} ms; {extra_passes} extra pass{}{})",
            r.as_secs_f64() * 1e3,
            if extra_passes == 1 { "" } else { "es" },
            sync.map_or(String::new(), |(bytes, d)| format!(
                "; entrust's sync of {bytes} bytes expected to take {:.1} ms",
                d.as_secs_f64() * 1e3
            ))
        )
    });
    format!(
        "converged after {:.3} s of dirty passes (the sweep took {:.3} s): \
         {remaining} bytes left at the cut-off{expect}{per}",
        converging.as_secs_f64(),
        sweep.as_secs_f64(),
    )
}

/// Why a converging migration has not cut off, in words for the log.
pub fn not_converging_reason(e: &Estimate, remaining: u64, limit: Option<u64>) -> String {
    let Some(remainder) = e.remainder else {
        return "the destination's speed is not measured yet".into();
    };
    let limit = limit.map_or(String::new(), |l| format!(" ({l} B/s)"));
    let what = match e.bottleneck {
        Bottleneck::SpeedLimit => format!("the speed limit{limit}"),
        Bottleneck::Link => "the connection's throughput".into(),
        Bottleneck::Destination | Bottleneck::Unknown => "the destination's speed".into(),
    };
    format!(
        "{remaining} bytes still dirty would shut clients out for {} ms at {what}, \
         over the {} ms the cut-off allows; clients write faster than that lets the copy \
         catch up even paced, so clients stay paced and the migration keeps trying \
         (raise the limit with mirror-speed, or stop it with break)",
        remainder.as_millis(),
        e.allowance.as_millis()
    )
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::policy::Costs;
    use crate::proto::flags::{SEND_FLUSH, SEND_WRITE_ZEROES};

    const PATH: &str = "/images/source.img";
    const TARGET: &str = "10.0.0.2:4777";

    fn config(action: MirrorAction) -> SourceConfig {
        SourceConfig {
            window: 200,
            chunk: 100,
            zero_chunk: 100,
            compare_window: 50,
            compare_probe: 50,
            ..SourceConfig::new(TARGET.into(), PATH.into(), 300, action, 1)
        }
    }

    fn capacity() -> Capacity {
        Capacity::new(
            Costs {
                per_request: 1e-4,
                per_byte: 1e-9,
            },
            None,
            None,
        )
    }

    /// Plays the driver with a world that answers every effect the plain
    /// way unless `over` answers it first, one millisecond per answer.
    /// Returns every effect in order, and checks the protocol: only the
    /// last effect of a batch awaits, and a batch ends awaiting or
    /// finishing.
    struct World {
        machine: Source,
        now: Instant,
        effects: Vec<Effect>,
        /// What the dirty passes take, in turn (then nothing).
        dirty: VecDeque<Vec<(u64, u64)>>,
        /// What the final passes after the cut-off take, in turn.
        final_dirty: VecDeque<Vec<(u64, u64)>>,
        flags: u16,
        /// The answer to the resume query (`None`: an error answer).
        resume: Option<u64>,
        /// Whether the resume answer says the image holds no data.
        empty: bool,
        /// Whether the destination offers resuming (else it is the C
        /// flexnbd or an older one, and is asked nothing new).
        resumable: bool,
        /// The connection's round trip, as measured.
        round_trip: Duration,
        /// A checkpoint sent without waiting is answered just before the
        /// answer this many answers later (or before Idle, if sooner);
        /// `checkpoint_error` `Some(k)`: checkpoint `k` is answered with an
        /// error, which fails the connection (that answer becomes `Failed`).
        checkpoint_delay: usize,
        checkpoint_error: Option<u64>,
        /// Whether a checkpoint sent without waiting finds every request
        /// before it answered, and the sync its answer shows.
        checkpoint_held: bool,
        checkpoint_sync: Duration,
    }

    impl World {
        fn new(action: MirrorAction) -> World {
            World {
                machine: Source::new(config(action)),
                now: Instant::now(),
                effects: Vec::new(),
                dirty: VecDeque::new(),
                final_dirty: VecDeque::new(),
                flags: SEND_FLUSH | SEND_WRITE_ZEROES,
                resume: None,
                empty: false,
                resumable: true,
                round_trip: Duration::ZERO,
                checkpoint_delay: 2,
                checkpoint_error: None,
                checkpoint_held: true,
                checkpoint_sync: Duration::from_millis(1),
            }
        }

        fn plain(&mut self, effect: &Effect) -> Event {
            let cut = self.effects.iter().any(|e| {
                *e == Effect::CutOffClients {
                    grace: CUTOFF_GRACE,
                }
            });
            match effect {
                Effect::Connect => Event::Connected {
                    flags: self.flags,
                    link: "NewStyle handshake".into(),
                    resumable: self.resumable,
                },
                Effect::MeasureCapacity => Event::Capacity {
                    capacity: Some(capacity().with_round_trip(self.round_trip)),
                    speed_limit: None,
                },
                // The first half of every window is data, the rest a hole.
                Effect::AskExtents { len, .. } if *len > 50 => {
                    Event::Extents(vec![(50, Extent::Data), (len - 50, Extent::Hole)])
                }
                Effect::AskExtents { len, .. } => Event::Extents(vec![(*len, Extent::Data)]),
                Effect::QueryResume { .. } => Event::ResumeAnswer {
                    checkpoint: self.resume,
                    empty: self.empty,
                },
                Effect::SendData { .. } | Effect::SendHole { .. } => Event::Sent,
                // A destination that holds nothing of the image.
                Effect::CompareData { len, .. } => Event::Compared {
                    same: 0,
                    differed: *len,
                },
                Effect::TakeDirty { .. } if cut => {
                    Event::DirtyTaken(self.final_dirty.pop_front().unwrap_or_default())
                }
                Effect::TakeDirty { .. } => {
                    Event::DirtyTaken(self.dirty.pop_front().unwrap_or_default())
                }
                Effect::Measure => Event::Measured {
                    dirty_bytes: 0,
                    in_flight: 0,
                    in_flight_bytes: 0,
                    queued_bytes: 0,
                },
                Effect::CountRuns { .. } => Event::Runs(1),
                Effect::WaitQueue { .. } => Event::QueueDrained,
                Effect::WaitIdle => Event::Idle,
                Effect::Flush | Effect::Entrust => Event::Reply { error: 0 },
                Effect::CutOffClients { .. } => Event::ClientsCutOff,
                Effect::CloseServer => Event::ServerClosed,
                Effect::Unlink => Event::Unlinked(Ok(())),
                Effect::Disconnect => Event::DisconnectSent(Ok(())),
                Effect::ArmRetry { .. } => Event::RetryTimerFired,
                other => panic!("{other:?} awaits no answer"),
            }
        }

        /// Runs to the end; `over` may answer an effect (given with how
        /// many effects came before it) in place of the plain world.
        fn run(&mut self, mut over: impl FnMut(&Effect, usize) -> Option<Event>) -> Outcome {
            let mut batch = self.machine.start(self.now);
            let mut outstanding: Option<(u64, usize)> = None;
            for _ in 0..10_000 {
                assert!(
                    !batch.is_empty(),
                    "an empty batch after {:?}",
                    self.effects.last()
                );
                let last = batch.len() - 1;
                for (i, e) in batch.iter().enumerate() {
                    assert!(
                        !e.awaits() || i == last,
                        "{e:?} awaits but is not last in {batch:?}"
                    );
                    assert!(
                        !matches!(e, Effect::Finish(_)) || i == last,
                        "Finish is not last in {batch:?}"
                    );
                }
                let effect = batch[last].clone();
                assert!(
                    outstanding.is_none()
                        || !batch
                            .iter()
                            .any(|e| matches!(e, Effect::CutOffClients { .. })),
                    "clients cut off with a checkpoint outstanding: {batch:?}"
                );
                if let Some(k) = batch.iter().find_map(|e| match e {
                    Effect::SendCheckpoint { checkpoint, .. } => Some(*checkpoint),
                    _ => None,
                }) {
                    assert!(outstanding.is_none(), "two checkpoints outstanding");
                    outstanding = Some((k, self.checkpoint_delay));
                }
                self.effects.extend(batch);
                if let Effect::Finish(outcome) = effect {
                    assert!(self.machine.is_finished());
                    return outcome;
                }
                assert!(
                    effect.awaits(),
                    "batch ends with {effect:?}, which awaits nothing"
                );
                let mut event =
                    over(&effect, self.effects.len() - 1).unwrap_or_else(|| self.plain(&effect));
                self.now += Duration::from_millis(1);
                match outstanding {
                    Some((k, left)) if left > 0 && effect != Effect::WaitIdle => {
                        outstanding = Some((k, left - 1));
                    }
                    Some((k, _)) if self.checkpoint_error == Some(k) => {
                        // Once: the retry's checkpoint of that number is
                        // answered.
                        self.checkpoint_error = None;
                        outstanding = None;
                        event = Event::Failed {
                            reason: "the destination answered checkpoint at 1 with error 5".into(),
                        };
                    }
                    Some((k, _)) => {
                        outstanding = None;
                        let held = self.checkpoint_held;
                        let answered = Event::CheckpointAnswered {
                            checkpoint: k,
                            held,
                            sync: self.checkpoint_sync,
                        };
                        let extra = self.machine.handle(self.now, answered);
                        assert!(extra.iter().all(|e| !e.awaits()), "{extra:?}");
                        self.effects.extend(extra);
                    }
                    None => {}
                }
                batch = self.machine.handle(self.now, event);
            }
            panic!(
                "no end after 10000 answers: {:?}",
                &self.effects[self.effects.len() - 40..]
            );
        }

        /// The effects as short words, logs and measurements left out.
        fn script(&self) -> Vec<String> {
            script(&self.effects)
        }

        fn position(&self, what: &str) -> usize {
            self.script()
                .iter()
                .position(|s| s == what)
                .unwrap_or_else(|| panic!("no {what} in {:#?}", self.script()))
        }

        fn logs(&self) -> Vec<String> {
            self.effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Log(_, line) => Some(line.clone()),
                    _ => None,
                })
                .collect()
        }
    }

    fn script(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .filter_map(|e| {
                Some(match e {
                    Effect::Log(..) | Effect::MeasureCapacity | Effect::SetEstimate(_) => {
                        return None
                    }
                    Effect::BeginAttempt { attempt } => format!("begin {attempt}"),
                    Effect::Connect => "connect".into(),
                    Effect::ReportFirst(o) => format!("first {o:?}"),
                    Effect::StartTracking => "track".into(),
                    Effect::StopTracking => "untrack".into(),
                    Effect::SetPhase(p) => format!("phase {p}"),
                    Effect::ClearDirty { offset, len } => format!("clear {offset}+{len}"),
                    Effect::SetPace { capacity, below } => match (capacity, *below) {
                        (None, _) => "unpace".into(),
                        (Some(_), u64::MAX) => "pace all".into(),
                        (Some(_), b) => format!("pace <{b}"),
                    },
                    Effect::AskExtents {
                        offset, len, held, ..
                    } => format!("extents {offset}+{len}{}", if *held { " held" } else { "" }),
                    Effect::QueryResume { .. } => "resume?".into(),
                    Effect::BeginHeld { resume } => {
                        format!("held {}", if *resume { "resume" } else { "fresh" })
                    }
                    Effect::SendCheckpoint { checkpoint, .. } => {
                        format!("CHECKPOINT {checkpoint} ahead")
                    }
                    Effect::Held { checkpoint } => format!("held {checkpoint}"),
                    Effect::SweepSkipped(n) => format!("skipped {n}"),
                    Effect::SendData { offset, len } => format!("data {offset}+{len}"),
                    Effect::CompareData { offset, len } => format!("compare {offset}+{len}"),
                    Effect::SendHole {
                        offset,
                        len,
                        zeroes,
                    } => format!(
                        "{} {offset}+{len}",
                        if *zeroes { "zeroes" } else { "zero-writes" }
                    ),
                    Effect::SweepProgress(o) => format!("swept {o}"),
                    Effect::TakeDirty { max_bytes, .. } if *max_bytes == u64::MAX => {
                        "take all".into()
                    }
                    Effect::TakeDirty { .. } => "take".into(),
                    Effect::Measure => "measure".into(),
                    Effect::CountRuns { .. } => "runs".into(),
                    Effect::WaitIdle => "idle".into(),
                    Effect::WaitQueue { .. } => "queue".into(),
                    Effect::Flush => "FLUSH".into(),
                    Effect::Entrust => "ENTRUST".into(),
                    Effect::CutOffClients { .. } => "cut off".into(),
                    Effect::AllowClients => "allow".into(),
                    Effect::Completing => "completing".into(),
                    Effect::CloseServer => "close server".into(),
                    Effect::Unlink => "unlink".into(),
                    Effect::RecordLockout(_) => "lockout".into(),
                    Effect::Disconnect => "DISCONNECT".into(),
                    Effect::Milestone(m) => format!("milestone {m:?}"),
                    Effect::ArmRetry { delay } => format!("retry in {delay:?}"),
                    Effect::Finish(o) => format!("finish {o:?}"),
                })
            })
            .collect()
    }

    /// A whole attempt up to the cut-off, as `script` shows it.
    const SWEEP_AND_CONVERGE: &[&str] = &[
        "resume?",
        "track",
        "held fresh",
        "phase copying",
        "clear 0+200",
        "pace <200",
        "extents 0+200",
        "data 0+50",
        "swept 50",
        "pace <200",
        "zeroes 50+100",
        "zeroes 150+50",
        "swept 200",
        "clear 200+100",
        "pace <300",
        "extents 200+100",
        "data 200+50",
        "swept 250",
        "pace <300",
        "zeroes 250+50",
        "swept 300",
        "swept 300",
        "phase converging",
        // Nothing dirty and nothing left: ready, but flushed first.
        "pace all",
        "take",
        "measure",
        "idle",
        "FLUSH",
        // The flush was quick: look again at once, and cut off.
        "measure",
        "unpace",
        "cut off",
        "take all",
        // Entrust right behind the last changes; idle after its reply.
        "phase entrusting",
        "ENTRUST",
        "idle",
    ];

    fn expect(head: &[&str], tail: &[&str]) -> Vec<String> {
        let mut all: Vec<String> = vec!["begin 1".into(), "connect".into(), "first Go".into()];
        all.extend(head.iter().map(|s| s.to_string()));
        all.extend(SWEEP_AND_CONVERGE.iter().map(|s| s.to_string()));
        all.extend(tail.iter().map(|s| s.to_string()));
        all
    }

    #[test]
    fn a_successful_attempt_with_exit_hands_off_in_order() {
        let mut w = World::new(MirrorAction::Exit);
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        assert_eq!(
            w.script(),
            expect(
                &[],
                &[
                    "completing",
                    "phase handing_off",
                    "close server",
                    "lockout",
                    "DISCONNECT",
                    "milestone DisconnectSent",
                    "untrack",
                    "phase done",
                    "finish HandedOff",
                ]
            )
        );
        let logs = w.logs();
        assert!(
            logs[0].starts_with(
                "migration attempt 1 connected to 10.0.0.2:4777 (NewStyle handshake, flags 0x"
            ),
            "{logs:?}"
        );
        assert!(
            logs.iter().any(|l| l.starts_with("converged after ")),
            "{logs:?}"
        );
        assert!(
            logs.last()
                .unwrap()
                .starts_with("migration complete: DISCONNECT sent to 10.0.0.2:4777"),
            "{logs:?}"
        );
        // The lockout runs from the cut-off decision to the DISCONNECT: five
        // answers of a millisecond each (cut off, take, idle, entrust,
        // close).
        let lockout = w.effects.iter().find_map(|e| match e {
            Effect::RecordLockout(d) => Some(*d),
            _ => None,
        });
        assert_eq!(lockout, Some(Duration::from_millis(5)));
    }

    #[test]
    fn a_successful_attempt_with_unlink_unlinks_after_the_entrust_reply_and_before_disconnect() {
        let mut w = World::new(MirrorAction::Unlink);
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        assert_eq!(
            w.script(),
            expect(
                &[],
                &[
                    "completing",
                    "phase handing_off",
                    "close server",
                    "unlink",
                    "lockout",
                    "DISCONNECT",
                    "milestone DisconnectSent",
                    "untrack",
                    "phase done",
                    "finish HandedOff",
                ]
            )
        );
        assert!(w.logs().contains(&format!("unlinked {PATH}")));
    }

    #[test]
    fn a_successful_attempt_with_nothing_lets_clients_in_and_keeps_serving() {
        let mut w = World::new(MirrorAction::Nothing);
        assert_eq!(w.run(|_, _| None), Outcome::CopiedAndKept);
        assert_eq!(
            w.script(),
            expect(
                &[],
                &[
                    "untrack",
                    "allow",
                    "lockout",
                    "untrack",
                    "phase done",
                    "finish CopiedAndKept",
                ]
            )
        );
        assert!(w
            .logs()
            .contains(&"migration copied everything; action 'nothing': serving on".to_string()));
    }

    #[test]
    fn a_destination_without_write_zeroes_gets_holes_as_one_zero_write_each() {
        let mut w = World::new(MirrorAction::Exit);
        w.flags = SEND_FLUSH;
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let sends: Vec<String> = w
            .script()
            .into_iter()
            .filter(|s| s.starts_with("data") || s.starts_with("zero"))
            .collect();
        assert_eq!(
            sends,
            [
                "data 0+50",
                "zero-writes 50+150",
                "data 200+50",
                "zero-writes 250+50"
            ]
        );
    }

    #[test]
    fn a_destination_without_flush_is_not_flushed_before_the_cut_off() {
        let mut w = World::new(MirrorAction::Exit);
        w.flags = SEND_WRITE_ZEROES;
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let script = w.script();
        assert!(!script.contains(&"FLUSH".to_string()), "{script:#?}");
        assert!(script.contains(&"cut off".to_string()));
    }

    /// A world whose destination takes checkpoints: it answers the resume
    /// query with `answer`; the source last saw `held` answered, and
    /// checkpoints every `every` bytes of data.
    fn checkpointing(answer: u64, held: u64, every: u64) -> World {
        let mut w = World::new(MirrorAction::Exit);
        w.resume = Some(answer);
        w.machine = Source::new(SourceConfig {
            checkpoint: held,
            checkpoint_every: every,
            checkpoint_gap: Duration::ZERO,
            ..config(MirrorAction::Exit)
        });
        w
    }

    #[test]
    fn a_destination_that_did_not_offer_resuming_is_asked_nothing_new_even_with_verify() {
        // The C flexnbd or an older one: no resume query, no checkpoint, no
        // digest; a plain FLUSH before the cut-off, as before.
        for verify in [false, true] {
            let mut w = checkpointing(0, 0, 50);
            w.resumable = false;
            w.machine = Source::new(SourceConfig {
                checkpoint_every: 50,
                checkpoint_gap: Duration::ZERO,
                verify,
                ..config(MirrorAction::Exit)
            });
            assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
            let s = w.script();
            for new in ["resume?", "CHECKPOINT", "compare"] {
                assert!(
                    !s.iter().any(|x| x.starts_with(new)),
                    "verify {verify}: {new} went to an old destination: {s:#?}"
                );
            }
            assert!(s.contains(&"FLUSH".to_string()), "{s:#?}");
            assert!(s.contains(&"data 0+50".to_string()), "{s:#?}");
            let warned = w.effects.iter().any(|e| {
                matches!(e, Effect::Log(Level::Warn, line) if line.contains("--verify cannot compare"))
            });
            assert_eq!(warned, verify, "the warning comes with --verify only");
        }
    }

    #[test]
    fn dirty_passes_ask_a_checkpoint_ahead_once_the_last_is_answered_and_the_gap_passed() {
        let run_with = |gap: Duration, dirty: u64| {
            // No checkpoint in the sweep (every 1 TiB); a client's
            // changes make three dirty passes; the last answered 1 ms ago.
            let mut w = checkpointing(0, 0, 1 << 40);
            w.machine = Source::new(SourceConfig {
                checkpoint_every: 1 << 40,
                pass_checkpoint_gap: gap,
                pass_checkpoint_every: 1,
                ..config(MirrorAction::Exit)
            });
            w.dirty = VecDeque::from([vec![(10, 5)], vec![(20, 5)], vec![(30, 5)]]);
            // `dirty` still dirty after the first two passes.
            let mut measures = 0;
            let outcome = w.run(|e, _| match e {
                Effect::Measure if measures < 2 => {
                    measures += 1;
                    Some(Event::Measured {
                        dirty_bytes: dirty,
                        in_flight: 0,
                        in_flight_bytes: 0,
                        queued_bytes: 0,
                    })
                }
                _ => None,
            });
            assert_eq!(outcome, Outcome::HandedOff);
            w
        };
        // A second's worth: far from the cut-off.
        let run = |gap: Duration| run_with(gap, 1_000_000_000);
        let s = run(Duration::ZERO).script();
        let at = |what: &str| {
            s.iter()
                .position(|x| x == what)
                .unwrap_or_else(|| panic!("no {what} in {s:#?}"))
        };
        // The sweep's data, then each pass's, asked for at the top of the
        // next pass while it goes on.
        assert_eq!(at("CHECKPOINT 1 ahead"), at("phase converging") + 1);
        assert!(at("CHECKPOINT 2 ahead") > at("data 10+5"), "{s:#?}");
        assert!(at("CHECKPOINT 2 ahead") < at("data 20+5"), "{s:#?}");
        assert!(at("held 1") < at("CHECKPOINT 2 ahead"), "{s:#?}");
        // Within the gap of the attempt's start: none ahead in the passes,
        // only the flush before the cut-off once the remainder is small.
        let w = run(Duration::from_secs(3600));
        let s = w.script();
        let ahead: Vec<&String> = s.iter().filter(|x| x.ends_with("ahead")).collect();
        assert_eq!(ahead, ["CHECKPOINT 1 ahead"], "{s:#?}");
        assert!(
            w.position("CHECKPOINT 1 ahead") > w.position("data 30+5"),
            "{s:#?}"
        );
        assert!(
            w.logs()
                .iter()
                .any(|l| l.ends_with("flush 1 first, sent ahead")),
            "{:#?}",
            w.logs()
        );
    }

    #[test]
    fn a_long_pass_asks_checkpoints_between_its_writes() {
        // One pass takes three runs; checkpoints are due as often as can
        // be, and the remainder is far from small until that pass is sent.
        let mut w = checkpointing(0, 0, 1 << 40);
        w.machine = Source::new(SourceConfig {
            checkpoint_every: 1 << 40,
            pass_checkpoint_gap: Duration::ZERO,
            pass_checkpoint_every: 1,
            ..config(MirrorAction::Exit)
        });
        w.checkpoint_delay = 1;
        w.dirty = VecDeque::from([vec![(10, 5), (20, 5), (30, 5), (40, 5)]]);
        let mut measures = 0;
        let outcome = w.run(|e, _| match e {
            Effect::Measure if measures < 1 => {
                measures += 1;
                Some(Event::Measured {
                    dirty_bytes: 1_000_000_000,
                    in_flight: 0,
                    in_flight_bytes: 0,
                    queued_bytes: 0,
                })
            }
            _ => None,
        });
        assert_eq!(outcome, Outcome::HandedOff);
        let s = w.script();
        // The pass's top asks one (the sweep's data); once each is
        // answered, the next goes between the pass's writes, covering
        // those before it.
        let at = |what: &str| w.position(what);
        assert!(at("CHECKPOINT 1 ahead") < at("take"), "{s:#?}");
        assert_eq!(s[at("data 10+5") + 1], "CHECKPOINT 2 ahead", "{s:#?}");
        assert!(at("held 1") < at("CHECKPOINT 2 ahead"), "{s:#?}");
        assert_eq!(s[at("data 40+5") - 1], "CHECKPOINT 3 ahead", "{s:#?}");
        assert!(at("held 2") < at("CHECKPOINT 3 ahead"), "{s:#?}");
    }

    #[test]
    fn a_pass_checkpoint_on_its_way_when_the_remainder_is_small_serves_as_the_flush() {
        // One pass of two runs; a checkpoint goes between them; the
        // remainder is small at once, with that one still unanswered.
        let mut w = checkpointing(0, 0, 50);
        w.machine = Source::new(SourceConfig {
            checkpoint_every: 50,
            checkpoint_gap: Duration::ZERO,
            pass_checkpoint_gap: Duration::ZERO,
            pass_checkpoint_every: 1,
            ..config(MirrorAction::Exit)
        });
        w.dirty = VecDeque::from([vec![(10, 5), (20, 5)]]);
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let s = w.script();
        assert_eq!(
            s[w.position("data 10+5") + 1],
            "CHECKPOINT 3 ahead",
            "{s:#?}"
        );
        assert!(w.position("held 3") < w.position("cut off"), "{s:#?}");
        // No other: its sync (1 ms over 5 bytes) makes entrust's of the 5
        // sent after it 1 ms.
        assert!(!s.iter().any(|x| x == "CHECKPOINT 4 ahead"), "{s:#?}");
        assert!(
            w.logs()
                .iter()
                .any(|l| l.starts_with("flush 1 before the cut-off (checkpoint 3, sent ahead)")),
            "{:#?}",
            w.logs()
        );
    }

    #[test]
    fn the_flush_before_the_cut_off_is_sent_ahead_and_repeated_only_while_it_pays() {
        // A pass of 40 bytes, then passes of 5; each flush's sync takes
        // 10 ms; every measure finds `dirtied` bytes dirty.
        let run = |dirtied: u64| {
            let mut w = checkpointing(0, 0, 50);
            w.checkpoint_sync = Duration::from_millis(10);
            w.dirty = VecDeque::from([vec![(10, 40)], vec![(60, 5)], vec![(70, 5)]]);
            let outcome = w.run(|e, _| match e {
                Effect::Measure => Some(Event::Measured {
                    dirty_bytes: dirtied,
                    in_flight: 0,
                    in_flight_bytes: 0,
                    queued_bytes: 0,
                }),
                _ => None,
            });
            assert_eq!(outcome, Outcome::HandedOff);
            w
        };
        // 20 bytes: the flush comes first, as a checkpoint sent ahead, and
        // the passes go on while the destination syncs; its 10 ms over
        // the 40 bytes it covered make entrust's sync of the 5 sent during
        // it and the 20 left 6.2 ms: the cut-off follows its answer.
        let w = run(20);
        let s = w.script();
        let (flush, held, cut) = (
            w.position("CHECKPOINT 3 ahead"),
            w.position("held 3"),
            w.position("cut off"),
        );
        assert_eq!(
            s[flush - 3..flush],
            ["data 10+40", "measure", "runs"],
            "{s:#?}"
        );
        assert!(flush < held && held < cut, "{s:#?}");
        assert!(
            s[flush..held].contains(&"data 60+5".to_string()),
            "a pass while the flush is outstanding: {s:#?}"
        );
        assert!(!s.contains(&"FLUSH".to_string()), "{s:#?}");
        assert!(!s.iter().any(|x| x == "CHECKPOINT 4 ahead"), "{s:#?}");
        assert!(
            w.logs().iter().any(|l| l
                .starts_with("flush 1 before the cut-off (checkpoint 3, sent ahead) answered in")
                && l.contains("10.0 ms of it the destination's sync")),
            "{:#?}",
            w.logs()
        );
        assert!(
            w.logs()
                .iter()
                .any(|l| l.contains("entrust's sync of 25 bytes expected to take 6.2 ms")),
            "{:#?}",
            w.logs()
        );
        // 200 bytes: 51 ms of entrust's sync, and less went since the
        // flush than it covered: one more, then the cut-off (the second
        // covered 5 bytes; as much again would not shrink).
        let w = run(200);
        let s = w.script();
        let second = w.position("CHECKPOINT 4 ahead");
        assert!(w.position("held 3") < second, "{s:#?}");
        assert!(second < w.position("cut off"), "{s:#?}");
        assert!(!s.iter().any(|x| x == "CHECKPOINT 5 ahead"), "{s:#?}");
        assert!(
            w.logs().iter().any(|l| l.contains(
                "and entrust's sync of the 205 bytes sent since the last flush 51.2 ms more: \
                 flush 2 first, sent ahead"
            )),
            "{:#?}",
            w.logs()
        );
    }

    #[test]
    fn with_no_data_sent_since_the_last_checkpoint_the_flush_before_the_cut_off_is_a_plain_flush() {
        // All hole: nothing for a checkpoint to hold.
        let mut w = checkpointing(0, 0, 50);
        let outcome = w.run(|e, _| match e {
            Effect::AskExtents { len, .. } => Some(Event::Extents(vec![(*len, Extent::Hole)])),
            _ => None,
        });
        assert_eq!(outcome, Outcome::HandedOff);
        let s = w.script();
        assert!(!s.iter().any(|x| x.starts_with("CHECKPOINT")), "{s:#?}");
        assert!(s.contains(&"FLUSH".to_string()), "{s:#?}");
    }

    #[test]
    fn checkpoints_in_the_sweep_keep_their_distance_in_time() {
        // Every 50 bytes are due, but the world answers in 1 ms: with the
        // standard 250 ms apart, only the one before the cut-off comes.
        let mut w = checkpointing(0, 0, 50);
        w.machine = Source::new(SourceConfig {
            checkpoint_every: 50,
            ..config(MirrorAction::Exit)
        });
        w.resume = Some(0);
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let s = w.script();
        let checkpoints: Vec<&String> = s.iter().filter(|x| x.starts_with("CHECKPOINT")).collect();
        assert_eq!(checkpoints, ["CHECKPOINT 1 ahead"], "{s:#?}");
        let at = w.position("CHECKPOINT 1 ahead");
        assert_eq!(s[at + 1..at + 3], ["idle", "held 1"]);
    }

    #[test]
    fn a_destination_that_takes_checkpoints_gets_them_in_the_sweep_and_before_the_cut_off() {
        let mut w = checkpointing(0, 0, 50);
        // A client changed 5 bytes behind the sweep: the dirty pass sends
        // them, so the flush before the cut-off has data to hold.
        w.dirty = VecDeque::from([vec![(10, 5)]]);
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let s = w.script();
        // Each 50 bytes of data: a checkpoint right behind them, without
        // waiting for their replies, and the copy goes on while it is
        // answered (two answers later in this world).
        let first = w.position("CHECKPOINT 1 ahead");
        assert_eq!(
            s[first - 2..first + 5],
            // Compared first (no checkpoint of this migration there, but
            // maybe an earlier copy); it all differs, so the rest is sent.
            [
                "compare 0+50",
                "swept 50",
                "CHECKPOINT 1 ahead",
                "pace <200",
                "zeroes 50+100",
                "zeroes 150+50",
                "held 1"
            ]
        );
        let second = w.position("CHECKPOINT 2 ahead");
        assert_eq!(
            s[second - 2..second + 3],
            [
                "data 200+50",
                "swept 250",
                "CHECKPOINT 2 ahead",
                "pace <300",
                "zeroes 250+50"
            ]
        );
        // Answered at the latest before everything is: before idle.
        let held2 = w.position("held 2");
        assert!(held2 < w.position("idle"), "{s:#?}");
        // The flush before the cut-off is a checkpoint too, sent ahead of
        // any reply; no FLUSH goes.
        let third = w.position("CHECKPOINT 3 ahead");
        assert_eq!(s[third - 3..third], ["take", "data 10+5", "measure"]);
        assert_eq!(
            s[third + 1..third + 7],
            ["pace all", "take", "measure", "held 3", "unpace", "cut off"]
        );
        assert!(!s.contains(&"FLUSH".to_string()), "{s:#?}");
        // Nothing was held before: the sweep asked for plain extents.
        assert!(s.contains(&"held fresh".to_string()));
        assert!(s.contains(&"extents 0+200".to_string()));
    }

    #[test]
    fn an_attempt_resumes_from_the_checkpoint_the_destination_still_holds() {
        for answer in [2, 3] {
            let mut w = checkpointing(answer, 2, 1 << 40);
            let outcome = w.run(|e, _| match e {
                Effect::AskExtents { offset: 0, .. } => Some(Event::Extents(vec![
                    (50, Extent::Held),
                    (100, Extent::Hole),
                    (50, Extent::Held),
                ])),
                _ => None,
            });
            assert_eq!(outcome, Outcome::HandedOff);
            let s = w.script();
            let from = w.position("held resume");
            assert_eq!(
                s[from..from + 11],
                [
                    "held resume",
                    "phase copying",
                    "clear 0+200",
                    "pace <200",
                    "extents 0+200 held",
                    "skipped 50",
                    "swept 50",
                    "zeroes 50+100",
                    "swept 150",
                    "skipped 50",
                    "swept 200",
                ]
            );
            assert!(!s.contains(&"data 0+50".to_string()), "{s:#?}");
            // Numbered after the newer of the two.
            let next = format!("CHECKPOINT {}", answer + 1);
            assert!(s.iter().any(|x| x.starts_with(&next)), "{s:#?}");
            assert!(w.logs().contains(
                &"resuming migration 0000000000000001 to 10.0.0.2:4777 from checkpoint 2: what it held then and no client changed since is not sent again"
                    .to_string()
            ));
        }
    }

    #[test]
    fn without_a_checkpoint_as_new_as_the_last_one_answered_everything_is_copied() {
        // An older checkpoint, none, or a source that trusts none.
        for (answer, held) in [(1, 2), (0, 2), (5, 0)] {
            let mut w = checkpointing(answer, held, 1 << 40);
            assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
            let s = w.script();
            assert!(s.contains(&"held fresh".to_string()), "{s:#?}");
            assert!(s.contains(&"extents 0+200".to_string()), "{s:#?}");
            assert!(s.contains(&"compare 0+50".to_string()), "{s:#?}");
            assert!(s.contains(&"data 200+50".to_string()), "{s:#?}");
            let next = format!("CHECKPOINT {}", answer.max(held) + 1);
            assert!(s.iter().any(|x| x.starts_with(&next)), "{s:#?}");
        }
        let w = {
            let mut w = checkpointing(1, 2, 1 << 40);
            w.run(|_, _| None);
            w
        };
        assert!(w.logs().contains(
            &"10.0.0.2:4777 holds checkpoint 1 of migration 0000000000000001, but this source trusts only checkpoint 2 and later: copying everything"
                .to_string()
        ));
        // An old destination: no checkpoint, a FLUSH as before.
        let mut w = World::new(MirrorAction::Exit);
        w.machine = Source::new(SourceConfig {
            checkpoint: 2,
            checkpoint_every: 50,
            ..config(MirrorAction::Exit)
        });
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let s = w.script();
        assert!(s.contains(&"held fresh".to_string()));
        assert!(s.contains(&"FLUSH".to_string()));
        assert!(!s.iter().any(|x| x.starts_with("CHECKPOINT")), "{s:#?}");
    }

    #[test]
    fn verify_compares_the_sweeps_data_and_still_zeroes_its_holes() {
        let mut w = World::new(MirrorAction::Exit);
        w.machine = Source::new(SourceConfig {
            verify: true,
            ..config(MirrorAction::Exit)
        });
        w.dirty = VecDeque::from([vec![(10, 5)]]);
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let s = w.script();
        assert!(s.contains(&"compare 0+50".to_string()), "{s:#?}");
        assert!(s.contains(&"compare 200+50".to_string()), "{s:#?}");
        assert!(s.contains(&"zeroes 50+100".to_string()), "{s:#?}");
        // What clients changed is sent: it differs by definition.
        assert!(s.contains(&"data 10+5".to_string()), "{s:#?}");
        assert!(!s.contains(&"data 0+50".to_string()), "{s:#?}");
    }

    #[test]
    fn the_sweep_compares_long_pieces_that_end_where_a_window_is_judged() {
        // A destination that holds it all: the probe (30) is judged on its
        // own, then pieces of up to 60 (the driver keeps several digests in
        // flight: one round trip each) end at each window's judging (80).
        let mut w = checkpointing(0, 0, 1 << 40);
        w.machine = Source::new(SourceConfig {
            compare_probe: 30,
            compare_window: 80,
            compare_chunk: 60,
            ..config(MirrorAction::Exit)
        });
        let outcome = w.run(|e, _| match e {
            Effect::AskExtents { len, .. } => Some(Event::Extents(vec![(*len, Extent::Data)])),
            Effect::CompareData { len, .. } => Some(Event::Compared {
                same: *len,
                differed: 0,
            }),
            _ => None,
        });
        assert_eq!(outcome, Outcome::HandedOff);
        let compared: Vec<String> = w
            .script()
            .into_iter()
            .filter(|x| x.starts_with("compare"))
            .take(5)
            .collect();
        assert_eq!(
            compared,
            [
                "compare 0+30",
                "compare 30+60",
                "compare 90+20",
                "compare 110+60",
                "compare 170+20"
            ]
        );
    }

    #[test]
    fn a_destination_without_a_checkpoint_is_compared_while_it_matches() {
        // An earlier copy (the source restarted): everything matches, so
        // every data piece is compared and nothing is sent as data.
        let mut w = checkpointing(0, 0, 1 << 40);
        let outcome = w.run(|e, _| match e {
            Effect::CompareData { len, .. } => Some(Event::Compared {
                same: *len,
                differed: 0,
            }),
            _ => None,
        });
        assert_eq!(outcome, Outcome::HandedOff);
        let s = w.script();
        assert!(s.contains(&"compare 0+50".to_string()), "{s:#?}");
        assert!(s.contains(&"compare 200+50".to_string()), "{s:#?}");
        assert!(!s.iter().any(|x| x.starts_with("data ")), "{s:#?}");
        // A destination that holds little: sent from the first window on,
        // and the log says why.
        let mut w = checkpointing(0, 0, 1 << 40);
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let s = w.script();
        assert!(s.contains(&"compare 0+50".to_string()), "{s:#?}");
        assert!(s.contains(&"data 200+50".to_string()), "{s:#?}");
        assert!(
            w.logs().iter().any(|l| l
                .contains("holds little of this image (0 of the last 50 bytes compared matched)")),
            "{:#?}",
            w.logs()
        );
        // An old destination (no RESUME): plain copying, nothing compared.
        let mut w = World::new(MirrorAction::Exit);
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        assert!(!w.script().iter().any(|x| x.starts_with("compare")));
    }

    #[test]
    fn an_empty_destination_is_judged_on_a_short_first_window() {
        // The windows are long, but the first (the probe) is one piece: an
        // empty destination is compared for that long only.
        let mut w = checkpointing(0, 0, 1 << 40);
        w.machine = Source::new(SourceConfig {
            checkpoint_gap: Duration::ZERO,
            compare_window: 10_000,
            compare_probe: 50,
            ..config(MirrorAction::Exit)
        });
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let s = w.script();
        assert!(s.contains(&"compare 0+50".to_string()), "{s:#?}");
        assert!(s.contains(&"data 200+50".to_string()), "{s:#?}");
    }

    #[test]
    fn a_destination_that_says_it_holds_no_data_is_not_compared() {
        let run = |empty: bool, verify: bool| {
            let mut w = checkpointing(0, 0, 1 << 40);
            w.empty = empty;
            w.machine = Source::new(SourceConfig {
                verify,
                ..config(MirrorAction::Exit)
            });
            assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
            w
        };
        let w = run(true, false);
        let s = w.script();
        assert!(!s.iter().any(|x| x.starts_with("compare")), "{s:#?}");
        assert!(s.contains(&"data 0+50".to_string()), "{s:#?}");
        assert!(
            w.logs().contains(
                &"10.0.0.2:4777 holds no data: sending the image without comparing".to_string()
            ),
            "{:#?}",
            w.logs()
        );
        // Not said: the probe, as ever; `--verify` compares regardless.
        for (empty, verify) in [(false, false), (true, true)] {
            let s = run(empty, verify).script();
            assert!(s.contains(&"compare 0+50".to_string()), "{s:#?}");
        }
    }

    #[test]
    fn held_runs_are_never_sent_however_short() {
        use Extent::{Data, Held, Hole};
        let extents = [(100, false), (50, true)];
        let held = [(10, false), (5, true), (30, false), (40, true), (65, false)];
        assert_eq!(
            extents_with_held(&extents, Some(&held)),
            [
                (10, Data),
                (5, Held),
                (30, Data),
                (40, Held),
                (15, Data),
                (50, Hole)
            ]
        );
        // A held run across data and a hole is held as a whole.
        assert_eq!(
            extents_with_held(&extents, Some(&[(90, false), (20, true), (40, false)])),
            [(90, Data), (20, Held), (40, Hole)]
        );
        // Without held pieces asked for, the extents as they are.
        assert_eq!(extents_with_held(&extents, None), [(100, Data), (50, Hole)]);
    }

    #[test]
    fn a_failed_checkpoint_retries_and_the_retry_resumes_from_the_last_one_answered() {
        let mut w = checkpointing(0, 0, 50);
        // The error answer fails the connection; the retry's checkpoints
        // are numbered on from 2 and all answered.
        w.checkpoint_error = Some(2);
        let mut queries = 0;
        let outcome = w.run(|e, _| match e {
            Effect::QueryResume { .. } => {
                queries += 1;
                // The destination holds checkpoint 1 after the first attempt.
                Some(Event::ResumeAnswer {
                    checkpoint: Some(if queries == 1 { 0 } else { 1 }),
                    empty: false,
                })
            }
            _ => None,
        });
        assert_eq!(outcome, Outcome::HandedOff);
        let s = w.script();
        let retry = w.position("phase retrying");
        let sent = w.position("CHECKPOINT 2 ahead");
        assert!(sent < retry, "{s:#?}");
        assert!(!s[..retry].contains(&"held 2".to_string()), "{s:#?}");
        assert_eq!(s[retry - 2..retry], ["unpace", "allow"]);
        assert!(s[retry..].contains(&"held resume".to_string()), "{s:#?}");
        assert!(
            s[retry..].contains(&"extents 0+200 held".to_string()),
            "{s:#?}"
        );
        assert!(w
            .logs()
            .iter()
            .any(|l| l.contains("answered checkpoint at 1 with error 5")));
    }

    #[test]
    fn an_attempt_that_ran_a_while_is_retried_at_once_then_backing_off_to_the_delay() {
        let mut m = Source::new(config(MirrorAction::Exit));
        let mut t = Instant::now();
        m.start(t);
        let connected = Event::Connected {
            flags: 0,
            link: "x".into(),
            resumable: true,
        };
        let failed = || Event::Failed {
            reason: "reset".into(),
        };
        let mut delays = Vec::new();
        // The first attempt runs 5 s, the next ones fail at once.
        for ran in [5000, 0, 0, 0, 0, 0, 2000, 0] {
            m.handle(t, connected.clone());
            t += Duration::from_millis(ran);
            let b = m.handle(t, failed());
            match b.last() {
                Some(Effect::ArmRetry { delay }) => delays.push(delay.as_millis()),
                other => panic!("expected a retry, got {other:?}"),
            }
            m.handle(t, Event::RetryTimerFired);
        }
        assert_eq!(delays, [0, 100, 200, 400, 800, 1000, 0, 100]);
        // A first attempt that never got going waits the whole delay.
        let mut m = Source::new(config(MirrorAction::Exit));
        m.start(t);
        m.handle(t, connected);
        let b = m.handle(t, failed());
        assert_eq!(b.last(), Some(&Effect::ArmRetry { delay: RETRY_DELAY }));
    }

    #[test]
    fn a_write_error_mid_sweep_retries_from_scratch_after_the_delay() {
        let mut w = World::new(MirrorAction::Exit);
        let mut failed = false;
        let outcome = w.run(|e, _| match e {
            Effect::SendHole { offset: 50, .. } if !failed => {
                failed = true;
                Some(Event::Failed {
                    reason: "the destination closed the connection".into(),
                })
            }
            _ => None,
        });
        assert_eq!(outcome, Outcome::HandedOff);
        let script = w.script();
        let retry = w.position("phase retrying");
        assert_eq!(
            script[retry - 3..retry + 9],
            [
                "zeroes 50+100",
                "unpace",
                "allow",
                "phase retrying",
                "retry in 1s",
                "begin 2",
                "connect",
                // Fresh: tracking again, nothing held (an old destination),
                // the sweep from 0, the caller not told again.
                "resume?",
                "track",
                "held fresh",
                "phase copying",
                "clear 0+200",
            ]
        );
        assert_eq!(script.iter().filter(|s| *s == "first Go").count(), 1);
        assert!(w.logs().contains(
            &"migration attempt 1 to 10.0.0.2:4777 failed: the destination closed the connection; retrying in 1 s"
                .to_string()
        ));
        assert!(w
            .logs()
            .iter()
            .any(|l| l.starts_with("migration attempt 2 connected")));
    }

    #[test]
    fn entrust_refused_with_einval_falls_back_to_flush() {
        let mut w = World::new(MirrorAction::Exit);
        let outcome =
            w.run(|e, _| (*e == Effect::Entrust).then_some(Event::Reply { error: EINVAL }));
        assert_eq!(outcome, Outcome::HandedOff);
        let script = w.script();
        let entrust = w.position("ENTRUST");
        assert_eq!(
            script[entrust..entrust + 4],
            ["ENTRUST", "idle", "FLUSH", "completing"]
        );
        assert!(w
            .logs()
            .contains(&"destination does not know entrust; sending FLUSH instead".to_string()));
    }

    #[test]
    fn entrust_refused_otherwise_retries_and_hands_nothing_off() {
        let mut w = World::new(MirrorAction::Unlink);
        let mut refused = false;
        let outcome = w.run(|e, _| match e {
            Effect::Entrust if !refused => {
                refused = true;
                Some(Event::Reply { error: 5 })
            }
            _ => None,
        });
        assert_eq!(outcome, Outcome::HandedOff);
        let script = w.script();
        let entrust = w.position("ENTRUST");
        assert_eq!(
            script[entrust..entrust + 5],
            [
                "ENTRUST",
                "unpace",
                "allow",
                "phase retrying",
                "retry in 1s"
            ]
        );
        // Nothing of the hand-off before the retry.
        let unlink = w.position("unlink");
        assert!(unlink > w.position("begin 2"));
        assert!(w
            .logs()
            .iter()
            .any(|l| l.contains("failed: the destination answered entrust with error 5;")));
    }

    #[test]
    fn a_refused_flush_retries() {
        // Before the cut-off, and as entrust's fallback.
        for fallback in [false, true] {
            let mut w = World::new(MirrorAction::Exit);
            let (mut entrusted, mut refused) = (false, false);
            let outcome = w.run(|e, _| match e {
                Effect::Entrust if fallback => {
                    entrusted = true;
                    Some(Event::Reply { error: EINVAL })
                }
                Effect::Flush if !refused && entrusted == fallback => {
                    refused = true;
                    Some(Event::Reply { error: 28 })
                }
                _ => None,
            });
            assert!(refused);
            assert_eq!(outcome, Outcome::HandedOff);
            let script = w.script();
            let retry = w.position("phase retrying");
            assert_eq!(
                script[retry - 3..retry],
                ["FLUSH", "unpace", "allow"],
                "fallback {fallback}"
            );
            // Before the cut-off, clients were never shut out.
            assert_eq!(w.position("cut off") > retry, !fallback, "{script:#?}");
            assert!(w
                .logs()
                .iter()
                .any(|l| l
                    .contains("failed: the destination answered the final flush with error 28;")));
        }
    }

    #[test]
    fn an_unlink_failure_sends_no_disconnect() {
        let mut w = World::new(MirrorAction::Unlink);
        let outcome = w.run(|e, _| {
            (*e == Effect::Unlink).then(|| Event::Unlinked(Err("Permission denied".into())))
        });
        assert_eq!(
            outcome,
            Outcome::DisconnectFailed(format!("cannot unlink {PATH}: Permission denied"))
        );
        let script = w.script();
        assert!(!script.contains(&"DISCONNECT".to_string()), "{script:#?}");
        assert_eq!(
            script[script.len() - 4..],
            [
                "unlink",
                "untrack",
                "phase done",
                "finish DisconnectFailed(\"cannot unlink /images/source.img: Permission denied\")"
            ]
        );
    }

    #[test]
    fn a_disconnect_failure_is_disconnect_failed() {
        let mut w = World::new(MirrorAction::Exit);
        let outcome = w.run(|e, _| {
            (*e == Effect::Disconnect).then(|| Event::DisconnectSent(Err("broken pipe".into())))
        });
        assert_eq!(
            outcome,
            Outcome::DisconnectFailed(format!(
                "sending DISCONNECT to {TARGET} failed: broken pipe"
            ))
        );
        assert!(!w.script().iter().any(|s| s.starts_with("milestone")));
    }

    #[test]
    fn cancel_in_every_phase_abandons_with_clients_allowed() {
        let cancellable = [
            "connect",
            "data 0+50",
            "zeroes 50+100",
            "idle",
            "FLUSH",
            "cut off",
            "ENTRUST",
        ];
        for at in cancellable {
            let mut w = World::new(MirrorAction::Exit);
            let outcome = w.run(|e, _| {
                (script(std::slice::from_ref(e)).first().map(String::as_str) == Some(at))
                    .then_some(Event::Cancel)
            });
            assert_eq!(outcome, Outcome::Abandoned, "cancel at {at}");
            let script = w.script();
            assert_eq!(
                script[script.len() - 4..],
                [at, "untrack", "allow", "finish Abandoned"],
                "cancel at {at}"
            );
        }
        // While waiting to retry: clients were let in when the attempt failed.
        let mut w = World::new(MirrorAction::Exit);
        let outcome = w.run(|e, _| match e {
            Effect::SendData { .. } => Some(Event::Failed {
                reason: "reset".into(),
            }),
            Effect::ArmRetry { .. } => Some(Event::Cancel),
            _ => None,
        });
        assert_eq!(outcome, Outcome::Abandoned);
        let script = w.script();
        assert_eq!(
            script[script.len() - 5..],
            [
                "allow",
                "phase retrying",
                "retry in 1s",
                "untrack",
                "finish Abandoned"
            ]
        );
    }

    #[test]
    fn past_the_point_of_no_return_cancel_is_ignored() {
        for step in [Effect::CloseServer, Effect::Unlink, Effect::Disconnect] {
            assert!(!step.cancellable());
            let mut m = Source::new(config(MirrorAction::Unlink));
            let mut world = World::new(MirrorAction::Unlink);
            let now = Instant::now();
            let mut b = m.start(now);
            while *b.last().unwrap() != step {
                let event = world.plain(b.last().unwrap());
                b = m.handle(now, event);
            }
            // A cancel (or a stray failure) with the step outstanding does
            // nothing; its answer carries the hand-off on.
            assert_eq!(m.handle(now, Event::Cancel), []);
            assert_eq!(m.handle(now, Event::Failed { reason: "x".into() }), []);
            let event = world.plain(&step);
            let next = m.handle(now, event);
            assert!(!next.is_empty(), "{step:?} answered: nothing followed");
        }
    }

    #[test]
    fn a_failed_first_attempt_is_reported_and_not_retried() {
        let mut w = World::new(MirrorAction::Exit);
        let outcome = w.run(|e, _| {
            (*e == Effect::Connect).then(|| Event::ConnectFailed {
                outcome: FirstOutcome::SizeMismatch,
                message: "remote size 4096 does not match local size 300".into(),
            })
        });
        assert_eq!(
            outcome,
            Outcome::FirstAttemptFailed(FirstOutcome::SizeMismatch)
        );
        assert_eq!(
            w.script(),
            [
                "begin 1",
                "connect",
                "untrack",
                "first SizeMismatch",
                "finish FirstAttemptFailed(SizeMismatch)"
            ]
        );
        assert_eq!(
            w.logs(),
            [format!(
                "migration to {TARGET} failed: remote size 4096 does not match local size 300"
            )]
        );
    }

    #[test]
    fn a_later_connect_failure_is_retried() {
        let mut w = World::new(MirrorAction::Exit);
        let mut connects = 0;
        let outcome = w.run(|e, _| match e {
            Effect::SendData { .. } if connects == 1 => Some(Event::Failed {
                reason: "reset".into(),
            }),
            Effect::Connect => {
                connects += 1;
                (connects == 2).then(|| Event::ConnectFailed {
                    outcome: FirstOutcome::FailConnect,
                    message: "cannot connect: refused".into(),
                })
            }
            _ => None,
        });
        assert_eq!(outcome, Outcome::HandedOff);
        assert_eq!(connects, 3);
        assert!(w.logs().contains(
            &"migration attempt 2 to 10.0.0.2:4777 failed: cannot connect: refused; retrying in 1 s"
                .to_string()
        ));
    }

    #[test]
    fn client_writes_during_convergence_are_sent_before_the_cut_off() {
        let mut w = World::new(MirrorAction::Exit);
        w.dirty = VecDeque::from([vec![(10, 5), (120, 7)]]);
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let script = w.script();
        let converging = w.position("phase converging");
        let cut = w.position("cut off");
        let sends: Vec<&str> = script[converging..cut]
            .iter()
            .filter(|s| s.starts_with("data"))
            .map(String::as_str)
            .collect();
        assert_eq!(sends, ["data 10+5", "data 120+7"]);
    }

    #[test]
    fn the_final_pass_after_the_cut_off_sends_everything_dirty_before_entrust() {
        let mut w = World::new(MirrorAction::Exit);
        w.final_dirty = VecDeque::from([vec![(20, 4), (90, 3)], vec![(30, 4)]]);
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let script = w.script();
        let cut = w.position("cut off");
        assert_eq!(
            script[cut..w.position("ENTRUST") + 1],
            [
                "cut off",
                "take all",
                "data 20+4",
                "data 90+3",
                "take all",
                "data 30+4",
                "take all",
                "phase entrusting",
                "ENTRUST",
            ]
        );
    }

    #[test]
    fn an_entrust_answered_before_a_failed_change_hands_nothing_off() {
        // Entrust goes out without waiting for the replies before it; a
        // change before it that then fails (the pipe fails while waiting
        // for them) must keep the source canonical: a retry, no hand-off.
        let mut w = World::new(MirrorAction::Unlink);
        let (mut entrusted, mut fired) = (false, false);
        let outcome = w.run(|e, _| match e {
            Effect::Entrust => {
                entrusted = true;
                None
            }
            Effect::WaitIdle if entrusted && !fired => {
                fired = true;
                Some(Event::Failed {
                    reason: "the destination answered WRITE at 0 with error 5".into(),
                })
            }
            _ => None,
        });
        assert!(fired, "the fault fired");
        assert_eq!(outcome, Outcome::HandedOff, "the retry hands off");
        let script = w.script();
        let first_entrust = w.position("ENTRUST");
        assert_eq!(script[first_entrust + 1], "idle");
        let completing = w.position("completing");
        assert!(
            script[first_entrust..completing]
                .iter()
                .any(|s| s == "begin 2"),
            "the first entrust's reply completed nothing: {script:?}"
        );
    }

    /// Drives a fresh machine with the plain world until it cuts off;
    /// `answer` may replace the world's answer to an effect, and says how
    /// long the effect took. Returns every effect, checked to end at the
    /// cut-off.
    fn run_to_cut_off(mut answer: impl FnMut(&Effect, Event) -> (Duration, Event)) -> Vec<Effect> {
        let mut m = Source::new(config(MirrorAction::Exit));
        let mut world = World::new(MirrorAction::Exit);
        let mut t = Instant::now();
        let mut b = m.start(t);
        let mut seen = Vec::new();
        for _ in 0..1000 {
            let last = b.last().unwrap().clone();
            seen.extend(b);
            if matches!(last, Effect::CutOffClients { .. }) {
                return seen;
            }
            let (took, ev) = answer(&last, world.plain(&last));
            t += took;
            b = m.handle(t, ev);
        }
        panic!("no cut-off: {:#?}", script(&seen));
    }

    /// The flushes before the cut-off, when each takes the next of `took`.
    fn flushes_before_the_cut_off(took: &[u64]) -> usize {
        let mut flushes = 0;
        let seen = run_to_cut_off(|e, ev| match e {
            Effect::Flush => {
                flushes += 1;
                (Duration::from_millis(took[flushes - 1]), ev)
            }
            _ => (Duration::from_millis(1), ev),
        });
        script(&seen).iter().filter(|x| *x == "FLUSH").count()
    }

    #[test]
    fn flushes_repeat_while_slow_and_shrinking_four_at_most() {
        // Over the 10 ms that counts as quick, each a quarter quicker than
        // the one before: four, then the cut-off anyway. (The plain
        // world's 1 ms flush is quick: the full-attempt tests show one.)
        assert_eq!(
            flushes_before_the_cut_off(&[80, 40, 20, 12, 11]),
            MAX_FLUSHES as usize
        );
        // Quick at the third.
        assert_eq!(flushes_before_the_cut_off(&[80, 40, 9]), 3);
        // Not shrinking: clients dirty as much during each, so a third
        // would sync as much again.
        assert_eq!(flushes_before_the_cut_off(&[40, 35]), 2);
    }

    #[test]
    fn after_the_last_flush_the_remainder_gets_passes_and_no_more_flushes() {
        // Two flushes that sync about as much (40 and 35 ms): no third.
        // Clients wrote 100 ms of data meanwhile, so the remainder is not
        // ready at once: passes shrink it, and then the cut-off comes
        // without another flush.
        let (mut flushes, mut big) = (0, false);
        let seen = run_to_cut_off(|e, ev| match (e, ev) {
            (Effect::Flush, ev) => {
                flushes += 1;
                (Duration::from_millis([40, 35][flushes - 1]), ev)
            }
            (_, Event::Measured { .. }) if flushes == 2 && !big => {
                big = true;
                let ev = Event::Measured {
                    dirty_bytes: 100_000_000,
                    in_flight: 0,
                    in_flight_bytes: 0,
                    queued_bytes: 0,
                };
                (Duration::from_millis(1), ev)
            }
            (_, ev) => (Duration::from_millis(1), ev),
        });
        assert!(
            big,
            "the remainder after the second flush was never measured"
        );
        let s = script(&seen);
        assert_eq!(s.iter().filter(|x| *x == "FLUSH").count(), 2, "{s:#?}");
        let second = s.iter().rposition(|x| x == "FLUSH").unwrap();
        assert!(s[second..].iter().any(|x| x == "take"), "{s:#?}");
    }

    #[test]
    fn a_flush_is_quick_beside_the_round_trip_of_the_link() {
        // Over a 50 ms round trip a flush answered in 55 ms synced in 5:
        // one flush, then the cut-off (without the round trip it would
        // never count as quick: four flushes, 200 ms of migration).
        let rtt = Duration::from_millis(50);
        let seen = run_to_cut_off(|e, ev| match (e, ev) {
            (Effect::Flush, ev) => (Duration::from_millis(55), ev),
            (
                _,
                Event::Capacity {
                    capacity,
                    speed_limit,
                },
            ) => {
                let ev = Event::Capacity {
                    capacity: capacity.map(|c| c.with_round_trip(rtt)),
                    speed_limit,
                };
                (Duration::from_millis(1), ev)
            }
            (_, ev) => (Duration::from_millis(1), ev),
        });
        let s = script(&seen);
        assert_eq!(s.iter().filter(|x| *x == "FLUSH").count(), 1, "{s:#?}");
    }

    #[test]
    fn a_checkpoint_sent_ahead_is_not_followed_by_another_until_it_is_answered() {
        // Due every 50 bytes, but answered only five answers later: the
        // next waits for it, whatever data went meanwhile.
        let mut w = checkpointing(0, 0, 50);
        w.checkpoint_delay = 5;
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let s = w.script();
        let (first, held) = (w.position("CHECKPOINT 1 ahead"), w.position("held 1"));
        assert!(
            s[first + 1..held]
                .iter()
                .filter(|x| x.starts_with("data") || x.starts_with("zeroes"))
                .count()
                >= 2,
            "{s:#?}"
        );
        assert!(w.position("CHECKPOINT 2 ahead") > held, "{s:#?}");
    }

    #[test]
    fn clients_are_not_cut_off_while_a_checkpoint_is_outstanding() {
        // No FLUSH (so no waiting for every reply before the cut-off) and a
        // checkpoint answered only once everything is: the cut-off waits
        // for it, as entrust would wait for its sync with clients shut out.
        let mut w = checkpointing(0, 0, 50);
        w.flags = SEND_WRITE_ZEROES;
        w.checkpoint_delay = usize::MAX;
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let s = w.script();
        let held = s
            .iter()
            .rposition(|x| x.starts_with("held "))
            .expect("a checkpoint held");
        assert!(held < w.position("cut off"), "{s:#?}");
        assert_eq!(s[held - 1], "idle", "{s:#?}");
    }

    #[test]
    fn a_checkpoint_answered_before_the_requests_ahead_of_it_holds_nothing() {
        // A destination that answered it while writes before it were still
        // unanswered: nothing is committed, the marker names it anyway, so
        // the next is numbered on.
        let mut w = checkpointing(0, 0, 50);
        w.checkpoint_held = false;
        w.dirty = VecDeque::from([vec![(10, 5)]]);
        assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
        let s = w.script();
        assert!(!s.iter().any(|x| x == "held 1" || x == "held 2"), "{s:#?}");
        assert!(s.contains(&"CHECKPOINT 2 ahead".to_string()), "{s:#?}");
        assert!(w.logs().iter().any(|l| l.contains(
            "checkpoint 1 was answered while requests sent before it were still unanswered"
        )));
        // Nor does the flush before the cut-off, sent ahead too. With
        // nothing sent since, a plain FLUSH follows (nothing new for a
        // checkpoint to hold), then the cut-off.
        let ahead: Vec<&String> = s.iter().filter(|x| x.ends_with("ahead")).collect();
        assert_eq!(
            ahead,
            [
                "CHECKPOINT 1 ahead",
                "CHECKPOINT 2 ahead",
                "CHECKPOINT 3 ahead"
            ],
            "{s:#?}"
        );
        assert!(
            !s.iter()
                .any(|x| x.starts_with("held ") && x != "held fresh"),
            "{s:#?}"
        );
        let flush = w.position("FLUSH");
        assert!(w.position("CHECKPOINT 3 ahead") < flush, "{s:#?}");
        assert!(flush < w.position("cut off"), "{s:#?}");
    }

    #[test]
    fn a_long_round_trip_keeps_the_sweeps_checkpoints_as_close_as_a_short_one() {
        // Sent ahead, a checkpoint costs the link nothing: over a 50 ms
        // round trip the sweep checkpoints every 50 bytes due, as over
        // none (they once kept 100 round trips apart: one in 5 s).
        let count = |round_trip: Duration| {
            let mut w = checkpointing(0, 0, 50);
            w.machine = Source::new(SourceConfig {
                checkpoint_every: 50,
                checkpoint_gap: Duration::ZERO,
                ..config(MirrorAction::Exit)
            });
            w.resume = Some(0);
            w.round_trip = round_trip;
            assert_eq!(w.run(|_, _| None), Outcome::HandedOff);
            w.script().iter().filter(|x| x.ends_with("ahead")).count()
        };
        assert_eq!(count(Duration::from_millis(50)), count(Duration::ZERO));
        assert!(count(Duration::from_millis(50)) > 1);
    }

    /// Drives the dirty passes with `runs` as the writes dirty at each
    /// measurement in turn (0.1 ms each at the test's capacity); returns
    /// how many measurements came before the cut-off, and the converged
    /// line.
    fn passes_to_cut_off(runs: &[u64]) -> (usize, String) {
        let mut m = Source::new(config(MirrorAction::Exit));
        let mut world = World::new(MirrorAction::Exit);
        let mut t = Instant::now();
        let mut b = m.start(t);
        let mut seen = Vec::new();
        let mut measured = 0;
        for _ in 0..1000 {
            let last = b.last().unwrap().clone();
            seen.extend(b);
            if matches!(last, Effect::CutOffClients { .. }) {
                break;
            }
            let ev = match last {
                Effect::Measure => {
                    measured += 1;
                    Event::Measured {
                        dirty_bytes: 4096,
                        in_flight: 0,
                        in_flight_bytes: 0,
                        queued_bytes: 0,
                    }
                }
                Effect::CountRuns { .. } => Event::Runs(runs[measured - 1]),
                _ => world.plain(&last),
            };
            t += Duration::from_millis(1);
            b = m.handle(t, ev);
        }
        assert!(
            matches!(seen.last(), Some(Effect::CutOffClients { .. })),
            "{seen:#?}"
        );
        // One FLUSH, after the extra passes, and right after it the last
        // look and the cut-off: nothing is sent between them.
        let s = script(&seen);
        // The measure after an extra pass waits for the link to carry the
        // pass's burst first; no other does.
        let mut extra = false;
        let mut before: Option<&Effect> = None;
        for e in &seen {
            match e {
                Effect::Log(_, l) if l.contains("extra pass") => extra = true,
                Effect::Log(..) => {}
                Effect::Measure => {
                    let queued = matches!(before, Some(Effect::WaitQueue { .. }));
                    assert_eq!(queued, extra, "{s:#?}");
                    extra = false;
                }
                _ => {}
            }
            if !matches!(e, Effect::Log(..)) {
                before = Some(e);
            }
        }
        assert_eq!(s.iter().filter(|x| *x == "FLUSH").count(), 1, "{s:#?}");
        assert_eq!(
            s[s.len() - 5..],
            ["FLUSH", "measure", "runs", "unpace", "cut off"]
        );
        let line = seen
            .iter()
            .find_map(|e| match e {
                Effect::Log(Level::Info, l) if l.starts_with("converged after") => Some(l.clone()),
                _ => None,
            })
            .expect("a converged line");
        (measured, line)
    }

    #[test]
    fn once_the_remainder_is_small_enough_the_only_checkpoint_asked_is_the_flush() {
        // Pass checkpoints as often as can be; a slow sync, so the flush
        // is needed. The remainder: 20 ms, then 10, then 9 (as in the
        // test below): two extra passes, then the flush.
        let mut w = checkpointing(0, 0, 1 << 40);
        w.machine = Source::new(SourceConfig {
            checkpoint_every: 1 << 40,
            pass_checkpoint_gap: Duration::ZERO,
            pass_checkpoint_every: 1,
            ..config(MirrorAction::Exit)
        });
        w.checkpoint_sync = Duration::from_secs(1);
        w.dirty = (0..6).map(|i| vec![(10 * i, 5)]).collect();
        let runs = [200, 100, 90, 50, 50, 50];
        let mut measured = 0;
        let outcome = w.run(|e, _| match e {
            Effect::Measure => {
                measured += 1;
                Some(Event::Measured {
                    dirty_bytes: 4096,
                    in_flight: 0,
                    in_flight_bytes: 0,
                    queued_bytes: 0,
                })
            }
            Effect::CountRuns { .. } => Some(Event::Runs(runs[(measured - 1).min(5)])),
            _ => None,
        });
        assert_eq!(outcome, Outcome::HandedOff);
        let s = w.script();
        // The pass checkpoint at the first pass's top, answered meanwhile.
        assert_eq!(
            w.position("CHECKPOINT 1 ahead"),
            w.position("phase converging") + 1
        );
        assert!(w.position("held 1") < w.position("measure"), "{s:#?}");
        // From the first extra pass on, each checkpoint is the flush the
        // log line before it announces.
        let first_extra = w
            .effects
            .iter()
            .position(|e| matches!(e, Effect::Log(_, l) if l.contains("extra pass 1")))
            .expect("an extra pass");
        let mut flushes = 0;
        for (i, e) in w.effects.iter().enumerate().skip(first_extra) {
            if matches!(e, Effect::SendCheckpoint { .. }) {
                flushes += 1;
                assert!(
                    matches!(&w.effects[i - 1], Effect::Log(_, l) if l.ends_with("first, sent ahead")),
                    "a checkpoint that is not the flush: {s:#?}"
                );
            }
        }
        assert!(flushes >= 1, "{s:#?}");
        assert!(w.position("CHECKPOINT 2 ahead") < w.position("cut off"));
    }

    #[test]
    fn once_small_enough_the_remainder_is_made_smaller_by_more_passes() {
        // 20 ms: small enough, so one more pass; 10 ms (it shrank by a
        // quarter): another; 9 ms (it did not): FLUSH, look again (5 ms),
        // cut off.
        let (measured, line) = passes_to_cut_off(&[200, 100, 90, 50]);
        assert_eq!(measured, 4);
        assert!(
            line.contains("(expected to take 5.0 ms; 2 extra passes)"),
            "{line}"
        );
        // It shrinks to a quick remainder: FLUSH there.
        let (measured, line) = passes_to_cut_off(&[200, 50, 10, 8]);
        assert_eq!(measured, 4);
        assert!(
            line.contains("(expected to take 0.8 ms; 2 extra passes)"),
            "{line}"
        );
        // It keeps shrinking: three extra passes at most.
        let (measured, line) = passes_to_cut_off(&[200, 100, 50, 25, 12]);
        assert_eq!(measured, 5);
        assert!(
            line.contains("(expected to take 1.2 ms; 3 extra passes)"),
            "{line}"
        );
        // Quick at once: no extra pass.
        let (measured, line) = passes_to_cut_off(&[15, 14]);
        assert_eq!(measured, 2);
        assert!(
            line.contains("(expected to take 1.4 ms; 0 extra passes)"),
            "{line}"
        );
    }

    #[test]
    fn a_remainder_too_big_to_cut_off_keeps_passing_and_warns_after_patience() {
        let mut m = Source::new(config(MirrorAction::Exit));
        let mut world = World::new(MirrorAction::Exit);
        let mut t = Instant::now();
        let mut b = m.start(t);
        let mut seen = Vec::new();
        // 10 GB dirty at 1 GB/s: ten seconds, never within the allowance.
        for _ in 0..2000 {
            let last = b.last().unwrap().clone();
            seen.extend(b);
            let ev = match last {
                Effect::Measure => Event::Measured {
                    dirty_bytes: 10_000_000_000,
                    in_flight: 0,
                    in_flight_bytes: 0,
                    queued_bytes: 0,
                },
                _ => world.plain(&last),
            };
            t += Duration::from_millis(10);
            b = m.handle(t, ev);
        }
        let s = script(&seen);
        assert!(!s.contains(&"cut off".to_string()));
        // Nothing was taken: each pass waits for the writes in flight.
        let converging = s.iter().position(|x| x == "phase converging").unwrap();
        assert_eq!(
            s[converging + 1..converging + 6],
            ["pace all", "take", "measure", "idle", "pace all"]
        );
        // Too many bytes for the allowance: runs are not counted.
        assert!(!s.contains(&"runs".to_string()));
        let warnings: Vec<&String> = seen
            .iter()
            .filter_map(|e| match e {
                Effect::Log(Level::Warn, l) => Some(l),
                _ => None,
            })
            .collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("migration to 10.0.0.2:4777 not converging after 8 s: 10000000000 bytes still dirty"), "{warnings:?}");
    }

    #[test]
    fn runs_are_counted_when_the_bytes_alone_fit_the_allowance() {
        let mut m = Source::new(config(MirrorAction::Exit));
        let mut world = World::new(MirrorAction::Exit);
        let t = Instant::now();
        let mut b = m.start(t);
        // Up to the first measurement of the dirty passes.
        while *b.last().unwrap() != Effect::Measure {
            let event = world.plain(b.last().unwrap());
            b = m.handle(t, event);
        }
        let b = m.handle(
            t,
            Event::Measured {
                dirty_bytes: 4096,
                in_flight: 3,
                in_flight_bytes: 12288,
                queued_bytes: 12288,
            },
        );
        // 25 ms at 0.1 ms a write: 251 writes are worth counting, 3 of
        // them in flight.
        let gap = capacity().gap(1);
        assert_eq!(b, [Effect::CountRuns { gap, limit: 248 }]);
        // More writes than the allowance holds: not ready, and with
        // nothing taken this pass, wait for what is queued in flight.
        let b = m.handle(t, Event::Runs(1000));
        match &b[..] {
            [Effect::SetEstimate(e), Effect::WaitQueue { .. }] => assert!(!e.ready(), "{e:?}"),
            other => panic!("expected the estimate and a wait, got {other:?}"),
        }
        // Few writes: ready (after the first flush).
        let mut m2 = Source::new(config(MirrorAction::Exit));
        let mut b = m2.start(t);
        while *b.last().unwrap() != Effect::Measure {
            let event = world.plain(b.last().unwrap());
            b = m2.handle(t, event);
        }
        m2.handle(
            t,
            Event::Measured {
                dirty_bytes: 4096,
                in_flight: 0,
                in_flight_bytes: 0,
                queued_bytes: 0,
            },
        );
        match &m2.handle(t, Event::Runs(1))[..] {
            [Effect::SetEstimate(e), Effect::WaitIdle] => assert!(e.ready(), "{e:?}"),
            other => panic!("expected the estimate and a wait to flush, got {other:?}"),
        }
    }

    /// Not ready, and the pass took nothing: a burst still queued for the
    /// link is waited for by itself, then measured again; only with
    /// nothing queued does the pass wait for every reply (a pass
    /// checkpoint's among them: a round trip and its sync of idle link).
    #[test]
    fn with_nothing_dirty_a_pass_waits_for_its_queue_not_for_every_reply() {
        let t = Instant::now();
        let mut world = World::new(MirrorAction::Exit);
        let to_measure = |m: &mut Source, world: &mut World| {
            let mut b = m.start(t);
            while *b.last().unwrap() != Effect::Measure {
                let event = world.plain(b.last().unwrap());
                b = m.handle(t, event);
            }
        };
        // 50 MB in flight, 40 MB of it still queued: not ready.
        let mut m = Source::new(config(MirrorAction::Exit));
        to_measure(&mut m, &mut world);
        m.attempt_mut().took_any = false;
        let mut b = m.handle(
            t,
            Event::Measured {
                dirty_bytes: 0,
                in_flight: 100,
                in_flight_bytes: 50_000_000,
                queued_bytes: 40_000_000,
            },
        );
        if let [Effect::CountRuns { .. }] = &b[..] {
            b = m.handle(t, Event::Runs(0));
        }
        match &b[..] {
            [Effect::SetEstimate(e), Effect::WaitQueue { .. }] => assert!(!e.ready(), "{e:?}"),
            other => panic!("expected a wait for the queue, got {other:?}"),
        }
        assert_eq!(m.handle(t, Event::QueueDrained), [Effect::Measure]);
        // Nothing queued: the writes in flight are waited for.
        let mut m = Source::new(config(MirrorAction::Exit));
        to_measure(&mut m, &mut world);
        m.attempt_mut().took_any = false;
        let mut b = m.handle(
            t,
            Event::Measured {
                dirty_bytes: 50_000_000,
                in_flight: 0,
                in_flight_bytes: 0,
                queued_bytes: 0,
            },
        );
        if let [Effect::CountRuns { .. }] = &b[..] {
            b = m.handle(t, Event::Runs(0));
        }
        match &b[..] {
            [Effect::SetEstimate(e), Effect::WaitIdle] => assert!(!e.ready(), "{e:?}"),
            other => panic!("expected a wait for every reply, got {other:?}"),
        }
    }

    /// Requests in flight cost the cut-off time only while still queued
    /// (as their bytes): a round trip's worth of small writes past the
    /// link, waiting only for replies, leave the remainder small.
    #[test]
    fn only_requests_still_queued_count_against_the_allowance() {
        let t = Instant::now();
        let mut world = World::new(MirrorAction::Exit);
        let estimate = |queued_bytes: u64, world: &mut World| {
            let mut m = Source::new(config(MirrorAction::Exit));
            let mut b = m.start(t);
            while *b.last().unwrap() != Effect::Measure {
                let event = world.plain(b.last().unwrap());
                b = m.handle(t, event);
            }
            // 1000 writes of 4 KiB in flight: 100 ms of the destination's
            // 0.1 ms a write, four allowances.
            let mut b = m.handle(
                t,
                Event::Measured {
                    dirty_bytes: 4096,
                    in_flight: 1000,
                    in_flight_bytes: 4_096_000,
                    queued_bytes,
                },
            );
            if let [Effect::CountRuns { .. }] = &b[..] {
                b = m.handle(t, Event::Runs(1));
            }
            match b.first() {
                Some(Effect::SetEstimate(e)) => *e,
                other => panic!("expected an estimate, got {other:?}"),
            }
        };
        let past = estimate(0, &mut world);
        assert!(past.ready(), "{past:?}");
        let tenth = estimate(409_600, &mut world);
        assert!(tenth.ready(), "{tenth:?}");
        let all = estimate(4_096_000, &mut world);
        assert!(!all.ready(), "{all:?}");
    }

    #[test]
    fn a_tick_before_the_retry_delay_does_nothing_and_one_after_it_retries() {
        let mut m = Source::new(config(MirrorAction::Exit));
        let t = Instant::now();
        m.start(t);
        m.handle(
            t,
            Event::Connected {
                flags: 0,
                link: "x".into(),
                resumable: true,
            },
        );
        let b = m.handle(
            t,
            Event::Failed {
                reason: "reset".into(),
            },
        );
        assert_eq!(b.last(), Some(&Effect::ArmRetry { delay: RETRY_DELAY }));
        assert!(m
            .handle(t + Duration::from_millis(999), Event::Tick)
            .is_empty());
        assert_eq!(
            m.handle(t + RETRY_DELAY, Event::Tick),
            [Effect::BeginAttempt { attempt: 2 }, Effect::Connect]
        );
    }

    #[test]
    fn the_machine_can_move_between_threads() {
        fn send<T: Send + 'static>(_: &T) {}
        send(&Source::new(config(MirrorAction::Exit)));
        send(&Effect::Connect);
        send(&Event::Tick);
    }

    #[test]
    fn every_phase_round_trips_through_its_byte_and_has_its_own_name() {
        for p in Phase::ALL {
            assert_eq!(Phase::from_u8(p as u8), Some(p));
        }
        assert_eq!(
            (0..=u8::MAX).filter_map(Phase::from_u8).count(),
            Phase::ALL.len()
        );
        let mut names: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Phase::ALL.len());
    }
}
