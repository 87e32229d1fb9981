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
    /// STARTTLS was acknowledged and the TLS handshake is about to begin
    /// (server side).
    TlsHandshake,
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
            | Step::TlsHandshake
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
            Step::TlsHandshake => "tls_handshake".into(),
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
    /// A checkpoint's rewrite of the marker.
    Checkpoint,
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
            StoreStep::Checkpoint => "checkpoint",
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
    use faults::steps::Kind;
    use faults::Side;

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
            Step::TlsHandshake,
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
                | Step::TlsHandshake
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

    const STORE_STEPS: [StoreStep; 8] = [
        StoreStep::Read,
        StoreStep::Write,
        StoreStep::Sync,
        StoreStep::Marker,
        StoreStep::Record,
        StoreStep::Unlink,
        StoreStep::MapScan,
        StoreStep::Checkpoint,
    ];

    /// A new StoreStep variant fails to compile here until it is listed in
    /// [`STORE_STEPS`] too.
    #[allow(dead_code)]
    fn store_steps_are_all_listed(step: StoreStep) {
        match step {
            StoreStep::Read
            | StoreStep::Write
            | StoreStep::Sync
            | StoreStep::Marker
            | StoreStep::Checkpoint
            | StoreStep::Record
            | StoreStep::Unlink
            | StoreStep::MapScan => {}
        }
    }

    fn source(file: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The control commands the control socket announces: the literals of
    /// its `Request => Some("command")` table.
    fn control_commands() -> Vec<String> {
        let text = source("control/mod.rs");
        let commands: Vec<String> = text
            .lines()
            .filter_map(|line| {
                let (_, rest) = line.trim().split_once("=> Some(\"")?;
                Some(rest.split_once('"')?.0.to_string())
            })
            .collect();
        assert!(
            commands.iter().any(|c| c == "status"),
            "src/control/mod.rs: expected its `Request::Status => Some(\"status\")` table, \
             found the commands {commands:?}"
        );
        commands
    }

    fn side(name: &str) -> Side {
        Side::from_name(name).unwrap_or_else(|| panic!("expected a plan side, got {name}"))
    }

    /// Every (side, step name) announced through [`Step`], [`StoreStep`]
    /// and the control socket. The proxy's downstream negotiation is the
    /// server's, announced through the proxy's probe under its own side.
    fn announced() -> Vec<(Side, String)> {
        let mut out: Vec<(Side, String)> = every_step()
            .iter()
            .map(|s| (side(s.side()), s.name()))
            .collect();
        for step in [
            Step::GreetingSend,
            Step::OptionReceived { option: 7 },
            Step::OptionReplySend { option: 7 },
        ] {
            out.push((Side::Proxy, step.name()));
        }
        for step in STORE_STEPS {
            out.push((Side::Store, step.name().to_string()));
        }
        for command in control_commands() {
            out.push((Side::Control, command));
        }
        out
    }

    /// The `read`/`write` commands and the proxy announce steps by name: the
    /// source files where each side's names are string literals.
    fn named_step_files(side: Side) -> &'static [&'static str] {
        match side {
            Side::Client => &["client.rs"],
            Side::Proxy => &["proxy/mod.rs", "proxy/upstream.rs"],
            _ => &[],
        }
    }

    #[test]
    fn every_step_the_code_announces_is_in_the_step_table() {
        for (side, name) in announced() {
            assert!(
                faults::steps::find(side, &name).is_some(),
                "{side}.{name} is announced but is not in faults::steps::STEPS: \
                 a plan naming it would be warned about as a step that never fires"
            );
        }
    }

    #[test]
    fn every_step_in_the_table_is_announced() {
        let announced = announced();
        for def in faults::STEPS {
            let by_step = announced
                .iter()
                .any(|(side, name)| *side == def.side && def.matches(name));
            let literals: String = named_step_files(def.side)
                .iter()
                .map(|file| source(file))
                .collect();
            let by_name = match def.prefix() {
                Some(prefix) => literals.contains(&format!("\"{prefix}")),
                None => literals.contains(&format!("\"{}\"", def.pattern)),
            };
            assert!(
                by_step || by_name,
                "{} is in faults::steps::STEPS but nothing announces it: \
                 a plan naming it would never fire",
                def.key()
            );
        }
    }

    #[test]
    fn announced_steps_have_the_kind_of_the_table() {
        for (step, kind) in [
            (Step::Accept, Kind::Event),
            (Step::MirrorConnect, Kind::Event),
            (Step::TlsHandshake, Kind::Event),
            (Step::GreetingSend, Kind::Outgoing),
            (Step::MirrorGreetingReceived, Kind::Incoming),
            (Step::RequestReceived { kind: cmd::WRITE }, Kind::Incoming),
            (Step::PayloadReceived { kind: cmd::WRITE }, Kind::Incoming),
            (Step::ReplySend { kind: cmd::ENTRUST }, Kind::Outgoing),
            (Step::MirrorRequestSend { kind: cmd::DISC }, Kind::Outgoing),
            (Step::MirrorPayloadSend { kind: cmd::WRITE }, Kind::Outgoing),
            (
                Step::MirrorReplyReceived { kind: cmd::ENTRUST },
                Kind::Incoming,
            ),
            (Step::Control { command: "status" }, Kind::Incoming),
            (Step::DisconnectDone, Kind::Milestone),
            (Step::MirrorDisconnectSent, Kind::Milestone),
        ] {
            let def = faults::steps::find(side(step.side()), &step.name())
                .unwrap_or_else(|| panic!("{} is not in the table", step.key()));
            assert_eq!(def.kind, kind, "{}", step.key());
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
