//! `flexnbd serve` on the wire, oldstyle: the byte layouts, error order and
//! error codes of the C flexnbd's wire protocol, with its bugs fixed.

use crate::harness::*;
use flexnbd::proto::{self, cmd, errno};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn served(size: u64) -> (TempDir, std::path::PathBuf, Flexnbd) {
    let dir = TempDir::new("wire");
    let file = dir.sparse_file("disk.img", size);
    let server = Flexnbd::serve(&dir, &file, &[]);
    (dir, file, server)
}

#[test]
fn oldstyle_greeting_is_byte_exact_with_the_c_flags_13() {
    // The C greeting: NBDMAGIC, INIT_MAGIC, the size, flags exactly 13 (HAS_FLAGS,
    // SEND_FLUSH, SEND_FUA; tools compare with exactly that), 124 zeros.
    let (_dir, _file, server) = served(MIB);
    let mut c = server.connect();
    let g = c.read_exact(152);
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], &[0x00, 0x00, 0x42, 0x02, 0x81, 0x86, 0x12, 0x53]);
    assert_eq!(u64::from_be_bytes(g[16..24].try_into().unwrap()), MIB);
    assert_eq!(&g[24..28], &[0, 0, 0, 13], "flags must be exactly 13");
    assert!(g[28..].iter().all(|&b| b == 0), "124 reserved zero bytes");
    server.assert_no_panic();
}

#[test]
fn oldstyle_extra_flags_adds_trim_write_zeroes_multi_conn_and_cache() {
    let dir = TempDir::new("wire-extra");
    let file = dir.sparse_file("disk.img", MIB);
    let server = Flexnbd::serve(&dir, &file, &["--oldstyle-extra-flags"]);
    let mut c = server.connect();
    let (size, flags) = c.oldstyle_greeting();
    assert_eq!(size, MIB);
    assert_eq!(
        flags,
        13 | 32 | 64 | 256 | 1024,
        "expected the C flags 13 plus SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN and SEND_CACHE, got {flags}"
    );
    c.write_ok(0, b"served as usual");
    server.assert_no_panic();
}

#[test]
fn oldstyle_extra_flags_is_refused_with_the_newstyle_handshake() {
    let dir = TempDir::new("wire-extra-new");
    let file = dir.sparse_file("disk.img", MIB);
    let file_arg = file.display().to_string();
    let out = run_tool(
        BIN,
        &[
            "serve",
            "-l",
            "127.0.0.1",
            "-p",
            "0",
            "-f",
            &file_arg,
            "--handshake",
            "newstyle",
            "--oldstyle-extra-flags",
        ],
        WAIT,
    );
    assert_eq!(out.status.code(), Some(1), "a usage error exits 1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--oldstyle-extra-flags needs --handshake oldstyle"),
        "stderr should explain the conflict: {stderr}"
    );
}

#[test]
fn write_then_read_returns_the_data_and_lands_in_the_file() {
    let (_dir, file, server) = served(MIB);
    let mut c = server.connect();
    c.oldstyle_greeting();
    let data = pattern(10_000, 1);
    c.write_ok(12_345, &data);
    assert_eq!(c.read_ok(12_345, 10_000), data);
    assert_eq!(read_file_range(&file, 12_345, 10_000), data);
}

#[test]
fn bad_request_magic_causes_ebadmsg_with_the_handle_then_close() {
    let (_dir, _file, server) = served(MIB);
    let mut c = server.connect();
    c.oldstyle_greeting();
    let mut req = proto::Request::new(cmd::READ, 0, 0xdead_beef_0000_0001, 0, 512);
    req.magic = 0x1234_5678;
    c.send(&req.encode());
    let r = c.simple_reply();
    assert_eq!(r.magic, proto::SIMPLE_REPLY_MAGIC);
    assert_eq!(r.error, errno::EBADMSG);
    assert_eq!(r.handle, 0xdead_beef_0000_0001);
    assert!(c.sees_eof(), "the server closes after a bad magic");
    server.wait_log("bad request magic: expected 0x25609513, got 0x12345678");
    // Everyone else is still served.
    let mut other = server.connect();
    other.oldstyle_greeting();
    other.write_ok(0, b"still alive");
}

#[test]
fn out_of_range_write_causes_enospc_and_its_payload_is_drained() {
    let (_dir, file, server) = served(MIB);
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(cmd::WRITE, 0, 77, MIB + 1, 32);
    c.send(&[0xaa; 32]);
    let r = c.simple_reply();
    assert_eq!((r.error, r.handle), (errno::ENOSPC, 77));
    // The connection is kept and the next request parses correctly.
    c.write_ok(0, &[0x55; 32]);
    assert_eq!(read_file_range(&file, 0, 32), vec![0x55; 32]);
}

#[test]
fn out_of_range_read_and_overflowing_offsets_cause_enospc() {
    let (_dir, _file, server) = served(MIB);
    let mut c = server.connect();
    c.oldstyle_greeting();
    for (i, (offset, len)) in [
        (MIB, 1),
        (MIB - 511, 512),
        (u64::MAX - 10, 512),
        (u64::MAX, 0),
    ]
    .into_iter()
    .enumerate()
    {
        c.request(cmd::READ, 0, i as u64, offset, len);
        let r = c.simple_reply();
        assert_eq!(
            (r.error, r.handle),
            (errno::ENOSPC, i as u64),
            "read of {len} at {offset}"
        );
    }
    // Overflow on a write: the payload is still drained.
    c.request(cmd::WRITE, 0, 99, u64::MAX - 3, 8);
    c.send(&[1; 8]);
    assert_eq!(c.simple_reply().error, errno::ENOSPC);
    assert_eq!(c.read_ok(MIB - 512, 512), vec![0; 512]);
}

#[test]
fn unknown_command_causes_einval_and_the_connection_is_kept() {
    let (_dir, _file, server) = served(MIB);
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(123, 0, 5, 0, 0);
    let r = c.simple_reply();
    assert_eq!((r.error, r.handle), (errno::EINVAL, 5));
    c.write_ok(0, b"after unknown");
    server.wait_log("unknown command type 123");
}

#[test]
fn entrust_is_refused_with_einval_by_a_plain_server() {
    // A C flexnbd destination answers ENTRUST with EINVAL; so do we in serve.
    let (_dir, _file, server) = served(MIB);
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(cmd::ENTRUST, 0, 6, 0, 0);
    assert_eq!(c.simple_reply().error, errno::EINVAL);
}

#[test]
fn odd_size_files_are_served_rounded_down_to_512() {
    let dir = TempDir::new("odd");
    let file = dir.sparse_file("odd.img", 1535);
    let server = Flexnbd::serve(&dir, &file, &[]);
    let mut c = server.connect();
    assert_eq!(c.oldstyle_greeting().0, 1024);
    c.request(cmd::READ, 0, 1, 1024, 1);
    assert_eq!(c.simple_reply().error, errno::ENOSPC);
    server.wait_log("not a multiple of 512");
}

#[test]
fn zero_byte_file_is_served_not_a_crash() {
    let dir = TempDir::new("empty");
    let file = dir.sparse_file("empty.img", 0);
    let server = Flexnbd::serve(&dir, &file, &[]);
    let mut c = server.connect();
    assert_eq!(c.oldstyle_greeting().0, 0);
    c.request(cmd::READ, 0, 1, 0, 0);
    assert_eq!(c.simple_reply().error, 0);
    c.request(cmd::READ, 0, 2, 0, 1);
    assert_eq!(c.simple_reply().error, errno::ENOSPC);
    c.request(cmd::FLUSH, 0, 3, 0, 0);
    assert_eq!(c.simple_reply().error, 0);
    server.assert_no_panic();
}

#[test]
fn pipelined_requests_all_get_their_replies() {
    let (_dir, file, server) = served(4 * MIB);
    let mut c = server.connect();
    c.oldstyle_greeting();
    // 200 writes sent back to back before reading any reply.
    let mut burst = Vec::new();
    for i in 0..200u64 {
        burst.extend_from_slice(&proto::Request::new(cmd::WRITE, 0, i, i * 4 * KIB, 4096).encode());
        burst.extend_from_slice(&vec![(i % 251) as u8 + 1; 4096]);
    }
    burst.extend_from_slice(&proto::Request::new(cmd::FLUSH, 0, 1000, 0, 0).encode());
    c.send(&burst);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..201 {
        let r = c.simple_reply();
        assert_eq!((r.magic, r.error), (proto::SIMPLE_REPLY_MAGIC, 0));
        assert!(seen.insert(r.handle), "handle {} answered twice", r.handle);
    }
    assert!(seen.contains(&1000));
    for i in [0u64, 57, 199] {
        assert_eq!(
            read_file_range(&file, i * 4 * KIB, 4096),
            vec![(i % 251) as u8 + 1; 4096]
        );
    }
}

#[test]
fn fua_write_and_flush_are_answered() {
    let (_dir, file, server) = served(MIB);
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(cmd::WRITE, proto::cmd_flags::FUA, 9, 3 * 4096 + 100, 33);
    c.send(&[7; 33]);
    assert_eq!(c.simple_reply().error, 0);
    c.request(cmd::FLUSH, 0, 10, 0, 0);
    let r = c.simple_reply();
    assert_eq!((r.error, r.handle), (0, 10));
    assert_eq!(read_file_range(&file, 3 * 4096 + 100, 33), vec![7; 33]);
}

#[test]
fn trim_write_zeroes_and_cache_are_served_though_the_c_greeting_does_not_offer_them() {
    // The C flexnbd answers them EINVAL; we carry them out, so a client
    // that sends them anyway gets what it asked for.
    let dir = TempDir::new("punch");
    let file = dir.pattern_file("data.img", 4 * MIB, 3);
    let server = Flexnbd::serve(&dir, &file, &[]);
    let mut c = server.connect();
    assert_eq!(c.oldstyle_greeting().1, 13, "the default greeting's flags");
    c.request(cmd::CACHE, 0, 4, 0, MIB as u32);
    assert_eq!(c.simple_reply().error, 0, "CACHE");
    let before = allocated_bytes(&file);
    c.request(cmd::TRIM, 0, 1, 0, MIB as u32);
    assert_eq!(c.simple_reply().error, 0);
    c.request(cmd::WRITE_ZEROES, 0, 2, MIB, MIB as u32);
    assert_eq!(c.simple_reply().error, 0);
    assert!(
        allocated_bytes(&file) <= before - 2 * MIB,
        "2 MiB were punched"
    );
    assert_eq!(c.read_ok(MIB, 4096), vec![0; 4096]);
    // NO_HOLE writes real zeros but keeps the space.
    c.request(
        cmd::WRITE_ZEROES,
        proto::cmd_flags::NO_HOLE,
        3,
        2 * MIB,
        MIB as u32,
    );
    assert_eq!(c.simple_reply().error, 0);
    assert_eq!(read_file_range(&file, 2 * MIB, 4096), vec![0; 4096]);
    assert!(allocated_bytes(&file) >= 2 * MIB);
}

#[test]
fn zero_writes_over_holes_keep_the_file_sparse() {
    let (_dir, file, server) = served(8 * MIB);
    server.wait_log("allocation map built");
    zero_writes_keep_holes(&server, &file);
}

#[test]
fn zero_writes_over_holes_keep_the_file_sparse_before_the_allocation_map_is_built() {
    let dir = TempDir::new("wire-zeros-unbuilt");
    let file = dir.sparse_file("disk.img", 8 * MIB);
    let server = Flexnbd::serve(&dir, &file, &["--faults", "store.map_scan=slow(600000)"]);
    server.assert_fired("store.map_scan", "slow(600000)");
    zero_writes_keep_holes(&server, &file);
    assert!(
        !server.log().contains("allocation map built"),
        "the map must still be unbuilt for this test to mean anything"
    );
}

/// All-zero writes over the holes of a sparse 8 MiB `file` allocate
/// nothing; zeros over data still overwrite it.
fn zero_writes_keep_holes(server: &Flexnbd, file: &std::path::Path) {
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.write_ok(0, &vec![0u8; 4 * MIB as usize]);
    assert_eq!(
        allocated_bytes(file),
        0,
        "all-zero writes over holes allocate nothing"
    );
    let mut data = vec![0u8; 64 * KIB as usize];
    data[40_000] = 1;
    c.write_ok(MIB, &data);
    assert_eq!(
        allocated_bytes(file),
        4096,
        "only the one non-zero 4 KiB block is allocated"
    );
    c.write_ok(MIB + 36_864, &[0u8; 4096]);
    assert_eq!(
        c.read_ok(MIB + 36_864, 4096),
        vec![0u8; 4096],
        "zeros over data overwrite it"
    );
}

#[test]
fn disconnect_ends_the_connection_without_a_reply() {
    let (_dir, _file, server) = served(MIB);
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(cmd::DISC, 0, 1, 0, 0);
    assert!(c.sees_eof());
}

#[test]
fn clients_beyond_max_clients_are_closed_without_a_greeting() {
    let dir = TempDir::new("slots");
    let file = dir.sparse_file("d.img", MIB);
    let server = Flexnbd::serve(&dir, &file, &["--max-clients", "2"]);
    let mut a = server.connect();
    a.oldstyle_greeting();
    let mut b = server.connect();
    b.oldstyle_greeting();
    let mut c = server.connect();
    assert!(c.sees_eof(), "third client gets EOF, no greeting");
    server.wait_log("too many clients");
    drop(a);
    // A slot frees up once a client leaves.
    wait_for("a free slot", WAIT, || {
        let mut d = server.connect();
        let mut g = [0u8; 8];
        use std::io::Read;
        (d.stream.read_exact(&mut g).is_ok()).then_some(())
    });
}

#[test]
fn acl_rejects_clients_before_any_greeting() {
    let dir = TempDir::new("acl");
    let file = dir.sparse_file("d.img", MIB);
    let server = Flexnbd::serve(&dir, &file, &["127.0.0.2"]);
    let mut c = server.connect();
    assert!(c.sees_eof(), "127.0.0.1 is not in the ACL");
    server.wait_log("not allowed by the access control list");
    let allowed = Flexnbd::serve(&dir, &file, &["127.0.0.0/8"]);
    allowed.connect().oldstyle_greeting();
}

#[test]
fn default_deny_with_empty_acl_rejects_everyone() {
    let dir = TempDir::new("deny");
    let file = dir.sparse_file("d.img", MIB);
    let server = Flexnbd::serve(&dir, &file, &["--default-deny"]);
    assert!(server.connect().sees_eof());
}

#[test]
fn a_one_tib_sparse_file_is_served_at_once() {
    let dir = TempDir::new("tib");
    let file = dir.sparse_file("big.img", 1 << 40);
    let server = Flexnbd::serve(&dir, &file, &[]);
    let mut c = server.connect();
    assert_eq!(c.oldstyle_greeting().0, 1 << 40);
    assert_eq!(c.read_ok((1 << 40) - 4096, 4096), vec![0; 4096]);
    c.write_ok(1 << 39, b"middle of a terabyte");
    assert_eq!(c.read_ok(1 << 39, 20), b"middle of a terabyte");
}

#[test]
fn accepted_sockets_get_keepalive_30_10_3_and_nodelay() {
    // The C suite checked these setsockopt calls with LD_PRELOAD; strace
    // shows the same calls on the real binary.
    let dir = TempDir::new("keepalive");
    let file = dir.sparse_file("d.img", MIB);
    let trace = dir.join("trace.txt");
    let trace_arg = trace.display().to_string();
    let file_arg = file.display().to_string();
    let args: Vec<String> = [
        "-f",
        "-e",
        "trace=setsockopt",
        "-o",
        &trace_arg,
        BIN,
        "serve",
        "-l",
        "127.0.0.1",
        "-p",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["-f".to_string(), file_arg, "-v".to_string()])
    .collect();
    let server = Flexnbd::spawn_program(&dir, "strace", &args);
    let mut c = server.connect();
    c.oldstyle_greeting();
    let expected = [
        "SO_KEEPALIVE, [1], 4",
        "TCP_KEEPIDLE, [30], 4",
        "TCP_KEEPINTVL, [10], 4",
        "TCP_KEEPCNT, [3], 4",
        "TCP_NODELAY, [1], 4",
    ];
    wait_for("setsockopt calls in the trace", WAIT, || {
        let t = std::fs::read_to_string(&trace).unwrap_or_default();
        expected.iter().all(|e| t.contains(e)).then_some(())
    });
}

/// Reads a `.hex` fixture: whitespace-separated bytes, `#` comment lines.
fn hex_fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/wire")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| {
            l.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn oldstyle_greeting_matches_the_c_flexnbd_golden_bytes() {
    let (_dir, _file, server) = served(MIB);
    let mut c = server.connect();
    assert_eq!(
        c.read_exact(152),
        hex_fixture("c-flexnbd-greeting-1MiB.hex")
    );
}

#[test]
fn oldstyle_greeting_with_extra_flags_matches_its_golden_bytes() {
    let dir = TempDir::new("wire-golden-extra");
    let file = dir.sparse_file("disk.img", MIB);
    let server = Flexnbd::serve(&dir, &file, &["--oldstyle-extra-flags"]);
    let mut c = server.connect();
    assert_eq!(
        c.read_exact(152),
        hex_fixture("oldstyle-extra-flags-greeting-1MiB.hex")
    );
}

#[test]
fn our_client_reads_from_a_server_sending_the_c_greeting() {
    // A fake C flexnbd: the flags-13 greeting, then one read reply.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(&hex_fixture("c-flexnbd-greeting-1MiB.hex"))
            .unwrap();
        let mut h = [0u8; 28];
        s.read_exact(&mut h).unwrap();
        let req = proto::Request::decode(&h);
        assert_eq!((req.kind, req.offset, req.length), (cmd::READ, 512, 4));
        s.write_all(&proto::SimpleReply::new(0, req.handle).encode())
            .unwrap();
        s.write_all(b"ABCD").unwrap();
    });
    let port_arg = port.to_string();
    let out = run_ok(
        BIN,
        &[
            "read",
            "--addr",
            "127.0.0.1",
            "--port",
            &port_arg,
            "--from",
            "512",
            "--size",
            "4",
        ],
        WAIT,
    );
    assert_eq!(out.stdout, b"ABCD");
    fake.join().unwrap();
}
