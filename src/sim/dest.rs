//! `flexnbd listen` in the simulation: the destination's hand-off machine,
//! with the simulated disk and file system carrying out its effects one at
//! a time, each taking its virtual time.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use crate::handoff::{self, Marker, MarkerState};
use crate::store::files::FileOps;
use crate::store::Image;

use super::scenario::Mark;
use super::world::{Core, Micros, Msg, Req};

#[derive(Debug)]
enum Effect {
    PersistMarker(MarkerState),
    Apply(Req),
    Sync,
    Reply(u64, u32, bool),
    WriteRecord,
    RemoveMarker,
    Complete,
}

pub struct Listen {
    image: Arc<Image>,
    ops: Arc<dyn FileOps>,
    /// Requests received, in order; `None` is the end of a connection
    /// (EOF or reset), which comes after what was received before it.
    requests: VecDeque<(u64, u64, Option<Req>)>,
    effects: VecDeque<(u64, Effect)>,
    sender: Option<u64>,
    pub scheduled: bool,
    entrust_answered: bool,
    done: bool,
    received: u64,
}

fn write_durably(ops: &dyn FileOps, path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    ops.write_file(&tmp, data, true)?;
    ops.rename(&tmp, path)?;
    ops.sync_dir(crate::store::files::parent_dir(path))
}

impl Listen {
    pub fn start(image: Arc<Image>, ops: Arc<dyn FileOps>) -> Result<Listen, String> {
        let path = image.path().to_owned();
        let record = handoff::record_path(&path);
        if ops.read_file(&record).map_err(|e| e.to_string())?.is_some() {
            return Err("the image holds a completed migration".into());
        }
        let marker = handoff::marker_path(&path);
        if ops.read_file(&marker).map_err(|e| e.to_string())?.is_none() {
            write_durably(
                &*ops,
                &marker,
                Marker::new(MarkerState::Receiving).render().as_bytes(),
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(Listen {
            image,
            ops,
            requests: VecDeque::new(),
            effects: VecDeque::new(),
            sender: None,
            scheduled: false,
            entrust_answered: false,
            done: false,
            received: 0,
        })
    }

    pub fn request(&mut self, core: &mut Core, conn: u64, handle: u64, req: Req) {
        core.note(format!("dest <- conn {conn} {}", req.name()));
        self.requests.push_back((conn, handle, Some(req)));
    }

    /// The connection ended: after what it delivered before.
    pub fn closed(&mut self, core: &mut Core, conn: u64) {
        core.note(format!("dest: conn {conn} ends"));
        self.requests.push_back((conn, 0, None));
    }

    fn end_connection(&mut self, core: &mut Core, conn: u64) {
        core.note(format!("dest: conn {conn} closed"));
        self.requests.retain(|r| r.0 != conn);
        self.effects.retain(|e| e.0 != conn);
        if self.sender == Some(conn) {
            self.sender = None;
        }
    }

    pub fn wants_step(&mut self) -> bool {
        if self.scheduled || (self.effects.is_empty() && self.requests.is_empty()) {
            return false;
        }
        self.scheduled = true;
        true
    }

    /// The virtual time the next step takes.
    pub fn next_cost(&self, core: &Core) -> Micros {
        let sc = &core.sc;
        match self.effects.front() {
            None => 1,
            Some((_, e)) => match e {
                Effect::Apply(Req::Write { data, .. }) => {
                    sc.per_request_us + sc.per_kib_us * data.len() as u64 / 1024
                }
                Effect::Apply(_) => sc.per_request_us,
                Effect::Sync => sc.sync_us,
                Effect::PersistMarker(_) | Effect::WriteRecord => 2 * sc.sync_us,
                Effect::RemoveMarker => sc.sync_us,
                _ => 1,
            },
        }
    }

    /// The destination answered ENTRUST since the last call.
    pub fn take_entrust_answered(&mut self) -> Option<()> {
        std::mem::take(&mut self.entrust_answered).then_some(())
    }

    fn plan(&mut self, conn: u64, handle: u64, req: Req) {
        let mut out = Vec::new();
        match req {
            Req::Write { .. } | Req::Zeroes { .. } => {
                if self.sender != Some(conn) {
                    self.sender = Some(conn);
                    out.push(Effect::PersistMarker(MarkerState::Receiving));
                }
                out.push(Effect::Apply(req));
                out.push(Effect::Reply(handle, 0, false));
            }
            Req::Flush => out.extend([Effect::Sync, Effect::Reply(handle, 0, false)]),
            Req::Entrust => out.extend([
                Effect::Sync,
                Effect::PersistMarker(MarkerState::Entrusted),
                Effect::Reply(handle, 0, true),
            ]),
            Req::Disconnect => out.extend([
                Effect::Sync,
                Effect::WriteRecord,
                Effect::RemoveMarker,
                Effect::Complete,
            ]),
        }
        self.effects.extend(out.into_iter().map(|e| (conn, e)));
    }

    /// Carries out one step; true once the migration completed.
    pub fn step(&mut self, core: &mut Core) -> bool {
        let Some((conn, effect)) = self.effects.pop_front() else {
            match self.requests.pop_front() {
                Some((conn, handle, Some(req))) => self.plan(conn, handle, req),
                Some((conn, _, None)) => self.end_connection(core, conn),
                None => {}
            }
            return false;
        };
        core.note(format!("dest -> {effect:?}"));
        let path = self.image.path().to_owned();
        let r = match effect {
            Effect::PersistMarker(state) => {
                let mut m = Marker::new(state);
                m.bytes_received = self.received;
                let r = write_durably(
                    &*self.ops,
                    &handoff::marker_path(&path),
                    m.render().as_bytes(),
                );
                core.mark(Mark::MarkerPersisted);
                r
            }
            Effect::Apply(Req::Write { offset, data }) => {
                self.received += data.len() as u64;
                self.image.write_at(&data, offset)
            }
            Effect::Apply(Req::Zeroes { offset, len }) => self.image.punch(offset, len, true),
            Effect::Apply(_) => Ok(()),
            Effect::Sync => self.image.sync(),
            Effect::Reply(handle, error, entrust) => {
                core.send(conn, false, Msg::Reply { handle, error });
                if entrust {
                    self.entrust_answered = true;
                    core.mark(Mark::EntrustAnswered);
                }
                Ok(())
            }
            Effect::WriteRecord => write_durably(
                &*self.ops,
                &handoff::record_path(&path),
                b"state=complete\ndev=0\nino=0\nsize=0\n",
            ),
            Effect::RemoveMarker => self
                .ops
                .remove(&handoff::marker_path(&path))
                .and_then(|_| self.ops.sync_dir(crate::store::files::parent_dir(&path))),
            Effect::Complete => {
                self.done = true;
                core.mark(Mark::Completed);
                return true;
            }
        };
        if let Err(e) = r {
            core.note(format!("dest: effect failed: {e}"));
            core.close(conn, true);
            self.end_connection(core, conn);
        }
        false
    }
}
