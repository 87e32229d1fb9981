//! The fuzz targets' seed corpora (`fuzz/corpus/TARGET`) are real traffic,
//! recorded here: qemu-img, qemu-io, nbdinfo, nbdsh and flexnbd's own
//! `read`/`write` talking to `serve` (both handshakes, and TLS), a
//! migration into `listen` (both ways), the control requests the CLI sends, the fault plans of the
//! scenario catalogue and a real marker and completion record. A recording
//! relay between client and server keeps each connection's bytes, both
//! ways.
//!
//! Every recording must replay clean through its target (a target that
//! rejects real traffic cannot be trusted with strangers'). With
//! `FLEXNBD_UPDATE_SEEDS=1` the recordings are also written to
//! `fuzz/corpus/TARGET/` (how the committed seeds were made).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::certs::Pki;
use crate::harness::*;

const TOOL: Duration = Duration::from_secs(60);

/// One connection's bytes: what the client sent (`up`) and what the server
/// sent (`down`).
#[derive(Clone, Default)]
struct Session {
    up: Vec<u8>,
    down: Vec<u8>,
    /// Directions still copying.
    open: u8,
}

/// A relay on 127.0.0.1 (port 0) to `upstream` that records every
/// connection through it.
struct Recorder {
    port: u16,
    sessions: Arc<Mutex<Vec<Session>>>,
}

impl Recorder {
    fn start(upstream: SocketAddr) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a port for the recorder");
        let port = listener.local_addr().unwrap().port();
        let sessions: Arc<Mutex<Vec<Session>>> = Arc::default();
        let all = sessions.clone();
        // Ends with the test process: it only ever blocks in accept.
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect_timeout(&upstream, WAIT) else {
                    continue;
                };
                let index = {
                    let mut s = all.lock().unwrap();
                    s.push(Session {
                        open: 2,
                        ..Session::default()
                    });
                    s.len() - 1
                };
                for (from, to, up) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        true,
                    ),
                    (server, client, false),
                ] {
                    let all = all.clone();
                    thread::spawn(move || copy(from, to, &all, index, up));
                }
            }
        });
        Recorder { port, sessions }
    }

    /// The sessions so far, once every one has ended both ways.
    fn finished(&self) -> Vec<Session> {
        wait_for("the recorded connections to end", WAIT, || {
            let s = self.sessions.lock().unwrap();
            s.iter().all(|s| s.open == 0).then(|| s.clone())
        })
    }
}

/// Copies `from` to `to` until either ends, keeping the bytes; then passes
/// the end on (half-close) so the other side sees it too.
fn copy(mut from: TcpStream, mut to: TcpStream, all: &Mutex<Vec<Session>>, index: usize, up: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut s = all.lock().unwrap();
            let s = &mut s[index];
            if up { &mut s.up } else { &mut s.down }.extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
    all.lock().unwrap()[index].open -= 1;
}

/// Seeds by target, then name.
type Seeds = BTreeMap<&'static str, BTreeMap<String, Vec<u8>>>;

fn add(seeds: &mut Seeds, target: &'static str, name: &str, data: Vec<u8>) {
    assert!(!data.is_empty(), "{target}/{name}: nothing was recorded");
    seeds
        .entry(target)
        .or_default()
        .insert(name.to_string(), data);
}

/// Seeds for `codec`, whose decoders read the input's first bytes: each
/// kind of header as it first appears in a session (a request and an
/// option header from the client; a simple reply, a structured reply
/// chunk and an option reply from the server), with what follows it.
fn codec_seeds(seeds: &mut Seeds, name: &str, session: &Session) {
    use flexnbd::proto::{
        IHAVEOPT, OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
    };
    let kinds: [(&str, &[u8], Vec<u8>); 5] = [
        ("request", &session.up, REQUEST_MAGIC.to_be_bytes().to_vec()),
        ("option", &session.up, IHAVEOPT.to_be_bytes().to_vec()),
        (
            "simple-reply",
            &session.down,
            SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec(),
        ),
        (
            "chunk",
            &session.down,
            STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec(),
        ),
        (
            "option-reply",
            &session.down,
            OPTION_REPLY_MAGIC.to_be_bytes().to_vec(),
        ),
    ];
    for (kind, bytes, magic) in kinds {
        if let Some(at) = bytes.windows(magic.len()).position(|w| w == magic) {
            let end = (at + 4096).min(bytes.len());
            add(
                seeds,
                "codec",
                &format!("{name}-{kind}"),
                bytes[at..end].to_vec(),
            );
        }
    }
}

/// The client tools' sessions with `serve` over `handshake`, recorded:
/// the clients' bytes feed `target`; flexnbd's own client's replies feed
/// `client`.
fn tool_sessions(seeds: &mut Seeds, handshake: &str, target: &'static str) {
    let dir = TempDir::new("seeds");
    let file = dir.pattern_file("disk.img", 1 << 20, 9);
    let server = Flexnbd::serve(&dir, &file, &["--handshake", handshake]);
    let rec = Recorder::start(server.addr);
    let uri = format!("nbd://127.0.0.1:{}", rec.port);
    let port = rec.port.to_string();
    let mut named: Vec<String> = Vec::new();
    let run = |named: &mut Vec<String>, name: &str, program: &str, args: &[&str]| {
        run_ok(program, args, TOOL);
        named.push(name.to_string());
    };
    run(&mut named, "qemu-img-info", "qemu-img", &["info", &uri]);
    run(
        &mut named,
        "qemu-io",
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 7 4k 64k",
            "-c",
            "read -P 7 4k 64k",
            "-c",
            "flush",
            &uri,
        ],
    );
    let script = "h.pwrite(b'seed' * 1024, 8192)\n\
                  assert h.pread(4096, 8192) == b'seed' * 1024\n\
                  h.flush()\n";
    let out = nbdsh(&uri, script);
    assert!(out.status.success(), "nbdsh: {out:?}");
    named.push("nbdsh".into());
    if handshake == "newstyle" {
        run(&mut named, "nbdinfo-map", "nbdinfo", &["--map", &uri]);
        run(&mut named, "nbdinfo-list", "nbdinfo", &["--list", &uri]);
        run(
            &mut named,
            "qemu-io-zero-discard",
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -z 64k 64k",
                "-c",
                "discard 128k 64k",
                &uri,
            ],
        );
    }
    run(
        &mut named,
        "flexnbd-read",
        BIN,
        &[
            "read",
            "-l",
            "127.0.0.1",
            "-p",
            &port,
            "-F",
            "0",
            "-S",
            "4096",
        ],
    );
    let written = run_tool_with_input(
        BIN,
        &[
            "write",
            "-l",
            "127.0.0.1",
            "-p",
            &port,
            "-F",
            "4096",
            "-S",
            "512",
        ],
        Some(&[5u8; 512]),
        TOOL,
    );
    assert!(written.status.success(), "flexnbd write: {written:?}");
    named.push("flexnbd-write".into());
    let sessions = rec.finished();
    assert_eq!(
        sessions.len(),
        named.len(),
        "one connection per tool run ({named:?})"
    );
    for (name, s) in named.iter().zip(sessions) {
        codec_seeds(seeds, &format!("{handshake}-{name}"), &s);
        add(seeds, target, name, s.up);
        if name.starts_with("flexnbd-") {
            add(seeds, "client", &format!("{handshake}-{name}"), s.down);
        }
    }
    server.assert_no_panic();
}

/// `serve` with TLS offered: a TLS session of flexnbd's `read` and a
/// plaintext qemu-img beside it. The credentials (made afresh) are also
/// what the replay gives `serve_tls`.
fn tls_sessions(seeds: &mut Seeds, pki: &Pki) {
    let dir = TempDir::new("seeds");
    let file = dir.pattern_file("disk.img", 1 << 20, 2);
    let at = |p: &Path| p.display().to_string();
    let (cert, key, ca) = (at(&pki.server.cert), at(&pki.server.key), at(&pki.ca));
    let server = Flexnbd::serve(
        &dir,
        &file,
        &["--tls-cert", &cert, "--tls-key", &key, "--tls", "optional"],
    );
    let rec = Recorder::start(server.addr);
    let port = rec.port.to_string();
    run_ok(
        BIN,
        &[
            "read",
            "-l",
            "127.0.0.1",
            "-p",
            &port,
            "-F",
            "0",
            "-S",
            "4096",
            "--tls-ca",
            &ca,
        ],
        TOOL,
    );
    run_ok(
        "qemu-img",
        &["info", &format!("nbd://127.0.0.1:{port}")],
        TOOL,
    );
    let sessions = rec.finished();
    assert_eq!(sessions.len(), 2, "one connection per tool run");
    add(
        seeds,
        "serve_tls",
        "flexnbd-read-tls",
        sessions[0].up.clone(),
    );
    add(
        seeds,
        "serve_tls",
        "qemu-img-info-plaintext",
        sessions[1].up.clone(),
    );
    server.assert_no_panic();
}

/// A migration into `listen` through the recorder: what the source sends
/// feeds `listen`; the marker `listen` wrote and the completion record feed
/// `marker`.
fn migration_session(seeds: &mut Seeds) {
    let dir = TempDir::new("seeds");
    let src = dir.pattern_file("src.img", 256 << 10, 4);
    let dst = dir.sparse_file("dst.img", 256 << 10);
    let sock = dir.join("src.sock");
    let source = Flexnbd::spawn(&dir, &server_args("serve", &src, Some(&sock), &[]));
    let mut dest = Flexnbd::spawn(&dir, &server_args("listen", &dst, None, &[]));
    let marker = std::fs::read(marker_path(&dst)).expect("listen's marker");
    add(seeds, "marker", "listen-receiving", marker);
    let rec = Recorder::start(dest.addr);
    let out = run_mirror(&sock, rec.port, &[], TOOL);
    assert!(out.status.success(), "mirror: {out:?}");
    assert!(
        dest.wait_exit_within(TOOL).success(),
        "listen: {}",
        dest.log()
    );
    let sessions = rec.finished();
    assert_eq!(sessions.len(), 1, "one migration connection");
    add(seeds, "listen", "migration", sessions[0].up.clone());
    add(
        seeds,
        "mirror_replies",
        "migration",
        sessions[0].down.clone(),
    );
    let record = std::fs::read(flexnbd::handoff::record_path(&dst)).expect("the completion record");
    add(seeds, "marker", "complete-record", record);
    drop(source);
}

/// The control requests the CLI sends, caught by a fake control socket
/// that answers each with a plain success.
fn control_sessions(seeds: &mut Seeds) {
    let dir = TempDir::new("seeds");
    let sock = dir.join("fake.sock");
    let listener = UnixListener::bind(&sock).expect("the fake control socket");
    let s = sock.to_str().unwrap();
    let commands: [(&str, Vec<&str>); 6] = [
        ("status", vec!["status", "-s", s]),
        (
            "acl",
            vec!["acl", "-s", s, "127.0.0.1", "10.0.0.0/8", "::1"],
        ),
        (
            "mirror",
            vec![
                "mirror",
                "-s",
                s,
                "-l",
                "127.0.0.1",
                "-p",
                "4777",
                "-b",
                "127.0.0.1",
            ],
        ),
        (
            "mirror-unlink",
            vec!["mirror", "-s", s, "-l", "::1", "-p", "1", "-u"],
        ),
        (
            "mirror-speed",
            vec!["mirror-speed", "-s", s, "-m", "1048576"],
        ),
        ("break", vec!["break", "-s", s]),
    ];
    for (name, args) in commands {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let cli = thread::spawn(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_tool(BIN, &args, TOOL)
        });
        let (mut conn, _) = listener.accept().expect("the CLI connects");
        conn.set_read_timeout(Some(WAIT)).unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        // Up to the blank line that ends a request (or the CLI's close).
        while !request.ends_with(b"\n\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let _ = conn.write_all(b"0: ok\n");
        drop(conn);
        let _ = cli.join().expect("the CLI run");
        add(seeds, "control", name, request);
    }
}

/// Records every seed, checks each replays clean through its target, and
/// with FLEXNBD_UPDATE_SEEDS=1 writes them into fuzz/corpus.
/// `flexnbd-proxy` in front of `serve` (both handshakes), a client
/// reading through it: what `serve` sent the proxy feeds
/// `proxy_upstream`.
fn proxy_sessions(seeds: &mut Seeds) {
    const PROXY: &str = env!("CARGO_BIN_EXE_flexnbd-proxy");
    for handshake in ["oldstyle", "newstyle"] {
        let dir = TempDir::new("seeds");
        let file = dir.pattern_file("disk.img", 1 << 20, 11);
        let server = Flexnbd::serve(&dir, &file, &["--handshake", handshake]);
        let rec = Recorder::start(server.addr);
        let args: Vec<String> = [
            "-l",
            "127.0.0.1",
            "-p",
            "0",
            "-C",
            "127.0.0.1",
            "-P",
            &rec.port.to_string(),
            "-v",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        let proxy = Flexnbd::spawn_program(&dir, PROXY, &args);
        let mut c = proxy.connect();
        c.oldstyle_greeting();
        let _ = c.read_ok(0, 4096);
        drop(c);
        // The proxy's upstream connection ends with it.
        drop(proxy);
        let sessions = rec.finished();
        assert_eq!(sessions.len(), 1, "the proxy's one upstream connection");
        let session = sessions.into_iter().next().unwrap();
        add(
            seeds,
            "proxy_upstream",
            &format!("{handshake}-read"),
            session.down,
        );
        server.assert_no_panic();
    }
}

#[test]
fn real_traffic_replays_clean_through_every_fuzz_target() {
    let mut seeds = Seeds::new();
    let pki_dir = TempDir::new("seeds-pki");
    let pki = Pki::new(&pki_dir.join(""));
    tool_sessions(&mut seeds, "oldstyle", "serve_oldstyle");
    tool_sessions(&mut seeds, "newstyle", "serve_newstyle");
    tls_sessions(&mut seeds, &pki);
    migration_session(&mut seeds);
    control_sessions(&mut seeds);
    proxy_sessions(&mut seeds);
    for s in faults::SCENARIOS {
        add(&mut seeds, "fault_plan", s.name, s.plan.as_bytes().to_vec());
    }
    // Every target has real seeds.
    for target in flexnbd::fuzzing::TARGETS {
        assert!(
            seeds.get(target).is_some_and(|s| !s.is_empty()),
            "no seeds recorded for {target}"
        );
    }
    for (target, named) in &seeds {
        for (name, data) in named {
            // A panic names the seed: the target failed on real traffic.
            let ran = std::panic::catch_unwind(|| {
                flexnbd::fuzzing::run(target, data, Some(&pki.server_dir))
            });
            assert!(ran.is_ok(), "{target}/{name} does not replay clean");
        }
    }
    if std::env::var_os("FLEXNBD_UPDATE_SEEDS").is_some() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (target, named) in &seeds {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, data) in named {
                std::fs::write(dir.join(name), data).unwrap();
            }
        }
    }
}
