//! Log lines: the flexnbd format on stderr
//! (`<monotonic ms>:<level letter>:<pid> <task> <context> <file>:<line>: <message>`,
//! context = the served file), the default threshold (warnings), and `-v` /
//! `-q` where the last one given wins.

use std::path::Path;

use crate::harness::*;
use predicates::prelude::*;

const MIB: u64 = 1024 * 1024;

/// Checks one log line's shape and returns (level, pid, context, message).
fn parse_line(line: &str) -> (char, u32, String, String) {
    let (head, message) = line
        .split_once(": ")
        .unwrap_or_else(|| panic!("no ': ' in {line:?}"));
    let mut fields = head.split(' ');
    let stamp = fields.next().unwrap();
    let parts: Vec<&str> = stamp.split(':').collect();
    assert_eq!(parts.len(), 3, "`ms:L:pid` in {line:?}");
    parts[0]
        .parse::<u64>()
        .unwrap_or_else(|_| panic!("monotonic ms in {line:?}"));
    let level = parts[1].chars().next().unwrap();
    assert!(
        "DIWEF".contains(level) && parts[1].len() == 1,
        "level letter in {line:?}"
    );
    let pid = parts[2]
        .parse::<u32>()
        .unwrap_or_else(|_| panic!("pid in {line:?}"));
    let rest: Vec<&str> = fields.collect();
    assert_eq!(rest.len(), 3, "`task context file:line` in {line:?}");
    assert!(!rest[0].is_empty(), "task in {line:?}");
    let (file, number) = rest[2]
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("file:line in {line:?}"));
    assert!(file.ends_with(".rs"), "source file in {line:?}");
    number
        .parse::<u32>()
        .unwrap_or_else(|_| panic!("source line in {line:?}"));
    (level, pid, rest[1].to_string(), message.to_string())
}

fn levels(log: &str) -> Vec<char> {
    log.lines().map(|l| parse_line(l).0).collect()
}

#[test]
fn verbose_log_lines_have_the_flexnbd_format_with_the_file_as_context() {
    let dir = TempDir::new("log-format");
    let file = dir.sparse_file("disk.img", MIB);
    let server = Flexnbd::serve(&dir, &file, &[]);
    server.connect().oldstyle_greeting();
    server.wait_log("allocation map built");
    let log = server.log();
    assert!(!log.is_empty());
    for line in log.lines() {
        let (_, pid, context, _) = parse_line(line);
        assert_eq!(pid, server.server_pid, "{line}");
        assert_eq!(
            Path::new(&context),
            file.as_path(),
            "context is the served file: {line}"
        );
    }
    assert!(levels(&log).contains(&'I'), "-v shows info lines");
}

#[test]
fn the_default_threshold_shows_warnings_but_not_info() {
    // An odd-sized image gives a warning at start; without -v no info line
    // (so not even "listening on") may appear.
    let dir = TempDir::new("log-default");
    let file = dir.sparse_file("odd.img", MIB + 100);
    let sock = dir.join("ctl.sock");
    let args = server_args("serve", &file, Some(&sock), &[]);
    let args: Vec<String> = args.into_iter().filter(|a| a != "-v").collect();
    let mut child = clean_command(BIN)
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the control socket (ready)", WAIT, || {
        sock.exists().then_some(())
    });
    send_signal(child.id(), libc::SIGTERM);
    let out = wait_for("serve to exit", WAIT, || child.try_wait().unwrap());
    assert_eq!(out.code(), Some(0));
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let seen = levels(&stderr);
    assert!(seen.contains(&'W'), "the size warning is shown: {stderr}");
    assert!(
        !seen.contains(&'I') && !seen.contains(&'D'),
        "no info by default: {stderr}"
    );
}

/// Runs serve on a missing file with `flags` and returns its stderr.
fn failing_serve(flags: &[&str]) -> String {
    let dir = TempDir::new("log-flags");
    let missing = dir.join("missing.img");
    let mut args = vec![
        "serve",
        "-l",
        "127.0.0.1",
        "-p",
        "0",
        "-f",
        missing.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    let out = run_tool(BIN, &args, WAIT);
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_last_of_v_and_q_wins() {
    // -q shows only fatal lines; the failure to open the image is fatal.
    let quiet = failing_serve(&["-v", "-q"]);
    assert_eq!(levels(&quiet), vec!['F'], "{quiet}");
    assert!(quiet.contains("missing.img"), "{quiet}");
    // -v last: verbose, and the fatal line is still there.
    let dir = TempDir::new("log-vq");
    let file = dir.sparse_file("disk.img", MIB);
    let server = Flexnbd::serve(&dir, &file, &["-q", "-v"]);
    assert!(levels(&server.log()).contains(&'I'), "-v given last wins");
}

#[test]
fn a_log_reader_that_goes_away_never_kills_the_server() {
    // Log lines go to stderr; when that is a pipe whose reader has gone,
    // each write raises SIGPIPE. Nothing in the code sets SIGPIPE's
    // disposition: std's runtime ignores it before main, so the write fails
    // with EPIPE (the line is lost) and the server goes on serving.
    let dir = TempDir::new("log-sigpipe");
    let file = dir.sparse_file("disk.img", MIB);
    let sock = dir.join("ctl.sock");
    // With -v the server logs "listening on" before the socket appears.
    let args = server_args("serve", &file, Some(&sock), &[]);
    let mut child = KillOnDrop(
        clean_command(BIN)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The reader goes before the server has written its first line.
    drop(child.0.stderr.take());
    wait_for("the control socket (ready)", WAIT, || {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("serve died with {status} when its log reader went away");
        }
        sock.exists().then_some(())
    });
    assert!(ignores_signal(child.0.id(), libc::SIGPIPE));
    assert_tool(BIN, &["status", "-s", sock.to_str().unwrap()], WAIT)
        .code(0)
        .stdout(predicate::str::starts_with(format!(
            "pid={} ",
            child.0.id()
        )));
    send_signal(child.0.id(), libc::SIGTERM);
    let code = wait_for("serve to exit", WAIT, || child.0.try_wait().unwrap());
    assert_eq!(code.code(), Some(0));
}
