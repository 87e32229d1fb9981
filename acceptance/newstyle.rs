//! `flexnbd serve --handshake newstyle` on the wire, byte by byte.
//!
//! Simulated: an NBD client written with std TCP and the project's codec,
//! which sends exactly the options and requests under test (including
//! malformed and out-of-order ones) against the real binary.
//!
//! What must happen: the server follows the fixed newstyle negotiation of the
//! NBD protocol (18-byte greeting, LIST, INFO/GO with export and block size
//! information, EXPORT_NAME with or without the 124 zeros, ABORT, structured
//! replies, base:allocation metadata contexts, ERR_UNSUP for unknown options
//! without ending the negotiation), and in transmission answers with
//! structured chunks (data and hole chunks at the right offsets, DONE on the
//! last one, DF as one chunk, error chunks with the errno) only when they were
//! negotiated, and with simple replies otherwise.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::harness::*;
use flexnbd::proto::{
    self, chunk, cmd, cmd_flags, errno, flags, info, opt, rep, ChunkHeader, InfoRequest,
    MetaContextRequest, OptionReplyHeader,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// The transmission flags the server must advertise without structured
/// replies: everything it implements except DF.
const BASE_FLAGS: u16 = flags::HAS_FLAGS
    | flags::SEND_FLUSH
    | flags::SEND_FUA
    | flags::SEND_TRIM
    | flags::SEND_WRITE_ZEROES
    | flags::CAN_MULTI_CONN
    | flags::SEND_CACHE;

const BOTH_CLIENT_FLAGS: u32 = proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES;

fn serve_newstyle(dir: &TempDir, file: &Path) -> Flexnbd {
    Flexnbd::serve(dir, file, &["--handshake", "newstyle"])
}

fn served(size: u64) -> (TempDir, Flexnbd) {
    let dir = TempDir::new("newstyle");
    let file = dir.sparse_file("disk.img", size);
    let server = serve_newstyle(&dir, &file);
    (dir, server)
}

/// A 1 MiB image: data at [0, 64K) and [512K, 576K), holes elsewhere.
/// Returns the path and the full expected contents.
fn data_and_holes(dir: &TempDir) -> (PathBuf, Vec<u8>) {
    let path = dir.join("holes.img");
    let f = File::create(&path).unwrap();
    f.set_len(MIB).unwrap();
    let mut expected = vec![0u8; MIB as usize];
    for (at, seed) in [(0u64, 11u8), (512 * KIB, 12)] {
        let data = pattern(64 * KIB as usize, seed);
        f.write_all_at(&data, at).unwrap();
        expected[at as usize..at as usize + data.len()].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
    (path, expected)
}

/// Reads and checks the 18-byte greeting, then sends the client flags.
fn greet(c: &mut RawClient, client_flags: u32) {
    let g = c.read_exact(18);
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(
        u16::from_be_bytes([g[16], g[17]]),
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
    );
    c.send(&client_flags.to_be_bytes());
}

/// Reads one option reply, checks its magic and that it answers `option`,
/// and returns its type and data.
fn option_reply(c: &mut RawClient, option: u32) -> (u32, Vec<u8>) {
    let h = c.read_exact(20);
    let header =
        OptionReplyHeader::decode(h.as_slice().try_into().unwrap()).expect("option reply magic");
    assert_eq!(header.option, option, "reply names the option it answers");
    let data = c.read_exact(header.length as usize);
    (header.kind, data)
}

fn expect_ack(c: &mut RawClient, option: u32) {
    let (kind, data) = option_reply(c, option);
    assert_eq!((kind, data.len()), (rep::ACK, 0), "ACK to option {option}");
}

fn expect_error(c: &mut RawClient, option: u32, error: u32) {
    let (kind, data) = option_reply(c, option);
    assert_eq!(
        kind,
        error,
        "option {option}: expected error 0x{error:08x}, got 0x{kind:08x} ({:?})",
        String::from_utf8_lossy(&data)
    );
}

fn meta_request(queries: &[&str]) -> Vec<u8> {
    MetaContextRequest {
        name: Vec::new(),
        queries: queries.iter().map(|q| q.as_bytes().to_vec()).collect(),
    }
    .encode()
}

/// What INFO/GO told: export (size, flags), block sizes (min, preferred,
/// max), and any other info items.
type InfoReplies = ((u64, u16), (u32, u32, u32), Vec<Vec<u8>>);

/// Collects the INFO replies to INFO/GO up to the ACK.
fn info_replies(c: &mut RawClient, option: u32) -> InfoReplies {
    let mut export = None;
    let mut sizes = None;
    let mut others = Vec::new();
    loop {
        let (kind, data) = option_reply(c, option);
        match kind {
            rep::ACK => {
                assert!(data.is_empty());
                break;
            }
            rep::INFO => {
                assert!(data.len() >= 2, "INFO reply carries its type");
                match u16::from_be_bytes([data[0], data[1]]) {
                    info::EXPORT => {
                        assert!(export.is_none(), "one NBD_INFO_EXPORT");
                        export = Some(proto::decode_info_export(&data).expect("12-byte export"));
                    }
                    info::BLOCK_SIZE => {
                        assert_eq!(data.len(), 14, "NBD_INFO_BLOCK_SIZE is 14 bytes");
                        let u =
                            |at: usize| u32::from_be_bytes(data[at..at + 4].try_into().unwrap());
                        sizes = Some((u(2), u(6), u(10)));
                    }
                    _ => others.push(data),
                }
            }
            other => panic!("unexpected reply 0x{other:08x} to option {option}"),
        }
    }
    (
        export.expect("NBD_INFO_EXPORT before the ACK"),
        sizes.expect("NBD_INFO_BLOCK_SIZE before the ACK"),
        others,
    )
}

fn go_request() -> Vec<u8> {
    InfoRequest {
        name: Vec::new(),
        requests: Vec::new(),
    }
    .encode()
}

/// Negotiates to transmission with GO; returns (size, transmission flags).
fn go(c: &mut RawClient, structured: bool, base_allocation: bool) -> (u64, u16) {
    greet(c, BOTH_CLIENT_FLAGS);
    if structured {
        send_option(c, opt::STRUCTURED_REPLY, &[]);
        expect_ack(c, opt::STRUCTURED_REPLY);
    }
    if base_allocation {
        send_option(
            c,
            opt::SET_META_CONTEXT,
            &meta_request(&[proto::BASE_ALLOCATION]),
        );
        let (kind, data) = option_reply(c, opt::SET_META_CONTEXT);
        assert_eq!(kind, rep::META_CONTEXT);
        assert_eq!(&data[4..], proto::BASE_ALLOCATION.as_bytes());
        assert_eq!(
            u32::from_be_bytes(data[0..4].try_into().unwrap()),
            proto::BASE_ALLOCATION_ID
        );
        expect_ack(c, opt::SET_META_CONTEXT);
    }
    send_option(c, opt::GO, &go_request());
    info_replies(c, opt::GO).0
}

/// Reads one structured chunk (header and payload).
fn read_chunk(c: &mut RawClient) -> (ChunkHeader, Vec<u8>) {
    let h = c.read_exact(proto::STRUCTURED_HEADER_LEN);
    let header = ChunkHeader::decode(h.as_slice().try_into().unwrap())
        .unwrap_or_else(|| panic!("structured reply magic expected, got header {h:02x?}"));
    let payload = c.read_exact(header.length as usize);
    (header, payload)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Checks an error chunk and returns (errno, message).
fn error_chunk(header: &ChunkHeader, payload: &[u8], handle: u64) -> (u32, String) {
    assert_eq!(header.kind, chunk::ERROR, "error chunk expected");
    assert!(header.done(), "an error chunk here is the last chunk");
    assert_eq!(header.handle, handle);
    assert!(payload.len() >= 6);
    let msg_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
    assert_eq!(
        payload.len(),
        6 + msg_len,
        "message length matches the chunk"
    );
    (
        be_u32(payload, 0),
        String::from_utf8_lossy(&payload[6..]).into_owned(),
    )
}

/// Reads a whole structured READ reply, checking that chunks stay inside
/// the request, never overlap, cover it all, and only the last has DONE.
/// Returns the reassembled bytes and the chunks as (kind, offset, length).
fn structured_read(
    c: &mut RawClient,
    handle: u64,
    offset: u64,
    length: u32,
) -> (Vec<u8>, Vec<(u16, u64, u64)>) {
    let mut data = vec![0u8; length as usize];
    let mut covered = vec![false; length as usize];
    let mut chunks = Vec::new();
    loop {
        let (h, p) = read_chunk(c);
        assert_eq!(h.handle, handle);
        let (at, len) = match h.kind {
            chunk::OFFSET_DATA => {
                let at = be_u64(&p, 0);
                let len = p.len() as u64 - 8;
                let rel = (at - offset) as usize;
                data[rel..rel + len as usize].copy_from_slice(&p[8..]);
                (at, len)
            }
            chunk::OFFSET_HOLE => {
                assert_eq!(p.len(), 12, "hole chunk payload is offset + size");
                (be_u64(&p, 0), u64::from(be_u32(&p, 8)))
            }
            chunk::NONE => {
                assert!(p.is_empty());
                assert!(h.done());
                break;
            }
            other => panic!("unexpected chunk type {other} in a READ reply"),
        };
        assert!(len > 0, "every content chunk describes at least one byte");
        assert!(
            at >= offset && at + len <= offset + u64::from(length),
            "chunk [{at}, +{len}) is inside the request"
        );
        for b in &mut covered[(at - offset) as usize..(at - offset + len) as usize] {
            assert!(!*b, "chunks overlap at offset {at}");
            *b = true;
        }
        chunks.push((h.kind, at, len));
        if h.done() {
            break;
        }
    }
    assert!(covered.iter().all(|&b| b), "chunks cover the whole request");
    (data, chunks)
}

/// Reads a BLOCK_STATUS reply: (context id, [(length, flags)]).
fn block_status_reply(c: &mut RawClient, handle: u64) -> (u32, Vec<(u32, u32)>) {
    let (h, p) = read_chunk(c);
    assert_eq!(h.kind, chunk::BLOCK_STATUS, "block status chunk");
    assert!(h.done(), "one context, so its chunk is the last");
    assert_eq!(h.handle, handle);
    assert_eq!((p.len() - 4) % 8, 0);
    let descriptors = p[4..]
        .chunks(8)
        .map(|d| (be_u32(d, 0), be_u32(d, 4)))
        .collect();
    (be_u32(&p, 0), descriptors)
}

#[test]
fn greeting_is_18_bytes_with_fixed_newstyle_and_no_zeroes() {
    let (_dir, server) = served(MIB);
    let mut c = server.connect();
    let g = c.read_exact(18);
    assert_eq!(
        g,
        [
            b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
            b'P', b'T', 0, 3
        ]
    );
    // The server then waits for our flags: nothing more arrives until we send.
    c.stream
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    let mut extra = [0u8; 1];
    assert!(
        std::io::Read::read(&mut c.stream, &mut extra).is_err(),
        "no bytes beyond the 18-byte greeting"
    );
    server.assert_no_panic();
}

#[test]
fn list_names_one_export_the_empty_name_and_refuses_data() {
    let (_dir, server) = served(MIB);
    let mut c = server.connect();
    greet(&mut c, BOTH_CLIENT_FLAGS);
    send_option(&mut c, opt::LIST, &[]);
    let (kind, data) = option_reply(&mut c, opt::LIST);
    assert_eq!(kind, rep::SERVER);
    assert_eq!(data, 0u32.to_be_bytes(), "one export, named \"\"");
    expect_ack(&mut c, opt::LIST);
    // LIST takes no data.
    send_option(&mut c, opt::LIST, b"junk");
    expect_error(&mut c, opt::LIST, rep::ERR_INVALID);
    // The negotiation goes on.
    let (kind, _) = {
        send_option(&mut c, opt::LIST, &[]);
        option_reply(&mut c, opt::LIST)
    };
    assert_eq!(kind, rep::SERVER);
    expect_ack(&mut c, opt::LIST);
}

#[test]
fn info_reports_export_and_block_sizes_and_go_enters_transmission() {
    let (_dir, server) = served(3 * MIB);
    let mut c = server.connect();
    greet(&mut c, BOTH_CLIENT_FLAGS);

    // INFO: export, block sizes, then ACK; the negotiation continues.
    send_option(&mut c, opt::INFO, &go_request());
    let (export, sizes, others) = info_replies(&mut c, opt::INFO);
    assert_eq!(export, (3 * MIB, BASE_FLAGS));
    assert_eq!(sizes, (1, 4096, 32 * 1024 * 1024));
    assert!(
        others.is_empty(),
        "nothing was asked for beyond the defaults"
    );

    // A client asking for NBD_INFO_NAME gets it.
    let with_name = InfoRequest {
        name: Vec::new(),
        requests: vec![info::NAME],
    }
    .encode();
    send_option(&mut c, opt::INFO, &with_name);
    let (_, _, others) = info_replies(&mut c, opt::INFO);
    assert_eq!(others, vec![info::NAME.to_be_bytes().to_vec()]);

    // A malformed INFO is refused and the negotiation still continues.
    send_option(&mut c, opt::INFO, &[0, 0, 0, 9, b'x']);
    expect_error(&mut c, opt::INFO, rep::ERR_INVALID);

    // GO: the same information, then transmission.
    send_option(&mut c, opt::GO, &go_request());
    let (export, sizes, _) = info_replies(&mut c, opt::GO);
    assert_eq!(export, (3 * MIB, BASE_FLAGS));
    assert_eq!(sizes, (1, 4096, 32 * 1024 * 1024));
    c.write_ok(MIB + 7, b"after GO");
    assert_eq!(c.read_ok(MIB + 7, 8), b"after GO");
}

#[test]
fn listen_offers_its_extensions_to_a_client_that_lists_them_and_serve_offers_none() {
    // docs/handoff.md, "Resuming": the information request FLEXNBD is
    // answered by a destination (`listen`) with its extension bits, and
    // ignored by `serve`; nobody gets it without asking.
    let dir = TempDir::new("newstyle-offer");
    let asking = InfoRequest {
        name: Vec::new(),
        requests: vec![info::FLEXNBD],
    }
    .encode();
    let ask = |server: &Flexnbd, request: &[u8]| {
        let mut c = server.connect();
        greet(&mut c, BOTH_CLIENT_FLAGS);
        send_option(&mut c, opt::INFO, request);
        info_replies(&mut c, opt::INFO).2
    };
    let served = serve_newstyle(&dir, &dir.sparse_file("served.img", MIB));
    assert!(ask(&served, &asking).is_empty(), "serve offers nothing");
    let args = server_args(
        "listen",
        &dir.sparse_file("dest.img", MIB),
        None,
        &["--handshake", "newstyle"],
    );
    let listening = Flexnbd::spawn(&dir, &args);
    assert!(
        ask(&listening, &go_request()).is_empty(),
        "nothing unasked for"
    );
    // `listen` has one slot: the next connection is refused until the
    // server has seen this one end (a race under load, otherwise).
    listening.wait_log("dropped: handshake failed");
    assert_eq!(
        ask(&listening, &asking),
        vec![proto::info_flexnbd(proto::ext::LISTEN).to_vec()]
    );
}

#[test]
fn export_name_sends_size_flags_and_124_zeros_unless_no_zeroes() {
    let (_dir, server) = served(2 * MIB);
    for client_flags in [proto::CLIENT_FIXED_NEWSTYLE, BOTH_CLIENT_FLAGS] {
        let mut c = server.connect();
        greet(&mut c, client_flags);
        send_option(&mut c, opt::EXPORT_NAME, b"any name");
        let reply = c.read_exact(10);
        assert_eq!(be_u64(&reply, 0), 2 * MIB);
        assert_eq!(u16::from_be_bytes([reply[8], reply[9]]), BASE_FLAGS);
        if client_flags & proto::CLIENT_NO_ZEROES == 0 {
            assert_eq!(c.read_exact(124), vec![0u8; 124], "124 zero bytes");
        }
        // The very next bytes are a reply to our first request: had the
        // server sent zeros (or not sent them) wrongly, this would misparse.
        c.write_ok(4096, b"exported");
        assert_eq!(c.read_ok(4096, 8), b"exported");
    }
}

#[test]
fn abort_is_acknowledged_then_the_connection_closes() {
    let (_dir, server) = served(MIB);
    let mut c = server.connect();
    greet(&mut c, BOTH_CLIENT_FLAGS);
    send_option(&mut c, opt::ABORT, &[]);
    expect_ack(&mut c, opt::ABORT);
    assert!(c.sees_eof(), "the server closes after acknowledging ABORT");
    // The server keeps serving others.
    let mut other = server.connect();
    go(&mut other, false, false);
}

#[test]
fn structured_reply_is_acked_refused_with_data_and_adds_send_df() {
    let (_dir, server) = served(MIB);
    let mut c = server.connect();
    greet(&mut c, BOTH_CLIENT_FLAGS);
    send_option(&mut c, opt::STRUCTURED_REPLY, b"x");
    expect_error(&mut c, opt::STRUCTURED_REPLY, rep::ERR_INVALID);
    // A refused STRUCTURED_REPLY negotiates nothing: no DF yet.
    send_option(&mut c, opt::INFO, &go_request());
    assert_eq!(info_replies(&mut c, opt::INFO).0 .1, BASE_FLAGS);
    send_option(&mut c, opt::STRUCTURED_REPLY, &[]);
    expect_ack(&mut c, opt::STRUCTURED_REPLY);
    send_option(&mut c, opt::GO, &go_request());
    let (_, flags) = info_replies(&mut c, opt::GO).0;
    assert_eq!(flags, BASE_FLAGS | proto::flags::SEND_DF);

    // EXPORT_NAME advertises DF the same way.
    let mut e = server.connect();
    greet(&mut e, BOTH_CLIENT_FLAGS);
    send_option(&mut e, opt::STRUCTURED_REPLY, &[]);
    expect_ack(&mut e, opt::STRUCTURED_REPLY);
    send_option(&mut e, opt::EXPORT_NAME, &[]);
    let reply = e.read_exact(10);
    assert_eq!(
        u16::from_be_bytes([reply[8], reply[9]]),
        BASE_FLAGS | flags::SEND_DF
    );
}

#[test]
fn send_df_is_advertised_only_with_structured_replies() {
    let (_dir, server) = served(MIB);
    let (_, simple) = go(&mut server.connect(), false, false);
    assert_eq!(simple, BASE_FLAGS);
    assert_eq!(simple & flags::SEND_DF, 0);
    let (_, structured) = go(&mut server.connect(), true, false);
    assert_eq!(structured, BASE_FLAGS | flags::SEND_DF);
}

#[test]
fn meta_context_options_need_structured_replies_and_valid_lengths() {
    let (_dir, server) = served(MIB);
    let mut c = server.connect();
    greet(&mut c, BOTH_CLIENT_FLAGS);
    let base = meta_request(&[proto::BASE_ALLOCATION]);

    // Before STRUCTURED_REPLY both are refused.
    send_option(&mut c, opt::SET_META_CONTEXT, &base);
    expect_error(&mut c, opt::SET_META_CONTEXT, rep::ERR_INVALID);
    send_option(&mut c, opt::LIST_META_CONTEXT, &base);
    expect_error(&mut c, opt::LIST_META_CONTEXT, rep::ERR_INVALID);

    send_option(&mut c, opt::STRUCTURED_REPLY, &[]);
    expect_ack(&mut c, opt::STRUCTURED_REPLY);

    // LIST with no queries, with "base:", and with the full name: the one
    // context, with the reserved id 0.
    for queries in [&[][..], &["base:"][..], &[proto::BASE_ALLOCATION][..]] {
        send_option(&mut c, opt::LIST_META_CONTEXT, &meta_request(queries));
        let (kind, data) = option_reply(&mut c, opt::LIST_META_CONTEXT);
        assert_eq!(kind, rep::META_CONTEXT, "LIST {queries:?}");
        assert_eq!(be_u32(&data, 0), 0, "LIST replies carry id 0");
        assert_eq!(&data[4..], proto::BASE_ALLOCATION.as_bytes());
        expect_ack(&mut c, opt::LIST_META_CONTEXT);
    }

    // Unknown namespaces are ignored: just the ACK.
    for option in [opt::LIST_META_CONTEXT, opt::SET_META_CONTEXT] {
        send_option(
            &mut c,
            option,
            &meta_request(&["qemu:dirty-bitmap:x", "nosuch:thing"]),
        );
        expect_ack(&mut c, option);
    }

    // Bad lengths: a query longer than the data, a name longer than the
    // data, trailing bytes, a missing count.
    let mut query_too_long = Vec::new();
    query_too_long.extend_from_slice(&0u32.to_be_bytes());
    query_too_long.extend_from_slice(&1u32.to_be_bytes());
    query_too_long.extend_from_slice(&100u32.to_be_bytes());
    query_too_long.extend_from_slice(b"base:allocation");
    let mut trailing = base.clone();
    trailing.push(0);
    let bad: [&[u8]; 4] = [
        &query_too_long,
        &[0, 0, 0, 50, b'a'],
        &trailing,
        &[0, 0, 0, 0],
    ];
    for data in bad {
        for option in [opt::LIST_META_CONTEXT, opt::SET_META_CONTEXT] {
            send_option(&mut c, option, data);
            expect_error(&mut c, option, rep::ERR_INVALID);
        }
    }

    // SET base:allocation selects it with a non-zero id.
    send_option(&mut c, opt::SET_META_CONTEXT, &base);
    let (kind, data) = option_reply(&mut c, opt::SET_META_CONTEXT);
    assert_eq!(kind, rep::META_CONTEXT);
    let id = be_u32(&data, 0);
    assert_ne!(id, 0);
    assert_eq!(&data[4..], proto::BASE_ALLOCATION.as_bytes());
    expect_ack(&mut c, opt::SET_META_CONTEXT);

    // Transmission: BLOCK_STATUS answers with the id the server gave.
    send_option(&mut c, opt::GO, &go_request());
    info_replies(&mut c, opt::GO);
    c.request(cmd::BLOCK_STATUS, 0, 42, 0, 4096);
    let (got_id, descriptors) = block_status_reply(&mut c, 42);
    assert_eq!(got_id, id);
    assert_eq!(descriptors.iter().map(|d| d.0).sum::<u32>(), 4096);
}

#[test]
fn a_later_set_meta_context_replaces_the_selection() {
    // SET replaces all earlier selections, even when it selects nothing:
    // BLOCK_STATUS is then refused.
    let (_dir, server) = served(MIB);
    let mut c = server.connect();
    go_with(&mut c, |c| {
        send_option(c, opt::SET_META_CONTEXT, &meta_request(&["nosuch:x"]));
        expect_ack(c, opt::SET_META_CONTEXT);
    });
    c.request(cmd::BLOCK_STATUS, 0, 5, 0, 4096);
    let (h, p) = read_chunk(&mut c);
    assert_eq!(error_chunk(&h, &p, 5).0, errno::EINVAL);
}

/// Structured replies and base:allocation, then `more` options, then GO.
fn go_with(c: &mut RawClient, more: impl FnOnce(&mut RawClient)) {
    greet(c, BOTH_CLIENT_FLAGS);
    send_option(c, opt::STRUCTURED_REPLY, &[]);
    expect_ack(c, opt::STRUCTURED_REPLY);
    send_option(
        c,
        opt::SET_META_CONTEXT,
        &meta_request(&[proto::BASE_ALLOCATION]),
    );
    assert_eq!(option_reply(c, opt::SET_META_CONTEXT).0, rep::META_CONTEXT);
    expect_ack(c, opt::SET_META_CONTEXT);
    more(c);
    send_option(c, opt::GO, &go_request());
    info_replies(c, opt::GO);
}

#[test]
fn unknown_option_gets_err_unsup_and_negotiation_continues() {
    let (_dir, server) = served(MIB);
    let mut c = server.connect();
    greet(&mut c, BOTH_CLIENT_FLAGS);
    for option in [0u32, 4, 99, opt::STARTTLS, 0x7fff_ffff] {
        send_option(&mut c, option, b"some data");
        expect_error(&mut c, option, rep::ERR_UNSUP);
    }
    send_option(&mut c, opt::GO, &go_request());
    info_replies(&mut c, opt::GO);
    c.write_ok(0, b"still negotiated fine");
    server.wait_log("which we do not support");
}

#[test]
fn structured_read_gives_data_and_hole_chunks_at_the_right_offsets() {
    let dir = TempDir::new("ns-holes");
    let (file, expected) = data_and_holes(&dir);
    let server = serve_newstyle(&dir, &file);
    server.wait_log("allocation map built");
    let mut c = server.connect();
    go(&mut c, true, false);

    // Data then a hole: [32K, 64K) is data, [64K, 160K) a hole.
    c.request(cmd::READ, 0, 1, 32 * KIB, 128 * 1024);
    let (h, p) = read_chunk(&mut c);
    assert_eq!((h.kind, h.handle, h.done()), (chunk::OFFSET_DATA, 1, false));
    assert_eq!(be_u64(&p, 0), 32 * KIB);
    assert_eq!(&p[8..], &expected[32 * 1024..64 * 1024]);
    let (h, p) = read_chunk(&mut c);
    assert_eq!((h.kind, h.handle, h.done()), (chunk::OFFSET_HOLE, 1, true));
    assert_eq!(p.len(), 12);
    assert_eq!(be_u64(&p, 0), 64 * KIB);
    assert_eq!(be_u32(&p, 8), 96 * 1024);

    // A hole then data: [480K, 512K) hole, [512K, 544K) data.
    c.request(cmd::READ, 0, 2, 480 * KIB, 64 * 1024);
    let (h, p) = read_chunk(&mut c);
    assert_eq!((h.kind, h.done()), (chunk::OFFSET_HOLE, false));
    assert_eq!((be_u64(&p, 0), be_u32(&p, 8)), (480 * KIB, 32 * 1024));
    let (h, p) = read_chunk(&mut c);
    assert_eq!((h.kind, h.done()), (chunk::OFFSET_DATA, true));
    assert_eq!(be_u64(&p, 0), 512 * KIB);
    assert_eq!(&p[8..], &expected[512 * 1024..544 * 1024]);

    // The whole image reassembles to the file's contents.
    c.request(cmd::READ, 0, 3, 0, MIB as u32);
    let (data, chunks) = structured_read(&mut c, 3, 0, MIB as u32);
    assert_eq!(data, expected);
    assert_eq!(
        chunks,
        vec![
            (chunk::OFFSET_DATA, 0, 64 * KIB),
            (chunk::OFFSET_HOLE, 64 * KIB, 448 * KIB),
            (chunk::OFFSET_DATA, 512 * KIB, 64 * KIB),
            (chunk::OFFSET_HOLE, 576 * KIB, 448 * KIB),
        ]
    );
}

#[test]
fn read_with_df_is_one_data_chunk_holes_included() {
    let dir = TempDir::new("ns-df");
    let (file, expected) = data_and_holes(&dir);
    let server = serve_newstyle(&dir, &file);
    server.wait_log("allocation map built");
    let mut c = server.connect();
    go(&mut c, true, false);
    c.request(cmd::READ, cmd_flags::DF, 7, 32 * KIB, 128 * 1024);
    let (h, p) = read_chunk(&mut c);
    assert_eq!((h.kind, h.handle, h.done()), (chunk::OFFSET_DATA, 7, true));
    assert_eq!(p.len(), 8 + 128 * 1024);
    assert_eq!(be_u64(&p, 0), 32 * KIB);
    assert_eq!(&p[8..], &expected[32 * 1024..160 * 1024]);
    // Nothing else belongs to that reply: the next reply is for handle 8.
    c.request(cmd::READ, cmd_flags::DF, 8, 0, 16);
    let (h, p) = read_chunk(&mut c);
    assert_eq!((h.kind, h.handle, h.done()), (chunk::OFFSET_DATA, 8, true));
    assert_eq!(&p[8..], &expected[..16]);
}

#[test]
fn read_with_df_larger_than_a_piece_ends_with_a_none_chunk() {
    // A DF chunk over 1 MiB is streamed while being read, so it cannot
    // promise DONE (a disk error may still follow): NONE ends the reply.
    let dir = TempDir::new("ns-df-big");
    let file = dir.pattern_file("big.img", 4 * MIB, 21);
    let expected = std::fs::read(&file).unwrap();
    let server = serve_newstyle(&dir, &file);
    let mut c = server.connect();
    go(&mut c, true, false);
    c.request(cmd::READ, cmd_flags::DF, 9, 1000, 3 * MIB as u32);
    let (h, p) = read_chunk(&mut c);
    assert_eq!((h.kind, h.handle, h.done()), (chunk::OFFSET_DATA, 9, false));
    assert_eq!(be_u64(&p, 0), 1000);
    assert_eq!(&p[8..], &expected[1000..1000 + 3 * MIB as usize]);
    let (h, p) = read_chunk(&mut c);
    assert_eq!(
        (h.kind, h.handle, h.done(), p.len()),
        (chunk::NONE, 9, true, 0)
    );
    // libnbd accepts the framing too.
    let script = "seen = []\n\
        def chunk(buf, offset, status, err):\n    seen.append((offset, len(buf), status))\n    return 0\n\
        buf = h.pread_structured(3 * 1024 * 1024, 1000, chunk, nbd.CMD_FLAG_DF)\n\
        print(len(buf), seen)";
    let out = nbdsh(&server.uri(), script);
    // One data chunk (status 1 = NBD_READ_DATA) covering the whole read.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{} [(1000, {}, 1)]", 3 * MIB, 3 * MIB)
    );
}

#[test]
fn read_of_length_zero_is_answered_in_both_reply_styles() {
    let (_dir, server) = served(MIB);
    let mut s = server.connect();
    go(&mut s, true, false);
    s.request(cmd::READ, 0, 3, 4096, 0);
    let (h, p) = read_chunk(&mut s);
    assert_eq!((h.kind, h.handle, h.done()), (chunk::NONE, 3, true));
    assert!(p.is_empty());
    s.write_ok(0, b"in sync");

    let mut plain = server.connect();
    go(&mut plain, false, false);
    plain.request(cmd::READ, 0, 4, 4096, 0);
    let r = plain.simple_reply();
    assert_eq!(
        (r.magic, r.error, r.handle),
        (proto::SIMPLE_REPLY_MAGIC, 0, 4)
    );
    // No payload followed: the next reply parses.
    assert_eq!(plain.read_ok(0, 7), b"in sync");
}

#[test]
fn block_status_without_a_meta_context_is_einval() {
    let (_dir, server) = served(MIB);
    let mut c = server.connect();
    go(&mut c, true, false);
    c.request(cmd::BLOCK_STATUS, 0, 0xb5, 0, 4096);
    let (h, p) = read_chunk(&mut c);
    let (error, message) = error_chunk(&h, &p, 0xb5);
    assert_eq!(error, errno::EINVAL);
    assert!(!message.is_empty(), "the error chunk explains itself");
    c.write_ok(0, b"connection kept");
}

#[test]
fn block_status_describes_data_and_holes_with_and_without_req_one() {
    let dir = TempDir::new("ns-bs");
    let (file, _) = data_and_holes(&dir);
    let server = serve_newstyle(&dir, &file);
    server.wait_log("allocation map built");
    block_status_of_data_and_holes(&server);
}

#[test]
fn block_status_is_exact_while_the_allocation_map_is_being_built() {
    // The map's scan held back for 10 minutes: every answer must come from
    // the file itself, from the first request on.
    let dir = TempDir::new("ns-bs-building");
    let (file, _) = data_and_holes(&dir);
    let server = Flexnbd::serve(
        &dir,
        &file,
        &[
            "--handshake",
            "newstyle",
            "--faults",
            "store.map_scan=slow(600000)",
        ],
    );
    server.assert_fired("store.map_scan", "slow(600000)");
    block_status_of_data_and_holes(&server);
    assert!(
        !server.log().contains("allocation map built"),
        "the map must still be unbuilt for this test to mean anything"
    );
}

#[test]
fn block_status_is_exact_when_the_allocation_map_cannot_be_built() {
    let dir = TempDir::new("ns-bs-unbuilt");
    let (file, _) = data_and_holes(&dir);
    let server = Flexnbd::serve(
        &dir,
        &file,
        &["--handshake", "newstyle", "--faults", "store.map_scan=eio"],
    );
    server.wait_log("allocation map not built");
    block_status_of_data_and_holes(&server);
}

/// Block status over `data_and_holes`, with and without REQ_ONE, then after
/// a write of data and a write of zeros into holes.
fn block_status_of_data_and_holes(server: &Flexnbd) {
    let mut c = server.connect();
    go(&mut c, true, true);
    let hole = proto::STATE_HOLE | proto::STATE_ZERO;
    assert_eq!(hole, 3);
    let k = |n: u32| n * 1024;

    c.request(cmd::BLOCK_STATUS, 0, 1, 0, MIB as u32);
    let (id, d) = block_status_reply(&mut c, 1);
    assert_eq!(id, proto::BASE_ALLOCATION_ID);
    assert_eq!(
        d,
        vec![(k(64), 0), (k(448), hole), (k(64), 0), (k(448), hole)]
    );

    // Starting and ending inside extents.
    c.request(cmd::BLOCK_STATUS, 0, 2, 32 * KIB, k(512));
    let (_, d) = block_status_reply(&mut c, 2);
    assert_eq!(d, vec![(k(32), 0), (k(448), hole), (k(32), 0)]);

    // REQ_ONE: exactly one descriptor, never longer than the request.
    c.request(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 3, 32 * KIB, k(512));
    let (_, d) = block_status_reply(&mut c, 3);
    assert_eq!(d, vec![(k(32), 0)]);
    c.request(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 4, 64 * KIB, k(4));
    let (_, d) = block_status_reply(&mut c, 4);
    assert_eq!(d, vec![(k(4), hole)]);
    c.request(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 5, 100 * KIB, 1000);
    let (_, d) = block_status_reply(&mut c, 5);
    assert_eq!(d, vec![(1000, hole)]);

    // A write turns a hole into data; zeros written over a hole keep it one.
    c.write_ok(128 * KIB, &[1u8; 4096]);
    c.write_ok(160 * KIB, &[0u8; 8192]);
    c.request(cmd::BLOCK_STATUS, 0, 6, 64 * KIB, k(128));
    let (_, d) = block_status_reply(&mut c, 6);
    assert_eq!(d, vec![(k(64), hole), (k(4), 0), (k(60), hole)]);
}

#[test]
fn out_of_range_read_under_structured_replies_is_an_enospc_error_chunk() {
    let (_dir, server) = served(MIB);
    let mut c = server.connect();
    go(&mut c, true, false);
    for (handle, offset, len) in [(1u64, MIB - 512, 1024u32), (2, MIB, 1), (3, u64::MAX, 1)] {
        c.request(cmd::READ, 0, handle, offset, len);
        let (h, p) = read_chunk(&mut c);
        let (error, message) = error_chunk(&h, &p, handle);
        assert_eq!(error, errno::ENOSPC, "read of {len} at {offset}");
        assert_eq!(error, 28);
        assert!(!message.is_empty());
    }
    c.write_ok(MIB - 5, b"kept!");
}

#[test]
fn without_structured_replies_every_reply_is_simple() {
    let dir = TempDir::new("ns-simple");
    let (file, expected) = data_and_holes(&dir);
    let server = serve_newstyle(&dir, &file);
    server.wait_log("allocation map built");
    let mut c = server.connect();
    go(&mut c, false, false);
    // A read over data and a hole: one simple reply with all the bytes.
    assert_eq!(
        c.read_ok(32 * KIB, 128 * 1024),
        &expected[32 * 1024..160 * 1024]
    );
    // Errors are simple replies with no payload.
    c.request(cmd::READ, 0, 9, MIB - 512, 1024);
    let r = c.simple_reply();
    assert_eq!(
        (r.magic, r.error, r.handle),
        (proto::SIMPLE_REPLY_MAGIC, errno::ENOSPC, 9)
    );
    c.request(cmd::BLOCK_STATUS, 0, 10, 0, 4096);
    let r = c.simple_reply();
    assert_eq!(
        (r.magic, r.error, r.handle),
        (proto::SIMPLE_REPLY_MAGIC, errno::EINVAL, 10)
    );
    assert_eq!(
        c.read_ok(512 * KIB, 16),
        &expected[512 * 1024..512 * 1024 + 16]
    );
}

#[test]
fn out_of_range_block_status_is_an_einval_error_chunk() {
    // NBD spec: "The server SHOULD return NBD_EINVAL if it receives a
    // NBD_CMD_BLOCK_STATUS request including one or more sectors beyond the
    // size of the device" (READ and WRITE use ENOSPC).
    let (_dir, server) = served(MIB);
    let mut c = server.connect();
    go(&mut c, true, true);
    for (handle, offset, len) in [(1u64, MIB - 512, 1024u32), (2, MIB, 1), (3, u64::MAX, 1)] {
        c.request(cmd::BLOCK_STATUS, 0, handle, offset, len);
        let (h, p) = read_chunk(&mut c);
        assert_eq!(
            error_chunk(&h, &p, handle).0,
            errno::EINVAL,
            "block status of {len} at {offset}"
        );
    }
    c.request(cmd::BLOCK_STATUS, 0, 4, MIB - 4096, 4096);
    let (_, d) = block_status_reply(&mut c, 4);
    assert_eq!(d, vec![(4096, proto::STATE_HOLE | proto::STATE_ZERO)]);
}
