//! Handshakes: the oldstyle greeting and fixed newstyle negotiation.

use super::{be_u16, be_u32, be_u64, IHAVEOPT, INIT_MAGIC, NBD_MAGIC, OLDSTYLE_GREETING_LEN};
use super::{OPTION_REPLY_MAGIC, REQUEST_LEN};

/// Longest option payload we read. Export names and queries are at most
/// 4 KiB by the specification; anything past this is hostile or broken.
pub const MAX_OPTION_LEN: u32 = 16 * 1024;
/// Longest export name or metadata query we accept.
pub const MAX_NAME_LEN: u32 = 4096;

/// Why a handshake byte string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("bad greeting magic: expected NBDMAGIC (0x{NBD_MAGIC:016x}), got 0x{0:016x}")]
    BadPassword(u64),
    #[error(
        "bad greeting magic: expected 0x{INIT_MAGIC:016x} (oldstyle) or 0x{IHAVEOPT:016x} (newstyle), got 0x{0:016x}"
    )]
    BadMagic(u64),
    #[error("bad option magic: expected 0x{IHAVEOPT:016x}, got 0x{0:016x}")]
    BadOptionMagic(u64),
    #[error("bad option reply magic: expected 0x{OPTION_REPLY_MAGIC:016x}, got 0x{0:016x}")]
    BadOptionReplyMagic(u64),
    #[error("option payload too short: {what} needs {needed} bytes, the option has {seen}")]
    Truncated {
        what: &'static str,
        needed: usize,
        seen: usize,
    },
    #[error("option payload has {0} trailing bytes")]
    Trailing(usize),
    #[error("{what} is {seen} bytes long; the limit is {limit}")]
    TooLong {
        what: &'static str,
        seen: u32,
        limit: u32,
    },
}

/// The 152-byte oldstyle greeting, byte-exact with the C flexnbd.
pub fn oldstyle_greeting(size: u64, flags: u32) -> [u8; OLDSTYLE_GREETING_LEN] {
    let mut b = [0u8; OLDSTYLE_GREETING_LEN];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&INIT_MAGIC.to_be_bytes());
    b[16..24].copy_from_slice(&size.to_be_bytes());
    b[24..28].copy_from_slice(&flags.to_be_bytes());
    b
}

/// The oldstyle greeting of a destination offering `extensions` (a
/// [`super::ext`] bit set): the reserved bytes begin with the tag and the
/// bit set. With none it is [`oldstyle_greeting`], byte for byte.
pub fn oldstyle_greeting_offering(
    size: u64,
    flags: u32,
    extensions: u32,
) -> [u8; OLDSTYLE_GREETING_LEN] {
    let mut b = oldstyle_greeting(size, flags);
    if extensions != 0 {
        b[28..32].copy_from_slice(&super::ext::TAG);
        b[32..36].copy_from_slice(&extensions.to_be_bytes());
    }
    b
}

/// The extensions an oldstyle greeting offers (bytes 16..152 of it): none
/// unless the reserved bytes begin with the tag.
pub fn oldstyle_extensions(rest: &[u8; OLDSTYLE_GREETING_LEN - 16]) -> u32 {
    if rest[12..16] == super::ext::TAG {
        be_u32(rest, 16)
    } else {
        0
    }
}

/// `NBD_INFO` [`super::info::FLEXNBD`]: the extensions offered.
pub fn info_flexnbd(extensions: u32) -> [u8; 6] {
    let mut b = [0u8; 6];
    b[0..2].copy_from_slice(&super::info::FLEXNBD.to_be_bytes());
    b[2..6].copy_from_slice(&extensions.to_be_bytes());
    b
}

/// The extensions in an `NBD_INFO` payload, if it is a well-formed
/// [`super::info::FLEXNBD`].
pub fn decode_info_flexnbd(data: &[u8]) -> Option<u32> {
    if data.len() != 6 || be_u16(data, 0) != super::info::FLEXNBD {
        return None;
    }
    Some(be_u32(data, 2))
}

/// The first 16 bytes of any greeting tell which handshake the server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GreetingKind {
    Oldstyle,
    Newstyle,
}

pub fn greeting_kind(b: &[u8; 16]) -> Result<GreetingKind, HandshakeError> {
    let password = be_u64(b, 0);
    if password != NBD_MAGIC {
        return Err(HandshakeError::BadPassword(password));
    }
    match be_u64(b, 8) {
        INIT_MAGIC => Ok(GreetingKind::Oldstyle),
        IHAVEOPT => Ok(GreetingKind::Newstyle),
        other => Err(HandshakeError::BadMagic(other)),
    }
}

/// Size and flags from the rest of an oldstyle greeting (bytes 16..152).
/// The reserved bytes are ignored, as the C client does.
pub fn oldstyle_rest(b: &[u8; OLDSTYLE_GREETING_LEN - 16]) -> (u64, u32) {
    (be_u64(b, 0), be_u32(b, 8))
}

/// The 18-byte fixed newstyle greeting.
pub fn newstyle_greeting(handshake_flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// A 16-byte option header; `length` bytes of data follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn decode(b: &[u8; 16]) -> Result<OptionHeader, HandshakeError> {
        let magic = be_u64(b, 0);
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        Ok(OptionHeader {
            option: be_u32(b, 8),
            length: be_u32(b, 12),
        })
    }

    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// The 20-byte header of an option reply; `length` bytes of data follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub kind: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.kind.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; 20]) -> Result<OptionReplyHeader, HandshakeError> {
        let magic = be_u64(b, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(HandshakeError::BadOptionReplyMagic(magic));
        }
        Ok(OptionReplyHeader {
            option: be_u32(b, 8),
            kind: be_u32(b, 12),
            length: be_u32(b, 16),
        })
    }
}

/// Appends an option reply (header and data) to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    let header = OptionReplyHeader {
        option,
        kind,
        length: data.len() as u32,
    };
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(data);
}

/// A cursor over option data that turns short reads into typed errors.
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HandshakeError> {
        let rest = self.data.len() - self.at;
        if rest < n {
            return Err(HandshakeError::Truncated {
                what,
                needed: n,
                seen: rest,
            });
        }
        let out = &self.data[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, HandshakeError> {
        Ok(be_u16(self.take(2, what)?, 0))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, HandshakeError> {
        Ok(be_u32(self.take(4, what)?, 0))
    }
    fn string(&mut self, what: &'static str) -> Result<&'a [u8], HandshakeError> {
        let len = self.u32(what)?;
        if len > MAX_NAME_LEN {
            return Err(HandshakeError::TooLong {
                what,
                seen: len,
                limit: MAX_NAME_LEN,
            });
        }
        self.take(len as usize, what)
    }
    fn finish(&self) -> Result<(), HandshakeError> {
        match self.data.len() - self.at {
            0 => Ok(()),
            n => Err(HandshakeError::Trailing(n)),
        }
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn decode(data: &[u8]) -> Result<InfoRequest, HandshakeError> {
        let mut c = Cursor { data, at: 0 };
        let name = c.string("export name")?.to_vec();
        let count = c.u16("information request count")?;
        let mut requests = Vec::with_capacity(usize::from(count).min(64));
        for _ in 0..count {
            requests.push(c.u16("information request")?);
        }
        c.finish()?;
        Ok(InfoRequest { name, requests })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.name);
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: Vec<u8>,
    pub queries: Vec<Vec<u8>>,
}

/// At most this many queries in one meta context option.
pub const MAX_META_QUERIES: u32 = 128;

impl MetaContextRequest {
    pub fn decode(data: &[u8]) -> Result<MetaContextRequest, HandshakeError> {
        let mut c = Cursor { data, at: 0 };
        let name = c.string("export name")?.to_vec();
        let count = c.u32("query count")?;
        if count > MAX_META_QUERIES {
            return Err(HandshakeError::TooLong {
                what: "query count",
                seen: count,
                limit: MAX_META_QUERIES,
            });
        }
        let mut queries = Vec::new();
        for _ in 0..count {
            queries.push(c.string("query")?.to_vec());
        }
        c.finish()?;
        Ok(MetaContextRequest { name, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.name);
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q);
        }
        b
    }
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&super::info::EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&super::info::BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// Decodes `NBD_INFO_EXPORT` data (size, flags).
pub fn decode_info_export(data: &[u8]) -> Option<(u64, u16)> {
    if data.len() != 12 || be_u16(data, 0) != super::info::EXPORT {
        return None;
    }
    Some((be_u64(data, 2), be_u16(data, 10)))
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeros unless the
/// client asked for none.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

// Keep the request length visible here for readers of the handshake code: the
// first thing after a handshake is always a 28-byte request header.
const _: () = assert!(REQUEST_LEN == 28);
