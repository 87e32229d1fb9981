//! The completion record and a `listen` started again over a completed
//! image (docs/handoff.md, destination step 0 and the verdict table).
//!
//! Simulated: a `--unlink` migration between real processes while clients
//! write through the source, completed (both ends exit 0, the source file
//! gone, the marker removed); then a supervisor starting `flexnbd listen`
//! again on the destination image, as it would after a crash it did not see
//! the end of; the same with `--overwrite-complete`, with a crash between
//! its marker and its removal of the record; and an image path that now
//! holds a new file beside the old record.
//!
//! What must happen: the completed destination carries `<dest>.COMPLETE`
//! naming its source, its completion time and the file's dev/ino/size; the
//! restarted `listen` refuses before its port opens (exit 1, the status of
//! its start-up errors) with a message naming the record, where the
//! migration came from, when it completed, `flexnbd serve` and
//! `--overwrite-complete`, and changes nothing: the image bytes, the
//! record, and no marker appears; `resolve` then still says destination
//! (exit 11). With `--overwrite-complete` it creates the marker
//! (`receiving`) before it removes the record (a crash at the record's
//! removal leaves both, which resolve calls destination with a leftover
//! marker, exit 12), then receives a new migration and records it. A stale
//! record does not block `listen`, which removes it and says so.
//!
//! A marker that holds a checkpoint (docs/handoff.md, "Resuming"): `listen`
//! restarted over it answers the checkpoint to the resume query only while
//! the marker names the image file now at the path, and otherwise drops it
//! from the marker before its port opens, saying which file it named and
//! which is there; `serve` over it drops it the same way.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::fakes::FakeSource;
use crate::harness::*;
use crate::interop::{assert_mirror_started, exit_code, mirror, source_in};
use crate::migrate::{assert_holds_acked_writes, client_writer, ClientLog, BLOCK, CLIENTS};

const MIB: u64 = 1024 * 1024;
/// A refusing `listen` exits at once; this only bounds a broken one.
const REFUSAL_LIMIT: Duration = Duration::from_secs(10);

/// The completion record next to a destination image (spelled out here, so
/// the tests check the name).
fn record_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".COMPLETE");
    PathBuf::from(s)
}

/// The record's `key=value` lines.
fn record_fields(dest: &Path) -> Option<Vec<(String, String)>> {
    let text = fs::read_to_string(record_path(dest)).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn field<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("expected a {key}= line in the record, got {fields:?}"))
}

/// A `--unlink` migration of a 4 MiB image while clients write through the
/// source, completed. Returns (dir, source path, destination path).
fn completed_unlink_migration(tag: &str) -> (TempDir, PathBuf, PathBuf) {
    let size = 4 * MIB;
    let dir = TempDir::new(tag);
    let file = dir.pattern_file("src.img", size, 5);
    let dest = dir.sparse_file("dest.img", size);
    let base = fs::read(&file).unwrap();
    let mut src = source_in(dir, file.clone(), &[]);
    let mut dst = crate::interop::listen(&src.dir, &dest, &[]);
    let acks: Vec<Arc<AtomicU64>> = (0..CLIENTS).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let writers: Vec<_> = (0..CLIENTS)
        .map(|id| client_writer(src.server.addr, id, size / BLOCK, acks[id as usize].clone()))
        .collect();
    wait_for("every client to have written", WAIT, || {
        acks.iter()
            .all(|a| a.load(Ordering::Relaxed) > 10)
            .then_some(())
    });
    let out = mirror(&src.sock, dst.port(), true);
    assert_mirror_started(&out);
    assert_eq!(exit_code(&mut src.server), Some(0), "source exit status");
    assert_eq!(exit_code(&mut dst), Some(0), "destination exit status");
    // The source cut its clients off before handing off.
    let logs: Vec<ClientLog> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(!file.exists(), "--unlink removed the source");
    assert_eq!(marker_state(&dest), None, "the marker is removed");
    assert_holds_acked_writes(&dest, base, &logs);
    drop(dst);
    let crate::interop::Source { server, dir, .. } = src;
    drop(server);
    (dir, file, dest)
}

fn listen_args<'a>(dest: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "listen",
        "-l",
        "127.0.0.1",
        "-p",
        "0",
        "-f",
        dest.to_str().unwrap(),
        "-v",
    ];
    args.extend_from_slice(extra);
    args
}

fn resolve(src: &Path, dest: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "resolve",
        "--source",
        src.to_str().unwrap(),
        "--dest",
        dest.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run_tool(BIN, &args, WAIT)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless `listen` on `dest` refuses at once, before its port opens,
/// with the message a person needs, and changes nothing.
fn assert_listen_refuses(dest: &Path) {
    let image = fs::read(dest).unwrap();
    let record = fs::read(record_path(dest)).unwrap();
    let fields = record_fields(dest).unwrap();
    let o = run_tool(BIN, &listen_args(dest, &[]), REFUSAL_LIMIT);
    let log = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected listen over a completed image to refuse with exit 1 (its start-up error status), got {}; log:\n{log}",
        o.status
    );
    assert!(
        !log.contains("listening on"),
        "expected the refusal before the port opens; log:\n{log}"
    );
    for needle in [
        "refusing to receive".to_string(),
        record_path(dest).display().to_string(),
        field(&fields, "source").to_string(),
        " UTC".to_string(),
        "flexnbd serve".to_string(),
        "--overwrite-complete".to_string(),
    ] {
        assert!(
            log.contains(&needle),
            "expected the refusal to say {needle:?}; log:\n{log}"
        );
    }
    assert!(
        fs::read(dest).unwrap() == image,
        "expected the refusing listen to leave the image unchanged"
    );
    assert_eq!(
        marker_state(dest),
        None,
        "expected no marker after the refusal"
    );
    assert_eq!(
        fs::read(record_path(dest)).unwrap(),
        record,
        "expected the record unchanged"
    );
}

// ---------------------------------------------------------------- tests

#[test]
fn a_completed_migration_leaves_a_record_of_this_file_its_source_and_time() {
    let (_dir, _src, dest) = completed_unlink_migration("complete-record");
    let fields = record_fields(&dest).expect("expected DEST.COMPLETE after a completed migration");
    let meta = fs::metadata(&dest).unwrap();
    assert_eq!(field(&fields, "state"), "complete");
    assert!(
        field(&fields, "source").starts_with("127.0.0.1:"),
        "{fields:?}"
    );
    let completed: u64 = field(&fields, "completed_at").parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        completed <= now && now - completed < 600,
        "completed_at {completed}, now {now}"
    );
    assert!(field(&fields, "bytes_received").parse::<u64>().unwrap() > 0);
    assert_eq!(field(&fields, "dev"), meta.dev().to_string());
    assert_eq!(field(&fields, "ino"), meta.ino().to_string());
    assert_eq!(field(&fields, "size"), meta.size().to_string());
}

#[test]
fn listen_restarted_over_a_completed_unlink_migration_refuses_and_resolve_says_destination() {
    let (_dir, src, dest) = completed_unlink_migration("complete-restart");
    assert_listen_refuses(&dest);
    // A supervisor that keeps restarting it gets the same answer each time.
    assert_listen_refuses(&dest);
    let o = resolve(&src, &dest, &[]);
    assert_eq!(
        o.status.code(),
        Some(11),
        "expected verdict destination; stdout:\n{}stderr:\n{}",
        stdout(&o),
        stderr(&o)
    );
    let out = stdout(&o);
    assert!(out.starts_with("verdict: destination\n"), "{out}");
    assert!(
        out.contains(&record_path(&dest).display().to_string()),
        "expected the reason to name the record: {out}"
    );
}

#[test]
fn overwrite_complete_creates_the_marker_before_it_removes_the_record() {
    let (dir, src, dest) = completed_unlink_migration("complete-overwrite-crash");
    let image = fs::read(&dest).unwrap();
    // Killed at the record's removal: the marker must already exist.
    let o = run_tool(
        BIN,
        &listen_args(
            &dest,
            &["--overwrite-complete", "--faults", "store.record#1=crash"],
        ),
        REFUSAL_LIMIT,
    );
    let log = stderr(&o);
    assert_eq!(
        o.status.signal().or(o.status.code().map(|c| c - 128)),
        Some(libc::SIGKILL),
        "expected the crash fault to kill listen; log:\n{log}"
    );
    assert!(
        log.contains("fault fired: store.record#1 -> crash"),
        "expected the fault to fire; log:\n{log}"
    );
    assert!(
        !log.contains("listening on"),
        "expected the port still closed; log:\n{log}"
    );
    assert_eq!(
        marker_state(&dest).as_deref(),
        Some("receiving"),
        "expected the marker written before the record's removal"
    );
    assert!(
        record_path(&dest).exists(),
        "expected the record still there"
    );
    assert!(
        fs::read(&dest).unwrap() == image,
        "expected the image unchanged"
    );
    // Both: the destination is complete, the marker a leftover.
    let o = resolve(&src, &dest, &[]);
    assert_eq!(o.status.code(), Some(12), "{}", stdout(&o));
    assert!(
        stdout(&o).starts_with("verdict: destination-leftover-marker\n"),
        "{}",
        stdout(&o)
    );
    drop(dir);
}

#[test]
fn overwrite_complete_starts_removes_the_record_and_receives_a_new_migration() {
    let (dir, _src, dest) = completed_unlink_migration("complete-overwrite");
    let args: Vec<String> = listen_args(&dest, &["--overwrite-complete"])
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut server = Flexnbd::spawn(&dir, &args);
    assert_eq!(marker_state(&dest).as_deref(), Some("receiving"));
    assert!(
        !record_path(&dest).exists(),
        "expected --overwrite-complete to remove the record before the port opened"
    );
    assert!(
        server
            .log()
            .contains("--overwrite-complete: receiving over"),
        "expected a log line about the overwrite; log:\n{}",
        server.log()
    );
    // A C-style sender (no entrust): a write, then DISCONNECT.
    let data = pattern(64 * 1024, 99);
    let mut s = FakeSource::connect(server.addr);
    s.read_greeting();
    let r = s.write_and_reply(1, MIB, &data);
    assert_eq!(r.error, 0, "expected the write to be acknowledged");
    s.disconnect(2);
    assert_eq!(exit_code(&mut server), Some(0), "log:\n{}", server.log());
    assert_eq!(read_file_range(&dest, MIB, data.len()), data);
    assert_eq!(marker_state(&dest), None);
    let fields = record_fields(&dest).expect("expected a new record");
    assert_eq!(
        field(&fields, "bytes_received"),
        data.len().to_string(),
        "expected the record of the new migration"
    );
}

#[test]
fn a_stale_record_beside_a_new_image_file_does_not_block_listen() {
    let (dir, _src, dest) = completed_unlink_migration("complete-stale");
    let record = fs::read_to_string(record_path(&dest)).unwrap();
    // A new image at the path. Created before the rename, so both files
    // exist at once and cannot share an inode number.
    let fresh = dir.sparse_file("fresh.img", 4 * MIB);
    fs::rename(&fresh, &dest).unwrap();
    let mut server = crate::interop::listen(&dir, &dest, &[]);
    assert_eq!(marker_state(&dest).as_deref(), Some("receiving"));
    assert!(
        !record_path(&dest).exists(),
        "expected listen to remove the stale record (it was: {record})"
    );
    assert!(
        server.log().contains(&format!(
            "removing the stale completion record {}",
            record_path(&dest).display()
        )),
        "expected a log line about the stale record; log:\n{}",
        server.log()
    );
    server.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut server), Some(1));
}

#[test]
fn overwrite_complete_is_refused_by_serve() {
    let dir = TempDir::new("complete-serve-flag");
    let file = dir.sparse_file("disk.img", MIB);
    let args = server_args("serve", &file, None, &["--overwrite-complete"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = run_tool(BIN, &args, REFUSAL_LIMIT);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--overwrite-complete is for listen only"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_record_for_the_same_inode_number_born_at_another_time_does_not_block_listen() {
    // An image deleted and created again can get its old inode number
    // back; its creation time tells it apart, where the file system keeps
    // one.
    let dir = TempDir::new("complete-reborn");
    let dest = dir.sparse_file("dest.img", MIB);
    let meta = fs::metadata(&dest).unwrap();
    // Where the file system keeps no creation time there is nothing to
    // tell the two files apart by, so the test cannot check what it is for:
    // it fails rather than pass without checking.
    let born = meta.created().unwrap_or_else(|e| {
        panic!(
            "{} keeps no creation time ({e}): run the suite with TMPDIR on a file system \
             that does (ext4, xfs, btrfs)",
            dir.join("").display()
        )
    });
    let born = born
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    fs::write(
        record_path(&dest),
        format!(
            "state=complete\nsource=127.0.0.1:40000\ncompleted_at=1700000000\nbytes_received=4096\npid=1\ndev={}\nino={}\nsize={}\nborn={}\n",
            meta.dev(),
            meta.ino(),
            meta.size(),
            born + 1
        ),
    )
    .unwrap();
    let mut server = crate::interop::listen(&dir, &dest, &[]);
    assert_eq!(marker_state(&dest).as_deref(), Some("receiving"));
    assert!(
        !record_path(&dest).exists(),
        "expected listen to remove the record of another file"
    );
    server.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut server), Some(1));
}

/// A marker beside `dest` holding checkpoint `k` of `migration`, taken on
/// the file whose inode is `ino` (the image's own, or another).
fn write_resumable_marker(dest: &Path, state: &str, migration: u64, k: u64, ino: u64) {
    let meta = fs::metadata(dest).unwrap();
    fs::write(
        marker_path(dest),
        format!(
            "state={state}\nsource=10.9.9.9:1\nattempt_started=1\nbytes_received=0\npid=1\n\
             migration={migration:016x}\ncheckpoint={k}\ndev={}\nino={ino}\nsize={}\n",
            meta.dev(),
            meta.size()
        ),
    )
    .unwrap();
}

/// The resume query for `migration` on a new connection: the checkpoint
/// answered.
fn resume_query(server: &Flexnbd, migration: u64) -> u64 {
    let finished = |log: String| log.matches(" finished").count();
    let before = finished(server.log());
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(flexnbd::proto::cmd::RESUME, 0, 9, migration, 8);
    let reply = c.simple_reply();
    assert_eq!((reply.error, reply.handle), (0, 9), "resume reply");
    let answer = u64::from_be_bytes(c.read_exact(8).try_into().unwrap());
    drop(c);
    // `listen` takes one client at a time: the next query may connect
    // once this one's slot is free.
    wait_for("the query's connection to finish", WAIT, || {
        (finished(server.log()) > before).then_some(())
    });
    answer
}

const MIGRATION: u64 = 0x5eed_0000_0000_0001;

#[test]
fn listen_restarted_answers_the_checkpoint_its_marker_holds_for_this_image_file() {
    let dir = TempDir::new("complete-resume-held");
    let dest = dir.sparse_file("dest.img", MIB);
    let ino = fs::metadata(&dest).unwrap().ino();
    write_resumable_marker(&dest, "receiving", MIGRATION, 7, ino);
    let before = fs::read_to_string(marker_path(&dest)).unwrap();
    let mut server = crate::interop::listen(&dir, &dest, &[]);
    assert_eq!(resume_query(&server, MIGRATION), 7);
    assert_eq!(resume_query(&server, MIGRATION + 1), 0, "another migration");
    assert_eq!(
        fs::read_to_string(marker_path(&dest)).unwrap(),
        before,
        "asking changes nothing"
    );
    server.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut server), Some(1));
    server.assert_no_panic();
}

#[test]
fn listen_restarted_drops_a_checkpoint_taken_on_another_file_before_its_port_opens() {
    let dir = TempDir::new("complete-resume-other");
    let dest = dir.sparse_file("dest.img", MIB);
    let ino = fs::metadata(&dest).unwrap().ino();
    write_resumable_marker(&dest, "entrusted", MIGRATION, 7, ino + 1);
    let mut server = crate::interop::listen(&dir, &dest, &[]);
    // Dropped before the port was reported open.
    let marker = fs::read_to_string(marker_path(&dest)).unwrap();
    assert!(
        marker.starts_with("state=entrusted\nsource=10.9.9.9:1\n")
            && !marker.contains("migration=")
            && !marker.contains("checkpoint="),
        "expected the marker without its resume part, got:\n{marker}"
    );
    let log = server.log();
    assert!(
        log.contains(&format!("ino={}", ino + 1))
            && log.contains(&format!("but the file at {} is", dest.display())),
        "expected a warning naming both files; log:\n{log}"
    );
    assert_eq!(resume_query(&server, MIGRATION), 0);
    server.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut server), Some(1));
    server.assert_no_panic();
}

#[test]
fn serve_drops_a_checkpoint_from_the_marker_beside_its_image_before_its_port_opens() {
    let dir = TempDir::new("complete-resume-serve");
    let dest = dir.sparse_file("dest.img", MIB);
    let ino = fs::metadata(&dest).unwrap().ino();
    write_resumable_marker(&dest, "entrusted", MIGRATION, 7, ino);
    let server = Flexnbd::serve(&dir, &dest, &[]);
    let marker = fs::read_to_string(marker_path(&dest)).unwrap();
    assert!(
        marker.starts_with("state=entrusted\nsource=10.9.9.9:1\n")
            && !marker.contains("migration="),
        "expected the marker without its resume part, got:\n{marker}"
    );
    assert!(
        server.log().contains("must not be resumed"),
        "expected a warning; log:\n{}",
        server.log()
    );
    drop(server);
    // A marker without one is left as it was.
    let plain = "state=receiving\nsource=none\n";
    fs::write(marker_path(&dest), plain).unwrap();
    let server = Flexnbd::serve(&dir, &dest, &[]);
    server.connect().oldstyle_greeting();
    assert_eq!(fs::read_to_string(marker_path(&dest)).unwrap(), plain);
    server.assert_no_panic();
}
