//! The source's mirror in the simulation: the real hand-off machine
//! (`core::source`), with the simulated network and the source's real
//! `Image` carrying out its effects, one effect per event so that a fault
//! can fall between any two.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::core::destination::entrust_offset;
use crate::core::policy::{Capacity, CostModel};
use crate::core::source::{Effect, Event, FirstOutcome, Outcome, Source, SourceConfig};
use crate::proto::flags;
use crate::store::{Image, BLOCK_SIZE};

use super::host::SourceCtx;
use super::scenario::{Mark, Scenario};
use super::world::{Ev, Micros, Msg, Req, Timer};

/// Requests in flight at once (the real pipe allows 64; a small image
/// needs fewer to show every interleaving).
const WINDOW: usize = 8;
/// The sweep's and the dirty passes' largest write, and the sweep's window:
/// small, so that a small image still takes many of each.
pub const CHUNK: u64 = 16 * 1024;
const SWEEP_WINDOW: u64 = 64 * 1024;

/// The real timeouts of the source (`mirror`).
fn micros(d: Duration) -> Micros {
    d.as_micros() as Micros
}

/// A request in flight: what it was, when it went, whether its service
/// time counts in the cost model.
struct InFlight {
    kind: &'static str,
    len: u64,
    sent: Micros,
    measure: bool,
}

/// Whether carrying `effect` out needs the connection to the destination.
fn uses_connection(effect: &Effect) -> bool {
    matches!(
        effect,
        Effect::SendData { .. }
            | Effect::CompareData { .. }
            | Effect::SendHole { .. }
            | Effect::WaitIdle
            | Effect::WaitQueue { .. }
            | Effect::Flush
            | Effect::Entrust
            | Effect::QueryResume { .. }
    )
}

pub struct SourceRun {
    machine: Source,
    image: Arc<Image>,
    life: u64,
    conn: Option<u64>,
    /// Effects of the current batch not yet carried out.
    pending: VecDeque<Effect>,
    /// The effect whose answer the machine waits for.
    awaiting: Option<Effect>,
    /// The connection broke (why), not yet told to the machine.
    broken: Option<String>,
    /// `break` was run: every cancellable wait from now on ends at once,
    /// as the real cancellation token stays cancelled.
    cancelled: bool,
    in_flight: BTreeMap<u64, InFlight>,
    next_handle: u64,
    last_reply: Option<Micros>,
    last_progress: Micros,
    costs: CostModel,
    step_scheduled: bool,
    outcome: Option<Outcome>,
    phase: String,
    legacy: bool,
    /// Changes sent on the current connection: what ENTRUST tells.
    changes_sent: u64,
    /// The checkpoint sent without waiting: its number, its request's
    /// handle, and, once it was answered (without error), how long after
    /// it was sent.
    checkpoint: Option<(u64, u64, Option<Micros>)>,
}

impl SourceRun {
    pub fn new(sc: &Scenario, image: Arc<Image>, life: u64) -> SourceRun {
        let action = sc.action;
        let mut config = SourceConfig::new(
            "destination".into(),
            image.path().display().to_string(),
            image.size(),
            action,
            BLOCK_SIZE,
        );
        config.chunk = CHUNK;
        config.window = SWEEP_WINDOW;
        // The migration goes on across `mirror`s of this source's life and
        // starts afresh with a new one; checkpoints come often enough for
        // the small simulated images to be cut between them.
        config.migration = image
            .held()
            .migration(|| life.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        config.checkpoint = image.held().checkpoint();
        config.checkpoint_every = (image.size() / 4).max(BLOCK_SIZE);
        config.checkpoint_gap = Duration::ZERO;
        // Checkpoints in the dirty passes as often as they can come: each
        // one outstanding while writes go behind it is an interleaving to
        // try.
        config.pass_checkpoint_gap = Duration::ZERO;
        config.pass_checkpoint_every = BLOCK_SIZE;
        SourceRun {
            machine: Source::new(config),
            image,
            life,
            conn: None,
            pending: VecDeque::new(),
            awaiting: None,
            broken: None,
            cancelled: false,
            in_flight: BTreeMap::new(),
            next_handle: 1,
            last_reply: None,
            last_progress: 0,
            costs: CostModel::default(),
            step_scheduled: false,
            outcome: None,
            phase: "connecting".into(),
            legacy: sc.legacy_source,
            changes_sent: 0,
            checkpoint: None,
        }
    }

    /// The phase `status` shows.
    pub fn phase(&self) -> String {
        self.phase.clone()
    }

    pub fn ended(&self) -> bool {
        self.outcome.is_some()
    }

    pub fn outcome(&self) -> Option<String> {
        self.outcome.as_ref().map(|o| format!("{o:?}"))
    }

    /// Begins the mirror.
    pub fn begin(&mut self, ctx: &mut SourceCtx) {
        let now = ctx.core().instant();
        let batch = self.machine.start(now);
        self.take(ctx, batch);
    }

    fn take(&mut self, ctx: &mut SourceCtx, batch: Vec<Effect>) {
        self.pending.extend(batch);
        self.schedule(ctx);
    }

    fn schedule(&mut self, ctx: &mut SourceCtx) {
        if !self.step_scheduled && self.awaiting.is_none() && !self.pending.is_empty() {
            self.step_scheduled = true;
            let life = self.life;
            ctx.core().at(1, Ev::SourceStep { life });
        }
    }

    /// Answers the outstanding effect, after the answer of the checkpoint
    /// sent without waiting if it came (as the real driver does).
    fn answer(&mut self, ctx: &mut SourceCtx, event: Event) {
        self.awaiting = None;
        if let Some((checkpoint, handle, Some(took))) = self.checkpoint {
            self.checkpoint = None;
            // Held only if nothing sent before it is still unanswered and
            // the connection did not fail (as `Pipe::poll_checkpoint`).
            let held =
                self.broken.is_none() && self.in_flight.keys().next().is_none_or(|&h| h > handle);
            // Its whole time counts as its sync: more than the real
            // driver's figure, so the source here flushes more before the
            // cut-off, never less.
            let answered = Event::CheckpointAnswered {
                checkpoint,
                held,
                sync: Duration::from_micros(took),
            };
            ctx.core().note(format!("source <- {answered:?}"));
            let now = ctx.core().instant();
            let batch = self.machine.handle(now, answered);
            self.take(ctx, batch);
        }
        if matches!(
            event,
            Event::Failed { .. } | Event::ConnectFailed { .. } | Event::Cancel
        ) {
            // The attempt is over: its connection closes at once.
            self.drop_connection(ctx);
        }
        ctx.core().note(format!("source <- {event:?}"));
        let now = ctx.core().instant();
        let batch = self.machine.handle(now, event);
        self.take(ctx, batch);
    }

    fn drop_connection(&mut self, ctx: &mut SourceCtx) {
        if let Some(c) = self.conn.take() {
            ctx.core().close(c, false);
        }
        self.in_flight.clear();
        self.broken = None;
        self.checkpoint = None;
        self.last_reply = None;
        self.costs = CostModel::default();
    }

    fn fail(&mut self, ctx: &mut SourceCtx, why: &str) {
        self.answer(ctx, Event::Failed { reason: why.into() });
    }

    // ----- what the world tells the mirror ----------------------------------

    pub fn connected(&mut self, ctx: &mut SourceCtx, conn: u64, ok: bool) {
        if self.conn != Some(conn) || self.awaiting != Some(Effect::Connect) {
            return;
        }
        // The handshake needs the destination to still be there.
        let ok = ok && ctx.dest_listening() && ctx.core().conns.get(&conn).is_some_and(|c| c.up);
        if ok {
            self.last_progress = ctx.core().now;
            ctx.core()
                .ledger
                .copy_restarts(super::scenario::SOURCE, super::scenario::DEST);
            let flags = flags::HAS_FLAGS | flags::SEND_FLUSH | flags::SEND_WRITE_ZEROES;
            self.answer(
                ctx,
                Event::Connected {
                    flags,
                    link: "simulated".into(),
                    // The simulated destination is this version's.
                    resumable: true,
                },
            );
        } else {
            self.answer(
                ctx,
                Event::ConnectFailed {
                    outcome: FirstOutcome::FailConnect,
                    message: "cannot connect to the destination: connection refused".into(),
                },
            );
        }
    }

    /// RESUME's answer arrived.
    pub fn answered(&mut self, ctx: &mut SourceCtx, conn: u64, handle: u64, value: u64) {
        if self.conn != Some(conn) {
            return;
        }
        if self.in_flight.remove(&handle).is_none() {
            return self.lost(ctx, conn, "an answer to no request in flight");
        }
        self.last_progress = ctx.core().now;
        if matches!(self.awaiting, Some(Effect::QueryResume { .. })) {
            // The simulated destination is not asked whether it is empty.
            self.answer(
                ctx,
                Event::ResumeAnswer {
                    checkpoint: Some(value),
                    empty: false,
                },
            );
        }
    }

    pub fn reply(&mut self, ctx: &mut SourceCtx, conn: u64, handle: u64, error: u32) {
        if self.conn != Some(conn) {
            return;
        }
        let now = ctx.core().now;
        let Some(req) = self.in_flight.remove(&handle) else {
            return self.lost(ctx, conn, "a reply to no request in flight");
        };
        self.last_progress = now;
        let sent_ahead = match &mut self.checkpoint {
            Some((_, h, answered)) if *h == handle => {
                if error != 0 {
                    return self.lost(
                        ctx,
                        conn,
                        "the destination answered checkpoint with an error",
                    );
                }
                *answered = Some(now.saturating_sub(req.sent));
                true
            }
            _ => false,
        };
        if matches!(req.kind, "write" | "zeroes") {
            if error != 0 {
                return self.lost(ctx, conn, "the destination answered a write with an error");
            }
            if req.measure {
                let began = self.last_reply.map_or(req.sent, |r| r.max(req.sent));
                let origin = ctx.core().origin;
                self.costs.record(
                    req.len,
                    Duration::from_micros(now - began),
                    origin + Duration::from_micros(now),
                );
            }
        }
        self.last_reply = Some(now);
        match &self.awaiting {
            Some(Effect::Flush | Effect::Entrust)
                if matches!(req.kind, "flush" | "entrust") && !sent_ahead =>
            {
                self.answer(ctx, Event::Reply { error })
            }
            // An old destination answers RESUME with an error.
            Some(Effect::QueryResume { .. }) if req.kind == "resume" => self.answer(
                ctx,
                Event::ResumeAnswer {
                    checkpoint: None,
                    empty: false,
                },
            ),
            Some(
                Effect::SendData { .. } | Effect::CompareData { .. } | Effect::SendHole { .. },
            ) => {
                // A slot in the window is free: send what waited for it.
                let effect = self.awaiting.take().expect("just matched");
                self.start(ctx, effect);
            }
            Some(Effect::WaitIdle) if self.in_flight.is_empty() => self.answer(ctx, Event::Idle),
            Some(Effect::WaitQueue { .. }) if !self.data_in_flight() => {
                self.answer(ctx, Event::QueueDrained)
            }
            _ => {}
        }
    }

    /// The connection broke.
    pub fn lost(&mut self, ctx: &mut SourceCtx, conn: u64, why: &str) {
        if self.conn != Some(conn) {
            return;
        }
        ctx.core().note(format!("source: connection lost: {why}"));
        if let Some(c) = self.conn {
            ctx.core().close(c, false);
        }
        self.in_flight.clear();
        self.broken = Some(why.to_string());
        // An effect waiting on the connection learns it now; any other
        // effect runs on and the next one that uses the connection fails.
        if self.awaiting.as_ref().is_some_and(uses_connection) {
            self.fail(ctx, why);
        }
    }

    pub fn cancel(&mut self, ctx: &mut SourceCtx) {
        ctx.core().note("source: break");
        self.cancelled = true;
        if self.awaiting.as_ref().is_some_and(|e| e.cancellable()) {
            self.answer(ctx, Event::Cancel);
        }
    }

    pub fn timer(&mut self, ctx: &mut SourceCtx, what: Timer) {
        match what {
            Timer::Retry
                if self
                    .awaiting
                    .as_ref()
                    .is_some_and(|e| matches!(e, Effect::ArmRetry { .. })) =>
            {
                self.answer(ctx, Event::RetryTimerFired);
            }
            Timer::Progress => {
                let now = ctx.core().now;
                let limit = micros(crate::mirror::REQUEST_LIMIT_DEFAULT);
                if let Some(conn) = self.conn {
                    if self.in_flight.is_empty() {
                        return;
                    }
                    if now >= self.last_progress + limit {
                        let why = format!(
                            "no progress for {:.1} s (request timeout)",
                            limit as f64 / 1e6
                        );
                        return self.lost(ctx, conn, &why);
                    }
                    let life = self.life;
                    let at = self.last_progress + limit - now;
                    ctx.core().at(
                        at,
                        Ev::SourceTimer {
                            life,
                            what: Timer::Progress,
                        },
                    );
                }
            }
            Timer::Connect if self.awaiting == Some(Effect::Connect) => {
                self.answer(
                    ctx,
                    Event::ConnectFailed {
                        outcome: FirstOutcome::FailConnect,
                        message: "cannot connect to the destination: connection timed out".into(),
                    },
                );
            }
            _ => {}
        }
    }

    // ----- carrying out effects ----------------------------------------------

    /// Sends `req`; `None` if the connection is gone.
    /// Whether a write (data or zeroes) is still unanswered: what Measure
    /// counts in flight.
    fn data_in_flight(&self) -> bool {
        self.in_flight
            .values()
            .any(|r| matches!(r.kind, "write" | "zeroes"))
    }

    fn send(&mut self, ctx: &mut SourceCtx, req: Req, measure: bool) -> Option<u64> {
        let conn = self.conn?;
        if self.broken.is_some() {
            return None;
        }
        let handle = self.next_handle;
        self.next_handle += 1;
        let change = matches!(req, Req::Write { .. } | Req::Zeroes { .. });
        let (kind, len) = match &req {
            Req::Write { data, .. } => ("write", data.len() as u64),
            Req::Zeroes { len, .. } => ("zeroes", *len),
            other => (other.name(), 0),
        };
        if !ctx.core().send(conn, true, Msg::Req { handle, req }) {
            return None;
        }
        if change {
            self.changes_sent += 1;
        }
        let now = ctx.core().now;
        if self.in_flight.is_empty() {
            self.last_progress = now;
            let life = self.life;
            let limit = micros(crate::mirror::REQUEST_LIMIT_DEFAULT);
            ctx.core().at(
                limit,
                Ev::SourceTimer {
                    life,
                    what: Timer::Progress,
                },
            );
        }
        self.in_flight.insert(
            handle,
            InFlight {
                kind,
                len,
                sent: now,
                measure,
            },
        );
        Some(handle)
    }

    /// Carries out the next effect of the batch.
    pub fn step(&mut self, ctx: &mut SourceCtx) {
        self.step_scheduled = false;
        if self.awaiting.is_some() {
            return;
        }
        let Some(effect) = self.pending.pop_front() else {
            return;
        };
        ctx.core().note(format!("source -> {effect:?}"));
        if effect.awaits() {
            return self.start(ctx, effect);
        }
        match effect {
            Effect::StartTracking => self.image.start_tracking(),
            Effect::BeginHeld { resume } => {
                self.image.held().begin(resume);
                ctx.core().resumed += u64::from(resume);
            }
            Effect::Held { checkpoint } => self.image.held().commit(checkpoint),
            Effect::SendCheckpoint {
                migration,
                checkpoint,
            } => {
                // As the real driver: what it covers is recorded as it goes.
                self.image.held().ask();
                let req = Req::Checkpoint {
                    migration,
                    checkpoint,
                };
                // A send that fails leaves the connection broken: the next
                // effect that uses it fails.
                if let Some(handle) = self.send(ctx, req, false) {
                    self.checkpoint = Some((checkpoint, handle, None));
                }
            }
            Effect::StopTracking => self.image.stop_tracking(),
            Effect::SetPhase(p) => self.phase = p.name().to_string(),
            Effect::ClearDirty { offset, len } => self.image.clear_dirty(offset, len),
            Effect::SetPace { capacity, below } => {
                self.image.set_pace(capacity.map(|c| c.pace_rates()), below)
            }
            Effect::AllowClients => ctx.serve().cut_off = false,
            Effect::Finish(outcome) => {
                self.drop_connection(ctx);
                self.outcome = Some(outcome);
                return;
            }
            // Status, log lines and milestones change nothing here; the
            // trace has them.
            _ => {}
        }
        self.schedule(ctx);
    }

    /// Starts an effect that awaits an answer.
    fn start(&mut self, ctx: &mut SourceCtx, effect: Effect) {
        if self.cancelled && effect.cancellable() {
            self.awaiting = Some(effect);
            return self.answer(ctx, Event::Cancel);
        }
        if uses_connection(&effect) {
            if let Some(why) = self.broken.clone() {
                self.awaiting = Some(effect);
                return self.fail(ctx, &why);
            }
        }
        match effect {
            Effect::Connect => {
                let conn = ctx.core().open_conn();
                self.conn = Some(conn);
                self.changes_sent = 0;
                self.awaiting = Some(Effect::Connect);
                let lat = ctx.core().sc.latency_us;
                let life = self.life;
                if ctx.core().blackholed() {
                    let t = micros(crate::mirror::CONNECT_TIMEOUT);
                    ctx.core().at(
                        t,
                        Ev::SourceTimer {
                            life,
                            what: Timer::Connect,
                        },
                    );
                } else {
                    let ok = ctx.dest_listening();
                    ctx.core().at(2 * lat, Ev::Connect { conn, ok });
                }
            }
            Effect::MeasureCapacity => {
                let capacity = self
                    .costs
                    .costs()
                    .map(|c| Capacity::new(c, None, self.costs.throughput()));
                self.awaiting = Some(effect);
                self.answer(
                    ctx,
                    Event::Capacity {
                        capacity,
                        speed_limit: None,
                    },
                );
            }
            Effect::AskExtents { offset, len, held } => {
                self.awaiting = Some(effect);
                let extents = self.image.sweep_extents(offset, len, held);
                self.answer(ctx, Event::Extents(extents));
            }
            Effect::QueryResume { migration } => {
                self.awaiting = Some(effect);
                if self.legacy {
                    // An old source asks nothing of the sort.
                    return self.answer(
                        ctx,
                        Event::ResumeAnswer {
                            checkpoint: None,
                            empty: false,
                        },
                    );
                }
                if self.send(ctx, Req::Resume { migration }, false).is_none() {
                    self.fail(ctx, "the destination closed the connection");
                }
            }
            // Compared data goes as data: the simulated destination keeps no
            // digests, and sending what may not differ is always correct.
            Effect::SendData { offset, len }
            | Effect::CompareData { offset, len }
            | Effect::SendHole { offset, len, .. } => {
                if self.in_flight.len() >= WINDOW {
                    // Wait for a slot (a reply).
                    self.awaiting = Some(effect);
                    return;
                }
                // As the real mirror does (store/held.rs): marked sent before
                // it is read, and a hole looked at again after the mark.
                self.image.held().mark_sent(offset, len);
                let still_hole = matches!(
                    self.image.extents(offset, len, 1).first(),
                    Some(&(n, true)) if n >= len
                );
                let req = match effect {
                    Effect::SendHole { zeroes: true, .. } if still_hole => {
                        Req::Zeroes { offset, len }
                    }
                    Effect::SendHole { .. } if still_hole => Req::Write {
                        offset,
                        data: vec![0u8; len as usize],
                    },
                    _ => {
                        let mut data = vec![0u8; len as usize];
                        if let Err(e) = self.image.read_at(&mut data, offset) {
                            self.awaiting = Some(effect);
                            return self
                                .fail(ctx, &format!("reading the source image failed: {e}"));
                        }
                        Req::Write { offset, data }
                    }
                };
                let measure =
                    matches!(effect, Effect::SendData { .. } | Effect::CompareData { .. });
                let compared = matches!(effect, Effect::CompareData { .. });
                self.awaiting = Some(effect);
                match self.send(ctx, req, measure) {
                    Some(_) => {
                        ctx.core().mark(Mark::SentWrite);
                        // Compared data goes as data, as if all differed.
                        let event = if compared {
                            Event::Compared {
                                same: 0,
                                differed: len,
                            }
                        } else {
                            Event::Sent
                        };
                        self.answer(ctx, event);
                    }
                    None => self.fail(ctx, "the destination closed the connection"),
                }
            }
            Effect::TakeDirty {
                max_bytes,
                max_run,
                gap,
            } => {
                self.awaiting = Some(effect);
                let ranges = self.image.take_dirty(max_bytes, max_run, gap);
                self.answer(ctx, Event::DirtyTaken(ranges));
            }
            Effect::Measure => {
                self.awaiting = Some(effect);
                let in_flight_bytes = self
                    .in_flight
                    .values()
                    .filter(|r| matches!(r.kind, "write" | "zeroes"))
                    .map(|r| r.len)
                    .sum();
                let in_flight = self
                    .in_flight
                    .values()
                    .filter(|r| matches!(r.kind, "write" | "zeroes"))
                    .count() as u64;
                let dirty_bytes = self.image.dirty_bytes();
                self.answer(
                    ctx,
                    Event::Measured {
                        dirty_bytes,
                        in_flight,
                        in_flight_bytes,
                        // The simulated network has no bottleneck to
                        // queue for: count all of it, as the real driver
                        // does before a rate is measured.
                        queued_bytes: in_flight_bytes,
                    },
                );
            }
            // Every write in flight counts as queued (Measure): drained
            // once all are answered, as the driver's wait with a rate that
            // cannot tell the queue from the round trip. (Answered at once,
            // a pass with nothing dirty would measure, wait and measure
            // again without end in no simulated time.)
            Effect::WaitQueue { .. } => {
                self.awaiting = Some(effect);
                if !self.data_in_flight() {
                    self.answer(ctx, Event::QueueDrained);
                }
            }
            Effect::CountRuns { gap, limit } => {
                self.awaiting = Some(effect);
                let runs = self.image.dirty_runs(gap, limit);
                self.answer(ctx, Event::Runs(runs));
            }
            Effect::WaitIdle => {
                self.awaiting = Some(effect);
                if self.in_flight.is_empty() {
                    self.answer(ctx, Event::Idle);
                }
            }
            Effect::Flush | Effect::Entrust => {
                let entrust = effect == Effect::Entrust;
                self.awaiting = Some(effect);
                if entrust {
                    ctx.core().mark(Mark::SentEntrust);
                    if self.legacy {
                        // An old source sends no ENTRUST.
                        return self.answer(ctx, Event::Reply { error: 0 });
                    }
                }
                let req = if entrust {
                    let told = entrust_offset(self.changes_sent, self.image.size());
                    Req::Entrust { told }
                } else {
                    Req::Flush
                };
                if self.send(ctx, req, false).is_none() {
                    self.fail(ctx, "the destination closed the connection");
                }
            }
            Effect::CutOffClients { .. } => {
                // Client requests are atomic here: none is half done.
                ctx.serve().cut_off = true;
                ctx.core().mark(Mark::CutOff);
                self.awaiting = Some(effect);
                self.answer(ctx, Event::ClientsCutOff);
            }
            Effect::CloseServer => {
                ctx.serve().closed = true;
                self.awaiting = Some(effect);
                self.answer(ctx, Event::ServerClosed);
            }
            Effect::Unlink => {
                // As `mirror` does: through the image's own file operations.
                let path = self.image.path().to_owned();
                let r = crate::handoff::unlink_durably(&**self.image.files(), &path)
                    .map_err(|e| e.to_string());
                if r.is_ok() {
                    ctx.core().mark(Mark::Unlinked);
                }
                self.awaiting = Some(effect);
                self.answer(ctx, Event::Unlinked(r));
            }
            Effect::Disconnect => {
                let sent = match (self.conn, &self.broken) {
                    (Some(conn), None) => ctx.core().send(
                        conn,
                        true,
                        Msg::Req {
                            handle: 0,
                            req: Req::Disconnect,
                        },
                    ),
                    _ => false,
                };
                let r = if sent {
                    ctx.world.disconnect_sent = true;
                    ctx.core().mark(Mark::SentDisconnect);
                    Ok(())
                } else {
                    Err("the connection to the destination is gone".to_string())
                };
                // The pipe is given up after DISCONNECT: closing it is the
                // end of the connection.
                if let Some(c) = self.conn.take() {
                    ctx.core().close(c, false);
                }
                self.awaiting = Some(effect);
                self.answer(ctx, Event::DisconnectSent(r));
            }
            Effect::ArmRetry { delay } => {
                self.awaiting = Some(effect);
                let life = self.life;
                ctx.core().at(
                    micros(delay).max(1),
                    Ev::SourceTimer {
                        life,
                        what: Timer::Retry,
                    },
                );
            }
            other => unreachable!("{other:?} answers nothing"),
        }
    }
}
