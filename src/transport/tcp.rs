//! The real transport: TCP with the socket options the C flexnbd uses.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use super::{Listener, Stream, Transport};

/// Backlog of the NBD listening socket. The C version's 10 is too short
/// for a burst: when a flood of connects (or 64 clients reconnecting at
/// once) fills the accept queue, the kernel drops the next SYNs and each
/// of those clients, the well-behaved ones too, waits a whole SYN
/// retransmit (1 s, then 3 s) before the accept loop even sees it. The
/// accept loop closes a connection past `--max-clients` at once, so the
/// queue only has to absorb bursts; the kernel caps it at somaxconn.
pub(crate) const BACKLOG: i32 = 1024;
/// `EADDRNOTAVAIL` (an address not configured yet) is retried this often,
/// one second apart; `EADDRINUSE` is not retried, so that a squatter never
/// receives migrated clients.
const BIND_ATTEMPTS: u32 = 10;

#[derive(Clone, Copy, Debug, Default)]
pub struct Tcp;

impl Stream for TcpStream {
    type Read = OwnedReadHalf;
    type Write = OwnedWriteHalf;
    fn into_split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        TcpStream::into_split(self)
    }
}

pub struct TcpListenerHandle {
    inner: TcpListener,
}

/// Keepalive 30/10/3 so dead clients are reaped, and no Nagle delay on
/// replies.
fn configure_client_socket(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

impl Listener for TcpListenerHandle {
    type Stream = TcpStream;

    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = self.inner.accept().await?;
        configure_client_socket(&stream)?;
        Ok((stream, peer))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

fn bind_once(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // An IPv6 address means IPv6 only: `0` is how operators ask for IPv4 ANY.
        socket.set_only_v6(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

impl Transport for Tcp {
    type Stream = TcpStream;
    type Listener = TcpListenerHandle;

    async fn bind(&self, addr: SocketAddr) -> io::Result<TcpListenerHandle> {
        let mut attempt = 1;
        loop {
            match bind_once(addr) {
                Ok(inner) => return Ok(TcpListenerHandle { inner }),
                Err(e)
                    if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) && attempt < BIND_ATTEMPTS =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        bind: Option<SocketAddr>,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        if let Some(local) = bind {
            socket.bind(local)?;
        }
        let stream = match tokio::time::timeout(timeout, socket.connect(addr)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connecting to {addr} took longer than {} s",
                        timeout.as_secs_f64()
                    ),
                ))
            }
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}
