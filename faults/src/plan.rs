//! Fault plans: a small language that says which protocol steps fail, how,
//! how often and in which order, in the spirit of `fail-rs` fail points.
//!
//! # Grammar
//!
//! ```text
//! PLAN   := [ENTRY (';' ENTRY)* [';']]      blank plan = no faults
//! ENTRY  := 'seed' '=' U64                  at most once
//!         | KEY '=' CHAIN                   each KEY at most once
//! KEY    := SIDE '.' STEP ['@' RANGE] ['#' N]   N >= 1
//! RANGE  := BYTES ['+' BYTES]               store.* keys only: OFFSET[+LENGTH]
//! BYTES  := DIGITS ['K' | 'M' | 'G']        binary multiples (K = 1024)
//! SIDE   := 'server' | 'mirror' | 'client' | 'proxy' | 'control' | 'store'
//! STEP   := SEGMENT ('.' SEGMENT)*          SEGMENT := [a-z0-9_]+
//! CHAIN  := TERM ('->' TERM)*
//! TERM   := [P '%'] [CNT '*'] ACTION ['(' ARG ')']
//! P      := DIGITS ['.' DIGITS]             0 <= P <= 100
//! CNT    := DIGITS                          CNT >= 1
//! ACTION := 'pass' | 'drop' | 'close' | 'truncate' '(' BYTES ')' | 'hang'
//!         | 'delay' '(' MS ')' | 'corrupt'                      network keys
//!         | 'eio' | 'enospc' | 'slow' '(' MS ')'               store.* keys
//!         | 'crash' | 'powercut' ['(' LOSS ')']                 every key
//! LOSS   := 'all' | 'none' | 'torn'                 default: drawn from the seed
//! ```
//!
//! Whitespace (spaces, tabs, newlines) is allowed around every token, but not
//! inside one (`reply_send.write`, `->`, `12.5` are single tokens).
//!
//! `truncate`, `delay` and `slow` require their argument; `powercut` takes an
//! optional one; the other actions take none. `eio`, `enospc` and `slow` are
//! only valid for `store.*` keys; `drop`, `close`, `truncate`, `hang`,
//! `delay` and `corrupt` are only valid for the other sides. `pass`, `crash`
//! and `powercut` are valid everywhere (on a store key they act before the
//! operation).
//!
//! # Semantics
//!
//! Each entry owns a chain of terms and a cursor on the current term. Every
//! time its step is announced ([`FaultPlan::decide`]) the entry is evaluated:
//!
//! * if the current term has a probability `P%`, a roll is made; when it
//!   fails this evaluation passes and the term's count is not consumed;
//! * otherwise the term applies: its action is the decision. A term with a
//!   count `CNT*` applies at most `CNT` times, after which the cursor moves to
//!   the next term; a term without a count applies forever (any later terms
//!   are unreachable);
//! * when the chain is exhausted, every later evaluation passes.
//!
//! A key with `#N` is only subject to its chain at the N-th occurrence of its
//! step (counting from 1, over the life of the plan): other occurrences pass
//! without touching the chain. Several `#N` entries may share a step
//! (`server.reply_send.write#2=close; server.reply_send.write#5=drop`), and an
//! entry without `#N` may sit beside them: at each occurrence at most one
//! entry is consulted, the `#N` entry for that occurrence if there is one,
//! otherwise the entry without `#N`.
//!
//! A store key with `@OFFSET[+LENGTH]` applies only to operations that touch
//! a byte of that range (without LENGTH: from OFFSET to the end), so a slow
//! or failing region of the disk hits only the requests that reach it. Its
//! `#N` counts only those operations. Where a ranged key and a key without
//! range share a step, an operation in the range is decided by the ranged
//! key (when it has an entry for that occurrence), any other by the key
//! without range.
//!
//! A decision whose action is `pass` did not fire; any other action fired,
//! and the caller should log [`Decision::line`] (see [`fired_line`]).
//!
//! # Randomness
//!
//! One seed (`seed=N`, or picked from the time and pid when absent, see
//! [`FaultPlan::seed`]) drives every probability roll. Each entry draws from
//! its own deterministic stream (splitmix64 seeded from the plan's seed and
//! the entry's key), so the rolls of one key do not depend on how its
//! evaluations interleave with other keys' on other threads: the same plan,
//! seed and sequence of evaluations per key always give the same decisions.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Action, PowerLoss, SplitMix64};

/// The environment variable [`FaultPlan::from_env`] reads.
pub const ENV_VAR: &str = "FLEXNBD_FAULTS";

/// The sides a key may name, in the order they are documented.
pub const SIDES: &[&str] = &["server", "mirror", "client", "proxy", "control", "store"];

/// Action names, as listed in error messages.
pub const ACTIONS: &[&str] = &[
    "pass", "drop", "close", "truncate", "hang", "delay", "corrupt", "crash", "powercut", "eio",
    "enospc", "slow",
];

pub use crate::steps::{is_known_step, COMMANDS};

/// The line to log when a fault fires: `fault fired: <key> -> <action>`,
/// e.g. `fault fired: server.reply_send.write#3 -> close`.
pub fn fired_line(key: &str, action: impl fmt::Display) -> String {
    format!("fault fired: {key} -> {action}")
}

// ---------------------------------------------------------------------------
// Actions

/// A fault of the store: what a read, write or sync of the image does instead
/// of succeeding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreFault {
    /// Fail with EIO.
    Eio,
    /// Fail with ENOSPC.
    Enospc,
    /// Wait this long, then carry on.
    Slow(Duration),
    /// Kill the process like SIGKILL before the operation.
    Crash,
    /// Lose what a power cut may lose, then die (before the operation).
    PowerCut(PowerLoss),
}

impl StoreFault {
    /// The error the store should return, or `None` for [`StoreFault::Slow`]
    /// (sleep for the duration, then carry on).
    pub fn io_error(&self) -> Option<std::io::Error> {
        const EIO: i32 = 5;
        const ENOSPC: i32 = 28;
        match self {
            StoreFault::Eio => Some(std::io::Error::from_raw_os_error(EIO)),
            StoreFault::Enospc => Some(std::io::Error::from_raw_os_error(ENOSPC)),
            StoreFault::Slow(_) | StoreFault::Crash | StoreFault::PowerCut(_) => None,
        }
    }
}

impl fmt::Display for StoreFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreFault::Eio => f.write_str("eio"),
            StoreFault::Enospc => f.write_str("enospc"),
            StoreFault::Slow(d) => write!(f, "slow({})", d.as_millis()),
            StoreFault::Crash => f.write_str("crash"),
            StoreFault::PowerCut(loss) => fmt_powercut(*loss, f),
        }
    }
}

/// Formats an action the way a plan spells it: `close`, `truncate(8)`,
/// `delay(250)` (milliseconds).
impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Pass => f.write_str("pass"),
            Action::Drop => f.write_str("drop"),
            Action::Close => f.write_str("close"),
            Action::Truncate(n) => write!(f, "truncate({n})"),
            Action::Hang => f.write_str("hang"),
            Action::Delay(d) => write!(f, "delay({})", d.as_millis()),
            Action::Corrupt => f.write_str("corrupt"),
            Action::Crash => f.write_str("crash"),
            Action::PowerCut(loss) => fmt_powercut(*loss, f),
        }
    }
}

fn fmt_powercut(loss: PowerLoss, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match loss.name() {
        None => f.write_str("powercut"),
        Some(n) => write!(f, "powercut({n})"),
    }
}

/// A fault that fired: on a connection step or on the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A network action (never [`Action::Pass`] inside a [`Decision`]).
    Net(Action),
    /// A store fault.
    Store(StoreFault),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Net(a) => fmt::Display::fmt(a, f),
            Fault::Store(s) => fmt::Display::fmt(s, f),
        }
    }
}

/// What a term of a chain does when it applies. `None` is `pass`.
type TermAction = Option<Fault>;

fn fmt_term_action(action: &TermAction, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match action {
        None => f.write_str("pass"),
        Some(fault) => fmt::Display::fmt(fault, f),
    }
}

// ---------------------------------------------------------------------------
// Decisions

/// The outcome of one evaluation of a step.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Decision {
    /// The fault to inject, `None` when the step passes.
    pub fault: Option<Fault>,
    /// The key of the entry that fired (`server.reply_send.write#3`), `None`
    /// when the step passes.
    pub key: Option<Arc<str>>,
}

impl Decision {
    /// The step passes.
    pub const PASS: Decision = Decision {
        fault: None,
        key: None,
    };

    /// Whether a fault fired (the caller should log [`Decision::line`]).
    pub fn fired(&self) -> bool {
        self.fault.is_some()
    }

    /// The network action to take: [`Action::Pass`] when nothing fired or
    /// when the fault is a store fault.
    pub fn action(&self) -> Action {
        match self.fault {
            Some(Fault::Net(a)) => a,
            _ => Action::Pass,
        }
    }

    /// The store fault to inject, if one fired.
    pub fn store_fault(&self) -> Option<StoreFault> {
        match self.fault {
            Some(Fault::Store(s)) => Some(s),
            _ => None,
        }
    }

    /// `fault fired: <key> -> <action>` when a fault fired.
    pub fn line(&self) -> Option<String> {
        match (&self.key, &self.fault) {
            (Some(key), Some(fault)) => Some(fired_line(key, fault)),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Plan structure

/// Who announces a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The NBD server role (serve / listen), including a migration's destination.
    Server,
    /// The migration source's outgoing connection.
    Mirror,
    /// The read/write client commands.
    Client,
    /// The proxy.
    Proxy,
    /// The control socket.
    Control,
    /// The image store.
    Store,
}

impl Side {
    /// All sides, in documentation order.
    pub const ALL: [Side; 6] = [
        Side::Server,
        Side::Mirror,
        Side::Client,
        Side::Proxy,
        Side::Control,
        Side::Store,
    ];

    /// The name used in keys.
    pub fn name(&self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Mirror => "mirror",
            Side::Client => "client",
            Side::Proxy => "proxy",
            Side::Control => "control",
            Side::Store => "store",
        }
    }

    /// The side with this name.
    pub fn from_name(name: &str) -> Option<Side> {
        Side::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `SIDE.STEP[#N]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub side: Side,
    pub step: String,
    /// Store keys only: the bytes an operation must touch to be subject to
    /// the chain.
    pub range: Option<ByteRange>,
    /// Only this occurrence (from 1) of the step is subject to the chain.
    pub nth: Option<u64>,
}

/// `@OFFSET[+LENGTH]`: bytes of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ByteRange {
    pub start: u64,
    /// `None`: to the end of the image.
    pub len: Option<u64>,
}

impl ByteRange {
    /// Whether an operation on `len` bytes at `offset` touches the range
    /// (an operation of no bytes: whether `offset` is in it).
    pub fn touches(&self, offset: u64, len: u64) -> bool {
        let end = self.len.map_or(u64::MAX, |l| self.start.saturating_add(l));
        let op_end = offset.saturating_add(len.max(1));
        offset < end && self.start < op_end
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.start)?;
        if let Some(len) = self.len {
            write!(f, "+{len}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.side, self.step)?;
        if let Some(range) = self.range {
            write!(f, "{range}")?;
        }
        if let Some(n) = self.nth {
            write!(f, "#{n}")?;
        }
        Ok(())
    }
}

/// `[P%][CNT*]ACTION[(ARG)]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    /// Probability in percent (0 to 100); `None` means always.
    pub percent: Option<f64>,
    /// How many times the term applies before the chain moves on; `None`
    /// means forever.
    pub count: Option<u64>,
    /// The fault, `None` for `pass`.
    pub action: Option<Fault>,
}

impl Term {
    /// The term's action without its argument, as the step table names it.
    pub fn act(&self) -> crate::steps::Act {
        use crate::steps::Act;
        match self.action {
            None => Act::Pass,
            Some(Fault::Net(a)) => match a {
                Action::Pass => Act::Pass,
                Action::Drop => Act::Drop,
                Action::Close => Act::Close,
                Action::Truncate(_) => Act::Truncate,
                Action::Hang => Act::Hang,
                Action::Delay(_) => Act::Delay,
                Action::Corrupt => Act::Corrupt,
                Action::Crash => Act::Crash,
                Action::PowerCut(_) => Act::PowerCut,
            },
            Some(Fault::Store(f)) => match f {
                StoreFault::Eio => Act::Eio,
                StoreFault::Enospc => Act::Enospc,
                StoreFault::Slow(_) => Act::Slow,
                StoreFault::Crash => Act::Crash,
                StoreFault::PowerCut(_) => Act::PowerCut,
            },
        }
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.percent {
            write!(f, "{p}%")?;
        }
        if let Some(c) = self.count {
            write!(f, "{c}*")?;
        }
        fmt_term_action(&self.action, f)
    }
}

/// `KEY=CHAIN`.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: Key,
    pub chain: Vec<Term>,
    /// `key` formatted once, handed out in decisions without allocating.
    label: Arc<str>,
    /// Index of the (side, step) group this entry belongs to.
    group: usize,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=", self.key)?;
        for (i, term) in self.chain.iter().enumerate() {
            if i > 0 {
                f.write_str("->")?;
            }
            fmt::Display::fmt(term, f)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default)]
struct ChainState {
    /// Index of the current term; `chain.len()` when exhausted.
    term: usize,
    /// How many times the current term has applied.
    used: u64,
    rng: SplitMix64,
}

#[derive(Debug, Default)]
struct State {
    /// Per entry.
    chains: Vec<ChainState>,
    /// Per (side, step) group: how many times the step was announced.
    occurrences: Vec<u64>,
}

/// A parsed fault plan and the evaluation state of its chains.
/// `Send + Sync`: share it between connections behind an `Arc`.
///
/// ```
/// use faults::{Action, FaultPlan};
///
/// let plan = FaultPlan::parse("seed=1; server.reply_send.write#2=close").unwrap();
/// assert_eq!(plan.decide("server", "reply_send.write").action(), Action::Pass);
/// let d = plan.decide("server", "reply_send.write");
/// assert_eq!(d.action(), Action::Close);
/// assert_eq!(
///     d.line().unwrap(),
///     "fault fired: server.reply_send.write#2 -> close"
/// );
/// assert_eq!(plan.decide("server", "reply_send.write").action(), Action::Pass);
/// ```
#[derive(Debug)]
pub struct FaultPlan {
    seed: u64,
    seed_given: bool,
    entries: Vec<Entry>,
    state: Mutex<State>,
}

impl Default for FaultPlan {
    fn default() -> Self {
        FaultPlan::empty()
    }
}

impl FaultPlan {
    /// A plan with no entries: every step passes.
    pub fn empty() -> FaultPlan {
        FaultPlan::build(None, Vec::new())
    }

    /// Parses a plan (see the module documentation for the grammar).
    pub fn parse(text: &str) -> Result<FaultPlan, PlanError> {
        let (seed, entries) = Parser::new(text).plan()?;
        Ok(FaultPlan::build(seed, entries))
    }

    /// Parses the plan in `FLEXNBD_FAULTS`; unset or blank is the empty plan.
    pub fn from_env() -> Result<FaultPlan, PlanError> {
        FaultPlan::from_env_var(ENV_VAR)
    }

    /// Parses the plan in the environment variable `name`; unset or blank is
    /// the empty plan.
    pub fn from_env_var(name: &str) -> Result<FaultPlan, PlanError> {
        match std::env::var(name) {
            Ok(text) => FaultPlan::parse(&text),
            Err(std::env::VarError::NotPresent) => Ok(FaultPlan::empty()),
            Err(std::env::VarError::NotUnicode(_)) => Err(PlanError {
                pos: 0,
                kind: PlanErrorKind::NotUnicode,
            }),
        }
    }

    fn build(seed: Option<u64>, mut entries: Vec<Entry>) -> FaultPlan {
        let seed_given = seed.is_some();
        let seed = seed.unwrap_or_else(random_seed);
        let mut groups: Vec<(Side, String, Option<ByteRange>)> = Vec::new();
        for entry in &mut entries {
            let id = (entry.key.side, entry.key.step.clone(), entry.key.range);
            entry.group = match groups.iter().position(|g| *g == id) {
                Some(i) => i,
                None => {
                    groups.push(id);
                    groups.len() - 1
                }
            };
        }
        let chains = entries
            .iter()
            .map(|e| ChainState {
                term: 0,
                used: 0,
                rng: SplitMix64::new(seed ^ fnv1a(e.label.as_bytes())),
            })
            .collect();
        FaultPlan {
            seed,
            seed_given,
            entries,
            state: Mutex::new(State {
                chains,
                occurrences: vec![0; groups.len()],
            }),
        }
    }

    /// Whether the plan has no entries (every step passes). A plan with only
    /// `seed=N` is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether any entry can cut power: the process must then record what a
    /// power cut would lose (which costs a read before every write).
    pub fn can_cut_power(&self) -> bool {
        self.entries.iter().any(|e| {
            e.chain.iter().any(|t| {
                matches!(
                    t.action,
                    Some(Fault::Net(Action::PowerCut(_)))
                        | Some(Fault::Store(StoreFault::PowerCut(_)))
                )
            })
        })
    }

    /// The seed driving the probability rolls: the plan's `seed=N`, or one
    /// picked from the time and pid. Print it so a run can be reproduced.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Whether the seed came from the plan (`seed=N`).
    pub fn seed_given(&self) -> bool {
        self.seed_given
    }

    /// The plan's entries, in plan order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// One warning per entry whose step is not one the code is known to
    /// announce (see [`is_known_step`]); such entries never fire.
    pub fn warnings(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| !is_known_step(e.key.side.name(), &e.key.step))
            .map(|e| {
                format!(
                    "fault plan: warning: {} names a step that is not known to be announced; it may never fire",
                    e.key
                )
            })
            .collect()
    }

    /// Evaluates the plan for one announcement of `step` by `side`. Steps
    /// without an entry pass without locking or allocating.
    pub fn decide(&self, side: &str, step: &str) -> Decision {
        self.decide_at(side, step, None)
    }

    /// Like [`FaultPlan::decide`], for a store operation on `len` bytes at
    /// `offset` (`at = Some((offset, len))`): keys with a byte range apply
    /// only when it touches theirs. `None` (an operation on no particular
    /// bytes, such as a sync) is never subject to a ranged key.
    pub fn decide_at(&self, side: &str, step: &str, at: Option<(u64, u64)>) -> Decision {
        if self.entries.is_empty() {
            return Decision::PASS;
        }
        // The groups this operation belongs to: ranged ones first (the more
        // specific), then the one without range. At most a few entries.
        let mut groups: Vec<usize> = Vec::new();
        for ranged in [true, false] {
            for e in &self.entries {
                let applies = e.key.side.name() == side
                    && e.key.step == step
                    && e.key.range.is_some() == ranged
                    && e.key
                        .range
                        .is_none_or(|r| at.is_some_and(|(o, l)| r.touches(o, l)));
                if applies && !groups.contains(&e.group) {
                    groups.push(e.group);
                }
            }
        }
        if groups.is_empty() {
            return Decision::PASS;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for &group in &groups {
            state.occurrences[group] += 1;
        }
        for &group in &groups {
            let occurrence = state.occurrences[group];
            let in_group = || {
                self.entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.group == group)
            };
            let chosen = in_group()
                .find(|(_, e)| e.key.nth == Some(occurrence))
                .or_else(|| in_group().find(|(_, e)| e.key.nth.is_none()));
            let Some((index, entry)) = chosen else {
                continue;
            };
            let chain = &mut state.chains[index];
            let Some(term) = entry.chain.get(chain.term) else {
                return Decision::PASS;
            };
            if let Some(percent) = term.percent {
                if !chain.rng.roll(percent) {
                    return Decision::PASS;
                }
            }
            if let Some(count) = term.count {
                chain.used += 1;
                if chain.used >= count {
                    chain.term += 1;
                    chain.used = 0;
                }
            }
            return match term.action {
                None => Decision::PASS,
                Some(fault) => Decision {
                    fault: Some(fault),
                    key: Some(entry.label.clone()),
                },
            };
        }
        Decision::PASS
    }

    /// Like [`FaultPlan::decide`], for callers that hold a [`Side`].
    pub fn decide_side(&self, side: Side, step: &str) -> Decision {
        self.decide(side.name(), step)
    }
}

impl PartialEq for FaultPlan {
    /// Compares the plans' text (seed and entries), not their evaluation state.
    fn eq(&self, other: &Self) -> bool {
        self.seed == other.seed && self.entries == other.entries
    }
}

/// The plan in its own syntax, `seed=N` first (always, so that the text
/// reproduces the run), entries separated by `; `. Parses back to an equal
/// plan.
impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed={}", self.seed)?;
        for entry in &self.entries {
            write!(f, "; {entry}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Randomness

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn random_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut mix = SplitMix64::new(nanos ^ ((std::process::id() as u64) << 32));
    mix.next_u64()
}

// ---------------------------------------------------------------------------
// Errors

/// What went wrong while parsing a plan.
#[derive(Clone, Debug, PartialEq)]
pub enum PlanErrorKind {
    /// A token other than the one the grammar allows here.
    Expected { expected: &'static str, got: String },
    /// The side of a key is not one of [`SIDES`].
    UnknownSide(String),
    /// The step of a key has characters other than `[a-z0-9_.]`, or an empty
    /// segment.
    BadStep(String),
    /// `#N` with N not a positive integer.
    BadOccurrence(String),
    /// `@OFFSET[+LENGTH]` that is not a byte count, or a zero length.
    BadRange(String),
    /// `@OFFSET` on a key that is not a store key.
    RangeNotStore(String),
    /// Not one of [`ACTIONS`].
    UnknownAction(String),
    /// `truncate`, `delay` and `slow` need `(N)`.
    MissingArgument(&'static str),
    /// An action that takes no argument was given one.
    UnexpectedArgument(&'static str),
    /// The argument is not a non-negative integer.
    BadArgument { action: &'static str, got: String },
    /// `P%` with P not a decimal number in 0..=100.
    BadProbability(String),
    /// `CNT*` with CNT not a positive integer.
    BadCount(String),
    /// A store fault on a network key, or a network action on a store key.
    WrongSide { action: &'static str, key: String },
    /// An action that cannot happen at a step with no message and no
    /// connection left to act on (see [`crate::steps::is_milestone`]).
    NoEffectAt { action: &'static str, key: String },
    /// The same key twice.
    DuplicateKey(String),
    /// `seed=` twice.
    DuplicateSeed,
    /// `seed=` with something other than a u64.
    BadSeed(String),
    /// The environment variable is not valid Unicode.
    NotUnicode,
}

/// A parse error, with the byte offset in the plan text where it was found.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanError {
    pub pos: usize,
    pub kind: PlanErrorKind,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use PlanErrorKind::*;
        write!(f, "fault plan: at byte {}: ", self.pos)?;
        match &self.kind {
            Expected { expected, got } => write!(f, "expected {expected}, got {got}"),
            UnknownSide(s) => write!(
                f,
                "expected a side ({}), got \"{s}\"",
                SIDES.join(", ")
            ),
            BadStep(s) => write!(
                f,
                "expected a step name (lowercase letters, digits, '_', segments separated by '.'), got \"{s}\""
            ),
            BadOccurrence(s) => write!(
                f,
                "expected an occurrence number N >= 1 after '#', got \"{s}\""
            ),
            BadRange(s) => write!(
                f,
                "expected a byte count (digits, optionally followed by K, M or G; a length above 0) in '@OFFSET[+LENGTH]', got \"{s}\""
            ),
            RangeNotStore(k) => write!(
                f,
                "a byte range '@OFFSET[+LENGTH]' is only for store.* keys (the bytes of the image an operation touches), not for {k}"
            ),
            UnknownAction(s) => write!(
                f,
                "expected an action name ({}), got \"{s}\"",
                ACTIONS.join(", ")
            ),
            MissingArgument(a) => write!(f, "expected '(' and an argument after \"{a}\", e.g. {a}(100)"),
            UnexpectedArgument(a) => write!(f, "action \"{a}\" takes no argument, got '('"),
            BadArgument { action: "powercut", got } => write!(
                f,
                "expected all, none or torn as the argument of \"powercut\", got \"{got}\""
            ),
            BadArgument { action, got } => write!(
                f,
                "expected a non-negative integer as the argument of \"{action}\", got \"{got}\""
            ),
            BadProbability(s) => write!(
                f,
                "expected a probability between 0 and 100 before '%', got \"{s}\""
            ),
            BadCount(s) => write!(f, "expected a count N >= 1 before '*', got \"{s}\""),
            WrongSide { action, key } => {
                if key.starts_with("store.") {
                    write!(
                        f,
                        "action \"{action}\" is a network action, not valid for store key {key} (store keys take pass, eio, enospc, slow(MS))"
                    )
                } else {
                    write!(
                        f,
                        "action \"{action}\" is a store fault, only valid for store.* keys, not for {key}"
                    )
                }
            }
            NoEffectAt { action, key } => write!(
                f,
                "action \"{action}\" cannot act at {key}: the step has no message and no connection to act on (it takes pass, delay(MS), crash, powercut)"
            ),
            DuplicateKey(k) => write!(f, "key {k} appears twice; give each key one chain"),
            DuplicateSeed => write!(f, "seed is set twice"),
            BadSeed(s) => write!(f, "expected a seed (an integer from 0 to 2^64-1), got \"{s}\""),
            NotUnicode => write!(f, "{ENV_VAR} is not valid UTF-8"),
        }
    }
}

impl std::error::Error for PlanError {}

// ---------------------------------------------------------------------------
// Parser

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'.'
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser { text, pos: 0 }
    }

    fn err<T>(&self, pos: usize, kind: PlanErrorKind) -> Result<T, PlanError> {
        Err(PlanError { pos, kind })
    }

    fn skip_ws(&mut self) {
        while let Some(b) = self.text.as_bytes().get(self.pos) {
            if b.is_ascii_whitespace() {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    fn at_end(&mut self) -> bool {
        self.skip_ws();
        self.pos >= self.text.len()
    }

    /// Describes the token at the current position for "got ..." messages.
    fn describe_here(&mut self) -> String {
        self.skip_ws();
        let rest = &self.text[self.pos..];
        if rest.is_empty() {
            return "end of plan".into();
        }
        let word: String = rest
            .bytes()
            .take_while(|&b| is_word_byte(b))
            .map(char::from)
            .collect();
        if !word.is_empty() {
            return format!("\"{word}\"");
        }
        let c = rest.chars().next().unwrap_or(' ');
        format!("'{c}'")
    }

    /// Consumes `token` (after whitespace) if it is next.
    fn eat(&mut self, token: &str) -> bool {
        self.skip_ws();
        if self.text[self.pos..].starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &str, expected: &'static str) -> Result<(), PlanError> {
        if self.eat(token) {
            Ok(())
        } else {
            let pos = self.pos;
            let got = self.describe_here();
            self.err(pos, PlanErrorKind::Expected { expected, got })
        }
    }

    /// A maximal run of `[A-Za-z0-9_.]` (may be empty), with its start.
    fn word(&mut self) -> (usize, &'a str) {
        self.skip_ws();
        let start = self.pos;
        let bytes = self.text.as_bytes();
        while self.pos < bytes.len() && is_word_byte(bytes[self.pos]) {
            self.pos += 1;
        }
        (start, &self.text[start..self.pos])
    }

    fn plan(mut self) -> Result<(Option<u64>, Vec<Entry>), PlanError> {
        let mut seed = None;
        let mut entries: Vec<Entry> = Vec::new();
        if self.at_end() {
            return Ok((seed, entries));
        }
        loop {
            self.entry(&mut seed, &mut entries)?;
            if self.at_end() {
                break;
            }
            self.expect(";", "';', '->' or end of plan")?;
            if self.at_end() {
                break; // one trailing ';' is allowed
            }
        }
        Ok((seed, entries))
    }

    fn entry(&mut self, seed: &mut Option<u64>, entries: &mut Vec<Entry>) -> Result<(), PlanError> {
        let (start, word) = self.word();
        if word.is_empty() {
            let got = self.describe_here();
            return self.err(
                start,
                PlanErrorKind::Expected {
                    expected: "a key like server.reply_send.write, or seed",
                    got,
                },
            );
        }
        if word == "seed" {
            self.expect("=", "'=' after seed")?;
            let (pos, value) = self.word();
            let Ok(value) = value.parse::<u64>() else {
                let got = if value.is_empty() {
                    self.describe_here()
                } else {
                    value.to_string()
                };
                return self.err(pos, PlanErrorKind::BadSeed(got));
            };
            if seed.is_some() {
                return self.err(start, PlanErrorKind::DuplicateSeed);
            }
            *seed = Some(value);
            return Ok(());
        }
        let key = self.key(start, word)?;
        self.expect("=", "'=' after the key")?;
        let label: Arc<str> = key.to_string().into();
        if entries.iter().any(|e| e.key == key) {
            return self.err(start, PlanErrorKind::DuplicateKey(label.to_string()));
        }
        let mut chain = vec![self.term(&key, &label)?];
        while self.eat("->") {
            chain.push(self.term(&key, &label)?);
        }
        entries.push(Entry {
            key,
            chain,
            label,
            group: 0,
        });
        Ok(())
    }

    fn key(&mut self, start: usize, word: &str) -> Result<Key, PlanError> {
        let (side_name, step) = match word.split_once('.') {
            Some((side, step)) => (side, Some(step)),
            None => (word, None),
        };
        let Some(side) = Side::from_name(side_name) else {
            return self.err(start, PlanErrorKind::UnknownSide(side_name.into()));
        };
        let step_pos = start + side_name.len() + 1;
        let Some(step) = step else {
            let got = format!("\"{word}\"");
            return self.err(
                start + word.len(),
                PlanErrorKind::Expected {
                    expected: "'.' and a step after the side (e.g. server.reply_send.write)",
                    got,
                },
            );
        };
        let valid = !step.is_empty()
            && step.split('.').all(|seg| {
                !seg.is_empty()
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            });
        if !valid {
            return self.err(step_pos, PlanErrorKind::BadStep(step.into()));
        }
        let mut range = None;
        if self.eat("@") {
            if side != Side::Store {
                return self.err(
                    start,
                    PlanErrorKind::RangeNotStore(format!("{side}.{step}")),
                );
            }
            let start = self.bytes(false)?;
            let len = if self.eat("+") {
                Some(self.bytes(true)?)
            } else {
                None
            };
            range = Some(ByteRange { start, len });
        }
        let mut nth = None;
        if self.eat("#") {
            let (pos, n) = self.word();
            match n.parse::<u64>() {
                Ok(n) if n >= 1 => nth = Some(n),
                _ => {
                    let got = if n.is_empty() {
                        self.describe_here()
                    } else {
                        n.to_string()
                    };
                    return self.err(pos, PlanErrorKind::BadOccurrence(got));
                }
            }
        }
        Ok(Key {
            side,
            step: step.into(),
            range,
            nth,
        })
    }

    /// `DIGITS ['K' | 'M' | 'G']` (binary multiples); above zero if
    /// `positive`.
    fn bytes(&mut self, positive: bool) -> Result<u64, PlanError> {
        let (pos, word) = self.word();
        let (digits, unit) = match word.as_bytes().last() {
            Some(b'K') => (&word[..word.len() - 1], 1u64 << 10),
            Some(b'M') => (&word[..word.len() - 1], 1 << 20),
            Some(b'G') => (&word[..word.len() - 1], 1 << 30),
            _ => (word, 1),
        };
        let value = digits
            .parse::<u64>()
            .ok()
            .filter(|_| digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.checked_mul(unit))
            .filter(|&n| !positive || n > 0);
        match value {
            Some(n) => Ok(n),
            None => {
                let got = if word.is_empty() {
                    self.describe_here()
                } else {
                    word.to_string()
                };
                self.err(pos, PlanErrorKind::BadRange(got))
            }
        }
    }

    fn term(&mut self, key: &Key, label: &str) -> Result<Term, PlanError> {
        let mut percent = None;
        let mut count = None;
        let (mut pos, mut word) = self.word();
        if word.starts_with(|c: char| c.is_ascii_digit()) && self.eat("%") {
            let valid = word.split_once('.').map_or(
                word.bytes().all(|b| b.is_ascii_digit()),
                |(int, frac)| {
                    !frac.is_empty()
                        && int.bytes().all(|b| b.is_ascii_digit())
                        && frac.bytes().all(|b| b.is_ascii_digit())
                },
            );
            match word.parse::<f64>() {
                Ok(p) if valid && (0.0..=100.0).contains(&p) => percent = Some(p),
                _ => return self.err(pos, PlanErrorKind::BadProbability(word.into())),
            }
            (pos, word) = self.word();
        }
        if word.starts_with(|c: char| c.is_ascii_digit()) && self.eat("*") {
            match word.parse::<u64>() {
                Ok(c) if c >= 1 && word.bytes().all(|b| b.is_ascii_digit()) => count = Some(c),
                _ => return self.err(pos, PlanErrorKind::BadCount(word.into())),
            }
            (pos, word) = self.word();
        }
        if word.is_empty() {
            let got = self.describe_here();
            return self.err(
                pos,
                PlanErrorKind::Expected {
                    expected: "an action name (pass, drop, close, ...)",
                    got,
                },
            );
        }
        let Some(&name) = ACTIONS.iter().find(|&&a| a == word) else {
            if word.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                let got = self.describe_here();
                return self.err(
                    pos + word.len(),
                    PlanErrorKind::Expected {
                        expected: "'%' or '*' after a number",
                        got,
                    },
                );
            }
            return self.err(pos, PlanErrorKind::UnknownAction(word.into()));
        };
        let takes_arg = matches!(name, "truncate" | "delay" | "slow");
        let paren = self.pos;
        let is_store_key = key.side == Side::Store;
        if name == "powercut" {
            // An optional word: which of the losable writes are lost.
            let loss = if self.eat("(") {
                let (arg_pos, arg) = self.word();
                let Some(loss) = PowerLoss::from_name(arg) else {
                    let got = if arg.is_empty() {
                        self.describe_here()
                    } else {
                        arg.to_string()
                    };
                    return self.err(arg_pos, PlanErrorKind::BadArgument { action: name, got });
                };
                self.expect(")", "')' after the argument")?;
                loss
            } else {
                PowerLoss::Seeded
            };
            let action = if is_store_key {
                Fault::Store(StoreFault::PowerCut(loss))
            } else {
                Fault::Net(Action::PowerCut(loss))
            };
            return Ok(Term {
                percent,
                count,
                action: Some(action),
            });
        }
        let arg = if self.eat("(") {
            if !takes_arg {
                self.skip_ws();
                return self.err(paren, PlanErrorKind::UnexpectedArgument(name));
            }
            let (arg_pos, arg) = self.word();
            let Ok(value) = arg.parse::<u64>() else {
                let got = if arg.is_empty() {
                    self.describe_here()
                } else {
                    arg.to_string()
                };
                return self.err(arg_pos, PlanErrorKind::BadArgument { action: name, got });
            };
            self.expect(")", "')' after the argument")?;
            Some(value)
        } else {
            None
        };
        let needs = |this: &Self| this.err(pos + word.len(), PlanErrorKind::MissingArgument(name));
        let action = match name {
            "pass" => None,
            "drop" => Some(Fault::Net(Action::Drop)),
            "close" => Some(Fault::Net(Action::Close)),
            "hang" => Some(Fault::Net(Action::Hang)),
            "corrupt" => Some(Fault::Net(Action::Corrupt)),
            // Crash is meaningful on both kinds of key.
            "crash" if is_store_key => Some(Fault::Store(StoreFault::Crash)),
            "crash" => Some(Fault::Net(Action::Crash)),
            "truncate" => match arg {
                Some(n) => match usize::try_from(n) {
                    Ok(n) => Some(Fault::Net(Action::Truncate(n))),
                    Err(_) => {
                        return self.err(
                            pos,
                            PlanErrorKind::BadArgument {
                                action: name,
                                got: n.to_string(),
                            },
                        )
                    }
                },
                None => return needs(self),
            },
            "delay" => match arg {
                Some(ms) => Some(Fault::Net(Action::Delay(Duration::from_millis(ms)))),
                None => return needs(self),
            },
            "eio" => Some(Fault::Store(StoreFault::Eio)),
            "enospc" => Some(Fault::Store(StoreFault::Enospc)),
            "slow" => match arg {
                Some(ms) => Some(Fault::Store(StoreFault::Slow(Duration::from_millis(ms)))),
                None => return needs(self),
            },
            _ => unreachable!("every name in ACTIONS is handled"),
        };
        let wrong_side = match action {
            None => false,
            Some(Fault::Net(_)) => is_store_key,
            Some(Fault::Store(_)) => !is_store_key,
        };
        if wrong_side {
            return self.err(
                pos,
                PlanErrorKind::WrongSide {
                    action: name,
                    key: label.to_string(),
                },
            );
        }
        let at_milestone = !is_store_key && crate::steps::is_milestone(&key.step);
        if at_milestone
            && !matches!(
                action,
                None | Some(Fault::Net(
                    Action::Pass | Action::Delay(_) | Action::Crash | Action::PowerCut(_)
                ))
            )
        {
            return self.err(
                pos,
                PlanErrorKind::NoEffectAt {
                    action: name,
                    key: label.to_string(),
                },
            );
        }
        Ok(Term {
            percent,
            count,
            action,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn plan(text: &str) -> FaultPlan {
        FaultPlan::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn err(text: &str) -> PlanError {
        match FaultPlan::parse(text) {
            Ok(p) => panic!("{text:?} parsed as {p}"),
            Err(e) => e,
        }
    }

    /// The actions of `n` evaluations of one step, `pass` for passes.
    fn run(plan: &FaultPlan, side: &str, step: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| match plan.decide(side, step).fault {
                Some(f) => f.to_string(),
                None => "pass".into(),
            })
            .collect()
    }

    // --- parsing: valid plans -------------------------------------------

    #[test]
    fn blank_plans_are_empty() {
        for text in ["", "   ", "\n\t "] {
            let p = plan(text);
            assert!(p.is_empty());
            assert!(!p.seed_given());
            assert_eq!(p.decide("server", "accept"), Decision::PASS);
        }
        let p = plan("seed=5");
        assert!(p.is_empty());
        assert_eq!(p.seed(), 5);
        assert!(p.seed_given());
    }

    #[test]
    fn powercut_is_valid_on_every_side_with_an_optional_loss() {
        let cases = [
            (
                "server.disconnect_done=powercut",
                Fault::Net(Action::PowerCut(PowerLoss::Seeded)),
            ),
            (
                "mirror.entrust_send=powercut(all)",
                Fault::Net(Action::PowerCut(PowerLoss::All)),
            ),
            (
                "store.sync=powercut(none)",
                Fault::Store(StoreFault::PowerCut(PowerLoss::Nothing)),
            ),
            (
                "store.marker=powercut( torn )",
                Fault::Store(StoreFault::PowerCut(PowerLoss::Torn)),
            ),
            ("store.unlink=crash", Fault::Store(StoreFault::Crash)),
        ];
        for (text, want) in cases {
            let p = plan(text);
            let (side, step) = text.split_once('=').unwrap().0.split_once('.').unwrap();
            let d = p.decide(side, step);
            assert_eq!(d.fault, Some(want), "{text}");
            // The fired line spells the action back as the plan does.
            let action = text.split_once('=').unwrap().1.replace(' ', "");
            assert!(
                d.line().unwrap().ends_with(&format!("-> {action}")),
                "{text}"
            );
        }
        assert!(plan("server.accept=close->powercut").can_cut_power());
        assert!(plan("store.sync#2=50%powercut(all)").can_cut_power());
        assert!(!plan("server.accept=crash; store.sync=eio").can_cut_power());
        let e = FaultPlan::parse("server.accept=powercut(half)").unwrap_err();
        assert!(e.to_string().contains("expected all, none or torn"), "{e}");
        assert!(FaultPlan::parse("server.accept=powercut(").is_err());
    }

    #[test]
    fn parses_a_simple_entry() {
        let p = plan("server.reply_send.write#3=close");
        assert_eq!(p.entries().len(), 1);
        let e = &p.entries()[0];
        assert_eq!(
            e.key,
            Key {
                side: Side::Server,
                step: "reply_send.write".into(),
                range: None,
                nth: Some(3)
            }
        );
        assert_eq!(
            e.chain,
            vec![Term {
                percent: None,
                count: None,
                action: Some(Fault::Net(Action::Close))
            }]
        );
    }

    #[test]
    fn parses_every_action() {
        let cases: &[(&str, Option<Fault>)] = &[
            ("server.x=pass", None),
            ("server.x=drop", Some(Fault::Net(Action::Drop))),
            ("server.x=close", Some(Fault::Net(Action::Close))),
            (
                "server.x=truncate(12)",
                Some(Fault::Net(Action::Truncate(12))),
            ),
            ("server.x=hang", Some(Fault::Net(Action::Hang))),
            (
                "server.x=delay(250)",
                Some(Fault::Net(Action::Delay(Duration::from_millis(250)))),
            ),
            ("server.x=corrupt", Some(Fault::Net(Action::Corrupt))),
            ("server.x=crash", Some(Fault::Net(Action::Crash))),
            ("store.write=pass", None),
            ("store.write=eio", Some(Fault::Store(StoreFault::Eio))),
            ("store.write=enospc", Some(Fault::Store(StoreFault::Enospc))),
            (
                "store.sync=slow(7)",
                Some(Fault::Store(StoreFault::Slow(Duration::from_millis(7)))),
            ),
        ];
        for (text, action) in cases {
            assert_eq!(plan(text).entries()[0].chain[0].action, *action, "{text}");
        }
    }

    #[test]
    fn parses_every_side() {
        for side in SIDES {
            let action = if *side == "store" { "eio" } else { "close" };
            let p = plan(&format!("{side}.some_step={action}"));
            assert_eq!(p.entries()[0].key.side.name(), *side);
        }
    }

    #[test]
    fn parses_probabilities_and_counts() {
        let p = plan("server.x=100%close->0%drop->1*hang->12.5%3*crash->0.001%pass");
        let c = &p.entries()[0].chain;
        assert_eq!(
            c.iter().map(|t| (t.percent, t.count)).collect::<Vec<_>>(),
            vec![
                (Some(100.0), None),
                (Some(0.0), None),
                (None, Some(1)),
                (Some(12.5), Some(3)),
                (Some(0.001), None),
            ]
        );
    }

    #[test]
    fn whitespace_is_allowed_around_tokens() {
        let tight =
            plan("seed=3;server.reply_send.write#2=50%2*truncate(4)->close;store.write=eio");
        let loose = plan(
            "  seed = 3 ;\n server.reply_send.write # 2 = 50 % 2 * truncate ( 4 ) -> close ;\tstore.write = eio ; ",
        );
        assert_eq!(tight, loose);
        assert_eq!(tight.to_string(), loose.to_string());
    }

    #[test]
    fn numeric_and_nested_steps() {
        let p = plan("server.option_received.7=close; mirror.a.b_c.d9=drop");
        assert_eq!(p.entries()[0].key.step, "option_received.7");
        assert_eq!(p.entries()[1].key.step, "a.b_c.d9");
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "server.reply_send.write#3=close",
            "seed=18446744073709551615; mirror.request_send.write=12.5%3*delay(20)->truncate(0)->pass",
            "store.write=3*pass->eio->slow(50); store.sync#1=enospc; control.status=hang",
            "client.connect=0%close; proxy.accept=100%1*crash; server.x#2=drop; server.x#4=corrupt; server.x=hang",
        ] {
            let p = plan(text);
            let again = plan(&p.to_string());
            assert_eq!(p, again, "{text}");
            assert_eq!(p.to_string(), again.to_string());
        }
        assert_eq!(
            plan("seed=1;server.a=2*drop->close").to_string(),
            "seed=1; server.a=2*drop->close"
        );
    }

    #[test]
    fn display_includes_a_picked_seed() {
        let p = plan("server.accept=close");
        assert!(!p.seed_given());
        assert_eq!(plan(&p.to_string()).seed(), p.seed());
    }

    // --- parsing: errors --------------------------------------------------

    #[test]
    fn error_message_names_position_expectation_and_token() {
        let e = err("server.reply_send.write=clos");
        assert_eq!(e.pos, 24);
        assert_eq!(e.kind, PlanErrorKind::UnknownAction("clos".into()));
        assert_eq!(
            e.to_string(),
            "fault plan: at byte 24: expected an action name (pass, drop, close, truncate, hang, delay, corrupt, crash, powercut, eio, enospc, slow), got \"clos\""
        );
    }

    #[test]
    fn readme_error_example_is_exact() {
        let readme = include_str!("../../fixtures/faults/README.md");
        let e = err("seed=1; server.reply_send.write=clos");
        assert!(readme.contains(&e.to_string()), "{e}");
    }

    #[test]
    fn readme_example_plans_parse() {
        let readme = include_str!("../../fixtures/faults/README.md");
        let (_, table) = readme
            .split_once("| plan | meaning |")
            .expect("examples table");
        let mut n = 0;
        for row in table.lines().skip(2).take_while(|l| l.starts_with("| `")) {
            let text = row.split('`').nth(1).unwrap();
            plan(text);
            n += 1;
        }
        assert!(n >= 5, "{n}");
    }

    #[test]
    fn every_error_kind() {
        use PlanErrorKind::*;
        let cases: Vec<(&str, usize, PlanErrorKind)> = vec![
            ("srv.accept=close", 0, UnknownSide("srv".into())),
            ("Server.accept=close", 0, UnknownSide("Server".into())),
            (
                "server=close",
                6,
                Expected {
                    expected: "'.' and a step after the side (e.g. server.reply_send.write)",
                    got: "\"server\"".into(),
                },
            ),
            ("server.=close", 7, BadStep("".into())),
            ("server.Reply=close", 7, BadStep("Reply".into())),
            ("server.a..b=close", 7, BadStep("a..b".into())),
            ("server.a.=close", 7, BadStep("a.".into())),
            ("server.a#0=close", 9, BadOccurrence("0".into())),
            ("server.a#x=close", 9, BadOccurrence("x".into())),
            ("server.a#=close", 9, BadOccurrence("'='".into())),
            (
                "server.a close",
                9,
                Expected {
                    expected: "'=' after the key",
                    got: "\"close\"".into(),
                },
            ),
            (
                "server.a=",
                9,
                Expected {
                    expected: "an action name (pass, drop, close, ...)",
                    got: "end of plan".into(),
                },
            ),
            ("server.a=boom", 9, UnknownAction("boom".into())),
            ("server.a=CLOSE", 9, UnknownAction("CLOSE".into())),
            ("server.a=truncate", 17, MissingArgument("truncate")),
            ("server.a=delay->close", 14, MissingArgument("delay")),
            ("store.sync=slow", 15, MissingArgument("slow")),
            ("server.a=close(3)", 14, UnexpectedArgument("close")),
            (
                "server.a=delay(x)",
                15,
                BadArgument {
                    action: "delay",
                    got: "x".into(),
                },
            ),
            (
                "server.a=truncate(-1)",
                18,
                BadArgument {
                    action: "truncate",
                    got: "'-'".into(),
                },
            ),
            (
                "server.a=delay(5",
                16,
                Expected {
                    expected: "')' after the argument",
                    got: "end of plan".into(),
                },
            ),
            ("server.a=101%close", 9, BadProbability("101".into())),
            ("server.a=100.5%close", 9, BadProbability("100.5".into())),
            ("server.a=1.2.3%close", 9, BadProbability("1.2.3".into())),
            ("server.a=5.%close", 9, BadProbability("5.".into())),
            ("server.a=0*close", 9, BadCount("0".into())),
            ("server.a=1.5*close", 9, BadCount("1.5".into())),
            ("server.a=3close", 9, UnknownAction("3close".into())),
            (
                "server.a=3 close",
                10,
                Expected {
                    expected: "'%' or '*' after a number",
                    got: "\"close\"".into(),
                },
            ),
            (
                "server.reply_send.write=eio",
                24,
                WrongSide {
                    action: "eio",
                    key: "server.reply_send.write".into(),
                },
            ),
            (
                "store.write#2=close",
                14,
                WrongSide {
                    action: "close",
                    key: "store.write#2".into(),
                },
            ),
            (
                "store.sync=delay(5)",
                11,
                WrongSide {
                    action: "delay",
                    key: "store.sync".into(),
                },
            ),
            (
                "server.a=close server.b=drop",
                15,
                Expected {
                    expected: "';', '->' or end of plan",
                    got: "\"server.b\"".into(),
                },
            ),
            (
                "server.a=close;;server.b=drop",
                15,
                Expected {
                    expected: "a key like server.reply_send.write, or seed",
                    got: "';'".into(),
                },
            ),
            (
                "server.a=close->",
                16,
                Expected {
                    expected: "an action name (pass, drop, close, ...)",
                    got: "end of plan".into(),
                },
            ),
            (
                "server.a=close; server.a=drop",
                16,
                DuplicateKey("server.a".into()),
            ),
            (
                "server.a#2=close; server.a#2=drop",
                18,
                DuplicateKey("server.a#2".into()),
            ),
            ("seed=1; seed=2", 8, DuplicateSeed),
            ("seed=x", 5, BadSeed("x".into())),
            ("seed=-1", 5, BadSeed("'-'".into())),
            (
                "seed=18446744073709551616",
                5,
                BadSeed("18446744073709551616".into()),
            ),
            (
                "seed 1",
                5,
                Expected {
                    expected: "'=' after seed",
                    got: "\"1\"".into(),
                },
            ),
        ];
        for (text, pos, kind) in cases {
            let e = err(text);
            assert_eq!((e.pos, &e.kind), (pos, &kind), "{text:?}: {e}");
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("fault plan: at byte {pos}: ")),
                "{msg}"
            );
        }
    }

    #[test]
    fn wrong_side_messages_are_clear() {
        assert_eq!(
            err("server.reply_send.write=eio").to_string(),
            "fault plan: at byte 24: action \"eio\" is a store fault, only valid for store.* keys, not for server.reply_send.write"
        );
        assert!(err("store.write=close")
            .to_string()
            .contains("store keys take pass, eio, enospc, slow(MS)"));
    }

    #[test]
    fn unknown_side_lists_the_sides() {
        assert_eq!(
            err("srv.accept=close").to_string(),
            "fault plan: at byte 0: expected a side (server, mirror, client, proxy, control, store), got \"srv\""
        );
    }

    #[test]
    fn non_ascii_input_is_an_error_not_a_panic() {
        let e = err("server.accept=clöse");
        assert_eq!(e.kind, PlanErrorKind::UnknownAction("cl".into()));
        let e = err("server.a=close→drop");
        assert!(matches!(e.kind, PlanErrorKind::Expected { .. }), "{e}");
        assert!(e.to_string().contains("got '→'"), "{e}");
        let e = err("é");
        assert!(e.to_string().contains("got 'é'"), "{e}");
    }

    // --- semantics ----------------------------------------------------------

    #[test]
    fn a_term_without_count_applies_forever() {
        let p = plan("server.accept=close->drop");
        assert_eq!(run(&p, "server", "accept", 4), ["close"; 4]);
    }

    #[test]
    fn counts_move_the_chain_on_and_an_exhausted_chain_passes() {
        let p = plan("server.reply_send.write=2*pass->1*close->2*truncate(3)");
        assert_eq!(
            run(&p, "server", "reply_send.write", 7),
            [
                "pass",
                "pass",
                "close",
                "truncate(3)",
                "truncate(3)",
                "pass",
                "pass"
            ]
        );
    }

    #[test]
    fn one_star_applies_once() {
        let p = plan("mirror.connect=1*close");
        assert_eq!(run(&p, "mirror", "connect", 3), ["close", "pass", "pass"]);
    }

    fn at(plan: &FaultPlan, step: &str, ops: &[(u64, u64)]) -> Vec<String> {
        ops.iter()
            .map(|&op| match plan.decide_at("store", step, Some(op)).fault {
                Some(f) => f.to_string(),
                None => "pass".into(),
            })
            .collect()
    }

    #[test]
    fn a_ranged_store_key_applies_only_to_operations_touching_its_bytes() {
        let p = plan("store.read@64K+4K=eio");
        let k = 64 * 1024;
        assert_eq!(
            at(
                &p,
                "read",
                &[
                    (0, 4096),
                    (k - 4096, 4096),
                    (k - 1, 2),
                    (k + 4095, 1),
                    (k + 4096, 4096),
                    (k, 0)
                ]
            ),
            ["pass", "pass", "eio", "eio", "pass", "eio"]
        );
        // An operation on no particular bytes (a sync) is never in a range.
        assert_eq!(p.decide("store", "read").fault, None);
        // Without a length: from the offset to the end.
        let p = plan("store.write@1M=enospc");
        assert_eq!(
            at(
                &p,
                "write",
                &[(0, 1 << 20), (0, (1 << 20) + 1), (u64::MAX - 1, 1)]
            ),
            ["pass", "enospc", "enospc"]
        );
    }

    #[test]
    fn a_ranged_key_counts_only_its_own_operations_and_wins_over_the_plain_key() {
        let p = plan("store.read@0+4096#2=slow(5); store.read=eio");
        // In range: 1st passes to the plain key (eio), 2nd is the ranged #2.
        // Out of range: always the plain key.
        assert_eq!(
            at(&p, "read", &[(0, 512), (8192, 512), (100, 1), (0, 4096)]),
            ["eio", "eio", "slow(5)", "eio"]
        );
        let fired = p.decide_at("store", "read", Some((0, 1)));
        assert_eq!(fired.key.as_deref(), Some("store.read"));
        let p = plan("store.read@0+4096#1=slow(5)");
        let fired = p.decide_at("store", "read", Some((0, 1)));
        assert_eq!(fired.key.as_deref(), Some("store.read@0+4096#1"));
        assert!(fired
            .line()
            .unwrap()
            .contains("store.read@0+4096#1 -> slow(5)"));
    }

    #[test]
    fn ranges_parse_with_units_and_print_back_in_bytes() {
        let p = plan("store.read@2M+64K=eio; store.write@1G=eio");
        let shown: Vec<String> = p.entries().iter().map(|e| e.to_string()).collect();
        assert_eq!(
            shown,
            ["store.read@2097152+65536=eio", "store.write@1073741824=eio"]
        );
        assert_eq!(plan(&p.to_string()).to_string(), p.to_string());
    }

    #[test]
    fn bad_ranges_are_refused_with_what_was_expected() {
        let e = err("server.reply_send.read@0=drop");
        assert!(matches!(e.kind, PlanErrorKind::RangeNotStore(_)), "{e}");
        assert!(e.to_string().contains("only for store.* keys"), "{e}");
        for text in [
            "store.read@=eio",
            "store.read@1X=eio",
            "store.read@0+0=eio",
            "store.read@4K+=eio",
        ] {
            let e = err(text);
            assert!(matches!(e.kind, PlanErrorKind::BadRange(_)), "{text}: {e}");
            assert!(e.to_string().contains("'@OFFSET[+LENGTH]'"), "{text}: {e}");
        }
        // The same step with different ranges are different keys.
        plan("store.read@0+4K=eio; store.read@8K+4K=eio");
        let e = err("store.read@0+4K=eio; store.read@0+4K=slow(1)");
        assert!(matches!(e.kind, PlanErrorKind::DuplicateKey(_)), "{e}");
    }

    #[test]
    fn nth_occurrence_only() {
        let p = plan("server.reply_send.write#3=close");
        assert_eq!(
            run(&p, "server", "reply_send.write", 5),
            ["pass", "pass", "close", "pass", "pass"]
        );
    }

    #[test]
    fn nth_occurrence_with_a_counted_chain_does_not_touch_the_chain_elsewhere() {
        // Only the 2nd occurrence is subject to the chain: it takes the first
        // term, and the chain never advances further.
        let p = plan("server.a#2=1*close->drop");
        assert_eq!(run(&p, "server", "a", 4), ["pass", "close", "pass", "pass"]);
    }

    #[test]
    fn several_nth_entries_and_a_default_share_a_step() {
        let p = plan("server.a#2=close; server.a#4=drop; server.a=1*hang");
        assert_eq!(
            run(&p, "server", "a", 6),
            ["hang", "close", "pass", "drop", "pass", "pass"]
        );
    }

    #[test]
    fn steps_and_sides_are_independent() {
        let p = plan("server.a=1*close; mirror.a=1*drop; server.b#1=hang");
        assert_eq!(p.decide("mirror", "a").action(), Action::Drop);
        assert_eq!(p.decide("server", "b").action(), Action::Hang);
        assert_eq!(p.decide("server", "a").action(), Action::Close);
        assert_eq!(p.decide("server", "a").action(), Action::Pass);
        assert_eq!(p.decide("client", "a").action(), Action::Pass);
        assert_eq!(p.decide("nobody", "a").action(), Action::Pass);
    }

    #[test]
    fn zero_and_hundred_percent() {
        let never = plan("seed=1; server.a=0%close");
        assert!(run(&never, "server", "a", 1000).iter().all(|a| a == "pass"));
        let always = plan("seed=1; server.a=100%close");
        assert!(run(&always, "server", "a", 1000)
            .iter()
            .all(|a| a == "close"));
    }

    #[test]
    fn failed_rolls_pass_without_consuming_the_count() {
        let p = plan("seed=99; server.a=30%2*close->drop");
        let got = run(&p, "server", "a", 200);
        let closes = got.iter().filter(|a| *a == "close").count();
        assert_eq!(closes, 2, "{got:?}");
        let first_drop = got.iter().position(|a| a == "drop").expect("reaches drop");
        // every evaluation before the 2nd close was a pass or a close
        assert!(got[..first_drop]
            .iter()
            .all(|a| a == "pass" || a == "close"));
        assert!(got[first_drop..].iter().all(|a| a == "drop"));
        // with 30%, more than two evaluations were needed before drop
        assert!(first_drop > 2, "{got:?}");
    }

    #[test]
    fn probability_is_roughly_right() {
        let p = plan("seed=12345; server.a=25%close");
        let fired = run(&p, "server", "a", 20_000)
            .iter()
            .filter(|a| *a == "close")
            .count();
        assert!((4_500..5_500).contains(&fired), "{fired}");
    }

    #[test]
    fn same_seed_same_decisions() {
        let text =
            "seed=2024; server.a=50%close->10%3*drop; mirror.b=33.3%delay(1); store.write=20%eio";
        let trace = |p: &FaultPlan| {
            let mut out = Vec::new();
            for i in 0..500 {
                let (side, step) = [("server", "a"), ("mirror", "b"), ("store", "write")][i % 3];
                out.push(p.decide(side, step));
            }
            out
        };
        let a = trace(&plan(text));
        let b = trace(&plan(text));
        assert_eq!(a, b);
        assert!(a.iter().any(|d| d.fired()) && a.iter().any(|d| !d.fired()));
        let c = trace(&plan(&text.replace("2024", "2025")));
        assert_ne!(a, c, "a different seed gives different rolls");
    }

    #[test]
    fn keys_do_not_disturb_each_others_rolls() {
        let alone = plan("seed=8; server.a=50%close");
        let busy = plan("seed=8; server.a=50%close; server.b=50%drop");
        let mut x = Vec::new();
        let mut y = Vec::new();
        for _ in 0..200 {
            x.push(alone.decide("server", "a"));
            busy.decide("server", "b");
            y.push(busy.decide("server", "a"));
        }
        assert_eq!(x, y);
    }

    #[test]
    fn decisions_carry_the_key_and_the_line() {
        let p = plan("server.reply_send.write#3=close; store.write=eio");
        p.decide("server", "reply_send.write");
        p.decide("server", "reply_send.write");
        let d = p.decide("server", "reply_send.write");
        assert!(d.fired());
        assert_eq!(d.key.as_deref(), Some("server.reply_send.write#3"));
        assert_eq!(d.action(), Action::Close);
        assert_eq!(d.store_fault(), None);
        assert_eq!(
            d.line().unwrap(),
            "fault fired: server.reply_send.write#3 -> close"
        );
        let s = p.decide_side(Side::Store, "write");
        assert_eq!(s.store_fault(), Some(StoreFault::Eio));
        assert_eq!(s.action(), Action::Pass);
        assert_eq!(s.line().unwrap(), "fault fired: store.write -> eio");
        let pass = p.decide("server", "reply_send.write");
        assert!(!pass.fired());
        assert_eq!(pass.line(), None);
    }

    #[test]
    fn steps_after_the_last_message_take_only_delay_crash_and_powercut() {
        for ok in [
            "server.disconnect_done=delay(5)",
            "server.disconnect_done=crash",
            "mirror.disconnect_sent=powercut(all)",
            "mirror.disconnect_sent=pass->crash",
        ] {
            FaultPlan::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["drop", "close", "truncate(3)", "hang", "corrupt"] {
            for key in ["server.disconnect_done", "mirror.disconnect_sent#1"] {
                let plan = format!("{key}=crash->{bad}");
                let e = FaultPlan::parse(&plan).unwrap_err();
                assert!(
                    matches!(e.kind, PlanErrorKind::NoEffectAt { .. }),
                    "{plan}: {e}"
                );
                assert!(e.to_string().contains("cannot act at"), "{e}");
            }
        }
    }

    #[test]
    fn fired_line_format() {
        assert_eq!(
            fired_line("server.reply_send.write#3", Action::Close),
            "fault fired: server.reply_send.write#3 -> close"
        );
        assert_eq!(
            fired_line("mirror.payload_send.write", Action::Truncate(9)),
            "fault fired: mirror.payload_send.write -> truncate(9)"
        );
        assert_eq!(
            fired_line("store.sync", StoreFault::Slow(Duration::from_millis(40))),
            "fault fired: store.sync -> slow(40)"
        );
    }

    #[test]
    fn store_faults_map_to_errno() {
        assert_eq!(StoreFault::Eio.io_error().unwrap().raw_os_error(), Some(5));
        assert_eq!(
            StoreFault::Enospc.io_error().unwrap().raw_os_error(),
            Some(28)
        );
        assert!(StoreFault::Slow(Duration::ZERO).io_error().is_none());
    }

    #[test]
    fn known_steps() {
        for (side, step) in [
            ("server", "accept"),
            ("server", "reply_send.write"),
            ("server", "option_received.7"),
            ("server", "entrust_received"),
            ("mirror", "payload_send.write"),
            ("mirror", "entrust_reply_received"),
            ("client", "reply_received.block_status"),
            ("store", "sync"),
            ("control", "mirror_speed"),
        ] {
            assert!(is_known_step(side, step), "{side}.{step}");
        }
        for (side, step) in [
            ("server", "reply_send.bogus"),
            ("server", "option_received."),
            ("server", "option_received.x"),
            ("server", "write"),
            ("store", "reply_send.write"),
            ("control", "accept"),
            ("nobody", "accept"),
        ] {
            assert!(!is_known_step(side, step), "{side}.{step}");
        }
        let p = plan("server.accept=close; server.reply_send.bogus=drop");
        let w = p.warnings();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("server.reply_send.bogus"), "{w:?}");
    }

    #[test]
    fn plan_is_send_and_sync_and_decides_from_many_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<FaultPlan>();
        let p = Arc::new(plan("server.a=100*close; server.b#500=crash"));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let p = Arc::clone(&p);
                std::thread::spawn(move || {
                    let mut closes = 0;
                    let mut crashes = 0;
                    for _ in 0..100 {
                        if p.decide("server", "a").action() == Action::Close {
                            closes += 1;
                        }
                        if p.decide("server", "b").action() == Action::Crash {
                            crashes += 1;
                        }
                    }
                    (closes, crashes)
                })
            })
            .collect();
        let (closes, crashes) = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
        // 800 evaluations of each step: exactly 100 closes, exactly one crash.
        assert_eq!(closes, 100);
        assert_eq!(crashes, 1);
    }

    #[test]
    fn from_env_var() {
        let name = "FLEXNBD_FAULTS_TEST_FROM_ENV_VAR";
        std::env::remove_var(name);
        assert!(FaultPlan::from_env_var(name).unwrap().is_empty());
        std::env::set_var(name, "");
        assert!(FaultPlan::from_env_var(name).unwrap().is_empty());
        std::env::set_var(name, "seed=4; server.accept=close");
        let p = FaultPlan::from_env_var(name).unwrap();
        assert_eq!(p.seed(), 4);
        assert_eq!(p.decide("server", "accept").action(), Action::Close);
        std::env::set_var(name, "server.accept=clos");
        assert!(FaultPlan::from_env_var(name).is_err());
        std::env::remove_var(name);
    }

    #[test]
    fn action_display_matches_plan_syntax() {
        for a in [
            Action::Pass,
            Action::Drop,
            Action::Close,
            Action::Truncate(5),
            Action::Hang,
            Action::Delay(Duration::from_millis(30)),
            Action::Corrupt,
            Action::Crash,
        ] {
            let p = plan(&format!("server.a={a}"));
            assert_eq!(p.decide("server", "a").action(), a);
        }
    }
}
