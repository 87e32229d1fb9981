//! Protocol steps, announced by the connection code to a probe.
//!
//! Send-side steps are announced just before the message goes out, so the
//! probe's verdict can drop, truncate or corrupt it; receive-side steps are
//! announced just after the message arrived. In production the probe is
//! [`Quiet`], whose answer is a constant `Pass` that the compiler folds away.

pub use faults::Action;

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
}

impl Step {
    /// A stable name for log lines and fault plans, like `reply_send.write`.
    pub fn name(&self) -> String {
        use crate::proto::cmd;
        match self {
            Step::Accept => "accept".into(),
            Step::GreetingSend => "greeting_send".into(),
            Step::OptionReceived { option } => format!("option_received.{option}"),
            Step::OptionReplySend { option } => format!("option_reply_send.{option}"),
            Step::RequestReceived { kind } => format!("request_received.{}", cmd::name(*kind)),
            Step::PayloadReceived { kind } => format!("payload_received.{}", cmd::name(*kind)),
            Step::ReplySend { kind } => format!("reply_send.{}", cmd::name(*kind)),
        }
    }
}

/// Receives every protocol step and decides what happens to its message.
pub trait Probe: Send + Sync + 'static {
    fn step(&self, step: Step) -> Action;
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
