//! Store faults, as the storage layer sees them: a hook consulted before
//! each operation. The fault plan (above this layer) implements
//! [`FaultHook`]; the store only knows which operation is about to run.

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::files::FileOps;

/// The storage operations a fault can be keyed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    Read,
    Write,
    Sync,
    /// The start of the background scan that builds the allocation map.
    MapScan,
    /// A rewrite or removal of a destination's `.INCOMPLETE` marker.
    Marker,
    /// The write or removal of a destination's `.COMPLETE` completion record.
    Record,
    /// The source's `--unlink` of its image.
    Unlink,
}

/// Decides and applies the fault for each storage operation.
pub trait FaultHook: Send + Sync {
    /// Runs before `op` on the `(offset, length)` bytes `at` (or the whole
    /// operation): `Ok` to go ahead (perhaps after a delay), the error to
    /// return instead, or it never returns (a crash or a power cut).
    fn before(&self, op: StoreOp, at: Option<(u64, u64)>) -> io::Result<()>;
    /// Whether any fault is keyed on `op`: every such operation must then
    /// reach the store instead of being answered from memory.
    fn covers(&self, op: StoreOp) -> bool;
}

/// File operations with a [`FaultHook`] in front: the marker, record and
/// unlink faults of one instance.
pub struct FaultedFiles {
    inner: Arc<dyn FileOps>,
    hook: Arc<dyn FaultHook>,
}

impl FaultedFiles {
    pub fn new(inner: Arc<dyn FileOps>, hook: Arc<dyn FaultHook>) -> FaultedFiles {
        FaultedFiles { inner, hook }
    }
}

impl FileOps for FaultedFiles {
    fn write_file(&self, path: &Path, data: &[u8], sync: bool) -> io::Result<()> {
        self.inner.write_file(path, data, sync)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }

    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        self.inner.read_file(path)
    }

    fn identity(&self, path: &Path) -> io::Result<super::Identity> {
        self.inner.identity(path)
    }

    fn fault(&self, op: StoreOp) -> io::Result<()> {
        self.hook.before(op, None)
    }
}
