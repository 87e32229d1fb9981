//! Migrations between two hosts (network namespaces joined by a veth pair,
//! see `netns.rs`), as an operator runs them across a network: `serve` on
//! host A, `listen` on host B, `mirror` to B's address.
//!
//! What must happen: `--bind` picks the source address and the destination's
//! ACL matches it; IPv6 works between hosts; a blackhole or a partition in
//! the middle of the copy, at the entrust or at the disconnect is noticed by
//! the source within its no-progress timeout, the source goes on serving its
//! clients (their writes are acknowledged and reach the destination), keeps
//! retrying, and resumes once the link is back; `status` and `break` answer
//! at once while the destination is behind a blackhole. Every migration ends
//! with the verdict table's "destination canonical" row and identical data.
//! Over `flexnbd-linkem` on loopback: the window grows across a long round
//! trip, and a link slower than the clients write converges with them paced
//! while `status` says when the cut-off is expected.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::netns::{hosts_or_skip, Hosts};

const MIB: u64 = 1024 * 1024;
const PROXY: &str = env!("CARGO_BIN_EXE_flexnbd-proxy");
/// The no-progress timeout the sources here run with: short, so that a
/// blackhole is noticed quickly.
const LIMIT_SECS: &str = "2";
/// The link: 200 Mbit/s, so that the copies below take seconds and an
/// interruption can be placed in their middle.
const MBIT: u32 = 200;
/// 96 MiB with 80 MiB of data: checkpoint 1 comes after 64 MiB of data
/// (the least interval), so an interruption after it has something to
/// resume from.
const SIZE: u64 = 96 * MIB;
const DATA: u64 = 80 * MIB;

/// `flexnbd ARGS` inside namespace `ns`, with `env`; reports its port.
fn spawn_in(dir: &TempDir, ns: &str, args: &[String], env: &[(&str, &str)]) -> Flexnbd {
    let mut full: Vec<String> = Hosts::exec_prefix(ns);
    full.push("/usr/bin/env".into());
    full.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    full.push(BIN.into());
    full.extend(args.iter().cloned());
    Flexnbd::spawn_program(dir, "ip", &full)
}

/// A source image: `DATA` of patterned data, then a hole.
fn source_image(dir: &TempDir) -> PathBuf {
    let p = dir.sparse_file("src.img", SIZE);
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&pattern(DATA as usize, 7), 0).unwrap();
    f.sync_all().unwrap();
    p
}

/// `mirror` to `addr:port` through the source's control socket.
fn mirror(sock: &Path, addr: &str, port: u16, extra: &[&str]) -> std::process::Output {
    let port = port.to_string();
    let mut args = vec![
        "mirror",
        "-s",
        sock.to_str().unwrap(),
        "-l",
        addr,
        "-p",
        &port,
    ];
    args.extend_from_slice(extra);
    run_tool(BIN, &args, Duration::from_secs(30))
}

fn assert_started(o: &std::process::Output) {
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()),
        (Some(0), "Mirror started\n"),
        "mirror: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Waits for both processes to exit 0 (the migration completed).
fn wait_completed(src: &mut Flexnbd, dest: &mut Flexnbd, limit: Duration) {
    wait_exit_0(src, "the source", limit);
    wait_exit_0(dest, "the destination", limit);
}

fn wait_exit_0(p: &mut Flexnbd, what: &str, limit: Duration) {
    let status = p.wait_exit_within(limit);
    assert_eq!(
        status.code(),
        Some(0),
        "{what} exit status; log:\n{}",
        p.log()
    );
}

/// The verdict table's row "destination complete and canonical": a
/// completion record, no marker.
fn assert_destination_canonical(dest_file: &Path) {
    let record = PathBuf::from(format!("{}.COMPLETE", dest_file.display()));
    let marker = PathBuf::from(format!("{}.INCOMPLETE", dest_file.display()));
    assert!(record.exists(), "no completion record {}", record.display());
    assert!(!marker.exists(), "the marker {} is left", marker.display());
}

/// One migration from host A to host B (over IPv4 or IPv6). Fields drop
/// in order: the processes (whose logs a failing test prints) before the
/// hosts and the directory, which is kept only to outlive them.
struct Run {
    src: Flexnbd,
    dest: Flexnbd,
    hosts: Hosts,
    src_file: PathBuf,
    dest_file: PathBuf,
    sock: PathBuf,
    _dir: TempDir,
}

impl Run {
    fn start(hosts: Hosts, tag: &str, six: bool, listen_extra: &[&str]) -> Run {
        let dir = TempDir::new(tag);
        let src_file = source_image(&dir);
        let dest_file = dir.sparse_file("dest.img", SIZE);
        let sock = dir.join("src.sock");
        let (a, b) = if six {
            (hosts.a6.to_string(), hosts.b6.to_string())
        } else {
            (hosts.a4.to_string(), hosts.b4.to_string())
        };
        let env = [
            ("FLEXNBD_MS_REQUEST_LIMIT_SECS", LIMIT_SECS),
            ("FLEXNBD_CHECKPOINT_GAP_MS", "0"),
        ];
        let src = spawn_in(
            &dir,
            &hosts.a,
            &server_args_at("serve", &a, 0, &src_file, Some(&sock), &[]),
            &env,
        );
        let dest = spawn_in(
            &dir,
            &hosts.b,
            &server_args_at("listen", &b, 0, &dest_file, None, listen_extra),
            &[],
        );
        Run {
            src,
            dest,
            hosts,
            src_file,
            dest_file,
            sock,
            _dir: dir,
        }
    }

    fn dest_addr(&self) -> String {
        self.dest.addr.ip().to_string()
    }

    /// A client on host A writes `data` at `at` through the source and
    /// is acknowledged.
    fn client_write(&self, at: u64, data: &[u8]) {
        let port = self.src.port().to_string();
        let (from, len) = (at.to_string(), data.len().to_string());
        let addr = self.src.addr.ip().to_string();
        let mut args: Vec<String> = Hosts::exec_prefix(&self.hosts.a);
        args.extend(
            [
                BIN, "write", "-l", &addr, "-p", &port, "-F", &from, "-S", &len,
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run_tool_with_input("ip", &args, Some(data), WAIT);
        assert!(
            o.status.success(),
            "a client's write through the source failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Waits until the copy has at most `left` bytes to go.
    fn wait_left(&self, left: u64) {
        wait_for("the copy to make progress", Duration::from_secs(30), || {
            let s = try_status(&self.sock)?.1;
            let now = s.get("migration_bytes_left")?.parse::<u64>().ok()?;
            (now <= left).then_some(())
        });
    }
}

#[test]
fn a_migration_between_hosts_binds_its_source_address_and_the_acl_matches_it() {
    let Some(hosts) = hosts_or_skip("bind") else {
        return;
    };
    let a4 = hosts.a4.to_string();
    // Only host A's address may send; the source binds it explicitly.
    let mut run = Run::start(hosts, "wan-bind", false, &[&a4]);
    let o = mirror(
        &run.sock,
        &run.dest_addr(),
        run.dest.port(),
        &["--bind", &a4],
    );
    assert_started(&o);
    wait_completed(&mut run.src, &mut run.dest, Duration::from_secs(60));
    assert!(
        run.dest.log().contains(&format!("{a4}:")),
        "the destination should name the sender at {a4}; log:\n{}",
        run.dest.log()
    );
    assert_destination_canonical(&run.dest_file);
    assert_same_files(&run.src_file, &run.dest_file);
}

#[test]
fn a_destination_whose_acl_names_another_address_refuses_the_source() {
    let Some(hosts) = hosts_or_skip("acl") else {
        return;
    };
    let run = Run::start(hosts, "wan-acl", false, &["198.18.0.9"]);
    let o = mirror(&run.sock, &run.dest_addr(), run.dest.port(), &[]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "mirror to a destination that refuses us; stdout: {} stderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    run.dest
        .wait_log(&format!("rejecting client {}:", run.hosts.a4));
}

#[test]
fn a_migration_between_hosts_over_ipv6_completes() {
    let Some(hosts) = hosts_or_skip("ipv6") else {
        return;
    };
    let a6 = hosts.a6.to_string();
    let mut run = Run::start(hosts, "wan-ipv6", true, &[&a6]);
    assert!(run.dest.addr.is_ipv6(), "listen on {}", run.dest.addr);
    let o = mirror(
        &run.sock,
        &run.dest_addr(),
        run.dest.port(),
        &["--bind", &a6],
    );
    assert_started(&o);
    wait_completed(&mut run.src, &mut run.dest, Duration::from_secs(60));
    assert_destination_canonical(&run.dest_file);
    assert_same_files(&run.src_file, &run.dest_file);
}

/// What breaks the link in the middle of the copy.
#[derive(Clone, Copy, Debug)]
enum Break {
    Blackhole,
    Partition,
}

fn cut(hosts: &Hosts, how: Break, broken: bool) {
    match how {
        Break::Blackhole => hosts.blackhole(broken),
        Break::Partition => hosts.link_up(!broken),
    }
}

/// The link breaks when the copy is half done; the source notices within
/// its no-progress timeout and goes on serving (a client's write is
/// acknowledged meanwhile); the link comes back and the migration resumes
/// and completes with the client's write on the destination.
fn broken_mid_copy(tag: &str, how: Break) {
    let Some(hosts) = hosts_or_skip(tag) else {
        return;
    };
    hosts.shape(MBIT);
    let mut run = Run::start(hosts, tag, false, &["--oldstyle-extra-flags"]);
    let o = mirror(&run.sock, &run.dest_addr(), run.dest.port(), &[]);
    assert_started(&o);
    run.src.wait_log("checkpoint 1 of migration");
    // Nothing failed before the link broke: a shaped link alone must not
    // look like a stall (replies held back behind a stream of writes did).
    assert!(
        !run.src.log().contains("failed"),
        "the copy failed before the link broke; log:\n{}",
        run.src.log()
    );
    cut(&run.hosts, how, true);
    let broke = Instant::now();
    run.src.wait_log("no progress for");
    let noticed = broke.elapsed();
    assert!(
        noticed < Duration::from_secs(2 * 2 + 2),
        "noticed after {noticed:?}; the limit is {LIMIT_SECS} s"
    );
    // The source serves on while the link is down.
    let written = pattern(64 * 1024, 99);
    run.client_write(MIB, &written);
    // A retry or two fail while the link is down; then it comes back.
    wait_for(
        "a retry while the link is down",
        Duration::from_secs(30),
        || (run.src.log().matches("migration attempt").count() >= 2).then_some(()),
    );
    cut(&run.hosts, how, false);
    wait_completed(&mut run.src, &mut run.dest, Duration::from_secs(120));
    assert!(
        run.src.log().contains("resuming migration"),
        "the retry should resume; log:\n{}",
        run.src.log()
    );
    assert_destination_canonical(&run.dest_file);
    assert_same_files(&run.src_file, &run.dest_file);
    let got = fs::read(&run.dest_file).unwrap();
    assert_eq!(
        &got[MIB as usize..MIB as usize + written.len()],
        &written[..]
    );
}

#[test]
fn a_blackhole_mid_copy_is_noticed_the_source_serves_on_and_the_migration_resumes() {
    broken_mid_copy("wan-blackhole", Break::Blackhole);
}

#[test]
fn a_partition_mid_copy_is_noticed_the_source_serves_on_and_the_migration_resumes() {
    broken_mid_copy("wan-partition", Break::Partition);
}

/// The link breaks while `step` (a source fault step, delayed by the plan
/// to give the test time) is about to go out: at the entrust or at the
/// disconnect, with `--unlink`. The migration still ends with the verdict
/// table's "destination canonical" row.
struct AtStep {
    src: Flexnbd,
    dest: Flexnbd,
    src_file: PathBuf,
    dest_file: PathBuf,
    original: Vec<u8>,
    hosts: Hosts,
    _dir: TempDir,
}

fn broken_at(hosts: Hosts, tag: &str, step: &str) -> AtStep {
    let dir = TempDir::new(tag);
    let src_file = source_image(&dir);
    let original = fs::read(&src_file).unwrap();
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let sock = dir.join("src.sock");
    let plan = format!("mirror.{step}=delay(1500)");
    let env = [
        ("FLEXNBD_MS_REQUEST_LIMIT_SECS", LIMIT_SECS),
        ("FLEXNBD_FAULTS", plan.as_str()),
    ];
    let (a, b) = (hosts.a4.to_string(), hosts.b4.to_string());
    let src = spawn_in(
        &dir,
        &hosts.a,
        &server_args_at("serve", &a, 0, &src_file, Some(&sock), &[]),
        &env,
    );
    let dest = spawn_in(
        &dir,
        &hosts.b,
        &server_args_at("listen", &b, 0, &dest_file, None, &[]),
        &[],
    );
    let o = mirror(&sock, &b, dest.port(), &["--unlink"]);
    assert_started(&o);
    src.assert_fired(&format!("mirror.{step}"), "delay(1500)");
    hosts.blackhole(true);
    AtStep {
        src,
        dest,
        src_file,
        dest_file,
        original,
        hosts,
        _dir: dir,
    }
}

/// What `flexnbd resolve` says of the source and destination files, as
/// its exit status (10: source, 11: destination, 12: destination with its
/// marker to remove).
fn resolve(src: &Path, dest: &Path) -> Option<i32> {
    let (s, d) = (src.display().to_string(), dest.display().to_string());
    run_tool(BIN, &["resolve", "--source", &s, "--dest", &d], WAIT)
        .status
        .code()
}

#[test]
fn a_blackhole_at_the_entrust_ends_with_the_destination_canonical() {
    // The ENTRUST vanishes; the source notices within its timeout, retries
    // through the blackhole until it lifts, then entrusts and hands off.
    let Some(hosts) = hosts_or_skip("ent") else {
        return;
    };
    let AtStep {
        mut src,
        mut dest,
        src_file,
        dest_file,
        original,
        hosts,
        _dir,
    } = broken_at(hosts, "wan-entrust", "entrust_send");
    src.wait_log("no progress for");
    hosts.blackhole(false);
    wait_exit_0(&mut src, "the source", Duration::from_secs(60));
    wait_exit_0(&mut dest, "the destination", Duration::from_secs(60));
    assert!(!src_file.exists(), "--unlink removes the source");
    assert_destination_canonical(&dest_file);
    assert!(
        fs::read(&dest_file).unwrap() == original,
        "the destination differs from the source"
    );
}

#[test]
fn a_blackhole_at_the_disconnect_ends_with_the_destination_canonical() {
    // The DISCONNECT expects no reply: the source, entrusted and unlinked,
    // exits 0 with it still in flight. While the blackhole lasts, the
    // verdict table already names the destination (entrusted, source
    // gone); once it lifts, TCP delivers the DISCONNECT and the
    // destination completes.
    let Some(hosts) = hosts_or_skip("dis") else {
        return;
    };
    let AtStep {
        mut src,
        mut dest,
        src_file,
        dest_file,
        original,
        hosts,
        _dir,
    } = broken_at(hosts, "wan-disconnect", "disconnect_send");
    wait_exit_0(&mut src, "the source", Duration::from_secs(60));
    assert!(!src_file.exists(), "--unlink removes the source");
    assert!(
        dest.is_running(),
        "the destination waits for the DISCONNECT"
    );
    assert_eq!(
        resolve(&src_file, &dest_file),
        Some(12),
        "entrusted, source gone"
    );
    hosts.blackhole(false);
    wait_exit_0(&mut dest, "the destination", Duration::from_secs(60));
    assert_destination_canonical(&dest_file);
    assert_eq!(resolve(&src_file, &dest_file), Some(11));
    assert!(
        fs::read(&dest_file).unwrap() == original,
        "the destination differs from the source"
    );
}
#[test]
fn status_and_break_answer_at_once_while_the_destination_is_behind_a_blackhole() {
    let Some(hosts) = hosts_or_skip("stat") else {
        return;
    };
    hosts.shape(MBIT);
    let mut run = Run::start(hosts, "wan-status", false, &[]);
    let o = mirror(&run.sock, &run.dest_addr(), run.dest.port(), &[]);
    assert_started(&o);
    run.wait_left(SIZE - 4 * MIB);
    run.hosts.blackhole(true);
    // Within the stall, before and after the source notices it.
    for _ in 0..3 {
        let asked = Instant::now();
        let s = status(&run.sock);
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "status took {:?}",
            asked.elapsed()
        );
        assert_eq!(
            s.get("is_mirroring").map(String::as_str),
            Some("true"),
            "{s:?}"
        );
    }
    let asked = Instant::now();
    let answer = control(&run.sock, "break\n\n").expect("an answer to break");
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "break took {:?}",
        asked.elapsed()
    );
    assert!(answer.starts_with("0:"), "break answered {answer:?}");
    wait_for("the mirror to stop", Duration::from_secs(5), || {
        let s = try_status(&run.sock)?.1;
        (s.get("is_mirroring").map(String::as_str) == Some("false")).then_some(())
    });
    assert!(run.src.is_running(), "the source serves on after break");
    run.hosts.blackhole(false);
}

#[test]
fn a_client_through_the_proxy_sees_its_read_answered_soon_after_a_partition_heals() {
    // The production path across hosts: the client and `flexnbd-proxy` on
    // host A, the server on host B. The link goes down for 3 s with a read
    // in flight; the proxy gives up on the silent upstream (2 s timeout),
    // reconnects once the link is back and resends, and the client sees
    // only a late answer with the right bytes.
    let Some(hosts) = hosts_or_skip("prx") else {
        return;
    };
    let dir = TempDir::new("wan-proxy");
    let file = dir.pattern_file("image", 4 * MIB, 5);
    let b = hosts.b4.to_string();
    let upstream = spawn_in(
        &dir,
        &hosts.b,
        &server_args_at("serve", &b, 0, &file, None, &[]),
        &[],
    );
    let port = upstream.port().to_string();
    let mut args: Vec<String> = Hosts::exec_prefix(&hosts.a);
    args.extend(
        [
            "/usr/bin/env",
            "FLEXNBD_UPSTREAM_TIMEOUT=2",
            PROXY,
            "-l",
            "127.0.0.1",
            "-p",
            "0",
            "-C",
            &b,
            "-P",
            &port,
            "-v",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let proxy = Flexnbd::spawn_program(&dir, "ip", &args);
    let read = |at: u64| {
        let (p, from) = (proxy.port().to_string(), at.to_string());
        let mut args: Vec<String> = Hosts::exec_prefix(&hosts.a);
        args.extend(
            [
                BIN,
                "read",
                "-l",
                "127.0.0.1",
                "-p",
                &p,
                "-F",
                &from,
                "-S",
                "4096",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_tool("ip", &args, Duration::from_secs(30))
    };
    let expected = pattern(4 * MIB as usize, 5);
    let before = read(0);
    assert!(
        before.status.success(),
        "{}",
        String::from_utf8_lossy(&before.stderr)
    );
    assert_eq!(before.stdout, expected[..4096]);
    hosts.link_up(false);
    let partitioned = Instant::now();
    let (got, answered) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let o = read(MIB);
            (o, Instant::now())
        });
        // The link stays down for 3 s, then comes back.
        while partitioned.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(50));
        }
        hosts.link_up(true);
        reader.join().expect("the reader thread")
    });
    let healed = partitioned + Duration::from_secs(3);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(got.stdout, expected[MIB as usize..MIB as usize + 4096]);
    assert!(
        answered >= healed,
        "a read answered while the link was down"
    );
    let after = answered - healed;
    // The upstream timeout (2 s) plus a reconnect: well within 5 s.
    assert!(
        after < Duration::from_secs(5),
        "answered {after:?} after the link came back"
    );
    proxy.wait_log("reconnect");
    proxy.assert_no_panic();
}

const LINKEM: &str = env!("CARGO_BIN_EXE_flexnbd-linkem");

/// `flexnbd-linkem` on 127.0.0.1 in front of `to`, delaying each direction
/// by `one_way_ms`; returns it and its port.
fn linkem(to: std::net::SocketAddr, one_way_ms: &str) -> (KillOnDrop, u16) {
    linkem_with(to, &["--delay-ms", one_way_ms])
}

/// `flexnbd-linkem` on 127.0.0.1 in front of `to` with `args`.
fn linkem_with(to: std::net::SocketAddr, args: &[&str]) -> (KillOnDrop, u16) {
    use std::io::BufRead;
    let mut child = clean_command(LINKEM)
        .args(["--listen", "127.0.0.1:0", "--to", &to.to_string()])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn flexnbd-linkem");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("flexnbd-linkem says where it listens");
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("expected `listening on ADDR:PORT`, got {line:?}"));
    (KillOnDrop(child), port)
}

#[test]
fn across_a_long_round_trip_the_window_grows_and_the_copy_completes() {
    // 50 ms round trip on loopback (no namespaces needed): 8 MiB in flight
    // moves 160 MB/s, less than loopback carries, so a full window brings
    // more throughput and the window grows.
    let dir = TempDir::new("wan-window");
    let size = 64 * MIB;
    let src_file = dir.pattern_file("src.img", size, 3);
    let dest_file = dir.sparse_file("dest.img", size);
    let sock = dir.join("src.sock");
    let mut src = Flexnbd::spawn(&dir, &server_args("serve", &src_file, Some(&sock), &[]));
    let mut dest = Flexnbd::spawn(&dir, &server_args("listen", &dest_file, None, &[]));
    let (_link, port) = linkem(dest.addr, "25");
    let o = mirror(&sock, "127.0.0.1", port, &[]);
    assert_started(&o);
    wait_completed(&mut src, &mut dest, Duration::from_secs(120));
    let log = src.log();
    assert!(
        log.contains("in-flight window grown to 16 MiB"),
        "the window should grow across 50 ms; log:\n{log}"
    );
    assert_destination_canonical(&dest_file);
    assert_same_files(&src_file, &dest_file);
}

#[test]
fn over_a_link_slower_than_the_clients_write_the_copy_converges_with_them_paced() {
    // 40 Mbit/s (5 MB/s) and a 10 ms round trip in front of the
    // destination, and three clients writing random 4 KiB blocks back to
    // back, far faster than that: without pacing the dirty passes could
    // never catch up. Pacing lets the copy finish, every acknowledged write
    // reaches the destination, and while it converges `status` says what
    // limits it and when the cut-off is expected.
    use crate::migrate::{assert_holds_acked_writes, client_writer, BLOCK, CLIENTS};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = TempDir::new("wan-slow-link");
    let size = 16 * MIB;
    let src_file = dir.pattern_file("src.img", size, 5);
    let base = fs::read(&src_file).unwrap();
    let dest_file = dir.sparse_file("dest.img", size);
    let sock = dir.join("src.sock");
    let mut src = Flexnbd::spawn(&dir, &server_args("serve", &src_file, Some(&sock), &[]));
    let mut dest = Flexnbd::spawn(&dir, &server_args("listen", &dest_file, None, &[]));
    let (_link, port) = linkem_with(dest.addr, &["--delay-ms", "5", "--rate-mbit", "40"]);
    let acks = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..CLIENTS)
        .map(|id| client_writer(src.addr, id, size / BLOCK, acks.clone()))
        .collect();
    wait_for("the clients to write", WAIT, || {
        (acks.load(Ordering::Relaxed) >= 1000).then_some(())
    });
    let o = mirror(&sock, "127.0.0.1", port, &[]);
    assert_started(&o);
    let converging = wait_for(
        "a status while converging that says when the cut-off is expected",
        Duration::from_secs(60),
        || {
            let s = try_status(&sock)?.1;
            let eta = s.get("migration_cutoff_eta_ms")?.parse::<u64>().ok()?;
            (s.get("migration_state")? == "converging").then_some((s, eta))
        },
    );
    let (s, eta) = converging;
    assert!(
        ["link", "destination"].contains(&s["migration_bottleneck"].as_str()),
        "the slow link (or the destination behind it, as its replies show it) limits the copy: {s:?}"
    );
    let remainder: u64 = s["migration_remainder_ms"].parse().unwrap();
    assert!(
        eta >= remainder.min(25),
        "the cut-off cannot come before the remainder is sent: eta {eta} ms, remainder {remainder} ms"
    );
    wait_completed(&mut src, &mut dest, Duration::from_secs(120));
    let logs: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let acked: usize = logs.iter().map(|l| l.acked.len()).sum();
    assert!(acked > 1000, "the clients wrote {acked} blocks");
    assert_holds_acked_writes(&dest_file, base, &logs);
    assert_destination_canonical(&dest_file);
    let log = src.log();
    assert!(
        log.contains("converged after") && log.contains("clients were shut out for"),
        "the migration should converge and hand off; log:\n{log}"
    );
}

/// One command to a linkem control socket, and its answer.
fn linkem_command(sock: &Path, line: &str) -> String {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("linkem control socket");
    s.set_read_timeout(Some(WAIT)).unwrap();
    writeln!(s, "{line}").unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer).unwrap();
    answer.trim().to_string()
}

#[test]
fn the_link_emulator_delays_limits_the_rate_blackholes_and_cuts_as_asked() {
    let dir = TempDir::new("linkem");
    let file = dir.pattern_file("image", 4 * MIB, 9);
    let server = Flexnbd::serve(&dir, &file, &[]);
    let ctl = dir.join("linkem.ctl");
    let ctl_arg = ctl.display().to_string();
    let (_link, port) = linkem_with(
        server.addr,
        &[
            "--delay-ms",
            "10",
            "--jitter-ms",
            "2",
            "--rate-mbit",
            "80",
            "--control",
            &ctl_arg,
        ],
    );
    let expected = pattern(4 * MIB as usize, 9);
    let mut c = RawClient::connect(format!("127.0.0.1:{port}").parse().unwrap());
    c.oldstyle_greeting();
    // A round trip: 10 ms each way, plus at most 2 ms of jitter each way.
    let asked = Instant::now();
    assert_eq!(c.read_ok(0, 4096), expected[..4096]);
    let rtt = asked.elapsed();
    assert!(
        rtt >= Duration::from_millis(20) && rtt < Duration::from_millis(200),
        "round trip {rtt:?}"
    );
    // 1 MiB at 80 Mbit/s (10 MB/s) takes about 0.1 s on the wire.
    let asked = Instant::now();
    assert_eq!(
        c.read_ok(MIB, MIB as u32),
        expected[MIB as usize..2 * MIB as usize]
    );
    assert!(
        asked.elapsed() >= Duration::from_millis(100),
        "{:?}",
        asked.elapsed()
    );
    // A blackhole: nothing comes back, nothing is reset; then all of it.
    assert_eq!(linkem_command(&ctl, "blackhole on"), "ok");
    c.request(flexnbd::proto::cmd::READ, 0, 77, 8192, 4096);
    c.stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    let silent = std::io::Read::read(&mut c.stream, &mut byte);
    assert!(
        silent.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "expected silence behind the blackhole, got {silent:?}"
    );
    assert_eq!(linkem_command(&ctl, "blackhole off"), "ok");
    c.stream.set_read_timeout(Some(WAIT)).unwrap();
    let reply = c.simple_reply();
    assert_eq!((reply.error, reply.handle), (0, 77));
    assert_eq!(c.read_exact(4096), expected[8192..8192 + 4096]);
    // What it carried, and a cut.
    let stats = linkem_command(&ctl, "stats");
    assert!(
        stats.contains("connections=1") && !stats.contains("up=0 "),
        "{stats}"
    );
    assert!(linkem_command(&ctl, "frobnicate").starts_with("error: unknown command"));
    assert_eq!(linkem_command(&ctl, "cut"), "ok");
    let mut rest = Vec::new();
    let ended = std::io::Read::read_to_end(&mut c.stream, &mut rest);
    assert!(
        ended.is_ok()
            || ended
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the cut should end the connection within {WAIT:?}, got {ended:?}"
    );
    assert!(rest.is_empty(), "nothing after the cut");
}
