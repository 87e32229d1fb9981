//! Property tests of the wire codec and of a live server.
//!
//! Simulated: arbitrary byte strings fed to every parser in `flexnbd::proto`,
//! and arbitrary bytes (after nothing, a greeting exchange, a finished
//! handshake, or a valid request or option header) sent by many clients to
//! one running `flexnbd serve` per handshake, each client then closing.
//!
//! Must happen: every parser returns a value or a typed error and never
//! panics; valid values survive encode then decode unchanged; the live server
//! closes each hostile connection once the client has stopped sending, never
//! panics, and afterwards still serves a correct write and read.

use std::io::{ErrorKind, Read};
use std::net::Shutdown;

use proptest::prelude::*;

use crate::bad_input::{self, Mode};
use crate::harness::*;
use flexnbd::proto::{
    self, cmd, greeting_kind, ChunkHeader, GreetingKind, HandshakeError, InfoRequest,
    MetaContextRequest, OptionHeader, OptionReplyHeader, Request, SimpleReply,
};

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..=max)
}

/// `n` bytes that start with `magic` half the time, so the decoders' success
/// paths are reached too.
fn maybe_magic<const N: usize>(magic: &'static [u8]) -> impl Strategy<Value = [u8; N]> {
    (any::<bool>(), prop::collection::vec(any::<u8>(), N)).prop_map(move |(put, v)| {
        let mut b: [u8; N] = v.try_into().unwrap();
        if put {
            b[..magic.len()].copy_from_slice(magic);
        }
        b
    })
}

const REQUEST_MAGIC: [u8; 4] = proto::REQUEST_MAGIC.to_be_bytes();
const CHUNK_MAGIC: [u8; 4] = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes();
const OPT_MAGIC: [u8; 8] = proto::IHAVEOPT.to_be_bytes();
const OPT_REPLY_MAGIC: [u8; 8] = proto::OPTION_REPLY_MAGIC.to_be_bytes();
const NBD_MAGIC: [u8; 8] = proto::NBD_MAGIC.to_be_bytes();

/// A valid encoding, then cut, extended or with one byte flipped.
fn damaged(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = valid.len();
    prop_oneof![
        (0..=len).prop_map({
            let v = valid.clone();
            move |cut| v[..cut].to_vec()
        }),
        bytes(8).prop_map({
            let v = valid.clone();
            move |tail| [v.clone(), tail].concat()
        }),
        (0..len.max(1), any::<u8>()).prop_map(move |(at, x)| {
            let mut v = valid.clone();
            if !v.is_empty() {
                v[at % len] ^= x | 1;
            }
            v
        }),
    ]
}

fn info_request() -> impl Strategy<Value = InfoRequest> {
    (bytes(300), prop::collection::vec(any::<u16>(), 0..20))
        .prop_map(|(name, requests)| InfoRequest { name, requests })
}

fn meta_request() -> impl Strategy<Value = MetaContextRequest> {
    (bytes(300), prop::collection::vec(bytes(64), 0..20))
        .prop_map(|(name, queries)| MetaContextRequest { name, queries })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_request_headers_decode_and_reencode_byte_for_byte(b in maybe_magic::<28>(&REQUEST_MAGIC)) {
        let r = Request::decode(&b);
        prop_assert_eq!(r.encode(), b);
        prop_assert_eq!(r.magic_ok(), b[..4] == REQUEST_MAGIC);
        // Range checks are total, including 64-bit overflow.
        let size = u64::from_be_bytes(b[16..24].try_into().unwrap()) ^ 0x5555;
        let in_range = r.in_range(size);
        prop_assert_eq!(in_range, (r.offset as u128 + r.length as u128) <= size as u128);
        prop_assert!(r.end() >= r.offset);
    }

    #[test]
    fn random_simple_replies_decode_and_reencode(b in any::<[u8; 16]>()) {
        prop_assert_eq!(SimpleReply::decode(&b).encode(), b);
    }

    #[test]
    fn random_chunk_headers_decode_only_with_the_structured_magic(b in maybe_magic::<20>(&CHUNK_MAGIC)) {
        match ChunkHeader::decode(&b) {
            Some(h) => prop_assert_eq!(h.encode(), b),
            None => prop_assert_ne!(&b[..4], &CHUNK_MAGIC[..]),
        }
    }

    #[test]
    fn random_greetings_are_classified_or_refused_with_what_was_seen(
        b in maybe_magic::<16>(&NBD_MAGIC),
        which in 0..3u8,
    ) {
        let mut b = b;
        match which {
            0 => b[8..].copy_from_slice(&proto::INIT_MAGIC.to_be_bytes()),
            1 => b[8..].copy_from_slice(&proto::IHAVEOPT.to_be_bytes()),
            _ => {}
        }
        let second = u64::from_be_bytes(b[8..].try_into().unwrap());
        match greeting_kind(&b) {
            Ok(GreetingKind::Oldstyle) => prop_assert_eq!(second, proto::INIT_MAGIC),
            Ok(GreetingKind::Newstyle) => prop_assert_eq!(second, proto::IHAVEOPT),
            Err(HandshakeError::BadPassword(seen)) => {
                prop_assert_ne!(&b[..8], &NBD_MAGIC[..]);
                prop_assert_eq!(&seen.to_be_bytes()[..], &b[..8]);
            }
            Err(HandshakeError::BadMagic(seen)) => {
                prop_assert_eq!(&b[..8], &NBD_MAGIC[..]);
                prop_assert_eq!(seen, second);
                let text = HandshakeError::BadMagic(seen).to_string();
                prop_assert!(text.contains(&format!("got 0x{seen:016x}")), "{}", text);
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn random_oldstyle_greeting_tails_never_panic(v in prop::collection::vec(any::<u8>(), 136)) {
        let b: [u8; 136] = v.try_into().unwrap();
        let (size, flags) = proto::oldstyle_rest(&b);
        prop_assert_eq!(&size.to_be_bytes()[..], &b[..8]);
        prop_assert_eq!(&flags.to_be_bytes()[..], &b[8..12]);
    }

    #[test]
    fn random_option_headers_decode_only_with_ihaveopt(b in maybe_magic::<16>(&OPT_MAGIC)) {
        match OptionHeader::decode(&b) {
            Ok(h) => prop_assert_eq!(h.encode(), b),
            Err(e) => {
                prop_assert_eq!(&e, &HandshakeError::BadOptionMagic(u64::from_be_bytes(b[..8].try_into().unwrap())));
                prop_assert!(e.to_string().contains("expected 0x49484156454f5054"));
            }
        }
    }

    #[test]
    fn random_option_reply_headers_decode_only_with_their_magic(b in maybe_magic::<20>(&OPT_REPLY_MAGIC)) {
        match OptionReplyHeader::decode(&b) {
            Ok(h) => prop_assert_eq!(h.encode(), b),
            Err(e) => prop_assert!(matches!(e, HandshakeError::BadOptionReplyMagic(_))),
        }
    }

    #[test]
    fn random_info_requests_never_panic_and_accepted_ones_are_canonical(b in bytes(64)) {
        if let Ok(r) = InfoRequest::decode(&b) {
            prop_assert_eq!(r.encode(), b);
        }
    }

    #[test]
    fn damaged_info_requests_never_panic(b in info_request().prop_flat_map(|r| damaged(r.encode()))) {
        if let Ok(r) = InfoRequest::decode(&b) {
            prop_assert_eq!(r.encode(), b);
        }
    }

    #[test]
    fn random_meta_context_requests_never_panic_and_accepted_ones_are_canonical(b in bytes(64)) {
        if let Ok(r) = MetaContextRequest::decode(&b) {
            prop_assert_eq!(r.encode(), b);
        }
    }

    #[test]
    fn damaged_meta_context_requests_never_panic(b in meta_request().prop_flat_map(|r| damaged(r.encode()))) {
        if let Ok(r) = MetaContextRequest::decode(&b) {
            prop_assert_eq!(r.encode(), b);
        }
    }

    #[test]
    fn random_info_export_data_never_panics(b in bytes(16)) {
        if let Some((size, flags)) = proto::decode_info_export(&b) {
            prop_assert_eq!(&proto::info_export(size, flags)[..], &b[..]);
        }
    }

    #[test]
    fn requests_round_trip(kind: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        let r = Request::new(kind, flags, handle, offset, length);
        let d = Request::decode(&r.encode());
        prop_assert_eq!(d, r);
        prop_assert!(d.magic_ok());
    }

    #[test]
    fn replies_and_chunks_round_trip(error: u32, handle: u64, flags: u16, kind: u16, length: u32) {
        let r = SimpleReply::new(error, handle);
        prop_assert_eq!(SimpleReply::decode(&r.encode()), r);
        let c = ChunkHeader { flags, kind, handle, length };
        prop_assert_eq!(ChunkHeader::decode(&c.encode()), Some(c));
    }

    #[test]
    fn error_chunks_decode_with_their_message(handle: u64, error: u32, msg in "[ -~]{0,100}") {
        let mut v = Vec::new();
        proto::put_error_chunk(&mut v, handle, error, &msg);
        let h = ChunkHeader::decode(v[..20].try_into().unwrap()).unwrap();
        prop_assert!(h.done());
        prop_assert_eq!((h.kind, h.handle), (proto::chunk::ERROR, handle));
        prop_assert_eq!(h.length as usize, v.len() - 20);
        prop_assert_eq!(&v[20..24], &error.to_be_bytes()[..]);
        prop_assert_eq!(&v[26..], msg.as_bytes());
    }

    #[test]
    fn greetings_round_trip(size: u64, flags: u32, hs_flags: u16) {
        let g = proto::oldstyle_greeting(size, flags);
        prop_assert_eq!(greeting_kind(g[..16].try_into().unwrap()), Ok(GreetingKind::Oldstyle));
        prop_assert_eq!(proto::oldstyle_rest(g[16..].try_into().unwrap()), (size, flags));
        let n = proto::newstyle_greeting(hs_flags);
        prop_assert_eq!(greeting_kind(n[..16].try_into().unwrap()), Ok(GreetingKind::Newstyle));
        prop_assert_eq!(&n[16..], &hs_flags.to_be_bytes()[..]);
    }

    #[test]
    fn options_and_option_replies_round_trip(option: u32, kind: u32, data in bytes(100)) {
        let h = OptionHeader { option, length: data.len() as u32 };
        prop_assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
        let mut v = Vec::new();
        proto::put_option_reply(&mut v, option, kind, &data);
        let r = OptionReplyHeader::decode(v[..20].try_into().unwrap()).unwrap();
        prop_assert_eq!((r.option, r.kind, r.length as usize), (option, kind, data.len()));
        prop_assert_eq!(&v[20..], &data[..]);
    }

    #[test]
    fn info_and_meta_requests_round_trip(i in info_request(), m in meta_request(), size: u64, flags: u16) {
        prop_assert_eq!(InfoRequest::decode(&i.encode()), Ok(i));
        prop_assert_eq!(MetaContextRequest::decode(&m.encode()), Ok(m));
        prop_assert_eq!(proto::decode_info_export(&proto::info_export(size, flags)), Some((size, flags)));
    }
}

/// What a hostile client sends before its random bytes.
#[derive(Clone, Debug)]
enum Prefix {
    /// Nothing: the random bytes answer (or ignore) the greeting.
    Nothing,
    /// Newstyle only: the greeting is read and valid client flags are sent.
    ClientFlags,
    /// Newstyle only: client flags, then a valid option header.
    OptionHeader { option: u32, length: u32 },
    /// The handshake is completed.
    Handshake,
    /// The handshake, then a request header with the right magic.
    Request {
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
    },
}

const SIZE: u64 = 1024 * 1024;

fn prefix(mode: Mode) -> BoxedStrategy<Prefix> {
    // Mostly plausible commands and in-range-ish offsets, sometimes anything.
    let kind = prop_oneof![0..10u16, any::<u16>()];
    let offset = prop_oneof![0..SIZE, any::<u64>()];
    let length = prop_oneof![0..65536u32, any::<u32>()];
    let request = (kind, any::<u16>(), offset, length).prop_map(|(kind, flags, offset, length)| {
        Prefix::Request {
            kind,
            flags,
            offset,
            length,
        }
    });
    match mode {
        Mode::Old => prop_oneof![Just(Prefix::Nothing), Just(Prefix::Handshake), request].boxed(),
        Mode::New => prop_oneof![
            Just(Prefix::Nothing),
            Just(Prefix::ClientFlags),
            (
                prop_oneof![0..12u32, any::<u32>()],
                prop_oneof![0..64u32, any::<u32>()]
            )
                .prop_map(|(option, length)| Prefix::OptionHeader { option, length }),
            Just(Prefix::Handshake),
            request
        ]
        .boxed(),
    }
}

/// One hostile client: prefix, random bytes, stop sending, then the server
/// must close the connection within the harness's wait.
fn hostile_client(server: &Flexnbd, mode: Mode, prefix: &Prefix, junk: &[u8]) {
    let mut c = match prefix {
        Prefix::Nothing => server.connect(),
        Prefix::ClientFlags | Prefix::OptionHeader { .. } => {
            let mut c = server.connect();
            bad_input::newstyle_greeting(&mut c);
            c.send(&(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES).to_be_bytes());
            if let Prefix::OptionHeader { option, length } = *prefix {
                c.send(&OptionHeader { option, length }.encode());
            }
            c
        }
        Prefix::Handshake | Prefix::Request { .. } => {
            let mut c = bad_input::ready(server, mode);
            if let Prefix::Request {
                kind,
                flags,
                offset,
                length,
            } = *prefix
            {
                c.request(kind, flags, 0x7072_6f70, offset, length);
            }
            c
        }
    };
    // The server may already have closed (a bad magic, say): sending may fail.
    let _ = std::io::Write::write_all(&mut c.stream, junk);
    let _ = c.stream.shutdown(Shutdown::Write);
    // Whatever it made of the bytes, the server must now end the connection.
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("server did not close after {prefix:?} + {junk:?}: {e}"),
        }
    }
}

fn random_bytes_at_a_live_server(mode: Mode) {
    let (_dir, file, mut server) = bad_input::serve(mode, SIZE, &[]);
    let cases = ProptestConfig::with_cases(128);
    proptest!(cases, |(p in prefix(mode), junk in prop_oneof![bytes(64), bytes(600)])| {
        hostile_client(&server, mode, &p, &junk);
    });
    assert!(
        server.is_running(),
        "flexnbd exited; log:\n{}",
        server.log()
    );
    server.assert_no_panic();
    // Still a correct server: write and read back through a fresh client.
    let mut c = bad_input::ready(&server, mode);
    let data = pattern(10_000, 9);
    c.write_ok(300_000, &data);
    assert_eq!(c.read_ok(300_000, 10_000), data);
    c.request(cmd::FLUSH, 0, 3, 0, 0);
    assert_eq!(c.simple_reply().error, 0);
    assert_eq!(read_file_range(&file, 300_000, 10_000), data);
    bad_input::assert_still_serving(&mut server, mode);
}

#[test]
fn random_bytes_at_a_live_oldstyle_server_cause_no_panic_and_no_hang() {
    random_bytes_at_a_live_server(Mode::Old);
}

#[test]
fn random_bytes_at_a_live_newstyle_server_cause_no_panic_and_no_hang() {
    random_bytes_at_a_live_server(Mode::New);
}
