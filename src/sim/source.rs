//! The source's mirror in the simulation: the hand-off machine, with the
//! simulated network and the source's real `Image` carrying out its
//! effects.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::store::Image;

use super::host::{SourceCtx, CONNECT_TIMEOUT, REQUEST_LIMIT};
use super::scenario::{Action, Mark, Scenario};
use super::world::{Ev, Micros, Msg, Req, Timer};

/// Requests in flight at once.
const WINDOW: usize = 8;
/// The sweep's and the dirty passes' largest write.
pub const CHUNK: u64 = 16 * 1024;

/// What the machine is told.
#[derive(Debug)]
pub enum SourceEvent {
    Connected,
    ConnectFailed(String),
    Idle,
    Dirty(Vec<(u64, u64)>),
    Replied { error: u32 },
    CutOff,
    Unlinked(Result<(), String>),
    DisconnectSent(Result<(), String>),
    Lost(String),
    RetryDue,
    Cancel,
}

/// What the machine asks for.
#[derive(Debug)]
pub enum SourceEffect {
    StartTracking,
    StopTracking,
    Send(u64, u64),
    WaitIdle,
    TakeDirty,
    Entrust,
    CutOffClients,
    AllowClients,
    CloseServer,
    Unlink,
    Disconnect,
    Retry,
    Finish(String),
}

/// A stand-in hand-off machine.
struct Machine {
    size: u64,
    action: Action,
    phase: u8,
    first: bool,
    passes: u32,
}

impl Machine {
    fn handle(&mut self, ev: SourceEvent) -> Vec<SourceEffect> {
        use SourceEffect as E;
        use SourceEvent as V;
        match ev {
            V::Connected => {
                self.first = false;
                self.phase = 1;
                self.passes = 0;
                let mut out = vec![E::StartTracking];
                let mut at = 0;
                while at < self.size {
                    let n = CHUNK.min(self.size - at);
                    out.push(E::Send(at, n));
                    at += n;
                }
                out.push(E::WaitIdle);
                out
            }
            V::ConnectFailed(why) | V::Lost(why) => {
                if self.first {
                    vec![
                        E::StopTracking,
                        E::Finish(format!("FirstAttemptFailed: {why}")),
                    ]
                } else {
                    self.phase = 0;
                    vec![E::AllowClients, E::Retry]
                }
            }
            V::RetryDue => vec![],
            // Past the hand-off's start nothing is abandoned.
            V::Cancel if self.phase >= 3 => vec![],
            V::Cancel => vec![
                E::StopTracking,
                E::AllowClients,
                E::Finish("Abandoned".into()),
            ],
            V::Idle => match self.phase {
                1 => vec![E::TakeDirty],
                2 => vec![E::Entrust],
                _ => vec![],
            },
            V::Dirty(ranges) => {
                self.passes += 1;
                let bytes: u64 = ranges.iter().map(|r| r.1).sum();
                let mut out: Vec<SourceEffect> =
                    ranges.iter().map(|&(o, l)| E::Send(o, l)).collect();
                if self.phase == 1 && (bytes < 64 * 1024 || self.passes > 20) {
                    self.phase = 2;
                    out.push(E::CutOffClients);
                } else {
                    out.push(E::WaitIdle);
                }
                out
            }
            V::CutOff => vec![E::TakeDirty],
            V::Replied { error } => {
                if error != 0 {
                    self.phase = 0;
                    return vec![E::AllowClients, E::Retry];
                }
                if self.action != Action::Nothing {
                    self.phase = 3;
                }
                match self.action {
                    Action::Nothing => vec![
                        E::StopTracking,
                        E::AllowClients,
                        E::Finish("CopiedAndKept".into()),
                    ],
                    Action::Unlink => vec![E::CloseServer, E::Unlink],
                    Action::Exit => vec![E::CloseServer, E::Disconnect],
                }
            }
            V::Unlinked(Ok(())) => vec![E::Disconnect],
            V::Unlinked(Err(e)) => vec![E::Finish(format!("DisconnectFailed: {e}"))],
            V::DisconnectSent(Ok(())) => vec![E::Finish("HandedOff".into())],
            V::DisconnectSent(Err(e)) => vec![E::Finish(format!("DisconnectFailed: {e}"))],
        }
    }
}

/// What the driver waits for before carrying out the next effect.
#[derive(Debug, PartialEq)]
enum Wait {
    Nothing,
    Connect,
    Window,
    Idle,
    Reply(u64),
    Retry,
}

pub struct SourceRun {
    machine: Machine,
    image: Arc<Image>,
    life: u64,
    conn: Option<u64>,
    effects: VecDeque<SourceEffect>,
    wait: Wait,
    in_flight: BTreeMap<u64, (&'static str, Micros)>,
    next_handle: u64,
    last_progress: Micros,
    step_scheduled: bool,
    outcome: Option<String>,
    legacy: bool,
    /// The final dirty pass after the cut-off: its dirty ranges go out,
    /// then everything waits for idle before ENTRUST.
    final_pass: bool,
}

impl SourceRun {
    pub fn new(sc: &Scenario, image: Arc<Image>, life: u64) -> SourceRun {
        SourceRun {
            machine: Machine {
                size: image.size(),
                action: sc.action,
                phase: 0,
                first: true,
                passes: 0,
            },
            image,
            life,
            conn: None,
            effects: VecDeque::new(),
            wait: Wait::Nothing,
            in_flight: BTreeMap::new(),
            next_handle: 1,
            last_progress: 0,
            step_scheduled: false,
            outcome: None,
            legacy: sc.legacy_source,
            final_pass: false,
        }
    }

    /// The phase `status` would show.
    pub fn phase(&self) -> String {
        format!("{}", self.machine.phase)
    }

    pub fn ended(&self) -> bool {
        self.outcome.is_some()
    }

    pub fn outcome(&self) -> Option<String> {
        self.outcome.clone()
    }

    fn feed(&mut self, ctx: &mut SourceCtx, ev: SourceEvent) {
        ctx.core().note(format!("source <- {ev:?}"));
        let effects = self.machine.handle(ev);
        self.effects.extend(effects);
        self.wait = Wait::Nothing;
        self.schedule(ctx);
    }

    fn schedule(&mut self, ctx: &mut SourceCtx) {
        if !self.step_scheduled && self.wait == Wait::Nothing && !self.effects.is_empty() {
            self.step_scheduled = true;
            let life = self.life;
            ctx.core().at(1, Ev::SourceStep { life });
        }
    }

    /// Connects to the destination.
    pub fn begin(&mut self, ctx: &mut SourceCtx) {
        let conn = ctx.core().open_conn();
        self.conn = Some(conn);
        self.wait = Wait::Connect;
        let lat = ctx.core().sc.latency_us;
        if ctx.core().blackholed() {
            ctx.core()
                .at(CONNECT_TIMEOUT, Ev::Connect { conn, ok: false });
        } else {
            let ok = ctx.dest_listening();
            ctx.core().at(2 * lat, Ev::Connect { conn, ok });
        }
    }

    pub fn connected(&mut self, ctx: &mut SourceCtx, conn: u64, ok: bool) {
        if self.conn != Some(conn) || self.wait != Wait::Connect {
            return;
        }
        // The handshake needs the destination to still be there.
        let ok = ok && ctx.dest_listening() && ctx.core().conns.get(&conn).is_some_and(|c| c.up);
        if ok {
            self.last_progress = ctx.core().now;
            ctx.core()
                .ledger
                .copy_restarts(super::scenario::SOURCE, super::scenario::DEST);
            self.feed(ctx, SourceEvent::Connected);
        } else {
            self.conn = None;
            self.feed(ctx, SourceEvent::ConnectFailed("cannot connect".into()));
        }
    }

    pub fn reply(&mut self, ctx: &mut SourceCtx, conn: u64, handle: u64, error: u32) {
        if self.conn != Some(conn) {
            return;
        }
        let Some((kind, _sent)) = self.in_flight.remove(&handle) else {
            return self.lost(ctx, conn, "a reply to no request in flight");
        };
        self.last_progress = ctx.core().now;
        if matches!(kind, "write" | "zeroes") && error != 0 {
            return self.lost(ctx, conn, "the destination answered a write with an error");
        }
        match self.wait {
            Wait::Reply(h) if h == handle => self.feed(ctx, SourceEvent::Replied { error }),
            Wait::Window => {
                self.wait = Wait::Nothing;
                self.schedule(ctx);
            }
            Wait::Idle if self.in_flight.is_empty() => self.feed(ctx, SourceEvent::Idle),
            _ => {}
        }
    }

    pub fn lost(&mut self, ctx: &mut SourceCtx, conn: u64, why: &str) {
        if self.conn != Some(conn) {
            return;
        }
        ctx.core().close(conn, false);
        self.conn = None;
        self.in_flight.clear();
        self.effects.clear();
        self.feed(ctx, SourceEvent::Lost(why.into()));
    }

    pub fn cancel(&mut self, ctx: &mut SourceCtx) {
        ctx.core().note("source <- Cancel");
        let out = self.machine.handle(SourceEvent::Cancel);
        if out.is_empty() {
            return; // not abandoned (the hand-off has begun)
        }
        if let Some(c) = self.conn.take() {
            ctx.core().close(c, false);
        }
        self.in_flight.clear();
        self.effects.clear();
        self.effects.extend(out);
        self.wait = Wait::Nothing;
        self.schedule(ctx);
    }

    pub fn timer(&mut self, ctx: &mut SourceCtx, what: Timer) {
        match what {
            Timer::Retry if self.wait == Wait::Retry => {
                self.wait = Wait::Nothing;
                self.begin(ctx);
            }
            Timer::Progress => {
                let now = ctx.core().now;
                if let Some(conn) = self.conn {
                    if !self.in_flight.is_empty() && now >= self.last_progress + REQUEST_LIMIT {
                        return self.lost(ctx, conn, "no progress (request timeout)");
                    }
                    if !self.in_flight.is_empty() {
                        let life = self.life;
                        let at = self.last_progress + REQUEST_LIMIT - now;
                        ctx.core().at(
                            at.max(1),
                            Ev::SourceTimer {
                                life,
                                what: Timer::Progress,
                            },
                        );
                    }
                }
            }
            _ => {}
        }
    }

    fn send(&mut self, ctx: &mut SourceCtx, req: Req) -> Option<u64> {
        let conn = self.conn?;
        let handle = self.next_handle;
        self.next_handle += 1;
        let kind = req.name();
        let was_idle = self.in_flight.is_empty();
        if !ctx.core().send(conn, true, Msg::Req { handle, req }) {
            return None;
        }
        let now = ctx.core().now;
        self.in_flight.insert(handle, (kind, now));
        if was_idle {
            self.last_progress = now;
            let life = self.life;
            ctx.core().at(
                REQUEST_LIMIT,
                Ev::SourceTimer {
                    life,
                    what: Timer::Progress,
                },
            );
        }
        Some(handle)
    }

    /// Carries out the next effect.
    pub fn step(&mut self, ctx: &mut SourceCtx) {
        self.step_scheduled = false;
        if self.wait != Wait::Nothing {
            return;
        }
        let Some(effect) = self.effects.pop_front() else {
            return;
        };
        ctx.core().note(format!("source -> {effect:?}"));
        use SourceEffect as E;
        match effect {
            E::StartTracking => self.image.start_tracking(),
            E::StopTracking => self.image.stop_tracking(),
            E::Send(offset, len) => {
                if self.in_flight.len() >= WINDOW {
                    self.effects.push_front(E::Send(offset, len));
                    self.wait = Wait::Window;
                    return;
                }
                // Clear, then read: a client write after the clear is seen
                // by the read or marked again.
                self.image.clear_dirty(offset, len);
                let mut data = vec![0u8; len as usize];
                if let Err(e) = self.image.read_at(&mut data, offset) {
                    ctx.core()
                        .violation(format!("the source image cannot be read: {e}"));
                    return;
                }
                let conn = self.conn;
                if self.send(ctx, Req::Write { offset, data }).is_none() {
                    if let Some(conn) = conn {
                        return self.lost(ctx, conn, "send failed");
                    }
                    return;
                }
                ctx.core().mark(Mark::SentWrite);
            }
            E::WaitIdle => {
                if self.in_flight.is_empty() {
                    return self.feed(ctx, SourceEvent::Idle);
                }
                self.wait = Wait::Idle;
                return;
            }
            E::TakeDirty => {
                let ranges = self.image.take_dirty(u64::MAX, CHUNK, 0);
                if self.final_pass {
                    // Handled by the machine's phase.
                }
                return self.feed(ctx, SourceEvent::Dirty(ranges));
            }
            E::Entrust => {
                ctx.core().mark(Mark::SentEntrust);
                if self.legacy {
                    // An old source sends no ENTRUST.
                    return self.feed(ctx, SourceEvent::Replied { error: 0 });
                }
                let conn = self.conn;
                match self.send(ctx, Req::Entrust) {
                    Some(h) => {
                        self.wait = Wait::Reply(h);
                        return;
                    }
                    None => {
                        if let Some(conn) = conn {
                            return self.lost(ctx, conn, "send failed");
                        }
                        return;
                    }
                }
            }
            E::CutOffClients => {
                ctx.serve().cut_off = true;
                ctx.core().mark(Mark::CutOff);
                return self.feed(ctx, SourceEvent::CutOff);
            }
            E::AllowClients => ctx.serve().cut_off = false,
            E::CloseServer => ctx.serve().closed = true,
            E::Unlink => {
                let path = self.image.path().to_owned();
                let ops = ctx.fs();
                let r = crate::handoff::unlink_durably(&*ops, &path).map_err(|e| e.to_string());
                if r.is_ok() {
                    ctx.core().mark(Mark::Unlinked);
                }
                return self.feed(ctx, SourceEvent::Unlinked(r));
            }
            E::Disconnect => {
                let r = match self.conn {
                    Some(conn)
                        if ctx.core().send(
                            conn,
                            true,
                            Msg::Req {
                                handle: 0,
                                req: Req::Disconnect,
                            },
                        ) =>
                    {
                        Ok(())
                    }
                    _ => Err("the connection is gone".to_string()),
                };
                if r.is_ok() {
                    ctx.world.disconnect_sent = true;
                    ctx.core().mark(Mark::SentDisconnect);
                }
                return self.feed(ctx, SourceEvent::DisconnectSent(r));
            }
            E::Retry => {
                self.wait = Wait::Retry;
                let life = self.life;
                ctx.core().at(
                    1_000_000,
                    Ev::SourceTimer {
                        life,
                        what: Timer::Retry,
                    },
                );
                return;
            }
            E::Finish(outcome) => {
                self.outcome = Some(outcome);
                return;
            }
        }
        self.schedule(ctx);
    }
}
