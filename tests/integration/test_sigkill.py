"""SIGKILL a `cbt io` writer in the middle of a random workload.

`cbt io` with no -c reads commands from stdin, one per line, and prints one
qemu-io style line per command ("wrote N/N bytes at offset X", "discard
...", "read ..."; flush prints nothing).  The test feeds a long random
workload of writes (`write -P N`), zero-writes (`write -z`, `write -z -u`),
discards and flushes through a pipe, keeping at most WINDOW commands ahead of
the output it has seen.  After every flush it sends a marker `read 0 K` with
a unique length K, so seeing the marker's line proves the flush returned.
At a random moment (after a random marker, plus a random delay) the process
group is killed with SIGKILL.

Then, for the last flush whose marker was seen:
  - `qemu-img check` finds no corruption (leaks are allowed: exit 0 or 3);
  - every byte that no command sent after that flush touches reads back as
    the model says (the model applies the commands up to that flush);
  - a byte touched afterwards only by writes and plain zero-writes holds its
    flushed value or the value of one of those commands (old or new, never
    anything else).  Bytes touched by a later discard or `write -z -u` are
    not checked: those free clusters, and qemu itself may reuse a freed
    cluster for a later write before the L2 update that freed it is on disk;
  - `cbt io -r` can open the killed image and read all of it.
The image is made by qemu-img so that only cbt's write path is under test.
"""
import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from conftest import (CBT, IO_DONE_RE, byte_runs, cbt, first_difference, qemu_img,
                      qcow2_discard, rand_length, rand_offset, raw_contents)

NONZERO = bytes([0] + [1] * 255)

KiB = 1024
MiB = 1024 * 1024
SIZE = 4 * MiB
WINDOW = 12           # commands sent ahead of the output seen
NCMDS = 1500
# CBT_TEST_SEED shifts every run's seed (for soak runs).
SEED_BASE = int(os.environ.get("CBT_TEST_SEED", "0"), 0)
RUNS = 10
# (cluster size, extended_l2) by run
GEOMETRY = [(64 * KiB, False), (4 * KiB, False), (32 * KiB, True), (512, False),
            (64 * KiB, True)]


def make_workload(rng, cluster_size, sub):
    """Commands as (text, kind, off, len, value); markers are ('read', k)."""
    cmds = []
    pat = 0
    markers = 0
    while len(cmds) < NCMDS:
        off = rand_offset(rng, SIZE, cluster_size, sub)
        n = rand_length(rng, SIZE, off, cluster_size, sub)
        r = rng.randrange(100)
        if r < 55:
            pat = pat % 255 + 1
            cmds.append(("write -P %d %d %d" % (pat, off, n), "write", off, n, pat))
        elif r < 67:
            cmds.append(("write -z %d %d" % (off, n), "zero", off, n, 0))
        elif r < 75:
            cmds.append(("write -z -u %d %d" % (off, n), "zero-unmap", off, n, 0))
        elif r < 87:
            cmds.append(("discard %d %d" % (off, n), "discard", off, n, 0))
        else:
            cmds.append(("flush", "flush", 0, 0, 0))
            markers += 1
            cmds.append(("read 0 %d" % markers, "marker", 0, markers, markers))
    return cmds


class Writer:
    """A `cbt io` process fed from a thread, its output read by another."""

    def __init__(self, img, cmds):
        self.cmds = cmds
        self.proc = subprocess.Popen([CBT, "io", "-f", "qcow2", str(img)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.cond = threading.Condition()
        self.done = 0            # command lines seen on stdout
        self.last_marker = 0     # highest marker seen
        self.sent = 0            # commands written (or being written) to stdin
        self.out = []
        self.stop = False
        # acks[i]: output lines that precede command i's own line
        self.acks = []
        k = 0
        for c in cmds:
            self.acks.append(k)
            if c[1] != "flush":
                k += 1
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.feeder = threading.Thread(target=self._feed, daemon=True)
        self.reader.start()
        self.feeder.start()

    def _read(self):
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            with self.cond:
                for raw in lines:
                    line = raw.decode(errors="replace")
                    self.out.append(line)
                    for m in IO_DONE_RE.finditer(line):
                        self.done += 1
                        if m.group(1) == "read" and int(m.group(4)) == 0:
                            self.last_marker = max(self.last_marker, int(m.group(2)))
                self.cond.notify_all()
        with self.cond:
            self.stop = True
            self.cond.notify_all()

    def _feed(self):
        try:
            for i, c in enumerate(self.cmds):
                with self.cond:
                    while not self.stop and self.done < self.acks[i] - WINDOW:
                        self.cond.wait(0.5)
                    if self.stop:
                        return
                    self.sent = i + 1
                self.proc.stdin.write((c[0] + "\n").encode())
                self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def wait_marker(self, k, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.last_marker < k and not self.stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return self.last_marker >= k

    def kill(self):
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        rc = self.proc.poll()
        if rc is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(5)
        self.feeder.join(5)
        err = self.proc.stderr.read().decode(errors="replace")
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        return rc, err


def apply(model, cmd, cluster_size):
    text, kind, off, n, val = cmd
    if kind in ("write", "zero", "zero-unmap"):
        model[off:off + n] = bytes([val]) * n
    elif kind == "discard":
        qcow2_discard(model, off, n, cluster_size)


@pytest.mark.parametrize("run", range(RUNS))
def test_sigkill_during_workload(tmp, run):
    seed = 1000 + run + SEED_BASE
    rng = random.Random(seed)
    cluster_size, xl2 = GEOMETRY[run % len(GEOMETRY)]
    sub = cluster_size // 32 if xl2 else 512
    img = tmp / "victim.qcow2"
    opts = "cluster_size=%d" % cluster_size + (",extended_l2=on" if xl2 else "")
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, img, SIZE)

    cmds = make_workload(rng, cluster_size, sub)
    nmarkers = sum(1 for c in cmds if c[1] == "marker")
    target = rng.randint(1, min(nmarkers - 1, 12 + 3 * run))
    delay = rng.choice((0, 0, 0.001, 0.003, 0.01, 0.02, 0.05))

    w = Writer(img, cmds)
    seen = w.wait_marker(target, timeout=10)
    if seen:
        time.sleep(delay)
    rc, err = w.kill()
    assert rc is None, "cbt io exited by itself (rc %s) before the kill\nstderr: %s\nstdout tail: %s" % (
        rc, err[-2000:], "\n".join(w.out[-20:]))
    assert seen, ("no progress from cbt io within 10 s: saw %d command lines, marker %d of %d "
                  "wanted (does cbt io flush stdout after each command?)\nstderr: %s"
                  % (w.done, w.last_marker, target, err[-2000:]))
    assert not any("fail" in line.lower() for line in w.out), "\n".join(w.out[-20:])

    # The state at the last flush known to have returned.
    m = w.last_marker
    flush_idx = next(i for i, c in enumerate(cmds) if c[1] == "marker" and c[4] == m) - 1
    assert cmds[flush_idx][1] == "flush"
    model = bytearray(SIZE)
    for c in cmds[:flush_idx]:
        apply(model, c, cluster_size)
    later = [c for c in cmds[flush_idx + 1:w.sent] if c[1] != "marker"]

    res = qemu_img("check", "--output=json", "-f", "qcow2", img, check=False)
    assert res.rc in (0, 3), "qemu-img check after SIGKILL: %r" % res
    data = json.loads(res.out)
    assert data.get("corruptions", 0) == 0 and data.get("check-errors", 0) == 0, data

    got = raw_contents(img, tmp)
    assert len(got) == SIZE

    # Byte classes: 0 untouched after the flush, 1 written (old or new), 2 unchecked.
    touched = bytearray(SIZE)
    for _, kind, off, n, _ in later:
        if kind in ("discard", "zero-unmap"):
            touched[off:off + n] = b"\x02" * n
        elif kind in ("write", "zero"):
            seg = touched[off:off + n]
            touched[off:off + n] = seg.replace(b"\x00", b"\x01")
    where = "run %d seed %d (cluster %d%s), killed after marker %d (flush #%d, %d commands sent, %d done)" % (
        run, seed, cluster_size, " xl2" if xl2 else "", m, flush_idx, w.sent, w.done)

    # Untouched bytes: exactly the flushed state.
    for cls_off, cls_len, cls in byte_runs(touched):
        if cls == 0:
            diff = first_difference(got[cls_off:cls_off + cls_len],
                                    bytes(model[cls_off:cls_off + cls_len]), cls_off)
            assert diff is None, (
                "%s: flushed data differs in the untouched range [%d, +%d): %s"
                % (where, cls_off, cls_len, diff))

    # Bytes only written after the flush: old value or one of the new ones.
    for cls_off, cls_len, cls in byte_runs(touched):
        if cls != 1:
            continue
        news = {val for _, kind, off, n, val in later
                if kind in ("write", "zero") and off < cls_off + cls_len and cls_off < off + n}
        g = got[cls_off:cls_off + cls_len]
        old = bytes(model[cls_off:cls_off + cls_len])
        if g == old:
            continue
        # bad where g != old and g is none of the new values (big-int masks)
        not_new = g.translate(bytes(0 if v in news else 1 for v in range(256)))
        neq = (int.from_bytes(g, "big") ^ int.from_bytes(old, "big")).to_bytes(
            cls_len, "big").translate(NONZERO)
        bad = int.from_bytes(not_new, "big") & int.from_bytes(neq, "big")
        if bad:
            i = cls_len - 1 - (bad.bit_length() - 1) // 8
            assert False, ("%s: byte at %d is 0x%02x, neither its flushed value 0x%02x "
                           "nor a value written after the flush %s"
                           % (where, cls_off + i, g[i], old[i], sorted(news)))

    # cbt can open the killed image and read all of it.
    res = cbt("io", "-r", "-f", "qcow2", "-c", "read 0 %d" % SIZE, img, check=False)
    assert res.rc == 0 and "read %d/%d bytes at offset 0" % (SIZE, SIZE) in res.out, res
