//! `flexnbd-proxy` with TLS: upstream (`--upstream-tls-ca`, towards a
//! `flexnbd serve --tls-cert`) and downstream (`--tls-cert`, towards real
//! clients: nbdinfo, nbdcopy, `flexnbd read`/`write`), with credentials
//! made at test time.
//!
//! Simulated: a TLS-only upstream, a proxy that lacks upstream TLS, an
//! upstream that restarts, clients with and without a certificate, a
//! plaintext client, and fault plans on proxy steps. What must happen: data
//! goes through unchanged and every upstream connection (the first and each
//! reconnection) is TLS; a proxy that cannot speak TLS to a TLS-only
//! upstream exits 1 before listening and says why; downstream, a TLS proxy
//! greets with fixed newstyle, offers neither multi-connection nor
//! structured replies, refuses a plaintext client's options with
//! NBD_REP_ERR_TLS_REQD and, with --tls-verify-peer, a client without a
//! certificate; `proxy.*` faults fire and act on TLS connections.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;

use flexnbd::proto::{self, opt, rep, OptionHeader, OptionReplyHeader};
use predicates::prelude::*;

use crate::certs::Pki;
use crate::harness::{
    assert_tool, pattern, read_file_range, run_ok, run_tool, run_tool_with_input, send_option,
    wait_for, Flexnbd, RawClient, TempDir, BIN, WAIT,
};

const PROXY: &str = env!("CARGO_BIN_EXE_flexnbd-proxy");
const MIB: u64 = 1024 * 1024;
const MAX: u32 = 32 * 1024 * 1024;

/// Starts `flexnbd-proxy -l 127.0.0.1 -p 0 -C UPSTREAM -v EXTRA` and waits
/// until it listens.
fn proxy(dir: &TempDir, upstream: SocketAddr, extra: &[String]) -> Flexnbd {
    Flexnbd::spawn_program(dir, PROXY, &proxy_args(upstream, extra))
}

/// The proxy's arguments: listen on any port of 127.0.0.1, forward to
/// `upstream`, log verbosely, then `extra`.
fn proxy_args(upstream: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = ["-l", "127.0.0.1", "-p", "0", "-C"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(upstream.ip().to_string());
    args.push("-P".into());
    args.push(upstream.port().to_string());
    args.push("-v".into());
    args.extend(extra.iter().cloned());
    args
}

/// `--upstream-tls-ca CA`: the proxy verifies a TLS upstream.
fn upstream_tls(pki: &Pki) -> Vec<String> {
    vec!["--upstream-tls-ca".into(), pki.ca.display().to_string()]
}

/// `--tls-cert`/`--tls-key`: the proxy serves its client over TLS.
fn downstream_tls(pki: &Pki) -> Vec<String> {
    pki.server_args()
}

/// `flexnbd serve` of `file` requiring TLS, on `port` (0: any).
fn tls_upstream(dir: &TempDir, file: &Path, pki: &Pki, port: u16) -> Flexnbd {
    let port = port.to_string();
    let mut args: Vec<String> = ["serve", "-l", "127.0.0.1", "-p", &port, "-v", "-f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(file.display().to_string());
    args.extend(pki.server_args());
    Flexnbd::spawn(dir, &args)
}

fn count(log: &str, text: &str) -> usize {
    log.matches(text).count()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `nbds://` for the proxy, verifying it with the certificates in `dir`
/// (libnbd's GnuTLS directory layout).
fn nbds(p: &Flexnbd, dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/?tls-certificates={}",
        p.port(),
        dir.display()
    )
}

/// `flexnbd read` of `len` bytes at `from` through the proxy, with `tls`
/// flags.
fn flexnbd_read(p: &Flexnbd, from: u64, len: u64, tls: &[String]) -> Output {
    let mut args: Vec<String> = vec![
        "read".into(),
        "-l".into(),
        "127.0.0.1".into(),
        "-p".into(),
        p.port().to_string(),
        "-F".into(),
        from.to_string(),
        "-S".into(),
        len.to_string(),
    ];
    args.extend(tls.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_tool(BIN, &args, WAIT)
}

fn flexnbd_write(p: &Flexnbd, from: u64, data: &[u8], tls: &[String]) -> Output {
    let mut args: Vec<String> = vec![
        "write".into(),
        "-l".into(),
        "127.0.0.1".into(),
        "-p".into(),
        p.port().to_string(),
        "-F".into(),
        from.to_string(),
        "-S".into(),
        data.len().to_string(),
    ];
    args.extend(tls.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_tool_with_input(BIN, &args, Some(data), WAIT)
}

// ------------------------------------------------------------------ upstream

#[test]
fn upstream_tls_carries_reads_and_writes_of_up_to_32_mib_to_a_tls_only_upstream() {
    let dir = TempDir::new("proxy-tls-up");
    let pki = Pki::new(&dir.path);
    let file = dir.sparse_file("image", 40 * MIB);
    let upstream = tls_upstream(&dir, &file, &pki, 0);
    let p = proxy(&dir, upstream.addr, &upstream_tls(&pki));
    // The downstream side is unchanged: the C proxy's oldstyle greeting.
    let mut c = RawClient::connect(p.addr);
    let (size, _flags) = c.oldstyle_greeting();
    assert_eq!(size, 40 * MIB);
    let small = pattern(4096, 31);
    c.write_ok(8192, &small);
    assert_eq!(
        read_file_range(&file, 8192, 4096),
        small,
        "the write landed"
    );
    assert_eq!(c.read_ok(8192, 4096), small);
    // Far more than the socket buffers hold, both ways: every message must
    // leave the TLS session whole, not just the part the socket took.
    let big = pattern(MAX as usize, 32);
    c.write_ok(MIB, &big);
    assert!(
        read_file_range(&file, MIB, MAX as usize) == big,
        "32 MiB landed"
    );
    assert!(c.read_ok(MIB, MAX) == big, "32 MiB read back");
    upstream.wait_log("TLS started");
    assert_eq!(
        count(&upstream.log(), "TLS started"),
        1,
        "one upstream connection, over TLS"
    );
    assert!(!p.log().contains("reconnecting"), "no upstream failure");
    p.assert_no_panic();
    upstream.assert_no_panic();
}

#[test]
fn tls_only_upstream_and_a_proxy_without_upstream_tls_cause_exit_1_before_listening() {
    let dir = TempDir::new("proxy-tls-none");
    let pki = Pki::new(&dir.path);
    let file = dir.sparse_file("image", MIB);
    let upstream = tls_upstream(&dir, &file, &pki, 0);
    let plain = proxy_args(upstream.addr, &[]);
    let plain: Vec<&str> = plain.iter().map(String::as_str).collect();
    assert_tool(PROXY, &plain, WAIT)
        .code(1)
        .stderr(predicate::str::contains("the upstream requires TLS"))
        .stderr(predicate::str::contains("NBD_REP_ERR_TLS_REQD"))
        .stderr(predicate::str::contains("give --upstream-tls-ca"))
        .stderr(predicate::str::contains(
            "Couldn't connect to upstream server during initialization",
        ))
        .stderr(predicate::str::contains("listening on").not());
    // And with TLS asked for, an upstream whose certificate another CA
    // signed is refused just as early.
    let wrong = proxy_args(
        upstream.addr,
        &[
            "--upstream-tls-ca".into(),
            pki.other_ca.display().to_string(),
        ],
    );
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    assert_tool(PROXY, &wrong, WAIT)
        .code(1)
        .stderr(predicate::str::contains(
            "TLS handshake with the upstream failed",
        ))
        .stderr(predicate::str::contains("listening on").not());
}

#[test]
fn upstream_restart_causes_a_reconnection_over_tls_and_the_request_replayed() {
    let dir = TempDir::new("proxy-tls-restart");
    let pki = Pki::new(&dir.path);
    let file = dir.pattern_file("image", MIB, 41);
    let mut first = tls_upstream(&dir, &file, &pki, 0);
    let port = first.port();
    let p = proxy(&dir, first.addr, &upstream_tls(&pki));
    let mut c = RawClient::connect(p.addr);
    c.oldstyle_greeting();
    let data = pattern(4096, 42);
    c.write_ok(0, &data);
    first.wait_log("TLS started");
    first.signal(libc::SIGKILL);
    first.wait_exit();
    // Same port: the proxy knows only that address. TLS is required, so a
    // plaintext reconnection would fail for ever.
    let second = tls_upstream(&dir, &file, &pki, port);
    assert_eq!(second.port(), port);
    assert_eq!(c.read_ok(0, 4096), data, "served by the new upstream");
    p.wait_log("reconnecting to resend");
    second.wait_log("TLS started");
    let log = p.log();
    assert_eq!(
        count(&log, "connected to upstream"),
        2,
        "the first connection and one reconnection:\n{log}"
    );
    p.assert_no_panic();
}

// ---------------------------------------------------------------- downstream

/// One proxy between a plaintext upstream and a TLS client.
struct Down {
    dir: TempDir,
    pki: Pki,
    /// The upstream's image.
    file: PathBuf,
    /// Runs as long as this lives.
    _upstream: Flexnbd,
    proxy: Flexnbd,
}

/// A plaintext upstream advertising every flag (MULTI_CONN included) and a
/// proxy serving it over TLS with the flags `extra` gives.
fn downstream_setup(tag: &str, extra: impl FnOnce(&Pki) -> Vec<String>) -> Down {
    let dir = TempDir::new(tag);
    let pki = Pki::new(&dir.path);
    let file = dir.pattern_file("image", 4 * MIB, 51);
    let upstream = Flexnbd::serve(&dir, &file, &["--oldstyle-extra-flags"]);
    let mut args = downstream_tls(&pki);
    args.extend(extra(&pki));
    let proxy = proxy(&dir, upstream.addr, &args);
    Down {
        dir,
        pki,
        file,
        _upstream: upstream,
        proxy,
    }
}

#[test]
fn downstream_tls_serves_nbdinfo_and_nbdcopy_with_simple_replies_and_no_multi_conn() {
    let d = downstream_setup("proxy-tls-down", |_| vec![]);
    let (dir, pki, file, p) = (&d.dir, &d.pki, &d.file, &d.proxy);
    let uri = nbds(p, &pki.client_dir);
    let info = text(&run_ok("nbdinfo", &[&uri], WAIT));
    for wanted in [
        "protocol: newstyle-fixed with TLS",
        "using simple packets",
        &format!("export-size: {}", 4 * MIB),
        "can_multi_conn: false",
        "can_flush: true",
        "can_trim: true",
        "can_zero: true",
    ] {
        assert!(info.contains(wanted), "nbdinfo lacks {wanted:?}:\n{info}");
    }
    // Download, then upload new content, both through TLS.
    let out = dir.join("copy.img");
    run_ok("nbdcopy", &[&uri, out.to_str().unwrap()], WAIT);
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(file).unwrap(),
        "nbdcopy's download equals the upstream image"
    );
    let source = dir.pattern_file("source.img", 4 * MIB, 52);
    run_ok("nbdcopy", &[source.to_str().unwrap(), &uri], WAIT);
    assert!(
        std::fs::read(file).unwrap() == std::fs::read(&source).unwrap(),
        "nbdcopy's upload reached the upstream image"
    );
    p.wait_log("TLS started");
    p.assert_no_panic();
}

#[test]
fn downstream_tls_serves_flexnbd_read_and_write_with_tls_ca() {
    let d = downstream_setup("proxy-tls-rw", |_| vec![]);
    let (pki, file, p) = (&d.pki, &d.file, &d.proxy);
    let data = pattern(100_000, 53);
    let out = flexnbd_write(p, 5000, &data, &pki.client_args());
    assert!(out.status.success(), "write failed:\n{}", text(&out));
    assert_eq!(read_file_range(file, 5000, data.len()), data);
    let out = flexnbd_read(p, 5000, data.len() as u64, &pki.client_args());
    assert!(out.status.success(), "read failed:\n{}", text(&out));
    assert!(out.stdout == data, "read back what was written");
    // A client that trusts another CA refuses the proxy's certificate.
    let wrong = vec!["--tls-ca".to_string(), pki.other_ca.display().to_string()];
    let out = flexnbd_read(p, 0, 512, &wrong);
    assert!(
        !out.status.success(),
        "a wrong CA must fail:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("TLS handshake with the server failed"),
        "{}",
        text(&out)
    );
    p.wait_log("TLS handshake failed");
    p.assert_no_panic();
}

#[test]
fn plaintext_client_of_a_tls_proxy_gets_tls_reqd_and_export_name_closes() {
    let d = downstream_setup("proxy-tls-plain", |_| vec![]);
    let p = &d.proxy;
    let mut c = RawClient::connect(p.addr);
    let g = c.read_exact(18);
    assert_eq!(&g[0..8], b"NBDMAGIC");
    assert_eq!(
        &g[8..16],
        &0x4948_4156_454f_5054u64.to_be_bytes(),
        "IHAVEOPT"
    );
    assert_eq!(
        u16::from_be_bytes([g[16], g[17]]),
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
    );
    c.send(&proto::CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    for option in [opt::GO, opt::INFO, opt::LIST, opt::STRUCTURED_REPLY] {
        let data = if matches!(option, opt::GO | opt::INFO) {
            proto::InfoRequest {
                name: Vec::new(),
                requests: Vec::new(),
            }
            .encode()
        } else {
            Vec::new()
        };
        send_option(&mut c, option, &data);
        let h = c.read_exact(20);
        let reply = OptionReplyHeader::decode(h.as_slice().try_into().unwrap()).unwrap();
        assert_eq!(
            (reply.option, reply.kind),
            (option, rep::ERR_TLS_REQD),
            "option {option} without TLS"
        );
        c.read_exact(reply.length as usize);
    }
    // EXPORT_NAME has no error reply: the proxy closes.
    send_option(&mut c, opt::EXPORT_NAME, b"");
    assert!(c.sees_eof(), "EXPORT_NAME without TLS closes the session");
    p.wait_log("NBD_REP_ERR_TLS_REQD");
    // nbdinfo in plaintext is refused too, and says so.
    let out = run_tool("nbdinfo", &[&format!("nbd://127.0.0.1:{}", p.port())], WAIT);
    assert!(
        !out.status.success(),
        "plaintext nbdinfo must fail:\n{}",
        text(&out)
    );
    p.assert_no_panic();
}

#[test]
fn downstream_verify_peer_accepts_a_signed_client_certificate_and_refuses_none() {
    let d = downstream_setup("proxy-tls-verify", |pki| {
        vec![
            "--tls-ca".into(),
            pki.ca.display().to_string(),
            "--tls-verify-peer".into(),
        ]
    });
    let (pki, file, p) = (&d.pki, &d.file, &d.proxy);
    // libnbd with a certificate our CA signed.
    let info = text(&run_ok(
        "nbdinfo",
        &[&nbds(p, &pki.client_dir_with_cert)],
        WAIT,
    ));
    assert!(info.contains("with TLS"), "{info}");
    p.wait_log("TLS started (client certificate verified)");
    let out = flexnbd_read(p, 0, 4096, &pki.client_args_with_cert());
    assert!(out.status.success(), "read failed:\n{}", text(&out));
    assert!(out.stdout == read_file_range(file, 0, 4096));
    // No certificate: refused, by libnbd's client and by ours.
    let out = run_tool("nbdinfo", &[&nbds(p, &pki.client_dir)], WAIT);
    assert!(
        !out.status.success(),
        "nbdinfo without a certificate:\n{}",
        text(&out)
    );
    let out = flexnbd_read(p, 0, 4096, &pki.client_args());
    assert!(
        !out.status.success(),
        "read without a certificate:\n{}",
        text(&out)
    );
    assert!(out.stdout.is_empty(), "no data without a certificate");
    // A certificate another CA signed, and an expired one: refused too.
    for dir in [&pki.foreign_client_dir, &pki.expired_client_dir] {
        let out = run_tool("nbdinfo", &[&nbds(p, dir)], WAIT);
        assert!(!out.status.success(), "{}:\n{}", dir.display(), text(&out));
    }
    let log = p.log();
    assert!(
        count(&log, "TLS handshake failed") >= 4,
        "every refused client is logged:\n{log}"
    );
    // The proxy still serves a good client afterwards.
    let out = flexnbd_read(p, 512, 512, &pki.client_args_with_cert());
    assert!(out.status.success(), "read failed:\n{}", text(&out));
    p.assert_no_panic();
}

// -------------------------------------------------------------------- faults

#[test]
fn proxy_fault_plans_fire_and_act_on_tls_connections_both_ways() {
    let dir = TempDir::new("proxy-tls-faults");
    let pki = Pki::new(&dir.path);
    let file = dir.pattern_file("image", MIB, 61);
    let upstream = tls_upstream(&dir, &file, &pki, 0);
    let plan = "proxy.option_reply_send.5#1=close; proxy.request_send.write#1=close; \
                proxy.reply_send.read#1=corrupt";
    let mut args = upstream_tls(&pki);
    args.extend(downstream_tls(&pki));
    args.extend(["--faults".to_string(), plan.to_string()]);
    let p = proxy(&dir, upstream.addr, &args);
    let tls = pki.client_args();
    // The first STARTTLS gets no ACK: the proxy closes instead.
    let out = flexnbd_read(&p, 0, 512, &tls);
    assert!(
        !out.status.success(),
        "STARTTLS was not answered:\n{}",
        text(&out)
    );
    p.assert_fired("proxy.option_reply_send.5#1", "close");
    // The first write upstream is replaced by a close: the proxy reconnects
    // (over TLS: the upstream accepts nothing else) and sends it again.
    let data = pattern(3000, 62);
    let out = flexnbd_write(&p, 700, &data, &tls);
    assert!(out.status.success(), "write failed:\n{}", text(&out));
    assert_eq!(read_file_range(&file, 700, data.len()), data);
    p.assert_fired("proxy.request_send.write#1", "close");
    p.wait_log("reconnecting to resend");
    assert_eq!(
        count(&upstream.log(), "TLS started"),
        2,
        "the reconnection went through TLS too:\n{}",
        upstream.log()
    );
    // The first read's reply leaves with a damaged magic, inside TLS.
    let out = flexnbd_read(&p, 700, 3000, &tls);
    assert!(
        !out.status.success(),
        "a corrupt reply must fail:\n{}",
        text(&out)
    );
    assert!(text(&out).contains("bad reply magic"), "{}", text(&out));
    p.assert_fired("proxy.reply_send.read#1", "corrupt");
    // Then everything passes again.
    let out = flexnbd_read(&p, 700, 3000, &tls);
    assert!(out.status.success(), "read failed:\n{}", text(&out));
    assert!(out.stdout == data);
    p.assert_no_panic();
}

#[test]
fn tls_usage_errors_cause_exit_1_with_the_flag_named() {
    let dir = TempDir::new("proxy-tls-usage");
    let pki = Pki::new(&dir.path);
    let ca = pki.ca.display().to_string();
    let cert = pki.client.cert.display().to_string();
    let base = ["-l", "127.0.0.1", "-p", "0", "-C", "127.0.0.1", "-P", "1"];
    let cases: &[(&[&str], &str)] = &[
        (&["--upstream-tls-cert", &cert], "needs --upstream-tls-ca"),
        (
            &["--upstream-tls-ca", &ca, "--upstream-tls-cert", &cert],
            "both --upstream-tls-cert and --upstream-tls-key",
        ),
        (&["--tls-cert", &cert], "both --tls-cert and --tls-key"),
        (
            &["--upstream-tls-ca", "/nonexistent/ca.pem"],
            "/nonexistent/ca.pem",
        ),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        assert_tool(PROXY, &args, WAIT)
            .code(1)
            .stderr(predicate::str::contains(*needle))
            .stderr(predicate::str::contains("listening on").not());
    }
    assert_tool(PROXY, &["--help"], WAIT)
        .code(0)
        .stdout(predicate::str::contains("--upstream-tls-ca"))
        .stdout(predicate::str::contains("--tls-verify-peer"));
}

// ------------------------------------------------------------ a slow reader

/// A TLS client of our own, over a socket with a tiny receive buffer: the
/// proxy's socket fills at once, so the end of each large reply is still
/// inside the proxy's TLS session when its socket stops taking bytes.
struct SlowTlsClient {
    tls: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
}

impl SlowTlsClient {
    fn connect(addr: SocketAddr, ca: &Path) -> SlowTlsClient {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName};
        use std::io::{Read, Write};
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("a socket");
        // Set before connecting, so the window is small from the start.
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        socket
            .connect_timeout(&addr.into(), WAIT)
            .expect("connect to the proxy");
        let mut tcp: std::net::TcpStream = socket.into();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        tcp.set_write_timeout(Some(WAIT)).unwrap();
        let mut greeting = [0u8; 18];
        tcp.read_exact(&mut greeting)
            .expect("the newstyle greeting");
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        tcp.write_all(&proto::CLIENT_FIXED_NEWSTYLE.to_be_bytes())
            .unwrap();
        let starttls = OptionHeader {
            option: opt::STARTTLS,
            length: 0,
        };
        tcp.write_all(&starttls.encode()).unwrap();
        let mut h = [0u8; 20];
        tcp.read_exact(&mut h).expect("the STARTTLS reply");
        let reply = OptionReplyHeader::decode(&h).unwrap();
        assert_eq!((reply.kind, reply.length), (rep::ACK, 0), "STARTTLS ACK");
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::IpAddress(addr.ip().into());
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut c = SlowTlsClient {
            tls: rustls::StreamOwned::new(conn, tcp),
        };
        let go = proto::InfoRequest {
            name: Vec::new(),
            requests: Vec::new(),
        }
        .encode();
        let header = OptionHeader {
            option: opt::GO,
            length: go.len() as u32,
        };
        c.send(&header.encode());
        c.send(&go);
        loop {
            let h: [u8; 20] = c.read(20).try_into().unwrap();
            let reply = OptionReplyHeader::decode(&h).unwrap();
            c.read(reply.length as usize);
            match reply.kind {
                rep::ACK => break,
                rep::INFO => {}
                other => panic!("GO answered with 0x{other:08x}"),
            }
        }
        c
    }

    /// Waits until the proxy's side of this connection holds at least
    /// 64 KiB the kernel could not deliver (our 4 KiB window is full).
    fn wait_for_backed_up_proxy(&self) {
        let ours = self.tls.sock.local_addr().expect("local address").port();
        let theirs = self.tls.sock.peer_addr().expect("peer address").port();
        wait_for("the proxy's send queue to back up", WAIT, || {
            (send_queue(theirs, ours)? >= 64 * 1024).then_some(())
        });
    }

    fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.tls.write_all(bytes).expect("send over TLS");
        self.tls.flush().expect("flush TLS");
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        use std::io::Read;
        let mut b = vec![0u8; n];
        self.tls
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("reading {n} bytes over TLS: {e}"));
        b
    }
}

/// Bytes queued for sending on the loopback IPv4 connection from
/// `local_port` to `remote_port`, from /proc/net/tcp (`tx_queue`, hex).
fn send_queue(local_port: u16, remote_port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || port(f[1])? != local_port || port(f[2])? != remote_port {
            return None;
        }
        u64::from_str_radix(f[4].split(':').next()?, 16).ok()
    })
}

#[test]
fn large_reads_reach_a_slow_tls_client_whole() {
    let dir = TempDir::new("proxy-tls-slow");
    let pki = Pki::new(&dir.path);
    let file = dir.pattern_file("image", 40 * MIB, 71);
    let upstream = Flexnbd::serve(&dir, &file, &[]);
    let p = proxy(&dir, upstream.addr, &downstream_tls(&pki));
    let mut c = SlowTlsClient::connect(p.addr, &pki.ca);
    // A reply whose tail stayed in the proxy's TLS session would leave the
    // client waiting until its read timeout (WAIT) fails the test.
    for (i, (offset, len)) in [(0u64, MAX), (3 * MIB, 4096), (MIB + 17, MAX - 17)]
        .into_iter()
        .enumerate()
    {
        let handle = 0x1000 + i as u64;
        c.send(&proto::Request::new(proto::cmd::READ, 0, handle, offset, len).encode());
        // Read only once the proxy's socket is backed up, so that its
        // writes meet a full socket (a 4 KiB reply fits in the window).
        if u64::from(len) > MIB {
            c.wait_for_backed_up_proxy();
        }
        let h: [u8; 16] = c.read(16).try_into().unwrap();
        let reply = proto::SimpleReply::decode(&h);
        assert_eq!((reply.error, reply.handle), (0, handle), "read {i}");
        assert!(
            c.read(len as usize) == read_file_range(&file, offset, len as usize),
            "read {i}: {len} bytes at {offset}"
        );
    }
    p.assert_no_panic();
}

// ---------------------------------------------------------------- rotation

/// Copies `from` over `to` by a rename, as a certificate manager does.
fn replace(from: &Path, to: &Path) {
    let staged = to.with_extension("new");
    std::fs::copy(from, &staged).unwrap();
    std::fs::rename(&staged, to).unwrap();
}

/// SIGHUP rotates both sides' credentials. Downstream: after it, a client
/// trusting only the new CA gets in and one trusting only the old does
/// not. Upstream: the proxy's CA file now names the new CA; the upstream
/// restarts with a certificate of the new CA, and the proxy's reconnection
/// verifies it (with the old CA it would retry for ever).
#[test]
fn sighup_rotates_the_proxys_downstream_certificate_and_upstream_ca() {
    let dir = TempDir::new("proxy-tls-rotate");
    let old = Pki::new(&dir.join("old"));
    let new = Pki::new(&dir.join("new"));
    let file = dir.pattern_file("image", MIB, 61);
    let live = |name: &str| dir.join(name);
    let s = |p: &Path| p.display().to_string();
    replace(&old.server.cert, &live("down-cert.pem"));
    replace(&old.server.key, &live("down-key.pem"));
    replace(&old.ca, &live("up-ca.pem"));
    let mut first = tls_upstream(&dir, &file, &old, 0);
    let port = first.port();
    let p = proxy(
        &dir,
        first.addr,
        &[
            "--tls-cert".into(),
            s(&live("down-cert.pem")),
            "--tls-key".into(),
            s(&live("down-key.pem")),
            "--upstream-tls-ca".into(),
            s(&live("up-ca.pem")),
        ],
    );
    let trusts = |pki: &Pki| vec!["--tls-ca".to_string(), s(&pki.ca)];
    let out = flexnbd_read(&p, 0, 4096, &trusts(&old));
    assert!(out.status.success(), "before: {}", text(&out));

    replace(&new.server.cert, &live("down-cert.pem"));
    replace(&new.server.key, &live("down-key.pem"));
    replace(&new.ca, &live("up-ca.pem"));
    p.signal(libc::SIGHUP);
    wait_for("both sides read again", WAIT, || {
        let log = p.log();
        (log.contains("TLS credentials read again")
            && log.contains("upstream TLS credentials read again"))
        .then_some(())
    });
    let out = flexnbd_read(&p, 0, 4096, &trusts(&new));
    assert!(
        out.status.success(),
        "a client of the new CA: {}",
        text(&out)
    );
    assert_eq!(
        out.stdout,
        pattern(MIB as usize, 61)[..4096],
        "read through the rotated proxy"
    );
    let out = flexnbd_read(&p, 0, 4096, &trusts(&old));
    assert!(
        !out.status.success(),
        "a client of the old CA got in: {}",
        text(&out)
    );

    // The upstream moves to a certificate of the new CA, on the same port.
    first.signal(libc::SIGKILL);
    first.wait_exit();
    let second = tls_upstream(&dir, &file, &new, port);
    let out = flexnbd_read(&p, 8192, 4096, &trusts(&new));
    assert!(
        out.status.success(),
        "after the upstream's move: {}",
        text(&out)
    );
    second.wait_log("TLS started");
    p.assert_no_panic();
}

// ------------------------------------------------ more peers, both policies

/// qemu-img (its own TLS client, GnuTLS with a credentials directory) and
/// nbdsh (libnbd) through a TLS proxy: qemu-img reads the size and converts
/// the whole export to a file equal to the upstream image; nbdsh writes,
/// flushes and reads back, and the write reaches the upstream image.
#[test]
fn qemu_img_and_nbdsh_work_through_a_tls_proxy() {
    let d = downstream_setup("proxy-tls-peers", |_| vec![]);
    let (dir, pki, file, p) = (&d.dir, &d.pki, &d.file, &d.proxy);
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.client_dir.display()
    );
    let opts = format!("driver=nbd,host=127.0.0.1,port={},tls-creds=tls0", p.port());
    let info = text(&run_ok(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--object",
            &object,
            "--image-opts",
            &opts,
        ],
        WAIT,
    ));
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 4 * MIB)),
        "qemu-img info through the TLS proxy:\n{info}"
    );
    let copy = dir.join("qemu-copy.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            "--object",
            &object,
            "--image-opts",
            &opts,
            copy.to_str().unwrap(),
        ],
        WAIT,
    );
    assert!(
        std::fs::read(&copy).unwrap() == std::fs::read(file).unwrap(),
        "qemu-img convert through the TLS proxy equals the upstream image"
    );
    // Statements on an unconnected handle: a URI naming a local
    // credentials directory needs libnbd's explicit permission.
    let script = format!(
        "h.set_tls(nbd.TLS_REQUIRE)\n\
         h.set_tls_certificates({:?})\n\
         h.connect_tcp('127.0.0.1', '{}')\n\
         assert h.get_tls_negotiated()\n\
         h.pwrite(b'rotate' * 1000, 65536)\n\
         h.flush()\n\
         assert h.pread(6000, 65536) == b'rotate' * 1000\n",
        pki.client_dir.display().to_string(),
        p.port()
    );
    let out = run_tool("env", &["PATH=/usr/bin:/bin", "nbdsh", "-c", &script], WAIT);
    assert!(
        out.status.success(),
        "nbdsh through the TLS proxy: {}",
        text(&out)
    );
    assert_eq!(read_file_range(file, 65536, 6000), b"rotate".repeat(1000));
    p.assert_no_panic();
}

/// `--tls optional` on the proxy: a plaintext nbdinfo and a TLS nbdinfo
/// are both served, each over what it asked for.
#[test]
fn a_proxy_with_tls_optional_serves_plaintext_and_tls_clients() {
    let d = downstream_setup("proxy-tls-optional", |_| {
        vec!["--tls".into(), "optional".into()]
    });
    let (pki, p) = (&d.pki, &d.proxy);
    let plain = text(&run_ok(
        "nbdinfo",
        &[&format!("nbd://127.0.0.1:{}", p.port())],
        WAIT,
    ));
    assert!(
        plain.contains(&format!("export-size: {}", 4 * MIB)) && !plain.contains("with TLS"),
        "plaintext nbdinfo through the optional-TLS proxy:\n{plain}"
    );
    let tls = text(&run_ok("nbdinfo", &[&nbds(p, &pki.client_dir)], WAIT));
    assert!(
        tls.contains("protocol: newstyle-fixed with TLS"),
        "TLS nbdinfo through the optional-TLS proxy:\n{tls}"
    );
    p.assert_no_panic();
}

/// An upstream that verifies its clients: the proxy's own certificate
/// (`--upstream-tls-cert`/`--upstream-tls-key`) gets it in, and a client's
/// write reaches the image; without one the upstream refuses the proxy,
/// which exits 1 before listening.
#[test]
fn upstream_client_certificates_get_the_proxy_into_a_verifying_upstream() {
    let dir = TempDir::new("proxy-tls-client-cert");
    let pki = Pki::new(&dir.path);
    let file = dir.pattern_file("image", MIB, 62);
    let mut args: Vec<String> = ["serve", "-l", "127.0.0.1", "-p", "0", "-v", "-f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(file.display().to_string());
    args.extend(pki.verifying_server_args());
    let upstream = Flexnbd::spawn(&dir, &args);
    let mut with_cert = upstream_tls(&pki);
    with_cert.extend([
        "--upstream-tls-cert".to_string(),
        pki.client.cert.display().to_string(),
        "--upstream-tls-key".to_string(),
        pki.client.key.display().to_string(),
    ]);
    let p = proxy(&dir, upstream.addr, &with_cert);
    let data = pattern(8192, 63);
    let mut c = RawClient::connect(p.addr);
    c.oldstyle_greeting();
    c.write_ok(4096, &data);
    assert_eq!(c.read_ok(4096, 8192), data);
    assert_eq!(read_file_range(&file, 4096, 8192), data);
    upstream.wait_log("client certificate verified");
    // No certificate: refused by the upstream, so the proxy never listens.
    let out = run_tool(
        PROXY,
        &proxy_args(upstream.addr, &upstream_tls(&pki))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        WAIT,
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("Couldn't connect to upstream server"),
        "{}",
        text(&out)
    );
    p.assert_no_panic();
}
