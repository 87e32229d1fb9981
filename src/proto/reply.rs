//! Replies (server to client): simple replies and structured reply chunks.

use super::{
    be_u16, be_u32, be_u64, chunk, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_HEADER_LEN,
    STRUCTURED_REPLY_MAGIC,
};

/// A simple reply header, 16 bytes. A successful READ is followed by data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    pub magic: u32,
    pub error: u32,
    pub handle: u64,
}

impl SimpleReply {
    pub fn new(error: u32, handle: u64) -> SimpleReply {
        SimpleReply {
            magic: SIMPLE_REPLY_MAGIC,
            error,
            handle,
        }
    }

    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; SIMPLE_REPLY_LEN]) -> SimpleReply {
        SimpleReply {
            magic: be_u32(b, 0),
            error: be_u32(b, 4),
            handle: be_u64(b, 8),
        }
    }
}

/// The header of one structured reply chunk, 20 bytes; `length` bytes of
/// chunk payload follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; STRUCTURED_HEADER_LEN] {
        let mut b = [0u8; STRUCTURED_HEADER_LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes a chunk header; `None` when the magic is not the structured one.
    pub fn decode(b: &[u8; STRUCTURED_HEADER_LEN]) -> Option<ChunkHeader> {
        if be_u32(b, 0) != STRUCTURED_REPLY_MAGIC {
            return None;
        }
        Some(ChunkHeader {
            flags: be_u16(b, 4),
            kind: be_u16(b, 6),
            handle: be_u64(b, 8),
            length: be_u32(b, 16),
        })
    }

    pub fn done(&self) -> bool {
        self.flags & chunk::FLAG_DONE != 0
    }
}

/// Appends a structured chunk header to `out`.
pub fn put_chunk_header(out: &mut Vec<u8>, done: bool, kind: u16, handle: u64, length: u32) {
    let flags = if done { chunk::FLAG_DONE } else { 0 };
    out.extend_from_slice(
        &ChunkHeader {
            flags,
            kind,
            handle,
            length,
        }
        .encode(),
    );
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk (always the last chunk).
pub fn put_error_chunk(out: &mut Vec<u8>, handle: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    put_chunk_header(out, true, chunk::ERROR, handle, 6 + msg.len() as u32);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}
