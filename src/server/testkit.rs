//! A connection over an in-memory stream and a temporary image, for the
//! unit tests of the transmission phase's parts.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use super::batch::{Batch, MAX_DEFERRED, MAX_DEFERRED_READS};
use super::dest_hook::Session;
use super::negotiate::Negotiated;
use super::transmission::Connection;
use super::writer::ReplyWriter;
use crate::handoff::Destination;
use crate::probe::{Probe, Quiet};
use crate::proto::{Request, SimpleReply, SIMPLE_REPLY_LEN};
use crate::store::Image;

pub(super) type TestConn<P = Quiet> =
    Connection<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>, P>;

pub(super) struct Kit<P: Probe = Quiet> {
    pub conn: TestConn<P>,
    /// The client's end.
    pub client: DuplexStream,
    pub image: Arc<Image>,
    pub path: std::path::PathBuf,
    pub destination: Option<Arc<Destination>>,
    _dir: tempfile::TempDir,
}

/// A connection to an image of `size` bytes (zeros); with `destination`, a
/// `listen` connection whose hand-off runs on a real marker beside it.
pub(super) fn kit(size: u64, destination: bool) -> Kit {
    kit_with(size, destination, Arc::new(Quiet))
}

/// [`kit`] with the connection's steps announced to `probe`.
pub(super) fn kit_with<P: Probe>(size: u64, destination: bool, probe: Arc<P>) -> Kit<P> {
    kit_stacked(size, destination, probe, crate::store::Stack::default())
}

/// [`kit_with`] on an image opened with `stack` (a fault plan's store
/// faults, say).
pub(super) fn kit_stacked<P: Probe>(
    size: u64,
    destination: bool,
    probe: Arc<P>,
    stack: crate::store::Stack,
) -> Kit<P> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("image");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(size))
        .expect("a temporary image");
    let image = Arc::new(Image::open_stacked(&path, stack).expect("the temporary image opens"));
    let destination = destination.then(|| {
        Arc::new(
            Destination::prepare(Arc::new(crate::store::files::Disk), &path, false)
                .expect("prepare"),
        )
    });
    let (conn, client) = connect(&image, destination.clone(), probe, "127.0.0.1:4000");
    Kit {
        conn,
        client,
        image,
        path,
        destination,
        _dir: dir,
    }
}

/// A connection from `peer` to `image` (in `listen` with `destination`),
/// and the client's end of it.
fn connect<P: Probe>(
    image: &Arc<Image>,
    destination: Option<Arc<Destination>>,
    probe: Arc<P>,
    peer: &str,
) -> (TestConn<P>, DuplexStream) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let (read, write) = tokio::io::split(server);
    let conn = Connection {
        reader: BufReader::new(read),
        writer: Arc::new(Mutex::new(ReplyWriter::new(write))),
        image: image.clone(),
        negotiated: Negotiated::default(),
        probe,
        deferred: Arc::new(Semaphore::new(MAX_DEFERRED as usize)),
        reads: Arc::new(Semaphore::new(MAX_DEFERRED_READS)),
        all_reads: Arc::new(Semaphore::new(super::batch::ALL_DEFERRED_READS)),
        payload: Vec::new(),
        batch: Batch::default(),
        peer: peer.parse().expect("an address"),
        stop: CancellationToken::new(),
        killswitch: None,
        session: destination.map(|d| Session::open(d, peer.into())),
    };
    (conn, client)
}

impl<P: Probe> Kit<P> {
    /// The connection ends and a new one from `peer` takes its place, to
    /// the same image (and destination): a new sender.
    pub fn reconnect(&mut self, peer: &str) {
        let (conn, client) = connect(
            &self.image,
            self.destination.clone(),
            self.conn.probe.clone(),
            peer,
        );
        self.conn = conn;
        self.client = client;
    }

    /// Sends a request header (and its payload) as a client would.
    pub async fn send(&mut self, req: Request, payload: &[u8]) {
        self.client.write_all(&req.encode()).await.expect("send");
        self.client.write_all(payload).await.expect("send");
    }

    /// Reads one simple reply, waiting at most 10 s.
    pub async fn reply(&mut self) -> SimpleReply {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.client.read_exact(&mut b),
        )
        .await
        .expect("a reply within 10 s")
        .expect("a reply");
        SimpleReply::decode(&b)
    }

    /// Reads `n` bytes from the client's end, waiting at most 10 s.
    pub async fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            self.client.read_exact(&mut b),
        )
        .await
        .expect("bytes within 10 s")
        .expect("bytes");
        b
    }

    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("the image reads")
    }
}
