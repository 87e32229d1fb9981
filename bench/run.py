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

It also migrates images between two flexnbd processes (serve -> listen) and
reports migration time, client write stalls and peak RSS; `--only migration`
runs just that and rewrites only the "## Migration" section of BENCHMARKS.md.
The stall section (`--only stall`, "## Stall") times client writes across the
hand-off, through flexnbd-proxy and directly, with a supervisor that starts
`serve` on the migrated image.

The refactor section (`--only refactor`, "## Refactor") runs this build and
the build before the refactor (commit b1ff616, REFACTOR_BASE) in the same
rounds: nbdcopy, fio 4 KiB randread and randwrite, and the migration cases
(time and the clients' shut-out), each with its ratio against the goal of
0.95. The base is built from a temporary worktree into target/bench-base;
set FLEXNBD_BASE_BIN=PATH to a ready release binary of it to skip that build:

    FLEXNBD_BASE_BIN=/path/to/flexnbd /usr/bin/python3 bench/run.py --only refactor

The simulator section (`--only sim`, "## Simulator") times the release
flexnbd-sim (built beside flexnbd) on seeds 0..20000 with 1 and 2 threads and
on the default test's seeds 0..2000 with 2 threads: wall time, seeds/s,
events/s and the failed seeds (any is a failure of the run). 3 rounds unless
--rounds says otherwise.

The WAN section (`--only wan`, "## WAN"; never part of a full run: it needs
root and takes about 15 minutes) is bench/wan.py: migrations across emulated
links (1 Gbit/s and 100 Mbit/s at 0.2, 10 and 50 ms round trip, a network
namespace, tc tbf and flexnbd-linkem) against nbdcopy between two qemu-nbd
over the same link. 1 round unless --rounds says otherwise; --cases picks
some of the cases (e.g. 1000-50,100-10).

See bench/README.md for what each workload measures.
"""

import argparse
import datetime
import errno
import hashlib
import json
import os
import platform
import random
import re
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
def _host_triple():
    try:
        out = subprocess.run(["rustc", "-vV"], stdout=subprocess.PIPE, text=True, timeout=60).stdout
        return next(l.split(": ", 1)[1] for l in out.splitlines() if l.startswith("host: "))
    except Exception:
        return "x86_64-unknown-linux-gnu"


# scripts/build-release builds for an explicit target (static glibc).
FLEXNBD = os.path.join(TARGET_DIR, _host_triple(), "release", "flexnbd")
HOST = "127.0.0.1"
# A C flexnbd binary (bench/README.md): with it, the migration section also
# migrates between it and ours, both ways. Not built here.
C_FLEXNBD = os.environ.get("FLEXNBD_C_BIN") or None
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
    "openssl": "openssl",
}
APT_PACKAGES = ["qemu-utils", "nbdkit", "nbd-server", "libnbd-bin", "fio", "time", "openssl"]


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


def proc_status_kib(pid, field):
    """A size field of /proc/PID/status (VmHWM, VmRSS, ...) in KiB, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def vm_hwm_kib(pid):
    return proc_status_kib(pid, "VmHWM")


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def listening_port(pid):
    """The TCP port process `pid` listens on (from /proc), or None."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    # /proc/PID/net/tcp: the table of the process's own network namespace
    # (the WAN section's destination runs in another one).
    with open(f"/proc/{pid}/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                return int(fields[1].rsplit(":", 1)[1], 16)
    return None


class Server:
    """One server process serving one file on one port."""

    def __init__(self, kind, image, workdir, cgroup=None):
        self.kind = kind
        self.image = image
        self.workdir = workdir
        # A memory cgroup the server runs in (cold-cache rows), joined
        # before exec so every page it touches is charged there.
        self.cgroup = cgroup
        self.port = free_port()
        self.popen = None
        self.root = None  # pid of the process that serves (the daemon for nbd-server)
        self.logpath = os.path.join(workdir, f"{kind}.log")
        self.logfile = None

    @property
    def tls(self):
        return self.kind.endswith("-tls")

    @property
    def uri(self):
        if self.tls:
            # libnbd's URI form of STARTTLS: nbds:// with the directory that
            # holds the CA certificate (ca-cert.pem).
            return f"nbds://{HOST}:{self.port}/?tls-certificates={TLS.client_dir}"
        # nbd-server has no default ("") export: the export is the section name.
        suffix = "disk" if self.kind == "nbd-server" else ""
        return f"nbd://{HOST}:{self.port}/{suffix}"

    @property
    def fio_uri(self):
        """The URI for fio: its nbd engine refuses URIs that name local files
        (tls-certificates), so for TLS it gets a bare nbds:// URI and libnbd
        finds the CA in $HOME/.pki/libnbd (TLS.fio_env())."""
        return f"nbds://{HOST}:{self.port}/" if self.tls else self.uri

    @property
    def export_name(self):
        return b"disk" if self.kind == "nbd-server" else b""

    def argv(self):
        p = str(self.port)
        if self.kind == "flexnbd":
            return [FLEXNBD, "serve", "-l", HOST, "-p", p, "-f", self.image, "--handshake", "newstyle"]
        if self.kind == "flexnbd-tls":
            # A certificate makes TLS required and the handshake newstyle.
            return [FLEXNBD, "serve", "-l", HOST, "-p", p, "-f", self.image,
                    "--tls-cert", TLS.server_cert, "--tls-key", TLS.server_key]
        if self.kind == "qemu-nbd-tls":
            # verify-peer=off: the server asks for no client certificate (as
            # flexnbd and nbdkit here); qemu's default for a server is to require one.
            return ["qemu-nbd", "-f", "raw", "-x", "", "-t", "-e", "0", "-b", HOST, "-p", p,
                    "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={TLS.server_dir},verify-peer=off",
                    "--tls-creds", "tls0", self.image]
        if self.kind == "nbdkit-tls":
            return ["nbdkit", "-f", "-i", HOST, "-p", p, "--tls=require",
                    f"--tls-certificates={TLS.server_dir}", "file", self.image]
        if self.kind == "flexnbd-oldstyle":
            return [FLEXNBD, "serve", "-l", HOST, "-p", p, "-f", self.image, "--handshake", "oldstyle"]
        if self.kind == "flexnbd-preseam":
            # The build from before the storage seam (SEAM_BASE), same flags.
            return [FLEXNBD_PRESEAM, "serve", "-l", HOST, "-p", p, "-f", self.image, "--handshake", "newstyle"]
        if self.kind == "flexnbd-base":
            # The build before the refactor (REFACTOR_BASE or FLEXNBD_BASE_BIN), same flags.
            return [FLEXNBD_BASE, "serve", "-l", HOST, "-p", p, "-f", self.image, "--handshake", "newstyle"]
        if self.kind == "flexnbd-faultplan":
            # A fault plan that never fires (nothing here sends TRIM): every
            # protocol step goes through the plan's decision instead of the
            # production no-op probe.
            return [FLEXNBD, "serve", "-l", HOST, "-p", p, "-f", self.image, "--handshake", "newstyle",
                    "--faults", INERT_PLAN]
        if self.kind == "qemu-nbd":
            return ["qemu-nbd", "-f", "raw", "-x", "", "-t", "-e", "0", "-b", HOST, "-p", p, self.image]
        if self.kind == "qemu-nbd-direct":
            # O_DIRECT through io_uring: qemu-nbd's own way of serving from
            # cold storage.
            return ["qemu-nbd", "-f", "raw", "-x", "", "-t", "-e", "0", "--aio=io_uring", "--cache=none",
                    "-b", HOST, "-p", p, self.image]
        if self.kind == "nbdkit":
            return ["nbdkit", "-f", "-i", HOST, "-p", p, "file", self.image]
        if self.kind in ("nbdkit-null", "nbdkit-memory"):
            # No storage at all: the protocol path's ceiling.
            return ["nbdkit", "-f", "-i", HOST, "-p", p, self.kind.split("-")[1], str(os.path.getsize(self.image))]
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
        cgroup = self.cgroup

        def join_cgroup():
            if cgroup:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
        self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.logfile,
                                      stderr=self.logfile, start_new_session=True,
                                      preexec_fn=join_cgroup if cgroup else None)
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

def run_cmd(argv, timeout, env=None):
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=env)
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


def convert_target_dir(workdir):
    """Where qemu-img convert writes its copy: RAM (/dev/shm) when it has
    room, so the row measures reading over NBD rather than the state of the
    disk's writeback (on disk, every server's time swung 0.3-2.6 s between
    rounds)."""
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > 2 * GIB:
            return "/dev/shm"
    except OSError:
        pass
    return workdir


def w_qemu_img(ctx, kind):
    srv = Server(kind, ctx.image, ctx.workdir)
    out = os.path.join(convert_target_dir(ctx.workdir), f"flexnbd-bench-out-{os.getpid()}.img")
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


def run_fio(ctx, kind, rw, image, cgroup=None):
    srv = Server(kind, image, ctx.workdir, cgroup)
    try:
        srv.start()
        srv.wait_ready()
        _, r = run_cmd(fio_argv(srv.fio_uri, rw, ctx.fio_runtime), timeout=ctx.fio_runtime + 120,
                       env=TLS.fio_env() if srv.tls else None)
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


# ---------------------------------------------------------------- TLS credentials

class TlsCreds:
    """x509 credentials made with the openssl CLI at bench time (never kept):
    a CA and a server certificate for localhost / 127.0.0.1 that it signed.

    The server directory uses the GnuTLS file names that qemu-nbd
    (tls-creds-x509 dir=) and nbdkit (--tls-certificates) both read:
    ca-cert.pem, server-cert.pem, server-key.pem. The client directory holds
    only ca-cert.pem, which is what libnbd (nbdcopy, fio) reads."""

    def __init__(self):
        self.root = None

    def make(self, workdir):
        if self.root:
            return
        root = os.path.join(workdir, "tls")
        self.server_dir = os.path.join(root, "server")
        self.client_dir = os.path.join(root, "client")
        self.home = os.path.join(root, "home")
        libnbd_dir = os.path.join(self.home, ".pki", "libnbd")
        for d in (self.server_dir, self.client_dir, libnbd_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.server_cert = os.path.join(self.server_dir, "server-cert.pem")
        self.server_key = os.path.join(self.server_dir, "server-key.pem")
        ca_cert = os.path.join(self.server_dir, "ca-cert.pem")
        ca_key = os.path.join(root, "ca-key.pem")
        csr = os.path.join(root, "server.csr")
        # GnuTLS (qemu-nbd, nbdkit, libnbd) is strict: the CA must say it is
        # one and may sign certificates, and the server certificate needs the
        # usages of a TLS server and a subjectAltName matching the address.
        ca_ext = os.path.join(root, "ca.ext")
        with open(ca_ext, "w") as f:
            f.write("basicConstraints = critical,CA:TRUE\n"
                    "keyUsage = critical,keyCertSign,cRLSign\n"
                    "subjectKeyIdentifier = hash\n")
        srv_ext = os.path.join(root, "server.ext")
        with open(srv_ext, "w") as f:
            f.write("basicConstraints = critical,CA:FALSE\n"
                    "keyUsage = critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage = serverAuth\n"
                    "subjectAltName = DNS:localhost,IP:127.0.0.1\n")
        steps = [
            # The CA signs itself, with exactly the extensions above.
            ["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", csr,
             "-subj", "/CN=flexnbd bench CA"],
            ["openssl", "x509", "-req", "-in", csr, "-signkey", ca_key, "-days", "2", "-out", ca_cert,
             "-extfile", ca_ext],
            ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", self.server_key, "-out", csr,
             "-subj", "/CN=localhost"],
            ["openssl", "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-set_serial", "1",
             "-days", "2", "-out", self.server_cert, "-extfile", srv_ext],
        ]
        for argv in steps:
            run_cmd(argv, timeout=120)
        os.remove(ca_key)  # nothing is signed after this
        for d in (self.client_dir, libnbd_dir):
            shutil.copy(ca_cert, os.path.join(d, "ca-cert.pem"))
        self.root = root
        log(f"TLS credentials in {root}")

    def fio_env(self):
        # libnbd looks for ca-cert.pem in $HOME/.pki/libnbd when the URI
        # names no directory.
        return dict(os.environ, HOME=self.home)


TLS = TlsCreds()


# ---------------------------------------------------------------- cold cache

# The page cache a server in the cold-cache rows may hold: far below the
# 1 GiB image, so nearly every read goes to the disk for the whole run.
COLD_CACHE = 64 * MIB


def cold_cgroup(ctx):
    """A memory cgroup capped at COLD_CACHE (v1 or v2), made once per run."""
    if getattr(ctx, "cgroup", None):
        return ctx.cgroup
    if os.geteuid() != 0:
        raise RuntimeError("cold-cache rows need root (a memory cgroup)")
    name = f"flexnbd-bench-{os.getpid()}"
    if os.path.exists("/sys/fs/cgroup/memory"):
        path = os.path.join("/sys/fs/cgroup/memory", name)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(COLD_CACHE))
    elif os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        path = os.path.join("/sys/fs/cgroup", name)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.max"), "w") as f:
            f.write(str(COLD_CACHE))
    else:
        raise RuntimeError("no memory cgroup controller (neither /sys/fs/cgroup/memory nor cgroup v2)")
    ctx.cgroup = path
    return path


def remove_cgroup(ctx):
    if getattr(ctx, "cgroup", None):
        try:
            os.rmdir(ctx.cgroup)
        except OSError as e:
            log(f"cannot remove cgroup {ctx.cgroup}: {e}")


def cold_image(ctx):
    """1 GiB of random data (no holes: every read needs the disk)."""
    if not getattr(ctx, "cold", None):
        path = os.path.join(ctx.workdir, "cold.raw")
        with open(path, "wb") as f:
            for _ in range(GIB // (4 * MIB)):
                f.write(os.urandom(4 * MIB))
            f.flush()
            os.fsync(f.fileno())
        ctx.cold = path
    return ctx.cold


def evict(path):
    """Drops `path`'s pages from the page cache (it is clean: fsynced when
    made). Only that file: dropping every cache would also make the
    page-cache rows' image cold for the rounds after."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_baseline(ctx):
    """fio straight on the cold image (O_DIRECT, no NBD): what the disk itself
    gives for 4 KiB random reads at queue depth 1 and 64."""
    out = {}
    for depth in (1, 64):
        argv = ["fio", "--name=disk", f"--filename={cold_image(ctx)}", "--rw=randread", "--bs=4k",
                "--direct=1", "--ioengine=io_uring", f"--iodepth={depth}", "--runtime=5", "--time_based",
                "--output-format=json"]
        _, r = run_cmd(argv, timeout=120)
        out[depth] = json.loads(r.stdout)["jobs"][0]["read"]["iops"]
    return out


def disk_note(ctx):
    b = getattr(ctx, "disk", None)
    if not b:
        return "not measured in this run"
    return (f"fio on the image itself with O_DIRECT, measured in this run, gives {b[1] / 1000:.1f}k 4 KiB "
            f"random reads/s at queue depth 1 and {b[64] / 1000:.1f}k at depth 64")


def w_cold_randread(ctx, kind):
    image, cgroup = cold_image(ctx), cold_cgroup(ctx)
    evict(image)
    return run_fio(ctx, kind, "randread", image, cgroup)


def w_cold_nbdcopy(ctx, kind):
    image, cgroup = cold_image(ctx), cold_cgroup(ctx)
    evict(image)
    srv = Server(kind, image, ctx.workdir, cgroup)
    try:
        srv.start()
        srv.wait_ready()
        secs, _ = run_cmd(["nbdcopy", srv.uri, "null:"], timeout=600)
        return {"gbps": os.path.getsize(image) / secs / 1e9}
    finally:
        srv.stop()


def w_null(ctx, kind):
    # flexnbd's fastest path: a file that is all hole, answered from the
    # allocation map with hole chunks (no pread); nbdkit's null and memory
    # plugins have no storage behind them at all.
    path = os.path.join(ctx.workdir, "hole.raw")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.truncate(GIB)
    return run_fio(ctx, kind, "randread", path)


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


# ---------------------------------------------------------------- migration

MIGRATION_GOAL_S = 1.0
STALL_GOAL_MS = 100.0
MIGRATION_TIMEOUT = 180.0      # bound on one migration, from `mirror` to both exits
WRITE_TIMEOUT = 60.0           # a single write waiting longer than this ends the writer
POLL = 0.001                   # exit / VmHWM polling interval


class FlexProc(Server):
    """`flexnbd serve` or `flexnbd listen` for a migration, on a port it picks itself (-p 0).

    It is reaped with os.wait4 (polled), which gives its exit time to the polling
    interval. Its peak RSS is the max VmHWM polled from /proc until it exits: wait4's
    ru_maxrss is no use here, because exec keeps the high-water mark of the process
    it replaces, and that is the fork of this (much larger) Python process.
    """

    def __init__(self, role, image, workdir, tag, c=False, binary=None):
        super().__init__(f"flexnbd-{role}", image, workdir)
        self.role = role
        self.c = c                 # the C flexnbd (C_FLEXNBD) rather than ours
        self.binary = binary       # another build of ours (the refactor rows' base), else FLEXNBD
        self.port = 0
        self.sock = os.path.join(workdir, f"{role}-{tag}.sock")
        self.logpath = os.path.join(workdir, f"{role}-{tag}.log")
        self.exit_time = None
        self.hwm_kib = 0           # max VmHWM seen while polling
        self.map_built = False
        self.extra = []            # more arguments (TLS)

    def argv(self):
        argv = [C_FLEXNBD if self.c else (self.binary or FLEXNBD), self.role, "-l", HOST, "-p", "0",
                "-f", self.image, "-s", self.sock, "-v"]
        if self.role == "listen" and not self.c and not self.extra:
            # Without it the greeting is the C one (flags 13), and holes (the
            # whole 1 TiB case) would travel as zeros instead of WRITE_ZEROES.
            # (With TLS the greeting is newstyle.)
            argv.append("--oldstyle-extra-flags")
        return argv + self.extra

    def log_text(self):
        try:
            with open(self.logpath, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def poll(self):
        """Reap the process if it has exited; returns its exit code or None."""
        if self.popen.returncode is not None:
            return self.popen.returncode
        try:
            pid, status, _ = os.wait4(self.popen.pid, os.WNOHANG)
        except ChildProcessError:
            return self.popen.poll()
        if pid == 0:
            return None
        self.exit_time = time.perf_counter()
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        return self.popen.returncode

    def sample_hwm(self):
        if self.popen.returncode is None:
            v = vm_hwm_kib(self.popen.pid)
            if v is not None:
                self.hwm_kib = max(self.hwm_kib, v)

    def stop(self):
        # Once reaped by poll(), its pid may belong to someone else: never signal it.
        if self.popen is not None and self.popen.returncode is not None:
            if self.logfile:
                self.logfile.close()
                self.logfile = None
            if self in LIVE:
                LIVE.remove(self)
            return
        super().stop()

    def peak_kib(self):
        return self.hwm_kib or None

    def wait_ready(self, timeout=20.0):
        """Ready once it logs `listening on 127.0.0.1:PORT` and its control socket exists;
        then wait (at most 5 s more) for `allocation map built`, so the timed region
        starts with both servers idle."""
        deadline = time.monotonic() + timeout
        listening_at = None
        while time.monotonic() < deadline:
            if self.poll() is not None:
                raise RuntimeError(f"{self.role} exited early ({self.popen.returncode}): {self.log_tail()}")
            text = self.log_text()
            if self.c:
                # The C flexnbd does not log the port it got for -p 0.
                port = listening_port(self.popen.pid)
            else:
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
                port = int(m.group(1)) if m else None
            if port and os.path.exists(self.sock):
                self.port = port
                listening_at = listening_at or time.monotonic()
                self.map_built = ("Successfully built allocation map" if self.c
                                  else "allocation map built") in text
                if self.map_built or time.monotonic() - listening_at > 5.0:
                    return
            time.sleep(0.005)
        raise RuntimeError(f"{self.role} not ready after {timeout} s: {self.log_tail()}")


def parse_rust_duration(text):
    """Rust's Debug format of a Duration (`1.539297ms`, `850µs`, `2.1s`) in milliseconds."""
    m = re.fullmatch(r"([0-9.]+)(ns|µs|us|ms|s)", text.strip())
    if not m:
        return None
    scale = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return float(m.group(1)) * scale


def data_extents(path):
    """(start, end) of the data extents of a file (SEEK_DATA / SEEK_HOLE)."""
    extents = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:  # every step moves past one extent
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end))
            off = end
    finally:
        os.close(fd)
    return extents, size


def first_difference(a, b):
    """None if files a and b have identical contents, else a description.

    Compares bytes over the union of both files' data extents; outside it both
    files are holes (zeros). The 1 TiB sparse case therefore reads nothing."""
    ea, sa = data_extents(a)
    eb, sb = data_extents(b)
    if sa != sb:
        return f"sizes differ ({sa} vs {sb})"
    union = []
    for s, e in sorted(ea + eb):
        if union and s <= union[-1][1]:
            union[-1][1] = max(union[-1][1], e)
        else:
            union.append([s, e])
    chunk = 4 * MIB
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        for s, e in union:
            off = s
            while off < e:
                n = min(chunk, e - off)
                x, y = os.pread(fa, n, off), os.pread(fb, n, off)
                if x != y:
                    i = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
                    return f"first difference at byte {off + i}"
                off += n
    finally:
        os.close(fa)
        os.close(fb)
    return None


def wait_migrated(listen, serve, mirror, deadline, timeout):
    """Polls until both servers have exited 0 (sampling their peak RSS),
    failing on any other exit or at `deadline` (`timeout` seconds after
    `mirror`, for the message); returns when the later one exited."""
    while True:
        for p in (listen, serve):
            p.sample_hwm()
            rc = p.poll()
            if rc not in (None, 0):
                raise RuntimeError(f"{p.role} exited with {rc} during the migration")
        if mirror.poll() not in (None, 0):
            raise RuntimeError(f"flexnbd mirror exited with {mirror.returncode}")
        if listen.exit_time is not None and serve.exit_time is not None:
            return max(listen.exit_time, serve.exit_time)
        if time.perf_counter() > deadline:
            raise RuntimeError(f"migration not finished {timeout:.0f} s after mirror")
        time.sleep(POLL)


class Writer:
    """One persistent oldstyle NBD connection doing back-to-back 4 KiB WRITEs at random
    4 KiB-aligned offsets until the server cuts the connection (or stop/deadline)."""

    def __init__(self, port, seed):
        self.port = port
        self.seed = seed
        self.acked = []          # (send time, latency s) of acknowledged writes
        self.errors = []         # (send time, latency s, error) of error replies
        self.pending = None      # (send time, offset) of the write in flight
        self.cut = None          # (time, send time of the unacknowledged write or None)
        self.end_reason = None
        self.stop = threading.Event()
        self.warm = threading.Event()
        self.deadline = time.perf_counter() + MIGRATION_TIMEOUT + 60.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        s = None
        try:
            s = socket.create_connection((HOST, self.port), timeout=5.0)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            g = recv_exact(s, 152)
            if g[:8] != NBD_MAGIC or struct.unpack(">Q", g[8:16])[0] != OLDSTYLE_MAGIC:
                raise RuntimeError("not an oldstyle greeting")
            size = struct.unpack(">Q", g[16:24])[0]
            s.settimeout(WRITE_TIMEOUT)
            rnd = random.Random(self.seed)
            payloads = [os.urandom(4096) for _ in range(64)]
            blocks = size // 4096
            handle = 0
            while not self.stop.is_set() and time.perf_counter() < self.deadline:
                handle += 1
                off = rnd.randrange(blocks) * 4096
                msg = struct.pack(">IHHQQI", 0x25609513, 0, 1, handle, off, 4096) + payloads[handle % 64]
                t = time.perf_counter()
                self.pending = (t, off)
                s.sendall(msg)
                magic, err, h = struct.unpack(">IIQ", recv_exact(s, 16))
                dt = time.perf_counter() - t
                self.pending = None
                if magic != 0x67446698 or h != handle:
                    raise RuntimeError(f"bad reply magic={magic:#x} handle={h} (sent {handle})")
                if err:
                    self.errors.append((t, dt, err))
                else:
                    self.acked.append((t, dt))
                if len(self.acked) >= 200:
                    self.warm.set()
            self.end_reason = "stopped" if self.stop.is_set() else "deadline"
        except (OSError, ConnectionError) as e:
            now = time.perf_counter()
            self.cut = (now, self.pending[0] if self.pending else None)
            self.end_reason = f"connection ended: {e!r}"
        except Exception as e:
            self.end_reason = f"writer error: {e!r}"
        finally:
            if s is not None:
                s.close()
            self.warm.set()


def run_migration(ctx, src, size, tag, before_mirror=None, c_source=False, c_dest=False, binary=None):
    """Migrate src into a fresh sparse file of `size` bytes; returns the measurements
    and the destination path (the caller removes it). `c_source` / `c_dest` run the
    C flexnbd (C_FLEXNBD) at that end, and the source's own `mirror` command.
    `binary`, another build of ours, plays both ends and `mirror` (default FLEXNBD)."""
    dst = os.path.join(ctx.workdir, f"dst-{tag}.raw")
    with open(dst, "wb") as f:
        f.truncate(size)
    # Untimed: write back what setting up left dirty (the image, a copy), so the
    # destination's fsync does not also wait for that.
    subprocess.run(["sync", "-f", ctx.workdir], check=True, timeout=300)
    listen = FlexProc("listen", dst, ctx.workdir, tag, c=c_dest, binary=binary)
    serve = FlexProc("serve", src, ctx.workdir, tag, c=c_source, binary=binary)
    mirror_log = os.path.join(ctx.workdir, f"mirror-{tag}.log")
    mirror = None
    try:
        listen.start()
        serve.start()
        listen.wait_ready()
        serve.wait_ready()
        if before_mirror:
            before_mirror(serve)
        with open(mirror_log, "wb") as mlog:
            t0 = time.perf_counter()
            mirror = subprocess.Popen([C_FLEXNBD if c_source else (binary or FLEXNBD), "mirror",
                                       "-s", serve.sock, "-l", HOST, "-p", str(listen.port)],
                                      stdin=subprocess.DEVNULL, stdout=mlog, stderr=mlog,
                                      start_new_session=True)
        t1 = wait_migrated(listen, serve, mirror, t0 + MIGRATION_TIMEOUT, MIGRATION_TIMEOUT)
        try:
            mirror.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise RuntimeError("flexnbd mirror still running after both servers exited")
        mout = open(mirror_log, "rb").read().decode(errors="replace").strip()
        if mirror.returncode != 0:
            raise RuntimeError(f"flexnbd mirror exited with {mirror.returncode}: {mout}")
        m = re.search(r"clients were shut out for (\S+)", serve.log_text())
        # What was left to send when clients were cut off (the source's
        # "converged after" line): the shut-out grows with it, and how much
        # is left depends on where the writer happened to be.
        left = re.search(r"(\d+) bytes left at the cut-off", serve.log_text())
        res = {
            "left_bytes": int(left.group(1)) if left else None,
            "seconds": t1 - t0,
            # The C source exits up to a second after the destination (it polls).
            "dest_done_s": listen.exit_time - t0,
            "mirror_said": mout,
            "lockout_ms": parse_rust_duration(m.group(1)) if m else None,
            # Shut-out per MiB left at the cut-off: the hand-off's own cost,
            # apart from how much the writer left (at least 64 KiB left, or
            # the ratio is mostly fixed costs).
            "lockout_ms_per_mib_left": (parse_rust_duration(m.group(1)) / (int(left.group(1)) / MIB)
                                        if m and left and int(left.group(1)) >= 64 * 1024 else None),
            "lockout_raw": m.group(1) if m else None,
            "src_rss_kib": serve.peak_kib(), "dst_rss_kib": listen.peak_kib(),
            "t0": t0,
            "maps_built": listen.map_built and serve.map_built,
        }
        if os.path.exists(dst + ".INCOMPLETE"):
            res["marker_left"] = True
        return res, dst
    except BaseException as e:
        logs = []
        for name, path in (("serve", serve.logpath), ("listen", listen.logpath), ("mirror", mirror_log)):
            try:
                with open(path, "rb") as f:
                    logs.append(f"--- {name} log:\n" + f.read()[-4000:].decode(errors="replace"))
            except OSError:
                pass
        if isinstance(e, Exception):
            raise RuntimeError(f"{e}\n" + "\n".join(logs)) from e
        raise
    finally:
        if mirror is not None and mirror.poll() is None:
            try:
                os.killpg(mirror.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            mirror.wait(timeout=5)
        serve.stop()
        listen.stop()


def mig_check(res, src, dst):
    """Outside the timed region: allocation of the destination and equality."""
    res["dst_alloc_mib"] = os.stat(dst).st_blocks * 512 / MIB
    res["src_alloc_mib"] = os.stat(src).st_blocks * 512 / MIB
    diff = first_difference(src, dst)
    res["identical"] = diff is None
    if diff:
        res["difference"] = diff


def m_plain(ctx, rnd, name="plain", binary=None):
    res, dst = run_migration(ctx, ctx.image, GIB, f"{name}{rnd}", binary=binary)
    try:
        mig_check(res, ctx.image, dst)
        return res
    finally:
        os.unlink(dst)


def m_writes(ctx, rnd, c_source=False, c_dest=False, name="writes", binary=None):
    # The writer changes the source, so each run migrates a fresh sparse copy.
    src = os.path.join(ctx.workdir, f"src-{name}{rnd}.raw")
    subprocess.run(["cp", "--sparse=always", ctx.image, src], check=True, timeout=300)
    writer = None
    dst = None

    def start_writer(serve):
        nonlocal writer
        writer = Writer(serve.port, seed=rnd)
        writer.thread.start()
        if not writer.warm.wait(timeout=30) or len(writer.acked) < 200:
            raise RuntimeError(f"writer did not get going: {writer.end_reason}")
        # A baseline of at least 0.5 s of writes with no migration running.
        time.sleep(max(0.0, 0.5 - (time.perf_counter() - writer.acked[0][0])))
        if writer.end_reason:
            raise RuntimeError(f"writer stopped before mirror: {writer.end_reason}")
        writer.mirror_issued_acks = len(writer.acked)

    try:
        res, dst = run_migration(ctx, src, GIB, f"{name}{rnd}", before_mirror=start_writer,
                                 c_source=c_source, c_dest=c_dest, binary=binary)
        writer.thread.join(timeout=WRITE_TIMEOUT + 10)
        if writer.thread.is_alive():
            writer.stop.set()
            writer.thread.join(timeout=WRITE_TIMEOUT + 10)
        t0 = res.pop("t0")
        lat = sorted(dt for _, dt in writer.acked)
        during = sorted(dt for t, dt in writer.acked if t >= t0)
        before = [dt for t, dt in writer.acked if t < t0]
        worst_t, _ = max(writer.acked, key=lambda a: a[1])
        res.update({
            "writes_acked": len(lat),
            "writes_during_migration": len(during),
            "error_replies": len(writer.errors),
            "error_codes": sorted({e for _, _, e in writer.errors}),
            "max_write_ms": lat[-1] * 1000.0,
            "p99_write_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000.0,
            "p50_write_ms": lat[len(lat) // 2] * 1000.0,
            "max_write_during_ms": during[-1] * 1000.0 if during else None,
            "max_write_before_mirror_ms": max(before) * 1000.0 if before else None,
            "writes_before_mirror": len(before),
            "max_write_sent_at_s": worst_t - t0,  # relative to `mirror`; negative: before it
            "p99_write_during_ms": during[min(len(during) - 1, int(0.99 * len(during)))] * 1000.0 if during else None,
            "writer_end": writer.end_reason,
            "cut_after_mirror_s": (writer.cut[0] - t0) if writer.cut else None,
            "unacked_wait_ms": ((writer.cut[0] - writer.cut[1]) * 1000.0) if writer.cut and writer.cut[1] else None,
        })
        mig_check(res, src, dst)
        return res
    finally:
        if writer is not None:
            writer.stop.set()
            writer.thread.join(timeout=WRITE_TIMEOUT + 10)
        for p in (src, dst):
            if p and os.path.exists(p):
                os.unlink(p)


def m_tib(ctx, rnd, name="tib", binary=None):
    res, dst = run_migration(ctx, ctx.sparse_tib, TIB, f"{name}{rnd}", binary=binary)
    try:
        mig_check(res, ctx.sparse_tib, dst)
        return res
    finally:
        os.unlink(dst)


MIGRATIONS = [("plain", m_plain), ("writes", m_writes), ("tib", m_tib)]
if C_FLEXNBD:
    # Under writes, both ways between ours and the C flexnbd.
    MIGRATIONS += [
        ("to_c", lambda ctx, rnd: m_writes(ctx, rnd, c_dest=True, name="to_c")),
        ("from_c", lambda ctx, rnd: m_writes(ctx, rnd, c_source=True, name="from_c")),
    ]


def run_migrations(ctx, results, failures):
    for rnd in range(ctx.rounds):
        for name, fn in MIGRATIONS:
            try:
                res = fn(ctx, rnd + 1)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                msg = f"round {rnd + 1} migration {name}: {e}"
                log("FAILED " + msg)
                failures.append(msg[:12000])
                continue
            res.pop("t0", None)
            res["round"] = rnd + 1
            results.setdefault("migration", {}).setdefault(name, []).append(res)
            keys = ("seconds", "lockout_ms", "max_write_ms", "p99_write_ms", "writes_during_migration",
                    "src_rss_kib", "dst_rss_kib", "dst_alloc_mib", "identical")
            shown = {k: (round(res[k], 3) if isinstance(res[k], float) else res[k]) for k in keys if k in res}
            log(f"round {rnd + 1}/{ctx.rounds} migration {name:6} {shown}")


# ---------------------------------------------------------------- stall across the hand-off

# How long one client write may take across a hand-off on loopback, not
# counting the supervisor's own start-up time (reported beside it).
HANDOFF_GOAL_MS = 250.0
STALL_IMAGE_SIZE = 64 * MIB
STALL_DATA = 32 * MIB          # random data in scattered extents; the rest is holes
STALL_EXTENT = 512 * 1024
IDLE_INTERVAL = 0.010          # the idle client: one write every 10 ms
STALL_WARMUP = 0.5             # writes before `mirror`, and at least this long on the new server after
RECONNECT_WINDOW = 30.0        # the direct client's bound on reconnecting for one write
STALL_WRITE_TIMEOUT = 40.0     # one request attempt waiting longer than this ends the client
SPEED_SWITCH_LEFT = 0.75       # mirror-speed lowered once this share of the data is left to send


def proxy_bin():
    return os.path.join(os.path.dirname(FLEXNBD), "flexnbd-proxy")


class ProxyProc(Server):
    """`flexnbd-proxy` listening on a UNIX socket, upstream 127.0.0.1:PORT."""

    def __init__(self, workdir, tag, upstream_port):
        super().__init__("flexnbd-proxy", "", workdir)
        self.port = upstream_port
        self.path = os.path.join(workdir, f"proxy-{tag}.sock")
        self.logpath = os.path.join(workdir, f"proxy-{tag}.log")

    def argv(self):
        return [proxy_bin(), "--addr", self.path, "--conn-addr", HOST, "--conn-port", str(self.port), "-v"]

    def wait_ready(self, timeout=20.0):
        """Ready once it logs `listening on PATH` (it connects upstream first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"flexnbd-proxy exited early ({self.popen.returncode}): {self.log_tail()}")
            try:
                with open(self.logpath, "rb") as f:
                    text = f.read().decode(errors="replace")
            except OSError:
                text = ""
            if f"listening on {self.path}" in text and os.path.exists(self.path):
                return
            time.sleep(0.005)
        raise RuntimeError(f"flexnbd-proxy not ready after {timeout} s: {self.log_tail()}")


class SupervisedServe(FlexProc):
    """The supervisor's `serve` of the migrated image, on the port the source had."""

    def __init__(self, image, workdir, tag, port, c=False):
        super().__init__("serve", image, workdir, f"{tag}-new", c=c)
        self.port = port

    def argv(self):
        return [C_FLEXNBD if self.c else FLEXNBD, "serve", "-l", HOST, "-p", str(self.port),
                "-f", self.image, "-v"]


def oldstyle_greeting(s):
    g = recv_exact(s, 152)
    if g[:8] != NBD_MAGIC or struct.unpack(">Q", g[8:16])[0] != OLDSTYLE_MAGIC:
        raise ConnectionError("not an oldstyle greeting")
    return struct.unpack(">Q", g[16:24])[0]


def greets(port, timeout=2.0):
    """True once a server on `port` accepts a connection and sends its greeting."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            oldstyle_greeting(s)
        return True
    except (OSError, ConnectionError):
        return False


class StallClient:
    """One NBD client writing 4 KiB at random aligned offsets, one request in flight:
    back-to-back (busy) or one write every IDLE_INTERVAL (idle). Each write is timed from
    its first send to its acknowledgement. With `unix`, it talks to the proxy and never
    reconnects (a cut is an error); otherwise it talks to 127.0.0.1:port and, when the
    connection fails, reconnects to the same address (every 1 ms, for at most
    RECONNECT_WINDOW) and sends the same write again."""

    def __init__(self, seed, busy, port=None, unix=None):
        self.seed, self.busy, self.port, self.unix = seed, busy, port, unix
        # (first send, latency s, attempts, first failure or None, reconnected or None)
        self.acked = []
        self.errors = []
        self.connects = 0
        self.end_reason = None
        self.stop = threading.Event()
        self.warm = threading.Event()
        self.deadline = time.perf_counter() + MIGRATION_TIMEOUT + 120.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _connect_once(self):
        if self.unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5.0)
            s.connect(self.unix)
        else:
            s = socket.create_connection((HOST, self.port), timeout=5.0)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            size = oldstyle_greeting(s)
        except BaseException:
            s.close()
            raise
        s.settimeout(STALL_WRITE_TIMEOUT)
        self.connects += 1
        return s, size

    def _reconnect(self):
        """Connect again (direct client only), retrying every 1 ms within RECONNECT_WINDOW."""
        until = time.perf_counter() + RECONNECT_WINDOW
        last = None
        while time.perf_counter() < until and not self.stop.is_set():
            try:
                return self._connect_once()[0]
            except (OSError, ConnectionError) as e:
                last = e
                time.sleep(0.001)
        raise ConnectionError(f"no server to reconnect to within {RECONNECT_WINDOW:.0f} s ({last!r})")

    def _run(self):
        s = None
        try:
            s, size = self._connect_once()
            rnd = random.Random(self.seed)
            payloads = [os.urandom(4096) for _ in range(64)]
            blocks = size // 4096
            handle = 0
            next_at = time.perf_counter()
            while not self.stop.is_set() and time.perf_counter() < self.deadline:
                if not self.busy:
                    # Pacing of the idle client, not synchronisation.
                    wait = next_at - time.perf_counter()
                    if wait > 0 and self.stop.wait(wait):
                        break
                    next_at = max(next_at + IDLE_INTERVAL, time.perf_counter())
                handle += 1
                off = rnd.randrange(blocks) * 4096
                msg = struct.pack(">IHHQQI", 0x25609513, 0, 1, handle, off, 4096) + payloads[handle % 64]
                t = time.perf_counter()
                attempts, failed_at, reconnected_at = 0, None, None
                while True:
                    attempts += 1
                    try:
                        if s is None:
                            s = self._reconnect()
                            reconnected_at = time.perf_counter()
                        s.sendall(msg)
                        magic, err, h = struct.unpack(">IIQ", recv_exact(s, 16))
                        break
                    except (OSError, ConnectionError) as e:
                        if self.unix or self.stop.is_set() or attempts > 100:
                            raise
                        if failed_at is None:
                            failed_at = time.perf_counter()
                        if s is not None:
                            s.close()
                        s = None
                        if "no server to reconnect" in str(e):
                            raise
                dt = time.perf_counter() - t
                if magic != 0x67446698 or h != handle:
                    raise RuntimeError(f"bad reply magic={magic:#x} handle={h} (sent {handle})")
                if err:
                    self.errors.append((t, dt, err))
                else:
                    self.acked.append((t, dt, attempts, failed_at, reconnected_at))
                if len(self.acked) >= 20:
                    self.warm.set()
            self.end_reason = "stopped" if self.stop.is_set() else "deadline"
        except (OSError, ConnectionError) as e:
            self.end_reason = f"connection ended: {e!r}"
        except Exception as e:
            self.end_reason = f"client error: {e!r}"
        finally:
            if s is not None:
                s.close()
            self.warm.set()


def make_stall_image(workdir):
    """64 MiB: 32 MiB of random data in 512 KiB extents scattered over the file, the rest holes."""
    path = os.path.join(workdir, "stall.raw")
    slots = list(range(STALL_IMAGE_SIZE // STALL_EXTENT))
    chosen = sorted(random.Random(16).sample(slots, STALL_DATA // STALL_EXTENT))
    with open(path, "wb") as f:
        f.truncate(STALL_IMAGE_SIZE)
        for slot in chosen:
            f.seek(slot * STALL_EXTENT)
            f.write(os.urandom(STALL_EXTENT))
    return path


def status_of(sock):
    """`flexnbd status` of a server as a dict (empty if it does not answer)."""
    try:
        r = subprocess.run([FLEXNBD, "status", "--sock", sock], capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return {}
    return dict(p.split("=", 1) for p in r.stdout.decode(errors="replace").split() if "=" in p)


# name, label, client busy?, `mirror` extra arguments, mid-sweep speed, C source, C destination, TLS
STALL_CASES = [
    ("idle", "idle (one write every 10 ms)", False, [], None, False, False, False),
    ("busy", "busy writer (back-to-back 4 KiB random writes)", True, [], None, False, False, False),
    ("speed10", "busy, `mirror --max-speed 10000000` (10 MB/s)", True, ["--max-speed", "10000000"],
     None, False, False, False),
    ("speed100", "busy, `mirror --max-speed 100000000` (100 MB/s)", True, ["--max-speed", "100000000"],
     None, False, False, False),
    ("speedchange", "busy, 100 MB/s lowered to 10 MB/s by `mirror-speed` during the sweep", True,
     ["--max-speed", "100000000"], 10000000, False, False, False),
    ("c_dest", "busy, C flexnbd destination (`listen`, then the supervisor's C `serve`)", True, [],
     None, False, True, False),
    ("tls", "busy, migration over TLS (`listen --tls-cert/--tls-key`, `mirror --tls-ca`)", True, [],
     None, False, False, True),
    ("c_source", "busy, C flexnbd source (`serve` and its `mirror`)", True, [], None, True, False, False),
]
STALL_PATHS = ("proxy", "direct")


def stall_run(ctx, case, path, rnd):
    """One hand-off with a client writing, through the proxy or directly; returns its measurements."""
    name, _, busy, mirror_extra, speed_to, c_source, c_dest, tls = case
    tag = f"stall-{name}-{path}{rnd}"
    src = os.path.join(ctx.workdir, f"src-{tag}.raw")
    dst = os.path.join(ctx.workdir, f"dst-{tag}.raw")
    subprocess.run(["cp", "--sparse=always", ctx.stall_image, src], check=True, timeout=120)
    with open(dst, "wb") as f:
        f.truncate(STALL_IMAGE_SIZE)
    subprocess.run(["sync", "-f", ctx.workdir], check=True, timeout=300)
    listen = FlexProc("listen", dst, ctx.workdir, tag, c=c_dest)
    if tls:
        listen.extra = ["--tls-cert", TLS.server_cert, "--tls-key", TLS.server_key]
    serve = FlexProc("serve", src, ctx.workdir, tag, c=c_source)
    proxy = sup = mirror = client = None
    mirror_log = os.path.join(ctx.workdir, f"mirror-{tag}.log")
    try:
        listen.start()
        serve.start()
        listen.wait_ready()
        serve.wait_ready()
        port = serve.port
        if path == "proxy":
            proxy = ProxyProc(ctx.workdir, tag, port)
            proxy.start()
            proxy.wait_ready()
            client = StallClient(rnd, busy, unix=proxy.path)
        else:
            client = StallClient(rnd, busy, port=port)
        client.thread.start()
        if not client.warm.wait(timeout=30) or not client.acked:
            raise RuntimeError(f"client did not get going: {client.end_reason}")
        time.sleep(max(0.0, STALL_WARMUP - (time.perf_counter() - client.acked[0][0])))
        if client.end_reason:
            raise RuntimeError(f"client stopped before mirror: {client.end_reason}")
        argv = [C_FLEXNBD if c_source else FLEXNBD, "mirror", "-s", serve.sock, "-l", HOST,
                "-p", str(listen.port), "-u"]
        if not c_source:
            argv += ["--wait"] + mirror_extra
        if tls:
            argv += ["--tls-ca", os.path.join(TLS.client_dir, "ca-cert.pem")]
        with open(mirror_log, "wb") as mlog:
            t0 = time.perf_counter()
            mirror = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=mlog, stderr=mlog,
                                      start_new_session=True)
        deadline = t0 + MIGRATION_TIMEOUT
        sup_ready = speed_at = last_restart_at = None
        port_retries = 0
        next_status = t0
        while True:
            now = time.perf_counter()
            if now > deadline:
                raise RuntimeError(f"hand-off not finished {MIGRATION_TIMEOUT:.0f} s after mirror")
            for p in (listen, serve):
                rc = p.poll()
                if rc not in (None, 0):
                    raise RuntimeError(f"{p.role} exited with {rc} during the migration")
            if listen.exit_time is not None and sup is None:
                # The supervisor: serve the migrated image on the source's port at once.
                sup_start = time.perf_counter()
                sup = SupervisedServe(dst, ctx.workdir, tag, port, c=c_dest)
                sup.start()
            if sup is not None and sup_ready is None:
                if sup.poll() is not None:
                    # It could not bind the port while the source still held it (the C
                    # flexnbd exits up to a second after the destination): start it again.
                    if (sup.popen.returncode != 0 and "in use" in sup.log_text()
                            and port_retries < 2000):
                        port_retries += 1
                        last_restart_at = time.perf_counter()
                        sup.stop()
                        with open(sup.logpath, "wb"):
                            pass  # a fresh log: the next attempt's "in use" is its own
                        sup = SupervisedServe(dst, ctx.workdir, tag, port, c=c_dest)
                        sup.start()
                        continue
                    raise RuntimeError(f"the supervisor's serve exited ({sup.popen.returncode}): "
                                       f"{sup.log_tail()}")
                if greets(port):
                    sup_ready = time.perf_counter()
            if mirror.poll() not in (None, 0):
                raise RuntimeError(f"flexnbd mirror exited with {mirror.returncode}")
            if speed_to and speed_at is None and serve.exit_time is None and now >= next_status:
                # Lower the speed once the sweep is under way (a quarter of the data sent).
                next_status = now + 0.02
                left = status_of(serve.sock).get("migration_bytes_left")
                if left is not None and left.isdigit() and 0 < int(left) <= SPEED_SWITCH_LEFT * STALL_DATA:
                    run_cmd([FLEXNBD, "mirror-speed", "--sock", serve.sock, "--max-speed", str(speed_to)],
                            timeout=10)
                    speed_at = time.perf_counter()
            if sup_ready is not None and serve.exit_time is not None and mirror.returncode is not None:
                break
            time.sleep(POLL)
        # The client goes on until it has written for STALL_WARMUP after the hand-off: after
        # the new serve greeted and after every write sent before that was answered.
        resume, seen = sup_ready, 0
        until = time.perf_counter() + STALL_WRITE_TIMEOUT + RECONNECT_WINDOW
        while time.perf_counter() < until and client.thread.is_alive():
            acked = client.acked[seen:]   # appended by the client thread, never changed
            seen += len(acked)
            for a in acked:
                if a[0] <= sup_ready:
                    resume = max(resume, a[0] + a[1])
            if acked and acked[-1][0] >= resume + STALL_WARMUP:
                break
            time.sleep(0.005)
        client.stop.set()
        client.thread.join(timeout=STALL_WRITE_TIMEOUT + 10)
        if client.thread.is_alive():
            raise RuntimeError("client still running after stop")
        if client.end_reason != "stopped":
            raise RuntimeError(f"client ended with {client.end_reason}")
        mout = open(mirror_log, "rb").read().decode(errors="replace").strip()
        m = re.search(r"clients were shut out for (\S+)", serve.log_text())
        after = [a for a in client.acked if a[0] >= t0]
        before = [a for a in client.acked if a[0] < t0]
        if not after:
            raise RuntimeError("no write acknowledged after mirror")
        lat = sorted(a[1] for a in after)
        worst = max(after, key=lambda a: a[1])
        # The hand-off write: the longest of those waiting at some point between the exit of
        # `listen` and the new serve's first greeting (then nothing served the port).
        handoff = max((a for a in after if a[0] <= sup_ready and a[0] + a[1] >= listen.exit_time),
                      key=lambda a: a[1], default=None)
        lockout_ms = parse_rust_duration(m.group(1)) if m else None
        res = {
            "max_write_ms": lat[-1] * 1000.0,
            "p99_write_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000.0,
            "p50_write_ms": lat[len(lat) // 2] * 1000.0,
            "writes": len(after),
            "max_write_before_mirror_ms": max(a[1] for a in before) * 1000.0 if before else None,
            "supervisor_ms": (sup_ready - listen.exit_time) * 1000.0,
            # Restarts of the supervisor's serve because the port was still in use, and the
            # time of the last of them from the exit of `listen`.
            "port_retries": port_retries,
            "port_wait_ms": (last_restart_at - listen.exit_time) * 1000.0 if last_restart_at else 0.0,
            "supervisor_exec_ms": (sup_start - listen.exit_time) * 1000.0,
            "lockout_ms": lockout_ms,
            "seconds": max(listen.exit_time, serve.exit_time) - t0,
            # Where the longest write sat, relative to the hand-off.
            "worst_sent_s": worst[0] - t0,
            "worst_is_handoff": worst is handoff,
            "listen_exit_to_source_exit_ms": (serve.exit_time - listen.exit_time) * 1000.0,
            # The hand-off write, split at the exit of `listen` and at the new serve's first greeting.
            "handoff_write_ms": handoff[1] * 1000.0 if handoff else None,
            "handoff_to_listen_exit_ms": (listen.exit_time - handoff[0]) * 1000.0 if handoff else None,
            "handoff_after_new_serve_ms": (handoff[0] + handoff[1] - sup_ready) * 1000.0 if handoff else None,
            "handoff_before_cut_ms": (handoff[3] - handoff[0]) * 1000.0 if handoff and handoff[3] else None,
            "max_other_write_ms": max((a[1] for a in after if a is not handoff), default=0.0) * 1000.0,
            "resent_writes": sum(1 for a in after if a[2] > 1),
            "connects": client.connects,
            "error_replies": len(client.errors),
            "speed_lowered_at_s": (speed_at - t0) if speed_at else None,
            "mirror_said": mout[-200:],
        }
        if speed_to and speed_at is None:
            res["note"] = "the sweep ended before mirror-speed could be issued"
        if proxy is not None:
            plog = proxy.log_tail()
            res["proxy_retry_waits"] = len(re.findall(r"retrying in", plog))
        res["over_goal"] = res["max_write_ms"] > HANDOFF_GOAL_MS + res["supervisor_ms"]
        return res
    except BaseException as e:
        logs = []
        for p in (serve, listen, sup, proxy):
            if p is not None:
                logs.append(f"--- {p.kind} log:\n" + p.log_tail())
        try:
            with open(mirror_log, "rb") as f:
                logs.append("--- mirror log:\n" + f.read()[-2000:].decode(errors="replace"))
        except OSError:
            pass
        if isinstance(e, Exception):
            raise RuntimeError(f"{e}\n" + "\n".join(logs)) from e
        raise
    finally:
        if client is not None:
            client.stop.set()
            client.thread.join(timeout=STALL_WRITE_TIMEOUT + 10)
        if mirror is not None and mirror.poll() is None:
            try:
                os.killpg(mirror.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            mirror.wait(timeout=5)
        for p in (proxy, sup, serve, listen):
            if p is not None:
                p.stop()
        for f in (src, dst, dst + ".INCOMPLETE"):
            if os.path.exists(f):
                os.unlink(f)


def stall_cases():
    """The cases this run measures (the C ones only with FLEXNBD_C_BIN)."""
    return [c for c in STALL_CASES if C_FLEXNBD or not (c[5] or c[6])]


def run_stalls(ctx, results, failures):
    ctx.stall_image = make_stall_image(ctx.workdir)
    TLS.make(ctx.workdir)
    for rnd in range(ctx.rounds):
        for case in stall_cases():
            for path in STALL_PATHS:
                key = f"{case[0]}/{path}"
                try:
                    res = stall_run(ctx, case, path, rnd + 1)
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    msg = f"round {rnd + 1} stall {key}: {e}"
                    log("FAILED " + msg[:3000])
                    failures.append(msg[:12000])
                    continue
                res["round"] = rnd + 1
                results.setdefault("stall", {}).setdefault(key, []).append(res)
                keys = ("max_write_ms", "p99_write_ms", "writes", "handoff_write_ms", "supervisor_ms",
                        "lockout_ms", "seconds", "handoff_after_new_serve_ms", "max_other_write_ms")
                shown = {k: (round(res[k], 1) if isinstance(res[k], float) else res[k]) for k in keys}
                log(f"round {rnd + 1}/{ctx.rounds} stall {key:20} {shown}")


# ---------------------------------------------------------------- refactor: this build vs the base

# build, Server kind: this build (FLEXNBD) and the base (FLEXNBD_BASE).
REFACTOR_BUILDS = (("this", "flexnbd"), ("base", "flexnbd-base"))
# The workloads of the rows of the same name, and the migration section's cases.
REFACTOR_WORKLOADS = [("nbdcopy", w_nbdcopy), ("randread", w_randread), ("randwrite", w_randwrite)]
REFACTOR_MIGRATIONS = [("plain", m_plain), ("writes", m_writes), ("tib", m_tib)]
# label, case, metric, unit, higher is better
REFACTOR_ROWS = [
    ("nbdcopy to null:, 1 GiB image (512 MiB data + 512 MiB hole)", "nbdcopy", "gbps", "GB/s", True),
    ("fio 4 KiB randread, 4 jobs x iodepth 16", "randread", "iops", "IOPS", True),
    ("fio 4 KiB randwrite, 4 jobs x iodepth 16", "randwrite", "iops", "IOPS", True),
    ("migration time, 1 GiB image, idle (`mirror` issued to both processes exited)", "plain", "seconds", "s",
     False),
    ("migration time, 1 GiB image, under writes", "writes", "seconds", "s", False),
    ("migration time, 1 TiB sparse file", "tib", "seconds", "s", False),
    ("clients shut out at the hand-off, under writes (the source's log: `clients were shut out for`)",
     "writes", "lockout_ms", "ms", False),
    ("clients shut out at the hand-off, idle (the source's log)", "plain", "lockout_ms", "ms", False),
    ("clients shut out per MiB left at the cut-off, under writes (runs with at least 64 KiB left)", "writes",
     "lockout_ms_per_mib_left", "ms/MiB", False),
]


def run_refactor(ctx, results, failures):
    """Every refactor case for this build and for the base, in the same rounds. Which build
    goes first alternates from case to case and from round to round, so neither always
    runs right after the image was written or after the other build warmed the cache."""
    R = results.setdefault("refactor", {})
    cases = ([(name, fn, False) for name, fn in REFACTOR_WORKLOADS]
             + [(name, fn, True) for name, fn in REFACTOR_MIGRATIONS])
    for rnd in range(ctx.rounds):
        for i, (name, fn, migration) in enumerate(cases):
            order = REFACTOR_BUILDS if (rnd + i) % 2 == 0 else REFACTOR_BUILDS[::-1]
            for build, kind in order:
                try:
                    if migration:
                        # The base binary plays serve, listen and mirror in its runs.
                        res = fn(ctx, rnd + 1, name=f"refactor-{build}-{name}",
                                 binary=FLEXNBD if build == "this" else FLEXNBD_BASE)
                        res.pop("t0", None)
                    else:
                        res = fn(ctx, kind)
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    msg = f"round {rnd + 1} refactor {name} {build}: {e}"
                    log("FAILED " + msg[:3000])
                    failures.append(msg[:12000])
                    continue
                res["round"] = rnd + 1
                R.setdefault(name, {}).setdefault(build, []).append(res)
                shown = {k: (round(res[k], 3) if isinstance(res[k], float) else res[k])
                         for k in ("gbps", "iops", "seconds", "lockout_ms", "identical") if k in res}
                log(f"round {rnd + 1}/{ctx.rounds} refactor {name:9} {build:4} {shown}")


def base_description():
    """What the base of the refactor rows was, for the report."""
    what = ("the build before the sans-IO hand-off core (`src/core/`) and the per-instance storage stack")
    if FLEXNBD_BASE_BIN:
        h = hashlib.sha256()
        with open(FLEXNBD_BASE, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return (f"the binary named by `FLEXNBD_BASE_BIN` (`{FLEXNBD_BASE}`, sha256 {h.hexdigest()[:16]}...), "
                f"not built by this run: it is meant to be a `scripts/build-release` build of commit "
                f"{REFACTOR_BASE}, {what}, but this run did not check which commit it came from")
    return (f"commit {REFACTOR_BASE}, {what}, built by this run with `scripts/build-release` from a "
            f"temporary worktree into `target/bench-base` (`FLEXNBD_BASE_BIN=PATH` names a ready binary "
            f"instead and skips that build)")


def refactor_section(ctx, info, results, failures, started, finished):
    """The "## Refactor" section of BENCHMARKS.md, as a list of lines."""
    R = results.get("refactor", {})

    def runs(case, build):
        return R.get(case, {}).get(build, [])

    def vals(case, build, metric):
        return [r[metric] for r in runs(case, build) if r.get(metric) is not None]

    def f(v, unit):
        return {"GB/s": f"{v:.2f}", "IOPS": f"{v / 1000:.1f}k", "s": f"{v:.3f}", "ms": f"{v:.2f}",
                "ms/MiB": f"{v:.1f}"}[unit]

    def cell(case, build, metric, unit):
        v = vals(case, build, metric)
        if v:
            return f"{f(med(v), unit)} {unit} ({f(min(v), unit)}–{f(max(v), unit)})"
        if not runs(case, build):
            return "not measured (no successful run, see the failures below)"
        return f"not measured (none of its {len(runs(case, build))} runs logged it)"

    L = ["## Refactor", ""]
    L.append(f"Does the refactor (the sans-IO hand-off core, the per-instance storage stack, the split of the "
             f"server's transmission code) make anything slower? This build against the build before it, both "
             f"measured in this run: measured on {started:%Y-%m-%d} ({started:%H:%M}-{finished:%H:%M} UTC) by "
             f"`bench/run.py{' --only refactor' if ctx.only == {'refactor'} else ''}`, {ctx.rounds} "
             f"round{'' if ctx.rounds == 1 else 's'}, "
             f"fio runtime {ctx.fio_runtime} s. Every round runs every case once for each build, a fresh server "
             f"(or `serve` + `listen` pair) per run; which build goes first alternates from case to case and "
             f"from round to round.")
    L.append("")
    L.append(f"- this build: commit {info['flexnbd_commit']}, `scripts/build-release` (static glibc), "
             f"{info['versions']['rustc']}")
    L.append(f"- base: {info.get('refactor_base') or base_description()}")
    L.append(f"- machine: {info['cpu']}, {info['nproc']} CPUs, {info['mem_gib']} GiB, kernel {info['kernel']}; "
             f"load average at start {info['loadavg_start']} (on a shared machine the absolute figures are "
             f"noisy: compare the ratios)")
    L.append("")
    L.append(f"Goal: every ratio **>= {REFACTOR_GOAL:.2f}**. Ratios are oriented so that >= 1.0 is as good or "
             f"better for this build: this ÷ base for throughput and IOPS, base ÷ this for times. Rows below "
             f"{REFACTOR_GOAL:.2f} are in bold. Medians over the runs, (min–max) beside them. The ratio is "
             f"that of the medians; \"per round\" is the same ratio for each round's pair of runs, which "
             f"ran within seconds of each other, so a round that the machine's load slowed shows as one "
             f"outlier there rather than as a shift of the medians.")
    L.append("")
    L.append("| measurement | this build | base | runs (this/base) | ratio | per round | goal | met |")
    L.append("|---|---|---|---|---|---|---|---|")
    below = []
    for label, case, metric, unit, hib in REFACTOR_ROWS:
        this_v, base_v = vals(case, "this", metric), vals(case, "base", metric)
        r = ratio(med(this_v), med(base_v), hib) if this_v and base_v else None
        if r is None:
            shown, met = "n/a", "n/a"
        elif r < REFACTOR_GOAL:
            shown, met = f"**{r:.2f}**", "**no**"
            below.append(label)
        else:
            shown, met = f"{r:.2f}", "yes"
        pairs = []
        base_by_round = {b["round"]: b.get(metric) for b in runs(case, "base")}
        for t in runs(case, "this"):
            pr = ratio(t.get(metric), base_by_round.get(t["round"]), hib)
            if pr is not None:
                pairs.append(f"{pr:.2f}")
        L.append(f"| {label} | {cell(case, 'this', metric, unit)} | {cell(case, 'base', metric, unit)} | "
                 f"{len(this_v)}/{len(base_v)} | {shown} | {', '.join(pairs) or 'n/a'} | "
                 f">= {REFACTOR_GOAL:.2f} | {met} |")
    L.append("")
    checked = []
    for build, _ in REFACTOR_BUILDS:
        done = [r for case, _ in REFACTOR_MIGRATIONS for r in runs(case, build)]
        same = sum(1 for r in done if r.get("identical"))
        checked.append(f"{build} build {same}/{len(done)}" if same == len(done)
                       else f"**{build} build {same}/{len(done)}**")
    L.append("Every migration's destination was compared with its source byte for byte afterwards "
             f"(identical: {', '.join(checked)}).")
    if below:
        L.append(f"Below {REFACTOR_GOAL:.2f} in this run: " + "; ".join(below) + ". The machine is noisy: "
                 "rerun before drawing a conclusion from a small difference.")
    L.append("")
    fails = [x for x in failures if failure_section(x) == "refactor"]
    if fails:
        L.append("### Failed refactor runs")
        L.append("")
        for x in fails:
            first, _, rest = x.partition("\n")
            L.append(f"- {first}")
            if rest:
                L.append("")
                L.append("```")
                L.extend(rest.splitlines())
                L.append("```")
        L.append("")
    L.append("### How the refactor rows are measured")
    L.append("")
    L.append("```sh")
    L.append("# this build: CARGO_TARGET_DIR=target/bench scripts/build-release")
    L.append(f"# base: FLEXNBD_BASE_BIN, else git worktree add --detach target/bench-base-src {REFACTOR_BASE} &&")
    L.append("#   CARGO_TARGET_DIR=target/bench-base target/bench-base-src/scripts/build-release")
    L.append("#   (the binary is copied to target/bench-base/flexnbd-base, the worktree removed)")
    L.append("# nbdcopy, randread, randwrite: the rows of the same name, with BIN = each build in turn")
    L.append("BIN serve -l 127.0.0.1 -p PORT -f FILE --handshake newstyle")
    L.append("nbdcopy nbd://127.0.0.1:PORT/ null:")
    L.append(" ".join(fio_argv("nbd://127.0.0.1:PORT/", "randread", ctx.fio_runtime)))
    L.append(" ".join(fio_argv("nbd://127.0.0.1:PORT/", "randwrite", ctx.fio_runtime))
             + "   # on a fresh cp --sparse=always copy")
    L.append("# migrations: the migration section's idle, under-writes and 1 TiB cases; BIN plays every part")
    L.append("BIN listen -l 127.0.0.1 -p 0 -f DEST -s DSOCK -v --oldstyle-extra-flags")
    L.append("BIN serve  -l 127.0.0.1 -p 0 -f SRC  -s SSOCK -v")
    L.append("BIN mirror -s SSOCK -l 127.0.0.1 -p DPORT   # timed from here to both processes exited")
    L.append("# shut-out: the source's log line `clients were shut out for DURATION`")
    L.append("# per MiB left: that shut-out over the source's `N bytes left at the cut-off` (runs with >= 64 KiB")
    L.append("#   left): how much is left depends on where the writer is at the cut-off, not on the build")
    L.append("```")
    L.append("")
    L.append("<details><summary>every refactor run</summary>")
    L.append("")
    L.append("| measurement | build | " + " | ".join(f"r{i + 1}" for i in range(ctx.rounds)) + " |")
    L.append("|---|---|" + "---|" * ctx.rounds)
    for label, case, metric, unit, _ in REFACTOR_ROWS:
        for build, _ in REFACTOR_BUILDS:
            by_round = {r["round"]: r for r in runs(case, build)}
            cells = []
            for i in range(1, ctx.rounds + 1):
                r = by_round.get(i)
                cells.append("failed" if r is None else
                             ("n/a" if r.get(metric) is None else f(r[metric], unit)))
            L.append(f"| {case} {metric} ({unit}) | {build} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("</details>")
    L.append("")
    return L


# ---------------------------------------------------------------- sim: the simulator's seeds per second

# The sweeps of the simulator section: key, label, first seed, end seed (excluded), threads.
SIM_SWEEPS = [
    ("20k-1t", "seeds 0..20000, 1 thread", 0, 20000, 1),
    ("20k-2t", "seeds 0..20000, 2 threads", 0, 20000, 2),
    # The seeds and threads of the default suite's unit test
    # sim::tests::two_thousand_seeded_migrations_keep_the_contract.
    ("2k-2t", "seeds 0..2000, 2 threads (the default test's sweep)", 0, 2000, 2),
]
SIM_TEST = "sim::tests::two_thousand_seeded_migrations_keep_the_contract"
# Rounds of the sim section unless --rounds says otherwise (each round is about a minute on 2 CPUs).
SIM_ROUNDS = 3
# Bound on one sweep: 20000 seeds take well under a minute on one loaded CPU.
SIM_TIMEOUT = 900
SIM_LAST_LINE = re.compile(r"^(\d+) seeds in ([0-9.]+) s \((\d+) seeds/s\), (\d+) events, (\d+) failed$")


def sim_binary():
    """flexnbd-sim from the same release build as FLEXNBD (scripts/build-release builds every binary)."""
    return os.path.join(os.path.dirname(FLEXNBD), "flexnbd-sim")


def check_sim_binary():
    path = sim_binary()
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise RuntimeError(f"the sim section expected the release flexnbd-sim beside {FLEXNBD} (scripts/build-release "
                           f"builds it there), but {path} is not an executable file; run without --skip-build")


def sim_argv(first, end, threads):
    # --max-failures at the seed count: a broken build still runs every seed, so the
    # failure count is the whole sweep's and the time is comparable.
    return [sim_binary(), "--seeds", f"{first}..{end}", "--threads", str(threads),
            "--max-failures", str(end - first)]


def sim_sweep(ctx, first, end, threads):
    """One sweep of the release simulator: wall time from exec to exit (this process's
    clock), the binary's own summary line, its CPU time and any failing seeds."""
    import resource
    out_path = os.path.join(ctx.workdir, "sim.out")
    argv = sim_argv(first, end, threads)
    with open(out_path, "wb") as out:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=SIM_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
            raise RuntimeError(f"{' '.join(argv)}: expected it to finish within {SIM_TIMEOUT} s; killed")
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out_path, "rb") as f:
        text = f.read().decode(errors="replace")
    os.unlink(out_path)
    lines = text.splitlines()
    m = SIM_LAST_LINE.match(lines[-1]) if lines else None
    if m is None or rc not in (0, 1):
        raise RuntimeError(f"{' '.join(argv)}: expected exit status 0 or 1 and a last line "
                           f"'N seeds in S s (R seeds/s), E events, F failed'; got status {rc} and "
                           f"{text[-1500:]!r}")
    seeds, self_s, _, events, failed = int(m[1]), float(m[2]), int(m[3]), int(m[4]), int(m[5])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if seeds != end - first:
        raise RuntimeError(f"{' '.join(argv)}: expected {end - first} seeds run, the binary reported {seeds}")
    failed_seeds = [int(x) for x in re.findall(r"^FAILED seed (\d+):", text, re.M)]
    return {
        "seeds": seeds,
        "threads": threads,
        "wall_s": wall,
        "seeds_per_s": seeds / wall,
        "events": events,
        "events_per_s": events / wall,
        "cpu_s": cpu,
        # Less sensitive to other work on a shared machine than seeds/s: what a seed costs.
        "seeds_per_cpu_s": seeds / cpu if cpu > 0 else None,
        # How many CPUs the sweep got on average: on a shared machine, 2 threads get 2 only when free.
        "cpus_used": cpu / wall,
        "self_s": self_s,
        "failed": failed,
        "failed_seeds": failed_seeds,
        "failure_text": "\n".join(l for l in lines if l.startswith(("FAILED seed", "  ")))[:8000],
        "rc": rc,
    }


def run_sim(ctx, results, failures):
    """Every sweep once a round; the order rotates from round to round, so no sweep always
    runs first (after the build) or last."""
    S = results.setdefault("sim", {})
    for rnd in range(ctx.sim_rounds):
        shift = rnd % len(SIM_SWEEPS)
        for key, label, first, end, threads in SIM_SWEEPS[shift:] + SIM_SWEEPS[:shift]:
            try:
                res = sim_sweep(ctx, first, end, threads)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                msg = f"round {rnd + 1} sim {key}: {e}"
                log("FAILED " + msg[:3000])
                failures.append(msg[:12000])
                continue
            res["round"] = rnd + 1
            S.setdefault(key, []).append(res)
            if res["failed"] or res["rc"] != 0:
                # The figures stand (every seed ran), but the run failed: the contract broke.
                msg = (f"round {rnd + 1} sim {key}: expected 0 failed seeds, {res['failed']} of "
                       f"{res['seeds']} failed (exit status {res['rc']}): seeds "
                       f"{', '.join(str(s) for s in res['failed_seeds'])}\n{res['failure_text']}")
                log("FAILED " + msg[:3000])
                failures.append(msg[:12000])
            log(f"round {rnd + 1}/{ctx.sim_rounds} sim {key:6} wall {res['wall_s']:.2f} s, "
                f"{res['seeds_per_s']:.0f} seeds/s, {res['events_per_s'] / 1e6:.2f} M events/s, "
                f"cpu {res['cpu_s']:.2f} s ({res['cpus_used']:.2f} CPUs), {res['failed']} failed")


def sim_section(ctx, info, results, failures, started, finished):
    """The "## Simulator" section of BENCHMARKS.md, as a list of lines."""
    S = results.get("sim", {})

    def vals(key, metric):
        return [r[metric] for r in S.get(key, []) if r.get(metric) is not None]

    def cell(key, metric, form):
        v = vals(key, metric)
        if not v:
            return "not measured"
        return f"{form(med(v))} ({form(min(v))}–{form(max(v))})"

    def secs(v):
        return f"{v:.2f}"

    def rate(v):
        return f"{v:.0f}"

    def mev(v):
        return f"{v / 1e6:.2f}"

    rounds = ctx.sim_rounds
    L = ["## Simulator", ""]
    L.append(f"How many seeds a second the deterministic simulator (`src/sim/`, `docs/simulator.md`) runs; "
             f"each seed is one whole migration under its own faults, on virtual time. Measured on "
             f"{started:%Y-%m-%d} ({started:%H:%M}-{finished:%H:%M} UTC) by "
             f"`bench/run.py{' --only sim' if ctx.only == {'sim'} else ''}`, {rounds} "
             f"round{'' if rounds == 1 else 's'}; every round runs each sweep once (a fresh `flexnbd-sim` "
             f"process per sweep), the order of the sweeps rotating from round to round.")
    L.append("")
    L.append(f"- build: commit {info['flexnbd_commit']}, `flexnbd-sim` from `scripts/build-release` "
             f"(static glibc, the release profile), {info['versions']['rustc']}")
    L.append(f"- machine: {info['cpu']}, {info['nproc']} CPUs, {info['mem_gib']} GiB, kernel {info['kernel']}; "
             f"load average at the start of the run {info['loadavg_start']}, at the end of this section "
             f"{getattr(ctx, 'sim_load_end', '?')} (a shared machine: other work ran at the same time, so "
             f"the absolute figures are noisy)")
    L.append("")
    L.append("Medians over the runs, (min–max) beside them. Wall time is from exec to exit, taken by "
             "`run.py`; seeds/s and events/s divide the seeds and the events the binary reports by it. CPU "
             "time is the process's user + system time; seeds per CPU second is what a seed costs, whatever "
             "else the machine ran; CPUs used (CPU time ÷ wall time) shows how much of the machine the "
             "sweep got: 2 threads run at 2 seeds at a time only while both CPUs are free.")
    L.append("")
    L.append("| sweep | wall time (s) | seeds/s | events/s (millions) | CPU time (s) | seeds per CPU second "
             "| CPUs used | failed seeds | runs |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for key, label, first, end, threads in SIM_SWEEPS:
        runs = S.get(key, [])
        failed = vals(key, "failed")
        if not runs:
            fcell = "n/a"
        elif any(failed):
            fcell = "**" + ", ".join(f"r{r['round']}: {r['failed']}" for r in runs) + "**"
        else:
            fcell = f"0 in {'every run' if len(runs) > 1 else 'the run'}"
        L.append(f"| {label} | {cell(key, 'wall_s', secs)} | {cell(key, 'seeds_per_s', rate)} | "
                 f"{cell(key, 'events_per_s', mev)} | {cell(key, 'cpu_s', secs)} | "
                 f"{cell(key, 'seeds_per_cpu_s', rate)} | {cell(key, 'cpus_used', secs)} | {fcell} | "
                 f"{len(runs)}/{rounds} |")
    L.append("")
    one, two = vals("20k-1t", "seeds_per_s"), vals("20k-2t", "seeds_per_s")
    if one and two:
        L.append(f"2 threads ÷ 1 thread, seeds/s (medians): {med(two) / med(one):.2f} (the machine's "
                 f"{info['nproc']} CPUs were shared with other work).")
    # A seed replays exactly whichever thread runs it, so every run of the same seeds
    # should count the same events; a difference is worth a reader's attention.
    by_seeds = {}
    for key, _, first, end, _ in SIM_SWEEPS:
        for r in S.get(key, []):
            by_seeds.setdefault((first, end), set()).add((key, r["round"], r["events"]))
    for (first, end), seen in sorted(by_seeds.items()):
        counts = sorted({e for _, _, e in seen})
        if len(counts) == 1:
            runs = f"each of its {len(seen)} runs" if len(seen) > 1 else "its one run"
            L.append(f"Events in seeds {first}..{end}: {counts[0]} in {runs}, whatever the thread count "
                     f"(each seed replays exactly).")
        else:
            L.append(f"**Events in seeds {first}..{end} differed between runs** (each seed should replay "
                     f"exactly): " + ", ".join(f"{k} r{rnd}: {e}" for k, rnd, e in sorted(seen)) + ".")
    test = vals("2k-2t", "wall_s")
    if test:
        _, _, first, end, threads = next(sw for sw in SIM_SWEEPS if sw[0] == "2k-2t")
        L.append(f"The default suite (`cargo test`, `scripts/test`) runs seeds {first}..{end} on {threads} threads "
                 f"as the "
                 f"debug-build unit test `{SIM_TEST}`: with the release binary that sweep took "
                 f"{med(test):.2f} s (median; {min(test):.2f}–{max(test):.2f}). The debug test is slower "
                 f"(unoptimised code); this bench does not build or time the debug build.")
    if any(not S.get(key) for key, *_ in SIM_SWEEPS):
        L.append("A sweep with no successful run says \"not measured\": see the failures below.")
    L.append("")
    fails = [x for x in failures if failure_section(x) == "sim"]
    if fails:
        L.append("### Failed simulator runs")
        L.append("")
        for x in fails:
            first_line, _, rest = x.partition("\n")
            L.append(f"- {first_line}")
            if rest:
                L.append("")
                L.append("```")
                L.extend(rest.splitlines())
                L.append("```")
                L.append("")
        if L[-1]:
            L.append("")
    L.append("### How the simulator is measured")
    L.append("")
    L.append("```sh")
    L.append("CARGO_TARGET_DIR=target/bench scripts/build-release   # builds flexnbd-sim beside flexnbd")
    L.append("SIM=target/bench/HOST/release/flexnbd-sim")
    for key, label, first, end, threads in SIM_SWEEPS:
        L.append(" ".join(["$SIM"] + sim_argv(first, end, threads)[1:]) + f"   # {key}")
    L.append("# --max-failures at the seed count: every seed runs even when some fail")
    L.append("# wall: exec to exit; seeds/s = seeds / wall; events/s = the events of the binary's last line")
    L.append("#   ('N seeds in S s (R seeds/s), E events, F failed') / wall; CPU: getrusage of the reaped child;")
    L.append("#   seeds per CPU second = seeds / CPU; CPUs used = CPU / wall")
    L.append("# a run with F > 0 is a failure of the run; its FAILED lines name the seeds, each replays with")
    L.append("#   scripts/sim --seeds SEED --trace")
    L.append("```")
    L.append("")
    L.append("<details><summary>every simulator run</summary>")
    L.append("")
    L.append("| round | sweep | wall (s) | seeds/s | events/s (millions) | CPU (s) | CPUs used "
             "| the binary's own time (s) | failed |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for rnd in range(1, rounds + 1):
        for key, label, first, end, threads in SIM_SWEEPS:
            r = next((r for r in S.get(key, []) if r["round"] == rnd), None)
            if r is None:
                L.append(f"| {rnd} | {key} | failed | | | | | | |")
                continue
            L.append(f"| {rnd} | {key} | {r['wall_s']:.2f} | {r['seeds_per_s']:.0f} | "
                     f"{r['events_per_s'] / 1e6:.2f} | {r['cpu_s']:.2f} | {r['cpus_used']:.2f} | "
                     f"{r['self_s']:.1f} | {r['failed']} |")
    L.append("")
    L.append("</details>")
    L.append("")
    return L


# The sections that `--only` can rewrite in place, with their headings' names.
SECTIONS = {"migration": "Migration", "stall": "Stall", "refactor": "Refactor",
            "sim": "Simulator", "wan": "WAN"}
# Sections only --only runs (a full run keeps what the report already has):
# WAN needs root and takes about 15 minutes (bench/wan.py); Resume is
# bench/resume.py's alone.
KEPT_SECTIONS = ("## WAN", "## Resume")


def wan_module():
    """bench/wan.py, sharing this module's state (the binary build() chose,
    the servers stop_all() ends): it imports `run`, which must be this module
    even when this file runs as __main__."""
    sys.modules.setdefault("run", sys.modules[__name__])
    import wan
    return wan


def failure_section(msg):
    """The workload or section a failure message ("round N NAME ...") belongs to."""
    m = re.match(r"round \d+ (\S+) ", msg)
    return m.group(1) if m else None


PEERS = ["qemu-nbd", "nbdkit", "nbd-server"]
INERT_PLAN = "server.reply_send.trim#1000000000=close"
MAIN = ["flexnbd"] + PEERS
WITH_OLD = ["flexnbd", "flexnbd-oldstyle"] + PEERS
COLD = ["flexnbd", "qemu-nbd-direct", "nbdkit"]
# TLS rows: every server with STARTTLS (required), and our plaintext
# newstyle in the same run for the cost of TLS itself.
TLS_SERVERS = ["flexnbd-tls", "qemu-nbd-tls", "nbdkit-tls", "flexnbd"]
TLS_ROWS = ("tlsseq", "tlsrand")


def ours_kind(name):
    """The flexnbd variant a row's ratios are taken from."""
    return "flexnbd-tls" if name in TLS_ROWS else "flexnbd"


# name, title, function, servers, metric, unit, higher_is_better
WORKLOADS = [
    ("nbdcopy", "Sequential read: nbdcopy to null:", w_nbdcopy, WITH_OLD, "gbps", "GB/s", True),
    ("qemu-img", "Sequential read: qemu-img convert to a raw file", w_qemu_img, MAIN, "gbps", "GB/s", True),
    ("randread", "fio 4 KiB randread, 4 jobs x iodepth 16", w_randread, MAIN, "iops", "IOPS", True),
    ("randwrite", "fio 4 KiB randwrite, 4 jobs x iodepth 16", w_randwrite, MAIN, "iops", "IOPS", True),
    # TLS (STARTTLS, x509): the same clients and workloads over nbds://.
    ("tlsseq", "TLS sequential read: nbdcopy nbds:// to null:", w_nbdcopy, TLS_SERVERS, "gbps", "GB/s", True),
    ("tlsrand", "TLS fio 4 KiB randread, 4 jobs x iodepth 16, nbds://", w_randread, TLS_SERVERS,
     "iops", "IOPS", True),
    ("startup", "Start-up: exec to first successful 4 KiB read, 1 TiB sparse file", w_startup, WITH_OLD, "ms", "ms", False),
    # Cold storage: a 1 GiB random image, its pages dropped before each run
    # and every server in a memory cgroup capped at 64 MiB (qemu-nbd
    # bypasses the page cache with O_DIRECT).
    ("coldread", "Cold cache: fio 4 KiB randread, 4 jobs x iodepth 16, 1 GiB image, page cache capped at 64 MiB",
     w_cold_randread, COLD, "iops", "IOPS", True),
    ("coldseq", "Cold cache: sequential read, nbdcopy to null:, 1 GiB image, page cache capped at 64 MiB",
     w_cold_nbdcopy, COLD, "gbps", "GB/s", True),
    ("null", "Protocol ceiling: fio 4 KiB randread; flexnbd on a 1 GiB hole vs nbdkit null and memory",
     w_null, ["flexnbd", "nbdkit-null", "nbdkit-memory"], "iops", "IOPS", True),
    # The cost of the fault-injection seams: the same binary with no plan
    # (production: the probe is a no-op the compiler removes) and with a plan
    # that never fires (every step is looked up in the plan).
    ("faultcost", "Fault seams: fio 4 KiB randread with no fault plan vs an inert plan (ratio = no plan / plan)",
     w_randread, ["flexnbd", "flexnbd-faultplan"], "iops", "IOPS", True),
    # The cost of the storage seam (every image read, write and sync goes
    # through `ImageStore`): this build against the build from just before
    # the seam, on the two workloads that touch the store the most.
    ("seamread", "Storage seam: fio 4 KiB randread, this build vs the build before the seam (ratio = this / before)",
     w_randread, ["flexnbd", "flexnbd-preseam"], "iops", "IOPS", True),
    ("seamwrite", "Storage seam: fio 4 KiB randwrite, this build vs the build before the seam (ratio = this / before)",
     w_randwrite, ["flexnbd", "flexnbd-preseam"], "iops", "IOPS", True),
]
# The last commit before the storage seam (src/store/backend.rs).
SEAM_BASE = "e298d77"
SEAM_ROWS = ("seamread", "seamwrite")
FLEXNBD_PRESEAM = None
# The refactor rows (`--only refactor`, "## Refactor"): this build against the
# build before the sans-IO hand-off core (src/core/) and the per-instance
# storage stack, both measured in the same run. REFACTOR_BASE is that commit,
# built like SEAM_BASE unless FLEXNBD_BASE_BIN names a ready binary of it.
REFACTOR_BASE = "b1ff616"
FLEXNBD_BASE_BIN = os.environ.get("FLEXNBD_BASE_BIN") or None
FLEXNBD_BASE = None            # the base binary this run uses (build_base)
# Every refactor ratio should stay at or above this (>= 1 is better for this build).
REFACTOR_GOAL = 0.95
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
    """The release build operators get: scripts/build-release (static glibc)."""
    global FLEXNBD
    log(f"building flexnbd (release, scripts/build-release) into {TARGET_DIR}")
    env = dict(os.environ, CARGO_TARGET_DIR=TARGET_DIR)
    out = subprocess.run([os.path.join(REPO, "scripts", "build-release")], cwd=REPO, env=env, check=True,
                         timeout=1800, stdout=subprocess.PIPE, text=True)
    FLEXNBD = os.path.join(out.stdout.strip().splitlines()[-1], "flexnbd")
    if not os.path.isabs(FLEXNBD):
        FLEXNBD = os.path.join(REPO, FLEXNBD)
    if not os.access(FLEXNBD, os.X_OK):
        raise RuntimeError(f"no binary at {FLEXNBD}")


def build_commit(commit, name, why):
    """The release build of `commit`, from a temporary worktree, with the same
    script and flags as ours, in its own target directory (target/bench-NAME);
    returns the path of its flexnbd, copied out as target/bench-NAME/flexnbd-NAME."""
    tree = os.path.join(REPO, "target", f"bench-{name}-src")
    subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=REPO, capture_output=True)
    subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)
    subprocess.run(["git", "worktree", "add", "--detach", tree, commit], cwd=REPO, check=True,
                   capture_output=True, timeout=120)
    try:
        log(f"building the {name} flexnbd ({commit}) for {why}")
        target = os.path.join(REPO, "target", f"bench-{name}")
        env = dict(os.environ, CARGO_TARGET_DIR=target)
        out = subprocess.run([os.path.join(tree, "scripts", "build-release")], cwd=tree, env=env, check=True,
                             timeout=1800, stdout=subprocess.PIPE, text=True)
        built = os.path.join(out.stdout.strip().splitlines()[-1], "flexnbd")
        if not os.path.isabs(built):
            built = os.path.join(tree, built)
        # Keep the binary outside the worktree, which is removed below.
        copy = os.path.join(target, f"flexnbd-{name}")
        shutil.copy2(built, copy)
        return copy
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=REPO, capture_output=True)


def build_preseam():
    """The release build of SEAM_BASE (target/bench-preseam/flexnbd-preseam)."""
    global FLEXNBD_PRESEAM
    FLEXNBD_PRESEAM = build_commit(SEAM_BASE, "preseam", "the storage-seam rows")


def build_base():
    """The base of the refactor rows: FLEXNBD_BASE_BIN when set (nothing is built),
    else the release build of REFACTOR_BASE (target/bench-base/flexnbd-base)."""
    global FLEXNBD_BASE
    if FLEXNBD_BASE_BIN:
        if not (os.path.isfile(FLEXNBD_BASE_BIN) and os.access(FLEXNBD_BASE_BIN, os.X_OK)):
            raise RuntimeError(f"FLEXNBD_BASE_BIN should name an executable flexnbd binary; "
                               f"{FLEXNBD_BASE_BIN!r} is not an executable file")
        FLEXNBD_BASE = os.path.abspath(FLEXNBD_BASE_BIN)
        log(f"refactor rows: base build is FLEXNBD_BASE_BIN={FLEXNBD_BASE} (not built here)")
        return
    FLEXNBD_BASE = build_commit(REFACTOR_BASE, "base", "the refactor rows")


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


def c_rows(M, stat_row, ident_row):
    """Rows of the migrations between ours and the C flexnbd (the "under writes" case)."""
    L = []
    for name, way in (("to_c", "ours → C listen"), ("from_c", "C serve → our listen")):
        if not M.get(name):
            continue
        L.append(stat_row(f"{way}, under writes: migration time", name, "seconds", "s"))
        if name == "to_c":
            L.append(stat_row(f"{way}, under writes: clients shut out at the hand-off (our source's log)",
                              name, "lockout_ms", "ms", goal=f"< {STALL_GOAL_MS:.0f} ms"))
        else:
            L.append(stat_row(f"{way}, under writes: until the destination exited (the C source exits "
                              "up to 1 s later)", name, "dest_done_s", "s"))
        L.append(stat_row(f"{way}, under writes: longest acknowledged 4 KiB write", name, "max_write_ms", "ms"))
        L.append(stat_row(f"{way}, under writes: the unacknowledged write at the cut, send to cut",
                          name, "unacked_wait_ms", "ms"))
        L.append(stat_row(f"{way}, under writes: writes acknowledged between `mirror` and the cut", name,
                          "writes_during_migration", "writes"))
        L.append(ident_row(f"{way}, under writes: destination identical to the (written) source", name))
    return L


def c_ratio_row(M, yesno):
    """Ours against the C flexnbd as the source, both measured in this run: the "under writes"
    case until our destination exited, with the C source (from_c) ÷ with ours. Until the
    destination exited, not until both did, because the C source polls and exits up to a
    second after the migration is over."""
    label = ("vs C flexnbd, under writes: until the destination exited, `C serve → our listen` ÷ ours "
             "(same image, writer and destination; only the source differs)")
    c_s = med([r["dest_done_s"] for r in M.get("from_c", []) if r.get("dest_done_s") is not None])
    ours_s = med([r["dest_done_s"] for r in M.get("writes", []) if r.get("dest_done_s") is not None])
    if c_s is None or ours_s is None:
        why = ("not measured (`FLEXNBD_C_BIN` not set)" if not C_FLEXNBD
               else "not measured (no successful run of one of the two cases, see below)")
        return f"| {label} | {why} | | | 0 | >= 1.0 | n/a |"
    r = ratio(ours_s, c_s, higher_is_better=False)
    return (f"| {label} | {fmt_ratio(r)} ({c_s:.3f} s ÷ {ours_s:.3f} s) | | | "
            f"{len(M['from_c'])} | >= 1.0 | {yesno(None if r is None else r >= 1.0)} |")


def migration_section(ctx, info, results, failures, started, finished):
    """The "## Migration" section of BENCHMARKS.md, as a list of lines."""
    M = results.get("migration", {})

    def vals(name, key):
        return [r[key] for r in M.get(name, []) if r.get(key) is not None]

    def stat_row(label, name, key, unit, scale=1.0, goal="", met=""):
        v = [x * scale for x in vals(name, key)]
        if not v:
            return f"| {label} | n/a | | | 0 | {goal} | {met} |"
        f = {"s": lambda x: f"{x:.3f}", "ms": lambda x: f"{x:.2f}",
             "writes": lambda x: f"{x:.0f}"}.get(unit, lambda x: f"{x:.1f}")
        return (f"| {label} | {f(med(v))} {unit} | {f(min(v))} | {f(max(v))} | {len(v)} | {goal} | {met} |")

    def yesno(ok):
        return "n/a" if ok is None else ("yes" if ok else "**no**")

    def ident_row(label, name):
        runs = M.get(name, [])
        same = sum(1 for r in runs if r.get("identical"))
        return (f"| {label} | {same}/{len(runs)} runs | | | {len(runs)} | all | "
                f"{yesno(same == len(runs) if runs else None)} |")

    plain_s = med(vals("plain", "seconds"))
    worst_stall = max(vals("writes", "max_write_ms"), default=None)
    n_runs = {k: len(M.get(k, [])) for k in ("plain", "writes", "tib")}
    ident = {k: sum(1 for r in M.get(k, []) if r.get("identical")) for k in n_runs}
    L = ["## Migration", ""]
    L.append(f"Measured on {started:%Y-%m-%d} ({started:%H:%M}-{finished:%H:%M} UTC) by "
             f"`bench/run.py{' --only migration' if ctx.only == {'migration'} else ''}`, {ctx.rounds} runs of each "
             f"case (a fresh `serve` + `listen` pair per run); flexnbd commit {info['flexnbd_commit']}; "
             f"load average at start {info['loadavg_start']} on {info['nproc']} CPUs. Medians; min and max "
             "over the runs. " + ("The C flexnbd was run in the rows that name it (`FLEXNBD_C_BIN`)."
                                  if M.get("to_c") or M.get("from_c") else
                                  "The C flexnbd was **not** run here, so no row has a figure for it."))
    L.append("")
    L.append("| measurement | median | min | max | runs | goal | met |")
    L.append("|---|---|---|---|---|---|---|")
    L.append(stat_row("1 GiB image, idle: migration time (`mirror` issued to both processes exited)",
                      "plain", "seconds", "s", goal=f"< {MIGRATION_GOAL_S:.0f} s",
                      met=yesno(None if plain_s is None else plain_s < MIGRATION_GOAL_S)))
    L.append(stat_row("1 GiB image, idle: destination allocated after migration (source: 512 MiB data + 512 MiB hole)",
                      "plain", "dst_alloc_mib", "MiB", goal="~512 MiB (sparse)",
                      met=yesno(None if not vals("plain", "dst_alloc_mib")
                                else max(vals("plain", "dst_alloc_mib")) < 600)))
    L.append(f"| 1 GiB image, idle: destination identical to source | {ident['plain']}/{n_runs['plain']} runs "
             f"| | | {n_runs['plain']} | all | {yesno(ident['plain'] == n_runs['plain'] if n_runs['plain'] else None)} |")
    L.append(stat_row("under writes: longest acknowledged 4 KiB write (whole connection, from before `mirror` to the cut)",
                      "writes", "max_write_ms", "ms", goal=f"<= {STALL_GOAL_MS:.0f} ms in every run",
                      met=yesno(None if worst_stall is None else worst_stall <= STALL_GOAL_MS)))
    L.append(stat_row("under writes: p99 write latency (acknowledged writes, whole connection)",
                      "writes", "p99_write_ms", "ms"))
    L.append(stat_row("baseline: longest write in the >= 0.5 s of writes before `mirror` (no migration yet)",
                      "writes", "max_write_before_mirror_ms", "ms"))
    L.append(stat_row("under writes: p50 write latency", "writes", "p50_write_ms", "ms"))
    L.append(stat_row("under writes: the unacknowledged write in flight when the hand-off cut the connection: "
                      "time from its send to the cut", "writes", "unacked_wait_ms", "ms"))
    L.append(stat_row("under writes: clients shut out at the hand-off (the source's log: `clients were shut out for`)",
                      "writes", "lockout_ms", "ms", goal=f"< {STALL_GOAL_MS:.0f} ms"))
    L.append(stat_row("idle: clients shut out at the hand-off (source's log)", "plain", "lockout_ms", "ms"))
    L.append(stat_row("under writes: migration time", "writes", "seconds", "s"))
    L.append(stat_row("under writes: writes acknowledged between `mirror` and the cut", "writes",
                      "writes_during_migration", "writes"))
    L.append(f"| under writes: destination identical to the (written) source | {ident['writes']}/{n_runs['writes']} "
             f"runs | | | {n_runs['writes']} | all | "
             f"{yesno(ident['writes'] == n_runs['writes'] if n_runs['writes'] else None)} |")
    if M.get("to_c") or M.get("from_c"):
        L.extend(c_rows(M, stat_row, ident_row))
    L.append(c_ratio_row(M, yesno))
    L.append(stat_row("1 TiB sparse file: migration time", "tib", "seconds", "s"))
    L.append(stat_row("1 TiB sparse file: peak RSS of the source (`serve`)", "tib", "src_rss_kib", "MiB", 1 / 1024))
    L.append(stat_row("1 TiB sparse file: peak RSS of the destination (`listen`)", "tib", "dst_rss_kib", "MiB", 1 / 1024))
    L.append(stat_row("1 TiB sparse file: destination allocated after migration", "tib", "dst_alloc_mib", "MiB"))
    L.append(f"| 1 TiB sparse file: destination identical to source | {ident['tib']}/{n_runs['tib']} runs | | | "
             f"{n_runs['tib']} | all | {yesno(ident['tib'] == n_runs['tib'] if n_runs['tib'] else None)} |")
    L.append(stat_row("1 GiB image, idle: peak RSS of the source", "plain", "src_rss_kib", "MiB", 1 / 1024))
    L.append(stat_row("1 GiB image, idle: peak RSS of the destination", "plain", "dst_rss_kib", "MiB", 1 / 1024))
    L.append("")
    mig_fail = [f for f in failures if failure_section(f) == "migration"]
    if mig_fail:
        L.append("### Failed migration runs")
        L.append("")
        for f in mig_fail:
            first, _, rest = f.partition("\n")
            L.append(f"- {first}")
            if rest:
                L.append("")
                L.append("```")
                L.extend(rest.splitlines())
                L.append("```")
        L.append("")
    L.append("### How it is measured")
    L.append("")
    L.append("```sh")
    L.append("# per run: a fresh sparse destination of the source's size, then")
    L.append("target/bench/release/flexnbd listen -l 127.0.0.1 -p 0 -f DEST -s DSOCK -v --oldstyle-extra-flags   # ready: logs `listening on`, DSOCK exists, `allocation map built`")
    L.append("target/bench/release/flexnbd serve  -l 127.0.0.1 -p 0 -f SRC  -s SSOCK -v   # oldstyle (the default)")
    L.append("target/bench/release/flexnbd mirror -s SSOCK -l 127.0.0.1 -p DPORT       # timed from here ...")
    L.append("#   ... to both serve and listen having exited 0 (reaped with wait4, polled every 1 ms, at most "
             f"{MIGRATION_TIMEOUT:.0f} s)")
    L.append("# then, untimed: allocated size (st_blocks) of DEST; compare SRC and DEST byte for byte over the")
    L.append("#   union of their data extents (SEEK_DATA/SEEK_HOLE; outside it both are holes)")
    L.append("# cases: SRC = the 1 GiB image (512 MiB random + 512 MiB hole), read-only;")
    L.append("#        SRC = cp --sparse=always of it, with a writer (below);  SRC = the 1 TiB sparse file")
    L.append("# writer: a raw-socket client in run.py, one persistent connection to serve: the 152-byte oldstyle")
    L.append("#   greeting, then back-to-back NBD_CMD_WRITE of 4 KiB at uniformly random 4 KiB-aligned offsets")
    L.append("#   (one request in flight), each timed from send to reply; it runs for >= 0.5 s (and >= 200")
    L.append("#   acknowledged writes) before `mirror` and then until the hand-off cuts its connection")
    L.append("# with FLEXNBD_C_BIN: the \"under writes\" case again with the C flexnbd as listen (to_c) or as")
    L.append("#   serve and mirror (from_c), same flags but no --oldstyle-extra-flags; its port comes from /proc")
    L.append("# before each run, untimed: sync -f WORKDIR (write back what creating/copying the images left dirty)")
    L.append("# peak RSS: max of VmHWM from /proc/PID/status, polled every 1 ms until the process exits")
    L.append("#   (a peak in its last millisecond could be missed; wait4's ru_maxrss cannot be used, see below)")
    L.append("```")
    L.append("")
    L.append("Notes:")
    L.append("")
    L.append("- The writer is a Python thread in the benchmark process; its latencies include Python overhead "
             "(tens of µs), which is negligible against the 100 ms goal. Its connection is not re-established "
             "on the destination: the test ends at the cut.")
    L.append("- `lockout` is what the source logs; the client-side view of the hand-off is the in-flight write "
             "that never got a reply (its wait until the cut is in the table). A real client would then "
             "reconnect to the destination and resend it.")
    L.append("- The destination fsyncs the image before it accepts the hand-off (its log says `image durable`), "
             "so the migration time includes writing 512 MiB to disk on the 1 GiB cases. The source image was "
             "just written, so the source reads come from the page cache.")
    L.append("- Peak RSS is VmHWM polled from /proc, not wait4's ru_maxrss: exec keeps the high-water mark of "
             "the process it replaces, here the fork of the Python benchmark (tens of MiB), so ru_maxrss "
             "reports the benchmark's size, not flexnbd's.")
    L.append("- The machine is shared (2 CPUs); the migration runs, the writer and other people's builds "
             "compete for them.")
    L.append("")
    L.append("<details><summary>every migration run</summary>")
    L.append("")
    cols = [("plain", ["seconds", "lockout_ms", "dst_alloc_mib", "identical", "src_rss_kib", "dst_rss_kib"]),
            ("writes", ["seconds", "max_write_ms", "max_write_sent_at_s", "max_write_before_mirror_ms",
                        "p99_write_ms", "unacked_wait_ms",
                        "lockout_ms", "writes_before_mirror", "writes_during_migration", "cut_after_mirror_s",
                        "error_replies", "dst_alloc_mib", "identical"]),
            ("tib", ["seconds", "lockout_ms", "src_rss_kib", "dst_rss_kib", "dst_alloc_mib", "identical"])]
    for name in ("to_c", "from_c"):
        if M.get(name):
            cols.append((name, ["seconds", "dest_done_s", "lockout_ms", "max_write_ms", "unacked_wait_ms",
                                "writes_during_migration", "identical"]))
    for name, keys in cols:
        L.append(f"**{name}**")
        L.append("")
        L.append("| run | " + " | ".join(keys) + " |")
        L.append("|---|" + "---|" * len(keys))
        for r in M.get(name, []):
            cells = []
            for k in keys:
                v = r.get(k)
                if isinstance(v, bool):
                    cells.append("yes" if v else "**no**")
                elif isinstance(v, float):
                    cells.append(f"{v:.3f}" if k in ("seconds", "cut_after_mirror_s", "max_write_sent_at_s")
                                 else f"{v:.1f}")
                elif v is None:
                    cells.append("n/a")
                else:
                    cells.append(str(v))
            L.append(f"| {r['round']} | " + " | ".join(cells) + " |")
        L.append("")
    odd = [f"run {r['round']} {name}: writer ended with {r.get('writer_end')}; error replies "
           f"{r.get('error_replies')} {r.get('error_codes')}; mirror said {r.get('mirror_said')!r}"
           for name in ("writes", "to_c", "from_c") for r in M.get(name, [])]
    odd += [f"run {r['round']} {name}: {r['difference']}" for name in M for r in M[name] if r.get("difference")]
    odd += [f"run {r['round']} {name}: marker DEST.INCOMPLETE left behind" for name in M for r in M[name]
            if r.get("marker_left")]
    for o in odd:
        L.append(f"- {o}")
    L.append("")
    L.append("</details>")
    L.append("")
    return L


def stall_section(ctx, info, results, failures, started, finished):
    """The "## Stall" section of BENCHMARKS.md, as a list of lines."""
    S = results.get("stall", {})
    goal = HANDOFF_GOAL_MS

    def vals(key, field):
        return [r[field] for r in S.get(key, []) if r.get(field) is not None]

    def ms(v):
        return "n/a" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")

    def med_max(key, field):
        v = vals(key, field)
        return "n/a" if not v else f"{ms(med(v))} ({ms(max(v))})"

    L = ["## Stall", ""]
    L.append(f"Measured on {started:%Y-%m-%d} ({started:%H:%M}-{finished:%H:%M} UTC) by "
             f"`bench/run.py{' --only stall' if ctx.only == {'stall'} else ''}`, {ctx.rounds} "
             f"run{'s' if ctx.rounds != 1 else ''} of each case and path (fresh processes per run); flexnbd commit {info['flexnbd_commit']}; load average "
             f"at start {info['loadavg_start']} on {info['nproc']} CPUs.")
    L.append("")
    L.append(f"**Goal: every client write completes within {goal:.0f} ms across the hand-off on loopback, plus "
             "the supervisor's own start-up time** (the last column: the longest write of every run against "
             f"{goal:.0f} ms + that run's supervisor start-up). A write is timed from its first send to its "
             "acknowledgement, resends and reconnections included. **Through the proxy**: the client writes "
             "to `flexnbd-proxy` (UNIX socket), whose upstream is the source; the proxy reconnects and replays. "
             "**Directly**: the client writes to the source's port and, when the hand-off cuts it, reconnects "
             "to the same address (now the supervisor's `serve` of the migrated image) and resends. Each cell: "
             "median over the runs, the largest in brackets; times in ms unless marked.")
    L.append("")
    L.append("| case | path | longest write | p99 | writes | hand-off write | supervisor start-up (listen exit "
             "→ new serve greets) | source's lock-out (its log) | migration (s) | runs | within goal |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in STALL_CASES:
        name, label = case[0], case[1]
        for path in STALL_PATHS:
            key = f"{name}/{path}"
            runs = S.get(key, [])
            pname = "through the proxy" if path == "proxy" else "directly"
            if not runs:
                why = ("not measured (`FLEXNBD_C_BIN` not set)" if (case[5] or case[6]) and not C_FLEXNBD
                       else "not measured (every run failed, see below)")
                L.append(f"| {label} | {pname} | {why} | | | | | | | 0 | |")
                continue
            over = sum(1 for r in runs if r["over_goal"])
            longest = med_max(key, "max_write_ms")
            if over:
                longest = f"**{longest}**"
            lock = med_max(key, "lockout_ms") if vals(key, "lockout_ms") else "n/a (not logged)"
            secs = vals(key, "seconds")
            L.append(f"| {label} | {pname} | {longest} | {ms(med(vals(key, 'p99_write_ms')))} | "
                     f"{med(vals(key, 'writes')):.0f} | {med_max(key, 'handoff_write_ms')} | "
                     f"{med_max(key, 'supervisor_ms')} | {lock} | "
                     f"{med(secs):.2f} ({max(secs):.2f}) | {len(runs)} | "
                     f"{'**no**: ' + str(over) + '/' + str(len(runs)) + ' runs over' if over else 'yes'} |")
    L.append("")
    L.append("The hand-off write is the longest of the writes that were waiting at some moment between the "
             "exit of `listen` and the new `serve`'s first greeting (then nothing serves the port); an idle "
             "client may have none. Its time splits into: from its send to the exit of `listen` (pacing, the "
             "source's lock-out, the destination making the image durable; negative when it was sent after), "
             "the supervisor's start-up, and from the new `serve`'s first greeting to its reply (the client's "
             "or the proxy's reconnection and the resend; the client can get in just before the supervisor's "
             "own check, hence values around 0). Directly, the client also sees when its connection "
             "was cut. `port wait`: from the exit of `listen` to the start of a `serve` that could bind the "
             "port (0 when the first one could; the supervisor starts it again at once while the source "
             "still holds the port); `longest other` is the longest of all the other "
             "writes (pacing during the copy). Medians over the runs, the largest in brackets, ms.")
    L.append("")
    L.append("| case | path | hand-off write | send → listen exit | supervisor start-up | new serve greets → "
             "reply | send → connection cut | proxy reconnect failures (pauses from 0 ms, growing by half up to 3 s) | supervisor: port "
             "wait | longest other write |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for case in STALL_CASES:
        for path in STALL_PATHS:
            key = f"{case[0]}/{path}"
            runs = S.get(key, [])
            if not runs:
                continue
            direct = path == "direct"
            retries = vals(key, "proxy_retry_waits")
            L.append(f"| {case[0]} | {path} | {med_max(key, 'handoff_write_ms')} | "
                     f"{med_max(key, 'handoff_to_listen_exit_ms')} | {med_max(key, 'supervisor_ms')} | "
                     f"{med_max(key, 'handoff_after_new_serve_ms')} | "
                     f"{med_max(key, 'handoff_before_cut_ms') if direct else '—'} | "
                     f"{f'{med(retries):g} ({max(retries)})' if retries else '—'} | "
                     f"{med_max(key, 'port_wait_ms')} | {med_max(key, 'max_other_write_ms')} |")
    L.append("")
    missing = [f"{k} run {r['round']}" for k, runs in S.items() for r in runs if r.get("handoff_write_ms") is None]
    if missing:
        L.append("No write waited across the hand-off (the idle client was between writes) in: "
                 + ", ".join(missing) + ".")
        L.append("")
    st_fail = [f for f in failures if failure_section(f) == "stall"]
    if st_fail:
        L.append("### Failed stall runs")
        L.append("")
        for f in st_fail:
            first, _, rest = f.partition("\n")
            L.append(f"- {first}")
            if rest:
                L.append("")
                L.append("```")
                L.extend(rest.splitlines()[-60:])
                L.append("```")
        L.append("")
    L.append("### How the stall is measured")
    L.append("")
    L.append("```sh")
    L.append(f"# image: {STALL_IMAGE_SIZE // MIB} MiB, {STALL_DATA // MIB} MiB of random data in "
             f"{STALL_EXTENT // 1024} KiB extents at random places, the rest holes;")
    L.append("#   per run a cp --sparse=always copy SRC and a fresh sparse DEST of the same size; sync -f (untimed)")
    L.append("target/bench/release/flexnbd listen -l 127.0.0.1 -p 0 -f DEST -s DSOCK -v --oldstyle-extra-flags")
    L.append("#   tls case: ... -v --tls-cert SRV/server-cert.pem --tls-key SRV/server-key.pem (the bench's "
             "openssl credentials)")
    L.append("target/bench/release/flexnbd serve  -l 127.0.0.1 -p 0 -f SRC  -s SSOCK -v   # got port SPORT")
    L.append("target/bench/release/flexnbd-proxy --addr PSOCK --conn-addr 127.0.0.1 --conn-port SPORT -v"
             "   # through the proxy only")
    L.append("# client (run.py): oldstyle greeting, then 4 KiB NBD_CMD_WRITEs at random 4 KiB-aligned offsets,")
    L.append(f"#   one in flight, back-to-back (busy) or one every {IDLE_INTERVAL * 1000:.0f} ms (idle); "
             f">= {STALL_WARMUP} s of writes before mirror")
    L.append("#   through the proxy: on PSOCK, never reconnects; directly: on 127.0.0.1:SPORT, and after a "
             "failure it")
    L.append(f"#   reconnects to 127.0.0.1:SPORT every 1 ms (at most {RECONNECT_WINDOW:.0f} s) and sends the "
             "same write again")
    L.append("target/bench/release/flexnbd mirror -s SSOCK -l 127.0.0.1 -p DPORT -u --wait [--max-speed BPS]"
             " [--tls-ca CLI/ca-cert.pem]")
    L.append("target/bench/release/flexnbd mirror-speed --sock SSOCK --max-speed 10000000   # speedchange: once "
             "`status` shows")
    L.append(f"#   migration_bytes_left <= {SPEED_SWITCH_LEFT:.0%} of the data (polled every 20 ms)")
    L.append("# supervisor (run.py, polling every 1 ms): as soon as listen has exited 0")
    L.append("target/bench/release/flexnbd serve -l 127.0.0.1 -p SPORT -f DEST -v"
             "   # started again at once if SPORT is still in use")
    L.append("#   ready when a connection to SPORT gets the greeting; the client goes on until it sends a write")
    L.append(f"#   >= {STALL_WARMUP} s after that greeting and after the replies to all the writes sent before it")
    L.append("# with FLEXNBD_C_BIN: c_dest runs the C listen and the supervisor starts the C serve; c_source")
    L.append("#   runs the C serve and the C mirror (-s SSOCK -l 127.0.0.1 -p DPORT -u; its long --unlink takes an argument), into our listen")
    L.append("```")
    L.append("")
    L.append("Notes:")
    L.append("")
    L.append("- Counted: every write sent from `mirror` on until the client stops (the p99 and the write count "
             "are over those writes). `migration` is from `mirror` to both the source and `listen` exited.")
    L.append("- The lock-out is the source's own figure (from its cut-off until it sent DISCONNECT). A client "
             "also waits for the destination to make the image durable and exit, for the supervisor's "
             "`serve` to start, and for its own (or the proxy's) reconnection.")
    L.append("- Supervisor start-up is timed from the exit of `listen` (reaped with wait4, polled every 1 ms) "
             "to the first greeting on the source's port; it includes any time the source still held that "
             "port (`port wait`), since nothing can bind it before.")
    L.append("- Directly, the client's reconnection attempts (every 1 ms) reach the source while it shuts "
             "clients out: it accepts and closes each at once, so a long lock-out means thousands of such "
             "connections.")
    L.append("- The client is a Python thread in the benchmark process, as are the supervisor and the polling; "
             "they share 2 CPUs with flexnbd and other work on the machine.")
    L.append("")
    L.append("<details><summary>every stall run</summary>")
    L.append("")
    keys = ["max_write_ms", "p99_write_ms", "writes", "handoff_write_ms", "handoff_to_listen_exit_ms",
            "supervisor_ms", "supervisor_exec_ms", "port_wait_ms", "port_retries",
            "handoff_after_new_serve_ms", "handoff_before_cut_ms",
            "max_other_write_ms", "lockout_ms", "seconds", "listen_exit_to_source_exit_ms", "worst_sent_s",
            "worst_is_handoff", "worst_attempts", "max_write_before_mirror_ms", "resent_writes", "connects",
            "proxy_retry_waits", "speed_lowered_at_s", "error_replies", "over_goal"]
    L.append("| case | run | " + " | ".join(keys) + " |")
    L.append("|---|---|" + "---|" * len(keys))
    for key, runs in S.items():
        for r in runs:
            cells = []
            for k in keys:
                v = r.get(k)
                if isinstance(v, bool):
                    cells.append(("**yes**" if k == "over_goal" else "yes") if v else "no")
                elif isinstance(v, float):
                    cells.append(f"{v:.3f}" if k in ("seconds", "worst_sent_s", "speed_lowered_at_s")
                                 else f"{v:.1f}")
                elif v is None:
                    cells.append("n/a")
                else:
                    cells.append(str(v))
            L.append(f"| {key} | {r['round']} | " + " | ".join(cells) + " |")
    notes = [f"run {r['round']} {key}: {r['note']}" for key, runs in S.items() for r in runs if r.get("note")]
    if notes:
        L.append("")
        L.extend(f"- {n}" for n in notes)
    L.append("")
    L.append("</details>")
    L.append("")
    return L


def splice_section(text, heading, section):
    """Replace the `heading` section of a report (up to the next "## " heading), or insert
    it before "## Commands" (else before the raw numbers, else at the end)."""
    lines = text.split("\n")
    start = next((i for i, l in enumerate(lines) if l == heading), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        return "\n".join(lines[:start] + section + lines[end:])
    for anchor in ("## Commands", "## Failed runs", "## Raw per-run numbers"):
        if anchor in lines:
            i = lines.index(anchor)
            return "\n".join(lines[:i] + section + lines[i:])
    return "\n".join(lines + [""] + section)


def existing_section(path, heading):
    """The `heading` section of an existing report, or None."""
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except OSError:
        return None
    if heading not in lines:
        return None
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def splice_migration(text, section):
    return splice_section(text, "## Migration", section)


def existing_migration(path):
    return existing_section(path, "## Migration")


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
    L.append(f"- flexnbd: commit {info['flexnbd_commit']}, `scripts/build-release` (static glibc) "
             f"({info['versions']['rustc']})")
    for k in ("qemu-nbd", "nbdkit", "nbd-server", "nbdcopy", "qemu-img", "fio"):
        L.append(f"- {k}: {info['versions'][k]}")
    L.append("- images in a temporary directory under /var/tmp (ext4/disk-backed, but the 1 GiB image "
             "was just written so reads are served from the page cache, except in the cold rows)")
    L.append("")
    L.append("## Summary of ratios (>= 1.0 is good for flexnbd)")
    L.append("")
    L.append("| workload | flexnbd median | vs qemu-nbd | vs nbdkit | vs nbd-server |")
    L.append("|---|---|---|---|---|")
    for name, title, servers, metric, unit, hib in rows:
        if name == "faultcost" or name in SEAM_ROWS:
            continue  # not a peer comparison; its own section says what it compares
        src = "nbdcopy" if name == "rss" else name
        ours = med(series(results, src, ours_kind(name), metric))
        # A row's peer column: the peer itself, or its variant in that row
        # (qemu-nbd-direct, nbdkit-null).
        cells = []
        for p in PEERS:
            kind = next((k for k in servers if k == p or k.startswith(p + "-")), None)
            cells.append(fmt_ratio(ratio(ours, med(series(results, src, kind, metric)), hib))
                         if kind else "—")
        L.append(f"| {name} ({unit}, {'higher' if hib else 'lower'} is better) | {fmt(ours, unit)} | "
                 + " | ".join(cells) + " |")
    L.append("")
    for name, title, servers, metric, unit, hib in rows:
        src = "nbdcopy" if name == "rss" else name
        L.append(f"## {name}: {title}")
        L.append("")
        tls_row = name in TLS_ROWS
        ours = med(series(results, src, ours_kind(name), metric))
        old = med(series(results, src, "flexnbd-oldstyle", metric)) if "flexnbd-oldstyle" in servers else None
        head = (f"| server | median {unit} | min | max | runs | "
                f"{'ratio (flexnbd-tls)' if tls_row else 'ratio (flexnbd newstyle)'} |")
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
            # In the TLS rows our plaintext line shows the cost of TLS: flexnbd-tls ÷ flexnbd.
            compared = (kind in ("flexnbd-faultplan", "flexnbd-preseam") or not kind.startswith("flexnbd")
                        or (tls_row and kind == "flexnbd"))
            line += fmt_ratio(ratio(ours, m, hib)) if compared else "—"
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
    L.append("CARGO_TARGET_DIR=target/bench scripts/build-release   # cargo build --release, static glibc")
    L.append("# image: 512 MiB of random data, then a 512 MiB hole; and a 1 TiB sparse file for start-up")
    L.append("head -c 512M /dev/urandom > image.raw && truncate -s 1G image.raw   # (done in Python)")
    L.append("truncate -s 1T sparse-1tib.raw")
    L.append("# servers")
    L.append("target/bench/release/flexnbd serve -l 127.0.0.1 -p PORT -f FILE --handshake newstyle   # uri nbd://127.0.0.1:PORT/")
    L.append("target/bench/release/flexnbd serve -l 127.0.0.1 -p PORT -f FILE --handshake oldstyle   # flexnbd-oldstyle")
    L.append("qemu-nbd -f raw -x '' -t -e 0 -b 127.0.0.1 -p PORT FILE                               # uri nbd://127.0.0.1:PORT/")
    L.append("nbdkit -f -i 127.0.0.1 -p PORT file FILE                                              # uri nbd://127.0.0.1:PORT/")
    L.append("nbd-server -C nbd-server.conf -p PIDFILE   # daemon, forks per client; uri nbd://127.0.0.1:PORT/disk")
    L.append("# TLS rows (tlsseq, tlsrand): credentials made per run with openssl into a temporary directory;")
    L.append("#   SRV holds ca-cert.pem, server-cert.pem, server-key.pem; CLI holds ca-cert.pem only")
    L.append("openssl req -new -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca.csr -subj '/CN=flexnbd bench CA'")
    L.append("openssl x509 -req -in ca.csr -signkey ca-key.pem -days 2 -out SRV/ca-cert.pem -extfile ca.ext")
    L.append("#   ca.ext: basicConstraints=critical,CA:TRUE  keyUsage=critical,keyCertSign,cRLSign  subjectKeyIdentifier=hash")
    L.append("openssl req -newkey rsa:2048 -nodes -keyout SRV/server-key.pem -out server.csr -subj /CN=localhost")
    L.append("openssl x509 -req -in server.csr -CA SRV/ca-cert.pem -CAkey ca-key.pem -set_serial 1 -days 2 "
             "-out SRV/server-cert.pem -extfile server.ext")
    L.append("#   server.ext: basicConstraints=critical,CA:FALSE  keyUsage=critical,digitalSignature,keyEncipherment")
    L.append("#               extendedKeyUsage=serverAuth  subjectAltName=DNS:localhost,IP:127.0.0.1")
    L.append("target/bench/release/flexnbd serve -l 127.0.0.1 -p PORT -f FILE --tls-cert SRV/server-cert.pem "
             "--tls-key SRV/server-key.pem   # flexnbd-tls (newstyle, TLS required)")
    L.append("qemu-nbd -f raw -x '' -t -e 0 -b 127.0.0.1 -p PORT --object "
             "tls-creds-x509,id=tls0,endpoint=server,dir=SRV,verify-peer=off --tls-creds tls0 FILE   # qemu-nbd-tls")
    L.append("nbdkit -f -i 127.0.0.1 -p PORT --tls=require --tls-certificates=SRV file FILE   # nbdkit-tls")
    L.append("#   TLS uri for nbdcopy: nbds://127.0.0.1:PORT/?tls-certificates=CLI")
    L.append("#   for fio: nbds://127.0.0.1:PORT/ with HOME=H, H/.pki/libnbd/ca-cert.pem (fio's nbd engine")
    L.append("#   refuses URIs naming local files; libnbd then reads the CA from $HOME/.pki/libnbd)")
    L.append("qemu-nbd -f raw -x '' -t -e 0 --aio=io_uring --cache=none -b 127.0.0.1 -p PORT FILE   # qemu-nbd-direct (cold rows)")
    L.append("nbdkit -f -i 127.0.0.1 -p PORT null 1073741824     # nbdkit-null; nbdkit-memory likewise with 'memory'")
    L.append("#   nbd-server.conf:  [generic] listenaddr = 127.0.0.1, port = PORT;  [disk] exportname = FILE")
    L.append("# workloads")
    L.append("nbdcopy URI null:")
    L.append("qemu-img convert -f raw -O raw URI /dev/shm/out.img && rm /dev/shm/out.img   # RAM, so disk writeback does not dominate")
    L.append(" ".join(fio_argv("URI", "randread", ctx.fio_runtime)))
    L.append("cp --sparse=always image.raw write.img   # fresh copy per randwrite run, not timed")
    L.append(" ".join(fio_argv("URI", "randwrite", ctx.fio_runtime)) + "   # server serving write.img")
    L.append("# cold rows: cold.raw is 1 GiB of random data (fsynced); before each run its pages are")
    L.append("#   dropped from the page cache: posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)")
    L.append("#   and the server is started inside a memory cgroup limited to 64 MiB (v1 memory.limit_in_bytes")
    L.append("#   or v2 memory.max), so its page cache never holds more than 6% of the image")
    L.append(" ".join(fio_argv("URI", "randread", ctx.fio_runtime)) + "   # coldread, server serving cold.raw")
    L.append("nbdcopy URI null:   # coldseq, server serving cold.raw")
    L.append("# null row: flexnbd serves a 1 GiB file that is all hole (answered from the allocation map,")
    L.append("#   no pread); nbdkit null / memory have no storage behind them")
    L.append(" ".join(fio_argv("URI", "randread", ctx.fio_runtime)) + "   # null")
    L.append("# start-up: exec the server on the 1 TiB sparse file, then retry (every 1 ms, at most 30 s)")
    L.append("#   a raw-socket client: connect, handshake (EXPORT_NAME), NBD_CMD_READ 4 KiB at offset 0")
    L.append("# RSS: VmHWM from /proc/PID/status of the server and its children, sampled every 10 ms")
    L.append("#   during nbdcopy and once more right before the server is killed; the max over processes")
    L.append("```")
    L.append("")
    L.append("Notes:")
    L.append("")
    L.append("- qemu-nbd runs with `-e 0` (unlimited clients), unlike `docs/benchmarks.md`'s command: with "
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
    L.append("- Cold rows: the image has no holes, its pages are dropped from the page cache before each run and every server "
             "runs in a memory cgroup capped at 64 MiB, so nearly every read waits for the disk (the image is "
             "16 times the cap; only that file's pages are dropped, so the other rows' image stays cached). flexnbd and nbdkit read through that small page cache; qemu-nbd runs as its "
             "operators run it on cold storage, `--aio=io_uring --cache=none` (O_DIRECT, no page cache). "
             "The disk's own limits cap every server alike: " + disk_note(ctx) + ".")
    L.append("- TLS rows: every server requires TLS (STARTTLS on fixed newstyle, x509, no client "
             "certificate); the client is the same (nbdcopy, or fio's nbd engine) with the same image, "
             "connections and queue depth as the plaintext rows. The cipher suite is whatever the server and "
             "libnbd's GnuTLS agree on. `flexnbd` (plaintext newstyle) runs in the same rounds; its ratio "
             "column is flexnbd-tls ÷ flexnbd, the cost of TLS on our own server.")
    L.append("- The null row is the protocol path's ceiling: no storage work at all for nbdkit, and only an "
             "allocation-map lookup for flexnbd (it cannot serve without a file).")
    L.append("")
    # Those are in "## Migration" and "## Stall".
    other_failures = [f for f in failures if failure_section(f) not in SECTIONS]
    if other_failures:
        L.append("## Failed runs")
        L.append("")
        for f in other_failures:
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
    text = "\n".join(L)
    # The migration section: this run's, else the one already in the file (kept as it was).
    section = (migration_section(ctx, info, results, failures, ctx.mig_started, ctx.mig_finished)
               if "migration" in results or ctx.mig_started else existing_migration(path))
    if section:
        text = splice_migration(text, section)
    # Likewise the stall section.
    section = (stall_section(ctx, info, results, failures, ctx.stall_started, ctx.stall_finished)
               if "stall" in results or ctx.stall_started else existing_section(path, "## Stall"))
    if section:
        text = splice_section(text, "## Stall", section)
    # And the refactor section.
    section = (refactor_section(ctx, info, results, failures, ctx.refactor_started, ctx.refactor_finished)
               if "refactor" in results or ctx.refactor_started else existing_section(path, "## Refactor"))
    if section:
        text = splice_section(text, "## Refactor", section)
    # And the simulator section.
    section = (sim_section(ctx, info, results, failures, ctx.sim_started, ctx.sim_finished)
               if "sim" in results or ctx.sim_started else existing_section(path, "## Simulator"))
    if section:
        text = splice_section(text, "## Simulator", section)
    # Sections a full run does not make: kept as they were.
    for heading in KEPT_SECTIONS:
        section = existing_section(path, heading)
        if section:
            text = splice_section(text, heading, section)
    with open(path, "w") as f:
        f.write(text)


def update_sections_only(path, ctx, info, results, failures):
    """--only migration, stall, refactor, sim and/or wan: replace just those sections of an existing report."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ("# Benchmarks\n\nOnly the migration, stall, refactor and simulator sections are generated here; run "
                "`bench/run.py` for the rest.\n")
    if "migration" in ctx.only:
        text = splice_migration(text, migration_section(ctx, info, results, failures,
                                                        ctx.mig_started, ctx.mig_finished))
    if "stall" in ctx.only:
        text = splice_section(text, "## Stall", stall_section(ctx, info, results, failures,
                                                               ctx.stall_started, ctx.stall_finished))
    if "refactor" in ctx.only:
        text = splice_section(text, "## Refactor", refactor_section(ctx, info, results, failures,
                                                                     ctx.refactor_started, ctx.refactor_finished))
    if "sim" in ctx.only:
        text = splice_section(text, "## Simulator", sim_section(ctx, info, results, failures,
                                                                ctx.sim_started, ctx.sim_finished))
    if "wan" in ctx.only:
        text = splice_section(text, "## WAN", wan_module().section(
            ctx, info, results, failures, ctx.wan_started, ctx.wan_finished,
            command="bench/run.py --only wan"))
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------- main

class Ctx:
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 rounds, fio 3 s")
    ap.add_argument("--rounds", type=int, help="rounds (default 5, or 2 with --quick)")
    ap.add_argument("--fio-runtime", type=int, help="fio seconds (default 10, or 3 with --quick)")
    ap.add_argument("--skip-build", action="store_true", help="use the existing target/bench binary")
    ap.add_argument("--only", help="comma-separated workloads or sections to run (default all); the "
                    "sections migration, stall, refactor and sim rewrite only their own part of the report")
    ap.add_argument("--output", default=os.path.join(REPO, "BENCHMARKS.md"), help="report path")
    ap.add_argument("--cases", help="with --only wan: comma-separated RATE-RTT cases (e.g. 1000-50,100-10); "
                    "default all six")
    args = ap.parse_args()

    ctx = Ctx()
    ctx.quick = args.quick
    ctx.rounds = max(1, min(args.rounds or (2 if args.quick else 5), 50))
    ctx.fio_runtime = max(1, min(args.fio_runtime or (3 if args.quick else 10), 600))
    only = set(args.only.split(",")) if args.only else None
    known = {w[0] for w in WORKLOADS} | set(SECTIONS)
    if only and not only <= known:
        ap.error(f"unknown workload(s) {', '.join(sorted(only - known))}; known: {', '.join(sorted(known))}")
    ctx.only = only
    ctx.mig_started = ctx.mig_finished = None
    ctx.stall_started = ctx.stall_finished = None
    ctx.refactor_started = ctx.refactor_finished = None
    ctx.sim_started = ctx.sim_finished = None
    ctx.wan_started = ctx.wan_finished = None
    # The WAN section: 1 round unless --rounds says otherwise (about 15 minutes a round).
    ctx.wan_rounds = args.rounds or 1
    if only and "wan" in only:
        ctx.wan_cases = wan_module().parse_cases(args.cases)
        ctx.wan_kinds = {"flexnbd", "idle", "nbdcopy", "c"}
        ctx.keep_logs = None
    elif args.cases:
        ap.error("--cases goes with --only wan")
    # The sim section's rounds: SIM_ROUNDS, fewer with --quick, or --rounds when given.
    ctx.sim_rounds = ctx.rounds if args.rounds else min(ctx.rounds, SIM_ROUNDS)
    # Only sections that are rewritten in place (migration, stall, refactor, sim)?
    sections_only = bool(only) and only <= set(SECTIONS)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)

    started = datetime.datetime.now(datetime.timezone.utc)
    if (not sections_only or "refactor" in only or "wan" in only
            or ("stall" in only and not shutil.which("openssl"))):
        ensure_peers()
    if not args.skip_build:
        build()
    if not only or "sim" in only:
        check_sim_binary()
    if not only or only & set(SEAM_ROWS):
        build_preseam()
    if not only or "refactor" in only:
        build_base()
    info = machine_info()
    if FLEXNBD_BASE:
        info["refactor_base"] = base_description()
    ctx.workdir = tempfile.mkdtemp(prefix="flexnbd-bench-", dir="/var/tmp")
    results, failures = {}, []
    try:
        # The simulator needs no image: a sim-only run skips writing 1 GiB.
        if not only or only - {"sim"}:
            log(f"creating images in {ctx.workdir}")
            ctx.image, ctx.sparse_tib = make_images(ctx.workdir)
        if not only or only & set(TLS_ROWS):
            TLS.make(ctx.workdir)
        if not only or only & {"coldread", "coldseq"}:
            try:
                ctx.disk = disk_baseline(ctx)
                log(f"disk baseline (fio O_DIRECT 4 KiB randread): {ctx.disk}")
            except Exception as e:
                failures.append(f"disk baseline: {e}"[:500])
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
        if not only or "refactor" in only:
            ctx.refactor_started = datetime.datetime.now(datetime.timezone.utc)
            run_refactor(ctx, results, failures)
            ctx.refactor_finished = datetime.datetime.now(datetime.timezone.utc)
        if not only or "migration" in only:
            ctx.mig_started = datetime.datetime.now(datetime.timezone.utc)
            run_migrations(ctx, results, failures)
            ctx.mig_finished = datetime.datetime.now(datetime.timezone.utc)
        if not only or "stall" in only:
            ctx.stall_started = datetime.datetime.now(datetime.timezone.utc)
            run_stalls(ctx, results, failures)
            ctx.stall_finished = datetime.datetime.now(datetime.timezone.utc)
        if not only or "sim" in only:
            ctx.sim_started = datetime.datetime.now(datetime.timezone.utc)
            run_sim(ctx, results, failures)
            ctx.sim_finished = datetime.datetime.now(datetime.timezone.utc)
            with open("/proc/loadavg") as f:
                ctx.sim_load_end = " ".join(f.read().split()[:3])
        # WAN only when asked for by name (root, network namespaces, ~15 min).
        if only and "wan" in only:
            ctx.wan_started = datetime.datetime.now(datetime.timezone.utc)
            wan_module().run_wan(ctx, results, failures)
            ctx.wan_finished = datetime.datetime.now(datetime.timezone.utc)
    finally:
        stop_all()
        remove_cgroup(ctx)
        shutil.rmtree(ctx.workdir, ignore_errors=True)
    finished = datetime.datetime.now(datetime.timezone.utc)
    outdir = os.path.join(REPO, "bench", "out")
    os.makedirs(outdir, exist_ok=True)
    if sections_only:
        # Keep the other workloads' raw results; replace only the ones of these sections.
        raw_path = os.path.join(outdir, "results.json")
        try:
            with open(raw_path) as f:
                raw = json.load(f)
        except (OSError, ValueError):
            raw = {"results": {}, "failures": []}
        for name in sorted(only):
            raw.setdefault("results", {})[name] = results.get(name, {})
            raw[f"{name}_machine"] = info
            raw[f"{name}_rounds"] = (ctx.sim_rounds if name == "sim" else ctx.wan_rounds if name == "wan"
                                     else ctx.rounds)
            raw["failures"] = [f for f in raw.get("failures", []) if failure_section(f) != name]
        raw["failures"] += failures
        with open(raw_path, "w") as f:
            json.dump(raw, f, indent=1)
        update_sections_only(args.output, ctx, info, results, failures)
        log(f"updated the {' and '.join(SECTIONS[n] for n in sorted(only))} section(s) of {args.output}")
        return 1 if failures else 0
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump({"machine": info, "rounds": ctx.rounds, "sim_rounds": ctx.sim_rounds, "fio_runtime": ctx.fio_runtime,
                   "results": results, "failures": failures}, f, indent=1)
    write_report(args.output, ctx, info, results, failures, started, finished)
    log(f"wrote {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
