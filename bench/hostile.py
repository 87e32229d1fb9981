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

- flood: connections opened as fast as possible from 4 threads, held,
  past --max-clients (16, the default); the slowest connect is recorded;
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
  with TLS optional and room for all of them (--max-clients 80); the good
  client stays plaintext.

The attack runs in this process, pinned to one CPU at nice 19, the good
client in a process of its own pinned to the other, and the server on
both. The attacker stands in for a machine elsewhere: neither its own CPU
time nor Python's interpreter lock is charged to the server. At nice 0 it
competed with the server's threads for its CPU, and the good client's p99
under the same TLS burst swung between 1x and 6x from run to run.

    /usr/bin/python3 bench/hostile.py [--attacks flood,idle] [--skip-build] [--output FILE]
"""

import argparse
import datetime
import json
import os
import random
import re
import resource
import socket
import ssl
import struct
import subprocess
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
ATTACKER_NICE = 19
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


def good_client_main(port):
    """The well-behaved client, in its own process (so that the attack's
    Python threads cannot hold it up on the interpreter lock): 4 KiB random
    reads back to back until a line arrives on stdin (or 120 s pass); then
    one JSON object on stdout: the samples as (start, latency) on
    CLOCK_MONOTONIC, which every process shares, and the error, if any."""
    cpu = os.environ.get("GOOD_CLIENT_CPU")
    if cpu is not None:
        os.sched_setaffinity(0, {int(cpu)})
    s = socket.create_connection((HOST, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    size = handshake(s)
    stop = threading.Event()

    def watch():
        sys.stdin.readline()
        stop.set()
    threading.Thread(target=watch, daemon=True).start()
    print("ready", flush=True)
    samples = []
    error = None
    rng = random.Random(7)
    handle = 0
    deadline = time.monotonic() + 120
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            handle += 1
            off = rng.randrange(size // 4096) * 4096
            t = time.monotonic()
            s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, handle, off, 4096))
            magic, err, h = struct.unpack(">IIQ", B.recv_exact(s, 16))
            if magic != REPLY_MAGIC or err or h != handle:
                raise ConnectionError(f"bad reply {magic:#x} {err} {h}")
            B.recv_exact(s, 4096)
            samples.append((t, time.monotonic() - t))
    except Exception as e:  # recorded: the good client must not fail
        error = repr(e)
    s.close()
    json.dump({"samples": samples, "error": error}, sys.stdout)
    sys.stdout.flush()


class GoodClient:
    """The well-behaved client's process (good_client_main), pinned to `cpu`."""

    def __init__(self, port, cpu):
        env = dict(os.environ)
        if cpu is not None:
            env["GOOD_CLIENT_CPU"] = str(cpu)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--good-client", str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()   # it connects with a 10 s timeout, then says so or exits
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"the good client did not start (said {line!r}, exit {self.proc.wait(10)})")
        self.samples = []
        self.error = None

    def close(self):
        try:
            out, _ = self.proc.communicate("stop\n", timeout=30)
            got = json.loads(out)
            self.samples = got["samples"]
            self.error = got["error"]
        except Exception as e:
            self.proc.kill()
            self.proc.wait(10)
            self.error = f"the good client's process failed: {e!r}"

    def p99_between(self, a, b):
        lat = sorted(d for t, d in self.samples if a <= t < b)
        if not lat:
            return None, 0
        return lat[min(len(lat) - 1, int(len(lat) * 0.99))], len(lat)


# docs/hostile.md's formula, per connection: read buffer, payload piece,
# write batch, reply buffer (256 KiB + 256 KiB + 4 MiB + 256 KiB + a
# 256 KiB piece), plus rustls's buffers for a TLS session; and the
# server-wide deferred reads.
PER_CONNECTION_KIB = 256 + 256 + 4096 + 256 + 256
PER_TLS_SESSION_KIB = 128
DEFERRED_READS_KIB = 64 * 1024


def rss_kib(srv):
    """VmRSS of the server now."""
    return B.proc_status_kib(srv.popen.pid, "VmRSS")


def cpu_seconds(srv):
    """User plus system CPU time the server's processes have used so far."""
    total = 0
    for pid in srv.pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])   # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def until(deadline):
    return time.monotonic() < deadline


def a_flood(ctx, srv, deadline):
    """4 threads connecting as fast as they can, each holding its last 250
    connections; the slowest connect says whether a SYN was dropped by a
    full accept queue (a wait of 1 s or more)."""
    lock = threading.Lock()
    stats = {"opened": 0, "slowest": 0.0}

    def worker():
        held = []
        try:
            while until(deadline):
                began = time.monotonic()
                try:
                    held.append(socket.create_connection((HOST, srv.port), timeout=5))
                except OSError:
                    continue
                took = time.monotonic() - began
                with lock:
                    stats["opened"] += 1
                    stats["slowest"] = max(stats["slowest"], took)
                if len(held) > 250:
                    for s in held[:125]:
                        s.close()
                    del held[:125]
        finally:
            for s in held:
                s.close()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return f"{stats['opened']} connections, slowest connect {stats['slowest'] * 1000:.1f} ms"


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
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
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


OPT_REPLY_MAGIC = 0x3E889045565A9
REP_ACK = 1


def option_replies(s, until_end):
    """Reads option replies until the connection ends or, unless `until_end`,
    until the first final one (an ACK or an error); returns how many came."""
    n = 0
    while True:
        head = b""
        while len(head) < 20:
            got = s.recv(20 - len(head))
            if not got:
                return n
            head += got
        magic, _, kind, length = struct.unpack(">QIII", head)
        if magic != OPT_REPLY_MAGIC:
            raise ConnectionError(f"bad option reply magic {magic:#x}")
        B.recv_exact(s, length)
        n += 1
        if not until_end and (kind == REP_ACK or kind & 0x80000000):
            return n


def limit_case(port, case):
    """One connection with one case of a limit: reads exactly what the
    server answers (a reply, or the end of the connection), then closes."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        if B.recv_exact(s, 8) != B.NBD_MAGIC or B.recv_exact(s, 8) != IHAVEOPT:
            raise ConnectionError("expected newstyle")
        B.recv_exact(s, 2)
        s.sendall(struct.pack(">I", 3))

        def opt(o, data):
            s.sendall(IHAVEOPT + struct.pack(">II", o, len(data)) + data)
        if case == "option-at-limit":
            opt(3, b"\0" * 16384)             # LIST with a 16 KiB payload: refused
            option_replies(s, False)
        elif case == "option-past-limit":
            s.sendall(IHAVEOPT + struct.pack(">II", 3, 16385))
            option_replies(s, True)           # dropped
        elif case == "name-at-limit":
            opt(7, struct.pack(">I", 4096) + b"n" * 4096 + b"\0\0")
            option_replies(s, False)
        elif case == "name-past-limit":
            opt(7, struct.pack(">I", 4097) + b"n" * 4097 + b"\0\0")
            option_replies(s, False)
        elif case == "many-options":
            for _ in range(257):
                opt(0x42, b"")
            option_replies(s, True)           # 256 refusals, then dropped
        else:
            opt(1, b"")                       # EXPORT_NAME, then transmission
            size, _ = struct.unpack(">QH", B.recv_exact(s, 10))
            length, off = {"read-at-limit": (32 * B.MIB, 0), "read-past-limit": (32 * B.MIB + 1, 0),
                           "read-past-end": (4096, size)}[case]
            s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 1, off, length))
            head = s.recv(16, socket.MSG_WAITALL)
            if len(head) == 16:
                magic, err, _ = struct.unpack(">IIQ", head)
                if magic == REPLY_MAGIC and err == 0:
                    B.recv_exact(s, length)


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


def run_attack(ctx, name, round_no=1):
    image = ctx.image
    # A tag of its own per run: its log (where its port is read) is new.
    srv = B.FlexProc("serve", image, ctx.workdir, f"{name}-{round_no}")
    extra = []
    if name == "slowloris":
        extra = ["--handshake", "newstyle"]
    elif name == "limits":
        extra = ["--handshake", "newstyle"]
    elif name == "idle":
        extra = ["--max-clients", "5000"]
    elif name == "tls-burst":
        B.TLS.make(ctx.workdir)
        # Room for every handshake of a round at once.
        extra = ["--tls-cert", B.TLS.server_cert, "--tls-key", B.TLS.server_key, "--tls", "optional",
                 "--max-clients", "80"]
    srv.extra = extra
    max_clients = int(extra[extra.index("--max-clients") + 1]) if "--max-clients" in extra else 16
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
        # The attacker stands in for a machine elsewhere: this process (its
        # threads inherit the mask) takes one CPU and the good client the
        # other, so neither the attack's own CPU time nor the interpreter
        # lock is charged to the server, which runs on both.
        cpus = sorted(os.sched_getaffinity(0))
        pinned = len(cpus) >= 2
        good = GoodClient(srv.port, cpus[0] if pinned else None)
        if pinned:
            os.sched_setaffinity(0, {cpus[-1]})
        # And it runs at nice 19 (its threads inherit that too): a machine
        # elsewhere would not take CPU from the server; here it gets what
        # the server and the good client leave.
        os.setpriority(os.PRIO_PROCESS, 0, ATTACKER_NICE)
        try:
            t0 = time.monotonic()
            cpu0 = cpu_seconds(srv)
            base_kib = rss_kib(srv)
            time.sleep(QUIET)          # the quiet phase: measured, not synchronisation
            t1 = time.monotonic()
            cpu1 = cpu_seconds(srv)
            what = ATTACK_FNS[name](ctx, srv, t1 + ATTACK)
            t2 = time.monotonic()
            cpu2 = cpu_seconds(srv)
        finally:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
            if pinned:
                os.sched_setaffinity(0, set(cpus))
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
            # The formula with C = --max-clients and the base measured
            # before the attack (the good client already in).
            "bound_kib": (base_kib + max_clients * (PER_CONNECTION_KIB + (PER_TLS_SESSION_KIB if name == "tls-burst" else 0))
                          + DEFERRED_READS_KIB) if base_kib else None,
            "server_cpu_quiet": (cpu1 - cpu0) / (t1 - t0),
            "server_cpu": (cpu2 - cpu1) / (t2 - t1),
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
    rounds = results[0].get("rounds", 1) if results else 1
    L.append(f"Measured {started} to {finished} by `bench/hostile.py` ({info}). One `flexnbd serve` "
             f"per run of an attack, {rounds} runs each; a row is the run with the median ratio, the "
             f"range of the ratios in brackets, the peak RSS the highest of the runs; a {IMAGE // B.MIB} MiB image; a well-behaved client does 4 KiB random reads "
             f"back to back, {QUIET:.0f} s alone, then {ATTACK:.0f} s during the attack. Goal: its p99 "
             f"under the attack below {P99_GOAL:.0f}x the quiet p99, the server still serving after, "
             "no panic. The server's CPU includes serving the good client (so it rises with the reads "
             f"it answers). The attacker is pinned to one CPU at nice {ATTACKER_NICE} (a machine elsewhere "
             "would not take the server's CPU) and the good client, a process of its own, to the other; "
             "the server runs on both.")
    L.append("")
    L.append("| attack | what it did | server peak RSS | its bound (docs/hostile.md) | server CPU quiet / under attack "
             "| good client p99 quiet | p99 under attack | ratio | good client errors | serving after | panics |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        def us(v):
            return f"{v:.0f} µs" if v is not None else "none"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "none"
        if r["ratio"] is not None and r["ratio"] >= P99_GOAL:
            ratio = f"**{ratio}** (goal < {P99_GOAL:.0f})"
        if len(r.get("ratios", [])) > 1:
            ratio += f" ({min(r['ratios']):.2f}-{max(r['ratios']):.2f})"
        rss = f"{r['rss_kib'] / 1024:.1f} MiB" if r["rss_kib"] else "not measured"
        bound = f"{r['bound_kib'] / 1024:.0f} MiB" if r["bound_kib"] else "not measured"
        if r["rss_kib"] and r["bound_kib"] and r["rss_kib"] > r["bound_kib"]:
            bound = f"**{bound}: exceeded**"
        L.append(f"| {r['attack']} | {r['what']} | {rss} | {bound} | {r['server_cpu_quiet'] * 100:.0f} / {r['server_cpu'] * 100:.0f} % of a CPU | "
                 f"{us(r['p99_quiet_us'])} ({r['n_quiet']} reads) | "
                 f"{us(r['p99_attack_us'])} ({r['n_attack']} reads) | {ratio} | {r['good_error'] or 'none'} | "
                 f"{r['serving_after']} | {r['panics']} |")
    L.append("")
    return L


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="runs of each attack; the row is the run with the median ratio, and the range "
                         "of the ratios is shown beside it")
    ap.add_argument("--output", default=os.path.join(B.REPO, "BENCHMARKS.md"))
    ap.add_argument("--good-client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.good_client:
        return good_client_main(args.good_client)
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
        runs = []
        for i in range(args.rounds):
            r = run_attack(ctx, a, i + 1)
            B.log(f"{a} round {i + 1}: {r}")
            runs.append(r)
        measured = sorted((r for r in runs if r["ratio"] is not None), key=lambda r: r["ratio"])
        row = dict(measured[len(measured) // 2] if measured else runs[0])
        row["ratios"] = [r["ratio"] for r in measured]
        row["rounds"] = len(runs)
        # Every round must have kept the good client error-free, served
        # after, and not panicked: the row says so if one did not.
        row["good_error"] = "; ".join(sorted({r["good_error"] for r in runs if r["good_error"]})) or None
        row["serving_after"] = "yes" if all(r["serving_after"] == "yes" for r in runs) else \
            "; ".join(sorted({r["serving_after"] for r in runs if r["serving_after"] != "yes"}))
        row["panics"] = sum(r["panics"] for r in runs)
        row["rss_kib"] = max((r["rss_kib"] or 0) for r in runs) or None
        results.append(row)
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
