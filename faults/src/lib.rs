//! The fault vocabulary of flexnbd.
//!
//! The server, mirror and clients announce every protocol step to a probe; the
//! probe answers with an [`Action`] that says what to do with the message of
//! that step. This crate does not depend on the server: it is the shared
//! language between the connection code and whatever decides on faults.
//!
//! [`plan`] is the fault plan language (`FLEXNBD_FAULTS`), which turns a text
//! like `server.reply_send.write#3=close` into decisions at each step;
//! [`steps`] is the one table of the steps a plan may name;
//! [`scenarios`] is a catalogue of named plans covering both sides of a
//! migration and the store.

use std::time::Duration;

pub mod plan;
mod rng;
pub mod scenarios;
pub mod steps;

pub use plan::{
    fired_line, is_known_step, Decision, Fault, FaultPlan, PlanError, PlanErrorKind, Side,
    StoreFault,
};
pub use rng::SplitMix64;
pub use scenarios::{Scenario, SCENARIOS};
pub use steps::{StepDef, STEPS};

/// What to do at a protocol step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Action {
    /// Carry on as normal.
    #[default]
    Pass,
    /// Do not send (or act on) this message; the socket stays open.
    Drop,
    /// Close the socket instead of sending this message.
    Close,
    /// Send only the first N bytes of this message, then close the socket.
    Truncate(usize),
    /// Stop making progress on this connection until it is torn down.
    Hang,
    /// Wait this long, then carry on.
    Delay(Duration),
    /// Send the message with its magic damaged.
    Corrupt,
    /// Kill the whole process at once, like SIGKILL: nothing is cleaned up
    /// and nothing that is not already durable is flushed.
    Crash,
    /// Lose what a power cut may lose (image ranges written since the last
    /// successful fdatasync, marker and directory changes not yet fsynced),
    /// then die like [`Action::Crash`]. See `fixtures/faults/README.md`.
    PowerCut(PowerLoss),
}

/// Which of the writes a power cut may lose are lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PowerLoss {
    /// One of the three below, drawn from the plan's seed.
    #[default]
    Seeded,
    /// Every write not yet durable reverts.
    All,
    /// Nothing reverts (the disk happened to write everything back).
    Nothing,
    /// A torn subset: each 512-byte sector not yet durable reverts or not,
    /// drawn from the plan's seed.
    Torn,
}

impl PowerLoss {
    /// The spelling in a plan's argument: `all`, `none`, `torn` (and nothing
    /// for [`PowerLoss::Seeded`]).
    pub fn name(self) -> Option<&'static str> {
        match self {
            PowerLoss::Seeded => None,
            PowerLoss::All => Some("all"),
            PowerLoss::Nothing => Some("none"),
            PowerLoss::Torn => Some("torn"),
        }
    }

    pub fn from_name(name: &str) -> Option<PowerLoss> {
        match name {
            "all" => Some(PowerLoss::All),
            "none" => Some(PowerLoss::Nothing),
            "torn" => Some(PowerLoss::Torn),
            _ => None,
        }
    }
}

impl Action {
    pub fn is_pass(&self) -> bool {
        matches!(self, Action::Pass)
    }
}

/// Damages the magic at the start of a message so the peer must reject it.
/// Flips every bit of the first byte: the result can never equal the original.
pub fn corrupt(message: &mut [u8]) {
    if let Some(first) = message.first_mut() {
        *first = !*first;
    }
}

/// Ends the process the way SIGKILL would: no destructors, no buffered output,
/// no flush of anything not already durable.
pub fn crash_now() -> ! {
    const SIGKILL: i32 = 9;
    // std offers only abort(), which raises SIGABRT and runs its handler; a
    // crash must look like SIGKILL to whoever waits for the process.
    // SAFETY: kill(2) takes two integers and touches no memory of ours; the
    // pid is this process's own, so no other process can be hit.
    unsafe { kill(std::process::id() as i32, SIGKILL) };
    // SIGKILL cannot be caught; should delivery somehow be deferred, abort.
    std::process::abort()
}

// Declared here rather than through the libc crate: the fault vocabulary has
// no dependencies. The types match Linux's pid_t and int.
extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_changes_the_first_byte() {
        let mut m = [0x25u8, 0x60, 0x95, 0x13];
        corrupt(&mut m);
        assert_ne!(m[0], 0x25);
        assert_eq!(&m[1..], &[0x60, 0x95, 0x13]);
    }

    #[test]
    fn default_action_is_pass() {
        assert!(Action::default().is_pass());
    }
}
