//! The storage seam: every byte the image reads or writes, and every sync,
//! goes through an [`ImageStore`], the interface of an image's block-device
//! stack. Production uses [`FileStore`], plain system calls on the image
//! file; a fault plan that can cut power stacks a recording store on top of
//! it (`crate::power`), which knows what a power cut would lose; a simulated
//! disk can stand in for the file altogether (`super::Image::with_store`).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use super::faults::StoreOp;

/// The operations the image performs on its file.
pub trait ImageStore: Send + Sync {
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `data` at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Deallocates the range, which then reads as zeros (errors as from
    /// fallocate: EOPNOTSUPP where the file system cannot).
    fn punch_hole(&self, offset: u64, length: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Starts writeback of the range without waiting for it; it makes
    /// nothing durable.
    fn start_writeback(&self, offset: u64, length: u64);
    /// Hints that the range will be read soon.
    fn will_need(&self, offset: u64, length: u64) -> io::Result<()>;
    /// Fills `buf` from `offset` only if that cannot wait for the disk:
    /// `true` when all of `buf` was filled. `false` (the default, and the
    /// answer of any layer that must see every read) sends the read to a
    /// blocking thread.
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        let _ = (buf, offset);
        false
    }
    /// The `(offset, length)` ranges that hold data, in order, when the
    /// store knows them without a scan; `None` (the default) when it does
    /// not. A store that answers has its allocation map built at once.
    fn data_extents(&self) -> Option<Vec<(u64, u64)>> {
        None
    }
    /// SEEK_DATA (`data`) or SEEK_HOLE: the first offset at or after `pos`
    /// that holds data (or is a hole), `None` at or past the end. An error
    /// (the default: the store cannot tell) means unsure.
    fn seek_extent(&self, data: bool, pos: u64) -> io::Result<Option<u64>> {
        let _ = (data, pos);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this store cannot tell where its holes are",
        ))
    }
    /// The fault for `op` on the `(offset, length)` bytes `at` (or the whole
    /// operation), applied before the image performs it, once per request
    /// whatever pieces it then takes: a fault layer applies its plan's and
    /// passes it down; a store with no layer below has none (the default).
    fn fault(&self, op: StoreOp, at: Option<(u64, u64)>) -> io::Result<()> {
        let _ = (op, at);
        Ok(())
    }
    /// Whether every `op` must reach this store (a layer faults or records
    /// it) instead of being answered from memory by the image.
    fn sees_every(&self, op: StoreOp) -> bool {
        let _ = op;
        false
    }
    /// Which file (or disk) this is, for the completion record.
    fn identity(&self) -> io::Result<super::Identity> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this store has no identity (expected a file or a store that names itself)",
        ))
    }
}

/// The production store: the image file itself.
pub struct FileStore {
    file: File,
}

impl FileStore {
    pub fn new(file: File) -> FileStore {
        FileStore { file }
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl ImageStore for FileStore {
    /// Fills `buf` from `offset` only if that needs no wait for the disk
    /// (the data is in the page cache): `true` when all of `buf` was filled.
    /// `false` (nothing promised about `buf`) when the read would wait, came
    /// up short, failed, or the kernel or file system cannot tell
    /// (RWF_NOWAIT unsupported); the caller then reads on a blocking thread,
    /// where any real error shows.
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        // Offsets past i64::MAX are not file offsets (and u64::MAX would
        // mean "the current offset" to preadv2).
        if i64::try_from(offset).is_err() {
            return false;
        }
        let len = buf.len();
        rustix::io::preadv2(
            &self.file,
            &mut [io::IoSliceMut::new(buf)],
            offset,
            rustix::io::ReadWriteFlags::NOWAIT,
        )
        .is_ok_and(|n| n == len)
    }

    fn identity(&self) -> io::Result<super::Identity> {
        Ok(super::Identity::of(&self.file.metadata()?))
    }

    /// The lseeks move the file offset of the image's descriptor, which
    /// nothing uses: every read and write is positional, and each lseek's
    /// result does not depend on the offset it starts from.
    fn seek_extent(&self, data: bool, pos: u64) -> io::Result<Option<u64>> {
        let to = if data {
            rustix::fs::SeekFrom::Data(pos)
        } else {
            rustix::fs::SeekFrom::Hole(pos)
        };
        match rustix::fs::seek(&self.file, to) {
            Ok(r) => Ok(Some(r)),
            Err(rustix::io::Errno::NXIO) => Ok(None), // at or past the end of the file
            Err(e) => Err(e.into()),
        }
    }
    #[inline]
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    #[inline]
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn punch_hole(&self, offset: u64, length: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags;
        rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            length,
        )
        .map_err(io::Error::from)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn start_writeback(&self, offset: u64, length: u64) {
        // Only starts the I/O; errors surface at the next sync.
        // Neither std nor rustix wraps sync_file_range, hence libc.
        // SAFETY: sync_file_range takes integers only and touches no memory;
        // the descriptor is owned by `self.file` and open for the whole call.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                length as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }

    fn will_need(&self, offset: u64, length: u64) -> io::Result<()> {
        // A length of 0 (None) means "to the end of the file", as in
        // posix_fadvise.
        rustix::fs::fadvise(
            &self.file,
            offset,
            std::num::NonZeroU64::new(length),
            rustix::fs::Advice::WillNeed,
        )
        .map_err(io::Error::from)
    }
}
