#!/bin/bash
# Benchmark the backups of issue 13 against the jobs they replace, in the
# same run, reporting medians and ratios:
#   1. rescan: `cbt backup --rescan` after the checkpoint's bitmap was lost
#      (removed with qemu-img bitmap --remove), BENCH_DIRTY% of the 64 KiB
#      clusters changed since the previous backup, against the full backup
#      it replaces (`cbt backup --full`) and against `qemu-img convert -O
#      qcow2 -t writeback` of the same disk (QEMU's tool reading the whole
#      disk and writing a copy, flushing as cbt does): time and bytes
#      written;
#   2. compression: `cbt backup --full --compress=zstd` against `qemu-img
#      convert -c -O qcow2 -o compression_type=zstd -t writeback` of the
#      same disk: time and file size (and the plain full backup).
# Usage: bench/rescan.sh [--quick] CBT_BINARY
# Environment:
#   BENCH_SIZE    virtual disk size (default 4G; --quick: 256M)
#   BENCH_RUNS    runs per job; the median is reported (default 3)
#   BENCH_DIRTY   percent of clusters changed before the rescan (default 1)
#   BENCH_SEED    seed of the content and of the changes (default 1)
#   BENCH_ONLY    "rescan" or "compress": one section only
# The disk: per 1 MiB, 50% random data, 15% text, 10% zero bytes written as
# data, 25% never written (bench/backup.sh's mix).  Warm page cache: every
# job reads the disk from memory (the disk fits in it), one untimed round of
# every job first.
set -euo pipefail
PY=${PYTHON:-/usr/bin/python3}
exec "$PY" - "$0" "$@" <<'PYTHON_EOF'
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SELF = os.path.abspath(sys.argv[1])
ARGS = sys.argv[2:]
sys.path.insert(0, os.path.dirname(SELF))
from benchlib import (CLUSTER, MIB, die, dirty_commands,  # noqa: E402
                      human, log, make_disk, parse_size, run)


def feed(disk, cmds, work):
    p = os.path.join(work, "cmds")
    with open(p, "w") as f:
        f.writelines(cmds)
    with open(p) as f:
        run(["qemu-io", "-f", "qcow2", disk], stdin=f)


def change(work, disk, size, percent, seed):
    """Rewrite percent% of the clusters (seeded): 90% new data, 10%
    zeroes."""
    cmds, n = dirty_commands(size, percent, seed)
    feed(disk, cmds, work)
    return n


def timed(argv):
    t0 = time.monotonic()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    t = time.monotonic() - t0
    if p.returncode != 0:
        die("%s failed (exit %d):\n  %s" % (
            shlex.join(argv), p.returncode,
            p.stdout.decode(errors="replace").strip()[-800:]))
    return t, p.stdout.decode(errors="replace")


def remove(*paths):
    for p in paths:
        for suffix in ("", ".json", ".tree", ".hashes"):
            if os.path.exists(p + suffix):
                os.unlink(p + suffix)


def warm(path):
    with open(path, "rb") as f:
        while f.read(8 * MIB):
            pass


def rel(argv, work):
    return " ".join(os.path.basename(a) if a.startswith(work) or
                    a.endswith("/cbt") else a for a in argv)


def main():
    quick = "--quick" in ARGS
    rest = [a for a in ARGS if a != "--quick"]
    if len(rest) != 1:
        die("usage: bench/rescan.sh [--quick] CBT_BINARY")
    cbt = os.path.abspath(rest[0])
    size = parse_size(os.environ.get("BENCH_SIZE", "256M" if quick else "4G"))
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    percent = int(os.environ.get("BENCH_DIRTY", "1"))
    seed = int(os.environ.get("BENCH_SEED", "1"))
    only = os.environ.get("BENCH_ONLY", "")
    work = tempfile.mkdtemp(prefix="cbt-bench-rescan-")
    try:
        disk = os.path.join(work, "disk.qcow2")
        log("making a %s disk ..." % human(size))
        make_disk(work, disk, size, seed)
        log("cbt %s; qemu-img %s; %d CPUs; size %s; %d runs (median)" % (
            run([cbt, "--version"]).strip(),
            run(["qemu-img", "--version"]).splitlines()[0],
            os.cpu_count(), human(size), runs))
        if only in ("", "rescan"):
            bench_rescan(cbt, work, disk, size, runs, percent, seed)
        if only in ("", "compress"):
            bench_compress(cbt, work, disk, size, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_rescan(cbt, work, disk, size, runs, percent, seed):
    repo = os.path.join(work, "repo")
    os.mkdir(repo)
    full0 = os.path.join(repo, "full0.qcow2")
    run([cbt, "backup", "--full", "--checkpoint", "c0", disk, full0])
    n = change(work, disk, size, percent, seed + 1)
    run(["qemu-img", "bitmap", "--remove", disk, "c0"])
    warm(disk)
    inc = os.path.join(repo, "inc.qcow2")
    full = os.path.join(repo, "full.qcow2")
    copy = os.path.join(work, "copy.qcow2")
    jobs = {
        "cbt backup --rescan": ([cbt, "backup", "--rescan", "--checkpoint",
                                 "r", disk, inc], inc),
        "cbt backup --full": ([cbt, "backup", "--full", "--checkpoint", "r",
                               disk, full], full),
        "qemu-img convert -t writeback": (
            ["qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O",
             "qcow2", disk, copy], copy),
    }
    times = {k: [] for k in jobs}
    sizes = {}
    out = {}
    for rnd in range(runs + 1):          # round 0: warm-up, not counted
        for name, (argv, target) in jobs.items():
            t, text = timed(argv)
            if rnd:
                times[name].append(t)
            sizes[name] = os.path.getsize(target)
            out[name] = text
            if name.startswith("cbt"):
                # the next round starts from the same state
                run([cbt, "checkpoint", "delete", disk, "r"])
            remove(target)
    med = {k: statistics.median(v) for k, v in times.items()}
    print()
    print("rescan after a lost bitmap: %s disk, %d of %d clusters (%d%%) "
          "changed since the previous backup" % (
              human(size), n, size // CLUSTER, percent))
    print("%-32s %10s %12s" % ("job", "median s", "file size"))
    for k in jobs:
        print("%-32s %10.2f %12s" % (k, med[k], human(sizes[k])))
    r = med["cbt backup --rescan"]
    print("ratio rescan / full backup: %.2f; rescan / qemu-img convert: %.2f;"
          " file size rescan / full: %.4f" % (
              r / med["cbt backup --full"],
              r / med["qemu-img convert -t writeback"],
              sizes["cbt backup --rescan"] / sizes["cbt backup --full"]))
    for k, (argv, _) in jobs.items():
        print("  %s: %s" % (k, rel(argv, work)))
    print(out["cbt backup --rescan"].strip())


def bench_compress(cbt, work, disk, size, runs):
    warm(disk)
    repo = os.path.join(work, "crepo")
    os.mkdir(repo)
    zc = os.path.join(repo, "z.qcow2")
    pc = os.path.join(repo, "p.qcow2")
    qc = os.path.join(work, "q.qcow2")
    jobs = {
        "cbt backup --full --compress=zstd": (
            [cbt, "backup", "--full", "--no-checkpoint", "--compress=zstd",
             disk, zc], zc),
        "qemu-img convert -c zstd": (
            ["qemu-img", "convert", "-c", "-t", "writeback", "-f", "qcow2",
             "-O", "qcow2", "-o", "compression_type=zstd", disk, qc], qc),
        "cbt backup --full": (
            [cbt, "backup", "--full", "--no-checkpoint", disk, pc], pc),
    }
    times = {k: [] for k in jobs}
    sizes = {}
    for rnd in range(runs + 1):          # round 0: warm-up, not counted
        for name, (argv, target) in jobs.items():
            t, _ = timed(argv)
            if rnd:
                times[name].append(t)
            sizes[name] = os.path.getsize(target)
            if rnd == runs and name.startswith("cbt backup --full --c"):
                # the oracle: qemu-img reads it as the disk
                run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                     disk, target])
            remove(target)
    med = {k: statistics.median(v) for k, v in times.items()}
    print()
    print("compressed full backup: %s disk (%s of data)" % (
        human(size), human(sizes["cbt backup --full"])))
    print("%-36s %10s %12s" % ("job", "median s", "file size"))
    for k in jobs:
        print("%-36s %10.2f %12s" % (k, med[k], human(sizes[k])))
    c, q = "cbt backup --full --compress=zstd", "qemu-img convert -c zstd"
    print("ratio cbt / qemu-img: time %.2f, size %.3f; compressed / plain "
          "backup: time %.2f, size %.3f" % (
              med[c] / med[q], sizes[c] / sizes[q],
              med[c] / med["cbt backup --full"],
              sizes[c] / sizes["cbt backup --full"]))
    for k, (argv, _) in jobs.items():
        print("  %s: %s" % (k, rel(argv, work)))


main()
PYTHON_EOF
