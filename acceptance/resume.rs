//! Comparing instead of copying, and resuming an interrupted migration
//! (docs/handoff.md, "Resuming an interrupted migration"), with the real
//! binaries: `serve`, `listen` and `mirror` as an operator runs them.
//!
//! What must happen: `mirror --verify` to a destination that already holds
//! most of the image sends only what differs (the completion record's
//! `bytes_received` says how much travelled as data) and ends with
//! identical images.

use std::fs;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;

const MIB: u64 = 1024 * 1024;

/// `serve` with a control socket, ready.
fn serve(dir: &TempDir, file: &Path) -> (Flexnbd, PathBuf) {
    let sock = dir.join("src.sock");
    let server = Flexnbd::spawn(dir, &server_args("serve", file, Some(&sock), &[]));
    wait_for("the source's control socket", WAIT, || {
        UnixStream::connect(&sock).ok().map(|_| ())
    });
    (server, sock)
}

fn listen(dir: &TempDir, file: &Path, extra: &[&str]) -> Flexnbd {
    Flexnbd::spawn(dir, &server_args("listen", file, None, extra))
}

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
fn without_verify_everything_is_sent_to_the_same_destination() {
    // The control for the test above: the same setup copies all the data.
    let dir = TempDir::new("verify-control");
    let src_file = source_image(&dir);
    let dest_file = dir.join("dest.img");
    fs::copy(&src_file, &dest_file).unwrap();
    let (mut src, sock) = serve(&dir, &src_file);
    let mut dest = listen(&dir, &dest_file, &["--oldstyle-extra-flags"]);
    mirror_started(&sock, dest.port(), &[]);
    wait_exit_0(&mut src, "the source");
    wait_exit_0(&mut dest, "the destination");
    assert_eq!(bytes_received(&dest_file), 24 * MIB);
}
