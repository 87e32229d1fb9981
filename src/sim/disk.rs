//! A simulated disk for one image: what the host's page cache holds now,
//! and what a power cut would leave. A crash (the process dies, the host
//! lives) keeps everything written; a power cut keeps only what a sync made
//! durable, plus, for a torn cut, an arbitrary subset of the sectors written
//! since.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Mutex, MutexGuard};

use faults::{PowerLoss, SplitMix64};

use crate::store::ImageStore;

/// The unit a power cut may tear.
pub const SECTOR: u64 = 512;

struct State {
    /// What reads return now (the page cache over the platter).
    now: Vec<u8>,
    /// What survives a power cut.
    durable: Vec<u8>,
    /// Sectors written since the last sync began.
    unsynced: BTreeSet<u64>,
}

/// An in-memory disk with a power-loss model.
pub struct SimDisk {
    state: Mutex<State>,
    /// Its inode number in its host's simulated file system.
    ino: u64,
}

impl SimDisk {
    /// A disk holding `content`, all of it durable.
    pub fn new(content: Vec<u8>, ino: u64) -> SimDisk {
        SimDisk {
            ino,
            state: Mutex::new(State {
                durable: content.clone(),
                now: content,
                unsynced: BTreeSet::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What reads return now.
    pub fn content(&self) -> Vec<u8> {
        self.lock().now.clone()
    }

    /// Loses what a power cut may lose; returns how many sectors reverted.
    pub fn power_cut(&self, loss: PowerLoss, rng: &mut SplitMix64) -> usize {
        let mut s = self.lock();
        let unsynced: Vec<u64> = std::mem::take(&mut s.unsynced).into_iter().collect();
        let mut reverted = 0;
        for sector in unsynced {
            let revert = match loss {
                PowerLoss::All => true,
                PowerLoss::Nothing => false,
                PowerLoss::Torn | PowerLoss::Seeded => rng.coin(),
            };
            let range = (sector * SECTOR) as usize..((sector + 1) * SECTOR) as usize;
            if revert {
                let old = s.durable[range.clone()].to_vec();
                s.now[range].copy_from_slice(&old);
                reverted += 1;
            } else {
                let new = s.now[range.clone()].to_vec();
                s.durable[range].copy_from_slice(&new);
            }
        }
        reverted
    }

    fn check(len: usize, offset: u64, size: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::Error::other("offset overflow"))?;
        match start.checked_add(len) {
            Some(end) if end <= size => Ok(start..end),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{len} bytes at {offset} past the disk's {size}"),
            )),
        }
    }
}

impl ImageStore for SimDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.lock();
        let r = Self::check(buf.len(), offset, s.now.len())?;
        buf.copy_from_slice(&s.now[r]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.lock();
        let r = Self::check(data.len(), offset, s.now.len())?;
        let (first, end) = (r.start as u64 / SECTOR, (r.end as u64).div_ceil(SECTOR));
        s.now[r].copy_from_slice(data);
        s.unsynced.extend(first..end);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, length: u64) -> io::Result<()> {
        self.write_at(&vec![0u8; length as usize], offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.lock();
        let unsynced = std::mem::take(&mut s.unsynced);
        for sector in unsynced {
            let range = (sector * SECTOR) as usize..((sector + 1) * SECTOR) as usize;
            let new = s.now[range.clone()].to_vec();
            s.durable[range].copy_from_slice(&new);
        }
        Ok(())
    }

    fn start_writeback(&self, _offset: u64, _length: u64) {}

    fn will_need(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }

    fn identity(&self) -> io::Result<crate::store::Identity> {
        Ok(identity(self.ino, self.lock().now.len() as u64))
    }
}

/// The identity of a simulated image: its inode number and size.
pub fn identity(ino: u64, size: u64) -> crate::store::Identity {
    crate::store::Identity {
        dev: 0x51,
        ino,
        size,
        born: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_power_cut_keeps_what_was_synced_and_loses_the_rest() {
        let disk = SimDisk::new(vec![0u8; 4096], 1);
        disk.write_at(&[1u8; 512], 0).unwrap();
        disk.sync_data().unwrap();
        disk.write_at(&[2u8; 1024], 0).unwrap();
        let mut rng = SplitMix64::new(1);
        assert_eq!(disk.power_cut(PowerLoss::All, &mut rng), 2);
        let c = disk.content();
        assert!(c[..512].iter().all(|&b| b == 1), "the synced sector stays");
        assert!(
            c[512..1024].iter().all(|&b| b == 0),
            "the unsynced one reverts"
        );
    }

    #[test]
    fn a_crash_loses_nothing_and_nothing_loss_keeps_everything() {
        let disk = SimDisk::new(vec![0u8; 1024], 1);
        disk.write_at(&[3u8; 1024], 0).unwrap();
        let mut rng = SplitMix64::new(1);
        assert_eq!(disk.power_cut(PowerLoss::Nothing, &mut rng), 0);
        assert!(disk.content().iter().all(|&b| b == 3));
        // Now durable: a later cut loses nothing either.
        assert_eq!(disk.power_cut(PowerLoss::All, &mut rng), 0);
        assert!(disk.content().iter().all(|&b| b == 3));
    }
}
