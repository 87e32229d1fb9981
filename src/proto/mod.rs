//! The NBD wire codec: constants, handshakes, requests and replies.
//!
//! Nothing here touches a socket. Every parser is total: any byte string
//! gives a value or a typed error, never a panic, so the same code serves the
//! server, our clients and the fake peers of the acceptance suite.

pub mod handshake;
pub mod reply;
pub mod request;

pub use handshake::*;
pub use reply::*;
pub use request::*;

/// `NBDMAGIC`, the first eight bytes of every greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// Oldstyle greeting magic (follows `NBDMAGIC`).
pub const INIT_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Newstyle greeting magic (`IHAVEOPT`), also the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a request header.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Length of the oldstyle greeting.
pub const OLDSTYLE_GREETING_LEN: usize = 152;
/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// Transmission flags (16 bits in newstyle, 32 bits in the oldstyle greeting).
pub mod flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
}

/// Handshake flags sent by a newstyle server.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags sent in reply to a newstyle greeting.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// The longest range one DIGEST may cover.
pub const MAX_DIGEST: u32 = 64 * 1024 * 1024;

/// Command types.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
    /// The hand-off request of a migration. The NBD specification does not
    /// assign this value; it is the historical flexnbd ENTRUST (65536 in the
    /// old 32-bit type field) folded into the 16-bit type space as the last
    /// value, far from any value the specification may assign later. Its
    /// offset says how many changes went before it on the connection
    /// (`core::destination::entrust_offset`).
    pub const ENTRUST: u16 = 0xffff;
    /// A migration's checkpoint (docs/handoff.md, "Resuming"): `offset` is
    /// the migration id, `length` the checkpoint's number. Answered once
    /// the image (as of every write before it) is durable and the marker
    /// names the checkpoint; writes sent behind it are stored and answered
    /// meanwhile.
    pub const CHECKPOINT: u16 = 0xfffe;
    /// The resume query: `offset` is the migration id, `length` 8. Answered
    /// with 0 and 8 bytes, the checkpoint of that migration the destination
    /// durably holds (big-endian, 0 for none); an old destination answers
    /// an error, without a payload.
    pub const RESUME: u16 = 0xfffd;
    /// The BLAKE3 digest of a range (`offset`, `length` as for READ, at
    /// most [`super::MAX_DIGEST`] bytes): answered with 0 and 32 bytes, or
    /// an error without a payload.
    pub const DIGEST: u16 = 0xfffc;

    /// A name for log lines.
    pub fn name(kind: u16) -> &'static str {
        match kind {
            READ => "read",
            WRITE => "write",
            DISC => "disconnect",
            FLUSH => "flush",
            TRIM => "trim",
            CACHE => "cache",
            WRITE_ZEROES => "write_zeroes",
            BLOCK_STATUS => "block_status",
            ENTRUST => "entrust",
            CHECKPOINT => "checkpoint",
            RESUME => "resume",
            DIGEST => "digest",
            _ => "unknown",
        }
    }
}

/// Command flags.
pub mod cmd_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Option types of the newstyle negotiation.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;

    pub fn is_error(kind: u32) -> bool {
        kind & (1 << 31) != 0
    }
}

/// Information types in `NBD_REP_INFO`.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
    /// flexnbd's extensions (docs/handoff.md, "Resuming"): sent only to a
    /// client that lists it, with the 4-byte [`super::ext`] bit set.
    pub const FLEXNBD: u16 = 0xff00;
}

/// The flexnbd extensions a destination offers in its handshake
/// (docs/handoff.md, "Resuming"): in the oldstyle greeting's reserved bytes
/// after [`TAG`], or in the newstyle [`super::info::FLEXNBD`] reply.
pub mod ext {
    /// Bytes 28-31 of an oldstyle greeting that offers extensions.
    pub const TAG: [u8; 4] = *b"FLEX";
    /// RESUME, CHECKPOINT and DIGEST.
    pub const RESUME: u32 = 1 << 0;
    /// The resume query asked with length 16 answers 8 more bytes, bit 0:
    /// the image holds no data (every block a hole). With [`RESUME`].
    pub const EMPTY: u32 = 1 << 1;
    /// What `listen` offers.
    pub const LISTEN: u32 = RESUME | EMPTY;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    pub const FLAG_DONE: u16 = 1 << 0;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The id we give `base:allocation` when a client selects it.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Error values carried in replies (Linux errno numbering, as NBD uses).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    /// flexnbd's answer to a request with a bad magic (then it closes).
    pub const EBADMSG: u32 = 74;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;

    /// Maps an I/O error to the value a reply carries.
    pub fn from_io(err: &std::io::Error) -> u32 {
        match err.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
            Some(libc::ENOMEM) => ENOMEM,
            Some(libc::EINVAL) => EINVAL,
            Some(libc::EOPNOTSUPP) => ENOTSUP,
            _ => EIO,
        }
    }
}

/// Block size constraints we advertise: any alignment works, 4 KiB is best,
/// and 32 MiB is the largest request qemu sends.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = 32 * 1024 * 1024;

/// Reads a big-endian integer at `at`; callers have checked the length.
pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
