//! `flexnbd-linkem`: a link emulator for tests and benchmarks. A TCP relay
//! that delays each direction by a one-way delay (with optional jitter),
//! limits each direction to a rate, and can turn into a blackhole (nothing
//! gets through, nothing is reset; what was sent arrives once the link is
//! back, as TCP's retransmissions would bring it) or cut every connection,
//! on command.
//!
//! Why a relay: this kernel has no `netem`, and a relay needs no rights.
//! What it does not model: the relay ends TCP on both sides, so each TCP
//! connection sees a short round trip and its congestion control never
//! meets the emulated one; packets are never lost or reordered (the
//! stream is delayed as a whole). What crosses it sees the delay, the
//! rate and the silence exactly, which is what a request/reply protocol
//! feels. Bandwidth on real interfaces is shaped with `tc` (tbf) instead.
//!
//! ```text
//! flexnbd-linkem --listen 127.0.0.1:0 --to 127.0.0.1:10809 --delay-ms 25 \
//!     [--jitter-ms 2] [--rate-mbit 100] [--queue-bytes N] [--control PATH]
//! ```
//!
//! It prints `listening on ADDR` once it accepts. The control socket takes
//! one command per line and answers `ok` (or `error: ...`):
//! `delay MS`, `blackhole on|off`, `cut` (closes every connection),
//! `stats` (answers `up=BYTES down=BYTES connections=N`).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: flexnbd-linkem --listen ADDR:PORT --to ADDR:PORT [--delay-ms MS] \
[--jitter-ms MS] [--rate-mbit MBIT] [--queue-bytes N] [--control PATH]";

/// What the link does now; changed by the control socket.
struct Link {
    /// One-way delay, microseconds.
    delay_us: AtomicU64,
    jitter_us: u64,
    /// Bytes per second each way; 0: unlimited.
    rate: f64,
    /// Most bytes waiting in one direction's delay line.
    queue_bytes: usize,
    blackhole: AtomicBool,
    up: AtomicU64,
    down: AtomicU64,
    /// Every open connection's two sockets, for `cut`.
    conns: Mutex<Vec<(TcpStream, TcpStream)>>,
}

struct Config {
    listen: SocketAddr,
    to: SocketAddr,
    control: Option<PathBuf>,
}

fn parse() -> Result<(Config, Link), String> {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut to, mut control) = (None, None, None);
    let (mut delay_ms, mut jitter_ms, mut rate_mbit) = (0.0f64, 0.0f64, 0.0f64);
    let mut queue_bytes = 16usize << 20;
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = |what: &str| {
            value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("{what}: expected a number >= 0, got {value:?}"))
        };
        match flag.as_str() {
            "--listen" => {
                listen =
                    Some(value.parse().map_err(|e| {
                        format!("--listen: expected ADDR:PORT, got {value:?} ({e})")
                    })?)
            }
            "--to" => {
                to = Some(
                    value
                        .parse()
                        .map_err(|e| format!("--to: expected ADDR:PORT, got {value:?} ({e})"))?,
                )
            }
            "--delay-ms" => delay_ms = number("--delay-ms")?,
            "--jitter-ms" => jitter_ms = number("--jitter-ms")?,
            "--rate-mbit" => rate_mbit = number("--rate-mbit")?,
            "--queue-bytes" => {
                queue_bytes = value.parse().ok().filter(|&n| n >= 65536).ok_or_else(|| {
                    format!("--queue-bytes: expected a number >= 65536, got {value:?}")
                })?
            }
            "--control" => control = Some(PathBuf::from(value)),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let listen = listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?;
    let to = to.ok_or_else(|| format!("--to is required\n{USAGE}"))?;
    let link = Link {
        delay_us: AtomicU64::new((delay_ms * 1000.0) as u64),
        jitter_us: (jitter_ms * 1000.0) as u64,
        rate: rate_mbit * 1e6 / 8.0,
        queue_bytes,
        blackhole: AtomicBool::new(false),
        up: AtomicU64::new(0),
        down: AtomicU64::new(0),
        conns: Mutex::new(Vec::new()),
    };
    Ok((
        Config {
            listen,
            to,
            control,
        },
        link,
    ))
}

fn main() -> ExitCode {
    let (config, link) = match parse() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("flexnbd-linkem: {e}");
            return ExitCode::from(2);
        }
    };
    let link = Arc::new(link);
    let listener = match TcpListener::bind(config.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("flexnbd-linkem: cannot listen on {}: {e}", config.listen);
            return ExitCode::from(1);
        }
    };
    if let Some(path) = &config.control {
        let _ = std::fs::remove_file(path);
        match UnixListener::bind(path) {
            Ok(control) => {
                let link = link.clone();
                thread::spawn(move || serve_control(control, &link));
            }
            Err(e) => {
                eprintln!("flexnbd-linkem: cannot bind {}: {e}", path.display());
                return ExitCode::from(1);
            }
        }
    }
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
    for incoming in listener.incoming() {
        let Ok(client) = incoming else { continue };
        let link = link.clone();
        let to = config.to;
        thread::spawn(move || relay(client, to, &link));
    }
    ExitCode::SUCCESS
}

fn serve_control(control: UnixListener, link: &Link) {
    for stream in control.incoming().flatten() {
        let mut out = match stream.try_clone() {
            Ok(s) => s,
            Err(_) => continue,
        };
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let answer = command(link, line.trim());
            if writeln!(out, "{answer}").is_err() {
                break;
            }
        }
    }
}

fn command(link: &Link, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["delay", ms] => match ms.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => {
                link.delay_us.store((v * 1000.0) as u64, Ordering::Release);
                "ok".into()
            }
            _ => format!("error: delay: expected milliseconds >= 0, got {ms:?}"),
        },
        ["blackhole", "on"] => {
            link.blackhole.store(true, Ordering::Release);
            "ok".into()
        }
        ["blackhole", "off"] => {
            link.blackhole.store(false, Ordering::Release);
            "ok".into()
        }
        ["cut"] => {
            for (a, b) in link
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain(..)
            {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
            "ok".into()
        }
        ["stats"] => format!(
            "up={} down={} connections={}",
            link.up.load(Ordering::Acquire),
            link.down.load(Ordering::Acquire),
            link.conns.lock().unwrap_or_else(|p| p.into_inner()).len()
        ),
        _ => format!(
            "error: unknown command {line:?}; expected delay MS, blackhole on|off, cut or stats"
        ),
    }
}

fn relay(client: TcpStream, to: SocketAddr, link: &Arc<Link>) {
    let _ = client.set_nodelay(true);
    // A blackholed link carries no connection attempt: hold the client
    // silent until the link comes back (or the client gives up). (The
    // kernel has completed its handshake already: a connect succeeds, and
    // silence follows.)
    while link.blackhole.load(Ordering::Acquire) {
        thread::sleep(Duration::from_millis(5));
        let mut probe = [0u8; 1];
        let _ = client.set_nonblocking(true);
        let gone = matches!(client.peek(&mut probe), Ok(0));
        let _ = client.set_nonblocking(false);
        if gone {
            return;
        }
    }
    let server = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(_) => return, // dropping the client closes it, as a refused link would
    };
    let _ = server.set_nodelay(true);
    let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
        client.try_clone(),
        server.try_clone(),
        client.try_clone(),
        server.try_clone(),
    ) else {
        return;
    };
    link.conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((c3, s3));
    let up = {
        let link = link.clone();
        thread::spawn(move || direction(client, s2, &link, true))
    };
    direction(server, c2, link, false);
    let _ = up.join();
}

/// One direction's delay line: what is read now is written `delay` later,
/// no faster than the rate, in order.
struct Line {
    queue: Mutex<Queue>,
    changed: Condvar,
}

/// What waits in a delay line: (when due, bytes) in order (empty bytes:
/// the end), how many bytes, and whether the far side is gone.
type Queue = (VecDeque<(Instant, Vec<u8>)>, usize, bool);

fn direction(mut from: TcpStream, to: TcpStream, link: &Arc<Link>, up: bool) {
    let line = Arc::new(Line {
        queue: Mutex::new((VecDeque::new(), 0, false)),
        changed: Condvar::new(),
    });
    let writer = {
        let (line, link) = (line.clone(), link.clone());
        thread::spawn(move || deliver(to, &line, &link, up))
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_due = Instant::now();
    let mut seed = if up {
        0x9e37_79b9_7f4a_7c15u64
    } else {
        0xd1b5_4a32_d192_ed03
    };
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let jitter = if link.jitter_us > 0 {
            // xorshift: jitter need not be good randomness, only varied.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % (link.jitter_us + 1)
        } else {
            0
        };
        let delay = Duration::from_micros(link.delay_us.load(Ordering::Acquire) + jitter);
        // A stream stays in order: jitter never lets a chunk overtake.
        let due = (Instant::now() + delay).max(last_due);
        last_due = due;
        let mut q = line.queue.lock().unwrap_or_else(|p| p.into_inner());
        while q.1 >= link.queue_bytes && !q.2 {
            q = line.changed.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if q.2 {
            break; // the far side is gone
        }
        q.0.push_back((due, buf[..n].to_vec()));
        q.1 += n;
        line.changed.notify_all();
    }
    {
        let mut q = line.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.0.push_back((last_due, Vec::new())); // the end, after what is queued
        line.changed.notify_all();
    }
    let _ = writer.join();
    let _ = from.shutdown(Shutdown::Read);
}

fn deliver(mut to: TcpStream, line: &Line, link: &Link, up: bool) {
    let mut link_free = Instant::now();
    loop {
        let (due, bytes) = {
            let mut q = line.queue.lock().unwrap_or_else(|p| p.into_inner());
            while q.0.is_empty() {
                q = line.changed.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            q.0.pop_front().expect("not empty")
        };
        if bytes.is_empty() {
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        let mut at = due;
        if link.rate > 0.0 {
            // The link carries one chunk at a time at its rate.
            at = at.max(link_free);
            link_free = at + Duration::from_secs_f64(bytes.len() as f64 / link.rate);
        }
        let now = Instant::now();
        if at > now {
            thread::sleep(at - now);
        }
        // Blackholed: nothing gets through and nothing is reset. TCP would
        // send the lost packets again once the link is back, so the bytes
        // wait here rather than vanish, and the line fills up behind them.
        while link.blackhole.load(Ordering::Acquire) {
            thread::sleep(Duration::from_millis(2));
        }
        let ok = to.write_all(&bytes).is_ok();
        {
            let mut q = line.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.1 -= bytes.len();
            if !ok {
                q.2 = true;
            }
            line.changed.notify_all();
        }
        if !ok {
            return;
        }
        let counter = if up { &link.up } else { &link.down };
        counter.fetch_add(bytes.len() as u64, Ordering::AcqRel);
    }
}
