"""The live backup benchmark (issue 11 section 4); bench/live.sh runs it.

A qcow2 disk held by qemu-storage-daemon (QMP on Unix sockets, the disk
exported writable over NBD), a "guest" process writing 64 KiB blocks
through that export at a steady rate during every job, and, for 1% and
10% of the disk's clusters dirty since checkpoint c0, in the same run:

  cbt     cbt backup --qmp SOCK --nbd-socket NBD --incremental
          --checkpoint cN vm run/inc.qcow2 (the whole process: checkpoint,
          fleecing, NBD pull, hashing, target, manifest, teardown)
  cbt-push  the same with --push instead of --nbd-socket: QEMU copies the
          view into cbt's scratch file, cbt reads that file (no NBD)
  push    QEMU's own push job (LIVE.md 2.4): one transaction adding cN,
          a temporary disabled copy of c0 and blockdev-backup
          sync=incremental into a qcow2 overlay created and added
          beforehand; timed from the transaction to BLOCK_JOB_COMPLETED,
          job-dismiss, blockdev-del of the target (QEMU flushes it:
          fdatasync) and an fsync of the file by this script
  pull16  a libnbd reader of the same dirty extents from the same kind of
          export (scratch node, sync=none fleecing, block-export-add with
          the bitmap), no hashing, nothing written: 16 requests of up to
          2 MiB in flight; timed from creating the scratch file to the
          teardown's end, as cbt's run
  pull1   the same, one request at a time, each a run of adjacent dirty
          clusters of at most 4 MiB (the request pattern of cbt's reader
          before it kept a chunk's reads in flight together)
  idle    no job: the guest's write latency alone
  dd      dd conv=fdatasync of the dirty byte count from a warm file (the
          machine's durable copy bandwidth, the guest writing as for the
          others).
The guest logs every write's submit time and latency; each job's window
picks its writes.

Before every run (untimed) checkpoint c0's bitmap is set back to exactly
the level's dirty set (one transaction: clear c0, merge the saved set into
it), so every route copies the same clusters, plus the few the guest
writes between the reset and the job's transaction (each route's byte
count is reported).

Usage (bench/live.sh passes the work folders):
  live.py main CBT WORK SOCKDIR PIDFILE
  live.py writer URI NBLOCKS RATE SEED LOGFILE
"""
import array
import json
import os
import random
import resource
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time

import nbd

from benchlib import (MIB, QMP, die, human, log, nbd_extents, parse_size,
                      run, top_layer)

CLUSTER = 65536
BLOCK = 65536          # the guest's write size
PULL_CHUNK = 2 * MIB   # pull16's request size
PULL_RUN_MAX = 4 * MIB  # pull1's longest request (cbt: 64 blocks a chunk)


# ---------------------------------------------------------------------------
# The guest: one process, one NBD connection, one write in flight.

def writer(uri, nblocks, rate, seed, logfile):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(seed)
    buf = bytearray(rng.randbytes(BLOCK))
    interval = 10 ** 9 // rate
    recs = array.array("Q")
    print("ready", flush=True)
    due = time.monotonic_ns()
    n = 0
    while not stop:
        b = rng.randrange(nblocks)
        n += 1
        struct.pack_into("<QQ", buf, 0, b, n)     # every write's own bytes
        t0 = time.monotonic_ns()
        h.pwrite(buf, b * BLOCK)
        t1 = time.monotonic_ns()
        recs.append(t0)
        recs.append(t1 - t0)
        # Steady: one write per interval; after a stall, no burst.
        due = max(due + interval, t1 - interval)
        left = due - time.monotonic_ns()
        if left > 0 and not stop:
            time.sleep(left / 1e9)
    h.flush()
    h.shutdown()
    with open(logfile, "wb") as f:
        recs.tofile(f)


def read_writes(logfile):
    a = array.array("Q")
    with open(logfile, "rb") as f:
        a.frombytes(f.read())
    return [(a[i], a[i + 1]) for i in range(0, len(a), 2)]


def act(kind, **data):
    return {"type": kind,
            "data": {k.replace("_", "-"): v for k, v in data.items()}}


# ---------------------------------------------------------------------------
# Processes this script starts: recorded in PIDFILE, so that bench/live.sh
# can end them by PID if this process dies without its own cleanup.

class Procs:
    """Processes this script starts and has not reaped yet.  PIDFILE lists
    them as "PID STARTTIME" (field 22 of /proc/PID/stat), so that
    bench/live.sh, if this process dies without its cleanup, ends them and
    never a process that got a reused PID."""

    def __init__(self, pidfile):
        self.pidfile = pidfile
        self.live = []

    def _save(self):
        with open(self.pidfile + ".tmp", "w") as f:
            for p, start in self.live:
                f.write("%d %s\n" % (p.pid, start))
        os.replace(self.pidfile + ".tmp", self.pidfile)

    def start(self, argv, **kw):
        # Own sessions: a Ctrl-C at the terminal reaches bench/live.sh,
        # which has this script end them in order (the guest, then QEMU).
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        try:
            with open("/proc/%d/stat" % p.pid) as f:
                start = f.read().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            start = "?"
        self.live.append((p, start))
        self._save()
        return p

    def forget(self, p):
        """p has exited and was reaped."""
        self.live = [(q, s) for q, s in self.live if q is not p]
        self._save()

    def end_all(self):
        for p, _ in reversed(self.live):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.live = []
        self._save()


def cpu_of(pid):
    """User + system CPU seconds of a process so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------
# The disk

def make_disk(work, path, size, seed):
    """Per 1 MiB chunk (seeded): 60% random data, 40% never written."""
    rng = random.Random(seed)
    raw = os.path.join(work, "content.raw")
    data = 0
    with open(raw, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MIB):
            if rng.random() < 0.6:
                f.seek(off)
                f.write(rng.randbytes(MIB))
                data += MIB
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path])
    os.unlink(raw)
    return data


def nbd_write_blocks(uri, clusters, seed):
    """Write whole clusters through the export, 16 in flight."""
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(seed)
    base = rng.randbytes(CLUSTER)
    todo = list(clusters)
    while todo or h.aio_in_flight():
        while todo and h.aio_in_flight() < 16:
            c = todo.pop()
            h.aio_pwrite(struct.pack("<QQ", c, seed) + base[16:], c * CLUSTER)
        h.poll(-1)
    h.flush()
    h.shutdown()
    del h


# ---------------------------------------------------------------------------
# The pull reader (pull16, pull1)

def dirty_extents(h, size, bctx):
    """[(offset, length)] dirty in bctx and not reading as zeroes, merged,
    from block status over both contexts."""
    out = []
    for a, b, fl in nbd_extents(h, size, ["base:allocation", bctx]):
        if fl[bctx] & 1 and not fl["base:allocation"] & 2:
            if out and out[-1][0] + out[-1][1] == a:
                out[-1] = (out[-1][0], out[-1][1] + b - a)
            else:
                out.append((a, b - a))
    return out


def pull_read(h, extents, depth, chunk):
    """Read every extent in requests of at most chunk bytes, depth in
    flight; the data is dropped.  Bytes read."""
    reqs = []
    for off, length in extents:
        for o in range(off, off + length, chunk):
            reqs.append((o, min(chunk, off + length - o)))
    reqs.reverse()
    pool = [nbd.Buffer(chunk) for _ in range(depth)]
    fails = []
    total = 0

    def done(err, buf, pooled):
        if err.value:
            fails.append(err.value)
        if pooled:
            pool.append(buf)
        return 1

    while reqs or h.aio_in_flight():
        while reqs and h.aio_in_flight() < depth:
            off, length = reqs.pop()
            pooled = length == chunk
            buf = pool.pop() if pooled else nbd.Buffer(length)
            h.aio_pread(buf, off, completion=lambda err, b=buf, k=pooled:
                        done(err, b, k))
            total += length
        h.poll(-1)
    if fails:
        die("pull reader: read failed, errno %d" % fails[0])
    return total


# ---------------------------------------------------------------------------
# The benchmark

class Bench:
    def __init__(self, cbt, work, sockdir, pidfile):
        env = os.environ
        self.cbt = cbt
        self.work = work
        self.sockdir = sockdir
        self.procs = Procs(pidfile)
        self.size_s = env.get("BENCH_SIZE", "4G")
        self.size = parse_size(self.size_s, 64 * MIB)
        self.runs = int(env.get("BENCH_RUNS", "3"))
        self.warmup = int(env.get("BENCH_WARMUP", "1"))
        self.levels = [int(x) for x in env.get("BENCH_DIRTY", "1 10").split()]
        self.rate = int(env.get("BENCH_WRITE_RATE", "200"))
        self.idle = float(env.get("BENCH_IDLE", "2"))
        self.seed = int(env.get("BENCH_SEED", "1"))
        self.cbt_base = env.get("BENCH_CBT_BASE") or None
        if self.cbt_base and not os.access(self.cbt_base, os.X_OK):
            die("BENCH_CBT_BASE: %s is not an executable" % self.cbt_base)
        if self.runs < 1 or self.warmup < 0 or self.rate < 1:
            die("BENCH_RUNS >= 1, BENCH_WARMUP >= 0, BENCH_WRITE_RATE >= 1")
        if sorted(self.levels) != self.levels or not all(
                0 < p < 100 for p in self.levels):
            die("BENCH_DIRTY: increasing percentages between 0 and 100")
        self.qmp_path = os.path.join(sockdir, "qmp.sock")
        self.cbt_qmp = os.path.join(sockdir, "cbt-qmp.sock")
        self.nbd_path = os.path.join(sockdir, "nbd.sock")
        self.guest_uri = "nbd+unix:///disk?socket=" + self.nbd_path
        self.disk = os.path.join(work, "disk.qcow2")
        self.repo = os.path.join(work, "repo")
        self.ckpt_n = 0
        self.cbt_argv = {}
        os.environ["CBT_STATE_DIR"] = os.path.join(work, "state")
        os.environ.setdefault("LC_ALL", "C")

    # ---- qemu-storage-daemon ----
    def start_qsd(self):
        argv = ["qemu-storage-daemon",
                "--blockdev", json.dumps({
                    "driver": "qcow2", "node-name": "disk",
                    "file": {"driver": "file", "node-name": "disk-file",
                             "filename": self.disk}}),
                "--chardev", "socket,id=qmp0,path=%s,server=on,wait=off"
                % self.qmp_path,
                "--monitor", "chardev=qmp0",
                "--chardev", "socket,id=qmp1,path=%s,server=on,wait=off"
                % self.cbt_qmp,
                "--monitor", "chardev=qmp1",
                "--nbd-server", "addr.type=unix,addr.path=%s" % self.nbd_path,
                "--export", "type=nbd,id=vm,node-name=disk,name=disk,"
                "writable=on"]
        self.qsd_argv = argv
        self.qsd = self.procs.start(argv, stdin=subprocess.DEVNULL,
                                    stdout=open(os.path.join(
                                        self.work, "qsd.log"), "wb"),
                                    stderr=subprocess.STDOUT)
        self.q = QMP(self.qmp_path, self.qsd)
        deadline = time.monotonic() + 30
        while True:        # the socket file exists before the server serves
            h = nbd.NBD()
            try:
                h.connect_uri(self.guest_uri)
                h.shutdown()
                break
            except nbd.Error:
                if time.monotonic() > deadline:
                    die("qemu-storage-daemon never served its export")
                time.sleep(0.01)
            finally:
                del h

    def stop_qsd(self):
        self.q.cmd("quit")
        if self.qsd.wait(60) != 0:
            die("qemu-storage-daemon exited with %d" % self.qsd.returncode)
        self.procs.forget(self.qsd)
        self.q.close()

    def new_ckpt(self):
        self.ckpt_n += 1
        return "c%d" % self.ckpt_n

    def reset(self, level):
        """Checkpoint c0's bitmap := the level's dirty set."""
        self.q.cmd("transaction", actions=[
            act("block-dirty-bitmap-clear", node="disk", name="c0"),
            act("block-dirty-bitmap-merge", node="disk", target="c0",
                bitmaps=["bench-set%d" % level])])
        self.q.events.clear()

    def fresh_run_dir(self):
        r = os.path.join(self.work, "run")
        shutil.rmtree(r, ignore_errors=True)
        os.makedirs(r)
        for f in ("full.qcow2", "full.qcow2.json", "full.qcow2.tree",
                  "full.qcow2.hashes"):
            if os.path.exists(os.path.join(self.repo, f)):
                os.link(os.path.join(self.repo, f), os.path.join(r, f))
        return r

    # ---- the routes: each returns a dict with t0, t1 (monotonic ns) ----
    def route_cbt(self, level, push=False, binary=None):
        r = self.fresh_run_dir()
        name = self.new_ckpt()
        target = os.path.join(r, "inc.qcow2")
        how = ["--push"] if push else ["--nbd-socket", self.nbd_path]
        argv = [binary or self.cbt, "backup", "--qmp", self.cbt_qmp] + how + [
            "--incremental", "--checkpoint", name, "--output=json", "vm",
            target]
        if not binary:
            self.cbt_argv[push] = argv
        self.reset(level)
        os.sync()
        qc, cc = cpu_of(self.qsd.pid), children_cpu()
        t0 = time.monotonic_ns()
        p = self.procs.start(argv, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.communicate()
        t1 = time.monotonic_ns()
        self.procs.forget(p)
        cpu = children_cpu() - cc
        qcpu = cpu_of(self.qsd.pid) - qc
        if p.returncode != 0:
            die("%s failed (exit %d):\n%s" % (shlex.join(argv), p.returncode,
                                               err.decode()[-2000:]))
        with open(target + ".json") as f:
            man = json.load(f)
        res = {"t0": t0, "t1": t1, "cpu": cpu, "qsd_cpu": qcpu,
               "bytes": man["bytes"]["copied"] + man["bytes"]["zeroed"],
               "alloc": self.check_target(target, level)}
        run([self.cbt, "checkpoint", "delete", "--qmp", self.cbt_qmp, "vm",
             name])
        shutil.rmtree(r)
        return res

    def route_push(self, level):
        r = self.fresh_run_dir()
        name = self.new_ckpt()
        target = os.path.join(r, "inc.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "full.qcow2",
             "-F", "qcow2", target, str(self.size)], cwd=r)
        self.q.cmd("blockdev-add", driver="qcow2", node_name="bench-tgt",
                   file={"driver": "file", "filename": target}, backing=None)
        self.reset(level)
        os.sync()
        qc = cpu_of(self.qsd.pid)
        t0 = time.monotonic_ns()
        self.q.cmd("transaction", actions=[
            act("block-dirty-bitmap-add", node="disk", name=name,
                persistent=True),
            act("block-dirty-bitmap-add", node="disk", name="bench-tmp",
                persistent=False, disabled=True, granularity=CLUSTER),
            act("block-dirty-bitmap-merge", node="disk", target="bench-tmp",
                bitmaps=["c0"]),
            act("blockdev-backup", device="disk", target="bench-tgt",
                sync="incremental", bitmap="bench-tmp", job_id="bench-push",
                auto_dismiss=False)])
        ev = self.q.wait_event("BLOCK_JOB_COMPLETED", device="bench-push")
        tj = time.monotonic_ns()
        if ev["data"].get("error"):
            die("blockdev-backup: " + ev["data"]["error"])
        self.q.cmd("job-dismiss", id="bench-push")
        self.q.cmd("blockdev-del", node_name="bench-tgt")   # flushes
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        t1 = time.monotonic_ns()
        qcpu = cpu_of(self.qsd.pid) - qc
        self.q.cmd("block-dirty-bitmap-remove", node="disk", name="bench-tmp")
        self.q.cmd("block-dirty-bitmap-remove", node="disk", name=name)
        res = {"t0": t0, "t1": t1, "tjob": tj, "cpu": 0.0, "qsd_cpu": qcpu,
               "bytes": ev["data"]["len"],
               "alloc": self.check_target(target, level)}
        shutil.rmtree(r)
        return res

    def route_pull(self, level, depth, chunk):
        r = os.path.join(self.work, "run")
        shutil.rmtree(r, ignore_errors=True)
        os.makedirs(r)
        name = self.new_ckpt()
        scratch = os.path.join(r, "scratch.qcow2")
        self.reset(level)
        os.sync()
        qc, sc = cpu_of(self.qsd.pid), self_cpu()
        t0 = time.monotonic_ns()
        run(["qemu-img", "create", "-q", "-f", "qcow2", scratch,
             str(self.size)])
        self.q.cmd("blockdev-add", driver="qcow2", node_name="bench-scratch",
                   file={"driver": "file", "filename": scratch},
                   backing="disk")
        self.q.cmd("transaction", actions=[
            act("block-dirty-bitmap-add", node="disk", name=name,
                persistent=True),
            act("block-dirty-bitmap-add", node="bench-scratch",
                name="bench-bk", persistent=False, disabled=True,
                granularity=CLUSTER),
            act("block-dirty-bitmap-merge", node="bench-scratch",
                target="bench-bk", bitmaps=[{"node": "disk", "name": "c0"}]),
            act("blockdev-backup", device="disk", target="bench-scratch",
                sync="none", job_id="bench-fleece",
                filter_node_name="bench-cbw")])
        self.q.cmd("block-export-add", type="nbd", id="bench-export",
                   node_name="bench-scratch", name="bench-export",
                   writable=False, bitmaps=["bench-bk"])
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.add_meta_context("qemu:dirty-bitmap:bench-bk")
        h.connect_uri("nbd+unix:///bench-export?socket=" + self.nbd_path)
        ta = time.monotonic_ns()
        ext = dirty_extents(h, h.get_size(), "qemu:dirty-bitmap:bench-bk")
        tb = time.monotonic_ns()
        nread = pull_read(h, ext, depth, chunk)
        tc = time.monotonic_ns()
        h.shutdown()
        del h
        self.q.cmd("block-export-del", id="bench-export")
        self.q.wait_event("BLOCK_EXPORT_DELETED", id="bench-export")
        self.q.cmd("block-job-cancel", device="bench-fleece")
        self.q.wait_event("BLOCK_JOB_CANCELLED", device="bench-fleece")
        self.q.cmd("blockdev-del", node_name="bench-scratch")
        os.unlink(scratch)
        t1 = time.monotonic_ns()
        qcpu, scpu = cpu_of(self.qsd.pid) - qc, self_cpu() - sc
        self.q.cmd("block-dirty-bitmap-remove", node="disk", name=name)
        shutil.rmtree(r)
        if nread < self.set_bytes[level] * 0.99:
            die("pull reader read %d bytes, the dirty set has %d"
                % (nread, self.set_bytes[level]))
        return {"t0": t0, "t1": t1, "tmap": tb - ta, "tread": tc - tb,
                "cpu": scpu, "qsd_cpu": qcpu, "bytes": nread}

    def route_idle(self, level):
        t0 = time.monotonic_ns()
        time.sleep(self.idle)
        return {"t0": t0, "t1": time.monotonic_ns()}

    def check_target(self, target, level):
        """qemu-img check clean; its own layer holds every cluster of the
        dirty set; (data bytes, zero bytes, clusters beyond the set)."""
        run(["qemu-img", "check", "-q", "-f", "qcow2", target])
        data = zero = 0
        have = set()
        for start, length, is_data in top_layer(target):
            if is_data:
                data += length
            else:
                zero += length
            have.update(range(start // CLUSTER, (start + length) // CLUSTER))
        missing = self.sets[level] - have
        if missing:
            die("%s lacks %d clusters of the dirty set (first at %d)"
                % (target, len(missing), min(missing) * CLUSTER))
        return data, zero, len(have - self.sets[level])

    def dd_prepare(self, nbytes):
        """A source file of nbytes random bytes, warm in the page cache."""
        d = os.path.join(self.work, "dd")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        self.dd_src = os.path.join(d, "src")
        self.dd_dst = os.path.join(d, "dst")
        rng = random.Random(self.seed)
        with open(self.dd_src, "wb") as f:
            for off in range(0, nbytes, MIB):
                f.write(rng.randbytes(min(MIB, nbytes - off)))
        os.sync()
        with open(self.dd_src, "rb") as f:
            while f.read(8 * MIB):
                pass

    def route_dd(self, level):
        if os.path.exists(self.dd_dst):
            os.unlink(self.dd_dst)
        os.sync()
        t0 = time.monotonic_ns()
        run(["dd", "if=" + self.dd_src, "of=" + self.dd_dst, "bs=1M",
             "conv=fdatasync", "status=none"])
        t1 = time.monotonic_ns()
        os.unlink(self.dd_dst)
        return {"t0": t0, "t1": t1}

    # ---- the whole run ----
    def setup(self):
        """The disk, its full backup (checkpoint c0), qemu-storage-daemon,
        the dirty sets, the guest writing."""
        t = time.monotonic()
        data = make_disk(self.work, self.disk, self.size, self.seed)
        os.makedirs(self.repo)
        run([self.cbt, "backup", "--full", "--checkpoint", "c0", self.disk,
             os.path.join(self.repo, "full.qcow2")])
        log("bench: disk (%s of data) and its full backup (checkpoint c0) "
            "made in %.1f s" % (human(data), time.monotonic() - t))

        self.start_qsd()
        # The dirty sets, written as the guest would, captured as disabled
        # bitmaps bench-setP (the writer is not running yet: c0 holds
        # exactly what was written).
        clusters = self.size // CLUSTER
        rng = random.Random(self.seed + 1)
        order = rng.sample(range(clusters), clusters * self.levels[-1] // 100)
        self.sets, self.set_bytes = {}, {}
        self.q.cmd("block-dirty-bitmap-clear", node="disk", name="c0")
        done = 0
        for p in self.levels:
            n = clusters * p // 100
            nbd_write_blocks(self.guest_uri, order[done:n], self.seed + p)
            done = n
            self.q.cmd("transaction", actions=[
                act("block-dirty-bitmap-add", node="disk",
                    name="bench-set%d" % p, persistent=False, disabled=True,
                    granularity=CLUSTER),
                act("block-dirty-bitmap-merge", node="disk",
                    target="bench-set%d" % p, bitmaps=["c0"])])
            self.sets[p] = set(order[:n])
            self.set_bytes[p] = n * CLUSTER
        counts = {b["name"]: b["count"]
                  for nd in self.q.cmd("query-named-block-nodes", flat=True)
                  if nd["node-name"] == "disk"
                  for b in nd.get("dirty-bitmaps", []) if "name" in b}
        for p in self.levels:
            if counts.get("bench-set%d" % p) != self.set_bytes[p]:
                die("bitmap bench-set%d counts %s bytes, %d were written"
                    % (p, counts.get("bench-set%d" % p), self.set_bytes[p]))

        self.wlog = os.path.join(self.work, "writes.log")
        self.w = self.procs.start(
            [sys.executable, os.path.abspath(__file__), "writer",
             self.guest_uri, str(self.size // BLOCK), str(self.rate),
             str(self.seed), self.wlog], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE)
        if self.w.stdout.readline().strip() != b"ready":
            die("the guest writer did not start")
        time.sleep(1)            # steady state before the first job

    def stop_writer(self):
        self.w.send_signal(signal.SIGTERM)
        if self.w.wait(60) != 0:
            die("the guest writer failed")
        self.procs.forget(self.w)
        return read_writes(self.wlog)

    def main(self):
        log("bench: live, disk %s, %d runs (+%d warm-up), dirty %s%%, guest "
            "%d writes/s of 64 KiB, seed %d" % (
                self.size_s, self.runs, self.warmup,
                "/".join(map(str, self.levels)), self.rate, self.seed))
        load0 = "/".join("%.2f" % x for x in os.getloadavg())
        self.setup()
        routes = {
            "cbt": self.route_cbt,
            "cbt-push": lambda p: self.route_cbt(p, push=True),
            "push": self.route_push,
            "pull16": lambda p: self.route_pull(p, 16, PULL_CHUNK),
            "pull1": lambda p: self.route_pull(p, 1, PULL_RUN_MAX),
            "dd": self.route_dd,
            "idle": self.route_idle,
        }
        if self.cbt_base:
            routes["cbt-base"] = lambda p: self.route_cbt(
                p, binary=self.cbt_base)
        results = {}       # (level, route) -> [result]
        for p in self.levels:
            self.dd_prepare(self.set_bytes[p])
            for i in range(-self.warmup, self.runs):
                k = i % len(routes)
                names = list(routes)[k:] + list(routes)[:k]
                line = []
                for name in names:
                    res = routes[name](p)
                    if i >= 0:
                        results.setdefault((p, name), []).append(res)
                    line.append("%s %.3f s" % (name,
                                               (res["t1"] - res["t0"]) / 1e9))
                log("  %d%% %s: %s" % (p, "warm-up" if i < 0 else "run %d/%d"
                                       % (i + 1, self.runs), ", ".join(line)))
            shutil.rmtree(os.path.dirname(self.dd_src))
        writes = self.stop_writer()
        self.stop_qsd()
        self.report(results, writes, load0)

    def report(self, results, writes, load0):
        def med(p, name, key=None):
            rs = results[(p, name)]
            if key is None:
                return statistics.median((r["t1"] - r["t0"]) / 1e9
                                         for r in rs)
            return statistics.median(r[key] for r in rs)

        refs = [
            ("push", "QEMU push: blockdev-backup sync=incremental "
             "(transaction to durable target)"),
            ("pull16", "libnbd pull reader, 16 x 2 MiB in flight, "
             "no hashing, no writing"),
            ("pull1", "libnbd pull reader, 1 request at a time "
             "(cbt's old pattern), no hashing, no writing"),
        ]
        print()
        print("| dirty (bytes) | reference | ref s | cbt s | ratio cbt/ref "
              "| cbt --push s | ratio cbt --push/ref |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for p in self.levels:
            c, cp = med(p, "cbt"), med(p, "cbt-push")
            rows = [(label, med(p, k)) for k, label in refs]
            rows.append(("dd conv=fdatasync of the dirty byte count",
                         med(p, "dd")))
            if self.cbt_base:
                rows.append(("cbt at BENCH_CBT_BASE (the same pull)",
                             med(p, "cbt-base")))
            for j, (label, t) in enumerate(rows):
                print("| %s | %s | %.3f | %s | %.2f | %s | %.2f |" % (
                    "%d%% (%s)" % (p, human(self.set_bytes[p])) if j == 0
                    else "", label, t, "%.3f" % c if j == 0 else "", c / t,
                    "%.3f" % cp if j == 0 else "", cp / t))
        print()
        print("Median wall time of %d runs (after %d untimed warm-up "
              "round%s), disk %s, guest writing %d x 64 KiB/s (%.1f MiB/s) "
              "through the NBD export during every job." % (
                  self.runs, self.warmup, "" if self.warmup == 1 else "s",
                  self.size_s, self.rate, self.rate * BLOCK / MIB))
        print("Load average (1/5/15 min) at the start: %s; at the end: %s; "
              "%d CPUs." % (load0, "/".join("%.2f" % x
                                            for x in os.getloadavg()),
                            os.cpu_count()))
        print()
        print("Where the time goes (medians):")
        print()
        print("| dirty | route | wall s | MB/s | bytes | CPU s (own) "
              "| CPU s (qsd) | detail |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        base = ("cbt-base",) if self.cbt_base else ()
        for p in self.levels:
            for name in ("cbt", "cbt-push", "push", "pull16", "pull1") + base:
                rs = results[(p, name)]
                w = med(p, name)
                b = statistics.median(r["bytes"] for r in rs)
                if name == "push":
                    det = "job (tx to COMPLETED) %.3f s" % statistics.median(
                        (r["tjob"] - r["t0"]) / 1e9 for r in rs)
                elif name.startswith("pull"):
                    det = "map %.3f s, read %.3f s" % (
                        med(p, name, "tmap") / 1e9,
                        med(p, name, "tread") / 1e9)
                else:
                    det = ""
                if "alloc" in rs[0]:
                    a = rs[-1]["alloc"]
                    det += ("; " if det else "") + (
                        "target: %s data, %s zero (clusters beyond the "
                        "set: %d)" % (human(a[0]), human(a[1]), a[2]))
                print("| %s | %s | %.3f | %.0f | %s | %s | %.2f | %s |" % (
                    "%d%%" % p, name, w, b / w / 1e6, human(b),
                    "%.2f" % med(p, name, "cpu") if name != "push" else "-",
                    med(p, name, "qsd_cpu"), det))
        print()
        print("Guest write latency (64 KiB NBD writes submitted inside each "
              "job's timed window, all runs pooled):")
        print()
        print("| dirty | during | writes | median ms | p99 ms | max ms |")
        print("|---|---|---:|---:|---:|---:|")
        for p in self.levels:
            for name, label in (("idle", "no job"), ("cbt", "cbt backup"),
                                ("cbt-push", "cbt backup --push"),
                                ("push", "QEMU push job"),
                                ("pull16", "pull reader (16 in flight)")):
                lat = sorted(lt for r in results[(p, name)]
                             for (ts, lt) in writes
                             if r["t0"] <= ts < r["t1"])
                if not lat:
                    print("| %d%% | %s | 0 | - | - | - |" % (p, label))
                    continue
                p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                print("| %d%% | %s | %d | %.2f | %.2f | %.2f |" % (
                    p, label, len(lat), statistics.median(lat) / 1e6,
                    p99 / 1e6, lat[-1] / 1e6))
        print()
        print("Commands (work folder paths shortened):")
        print()
        short = lambda a: a.replace(self.work + "/", "").replace(
            self.sockdir + "/", "").replace(self.cbt, "cbt")
        print("    qemu-storage-daemon " + " ".join(
            shlex.quote(short(a)) for a in self.qsd_argv[1:]))
        print("    guest: " + shlex.join([
            "live.py", "writer", "nbd+unix:///disk?socket=nbd.sock",
            str(self.size // BLOCK), str(self.rate), str(self.seed),
            "writes.log"]))
        for push in (False, True):
            print("    cbt: " + " ".join(shlex.quote(short(a))
                                         for a in self.cbt_argv[push]))
        print("    push: qemu-img create -f qcow2 -b full.qcow2 -F qcow2 "
              "run/inc.qcow2 SIZE; blockdev-add bench-tgt (backing null);")
        print("          [timed] transaction [block-dirty-bitmap-add disk cN "
              "persistent, block-dirty-bitmap-add disk bench-tmp disabled, "
              "block-dirty-bitmap-merge c0 -> bench-tmp, blockdev-backup "
              "disk -> bench-tgt sync=incremental bitmap=bench-tmp]; "
              "BLOCK_JOB_COMPLETED; job-dismiss; blockdev-del bench-tgt; "
              "fsync(inc.qcow2)")
        print("    pull: [timed] qemu-img create scratch; blockdev-add "
              "bench-scratch (backing disk); transaction [add cN, add "
              "bench-bk on scratch disabled, merge c0 -> bench-bk, "
              "blockdev-backup sync=none]; block-export-add "
              "bitmaps=[bench-bk]; libnbd block_status + aio_pread; "
              "block-export-del; "
              "block-job-cancel; blockdev-del; rm scratch")
        print("    dd: [timed] dd if=SRC of=DST bs=1M conv=fdatasync   (SRC: "
              "random bytes, the dirty byte count, warm cache)")
        print("    before every run, untimed: transaction "
              "[block-dirty-bitmap-clear c0, block-dirty-bitmap-merge "
              "bench-setP -> c0]; sync")
        if self.cbt_base:
            print("    cbt-base: the cbt line with %s" % self.cbt_base)
        print()
        print("Individual runs (seconds):")
        print()
        for p in self.levels:
            for name in ("cbt", "cbt-push", "push", "pull16", "pull1",
                         "dd") + base:
                print("  %3d%% %-8s %s" % (p, name, " ".join(
                    "%.3f" % ((r["t1"] - r["t0"]) / 1e9)
                    for r in results[(p, name)])))


def main(argv):
    if len(argv) >= 1 and argv[0] == "writer":
        uri, nblocks, rate, seed, logfile = argv[1:6]
        writer(uri, int(nblocks), int(rate), int(seed), logfile)
        return
    if len(argv) != 5 or argv[0] != "main":
        die("usage: live.py main CBT WORK SOCKDIR PIDFILE (see bench/live.sh)")
    b = Bench(*argv[1:])
    # SIGTERM (bench/live.sh forwards SIGINT/SIGHUP as SIGTERM): unwind
    # through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        b.main()
    finally:
        b.procs.end_all()


if __name__ == "__main__":
    main(sys.argv[1:])
