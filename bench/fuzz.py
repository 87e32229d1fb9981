"""A long fuzzing run: the "## Fuzzing" section of BENCHMARKS.md.

Runs every fuzz target (scripts/fuzz) for SECONDS each, LANES at a time
(one per core), keeps each target's libFuzzer log, and reports per target:
executions, executions per second, coverage when its seeds were loaded and
at the end (libFuzzer's `cov`: edges; `ft`: features), corpus size, peak
RSS, and whether it found anything (a crash, a hang, an over-allocation:
the input is then in fuzz/artifacts/TARGET/).

    /usr/bin/python3 bench/fuzz.py [--seconds 400] [--lanes 2] [--targets a,b] [--output FILE] [--heading "## ..."]
    /usr/bin/python3 bench/fuzz.py --report-only DIR     # the section from logs already in DIR
"""

import argparse
import datetime
import os
import re
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as B  # noqa: E402  the shared benchmark helpers


def targets():
    text = open(os.path.join(B.REPO, "fuzz", "Cargo.toml")).read()
    return [t for t in re.findall(r'^name = "(.*)"$', text, re.M) if t != "flexnbd-fuzz"]


def run_lanes(names, seconds, lanes, logdir):
    os.makedirs(logdir, exist_ok=True)
    queue = list(names)
    lock = threading.Lock()

    def lane():
        while True:
            with lock:
                if not queue:
                    return
                t = queue.pop(0)
            start = time.time()
            with open(os.path.join(logdir, f"{t}.log"), "w") as log:
                rc = subprocess.run([os.path.join(B.REPO, "scripts", "fuzz"), t, str(seconds)],
                                    cwd=B.REPO, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=seconds + 1800).returncode
            with open(os.path.join(logdir, "summary"), "a") as f:
                f.write(f"{t} rc={rc} start={int(start)} end={int(time.time())}\n")

    threads = [threading.Thread(target=lane) for _ in range(lanes)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def parse(logdir, name):
    path = os.path.join(logdir, f"{name}.log")
    if not os.path.exists(path):
        return None
    text = open(path, errors="replace").read()
    r = {"target": name}
    inited = re.search(r"#\d+\s+INITED cov: (\d+) ft: (\d+) corp: (\d+)", text)
    done = re.search(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", text)
    runs = re.search(r"Done (\d+) runs in (\d+) second", text)
    rss = re.search(r"stat::peak_rss_mb:\s+(\d+)", text)
    eps = re.search(r"stat::average_exec_per_sec:\s+(\d+)", text)
    r["seed_cov"] = int(inited.group(1)) if inited else None
    r["seed_ft"] = int(inited.group(2)) if inited else None
    r["seeds"] = int(inited.group(3)) if inited else None
    r["cov"] = int(done.group(2)) if done else None
    r["ft"] = int(done.group(3)) if done else None
    r["corpus"] = f"{done.group(4)} ({done.group(5)})" if done else None
    r["runs"] = int(runs.group(1)) if runs else None
    r["seconds"] = int(runs.group(2)) if runs else None
    r["exec_s"] = int(eps.group(1)) if eps else None
    r["rss_mb"] = int(rss.group(1)) if rss else None
    found = re.findall(r"(deadly signal|ERROR: libFuzzer: [^\n]+|panicked at [^\n]+|fuzz allocator: [^\n]+)", text)
    r["found"] = "; ".join(sorted(set(found))) if found else "nothing"
    return r


def section(rows, info, heading="## Fuzzing"):
    L = [heading, ""]
    L.append(info)
    L.append("")
    L.append("| target | time | executions | per second | coverage at its seeds (cov / ft) | at the end "
             "(cov / ft) | corpus at the end | peak RSS | found |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    total_s = total_runs = 0
    for r in rows:
        if r is None:
            continue
        total_s += r["seconds"] or 0
        total_runs += r["runs"] or 0
        L.append(f"| `{r['target']}` | {r['seconds']} s | {r['runs']:,} | {r['exec_s']:,} | "
                 f"{r['seed_cov']} / {r['seed_ft']} ({r['seeds']} inputs) | {r['cov']} / {r['ft']} | "
                 f"{r['corpus']} | {r['rss_mb']} MB | {r['found']} |")
    L.append("")
    L.append(f"In all: {total_s / 60:.1f} minutes of fuzzing, {total_runs:,} executions. `cov` counts the "
             "instrumented edges reached, `ft` libFuzzer's features (edges with hit counts and comparisons).")
    L.append("")
    return L


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=400)
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--targets", default=None)
    ap.add_argument("--report-only", default=None, metavar="DIR")
    ap.add_argument("--commit", default=None,
                    help="the code the logs came from, for --report-only (default: HEAD)")
    ap.add_argument("--output", default=os.path.join(B.REPO, "BENCHMARKS.md"))
    ap.add_argument("--heading", default="## Fuzzing",
                    help="the section of the output to write; a run of a few targets can go in its own "
                         "section and leave the long run's standing")
    args = ap.parse_args()
    names = args.targets.split(",") if args.targets else targets()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=B.REPO, capture_output=True,
                            text=True).stdout.strip()
    commit = args.commit or commit
    if args.report_only:
        logdir = args.report_only
        when = datetime.datetime.fromtimestamp(os.path.getmtime(os.path.join(logdir, "summary")))
        how = f"from the logs in {logdir}"
    else:
        logdir = os.path.join("/var/tmp", f"flexnbd-fuzz-{int(time.time())}")
        run_lanes(names, args.seconds, args.lanes, logdir)
        when = datetime.datetime.now()
        how = f"{args.seconds} s a target, {args.lanes} at a time"
    rows = [parse(logdir, n) for n in names]
    info = (f"A long run by `bench/fuzz.py` ({how}), finished {when:%Y-%m-%d %H:%M}, flexnbd commit "
            f"{commit}; {os.cpu_count()} CPUs. Every target started from its committed seeds and "
            "regressions (`fuzz/corpus`, `fuzz/regressions`) and what earlier runs on this machine "
            "had added (`target/fuzz-corpus`).")
    text = open(args.output).read() if os.path.exists(args.output) else "# Benchmarks\n"
    text = B.splice_section(text, args.heading, section(rows, info, args.heading))
    with open(args.output, "w") as f:
        f.write(text)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
