//! A slow disk stalls only the requests waiting for it.
//!
//! Simulated: a disk that takes a second for some reads (`store.read#N =
//! slow(1000)`, which fires on the N-th image read of the process only), hit
//! by as many clients as the server has async worker threads (pinned with
//! TOKIO_WORKER_THREADS, so the scenario means the same on any machine:
//! every worker would be stuck if reads ran on them). While those reads are
//! stalled, the control socket, a new client reading elsewhere, and SIGTERM
//! must all be served promptly.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
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
    /// When the last stalled read's fault fired.
    fired_at: Instant,
    _dir: TempDir,
}

/// Starts `serve` with a control socket and a plan that slows the first
/// `WORKERS` image reads, then sends one read from each of `WORKERS`
/// clients and waits until every one of them is stalled in the disk.
fn stall_the_workers(tag: &str) -> Stalled {
    let dir = TempDir::new(tag);
    let file = dir.pattern_file("disk.img", MIB, 5);
    let sock = dir.join("ctl.sock");
    let plan = (1..=WORKERS)
        .map(|n| format!("store.read#{n}=slow({SLOW_MS})"))
        .collect::<Vec<_>>()
        .join("; ");
    let mut args = server_args("serve", &file, Some(&sock), &[]);
    args.push("--faults".into());
    args.push(plan);
    let workers = WORKERS.to_string();
    let server = Flexnbd::spawn_with_env(&dir, &args, &[("TOKIO_WORKER_THREADS", &workers)]);
    wait_for(&format!("control socket {}", sock.display()), WAIT, || {
        UnixStream::connect(&sock).ok().map(|_| ())
    });
    let mut clients = Vec::new();
    for n in 1..=WORKERS {
        let mut c = server.connect();
        c.oldstyle_greeting();
        c.request(cmd::READ, 0, n as u64, STALLED_AT, LEN);
        clients.push(c);
    }
    for n in 1..=WORKERS {
        server.wait_log(&format!("fault fired: store.read#{n} -> slow({SLOW_MS})"));
    }
    Stalled {
        server,
        sock,
        file,
        clients,
        fired_at: Instant::now(),
        _dir: dir,
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
        assert!(
            self.fired_at.elapsed() < Duration::from_millis(SLOW_MS),
            "the stalled reads ended before {what} finished; the machine is too slow for this test"
        );
    }

    /// Reads the stalled clients' replies: late, but complete and correct.
    fn finish_stalled_reads(&mut self) {
        let expected = read_file_range(&self.file, STALLED_AT, LEN as usize);
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

fn status(sock: &Path) -> String {
    let mut s = UnixStream::connect(sock).expect("connect to the control socket");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"status\n\n").expect("send status");
    let mut got = String::new();
    s.read_to_string(&mut got)
        .expect("read the status response");
    got
}

#[test]
fn status_answers_promptly_while_reads_are_stalled() {
    let mut t = stall_the_workers("slow-status");
    let start = Instant::now();
    let response = status(&t.sock);
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
