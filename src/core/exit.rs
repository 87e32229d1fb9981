//! The process's exit status, from one table (pure: `daemon` decides what
//! ended the process and asks here what that means to a supervisor).

/// Which server this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Holds the canonical image and may migrate it away.
    Serve,
    /// A migration destination: exits 0 once a sender completes.
    Listen,
}

/// What ended the main loop.
#[derive(Debug)]
pub enum End {
    Signal(&'static str),
    HandedOff,
    HandOffFailed(String),
    MigratedIn,
}

/// Where a migration from this server stood when a signal ended it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorAtSignal {
    /// None was running.
    None,
    /// One was running and was stopped.
    Stopped,
    /// One was past the point of no return; it was let finish, and this is
    /// whether it handed the image off.
    HandedOff(bool),
}

/// The exit status, from one table: 0 only for a server stopped with
/// nothing left undone (a `serve` stopped by a signal with no migration
/// running), a source that handed its image off, or a destination that
/// received one. A supervisor must never take an aborted or failed
/// migration for a completed one.
pub fn exit_code(role: Role, end: &End, mirror: MirrorAtSignal) -> u8 {
    match (end, role, mirror) {
        (End::HandedOff | End::MigratedIn, _, _) => 0,
        (End::HandOffFailed(_), _, _) => 1,
        // A hand-off under way when the signal came decides by its outcome.
        (End::Signal(_), _, MirrorAtSignal::HandedOff(done)) => u8::from(!done),
        (End::Signal(_), _, MirrorAtSignal::Stopped) => 1,
        // A destination stopped before a completed migration.
        (End::Signal(_), Role::Listen, MirrorAtSignal::None) => 1,
        (End::Signal(_), Role::Serve, MirrorAtSignal::None) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_table() {
        use MirrorAtSignal as M;
        let signal = || End::Signal("SIGTERM");
        for role in [Role::Serve, Role::Listen] {
            for m in [M::None, M::Stopped, M::HandedOff(true), M::HandedOff(false)] {
                assert_eq!(exit_code(role, &End::HandedOff, m), 0);
                assert_eq!(exit_code(role, &End::MigratedIn, m), 0);
                assert_eq!(exit_code(role, &End::HandOffFailed("x".into()), m), 1);
            }
            assert_eq!(exit_code(role, &signal(), M::Stopped), 1);
            assert_eq!(exit_code(role, &signal(), M::HandedOff(true)), 0);
            assert_eq!(exit_code(role, &signal(), M::HandedOff(false)), 1);
        }
        // A destination stopped early never looks like a completed one.
        assert_eq!(exit_code(Role::Listen, &signal(), M::None), 1);
        assert_eq!(exit_code(Role::Serve, &signal(), M::None), 0);
    }
}
