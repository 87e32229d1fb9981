//! Fault plans on the real binaries, outside migrations: each action at a
//! server step, store faults, control faults, client faults, the
//! environment variable, and seeded replay. Every test asserts its
//! `fault fired:` line, so none can pass because a fault did not fire.

use std::io::Read;
use std::time::{Duration, Instant};

use crate::harness::*;
use flexnbd::proto::{self, cmd, errno};
use predicates::prelude::*;

const MIB: u64 = 1024 * 1024;

/// A served 1 MiB image with `plan` given by `--faults`.
fn served_with(plan: &str) -> (TempDir, std::path::PathBuf, Flexnbd) {
    let dir = TempDir::new("faults");
    let file = dir.pattern_file("d.img", MIB, 9);
    let server = Flexnbd::serve(&dir, &file, &["--faults", plan]);
    (dir, file, server)
}

#[test]
fn drop_on_the_first_read_reply_causes_no_reply_and_the_second_read_works() {
    let (_dir, file, server) = served_with("server.reply_send.read#1=drop");
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(cmd::READ, 0, 1, 0, 512);
    server.assert_fired("server.reply_send.read#1", "drop");
    // Waiting to show that something does NOT happen.
    assert!(
        nothing_arrives(&mut c, Duration::from_millis(300)),
        "a dropped reply must not be sent"
    );
    assert_eq!(c.read_ok(512, 512), read_file_range(&file, 512, 512));
}

#[test]
fn corrupt_on_write_replies_causes_a_bad_reply_magic() {
    let (_dir, _file, server) = served_with("server.reply_send.write=corrupt");
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(cmd::WRITE, 0, 7, 0, 4);
    c.send(b"abcd");
    let r = c.simple_reply();
    assert_ne!(r.magic, proto::SIMPLE_REPLY_MAGIC);
    assert_eq!(r.handle, 7, "only the magic is damaged");
    server.assert_fired("server.reply_send.write", "corrupt");
}

#[test]
fn truncate_on_the_greeting_causes_a_short_greeting_then_eof() {
    let (_dir, _file, server) = served_with("server.greeting_send=truncate(20)");
    let mut c = server.connect();
    let mut got = Vec::new();
    c.stream.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), 20);
    assert_eq!(&got[..8], b"NBDMAGIC");
    server.assert_fired("server.greeting_send", "truncate(20)");
}

#[test]
fn close_on_a_write_request_causes_eof_and_others_are_still_served() {
    let (_dir, _file, server) = served_with("server.request_received.write#1=close");
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(cmd::WRITE, 0, 1, 0, 4);
    c.send(b"abcd");
    assert!(c.sees_eof());
    server.assert_fired("server.request_received.write#1", "close");
    let mut other = server.connect();
    other.oldstyle_greeting();
    other.write_ok(0, b"fine");
}

#[test]
fn crash_on_accept_causes_the_process_to_die_like_sigkill() {
    let (_dir, _file, mut server) = served_with("server.accept=crash");
    let _c = server.connect();
    let status = server.wait_exit();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "crash is SIGKILL: {status}"
    );
    server.assert_fired("server.accept", "crash");
}

#[test]
fn delay_on_flush_replies_causes_a_late_reply() {
    let (_dir, _file, server) = served_with("server.reply_send.flush=delay(300)");
    let mut c = server.connect();
    c.oldstyle_greeting();
    let start = Instant::now();
    c.request(cmd::FLUSH, 0, 3, 0, 0);
    assert_eq!(c.simple_reply().error, 0);
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "the reply waited {:?}",
        start.elapsed()
    );
    server.assert_fired("server.reply_send.flush", "delay(300)");
}

#[test]
fn hang_on_a_read_reply_holds_that_connection_only_until_its_peer_leaves() {
    let dir = TempDir::new("faults-hang");
    let file = dir.pattern_file("d.img", MIB, 9);
    // One slot: a hung connection that never freed it would lock everyone out.
    let server = Flexnbd::serve(
        &dir,
        &file,
        &[
            "--faults",
            "server.reply_send.read#1=hang",
            "--max-clients",
            "1",
        ],
    );
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(cmd::READ, 0, 1, 0, 512);
    server.assert_fired("server.reply_send.read#1", "hang");
    assert!(nothing_arrives(&mut c, Duration::from_millis(300)));
    drop(c);
    wait_for("the hung connection's slot to be free", WAIT, || {
        let mut d = server.connect();
        let mut g = [0u8; 8];
        d.stream.read_exact(&mut g).is_ok().then_some(())
    });
}

#[test]
fn store_write_eio_and_enospc_are_reported_in_replies() {
    let (_dir, file, server) = served_with("store.write#1=eio; store.write#2=enospc");
    let mut c = server.connect();
    c.oldstyle_greeting();
    let before = read_file_range(&file, 0, 4);
    for (handle, expected) in [(1u64, errno::EIO), (2, errno::ENOSPC), (3, 0)] {
        c.request(cmd::WRITE, 0, handle, 0, 4);
        c.send(b"zzzz");
        let r = c.simple_reply();
        assert_eq!((r.handle, r.error), (handle, expected));
    }
    server.assert_fired("store.write#1", "eio");
    server.assert_fired("store.write#2", "enospc");
    assert_ne!(before, b"zzzz".to_vec());
    assert_eq!(
        read_file_range(&file, 0, 4),
        b"zzzz".to_vec(),
        "the third write landed"
    );
}

#[test]
fn store_read_and_sync_errors_are_reported_in_replies() {
    let (_dir, _file, server) = served_with("store.read#1=eio; store.sync#1=eio");
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(cmd::READ, 0, 1, 0, 512);
    assert_eq!(
        c.simple_reply().error,
        errno::EIO,
        "a failed read sends an error, no data"
    );
    c.request(cmd::FLUSH, 0, 2, 0, 0);
    assert_eq!(c.simple_reply().error, errno::EIO);
    c.request(cmd::FLUSH, 0, 3, 0, 0);
    assert_eq!(c.simple_reply().error, 0, "only the first sync fails");
    server.assert_fired("store.read#1", "eio");
    server.assert_fired("store.sync#1", "eio");
}

#[test]
fn a_slow_store_sync_delays_the_flush_reply() {
    let (_dir, _file, server) = served_with("store.sync=slow(300)");
    let mut c = server.connect();
    c.oldstyle_greeting();
    let start = Instant::now();
    c.request(cmd::FLUSH, 0, 1, 0, 0);
    assert_eq!(c.simple_reply().error, 0);
    assert!(start.elapsed() >= Duration::from_millis(300));
    server.assert_fired("store.sync", "slow(300)");
}

#[test]
fn the_faults_environment_variable_reaches_the_server() {
    let dir = TempDir::new("faults-env");
    let file = dir.pattern_file("d.img", MIB, 9);
    let args = server_args("serve", &file, None, &[]);
    let server = Flexnbd::spawn_with_env(
        &dir,
        &args,
        &[("FLEXNBD_FAULTS", "server.request_received.flush=close")],
    );
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(cmd::FLUSH, 0, 1, 0, 0);
    assert!(c.sees_eof());
    server.assert_fired("server.request_received.flush", "close");
    server.wait_log("fault plan active (seed ");
}

#[test]
fn control_faults_close_the_control_connection_without_an_answer() {
    let dir = TempDir::new("faults-ctl");
    let file = dir.pattern_file("d.img", MIB, 9);
    let sock = dir.join("ctl.sock").display().to_string();
    let server = Flexnbd::serve(
        &dir,
        &file,
        &["-s", &sock, "--faults", "control.status#1=close"],
    );
    // No answer is a failure.
    assert_tool(BIN, &["status", "-s", &sock], WAIT).code(1);
    server.assert_fired("control.status#1", "close");
    assert_tool(BIN, &["status", "-s", &sock], WAIT)
        .success()
        .stdout(predicate::str::starts_with("pid="));
}

#[test]
fn client_faults_make_the_write_command_fail_with_a_message() {
    let (_dir, _file, server) = served_with("server.accept=pass");
    let port = server.port().to_string();
    let base = [
        "write",
        "-l",
        "127.0.0.1",
        "-p",
        &port,
        "-F",
        "0",
        "-S",
        "4",
    ];
    let mut args = base.to_vec();
    args.extend(["--faults", "client.reply_received.write=corrupt"]);
    assert_tool_with_input(BIN, &args, Some(b"abcd"), WAIT)
        .code(1)
        .stderr(predicate::str::contains(
            "fault fired: client.reply_received.write -> corrupt",
        ))
        .stderr(predicate::str::contains("bad reply magic"));

    let mut args = base.to_vec();
    args.extend(["--faults", "client.payload_send.write=truncate(2)"]);
    assert_tool_with_input(BIN, &args, Some(b"abcd"), WAIT)
        .code(1)
        .stderr(predicate::str::contains(
            "fault fired: client.payload_send.write -> truncate(2)",
        ));
    server.wait_log("client vanished in the middle of a write payload: expected 4 bytes, got 2");
}

/// Which of 40 reads fail under a 50% close plan with a fixed seed (each
/// failure closes the connection, so the client reconnects).
fn failure_pattern(plan: &str) -> Vec<bool> {
    let (_dir, _file, server) = served_with(plan);
    let mut pattern = Vec::new();
    let mut c = server.connect();
    c.oldstyle_greeting();
    for i in 0..40u64 {
        c.request(cmd::READ, 0, i, 0, 512);
        let mut header = [0u8; 16];
        let failed = c.stream.read_exact(&mut header).is_err();
        if failed {
            c = server.connect();
            c.oldstyle_greeting();
        } else {
            c.read_exact(512);
        }
        pattern.push(failed);
    }
    assert!(server
        .log()
        .contains("fault fired: server.reply_send.read -> close"));
    assert!(server.log().contains("fault plan active (seed 42)"));
    pattern
}

#[test]
fn the_same_seed_replays_the_same_faults() {
    let plan = "seed=42; server.reply_send.read=50%close";
    let first = failure_pattern(plan);
    let second = failure_pattern(plan);
    assert_eq!(first, second, "a seed must replay the same run");
    let failures = first.iter().filter(|f| **f).count();
    assert!(
        (5..=35).contains(&failures),
        "50% of 40 should fail roughly half the time, got {failures}"
    );
}

#[test]
fn a_bad_plan_is_refused_with_its_position() {
    let dir = TempDir::new("faults-bad");
    let file = dir.sparse_file("d.img", MIB);
    let f = file.display().to_string();
    assert_tool(
        BIN,
        &[
            "serve",
            "-l",
            "127.0.0.1",
            "-p",
            "0",
            "-f",
            &f,
            "--faults",
            "server.reply_send.read=explode",
        ],
        WAIT,
    )
    .code(1)
    .stderr(predicate::str::contains("fault plan: at byte 23"));
}
