//! Comparing instead of copying, and resuming an interrupted migration
//! (docs/handoff.md, "Resuming an interrupted migration"), with the real
//! binaries: `serve`, `listen` and `mirror` as an operator runs them.
//!
//! What must happen: an attempt cut off mid-copy (the connection closed,
//! the destination killed and restarted by a supervisor, the destination's
//! host losing power, an operator's `break` and a later `mirror`) resumes
//! from the last checkpoint the destination durably holds and sends only
//! the rest; a destination that holds another migration's checkpoint, or
//! whose image file was replaced, or that knows no checkpoints, gets
//! everything; `mirror --verify` to a destination that already holds most
//! of the image sends only what differs; `mirror --wait` shows the last
//! checkpoint answered. Every run ends with identical
//! images. The completion record's `bytes_received` (what the completing
//! connection received as data) says how much travelled.

use std::fs;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;

const MIB: u64 = 1024 * 1024;

/// `serve` with a control socket, ready.
/// Checkpoints as soon as their data is due: these copies are too quick
/// for the standard 250 ms between them.
const GAP: (&str, &str) = ("FLEXNBD_CHECKPOINT_GAP_MS", "0");

fn serve(dir: &TempDir, file: &Path) -> (Flexnbd, PathBuf) {
    let sock = dir.join("src.sock");
    let server =
        Flexnbd::spawn_with_env(dir, &server_args("serve", file, Some(&sock), &[]), &[GAP]);
    wait_for("the source's control socket", WAIT, || {
        UnixStream::connect(&sock).ok().map(|_| ())
    });
    (server, sock)
}

fn listen(dir: &TempDir, file: &Path, extra: &[&str]) -> Flexnbd {
    Flexnbd::spawn(dir, &server_args("listen", file, None, extra))
}

/// The destination's first sync (checkpoint 1's) takes 300 ms more. At
/// the cost a byte it then shows, entrust's sync of the 16 MiB after it
/// would not fit the shut-out goal, so checkpoint 2 always comes, as the
/// flush before the cut-off; with a quick disk there might be none.
const SLOW_FIRST_SYNC: &str = "store.sync#1=slow(300)";

/// `listen` as [`listen`], its first sync slow ([`SLOW_FIRST_SYNC`]) and
/// `plan` as well.
fn listen_slow_sync(dir: &TempDir, file: &Path, extra: &[&str], plan: &str) -> Flexnbd {
    Flexnbd::spawn_with_env(
        dir,
        &server_args("listen", file, None, extra),
        &[("FLEXNBD_FAULTS", &format!("{SLOW_FIRST_SYNC}; {plan}"))],
    )
}

/// The greeting with WRITE_ZEROES: holes carry no payload, so
/// `bytes_received` counts data only.
const ZEROES: &str = "--oldstyle-extra-flags";

fn mirror_started(sock: &Path, port: u16, extra: &[&str]) {
    let o = run_mirror(sock, port, extra, Duration::from_secs(40));
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()),
        (Some(0), "Mirror started\n"),
        "mirror {extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn wait_exit_0(server: &mut Flexnbd, what: &str) {
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(0), "{what}; log:\n{}", server.log());
}

/// The completion record's `bytes_received`.
fn bytes_received(dest: &Path) -> u64 {
    let record = fs::read_to_string(format!("{}.COMPLETE", dest.display()))
        .unwrap_or_else(|e| panic!("no completion record beside {}: {e}", dest.display()));
    record
        .lines()
        .find_map(|l| l.strip_prefix("bytes_received="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no bytes_received in the record:\n{record}"))
}

/// A 32 MiB image: 24 MiB of pattern data, then a hole.
fn source_image(dir: &TempDir) -> PathBuf {
    let p = dir.sparse_file("src.img", 32 * MIB);
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&pattern(24 * MIB as usize, 3), 0).unwrap();
    f.sync_all().unwrap();
    p
}

#[test]
fn verify_sends_only_the_ranges_that_differ_and_ends_identical() {
    let dir = TempDir::new("verify-differs");
    let src_file = source_image(&dir);
    // The destination already holds the image, but for 1 MiB changed in
    // the middle and 1 MiB written where the source has a hole.
    let dest_file = dir.join("dest.img");
    fs::copy(&src_file, &dest_file).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&dest_file).unwrap();
    f.write_all_at(&pattern(MIB as usize, 9), 10 * MIB).unwrap();
    f.write_all_at(&pattern(MIB as usize, 10), 28 * MIB)
        .unwrap();
    drop(f);

    // With the C greeting (no WRITE_ZEROES: holes are compared too) and
    // with ours (holes go as WRITE_ZEROES, which carry no payload).
    for greeting in [&[][..], &["--oldstyle-extra-flags"][..]] {
        let dest_copy = dir.join("dest-copy.img");
        fs::copy(&dest_file, &dest_copy).unwrap();
        let (mut src, sock) = serve(&dir, &src_file);
        let mut dest = listen(&dir, &dest_copy, greeting);
        mirror_started(&sock, dest.port(), &["--verify"]);
        wait_exit_0(&mut src, "the source after a verified migration");
        wait_exit_0(&mut dest, "the destination after a verified migration");
        assert_eq!(
            fs::read(&src_file).unwrap(),
            fs::read(&dest_copy).unwrap(),
            "the images must be identical ({greeting:?})"
        );
        // The changed MiB went as data, the MiB over the source's hole as
        // data too (zeros) or as WRITE_ZEROES; the other 23 MiB of data and
        // the rest of the hole not at all.
        let expect = if greeting.is_empty() { 2 * MIB } else { MIB };
        assert_eq!(bytes_received(&dest_copy), expect, "{greeting:?}");
        fs::remove_file(format!("{}.COMPLETE", dest_copy.display())).unwrap();
    }
}

#[test]
fn listen_offers_resuming_in_its_oldstyle_greeting_and_serve_keeps_the_c_greeting() {
    // docs/handoff.md, "Resuming": bytes 28-35 say FLEX and bits 0 and 1;
    // the rest of the reserved bytes stay zero. `serve` sends the C
    // greeting.
    let dir = TempDir::new("resume-offer");
    let dest = listen(&dir, &dir.sparse_file("dest.img", MIB), &[]);
    let g = dest.connect().read_exact(152);
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[24..28], &[0, 0, 0, 13], "the C flexnbd's flags");
    assert_eq!(&g[28..36], b"FLEX\0\0\0\x03", "the offer");
    assert!(g[36..].iter().all(|&b| b == 0), "the rest is zero");
    let (served, _) = serve(&dir, &dir.sparse_file("served.img", MIB));
    let g = served.connect().read_exact(152);
    assert!(g[28..].iter().all(|&b| b == 0), "serve offers nothing");
}

#[test]
fn a_destination_that_knows_no_checkpoints_gets_everything_even_if_it_holds_it() {
    // The control for the test above: a `serve` as the destination (no
    // RESUME, no DIGEST, as an older flexnbd or the C one) holding the
    // same image gets all the data, compared with nothing.
    let dir = TempDir::new("verify-control");
    let src_file = source_image(&dir);
    let dest_file = dir.join("dest.img");
    fs::copy(&src_file, &dest_file).unwrap();
    let (mut src, sock) = serve(&dir, &src_file);
    let dest = Flexnbd::serve(&dir, &dest_file, &[]);
    mirror_started(&sock, dest.port(), &[]);
    wait_exit_0(&mut src, "the source");
    assert!(!src.log().contains("compar"), "{}", src.log());
    assert_same_files(&src_file, &dest_file);
}

/// 96 MiB: 80 MiB of data, then a hole. Checkpoints come every 64 MiB of
/// data (the least interval) and before the cut-off, one outstanding at a
/// time: a cut as checkpoint 2 goes out (the one before the cut-off, with
/// the last 16 MiB unsynced) comes after checkpoint 1 was answered, so the
/// next attempt resumes from checkpoint 1 and sends the last 16 MiB again.
/// (A cut at a write is no such point: the copy goes on while a checkpoint
/// syncs, so whether it was answered first is a matter of timing.)
const SIZE: u64 = 96 * MIB;
const DATA: u64 = 80 * MIB;

fn eighty_mib_image(dir: &TempDir, name: &str, seed: u8) -> PathBuf {
    let p = dir.sparse_file(name, SIZE);
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&pattern(DATA as usize, seed), 0).unwrap();
    f.sync_all().unwrap();
    p
}

fn serve_with_faults(dir: &TempDir, file: &Path, plan: &str) -> (Flexnbd, PathBuf) {
    let sock = dir.join("src.sock");
    let args = server_args("serve", file, Some(&sock), &[]);
    let server = Flexnbd::spawn_with_env(dir, &args, &[("FLEXNBD_FAULTS", plan), GAP]);
    wait_for("the source's control socket", WAIT, || {
        UnixStream::connect(&sock).ok().map(|_| ())
    });
    (server, sock)
}

/// The resumed attempt's data: the 16 MiB after checkpoint 1, give or take
/// a piece.
fn assert_resumed_rest(dest: &Path) {
    let got = bytes_received(dest);
    assert!(
        (16 * MIB..=17 * MIB).contains(&got),
        "expected the 16 MiB after the checkpoint to be sent again, got {got} bytes (all data: {DATA})"
    );
}

#[test]
fn a_connection_cut_mid_copy_resumes_from_the_checkpoint() {
    connection_cut("resume-cut", &[ZEROES]);
}

#[test]
fn a_connection_cut_mid_copy_to_a_newstyle_destination_resumes_from_the_checkpoint() {
    // The offer comes in NBD_OPT_GO's information replies here.
    connection_cut("resume-cut-newstyle", &["--handshake", "newstyle"]);
}

/// A connection closed by the source's fault plan as its second checkpoint
/// goes out, to a `listen` with `extra` arguments.
fn connection_cut(tag: &str, extra: &[&str]) {
    let dir = TempDir::new(tag);
    let src_file = eighty_mib_image(&dir, "src.img", 4);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let (mut src, sock) =
        serve_with_faults(&dir, &src_file, "mirror.request_send.checkpoint#2=close");
    let mut dest = listen_slow_sync(&dir, &dest_file, extra, "");
    mirror_started(&sock, dest.port(), &[]);
    wait_exit_0(&mut src, "the source");
    wait_exit_0(&mut dest, "the destination");
    dest.assert_fired("store.sync#1", "slow(300)");
    src.assert_fired("mirror.request_send.checkpoint#2", "close");
    assert!(
        src.log().contains("from checkpoint 1: what it held then"),
        "{}",
        src.log()
    );
    assert_resumed_rest(&dest_file);
    assert_same_files(&src_file, &dest_file);
}

/// A destination that ends before the copy is durable (`plan` as its
/// second checkpoint arrives), then is started again on the same port, as
/// a supervisor does.
fn destination_restarted(tag: &str, plan: &str, action: &str) {
    let dir = TempDir::new(tag);
    let src_file = eighty_mib_image(&dir, "src.img", 5);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let (mut src, sock) = serve(&dir, &src_file);
    let mut dest = listen_slow_sync(&dir, &dest_file, &[ZEROES], plan);
    let port = dest.port();
    mirror_started(&sock, port, &[]);
    let status = dest.wait_exit();
    assert_ne!(
        status.code(),
        Some(0),
        "the destination must have ended before the hand-off"
    );
    dest.assert_fired("store.sync#1", "slow(300)");
    dest.assert_fired("server.request_received.checkpoint#2", action);
    let mut again = Flexnbd::spawn(
        &dir,
        &server_args_on("listen", port, &dest_file, None, &[ZEROES]),
    );
    wait_exit_0(&mut src, "the source");
    wait_exit_0(&mut again, "the restarted destination");
    assert!(
        src.log().contains("from checkpoint 1: what it held then"),
        "{}",
        src.log()
    );
    assert_resumed_rest(&dest_file);
    assert_same_files(&src_file, &dest_file);
}

#[test]
fn a_destination_killed_mid_copy_and_restarted_resumes_from_the_checkpoint() {
    destination_restarted(
        "resume-crash",
        "server.request_received.checkpoint#2=crash",
        "crash",
    );
}

#[test]
fn a_destination_that_lost_power_mid_copy_resumes_from_what_its_checkpoint_made_durable() {
    // Everything written after checkpoint 1 and not synced is gone; what
    // the checkpoint covered must still be there, or the resumed copy,
    // which skips it, would differ from the source.
    destination_restarted(
        "resume-power",
        "server.request_received.checkpoint#2=powercut(all)",
        "powercut(all)",
    );
}

/// The fault plan that holds the second checkpoint back for 5 s as it
/// goes out: the copy goes on while a checkpoint syncs, so without it a
/// quick copy may be done before `break` comes. `break` interrupts the
/// delay; the checkpoint is never sent.
const PAUSE_AFTER_1: (&str, &str) = (
    "FLEXNBD_FAULTS",
    "mirror.request_send.checkpoint#2=delay(5000)",
);

/// `serve` as [`serve`], pausing after checkpoint 1 ([`PAUSE_AFTER_1`]).
fn serve_pausing(dir: &TempDir, file: &Path) -> (Flexnbd, PathBuf) {
    serve_with_faults(dir, file, PAUSE_AFTER_1.1)
}

/// Waits until `dest` has seen the connection of a source that broke off
/// end: it reads what was in flight first, and until then its one slot
/// for a sender is taken (a `mirror` at once would be rejected).
fn wait_sender_gone(dest: &Flexnbd) {
    wait_for("the destination to see the old sender go", WAIT, || {
        dest.log()
            .lines()
            .any(|l| l.contains("client ") && (l.contains(" finished") || l.contains(" dropped")))
            .then_some(())
    });
}

/// `mirror -m` to `break` after checkpoint 1 (at 64 MiB) of `src`, a
/// source started with [`PAUSE_AFTER_1`].
fn until_checkpoint_1(src: &Flexnbd, sock: &Path, port: u16) {
    mirror_started(sock, port, &["-m", "160000000"]);
    wait_status(sock, "checkpoint 1", |s| {
        s.get("migration_checkpoint").is_some_and(|k| k != "0")
    });
    src.assert_fired("mirror.request_send.checkpoint#2", "delay(5000)");
    let o = run_tool(
        BIN,
        &["break", "-s", sock.to_str().unwrap()],
        Duration::from_secs(40),
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "break: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn break_then_mirror_to_the_same_destination_resumes() {
    let dir = TempDir::new("resume-break");
    let src_file = eighty_mib_image(&dir, "src.img", 6);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let (mut src, sock) = serve_pausing(&dir, &src_file);
    let mut dest = listen_slow_sync(&dir, &dest_file, &[ZEROES], "");
    until_checkpoint_1(&src, &sock, dest.port());
    wait_sender_gone(&dest);
    // A client changes 1 MiB the destination held: it must go again.
    let mut c = src.connect();
    c.oldstyle_greeting();
    c.write_ok(8 * MIB, &pattern(MIB as usize, 77));
    drop(c);
    mirror_started(&sock, dest.port(), &[]);
    wait_exit_0(&mut src, "the source");
    wait_exit_0(&mut dest, "the destination");
    assert!(src.log().contains("resuming migration"), "{}", src.log());
    let got = bytes_received(&dest_file);
    assert!(
        got < DATA - 32 * MIB,
        "a resumed copy must not send all {DATA} bytes of data again, sent {got}"
    );
    assert_same_files(&src_file, &dest_file);
}

#[test]
fn a_destination_holding_another_migrations_checkpoint_gets_everything() {
    // Source A leaves checkpoint 1 on its destination; source C, with a
    // checkpoint of its own elsewhere, then migrates to A's destination.
    // Its checkpoint must not count there.
    let dir = TempDir::new("resume-foreign");
    let a_file = eighty_mib_image(&dir, "a.img", 7);
    let c_file = eighty_mib_image(&dir, "c.img", 8);
    let a_dest = dir.sparse_file("a-dest.img", SIZE);
    let c_dest = dir.sparse_file("c-dest.img", SIZE);
    let a_sock = dir.join("a.sock");
    let c_sock = dir.join("c.sock");
    let a = Flexnbd::spawn_with_env(
        &dir,
        &server_args("serve", &a_file, Some(&a_sock), &[]),
        &[GAP, PAUSE_AFTER_1],
    );
    let mut c = Flexnbd::spawn_with_env(
        &dir,
        &server_args("serve", &c_file, Some(&c_sock), &[]),
        &[GAP, PAUSE_AFTER_1],
    );
    for s in [&a_sock, &c_sock] {
        wait_for("a control socket", WAIT, || {
            UnixStream::connect(s).ok().map(|_| ())
        });
    }
    let mut a_listen = listen_slow_sync(&dir, &a_dest, &[ZEROES], "");
    let c_listen = listen_slow_sync(&dir, &c_dest, &[ZEROES], "");
    until_checkpoint_1(&a, &a_sock, a_listen.port());
    until_checkpoint_1(&c, &c_sock, c_listen.port());
    wait_sender_gone(&a_listen);
    // C goes to A's destination: copied whole.
    mirror_started(&c_sock, a_listen.port(), &[]);
    wait_exit_0(&mut c, "source C");
    wait_exit_0(&mut a_listen, "A's destination, receiving C");
    assert!(!c.log().contains("resuming migration"), "{}", c.log());
    assert_eq!(bytes_received(&a_dest), DATA);
    assert_same_files(&c_file, &a_dest);
    drop(a);
    c_listen.signal(libc::SIGTERM);
}

#[test]
fn a_destination_image_replaced_since_the_checkpoint_gets_everything() {
    let dir = TempDir::new("resume-replaced");
    let src_file = eighty_mib_image(&dir, "src.img", 9);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let (mut src, sock) = serve_pausing(&dir, &src_file);
    let mut dest = listen_slow_sync(&dir, &dest_file, &[ZEROES], "");
    let port = dest.port();
    until_checkpoint_1(&src, &sock, port);
    dest.signal(libc::SIGTERM);
    dest.wait_exit();
    // Restored from a copy: the same bytes in another file.
    let restored = dir.join("restored.img");
    fs::copy(&dest_file, &restored).unwrap();
    fs::rename(&restored, &dest_file).unwrap();
    let mut dest = Flexnbd::spawn(
        &dir,
        &server_args_on("listen", port, &dest_file, None, &[ZEROES]),
    );
    mirror_started(&sock, port, &[]);
    wait_exit_0(&mut src, "the source");
    wait_exit_0(&mut dest, "the destination");
    // Its checkpoint is not trusted: nothing is skipped unseen. What it
    // holds is compared by digest instead, and found the same up to the
    // checkpoint (the copy has the same bytes).
    assert!(!src.log().contains("resuming migration"), "{}", src.log());
    assert!(
        dest.log().contains("holds checkpoint 1 of migration")
            && dest.log().contains("dropping it from the marker"),
        "the restarted destination must say it dropped the checkpoint:\n{}",
        dest.log()
    );
    assert!(
        bytes_received(&dest_file) < DATA,
        "what matched was not sent again"
    );
    assert_same_files(&src_file, &dest_file);
}

#[test]
fn a_restarted_source_compares_with_what_the_destination_holds() {
    // The source's process ends after checkpoint 1 (its migration id goes
    // with it); started again, its new migration finds a destination
    // holding another migration's data: compared by digest, and only what
    // differs is sent.
    let dir = TempDir::new("resume-restarted");
    let src_file = eighty_mib_image(&dir, "src.img", 11);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let (mut src, sock) = serve_pausing(&dir, &src_file);
    let mut dest = listen_slow_sync(&dir, &dest_file, &[ZEROES], "");
    until_checkpoint_1(&src, &sock, dest.port());
    src.signal(libc::SIGTERM);
    src.wait_exit();
    wait_sender_gone(&dest);
    let (mut src, sock) = serve(&dir, &src_file);
    mirror_started(&sock, dest.port(), &[]);
    wait_exit_0(&mut src, "the restarted source");
    wait_exit_0(&mut dest, "the destination");
    assert!(!src.log().contains("resuming migration"), "{}", src.log());
    let got = bytes_received(&dest_file);
    assert!(
        got <= DATA - 48 * MIB,
        "the 64 MiB the destination held must be compared, not sent: sent {got} of {DATA}"
    );
    assert_same_files(&src_file, &dest_file);
}

#[test]
fn a_destination_holding_no_data_is_sent_the_image_without_comparing() {
    // docs/handoff.md, "Resuming": `listen` says in its resume answer that
    // its image holds no data, and the source skips the digest probe of
    // the first window. (A destination holding data is compared: the test
    // above.)
    let dir = TempDir::new("resume-empty");
    let src_file = eighty_mib_image(&dir, "src.img", 12);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let (mut src, sock) = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, &[ZEROES]);
    mirror_started(&sock, dest.port(), &[]);
    wait_exit_0(&mut src, "the source");
    wait_exit_0(&mut dest, "the destination");
    let log = src.log();
    assert!(
        log.contains("holds no data: sending the image without comparing"),
        "{log}"
    );
    assert!(!log.contains("compared matched"), "no probe: {log}");
    assert_eq!(bytes_received(&dest_file), DATA);
    assert_same_files(&src_file, &dest_file);
}

#[test]
fn the_flush_before_the_cut_off_is_a_checkpoint_sent_ahead() {
    // docs/handoff.md, "checkpoint": to `listen`, the flush before the
    // cut-off is a checkpoint sent without waiting for the writes before
    // it (checkpoint 1 at 64 MiB, if still unanswered then, else
    // checkpoint 2), and the cut-off comes after its answer. A FLUSH goes
    // only to a destination that takes no checkpoints.
    let dir = TempDir::new("resume-flush-ahead");
    let src_file = eighty_mib_image(&dir, "src.img", 14);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let (mut src, sock) = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, &[ZEROES]);
    mirror_started(&sock, dest.port(), &[]);
    wait_exit_0(&mut src, "the source");
    wait_exit_0(&mut dest, "the destination");
    let log = src.log();
    let flush = log
        .find("flush 1 before the cut-off (checkpoint ")
        .unwrap_or_else(|| panic!("no flush before the cut-off in:\n{log}"));
    assert!(
        log[flush..]
            .lines()
            .next()
            .unwrap()
            .contains(", sent ahead) answered in"),
        "{log}"
    );
    let cut = log.find("converged after").expect("the converged line");
    assert!(flush < cut, "the cut-off after the flush:\n{log}");
    assert_same_files(&src_file, &dest_file);
}

#[test]
fn a_destination_that_knows_no_checkpoints_gets_everything() {
    // `serve` as the destination: RESUME and CHECKPOINT are unknown there,
    // as on an older flexnbd or the C one.
    let dir = TempDir::new("resume-old");
    let src_file = eighty_mib_image(&dir, "src.img", 10);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let (mut src, sock) = serve_with_faults(&dir, &src_file, "mirror.request_send.write#72=close");
    let dest = Flexnbd::serve(&dir, &dest_file, &[]);
    mirror_started(&sock, dest.port(), &[]);
    wait_exit_0(&mut src, "the source");
    src.assert_fired("mirror.request_send.write#72", "close");
    assert!(!src.log().contains("resuming migration"), "{}", src.log());
    assert!(!src.log().contains("checkpoint"), "{}", src.log());
    assert_same_files(&src_file, &dest_file);
}

#[test]
fn mirror_wait_shows_the_last_checkpoint_answered() {
    // Slow enough (20 MB/s) that a progress line (one a second) comes after
    // checkpoint 1, at 64 MiB of data.
    let dir = TempDir::new("resume-wait");
    let src_file = eighty_mib_image(&dir, "src.img", 12);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let (mut src, sock) = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, &[ZEROES]);
    let o = run_mirror(
        &sock,
        dest.port(),
        &["--wait", "-m", "20000000"],
        Duration::from_secs(60),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "mirror --wait: {out}");
    assert!(
        out.lines()
            .any(|l| l.contains(" checkpoint=1 resumed_bytes=0")),
        "a progress line should show checkpoint 1:\n{out}"
    );
    wait_exit_0(&mut src, "the source");
    wait_exit_0(&mut dest, "the destination");
    assert_same_files(&src_file, &dest_file);
}
