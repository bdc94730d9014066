"""The live chain operations benchmark (issue 12 section 3); bench/livechain.sh
runs it.

Each of cbt snapshot|commit|stream|copy --qmp against the same QEMU job
driven by a plain QMP client without any bitmap handling, in the same run,
on the same state: a qcow2 disk held by qemu-storage-daemon (two QMP
monitors: one for this script, one for cbt), with BENCH_CHECKPOINTS
checkpoints made offline and, for the jobs, two live overlays made by
plain QMP (blockdev-snapshot with the bitmaps' copies, as libvirt does),
each with BENCH_LAYER_DATA of the guest's writes (through the NBD export).
The state is built anew (untimed) before every timed run; the routes
alternate.

  snapshot   cbt snapshot --qmp vs qemu-img create -b + blockdev-add +
             transaction [blockdev-snapshot]
  commit     cbt commit --qmp (active: the top into its backing file) vs
             block-commit, BLOCK_JOB_READY, job-complete, BLOCK_JOB_COMPLETED
  commit-mid cbt commit --qmp --top MID (intermediate) vs block-commit
             top-node MID, BLOCK_JOB_COMPLETED; and a third route, the same
             QMP with cbt's bitmap handling (save, PENDING, rebuild,
             finalize): what that handling costs QEMU
  stream     cbt stream --qmp vs block-stream, BLOCK_JOB_COMPLETED
  copy       cbt copy --qmp vs qemu-img create + blockdev-add +
             blockdev-mirror sync=full, READY, job-complete, COMPLETED

cbt's time is the whole process (connecting, finding the disk and its
checkpoints, its transactions, the job, the journal); the reference's is
its QMP commands on a connection already open.

Usage: livechain.py CBT WORK SOCKDIR PIDFILE
"""
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import nbd

from benchlib import MIB, QMP, die, human, log, parse_size, run

OPS = ["snapshot", "commit", "commit-mid", "stream", "copy"]


class State:
    """One disk under qemu-storage-daemon, built for one timed run."""

    def __init__(self, b, tag, layers):
        self.b = b
        self.dir = os.path.join(b.work, tag)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.base = os.path.join(self.dir, "base.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", self.base, str(b.size)])
        run(["qemu-io", "-f", "qcow2", "-c",
             "write -P 1 0 %d" % b.layer_data, self.base])
        for i in range(b.checkpoints):
            run([b.cbt, "checkpoint", "create", self.base, "c%d" % i])
        self.qmp_path = os.path.join(b.sockdir, tag + ".qmp")
        self.cbt_qmp = os.path.join(b.sockdir, tag + "-cbt.qmp")
        self.nbd = os.path.join(b.sockdir, tag + ".nbd")
        argv = ["qemu-storage-daemon", "--blockdev",
                '{"driver":"qcow2","node-name":"disk","file":{"driver":"file",'
                '"filename":"%s"}}' % self.base]
        for p in (self.qmp_path, self.cbt_qmp):
            cid = os.path.basename(p).replace(".", "-")
            argv += ["--chardev", "socket,id=%s,path=%s,server=on,wait=off"
                     % (cid, p), "--monitor", "chardev=" + cid]
        argv += ["--nbd-server", "addr.type=unix,addr.path=" + self.nbd,
                 "--export", "type=nbd,id=vm,node-name=disk,name=disk,"
                 "writable=on"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        b.note_pid(self.proc.pid)
        self.q = QMP(self.qmp_path, self.proc)
        self.top = "disk"
        self.n = 0
        for i in range(layers):
            self.overlay_with_bitmaps()
            self.guest_writes(i + 2)

    def names(self):
        for n in self.q.cmd("query-named-block-nodes", flat=True):
            if n["node-name"] == self.top:
                return [x["name"] for x in n.get("dirty-bitmaps", [])
                        if "name" in x]
        return []

    def overlay(self, with_bitmaps):
        self.n += 1
        node = "ovl%d" % self.n
        path = os.path.join(self.dir, node + ".qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
             os.path.basename(self.file_of(self.top)), "-F", "qcow2", path])
        self.q.cmd("blockdev-add", driver="qcow2", node_name=node,
                   file={"driver": "file", "filename": path}, backing=None)
        acts = [{"type": "blockdev-snapshot",
                 "data": {"node": self.top, "overlay": node}}]
        if with_bitmaps:
            acts += [{"type": "block-dirty-bitmap-add",
                      "data": {"node": node, "name": name, "persistent": True}}
                     for name in self.names()]
        self.q.cmd("transaction", actions=acts)
        self.top = node
        return path

    def overlay_with_bitmaps(self):
        return self.overlay(True)

    def file_of(self, node):
        return self.base if node == "disk" else \
            os.path.join(self.dir, node + ".qcow2")

    def guest_writes(self, pattern):
        """BENCH_LAYER_DATA of 64 KiB writes spread over the disk."""
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///disk?socket=" + self.nbd)
        buf = bytes([pattern]) * (64 * 1024)
        step = max(self.b.size // (self.b.layer_data // len(buf)), len(buf))
        step -= step % len(buf)
        for off in range(0, self.b.size, step)[: self.b.layer_data // len(buf)]:
            h.pwrite(buf, off)
        h.flush()
        h.shutdown()

    def job(self, cmd, job, ready=False, **args):
        self.q.cmd(cmd, job_id=job, **args)
        if ready:
            self.q.wait_event("BLOCK_JOB_READY", device=job)
            self.q.cmd("job-complete", id=job)
        ev = self.q.wait_event("BLOCK_JOB_COMPLETED", device=job)
        if "error" in ev.get("data", {}):
            die("%s: %s" % (cmd, ev["data"]["error"]))

    def end(self):
        try:
            self.q.cmd("quit")
        except Exception:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def qemu_bitmaps_route(b, s, op):
    """commit-mid with cbt's bitmap handling done by plain QMP: base's
    copies saved before the job, auto-finalize off, at PENDING one
    transaction rebuilding them from the saved copies and the committed
    layer's, then job-finalize.  What the handling costs QEMU, without
    cbt's process, lookup and checks."""
    names = s.names()
    t0 = time.monotonic()
    acts = []
    for n in names:
        acts += [{"type": "block-dirty-bitmap-add", "data": {
                     "node": "disk", "name": "save-" + n, "persistent": False,
                     "disabled": True}},
                 {"type": "block-dirty-bitmap-merge", "data": {
                     "node": "disk", "target": "save-" + n, "bitmaps": [n]}}]
    s.q.cmd("transaction", actions=acts)
    s.q.cmd("block-commit", job_id="ref", device=s.top, top_node="ovl1",
            auto_finalize=False, auto_dismiss=False)
    s.q.wait_event("JOB_STATUS_CHANGE", id="ref", status="pending")
    acts = []
    for n in names:
        acts += [{"type": "block-dirty-bitmap-clear",
                  "data": {"node": "disk", "name": n}},
                 {"type": "block-dirty-bitmap-merge", "data": {
                     "node": "disk", "target": n,
                     "bitmaps": ["save-" + n, {"node": "ovl1", "name": n}]}},
                 {"type": "block-dirty-bitmap-remove",
                  "data": {"node": "disk", "name": "save-" + n}}]
    s.q.cmd("transaction", actions=acts)
    s.q.cmd("job-finalize", id="ref")
    ev = s.q.wait_event("BLOCK_JOB_COMPLETED", device="ref")
    if "error" in ev.get("data", {}):
        die("block-commit: %s" % ev["data"]["error"])
    s.q.cmd("job-dismiss", id="ref")
    return time.monotonic() - t0


def cbt_route(b, s, op):
    argv = {"snapshot": ["snapshot", "--qmp", s.cbt_qmp, "vm",
                         os.path.join(s.dir, "new.qcow2")],
            "commit": ["commit", "-q", "--qmp", s.cbt_qmp, "vm"],
            "commit-mid": ["commit", "-q", "--qmp", s.cbt_qmp, "--top",
                           s.file_of("ovl1"), "vm"],
            "stream": ["stream", "--qmp", s.cbt_qmp, "vm"],
            "copy": ["copy", "--qmp", s.cbt_qmp, "vm",
                     os.path.join(s.dir, "new.qcow2")]}[op]
    t0 = time.monotonic()
    subprocess.run([b.cbt] + argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def qemu_route(b, s, op):
    t0 = time.monotonic()
    if op == "snapshot":
        s.overlay(False)
    elif op == "commit":
        s.job("block-commit", "ref", ready=True, device=s.top)
    elif op == "commit-mid":
        s.job("block-commit", "ref", device=s.top, top_node="ovl1")
    elif op == "stream":
        s.job("block-stream", "ref", device=s.top)
    else:
        path = os.path.join(s.dir, "new.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(b.size)])
        s.q.cmd("blockdev-add", driver="qcow2", node_name="dest",
                file={"driver": "file", "filename": path})
        s.job("blockdev-mirror", "ref", ready=True, device=s.top,
              target="dest", sync="full")
    return time.monotonic() - t0


class Bench:
    def __init__(self, argv):
        self.cbt, self.work, self.sockdir, self.pidfile = argv
        self.size = parse_size(os.environ.get("BENCH_SIZE", "1G"))
        self.layer_data = parse_size(os.environ.get("BENCH_LAYER_DATA", "64M"))
        self.checkpoints = int(os.environ.get("BENCH_CHECKPOINTS", "4"))
        self.runs = int(os.environ.get("BENCH_RUNS", "3"))
        self.ops = os.environ.get("BENCH_OPS", " ".join(OPS)).split()
        if not self.ops or set(self.ops) - set(OPS):
            die("BENCH_OPS: some of %s" % " ".join(OPS))
        os.environ["CBT_STATE_DIR"] = os.path.join(self.work, "state")

    def note_pid(self, pid):
        with open("/proc/%d/stat" % pid) as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
        with open(self.pidfile, "a") as f:
            f.write("%d %s\n" % (pid, start))

    def main(self):
        log("disk %s, %s of guest writes per layer, %d checkpoints, %d runs"
            % (human(self.size), human(self.layer_data), self.checkpoints,
               self.runs))
        rows = []
        routes = {"cbt": cbt_route, "qemu": qemu_route,
                  "qemu+bitmaps": qemu_bitmaps_route}
        for op in self.ops:
            names = ["cbt", "qemu"] + (["qemu+bitmaps"] if op == "commit-mid"
                                       else [])
            times = {r: [] for r in names}
            for i in range(self.runs):
                for route in names[i % len(names):] + names[:i % len(names)]:
                    s = State(self, "%s-%s-%d" % (op, route.replace("+", "-"), i),
                              0 if op == "snapshot" else 2)
                    try:
                        times[route].append(routes[route](self, s, op))
                    finally:
                        s.end()
            c, q = statistics.median(times["cbt"]), statistics.median(times["qemu"])
            rows.append((op, c, q))
            if "qemu+bitmaps" in times:
                qb = statistics.median(times["qemu+bitmaps"])
                log("%-10s QMP with cbt's bitmap handling %7.1f ms (%s): "
                    "the handling %+.1f ms, cbt beyond it %+.1f ms" % (
                        op, qb * 1e3,
                        " ".join("%.0f" % (x * 1e3) for x in times["qemu+bitmaps"]),
                        (qb - q) * 1e3, (c - qb) * 1e3))
            log("%-10s cbt %7.1f ms  qemu %7.1f ms  ratio %.2f  cbt - qemu "
                "%+6.1f ms  (cbt %s; qemu %s)" % (
                    op, c * 1e3, q * 1e3, c / q, (c - q) * 1e3,
                    " ".join("%.0f" % (x * 1e3) for x in times["cbt"]),
                    " ".join("%.0f" % (x * 1e3) for x in times["qemu"])))
        print("| op | cbt (ms) | plain QMP (ms) | ratio cbt/QMP | cbt - QMP (ms) |")
        print("|---|---:|---:|---:|---:|")
        for op, c, q in rows:
            print("| %s | %.1f | %.1f | %.2f | %+.1f |"
                  % (op, c * 1e3, q * 1e3, c / q, (c - q) * 1e3))


def on_term(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        die(__doc__.strip().splitlines()[-1])
    signal.signal(signal.SIGTERM, on_term)
    Bench(sys.argv[1:]).main()
