//! The proxy's read-ahead cache (`--cache`, the C flexnbd-proxy's), as pure
//! decisions.
//!
//! For each request from downstream, [`Cache::decide`] says what happens
//! without touching a socket: serve a READ from the cache, or forward the
//! request upstream (a READ possibly with its length doubled, so the second
//! half fills the cache). The session applies the decision and, once the
//! upstream reply arrives, calls [`Cache::complete`].

use crate::proto::{cmd, Request};

use super::MAX_REQUEST;

/// The default size of `--cache` without `=BYTES` (PREFETCH_BUFSIZE).
pub const DEFAULT_CACHE_SIZE: u32 = 4096;

/// What to do with one request from downstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A READ answered from the cache: `len` bytes starting `skip` bytes
    /// into the cached data. Nothing goes upstream.
    Hit { skip: usize, len: usize },
    /// Send the request upstream with this length (the downstream length,
    /// or twice it for a READ that prefetches). `prefetch` says whether the
    /// second half of the reply's data fills the cache.
    Forward {
        upstream_length: u32,
        prefetch: bool,
    },
}

/// The cached bytes: a copy of the export from `from` on, valid until the
/// next non-READ request or upstream reconnection.
#[derive(Clone, Debug, Default)]
pub struct Cache {
    /// Largest READ (before doubling) that prefetches; 0 means no cache.
    capacity: u32,
    from: u64,
    data: Vec<u8>,
    valid: bool,
}

impl Cache {
    /// A cache for reads of up to `capacity` bytes; 0 disables it.
    pub fn new(capacity: u32) -> Cache {
        Cache {
            capacity,
            ..Cache::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// The cached range `(from, len)`, when the cache holds data.
    pub fn range(&self) -> Option<(u64, usize)> {
        self.valid.then_some((self.from, self.data.len()))
    }

    /// Decides what `request` needs, given the latest upstream export size.
    /// Invalidates the cache for any non-READ request.
    pub fn decide(&mut self, request: &Request, export_size: u64) -> Decision {
        let forward = Decision::Forward {
            upstream_length: request.length,
            prefetch: false,
        };
        if !self.enabled() {
            return forward;
        }
        if request.kind != cmd::READ {
            // Pessimistic: a write, flush or anything else may change data.
            self.invalidate();
            return forward;
        }
        if let Some((from, len)) = self.range() {
            let end = from + len as u64;
            if request.offset >= from && request.end() <= end && request.in_range(u64::MAX) {
                return Decision::Hit {
                    skip: (request.offset - from) as usize,
                    len: request.length as usize,
                };
            }
        }
        let len = u64::from(request.length);
        let doubled = 2 * len; // cannot overflow: len < 2^32
        let prefetch = request.length > 0
            && request.length <= self.capacity
            // Fixes the C overflow of the 32 MiB reply buffer.
            && doubled <= u64::from(MAX_REQUEST)
            && request
                .offset
                .checked_add(doubled)
                .is_some_and(|end| end <= export_size);
        if prefetch {
            Decision::Forward {
                upstream_length: doubled as u32,
                prefetch: true,
            }
        } else {
            forward
        }
    }

    /// Takes the data of a successful upstream READ for `request` forwarded
    /// with `decision`, and returns the part that goes downstream. With a
    /// prefetch, the second half is kept in the cache.
    pub fn complete(
        &mut self,
        request: &Request,
        decision: Decision,
        mut data: Vec<u8>,
    ) -> Vec<u8> {
        if let Decision::Forward { prefetch: true, .. } = decision {
            let wanted = request.length as usize;
            if data.len() == 2 * wanted {
                let rest = data.split_off(wanted);
                self.from = request.offset + wanted as u64;
                self.data = rest;
                self.valid = true;
            }
        }
        data.truncate(request.length as usize);
        data
    }

    /// The bytes of a [`Decision::Hit`].
    pub fn hit(&self, skip: usize, len: usize) -> &[u8] {
        &self.data[skip..skip + len]
    }

    pub fn invalidate(&mut self) {
        self.valid = false;
        self.data = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn read(offset: u64, length: u32) -> Request {
        Request::new(cmd::READ, 0, 1, offset, length)
    }

    fn fill(cache: &mut Cache, offset: u64, length: u32) {
        let r = read(offset, length);
        let d = cache.decide(&r, SIZE);
        assert_eq!(
            d,
            Decision::Forward {
                upstream_length: 2 * length,
                prefetch: true
            }
        );
        let data: Vec<u8> = (0..2 * length).map(|i| i as u8).collect();
        let down = cache.complete(&r, d, data);
        assert_eq!(down.len(), length as usize);
    }

    #[test]
    fn first_read_is_doubled_and_second_half_is_served_from_the_cache() {
        let mut cache = Cache::new(DEFAULT_CACHE_SIZE);
        fill(&mut cache, 0, 4096);
        assert_eq!(cache.range(), Some((4096, 4096)));
        assert_eq!(
            cache.decide(&read(4096, 4096), SIZE),
            Decision::Hit { skip: 0, len: 4096 }
        );
        // Any sub-range is a hit too.
        let d = cache.decide(&read(5000, 100), SIZE);
        assert_eq!(
            d,
            Decision::Hit {
                skip: 904,
                len: 100
            }
        );
        assert_eq!(cache.hit(904, 100)[0], (4096 + 904) as u16 as u8);
    }

    #[test]
    fn reads_outside_the_cached_range_go_upstream() {
        let mut cache = Cache::new(DEFAULT_CACHE_SIZE);
        fill(&mut cache, 0, 4096);
        // Straddles the end of the cached range: a miss, doubled again.
        assert_eq!(
            cache.decide(&read(6000, 4096), SIZE),
            Decision::Forward {
                upstream_length: 8192,
                prefetch: true
            }
        );
        // Before the cached range.
        assert!(matches!(
            cache.decide(&read(0, 512), SIZE),
            Decision::Forward { .. }
        ));
    }

    #[test]
    fn non_read_requests_invalidate_the_cache() {
        for kind in [cmd::WRITE, cmd::FLUSH, cmd::TRIM, 42] {
            let mut cache = Cache::new(DEFAULT_CACHE_SIZE);
            fill(&mut cache, 0, 4096);
            let r = Request::new(kind, 0, 2, 0, 512);
            assert_eq!(
                cache.decide(&r, SIZE),
                Decision::Forward {
                    upstream_length: 512,
                    prefetch: false
                }
            );
            assert_eq!(cache.range(), None);
            assert!(matches!(
                cache.decide(&read(4096, 4096), SIZE),
                Decision::Forward { prefetch: true, .. }
            ));
        }
    }

    #[test]
    fn reads_larger_than_the_cache_or_past_the_end_are_not_doubled() {
        let mut cache = Cache::new(DEFAULT_CACHE_SIZE);
        let plain = |len| Decision::Forward {
            upstream_length: len,
            prefetch: false,
        };
        assert_eq!(cache.decide(&read(0, 4097), SIZE), plain(4097));
        // offset + 2*length must fit in the export.
        assert_eq!(cache.decide(&read(SIZE - 4096, 4096), SIZE), plain(4096));
        assert_eq!(
            cache.decide(&read(SIZE - 8192, 4096), SIZE),
            Decision::Forward {
                upstream_length: 8192,
                prefetch: true
            }
        );
        // Overflowing offsets are never doubled.
        assert_eq!(cache.decide(&read(u64::MAX - 10, 8), SIZE), plain(8));
    }

    #[test]
    fn doubling_never_exceeds_32_mib() {
        let mut cache = Cache::new(64 * 1024 * 1024);
        let half = MAX_REQUEST / 2;
        assert_eq!(
            cache.decide(&read(0, half), u64::MAX),
            Decision::Forward {
                upstream_length: MAX_REQUEST,
                prefetch: true
            }
        );
        assert_eq!(
            cache.decide(&read(0, half + 1), u64::MAX),
            Decision::Forward {
                upstream_length: half + 1,
                prefetch: false
            }
        );
    }

    #[test]
    fn a_disabled_cache_forwards_everything_unchanged() {
        let mut cache = Cache::new(0);
        assert!(!cache.enabled());
        assert_eq!(
            cache.decide(&read(0, 4096), SIZE),
            Decision::Forward {
                upstream_length: 4096,
                prefetch: false
            }
        );
    }

    #[test]
    fn a_short_prefetch_reply_leaves_the_cache_empty() {
        let mut cache = Cache::new(DEFAULT_CACHE_SIZE);
        let r = read(0, 4096);
        let d = cache.decide(&r, SIZE);
        let down = cache.complete(&r, d, vec![0; 4096]);
        assert_eq!(down.len(), 4096);
        assert_eq!(cache.range(), None);
    }

    #[test]
    fn invalidate_clears_the_cache() {
        let mut cache = Cache::new(DEFAULT_CACHE_SIZE);
        fill(&mut cache, 0, 1024);
        cache.invalidate();
        assert_eq!(cache.range(), None);
    }
}
