//! What a hostile client can make a server spend, against the bounds
//! `docs/hostile.md` gives (its formula: a base, plus per connection the
//! read buffer, one payload piece, the write batch and the reply buffer,
//! plus the server-wide deferred reads), and that everyone else is still
//! served meanwhile. The figures under load (RSS, a well-behaved client's
//! p99) are `bench/hostile.py`'s, in BENCHMARKS.md.

use std::time::{Duration, Instant};

use flexnbd::proto::cmd;

use crate::harness::*;

const MIB: u64 = 1024 * 1024;

/// The server's resident memory now, in bytes (VmRSS).
fn vm_rss(server: &Flexnbd) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.server_pid))
        .expect("the server's /proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in kB");
    kb * 1024
}

/// Room for `n` more open files in this process (and so in the servers it
/// starts): the default soft limit of 1024 is below what these tests hold.
fn allow_files(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit write and read only the struct given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < n {
            lim.rlim_cur = n.min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
}

/// A read by a well-behaved client, timed.
fn timed_read(c: &mut RawClient, offset: u64) -> Duration {
    let began = Instant::now();
    let _ = c.read_ok(offset, 4096);
    began.elapsed()
}

/// 2000 idle connections (greeted, then silent) cost at most 32 KiB each
/// of resident memory: the 256 KiB read buffer and the rest of a
/// connection's buffers are allocated but untouched until data comes. A
/// client connected before them is still answered at once.
#[test]
fn two_thousand_idle_connections_cost_at_most_32_kib_each() {
    const IDLE: usize = 2000;
    allow_files(4 * IDLE as u64);
    let dir = TempDir::new("hostile");
    let file = dir.pattern_file("disk.img", 4 * MIB, 5);
    let server = Flexnbd::serve(&dir, &file, &["--max-clients", "2100"]);
    let mut good = server.connect();
    good.oldstyle_greeting();
    let _ = timed_read(&mut good, 0);
    let before = vm_rss(&server);
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let mut c = server.connect();
        c.oldstyle_greeting();
        idle.push(c);
    }
    let after = vm_rss(&server);
    let each = after.saturating_sub(before) / IDLE as u64;
    assert!(
        each <= 32 * 1024,
        "{IDLE} idle connections took {} KiB of RSS, {} KiB each (bound 32 KiB)",
        (after - before) / 1024,
        each / 1024
    );
    let took = timed_read(&mut good, 8192);
    assert!(
        took < Duration::from_secs(1),
        "a read beside {IDLE} idle connections took {took:?}"
    );
    drop(idle);
    server.assert_no_panic();
}

/// Clients that send a 32 MiB write's header and 4 MiB of its payload,
/// then stall: the server holds at most a piece (256 KiB) of each, not the
/// 4 MiB sent nor the 32 MiB announced, and a well-behaved client is
/// answered meanwhile.
#[test]
fn stalled_large_writes_hold_a_piece_each_and_stall_no_one_else() {
    const STALLED: usize = 8;
    let dir = TempDir::new("hostile");
    let file = dir.sparse_file("disk.img", 64 * MIB);
    let server = Flexnbd::serve(&dir, &file, &["--max-clients", "16"]);
    let mut good = server.connect();
    good.oldstyle_greeting();
    let _ = timed_read(&mut good, 0);
    let before = vm_rss(&server);
    let mut stalled = Vec::new();
    for i in 0..STALLED {
        let mut c = server.connect();
        c.oldstyle_greeting();
        c.request(cmd::WRITE, 0, 1, i as u64 * 4 * MIB, 32 * MIB as u32);
        c.send(&vec![0xa5; 4 * MIB as usize]);
        stalled.push(c);
    }
    // Everything sent has reached the server (its socket buffers hold at
    // most a few hundred KiB): what it holds now is what it keeps.
    let took = timed_read(&mut good, 4096);
    let after = vm_rss(&server);
    let each = after.saturating_sub(before) / STALLED as u64;
    assert!(
        each <= MIB,
        "{STALLED} stalled 32 MiB writes took {} KiB of RSS, {} KiB each (bound 1 MiB: a \
         256 KiB piece and the 256 KiB read buffer, with room)",
        (after - before) / 1024,
        each / 1024
    );
    assert!(
        took < Duration::from_secs(1),
        "a read beside {STALLED} stalled writes took {took:?}"
    );
    drop(stalled);
    server.assert_no_panic();
}
