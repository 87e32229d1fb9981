//! `flexnbd resolve`: the verdict table of the hand-off contract
//! (docs/handoff.md) applied for a person.
//!
//! Simulated: every combination of a source image present or absent
//! (given as a real path with `--source`, or as `--source-exists yes|no`),
//! a completion record for the destination file absent, present or stale
//! (written for another inode), and a destination marker absent,
//! `state=receiving` or `state=entrusted`; `--apply` on each; malformed
//! invocations; and the states real migrations leave behind (after `mirror
//! --unlink`, after `mirror` without it, and while a `listen` waits for its
//! sender).
//!
//! What must happen: the three lines `verdict:`, `reason:`, `action:` with
//! the table's verdict and exit status 10 (source), 11 (destination), 12
//! (destination-entrusted, or destination-leftover-marker: a marker beside a
//! record) or 13 (impossible); a stale record counts as none; `--apply`
//! removes the marker in the rows that exit 12 (and says so), never the
//! record, and touches nothing in any other row;
//! usage errors exit 1 without a verdict; a completed `--unlink` migration
//! resolves to the destination, one without `--unlink` (source file kept)
//! and a destination still receiving resolve to the source.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::harness::*;
use crate::interop::{assert_mirror_started, exit_code, listen, mirror, source_in};

const QUICK: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Marker {
    Absent,
    Receiving,
    Entrusted,
}

fn marker_text(m: Marker) -> Option<&'static str> {
    match m {
        Marker::Absent => None,
        Marker::Receiving => Some(
            "state=receiving\nsource=127.0.0.1:40000\nattempt_started=1\nbytes_received=0\npid=1\n",
        ),
        Marker::Entrusted => Some(
            "state=entrusted\nsource=127.0.0.1:40000\nattempt_started=1\nbytes_received=4096\npid=1\n",
        ),
    }
}

/// A directory with DEST (and its marker as asked) and, if `source`, SRC.
fn scene(tag: &str, source: bool, m: Marker) -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new(tag);
    let src = dir.join("src.img");
    if source {
        fs::write(&src, b"source").unwrap();
    }
    let dest = dir.join("dest.img");
    fs::write(&dest, b"destination").unwrap();
    if let Some(text) = marker_text(m) {
        fs::write(marker_path(&dest), text).unwrap();
    }
    (dir, src, dest)
}

fn resolve(args: &[&str]) -> Output {
    let mut full = vec!["resolve"];
    full.extend_from_slice(args);
    run_tool(BIN, &full, QUICK)
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Checks the three output lines and the exit status of a verdict.
fn assert_verdict(o: &Output, verdict: &str, code: i32, what: &str) {
    let out = text(o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.len() >= 3,
        "{what}: expected verdict, reason and action lines; stdout:\n{out}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(lines[0], format!("verdict: {verdict}"), "{what}: {out}");
    assert!(
        lines[1].starts_with("reason: ") && lines[1].len() > "reason: ".len(),
        "{what}: reason line: {out}"
    );
    assert!(
        lines[2].starts_with("action: ") && lines[2].len() > "action: ".len(),
        "{what}: action line: {out}"
    );
    assert_eq!(o.status.code(), Some(code), "{what}: exit status; {out}");
}

/// The verdict table: (source present, marker) -> (verdict, exit status).
const TABLE: [(bool, Marker, &str, i32); 6] = [
    (true, Marker::Absent, "source", 10),
    (true, Marker::Receiving, "source", 10),
    (true, Marker::Entrusted, "source", 10),
    (false, Marker::Absent, "destination", 11),
    (false, Marker::Entrusted, "destination-entrusted", 12),
    (false, Marker::Receiving, "impossible", 13),
];

fn marker_contents(dest: &Path) -> Option<String> {
    fs::read_to_string(marker_path(dest)).ok()
}

/// `<dest>.COMPLETE`, spelled out here so the tests check the name.
fn record_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".COMPLETE");
    PathBuf::from(s)
}

/// Writes a completion record for the file at `dest` (its dev, ino and
/// size), or for another inode when `stale`.
fn write_record(dest: &Path, stale: bool) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(dest).unwrap();
    let ino = if stale { m.ino() + 1 } else { m.ino() };
    fs::write(
        record_path(dest),
        format!(
            "state=complete\nsource=127.0.0.1:40000\ncompleted_at=1700000000\nbytes_received=4096\npid=1\ndev={}\nino={ino}\nsize={}\n",
            m.dev(),
            m.size()
        ),
    )
    .unwrap();
}

/// The rows with a completion record that belongs to the destination file:
/// (source present, marker) -> (verdict, exit status).
const RECORD_TABLE: [(bool, Marker, &str, i32); 6] = [
    (true, Marker::Absent, "source", 10),
    (true, Marker::Receiving, "source", 10),
    (true, Marker::Entrusted, "source", 10),
    (false, Marker::Absent, "destination", 11),
    (false, Marker::Receiving, "destination-leftover-marker", 12),
    (false, Marker::Entrusted, "destination-leftover-marker", 12),
];

#[test]
fn every_row_with_a_completion_record_causes_its_verdict_and_exit_status() {
    for (present, m, verdict, code) in RECORD_TABLE {
        for flag in [false, true] {
            let what = format!("record, source present={present} (flag {flag}), marker {m:?}");
            let (_dir, src, dest) = scene("resolve-record", present && !flag, m);
            write_record(&dest, false);
            let record = fs::read(record_path(&dest)).unwrap();
            let before = marker_contents(&dest);
            let o = if flag {
                resolve(&[
                    "--source-exists",
                    if present { "yes" } else { "no" },
                    "--dest",
                    dest.to_str().unwrap(),
                ])
            } else {
                resolve(&[
                    "--source",
                    src.to_str().unwrap(),
                    "--dest",
                    dest.to_str().unwrap(),
                ])
            };
            assert_verdict(&o, verdict, code, &what);
            if !present {
                assert!(
                    text(&o).contains(&record_path(&dest).display().to_string()),
                    "{what}: the reason names the record: {}",
                    text(&o)
                );
            }
            assert_eq!(marker_contents(&dest), before, "{what}: marker untouched");
            assert_eq!(
                fs::read(record_path(&dest)).unwrap(),
                record,
                "{what}: record untouched"
            );
        }
    }
}

#[test]
fn a_marker_beside_a_record_with_apply_causes_marker_removed_and_record_kept() {
    for m in [Marker::Receiving, Marker::Entrusted] {
        let what = format!("--apply, record and marker {m:?}");
        let (_dir, src, dest) = scene("resolve-record-apply", false, m);
        write_record(&dest, false);
        let args = [
            "--source",
            src.to_str().unwrap(),
            "--dest",
            dest.to_str().unwrap(),
        ];
        let mut with_apply = args.to_vec();
        with_apply.push("--apply");
        let o = resolve(&with_apply);
        assert_verdict(&o, "destination-leftover-marker", 12, &what);
        assert!(
            text(&o).contains(&format!(
                "applied: removed {}",
                marker_path(&dest).display()
            )),
            "{what}: {}",
            text(&o)
        );
        assert!(!marker_path(&dest).exists(), "{what}: marker removed");
        assert!(record_path(&dest).exists(), "{what}: the record is kept");
        assert_verdict(&resolve(&args), "destination", 11, &what);
    }
}

#[test]
fn a_stale_record_counts_as_none() {
    for (m, verdict, code) in [
        (Marker::Receiving, "impossible", 13),
        (Marker::Entrusted, "destination-entrusted", 12),
        (Marker::Absent, "destination", 11),
    ] {
        let what = format!("stale record, marker {m:?}");
        let (_dir, src, dest) = scene("resolve-record-stale", false, m);
        write_record(&dest, true);
        let o = resolve(&[
            "--source",
            src.to_str().unwrap(),
            "--dest",
            dest.to_str().unwrap(),
        ]);
        assert_verdict(&o, verdict, code, &what);
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("stale completion record"),
            "{what}: says it ignored the record: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn every_table_row_given_real_files_causes_its_verdict_and_exit_status() {
    for (present, m, verdict, code) in TABLE {
        let what = format!("source present={present}, marker {m:?}");
        let (_dir, src, dest) = scene("resolve-files", present, m);
        let before = marker_contents(&dest);
        let o = resolve(&[
            "--source",
            src.to_str().unwrap(),
            "--dest",
            dest.to_str().unwrap(),
        ]);
        assert_verdict(&o, verdict, code, &what);
        assert!(
            !text(&o).contains("applied:"),
            "{what}: nothing applied without --apply"
        );
        assert_eq!(
            marker_contents(&dest),
            before,
            "{what}: the marker is not touched"
        );
        assert_eq!(src.exists(), present, "{what}: the source is not touched");
    }
}

#[test]
fn every_table_row_given_source_exists_flag_causes_its_verdict_and_exit_status() {
    for (present, m, verdict, code) in TABLE {
        let what = format!("--source-exists present={present}, marker {m:?}");
        // The source path is never looked at: leave no file at all.
        let (_dir, _src, dest) = scene("resolve-flag", false, m);
        let o = resolve(&[
            "--source-exists",
            if present { "yes" } else { "no" },
            "--dest",
            dest.to_str().unwrap(),
        ]);
        assert_verdict(&o, verdict, code, &what);
    }
}

#[test]
fn entrusted_marker_with_apply_causes_marker_removed_then_destination_verdict() {
    let (_dir, src, dest) = scene("resolve-apply", false, Marker::Entrusted);
    let o = resolve(&[
        "--source",
        src.to_str().unwrap(),
        "--dest",
        dest.to_str().unwrap(),
        "--apply",
    ]);
    assert_verdict(&o, "destination-entrusted", 12, "apply on entrusted");
    assert!(
        text(&o).contains(&format!(
            "applied: removed {}",
            marker_path(&dest).display()
        )),
        "apply says what it removed: {}",
        text(&o)
    );
    assert!(
        !marker_path(&dest).exists(),
        "the entrusted marker is removed"
    );
    assert!(dest.exists(), "the destination image stays");
    let o = resolve(&[
        "--source",
        src.to_str().unwrap(),
        "--dest",
        dest.to_str().unwrap(),
    ]);
    assert_verdict(&o, "destination", 11, "after apply");
}

#[test]
fn apply_on_every_other_row_causes_nothing_to_change() {
    for (present, m, verdict, code) in TABLE {
        if !present && m == Marker::Entrusted {
            continue;
        }
        let what = format!("--apply with source present={present}, marker {m:?}");
        let (_dir, src, dest) = scene("resolve-apply-noop", present, m);
        let before = marker_contents(&dest);
        let o = resolve(&[
            "--source",
            src.to_str().unwrap(),
            "--dest",
            dest.to_str().unwrap(),
            "--apply",
        ]);
        assert_verdict(&o, verdict, code, &what);
        assert!(
            !text(&o).contains("applied: removed"),
            "{what}: nothing may be removed: {}",
            text(&o)
        );
        assert_eq!(marker_contents(&dest), before, "{what}: marker unchanged");
        assert_eq!(src.exists(), present, "{what}: source unchanged");
        assert!(dest.exists(), "{what}: destination unchanged");
    }
}

#[test]
fn malformed_invocations_cause_usage_error_exit_1_without_verdict() {
    let (_dir, src, dest) = scene("resolve-usage", true, Marker::Entrusted);
    let src = src.to_str().unwrap();
    let dest = dest.to_str().unwrap();
    let cases: [(&str, Vec<&str>); 5] = [
        ("no --dest", vec!["--source", src]),
        (
            "both source flags",
            vec!["--source", src, "--source-exists", "yes", "--dest", dest],
        ),
        ("neither source flag", vec!["--dest", dest]),
        (
            "--source-exists maybe",
            vec!["--source-exists", "maybe", "--dest", dest],
        ),
        ("no arguments", vec![]),
    ];
    for (what, args) in cases {
        let o = resolve(&args);
        assert_eq!(o.status.code(), Some(1), "{what}: exit status");
        assert!(
            !text(&o).contains("verdict:"),
            "{what}: no verdict: {}",
            text(&o)
        );
        assert!(!o.stderr.is_empty(), "{what}: a message on stderr");
    }
    assert!(
        marker_path(Path::new(dest)).exists(),
        "usage errors change nothing"
    );
}

// ---------------------------------------------------------------------------
// End to end: the states real processes leave behind.

/// Migrates a 1 MiB image from a real source to a real listener; both must
/// exit 0. Returns (dir, source path, destination path).
fn real_migration(tag: &str, unlink: bool) -> (TempDir, PathBuf, PathBuf) {
    let dir = TempDir::new(tag);
    let file = dir.pattern_file("src.img", 1024 * 1024, 5);
    let dest = dir.sparse_file("dest.img", 1024 * 1024);
    let expected = fs::read(&file).unwrap();
    let mut src = source_in(dir, file.clone(), &[]);
    let mut dst = listen(&src.dir, &dest, &[]);
    let out = mirror(&src.sock, dst.port(), unlink);
    assert_mirror_started(&out);
    assert_eq!(exit_code(&mut src.server), Some(0), "source exit status");
    assert_eq!(exit_code(&mut dst), Some(0), "destination exit status");
    assert!(
        fs::read(&dest).unwrap() == expected,
        "the destination holds the image"
    );
    drop(dst);
    let crate::interop::Source { server, dir, .. } = src;
    drop(server);
    (dir, file, dest)
}

#[test]
fn completed_unlink_migration_causes_destination_verdict() {
    let (_dir, src, dest) = real_migration("resolve-e2e-unlink", true);
    assert!(!src.exists(), "--unlink removed the source");
    let o = resolve(&[
        "--source",
        src.to_str().unwrap(),
        "--dest",
        dest.to_str().unwrap(),
    ]);
    assert_verdict(&o, "destination", 11, "after --unlink migration");
}

#[test]
fn completed_migration_without_unlink_causes_source_verdict() {
    let (_dir, src, dest) = real_migration("resolve-e2e-keep", false);
    assert!(src.exists(), "without --unlink the source stays");
    let o = resolve(&[
        "--source",
        src.to_str().unwrap(),
        "--dest",
        dest.to_str().unwrap(),
    ]);
    assert_verdict(&o, "source", 10, "after migration without --unlink");
}

#[test]
fn listen_just_started_causes_receiving_marker_and_source_verdict() {
    let dir = TempDir::new("resolve-e2e-listen");
    let src = dir.pattern_file("src.img", 64 * 1024, 2);
    let dest = dir.sparse_file("dest.img", 64 * 1024);
    let server = listen(&dir, &dest, &[]);
    let text_ = fs::read_to_string(marker_path(&dest)).expect("listen creates the marker");
    assert!(
        text_.lines().any(|l| l == "state=receiving"),
        "marker: {text_}"
    );
    let o = resolve(&[
        "--source",
        src.to_str().unwrap(),
        "--dest",
        dest.to_str().unwrap(),
    ]);
    assert_verdict(&o, "source", 10, "while listen waits");
    drop(server);
}
