//! Live migration over TLS, and fault plans on TLS connections.
//!
//! Simulated: a plaintext `flexnbd serve` source with a control socket, a
//! `flexnbd listen` destination presenting certificates made at test time
//! (`certs::Pki`), operators running `flexnbd mirror` with and without
//! `--tls-ca`/`--tls-cert`/`--tls-key`/`--tls-hostname`, clients writing
//! through the source meanwhile, and fault plans on either end of a TLS
//! migration or on a TLS client connection.
//!
//! What must happen: a TLS migration ends like a plaintext one (both exit
//! 0, identical images, no `.INCOMPLETE` marker, every acknowledged write
//! kept); a destination that requires TLS never takes a plaintext
//! migration; a destination the source cannot verify (wrong CA, expired
//! certificate, wrong name), a destination that wants a client certificate
//! it is not given, and an oldstyle destination the source was told to
//! reach over TLS all fail the first attempt with a message naming the
//! problem, before a byte of the image is sent, and the source keeps
//! serving; bad TLS arguments to `mirror` start nothing; a fault fires and
//! has its effect on a TLS connection as on a plaintext one.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flexnbd::proto::{self, cmd, opt, rep, OptionReplyHeader};

use crate::certs::Pki;
use crate::harness::*;
use crate::migrate::{assert_holds_acked_writes, client_writer, ClientLog, BLOCK, CLIENTS};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 4 * MIB;

// ---------------------------------------------------------------- helpers

/// A source: `serve` with a control socket.
struct Source {
    server: Flexnbd,
    sock: PathBuf,
}

fn serve(dir: &TempDir, file: &Path, extra: &[&str]) -> Source {
    let sock = dir.join("src.sock");
    let server = Flexnbd::spawn(dir, &server_args("serve", file, Some(&sock), extra));
    Source { server, sock }
}

/// `flexnbd listen` on `file` with `extra` (TLS arguments, a plan).
fn listen(dir: &TempDir, file: &Path, extra: &[String]) -> Flexnbd {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    Flexnbd::spawn(dir, &server_args("listen", file, None, &extra))
}

fn mirror(sock: &Path, port: u16, extra: &[String]) -> Output {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    run_mirror(sock, port, &extra, Duration::from_secs(40))
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn mirror_ok(sock: &Path, port: u16, extra: &[String]) {
    let o = mirror(sock, port, extra);
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).as_ref()),
        (Some(0), "Mirror started\n"),
        "mirror {extra:?}: {}",
        text(&o)
    );
}

/// A mirror whose first attempt must fail with `response` (exit 1).
fn mirror_fails(sock: &Path, port: u16, extra: &[String], response: &str) {
    let o = mirror(sock, port, extra);
    assert_eq!(o.status.code(), Some(1), "mirror {extra:?}: {}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(response)
            || String::from_utf8_lossy(&o.stdout).contains(response),
        "mirror {extra:?} should answer {response:?}: {}",
        text(&o)
    );
}

/// A 4 MiB source with data in its first and third MiB (the rest holes).
fn source_file(dir: &TempDir) -> PathBuf {
    let p = dir.sparse_file("src.img", SIZE);
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pattern(MIB as usize, 3), 0).unwrap();
    f.write_all_at(&pattern(MIB as usize, 7), 2 * MIB).unwrap();
    f.sync_all().unwrap();
    p
}

fn assert_exit(p: &mut Flexnbd, code: i32, what: &str) {
    let st = p.wait_exit();
    assert_eq!(st.code(), Some(code), "{what}; log:\n{}", p.log());
    p.assert_no_panic();
}

/// Fails unless `file` is all zeros (a fresh destination nothing was
/// written to).
fn assert_untouched(file: &Path) {
    let data = fs::read(file).unwrap();
    assert_eq!(data.len() as u64, SIZE, "size of {}", file.display());
    if let Some(i) = data.iter().position(|&b| b != 0) {
        panic!(
            "{} was written to (byte {i} is {:#04x}) though no migration started",
            file.display(),
            data[i]
        );
    }
}

/// The state after a refused first attempt: the source serves and has no
/// mirror, the destination still runs, keeps its marker and holds nothing.
fn assert_refused_cleanly(src: &Source, src_file: &Path, dest: &mut Flexnbd, dest_file: &Path) {
    assert!(dest.is_running(), "the destination must keep running");
    assert_eq!(marker_state(dest_file).as_deref(), Some("receiving"));
    assert_untouched(dest_file);
    let status = control(&src.sock, "status\n\n");
    assert!(
        status.contains("is_mirroring=false") && status.contains("clients_allowed=true"),
        "the source must have no mirror and let clients in: {status:?}"
    );
    let mut c = src.server.connect();
    c.oldstyle_greeting();
    assert_eq!(
        c.read_ok(0, 4096),
        read_file_range(src_file, 0, 4096),
        "the source must keep serving"
    );
}

fn control(sock: &Path, request: &str) -> String {
    let mut s = UnixStream::connect(sock).expect("the source's control socket");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    got
}

/// Runs a completed migration to `dest`, with `mirror_extra`.
fn completes(
    mut src: Source,
    src_file: &Path,
    mut dest: Flexnbd,
    dest_file: &Path,
    extra: &[String],
) {
    mirror_ok(&src.sock, dest.port(), extra);
    assert_exit(&mut src.server, 0, "the source after a TLS migration");
    assert_exit(&mut dest, 0, "the destination after a TLS migration");
    assert_eq!(marker_state(dest_file), None, "the marker must be gone");
    assert_eq!(
        fs::read(dest_file).unwrap(),
        fs::read(src_file).unwrap(),
        "the destination must be identical to the source"
    );
    let log = src.server.log();
    assert!(
        log.contains(", TLS, flags"),
        "the source must log that its connection was TLS; log:\n{log}"
    );
}

fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

// ------------------------------------------------------------ migrations

#[test]
fn tls_mirror_with_writers_completes_with_every_acked_write_and_no_marker() {
    let dir = TempDir::new("tls-mig-writers");
    let pki = Pki::new(&dir.path);
    let src_file = source_file(&dir);
    let expected = fs::read(&src_file).unwrap();
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let mut src = serve(&dir, &src_file, &[]);
    let mut dest = listen(&dir, &dest_file, &pki.server_args());

    let acks: Vec<Arc<AtomicU64>> = (0..CLIENTS).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|id| client_writer(src.server.addr, id, SIZE / BLOCK, acks[id as usize].clone()))
        .collect();
    let total = || acks.iter().map(|a| a.load(Ordering::Relaxed)).sum::<u64>();
    wait_for("every client to have written", WAIT, || {
        acks.iter()
            .all(|a| a.load(Ordering::Relaxed) > 10)
            .then_some(())
    });
    // Throttled (1 MB/s for 2 MiB of data), so the clients keep writing
    // while the copy runs.
    let mut extra = pki.client_args();
    extra.extend(args(&["-m", "1000000"]));
    mirror_ok(&src.sock, dest.port(), &extra);
    src.server.wait_log(", TLS, flags");
    let before = total();
    wait_for("clients to write during the copy", WAIT, || {
        (total() > before + 200).then_some(())
    });
    let status = control(&src.sock, "status\n\n");
    assert!(
        status.contains("migration_state=copying"),
        "the writes must land mid-copy: {status:?}"
    );
    let o = run_tool(
        BIN,
        &[
            "mirror-speed",
            "-s",
            src.sock.to_str().unwrap(),
            "-m",
            "1099511627776",
        ],
        WAIT,
    );
    assert_eq!(o.status.code(), Some(0), "mirror-speed: {}", text(&o));

    assert_exit(&mut src.server, 0, "the source");
    assert_exit(&mut dest, 0, "the destination");
    let logs: Vec<ClientLog> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(marker_state(&dest_file), None, "the marker must be gone");
    assert_holds_acked_writes(&dest_file, expected, &logs);
    assert_eq!(
        fs::read(&dest_file).unwrap(),
        fs::read(&src_file).unwrap(),
        "the destination must be identical to the source"
    );
}

#[test]
fn plaintext_mirror_to_a_tls_listen_is_refused_and_a_tls_mirror_then_completes() {
    let dir = TempDir::new("tls-mig-plain-refused");
    let pki = Pki::new(&dir.path);
    let src_file = source_file(&dir);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let src = serve(&dir, &src_file, &[]);
    let mut dest = listen(&dir, &dest_file, &pki.server_args());

    mirror_fails(&src.sock, dest.port(), &[], "Mirror was rejected");
    src.server.wait_log("the server requires TLS");
    dest.wait_log("without starting TLS, which this server requires");
    assert_refused_cleanly(&src, &src_file, &mut dest, &dest_file);
    completes(src, &src_file, dest, &dest_file, &pki.client_args());
}

#[test]
fn a_mirror_trusting_another_ca_is_refused_naming_the_certificate() {
    let dir = TempDir::new("tls-mig-wrong-ca");
    let pki = Pki::new(&dir.path);
    let src_file = source_file(&dir);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let src = serve(&dir, &src_file, &[]);
    let mut dest = listen(&dir, &dest_file, &pki.server_args());

    let extra = args(&["--tls-ca", &path(&pki.other_ca)]);
    mirror_fails(&src.sock, dest.port(), &extra, "Mirror was rejected");
    src.server.wait_log("TLS handshake with the server failed");
    src.server.wait_log("UnknownIssuer");
    assert_refused_cleanly(&src, &src_file, &mut dest, &dest_file);
    // The same destination, verified with the right CA, is fine.
    completes(src, &src_file, dest, &dest_file, &pki.client_args());
}

#[test]
fn a_destination_with_an_expired_certificate_is_refused_naming_the_expiry() {
    let dir = TempDir::new("tls-mig-expired");
    let pki = Pki::new(&dir.path);
    let src_file = source_file(&dir);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let src = serve(&dir, &src_file, &[]);
    let mut dest = listen(
        &dir,
        &dest_file,
        &args(&[
            "--tls-cert",
            &path(&pki.expired_server.cert),
            "--tls-key",
            &path(&pki.expired_server.key),
        ]),
    );
    mirror_fails(
        &src.sock,
        dest.port(),
        &pki.client_args(),
        "Mirror was rejected",
    );
    src.server.wait_log("TLS handshake with the server failed");
    let log = src.server.log().to_lowercase();
    assert!(
        log.contains("expired"),
        "the source must say the certificate expired; log:\n{log}"
    );
    assert_refused_cleanly(&src, &src_file, &mut dest, &dest_file);
}

#[test]
fn tls_hostname_localhost_completes_and_a_wrong_name_is_refused() {
    let dir = TempDir::new("tls-mig-hostname");
    let pki = Pki::new(&dir.path);
    let src_file = source_file(&dir);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let src = serve(&dir, &src_file, &[]);
    let mut dest = listen(&dir, &dest_file, &pki.server_args());

    let mut wrong = pki.client_args();
    wrong.extend(args(&["--tls-hostname", "not-this-host.example"]));
    mirror_fails(&src.sock, dest.port(), &wrong, "Mirror was rejected");
    src.server
        .wait_log("a certificate for \"not-this-host.example\" signed by the --tls-ca");
    src.server
        .wait_log("certificate not valid for name \"not-this-host.example\"");
    assert_refused_cleanly(&src, &src_file, &mut dest, &dest_file);

    let mut right = pki.client_args();
    right.extend(args(&["--tls-hostname", "localhost"]));
    completes(src, &src_file, dest, &dest_file, &right);
}

#[test]
fn a_verifying_destination_refuses_a_mirror_without_a_client_certificate_and_takes_one_with() {
    let dir = TempDir::new("tls-mig-verify-peer");
    let pki = Pki::new(&dir.path);
    let src_file = source_file(&dir);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let src = serve(&dir, &src_file, &[]);
    let mut dest = listen(&dir, &dest_file, &pki.verifying_server_args());

    mirror_fails(
        &src.sock,
        dest.port(),
        &pki.client_args(),
        "Mirror was rejected",
    );
    src.server.wait_log("migration to 127.0.0.1");
    let log = src.server.log();
    assert!(
        log.contains("ended the TLS session") && log.contains("--tls-cert/--tls-key"),
        "the source must say the destination wanted a certificate; log:\n{log}"
    );
    dest.wait_log("peer sent no certificates");
    assert_refused_cleanly(&src, &src_file, &mut dest, &dest_file);
    completes(
        src,
        &src_file,
        dest,
        &dest_file,
        &pki.client_args_with_cert(),
    );
}

#[test]
fn a_tls_mirror_to_a_plaintext_oldstyle_listen_is_refused_before_any_data() {
    let dir = TempDir::new("tls-mig-oldstyle");
    let pki = Pki::new(&dir.path);
    let src_file = source_file(&dir);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let src = serve(&dir, &src_file, &[]);
    let mut dest = listen(&dir, &dest_file, &[]);

    mirror_fails(
        &src.sock,
        dest.port(),
        &pki.client_args(),
        "Mirror was rejected",
    );
    src.server.wait_log("refusing to go on in plaintext");
    assert_refused_cleanly(&src, &src_file, &mut dest, &dest_file);
}

#[test]
fn bad_tls_arguments_to_mirror_start_nothing_and_a_relative_ca_path_works() {
    let dir = TempDir::new("tls-mig-bad-args");
    let pki = Pki::new(&dir.path);
    let src_file = source_file(&dir);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let src = serve(&dir, &src_file, &[]);
    let mut dest = listen(&dir, &dest_file, &pki.server_args());

    let missing = dir.join("no-such-ca.pem");
    let o = mirror(
        &src.sock,
        dest.port(),
        &args(&["--tls-ca", &path(&missing)]),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        err.contains("cannot use TLS") && err.contains(&path(&missing)),
        "a missing CA file must be named: {}",
        text(&o)
    );

    let mut cert_only = pki.client_args();
    cert_only.extend(args(&["--tls-cert", &path(&pki.client.cert)]));
    let o = mirror(&src.sock, dest.port(), &cert_only);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        err.contains("--tls-key"),
        "--tls-cert without --tls-key must say --tls-key is missing: {}",
        text(&o)
    );

    let o = mirror(
        &src.sock,
        dest.port(),
        &args(&["--tls-hostname", "localhost"]),
    );
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--tls-ca"),
        "TLS options without --tls-ca must ask for it: {}",
        text(&o)
    );
    assert_refused_cleanly(&src, &src_file, &mut dest, &dest_file);

    // A path relative to where `mirror` runs, not where the server runs.
    let port = dest.port().to_string();
    let o = one_shot(BIN, Duration::from_secs(40))
        .current_dir(&dir.path)
        .args([
            "mirror",
            "-s",
            src.sock.to_str().unwrap(),
            "-l",
            "127.0.0.1",
            "-p",
            &port,
            "--tls-ca",
            "pki/ca-cert.pem",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "relative --tls-ca: {}", text(&o));
    let mut src = src;
    assert_exit(&mut src.server, 0, "the source");
    assert_exit(&mut dest, 0, "the destination");
    assert_eq!(fs::read(&dest_file).unwrap(), fs::read(&src_file).unwrap());
}

// ------------------------------------------------------- faults over TLS

/// A raw NBD client on a TLS connection: the plaintext newstyle greeting
/// and STARTTLS, then rustls (verifying the server with `ca`) carrying
/// EXPORT_NAME and the transmission phase.
struct TlsClient {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsClient {
    fn connect(server: &Flexnbd, ca: &Path) -> TlsClient {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName};
        let mut c = server.connect();
        let greeting = c.read_exact(18);
        assert_eq!(&greeting[..8], b"NBDMAGIC", "newstyle greeting");
        let flags = proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES;
        c.send(&flags.to_be_bytes());
        send_option(&mut c, opt::STARTTLS, &[]);
        let h = c.read_exact(20);
        let reply = OptionReplyHeader::decode(h.as_slice().try_into().unwrap())
            .expect("a STARTTLS reply with a good magic");
        assert_eq!(
            (reply.option, reply.kind, reply.length),
            (opt::STARTTLS, rep::ACK, 0)
        );
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut tls = TlsClient {
            tls: rustls::StreamOwned::new(conn, c.stream),
        };
        // EXPORT_NAME "" over TLS: size, flags (no zeroes asked for).
        let option = proto::OptionHeader {
            option: opt::EXPORT_NAME,
            length: 0,
        }
        .encode()
        .to_vec();
        tls.send(&option);
        let export = tls.read_exact(10);
        assert_eq!(
            u64::from_be_bytes(export[..8].try_into().unwrap()),
            MIB,
            "export size over TLS"
        );
        tls
    }

    fn send(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).unwrap();
        self.tls.flush().unwrap();
    }

    fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.tls.read_exact(&mut b).unwrap();
        b
    }

    fn request(&mut self, kind: u16, handle: u64, offset: u64, length: u32) {
        self.send(&proto::Request::new(kind, 0, handle, offset, length).encode());
    }

    /// True when the connection ends (EOF, a reset, or a TLS close)
    /// before another byte comes.
    fn sees_end(&mut self) -> bool {
        let mut b = [0u8; 1];
        !matches!(self.tls.read(&mut b), Ok(1))
    }
}

fn tls_served(tag: &str, plan: &str) -> (TempDir, Pki, PathBuf, Flexnbd) {
    let dir = TempDir::new(tag);
    let pki = Pki::new(&dir.path);
    let file = dir.pattern_file("d.img", MIB, 5);
    let mut extra = pki.server_args();
    extra.extend(args(&["--faults", plan]));
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let server = Flexnbd::serve(&dir, &file, &extra);
    (dir, pki, file, server)
}

#[test]
fn a_read_reply_corrupt_on_a_tls_connection_flips_the_magic_inside_tls() {
    let (_dir, pki, file, server) =
        tls_served("tls-fault-corrupt", "server.reply_send.read#1=corrupt");
    let mut c = TlsClient::connect(&server, &pki.ca);
    c.request(cmd::READ, 0x42, 512, 16);
    let header = c.read_exact(proto::SIMPLE_REPLY_LEN);
    let mut expected = proto::SimpleReply::new(0, 0x42).encode().to_vec();
    expected[0] = !expected[0];
    assert_eq!(header, expected, "only the magic's first byte differs");
    assert_eq!(c.read_exact(16), read_file_range(&file, 512, 16));
    server.assert_fired("server.reply_send.read#1", "corrupt");
    // The next reply is whole.
    c.request(cmd::READ, 0x43, 0, 16);
    let header = c.read_exact(proto::SIMPLE_REPLY_LEN);
    assert_eq!(header, proto::SimpleReply::new(0, 0x43).encode().to_vec());
    assert_eq!(c.read_exact(16), read_file_range(&file, 0, 16));
}

#[test]
fn a_read_reply_truncate_on_a_tls_connection_sends_exactly_n_bytes_then_ends() {
    let (_dir, pki, _file, server) =
        tls_served("tls-fault-truncate", "server.reply_send.read#1=truncate(6)");
    let mut c = TlsClient::connect(&server, &pki.ca);
    c.request(cmd::READ, 0x42, 0, 16);
    let got = c.read_exact(6);
    assert_eq!(got, proto::SimpleReply::new(0, 0x42).encode()[..6].to_vec());
    assert!(c.sees_end(), "after 6 bytes the connection must end");
    server.assert_fired("server.reply_send.read#1", "truncate(6)");
}

#[test]
fn a_client_read_over_tls_with_a_reply_fault_fails_and_the_server_serves_on() {
    let (_dir, pki, file, server) =
        tls_served("tls-fault-client", "server.reply_send.read#1=close");
    let port = server.port().to_string();
    let read = |plan: Option<&str>| {
        let mut a = vec![
            "read",
            "-l",
            "127.0.0.1",
            "-p",
            &port,
            "-F",
            "0",
            "-S",
            "4096",
        ];
        let ca = path(&pki.ca);
        a.extend(["--tls-ca", ca.as_str()]);
        if let Some(plan) = plan {
            a.extend(["--faults", plan]);
        }
        run_tool(BIN, &a, WAIT)
    };
    // The server closes instead of replying.
    let o = read(None);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    server.assert_fired("server.reply_send.read#1", "close");
    // The client's own plan, on its TLS connection: the reply is taken as
    // damaged.
    let o = read(Some("client.reply_received.read#1=corrupt"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("fault fired: client.reply_received.read#1 -> corrupt"),
        "{}",
        text(&o)
    );
    // Without faults the same TLS read is the file's bytes.
    let o = read(Some(""));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(o.stdout, read_file_range(&file, 0, 4096));
}

/// A TLS migration in which `src_plan` (on `serve`) and `dest_plan` (on
/// `listen`) each cut one attempt: the source retries over TLS and
/// completes.
fn tls_migration_survives(
    tag: &str,
    src_plan: &str,
    dest_plan: &str,
) -> (TempDir, Source, Flexnbd) {
    let dir = TempDir::new(tag);
    let pki = Pki::new(&dir.path);
    let src_file = source_file(&dir);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let mut src = serve(&dir, &src_file, &["--faults", src_plan]);
    let mut dargs = pki.server_args();
    dargs.extend(args(&["--faults", dest_plan]));
    let mut dest = listen(&dir, &dest_file, &dargs);
    mirror_ok(&src.sock, dest.port(), &pki.client_args());
    assert_exit(
        &mut src.server,
        0,
        "the source after a retried TLS migration",
    );
    assert_exit(
        &mut dest,
        0,
        "the destination after a retried TLS migration",
    );
    assert_eq!(marker_state(&dest_file), None, "the marker must be gone");
    assert_eq!(fs::read(&dest_file).unwrap(), fs::read(&src_file).unwrap());
    let log = src.server.log();
    assert!(
        log.contains("migration attempt 2 connected") && log.contains(", TLS, flags"),
        "the second attempt must have connected over TLS; log:\n{log}"
    );
    (dir, src, dest)
}

#[test]
fn mirror_side_faults_on_a_tls_migration_fire_and_the_retry_completes() {
    let (_dir, src, _dest) = tls_migration_survives(
        "tls-fault-mirror",
        "mirror.payload_send.write#2=truncate(100)",
        "",
    );
    src.server
        .assert_fired("mirror.payload_send.write#2", "truncate(100)");
}

#[test]
fn destination_side_faults_on_a_tls_migration_fire_and_the_retry_completes() {
    let (_dir, _src, dest) = tls_migration_survives(
        "tls-fault-dest",
        "",
        "server.request_received.write#2=close",
    );
    dest.assert_fired("server.request_received.write#2", "close");
}

/// The destination closes the first connection in the TLS handshake
/// itself (after acknowledging STARTTLS): a first attempt that fails is
/// the `mirror` command's answer ("Mirror was rejected", exit 1), with
/// the source still serving and its image untouched; the next `mirror`
/// completes over TLS.
#[test]
fn a_destination_that_closes_in_the_tls_handshake_rejects_that_mirror_only() {
    let dir = TempDir::new("tls-fault-handshake");
    let pki = Pki::new(&dir.path);
    let src_file = source_file(&dir);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let src = serve(&dir, &src_file, &[]);
    let mut dargs = pki.server_args();
    dargs.extend(args(&["--faults", "server.tls_handshake#1=close"]));
    let dest = listen(&dir, &dest_file, &dargs);
    mirror_fails(
        &src.sock,
        dest.port(),
        &pki.client_args(),
        "Mirror was rejected",
    );
    dest.assert_fired("server.tls_handshake#1", "close");
    assert!(
        src.server.log().contains("TLS handshake"),
        "the source must say where it failed; log:\n{}",
        src.server.log()
    );
    completes(src, &src_file, dest, &dest_file, &pki.client_args());
}

// ------------------------------------------------ certificate rotation

/// A `listen` whose certificate was rotated with SIGHUP before the
/// migration came: the source, trusting only the new CA, migrates into it
/// over TLS. (The old certificate would have been refused: the source
/// verifies the destination.)
#[test]
fn a_listen_rotated_by_sighup_takes_a_migration_that_trusts_only_the_new_ca() {
    let dir = TempDir::new("tls-migrate");
    let old = Pki::new(&dir.join("old"));
    let new = Pki::new(&dir.join("new"));
    let src_file = source_file(&dir);
    let dest_file = dir.sparse_file("dest.img", SIZE);
    let (cert, key) = (dir.join("live-cert.pem"), dir.join("live-key.pem"));
    fs::copy(&old.server.cert, &cert).unwrap();
    fs::copy(&old.server.key, &key).unwrap();
    let dest = listen(
        &dir,
        &dest_file,
        &args(&["--tls-cert", &path(&cert), "--tls-key", &path(&key)]),
    );
    fs::copy(&new.server.cert, &cert).unwrap();
    fs::copy(&new.server.key, &key).unwrap();
    dest.signal(libc::SIGHUP);
    wait_for("listen to read its credentials again", WAIT, || {
        dest.log()
            .contains("TLS credentials read again")
            .then_some(())
    });
    let src = serve(&dir, &src_file, &[]);
    completes(
        src,
        &src_file,
        dest,
        &dest_file,
        &args(&["--tls-ca", &path(&new.ca)]),
    );
}
