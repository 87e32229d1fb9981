#!/usr/bin/python3
"""Benchmark flexnbd against qemu-nbd, nbdkit and nbd-server on loopback.

Run with Debian's /usr/bin/python3 (stdlib only):

    /usr/bin/python3 bench/run.py            # full run: 5 rounds, fio 10 s
    /usr/bin/python3 bench/run.py --quick    # smoke test: 2 rounds, fio 3 s

It builds flexnbd in release mode into target/bench, installs missing peers
with apt-get, creates a 1 GiB image (512 MiB random data, then a 512 MiB hole)
in a temporary directory, and runs every workload against every server,
alternating servers within each round. It writes BENCHMARKS.md at the repo
root and the raw results to bench/out/results.json.

See bench/README.md for what each workload measures.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_DIR = os.path.join(REPO, "target", "bench")
FLEXNBD = os.path.join(TARGET_DIR, "release", "flexnbd")
HOST = "127.0.0.1"
GIB = 1 << 30
MIB = 1 << 20
TIB = 1 << 40

# Peers and the Debian packages they come from.
NEEDED = {
    "qemu-nbd": "qemu-utils",
    "qemu-img": "qemu-utils",
    "nbdkit": "nbdkit",
    "nbd-server": "nbd-server",
    "nbdcopy": "libnbd-bin",
    "fio": "fio",
    "time": "time",
}
APT_PACKAGES = ["qemu-utils", "nbdkit", "nbd-server", "libnbd-bin", "fio", "time"]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- processes

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def children_of(pid):
    """All descendants of pid (scans /proc; bounded by the process count)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 (ppid) comes after the ")" that ends the command name.
        rest = stat[stat.rfind(")") + 2:].split()
        parents.setdefault(int(rest[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in parents.get(p, []):
            if c not in found:
                found.append(c)
                todo.append(c)
    return found


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


class Server:
    """One server process serving one file on one port."""

    def __init__(self, kind, image, workdir):
        self.kind = kind
        self.image = image
        self.workdir = workdir
        self.port = free_port()
        self.popen = None
        self.root = None  # pid of the process that serves (the daemon for nbd-server)
        self.logpath = os.path.join(workdir, f"{kind}.log")
        self.logfile = None

    @property
    def uri(self):
        # nbd-server has no default ("") export: the export is the section name.
        suffix = "disk" if self.kind == "nbd-server" else ""
        return f"nbd://{HOST}:{self.port}/{suffix}"

    @property
    def export_name(self):
        return b"disk" if self.kind == "nbd-server" else b""

    def argv(self):
        p = str(self.port)
        if self.kind == "flexnbd":
            return [FLEXNBD, "serve", "-l", HOST, "-p", p, "-f", self.image, "--handshake", "newstyle"]
        if self.kind == "flexnbd-oldstyle":
            return [FLEXNBD, "serve", "-l", HOST, "-p", p, "-f", self.image, "--handshake", "oldstyle"]
        if self.kind == "qemu-nbd":
            return ["qemu-nbd", "-f", "raw", "-x", "", "-t", "-e", "0", "-b", HOST, "-p", p, self.image]
        if self.kind == "nbdkit":
            return ["nbdkit", "-f", "-i", HOST, "-p", p, "file", self.image]
        if self.kind == "nbd-server":
            cfg = os.path.join(self.workdir, f"nbd-server-{self.port}.conf")
            with open(cfg, "w") as f:
                f.write(f"[generic]\n    listenaddr = {HOST}\n    port = {p}\n"
                        f"[disk]\n    exportname = {self.image}\n")
            self.pidfile = os.path.join(self.workdir, f"nbd-server-{self.port}.pid")
            # Without -d nbd-server daemonises and forks a child per connection;
            # with -d it serves a single connection and exits, which fio's 4 jobs
            # cannot use. So it runs as a daemon and is tracked by its pid file.
            return ["nbd-server", "-C", cfg, "-p", self.pidfile]
        raise ValueError(self.kind)

    def start(self):
        """Exec the server; returns the time of exec (perf_counter)."""
        self.logfile = open(self.logpath, "ab")
        argv = self.argv()
        t0 = time.perf_counter()
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.logfile,
                                      stderr=self.logfile, start_new_session=True)
        LIVE.append(self)
        if self.kind != "nbd-server":
            self.root = self.popen.pid
        return t0

    def _find_daemon(self):
        if self.root is None and self.kind == "nbd-server":
            try:
                with open(self.pidfile) as f:
                    text = f.read().strip()
                if text:
                    self.root = int(text)
            except OSError:
                pass
        return self.root

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.kind != "nbd-server" and self.popen.poll() is not None:
                raise RuntimeError(f"{self.kind} exited early: {self.log_tail()}")
            if self._find_daemon() is not None:
                try:
                    with socket.create_connection((HOST, self.port), timeout=1.0):
                        return
                except OSError:
                    pass
            time.sleep(0.01)
        raise RuntimeError(f"{self.kind} not listening on port {self.port} after {timeout} s: {self.log_tail()}")

    def pids(self):
        self._find_daemon()
        if self.root is None:
            return []
        return [self.root] + children_of(self.root)

    def log_tail(self):
        try:
            with open(self.logpath, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self):
        if self.kind == "nbd-server" and self.popen is not None:
            # The daemon may still be writing its pid file.
            deadline = time.monotonic() + 2.0
            while self._find_daemon() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        pids = self.pids()
        if self.popen is not None and self.popen.poll() is None and self.popen.pid not in pids:
            pids.append(self.popen.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if self.popen is not None:
                self.popen.poll()
            if not any(pid_alive(p) for p in pids):
                break
            time.sleep(0.02)
        for pid in pids:
            if pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.popen is not None:
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.logfile:
            self.logfile.close()
            self.logfile = None
        if self in LIVE:
            LIVE.remove(self)


LIVE = []


def stop_all():
    for s in list(LIVE):
        try:
            s.stop()
        except Exception as e:  # keep going: every server must die
            log(f"warning: stopping {s.kind}: {e}")


class HwmSampler:
    """Samples VmHWM of a server's process tree (children come and go)."""

    def __init__(self, server, interval=0.01):
        self.server = server
        self.interval = interval
        self.peak = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        for pid in self.server.pids():
            v = vm_hwm_kib(pid)
            if v is not None:
                self.peak[pid] = max(v, self.peak.get(pid, 0))

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()  # right before the server is killed

    def max_kib(self):
        return max(self.peak.values()) if self.peak else None


# ---------------------------------------------------------------- a tiny NBD client

NBD_MAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return bytes(buf)


def nbd_read_4k(port, export_name=b"", timeout=2.0):
    """Handshake (oldstyle or fixed newstyle with EXPORT_NAME) and read 4 KiB at 0."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if recv_exact(s, 8) != NBD_MAGIC:
            raise ConnectionError("bad greeting")
        second = recv_exact(s, 8)
        if second == IHAVEOPT:
            (hflags,) = struct.unpack(">H", recv_exact(s, 2))
            no_zeroes = bool(hflags & 2)
            s.sendall(struct.pack(">I", 1 | (2 if no_zeroes else 0)))
            s.sendall(IHAVEOPT + struct.pack(">II", 1, len(export_name)) + export_name)
            recv_exact(s, 10 if no_zeroes else 134)
        elif struct.unpack(">Q", second)[0] == OLDSTYLE_MAGIC:
            recv_exact(s, 8 + 4 + 124)
        else:
            raise ConnectionError("unknown handshake")
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 4096))
        magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
        if magic != 0x67446698 or err != 0 or handle != 1:
            raise ConnectionError(f"bad reply magic={magic:#x} error={err}")
        recv_exact(s, 4096)
        try:
            s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 2, 0, 0))  # disconnect
        except OSError:
            pass


# ---------------------------------------------------------------- workloads

def run_cmd(argv, timeout):
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): "
                           f"{r.stderr.decode(errors='replace')[-1500:]}")
    return dt, r


def w_nbdcopy(ctx, kind):
    srv = Server(kind, ctx.image, ctx.workdir)
    try:
        srv.start()
        srv.wait_ready()
        with HwmSampler(srv) as hwm:
            dt, _ = run_cmd(["nbdcopy", srv.uri, "null:"], timeout=300)
        return {"seconds": dt, "gbps": GIB / dt / 1e9, "rss_kib": hwm.max_kib()}
    finally:
        srv.stop()


def w_qemu_img(ctx, kind):
    srv = Server(kind, ctx.image, ctx.workdir)
    out = os.path.join(ctx.workdir, "out.img")
    try:
        srv.start()
        srv.wait_ready()
        dt, _ = run_cmd(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, out], timeout=300)
        return {"seconds": dt, "gbps": GIB / dt / 1e9}
    finally:
        srv.stop()
        if os.path.exists(out):
            os.unlink(out)


def fio_argv(uri, rw, runtime):
    return ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
            "--numjobs=4", "--iodepth=16", f"--runtime={runtime}", "--time_based",
            "--group_reporting", "--output-format=json"]


def run_fio(ctx, kind, rw, image):
    srv = Server(kind, image, ctx.workdir)
    try:
        srv.start()
        srv.wait_ready()
        _, r = run_cmd(fio_argv(srv.uri, rw, ctx.fio_runtime), timeout=ctx.fio_runtime + 120)
        text = r.stdout.decode(errors="replace")
        data = json.loads(text[text.index("{"):])  # fio's nbd engine prints a line first
        job = data["jobs"][0]
        if job.get("error"):
            raise RuntimeError(f"fio job error {job['error']}")
        side = "read" if rw == "randread" else "write"
        return {"iops": job[side]["iops"]}
    finally:
        srv.stop()


def w_randread(ctx, kind):
    return run_fio(ctx, kind, "randread", ctx.image)


def w_randwrite(ctx, kind):
    # Each run writes to a fresh sparse copy, so every server starts with the
    # same 512 MiB data + 512 MiB hole and the shared read image is untouched.
    copy = os.path.join(ctx.workdir, "write.img")
    subprocess.run(["cp", "--sparse=always", ctx.image, copy], check=True, timeout=300)
    try:
        return run_fio(ctx, kind, "randwrite", copy)
    finally:
        if os.path.exists(copy):
            os.unlink(copy)


def w_startup(ctx, kind):
    srv = Server(kind, ctx.sparse_tib, ctx.workdir)
    try:
        t0 = srv.start()
        deadline = t0 + 30.0
        last = None
        while time.perf_counter() < deadline:
            try:
                nbd_read_4k(srv.port, srv.export_name)
                return {"ms": (time.perf_counter() - t0) * 1000.0}
            except (OSError, ConnectionError) as e:
                last = e
                time.sleep(0.001)
        raise RuntimeError(f"{kind}: no successful read within 30 s ({last}): {srv.log_tail()}")
    finally:
        srv.stop()


PEERS = ["qemu-nbd", "nbdkit", "nbd-server"]
MAIN = ["flexnbd"] + PEERS
WITH_OLD = ["flexnbd", "flexnbd-oldstyle"] + PEERS

# name, title, function, servers, metric, unit, higher_is_better
WORKLOADS = [
    ("nbdcopy", "Sequential read: nbdcopy to null:", w_nbdcopy, WITH_OLD, "gbps", "GB/s", True),
    ("qemu-img", "Sequential read: qemu-img convert to a raw file", w_qemu_img, MAIN, "gbps", "GB/s", True),
    ("randread", "fio 4 KiB randread, 4 jobs x iodepth 16", w_randread, MAIN, "iops", "IOPS", True),
    ("randwrite", "fio 4 KiB randwrite, 4 jobs x iodepth 16", w_randwrite, MAIN, "iops", "IOPS", True),
    ("startup", "Start-up: exec to first successful 4 KiB read, 1 TiB sparse file", w_startup, WITH_OLD, "ms", "ms", False),
]
# Peak RSS comes from the nbdcopy runs.
RSS = ("rss", "Peak RSS while serving the nbdcopy workload (max VmHWM over the server's processes)",
       WITH_OLD, "rss_mib", "MiB", False)


# ---------------------------------------------------------------- setup

def ensure_peers():
    missing = sorted({pkg for tool, pkg in NEEDED.items()
                      if not (shutil.which(tool) or (tool == "time" and os.path.exists("/usr/bin/time")))})
    if not missing:
        log("peers present")
        return
    log(f"installing missing packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y"] + APT_PACKAGES, check=True, env=env, timeout=1200)


def build():
    log(f"building flexnbd (release) into {TARGET_DIR}")
    env = dict(os.environ, CARGO_TARGET_DIR=TARGET_DIR)
    subprocess.run(["cargo", "build", "--release"], cwd=REPO, env=env, check=True, timeout=1800)
    if not os.access(FLEXNBD, os.X_OK):
        raise RuntimeError(f"no binary at {FLEXNBD}")


def make_images(workdir):
    image = os.path.join(workdir, "image.raw")
    with open(image, "wb") as f:
        for _ in range(512 * MIB // (4 * MIB)):
            f.write(os.urandom(4 * MIB))
        f.truncate(GIB)  # the second 512 MiB is a hole
    sparse = os.path.join(workdir, "sparse-1tib.raw")
    with open(sparse, "wb") as f:
        f.truncate(TIB)
    return image, sparse


def cmd_out(argv):
    try:
        r = subprocess.run(argv, capture_output=True, timeout=30)
        return (r.stdout + r.stderr).decode(errors="replace").strip().splitlines()[0]
    except Exception as e:
        return f"unknown ({e})"


def machine_info():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = ["?"] * 3
    commit = cmd_out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"],
                           capture_output=True, timeout=30).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "mem_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "cpu": cpu,
        "loadavg_start": " ".join(load),
        "flexnbd_commit": commit + (" (with uncommitted changes under src/)" if dirty else ""),
        "versions": {
            "qemu-nbd": cmd_out(["qemu-nbd", "--version"]),
            "nbdkit": cmd_out(["nbdkit", "--version"]),
            "nbd-server": cmd_out(["nbd-server", "-V"]),
            "nbdcopy": cmd_out(["nbdcopy", "--version"]),
            "qemu-img": cmd_out(["qemu-img", "--version"]),
            "fio": cmd_out(["fio", "--version"]),
            "rustc": cmd_out(["rustc", "--version"]),
        },
    }


# ---------------------------------------------------------------- report

def fmt(v, unit):
    if v is None:
        return "n/a"
    if unit == "IOPS":
        return f"{v / 1000:.1f}k"
    if unit == "GB/s":
        return f"{v:.2f}"
    if unit == "ms":
        return f"{v:.1f}"
    if unit == "MiB":
        return f"{v:.1f}"
    return f"{v:.3g}"


def ratio(ours, theirs, higher_is_better):
    if ours is None or theirs is None or ours == 0 or theirs == 0:
        return None
    return ours / theirs if higher_is_better else theirs / ours


def fmt_ratio(r):
    if r is None:
        return "n/a"
    return f"**{r:.2f}**" if r < 1.0 else f"{r:.2f}"


def series(results, name, kind, metric):
    vals = []
    for run in results.get(name, {}).get(kind, []):
        if metric == "rss_mib":
            if run.get("rss_kib") is not None:
                vals.append(run["rss_kib"] / 1024.0)
        elif metric in run:
            vals.append(run[metric])
    return vals


def med(vals):
    return statistics.median(vals) if vals else None


def write_report(path, ctx, info, results, failures, started, finished):
    rows = [(w[0], w[1], w[3], w[4], w[5], w[6]) for w in WORKLOADS]
    rows.insert(1, (RSS[0], RSS[1], RSS[2], RSS[3], RSS[4], False))
    L = []
    L.append("# Benchmarks")
    L.append("")
    L.append(f"Generated by `bench/run.py{' --quick' if ctx.quick else ''}` on {started:%Y-%m-%d} "
             f"({started:%H:%M}-{finished:%H:%M} UTC), {ctx.rounds} rounds, fio runtime {ctx.fio_runtime} s. "
             "Rerun with `/usr/bin/python3 bench/run.py` (see `bench/README.md`).")
    L.append("")
    L.append("**Ratios**: for throughput and IOPS, flexnbd ÷ peer; for start-up time and RSS, "
             "peer ÷ flexnbd. Either way **>= 1.0 means flexnbd is as good or better**; "
             "ratios below 1.0 are in bold. Medians over all rounds; within each round the "
             "servers take turns (the starting server rotates each round). "
             "flexnbd serves with `--handshake newstyle` (the peers are newstyle); "
             "`flexnbd-oldstyle` is the same binary with `--handshake oldstyle`, measured where cheap.")
    L.append("")
    L.append("## Machine")
    L.append("")
    L.append(f"- CPU: {info['cpu']}, {info['nproc']} CPUs (`nproc`)")
    L.append(f"- memory: {info['mem_gib']} GiB; kernel {info['kernel']}")
    L.append(f"- load average at start: {info['loadavg_start']} (a shared machine: other builds and tests "
             "ran concurrently, so absolute numbers are noisy; compare ratios)")
    L.append(f"- flexnbd: commit {info['flexnbd_commit']}, `cargo build --release` "
             f"({info['versions']['rustc']})")
    for k in ("qemu-nbd", "nbdkit", "nbd-server", "nbdcopy", "qemu-img", "fio"):
        L.append(f"- {k}: {info['versions'][k]}")
    L.append("- images in a temporary directory under /var/tmp (ext4/disk-backed, but the 1 GiB image "
             "was just written so reads are served from the page cache)")
    L.append("")
    L.append("## Summary of ratios (>= 1.0 is good for flexnbd)")
    L.append("")
    L.append("| workload | flexnbd median | vs qemu-nbd | vs nbdkit | vs nbd-server |")
    L.append("|---|---|---|---|---|")
    for name, title, servers, metric, unit, hib in rows:
        src = "nbdcopy" if name == "rss" else name
        ours = med(series(results, src, "flexnbd", metric))
        cells = [fmt_ratio(ratio(ours, med(series(results, src, p, metric)), hib)) for p in PEERS]
        L.append(f"| {name} ({unit}, {'higher' if hib else 'lower'} is better) | {fmt(ours, unit)} | "
                 + " | ".join(cells) + " |")
    L.append("")
    for name, title, servers, metric, unit, hib in rows:
        src = "nbdcopy" if name == "rss" else name
        L.append(f"## {name}: {title}")
        L.append("")
        ours = med(series(results, src, "flexnbd", metric))
        old = med(series(results, src, "flexnbd-oldstyle", metric)) if "flexnbd-oldstyle" in servers else None
        head = f"| server | median {unit} | min | max | runs | ratio (flexnbd newstyle) |"
        sep = "|---|---|---|---|---|---|"
        if "flexnbd-oldstyle" in servers:
            head += " ratio (flexnbd-oldstyle) |"
            sep += "---|"
        L.append(head)
        L.append(sep)
        for kind in servers:
            vals = series(results, src, kind, metric)
            m = med(vals)
            line = (f"| {kind} | {fmt(m, unit)} | {fmt(min(vals) if vals else None, unit)} | "
                    f"{fmt(max(vals) if vals else None, unit)} | {len(vals)} | ")
            line += "—" if kind.startswith("flexnbd") else fmt_ratio(ratio(ours, m, hib))
            line += " |"
            if "flexnbd-oldstyle" in servers:
                line += (" — |" if kind.startswith("flexnbd") else f" {fmt_ratio(ratio(old, m, hib))} |")
            L.append(line)
        L.append("")
    L.append("## Commands")
    L.append("")
    L.append("PORT is a free loopback port picked per run; FILE is the image. A fresh server is started "
             "for every single run and killed after it.")
    L.append("")
    L.append("```sh")
    L.append("# build")
    L.append("CARGO_TARGET_DIR=target/bench cargo build --release")
    L.append("# image: 512 MiB of random data, then a 512 MiB hole; and a 1 TiB sparse file for start-up")
    L.append("head -c 512M /dev/urandom > image.raw && truncate -s 1G image.raw   # (done in Python)")
    L.append("truncate -s 1T sparse-1tib.raw")
    L.append("# servers")
    L.append("target/bench/release/flexnbd serve -l 127.0.0.1 -p PORT -f FILE --handshake newstyle   # uri nbd://127.0.0.1:PORT/")
    L.append("target/bench/release/flexnbd serve -l 127.0.0.1 -p PORT -f FILE --handshake oldstyle   # flexnbd-oldstyle")
    L.append("qemu-nbd -f raw -x '' -t -e 0 -b 127.0.0.1 -p PORT FILE                               # uri nbd://127.0.0.1:PORT/")
    L.append("nbdkit -f -i 127.0.0.1 -p PORT file FILE                                              # uri nbd://127.0.0.1:PORT/")
    L.append("nbd-server -C nbd-server.conf -p PIDFILE   # daemon, forks per client; uri nbd://127.0.0.1:PORT/disk")
    L.append("#   nbd-server.conf:  [generic] listenaddr = 127.0.0.1, port = PORT;  [disk] exportname = FILE")
    L.append("# workloads")
    L.append("nbdcopy URI null:")
    L.append("qemu-img convert -f raw -O raw URI out.img && rm out.img")
    L.append(" ".join(fio_argv("URI", "randread", ctx.fio_runtime)))
    L.append("cp --sparse=always image.raw write.img   # fresh copy per randwrite run, not timed")
    L.append(" ".join(fio_argv("URI", "randwrite", ctx.fio_runtime)) + "   # server serving write.img")
    L.append("# start-up: exec the server on the 1 TiB sparse file, then retry (every 1 ms, at most 30 s)")
    L.append("#   a raw-socket client: connect, handshake (EXPORT_NAME), NBD_CMD_READ 4 KiB at offset 0")
    L.append("# RSS: VmHWM from /proc/PID/status of the server and its children, sampled every 10 ms")
    L.append("#   during nbdcopy and once more right before the server is killed; the max over processes")
    L.append("```")
    L.append("")
    L.append("Notes:")
    L.append("")
    L.append("- qemu-nbd runs with `-e 0` (unlimited clients), unlike `design/benchmarks.md`'s command: with "
             "the default `-e 1` it accepts one connection at a time, so fio's 4 jobs run one after "
             "another instead of concurrently and it does not advertise multi-conn to nbdcopy.")
    L.append("- nbd-server has no default export; it is reached as `nbd://127.0.0.1:PORT/disk`. Its `-d` "
             "(do not fork) mode serves a single connection and exits, so it runs as a daemon. It forks "
             "a process per connection; its RSS is the largest single process, not the sum.")
    L.append("- nbdcopy uses several connections when the server advertises multi-conn (every server here "
             "does with the flags above, flexnbd-oldstyle included). Oldstyle has no structured replies or "
             "block status, so nbdcopy reads the 512 MiB hole as data from flexnbd-oldstyle.")
    L.append("- Half of the image is a hole, so about half of the fio randread requests fall in it; flexnbd "
             "answers those from its allocation map without a pread, the peers pread the hole.")
    L.append("")
    if failures:
        L.append("## Failed runs")
        L.append("")
        for f in failures:
            L.append(f"- {f}")
        L.append("")
    L.append("## Raw per-run numbers")
    L.append("")
    L.append("<details><summary>every run, in the order of the rounds</summary>")
    L.append("")
    for name, title, servers, metric, unit, hib in rows:
        src = "nbdcopy" if name == "rss" else name
        L.append(f"**{name}** ({unit})")
        L.append("")
        L.append("| server | " + " | ".join(f"r{i + 1}" for i in range(ctx.rounds)) + " |")
        L.append("|---|" + "---|" * ctx.rounds)
        for kind in servers:
            by_round = {}
            for run in results.get(src, {}).get(kind, []):
                v = series({src: {kind: [run]}}, src, kind, metric)
                if v:
                    by_round[run["round"]] = v[0]
            cells = [fmt(by_round[r], unit) if r in by_round else "failed"
                     for r in range(1, ctx.rounds + 1)]
            L.append(f"| {kind} | " + " | ".join(cells) + " |")
        L.append("")
    L.append("</details>")
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


# ---------------------------------------------------------------- main

class Ctx:
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 rounds, fio 3 s")
    ap.add_argument("--rounds", type=int, help="rounds (default 5, or 2 with --quick)")
    ap.add_argument("--fio-runtime", type=int, help="fio seconds (default 10, or 3 with --quick)")
    ap.add_argument("--skip-build", action="store_true", help="use the existing target/bench binary")
    ap.add_argument("--only", help="comma-separated workloads to run (default all)")
    ap.add_argument("--output", default=os.path.join(REPO, "BENCHMARKS.md"), help="report path")
    args = ap.parse_args()

    ctx = Ctx()
    ctx.quick = args.quick
    ctx.rounds = max(1, min(args.rounds or (2 if args.quick else 5), 50))
    ctx.fio_runtime = max(1, min(args.fio_runtime or (3 if args.quick else 10), 600))
    only = set(args.only.split(",")) if args.only else None

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)

    started = datetime.datetime.now(datetime.timezone.utc)
    ensure_peers()
    if not args.skip_build:
        build()
    info = machine_info()
    ctx.workdir = tempfile.mkdtemp(prefix="flexnbd-bench-", dir="/var/tmp")
    results, failures = {}, []
    try:
        log(f"creating images in {ctx.workdir}")
        ctx.image, ctx.sparse_tib = make_images(ctx.workdir)
        for rnd in range(ctx.rounds):
            for name, title, fn, servers, metric, unit, hib in WORKLOADS:
                if only and name not in only:
                    continue
                shift = rnd % len(servers)
                order = servers[shift:] + servers[:shift]
                for kind in order:
                    try:
                        res = fn(ctx, kind)
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:
                        msg = f"round {rnd + 1} {name} {kind}: {e}"
                        log("FAILED " + msg)
                        failures.append(msg.replace("\n", " ")[:500])
                        continue
                    res["round"] = rnd + 1
                    results.setdefault(name, {}).setdefault(kind, []).append(res)
                    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}
                    log(f"round {rnd + 1}/{ctx.rounds} {name:9} {kind:16} {shown}")
    finally:
        stop_all()
        shutil.rmtree(ctx.workdir, ignore_errors=True)
    finished = datetime.datetime.now(datetime.timezone.utc)
    outdir = os.path.join(REPO, "bench", "out")
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump({"machine": info, "rounds": ctx.rounds, "fio_runtime": ctx.fio_runtime,
                   "results": results, "failures": failures}, f, indent=1)
    write_report(args.output, ctx, info, results, failures, started, finished)
    log(f"wrote {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
