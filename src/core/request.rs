//! What a client request needs before its reply, for durability: the same
//! answer for `serve` and `listen`. The planner says WHAT must be done (and
//! durable) before WHICH reply; how requests are grouped (batched writes,
//! syncs run on their own tasks) is the executor's business.

use crate::proto::{cmd, cmd_flags};

/// One step of a request, in the order of its plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Carry the request out on the image: store a write, zero or trim a
    /// range, read, prefetch, look up the allocation.
    Apply,
    /// fdatasync the image.
    Sync,
    /// Answer the client.
    Reply,
}

/// The requests the planner tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// WRITE, WRITE_ZEROES, TRIM: changes the image.
    Change,
    /// READ, CACHE, BLOCK_STATUS: looks at the image.
    Look,
    /// FLUSH.
    Flush,
    /// DISCONNECT and ENTRUST: the hand-off decides (core::destination).
    HandOff,
    /// Anything else: answered with an error.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub class: Class,
    /// The steps, in order.
    pub steps: &'static [Step],
}

const APPLY_REPLY: &[Step] = &[Step::Apply, Step::Reply];
const APPLY_SYNC_REPLY: &[Step] = &[Step::Apply, Step::Sync, Step::Reply];
const SYNC_REPLY: &[Step] = &[Step::Sync, Step::Reply];
const REPLY: &[Step] = &[Step::Reply];
const NOTHING: &[Step] = &[];

impl Plan {
    /// Whether the request changes the image (and so needs the hand-off's
    /// `receiving` marker first, and the migration's pacing).
    pub fn changes_data(&self) -> bool {
        self.class == Class::Change
    }

    /// Whether a sync must complete between applying the request and its
    /// reply (FUA).
    pub fn sync_before_reply(&self) -> bool {
        self.steps == APPLY_SYNC_REPLY
    }
}

/// The plan of a request of type `kind` with `flags`.
pub fn plan(kind: u16, flags: u16) -> Plan {
    let fua = flags & cmd_flags::FUA != 0;
    match kind {
        cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM => Plan {
            class: Class::Change,
            steps: if fua { APPLY_SYNC_REPLY } else { APPLY_REPLY },
        },
        cmd::READ | cmd::CACHE | cmd::BLOCK_STATUS => Plan {
            class: Class::Look,
            steps: APPLY_REPLY,
        },
        cmd::FLUSH => Plan {
            class: Class::Flush,
            steps: SYNC_REPLY,
        },
        // Their order (sync, marker, reply or record) is the hand-off's.
        cmd::DISC | cmd::ENTRUST => Plan {
            class: Class::HandOff,
            steps: NOTHING,
        },
        _ => Plan {
            class: Class::Unknown,
            steps: REPLY,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_with_fua_are_durable_before_their_reply() {
        for kind in [cmd::WRITE, cmd::WRITE_ZEROES, cmd::TRIM] {
            let p = plan(kind, cmd_flags::FUA);
            assert_eq!(p.steps, &[Step::Apply, Step::Sync, Step::Reply]);
            assert!(p.changes_data() && p.sync_before_reply(), "{kind}");
            // Other flags do not take the sync away.
            let p = plan(kind, cmd_flags::FUA | cmd_flags::NO_HOLE);
            assert!(p.sync_before_reply());
        }
    }

    #[test]
    fn plain_changes_reply_once_applied() {
        for kind in [cmd::WRITE, cmd::WRITE_ZEROES, cmd::TRIM] {
            let p = plan(kind, cmd_flags::NO_HOLE);
            assert_eq!(p.steps, &[Step::Apply, Step::Reply]);
            assert!(p.changes_data() && !p.sync_before_reply(), "{kind}");
        }
    }

    #[test]
    fn flush_syncs_then_replies() {
        let p = plan(cmd::FLUSH, 0);
        assert_eq!(p.steps, &[Step::Sync, Step::Reply]);
        assert!(!p.changes_data() && !p.sync_before_reply());
    }

    #[test]
    fn reads_change_nothing_and_never_sync() {
        for kind in [cmd::READ, cmd::CACHE, cmd::BLOCK_STATUS] {
            // FUA on a read means nothing.
            let p = plan(kind, cmd_flags::FUA);
            assert_eq!(p.class, Class::Look);
            assert_eq!(p.steps, &[Step::Apply, Step::Reply]);
            assert!(!p.changes_data() && !p.sync_before_reply());
        }
    }

    #[test]
    fn the_hand_off_and_unknown_commands() {
        assert_eq!(plan(cmd::DISC, 0).class, Class::HandOff);
        assert_eq!(plan(cmd::ENTRUST, 0).class, Class::HandOff);
        assert!(plan(cmd::DISC, 0).steps.is_empty());
        let p = plan(42, cmd_flags::FUA);
        assert_eq!((p.class, p.steps), (Class::Unknown, &[Step::Reply][..]));
        assert!(!p.changes_data());
    }
}
