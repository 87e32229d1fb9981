//! A simulated file system for the small files of the hand-off (the marker,
//! the completion record, their temporary files) and the image's directory
//! entry. As on a real one, a file's content is durable only after its
//! fsync, and a create, rename or removal only after its directory's fsync.
//! A power cut reverts what was not durable (for a torn cut, each change
//! independently).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use faults::{PowerLoss, SplitMix64};

use crate::store::files::{parent_dir, FileOps};

/// One file: its content now and the content an fsync made durable.
#[derive(Clone, Debug, PartialEq)]
struct Inode {
    now: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Default)]
struct State {
    /// Inodes by number; an inode named by no entry (now or durably) is gone.
    inodes: BTreeMap<u64, Inode>,
    next: u64,
    /// The directory entries as they are now, and as they are durably.
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    /// The sizes of the images (whose bytes live on a simulated disk).
    sizes: BTreeMap<PathBuf, u64>,
}

/// The simulated file system of one host.
#[derive(Default)]
pub struct SimFs {
    state: Mutex<State>,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file", path.display()),
    )
}

impl SimFs {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A file that exists durably from the start (the image file); its
    /// inode number.
    pub fn create_durable(&self, path: &Path, data: &[u8]) -> u64 {
        let mut s = self.lock();
        let n = s.next;
        s.next += 1;
        s.inodes.insert(
            n,
            Inode {
                now: data.to_vec(),
                durable: data.to_vec(),
            },
        );
        s.names.insert(path.to_owned(), n);
        s.durable_names.insert(path.to_owned(), n);
        n
    }

    /// The content of `path` now, if it exists.
    pub fn read(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.lock();
        let n = s.names.get(path)?;
        Some(s.inodes[n].now.clone())
    }

    /// Says `path` is an image of `size` bytes (for its identity).
    pub fn set_image_size(&self, path: &Path, size: u64) {
        self.lock().sizes.insert(path.to_owned(), size);
    }

    pub fn exists(&self, path: &Path) -> bool {
        self.lock().names.contains_key(path)
    }

    /// Loses what a power cut may lose.
    pub fn power_cut(&self, loss: PowerLoss, rng: &mut SplitMix64) {
        let mut s = self.lock();
        let keep = |rng: &mut SplitMix64| match loss {
            PowerLoss::All => false,
            PowerLoss::Nothing => true,
            PowerLoss::Torn | PowerLoss::Seeded => rng.coin(),
        };
        // Directory entries: each name that differs takes its durable or
        // its current form.
        let mut all: Vec<PathBuf> = s.names.keys().cloned().collect();
        all.extend(s.durable_names.keys().cloned());
        all.sort();
        all.dedup();
        let mut names = BTreeMap::new();
        for name in all {
            let (now, durable) = (
                s.names.get(&name).copied(),
                s.durable_names.get(&name).copied(),
            );
            let chosen = if now == durable || keep(rng) {
                now
            } else {
                durable
            };
            if let Some(n) = chosen {
                names.insert(name, n);
            }
        }
        // File contents: written back whole or not at all (the files are
        // small: one page).
        for inode in s.inodes.values_mut() {
            if inode.now != inode.durable {
                if keep(rng) {
                    inode.durable = inode.now.clone();
                } else {
                    inode.now = inode.durable.clone();
                }
            }
        }
        s.durable_names = names.clone();
        s.names = names;
        let live: std::collections::BTreeSet<u64> = s.names.values().copied().collect();
        s.inodes.retain(|n, _| live.contains(n));
    }
}

impl FileOps for SimFs {
    fn write_file(&self, path: &Path, data: &[u8], sync: bool) -> io::Result<()> {
        let mut s = self.lock();
        let n = match s.names.get(path) {
            Some(&n) => n,
            None => {
                let n = s.next;
                s.next += 1;
                s.inodes.insert(
                    n,
                    Inode {
                        now: Vec::new(),
                        durable: Vec::new(),
                    },
                );
                s.names.insert(path.to_owned(), n);
                n
            }
        };
        let inode = s.inodes.get_mut(&n).expect("named inode exists");
        inode.now = data.to_vec();
        if sync {
            inode.durable = data.to_vec();
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let n = s.names.remove(from).ok_or_else(|| not_found(from))?;
        s.names.insert(to.to_owned(), n);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.names.remove(path).ok_or_else(|| not_found(path))?;
        Ok(())
    }

    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        Ok(self.read(path))
    }

    fn identity(&self, path: &Path) -> io::Result<crate::store::Identity> {
        let s = self.lock();
        match (s.names.get(path), s.sizes.get(path)) {
            (Some(&n), Some(&size)) => Ok(super::disk::identity(n, size)),
            (Some(_), None) => Err(io::Error::other(format!(
                "{}: not an image",
                path.display()
            ))),
            _ => Err(not_found(path)),
        }
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let in_dir = |p: &Path| parent_dir(p) == dir;
        let mut durable: BTreeMap<PathBuf, u64> = s
            .durable_names
            .iter()
            .filter(|(p, _)| !in_dir(p))
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        durable.extend(
            s.names
                .iter()
                .filter(|(p, _)| in_dir(p))
                .map(|(p, n)| (p.clone(), *n)),
        );
        s.durable_names = durable;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rename_without_the_directory_fsync_is_undone_by_a_power_cut() {
        let fs = SimFs::default();
        let (tmp, to) = (Path::new("/d/m.tmp"), Path::new("/d/m"));
        fs.write_file(tmp, b"one", true).unwrap();
        fs.rename(tmp, to).unwrap();
        fs.power_cut(PowerLoss::All, &mut SplitMix64::new(1));
        assert!(!fs.exists(to), "the rename was never made durable");
        assert!(!fs.exists(tmp), "nor was the create");
    }

    #[test]
    fn durable_steps_survive_a_power_cut() {
        let fs = SimFs::default();
        let (tmp, to) = (Path::new("/d/m.tmp"), Path::new("/d/m"));
        fs.write_file(tmp, b"one", true).unwrap();
        fs.rename(tmp, to).unwrap();
        fs.sync_dir(Path::new("/d")).unwrap();
        fs.write_file(Path::new("/d/x"), b"unsynced", false)
            .unwrap();
        fs.power_cut(PowerLoss::All, &mut SplitMix64::new(1));
        assert_eq!(fs.read(to).as_deref(), Some(&b"one"[..]));
        assert!(!fs.exists(Path::new("/d/x")));
    }

    #[test]
    fn content_written_without_fsync_reverts() {
        let fs = SimFs::default();
        let p = Path::new("/d/m");
        fs.create_durable(p, b"old");
        fs.write_file(p, b"new", false).unwrap();
        fs.power_cut(PowerLoss::All, &mut SplitMix64::new(1));
        assert_eq!(fs.read(p).as_deref(), Some(&b"old"[..]));
        fs.remove(p).unwrap();
        fs.power_cut(PowerLoss::All, &mut SplitMix64::new(1));
        assert!(
            fs.exists(p),
            "a removal without the directory fsync is undone"
        );
    }
}
