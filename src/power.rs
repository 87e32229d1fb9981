//! Power loss: what a power cut takes away, applied to the real files before
//! the process dies (the `powercut` fault action).
//!
//! A SIGKILL keeps the page cache, so a crash alone can never show whether an
//! fdatasync or fsync happened. When a fault plan can cut power, the storage
//! seams record what is not yet durable: [`ImageRecorder`] sits in front of
//! the image file and keeps, for every 4 KiB block written since the last
//! successful fdatasync began, the block's earlier content; [`FileModel`]
//! follows the marker and unlink operations with their file and directory
//! fsyncs. [`Power::cut`] reverts exactly what a power cut may lose, logs
//! what it did, and kills the process like `crash`.
//! `fixtures/faults/README.md` lists what is modelled and what is not.
//!
//! Each instance has its own model, made where its fault plan is known and
//! wired into its storage stack ([`Power`] is a `store::Layer`, and
//! [`Power::files`] its file operations). Nothing here runs in production:
//! without a plan that names `powercut` no model exists and the stack is
//! the plain file store.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

pub use faults::PowerLoss;
use faults::SplitMix64;

use crate::store::backend::ImageStore;
use crate::store::files::{self, Disk, FileOps};
use crate::store::Layer;
use crate::warn;

/// The unit a power cut may tear: one sector.
const SECTOR: u64 = 512;
/// The unit the recorder keeps earlier content in.
const BLOCK: u64 = 4096;

/// One instance's power-loss model.
pub struct Power {
    seed: u64,
    images: Mutex<Vec<Arc<ImageRecorder>>>,
    files: Arc<FileModel>,
}

impl Power {
    /// A model with nothing recorded yet; `seed` decides a seeded cut.
    pub fn new(seed: u64) -> Power {
        Power {
            seed,
            images: Mutex::new(Vec::new()),
            files: Arc::new(FileModel::default()),
        }
    }

    /// The file operations for the instance's marker, record and unlink,
    /// with this model following along.
    pub fn files(&self) -> Arc<dyn FileOps> {
        Arc::new(RecordingFiles(self.files.clone()))
    }

    /// Loses what a power cut may lose, then dies like SIGKILL.
    pub fn cut(&self, loss: PowerLoss) -> ! {
        self.lose(loss);
        faults::crash_now()
    }
}

/// A power cut without a model (a process that holds no durable state of
/// its own, like `flexnbd read`): there is nothing to lose, so it is a
/// crash.
pub fn cut_without_model() -> ! {
    faults::crash_now()
}

impl Layer for Power {
    fn stack(
        &self,
        below: Arc<dyn ImageStore>,
        path: &Path,
        len: u64,
    ) -> io::Result<Arc<dyn ImageStore>> {
        Ok(self.record_image(below, path, len))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Power {
    /// Starts recording the image at `path`, `len` bytes stored in `disk`.
    pub fn record_image(
        &self,
        disk: Arc<dyn ImageStore>,
        path: &Path,
        len: u64,
    ) -> Arc<ImageRecorder> {
        let mut images = lock(&self.images);
        let recorder = Arc::new(ImageRecorder {
            disk,
            path: path.to_owned(),
            len,
            barrier: RwLock::new(()),
            journal: Mutex::new(Journal::default()),
        });
        images.push(recorder.clone());
        self.files.add_image(path, images.len() - 1);
        recorder
    }

    fn lose(&self, loss: PowerLoss) {
        let mut rng = SplitMix64::new(self.seed ^ 0x9e37_79b9_7f4a_7c15);
        let mode = match loss {
            PowerLoss::Seeded => match rng.next_u64() % 3 {
                0 => PowerLoss::All,
                1 => PowerLoss::Nothing,
                _ => PowerLoss::Torn,
            },
            other => other,
        };
        // Held until the process dies: no write, sync or marker change may
        // slip in between the revert and the kill (a FLUSH completing now
        // would vouch for data just reverted).
        let images = lock(&self.images);
        let mut report = Vec::new();
        for image in images.iter() {
            let (reverted, at_risk) = image.lose(mode, &mut rng);
            report.push(format!(
                "{}: {reverted} of {at_risk} sectors not yet durable reverted",
                image.path.display()
            ));
        }
        report.extend(self.files.lose(mode, &mut rng, &images));
        warn!(
            "power cut ({}): {}",
            mode.name().unwrap_or("seeded"),
            if report.is_empty() {
                "nothing was at risk".to_string()
            } else {
                report.join("; ")
            }
        );
        std::mem::forget(images);
    }
}

// ------------------------------------------------------------------ image

/// Records, in front of the image file, what a power cut would lose.
///
/// Time is cut into epochs: a sync begins a new one. A write belongs to the
/// epoch it ran in (a sync waits for writes in flight before it begins), so
/// a successful sync that began epoch `e` made every write of the epochs
/// before `e` durable. For each block the recorder keeps its content before
/// its first write in every epoch not yet made durable; a power cut restores
/// the oldest of those.
pub struct ImageRecorder {
    disk: Arc<dyn ImageStore>,
    path: PathBuf,
    /// The file's length (never changed by the server).
    len: u64,
    /// Held shared by a write while it records and writes; exclusively to
    /// begin an epoch, and by a power cut.
    barrier: RwLock<()>,
    journal: Mutex<Journal>,
}

/// A block's earlier contents: (epoch, content before the block's first
/// write in that epoch), oldest first. `None` is a block of zeros.
type Earlier = Vec<(u64, Option<Box<[u8]>>)>;

#[derive(Default)]
struct Journal {
    epoch: u64,
    /// Per block, its earlier contents still at risk.
    before: HashMap<u64, Earlier>,
}

impl ImageRecorder {
    /// Keeps the earlier content of every block the range touches, unless
    /// this epoch already has it.
    fn record(&self, offset: u64, length: u64) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let mut journal = lock(&self.journal);
        let epoch = journal.epoch;
        let end = (offset + length).min(self.len);
        let mut block = offset / BLOCK;
        while block * BLOCK < end {
            let list = journal.before.entry(block).or_default();
            if list.last().map(|e| e.0) != Some(epoch) {
                let start = block * BLOCK;
                let mut buf = vec![0u8; (self.len - start).min(BLOCK) as usize];
                self.disk.read_at(&mut buf, start)?;
                let content = if buf.iter().all(|&b| b == 0) {
                    None
                } else {
                    Some(buf.into_boxed_slice())
                };
                list.push((epoch, content));
            }
            block += 1;
        }
        Ok(())
    }

    fn barrier_shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.barrier.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reverts what a power cut loses; returns (sectors reverted, sectors at
    /// risk). Keeps every lock held: the process is about to die.
    fn lose(&self, mode: PowerLoss, rng: &mut SplitMix64) -> (u64, u64) {
        let barrier = self.barrier.write().unwrap_or_else(|p| p.into_inner());
        let journal = lock(&self.journal);
        let mut blocks: Vec<_> = journal.before.iter().collect();
        // A fixed order, so a seed replays the same torn subset.
        blocks.sort_by_key(|(block, _)| **block);
        let (mut reverted, mut at_risk) = (0, 0);
        for (&block, list) in blocks {
            let Some((_, earlier)) = list.first() else {
                continue;
            };
            let start = block * BLOCK;
            let len = (self.len - start).min(BLOCK);
            let mut now = vec![0u8; len as usize];
            if self.disk.read_at(&mut now, start).is_err() {
                continue;
            }
            let zeros;
            let earlier: &[u8] = match earlier {
                Some(bytes) => bytes,
                None => {
                    zeros = vec![0u8; len as usize];
                    &zeros
                }
            };
            let mut sector = 0;
            while sector < len {
                let range = sector as usize..(sector + SECTOR).min(len) as usize;
                at_risk += 1;
                let revert = match mode {
                    PowerLoss::All => true,
                    PowerLoss::Nothing => false,
                    PowerLoss::Torn | PowerLoss::Seeded => rng.coin(),
                };
                if revert
                    && now[range.clone()] != earlier[range.clone()]
                    && self
                        .disk
                        .write_at(&earlier[range.clone()], start + sector)
                        .is_ok()
                {
                    reverted += 1;
                }
                sector += SECTOR;
            }
        }
        std::mem::forget(journal);
        std::mem::forget(barrier);
        (reverted, at_risk)
    }
}

impl ImageStore for ImageRecorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.disk.read_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let _shared = self.barrier_shared();
        self.record(offset, data.len() as u64)?;
        self.disk.write_at(data, offset)
    }

    fn punch_hole(&self, offset: u64, length: u64) -> io::Result<()> {
        let _shared = self.barrier_shared();
        self.record(offset, length)?;
        self.disk.punch_hole(offset, length)
    }

    fn sync_data(&self) -> io::Result<()> {
        let epoch = {
            // Waits for writes in flight, so each write has one epoch.
            let _exclusive = self.barrier.write().unwrap_or_else(|p| p.into_inner());
            let mut journal = lock(&self.journal);
            journal.epoch += 1;
            journal.epoch
        };
        self.disk.sync_data()?;
        // Everything written before this sync began is durable now.
        let mut journal = lock(&self.journal);
        journal.before.retain(|_, list| {
            list.retain(|(e, _)| *e >= epoch);
            !list.is_empty()
        });
        Ok(())
    }

    fn start_writeback(&self, offset: u64, length: u64) {
        // Writeback makes nothing durable: fdatasync still must run.
        self.disk.start_writeback(offset, length)
    }

    fn will_need(&self, offset: u64, length: u64) -> io::Result<()> {
        self.disk.will_need(offset, length)
    }

    // `read_cached` stays the default `false`: every read comes here, as
    // the disk of a plan that can cut power.

    fn sees_every(&self, op: crate::store::StoreOp) -> bool {
        use crate::store::StoreOp;
        matches!(op, StoreOp::Read | StoreOp::Write) || self.disk.sees_every(op)
    }

    fn fault(&self, op: crate::store::StoreOp, at: Option<(u64, u64)>) -> io::Result<()> {
        self.disk.fault(op, at)
    }

    fn data_extents(&self) -> Option<Vec<(u64, u64)>> {
        self.disk.data_extents()
    }

    fn identity(&self) -> io::Result<crate::store::Identity> {
        self.disk.identity()
    }

    fn seek_extent(&self, data: bool, pos: u64) -> io::Result<Option<u64>> {
        self.disk.seek_extent(data, pos)
    }
}

// ------------------------------------------------------------------ files

/// What a file's content is, now or after a power cut.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Content {
    Bytes(Vec<u8>),
    /// A recorded image (its index): its content is the recorder's business.
    Image(usize),
}

#[derive(Debug)]
struct Inode {
    now: Content,
    /// What survives a power cut: changed by an fsync of the file.
    durable: Content,
}

/// Follows the files the hand-off touches (marker, its temporary file, the
/// unlinked source image): what each path names now, and what it would name
/// after a power cut.
#[derive(Default)]
pub struct FileModel {
    state: Mutex<FileState>,
}

#[derive(Default)]
struct FileState {
    inodes: Vec<Inode>,
    /// The inode each known path names now (`None`: absent).
    now: HashMap<PathBuf, Option<usize>>,
    /// The inode each known path names after a power cut: changed by an
    /// fsync of its directory.
    durable: HashMap<PathBuf, Option<usize>>,
}

impl FileState {
    /// Starts following `path`, taking what is on disk as durable.
    fn know(&mut self, path: &Path) {
        if self.now.contains_key(path) {
            return;
        }
        let inode = match fs::read(path) {
            Ok(bytes) => {
                self.inodes.push(Inode {
                    now: Content::Bytes(bytes.clone()),
                    durable: Content::Bytes(bytes),
                });
                Some(self.inodes.len() - 1)
            }
            Err(_) => None,
        };
        self.now.insert(path.to_owned(), inode);
        self.durable.insert(path.to_owned(), inode);
    }
}

impl FileModel {
    fn add_image(&self, path: &Path, index: usize) {
        let mut state = lock(&self.state);
        state.inodes.push(Inode {
            now: Content::Image(index),
            durable: Content::Image(index),
        });
        let inode = Some(state.inodes.len() - 1);
        state.now.insert(path.to_owned(), inode);
        state.durable.insert(path.to_owned(), inode);
    }

    /// Puts every known path back the way a power cut leaves it; returns a
    /// line per change. Keeps the lock: the process is about to die.
    fn lose(
        &self,
        mode: PowerLoss,
        rng: &mut SplitMix64,
        images: &[Arc<ImageRecorder>],
    ) -> Vec<String> {
        let state = lock(&self.state);
        let mut paths: Vec<&PathBuf> = state.now.keys().collect();
        paths.sort();
        // A directory's entries change together (a rename is atomic in the
        // journal): one draw per directory in a torn cut.
        let mut dir_reverts: HashMap<&Path, bool> = HashMap::new();
        let mut report = Vec::new();
        for path in paths {
            let revert_entry = match mode {
                PowerLoss::All => true,
                PowerLoss::Nothing => false,
                _ => *dir_reverts
                    .entry(files::parent_dir(path))
                    .or_insert_with(|| rng.coin()),
            };
            let entry = if revert_entry {
                state.durable[path]
            } else {
                state.now[path]
            };
            let outcome = match entry {
                None => match fs::remove_file(path) {
                    Ok(()) => Some("removed (its creation was not durable)".to_string()),
                    Err(_) => None,
                },
                Some(inode) => {
                    let inode = &state.inodes[inode];
                    let content = match mode {
                        PowerLoss::All => &inode.durable,
                        PowerLoss::Nothing => &inode.now,
                        _ if rng.coin() => &inode.durable,
                        _ => &inode.now,
                    };
                    restore(path, content, images)
                }
            };
            if let Some(what) = outcome {
                report.push(format!("{}: {what}", path.display()));
            }
        }
        std::mem::forget(state);
        report
    }
}

/// Makes `path` hold `content`; says what changed, if anything.
fn restore(path: &Path, content: &Content, images: &[Arc<ImageRecorder>]) -> Option<String> {
    match content {
        Content::Bytes(bytes) => {
            if fs::read(path).ok().as_deref() == Some(bytes.as_slice()) {
                return None;
            }
            fs::write(path, bytes).ok()?;
            Some(format!("reverted to {} durable bytes", bytes.len()))
        }
        Content::Image(index) => {
            if path.exists() {
                return None;
            }
            // The unlink was not durable: the file comes back, with the
            // image's content as the power cut left it.
            copy_image(&images[*index], path).ok()?;
            Some("unlink undone (its directory was not fsynced)".to_string())
        }
    }
}

fn copy_image(image: &ImageRecorder, path: &Path) -> io::Result<()> {
    let out = OpenOptions::new().write(true).create_new(true).open(path)?;
    out.set_len(image.len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < image.len {
        let n = (image.len - pos).min(buf.len() as u64) as usize;
        image.disk.read_at(&mut buf[..n], pos)?;
        // Zeros stay holes, as in the image.
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_all_at(&buf[..n], pos)?;
        }
        pos += n as u64;
    }
    Ok(())
}

/// The file operations with the model following along. Each runs under the
/// model's lock, so a power cut never sees half of one.
struct RecordingFiles(Arc<FileModel>);

impl FileOps for RecordingFiles {
    fn write_file(&self, path: &Path, data: &[u8], sync: bool) -> io::Result<()> {
        let mut state = lock(&self.0.state);
        state.know(path);
        Disk.write_file(path, data, sync)?;
        let durable_if_synced = |old: Content| {
            if sync {
                Content::Bytes(data.to_vec())
            } else {
                old
            }
        };
        match state.now[path] {
            // Truncating an existing file: its durable content stays until
            // the fsync.
            Some(inode) => {
                let node = &mut state.inodes[inode];
                node.now = Content::Bytes(data.to_vec());
                node.durable = durable_if_synced(node.durable.clone());
            }
            None => {
                state.inodes.push(Inode {
                    now: Content::Bytes(data.to_vec()),
                    durable: durable_if_synced(Content::Bytes(Vec::new())),
                });
                let inode = Some(state.inodes.len() - 1);
                state.now.insert(path.to_owned(), inode);
            }
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = lock(&self.0.state);
        state.know(from);
        state.know(to);
        Disk.rename(from, to)?;
        let inode = state.now[from];
        state.now.insert(to.to_owned(), inode);
        state.now.insert(from.to_owned(), None);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = lock(&self.0.state);
        state.know(path);
        Disk.remove(path)?;
        state.now.insert(path.to_owned(), None);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = lock(&self.0.state);
        Disk.sync_dir(dir)?;
        let in_dir: Vec<PathBuf> = state
            .now
            .keys()
            .filter(|p| files::parent_dir(p) == dir)
            .cloned()
            .collect();
        for path in in_dir {
            let inode = state.now[&path];
            state.durable.insert(path, inode);
        }
        Ok(())
    }
}

impl fmt::Debug for Power {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Power").field("seed", &self.seed).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory, removed when dropped (also when a test fails).
    fn temp_dir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("flexnbd-power-{tag}-"))
            .tempdir()
            .unwrap()
    }

    fn recorder(path: &Path, len: u64) -> ImageRecorder {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.set_len(len).unwrap();
        ImageRecorder {
            disk: Arc::new(crate::store::FileStore::new(file)),
            path: path.to_owned(),
            len,
            barrier: RwLock::new(()),
            journal: Mutex::new(Journal::default()),
        }
    }

    fn read(r: &ImageRecorder, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        r.read_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn an_image_stacked_on_the_recorder_names_its_file_and_is_recorded() {
        let dir = temp_dir("stacked");
        let path = dir.path().join("img");
        fs::File::create(&path).unwrap().set_len(16384).unwrap();
        let power = Arc::new(Power::new(1));
        let stack = crate::store::Stack {
            layers: vec![power.clone()],
            ..Default::default()
        };
        let image = crate::store::Image::open_stacked(&path, stack).unwrap();
        let now = crate::store::Identity::at(&path).unwrap();
        assert!(image.identity().unwrap().same_file(&now));
        // Writes go through the recorder: the earlier content of the block
        // is kept until a sync, and a read is never answered from memory.
        image.write_at(&[1u8; 4096], 4096).unwrap();
        let images = lock(&power.images);
        assert_eq!(images.len(), 1);
        assert!(lock(&images[0].journal).before.contains_key(&1));
        drop(images);
        assert!(!image.read_cached(&mut [0u8; 512], 4096));
        // Before the map is built, holes are asked of the file through the
        // recorder.
        assert!(!image.map().is_built());
        assert_eq!(
            image.extents(0, 16384, usize::MAX),
            vec![(4096, true), (4096, false), (8192, true)]
        );
        image.sync().unwrap();
        assert!(lock(&lock(&power.images)[0].journal).before.is_empty());
    }

    #[test]
    fn a_cut_reverts_exactly_what_was_written_since_the_last_sync() {
        let dir = temp_dir("image");
        for (mode, expect_reverted) in [(PowerLoss::All, true), (PowerLoss::Nothing, false)] {
            let r = recorder(&dir.path().join(format!("{mode:?}")), 64 * 1024);
            r.write_at(&[1u8; 4096], 0).unwrap();
            r.write_at(&[2u8; 1000], 8192 + 100).unwrap();
            r.sync_data().unwrap();
            // After the sync: a new write over synced data, one over a hole.
            r.write_at(&[3u8; 4096], 0).unwrap();
            r.write_at(&[4u8; 512], 16384).unwrap();
            let (reverted, at_risk) = r.lose(mode, &mut SplitMix64::new(7));
            assert_eq!(at_risk, 16, "two 4 KiB blocks of 8 sectors");
            if expect_reverted {
                assert_eq!(reverted, 9, "8 sectors of block 0, one of block 4");
                assert_eq!(read(&r, 0, 4096), vec![1u8; 4096]);
                assert_eq!(read(&r, 16384, 512), vec![0u8; 512]);
            } else {
                assert_eq!(reverted, 0);
                assert_eq!(read(&r, 0, 4096), vec![3u8; 4096]);
                assert_eq!(read(&r, 16384, 512), vec![4u8; 512]);
            }
            // Synced data is never touched.
            assert_eq!(read(&r, 8192 + 100, 1000), vec![2u8; 1000]);
        }
    }

    #[test]
    fn a_torn_cut_reverts_whole_sectors_and_replays_from_its_seed() {
        let dir = temp_dir("torn");
        let run = |name: &str| {
            let r = recorder(&dir.path().join(name), 64 * 1024);
            r.write_at(&[9u8; 32 * 1024], 0).unwrap();
            let (reverted, at_risk) = r.lose(PowerLoss::Torn, &mut SplitMix64::new(42));
            assert_eq!(at_risk, 64);
            assert!(reverted > 0 && reverted < 64, "a subset: {reverted}");
            let data = read(&r, 0, 32 * 1024);
            for sector in data.chunks(512) {
                assert!(
                    sector.iter().all(|&b| b == 9) || sector.iter().all(|&b| b == 0),
                    "a sector is either old or new, never mixed"
                );
            }
            data
        };
        assert_eq!(run("a"), run("b"), "the same seed tears the same sectors");
    }

    #[test]
    fn every_earlier_content_is_kept_until_its_sync_completes() {
        let dir = temp_dir("epochs");
        let r = recorder(&dir.path().join("img"), 8192);
        r.write_at(&[1u8; 4096], 0).unwrap();
        r.sync_data().unwrap();
        r.write_at(&[2u8; 4096], 0).unwrap();
        // A sync began (epoch 2) but has not completed: its writes and the
        // ones after it are all at risk, back to the content of the last
        // completed sync.
        lock(&r.journal).epoch += 1;
        r.write_at(&[3u8; 4096], 0).unwrap();
        assert_eq!(lock(&r.journal).before[&0].len(), 2);
        r.lose(PowerLoss::All, &mut SplitMix64::new(1));
        assert_eq!(read(&r, 0, 4096), vec![1u8; 4096]);
    }

    /// The marker's durable write, with each of its steps optional.
    fn marker_after_cut(sync_file: bool, sync_dir: bool) -> Option<Vec<u8>> {
        let dir = temp_dir("marker");
        let marker = dir.path().join("d.img.INCOMPLETE");
        let tmp = dir.path().join("d.img.INCOMPLETE.tmp");
        let files = RecordingFiles(Arc::new(FileModel::default()));
        files
            .write_file(&marker, b"state=receiving\n", true)
            .unwrap();
        files.sync_dir(dir.path()).unwrap();
        files
            .write_file(&tmp, b"state=entrusted\n", sync_file)
            .unwrap();
        files.rename(&tmp, &marker).unwrap();
        if sync_dir {
            files.sync_dir(dir.path()).unwrap();
        }
        files.0.lose(PowerLoss::All, &mut SplitMix64::new(3), &[]);
        let after = fs::read(&marker).ok();
        assert!(
            !tmp.exists(),
            "the temporary file never survives its rename"
        );
        after
    }

    #[test]
    fn a_marker_survives_a_cut_only_when_file_and_directory_were_synced() {
        assert_eq!(
            marker_after_cut(true, true).as_deref(),
            Some(&b"state=entrusted\n"[..])
        );
        // Without the file's fsync the renamed marker is empty.
        assert_eq!(marker_after_cut(false, true).as_deref(), Some(&b""[..]));
        // Without the directory's fsync the rename is undone.
        assert_eq!(
            marker_after_cut(true, false).as_deref(),
            Some(&b"state=receiving\n"[..])
        );
    }

    #[test]
    fn an_unlink_without_a_directory_sync_is_undone_with_the_image_content() {
        let dir = temp_dir("unlink");
        let path = dir.path().join("src.img");
        for synced in [true, false] {
            let model = Arc::new(FileModel::default());
            let files = RecordingFiles(model.clone());
            let r = Arc::new(recorder(&path, 16384));
            r.write_at(&[5u8; 4096], 4096).unwrap();
            r.sync_data().unwrap();
            model.add_image(&path, 0);
            files.remove(&path).unwrap();
            if synced {
                files.sync_dir(dir.path()).unwrap();
            }
            let report = model.lose(
                PowerLoss::All,
                &mut SplitMix64::new(1),
                std::slice::from_ref(&r),
            );
            assert_eq!(path.exists(), !synced, "{report:?}");
            if !synced {
                let back = fs::read(&path).unwrap();
                assert_eq!(back.len(), 16384);
                assert_eq!(&back[4096..8192], &[5u8; 4096][..]);
                fs::remove_file(&path).unwrap();
            }
        }
    }
}
