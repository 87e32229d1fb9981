//! What every fuzz target links: an allocator that makes over-allocation a
//! finding. libFuzzer's own `-malloc_limit_mb` needs a sanitizer's malloc
//! hooks, which a stable build has none of, and `-rss_limit_mb` misses a
//! large allocation that is never touched. This one aborts (a crash
//! libFuzzer keeps the input of) on any single allocation over
//! [`MAX_ONE`] or once more than [`MAX_LIVE`] is held at a time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The largest legitimate single allocation is a 32 MiB request's payload
/// (`proto::MAX_BLOCK`); twice that is a length taken from the wire.
pub const MAX_ONE: usize = 64 << 20;

/// One connection to a 1 MiB image has no business holding more.
pub const MAX_LIVE: usize = 1 << 30;

pub struct Bounded {
    live: AtomicUsize,
}

fn over(what: &str, size: usize) -> ! {
    // Written without allocating: the allocator is the one refusing.
    use std::io::Write;
    let mut line = [0u8; 128];
    let mut at = std::io::Cursor::new(&mut line[..]);
    let _ = write!(at, "fuzz allocator: {what} of {size} bytes: over-allocation\n");
    let n = at.position() as usize;
    let _ = std::io::stderr().write_all(&line[..n]);
    std::process::abort()
}

// SAFETY: every call is passed to the system allocator unchanged; the
// counter only observes sizes, and the checks abort before any allocation.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.admit(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.admit(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.live.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            self.admit(new_size - layout.size());
            if new_size > MAX_ONE {
                over("a reallocation", new_size);
            }
        } else {
            self.live
                .fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        // SAFETY: as for `alloc`; `ptr` and `layout` are the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

impl Bounded {
    pub const fn new() -> Bounded {
        Bounded {
            live: AtomicUsize::new(0),
        }
    }

    fn admit(&self, size: usize) {
        if size > MAX_ONE {
            over("one allocation", size);
        }
        let live = self.live.fetch_add(size, Ordering::Relaxed) + size;
        if live > MAX_LIVE {
            over("allocations held at once, the last", size);
        }
    }
}

impl Default for Bounded {
    fn default() -> Bounded {
        Bounded::new()
    }
}

#[global_allocator]
static ALLOCATOR: Bounded = Bounded::new();

/// Runs target `name` on `data` (flexnbd::fuzzing::run), with test-only TLS
/// credentials made once per process for the target that needs them.
pub fn run(name: &str, data: &[u8]) {
    // Each input's server logs its connection; at fuzzing speed that would
    // be most of the time spent. Errors still show. Set here, in the fuzz
    // binary, not in the library: tests that replay inputs keep their log.
    flexnbd::log::set_threshold(flexnbd::log::Level::Error);
    let tls = (name == "serve_tls").then(credentials);
    flexnbd::fuzzing::run(name, data, tls);
}

/// A self-signed certificate for 127.0.0.1 and its key, written once to a
/// directory of this process's own (nothing is committed).
fn credentials() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("flexnbd-fuzz-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for the credentials");
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("a self-signed certificate");
        std::fs::write(dir.join("server-cert.pem"), made.cert.pem()).expect("the certificate");
        std::fs::write(dir.join("server-key.pem"), made.signing_key.serialize_pem())
            .expect("the key");
        dir
    })
}
