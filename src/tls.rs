//! TLS for NBD's STARTTLS: certificate loading, and a connection that is
//! plaintext until the negotiation upgrades it.
//!
//! rustls (with the ring provider) does the cryptography. TLS 1.2 and 1.3
//! are offered, as the NBD specification asks; TLS 1.3 is preferred.
//!
//! Pre-shared keys (qemu's `tls-creds-psk`, nbdkit's `--tls-psk`) are not
//! offered: rustls implements PSK only for session resumption, not the
//! external keys those tools use, so x509 certificates are the only
//! credentials.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};

use crate::transport::Stream;

/// Why TLS settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {path}: {why}")]
    Read {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("the {what} {path} holds no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("the certificate {cert} and the key {key} cannot be used together: {why}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
    #[error("the CA file {path} cannot be used to verify peers: {why}")]
    Verifier { path: PathBuf, why: String },
    #[error("bad TLS host name {0:?}: expected a DNS name or an IP address")]
    HostName(String),
    #[error("{0}")]
    Usage(String),
}

fn read_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error = |why: String| TlsError::Read {
        what,
        path: path.to_path_buf(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "PEM certificate (-----BEGIN CERTIFICATE-----)",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: "key file",
            path: path.to_path_buf(),
            expected: "PEM private key (PKCS#8, PKCS#1 or SEC1)",
        },
        other => TlsError::Read {
            what: "key file",
            path: path.to_path_buf(),
            why: other.to_string(),
        },
    })
}

fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path, "CA file")? {
        roots.add(cert).map_err(|e| TlsError::Verifier {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether plaintext clients may use the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Every option but STARTTLS and ABORT is refused until TLS is up
    /// (the specification's FORCEDTLS).
    Required,
    /// STARTTLS is offered; plaintext clients are served too.
    Optional,
}

/// File names of a server's credentials, as given on the command line.
#[derive(Clone, Debug, Default)]
pub struct ServerFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub verify_peer: bool,
    /// `None`: required when a certificate is given.
    pub policy: Option<Policy>,
}

impl ServerFiles {
    /// Whether any TLS setting was given at all.
    pub fn any(&self) -> bool {
        self.cert.is_some()
            || self.key.is_some()
            || self.ca.is_some()
            || self.verify_peer
            || self.policy.is_some()
    }

    /// Loads the files. `Ok(None)` when no TLS setting was given.
    pub fn load(&self) -> Result<Option<Arc<ServerTls>>, TlsError> {
        if !self.any() {
            return Ok(None);
        }
        let acceptor = self.acceptor()?;
        Ok(Some(Arc::new(ServerTls {
            acceptor: std::sync::RwLock::new(acceptor),
            files: self.clone(),
            policy: self.policy.unwrap_or(Policy::Required),
            verify_peer: self.verify_peer,
        })))
    }

    /// Reads the certificate, key and CA files into an acceptor.
    fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Err(TlsError::Usage(
                "TLS needs both --tls-cert and --tls-key (the server's certificate and its private key)".into(),
            ));
        };
        if self.verify_peer && self.ca.is_none() {
            return Err(TlsError::Usage(
                "--tls-verify-peer needs --tls-ca: the CA that signs the clients' certificates"
                    .into(),
            ));
        }
        if self.ca.is_some() && !self.verify_peer {
            return Err(TlsError::Usage(
                "--tls-ca on a server is the CA of client certificates: add --tls-verify-peer to require them".into(),
            ));
        }
        let chain = read_certs(cert, "certificate file")?;
        let private = read_key(key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions");
        let builder = match &self.ca {
            Some(ca) if self.verify_peer => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(read_roots(ca)?, provider())
                        .build()
                        .map_err(|e| TlsError::Verifier {
                            path: ca.clone(),
                            why: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, private)
            .map_err(|e| TlsError::Pair {
                cert: cert.clone(),
                key: key.clone(),
                why: e.to_string(),
            })?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// A server's loaded TLS settings. The credentials can be read again
/// ([`ServerTls::reload`]) while it runs: connections already in TLS keep
/// the session they made; new handshakes use the new files.
pub struct ServerTls {
    acceptor: std::sync::RwLock<tokio_rustls::TlsAcceptor>,
    /// Where the credentials came from, to read them again.
    files: ServerFiles,
    pub policy: Policy,
    pub verify_peer: bool,
}

impl ServerTls {
    /// Reads the certificate, key and CA files again, and uses them for
    /// every handshake from now on. On any error (a file missing, a key
    /// that does not match its certificate, ...) the credentials in use
    /// stay, and the error says why. Blocking: file reads; call it off the
    /// async workers.
    pub fn reload(&self) -> Result<(), TlsError> {
        let acceptor = self.files.acceptor()?;
        *self.acceptor.write().unwrap_or_else(|p| p.into_inner()) = acceptor;
        Ok(())
    }

    /// [`ServerTls::reload`] on a blocking thread, logged: the outcome
    /// line for the control socket or the log.
    pub async fn reload_logged(self: &Arc<Self>) -> Result<String, String> {
        let tls = self.clone();
        let files = describe(&[
            ("certificate", &self.files.cert),
            ("key", &self.files.key),
            ("CA", &self.files.ca),
        ]);
        reload_logged("TLS credentials", files, move || tls.reload()).await
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("policy", &self.policy)
            .field("verify_peer", &self.verify_peer)
            .finish_non_exhaustive()
    }
}

/// File names of a client's credentials, as given on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientFiles {
    /// The CA that signed the server's certificate.
    pub ca: Option<PathBuf>,
    /// Our own certificate and key, for servers that verify their peers.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the address
    /// connected to).
    pub hostname: Option<String>,
}

impl ClientFiles {
    pub fn any(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.hostname.is_some()
    }

    /// Loads the files for connections to `addr`. `Ok(None)` when no TLS
    /// setting was given.
    pub fn load(&self, addr: IpAddr) -> Result<Option<Arc<ClientTls>>, TlsError> {
        if !self.any() {
            return Ok(None);
        }
        let connector = self.connector()?;
        let name = match &self.hostname {
            Some(h) => {
                ServerName::try_from(h.clone()).map_err(|_| TlsError::HostName(h.clone()))?
            }
            None => ServerName::IpAddress(addr.into()),
        };
        Ok(Some(Arc::new(ClientTls {
            connector: std::sync::RwLock::new(connector),
            name,
            files: self.clone(),
        })))
    }

    /// Reads the CA (and our own certificate and key) into a connector.
    fn connector(&self) -> Result<tokio_rustls::TlsConnector, TlsError> {
        let Some(ca) = &self.ca else {
            return Err(TlsError::Usage(
                "TLS needs --tls-ca: the CA that signed the server's certificate".into(),
            ));
        };
        let roots = read_roots(ca)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions")
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(read_certs(cert, "certificate file")?, read_key(key)?)
                .map_err(|e| TlsError::Pair {
                    cert: cert.clone(),
                    key: key.clone(),
                    why: e.to_string(),
                })?,
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(TlsError::Usage(
                    "a client certificate needs both --tls-cert and --tls-key".into(),
                ))
            }
        };
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
}

/// A client's loaded TLS settings. Like [`ServerTls`], they can be read
/// again while the process runs ([`ClientTls::reload`]): the next
/// connection uses the new files.
pub struct ClientTls {
    connector: std::sync::RwLock<tokio_rustls::TlsConnector>,
    name: ServerName<'static>,
    files: ClientFiles,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads the CA, certificate and key again for every connection from
    /// now on; on any error the ones in use stay. Blocking.
    pub fn reload(&self) -> Result<(), TlsError> {
        let connector = self.files.connector()?;
        *self.connector.write().unwrap_or_else(|p| p.into_inner()) = connector;
        Ok(())
    }

    /// [`ClientTls::reload`] on a blocking thread, logged.
    pub async fn reload_logged(self: &Arc<Self>) -> Result<String, String> {
        let tls = self.clone();
        let files = describe(&[
            ("CA", &self.files.ca),
            ("certificate", &self.files.cert),
            ("key", &self.files.key),
        ]);
        reload_logged("upstream TLS credentials", files, move || tls.reload()).await
    }

    /// The name the server's certificate must carry.
    pub fn name(&self) -> String {
        self.name.to_str().into_owned()
    }
}

/// A connection that starts in plaintext and may be upgraded to TLS.
pub enum Conn<S> {
    Plain(S),
    Tls(Box<tokio_rustls::TlsStream<S>>),
    /// What is left after a TLS handshake failed: the socket is gone.
    Broken,
}

fn broken() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the connection was closed after a failed TLS handshake",
    )
}

impl<S> Conn<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn take_plain(&mut self) -> io::Result<S> {
        match std::mem::replace(self, Conn::Broken) {
            Conn::Plain(s) => Ok(s),
            other => {
                *self = other;
                Err(io::Error::other(
                    "TLS was already started on this connection",
                ))
            }
        }
    }

    /// The server's side of the TLS handshake, right after STARTTLS was
    /// acknowledged. On failure the connection is closed.
    pub async fn accept_tls(&mut self, tls: &ServerTls) -> io::Result<()> {
        let plain = self.take_plain()?;
        let stream = tls.acceptor().accept(plain).await?;
        *self = Conn::Tls(Box::new(stream.into()));
        Ok(())
    }

    /// The client's side of the TLS handshake, after the server
    /// acknowledged STARTTLS. On failure the connection is closed.
    pub async fn connect_tls(&mut self, tls: &ClientTls) -> io::Result<()> {
        let plain = self.take_plain()?;
        let connector = tls
            .connector
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stream = connector.connect(tls.name.clone(), plain).await?;
        *self = Conn::Tls(Box::new(stream.into()));
        Ok(())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Broken => Poll::Ready(Err(broken())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Broken => Poll::Ready(Err(broken())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Conn::Broken => Poll::Ready(Err(broken())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
            Conn::Broken => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Broken => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            // Sends close_notify first, as TLS peers expect.
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Broken => Poll::Ready(Ok(())),
        }
    }
}

/// The reading half of a [`Conn`].
pub enum ConnRead<S: Stream> {
    Plain(S::Read),
    Tls(ReadHalf<tokio_rustls::TlsStream<S>>),
    Broken,
}

/// The writing half of a [`Conn`].
pub enum ConnWrite<S: Stream> {
    Plain(S::Write),
    Tls(WriteHalf<tokio_rustls::TlsStream<S>>),
    Broken,
}

impl<S: Stream> Stream for Conn<S> {
    type Read = ConnRead<S>;
    type Write = ConnWrite<S>;

    /// A plaintext connection splits into the socket's own halves (no lock
    /// between them); a TLS session is one state machine, so its halves
    /// share it under tokio's split lock, held only for each poll.
    fn into_split(self) -> (ConnRead<S>, ConnWrite<S>) {
        match self {
            Conn::Plain(s) => {
                let (r, w) = s.into_split();
                (ConnRead::Plain(r), ConnWrite::Plain(w))
            }
            Conn::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ConnRead::Tls(r), ConnWrite::Tls(w))
            }
            Conn::Broken => (ConnRead::Broken, ConnWrite::Broken),
        }
    }
}

impl<S: Stream> AsyncRead for ConnRead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnRead::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ConnRead::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ConnRead::Broken => Poll::Ready(Err(broken())),
        }
    }
}

impl<S: Stream> AsyncWrite for ConnWrite<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ConnWrite::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ConnWrite::Tls(s) => Pin::new(s).poll_write(cx, buf),
            ConnWrite::Broken => Poll::Ready(Err(broken())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ConnWrite::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ConnWrite::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ConnWrite::Broken => Poll::Ready(Err(broken())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ConnWrite::Plain(s) => s.is_write_vectored(),
            ConnWrite::Tls(s) => s.is_write_vectored(),
            ConnWrite::Broken => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWrite::Plain(s) => Pin::new(s).poll_flush(cx),
            ConnWrite::Tls(s) => Pin::new(s).poll_flush(cx),
            ConnWrite::Broken => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWrite::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ConnWrite::Tls(s) => Pin::new(s).poll_shutdown(cx),
            ConnWrite::Broken => Poll::Ready(Ok(())),
        }
    }
}

/// A TLS session between two ends of an in-memory pipe of `capacity`
/// bytes, for tests of what a sender leaves inside the session.
#[cfg(test)]
pub(crate) async fn test_pair(
    capacity: usize,
) -> (
    tokio_rustls::server::TlsStream<tokio::io::DuplexStream>,
    tokio_rustls::client::TlsStream<tokio::io::DuplexStream>,
) {
    use rustls::pki_types::PrivatePkcs8KeyDer;
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = CertificateDer::from(made.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (near, far) = tokio::io::duplex(capacity);
    let accept = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(near);
    let connect = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from("localhost").unwrap(), far);
    let (ours, theirs) = tokio::join!(accept, connect);
    (ours.unwrap(), theirs.unwrap())
}

/// Credential files named for a log line: "certificate a.pem, key b.pem".
fn describe(files: &[(&str, &Option<PathBuf>)]) -> String {
    files
        .iter()
        .filter_map(|(what, path)| path.as_ref().map(|p| format!("{what} {}", p.display())))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs `reload` (file reads) on a blocking thread and logs the outcome:
/// the line, for a control-socket answer too.
async fn reload_logged(
    what: &str,
    files: String,
    reload: impl FnOnce() -> Result<(), TlsError> + Send + 'static,
) -> Result<String, String> {
    let outcome = tokio::task::spawn_blocking(reload)
        .await
        .map_err(|e| format!("reading them stopped: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
    match outcome {
        Ok(()) => {
            let line = format!("{what} read again from {files}: new connections use them");
            crate::info!("{line}");
            Ok(line)
        }
        Err(why) => {
            let line = format!("cannot read the {what} again ({why}): keeping the ones in use");
            crate::warn!("{line}");
            Err(line)
        }
    }
}
