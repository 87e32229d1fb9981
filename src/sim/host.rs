//! The processes of the simulated hosts, and what the world does with each
//! event.

use std::sync::Arc;

use crate::handoff::{self, MarkerState, Verdict};
use crate::store::files::FileOps;
use crate::store::{Image, ImageStore, Stack};

use super::disk::SECTOR;
use super::ledger::{self, HOSTS};
use super::scenario::{FaultKind, Mark, MirrorAction, DEST, SOURCE};
use super::source::SourceRun;
use super::world::{image_path, Client, ClientOp, Core, Ev, Host, Msg};

/// `flexnbd serve` on the source host, with its mirror when one runs.
pub struct Serve {
    pub image: Arc<Image>,
    /// No client write is acknowledged while set (the mirror's cut-off).
    pub cut_off: bool,
    /// The listening socket is closed for good (hand-off).
    pub closed: bool,
    pub mirror: Option<SourceRun>,
    /// The mirror ended by handing off: the process exits.
    pub exited: bool,
}

/// `flexnbd listen` on the destination host, then, once it completed,
/// `flexnbd serve` there (a supervisor starts it at once).
pub enum DestProc {
    Down,
    Listen(Box<super::dest::Listen>),
    /// `listen` refused to start (a completed image): the supervisor
    /// starts `serve` instead.
    Serve(Arc<Image>),
}

pub struct World {
    pub core: Core,
    pub hosts: [Host; HOSTS],
    pub clients: Vec<Client>,
    /// The source's initial tag per sector.
    pub initial: Vec<u64>,
    pub serve: Option<Serve>,
    pub dest: DestProc,
    /// What each side reported at its end.
    pub source_outcome: Option<String>,
    pub handed_off: bool,
    pub dest_completed: bool,
    /// Snapshot of the source's tags when the destination answered the last
    /// ENTRUST: what an `entrusted` marker vouches for.
    pub entrusted: Option<Vec<u64>>,
    pub mirrors_started: u32,
    /// The source sent DISCONNECT: as far as it knows, migrated.
    pub disconnect_sent: bool,
    /// The kinds of the faults that struck so far.
    pub fired: Vec<&'static str>,
    /// Log tags: the world, the source host, the destination host.
    tags: [Arc<str>; 3],
    /// Clients were moved to the destination (it served them).
    pub dest_served: bool,
}

impl World {
    pub fn assemble(
        core: Core,
        hosts: [Host; HOSTS],
        clients: Vec<Client>,
        initial: Vec<u64>,
    ) -> World {
        World {
            core,
            hosts,
            clients,
            initial,
            serve: None,
            dest: DestProc::Down,
            source_outcome: None,
            handed_off: false,
            dest_completed: false,
            entrusted: None,
            mirrors_started: 0,
            disconnect_sent: false,
            fired: Vec::new(),
            tags: ["sim".into(), "sim source".into(), "sim destination".into()],
            dest_served: false,
        }
    }

    /// The host's image as its process opens it: the real `Image` over the
    /// simulated disk, with the host's simulated file system for the
    /// hand-off's files.
    fn image_on(&self, host: usize) -> Arc<Image> {
        let size = self.core.sc.sectors * SECTOR;
        let store: Arc<dyn ImageStore> = self.hosts[host].disk.clone();
        let files: Arc<dyn FileOps> = self.hosts[host].fs.clone();
        let stack = Stack {
            files,
            ..Stack::default()
        };
        Arc::new(Image::with_stack(image_path(host), size, store, stack))
    }

    pub fn start(&mut self) {
        self.start_serve();
        self.start_listen();
        self.core.at(1_000, Ev::Mirror);
        self.core.at(2_000, Ev::Status);
        for c in 0..self.clients.len() {
            let t = 100 + c as u64 * 37;
            self.core.at(t, Ev::Client { client: c });
        }
    }

    fn start_serve(&mut self) {
        let host = &mut self.hosts[SOURCE];
        host.life += 1;
        if !host.fs.exists(&image_path(SOURCE)) {
            self.core
                .note("serve: the source image is gone; not started");
            self.serve = None;
            return;
        }
        let image = self.image_on(SOURCE);
        self.core.note("serve started on the source");
        self.serve = Some(Serve {
            image,
            cut_off: false,
            closed: false,
            mirror: None,
            exited: false,
        });
    }

    fn start_listen(&mut self) {
        let host = &mut self.hosts[DEST];
        host.life += 1;
        let ops: Arc<dyn FileOps> = host.fs.clone();
        match super::dest::Listen::start(self.image_on(DEST), ops) {
            Ok(l) => {
                self.core.note("listen started on the destination");
                self.dest = DestProc::Listen(Box::new(l));
            }
            Err(why) => {
                self.core
                    .note(format!("listen refused: {why}; serve started instead"));
                self.dest = DestProc::Serve(self.image_on(DEST));
            }
        }
    }

    /// Handles one event, with its log lines (if the code under test logs
    /// any) tagged by the host it happens on.
    pub fn dispatch(&mut self, ev: Ev) {
        let tag = match &ev {
            Ev::DestStep { .. }
            | Ev::Deliver { to_dest: true, .. }
            | Ev::Closed { to_dest: true, .. } => 2,
            Ev::Restart { host } if *host == DEST => 2,
            Ev::Client { .. } | Ev::ClientReply { .. } | Ev::Fault { .. } | Ev::Status => 0,
            _ => 1,
        };
        let tag = self.tags[tag].clone();
        crate::log::scoped(&tag, || self.dispatch_tagged(ev));
    }

    fn dispatch_tagged(&mut self, ev: Ev) {
        match ev {
            Ev::Mirror => self.mirror_command(),
            Ev::Status => {
                // `status` answers from state the mirror keeps; it must
                // answer whatever the mirror is doing.
                let phase = self
                    .serve
                    .as_ref()
                    .and_then(|s| s.mirror.as_ref())
                    .map_or("none".to_string(), |m| m.phase());
                self.core.note(format!("status: mirror phase {phase}"));
                self.check_entrusted("while running");
                if self.core.now < 30_000_000 {
                    let every = 50_000 + self.core.rng.next_u64() % 200_000;
                    self.core.at(every, Ev::Status);
                }
            }
            Ev::Client { client } => self.client_op(client),
            Ev::ClientReply { client, op } => self.client_reply(client, op),
            Ev::Fault { index } => self.fault(index),
            Ev::Restart { host } => {
                if host == SOURCE {
                    if self.disconnect_sent {
                        // Migrated: nobody starts the source again.
                        return;
                    }
                    self.start_serve();
                    // The operator starts the migration again.
                    self.core.at(1_000, Ev::Mirror);
                } else {
                    self.start_listen();
                }
            }
            Ev::Connect { conn, ok } => {
                self.with_mirror(|w, run| run.connected(w, conn, ok));
            }
            Ev::Deliver { conn, to_dest, msg } => {
                if to_dest {
                    self.dest_deliver(conn, msg);
                } else {
                    match msg {
                        Msg::Reply { handle, error } => {
                            self.with_mirror(|w, run| run.reply(w, conn, handle, error))
                        }
                        Msg::Answer { handle, value } => {
                            self.with_mirror(|w, run| run.answered(w, conn, handle, value))
                        }
                        Msg::Req { .. } => {}
                    }
                }
            }
            Ev::Closed { conn, to_dest } => {
                if to_dest {
                    if let DestProc::Listen(l) = &mut self.dest {
                        l.closed(&mut self.core, conn);
                    }
                    self.dest_pump();
                } else {
                    self.with_mirror(|w, run| {
                        run.lost(w, conn, "the destination closed the connection")
                    });
                }
            }
            Ev::SourceStep { life } => {
                if life == self.hosts[SOURCE].life {
                    self.with_mirror(|w, run| run.step(w));
                }
            }
            Ev::SourceTimer { life, what } => {
                if life == self.hosts[SOURCE].life {
                    self.with_mirror(|w, run| run.timer(w, what));
                }
            }
            Ev::DestStep { life } => {
                if life == self.hosts[DEST].life {
                    self.dest_step();
                }
            }
        }
    }

    /// Runs `f` on the mirror, if one runs, with the world at hand.
    fn with_mirror(&mut self, f: impl FnOnce(&mut SourceCtx, &mut SourceRun)) {
        let Some(serve) = &mut self.serve else { return };
        let Some(mut run) = serve.mirror.take() else {
            return;
        };
        let mut ctx = SourceCtx { world: self };
        f(&mut ctx, &mut run);
        if let Some(serve) = &mut self.serve {
            if run.ended() {
                let outcome = run.outcome().unwrap_or_default();
                self.core.note(format!("mirror ended: {outcome}"));
                self.source_outcome = Some(outcome.clone());
                if outcome.starts_with("HandedOff") || outcome.starts_with("DisconnectFailed") {
                    serve.exited = true;
                    self.handed_off |= outcome.starts_with("HandedOff");
                }
                if outcome.starts_with("FirstAttemptFailed") && self.mirrors_started < 20 {
                    // The operator tries again a little later.
                    self.core.at(500_000, Ev::Mirror);
                }
            } else {
                serve.mirror = Some(run);
            }
        }
        if self.serve.as_ref().is_some_and(|s| s.exited) {
            self.core.note("serve exited after the hand-off");
            self.serve = None;
        }
    }

    fn mirror_command(&mut self) {
        let Some(serve) = &mut self.serve else { return };
        if serve.mirror.is_some() || serve.exited || self.handed_off {
            return;
        }
        self.mirrors_started += 1;
        let sc = &self.core.sc;
        let run = SourceRun::new(sc, serve.image.clone(), self.hosts[SOURCE].life);
        serve.mirror = Some(run);
        self.core.note("mirror started");
        self.with_mirror(|w, run| run.begin(w));
    }

    // ----- clients ---------------------------------------------------------

    /// Where clients' requests go now: the source's `serve`, or after the
    /// hand-off the destination's; `None` while neither takes them.
    fn serving(&self) -> Option<(usize, Arc<Image>)> {
        // Once the destination completed, the clients' proxy points there.
        if let DestProc::Serve(image) = &self.dest {
            return Some((DEST, image.clone()));
        }
        if let Some(s) = &self.serve {
            if !s.cut_off && !s.closed && !s.exited {
                return Some((SOURCE, s.image.clone()));
            }
            return None;
        }
        None
    }

    fn client_op(&mut self, client: usize) {
        if self.clients[client].waiting.is_some() || self.clients[client].ops_left == 0 {
            return;
        }
        let Some((host, image)) = self.serving() else {
            // The proxy keeps trying to reconnect.
            if self.core.now < super::world::DEADLINE {
                self.core.at(5_000, Ev::Client { client });
            }
            return;
        };
        self.clients[client].ops_left -= 1;
        let op_no = World::next_client_op(&mut self.clients[client]);
        let sc = &self.core.sc;
        let (fua_p, flush_p, sectors) = (sc.fua_percent, sc.flush_percent, sc.sectors);
        let op = if self.core.rng.roll(flush_p) {
            ClientOp::Flush { covers: 0 }
        } else {
            let id = ((client as u64 + 1) << 32) | op_no;
            ClientOp::Write {
                id,
                fua: self.core.rng.roll(fua_p),
            }
        };
        // What the request needs before its reply: the server's own planner.
        use crate::core::request::{self, Step};
        use crate::proto::{cmd, cmd_flags};
        let plan = match op {
            ClientOp::Flush { .. } => request::plan(cmd::FLUSH, 0),
            ClientOp::Write { fua, .. } => {
                request::plan(cmd::WRITE, if fua { cmd_flags::FUA } else { 0 })
            }
        };
        let mut op = op;
        let (mut data, mut first) = (Vec::new(), 0);
        let volatile = self.core.ledger.volatile_on(host);
        match &mut op {
            ClientOp::Write { id, .. } => {
                let n = 1 + self.core.rng.next_u64() % 16;
                first = self.core.rng.next_u64() % (sectors - n + 1);
                data = vec![0u8; (n * SECTOR) as usize];
                ledger::fill(&mut data, *id);
                self.core.ledger.issue(*id, first, first + n);
            }
            ClientOp::Flush { covers } => *covers = volatile.len(),
        }
        for step in plan.steps {
            let r = match (step, &op) {
                (Step::Apply, ClientOp::Write { .. }) => image.write_at(&data, first * SECTOR),
                (Step::Sync, _) => image.sync(),
                _ => Ok(()),
            };
            if let Err(e) = r {
                self.core
                    .violation(format!("client request failed on host {host}: {e}"));
                return;
            }
        }
        // The reply, and what the client may count on from it (NBD's
        // promise, whatever the server did): a FUA write is durable, and a
        // FLUSH makes every write acknowledged before it durable.
        match op {
            ClientOp::Write { id, fua } => self.core.ledger.ack(id, host, fua),
            ClientOp::Flush { .. } => self.core.ledger.durable(host, &volatile),
        }
        if host == DEST {
            self.dest_served = true;
            self.core.mark(Mark::ServedOnDestination);
        }
        self.core
            .note(format!("client {client} op {op_no} {op:?} on host {host}"));
        self.clients[client].waiting = Some((op_no, op, host));
        let lat = self.core.sc.latency_us.min(500);
        self.core.at(lat, Ev::ClientReply { client, op: op_no });
    }

    fn client_reply(&mut self, client: usize, op: u64) {
        let c = &mut self.clients[client];
        if c.waiting.is_some_and(|(n, _, _)| n == op) {
            c.waiting = None;
            let think =
                self.core.sc.think_us / 2 + self.core.rng.next_u64() % self.core.sc.think_us;
            self.core.at(think, Ev::Client { client });
        }
    }

    // ----- the destination --------------------------------------------------

    fn dest_deliver(&mut self, conn: u64, msg: Msg) {
        let Msg::Req { handle, req } = msg else {
            return;
        };
        match &mut self.dest {
            DestProc::Listen(l) => {
                l.request(&mut self.core, conn, handle, req);
                self.dest_pump();
            }
            _ => {
                // Nobody listens: the connection is refused/reset.
                self.core.reset(conn);
            }
        }
    }

    /// Schedules the destination's next step if it has work.
    pub fn dest_pump(&mut self) {
        if let DestProc::Listen(l) = &mut self.dest {
            if l.wants_step() {
                let delay = l.next_cost(&self.core);
                let life = self.hosts[DEST].life;
                self.core.at(delay, Ev::DestStep { life });
            }
        }
    }

    fn dest_step(&mut self) {
        let DestProc::Listen(l) = &mut self.dest else {
            return;
        };
        l.scheduled = false;
        let done = l.step(&mut self.core);
        if l.take_entrusted() {
            // What the `entrusted` marker vouches for: the destination's
            // image as it is now, which nothing may change while the marker
            // says so.
            self.entrusted = Some(ledger::tags(&self.hosts[DEST].disk.content()));
            // The destination vouches that everything acknowledged is
            // durable on it.
            let all = self.core.ledger.volatile_on(DEST);
            self.core.ledger.durable(DEST, &all);
        }
        if done {
            self.dest_completed = true;
            let all = self.core.ledger.volatile_on(DEST);
            self.core.ledger.durable(DEST, &all);
            self.core
                .note("listen completed; serve started on the destination");
            self.hosts[DEST].life += 1;
            self.dest = DestProc::Serve(self.image_on(DEST));
            return;
        }
        self.dest_pump();
    }

    // ----- faults -----------------------------------------------------------

    fn fault(&mut self, index: usize) {
        let f = self.core.sc.faults[index];
        self.core.note(format!("fault {index}: {:?}", f.what));
        self.fired.push(f.what.name());
        match f.what {
            FaultKind::Reset => {
                let up = self.core.open_conns();
                for c in up {
                    self.core.reset(c);
                }
            }
            FaultKind::Blackhole { us } => {
                self.core.blackhole_until = self.core.now + us;
            }
            FaultKind::Crash { host, restart_us } => {
                self.kill(host);
                self.core.at(restart_us, Ev::Restart { host });
            }
            FaultKind::PowerCut {
                host,
                loss,
                restart_us,
            } => {
                self.kill(host);
                let reverted = self.hosts[host].disk.power_cut(loss, &mut self.core.rng);
                self.hosts[host].fs.power_cut(loss, &mut self.core.rng);
                self.core.ledger.power_cut();
                self.core.note(format!(
                    "power cut on host {host}: {reverted} sectors reverted"
                ));
                self.core.at(restart_us, Ev::Restart { host });
            }
            FaultKind::Break { again_us } => {
                self.with_mirror(|w, run| run.cancel(w));
                self.core.at(again_us, Ev::Mirror);
            }
        }
    }

    /// The process on `host` dies: its connections close (the kernel
    /// resets them), its state is gone.
    fn kill(&mut self, host: usize) {
        self.hosts[host].life += 1;
        let conns = self.core.open_conns();
        for c in conns {
            self.core.close(c, host == DEST);
        }
        if host == SOURCE {
            if self.serve.is_some() {
                self.source_outcome = Some("crashed".into());
            }
            self.serve = None;
        } else {
            self.dest = DestProc::Down;
        }
    }

    // ----- the end ----------------------------------------------------------

    pub fn summary(&self) -> String {
        format!(
            "source: {}; destination: {}; {} writes acknowledged; {} mirror commands",
            self.source_outcome.as_deref().unwrap_or("no outcome"),
            if self.dest_completed {
                "completed"
            } else {
                "not completed"
            },
            self.core.ledger.acked(),
            self.mirrors_started
        )
    }

    /// The checks: first on the state as it is (processes may have crashed,
    /// page caches intact), then after a power cut of both hosts that loses
    /// everything not durable.
    pub fn finish(&mut self) {
        self.check_state("at the end");
        for host in 0..HOSTS {
            let mut rng = faults::SplitMix64::new(0);
            self.hosts[host]
                .disk
                .power_cut(faults::PowerLoss::All, &mut rng);
            self.hosts[host]
                .fs
                .power_cut(faults::PowerLoss::All, &mut rng);
        }
        self.core.ledger.power_cut();
        self.check_state("after a final power cut");
        if self.dest_completed {
            // What `listen` reported done is durable.
            let fs = &self.hosts[DEST].fs;
            let dest = image_path(DEST);
            if !fs.exists(&handoff::record_path(&dest)) || fs.exists(&handoff::marker_path(&dest)) {
                self.core.violation(
                    "listen reported the migration complete, but after a power cut the completion record is missing or the marker is back".into(),
                );
            }
        }
        if self.handed_off
            && self.core.sc.action == MirrorAction::Unlink
            && self.hosts[SOURCE].fs.exists(&image_path(SOURCE))
        {
            self.core.violation("the source reported the hand-off with --unlink, but after a power cut its image is back".into());
        }
        // No fault lasts: the migration must have ended, by completing or
        // by a failure the source reports (its exit status says so).
        let reported = matches!(
            self.source_outcome.as_deref(),
            Some(o) if o == "CopiedAndKept" || o.starts_with("DisconnectFailed")
        );
        let source_gone = !self.hosts[SOURCE].fs.exists(&image_path(SOURCE));
        if !(self.dest_completed
            || self.handed_off
            || self.disconnect_sent
            || reported
            || source_gone)
        {
            self.core.violation(format!(
                "the migration did not finish within {} s of virtual time ({})",
                super::world::DEADLINE / 1_000_000,
                self.summary()
            ));
        }
    }

    fn tags_of(&self, host: usize) -> Vec<u64> {
        ledger::tags(&self.hosts[host].disk.content())
    }

    fn check_state(&mut self, when: &str) {
        let src_fs = &self.hosts[SOURCE].fs;
        let dst_fs = &self.hosts[DEST].fs;
        let dest = image_path(DEST);
        let source_exists = src_fs.exists(&image_path(SOURCE));
        // What `flexnbd resolve` would read.
        let record = match handoff::read_record(&**dst_fs, &dest) {
            Ok(found) => found.matching().is_some(),
            Err(e) => {
                let e = format!("{when}: the record cannot be read: {e}");
                self.core.violation(e);
                false
            }
        };
        let marker =
            handoff::read_marker_state(&**dst_fs, &dest).unwrap_or(Some(MarkerState::Receiving));
        let verdict = handoff::verdict(source_exists, record, marker);
        self.core.note(format!(
            "{when}: source {}, record {record}, marker {marker:?}: verdict {}",
            if source_exists { "present" } else { "absent" },
            verdict.name()
        ));
        if verdict == Verdict::Impossible {
            self.core.violation(format!(
                "{when}: the forbidden verdict (source gone, marker receiving)"
            ));
            return;
        }
        // The canonical copy. Without --unlink a completed hand-off moves
        // the clients to the destination while the source file stays.
        let canonical = if verdict == Verdict::Source && !self.dest_served {
            SOURCE
        } else {
            DEST
        };
        let tags = self.tags_of(canonical);
        let name = format!(
            "{when}, the canonical copy ({})",
            if canonical == SOURCE {
                "source"
            } else {
                "destination"
            }
        );
        let found = self
            .core
            .ledger
            .check(&name, canonical, &tags, &self.initial);
        for v in found {
            self.core.violation(v);
        }
        self.check_entrusted(when);
    }

    /// An `entrusted` marker (with no completion record) sits only beside
    /// exactly the data that was entrusted: a new attempt rewrites it to
    /// `receiving` before it changes anything.
    fn check_entrusted(&mut self, when: &str) {
        let fs = self.hosts[DEST].fs.clone();
        let dest = image_path(DEST);
        let entrusted =
            handoff::read_marker_state(&*fs, &dest).ok().flatten() == Some(MarkerState::Entrusted);
        let record = handoff::read_record(&*fs, &dest).is_ok_and(|r| r.matching().is_some());
        if !entrusted || record {
            return;
        }
        if let Some(snapshot) = &self.entrusted {
            let dst = self.tags_of(DEST);
            if let Some(s) = (0..dst.len()).find(|&s| dst[s] != snapshot[s]) {
                let v = format!(
                    "{when}: the marker says entrusted but sector {s} holds {:#x}, not {:#x} as entrusted",
                    dst[s], snapshot[s]
                );
                self.core.violation(v);
            }
        }
    }
}

/// What the source's mirror may touch while it handles an event.
pub struct SourceCtx<'a> {
    pub world: &'a mut World,
}

impl SourceCtx<'_> {
    pub fn core(&mut self) -> &mut Core {
        &mut self.world.core
    }
    pub fn serve(&mut self) -> &mut Serve {
        self.world
            .serve
            .as_mut()
            .expect("the mirror runs inside serve")
    }
    pub fn fs(&self) -> Arc<dyn FileOps> {
        self.world.hosts[SOURCE].fs.clone()
    }
    pub fn dest_listening(&self) -> bool {
        matches!(self.world.dest, DestProc::Listen(_))
    }
}
