//! Migrations between our flexnbd and a real C flexnbd binary, in both
//! directions, while clients keep writing.
//!
//! Simulated: a C `flexnbd serve` with clients writing through it, told by
//! the C `flexnbd mirror` to migrate into our `listen`; and our `serve`
//! with clients writing, told by our `mirror` to migrate into a C
//! `flexnbd listen`; each with and without `--unlink`.
//!
//! What must happen (docs/handoff.md): both processes exit 0; the copy the
//! hand-off table names canonical holds every write acknowledged to a
//! client (with `--unlink` the source file is gone and the destination is
//! it; without, both files are identical); our destination's marker is
//! removed. Into a C destination, which syncs every write, our source must
//! still converge quickly: clients shut out briefly, the whole migration
//! in a few seconds.
//!
//! The C binary comes from `FLEXNBD_C_BIN` (bench/README.md says what it
//! is). Every test here is ignored unless asked for, so that a run without
//! the binary reports them as ignored rather than passed:
//! `FLEXNBD_C_BIN=/path/to/flexnbd cargo test --test acceptance c_interop --
//! --include-ignored`. Asked for without `FLEXNBD_C_BIN`, they fail.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::interop;
use crate::migrate::{assert_holds_acked_writes, client_writer, ClientLog, BLOCK, CLIENTS};

const MIB: u64 = 1024 * 1024;
/// The image: 32 MiB, its first half data, the rest a hole.
const SIZE: u64 = 32 * MIB;
const DATA: u64 = 16 * MIB;

/// The C flexnbd to run, from `FLEXNBD_C_BIN`. A test asked for without it
/// fails: it cannot run, and must not pass for one that did.
fn c_binary() -> PathBuf {
    let Some(path) = std::env::var_os("FLEXNBD_C_BIN").filter(|p| !p.is_empty()) else {
        panic!(
            "FLEXNBD_C_BIN is not set: this test needs a C flexnbd binary (see bench/README.md); run it as \
             `FLEXNBD_C_BIN=/path/to/flexnbd cargo test --test acceptance c_interop -- --include-ignored`"
        );
    };
    let path = PathBuf::from(path);
    let mode = fs::metadata(&path)
        .unwrap_or_else(|e| panic!("FLEXNBD_C_BIN={}: expected a file, got {e}", path.display()))
        .permissions()
        .mode();
    assert!(
        mode & 0o111 != 0,
        "FLEXNBD_C_BIN={}: expected an executable, got mode {mode:o}",
        path.display()
    );
    path
}

/// The TCP port that process `pid` listens on: the C flexnbd does not log
/// the port it got for `-p 0`, so it is found from the process's sockets.
fn listening_port(pid: u32) -> Option<u16> {
    let mut inodes = Vec::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let link = fs::read_link(fd.ok()?.path()).ok();
        if let Some(inode) = link
            .as_ref()
            .and_then(|l| l.to_str())
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
        {
            inodes.push(inode.to_string());
        }
    }
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Fields: sl, local address, remote address, state (0A: LISTEN),
        // ..., inode (the tenth).
        if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
            u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()
        } else {
            None
        }
    })
}

/// A running C flexnbd `serve` or `listen` on 127.0.0.1, port 0. Killed when
/// dropped; its log is printed if the test is failing.
struct CFlexnbd {
    child: Child,
    port: u16,
    log_path: PathBuf,
    status: Option<ExitStatus>,
}

impl CFlexnbd {
    fn start(bin: &Path, dir: &TempDir, mode: &str, file: &Path, sock: Option<&Path>) -> CFlexnbd {
        let log_path = dir.join(&format!("c-{mode}.log"));
        let mut cmd = clean_command(bin.to_str().unwrap());
        cmd.args([mode, "-l", "127.0.0.1", "-p", "0", "-v", "-f"])
            .arg(file);
        if let Some(sock) = sock {
            cmd.arg("-s").arg(sock);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log_path).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut c = CFlexnbd {
            child,
            port: 0,
            log_path,
            status: None,
        };
        let pid = c.child.id();
        c.port = wait_for(&format!("the C flexnbd {mode} to listen"), WAIT, || {
            if let Some(status) = c.child.try_wait().unwrap() {
                panic!(
                    "the C flexnbd {mode} exited early with {status}; log:\n{}",
                    c.log()
                );
            }
            listening_port(pid)
        });
        if let Some(sock) = sock {
            wait_for("the C flexnbd's control socket", WAIT, || {
                UnixStream::connect(sock).ok().map(|_| ())
            });
        }
        c
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn is_running(&mut self) -> bool {
        self.status.is_none() && self.child.try_wait().unwrap().is_none()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let child = &mut self.child;
        let status = wait_for("the C flexnbd to exit", WAIT, || child.try_wait().unwrap());
        self.status = Some(status);
        status
    }
}

impl Drop for CFlexnbd {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- C flexnbd log ({}) ----\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// The source image: pattern data over its first `DATA` bytes.
fn source_image(dir: &TempDir) -> PathBuf {
    let p = dir.sparse_file("src.img", SIZE);
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&pattern(DATA as usize, 5), 0).unwrap();
    f.sync_all().unwrap();
    p
}

/// Clients writing 4 KiB blocks over the data at `addr` until cut off;
/// returns once every one of them has had writes acknowledged.
pub(crate) fn start_writers(addr: std::net::SocketAddr, data: u64) -> Vec<JoinHandle<ClientLog>> {
    let counts: Vec<Arc<AtomicU64>> = (0..CLIENTS).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let threads = (0..CLIENTS)
        .map(|id| client_writer(addr, id, data / BLOCK, counts[id as usize].clone()))
        .collect();
    wait_for("every client to have written", WAIT, || {
        counts
            .iter()
            .all(|a| a.load(Ordering::Relaxed) > 10)
            .then_some(())
    });
    threads
}

pub(crate) fn join_writers(threads: Vec<JoinHandle<ClientLog>>) -> Vec<ClientLog> {
    threads
        .into_iter()
        .map(|t| {
            // The writers end when the source cuts them off, which it has
            // done by the time it exits.
            let deadline = Instant::now() + WAIT;
            while !t.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "a client writer was still running {WAIT:?} after the source exited"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            t.join().expect("client writer panicked")
        })
        .collect()
}

/// Waits (up to `limit`) for a migration's source and destination to exit,
/// checks both exited 0 and the source did not panic, and returns what the
/// client writers saw.
pub(crate) fn await_handoff(
    src: &mut Flexnbd,
    dest: &mut Flexnbd,
    writers: Vec<JoinHandle<ClientLog>>,
    limit: Duration,
) -> Vec<ClientLog> {
    wait_for("the migration to end", limit, || {
        (!src.is_running() && !dest.is_running()).then_some(())
    });
    assert_eq!(interop::exit_code(src), Some(0), "source exit status");
    assert_eq!(interop::exit_code(dest), Some(0), "destination exit status");
    let logs = join_writers(writers);
    src.assert_no_panic();
    logs
}

/// The canonical copy after a completed migration, checked per
/// docs/handoff.md: with `--unlink` the source file is gone (the destination
/// is canonical); without it the source stays and both files are identical.
fn assert_handed_off(src: &Path, dest: &Path, unlink: bool) {
    if unlink {
        assert!(
            !src.exists(),
            "with --unlink the source file must be gone after a completed migration"
        );
    } else {
        assert!(src.exists(), "without --unlink the source file must stay");
        assert!(
            fs::read(src).unwrap() == fs::read(dest).unwrap(),
            "without --unlink source and destination must be identical after the hand-off"
        );
    }
}

// ---------------------------------------------------------------------------
// A C source into our listen.

fn c_source_into_our_listen(unlink: bool, tag: &str) {
    let c = c_binary();
    let dir = TempDir::new(tag);
    let src_file = source_image(&dir);
    let original = fs::read(&src_file).unwrap();
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let sock = dir.join("c-src.sock");
    let mut src = CFlexnbd::start(&c, &dir, "serve", &src_file, Some(&sock));
    let mut dest = interop::listen(&dir, &dest_file, &[]);
    assert_eq!(marker_state(&dest_file).as_deref(), Some("receiving"));

    let writers = start_writers(format!("127.0.0.1:{}", src.port).parse().unwrap(), DATA);
    let port = dest.port().to_string();
    let mut args = vec![
        "mirror",
        "-s",
        sock.to_str().unwrap(),
        "-l",
        "127.0.0.1",
        "-p",
        &port,
    ];
    if unlink {
        args.push("-u");
    }
    let out = run_tool(c.to_str().unwrap(), &args, Duration::from_secs(30));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Mirror started"),
        "the C mirror command: {}; stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        src.wait_exit().code(),
        Some(0),
        "C source exit; log:\n{}",
        src.log()
    );
    assert_eq!(dest.wait_exit().code(), Some(0), "our listen's exit status");
    dest.assert_no_panic();
    let logs = join_writers(writers);

    assert_eq!(marker_state(&dest_file), None, "the marker must be removed");
    assert_holds_acked_writes(&dest_file, original, &logs);
    assert_handed_off(&src_file, &dest_file, unlink);
}

#[test]
#[ignore = "needs FLEXNBD_C_BIN, a C flexnbd binary; see bench/README.md"]
fn a_c_source_with_writing_clients_migrates_into_our_listen() {
    c_source_into_our_listen(false, "c-src");
}

#[test]
#[ignore = "needs FLEXNBD_C_BIN, a C flexnbd binary; see bench/README.md"]
fn a_c_source_with_writing_clients_migrates_into_our_listen_with_unlink() {
    c_source_into_our_listen(true, "c-src-unlink");
}

// ---------------------------------------------------------------------------
// Our source into a C listen.

/// The lock-out our source logged (`clients were shut out for <Duration
/// in Debug form>`).
pub(crate) fn logged_lockout(log: &str) -> Duration {
    let text = log
        .split("clients were shut out for ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no `clients were shut out for` line; log:\n{log}"));
    let (number, unit) = text.split_at(
        text.find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
            .unwrap_or(text.len()),
    );
    let value: f64 = number
        .parse()
        .unwrap_or_else(|_| panic!("lock-out {text:?}: expected a number and a unit"));
    let scale = match unit {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" | "us" => 1e-6,
        "ns" => 1e-9,
        other => panic!("lock-out {text:?}: unknown unit {other:?}"),
    };
    Duration::from_secs_f64(value * scale)
}

fn our_source_into_c_listen(unlink: bool, tag: &str) {
    let c = c_binary();
    let dir = TempDir::new(tag);
    let src_file = source_image(&dir);
    let original = fs::read(&src_file).unwrap();
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let mut dest = CFlexnbd::start(&c, &dir, "listen", &dest_file, None);
    let mut src = interop::source_in(dir, src_file.clone(), &[]);

    let writers = start_writers(src.server.addr, DATA);
    let started = Instant::now();
    interop::assert_mirror_started(&interop::mirror(&src.sock, dest.port, unlink));
    // Longer than the usual bound, so that a migration that is merely too
    // slow fails below with its figures rather than here.
    wait_for("the migration to end", Duration::from_secs(90), || {
        (!src.server.is_running() && !dest.is_running()).then_some(())
    });
    let took = started.elapsed();
    assert_eq!(
        interop::exit_code(&mut src.server),
        Some(0),
        "our source's exit status"
    );
    assert_eq!(
        dest.wait_exit().code(),
        Some(0),
        "C listen exit; log:\n{}",
        dest.log()
    );
    src.server.assert_no_panic();
    let logs = join_writers(writers);

    assert!(
        !marker_path(&dest_file).exists(),
        "nothing may leave a marker beside a C destination's image"
    );
    assert_holds_acked_writes(&dest_file, original, &logs);
    assert_handed_off(&src_file, &dest_file, unlink);

    // The C destination syncs every write, so 4 KiB blocks cost it about
    // a millisecond each, and the clients here dirty them far faster than
    // that. Pacing and a cut-off by the destination's measured costs keep
    // the lock-out near its 25 ms goal and the migration of this image to
    // about a second on an idle machine; the bounds are several times that
    // for a loaded two-core machine, and still far below what a cut-off
    // that ignores the per-write cost gives (seconds of lock-out, and a
    // migration that waits for its allowance to grow).
    let lockout = logged_lockout(&src.server.log());
    assert!(
        lockout < Duration::from_millis(500),
        "clients were shut out for {lockout:?}: expected under 500 ms"
    );
    assert!(
        took < Duration::from_secs(8),
        "the migration into the C destination took {took:?}: expected under 8 s"
    );
}

#[test]
#[ignore = "needs FLEXNBD_C_BIN, a C flexnbd binary; see bench/README.md"]
fn our_source_with_writing_clients_migrates_into_a_c_listen_quickly() {
    our_source_into_c_listen(false, "c-dest");
}

#[test]
#[ignore = "needs FLEXNBD_C_BIN, a C flexnbd binary; see bench/README.md"]
fn our_source_with_writing_clients_migrates_into_a_c_listen_with_unlink_quickly() {
    our_source_into_c_listen(true, "c-dest-unlink");
}
