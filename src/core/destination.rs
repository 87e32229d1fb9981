//! The destination's side of the migration hand-off (docs/handoff.md,
//! destination steps 2 to 6) as a plain state machine.
//!
//! The machine is fed [`Event`]s (connections opening and closing, the
//! requests that matter to the hand-off, and the outcomes of the effects it
//! asked for) and answers with [`Effect`]s, in the order they must happen.
//! It does no I/O and reads no clock: the caller passes the time in, carries
//! out the effects (see `handoff::Destination::execute`) and feeds back
//! their outcomes. So the real server and a simulator on virtual time drive
//! the same decisions.
//!
//! The orderings it encodes:
//! * the first data-changing request of a new sender connection rewrites the
//!   marker to `receiving`, durably, before its data is applied;
//! * ENTRUST: sync the image, then the marker says `entrusted`, then reply;
//! * DISCONNECT: sync, completion record, marker removal, complete;
//! * EOF, reset or timeout before DISCONNECT changes nothing;
//! * an invalid request never completes.

use std::collections::BTreeMap;

use crate::proto::errno;

/// A connection, as the caller names it. Ids must not be reused while the
/// machine lives: a new connection is a new sender.
pub type ConnId = u64;

/// What the marker says about the destination image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkerState {
    /// Data may be partial: the destination must not be served.
    Receiving,
    /// Every byte the source sent is durable; only the disconnect is missing.
    Entrusted,
}

impl MarkerState {
    pub fn name(self) -> &'static str {
        match self {
            MarkerState::Receiving => "receiving",
            MarkerState::Entrusted => "entrusted",
        }
    }
}

/// Why a connection ended before a DISCONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    Eof,
    Reset,
    Timeout,
}

/// A step that failed: the errno a client is answered with, and the text
/// for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub errno: u32,
    pub message: String,
}

impl Failure {
    pub fn new(errno: u32, message: impl Into<String>) -> Failure {
        Failure {
            errno,
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A sender connection began transmission; `source` is its address.
    Opened {
        conn: ConnId,
        source: String,
    },
    /// The connection ended without a DISCONNECT (or after one).
    Closed {
        conn: ConnId,
        why: CloseReason,
    },
    /// A data-changing request (WRITE, WRITE_ZEROES, TRIM) arrived and has
    /// not been applied; `bytes` is its payload length (0 without one).
    Change {
        conn: ConnId,
        bytes: u64,
    },
    /// ENTRUST arrived.
    Entrust {
        conn: ConnId,
    },
    /// A valid DISCONNECT arrived.
    Disconnect {
        conn: ConnId,
    },
    /// A request that is not valid (a bad magic); `errno` is its answer.
    Invalid {
        conn: ConnId,
        errno: u32,
    },
    SyncDone {
        conn: ConnId,
    },
    SyncFailed {
        conn: ConnId,
        failure: Failure,
    },
    MarkerPersisted {
        conn: ConnId,
    },
    MarkerFailed {
        conn: ConnId,
        failure: Failure,
    },
    RecordWritten {
        conn: ConnId,
    },
    RecordFailed {
        conn: ConnId,
        failure: Failure,
    },
    MarkerRemoved {
        conn: ConnId,
    },
    MarkerRemoveFailed {
        conn: ConnId,
        failure: Failure,
    },
}

/// The marker's content, as the machine decides it (the executor adds the
/// process id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkerWrite {
    pub state: MarkerState,
    pub source: Option<String>,
    /// Seconds since the epoch, from the time passed in.
    pub attempt_started: u64,
    pub bytes_received: u64,
}

/// The completion record's content, as the machine decides it (the executor
/// adds the process id and the image's identity).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordWrite {
    pub source: Option<String>,
    /// Seconds since the epoch, from the time passed in.
    pub completed_at: u64,
    pub bytes_received: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Write the marker durably; answer with `MarkerPersisted` or
    /// `MarkerFailed`.
    PersistMarker { conn: ConnId, marker: MarkerWrite },
    /// Apply the data-changing request that is waiting on `conn`.
    Apply { conn: ConnId },
    /// fdatasync the image; answer with `SyncDone` or `SyncFailed`.
    Sync { conn: ConnId },
    /// Answer the request waiting on `conn`: 0 is success, else an errno.
    Reply { conn: ConnId, errno: u32 },
    /// Write the completion record durably; answer with `RecordWritten` or
    /// `RecordFailed`.
    WriteRecord { conn: ConnId, record: RecordWrite },
    /// Remove the marker durably; answer with `MarkerRemoved` or
    /// `MarkerRemoveFailed`.
    RemoveMarker { conn: ConnId },
    /// The migration is complete: stop serving, exit 0.
    Complete,
    /// End the connection.
    Close { conn: ConnId },
    /// A line for the log.
    Log { level: Level, message: String },
}

impl Effect {
    /// Whether carrying it out is I/O whose outcome is fed back as an event.
    pub fn is_io(&self) -> bool {
        matches!(
            self,
            Effect::PersistMarker { .. }
                | Effect::Sync { .. }
                | Effect::WriteRecord { .. }
                | Effect::RemoveMarker { .. }
        )
    }
}

/// What a connection is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    None,
    /// A change waits for the `receiving` marker.
    Marking,
    EntrustSync,
    EntrustMarker,
    DisconnectSync,
    DisconnectRecord,
    DisconnectMarker,
}

#[derive(Debug)]
struct Conn {
    source: String,
    bytes_received: u64,
    pending: Pending,
    /// Ended while something was pending: outcomes still arrive, but
    /// nothing is answered on it any more.
    closed: bool,
}

/// The destination's hand-off state, for all its connections.
#[derive(Debug)]
pub struct Destination {
    conns: BTreeMap<ConnId, Conn>,
    /// The connection the marker last said `receiving` for; `None` until a
    /// connection changed data, and whenever the marker may say anything
    /// else (after ENTRUST, or a failed marker write).
    sender: Option<ConnId>,
    completed: bool,
}

impl Default for Destination {
    fn default() -> Self {
        Destination::new()
    }
}

impl Destination {
    /// A destination after start-up (step 1): whatever the marker says now,
    /// the first change of any connection rewrites it.
    pub fn new() -> Destination {
        Destination {
            conns: BTreeMap::new(),
            sender: None,
            completed: false,
        }
    }

    /// Whether a DISCONNECT completed the migration.
    pub fn is_complete(&self) -> bool {
        self.completed
    }

    /// The connection whose changes the marker covers now, if any.
    pub fn sender(&self) -> Option<ConnId> {
        self.sender
    }

    /// Payload bytes `conn` sent so far (recorded in the marker and record).
    pub fn bytes_received(&self, conn: ConnId) -> Option<u64> {
        self.conns.get(&conn).map(|c| c.bytes_received)
    }

    /// Feeds one event; `now` is seconds since the epoch. Returns the
    /// effects to carry out, in order.
    pub fn handle(&mut self, event: Event, now: u64) -> Vec<Effect> {
        match event {
            Event::Opened { conn, source } => {
                self.conns.insert(
                    conn,
                    Conn {
                        source,
                        bytes_received: 0,
                        pending: Pending::None,
                        closed: false,
                    },
                );
                vec![]
            }
            Event::Closed { conn, .. } => self.closed(conn),
            Event::Change { conn, bytes } => self.change(conn, bytes, now),
            Event::Entrust { conn } => self.start(conn, Pending::EntrustSync),
            Event::Disconnect { conn } => self.start(conn, Pending::DisconnectSync),
            Event::Invalid { conn, errno } => {
                vec![
                    Effect::Log {
                        level: Level::Error,
                        message: format!(
                            "invalid request from {}: answered {errno}, connection closed; it completes nothing",
                            self.source(conn)
                        ),
                    },
                    Effect::Reply { conn, errno },
                    Effect::Close { conn },
                ]
            }
            Event::SyncDone { conn } => self.sync_done(conn, now),
            Event::MarkerPersisted { conn } => self.marker_persisted(conn),
            Event::RecordWritten { conn } => self.advance(
                conn,
                Pending::DisconnectRecord,
                Pending::DisconnectMarker,
                vec![Effect::RemoveMarker { conn }],
            ),
            Event::MarkerRemoved { conn } => self.marker_removed(conn),
            Event::SyncFailed { conn, failure }
            | Event::MarkerFailed { conn, failure }
            | Event::RecordFailed { conn, failure }
            | Event::MarkerRemoveFailed { conn, failure } => self.failed(conn, failure),
        }
    }

    fn source(&self, conn: ConnId) -> String {
        self.conns
            .get(&conn)
            .map_or_else(|| format!("connection {conn}"), |c| c.source.clone())
    }

    fn closed(&mut self, conn: ConnId) -> Vec<Effect> {
        if self.sender == Some(conn) {
            self.sender = None;
        }
        match self.conns.get_mut(&conn) {
            // A DISCONNECT already received goes on to the end; anything
            // else pending is abandoned when its outcome arrives.
            Some(c) if c.pending != Pending::None => c.closed = true,
            _ => {
                self.conns.remove(&conn);
            }
        }
        vec![]
    }

    fn change(&mut self, conn: ConnId, bytes: u64, now: u64) -> Vec<Effect> {
        if self.completed {
            // Nothing changes a completed image.
            return self.refuse(conn, "a change");
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return self.refuse(conn, "a change");
        };
        c.bytes_received += bytes;
        if self.sender == Some(conn) {
            return vec![Effect::Apply { conn }];
        }
        c.pending = Pending::Marking;
        vec![Effect::PersistMarker {
            conn,
            marker: MarkerWrite {
                state: MarkerState::Receiving,
                source: Some(c.source.clone()),
                attempt_started: now,
                bytes_received: 0,
            },
        }]
    }

    fn start(&mut self, conn: ConnId, first: Pending) -> Vec<Effect> {
        if self.completed {
            return self.refuse(conn, "an ENTRUST or DISCONNECT");
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return self.refuse(conn, "an ENTRUST or DISCONNECT");
        };
        c.pending = first;
        vec![Effect::Sync { conn }]
    }

    /// A request after completion, or on a connection never opened: the
    /// connection ends and nothing changes.
    fn refuse(&self, conn: ConnId, what: &str) -> Vec<Effect> {
        let why = if self.completed {
            "the migration is complete"
        } else {
            "the connection was never opened"
        };
        vec![
            Effect::Log {
                level: Level::Error,
                message: format!(
                    "{what} from {} refused: {why}; closing the connection",
                    self.source(conn)
                ),
            },
            Effect::Close { conn },
        ]
    }

    fn sync_done(&mut self, conn: ConnId, now: u64) -> Vec<Effect> {
        let Some(c) = self.conns.get_mut(&conn) else {
            return vec![];
        };
        match c.pending {
            Pending::EntrustSync if c.closed => self.forget(conn),
            Pending::EntrustSync => {
                c.pending = Pending::EntrustMarker;
                // The marker is about to stop saying `receiving` for anyone.
                self.sender = None;
                vec![Effect::PersistMarker {
                    conn,
                    marker: MarkerWrite {
                        state: MarkerState::Entrusted,
                        source: Some(c.source.clone()),
                        attempt_started: now,
                        bytes_received: c.bytes_received,
                    },
                }]
            }
            Pending::DisconnectSync => {
                c.pending = Pending::DisconnectRecord;
                vec![Effect::WriteRecord {
                    conn,
                    record: RecordWrite {
                        source: Some(c.source.clone()),
                        completed_at: now,
                        bytes_received: c.bytes_received,
                    },
                }]
            }
            _ => vec![],
        }
    }

    fn marker_persisted(&mut self, conn: ConnId) -> Vec<Effect> {
        let Some(c) = self.conns.get_mut(&conn) else {
            return vec![];
        };
        match c.pending {
            Pending::Marking => {
                c.pending = Pending::None;
                if c.closed {
                    self.forget(conn);
                    // The marker says `receiving` for a connection that is
                    // gone: the next sender rewrites it anyway.
                    return vec![];
                }
                self.sender = Some(conn);
                vec![Effect::Apply { conn }]
            }
            Pending::EntrustMarker => {
                c.pending = Pending::None;
                if c.closed {
                    self.forget(conn);
                    return vec![];
                }
                let message = format!(
                    "entrusted by {}: image durable, marker says entrusted",
                    c.source
                );
                vec![
                    Effect::Log {
                        level: Level::Info,
                        message,
                    },
                    Effect::Reply { conn, errno: 0 },
                ]
            }
            _ => vec![],
        }
    }

    fn marker_removed(&mut self, conn: ConnId) -> Vec<Effect> {
        let Some(c) = self.conns.get_mut(&conn) else {
            return vec![];
        };
        if c.pending != Pending::DisconnectMarker {
            return vec![];
        }
        c.pending = Pending::None;
        let message = format!(
            "migration from {} complete: image durable, completion record written, marker removed",
            c.source
        );
        if c.closed {
            self.conns.remove(&conn);
        }
        self.completed = true;
        self.sender = None;
        vec![
            Effect::Log {
                level: Level::Info,
                message,
            },
            Effect::Complete,
            Effect::Close { conn },
        ]
    }

    /// Moves `conn` from `from` to `to` with `effects`; nothing when it is
    /// not at `from` (an outcome nobody waits for).
    fn advance(
        &mut self,
        conn: ConnId,
        from: Pending,
        to: Pending,
        effects: Vec<Effect>,
    ) -> Vec<Effect> {
        match self.conns.get_mut(&conn) {
            Some(c) if c.pending == from => {
                c.pending = to;
                effects
            }
            _ => vec![],
        }
    }

    fn failed(&mut self, conn: ConnId, failure: Failure) -> Vec<Effect> {
        let Some(c) = self.conns.get_mut(&conn) else {
            return vec![];
        };
        let pending = std::mem::replace(&mut c.pending, Pending::None);
        let closed = c.closed;
        let source = c.source.clone();
        if matches!(pending, Pending::Marking | Pending::EntrustMarker) {
            // A failed rewrite may or may not have replaced the marker:
            // the next change rewrites it whoever sends it.
            self.sender = None;
        }
        if closed {
            self.forget(conn);
        }
        let log = |message: String| Effect::Log {
            level: Level::Error,
            message,
        };
        let entrust = || log(format!("entrust from {source} failed: {}", failure.message));
        match pending {
            Pending::None => vec![],
            // The change cannot be applied without the marker: the
            // connection ends.
            Pending::Marking => vec![
                log(format!(
                    "cannot mark the destination receiving before a change from {source}: {}",
                    failure.message
                )),
                Effect::Close { conn },
            ],
            Pending::EntrustSync | Pending::EntrustMarker if closed => vec![entrust()],
            Pending::EntrustSync | Pending::EntrustMarker => vec![
                entrust(),
                Effect::Reply {
                    conn,
                    errno: if failure.errno == 0 {
                        errno::EIO
                    } else {
                        failure.errno
                    },
                },
            ],
            // No completion: the marker stays (or may), and the source
            // will retry from scratch.
            Pending::DisconnectSync | Pending::DisconnectRecord | Pending::DisconnectMarker => {
                vec![
                    log(format!(
                        "cannot complete the migration from {source}: {}",
                        failure.message
                    )),
                    Effect::Close { conn },
                ]
            }
        }
    }

    fn forget(&mut self, conn: ConnId) -> Vec<Effect> {
        self.conns.remove(&conn);
        vec![]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    /// A machine that ignores log lines, for exact effect sequences.
    struct M(Destination);

    impl M {
        fn new() -> M {
            M(Destination::new())
        }
        fn on(&mut self, event: Event) -> Vec<Effect> {
            self.0
                .handle(event, NOW)
                .into_iter()
                .filter(|e| !matches!(e, Effect::Log { .. }))
                .collect()
        }
        fn open(&mut self, conn: ConnId) {
            assert_eq!(
                self.on(Event::Opened {
                    conn,
                    source: source(conn)
                }),
                vec![]
            );
        }
    }

    fn source(conn: ConnId) -> String {
        format!("10.0.0.{conn}:5000")
    }

    fn receiving(conn: ConnId) -> Effect {
        Effect::PersistMarker {
            conn,
            marker: MarkerWrite {
                state: MarkerState::Receiving,
                source: Some(source(conn)),
                attempt_started: NOW,
                bytes_received: 0,
            },
        }
    }

    fn entrusted(conn: ConnId, bytes: u64) -> Effect {
        Effect::PersistMarker {
            conn,
            marker: MarkerWrite {
                state: MarkerState::Entrusted,
                source: Some(source(conn)),
                attempt_started: NOW,
                bytes_received: bytes,
            },
        }
    }

    fn record(conn: ConnId, bytes: u64) -> Effect {
        Effect::WriteRecord {
            conn,
            record: RecordWrite {
                source: Some(source(conn)),
                completed_at: NOW,
                bytes_received: bytes,
            },
        }
    }

    fn fail(e: u32) -> Failure {
        Failure::new(e, "injected")
    }

    /// A change on `conn` that needs the marker first, carried through.
    fn first_change(m: &mut M, conn: ConnId, bytes: u64) {
        assert_eq!(m.on(Event::Change { conn, bytes }), vec![receiving(conn)]);
        assert_eq!(
            m.on(Event::MarkerPersisted { conn }),
            vec![Effect::Apply { conn }]
        );
    }

    fn entrust(m: &mut M, conn: ConnId, bytes: u64) {
        assert_eq!(m.on(Event::Entrust { conn }), vec![Effect::Sync { conn }]);
        assert_eq!(m.on(Event::SyncDone { conn }), vec![entrusted(conn, bytes)]);
        assert_eq!(
            m.on(Event::MarkerPersisted { conn }),
            vec![Effect::Reply { conn, errno: 0 }]
        );
    }

    fn disconnect(m: &mut M, conn: ConnId, bytes: u64) {
        assert_eq!(
            m.on(Event::Disconnect { conn }),
            vec![Effect::Sync { conn }]
        );
        assert_eq!(m.on(Event::SyncDone { conn }), vec![record(conn, bytes)]);
        assert_eq!(
            m.on(Event::RecordWritten { conn }),
            vec![Effect::RemoveMarker { conn }]
        );
        assert_eq!(
            m.on(Event::MarkerRemoved { conn }),
            vec![Effect::Complete, Effect::Close { conn }]
        );
        assert!(m.0.is_complete());
    }

    #[test]
    fn the_first_change_of_each_sender_connection_marks_receiving_before_its_data() {
        let mut m = M::new();
        m.open(1);
        first_change(&mut m, 1, 4096);
        // Not again on the same connection.
        assert_eq!(
            m.on(Event::Change {
                conn: 1,
                bytes: 512
            }),
            vec![Effect::Apply { conn: 1 }]
        );
        assert_eq!(
            m.on(Event::Change { conn: 1, bytes: 0 }),
            vec![Effect::Apply { conn: 1 }]
        );
        assert_eq!(m.0.bytes_received(1), Some(4608));
        // A new sender connection: rewritten again before its data.
        m.open(2);
        first_change(&mut m, 2, 1);
        assert_eq!(m.0.sender(), Some(2));
        // Back on the first: the marker now names the second, so again.
        first_change(&mut m, 1, 1);
    }

    #[test]
    fn nothing_is_applied_while_the_receiving_marker_is_pending_or_failed() {
        let mut m = M::new();
        m.open(1);
        assert_eq!(
            m.on(Event::Change { conn: 1, bytes: 9 }),
            vec![receiving(1)]
        );
        assert_eq!(
            m.on(Event::MarkerFailed {
                conn: 1,
                failure: fail(errno::EIO)
            }),
            vec![Effect::Close { conn: 1 }]
        );
        assert_eq!(m.0.sender(), None);
        // Whoever changes data next rewrites the marker first.
        m.open(2);
        first_change(&mut m, 2, 1);
    }

    #[test]
    fn entrust_syncs_then_marks_entrusted_then_replies() {
        let mut m = M::new();
        m.open(1);
        first_change(&mut m, 1, 4096);
        entrust(&mut m, 1, 4096);
        assert!(!m.0.is_complete());
        // A change after ENTRUST must not sit beside an `entrusted` marker.
        first_change(&mut m, 1, 1);
    }

    #[test]
    fn entrust_with_a_failed_sync_answers_the_error_and_leaves_the_marker() {
        let mut m = M::new();
        m.open(1);
        first_change(&mut m, 1, 10);
        assert_eq!(
            m.on(Event::Entrust { conn: 1 }),
            vec![Effect::Sync { conn: 1 }]
        );
        assert_eq!(
            m.on(Event::SyncFailed {
                conn: 1,
                failure: fail(errno::ENOSPC)
            }),
            vec![Effect::Reply {
                conn: 1,
                errno: errno::ENOSPC
            }]
        );
        // The marker was not touched and still says `receiving` for this
        // sender: its next change goes straight on.
        assert_eq!(
            m.on(Event::Change { conn: 1, bytes: 1 }),
            vec![Effect::Apply { conn: 1 }]
        );
    }

    #[test]
    fn entrust_with_a_failed_marker_answers_an_error_never_success() {
        let mut m = M::new();
        m.open(1);
        first_change(&mut m, 1, 10);
        m.on(Event::Entrust { conn: 1 });
        m.on(Event::SyncDone { conn: 1 });
        assert_eq!(
            m.on(Event::MarkerFailed {
                conn: 1,
                failure: fail(0)
            }),
            vec![Effect::Reply {
                conn: 1,
                errno: errno::EIO
            }]
        );
        first_change(&mut m, 1, 1);
    }

    #[test]
    fn disconnect_syncs_records_removes_the_marker_then_completes() {
        let mut m = M::new();
        m.open(1);
        first_change(&mut m, 1, 100);
        entrust(&mut m, 1, 100);
        disconnect(&mut m, 1, 100);
        // Nothing changes a completed image.
        assert_eq!(
            m.on(Event::Change { conn: 1, bytes: 1 }),
            vec![Effect::Close { conn: 1 }]
        );
        m.open(2);
        assert_eq!(
            m.on(Event::Change { conn: 2, bytes: 1 }),
            vec![Effect::Close { conn: 2 }]
        );
    }

    #[test]
    fn disconnect_after_a_failed_step_does_not_complete() {
        type Step = fn(ConnId) -> Event;
        let failures: [(&[Step], Step); 3] = [
            (&[], |conn| Event::SyncFailed {
                conn,
                failure: fail(errno::EIO),
            }),
            (&[|conn| Event::SyncDone { conn }], |conn| {
                Event::RecordFailed {
                    conn,
                    failure: fail(errno::EIO),
                }
            }),
            (
                &[
                    |conn| Event::SyncDone { conn },
                    |conn| Event::RecordWritten { conn },
                ],
                |conn| Event::MarkerRemoveFailed {
                    conn,
                    failure: fail(errno::EIO),
                },
            ),
        ];
        for (before, failure) in failures {
            let mut m = M::new();
            m.open(1);
            first_change(&mut m, 1, 5);
            m.on(Event::Disconnect { conn: 1 });
            for step in before {
                m.on(step(1));
            }
            assert_eq!(m.on(failure(1)), vec![Effect::Close { conn: 1 }]);
            assert!(!m.0.is_complete());
            // A late outcome completes nothing either.
            assert_eq!(m.on(Event::MarkerRemoved { conn: 1 }), vec![]);
            assert!(!m.0.is_complete());
            // The source reconnects and completes from scratch.
            m.on(Event::Closed {
                conn: 1,
                why: CloseReason::Eof,
            });
            m.open(2);
            first_change(&mut m, 2, 7);
            disconnect(&mut m, 2, 7);
        }
    }

    #[test]
    fn eof_after_entrust_changes_nothing_and_a_new_connection_marks_again() {
        for why in [CloseReason::Eof, CloseReason::Reset, CloseReason::Timeout] {
            let mut m = M::new();
            m.open(1);
            first_change(&mut m, 1, 3);
            entrust(&mut m, 1, 3);
            assert_eq!(m.on(Event::Closed { conn: 1, why }), vec![]);
            assert!(!m.0.is_complete());
            m.open(2);
            first_change(&mut m, 2, 4);
            entrust(&mut m, 2, 4);
            disconnect(&mut m, 2, 4);
        }
    }

    #[test]
    fn a_connection_closed_during_entrust_gets_no_marker_and_no_reply() {
        let mut m = M::new();
        m.open(1);
        first_change(&mut m, 1, 3);
        m.on(Event::Entrust { conn: 1 });
        assert_eq!(
            m.on(Event::Closed {
                conn: 1,
                why: CloseReason::Reset
            }),
            vec![]
        );
        assert_eq!(m.on(Event::SyncDone { conn: 1 }), vec![]);
        assert!(!m.0.is_complete());
    }

    #[test]
    fn a_disconnect_received_completes_even_if_the_connection_then_ends() {
        let mut m = M::new();
        m.open(1);
        first_change(&mut m, 1, 3);
        m.on(Event::Disconnect { conn: 1 });
        m.on(Event::Closed {
            conn: 1,
            why: CloseReason::Eof,
        });
        assert_eq!(m.on(Event::SyncDone { conn: 1 }), vec![record(1, 3)]);
        m.on(Event::RecordWritten { conn: 1 });
        assert_eq!(
            m.on(Event::MarkerRemoved { conn: 1 }),
            vec![Effect::Complete, Effect::Close { conn: 1 }]
        );
        assert!(m.0.is_complete());
        assert_eq!(m.0.bytes_received(1), None, "forgotten once done");
    }

    #[test]
    fn an_invalid_request_never_completes() {
        let mut m = M::new();
        m.open(1);
        first_change(&mut m, 1, 3);
        entrust(&mut m, 1, 3);
        assert_eq!(
            m.on(Event::Invalid {
                conn: 1,
                errno: errno::EBADMSG
            }),
            vec![
                Effect::Reply {
                    conn: 1,
                    errno: errno::EBADMSG
                },
                Effect::Close { conn: 1 }
            ]
        );
        assert_eq!(
            m.on(Event::Closed {
                conn: 1,
                why: CloseReason::Eof
            }),
            vec![]
        );
        assert!(!m.0.is_complete());
        // Outcomes nobody asked for complete nothing.
        for event in [
            Event::SyncDone { conn: 1 },
            Event::RecordWritten { conn: 1 },
            Event::MarkerRemoved { conn: 1 },
        ] {
            assert_eq!(m.on(event), vec![]);
        }
        assert!(!m.0.is_complete());
    }

    #[test]
    fn an_old_source_without_entrust_completes_at_disconnect() {
        let mut m = M::new();
        m.open(1);
        first_change(&mut m, 1, 4096);
        m.on(Event::Change {
            conn: 1,
            bytes: 4096,
        });
        disconnect(&mut m, 1, 8192);
    }

    #[test]
    fn logs_say_what_happened() {
        let mut d = Destination::new();
        d.handle(
            Event::Opened {
                conn: 1,
                source: "s".into(),
            },
            NOW,
        );
        d.handle(Event::Entrust { conn: 1 }, NOW);
        let effects = d.handle(
            Event::SyncFailed {
                conn: 1,
                failure: fail(errno::EIO),
            },
            NOW,
        );
        assert!(
            matches!(&effects[0], Effect::Log { level: Level::Error, message } if message.contains("entrust from s failed: injected")),
            "{effects:?}"
        );
    }

    #[test]
    fn the_machine_can_move_between_threads() {
        fn is_send<T: Send>() {}
        is_send::<Destination>();
        is_send::<Effect>();
        is_send::<Event>();
    }
}
