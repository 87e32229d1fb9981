//! The NBD server: accept loop, client slots, ACL, and per-connection tasks.

mod negotiate;
mod transmission;
mod writer;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::acl::Acl;
use crate::probe::{Action, Probe, Step};
use crate::proto::flags;
use crate::store::Image;
use crate::transport::{Listener, Transport};
use crate::{debug, error, info, warn};

pub use negotiate::Negotiated;

/// Which greeting the server sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeMode {
    /// The 152-byte greeting of the C flexnbd: no negotiation.
    Oldstyle,
    /// Fixed newstyle with options (GO, INFO, structured replies, ...).
    Newstyle,
}

/// Settings for one server.
#[derive(Clone, Debug)]
pub struct Config {
    pub handshake: HandshakeMode,
    /// Connections beyond this many are closed at once, with no greeting.
    pub max_clients: usize,
    /// A newstyle client that has not finished negotiating by then is dropped.
    pub handshake_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            handshake: HandshakeMode::Oldstyle,
            max_clients: 16,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The transmission flags we really support, for a connection that did
/// (or did not) negotiate structured replies.
pub fn transmission_flags(structured: bool) -> u16 {
    let mut f = flags::HAS_FLAGS
        | flags::SEND_FLUSH
        | flags::SEND_FUA
        | flags::SEND_TRIM
        | flags::SEND_WRITE_ZEROES
        | flags::CAN_MULTI_CONN
        | flags::SEND_CACHE;
    if structured {
        f |= flags::SEND_DF;
    }
    f
}

/// State shared by the accept loop and every connection.
pub struct Shared<P: Probe> {
    pub image: Arc<Image>,
    pub config: Config,
    pub probe: Arc<P>,
    pub acl: RwLock<Arc<Acl>>,
    clients: AtomicUsize,
}

impl<P: Probe> Shared<P> {
    pub fn new(image: Arc<Image>, config: Config, acl: Acl, probe: Arc<P>) -> Arc<Shared<P>> {
        Arc::new(Shared {
            image,
            config,
            probe,
            acl: RwLock::new(Arc::new(acl)),
            clients: AtomicUsize::new(0),
        })
    }

    pub fn num_clients(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }
}

/// Releases a client slot when the connection task ends, however it ends.
struct Slot<P: Probe>(Arc<Shared<P>>);

impl<P: Probe> Drop for Slot<P> {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts connections forever, giving each permitted client a task.
pub async fn accept_loop<T: Transport, P: Probe>(
    mut listener: T::Listener,
    shared: Arc<Shared<P>>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                error!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Action::Crash = shared.probe.step(Step::Accept) {
            faults::crash_now();
        }
        let allowed = shared
            .acl
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .allows(peer.ip());
        if !allowed {
            warn!("rejecting client {peer}: not allowed by the access control list");
            drop(stream);
            continue;
        }
        let taken = shared.clients.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(shared.clone());
        if taken >= shared.config.max_clients {
            warn!(
                "too many clients: rejecting {peer}, all {} slots are in use",
                shared.config.max_clients
            );
            drop(stream);
            drop(slot);
            continue;
        }
        debug!("accepted client {peer}");
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match transmission::serve_client(stream, peer, shared).await {
                Ok(()) => info!("client {peer} finished"),
                Err(e) => info!("client {peer} dropped: {e}"),
            }
        });
    }
}

/// Binds the listening socket, reporting the address really bound.
pub async fn bind<T: Transport>(
    transport: &T,
    addr: SocketAddr,
) -> std::io::Result<(T::Listener, SocketAddr)> {
    let listener = transport.bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
