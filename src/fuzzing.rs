//! Entry points for coverage-guided fuzzing: one function per target, each
//! taking the bytes a stranger (or a damaged file) could hand flexnbd. The
//! fuzz crate (`fuzz/`, run by `scripts/fuzz`) calls them under libFuzzer;
//! the tests below replay every committed input through the same functions,
//! so an input that once crashed or hung stays a regression test.
//!
//! A target fails by panicking: a panic in flexnbd's own code, or the
//! harness's own verdict that the code under test did not finish within
//! [`HANG`] after its input ended (a stuck task), or broke an invariant the
//! target checks (see each).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::acl::Acl;
use crate::handoff::{Destination, Marker};
use crate::probe::Quiet;
use crate::server::{Config, HandshakeMode, Shared};
use crate::store::Image;

/// Every target, by the name `scripts/fuzz` and the corpus folders use.
pub const TARGETS: &[&str] = &[
    "serve_oldstyle",
    "serve_newstyle",
    "serve_tls",
    "listen",
    "mirror_replies",
    "client",
    "proxy_upstream",
    "codec",
    "control",
    "fault_plan",
    "marker",
];

/// How long the code under test may take after its input ended (the peer
/// closed its side) before the target calls it stuck. Generous beside the
/// milliseconds an input takes: a slow machine must not report a hang.
pub const HANG: Duration = Duration::from_secs(5);

/// The image a server target serves: small, so that any request's length
/// is bounded by it, and made afresh for every input so that one input's
/// writes (or a hand-off it completed) cannot change how the next behaves.
const IMAGE_SIZE: u64 = 1 << 20;

/// Runs `name`'s target on `data`. `tls` is a directory holding
/// `server-cert.pem` and `server-key.pem` (test-only credentials the
/// caller made: none are committed), which `serve_tls` needs and the
/// others ignore. Unknown names panic: a caller's typo must not pass as a
/// clean run.
pub fn run(name: &str, data: &[u8], tls: Option<&Path>) {
    match name {
        "serve_oldstyle" => serve(data, Server::Oldstyle, None),
        "serve_newstyle" => serve(data, Server::Newstyle, None),
        "serve_tls" => serve(
            data,
            Server::Tls,
            Some(tls.expect("serve_tls needs a directory of TLS credentials")),
        ),
        "listen" => serve(data, Server::Listen, None),
        "mirror_replies" => mirror_replies(data),
        "client" => client(data),
        "proxy_upstream" => proxy_upstream(data),
        "codec" => codec(data),
        "control" => control(data),
        "fault_plan" => fault_plan(data),
        "marker" => marker(data),
        other => panic!("no fuzz target named {other:?}; expected one of {TARGETS:?}"),
    }
}

/// Which server a server target runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// `serve` as the C flexnbd: the oldstyle greeting, then requests.
    Oldstyle,
    /// `serve --newstyle`: option haggling (GO, INFO, LIST, STARTTLS,
    /// structured replies, meta contexts), then requests.
    Newstyle,
    /// `serve --newstyle` with TLS offered (`--tls optional`): STARTTLS
    /// and the TLS handshake (rustls parsing the client's hello), and
    /// plaintext clients beside it.
    Tls,
    /// `listen`: the oldstyle greeting with flexnbd's extensions offered,
    /// then requests including RESUME, checkpoints and ENTRUST, against a
    /// real marker.
    Listen,
}

/// Runs `work` on a runtime of its own: one per input, so that nothing
/// one input left behind (a task, a timer) reaches the next.
fn on_runtime<F: std::future::Future>(work: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for the fuzz target")
        .block_on(work)
}

/// Feeds `data` to a server as one client connection's bytes, then closes
/// the client's sending side; reads and discards whatever the server
/// sends. The server must end the connection within [`HANG`].
pub fn serve(data: &[u8], kind: Server, tls: Option<&Path>) {
    let dir = Scratch::new();
    let path = dir.0.join("image");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("a temporary image");
    let shared = server(&path, kind, tls);
    on_runtime(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "127.0.0.1:4000".parse().expect("an address");
        let session = crate::server::serve_client(server, peer, shared, CancellationToken::new());
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let feed = async {
            // A server that stopped reading has closed: the write
            // fails, which is an ending like any other.
            let _ = to_server.write_all(data).await;
            let _ = to_server.shutdown().await;
        };
        let drain = async {
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut from_server, &mut sink).await;
        };
        let all = async { tokio::join!(session, feed, drain) };
        if tokio::time::timeout(HANG, all).await.is_err() {
            panic!(
                "{kind:?}: the server had not ended the connection {HANG:?} after the \
                     client's {} bytes ended",
                data.len()
            );
        }
    })
}

/// A directory of this process's own for one input's image and marker,
/// removed with everything in it when the input is done.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Scratch {
        // Unique without a counter shared by the process: this process's
        // id and the clock, and the next name while one is taken.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for attempt in 0u32.. {
            let dir = std::env::temp_dir().join(format!(
                "flexnbd-fuzz-{}-{nanos}-{attempt}",
                std::process::id()
            ));
            match std::fs::create_dir(&dir) {
                Ok(()) => return Scratch(dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("cannot make {}: {e}", dir.display()),
            }
        }
        unreachable!("some name is free")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn server(path: &Path, kind: Server, tls: Option<&Path>) -> Arc<Shared<Quiet>> {
    let image = Arc::new(Image::open(path).expect("the fuzz image opens"));
    let config = Config {
        handshake: match kind {
            Server::Newstyle | Server::Tls => HandshakeMode::Newstyle,
            Server::Oldstyle | Server::Listen => HandshakeMode::Oldstyle,
        },
        // The handshake's own timeout is real time; the harness's HANG
        // catches a handshake that never ends.
        handshake_timeout: Duration::from_secs(1),
        oldstyle_extra_flags: kind == Server::Listen,
        tls: tls.map(server_tls),
        extensions: if kind == Server::Listen {
            crate::proto::ext::LISTEN
        } else {
            0
        },
        ..Config::default()
    };
    let destination = (kind == Server::Listen).then(|| {
        Arc::new(
            Destination::prepare(Arc::new(crate::store::files::Disk), path, false)
                .expect("the fuzz image's marker"),
        )
    });
    Shared::with_destination(image, config, Acl::default(), Arc::new(Quiet), destination)
}

/// The credentials in `dir`, offered with `--tls optional`.
fn server_tls(dir: &Path) -> Arc<crate::tls::ServerTls> {
    let files = crate::tls::ServerFiles {
        cert: Some(dir.join("server-cert.pem")),
        key: Some(dir.join("server-key.pem")),
        policy: Some(crate::tls::Policy::Optional),
        ..Default::default()
    };
    files
        .load()
        .unwrap_or_else(|e| panic!("the TLS credentials in {} do not load: {e}", dir.display()))
        .expect("TLS settings were given")
}

/// Feeds `data` to the mirror's pipe as a destination's replies, while
/// the pipe sends what a migration sends: the resume query, writes, a
/// checkpoint, zeroes, a digest, entrust, then DISCONNECT. Each reply
/// must be matched to its request by handle (1, 2, ... in that order) and
/// carry the payload its kind has. A reply stream that ends or lies fails
/// the pipe; it must never panic or hang.
pub fn mirror_replies(data: &[u8]) {
    let _ = mirror_session(data);
}

/// [`mirror_replies`], saying how far the migration got: `Ok` once every
/// request was answered and DISCONNECT went.
fn mirror_session(data: &[u8]) -> Result<(), String> {
    use crate::mirror::pipe::Pipe;
    use crate::proto::cmd;
    on_runtime(async {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (from_source, to_source) = tokio::io::split(theirs);
        let destination = answer_in_step(data, from_source, to_source);
        let migrate = async move {
            let mut pipe = Pipe::new(ours, Duration::from_secs(1), Arc::new(Quiet));
            let block = [0x5au8; 4096];
            let steps = async {
                let resume = pipe.call_with(cmd::RESUME, 0x1234, 16, 16).await?;
                for i in 0..4 {
                    pipe.write(i * 4096, &block, true).await?;
                }
                let mut checkpoint = pipe.checkpoint(0x1234, 1).await?;
                pipe.zeroes(16 * 4096, 8192).await?;
                let digest = pipe.request(cmd::DIGEST, 0, 4096, 32).await?;
                pipe.answer(digest).await?;
                pipe.wait_idle().await?;
                let _ = pipe.poll_checkpoint(&mut checkpoint);
                pipe.call_with(cmd::ENTRUST, 5, 0, 0).await?;
                Ok::<_, crate::mirror::pipe::PipeError>(resume)
            };
            steps.await.map_err(|e| e.to_string())?;
            pipe.disconnect().await.map_err(|e| e.to_string())
        };
        let all = async { tokio::join!(migrate, destination) };
        match tokio::time::timeout(HANG, all).await {
            Ok((outcome, ())) => outcome,
            Err(_) => panic!(
                "the mirror's pipe had not finished {HANG:?} after the destination's {} bytes ended",
                data.len()
            ),
        }
    })
}

/// A destination whose replies are `data`, given out as a real one would:
/// the next reply only once the next request arrived, so that a reply can
/// name a request in flight. A reply is 16 bytes, and the payload its
/// request's kind carries when it says success (RESUME's 16 bytes, a
/// DIGEST's 32); bytes that are no reply at all go out whole. After the
/// source closes, whatever is left goes too.
async fn answer_in_step<R, W>(data: &[u8], mut from_source: R, mut to_source: W)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use crate::proto::{cmd, Request, REQUEST_LEN, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC};
    let mut rest = data;
    let mut header = [0u8; REQUEST_LEN];
    while !rest.is_empty() {
        if from_source.read_exact(&mut header).await.is_err() {
            break;
        }
        let request = Request::decode(&header);
        if request.kind == cmd::WRITE {
            let mut payload = (&mut from_source).take(u64::from(request.length));
            if tokio::io::copy(&mut payload, &mut tokio::io::sink())
                .await
                .is_err()
            {
                break;
            }
        }
        let unit = match rest.get(..SIMPLE_REPLY_LEN) {
            Some(reply) if reply[..4] == SIMPLE_REPLY_MAGIC.to_be_bytes() => {
                let ok = reply[4..8] == [0; 4];
                let payload = match request.kind {
                    cmd::RESUME if ok => request.length as usize,
                    cmd::DIGEST if ok => 32,
                    _ => 0,
                };
                (SIMPLE_REPLY_LEN + payload).min(rest.len())
            }
            _ => rest.len(),
        };
        if to_source.write_all(&rest[..unit]).await.is_err() {
            return;
        }
        rest = &rest[unit..];
    }
    let _ = to_source.write_all(rest).await;
    let _ = to_source.shutdown().await;
    // Read on until the source closes, so that its sends never block.
    let _ = tokio::io::copy(&mut from_source, &mut tokio::io::sink()).await;
}

/// Feeds `data` to the client as a server's bytes: the greeting and
/// handshake (either style), then, once an export was agreed, a read of its
/// first 4096 bytes whose reply comes from the rest of `data`. The client names
/// its request with a random handle, which no input could guess: the
/// replies' handle fields (found by walking the replies as a client would)
/// are given the request's handle, so that the fuzzer reaches what comes
/// after the handle check.
pub fn client(data: &[u8]) {
    let _ = client_session(data);
}

/// [`client`], saying how far it got: `Ok` with the bytes read once the
/// read was answered in full.
fn client_session(data: &[u8]) -> Result<Vec<u8>, String> {
    on_runtime(async {
        let session = async {
            let mut stream = crate::tls::Conn::Plain(Scripted::new(data));
            let export = crate::client::handshake(&mut stream, None)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            // 4096 bytes: the read the recorded seeds answer.
            let len = export.size.min(4096);
            let mut got = Vec::new();
            crate::client::read(&mut stream, &export, 0, len, &mut got, None)
                .await
                .map_err(|e| format!("read: {e}"))?;
            Ok(got)
        };
        match tokio::time::timeout(HANG, session).await {
            Ok(outcome) => outcome,
            Err(_) => panic!(
                "the client had not finished {HANG:?} after the server's {} bytes ended",
                data.len()
            ),
        }
    })
}

/// Feeds `data` to the proxy as its upstream server's bytes: the greeting
/// (either style, and a newstyle negotiation), then the reply to one READ
/// of the export's first 4096 bytes, handle fields given the request's handle
/// as in [`client`]. One connection and one exchange: the proxy's own
/// loop would reconnect and resend for ever.
pub fn proxy_upstream(data: &[u8]) {
    let _ = proxy_session(data);
}

/// [`proxy_upstream`], saying how far it got: `Ok` once the read was
/// answered.
fn proxy_session(data: &[u8]) -> Result<(), String> {
    on_runtime(async {
        let transport = ScriptedTransport(Arc::new(std::sync::Mutex::new(Some(data.to_vec()))));
        // 4096 bytes: the read the recorded seeds answer.
        let once = crate::proxy::upstream_once(transport, 4096);
        match tokio::time::timeout(HANG, once).await {
            Ok(outcome) => outcome,
            Err(_) => panic!(
                "the proxy had not finished {HANG:?} after the upstream's {} bytes ended",
                data.len()
            ),
        }
    })
}

/// A transport whose first connection is a [`Scripted`] server saying
/// the bytes given; any later one is refused, and nothing listens.
#[derive(Clone)]
struct ScriptedTransport(Arc<std::sync::Mutex<Option<Vec<u8>>>>);

/// A listener that never gets a connection.
struct NoListener;

impl crate::transport::Listener for NoListener {
    type Stream = Scripted;
    async fn accept(&mut self) -> std::io::Result<(Scripted, SocketAddr)> {
        std::future::pending().await
    }
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

impl crate::transport::Transport for ScriptedTransport {
    type Stream = Scripted;
    type Listener = NoListener;

    async fn bind(&self, _: SocketAddr) -> std::io::Result<NoListener> {
        Ok(NoListener)
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        _: Option<SocketAddr>,
        _: Duration,
    ) -> std::io::Result<Scripted> {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(data) => Ok(Scripted::new(&data)),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("{addr}: the scripted server says its bytes only once"),
            )),
        }
    }
}

impl crate::transport::Stream for Scripted {
    type Read = tokio::io::ReadHalf<Scripted>;
    type Write = tokio::io::WriteHalf<Scripted>;
    fn into_split(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// A server that says `data` and then ends, whatever it is told; once the
/// client sends a transmission request, the handle fields of the replies
/// that follow in `data` say that request's handle.
struct Scripted {
    data: Vec<u8>,
    /// How much of `data` the client has read.
    at: usize,
    /// Ranges of `data` to show as `handle` instead.
    patches: Vec<std::ops::Range<usize>>,
    handle: [u8; 8],
}

impl Scripted {
    fn new(data: &[u8]) -> Scripted {
        Scripted {
            data: data.to_vec(),
            at: 0,
            patches: Vec::new(),
            handle: [0; 8],
        }
    }

    /// The client sent `request` when it had read `at` bytes: walk the
    /// replies from there (simple replies, with a read's data when one
    /// says success: our clients never ask for structured replies, and
    /// refuse one at its magic) and note where each handle field is.
    fn requested(&mut self, request: &crate::proto::Request) {
        use crate::proto::{cmd, SIMPLE_REPLY_MAGIC};
        self.handle = request.handle.to_be_bytes();
        self.patches.clear();
        let word = |d: &[u8], at: usize| -> Option<u32> {
            Some(u32::from_be_bytes(d.get(at..at + 4)?.try_into().ok()?))
        };
        let mut at = self.at;
        while at + 16 <= self.data.len() {
            match word(&self.data, at) {
                Some(SIMPLE_REPLY_MAGIC) => {
                    self.patches.push(at + 8..at + 16);
                    let ok = word(&self.data, at + 4) == Some(0);
                    let payload = if ok && request.kind == cmd::READ {
                        request.length as usize
                    } else {
                        0
                    };
                    at += 16 + payload;
                }
                _ => break,
            }
        }
    }
}

impl tokio::io::AsyncRead for Scripted {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let n = buf.remaining().min(this.data.len() - this.at);
        let mut out = this.data[this.at..this.at + n].to_vec();
        for patch in &this.patches {
            for i in patch.clone() {
                if (this.at..this.at + n).contains(&i) {
                    out[i - this.at] = this.handle[i - patch.start];
                }
            }
        }
        buf.put_slice(&out);
        this.at += n;
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for Scripted {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use crate::proto::{Request, REQUEST_LEN, REQUEST_MAGIC};
        let this = self.get_mut();
        if let Some(header) = buf.get(..REQUEST_LEN) {
            if header[..4] == REQUEST_MAGIC.to_be_bytes() {
                this.requested(&Request::decode(header.try_into().unwrap()));
            }
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Feeds `data` to every fixed-layout decoder of the wire codec, each
/// from the input's first bytes: the request header, the simple reply,
/// the structured reply chunk header (which none of our clients reads,
/// since none asks for structured replies, but which the codec offers),
/// the option header and the option reply header; and the whole input to
/// the variable-length decoders of option data (INFO/GO, meta contexts,
/// INFO_EXPORT). Whatever decodes must encode back to the same bytes.
pub fn codec(data: &[u8]) {
    use crate::proto::{
        decode_info_export, info_export, ChunkHeader, InfoRequest, MetaContextRequest,
        OptionHeader, OptionReplyHeader, Request, SimpleReply,
    };
    fn first<const N: usize>(data: &[u8]) -> Option<&[u8; N]> {
        data.get(..N)?.try_into().ok()
    }
    if let Some(b) = first::<{ crate::proto::REQUEST_LEN }>(data) {
        assert_eq!(&Request::decode(b).encode(), b, "a request header");
    }
    if let Some(b) = first::<{ crate::proto::SIMPLE_REPLY_LEN }>(data) {
        assert_eq!(&SimpleReply::decode(b).encode(), b, "a simple reply");
    }
    if let Some(b) = first::<{ crate::proto::STRUCTURED_HEADER_LEN }>(data) {
        if let Some(h) = ChunkHeader::decode(b) {
            assert_eq!(&h.encode(), b, "a structured reply chunk header");
        }
    }
    if let Some(b) = first::<16>(data) {
        if let Ok(h) = OptionHeader::decode(b) {
            assert_eq!(&h.encode(), b, "an option header");
        }
    }
    if let Some(b) = first::<20>(data) {
        if let Ok(h) = OptionReplyHeader::decode(b) {
            assert_eq!(&h.encode(), b, "an option reply header");
        }
    }
    if let Ok(r) = InfoRequest::decode(data) {
        assert_eq!(r.encode(), data, "INFO/GO data");
    }
    if let Ok(r) = MetaContextRequest::decode(data) {
        assert_eq!(r.encode(), data, "meta context data");
    }
    if let Some((size, flags)) = decode_info_export(data) {
        assert_eq!(&info_export(size, flags)[..], data, "INFO_EXPORT data");
    }
}

/// Feeds `data` to the control socket's request reader, then parses the
/// request and its arguments as the server would before acting on them.
pub fn control(data: &[u8]) {
    on_runtime(async {
        let mut reader = BufReader::new(data);
        let lines = match crate::control::read_request(&mut reader).await {
            Ok(Ok(lines)) => lines,
            // Refused (too long, too many lines) or unreadable: the
            // answer says so and nothing else runs.
            Ok(Err(_)) | Err(_) => return,
        };
        // What is left unread must be the rest of the input, never more.
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest).await;
        assert!(rest.len() <= data.len());
        use crate::control::protocol::{parse_bps, parse_mirror, parse_request, Request};
        match parse_request(&lines) {
            Request::Acl(entries) => {
                let _ = Acl::parse(&entries, false);
            }
            Request::Mirror(args) | Request::MirrorFollow(args) => {
                let _ = parse_mirror(&args);
            }
            Request::MirrorMaxBps(args) => {
                if let Some(first) = args.first() {
                    let _ = parse_bps(first);
                }
            }
            _ => {}
        }
    })
}

/// Parses `data` as a fault plan (as given by `--faults` or
/// `FLEXNBD_FAULTS`). A plan that parses must parse again, the same, from
/// its own rendering.
pub fn fault_plan(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(plan) = faults::FaultPlan::parse(text) else {
        return;
    };
    let shown = plan.to_string();
    let again = faults::FaultPlan::parse(&shown)
        .unwrap_or_else(|e| panic!("plan {text:?} shows as {shown:?}, which does not parse: {e}"));
    assert_eq!(
        again.to_string(),
        shown,
        "plan {text:?} changed when parsed again"
    );
}

/// Parses `data` as a `.INCOMPLETE` marker and as a completion record: a
/// marker that parses renders to text that parses to the same marker.
pub fn marker(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let marker = Marker::parse(&text);
    let again = Marker::parse(&marker.render());
    assert_eq!(
        again, marker,
        "a marker rendered and parsed again changed: {text:?}"
    );
    if let Some(record) = crate::handoff::Record::parse(&text) {
        assert_eq!(
            crate::handoff::Record::parse(&record.render()),
            Some(record),
            "a record rendered and parsed again changed: {text:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test-only credentials for `serve_tls`, made afresh.
    fn credentials() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("a directory for the credentials");
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("a self-signed certificate");
        std::fs::write(dir.path().join("server-cert.pem"), made.cert.pem()).unwrap();
        std::fs::write(
            dir.path().join("server-key.pem"),
            made.signing_key.serialize_pem(),
        )
        .unwrap();
        dir
    }

    /// Every committed input of every target (its seed corpus and the
    /// inputs that once failed) runs clean.
    #[test]
    fn every_committed_fuzz_input_runs_clean() {
        let creds = credentials();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut ran = 0;
        for target in TARGETS {
            for kind in ["corpus", "regressions"] {
                let dir = root.join(kind).join(target);
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.expect("a directory entry").path();
                    let data = std::fs::read(&path).expect("a committed input");
                    run(target, &data, Some(creds.path()));
                    ran += 1;
                }
            }
        }
        // Every target has committed inputs: a folder renamed away must
        // not turn this into a test of nothing.
        assert!(ran >= TARGETS.len(), "only {ran} committed inputs ran");
    }

    #[test]
    fn every_target_has_a_seed_corpus() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for target in TARGETS {
            let n = std::fs::read_dir(root.join(target)).map_or(0, |d| d.count());
            assert!(n > 0, "fuzz/corpus/{target} holds no seed inputs");
        }
    }

    /// The migration target reaches its end when the destination answers
    /// as a real one does: a reply stream the fuzzer can find, and the
    /// proof that the target is not stuck at its first request.
    #[test]
    fn well_formed_replies_take_the_mirror_target_to_disconnect() {
        let mut replies = Vec::new();
        let mut reply = |handle: u64, payload: &[u8]| {
            replies.extend_from_slice(&crate::proto::SimpleReply::new(0, handle).encode());
            replies.extend_from_slice(payload);
        };
        // RESUME (checkpoint 0, and "holds data"), four writes, the
        // checkpoint, the zeroes, the digest, ENTRUST.
        reply(1, &[0u8; 16]);
        for handle in 2..=5 {
            reply(handle, &[]);
        }
        reply(6, &[]);
        reply(7, &[]);
        reply(8, &[7u8; 32]);
        reply(9, &[]);
        assert_eq!(mirror_session(&replies), Ok(()));
        // Cut short, it fails without hanging.
        assert!(mirror_session(&replies[..replies.len() - 4]).is_err());
    }

    /// The client target's recorded server bytes (replies that carried
    /// the recorded client's random handle) take today's client, with its
    /// own random handle, through the whole read: the handle fields are
    /// given the request's handle, so what comes after the handle check
    /// is reachable.
    #[test]
    fn recorded_replies_take_the_client_target_through_its_read() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/client");
        let mut reads = 0;
        for entry in std::fs::read_dir(&dir).expect("the client target's seeds") {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            match client_session(&data) {
                Ok(got) if name.ends_with("-read") => {
                    assert!(!got.is_empty(), "{name}: nothing read");
                    reads += 1;
                }
                // A write session's replies answer a write, not a read.
                Err(e) if name.ends_with("-write") => {
                    assert!(e.starts_with("read:"), "{name}: {e}")
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(reads >= 2, "only {reads} recorded read sessions");
    }

    /// The fuzz binaries (fuzz/Cargo.toml's [[bin]]s, which scripts/fuzz
    /// lists) are exactly the targets, each with its file.
    #[test]
    fn the_fuzz_binaries_are_the_targets() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
        let mut bins: Vec<&str> = manifest
            .split("[[bin]]")
            .skip(1)
            .map(|b| {
                b.lines()
                    .find_map(|l| l.strip_prefix("name = \""))
                    .and_then(|l| l.strip_suffix('"'))
                    .expect("a [[bin]] with a name")
            })
            .collect();
        bins.sort_unstable();
        let mut targets = TARGETS.to_vec();
        targets.sort_unstable();
        assert_eq!(bins, targets, "fuzz/Cargo.toml's binaries against TARGETS");
        for t in TARGETS {
            let file = fuzz.join("fuzz_targets").join(format!("{t}.rs"));
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert!(
                text.contains(&format!("run(\"{t}\"")),
                "{} runs {t}",
                file.display()
            );
        }
    }

    /// The fuzz workspace builds the same versions of the crates both
    /// use as the project's own lock: what is fuzzed is what ships.
    #[test]
    fn the_fuzz_lock_matches_the_projects() {
        fn versions(lock: &str) -> std::collections::BTreeMap<String, Vec<String>> {
            let mut all: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for package in lock.split("[[package]]").skip(1) {
                let field = |key: &str| {
                    package
                        .lines()
                        .find_map(|l| l.strip_prefix(key))
                        .map(|v| v.trim_matches('"').to_string())
                };
                if let (Some(name), Some(version)) = (field("name = "), field("version = ")) {
                    all.entry(name).or_default().push(version);
                }
            }
            all
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let ours = versions(&std::fs::read_to_string(root.join("Cargo.lock")).unwrap());
        let fuzz = versions(&std::fs::read_to_string(root.join("fuzz/Cargo.lock")).unwrap());
        let mut compared = 0;
        for (name, v) in &ours {
            if let Some(w) = fuzz.get(name) {
                if v.len() == 1 && w.len() == 1 {
                    assert_eq!(v, w, "{name}: Cargo.lock against fuzz/Cargo.lock");
                    compared += 1;
                }
            }
        }
        assert!(compared > 20, "only {compared} crates compared");
    }

    /// The proxy target's recorded upstream bytes take the proxy through
    /// its greeting and its read, though the recording's handle was
    /// another; a reply cut short fails the exchange without a hang.
    #[test]
    fn recorded_upstream_bytes_take_the_proxy_target_through_its_read() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/proxy_upstream");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("the proxy target's seeds") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            assert_eq!(proxy_session(&data), Ok(()));
            assert!(proxy_session(&data[..data.len() - 1]).is_err());
            n += 1;
        }
        assert!(n >= 2, "only {n} seeds");
    }

    /// A session made by hand (the oldstyle greeting), its read's reply
    /// naming any handle: the client takes the data from it; with the
    /// wrong magic, or cut short, the read fails.
    #[test]
    fn a_hand_made_reply_with_any_handle_reaches_the_data() {
        let mut data = crate::proto::oldstyle_greeting(8192, 1).to_vec();
        let handshake = data.len();
        data.extend_from_slice(&crate::proto::SimpleReply::new(0, 0xdead).encode());
        data.extend_from_slice(&[9u8; 4096]);
        assert_eq!(client_session(&data), Ok(vec![9u8; 4096]));
        let mut wrong = data.clone();
        wrong[handshake] ^= 1;
        assert!(client_session(&wrong).is_err());
        assert!(client_session(&data[..data.len() - 1]).is_err());
    }

    #[test]
    #[should_panic(expected = "no fuzz target named")]
    fn an_unknown_target_is_refused() {
        run("serve_oldstlye", b"", None);
    }
}
