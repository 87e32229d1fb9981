//! Live migration between two real `flexnbd` processes.
//!
//! Simulated: a `flexnbd serve` source with a control socket, a `flexnbd
//! listen` destination on a fresh sparse file, operators driving `mirror`,
//! `mirror-speed`, `break`, `status` (also hammered from many threads) and
//! signals, NBD clients writing through the source while it migrates, a
//! destination killed with SIGKILL mid-copy and restarted on the same port,
//! and destinations that refuse the connection, close it, say nothing, or
//! have the wrong size.
//!
//! What must happen (docs/handoff.md; the C flexnbd's migration commands,
//! control responses and retries): a completed migration makes both
//! processes exit 0, leaves the destination byte-identical to the source
//! (holding every write acknowledged to a client) and sparse where the
//! source is, and removes the destination's
//! `.INCOMPLETE` marker, which exists with `state=receiving` from the moment
//! `listen` accepts; `--unlink` removes the source file; the control
//! commands answer their exact texts and status shows the migration's keys;
//! after `Mirror started` a lost destination is reconnected to and the copy
//! restarted; a first attempt that fails answers its exact message and leaves
//! no mirror behind; a signal mid-migration makes either end exit 1 with the
//! source file intact and the marker kept; no status request hangs during
//! the hand-off.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use flexnbd::proto::{self, Request};

use crate::harness::*;

const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------- helpers

/// A source: `serve` and its control socket.
struct Source {
    server: Flexnbd,
    sock: PathBuf,
}

/// Starts `flexnbd serve` on `file` with a control socket and waits until the
/// socket answers.
fn serve(dir: &TempDir, file: &Path) -> Source {
    let sock = dir.join(&format!(
        "src-{}.sock",
        file.file_name().unwrap().to_string_lossy()
    ));
    let args = server_args("serve", file, Some(&sock), &[]);
    let server = Flexnbd::spawn(dir, &args);
    wait_for("the source's control socket", WAIT, || {
        UnixStream::connect(&sock).ok().map(|_| ())
    });
    Source { server, sock }
}

/// Starts `flexnbd listen` on `file` at `port` (0: any).
fn listen(dir: &TempDir, file: &Path, port: u16, sock: Option<&Path>) -> Flexnbd {
    let mut args: Vec<String> = vec![
        "listen".into(),
        "-l".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-f".into(),
        file.display().to_string(),
        "-v".into(),
    ];
    if let Some(s) = sock {
        args.push("-s".into());
        args.push(s.display().to_string());
    }
    Flexnbd::spawn(dir, &args)
}

/// Runs a `flexnbd` subcommand (bounded).
fn flexnbd(args: &[&str]) -> Output {
    run_tool(BIN, args, Duration::from_secs(40))
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `flexnbd mirror -s SOCK -l 127.0.0.1 -p PORT EXTRA...`
fn mirror(sock: &Path, port: u16, extra: &[&str]) -> Output {
    run_mirror(sock, port, extra, Duration::from_secs(40))
}

/// A mirror that must start.
fn mirror_ok(sock: &Path, port: u16, extra: &[&str]) {
    let o = mirror(sock, port, extra);
    assert_eq!(
        (o.status.code(), out(&o).as_str()),
        (Some(0), "Mirror started\n"),
        "mirror {extra:?}: stderr {}",
        err(&o)
    );
}

fn mirror_speed(sock: &Path, bps: u64) -> Output {
    flexnbd(&[
        "mirror-speed",
        "-s",
        sock.to_str().unwrap(),
        "-m",
        &bps.to_string(),
    ])
}

fn break_mirror(sock: &Path) -> Output {
    flexnbd(&["break", "-s", sock.to_str().unwrap()])
}

/// Waits until the mirror is copying and has sent some data (so it is
/// really mid-copy).
fn wait_mid_copy(sock: &Path) {
    wait_status(sock, "the mirror to be copying with bytes sent", |s| {
        s.get("migration_state").map(String::as_str) == Some("copying")
            && num(s, "migration_speed") > 0
    });
}

fn assert_exit(server: &mut Flexnbd, code: i32, what: &str) {
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(code), "{what}; log:\n{}", server.log());
    server.assert_no_panic();
}

/// A sparse file of `size` bytes with pattern data in `ranges`.
fn file_with_data(dir: &TempDir, name: &str, size: u64, ranges: &[(u64, u64)]) -> PathBuf {
    let p = dir.sparse_file(name, size);
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    for (i, &(off, len)) in ranges.iter().enumerate() {
        f.write_all_at(&pattern(len as usize, i as u8 + 1), off)
            .unwrap();
    }
    f.sync_all().unwrap();
    p
}

/// A source file of 16 MiB with 8 MiB of data at its start (the part a speed
/// limit slows down) and a little more further on.
fn sixteen_mib_source(dir: &TempDir) -> PathBuf {
    file_with_data(
        dir,
        "src.img",
        16 * MIB,
        &[(0, 8 * MIB), (12 * MIB, 64 * 1024)],
    )
}

/// A port nothing listens on: bound, then dropped.
fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

// ------------------------------------------------------------ migrations

fn plain_migration(unlink: bool, tag: &str) {
    let dir = TempDir::new(tag);
    let src_file = sixteen_mib_source(&dir);
    let original = fs::read(&src_file).unwrap();
    let dest_file = dir.sparse_file("dest.img", 16 * MIB);
    let mut src = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, 0, None);

    let extra: &[&str] = if unlink { &["--unlink"] } else { &[] };
    mirror_ok(&src.sock, dest.port(), extra);
    assert_exit(&mut src.server, 0, "the source after a completed migration");
    assert_exit(&mut dest, 0, "the destination after a completed migration");

    assert_eq!(marker_state(&dest_file), None, "the marker must be gone");
    assert_eq!(fs::read(&dest_file).unwrap(), original, "destination data");
    if unlink {
        assert!(!src_file.exists(), "--unlink must remove the source file");
    } else {
        assert!(src_file.exists(), "without --unlink the source file stays");
        assert_same_files(&src_file, &dest_file);
    }
    let log = src.server.log();
    assert!(
        log.contains("clients were shut out for"),
        "the lockout time must be logged; log:\n{log}"
    );
}

#[test]
fn mirror_causes_both_ends_to_exit_0_with_identical_images_no_marker_and_the_source_kept() {
    plain_migration(false, "mig-plain");
}

#[test]
fn mirror_unlink_causes_the_source_file_to_go_and_the_destination_to_be_complete() {
    plain_migration(true, "mig-unlink");
}

/// Migrates a 256 MiB source (`serve` started with `src_extra`) holding
/// 4 MiB of data into a `listen` started with `dest_extra`, whose plan marks
/// every WRITE_ZEROES it receives. Returns whether any WRITE_ZEROES reached
/// the destination, and the source's log.
fn sparse_migration(tag: &str, src_extra: &[&str], dest_extra: &[&str]) -> (bool, String) {
    let dir = TempDir::new(tag);
    let size = 256 * MIB;
    let ranges: Vec<(u64, u64)> = (0..4).map(|i| (i * 60 * MIB + 4096, MIB)).collect();
    let src_file = file_with_data(&dir, "src.img", size, &ranges);
    let dest_file = dir.sparse_file("dest.img", size);
    let sock = dir.join("src.sock");
    let mut src = Source {
        server: Flexnbd::spawn(
            &dir,
            &server_args("serve", &src_file, Some(&sock), src_extra),
        ),
        sock,
    };
    wait_for("the source's control socket", WAIT, || {
        UnixStream::connect(&src.sock).ok().map(|_| ())
    });
    let mut args = server_args("listen", &dest_file, None, dest_extra);
    // A fault that changes nothing: its `fault fired` line marks each one.
    args.extend([
        "--faults".into(),
        "server.request_received.write_zeroes=delay(1)".into(),
    ]);
    let mut dest = Flexnbd::spawn(&dir, &args);
    mirror_ok(&src.sock, dest.port(), &[]);
    assert_exit(&mut src.server, 0, "source");
    assert_exit(&mut dest, 0, "destination");
    assert_same_files(&src_file, &dest_file);

    let (s, d) = (allocated_bytes(&src_file), allocated_bytes(&dest_file));
    assert!(
        (4 * MIB..8 * MIB).contains(&s),
        "the source should hold ~4 MiB, holds {s}"
    );
    assert!(
        d >= 4 * MIB && d <= s + 2 * MIB,
        "the destination allocated {d} bytes for a source that allocated {s} (of {size})"
    );
    (
        dest.log()
            .contains("fault fired: server.request_received.write_zeroes"),
        src.server.log(),
    )
}

#[test]
fn a_mostly_sparse_source_causes_a_destination_about_as_sparse() {
    // The default greeting (flags 13) does not offer WRITE_ZEROES, so holes
    // travel as zeros, which the destination keeps as holes.
    let (zeroes, _) = sparse_migration("mig-sparse", &[], &[]);
    assert!(
        !zeroes,
        "WRITE_ZEROES reached a destination that did not advertise it"
    );
}

#[test]
fn a_destination_with_oldstyle_extra_flags_receives_holes_as_write_zeroes() {
    let (zeroes, _) = sparse_migration("mig-sparse-extra", &[], &["--oldstyle-extra-flags"]);
    assert!(zeroes, "the holes should have travelled as WRITE_ZEROES");
}

#[test]
fn a_source_whose_allocation_map_is_not_built_migrates_at_once_with_its_holes_as_holes() {
    // The source's map scan held back for 10 minutes: the sweep must not
    // wait for it, and must still tell holes from data (from the file).
    let (zeroes, src_log) = sparse_migration(
        "mig-sparse-unbuilt",
        &["--faults", "store.map_scan=slow(600000)"],
        &["--oldstyle-extra-flags"],
    );
    assert!(
        src_log.contains("fault fired: store.map_scan -> slow(600000)"),
        "the scan must have been held back; log:\n{src_log}"
    );
    assert!(
        !src_log.contains("allocation map built"),
        "the map must still be unbuilt for this test to mean anything"
    );
    assert!(zeroes, "the holes should have travelled as WRITE_ZEROES");
}

#[test]
fn listen_starting_causes_a_receiving_marker_and_no_control_before_anything_connects() {
    let dir = TempDir::new("mig-marker");
    let dest_file = dir.sparse_file("dest.img", 16 * MIB);
    let sock = dir.join("dest.sock");
    assert!(!marker_path(&dest_file).exists());
    let dest = listen(&dir, &dest_file, 0, Some(&sock));
    // `spawn` returned as soon as the port was listening.
    assert_eq!(marker_state(&dest_file).as_deref(), Some("receiving"));
    wait_for("the destination's control socket", WAIT, || {
        UnixStream::connect(&sock).ok().map(|_| ())
    });
    let s = status(&sock);
    assert_eq!(s["has_control"], "false", "{s:?}");
    assert_eq!(s["is_mirroring"], "false", "{s:?}");
    // A `listen` cannot mirror.
    let o = mirror(&sock, dest.port(), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
}

// ------------------------------------------------ clients writing meanwhile

/// One client write: where, what, and whether the server acknowledged it.
pub(crate) struct ClientWrite {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// What one client thread saw: its acknowledged writes in order, and the
/// write that was in flight when its connection was cut (maybe applied).
#[derive(Default)]
pub(crate) struct ClientLog {
    pub acked: Vec<ClientWrite>,
    pub in_flight: Option<ClientWrite>,
    /// The longest time an acknowledged write took, request to reply.
    pub longest: Duration,
}

pub(crate) const BLOCK: u64 = 4096;
pub(crate) const CLIENTS: u64 = 3;

/// A client on a persistent connection writing random 4 KiB blocks (only
/// blocks `b` with `b % CLIENTS == id`, so clients never overlap and each
/// client's acks are ordered) until its connection is cut.
pub(crate) fn client_writer(
    addr: std::net::SocketAddr,
    id: u64,
    blocks: u64,
    acks: Arc<AtomicU64>,
) -> thread::JoinHandle<ClientLog> {
    thread::spawn(move || {
        let mut c = RawClient::connect(addr);
        c.oldstyle_greeting();
        let mut log = ClientLog::default();
        let mut rng = 0x1234_5678_9abc_def1u64 ^ (id << 40);
        for seq in 0u64.. {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let block = (rng % (blocks / CLIENTS)) * CLIENTS + id;
            let offset = block * BLOCK;
            let mut data = pattern(BLOCK as usize, (seq % 251) as u8);
            data[..16].copy_from_slice(&[&id.to_be_bytes()[..], &seq.to_be_bytes()[..]].concat());
            let handle = (id << 48) | seq;
            let req = Request::new(proto::cmd::WRITE, 0, handle, offset, BLOCK as u32).encode();
            log.in_flight = Some(ClientWrite { offset, data });
            let payload = &log.in_flight.as_ref().unwrap().data;
            let sent = std::time::Instant::now();
            if c.stream.write_all(&req).is_err() || c.stream.write_all(payload).is_err() {
                break;
            }
            let mut reply = [0u8; proto::SIMPLE_REPLY_LEN];
            if c.stream.read_exact(&mut reply).is_err() {
                break;
            }
            let r = proto::SimpleReply::decode(&reply);
            assert_eq!(r.magic, proto::SIMPLE_REPLY_MAGIC, "reply magic");
            assert_eq!(r.handle, handle, "reply handle");
            if r.error != 0 {
                // Not acknowledged: the server refused it (nothing applied).
                log.in_flight = None;
                break;
            }
            log.longest = log.longest.max(sent.elapsed());
            log.acked.push(log.in_flight.take().unwrap());
            acks.fetch_add(1, Ordering::Relaxed);
        }
        log
    })
}

/// Fails unless `file` holds `base` overwritten by every acknowledged write
/// in `logs`, the last per block winning; the write in flight when a
/// client was cut off may or may not have landed.
pub(crate) fn assert_holds_acked_writes(file: &Path, mut base: Vec<u8>, logs: &[ClientLog]) {
    let data = fs::read(file).unwrap();
    assert_eq!(data.len(), base.len(), "size of {}", file.display());
    let mut maybe: HashMap<u64, Vec<u8>> = HashMap::new();
    for log in logs {
        for w in &log.acked {
            let o = w.offset as usize;
            base[o..o + BLOCK as usize].copy_from_slice(&w.data);
        }
        if let Some(w) = &log.in_flight {
            maybe.insert(w.offset, w.data.clone());
        }
    }
    for block in 0..base.len() as u64 / BLOCK {
        let o = (block * BLOCK) as usize;
        let got = &data[o..o + BLOCK as usize];
        let want = &base[o..o + BLOCK as usize];
        if got != want && maybe.get(&(o as u64)).map(Vec::as_slice) != Some(got) {
            panic!(
                "{} block {block} (offset {o}) lacks the last acknowledged write \
                 (got {:02x?}.., want {:02x?}..)",
                file.display(),
                &got[..16],
                &want[..16]
            );
        }
    }
}

fn migration_under_client_writes(unlink: bool, tag: &str) {
    let dir = TempDir::new(tag);
    let size = 16 * MIB;
    let src_file = sixteen_mib_source(&dir);
    let expected = fs::read(&src_file).unwrap();
    let dest_file = dir.sparse_file("dest.img", size);
    let mut src = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, 0, None);

    let acks: Vec<Arc<AtomicU64>> = (0..CLIENTS).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|id| client_writer(src.server.addr, id, size / BLOCK, acks[id as usize].clone()))
        .collect();
    let total = || acks.iter().map(|a| a.load(Ordering::Relaxed)).sum::<u64>();
    wait_for("every client to have written", WAIT, || {
        acks.iter()
            .all(|a| a.load(Ordering::Relaxed) > 10)
            .then_some(())
    });

    // Throttled, so the clients keep writing during the copy.
    let mut extra = vec!["-m", "4000000"];
    if unlink {
        extra.push("-u");
    }
    mirror_ok(&src.sock, dest.port(), &extra);
    wait_mid_copy(&src.sock);
    let before = total();
    wait_for("clients to write during the copy", WAIT, || {
        (total() > before + 300).then_some(())
    });
    assert_eq!(status(&src.sock)["migration_state"], "copying");
    let o = mirror_speed(&src.sock, 1 << 40);
    assert_eq!(out(&o), "updated\n", "mirror-speed: {}", err(&o));

    assert_exit(&mut src.server, 0, "source");
    assert_exit(&mut dest, 0, "destination");
    let logs: Vec<ClientLog> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(marker_state(&dest_file), None);

    assert_holds_acked_writes(&dest_file, expected, &logs);
    let acked: usize = logs.iter().map(|l| l.acked.len()).sum();
    assert!(acked > 300, "only {acked} writes were acknowledged");
    if unlink {
        assert!(!src_file.exists(), "--unlink must remove the source file");
    } else {
        assert_same_files(&src_file, &dest_file);
    }
}

#[test]
fn clients_writing_during_a_migration_cause_every_acked_write_on_the_destination() {
    migration_under_client_writes(false, "mig-writers");
}

#[test]
fn clients_writing_during_an_unlink_migration_cause_every_acked_write_on_the_destination() {
    migration_under_client_writes(true, "mig-writers-unlink");
}

// ------------------------------------------------------- control commands

#[test]
fn three_start_break_cycles_then_a_mirror_cause_a_completed_migration() {
    let dir = TempDir::new("mig-break");
    let size = 100 * MIB;
    let src_file = file_with_data(
        &dir,
        "src.img",
        size,
        &[(0, 2 * MIB), (50 * MIB, MIB), (99 * MIB, MIB)],
    );
    let dest_file = dir.sparse_file("dest.img", size);
    let mut src = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, 0, None);

    for cycle in 0..3 {
        // 1 MB/s: the copy of the first 2 MiB is surely running at `break`.
        mirror_ok(&src.sock, dest.port(), &["-m", "1000000"]);
        wait_mid_copy(&src.sock);
        let o = break_mirror(&src.sock);
        assert_eq!(
            (o.status.code(), out(&o).as_str()),
            (Some(0), "mirror stopped\n"),
            "break in cycle {cycle}: {}",
            err(&o)
        );
        let s = status(&src.sock);
        assert_eq!(s["is_mirroring"], "false", "after break {cycle}: {s:?}");
        assert_eq!(s["clients_allowed"], "true", "after break {cycle}: {s:?}");
        assert!(!s.contains_key("migration_state"), "{s:?}");
        assert!(dest.is_running(), "the destination must keep waiting");
    }
    let o = break_mirror(&src.sock);
    assert_eq!(
        (o.status.code(), err(&o).as_str()),
        (Some(1), "not mirroring\n")
    );

    mirror_ok(&src.sock, dest.port(), &[]);
    assert_exit(&mut src.server, 0, "source after the final mirror");
    assert_exit(&mut dest, 0, "destination after the final mirror");
    assert_same_files(&src_file, &dest_file);
    assert_eq!(marker_state(&dest_file), None);
}

#[test]
fn a_second_mirror_while_one_runs_causes_already_running_and_the_first_to_complete() {
    let dir = TempDir::new("mig-twice");
    let src_file = sixteen_mib_source(&dir);
    let dest_file = dir.sparse_file("dest.img", 16 * MIB);
    let other_file = dir.sparse_file("other.img", 16 * MIB);
    let mut src = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, 0, None);
    let other_sock = dir.join("other.sock");
    let mut other = listen(&dir, &other_file, 0, Some(&other_sock));
    wait_for("the second target's control socket", WAIT, || {
        UnixStream::connect(&other_sock).ok().map(|_| ())
    });

    mirror_ok(&src.sock, dest.port(), &["-m", "2000000"]);
    wait_mid_copy(&src.sock);
    let o = mirror(&src.sock, other.port(), &["-m", "5000000"]);
    assert_eq!(
        (o.status.code(), err(&o).as_str(), out(&o).as_str()),
        (Some(1), "mirror already running\n", ""),
    );
    let s = status(&src.sock);
    assert_eq!(s["migration_attempt"], "1", "{s:?}");
    assert_eq!(s["migration_speed_limit"], "2000000", "{s:?}");
    let o = status(&other_sock);
    assert_eq!(
        o["num_clients"], "0",
        "nothing may connect to the second target"
    );
    assert!(
        !other.log().contains("client 127.0.0.1"),
        "nothing may connect to the second target; its log:\n{}",
        other.log()
    );

    assert_eq!(out(&mirror_speed(&src.sock, 1 << 40)), "updated\n");
    assert_exit(&mut src.server, 0, "source");
    assert_exit(&mut dest, 0, "destination");
    assert_same_files(&src_file, &dest_file);
    assert!(
        other.is_running(),
        "the second target was never migrated to"
    );
    assert_eq!(marker_state(&other_file).as_deref(), Some("receiving"));
}

#[test]
fn mirror_speed_causes_the_status_speed_limit_to_change() {
    let dir = TempDir::new("mig-speed");
    let src_file = sixteen_mib_source(&dir);
    let dest_file = dir.sparse_file("dest.img", 16 * MIB);
    let mut src = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, 0, None);

    let o = mirror_speed(&src.sock, 1000);
    assert_eq!(
        (o.status.code(), err(&o).as_str()),
        (Some(1), "Not currently mirroring\n")
    );

    mirror_ok(&src.sock, dest.port(), &["-m", "1000000"]);
    wait_mid_copy(&src.sock);
    assert_eq!(status(&src.sock)["migration_speed_limit"], "1000000");
    let o = mirror_speed(&src.sock, 2_000_000);
    assert_eq!((o.status.code(), out(&o).as_str()), (Some(0), "updated\n"));
    assert_eq!(status(&src.sock)["migration_speed_limit"], "2000000");

    // 0 pauses the copy.
    assert_eq!(out(&mirror_speed(&src.sock, 0)), "updated\n");
    let paused = status(&src.sock);
    assert_eq!(paused["migration_speed_limit"], "0");
    let before = allocated_bytes(&dest_file);
    // Not synchronisation: proves the copy does not advance while paused. At
    // 2 MB/s a second would add ~2 MB; pieces already past the throttle
    // (200 kB each) may still land.
    thread::sleep(Duration::from_secs(1));
    let still = status(&src.sock);
    let after = allocated_bytes(&dest_file);
    assert!(
        after - before <= 512 * 1024,
        "the paused copy wrote {} bytes to the destination in 1 s",
        after - before
    );
    assert_eq!(still["migration_state"], "copying");

    assert_eq!(out(&mirror_speed(&src.sock, 1 << 40)), "updated\n");
    assert_exit(&mut src.server, 0, "source");
    assert_exit(&mut dest, 0, "destination");
    assert_same_files(&src_file, &dest_file);
}

#[test]
fn a_throttled_mirror_causes_sane_status_keys_in_order_and_in_json() {
    let dir = TempDir::new("mig-status");
    let size = 16 * MIB;
    let src_file = sixteen_mib_source(&dir);
    let dest_file = dir.sparse_file("dest.img", size);
    let src = serve(&dir, &src_file);
    let dest = listen(&dir, &dest_file, 0, None);

    let limit = 1_000_000u64;
    mirror_ok(&src.sock, dest.port(), &["-m", &limit.to_string()]);
    wait_mid_copy(&src.sock);
    let (keys, s) = try_status(&src.sock).unwrap();
    assert_eq!(
        keys,
        [
            "pid",
            "size",
            "is_mirroring",
            "clients_allowed",
            "num_clients",
            "has_control",
            "migration_speed",
            "migration_duration",
            "migration_seconds_left",
            "migration_bytes_left",
            "migration_speed_limit",
            "migration_attempt",
            "migration_state",
            "migration_window",
        ],
        "{s:?}"
    );
    assert_eq!(num(&s, "pid"), src.server.server_pid as u64);
    assert_eq!(num(&s, "size"), size);
    assert_eq!(s["is_mirroring"], "true");
    assert_eq!(s["clients_allowed"], "true");
    assert_eq!(s["has_control"], "true");
    assert_eq!(s["migration_attempt"], "1");
    assert_eq!(s["migration_state"], "copying");
    // Held back by the speed limit, the window never filled: it stays at
    // its start (core::window::START).
    assert_eq!(num(&s, "migration_window"), 8 << 20);
    assert_eq!(num(&s, "migration_speed_limit"), limit);
    let (speed, left) = (num(&s, "migration_speed"), num(&s, "migration_bytes_left"));
    assert!(speed <= 2 * limit, "speed {speed} over a limit of {limit}");
    assert!(left > 0 && left <= size, "bytes_left {left}");
    assert_eq!(num(&s, "migration_seconds_left"), left / (speed + 1));
    assert!(num(&s, "migration_duration") < 15);

    // Progress shows.
    wait_status(&src.sock, "bytes_left to fall", |t| {
        num(t, "migration_bytes_left") < left
    });

    let o = flexnbd(&["status", "-s", src.sock.to_str().unwrap(), "--json"]);
    let json = out(&o);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(json.trim_start().starts_with('{') && json.trim_end().ends_with('}'));
    for needle in [
        "\"is_mirroring\":true",
        "\"migration_state\":\"copying\"",
        "\"migration_attempt\":1",
        &format!("\"migration_speed_limit\":{limit}"),
        &format!("\"size\":{size}"),
    ] {
        assert!(json.contains(needle), "{needle} missing from {json}");
    }
}

#[test]
fn mirror_wait_causes_progress_lines_ending_with_migration_complete() {
    let dir = TempDir::new("mig-wait");
    let src_file = sixteen_mib_source(&dir);
    let dest_file = dir.sparse_file("dest.img", 16 * MIB);
    let mut src = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, 0, None);

    // ~2.5 s of copying: a few progress lines.
    let o = mirror(&src.sock, dest.port(), &["--wait", "-m", "4000000"]);
    let text = out(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout:\n{text}\nstderr:\n{}",
        err(&o)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"Mirror started"), "{text}");
    assert_eq!(lines.last(), Some(&"migration complete"), "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("migration ") && l.contains('%')),
        "no progress line in:\n{text}"
    );
    assert!(!text.contains('\r'), "no terminal bar when not a terminal");
    assert_exit(&mut src.server, 0, "source");
    assert_exit(&mut dest, 0, "destination");
    assert_same_files(&src_file, &dest_file);
}

// ------------------------------------------------------------------ retry

#[test]
fn a_killed_destination_restarted_on_the_same_port_causes_a_retry_that_completes() {
    let dir = TempDir::new("mig-retry");
    let src_file = sixteen_mib_source(&dir);
    let dest_file = dir.sparse_file("dest.img", 16 * MIB);
    let mut src = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, 0, None);
    let port = dest.port();

    mirror_ok(&src.sock, port, &["-m", "1000000"]);
    wait_mid_copy(&src.sock);
    dest.signal(libc::SIGKILL);
    dest.wait_exit();
    assert_eq!(marker_state(&dest_file).as_deref(), Some("receiving"));

    let mut dest2 = listen(&dir, &dest_file, port, None);
    assert_eq!(dest2.port(), port);
    wait_status(&src.sock, "a second attempt copying", |s| {
        num(s, "migration_attempt") >= 2 && s["migration_state"] == "copying"
    });
    let s = status(&src.sock);
    assert_eq!(s["is_mirroring"], "true", "{s:?}");
    assert_eq!(out(&mirror_speed(&src.sock, 1 << 40)), "updated\n");

    assert_exit(&mut src.server, 0, "source after the retried migration");
    assert_exit(&mut dest2, 0, "the restarted destination");
    assert_same_files(&src_file, &dest_file);
    assert_eq!(marker_state(&dest_file), None);
    assert!(
        src.server.log().contains("retrying"),
        "the failed attempt must be logged"
    );
}

// ------------------------------------------------- first-attempt failures

/// After a first attempt answered `message`: no mirror is left (status,
/// `break`), a valid mirror then completes, and a second source that saw the
/// same failure exits 0 on SIGTERM.
fn first_failure_leaves_no_mirror(tag: &str, message: &str, target: impl Fn() -> u16) {
    let dir = TempDir::new(tag);
    let src_file = sixteen_mib_source(&dir);
    let other_file = dir.pattern_file("other.img", MIB, 7);

    for then_sigterm in [true, false] {
        let file = if then_sigterm { &other_file } else { &src_file };
        let mut src = serve(&dir, file);
        let dest_size = fs::metadata(file).unwrap().len();
        let o = mirror(&src.sock, target(), &[]);
        assert_eq!(
            (o.status.code(), err(&o), out(&o)),
            (Some(1), format!("{message}\n"), String::new()),
        );
        let s = status(&src.sock);
        assert_eq!(s["is_mirroring"], "false", "{s:?}");
        assert_eq!(s["clients_allowed"], "true", "{s:?}");
        let o = break_mirror(&src.sock);
        assert_eq!(err(&o), "not mirroring\n");

        if then_sigterm {
            src.server.signal(libc::SIGTERM);
            assert_exit(&mut src.server, 0, "SIGTERM after a failed first attempt");
            continue;
        }
        let dest_file = dir.sparse_file("dest.img", dest_size);
        let mut dest = listen(&dir, &dest_file, 0, None);
        mirror_ok(&src.sock, dest.port(), &[]);
        assert_exit(&mut src.server, 0, "source after a valid mirror");
        assert_exit(&mut dest, 0, "destination");
        assert_same_files(file, &dest_file);
    }
}

#[test]
fn a_refused_connection_causes_mirror_failed_to_connect_and_no_mirror_left() {
    first_failure_leaves_no_mirror("mig-refused", "Mirror failed to connect", dead_port);
}

#[test]
fn a_different_size_destination_causes_a_size_mismatch_and_no_mirror_left() {
    let dir = TempDir::new("mig-size-dest");
    let wrong = dir.sparse_file("wrong.img", 8 * MIB);
    let dest = listen(&dir, &wrong, 0, None);
    let port = dest.port();
    first_failure_leaves_no_mirror("mig-size", "Remote size does not match local size", || port);
    assert!(
        !dest.log().contains("panicked") && marker_state(&wrong).as_deref() == Some("receiving")
    );
    let wrong_data = fs::read(&wrong).unwrap();
    assert!(wrong_data.iter().all(|&b| b == 0), "nothing may be written");
}

#[test]
fn a_destination_closing_at_once_causes_mirror_was_rejected_and_no_mirror_left() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    l.set_nonblocking(true).unwrap();
    let closer = thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => drop(s),
                // Polling a non-blocking accept, not synchronisation.
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    first_failure_leaves_no_mirror("mig-rejected", "Mirror was rejected", || port);
    stop.store(true, Ordering::Relaxed);
    closer.join().unwrap();
}

#[test]
fn a_silent_destination_causes_remote_server_failed_to_respond_after_5_s() {
    let dir = TempDir::new("mig-silent");
    let src_file = sixteen_mib_source(&dir);
    let mut src = serve(&dir, &src_file);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let started = Instant::now();
    let o = mirror(&src.sock, port, &[]);
    let took = started.elapsed();
    assert_eq!(
        (o.status.code(), err(&o).as_str()),
        (Some(1), "Remote server failed to respond\n")
    );
    assert!(
        took >= Duration::from_millis(4500) && took < Duration::from_secs(10),
        "the greeting deadline is 5 s; answered after {took:?}"
    );
    drop(l);
    assert_eq!(status(&src.sock)["is_mirroring"], "false");
    src.server.signal(libc::SIGTERM);
    assert_exit(&mut src.server, 0, "SIGTERM after a failed first attempt");
}

// ---------------------------------------------------------------- signals

#[test]
fn sigterm_to_the_source_mid_mirror_causes_exit_1_and_an_intact_source_file() {
    let dir = TempDir::new("mig-term-src");
    let src_file = sixteen_mib_source(&dir);
    let original = fs::read(&src_file).unwrap();
    let dest_file = dir.sparse_file("dest.img", 16 * MIB);
    let mut src = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, 0, None);

    mirror_ok(&src.sock, dest.port(), &["-m", "1000000", "-u"]);
    wait_mid_copy(&src.sock);
    src.server.signal(libc::SIGTERM);
    assert_exit(&mut src.server, 1, "SIGTERM to a mirroring source");
    assert_eq!(fs::read(&src_file).unwrap(), original, "source file intact");
    assert!(dest.is_running(), "the destination keeps waiting");
    assert_eq!(marker_state(&dest_file).as_deref(), Some("receiving"));
}

#[test]
fn sigterm_to_listen_mid_mirror_causes_exit_1_and_the_marker_kept() {
    let dir = TempDir::new("mig-term-dest");
    let src_file = sixteen_mib_source(&dir);
    let dest_file = dir.sparse_file("dest.img", 16 * MIB);
    let src = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, 0, None);

    mirror_ok(&src.sock, dest.port(), &["-m", "1000000"]);
    wait_mid_copy(&src.sock);
    dest.signal(libc::SIGTERM);
    assert_exit(&mut dest, 1, "SIGTERM to a receiving destination");
    assert_eq!(marker_state(&dest_file).as_deref(), Some("receiving"));
    assert!(src_file.exists());
}

#[test]
fn sigterm_to_an_idle_listen_causes_exit_1_and_the_marker_kept() {
    let dir = TempDir::new("mig-term-idle");
    let dest_file = dir.sparse_file("dest.img", 16 * MIB);
    let mut dest = listen(&dir, &dest_file, 0, None);
    dest.signal(libc::SIGTERM);
    assert_exit(&mut dest, 1, "SIGTERM to an idle destination");
    assert_eq!(marker_state(&dest_file).as_deref(), Some("receiving"));
}

// ------------------------------------------------------ status storm

#[test]
fn a_status_storm_during_the_hand_off_causes_no_hang_and_a_completed_migration() {
    let dir = TempDir::new("mig-storm");
    let src_file = sixteen_mib_source(&dir);
    let dest_file = dir.sparse_file("dest.img", 16 * MIB);
    let mut src = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, 0, None);

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let stormers: Vec<_> = (0..4)
        .map(|_| {
            let (sock, stop, answered) = (src.sock.clone(), stop.clone(), answered.clone());
            thread::spawn(move || {
                let mut bad = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = UnixStream::connect(&sock) else {
                        // Gone: a connection error is fine. The pause only
                        // keeps this loop from starving the two processes.
                        thread::sleep(Duration::from_millis(1));
                        continue;
                    };
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                    if s.write_all(b"status\n\n").is_err() {
                        continue;
                    }
                    let mut got = Vec::new();
                    let started = Instant::now();
                    match s.read_to_end(&mut got) {
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut =>
                        {
                            bad.push(format!("hung for {:?}", started.elapsed()))
                        }
                        Err(_) => {}
                        Ok(_) if got.is_empty() => {}
                        Ok(_) => {
                            let text = String::from_utf8_lossy(&got);
                            if text.starts_with("0: pid=") && text.ends_with(" \n") {
                                answered.fetch_add(1, Ordering::Relaxed);
                            } else {
                                bad.push(format!("partial response {text:?}"));
                            }
                        }
                    }
                }
                bad
            })
        })
        .collect();

    wait_for("status answers", WAIT, || {
        (answered.load(Ordering::Relaxed) > 20).then_some(())
    });
    mirror_ok(&src.sock, dest.port(), &["-m", "8000000"]);
    assert_exit(&mut src.server, 0, "source under a status storm");
    assert_exit(&mut dest, 0, "destination");
    stop.store(true, Ordering::Relaxed);
    let bad: Vec<String> = stormers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(bad.is_empty(), "status requests went wrong: {bad:?}");
    assert_same_files(&src_file, &dest_file);
}

#[test]
fn mirror_wait_on_a_terminal_causes_a_progress_bar() {
    // `script` gives the command a real pseudo-terminal, as an operator's
    // shell would: the progress is a redrawn bar (`\r[###   ] 42.0% ...`),
    // not lines, and the outcome still ends the output.
    let dir = TempDir::new("mig-wait-tty");
    let src_file = sixteen_mib_source(&dir);
    let dest_file = dir.sparse_file("dest.img", 16 * MIB);
    let mut src = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, 0, None);
    let command = format!(
        "{BIN} mirror -s {} -l 127.0.0.1 -p {} --wait -m 4000000",
        src.sock.display(),
        dest.port()
    );
    let o = run_tool(
        "script",
        &["-qec", &command, "/dev/null"],
        Duration::from_secs(30),
    );
    let text = out(&o);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(text.contains("Mirror started"), "{text}");
    assert!(
        text.contains("\r["),
        "a redrawn bar on a terminal:\n{text:?}"
    );
    assert!(text.contains('%') && text.contains("copying"), "{text:?}");
    assert!(text.trim_end().ends_with("migration complete"), "{text:?}");
    assert_exit(&mut src.server, 0, "source");
    assert_exit(&mut dest, 0, "destination");
    assert_same_files(&src_file, &dest_file);
}
