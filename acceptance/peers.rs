//! Simulated: real NBD clients (qemu-img, qemu-io, nbdcopy, nbdinfo, nbdsh, fio) use `flexnbd serve` over both handshakes; data must round-trip byte for byte, holes must stay holes and bad requests must get errors.
//!
//! Each scenario that a tool can run over both handshakes becomes a module
//! with an `oldstyle` and a `newstyle` test. Block status needs a negotiated
//! metadata context, which oldstyle cannot negotiate, so `nbdinfo --map` and
//! `h.block_status` are tested over newstyle only; structured replies are
//! likewise newstyle only (over oldstyle we check that reads still work with
//! simple replies).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crate::harness::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
/// Every export here is 4 MiB.
const SIZE: u64 = 4 * MIB;
/// Time limit for one run of one external tool.
const TOOL: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Handshake {
    Old,
    New,
}

use Handshake::{New, Old};

/// Generates `mod NAME { fn oldstyle(); fn newstyle(); }` running `NAME(hs)`.
macro_rules! over_both_handshakes {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn oldstyle() {
                super::$name(super::Handshake::Old)
            }
            #[test]
            fn newstyle() {
                super::$name(super::Handshake::New)
            }
        }
    )*};
}

over_both_handshakes!(
    qemu_img_info_reports_the_export_size,
    qemu_io_writes_are_verified_by_a_second_qemu_io_and_land_in_the_file,
    qemu_img_convert_of_a_sparse_export_produces_an_identical_sparse_file,
    qemu_img_convert_onto_the_export_makes_the_file_identical_and_punches_its_zeros,
    nbdinfo_reports_the_size_protocol_and_capabilities,
    nbdcopy_download_of_a_sparse_export_is_identical_and_sparse,
    nbdcopy_upload_makes_the_file_identical_and_qemu_io_reads_the_hole_as_zeros,
    nbdsh_fua_write_flush_and_cache_succeed_and_the_data_reaches_the_file,
    nbdsh_zero_and_trim_read_back_as_zeros_and_free_the_space,
    nbdsh_out_of_range_requests_cause_errors_and_the_connection_survives,
    nbdsh_read_across_data_and_hole_matches_the_file,
    nbdsh_write_on_one_connection_is_seen_by_another_after_flush,
    fio_write_then_verify_passes_and_the_file_verifies_directly,
    fio_short_randrw_with_crc32c_verification_reports_no_errors,
);

/// Over oldstyle with `--oldstyle-extra-flags`, so the tools see (and use)
/// TRIM, WRITE_ZEROES, CACHE and MULTI_CONN as over newstyle. The default
/// greeting (the C flexnbd's flags 13) is
/// `nbdinfo_over_the_default_oldstyle_greeting_sees_the_c_flexnbd_capabilities`.
fn serve(dir: &TempDir, file: &Path, hs: Handshake) -> Flexnbd {
    match hs {
        Old => Flexnbd::serve(
            dir,
            file,
            &["--handshake", "oldstyle", "--oldstyle-extra-flags"],
        ),
        New => Flexnbd::serve(dir, file, &["--handshake", "newstyle"]),
    }
}

/// A 4 MiB image holding 1 MiB of pattern data followed by a 3 MiB hole;
/// returns its path and its full expected content.
fn sparse_image(dir: &TempDir, name: &str, seed: u8) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    let mut content = pattern(MIB as usize, seed);
    fs::write(&path, &content).unwrap();
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    content.resize(SIZE as usize, 0);
    (path, content)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs qemu-io on the raw export with the given commands (`-c` each). Fails
/// on a non-zero exit or any "failed" message (pattern verification or I/O).
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let out = text(&run_ok("qemu-io", &args, TOOL));
    assert!(
        !out.to_lowercase().contains("fail"),
        "qemu-io {commands:?} reported a failure:\n{out}"
    );
    out
}

/// Runs `nbdsh [--base-allocation] -u URI -c CODE` (the handle `h` is
/// connected) or, with `uri` None, `nbdsh -n -c CODE`. nbdsh runs `python3`
/// from PATH, and only Debian's python3 has the nbd module, so PATH is set to
/// the system directories. Python assertions fail the test.
fn nbdsh(uri: Option<&str>, base_allocation: bool, code: &str) -> String {
    let mut args = vec!["PATH=/usr/bin:/bin", "nbdsh"];
    if base_allocation {
        args.push("--base-allocation");
    }
    match uri {
        Some(uri) => args.extend(["-u", uri]),
        None => args.push("-n"),
    }
    args.extend(["-c", code]);
    String::from_utf8_lossy(&run_ok("env", &args, TOOL).stdout).into_owned()
}

fn assert_same_content(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at}: {} != {}",
            actual[at], expected[at]
        );
    }
}

// ---------------------------------------------------------------- qemu

fn qemu_img_info_reports_the_export_size(hs: Handshake) {
    let dir = TempDir::new("peers");
    let file = dir.sparse_file("disk.img", SIZE);
    let server = serve(&dir, &file, hs);
    let out = text(&run_ok(
        "qemu-img",
        &["info", "--output=json", &server.uri()],
        TOOL,
    ));
    assert!(
        out.contains(&format!("\"virtual-size\": {SIZE}")),
        "qemu-img info:\n{out}"
    );
    server.assert_no_panic();
}

fn qemu_io_writes_are_verified_by_a_second_qemu_io_and_land_in_the_file(hs: Handshake) {
    let dir = TempDir::new("peers");
    let file = dir.pattern_file("disk.img", SIZE, 3);
    let original = pattern(SIZE as usize, 3);
    let server = serve(&dir, &file, hs);
    let uri = server.uri();
    // A plain write, a FUA write, zeroes that may unmap (punched), zeroes
    // that must stay allocated (NO_HOLE), a discard (TRIM), a flush.
    qemu_io(
        &uri,
        &[
            "write -P 0xab 65536 131072",
            "write -f -P 0xcd 1048576 4096",
            "write -z -u 2097152 262144",
            "write -z 2621440 65536",
            "discard 3145728 262144",
            "flush",
        ],
    );
    // A second client process verifies every range over the wire.
    qemu_io(
        &uri,
        &[
            "read -P 0xab 65536 131072",
            "read -P 0xcd 1048576 4096",
            "read -P 0 2097152 262144",
            "read -P 0 2621440 65536",
            "read -P 0 3145728 262144",
        ],
    );
    let mut expected = original;
    expected[64 * 1024..192 * 1024].fill(0xab);
    expected[MIB as usize..(MIB + 4 * KIB) as usize].fill(0xcd);
    expected[2 * MIB as usize..(2 * MIB + 256 * KIB) as usize].fill(0);
    expected[(2 * MIB + 512 * KIB) as usize..(2 * MIB + 576 * KIB) as usize].fill(0);
    expected[3 * MIB as usize..(3 * MIB + 256 * KIB) as usize].fill(0);
    assert_same_content(&fs::read(&file).unwrap(), &expected, "image file");
    // The unmapping zeroes and the discard freed their 512 KiB; the NO_HOLE
    // zeroes did not.
    let allocated = allocated_bytes(&file);
    assert!(
        (SIZE - 512 * KIB..=SIZE - 512 * KIB + 16 * KIB).contains(&allocated),
        "expected about {} bytes allocated, got {allocated}",
        SIZE - 512 * KIB
    );
    server.assert_no_panic();
}

fn qemu_img_convert_of_a_sparse_export_produces_an_identical_sparse_file(hs: Handshake) {
    let dir = TempDir::new("peers");
    let (file, content) = sparse_image(&dir, "disk.img", 4);
    let server = serve(&dir, &file, hs);
    let out = dir.join("out.img");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &server.uri(),
            out.to_str().unwrap(),
        ],
        TOOL,
    );
    assert_same_content(&fs::read(&out).unwrap(), &content, "converted file");
    let allocated = allocated_bytes(&out);
    assert!(
        allocated <= MIB + 64 * KIB,
        "the 3 MiB hole must stay a hole in the copy; {allocated} bytes allocated"
    );
    server.assert_no_panic();
}

fn qemu_img_convert_onto_the_export_makes_the_file_identical_and_punches_its_zeros(hs: Handshake) {
    let dir = TempDir::new("peers");
    let (source, content) = sparse_image(&dir, "source.img", 5);
    let file = dir.pattern_file("disk.img", SIZE, 6);
    let server = serve(&dir, &file, hs);
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            source.to_str().unwrap(),
            &server.uri(),
        ],
        TOOL,
    );
    assert_same_content(&fs::read(&file).unwrap(), &content, "served file");
    let allocated = allocated_bytes(&file);
    assert!(
        allocated <= MIB + 64 * KIB,
        "the zeroed 3 MiB must have been punched out; {allocated} bytes allocated"
    );
    server.assert_no_panic();
}

// ---------------------------------------------------------------- nbdinfo, nbdcopy

fn nbdinfo_reports_the_size_protocol_and_capabilities(hs: Handshake) {
    let dir = TempDir::new("peers");
    let file = dir.sparse_file("disk.img", SIZE);
    let server = serve(&dir, &file, hs);
    let out = text(&run_ok("nbdinfo", &[&server.uri()], TOOL));
    let protocol = match hs {
        Old => "protocol: oldstyle",
        New => "protocol: newstyle-fixed",
    };
    let mut wanted = vec![
        protocol.to_string(),
        format!("export-size: {SIZE}"),
        "is_read_only: false".into(),
    ];
    for cap in ["cache", "flush", "fua", "multi_conn", "trim", "zero"] {
        wanted.push(format!("can_{cap}: true"));
    }
    if hs == New {
        wanted.push("using structured packets".into());
        wanted.push("base:allocation".into());
    }
    for w in &wanted {
        assert!(out.contains(w.as_str()), "nbdinfo lacks {w:?}:\n{out}");
    }
    server.assert_no_panic();
}

/// The default oldstyle greeting is the C flexnbd's: a tool sees FLUSH and
/// FUA only, exactly as against a C server.
#[test]
fn nbdinfo_over_the_default_oldstyle_greeting_sees_the_c_flexnbd_capabilities() {
    let dir = TempDir::new("peers");
    let file = dir.sparse_file("disk.img", SIZE);
    let server = Flexnbd::serve(&dir, &file, &[]);
    let out = text(&run_ok("nbdinfo", &[&server.uri()], TOOL));
    let mut wanted = vec![
        "protocol: oldstyle".to_string(),
        format!("export-size: {SIZE}"),
    ];
    for cap in ["flush", "fua"] {
        wanted.push(format!("can_{cap}: true"));
    }
    for cap in ["cache", "multi_conn", "trim", "zero"] {
        wanted.push(format!("can_{cap}: false"));
    }
    for w in &wanted {
        assert!(out.contains(w.as_str()), "nbdinfo lacks {w:?}:\n{out}");
    }
    server.assert_no_panic();
}

/// `nbdinfo --map` needs the base:allocation context: newstyle only.
#[test]
fn nbdinfo_map_over_newstyle_shows_one_mib_of_data_then_a_hole_zero_range() {
    let dir = TempDir::new("peers");
    let (file, _) = sparse_image(&dir, "disk.img", 7);
    let server = serve(&dir, &file, New);
    let out = text(&run_ok("nbdinfo", &["--map", &server.uri()], TOOL));
    let map: Vec<(u64, u64, u32, String)> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 4, "unexpected --map line {l:?} in:\n{out}");
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3..].join(" "),
            )
        })
        .collect();
    assert_eq!(
        map,
        vec![
            (0, MIB, 0, "data".to_string()),
            (MIB, 3 * MIB, 3, "hole,zero".to_string()),
        ],
        "nbdinfo --map:\n{out}"
    );
    server.assert_no_panic();
}

fn nbdcopy_download_of_a_sparse_export_is_identical_and_sparse(hs: Handshake) {
    let dir = TempDir::new("peers");
    let (file, content) = sparse_image(&dir, "disk.img", 8);
    let server = serve(&dir, &file, hs);
    let out = dir.join("out.img");
    run_ok("nbdcopy", &[&server.uri(), out.to_str().unwrap()], TOOL);
    assert_same_content(&fs::read(&out).unwrap(), &content, "nbdcopy output");
    let allocated = allocated_bytes(&out);
    assert!(
        allocated <= MIB + 64 * KIB,
        "the 3 MiB hole must stay a hole in the copy; {allocated} bytes allocated"
    );
    server.assert_no_panic();
}

fn nbdcopy_upload_makes_the_file_identical_and_qemu_io_reads_the_hole_as_zeros(hs: Handshake) {
    let dir = TempDir::new("peers");
    let (source, content) = sparse_image(&dir, "source.img", 9);
    let file = dir.pattern_file("disk.img", SIZE, 10);
    let server = serve(&dir, &file, hs);
    run_ok("nbdcopy", &[source.to_str().unwrap(), &server.uri()], TOOL);
    assert_same_content(&fs::read(&file).unwrap(), &content, "served file");
    let allocated = allocated_bytes(&file);
    assert!(
        allocated <= MIB + 64 * KIB,
        "the source's hole must have been punched out; {allocated} bytes allocated"
    );
    // Another client sees the same thing over the wire.
    qemu_io(&server.uri(), &["read -P 0 1048576 3145728"]);
    server.assert_no_panic();
}

// ---------------------------------------------------------------- nbdsh (libnbd)

fn nbdsh_fua_write_flush_and_cache_succeed_and_the_data_reaches_the_file(hs: Handshake) {
    let dir = TempDir::new("peers");
    let file = dir.sparse_file("disk.img", SIZE);
    let server = serve(&dir, &file, hs);
    let out = nbdsh(
        Some(&server.uri()),
        false,
        r#"
import nbd
for cap in (h.can_fua, h.can_flush, h.can_cache, h.can_trim, h.can_zero, h.can_multi_conn):
    assert cap(), cap.__name__
data = bytes(range(256)) * 20
h.pwrite(data, 1000, nbd.CMD_FLAG_FUA)
h.flush()
h.cache(65536, 0)
assert h.pread(len(data), 1000) == data
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
    let expected: Vec<u8> = (0..=255u8).cycle().take(5120).collect();
    assert_eq!(read_file_range(&file, 1000, 5120), expected);
    assert_eq!(read_file_range(&file, 0, 1000), vec![0; 1000]);
    server.assert_no_panic();
}

fn nbdsh_zero_and_trim_read_back_as_zeros_and_free_the_space(hs: Handshake) {
    let dir = TempDir::new("peers");
    let file = dir.pattern_file("disk.img", SIZE, 11);
    let original = pattern(SIZE as usize, 11);
    let server = serve(&dir, &file, hs);
    // libnbd's argument order is (count, offset[, flags]).
    nbdsh(
        Some(&server.uri()),
        false,
        r#"
import nbd
M = 1024 * 1024
h.zero(M, 0)
h.trim(M, M)
h.zero(M, 2 * M, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(3 * M, 0) == bytes(3 * M)
h.flush()
"#,
    );
    let mut expected = original;
    expected[..3 * MIB as usize].fill(0);
    assert_same_content(&fs::read(&file).unwrap(), &expected, "image file");
    // Zero (may punch) and trim freed 2 MiB; the NO_HOLE zeroes stayed.
    let allocated = allocated_bytes(&file);
    assert!(
        (2 * MIB..=2 * MIB + 16 * KIB).contains(&allocated),
        "expected about 2 MiB allocated, got {allocated}"
    );
    server.assert_no_panic();
}

fn nbdsh_out_of_range_requests_cause_errors_and_the_connection_survives(hs: Handshake) {
    let dir = TempDir::new("peers");
    let file = dir.sparse_file("disk.img", SIZE);
    let server = serve(&dir, &file, hs);
    // Strict mode off, or libnbd refuses these itself without asking.
    let out = nbdsh(
        Some(&server.uri()),
        false,
        r#"
import nbd
h.set_strict_mode(0)
size = h.get_size()
tries = [
    ("read", lambda: h.pread(512, size)),
    ("read_straddling", lambda: h.pread(1024, size - 512)),
    ("write", lambda: h.pwrite(b"x" * 512, size)),
    ("write_straddling", lambda: h.pwrite(b"x" * 1024, size - 512)),
    ("fua_write", lambda: h.pwrite(b"x" * 512, size, nbd.CMD_FLAG_FUA)),
    ("zero", lambda: h.zero(4096, size)),
    ("trim", lambda: h.trim(4096, size - 512)),
    ("cache", lambda: h.cache(4096, size)),
    ("huge_offset", lambda: h.pread(512, 2**63 - 256)),
]
for name, f in tries:
    try:
        f()
        print(name, "succeeded")
    except nbd.Error as e:
        print(name, e.errno)
# The connection is still usable.
h.pwrite(b"\xee" * 512, size - 512)
assert h.pread(512, size - 512) == b"\xee" * 512
print("alive")
"#,
    );
    let results: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once(' ')).collect();
    assert_eq!(results.len(), 9, "nbdsh output:\n{out}");
    for (name, errno) in results {
        if name.contains("write") || name == "zero" {
            assert_eq!(errno, "ENOSPC", "{name}; nbdsh output:\n{out}");
        } else {
            assert!(
                errno == "ENOSPC" || errno == "EINVAL",
                "{name} must fail with ENOSPC or EINVAL; nbdsh output:\n{out}"
            );
        }
    }
    assert_eq!(out.lines().last(), Some("alive"), "nbdsh output:\n{out}");
    assert_eq!(fs::metadata(&file).unwrap().len(), SIZE, "file grew");
    assert_eq!(read_file_range(&file, SIZE - 512, 512), vec![0xee; 512]);
    server.assert_no_panic();
}

/// Over newstyle the read is structured and the hole comes back as hole
/// chunks; over oldstyle it is one simple reply.
fn nbdsh_read_across_data_and_hole_matches_the_file(hs: Handshake) {
    let dir = TempDir::new("peers");
    let (file, _) = sparse_image(&dir, "disk.img", 12);
    let server = serve(&dir, &file, hs);
    let code = format!(
        "path = {:?}\nnewstyle = {}\n{}",
        file.display().to_string(),
        if hs == New { "True" } else { "False" },
        r#"
import nbd
M = 1024 * 1024
start, count = M // 2, 2 * M
with open(path, "rb") as f:
    f.seek(start)
    expected = f.read(count)
assert h.get_structured_replies_negotiated() == newstyle
assert h.get_protocol() == ("newstyle-fixed" if newstyle else "oldstyle")
chunks = []
def chunk(subbuf, offset, status, error):
    chunks.append((offset, len(subbuf), status))
    return 0
buf = h.pread_structured(count, start, chunk)
assert buf == expected
chunks.sort()
pos = start
for offset, length, status in chunks:
    assert offset == pos, chunks
    assert status in (nbd.READ_DATA, nbd.READ_HOLE), chunks
    if newstyle and offset >= M:
        assert status == nbd.READ_HOLE, ("the hole must come as hole chunks", chunks)
    if offset < M:
        assert status == nbd.READ_DATA, chunks
    pos += length
assert pos == start + count, chunks
print(chunks)
"#
    );
    let out = nbdsh(Some(&server.uri()), false, &code);
    if hs == Old {
        assert_eq!(out.trim(), format!("[({}, {}, 1)]", MIB / 2, 2 * MIB));
    }
    server.assert_no_panic();
}

/// Block status needs base:allocation, which oldstyle cannot negotiate.
#[test]
fn nbdsh_block_status_over_newstyle_tracks_writes_zeroes_and_trims() {
    let dir = TempDir::new("peers");
    let (file, _) = sparse_image(&dir, "disk.img", 13);
    let server = serve(&dir, &file, New);
    let out = nbdsh(
        Some(&server.uri()),
        true,
        r#"
import nbd
M = 1024 * 1024
assert h.can_meta_context("base:allocation")
def status():
    extents = []
    pos = 0
    while pos < h.get_size():
        got = []
        def cb(meta, offset, entries, err):
            assert meta == "base:allocation"
            got.extend(entries)
            return 0
        h.block_status(h.get_size() - pos, pos, cb)
        assert got, "empty block status reply"
        for i in range(0, len(got), 2):
            length, flags = got[i], got[i + 1]
            if extents and extents[-1][1] == flags:
                extents[-1][0] += length
            else:
                extents.append([length, flags])
            pos += length
    return extents
assert status() == [[M, 0], [3 * M, 3]], status()
h.pwrite(b"\x01" * 4096, 2 * M)
h.zero(65536, 0)
h.trim(65536, M // 2)
got = status()
want = [[65536, 3], [M // 2 - 65536, 0], [65536, 3], [M // 2 - 65536, 0],
        [M, 3], [4096, 0], [2 * M - 4096, 3]]
assert got == want, (got, want)
print("ok")
"#,
    );
    assert_eq!(out.trim(), "ok");
    server.assert_no_panic();
}

/// Both handshakes (oldstyle with `--oldstyle-extra-flags`) advertise
/// CAN_MULTI_CONN: a write completed on one
/// connection is visible on another after a flush.
fn nbdsh_write_on_one_connection_is_seen_by_another_after_flush(hs: Handshake) {
    let dir = TempDir::new("peers");
    let file = dir.sparse_file("disk.img", SIZE);
    let server = serve(&dir, &file, hs);
    let code = format!(
        "uri = {:?}\n{}",
        server.uri(),
        r#"
import nbd
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(uri)
b.connect_uri(uri)
assert a.can_multi_conn() and b.can_multi_conn()
data = bytes(range(1, 256)) * 64
a.pwrite(data, 123456)
a.flush()
assert b.pread(len(data), 123456) == data
b.pwrite(b"\x42" * 4096, 0, nbd.CMD_FLAG_FUA)
assert a.pread(4096, 0) == b"\x42" * 4096
a.shutdown()
b.shutdown()
print("ok")
"#
    );
    assert_eq!(nbdsh(None, false, &code).trim(), "ok");
    let expected: Vec<u8> = (1..=255u8).cycle().take(255 * 64).collect();
    assert_eq!(read_file_range(&file, 123456, expected.len()), expected);
    assert_eq!(read_file_range(&file, 0, 4096), vec![0x42; 4096]);
    server.assert_no_panic();
}

// ---------------------------------------------------------------- fio

/// A random-write job with crc32c verification through NBD, then the same
/// job in verify-only mode against the image file itself.
fn fio_write_then_verify_passes_and_the_file_verifies_directly(hs: Handshake) {
    let dir = TempDir::new("peers");
    let file = dir.sparse_file("disk.img", SIZE);
    let server = serve(&dir, &file, hs);
    let uri = format!("--uri={}", server.uri());
    let job = [
        "--name=peers",
        "--rw=randwrite",
        "--bs=4k",
        "--size=4M",
        "--randseed=1234",
        "--verify=crc32c",
        "--verify_fatal=1",
        // Otherwise fio leaves a verify state file in the working directory.
        "--verify_state_save=0",
    ];
    let mut args = vec![
        "--ioengine=nbd",
        uri.as_str(),
        "--iodepth=8",
        "--do_verify=1",
    ];
    args.extend(job);
    let out = text(&run_ok("fio", &args, TOOL));
    assert!(out.contains("err= 0"), "fio through NBD:\n{out}");
    let filename = format!("--filename={}", file.display());
    let mut args = vec!["--ioengine=psync", filename.as_str(), "--verify_only"];
    args.extend(job);
    let out = text(&run_ok("fio", &args, TOOL));
    assert!(out.contains("err= 0"), "fio verifying the file:\n{out}");
    server.assert_no_panic();
}

fn fio_short_randrw_with_crc32c_verification_reports_no_errors(hs: Handshake) {
    let dir = TempDir::new("peers");
    let file = dir.sparse_file("disk.img", SIZE);
    let server = serve(&dir, &file, hs);
    let uri = format!("--uri={}", server.uri());
    let out = text(&run_ok(
        "fio",
        &[
            "--name=peers",
            "--ioengine=nbd",
            &uri,
            "--rw=randrw",
            "--bs=4k",
            "--size=4M",
            "--iodepth=16",
            "--runtime=2",
            "--time_based",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ],
        TOOL,
    ));
    assert!(out.contains("err= 0"), "fio:\n{out}");
    assert!(
        out.contains("READ:") && out.contains("WRITE:"),
        "fio did no I/O:\n{out}"
    );
    server.assert_no_panic();
}
