#!/usr/bin/env python3
"""Migration across an emulated wide-area link: the "## WAN" section of
BENCHMARKS.md.

A 1 GiB image (512 MiB of random data, then a hole) migrates from `flexnbd
serve` to `flexnbd listen` while a writer does 4 KiB random writes through
the source, over links of 1 Gbit/s and 100 Mbit/s, each at 0.2, 10 and
50 ms round trip (six cases). Each case also runs the bulk-copy reference
over the same link: `nbdcopy` from a `qemu-nbd` on the source's host to a
`qemu-nbd` on the destination's host (no writer). The C flexnbd runs too
when FLEXNBD_C_BIN names one; otherwise the section says "not measured".

The two hosts (must run as root):

- host A, the source's: the root network namespace. `serve`, the writer,
  `mirror` and `nbdcopy` run here, on 127.0.0.1;
- host B, the destination's: a network namespace made for the run
  (`fnbdwan<pid>`), joined to A by a veth pair, 198.18.0.1/24 on A's end,
  198.18.0.2/24 on B's (198.18.0.0/15 is the range set aside for
  benchmarks). `listen` (or qemu-nbd) listens on 127.0.0.1 inside B;
  `flexnbd-linkem`, also inside B, listens on 198.18.0.2 and relays to it,
  delaying each direction by half the round trip. Bandwidth is `tc` tbf on
  both veth ends. The namespace and the veth are removed at the end, also
  after a failure.

    /usr/bin/python3 bench/wan.py [--rounds N] [--cases 1000-50,100-10] [--skip-build]
    /usr/bin/python3 bench/run.py --only wan [--rounds N] [--cases ...]   # the same

Per case: migration time (`mirror` issued to both processes exited), link
use (data the destination received, from its completion record, ÷ time ÷
bandwidth), the clients' shut-out (the source's `clients were shut out for`
line), the source's peak RSS (VmHWM polled until it exits), and nbdcopy's
time over the same link. Each is checked against its goal.
"""

import argparse
import atexit
import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as B  # noqa: E402  the shared benchmark helpers

SIZE = B.GIB
DATA = 512 * B.MIB
# (rate in Mbit/s, round trip in ms); a case's name is "RATE-RTT".
RATES = (1000, 100)
RTTS = (0.2, 10, 50)
CASES = [(rate, rtt) for rate in RATES for rtt in RTTS]
# Bound on one run, from `mirror` (or nbdcopy's exec) to its end: 512 MiB at
# 100 Mbit/s takes about 45 s, so this is plenty unless something is wrong.
TIMEOUT = 600.0
# Goals, checked per case against the medians.
LINK_USE_GOAL = 0.90
NBDCOPY_GOAL = 0.95                  # nbdcopy time ÷ our time
RSS_GOAL_MIB = 64.0
SHUTOUT_FIXED_MS = 25.0              # plus two round trips

# The two hosts' addresses on the veth pair.
ADDR_A = "198.18.0.1"
ADDR_B = "198.18.0.2"
# qemu-nbd's port inside host B (a fresh namespace: every port is free).
QEMU_B_PORT = 10809


def case_name(rate, rtt):
    return f"{rate}-{rtt:g}"


def bandwidth(rate):
    """Bytes per second of a `rate` Mbit/s link (tc's mbit is 10^6 bit)."""
    return rate * 1e6 / 8


def shutout_goal_ms(rtt):
    return 2 * rtt + SHUTOUT_FIXED_MS


def ip(*args):
    argv = ["ip"] + list(args)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def ns_listening_ports(pid):
    """The TCP ports process `pid` listens on, as its own network namespace
    sees them (/proc/PID/net/tcp: /proc/net/tcp would show ours)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
        with open(f"/proc/{pid}/net/tcp") as f:
            lines = f.readlines()[1:]
    except OSError:
        return set()
    return {int(fl[1].rsplit(":", 1)[1], 16) for fl in (l.split() for l in lines)
            if len(fl) > 9 and fl[3] == "0A" and fl[9] in inodes}  # 0A: LISTEN


def cpu_times():
    """(busy, total) jiffies of all CPUs so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy(before):
    """The share of the machine's CPU time that was busy since `before`: on 2
    CPUs the relay, both servers, the writer and this script share them, so a
    value near 1 says the CPU, not the link, may have set the pace."""
    busy, total = cpu_times()
    return (busy - before[0]) / (total - before[1]) if total > before[1] else None


# ---------------------------------------------------------------- the two hosts

class Hosts:
    """Host B as a network namespace joined to the root namespace (host A) by
    a veth pair. Removed by remove(), which main() calls in a finally and
    atexit calls again (it does nothing the second time)."""

    def __init__(self):
        pid = os.getpid()
        self.ns = f"fnbdwan{pid}"
        # Interface names are at most 15 bytes.
        self.dev_a = f"fnw{pid}a"
        self.dev_b = f"fnw{pid}b"
        self.made = False

    def make(self):
        # Traffic must stay on our own addresses: refuse to run beside
        # another user of them (a leftover of a killed run, or a test).
        taken = ip("-4", "-o", "addr", "show", "to", "198.18.0.0/15").strip()
        if taken:
            raise RuntimeError(f"198.18.0.0/15 is already in use on this host, remove it first: {taken}")
        atexit.register(self.remove)
        self.made = True
        ip("netns", "add", self.ns)
        ip("link", "add", self.dev_a, "type", "veth", "peer", "name", self.dev_b, "netns", self.ns)
        ip("addr", "add", f"{ADDR_A}/24", "dev", self.dev_a)
        ip("link", "set", self.dev_a, "up")
        ip("-n", self.ns, "link", "set", "lo", "up")
        ip("-n", self.ns, "addr", "add", f"{ADDR_B}/24", "dev", self.dev_b)
        ip("-n", self.ns, "link", "set", self.dev_b, "up")
        B.log(f"host B: namespace {self.ns}, veth {self.dev_a} ({ADDR_A}) <-> {self.dev_b} ({ADDR_B})")

    def shape(self, rate):
        """Both directions limited to `rate` Mbit/s, as acceptance/netns.rs
        does: a burst of at least one tick's worth (250 Hz) and 16 KiB, and
        a queue of about 20 ms at the rate."""
        burst = str(max(rate * 1_000_000 // 8 // 250, 16 * 1024))
        for prefix, dev in (([], self.dev_a), (["ip", "netns", "exec", self.ns], self.dev_b)):
            argv = prefix + ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate}mbit",
                             "burst", burst, "latency", "20ms"]
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"`{' '.join(argv)}` failed ({r.returncode}): {r.stderr.strip()}")

    def remove(self):
        if not self.made:
            return
        self.made = False
        # Whatever still runs in the namespace was started by this script
        # (B.stop_all() has normally ended it already): end it by pid.
        r = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True, timeout=30)
        for pid in r.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        # Deleting one end of a veth deletes both, at once (the namespace's
        # end would otherwise live as long as anything held the namespace).
        subprocess.run(["ip", "link", "del", self.dev_a], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        if self.ns in left.split():
            B.log(f"warning: namespace {self.ns} is still there")
        else:
            B.log(f"removed namespace {self.ns} and veth {self.dev_a}")


# ---------------------------------------------------------------- processes on host B

def in_ns(ns, argv):
    # `ip netns exec` execs the program, so the pid stays the program's (and
    # FlexProc's wait4 and VmHWM polling see the server itself).
    return ["ip", "netns", "exec", ns] + argv


class NsFlexProc(B.FlexProc):
    """`flexnbd listen` (ours or the C one) on 127.0.0.1 inside host B. Its
    wait_ready works unchanged: ours logs its port; the C one's is read from
    /proc/PID/net/tcp, which shows the process's own namespace."""

    def __init__(self, ns, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ns = ns

    def argv(self):
        return in_ns(self.ns, super().argv())


class NsQemuNbd(B.Server):
    """qemu-nbd on 127.0.0.1:QEMU_B_PORT inside host B, serving `image`."""

    def __init__(self, ns, image, workdir):
        super().__init__("qemu-nbd", image, workdir)
        self.ns = ns
        self.port = QEMU_B_PORT
        self.logpath = os.path.join(workdir, "qemu-nbd-b.log")

    def argv(self):
        return in_ns(self.ns, ["qemu-nbd", "-f", "raw", "-x", "", "-t", "-e", "0",
                               "-b", B.HOST, "-p", str(self.port), self.image])

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"qemu-nbd on host B exited early: {self.log_tail()}")
            if self.port in ns_listening_ports(self.popen.pid):
                return
            time.sleep(0.01)
        raise RuntimeError(f"qemu-nbd on host B not listening after {timeout} s: {self.log_tail()}")


def linkem_bin():
    return os.path.join(os.path.dirname(B.FLEXNBD), "flexnbd-linkem")


class Linkem(B.Server):
    """flexnbd-linkem inside host B: listens on ADDR_B, relays to
    127.0.0.1:`to_port` there, each direction delayed by `delay_ms`. Its
    control socket gives the bytes relayed (`stats`)."""

    def __init__(self, ns, to_port, delay_ms, workdir, tag):
        super().__init__("linkem", "", workdir)
        self.ns = ns
        self.to_port = to_port
        self.delay_ms = delay_ms
        self.logpath = os.path.join(workdir, f"linkem-{tag}.log")
        self.control = os.path.join(workdir, f"linkem-{tag}.ctl")

    def argv(self):
        return in_ns(self.ns, [linkem_bin(), "--listen", f"{ADDR_B}:0", "--to", f"{B.HOST}:{self.to_port}",
                               "--delay-ms", f"{self.delay_ms:g}", "--control", self.control])

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"flexnbd-linkem exited early: {self.log_tail()}")
            m = re.search(r"listening on " + re.escape(ADDR_B) + r":(\d+)", self.log_tail())
            if m and os.path.exists(self.control):
                self.port = int(m.group(1))
                return
            time.sleep(0.01)
        raise RuntimeError(f"flexnbd-linkem not listening after {timeout} s: {self.log_tail()}")

    def stats(self):
        """{"up": bytes A->B, "down": bytes B->A, "connections": relayed connections so far}."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5.0)
            s.connect(self.control)
            s.sendall(b"stats\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", buf.decode())}


# ---------------------------------------------------------------- runs

def fresh_files(ctx, tag):
    """A sparse copy of the image (host A's) and an empty 1 GiB file (host B's),
    with what making them left dirty written back (untimed)."""
    src = os.path.join(ctx.workdir, f"src-{tag}.raw")
    dst = os.path.join(ctx.workdir, f"dst-{tag}.raw")
    subprocess.run(["cp", "--sparse=always", ctx.image, src], check=True, timeout=600)
    with open(dst, "wb") as f:
        f.truncate(SIZE)
    subprocess.run(["sync", "-f", ctx.workdir], check=True, timeout=600)
    return src, dst


def remove_files(*paths):
    for p in paths:
        for q in (p, p + ".COMPLETE", p + ".INCOMPLETE"):
            if os.path.exists(q):
                os.unlink(q)


def flex_run(ctx, rate, rtt, rnd, c=False, writing=True):
    """One migration of ours (or the C flexnbd's, `c`) across the link, with
    the writer (or, not `writing`, without: the like-for-like comparison
    with nbdcopy, which has no writer either)."""
    tag = f"{'c' if c else 'flex'}{'' if writing else '-idle'}-{case_name(rate, rtt)}-{rnd}"
    src, dst = fresh_files(ctx, tag)
    listen = NsFlexProc(ctx.hosts.ns, "listen", dst, ctx.workdir, tag, c=c)
    serve = B.FlexProc("serve", src, ctx.workdir, tag, c=c)
    link = None
    writer = None
    mirror = None
    mirror_log = os.path.join(ctx.workdir, f"mirror-{tag}.log")
    try:
        listen.start()
        serve.start()
        listen.wait_ready()
        serve.wait_ready()
        link = Linkem(ctx.hosts.ns, listen.port, rtt / 2, ctx.workdir, tag)
        link.start()
        link.wait_ready()
        if writing:
            writer = B.Writer(serve.port, seed=rnd)
            # B.Writer's own bound is for loopback migrations; this one may
            # take up to TIMEOUT. It still ends by itself.
            writer.deadline = time.perf_counter() + TIMEOUT + 60.0
            writer.thread.start()
            if not writer.warm.wait(timeout=30) or len(writer.acked) < 200:
                raise RuntimeError(f"writer did not get going: {writer.end_reason}")
            # At least 0.5 s of writes before `mirror`, as run.py's "under writes".
            time.sleep(max(0.0, 0.5 - (time.perf_counter() - writer.acked[0][0])))
            if writer.end_reason:
                raise RuntimeError(f"writer stopped before mirror: {writer.end_reason}")
        binary = B.C_FLEXNBD if c else B.FLEXNBD
        with open(mirror_log, "wb") as mlog:
            cpu0 = cpu_times()
            t0 = time.perf_counter()
            mirror = subprocess.Popen([binary, "mirror", "-s", serve.sock, "-l", ADDR_B, "-p", str(link.port)],
                                      stdin=subprocess.DEVNULL, stdout=mlog, stderr=mlog,
                                      start_new_session=True)
        t1 = B.wait_migrated(listen, serve, mirror, t0 + TIMEOUT, TIMEOUT)
        busy = cpu_busy(cpu0)
        try:
            mirror.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise RuntimeError("flexnbd mirror still running after both servers exited")
        if mirror.returncode != 0:
            raise RuntimeError(f"flexnbd mirror exited with {mirror.returncode}")
        wire = link.stats()
        if writer is not None:
            writer.stop.set()
            writer.thread.join(timeout=B.WRITE_TIMEOUT + 10)
        log = serve.log_text()
        if ctx.keep_logs:
            for p in (serve, listen):
                shutil.copy(p.logpath, os.path.join(ctx.keep_logs, f"{p.role}-{tag}.log"))
        shut = re.search(r"clients were shut out for (\S+)", log)
        left = re.search(r"(\d+) bytes left at the cut-off", log)
        # The source's line at the cut-off decision: how long the sweep (the
        # first pass over the image) and the dirty passes after it took, and
        # what it measured the connection to carry.
        conv = re.search(r"converged after ([0-9.]+) s of dirty passes \(the sweep took ([0-9.]+) s\)", log)
        # ...and the destination's costs as the source's model measured them
        # (from its replies, so a round trip may show in them), with the
        # rate it held the copy to when one was finite.
        model = re.search(r"the destination takes ([0-9.]+) ms a write plus ([0-9.]+) MB/s"
                          r"(?:, the (?:connection carries|copy is held to) ([0-9.]+) MB/s)?", log)
        during = sorted(dt for t, dt in writer.acked if t >= t0) if writer else []
        seconds = t1 - t0
        res = {
            "seconds": seconds,
            "dest_done_s": listen.exit_time - t0,
            "cpu_busy": busy,
            "wire_up": wire.get("up"), "wire_down": wire.get("down"),
            "connections": wire.get("connections"),
            "shutout_ms": B.parse_rust_duration(shut.group(1)) if shut else None,
            "left_bytes": int(left.group(1)) if left else None,
            "sweep_s": float(conv.group(2)) if conv else None,
            "passes_s": float(conv.group(1)) if conv else None,
            # The sweep carries the image's data (and what the writer wrote
            # ahead of it into the hole): its share of the link, roughly.
            "sweep_use": DATA / (float(conv.group(2)) * bandwidth(rate)) if conv and float(conv.group(2)) else None,
            "model_ms_per_write": float(model.group(1)) if model else None,
            "model_mbs": float(model.group(2)) if model else None,
            "model_rate_mbs": float(model.group(3)) if model and model.group(3) else None,
            "converged_line": next((l for l in log.splitlines() if "converged after" in l), None),
            "src_rss_kib": serve.peak_kib(), "dst_rss_kib": listen.peak_kib(),
            "writes_during": len(during),
            "max_write_ms": during[-1] * 1000.0 if during else None,
            "writer_end": writer.end_reason if writer else None,
        }
        if not c:
            # The data the destination received: its completion record.
            res["bytes"] = bytes_received(dst)
            res["link_use"] = res["bytes"] / (seconds * bandwidth(rate))
        res["wire_use"] = res["wire_up"] / (seconds * bandwidth(rate)) if res["wire_up"] is not None else None
        diff = B.first_difference(src, dst)  # untimed
        res["identical"] = diff is None
        if diff:
            raise RuntimeError(f"source and destination differ after the migration: {diff}")
        return res
    except BaseException as e:
        logs = []
        for name, path in (("serve", serve.logpath), ("listen", listen.logpath), ("mirror", mirror_log),
                           ("linkem", link.logpath if link else None)):
            if path and os.path.exists(path):
                with open(path, "rb") as f:
                    logs.append(f"--- {name} log: " + f.read()[-3000:].decode(errors="replace"))
        if isinstance(e, Exception):
            raise RuntimeError(f"{e}\n" + "\n".join(logs)) from e
        raise
    finally:
        if writer is not None:
            writer.stop.set()
            writer.thread.join(timeout=B.WRITE_TIMEOUT + 10)
        if mirror is not None and mirror.poll() is None:
            try:
                os.killpg(mirror.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            mirror.wait(timeout=5)
        for p in (serve, listen, link):
            if p is not None:
                p.stop()
        remove_files(src, dst)


def bytes_received(dst):
    with open(dst + ".COMPLETE") as f:
        m = re.search(r"^bytes_received=(\d+)$", f.read(), re.M)
    if not m:
        raise RuntimeError("no bytes_received= line in the completion record")
    return int(m.group(1))


def nbdcopy_run(ctx, rate, rtt, rnd):
    """The bulk-copy reference: nbdcopy from qemu-nbd on host A to qemu-nbd
    on host B, through the same link. No writer."""
    tag = f"nbdcopy-{case_name(rate, rtt)}-{rnd}"
    src, dst = fresh_files(ctx, tag)
    qa = B.Server("qemu-nbd", src, ctx.workdir)
    qb = NsQemuNbd(ctx.hosts.ns, dst, ctx.workdir)
    link = None
    try:
        qa.start()
        qb.start()
        qa.wait_ready()
        qb.wait_ready()
        link = Linkem(ctx.hosts.ns, qb.port, rtt / 2, ctx.workdir, tag)
        link.start()
        link.wait_ready()
        # The data nbdcopy has to carry: the source's data extents (it reads
        # the holes' extents and sends them as zeroing requests).
        extents, _ = B.data_extents(src)
        data = sum(e - s for s, e in extents)
        argv = ["nbdcopy", f"nbd://{B.HOST}:{qa.port}/", f"nbd://{ADDR_B}:{link.port}/"]
        cpu0 = cpu_times()
        seconds, _ = B.run_cmd(argv, timeout=TIMEOUT)
        busy = cpu_busy(cpu0)
        wire = link.stats()
        res = {"seconds": seconds, "cpu_busy": busy, "bytes": data, "link_use": data / (seconds * bandwidth(rate)),
               "wire_up": wire.get("up"), "wire_down": wire.get("down"),
               "connections": wire.get("connections")}
        res["wire_use"] = res["wire_up"] / (seconds * bandwidth(rate)) if res["wire_up"] is not None else None
        diff = B.first_difference(src, dst)  # untimed
        res["identical"] = diff is None
        if diff:
            raise RuntimeError(f"source and destination differ after nbdcopy: {diff}")
        return res
    except Exception as e:
        tails = "\n".join(f"--- {p.kind} log: {p.log_tail()}" for p in (qa, qb, link) if p is not None)
        raise RuntimeError(f"{e}\n{tails}") from e
    finally:
        for p in (qa, qb, link):
            if p is not None:
                p.stop()
        remove_files(src, dst)


def run_wan(ctx, results, failures):
    """Every case, ctx.wan_rounds times: ours, nbdcopy and (FLEXNBD_C_BIN) the
    C flexnbd, in an order that rotates from round to round."""
    if os.geteuid() != 0:
        failures.append("round 1 wan setup: needs root (network namespaces, tc)")
        return
    for tool in ("ip", "tc", "qemu-nbd", "nbdcopy"):
        if not shutil.which(tool):
            failures.append(f"round 1 wan setup: {tool} is missing")
            return
    if not os.access(linkem_bin(), os.X_OK):
        failures.append(f"round 1 wan setup: no flexnbd-linkem at {linkem_bin()} (scripts/build-release builds it)")
        return
    ctx.hosts = Hosts()
    try:
        ctx.hosts.make()
        kinds = [k for k in ["flexnbd", "idle", "nbdcopy"] + (["c"] if B.C_FLEXNBD else [])
                 if k in ctx.wan_kinds]
        for rnd in range(1, ctx.wan_rounds + 1):
            for rate in RATES:
                cases = [(r, t) for r, t in CASES if r == rate and case_name(r, t) in ctx.wan_cases]
                if not cases:
                    continue
                ctx.hosts.shape(rate)
                for i, (_, rtt) in enumerate(cases):
                    shift = (rnd + i) % len(kinds)
                    for kind in kinds[shift:] + kinds[:shift]:
                        name = case_name(rate, rtt)
                        try:
                            if kind == "nbdcopy":
                                res = nbdcopy_run(ctx, rate, rtt, rnd)
                            elif kind == "idle":
                                res = flex_run(ctx, rate, rtt, rnd, writing=False)
                            else:
                                res = flex_run(ctx, rate, rtt, rnd, c=(kind == "c"))
                        except KeyboardInterrupt:
                            raise
                        except Exception as e:
                            msg = f"round {rnd} wan {name} {kind}: {e}"
                            B.log("FAILED " + msg[:3000])
                            failures.append(msg.replace("\n", " ")[:1500])
                            continue
                        res["round"] = rnd
                        # Other work on the machine shows here (the 1-minute load average).
                        res["load1"] = float(open("/proc/loadavg").read().split()[0])
                        results.setdefault("wan", {}).setdefault(name, {}).setdefault(kind, []).append(res)
                        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                                 if k != "converged_line"}
                        B.log(f"round {rnd}/{ctx.wan_rounds} wan {name:8} {kind:8} {shown}")
    except KeyboardInterrupt:
        raise
    except Exception as e:
        msg = f"round 1 wan setup: {e}"
        B.log("FAILED " + msg)
        failures.append(msg.replace("\n", " ")[:1500])
    finally:
        B.stop_all()
        ctx.hosts.remove()
        with open("/proc/loadavg") as f:
            ctx.wan_load_end = " ".join(f.read().split()[:3])


# ---------------------------------------------------------------- report

def section(ctx, info, results, failures, started, finished, command="bench/wan.py"):
    W = results.get("wan", {})

    def vals(name, kind, metric):
        return [r[metric] for r in W.get(name, {}).get(kind, []) if r.get(metric) is not None]

    def m(name, kind, metric):
        return B.med(vals(name, kind, metric))

    def cell(name, kind, metric, form):
        v = vals(name, kind, metric)
        if not v:
            return "not measured"
        if len(v) == 1:
            return form(v[0])
        return f"{form(B.med(v))} ({form(min(v))}–{form(max(v))})"

    def secs(v):
        return f"{v:.2f} s"

    def pct(v):
        return f"{v * 100:.1f} %"

    def mib(v):
        return f"{v / B.MIB:.0f} MiB"

    def ms(v):
        return f"{v:.1f} ms"

    def rss(v):
        return f"{v / 1024:.1f} MiB"

    def yesno(ok):
        return "not measured" if ok is None else ("yes" if ok else "**no**")

    names = [case_name(r, t) for r, t in CASES if case_name(r, t) in ctx.wan_cases]
    rounds = ctx.wan_rounds
    L = ["## WAN", ""]
    L.append(f"Migration across an emulated link, measured on {started:%Y-%m-%d} "
             f"({started:%H:%M}-{finished:%H:%M} UTC) by `{command}`, {rounds} round{'' if rounds == 1 else 's'}"
             f"{'' if len(names) == len(CASES) else ' of the cases ' + ', '.join(names)}; "
             f"flexnbd commit {info['flexnbd_commit']} (`scripts/build-release`); {info['cpu']}, "
             f"{info['nproc']} CPUs, kernel {info['kernel']}; load average at start {info['loadavg_start']}, "
             f"at the end {getattr(ctx, 'wan_load_end', 'unknown')}. "
             "Every figure below was measured in this run." + (" Medians, (min–max) beside them." if rounds > 1 else ""))
    L.append("")
    L.append("- hosts: the source's is the root network namespace (`serve`, the writer, `mirror` and `nbdcopy`, "
             "on 127.0.0.1), the destination's a network namespace made for the run, joined to it by a veth "
             f"pair ({ADDR_A}/24 ↔ {ADDR_B}/24); both removed at the end;")
    L.append("- bandwidth: `tc qdisc replace dev DEV root tbf rate RATEmbit burst BURST latency 20ms` on both veth "
             "ends (BURST: 1/250 s at the rate, at least 16 KiB). Link use counts only payload; TCP/IP and "
             "Ethernet headers take about 4.4 % of the link at a 1500-byte MTU, so 95.6 % is the ceiling;")
    L.append("- latency: `flexnbd-linkem` inside the destination's namespace listens on "
             f"{ADDR_B} and relays to the server on 127.0.0.1 there, delaying each direction by half the "
             "round trip (`--delay-ms RTT/2`). What it does **not** model (its header): it ends TCP on both "
             "sides, so the TCP connection across the veth sees a sub-millisecond round trip and its congestion "
             "control and window never meet the emulated delay (a real path of this round trip needs socket "
             "buffers of its bandwidth-delay product; this does not test that), and nothing is lost or "
             "reordered. What crosses it does feel the round trip: every reply comes a round trip after its "
             "request. It buffers at most 16 MiB each way;")
    L.append(f"- flexnbd: 1 GiB image, {DATA // B.MIB} MiB of random data then a hole, a fresh sparse copy per "
             "run, into an empty sparse 1 GiB file; `serve` on the source's host, `listen --oldstyle-extra-flags` "
             "(holes travel as WRITE_ZEROES, without payload) on the destination's; `mirror -l "
             f"{ADDR_B} -p LINKEM_PORT`. A writer does back-to-back 4 KiB writes at random offsets through the "
             "source (one oldstyle connection, one in flight) from 0.5 s before `mirror` until the hand-off "
             "cuts it. Each destination was compared with its source byte for byte afterwards;")
    L.append("- nbdcopy (the bulk-copy reference, no writer): `qemu-nbd -f raw -x \"\" -t -e 0` on the source's "
             "host serving a copy of the image, the same on the destination's host serving an empty sparse "
             "1 GiB file, `nbdcopy nbd://127.0.0.1:PORT/ nbd://198.18.0.2:LINKEM_PORT/` with its defaults "
             "(timed from exec to exit; it does not flush, and qemu-nbd does not sync the file, while `listen` "
             "syncs the image before it completes);")
    if B.C_FLEXNBD:
        L.append(f"- the C flexnbd (`FLEXNBD_C_BIN`={B.C_FLEXNBD}): its `serve`, `listen` and `mirror` in place "
                 "of ours, same writer; it writes no completion record and logs no shut-out, so its rows have "
                 "time, wire use (all bytes linkem carried to the destination) and RSS only.")
    else:
        L.append("- the C flexnbd: not measured (`FLEXNBD_C_BIN` not set).")
    L.append("")
    L.append("Link use and shut-out are of the migration under the writer. "
             "Time: `mirror` issued to both processes exited (flexnbd), exec to exit (nbdcopy). Link use: the "
             "data the destination received (flexnbd: `bytes_received=` of its completion record, which counts "
             "what the writer dirtied and was sent again; nbdcopy: the image's 512 MiB of data) ÷ (time × "
             "bandwidth). Shut-out: the source's `clients were shut out for` line. RSS: the source's peak "
             "VmHWM, polled every 1 ms until it exited.")
    L.append("")
    L.append("nbdcopy has no writer, so the comparison with it is a flexnbd migration without one (\"no "
             "writer\"); under the writer a migration also carries what the writer rewrote behind the copy (the "
             "data received), and its time is the clients' and the copy's together.")
    L.append("")
    c_head = " C flexnbd: time |" if B.C_FLEXNBD else ""
    L.append("| link | round trip | under the writer: time | data received | link use | shut-out "
             "| source peak RSS | no writer: time | no writer: link use | nbdcopy: time | nbdcopy: link use "
             "| nbdcopy time ÷ flexnbd time (no writer) |" + c_head)
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if B.C_FLEXNBD else ""))
    for rate, rtt in CASES:
        n = case_name(rate, rtt)
        if n not in names:
            continue
        ours, ref = m(n, "idle", "seconds"), m(n, "nbdcopy", "seconds")
        ratio = f"{ref / ours:.2f}" if ours and ref else "not measured"
        row = (f"| {rate} Mbit/s | {rtt:g} ms | {cell(n, 'flexnbd', 'seconds', secs)} | "
               f"{cell(n, 'flexnbd', 'bytes', mib)} | {cell(n, 'flexnbd', 'link_use', pct)} | "
               f"{cell(n, 'flexnbd', 'shutout_ms', ms)} | {cell(n, 'flexnbd', 'src_rss_kib', rss)} | "
               f"{cell(n, 'idle', 'seconds', secs)} | {cell(n, 'idle', 'link_use', pct)} | "
               f"{cell(n, 'nbdcopy', 'seconds', secs)} | {cell(n, 'nbdcopy', 'link_use', pct)} | {ratio} |")
        if B.C_FLEXNBD:
            row += f" {cell(n, 'c', 'seconds', secs)} |"
        L.append(row)
    L.append("")
    L.append("Goals, on the medians:")
    L.append("")
    L.append(f"| link | round trip | link use >= {LINK_USE_GOAL * 100:.0f} % | shut-out < 2 round trips + "
             f"{SHUTOUT_FIXED_MS:.0f} ms | >= {NBDCOPY_GOAL} of nbdcopy's speed (no writer) | source peak RSS < "
             f"{RSS_GOAL_MIB:.0f} MiB |")
    L.append("|---|---|---|---|---|---|")
    for rate, rtt in CASES:
        n = case_name(rate, rtt)
        if n not in names:
            continue
        use, shut, rss_kib = m(n, "flexnbd", "link_use"), m(n, "flexnbd", "shutout_ms"), m(n, "flexnbd", "src_rss_kib")
        ours, ref = m(n, "idle", "seconds"), m(n, "nbdcopy", "seconds")
        goal = shutout_goal_ms(rtt)
        L.append(f"| {rate} Mbit/s | {rtt:g} ms "
                 f"| {yesno(None if use is None else use >= LINK_USE_GOAL)} "
                 f"| {yesno(None if shut is None else shut < goal)} (< {goal:g} ms) "
                 f"| {yesno(None if not (ours and ref) else ref / ours >= NBDCOPY_GOAL)} "
                 f"| {yesno(None if rss_kib is None else rss_kib / 1024 < RSS_GOAL_MIB)} |")
    L.append("")
    L.append("<details><summary>Per run</summary>")
    L.append("")
    L.append("Wire: every byte linkem carried towards the destination (requests, headers and data) and back. "
             "Sweep and dirty passes: from the source's `converged after C s of dirty passes (the sweep took "
             f"S s)` line; sweep use: {DATA // B.MIB} MiB ÷ S ÷ bandwidth (the sweep's share of the link, "
             "roughly). Model: the destination's cost per write and per byte as the source measured it from "
             "replies, from the same line (and the rate it held the copy to, when finite). Writes: the "
             "writer's acknowledged writes from `mirror` on, and the longest of them. Left: the source's "
             "`bytes left at the cut-off`. Connections: TCP connections linkem relayed. CPU busy: the share of "
             f"the machine's {os.cpu_count()} CPUs busy during the run (/proc/stat; everything shares them: "
             "servers, relay, writer and this script). Load: the 1-minute load average as the run ended (other work "
             "on the machine shows there).")
    L.append("")
    L.append("| round | case | who | time | dest. exited | wire to dest. | wire back | wire use | sweep | sweep use "
             "| dirty passes | model | connections | writes | longest write | left at cut-off | source RSS "
             "| dest. RSS | CPU busy | load | identical |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def f(v, form):
        return "" if v is None else form(v)

    def model(r):
        if r.get("model_ms_per_write") is None:
            return ""
        held = f", held to {r['model_rate_mbs']:.1f} MB/s" if r.get("model_rate_mbs") is not None else ""
        return f"{r['model_ms_per_write']:.3f} ms/write + {r['model_mbs']:.0f} MB/s{held}"
    for rnd in range(1, rounds + 1):
        for n in names:
            for kind in ("flexnbd", "idle", "nbdcopy", "c"):
                for r in (r for r in W.get(n, {}).get(kind, []) if r["round"] == rnd):
                    L.append(f"| {rnd} | {n} | {kind} | {secs(r['seconds'])} | {f(r.get('dest_done_s'), secs)} | "
                             f"{f(r.get('wire_up'), mib)} | {f(r.get('wire_down'), lambda v: f'{v / B.MIB:.1f} MiB')} | "
                             f"{f(r.get('wire_use'), pct)} | {f(r.get('sweep_s'), secs)} | "
                             f"{f(r.get('sweep_use'), pct)} | {f(r.get('passes_s'), secs)} | "
                             f"{model(r)} | {f(r.get('connections'), str)} | "
                             f"{f(r.get('writes_during'), str)} | {f(r.get('max_write_ms'), ms)} | "
                             f"{f(r.get('left_bytes'), lambda v: f'{v / 1024:.0f} KiB')} | "
                             f"{f(r.get('src_rss_kib'), rss)} | {f(r.get('dst_rss_kib'), rss)} | "
                             f"{f(r.get('cpu_busy'), pct)} | {f(r.get('load1'), lambda v: f'{v:.2f}')} | "
                             f"{'yes' if r.get('identical') else 'no'} |")
    L.append("")
    L.append("</details>")
    L.append("")
    wan_failures = [x for x in failures if B.failure_section(x) == "wan"]
    if wan_failures:
        L.append("### Failed runs")
        L.append("")
        L.extend(f"- {x[:600]}" for x in wan_failures)
        L.append("")
    return L


# ---------------------------------------------------------------- main

def parse_cases(text):
    """`--cases 1000-50,100-10` -> the set of case names; None or "" -> all."""
    known = [case_name(r, t) for r, t in CASES]
    if not text:
        return set(known)
    wanted = set(text.split(","))
    unknown = wanted - set(known)
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    return wanted


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cases", default="", help="comma-separated RATE-RTT cases, e.g. 1000-50,100-10 "
                    "(default all six; the section then holds only those)")
    ap.add_argument("--kinds", default="flexnbd,idle,nbdcopy",
                    help="which runs per case (default all): flexnbd (under the writer), idle (no writer), "
                    "nbdcopy; the C flexnbd runs too when FLEXNBD_C_BIN is set")
    ap.add_argument("--logs", default="", help="keep each flexnbd run's serve and listen logs in this directory")
    ap.add_argument("--skip-build", action="store_true", help="use the existing target/bench binaries")
    ap.add_argument("--output", default=os.path.join(B.REPO, "BENCHMARKS.md"))
    args = ap.parse_args()

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)

    ctx = B.Ctx()
    ctx.wan_rounds = max(1, min(args.rounds, 20))
    ctx.wan_cases = parse_cases(args.cases)
    ctx.wan_kinds = set(args.kinds.split(",")) | {"c"}
    unknown = ctx.wan_kinds - {"flexnbd", "idle", "nbdcopy", "c"}
    if unknown:
        raise SystemExit(f"unknown kind(s) {', '.join(sorted(unknown))}; known: flexnbd, idle, nbdcopy")
    ctx.keep_logs = os.path.abspath(args.logs) if args.logs else None
    if ctx.keep_logs:
        os.makedirs(ctx.keep_logs, exist_ok=True)
    if not args.skip_build:
        B.build()
    info = B.machine_info()
    started = datetime.datetime.now(datetime.timezone.utc)
    ctx.workdir = tempfile.mkdtemp(prefix="flexnbd-wan-", dir="/var/tmp")
    results, failures = {}, []
    try:
        B.log(f"creating the 1 GiB image in {ctx.workdir}")
        ctx.image = os.path.join(ctx.workdir, "image.raw")
        with open(ctx.image, "wb") as f:
            for _ in range(DATA // (4 * B.MIB)):
                f.write(os.urandom(4 * B.MIB))
            f.truncate(SIZE)
        run_wan(ctx, results, failures)
    finally:
        B.stop_all()
        if getattr(ctx, "hosts", None):
            ctx.hosts.remove()
        shutil.rmtree(ctx.workdir, ignore_errors=True)
    finished = datetime.datetime.now(datetime.timezone.utc)
    try:
        with open(args.output) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# Benchmarks\n"
    text = B.splice_section(text, "## WAN", section(ctx, info, results, failures, started, finished))
    with open(args.output, "w") as f:
        f.write(text)
    B.log(f"updated the WAN section of {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        B.stop_all()
