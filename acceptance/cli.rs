//! The `flexnbd` command line: the one-shot `read` and `write` client modes,
//! usage errors, and help, as the C flexnbd has them (its global options,
//! `read`/`write`, `help` and exit codes).
//!
//! Simulated: real `flexnbd serve` servers in both handshakes, a real
//! `qemu-nbd` server (to prove our client speaks NBD with someone else's
//! server, not only with itself), and tiny fake servers written here that
//! send a bad greeting, an error reply, a reply with the wrong handle, or no
//! reply at all.
//!
//! What must happen: `read` prints exactly the requested bytes on stdout and
//! `write` stores exactly the bytes from stdin, both exiting 0; every failure
//! (out-of-range request, refused connection, bad greeting, error reply,
//! mismatched handle, no reply, short stdin) exits 1 with a message that says
//! what went wrong; usage errors exit 1 with the C flexnbd's messages, `--help`
//! and `help` exit 0 on stdout, and a missing image file is reported before
//! any port is opened.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use assert_cmd::assert::Assert;
use predicates::prelude::*;

use crate::harness::*;
use flexnbd::proto::{self, cmd, Request, SimpleReply};

const MIB: u64 = 1024 * 1024;
/// Limit for one CLI run that should finish at once.
const QUICK: Duration = Duration::from_secs(20);

/// `flexnbd ARGS`, bounded by QUICK, for assertions on its exit status and
/// output (a failing assertion shows the command line, status and output).
fn flexnbd(args: &[&str]) -> Assert {
    assert_tool(BIN, args, QUICK)
}

fn flexnbd_with_input(args: &[&str], input: &[u8]) -> Assert {
    assert_tool_with_input(BIN, args, Some(input), QUICK)
}

/// Asserts exit status 1 and that stderr contains every one of `needles`.
fn assert_fails_with(run: Assert, needles: &[&str]) -> Assert {
    needles.iter().fold(run.code(1), |run, n| {
        run.stderr(predicate::str::contains(*n))
    })
}

/// `flexnbd read` of `len` bytes at `from` from 127.0.0.1:`port`.
fn read_args(port: u16, from: u64, len: u64) -> Vec<String> {
    [
        "read",
        "--addr",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--from",
        &from.to_string(),
        "--size",
        &len.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn write_args(port: u16, from: u64, len: u64) -> Vec<String> {
    let mut a = read_args(port, from, len);
    a[0] = "write".into();
    a
}

fn run_read(port: u16, from: u64, len: u64) -> Assert {
    let a = read_args(port, from, len);
    flexnbd(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

fn run_write(port: u16, from: u64, len: u64, input: &[u8]) -> Assert {
    let a = write_args(port, from, len);
    flexnbd_with_input(&a.iter().map(String::as_str).collect::<Vec<_>>(), input)
}

/// A port nobody listens on (bound, read, released).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `qemu-nbd` serving `file` as export "" on 127.0.0.1, killed on drop.
struct QemuNbd {
    child: Option<Child>,
    port: u16,
    log: std::path::PathBuf,
}

impl QemuNbd {
    fn serve(dir: &TempDir, file: &Path) -> QemuNbd {
        let port = free_port();
        let log = dir.join("qemu-nbd.log");
        let child = Command::new("qemu-nbd")
            .args(["-f", "raw", "-x", "", "-t", "-b", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run qemu-nbd (is it installed?): {e}"));
        let mut q = QemuNbd {
            child: Some(child),
            port,
            log,
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_for("qemu-nbd to accept connections", WAIT, || {
            if let Some(status) = q.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "qemu-nbd exited with {status}: {}",
                    std::fs::read_to_string(&q.log).unwrap_or_default()
                );
            }
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .ok()
                .map(drop)
        });
        q
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- qemu-nbd log ----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// A one-connection fake server on 127.0.0.1:0. `behave` gets the accepted
/// connection; whatever it returns is handed back by `join`.
struct FakeServer<T> {
    port: u16,
    thread: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> FakeServer<T> {
    fn start(behave: impl FnOnce(TcpStream) -> T + Send + 'static) -> FakeServer<T> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let thread = std::thread::spawn(move || {
            let (stream, _) = wait_for("the client to connect", WAIT, || listener.accept().ok());
            stream.set_nonblocking(false).unwrap();
            stream.set_read_timeout(Some(2 * WAIT)).unwrap();
            stream.set_write_timeout(Some(WAIT)).unwrap();
            behave(stream)
        });
        FakeServer {
            port,
            thread: Some(thread),
        }
    }

    fn join(mut self) -> T {
        match self.thread.take().unwrap().join() {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e),
        }
    }
}

/// Reads until the peer closes (bounded by the read timeout).
fn drain_until_closed(s: &mut TcpStream) {
    let mut b = [0u8; 4096];
    while matches!(s.read(&mut b), Ok(n) if n > 0) {}
}

/// A fake oldstyle server for an export of `size` bytes: it reads one
/// request, answers with `reply(request)` (nothing if `None`), waits for
/// the client to go, and returns the request it received.
fn fake_oldstyle(
    size: u64,
    reply: impl FnOnce(&Request) -> Option<Vec<u8>> + Send + 'static,
) -> FakeServer<Request> {
    FakeServer::start(move |mut s| {
        s.write_all(&proto::oldstyle_greeting(size, 1)).unwrap();
        let mut h = [0u8; proto::REQUEST_LEN];
        s.read_exact(&mut h).unwrap();
        let req = Request::decode(&h);
        if let Some(bytes) = reply(&req) {
            s.write_all(&bytes).unwrap();
        }
        drain_until_closed(&mut s);
        req
    })
}

// ---- read and write against real servers ------------------------------

#[test]
fn read_and_write_round_trip_against_flexnbd_in_both_handshakes() {
    for handshake in ["oldstyle", "newstyle"] {
        let dir = TempDir::new("cli-rw");
        let file = dir.pattern_file("disk.img", 4 * MIB, 7);
        let server = Flexnbd::serve(&dir, &file, &["--handshake", handshake]);
        let port = server.port();

        // read prints exactly the bytes of the file, nothing else.
        run_read(port, 12_345, 100_000)
            .success()
            .stdout(read_file_range(&file, 12_345, 100_000));

        // write stores exactly stdin, and a read sees it.
        let data = pattern(300_000, 42);
        run_write(port, MIB + 3, 300_000, &data).success();
        assert_eq!(
            read_file_range(&file, MIB + 3, 300_000),
            data,
            "{handshake}"
        );
        run_read(port, MIB + 3, 300_000)
            .success()
            .stdout(data.clone());

        // The last byte of the export is reachable; a zero-length read is fine.
        run_read(port, 4 * MIB - 1, 1)
            .success()
            .stdout(read_file_range(&file, 4 * MIB - 1, 1));
        run_read(port, 4 * MIB, 0)
            .success()
            .stdout(predicate::str::is_empty());
        server.assert_no_panic();
    }
}

#[test]
fn read_and_write_interoperate_with_qemu_nbd() {
    let dir = TempDir::new("cli-qemu");
    let file = dir.pattern_file("disk.img", 2 * MIB, 9);
    let qemu = QemuNbd::serve(&dir, &file);

    run_read(qemu.port, 4096, 65_536)
        .success()
        .stdout(read_file_range(&file, 4096, 65_536));

    let data = pattern(70_001, 5);
    run_write(qemu.port, MIB - 17, 70_001, &data).success();
    // qemu-nbd returns what we wrote.
    run_read(qemu.port, MIB - 17, 70_001)
        .success()
        .stdout(data.clone());
    // qemu-nbd writes through the page cache, so the file shows it too.
    assert_eq!(read_file_range(&file, MIB - 17, 70_001), data);

    // The size qemu-nbd reports is honoured for the range check.
    assert_fails_with(run_read(qemu.port, 2 * MIB - 10, 11), &["out of range"]);
}

// ---- client failures ----------------------------------------------------

#[test]
fn out_of_range_requests_fail_before_anything_is_sent() {
    let dir = TempDir::new("cli-range");
    let file = dir.pattern_file("disk.img", MIB, 1);
    let before = std::fs::read(&file).unwrap();
    for handshake in ["oldstyle", "newstyle"] {
        let server = Flexnbd::serve(&dir, &file, &["--handshake", handshake]);
        let port = server.port();
        // No data is printed for a failed read.
        assert_fails_with(run_read(port, MIB - 10, 11), &["out of range", "1048576"])
            .stdout(predicate::str::is_empty());
        assert_fails_with(run_read(port, u64::MAX, 2), &["out of range"]);
        assert_fails_with(run_write(port, MIB, 1, b"x"), &["out of range"]);
    }
    assert_eq!(std::fs::read(&file).unwrap(), before, "nothing was written");
}

#[test]
fn connection_refused_fails_with_the_address() {
    let port = free_port();
    assert_fails_with(
        run_read(port, 0, 1),
        &[&format!("127.0.0.1:{port}"), "refused"],
    );
    assert_fails_with(run_write(port, 0, 1, b"x"), &["refused"]);
}

#[test]
fn a_bad_greeting_fails() {
    let fake = FakeServer::start(|mut s| {
        let mut g = proto::oldstyle_greeting(MIB, 1);
        g[0..8].copy_from_slice(b"NOTNBD!!");
        s.write_all(&g).unwrap();
        drain_until_closed(&mut s);
    });
    assert_fails_with(run_read(fake.port, 0, 512), &["greeting"]);
    fake.join();

    // Right password, wrong magic.
    let fake = FakeServer::start(|mut s| {
        let mut g = proto::oldstyle_greeting(MIB, 1);
        g[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        s.write_all(&g).unwrap();
        drain_until_closed(&mut s);
    });
    assert_fails_with(run_read(fake.port, 0, 512), &["greeting"]);
    fake.join();
}

#[test]
fn an_error_reply_fails_with_the_error() {
    let fake = fake_oldstyle(MIB, |req| {
        Some(
            SimpleReply::new(proto::errno::EIO, req.handle)
                .encode()
                .to_vec(),
        )
    });
    assert_fails_with(run_read(fake.port, 4096, 512), &["error 5", "EIO"])
        .stdout(predicate::str::is_empty());
    let req = fake.join();
    assert!(req.magic_ok());
    assert_eq!(
        (req.kind, req.offset, req.length),
        (cmd::READ, 4096, 512),
        "the client asked for what the command line said"
    );

    // The same for write: the payload is sent, then the error is reported.
    let fake = FakeServer::start(|mut s| {
        s.write_all(&proto::oldstyle_greeting(MIB, 1)).unwrap();
        let mut h = [0u8; proto::REQUEST_LEN];
        s.read_exact(&mut h).unwrap();
        let req = Request::decode(&h);
        let mut payload = vec![0u8; req.length as usize];
        s.read_exact(&mut payload).unwrap();
        s.write_all(&SimpleReply::new(proto::errno::ENOSPC, req.handle).encode())
            .unwrap();
        drain_until_closed(&mut s);
        (req, payload)
    });
    assert_fails_with(
        run_write(fake.port, 100, 5, b"hello"),
        &["error 28", "ENOSPC"],
    );
    let (req, payload) = fake.join();
    assert_eq!((req.kind, req.offset, req.length), (cmd::WRITE, 100, 5));
    assert_eq!(payload, b"hello");
}

#[test]
fn a_reply_with_another_handle_or_magic_fails() {
    let fake = fake_oldstyle(MIB, |req| {
        Some(SimpleReply::new(0, req.handle ^ 1).encode().to_vec())
    });
    // No data is printed for a foreign reply.
    assert_fails_with(run_read(fake.port, 0, 16), &["handle mismatch"])
        .stdout(predicate::str::is_empty());
    fake.join();

    let fake = fake_oldstyle(MIB, |req| {
        let mut r = SimpleReply::new(0, req.handle);
        r.magic = 0xdead_beef;
        Some(r.encode().to_vec())
    });
    assert_fails_with(run_read(fake.port, 0, 16), &["bad reply magic"]);
    fake.join();
}

#[test]
fn a_server_that_never_replies_makes_the_client_time_out() {
    // The client waits 10 s for a reply (as the C client does), then gives up.
    let fake = fake_oldstyle(MIB, |_| None);
    let start = Instant::now();
    assert_fails_with(run_read(fake.port, 0, 512), &["timed out"]);
    assert!(
        start.elapsed() >= Duration::from_secs(9),
        "the client waited for the reply timeout, not less"
    );
    fake.join();
}

#[test]
fn write_with_short_stdin_fails_and_the_server_survives() {
    let dir = TempDir::new("cli-short");
    let file = dir.sparse_file("disk.img", MIB);
    let server = Flexnbd::serve(&dir, &file, &[]);
    assert_fails_with(
        run_write(server.port(), 0, 4096, &[0xab; 100]),
        &["100 of 4096"],
    );
    // The server is still serving.
    run_write(server.port(), 0, 3, b"abc").success();
    assert_eq!(read_file_range(&file, 0, 3), b"abc");
    server.assert_no_panic();
}

// ---- usage errors and help ----------------------------------------------

#[test]
fn missing_or_bad_options_are_usage_errors() {
    let dir = TempDir::new("cli-usage");
    let file = dir.sparse_file("disk.img", MIB);
    let f = file.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["read", "--port", "1", "--from", "0", "--size", "1"],
            "both --addr and --port are required.",
        ),
        (
            vec!["write", "--addr", "127.0.0.1", "--from", "0", "--size", "1"],
            "both --addr and --port are required.",
        ),
        (
            vec!["serve", "--file", f],
            "both --addr and --port are required.",
        ),
        (
            vec!["read", "--addr", "127.0.0.1", "--port", "1"],
            "both --from and --size are required.",
        ),
        (
            vec!["serve", "--addr", "127.0.0.1", "--port", "0"],
            "--file is required",
        ),
        (
            vec!["serve", "-l", "127.0.0.1", "-p", "65536", "-f", f],
            "bad port number '65536'",
        ),
        (
            vec![
                "read",
                "-l",
                "127.0.0.1",
                "-p",
                "http",
                "-F",
                "0",
                "-S",
                "1",
            ],
            "bad port number 'http'",
        ),
        (
            vec![
                "serve",
                "-l",
                "127.0.0.1",
                "-p",
                "0",
                "-f",
                f,
                "10.0.0.0/33",
            ],
            "Bad ACL entry '10.0.0.0/33'",
        ),
        (
            vec![
                "serve",
                "-l",
                "127.0.0.1",
                "-p",
                "0",
                "-f",
                f,
                "127.0.0.1",
                "not-an-ip",
            ],
            "Bad ACL entry 'not-an-ip'",
        ),
        (
            vec!["serve", "-l", "not-an-ip", "-p", "0", "-f", f],
            "bad IP address",
        ),
        (
            vec!["read", "-l", "127.0.0.1", "-p", "1", "-F", "ten", "-S", "1"],
            "bad --from 'ten'",
        ),
        (
            vec!["serve", "-l", "127.0.0.1", "-p", "0", "-f", f, "--bogus"],
            "--bogus",
        ),
    ];
    for (args, message) in cases {
        // The usage follows the message on stderr, nothing is on stdout, and
        // nothing starts serving.
        assert_fails_with(flexnbd(&args), &[message, "Usage"])
            .stdout(predicate::str::is_empty())
            .stderr(predicate::str::contains("listening on").not());
    }
}

#[test]
fn a_missing_image_file_is_reported_before_any_port_opens() {
    let dir = TempDir::new("cli-nofile");
    let missing = dir.join("no-such-image.img");
    let port = free_port();
    let run = flexnbd(&[
        "serve",
        "-l",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-f",
        missing.to_str().unwrap(),
        "-v",
    ]);
    // With -v a bind would have logged "listening on": the file is checked
    // first, so no port was opened.
    assert_fails_with(run, &["no-such-image.img"])
        .stderr(predicate::str::contains("listening on").not());
    assert!(!missing.exists(), "the image is never created");
}

#[test]
fn no_mode_prints_usage_on_stderr_and_exits_1() {
    assert_fails_with(flexnbd(&[]), &["Usage", "serve", "read", "write"])
        .stdout(predicate::str::is_empty());

    assert_fails_with(flexnbd(&["nosuchmode"]), &["nosuchmode"]);
}

#[test]
fn help_prints_usage_on_stdout() {
    // help lists the modes.
    flexnbd(&["help"]).success().stdout(
        predicate::str::contains("serve")
            .and(predicate::str::contains("read"))
            .and(predicate::str::contains("write")),
    );

    // serve's help documents the extra greeting flags, and the usage line
    // names the command to type.
    flexnbd(&["help", "serve"]).success().stdout(
        predicate::str::contains("--file")
            .and(predicate::str::contains("--oldstyle-extra-flags"))
            .and(predicate::str::contains("flexnbd serve")),
    );

    flexnbd(&["help", "read"])
        .success()
        .stdout(predicate::str::contains("--from"));

    assert_fails_with(flexnbd(&["help", "nosuchmode"]), &["nosuchmode", "Usage"])
        .stdout(predicate::str::is_empty());

    for args in [
        &["serve", "--help"][..],
        &["serve", "-h"],
        &["write", "--help"],
    ] {
        flexnbd(args)
            .success()
            .stdout(predicate::str::contains("Usage").and(predicate::str::contains("--addr")));
    }
}

#[test]
fn every_subcommand_without_each_required_flag_is_a_usage_error_never_a_panic() {
    let dir = TempDir::new("cli-required");
    let file = dir.sparse_file("disk.img", MIB);
    let f = file.to_str().unwrap();
    let sock = dir.join("no.sock");
    let s = sock.to_str().unwrap();
    // Each subcommand with every flag it requires, as (flag, value) pairs
    // (the value `None` for a switch), plus flags that only change the mode
    // (like --wait) that must not change what is required.
    type Flags<'a> = Vec<(&'a str, Option<&'a str>)>;
    let cases: Vec<(&str, Flags, Vec<&str>)> = vec![
        (
            "serve",
            vec![
                ("--addr", Some("127.0.0.1")),
                ("--port", Some("0")),
                ("--file", Some(f)),
            ],
            vec![],
        ),
        (
            "listen",
            vec![
                ("--addr", Some("127.0.0.1")),
                ("--port", Some("0")),
                ("--file", Some(f)),
            ],
            vec![],
        ),
        (
            "read",
            vec![
                ("--addr", Some("127.0.0.1")),
                ("--port", Some("1")),
                ("--from", Some("0")),
                ("--size", Some("512")),
            ],
            vec![],
        ),
        (
            "write",
            vec![
                ("--addr", Some("127.0.0.1")),
                ("--port", Some("1")),
                ("--from", Some("0")),
                ("--size", Some("512")),
            ],
            vec![],
        ),
        ("status", vec![("--sock", Some(s))], vec![]),
        ("acl", vec![("--sock", Some(s))], vec![]),
        ("break", vec![("--sock", Some(s))], vec![]),
        (
            "mirror-speed",
            vec![("--sock", Some(s)), ("--max-speed", Some("1000"))],
            vec![],
        ),
        (
            "mirror",
            vec![
                ("--sock", Some(s)),
                ("--addr", Some("127.0.0.1")),
                ("--port", Some("1")),
            ],
            vec![],
        ),
        (
            "mirror",
            vec![
                ("--sock", Some(s)),
                ("--addr", Some("127.0.0.1")),
                ("--port", Some("1")),
            ],
            vec!["--wait"],
        ),
        (
            "mirror",
            vec![
                ("--sock", Some(s)),
                ("--addr", Some("127.0.0.1")),
                ("--port", Some("1")),
            ],
            vec!["--wait", "--unlink"],
        ),
        (
            "resolve",
            vec![("--source", Some(f)), ("--dest", Some(f))],
            vec![],
        ),
    ];
    let mut checked = 0;
    for (mode, required, extra) in &cases {
        for left_out in 0..required.len() {
            let mut args = vec![*mode];
            for (i, (flag, value)) in required.iter().enumerate() {
                if i != left_out {
                    args.push(flag);
                    args.extend(value.iter());
                }
            }
            args.extend(extra.iter());
            // A usage error, not a panic: the message names the missing
            // flag, the usage follows it on stderr, nothing is on stdout.
            let run = flexnbd(&args).stderr(predicate::str::contains("panicked").not());
            assert_fails_with(run, &[required[left_out].0, "Usage"])
                .stdout(predicate::str::is_empty());
            checked += 1;
        }
    }
    assert_eq!(
        checked, 30,
        "every required flag of every case was left out once"
    );
}

/// Run only by `the_callers_flexnbd_variables_never_reach_spawned_servers`,
/// in a child test process whose environment holds a fault plan.
#[test]
#[ignore = "a probe run by another test in a prepared environment"]
fn harness_probe_spawned_servers_see_no_inherited_flexnbd_variables() {
    assert!(
        std::env::var_os("FLEXNBD_FAULTS").is_some(),
        "this probe runs inside a caller's FLEXNBD_FAULTS"
    );
    let dir = TempDir::new("cli-env-probe");
    let file = dir.sparse_file("disk.img", MIB);
    let server = Flexnbd::serve(&dir, &file, &[]);
    let mut c = server.connect();
    let (size, _) = c.oldstyle_greeting();
    assert_eq!(size, MIB, "the greeting arrived: no inherited accept fault");
    assert!(
        !server.log().contains("fault plan active"),
        "the server inherited a fault plan:\n{}",
        server.log()
    );
    // No line of the environment a tool sees is a FLEXNBD_ variable.
    let inherited = predicate::function(|env: &str| env.lines().any(|l| l.starts_with("FLEXNBD_")));
    assert_tool("/usr/bin/env", &[], WAIT).stdout(inherited.not());
}

#[test]
fn the_callers_flexnbd_variables_never_reach_spawned_servers() {
    let me = std::env::current_exe().unwrap();
    // The probe passed in an environment with FLEXNBD_FAULTS set.
    assert_tool(
        "/usr/bin/env",
        &[
            "FLEXNBD_FAULTS=server.accept=close",
            "FLEXNBD_KILLSWITCH_SECS=1",
            me.to_str().unwrap(),
            "--exact",
            "cli::harness_probe_spawned_servers_see_no_inherited_flexnbd_variables",
            "--ignored",
            "--test-threads=1",
        ],
        Duration::from_secs(60),
    )
    .success()
    .stdout(predicate::str::contains("1 passed"));
}

#[test]
fn harness_one_shot_runs_end_at_their_limit() {
    // A hung tool must fail its test at the limit, not hang the suite.
    let start = Instant::now();
    let hung = std::panic::catch_unwind(|| run_tool("sleep", &["60"], Duration::from_secs(1)))
        .expect_err("a run past its limit fails the test");
    let message = hung.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("did not finish within 1s"), "{message}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    // A tool that exits on its own keeps its status and output.
    assert_tool("sh", &["-c", "echo out; echo err >&2; exit 3"], WAIT)
        .code(3)
        .stdout("out\n")
        .stderr("err\n");
}
