//! The migration hand-off contract (docs/handoff.md): the destination's
//! `.INCOMPLETE` marker, its `.COMPLETE` completion record, and the verdict
//! table that tells a person which copy of a disk is canonical after any
//! failure.

use std::io;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use crate::core::destination as machine;
use crate::proto::errno;
use crate::store::files::{self, FileOps};
use crate::store::{Image, StoreOp};
use crate::warn;

/// What the marker says about the destination image (decided by the pure
/// hand-off machine, which names it).
pub use crate::core::destination::MarkerState;

/// The marker's path: `<dest-file>.INCOMPLETE`, next to the image.
pub fn marker_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".INCOMPLETE");
    PathBuf::from(name)
}

/// The completion record's path: `<dest-file>.COMPLETE`, next to the image.
pub fn record_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".COMPLETE");
    PathBuf::from(name)
}

/// `path` with `.tmp` appended: where a durable write stages its content.
fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Fsyncs the directory holding `path`, so a create, rename or unlink in it
/// is durable.
pub fn sync_parent(ops: &dyn FileOps, path: &Path) -> io::Result<()> {
    ops.sync_dir(files::parent_dir(path))
}

/// Removes the source image for `--unlink`, durably: the unlink, then an
/// fsync of its directory, so a power cut cannot bring the file back after
/// the destination was told to take over.
pub fn unlink_durably(ops: &dyn FileOps, path: &Path) -> io::Result<()> {
    ops.fault(StoreOp::Unlink)?;
    ops.remove(path)?;
    sync_parent(ops, path)
}

/// The marker's fields, written as `key=value` lines a person can read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marker {
    pub state: MarkerState,
    /// The sender's address, when one is known.
    pub source: Option<String>,
    /// When the current attempt began (seconds since the epoch).
    pub attempt_started: u64,
    pub bytes_received: u64,
    pub pid: u32,
    /// The resume part (docs/handoff.md, "Resuming"): the migration whose
    /// checkpoint the marker holds. The part is written only with it.
    pub migration: Option<u64>,
    /// The checkpoint of `migration` the image durably holds.
    pub checkpoint: u64,
    /// The image file the checkpoint was taken on: a checkpoint is trusted
    /// only while this is the file at the image path.
    pub image: Option<Identity>,
}

impl Marker {
    pub fn new(state: MarkerState) -> Marker {
        Marker {
            state,
            source: None,
            attempt_started: now_secs(),
            bytes_received: 0,
            pid: std::process::id(),
            migration: None,
            checkpoint: 0,
            image: None,
        }
    }

    pub fn render(&self) -> String {
        let mut text = format!(
            "state={}\nsource={}\nattempt_started={}\nbytes_received={}\npid={}\n",
            self.state.name(),
            self.source.as_deref().unwrap_or("none"),
            self.attempt_started,
            self.bytes_received,
            self.pid
        );
        if let Some(migration) = self.migration {
            text.push_str(&format!(
                "migration={migration:016x}\ncheckpoint={}\n",
                self.checkpoint
            ));
            if let Some(image) = &self.image {
                text.push_str(&format!(
                    "dev={}\nino={}\nsize={}\n",
                    image.dev, image.ino, image.size
                ));
                if let Some(born) = image.born {
                    text.push_str(&format!("born={born}\n"));
                }
            }
        }
        text
    }

    /// Reads a marker's text. Total: a marker without a recognisable
    /// `state` line says `receiving` (the safe answer), missing numbers
    /// are 0, and a resume part that is incomplete or does not parse (no
    /// 16-hex-digit `migration` other than 0, no `checkpoint` other than 0,
    /// no `dev`, `ino` or `size`) is no resume part: a checkpoint that
    /// cannot be tied to a migration and a file proves nothing.
    pub fn parse(text: &str) -> Marker {
        let field = |key: &str| {
            text.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|v| v.strip_prefix('='))
                    .map(str::trim)
            })
        };
        let number = |key: &str| field(key).and_then(|v| v.parse::<u64>().ok());
        let mut marker = Marker {
            state: match field("state") {
                Some("entrusted") => MarkerState::Entrusted,
                _ => MarkerState::Receiving,
            },
            source: field("source").filter(|s| *s != "none").map(str::to_string),
            attempt_started: number("attempt_started").unwrap_or(0),
            bytes_received: number("bytes_received").unwrap_or(0),
            pid: field("pid").and_then(|v| v.parse().ok()).unwrap_or(0),
            migration: None,
            checkpoint: 0,
            image: None,
        };
        let resume = (|| {
            let migration = field("migration")
                .filter(|v| {
                    v.len() == 16
                        && v.bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                })
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .filter(|&m| m != 0)?;
            let checkpoint = number("checkpoint").filter(|&k| k != 0)?;
            let born = match field("born") {
                Some(v) => Some(v.parse::<u128>().ok()?),
                None => None,
            };
            let image = Identity {
                dev: number("dev")?,
                ino: number("ino")?,
                size: number("size")?,
                born,
            };
            Some((migration, checkpoint, image))
        })();
        if let Some((migration, checkpoint, image)) = resume {
            marker.migration = Some(migration);
            marker.checkpoint = checkpoint;
            marker.image = Some(image);
        }
        marker
    }

    /// The (migration, checkpoint) the marker holds, if it holds one.
    pub fn resume(&self) -> Option<(u64, u64)> {
        self.migration.map(|m| (m, self.checkpoint))
    }

    /// The same marker without its resume part.
    pub fn without_resume(&self) -> Marker {
        Marker {
            migration: None,
            checkpoint: 0,
            image: None,
            ..self.clone()
        }
    }

    /// Writes the marker durably: a temporary file, fsync, rename over the
    /// marker, fsync the directory. A crash leaves the old or the new marker,
    /// never a torn one.
    pub fn write_durably(&self, ops: &dyn FileOps, image: &Path) -> io::Result<()> {
        self.write_durably_as(ops, image, StoreOp::Marker)
    }

    /// [`Marker::write_durably`], announced to fault plans as `op` (a
    /// checkpoint's rewrite is `store.checkpoint`).
    pub fn write_durably_as(&self, ops: &dyn FileOps, image: &Path, op: StoreOp) -> io::Result<()> {
        let path = marker_path(image);
        let tmp = tmp_path(&path);
        ops.fault(op)?;
        ops.write_file(&tmp, self.render().as_bytes(), true)?;
        ops.rename(&tmp, &path)?;
        sync_parent(ops, &path)
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads the marker's state. `Ok(None)` when there is no marker; an
/// unreadable or unrecognised marker counts as `receiving` (the safe answer).
pub fn read_marker_state(ops: &dyn FileOps, image: &Path) -> io::Result<Option<MarkerState>> {
    let text = match ops.read_file(&marker_path(image))? {
        Some(bytes) => {
            String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        }
        None => return Ok(None),
    };
    let state = text
        .lines()
        .find_map(|l| l.strip_prefix("state="))
        .map(str::trim);
    Ok(Some(match state {
        Some("entrusted") => MarkerState::Entrusted,
        _ => MarkerState::Receiving,
    }))
}

/// Reads the whole marker (see [`Marker::parse`]). `Ok(None)` when there
/// is none; bytes that are not text are read as far as they are (a marker
/// made of them says `receiving` and holds no checkpoint).
pub fn read_marker(ops: &dyn FileOps, image: &Path) -> io::Result<Option<Marker>> {
    Ok(ops
        .read_file(&marker_path(image))?
        .map(|bytes| Marker::parse(&String::from_utf8_lossy(&bytes))))
}

/// Rewrites the marker durably without its resume part, when it has one;
/// `why` says why, for the warning. Returns the marker as it was. Nothing is
/// written when there is no marker or it holds no checkpoint.
pub fn drop_resume(ops: &dyn FileOps, image: &Path, why: &str) -> Result<Option<Marker>, String> {
    let file = marker_path(image);
    let Some(marker) = read_marker(ops, image)
        .map_err(|e| format!("cannot read the marker {}: {e}", file.display()))?
    else {
        return Ok(None);
    };
    let Some((migration, checkpoint)) = marker.resume() else {
        return Ok(Some(marker));
    };
    warn!(
        "the marker {} holds checkpoint {checkpoint} of migration {migration:016x}, which {why}: dropping it from the marker, so that migration starts again from scratch",
        file.display()
    );
    marker.without_resume().write_durably(ops, image).map_err(|e| {
        format!(
            "cannot drop checkpoint {checkpoint} of migration {migration:016x} from the marker {}: {e}",
            file.display()
        )
    })?;
    Ok(Some(marker))
}

/// Removes the marker durably (after the image itself is durable).
pub fn remove_marker(ops: &dyn FileOps, image: &Path) -> io::Result<()> {
    let path = marker_path(image);
    ops.fault(StoreOp::Marker)?;
    match ops.remove(&path) {
        Ok(()) => sync_parent(ops, &path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

pub use crate::store::Identity;

/// The completion record: written durably when a migration into the image
/// completed, so that an absent marker is never the only sign of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The sender's address, when one is known.
    pub source: Option<String>,
    /// When the migration completed (seconds since the epoch).
    pub completed_at: u64,
    pub bytes_received: u64,
    pub pid: u32,
    /// The image file the record was written for.
    pub image: Identity,
}

impl Record {
    pub fn render(&self) -> String {
        let mut text = format!(
            "state=complete\nsource={}\ncompleted_at={}\nbytes_received={}\npid={}\ndev={}\nino={}\nsize={}\n",
            self.source.as_deref().unwrap_or("none"),
            self.completed_at,
            self.bytes_received,
            self.pid,
            self.image.dev,
            self.image.ino,
            self.image.size
        );
        if let Some(born) = self.image.born {
            text.push_str(&format!("born={born}\n"));
        }
        text
    }

    /// Reads a record's text. `None` unless it says `state=complete` and
    /// names the file it belongs to (`dev`, `ino`, `size`): a record that
    /// cannot be tied to a file proves nothing about it.
    pub fn parse(text: &str) -> Option<Record> {
        let field = |key: &str| {
            text.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|v| v.strip_prefix('='))
                    .map(str::trim)
            })
        };
        let number = |key: &str| field(key).and_then(|v| v.parse::<u64>().ok());
        if field("state") != Some("complete") {
            return None;
        }
        Some(Record {
            source: field("source").filter(|s| *s != "none").map(str::to_string),
            completed_at: number("completed_at").unwrap_or(0),
            bytes_received: number("bytes_received").unwrap_or(0),
            pid: field("pid").and_then(|v| v.parse().ok()).unwrap_or(0),
            image: Identity {
                dev: number("dev")?,
                ino: number("ino")?,
                size: number("size")?,
                born: field("born").and_then(|v| v.parse().ok()),
            },
        })
    }

    /// Writes the record durably, like the marker: a temporary file, fsync,
    /// rename, fsync the directory. A crash leaves no record or the whole
    /// one.
    pub fn write_durably(&self, ops: &dyn FileOps, image: &Path) -> io::Result<()> {
        let path = record_path(image);
        let tmp = tmp_path(&path);
        ops.fault(StoreOp::Record)?;
        ops.write_file(&tmp, self.render().as_bytes(), true)?;
        ops.rename(&tmp, &path)?;
        sync_parent(ops, &path)
    }

    /// One line for a person: where the migration came from and when it
    /// completed.
    pub fn describe(&self) -> String {
        format!(
            "a migration from {} completed at {} ({} byte{} received, by pid {})",
            self.source.as_deref().unwrap_or("an unknown source"),
            utc(self.completed_at),
            self.bytes_received,
            if self.bytes_received == 1 { "" } else { "s" },
            self.pid
        )
    }
}

/// Seconds since the epoch as `YYYY-MM-DD hh:mm:ss UTC` (the civil calendar
/// from a day count, H. Hinnant's algorithm), so no time zone database is
/// needed.
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// What is found at an image's record path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordFound {
    /// No record.
    Absent,
    /// A record for the file now at the image path: it holds a completed
    /// migration.
    Matching(Record),
    /// A record that does not belong to the file now at the image path (or
    /// cannot be read as a record); it counts as absent. The text says why.
    Stale(String),
}

impl RecordFound {
    pub fn matching(&self) -> Option<&Record> {
        match self {
            RecordFound::Matching(r) => Some(r),
            _ => None,
        }
    }
}

/// Reads the completion record of `image` and checks that it belongs to the
/// file now at that path.
pub fn read_record(ops: &dyn FileOps, image: &Path) -> io::Result<RecordFound> {
    let text = match ops.read_file(&record_path(image))? {
        Some(t) => String::from_utf8_lossy(&t).into_owned(),
        None => return Ok(RecordFound::Absent),
    };
    let Some(record) = Record::parse(&text) else {
        return Ok(RecordFound::Stale(
            "it is not a completion record (no state=complete with dev, ino and size)".into(),
        ));
    };
    let now = match ops.identity(image) {
        Ok(id) => id,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(RecordFound::Stale(format!(
                "it names {}, and there is no file at {}",
                record.image,
                image.display()
            )))
        }
        Err(e) => return Err(e),
    };
    if !now.same_file(&record.image) {
        return Ok(RecordFound::Stale(format!(
            "it names {}, but the file at {} is {now}",
            record.image,
            image.display()
        )));
    }
    Ok(RecordFound::Matching(record))
}

/// Removes the completion record durably.
pub fn remove_record(ops: &dyn FileOps, image: &Path) -> io::Result<()> {
    let path = record_path(image);
    ops.fault(StoreOp::Record)?;
    match ops.remove(&path) {
        Ok(()) => sync_parent(ops, &path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Which copy is canonical.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The source file exists: it is canonical.
    Source,
    /// No source, no marker: the destination is complete.
    Destination,
    /// No source, marker `entrusted`: the destination holds everything; only
    /// the disconnect was lost.
    DestinationEntrusted,
    /// No source, a completion record and a marker beside it: the migration
    /// completed; the marker is a leftover of a crash between writing the
    /// record and removing the marker.
    DestinationLeftoverMarker,
    /// No source, marker `receiving`: the forbidden row (data loss).
    Impossible,
}

impl Verdict {
    /// A distinct exit status per verdict, for scripts.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Source => 10,
            Verdict::Destination => 11,
            Verdict::DestinationEntrusted | Verdict::DestinationLeftoverMarker => 12,
            Verdict::Impossible => 13,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Source => "source",
            Verdict::Destination => "destination",
            Verdict::DestinationEntrusted => "destination-entrusted",
            Verdict::DestinationLeftoverMarker => "destination-leftover-marker",
            Verdict::Impossible => "impossible",
        }
    }

    /// Whether `resolve --apply` removes the marker: the rows where the
    /// destination is canonical and the marker is all that is left to undo.
    pub fn marker_to_remove(self) -> bool {
        matches!(
            self,
            Verdict::DestinationEntrusted | Verdict::DestinationLeftoverMarker
        )
    }
}

/// Applies the verdict table. `complete` is whether a completion record
/// that belongs to the destination image exists (a stale one counts as
/// absent).
pub fn verdict(source_exists: bool, complete: bool, marker: Option<MarkerState>) -> Verdict {
    match (source_exists, complete, marker) {
        (true, _, _) => Verdict::Source,
        (false, true, None) => Verdict::Destination,
        (false, true, Some(_)) => Verdict::DestinationLeftoverMarker,
        (false, false, None) => Verdict::Destination,
        (false, false, Some(MarkerState::Entrusted)) => Verdict::DestinationEntrusted,
        (false, false, Some(MarkerState::Receiving)) => Verdict::Impossible,
    }
}

/// The reason and the one action to take, for a person. `record` is the
/// destination's completion record, when it has one.
pub fn explain(v: Verdict, dest: &Path, record: Option<&Record>) -> (String, String) {
    let marker = marker_path(dest);
    match v {
        Verdict::Source => (
            "the source image still exists, so the migration did not hand off".into(),
            format!("keep serving the source; discard the destination copy {} (or retry the migration)", dest.display()),
        ),
        Verdict::Destination => (
            match record {
                Some(r) => format!(
                    "the source image is gone and the destination's completion record {} says {}",
                    record_path(dest).display(),
                    r.describe()
                ),
                None => "the source image is gone and the destination has no .INCOMPLETE marker: the migration completed".into(),
            },
            format!("serve the destination {}", dest.display()),
        ),
        Verdict::DestinationLeftoverMarker => (
            format!(
                "the source image is gone and the destination's completion record {} says {}; the marker beside it is a leftover of a crash before its removal",
                record_path(dest).display(),
                record.map(Record::describe).unwrap_or_else(|| "the migration completed".into())
            ),
            format!("remove the marker {} and serve the destination {}", marker.display(), dest.display()),
        ),
        Verdict::DestinationEntrusted => (
            "the source image is gone and the destination marker says entrusted: all data was durable before the source unlinked; only the disconnect was lost".into(),
            format!("remove the marker {} and serve the destination {}", marker.display(), dest.display()),
        ),
        Verdict::Impossible => (
            "the source image is gone but the destination marker says receiving: the destination may be missing acknowledged writes".into(),
            "do not serve either copy; restore from backup and report this as a bug".into(),
        ),
    }
}

/// At `listen`'s start-up: the (migration, checkpoint) that `marker` holds
/// for the image file now at `image_path`. A checkpoint taken on another
/// file (the image replaced, or restored from a copy) is dropped from the
/// marker durably, with a warning, before anything is served.
fn held_checkpoint(
    ops: &dyn FileOps,
    image_path: &Path,
    marker: &Marker,
) -> Result<Option<(u64, u64)>, String> {
    let (Some(resume), Some(named)) = (marker.resume(), marker.image) else {
        return Ok(None);
    };
    let why = match ops.identity(image_path) {
        Ok(now) if now.same_file(&named) => return Ok(Some(resume)),
        Ok(now) => format!(
            "was taken on the file {named}, but the file at {} is {now}",
            image_path.display()
        ),
        Err(e) => format!(
            "was taken on the file {named}, and the file at {} cannot be identified ({e})",
            image_path.display()
        ),
    };
    drop_resume(ops, image_path, &why)?;
    Ok(None)
}

/// The destination's side of the contract, shared by its connections: the
/// pure hand-off machine (`core::destination`) and the I/O that carries out
/// its effects.
pub struct Destination {
    /// The instance's file operations, for the marker and the record.
    ops: Arc<dyn FileOps>,
    image_path: PathBuf,
    /// Cancelled once a valid DISCONNECT completed the migration.
    pub completed: tokio_util::sync::CancellationToken,
    /// Locked only to feed it one event, never across I/O.
    machine: std::sync::Mutex<machine::Destination>,
    /// Held across each marker write or removal, so that they never overlap
    /// (they share the temporary file): the generation of the latest
    /// marker operation carried out (see `marker_op`).
    marker_done: std::sync::Mutex<u64>,
    /// Names each connection once: a new connection is a new sender.
    next_conn: std::sync::atomic::AtomicU64,
}

impl Destination {
    /// Start-up: refuses an image that holds a completed migration (its
    /// completion record belongs to it) unless `overwrite_complete`; creates
    /// the marker durably (`state=receiving`) unless one exists; only then
    /// removes a record (the overridden one, or a stale one), so that a
    /// changing image is never without both. Must run before the port
    /// accepts anything.
    pub fn prepare(
        ops: Arc<dyn FileOps>,
        image_path: &Path,
        overwrite_complete: bool,
    ) -> Result<Destination, String> {
        let record_file = record_path(image_path);
        let found = read_record(&*ops, image_path).map_err(|e| {
            format!(
                "cannot read the completion record {}: {e}",
                record_file.display()
            )
        })?;
        if let (RecordFound::Matching(record), false) = (&found, overwrite_complete) {
            return Err(format!(
                "refusing to receive a migration into {}: it already holds a completed one; its completion record {} says {}. Serve the image with `flexnbd serve` instead; to receive a new migration over it anyway (losing what it holds), start listen with --overwrite-complete",
                image_path.display(),
                record_file.display(),
                record.describe()
            ));
        }
        let marker_file = marker_path(image_path);
        let marker = read_marker(&*ops, image_path)
            .map_err(|e| format!("cannot read the marker {}: {e}", marker_file.display()))?;
        let held = match &marker {
            None => {
                Marker::new(MarkerState::Receiving)
                    .write_durably(&*ops, image_path)
                    .map_err(|e| {
                        format!("cannot create the marker {}: {e}", marker_file.display())
                    })?;
                None
            }
            Some(marker) => held_checkpoint(&*ops, image_path, marker)?,
        };
        match &found {
            RecordFound::Absent => {}
            RecordFound::Matching(record) => {
                warn!(
                    "--overwrite-complete: receiving over {}, which holds {}; removing its completion record {}",
                    image_path.display(),
                    record.describe(),
                    record_file.display()
                );
            }
            RecordFound::Stale(why) => {
                warn!(
                    "removing the stale completion record {}: {why}",
                    record_file.display()
                );
            }
        }
        if found != RecordFound::Absent {
            remove_record(&*ops, image_path).map_err(|e| {
                format!(
                    "cannot remove the completion record {}: {e}",
                    record_file.display()
                )
            })?;
        }
        Ok(Destination {
            ops,
            image_path: image_path.to_owned(),
            completed: tokio_util::sync::CancellationToken::new(),
            machine: std::sync::Mutex::new(machine::Destination::new(held)),
            marker_done: std::sync::Mutex::new(0),
            next_conn: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// The (migration, checkpoint) the marker durably holds for this image
    /// now, as the machine knows it.
    pub fn held(&self) -> Option<(u64, u64)> {
        self.machine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .held()
    }

    /// A sender connection from `source` began transmission: its id for
    /// the events that follow.
    pub fn open(&self, source: String) -> machine::ConnId {
        let conn = self
            .next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let effects = self.handle(machine::Event::Opened { conn, source });
        debug_assert!(effects.is_empty(), "opening asks for nothing: {effects:?}");
        conn
    }

    /// Feeds the machine one event (the time read here); no I/O. Returns the
    /// effects to carry out, in order.
    pub fn handle(&self, event: machine::Event) -> Vec<machine::Effect> {
        self.machine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .handle(event, now_secs())
    }

    /// Carries out one effect that needs I/O, blocking (run it on the I/O
    /// pool): writes or removes the marker (one at a time, skipping one
    /// decided before another already done: see `marker_op`), syncs the
    /// image, writes the completion record. Returns the outcome as the event to feed back;
    /// `None` for the effects that are the caller's (apply, reply, close,
    /// log). `Complete` cancels `completed`, and gives `None` too.
    pub fn execute(&self, effect: &machine::Effect, image: &Image) -> Option<machine::Event> {
        use machine::{Effect, Event};
        let failure = |e: io::Error| machine::Failure::new(errno::from_io(&e), e.to_string());
        match effect {
            Effect::PersistMarker {
                conn,
                generation,
                marker,
            } => {
                let conn = *conn;
                let written = self.marker_op(*generation, || {
                    // A checkpoint names the file it was taken on.
                    let image = match marker.resume {
                        Some(_) => Some(image.identity()?),
                        None => None,
                    };
                    Marker {
                        state: marker.state,
                        source: marker.source.clone(),
                        attempt_started: marker.attempt_started,
                        bytes_received: marker.bytes_received,
                        pid: std::process::id(),
                        migration: marker.resume.map(|(m, _)| m),
                        checkpoint: marker.resume.map_or(0, |(_, k)| k),
                        image,
                    }
                    .write_durably_as(
                        &*self.ops,
                        &self.image_path,
                        if marker.for_checkpoint {
                            StoreOp::Checkpoint
                        } else {
                            StoreOp::Marker
                        },
                    )
                });
                Some(match written {
                    Ok(()) => Event::MarkerPersisted { conn },
                    Err(e) => Event::MarkerFailed {
                        conn,
                        failure: failure(e),
                    },
                })
            }
            Effect::Sync { conn } => {
                let conn = *conn;
                Some(match image.sync() {
                    Ok(()) => Event::SyncDone { conn },
                    Err(e) => Event::SyncFailed {
                        conn,
                        failure: failure(e),
                    },
                })
            }
            Effect::WriteRecord { conn, record } => {
                let conn = *conn;
                let written = image.identity().and_then(|identity| {
                    Record {
                        source: record.source.clone(),
                        completed_at: record.completed_at,
                        bytes_received: record.bytes_received,
                        pid: std::process::id(),
                        image: identity,
                    }
                    .write_durably(&*self.ops, &self.image_path)
                });
                Some(match written {
                    Ok(()) => Event::RecordWritten { conn },
                    Err(e) => Event::RecordFailed {
                        conn,
                        failure: failure(e),
                    },
                })
            }
            Effect::RemoveMarker { conn, generation } => {
                let conn = *conn;
                let removed =
                    self.marker_op(*generation, || remove_marker(&*self.ops, &self.image_path));
                Some(match removed {
                    Ok(()) => Event::MarkerRemoved { conn },
                    Err(e) => Event::MarkerRemoveFailed {
                        conn,
                        failure: failure(e),
                    },
                })
            }
            Effect::Complete => {
                self.completed.cancel();
                None
            }
            Effect::Apply { .. }
            | Effect::Reply { .. }
            | Effect::ResumeReply { .. }
            | Effect::Close { .. }
            | Effect::Log { .. } => None,
        }
    }

    /// Carries out the marker operation (write or removal) the machine
    /// numbered `generation`, with `io`: one at a time, and only when no
    /// later-decided one was carried out already. An older one is skipped
    /// (no I/O, `Ok`): the marker stays as the later decision, which the
    /// machine believes instead. Only an operation that succeeded counts as
    /// carried out: after a failed one, whose outcome on disk is unknown, an
    /// older one still writes, so an operation reported done always leaves
    /// the marker as it or a later decision.
    fn marker_op(&self, generation: u64, io: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut done = self
            .marker_done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if generation < *done {
            return Ok(());
        }
        io()?;
        *done = generation;
        Ok(())
    }

    /// Carries out `effects` in order (blocking), feeding each outcome back
    /// to the machine and carrying out what it answers, until only the
    /// caller's effects are left; returns those, in order.
    pub fn run(&self, image: &Image, effects: Vec<machine::Effect>) -> Vec<machine::Effect> {
        let mut queue: std::collections::VecDeque<machine::Effect> = effects.into();
        let mut outward = Vec::new();
        while let Some(effect) = queue.pop_front() {
            match self.execute(&effect, image) {
                Some(outcome) => {
                    // What an outcome leads to comes before the effects
                    // queued after the one that produced it.
                    for next in self.handle(outcome).into_iter().rev() {
                        queue.push_front(next);
                    }
                }
                None => outward.push(effect),
            }
        }
        outward
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Disk;
    use std::fs;

    #[test]
    fn verdict_table() {
        let markers = [
            None,
            Some(MarkerState::Receiving),
            Some(MarkerState::Entrusted),
        ];
        for complete in [false, true] {
            for m in markers {
                assert_eq!(verdict(true, complete, m), Verdict::Source);
            }
        }
        assert_eq!(verdict(false, false, None), Verdict::Destination);
        assert_eq!(
            verdict(false, false, Some(MarkerState::Entrusted)),
            Verdict::DestinationEntrusted
        );
        assert_eq!(
            verdict(false, false, Some(MarkerState::Receiving)),
            Verdict::Impossible
        );
        // A completion record: complete, whatever marker was left beside it.
        assert_eq!(verdict(false, true, None), Verdict::Destination);
        for m in [MarkerState::Receiving, MarkerState::Entrusted] {
            assert_eq!(
                verdict(false, true, Some(m)),
                Verdict::DestinationLeftoverMarker
            );
        }
        let all = [
            Verdict::Source,
            Verdict::Destination,
            Verdict::DestinationEntrusted,
            Verdict::DestinationLeftoverMarker,
            Verdict::Impossible,
        ];
        // One exit status per outcome a script acts on: 12 is "the
        // destination is canonical, remove its marker", for both rows.
        let codes: std::collections::HashSet<u8> = all.iter().map(|v| v.exit_code()).collect();
        assert_eq!(codes.len(), 4);
        for v in all {
            assert_eq!(v.marker_to_remove(), v.exit_code() == 12, "{v:?}");
        }
    }

    #[test]
    fn utc_renders_the_civil_date() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_798_761_599), "2026-12-31 23:59:59 UTC");
    }

    fn record_for(image: &Path) -> Record {
        Record {
            source: Some("127.0.0.1:5555".into()),
            completed_at: 1_700_000_000,
            bytes_received: 4096,
            pid: 42,
            image: Identity::at(image).unwrap(),
        }
    }

    #[test]
    fn record_round_trip_and_identity() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("dest.img");
        fs::write(&image, b"image").unwrap();
        assert_eq!(read_record(&Disk, &image).unwrap(), RecordFound::Absent);
        let record = record_for(&image);
        record.write_durably(&Disk, &image).unwrap();
        let text = fs::read_to_string(record_path(&image)).unwrap();
        assert!(
            text.starts_with("state=complete\nsource=127.0.0.1:5555\ncompleted_at=1700000000\n"),
            "{text}"
        );
        assert_eq!(
            read_record(&Disk, &image).unwrap(),
            RecordFound::Matching(record.clone())
        );
        // A new file at the path (both exist at once: a new inode).
        let new = dir.path().join("new.img");
        fs::write(&new, b"image").unwrap();
        fs::rename(&new, &image).unwrap();
        assert!(
            matches!(read_record(&Disk, &image).unwrap(), RecordFound::Stale(why) if why.contains("ino=")),
            "a record for another inode is stale"
        );
        record_for(&image).write_durably(&Disk, &image).unwrap();
        assert!(read_record(&Disk, &image).unwrap().matching().is_some());
        // The same inode number, but born at another time: an image
        // deleted and created again that got its old inode back.
        let mut reborn = record_for(&image);
        reborn.image.born = Some(reborn.image.born.unwrap_or(0) + 1);
        reborn.write_durably(&Disk, &image).unwrap();
        assert_eq!(
            read_record(&Disk, &image).unwrap().matching().is_some(),
            Identity::at(&image).unwrap().born.is_none(),
            "a record for another birth time is stale where the file system keeps one"
        );
        // A record without a birth time (a file system without one) still
        // matches on dev, ino and size.
        let mut unborn = record_for(&image);
        unborn.image.born = None;
        unborn.write_durably(&Disk, &image).unwrap();
        assert!(read_record(&Disk, &image).unwrap().matching().is_some());
        // Resized: stale too.
        fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(4096)
            .unwrap();
        assert!(matches!(
            read_record(&Disk, &image).unwrap(),
            RecordFound::Stale(_)
        ));
        // Not a record at all.
        fs::write(record_path(&image), "state=complete\n").unwrap();
        assert!(matches!(
            read_record(&Disk, &image).unwrap(),
            RecordFound::Stale(_)
        ));
        remove_record(&Disk, &image).unwrap();
        assert_eq!(read_record(&Disk, &image).unwrap(), RecordFound::Absent);
    }

    #[test]
    fn prepare_refuses_a_completed_image_and_overwrites_it_only_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("dest.img");
        fs::write(&image, b"image").unwrap();
        record_for(&image).write_durably(&Disk, &image).unwrap();
        let err = match Destination::prepare(Arc::new(Disk), &image, false) {
            Err(e) => e,
            Ok(_) => panic!("prepare accepted a completed image"),
        };
        assert!(
            err.contains("--overwrite-complete") && err.contains("flexnbd serve"),
            "{err}"
        );
        assert!(!marker_path(&image).exists(), "refused before the marker");
        assert!(record_path(&image).exists(), "the record stays");
        Destination::prepare(Arc::new(Disk), &image, true).unwrap();
        assert_eq!(
            read_marker_state(&Disk, &image).unwrap(),
            Some(MarkerState::Receiving)
        );
        assert!(!record_path(&image).exists(), "the record is removed");
    }

    #[test]
    fn marker_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("dest.img");
        assert_eq!(read_marker_state(&Disk, &image).unwrap(), None);
        Marker::new(MarkerState::Receiving)
            .write_durably(&Disk, &image)
            .unwrap();
        assert_eq!(
            read_marker_state(&Disk, &image).unwrap(),
            Some(MarkerState::Receiving)
        );
        let mut m = Marker::new(MarkerState::Entrusted);
        m.source = Some("127.0.0.1:5555".into());
        m.write_durably(&Disk, &image).unwrap();
        let text = fs::read_to_string(marker_path(&image)).unwrap();
        assert!(text.starts_with("state=entrusted\nsource=127.0.0.1:5555\n"));
        assert_eq!(
            read_marker_state(&Disk, &image).unwrap(),
            Some(MarkerState::Entrusted)
        );
        remove_marker(&Disk, &image).unwrap();
        assert_eq!(read_marker_state(&Disk, &image).unwrap(), None);
        fs::write(marker_path(&image), "garbage").unwrap();
        assert_eq!(
            read_marker_state(&Disk, &image).unwrap(),
            Some(MarkerState::Receiving),
            "unknown = receiving"
        );
    }

    #[test]
    fn the_executor_carries_the_machine_through_entrust_and_disconnect() {
        use machine::{Effect, Event};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dest.img");
        fs::write(&path, vec![0u8; 8192]).unwrap();
        let image = Image::open(&path).unwrap();
        let dest = Destination::prepare(Arc::new(Disk), &path, false).unwrap();
        let conn = dest.open("10.1.1.1:99".into());
        let change = dest.handle(Event::Change { conn, bytes: 8192 });
        assert_eq!(dest.run(&image, change), vec![Effect::Apply { conn }]);
        let text = fs::read_to_string(marker_path(&path)).unwrap();
        assert!(
            text.starts_with("state=receiving\nsource=10.1.1.1:99\n"),
            "{text}"
        );
        let entrust = dest.handle(Event::Entrust {
            conn,
            told: 0,
            size: 1,
        });
        let left = dest.run(&image, entrust);
        assert!(
            matches!(left.last(), Some(Effect::Reply { errno: 0, .. })),
            "{left:?}"
        );
        assert_eq!(
            read_marker_state(&Disk, &path).unwrap(),
            Some(MarkerState::Entrusted)
        );
        assert!(!dest.completed.is_cancelled());
        let disconnect = dest.handle(Event::Disconnect { conn });
        let left = dest.run(&image, disconnect);
        assert!(left.contains(&Effect::Complete), "{left:?}");
        assert!(
            matches!(left.last(), Some(Effect::Close { .. })),
            "{left:?}"
        );
        assert!(dest.completed.is_cancelled());
        assert_eq!(read_marker_state(&Disk, &path).unwrap(), None);
        let record = read_record(&Disk, &path).unwrap();
        assert_eq!(record.matching().map(|r| r.bytes_received), Some(8192));
        // A later connection changes nothing of a completed image.
        let late = dest.open("10.1.1.2:99".into());
        let change = dest.handle(Event::Change {
            conn: late,
            bytes: 1,
        });
        let left = dest.run(&image, change);
        assert!(
            !left.iter().any(|e| matches!(e, Effect::Apply { .. })),
            "{left:?}"
        );
        assert_eq!(left.last(), Some(&Effect::Close { conn: late }));
    }

    fn resumable(image: &Path, migration: u64, checkpoint: u64) -> Marker {
        Marker {
            migration: Some(migration),
            checkpoint,
            image: Some(Identity::at(image).unwrap()),
            ..Marker::new(MarkerState::Receiving)
        }
    }

    #[test]
    fn a_marker_with_a_resume_part_round_trips_and_renders_it_after_the_old_lines() {
        let id = Identity {
            dev: 2049,
            ino: 77,
            size: 8192,
            born: Some(1_700_000_000_123_456_789),
        };
        let marker = Marker {
            state: MarkerState::Entrusted,
            source: Some("10.0.0.1:5000".into()),
            attempt_started: 1_700_000_000,
            bytes_received: 4096,
            pid: 42,
            migration: Some(0x00ab_cdef_0123_4567),
            checkpoint: 12,
            image: Some(id),
        };
        let text = marker.render();
        assert_eq!(
            text,
            "state=entrusted\nsource=10.0.0.1:5000\nattempt_started=1700000000\nbytes_received=4096\npid=42\n\
             migration=00abcdef01234567\ncheckpoint=12\ndev=2049\nino=77\nsize=8192\nborn=1700000000123456789\n"
        );
        assert_eq!(Marker::parse(&text), marker);
        assert_eq!(marker.resume(), Some((0x00ab_cdef_0123_4567, 12)));
        // No birth time known: no born line, and still a whole part.
        let unborn = Marker {
            image: Some(Identity { born: None, ..id }),
            ..marker.clone()
        };
        assert!(!unborn.render().contains("born="));
        assert_eq!(Marker::parse(&unborn.render()), unborn);
        // Without a migration, no resume line at all: the old format.
        let old = marker.without_resume();
        assert_eq!(
            old.render(),
            "state=entrusted\nsource=10.0.0.1:5000\nattempt_started=1700000000\nbytes_received=4096\npid=42\n"
        );
        assert_eq!(Marker::parse(&old.render()), old);
        assert_eq!(old.resume(), None);
    }

    #[test]
    fn an_incomplete_or_unparsable_resume_part_is_none() {
        let whole = "state=receiving\nsource=none\nattempt_started=1\nbytes_received=0\npid=1\nmigration=00abcdef01234567\ncheckpoint=3\ndev=1\nino=2\nsize=3\n";
        assert_eq!(
            Marker::parse(whole).resume(),
            Some((0x00ab_cdef_0123_4567, 3))
        );
        let broken = [
            ("migration=00abcdef01234567\n", ""),
            ("checkpoint=3\n", ""),
            ("dev=1\n", ""),
            ("ino=2\n", ""),
            ("size=3\n", ""),
            ("migration=00abcdef01234567", "migration=00ABCDEF01234567"),
            ("migration=00abcdef01234567", "migration=abcdef01234567"),
            ("migration=00abcdef01234567", "migration=00abcdef0123456g"),
            ("migration=00abcdef01234567", "migration=0000000000000000"),
            ("checkpoint=3", "checkpoint=0"),
            ("checkpoint=3", "checkpoint=three"),
            ("size=3\n", "size=3\nborn=yesterday\n"),
        ];
        for (from, to) in broken {
            let text = whole.replace(from, to);
            let m = Marker::parse(&text);
            assert_eq!(
                (m.migration, m.checkpoint, m.image),
                (None, 0, None),
                "expected no resume part in {text:?}"
            );
            assert_eq!(
                m.state,
                MarkerState::Receiving,
                "the rest is read as before"
            );
        }
    }

    #[test]
    fn read_marker_reads_the_whole_marker_and_old_markers_still_work() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("dest.img");
        fs::write(&image, b"image").unwrap();
        assert_eq!(read_marker(&Disk, &image).unwrap(), None);
        let marker = resumable(&image, 7, 2);
        marker.write_durably(&Disk, &image).unwrap();
        assert_eq!(read_marker(&Disk, &image).unwrap(), Some(marker));
        assert_eq!(
            read_marker_state(&Disk, &image).unwrap(),
            Some(MarkerState::Receiving)
        );
        fs::write(
            marker_path(&image),
            "state=entrusted\nsource=127.0.0.1:1\nattempt_started=5\nbytes_received=6\npid=7\n",
        )
        .unwrap();
        let old = read_marker(&Disk, &image).unwrap().unwrap();
        assert_eq!(
            (
                old.state,
                old.source.as_deref(),
                old.bytes_received,
                old.resume()
            ),
            (MarkerState::Entrusted, Some("127.0.0.1:1"), 6, None)
        );
        fs::write(marker_path(&image), [0xff, 0xfe, b'\n']).unwrap();
        let garbage = read_marker(&Disk, &image).unwrap().unwrap();
        assert_eq!(
            (garbage.state, garbage.resume()),
            (MarkerState::Receiving, None)
        );
    }

    #[test]
    fn prepare_holds_a_checkpoint_taken_on_this_image_file() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("dest.img");
        fs::write(&image, vec![0u8; 4096]).unwrap();
        let marker = resumable(&image, 0xabc, 5);
        marker.write_durably(&Disk, &image).unwrap();
        let dest = Destination::prepare(Arc::new(Disk), &image, false).unwrap();
        assert_eq!(dest.held(), Some((0xabc, 5)));
        assert_eq!(
            read_marker(&Disk, &image).unwrap(),
            Some(marker),
            "untouched"
        );
    }

    #[test]
    fn prepare_drops_a_checkpoint_taken_on_another_file_durably() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("dest.img");
        fs::write(&image, vec![0u8; 4096]).unwrap();
        let mut marker = resumable(&image, 0xabc, 5);
        marker.state = MarkerState::Entrusted;
        marker.source = Some("10.0.0.9:1".into());
        marker.write_durably(&Disk, &image).unwrap();
        // The image is replaced by a copy: another inode at the path.
        let copy = dir.path().join("copy.img");
        fs::write(&copy, vec![0u8; 4096]).unwrap();
        fs::rename(&copy, &image).unwrap();
        let dest = Destination::prepare(Arc::new(Disk), &image, false).unwrap();
        assert_eq!(dest.held(), None);
        let now = read_marker(&Disk, &image).unwrap().unwrap();
        assert_eq!(now, marker.without_resume(), "only the resume part goes");
        assert!(!fs::read_to_string(marker_path(&image))
            .unwrap()
            .contains("migration="));
        // Resized in place: the same inode, another size.
        let marker = resumable(&image, 0xabc, 6);
        marker.write_durably(&Disk, &image).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(8192)
            .unwrap();
        let dest = Destination::prepare(Arc::new(Disk), &image, false).unwrap();
        assert_eq!(dest.held(), None);
        assert_eq!(read_marker(&Disk, &image).unwrap().unwrap().resume(), None);
    }

    #[test]
    fn the_executor_writes_a_checkpoint_with_the_image_identity_and_start_up_holds_it() {
        use machine::{Effect, Event};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dest.img");
        fs::write(&path, vec![0u8; 8192]).unwrap();
        let image = Image::open(&path).unwrap();
        let dest = Destination::prepare(Arc::new(Disk), &path, false).unwrap();
        assert_eq!(dest.held(), None);
        let conn = dest.open("10.1.1.1:99".into());
        let checkpoint = dest.handle(Event::Checkpoint {
            conn,
            migration: 0xfeed,
            checkpoint: 3,
        });
        let left = dest.run(&image, checkpoint);
        assert!(
            matches!(left.last(), Some(Effect::Reply { errno: 0, .. })),
            "{left:?}"
        );
        let marker = read_marker(&Disk, &path).unwrap().unwrap();
        assert_eq!(marker.resume(), Some((0xfeed, 3)));
        assert!(
            marker
                .image
                .unwrap()
                .same_file(&Identity::at(&path).unwrap()),
            "{marker:?}"
        );
        assert_eq!(marker.source.as_deref(), Some("10.1.1.1:99"));
        // A restarted listen answers it.
        let again = Destination::prepare(Arc::new(Disk), &path, false).unwrap();
        assert_eq!(again.held(), Some((0xfeed, 3)));
        let conn = again.open("10.1.1.1:100".into());
        assert_eq!(
            again.handle(Event::Resume {
                conn,
                migration: 0xfeed
            }),
            vec![Effect::ResumeReply {
                conn,
                checkpoint: 3
            }]
        );
    }

    #[test]
    fn drop_resume_rewrites_only_a_marker_that_holds_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("dest.img");
        fs::write(&image, b"image").unwrap();
        assert_eq!(drop_resume(&Disk, &image, "test").unwrap(), None);
        assert!(!marker_path(&image).exists(), "no marker is created");
        let marker = resumable(&image, 9, 1);
        marker.write_durably(&Disk, &image).unwrap();
        assert_eq!(
            drop_resume(&Disk, &image, "test").unwrap(),
            Some(marker.clone())
        );
        assert_eq!(
            read_marker(&Disk, &image).unwrap(),
            Some(marker.without_resume())
        );
        // A marker without the part is left as it is, byte for byte.
        fs::write(marker_path(&image), "state=receiving\nextra=1\n").unwrap();
        drop_resume(&Disk, &image, "test").unwrap();
        assert_eq!(
            fs::read_to_string(marker_path(&image)).unwrap(),
            "state=receiving\nextra=1\n"
        );
    }

    fn persist(
        conn: machine::ConnId,
        generation: u64,
        state: MarkerState,
        source: &str,
    ) -> machine::Effect {
        machine::Effect::PersistMarker {
            conn,
            generation,
            marker: machine::MarkerWrite {
                state,
                source: Some(source.into()),
                attempt_started: 1,
                bytes_received: 0,
                resume: None,
                for_checkpoint: false,
            },
        }
    }

    /// The marker's (state, source) at `image`, `None` without one.
    fn marker_says(image: &Path) -> Option<(MarkerState, String)> {
        read_marker(&Disk, image)
            .unwrap()
            .map(|m| (m.state, m.source.unwrap_or_default()))
    }

    #[test]
    fn a_marker_operation_decided_before_one_carried_out_is_skipped_and_reported_done() {
        use machine::{Effect, Event};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dest.img");
        fs::write(&path, vec![0u8; 4096]).unwrap();
        let image = Image::open(&path).unwrap();
        let dest = Destination::prepare(Arc::new(Disk), &path, false).unwrap();
        // Decided second, carried out first.
        assert_eq!(
            dest.execute(&persist(2, 2, MarkerState::Entrusted, "b"), &image),
            Some(Event::MarkerPersisted { conn: 2 })
        );
        assert_eq!(
            dest.execute(&persist(1, 1, MarkerState::Receiving, "a"), &image),
            Some(Event::MarkerPersisted { conn: 1 })
        );
        assert_eq!(
            marker_says(&path),
            Some((MarkerState::Entrusted, "b".into())),
            "the marker ends as the later decision"
        );
        assert!(!tmp_path(&marker_path(&path)).exists());
        // A removal decided before is skipped as well.
        assert_eq!(
            dest.execute(
                &Effect::RemoveMarker {
                    conn: 1,
                    generation: 1
                },
                &image
            ),
            Some(Event::MarkerRemoved { conn: 1 })
        );
        assert_eq!(
            marker_says(&path),
            Some((MarkerState::Entrusted, "b".into()))
        );
        // Later decisions are carried out; after a removal, no write decided
        // before it brings the marker back.
        dest.execute(&persist(3, 3, MarkerState::Receiving, "c"), &image);
        assert_eq!(
            marker_says(&path),
            Some((MarkerState::Receiving, "c".into()))
        );
        assert_eq!(
            dest.execute(
                &Effect::RemoveMarker {
                    conn: 4,
                    generation: 4
                },
                &image
            ),
            Some(Event::MarkerRemoved { conn: 4 })
        );
        assert_eq!(
            dest.execute(&persist(3, 3, MarkerState::Receiving, "c"), &image),
            Some(Event::MarkerPersisted { conn: 3 })
        );
        assert_eq!(marker_says(&path), None);
    }

    /// Fails the first marker operation asked for, and no other.
    struct FailFirstMarker(std::sync::atomic::AtomicBool);

    impl crate::store::FaultHook for FailFirstMarker {
        fn before(&self, op: StoreOp, _at: Option<(u64, u64)>) -> io::Result<()> {
            if op == StoreOp::Marker && !self.0.swap(true, std::sync::atomic::Ordering::SeqCst) {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        }
        fn covers(&self, op: StoreOp) -> bool {
            op == StoreOp::Marker
        }
    }

    #[test]
    fn after_a_later_marker_write_failed_an_earlier_one_is_still_carried_out() {
        use machine::Event;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dest.img");
        fs::write(&path, vec![0u8; 4096]).unwrap();
        // An `entrusted` marker from before: what a failed write may leave.
        let mut before = Marker::new(MarkerState::Entrusted);
        before.source = Some("old".into());
        before.write_durably(&Disk, &path).unwrap();
        let image = Image::open(&path).unwrap();
        let ops = crate::store::faults::FaultedFiles::new(
            Arc::new(Disk),
            Arc::new(FailFirstMarker(Default::default())),
        );
        let dest = Destination::prepare(Arc::new(ops), &path, false).unwrap();
        assert!(matches!(
            dest.execute(&persist(2, 2, MarkerState::Receiving, "b"), &image),
            Some(Event::MarkerFailed { conn: 2, .. })
        ));
        // Reported done, so it is on disk: the marker does not stay as it
        // was before both.
        assert_eq!(
            dest.execute(&persist(1, 1, MarkerState::Receiving, "a"), &image),
            Some(Event::MarkerPersisted { conn: 1 })
        );
        assert_eq!(
            marker_says(&path),
            Some((MarkerState::Receiving, "a".into()))
        );
    }

    #[test]
    fn concurrent_marker_writes_do_not_collide_and_the_marker_ends_as_the_latest_decision() {
        use machine::Event;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dest.img");
        fs::write(&path, vec![0u8; 4096]).unwrap();
        let image = Image::open(&path).unwrap();
        let dest = Destination::prepare(Arc::new(Disk), &path, false).unwrap();
        const THREADS: u64 = 4;
        const EACH: u64 = 16;
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (dest, image) = (&dest, &image);
                scope.spawn(move || {
                    for i in 0..EACH {
                        let generation = 1 + t + i * THREADS;
                        let effect = persist(
                            t,
                            generation,
                            MarkerState::Receiving,
                            &format!("generation {generation}"),
                        );
                        assert_eq!(
                            dest.execute(&effect, image),
                            Some(Event::MarkerPersisted { conn: t })
                        );
                    }
                });
            }
        });
        assert_eq!(
            marker_says(&path),
            Some((
                MarkerState::Receiving,
                format!("generation {}", THREADS * EACH)
            ))
        );
    }

    #[test]
    fn a_checkpoint_overtaken_by_another_connections_change_is_neither_on_disk_nor_answered() {
        use machine::{Effect, Event};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dest.img");
        fs::write(&path, vec![0u8; 8192]).unwrap();
        let image = Image::open(&path).unwrap();
        let dest = Destination::prepare(Arc::new(Disk), &path, false).unwrap();
        let resumed = dest.open("10.1.1.1:1".into());
        dest.handle(Event::Resume {
            conn: resumed,
            migration: 0xfeed,
        });
        let sync = dest.handle(Event::Checkpoint {
            conn: resumed,
            migration: 0xfeed,
            checkpoint: 1,
        });
        let synced = dest.execute(&sync[0], &image).unwrap();
        let checkpoint_write = dest.handle(synced);
        // Another connection's first change is decided before the
        // checkpoint's marker write is carried out, and goes first.
        let other = dest.open("10.1.1.2:2".into());
        let change = dest.handle(Event::Change {
            conn: other,
            bytes: 1,
        });
        assert_eq!(
            dest.run(&image, change),
            vec![Effect::Apply { conn: other }]
        );
        let left = dest.run(&image, checkpoint_write);
        assert!(
            matches!(left.last(), Some(Effect::Reply { errno, .. }) if *errno != 0),
            "{left:?}"
        );
        let marker = read_marker(&Disk, &path).unwrap().unwrap();
        assert_eq!(marker.resume(), None);
        assert_eq!(marker.source.as_deref(), Some("10.1.1.2:2"));
        assert_eq!(dest.held(), None);
        let again = Destination::prepare(Arc::new(Disk), &path, false).unwrap();
        assert_eq!(again.held(), None);
    }

    /// Fails the marker, record and unlink operations named, and counts
    /// every fault asked for.
    struct Failing(Vec<StoreOp>, std::sync::Mutex<Vec<StoreOp>>);

    impl crate::store::FaultHook for Failing {
        fn before(&self, op: StoreOp, _at: Option<(u64, u64)>) -> io::Result<()> {
            self.1.lock().unwrap().push(op);
            if self.0.contains(&op) {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        }
        fn covers(&self, op: StoreOp) -> bool {
            self.0.contains(&op)
        }
    }

    #[test]
    fn the_instances_fault_hook_fails_its_marker_record_and_unlink() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("d.img");
        fs::write(&image, b"image").unwrap();
        let hook = Arc::new(Failing(
            vec![StoreOp::Record, StoreOp::Unlink],
            Default::default(),
        ));
        let ops = crate::store::faults::FaultedFiles::new(Arc::new(Disk), hook.clone());
        // The marker is not failed: it is written, after its fault was asked.
        Marker::new(MarkerState::Entrusted)
            .write_durably(&ops, &image)
            .unwrap();
        assert_eq!(
            read_marker_state(&ops, &image).unwrap(),
            Some(MarkerState::Entrusted)
        );
        // The record and the unlink fail before touching anything.
        let record = Record {
            source: None,
            completed_at: 0,
            bytes_received: 0,
            pid: 1,
            image: Identity::at(&image).unwrap(),
        };
        let e = record.write_durably(&ops, &image).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert!(!record_path(&image).exists());
        assert_eq!(
            unlink_durably(&ops, &image).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert!(image.exists());
        // Another instance's operations see none of these faults.
        unlink_durably(&Disk, &image).unwrap();
        assert!(!image.exists());
        assert_eq!(
            *hook.1.lock().unwrap(),
            vec![StoreOp::Marker, StoreOp::Record, StoreOp::Unlink]
        );
    }
}
