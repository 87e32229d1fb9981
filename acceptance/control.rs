//! The control socket, the operator commands, ACL changes, signals and the
//! killswitch against the real `flexnbd serve`, as the C flexnbd has them:
//! its connection handling, `serve` options, control commands and line
//! protocol, ACLs, start-up and shutdown order, and exit codes.
//!
//! Simulated: operators using the `status`, `acl`, `mirror`, `mirror-speed`
//! and `break` commands and raw UNIX-socket clients sending every command,
//! malformed requests (empty, blank, unknown, overlong, very many lines,
//! half-closed, garbage numbers), nothing at all, or a partial line; storms
//! of status requests while NBD clients do I/O and while the server shuts
//! down; stale, live and non-socket files at the control socket path and a
//! missing directory; ACL changes that exclude connected clients; SIGTERM,
//! SIGINT and SIGQUIT with idle clients and with a client in the middle of a
//! write; a client that stalls in the middle of a write with and without
//! `--killswitch`. Valid `mirror` requests are not sent (migration is not
//! part of these tests), only their validation.
//!
//! What must happen: every response is the C flexnbd's `<code>: <text>\n`
//! byte for byte with nothing after it, and the commands print the text on
//! stdout (code 0) or stderr (otherwise) and exit with the code; the status
//! line has the server's pid, the export size and the live client count;
//! the socket is mode 0600, appears only once the port listens and is gone
//! after a clean exit; a stale socket is replaced, a live one or a
//! non-socket file makes the second server exit 1; clients an ACL no longer
//! allows are disconnected and new ones are closed before any greeting; one
//! slow or silent control client never delays another; every signal gives
//! exit 0 within a bounded time, a request in progress finishing first; the
//! killswitch drops only the stalled client.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;
use flexnbd::proto::{self, cmd};

const MIB: u64 = 1024 * 1024;
/// Limit for one command or control request that should finish at once.
const QUICK: Duration = Duration::from_secs(10);
/// The server's limit for a control request to arrive (REQUEST_TIMEOUT).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The server's limit for clients to finish at shutdown (CLIENT_DRAIN_TIMEOUT).
const CLIENT_DRAIN: Duration = Duration::from_secs(10);

/// A server with a control socket. `server` is declared first so that it is
/// killed (and its log shown) before the directory goes.
struct Served {
    server: Flexnbd,
    sock: PathBuf,
    file: PathBuf,
    dir: TempDir,
}

fn serve_with_sock(tag: &str, size: u64, extra: &[&str]) -> Served {
    let dir = TempDir::new(tag);
    let file = dir.sparse_file("disk.img", size);
    let sock = dir.join("ctl.sock");
    let mut args = vec!["-s", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let server = Flexnbd::serve(&dir, &file, &args);
    wait_for_sock(&sock);
    Served {
        server,
        sock,
        file,
        dir,
    }
}

fn serve_args(file: &Path, sock: &Path, extra: &[&str]) -> Vec<String> {
    server_args("serve", file, Some(sock), extra)
}

/// Waits until something answers on the control socket.
fn wait_for_sock(sock: &Path) {
    wait_for(&format!("control socket {}", sock.display()), WAIT, || {
        UnixStream::connect(sock).ok().map(|_| ())
    });
}

/// Sends `request` on a fresh control connection (half-closing it when
/// `half_close`) and returns everything the server sends until it closes.
fn exchange(sock: &Path, request: &[u8], half_close: bool) -> Vec<u8> {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect to {}: {e}", sock.display()));
    s.set_read_timeout(Some(QUICK)).unwrap();
    s.set_write_timeout(Some(QUICK)).unwrap();
    s.write_all(request).expect("send control request");
    if half_close {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .unwrap_or_else(|e| panic!("reading the response to {}: {e}", shown(request)));
    got
}

/// A request for a failure message: at most its first 80 bytes.
fn shown(request: &[u8]) -> String {
    let cut = &request[..request.len().min(80)];
    format!(
        "{:?} ({} bytes)",
        String::from_utf8_lossy(cut),
        request.len()
    )
}

/// Sends one control request and reads the whole response (bounded).
pub fn ask(sock: &Path, request: &str) -> String {
    String::from_utf8(exchange(sock, request.as_bytes(), false)).expect("utf-8 response")
}

/// The status line text (without `0: ` and the newline).
fn status_line(sock: &Path) -> String {
    let r = ask(sock, "status\n\n");
    r.strip_prefix("0: ")
        .and_then(|s| s.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("bad status response {r:?}"))
        .to_string()
}

fn status_value(sock: &Path, key: &str) -> String {
    let line = status_line(sock);
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in status line {line:?}"))
        .to_string()
}

fn wait_num_clients(sock: &Path, n: usize) {
    let want = n.to_string();
    wait_for(&format!("num_clients={n}"), WAIT, || {
        (status_value(sock, "num_clients") == want).then_some(())
    });
}

fn flexnbd(args: &[&str]) -> Output {
    run_tool(BIN, args, QUICK)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code and the exact stdout and stderr of a command.
fn assert_output(o: &Output, code: i32, out: &str, err: &str, what: &str) {
    assert_eq!(
        (o.status.code(), stdout(o).as_str(), stderr(o).as_str()),
        (Some(code), out, err),
        "{what}"
    );
}

/// Asserts exit 1, nothing on stdout, and `needle` on stderr.
fn assert_fails_with(o: &Output, needle: &str, what: &str) {
    assert_eq!(o.status.code(), Some(1), "{what}: {}", stderr(o));
    assert_eq!(stdout(o), "", "{what}: stdout");
    assert!(
        stderr(o).contains(needle),
        "{what}: stderr should contain {needle:?}, got:\n{}",
        stderr(o)
    );
}

/// A fresh NBD client that has read the greeting.
fn greeted(server: &Flexnbd) -> RawClient {
    let mut c = server.connect();
    c.oldstyle_greeting();
    c
}

/// Connects and asserts the server closes the connection without sending
/// a single byte (no greeting).
fn assert_refused_before_greeting(addr: SocketAddr, what: &str) {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => assert!(got.is_empty(), "{what}: got {} bytes", got.len()),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => assert!(got.is_empty()),
        Err(e) => panic!("{what}: expected EOF, got {e}"),
    }
}

/// `/proc/net/tcp` form of a 127.0.0.1 address.
fn proc_addr(port: u16) -> String {
    format!("0100007F:{port:04X}")
}

/// Waits until every byte `client` sent has been read by the server process
/// (our send queue and the server's receive queue are both empty), so the
/// server is known to be inside the request those bytes began.
fn wait_server_read_all(server_port: u16, client: &TcpStream) {
    let ours = proc_addr(client.local_addr().unwrap().port());
    let theirs = proc_addr(server_port);
    wait_for("the server to read what the client sent", WAIT, || {
        let table = fs::read_to_string("/proc/net/tcp").ok()?;
        let queue = |local: &str, remote: &str, field: usize| -> Option<u64> {
            table.lines().skip(1).find_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                (f.get(1) == Some(&local) && f.get(2) == Some(&remote))
                    .then(|| u64::from_str_radix(f[4].split(':').nth(field)?, 16).ok())?
            })
        };
        let our_tx = queue(&ours, &theirs, 0)?;
        let their_rx = queue(&theirs, &ours, 1)?;
        (our_tx == 0 && their_rx == 0).then_some(())
    });
}

/// Sends a WRITE header for `data` at `offset` and only `sent` bytes of it.
fn start_stalled_write(c: &mut RawClient, handle: u64, offset: u64, data: &[u8], sent: usize) {
    c.request(cmd::WRITE, 0, handle, offset, data.len() as u32);
    c.send(&data[..sent]);
}

fn assert_write_reply(c: &mut RawClient, handle: u64) {
    let r = c.simple_reply();
    assert_eq!(
        (r.magic, r.error, r.handle),
        (proto::SIMPLE_REPLY_MAGIC, 0, handle),
        "write reply"
    );
}

/// True if the server closed `c` (EOF or reset) within `limit`; false if
/// nothing arrived in that time. Any data is a test failure.
fn closed_within(c: &mut RawClient, limit: Duration) -> bool {
    c.stream.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 1];
    let r = c.stream.read(&mut b);
    c.stream.set_read_timeout(Some(WAIT)).unwrap();
    match r {
        Ok(0) => true,
        Ok(_) => panic!("unexpected data from the server"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Err(e) => panic!("read: {e}"),
    }
}

fn tcp_refused(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
}

// ---------------------------------------------------------------------------
// Responses, byte for byte.

#[test]
fn status_request_causes_the_c_status_line_with_pid_size_and_trailing_space() {
    // 3 MiB + 300 bytes: the export is the size rounded down to 512.
    let s = serve_with_sock("ctl-status", 3 * MIB + 300, &[]);
    let expected = format!(
        "0: pid={} size={} is_mirroring=false clients_allowed=true num_clients=0 has_control=true \n",
        s.server.server_pid,
        3 * MIB
    );
    assert_eq!(
        ask(&s.sock, "status\n\n"),
        expected,
        "status ended by a blank line"
    );
    assert_eq!(
        String::from_utf8(exchange(&s.sock, b"status\n", true)).unwrap(),
        expected,
        "status ended by EOF"
    );
    assert_eq!(
        s.server.server_pid,
        s.server.child.as_ref().unwrap().id(),
        "pid is the process we started"
    );

    let o = flexnbd(&["status", "-s", s.sock.to_str().unwrap()]);
    assert_output(
        &o,
        0,
        &format!("{}\n", &expected[3..expected.len() - 1]),
        "",
        "CLI status",
    );
}

#[test]
fn status_json_causes_a_typed_json_object_on_stdout() {
    let s = serve_with_sock("ctl-json", 4 * MIB, &[]);
    let o = flexnbd(&["status", "-s", s.sock.to_str().unwrap(), "--json"]);
    let expected = format!(
        "{{\"pid\":{},\"size\":{},\"is_mirroring\":false,\"clients_allowed\":true,\"num_clients\":0,\"has_control\":true}}\n",
        s.server.server_pid,
        4 * MIB
    );
    assert_output(&o, 0, &expected, "", "status --json");
}

#[test]
fn clients_connecting_and_leaving_causes_num_clients_0_1_2_1_0() {
    let s = serve_with_sock("ctl-count", MIB, &[]);
    assert_eq!(status_value(&s.sock, "num_clients"), "0");
    let mut a = greeted(&s.server);
    wait_num_clients(&s.sock, 1);
    let b = greeted(&s.server);
    wait_num_clients(&s.sock, 2);
    a.write_ok(0, &[7u8; 512]);
    drop(b);
    wait_num_clients(&s.sock, 1);
    drop(a);
    wait_num_clients(&s.sock, 0);
    // The CLI agrees.
    let o = flexnbd(&["status", "-s", s.sock.to_str().unwrap()]);
    assert!(stdout(&o).contains(" num_clients=0 "), "{}", stdout(&o));
}

#[test]
fn every_control_command_causes_its_exact_c_response() {
    let s = serve_with_sock("ctl-responses", MIB, &[]);
    let long_arg = "1".repeat(256);
    let cases: Vec<(String, String)> = vec![
        // acl
        ("acl\n127.0.0.1\n\n".into(), "0: updated\n".into()),
        (
            "acl\n127.0.0.0/8\n::1\n10.1.2.3/32\n\n".into(),
            "0: updated\n".into(),
        ),
        (
            "acl\n127.0.0.1\nnot-an-ip\n10.0.0.0/99\n\n".into(),
            "1: bad spec: not-an-ip\n".into(),
        ),
        (
            "acl\n10.0.0.0/0\n\n".into(),
            "1: bad spec: 10.0.0.0/0\n".into(),
        ),
        (
            format!("acl\n{long_arg}\n\n"),
            format!("1: bad spec: {long_arg}\n"),
        ),
        // mirror: validation only
        (
            "mirror\n\n".into(),
            "1: mirror takes at least two parameters\n".into(),
        ),
        (
            "mirror\n127.0.0.1\n\n".into(),
            "1: mirror takes at least two parameters\n".into(),
        ),
        (
            "mirror\nbogus\n10809\n\n".into(),
            "1: bad IP address\n".into(),
        ),
        (
            "mirror\n127.0.0.1\nabc\n\n".into(),
            "1: bad IP port number\n".into(),
        ),
        (
            "mirror\n127.0.0.1\n12x\n\n".into(),
            "1: bad IP port number\n".into(),
        ),
        (
            "mirror\n127.0.0.1\n-1\n\n".into(),
            "1: bad IP port number\n".into(),
        ),
        (
            "mirror\n127.0.0.1\n70000\n\n".into(),
            "1: bad IP port number\n".into(),
        ),
        (
            "mirror\n127.0.0.1\n10809\nlater\n\n".into(),
            "1: action must be 'exit' or 'nothing'\n".into(),
        ),
        (
            "mirror\n127.0.0.1\n10809\nexit\nnope\n\n".into(),
            "1: bad bind address\n".into(),
        ),
        // `unlink` is a valid action: the bind address is checked next.
        (
            "mirror\n127.0.0.1\n10809\nunlink\nnope\n\n".into(),
            "1: bad bind address\n".into(),
        ),
        (
            "mirror\n127.0.0.1\n10809\nnothing\n0\n12x\n\n".into(),
            "1: max_bps couldn't be parsed\n".into(),
        ),
        (
            "mirror\n127.0.0.1\n10809\nexit\n0\n-5\n\n".into(),
            "1: max_bps couldn't be parsed\n".into(),
        ),
        (
            "mirror\n127.0.0.1\n10809\nexit\n0\n99999999999999999999\n\n".into(),
            "1: max_bps out of range\n".into(),
        ),
        (
            "mirror\n127.0.0.1\n10809\nexit\n0\n5\nextra\n\n".into(),
            "1: unrecognised parameters to mirror\n".into(),
        ),
        // mirror_max_bps: with no mirror, "Not currently mirroring" comes
        // first, whatever the arguments (the C order: the mirror is checked
        // before the format). Its other messages need a running mirror.
        (
            "mirror_max_bps\n\n".into(),
            "1: Not currently mirroring\n".into(),
        ),
        (
            "mirror_max_bps\n1\n2\n\n".into(),
            "1: Not currently mirroring\n".into(),
        ),
        (
            "mirror_max_bps\nabc\n\n".into(),
            "1: Not currently mirroring\n".into(),
        ),
        (
            "mirror_max_bps\n99999999999999999999\n\n".into(),
            "1: Not currently mirroring\n".into(),
        ),
        (
            "mirror_max_bps\n1000\n\n".into(),
            "1: Not currently mirroring\n".into(),
        ),
        // break
        ("break\n\n".into(), "1: not mirroring\n".into()),
        ("break\nextra\n\n".into(), "1: not mirroring\n".into()),
        // malformed
        ("\n".into(), "9: missing command\n".into()),
        ("\n\n".into(), "9: missing command\n".into()),
        ("Status\n\n".into(), "10: unknown command\n".into()),
        ("status \n\n".into(), "10: unknown command\n".into()),
        (
            "frobnicate\nwith\nargs\n\n".into(),
            "10: unknown command\n".into(),
        ),
        // The longest allowed line is read as a command...
        (
            format!("{}\n\n", "a".repeat(256)),
            "10: unknown command\n".into(),
        ),
        // ...and one byte more is refused.
        (
            format!("{}\n\n", "a".repeat(257)),
            "1: request line longer than 256 bytes\n".into(),
        ),
        (
            format!("acl\n{}\n\n", "1".repeat(1000)),
            "1: request line longer than 256 bytes\n".into(),
        ),
    ];
    for (request, response) in &cases {
        assert_eq!(
            String::from_utf8(exchange(&s.sock, request.as_bytes(), false)).unwrap(),
            *response,
            "response to {request:?}"
        );
    }
    // After all that the ACL is the last good one and the server still works.
    assert!(s.server.log().contains("unknown command"));
    let mut c = greeted(&s.server);
    c.write_ok(0, &[1u8; 512]);
    s.server.assert_no_panic();
}

#[test]
fn half_closed_and_unterminated_requests_cause_a_response_at_eof() {
    let s = serve_with_sock("ctl-eof", MIB, &[]);
    let pid = s.server.server_pid;
    // Nothing at all, then EOF.
    assert_eq!(exchange(&s.sock, b"", true), b"9: missing command\n");
    // "status" with no newline, then EOF.
    let r = String::from_utf8(exchange(&s.sock, b"status", true)).unwrap();
    assert!(
        r.starts_with(&format!("0: pid={pid} ")) && r.ends_with(" \n"),
        "{r:?}"
    );
    // Arguments ended by EOF rather than a blank line.
    assert_eq!(exchange(&s.sock, b"acl\n127.0.0.1", true), b"0: updated\n");
    assert_eq!(exchange(&s.sock, b"break\n", true), b"1: not mirroring\n");
    assert_eq!(
        exchange(&s.sock, b"nonsense", true),
        b"10: unknown command\n"
    );
    // An overlong line cut off by EOF.
    assert_eq!(
        exchange(&s.sock, "x".repeat(300).as_bytes(), true),
        b"1: request line longer than 256 bytes\n"
    );
}

#[test]
fn many_request_lines_cause_the_whole_acl_to_apply_and_too_many_to_be_refused() {
    let s = serve_with_sock("ctl-lines", MIB, &[]);
    // 2000 entries, the one that lets us in last: all of them were read.
    let mut req = String::from("acl\n");
    for i in 0..1999 {
        req.push_str(&format!("10.{}.{}.1\n", i / 250, i % 250));
    }
    req.push_str("127.0.0.1\n\n");
    assert_eq!(ask(&s.sock, &req), "0: updated\n");
    greeted(&s.server).write_ok(0, &[2u8; 512]);

    // More lines than any request may have: refused, the ACL unchanged
    // (were it applied, 127.0.0.1 would be shut out).
    let mut req = String::from("acl\n");
    for _ in 0..5000 {
        req.push_str("10.0.0.1\n");
    }
    req.push('\n');
    let mut c = UnixStream::connect(&s.sock).unwrap();
    c.set_read_timeout(Some(QUICK)).unwrap();
    c.set_write_timeout(Some(QUICK)).unwrap();
    c.write_all(req.as_bytes()).unwrap();
    // The server answers before reading the rest, so closing may reset the
    // connection after the response: read up to the newline.
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    while !got.ends_with(b"\n") {
        match c.read(&mut b) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading the response: {e}"),
        }
    }
    let r = String::from_utf8(got).unwrap();
    assert!(
        r.starts_with("1: ") && r.ends_with('\n') && r.matches('\n').count() == 1,
        "{r:?}"
    );
    assert!(r.contains("more than"), "{r:?}");
    greeted(&s.server).write_ok(512, &[3u8; 512]);
}

// ---------------------------------------------------------------------------
// The commands: exit codes and the stdout / stderr split.

#[test]
fn control_commands_cause_the_response_code_as_exit_and_text_on_the_right_stream() {
    let s = serve_with_sock("ctl-cli", MIB, &[]);
    let sock = s.sock.to_str().unwrap();
    let cases: &[(&[&str], i32, &str, &str)] = &[
        (&["acl", "-s", sock, "127.0.0.1", "::1"], 0, "updated\n", ""),
        (
            &["acl", "-s", sock, "127.0.0.1", "nope"],
            1,
            "",
            "bad spec: nope\n",
        ),
        (
            &["mirror", "-s", sock, "-l", "bogus", "-p", "1"],
            1,
            "",
            "bad IP address\n",
        ),
        (
            &["mirror", "-s", sock, "-l", "127.0.0.1", "-p", "abc"],
            1,
            "",
            "bad IP port number\n",
        ),
        (
            &[
                "mirror",
                "-s",
                sock,
                "-l",
                "127.0.0.1",
                "-p",
                "1",
                "-b",
                "nope",
            ],
            1,
            "",
            "bad bind address\n",
        ),
        (
            &[
                "mirror",
                "-s",
                sock,
                "-l",
                "127.0.0.1",
                "-p",
                "1",
                "-u",
                "-b",
                "nope",
            ],
            1,
            "",
            "bad bind address\n",
        ),
        (
            &[
                "mirror",
                "-s",
                sock,
                "-l",
                "127.0.0.1",
                "-p",
                "1",
                "-m",
                "12x",
            ],
            1,
            "",
            "max_bps couldn't be parsed\n",
        ),
        (
            &[
                "mirror",
                "-s",
                sock,
                "-l",
                "127.0.0.1",
                "-p",
                "1",
                "-m",
                "99999999999999999999",
            ],
            1,
            "",
            "max_bps out of range\n",
        ),
        (
            &["mirror-speed", "-s", sock, "-m", "1000"],
            1,
            "",
            "Not currently mirroring\n",
        ),
        (
            &["mirror-speed", "-s", sock, "-m", "abc"],
            1,
            "",
            "Not currently mirroring\n",
        ),
        (
            &["mirror-speed", "-s", sock, "-m", "99999999999999999999"],
            1,
            "",
            "Not currently mirroring\n",
        ),
        (&["break", "-s", sock], 1, "", "not mirroring\n"),
        (&["acl", "-s", sock], 0, "updated\n", ""),
    ];
    for (args, code, out, err) in cases {
        assert_output(&flexnbd(args), *code, out, err, &format!("{args:?}"));
    }
}

#[test]
fn control_command_usage_errors_cause_exit_1_and_the_spec_messages() {
    let dir = TempDir::new("ctl-usage");
    let missing = dir.join("nobody.sock");
    let m = missing.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["status"], "--sock is required."),
        (&["status", "--json"], "--sock is required."),
        (&["acl", "127.0.0.1"], "--sock is required."),
        (
            &["mirror", "-l", "127.0.0.1", "-p", "1"],
            "--sock is required.",
        ),
        (&["mirror-speed", "-m", "1"], "--sock is required."),
        (&["break"], "--sock is required."),
        (&["mirror", "-s", m], "both --addr and --port are required."),
        (
            &["mirror", "-s", m, "-l", "127.0.0.1"],
            "both --addr and --port are required.",
        ),
        (
            &["mirror", "-s", m, "-p", "1"],
            "both --addr and --port are required.",
        ),
        (&["mirror-speed", "-s", m], "--max-speed is required."),
        (&["status", "-s", m], "cannot connect to control socket"),
        (
            &["acl", "-s", m, "127.0.0.1"],
            "cannot connect to control socket",
        ),
        (
            &["mirror", "-s", m, "-l", "127.0.0.1", "-p", "1"],
            "cannot connect to control socket",
        ),
        (
            &["mirror-speed", "-s", m, "-m", "1"],
            "cannot connect to control socket",
        ),
        (&["break", "-s", m], "cannot connect to control socket"),
        (&["status", "-s", m, "--bogus"], "--bogus"),
    ];
    for (args, needle) in cases {
        assert_fails_with(&flexnbd(args), needle, &format!("{args:?}"));
    }
    // The missing socket is named in the message.
    assert!(stderr(&flexnbd(&["status", "-s", m])).contains(m));
}

// ---------------------------------------------------------------------------
// The socket file.

#[test]
fn starting_a_server_causes_a_0600_socket_that_sigterm_removes() {
    let mut s = serve_with_sock("ctl-mode", MIB, &[]);
    let meta = fs::symlink_metadata(&s.sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    s.server.signal(libc::SIGTERM);
    assert_eq!(s.server.wait_exit().code(), Some(0));
    assert!(!s.sock.exists(), "socket file left after a clean exit");
}

#[test]
fn the_socket_file_appearing_causes_the_port_to_be_listening_already() {
    let dir = TempDir::new("ctl-order");
    let file = dir.sparse_file("disk.img", MIB);
    for round in 0..3 {
        let sock = dir.join(&format!("ctl{round}.sock"));
        let log_path = dir.join(&format!("order{round}.log"));
        let child = clean_command(BIN)
            .args(serve_args(&file, &sock, &[]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        let _guard = KillOnDrop(child);
        // Poll for the socket file; the first time it is seen, the port must
        // already have been reported and must accept a connection.
        wait_for("the control socket file", WAIT, || {
            if !sock.exists() {
                return None;
            }
            let log = fs::read_to_string(&log_path).unwrap();
            let at = log
                .find("listening on ")
                .unwrap_or_else(|| panic!("socket exists before the port listens; log:\n{log}"));
            let rest = &log[at + "listening on ".len()..];
            let addr: SocketAddr = rest[..rest.find('\n').unwrap()].trim().parse().unwrap();
            let mut c = RawClient::connect(addr);
            c.oldstyle_greeting();
            Some(())
        });
    }
}

#[test]
fn a_stale_socket_at_sock_causes_it_to_be_replaced_with_a_warning() {
    let dir = TempDir::new("ctl-stale");
    let file = dir.sparse_file("disk.img", MIB);
    let sock = dir.join("ctl.sock");
    // A socket file nobody listens on: bound, then the listener dropped.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(fs::symlink_metadata(&sock).unwrap().file_type().is_socket());
    assert!(
        UnixStream::connect(&sock).is_err(),
        "the stale socket answers"
    );

    let server = Flexnbd::serve(&dir, &file, &["-s", sock.to_str().unwrap()]);
    wait_for_sock(&sock);
    assert!(status_line(&sock).starts_with(&format!("pid={} ", server.server_pid)));
    assert!(
        server.log().contains("replacing stale control socket"),
        "log:\n{}",
        server.log()
    );
}

#[test]
fn a_live_socket_at_sock_causes_a_second_server_to_exit_1_and_the_first_to_keep_working() {
    let s = serve_with_sock("ctl-live", MIB, &[]);
    let other = s.dir.sparse_file("other.img", 2 * MIB);
    let args = serve_args(&other, &s.sock, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_tool(BIN, &args, QUICK);
    assert_fails_with(&o, "is in use by a running server", "second serve");
    // The first server still owns the socket and serves.
    assert_eq!(
        status_value(&s.sock, "pid"),
        s.server.server_pid.to_string()
    );
    assert_eq!(status_value(&s.sock, "size"), MIB.to_string());
    greeted(&s.server).write_ok(0, &[5u8; 512]);
}

#[test]
fn a_regular_file_at_sock_causes_serve_to_exit_1_and_leave_it_alone() {
    let dir = TempDir::new("ctl-notsock");
    let file = dir.sparse_file("disk.img", MIB);
    let sock = dir.join("ctl.sock");
    fs::write(&sock, b"precious").unwrap();
    let args = serve_args(&file, &sock, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_tool(BIN, &args, QUICK);
    assert_fails_with(&o, "is not a socket", "serve onto a regular file");
    assert_eq!(fs::read(&sock).unwrap(), b"precious");
}

#[test]
fn a_sock_in_a_missing_directory_causes_exit_1_with_a_message_and_no_core() {
    let dir = TempDir::new("ctl-nodir");
    let file = dir.sparse_file("disk.img", MIB);
    let sock = dir.join("no-such-dir/ctl.sock");
    let args = serve_args(&file, &sock, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_tool(BIN, &args, QUICK);
    // Exit code 1, not a signal (abort would give no code).
    assert_fails_with(
        &o,
        "cannot create control socket",
        "serve with a missing dir",
    );
    assert!(
        stderr(&o).contains(sock.to_str().unwrap()),
        "{}",
        stderr(&o)
    );
}

// ---------------------------------------------------------------------------
// ACL changes.

#[test]
fn an_acl_excluding_a_connected_client_causes_eof_and_refusal_until_restored() {
    let s = serve_with_sock("ctl-acl", MIB, &[]);
    let sock = s.sock.to_str().unwrap();
    let mut a = greeted(&s.server);
    a.write_ok(0, &[9u8; 4096]);
    wait_num_clients(&s.sock, 1);

    assert_output(
        &flexnbd(&["acl", "-s", sock, "10.0.0.1", "192.168.0.0/16"]),
        0,
        "updated\n",
        "",
        "acl excluding us",
    );
    assert!(a.sees_eof(), "excluded client was not disconnected");
    s.server.wait_log("no longer allowed");
    wait_num_clients(&s.sock, 0);
    assert_refused_before_greeting(s.server.addr, "new client after the ACL change");

    // A bad spec changes nothing: still refused.
    assert_eq!(
        ask(&s.sock, "acl\n127.0.0.1\nbogus\n\n"),
        "1: bad spec: bogus\n"
    );
    assert_refused_before_greeting(s.server.addr, "new client after a bad acl");
    assert_eq!(status_value(&s.sock, "num_clients"), "0");

    // Putting 127.0.0.1 back lets new clients in; the data is still there.
    assert_output(
        &flexnbd(&["acl", "-s", sock, "127.0.0.1"]),
        0,
        "updated\n",
        "",
        "acl readmitting us",
    );
    let mut b = greeted(&s.server);
    assert_eq!(b.read_ok(0, 4096), vec![9u8; 4096]);
    wait_num_clients(&s.sock, 1);
}

#[test]
fn default_deny_with_a_later_empty_acl_causes_everyone_to_be_refused() {
    let s = serve_with_sock("ctl-deny", MIB, &["-d", "127.0.0.1"]);
    let sock = s.sock.to_str().unwrap();
    let mut a = greeted(&s.server);
    a.write_ok(0, &[4u8; 512]);
    assert_output(
        &flexnbd(&["acl", "-s", sock]),
        0,
        "updated\n",
        "",
        "empty acl",
    );
    assert!(a.sees_eof(), "client not disconnected by the empty ACL");
    assert_refused_before_greeting(s.server.addr, "new client under default-deny");
    wait_num_clients(&s.sock, 0);

    // Without --default-deny, the same empty ACL lets everyone in.
    let open = serve_with_sock("ctl-open", MIB, &["127.0.0.1"]);
    let open_sock = open.sock.to_str().unwrap();
    assert_output(
        &flexnbd(&["acl", "-s", open_sock]),
        0,
        "updated\n",
        "",
        "empty acl",
    );
    greeted(&open.server).write_ok(0, &[4u8; 512]);
}

// ---------------------------------------------------------------------------
// Slow and silent control clients; storms.

#[test]
fn silent_and_stalled_control_clients_cause_no_delay_to_status() {
    let s = serve_with_sock("ctl-silent", MIB, &[]);
    let connected = Instant::now();
    let silent = UnixStream::connect(&s.sock).unwrap();
    let mut partial = UnixStream::connect(&s.sock).unwrap();
    partial.write_all(b"sta").unwrap();
    let mut unended = UnixStream::connect(&s.sock).unwrap();
    unended.write_all(b"acl\n10.0.0.1\n").unwrap();

    // While all three hang on, status answers promptly, by CLI and raw.
    let started = Instant::now();
    let o = run_tool(
        BIN,
        &["status", "-s", s.sock.to_str().unwrap()],
        Duration::from_secs(3),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with(&format!("pid={} ", s.server.server_pid)));
    assert_eq!(status_value(&s.sock, "num_clients"), "0");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "status was delayed"
    );

    // The stalled ones are closed, unanswered, once the request time limit
    // passes.
    for (name, mut c) in [
        ("silent", silent),
        ("partial", partial),
        ("unended", unended),
    ] {
        c.set_read_timeout(Some(REQUEST_TIMEOUT + WAIT)).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got)
            .unwrap_or_else(|e| panic!("{name}: not closed: {e}"));
        assert!(got.is_empty(), "{name}: got {got:?}");
        let waited = connected.elapsed();
        assert!(
            waited >= REQUEST_TIMEOUT - Duration::from_secs(1)
                && waited < REQUEST_TIMEOUT + Duration::from_secs(4),
            "{name}: closed after {waited:?}"
        );
    }
    // The unfinished acl request was not applied (it would shut us out).
    greeted(&s.server).write_ok(0, &[6u8; 512]);
}

#[test]
fn a_status_storm_during_nbd_io_causes_every_request_to_be_answered() {
    let s = serve_with_sock("ctl-storm", 4 * MIB, &[]);
    let pid = s.server.server_pid;
    let stop = Arc::new(AtomicBool::new(false));
    let io: Vec<_> = (0..2u64)
        .map(|n| {
            let mut c = greeted(&s.server);
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                while !stop.load(Ordering::Relaxed) || rounds < 5 {
                    let offset = n * 2 * MIB + (rounds % 64) * 4096;
                    let data = pattern(4096, (rounds as u8) ^ (n as u8));
                    c.write_ok(offset, &data);
                    assert_eq!(c.read_ok(offset, 4096), data, "read back");
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    let storm: Vec<_> = (0..4)
        .map(|_| {
            let sock = s.sock.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    let r = ask(&sock, "status\n\n");
                    assert!(
                        r.starts_with(&format!("0: pid={pid} ")) && r.ends_with(" \n"),
                        "{r:?}"
                    );
                    assert!(r.contains(" num_clients=2 "), "status during I/O: {r:?}");
                }
            })
        })
        .collect();
    for t in storm {
        t.join().expect("storm thread");
    }
    stop.store(true, Ordering::Relaxed);
    for t in io {
        assert!(t.join().expect("I/O thread") >= 5);
    }
    s.server.assert_no_panic();
}

#[test]
fn sigterm_during_a_status_storm_causes_exit_0_with_no_request_hanging() {
    let mut s = serve_with_sock("ctl-storm-stop", MIB, &[]);
    let pid = s.server.server_pid;
    let answered = Arc::new(AtomicUsize::new(0));
    let storm: Vec<_> = (0..4)
        .map(|_| {
            let sock = s.sock.clone();
            let answered = answered.clone();
            std::thread::spawn(move || -> Result<(), String> {
                let until = Instant::now() + WAIT;
                // Until the server is gone: each request gets a full
                // response, or a connection error; never a hang.
                while Instant::now() < until {
                    let Ok(mut c) = UnixStream::connect(&sock) else {
                        return Ok(());
                    };
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                    if c.write_all(b"status\n\n").is_err() {
                        continue;
                    }
                    let mut got = Vec::new();
                    match c.read_to_end(&mut got) {
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            return Err(format!("status request hung; got {got:?}"))
                        }
                        Err(_) => continue,
                        Ok(_) => {}
                    }
                    let r = String::from_utf8_lossy(&got);
                    if got.is_empty() {
                        continue; // closed unanswered during shutdown
                    }
                    if !(r.starts_with(&format!("0: pid={pid} ")) && r.ends_with(" \n")) {
                        return Err(format!("partial or wrong response {r:?}"));
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                Err("the control socket still accepts connections".into())
            })
        })
        .collect();
    wait_for("the storm to be under way", WAIT, || {
        (answered.load(Ordering::Relaxed) >= 40).then_some(())
    });
    let signalled = Instant::now();
    s.server.signal(libc::SIGTERM);
    assert_eq!(s.server.wait_exit().code(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "exit took {:?}",
        signalled.elapsed()
    );
    for t in storm {
        t.join().expect("storm thread").unwrap();
    }
    assert!(!s.sock.exists(), "socket file left after exit");
    s.server.assert_no_panic();
}

// ---------------------------------------------------------------------------
// Signals.

#[test]
fn sigterm_with_silent_control_clients_causes_a_prompt_exit_0() {
    let mut s = serve_with_sock("ctl-term-silent", MIB, &[]);
    let silent = UnixStream::connect(&s.sock).unwrap();
    let mut partial = UnixStream::connect(&s.sock).unwrap();
    partial.write_all(b"stat").unwrap();
    // Both connections are accepted before the signal.
    assert_eq!(status_value(&s.sock, "num_clients"), "0");
    let signalled = Instant::now();
    s.server.signal(libc::SIGTERM);
    assert_eq!(s.server.wait_exit().code(), Some(0));
    // Connections with no complete request are not waited for (they would
    // otherwise hold shutdown for the whole request time limit).
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "exit took {:?}",
        signalled.elapsed()
    );
    for (name, mut c) in [("silent", silent), ("partial", partial)] {
        c.set_read_timeout(Some(QUICK)).unwrap();
        let mut got = Vec::new();
        match c.read_to_end(&mut got) {
            Ok(_) => assert!(got.is_empty(), "{name}: got {got:?}"),
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{name}: {e}"),
        }
    }
    assert!(!s.sock.exists(), "socket file left after exit");
}

/// Two idle clients (one has written), then `sig`: both see EOF, the
/// process exits 0, the socket file is gone and the port is closed.
fn signal_with_idle_clients_causes_exit_0(sig: i32, tag: &str) {
    let mut s = serve_with_sock(tag, MIB, &[]);
    let mut a = greeted(&s.server);
    a.write_ok(0, &[8u8; 4096]);
    let mut b = greeted(&s.server);
    wait_num_clients(&s.sock, 2);
    s.server.signal(sig);
    assert!(a.sees_eof(), "client a not closed");
    assert!(b.sees_eof(), "client b not closed");
    assert_eq!(s.server.wait_exit().code(), Some(0));
    assert!(!s.sock.exists(), "socket file left after exit");
    assert!(tcp_refused(s.server.addr), "port still open");
    assert_eq!(read_file_range(&s.file, 0, 4096), vec![8u8; 4096]);
}

#[test]
fn sigterm_with_idle_clients_causes_exit_0() {
    signal_with_idle_clients_causes_exit_0(libc::SIGTERM, "ctl-term-idle");
}

#[test]
fn sigint_with_idle_clients_causes_exit_0() {
    signal_with_idle_clients_causes_exit_0(libc::SIGINT, "ctl-int-idle");
}

#[test]
fn sigquit_with_idle_clients_causes_exit_0() {
    signal_with_idle_clients_causes_exit_0(libc::SIGQUIT, "ctl-quit-idle");
}

/// A client is inside a WRITE (header and part of the payload sent) when
/// `sig` arrives: the control socket and the port close while it is still
/// in progress; the write then completes and is answered, the client is
/// closed, and the process exits 0 with the data in the file.
fn signal_mid_write_causes_the_write_to_finish_then_exit_0(sig: i32, tag: &str) {
    let mut s = serve_with_sock(tag, MIB, &[]);
    let mut a = greeted(&s.server);
    a.write_ok(0, &[1u8; 512]);
    let mut idle = greeted(&s.server);
    let data = pattern(64 * 1024, 42);
    start_stalled_write(&mut a, 77, 8192, &data, 1000);
    wait_server_read_all(s.server.port(), &a.stream);

    s.server.signal(sig);
    wait_for("the control socket to go", WAIT, || {
        (!s.sock.exists()).then_some(())
    });
    wait_for("the port to close", WAIT, || {
        tcp_refused(s.server.addr).then_some(())
    });
    assert!(idle.sees_eof(), "idle client not closed");
    assert!(
        s.server.is_running(),
        "exited without waiting for the write in progress"
    );

    a.send(&data[1000..]);
    assert_write_reply(&mut a, 77);
    assert!(a.sees_eof(), "client not closed after its request");
    assert_eq!(s.server.wait_exit().code(), Some(0));
    assert_eq!(read_file_range(&s.file, 8192, data.len()), data);
}

#[test]
fn sigterm_mid_write_causes_the_write_to_finish_then_exit_0() {
    signal_mid_write_causes_the_write_to_finish_then_exit_0(libc::SIGTERM, "ctl-term-mid");
}

#[test]
fn sigint_mid_write_causes_the_write_to_finish_then_exit_0() {
    signal_mid_write_causes_the_write_to_finish_then_exit_0(libc::SIGINT, "ctl-int-mid");
}

#[test]
fn sigquit_mid_write_causes_the_write_to_finish_then_exit_0() {
    signal_mid_write_causes_the_write_to_finish_then_exit_0(libc::SIGQUIT, "ctl-quit-mid");
}

#[test]
fn sigterm_with_a_write_that_never_finishes_causes_exit_0_within_the_drain_time() {
    // Takes about CLIENT_DRAIN (10 s): the server must wait that long for
    // the stalled client, and no longer.
    let mut s = serve_with_sock("ctl-term-stall", MIB, &[]);
    let mut a = greeted(&s.server);
    start_stalled_write(&mut a, 78, 0, &pattern(4096, 3), 100);
    wait_server_read_all(s.server.port(), &a.stream);
    let signalled = Instant::now();
    s.server.signal(libc::SIGTERM);
    wait_for("the control socket to go", WAIT, || {
        (!s.sock.exists()).then_some(())
    });
    assert_eq!(s.server.wait_exit().code(), Some(0));
    let took = signalled.elapsed();
    assert!(
        took < CLIENT_DRAIN + Duration::from_secs(3),
        "exit took {took:?}"
    );
    assert!(a.sees_eof(), "stalled client still open after exit");
}

// ---------------------------------------------------------------------------
// Killswitch.

fn serve_with_killswitch_env(tag: &str, extra: &[&str]) -> Served {
    let dir = TempDir::new(tag);
    let file = dir.sparse_file("disk.img", MIB);
    let sock = dir.join("ctl.sock");
    let server = Flexnbd::spawn_with_env(
        &dir,
        &serve_args(&file, &sock, extra),
        &[("FLEXNBD_KILLSWITCH_SECS", "1")],
    );
    wait_for_sock(&sock);
    Served {
        server,
        sock,
        file,
        dir,
    }
}

#[test]
fn killswitch_with_a_stalled_write_causes_only_that_client_to_be_dropped() {
    let s = serve_with_killswitch_env("ctl-kill", &["-k"]);
    let mut busy = greeted(&s.server);
    let mut stalled = greeted(&s.server);
    stalled.write_ok(0, &[1u8; 512]);
    start_stalled_write(&mut stalled, 99, 4096, &pattern(8192, 1), 100);
    let started = Instant::now();

    // The other client is served throughout, until the stalled one goes.
    let mut served = 0u64;
    let dropped_after = loop {
        let offset = 65536 + (served % 32) * 4096;
        let data = pattern(4096, served as u8);
        busy.write_ok(offset, &data);
        assert_eq!(busy.read_ok(offset, 4096), data);
        served += 1;
        if closed_within(&mut stalled, Duration::from_millis(20)) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "stalled client not dropped"
        );
    };
    assert!(
        dropped_after >= Duration::from_millis(800),
        "dropped too early: {dropped_after:?}"
    );
    assert!(served >= 2, "the other client was not served meanwhile");
    s.server.wait_log("killswitch");
    busy.write_ok(0, &[2u8; 512]);
    wait_num_clients(&s.sock, 1);
}

#[test]
fn no_killswitch_with_a_stalled_write_causes_no_drop_within_2_s() {
    // The environment variable alone must not enable the killswitch.
    let s = serve_with_killswitch_env("ctl-nokill", &[]);
    let mut busy = greeted(&s.server);
    let mut stalled = greeted(&s.server);
    let data = pattern(8192, 2);
    start_stalled_write(&mut stalled, 100, 4096, &data, 100);
    // Observation window (not synchronisation): for 2 s, twice the
    // killswitch limit given, the stalled client must stay connected while
    // the other is served.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        busy.write_ok(65536, &[3u8; 4096]);
        assert!(
            !closed_within(&mut stalled, Duration::from_millis(50)),
            "stalled client dropped without --killswitch after {:?}",
            started.elapsed()
        );
    }
    assert_eq!(status_value(&s.sock, "num_clients"), "2");
    stalled.send(&data[100..]);
    assert_write_reply(&mut stalled, 100);
    assert_eq!(read_file_range(&s.file, 4096, data.len()), data);
}

#[test]
fn mirror_wait_without_a_mirror_causes_not_mirroring() {
    let s = serve_with_sock("ctl-wait", MIB, &[]);
    assert_eq!(ask(&s.sock, "mirror_wait\n\n"), "1: not mirroring\n");
}

#[test]
fn mirror_wait_on_a_migration_faster_than_any_poll_causes_exit_0() {
    // A tiny image migrates within milliseconds, far inside one status poll:
    // `--wait` must still report the real outcome, never "the server went away".
    for round in 0..3 {
        let dir = TempDir::new("ctl-wait-fast");
        let src = dir.pattern_file("src.img", 64 * 1024, round);
        let dst = dir.sparse_file("dst.img", 64 * 1024);
        let dsock = dir.join("d.sock");
        let mut listen_args = serve_args(&dst, &dsock, &[]);
        listen_args[0] = "listen".into();
        let mut dest = Flexnbd::spawn(&dir, &listen_args);
        let ssock = dir.join("s.sock");
        let mut source = Flexnbd::spawn(&dir, &serve_args(&src, &ssock, &[]));
        wait_for_sock(&ssock);
        let port = dest.port().to_string();
        let out = flexnbd(&[
            "mirror",
            "-s",
            ssock.to_str().unwrap(),
            "-l",
            "127.0.0.1",
            "-p",
            &port,
            "--wait",
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "round {round}: {}",
            stderr(&out)
        );
        assert!(
            stdout(&out).lines().any(|l| l == "Mirror started"),
            "{}",
            stdout(&out)
        );
        assert_eq!(
            stdout(&out).lines().last(),
            Some("migration complete"),
            "{}",
            stdout(&out)
        );
        assert_eq!(source.wait_exit().code(), Some(0));
        assert_eq!(dest.wait_exit().code(), Some(0));
        assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
    }
}
