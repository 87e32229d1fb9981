//! Test harness: temporary directories, the real `flexnbd` binary as a child
//! process (port 0, killed on drop, its log shown when a test fails), bounded
//! waits, external tools with time limits, and a raw NBD client built on the
//! project's codec.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use assert_cmd::assert::{Assert, OutputAssertExt};
use flexnbd::proto::{self, Request, SimpleReply};

pub const BIN: &str = env!("CARGO_BIN_EXE_flexnbd");

/// How long any wait in the suite may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// Polls `check` until it returns `Some`, failing the test after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = check() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {:?} waiting for {what}", limit);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A fresh directory (tempfile's), removed with everything in it when
/// dropped. Its name starts `flexnbd-test-<tag>-`, so a directory left behind
/// by a killed run says which test made it.
pub struct TempDir {
    pub path: PathBuf,
    /// Never read: held for its Drop, which removes the directory.
    _guard: tempfile::TempDir,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("flexnbd-test-{tag}-"))
            .tempdir()
            .expect("create temp dir");
        TempDir {
            path: dir.path().to_path_buf(),
            _guard: dir,
        }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A sparse file of `size` bytes.
    pub fn sparse_file(&self, name: &str, size: u64) -> PathBuf {
        let p = self.join(name);
        File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    /// A file of `size` bytes filled with a deterministic pattern.
    pub fn pattern_file(&self, name: &str, size: u64, seed: u8) -> PathBuf {
        let p = self.join(name);
        fs::write(&p, pattern(size as usize, seed)).unwrap();
        p
    }
}

/// Deterministic non-zero-heavy bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

pub fn read_file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Bytes of the file actually allocated on disk.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

/// A running `flexnbd` process. Killed when dropped; its log is printed if
/// the test is failing.
/// A child process (a client, a proxy on a UNIX socket, `mirror --wait`)
/// killed and reaped when dropped, so a failing test leaves nothing behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Flexnbd {
    pub child: Option<Child>,
    pub log_path: PathBuf,
    pub addr: SocketAddr,
    /// The pid in the server's own log lines; differs from the child's when
    /// a wrapper (strace) runs the binary, and is then killed separately.
    pub server_pid: u32,
    status: Option<ExitStatus>,
}

impl Flexnbd {
    /// Starts `flexnbd serve -l 127.0.0.1 -p 0 -f FILE -v EXTRA...` and waits
    /// until it says which port it got.
    pub fn serve(dir: &TempDir, file: &Path, extra: &[&str]) -> Flexnbd {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "-l".into(),
            "127.0.0.1".into(),
            "-p".into(),
            "0".into(),
            "-f".into(),
        ];
        args.push(file.display().to_string());
        args.push("-v".into());
        args.extend(extra.iter().map(|s| s.to_string()));
        Flexnbd::spawn(dir, &args)
    }

    /// Starts the binary with exactly `args` (the log must show
    /// "listening on ADDR:PORT").
    pub fn spawn(dir: &TempDir, args: &[String]) -> Flexnbd {
        Flexnbd::spawn_program(dir, BIN, args)
    }

    /// Like `spawn`, but runs `program` (e.g. strace wrapping the binary).
    pub fn spawn_program(dir: &TempDir, program: &str, args: &[String]) -> Flexnbd {
        let mut server = Flexnbd::spawn_or_exit(dir, program, args);
        if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("flexnbd exited early with {status}; log:\n{}", server.log());
        }
        server
    }

    /// Like `spawn_program`, but a process that exits before it reports its
    /// port (a `listen` refusing to start) is returned as it is, exited,
    /// for the caller to judge; its `addr` is then 127.0.0.1:0.
    pub fn spawn_or_exit(dir: &TempDir, program: &str, args: &[String]) -> Flexnbd {
        static N: AtomicU64 = AtomicU64::new(0);
        let log_path = dir.join(&format!(
            "flexnbd-{}.log",
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let log = File::create(&log_path).unwrap();
        let child = clean_command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn flexnbd");
        let pid = child.id();
        let mut server = Flexnbd {
            child: Some(child),
            log_path,
            addr: "127.0.0.1:0".parse().unwrap(),
            server_pid: pid,
            status: None,
        };
        let reported = wait_for("flexnbd to report its port or exit", WAIT, || {
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                // Kept, so that later waits see the status again.
                server.status = Some(status);
                return Some(None);
            }
            let log = server.log();
            let at = log.find("listening on ")?;
            let line_start = log[..at].rfind('\n').map_or(0, |i| i + 1);
            // `<ms>:<level>:<pid> ...`
            let pid = log[line_start..at]
                .split(':')
                .nth(2)?
                .split(' ')
                .next()?
                .parse::<u32>()
                .ok()?;
            let rest = &log[at + "listening on ".len()..];
            let end = rest.find('\n')?;
            Some(Some((rest[..end].trim().parse::<SocketAddr>().ok()?, pid)))
        });
        let Some((addr, server_pid)) = reported else {
            return server;
        };
        server.addr = addr;
        server.server_pid = server_pid;
        // The control socket is bound just after the port is reported; a
        // test that talks to it at once must not race that bind.
        // Only flexnbd's own arguments count (a wrapper like strace has a
        // `-s` of its own).
        let mode = args.iter().position(|a| a == "serve" || a == "listen");
        let has_sock = mode.is_some_and(|at| {
            args[at..]
                .iter()
                .any(|a| a == "-s" || a == "--sock" || a.starts_with("--sock="))
        });
        if has_sock {
            server.wait_log("control socket at ");
        }
        server
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}", self.port())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `text`.
    /// Fails unless the log says `fault fired: <key> -> <action>` (within
    /// the usual bound).
    pub fn assert_fired(&self, key: &str, action: &str) {
        self.wait_log(&format!("fault fired: {key} -> {action}"));
    }

    pub fn wait_log(&self, text: &str) {
        wait_for(&format!("log line containing {text:?}"), WAIT, || {
            self.log().contains(text).then_some(())
        });
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            send_signal(c.id(), sig);
        }
    }

    /// Waits (bounded) for the process to exit and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        self.wait_exit_within(WAIT)
    }

    /// Like `wait_exit`, within `limit` (a migration over a slow link).
    pub fn wait_exit_within(&mut self, limit: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let child = self.child.as_mut().unwrap();
        let status = wait_for("flexnbd to exit", limit, || child.try_wait().unwrap());
        self.status = Some(status);
        status
    }

    pub fn is_running(&mut self) -> bool {
        self.status.is_none() && self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Fails the test if the log shows a panic.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(!log.contains("panicked"), "flexnbd panicked; log:\n{log}");
    }

    pub fn connect(&self) -> RawClient {
        RawClient::connect(self.addr)
    }
}

impl Drop for Flexnbd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.server_pid != c.id() && self.status.is_none() {
                send_signal(self.server_pid, libc::SIGKILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- flexnbd log ({}) ----\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// Sends `sig` to the process `pid`: std's `Child::kill` sends only SIGKILL,
/// and a server run by a wrapper (strace) is not our child at all.
pub fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) takes two integers and touches no memory of ours, so
    // it cannot break any Rust invariant; at worst it fails with ESRCH.
    unsafe { libc::kill(pid as i32, sig) };
}

/// True when the process `pid` ignores `sig` (its `SigIgn` mask in
/// /proc/PID/status has the signal's bit).
pub fn ignores_signal(pid: u32, sig: i32) -> bool {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .unwrap_or_else(|| panic!("no SigIgn line in /proc/{pid}/status:\n{status}"));
    let mask = u64::from_str_radix(mask.trim(), 16).unwrap();
    mask & (1 << (sig - 1)) != 0
}

/// A command for `program` without the caller's `FLEXNBD_*` variables: a
/// fault plan or a timeout override left in the shell that runs the suite
/// must never reach a process a test did not give it to (tests that want one
/// pass it explicitly, through `spawn_with_env` or `env`).
pub fn clean_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FLEXNBD_") {
            cmd.env_remove(&name);
        }
    }
    cmd
}

/// Exit statuses of coreutils' timeout when the command ran past its limit
/// (ended by SIGTERM, or by SIGKILL 5 s later), and when it could not run.
const TIMED_OUT: i32 = 124;
const KILLED: i32 = 128 + 9;
const NOT_RUN: i32 = 127;

/// A one-shot run of `program` (an assert_cmd command: add arguments and
/// stdin, then `output()` or `assert()`), without the caller's `FLEXNBD_*`
/// variables (see `clean_command`) and ended after `limit`: exit status 124
/// (or 137) then means it ran too long. Not assert_cmd's own `timeout()`: that
/// installs a SIGCHLD handler in this process, and the signal then
/// interrupts other tests' socket reads that have a timeout (EINTR).
pub fn one_shot(program: &str, limit: Duration) -> assert_cmd::Command {
    let mut cmd = clean_command("timeout");
    // A program that ignores SIGTERM is killed 5 s later.
    cmd.args(["--kill-after=5"])
        .arg(format!("{}s", limit.as_secs_f64()))
        .arg(program);
    assert_cmd::Command::from_std(cmd)
}

/// Runs an external program with a time limit, returning its output.
pub fn run_tool(program: &str, args: &[&str], limit: Duration) -> Output {
    run_tool_with_input(program, args, None, limit)
}

pub fn run_tool_with_input(
    program: &str,
    args: &[&str],
    input: Option<&[u8]>,
    limit: Duration,
) -> Output {
    let mut cmd = one_shot(program, limit);
    cmd.args(args);
    if let Some(data) = input {
        cmd.write_stdin(data.to_vec());
    }
    let start = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run timeout(1) for {program}: {e}"));
    match out.status.code() {
        Some(TIMED_OUT | KILLED) if start.elapsed() >= limit => {
            panic!("{program} {args:?} did not finish within {limit:?}")
        }
        Some(NOT_RUN) if out.stderr.starts_with(b"timeout: failed to run command") => panic!(
            "cannot run {program} (is it installed? .ci/run installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        _ => out,
    }
}

/// Runs a tool like `run_tool` and hands the outcome to assert_cmd's
/// assertions (`code`, `stdout`, `stderr` with predicates), which on failure
/// show the command line, its status and its output.
pub fn assert_tool(program: &str, args: &[&str], limit: Duration) -> Assert {
    assert_tool_with_input(program, args, None, limit)
}

pub fn assert_tool_with_input(
    program: &str,
    args: &[&str],
    input: Option<&[u8]>,
    limit: Duration,
) -> Assert {
    run_tool_with_input(program, args, input, limit)
        .assert()
        .append_context("command", format!("{program} {args:?}"))
}

/// Runs a tool and fails the test unless it exits 0.
pub fn run_ok(program: &str, args: &[&str], limit: Duration) -> Output {
    assert_tool(program, args, limit)
        .success()
        .get_output()
        .clone()
}

/// A raw NBD client over std TCP, for byte-level tests.
pub struct RawClient {
    pub stream: TcpStream,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        RawClient { stream }
    }

    /// Reads the 152-byte oldstyle greeting and returns (size, flags).
    pub fn oldstyle_greeting(&mut self) -> (u64, u32) {
        let g = self.read_exact(proto::OLDSTYLE_GREETING_LEN);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], &proto::INIT_MAGIC.to_be_bytes());
        // Zero, but for a destination's offer of its extensions
        // (docs/handoff.md, "Resuming").
        let offer = proto::oldstyle_greeting_offering(0, 0, proto::ext::LISTEN);
        assert!(
            g[28..].iter().all(|&b| b == 0) || g[28..] == offer[28..],
            "reserved greeting bytes must be zero or a destination's offer: {:02x?}",
            &g[28..40]
        );
        (
            u64::from_be_bytes(g[16..24].try_into().unwrap()),
            u32::from_be_bytes(g[24..28].try_into().unwrap()),
        )
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.stream
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
        b
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    pub fn request(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        self.send(&Request::new(kind, flags, handle, offset, length).encode());
    }

    pub fn simple_reply(&mut self) -> SimpleReply {
        let b = self.read_exact(proto::SIMPLE_REPLY_LEN);
        SimpleReply::decode(b.as_slice().try_into().unwrap())
    }

    /// True when the server has closed the connection (EOF within the wait).
    pub fn sees_eof(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0)) || matches!(self.stream.read(&mut b), Ok(0))
    }

    /// Writes `data` at `offset` and checks the reply is a success.
    pub fn write_ok(&mut self, offset: u64, data: &[u8]) {
        let handle = 0x5752_4954_4500_0000 | offset;
        self.request(proto::cmd::WRITE, 0, handle, offset, data.len() as u32);
        self.send(data);
        let r = self.simple_reply();
        assert_eq!(
            (r.magic, r.error, r.handle),
            (proto::SIMPLE_REPLY_MAGIC, 0, handle),
            "write reply"
        );
    }

    /// Reads `len` bytes at `offset` with a simple reply.
    pub fn read_ok(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let handle = 0x5245_4144_0000_0000 | offset;
        self.request(proto::cmd::READ, 0, handle, offset, len);
        let r = self.simple_reply();
        assert_eq!(
            (r.magic, r.error, r.handle),
            (proto::SIMPLE_REPLY_MAGIC, 0, handle),
            "read reply"
        );
        self.read_exact(len as usize)
    }
}

/// The path of Debian's python3, which can import the nbd module.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Runs nbdsh's Python with Debian's interpreter (the nbd module is not
/// importable by a pyenv python that may come first on PATH), connected to
/// `uri`, executing `script` with the handle `h`.
pub fn nbdsh(uri: &str, script: &str) -> Output {
    run_ok(SYSTEM_PYTHON, &["-m", "nbd", "-u", uri, "-c", script], WAIT)
}

impl Flexnbd {
    /// Like `spawn`, with extra environment variables. Runs the binary
    /// through `env`, which execs it, so the child's pid is the server's.
    pub fn spawn_with_env(dir: &TempDir, args: &[String], env: &[(&str, &str)]) -> Flexnbd {
        let mut full: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        full.push(BIN.to_string());
        full.extend(args.iter().cloned());
        Flexnbd::spawn_program(dir, "/usr/bin/env", &full)
    }
}

/// Arguments for `flexnbd MODE` (serve or listen) on 127.0.0.1, port 0,
/// with `-v` (the harness reads the port from the log), an optional control
/// socket, and `extra` flags.
pub fn server_args(mode: &str, file: &Path, sock: Option<&Path>, extra: &[&str]) -> Vec<String> {
    server_args_on(mode, 0, file, sock, extra)
}

/// [`server_args`] on a given port (a supervisor restarting a server at
/// the address its clients know).
pub fn server_args_on(
    mode: &str,
    port: u16,
    file: &Path,
    sock: Option<&Path>,
    extra: &[&str],
) -> Vec<String> {
    server_args_at(mode, "127.0.0.1", port, file, sock, extra)
}

/// [`server_args_on`] on address `addr` (a host of its own, `wan.rs`).
pub fn server_args_at(
    mode: &str,
    addr: &str,
    port: u16,
    file: &Path,
    sock: Option<&Path>,
    extra: &[&str],
) -> Vec<String> {
    let port = port.to_string();
    let mut args: Vec<String> = [mode, "-l", addr, "-p", &port, "-v", "-f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(file.display().to_string());
    if let Some(sock) = sock {
        args.push("-s".into());
        args.push(sock.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `mirror -s SOCK -l 127.0.0.1 -p PORT EXTRA...`
pub fn mirror_args(sock: &Path, port: u16, extra: &[&str]) -> Vec<String> {
    let port = port.to_string();
    let mut args: Vec<String> = [
        "mirror",
        "-s",
        sock.to_str().unwrap(),
        "-l",
        "127.0.0.1",
        "-p",
        &port,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs `flexnbd mirror -s SOCK -l 127.0.0.1 -p PORT EXTRA...` within `limit`.
pub fn run_mirror(sock: &Path, port: u16, extra: &[&str], limit: Duration) -> Output {
    let args = mirror_args(sock, port, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_tool(BIN, &args, limit)
}

/// Sends one newstyle option: its header and `data`.
pub fn send_option(c: &mut RawClient, option: u32, data: &[u8]) {
    let mut b = proto::OptionHeader {
        option,
        length: data.len() as u32,
    }
    .encode()
    .to_vec();
    b.extend_from_slice(data);
    c.send(&b);
}

/// The marker next to a destination image: `<dest>.INCOMPLETE` (spelled out
/// here rather than taken from the library, so the tests check the name).
pub fn marker_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".INCOMPLETE");
    PathBuf::from(s)
}

/// The marker's `state=` value; `None` when there is no marker, and
/// `"<no state line>"` for a marker without one (an empty marker reads as
/// `receiving` in production, but a test must see that it lost its content).
pub fn marker_state(dest: &Path) -> Option<String> {
    let text = std::fs::read_to_string(marker_path(dest)).ok()?;
    Some(
        text.lines()
            .find_map(|l| l.strip_prefix("state="))
            .unwrap_or("<no state line>")
            .to_string(),
    )
}

/// True when nothing at all (not even EOF) arrives on `c` within `quiet`:
/// shows that a dropped or hung message is really not sent.
pub fn nothing_arrives(c: &mut RawClient, quiet: Duration) -> bool {
    c.stream.set_read_timeout(Some(quiet)).unwrap();
    let mut b = [0u8; 1];
    let silent = matches!(c.stream.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut);
    c.stream.set_read_timeout(Some(WAIT)).unwrap();
    silent
}

// ------------------------------------------------- control and status

/// One raw control request; `None` when the socket cannot be reached or
/// closes without a word.
pub fn control(sock: &Path, request: &str) -> Option<String> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).ok()?;
    let mut got = String::new();
    s.read_to_string(&mut got).ok()?;
    (!got.is_empty()).then_some(got)
}

/// The status line as (ordered keys, map); `None` if the server is gone.
pub fn try_status(sock: &Path) -> Option<(Vec<String>, HashMap<String, String>)> {
    let r = control(sock, "status\n\n")?;
    let line = r
        .strip_prefix("0: ")
        .and_then(|l| l.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("bad status response {r:?}"));
    let mut keys = Vec::new();
    let mut map = HashMap::new();
    for kv in line.split_whitespace() {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        keys.push(k.to_string());
        map.insert(k.to_string(), v.to_string());
    }
    Some((keys, map))
}

pub fn status(sock: &Path) -> HashMap<String, String> {
    try_status(sock)
        .unwrap_or_else(|| panic!("no status from {}", sock.display()))
        .1
}

pub fn num(map: &HashMap<String, String>, key: &str) -> u64 {
    map.get(key)
        .unwrap_or_else(|| panic!("no {key} in status {map:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key} not a number in {map:?}"))
}

/// Waits until the source's status satisfies `check`.
pub fn wait_status(sock: &Path, what: &str, check: impl Fn(&HashMap<String, String>) -> bool) {
    wait_for(what, WAIT, || {
        let s = status(sock);
        check(&s).then_some(())
    });
}

/// Compares two files without printing megabytes on failure.
pub fn assert_same_files(a: &Path, b: &Path) {
    let x = fs::read(a).unwrap();
    let y = fs::read(b).unwrap();
    assert_eq!(
        x.len(),
        y.len(),
        "sizes of {} and {}",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "{} and {} differ first at byte {i} ({} vs {})",
            a.display(),
            b.display(),
            x[i],
            y[i]
        );
    }
}
