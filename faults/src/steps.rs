//! The fault steps: every step a plan key may name, defined once.
//!
//! [`STEPS`] is the one table of the vocabulary. For each step it says which
//! side announces it, its name (a pattern whose last segment may be a
//! placeholder: `<n>` for a decimal NBD option number, `<cmd>` for one of
//! [`COMMANDS`]), what it carries ([`Kind`]), which actions make sense there,
//! which concrete names the fault matrix (`acceptance/matrix.rs`) exercises,
//! and what it is. The parser's idea of a known step ([`is_known_step`]),
//! the milestone rule ([`is_milestone`]), the matrix's step list and the
//! steps table in `fixtures/faults/README.md` ([`markdown_table`]) all come
//! from it; tests in the server crate check it against what the code
//! announces.

use std::fmt;

use crate::plan::Side;

/// The NBD command names a `<cmd>` placeholder stands for.
pub const COMMANDS: &[&str] = &[
    "read",
    "write",
    "disconnect",
    "flush",
    "trim",
    "cache",
    "write_zeroes",
    "block_status",
    "entrust",
    "checkpoint",
    "resume",
    "digest",
    "unknown",
];

/// What a step carries, which decides what an action can do there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No message of its own: a connection accepted or about to be made.
    Event,
    /// A message that has just arrived (announced after reading it).
    Incoming,
    /// A message about to be sent (announced before writing it).
    Outgoing,
    /// After a connection's last message, just before the process exits:
    /// nothing is left to drop, close, truncate, corrupt or hang.
    Milestone,
    /// A store operation (announced before it runs).
    Store,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Incoming => "incoming",
            Kind::Outgoing => "outgoing",
            Kind::Milestone => "milestone",
            Kind::Store => "store",
        }
    }
}

/// An action of the plan language, without its argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Pass,
    Drop,
    Close,
    Truncate,
    Hang,
    Delay,
    Corrupt,
    Crash,
    PowerCut,
    Eio,
    Enospc,
    Slow,
}

impl Act {
    /// Every action, in the order of [`crate::plan::ACTIONS`].
    pub const ALL: [Act; 12] = [
        Act::Pass,
        Act::Drop,
        Act::Close,
        Act::Truncate,
        Act::Hang,
        Act::Delay,
        Act::Corrupt,
        Act::Crash,
        Act::PowerCut,
        Act::Eio,
        Act::Enospc,
        Act::Slow,
    ];

    /// The name a plan spells it with.
    pub fn name(self) -> &'static str {
        match self {
            Act::Pass => "pass",
            Act::Drop => "drop",
            Act::Close => "close",
            Act::Truncate => "truncate",
            Act::Hang => "hang",
            Act::Delay => "delay",
            Act::Corrupt => "corrupt",
            Act::Crash => "crash",
            Act::PowerCut => "powercut",
            Act::Eio => "eio",
            Act::Enospc => "enospc",
            Act::Slow => "slow",
        }
    }
}

impl fmt::Display for Act {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where there is no message, `drop`, `truncate` and `corrupt` can only
/// close the connection: they add nothing to `close`.
const AT_EVENT: &[Act] = &[
    Act::Pass,
    Act::Close,
    Act::Hang,
    Act::Delay,
    Act::Crash,
    Act::PowerCut,
];
/// A received message has already been read off the wire: `truncate` and
/// `corrupt` damage bytes on the wire, which is the sender's step.
const AT_INCOMING: &[Act] = &[
    Act::Pass,
    Act::Drop,
    Act::Close,
    Act::Hang,
    Act::Delay,
    Act::Crash,
    Act::PowerCut,
];
const AT_OUTGOING: &[Act] = &[
    Act::Pass,
    Act::Drop,
    Act::Close,
    Act::Truncate,
    Act::Hang,
    Act::Delay,
    Act::Corrupt,
    Act::Crash,
    Act::PowerCut,
];
/// A payload has no magic: `corrupt` would flip a data byte NBD cannot
/// detect (TCP's checksum guards payloads), which is outside the contract.
const AT_PAYLOAD: &[Act] = &[
    Act::Pass,
    Act::Drop,
    Act::Close,
    Act::Truncate,
    Act::Hang,
    Act::Delay,
    Act::Crash,
    Act::PowerCut,
];
/// The plan language refuses every other action at a milestone.
const AT_MILESTONE: &[Act] = &[Act::Pass, Act::Delay, Act::Crash, Act::PowerCut];
const AT_STORE: &[Act] = &[
    Act::Pass,
    Act::Eio,
    Act::Enospc,
    Act::Slow,
    Act::Crash,
    Act::PowerCut,
];

/// One step of the vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepDef {
    /// Who announces it.
    pub side: Side,
    /// The step part of a key; its last segment may be `<n>` or `<cmd>`.
    pub pattern: &'static str,
    pub kind: Kind,
    /// The actions that make sense here (the parser admits more: every
    /// network action on a network step, every store fault on a store step,
    /// except at a milestone).
    pub actions: &'static [Act],
    /// The step names (placeholders filled in) the fault matrix runs; empty
    /// when it does not exercise this step.
    pub matrix: &'static [&'static str],
    /// One line: what the step is.
    pub about: &'static str,
}

impl StepDef {
    /// Whether `step` is this step (a placeholder matching its values).
    pub fn matches(&self, step: &str) -> bool {
        if let Some(prefix) = self.pattern.strip_suffix("<n>") {
            step.strip_prefix(prefix)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        } else if let Some(prefix) = self.pattern.strip_suffix("<cmd>") {
            step.strip_prefix(prefix)
                .is_some_and(|c| COMMANDS.contains(&c))
        } else {
            self.pattern == step
        }
    }

    /// The pattern without its placeholder (`reply_send.`), or `None` when
    /// it has none.
    pub fn prefix(&self) -> Option<&'static str> {
        self.pattern
            .strip_suffix("<n>")
            .or_else(|| self.pattern.strip_suffix("<cmd>"))
    }

    /// Whether `act` makes sense here.
    pub fn allows(&self, act: Act) -> bool {
        self.actions.contains(&act)
    }

    /// `side.pattern`, like `server.reply_send.<cmd>`.
    pub fn key(&self) -> String {
        format!("{}.{}", self.side, self.pattern)
    }
}

const fn step(
    side: Side,
    pattern: &'static str,
    kind: Kind,
    matrix: &'static [&'static str],
    about: &'static str,
) -> StepDef {
    let actions = match kind {
        Kind::Event => AT_EVENT,
        Kind::Incoming => AT_INCOMING,
        Kind::Outgoing => AT_OUTGOING,
        Kind::Milestone => AT_MILESTONE,
        Kind::Store => AT_STORE,
    };
    StepDef {
        side,
        pattern,
        kind,
        actions,
        matrix,
        about,
    }
}

/// A payload about to be sent: outgoing, but without a magic to corrupt.
const fn payload(
    side: Side,
    pattern: &'static str,
    matrix: &'static [&'static str],
    about: &'static str,
) -> StepDef {
    StepDef {
        actions: AT_PAYLOAD,
        ..step(side, pattern, Kind::Outgoing, matrix, about)
    }
}

use Kind::{Event, Incoming, Milestone, Outgoing, Store};
use Side::{Client, Control, Mirror, Proxy, Server};

/// Every fault step, by side in documentation order. Request steps of the
/// hand-off's own commands have names of their own (`entrust_received`,
/// not `request_received.entrust`).
pub const STEPS: &[StepDef] = &[
    // The NBD server role (`serve`, `listen`), a migration's destination.
    step(Server, "accept", Event, &["accept"], "a connection was accepted"),
    step(Server, "greeting_send", Outgoing, &["greeting_send"], "the greeting is about to be sent"),
    step(Server, "option_received.<n>", Incoming, &[], "a newstyle option and its data arrived"),
    step(Server, "option_reply_send.<n>", Outgoing, &[], "an option reply is about to be sent"),
    step(
        Server,
        "tls_handshake",
        Event,
        &[],
        "STARTTLS was acknowledged; the TLS handshake is about to begin",
    ),
    step(
        Server,
        "request_received.<cmd>",
        Incoming,
        &["request_received.write", "request_received.write_zeroes", "request_received.checkpoint", "request_received.resume"],
        "a request header arrived",
    ),
    step(
        Server,
        "payload_received.<cmd>",
        Incoming,
        &["payload_received.write"],
        "a write's payload arrived in full",
    ),
    step(
        Server,
        "reply_send.<cmd>",
        Outgoing,
        &["reply_send.write", "reply_send.write_zeroes", "reply_send.checkpoint", "reply_send.resume"],
        "a reply is about to be sent",
    ),
    step(Server, "entrust_received", Incoming, &["entrust_received"], "the source's ENTRUST arrived"),
    step(
        Server,
        "entrust_reply_send",
        Outgoing,
        &["entrust_reply_send"],
        "the reply to ENTRUST is about to be sent (the marker says entrusted)",
    ),
    step(
        Server,
        "disconnect_received",
        Incoming,
        &["disconnect_received"],
        "a DISCONNECT arrived",
    ),
    step(
        Server,
        "disconnect_done",
        Milestone,
        &["disconnect_done"],
        "a destination completed a migration (image synced, record written, marker removed) and goes on to exit",
    ),
    // The migration source's connection to the destination.
    step(Mirror, "connect", Event, &["connect"], "about to connect to the destination"),
    step(
        Mirror,
        "greeting_received",
        Incoming,
        &["greeting_received"],
        "the destination's greeting was read",
    ),
    step(
        Mirror,
        "request_send.<cmd>",
        Outgoing,
        &["request_send.write", "request_send.write_zeroes", "request_send.checkpoint", "request_send.resume"],
        "a request header is about to be sent",
    ),
    payload(
        Mirror,
        "payload_send.<cmd>",
        &["payload_send.write"],
        "a write's payload is about to be sent",
    ),
    step(
        Mirror,
        "reply_received.<cmd>",
        Incoming,
        &["reply_received.write", "reply_received.write_zeroes", "reply_received.checkpoint", "reply_received.resume"],
        "the reply to a request was read",
    ),
    step(Mirror, "entrust_send", Outgoing, &["entrust_send"], "ENTRUST is about to be sent"),
    step(
        Mirror,
        "entrust_reply_received",
        Incoming,
        &["entrust_reply_received"],
        "the reply to ENTRUST was read: the destination owns the image",
    ),
    step(
        Mirror,
        "disconnect_send",
        Outgoing,
        &["disconnect_send"],
        "DISCONNECT is about to be sent (after the unlink, with --unlink)",
    ),
    step(
        Mirror,
        "disconnect_sent",
        Milestone,
        &[],
        "the source's DISCONNECT went out and it goes on to exit",
    ),
    // The `read` / `write` commands.
    step(Client, "connect", Event, &[], "about to connect to the server"),
    step(Client, "greeting_received", Incoming, &[], "the server's greeting was read"),
    step(Client, "request_send.<cmd>", Outgoing, &[], "a request header is about to be sent"),
    payload(Client, "payload_send.<cmd>", &[], "a write's payload is about to be sent"),
    step(Client, "reply_received.<cmd>", Incoming, &[], "the reply to a request was read"),
    // The proxy: downstream (its client) like a server, upstream like a client.
    step(Proxy, "accept", Event, &[], "a downstream client was accepted"),
    step(Proxy, "greeting_send", Outgoing, &[], "the downstream greeting is about to be sent"),
    step(Proxy, "option_received.<n>", Incoming, &[], "a downstream newstyle option arrived"),
    step(Proxy, "option_reply_send.<n>", Outgoing, &[], "a downstream option reply is about to be sent"),
    step(Proxy, "request_received.<cmd>", Incoming, &[], "a downstream request header arrived"),
    step(Proxy, "payload_received.<cmd>", Incoming, &[], "a downstream write's payload arrived"),
    step(Proxy, "reply_send.<cmd>", Outgoing, &[], "a downstream reply is about to be sent"),
    step(Proxy, "connect", Event, &[], "about to connect upstream"),
    step(Proxy, "greeting_received", Incoming, &[], "the upstream greeting was read"),
    step(Proxy, "request_send.<cmd>", Outgoing, &[], "a request (with its payload) is about to go upstream"),
    step(Proxy, "reply_received.<cmd>", Incoming, &[], "an upstream reply was read"),
    // The control socket: the step is the command.
    step(Control, "acl", Incoming, &[], "the acl command arrived"),
    step(Control, "mirror", Incoming, &[], "the mirror command arrived"),
    step(Control, "mirror_speed", Incoming, &[], "the mirror_speed command arrived"),
    step(Control, "break", Incoming, &[], "the break command arrived"),
    step(
        Control,
        "mirror_wait",
        Incoming,
        &[],
        "the mirror_wait command arrived (a caller following a migration to its end)",
    ),
    step(Control, "status", Incoming, &[], "the status command arrived"),
    // The store: faults act before the operation.
    step(Side::Store, "read", Store, &[], "a read of the image"),
    step(Side::Store, "write", Store, &[], "a write, trim or zeroing of the image"),
    step(Side::Store, "sync", Store, &[], "an fdatasync of the image"),
    step(
        Side::Store,
        "marker",
        Store,
        &["marker"],
        "a rewrite or removal of a destination's .INCOMPLETE marker",
    ),
    step(
        Side::Store,
        "checkpoint",
        Store,
        &["checkpoint"],
        "a checkpoint's rewrite of a destination's .INCOMPLETE marker",
    ),
    step(
        Side::Store,
        "record",
        Store,
        &["record"],
        "the write or removal of a destination's .COMPLETE completion record",
    ),
    step(Side::Store, "unlink", Store, &["unlink"], "the source's --unlink of its image"),
    step(
        Side::Store,
        "map_scan",
        Store,
        &[],
        "the start of the scan that builds the allocation map (slow keeps it unbuilt that long, eio for good)",
    ),
];

/// The steps of one side.
pub fn on(side: Side) -> impl Iterator<Item = &'static StepDef> {
    STEPS.iter().filter(move |d| d.side == side)
}

/// The table entry for `side.step`, if the code is known to announce it.
pub fn find(side: Side, step: &str) -> Option<&'static StepDef> {
    on(side).find(|d| d.matches(step))
}

/// Whether `step` is a step the code is known to announce for `side` (a side
/// name, as in a key). A plan may name other steps, for code not written
/// yet; callers should warn about them (see
/// [`crate::FaultPlan::warnings`]), since such an entry never fires.
pub fn is_known_step(side: &str, step: &str) -> bool {
    Side::from_name(side).is_some_and(|side| find(side, step).is_some())
}

/// Whether `step` of a network side comes after a connection's last
/// message (`disconnect_done`, `disconnect_sent`). The name alone decides,
/// whatever the side, so no side can fire a fault there that cannot happen.
pub fn is_milestone(step: &str) -> bool {
    STEPS
        .iter()
        .any(|d| d.kind == Kind::Milestone && d.matches(step))
}

/// Every (side, step name) the fault matrix runs, in table order.
pub fn matrix() -> impl Iterator<Item = (&'static StepDef, &'static str)> {
    STEPS
        .iter()
        .flat_map(|d| d.matrix.iter().map(move |&name| (d, name)))
}

/// The table as Markdown, for `fixtures/faults/README.md`.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| side | step | kind | actions that make sense | in the matrix | what |\n\
         |---|---|---|---|---|---|\n",
    );
    for d in STEPS {
        let actions: Vec<&str> = d.actions.iter().map(|a| a.name()).collect();
        let matrix = if d.matrix.is_empty() {
            "no".to_string()
        } else if d.prefix().is_some() {
            let names: Vec<String> = d.matrix.iter().map(|m| format!("`{m}`")).collect();
            names.join(", ")
        } else {
            "yes".to_string()
        };
        out.push_str(&format!(
            "| `{}` | `{}` | {} | {} | {} | {} |\n",
            d.side,
            d.pattern,
            d.kind.name(),
            actions.join(", "),
            matrix,
            d.about
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The commands a migration's copy sends: the only ones the matrix can
    /// reach.
    const COPY_WRITES: [&str; 4] = ["write", "write_zeroes", "checkpoint", "resume"];

    #[test]
    fn patterns_are_unique_per_side_and_well_formed() {
        let mut seen = HashSet::new();
        for d in STEPS {
            assert!(seen.insert((d.side, d.pattern)), "{} twice", d.key());
            let plain = d
                .prefix()
                .map_or(d.pattern.to_string(), |p| format!("{p}x"));
            assert!(
                plain.split('.').all(|seg| !seg.is_empty()
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')),
                "{}: expected dotted lowercase segments, a placeholder only last",
                d.key()
            );
            assert!(!d.about.is_empty() && !d.about.contains('|'), "{}", d.key());
        }
    }

    #[test]
    fn every_side_has_steps() {
        for side in Side::ALL {
            assert!(on(side).next().is_some(), "no step for {side}");
        }
    }

    #[test]
    fn kinds_follow_the_side() {
        for d in STEPS {
            assert_eq!(
                d.side == Side::Store,
                d.kind == Kind::Store,
                "{}: store steps, and only they, are of kind store",
                d.key()
            );
        }
    }

    #[test]
    fn actions_are_the_plan_languages_and_admitted_by_the_parser() {
        let names: Vec<&str> = Act::ALL.iter().map(|a| a.name()).collect();
        assert_eq!(names, crate::plan::ACTIONS);
        for d in STEPS {
            assert!(d.allows(Act::Pass) && d.allows(Act::Crash), "{}", d.key());
            for &act in d.actions {
                let arg = match act {
                    Act::Truncate => "(4)",
                    Act::Delay | Act::Slow => "(1)",
                    _ => "",
                };
                let step =
                    d.prefix()
                        .map_or(d.pattern.to_string(), |p| match &d.pattern[p.len()..] {
                            "<n>" => format!("{p}7"),
                            _ => format!("{p}write"),
                        });
                let text = format!("{}.{step}={act}{arg}", d.side);
                let plan = crate::FaultPlan::parse(&text)
                    .unwrap_or_else(|e| panic!("{text}: the table allows it, the parser says {e}"));
                assert!(plan.warnings().is_empty(), "{text}: {:?}", plan.warnings());
            }
        }
    }

    #[test]
    fn matrix_names_fill_the_pattern_with_copy_commands() {
        for (d, name) in matrix() {
            assert!(d.matches(name), "{} lists {name} for the matrix", d.key());
            if let Some(prefix) = d.prefix() {
                let filled = &name[prefix.len()..];
                assert!(
                    COPY_WRITES.contains(&filled),
                    "{name}: expected one of {COPY_WRITES:?}, the commands a migration's copy sends"
                );
            }
        }
        let sides: HashSet<Side> = matrix().map(|(d, _)| d.side).collect();
        assert_eq!(
            sides,
            HashSet::from([Side::Server, Side::Mirror, Side::Store]),
            "the matrix runs a migration: its destination, its source and their store"
        );
    }

    #[test]
    fn known_steps_are_per_side() {
        for (side, step) in [
            ("server", "accept"),
            ("server", "reply_send.write"),
            ("server", "option_received.7"),
            ("server", "entrust_received"),
            ("mirror", "payload_send.write"),
            ("mirror", "entrust_reply_received"),
            ("client", "reply_received.block_status"),
            ("proxy", "option_reply_send.3"),
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
            ("server", "connect"),
            ("mirror", "accept"),
            ("client", "entrust_send"),
            ("store", "reply_send.write"),
            ("control", "accept"),
            ("nobody", "accept"),
        ] {
            assert!(!is_known_step(side, step), "{side}.{step}");
        }
    }

    #[test]
    fn milestones_are_the_milestone_kind() {
        assert!(is_milestone("disconnect_done"));
        assert!(is_milestone("disconnect_sent"));
        assert!(!is_milestone("disconnect_send"));
        assert!(!is_milestone("accept"));
    }

    const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/faults/README.md");
    const BEGIN: &str = "<!-- steps:begin (generated by faults::steps::markdown_table) -->\n";
    const END: &str = "<!-- steps:end -->";

    /// `FLEXNBD_UPDATE_DOCS=1 cargo test -p faults docs` rewrites the table.
    #[test]
    fn docs_steps_table_matches_the_vocabulary() {
        let text = std::fs::read_to_string(README).expect("fixtures/faults/README.md");
        let table = markdown_table();
        let (before, rest) = text
            .split_once(BEGIN)
            .unwrap_or_else(|| panic!("fixtures/faults/README.md: expected the marker {BEGIN}"));
        let (current, after) = rest
            .split_once(END)
            .unwrap_or_else(|| panic!("fixtures/faults/README.md: expected the marker {END}"));
        if current == table {
            return;
        }
        if std::env::var_os("FLEXNBD_UPDATE_DOCS").is_some() {
            std::fs::write(README, format!("{before}{BEGIN}{table}{END}{after}"))
                .expect("rewriting fixtures/faults/README.md");
            return;
        }
        panic!(
            "fixtures/faults/README.md: the steps table differs from faults::steps::STEPS.\n\
             Expected:\n{table}\nFound:\n{current}\n\
             Update it with: FLEXNBD_UPDATE_DOCS=1 cargo test -p faults docs"
        );
    }
}
