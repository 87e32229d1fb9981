//! Which file an image is: device, inode, size and birth time.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Which file an image path names: the completion record holds it, so a
/// record can be told from one left beside a file that has since been
/// replaced (a new inode) or resized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// The file's creation time (statx birth time, nanoseconds since the
    /// epoch), where the file system keeps one: an image deleted and
    /// created again can get its old inode number back, but not its birth
    /// time.
    pub born: Option<u128>,
}

impl Identity {
    pub fn of(meta: &fs::Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            born: meta
                .created()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos()),
        }
    }

    /// The identity of the file now at `path` (following symlinks, as
    /// opening the image does).
    pub fn at(path: &Path) -> io::Result<Identity> {
        fs::metadata(path).map(|m| Identity::of(&m))
    }

    /// Whether both name the same file: device, inode and size equal, and
    /// the birth times too when both are known.
    pub fn same_file(&self, other: &Identity) -> bool {
        self.dev == other.dev
            && self.ino == other.ino
            && self.size == other.size
            && match (self.born, other.born) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dev={} ino={} size={}", self.dev, self.ino, self.size)?;
        if let Some(born) = self.born {
            write!(f, " born={born}")?;
        }
        Ok(())
    }
}
