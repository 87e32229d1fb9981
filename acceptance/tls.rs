//! `flexnbd serve` with TLS (NBD_OPT_STARTTLS and x509 certificates).
//!
//! Simulated: real TLS clients (qemu-img with `tls-creds-x509`, nbdinfo and
//! nbdcopy with `nbds://` URIs, nbdsh with `set_tls`, our own `flexnbd
//! read`/`write`), plaintext clients sent to a server that requires TLS, and
//! a raw client written here that upgrades a std socket with rustls, so the
//! negotiation can be checked byte by byte. Every certificate is made afresh
//! by `certs::Pki` in the test's directory: a CA with server and client
//! certificates, expired ones, and a second CA whose certificates our
//! server must not trust.
//!
//! What must happen: data read and written over TLS is byte-identical to the
//! image file; with `--tls-verify-peer` only a client certificate signed by
//! `--tls-ca` and still valid is accepted, a refused client leaves a log line
//! saying why and the server goes on serving good clients; a client refuses
//! a server whose certificate it cannot verify (other CA, expired, wrong
//! name); a plaintext client of a required-TLS server gets
//! NBD_REP_ERR_TLS_REQD (and a plaintext EXPORT_NAME is closed without a
//! byte of data) and says so; `--tls optional` serves plaintext and TLS
//! clients side by side; STARTTLS with data or inside TLS is invalid, STARTTLS
//! without TLS configured is unsupported, and nothing negotiated before
//! STARTTLS survives it; and every bad TLS setting on the command line is a
//! clear error before any port is opened.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use assert_cmd::assert::Assert;
use predicates::prelude::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::certs::Pki;
use crate::harness::*;
use flexnbd::proto::{self, flags, opt, rep, InfoRequest, MetaContextRequest, OptionReplyHeader};

const MIB: u64 = 1024 * 1024;
/// Every export here is 1 MiB: enough to cross many TLS records, small
/// enough to keep the module fast.
const SIZE: u64 = MIB;
/// Time limit for one run of one external tool.
const TOOL: Duration = Duration::from_secs(30);

// ------------------------------------------------------------ helpers

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A directory, its credentials, and a 1 MiB pattern image (path, content).
fn setup(tag: &str, seed: u8) -> (TempDir, Pki, std::path::PathBuf, Vec<u8>) {
    let dir = TempDir::new(tag);
    let pki = Pki::new(&dir.path);
    let file = dir.pattern_file("disk.img", SIZE, seed);
    (dir, pki, file, pattern(SIZE as usize, seed))
}

/// `flexnbd serve` with `args` (TLS flags) and `extra`.
fn serve_with(dir: &TempDir, file: &Path, args: &[String], extra: &[&str]) -> Flexnbd {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    Flexnbd::serve(dir, file, &all)
}

fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at}: {} != {}",
            actual[at], expected[at]
        );
    }
}

/// qemu's `--object` for a TLS client reading credentials from `dir`.
fn qemu_object(dir: &Path) -> String {
    format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", path(dir))
}

/// qemu's `--image-opts` for the raw export of `server`, over TLS.
fn qemu_opts(server: &Flexnbd) -> String {
    format!(
        "driver=nbd,host=127.0.0.1,port={},tls-creds=tls0",
        server.port()
    )
}

/// `qemu-img info` of the export with the credentials in `creds`.
fn qemu_img_info(server: &Flexnbd, creds: &Path) -> Output {
    run_tool(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--object",
            &qemu_object(creds),
            "--image-opts",
            &qemu_opts(server),
        ],
        TOOL,
    )
}

fn assert_qemu_sees_the_export(server: &Flexnbd, creds: &Path) {
    let out = qemu_img_info(server, creds);
    assert!(
        out.status.success() && text(&out).contains(&format!("\"virtual-size\": {SIZE}")),
        "qemu-img info over TLS with {}: {}\n{}",
        creds.display(),
        out.status,
        text(&out)
    );
}

/// `nbds://` URI of `server`, with libnbd's credentials directory.
fn nbds(server: &Flexnbd, creds: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/?tls-certificates={}",
        server.port(),
        path(creds)
    )
}

/// Runs nbdinfo on `uri` (not asserting its outcome).
fn nbdinfo(uri: &str) -> Output {
    run_tool("nbdinfo", &["--json", uri], TOOL)
}

/// Fails unless nbdinfo over `uri` succeeds, sees the whole export, and (for
/// an `nbds://` URI) reports TLS.
fn assert_nbdinfo_sees_the_export(uri: &str) {
    let out = nbdinfo(uri);
    let all = text(&out);
    assert!(
        out.status.success() && all.contains(&format!("\"export-size\": {SIZE}")),
        "nbdinfo {uri}: {}\n{all}",
        out.status
    );
    let tls = uri.starts_with("nbds:");
    assert!(
        all.contains(&format!("\"TLS\": {tls}")),
        "nbdinfo {uri} should report TLS {tls}:\n{all}"
    );
}

/// Runs nbdsh's statements (the implicit handle `h` is created but not
/// connected) with Debian's python3, the one that has the nbd module.
fn nbdsh(statements: &[&str]) -> Output {
    let mut args = vec!["PATH=/usr/bin:/bin", "nbdsh"];
    for s in statements {
        args.extend(["-c", s]);
    }
    run_tool("env", &args, TOOL)
}

/// Fails unless `out` failed and its output mentions every one of `needles`
/// (case-insensitively).
fn assert_failed_saying(out: &Output, what: &str, needles: &[&str]) {
    let all = text(out);
    assert!(!out.status.success(), "{what} should have failed:\n{all}");
    let lower = all.to_lowercase();
    for n in needles {
        assert!(
            lower.contains(&n.to_lowercase()),
            "{what}: expected {n:?} in its output:\n{all}"
        );
    }
}

/// `flexnbd read`/`write` arguments for `len` bytes at `from` of `server`.
fn transfer_args(mode: &str, server: &Flexnbd, from: u64, len: u64) -> Vec<String> {
    [
        mode,
        "-l",
        "127.0.0.1",
        "-p",
        &server.port().to_string(),
        "-F",
        &from.to_string(),
        "-S",
        &len.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn flexnbd_read(server: &Flexnbd, from: u64, len: u64, tls: &[String]) -> Output {
    let mut args = transfer_args("read", server, from, len);
    args.extend(tls.iter().cloned());
    run_tool(
        BIN,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        TOOL,
    )
}

fn flexnbd_write(server: &Flexnbd, from: u64, data: &[u8], tls: &[String]) -> Output {
    let mut args = transfer_args("write", server, from, data.len() as u64);
    args.extend(tls.iter().cloned());
    run_tool_with_input(
        BIN,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        Some(data),
        TOOL,
    )
}

/// The number of times `text` is in the server's log.
fn log_count(server: &Flexnbd, text: &str) -> usize {
    server.log().matches(text).count()
}

/// Waits until `refused` clients were dropped in their handshake, and
/// checks that none of them got as far as choosing the export. In TLS 1.3
/// the server finishes its side before the client judges the certificate,
/// so a client's refusal may show only as a close.
fn assert_no_export_chosen(server: &Flexnbd, refused: usize) {
    wait_for(&format!("{refused} refused clients"), WAIT, || {
        (log_count(server, "dropped: handshake failed") >= refused).then_some(())
    });
    assert_eq!(
        log_count(server, "client chose export"),
        0,
        "{}",
        server.log()
    );
}

/// Waits until the log holds a line with every one of `parts` and returns it.
fn wait_log_line(server: &Flexnbd, parts: &[&str]) -> String {
    wait_for(&format!("a log line with {parts:?}"), WAIT, || {
        server
            .log()
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
    })
}

// ------------------------------------------------- raw negotiation

const CLIENT_FLAGS: u32 = proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES;

/// Reads and checks the newstyle greeting, then sends fixed-newstyle client
/// flags.
fn greet(c: &mut RawClient) {
    let g = c.read_exact(18);
    assert_eq!(&g[0..8], b"NBDMAGIC", "greeting: {g:02x?}");
    assert_eq!(&g[8..16], b"IHAVEOPT", "greeting: {g:02x?}");
    c.send(&CLIENT_FLAGS.to_be_bytes());
}

fn read_n(io: &mut impl Read, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    io.read_exact(&mut b)
        .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    b
}

fn send_opt(io: &mut impl Write, option: u32, data: &[u8]) {
    let mut b = proto::OptionHeader {
        option,
        length: data.len() as u32,
    }
    .encode()
    .to_vec();
    b.extend_from_slice(data);
    io.write_all(&b).expect("send an option");
    io.flush().expect("flush an option");
}

/// One option reply to `option`: its type and data.
fn opt_reply(io: &mut impl Read, option: u32) -> (u32, Vec<u8>) {
    let h = read_n(io, 20);
    let header =
        OptionReplyHeader::decode(h.as_slice().try_into().unwrap()).expect("option reply magic");
    assert_eq!(
        header.option, option,
        "the reply names the option it answers"
    );
    let data = read_n(io, header.length as usize);
    (header.kind, data)
}

/// Reads one reply to `option`, fails unless it is of type `kind`, and
/// returns its data.
fn expect_reply(io: &mut impl Read, option: u32, kind: u32) -> Vec<u8> {
    let (got, data) = opt_reply(io, option);
    assert_eq!(
        got,
        kind,
        "option {option}: expected reply 0x{kind:08x}, got 0x{got:08x} ({:?})",
        String::from_utf8_lossy(&data)
    );
    data
}

/// GO on the default export; returns (size, transmission flags).
fn go(io: &mut (impl Read + Write)) -> (u64, u16) {
    let request = InfoRequest {
        name: Vec::new(),
        requests: Vec::new(),
    }
    .encode();
    send_opt(io, opt::GO, &request);
    let mut export = None;
    loop {
        let (kind, data) = opt_reply(io, opt::GO);
        match kind {
            rep::ACK => break,
            rep::INFO if data[..2] == proto::info::EXPORT.to_be_bytes() => {
                export = proto::decode_info_export(&data);
            }
            rep::INFO => {}
            other => panic!(
                "GO: unexpected reply 0x{other:08x} ({:?})",
                String::from_utf8_lossy(&data)
            ),
        }
    }
    export.expect("NBD_INFO_EXPORT before GO's ACK")
}

/// READ of `len` bytes at `offset`; fails unless it gets a successful
/// simple reply, and returns the data.
fn read_simple(io: &mut (impl Read + Write), offset: u64, len: u32) -> Vec<u8> {
    let handle = 0x7453_0000_0000_0000 | offset;
    io.write_all(&proto::Request::new(proto::cmd::READ, 0, handle, offset, len).encode())
        .expect("send READ");
    io.flush().expect("flush READ");
    let h = read_n(io, proto::SIMPLE_REPLY_LEN);
    let r = proto::SimpleReply::decode(h.as_slice().try_into().unwrap());
    assert_eq!(
        (r.magic, r.error, r.handle),
        (proto::SIMPLE_REPLY_MAGIC, 0, handle),
        "READ: expected a successful simple reply, got {h:02x?}"
    );
    read_n(io, len as usize)
}

type TlsSocket = StreamOwned<ClientConnection, TcpStream>;

fn client_config(ca: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read the CA") {
        roots
            .add(cert.expect("a CA certificate"))
            .expect("trust the CA");
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    Arc::new(config)
}

/// Sends STARTTLS, expects its ACK, and runs the whole TLS handshake
/// (trusting `ca`) before returning the upgraded socket.
fn start_tls(mut c: RawClient, ca: &Path) -> TlsSocket {
    send_opt(&mut c.stream, opt::STARTTLS, &[]);
    expect_reply(&mut c.stream, opt::STARTTLS, rep::ACK);
    let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    let mut conn = ClientConnection::new(client_config(ca), name).expect("a TLS client");
    let mut sock = c.stream;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .unwrap_or_else(|e| panic!("TLS handshake with the server: {e}"));
    }
    StreamOwned::new(conn, sock)
}

// -------------------------------------------------------------- qemu

/// qemu-img info over TLS: the export is seen whole, and the server says it
/// started TLS (not that the client got through in plaintext).
#[test]
fn qemu_img_info_over_tls_sees_the_export() {
    let (dir, pki, file, _) = setup("tls", 1);
    let server = serve_with(&dir, &file, &pki.server_args(), &[]);
    assert_qemu_sees_the_export(&server, &pki.client_dir);
    server.wait_log("TLS started");
    server.assert_no_panic();
}

/// qemu-img convert reads the export over TLS into a file byte for byte,
/// and writes a file into the export over TLS so the image matches it.
#[test]
fn qemu_img_convert_over_tls_reads_and_writes_the_export_byte_for_byte() {
    let (dir, pki, file, original) = setup("tls", 2);
    let server = serve_with(&dir, &file, &pki.server_args(), &[]);
    let object = qemu_object(&pki.client_dir);
    let opts = qemu_opts(&server);

    let copy = dir.join("copy.img");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            &path(&copy),
        ],
        TOOL,
    );
    assert_same(
        &fs::read(&copy).unwrap(),
        &original,
        "export read by qemu-img",
    );

    let upload = dir.pattern_file("upload.img", SIZE, 20);
    run_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &object,
            "-n",
            "-f",
            "raw",
            &path(&upload),
            "--target-image-opts",
            &opts,
        ],
        TOOL,
    );
    assert_same(
        &fs::read(&file).unwrap(),
        &pattern(SIZE as usize, 20),
        "image written by qemu-img",
    );
    assert!(log_count(&server, "TLS started") >= 2, "{}", server.log());
    server.assert_no_panic();
}

// ------------------------------------------------------------ libnbd

/// nbdinfo over `nbds://` sees the export and reports TLS.
#[test]
fn nbdinfo_over_nbds_sees_the_export_and_reports_tls() {
    let (dir, pki, file, _) = setup("tls", 3);
    let server = serve_with(&dir, &file, &pki.server_args(), &[]);
    assert_nbdinfo_sees_the_export(&nbds(&server, &pki.client_dir));
    server.wait_log("TLS started");
}

/// nbdcopy downloads the export over TLS byte for byte, and uploads a file
/// into it so the image matches.
#[test]
fn nbdcopy_over_nbds_downloads_and_uploads_byte_for_byte() {
    let (dir, pki, file, original) = setup("tls", 4);
    let server = serve_with(&dir, &file, &pki.server_args(), &[]);
    let uri = nbds(&server, &pki.client_dir);

    let copy = dir.join("copy.img");
    run_ok("nbdcopy", &[&uri, &path(&copy)], TOOL);
    assert_same(
        &fs::read(&copy).unwrap(),
        &original,
        "export read by nbdcopy",
    );

    let upload = dir.pattern_file("upload.img", SIZE, 40);
    run_ok("nbdcopy", &[&path(&upload), &uri], TOOL);
    assert_same(
        &fs::read(&file).unwrap(),
        &pattern(SIZE as usize, 40),
        "image written by nbdcopy",
    );
}

/// nbdsh with `set_tls(TLS_REQUIRE)`: TLS is negotiated, a write lands in
/// the file and reads back, and the untouched data reads as the file holds.
#[test]
fn nbdsh_with_tls_required_reads_and_writes() {
    let (dir, pki, file, original) = setup("tls", 5);
    let server = serve_with(&dir, &file, &pki.server_args(), &[]);
    let certs = format!("h.set_tls_certificates({:?})", path(&pki.client_dir));
    let connect = format!("h.connect_tcp('127.0.0.1', '{}')", server.port());
    let expected_head = format!("expected = bytes({:?})", &original[..4096]);
    let out = nbdsh(&[
        "h.set_tls(nbd.TLS_REQUIRE)",
        &certs,
        &connect,
        "assert h.get_tls_negotiated(), 'TLS not negotiated'",
        &expected_head,
        "assert h.pread(4096, 0) == expected, 'head differs'",
        "h.pwrite(b'\\xa5' * 65536, 131072)",
        "h.flush()",
        "assert h.pread(65536, 131072) == b'\\xa5' * 65536, 'write not read back'",
        "h.shutdown()",
    ]);
    assert!(out.status.success(), "nbdsh over TLS:\n{}", text(&out));
    let mut expected = original;
    expected[131072..196608].fill(0xa5);
    assert_same(&fs::read(&file).unwrap(), &expected, "image after nbdsh");
    server.wait_log("TLS started");
}

// ------------------------------------------ client certificate checks

/// With `--tls-verify-peer`, qemu-img and nbdinfo presenting a certificate
/// our CA signed are served, and the server says it verified them.
#[test]
fn a_verifying_server_serves_qemu_and_libnbd_clients_with_a_good_certificate() {
    let (dir, pki, file, _) = setup("tls", 6);
    let server = serve_with(&dir, &file, &pki.verifying_server_args(), &[]);
    assert_qemu_sees_the_export(&server, &pki.client_dir_with_cert);
    assert_nbdinfo_sees_the_export(&nbds(&server, &pki.client_dir_with_cert));
    wait_for("two verified clients", WAIT, || {
        (log_count(&server, "TLS started (client certificate verified)") >= 2).then_some(())
    });
}

/// Refused clients: `refuse` runs them and checks their own failures; then
/// the server must have logged each of `reasons` for them, let none of them
/// reach an export, and serve clients with a good certificate right after.
fn refused_then_served(tag: &str, reasons: &[&str], refuse: impl FnOnce(&Pki, &Flexnbd)) {
    let (dir, pki, file, _) = setup(tag, 7);
    let server = serve_with(&dir, &file, &pki.verifying_server_args(), &[]);
    refuse(&pki, &server);
    for reason in reasons {
        let line = wait_log_line(&server, &["dropped", "TLS handshake failed", reason]);
        assert!(line.contains("127.0.0.1"), "names the client: {line}");
    }
    assert_eq!(
        log_count(&server, "client chose export"),
        0,
        "{}",
        server.log()
    );
    assert_nbdinfo_sees_the_export(&nbds(&server, &pki.client_dir_with_cert));
    assert_qemu_sees_the_export(&server, &pki.client_dir_with_cert);
    server.assert_no_panic();
}

/// No client certificate at all: nbdinfo and qemu-img are refused (the
/// server logs that none was sent), and good clients are served after.
#[test]
fn a_verifying_server_refuses_clients_without_a_certificate_and_keeps_serving() {
    refused_then_served("tls", &["no certificates"], |pki, server| {
        let out = nbdinfo(&nbds(server, &pki.client_dir));
        assert_failed_saying(&out, "nbdinfo without a certificate", &["TLS", "alert"]);
        // qemu writes its first option before the alert arrives and reports
        // only the broken pipe: the server's log has the reason.
        let out = qemu_img_info(server, &pki.client_dir);
        assert_failed_saying(&out, "qemu-img without a certificate", &[]);
    });
}

/// A client certificate signed by another CA is refused. Both clients
/// trust our server, so only the server's check can fail. GnuTLS (nbdinfo)
/// keeps back a certificate whose issuer is not among the CAs the server
/// names, so the server sees none; our own client presents it and the server
/// refuses it as an unknown issuer.
#[test]
fn a_verifying_server_refuses_a_certificate_from_another_ca_and_keeps_serving() {
    let reasons = ["no certificates", "UnknownIssuer"];
    refused_then_served("tls", &reasons, |pki, server| {
        let out = nbdinfo(&nbds(server, &pki.untrusted_client_dir));
        assert_failed_saying(&out, "nbdinfo with a foreign certificate", &["tls"]);
        let tls = [
            "--tls-ca".into(),
            path(&pki.ca),
            "--tls-cert".into(),
            path(&pki.other_client.cert),
            "--tls-key".into(),
            path(&pki.other_client.key),
        ];
        let out = flexnbd_read(server, 0, 512, &tls);
        assert_failed_saying(
            &out,
            "flexnbd read with a foreign certificate",
            &["the server ended the TLS session", "--tls-cert"],
        );
    });
}

/// An expired client certificate (from our own CA) is refused as expired.
#[test]
fn a_verifying_server_refuses_an_expired_client_certificate_and_keeps_serving() {
    refused_then_served("tls", &["expired"], |pki, server| {
        let out = nbdinfo(&nbds(server, &pki.expired_client_dir));
        assert_failed_saying(&out, "nbdinfo with an expired certificate", &["tls"]);
    });
}

/// Our own client with `--tls-cert`/`--tls-key` is served by a verifying
/// server; without them it fails saying the server refused it, and the
/// server logs why.
#[test]
fn flexnbd_read_needs_its_certificate_for_a_verifying_server() {
    let (dir, pki, file, original) = setup("tls", 8);
    let server = serve_with(&dir, &file, &pki.verifying_server_args(), &[]);
    let out = flexnbd_read(&server, 4096, 8192, &pki.client_args_with_cert());
    assert!(
        out.status.success(),
        "read with a certificate:\n{}",
        text(&out)
    );
    assert_same(
        &out.stdout,
        &original[4096..12288],
        "read with a certificate",
    );

    let out = flexnbd_read(&server, 0, 512, &pki.client_args());
    assert_failed_saying(
        &out,
        "read without a certificate",
        &[
            "the server ended the TLS session",
            "CertificateRequired",
            "--tls-cert",
        ],
    );
    wait_log_line(&server, &["TLS handshake failed", "no certificates"]);
}

// ------------------------------------------- client-side refusals

/// A client that trusts another CA refuses our server: qemu-img, nbdinfo
/// and `flexnbd read` all fail, and the server's log shows each client
/// broke off the TLS handshake (so they got as far as verifying).
#[test]
fn clients_trusting_another_ca_refuse_the_server() {
    let (dir, pki, file, _) = setup("tls", 9);
    let server = serve_with(&dir, &file, &pki.server_args(), &[]);

    let out = qemu_img_info(&server, &pki.other_ca_dir);
    assert_failed_saying(&out, "qemu-img trusting another CA", &["known issuer"]);
    let out = nbdinfo(&nbds(&server, &pki.wrong_ca_dir));
    assert_failed_saying(
        &out,
        "nbdinfo trusting another CA",
        &["certificate verification"],
    );
    let out = flexnbd_read(&server, 0, 512, &["--tls-ca".into(), path(&pki.other_ca)]);
    assert_failed_saying(
        &out,
        "flexnbd read trusting another CA",
        &["TLS handshake with the server failed", "UnknownIssuer"],
    );
    assert_no_export_chosen(&server, 3);
}

/// A server presenting an expired certificate is refused by every client.
#[test]
fn clients_refuse_a_server_with_an_expired_certificate() {
    let (dir, pki, file, _) = setup("tls", 10);
    let args = [
        "--tls-cert".to_string(),
        path(&pki.expired_server.cert),
        "--tls-key".into(),
        path(&pki.expired_server.key),
    ];
    let server = serve_with(&dir, &file, &args, &[]);

    let out = qemu_img_info(&server, &pki.client_dir);
    assert_failed_saying(&out, "qemu-img against an expired certificate", &[]);
    let out = nbdinfo(&nbds(&server, &pki.client_dir));
    assert_failed_saying(
        &out,
        "nbdinfo against an expired certificate",
        &["certificate verification"],
    );
    let out = flexnbd_read(&server, 0, 512, &pki.client_args());
    assert_failed_saying(
        &out,
        "flexnbd read against an expired certificate",
        &["TLS handshake with the server failed", "expired"],
    );
    assert_no_export_chosen(&server, 3);
}

/// `--tls-hostname localhost` matches the certificate's name; a name it
/// does not carry is refused with a message naming it.
#[test]
fn flexnbd_read_checks_the_tls_hostname() {
    let (dir, pki, file, original) = setup("tls", 11);
    let server = serve_with(&dir, &file, &pki.server_args(), &[]);
    let mut good = pki.client_args();
    good.extend(["--tls-hostname".into(), "localhost".into()]);
    let out = flexnbd_read(&server, 0, 4096, &good);
    assert!(
        out.status.success(),
        "--tls-hostname localhost:\n{}",
        text(&out)
    );
    assert_same(&out.stdout, &original[..4096], "read as localhost");

    let mut bad = pki.client_args();
    bad.extend(["--tls-hostname".into(), "wrong.example".into()]);
    let out = flexnbd_read(&server, 0, 4096, &bad);
    assert_failed_saying(
        &out,
        "--tls-hostname wrong.example",
        &["wrong.example", "TLS handshake with the server failed"],
    );
    assert!(out.stdout.is_empty(), "no data without TLS");
}

/// `--tls-ca` towards an oldstyle server: the client stops at the greeting
/// rather than read in plaintext.
#[test]
fn flexnbd_read_with_tls_refuses_an_oldstyle_server() {
    let dir = TempDir::new("tls");
    let pki = Pki::new(&dir.path);
    let file = dir.pattern_file("disk.img", SIZE, 12);
    let server = Flexnbd::serve(&dir, &file, &["--handshake", "oldstyle"]);
    let out = flexnbd_read(&server, 0, 512, &pki.client_args());
    assert_failed_saying(
        &out,
        "read --tls-ca from an oldstyle server",
        &["oldstyle greeting, which cannot start TLS"],
    );
    assert!(out.stdout.is_empty(), "no data without TLS");
}

// ------------------------------------------ plaintext to required TLS

/// Plaintext nbdinfo, qemu-img and `flexnbd read` are refused by a
/// required-TLS server, each with an error that says TLS is needed; a TLS
/// client is served right after.
#[test]
fn plaintext_clients_of_a_required_tls_server_are_told_tls_is_required() {
    let (dir, pki, file, original) = setup("tls", 13);
    let server = serve_with(&dir, &file, &pki.server_args(), &[]);

    // libnbd reports TLS_REQD to GO only as "not supported" (the wire
    // answer is checked in the next test); qemu passes on the server's
    // message.
    let out = nbdinfo(&server.uri());
    assert_failed_saying(&out, "plaintext nbdinfo", &["opt_go", "not supported"]);
    let out = run_tool("qemu-img", &["info", &server.uri()], TOOL);
    assert_failed_saying(
        &out,
        "plaintext qemu-img",
        &["TLS negotiation required", "this server requires TLS"],
    );
    let out = flexnbd_read(&server, 0, 512, &[]);
    assert_failed_saying(
        &out,
        "plaintext flexnbd read",
        &[
            "the server requires TLS",
            "NBD_REP_ERR_TLS_REQD",
            "--tls-ca",
        ],
    );
    assert!(out.stdout.is_empty(), "no data in plaintext");
    server.wait_log("without starting TLS, which this server requires");

    let out = flexnbd_read(&server, 0, 4096, &pki.client_args());
    assert!(out.status.success(), "read over TLS:\n{}", text(&out));
    assert_same(&out.stdout, &original[..4096], "read over TLS");
}

/// On the wire: every plaintext option but STARTTLS and ABORT (LIST, INFO,
/// GO, STRUCTURED_REPLY, an unknown one) is answered NBD_REP_ERR_TLS_REQD
/// and the negotiation goes on; ABORT is acknowledged; a plaintext
/// EXPORT_NAME, which cannot be refused, is closed without a byte.
#[test]
fn a_required_tls_server_answers_plaintext_options_with_tls_reqd() {
    let (dir, pki, file, _) = setup("tls", 14);
    let server = serve_with(&dir, &file, &pki.server_args(), &[]);
    assert_eq!(rep::ERR_TLS_REQD, 0x8000_0005, "the specification's value");

    let mut c = server.connect();
    greet(&mut c);
    let info = InfoRequest {
        name: Vec::new(),
        requests: Vec::new(),
    }
    .encode();
    for (option, data) in [
        (opt::LIST, &[][..]),
        (opt::INFO, &info[..]),
        (opt::GO, &info[..]),
        (opt::STRUCTURED_REPLY, &[][..]),
        (42, &[][..]),
    ] {
        send_opt(&mut c.stream, option, data);
        expect_reply(&mut c.stream, option, rep::ERR_TLS_REQD);
    }
    send_opt(&mut c.stream, opt::ABORT, &[]);
    expect_reply(&mut c.stream, opt::ABORT, rep::ACK);

    let mut c = server.connect();
    greet(&mut c);
    send_opt(&mut c.stream, opt::EXPORT_NAME, b"");
    let mut rest = Vec::new();
    let n = c
        .stream
        .read_to_end(&mut rest)
        .expect("the server closes the connection");
    assert_eq!(n, 0, "a plaintext EXPORT_NAME got data: {rest:02x?}");
    wait_log_line(&server, &["EXPORT_NAME without starting TLS"]);

    // The same server goes on serving TLS clients.
    let mut tls = start_tls(server.connect_greeted(), &pki.ca);
    assert_eq!(go(&mut tls).0, SIZE);
}

// ------------------------------------------------- optional TLS

/// `--tls optional`: plaintext nbdinfo and TLS nbdinfo are both served by
/// one server, each seeing the export (and TLS only over `nbds://`).
#[test]
fn optional_tls_serves_plaintext_and_tls_clients_on_one_server() {
    let (dir, pki, file, _) = setup("tls", 15);
    let server = serve_with(&dir, &file, &pki.server_args(), &["--tls", "optional"]);
    let plain = server.uri();
    let tls = nbds(&server, &pki.client_dir);
    std::thread::scope(|s| {
        let a = s.spawn(|| assert_nbdinfo_sees_the_export(&plain));
        let b = s.spawn(|| assert_nbdinfo_sees_the_export(&tls));
        a.join().unwrap();
        b.join().unwrap();
    });
    assert_eq!(log_count(&server, "TLS started"), 1, "{}", server.log());
    assert!(
        !server.log().contains("TLS_REQD"),
        "optional TLS must not refuse plaintext:\n{}",
        server.log()
    );
}

// ---------------------------------------------- protocol details

impl Flexnbd {
    /// A raw connection past the greeting and client flags.
    fn connect_greeted(&self) -> RawClient {
        let mut c = self.connect();
        greet(&mut c);
        c
    }
}

/// STARTTLS with data is invalid and the plaintext negotiation goes on: a
/// proper STARTTLS then upgrades, and GO and a READ over TLS return the
/// image's data.
#[test]
fn starttls_with_data_is_invalid_and_the_session_goes_on() {
    let (dir, pki, file, original) = setup("tls", 16);
    let server = serve_with(&dir, &file, &pki.server_args(), &[]);
    let mut c = server.connect_greeted();
    send_opt(&mut c.stream, opt::STARTTLS, b"junk");
    let why = expect_reply(&mut c.stream, opt::STARTTLS, rep::ERR_INVALID);
    assert!(
        String::from_utf8_lossy(&why).contains("no data"),
        "{:?}",
        String::from_utf8_lossy(&why)
    );
    let mut tls = start_tls(c, &pki.ca);
    assert_eq!(go(&mut tls).0, SIZE);
    let got = read_simple(&mut tls, 65536, 65536);
    assert_same(&got, &original[65536..131072], "READ over TLS");
}

/// Inside TLS a second STARTTLS is invalid (never TLS_REQD), and the
/// session goes on to transmission.
#[test]
fn a_second_starttls_inside_tls_is_invalid() {
    let (dir, pki, file, original) = setup("tls", 17);
    let server = serve_with(&dir, &file, &pki.server_args(), &[]);
    let mut tls = start_tls(server.connect_greeted(), &pki.ca);
    send_opt(&mut tls, opt::STARTTLS, &[]);
    expect_reply(&mut tls, opt::STARTTLS, rep::ERR_INVALID);
    // Inside TLS, options are answered normally.
    send_opt(&mut tls, opt::LIST, &[]);
    expect_reply(&mut tls, opt::LIST, rep::SERVER);
    expect_reply(&mut tls, opt::LIST, rep::ACK);
    assert_eq!(go(&mut tls).0, SIZE);
    assert_same(&read_simple(&mut tls, 0, 512), &original[..512], "READ");
}

/// Structured replies negotiated in plaintext do not survive STARTTLS: a
/// metadata context then needs them negotiated again, GO advertises no DF,
/// and a READ gets a simple reply.
#[test]
fn structured_replies_negotiated_before_starttls_are_forgotten() {
    let (dir, pki, file, original) = setup("tls", 18);
    let server = serve_with(&dir, &file, &pki.server_args(), &["--tls", "optional"]);
    let mut c = server.connect_greeted();
    send_opt(&mut c.stream, opt::STRUCTURED_REPLY, &[]);
    expect_reply(&mut c.stream, opt::STRUCTURED_REPLY, rep::ACK);
    let mut tls = start_tls(c, &pki.ca);
    let meta = MetaContextRequest {
        name: Vec::new(),
        queries: vec![proto::BASE_ALLOCATION.as_bytes().to_vec()],
    }
    .encode();
    send_opt(&mut tls, opt::SET_META_CONTEXT, &meta);
    let why = expect_reply(&mut tls, opt::SET_META_CONTEXT, rep::ERR_INVALID);
    assert!(
        String::from_utf8_lossy(&why).contains("negotiate structured replies first"),
        "{:?}",
        String::from_utf8_lossy(&why)
    );
    let (size, transmission) = go(&mut tls);
    assert_eq!(size, SIZE);
    assert_eq!(
        transmission & flags::SEND_DF,
        0,
        "DF advertised without structured replies: 0x{transmission:04x}"
    );
    assert_same(&read_simple(&mut tls, 0, 4096), &original[..4096], "READ");
}

/// A newstyle server without TLS answers STARTTLS with ERR_UNSUP and goes
/// on in plaintext.
#[test]
fn starttls_on_a_server_without_tls_is_unsupported() {
    let dir = TempDir::new("tls");
    let file = dir.pattern_file("disk.img", SIZE, 19);
    let server = Flexnbd::serve(&dir, &file, &["--handshake", "newstyle"]);
    let mut c = server.connect_greeted();
    send_opt(&mut c.stream, opt::STARTTLS, &[]);
    expect_reply(&mut c.stream, opt::STARTTLS, rep::ERR_UNSUP);
    assert_eq!(go(&mut c.stream).0, SIZE);
    assert_same(
        &read_simple(&mut c.stream, 0, 512),
        &pattern(512, 19),
        "plaintext READ",
    );
}

// ------------------------------------------------- our own client

/// `flexnbd write --tls-ca` stores stdin in the image and `flexnbd read
/// --tls-ca` returns it, over TLS.
#[test]
fn flexnbd_write_and_read_round_trip_over_tls() {
    let (dir, pki, file, original) = setup("tls", 21);
    let server = serve_with(&dir, &file, &pki.server_args(), &[]);
    let data = pattern(200_000, 22);
    let out = flexnbd_write(&server, 300_000, &data, &pki.client_args());
    assert!(out.status.success(), "write over TLS:\n{}", text(&out));
    let mut expected = original;
    expected[300_000..500_000].copy_from_slice(&data);
    assert_same(&fs::read(&file).unwrap(), &expected, "image after write");

    let out = flexnbd_read(&server, 0, SIZE, &pki.client_args());
    assert!(out.status.success(), "read over TLS:\n{}", text(&out));
    assert_same(&out.stdout, &expected, "read over TLS");
    // `flexnbd read` ends without close_notify, between requests: a clean
    // end, not a dropped client.
    wait_for("both clients to finish", WAIT, || {
        (log_count(&server, " finished") == 2).then_some(())
    });
    assert_eq!(log_count(&server, "TLS started"), 2, "{}", server.log());
    assert!(!server.log().contains("dropped"), "{}", server.log());
}

// ----------------------------------------------------------------- CLI

const QUICK: Duration = Duration::from_secs(20);

fn flexnbd(args: &[String]) -> Assert {
    assert_tool(
        BIN,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        QUICK,
    )
}

/// Every bad TLS setting of `serve` (and `listen`, which shares them) exits
/// 1 with a message saying what is wrong, and opens no port.
#[test]
fn bad_tls_settings_are_refused_before_serving() {
    let dir = TempDir::new("tls");
    let pki = Pki::new(&dir.path);
    let file = dir.sparse_file("disk.img", SIZE);
    let missing = dir.join("missing.pem");
    let not_pem = dir.join("not.pem");
    fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let (cert, key) = (path(&pki.server.cert), path(&pki.server.key));
    let (ca, other_key) = (path(&pki.ca), path(&pki.client.key));
    let cases: Vec<(&str, Vec<String>, String)> = vec![
        (
            "serve",
            vec!["--tls-cert".into(), cert.clone()],
            "TLS needs both --tls-cert and --tls-key".into(),
        ),
        (
            "serve",
            vec!["--tls-key".into(), key.clone()],
            "TLS needs both --tls-cert and --tls-key".into(),
        ),
        (
            "serve",
            vec![
                "--tls-cert".into(),
                cert.clone(),
                "--tls-key".into(),
                key.clone(),
                "--tls-verify-peer".into(),
            ],
            "--tls-verify-peer needs --tls-ca".into(),
        ),
        (
            "serve",
            vec!["--tls-ca".into(), ca.clone()],
            "TLS needs both --tls-cert and --tls-key".into(),
        ),
        (
            "serve",
            vec![
                "--tls-cert".into(),
                cert.clone(),
                "--tls-key".into(),
                key.clone(),
                "--tls-ca".into(),
                ca.clone(),
            ],
            "add --tls-verify-peer".into(),
        ),
        (
            "serve",
            vec![
                "--handshake".into(),
                "oldstyle".into(),
                "--tls-cert".into(),
                cert.clone(),
                "--tls-key".into(),
                key.clone(),
            ],
            "TLS needs --handshake newstyle".into(),
        ),
        (
            "serve",
            vec![
                "--tls-cert".into(),
                path(&missing),
                "--tls-key".into(),
                key.clone(),
            ],
            format!("cannot read the certificate file {}", path(&missing)),
        ),
        (
            "serve",
            vec![
                "--tls-cert".into(),
                path(&not_pem),
                "--tls-key".into(),
                key.clone(),
            ],
            "holds no PEM certificate".into(),
        ),
        (
            "serve",
            vec![
                "--tls-cert".into(),
                cert.clone(),
                "--tls-key".into(),
                path(&missing),
            ],
            "cannot read the key file".into(),
        ),
        (
            "serve",
            vec![
                "--tls-cert".into(),
                cert.clone(),
                "--tls-key".into(),
                path(&not_pem),
            ],
            "holds no PEM private key".into(),
        ),
        (
            "serve",
            vec![
                "--tls-cert".into(),
                cert.clone(),
                "--tls-key".into(),
                other_key.clone(),
            ],
            "cannot be used together".into(),
        ),
        (
            "serve",
            vec!["--tls".into(), "optional".into()],
            "TLS needs both --tls-cert and --tls-key".into(),
        ),
        (
            "serve",
            vec![
                "--tls-cert".into(),
                cert.clone(),
                "--tls-key".into(),
                key.clone(),
                "--oldstyle-extra-flags".into(),
            ],
            "--oldstyle-extra-flags needs --handshake oldstyle".into(),
        ),
        (
            "serve",
            vec![
                "--tls-cert".into(),
                cert.clone(),
                "--tls-key".into(),
                key.clone(),
                "--tls-ca".into(),
                path(&not_pem),
                "--tls-verify-peer".into(),
            ],
            "holds no PEM certificate".into(),
        ),
        (
            "listen",
            vec!["--tls-cert".into(), cert.clone()],
            "TLS needs both --tls-cert and --tls-key".into(),
        ),
        (
            "listen",
            vec![
                "--handshake".into(),
                "oldstyle".into(),
                "--tls-cert".into(),
                cert.clone(),
                "--tls-key".into(),
                key.clone(),
            ],
            "TLS needs --handshake newstyle".into(),
        ),
    ];
    std::thread::scope(|s| {
        let runs: Vec<_> = cases
            .iter()
            .map(|(mode, tls, message)| {
                let file = &file;
                s.spawn(move || {
                    let mut args: Vec<String> = [*mode, "-l", "127.0.0.1", "-p", "0", "-v", "-f"]
                        .iter()
                        .map(|s| s.to_string())
                        .collect();
                    args.push(path(file));
                    args.extend(tls.iter().cloned());
                    flexnbd(&args)
                        .code(1)
                        .stderr(predicate::str::contains(message.as_str()))
                        .stderr(predicate::str::contains("listening on").not());
                })
            })
            .collect();
        for r in runs {
            r.join().unwrap();
        }
    });
}

/// Bad TLS settings of `read`/`write` exit 1 with a message before any
/// connection is made.
#[test]
fn bad_client_tls_settings_are_refused() {
    let dir = TempDir::new("tls");
    let pki = Pki::new(&dir.path);
    // Nothing listens on port 9 of 127.0.0.1: a client that tried to connect
    // would fail differently.
    let base = ["read", "-l", "127.0.0.1", "-p", "9", "-F", "0", "-S", "512"];
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--tls-cert".into(), path(&pki.client.cert)],
            "TLS needs --tls-ca",
        ),
        (
            vec![
                "--tls-ca".into(),
                path(&pki.ca),
                "--tls-cert".into(),
                path(&pki.client.cert),
            ],
            "a client certificate needs both --tls-cert and --tls-key",
        ),
        (
            vec!["--tls-ca".into(), path(&dir.join("missing.pem"))],
            "cannot read the CA file",
        ),
        (
            vec![
                "--tls-ca".into(),
                path(&pki.ca),
                "--tls-hostname".into(),
                "not a host name".into(),
            ],
            "bad TLS host name",
        ),
    ];
    for (tls, message) in cases {
        let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        args.extend(tls);
        flexnbd(&args)
            .code(1)
            .stderr(predicate::str::contains(message))
            .stderr(predicate::str::contains("refused").not());
    }
}

/// `serve --help` and `read --help` list the TLS flags.
#[test]
fn help_lists_the_tls_flags() {
    let serve = flexnbd(&["serve".into(), "--help".into()]).success();
    let out = String::from_utf8_lossy(&serve.get_output().stdout).into_owned();
    for flag in [
        "--tls-cert",
        "--tls-key",
        "--tls-ca",
        "--tls-verify-peer",
        "--tls <POLICY>",
        "required",
        "optional",
    ] {
        assert!(out.contains(flag), "serve --help lacks {flag}:\n{out}");
    }
    let read = flexnbd(&["read".into(), "--help".into()]).success();
    let out = String::from_utf8_lossy(&read.get_output().stdout).into_owned();
    for flag in ["--tls-ca", "--tls-cert", "--tls-key", "--tls-hostname"] {
        assert!(out.contains(flag), "read --help lacks {flag}:\n{out}");
    }
}

// ------------------------------------------------ certificate rotation

/// Puts `pair`'s certificate and key where the server reads them, each by
/// a rename (as a certificate manager does), so a reload sees whole files.
fn install(pair: &crate::certs::Pair, cert: &Path, key: &Path) {
    for (from, to) in [(&pair.cert, cert), (&pair.key, key)] {
        let staged = to.with_extension("new");
        fs::copy(from, &staged).unwrap();
        fs::rename(&staged, to).unwrap();
    }
}

/// A server whose certificate and key live at fixed paths (`live-*.pem`),
/// with a control socket; starts with `pki`'s server pair.
fn rotating_server(dir: &TempDir, pki: &Pki, file: &Path) -> (Flexnbd, std::path::PathBuf) {
    let (cert, key) = (dir.join("live-cert.pem"), dir.join("live-key.pem"));
    install(&pki.server, &cert, &key);
    let sock = dir.join("ctl.sock");
    let args = server_args(
        "serve",
        file,
        Some(&sock),
        &["--tls-cert", &path(&cert), "--tls-key", &path(&key)],
    );
    (Flexnbd::spawn(dir, &args), sock)
}

/// SIGHUP: new connections get the new certificate (a client trusting only
/// the new CA gets in, one trusting only the old is refused), while a
/// connection made before it goes on reading under the old session.
#[test]
fn sighup_rotates_the_certificate_for_new_connections_and_keeps_existing_ones() {
    let (dir, old, file, content) = setup("tls", 31);
    let new = Pki::new(&dir.join("new"));
    let (server, _sock) = rotating_server(&dir, &old, &file);
    let trusts = |pki: &Pki| vec!["--tls-ca".to_string(), path(&pki.ca)];
    let out = flexnbd_read(&server, 0, 4096, &trusts(&old));
    assert!(out.status.success(), "before: {}", text(&out));
    let mut existing = start_tls(server.connect_greeted(), &old.ca);
    assert_eq!(go(&mut existing).0, SIZE);

    install(
        &new.server,
        &dir.join("live-cert.pem"),
        &dir.join("live-key.pem"),
    );
    server.signal(libc::SIGHUP);
    wait_log_line(&server, &["TLS credentials read again", "live-cert.pem"]);

    let out = flexnbd_read(&server, 0, 4096, &trusts(&new));
    assert!(
        out.status.success(),
        "a client of the new CA: {}",
        text(&out)
    );
    assert_same(
        &out.stdout,
        &content[..4096],
        "read with the new certificate",
    );
    let out = flexnbd_read(&server, 0, 4096, &trusts(&old));
    assert!(
        !out.status.success(),
        "a client trusting only the old CA got in after the rotation: {}",
        text(&out)
    );
    // The connection from before goes on.
    assert_same(
        &read_simple(&mut existing, 8192, 4096),
        &content[8192..12288],
        "the connection made before the rotation",
    );
    server.assert_no_panic();
}

/// `flexnbd reload-tls`: a key that does not match the new certificate is
/// refused, saying why, and the server keeps the credentials it had (old
/// clients still get in); a good pair is then taken the same way.
#[test]
fn reload_tls_with_a_bad_pair_keeps_the_old_credentials_and_says_why() {
    let (dir, old, file, _) = setup("tls", 32);
    let new = Pki::new(&dir.join("new"));
    let (server, sock) = rotating_server(&dir, &old, &file);
    let (cert, key) = (dir.join("live-cert.pem"), dir.join("live-key.pem"));
    // The new certificate with the old key: a pair that does not match.
    fs::copy(&new.server.cert, &cert).unwrap();
    let out = run_tool(BIN, &["reload-tls", "-s", &path(&sock)], TOOL);
    assert!(
        !out.status.success(),
        "a bad pair was taken: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("keeping the ones in use"),
        "reload-tls must say the old credentials stay: {}",
        text(&out)
    );
    wait_log_line(
        &server,
        &[
            "cannot read the TLS credentials again",
            "keeping the ones in use",
        ],
    );
    let old_ca = vec!["--tls-ca".to_string(), path(&old.ca)];
    let out = flexnbd_read(&server, 0, 4096, &old_ca);
    assert!(
        out.status.success(),
        "the old credentials stay in use: {}",
        text(&out)
    );
    // A missing file: refused the same way.
    fs::remove_file(&key).unwrap();
    let out = run_tool(BIN, &["reload-tls", "-s", &path(&sock)], TOOL);
    assert!(
        !out.status.success(),
        "a missing key was taken: {}",
        text(&out)
    );
    // The whole new pair: taken.
    install(&new.server, &cert, &key);
    let out = run_tool(BIN, &["reload-tls", "-s", &path(&sock)], TOOL);
    assert!(out.status.success(), "the good pair: {}", text(&out));
    let new_ca = vec!["--tls-ca".to_string(), path(&new.ca)];
    let out = flexnbd_read(&server, 0, 4096, &new_ca);
    assert!(
        out.status.success(),
        "after the good reload: {}",
        text(&out)
    );
    server.assert_no_panic();
}

/// Without TLS, SIGHUP is no reason to stop (its default action would
/// kill the process) and reload-tls says there is nothing to read.
#[test]
fn without_tls_sighup_keeps_serving_and_reload_tls_says_why_not() {
    let dir = TempDir::new("tls");
    let file = dir.pattern_file("disk.img", SIZE, 33);
    let sock = dir.join("ctl.sock");
    let mut server = Flexnbd::spawn(&dir, &server_args("serve", &file, Some(&sock), &[]));
    server.signal(libc::SIGHUP);
    wait_log_line(&server, &["SIGHUP", "no TLS is set up"]);
    assert!(
        server.is_running(),
        "SIGHUP stopped the server: {}",
        server.log()
    );
    let out = run_tool(BIN, &["reload-tls", "-s", &path(&sock)], TOOL);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no TLS is set up"), "{}", text(&out));
    let out = flexnbd_read(&server, 0, 4096, &[]);
    assert!(out.status.success(), "{}", text(&out));
}

/// A fault inside the TLS handshake (`server.tls_handshake`): the first
/// client, past its STARTTLS, sees the server close instead of the
/// handshake, and says the handshake failed; the next is served.
#[test]
fn a_server_closing_in_the_tls_handshake_fails_that_client_only() {
    let (dir, pki, file, content) = setup("tls", 34);
    let server = serve_with(
        &dir,
        &file,
        &pki.server_args(),
        &["--faults", "server.tls_handshake#1=close"],
    );
    let out = flexnbd_read(&server, 0, 4096, &pki.client_args());
    assert!(
        !out.status.success(),
        "the handshake was cut: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("TLS handshake with the server failed"),
        "{}",
        text(&out)
    );
    server.assert_fired("server.tls_handshake#1", "close");
    let out = flexnbd_read(&server, 0, 4096, &pki.client_args());
    assert!(out.status.success(), "the next client: {}", text(&out));
    assert_same(
        &out.stdout,
        &content[..4096],
        "read after the cut handshake",
    );
    server.assert_no_panic();
}

// ------------------------------------------------- handshakes from strangers

/// (scheduling policy, nice value) of each of the server's threads whose
/// name (as /proc shows it: the first 15 bytes) is `comm`, or with
/// `others`, is not.
fn thread_priorities(server: &Flexnbd, comm: &str, others: bool) -> Vec<(i64, i64)> {
    let tasks = format!("/proc/{}/task", server.server_pid);
    let mut found = Vec::new();
    for task in fs::read_dir(&tasks).expect("the server's threads") {
        let task = task.unwrap().path();
        let Ok(name) = fs::read_to_string(task.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if (name.trim_end() == comm) == others {
            continue;
        }
        let stat = fs::read_to_string(task.join("stat")).expect("the thread's stat");
        // After the ")" that ends the name, state is field 3, nice field
        // 19 and the scheduling policy field 41 (proc(5)).
        let rest: Vec<&str> = stat[stat.rfind(')').expect("a stat line") + 2..]
            .split(' ')
            .collect();
        let field = |n: usize| -> i64 { rest[n - 3].parse().unwrap() };
        found.push((field(41), field(19)));
    }
    found
}

/// The server negotiates with newcomers, TLS handshakes included, on one
/// thread of its own, "flexnbd-gate", at nice 19, while the async workers
/// that serve established clients keep the server's nice value
/// (docs/hostile.md).
#[test]
fn tls_handshakes_run_on_the_gate_thread_at_nice_19() {
    let (dir, pki, file, original) = setup("tls", 40);
    let server = serve_with(&dir, &file, &pki.server_args(), &[]);
    let mut tls = start_tls(server.connect_greeted(), &pki.ca);
    assert_eq!(go(&mut tls).0, SIZE);
    assert_same(&read_simple(&mut tls, 0, 4096), &original[..4096], "READ");
    let normal = libc::SCHED_OTHER as i64;
    assert_eq!(
        thread_priorities(&server, "flexnbd-gate", false),
        vec![(normal, 19)],
        "the gate thread's (policy, nice), once a client has negotiated"
    );
    // The others keep the nice value the server started with (this test
    // run's own, 0 unless the suite itself runs under nice).
    // SAFETY: getpriority only reads; errno is not consulted since
    // nice values of -1 are not used here.
    let ours = i64::from(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) });
    assert!(
        ours < 19,
        "the test runs at nice {ours}: nothing to compare"
    );
    let others = thread_priorities(&server, "flexnbd-gate", true);
    assert!(
        others.len() >= 2 && others.iter().all(|&p| p == (normal, ours)),
        "the other threads' (main, async workers) (policy, nice), against the test's nice {ours}: {others:?}"
    );
    server.assert_no_panic();
}

/// 32 TLS handshakes at once, beside a plaintext client reading (TLS
/// optional): every handshake completes and reads the right data, and
/// every plaintext read meanwhile is answered, and right.
#[test]
fn a_burst_of_tls_handshakes_leaves_a_plaintext_client_served() {
    const BURST: usize = 32;
    let (dir, pki, file, original) = setup("tls", 41);
    let server = serve_with(
        &dir,
        &file,
        &pki.server_args(),
        &["--tls", "optional", "--max-clients", "40"],
    );
    let mut plain = server.connect_greeted();
    assert_eq!(go(&mut plain.stream).0, SIZE);
    let done = std::sync::atomic::AtomicBool::new(false);
    let reads = std::thread::scope(|s| {
        let burst: Vec<_> = (0..BURST)
            .map(|i| {
                let (server, pki, original) = (&server, &pki, &original);
                s.spawn(move || {
                    let mut tls = start_tls(server.connect_greeted(), &pki.ca);
                    assert_eq!(go(&mut tls).0, SIZE);
                    let at = (i as u64 * 4096) % SIZE;
                    let got = read_simple(&mut tls, at, 4096);
                    assert_same(&got, &original[at as usize..][..4096], "READ over TLS");
                })
            })
            .collect();
        let reader = s.spawn(|| {
            let mut n = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let at = (n * 8192) % SIZE;
                let got = read_simple(&mut plain.stream, at, 4096);
                assert_same(&got, &original[at as usize..][..4096], "plaintext READ");
                n += 1;
            }
            n
        });
        for t in burst {
            t.join().expect("a TLS client of the burst");
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().expect("the plaintext client")
    });
    assert!(reads > 0, "the plaintext client read during the burst");
    let deadline = std::time::Instant::now() + WAIT;
    while log_count(&server, "TLS started") < BURST && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(log_count(&server, "TLS started"), BURST);
    server.assert_no_panic();
}

/// A client that sends STARTTLS and then nothing is dropped when the
/// handshake time is up, though its handshake was waiting on the gate
/// thread: the socket is closed there too, not held for ever.
#[test]
fn a_client_silent_inside_the_tls_handshake_is_dropped_at_the_handshake_timeout() {
    let (dir, pki, file, _) = setup("tls", 42);
    let server = serve_with(
        &dir,
        &file,
        &pki.server_args(),
        &["--handshake-timeout", "0.5"],
    );
    let mut c = server.connect_greeted();
    send_opt(&mut c.stream, opt::STARTTLS, &[]);
    expect_reply(&mut c.stream, opt::STARTTLS, rep::ACK);
    let began = std::time::Instant::now();
    let mut rest = Vec::new();
    // The client's read timeout (15 s) bounds this; a close is an EOF.
    c.stream
        .read_to_end(&mut rest)
        .expect("the server closes the connection rather than leave it open");
    assert!(rest.is_empty(), "the server sent {rest:02x?}");
    let took = began.elapsed();
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    server.wait_log("handshake not finished within 0.5 s");
    server.assert_no_panic();
}
