#!/bin/bash
# Benchmark cbt's backups against the QEMU routes doing the same jobs, in the
# same run, and report medians and ratios (cbt / QEMU: below 1 means cbt is
# faster):
#   1. incremental backup of a disk with 1% and 10% of its 64 KiB clusters
#      dirty: cbt backup --incremental vs (a) qemu-nbd -r -B BITMAP + a
#      libnbd client copying only the dirty extents into a qcow2 overlay of
#      the previous backup, (b) qemu-storage-daemon running blockdev-backup
#      sync=bitmap into the same kind of overlay (QMP over a unix socket);
#      and a plain dd of the dirty byte count, for the machine's bandwidth;
#   2. full backup vs qemu-img convert -O qcow2 (default cache=unsafe, and
#      -t writeback, which flushes like cbt);
#   3. restore of a full + 5 incrementals vs qemu-img convert of that chain.
# Usage: bench/backup.sh [--quick] CBT_BINARY
# Environment:
#   BENCH_SIZE         virtual disk size (default 4G; --quick: 256M)
#   BENCH_RUNS         runs per job and tool; the median is reported
#                      (default 5; --quick: 3)
#   BENCH_DIRTY        dirty percentages of line 1 (default "1 10")
#   BENCH_CHAIN_DIRTY  percent of clusters each incremental of line 3's
#                      chain changes (default 5)
#   BENCH_SEED         seed of the content and of the dirty offsets (1)
#   BENCH_WARMUP       untimed rounds of every job before the timed ones
#                      (default 1: the first job to write gigabytes after
#                      the script made its files paid for the guest's
#                      fresh memory, 2-3x slower, whichever tool it was)
#   BENCH_DROP_CACHES  1: sync and drop the page cache before every timed
#                      run (needs root); 0 (default): warm cache
#   PYTHON             an interpreter with the libnbd bindings
#                      (default /usr/bin/python3; package python3-libnbd)
# See bench/README.md.  Internally the script also runs itself as
#   bench/backup.sh --nbd-incremental DISK BITMAP PARENT TARGET
#   bench/backup.sh --qsd-incremental DISK BITMAP NEWBITMAP PARENT TARGET
# (the two QEMU routes of line 1, one process each, printing their time).
set -euo pipefail
PY=${PYTHON:-/usr/bin/python3}
exec "$PY" - "$0" "$@" <<'PYTHON_EOF'
import json
import os
import random
import re
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import time

SELF = os.path.abspath(sys.argv[1])
ARGS = sys.argv[2:]
sys.path.insert(0, os.path.dirname(SELF))
from benchlib import (CLUSTER, MIB, QMP, die, dirty_commands,  # noqa: E402
                      human, log, make_disk, nbd_extents, parse_size, run,
                      top_layer)


# ---------------------------------------------------------------------------
# Route (a): qemu-nbd -r -B BITMAP + a libnbd client copying the dirty
# extents into a qcow2 overlay of the previous backup (served by a second,
# writable qemu-nbd), which is what cbt produces.  Both servers are started
# by libnbd (systemd socket activation) and exit when the client
# disconnects.  The client keeps up to DEPTH requests in flight (reads on
# the source, writes on the target), in requests of at most CHUNK bytes;
# dirty ranges that now read as zeroes (base:allocation says so) become
# write-zeroes requests, so they end up as zero clusters, as with cbt.
NBD_DEPTH = 16
NBD_CHUNK = 2 * MIB


def nbd_incremental(args):
    import nbd
    if len(args) != 4:
        die("usage: --nbd-incremental DISK BITMAP PARENT TARGET")
    disk, bitmap, parent, target = args
    t0 = time.monotonic()
    src = nbd.NBD()
    bctx = "qemu:dirty-bitmap:" + bitmap
    src.add_meta_context("base:allocation")
    src.add_meta_context(bctx)
    src.connect_systemd_socket_activation(
        ["qemu-nbd", "-r", "-f", "qcow2", "-B", bitmap, disk])
    if not src.can_meta_context(bctx):
        die("qemu-nbd does not export " + bctx)
    size = src.get_size()
    # The overlay: parent as backing, by its name relative to the folder.
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
         os.path.basename(parent), "-F", "qcow2", target, str(size)])
    tgt = nbd.NBD()
    tgt.connect_systemd_socket_activation(
        ["qemu-nbd", "-f", "qcow2", "--cache=writeback", target])

    work = []          # (offset, length, is_zero), merged, then chunked
    for a, b, fl in nbd_extents(src, size, ["base:allocation", bctx]):
        if not fl[bctx] & 1:
            continue
        zero = bool(fl["base:allocation"] & 2)
        if work and work[-1][0] + work[-1][1] == a and work[-1][2] == zero:
            work[-1] = (work[-1][0], work[-1][1] + b - a, zero)
        else:
            work.append((a, b - a, zero))
    reqs = []
    for off, length, zero in work:
        step = length if zero else NBD_CHUNK
        for o in range(off, off + length, step):
            reqs.append((o, min(step, off + length - o), zero))
    reqs.reverse()

    failures = []
    ready = []         # reads completed: (buffer, offset)

    def done_write(err):
        if err.value:
            failures.append("write: errno %d" % err.value)
        return 1

    def issue():
        while ready:
            buf, off = ready.pop()
            tgt.aio_pwrite(buf, off, completion=done_write)
        while reqs and src.aio_in_flight() + tgt.aio_in_flight() < NBD_DEPTH:
            off, length, zero = reqs.pop()
            if zero:
                tgt.aio_zero(length, off, completion=done_write)
                continue
            buf = nbd.Buffer(length)

            def done_read(err, buf=buf, off=off):
                if err.value:
                    failures.append("read at %d: errno %d" % (off, err.value))
                else:
                    ready.append((buf, off))
                return 1
            src.aio_pread(buf, off, completion=done_read)

    poller = select.poll()
    handles = {src.aio_get_fd(): src, tgt.aio_get_fd(): tgt}
    while not failures:
        issue()
        if not (reqs or ready or src.aio_in_flight() or tgt.aio_in_flight()):
            break
        for fd, h in handles.items():
            d = h.aio_get_direction()
            ev = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | \
                 (select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0)
            if ev:
                poller.register(fd, ev)
            else:
                try:
                    poller.unregister(fd)
                except KeyError:
                    pass
        for fd, ev in poller.poll():
            h = handles[fd]
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                h.aio_notify_read()
            elif ev & select.POLLOUT:
                h.aio_notify_write()
    if failures:
        die("nbd route: " + failures[0])
    tgt.flush()
    tgt.shutdown()
    src.shutdown()
    del tgt, src       # libnbd waits for the servers to exit
    print("elapsed %.6f" % (time.monotonic() - t0))


# ---------------------------------------------------------------------------
# Route (b): qemu-storage-daemon with the disk and the overlay as block
# nodes; one QMP transaction adds the new persistent bitmap (the new
# checkpoint, as cbt makes) and starts blockdev-backup sync=bitmap from the
# old bitmap (bitmap-mode=never: it keeps recording, as cbt's checkpoints
# do); when the job completes, quit (which flushes and closes both images,
# storing the bitmaps).
def qsd_incremental(args):
    if len(args) != 5:
        die("usage: --qsd-incremental DISK BITMAP NEWBITMAP PARENT TARGET")
    disk, bitmap, newbitmap, parent, target = args
    t0 = time.monotonic()
    size = json.loads(run(["qemu-img", "info", "--output=json", "-f",
                           "qcow2", disk]))["virtual-size"]
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
         os.path.basename(parent), "-F", "qcow2", target, str(size)])
    sockpath = os.path.join(os.path.dirname(os.path.abspath(target)),
                            "qmp.sock")
    argv = qsd_argv(disk, target, sockpath)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    q = QMP(sockpath, proc)
    q.cmd("transaction", actions=[
        {"type": "block-dirty-bitmap-add",
         "data": {"node": "src", "name": newbitmap, "persistent": True}},
        {"type": "blockdev-backup",
         "data": {"job-id": "bk", "device": "src", "target": "tgt",
                  "sync": "bitmap", "bitmap": bitmap,
                  "bitmap-mode": "never"}}])
    ev = q.wait_event("BLOCK_JOB_COMPLETED")
    if ev["data"].get("error"):
        die("blockdev-backup: " + ev["data"]["error"])
    q.cmd("quit")
    rc = proc.wait()
    if rc != 0:
        die("qemu-storage-daemon exited with %d" % rc)
    print("elapsed %.6f" % (time.monotonic() - t0))


def qsd_argv(disk, target, sockpath):
    return ["qemu-storage-daemon",
            "--chardev", "socket,id=qmp,path=%s,server=on,wait=off" % sockpath,
            "--monitor", "chardev=qmp",
            "--blockdev", json.dumps({
                "driver": "qcow2", "node-name": "src",
                "file": {"driver": "file", "filename": disk}}),
            "--blockdev", json.dumps({
                "driver": "qcow2", "node-name": "tgt",
                "file": {"driver": "file", "filename": target}})]


# ---------------------------------------------------------------------------
# The benchmark.

def apply_dirty(work, disk, size, percent, seed):
    cmds, n = dirty_commands(size, percent, seed)
    path = os.path.join(work, "dirty.cmds")
    with open(path, "w") as f:
        f.writelines(cmds)
    with open(path) as f:
        out = run(["qemu-io", "-f", "qcow2", disk], stdin=f)
    if out.replace("qemu-io>", "").strip():
        die("qemu-io dirty writes: " + out.strip()[:200])
    return n


def map_top(path):
    """(data bytes, zero bytes) allocated in the top layer of path."""
    top = top_layer(path)
    return (sum(n for _, n, d in top if d), sum(n for _, n, d in top if not d))


def same(a, b):
    run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", a, b])


def check(path):
    run(["qemu-img", "check", "-q", "-f", "qcow2", path])


def main():
    args = list(ARGS)
    quick = False
    if args and args[0] == "--quick":
        quick = True
        args.pop(0)
    if len(args) != 1:
        print("usage: bench/backup.sh [--quick] CBT_BINARY", file=sys.stderr)
        sys.exit(2)
    cbt = os.path.abspath(args[0])
    env = os.environ
    size_s = env.get("BENCH_SIZE", "256M" if quick else "4G")
    size = parse_size(size_s)
    runs = int(env.get("BENCH_RUNS", "3" if quick else "5"))
    dirty_levels = [int(x) for x in env.get("BENCH_DIRTY", "1 10").split()]
    chain_dirty = int(env.get("BENCH_CHAIN_DIRTY", "5"))
    seed = int(env.get("BENCH_SEED", "1"))
    warmup = int(env.get("BENCH_WARMUP", "1"))
    drop = env.get("BENCH_DROP_CACHES", "0") == "1"
    if runs < 1:
        die("BENCH_RUNS must be at least 1")
    if warmup < 0:
        die("BENCH_WARMUP must be 0 or more")

    for tool in ("qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon",
                 "dd"):
        if not shutil.which(tool):
            die("%s not found (run scripts/install-deps.sh)" % tool)
    try:
        import nbd  # noqa: F401
    except ImportError:
        die("%s has no libnbd bindings (python3-libnbd; set PYTHON)"
            % sys.executable)
    if not os.access(cbt, os.X_OK):
        die("%s is not executable" % cbt)
    if drop and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        die("BENCH_DROP_CACHES=1 needs a writable /proc/sys/vm/drop_caches")

    here = os.path.dirname(SELF)
    work = os.path.join(here, "work", "backup")   # bench/work/ is ignored
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        bench(cbt, work, size, size_s, runs, dirty_levels, chain_dirty,
              seed, drop, quick, warmup)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fresh_cache(drop):
    if drop:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def timed(argv, drop, cwd=None):
    """Run one job; return its wall time.  Helpers (the QEMU routes of
    line 1) print their own time, which leaves out the Python start."""
    fresh_cache(drop)
    t0 = time.monotonic()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, cwd=cwd)
    t = time.monotonic() - t0
    out = p.stdout.decode(errors="replace")
    if p.returncode != 0:
        die("%s failed (exit %d):\n  %s" % (
            shlex.join(argv), p.returncode,
            "\n  ".join(out.strip().splitlines()[-8:])))
    m = re.search(r"^elapsed ([0-9.]+)$", out, re.M)
    return float(m.group(1)) if m else t


def copy_file(src, dst):
    run(["cp", "--sparse=always", src, dst])


def rel(argv, work):
    """A command as printed: cbt's path shortened, work paths relative."""
    out = []
    for a in argv:
        if a.startswith(work + "/"):
            a = a[len(work) + 1:]
        out.append(a)
    return shlex.join(out)


def round_label(i, runs):
    return "warm-up" if i < 0 else "run %d/%d" % (i + 1, runs)


def record(times, last, name, t, i):
    """Keep a timed result, except from the warm-up round (i < 0)."""
    last[name] = t
    if i >= 0:
        times[name].append(t)


def dd_median(d, nbytes, runs, seed):
    """The machine's durable copy time for nbytes: dd of a file of random
    bytes, warm in the page cache, to a new file with conv=fdatasync (as
    durable as cbt's backups are); the median of runs."""
    src = os.path.join(d, "bw.src")
    dst = os.path.join(d, "bw.dst")
    rng = random.Random(seed)
    with open(src, "wb") as f:
        for off in range(0, nbytes, MIB):
            f.write(rng.randbytes(min(MIB, nbytes - off)))
    os.sync()
    with open(src, "rb") as f:
        while f.read(8 * MIB):
            pass
    dd = ["dd", "if=" + src, "of=" + dst, "bs=1M", "conv=fdatasync",
          "status=none"]
    times = []
    for i in range(runs):
        if os.path.exists(dst):
            os.unlink(dst)
        os.sync()
        t = time.monotonic()
        run(dd)
        times.append(time.monotonic() - t)
    os.unlink(src)
    os.unlink(dst)
    return statistics.median(times)


def bench(cbt, work, size, size_s, runs, dirty_levels, chain_dirty, seed,
          drop, quick, warmup):
    os.environ.setdefault("LC_ALL", "C")
    log("bench: size %s, %d runs per job, dirty %s%%, chain %d%%, seed %d, "
        "%s cache" % (size_s, runs, "/".join(map(str, dirty_levels)),
                      chain_dirty, seed, "cold (dropped)" if drop else "warm"))
    load0 = "/".join("%.2f" % x for x in os.getloadavg())
    base = os.path.join(work, "base.qcow2")
    t0 = time.monotonic()
    kinds = make_disk(work, base, size, seed)
    log("bench: sample disk made in %.1f s: %s" % (
        time.monotonic() - t0,
        ", ".join("%s %d MiB" % (k, v) for k, v in kinds.items())))
    rows = []       # (label, cbt_median, [(route, median)])
    commands = []   # lines printed at the end
    details = []    # per-run times
    notes = []

    def median(xs):
        return statistics.median(xs)

    def rotate(lst, i):
        i %= len(lst)
        return lst[i:] + lst[:i]

    # ---- line 2: full backup vs qemu-img convert -----------------------
    d = os.path.join(work, "full")
    os.makedirs(d)
    disk = os.path.join(d, "disk.qcow2")
    copy_file(base, disk)
    with open(disk, "rb") as f:           # warm cache for every tool
        while f.read(8 * MIB):
            pass
    out = os.path.join(d, "out.qcow2")
    jobs = {
        "cbt": [cbt, "backup", "--full", "--checkpoint", "bench", disk, out],
        "qemu-img convert": ["qemu-img", "convert", "-f", "qcow2", "-O",
                             "qcow2", disk, out],
        "qemu-img convert -t writeback": [
            "qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O",
            "qcow2", disk, out],
    }
    times = {k: [] for k in jobs}
    last = {}
    for i in range(-warmup, runs):
        for name in rotate(list(jobs), i):
            for p in (out, out + ".json", out + ".tree", out + ".hashes"):
                if os.path.exists(p):
                    os.unlink(p)
            os.sync()
            record(times, last, name, timed(jobs[name], drop), i)
            same(out, disk)
            if name == "cbt":
                check(out)
                run([cbt, "checkpoint", "delete", disk, "bench"])
        log("  full backup %s: %s" % (round_label(i, runs), ", ".join(
            "%s %.3f s" % (k, v) for k, v in last.items())))
    label = "full backup of the %s disk" % size_s
    rows.append((label, median(times["cbt"]),
                 [(k, median(v)) for k, v in times.items() if k != "cbt"]))
    details.append((label, times))
    commands.append("2. full backup (DISK = the sample disk, OUT removed "
                    "before each run):")
    for k, v in jobs.items():
        commands.append("     " + rel(v, d).replace(cbt, "cbt")
                        .replace("disk.qcow2", "DISK")
                        .replace("out.qcow2", "OUT"))
    full_alloc = map_top(out)
    full_cbt = median(times["cbt"])
    full_dd = dd_median(d, full_alloc[0], runs, seed)
    shutil.rmtree(d)

    # ---- line 1: incremental backups ------------------------------------
    bw = []
    for pct in dirty_levels:
        d = os.path.join(work, "inc%d" % pct)
        repo = os.path.join(d, "repo")
        os.makedirs(repo)
        disk = os.path.join(d, "disk.qcow2")
        copy_file(base, disk)
        run([cbt, "backup", "--full", "--checkpoint", "c0", disk,
             os.path.join(repo, "full.qcow2")])
        n = apply_dirty(d, disk, size, pct, seed + pct)
        dirty_bytes = n * CLUSTER
        r = os.path.join(d, "run")
        jobs = {
            "cbt": [cbt, "backup", "--incremental", "--checkpoint", "c1",
                    os.path.join(r, "disk.qcow2"),
                    os.path.join(r, "inc.qcow2")],
            "qemu-nbd -B + libnbd": [
                SELF, "--nbd-incremental", os.path.join(r, "disk.qcow2"),
                "c0", os.path.join(r, "full.qcow2"),
                os.path.join(r, "inc.qcow2")],
            "qsd blockdev-backup": [
                SELF, "--qsd-incremental", os.path.join(r, "disk.qcow2"),
                "c0", "c1", os.path.join(r, "full.qcow2"),
                os.path.join(r, "inc.qcow2")],
        }
        times = {k: [] for k in jobs}
        last = {}
        alloc = {}
        manifest = None
        for i in range(-warmup, runs):
            for name in rotate(list(jobs), i):
                shutil.rmtree(r, ignore_errors=True)
                os.makedirs(r)
                copy_file(disk, os.path.join(r, "disk.qcow2"))
                for f in ("full.qcow2", "full.qcow2.json",
                          "full.qcow2.tree", "full.qcow2.hashes"):
                    if os.path.exists(os.path.join(repo, f)):
                        os.link(os.path.join(repo, f), os.path.join(r, f))
                os.sync()
                record(times, last, name, timed(jobs[name], drop, cwd=r), i)
                inc = os.path.join(r, "inc.qcow2")
                check(inc)
                same(inc, os.path.join(r, "disk.qcow2"))
                alloc[name] = map_top(inc)
                if name == "cbt":
                    with open(inc + ".json") as f:
                        manifest = json.load(f)
            log("  incremental %d%% %s: %s" % (
                pct, round_label(i, runs), ", ".join(
                    "%s %.3f s" % (k, v) for k, v in last.items())))
        dd_t = dd_median(d, dirty_bytes, runs, seed)
        label = "incremental, %d%% of clusters dirty (%s)" % (
            pct, human(dirty_bytes))
        rows.append((label, median(times["cbt"]),
                     [(k, median(v)) for k, v in times.items()
                      if k != "cbt"]))
        details.append((label, times))
        bw.append((pct, dirty_bytes, median(times["cbt"]), dd_t,
                   manifest, alloc))
        if pct == dirty_levels[0]:
            commands.append(
                "1. incremental (in a folder holding DISK = a copy of the "
                "dirty disk and full.qcow2{,.json,.tree}; c0 = the full "
                "backup's checkpoint, recording the dirty writes):")
            for k, v in jobs.items():
                commands.append("     " + rel(v, r).replace(cbt, "cbt")
                                .replace(SELF, "bench/backup.sh")
                                .replace("disk.qcow2", "DISK"))
            commands.append("   where --nbd-incremental runs, timed from "
                            "the first command to the servers' exit:")
            commands.append("     qemu-img create -f qcow2 -b full.qcow2 -F "
                            "qcow2 inc.qcow2 SIZE")
            commands.append("     qemu-nbd -r -f qcow2 -B c0 DISK   and   "
                            "qemu-nbd -f qcow2 --cache=writeback inc.qcow2 "
                            "(started by libnbd, socket activation)")
            commands.append("     block_status over base:allocation + "
                            "qemu:dirty-bitmap:c0; aio_pread / aio_pwrite "
                            "(aio_zero for zero ranges) of the dirty "
                            "ranges, <= %d MiB per request, %d in flight; "
                            "flush" % (NBD_CHUNK // MIB, NBD_DEPTH))
            commands.append("   and --qsd-incremental runs:")
            commands.append("     qemu-img create -f qcow2 -b full.qcow2 -F "
                            "qcow2 inc.qcow2 SIZE")
            commands.append("     " + shlex.join(qsd_argv(
                "DISK", "inc.qcow2", "qmp.sock")))
            commands.append("     QMP: transaction [block-dirty-bitmap-add "
                            "src c1 persistent, blockdev-backup src -> tgt "
                            "sync=bitmap bitmap=c0 bitmap-mode=never]; wait "
                            "for BLOCK_JOB_COMPLETED; quit")
            commands.append("   copy bandwidth: " + shlex.join(
                ["dd", "if=SRC", "of=DST", "bs=1M", "conv=fdatasync"])
                + "   (SRC: a file of the dirty byte count, warm cache)")
        shutil.rmtree(d)

    # ---- line 3: restore of a full + 5 incrementals ---------------------
    d = os.path.join(work, "chain")
    os.makedirs(d)
    disk = os.path.join(d, "disk.qcow2")
    copy_file(base, disk)
    run([cbt, "backup", "--full", "--checkpoint", "k0", disk,
         os.path.join(d, "b0.qcow2")])
    for j in range(1, 6):
        apply_dirty(d, disk, size, chain_dirty, seed + 100 + j)
        run([cbt, "backup", "--incremental", "--checkpoint", "k%d" % j, disk,
             os.path.join(d, "b%d.qcow2" % j)])
    top = os.path.join(d, "b5.qcow2")
    for j in range(6):
        with open(os.path.join(d, "b%d.qcow2" % j), "rb") as f:
            while f.read(8 * MIB):
                pass
    out = os.path.join(d, "out.qcow2")
    jobs = {
        "cbt": [cbt, "restore", "-O", "qcow2", top, out],
        "qemu-img convert": ["qemu-img", "convert", "-f", "qcow2", "-O",
                             "qcow2", top, out],
        "qemu-img convert -t writeback": [
            "qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O",
            "qcow2", top, out],
    }
    times = {k: [] for k in jobs}
    last = {}
    for i in range(-warmup, runs):
        for name in rotate(list(jobs), i):
            if os.path.exists(out):
                os.unlink(out)
            os.sync()
            record(times, last, name, timed(jobs[name], drop), i)
            check(out)
            same(out, disk)
        log("  restore %s: %s" % (round_label(i, runs), ", ".join(
            "%s %.3f s" % (k, v) for k, v in last.items())))
    label = "restore of a full + 5 incrementals (%d%% each)" % chain_dirty
    rows.append((label, median(times["cbt"]),
                 [(k, median(v)) for k, v in times.items() if k != "cbt"]))
    details.append((label, times))
    commands.append("3. restore (b0.qcow2 = cbt backup --full, b1..b5 = cbt "
                    "backup --incremental after %d%% dirty writes each; OUT "
                    "removed before each run):" % chain_dirty)
    for k, v in jobs.items():
        commands.append("     " + rel(v, d).replace(cbt, "cbt")
                        .replace("out.qcow2", "OUT"))
    shutil.rmtree(d)

    # ---- report ---------------------------------------------------------
    print()
    print("| job | cbt s | QEMU route | QEMU s | ratio cbt/QEMU |")
    print("|---|---:|---|---:|---:|")
    for label, c, routes in rows:
        for k, (route, q) in enumerate(routes):
            print("| %s | %s | %s | %.3f | %.2f |" % (
                label if k == 0 else "", "%.3f" % c if k == 0 else "",
                route, q, c / q if q > 0 else float("nan")))
    print()
    print("Median wall time of %d runs (after %d untimed warm-up round%s), "
          "%s cache.  Every result was checked: qemu-img check clean, "
          "qemu-img compare identical to the disk it backs up." % (
              runs, warmup, "" if warmup == 1 else "s",
              "cold (dropped before each run)" if drop else "warm"))
    print("Load average (1/5/15 min) at the start: %s; at the end: %s; "
          "%d CPUs." % (load0, "/".join("%.2f" % x for x in os.getloadavg()),
                        os.cpu_count()))
    print()
    print("Incremental vs the machine's copy bandwidth (dd of the dirty byte "
          "count, warm source, conv=fdatasync, median of %d):" % runs)
    print()
    print("| dirty | bytes | cbt s | cbt MB/s | dd s | dd MB/s | cbt/dd time "
          "| target data / zero (cbt; nbd; qsd) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for pct, nbytes, c, ddt, manifest, alloc in bw:
        al = "; ".join("%s / %s" % (human(a[0]), human(a[1]))
                       for a in (alloc.get("cbt"),
                                 alloc.get("qemu-nbd -B + libnbd"),
                                 alloc.get("qsd blockdev-backup")) if a)
        print("| %d%% | %s | %.3f | %.0f | %.3f | %.0f | %.2f | %s |" % (
            pct, human(nbytes), c, nbytes / c / 1e6, ddt,
            nbytes / ddt / 1e6, c / ddt, al))
        if manifest:
            b = manifest.get("bytes", {})
            notes.append("cbt manifest at %d%%: dirty %s, copied %s, "
                         "zeroed %s" % (pct, b.get("dirty"), b.get("copied"),
                                        b.get("zeroed")))
    print()
    print("Full backup vs the machine's durable write bandwidth for the "
          "bytes the target holds (dd of %s, conv=fdatasync, median of %d): "
          "dd %.3f s, cbt %.3f s (%.2f x dd).  qemu-img convert's default "
          "leaves the target in the page cache (cache=unsafe, no flush), "
          "so it can finish before the bytes could be on the disk."
          % (human(full_alloc[0]), runs, full_dd, full_cbt,
             full_cbt / full_dd if full_dd > 0 else float("nan")))
    print()
    for n in notes:
        print(n)
    print("full backup target: %s data, %s zero clusters (qemu-img map)"
          % (human(full_alloc[0]), human(full_alloc[1])))
    print("sample disk: " + ", ".join("%s %d MiB" % (k, v)
                                      for k, v in kinds.items()))
    print()
    print("Commands:")
    print()
    for c in commands:
        print("    " + c)
    print()
    print("Individual runs (seconds):")
    print()
    for label, times in details:
        print("  " + label)
        for k, v in times.items():
            print("    %-30s %s" % (k, " ".join("%.3f" % x for x in v)))


if __name__ == "__main__":
    if ARGS and ARGS[0] == "--nbd-incremental":
        nbd_incremental(ARGS[1:])
    elif ARGS and ARGS[0] == "--qsd-incremental":
        qsd_incremental(ARGS[1:])
    else:
        main()
PYTHON_EOF
