"""What a hostile client can cost: the "## Hostile clients" section of
BENCHMARKS.md.

For each attack, a fresh `flexnbd serve` of a 64 MiB image runs on
127.0.0.1; one well-behaved client connects first and does 4 KiB random
reads back to back on its own connection, for QUIET seconds alone and then
for ATTACK seconds while the attack runs. Recorded per attack: the server's
peak RSS (VmHWM, polled), the well-behaved client's p99 read latency quiet
and under attack (and their ratio; the goal is under 2), whether the server
is still serving afterwards (a new client reads), and whether its log shows
a panic.

The attacks (each stops by itself):

- flood: connections opened as fast as possible, held, past --max-clients
  (16, the default);
- slowloris: newstyle clients that send the handshake one byte a second,
  up to --max-clients, for as long as the handshake timeout allows;
- stall-header: clients that send 10 bytes of a request header and stop;
- stall-payload: clients that send a 32 MiB WRITE's header and 1 MiB of its
  payload, then stop;
- limits: connections sending, in turn, an option at its length limit and
  past it, a request at the 32 MiB limit and past it, an export name at
  and past 4096 bytes, 257 options, and requests past the end;
- idle: 4000 connections that take the greeting and do nothing
  (--max-clients 5000);
- control-flood: 200 control-socket connections that never send a
  request, beside back-to-back `status` requests;
- tls-burst: rounds of 64 TLS handshakes started at once against a server
  with TLS optional (the good client stays plaintext).

    /usr/bin/python3 bench/hostile.py [--attacks flood,idle] [--skip-build] [--output FILE]
"""

import argparse
import datetime
import os
import random
import re
import resource
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as B  # noqa: E402  the shared benchmark helpers

HOST = "127.0.0.1"
IMAGE = 64 * B.MIB
QUIET = 3.0
ATTACK = 5.0
P99_GOAL = 2.0
REQUEST_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698
IHAVEOPT = b"IHAVEOPT"
OPT_MAGIC = 0x49484156454F5054

ATTACKS = ["flood", "slowloris", "stall-header", "stall-payload", "limits", "idle",
           "control-flood", "tls-burst"]


def handshake(s):
    """Either greeting; for newstyle, EXPORT_NAME with no zeroes. Returns the size."""
    if B.recv_exact(s, 8) != B.NBD_MAGIC:
        raise ConnectionError("bad greeting")
    second = B.recv_exact(s, 8)
    if second == IHAVEOPT:
        B.recv_exact(s, 2)
        s.sendall(struct.pack(">I", 3))
        s.sendall(IHAVEOPT + struct.pack(">II", 1, 0))
        size, _ = struct.unpack(">QH", B.recv_exact(s, 10))
        return size
    size, _ = struct.unpack(">QI", B.recv_exact(s, 12))
    B.recv_exact(s, 124)
    return size


class GoodClient:
    """4 KiB random reads back to back on one connection, latencies by time."""

    def __init__(self, port):
        self.s = socket.create_connection((HOST, port), timeout=10)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.size = handshake(self.s)
        self.samples = []           # (start, latency)
        self.error = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        rng = random.Random(7)
        handle = 0
        deadline = time.perf_counter() + 120
        try:
            while not self.stop.is_set() and time.perf_counter() < deadline:
                handle += 1
                off = rng.randrange(self.size // 4096) * 4096
                t = time.perf_counter()
                self.s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, handle, off, 4096))
                magic, err, h = struct.unpack(">IIQ", B.recv_exact(self.s, 16))
                if magic != REPLY_MAGIC or err or h != handle:
                    raise ConnectionError(f"bad reply {magic:#x} {err} {h}")
                B.recv_exact(self.s, 4096)
                self.samples.append((t, time.perf_counter() - t))
        except Exception as e:  # recorded: the good client must not fail
            self.error = repr(e)

    def p99_between(self, a, b):
        lat = sorted(d for t, d in self.samples if a <= t < b)
        if not lat:
            return None, 0
        return lat[min(len(lat) - 1, int(len(lat) * 0.99))], len(lat)

    def close(self):
        self.stop.set()
        self.thread.join(timeout=10)
        try:
            self.s.close()
        except OSError:
            pass


def until(deadline):
    return time.perf_counter() < deadline


def a_flood(ctx, srv, deadline):
    held = []
    opened = 0
    try:
        while until(deadline) and opened < 20000:
            try:
                held.append(socket.create_connection((HOST, srv.port), timeout=2))
                opened += 1
            except OSError:
                time.sleep(0.001)
            if len(held) > 2000:
                for s in held[:1000]:
                    s.close()
                del held[:1000]
    finally:
        for s in held:
            s.close()
    return f"{opened} connections"


def a_slowloris(ctx, srv, deadline):
    socks = []
    for _ in range(15):
        s = socket.create_connection((HOST, srv.port), timeout=5)
        B.recv_exact(s, 18)
        socks.append(s)
    flags = struct.pack(">I", 3)
    sent = 0
    for i in range(len(flags)):
        if not until(deadline):
            break
        for s in socks:
            try:
                s.sendall(flags[i:i + 1])
                sent += 1
            except OSError:
                pass
        time.sleep(min(1.0, max(0.0, deadline - time.perf_counter())))
    while until(deadline):
        time.sleep(0.05)
    for s in socks:
        s.close()
    return f"15 connections, {sent} bytes"


def stalled(srv, deadline, first):
    socks = []
    for _ in range(15):
        s = socket.create_connection((HOST, srv.port), timeout=5)
        handshake(s)
        first(s)
        socks.append(s)
    while until(deadline):
        time.sleep(0.05)
    for s in socks:
        s.close()


def a_stall_header(ctx, srv, deadline):
    stalled(srv, deadline, lambda s: s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, 9, 0, 4096)[:10]))
    return "15 connections"


def a_stall_payload(ctx, srv, deadline):
    def first(s):
        s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 1, 9, 0, 32 * B.MIB))
        s.sendall(b"\xa5" * B.MIB)
    stalled(srv, deadline, first)
    return "15 connections, 1 MiB of 32 each"


def limit_case(port, case):
    """One connection with one case of a limit; the server may refuse or close."""
    with socket.create_connection((HOST, port), timeout=2) as s:
        if B.recv_exact(s, 8) != B.NBD_MAGIC or B.recv_exact(s, 8) != IHAVEOPT:
            raise ConnectionError("expected newstyle")
        B.recv_exact(s, 2)
        s.sendall(struct.pack(">I", 3))
        def opt(o, data):
            s.sendall(IHAVEOPT + struct.pack(">II", o, len(data)) + data)
        if case == "option-at-limit":
            opt(3, b"\0" * 16384)             # LIST with a 16 KiB payload
        elif case == "option-past-limit":
            s.sendall(IHAVEOPT + struct.pack(">II", 3, 16385))
        elif case == "name-at-limit":
            opt(7, struct.pack(">I", 4096) + b"n" * 4096 + b"\0\0")
        elif case == "name-past-limit":
            opt(7, struct.pack(">I", 4097) + b"n" * 4097 + b"\0\0")
        elif case == "many-options":
            for _ in range(257):
                opt(0x42, b"")
        else:
            opt(1, b"")                       # EXPORT_NAME, then transmission
            size, _ = struct.unpack(">QH", B.recv_exact(s, 10))
            length, off = {"read-at-limit": (32 * B.MIB, 0), "read-past-limit": (32 * B.MIB + 1, 0),
                           "read-past-end": (4096, size)}[case]
            s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 1, off, length))
        s.settimeout(2)
        try:
            while s.recv(1 << 20):
                pass
        except OSError:
            pass


def a_limits(ctx, srv, deadline):
    cases = ["option-at-limit", "option-past-limit", "name-at-limit", "name-past-limit", "many-options",
             "read-at-limit", "read-past-limit", "read-past-end"]
    n = 0
    while until(deadline):
        try:
            limit_case(srv.port, cases[n % len(cases)])
        except OSError:
            pass
        n += 1
    return f"{n} connections"


def a_idle(ctx, srv, deadline):
    socks = []
    try:
        while until(deadline) and len(socks) < 4000:
            s = socket.create_connection((HOST, srv.port), timeout=5)
            B.recv_exact(s, 152)
            socks.append(s)
        while until(deadline):
            time.sleep(0.05)
        return f"{len(socks)} connections"
    finally:
        for s in socks:
            s.close()


def a_control_flood(ctx, srv, deadline):
    import socket as S
    held = []
    statuses = 0
    try:
        for _ in range(200):
            c = S.socket(S.AF_UNIX, S.SOCK_STREAM)
            c.connect(srv.sock)
            held.append(c)
        while until(deadline):
            c = S.socket(S.AF_UNIX, S.SOCK_STREAM)
            c.settimeout(5)
            c.connect(srv.sock)
            c.sendall(b"status\n\n")
            while c.recv(4096):
                pass
            c.close()
            statuses += 1
    finally:
        for c in held:
            c.close()
    return f"200 silent, {statuses} status requests"


def a_tls_burst(ctx, srv, deadline):
    context = ssl.create_default_context(cafile=os.path.join(B.TLS.client_dir, "ca-cert.pem"))
    done = [0]
    lock = threading.Lock()

    def one():
        try:
            with socket.create_connection((HOST, srv.port), timeout=10) as s:
                B.recv_exact(s, 18)
                s.sendall(struct.pack(">I", 3))
                s.sendall(IHAVEOPT + struct.pack(">II", 5, 0))     # STARTTLS
                B.recv_exact(s, 20)
                with context.wrap_socket(s, server_hostname="127.0.0.1"):
                    with lock:
                        done[0] += 1
        except (OSError, ssl.SSLError):
            pass

    while until(deadline):
        threads = [threading.Thread(target=one) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=15)
    return f"{done[0]} handshakes"


def run_attack(ctx, name):
    image = ctx.image
    srv = B.FlexProc("serve", image, ctx.workdir, name)
    extra = []
    if name == "slowloris":
        extra = ["--handshake", "newstyle"]
    elif name == "limits":
        extra = ["--handshake", "newstyle"]
    elif name == "idle":
        extra = ["--max-clients", "5000"]
    elif name == "tls-burst":
        B.TLS.make(ctx.workdir)
        extra = ["--tls-cert", B.TLS.server_cert, "--tls-key", B.TLS.server_key, "--tls", "optional"]
    srv.extra = extra
    srv.start()
    try:
        srv.wait_ready()
        sampling = threading.Event()

        def sample():
            while not sampling.is_set():
                srv.sample_hwm()
                sampling.wait(0.01)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        good = GoodClient(srv.port)
        t0 = time.perf_counter()
        time.sleep(QUIET)          # the quiet phase: measured, not synchronisation
        t1 = time.perf_counter()
        what = ATTACK_FNS[name](ctx, srv, t1 + ATTACK)
        t2 = time.perf_counter()
        good.close()
        quiet, nq = good.p99_between(t0 + 0.5, t1)
        loud, nl = good.p99_between(t1, t2)
        # Still serving: a new client reads.
        try:
            B.nbd_read_4k(srv.port, timeout=10)
            after = "yes"
        except Exception as e:
            after = f"no ({e})"
        sampling.set()
        sampler.join(timeout=5)
        srv.sample_hwm()
        log = srv.log_text()
        return {
            "attack": name, "what": what, "rss_kib": srv.peak_kib(),
            "p99_quiet_us": quiet * 1e6 if quiet else None, "n_quiet": nq,
            "p99_attack_us": loud * 1e6 if loud else None, "n_attack": nl,
            "ratio": (loud / quiet) if quiet and loud else None,
            "good_error": good.error, "serving_after": after,
            "panics": len(re.findall(r"panicked", log)),
        }
    finally:
        srv.stop()


ATTACK_FNS = {
    "flood": a_flood, "slowloris": a_slowloris, "stall-header": a_stall_header,
    "stall-payload": a_stall_payload, "limits": a_limits, "idle": a_idle,
    "control-flood": a_control_flood, "tls-burst": a_tls_burst,
}


def section(results, started, finished, info):
    L = ["## Hostile clients", ""]
    L.append(f"Measured {started} to {finished} by `bench/hostile.py` ({info}). One `flexnbd serve` "
             f"per attack, of a {IMAGE // B.MIB} MiB image; a well-behaved client does 4 KiB random reads "
             f"back to back, {QUIET:.0f} s alone, then {ATTACK:.0f} s during the attack. Goal: its p99 "
             f"under the attack below {P99_GOAL:.0f}x the quiet p99, the server still serving after, "
             "no panic.")
    L.append("")
    L.append("| attack | what it did | server peak RSS | good client p99 quiet | p99 under attack | ratio "
             "| good client errors | serving after | panics |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        def us(v):
            return f"{v:.0f} µs" if v is not None else "none"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "none"
        if r["ratio"] is not None and r["ratio"] >= P99_GOAL:
            ratio = f"**{ratio}** (goal < {P99_GOAL:.0f})"
        rss = f"{r['rss_kib'] / 1024:.1f} MiB" if r["rss_kib"] else "not measured"
        L.append(f"| {r['attack']} | {r['what']} | {rss} | {us(r['p99_quiet_us'])} ({r['n_quiet']} reads) | "
                 f"{us(r['p99_attack_us'])} ({r['n_attack']} reads) | {ratio} | {r['good_error'] or 'none'} | "
                 f"{r['serving_after']} | {r['panics']} |")
    L.append("")
    return L


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--output", default=os.path.join(B.REPO, "BENCHMARKS.md"))
    args = ap.parse_args()
    attacks = [a for a in args.attacks.split(",") if a]
    for a in attacks:
        if a not in ATTACK_FNS:
            sys.exit(f"unknown attack {a!r}; expected some of {','.join(ATTACKS)}")
    # Thousands of sockets on each side: the server inherits this limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    if not args.skip_build:
        B.build()

    class Ctx:
        pass
    ctx = Ctx()
    ctx.workdir = tempfile.mkdtemp(prefix="flexnbd-hostile-", dir="/var/tmp")
    ctx.image = os.path.join(ctx.workdir, "image.raw")
    with open(ctx.image, "wb") as f:
        f.write(os.urandom(IMAGE))
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    results = []
    for a in attacks:
        r = run_attack(ctx, a)
        B.log(f"{a}: {r}")
        results.append(r)
    finished = datetime.datetime.now().strftime("%H:%M")
    info = f"{os.cpu_count()} CPUs, load before {os.getloadavg()[0]:.2f}"
    text = open(args.output).read() if os.path.exists(args.output) else "# Benchmarks\n"
    text = B.splice_section(text, "## Hostile clients", section(results, started, finished, info))
    with open(args.output, "w") as f:
        f.write(text)
    B.log(f"updated the Hostile clients section of {args.output}")
    B.stop_all()


if __name__ == "__main__":
    main()
