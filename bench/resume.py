#!/usr/bin/env python3
"""Resuming an interrupted migration, measured: the "## Resume" section of
BENCHMARKS.md.

A 4 GiB image with 2 GiB of data (the first half; the rest a hole) migrates
from `flexnbd serve` to `flexnbd listen` on 127.0.0.1 while a writer does
4 KiB random writes through the source. The copy is interrupted when the
sweep has sent 50 % or 90 % of the data:

- network reset: the source's fault plan closes its connection as it sends
  the Nth 1 MiB write (`mirror.request_send.write#N=close`); the mirror
  retries by itself;
- destination crash: the destination's fault plan kills it as it receives
  the Nth write (`server.request_received.write#N=crash`), and this script
  starts `listen` again on the same port, as a supervisor would.

Each case runs with this build, which resumes from the last checkpoint the
destination holds, and with the build before resuming (RESUME_BASE), which
starts the copy again from zero. What is measured after the interruption:
the data bytes the completing connection received (the destination's
completion record, `bytes_received`) and the wall time from the
interruption (the `fault fired` line's timestamp) to both processes exited.

Each resumed run is held to what resuming promises: at most the data left
at the interruption, plus what the writer wrote from `mirror` on, plus one
checkpoint interval.

`--verify` is measured on a destination that already holds an identical
copy (no writer): `mirror --verify` against a plain `mirror` of this build
to an empty destination. Its bytes on the wire, both ways, are counted by a
relay in runs of their own (untimed).

    /usr/bin/python3 bench/resume.py [--rounds N]

FLEXNBD_NORESUME_BIN=PATH names a ready build of RESUME_BASE (else one is
built into target/bench-noresume). Traffic stays on 127.0.0.1.
"""

import argparse
import datetime
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as B  # noqa: E402  the shared benchmark helpers

# The build before resuming: its source copies everything again on a retry.
RESUME_BASE = "fd1374d"
SIZE = 4 * B.GIB
DATA = 2 * B.GIB
# The source checkpoints after each max(64 MiB, 1/64 of the image) of data.
INTERVAL = max(64 * B.MIB, SIZE // 64)


def bound(fraction, dirtied, interval):
    """What resuming promises: after an interruption at `fraction` of the data,
    at most the rest of the data, plus what clients dirtied, plus one
    checkpoint interval is sent."""
    return (1 - fraction) * DATA + dirtied + interval


def widest_interval(serve_log):
    """The most data one checkpoint of the run covered (its `checkpoint K
    ... held (T ms after it was asked): N bytes` lines), at least INTERVAL: checkpoints also keep
    250 ms apart, so a fast copy covers more than 64 MiB with each."""
    covers = [int(m.group(1)) for m in re.finditer(r"checkpoint \d+ of migration \w+ held [^:]*: (\d+) bytes",
                                                    serve_log)]
    return max([INTERVAL] + covers)
CASES = [("reset", 0.5), ("reset", 0.9), ("crash", 0.5), ("crash", 0.9)]
BUILDS = ("this", "noresume")


def make_image(workdir):
    path = os.path.join(workdir, "resume-src.raw")
    with open(path, "wb") as f:
        for _ in range(DATA // (4 * B.MIB)):
            f.write(os.urandom(4 * B.MIB))
        f.truncate(SIZE)
    return path


def bytes_received(dest):
    with open(dest + ".COMPLETE") as f:
        m = re.search(r"^bytes_received=(\d+)$", f.read(), re.M)
    return int(m.group(1))


def fired_at(proc):
    """When the fault fired, on the clock of time.perf_counter (the log's
    first field is CLOCK_MONOTONIC milliseconds, as perf_counter is here)."""
    for line in proc.log_text().splitlines():
        if "fault fired:" in line:
            return int(line.split(":", 1)[0]) / 1000.0
    raise RuntimeError(f"no `fault fired` line in the {proc.role} log: {proc.log_text()[-2000:]}")


class Relay:
    """A TCP relay on 127.0.0.1 that counts the bytes each way, for the
    bytes a comparison puts on the wire (requests, replies, digests and
    data). Used in its own runs: its copying adds latency, so no time is
    taken from them."""

    def __init__(self, port):
        self.target = port
        self.up = 0      # source -> destination
        self.down = 0    # destination -> source
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind((B.HOST, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.threads = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                a, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            b = socket.create_connection((B.HOST, self.target), timeout=10)
            for src, dst, way in ((a, b, "up"), (b, a, "down")):
                t = threading.Thread(target=self._pump, args=(src, dst, way), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src, dst, way):
        src.settimeout(0.2)
        try:
            while not self.stop.is_set():
                try:
                    chunk = src.recv(1 << 20)
                except socket.timeout:
                    continue
                if not chunk:
                    break
                dst.sendall(chunk)
                with self.lock:
                    setattr(self, way, getattr(self, way) + len(chunk))
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.sock.close()
        self.acceptor.join(timeout=5)
        for t in self.threads:
            t.join(timeout=5)


class Listen(B.FlexProc):
    """`listen` on a port fixed in advance (a supervisor's restart), with extra flags."""

    def __init__(self, image, workdir, tag, binary, port, extra):
        super().__init__("listen", image, workdir, tag, binary=binary)
        self.fixed = port
        self.extra = extra

    def argv(self):
        argv = super().argv()  # with self.extra at the end
        if self.fixed:
            argv[argv.index("-p") + 1] = str(self.fixed)
        return argv


def one_run(ctx, rnd, build, interrupt, fraction, verify=False, relay=False):
    """One migration; returns its measurements."""
    binary = B.FLEXNBD if build == "this" else ctx.noresume
    tag = (f"{build}-{interrupt}-{int(fraction * 100)}{'-verify' if verify else ''}"
           f"{'-relay' if relay else ''}-{rnd}")
    src = os.path.join(ctx.workdir, f"src-{tag}.raw")
    dst = os.path.join(ctx.workdir, f"dst-{tag}.raw")
    subprocess.run(["cp", "--sparse=always", ctx.image, src], check=True, timeout=600)
    if interrupt == "identical":
        subprocess.run(["cp", "--sparse=always", ctx.image, dst], check=True, timeout=600)
    # "empty": a full copy, the baseline of --verify.
    else:
        with open(dst, "wb") as f:
            f.truncate(SIZE)
    subprocess.run(["sync", "-f", ctx.workdir], check=True, timeout=600)
    n = int(fraction * DATA / B.MIB)
    dest_faults = ["--faults", f"server.request_received.write#{n}=crash"] if interrupt == "crash" else []
    listen = Listen(dst, ctx.workdir, tag, binary, 0, ["--oldstyle-extra-flags"] + dest_faults)
    serve = B.FlexProc("serve", src, ctx.workdir, tag, binary=binary)
    if interrupt == "reset":
        serve.extra = ["--faults", f"mirror.request_send.write#{n}=close"]
    writer = None
    counter = None
    procs = [listen, serve]
    try:
        listen.start()
        serve.start()
        listen.wait_ready()
        serve.wait_ready()
        if interrupt not in ("identical", "empty"):
            writer = B.Writer(serve.port, seed=rnd)
            writer.thread.start()
            if not writer.warm.wait(timeout=30):
                raise RuntimeError(f"writer did not get going: {writer.end_reason}")
        port = listen.port
        if relay:
            counter = Relay(listen.port)
            port = counter.port
        argv = [binary, "mirror", "-s", serve.sock, "-l", B.HOST, "-p", str(port)]
        if verify:
            argv.append("--verify")
        t0 = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, timeout=60, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"mirror exited {out.returncode}: {out.stdout} {out.stderr}")
        restarted = None
        deadline = t0 + 600
        while True:
            if interrupt == "crash" and restarted is None and listen.poll() is not None:
                if listen.popen.returncode == 0:
                    raise RuntimeError("the destination completed before its fault fired")
                restarted = Listen(dst, ctx.workdir, tag + "-again", binary, listen.port,
                                   ["--oldstyle-extra-flags"])
                procs.append(restarted)
                restarted.start()
            last = restarted if interrupt == "crash" else listen
            if last is not None and last.poll() is not None and serve.poll() is not None:
                break
            if serve.poll() not in (None, 0):
                raise RuntimeError(f"serve exited {serve.popen.returncode}: {serve.log_text()[-3000:]}")
            if time.perf_counter() > deadline:
                raise RuntimeError("the migration did not end within 600 s")
            time.sleep(B.POLL)
        t1 = max(last.exit_time, serve.exit_time)
        if last.popen.returncode != 0:
            raise RuntimeError(f"listen exited {last.popen.returncode}: {last.log_text()[-3000:]}")
        res = {"round": rnd, "total_s": t1 - t0, "bytes": bytes_received(dst)}
        if interrupt == "reset":
            res["after_s"] = t1 - fired_at(serve)
        elif interrupt == "crash":
            res["after_s"] = t1 - fired_at(listen)
        # identical, empty: from `mirror` on.
        else:
            res["after_s"] = t1 - t0
        res["resumed"] = "resuming migration" in serve.log_text()
        if counter is not None:
            counter.close()
            res["wire"] = counter.up + counter.down
        if writer is not None:
            writer.stop.set()
            writer.thread.join(timeout=30)
            # What clients dirtied during the migration: every write
            # acknowledged from `mirror` on, 4 KiB each (at most; writes to
            # the same block count once in the image, here each time).
            res["dirtied"] = 4096 * sum(1 for t, _ in writer.acked if t >= t0)
            res["interval"] = widest_interval(serve.log_text())
            res["bound"] = bound(fraction, res["dirtied"], res["interval"])
            res["within"] = res["bytes"] <= res["bound"]
        diff = B.first_difference(src, dst)
        res["identical"] = diff is None
        if diff:
            raise RuntimeError(f"source and destination differ: {diff}")
        return res
    finally:
        if writer is not None:
            writer.stop.set()
            writer.thread.join(timeout=30)
        if counter is not None:
            counter.close()
        for p in procs:
            p.stop()
        for p in (src, dst, dst + ".COMPLETE", dst + ".INCOMPLETE"):
            if os.path.exists(p):
                os.unlink(p)


def section(ctx, info, R, failures, started, finished):
    def vals(key, metric):
        return [r[metric] for r in R.get(key, []) if r.get(metric) is not None]

    def mib(v):
        return f"{v / B.MIB:.0f} MiB"

    def secs(v):
        return f"{v:.2f} s"

    def cell(key, metric, form):
        v = vals(key, metric)
        return f"{form(B.med(v))} ({form(min(v))}–{form(max(v))})" if v else "not measured"

    def ratio(a, b, metric):
        x, y = vals(a, metric), vals(b, metric)
        return B.med(x) / B.med(y) if x and y and B.med(y) > 0 else None

    L = ["## Resume", ""]
    L.append(f"What an interrupted migration costs after the interruption, resumed (this build) against "
             f"copied again from zero (the build before resuming, commit {RESUME_BASE}), measured in the "
             f"same run: {started:%Y-%m-%d} ({started:%H:%M}-{finished:%H:%M} UTC) by `bench/resume.py`, "
             f"{ctx.rounds} round{'' if ctx.rounds == 1 else 's'}.")
    L.append("")
    L.append(f"- this build: commit {info['flexnbd_commit']}, `scripts/build-release`")
    L.append(f"- without resume: {ctx.noresume_what}")
    L.append(f"- machine: {info['cpu']}, {info['nproc']} CPUs, {info['mem_gib']} GiB, kernel {info['kernel']}; "
             f"load average at start {info['loadavg_start']}")
    L.append("- image: 4 GiB, 2 GiB of data then a hole; a writer does 4 KiB random writes through the source "
             "all along; `listen --oldstyle-extra-flags` (holes travel as WRITE_ZEROES, without payload)")
    L.append("- the C flexnbd: not measured (no C binary on this machine); it copies from zero on every retry, "
             "as the build without resume does")
    L.append("")
    L.append("Bytes: the data the completing connection received (the destination's completion record). "
             "Time: from the interruption (the `fault fired` line) to both processes exited. Medians, "
             "(min–max) beside them. Ratio: resumed ÷ from zero (lower is better). Dirtied: what the "
             "writer wrote from `mirror` on (4 KiB per acknowledged write). Interval: the most data one "
             f"checkpoint covered in the run (the source's log; at least {INTERVAL // B.MIB} MiB, and "
             "checkpoints keep 250 ms apart, so a fast copy covers more with each). Bound, per run: the "
             "data left at the interruption + dirtied + that interval; the goal is every resumed run "
             "within its bound.")
    L.append("")
    L.append("| interruption | bytes, resumed | bytes, from zero | ratio | time, resumed | time, from zero "
             "| ratio | dirtied, resumed | interval, resumed | bound, resumed | within the bound | runs |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for interrupt, fraction in CASES:
        a, b = f"this-{interrupt}-{fraction}", f"noresume-{interrupt}-{fraction}"
        rb, rt = ratio(a, b, "bytes"), ratio(a, b, "after_s")
        what = ("network reset" if interrupt == "reset" else "destination crash and restart") + \
            f" at {int(fraction * 100)} %"
        runs = [r for r in R.get(a, []) if "within" in r]
        within = sum(1 for r in runs if r["within"])
        met = f"{within} of {len(runs)}" + ("" if runs and within == len(runs) else " (**no**)")
        fmt = (lambda r: f"{r:.3f}" if r is not None else "n/a")
        L.append(f"| {what} | {cell(a, 'bytes', mib)} | {cell(b, 'bytes', mib)} | {fmt(rb)} | "
                 f"{cell(a, 'after_s', secs)} | {cell(b, 'after_s', secs)} | {fmt(rt)} | "
                 f"{cell(a, 'dirtied', mib)} | {cell(a, 'interval', mib)} | {cell(a, 'bound', mib)} | {met} | "
                 f"{len(R.get(a, []))}/{len(R.get(b, []))} |")
    L.append("")
    resumed = sum(1 for k, runs in R.items() if k.startswith("this-") and not k.endswith("identical")
                  for r in runs if r.get("resumed"))
    tried = sum(len(runs) for k, runs in R.items() if k.startswith("this-") and not k.endswith("identical"))
    L.append(f"This build's interrupted runs that logged `resuming migration`: {resumed} of {tried}. Every "
             f"run's destination was compared with its source byte for byte afterwards.")
    L.append("")
    L.append("### Comparing an identical copy (`mirror --verify`)")
    L.append("")
    L.append("`mirror --verify` to a destination that already holds an identical copy of the 4 GiB image, "
             "against a full copy of it to an empty destination; no writer. Bytes: data received by the "
             "destination; time: `mirror` issued to both processes exited. (A plain `mirror` to the identical "
             "copy compares by itself too, as the destination holds no checkpoint of its migration.)")
    L.append("")
    L.append("| mirror | bytes | time | runs |")
    L.append("|---|---|---|---|")
    for key, label in (("verify-identical", "`mirror --verify` to a destination holding an identical copy"),
                       ("full-empty", "`mirror` to an empty destination (a full copy)")):
        L.append(f"| {label} | {cell(key, 'bytes', mib)} | {cell(key, 'after_s', secs)} | {len(R.get(key, []))} |")
    rb, rt = ratio("verify-identical", "full-empty", "bytes"), ratio("verify-identical", "full-empty", "after_s")
    if rb is not None and rt is not None:
        L.append("")
        L.append(f"--verify ÷ full copy: data bytes {rb:.4f}, time {rt:.2f}.")
    wire = vals("verify-relay", "wire")
    if wire:
        L.append("")
        L.append(f"Everything on the wire during `mirror --verify` to the identical copy (requests, replies, "
                 f"digests and data, both ways; counted by a relay in runs of their own, untimed): "
                 f"{cell('verify-relay', 'wire', lambda v: f'{v / B.MIB:.2f} MiB')}, "
                 f"{B.med(wire) / SIZE:.4%} of the image (goal: at most 1 %), {len(wire)} runs.")
    else:
        L.append("")
        L.append("Everything on the wire during `mirror --verify`: not measured (the relay runs failed).")
    if failures:
        L.append("")
        L.append("### Failed runs")
        L.append("")
        L.extend(f"- {f[:400]}" for f in failures)
    L.append("")
    return L


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="",
                    help="comma-separated cases to run, e.g. reset-0.9,crash-0.9 (a probe: the section "
                         "then holds only those)")
    ap.add_argument("--skip-build", action="store_true", help="use the existing target/bench binary")
    ap.add_argument("--output", default=os.path.join(B.REPO, "BENCHMARKS.md"))
    args = ap.parse_args()
    ctx = B.Ctx()
    ctx.rounds = max(1, min(args.rounds, 20))
    if not args.skip_build:
        B.build()
    given = os.environ.get("FLEXNBD_NORESUME_BIN")
    if given:
        ctx.noresume = given
        ctx.noresume_what = f"`FLEXNBD_NORESUME_BIN` ({given}), meant to be a build of {RESUME_BASE}"
    else:
        ctx.noresume = B.build_commit(RESUME_BASE, "noresume", "the resume rows")
        ctx.noresume_what = f"commit {RESUME_BASE}, built by this run with `scripts/build-release`"
    info = B.machine_info()
    started = datetime.datetime.now(datetime.timezone.utc)
    ctx.workdir = tempfile.mkdtemp(prefix="flexnbd-resume-", dir="/var/tmp")
    R, failures = {}, []
    try:
        B.log(f"creating the 4 GiB image in {ctx.workdir}")
        ctx.image = make_image(ctx.workdir)
        for rnd in range(1, ctx.rounds + 1):
            plan = [(build, i, f) for i, f in CASES for build in BUILDS]
            plan += [("this", "identical", 1.0, True), ("this", "empty", 1.0, False),
                     ("this", "identical", 1.0, True, True)]
            if args.only:
                wanted = set(args.only.split(","))
                plan = [p for p in plan if f"{p[1]}-{p[2]}" in wanted]
            for item in plan:
                build, interrupt, fraction = item[:3]
                verify = item[3] if len(item) > 3 else False
                relay = item[4] if len(item) > 4 else False
                key = ("verify-relay" if relay else "verify-identical" if interrupt == "identical"
                       else "full-empty" if interrupt == "empty" else f"{build}-{interrupt}-{fraction}")
                try:
                    res = one_run(ctx, rnd, build, interrupt, fraction, verify, relay)
                except Exception as e:
                    msg = f"round {rnd} {key}: {e}"
                    B.log("FAILED " + msg[:2000])
                    failures.append(msg.replace("\n", " ")[:1000])
                    continue
                R.setdefault(key, []).append(res)
                B.log(f"round {rnd} {key:22} bytes {res['bytes'] / B.MIB:8.1f} MiB  after {res['after_s']:.2f} s"
                      f"  total {res['total_s']:.2f} s  resumed {res['resumed']}")
    finally:
        B.stop_all()
        shutil.rmtree(ctx.workdir, ignore_errors=True)
    finished = datetime.datetime.now(datetime.timezone.utc)
    try:
        with open(args.output) as f:
            text = f.read()
    except FileNotFoundError:
        text = "# Benchmarks\n"
    text = B.splice_section(text, "## Resume", section(ctx, info, R, failures, started, finished))
    with open(args.output, "w") as f:
        f.write(text)
    B.log(f"updated the Resume section of {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        B.stop_all()
