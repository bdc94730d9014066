#!/bin/bash
# Does what a backup costs follow the change or the disk's size?  Times cbt
# against the QEMU tool doing the same job, in the same run, with peak RSS
# from /usr/bin/time -v, and reports ratios (cbt / QEMU: below 1 means cbt
# is faster or smaller):
#   bitmaps  two bitmaps of 4 KiB granularity on a 16 TiB disk (512 MiB of
#            bits each, a dirty granule in every 128 MiB so that every page
#            of cbt's bitmap holds memory): cbt bitmap --merge / --clear /
#            --remove against qemu-img bitmap; --count / --dump / --sha256
#            against qemu-nbd -r -B + nbdinfo --map (the QEMU route that
#            reads a bitmap out);
#   backup   for each virtual size (default 1G 1T 16T), a disk with 100 MiB
#            (1600 x 64 KiB) written into its first GiB:
#            full backup of the empty disk vs qemu-img convert -t writeback;
#            incremental of the 100 MiB vs qemu-storage-daemon's
#            blockdev-backup sync=bitmap (bench/backup.sh --qsd-incremental);
#            verify of the incremental vs qemu-img compare of its chain with
#            the disk; restore vs qemu-img convert -t writeback of the chain;
#            with the metadata bytes each backup writes (.tree + .json;
#            .hashes for a cbt before sha256-tree-v2);
#   chain    a full + BENCH_CHAIN_LEN incrementals (each 100 x 64 KiB
#            rewritten): cbt restore and cbt verify of the last vs qemu-img
#            convert -t writeback of the chain.
# Usage: bench/scale.sh CBT_BINARY [PART...]     (parts: bitmaps backup chain;
#        default all)
# Environment:
#   BENCH_SIZES        virtual sizes of the backup part (default "1G 1T 16T")
#   BENCH_BITMAP_SIZE  disk of the bitmaps part (default 16T)
#   BENCH_RUNS         runs per job and tool; the median is reported (3)
#   BENCH_BIG_RUNS     runs for sizes above 1 TiB (default 1)
#   BENCH_CHAIN_LEN    incrementals of the chain part (default 50)
#   BENCH_CHAIN_SIZE   virtual size of the chain part's disk (default 1G)
#   BENCH_CBT_BEFORE   another cbt binary (e.g. the last release) timed in
#                      the same runs: a "before" column and after/before
#   BENCH_BEFORE_MAX   the largest disk the before binary runs on (default
#                      1T: before issue 14, cbt took 8-16 GiB of memory at
#                      16 TiB, enough to push a shared machine into OOM)
#   BENCH_WORK         work folder (default bench/work/scale; removed at the
#                      end).  Needs qemu-img, qemu-io, qemu-nbd, nbdinfo,
#                      qemu-storage-daemon and /usr/bin/time.
# See bench/README.md; results go to bench/RESULTS.md by hand.
set -euo pipefail
PY=${PYTHON:-/usr/bin/python3}
exec "$PY" - "$0" "$@" <<'PYTHON_EOF'
import json
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

SELF = os.path.abspath(sys.argv[1])
ARGS = sys.argv[2:]
BENCH = os.path.dirname(SELF)
sys.path.insert(0, BENCH)
from benchlib import MIB, die, human, log, parse_size, run  # noqa: E402

GIB = 1 << 30
TIB = 1 << 40
if not ARGS:
    die("usage: bench/scale.sh CBT_BINARY [bitmaps] [backup] [chain]")
CBT = os.path.abspath(ARGS[0])
BEFORE = os.environ.get("BENCH_CBT_BEFORE")
BEFORE = os.path.abspath(BEFORE) if BEFORE else None
BEFORE_MAX = parse_size(os.environ.get("BENCH_BEFORE_MAX", "1T"))
PARTS = ARGS[1:] or ["bitmaps", "backup", "chain"]
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
BIG_RUNS = int(os.environ.get("BENCH_BIG_RUNS", "1"))
WORK = os.path.abspath(os.environ.get("BENCH_WORK",
                                      os.path.join(BENCH, "work", "scale")))
BACKUP_SH = os.path.join(BENCH, "backup.sh")
ROWS = []


def timed(argv, cwd=None, check=None):
    """Run argv under /usr/bin/time -v: (seconds, peak RSS bytes, stdout,
    CPU seconds: user + system)."""
    full = ["/usr/bin/time", "-v"] + argv
    p = subprocess.run(full, cwd=cwd, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = p.stderr.decode(errors="replace")
    if p.returncode != 0:
        die("%s failed (exit %d):\n%s" % (shlex.join(argv), p.returncode,
                                          err[-2000:]))
    m = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)",
                  err)
    secs = (int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 +
            float(m.group(3)))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)",
                        err).group(1)) * 1024
    cpu = sum(float(re.search(r"%s time \(seconds\): ([\d.]+)" % k,
                              err).group(1)) for k in ("User", "System"))

    out = p.stdout.decode(errors="replace")
    if check:
        check(out)
    return secs, rss, out, cpu


def median_runs(n, prepare, argv_fn, cwd=None, check=None, after=None):
    """n runs of prepare() (untimed), then the timed command; medians."""
    ts, rs, cs, out = [], [], [], ""
    for i in range(n):
        if prepare:
            prepare()
        t, r, out, cpu = timed(argv_fn(), cwd=cwd, check=check)
        ts.append(t)
        rs.append(r)
        cs.append(cpu)
        if after:
            after(out)
    return (statistics.median(ts), statistics.median(rs), out,
            statistics.median(cs))


def cbt_runs(n, prepare, argv_fn, cwd=None, check=None, size=0):
    """median_runs of argv_fn(binary) for cbt, and for BEFORE when given
    (and size <= BEFORE_MAX), alternating which goes first: (cbt's,
    before's or None)."""
    if not BEFORE or size > BEFORE_MAX:
        return median_runs(n, prepare, lambda: argv_fn(CBT), cwd, check), None
    res = {CBT: [[], [], "", []], BEFORE: [[], [], "", []]}
    for i in range(n):
        for binary in ((CBT, BEFORE) if i % 2 == 0 else (BEFORE, CBT)):
            if prepare:
                prepare()
            t, r, out, cpu = timed(argv_fn(binary), cwd=cwd, check=check)
            res[binary][0].append(t)
            res[binary][1].append(r)
            res[binary][2] = out
            res[binary][3].append(cpu)
    a, b = res[CBT], res[BEFORE]
    med = statistics.median
    return ((med(a[0]), med(a[1]), a[2], med(a[3])),
            (med(b[0]), med(b[1]), b[2], med(b[3])))


def row(line, cbt, qemu, cbt_cmd, qemu_cmd, extra="", before=None):
    t1, r1 = cbt[:2]
    t2, r2 = qemu[:2]
    t0, r0 = before[:2] if before else (0, 0)
    extra = ("CPU s cbt %.2f, QEMU %.2f%s; " % (
        cbt[3], qemu[3], ", before %.2f" % before[3] if before else "") +
        extra).rstrip("; ")
    ROWS.append((line, t1, r1, t2, r2, cbt_cmd, qemu_cmd, extra, t0, r0))
    log("  %-34s cbt %8.3f s %10s | QEMU %8.3f s %10s | %5.2fx time %5.2fx "
        "RSS %s%s" % (line, t1, human(r1), t2, human(r2),
                      t1 / t2 if t2 else 0, r1 / r2 if r2 else 0, extra,
                      " | before %.3f s %s" % (t0, human(r0))
                      if before else ""))


def fresh(src, dst):
    if os.path.exists(dst):
        os.unlink(dst)
    run(["cp", "--sparse=always", "--reflink=auto", src, dst])
    # The copy's writeback is not the timed tool's: without this, whichever
    # tool flushes first pays for up to 1.7 GB of it (16 TiB bitmaps).
    os.sync()


def rm(*paths):
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)


# ---------------------------------------------------------------------------
# bitmaps

def qemu_io(img, cmds):
    p = subprocess.run(["qemu-io", "-f", "qcow2", "-t", "writeback", img],
                       input="".join(cmds).encode(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    out = p.stdout.decode(errors="replace").replace("qemu-io>", "").strip()
    if p.returncode != 0 or out:
        die("qemu-io on %s: %s" % (img, out[-500:]))


def nbd_totals(out, ctx):
    """Dirty bytes from nbdinfo --map --totals output (type 1 = dirty)."""
    total = 0
    for ln in out.splitlines():
        f = ln.split()
        if len(f) >= 3 and f[2] == "1":
            total += int(f[0])
    return total


def part_bitmaps():
    size = parse_size(os.environ.get("BENCH_BITMAP_SIZE", "16T"))
    d = os.path.join(WORK, "bitmaps")
    os.makedirs(d, exist_ok=True)
    tmpl = os.path.join(d, "tmpl.qcow2")
    img = os.path.join(d, "img.qcow2")
    log("bitmaps: %s disk, two 4 KiB bitmaps, one dirty granule per "
        "128 MiB (untimed setup)" % human(size))
    rm(tmpl)
    # 2 MiB clusters keep the image's L2 tables small: zero writes leave
    # zero clusters, and only the bitmaps' own clusters take room.
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M",
         tmpl, str(size)])
    run(["qemu-img", "bitmap", "--add", "-g", "4K", tmpl, "b1"])
    step = 128 * MIB
    n = size // step
    def cmds(parity):
        return ["write -z -q %d 4k\n" % (k * step + (k * 7919 % 32768) * 4096)
                for k in range(parity, n, 2)]
    qemu_io(tmpl, cmds(0))
    run(["qemu-img", "bitmap", "--add", "-g", "4K", tmpl, "b2"])
    qemu_io(tmpl, cmds(1))
    log("  b1: %d dirty granules, b2: %d" % (n, n // 2))

    def prep():
        fresh(tmpl, img)

    def nbd_map(bm, extra=()):
        return (["nbdinfo", "--map=qemu:dirty-bitmap:" + bm] + list(extra) +
                ["--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", bm, img,
                 "]"])

    # Actions: a fresh copy of the image before every run of either tool.
    results = {}
    for name, cbt_args, qemu_args in (
            ("merge b1 into b2", ["--merge", "b1", img, "b2"],
             ["--merge", "b1", img, "b2"]),
            ("clear b1", ["--clear", img, "b1"], ["--clear", img, "b1"]),
            ("remove b1", ["--remove", img, "b1"], ["--remove", img, "b1"])):
        c, cb = cbt_runs(RUNS, prep, lambda x: [x, "bitmap"] + cbt_args)
        cbt_map = timed(nbd_map("b2" if "merge" in name else "b1")
                        )[2] if "remove" not in name else ""
        q = median_runs(RUNS, prep, lambda: ["qemu-img", "bitmap"] + qemu_args)
        q_map = timed(nbd_map("b2" if "merge" in name else "b1")
                      )[2] if "remove" not in name else ""
        if cbt_map != q_map:
            die("%s: the bitmap after cbt differs from the one after qemu-img"
                % name)
        row("bitmap " + name, c, q,
            "cbt bitmap " + " ".join(cbt_args).replace(img, "IMG"),
            "qemu-img bitmap " + " ".join(qemu_args).replace(img, "IMG"), before=cb)
        results[name] = c
    prep()
    q = median_runs(RUNS, None, lambda: nbd_map("b1", ["--totals"]))
    want = nbd_totals(q[2], "b1")
    c, cb = cbt_runs(RUNS, None, lambda x: [x, "bitmap", "--count", img, "b1"])
    if int(c[2].strip()) != want:
        die("count: cbt says %s, nbdinfo %d" % (c[2].strip(), want))
    row("bitmap --count b1", c, q, "cbt bitmap --count IMG b1",
        "nbdinfo --map=qemu:dirty-bitmap:b1 --totals -- [ qemu-nbd -r -f "
        "qcow2 -B b1 IMG ]", before=cb)
    q = median_runs(RUNS, None, lambda: nbd_map("b1"))
    c, cb = cbt_runs(RUNS, None, lambda x: [x, "bitmap", "--dump", img, "b1"])
    if c[2] != q[2]:
        die("dump: cbt's output differs from nbdinfo --map's")
    row("bitmap --dump b1", c, q, "cbt bitmap --dump IMG b1",
        "nbdinfo --map=qemu:dirty-bitmap:b1 -- [ qemu-nbd -r -f qcow2 -B b1 "
        "IMG ]", before=cb)
    c, cb = cbt_runs(RUNS, None, lambda x: [x, "bitmap", "--sha256", img,
                                         "b1"])
    row("bitmap --sha256 b1", c, q, "cbt bitmap --sha256 IMG b1",
        "(the --dump route: QEMU has no bitmap hash)", before=cb)
    rm(d)


# ---------------------------------------------------------------------------
# backup

def dirty_cmds(seed, count, span, size):
    rng = random.Random(seed)
    blocks = rng.sample(range(min(span, size) // 65536), count)
    return ["write -q -P %d %d 64k\n" % (1 + (i % 250), b * 65536)
            for i, b in enumerate(sorted(blocks))]


META = (".tree", ".hashes", ".json")


def meta_bytes(target):
    return sum(os.path.getsize(target + s) for s in META
               if os.path.exists(target + s))


def part_backup():
    sizes = os.environ.get("BENCH_SIZES", "1G 1T 16T").split()
    for s in sizes:
        size = parse_size(s)
        runs = RUNS if size <= TIB else BIG_RUNS
        d = os.path.join(WORK, "backup-" + s)
        rm(d)
        os.makedirs(d)
        disk0 = os.path.join(d, "disk0.qcow2")
        disk = os.path.join(d, "disk.qcow2")
        bk = os.path.join(d, "bk")
        os.makedirs(bk)
        log("backup: %s virtual, 100 MiB dirty in its first GiB "
            "(%d run(s))" % (human(size), runs))
        run(["qemu-img", "create", "-q", "-f", "qcow2", disk0, str(size)])

        # Full backup of the empty disk.
        full = os.path.join(bk, "full.qcow2")
        def prep_full():
            fresh(disk0, disk)
            rm(full, *[full + m for m in META])
        c, cb = cbt_runs(runs, prep_full, lambda x: [
            x, "backup", "--full", "--checkpoint", "c0", disk, full], size=size)
        meta_full = meta_bytes(full)
        out = os.path.join(d, "convert.qcow2")
        q = median_runs(runs, lambda: rm(out), lambda: [
            "qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O",
            "qcow2", disk, out])
        rm(out)
        row("%s full (empty disk)" % s, c, q,
            "cbt backup --full --checkpoint c0 DISK full.qcow2",
            "qemu-img convert -t writeback -f qcow2 -O qcow2 DISK OUT",
            "metadata %s" % human(meta_full), before=cb)

        # 100 MiB into the disk (c0 records it): the dirty template.
        qemu_io(disk, dirty_cmds(1, 1600, GIB, size))
        dirty = os.path.join(d, "dirty.qcow2")
        shutil.move(disk, dirty)
        inc = os.path.join(bk, "inc.qcow2")
        def prep_inc():
            fresh(dirty, disk)
            rm(inc, *[inc + m for m in META])
        c, cb = cbt_runs(runs, prep_inc, lambda x: [
            x, "backup", "--incremental", "--checkpoint", "c1", disk, inc], size=size)
        meta_inc = meta_bytes(inc)
        qinc = os.path.join(bk, "qinc.qcow2")
        def prep_qsd():
            fresh(dirty, disk)
            rm(qinc)
        q = median_runs(runs, prep_qsd, lambda: [
            BACKUP_SH, "--qsd-incremental", disk, "c0", "c1", full, qinc])
        run(["qemu-img", "compare", "-q", dirty, inc])
        run(["qemu-img", "compare", "-q", dirty, qinc])
        row("%s incremental 100 MiB" % s, c, q,
            "cbt backup --incremental --checkpoint c1 DISK inc.qcow2",
            "bench/backup.sh --qsd-incremental DISK c0 c1 full.qcow2 "
            "qinc.qcow2 (QSD blockdev-backup sync=bitmap)",
            "metadata %s" % human(meta_inc), before=cb)

        c, cb = cbt_runs(runs, None, lambda x: [x, "verify", inc], size=size)
        q = median_runs(runs, None, lambda: [
            "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", dirty, inc])
        row("%s verify incremental" % s, c, q, "cbt verify inc.qcow2",
            "qemu-img compare -f qcow2 -F qcow2 DISK inc.qcow2", before=cb)
        out = os.path.join(d, "restored.qcow2")
        c, cb = cbt_runs(runs, lambda: rm(out), lambda x: [
            x, "restore", "-O", "qcow2", inc, out], size=size)
        run(["qemu-img", "compare", "-q", dirty, out])
        q = median_runs(runs, lambda: rm(out), lambda: [
            "qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O",
            "qcow2", inc, out])
        row("%s restore incremental" % s, c, q,
            "cbt restore -O qcow2 inc.qcow2 OUT",
            "qemu-img convert -t writeback -f qcow2 -O qcow2 inc.qcow2 OUT", before=cb)
        rm(d)


# ---------------------------------------------------------------------------
# chain

def part_chain():
    n = int(os.environ.get("BENCH_CHAIN_LEN", "50"))
    size = parse_size(os.environ.get("BENCH_CHAIN_SIZE", "1G"))
    d = os.path.join(WORK, "chain")
    rm(d)
    os.makedirs(d)
    disk = os.path.join(d, "disk.qcow2")
    bk = os.path.join(d, "bk")
    os.makedirs(bk)
    log("chain: %s disk, 256 MiB written, a full + %d incrementals of "
        "100 x 64 KiB each (untimed setup)" % (human(size), n))
    run(["qemu-img", "create", "-q", "-f", "qcow2", disk, str(size)])
    qemu_io(disk, dirty_cmds(7, 4096, size, size))
    run([CBT, "backup", "--full", "--checkpoint", "c0", disk,
         os.path.join(bk, "b0.qcow2")])
    for i in range(1, n + 1):
        qemu_io(disk, dirty_cmds(100 + i, 100, size, size))
        run([CBT, "backup", "--incremental", "--checkpoint", "c%d" % i, disk,
             os.path.join(bk, "b%d.qcow2" % i)])
    last = os.path.join(bk, "b%d.qcow2" % n)
    out = os.path.join(d, "out.qcow2")
    c, cb = cbt_runs(RUNS, lambda: rm(out), lambda x: [
        x, "restore", "-O", "qcow2", last, out])
    run(["qemu-img", "compare", "-q", disk, out])
    q = median_runs(RUNS, lambda: rm(out), lambda: [
        "qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O",
        "qcow2", last, out])
    row("restore full + %d incrementals" % n, c, q,
        "cbt restore -O qcow2 b%d.qcow2 OUT" % n,
        "qemu-img convert -t writeback -f qcow2 -O qcow2 b%d.qcow2 OUT" % n, before=cb)
    c, cb = cbt_runs(RUNS, None, lambda x: [x, "verify", last])
    row("verify full + %d incrementals" % n, c, q,
        "cbt verify b%d.qcow2" % n, "(the convert above)", before=cb)
    rm(d)


os.makedirs(WORK, exist_ok=True)
log("bench/scale.sh: %s, %s, runs %d (big %d), %s" % (
    CBT, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), RUNS, BIG_RUNS,
    " ".join(PARTS)))
for p in PARTS:
    {"bitmaps": part_bitmaps, "backup": part_backup,
     "chain": part_chain}.get(p, lambda: die("unknown part " + p))()

print("| line | cbt s | cbt RSS | QEMU s | QEMU RSS | time ratio | RSS ratio "
      "| %snote |" % ("before s | before RSS | " if BEFORE else ""))
print("|---|---:|---:|---:|---:|---:|---:|%s---|" % ("---:|---:|" if BEFORE
                                                  else ""))
for line, t1, r1, t2, r2, cc, qc, extra, t0, r0 in ROWS:
    print("| %s | %.3f | %s | %.3f | %s | %.2f | %.2f | %s%s |" % (
        line, t1, human(r1), t2, human(r2), t1 / t2 if t2 else 0,
        r1 / r2 if r2 else 0,
        "%.3f | %s | " % (t0, human(r0)) if BEFORE else "", extra))
print()
print("Commands (cbt | QEMU):")
seen = set()
for line, t1, r1, t2, r2, cc, qc, extra, t0, r0 in ROWS:
    if (cc, qc) not in seen:
        seen.add((cc, qc))
        print("- %s: `%s` | `%s`" % (line, cc, qc))
PYTHON_EOF
