//! The storage seam for whole files: the destination's `.INCOMPLETE` marker
//! and `.COMPLETE` record, and the source's `--unlink`. Each instance holds
//! its own [`FileOps`]: production uses [`Disk`]; a fault plan that can cut
//! power puts a recording implementation (`crate::power`) underneath, which
//! knows which of these changes a power cut would undo.
//!
//! Store faults reach these operations too, through [`FileOps::fault`]:
//! `store.marker` before each rewrite or removal of a marker, `store.record`
//! before the write or removal of a completion record, `store.unlink` before
//! the unlink (`super::faults::FaultedFiles`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use super::faults::StoreOp;

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
    /// The content of `path`, `None` when it does not exist.
    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        match fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
    /// The identity of the file now at `path` (following symlinks).
    fn identity(&self, path: &Path) -> io::Result<super::Identity> {
        super::Identity::at(path)
    }
    /// The store fault for `op` (marker, record or unlink), applied before
    /// the operation: none unless a fault plan is wired in.
    fn fault(&self, op: StoreOp) -> io::Result<()> {
        let _ = op;
        Ok(())
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

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
