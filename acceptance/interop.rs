//! Migration interoperability with the C flexnbd, and the fake peers of the
//! C acceptance suite (its `tests/acceptance/fakes`) that concern migration.
//!
//! Simulated, with the scripted peers of `fakes.rs` (std + the wire codec
//! only):
//! * a C flexnbd SOURCE (oldstyle, sequential WRITEs with the `.MIRROR.`
//!   handle, no ENTRUST, then DISCONNECT) migrating into our `listen`;
//! * a C flexnbd DESTINATION (oldstyle greeting, flags 13 = no
//!   WRITE_ZEROES, every WRITE stored in memory and answered 0, ENTRUST
//!   answered EINVAL, FLUSH answered 0) receiving from our `serve` +
//!   `mirror`;
//! * broken destinations (close or hang at each step, error replies, wrong
//!   magics, wrong size, refusal, SIGTERM and `break` sent to the source);
//! * broken sources and stray clients of our `listen` (close at each step,
//!   a second connection, a banned address, SIGTERM, out-of-range writes,
//!   a bad request magic).
//!
//! What must happen: the C source's migration completes (listener exits 0,
//! marker removed, data in place); our source migrates the whole image into
//! the C destination (holes as zero-filled WRITEs) and ends with ENTRUST,
//! FLUSH, DISCONNECT, exiting 0; every failure after `Mirror started` makes
//! the source reconnect, every first-attempt failure is reported with the
//! C message and never retried; the listener survives every broken sender
//! (a later proper migration completes), exits 1 on SIGTERM and 0 only
//! after a valid DISCONNECT.

use std::fs;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::fakes::*;
use crate::harness::*;
use flexnbd::proto::{self, cmd, errno};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// The image size of most tests.
const SIZE: u64 = MIB;
/// How long a `mirror` command may take (first attempt: 15 s connect + 5 s
/// greeting at most).
const MIRROR_LIMIT: Duration = Duration::from_secs(30);
/// Bound for "the source reconnects": retry delay 1 s plus slack.
const RECONNECT: Duration = Duration::from_secs(5);

/// Seconds the hang_after_write source waits for progress.
const REQUEST_LIMIT_SECS: u64 = 2;

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A `serve` source with a control socket. `server` is declared first so it
/// is killed (and its log shown) before the directory goes.
pub(crate) struct Source {
    pub server: Flexnbd,
    pub sock: PathBuf,
    pub file: PathBuf,
    pub dir: TempDir,
}

pub(crate) fn source(tag: &str, size: u64, env: &[(&str, &str)]) -> Source {
    let dir = TempDir::new(tag);
    let file = dir.pattern_file("src.img", size, 7);
    source_in(dir, file, env)
}

pub(crate) fn source_in(dir: TempDir, file: PathBuf, env: &[(&str, &str)]) -> Source {
    let sock = dir.join("src.sock");
    let args = server_args("serve", &file, Some(&sock), &[]);
    let server = if env.is_empty() {
        Flexnbd::spawn(&dir, &args)
    } else {
        Flexnbd::spawn_with_env(&dir, &args, env)
    };
    wait_for("the source's control socket", WAIT, || {
        UnixStream::connect(&sock).ok().map(|_| ())
    });
    Source {
        server,
        sock,
        file,
        dir,
    }
}

/// `flexnbd mirror -s SOCK -l 127.0.0.1 -p PORT [-u]`.
pub(crate) fn mirror(sock: &Path, port: u16, unlink: bool) -> Output {
    run_mirror(sock, port, if unlink { &["-u"] } else { &[] }, MIRROR_LIMIT)
}

pub(crate) fn assert_mirror_started(o: &Output) {
    assert!(
        o.status.code() == Some(0) && stdout(o).contains("Mirror started"),
        "mirror should have started: {}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

fn assert_mirror_failed(o: &Output, message: &str) {
    assert_eq!(
        o.status.code(),
        Some(1),
        "mirror exit code; stdout: {} stderr: {}",
        stdout(o),
        stderr(o)
    );
    assert!(
        stderr(o).contains(message),
        "mirror should say {message:?} on stderr; stdout: {} stderr: {}",
        stdout(o),
        stderr(o)
    );
}

/// `flexnbd listen -l 127.0.0.1 -p 0 -f FILE -v [ACL...]`.
pub(crate) fn listen(dir: &TempDir, file: &Path, acl: &[&str]) -> Flexnbd {
    let mut args: Vec<String> = ["listen", "-l", "127.0.0.1", "-p", "0", "-f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(file.display().to_string());
    args.push("-v".into());
    args.extend(acl.iter().map(|s| s.to_string()));
    Flexnbd::spawn(dir, &args)
}

/// A listener on a sparse `SIZE` image.
fn destination(tag: &str) -> (TempDir, PathBuf, Flexnbd) {
    let dir = TempDir::new(tag);
    let file = dir.sparse_file("dest.img", SIZE);
    let server = listen(&dir, &file, &[]);
    (dir, file, server)
}

pub(crate) fn exit_code(server: &mut Flexnbd) -> Option<i32> {
    server.wait_exit().code()
}

/// A sender that finishes the migration properly on an already greeted
/// connection: one WRITE, then DISCONNECT; the listener must exit 0 with
/// the marker gone and the data in place.
fn finish_migration(
    mut s: FakeSource,
    server: &mut Flexnbd,
    file: &Path,
    offset: u64,
    data: &[u8],
) {
    let r = s.write_and_reply(MIRROR_HANDLE, offset, data);
    assert_eq!(
        (r.magic, r.error, r.handle),
        (proto::SIMPLE_REPLY_MAGIC, 0, MIRROR_HANDLE),
        "write reply"
    );
    s.disconnect(0x4449_5343);
    assert_eq!(exit_code(server), Some(0), "listener exit after DISCONNECT");
    assert!(
        !marker_path(file).exists(),
        "marker removed after DISCONNECT"
    );
    assert_eq!(read_file_range(file, offset, data.len()), data);
}

// ---------------------------------------------------------------------------
// (a) A C source into our listen.

#[test]
fn c_source_writes_then_disconnect_without_entrust_causes_listener_exit_0_with_data_and_no_marker()
{
    let dir = TempDir::new("interop-csrc");
    // Garbage first, so the zero-filled writes must really land.
    let file = dir.pattern_file("dest.img", SIZE, 9);
    let mut server = listen(&dir, &file, &[]);
    assert!(marker_path(&file).exists(), "marker while receiving");
    let mut expected = pattern(SIZE as usize, 3);
    expected[(SIZE / 2) as usize..].fill(0);

    let mut s = FakeSource::connect(server.addr);
    let (size, _flags) = s.read_greeting();
    assert_eq!(size, SIZE);
    // The C sweep: one WRITE at a time, each answered before the next.
    let chunk = 128 * KIB as usize;
    for (i, piece) in expected.chunks(chunk).enumerate() {
        let offset = (i * chunk) as u64;
        let r = s.write_and_reply(MIRROR_HANDLE, offset, piece);
        assert_eq!(
            (r.magic, r.error, r.handle),
            (proto::SIMPLE_REPLY_MAGIC, 0, MIRROR_HANDLE),
            "reply to the write at {offset}"
        );
    }
    s.disconnect(0x1234_5678_9abc_def0);
    assert_eq!(exit_code(&mut server), Some(0), "listener exit status");
    assert!(!marker_path(&file).exists(), "the marker must be removed");
    assert!(
        fs::read(&file).unwrap() == expected,
        "the destination image must equal what the C source sent"
    );
    server.assert_no_panic();
}

// ---------------------------------------------------------------------------
// (b) Our source into a C destination.

#[test]
fn c_destination_without_write_zeroes_or_entrust_causes_full_zero_filled_copy_then_entrust_flush_disconnect(
) {
    let dir = TempDir::new("interop-cdest");
    let size = 4 * MIB;
    let file = dir.sparse_file("src.img", size);
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&pattern(300_000, 1), 0).unwrap();
        f.write_all_at(&pattern(4096, 2), 3 * MIB).unwrap();
    }
    let expected = fs::read(&file).unwrap();
    let mut src = source_in(dir, file, &[]);
    let dest = FakeDest::bind();
    let d = dest.try_clone();
    let script = in_background(move || {
        let mut c = d.expect_connection(WAIT);
        serve_c_destination(&mut c, size, 0xa5)
    });
    let out = mirror(&src.sock, dest.port(), true);
    assert_mirror_started(&out);
    let run = script.join_within(WAIT);
    assert_eq!(exit_code(&mut src.server), Some(0), "source exit status");
    assert!(!src.file.exists(), "--unlink removes the source image");
    assert!(run.disconnected, "the destination must receive DISCONNECT");
    assert!(
        run.image == expected,
        "the C destination must hold the whole image, holes as zeros"
    );
    let kinds = run.kinds();
    assert!(
        kinds
            .iter()
            .all(|k| matches!(*k, cmd::WRITE | cmd::FLUSH | cmd::ENTRUST | cmd::DISC)),
        "only WRITE/FLUSH/ENTRUST/DISCONNECT may reach a destination without WRITE_ZEROES: {kinds:?}"
    );
    assert!(
        kinds.ends_with(&[cmd::ENTRUST, cmd::FLUSH, cmd::DISC]),
        "the migration must end ENTRUST, FLUSH, DISCONNECT; got the tail {:?}",
        &kinds[kinds.len().saturating_sub(5)..]
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == cmd::ENTRUST).count(),
        1,
        "one ENTRUST"
    );
    // ENTRUST follows the writes without waiting for their replies, and
    // says how many went before it: 1 + the count modulo the export size,
    // in range, so the C destination answers EINVAL rather than ENOSPC.
    let entrust = run.requests[kinds.len() - 3];
    let writes = kinds[..kinds.len() - 3]
        .iter()
        .filter(|k| **k == cmd::WRITE)
        .count() as u64;
    assert_eq!(
        (entrust.offset, entrust.length),
        (1 + writes % size, 0),
        "ENTRUST fields"
    );
    assert_eq!(entrust.kind, 0xffff, "ENTRUST is type 0xffff");
    // Every byte was covered by some write.
    let mut covered = vec![false; size as usize];
    for r in run.requests.iter().filter(|r| r.kind == cmd::WRITE) {
        covered[r.offset as usize..(r.offset + u64::from(r.length)) as usize].fill(true);
    }
    assert!(covered.iter().all(|c| *c), "some bytes were never written");
    src.server.assert_no_panic();
}

// ---------------------------------------------------------------------------
// (c) Destination fakes against our source.

/// Runs `mirror` against a fake destination whose first connection runs
/// `first`; returns the mirror output, the fake, and `first`'s result.
fn against_fake<T: Send + 'static>(
    src: &Source,
    first: impl FnOnce(FakeConn) -> T + Send + 'static,
) -> (Output, FakeDest, T) {
    let dest = FakeDest::bind();
    let d = dest.try_clone();
    let script = in_background(move || first(d.expect_connection(WAIT)));
    let out = mirror(&src.sock, dest.port(), false);
    let result = script.join_within(WAIT);
    (out, dest, result)
}

/// The source connects again within `RECONNECT` and gets through a fresh
/// greeting to a fresh first WRITE (a full restart).
fn assert_reconnects_from_scratch(dest: &FakeDest) {
    let mut c = dest
        .accept_within(RECONNECT)
        .expect("the source must reconnect after a failure past `Mirror started`");
    c.send_c_greeting(SIZE);
    let seen = c.read_seen().expect("a request after the new greeting");
    assert_eq!(
        (seen.request.kind, seen.request.offset),
        (cmd::WRITE, 0),
        "the new attempt restarts the copy from offset 0"
    );
}

#[test]
fn dest_close_after_hello_causes_reconnect() {
    let src = source("fake-close-hello", SIZE, &[]);
    let (out, dest, ()) = against_fake(&src, |mut c| {
        c.send_c_greeting(SIZE);
    });
    assert_mirror_started(&out);
    assert_reconnects_from_scratch(&dest);
}

#[test]
fn dest_close_after_write_header_causes_reconnect() {
    let src = source("fake-close-write", SIZE, &[]);
    let (out, dest, ()) = against_fake(&src, |mut c| {
        c.send_c_greeting(SIZE);
        let r = c.read_request().expect("a request");
        assert_eq!(r.kind, cmd::WRITE);
    });
    assert_mirror_started(&out);
    assert_reconnects_from_scratch(&dest);
}

#[test]
fn dest_error_on_write_causes_reconnect() {
    let src = source("fake-error-write", SIZE, &[]);
    let (out, dest, conn) = against_fake(&src, |mut c| {
        c.send_c_greeting(SIZE);
        let seen = c.read_seen().expect("a write");
        assert_eq!(seen.request.kind, cmd::WRITE);
        c.reply(1, seen.request.handle);
        c // kept open: the source must give up on its own
    });
    assert_mirror_started(&out);
    assert_reconnects_from_scratch(&dest);
    drop(conn);
    assert!(
        src.server.log().contains("error 1"),
        "the source log should name the error reply"
    );
}

#[test]
fn dest_write_wrong_magic_causes_reconnect() {
    let src = source("fake-wrong-reply-magic", SIZE, &[]);
    let (out, dest, conn) = against_fake(&src, |mut c| {
        c.send_c_greeting(SIZE);
        let seen = c.read_seen().expect("a write");
        c.reply_with_magic(0xdead_beef, 0, seen.request.handle);
        c
    });
    assert_mirror_started(&out);
    assert_reconnects_from_scratch(&dest);
    drop(conn);
    assert!(
        src.server.log().contains("bad reply magic"),
        "the source log should name the bad magic"
    );
}

#[test]
fn dest_hang_after_write_causes_reconnect_within_request_limit() {
    let limit = REQUEST_LIMIT_SECS.to_string();
    let src = source(
        "fake-hang-write",
        SIZE,
        &[("FLEXNBD_MS_REQUEST_LIMIT_SECS", &limit)],
    );
    let (out, dest, (conn, header_at)) = against_fake(&src, |mut c| {
        c.send_c_greeting(SIZE);
        c.read_request().expect("a request");
        let at = Instant::now();
        (c, at) // silent from here on, but open
    });
    assert_mirror_started(&out);
    let bound = Duration::from_secs(REQUEST_LIMIT_SECS + 3);
    let c = dest
        .accept_within(bound.saturating_sub(header_at.elapsed()))
        .expect("the source must reconnect within the request limit + 3 s");
    let took = header_at.elapsed();
    assert!(
        took >= Duration::from_secs(REQUEST_LIMIT_SECS) - Duration::from_millis(200),
        "reconnected after {took:?}, before the request limit expired"
    );
    drop((c, conn));
    assert!(
        src.server.log().contains("request timeout"),
        "the source log should say the request timed out"
    );
}

#[test]
fn dest_hang_after_connect_causes_no_hello_failure_and_no_reconnect() {
    let src = source("fake-hang-connect", SIZE, &[]);
    let started = Instant::now();
    let (out, dest, closed) = against_fake(&src, |mut c| {
        // Say nothing; the source must give up after 5 s and close.
        c.sees_eof_within(Duration::from_secs(8))
    });
    assert_mirror_failed(&out, "Remote server failed to respond");
    assert!(
        started.elapsed() >= Duration::from_millis(4500),
        "gave up after {:?}, before the 5 s greeting limit",
        started.elapsed()
    );
    assert!(closed, "the source must close the silent connection");
    // A deliberate wait: nothing may reconnect during it.
    assert_eq!(dest.connections_during(Duration::from_secs(2)), 0);
}

#[test]
fn dest_hello_wrong_magic_causes_rejected_and_no_reconnect() {
    let src = source("fake-hello-magic", SIZE, &[]);
    let (out, dest, ()) = against_fake(&src, |mut c| {
        c.send(&wrong_magic_greeting(SIZE));
        // Keep the connection until the source has judged the greeting.
        c.sees_eof_within(Duration::from_secs(5));
    });
    assert_mirror_failed(&out, "Mirror was rejected");
    // A deliberate wait: nothing may reconnect during it.
    assert_eq!(dest.connections_during(Duration::from_secs(2)), 0);
}

#[test]
fn dest_hello_with_a_bad_magic_is_read_whole_then_closed_cleanly_with_a_clear_error() {
    // The C source reads all 152 bytes before judging them. Closing after
    // only part of them would leave the rest unread, and the destination
    // would see a reset instead of a clean close.
    let mut bad_password = c_greeting(SIZE);
    bad_password[0..8].copy_from_slice(b"NBDMAGIX");
    let cases = [
        (
            wrong_magic_greeting(SIZE),
            "expected 0x0000420281861253 (oldstyle) or 0x49484156454f5054 (newstyle), got 0x0123456789abcdef",
        ),
        (
            bad_password,
            "expected NBDMAGIC (0x4e42444d41474943), got 0x4e42444d41474958",
        ),
    ];
    for (greeting, message) in cases {
        let src = source("fake-hello-magic-whole", SIZE, &[]);
        let (out, _dest, ending) = against_fake(&src, move |mut c| {
            c.send(&greeting);
            c.ending_within(WAIT)
        });
        assert_mirror_failed(&out, "Mirror was rejected");
        assert_eq!(
            ending,
            Ending::Clean,
            "the source must take the whole greeting and close cleanly (a read returning 0), not reset the connection"
        );
        src.server.wait_log(&format!(
            "rejected us: bad greeting from the server: bad greeting magic: {message}"
        ));
    }
}

#[test]
fn dest_hello_wrong_size_causes_size_mismatch_close_and_no_reconnect() {
    let src = source("fake-hello-size", SIZE, &[]);
    let (out, dest, closed) = against_fake(&src, |mut c| {
        c.send_c_greeting(SIZE + 4096);
        c.sees_eof_within(Duration::from_secs(2))
    });
    assert_mirror_failed(&out, "Remote size does not match local size");
    assert!(closed, "the source must close its socket within 2 s");
    // A deliberate wait: nothing may reconnect during it.
    assert_eq!(dest.connections_during(Duration::from_secs(2)), 0);
}

#[test]
fn dest_reject_acl_close_at_once_causes_rejected_and_no_reconnect() {
    let src = source("fake-reject-acl", SIZE, &[]);
    let (out, dest, ()) = against_fake(&src, drop);
    assert_mirror_failed(&out, "Mirror was rejected");
    // A deliberate wait: nothing may reconnect during it.
    assert_eq!(dest.connections_during(Duration::from_secs(2)), 0);
}

#[test]
fn dest_sigterm_after_hello_causes_source_exit_1() {
    let mut src = source("fake-sigterm-hello", SIZE, &[]);
    let (out, _dest, conn) = against_fake(&src, |mut c| {
        c.send_c_greeting(SIZE);
        c.read_request().expect("a request");
        c
    });
    assert_mirror_started(&out);
    src.server.signal(libc::SIGTERM);
    assert_eq!(
        exit_code(&mut src.server),
        Some(1),
        "SIGTERM during a migration"
    );
    assert!(src.file.exists(), "the source image stays");
    drop(conn);
}

#[test]
fn dest_break_after_hello_causes_mirror_stopped_and_no_reconnect() {
    let mut src = source("fake-break-hello", SIZE, &[]);
    let (out, dest, mut conn) = against_fake(&src, |mut c| {
        c.send_c_greeting(SIZE);
        c.read_request().expect("a request");
        c
    });
    assert_mirror_started(&out);
    // As the C fake does: `break\n`, then half-close.
    let mut ctl = UnixStream::connect(&src.sock).unwrap();
    ctl.set_read_timeout(Some(WAIT)).unwrap();
    ctl.write_all(b"break\n").unwrap();
    ctl.shutdown(Shutdown::Write).unwrap();
    let mut response = String::new();
    ctl.read_to_string(&mut response).unwrap();
    assert_eq!(response, "0: mirror stopped\n");
    assert!(
        conn.sees_eof_within(Duration::from_secs(2)),
        "break must close the mirror connection"
    );
    // A deliberate wait: nothing may reconnect during it.
    assert_eq!(dest.connections_during(Duration::from_secs(3)), 0);
    assert!(src.server.is_running(), "break leaves the source serving");
}

/// Sends `break\n` on the control socket, half-closes, returns the response.
fn send_break(sock: &Path) -> String {
    let mut ctl = UnixStream::connect(sock).unwrap();
    ctl.set_read_timeout(Some(WAIT)).unwrap();
    ctl.write_all(b"break\n").unwrap();
    ctl.shutdown(Shutdown::Write).unwrap();
    let mut response = String::new();
    ctl.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn dest_break_after_hello_as_the_c_fake_does_causes_mirror_stopped_and_no_reconnect() {
    // The C fake's exact script: accept; SIGSTOP the source; `break` on the
    // control socket (half-closed); the greeting; SIGCONT. The break and the
    // greeting then reach the source together.
    let mut src = source("fake-break-c-order", SIZE, &[]);
    let dest = FakeDest::bind();
    let sock = src.sock.clone();
    let port = dest.port();
    let cli = in_background(move || mirror(&sock, port, false));
    let mut conn = dest.expect_connection(WAIT);
    src.server.signal(libc::SIGSTOP);
    wait_for("the source to be stopped", WAIT, || {
        process_state(src.server.server_pid).filter(|&state| state == 'T')
    });
    // A UNIX socket queues the connection and the request without the
    // (stopped) source's help: once these calls return, `break` is waiting
    // in the socket, ahead of the greeting.
    let mut ctl = UnixStream::connect(&src.sock).unwrap();
    ctl.set_read_timeout(Some(WAIT)).unwrap();
    ctl.write_all(b"break\n").unwrap();
    ctl.shutdown(Shutdown::Write).unwrap();
    conn.send_c_greeting(SIZE);
    src.server.signal(libc::SIGCONT);
    let mut response = String::new();
    ctl.read_to_string(&mut response).unwrap();
    assert_eq!(response, "0: mirror stopped\n");
    let out = cli.join_within(MIRROR_LIMIT);
    assert!(
        !stderr(&out).contains("failed to connect"),
        "the connection succeeded; `mirror` must not say it failed to connect: {}",
        stderr(&out)
    );
    assert!(
        conn.sees_eof_within(Duration::from_secs(2)),
        "break must close the mirror connection"
    );
    // A deliberate wait: nothing may reconnect during it.
    assert_eq!(dest.connections_during(Duration::from_secs(3)), 0);
    assert!(src.server.is_running(), "break leaves the source serving");
}

/// The state letter of process `pid` (`T` once SIGSTOP has stopped it), from
/// /proc/PID/stat; `None` if it cannot be read.
fn process_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ...`: comm may hold spaces and parentheses.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

#[test]
fn break_while_waiting_for_the_greeting_causes_mirror_stopped_and_abandoned_response() {
    let mut src = source("fake-break-no-hello", SIZE, &[]);
    let dest = FakeDest::bind();
    let sock = src.sock.clone();
    let port = dest.port();
    let cli = in_background(move || mirror(&sock, port, false));
    let mut conn = dest.expect_connection(WAIT);
    // The source is now waiting for a greeting that never comes.
    assert_eq!(send_break(&src.sock), "0: mirror stopped\n");
    let out = cli.join_within(MIRROR_LIMIT);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an abandoned mirror did not start"
    );
    assert!(
        stderr(&out).contains("Mirroring abandoned"),
        "`mirror` should say the mirror was abandoned (the C response), not {:?}",
        stderr(&out)
    );
    assert!(conn.sees_eof_within(Duration::from_secs(2)));
    // A deliberate wait: nothing may reconnect during it.
    assert_eq!(dest.connections_during(Duration::from_secs(2)), 0);
    assert!(src.server.is_running());
}

// ---------------------------------------------------------------------------
// (c) Source fakes against our listen.

#[test]
fn source_close_after_connect_causes_listener_to_accept_the_next_sender() {
    let (_dir, file, mut server) = destination("fake-src-close-connect");
    drop(FakeSource::connect(server.addr));
    let (s, size) = connect_with_greeting(server.addr, RECONNECT);
    assert_eq!(size, SIZE);
    assert!(marker_path(&file).exists(), "still receiving");
    finish_migration(s, &mut server, &file, 4096, b"12345678");
}

#[test]
fn source_close_after_hello_causes_listener_to_accept_the_next_sender() {
    let (_dir, file, mut server) = destination("fake-src-close-hello");
    let mut s = FakeSource::connect(server.addr);
    assert_eq!(s.read_greeting().0, SIZE);
    drop(s);
    let (s, _) = connect_with_greeting(server.addr, RECONNECT);
    assert!(server.is_running());
    finish_migration(s, &mut server, &file, 0, b"12345678");
}

#[test]
fn source_close_after_write_header_causes_no_write_and_listener_accepts_the_next_sender() {
    let (_dir, file, mut server) = destination("fake-src-close-write");
    let mut s = FakeSource::connect(server.addr);
    s.read_greeting();
    // As the C fake does: with the listener stopped, so the header and the
    // close arrive together.
    server.signal(libc::SIGSTOP);
    s.request(cmd::WRITE, MIRROR_HANDLE, 0, 8);
    drop(s); // before the 8 bytes of data
    server.signal(libc::SIGCONT);
    let (s, _) = connect_with_greeting(server.addr, RECONNECT);
    assert!(server.is_running());
    assert!(marker_path(&file).exists(), "still receiving");
    assert_eq!(
        read_file_range(&file, 0, 8),
        vec![0u8; 8],
        "a write without its data must not land"
    );
    finish_migration(s, &mut server, &file, 8192, b"abcdefgh");
}

#[test]
fn source_close_after_write_data_causes_listener_to_accept_the_next_sender() {
    let (_dir, file, mut server) = destination("fake-src-close-data");
    let mut s = FakeSource::connect(server.addr);
    s.read_greeting();
    // As the C fake does: with the listener stopped.
    server.signal(libc::SIGSTOP);
    s.write(MIRROR_HANDLE, 0, b"12345678");
    drop(s); // without reading the reply
    server.signal(libc::SIGCONT);
    let (s, _) = connect_with_greeting(server.addr, RECONNECT);
    assert!(server.is_running());
    assert!(marker_path(&file).exists(), "still receiving");
    finish_migration(s, &mut server, &file, 0, b"87654321");
}

#[test]
fn source_close_mid_read_causes_listener_to_survive_and_accept_the_next_sender() {
    let (_dir, file, mut server) = destination("fake-src-close-mid-read");
    let mut s = FakeSource::connect(server.addr);
    // A READ without reading the greeting first; read 4 bytes, close.
    s.request(cmd::READ, 0x5245_4144, 0, 8);
    s.read_exact(4);
    drop(s);
    let (s, _) = connect_with_greeting(server.addr, RECONNECT);
    assert!(server.is_running());
    finish_migration(s, &mut server, &file, 0, b"12345678");
}

#[test]
fn source_connect_during_hello_causes_second_connection_closed_without_greeting() {
    let (_dir, file, mut server) = destination("fake-src-during-hello");
    let mut first = FakeSource::connect(server.addr);
    first.read_greeting();
    let mut second = FakeSource::connect(server.addr);
    let (bytes, eof) = second.read_until_eof(Duration::from_secs(2));
    assert!(eof, "the second connection must be closed at once");
    assert!(
        bytes.is_empty(),
        "the second connection must get no greeting, got {} bytes",
        bytes.len()
    );
    drop(second);
    // The first sender still holds the slot and completes.
    finish_migration(first, &mut server, &file, 0, b"12345678");
}

#[test]
fn source_connect_from_banned_ip_causes_close_without_greeting() {
    let dir = TempDir::new("fake-src-banned");
    let file = dir.sparse_file("dest.img", SIZE);
    let mut server = listen(&dir, &file, &["127.0.0.1"]);
    let mut banned = FakeSource::connect_from("127.0.0.6:0".parse().unwrap(), server.addr);
    let (bytes, eof) = banned.read_until_eof(Duration::from_secs(2));
    assert!(eof, "a banned peer must see EOF within 2 s");
    assert!(bytes.is_empty(), "a banned peer must get no greeting");
    drop(banned);
    assert!(server.is_running());
    // An allowed sender still migrates.
    let (s, _) = connect_with_greeting(server.addr, RECONNECT);
    finish_migration(s, &mut server, &file, 0, b"12345678");
}

#[test]
fn source_sigterm_after_hello_causes_listener_exit_1_with_marker_kept() {
    let (_dir, file, mut server) = destination("fake-src-sigterm");
    let mut s = FakeSource::connect(server.addr);
    s.read_greeting();
    server.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut server), Some(1), "SIGTERM before DISCONNECT");
    assert!(
        marker_path(&file).exists(),
        "an unfinished migration keeps its marker"
    );
}

#[test]
fn source_successful_transfer_causes_listener_exit_0() {
    let (_dir, file, mut server) = destination("fake-src-success");
    let mut s = FakeSource::connect(server.addr);
    assert_eq!(s.read_greeting().0, SIZE);
    finish_migration(s, &mut server, &file, 0, b"12345678");
    server.assert_no_panic();
}

#[test]
fn source_write_out_of_range_causes_enospc_then_a_valid_write_succeeds() {
    let (_dir, file, mut server) = destination("fake-src-out-of-range");
    let mut s = FakeSource::connect(server.addr);
    s.read_greeting();
    let r = s.write_and_reply(0x0bad, SIZE + 1, &[0x55; 32]);
    assert_eq!(
        (r.magic, r.error, r.handle),
        (proto::SIMPLE_REPLY_MAGIC, errno::ENOSPC, 0x0bad),
        "out-of-range write"
    );
    let data = pattern(32, 4);
    let r = s.write_and_reply(0x600d, 0, &data);
    assert_eq!(
        (r.magic, r.error, r.handle),
        (proto::SIMPLE_REPLY_MAGIC, 0, 0x600d),
        "the following valid write"
    );
    assert_eq!(read_file_range(&file, 0, 32), data);
    assert!(server.is_running());
}

#[test]
fn source_bad_request_magic_causes_ebadmsg_close_and_no_completion() {
    let (_dir, file, mut server) = destination("fake-src-bad-magic");
    let mut s = FakeSource::connect(server.addr);
    s.read_greeting();
    let mut bad = proto::Request::new(cmd::DISC, 0, 0xbad_0bad, 0, 0);
    bad.magic = 0x1234_5678;
    s.send(&bad.encode());
    let r = s.read_reply();
    assert_eq!(
        (r.magic, r.error, r.handle),
        (proto::SIMPLE_REPLY_MAGIC, errno::EBADMSG, 0xbad_0bad),
        "bad-magic reply"
    );
    assert!(
        s.sees_eof_within(Duration::from_secs(2)),
        "the connection must close after EBADMSG"
    );
    // The listener keeps listening: a later proper migration completes.
    let (s, _) = connect_with_greeting(server.addr, RECONNECT);
    assert!(server.is_running(), "a bad magic must not end the listener");
    assert!(marker_path(&file).exists(), "a bad magic completes nothing");
    finish_migration(s, &mut server, &file, 0, b"12345678");
}

// ---------------------------------------------------------------------------
// The entrust fakes of the C suite ("unused" there, as it had dropped
// entrust; meaningful again now that the hand-off has it).

/// A source that sends data and ENTRUST, then (after reading the reply when
/// `read_reply`) closes without DISCONNECT: the destination must record
/// `entrusted`, keep listening, and take a fresh sender that completes.
fn entrust_then_close(read_reply: bool) {
    let (_dir, file, mut server) = destination("ns-entrust-close");
    let (mut s, size) = connect_with_greeting(server.addr, WAIT);
    assert_eq!(size, SIZE);
    let data = pattern(4096, 31);
    let r = s.write_and_reply(MIRROR_HANDLE, 0, &data);
    assert_eq!(r.error, 0);
    s.request(cmd::ENTRUST, 77, 0, 0);
    if read_reply {
        let r = s.read_reply();
        assert_eq!(
            (r.error, r.handle),
            (0, 77),
            "entrust is answered once durable"
        );
        assert_eq!(
            marker_state(&file).as_deref(),
            Some("entrusted"),
            "recorded before the reply"
        );
    }
    drop(s);
    wait_for("the marker to say entrusted", WAIT, || {
        (marker_state(&file).as_deref() == Some("entrusted")).then_some(())
    });
    assert!(
        server.is_running(),
        "EOF after entrust is not a completed migration"
    );
    // The source starts again: its first write puts the marker back to
    // `receiving` before the data lands, then it completes.
    let (mut again, _) = connect_with_greeting(server.addr, WAIT);
    let r = again.write_and_reply(MIRROR_HANDLE, 4096, &data);
    assert_eq!(r.error, 0);
    assert_eq!(marker_state(&file).as_deref(), Some("receiving"));
    finish_migration(again, &mut server, &file, 8192, &data);
}

#[test]
fn entrust_after_a_missing_or_failed_change_is_refused_and_the_marker_stays_receiving() {
    // ENTRUST comes right behind the changes, unanswered yet; its offset
    // says how many went before it (1 + the count modulo the size).
    let (_dir, file, mut server) = destination("ns-entrust-count");
    let (mut s, _) = connect_with_greeting(server.addr, WAIT);
    let data = pattern(4096, 5);
    s.write(1, 0, &data);
    s.write(2, 4096, &data);
    // It claims three: one went missing.
    s.request(cmd::ENTRUST, 77, 1 + 3 % SIZE, 0);
    let replies: Vec<(u64, u32)> = (0..3)
        .map(|_| s.read_reply())
        .map(|r| (r.handle, r.error))
        .collect();
    assert_eq!(replies, [(1, 0), (2, 0), (77, proto::errno::EIO)]);
    assert_eq!(marker_state(&file).as_deref(), Some("receiving"));
    assert!(
        server.log().contains("entrust from"),
        "the refusal is logged"
    );
    // The right count is entrusted.
    s.request(cmd::ENTRUST, 78, 1 + 2 % SIZE, 0);
    let r = s.read_reply();
    assert_eq!((r.handle, r.error), (78, 0));
    assert_eq!(marker_state(&file).as_deref(), Some("entrusted"));
    finish_migration(s, &mut server, &file, 8192, &data);

    // A change that failed on the disk: refused even without a count.
    let dir = TempDir::new("ns-entrust-failed");
    let file = dir.sparse_file("dest.img", SIZE);
    let args = server_args("listen", &file, None, &["--faults", "store.write#1=eio"]);
    let server = Flexnbd::spawn(&dir, &args);
    let (mut s, _) = connect_with_greeting(server.addr, WAIT);
    let r = s.write_and_reply(1, 0, &data);
    assert_eq!((r.handle, r.error), (1, proto::errno::EIO));
    server.wait_log("fault fired: store.write#1 -> eio");
    s.request(cmd::ENTRUST, 77, 0, 0);
    let r = s.read_reply();
    assert_eq!((r.handle, r.error), (77, proto::errno::EIO));
    assert_eq!(marker_state(&file).as_deref(), Some("receiving"));
    server.assert_no_panic();
}

#[test]
fn writes_behind_a_checkpoint_are_answered_while_a_real_listen_syncs_it() {
    // A source sends CHECKPOINT and goes on writing without waiting for it:
    // `listen` stores and answers those writes while the checkpoint's sync
    // runs (held up 2 s by the fault), then answers the checkpoint, which
    // holds. Waiting for the sync first left the link idle for all of it.
    let dir = TempDir::new("ns-checkpoint-ahead");
    let file = dir.sparse_file("dest.img", SIZE);
    let args = server_args(
        "listen",
        &file,
        None,
        &["--faults", "store.sync#1=slow(2000)"],
    );
    let mut server = Flexnbd::spawn(&dir, &args);
    let (mut s, _) = connect_with_greeting(server.addr, WAIT);
    let data = pattern(4096, 6);
    let r = s.write_and_reply(1, 0, &data);
    assert_eq!((r.handle, r.error), (1, 0));
    let asked = Instant::now();
    s.request(cmd::CHECKPOINT, 60, 0x5eed, 1);
    s.write(2, 4096, &data);
    server.assert_fired("store.sync#1", "slow(2000)");
    let first = s.read_reply();
    assert_eq!(
        (first.handle, first.error),
        (2, 0),
        "the write behind it first"
    );
    let second = s.read_reply();
    assert_eq!(
        (second.handle, second.error),
        (60, 0),
        "then the checkpoint"
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(1800),
        "the checkpoint's sync was the one held up: answered after {:?}",
        asked.elapsed()
    );
    let marker = std::fs::read_to_string(marker_path(&file)).unwrap();
    assert!(marker.contains("checkpoint=1\n"), "{marker}");
    finish_migration(s, &mut server, &file, 8192, &data);
}

#[test]
fn source_close_after_entrust_causes_an_entrusted_marker_and_a_listener_that_waits() {
    entrust_then_close(false);
}

#[test]
fn source_close_after_entrust_reply_causes_an_entrusted_marker_and_a_listener_that_waits() {
    entrust_then_close(true);
}

#[test]
fn source_hang_after_hello_is_kept_as_the_sender_without_a_timeout() {
    // The C destination dropped its sender timeout (it broke throttled
    // migrations): an idle sender keeps the slot and may carry on later.
    let (_dir, file, mut server) = destination("ns-hang-hello");
    let (s, _) = connect_with_greeting(server.addr, WAIT);
    // Waiting on purpose: an idle sender must not be dropped meanwhile.
    std::thread::sleep(Duration::from_millis(1500));
    let mut other = FakeSource::connect(server.addr);
    assert!(
        other.sees_eof_within(WAIT),
        "the slot is still the idle sender's"
    );
    finish_migration(s, &mut server, &file, 0, &pattern(512, 3));
}

#[test]
fn dest_close_after_entrust_reply_causes_no_retry_past_the_point_of_no_return() {
    // A destination that answers entrust and then vanishes before the
    // DISCONNECT: the source has handed off (unlinked with -u) and must not
    // start again; whether the DISCONNECT write itself failed decides 0 or 1.
    let mut src = source("ns-dest-close-entrust", SIZE, &[]);
    let (out, dest, kinds) = {
        let dest = FakeDest::bind();
        let d = dest.try_clone();
        let script = in_background(move || {
            let mut c = d.expect_connection(WAIT);
            c.send_c_greeting(SIZE);
            let mut kinds = Vec::new();
            while let Some(seen) = c.read_seen() {
                kinds.push(seen.request.kind);
                if seen.request.kind == cmd::ENTRUST {
                    c.reply(0, seen.request.handle);
                    break; // and close
                }
                c.reply(0, seen.request.handle);
            }
            kinds
        });
        let out = mirror(&src.sock, dest.port(), true);
        let kinds = script.join_within(WAIT);
        (out, dest, kinds)
    };
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(kinds.last(), Some(&cmd::ENTRUST));
    let status = src.server.wait_exit();
    assert!(
        matches!(status.code(), Some(0) | Some(1)),
        "the source exits: {status}"
    );
    assert!(!src.file.exists(), "unlinked before the DISCONNECT");
    assert_eq!(
        dest.connections_during(Duration::from_secs(2)),
        0,
        "no retry after the hand-off began"
    );
}
