//! How bytes move. The server, the mirror and every client reach the network
//! only through [`Transport`], so a fault-injecting transport can stand in for
//! [`Tcp`] anywhere without the connection code knowing.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

mod tcp;
pub use tcp::{Tcp, TcpListenerHandle};

/// A connected byte stream that can be split into independently owned halves
/// (a reader task and reply writers work on a connection at the same time).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {
    type Read: AsyncRead + Unpin + Send + Sync + 'static;
    type Write: AsyncWrite + Unpin + Send + Sync + 'static;
    fn into_split(self) -> (Self::Read, Self::Write);
}

/// In-memory streams: the fuzz targets (and tests) run a whole server
/// connection over one.
impl Stream for tokio::io::DuplexStream {
    type Read = tokio::io::ReadHalf<tokio::io::DuplexStream>;
    type Write = tokio::io::WriteHalf<tokio::io::DuplexStream>;
    fn into_split(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// A bound, listening socket.
pub trait Listener: Send + 'static {
    type Stream: Stream;
    /// Waits for the next connection and returns it with the peer's address.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// Creates listeners and outgoing connections.
pub trait Transport: Clone + Send + Sync + 'static {
    type Stream: Stream;
    type Listener: Listener<Stream = Self::Stream>;

    fn bind(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Listener>> + Send;

    /// Connects to `addr`, optionally from the local address `bind`, failing
    /// after `timeout`.
    fn connect(
        &self,
        addr: SocketAddr,
        bind: Option<SocketAddr>,
        timeout: Duration,
    ) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}
