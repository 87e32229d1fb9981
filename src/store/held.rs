//! What a migration's destination holds (docs/handoff.md, "Resuming"): the
//! blocks sent in the current attempt, and the blocks the destination
//! durably holds as of the last checkpoint it answered. Both are cleared
//! by every client change, after its data landed, whether a migration is
//! running or not: a held block is one whose content has not changed since
//! it was read for sending.
//!
//! The order of the two sides is what makes this safe. The mirror marks a
//! block sent *before* it reads it, and a client clears it *after* its
//! data landed: either the clear comes after the mark (the block is not
//! sent any more), or the data landed before the mark and so before the
//! read (what was sent is the new data). A client clears `sent` before
//! `held`, and a checkpoint's [`Held::commit`] adds `sent` to `held` and
//! then takes back what a client cleared meanwhile, so no change is lost
//! between the two maps.

use std::sync::atomic::{AtomicU64, Ordering};

use super::map::{AllocationMap, BLOCK_SIZE};

/// The maps have at most this many bits: a block of them covers 4 KiB, or
/// more on an image larger than 64 GiB (64 KiB on 1 TiB), so keeping them
/// (a 1 TiB hole marked sent, a checkpoint's commit) costs milliseconds
/// whatever the image's size. A coarser block only means more is sent again.
const MAX_BLOCKS: u64 = 1 << 24;

/// The block of the maps for an image of `size` bytes.
fn unit_for(size: u64) -> u64 {
    let mut unit = BLOCK_SIZE;
    while size.div_ceil(unit) > MAX_BLOCKS {
        unit *= 2;
    }
    unit
}

pub struct Held {
    size: u64,
    /// Bytes per bit of both maps.
    unit: u64,
    sent: AllocationMap,
    /// What was sent when the outstanding checkpoint was asked.
    asked: AllocationMap,
    held: AllocationMap,
    /// The migration these maps are about (0 until the first `mirror`),
    /// kept for the process's life: a `mirror` after a `break` continues it.
    migration: AtomicU64,
    /// The last checkpoint the destination answered for it while the held
    /// blocks were counted (0: nothing held).
    checkpoint: AtomicU64,
}

/// ORs word `i` of `from` into `to`. A client that clears `from` after
/// the first look clears `to` after this or has cleared it before the OR:
/// what it cleared from `from` is taken back, in case it was before.
fn copy_word(from: &AllocationMap, to: &AllocationMap, i: usize) {
    let bits = from.peek_word(i);
    if bits == 0 {
        return;
    }
    to.or_word(i, bits);
    let again = from.peek_word(i);
    if bits & !again != 0 {
        to.clear_word(i, bits & !again);
    }
}

impl Held {
    pub fn new(size: u64) -> Held {
        let unit = unit_for(size);
        // An AllocationMap counts 4 KiB blocks: one of `unit` per bit.
        let bits = size.div_ceil(unit) * BLOCK_SIZE;
        Held {
            size,
            unit,
            sent: AllocationMap::new(bits),
            asked: AllocationMap::new(bits),
            held: AllocationMap::new(bits),
            migration: AtomicU64::new(0),
            checkpoint: AtomicU64::new(0),
        }
    }

    /// The migration id, drawn by `fresh` the first time (never 0).
    pub fn migration(&self, fresh: impl FnOnce() -> u64) -> u64 {
        let id = fresh().max(1);
        match self
            .migration
            .compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => id,
            Err(existing) => existing,
        }
    }

    /// The last checkpoint answered whose blocks are held (0: none).
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint.load(Ordering::Acquire)
    }

    /// Blocks wholly inside the byte range (the export's last, partial block
    /// counts when the range reaches the end).
    fn whole_blocks(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset.saturating_add(len);
        let first = offset.div_ceil(self.unit);
        let last = if end >= self.size {
            self.size.div_ceil(self.unit)
        } else {
            end / self.unit
        };
        (first, last.max(first))
    }

    /// A new attempt: what it has sent starts as what the destination holds
    /// (`resume`), or as nothing, and then nothing is held either.
    pub fn begin(&self, resume: bool) {
        if !resume {
            self.checkpoint.store(0, Ordering::Release);
        }
        for i in 0..self.sent.word_count() {
            self.sent.take_word(i);
            self.asked.take_word(i);
            if resume {
                let held = self.held.peek_word(i);
                if held != 0 {
                    self.sent.or_word(i, held);
                }
            } else {
                self.held.take_word(i);
            }
        }
        // A client change between the copy and now cleared `held` after
        // `sent`, or `sent` after the copy: either way it is in neither.
        if resume {
            for i in 0..self.sent.word_count() {
                let held = self.held.peek_word(i);
                let sent = self.sent.peek_word(i);
                if sent & !held != 0 {
                    self.sent.clear_word(i, sent & !held);
                }
            }
        }
    }

    /// Called before the range is read for sending.
    pub fn mark_sent(&self, offset: u64, len: u64) {
        let (first, end) = self.whole_blocks(offset, len);
        self.sent.set_blocks(first, end);
    }

    /// A client changed the range (its data has landed).
    pub fn changed(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.unit;
        let end = offset.saturating_add(len).div_ceil(self.unit);
        self.sent.clear_blocks(first, end);
        self.asked.clear_blocks(first, end);
        self.held.clear_blocks(first, end);
    }

    /// A checkpoint is being asked: what has been sent so far is what it
    /// will cover once answered. Called before the request goes out, after
    /// every write it is to cover has gone.
    pub fn ask(&self) {
        for i in 0..self.sent.word_count() {
            self.asked.take_word(i);
            copy_word(&self.sent, &self.asked, i);
        }
    }

    /// The checkpoint asked last was answered, after every request before
    /// it: what was sent when it was asked is held.
    pub fn commit(&self, checkpoint: u64) {
        for i in 0..self.asked.word_count() {
            copy_word(&self.asked, &self.held, i);
        }
        self.checkpoint.store(checkpoint, Ordering::Release);
    }

    /// Bytes held.
    pub fn held_bytes(&self) -> u64 {
        let mut blocks = 0u64;
        for i in 0..self.held.word_count() {
            blocks += u64::from(self.held.peek_word(i).count_ones());
        }
        (blocks * self.unit).min(self.size)
    }

    /// Splits `len` bytes from `offset` into runs that are held (`true`) or
    /// not, as (length, held) from the start.
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos / self.unit;
            // A bit covers its whole block, so a run may start or end
            // inside one (a range not on block boundaries).
            let held = self.held.is_set(block);
            let limit = end.div_ceil(self.unit);
            let next = if held {
                self.held.next_change(block, limit, true)
            } else {
                self.held.next_change(block, limit, false)
            }
            .max(block + 1);
            let run_end = (next * self.unit).min(end);
            let n = run_end - pos;
            match out.last_mut() {
                Some(last) if last.1 == held => last.0 += n,
                _ => out.push((n, held)),
            }
            pos = run_end;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = BLOCK_SIZE;

    #[test]
    fn what_was_sent_is_held_after_a_checkpoint_unless_a_client_changed_it() {
        let h = Held::new(16 * B);
        h.begin(false);
        h.mark_sent(0, 8 * B);
        // Changed after it was marked (read) for sending: not held.
        h.changed(2 * B + 100, 1);
        h.ask();
        h.commit(1);
        assert_eq!(h.checkpoint(), 1);
        assert_eq!(
            h.runs(0, 16 * B),
            [(2 * B, true), (B, false), (5 * B, true), (8 * B, false)]
        );
        assert_eq!(h.held_bytes(), 7 * B);
        // A change after the checkpoint takes its blocks back.
        h.changed(5 * B, 2 * B);
        assert_eq!(h.held_bytes(), 5 * B);
    }

    #[test]
    fn a_checkpoint_holds_only_what_was_sent_before_it_was_asked() {
        let h = Held::new(16 * B);
        h.begin(false);
        h.mark_sent(0, 4 * B);
        h.ask();
        // Sent while the destination syncs: the checkpoint does not cover
        // it, whatever its answer.
        h.mark_sent(4 * B, 4 * B);
        // A client changes an asked block before the answer: not held.
        h.changed(B, 1);
        h.commit(1);
        assert_eq!(
            h.runs(0, 16 * B),
            [(B, true), (B, false), (2 * B, true), (12 * B, false)]
        );
        // The next checkpoint covers what went after the first.
        h.ask();
        h.commit(2);
        assert_eq!(
            h.runs(0, 16 * B),
            [(B, true), (B, false), (6 * B, true), (8 * B, false)]
        );
    }

    #[test]
    fn only_whole_blocks_are_marked_sent_and_the_last_partial_one_at_the_end() {
        let size = 4 * B + 512;
        let h = Held::new(size);
        h.begin(false);
        // Half of block 0 and all of block 1: only block 1.
        h.mark_sent(B / 2, B + B / 2);
        // The export's last, partial block, reached to the end.
        h.mark_sent(4 * B, 512);
        h.ask();
        h.commit(1);
        assert_eq!(
            h.runs(0, size),
            [(B, false), (B, true), (2 * B, false), (512, true)]
        );
    }

    #[test]
    fn a_resumed_attempt_starts_from_what_is_held_and_a_fresh_one_from_nothing() {
        let h = Held::new(8 * B);
        h.begin(false);
        h.mark_sent(0, 4 * B);
        h.ask();
        h.commit(3);
        // Sent in the failed attempt after the checkpoint: not held.
        h.mark_sent(4 * B, 4 * B);
        h.begin(true);
        assert_eq!(h.checkpoint(), 3);
        // A checkpoint right away holds what was held, not what the failed
        // attempt sent after it.
        h.ask();
        h.commit(4);
        assert_eq!(h.runs(0, 8 * B), [(4 * B, true), (4 * B, false)]);
        h.begin(false);
        assert_eq!(h.checkpoint(), 0);
        assert_eq!(h.held_bytes(), 0);
        h.ask();
        h.commit(5);
        assert_eq!(h.held_bytes(), 0);
    }

    #[test]
    fn runs_cover_a_range_that_starts_and_ends_inside_blocks() {
        let h = Held::new(8 * B);
        h.begin(false);
        h.mark_sent(2 * B, 2 * B);
        h.ask();
        h.commit(1);
        assert_eq!(
            h.runs(B + 7, 4 * B),
            [(B - 7, false), (2 * B, true), (B + 7, false)]
        );
        assert_eq!(h.runs(2 * B + 100, 100), [(100, true)]);
        assert!(h.runs(8 * B, 10).is_empty());
    }

    #[test]
    fn a_huge_image_keeps_coarser_blocks_and_only_whole_ones_count() {
        assert_eq!(unit_for(64 << 30), BLOCK_SIZE);
        let h = Held::new(1 << 40);
        assert_eq!(h.unit, 64 * 1024);
        h.begin(false);
        // Not a whole 64 KiB block: nothing is sent.
        h.mark_sent(0, 60 * 1024);
        h.ask();
        h.commit(1);
        assert_eq!(h.held_bytes(), 0);
        h.mark_sent(0, 1 << 30);
        h.ask();
        h.commit(2);
        assert_eq!(h.held_bytes(), 1 << 30);
        // A 4 KiB change takes back its whole block.
        h.changed(4096, 1);
        assert_eq!(
            h.runs(0, 256 * 1024),
            [(64 * 1024, false), (192 * 1024, true)]
        );
    }

    #[test]
    fn the_migration_id_is_drawn_once() {
        let h = Held::new(B);
        assert_eq!(h.migration(|| 0), 1, "never 0");
        assert_eq!(h.migration(|| 42), 1);
    }
}
