//! The fault matrix: every protocol step of a migration, on each side, under
//! every fault that makes sense there, with and without `--unlink`, while
//! clients keep writing through the source (docs/handoff.md, "What the
//! acceptance suite proves").
//!
//! Each scenario runs a real `flexnbd listen` (destination, on a sparse file)
//! and a real `flexnbd serve` (source, a small image with data and holes),
//! one or two client threads writing 4 KiB blocks through the source on
//! persistent raw connections (every acknowledged write is recorded; about
//! one request in eight is a FUA write and one in ten a FLUSH, and the
//! writers record which writes those made durable), and `flexnbd mirror`. The fault plan goes to the process that announces the
//! step (`server.*` to `listen`, `mirror.*` to `serve`). The test then acts as
//! a supervisor would: a destination killed by a `crash` fault is restarted
//! on the same port and file without faults; the source is given a bounded
//! time to finish (or SIGTERMed); the writers are stopped; and what a person
//! would see is checked:
//!
//! 1. the files fall in an allowed row of the verdict table, never "source
//!    absent + marker receiving", and in the row the fault predicts;
//! 2. `flexnbd resolve` names the same copy (exit status 10/11/12);
//! 3. that copy holds every acknowledged write and the image's untouched data
//!    (a block whose last write was cut off unacknowledged may hold either).
//!    A destination named canonical (verdict 11 or 12) is held to this even
//!    after its own power cut: entrust made everything durable. A source
//!    that lost its power is held to its durable writes only: each 512-byte
//!    sector must hold the block's last FUA write or the last write
//!    acknowledged before a completed FLUSH (or the initial data), or a
//!    write sent after it;
//! 4. the fault's `fault fired:` line is in the right process's log (every
//!    occurrence chosen here is always reached; a fault that silently did not
//!    fire fails the scenario);
//! 5. no log says "panicked" and every process exited within its bounded wait,
//!    with the status its outcome calls for;
//! 6. where the fault is transient, the migration completed: both processes
//!    exited 0, the marker is gone, the completion record names the
//!    destination file, and the destination is byte-identical to the source
//!    file (without `--unlink`) or to the expected image (with it);
//! 7. a supervisor that starts `listen` again on the destination once
//!    everything has stopped (after every scenario, so after every
//!    completing step, with and without a power cut) changes nothing: over a
//!    completed image (its completion record names the file) it refuses at
//!    once, exit 1, before its port opens; anywhere else it starts, is
//!    SIGTERMed, exits 1; the image, the marker and the record are as they
//!    were, and checks 1 to 3 run on what it left.
//!
//! The steps are those the fault vocabulary (`faults::steps::STEPS`, the
//! table in fixtures/faults/README.md) marks for the matrix, placed in the
//! migration by `PLACEMENTS` below; the actions at each are the table's
//! (without `pass`, and without the store's errors, which the store tests
//! cover). Which actions make sense where (the generation rule):
//! * store steps the hand-off depends on (`store.marker#2..4` and
//!   `store.record#1`, the completion record's write, on the destination,
//!   `store.unlink` on the source with `--unlink`): crash and the three
//!   power cuts only;
//! * `server.disconnect_done` (the destination completed: record written,
//!   marker removed): crash, the three power cuts and delay, the only
//!   actions a plan allows there;
//! * everywhere a `crash` runs, a power cut runs too, three times:
//!   `powercut(all)` (everything not yet durable is lost), `powercut(none)`
//!   (nothing is) and `powercut(torn)` (a seeded subset of sectors); each
//!   must also log the model's `power cut (...)` report, so a power cut that
//!   did not happen fails the scenario;
//! * steps without a message of their own (`server.accept`, `mirror.connect`):
//!   close, crash, hang, delay;
//! * steps that receive a message (`*_received`, `request_received.*`,
//!   `payload_received.*`, `reply_received.*`): close, crash, drop, hang,
//!   delay. Truncate and corrupt damage bytes on the wire, which is the
//!   sender's step; at a receive step the message has already been read;
//! * steps that send a header or a greeting (`greeting_send`,
//!   `request_send.*`, `reply_send.*`, `entrust_*send`, `disconnect_send`):
//!   all seven;
//! * `mirror.payload_send.write`: all but corrupt. `corrupt` damages a
//!   message's magic, and a payload has none: it would flip a data byte that
//!   NBD cannot detect (TCP's checksum is what guards payloads), which is
//!   outside the contract.
//!
//! Occurrences: `#1` everywhere; `#3` for the per-write steps (the sweep sends
//! at least three data writes per attempt: the image has three 1 MiB-bounded
//! data pieces); `#2` for the connection steps, with a helper fault
//! (`server.reply_send.write#1=close` on the destination) that makes the
//! first attempt fail after `Mirror started`, so the second connection is a
//! retry.
//!
//! What each fault must lead to (the expectation rule; a power cut is a
//! crash here, and a destination that lost its power is restarted like a
//! crashed one):
//! * a `mirror.*` crash kills the source: the source file stays canonical,
//!   except after the unlink (`mirror.disconnect_send`, with `--unlink`),
//!   where the destination is `entrusted`;
//! * faults at `#1` of a connection step (accept, greeting, connect) other
//!   than delay are first-attempt failures: `mirror` answers an error (exit
//!   1), nothing is retried, the source keeps serving its clients and owns the
//!   image;
//! * faults on the disconnect (other than delay) come after the hand-off:
//!   the destination keeps `state=entrusted` and holds everything (beside
//!   its completion record when the fault struck after the record's write);
//! * a crash or power cut at `server.disconnect_done` comes after the
//!   completion: the marker is gone, the record stays, and the supervisor's
//!   restart of the destination refuses to start (exit 1);
//! * everything else is transient (a destination crash included: the
//!   supervisor restarts it and the source's retries complete the migration).
//!
//! `FLEXNBD_MATRIX_SWEEP=N` runs N random scenarios (proptest): random plans
//! over the same steps with probabilities, counts and chains, random client
//! write patterns; each prints its plans (with seeds) for replay, and
//! `FLEXNBD_MATRIX_SWEEP_SEED=S` replays a whole sweep. The sweep is an
//! ignored test, run only when asked for: `FLEXNBD_MATRIX_SWEEP=N cargo test
//! --test acceptance matrix_random_sweep -- --include-ignored`.
//! `FLEXNBD_MATRIX_FILTER=TEXT` runs only the scenarios whose name contains
//! TEXT (e.g. `mirror.payload_send.write#3=drop`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use flexnbd::proto::{self, Request, SimpleReply};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, RngExt, SeedableRng};

use faults::steps::Act as FaultAct;
use faults::StepDef;

use crate::certs::Pki;
use crate::harness::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const BLOCK: u64 = 4 * KIB;
/// Scenarios running at once, across every matrix test.
const POOL: usize = 6;
/// The source's no-progress limit (FLEXNBD_MS_REQUEST_LIMIT_SECS).
const REQUEST_LIMIT_SECS: &str = "1";
/// How long a SIGTERMed process may take to exit.
const EXIT_WAIT: Duration = Duration::from_secs(10);
/// Delay used by the `delay` action (below the request limit: only slower).
const DELAY_MS: u64 = 300;
/// The initial image: data, hole, data, hole (the tail past 4 MiB is a hole
/// too). Three data writes in every sweep: 1 MiB, then 1 MiB + 512 KiB.
const DATA_RANGES: [(u64, u64); 2] = [(0, MIB), (2 * MIB, 3 * MIB + 512 * KIB)];

// ------------------------------------------------------------------ steps

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Dest,
    Source,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Dest => "dest",
            Side::Source => "source",
        }
    }
}

/// Where in a migration a step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Connection and greeting: `#1` is the first attempt.
    Connect,
    /// The copy (writes, write-zeroes, flush).
    Copy,
    /// Entrust and its reply.
    Entrust,
    /// The DISCONNECT, after the hand-off.
    Disconnect,
    /// After the destination completed (`disconnect_done`).
    Done,
}

#[derive(Clone, Copy, Debug)]
struct StepSpec {
    side: Side,
    key: &'static str,
    /// The step's entry in the fault vocabulary: what it carries, which
    /// actions make sense there.
    def: &'static StepDef,
    phase: Phase,
    occurrences: &'static [u32],
}

/// Where each step the vocabulary marks for the matrix
/// (`faults::steps::STEPS`, its `matrix` names) falls in a migration: the
/// process announcing it, the phase, and the occurrences faulted.
const PLACEMENTS: &[(&str, Side, Phase, &[u32])] = &[
    // The destination (`flexnbd listen`).
    ("server.accept", Side::Dest, Phase::Connect, &[1, 2]),
    ("server.greeting_send", Side::Dest, Phase::Connect, &[1, 2]),
    (
        "server.request_received.write",
        Side::Dest,
        Phase::Copy,
        &[1, 3],
    ),
    (
        "server.payload_received.write",
        Side::Dest,
        Phase::Copy,
        &[1, 3],
    ),
    ("server.reply_send.write", Side::Dest, Phase::Copy, &[1, 3]),
    (
        "server.request_received.write_zeroes",
        Side::Dest,
        Phase::Copy,
        &[1],
    ),
    (
        "server.reply_send.write_zeroes",
        Side::Dest,
        Phase::Copy,
        &[1],
    ),
    // The checkpoint before the cut-off (where an older destination gets
    // a FLUSH), and the resume query that opens each attempt.
    (
        "server.request_received.checkpoint",
        Side::Dest,
        Phase::Copy,
        &[1],
    ),
    (
        "server.reply_send.checkpoint",
        Side::Dest,
        Phase::Copy,
        &[1],
    ),
    (
        "server.request_received.resume",
        Side::Dest,
        Phase::Copy,
        &[1],
    ),
    ("server.reply_send.resume", Side::Dest, Phase::Copy, &[1]),
    ("server.entrust_received", Side::Dest, Phase::Entrust, &[1]),
    (
        "server.entrust_reply_send",
        Side::Dest,
        Phase::Entrust,
        &[1],
    ),
    (
        "server.disconnect_received",
        Side::Dest,
        Phase::Disconnect,
        &[1],
    ),
    // The marker's rewrites and removal: #1 creates it at start-up (before
    // the port listens), #2 says `receiving` before the first data, #3 says
    // `entrusted`, #4 removes it after the DISCONNECT (after the record).
    ("store.marker", Side::Dest, Phase::Copy, &[2, 3]),
    ("store.marker", Side::Dest, Phase::Disconnect, &[4]),
    // The completion record's write, after the DISCONNECT and the image's
    // fdatasync, before the marker's removal.
    ("store.record", Side::Dest, Phase::Disconnect, &[1]),
    // A checkpoint's rewrite of the marker (apart from store.marker).
    ("store.checkpoint", Side::Dest, Phase::Copy, &[1]),
    // The destination completed and goes on to exit.
    ("server.disconnect_done", Side::Dest, Phase::Done, &[1]),
    // The source (`flexnbd serve`, whose mirror connects out).
    ("mirror.connect", Side::Source, Phase::Connect, &[1, 2]),
    (
        "mirror.greeting_received",
        Side::Source,
        Phase::Connect,
        &[1, 2],
    ),
    (
        "mirror.request_send.write",
        Side::Source,
        Phase::Copy,
        &[1, 3],
    ),
    (
        "mirror.payload_send.write",
        Side::Source,
        Phase::Copy,
        &[1, 3],
    ),
    (
        "mirror.reply_received.write",
        Side::Source,
        Phase::Copy,
        &[1, 3],
    ),
    (
        "mirror.request_send.write_zeroes",
        Side::Source,
        Phase::Copy,
        &[1],
    ),
    (
        "mirror.reply_received.write_zeroes",
        Side::Source,
        Phase::Copy,
        &[1],
    ),
    (
        "mirror.request_send.checkpoint",
        Side::Source,
        Phase::Copy,
        &[1],
    ),
    (
        "mirror.reply_received.checkpoint",
        Side::Source,
        Phase::Copy,
        &[1],
    ),
    (
        "mirror.request_send.resume",
        Side::Source,
        Phase::Copy,
        &[1],
    ),
    (
        "mirror.reply_received.resume",
        Side::Source,
        Phase::Copy,
        &[1],
    ),
    ("mirror.entrust_send", Side::Source, Phase::Entrust, &[1]),
    (
        "mirror.entrust_reply_received",
        Side::Source,
        Phase::Entrust,
        &[1],
    ),
    (
        "mirror.disconnect_send",
        Side::Source,
        Phase::Disconnect,
        &[1],
    ),
    // `--unlink`, after the entrust reply (only with --unlink).
    ("store.unlink", Side::Source, Phase::Entrust, &[1]),
];

/// Every step a migration announces, on both sides: the vocabulary's
/// matrix steps, each placed by [`PLACEMENTS`]. A step the vocabulary marks
/// for the matrix without a placement, or a placement of a step it does not
/// mark, fails every matrix test.
fn steps() -> &'static [StepSpec] {
    static STEPS: OnceLock<Vec<StepSpec>> = OnceLock::new();
    STEPS.get_or_init(|| {
        let mut out = Vec::new();
        for (def, name) in faults::steps::matrix() {
            let key: &'static str = Box::leak(format!("{}.{name}", def.side).into_boxed_str());
            let before = out.len();
            for &(_, side, phase, occurrences) in PLACEMENTS.iter().filter(|p| p.0 == key) {
                out.push(StepSpec {
                    side,
                    key,
                    def,
                    phase,
                    occurrences,
                });
            }
            assert!(
                out.len() > before,
                "{key}: faults::steps::STEPS marks it for the matrix, \
                 expected a placement for it in PLACEMENTS (acceptance/matrix.rs)"
            );
        }
        for (key, ..) in PLACEMENTS {
            assert!(
                out.iter().any(|s| s.key == *key),
                "{key} is placed in PLACEMENTS but faults::steps::STEPS does not mark it \
                 for the matrix (its `matrix` names)"
            );
        }
        out
    })
}

/// The helper fault that makes the first attempt fail after `Mirror
/// started`, so that `#2` of a connection step is a retry.
const RETRY_HELPER: &str = "server.reply_send.write#1=close";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Close,
    Crash,
    Drop,
    Hang,
    Delay(u64),
    Truncate(u32),
    Corrupt,
    /// A power cut: `all`, `none` or `torn` (what is not yet durable).
    PowerCut(&'static str),
}

/// The three ways a power cut may go, each run wherever `crash` runs.
const POWER_LOSSES: [Act; 3] = [
    Act::PowerCut("all"),
    Act::PowerCut("none"),
    Act::PowerCut("torn"),
];

impl Act {
    fn text(self) -> String {
        match self {
            Act::Close => "close".into(),
            Act::Crash => "crash".into(),
            Act::Drop => "drop".into(),
            Act::Hang => "hang".into(),
            Act::Delay(ms) => format!("delay({ms})"),
            Act::Truncate(n) => format!("truncate({n})"),
            Act::Corrupt => "corrupt".into(),
            Act::PowerCut(loss) => format!("powercut({loss})"),
        }
    }

    /// Whether the process that meets this action dies (crash or power cut).
    fn kills(self) -> bool {
        matches!(self, Act::Crash | Act::PowerCut(_))
    }
}

/// The actions the matrix runs at a step: those the vocabulary says make
/// sense there (see the module comment), with their arguments; `pass` is no
/// fault, and the store's errors are the store tests' business.
fn actions_for(def: &StepDef) -> Vec<Act> {
    let mut v = Vec::new();
    for &act in def.actions {
        match act {
            FaultAct::Pass | FaultAct::Eio | FaultAct::Enospc | FaultAct::Slow => {}
            FaultAct::Drop => v.push(Act::Drop),
            FaultAct::Close => v.push(Act::Close),
            // A header is cut inside its magic and fields; a payload well
            // past its start.
            FaultAct::Truncate if def.allows(FaultAct::Corrupt) => v.push(Act::Truncate(10)),
            FaultAct::Truncate => v.push(Act::Truncate(2048)),
            FaultAct::Hang => v.push(Act::Hang),
            FaultAct::Delay => v.push(Act::Delay(DELAY_MS)),
            FaultAct::Corrupt => v.push(Act::Corrupt),
            FaultAct::Crash => v.push(Act::Crash),
            // Wherever a crash can happen, so can a power cut.
            FaultAct::PowerCut => v.extend(POWER_LOSSES),
        }
    }
    v
}

// ------------------------------------------------------------ scenarios

/// What must come of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Transient: the migration completes and the images are identical.
    Complete,
    /// The first attempt fails: reported to `mirror`, never retried; the
    /// source keeps serving and owns the image.
    FirstAttemptFailed,
    /// The source is killed; `after_unlink` when its file was already gone.
    SourceCrashed { entrusted: bool, after_unlink: bool },
    /// The hand-off happened but the DISCONNECT was lost: the destination
    /// keeps `state=entrusted` and holds everything.
    LostDisconnect,
    /// The migration completed, then the destination died: no marker, a
    /// completion record, and its restart refuses to start.
    CompletedThenDied,
    /// Random plans (the sweep): only the safety properties are checked.
    Unknown { transient: bool },
}

#[derive(Clone, Debug)]
struct Scenario {
    name: String,
    dest_plan: String,
    source_plan: String,
    /// `fault fired:` lines that must appear, and in which process's log.
    must_fire: Vec<(Side, String)>,
    unlink: bool,
    expect: Expect,
    writers: usize,
    /// Pause between a writer's writes, in microseconds.
    pace_us: u64,
    /// Writers write only to the first `hot_blocks` blocks (0: anywhere).
    hot_blocks: u64,
    /// Seed of the writers' offsets and data.
    seed: u64,
    /// How long the source may take to finish the migration.
    settle: Duration,
    /// Both ends on TLS: `listen` presents a certificate (and so speaks
    /// newstyle, TLS required) and `mirror` verifies it with `--tls-ca`.
    tls: bool,
}

fn classify(spec: &StepSpec, occurrence: u32, act: Act, unlink: bool) -> Expect {
    if spec.side == Side::Source && act.kills() {
        let entrusted = matches!(
            spec.key,
            "mirror.entrust_reply_received" | "mirror.disconnect_send" | "store.unlink"
        );
        return Expect::SourceCrashed {
            entrusted,
            after_unlink: unlink && spec.key == "mirror.disconnect_send",
        };
    }
    if matches!(act, Act::Delay(_)) {
        return Expect::Complete;
    }
    match spec.phase {
        Phase::Connect if occurrence == 1 => Expect::FirstAttemptFailed,
        Phase::Disconnect => Expect::LostDisconnect,
        Phase::Done => Expect::CompletedThenDied,
        _ => Expect::Complete,
    }
}

/// How long a stalled connection step costs the mirror before it retries.
fn stall_cost(key: &str, act: Act) -> Duration {
    match (key, act) {
        // CONNECT_TIMEOUT
        ("mirror.connect", Act::Hang) => Duration::from_secs(16),
        // HELLO_TIMEOUT (an ignored greeting is waited for like a stalled one)
        ("mirror.greeting_received", Act::Hang | Act::Drop)
        | ("server.accept", Act::Hang)
        | ("server.greeting_send", Act::Hang | Act::Drop) => Duration::from_secs(6),
        _ => Duration::ZERO,
    }
}

static TAGS: AtomicU64 = AtomicU64::new(1);

fn matrix(side: Side) -> Vec<Scenario> {
    let mut out = Vec::new();
    for spec in steps().iter().filter(|s| s.side == side) {
        for &occurrence in spec.occurrences {
            for act in actions_for(spec.def) {
                for unlink in [false, true] {
                    if spec.key == "store.unlink" && !unlink {
                        // Never reached without --unlink.
                        continue;
                    }
                    let key = format!("{}#{occurrence}", spec.key);
                    let seed = seeded(fnv(&format!("{key}={}{unlink}", act.text()))).next_u64();
                    let entry = format!("seed={}; {key}={}", seed % 1_000_000, act.text());
                    let mut must_fire =
                        vec![(side, format!("fault fired: {key} -> {}", act.text()))];
                    if let Act::PowerCut(loss) = act {
                        // The model's own report: the loss really happened.
                        must_fire.push((side, format!("power cut ({loss}): ")));
                    }
                    let (mut dest_plan, source_plan) = match side {
                        Side::Dest => (entry, String::new()),
                        Side::Source => (String::new(), entry),
                    };
                    if spec.phase == Phase::Connect && occurrence >= 2 {
                        if dest_plan.is_empty() {
                            dest_plan = format!("seed=1; {RETRY_HELPER}");
                        } else {
                            dest_plan = format!("{dest_plan}; {RETRY_HELPER}");
                        }
                        must_fire.push((
                            Side::Dest,
                            "fault fired: server.reply_send.write#1 -> close".into(),
                        ));
                    }
                    let expect = classify(spec, occurrence, act, unlink);
                    out.push(Scenario {
                        name: format!(
                            "{} {key}={}{}",
                            side.name(),
                            act.text(),
                            if unlink { " --unlink" } else { "" }
                        ),
                        dest_plan,
                        source_plan,
                        must_fire,
                        unlink,
                        expect,
                        writers: 1 + (seed % 2) as usize,
                        pace_us: 1000,
                        hot_blocks: 0,
                        seed,
                        settle: Duration::from_secs(10) + stall_cost(spec.key, act),
                        tls: false,
                    });
                }
            }
        }
    }
    out
}

// ------------------------------------------------------------- the pool

/// At most POOL scenarios at once, across all the matrix tests.
static SLOTS: Mutex<usize> = Mutex::new(0);
static SLOT_FREED: Condvar = Condvar::new();

struct Slot;

impl Slot {
    fn take() -> Slot {
        let mut n = SLOTS.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= POOL {
            n = SLOT_FREED.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *SLOTS.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        SLOT_FREED.notify_one();
    }
}

/// What one scenario produced.
struct Outcome {
    failure: Option<String>,
    fired: usize,
    elapsed: Duration,
}

/// Runs every scenario on the pool; fails with every failing scenario's
/// report.
fn run_all(label: &str, mut scenarios: Vec<Scenario>) -> Vec<Outcome> {
    // FLEXNBD_MATRIX_FILTER=TEXT replays only the scenarios whose name
    // contains TEXT.
    if let Ok(filter) = std::env::var("FLEXNBD_MATRIX_FILTER") {
        scenarios.retain(|s| s.name.contains(filter.as_str()));
    }
    // The slowest first (the queue pops from the end), so they do not
    // make the tail.
    scenarios.sort_by_key(|s| s.settle);
    let started = Instant::now();
    let total = scenarios.len();
    let with_power_loss = scenarios
        .iter()
        .filter(|s| s.dest_plan.contains("powercut") || s.source_plan.contains("powercut"))
        .count();
    let queue = Arc::new(Mutex::new(
        scenarios.into_iter().enumerate().collect::<Vec<_>>(),
    ));
    let results = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..POOL)
        .map(|_| {
            let queue = queue.clone();
            let results = results.clone();
            let done = done.clone();
            thread::spawn(move || loop {
                let Some((i, scenario)) = queue.lock().unwrap().pop() else {
                    return;
                };
                let slot = Slot::take();
                let outcome = run_caught(&scenario);
                drop(slot);
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                println!(
                    "[{n}/{total}] {} {} ({:.1} s)",
                    if outcome.failure.is_some() {
                        "FAIL"
                    } else {
                        "ok  "
                    },
                    scenario.name,
                    outcome.elapsed.as_secs_f64()
                );
                results.lock().unwrap().push((i, scenario, outcome));
            })
        })
        .collect();
    for w in workers {
        w.join().expect("matrix worker");
    }
    let mut results = std::mem::take(&mut *results.lock().unwrap());
    results.sort_by_key(|(i, _, _)| *i);
    let failures: Vec<String> = results
        .iter()
        .filter_map(|(_, s, o)| {
            o.failure
                .as_ref()
                .map(|f| format!("==== FAILED: {}\n{f}", s.name))
        })
        .collect();
    println!(
        "matrix {label}: {total} scenarios ({with_power_loss} with power loss), {} failed, {:.1} s",
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        let names: Vec<&str> = results
            .iter()
            .filter(|(_, _, o)| o.failure.is_some())
            .map(|(_, s, _)| s.name.as_str())
            .collect();
        panic!(
            "{}\n\nmatrix {label}: {} of {total} scenarios failed:\n  {}",
            failures.join("\n\n"),
            failures.len(),
            names.join("\n  ")
        );
    }
    results.into_iter().map(|(_, _, o)| o).collect()
}

fn run_caught(s: &Scenario) -> Outcome {
    let started = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_scenario(s)));
    let (failure, fired) = match result {
        Ok(Ok(fired)) => (None, fired),
        Ok(Err(report)) => (Some(report), 0),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            (
                Some(format!("{}\nthe scenario panicked: {msg}", describe(s))),
                0,
            )
        }
    };
    Outcome {
        failure,
        fired,
        elapsed: started.elapsed(),
    }
}

fn describe(s: &Scenario) -> String {
    format!(
        "scenario: {}\n  destination --faults: {:?}\n  source --faults: {:?}\n  unlink: {}\n  expect: {:?}\n  writers: {} (pace {} us, hot blocks {}, seed {})",
        s.name,
        s.dest_plan,
        s.source_plan,
        s.unlink,
        s.expect,
        s.writers,
        s.pace_us,
        s.hot_blocks,
        s.seed
    )
}

// -------------------------------------------------------------- writers

/// One block's history as one writer saw it.
#[derive(Clone, Debug, Default)]
struct BlockLog {
    /// The last acknowledged write's sequence number.
    acked: Option<u64>,
    /// Writes sent since then whose reply never came: each may have landed.
    unsure: Vec<u64>,
    /// The last write known durable: acknowledged with FUA, or acknowledged
    /// before a FLUSH that completed. `None`: the initial content (synced
    /// before the test began).
    durable: Option<u64>,
    /// Every write sent after `durable`, acknowledged or not: after a power
    /// cut each sector may hold any of these or the durable content.
    since_durable: Vec<u64>,
}

#[derive(Default)]
struct WriterStats {
    acked: AtomicU64,
    /// FUA writes acknowledged (also counted in `acked`).
    fua: AtomicU64,
    flushes: AtomicU64,
    connects: AtomicU64,
    error_replies: AtomicU64,
    foreign: AtomicBool,
}

struct Writers {
    stop: Arc<AtomicBool>,
    stats: Arc<WriterStats>,
    threads: Vec<thread::JoinHandle<HashMap<u64, BlockLog>>>,
    /// The data tag of each writer (data = f(tag, seq)).
    tags: Vec<u64>,
}

fn block_data(tag: u64, seq: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    seeded(tag ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15)).fill_bytes(&mut v);
    // Never all zero, and recognisable in a hex dump.
    v[0] = 0xa5;
    v[1..9].copy_from_slice(&seq.to_be_bytes());
    v
}

impl Writers {
    fn start(addr: SocketAddr, size: u64, s: &Scenario) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(WriterStats::default());
        let blocks = if s.hot_blocks > 0 {
            s.hot_blocks.min(size / BLOCK)
        } else {
            size / BLOCK
        };
        let n = s.writers as u64;
        let mut tags = Vec::new();
        let threads = (0..n)
            .map(|t| {
                let tag = seeded(s.seed ^ (t + 1).wrapping_mul(0x51_7cc1_b727_220a)).next_u64();
                tags.push(tag);
                let stop = stop.clone();
                let stats = stats.clone();
                let pace = Duration::from_micros(s.pace_us);
                thread::spawn(move || writer(addr, size, blocks, t, n, tag, pace, &stop, &stats))
            })
            .collect();
        Writers {
            stop,
            stats,
            threads,
            tags,
        }
    }

    /// Stops the writers and returns, per block, the writer's tag and log.
    fn finish(self) -> Result<HashMap<u64, (u64, BlockLog)>, String> {
        self.stop.store(true, Ordering::Release);
        let mut all = HashMap::new();
        for (t, h) in self.threads.into_iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !h.is_finished() {
                if Instant::now() > deadline {
                    return Err("a client writer did not stop within 15 s".into());
                }
                thread::sleep(Duration::from_millis(10));
            }
            let logs = h
                .join()
                .map_err(|_| "a client writer panicked".to_string())?;
            for (block, log) in logs {
                all.insert(block, (self.tags[t], log));
            }
        }
        Ok(all)
    }
}

fn connect_source(addr: SocketAddr, size: u64, stats: &WriterStats) -> Option<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_nodelay(true).ok()?;
    let mut g = [0u8; proto::OLDSTYLE_GREETING_LEN];
    s.read_exact(&mut g).ok()?;
    if &g[0..8] != b"NBDMAGIC" || u64::from_be_bytes(g[16..24].try_into().unwrap()) != size {
        // The port now belongs to someone else: never write there.
        stats.foreign.store(true, Ordering::Release);
        return None;
    }
    stats.connects.fetch_add(1, Ordering::Relaxed);
    Some(s)
}

/// Writes 4 KiB blocks (those with `block % n == t`) until stopped,
/// reconnecting after a cut; records what was acknowledged.
#[allow(clippy::too_many_arguments)]
fn writer(
    addr: SocketAddr,
    size: u64,
    blocks: u64,
    t: u64,
    n: u64,
    tag: u64,
    pace: Duration,
    stop: &AtomicBool,
    stats: &WriterStats,
) -> HashMap<u64, BlockLog> {
    let mut logs: HashMap<u64, BlockLog> = HashMap::new();
    let mut rng = seeded(tag);
    let mut seq = 0u64;
    let mut conn: Option<TcpStream> = None;
    let mine = blocks.saturating_sub(t).div_ceil(n).max(1);
    while !stop.load(Ordering::Acquire) {
        if stats.foreign.load(Ordering::Acquire) {
            break;
        }
        let Some(c) = conn.as_mut() else {
            conn = connect_source(addr, size, stats);
            if conn.is_none() {
                thread::sleep(Duration::from_millis(20));
            }
            continue;
        };
        let block = rng.random_range(0..mine) * n + t;
        if block >= size / BLOCK {
            continue;
        }
        seq += 1;
        let handle = (tag << 20) ^ seq;
        // About one request in ten is a FLUSH and one in eight a FUA write,
        // so a power cut on the source has writes it must keep (durable)
        // beside writes it may lose.
        let (kind, flags) = match rng.random_range(0..40) {
            0..=3 => (proto::cmd::FLUSH, 0),
            4..=8 => (proto::cmd::WRITE, proto::cmd_flags::FUA),
            _ => (proto::cmd::WRITE, 0),
        };
        let msg = if kind == proto::cmd::FLUSH {
            Request::new(kind, 0, handle, 0, 0).encode().to_vec()
        } else {
            let log = logs.entry(block).or_default();
            log.unsure.push(seq);
            log.since_durable.push(seq);
            let mut msg = Request::new(kind, flags, handle, block * BLOCK, BLOCK as u32)
                .encode()
                .to_vec();
            msg.extend_from_slice(&block_data(tag, seq));
            msg
        };
        let mut reply = [0u8; proto::SIMPLE_REPLY_LEN];
        let ok = c.write_all(&msg).is_ok() && c.read_exact(&mut reply).is_ok();
        if !ok {
            conn = None;
            continue;
        }
        let r = SimpleReply::decode(&reply);
        if r.magic != proto::SIMPLE_REPLY_MAGIC || r.handle != handle || r.error != 0 {
            stats.error_replies.fetch_add(1, Ordering::Relaxed);
            conn = None;
            continue;
        }
        if kind == proto::cmd::FLUSH {
            // Every write acknowledged before the FLUSH was sent is durable
            // now; one whose reply never came may or may not have landed.
            for log in logs.values_mut() {
                if log.acked.is_some() {
                    log.durable = log.acked;
                    log.since_durable = log.unsure.clone();
                }
            }
            stats.flushes.fetch_add(1, Ordering::Relaxed);
        } else {
            let log = logs.get_mut(&block).unwrap();
            log.acked = Some(seq);
            log.unsure.clear();
            if flags & proto::cmd_flags::FUA != 0 {
                log.durable = Some(seq);
                log.since_durable.clear();
                stats.fua.fetch_add(1, Ordering::Relaxed);
            }
            stats.acked.fetch_add(1, Ordering::Relaxed);
        }
        if !pace.is_zero() {
            thread::sleep(pace);
        }
    }
    logs
}

// -------------------------------------------------------------- images

fn image_size(tag: u64) -> u64 {
    // A size of its own per scenario running at once: a writer that finds
    // another scenario's server on a reused port sees the wrong size.
    4 * MIB + (1 + tag % 255) * BLOCK
}

fn initial_image(size: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    for (i, (start, end)) in DATA_RANGES.iter().enumerate() {
        let p = pattern((end - start) as usize, 7 + i as u8);
        v[*start as usize..*end as usize].copy_from_slice(&p);
    }
    v
}

fn write_initial(path: &Path, image: &[u8]) {
    let f = fs::File::create(path).unwrap();
    f.set_len(image.len() as u64).unwrap();
    for (start, end) in DATA_RANGES {
        f.write_all_at(&image[start as usize..end as usize], start)
            .unwrap();
    }
    f.sync_all().unwrap();
}

/// What the oracle may accept of a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Promise {
    /// Every acknowledged write (a crash, or a destination's verdict).
    Acknowledged,
    /// Only durable writes (FUA, or before a completed FLUSH): the copy's
    /// process lost its power, so each 512-byte sector may hold the durable
    /// content or any write sent after it.
    Durable,
}

/// Checks that `actual` is the initial image with, for every written block,
/// what `promise` keeps of its writes.
fn check_model(
    what: &str,
    actual: &[u8],
    initial: &[u8],
    logs: &HashMap<u64, (u64, BlockLog)>,
    promise: Promise,
) -> Result<(), String> {
    if actual.len() != initial.len() {
        return Err(format!(
            "{what}: size {} instead of {}",
            actual.len(),
            initial.len()
        ));
    }
    let mut problems = Vec::new();
    for b in 0..(initial.len() as u64 / BLOCK) {
        let range = (b * BLOCK) as usize..((b + 1) * BLOCK) as usize;
        let log = logs.get(&b);
        let problem = match promise {
            Promise::Acknowledged => {
                acknowledged_problem(&actual[range.clone()], &initial[range], log)
            }
            Promise::Durable => durable_problem(&actual[range.clone()], &initial[range], log),
        };
        if let Some(p) = problem {
            problems.push(format!("block {b} (offset {}){p}", b * BLOCK));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    problems.truncate(12);
    Err(format!(
        "{what} {} ({n} bad blocks):\n    {}",
        match promise {
            Promise::Acknowledged => "does not hold what was acknowledged",
            Promise::Durable => "lost durable writes after its power cut",
        },
        problems.join("\n    ")
    ))
}

/// The crash oracle for one block: its last acknowledged write (or the
/// initial data), or one of the unacknowledged writes after it.
fn acknowledged_problem(
    got: &[u8],
    initial: &[u8],
    log: Option<&(u64, BlockLog)>,
) -> Option<String> {
    let ok = match log {
        None => got == initial,
        Some((tag, log)) => {
            let base_ok = match log.acked {
                Some(seq) => got == block_data(*tag, seq).as_slice(),
                None => got == initial,
            };
            base_ok
                || log
                    .unsure
                    .iter()
                    .any(|&s| got == block_data(*tag, s).as_slice())
        }
    };
    if ok {
        return None;
    }
    let seen = if got[0] == 0xa5 {
        format!(
            "a client write seq {}",
            u64::from_be_bytes(got[1..9].try_into().unwrap())
        )
    } else if got.iter().all(|&x| x == 0) {
        "zeros".into()
    } else {
        "other data".into()
    };
    Some(format!(
        ": expected {:?}, found {seen}",
        log.map(|(_, l)| l.clone())
    ))
}

/// The power-cut oracle for one block: per 512-byte sector, the block's
/// durable content (its last FUA or flushed write, or the initial data) or
/// any write sent after it. A sector holding an older write, zeros over
/// data, or anything else is a durable write lost.
fn durable_problem(got: &[u8], initial: &[u8], log: Option<&(u64, BlockLog)>) -> Option<String> {
    const SECTOR: usize = 512;
    let mut versions: Vec<Vec<u8>> = Vec::new();
    match log {
        Some((tag, log)) => {
            versions.push(match log.durable {
                Some(seq) => block_data(*tag, seq),
                None => initial.to_vec(),
            });
            versions.extend(log.since_durable.iter().map(|&s| block_data(*tag, s)));
        }
        None => versions.push(initial.to_vec()),
    }
    let bad = got.chunks(SECTOR).enumerate().find(|(i, sector)| {
        !versions
            .iter()
            .any(|v| v[i * SECTOR..(i + 1) * SECTOR] == **sector)
    })?;
    Some(format!(
        " sector {}: not the durable write nor a later one (durable {:?}, later writes {:?})",
        bad.0,
        log.map(|(_, l)| l.durable),
        log.map(|(_, l)| l.since_durable.len())
    ))
}

// ------------------------------------------------------------ processes

fn exit_code(s: ExitStatus) -> i32 {
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

fn try_status(p: &mut Flexnbd) -> Option<ExitStatus> {
    p.child.as_mut().unwrap().try_wait().ok().flatten()
}

/// SIGTERMs `p` unless it has exited, and waits (bounded) for its status.
fn terminate(p: &mut Flexnbd, what: &str) -> Result<(i32, bool), String> {
    if let Some(s) = try_status(p) {
        return Ok((exit_code(s), false));
    }
    p.signal(libc::SIGTERM);
    let deadline = Instant::now() + EXIT_WAIT;
    loop {
        if let Some(s) = try_status(p) {
            return Ok((exit_code(s), true));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what} did not exit within {EXIT_WAIT:?} of SIGTERM"
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn listen_args(port: u16, file: &Path, sock: &Path, plan: &str, tls: Option<&Pki>) -> Vec<String> {
    let mut args: Vec<String> = [
        "listen",
        "-l",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-f",
        file.to_str().unwrap(),
        "-s",
        sock.to_str().unwrap(),
        "-v",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match tls {
        // TLS means newstyle, which advertises WRITE_ZEROES anyway.
        Some(pki) => args.extend(pki.server_args()),
        // So holes travel as WRITE_ZEROES and its steps are in the matrix.
        None => args.push("--oldstyle-extra-flags".into()),
    }
    if !plan.is_empty() {
        args.push("--faults".into());
        args.push(plan.into());
    }
    args
}

fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut at = text.len() - max;
    while !text.is_char_boundary(at) {
        at += 1;
    }
    &text[at..]
}

// ------------------------------------------------------------- scenario

/// Runs one scenario; `Ok(fault lines fired)` or a report.
fn run_scenario(s: &Scenario) -> Result<usize, String> {
    let tag = TAGS.fetch_add(1, Ordering::Relaxed);
    let dir = TempDir::new("matrix");
    let size = image_size(tag);
    let initial = initial_image(size);
    let src = dir.join("src.img");
    let dst = dir.join("dst.img");
    write_initial(&src, &initial);
    fs::File::create(&dst).unwrap().set_len(size).unwrap();
    let dsock = dir.join("dst.sock");
    let ssock = dir.join("src.sock");
    let marker = PathBuf::from(format!("{}.INCOMPLETE", dst.display()));
    let pki = s.tls.then(|| Pki::new(&dir.path));

    let mut notes: Vec<String> = Vec::new();
    let mut dests: Vec<Flexnbd> = vec![Flexnbd::spawn(
        &dir,
        &listen_args(0, &dst, &dsock, &s.dest_plan, pki.as_ref()),
    )];
    let port = dests[0].port();
    let mut sargs = server_args("serve", &src, Some(&ssock), &[]);
    if !s.source_plan.is_empty() {
        sargs.push("--faults".into());
        sargs.push(s.source_plan.clone());
    }
    let mut source = Flexnbd::spawn_with_env(
        &dir,
        &sargs,
        &[("FLEXNBD_MS_REQUEST_LIMIT_SECS", REQUEST_LIMIT_SECS)],
    );
    wait_for("the source's control socket", WAIT, || {
        UnixStream::connect(&ssock).ok().map(|_| ())
    });

    let writers = Writers::start(source.addr, size, s);
    let stats = writers.stats.clone();
    wait_for("the writers' first acknowledged writes", WAIT, || {
        (stats.acked.load(Ordering::Relaxed) >= 16).then_some(())
    });

    // The migration.
    let port_s = port.to_string();
    let mut margs = vec![
        "mirror",
        "-s",
        ssock.to_str().unwrap(),
        "-l",
        "127.0.0.1",
        "-p",
        &port_s,
    ];
    if s.unlink {
        margs.push("--unlink");
    }
    let tls_args = pki.as_ref().map(Pki::client_args).unwrap_or_default();
    margs.extend(tls_args.iter().map(String::as_str));
    let mirror = run_tool(BIN, &margs, Duration::from_secs(60));
    let mirror_code = mirror.status.code().unwrap_or(-1);
    let mirror_out = format!(
        "{}{}",
        String::from_utf8_lossy(&mirror.stdout),
        String::from_utf8_lossy(&mirror.stderr)
    );
    let acked_at_mirror = stats.acked.load(Ordering::Relaxed);

    // Settle, as a supervisor would.
    let mut failures: Vec<String> = Vec::new();
    let mut restarts = 0;
    let mut dest_codes: Vec<i32> = Vec::new();
    let settle_until = Instant::now()
        + match s.expect {
            Expect::FirstAttemptFailed => Duration::from_millis(1500),
            _ => s.settle,
        };
    let mut source_status: Option<ExitStatus> = None;
    let mut source_exited_at: Option<Instant> = None;
    loop {
        if source_status.is_none() {
            source_status = try_status(&mut source);
            if source_status.is_some() {
                source_exited_at = Some(Instant::now());
            }
        }
        let last = dests.last_mut().unwrap();
        let dest_status = try_status(last);
        if let Some(st) = dest_status {
            if dest_codes.len() < dests.len() {
                dest_codes.push(exit_code(st));
                if st.signal() == Some(libc::SIGKILL) && restarts < 3 {
                    // A crashed destination: restart it on the same port and
                    // file, without faults, so the source's retries land.
                    restarts += 1;
                    notes.push(format!("destination restarted after {st}"));
                    // It may refuse at once (a completion record), and
                    // then counts as a destination that exited.
                    dests.push(Flexnbd::spawn_or_exit(
                        &dir,
                        BIN,
                        &listen_args(port, &dst, &dsock, "", pki.as_ref()),
                    ));
                    continue;
                }
            }
        }
        let dest_done = dest_codes.len() == dests.len();
        if let Some(at) = source_exited_at {
            // The source is gone: the destination finishes at once, or never
            // (a lost DISCONNECT).
            if dest_done || at.elapsed() > Duration::from_millis(1000) {
                break;
            }
        }
        if Instant::now() > settle_until {
            break;
        }
        thread::sleep(Duration::from_millis(15));
    }
    let source_was_running = source_status.is_none();
    let dest_was_running = dest_codes.len() < dests.len();

    // For a first-attempt failure, the source must still serve its clients.
    if s.expect == Expect::FirstAttemptFailed && source_was_running {
        let before = stats.acked.load(Ordering::Relaxed);
        let t = Instant::now();
        while stats.acked.load(Ordering::Relaxed) < before + 5
            && t.elapsed() < Duration::from_secs(3)
        {
            thread::sleep(Duration::from_millis(10));
        }
        if stats.acked.load(Ordering::Relaxed) < before + 5 {
            failures.push(
                "after the failed first attempt the source no longer acknowledges client writes"
                    .into(),
            );
        }
    }

    // Stop everything (bounded).
    let logs = match writers.finish() {
        Ok(l) => l,
        Err(e) => {
            failures.push(e);
            HashMap::new()
        }
    };
    let (source_code, source_termed) = match terminate(&mut source, "the source") {
        Ok(v) => v,
        Err(e) => {
            failures.push(e);
            (-1, true)
        }
    };
    let mut dest_termed = false;
    if dest_codes.len() < dests.len() {
        match terminate(dests.last_mut().unwrap(), "the destination") {
            Ok((code, termed)) => {
                dest_codes.push(code);
                dest_termed = termed;
            }
            Err(e) => failures.push(e),
        }
    }

    // (7) A supervisor starts `listen` again on the destination, now that
    // everything has stopped.
    let restart_log = match supervisor_restart(&dir, &dst, &marker, pki.as_ref()) {
        Ok(log) => log,
        Err((problem, log)) => {
            failures.push(problem);
            log
        }
    };

    // What a person sees.
    let src_exists = src.exists();
    let record = record_matches(&dst);
    let marker_state = fs::read_to_string(&marker).ok().map(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("state="))
            .unwrap_or("?")
            .trim()
            .to_string()
    });
    let verdict = match (src_exists, record, marker_state.as_deref()) {
        (true, _, _) => "source",
        (false, true, None) => "destination",
        (false, true, Some(_)) => "destination-leftover-marker",
        (false, false, None) => "destination",
        (false, false, Some("entrusted")) => "destination-entrusted",
        (false, false, Some(_)) => "impossible",
    };
    let resolve = run_tool(
        BIN,
        &[
            "resolve",
            "--source",
            src.to_str().unwrap(),
            "--dest",
            dst.to_str().unwrap(),
        ],
        Duration::from_secs(10),
    );
    let resolve_out = String::from_utf8_lossy(&resolve.stdout).into_owned();
    let src_bytes = fs::read(&src).ok();
    let dst_bytes = fs::read(&dst).unwrap_or_default();
    let source_log = source.log();
    let dest_logs: Vec<String> = dests.iter().map(|d| d.log()).collect();

    // (1) an allowed row, and the one the fault predicts.
    if verdict == "impossible" {
        failures.push(
            "FORBIDDEN STATE: the source file is gone and the destination marker says receiving"
                .into(),
        );
    }
    let (want_src, want_marker): (Option<bool>, Option<Option<&str>>) = match s.expect {
        Expect::Complete => (Some(!s.unlink), Some(None)),
        Expect::FirstAttemptFailed => (Some(true), Some(Some("receiving"))),
        Expect::SourceCrashed {
            entrusted,
            after_unlink,
        } => (
            Some(!after_unlink),
            Some(Some(if entrusted { "entrusted" } else { "receiving" })),
        ),
        Expect::LostDisconnect => (Some(!s.unlink), Some(Some("entrusted"))),
        Expect::CompletedThenDied => (Some(!s.unlink), Some(None)),
        Expect::Unknown { transient: true } => (Some(!s.unlink), Some(None)),
        Expect::Unknown { transient: false } => (None, None),
    };
    if want_src.is_some_and(|w| w != src_exists)
        || want_marker.is_some_and(|w| w != marker_state.as_deref())
    {
        failures.push(format!(
            "expected source file {} and marker {:?}, found source file {} and marker {:?}",
            if want_src == Some(true) {
                "present"
            } else {
                "absent"
            },
            want_marker.flatten(),
            if src_exists { "present" } else { "absent" },
            marker_state
        ));
    }

    // Every completion leaves its record, naming this very file.
    let want_record = match s.expect {
        Expect::Complete | Expect::CompletedThenDied | Expect::Unknown { transient: true } => {
            Some(true)
        }
        // Lost after the record's write (store.marker#4) or before it.
        Expect::LostDisconnect | Expect::Unknown { transient: false } => None,
        Expect::FirstAttemptFailed | Expect::SourceCrashed { .. } => Some(false),
    };
    if want_record.is_some_and(|w| w != record) {
        failures.push(format!(
            "expected {} completion record for the destination file, found {}: {:?}",
            if want_record == Some(true) { "a" } else { "no" },
            if record { "one" } else { "none that matches" },
            fs::read_to_string(record_path(&dst)).ok()
        ));
    }

    // (2) resolve names the same copy.
    let want_code = match verdict {
        "source" => 10,
        "destination" => 11,
        "destination-entrusted" | "destination-leftover-marker" => 12,
        _ => 13,
    };
    if resolve.status.code() != Some(want_code)
        || !resolve_out.contains(&format!("verdict: {verdict}\n"))
    {
        failures.push(format!(
            "flexnbd resolve disagrees: expected verdict {verdict} (exit {want_code}), got exit {:?}:\n{resolve_out}{}",
            resolve.status.code(),
            String::from_utf8_lossy(&resolve.stderr)
        ));
    }

    // (3) the named copy holds every acknowledged write; a source that lost
    // its power, every durable one (FUA, or before a completed FLUSH). A
    // destination named canonical is held to every acknowledged write
    // whatever happened to its power: entrust made them durable.
    let source_power_cut = source_log.contains("power cut (");
    let named: Option<(&str, &[u8], Promise)> = match verdict {
        "source" => src_bytes.as_deref().map(|b| {
            (
                "the source file",
                b,
                if source_power_cut {
                    Promise::Durable
                } else {
                    Promise::Acknowledged
                },
            )
        }),
        "destination" | "destination-entrusted" | "destination-leftover-marker" => Some((
            "the destination file",
            &dst_bytes[..],
            Promise::Acknowledged,
        )),
        _ => None,
    };
    if let Some((what, bytes, promise)) = named {
        if let Err(e) = check_model(what, bytes, &initial, &logs, promise) {
            failures.push(e);
        }
    }
    // An entrusted or completed destination holds everything the source had.
    let dest_must_be_whole = matches!(
        s.expect,
        Expect::Complete
            | Expect::LostDisconnect
            | Expect::CompletedThenDied
            | Expect::Unknown { transient: true }
    ) || (marker_state.as_deref() == Some("entrusted")
        && !source_was_running)
        || (marker_state.is_none() && !src_exists)
        || record;
    if dest_must_be_whole {
        match &src_bytes {
            Some(sb) if !source_power_cut => {
                if (!source_was_running || !dest_was_running) && *sb != dst_bytes {
                    let first = sb
                        .iter()
                        .zip(&dst_bytes)
                        .position(|(a, b)| a != b)
                        .unwrap_or(sb.len().min(dst_bytes.len()));
                    failures.push(format!(
                        "the destination is not byte-identical to the source file (first difference at byte {first}, block {})",
                        first as u64 / BLOCK
                    ));
                }
            }
            // No source file to compare with, or one that lost its power
            // after handing off (it reverted what it had not made durable,
            // while the destination holds everything acknowledged before the
            // cut-off): the destination is held to the writers' record.
            _ => {
                if let Err(e) = check_model(
                    "the destination file",
                    &dst_bytes,
                    &initial,
                    &logs,
                    Promise::Acknowledged,
                ) {
                    failures.push(e);
                }
            }
        }
    }

    // (4) the fault fired, in the right process.
    let mut fired = 0;
    let dest_log_all = dest_logs.join("\n");
    for log in std::iter::once(&source_log).chain(dest_logs.iter()) {
        fired += log.matches("fault fired:").count();
    }
    for (side, line) in &s.must_fire {
        let log = match side {
            Side::Dest => &dest_logs[0],
            Side::Source => &source_log,
        };
        if !log.contains(line.as_str()) {
            failures.push(format!(
                "the fault did not fire: no {line:?} in the {} log",
                side.name()
            ));
        }
    }

    // Over TLS, every attempt that got through its handshake did so in TLS
    // (the destination requires it, and the source never falls back).
    if s.tls {
        let connected = source_log.matches(" handshake, TLS, flags").count();
        let any = source_log
            .lines()
            .filter(|l| l.contains("migration attempt") && l.contains(" connected to "))
            .count();
        if connected != any || (mirror_code == 0 && connected == 0) {
            failures.push(format!(
                "{any} migration attempts connected but {connected} of them over TLS (mirror exit {mirror_code})"
            ));
        }
    }

    // (5) no panic; exit statuses.
    if source_log.contains("panicked") || dest_log_all.contains("panicked") {
        failures.push("a process panicked".into());
    }
    if stats.error_replies.load(Ordering::Relaxed) > 0 {
        failures.push(format!(
            "the source answered {} client writes with an error",
            stats.error_replies.load(Ordering::Relaxed)
        ));
    }
    if stats.foreign.load(Ordering::Relaxed) {
        notes.push(
            "a writer found a foreign server on the source port (it wrote nothing there)".into(),
        );
    }
    let final_dest = *dest_codes.last().unwrap_or(&-1);
    for (i, code) in dest_codes.iter().enumerate() {
        let last = i + 1 == dest_codes.len();
        if !last && *code != 137 {
            failures.push(format!(
                "destination instance {i} exited {code} (expected 137 from a crash)"
            ));
        }
    }
    let dest_crash_expected = s.dest_plan.contains("crash") || s.dest_plan.contains("powercut");
    for log in std::iter::once(&source_log).chain(dest_logs.iter()) {
        if log.contains("installed late") {
            failures.push(
                "the power-loss model was installed late: marker and unlink changes went unrecorded"
                    .into(),
            );
        }
    }
    if restarts > 0 && !dest_crash_expected {
        failures.push("the destination died without a crash fault".into());
    }
    match s.expect {
        Expect::Complete | Expect::Unknown { transient: true } => {
            if mirror_code != 0 || !mirror_out.contains("Mirror started") {
                failures.push(format!(
                    "mirror did not start: exit {mirror_code}: {mirror_out}"
                ));
            }
            if source_termed || source_code != 0 {
                failures.push(format!(
                    "the migration did not complete within {:?}: the source {}",
                    s.settle,
                    if source_termed {
                        "was still running".to_string()
                    } else {
                        format!("exited {source_code}")
                    }
                ));
            }
            if dest_termed || final_dest != 0 {
                failures.push(format!(
                    "the destination did not finish the migration: {}",
                    if dest_termed {
                        "it was still running".to_string()
                    } else {
                        format!("it exited {final_dest}")
                    }
                ));
            }
        }
        Expect::FirstAttemptFailed => {
            if mirror_code != 1 || mirror_out.contains("Mirror started") {
                failures.push(format!(
                    "mirror should report the failed first attempt (exit 1), got exit {mirror_code}: {mirror_out}"
                ));
            }
            if !source_was_running {
                failures.push("the source exited after a failed first attempt".into());
            } else if source_code != 0 {
                failures.push(format!(
                    "the source (no mirror running) exited {source_code} on SIGTERM, expected 0"
                ));
            }
            if source_log.contains("migration attempt 2") {
                failures.push("a failed first attempt was retried".into());
            }
            if final_dest != 1 {
                failures.push(format!(
                    "the destination exited {final_dest}, expected 1 (SIGTERM)"
                ));
            }
        }
        Expect::SourceCrashed { .. } => {
            if source_code != 137 {
                failures.push(format!(
                    "the source exited {source_code}, expected 137 (crash)"
                ));
            }
            if final_dest != 1 {
                failures.push(format!(
                    "the destination exited {final_dest}, expected 1 (SIGTERM)"
                ));
            }
        }
        Expect::CompletedThenDied => {
            if mirror_code != 0 {
                failures.push(format!(
                    "mirror did not start: exit {mirror_code}: {mirror_out}"
                ));
            }
            if source_termed || source_code != 0 {
                failures.push(format!(
                    "the source should have completed the migration (exit 0), got {source_code}{}",
                    if source_termed { " after SIGTERM" } else { "" }
                ));
            }
            let refused = dest_logs
                .last()
                .is_some_and(|l| l.contains("refusing to receive"));
            if dests.len() < 2 || final_dest != 1 || !refused {
                failures.push(format!(
                    "the destination restarted after its death should refuse to start over the completed image (exit 1), got exits {dest_codes:?}"
                ));
            }
        }
        Expect::LostDisconnect => {
            if mirror_code != 0 {
                failures.push(format!(
                    "mirror did not start: exit {mirror_code}: {mirror_out}"
                ));
            }
            if source_termed || !(source_code == 0 || source_code == 1) {
                failures.push(format!(
                    "the source should end the hand-off by itself (exit 0 or 1), got {source_code}{}",
                    if source_termed { " after SIGTERM" } else { "" }
                ));
            }
            if final_dest != 1 {
                failures.push(format!(
                    "the destination exited {final_dest}; without a DISCONNECT it must wait (SIGTERM: 1)"
                ));
            }
        }
        Expect::Unknown { transient: false } => {
            for code in [source_code, final_dest] {
                if ![0, 1, 137].contains(&code) {
                    failures.push(format!("unexpected exit status {code}"));
                }
            }
        }
    }

    if failures.is_empty() {
        return Ok(fired);
    }
    let mut report = describe(s);
    let _ = write!(
        report,
        "\n  mirror: exit {mirror_code}: {}\n  acked writes: {} ({} FUA; {} flushes; {} at mirror), writer connections: {}\n  source exit {source_code}{}; destination exits {dest_codes:?}{}\n  seen: source file {}, marker {:?} -> verdict {verdict}; resolve: {}\n  notes: {notes:?}\n  FAILURES:\n    {}",
        mirror_out.trim(),
        stats.acked.load(Ordering::Relaxed),
        stats.fua.load(Ordering::Relaxed),
        stats.flushes.load(Ordering::Relaxed),
        acked_at_mirror,
        stats.connects.load(Ordering::Relaxed),
        if source_termed { " (SIGTERM)" } else { "" },
        if dest_termed { " (last one SIGTERM)" } else { "" },
        if src_exists { "present" } else { "absent" },
        marker_state,
        resolve_out.trim().replace('\n', " | "),
        failures.join("\n    ")
    );
    let _ = write!(
        report,
        "\n---- source log ----\n{}",
        tail(&source_log, 20_000)
    );
    for (i, log) in dest_logs.iter().enumerate() {
        let _ = write!(
            report,
            "\n---- destination log (instance {i}) ----\n{}",
            tail(log, 20_000)
        );
    }
    let _ = write!(
        report,
        "\n---- the supervisor's restart of the destination ----\n{}",
        tail(&restart_log, 5_000)
    );
    Err(report)
}

/// `<dest>.COMPLETE`.
fn record_path(dst: &Path) -> PathBuf {
    PathBuf::from(format!("{}.COMPLETE", dst.display()))
}

/// Whether a completion record names the file at `dst` (its dev, ino and
/// size): one that does not is stale and counts as none.
fn record_matches(dst: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(text), Ok(m)) = (fs::read_to_string(record_path(dst)), fs::metadata(dst)) else {
        return false;
    };
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    text.lines().any(|l| l == "state=complete")
        && field("dev") == Some(m.dev())
        && field("ino") == Some(m.ino())
        && field("size") == Some(m.size())
}

/// How long the supervisor's restarted `listen` may take to refuse, or to
/// start and then exit on SIGTERM.
const RESTART_WAIT: Duration = Duration::from_secs(10);

/// Starts `listen` again on `dst` (port 0, no faults) as a supervisor would
/// once the scenario has ended, and checks that it changed nothing: over a
/// completed image (a record names the file) it must refuse at once with
/// exit 1 before its port opens; otherwise it starts and is SIGTERMed
/// (exit 1). Either way the image is unchanged, and so are the marker and
/// the record where the image was complete. Returns its log, or a problem
/// and its log.
fn supervisor_restart(
    dir: &TempDir,
    dst: &Path,
    marker: &Path,
    pki: Option<&Pki>,
) -> Result<String, (String, String)> {
    let complete = record_matches(dst);
    let image = fs::read(dst).unwrap_or_default();
    let marker_before = fs::read(marker).ok();
    let record_before = fs::read(record_path(dst)).ok();
    let sock = dir.join("dst-restart.sock");
    let mut p = Flexnbd::spawn_or_exit(dir, BIN, &listen_args(0, dst, &sock, "", pki));
    let started = Instant::now();
    let refused = try_status(&mut p);
    let mut problems = Vec::new();
    match (complete, refused) {
        (true, Some(st)) => {
            if exit_code(st) != 1 || !p.log().contains("refusing to receive") {
                problems.push(format!(
                    "the restarted listen over a completed image should refuse with exit 1, got {st}"
                ));
            }
        }
        (true, None) => {
            problems.push(
                "the restarted listen started over a completed image (its record names the file)"
                    .into(),
            );
        }
        (false, Some(st)) => {
            problems.push(format!(
                "the restarted listen exited {st} without a completion record to refuse over"
            ));
        }
        (false, None) => {}
    }
    if refused.is_none() {
        match terminate(&mut p, "the restarted destination") {
            Ok((code, _)) if code != 1 => problems.push(format!(
                "the restarted listen exited {code} on SIGTERM, expected 1"
            )),
            Ok(_) => {}
            Err(e) => problems.push(e),
        }
    }
    let log = p.log();
    if started.elapsed() > RESTART_WAIT {
        problems.push(format!(
            "the restarted listen took {:?} to refuse or to stop",
            started.elapsed()
        ));
    }
    if log.contains("panicked") {
        problems.push("the restarted listen panicked".into());
    }
    if fs::read(dst).unwrap_or_default() != image {
        problems.push("the restarted listen changed the destination image".into());
    }
    if complete {
        if fs::read(marker).ok() != marker_before {
            problems.push(format!(
                "the restarted listen changed the marker of a completed image: {:?} -> {:?}",
                marker_before.map(|b| String::from_utf8_lossy(&b).into_owned()),
                fs::read_to_string(marker).ok()
            ));
        }
        if fs::read(record_path(dst)).ok() != record_before {
            problems.push("the restarted listen changed the completion record".into());
        }
    }
    if problems.is_empty() {
        Ok(log)
    } else {
        Err((problems.join("; "), log))
    }
}

// ------------------------------------------------------------- helpers

/// The generator behind every seeded choice here: xoshiro256++, named
/// rather than rand's StdRng or SmallRng, whose algorithms may change in
/// any rand release, so that a printed seed replays the same scenarios
/// later too.
fn seeded(seed: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(seed)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

// ---------------------------------------------------------------- tests

#[test]
fn matrix_covers_at_least_500_scenarios_200_with_power_loss() {
    let all: Vec<Scenario> = [Side::Dest, Side::Source]
        .into_iter()
        .flat_map(matrix)
        .collect();
    assert!(all.len() >= 500, "only {} scenarios", all.len());
    // Every crash scenario also runs as a power cut, in each of its three
    // forms (all, none, torn).
    let crashes = all
        .iter()
        .filter(|s| s.dest_plan.contains("=crash") || s.source_plan.contains("=crash"))
        .count();
    let power = all
        .iter()
        .filter(|s| s.dest_plan.contains("powercut") || s.source_plan.contains("powercut"))
        .count();
    assert_eq!(power, 3 * crashes, "a power cut wherever a crash runs");
    assert!(power >= 200, "only {power} power-loss scenarios");
    println!(
        "matrix: {} scenarios, {power} with power loss, {crashes} with a crash",
        all.len()
    );
    let mut names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), all.len(), "scenario names are unique");
    // Every plan parses, and names only steps the code announces.
    for s in &all {
        for plan in [&s.dest_plan, &s.source_plan] {
            if plan.is_empty() {
                continue;
            }
            let p = faults::FaultPlan::parse(plan).unwrap_or_else(|e| panic!("{plan}: {e}"));
            assert!(p.warnings().is_empty(), "{plan}: {:?}", p.warnings());
        }
    }
}

#[test]
fn matrix_destination_faults() {
    run_all("destination", matrix(Side::Dest));
}

#[test]
fn matrix_source_faults() {
    run_all("source", matrix(Side::Source));
}

/// Scenarios of each side run again with both ends on TLS. A fixed
/// selection (by a hash of the name, so it stays put as steps are added
/// elsewhere) of the quick ones: a stalled connection step only waits out
/// the same timeouts over TLS as without it.
fn tls_subset() -> Vec<Scenario> {
    [Side::Dest, Side::Source]
        .into_iter()
        .flat_map(matrix)
        .filter(|s| s.settle <= Duration::from_secs(10) && fnv(&s.name).is_multiple_of(TLS_ONE_IN))
        .map(|mut s| {
            s.name = format!("tls {}", s.name);
            s.tls = true;
            s
        })
        .collect()
}

/// One quick scenario in this many runs over TLS as well.
const TLS_ONE_IN: u64 = 11;

#[test]
fn matrix_over_tls() {
    let subset = tls_subset();
    let of = |side: &str| {
        subset
            .iter()
            .filter(|s| s.name.starts_with(&format!("tls {side} ")))
            .count()
    };
    let power = subset
        .iter()
        .filter(|s| s.dest_plan.contains("powercut") || s.source_plan.contains("powercut"))
        .count();
    println!(
        "matrix over TLS: {} scenarios ({} destination, {} source, {power} with power loss)",
        subset.len(),
        of("dest"),
        of("source")
    );
    assert!(
        (40..=80).contains(&subset.len()) && of("dest") >= 15 && of("source") >= 15,
        "the TLS subset should hold 40 to 80 scenarios from both sides"
    );
    assert!(power >= 8, "only {power} TLS scenarios with power loss");
    run_all("over TLS", subset);
}

// ---------------------------------------------------------------- sweep

mod sweep {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

    #[derive(Clone, Debug)]
    struct Term {
        percent: Option<u32>,
        count: Option<u32>,
        act: Act,
    }

    #[derive(Clone, Debug)]
    struct Entry {
        step: usize,
        occurrence: Option<u32>,
        chain: Vec<Term>,
    }

    fn act_strategy(def: &StepDef) -> impl Strategy<Value = Act> {
        proptest::sample::select(actions_for(def))
    }

    fn entry_strategy() -> impl Strategy<Value = Entry> {
        (0..steps().len()).prop_flat_map(|step| {
            let def = steps()[step].def;
            let term = (
                proptest::option::weighted(0.5, proptest::sample::select(vec![10u32, 25, 50, 100])),
                proptest::option::weighted(0.7, 1u32..=3),
                act_strategy(def),
            )
                .prop_map(|(percent, count, act)| Term {
                    percent,
                    count,
                    act,
                });
            (
                Just(step),
                proptest::option::weighted(0.4, 1u32..=4),
                proptest::collection::vec(term, 1..=2),
            )
                .prop_map(|(step, occurrence, chain)| Entry {
                    step,
                    occurrence,
                    chain,
                })
        })
    }

    fn plan_text(seed: u64, entries: &[&Entry]) -> String {
        if entries.is_empty() {
            return String::new();
        }
        let mut text = format!("seed={seed}");
        for e in entries {
            let spec = &steps()[e.step];
            let key = match e.occurrence {
                Some(n) => format!("{}#{n}", spec.key),
                None => spec.key.to_string(),
            };
            let chain: Vec<String> = e
                .chain
                .iter()
                .map(|t| {
                    format!(
                        "{}{}{}",
                        t.percent.map(|p| format!("{p}%")).unwrap_or_default(),
                        t.count.map(|c| format!("{c}*")).unwrap_or_default(),
                        t.act.text()
                    )
                })
                .collect();
            let _ = write!(text, "; {key}={}", chain.join("->"));
        }
        text
    }

    /// Whether a random plan can only delay the migration: no crash, no
    /// fault that can reach the first attempt or the disconnect, and every
    /// fault applies a bounded number of times. Returns the time budget.
    fn transient_budget(entries: &[Entry]) -> Option<Duration> {
        let mut budget = Duration::from_secs(10);
        for e in entries {
            let spec = &steps()[e.step];
            let delay_only = e.chain.iter().all(|t| matches!(t.act, Act::Delay(_)));
            if e.chain.iter().any(|t| t.act.kills()) {
                return None;
            }
            match spec.phase {
                Phase::Connect if !delay_only && e.occurrence.is_none_or(|n| n < 2) => return None,
                Phase::Disconnect if !delay_only => return None,
                _ => {}
            }
            // Bounded: a `#N` entry applies once; otherwise every term needs
            // a count (an uncounted term applies forever).
            let times: u32 = if e.occurrence.is_some() {
                1
            } else if e.chain.iter().all(|t| t.count.is_some()) {
                e.chain.iter().map(|t| t.count.unwrap()).sum()
            } else if delay_only && spec.phase != Phase::Copy {
                // Once or twice per attempt.
                2
            } else {
                // Unbounded: an uncounted fault on every write, even a mere
                // delay, can keep a migration under a busy writer from ever
                // converging.
                return None;
            };
            let worst = e
                .chain
                .iter()
                .map(|t| stall_cost(spec.key, t.act) + Duration::from_secs(3))
                .max()
                .unwrap_or_default();
            budget += worst * times;
        }
        Some(budget)
    }

    #[derive(Clone, Debug)]
    struct Random {
        entries: Vec<Entry>,
        dest_seed: u64,
        source_seed: u64,
        unlink: bool,
        writers: usize,
        pace_us: u64,
        hot: bool,
        data_seed: u64,
    }

    fn random_strategy() -> impl Strategy<Value = Random> {
        (
            proptest::collection::vec(entry_strategy(), 1..=3),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            1usize..=2,
            proptest::sample::select(vec![0u64, 200, 1000, 3000]),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(
                |(entries, dest_seed, source_seed, unlink, writers, pace_us, hot, data_seed)| {
                    Random {
                        entries,
                        dest_seed,
                        source_seed,
                        unlink,
                        writers,
                        pace_us,
                        hot,
                        data_seed,
                    }
                },
            )
    }

    fn scenario(i: usize, r: Random) -> Scenario {
        // Each KEY at most once per plan: keep the first.
        let mut seen = std::collections::HashSet::new();
        let entries: Vec<Entry> = r
            .entries
            .into_iter()
            .filter(|e| seen.insert((e.step, e.occurrence)))
            .collect();
        let dest: Vec<&Entry> = entries
            .iter()
            .filter(|e| steps()[e.step].side == Side::Dest)
            .collect();
        let source: Vec<&Entry> = entries
            .iter()
            .filter(|e| steps()[e.step].side == Side::Source)
            .collect();
        let budget = transient_budget(&entries);
        let dest_plan = plan_text(r.dest_seed, &dest);
        let source_plan = plan_text(r.source_seed, &source);
        Scenario {
            name: format!(
                "sweep#{i} dest[{dest_plan}] source[{source_plan}]{}",
                if r.unlink { " --unlink" } else { "" }
            ),
            dest_plan,
            source_plan,
            must_fire: Vec::new(),
            unlink: r.unlink,
            expect: Expect::Unknown {
                transient: budget.is_some(),
            },
            writers: r.writers,
            pace_us: r.pace_us,
            hot_blocks: if r.hot { 64 } else { 0 },
            seed: r.data_seed,
            settle: budget.unwrap_or(Duration::from_secs(12)),
            tls: false,
        }
    }

    // Ignored unless asked for, so that a run without FLEXNBD_MATRIX_SWEEP
    // reports it as ignored rather than as a sweep that passed.
    #[test]
    #[ignore = "needs FLEXNBD_MATRIX_SWEEP=N, the number of random scenarios; see acceptance/matrix.rs"]
    fn matrix_random_sweep() {
        let n: usize = match std::env::var("FLEXNBD_MATRIX_SWEEP") {
            Ok(v) => v.trim().parse().expect("FLEXNBD_MATRIX_SWEEP=N"),
            Err(_) => panic!(
                "FLEXNBD_MATRIX_SWEEP is not set: run the sweep as `FLEXNBD_MATRIX_SWEEP=N cargo test \
                 --test acceptance matrix_random_sweep -- --include-ignored`"
            ),
        };
        assert!(
            n > 0,
            "FLEXNBD_MATRIX_SWEEP=0: a sweep of no scenarios checks nothing"
        );
        let sweep_seed: u64 = std::env::var("FLEXNBD_MATRIX_SWEEP_SEED")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("matrix sweep: {n} scenarios, FLEXNBD_MATRIX_SWEEP_SEED={sweep_seed}");
        let mut seed = [0u8; 32];
        seeded(sweep_seed).fill_bytes(&mut seed);
        let mut runner = TestRunner::new_with_rng(
            Config::default(),
            TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
        );
        let strategy = random_strategy();
        let scenarios: Vec<Scenario> = (0..n)
            .map(|i| {
                let r = strategy.new_tree(&mut runner).expect("generate").current();
                let s = scenario(i, r);
                println!("{}", describe(&s).replace('\n', " "));
                s
            })
            .collect();
        let outcomes = run_all("sweep", scenarios);
        let fired: usize = outcomes.iter().map(|o| o.fired).sum();
        assert!(fired > 0, "no fault fired across the whole sweep");
        println!("matrix sweep: {fired} faults fired");
    }
}
