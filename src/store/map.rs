//! The allocation map: one bit per 4 KiB block, set when the block may hold
//! data, clear when it is known to read as zeros (a hole).
//!
//! The words are allocated zeroed by the allocator, which on Linux maps fresh
//! zero pages lazily: an untouched region of a 1 TiB sparse image costs no
//! resident memory. Bits are atomics so readers never lock.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bytes per bit.
pub const BLOCK_SIZE: u64 = 4096;

pub struct AllocationMap {
    words: *mut AtomicU64,
    word_count: usize,
    /// Number of 4 KiB blocks (the last may be partial).
    blocks: u64,
    /// Set once the background scan has finished; until then a clear bit
    /// means nothing (the image asks the file instead).
    built: AtomicBool,
}

// SAFETY: the map owns its allocation (nothing else holds the pointer), so
// it may move to another thread with it.
unsafe impl Send for AllocationMap {}
// SAFETY: shared access only ever reads or writes the words through atomics
// (`word` hands out `&AtomicU64`), so threads sharing a map cannot race.
unsafe impl Sync for AllocationMap {}

impl Drop for AllocationMap {
    fn drop(&mut self) {
        if self.word_count > 0 {
            // SAFETY: `words` came from `alloc_zeroed` in `new` with exactly
            // this layout (word_count > 0), and is freed only here, once.
            unsafe { dealloc(self.words as *mut u8, Self::layout(self.word_count)) }
        }
    }
}

impl AllocationMap {
    fn layout(word_count: usize) -> Layout {
        Layout::array::<AtomicU64>(word_count).expect("allocation map layout")
    }

    /// A map for an export of `size` bytes, with every bit clear and not built.
    pub fn new(size: u64) -> AllocationMap {
        let blocks = size.div_ceil(BLOCK_SIZE);
        let word_count = blocks.div_ceil(64) as usize;
        let words = if word_count == 0 {
            std::ptr::NonNull::<AtomicU64>::dangling().as_ptr()
        } else {
            // SAFETY: the layout's size is non-zero (word_count > 0), as
            // alloc_zeroed requires; an all-zero AtomicU64 is a valid value,
            // so the words are initialised. A null result is handled below.
            let p = unsafe { alloc_zeroed(Self::layout(word_count)) } as *mut AtomicU64;
            if p.is_null() {
                std::alloc::handle_alloc_error(Self::layout(word_count));
            }
            p
        };
        AllocationMap {
            words,
            word_count,
            blocks,
            built: AtomicBool::new(false),
        }
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        assert!(
            index < self.word_count,
            "allocation map word {index} of {}",
            self.word_count
        );
        // SAFETY: index < word_count (asserted above), so the pointer stays
        // inside the allocation, whose words are initialised and which lives
        // as long as `self`.
        unsafe { &*self.words.add(index) }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn is_built(&self) -> bool {
        self.built.load(Ordering::Acquire)
    }

    pub fn mark_built(&self) {
        self.built.store(true, Ordering::Release);
    }

    pub fn is_set(&self, block: u64) -> bool {
        if block >= self.blocks {
            return false;
        }
        self.word((block / 64) as usize).load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }

    /// Sets the bits of blocks `first..end` (block numbers).
    pub fn set_blocks(&self, first: u64, end: u64) {
        self.update_blocks(first, end, true);
    }

    /// Clears the bits of blocks `first..end` (block numbers).
    pub fn clear_blocks(&self, first: u64, end: u64) {
        self.update_blocks(first, end, false);
    }

    /// Sets the bits of blocks `first..end` and returns how many were clear.
    pub fn set_blocks_counting(&self, first: u64, end: u64) -> u64 {
        self.update_blocks(first, end, true)
    }

    /// Clears the bits of blocks `first..end` and returns how many were set.
    pub fn clear_blocks_counting(&self, first: u64, end: u64) -> u64 {
        self.update_blocks(first, end, false)
    }

    /// Sets or clears the bits of blocks `first..end`; returns how many
    /// bits changed.
    fn update_blocks(&self, mut first: u64, end: u64, set: bool) -> u64 {
        let end = end.min(self.blocks);
        let mut changed = 0;
        while first < end {
            let index = (first / 64) as usize;
            let bit = first % 64;
            let span = (64 - bit).min(end - first);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            let word = self.word(index);
            // Skip the atomic write when nothing changes: it keeps untouched
            // pages of a sparse map unmapped and avoids cache-line traffic.
            let current = word.load(Ordering::Relaxed);
            if set && current & mask != mask {
                let before = word.fetch_or(mask, Ordering::AcqRel);
                changed += u64::from((!before & mask).count_ones());
            } else if !set && current & mask != 0 {
                let before = word.fetch_and(!mask, Ordering::AcqRel);
                changed += u64::from((before & mask).count_ones());
            }
            first += span;
        }
        changed
    }

    pub fn word_count(&self) -> usize {
        self.word_count
    }

    /// One word of bits, left as it is.
    pub fn peek_word(&self, index: usize) -> u64 {
        self.word(index).load(Ordering::Acquire)
    }

    /// Sets `bits` in one word; returns the word before.
    pub fn or_word(&self, index: usize, bits: u64) -> u64 {
        self.word(index).fetch_or(bits, Ordering::AcqRel)
    }

    /// Clears `bits` in one word.
    pub fn clear_word(&self, index: usize, bits: u64) {
        self.word(index).fetch_and(!bits, Ordering::AcqRel);
    }

    /// Atomically takes (reads and clears) one word of bits.
    pub fn take_word(&self, index: usize) -> u64 {
        let word = self.word(index);
        if word.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        word.swap(0, Ordering::AcqRel)
    }

    /// Marks every block touched by the byte range as allocated.
    pub fn set_bytes(&self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        self.set_blocks(offset / BLOCK_SIZE, (offset + length).div_ceil(BLOCK_SIZE));
    }

    /// Marks the blocks wholly inside the byte range as holes. A block that is
    /// the export's last (partial) block counts as wholly inside when the range
    /// reaches the export's end.
    pub fn clear_bytes(&self, offset: u64, length: u64, export_size: u64) {
        let end = offset.saturating_add(length);
        let first = offset.div_ceil(BLOCK_SIZE);
        let last = if end >= export_size {
            self.blocks
        } else {
            end / BLOCK_SIZE
        };
        if first < last {
            self.clear_blocks(first, last);
        }
    }

    /// The first block at or after `from` (and before `limit`) whose bit
    /// differs from `state`; `limit` when there is none.
    pub fn next_change(&self, from: u64, limit: u64, state: bool) -> u64 {
        let limit = limit.min(self.blocks);
        let mut block = from;
        while block < limit {
            let index = (block / 64) as usize;
            let bit = block % 64;
            let mut w = self.word(index).load(Ordering::Acquire);
            if state {
                w = !w;
            }
            w &= u64::MAX << bit;
            if w != 0 {
                return (index as u64 * 64 + u64::from(w.trailing_zeros())).min(limit);
            }
            block = (index as u64 + 1) * 64;
        }
        limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_clear_ranges_across_words() {
        let m = AllocationMap::new(300 * BLOCK_SIZE);
        m.set_blocks(10, 200);
        assert!(!m.is_set(9));
        assert!(m.is_set(10) && m.is_set(63) && m.is_set(64) && m.is_set(199));
        assert!(!m.is_set(200));
        m.clear_blocks(60, 130);
        assert!(m.is_set(59) && !m.is_set(60) && !m.is_set(129) && m.is_set(130));
    }

    #[test]
    fn next_change_finds_run_ends() {
        let m = AllocationMap::new(1000 * BLOCK_SIZE);
        m.set_blocks(100, 700);
        assert_eq!(m.next_change(0, 1000, false), 100);
        assert_eq!(m.next_change(100, 1000, true), 700);
        assert_eq!(m.next_change(700, 1000, false), 1000);
        assert_eq!(m.next_change(0, 50, false), 50);
    }

    #[test]
    fn clear_bytes_only_clears_whole_blocks() {
        let size = 10 * BLOCK_SIZE;
        let m = AllocationMap::new(size);
        m.set_blocks(0, 10);
        m.clear_bytes(100, 2 * BLOCK_SIZE, size);
        assert!(m.is_set(0), "partial first block stays allocated");
        assert!(!m.is_set(1));
        assert!(m.is_set(2), "partial last block stays allocated");
        m.clear_bytes(9 * BLOCK_SIZE, BLOCK_SIZE, size);
        assert!(!m.is_set(9));
    }

    #[test]
    fn huge_sparse_map_is_cheap_and_empty() {
        let m = AllocationMap::new(1 << 40);
        assert_eq!(m.next_change(0, m.blocks(), false), m.blocks());
    }

    #[test]
    fn zero_sized_map() {
        let m = AllocationMap::new(0);
        assert_eq!(m.blocks(), 0);
        assert!(!m.is_set(0));
        assert_eq!(m.next_change(0, 10, false), 0);
    }
}
