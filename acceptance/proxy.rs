//! `flexnbd-proxy`, which behaves as the C flexnbd-proxy does, run as the
//! real binary between a raw NBD client and either a real `flexnbd serve`
//! or a scripted fake upstream.
//!
//! Simulated: an upstream that closes in the middle of a request or never
//! answers it, a second client arriving while one is served, oversized
//! requests, out-of-range reads, DISCONNECT, an unreachable upstream at
//! start, signals, and fault plans on proxy steps. What must happen: the
//! request in flight is replayed byte-identically (same handle) on a new
//! upstream connection and its reply reaches the client; one client at a
//! time; 32 MiB is the largest READ/WRITE; error replies come back at once;
//! DISCONNECT ends the session without reaching upstream, whose connection
//! is kept; the read-ahead cache doubles small reads and serves the second
//! half from memory until a write; exit 1 when the upstream is unreachable
//! at start (before listening), exit 0 on SIGTERM/SIGINT/SIGQUIT with the
//! UNIX socket removed. As the original suite did, the proxy tests run both
//! without and with `--cache` (test names ending in `_cached`).

use std::io::{ErrorKind, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flexnbd::proto::{self, cmd, errno, Request, SimpleReply};
use predicates::prelude::*;

use crate::fakes::{in_background, FakeConn, FakeDest, Seen, C_FLAGS};
use crate::harness::{
    assert_tool, ignores_signal, pattern, read_file_range, send_signal, wait_for, Flexnbd,
    RawClient, TempDir, WAIT,
};

const PROXY: &str = env!("CARGO_BIN_EXE_flexnbd-proxy");
const MIB: u64 = 1024 * 1024;
const MAX: u32 = 32 * 1024 * 1024;

/// Runs one scenario without and with `--cache`.
macro_rules! both {
    ($scenario:ident => $plain:ident, $cached:ident) => {
        #[test]
        fn $plain() {
            $scenario(false)
        }
        #[test]
        fn $cached() {
            $scenario(true)
        }
    };
}

/// Starts `flexnbd-proxy -l 127.0.0.1 -p 0 -C UPSTREAM -v [--cache] EXTRA`
/// with `env`, and waits until it listens.
fn proxy(
    dir: &TempDir,
    upstream: SocketAddr,
    cache: bool,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Flexnbd {
    let mut args: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    args.push(PROXY.into());
    for a in ["-l", "127.0.0.1", "-p", "0", "-C"] {
        args.push(a.into());
    }
    args.push(upstream.ip().to_string());
    args.push("-P".into());
    args.push(upstream.port().to_string());
    args.push("-v".into());
    if cache {
        args.push("--cache".into());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    // `env` execs the proxy, so the child's pid is the proxy's.
    Flexnbd::spawn_program(dir, "/usr/bin/env", &args)
}

/// A real upstream: `flexnbd serve` of a pattern file of `size` bytes.
fn real_upstream(dir: &TempDir, size: u64) -> (Flexnbd, std::path::PathBuf) {
    let file = dir.pattern_file("image", size, 7);
    (Flexnbd::serve(dir, &file, &[]), file)
}

fn greeted(addr: SocketAddr) -> (RawClient, u64, u32) {
    let mut c = RawClient::connect(addr);
    let (size, flags) = c.oldstyle_greeting();
    (c, size, flags)
}

/// The bytes of a request as it travels.
fn wire(seen: &Seen) -> Vec<u8> {
    let mut b = seen.request.encode().to_vec();
    b.extend_from_slice(&seen.payload);
    b
}

/// Answers a request on a fake upstream from `image` (READs get
/// `request.length` bytes, WRITEs are stored).
fn answer(conn: &mut FakeConn, seen: &Seen, image: &mut [u8]) {
    let r = seen.request;
    let (at, len) = (r.offset as usize, r.length as usize);
    match r.kind {
        cmd::READ => {
            conn.reply(0, r.handle);
            conn.send(&image[at..at + len]);
        }
        cmd::WRITE => {
            image[at..at + len].copy_from_slice(&seen.payload);
            conn.reply(0, r.handle);
        }
        _ => conn.reply(0, r.handle),
    }
}

fn pass_through(cache: bool) {
    let dir = TempDir::new("proxy-pass");
    let (upstream, file) = real_upstream(&dir, MIB);
    let p = proxy(&dir, upstream.addr, cache, &[], &[]);
    let (mut c, size, flags) = greeted(p.addr);
    let (_direct, up_size, up_flags) = greeted(upstream.addr);
    assert_eq!(
        (size, flags),
        (up_size, up_flags),
        "the upstream's size and flags"
    );
    assert_eq!(size, MIB);
    let data = pattern(4096, 99);
    c.write_ok(8192, &data);
    assert_eq!(
        read_file_range(&file, 8192, 4096),
        data,
        "the write landed upstream"
    );
    for (offset, len) in [
        (0u64, 4096u32),
        (4096, 4096),
        (5000, 100),
        (8192, 4096),
        (MIB - 512, 512),
    ] {
        assert_eq!(
            c.read_ok(offset, len),
            read_file_range(&file, offset, len as usize),
            "read of {len} at {offset}"
        );
    }
    c.request(cmd::FLUSH, 0, 77, 0, 0);
    let r = c.simple_reply();
    assert_eq!(
        (r.magic, r.error, r.handle),
        (proto::SIMPLE_REPLY_MAGIC, 0, 77)
    );
    p.assert_no_panic();
}
both!(pass_through => read_and_write_via_proxy_cause_data_in_upstream_file,
      read_and_write_via_proxy_cause_data_in_upstream_file_cached);

#[test]
fn upstream_greeting_flags_cause_identical_downstream_greeting() {
    let dir = TempDir::new("proxy-flags");
    let dest = FakeDest::bind();
    let d = dest.try_clone();
    let flags = 0x0001_002d_u32; // high bits too: all 32 pass through
    let script = in_background(move || {
        let mut c = d.expect_connection(WAIT);
        c.send(&proto::oldstyle_greeting(123 * 512, flags));
        c.sees_eof_within(WAIT)
    });
    let mut p = proxy(&dir, dest.addr, false, &[], &[]);
    let (_c, size, got) = greeted(p.addr);
    assert_eq!((size, got), (123 * 512, flags));
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait_exit().code(), Some(0));
    assert!(script.join_within(WAIT), "upstream closed at exit");
}

fn replay_after_close(cache: bool) {
    let dir = TempDir::new("proxy-replay");
    let size = MIB;
    let dest = FakeDest::bind();
    let d = dest.try_clone();
    let script = in_background(move || {
        let mut image = pattern(size as usize, 3);
        let greet = |c: &mut FakeConn| c.send(&proto::oldstyle_greeting(size, C_FLAGS));
        // 1: the write arrives whole, then upstream dies without replying.
        let mut c1 = d.expect_connection(WAIT);
        greet(&mut c1);
        let w1 = c1.read_seen().expect("the write");
        drop(c1);
        // 2: the write again; answered. The read arrives, upstream dies.
        let mut c2 = d.expect_connection(WAIT);
        greet(&mut c2);
        let w2 = c2.read_seen().expect("the replayed write");
        answer(&mut c2, &w2, &mut image);
        let r1 = c2.read_seen().expect("the read");
        drop(c2);
        // 3: the read again; answered.
        let mut c3 = d.expect_connection(WAIT);
        greet(&mut c3);
        let r2 = c3.read_seen().expect("the replayed read");
        answer(&mut c3, &r2, &mut image);
        (wire(&w1), wire(&w2), wire(&r1), wire(&r2), image, c3)
    });
    let p = proxy(&dir, dest.addr, cache, &[], &[]);
    let (mut c, _, _) = greeted(p.addr);
    let data = pattern(4096, 5);
    c.write_ok(0, &data);
    let got = c.read_ok(0, 4096);
    let (w1, w2, r1, r2, image, _c3) = script.join_within(WAIT);
    assert_eq!(w1, w2, "the write was replayed byte for byte");
    assert_eq!(r1, r2, "the read was replayed byte for byte");
    assert_eq!(
        &w1[8..16],
        &(0x5752_4954_4500_0000u64).to_be_bytes(),
        "same handle"
    );
    assert_eq!(got, data);
    assert_eq!(&image[..4096], &data[..]);
    let doubled = Request::decode(r1[..28].try_into().unwrap()).length;
    assert_eq!(doubled, if cache { 8192 } else { 4096 });
    p.wait_log("reconnecting to resend");
    p.assert_no_panic();
}
both!(replay_after_close => upstream_close_mid_request_causes_identical_replay_and_reply,
      upstream_close_mid_request_causes_identical_replay_and_reply_cached);

fn replay_after_timeout(cache: bool) {
    let dir = TempDir::new("proxy-timeout");
    let size = MIB;
    let dest = FakeDest::bind();
    let d = dest.try_clone();
    let script = in_background(move || {
        let mut image = pattern(size as usize, 4);
        let mut c1 = d.expect_connection(WAIT);
        c1.send(&proto::oldstyle_greeting(size, C_FLAGS));
        let first = c1.read_seen().expect("the read");
        // Never answered: the proxy must give up on this connection.
        let start = Instant::now();
        let closed = c1.sees_eof_within(WAIT);
        let silent_for = start.elapsed();
        let mut c2 = d.expect_connection(WAIT);
        c2.send(&proto::oldstyle_greeting(size, C_FLAGS));
        let second = c2.read_seen().expect("the replayed read");
        answer(&mut c2, &second, &mut image);
        (closed, silent_for, wire(&first), wire(&second), c2)
    });
    let p = proxy(
        &dir,
        dest.addr,
        cache,
        &[],
        &[("FLEXNBD_UPSTREAM_TIMEOUT", "2")],
    );
    let (mut c, _, _) = greeted(p.addr);
    let got = c.read_ok(4096, 4096);
    let (closed, silent_for, first, second, _c2) = script.join_within(WAIT);
    assert!(closed, "the proxy closed the silent upstream connection");
    assert!(
        silent_for >= Duration::from_millis(1500) && silent_for < Duration::from_secs(10),
        "closed after the 2 s timeout, not {silent_for:?}"
    );
    assert_eq!(first, second, "the read was replayed byte for byte");
    assert_eq!(got, pattern(size as usize, 4)[4096..8192].to_vec());
    p.assert_no_panic();
}
both!(replay_after_timeout => upstream_silence_causes_reconnect_and_resend_after_timeout,
      upstream_silence_causes_reconnect_and_resend_after_timeout_cached);

fn replay_after_write_stall(cache: bool) {
    let dir = TempDir::new("proxy-stall");
    let size = 64 * MIB;
    let dest = FakeDest::bind();
    let d = dest.try_clone();
    let script = in_background(move || {
        let mut c1 = d.expect_connection(WAIT);
        c1.send(&proto::oldstyle_greeting(size, C_FLAGS));
        // Never read: a 32 MiB write (far more than the socket buffers)
        // stalls in the proxy's write phase until the 2 s timeout.
        let mut c2 = d.expect_connection(WAIT);
        c2.send(&proto::oldstyle_greeting(size, C_FLAGS));
        let seen = c2.read_seen().expect("the replayed write");
        c2.reply(0, seen.request.handle);
        let closed = c1.sees_eof_within(WAIT);
        (seen, closed, c2)
    });
    let p = proxy(
        &dir,
        dest.addr,
        cache,
        &[],
        &[("FLEXNBD_UPSTREAM_TIMEOUT", "2")],
    );
    let (mut c, _, _) = greeted(p.addr);
    let data = pattern(MAX as usize, 12);
    let start = Instant::now();
    c.write_ok(MIB, &data);
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "only after the timeout"
    );
    let (seen, closed, _c2) = script.join_within(WAIT);
    assert!(closed, "the stalled connection was closed");
    assert_eq!(
        (seen.request.kind, seen.request.offset, seen.request.length),
        (cmd::WRITE, MIB, MAX)
    );
    assert!(seen.payload == data, "the whole payload was sent again");
    p.wait_log("longer than 2 s");
}
both!(replay_after_write_stall => upstream_not_reading_causes_write_resent_after_timeout,
      upstream_not_reading_causes_write_resent_after_timeout_cached);

fn one_client(cache: bool) {
    let dir = TempDir::new("proxy-one");
    let (upstream, _file) = real_upstream(&dir, MIB);
    let p = proxy(&dir, upstream.addr, cache, &[], &[]);
    let (mut first, _, _) = greeted(p.addr);
    let mut second = RawClient::connect(p.addr);
    // A deliberate 1 s wait: it shows that no greeting comes meanwhile.
    second
        .stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut b = [0u8; 1];
    match second.stream.read(&mut b) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the second client got {other:?} instead of waiting"),
    }
    first.read_ok(0, 512);
    drop(first);
    second.stream.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(second.oldstyle_greeting().0, MIB);
    second.read_ok(0, 512);
}
both!(one_client => second_client_causes_no_greeting_until_first_leaves,
      second_client_causes_no_greeting_until_first_leaves_cached);

fn size_limit(cache: bool) {
    let dir = TempDir::new("proxy-32m");
    let file = dir.sparse_file("image", 40 * MIB);
    let upstream = Flexnbd::serve(&dir, &file, &[]);
    let p = proxy(&dir, upstream.addr, cache, &[], &[]);
    let (mut c, _, _) = greeted(p.addr);
    let data = pattern(MAX as usize, 11);
    c.write_ok(MIB, &data);
    assert!(
        read_file_range(&file, MIB, MAX as usize) == data,
        "32 MiB landed"
    );
    assert!(c.read_ok(MIB, MAX) == data, "32 MiB read back");
    // One byte more: the session ends (no payload is needed to see it).
    c.request(cmd::WRITE, 0, 1, 0, MAX + 1);
    assert!(c.sees_eof(), "the proxy closed the session");
    let (mut c, _, _) = greeted(p.addr);
    c.request(cmd::READ, 0, 2, 0, MAX + 1);
    assert!(c.sees_eof(), "an oversized read ends the session too");
    // The proxy and its upstream carry on.
    let (mut c, _, _) = greeted(p.addr);
    assert_eq!(c.read_ok(MIB, 16), data[..16].to_vec());
    p.assert_no_panic();
}
both!(size_limit => request_of_32_mib_causes_success_and_one_byte_more_causes_session_end,
      request_of_32_mib_causes_success_and_one_byte_more_causes_session_end_cached);

fn out_of_range(cache: bool) {
    let dir = TempDir::new("proxy-range");
    let (upstream, file) = real_upstream(&dir, MIB);
    let p = proxy(&dir, upstream.addr, cache, &[], &[]);
    let (mut c, _, _) = greeted(p.addr);
    let start = Instant::now();
    c.request(cmd::READ, 0, 0xabc, MIB - 512, 4096);
    let r = c.simple_reply();
    assert_eq!((r.error, r.handle), (errno::ENOSPC, 0xabc));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "prompt: {:?}",
        start.elapsed()
    );
    // No data followed the error: the next reply is the next request's.
    assert_eq!(c.read_ok(0, 512), read_file_range(&file, 0, 512));
    assert!(!p.log().contains("reconnecting"), "no upstream failure");
}
both!(out_of_range => out_of_range_read_causes_prompt_enospc,
      out_of_range_read_causes_prompt_enospc_cached);

fn disconnect(cache: bool) {
    let dir = TempDir::new("proxy-disc");
    let dest = FakeDest::bind();
    let d = dest.try_clone();
    let script = in_background(move || {
        let mut image = vec![0u8; MIB as usize];
        let mut c = d.expect_connection(WAIT);
        c.send(&proto::oldstyle_greeting(MIB, C_FLAGS));
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let seen = c.read_seen().expect("a request");
            kinds.push(seen.request.kind);
            answer(&mut c, &seen, &mut image);
        }
        (kinds, c)
    });
    let p = proxy(&dir, dest.addr, cache, &[], &[]);
    let (mut a, _, _) = greeted(p.addr);
    a.write_ok(0, b"hello");
    a.request(cmd::DISC, 0, 9, 0, 0);
    assert!(a.sees_eof(), "DISCONNECT ended the session");
    let (mut b, _, _) = greeted(p.addr);
    b.request(cmd::FLUSH, 0, 10, 0, 0);
    assert_eq!(b.simple_reply().error, 0);
    let (kinds, _conn) = script.join_within(WAIT);
    assert_eq!(
        kinds,
        vec![cmd::WRITE, cmd::FLUSH],
        "no DISCONNECT upstream"
    );
    assert_eq!(dest.connections(), 1, "the upstream connection was kept");
}
both!(disconnect => disconnect_causes_session_end_without_reaching_upstream,
      disconnect_causes_session_end_without_reaching_upstream_cached);

/// A fake upstream serving an in-memory image that reports every request.
fn observed_upstream(size: u64, seed: u8) -> (FakeDest, mpsc::Receiver<Request>) {
    let dest = FakeDest::bind();
    let d = dest.try_clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut image = pattern(size as usize, seed);
        let mut c = d.expect_connection(WAIT);
        c.send(&proto::oldstyle_greeting(size, C_FLAGS));
        // Ends when the proxy goes away (the read panics on this thread only).
        while let Some(seen) = c.read_seen() {
            let _ = tx.send(seen.request);
            answer(&mut c, &seen, &mut image);
        }
    });
    (dest, rx)
}

fn cache_behaviour(cache: bool) {
    let dir = TempDir::new("proxy-cache");
    let image = pattern(MIB as usize, 21);
    let (dest, seen) = observed_upstream(MIB, 21);
    let p = proxy(&dir, dest.addr, cache, &[], &[]);
    let (mut c, _, _) = greeted(p.addr);
    let next = || seen.recv_timeout(WAIT).expect("a request upstream");
    // A deliberate short wait: it shows that no request goes upstream.
    let none = || seen.recv_timeout(Duration::from_millis(300)).ok();

    assert_eq!(c.read_ok(0, 4096), image[..4096].to_vec());
    let r = next();
    assert_eq!(
        (r.kind, r.offset, r.length),
        (cmd::READ, 0, if cache { 8192 } else { 4096 })
    );

    assert_eq!(c.read_ok(4096, 4096), image[4096..8192].to_vec());
    assert_eq!(c.read_ok(5000, 100), image[5000..5100].to_vec());
    if cache {
        assert_eq!(none(), None, "served from the cache");
    } else {
        assert_eq!(next().offset, 4096);
        assert_eq!(next().offset, 5000);
    }

    let new = pattern(512, 22);
    c.write_ok(4096, &new);
    let w = next();
    assert_eq!((w.kind, w.offset, w.length), (cmd::WRITE, 4096, 512));
    // The write invalidated the cache: this read goes upstream and sees it.
    let mut expected = image[4096..8192].to_vec();
    expected[..512].copy_from_slice(&new);
    assert_eq!(c.read_ok(4096, 4096), expected);
    let r = next();
    assert_eq!(
        (r.kind, r.offset, r.length),
        (cmd::READ, 4096, if cache { 8192 } else { 4096 })
    );
    // Reads near the end are never doubled past it.
    assert_eq!(
        c.read_ok(MIB - 4096, 4096),
        image[(MIB - 4096) as usize..].to_vec()
    );
    assert_eq!(next().length, 4096);
    p.assert_no_panic();
}
both!(cache_behaviour => small_reads_cause_upstream_reads_as_sent,
      small_reads_cause_doubled_upstream_reads_and_cache_hits_cached);

#[test]
fn unreachable_upstream_causes_exit_1_before_listening() {
    // A port that was just free: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // It never listened.
    assert_tool(
        PROXY,
        &[
            "-l",
            "127.0.0.1",
            "-p",
            "0",
            "-C",
            "127.0.0.1",
            "-P",
            &port.to_string(),
            "-v",
        ],
        WAIT,
    )
    .code(1)
    .stderr(predicate::str::contains(
        "Couldn't connect to upstream server during initialization",
    ))
    .stderr(predicate::str::contains("listening on").not());
}

#[test]
fn usage_errors_cause_exit_1_and_help_causes_exit_0() {
    let bad: &[&[&str]] = &[
        &["-l", "127.0.0.1", "-C", "127.0.0.1", "-P", "1"],
        &["-l", "127.0.0.1", "-p", "0", "-P", "1"],
        &[
            "-l",
            "127.0.0.1",
            "-p",
            "0",
            "-C",
            "127.0.0.1",
            "-P",
            "1",
            "-c",
        ],
        &["-l", "127.0.0.1", "-p", "0", "-C", "/tmp/x", "-P", "1"],
        &["-l", "nonsense", "-p", "0", "-C", "127.0.0.1", "-P", "1"],
    ];
    for args in bad {
        // Each explains itself on stderr.
        assert_tool(PROXY, args, WAIT)
            .code(1)
            .stderr(predicate::str::is_empty().not());
    }
    assert_tool(
        PROXY,
        &["-l", "127.0.0.1", "-C", "127.0.0.1", "-P", "1"],
        WAIT,
    )
    .stderr(predicate::str::contains(
        "--port is required unless --addr is a UNIX socket path",
    ));
    assert_tool(PROXY, &["--help"], WAIT)
        .code(0)
        .stdout(predicate::str::contains("--cache"));
}

#[test]
fn stop_signals_cause_exit_0() {
    let dir = TempDir::new("proxy-signals");
    let (upstream, _file) = real_upstream(&dir, MIB);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT] {
        let mut p = proxy(&dir, upstream.addr, false, &[], &[]);
        // Mid-session: a client is connected and has been served.
        let (mut c, _, _) = greeted(p.addr);
        c.read_ok(0, 512);
        p.signal(sig);
        assert_eq!(p.wait_exit().code(), Some(0), "signal {sig}");
        assert!(c.sees_eof());
    }
}

/// Kills the child when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sigterm_causes_exit_0_and_unix_socket_removal() {
    use std::os::unix::net::UnixStream;
    let dir = TempDir::new("proxy-unix");
    let (upstream, file) = real_upstream(&dir, MIB);
    let sock = dir.join("proxy.sock");
    let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
    let mut child = Reaped(
        crate::harness::clean_command(PROXY)
            .args(["-l", sock.to_str().unwrap(), "-C", "127.0.0.1", "-P"])
            .arg(upstream.port().to_string())
            .arg("-v")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // The path appears at bind(), just before listen(): wait for the log.
    let log_path = dir.join("proxy.log");
    wait_for("the proxy to listen", WAIT, || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        log.contains(&format!("listening on {}", sock.display()))
            .then_some(())
    });
    assert!(sock.exists());
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut g = vec![0u8; proto::OLDSTYLE_GREETING_LEN];
    s.read_exact(&mut g).unwrap();
    assert_eq!(u64::from_be_bytes(g[16..24].try_into().unwrap()), MIB);
    use std::io::Write;
    s.write_all(&Request::new(cmd::READ, 0, 5, 0, 64).encode())
        .unwrap();
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(SimpleReply::decode(&r).error, 0);
    let mut data = vec![0u8; 64];
    s.read_exact(&mut data).unwrap();
    assert_eq!(data, read_file_range(&file, 0, 64));
    send_signal(child.0.id(), libc::SIGTERM);
    let status = wait_for("the proxy to exit", WAIT, || child.0.try_wait().unwrap());
    assert_eq!(status.code(), Some(0));
    assert!(!Path::new(&sock).exists(), "the socket was removed");
}

#[test]
fn fault_plan_on_proxy_steps_causes_fired_lines_and_effects() {
    let dir = TempDir::new("proxy-faults");
    let (upstream, file) = real_upstream(&dir, MIB);
    let plan = "proxy.request_send.write#1=close; proxy.reply_send.read=close";
    let p = proxy(&dir, upstream.addr, false, &["--faults", plan], &[]);
    let (mut c, _, _) = greeted(p.addr);
    // The first upstream send of the write is replaced by a close: the proxy
    // reconnects and resends, and the client sees only success.
    let data = pattern(1000, 8);
    c.write_ok(300, &data);
    assert_eq!(read_file_range(&file, 300, 1000), data);
    p.wait_log("fault fired: proxy.request_send.write");
    p.wait_log("reconnecting to resend");
    // A read's reply is replaced by closing the session.
    c.request(cmd::READ, 0, 1, 0, 512);
    assert!(c.sees_eof(), "the session was closed instead of replying");
    p.wait_log("fault fired: proxy.reply_send.read");
    // The proxy still serves the next client (writes pass from now on).
    let (mut c, _, _) = greeted(p.addr);
    c.write_ok(0, b"again");
    assert_eq!(read_file_range(&file, 0, 5), b"again");
    p.assert_no_panic();
}

#[test]
fn a_log_reader_that_goes_away_never_kills_the_proxy() {
    // Log lines go to stderr; when that is a pipe whose reader has gone,
    // each write raises SIGPIPE. Nothing in the code sets SIGPIPE's
    // disposition: std's runtime ignores it before main, so the write fails
    // with EPIPE (the line is lost) and the proxy goes on serving.
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let dir = TempDir::new("proxy-sigpipe");
    let (upstream, file) = real_upstream(&dir, MIB);
    let sock = dir.join("proxy.sock");
    let mut child = Reaped(
        crate::harness::clean_command(PROXY)
            .args(["-l", sock.to_str().unwrap(), "-C", "127.0.0.1", "-P"])
            .arg(upstream.port().to_string())
            .arg("-v")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The reader goes before the proxy has written its first line (with -v
    // it logs "listening on" at start and a line per session).
    drop(child.0.stderr.take());
    wait_for("the proxy's socket", WAIT, || {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("the proxy died with {status} when its log reader went away");
        }
        sock.exists().then_some(())
    });
    assert!(ignores_signal(child.0.id(), libc::SIGPIPE));
    let mut s = wait_for("the proxy to accept", WAIT, || {
        UnixStream::connect(&sock).ok()
    });
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut g = vec![0u8; proto::OLDSTYLE_GREETING_LEN];
    s.read_exact(&mut g).unwrap();
    s.write_all(&Request::new(cmd::READ, 0, 5, 0, 64).encode())
        .unwrap();
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(SimpleReply::decode(&r).error, 0);
    let mut data = vec![0u8; 64];
    s.read_exact(&mut data).unwrap();
    assert_eq!(data, read_file_range(&file, 0, 64));
    send_signal(child.0.id(), libc::SIGTERM);
    let status = wait_for("the proxy to exit", WAIT, || child.0.try_wait().unwrap());
    assert_eq!(status.code(), Some(0));
}
