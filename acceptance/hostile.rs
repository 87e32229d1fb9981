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

/// The kernel's backlog of the server's listening socket: `ss` shows it
/// as a listener's Send-Q.
fn listen_backlog(server: &Flexnbd) -> u32 {
    let port = server.addr.port();
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .expect("run ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("LISTEN"))
        .unwrap_or_else(|| panic!("ss shows no listener on port {port}: {text:?}"));
    line.split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no backlog in {line:?}"))
}

/// A flood of connections past `--max-clients`: each is closed before a
/// byte of greeting, at most 1000 a second, and costs nothing that lasts;
/// the accept queue is deep enough (1024, or the kernel's cap) to hold a
/// burst of 400 without a SYN dropped and sent again a second later; the
/// client already in is answered throughout.
#[test]
fn a_flood_past_max_clients_is_refused_without_a_greeting_at_a_pace() {
    const THREADS: usize = 8;
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("somaxconn")
        .trim()
        .parse()
        .unwrap();
    // 400 connects, or as many as half the kernel's cap on the queue
    // lets through without a dropped SYN on a machine where it is small.
    let each = (50).min(somaxconn as usize / 2 / THREADS).max(3);
    let flood = THREADS * each;
    allow_files(4 * flood as u64);
    let dir = TempDir::new("hostile");
    let file = dir.pattern_file("disk.img", 4 * MIB, 6);
    let server = Flexnbd::serve(&dir, &file, &["--max-clients", "4"]);
    assert_eq!(
        listen_backlog(&server),
        1024.min(somaxconn),
        "the listening socket's backlog"
    );
    let mut good = server.connect();
    good.oldstyle_greeting();
    let _ = timed_read(&mut good, 0);
    let mut slots: Vec<RawClient> = (0..3)
        .map(|_| {
            let mut c = server.connect();
            c.oldstyle_greeting();
            c
        })
        .collect();
    // Every slot is taken before the flood starts: a slot is held from
    // before its greeting is sent.
    let before = vm_rss(&server);
    let addr = server.addr;
    let flood_began = Instant::now();
    let flooded: Vec<(Duration, std::net::TcpStream)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(move || {
                    (0..each)
                        .map(|_| {
                            let began = Instant::now();
                            let c = std::net::TcpStream::connect_timeout(&addr, WAIT)
                                .expect("a connect during the flood");
                            (began.elapsed(), c)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("a flooding thread"))
            .collect()
    });
    let slowest = flooded.iter().map(|(d, _)| *d).max().unwrap();
    assert!(
        slowest < Duration::from_secs(1),
        "the slowest of {} connects took {slowest:?}: a SYN was dropped by a full accept queue",
        flooded.len()
    );
    for (_, mut c) in flooded {
        use std::io::Read;
        c.set_read_timeout(Some(WAIT)).unwrap();
        let mut got = Vec::new();
        match c.read_to_end(&mut got) {
            Ok(_) => assert!(got.is_empty(), "a refused client was sent {got:02x?}"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("a connection past --max-clients was not closed at once: {e}"),
        }
    }
    // Refused at the pace of 20 each 20 ms: the last of 400 no sooner
    // than 19 windows after the first. (A slow machine only makes it
    // later; refused as fast as they came, they took about 20 ms.)
    let refusing = flood_began.elapsed();
    let windows = flood as u32 / 20 - 1;
    assert!(
        refusing >= Duration::from_millis(20) * windows,
        "{} refusals took only {refusing:?}: they are paced at 1000 a second",
        flood
    );
    let after = vm_rss(&server);
    assert!(
        after.saturating_sub(before) <= 2 * MIB,
        "{} refused connections left {} KiB more resident",
        flood,
        after.saturating_sub(before) / 1024
    );
    let took = timed_read(&mut good, 8192);
    assert!(
        took < Duration::from_secs(1),
        "a read after the flood took {took:?}"
    );
    // One line at once and at most one a second after, which together
    // count every refusal.
    wait_for("every refusal counted in the log", WAIT, || {
        (refusals_logged(&server.log()) == flood as u64).then_some(())
    });
    let lines = server.log().matches("too many clients").count();
    assert!(
        lines <= 3,
        "{lines} log lines for a flood of under a second: refusals are logged at most once a second"
    );
    let _ = slots[0].read_ok(0, 4096);
    slots.clear();
    server.assert_no_panic();
}

/// How many refused connections the "too many clients" lines count: one
/// for each "rejecting" line, plus the ones each says were not logged.
fn refusals_logged(log: &str) -> u64 {
    let number_before = |line: &str, marker: &str| -> u64 {
        let head = &line[..line.find(marker).expect("the marker")];
        let digits: String = head
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        digits
            .parse()
            .unwrap_or_else(|_| panic!("no count in {line:?}"))
    };
    log.lines()
        .filter(|l| l.contains("too many clients"))
        .map(|l| {
            if l.contains(" more connections refused in the last second") {
                number_before(l, " more connections refused in the last second")
            } else if l.contains(" more refused, not logged") {
                1 + number_before(l, " more refused, not logged")
            } else {
                1
            }
        })
        .sum()
}

/// 1000 control connections that never send a request cost at most
/// 32 KiB each, and `status` is answered at once beside them.
#[test]
fn a_thousand_silent_control_connections_cost_little_and_delay_no_status() {
    const SILENT: usize = 1000;
    allow_files(4 * SILENT as u64);
    let dir = TempDir::new("hostile");
    let file = dir.sparse_file("disk.img", 4 * MIB);
    let sock = dir.join("ctl.sock");
    let server = Flexnbd::serve(&dir, &file, &["-s", sock.to_str().unwrap()]);
    wait_for("the control socket", WAIT, || {
        std::os::unix::net::UnixStream::connect(&sock)
            .ok()
            .map(|_| ())
    });
    let _ = status(&sock);
    let before = vm_rss(&server);
    let silent: Vec<_> = (0..SILENT)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).expect("a control connection"))
        .collect();
    let began = Instant::now();
    let st = status(&sock);
    let took = began.elapsed();
    assert!(st.contains_key("pid"), "a whole status line: {st:?}");
    assert!(
        took < Duration::from_secs(1),
        "status beside {SILENT} silent clients took {took:?}"
    );
    let after = vm_rss(&server);
    let each = after.saturating_sub(before) / SILENT as u64;
    assert!(
        each <= 32 * 1024,
        "{SILENT} silent control connections took {} KiB, {} KiB each (bound 32 KiB)",
        after.saturating_sub(before) / 1024,
        each / 1024
    );
    drop(silent);
    server.assert_no_panic();
}
