//! Request headers (client to server), 28 bytes.

use super::{be_u16, be_u32, be_u64, REQUEST_LEN, REQUEST_MAGIC};

/// A request header as it travels on the wire.
///
/// The magic is kept rather than checked here because flexnbd answers a bad
/// magic with an error reply carrying the received handle (then closes), so the
/// server needs the handle even from a header it rejects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub magic: u32,
    pub flags: u16,
    pub kind: u16,
    /// Opaque to the server; echoed byte for byte in the reply.
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// A request with the correct magic.
    pub fn new(kind: u16, flags: u16, handle: u64, offset: u64, length: u32) -> Request {
        Request {
            magic: REQUEST_MAGIC,
            flags,
            kind,
            handle,
            offset,
            length,
        }
    }

    /// Decodes a header. Total: exactly 28 bytes always decode.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Request {
        Request {
            magic: be_u32(b, 0),
            flags: be_u16(b, 4),
            kind: be_u16(b, 6),
            handle: be_u64(b, 8),
            offset: be_u64(b, 16),
            length: be_u32(b, 24),
        }
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    pub fn magic_ok(&self) -> bool {
        self.magic == REQUEST_MAGIC
    }

    /// True when the range lies inside an export of `size` bytes. A sum that
    /// overflows 64 bits is out of range (the C version wrapped around).
    pub fn in_range(&self, size: u64) -> bool {
        match self.offset.checked_add(u64::from(self.length)) {
            Some(end) => end <= size,
            None => false,
        }
    }

    /// The end offset, saturating (only meaningful after `in_range`).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.length))
    }
}
