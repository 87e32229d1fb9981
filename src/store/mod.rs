//! Where bytes live: the image file, its holes and its durability.
//!
//! Each image has its own block-device stack, wired once at start-up
//! ([`Image::open_stacked`], [`Image::with_store`]): the bottom store (the
//! file, or a simulated disk), the layers on top of it (the power-loss
//! recorder), the store fault hook, and the file operations for the
//! hand-off's marker, record and unlink. Nothing here is process-wide.

pub mod backend;
pub mod faults;
pub mod files;
pub mod held;
pub mod identity;
pub mod map;
pub mod offload;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustix::fs::SeekFrom;

pub use crate::core::pace::{self, ClientPace, PaceRates};
pub use backend::{FileStore, ImageStore};
pub use faults::{FaultHook, StoreOp};
pub use files::{Disk, FileOps};
pub use identity::Identity;
pub use map::{AllocationMap, BLOCK_SIZE};

/// A layer of an image's stack that goes on top of the store below it
/// (the power-loss recorder).
pub trait Layer: Send + Sync {
    /// `below`, the store of the image at `path` (`len` bytes long), with
    /// this layer on top.
    fn stack(
        &self,
        below: Arc<dyn ImageStore>,
        path: &Path,
        len: u64,
    ) -> io::Result<Arc<dyn ImageStore>>;
}

/// What an image's stack is built from, besides its bottom store. The
/// default is production: no layer, no faults, plain file operations.
#[derive(Clone)]
pub struct Stack {
    /// Layers on top of the bottom store, lowest first.
    pub layers: Vec<Arc<dyn Layer>>,
    /// Store faults from a fault plan, applied before each operation: the
    /// top layer ([`faults::Faulted`]).
    pub faults: Option<Arc<dyn FaultHook>>,
    /// The file operations of the hand-off (marker, record, unlink).
    pub files: Arc<dyn FileOps>,
}

impl Default for Stack {
    fn default() -> Stack {
        Stack {
            layers: Vec::new(),
            faults: None,
            files: Arc::new(Disk),
        }
    }
}

/// Writes are applied in pieces of at most this many bytes, so memory per
/// request stays bounded whatever length a client sends.
pub const PIECE: usize = 256 * 1024;
/// Writes at least this large start their writeback at once on a migration
/// destination.
const EAGER_WRITEBACK_MIN: usize = 128 * 1024;

/// Why an image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read the size of image {path}: {source}")]
    Stat { path: PathBuf, source: io::Error },
    #[error("image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("cannot record {path} for power-loss faults: {source}")]
    Layer { path: PathBuf, source: io::Error },
}

/// An image file served as an export.
pub struct Image {
    /// The top of the image's stack: every read, write and sync goes
    /// through it.
    store: Arc<dyn ImageStore>,
    /// Whether an image file at `path` is at the bottom of the stack, for
    /// the scan that builds the map (a store without one has its map built
    /// at once).
    scan_file: bool,
    /// The instance's file operations (marker, record, unlink).
    files: Arc<dyn FileOps>,
    /// The slots of this image's operations on the blocking pool.
    offload: offload::Offload,
    path: PathBuf,
    /// The export size: the file size rounded down to a multiple of 512,
    /// measured once at start-up.
    size: u64,
    /// Bytes at the end of the file that are never served.
    trailing: u64,
    map: AllocationMap,
    /// Writes hold it shared and hole punching holds it exclusively: a punch
    /// clears map bits, and a write racing it could otherwise leave data in a
    /// block the map calls a hole.
    punch_lock: RwLock<()>,
    /// Cleared the first time the file system refuses to punch holes.
    can_punch: AtomicBool,
    /// Set to stop a running map scan (shutdown).
    scan_stop: AtomicBool,
    /// Blocks changed since the mirror last took them (only while tracking).
    dirty: AllocationMap,
    /// The number of set bits in `dirty`, kept by construction: whoever
    /// flips bits adds (or subtracts) exactly the number it flipped, and
    /// nothing ever overwrites the counter. Between a setter's flip and its
    /// add a concurrent clear can subtract first, so the value may be briefly
    /// negative; it is exact whenever no update is in flight.
    dirty_blocks: AtomicI64,
    /// On while a migration attempt runs.
    tracking: AtomicBool,
    /// What a migration's destination holds, from the first `mirror` on
    /// (docs/handoff.md, "Resuming"); kept up to date by every change.
    held: std::sync::OnceLock<held::Held>,
    /// Set by the mirror while it converges: holds clients' writes to their
    /// share of a slow destination (`mirror::policy`).
    pace: std::sync::Mutex<ClientPace>,
    /// Pacing charges only for blocks before this offset: during the sweep,
    /// changes ahead of it travel with the sweep at no extra cost.
    pace_below: AtomicU64,
    /// Whether pacing is on, for writes asleep in their pacing wait: they
    /// wake when it goes off (at the cut-off), so the cut-off never waits
    /// out a pacing delay while clients are shut out.
    pacing: tokio::sync::watch::Sender<bool>,
    /// Set on a migration destination: large writes start their writeback at
    /// once, so the syncs at FLUSH and entrust (while the source's clients
    /// wait) find little left to write.
    eager_writeback: AtomicBool,
    /// Set when a layer of the stack faults or records reads (writes): a
    /// plan with `store.read` (`store.write`) keys, or the power-loss
    /// recorder. Every read (write) must then reach the store, where those
    /// act, instead of being answered from memory (`read_cached`,
    /// `is_no_op_zero`).
    reads_faulted: bool,
    writes_faulted: bool,
}

fn is_zero(bytes: &[u8]) -> bool {
    // Wide reads with an OR fold vectorise well; the early exit per 256 bytes
    // keeps data-heavy writes from scanning whole pieces.
    let mut chunks = bytes.chunks_exact(256);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

impl Image {
    /// Opens an existing image read-write, with the production stack.
    /// Nothing creates, extends or truncates the file.
    pub fn open(path: &Path) -> Result<Image, OpenError> {
        Image::open_stacked(path, Stack::default())
    }

    /// Opens an existing image read-write with `stack` on the file.
    pub fn open_stacked(path: &Path, stack: Stack) -> Result<Image, OpenError> {
        let open = |noatime: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            if noatime {
                o.custom_flags(libc::O_NOATIME);
            }
            o.open(path)
        };
        // O_NOATIME needs ownership of the file; fall back without it.
        let file = match open(true) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(false),
            other => other,
        }
        .map_err(|source| OpenError::Open {
            path: path.to_owned(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| OpenError::Stat {
            path: path.to_owned(),
            source,
        })?;
        let full = if meta.is_file() {
            meta.len()
        } else {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_block_device() {
                return Err(OpenError::NotAFile {
                    path: path.to_owned(),
                });
            }
            let mut f = &file;
            io::Seek::seek(&mut f, io::SeekFrom::End(0)).map_err(|source| OpenError::Stat {
                path: path.to_owned(),
                source,
            })?
        };
        let size = full - full % 512;
        let mut store: Arc<dyn ImageStore> = Arc::new(FileStore::new(file));
        for layer in &stack.layers {
            store = layer
                .stack(store, path, full)
                .map_err(|source| OpenError::Layer {
                    path: path.to_owned(),
                    source,
                })?;
        }
        if let Some(hook) = &stack.faults {
            store = Arc::new(faults::Faulted::new(store, hook.clone()));
        }
        Ok(Image::assemble(
            store,
            true,
            path.to_owned(),
            size,
            full - size,
            stack,
        ))
    }

    /// An image whose bytes live in `store` (a simulated disk, say), with
    /// no file behind it: its allocation map is built at once from
    /// [`ImageStore::data_extents`] (everything is data when the store
    /// cannot tell), and its identity is the store's.
    pub fn with_store(path: PathBuf, size: u64, store: Arc<dyn ImageStore>) -> Image {
        Image::with_stack(path, size, store, Stack::default())
    }

    /// [`Image::with_store`] with faults and file operations from `stack`
    /// (its layers go on top of `store`; a layer that fails to stack is
    /// left out, and says why in the log).
    pub fn with_stack(path: PathBuf, size: u64, store: Arc<dyn ImageStore>, stack: Stack) -> Image {
        let extents = store.data_extents();
        let mut top = store;
        for layer in &stack.layers {
            match layer.stack(top.clone(), &path, size) {
                Ok(stacked) => top = stacked,
                Err(e) => crate::warn!("cannot stack a layer on {}: {e}", path.display()),
            }
        }
        if let Some(hook) = &stack.faults {
            top = Arc::new(faults::Faulted::new(top, hook.clone()));
        }
        let image = Image::assemble(top, false, path, size, 0, stack);
        match extents {
            Some(extents) => {
                for (offset, length) in extents {
                    let end = offset.saturating_add(length).min(size);
                    if offset < end {
                        image.map.set_bytes(offset, end - offset);
                    }
                }
            }
            None => image.map.set_bytes(0, size),
        }
        image.map.mark_built();
        image
    }

    fn assemble(
        store: Arc<dyn ImageStore>,
        scan_file: bool,
        path: PathBuf,
        size: u64,
        trailing: u64,
        stack: Stack,
    ) -> Image {
        let reads_faulted = store.sees_every(StoreOp::Read);
        let writes_faulted = store.sees_every(StoreOp::Write);
        Image {
            store,
            scan_file,
            files: stack.files,
            offload: offload::Offload::default(),
            path,
            size,
            trailing,
            map: AllocationMap::new(size),
            punch_lock: RwLock::new(()),
            can_punch: AtomicBool::new(true),
            scan_stop: AtomicBool::new(false),
            dirty: AllocationMap::new(size),
            dirty_blocks: AtomicI64::new(0),
            tracking: AtomicBool::new(false),
            held: std::sync::OnceLock::new(),
            pace: std::sync::Mutex::new(Default::default()),
            pace_below: AtomicU64::new(u64::MAX),
            pacing: tokio::sync::watch::Sender::new(false),
            reads_faulted,
            writes_faulted,
            eager_writeback: AtomicBool::new(false),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes past the last multiple of 512 that are not served.
    pub fn trailing_bytes(&self) -> u64 {
        self.trailing
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The identity (device, inode, length) of the open file, for the
    /// completion record: the file served, whatever its path names now.
    pub fn identity(&self) -> io::Result<Identity> {
        self.store.identity()
    }

    /// The instance's file operations, for the hand-off's marker, record
    /// and unlink.
    pub fn files(&self) -> &Arc<dyn FileOps> {
        &self.files
    }

    /// Runs this image's blocking operations off the async workers.
    pub fn offload(&self) -> &offload::Offload {
        &self.offload
    }

    pub fn map(&self) -> &AllocationMap {
        &self.map
    }

    /// Starts writeback as large writes arrive (a migration destination).
    pub fn set_eager_writeback(&self, on: bool) {
        self.eager_writeback.store(on, Ordering::Relaxed);
    }

    /// The store every operation goes through.
    #[inline]
    fn io(&self) -> &dyn ImageStore {
        self.store.as_ref()
    }

    /// The store fault for `op`, from the fault layer of the stack.
    #[inline]
    fn store_fault(&self, op: StoreOp) -> io::Result<()> {
        self.io().fault(op, None)
    }

    /// The store fault for an operation on `len` bytes at `offset`.
    #[inline]
    fn store_fault_at(&self, op: StoreOp, offset: u64, len: u64) -> io::Result<()> {
        self.io().fault(op, Some((offset, len)))
    }

    /// Fills `buf` from `offset`. The caller has range-checked the request.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.store_fault_at(StoreOp::Read, offset, buf.len() as u64)?;
        self.io().read_at(buf, offset)
    }

    /// Fills `buf` from `offset` if the data is already in memory, so the
    /// read cannot wait for the disk and may run on an async worker: `true`
    /// when done. `false` means "read it with `read_at` on a blocking
    /// thread". A range the allocation map knows to be a hole is zeros
    /// without asking the file (the page cache holds no pages for a hole
    /// that was never read, so the file would say "wait"). Under a fault
    /// plan with `store.read` keys, or one that can cut power, the answer is
    /// always `false`: the plan's store is a disk that may be slow or
    /// failing, and its faults (and the power model) act in `read_at`.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        if self.reads_faulted {
            return false;
        }
        if self.is_known_hole(offset, buf.len() as u64) {
            buf.fill(0);
            return true;
        }
        self.io().read_cached(buf, offset)
    }

    /// Whether a TRIM, or a WRITE_ZEROES that may punch, of the range has
    /// nothing to do: the built map knows it is all hole already. Then it
    /// needs no trip to the disk (a migration's sweep sends one for every
    /// hole of the source). Never under a plan with `store.write` keys,
    /// which must see the operation.
    pub fn is_no_op_zero(&self, offset: u64, len: u64) -> bool {
        !self.writes_faulted && self.is_known_hole(offset, len)
    }

    /// Whether the built allocation map says every block touching the range
    /// is a hole (never true while the map is being built: that would need
    /// the file's SEEK_HOLE, a system call that may wait for the disk).
    fn is_known_hole(&self, offset: u64, len: u64) -> bool {
        if len == 0 || !self.map.is_built() {
            return false;
        }
        let first = offset / BLOCK_SIZE;
        let end = offset.saturating_add(len).div_ceil(BLOCK_SIZE);
        !self.map.is_set(first) && self.map.next_change(first, end, false) >= end
    }

    /// Writes `data` at `offset`, keeping holes: an all-zero 4 KiB piece
    /// written over a hole is not written at all. Zeros over data are written
    /// (they must overwrite it).
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.store_fault_at(StoreOp::Write, offset, data.len() as u64)?;
        self.store_write(data, offset)?;
        if data.len() >= EAGER_WRITEBACK_MIN && self.eager_writeback.load(Ordering::Relaxed) {
            self.io().start_writeback(offset, data.len() as u64);
        }
        // After the data landed: the mirror clears a bit and then reads, so
        // marking afterwards means it can never read the old data last.
        self.mark_dirty(offset, data.len() as u64);
        Ok(())
    }

    fn store_write(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let _shared = self.punch_lock.read().unwrap_or_else(|p| p.into_inner());
        let map = &self.map;
        if !map.is_built() {
            return self.store_write_unmapped(data, offset);
        }
        // Walk the range in runs of blocks sharing an allocation state.
        let end = offset + data.len() as u64;
        let mut pos = offset;
        // Start of a pending run of bytes to write, coalesced into one pwrite.
        let mut pending: Option<u64> = None;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let allocated = map.is_set(block);
            // At least this block: a concurrent write may flip its bit after
            // `is_set`, and a run must never end at or before `pos`.
            let run_end_block = map
                .next_change(block, end.div_ceil(BLOCK_SIZE), allocated)
                .max(block + 1);
            let run_end = (run_end_block * BLOCK_SIZE).min(end);
            if allocated {
                pending.get_or_insert(pos);
                pos = run_end;
                continue;
            }
            // Unallocated: check each piece up to the next block boundary.
            while pos < run_end {
                let piece_end = ((pos / BLOCK_SIZE + 1) * BLOCK_SIZE).min(run_end);
                let piece = &data[(pos - offset) as usize..(piece_end - offset) as usize];
                if is_zero(piece) {
                    if let Some(start) = pending.take() {
                        self.io().write_at(
                            &data[(start - offset) as usize..(pos - offset) as usize],
                            start,
                        )?;
                    }
                } else {
                    // Mark before writing: a reader must never be told
                    // "hole" about a block that holds data.
                    map.set_bytes(pos, piece_end - pos);
                    pending.get_or_insert(pos);
                }
                pos = piece_end;
            }
        }
        if let Some(start) = pending {
            self.io()
                .write_at(&data[(start - offset) as usize..], start)?;
        }
        Ok(())
    }

    /// `store_write` while the map is not built: the file itself says where
    /// its holes are, so all-zero pieces over holes are still not written.
    /// Every range written is recorded in the map first, since the scan may
    /// already have passed it.
    fn store_write_unmapped(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let map = &self.map;
        let mut holes = FileLayout::new(self.io());
        let end = offset + data.len() as u64;
        let mut pos = offset;
        let mut pending: Option<u64> = None;
        let flush = |start: u64, upto: u64| {
            map.set_bytes(start, upto - start);
            self.io().write_at(
                &data[(start - offset) as usize..(upto - offset) as usize],
                start,
            )
        };
        while pos < end {
            let piece_end = ((pos / BLOCK_SIZE + 1) * BLOCK_SIZE).min(end);
            let piece = &data[(pos - offset) as usize..(piece_end - offset) as usize];
            if is_zero(piece) && holes.is_hole(pos, piece_end) {
                if let Some(start) = pending.take() {
                    flush(start, pos)?;
                }
            } else {
                pending.get_or_insert(pos);
            }
            pos = piece_end;
        }
        match pending {
            Some(start) => flush(start, end),
            None => Ok(()),
        }
    }

    /// Punches a hole over the range (or, where holes are not supported and
    /// `must_zero` is set, writes zeros). The range then reads as zeros.
    pub fn punch(&self, offset: u64, length: u64, must_zero: bool) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        self.store_fault_at(StoreOp::Write, offset, length)?;
        self.store_punch(offset, length, must_zero)?;
        self.mark_dirty(offset, length);
        Ok(())
    }

    fn store_punch(&self, offset: u64, length: u64, must_zero: bool) -> io::Result<()> {
        if self.can_punch.load(Ordering::Relaxed) {
            let _exclusive = self.punch_lock.write().unwrap_or_else(|p| p.into_inner());
            let err = match self.io().punch_hole(offset, length) {
                Ok(()) => {
                    // Safe before the map is built too: writes are held off,
                    // so these blocks are holes now. A scan that looked
                    // before the punch can only set them again (data, which
                    // is never wrong, only less sparse).
                    self.map.clear_bytes(offset, length, self.size);
                    return Ok(());
                }
                Err(err) => err,
            };
            match err.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                    self.can_punch.store(false, Ordering::Relaxed)
                }
                _ => return Err(err),
            }
        }
        if must_zero {
            self.store_zeroes(offset, length)
        } else {
            Ok(())
        }
    }

    /// Writes real zeros over the range (allocating it).
    pub fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.store_fault_at(StoreOp::Write, offset, length)?;
        self.store_zeroes(offset, length)?;
        self.mark_dirty(offset, length);
        Ok(())
    }

    fn store_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let _shared = self.punch_lock.read().unwrap_or_else(|p| p.into_inner());
        self.map.set_bytes(offset, length);
        let zeros = vec![0u8; PIECE.min(length as usize)];
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            let n = ((end - pos) as usize).min(zeros.len());
            self.io().write_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    #[inline]
    fn mark_dirty(&self, offset: u64, length: u64) {
        if let Some(held) = self.held.get() {
            held.changed(offset, length);
        }
        if self.tracking.load(Ordering::Acquire) && length > 0 {
            let first = offset / BLOCK_SIZE;
            let end = (offset + length).div_ceil(BLOCK_SIZE);
            let newly = self.dirty.set_blocks_counting(first, end);
            self.dirty_blocks.fetch_add(newly as i64, Ordering::AcqRel);
        }
    }

    /// Starts recording changed blocks for a migration attempt, from a clean
    /// slate (the attempt's sweep sends everything anyway).
    pub fn start_tracking(&self) {
        self.set_pace(None, u64::MAX);
        self.tracking.store(true, Ordering::Release);
        // Subtract what was cleared rather than resetting the counter: a
        // write marking blocks at the same time adds its own count, and a
        // reset could erase it (or make a later subtraction underflow).
        let cleared = self.dirty.clear_blocks_counting(0, self.dirty.blocks());
        self.dirty_blocks
            .fetch_sub(cleared as i64, Ordering::AcqRel);
    }

    /// The sweep's view of a range ([`crate::core::source::Effect::AskExtents`]):
    /// its extents, and with `held` what the destination holds of it, short
    /// held runs (under `gap`) between pieces that go sent with them.
    pub fn sweep_extents(
        &self,
        offset: u64,
        len: u64,
        held: bool,
    ) -> Vec<(u64, crate::core::source::Extent)> {
        let extents = self.extents(offset, len, usize::MAX);
        let runs = held.then(|| self.held().runs(offset, len));
        crate::core::source::extents_with_held(&extents, runs.as_deref())
    }

    /// What a migration's destination holds (created empty the first time).
    pub fn held(&self) -> &held::Held {
        self.held.get_or_init(|| held::Held::new(self.size))
    }

    pub fn stop_tracking(&self) {
        self.tracking.store(false, Ordering::Release);
        self.set_pace(None, u64::MAX);
    }

    fn pace(&self) -> std::sync::MutexGuard<'_, ClientPace> {
        self.pace.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Paces clients' writes by what they will cost the migration
    /// (`None`: no pacing), for blocks before `below`.
    pub fn set_pace(&self, rates: Option<PaceRates>, below: u64) {
        self.pace_below.store(below, Ordering::Release);
        self.pace().set(rates);
        self.pacing.send_if_modified(|on| {
            let changed = *on != rates.is_some();
            *on = rates.is_some();
            changed
        });
    }

    /// Sleeps for a pacing `wait` ([`Image::pace_write`]), or less if
    /// pacing ends meanwhile.
    pub async fn pace_sleep(&self, wait: std::time::Duration) {
        if wait.is_zero() {
            return;
        }
        let mut on = self.pacing.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // The current value is checked first: pacing that ended before
            // this call ends the wait at once.
            _ = on.wait_for(|on| !on) => {}
        }
    }

    /// How long a client write (or zeroing, or trim) of `length` bytes at
    /// `offset` must wait before it is applied, charging it for the clean
    /// blocks it is about to dirty. Zero unless the mirror is pacing.
    pub fn pace_write(&self, offset: u64, length: u64) -> std::time::Duration {
        if length == 0 || !self.tracking.load(Ordering::Acquire) || !self.pace().is_on() {
            return std::time::Duration::ZERO;
        }
        let below = self.pace_below.load(Ordering::Acquire);
        let first = offset / BLOCK_SIZE;
        let end = (offset + length)
            .min(below)
            .div_ceil(BLOCK_SIZE)
            .min(self.dirty.blocks());
        // A word at a time: a client may zero or trim the whole export.
        let (mut runs, mut clean) = (0u64, 0u64);
        let mut previous_clean = false;
        let mut block = first;
        while block < end {
            let bit = block % 64;
            let span = (64 - bit).min(end - block);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            let c = !self.dirty.peek_word((block / 64) as usize) & mask;
            clean += u64::from(c.count_ones());
            // A run starts at a clean block whose predecessor is not clean.
            let predecessor_clean = (c << 1) | if previous_clean { 1 << bit } else { 0 };
            runs += u64::from((c & !predecessor_clean).count_ones());
            previous_clean = c & (1 << (bit + span - 1)) != 0;
            block += span;
        }
        self.pace()
            .charge(runs, clean * BLOCK_SIZE, std::time::Instant::now())
    }

    /// Bytes changed and not yet taken by the mirror (block granularity).
    pub fn dirty_bytes(&self) -> u64 {
        // Clamped: the counter can be transiently negative or, by the same
        // reordering, above the true count; never beyond the map.
        let blocks = self
            .dirty_blocks
            .load(Ordering::Acquire)
            .clamp(0, self.dirty.blocks() as i64) as u64;
        blocks.saturating_mul(BLOCK_SIZE).min(self.size)
    }

    /// Forgets changes inside a range the mirror is about to read and send
    /// (the range is read after this, so nothing is lost).
    pub fn clear_dirty(&self, offset: u64, length: u64) {
        let first = offset.div_ceil(BLOCK_SIZE);
        let end = if offset + length >= self.size {
            self.dirty.blocks()
        } else {
            (offset + length) / BLOCK_SIZE
        };
        if first < end {
            let cleared = self.dirty.clear_blocks_counting(first, end);
            self.dirty_blocks
                .fetch_sub(cleared as i64, Ordering::AcqRel);
        }
    }

    /// Takes changed ranges (clearing them), at most `max_bytes` in all, as
    /// byte ranges of at most `max_run` each, clipped to the export. Ranges
    /// at most `gap` bytes apart come as one, the clean bytes between them
    /// included: to a destination whose every write has a high fixed cost,
    /// resending a little unchanged data is cheaper than another write (and
    /// always safe, since the data sent is read afterwards).
    pub fn take_dirty(&self, max_bytes: u64, max_run: u64, gap: u64) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut total = 0u64;
        for index in 0..self.dirty.word_count() {
            if total >= max_bytes {
                break;
            }
            let bits = self.dirty.take_word(index);
            if bits == 0 {
                continue;
            }
            self.dirty_blocks
                .fetch_sub(i64::from(bits.count_ones()), Ordering::AcqRel);
            let mut rest = bits;
            while rest != 0 {
                let first = rest.trailing_zeros() as u64;
                let run = (rest >> first).trailing_ones() as u64;
                rest &= !(if run == 64 {
                    u64::MAX
                } else {
                    ((1u64 << run) - 1) << first
                });
                let start = (index as u64 * 64 + first) * BLOCK_SIZE;
                let end = ((index as u64 * 64 + first + run) * BLOCK_SIZE).min(self.size);
                if start >= end {
                    continue;
                }
                total += end - start;
                match ranges.last_mut() {
                    Some(last) if start - (last.0 + last.1) <= gap && end - last.0 <= max_run => {
                        last.1 = end - last.0
                    }
                    _ => ranges.push((start, end - start)),
                }
            }
        }
        // Split runs longer than max_run.
        let mut out = Vec::with_capacity(ranges.len());
        for (mut start, mut len) in ranges {
            while len > max_run {
                out.push((start, max_run));
                start += max_run;
                len -= max_run;
            }
            out.push((start, len));
        }
        out
    }

    /// How many ranges `take_dirty` with this `gap` would give now (runs
    /// longer than a maximum not split), counting no further than `limit`.
    pub fn dirty_runs(&self, gap: u64, limit: u64) -> u64 {
        let gap_blocks = gap / BLOCK_SIZE;
        let mut runs = 0u64;
        // The block after the last dirty one seen.
        let mut last_end: Option<u64> = None;
        for index in 0..self.dirty.word_count() {
            let mut rest = self.dirty.peek_word(index);
            while rest != 0 {
                let first = rest.trailing_zeros() as u64;
                let run = (rest >> first).trailing_ones() as u64;
                rest &= !(if run == 64 {
                    u64::MAX
                } else {
                    ((1u64 << run) - 1) << first
                });
                let start = index as u64 * 64 + first;
                if last_end.is_none_or(|end| start - end > gap_blocks) {
                    runs += 1;
                    if runs >= limit {
                        return runs;
                    }
                }
                last_end = Some(start + run);
            }
        }
        runs
    }

    /// The BLAKE3 digest of the range's bytes (DIGEST, docs/handoff.md):
    /// holes are hashed as the zeros they read as, without reading them.
    /// Blocking: run it on the I/O pool.
    pub fn digest(&self, offset: u64, length: u64) -> io::Result<[u8; 32]> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut hasher = blake3::Hasher::new();
        let mut buf = Vec::new();
        let mut pos = offset;
        for (len, hole) in self.extents(offset, length, usize::MAX) {
            let end = pos + len;
            while pos < end {
                if hole {
                    let n = (end - pos).min(ZEROS.len() as u64) as usize;
                    hasher.update(&ZEROS[..n]);
                    pos += n as u64;
                } else {
                    let n = (end - pos).min(PIECE as u64) as usize;
                    buf.resize(n, 0);
                    self.read_at(&mut buf, pos)?;
                    hasher.update(&buf);
                    pos += n as u64;
                }
            }
        }
        Ok(*hasher.finalize().as_bytes())
    }

    /// Makes every completed write durable.
    pub fn sync(&self) -> io::Result<()> {
        self.store_fault(StoreOp::Sync)?;
        self.io().sync_data()
    }

    /// Hints that the range will be read soon.
    pub fn prefetch(&self, offset: u64, length: u64) -> io::Result<()> {
        self.io().will_need(offset, length)
    }

    /// Asks a running map scan to stop.
    pub fn stop_scan(&self) {
        self.scan_stop.store(true, Ordering::Relaxed);
    }

    /// Builds the allocation map from the file's data and hole extents
    /// (SEEK_DATA/SEEK_HOLE). Blocking: run it on a worker thread after the
    /// port listens. On failure the map stays unbuilt and is never consulted:
    /// holes are then asked of the file each time.
    pub fn scan_allocation(self: &Arc<Image>) -> io::Result<()> {
        self.store_fault(StoreOp::MapScan)?;
        if !self.scan_file {
            // Built at once from the store's extents (`with_store`).
            self.map.mark_built();
            return Ok(());
        }
        // A read-only descriptor of its own, so the scan shares nothing
        // with the serving path.
        let file = File::open(&self.path)?;
        let mut pos: u64 = 0;
        let size = self.size;
        while pos < size {
            if self.scan_stop.load(Ordering::Relaxed) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "scan stopped"));
            }
            // std's Seek has no SEEK_DATA or SEEK_HOLE.
            let data = match rustix::fs::seek(&file, SeekFrom::Data(pos)) {
                Ok(data) => data,
                Err(rustix::io::Errno::NXIO) => break, // no data after pos
                Err(e) => return Err(e.into()),
            };
            if data >= size {
                break;
            }
            let hole = rustix::fs::seek(&file, SeekFrom::Hole(data))?;
            let hole = hole.min(size);
            self.map.set_bytes(data, hole - data);
            pos = hole;
        }
        self.map.mark_built();
        Ok(())
    }

    /// Describes the extents in `offset..offset+length` as runs of
    /// (length, is_hole), at most `max` of them. Until the map is built
    /// (or when it cannot be) the file is asked, with the answer the built
    /// map would give; if even that fails, everything is data.
    pub fn extents(&self, offset: u64, length: u64, max: usize) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(length).min(self.size);
        if offset >= end {
            return Vec::new();
        }
        if !self.map.is_built() {
            return FileLayout::new(self.io())
                .extents(offset, end, max)
                .unwrap_or_else(|| vec![(end - offset, false)]);
        }
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let block = pos / BLOCK_SIZE;
            let allocated = self.map.is_set(block);
            // At least this block, as in `write_at`.
            let next = self
                .map
                .next_change(block, end.div_ceil(BLOCK_SIZE), allocated)
                .max(block + 1);
            let run_end = (next * BLOCK_SIZE).min(end);
            out.push((run_end - pos, !allocated));
            pos = run_end;
        }
        out
    }
}

/// The store's data and holes as SEEK_DATA/SEEK_HOLE report them
/// ([`ImageStore::seek_extent`]), for when the allocation map is not built
/// yet. It remembers the last run it learnt, so a walk forward asks about
/// each run once.
struct FileLayout<'a> {
    store: &'a dyn ImageStore,
    /// A run learnt from the store: `start..end`, a hole or data.
    known: Option<(u64, u64, bool)>,
}

impl<'a> FileLayout<'a> {
    fn new(store: &'a dyn ImageStore) -> FileLayout<'a> {
        FileLayout { store, known: None }
    }

    fn seek(&self, data: bool, pos: u64) -> io::Result<Option<u64>> {
        self.store.seek_extent(data, pos)
    }

    /// The run that starts at `pos`: its end and whether it is a hole.
    fn run_at(&mut self, pos: u64) -> io::Result<(u64, bool)> {
        if let Some((start, end, hole)) = self.known {
            if start <= pos && pos < end {
                return Ok((end, hole));
            }
        }
        let (end, hole) = match self.seek(true, pos)? {
            None => (u64::MAX, true),
            Some(data) if data > pos => (data, true),
            // Data at `pos`: it goes on to the next hole (there is always
            // one at the end of the file).
            Some(_) => (self.seek(false, pos)?.unwrap_or(u64::MAX), false),
        };
        self.known = Some((pos, end, hole));
        Ok((end, hole))
    }

    /// Whether `start..end` holds no data at all. Unsure (an lseek failed)
    /// means no: the caller then writes, which is never wrong.
    fn is_hole(&mut self, start: u64, end: u64) -> bool {
        matches!(self.run_at(start), Ok((run_end, true)) if end <= run_end)
    }

    /// The extents of `offset..end` as the built map would describe them:
    /// a 4 KiB block holding any data is data. `None` if the file cannot
    /// say.
    fn extents(&mut self, offset: u64, end: u64, max: usize) -> Option<Vec<(u64, bool)>> {
        let round_up = |x: u64| x.checked_next_multiple_of(BLOCK_SIZE).unwrap_or(u64::MAX);
        let mut out: Vec<(u64, bool)> = Vec::new();
        // From the start of `offset`'s block: data before `offset` in that
        // block makes the block data.
        let mut pos = offset / BLOCK_SIZE * BLOCK_SIZE;
        while pos < end {
            let (run_end, hole) = self.run_at(pos).ok()?;
            let (next, is_hole) = if !hole {
                (round_up(run_end), false)
            } else if run_end / BLOCK_SIZE * BLOCK_SIZE > pos {
                (run_end / BLOCK_SIZE * BLOCK_SIZE, true)
            } else {
                // Data begins inside this block: the block is data, up to
                // the end of that data.
                let (data_end, _) = self.run_at(run_end).ok()?;
                (round_up(data_end).max(pos + BLOCK_SIZE), false)
            };
            let next = next.min(end);
            let len = next - pos.max(offset);
            if out.last().is_some_and(|last| last.1 == is_hole) {
                out.last_mut().expect("just checked").0 += len;
            } else if out.len() == max {
                break;
            } else {
                out.push((len, is_hole));
            }
            pos = next;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn temp_image(size: u64) -> (PathBuf, Arc<Image>) {
        let dir = std::env::temp_dir().join(format!(
            "flexnbd-store-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        let img = Arc::new(Image::open(&path).unwrap());
        (path, img)
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::AtomicU64;
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn a_digest_is_blake3_of_the_bytes_holes_included() {
        let (_path, img) = temp_image(1024 * 1024);
        img.scan_allocation().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        img.write_at(&data, 200_000).unwrap();
        let mut all = vec![0u8; 1024 * 1024];
        img.read_at(&mut all, 0).unwrap();
        for (offset, len) in [
            (0u64, 1024 * 1024u64),
            (100_000, 500_000),
            (600_000, 4096),
            (0, 1),
        ] {
            let expect = blake3::hash(&all[offset as usize..(offset + len) as usize]);
            assert_eq!(
                img.digest(offset, len).unwrap(),
                *expect.as_bytes(),
                "{len} bytes at {offset}"
            );
        }
    }

    fn allocated_bytes(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn size_is_rounded_down_to_512() {
        let (_, img) = temp_image(1535);
        assert_eq!(img.size(), 1024);
        assert_eq!(img.trailing_bytes(), 511);
    }

    #[test]
    fn zero_writes_over_holes_stay_holes() {
        let (path, img) = temp_image(1 << 20);
        img.scan_allocation().unwrap();
        img.write_at(&vec![0u8; 64 * 1024], 0).unwrap();
        assert_eq!(allocated_bytes(&path), 0);
        let mut data = vec![0u8; 3 * 4096];
        data[4096 + 5] = 7; // only the middle block has data
        img.write_at(&data, 8192).unwrap();
        assert_eq!(allocated_bytes(&path), 4096);
        assert!(!img.map().is_set(2) && img.map().is_set(3) && !img.map().is_set(4));
        let mut back = vec![1u8; 3 * 4096];
        img.read_at(&mut back, 8192).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn zeros_over_data_overwrite_it() {
        let (_, img) = temp_image(1 << 20);
        img.scan_allocation().unwrap();
        img.write_at(&[9u8; 4096], 0).unwrap();
        img.write_at(&[0u8; 4096], 0).unwrap();
        let mut back = [1u8; 4096];
        img.read_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }

    #[test]
    fn punch_makes_holes_and_clears_the_map() {
        let (path, img) = temp_image(1 << 20);
        img.scan_allocation().unwrap();
        img.write_at(&vec![5u8; 64 * 1024], 0).unwrap();
        img.punch(0, 64 * 1024, true).unwrap();
        assert_eq!(allocated_bytes(&path), 0);
        assert_eq!(img.extents(0, 1 << 20, 10), vec![(1 << 20, true)]);
    }

    #[test]
    fn scan_finds_data_extents() {
        let (path, _) = temp_image(1 << 20);
        {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&[1u8; 8192], 65536).unwrap();
        }
        let img = Arc::new(Image::open(&path).unwrap());
        img.scan_allocation().unwrap();
        assert!(img.map().is_built());
        let e = img.extents(0, 1 << 20, 10);
        assert_eq!(e[0], (65536, true));
        assert!(!e[1].1);
        assert_eq!(e.iter().map(|x| x.0).sum::<u64>(), 1 << 20);
    }

    /// An image of `size` bytes (a hole) with `ranges` of data written
    /// directly into its file, opened with its map not built.
    fn image_with_data(size: u64, ranges: &[(u64, u64)]) -> (PathBuf, Arc<Image>) {
        let (path, _) = temp_image(size);
        {
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            for &(at, len) in ranges {
                f.write_all_at(&vec![0xa5; len as usize], at).unwrap();
            }
            f.sync_all().unwrap();
        }
        (path.clone(), Arc::new(Image::open(&path).unwrap()))
    }

    #[test]
    fn a_known_hole_reads_as_zeros_from_memory_and_data_from_the_file() {
        const B: u64 = BLOCK_SIZE;
        let (path, img) = image_with_data(64 * B, &[(8 * B, B), (20 * B + 10, 5)]);
        let mut buf = vec![0xffu8; 4 * B as usize];
        // Not known before the map is built: the file is asked (it has no
        // pages for a hole that was never read, so it says "wait").
        assert!(!img.is_known_hole(0, 4 * B));
        img.scan_allocation().unwrap();
        assert!(img.is_known_hole(0, 4 * B));
        assert!(img.is_known_hole(9 * B, 11 * B));
        assert!(!img.is_known_hole(7 * B, 2 * B), "a range ending in data");
        assert!(!img.is_known_hole(8 * B + 100, 1), "inside a data block");
        assert!(
            !img.is_known_hole(20 * B, B),
            "a block with 5 bytes of data"
        );
        assert!(!img.is_known_hole(0, 0));
        assert!(img.read_cached(&mut buf, 0));
        assert!(buf.iter().all(|&b| b == 0), "the hole read as zeros");
        // Data already in the page cache (just written) comes from the file.
        let mut data = vec![0u8; B as usize];
        assert!(img.read_cached(&mut data, 8 * B));
        assert!(data.iter().all(|&b| b == 0xa5), "the data block's bytes");
        drop(path);
    }

    /// A fault hook keyed on some operations, failing none of them.
    struct Covers(Vec<StoreOp>);

    impl FaultHook for Covers {
        fn before(&self, _op: StoreOp, _at: Option<(u64, u64)>) -> io::Result<()> {
            Ok(())
        }
        fn covers(&self, op: StoreOp) -> bool {
            self.0.contains(&op)
        }
    }

    #[test]
    fn zeroing_a_known_hole_is_a_no_op_unless_a_plan_fails_writes() {
        const B: u64 = BLOCK_SIZE;
        let (path, img) = image_with_data(64 * B, &[(8 * B, B)]);
        assert!(!img.is_no_op_zero(0, 4 * B), "map not built yet");
        img.scan_allocation().unwrap();
        assert!(img.is_no_op_zero(0, 4 * B));
        assert!(!img.is_no_op_zero(0, 9 * B), "a range with data");
        // Faults not keyed on writes leave it a no-op, and reads answered
        // from memory.
        let stacked = |ops: Vec<StoreOp>| {
            let stack = Stack {
                faults: Some(Arc::new(Covers(ops))),
                ..Stack::default()
            };
            Arc::new(Image::open_stacked(&path, stack).unwrap())
        };
        let img = stacked(vec![StoreOp::Sync]);
        img.scan_allocation().unwrap();
        assert!(img.is_no_op_zero(0, 4 * B));
        assert!(img.read_cached(&mut [0u8; 512], 0));
        let img = stacked(vec![StoreOp::Write, StoreOp::Read]);
        img.scan_allocation().unwrap();
        assert!(
            !img.is_no_op_zero(0, 4 * B),
            "store.write keys must see every punch"
        );
        assert!(
            !img.read_cached(&mut [0u8; 512], 0),
            "store.read keys must see every read"
        );
    }

    /// A fault asked for: the operation and its bytes.
    type Asked = (StoreOp, Option<(u64, u64)>);

    /// Counts the faults asked for and fails writes.
    struct FailWrites(std::sync::Mutex<Vec<Asked>>);

    impl FaultHook for FailWrites {
        fn before(&self, op: StoreOp, at: Option<(u64, u64)>) -> io::Result<()> {
            self.0.lock().unwrap().push((op, at));
            match op {
                StoreOp::Write => Err(io::Error::from_raw_os_error(libc::EIO)),
                _ => Ok(()),
            }
        }
        fn covers(&self, op: StoreOp) -> bool {
            op == StoreOp::Write
        }
    }

    #[test]
    fn the_fault_layer_is_asked_once_per_request_before_the_store() {
        const B: u64 = BLOCK_SIZE;
        let (path, _) = image_with_data(64 * B, &[(0, B)]);
        let hook = Arc::new(FailWrites(Default::default()));
        let stack = Stack {
            faults: Some(hook.clone()),
            ..Stack::default()
        };
        let img = Image::open_stacked(&path, stack).unwrap();
        // A write of many blocks (zeros over holes among data) is one
        // fault, and it fails before anything reaches the file.
        let mut data = vec![7u8; 8 * B as usize];
        data[(2 * B) as usize..(5 * B) as usize].fill(0);
        let e = img.write_at(&data, 10 * B).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        let mut back = vec![1u8; B as usize];
        img.read_at(&mut back, 10 * B).unwrap();
        assert!(back.iter().all(|&b| b == 0), "nothing was written");
        assert_eq!(
            img.punch(0, B, true).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        img.sync().unwrap();
        assert_eq!(
            *hook.0.lock().unwrap(),
            vec![
                (StoreOp::Write, Some((10 * B, 8 * B))),
                (StoreOp::Read, Some((10 * B, B))),
                (StoreOp::Write, Some((0, B))),
                (StoreOp::Sync, None),
            ]
        );
        // Writes a fault is keyed on are never skipped as no-ops.
        let img = Arc::new(img);
        img.scan_allocation().unwrap();
        assert!(!img.is_no_op_zero(20 * B, B));
    }

    /// A disk in memory that knows where its data is.
    struct MemDisk {
        bytes: std::sync::Mutex<Vec<u8>>,
        extents: Vec<(u64, u64)>,
    }

    impl ImageStore for MemDisk {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let bytes = self.bytes.lock().unwrap();
            buf.copy_from_slice(&bytes[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
            let mut bytes = self.bytes.lock().unwrap();
            bytes[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn punch_hole(&self, offset: u64, length: u64) -> io::Result<()> {
            let mut bytes = self.bytes.lock().unwrap();
            bytes[offset as usize..(offset + length) as usize].fill(0);
            Ok(())
        }
        fn sync_data(&self) -> io::Result<()> {
            Ok(())
        }
        fn start_writeback(&self, _offset: u64, _length: u64) {}
        fn will_need(&self, _offset: u64, _length: u64) -> io::Result<()> {
            Ok(())
        }
        fn data_extents(&self) -> Option<Vec<(u64, u64)>> {
            Some(self.extents.clone())
        }
    }

    #[test]
    fn an_image_on_any_store_has_its_map_built_from_the_stores_extents() {
        const B: u64 = BLOCK_SIZE;
        let size = 64 * B;
        let mut bytes = vec![0u8; size as usize];
        bytes[(8 * B) as usize..(9 * B) as usize].fill(7);
        let disk = Arc::new(MemDisk {
            bytes: std::sync::Mutex::new(bytes),
            extents: vec![(8 * B, B)],
        });
        let img = Image::with_store(PathBuf::from("mem.img"), size, disk.clone());
        assert!(img.map().is_built(), "built at once, no scan");
        assert_eq!(
            img.extents(0, 16 * B, usize::MAX),
            vec![(8 * B, true), (B, false), (7 * B, true)]
        );
        // A hole reads as zeros from the map; data must go to the store,
        // which cannot answer from a cache.
        let mut buf = vec![1u8; B as usize];
        assert!(img.read_cached(&mut buf, 0));
        assert!(buf.iter().all(|&b| b == 0));
        assert!(!img.read_cached(&mut buf, 8 * B));
        img.read_at(&mut buf, 8 * B).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        // Writes reach the store and the map; zeros over a hole do not.
        img.write_at(&[5u8; 100], 20 * B + 1).unwrap();
        img.write_at(&vec![0u8; B as usize], 30 * B).unwrap();
        assert!(img.map().is_set(20) && !img.map().is_set(30));
        assert_eq!(disk.bytes.lock().unwrap()[(20 * B + 1) as usize], 5);
        img.punch(8 * B, B, true).unwrap();
        assert!(!img.map().is_set(8));
        assert!(
            img.identity().is_err(),
            "a store that names no file has no identity"
        );
        // Without extents everything is data.
        let plain = Arc::new(MemDisk {
            bytes: std::sync::Mutex::new(vec![0u8; size as usize]),
            extents: Vec::new(),
        });
        struct NoExtents(Arc<MemDisk>);
        impl ImageStore for NoExtents {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                self.0.read_at(buf, offset)
            }
            fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
                self.0.write_at(data, offset)
            }
            fn punch_hole(&self, offset: u64, length: u64) -> io::Result<()> {
                self.0.punch_hole(offset, length)
            }
            fn sync_data(&self) -> io::Result<()> {
                Ok(())
            }
            fn start_writeback(&self, _offset: u64, _length: u64) {}
            fn will_need(&self, _offset: u64, _length: u64) -> io::Result<()> {
                Ok(())
            }
        }
        let img = Image::with_store(PathBuf::from("mem2.img"), size, Arc::new(NoExtents(plain)));
        assert_eq!(img.extents(0, size, usize::MAX), vec![(size, false)]);
    }

    #[test]
    fn the_file_store_names_the_file_it_serves() {
        let (path, img) = temp_image(1 << 20);
        assert!(img
            .identity()
            .unwrap()
            .same_file(&Identity::at(&path).unwrap()));
    }

    #[test]
    fn extents_before_the_map_is_built_are_those_of_the_built_map() {
        const B: u64 = BLOCK_SIZE;
        // Data in whole blocks, in part of a block, in adjacent blocks, at
        // the very end; an export that ends inside a block (the file is
        // longer by trailing bytes that are not served).
        let size = 300 * B + 1024;
        let ranges = [
            (0, 2 * B),
            (10 * B + 100, 50),
            (11 * B, 3 * B),
            (40 * B + B - 1, 2),
            (100 * B, 64 * B),
            (299 * B, B + 1024),
        ];
        let (_, img) = image_with_data(size + 100, &ranges);
        assert_eq!(img.size(), size);
        assert!(!img.map().is_built());
        let probes: Vec<(u64, u64)> = vec![
            (0, size),
            (1, size - 1),
            (B / 2, 3 * B),
            (10 * B + 200, B),
            (10 * B + 120, 10),
            (12 * B + 7, 90 * B),
            (40 * B + 5, 5),
            (200 * B, 100 * B + 1024),
            (size - 1, 1),
        ];
        let mut unbuilt = Vec::new();
        for &(offset, length) in &probes {
            for max in [1, 2, 3, usize::MAX] {
                unbuilt.push(img.extents(offset, length, max));
            }
        }
        img.scan_allocation().unwrap();
        assert!(img.map().is_built());
        let mut i = 0;
        for &(offset, length) in &probes {
            for max in [1, 2, 3, usize::MAX] {
                assert_eq!(
                    unbuilt[i],
                    img.extents(offset, length, max),
                    "extents({offset}, {length}, {max}) before and after the map was built"
                );
                i += 1;
            }
        }
        assert_eq!(
            img.extents(0, 12 * B, usize::MAX),
            vec![(2 * B, false), (8 * B, true), (2 * B, false)]
        );
    }

    #[test]
    fn zero_writes_over_holes_stay_holes_before_the_map_is_built() {
        let (path, img) = image_with_data(1 << 20, &[(8 * BLOCK_SIZE, BLOCK_SIZE)]);
        assert!(!img.map().is_built());
        let before = allocated_bytes(&path);
        img.write_at(&vec![0u8; 64 * 1024], 0).unwrap();
        assert_eq!(allocated_bytes(&path), before, "zeros over a hole");
        // Zeros over data overwrite it; a non-zero block among zeros lands.
        let mut data = vec![0u8; 3 * 4096];
        data[2 * 4096 + 5] = 7;
        img.write_at(&data, 8 * BLOCK_SIZE).unwrap();
        let mut back = vec![1u8; 3 * 4096];
        img.read_at(&mut back, 8 * BLOCK_SIZE).unwrap();
        assert_eq!(back, data);
        assert_eq!(allocated_bytes(&path), before + 4096, "only the new block");
        // What was written is recorded (the zeros over the hole were not
        // written), so the built map agrees with the file.
        assert!(img.map().is_set(8) && !img.map().is_set(9) && img.map().is_set(10));
        assert!(!img.map().is_set(0));
        img.scan_allocation().unwrap();
        assert_eq!(
            img.extents(0, 16 * BLOCK_SIZE, usize::MAX),
            vec![
                (8 * BLOCK_SIZE, true),
                (BLOCK_SIZE, false),
                (BLOCK_SIZE, true),
                (BLOCK_SIZE, false),
                (5 * BLOCK_SIZE, true)
            ]
        );
    }

    #[test]
    fn a_punch_before_the_map_is_built_leaves_the_built_map_a_hole() {
        let (_, img) = image_with_data(1 << 20, &[]);
        img.write_at(&[3u8; 4096], 4 * BLOCK_SIZE).unwrap();
        assert!(img.map().is_set(4), "a write records its block");
        img.punch(4 * BLOCK_SIZE, BLOCK_SIZE, true).unwrap();
        assert!(!img.map().is_set(4), "the punch clears it again");
        img.scan_allocation().unwrap();
        assert_eq!(img.extents(0, 1 << 20, 10), vec![(1 << 20, true)]);
    }

    #[test]
    fn extents_cover_the_range_while_writes_flip_bits() {
        let (_, img) = temp_image(1 << 20);
        img.scan_allocation().unwrap();
        let writer = {
            let img = img.clone();
            std::thread::spawn(move || {
                for i in 0..2000u64 {
                    let block = (i * 7919) % 256;
                    img.write_at(&[1u8; 100], block * BLOCK_SIZE + 3).unwrap();
                    if i % 3 == 0 {
                        img.punch(block * BLOCK_SIZE, BLOCK_SIZE, true).unwrap();
                    }
                }
            })
        };
        for i in 0..20_000u64 {
            let offset = (i * 611) % (1 << 19) + 1;
            let length = 300_000;
            let e = img.extents(offset, length, usize::MAX);
            assert_eq!(e.iter().map(|x| x.0).sum::<u64>(), length);
            assert!(e.iter().all(|x| x.0 > 0));
        }
        writer.join().unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(32))]
        /// Writers mark blocks while the mirror clears, takes and restarts
        /// tracking, all at once: `dirty_bytes` never panics (debug builds
        /// check overflow) and stays within the export, and once every thread
        /// is done it equals the number of set bits exactly.
        #[test]
        fn dirty_count_is_exact_under_concurrent_updates(
            seeds in proptest::collection::vec(proptest::prelude::any::<u64>(), 3),
            rounds in 5_000usize..20_000,
        ) {
            const BLOCKS: u64 = 512;
            let (_, img) = temp_image(BLOCKS * BLOCK_SIZE);
            img.start_tracking();
            let mut threads = Vec::new();
            // Every thread starts at once, so their updates really overlap.
            let start = Arc::new(std::sync::Barrier::new(seeds.len()));
            for (role, seed) in seeds.into_iter().enumerate() {
                let img = img.clone();
                let start = start.clone();
                threads.push(std::thread::spawn(move || {
                    start.wait();
                    let mut x = seed | 1;
                    let mut next = move || {
                        // xorshift: cheap, deterministic per seed.
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    for _ in 0..rounds {
                        let first = next() % BLOCKS;
                        let len = 1 + next() % 80;
                        let offset = first * BLOCK_SIZE + next() % BLOCK_SIZE;
                        let bytes = len * BLOCK_SIZE;
                        match (role, next() % 8) {
                            (0, _) | (1, 0..=3) => img.mark_dirty(offset, bytes),
                            (1, _) => img.clear_dirty(offset, bytes),
                            (_, 0..=1) => img.start_tracking(),
                            (_, 2..=4) => {
                                img.take_dirty(next() % (BLOCKS * BLOCK_SIZE), 64 * BLOCK_SIZE, 0);
                            }
                            _ => {}
                        }
                        assert!(img.dirty_bytes() <= img.size());
                    }
                }));
            }
            for t in threads {
                t.join().expect("no thread panicked");
            }
            let counted = img.dirty_bytes();
            let mut set = 0u64;
            for index in 0..img.dirty.word_count() {
                set += u64::from(img.dirty.take_word(index).count_ones());
            }
            proptest::prop_assert_eq!(counted, (set * BLOCK_SIZE).min(img.size()));
        }
    }

    #[test]
    fn dirty_ranges_close_together_are_taken_as_one_with_the_gap_between() {
        let (_, img) = temp_image(1 << 20);
        img.start_tracking();
        let b = BLOCK_SIZE;
        // Blocks 0, 2 (a one-block gap), 5 (two blocks on), 70 (past a word).
        for block in [0, 2, 5, 70] {
            img.mark_dirty(block * b, b);
        }
        assert_eq!(img.dirty_runs(0, u64::MAX), 4);
        assert_eq!(img.dirty_runs(b, u64::MAX), 3);
        assert_eq!(img.dirty_runs(2 * b, u64::MAX), 2);
        assert_eq!(img.dirty_runs(64 * b, u64::MAX), 1);
        // Counting stops at the limit.
        assert_eq!(img.dirty_runs(0, 2), 2);
        // Peeking took nothing.
        assert_eq!(img.dirty_bytes(), 4 * b);
        assert_eq!(
            img.take_dirty(u64::MAX, 1 << 20, 2 * b),
            vec![(0, 6 * b), (70 * b, b)]
        );
        assert_eq!(img.dirty_bytes(), 0);
        // A merged range never exceeds the largest write asked for.
        for block in [0, 2, 5] {
            img.mark_dirty(block * b, b);
        }
        assert_eq!(
            img.take_dirty(u64::MAX, 4 * b, 2 * b),
            vec![(0, 3 * b), (5 * b, b)]
        );
    }

    #[test]
    fn client_writes_are_paced_only_for_clean_blocks_and_only_while_pacing() {
        use pace::PACE_BURST;
        use std::time::Duration;
        let (_, img) = temp_image(1 << 20);
        let slow = PaceRates {
            per_request: 0.01,
            per_byte: 0.0,
            rate: f64::INFINITY,
        };
        // Not tracking: no pacing even when asked for.
        img.set_pace(Some(slow), u64::MAX);
        assert_eq!(img.pace_write(0, 4096), Duration::ZERO);
        img.start_tracking();
        img.set_pace(Some(slow), u64::MAX);
        // Two clean runs (blocks 0 and 2, around dirty block 1): 2 x 10 ms
        // of the destination, doubled for the clients' share.
        img.mark_dirty(4096, 4096);
        let wait = img.pace_write(0, 3 * 4096);
        assert_eq!(wait, Duration::from_millis(40) - PACE_BURST);
        // Rewriting a dirty block costs nothing more.
        assert_eq!(img.pace_write(4096, 4096), Duration::ZERO);
        // Blocks at or past the sweep are not charged.
        img.set_pace(Some(slow), 8 * 4096);
        assert_eq!(img.pace_write(8 * 4096, 4096), Duration::ZERO);
        img.stop_tracking();
        img.start_tracking();
        assert_eq!(
            img.pace_write(0, 4096),
            Duration::ZERO,
            "stopping ends pacing"
        );
        // Runs are counted across words: blocks 60..70 are one clean run,
        // 71..131 (past dirty block 70) another.
        img.set_pace(Some(slow), u64::MAX);
        img.mark_dirty(70 * 4096, 4096);
        assert_eq!(
            img.pace_write(60 * 4096, 71 * 4096),
            Duration::from_millis(40) - PACE_BURST
        );
    }

    #[test]
    fn a_pacing_wait_ends_when_pacing_does() {
        use std::time::{Duration, Instant};
        let (_, img) = temp_image(1 << 20);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let slow = PaceRates {
            per_request: 0.0,
            per_byte: 0.0,
            rate: f64::INFINITY,
        };
        img.set_pace(Some(slow), u64::MAX);
        let started = Instant::now();
        rt.block_on(async {
            let sleeper = {
                let img = img.clone();
                tokio::spawn(async move { img.pace_sleep(Duration::from_secs(60)).await })
            };
            tokio::task::yield_now().await;
            img.set_pace(None, u64::MAX);
            tokio::time::timeout(Duration::from_secs(10), sleeper)
                .await
                .expect("the wait ended with pacing")
                .unwrap();
            // Pacing already off: no wait at all.
            tokio::time::timeout(
                Duration::from_secs(10),
                img.pace_sleep(Duration::from_secs(60)),
            )
            .await
            .expect("no wait once pacing is off");
        });
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn is_zero_detects_any_nonzero_byte() {
        let mut b = vec![0u8; 5000];
        assert!(is_zero(&b));
        for i in [0, 255, 256, 4999] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
    }
}
