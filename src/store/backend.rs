//! The storage seam: every byte the image reads or writes, and every sync,
//! goes through an [`ImageStore`]. Production uses [`FileStore`], plain
//! system calls on the image file; a fault plan that can cut power puts a
//! recording store in front of it (`crate::power`), which knows what a power
//! cut would lose.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

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

    /// Fills `buf` from `offset` only if that needs no wait for the disk
    /// (the data is in the page cache): `true` when all of `buf` was filled.
    /// `false` (nothing promised about `buf`) when the read would wait, came
    /// up short, failed, or the kernel or file system cannot tell
    /// (RWF_NOWAIT unsupported); the caller then reads on a blocking thread,
    /// where any real error shows.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> bool {
        let Ok(offset) = libc::off_t::try_from(offset) else {
            return false;
        };
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec over `buf`, which is valid for writes of its
        // length for the whole call; the descriptor is owned by `self.file`.
        let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
        usize::try_from(n).is_ok_and(|n| n == buf.len())
    }
}

impl ImageStore for FileStore {
    #[inline]
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    #[inline]
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn punch_hole(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: fallocate only reads its integer arguments; the descriptor
        // is owned by `self.file` and open for the whole call.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                length as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn start_writeback(&self, offset: u64, length: u64) {
        // Only starts the I/O; errors surface at the next sync.
        // SAFETY: integer arguments only, on a descriptor we own.
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
        // SAFETY: integer arguments only, on a descriptor we own.
        let rc = unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                length as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }
}
