//! The storage seam for whole files: the destination's `.INCOMPLETE` marker
//! and `.COMPLETE` record, and the source's `--unlink`. Production uses [`Disk`]; a fault plan that
//! can cut power swaps in a recording implementation (`crate::power`), which
//! knows which of these changes a power cut would undo.
//!
//! Store faults reach these operations too: `store.marker` before each
//! rewrite or removal of a marker, `store.record` before the write or
//! removal of a completion record, `store.unlink` before the unlink.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::probe::{PlanProbe, StoreStep};

/// File and directory operations whose durability matters.
pub trait FileOps: Send + Sync {
    /// Creates (or truncates) `path` and writes `data` into it, then fsyncs
    /// it when `sync` is set. The content is durable only after that fsync.
    fn write_file(&self, path: &Path, data: &[u8], sync: bool) -> io::Result<()>;
    /// Renames `from` over `to`; durable only after [`FileOps::sync_dir`].
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes `path`; durable only after [`FileOps::sync_dir`].
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Fsyncs the directory `dir`, making its creates, renames and removals
    /// durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// The content of `path`, or `None` if there is no such file.
    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match fs::read(path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The production implementation: plain system calls.
pub struct Disk;

impl FileOps for Disk {
    fn write_file(&self, path: &Path, data: &[u8], sync: bool) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        f.write_all(data)?;
        if sync {
            f.sync_all()?;
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

static OPS: OnceLock<Box<dyn FileOps>> = OnceLock::new();
static FAULTS: OnceLock<Arc<PlanProbe>> = OnceLock::new();

/// The process's file operations: [`Disk`] unless a power-loss model was
/// installed before the first use.
pub fn ops() -> &'static dyn FileOps {
    OPS.get_or_init(|| Box::new(Disk)).as_ref()
}

/// Installs `ops` for the whole process. Must run before the first call to
/// [`ops`]; returns false (and installs nothing) otherwise.
pub fn install(ops: Box<dyn FileOps>) -> bool {
    OPS.set(ops).is_ok()
}

/// Lets a fault plan fail marker and unlink operations.
pub fn set_faults(probe: Arc<PlanProbe>) {
    let _ = FAULTS.set(probe);
}

/// The store fault for `step`, applied (an error to return, a delay, a
/// crash or a power cut).
pub fn fault(step: StoreStep) -> io::Result<()> {
    match FAULTS.get() {
        None => Ok(()),
        Some(probe) => crate::probe::apply_store_fault(probe.store(step)),
    }
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
