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
//! * an invalid request never completes;
//! * CHECKPOINT: sync the image, then the marker names the migration and
//!   the checkpoint, then reply; the checkpoint is held from then on;
//! * a new sender connection's first change keeps the held checkpoint only
//!   when that connection asked RESUME for its migration; otherwise the
//!   marker drops it, durably, before the change is applied;
//! * marker operations (writes and the removal) are numbered in the order
//!   they are decided, and the marker ends as the latest one: the executor
//!   carries them out one at a time and skips one older than a write or
//!   removal already done, and the machine believes an operation reported
//!   done only when no later one was decided since.

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
    /// ENTRUST arrived. `told` is its offset field: what it says of the
    /// changes sent before it on the connection ([`entrust_offset`]; 0
    /// says nothing). `size` is the export size it is reckoned against.
    Entrust {
        conn: ConnId,
        told: u64,
        size: u64,
    },
    /// A change of the connection failed (it was answered an error, or
    /// would have been): nothing after it on the connection may be
    /// entrusted.
    ChangeFailed {
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
    /// The resume query: the connection now belongs to `migration`.
    Resume {
        conn: ConnId,
        migration: u64,
    },
    /// CHECKPOINT `checkpoint` of `migration` arrived (no write of the
    /// connection outstanding).
    Checkpoint {
        conn: ConnId,
        migration: u64,
        checkpoint: u64,
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
    /// The resume part, (migration, checkpoint): the executor adds the
    /// image's identity. `None` writes a marker that holds no checkpoint.
    pub resume: Option<(u64, u64)>,
    /// Whether this is a checkpoint's rewrite (fault plans name it
    /// `store.checkpoint`, apart from the marker's other rewrites).
    pub for_checkpoint: bool,
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
    /// `MarkerFailed`. `generation` numbers the marker operations in the
    /// order decided: one older than an operation already carried out is
    /// skipped (no I/O) and answered `MarkerPersisted`.
    PersistMarker {
        conn: ConnId,
        generation: u64,
        marker: MarkerWrite,
    },
    /// Apply the data-changing request that is waiting on `conn`.
    Apply { conn: ConnId },
    /// fdatasync the image; answer with `SyncDone` or `SyncFailed`.
    Sync { conn: ConnId },
    /// Answer the request waiting on `conn`: 0 is success, else an errno.
    Reply { conn: ConnId, errno: u32 },
    /// Answer the resume query waiting on `conn`: success, and the
    /// checkpoint held for its migration (0 for none).
    ResumeReply { conn: ConnId, checkpoint: u64 },
    /// Write the completion record durably; answer with `RecordWritten` or
    /// `RecordFailed`.
    WriteRecord { conn: ConnId, record: RecordWrite },
    /// Remove the marker durably; answer with `MarkerRemoved` or
    /// `MarkerRemoveFailed`. `generation` as for `PersistMarker` (skipped
    /// alike, answered `MarkerRemoved`).
    RemoveMarker { conn: ConnId, generation: u64 },
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
    /// CHECKPOINT (migration, checkpoint): the image's sync, then the marker.
    CheckpointSync(u64, u64),
    CheckpointMarker(u64, u64),
}

#[derive(Debug)]
struct Conn {
    source: String,
    bytes_received: u64,
    pending: Pending,
    /// The migration this connection belongs to: the one it asked RESUME
    /// for, or checkpointed. Only such a connection's changes may leave
    /// that migration's checkpoint in the marker.
    migration: Option<u64>,
    /// Ended while something was pending: outcomes still arrive, but
    /// nothing is answered on it any more.
    closed: bool,
    /// The generation of the connection's latest marker operation (0 for
    /// none): while it is pending, the one its outcome is about.
    generation: u64,
    /// For a change waiting for its `receiving` rewrite: a marker operation
    /// decided since would leave the change's data beside a marker that
    /// must not sit beside it (see [`safe_beside`]).
    overtaken: bool,
    /// Changes that arrived on the connection, and whether one failed:
    /// what an ENTRUST is checked against.
    changes: u64,
    change_failed: bool,
    /// Its CHECKPOINT is pending and it was the sender when it came: its
    /// changes go on being applied meanwhile (see [`Destination::change`]).
    checkpointing_sender: bool,
}

/// ENTRUST's offset field for a source that sent `changes` changes (WRITE,
/// WRITE_ZEROES, TRIM) on the connection before it, to an export of `size`
/// bytes: 1 + the count modulo the size. A source sends ENTRUST right behind
/// its last changes, without waiting for their replies, so the destination
/// must be able to tell that none went missing on the way. The count is
/// reduced modulo the size so that the request stays in range: a C flexnbd
/// checks the range before the command type, and must answer EINVAL (an old
/// destination) rather than ENOSPC. 0 tells nothing: a source that waited
/// for every reply first (and an export of 0 bytes, which takes no change).
pub fn entrust_offset(changes: u64, size: u64) -> u64 {
    if size == 0 {
        0
    } else {
        1 + changes % size
    }
}

/// Whether data sent by a connection belonging to `migration` may sit
/// beside the marker `next` (`None`: the marker removed). Only a
/// `receiving` marker allows changes, and only without a checkpoint or
/// with one of the connection's own migration: the rule of a first change
/// (a checkpoint survives only data its own migration sends). An
/// `entrusted` marker promises that no data changed after its sync; a
/// removed one, that the image is complete.
fn safe_beside(next: Option<&MarkerWrite>, migration: Option<u64>) -> bool {
    match next {
        Some(MarkerWrite {
            state: MarkerState::Receiving,
            resume,
            ..
        }) => resume.is_none_or(|(held, _)| migration == Some(held)),
        _ => false,
    }
}

/// The destination's hand-off state, for all its connections.
#[derive(Debug)]
pub struct Destination {
    conns: BTreeMap<ConnId, Conn>,
    /// The connection the marker last said `receiving` for; `None` until a
    /// connection changed data, and whenever the marker may say anything
    /// else (after ENTRUST, or a failed marker write).
    sender: Option<ConnId>,
    /// The (migration, checkpoint) the marker durably holds, as far as
    /// this machine can tell; `None` whenever it may hold none (a marker
    /// write that failed may have left either content).
    held: Option<(u64, u64)>,
    completed: bool,
    /// The generation of the latest marker operation decided (0: none yet;
    /// start-up's own writes come before all). An operation reported done
    /// with an older generation was superseded: the marker ends as a later
    /// decision, not as it.
    decided: u64,
}

impl Default for Destination {
    fn default() -> Self {
        Destination::new(None)
    }
}

impl Destination {
    /// A destination after start-up (step 1): whatever the marker says now,
    /// the first change of any connection rewrites it. `held` is the
    /// (migration, checkpoint) the marker durably holds, already checked
    /// to belong to the image file.
    pub fn new(held: Option<(u64, u64)>) -> Destination {
        Destination {
            conns: BTreeMap::new(),
            sender: None,
            held,
            completed: false,
            decided: 0,
        }
    }

    /// The (migration, checkpoint) the marker durably holds, if any.
    pub fn held(&self) -> Option<(u64, u64)> {
        self.held
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
                        migration: None,
                        closed: false,
                        generation: 0,
                        overtaken: false,
                        changes: 0,
                        change_failed: false,
                        checkpointing_sender: false,
                    },
                );
                vec![]
            }
            Event::Closed { conn, .. } => self.closed(conn),
            Event::Change { conn, bytes } => self.change(conn, bytes, now),
            Event::Entrust { conn, told, size } => self.entrust(conn, told, size),
            Event::ChangeFailed { conn } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.change_failed = true;
                }
                vec![]
            }
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
            Event::Resume { conn, migration } => self.resume(conn, migration),
            Event::Checkpoint {
                conn,
                migration,
                checkpoint,
            } => self.checkpoint(conn, migration, checkpoint),
            Event::SyncDone { conn } => self.sync_done(conn, now),
            Event::MarkerPersisted { conn } => self.marker_persisted(conn),
            Event::RecordWritten { conn } => self.record_written(conn),
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
        c.changes += 1;
        // A source sends its checkpoint without waiting for the answer and
        // goes on sending while the image syncs. The marker says
        // `receiving` for this connection before, during and after the
        // checkpoint's rewrite (which only adds this migration's
        // checkpoint), so its changes need no rewrite of their own; one
        // would supersede the checkpoint.
        let checkpointing = c.checkpointing_sender
            && matches!(
                c.pending,
                Pending::CheckpointSync(..) | Pending::CheckpointMarker(..)
            );
        if self.sender == Some(conn) || checkpointing {
            return vec![Effect::Apply { conn }];
        }
        c.pending = Pending::Marking;
        // The held checkpoint survives only data its own migration sends.
        let keep = self
            .held
            .filter(|&(migration, _)| c.migration == Some(migration));
        let marker = MarkerWrite {
            state: MarkerState::Receiving,
            source: Some(c.source.clone()),
            attempt_started: now,
            bytes_received: 0,
            resume: keep,
            for_checkpoint: false,
        };
        let mut effects = Vec::new();
        if let (Some((migration, checkpoint)), None) = (self.held, keep) {
            // Forgotten now, not once the marker is written: from here on
            // the marker may say either.
            self.held = None;
            effects.push(Effect::Log {
                level: Level::Info,
                message: format!(
                    "a change from {}, which did not resume migration {migration:016x}: the marker drops its checkpoint {checkpoint} before the change",
                    c.source
                ),
            });
        }
        effects.extend(self.persist(conn, marker));
        effects
    }

    /// Decides a marker operation of `conn`: `next` is what the marker is
    /// to say (`None`: removed). Returns its generation, and marks every
    /// change still waiting for its own rewrite whose data must not sit
    /// beside `next` as overtaken.
    fn decide(&mut self, conn: ConnId, next: Option<&MarkerWrite>) -> u64 {
        self.decided += 1;
        let generation = self.decided;
        for (&id, c) in &mut self.conns {
            if id == conn {
                c.generation = generation;
                c.overtaken = false;
            } else if c.pending == Pending::Marking && !safe_beside(next, c.migration) {
                c.overtaken = true;
            }
        }
        generation
    }

    /// Decides a marker write of `conn`.
    fn persist(&mut self, conn: ConnId, marker: MarkerWrite) -> Vec<Effect> {
        let generation = self.decide(conn, Some(&marker));
        vec![Effect::PersistMarker {
            conn,
            generation,
            marker,
        }]
    }

    /// The resume query: answers the checkpoint held for `migration` (0
    /// for none), and the connection belongs to that migration from now on.
    fn resume(&mut self, conn: ConnId, migration: u64) -> Vec<Effect> {
        let Some(c) = self.conns.get_mut(&conn) else {
            return self.refuse(conn, "a resume query");
        };
        c.migration = Some(migration);
        let checkpoint = match self.held {
            Some((held, checkpoint)) if held == migration => checkpoint,
            _ => 0,
        };
        vec![Effect::ResumeReply { conn, checkpoint }]
    }

    fn checkpoint(&mut self, conn: ConnId, migration: u64, checkpoint: u64) -> Vec<Effect> {
        if self.completed {
            // The marker is gone: a checkpoint must not bring it back
            // beside a complete image.
            return self.refuse(conn, "a checkpoint");
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return self.refuse(conn, "a checkpoint");
        };
        if migration == 0 || checkpoint == 0 {
            return vec![
                Effect::Log {
                    level: Level::Error,
                    message: format!(
                        "checkpoint from {} refused: expected a migration id and a checkpoint number other than 0, got migration {migration:016x} checkpoint {checkpoint}; answered EINVAL",
                        c.source
                    ),
                },
                Effect::Reply {
                    conn,
                    errno: errno::EINVAL,
                },
            ];
        }
        c.pending = Pending::CheckpointSync(migration, checkpoint);
        c.checkpointing_sender =
            self.sender == Some(conn) && c.migration.is_none_or(|m| m == migration);
        vec![Effect::Sync { conn }]
    }

    /// ENTRUST vouches for every change before it on the connection, so it
    /// is refused (EIO; the source retries) when one of them failed or did
    /// not arrive, whatever the reply of the change said or whether it
    /// reached the source.
    fn entrust(&mut self, conn: ConnId, told: u64, size: u64) -> Vec<Effect> {
        let why = match self.conns.get(&conn) {
            Some(c) if c.change_failed => {
                Some("a change before it on the connection failed".into())
            }
            Some(c) if told != 0 && told != entrust_offset(c.changes, size) => Some(format!(
                "its offset is {told}, but the {} changes that arrived on the connection give {} \
                 (1 + their count modulo the size, {size}): a change went missing",
                c.changes,
                entrust_offset(c.changes, size)
            )),
            _ => None,
        };
        match why {
            Some(why) if !self.completed => vec![
                Effect::Log {
                    level: Level::Error,
                    message: format!(
                        "entrust from {} refused: {why}; not entrusted, answered EIO",
                        self.source(conn)
                    ),
                },
                Effect::Reply {
                    conn,
                    errno: errno::EIO,
                },
            ],
            _ => self.start(conn, Pending::EntrustSync),
        }
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
                let marker = MarkerWrite {
                    state: MarkerState::Entrusted,
                    source: Some(c.source.clone()),
                    attempt_started: now,
                    bytes_received: c.bytes_received,
                    // Entrusting changes no data: what is held stays.
                    resume: self.held,
                    for_checkpoint: false,
                };
                self.persist(conn, marker)
            }
            Pending::CheckpointSync(..) if c.closed => self.forget(conn),
            Pending::CheckpointSync(migration, checkpoint) => {
                c.pending = Pending::CheckpointMarker(migration, checkpoint);
                // Until the marker is written, whoever changes data
                // rewrites it first (and drops any checkpoint it did not
                // resume).
                self.sender = None;
                let marker = MarkerWrite {
                    state: MarkerState::Receiving,
                    source: Some(c.source.clone()),
                    attempt_started: now,
                    bytes_received: c.bytes_received,
                    resume: Some((migration, checkpoint)),
                    for_checkpoint: true,
                };
                self.persist(conn, marker)
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

    /// A marker write is durable (or was skipped, a later one being
    /// durable already). When another marker operation was decided since,
    /// the marker ends as that later decision, not as this write: nothing
    /// is believed of what this one wrote.
    fn marker_persisted(&mut self, conn: ConnId) -> Vec<Effect> {
        let latest = self.decided;
        let Some(c) = self.conns.get_mut(&conn) else {
            return vec![];
        };
        let superseded = c.generation < latest;
        let log = |level, message| Effect::Log { level, message };
        match c.pending {
            Pending::Marking => {
                c.pending = Pending::None;
                if c.closed {
                    self.forget(conn);
                    // The marker says `receiving` for a connection that is
                    // gone: the next sender rewrites it anyway.
                    return vec![];
                }
                if !superseded {
                    self.sender = Some(conn);
                    return vec![Effect::Apply { conn }];
                }
                if c.overtaken {
                    // A later decision says `entrusted`, removes the marker,
                    // or holds a checkpoint of a migration this connection
                    // does not belong to: its data must not land under it.
                    // As when the rewrite fails, the change is not applied
                    // and the connection ends.
                    return vec![
                        log(
                            Level::Error,
                            format!(
                                "a change from {} is not applied: the marker was decided again after its receiving rewrite (an entrust, a checkpoint of another migration or the removal); closing the connection",
                                c.source
                            ),
                        ),
                        Effect::Close { conn },
                    ];
                }
                // Superseded, but safe: once this write is reported done the
                // marker holds this decision or a later one for good (the
                // executor skips an older operation only after a later one
                // was written, and writes only newer ones after it), and
                // every decision since is a `receiving` marker this data
                // may sit beside (not overtaken). So the change goes on; but
                // the marker ends naming another connection, which stays
                // the sender, and this one's next change rewrites it again.
                vec![Effect::Apply { conn }]
            }
            Pending::EntrustMarker => {
                c.pending = Pending::None;
                if c.closed {
                    self.forget(conn);
                    return vec![];
                }
                if superseded {
                    // The marker ends as a later decision (another
                    // connection's change or checkpoint, whose data may
                    // follow): it does not stay `entrusted` beside the data
                    // entrusted. The source retries.
                    return vec![
                        log(
                            Level::Error,
                            format!(
                                "entrust from {} failed: the marker was decided again after it was to say entrusted; answered EIO",
                                c.source
                            ),
                        ),
                        Effect::Reply {
                            conn,
                            errno: errno::EIO,
                        },
                    ];
                }
                let message = format!(
                    "entrusted by {}: image durable, marker says entrusted",
                    c.source
                );
                vec![log(Level::Info, message), Effect::Reply { conn, errno: 0 }]
            }
            Pending::CheckpointMarker(migration, checkpoint) => {
                c.pending = Pending::None;
                if superseded {
                    // The marker ends as a later decision (a change that
                    // dropped the checkpoint, say): `held` stays as that
                    // decision left it, the connection does not become the
                    // sender, and the source is not told the checkpoint is
                    // held.
                    if c.closed {
                        self.forget(conn);
                        return vec![];
                    }
                    return vec![
                        log(
                            Level::Error,
                            format!(
                                "checkpoint {checkpoint} of migration {migration:016x} from {} failed: the marker was decided again after it was to hold it; not held, answered EIO",
                                c.source
                            ),
                        ),
                        Effect::Reply {
                            conn,
                            errno: errno::EIO,
                        },
                    ];
                }
                // Durable whether or not anyone is left to answer.
                self.held = Some((migration, checkpoint));
                if c.closed {
                    self.forget(conn);
                    return vec![];
                }
                c.migration = Some(migration);
                // The marker now says `receiving` for this connection.
                self.sender = Some(conn);
                let message = format!(
                    "checkpoint {checkpoint} of migration {migration:016x} from {}: image durable, marker holds it",
                    c.source
                );
                vec![log(Level::Info, message), Effect::Reply { conn, errno: 0 }]
            }
            _ => vec![],
        }
    }

    fn marker_removed(&mut self, conn: ConnId) -> Vec<Effect> {
        let latest = self.decided;
        let Some(c) = self.conns.get_mut(&conn) else {
            return vec![];
        };
        if c.pending != Pending::DisconnectMarker {
            return vec![];
        }
        c.pending = Pending::None;
        if c.generation < latest {
            // A marker write decided after the removal (another sender's
            // change or checkpoint) brought the marker back, or will: the
            // migration does not complete, as when the removal fails, and
            // what is believed stays as that later decision left it. The
            // record is durable, so the destination is canonical whatever
            // happens next (a record beside a marker).
            let message = format!(
                "cannot complete the migration from {}: the marker was decided again after its removal",
                c.source
            );
            if c.closed {
                self.conns.remove(&conn);
            }
            return vec![
                Effect::Log {
                    level: Level::Error,
                    message,
                },
                Effect::Close { conn },
            ];
        }
        let message = format!(
            "migration from {} complete: image durable, completion record written, marker removed",
            c.source
        );
        if c.closed {
            self.conns.remove(&conn);
        }
        self.completed = true;
        self.sender = None;
        // The marker, and with it any checkpoint, is gone.
        self.held = None;
        vec![
            Effect::Log {
                level: Level::Info,
                message,
            },
            Effect::Complete,
            Effect::Close { conn },
        ]
    }

    /// The record is durable: the marker's removal is decided.
    fn record_written(&mut self, conn: ConnId) -> Vec<Effect> {
        match self.conns.get_mut(&conn) {
            Some(c) if c.pending == Pending::DisconnectRecord => {
                c.pending = Pending::DisconnectMarker;
                // The marker is about to be gone: no change goes straight
                // on. Another sender's change decides a rewrite first, which
                // supersedes the removal, so the migration does not
                // complete under it.
                self.sender = None;
                let generation = self.decide(conn, None);
                vec![Effect::RemoveMarker { conn, generation }]
            }
            // An outcome nobody waits for.
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
        if matches!(
            pending,
            Pending::Marking
                | Pending::EntrustMarker
                | Pending::CheckpointMarker(..)
                | Pending::DisconnectMarker
        ) {
            // A failed rewrite may or may not have replaced the marker, and
            // a failed removal may have unlinked it (and the checkpoint with
            // it): the next change rewrites it whoever sends it, and what it
            // holds is unknown (holding nothing is always safe). The same
            // when a later operation was decided since: that one may not be
            // carried out yet, or fail too, and forgetting costs at most a
            // rewrite and a full copy.
            self.sender = None;
            self.held = None;
        }
        if closed {
            self.forget(conn);
        }
        let log = |message: String| Effect::Log {
            level: Level::Error,
            message,
        };
        let entrust = || log(format!("entrust from {source} failed: {}", failure.message));
        let answer = if failure.errno == 0 {
            errno::EIO
        } else {
            failure.errno
        };
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
                    errno: answer,
                },
            ],
            Pending::CheckpointSync(migration, checkpoint)
            | Pending::CheckpointMarker(migration, checkpoint) => {
                let line = log(format!(
                    "checkpoint {checkpoint} of migration {migration:016x} from {source} failed: {}",
                    failure.message
                ));
                if closed {
                    vec![line]
                } else {
                    vec![
                        line,
                        Effect::Reply {
                            conn,
                            errno: answer,
                        },
                    ]
                }
            }
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

    /// A machine that ignores log lines and the generations of marker
    /// operations (shown as 0), for exact effect sequences.
    struct M(Destination);

    impl M {
        fn new() -> M {
            M(Destination::new(None))
        }
        fn holding(migration: u64, checkpoint: u64) -> M {
            M(Destination::new(Some((migration, checkpoint))))
        }
        fn on(&mut self, event: Event) -> Vec<Effect> {
            self.0
                .handle(event, NOW)
                .into_iter()
                .filter_map(|e| match e {
                    Effect::Log { .. } => None,
                    Effect::PersistMarker { conn, marker, .. } => Some(Effect::PersistMarker {
                        conn,
                        generation: 0,
                        marker,
                    }),
                    Effect::RemoveMarker { conn, .. } => Some(Effect::RemoveMarker {
                        conn,
                        generation: 0,
                    }),
                    e => Some(e),
                })
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
            generation: 0,
            marker: MarkerWrite {
                state: MarkerState::Receiving,
                source: Some(source(conn)),
                attempt_started: NOW,
                bytes_received: 0,
                resume: None,
                for_checkpoint: false,
            },
        }
    }

    fn entrusted(conn: ConnId, bytes: u64) -> Effect {
        Effect::PersistMarker {
            conn,
            generation: 0,
            marker: MarkerWrite {
                state: MarkerState::Entrusted,
                source: Some(source(conn)),
                attempt_started: NOW,
                bytes_received: bytes,
                resume: None,
                for_checkpoint: false,
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

    /// An ENTRUST that tells no count (a source that waited for every
    /// reply first): checked only for failed changes.
    fn untold(conn: ConnId) -> Event {
        Event::Entrust {
            conn,
            told: 0,
            size: 1,
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
        assert_eq!(m.on(untold(conn)), vec![Effect::Sync { conn }]);
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
            vec![Effect::RemoveMarker {
                conn,
                generation: 0
            }]
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
    fn the_entrust_offset_counts_changes_modulo_the_size_and_0_tells_nothing() {
        assert_eq!(entrust_offset(0, 1 << 30), 1);
        assert_eq!(entrust_offset(5, 1 << 30), 6);
        // Always in range for a destination that checks ranges first.
        assert_eq!(entrust_offset(511, 512), 512);
        assert_eq!(entrust_offset(512, 512), 1);
        assert_eq!(entrust_offset(7, 0), 0);
    }

    #[test]
    fn entrust_is_refused_when_a_change_before_it_went_missing_or_failed() {
        let size = 1 << 20;
        let told = |changes| entrust_offset(changes, size);
        let refused = |conn| {
            vec![Effect::Reply {
                conn,
                errno: errno::EIO,
            }]
        };
        let mut m = M::new();
        m.open(1);
        first_change(&mut m, 1, 4096);
        m.on(Event::Change {
            conn: 1,
            bytes: 4096,
        });
        // The source sent three: one never arrived.
        assert_eq!(
            m.on(Event::Entrust {
                conn: 1,
                told: told(3),
                size
            }),
            refused(1)
        );
        // Two sent, two arrived: entrusted.
        assert_eq!(
            m.on(Event::Entrust {
                conn: 1,
                told: told(2),
                size
            }),
            vec![Effect::Sync { conn: 1 }]
        );
        // A failed change: refused whatever the count says, and also
        // for a source that tells nothing.
        m.open(2);
        first_change(&mut m, 2, 4096);
        m.on(Event::ChangeFailed { conn: 2 });
        for told in [entrust_offset(1, size), 0] {
            assert_eq!(
                m.on(Event::Entrust {
                    conn: 2,
                    told,
                    size
                }),
                refused(2)
            );
        }
        // A source that tells nothing, with nothing failed: as before.
        m.open(3);
        first_change(&mut m, 3, 4096);
        assert_eq!(
            m.on(Event::Entrust {
                conn: 3,
                told: 0,
                size
            }),
            vec![Effect::Sync { conn: 3 }]
        );
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
        assert_eq!(m.on(untold(1)), vec![Effect::Sync { conn: 1 }]);
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
        m.on(untold(1));
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
        m.on(untold(1));
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
        let mut d = Destination::new(None);
        d.handle(
            Event::Opened {
                conn: 1,
                source: "s".into(),
            },
            NOW,
        );
        d.handle(untold(1), NOW);
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

    const A: u64 = 0x0123_4567_89ab_cdef;
    const B: u64 = 0xfedc_ba98_7654_3210;

    fn marker(conn: ConnId, state: MarkerState, bytes: u64, resume: Option<(u64, u64)>) -> Effect {
        Effect::PersistMarker {
            conn,
            generation: 0,
            marker: MarkerWrite {
                state,
                source: Some(source(conn)),
                attempt_started: NOW,
                bytes_received: bytes,
                resume,
                for_checkpoint: false,
            },
        }
    }

    /// A checkpoint's `receiving` rewrite holding (migration, checkpoint).
    fn checkpoint_marker(conn: ConnId, bytes: u64, resume: (u64, u64)) -> Effect {
        match marker(conn, MarkerState::Receiving, bytes, Some(resume)) {
            Effect::PersistMarker {
                conn,
                generation,
                mut marker,
            } => {
                marker.for_checkpoint = true;
                Effect::PersistMarker {
                    conn,
                    generation,
                    marker,
                }
            }
            other => other,
        }
    }

    fn resume(m: &mut M, conn: ConnId, migration: u64) -> u64 {
        match m.on(Event::Resume { conn, migration }).as_slice() {
            [Effect::ResumeReply {
                conn: c,
                checkpoint,
            }] if *c == conn => *checkpoint,
            other => panic!("expected one ResumeReply on {conn}, got {other:?}"),
        }
    }

    fn checkpoint_event(conn: ConnId, migration: u64, checkpoint: u64) -> Event {
        Event::Checkpoint {
            conn,
            migration,
            checkpoint,
        }
    }

    /// CHECKPOINT carried through: sync, the marker naming it, the reply.
    fn checkpoint(m: &mut M, conn: ConnId, migration: u64, k: u64, bytes: u64) {
        let before = m.0.held();
        assert_eq!(
            m.on(checkpoint_event(conn, migration, k)),
            vec![Effect::Sync { conn }]
        );
        assert_eq!(
            m.on(Event::SyncDone { conn }),
            vec![checkpoint_marker(conn, bytes, (migration, k))]
        );
        assert_eq!(m.0.held(), before, "unchanged until durable");
        assert_eq!(
            m.on(Event::MarkerPersisted { conn }),
            vec![Effect::Reply { conn, errno: 0 }]
        );
        assert_eq!(m.0.held(), Some((migration, k)));
    }

    #[test]
    fn resume_answers_the_held_checkpoint_only_for_its_migration() {
        let mut m = M::holding(A, 3);
        m.open(1);
        assert_eq!(resume(&mut m, 1, A), 3);
        m.open(2);
        assert_eq!(resume(&mut m, 2, B), 0, "another migration");
        let mut m = M::new();
        m.open(1);
        assert_eq!(resume(&mut m, 1, A), 0, "none held");
        // Asking changes nothing durable.
        let mut m = M::holding(A, 3);
        m.open(1);
        resume(&mut m, 1, B);
        assert_eq!(m.0.held(), Some((A, 3)));
    }

    #[test]
    fn a_checkpoint_syncs_then_marks_then_replies_and_is_answered_afterwards() {
        let mut m = M::new();
        m.open(1);
        assert_eq!(resume(&mut m, 1, A), 0);
        first_change(&mut m, 1, 4096);
        assert_eq!(
            m.on(checkpoint_event(1, A, 1)),
            vec![Effect::Sync { conn: 1 }]
        );
        assert_eq!(m.0.held(), None, "not held before the sync");
        assert_eq!(
            m.on(Event::SyncDone { conn: 1 }),
            vec![checkpoint_marker(1, 4096, (A, 1))]
        );
        assert_eq!(m.0.held(), None, "not held before the marker is durable");
        assert_eq!(
            m.on(Event::MarkerPersisted { conn: 1 }),
            vec![Effect::Reply { conn: 1, errno: 0 }]
        );
        assert_eq!(m.0.held(), Some((A, 1)));
        // The marker says `receiving` for this connection: no rewrite.
        assert_eq!(
            m.on(Event::Change { conn: 1, bytes: 1 }),
            vec![Effect::Apply { conn: 1 }]
        );
        checkpoint(&mut m, 1, A, 2, 4097);
        // The next attempt's connection asks, and is answered it.
        m.on(Event::Closed {
            conn: 1,
            why: CloseReason::Reset,
        });
        m.open(2);
        assert_eq!(resume(&mut m, 2, A), 2);
        assert_eq!(resume(&mut m, 2, B), 0);
    }

    #[test]
    fn the_senders_changes_go_on_while_its_checkpoint_syncs_and_it_still_holds() {
        // The source sends its checkpoint without waiting and goes on
        // sending: no marker rewrite for those changes, which would
        // supersede the checkpoint.
        let mut m = M::new();
        m.open(1);
        assert_eq!(resume(&mut m, 1, A), 0);
        first_change(&mut m, 1, 4096);
        assert_eq!(
            m.on(checkpoint_event(1, A, 1)),
            vec![Effect::Sync { conn: 1 }]
        );
        assert_eq!(
            m.on(Event::Change { conn: 1, bytes: 10 }),
            vec![Effect::Apply { conn: 1 }]
        );
        assert_eq!(
            m.on(Event::SyncDone { conn: 1 }),
            vec![checkpoint_marker(1, 4106, (A, 1))]
        );
        assert_eq!(
            m.on(Event::Change { conn: 1, bytes: 10 }),
            vec![Effect::Apply { conn: 1 }],
            "while the marker is rewritten"
        );
        assert_eq!(
            m.on(Event::MarkerPersisted { conn: 1 }),
            vec![Effect::Reply { conn: 1, errno: 0 }]
        );
        assert_eq!(m.0.held(), Some((A, 1)));
        // Another connection's change meanwhile still rewrites the marker
        // first: it was not the sender when its checkpoint came.
        m.open(2);
        assert_eq!(resume(&mut m, 2, A), 1);
        assert_eq!(
            m.on(checkpoint_event(2, A, 2)),
            vec![Effect::Sync { conn: 2 }]
        );
        assert!(
            !matches!(
                m.on(Event::Change { conn: 2, bytes: 5 }).as_slice(),
                [Effect::Apply { .. }]
            ),
            "applied beside a marker that says receiving for another connection"
        );
    }

    #[test]
    fn a_checkpoint_counts_as_resuming_its_migration() {
        // A connection that never asked RESUME, checkpointed: after another
        // sender's change, its own first change keeps the checkpoint.
        let mut m = M::new();
        m.open(1);
        first_change(&mut m, 1, 10);
        checkpoint(&mut m, 1, A, 1, 10);
        m.open(2);
        assert_eq!(resume(&mut m, 2, A), 1);
        assert_eq!(
            m.on(Event::Change { conn: 2, bytes: 5 }),
            vec![marker(2, MarkerState::Receiving, 0, Some((A, 1)))]
        );
        assert_eq!(
            m.on(Event::MarkerPersisted { conn: 2 }),
            vec![Effect::Apply { conn: 2 }]
        );
        assert_eq!(
            m.on(Event::Change { conn: 1, bytes: 5 }),
            vec![marker(1, MarkerState::Receiving, 0, Some((A, 1)))]
        );
    }

    #[test]
    fn a_change_of_a_connection_that_did_not_resume_drops_the_checkpoint_durably_first() {
        for asked in [None, Some(B)] {
            let mut m = M::holding(A, 3);
            m.open(1);
            if let Some(migration) = asked {
                assert_eq!(resume(&mut m, 1, migration), 0);
            }
            assert_eq!(
                m.on(Event::Change { conn: 1, bytes: 9 }),
                vec![receiving(1)],
                "the rewrite drops the resume part; nothing is applied yet"
            );
            assert_eq!(m.0.held(), None, "forgotten before the change is applied");
            assert_eq!(
                m.on(Event::MarkerPersisted { conn: 1 }),
                vec![Effect::Apply { conn: 1 }]
            );
            m.open(2);
            assert_eq!(resume(&mut m, 2, A), 0, "never answered again");
        }
    }

    #[test]
    fn a_change_of_a_resumed_connection_keeps_the_checkpoint() {
        let mut m = M::holding(A, 3);
        m.open(1);
        assert_eq!(resume(&mut m, 1, A), 3);
        assert_eq!(
            m.on(Event::Change { conn: 1, bytes: 9 }),
            vec![marker(1, MarkerState::Receiving, 0, Some((A, 3)))]
        );
        assert_eq!(m.0.held(), Some((A, 3)));
        assert_eq!(
            m.on(Event::MarkerPersisted { conn: 1 }),
            vec![Effect::Apply { conn: 1 }]
        );
        assert_eq!(m.0.held(), Some((A, 3)));
        // A second connection resumed into the same migration keeps it too.
        m.open(2);
        assert_eq!(resume(&mut m, 2, A), 3);
        assert_eq!(
            m.on(Event::Change { conn: 2, bytes: 1 }),
            vec![marker(2, MarkerState::Receiving, 0, Some((A, 3)))]
        );
    }

    #[test]
    fn a_checkpoint_whose_sync_fails_answers_the_error_and_holds_what_it_held() {
        for (e, answered) in [(errno::ENOSPC, errno::ENOSPC), (0, errno::EIO)] {
            let mut m = M::holding(A, 3);
            m.open(1);
            resume(&mut m, 1, A);
            first_change_keeping(&mut m, 1, (A, 3));
            assert_eq!(
                m.on(checkpoint_event(1, A, 4)),
                vec![Effect::Sync { conn: 1 }]
            );
            assert_eq!(
                m.on(Event::SyncFailed {
                    conn: 1,
                    failure: fail(e)
                }),
                vec![Effect::Reply {
                    conn: 1,
                    errno: answered
                }]
            );
            assert_eq!(m.0.held(), Some((A, 3)));
            // The marker was not touched: the connection goes on.
            assert_eq!(
                m.on(Event::Change { conn: 1, bytes: 1 }),
                vec![Effect::Apply { conn: 1 }]
            );
        }
    }

    fn first_change_keeping(m: &mut M, conn: ConnId, held: (u64, u64)) {
        assert_eq!(
            m.on(Event::Change { conn, bytes: 1 }),
            vec![marker(conn, MarkerState::Receiving, 0, Some(held))]
        );
        assert_eq!(
            m.on(Event::MarkerPersisted { conn }),
            vec![Effect::Apply { conn }]
        );
    }

    #[test]
    fn a_checkpoint_whose_marker_fails_answers_the_error_and_holds_nothing() {
        let mut m = M::holding(A, 3);
        m.open(1);
        resume(&mut m, 1, A);
        first_change_keeping(&mut m, 1, (A, 3));
        m.on(checkpoint_event(1, A, 4));
        m.on(Event::SyncDone { conn: 1 });
        assert_eq!(
            m.on(Event::MarkerFailed {
                conn: 1,
                failure: fail(errno::EIO)
            }),
            vec![Effect::Reply {
                conn: 1,
                errno: errno::EIO
            }]
        );
        // The marker may hold 3, 4 or a torn write: neither is trusted.
        assert_eq!(m.0.held(), None);
        assert_eq!(m.0.sender(), None);
        assert_eq!(resume(&mut m, 1, A), 0);
        // The next change rewrites the marker, with no resume part.
        first_change(&mut m, 1, 1);
    }

    #[test]
    fn a_checkpoint_numbered_0_or_of_migration_0_is_invalid() {
        for (migration, k) in [(0, 1), (A, 0), (0, 0)] {
            let mut m = M::holding(A, 3);
            m.open(1);
            assert_eq!(
                m.on(checkpoint_event(1, migration, k)),
                vec![Effect::Reply {
                    conn: 1,
                    errno: errno::EINVAL
                }]
            );
            assert_eq!(m.0.held(), Some((A, 3)));
        }
    }

    #[test]
    fn entrust_keeps_the_held_checkpoint_and_completion_forgets_it() {
        let mut m = M::holding(A, 3);
        m.open(1);
        resume(&mut m, 1, A);
        first_change_keeping(&mut m, 1, (A, 3));
        assert_eq!(m.on(untold(1)), vec![Effect::Sync { conn: 1 }]);
        assert_eq!(
            m.on(Event::SyncDone { conn: 1 }),
            vec![marker(1, MarkerState::Entrusted, 1, Some((A, 3)))]
        );
        assert_eq!(
            m.on(Event::MarkerPersisted { conn: 1 }),
            vec![Effect::Reply { conn: 1, errno: 0 }]
        );
        assert_eq!(m.0.held(), Some((A, 3)));
        disconnect(&mut m, 1, 1);
        assert_eq!(m.0.held(), None, "the marker is gone");
        m.open(2);
        assert_eq!(resume(&mut m, 2, A), 0);
        assert_eq!(
            m.on(checkpoint_event(2, A, 4)),
            vec![Effect::Close { conn: 2 }],
            "no marker comes back beside a complete image"
        );
    }

    #[test]
    fn a_checkpoint_on_a_connection_that_ended_is_held_once_durable_and_answers_nothing() {
        let mut m = M::new();
        m.open(1);
        m.on(checkpoint_event(1, A, 1));
        m.on(Event::SyncDone { conn: 1 });
        m.on(Event::Closed {
            conn: 1,
            why: CloseReason::Reset,
        });
        assert_eq!(m.on(Event::MarkerPersisted { conn: 1 }), vec![]);
        assert_eq!(m.0.held(), Some((A, 1)), "the marker holds it");
        assert_eq!(m.0.sender(), None);
        // Ended before its sync finished: nothing is written.
        let mut m = M::new();
        m.open(1);
        m.on(checkpoint_event(1, A, 1));
        m.on(Event::Closed {
            conn: 1,
            why: CloseReason::Eof,
        });
        assert_eq!(m.on(Event::SyncDone { conn: 1 }), vec![]);
        assert_eq!(m.0.held(), None);
    }

    #[test]
    fn a_checkpoint_makes_another_senders_next_change_drop_it() {
        let mut m = M::new();
        m.open(1);
        first_change(&mut m, 1, 10);
        m.open(2);
        resume(&mut m, 2, A);
        first_change(&mut m, 2, 10);
        m.on(checkpoint_event(2, A, 1));
        m.on(Event::SyncDone { conn: 2 });
        // While the checkpoint's marker is written, nobody's change goes
        // straight on: the first connection's rewrite waits for the marker.
        assert_eq!(m.0.sender(), None);
        m.on(Event::MarkerPersisted { conn: 2 });
        assert_eq!(m.0.sender(), Some(2));
        assert_eq!(
            m.on(Event::Change { conn: 1, bytes: 1 }),
            vec![receiving(1)]
        );
        assert_eq!(m.0.held(), None);
    }

    /// The generation of the one marker operation among `effects`.
    fn generation_of(effects: &[Effect]) -> u64 {
        match effects {
            [Effect::PersistMarker { generation, .. } | Effect::RemoveMarker { generation, .. }] => {
                *generation
            }
            other => panic!("expected one marker operation, got {other:?}"),
        }
    }

    fn eio(conn: ConnId) -> Effect {
        Effect::Reply {
            conn,
            errno: errno::EIO,
        }
    }

    #[test]
    fn marker_operations_are_numbered_in_the_order_decided_across_connections() {
        let mut d = Destination::new(None);
        for conn in [1, 2] {
            d.handle(
                Event::Opened {
                    conn,
                    source: source(conn),
                },
                NOW,
            );
        }
        let mut generations = Vec::new();
        generations.push(generation_of(
            &d.handle(Event::Change { conn: 1, bytes: 1 }, NOW),
        ));
        generations.push(generation_of(
            &d.handle(Event::Change { conn: 2, bytes: 1 }, NOW),
        ));
        d.handle(Event::MarkerPersisted { conn: 2 }, NOW);
        d.handle(untold(2), NOW);
        generations.push(generation_of(&d.handle(Event::SyncDone { conn: 2 }, NOW)));
        d.handle(Event::MarkerPersisted { conn: 2 }, NOW);
        d.handle(Event::Disconnect { conn: 2 }, NOW);
        d.handle(Event::SyncDone { conn: 2 }, NOW);
        generations.push(generation_of(
            &d.handle(Event::RecordWritten { conn: 2 }, NOW),
        ));
        assert!(
            generations.windows(2).all(|w| w[0] < w[1]),
            "{generations:?}"
        );
    }

    /// Connection 1 resumed migration A (checkpoint 1 held) and decided the
    /// marker write of checkpoint 2; connection 2, which did not resume,
    /// then decided its first change's rewrite, dropping the checkpoint.
    fn checkpoint_then_foreign_change() -> M {
        let mut m = M::holding(A, 1);
        m.open(1);
        assert_eq!(resume(&mut m, 1, A), 1);
        first_change_keeping(&mut m, 1, (A, 1));
        m.on(checkpoint_event(1, A, 2));
        assert_eq!(
            m.on(Event::SyncDone { conn: 1 }),
            vec![checkpoint_marker(1, 1, (A, 2))]
        );
        m.open(2);
        assert_eq!(
            m.on(Event::Change { conn: 2, bytes: 7 }),
            vec![receiving(2)]
        );
        m
    }

    #[test]
    fn a_checkpoint_superseded_by_another_connections_change_is_not_held_and_answers_an_error() {
        // Reported before the change's rewrite, and after it: either way
        // the marker ends without the checkpoint.
        for checkpoint_first in [true, false] {
            let mut m = checkpoint_then_foreign_change();
            if checkpoint_first {
                assert_eq!(m.on(Event::MarkerPersisted { conn: 1 }), vec![eio(1)]);
                assert_eq!(m.0.held(), None);
                assert_eq!(m.0.sender(), None);
            }
            assert_eq!(
                m.on(Event::MarkerPersisted { conn: 2 }),
                vec![Effect::Apply { conn: 2 }]
            );
            if !checkpoint_first {
                assert_eq!(m.on(Event::MarkerPersisted { conn: 1 }), vec![eio(1)]);
            }
            assert_eq!(m.0.held(), None, "checkpoint first: {checkpoint_first}");
            assert_eq!(m.0.sender(), Some(2));
            m.open(3);
            assert_eq!(resume(&mut m, 3, A), 0, "connection 2's data is applied");
            // Connection 1 is not the sender: its next change rewrites the
            // marker, without the checkpoint.
            assert_eq!(
                m.on(Event::Change { conn: 1, bytes: 1 }),
                vec![marker(1, MarkerState::Receiving, 0, None)]
            );
        }
    }

    #[test]
    fn a_checkpoint_answered_before_another_connections_change_is_decided_is_held_until_then() {
        let mut m = M::holding(A, 1);
        m.open(1);
        resume(&mut m, 1, A);
        first_change_keeping(&mut m, 1, (A, 1));
        checkpoint(&mut m, 1, A, 2, 1);
        m.open(2);
        assert_eq!(resume(&mut m, 2, A), 2);
        m.open(3);
        first_change(&mut m, 3, 7);
        assert_eq!(m.0.held(), None);
        assert_eq!(resume(&mut m, 2, A), 0);
    }

    #[test]
    fn a_checkpoint_decided_after_another_connections_change_is_held_and_that_change_waits_on_its_migration(
    ) {
        for theirs in [None, Some(B), Some(A)] {
            for checkpoint_first in [true, false] {
                let mut m = M::holding(A, 1);
                m.open(1);
                resume(&mut m, 1, A);
                first_change_keeping(&mut m, 1, (A, 1));
                m.open(2);
                if let Some(migration) = theirs {
                    resume(&mut m, 2, migration);
                }
                m.on(checkpoint_event(1, A, 2));
                // Connection 2's rewrite is decided before the checkpoint's.
                let keep = (theirs == Some(A)).then_some((A, 1));
                assert_eq!(
                    m.on(Event::Change { conn: 2, bytes: 7 }),
                    vec![marker(2, MarkerState::Receiving, 0, keep)]
                );
                m.on(Event::SyncDone { conn: 1 });
                // Connection 2's data may sit beside checkpoint 2 only when
                // it belongs to migration A; otherwise it is not applied.
                let change = if theirs == Some(A) {
                    vec![Effect::Apply { conn: 2 }]
                } else {
                    vec![Effect::Close { conn: 2 }]
                };
                let ok = vec![Effect::Reply { conn: 1, errno: 0 }];
                if checkpoint_first {
                    assert_eq!(m.on(Event::MarkerPersisted { conn: 1 }), ok);
                    assert_eq!(m.on(Event::MarkerPersisted { conn: 2 }), change);
                } else {
                    assert_eq!(m.on(Event::MarkerPersisted { conn: 2 }), change);
                    assert_eq!(m.on(Event::MarkerPersisted { conn: 1 }), ok);
                }
                let case = format!("{theirs:?}, checkpoint first: {checkpoint_first}");
                assert_eq!(m.0.held(), Some((A, 2)), "{case}");
                assert_eq!(m.0.sender(), Some(1), "{case}");
            }
        }
    }

    #[test]
    fn an_entrust_superseded_by_another_connections_change_answers_an_error() {
        for entrust_first in [true, false] {
            let mut m = M::new();
            m.open(1);
            first_change(&mut m, 1, 3);
            m.on(untold(1));
            assert_eq!(m.on(Event::SyncDone { conn: 1 }), vec![entrusted(1, 3)]);
            m.open(2);
            assert_eq!(
                m.on(Event::Change { conn: 2, bytes: 1 }),
                vec![receiving(2)]
            );
            if entrust_first {
                assert_eq!(m.on(Event::MarkerPersisted { conn: 1 }), vec![eio(1)]);
            }
            assert_eq!(
                m.on(Event::MarkerPersisted { conn: 2 }),
                vec![Effect::Apply { conn: 2 }]
            );
            if !entrust_first {
                assert_eq!(m.on(Event::MarkerPersisted { conn: 1 }), vec![eio(1)]);
            }
            assert_eq!(m.0.sender(), Some(2));
            // The source retries on connection 1: entrusted again, answered.
            first_change(&mut m, 1, 1);
            entrust(&mut m, 1, 4);
        }
    }

    #[test]
    fn an_entrust_decided_after_another_connections_change_is_answered_and_that_change_is_not_applied(
    ) {
        for entrust_first in [true, false] {
            let mut m = M::new();
            m.open(1);
            first_change(&mut m, 1, 3);
            m.on(untold(1));
            m.open(2);
            assert_eq!(
                m.on(Event::Change { conn: 2, bytes: 1 }),
                vec![receiving(2)]
            );
            assert_eq!(m.on(Event::SyncDone { conn: 1 }), vec![entrusted(1, 3)]);
            let ok = vec![Effect::Reply { conn: 1, errno: 0 }];
            // Its data would sit beside the `entrusted` marker: not applied.
            let refused = vec![Effect::Close { conn: 2 }];
            if entrust_first {
                assert_eq!(m.on(Event::MarkerPersisted { conn: 1 }), ok);
                assert_eq!(m.on(Event::MarkerPersisted { conn: 2 }), refused);
            } else {
                assert_eq!(m.on(Event::MarkerPersisted { conn: 2 }), refused);
                assert_eq!(m.on(Event::MarkerPersisted { conn: 1 }), ok);
            }
            assert_eq!(m.0.sender(), None);
        }
        // Answered before the other change is decided: that change rewrites
        // the marker again, and goes on.
        let mut m = M::new();
        m.open(1);
        first_change(&mut m, 1, 3);
        entrust(&mut m, 1, 3);
        m.open(2);
        first_change(&mut m, 2, 1);
    }

    #[test]
    fn a_first_change_superseded_by_another_receiving_rewrite_is_applied_but_does_not_make_the_sender(
    ) {
        for earlier_first in [true, false] {
            let mut m = M::new();
            m.open(1);
            m.open(2);
            assert_eq!(
                m.on(Event::Change { conn: 1, bytes: 1 }),
                vec![receiving(1)]
            );
            assert_eq!(
                m.on(Event::Change { conn: 2, bytes: 1 }),
                vec![receiving(2)]
            );
            let (first, second) = if earlier_first { (1, 2) } else { (2, 1) };
            assert_eq!(
                m.on(Event::MarkerPersisted { conn: first }),
                vec![Effect::Apply { conn: first }]
            );
            assert_eq!(
                m.on(Event::MarkerPersisted { conn: second }),
                vec![Effect::Apply { conn: second }]
            );
            // The marker ends naming connection 2, whichever was reported
            // last.
            assert_eq!(m.0.sender(), Some(2), "earlier first: {earlier_first}");
            assert_eq!(
                m.on(Event::Change { conn: 2, bytes: 1 }),
                vec![Effect::Apply { conn: 2 }]
            );
            assert_eq!(
                m.on(Event::Change { conn: 1, bytes: 1 }),
                vec![receiving(1)]
            );
        }
    }

    #[test]
    fn a_removal_superseded_by_another_connections_change_does_not_complete() {
        let mut m = M::new();
        m.open(1);
        m.open(2);
        first_change(&mut m, 2, 1);
        first_change(&mut m, 1, 5);
        m.on(Event::Disconnect { conn: 1 });
        m.on(Event::SyncDone { conn: 1 });
        m.on(Event::RecordWritten { conn: 1 });
        // Connection 2 was the sender before: once the removal is decided,
        // its change rewrites the marker first.
        assert_eq!(
            m.on(Event::Change { conn: 2, bytes: 1 }),
            vec![receiving(2)]
        );
        assert_eq!(
            m.on(Event::MarkerRemoved { conn: 1 }),
            vec![Effect::Close { conn: 1 }]
        );
        assert!(!m.0.is_complete());
        assert_eq!(
            m.on(Event::MarkerPersisted { conn: 2 }),
            vec![Effect::Apply { conn: 2 }]
        );
        // The source reconnects and completes.
        disconnect(&mut m, 2, 2);
    }

    #[test]
    fn a_change_decided_before_the_removal_is_not_applied_and_the_removal_completes() {
        for removal_first in [true, false] {
            let mut m = M::new();
            m.open(1);
            first_change(&mut m, 1, 5);
            m.on(Event::Disconnect { conn: 1 });
            m.on(Event::SyncDone { conn: 1 });
            m.open(2);
            assert_eq!(
                m.on(Event::Change { conn: 2, bytes: 1 }),
                vec![receiving(2)]
            );
            m.on(Event::RecordWritten { conn: 1 });
            let complete = vec![Effect::Complete, Effect::Close { conn: 1 }];
            let refused = vec![Effect::Close { conn: 2 }];
            if removal_first {
                assert_eq!(m.on(Event::MarkerRemoved { conn: 1 }), complete);
                assert_eq!(m.on(Event::MarkerPersisted { conn: 2 }), refused);
            } else {
                assert_eq!(m.on(Event::MarkerPersisted { conn: 2 }), refused);
                assert_eq!(m.on(Event::MarkerRemoved { conn: 1 }), complete);
            }
            assert!(m.0.is_complete());
        }
    }

    #[test]
    fn a_failed_removal_holds_no_checkpoint() {
        let mut m = M::holding(A, 3);
        m.open(1);
        resume(&mut m, 1, A);
        first_change_keeping(&mut m, 1, (A, 3));
        m.on(Event::Disconnect { conn: 1 });
        m.on(Event::SyncDone { conn: 1 });
        m.on(Event::RecordWritten { conn: 1 });
        assert_eq!(
            m.on(Event::MarkerRemoveFailed {
                conn: 1,
                failure: fail(errno::EIO)
            }),
            vec![Effect::Close { conn: 1 }]
        );
        // The marker may be gone, and the checkpoint with it.
        assert_eq!(m.0.held(), None);
        m.open(2);
        assert_eq!(resume(&mut m, 2, A), 0);
    }

    #[test]
    fn the_machine_can_move_between_threads() {
        fn is_send<T: Send>() {}
        is_send::<Destination>();
        is_send::<Effect>();
        is_send::<Event>();
    }
}
