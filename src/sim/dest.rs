//! `flexnbd listen` in the simulation: the real destination machine
//! (`core::destination`), its real executor (`handoff::Destination::execute`:
//! the marker, the record, the syncs) over the simulated disk and file
//! system, and the real request planner (`core::request`). One effect is
//! carried out per event, each taking its virtual time, so a fault can fall
//! between any two.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::core::destination::{self as machine, CloseReason, ConnId, Effect, Event};
use crate::core::request::{self, Step};
use crate::handoff;
use crate::proto::cmd;
use crate::store::files::FileOps;
use crate::store::Image;

use super::scenario::Mark;
use super::world::{Core, Micros, Msg, Req};

/// What the destination works on next.
enum Work {
    /// A request received on a connection, in order.
    Request(ConnId, u64, Req),
    /// The end of a connection (EOF or reset), after what it delivered.
    End(ConnId),
    /// An effect of the machine.
    Effect(Effect),
    /// The next step of a request's plan (apply, sync, reply).
    Plan(ConnId, u64, Req, &'static [Step]),
}

pub struct Listen {
    image: Arc<Image>,
    executor: handoff::Destination,
    machine: machine::Destination,
    /// Requests and ends of connections not yet taken up.
    inbox: VecDeque<Work>,
    /// What is being worked on, in order: effects and plan steps.
    work: VecDeque<Work>,
    /// The request each connection has waiting on the machine (a change
    /// waiting for the marker, an ENTRUST waiting for its syncs).
    waiting: std::collections::BTreeMap<ConnId, (u64, Req)>,
    /// Connections the destination knows (opened to the machine).
    known: std::collections::BTreeSet<ConnId>,
    pub scheduled: bool,
    /// The marker was just made to say `entrusted`.
    entrusted_now: bool,
    done: bool,
}

impl Listen {
    /// `listen` starts: the real start-up (refusal over a completion record,
    /// the marker created durably).
    pub fn start(image: Arc<Image>, ops: Arc<dyn FileOps>) -> Result<Listen, String> {
        let path = image.path().to_owned();
        let executor = handoff::Destination::prepare(ops, &path, false)?;
        // What the marker holds, as start-up found it (checked against the
        // image file).
        let held = executor.held();
        Ok(Listen {
            image,
            executor,
            machine: machine::Destination::new(held),
            inbox: VecDeque::new(),
            work: VecDeque::new(),
            waiting: Default::default(),
            known: Default::default(),
            scheduled: false,
            entrusted_now: false,
            done: false,
        })
    }

    pub fn request(&mut self, core: &mut Core, conn: u64, handle: u64, req: Req) {
        core.note(format!("dest <- conn {conn} {}", req.name()));
        self.inbox.push_back(Work::Request(conn, handle, req));
    }

    /// The connection ended: after what it delivered before.
    pub fn closed(&mut self, core: &mut Core, conn: u64) {
        core.note(format!("dest: conn {conn} ends"));
        self.inbox.push_back(Work::End(conn));
    }

    pub fn wants_step(&mut self) -> bool {
        if self.scheduled || (self.work.is_empty() && self.inbox.is_empty()) {
            return false;
        }
        self.scheduled = true;
        true
    }

    /// The virtual time the next step takes.
    pub fn next_cost(&self, core: &Core) -> Micros {
        let sc = &core.sc;
        let apply = |req: &Req| match req {
            Req::Write { data, .. } => sc.per_request_us + sc.per_kib_us * data.len() as u64 / 1024,
            _ => sc.per_request_us,
        };
        match self.work.front() {
            Some(Work::Effect(Effect::Sync { .. })) => sc.sync_us,
            Some(Work::Effect(Effect::PersistMarker { .. } | Effect::WriteRecord { .. })) => {
                2 * sc.sync_us
            }
            Some(Work::Effect(Effect::RemoveMarker { .. })) => sc.sync_us,
            Some(Work::Plan(_, _, req, steps)) => match steps.first() {
                Some(Step::Apply) => apply(req),
                Some(Step::Sync) => sc.sync_us,
                _ => 1,
            },
            _ => 1,
        }
    }

    /// The marker came to say `entrusted` since the last call.
    pub fn take_entrusted(&mut self) -> bool {
        std::mem::take(&mut self.entrusted_now)
    }

    fn now_secs(core: &Core) -> u64 {
        core.now / 1_000_000
    }

    fn feed(&mut self, core: &mut Core, event: Event) {
        core.note(format!("dest <- {event:?}"));
        let effects = self.machine.handle(event, Self::now_secs(core));
        // What an outcome leads to comes first.
        for e in effects.into_iter().rev() {
            self.work.push_front(Work::Effect(e));
        }
    }

    fn open(&mut self, core: &mut Core, conn: ConnId) {
        if self.known.insert(conn) {
            self.feed(
                core,
                Event::Opened {
                    conn,
                    source: format!("source#{conn}"),
                },
            );
        }
    }

    /// Takes up the next request: the hand-off's own (ENTRUST, DISCONNECT)
    /// and the changes go to the machine first.
    fn take_up(&mut self, core: &mut Core, conn: ConnId, handle: u64, req: Req) {
        self.open(core, conn);
        let (kind, bytes) = match &req {
            Req::Write { data, .. } => (cmd::WRITE, data.len() as u64),
            Req::Zeroes { .. } => (cmd::WRITE_ZEROES, 0),
            Req::Flush => (cmd::FLUSH, 0),
            Req::Entrust { .. } => (cmd::ENTRUST, 0),
            Req::Disconnect => (cmd::DISC, 0),
            Req::Resume { .. } => (cmd::RESUME, 0),
            Req::Checkpoint { .. } => (cmd::CHECKPOINT, 0),
        };
        let plan = request::plan(kind, 0);
        match req {
            Req::Entrust { told } => {
                self.waiting.insert(conn, (handle, req));
                let size = self.image.size();
                self.feed(core, Event::Entrust { conn, told, size });
            }
            Req::Disconnect => self.feed(core, Event::Disconnect { conn }),
            Req::Resume { migration } => {
                self.waiting.insert(conn, (handle, req));
                self.feed(core, Event::Resume { conn, migration });
            }
            Req::Checkpoint {
                migration,
                checkpoint,
            } => {
                self.waiting.insert(conn, (handle, req));
                self.feed(
                    core,
                    Event::Checkpoint {
                        conn,
                        migration,
                        checkpoint,
                    },
                );
            }
            _ if plan.changes_data() => {
                self.waiting.insert(conn, (handle, req));
                self.feed(core, Event::Change { conn, bytes });
            }
            _ => self
                .work
                .push_front(Work::Plan(conn, handle, req, plan.steps)),
        }
    }

    /// Carries out one step; true once the migration completed.
    pub fn step(&mut self, core: &mut Core) -> bool {
        let Some(work) = self.work.pop_front() else {
            match self.inbox.pop_front() {
                Some(Work::Request(conn, handle, req)) => self.take_up(core, conn, handle, req),
                Some(Work::End(conn)) => {
                    self.open(core, conn);
                    self.waiting.remove(&conn);
                    self.feed(
                        core,
                        Event::Closed {
                            conn,
                            why: CloseReason::Eof,
                        },
                    );
                }
                _ => {}
            }
            return false;
        };
        match work {
            Work::Effect(effect) => self.effect(core, effect),
            Work::Plan(conn, handle, req, steps) => {
                let Some((first, rest)) = steps.split_first() else {
                    return false;
                };
                if !rest.is_empty() {
                    self.work
                        .push_front(Work::Plan(conn, handle, req.clone(), rest));
                }
                let r = match first {
                    Step::Apply => match &req {
                        Req::Write { offset, data } => self.image.write_at(data, *offset),
                        Req::Zeroes { offset, len } => self.image.punch(*offset, *len, true),
                        _ => Ok(()),
                    },
                    Step::Sync => self.image.sync(),
                    Step::Reply => {
                        core.send(conn, false, Msg::Reply { handle, error: 0 });
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    core.note(format!("dest: request failed: {e}"));
                    // The rest of its plan is dropped; the error is the reply.
                    if !rest.is_empty() {
                        self.work.pop_front();
                    }
                    core.send(
                        conn,
                        false,
                        Msg::Reply {
                            handle,
                            error: crate::proto::errno::EIO,
                        },
                    );
                }
                false
            }
            _ => false,
        }
    }

    fn effect(&mut self, core: &mut Core, effect: Effect) -> bool {
        core.note(format!("dest -> {effect:?}"));
        match &effect {
            Effect::Apply { conn } => {
                // The change waiting on the connection goes through its plan.
                if let Some((handle, req)) = self.waiting.remove(conn) {
                    let kind = if matches!(req, Req::Zeroes { .. }) {
                        cmd::WRITE_ZEROES
                    } else {
                        cmd::WRITE
                    };
                    let plan = request::plan(kind, 0);
                    self.work
                        .push_front(Work::Plan(*conn, handle, req, plan.steps));
                }
            }
            Effect::Reply { conn, errno } => {
                if let Some((handle, req)) = self.waiting.remove(conn) {
                    core.send(
                        *conn,
                        false,
                        Msg::Reply {
                            handle,
                            error: *errno,
                        },
                    );
                    if matches!(req, Req::Entrust { .. }) && *errno == 0 {
                        core.mark(Mark::EntrustAnswered);
                    }
                }
            }
            Effect::ResumeReply { conn, checkpoint } => {
                if let Some((handle, _)) = self.waiting.remove(conn) {
                    core.send(
                        *conn,
                        false,
                        Msg::Answer {
                            handle,
                            value: *checkpoint,
                        },
                    );
                }
            }
            Effect::Close { conn } => {
                core.close(*conn, true);
            }
            Effect::Complete => {
                self.executor.execute(&effect, &self.image);
                self.done = true;
                core.mark(Mark::Completed);
                return true;
            }
            Effect::Log { message, .. } => core.note(format!("dest log: {message}")),
            Effect::PersistMarker { .. }
            | Effect::Sync { .. }
            | Effect::WriteRecord { .. }
            | Effect::RemoveMarker { .. } => {
                let entrusted = matches!(
                    &effect,
                    Effect::PersistMarker { marker, .. } if marker.state == machine::MarkerState::Entrusted
                );
                if let Some(outcome) = self.executor.execute(&effect, &self.image) {
                    if matches!(outcome, Event::MarkerPersisted { .. }) {
                        self.entrusted_now |= entrusted;
                        core.mark(Mark::MarkerPersisted);
                    }
                    self.feed(core, outcome);
                }
            }
        }
        false
    }
}
