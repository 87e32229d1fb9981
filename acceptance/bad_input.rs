//! Hostile and broken clients against the real `flexnbd serve`, both
//! handshakes where they differ.
//!
//! Simulated: clients that send truncated request headers, vanish in the
//! middle of a write payload or while a large read is being sent, ask for
//! reads and writes of 4 GiB - 1, send unknown commands, and (newstyle) send
//! bad option magics, unknown options, oversized option lengths, option
//! floods, unknown client flags, truncated options, or nothing at all.
//!
//! Must happen: each gets the specified error reply or a closed connection
//! and a log line saying what was expected and what was seen; memory stays
//! bounded whatever length a client names; the process keeps running and a
//! fresh client is served correctly afterwards; nothing panics.

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use crate::harness::*;
use flexnbd::proto::{self, cmd, errno, opt, rep, InfoRequest, OptionHeader, OptionReplyHeader};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// Most resident memory a server may reach whatever lengths clients name
/// (it idles at under 10 MiB).
const RSS_LIMIT: u64 = 64 * MIB;

/// Which handshake a server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Old,
    New,
}

pub const BOTH: [Mode; 2] = [Mode::Old, Mode::New];

impl Mode {
    pub fn args(self) -> &'static [&'static str] {
        match self {
            Mode::Old => &["--handshake", "oldstyle"],
            Mode::New => &["--handshake", "newstyle"],
        }
    }
}

/// Starts a server of `size` sparse bytes speaking `mode`, plus `extra` args.
pub fn serve(mode: Mode, size: u64, extra: &[&str]) -> (TempDir, std::path::PathBuf, Flexnbd) {
    let dir = TempDir::new("bad");
    let file = dir.sparse_file("disk.img", size);
    let mut args = mode.args().to_vec();
    args.extend_from_slice(extra);
    let server = Flexnbd::serve(&dir, &file, &args);
    (dir, file, server)
}

/// Reads the 18-byte fixed newstyle greeting and returns its flags.
pub fn newstyle_greeting(c: &mut RawClient) -> u16 {
    let g = c.read_exact(18);
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], &proto::IHAVEOPT.to_be_bytes());
    u16::from_be_bytes([g[16], g[17]])
}

pub fn option_reply(c: &mut RawClient) -> (OptionReplyHeader, Vec<u8>) {
    let h = c.read_exact(20);
    let h = OptionReplyHeader::decode(h.as_slice().try_into().unwrap())
        .unwrap_or_else(|e| panic!("option reply: {e}"));
    let data = c.read_exact(h.length as usize);
    (h, data)
}

/// Sends `NBD_OPT_GO` for the default export and reads replies up to the ACK.
pub fn newstyle_go(c: &mut RawClient) {
    let data = InfoRequest {
        name: Vec::new(),
        requests: Vec::new(),
    }
    .encode();
    send_option(c, opt::GO, &data);
    loop {
        let (h, body) = option_reply(c);
        assert_eq!(h.option, opt::GO);
        assert!(
            !rep::is_error(h.kind),
            "GO refused with 0x{:08x}: {}",
            h.kind,
            String::from_utf8_lossy(&body)
        );
        if h.kind == rep::ACK {
            return;
        }
    }
}

/// Connects and completes the handshake, ready for requests (simple replies).
pub fn ready(server: &Flexnbd, mode: Mode) -> RawClient {
    let mut c = server.connect();
    match mode {
        Mode::Old => {
            c.oldstyle_greeting();
        }
        Mode::New => {
            newstyle_greeting(&mut c);
            c.send(&(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES).to_be_bytes());
            newstyle_go(&mut c);
        }
    }
    c
}

/// Connects, reads the newstyle greeting and sends fixed-newstyle client flags.
fn negotiating(server: &Flexnbd) -> RawClient {
    let mut c = server.connect();
    newstyle_greeting(&mut c);
    c.send(&(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES).to_be_bytes());
    c
}

/// The server is alive, has not panicked, and a fresh client can write and
/// read back its data.
pub fn assert_still_serving(server: &mut Flexnbd, mode: Mode) {
    assert!(
        server.is_running(),
        "flexnbd exited; log:\n{}",
        server.log()
    );
    let mut c = ready(server, mode);
    let data = pattern(4096, 42);
    c.write_ok(8 * KIB, &data);
    assert_eq!(c.read_ok(8 * KIB, 4096), data, "fresh client reads back");
    c.request(cmd::DISC, 0, 0, 0, 0);
    assert!(c.sees_eof());
    assert!(server.is_running());
    server.assert_no_panic();
}

/// True when the peer has closed: EOF, or a reset because we had unread
/// data on its side. A timeout is not a close.
fn closed(c: &mut RawClient) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match c.stream.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("waiting for the server to close: {e}"),
        }
    }
}

/// The peak resident memory of the server process, in bytes.
fn vm_hwm(server: &Flexnbd) -> u64 {
    let pid = server.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/PID/status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .expect("VmHWM in kB");
    kb * 1024
}

/// Both ends of a log line: "client X dropped: <what>".
fn dropped_line(server: &Flexnbd, what: &str) {
    server.wait_log(what);
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("dropped: ") && l.contains(what)),
        "no 'client ... dropped: {what}' line; log:\n{log}"
    );
}

#[test]
fn truncated_request_header_then_close_causes_a_vanished_log_line() {
    for mode in BOTH {
        let (_dir, _file, mut server) = serve(mode, MIB, &[]);
        for cut in [1usize, 10, 27] {
            let mut c = ready(&server, mode);
            let header = proto::Request::new(cmd::READ, 0, 1, 0, 512).encode();
            c.send(&header[..cut]);
            drop(c);
            dropped_line(
                &server,
                &format!(
                    "client vanished in the middle of a request header: expected 28 bytes, got {cut}"
                ),
            );
        }
        assert_still_serving(&mut server, mode);
    }
}

#[test]
fn vanishing_mid_write_payload_causes_a_vanished_log_line() {
    for mode in BOTH {
        let (_dir, _file, mut server) = serve(mode, MIB, &[]);
        // In range: the payload is being stored.
        let mut c = ready(&server, mode);
        c.request(cmd::WRITE, 0, 7, 0, 64 * KIB as u32);
        c.send(&[0xab; 1000]);
        drop(c);
        dropped_line(
            &server,
            "client vanished in the middle of a write payload: expected 65536 bytes, got 1000",
        );
        // Out of range: the payload is being drained before ENOSPC.
        let mut c = ready(&server, mode);
        c.request(cmd::WRITE, 0, 8, MIB, 32 * KIB as u32);
        c.send(&[0xcd; 5000]);
        drop(c);
        dropped_line(
            &server,
            "client vanished in the middle of a write payload: expected 32768 bytes, got 5000",
        );
        assert_still_serving(&mut server, mode);
    }
}

#[test]
fn vanishing_mid_read_causes_a_send_failure_log_line_and_only_that_connection_ends() {
    for mode in BOTH {
        let (_dir, _file, mut server) = serve(mode, 128 * MIB, &[]);
        // Another client, connected throughout, must be unaffected.
        let mut bystander = ready(&server, mode);
        let mut c = ready(&server, mode);
        c.request(cmd::READ, 0, 9, 0, 64 * MIB as u32);
        // Take the reply header and a little data, so the read is under way.
        let r = c.simple_reply();
        assert_eq!((r.error, r.handle), (0, 9));
        c.read_exact(4096);
        drop(c);
        dropped_line(&server, "sending a reply failed: ");
        bystander.write_ok(0, b"bystander still served");
        assert_eq!(bystander.read_ok(0, 22), b"bystander still served");
        assert_still_serving(&mut server, mode);
    }
}

#[test]
fn read_of_4_gib_minus_1_is_streamed_not_allocated() {
    for mode in BOTH {
        let (_dir, _file, mut server) = serve(mode, 5 * GIB, &[]);
        let mut c = ready(&server, mode);
        c.request(cmd::READ, 0, 0x0042_4947, 0, u32::MAX);
        let r = c.simple_reply();
        assert_eq!(
            (r.magic, r.error, r.handle),
            (proto::SIMPLE_REPLY_MAGIC, 0, 0x0042_4947)
        );
        // Read and discard more of the reply than the memory limit, so a
        // server that buffered it would be caught.
        let mut buf = vec![0u8; MIB as usize];
        c.stream.read_exact(&mut buf).expect("read reply data");
        assert!(buf.iter().all(|&b| b == 0), "a sparse image reads as zeros");
        for _ in 1..(RSS_LIMIT / MIB + 32) {
            c.stream.read_exact(&mut buf).expect("read reply data");
        }
        let hwm = vm_hwm(&server);
        assert!(
            hwm < RSS_LIMIT,
            "server peak RSS is {} MiB while streaming a 4 GiB read",
            hwm / MIB
        );
        drop(c);
        dropped_line(&server, "sending a reply failed: ");
        assert!(vm_hwm(&server) < RSS_LIMIT);
        assert_still_serving(&mut server, mode);
    }
}

#[test]
fn write_of_4_gib_minus_1_cut_short_causes_a_vanished_log_line_and_bounded_memory() {
    for mode in BOTH {
        let (_dir, _file, mut server) = serve(mode, 5 * GIB, &[]);
        let mut c = ready(&server, mode);
        c.request(cmd::WRITE, 0, 0x0042_4948, GIB, u32::MAX);
        // More than the memory limit, so a server that gathered the whole
        // payload before storing it would be caught. Zeros over a hole
        // allocate nothing on disk.
        let sent = RSS_LIMIT + 32 * MIB;
        let piece = vec![0u8; MIB as usize];
        for _ in 0..sent / MIB {
            c.send(&piece);
        }
        drop(c);
        dropped_line(
            &server,
            &format!(
                "client vanished in the middle of a write payload: expected 4294967295 bytes, got {sent}"
            ),
        );
        let hwm = vm_hwm(&server);
        assert!(hwm < RSS_LIMIT, "server peak RSS is {} MiB", hwm / MIB);
        assert_still_serving(&mut server, mode);
    }
}

#[test]
fn unknown_commands_cause_einval_and_the_connection_is_kept() {
    for mode in BOTH {
        let (_dir, _file, mut server) = serve(mode, MIB, &[]);
        let mut c = ready(&server, mode);
        for (i, kind) in [8u16, 123, 0x7fff, 0xfffe].into_iter().enumerate() {
            let handle = 0x554e_4b00 + i as u64;
            c.request(kind, 0, handle, 0, 0);
            let r = c.simple_reply();
            assert_eq!(
                (r.magic, r.error, r.handle),
                (proto::SIMPLE_REPLY_MAGIC, errno::EINVAL, handle),
                "command type {kind}"
            );
            server.wait_log(&format!("unknown command type {kind}; answering EINVAL"));
        }
        // Error order: range before type, magic before range.
        c.request(123, 0, 50, MIB, 1);
        assert_eq!(
            c.simple_reply().error,
            errno::ENOSPC,
            "range is checked first"
        );
        c.write_ok(0, b"kept after unknown commands");
        assert_eq!(c.read_ok(0, 27), b"kept after unknown commands");
        let mut bad = proto::Request::new(123, 0, 51, u64::MAX, 1);
        bad.magic = 0xdead_beef;
        c.send(&bad.encode());
        let r = c.simple_reply();
        assert_eq!(
            (r.error, r.handle),
            (errno::EBADMSG, 51),
            "magic comes first"
        );
        assert!(c.sees_eof());
        server.wait_log("bad request magic: expected 0x25609513, got 0xdeadbeef");
        assert_still_serving(&mut server, mode);
    }
}

#[test]
fn bad_option_magic_causes_close_and_a_log_line() {
    let (_dir, _file, mut server) = serve(Mode::New, MIB, &[]);
    let mut c = negotiating(&server);
    let mut header = OptionHeader {
        option: opt::GO,
        length: 0,
    }
    .encode();
    header[0..8].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
    c.send(&header);
    assert!(closed(&mut c), "closed after a bad option magic");
    dropped_line(
        &server,
        "bad option magic: expected 0x49484156454f5054, got 0x0102030405060708",
    );
    assert_still_serving(&mut server, Mode::New);
}

#[test]
fn unknown_option_causes_err_unsup_and_negotiation_continues() {
    let (_dir, _file, mut server) = serve(Mode::New, MIB, &[]);
    let mut c = negotiating(&server);
    for option in [4u32, 11, 0x1234, 0xffff_ffff] {
        send_option(&mut c, option, b"some data");
        let (h, _) = option_reply(&mut c);
        assert_eq!(h.option, option);
        assert_eq!(h.kind, rep::ERR_UNSUP);
        assert_eq!(h.kind, 0x8000_0001);
        server.wait_log(&format!(
            "client sent option {option}, which we do not support; answering NBD_REP_ERR_UNSUP"
        ));
    }
    // The same connection goes on to transmission.
    newstyle_go(&mut c);
    c.write_ok(0, b"after unknown options");
    assert_eq!(c.read_ok(0, 21), b"after unknown options");
    assert_still_serving(&mut server, Mode::New);
}

#[test]
fn oversized_option_length_causes_close_and_a_log_line() {
    let (_dir, _file, mut server) = serve(Mode::New, MIB, &[]);
    for length in [16 * 1024 + 1, u32::MAX] {
        let mut c = negotiating(&server);
        // Only the header: the server must not wait for (or buffer) the data.
        c.send(
            &OptionHeader {
                option: opt::LIST,
                length,
            }
            .encode(),
        );
        assert!(closed(&mut c), "closed after a {length}-byte option");
        dropped_line(
            &server,
            &format!("option 3 has a {length}-byte payload; the limit is 16384"),
        );
    }
    assert_still_serving(&mut server, Mode::New);
}

#[test]
fn option_flood_causes_close_after_256_options() {
    let (_dir, _file, mut server) = serve(Mode::New, MIB, &[]);
    let mut c = negotiating(&server);
    let mut answered = 0;
    for _ in 0..300 {
        // Writes may fail once the server has closed.
        let b = OptionHeader {
            option: opt::LIST,
            length: 0,
        }
        .encode();
        if c.stream.write_all(&b).is_err() {
            break;
        }
        let mut h = [0u8; 20];
        match c.stream.read_exact(&mut h) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) =>
            {
                break
            }
            Err(e) => panic!("reading option reply: {e}"),
        }
        // LIST: one SERVER reply then an ACK.
        let h = OptionReplyHeader::decode(&h).unwrap();
        assert_eq!(h.kind, rep::SERVER);
        c.read_exact(h.length as usize);
        let (ack, _) = option_reply(&mut c);
        assert_eq!(ack.kind, rep::ACK);
        answered += 1;
    }
    assert_eq!(answered, 256, "every option up to the limit is answered");
    assert!(closed(&mut c), "closed after the flood");
    dropped_line(&server, "client sent more than 256 options");
    assert_still_serving(&mut server, Mode::New);
}

#[test]
fn unknown_client_flags_cause_close_and_a_log_line() {
    let (_dir, _file, mut server) = serve(Mode::New, MIB, &[]);
    let mut c = server.connect();
    newstyle_greeting(&mut c);
    c.send(&(proto::CLIENT_FIXED_NEWSTYLE | 0x8000_0004).to_be_bytes());
    assert!(closed(&mut c));
    dropped_line(
        &server,
        "client flags 0x80000005 include bits we do not know (known: 0x00000003)",
    );
    assert_still_serving(&mut server, Mode::New);
}

#[test]
fn non_fixed_client_sending_a_fixed_only_option_causes_close() {
    let (_dir, _file, mut server) = serve(Mode::New, MIB, &[]);
    let mut c = server.connect();
    newstyle_greeting(&mut c);
    c.send(&0u32.to_be_bytes());
    send_option(&mut c, opt::LIST, &[]);
    assert!(closed(&mut c));
    dropped_line(
        &server,
        "non-fixed newstyle client sent option 3, which only fixed newstyle allows",
    );
    assert_still_serving(&mut server, Mode::New);
}

#[test]
fn truncated_negotiation_then_close_causes_a_vanished_log_line() {
    let (_dir, _file, mut server) = serve(Mode::New, MIB, &[]);
    // Half the client flags.
    let mut c = server.connect();
    newstyle_greeting(&mut c);
    c.send(&[0, 0]);
    drop(c);
    dropped_line(
        &server,
        "client vanished in the middle of the client flags: expected 4 bytes, got 2",
    );
    // Half an option header.
    let mut c = negotiating(&server);
    c.send(&proto::IHAVEOPT.to_be_bytes()[..5]);
    drop(c);
    dropped_line(
        &server,
        "client vanished in the middle of an option header: expected 16 bytes, got 5",
    );
    // Part of an option's data.
    let mut c = negotiating(&server);
    c.send(
        &OptionHeader {
            option: opt::GO,
            length: 100,
        }
        .encode(),
    );
    c.send(&[0u8; 30]);
    drop(c);
    dropped_line(
        &server,
        "client vanished in the middle of option 7's data: expected 100 bytes, got 30",
    );
    assert_still_serving(&mut server, Mode::New);
}

#[test]
fn silent_client_during_negotiation_is_dropped_after_handshake_timeout() {
    let (_dir, _file, mut server) = serve(Mode::New, MIB, &["--handshake-timeout", "0.5"]);
    // One client never answers the greeting, another stops mid-negotiation.
    let start = Instant::now();
    let mut silent = server.connect();
    newstyle_greeting(&mut silent);
    let mut stalled = negotiating(&server);
    send_option(&mut stalled, opt::STRUCTURED_REPLY, &[]);
    assert_eq!(option_reply(&mut stalled).0.kind, rep::ACK);
    // Meanwhile a prompt client is served.
    let mut prompt = ready(&server, Mode::New);
    prompt.write_ok(0, b"prompt");
    for c in [&mut silent, &mut stalled] {
        assert!(closed(c), "a silent client is dropped");
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "dropped after {took:?}, not about 0.5 s"
    );
    assert!(
        took >= Duration::from_millis(400),
        "dropped after only {took:?}"
    );
    dropped_line(&server, "handshake not finished within 0.5 s");
    // The prompt client, now in transmission, is not subject to the limit.
    assert_eq!(prompt.read_ok(0, 6), b"prompt");
    assert_still_serving(&mut server, Mode::New);
}
