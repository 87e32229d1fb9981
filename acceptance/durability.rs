//! Durability on the real binary: what survives a power cut, the order of
//! the syncs that make it so, and store faults at every sync point.
//!
//! Simulated: `flexnbd listen` fed by a scripted source (one that entrusts,
//! and a C-style one that writes and disconnects), `flexnbd serve` with a
//! raw client sending plain, FUA and FLUSH requests, and real migrations
//! with `--unlink`; `powercut(all)` at the step right after each sync
//! (`server.entrust_reply_send`, `server.reply_send.write|flush`,
//! `server.disconnect_done`, `mirror.disconnect_sent`), the same binaries
//! under strace, and `store.sync=eio` at entrust, DISCONNECT and FUA.
//!
//! What must happen (docs/handoff.md, "The sequence of one successful
//! attempt"): everything a reply vouched for is on disk after the cut (the
//! image data, an `entrusted` marker, a removed marker, an unlinked source);
//! a plain unflushed write is not (so the model really takes data away);
//! each fdatasync or fsync completes before the rename, unlink or send that
//! relies on it; a failed sync is answered with EIO and never advances the
//! marker or completes a migration. Every power-cut test checks both the
//! `fault fired:` line and the `power cut` line, so none can pass because
//! the fault did not fire.

use std::fs;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use flexnbd::proto::{self, cmd, cmd_flags, errno};

use crate::fakes::{connect_with_greeting, FakeSource};
use crate::harness::*;

const MIB: u64 = 1024 * 1024;
/// Where the scripted sources and clients write, and how much.
const AT: u64 = 128 * 1024;
const LEN: usize = 64 * 1024;

// ---------------------------------------------------------------- helpers

/// `flexnbd MODE -f FILE` on 127.0.0.1:0, with a fault plan when given.
fn start(
    dir: &TempDir,
    mode: &str,
    file: &Path,
    sock: Option<&Path>,
    plan: Option<&str>,
) -> Flexnbd {
    let extra: Vec<&str> = plan.map(|p| vec!["--faults", p]).unwrap_or_default();
    let server = Flexnbd::spawn(dir, &server_args(mode, file, sock, &extra));
    if let Some(sock) = sock {
        wait_for("the control socket to answer", WAIT, || {
            UnixStream::connect(sock).ok().map(|_| ())
        });
    }
    server
}

/// Waits for the process to die of the power cut `key -> powercut(all)`:
/// killed like SIGKILL, with both the `fault fired:` and the `power cut`
/// lines in its log. Returns the log.
fn assert_power_cut(server: &mut Flexnbd, key: &str) -> String {
    let status = server.wait_exit();
    let log = server.log();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "expected the power cut at {key} to kill the process like SIGKILL, got {status}; log:\n{log}"
    );
    let fired = format!("fault fired: {key} -> powercut(all)");
    assert!(
        log.contains(&fired),
        "expected {fired:?} in the log:\n{log}"
    );
    assert!(
        log.contains("power cut (all): "),
        "expected a \"power cut (all): ...\" line in the log:\n{log}"
    );
    server.assert_no_panic();
    log
}

/// The bytes of `file` at [`AT`], [`LEN`] long.
fn written_range(file: &Path) -> Vec<u8> {
    read_file_range(file, AT, LEN)
}

/// Checks a range of the image against what it must hold, without
/// printing 64 KiB on failure.
fn assert_range(file: &Path, expected: &[u8], what: &str) {
    let got = written_range(file);
    if let Some(i) = got.iter().zip(expected).position(|(g, e)| g != e) {
        panic!(
            "{what}: {} at byte {} differs: expected {:#04x}, got {:#04x}",
            file.display(),
            AT + i as u64,
            expected[i],
            got[i]
        );
    }
}

/// A scripted source on `listen`: the greeting, one WRITE of `data` at
/// [`AT`] (acknowledged; no FLUSH, no FUA), then ENTRUST with handle 2.
fn write_then_entrust(server: &Flexnbd, data: &[u8]) -> FakeSource {
    let mut s = FakeSource::connect(server.addr);
    s.read_greeting();
    let r = s.write_and_reply(1, AT, data);
    assert_eq!(
        (r.error, r.handle),
        (0, 1),
        "expected the write to be acknowledged"
    );
    s.request(cmd::ENTRUST, 2, 0, 0);
    s
}

/// Fails unless the connection ends without a byte (the power went before
/// the reply).
fn assert_no_reply_then_eof(s: &mut FakeSource, what: &str) {
    let (bytes, eof) = s.read_until_eof(WAIT);
    assert!(
        eof && bytes.is_empty(),
        "{what}: expected the connection to end with no reply, got {} bytes, eof={eof}",
        bytes.len()
    );
}

/// Fails unless the raw client's connection ends without a byte. A
/// process killed with unread bytes in its socket resets the connection
/// instead of closing it, so a reset counts as the end too.
fn assert_closed_without_reply(c: &mut RawClient) {
    use std::io::Read;
    let mut b = [0u8; 64];
    match c.stream.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("expected no reply before the power cut, got {n} bytes"),
        Err(e) => panic!("expected the connection to end at the power cut, got {e}"),
    }
}

/// Runs `flexnbd resolve --source SRC --dest DEST` and returns its exit
/// status and stdout.
fn resolve(src: &Path, dest: &Path) -> (Option<i32>, String) {
    let o = run_tool(
        BIN,
        &[
            "resolve",
            "--source",
            src.to_str().unwrap(),
            "--dest",
            dest.to_str().unwrap(),
        ],
        WAIT,
    );
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into())
}

/// Starts `flexnbd mirror --unlink` from the source's socket to `port` and
/// checks it started.
fn mirror_unlink(sock: &Path, port: u16) {
    let o = run_mirror(sock, port, &["--unlink"], WAIT);
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()),
        (Some(0), "Mirror started\n"),
        "expected the mirror to start; stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

// ------------------------------------------------ power loss, one per sync

#[test]
fn power_cut_at_the_entrust_reply_keeps_the_unflushed_writes() {
    // The fdatasync of the destination's ENTRUST (core::destination) is
    // the only sync this destination ever runs: without it the cut takes
    // the write away.
    let dir = TempDir::new("dur-entrust-data");
    let dest = dir.sparse_file("dest.img", MIB);
    let mut server = start(
        &dir,
        "listen",
        &dest,
        None,
        Some("server.entrust_reply_send=powercut(all)"),
    );
    let data = pattern(LEN, 1);
    let mut s = write_then_entrust(&server, &data);
    assert_no_reply_then_eof(&mut s, "entrust");
    assert_power_cut(&mut server, "server.entrust_reply_send");
    assert_range(&dest, &data, "the entrusted write after the power cut");
}

#[test]
fn power_cut_at_the_entrust_reply_keeps_the_marker_entrusted() {
    // Without the temporary file's fsync the cut leaves an empty marker;
    // without the directory's fsync the rename is undone (`receiving`).
    let dir = TempDir::new("dur-entrust-marker");
    let dest = dir.sparse_file("dest.img", MIB);
    let mut server = start(
        &dir,
        "listen",
        &dest,
        None,
        Some("server.entrust_reply_send=powercut(all)"),
    );
    let mut s = write_then_entrust(&server, &pattern(LEN, 2));
    let peer = s.stream.local_addr().unwrap();
    assert_no_reply_then_eof(&mut s, "entrust");
    assert_power_cut(&mut server, "server.entrust_reply_send");
    let text = fs::read_to_string(marker_path(&dest)).unwrap_or_else(|e| {
        panic!(
            "expected the marker {} after the cut: {e}",
            marker_path(&dest).display()
        )
    });
    for line in [
        "state=entrusted".to_string(),
        format!("source={peer}"),
        format!("bytes_received={LEN}"),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "expected the line {line:?} in the marker after the cut, got {text:?}"
        );
    }
    // The verdict table, once the source has unlinked: the destination.
    let (code, out) = resolve(&dir.join("gone.img"), &dest);
    assert_eq!(
        code,
        Some(12),
        "expected verdict destination-entrusted, got {out}"
    );
}

#[test]
fn power_cut_before_the_entrust_loses_the_unflushed_writes() {
    // The control for the two tests above: the model really takes away
    // what no sync covered, and the marker still says receiving.
    let dir = TempDir::new("dur-entrust-control");
    let dest = dir.sparse_file("dest.img", MIB);
    let mut server = start(
        &dir,
        "listen",
        &dest,
        None,
        Some("server.entrust_received=powercut(all)"),
    );
    let mut s = write_then_entrust(&server, &pattern(LEN, 3));
    assert_no_reply_then_eof(&mut s, "entrust");
    let log = assert_power_cut(&mut server, "server.entrust_received");
    let sectors = LEN / 512;
    assert!(
        log.contains(&format!(
            "{sectors} of {sectors} sectors not yet durable reverted"
        )),
        "expected all {sectors} written sectors reverted; log:\n{log}"
    );
    assert_range(&dest, &vec![0; LEN], "the unflushed write after the cut");
    assert_eq!(marker_state(&dest).as_deref(), Some("receiving"));
}

/// `flexnbd serve` on a sparse image with `plan`, a raw client connected.
fn served_with(tag: &str, plan: &str) -> (TempDir, PathBuf, Flexnbd, RawClient) {
    let dir = TempDir::new(tag);
    let file = dir.sparse_file("d.img", MIB);
    let server = start(&dir, "serve", &file, None, Some(plan));
    let mut c = server.connect();
    c.oldstyle_greeting();
    (dir, file, server, c)
}

#[test]
fn power_cut_at_a_fua_write_reply_keeps_the_write() {
    let (_dir, file, mut server, mut c) =
        served_with("dur-fua", "server.reply_send.write=powercut(all)");
    let data = pattern(LEN, 4);
    c.request(cmd::WRITE, cmd_flags::FUA, 7, AT, LEN as u32);
    c.send(&data);
    assert_closed_without_reply(&mut c);
    assert_power_cut(&mut server, "server.reply_send.write");
    assert_range(&file, &data, "the FUA write after the cut");
}

#[test]
fn power_cut_at_a_flush_reply_keeps_the_writes_before_it() {
    let (_dir, file, mut server, mut c) =
        served_with("dur-flush", "server.reply_send.flush=powercut(all)");
    let data = pattern(LEN, 5);
    c.write_ok(AT, &data);
    c.request(cmd::FLUSH, 0, 8, 0, 0);
    assert_closed_without_reply(&mut c);
    assert_power_cut(&mut server, "server.reply_send.flush");
    assert_range(&file, &data, "the flushed write after the cut");
}

#[test]
fn power_cut_at_a_plain_write_reply_loses_the_write() {
    // The control: no FUA, no FLUSH, so nothing vouched for the write.
    let (_dir, file, mut server, mut c) =
        served_with("dur-plain", "server.reply_send.write=powercut(all)");
    c.request(cmd::WRITE, 0, 9, AT, LEN as u32);
    c.send(&pattern(LEN, 6));
    assert_closed_without_reply(&mut c);
    let log = assert_power_cut(&mut server, "server.reply_send.write");
    let sectors = LEN / 512;
    assert!(
        log.contains(&format!(
            "{sectors} of {sectors} sectors not yet durable reverted"
        )),
        "expected all {sectors} written sectors reverted; log:\n{log}"
    );
    assert_range(&file, &vec![0; LEN], "the unflushed write after the cut");
}

/// A C-style source on `listen`: the greeting, one WRITE of `data` at
/// [`AT`] (acknowledged), then DISCONNECT with no entrust.
fn c_style_write_then_disconnect(server: &Flexnbd, data: &[u8]) -> FakeSource {
    let mut s = FakeSource::connect(server.addr);
    s.read_greeting();
    let r = s.write_and_reply(1, AT, data);
    assert_eq!(r.error, 0, "expected the write to be acknowledged");
    s.disconnect(2);
    s
}

#[test]
fn power_cut_after_a_completed_disconnect_keeps_the_writes_and_no_marker() {
    // The destination's DISCONNECT (core::destination) syncs the image
    // and removes the marker durably before the migration counts as
    // complete.
    let dir = TempDir::new("dur-disconnect");
    let dest = dir.sparse_file("dest.img", MIB);
    let mut server = start(
        &dir,
        "listen",
        &dest,
        None,
        Some("server.disconnect_done=powercut(all)"),
    );
    let data = pattern(LEN, 7);
    let mut s = c_style_write_then_disconnect(&server, &data);
    assert_no_reply_then_eof(&mut s, "disconnect");
    assert_power_cut(&mut server, "server.disconnect_done");
    assert_range(&dest, &data, "the migrated write after the cut");
    assert_eq!(
        marker_state(&dest),
        None,
        "expected the marker's removal to survive the cut"
    );
    // A C-style sender still completes, with a record.
    assert_record_of(&dest, LEN);
    assert_restarted_listen_refuses(&dest);
    let (code, out) = resolve(&dir.join("gone.img"), &dest);
    assert_eq!(code, Some(11), "expected verdict destination, got {out}");
}

/// `<dest>.COMPLETE`, spelled out here so the tests check the name.
fn record_path(dest: &Path) -> PathBuf {
    PathBuf::from(format!("{}.COMPLETE", dest.display()))
}

/// Fails unless the completion record names the file at `dest` and says
/// `bytes` were received.
fn assert_record_of(dest: &Path, bytes: usize) {
    use std::os::unix::fs::MetadataExt;
    let text = fs::read_to_string(record_path(dest)).unwrap_or_else(|e| {
        panic!(
            "expected the completion record {} after the cut: {e}",
            record_path(dest).display()
        )
    });
    let m = fs::metadata(dest).unwrap();
    for line in [
        "state=complete".to_string(),
        format!("bytes_received={bytes}"),
        format!("dev={}", m.dev()),
        format!("ino={}", m.ino()),
        format!("size={}", m.size()),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "expected the line {line:?} in the record after the cut, got {text:?}"
        );
    }
}

/// A supervisor starting `listen` again on `dest`: it must refuse (exit 1)
/// before its port opens, and change neither the image nor the marker.
fn assert_restarted_listen_refuses(dest: &Path) {
    let image = fs::read(dest).unwrap();
    let marker = fs::read(marker_path(dest)).ok();
    let o = run_tool(
        BIN,
        &server_args("listen", dest, None, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        WAIT,
    );
    let log = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected the restarted listen to refuse (exit 1), got {}; log:\n{log}",
        o.status
    );
    assert!(
        log.contains("refusing to receive") && !log.contains("listening on"),
        "expected a refusal before the port opens; log:\n{log}"
    );
    assert!(
        fs::read(dest).unwrap() == image,
        "expected the restarted listen to leave the image unchanged"
    );
    assert_eq!(
        fs::read(marker_path(dest)).ok(),
        marker,
        "expected the restarted listen to leave the marker as it was"
    );
}

/// A sender writes `seed`'s pattern, entrusts and disconnects, into a
/// `listen` whose `plan` cuts the power at `key`; returns the data, checked
/// to be in the image after the cut.
fn entrusted_migration_cut_at(
    dir: &TempDir,
    dest: &Path,
    plan: &str,
    key: &str,
    seed: u8,
) -> Vec<u8> {
    let mut server = start(dir, "listen", dest, None, Some(plan));
    let data = pattern(LEN, seed);
    let mut s = write_then_entrust(&server, &data);
    let r = s.read_reply();
    assert_eq!(
        (r.handle, r.error),
        (2, 0),
        "expected the entrust to succeed"
    );
    s.disconnect(3);
    assert_no_reply_then_eof(&mut s, "disconnect");
    assert_power_cut(&mut server, key);
    assert_range(dest, &data, "the entrusted write after the cut");
    data
}

#[test]
fn power_cut_between_the_record_and_the_marker_removal_keeps_both_and_listen_refuses() {
    // store.marker#4 is the marker's removal (#1 creates it, #2 says
    // receiving, #3 entrusted): the record is written and synced before
    // it, so the cut must leave the whole record.
    let dir = TempDir::new("dur-record-marker");
    let dest = dir.sparse_file("dest.img", MIB);
    entrusted_migration_cut_at(
        &dir,
        &dest,
        "store.marker#4=powercut(all)",
        "store.marker#4",
        11,
    );
    assert_record_of(&dest, LEN);
    assert_eq!(marker_state(&dest).as_deref(), Some("entrusted"));
    let (code, out) = resolve(&dir.join("gone.img"), &dest);
    assert_eq!(
        (code, out.lines().next()),
        (Some(12), Some("verdict: destination-leftover-marker")),
        "expected the destination canonical with a leftover marker, got {out}"
    );
    assert_restarted_listen_refuses(&dest);
}

#[test]
fn power_cut_between_the_record_and_the_marker_removal_of_a_c_style_sender_is_not_the_forbidden_state(
) {
    // A C-style sender never entrusts: the marker says receiving until its
    // removal (#3 here), and only the record tells this destination from
    // one that lost data.
    let dir = TempDir::new("dur-record-c");
    let dest = dir.sparse_file("dest.img", MIB);
    let mut server = start(
        &dir,
        "listen",
        &dest,
        None,
        Some("store.marker#3=powercut(all)"),
    );
    let data = pattern(LEN, 12);
    let mut s = c_style_write_then_disconnect(&server, &data);
    assert_no_reply_then_eof(&mut s, "disconnect");
    assert_power_cut(&mut server, "store.marker#3");
    assert_range(&dest, &data, "the migrated write after the cut");
    assert_record_of(&dest, LEN);
    assert_eq!(marker_state(&dest).as_deref(), Some("receiving"));
    let (code, out) = resolve(&dir.join("gone.img"), &dest);
    assert_eq!(
        (code, out.lines().next()),
        (Some(12), Some("verdict: destination-leftover-marker")),
        "expected the destination canonical with a leftover marker, got {out}"
    );
    assert_restarted_listen_refuses(&dest);
}

#[test]
fn power_cut_before_the_record_keeps_the_marker_entrusted_and_no_record() {
    let dir = TempDir::new("dur-record-before");
    let dest = dir.sparse_file("dest.img", MIB);
    let data = entrusted_migration_cut_at(
        &dir,
        &dest,
        "store.record#1=powercut(all)",
        "store.record#1",
        13,
    );
    assert!(!record_path(&dest).exists(), "expected no record");
    assert_eq!(marker_state(&dest).as_deref(), Some("entrusted"));
    let (code, out) = resolve(&dir.join("gone.img"), &dest);
    assert_eq!(
        code,
        Some(12),
        "expected verdict destination-entrusted, got {out}"
    );
    // Without a record a restarted listen waits for its sender, and keeps
    // the entrusted marker as it is.
    let mut again = start(&dir, "listen", &dest, None, None);
    assert_eq!(marker_state(&dest).as_deref(), Some("entrusted"));
    again.signal(libc::SIGTERM);
    assert_eq!(again.wait_exit().code(), Some(1));
    assert_range(&dest, &data, "the entrusted write after the restart");
}

#[test]
fn power_cut_after_the_disconnect_went_out_does_not_bring_the_unlinked_source_back() {
    let dir = TempDir::new("dur-unlink");
    let src = dir.pattern_file("src.img", MIB, 8);
    let expected = fs::read(&src).unwrap();
    let dest = dir.sparse_file("dest.img", MIB);
    let sock = dir.join("src.sock");
    let mut source = start(
        &dir,
        "serve",
        &src,
        Some(&sock),
        Some("mirror.disconnect_sent=powercut(all)"),
    );
    let mut destination = start(&dir, "listen", &dest, None, None);
    mirror_unlink(&sock, destination.port());
    assert_power_cut(&mut source, "mirror.disconnect_sent");
    assert!(
        !src.exists(),
        "expected the unlinked source {} to stay gone after the cut",
        src.display()
    );
    let status = destination.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "expected the destination to complete; log:\n{}",
        destination.log()
    );
    assert!(
        fs::read(&dest).unwrap() == expected,
        "expected the destination to hold the source image"
    );
    let (code, out) = resolve(&src, &dest);
    assert_eq!(code, Some(11), "expected verdict destination, got {out}");
}

// ------------------------------------------------------ ordering, strace

/// One system call from an `strace -f -xx` log: where it started and where
/// it completed (line numbers; equal unless another thread's call came
/// between and strace split it into `<unfinished ...>` and `resumed>`).
#[derive(Clone, Debug)]
struct Call {
    name: String,
    /// The arguments, joined from both halves of a split line.
    args: String,
    ret: Option<i64>,
    start: usize,
    end: usize,
}

impl Call {
    /// The first argument as a number (the fd of most calls here).
    fn fd(&self) -> Option<i64> {
        self.args.split(',').next()?.trim().parse().ok()
    }

    /// The quoted strings among the arguments, decoded.
    fn strings(&self) -> Vec<Vec<u8>> {
        quoted_strings(&self.args)
    }

    /// Whether this call's completion was logged before `later` started.
    ///
    /// Sound for ordering: strace logs a call's completion while the
    /// calling thread is stopped at its syscall exit and resumes that
    /// thread only after writing it, so anything the program does because
    /// the call returned (on that thread or another it wakes) enters the
    /// kernel, and is logged, after that line. A correct program can never
    /// show `later` starting before this completion; comparing this call's
    /// completion with the other's start (rather than start with start)
    /// also rejects calls that merely overlapped.
    fn done_before(&self, later: &Call) -> bool {
        self.end < later.start
    }
}

/// Decodes the `"..."` strings of an strace argument list printed with
/// `-xx` (every byte as `\xHH`, so no quote or parenthesis appears inside
/// a string).
fn quoted_strings(args: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = args;
    while let Some(open) = rest.find('"') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('"') else { break };
        let body = &after[..close];
        let mut bytes = Vec::new();
        let mut i = 0;
        let b = body.as_bytes();
        while i < b.len() {
            if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1] == b'x' {
                if let Ok(v) = u8::from_str_radix(&body[i + 2..i + 4], 16) {
                    bytes.push(v);
                    i += 4;
                    continue;
                }
            }
            bytes.push(b[i]);
            i += 1;
        }
        out.push(bytes);
        rest = &after[close + 1..];
    }
    out
}

/// An strace log, parsed.
struct Trace {
    calls: Vec<Call>,
    raw: String,
}

impl Trace {
    fn read(path: &Path) -> Trace {
        let raw = fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read the trace {}: {e}", path.display()));
        // Per thread, the first half of a call strace split.
        let mut pending: std::collections::HashMap<String, (String, String, usize)> =
            Default::default();
        let mut calls = Vec::new();
        for (n, line) in raw.lines().enumerate() {
            let Some((pid, rest)) = line.split_once(' ') else {
                continue;
            };
            let rest = rest.trim_start();
            let (name, body, start) = if let Some(r) = rest.strip_prefix("<... ") {
                let Some((name, tail)) = r.split_once(" resumed>") else {
                    continue;
                };
                let Some((first_name, first, start)) = pending.remove(pid) else {
                    continue;
                };
                assert_eq!(first_name, name, "strace resumed another call: {line}");
                (name.to_string(), format!("{first}{tail}"), start)
            } else {
                let Some((name, body)) = rest.split_once('(') else {
                    continue; // signals, exits
                };
                if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    continue;
                }
                if let Some(first) = body.strip_suffix(" <unfinished ...>") {
                    pending.insert(pid.to_string(), (name.to_string(), first.to_string(), n));
                    continue;
                }
                (name.to_string(), body.to_string(), n)
            };
            // `ARGS)<padding>= RESULT`; no string holds " = " under -xx.
            let (args, ret) = match body.rsplit_once(" = ") {
                Some((args, ret)) => (
                    args.trim_end()
                        .strip_suffix(')')
                        .unwrap_or(args)
                        .to_string(),
                    ret.split_whitespace().next().and_then(|r| r.parse().ok()),
                ),
                None => (body.clone(), None),
            };
            calls.push(Call {
                name,
                args,
                ret,
                start,
                end: n,
            });
        }
        Trace { calls, raw }
    }

    /// The call that created what `fd` names when `at` starts: the latest
    /// `openat`, `accept4` or `socket` that returned it and completed
    /// before, unless a `close` of it came in between (fd numbers are
    /// reused after a close).
    fn origin(&self, fd: i64, at: &Call) -> Option<&Call> {
        let made = self
            .calls
            .iter()
            .filter(|c| {
                FD_MAKERS.contains(&c.name.as_str()) && c.ret == Some(fd) && c.done_before(at)
            })
            .max_by_key(|c| c.end)?;
        let closed = self.calls.iter().any(|c| {
            c.name == "close" && c.fd() == Some(fd) && made.done_before(c) && c.start < at.start
        });
        (!closed).then_some(made)
    }

    /// The path `fd` names when `at` starts, if an `openat` made it.
    fn path_of(&self, fd: i64, at: &Call) -> Option<PathBuf> {
        let made = self.origin(fd, at)?;
        if !matches!(made.name.as_str(), "openat" | "open") {
            return None;
        }
        made.strings()
            .into_iter()
            .next()
            .map(|p| PathBuf::from(String::from_utf8_lossy(&p).into_owned()))
    }

    /// Whether `fd` is a TCP connection when `at` starts.
    fn is_socket(&self, fd: i64, at: &Call) -> bool {
        self.origin(fd, at)
            .is_some_and(|c| matches!(c.name.as_str(), "accept" | "accept4" | "socket"))
    }

    /// Whether `call` acts on an fd that names `path`.
    fn on(&self, call: &Call, path: &Path) -> bool {
        call.fd()
            .and_then(|fd| self.path_of(fd, call))
            .is_some_and(|p| p == path)
    }

    /// The calls named one of `names`, in start order.
    fn named<'a>(&'a self, names: &'a [&str]) -> impl Iterator<Item = &'a Call> + 'a {
        let mut v: Vec<&Call> = self
            .calls
            .iter()
            .filter(|c| names.contains(&c.name.as_str()))
            .collect();
        v.sort_by_key(|c| c.start);
        v.into_iter()
    }

    /// Sends on TCP connections, with their bytes.
    fn sends(&self) -> Vec<(&Call, Vec<u8>)> {
        self.named(&["sendto", "sendmsg", "write", "writev"])
            .filter(|c| c.fd().is_some_and(|fd| self.is_socket(fd, c)))
            .map(|c| (c, c.strings().concat()))
            .collect()
    }

    /// Fails with `what` and the trace's relevant lines (strings decoded).
    fn fail(&self, what: &str) -> ! {
        let relevant: Vec<String> = self
            .raw
            .lines()
            .filter(|l| {
                [
                    "fdatasync",
                    "fsync",
                    "rename",
                    "unlink",
                    "openat",
                    "sendto",
                    "writev",
                ]
                .iter()
                .any(|k| l.contains(k))
                    && !l.contains("ENOENT")
            })
            .map(readable)
            .collect();
        panic!("{what}; relevant trace lines:\n{}", relevant.join("\n"));
    }
}

/// An strace line with its `-xx` strings shown as text (other bytes as
/// `\xHH`), for failure messages.
fn readable(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(i) = rest.find("\\x") {
        out.push_str(&rest[..i]);
        match u8::from_str_radix(rest.get(i + 2..i + 4).unwrap_or(""), 16) {
            Ok(b) if b.is_ascii_graphic() || b == b' ' => out.push(b as char),
            _ => out.push_str(rest.get(i..i + 4).unwrap_or(&rest[i..])),
        }
        rest = rest.get(i + 4..).unwrap_or("");
    }
    out.push_str(rest);
    out
}

/// The calls that create the fds the checks follow.
const FD_MAKERS: &[&str] = &["openat", "open", "accept", "accept4", "socket"];

/// strace arguments running `flexnbd ARGS` with the calls the ordering
/// checks need, into `out`.
fn strace_args(out: &Path, args: Vec<String>) -> Vec<String> {
    let mut v: Vec<String> = [
        "-f",
        "-xx",
        "-s",
        "256",
        "-e",
        "trace=openat,open,close,accept,accept4,socket,fdatasync,fsync,rename,renameat,renameat2,unlink,unlinkat,\
         sendto,sendmsg,write,writev,pwrite64,fallocate",
        "-o",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(out.display().to_string());
    v.push(BIN.to_string());
    v.extend(args);
    v
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The destination's side of a migration: the image's fdatasync, then the
/// `entrusted` marker (its temporary file written and fsynced, renamed,
/// the directory fsynced), then the entrust reply.
fn check_destination_order(t: &Trace, dest: &Path) {
    let marker = marker_path(dest);
    let tmp = PathBuf::from(format!("{}.tmp", marker.display()));
    let dir = dest.parent().unwrap();
    let entrusted = t
        .named(&["write"])
        .filter(|c| t.on(c, &tmp) && c.strings().concat().starts_with(b"state=entrusted"))
        .last()
        .unwrap_or_else(|| {
            t.fail("expected a write of state=entrusted to the marker's temporary file")
        });
    let tmp_fsync = t
        .named(&["fsync", "fdatasync"])
        .find(|c| t.on(c, &tmp) && entrusted.done_before(c))
        .unwrap_or_else(|| {
            t.fail("expected an fsync of the marker's temporary file after its write")
        });
    let rename = t
        .named(&["rename", "renameat", "renameat2"])
        .find(|c| {
            c.start > entrusted.end
                && c.strings()
                    == vec![
                        tmp.clone().into_os_string().into_encoded_bytes(),
                        marker.clone().into_os_string().into_encoded_bytes(),
                    ]
        })
        .unwrap_or_else(|| t.fail("expected the temporary marker to be renamed over the marker"));
    if !tmp_fsync.done_before(rename) {
        t.fail(&format!(
            "expected the temporary file's fsync (line {}) to complete before its rename (line {})",
            tmp_fsync.end + 1,
            rename.start + 1
        ));
    }
    let dir_fsync = t
        .named(&["fsync"])
        .find(|c| t.on(c, dir) && rename.done_before(c))
        .unwrap_or_else(|| t.fail("expected an fsync of the directory after the marker's rename"));
    // DISCONNECT has no reply, so the destination's last send is the
    // entrust reply: a simple reply with error 0.
    let sends = t.sends();
    let Some((reply, bytes)) = sends.last() else {
        t.fail("expected the destination to send replies")
    };
    let mut ok_reply = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    ok_reply.extend_from_slice(&[0; 4]);
    if bytes.len() != proto::SIMPLE_REPLY_LEN || !bytes.starts_with(&ok_reply) {
        t.fail(&format!(
            "expected the destination's last send (line {}) to be the successful entrust reply, got {bytes:02x?}",
            reply.start + 1
        ));
    }
    if !dir_fsync.done_before(reply) {
        t.fail(&format!(
            "expected the directory fsync (line {}) to complete before the entrust reply (line {})",
            dir_fsync.end + 1,
            reply.start + 1
        ));
    }
    let last_change = t
        .named(&["pwrite64", "fallocate"])
        .filter(|c| t.on(c, dest) && c.start < reply.start)
        .map(|c| c.end)
        .max()
        .unwrap_or_else(|| t.fail("expected the destination image to be written"));
    let image_sync = t
        .named(&["fdatasync"])
        .find(|c| t.on(c, dest) && c.start > last_change)
        .unwrap_or_else(|| {
            t.fail("expected an fdatasync of the destination image after its last write")
        });
    if !image_sync.done_before(entrusted) || !image_sync.done_before(rename) {
        t.fail(&format!(
            "expected the image fdatasync (line {}) to complete before the entrusted marker is written (line {}) and renamed (line {})",
            image_sync.end + 1,
            entrusted.start + 1,
            rename.start + 1
        ));
    }
}

/// The destination's completion: the image's fdatasync after its last
/// write, then the completion record (its temporary file written and
/// fsynced, renamed, the directory fsynced), then the marker's unlink and
/// the directory's fsync.
fn check_completion_order(t: &Trace, dest: &Path) {
    let record = record_path(dest);
    let tmp = PathBuf::from(format!("{}.tmp", record.display()));
    let marker = marker_path(dest);
    let dir = dest.parent().unwrap();
    let written = t
        .named(&["write"])
        .find(|c| t.on(c, &tmp) && c.strings().concat().starts_with(b"state=complete"))
        .unwrap_or_else(|| {
            t.fail("expected a write of state=complete to the record's temporary file")
        });
    let tmp_fsync = t
        .named(&["fsync", "fdatasync"])
        .find(|c| t.on(c, &tmp) && written.done_before(c))
        .unwrap_or_else(|| t.fail("expected an fsync of the record's temporary file"));
    let rename = t
        .named(&["rename", "renameat", "renameat2"])
        .find(|c| {
            c.strings()
                == vec![
                    tmp.clone().into_os_string().into_encoded_bytes(),
                    record.clone().into_os_string().into_encoded_bytes(),
                ]
        })
        .unwrap_or_else(|| t.fail("expected the temporary record to be renamed over the record"));
    if !tmp_fsync.done_before(rename) {
        t.fail(&format!(
            "expected the record's fsync (line {}) to complete before its rename (line {})",
            tmp_fsync.end + 1,
            rename.start + 1
        ));
    }
    let dir_fsync = t
        .named(&["fsync"])
        .find(|c| t.on(c, dir) && rename.done_before(c))
        .unwrap_or_else(|| t.fail("expected an fsync of the directory after the record's rename"));
    let marker_bytes = marker.clone().into_os_string().into_encoded_bytes();
    let unlink = t
        .named(&["unlink", "unlinkat"])
        .find(|c| c.strings().contains(&marker_bytes))
        .unwrap_or_else(|| t.fail("expected the marker to be unlinked"));
    if !dir_fsync.done_before(unlink) {
        t.fail(&format!(
            "expected the directory fsync after the record's rename (line {}) to complete before the marker's unlink (line {})",
            dir_fsync.end + 1,
            unlink.start + 1
        ));
    }
    t.named(&["fsync"])
        .find(|c| t.on(c, dir) && unlink.done_before(c))
        .unwrap_or_else(|| t.fail("expected an fsync of the directory after the marker's unlink"));
    let last_change = t
        .named(&["pwrite64", "fallocate"])
        .filter(|c| t.on(c, dest))
        .map(|c| c.end)
        .max()
        .unwrap_or_else(|| t.fail("expected the destination image to be written"));
    let image_sync = t
        .named(&["fdatasync"])
        .filter(|c| t.on(c, dest) && c.start > last_change)
        .last()
        .unwrap_or_else(|| {
            t.fail("expected an fdatasync of the destination image after its last write")
        });
    if !image_sync.done_before(written) {
        t.fail(&format!(
            "expected the image fdatasync (line {}) to complete before the record is written (line {})",
            image_sync.end + 1,
            written.start + 1
        ));
    }
}

/// The source's side: the unlink, then its directory's fsync, then the
/// DISCONNECT.
fn check_source_order(t: &Trace, src: &Path) {
    let src_bytes = src.as_os_str().as_encoded_bytes();
    let unlink = t
        .named(&["unlink", "unlinkat"])
        .find(|c| c.strings().iter().any(|s| s == src_bytes))
        .unwrap_or_else(|| t.fail(&format!("expected an unlink of {}", src.display())));
    let dir_fsync = t
        .named(&["fsync"])
        .find(|c| t.on(c, src.parent().unwrap()) && unlink.done_before(c))
        .unwrap_or_else(|| t.fail("expected an fsync of the source's directory after the unlink"));
    let mut disc_prefix = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
    disc_prefix.extend_from_slice(&[0, 0]);
    disc_prefix.extend_from_slice(&cmd::DISC.to_be_bytes());
    let (disc, _) = t
        .sends()
        .into_iter()
        .find(|(_, bytes)| contains(bytes, &disc_prefix))
        .unwrap_or_else(|| t.fail("expected the source to send DISCONNECT"));
    if !dir_fsync.done_before(disc) {
        t.fail(&format!(
            "expected the directory fsync (line {}) to complete before DISCONNECT is sent (line {})",
            dir_fsync.end + 1,
            disc.start + 1
        ));
    }
}

#[test]
fn strace_shows_each_migration_sync_before_what_relies_on_it() {
    let dir = TempDir::new("dur-strace-migrate");
    let src = dir.pattern_file("src.img", MIB, 10);
    let dest = dir.sparse_file("dest.img", MIB);
    let sock = dir.join("src.sock");
    let src_trace = dir.join("src.trace");
    let dest_trace = dir.join("dest.trace");
    let mut source = Flexnbd::spawn_program(
        &dir,
        "strace",
        &strace_args(&src_trace, server_args("serve", &src, Some(&sock), &[])),
    );
    wait_for("the source's control socket", WAIT, || {
        UnixStream::connect(&sock).ok().map(|_| ())
    });
    let mut destination = Flexnbd::spawn_program(
        &dir,
        "strace",
        &strace_args(&dest_trace, server_args("listen", &dest, None, &[])),
    );
    mirror_unlink(&sock, destination.port());
    // strace exits with its tracee, after writing every line.
    for (p, what) in [(&mut source, "source"), (&mut destination, "destination")] {
        let status = p.wait_exit();
        assert_eq!(
            status.code(),
            Some(0),
            "expected the {what} to exit 0 after the migration; log:\n{}",
            p.log()
        );
    }
    assert!(!src.exists(), "expected --unlink to remove the source");
    check_destination_order(&Trace::read(&dest_trace), &dest);
    check_completion_order(&Trace::read(&dest_trace), &dest);
    check_source_order(&Trace::read(&src_trace), &src);
}

#[test]
fn strace_shows_the_entrust_fdatasync_before_the_marker_and_the_reply() {
    // In a real migration the source's FLUSH may already have synced every
    // write before the entrust; a source that never flushes leaves the
    // entrust's own fdatasync as the only one that can cover its write.
    let dir = TempDir::new("dur-strace-entrust");
    let dest = dir.sparse_file("dest.img", MIB);
    let trace = dir.join("dest.trace");
    let mut destination = Flexnbd::spawn_program(
        &dir,
        "strace",
        &strace_args(&trace, server_args("listen", &dest, None, &[])),
    );
    let mut s = write_then_entrust(&destination, &pattern(LEN, 17));
    let r = s.read_reply();
    assert_eq!(
        (r.handle, r.error),
        (2, 0),
        "expected the entrust to succeed"
    );
    s.disconnect(3);
    let status = destination.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "expected the destination to complete; log:\n{}",
        destination.log()
    );
    check_destination_order(&Trace::read(&trace), &dest);
    check_completion_order(&Trace::read(&trace), &dest);
}

#[test]
fn strace_shows_fua_and_flush_replies_after_their_fdatasync() {
    let dir = TempDir::new("dur-strace-fua");
    let file = dir.sparse_file("d.img", MIB);
    let trace = dir.join("serve.trace");
    let mut server = Flexnbd::spawn_program(
        &dir,
        "strace",
        &strace_args(&trace, server_args("serve", &file, None, &[])),
    );
    let mut c = server.connect();
    c.oldstyle_greeting();
    const FUA: u64 = 0x4655_4100_0000_0001;
    const FLUSH: u64 = 0x464c_5553_4800_0002;
    c.request(cmd::WRITE, cmd_flags::FUA, FUA, AT, LEN as u32);
    c.send(&pattern(LEN, 11));
    let r = c.simple_reply();
    assert_eq!(
        (r.handle, r.error),
        (FUA, 0),
        "expected the FUA write's reply"
    );
    c.write_ok(AT + LEN as u64, &pattern(LEN, 12));
    c.request(cmd::FLUSH, 0, FLUSH, 0, 0);
    let r = c.simple_reply();
    assert_eq!((r.handle, r.error), (FLUSH, 0), "expected the FLUSH reply");
    drop(c);
    // Stop the traced server itself (not strace), so the trace is complete.
    send_signal(server.server_pid, libc::SIGTERM);
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());

    let t = Trace::read(&trace);
    let sends = t.sends();
    for (handle, offset, what) in [(FUA, AT, "FUA write"), (FLUSH, AT + LEN as u64, "FLUSH")] {
        let reply = SimpleReplyBytes::new(handle);
        let (sent, _) = sends
            .iter()
            .find(|(_, bytes)| contains(bytes, &reply.0))
            .unwrap_or_else(|| t.fail(&format!("expected the {what} reply to be sent")));
        // The writes the reply vouches for: the FUA write itself, or the
        // plain write before the FLUSH (in pieces, each a pwrite64).
        let written = t
            .named(&["pwrite64"])
            .filter(|c| {
                let at = c
                    .args
                    .rsplit(',')
                    .next()
                    .and_then(|o| o.trim().parse::<u64>().ok());
                t.on(c, &file) && at.is_some_and(|at| (offset..offset + LEN as u64).contains(&at))
            })
            .max_by_key(|c| c.end)
            .unwrap_or_else(|| {
                t.fail(&format!(
                    "expected pwrite64 calls at {offset} for the {what}"
                ))
            });
        let synced = t
            .named(&["fdatasync"])
            .any(|s| t.on(s, &file) && written.done_before(s) && s.done_before(sent));
        if !synced {
            t.fail(&format!(
                "expected an fdatasync of the image after the write (line {}) and completed before the {what} reply (line {})",
                written.end + 1,
                sent.start + 1
            ));
        }
    }
}

/// The 16 bytes of a successful simple reply to `handle`.
struct SimpleReplyBytes(Vec<u8>);

impl SimpleReplyBytes {
    fn new(handle: u64) -> SimpleReplyBytes {
        SimpleReplyBytes(proto::SimpleReply::new(0, handle).encode().to_vec())
    }
}

// ------------------------------------------------- store faults at syncs

#[test]
fn store_sync_eio_makes_entrust_fail_and_keeps_the_marker_receiving() {
    let dir = TempDir::new("dur-eio-entrust");
    let dest = dir.sparse_file("dest.img", MIB);
    let server = start(&dir, "listen", &dest, None, Some("store.sync=eio"));
    let mut s = write_then_entrust(&server, &pattern(LEN, 13));
    let r = s.read_reply();
    assert_eq!(
        (r.handle, r.error),
        (2, errno::EIO),
        "expected the entrust to be answered EIO"
    );
    server.wait_log("fault fired: store.sync -> eio");
    assert_eq!(marker_state(&dest).as_deref(), Some("receiving"));
}

#[test]
fn store_sync_eio_at_entrust_in_a_migration_keeps_the_source_canonical() {
    // The mirror sends one checkpoint ahead as the flush before the
    // cut-off (nothing told it what a sync costs yet), then entrusts: the
    // first sync, slow, is that checkpoint's and passes; the second is the
    // entrust's and fails (and every later one, on each retry).
    let dir = TempDir::new("dur-eio-migrate");
    let src = dir.pattern_file("src.img", MIB, 14);
    let dest = dir.sparse_file("dest.img", MIB);
    let sock = dir.join("src.sock");
    let mut source = start(&dir, "serve", &src, Some(&sock), None);
    let destination = start(
        &dir,
        "listen",
        &dest,
        None,
        Some("store.sync=1*slow(160)->eio"),
    );
    mirror_unlink(&sock, destination.port());
    destination.wait_log("entrust from");
    destination.wait_log("fault fired: store.sync -> eio");
    source.wait_log(&format!(
        "the destination answered entrust with error {}",
        errno::EIO
    ));
    assert!(
        src.exists(),
        "expected the source {} to be kept after a refused entrust",
        src.display()
    );
    assert_eq!(marker_state(&dest).as_deref(), Some("receiving"));
    let (code, out) = resolve(&src, &dest);
    assert_eq!(code, Some(10), "expected verdict source, got {out}");
    assert!(
        source.is_running(),
        "expected the source to keep serving and retry; log:\n{}",
        source.log()
    );
}

#[test]
fn store_sync_eio_at_disconnect_keeps_the_marker_and_listen_waiting() {
    // A FLUSH takes the first sync, so `#2` is the DISCONNECT's.
    let dir = TempDir::new("dur-eio-disconnect");
    let dest = dir.sparse_file("dest.img", MIB);
    let mut server = start(&dir, "listen", &dest, None, Some("store.sync#2=eio"));
    let mut s = FakeSource::connect(server.addr);
    s.read_greeting();
    assert_eq!(s.write_and_reply(1, AT, &pattern(LEN, 15)).error, 0);
    s.request(cmd::FLUSH, 2, 0, 0);
    assert_eq!(
        s.read_reply().error,
        0,
        "expected the first sync (FLUSH) to pass"
    );
    s.disconnect(3);
    assert!(
        s.sees_eof_within(WAIT),
        "expected the connection to end after DISCONNECT"
    );
    server.wait_log("fault fired: store.sync#2 -> eio");
    server.wait_log("cannot complete the migration");
    assert_eq!(marker_state(&dest).as_deref(), Some("receiving"));
    // Not complete: listen still waits for its sender to come back.
    let (_again, size) = connect_with_greeting(server.addr, WAIT);
    assert_eq!(size, MIB);
    assert!(server.is_running(), "expected listen to keep waiting");
}

#[test]
fn store_sync_eio_fails_a_fua_write_with_eio() {
    let (_dir, _file, server, mut c) = served_with("dur-eio-fua", "store.sync=eio");
    c.request(cmd::WRITE, cmd_flags::FUA, 21, AT, LEN as u32);
    c.send(&pattern(LEN, 16));
    let r = c.simple_reply();
    assert_eq!(
        (r.handle, r.error),
        (21, errno::EIO),
        "expected the FUA write to be answered EIO"
    );
    server.wait_log("fault fired: store.sync -> eio");
    // The connection stays: a plain request after it is served.
    assert_eq!(c.read_ok(AT, 512).len(), 512);
}
