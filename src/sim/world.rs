//! The simulated world: virtual time, one event queue, a network between
//! two hosts, client writers, faults, and the processes on each host.
//! Everything is drawn from one seed and happens in one thread in a fixed
//! order, so a seed replays exactly; the trace hash proves it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faults::SplitMix64;

use super::disk::{SimDisk, SECTOR};
use super::fs::SimFs;
use super::ledger::{self, Ledger};
use super::scenario::{Fault, Mark, Scenario, Trigger, DEST, SOURCE};

/// Microseconds of virtual time.
pub type Micros = u64;

/// How long a run may take, in virtual time: past it, a migration that
/// should have completed is stuck.
pub const DEADLINE: Micros = 600_000_000;

/// A request on the wire from the source to the destination.
#[derive(Clone, Debug, PartialEq)]
pub enum Req {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Zeroes {
        offset: u64,
        len: u64,
    },
    Flush,
    /// `told`: the offset field, what it says of the changes before it
    /// (`core::destination::entrust_offset`).
    Entrust {
        told: u64,
    },
    Disconnect,
    /// RESUME: which checkpoint of `migration` the destination holds.
    Resume {
        migration: u64,
    },
    Checkpoint {
        migration: u64,
        checkpoint: u64,
    },
}

impl Req {
    pub fn name(&self) -> &'static str {
        match self {
            Req::Write { .. } => "write",
            Req::Zeroes { .. } => "zeroes",
            Req::Flush => "flush",
            Req::Entrust { .. } => "entrust",
            Req::Disconnect => "disconnect",
            Req::Resume { .. } => "resume",
            Req::Checkpoint { .. } => "checkpoint",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Msg {
    Req {
        handle: u64,
        req: Req,
    },
    Reply {
        handle: u64,
        error: u32,
    },
    /// RESUME's answer: 0 and the checkpoint.
    Answer {
        handle: u64,
        value: u64,
    },
}

/// Something that happens at a virtual time.
#[derive(Debug)]
pub enum Ev {
    /// A message arrives at one end of a connection.
    Deliver {
        conn: u64,
        to_dest: bool,
        msg: Msg,
    },
    /// One end learns that its connection is gone.
    Closed {
        conn: u64,
        to_dest: bool,
    },
    /// The source's connection attempt ends: connected or not.
    Connect {
        conn: u64,
        ok: bool,
    },
    /// The next step of a process (by incarnation).
    SourceStep {
        life: u64,
    },
    DestStep {
        life: u64,
    },
    /// A timer of the source's mirror.
    SourceTimer {
        life: u64,
        what: Timer,
    },
    /// A client's next operation.
    Client {
        client: usize,
    },
    /// A client's operation is answered.
    ClientReply {
        client: usize,
        op: u64,
    },
    /// A fault strikes.
    Fault {
        index: usize,
    },
    /// A process is started again by its supervisor.
    Restart {
        host: usize,
    },
    /// The operator runs `mirror`.
    Mirror,
    /// The operator runs `status`.
    Status,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// The mirror's retry delay is over.
    Retry,
    /// Check the no-progress limit on the connection.
    Progress,
    /// A connection attempt into a blackhole gives up.
    Connect,
}

/// The network: at most a few connections, each a pair of ordered queues.
#[derive(Debug)]
pub struct Conn {
    pub up: bool,
    /// Delivery times so far per direction (TCP keeps order).
    last_to_dest: Micros,
    last_to_source: Micros,
}

/// Everything but the processes: the processes borrow it to act.
pub struct Core {
    pub now: Micros,
    seq: u64,
    queue: BinaryHeap<Reverse<(Micros, u64)>>,
    events: BTreeMap<u64, Ev>,
    pub rng: SplitMix64,
    pub sc: Scenario,
    pub conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    pub ledger: Ledger,
    /// A global blackhole window (a partition of the link, whichever
    /// connection is on it).
    pub blackhole_until: Micros,
    marks: BTreeMap<Mark, u32>,
    pending_faults: Vec<(usize, Fault)>,
    trace_hash: u64,
    pub trace: Option<Vec<String>>,
    pub events_run: u64,
    /// The origin of virtual time as an `Instant`, for code that measures
    /// with `Instant`s: only differences of it are ever used.
    pub origin: Instant,
    pub violations: Vec<String>,
    /// Attempts that resumed from a checkpoint.
    pub resumed: u64,
}

/// FNV-1a, for the trace hash.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl Core {
    fn new(seed: u64, sc: Scenario, trace: bool) -> Core {
        let pending_faults = sc.faults.iter().copied().enumerate().collect();
        Core {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            rng: SplitMix64::new(seed),
            sc,
            conns: BTreeMap::new(),
            next_conn: 1,
            ledger: Ledger::default(),
            blackhole_until: 0,
            marks: BTreeMap::new(),
            pending_faults,
            trace_hash: 0xcbf2_9ce4_8422_2325,
            trace: trace.then(Vec::new),
            events_run: 0,
            origin: Instant::now(),
            violations: Vec::new(),
            resumed: 0,
        }
    }

    /// The virtual time as an `Instant`.
    pub fn instant(&self) -> Instant {
        self.origin + Duration::from_micros(self.now)
    }

    pub fn at(&mut self, delay: Micros, ev: Ev) {
        let t = self.now + delay;
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// Adds a line to the trace (and its hash).
    pub fn note(&mut self, line: impl AsRef<str>) {
        let line = line.as_ref();
        self.trace_hash = fnv(self.trace_hash, &self.now.to_le_bytes());
        self.trace_hash = fnv(self.trace_hash, line.as_bytes());
        if let Some(t) = &mut self.trace {
            t.push(format!("{:>12} {line}", self.now));
        }
    }

    /// A step of the hand-off happened: strike any fault waiting for it.
    pub fn mark(&mut self, m: Mark) {
        let n = self.marks.entry(m).or_default();
        *n += 1;
        let n = *n;
        self.note(format!("mark {m:?} #{n}"));
        let due: Vec<usize> = self
            .pending_faults
            .iter()
            .filter(|(_, f)| f.when == Trigger::On(m, n))
            .map(|(i, _)| *i)
            .collect();
        for index in due {
            self.pending_faults.retain(|(i, _)| *i != index);
            self.at(0, Ev::Fault { index });
        }
    }

    pub fn open_conn(&mut self) -> u64 {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                up: true,
                last_to_dest: 0,
                last_to_source: 0,
            },
        );
        id
    }

    /// The connections not yet closed or reset.
    pub fn open_conns(&self) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| c.up)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether the link is blackholed now: packets sent vanish, and TCP
    /// delivers them only after it heals (by retransmission).
    pub fn blackholed(&self) -> bool {
        self.now < self.blackhole_until
    }

    /// When something sent now arrives: a latency (with up to half again
    /// of jitter) later, or after the blackhole heals.
    fn arrival(&mut self) -> Micros {
        let lat = self.sc.latency_us + self.rng.next_u64() % (self.sc.latency_us / 2 + 1);
        if self.blackholed() {
            // The retransmission after the heal.
            self.blackhole_until + lat + 200_000
        } else {
            self.now + lat
        }
    }

    /// Schedules `ev` on `conn` in direction `to_dest`, after everything
    /// sent before it that way (TCP keeps order).
    fn in_order(&mut self, conn: u64, to_dest: bool, ev: Ev) {
        let t = self.arrival();
        let now = self.now;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let last = if to_dest {
            &mut c.last_to_dest
        } else {
            &mut c.last_to_source
        };
        let t = t.max(*last + 1);
        *last = t;
        self.at(t - now, ev);
    }

    /// Sends `msg` on `conn`; false if the connection is known to be down
    /// (the sender sees an error at once, as from a reset socket).
    pub fn send(&mut self, conn: u64, to_dest: bool, msg: Msg) -> bool {
        match self.conns.get(&conn) {
            Some(c) if c.up => {}
            _ => return false,
        }
        self.in_order(conn, to_dest, Ev::Deliver { conn, to_dest, msg });
        true
    }

    /// Resets `conn`: both ends learn of it (after what was sent before).
    pub fn reset(&mut self, conn: u64) {
        if self.conns.get(&conn).is_some_and(|c| c.up) {
            self.in_order(
                conn,
                true,
                Ev::Closed {
                    conn,
                    to_dest: true,
                },
            );
            self.in_order(
                conn,
                false,
                Ev::Closed {
                    conn,
                    to_dest: false,
                },
            );
            if let Some(c) = self.conns.get_mut(&conn) {
                c.up = false;
            }
        }
    }

    /// Closes `conn` from one side, as a process that exits or closes it:
    /// the other end sees EOF after what was sent before it.
    pub fn close(&mut self, conn: u64, by_dest: bool) {
        if self.conns.get(&conn).is_some_and(|c| c.up) {
            self.in_order(
                conn,
                !by_dest,
                Ev::Closed {
                    conn,
                    to_dest: !by_dest,
                },
            );
            if let Some(c) = self.conns.get_mut(&conn) {
                c.up = false;
            }
        }
    }

    pub fn violation(&mut self, what: String) {
        self.note(format!("VIOLATION {what}"));
        self.violations.push(what);
    }

    fn pop(&mut self) -> Option<Ev> {
        let Reverse((t, seq)) = self.queue.pop()?;
        self.now = t;
        self.events.remove(&seq)
    }
}

/// Paths on each host.
pub fn image_path(host: usize) -> PathBuf {
    PathBuf::from(if host == SOURCE {
        "/src/disk.img"
    } else {
        "/dst/disk.img"
    })
}

/// One host's lasting state: its disk and files outlive its processes.
pub struct Host {
    pub disk: Arc<SimDisk>,
    pub fs: Arc<SimFs>,
    /// Bumped at every start of a process, so that events for a dead
    /// process are dropped.
    pub life: u64,
}

impl Host {
    fn new(path: &Path, content: Vec<u8>) -> Host {
        let fs = Arc::new(SimFs::default());
        let ino = fs.create_durable(path, b"");
        fs.set_image_size(path, content.len() as u64);
        Host {
            disk: Arc::new(SimDisk::new(content, ino)),
            fs,
            life: 0,
        }
    }
}

/// A client's operation in flight.
#[derive(Clone, Copy, Debug)]
pub enum ClientOp {
    Write { id: u64, fua: bool },
    Flush { covers: usize },
}

pub struct Client {
    pub ops_left: u32,
    /// The operation waiting for its answer, by number.
    pub waiting: Option<(u64, ClientOp, usize)>,
    next_op: u64,
}

/// The result of one seed.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub hash: u64,
    pub events: u64,
    pub end: Micros,
    pub summary: String,
    pub violations: Vec<String>,
    pub trace: Vec<String>,
    /// The kinds of the faults that struck (a fault waiting for a step the
    /// run never reached does not).
    pub fired: Vec<&'static str>,
    /// Attempts that resumed from a checkpoint.
    pub resumed: u64,
}

/// The initial tag of each sector of the source's image: data written by
/// "write 0x1_0000_0000 + sector", or a hole (zeros).
fn initial_source(sectors: u64, rng: &mut SplitMix64) -> Vec<u8> {
    let mut content = vec![0u8; (sectors * SECTOR) as usize];
    for block in 0..sectors / 8 {
        if rng.roll(60.0) {
            for s in block * 8..block * 8 + 8 {
                let at = (s * SECTOR) as usize;
                ledger::fill(&mut content[at..at + SECTOR as usize], 0x1_0000_0000 + s);
            }
        }
    }
    content
}

/// The destination's initial content: garbage no source sector has.
fn initial_dest(sectors: u64) -> Vec<u8> {
    let mut content = vec![0u8; (sectors * SECTOR) as usize];
    for s in 0..sectors {
        let at = (s * SECTOR) as usize;
        ledger::fill(&mut content[at..at + SECTOR as usize], 0xdead_0000_0000 + s);
    }
    content
}

pub use super::host::World;

impl World {
    pub fn build(seed: u64, trace: bool) -> World {
        let sc = Scenario::draw(seed);
        let mut core = Core::new(seed, sc, trace);
        let src_content = initial_source(core.sc.sectors, &mut core.rng);
        let initial = ledger::tags(&src_content);
        let dst_content = initial_dest(core.sc.sectors);
        let hosts = [
            Host::new(&image_path(SOURCE), src_content),
            Host::new(&image_path(DEST), dst_content),
        ];
        let clients = (0..core.sc.clients)
            .map(|_| Client {
                ops_left: core.sc.ops,
                waiting: None,
                next_op: 0,
            })
            .collect();
        World::assemble(core, hosts, clients, initial)
    }

    /// Runs the seed to its end and checks the outcome.
    pub fn run(mut self, seed: u64) -> Report {
        let n = self.core.sc.faults.len();
        self.core.note(format!("scenario {:?}", self.core.sc));
        for i in 0..n {
            if let Trigger::At(t) = self.core.sc.faults[i].when {
                self.core.pending_faults.retain(|(j, _)| *j != i);
                self.core.at(t, Ev::Fault { index: i });
            }
        }
        self.start();
        while let Some(ev) = self.core.pop() {
            if self.core.now > DEADLINE {
                break;
            }
            self.core.events_run += 1;
            self.dispatch(ev);
        }
        self.finish();
        Report {
            seed,
            fired: std::mem::take(&mut self.fired),
            resumed: self.core.resumed,
            hash: self.core.trace_hash,
            events: self.core.events_run,
            end: self.core.now,
            summary: self.summary(),
            violations: std::mem::take(&mut self.core.violations),
            trace: self.core.trace.take().unwrap_or_default(),
        }
    }

    pub fn next_client_op(c: &mut Client) -> u64 {
        c.next_op += 1;
        c.next_op
    }
}
