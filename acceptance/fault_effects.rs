//! A fault that fires is a fault that happens: for each kind of step (a
//! server send, a server receive, a reply, a step without a message, the
//! `read`/`write` client, the mirror's sends and receives, the proxy and the
//! control socket) the `fault fired:` line is in the log AND its effect is
//! seen from outside, on the wire.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::fakes::{in_background, FakeDest};
use crate::harness::*;
use crate::interop::{assert_mirror_started, mirror, source};
use flexnbd::proto::{self, cmd, opt, rep, OptionReplyHeader};

const MIB: u64 = 1024 * 1024;

/// How long "nothing arrives" is watched for: a deliberate wait, showing
/// that something does NOT happen.
const QUIET: Duration = Duration::from_millis(300);

fn served(tag: &str, extra: &[&str]) -> (TempDir, std::path::PathBuf, Flexnbd) {
    let dir = TempDir::new(tag);
    let file = dir.pattern_file("d.img", MIB, 5);
    let server = Flexnbd::serve(&dir, &file, extra);
    (dir, file, server)
}

fn newstyle_with(plan: &str) -> (TempDir, std::path::PathBuf, Flexnbd) {
    served(
        "effects-newstyle",
        &["--handshake", "newstyle", "--faults", plan],
    )
}

fn oldstyle_with(plan: &str) -> (TempDir, std::path::PathBuf, Flexnbd) {
    served("effects-oldstyle", &["--faults", plan])
}

/// Everything the peer sends until it closes (bounded by the read timeout).
fn until_eof(c: &mut RawClient) -> Vec<u8> {
    let mut got = Vec::new();
    match c.stream.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("reading until EOF (got {} bytes): {e}", got.len()),
    }
    got
}

fn newstyle_greeting() -> Vec<u8> {
    proto::newstyle_greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_vec()
}

/// Reads the 18-byte newstyle greeting and sends fixed-newstyle client flags.
fn greet(c: &mut RawClient) {
    assert_eq!(c.read_exact(18), newstyle_greeting());
    let flags = proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES;
    c.send(&flags.to_be_bytes());
}

/// Reads one option reply header and its data.
fn option_reply(c: &mut RawClient) -> (OptionReplyHeader, Vec<u8>) {
    let h = c.read_exact(20);
    let header = OptionReplyHeader::decode(h.as_slice().try_into().unwrap())
        .expect("an option reply with a good magic");
    let data = c.read_exact(header.length as usize);
    (header, data)
}

// ------------------------------------------------------------ server sends

#[test]
fn newstyle_greeting_drop_sends_nothing_and_keeps_the_socket_open() {
    let (_dir, _file, server) = newstyle_with("server.greeting_send=drop");
    let mut c = server.connect();
    server.assert_fired("server.greeting_send", "drop");
    assert!(
        nothing_arrives(&mut c, QUIET),
        "a dropped greeting is not sent, and the socket is not closed either"
    );
}

#[test]
fn newstyle_greeting_truncate_sends_exactly_n_bytes_then_eof() {
    let (_dir, _file, server) = newstyle_with("server.greeting_send=truncate(5)");
    let mut c = server.connect();
    let got = until_eof(&mut c);
    assert_eq!(got, newstyle_greeting()[..5].to_vec());
    server.assert_fired("server.greeting_send", "truncate(5)");
}

#[test]
fn newstyle_greeting_corrupt_flips_the_first_byte_only() {
    let (_dir, _file, server) = newstyle_with("server.greeting_send#1=corrupt");
    let mut c = server.connect();
    let got = c.read_exact(18);
    let mut expected = newstyle_greeting();
    expected[0] = !expected[0];
    assert_eq!(got, expected);
    server.assert_fired("server.greeting_send#1", "corrupt");
    // Only the first connection's greeting was damaged.
    let mut d = server.connect();
    assert_eq!(d.read_exact(18), newstyle_greeting());
}

#[test]
fn read_reply_corrupt_damages_the_magic_and_keeps_the_rest() {
    let (_dir, file, server) = oldstyle_with("server.reply_send.read#1=corrupt");
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(cmd::READ, 0, 0x42, 512, 16);
    let header = c.read_exact(proto::SIMPLE_REPLY_LEN);
    let mut expected = proto::SimpleReply::new(0, 0x42).encode().to_vec();
    expected[0] = !expected[0];
    assert_eq!(header, expected, "only the magic's first byte differs");
    assert_eq!(c.read_exact(16), read_file_range(&file, 512, 16));
    server.assert_fired("server.reply_send.read#1", "corrupt");
}

#[test]
fn read_reply_truncate_sends_exactly_n_bytes_then_eof() {
    let (_dir, _file, server) = oldstyle_with("server.reply_send.read#1=truncate(10)");
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(cmd::READ, 0, 0x42, 0, 64);
    let got = until_eof(&mut c);
    let full = proto::SimpleReply::new(0, 0x42).encode();
    assert_eq!(got, full[..10].to_vec());
    server.assert_fired("server.reply_send.read#1", "truncate(10)");
}

// --------------------------------------------------------- server receives

#[test]
fn option_received_drop_ignores_that_option_and_answers_the_next() {
    let (_dir, _file, server) = newstyle_with("server.option_received.3#1=drop");
    let mut c = server.connect();
    greet(&mut c);
    send_option(&mut c, opt::LIST, &[]);
    server.assert_fired("server.option_received.3#1", "drop");
    assert!(
        nothing_arrives(&mut c, QUIET),
        "an ignored option gets no reply, and the connection stays open"
    );
    // The next option is read and answered: one export, then the ACK.
    send_option(&mut c, opt::LIST, &[]);
    let (server_reply, _) = option_reply(&mut c);
    assert_eq!(
        (server_reply.option, server_reply.kind),
        (opt::LIST, rep::SERVER)
    );
    let (ack, data) = option_reply(&mut c);
    assert_eq!((ack.kind, data.len()), (rep::ACK, 0));
    assert!(
        nothing_arrives(&mut c, QUIET),
        "one LIST was answered, not two"
    );
}

#[test]
fn option_received_close_ends_the_negotiation_without_a_reply() {
    let (_dir, _file, server) = newstyle_with("server.option_received.3=close");
    let mut c = server.connect();
    greet(&mut c);
    send_option(&mut c, opt::LIST, &[]);
    assert_eq!(until_eof(&mut c), Vec::<u8>::new(), "EOF, no reply");
    server.assert_fired("server.option_received.3", "close");
}

#[test]
fn option_received_corrupt_rejects_the_option_and_closes() {
    let (_dir, _file, server) = newstyle_with("server.option_received.3=corrupt");
    let mut c = server.connect();
    greet(&mut c);
    send_option(&mut c, opt::LIST, &[]);
    assert_eq!(until_eof(&mut c), Vec::<u8>::new(), "EOF, no reply");
    server.assert_fired("server.option_received.3", "corrupt");
    server.wait_log("rejected the message as damaged at server.option_received.3");
}

#[test]
fn request_received_drop_answers_nothing_for_it_and_serves_the_next() {
    let (_dir, _file, server) = oldstyle_with("server.request_received.read#1=drop");
    let mut c = server.connect();
    c.oldstyle_greeting();
    c.request(cmd::READ, 0, 1, 0, 64);
    server.assert_fired("server.request_received.read#1", "drop");
    assert!(
        nothing_arrives(&mut c, QUIET),
        "an ignored request is not answered"
    );
    let reply = {
        c.request(cmd::READ, 0, 2, 0, 64);
        c.simple_reply()
    };
    assert_eq!((reply.handle, reply.error), (2, 0), "the next request is");
}

#[test]
fn accept_drop_has_no_message_to_drop_so_it_closes() {
    let (_dir, _file, server) = oldstyle_with("server.accept#1=drop");
    let mut c = server.connect();
    assert_eq!(until_eof(&mut c), Vec::<u8>::new(), "closed, no greeting");
    server.assert_fired("server.accept#1", "drop");
    server.connect().oldstyle_greeting();
}

// ------------------------------------------------------------------ client

#[test]
fn client_request_send_truncate_leaves_the_server_a_short_header() {
    let (_dir, _file, server) = served("effects-client", &[]);
    let port = server.port().to_string();
    let args = [
        "read",
        "-l",
        "127.0.0.1",
        "-p",
        &port,
        "-F",
        "0",
        "-S",
        "512",
        "--faults",
        "client.request_send.read=truncate(10)",
    ];
    let out = run_tool(BIN, &args, WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("fault fired: client.request_send.read -> truncate(10)"),
        "{stderr}"
    );
    server.wait_log("client vanished in the middle of a request header: expected 28 bytes, got 10");
}

#[test]
fn client_request_send_corrupt_sends_a_bad_magic() {
    let (_dir, _file, server) = served("effects-client", &[]);
    let port = server.port().to_string();
    let args = [
        "write",
        "-l",
        "127.0.0.1",
        "-p",
        &port,
        "-F",
        "0",
        "-S",
        "4",
        "--faults",
        "client.request_send.write=corrupt",
    ];
    let out = run_tool_with_input(BIN, &args, Some(b"abcd"), WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("fault fired: client.request_send.write -> corrupt"),
        "{stderr}"
    );
    let mut bad = proto::REQUEST_MAGIC.to_be_bytes();
    bad[0] = !bad[0];
    server.wait_log(&format!(
        "bad request magic: expected 0x{:08x}, got 0x{:08x}",
        proto::REQUEST_MAGIC,
        u32::from_be_bytes(bad)
    ));
}

// ------------------------------------------------------------------ mirror

#[test]
fn mirror_payload_truncate_sends_the_header_then_n_payload_bytes_then_eof() {
    let src = source(
        "effects-mirror-send",
        MIB,
        &[(
            "FLEXNBD_FAULTS",
            "mirror.payload_send.write#1=truncate(100)",
        )],
    );
    let dest = FakeDest::bind();
    let d = dest.try_clone();
    let script = in_background(move || {
        let mut c = d.expect_connection(WAIT);
        c.send_c_greeting(MIB);
        let request = c.read_request().expect("a request header");
        let mut rest = Vec::new();
        match c.stream.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("reading the payload: {e}"),
        }
        (request, rest)
    });
    let out = mirror(&src.sock, dest.port(), false);
    assert_mirror_started(&out);
    let (request, rest) = script.join_within(WAIT);
    assert_eq!(request.kind, cmd::WRITE);
    assert_eq!(request.magic, proto::REQUEST_MAGIC, "the header is whole");
    assert!(request.length > 100, "a write longer than the cut");
    assert_eq!(
        rest,
        read_file_range(&src.file, request.offset, 100),
        "exactly 100 payload bytes, then EOF"
    );
    src.server
        .assert_fired("mirror.payload_send.write#1", "truncate(100)");
}

#[test]
fn mirror_reply_drop_leaves_the_write_unacknowledged_until_the_request_limit() {
    let limit_secs = 2;
    let limit = limit_secs.to_string();
    let src = source(
        "effects-mirror-recv",
        MIB,
        &[
            ("FLEXNBD_FAULTS", "mirror.reply_received.write#1=drop"),
            ("FLEXNBD_MS_REQUEST_LIMIT_SECS", &limit),
        ],
    );
    let dest = FakeDest::bind();
    let d = dest.try_clone();
    // Answers every request at once, so only an ignored reply can keep the
    // source from handing off; records what it saw until the source closes.
    let script = in_background(move || {
        let mut c = d.expect_connection(WAIT);
        c.send_c_greeting(MIB);
        let mut kinds = Vec::new();
        let mut first_reply = None;
        while let Some(seen) = c.read_seen() {
            kinds.push(seen.request.kind);
            if seen.request.kind == cmd::DISC {
                break;
            }
            c.reply(0, seen.request.handle);
            first_reply.get_or_insert_with(Instant::now);
        }
        (kinds, first_reply.map(|at| at.elapsed()))
    });
    let out = mirror(&src.sock, dest.port(), false);
    assert_mirror_started(&out);
    let (kinds, since_first_reply) = script.join_within(WAIT);
    assert!(
        kinds.iter().all(|k| *k == cmd::WRITE || *k == cmd::FLUSH),
        "no hand-off while a write is unacknowledged: {kinds:?}"
    );
    let waited = since_first_reply.expect("the source sent a write");
    assert!(
        waited >= Duration::from_secs(limit_secs) - Duration::from_millis(200),
        "the connection was closed {waited:?} after the reply, before the request limit"
    );
    src.server
        .assert_fired("mirror.reply_received.write#1", "drop");
    src.server.wait_log("request timeout");
}

// ------------------------------------------------------------------- proxy

fn proxy_with(dir: &TempDir, upstream: &Flexnbd, plan: &str) -> Flexnbd {
    let port = upstream.port().to_string();
    let args: Vec<String> = [
        "-l",
        "127.0.0.1",
        "-p",
        "0",
        "-C",
        "127.0.0.1",
        "-P",
        &port,
        "-v",
        "--faults",
        plan,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Flexnbd::spawn_program(dir, env!("CARGO_BIN_EXE_flexnbd-proxy"), &args)
}

#[test]
fn proxy_request_drop_is_not_answered_and_the_next_request_is() {
    let (dir, file, upstream) = served("effects-proxy", &[]);
    let p = proxy_with(&dir, &upstream, "proxy.request_received.read#1=drop");
    let mut c = p.connect();
    c.oldstyle_greeting();
    c.request(cmd::READ, 0, 1, 0, 64);
    p.assert_fired("proxy.request_received.read#1", "drop");
    assert!(
        nothing_arrives(&mut c, QUIET),
        "an ignored request is not answered"
    );
    c.request(cmd::READ, 0, 2, 64, 64);
    let r = c.simple_reply();
    assert_eq!((r.handle, r.error), (2, 0));
    assert_eq!(c.read_exact(64), read_file_range(&file, 64, 64));
}

#[test]
fn proxy_reply_corrupt_damages_the_magic_and_keeps_the_rest() {
    let (dir, file, upstream) = served("effects-proxy", &[]);
    let p = proxy_with(&dir, &upstream, "proxy.reply_send.read#1=corrupt");
    let mut c = p.connect();
    c.oldstyle_greeting();
    c.request(cmd::READ, 0, 7, 0, 32);
    let mut expected = proto::SimpleReply::new(0, 7).encode().to_vec();
    expected[0] = !expected[0];
    assert_eq!(c.read_exact(proto::SIMPLE_REPLY_LEN), expected);
    assert_eq!(c.read_exact(32), read_file_range(&file, 0, 32));
    p.assert_fired("proxy.reply_send.read#1", "corrupt");
}

// ----------------------------------------------------------------- control

/// A control connection that sent `status` and is waiting for the answer.
fn status_request(sock: &std::path::Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s.write_all(b"status\n\n").unwrap();
    s
}

#[test]
fn control_drop_ignores_the_command_and_reads_on_until_the_client_leaves() {
    let dir = TempDir::new("effects-control");
    let file = dir.pattern_file("d.img", MIB, 5);
    let sock = dir.join("ctl.sock");
    let server = Flexnbd::serve(
        &dir,
        &file,
        &[
            "-s",
            sock.to_str().unwrap(),
            "--faults",
            "control.status#1=drop",
        ],
    );
    let mut s = status_request(&sock);
    server.assert_fired("control.status#1", "drop");
    s.set_read_timeout(Some(QUIET)).unwrap();
    let mut b = [0u8; 64];
    assert!(
        matches!(s.read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut),
        "an ignored command gets no answer and the connection stays open"
    );
    // Once the client stops sending, there is nothing more to read: the
    // server closes without answering.
    s.shutdown(Shutdown::Write).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert!(
        got.is_empty(),
        "no answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    // The next status is answered.
    let mut s = status_request(&sock);
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert!(got.starts_with("0: pid="), "{got}");
}
