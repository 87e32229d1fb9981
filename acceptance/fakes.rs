//! Scripted fake peers for migration tests, built only on `std` and the
//! project's wire codec (`flexnbd::proto`), never on flexnbd's server code:
//!
//! * [`FakeDest`] pretends to be a migration destination (a C `flexnbd
//!   listen`, or a broken one): it listens on 127.0.0.1:0, accepts with
//!   bounded waits, counts connections, and each [`FakeConn`] sends a chosen
//!   greeting (or none), reads requests and payloads, and replies with
//!   chosen errors or magics. [`serve_c_destination`] is a whole C-flexnbd
//!   destination that keeps the image in memory and records every command.
//! * [`FakeSource`] pretends to be a migration source (a C `flexnbd serve`
//!   mirroring out, or a misbehaving client): it connects, reads the
//!   greeting, sends WRITEs, DISCONNECT or garbage, and reads replies.
//! * [`Background`] runs a script on a thread and joins it with a bound.
//!
//! Every blocking call here has a time limit, so a peer that misbehaves
//! fails the test instead of hanging it.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use flexnbd::proto::{self, cmd, Request, SimpleReply};

/// Longest any single read or write of a fake may block.
pub const IO_LIMIT: Duration = Duration::from_secs(15);

/// The flags the C flexnbd advertises: HAS_FLAGS + SEND_FLUSH + SEND_FUA
/// (no WRITE_ZEROES, no TRIM).
pub const C_FLAGS: u32 = 13;

/// The handle every WRITE of a C mirror carries: ASCII `.MIRROR.`.
pub const MIRROR_HANDLE: u64 = u64::from_be_bytes(*b".MIRROR.");

/// A C flexnbd greeting: oldstyle, flags 13.
pub fn c_greeting(size: u64) -> [u8; proto::OLDSTYLE_GREETING_LEN] {
    proto::oldstyle_greeting(size, C_FLAGS)
}

/// A greeting whose INIT_MAGIC (bytes 8..16) is wrong.
pub fn wrong_magic_greeting(size: u64) -> [u8; proto::OLDSTYLE_GREETING_LEN] {
    let mut g = c_greeting(size);
    g[8..16].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_be_bytes());
    g
}

/// Accepted connections are set to blocking mode with these timeouts.
fn configure(stream: &TcpStream) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(IO_LIMIT)).unwrap();
    stream.set_write_timeout(Some(IO_LIMIT)).unwrap();
    stream.set_nodelay(true).unwrap();
}

/// A fake migration destination: a listening socket that counts the
/// connections it accepts.
pub struct FakeDest {
    listener: TcpListener,
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl FakeDest {
    /// Listens on 127.0.0.1 with an ephemeral port.
    pub fn bind() -> FakeDest {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake destination");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        FakeDest {
            listener,
            addr,
            accepted: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Another handle on the same socket and counter (for a script thread).
    pub fn try_clone(&self) -> FakeDest {
        FakeDest {
            listener: self.listener.try_clone().unwrap(),
            addr: self.addr,
            accepted: self.accepted.clone(),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Accepts one connection, waiting at most `limit`.
    pub fn accept_within(&self, limit: Duration) -> Option<FakeConn> {
        let start = Instant::now();
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    configure(&stream);
                    self.accepted.fetch_add(1, Ordering::SeqCst);
                    return Some(FakeConn { stream, peer });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if start.elapsed() >= limit {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("fake destination accept failed: {e}"),
            }
        }
    }

    /// Accepts one connection or fails the test after `limit`.
    pub fn expect_connection(&self, limit: Duration) -> FakeConn {
        self.accept_within(limit)
            .unwrap_or_else(|| panic!("no connection to the fake destination within {limit:?}"))
    }

    /// Waits `window` (a deliberate wait: it shows that something does NOT
    /// happen) and returns the connections accepted meanwhile, closed.
    pub fn connections_during(&self, window: Duration) -> usize {
        let start = Instant::now();
        let mut n = 0;
        while let Some(c) = self.accept_within(window.saturating_sub(start.elapsed())) {
            drop(c);
            n += 1;
            if start.elapsed() >= window {
                break;
            }
        }
        n
    }
}

/// One connection accepted by a [`FakeDest`].
pub struct FakeConn {
    pub stream: TcpStream,
    pub peer: SocketAddr,
}

/// A request as a fake destination saw it: the header and a WRITE's payload.
#[derive(Clone, Debug)]
pub struct Seen {
    pub request: Request,
    pub payload: Vec<u8>,
}

impl FakeConn {
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("fake destination send");
    }

    pub fn send_c_greeting(&mut self, size: u64) {
        self.send(&c_greeting(size));
    }

    /// Reads a 28-byte request header; `None` at EOF (or a reset) before
    /// its first byte. Fails the test on a timeout or a torn header, and
    /// on any of flexnbd's extension requests (docs/handoff.md,
    /// "Resuming"): these fakes are C destinations, whose greeting offers
    /// none, and the source must ask them nothing new.
    pub fn read_request(&mut self) -> Option<Request> {
        let request = self.read_any_request()?;
        assert!(
            !matches!(request.kind, cmd::RESUME | cmd::CHECKPOINT | cmd::DIGEST),
            "a destination that offered no extensions was sent {} (type 0x{:04x})",
            cmd::name(request.kind),
            request.kind
        );
        Some(request)
    }

    /// Reads a 28-byte request header as it comes, whatever its type.
    pub fn read_any_request(&mut self) -> Option<Request> {
        let mut b = [0u8; proto::REQUEST_LEN];
        match read_full(&mut self.stream, &mut b) {
            Ok(0) => None,
            Ok(n) if n == b.len() => Some(Request::decode(&b)),
            Ok(n) => panic!("the source closed after {n} bytes of a request header"),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("fake destination reading a request: {e}"),
        }
    }

    /// Reads exactly `len` payload bytes.
    pub fn read_payload(&mut self, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.stream
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("fake destination reading {len} payload bytes: {e}"));
        b
    }

    /// Reads a request and, for a WRITE, its payload.
    pub fn read_seen(&mut self) -> Option<Seen> {
        let request = self.read_request()?;
        let payload = if request.kind == cmd::WRITE {
            self.read_payload(request.length as usize)
        } else {
            Vec::new()
        };
        Some(Seen { request, payload })
    }

    pub fn reply(&mut self, error: u32, handle: u64) {
        self.send(&SimpleReply::new(error, handle).encode());
    }

    /// A reply with an arbitrary magic.
    pub fn reply_with_magic(&mut self, magic: u32, error: u32, handle: u64) {
        self.send(
            &SimpleReply {
                magic,
                error,
                handle,
            }
            .encode(),
        );
    }

    /// True if the peer closes the connection within `limit` (bytes that
    /// arrive meanwhile are discarded).
    pub fn sees_eof_within(&mut self, limit: Duration) -> bool {
        sees_eof_within(&mut self.stream, limit)
    }

    /// How the peer ends the connection within `limit`.
    pub fn ending_within(&mut self, limit: Duration) -> Ending {
        ending_within(&mut self.stream, limit)
    }
}

/// How a peer ended a connection, as the other end's reads see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// A read returned 0: the peer closed after taking every byte we sent.
    Clean,
    /// ECONNRESET: the peer closed with bytes of ours still unread.
    Reset,
    /// Still open when the time was up.
    Open,
}

/// How `stream`'s peer ends the connection within `limit` (bytes that
/// arrive meanwhile are discarded). Unlike [`sees_eof_within`] this tells a
/// clean close from a reset.
pub fn ending_within(stream: &mut TcpStream, limit: Duration) -> Ending {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Ending::Open;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return Ending::Clean,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ending::Reset,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return Ending::Open
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("waiting for the peer to close: {e}"),
        }
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// True if `stream` reaches EOF (or a reset) within `limit`.
pub fn sees_eof_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("waiting for EOF: {e}"),
        }
    }
}

/// What a [`serve_c_destination`] run received.
#[derive(Debug)]
pub struct CDestRun {
    /// The image as the writes left it (initially filled with `fill`).
    pub image: Vec<u8>,
    /// Every request in arrival order (headers only).
    pub requests: Vec<Request>,
    /// Whether the run ended with a DISCONNECT (rather than EOF).
    pub disconnected: bool,
}

impl CDestRun {
    /// The command types in arrival order.
    pub fn kinds(&self) -> Vec<u16> {
        self.requests.iter().map(|r| r.kind).collect()
    }
}

/// Behaves like the C flexnbd `listen` on one connection: an oldstyle
/// greeting with flags 13, every in-range WRITE stored and answered 0,
/// FLUSH answered 0, DISCONNECT ends the run without a reply, and every
/// other type (ENTRUST among them) answered EINVAL. Out-of-range requests
/// get ENOSPC (a WRITE's payload is consumed first). The image starts
/// filled with `fill`, so zero-filled holes are visibly written.
pub fn serve_c_destination(conn: &mut FakeConn, size: u64, fill: u8) -> CDestRun {
    conn.send_c_greeting(size);
    let mut run = CDestRun {
        image: vec![fill; size as usize],
        requests: Vec::new(),
        disconnected: false,
    };
    while let Some(seen) = conn.read_seen() {
        let req = seen.request;
        run.requests.push(req);
        assert!(
            req.magic_ok(),
            "the source sent a bad request magic 0x{:08x}",
            req.magic
        );
        if !req.in_range(size) {
            conn.reply(proto::errno::ENOSPC, req.handle);
            continue;
        }
        match req.kind {
            cmd::WRITE => {
                let at = req.offset as usize;
                run.image[at..at + seen.payload.len()].copy_from_slice(&seen.payload);
                conn.reply(0, req.handle);
            }
            cmd::FLUSH => conn.reply(0, req.handle),
            cmd::DISC => {
                run.disconnected = true;
                break;
            }
            _ => conn.reply(proto::errno::EINVAL, req.handle),
        }
    }
    run
}

/// A fake migration source (or any raw NBD client) over std TCP.
pub struct FakeSource {
    pub stream: TcpStream,
}

impl FakeSource {
    /// Connects (bounded) to `addr`.
    pub fn connect(addr: SocketAddr) -> FakeSource {
        let stream = TcpStream::connect_timeout(&addr, IO_LIMIT).expect("fake source connect");
        configure(&stream);
        FakeSource { stream }
    }

    /// Connects from a chosen local address (e.g. 127.0.0.6) via socket2.
    pub fn connect_from(local: SocketAddr, addr: SocketAddr) -> FakeSource {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        socket.bind(&local.into()).expect("bind the fake source");
        socket
            .connect_timeout(&addr.into(), IO_LIMIT)
            .expect("fake source connect");
        let stream: TcpStream = socket.into();
        configure(&stream);
        FakeSource { stream }
    }

    /// Reads the 152-byte oldstyle greeting, checks both magics and returns
    /// (size, flags).
    pub fn read_greeting(&mut self) -> (u64, u32) {
        let g = self.read_exact(proto::OLDSTYLE_GREETING_LEN);
        assert_eq!(&g[0..8], b"NBDMAGIC", "greeting password");
        assert_eq!(
            &g[8..16],
            &proto::INIT_MAGIC.to_be_bytes(),
            "oldstyle greeting magic"
        );
        (
            u64::from_be_bytes(g[16..24].try_into().unwrap()),
            u32::from_be_bytes(g[24..28].try_into().unwrap()),
        )
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.stream
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("fake source reading {n} bytes: {e}"));
        b
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("fake source send");
    }

    pub fn request(&mut self, kind: u16, handle: u64, offset: u64, length: u32) {
        self.send(&Request::new(kind, 0, handle, offset, length).encode());
    }

    /// A WRITE header and its payload (the reply is not read).
    pub fn write(&mut self, handle: u64, offset: u64, data: &[u8]) {
        self.request(cmd::WRITE, handle, offset, data.len() as u32);
        self.send(data);
    }

    pub fn read_reply(&mut self) -> SimpleReply {
        let b = self.read_exact(proto::SIMPLE_REPLY_LEN);
        SimpleReply::decode(b.as_slice().try_into().unwrap())
    }

    /// A WRITE, then its reply; returns the reply.
    pub fn write_and_reply(&mut self, handle: u64, offset: u64, data: &[u8]) -> SimpleReply {
        self.write(handle, offset, data);
        self.read_reply()
    }

    /// DISCONNECT (type 2, offset 0, length 0); no reply is expected.
    pub fn disconnect(&mut self, handle: u64) {
        self.request(cmd::DISC, handle, 0, 0);
    }

    pub fn sees_eof_within(&mut self, limit: Duration) -> bool {
        sees_eof_within(&mut self.stream, limit)
    }

    /// Reads whatever arrives within `limit` until EOF; returns the bytes
    /// and whether EOF was seen.
    pub fn read_until_eof(&mut self, limit: Duration) -> (Vec<u8>, bool) {
        let start = Instant::now();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = limit.saturating_sub(start.elapsed());
            if left.is_zero() {
                return (out, false);
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut buf) {
                Ok(0) => return (out, true),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return (out, true),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return (out, false)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("reading until EOF: {e}"),
            }
        }
    }
}

/// Connects to `addr` until a connection gets a full greeting, for at most
/// `limit` (a single-slot listener may still be tearing down the previous
/// connection, and then closes a new one without greeting).
pub fn connect_with_greeting(addr: SocketAddr, limit: Duration) -> (FakeSource, u64) {
    let start = Instant::now();
    loop {
        let mut s = FakeSource::connect(addr);
        let mut g = [0u8; proto::OLDSTYLE_GREETING_LEN];
        s.stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        if let Ok(n) = read_full(&mut s.stream, &mut g) {
            if n == g.len() {
                assert_eq!(&g[0..8], b"NBDMAGIC");
                assert_eq!(&g[8..16], &proto::INIT_MAGIC.to_be_bytes());
                s.stream.set_read_timeout(Some(IO_LIMIT)).unwrap();
                return (s, u64::from_be_bytes(g[16..24].try_into().unwrap()));
            }
        }
        if start.elapsed() > limit {
            panic!("no connection to {addr} got a greeting within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A script running on its own thread.
pub struct Background<T> {
    rx: mpsc::Receiver<T>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// Runs `f` on a thread; join it with [`Background::join_within`].
pub fn in_background<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Background<T> {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    Background {
        rx,
        handle: Some(handle),
    }
}

impl<T> Background<T> {
    /// The script's result; fails the test if it panicked or took longer
    /// than `limit`.
    pub fn join_within(mut self, limit: Duration) -> T {
        match self.rx.recv_timeout(limit) {
            Ok(v) => {
                let _ = self.handle.take().unwrap().join();
                v
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("background script did not finish within {limit:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => match self.handle.take().unwrap().join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => panic!("background script ended without a result"),
            },
        }
    }
}

// Self-tests of the fakes, so a broken fake cannot make a test pass.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_greeting_causes_oldstyle_bytes_with_flags_13() {
        let g = c_greeting(1 << 20);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], &proto::INIT_MAGIC.to_be_bytes());
        assert_eq!(&g[16..24], &(1u64 << 20).to_be_bytes());
        assert_eq!(&g[24..28], &13u32.to_be_bytes());
        assert!(g[28..].iter().all(|b| *b == 0));
        assert_ne!(&wrong_magic_greeting(1)[8..16], &g[8..16]);
        assert_eq!(&MIRROR_HANDLE.to_be_bytes(), b".MIRROR.");
    }

    #[test]
    fn fake_dest_connections_cause_counts_and_silence_causes_none() {
        let dest = FakeDest::bind();
        assert!(dest.accept_within(Duration::from_millis(50)).is_none());
        let _a = TcpStream::connect(dest.addr).unwrap();
        let _b = TcpStream::connect(dest.addr).unwrap();
        let first = dest.expect_connection(Duration::from_secs(5));
        assert_eq!(first.peer.ip().to_string(), "127.0.0.1");
        assert_eq!(dest.connections_during(Duration::from_millis(300)), 1);
        assert_eq!(dest.try_clone().connections(), 2);
    }

    #[test]
    fn c_destination_and_fake_source_cause_stored_writes_and_recorded_commands() {
        let dest = FakeDest::bind();
        let d = dest.try_clone();
        let script = in_background(move || {
            let mut c = d.expect_connection(Duration::from_secs(5));
            serve_c_destination(&mut c, 8192, 0xff)
        });
        let mut s = FakeSource::connect(dest.addr);
        assert_eq!(s.read_greeting(), (8192, 13));
        let r = s.write_and_reply(MIRROR_HANDLE, 4096, b"abcd");
        assert_eq!((r.error, r.handle), (0, MIRROR_HANDLE));
        s.request(cmd::ENTRUST, 7, 0, 0);
        assert_eq!(s.read_reply().error, proto::errno::EINVAL);
        s.request(cmd::FLUSH, 8, 0, 0);
        assert_eq!(s.read_reply().error, 0);
        let r = s.write_and_reply(9, 8190, b"abcd");
        assert_eq!(r.error, proto::errno::ENOSPC);
        s.disconnect(10);
        let run = script.join_within(Duration::from_secs(5));
        assert!(run.disconnected);
        assert_eq!(&run.image[4096..4100], b"abcd");
        assert_eq!(run.image[0], 0xff);
        assert_eq!(
            run.kinds(),
            vec![cmd::WRITE, cmd::ENTRUST, cmd::FLUSH, cmd::WRITE, cmd::DISC]
        );
    }

    #[test]
    #[should_panic(expected = "scripted failure")]
    fn panicking_script_causes_join_to_panic() {
        in_background(|| panic!("scripted failure")).join_within(Duration::from_secs(5))
    }

    #[test]
    fn peer_closing_with_unread_bytes_causes_reset_and_after_reading_them_clean() {
        let dest = FakeDest::bind();
        for read_first in [false, true] {
            let mut s = FakeSource::connect(dest.addr);
            let mut c = dest.expect_connection(Duration::from_secs(5));
            s.send(b"unread unless read_first");
            if read_first {
                c.read_payload(24);
            } else {
                // The bytes must be queued at `c` before it closes.
                wait_readable(&c.stream);
            }
            drop(c);
            let expected = if read_first {
                Ending::Clean
            } else {
                Ending::Reset
            };
            assert_eq!(
                ending_within(&mut s.stream, Duration::from_secs(5)),
                expected
            );
        }
        let mut s = FakeSource::connect(dest.addr);
        let _open = dest.expect_connection(Duration::from_secs(5));
        assert_eq!(
            ending_within(&mut s.stream, Duration::from_millis(100)),
            Ending::Open
        );
    }

    /// Waits (bounded) until `stream` has bytes to read, without taking them.
    fn wait_readable(stream: &TcpStream) {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        assert_eq!(stream.peek(&mut b).expect("bytes to arrive"), 1);
    }

    #[test]
    fn closed_peer_causes_eof_and_open_peer_causes_none() {
        let dest = FakeDest::bind();
        let mut s = FakeSource::connect(dest.addr);
        let c = dest.expect_connection(Duration::from_secs(5));
        assert!(!s.sees_eof_within(Duration::from_millis(100)));
        drop(c);
        assert!(s.sees_eof_within(Duration::from_secs(2)));
    }
}
