//! Protocol steps, announced by the connection code to a probe.
//!
//! Send-side steps are announced just before the message goes out, so the
//! probe's verdict can drop, truncate or corrupt it; receive-side steps are
//! announced just after the message arrived. In production the probe is
//! [`Quiet`], whose answer is a constant `Pass` that the compiler folds away;
//! with a fault plan it is [`PlanProbe`].

use std::sync::Arc;
use std::time::Duration;

pub use faults::Action;
use faults::{FaultPlan, StoreFault};

use crate::power::Power;
use crate::proto::cmd;
use crate::warn;

/// One step of the protocol, as seen by the side announcing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A connection was accepted (server side).
    Accept,
    /// The greeting is about to be sent (server side).
    GreetingSend,
    /// An option header and its data arrived (newstyle, server side).
    OptionReceived { option: u32 },
    /// An option reply is about to be sent (server side).
    OptionReplySend { option: u32 },
    /// A request header arrived (server side).
    RequestReceived { kind: u16 },
    /// A request's payload arrived in full (server side, writes only).
    PayloadReceived { kind: u16 },
    /// A reply to a request of this kind is about to be sent (server side).
    ReplySend { kind: u16 },
    /// The mirror is about to connect to the destination.
    MirrorConnect,
    /// The mirror has read the destination's greeting.
    MirrorGreetingReceived,
    /// The mirror is about to send a request header of this kind.
    MirrorRequestSend { kind: u16 },
    /// The mirror is about to send a write's payload.
    MirrorPayloadSend { kind: u16 },
    /// The mirror has read the reply to a request of this kind.
    MirrorReplyReceived { kind: u16 },
    /// A control socket command arrived (`status`, `acl`, `mirror`,
    /// `mirror_speed`, `break`).
    Control { command: &'static str },
    /// A destination completed a migration after a valid DISCONNECT (image
    /// synced, marker removed durably) and goes on to exit.
    DisconnectDone,
    /// The source's DISCONNECT went out (after the durable unlink, with
    /// `--unlink`) and it goes on to exit.
    MirrorDisconnectSent,
}

impl Step {
    /// The side of a fault plan key: `server`, `mirror` or `control`.
    pub fn side(&self) -> &'static str {
        match self {
            Step::Accept
            | Step::GreetingSend
            | Step::OptionReceived { .. }
            | Step::OptionReplySend { .. }
            | Step::RequestReceived { .. }
            | Step::PayloadReceived { .. }
            | Step::ReplySend { .. }
            | Step::DisconnectDone => "server",
            Step::MirrorConnect
            | Step::MirrorGreetingReceived
            | Step::MirrorRequestSend { .. }
            | Step::MirrorPayloadSend { .. }
            | Step::MirrorReplyReceived { .. }
            | Step::MirrorDisconnectSent => "mirror",
            Step::Control { .. } => "control",
        }
    }

    /// The step part of a fault plan key, like `reply_send.write`. The
    /// hand-off messages have names of their own (`entrust_received`,
    /// `entrust_reply_send`, `disconnect_received` on the destination;
    /// `entrust_send`, `entrust_reply_received`, `disconnect_send` on the
    /// source).
    pub fn name(&self) -> String {
        match *self {
            Step::Accept => "accept".into(),
            Step::GreetingSend => "greeting_send".into(),
            Step::OptionReceived { option } => format!("option_received.{option}"),
            Step::OptionReplySend { option } => format!("option_reply_send.{option}"),
            Step::RequestReceived { kind: cmd::ENTRUST } => "entrust_received".into(),
            Step::RequestReceived { kind: cmd::DISC } => "disconnect_received".into(),
            Step::RequestReceived { kind } => format!("request_received.{}", cmd::name(kind)),
            Step::PayloadReceived { kind } => format!("payload_received.{}", cmd::name(kind)),
            Step::ReplySend { kind: cmd::ENTRUST } => "entrust_reply_send".into(),
            Step::ReplySend { kind } => format!("reply_send.{}", cmd::name(kind)),
            Step::MirrorConnect => "connect".into(),
            Step::MirrorGreetingReceived => "greeting_received".into(),
            Step::MirrorRequestSend { kind: cmd::ENTRUST } => "entrust_send".into(),
            Step::MirrorRequestSend { kind: cmd::DISC } => "disconnect_send".into(),
            Step::MirrorRequestSend { kind } => format!("request_send.{}", cmd::name(kind)),
            Step::MirrorPayloadSend { kind } => format!("payload_send.{}", cmd::name(kind)),
            Step::MirrorReplyReceived { kind: cmd::ENTRUST } => "entrust_reply_received".into(),
            Step::MirrorReplyReceived { kind } => format!("reply_received.{}", cmd::name(kind)),
            Step::Control { command } => command.into(),
            Step::DisconnectDone => "disconnect_done".into(),
            Step::MirrorDisconnectSent => "disconnect_sent".into(),
        }
    }

    /// The whole key, `side.step`.
    pub fn key(&self) -> String {
        format!("{}.{}", self.side(), self.name())
    }
}

/// The store operations a plan can fail or slow down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreStep {
    Read,
    Write,
    Sync,
    /// A rewrite or removal of a destination's `.INCOMPLETE` marker.
    Marker,
    /// The write or removal of a destination's `.COMPLETE` completion
    /// record.
    Record,
    /// The source's `--unlink` of its image.
    Unlink,
    /// The start of the background scan that builds the allocation map
    /// (`slow` keeps the map unbuilt that long, `eio` for good).
    MapScan,
}

impl StoreStep {
    pub fn name(self) -> &'static str {
        match self {
            StoreStep::Read => "read",
            StoreStep::Write => "write",
            StoreStep::Sync => "sync",
            StoreStep::Marker => "marker",
            StoreStep::Record => "record",
            StoreStep::Unlink => "unlink",
            StoreStep::MapScan => "map_scan",
        }
    }
}

/// Receives every protocol step and decides what happens to its message.
pub trait Probe: Send + Sync + 'static {
    fn step(&self, step: Step) -> Action;

    /// The key under which this probe decides `step`, for the message of a
    /// fault that fired (a probe that announces the steps for another side
    /// names them its own way).
    fn key(&self, step: Step) -> String {
        step.key()
    }
}

/// The production probe: every step passes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quiet;

impl Probe for Quiet {
    #[inline(always)]
    fn step(&self, _step: Step) -> Action {
        Action::Pass
    }
}

/// A probe driven by a fault plan. Every fault that fires is logged as
/// `fault fired: <key> -> <action>`.
pub struct PlanProbe {
    plan: FaultPlan,
    /// The instance's power-loss model, which a `powercut` cuts.
    power: Option<Arc<Power>>,
}

impl PlanProbe {
    pub fn new(plan: FaultPlan) -> PlanProbe {
        PlanProbe { plan, power: None }
    }

    /// With the instance's power-loss model: a `powercut` loses what it
    /// records before the process dies.
    pub fn with_power(self, power: Option<Arc<Power>>) -> PlanProbe {
        PlanProbe { power, ..self }
    }

    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    pub fn power(&self) -> Option<&Arc<Power>> {
        self.power.as_ref()
    }

    /// A decided `powercut` happens here, at its step, with this
    /// instance's model; any other action is the caller's to apply.
    fn cut_now(&self, action: Action) -> Action {
        match (action, &self.power) {
            (Action::PowerCut(loss), Some(power)) => power.cut(loss),
            _ => action,
        }
    }

    /// The decision for a step named directly (`side`, `step`), logging a
    /// fired fault.
    pub fn named(&self, side: &str, step: &str) -> Action {
        let decision = self.plan.decide(side, step);
        if let Some(line) = decision.line() {
            warn!("{line}");
        }
        self.cut_now(decision.action())
    }

    /// The store's decision for one operation: an error to return, a delay
    /// to add, or nothing.
    pub fn store(&self, step: StoreStep) -> Option<StoreFault> {
        self.store_at(step, None)
    }

    /// Like [`PlanProbe::store`], for an operation on the `(offset, length)`
    /// bytes of the image: keys with a byte range (`store.read@0+4K`) apply
    /// only when it touches theirs.
    pub fn store_at(&self, step: StoreStep, at: Option<(u64, u64)>) -> Option<StoreFault> {
        let decision = self.plan.decide_at("store", step.name(), at);
        if let Some(line) = decision.line() {
            warn!("{line}");
        }
        decision.store_fault()
    }
}

impl Probe for PlanProbe {
    fn step(&self, step: Step) -> Action {
        let decision = self.plan.decide(step.side(), &step.name());
        if let Some(line) = decision.line() {
            warn!("{line}");
        }
        self.cut_now(decision.action())
    }
}

/// Applies a store fault: sleeps for `slow`, or returns the error. A
/// `powercut` cuts `power` (a crash without a model).
pub fn apply_store_fault(fault: Option<StoreFault>, power: Option<&Power>) -> std::io::Result<()> {
    match fault {
        None => Ok(()),
        Some(StoreFault::Slow(d)) => {
            std::thread::sleep(d.min(Duration::from_secs(3600)));
            Ok(())
        }
        Some(StoreFault::Crash) => faults::crash_now(),
        Some(StoreFault::PowerCut(loss)) => match power {
            Some(power) => power.cut(loss),
            None => crate::power::cut_without_model(),
        },
        Some(f) => Err(f
            .io_error()
            .unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EIO))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of step the server and the mirror announce, with sample
    /// commands and options.
    fn every_step() -> Vec<Step> {
        let kinds = [
            cmd::READ,
            cmd::WRITE,
            cmd::DISC,
            cmd::FLUSH,
            cmd::TRIM,
            cmd::CACHE,
            cmd::WRITE_ZEROES,
            cmd::BLOCK_STATUS,
            cmd::ENTRUST,
            0x77,
        ];
        let mut steps = vec![
            Step::Accept,
            Step::GreetingSend,
            Step::MirrorConnect,
            Step::MirrorGreetingReceived,
            Step::DisconnectDone,
            Step::MirrorDisconnectSent,
        ];
        for option in [1, 5, 7] {
            steps.push(Step::OptionReceived { option });
            steps.push(Step::OptionReplySend { option });
        }
        for kind in kinds {
            steps.extend([
                Step::RequestReceived { kind },
                Step::PayloadReceived { kind },
                Step::ReplySend { kind },
                Step::MirrorRequestSend { kind },
                Step::MirrorPayloadSend { kind },
                Step::MirrorReplyReceived { kind },
            ]);
        }
        // A variant added to Step fails to compile here until it is listed
        // above too (control commands are checked by their own list).
        for step in &steps {
            match step {
                Step::Accept
                | Step::GreetingSend
                | Step::OptionReceived { .. }
                | Step::OptionReplySend { .. }
                | Step::RequestReceived { .. }
                | Step::PayloadReceived { .. }
                | Step::ReplySend { .. }
                | Step::MirrorConnect
                | Step::MirrorGreetingReceived
                | Step::MirrorRequestSend { .. }
                | Step::MirrorPayloadSend { .. }
                | Step::MirrorReplyReceived { .. }
                | Step::DisconnectDone
                | Step::MirrorDisconnectSent
                | Step::Control { .. } => {}
            }
        }
        steps
    }

    #[test]
    fn every_step_the_code_announces_is_in_the_plan_vocabulary() {
        for step in every_step() {
            assert!(
                faults::plan::is_known_step(step.side(), &step.name()),
                "{} is announced but the plan parser does not know it",
                step.key()
            );
        }
    }

    /// The read/write commands and the proxy announce steps by name: each
    /// name they use appears in their source as a string literal.
    fn named_step_literals() -> String {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut text = String::new();
        for file in ["client.rs", "proxy/mod.rs", "proxy/upstream.rs"] {
            text += &std::fs::read_to_string(root.join(file)).expect(file);
        }
        text
    }

    #[test]
    fn every_step_in_the_plan_vocabulary_is_announced_somewhere() {
        let announced: Vec<(String, String)> = every_step()
            .iter()
            .map(|s| (s.side().to_string(), s.name()))
            .collect();
        let literals = named_step_literals();
        for pattern in faults::plan::KNOWN_STEPS {
            let by_step = announced.iter().any(|(side, name)| {
                faults::plan::is_known_step(side, name)
                    && (name == pattern
                        || pattern
                            .strip_suffix("<n>")
                            .or_else(|| pattern.strip_suffix("<cmd>"))
                            .is_some_and(|prefix| name.starts_with(prefix)))
            });
            let by_name = match pattern
                .strip_suffix("<n>")
                .or_else(|| pattern.strip_suffix("<cmd>"))
            {
                Some(prefix) => literals.contains(&format!("\"{prefix}")),
                None => literals.contains(&format!("\"{pattern}\"")),
            };
            assert!(
                by_step || by_name,
                "{pattern} is in the plan vocabulary but nothing announces it: \
                 a plan naming it would never fire"
            );
        }
    }

    #[test]
    fn keys_match_the_plan_vocabulary() {
        assert_eq!(
            Step::ReplySend { kind: cmd::WRITE }.key(),
            "server.reply_send.write"
        );
        assert_eq!(
            Step::RequestReceived { kind: cmd::ENTRUST }.key(),
            "server.entrust_received"
        );
        assert_eq!(
            Step::ReplySend { kind: cmd::ENTRUST }.key(),
            "server.entrust_reply_send"
        );
        assert_eq!(
            Step::RequestReceived { kind: cmd::DISC }.key(),
            "server.disconnect_received"
        );
        assert_eq!(
            Step::MirrorRequestSend { kind: cmd::ENTRUST }.key(),
            "mirror.entrust_send"
        );
        assert_eq!(
            Step::MirrorReplyReceived { kind: cmd::ENTRUST }.key(),
            "mirror.entrust_reply_received"
        );
        assert_eq!(
            Step::MirrorRequestSend { kind: cmd::DISC }.key(),
            "mirror.disconnect_send"
        );
        assert_eq!(
            Step::MirrorPayloadSend { kind: cmd::WRITE }.key(),
            "mirror.payload_send.write"
        );
        assert_eq!(Step::Control { command: "status" }.key(), "control.status");
        assert_eq!(Step::DisconnectDone.key(), "server.disconnect_done");
        assert_eq!(Step::MirrorDisconnectSent.key(), "mirror.disconnect_sent");
        // Every key we announce is one the plan language knows.
        for step in [
            Step::Accept,
            Step::GreetingSend,
            Step::RequestReceived { kind: cmd::WRITE },
            Step::PayloadReceived { kind: cmd::WRITE },
            Step::MirrorConnect,
            Step::MirrorGreetingReceived,
            Step::MirrorRequestSend {
                kind: cmd::WRITE_ZEROES,
            },
            Step::MirrorReplyReceived { kind: cmd::FLUSH },
            Step::DisconnectDone,
            Step::MirrorDisconnectSent,
        ] {
            assert!(
                faults::plan::is_known_step(step.side(), &step.name()),
                "{}",
                step.key()
            );
        }
    }

    #[test]
    fn store_steps_are_the_plan_vocabulary() {
        let all = [
            StoreStep::Read,
            StoreStep::Write,
            StoreStep::Sync,
            StoreStep::Marker,
            StoreStep::Record,
            StoreStep::Unlink,
            StoreStep::MapScan,
        ];
        for step in all {
            // A new variant must be listed above: the match fails to
            // compile otherwise.
            match step {
                StoreStep::Read
                | StoreStep::Write
                | StoreStep::Sync
                | StoreStep::Marker
                | StoreStep::Record
                | StoreStep::Unlink
                | StoreStep::MapScan => {}
            }
            assert!(
                faults::plan::is_known_step("store", step.name()),
                "store.{}",
                step.name()
            );
        }
        let names: Vec<&str> = all.iter().map(|s| s.name()).collect();
        for name in faults::plan::STORE_STEPS {
            assert!(names.contains(name), "store.{name} is announced by nothing");
        }
    }

    #[test]
    fn plan_probe_fires_on_the_nth_occurrence() {
        let probe = PlanProbe::new(FaultPlan::parse("server.reply_send.write#2=close").unwrap());
        let step = Step::ReplySend { kind: cmd::WRITE };
        assert_eq!(probe.step(step), Action::Pass);
        assert_eq!(probe.step(step), Action::Close);
        assert_eq!(probe.step(step), Action::Pass);
    }
}
