//! A slow disk stalls only the requests waiting for it.
//!
//! Simulated: a region of the disk that takes a second for every read
//! (`store.read@OFFSET+4096=slow(1000)`, which fires only on image reads
//! touching those bytes), hit by as many clients as the server has async
//! worker threads (pinned with TOKIO_WORKER_THREADS, so the scenario means
//! the same on any machine: every worker would be stuck if reads ran on
//! them). While those reads are stalled, the control socket, a new client
//! reading elsewhere, the stalled client's own next read, a migration and
//! SIGTERM must all be served promptly.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::harness::*;
use flexnbd::proto::{self, cmd};

const MIB: u64 = 1024 * 1024;
/// How long each stalled read takes.
const SLOW_MS: u64 = 1000;
/// Async worker threads of the server, and so the number of stalled clients.
const WORKERS: usize = 2;
/// What "promptly" means for work that does not touch the stalled reads.
const PROMPT: Duration = Duration::from_millis(100);
/// Where the stalled clients read; the others read elsewhere.
const STALLED_AT: u64 = 0;
const ELSEWHERE: u64 = 512 * 1024;
const LEN: u32 = 4096;

struct Stalled {
    server: Flexnbd,
    sock: PathBuf,
    file: PathBuf,
    /// The clients whose reads are stalled, replies not yet read.
    clients: Vec<RawClient>,
    /// Where they read, and how long each of their reads takes.
    at: u64,
    slow: Duration,
    /// When the last stalled read's fault fired.
    fired_at: Instant,
    dir: TempDir,
}

/// Starts `serve` with a control socket and a plan that slows every image
/// read of the 4 KiB at `STALLED_AT`, then sends one read there from each of
/// `WORKERS` clients and waits until every one of them is stalled in the
/// disk.
fn stall_the_workers(tag: &str) -> Stalled {
    stall_the_workers_at(tag, MIB, STALLED_AT, SLOW_MS)
}

/// Like `stall_the_workers`, on an image of `size` bytes, with the slow
/// region at `at` taking `slow_ms` per read.
fn stall_the_workers_at(tag: &str, size: u64, at: u64, slow_ms: u64) -> Stalled {
    let dir = TempDir::new(tag);
    let file = dir.pattern_file("disk.img", size, 5);
    let sock = dir.join("ctl.sock");
    let key = format!("store.read@{at}+{LEN}");
    let mut args = server_args("serve", &file, Some(&sock), &[]);
    args.push("--faults".into());
    args.push(format!("{key}=slow({slow_ms})"));
    let workers = WORKERS.to_string();
    let server = Flexnbd::spawn_with_env(&dir, &args, &[("TOKIO_WORKER_THREADS", &workers)]);
    wait_for(&format!("control socket {}", sock.display()), WAIT, || {
        UnixStream::connect(&sock).ok().map(|_| ())
    });
    let mut clients = Vec::new();
    for n in 1..=WORKERS {
        let mut c = server.connect();
        c.oldstyle_greeting();
        c.request(cmd::READ, 0, n as u64, at, LEN);
        clients.push(c);
    }
    let fired = format!("fault fired: {key} -> slow({slow_ms})");
    wait_for(&format!("{WORKERS} log lines {fired:?}"), WAIT, || {
        (server.log().matches(&fired).count() >= WORKERS).then_some(())
    });
    Stalled {
        server,
        sock,
        file,
        clients,
        at,
        slow: Duration::from_millis(slow_ms),
        fired_at: Instant::now(),
        dir,
    }
}

impl Stalled {
    /// Fails unless `took` was prompt and the stalled reads were still
    /// stalled when it ended (otherwise the test proved nothing).
    fn assert_prompt(&self, what: &str, took: Duration) {
        assert!(
            took <= PROMPT,
            "{what} took {took:?} while {WORKERS} reads were stalled in the disk (limit {PROMPT:?})"
        );
        self.assert_still_stalled(what);
    }

    fn assert_still_stalled(&self, what: &str) {
        assert!(
            self.fired_at.elapsed() < self.slow,
            "the stalled reads ended before {what} finished; the machine is too slow for this test"
        );
    }

    /// Reads the stalled clients' replies: late, but complete and correct.
    fn finish_stalled_reads(&mut self) {
        let expected = read_file_range(&self.file, self.at, LEN as usize);
        for (i, c) in self.clients.iter_mut().enumerate() {
            let r = c.simple_reply();
            assert_eq!(
                (r.magic, r.error, r.handle),
                (proto::SIMPLE_REPLY_MAGIC, 0, i as u64 + 1),
                "stalled read reply"
            );
            assert!(c.read_exact(LEN as usize) == expected, "stalled read data");
        }
    }
}

#[test]
fn status_answers_promptly_while_reads_are_stalled() {
    let mut t = stall_the_workers("slow-status");
    let start = Instant::now();
    let response = crate::control::ask(&t.sock, "status\n\n");
    let took = start.elapsed();
    assert!(response.starts_with("0: "), "status response {response:?}");
    t.assert_prompt("status", took);
    t.finish_stalled_reads();
    t.server.assert_no_panic();
}

#[test]
fn another_client_connects_and_reads_promptly_while_reads_are_stalled() {
    let mut t = stall_the_workers("slow-other-client");
    let start = Instant::now();
    let mut c = t.server.connect();
    c.oldstyle_greeting();
    let got = c.read_ok(ELSEWHERE, LEN);
    let took = start.elapsed();
    t.assert_prompt("connecting and reading another range", took);
    assert!(
        got == read_file_range(&t.file, ELSEWHERE, LEN as usize),
        "the other client's data"
    );
    t.finish_stalled_reads();
    t.server.assert_no_panic();
}

#[test]
fn sigterm_is_handled_promptly_and_the_stalled_reads_finish_first() {
    let mut t = stall_the_workers("slow-sigterm");
    let start = Instant::now();
    t.server.signal(libc::SIGTERM);
    wait_for("the server to take SIGTERM", PROMPT * 10, || {
        t.server
            .log()
            .contains("received SIGTERM, shutting down")
            .then_some(())
    });
    let took = start.elapsed();
    t.assert_prompt("taking SIGTERM", took);
    // A request in progress finishes before its connection closes.
    t.finish_stalled_reads();
    // Shutdown then needs only the rest of the stalled reads' time.
    let status = wait_for(
        "the server to exit",
        Duration::from_millis(SLOW_MS * 3),
        || t.server.child.as_mut().unwrap().try_wait().unwrap(),
    );
    assert!(status.success(), "exit status {status}");
    t.server.assert_no_panic();
}

#[test]
fn the_stalled_clients_next_read_elsewhere_is_answered_before_its_stalled_one() {
    let mut t = stall_the_workers("slow-same-client");
    // The first stalled client asks for another range on the same
    // connection: its reply must come first, out of order (NBD matches
    // replies by handle), instead of queueing behind the disk.
    let start = Instant::now();
    let c = &mut t.clients[0];
    c.request(cmd::READ, 0, 99, ELSEWHERE, LEN);
    let r = c.simple_reply();
    let took = start.elapsed();
    assert_eq!(
        (r.magic, r.error, r.handle),
        (proto::SIMPLE_REPLY_MAGIC, 0, 99),
        "the first reply on the stalled connection is the later read's"
    );
    let got = c.read_exact(LEN as usize);
    t.assert_prompt("the same client's read of another range", took);
    assert!(
        got == read_file_range(&t.file, ELSEWHERE, LEN as usize),
        "the later read's data"
    );
    t.finish_stalled_reads();
    t.server.assert_no_panic();
}

#[test]
fn a_migration_progresses_while_reads_are_stalled() {
    // The slow region is the image's last 4 KiB, which the mirror copies
    // last: everything before it must reach the destination while every
    // async worker's client is still waiting for that region.
    const SIZE: u64 = 8 * MIB;
    const SLOW_LONG_MS: u64 = 3000;
    let mut t = stall_the_workers_at("slow-migration", SIZE, SIZE - u64::from(LEN), SLOW_LONG_MS);
    let dest_file = t.dir.sparse_file("dest.img", SIZE);
    let mut dest = Flexnbd::spawn(&t.dir, &server_args("listen", &dest_file, None, &[]));
    let o = run_mirror(&t.sock, dest.port(), &[], WAIT);
    assert!(o.status.success(), "mirror: {o:?}");
    let half = SIZE / 2;
    wait_for(
        "half the image to reach the destination",
        t.slow / 2,
        || (allocated_bytes(&dest_file) >= half).then_some(()),
    );
    t.assert_still_stalled("the migration's progress");
    t.finish_stalled_reads();
    let status = wait_for("the source to exit after the migration", WAIT, || {
        t.server.child.as_mut().unwrap().try_wait().unwrap()
    });
    assert!(status.success(), "source exit status {status}");
    let status = dest.wait_exit();
    assert!(status.success(), "destination exit status {status}");
    assert!(
        std::fs::read(&dest_file).unwrap() == std::fs::read(&t.file).unwrap(),
        "the destination holds the source's image"
    );
    t.server.assert_no_panic();
    dest.assert_no_panic();
}

#[test]
fn one_connection_has_at_most_16_reads_waiting_for_the_disk() {
    // 40 pipelined reads of a region where each read takes 300 ms: with at
    // most 16 waiting at once they need at least three rounds of the disk's
    // time; without the cap they would all wait together and finish in one.
    const READS: u64 = 40;
    const CAP: u64 = 16;
    const MS: u64 = 300;
    let dir = TempDir::new("slow-cap");
    let file = dir.pattern_file("disk.img", MIB, 9);
    let key = format!("store.read@0+{}", READS * u64::from(LEN));
    let args = server_args(
        "serve",
        &file,
        None,
        &["--faults", &format!("{key}=slow({MS})")],
    );
    let server = Flexnbd::spawn(&dir, &args);
    let mut c = server.connect();
    c.oldstyle_greeting();
    let start = Instant::now();
    let mut burst = Vec::new();
    for i in 0..READS {
        let r = proto::Request::new(cmd::READ, 0, i, i * u64::from(LEN), LEN);
        burst.extend_from_slice(&r.encode());
    }
    c.send(&burst);
    let mut seen = vec![false; READS as usize];
    for _ in 0..READS {
        let r = c.simple_reply();
        assert_eq!(
            (r.magic, r.error),
            (proto::SIMPLE_REPLY_MAGIC, 0),
            "read reply"
        );
        let i = r.handle;
        assert!(i < READS && !seen[i as usize], "reply handle {i}");
        seen[i as usize] = true;
        let got = c.read_exact(LEN as usize);
        assert!(
            got == read_file_range(&file, i * u64::from(LEN), LEN as usize),
            "data of read {i}"
        );
    }
    let took = start.elapsed();
    let rounds = READS.div_ceil(CAP);
    assert!(
        took >= Duration::from_millis(MS * rounds),
        "{READS} reads of {MS} ms each took {took:?}: more than {CAP} waited for the disk at once"
    );
    let fired = format!("fault fired: {key} -> slow({MS})");
    assert_eq!(
        server.log().matches(&fired).count() as u64,
        READS,
        "{fired:?} per read"
    );
    server.assert_no_panic();
}
