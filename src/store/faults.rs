//! Store faults, as the storage layer sees them: a hook consulted before
//! each operation. The fault plan (above this layer) implements
//! [`FaultHook`]; the store only knows which operation is about to run.

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::backend::ImageStore;
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
    /// A checkpoint's rewrite of the marker (docs/handoff.md, "Resuming"):
    /// apart from `Marker`, so the marker's other rewrites keep their
    /// numbers however many checkpoints a migration takes.
    Checkpoint,
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

/// The store fault layer: an image store with a [`FaultHook`] on top, which
/// the image asks once per request ([`ImageStore::fault`]). Reads and
/// writes a fault is keyed on always reach the store.
pub struct Faulted {
    inner: Arc<dyn ImageStore>,
    hook: Arc<dyn FaultHook>,
}

impl Faulted {
    pub fn new(inner: Arc<dyn ImageStore>, hook: Arc<dyn FaultHook>) -> Faulted {
        Faulted { inner, hook }
    }
}

impl ImageStore for Faulted {
    #[inline]
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    #[inline]
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(data, offset)
    }

    fn punch_hole(&self, offset: u64, length: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, length)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }

    fn start_writeback(&self, offset: u64, length: u64) {
        self.inner.start_writeback(offset, length)
    }

    fn will_need(&self, offset: u64, length: u64) -> io::Result<()> {
        self.inner.will_need(offset, length)
    }

    fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        !self.hook.covers(StoreOp::Read) && self.inner.read_cached(buf, offset)
    }

    fn data_extents(&self) -> Option<Vec<(u64, u64)>> {
        self.inner.data_extents()
    }

    fn seek_extent(&self, data: bool, pos: u64) -> io::Result<Option<u64>> {
        self.inner.seek_extent(data, pos)
    }

    fn fault(&self, op: StoreOp, at: Option<(u64, u64)>) -> io::Result<()> {
        self.hook.before(op, at)?;
        self.inner.fault(op, at)
    }

    fn sees_every(&self, op: StoreOp) -> bool {
        self.hook.covers(op) || self.inner.sees_every(op)
    }

    fn identity(&self) -> io::Result<super::Identity> {
        self.inner.identity()
    }
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
