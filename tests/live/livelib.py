"""The live tests' harness: real QEMU processes, a guest writer whose every
write is logged, and the cut oracle that decides whether a backup is the
disk at one single instant.

Imported as a plain module by tests/live/test_*.py (pytest puts tests/live
on sys.path); `from livelib import live` brings the fixture.  HACKING.md
("Live tests") explains how to write a test with it.  The pieces:

  Live      the per-test registry behind the `live` fixture: starts
            processes and writers, and kills what is left at the end of the
            test, also when it fails.
  Qsd       qemu-storage-daemon over a qcow2 image (optionally an explicit
            backing chain): QMP on a Unix socket, the format node `disk`
            (file node `disk-file`) exported writable over NBD, the
            "guest" writing through that export.
  QemuNbd   qemu-nbd -r over a closed image, with bitmaps: an export
            someone else set up (cbt backup --nbd).
  QemuVM    qemu-system-x86_64 -accel tcg -M q35 -S without a guest OS:
            virtio-blk-pci devices vda, vdb... on -blockdev nodes (or
            -drive), guest writes through HMP qemu-io.
  RealVM    a tiny real Linux guest (the vendored kit in tests/realvm/)
            writing realvm's workload to its virtio disk while the test acts.
  Writer    64 KiB blocks whose content encodes (block, generation), written
            at a steady rate from a seeded random choice of blocks, each write
            logged with its submit and completion times.
  cut_of    the cut oracle: the window of instants at which the disk held
            exactly what a backup holds (empty: no single instant did).
  must_copy the complement for incrementals: the writes that fall between
            two backups' instants and so must be in the second one.
  push_backup  QEMU's own push backup (LIVE.md 2.3 and 2.4), the reference
            the harness is proven against.

Times are time.monotonic_ns() of this process; QEMU's clock is never used.
"""
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections import namedtuple

import nbd
import pytest

from conftest import qemu_img, run

HERE = os.path.dirname(os.path.abspath(__file__))
REALVM_KIT = os.path.join(os.path.dirname(HERE), "realvm")
KERNEL_DIR = os.environ.get("CBT_REALVM_KERNEL", "/var/cache/cbt/realvm/kernel")

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB
SECTOR = 512
TIMEOUT = 120          # seconds for anything to happen before a test fails
TOOLS = ("qemu-storage-daemon", "qemu-system-x86_64", "qemu-img", "qemu-io", "qemu-nbd",
         "nbdinfo", "busybox")

now = time.monotonic_ns


def dashed(kw):
    """QMP argument names from Python keywords: node_name -> node-name."""
    return {k.replace("_", "-"): v for k, v in kw.items()}


def action(kind, **data):
    """One action of a QMP transaction."""
    return {"type": kind, "data": dashed(data)}


# --------------------------------------------------------------------------
# QMP


class QmpError(Exception):
    """QEMU answered a command with an error."""

    def __init__(self, cmd, error):
        self.cmd = cmd
        self.cls = error.get("class")
        self.desc = error.get("desc")
        super().__init__("QMP %s: %s: %s" % (cmd, self.cls, self.desc))


class QmpClosed(Exception):
    """The QMP connection ended (QEMU exited, or was killed)."""


class Qmp:
    """A QMP client usable from several threads: commands are matched to
    replies by id, events are queued until wait_event takes them.  A reader
    thread owns the socket's input."""

    def __init__(self, path, proc, what):
        deadline = time.monotonic() + TIMEOUT
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if proc.poll() is not None:
                    raise AssertionError("%s exited (%s) before its QMP socket "
                                         "answered" % (what, proc.returncode))
                if time.monotonic() > deadline:
                    raise AssertionError("%s: no QMP socket at %s" % (what, path))
                time.sleep(0.01)
        self.sock = sock
        self.rfile = sock.makefile("rb")
        greeting = json.loads(self.rfile.readline() or b"{}")
        if "QMP" not in greeting:
            raise AssertionError("%s: not a QMP greeting: %r" % (what, greeting))
        self.version = greeting["QMP"]["version"]["qemu"]
        self.events = []
        self.replies = {}
        self.closed = False
        self.next_id = 0
        self.cond = threading.Condition()
        self.send_lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.cmd("qmp_capabilities")

    def _read(self):
        try:
            for line in self.rfile:
                msg = json.loads(line)
                with self.cond:
                    if "event" in msg:
                        self.events.append(msg)
                    elif "id" in msg:
                        self.replies[msg["id"]] = msg
                    self.cond.notify_all()
        except (OSError, ValueError):
            pass
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def cmd(self, name, args=None, /, timeout=TIMEOUT, **kw):
        """Run one command; its "return" value, or QmpError."""
        arguments = dict(args or {}, **dashed(kw))
        with self.cond:
            self.next_id += 1
            cid = self.next_id
        msg = {"execute": name, "id": cid}
        if arguments:
            msg["arguments"] = arguments
        try:
            with self.send_lock:
                self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise QmpClosed("QMP %s: %s" % (name, e))
        deadline = time.monotonic() + timeout
        with self.cond:
            while cid not in self.replies:
                if self.closed:
                    raise QmpClosed("QMP %s: connection closed" % name)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("QMP %s: no reply in %d s" % (name, timeout))
                self.cond.wait(left)
            reply = self.replies.pop(cid)
        if "error" in reply:
            raise QmpError(name, reply["error"])
        return reply["return"]

    def wait_event(self, name, /, timeout=TIMEOUT, **match):
        """Take the first queued event NAME whose data has the given values
        (keywords dashed), waiting for it; earlier events stay queued."""
        want = dashed(match)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i, ev in enumerate(self.events):
                    data = ev.get("data", {})
                    if ev["event"] == name and all(data.get(k) == v for k, v in want.items()):
                        return self.events.pop(i)
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise AssertionError("no event %s %s (%s); queued: %s" % (
                        name, want, "connection closed" if self.closed else "timeout",
                        [e["event"] for e in self.events]))
                self.cond.wait(left)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.reader.join(5)


# --------------------------------------------------------------------------
# QEMU processes


class QemuProcess:
    """A QEMU program with a QMP socket, started by this test and ended by
    quit() (clean: bitmaps stored), kill() (SIGKILL) or, whatever happens,
    by the Live registry at the end of the test."""

    what = "qemu"

    def __init__(self, live):
        self.live = live
        self.proc = None
        self.monitor = None
        self.log = None
        live.processes.append(self)

    def _spawn(self, argv):
        self.argv = argv
        self.log = os.path.join(self.live.tmp, "%s-%d.log" % (self.what, len(self.live.processes)))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def _connect(self, path):
        try:
            self.monitor = Qmp(path, self.proc, self.what)
        except AssertionError as e:
            raise AssertionError("%s\n%s" % (e, self.log_tail()))

    def log_tail(self, n=20):
        if not self.log or not os.path.exists(self.log):
            return ""
        with open(self.log, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "%s output (%s):\n%s" % (self.what, self.log, "\n".join(lines[-n:]))

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def qmp(self, cmd, args=None, /, **kw):
        """One QMP command; its return value, or QmpError with QEMU's error.
        Keyword names are dashed (node_name=...); `args` passes a dict as is."""
        return self.monitor.cmd(cmd, args, **kw)

    def wait_event(self, name, /, timeout=TIMEOUT, **match):
        return self.monitor.wait_event(name, timeout, **match)

    def run_job(self, job, timeout=TIMEOUT):
        """Wait for block job JOB to complete (auto-dismiss off), require
        success, dismiss it; the BLOCK_JOB_COMPLETED event's data."""
        ev = self.wait_event("BLOCK_JOB_COMPLETED", timeout, device=job)["data"]
        assert "error" not in ev, "job %s failed: %s" % (job, ev)
        self.qmp("job-dismiss", id=job)
        return ev

    def quit(self, timeout=TIMEOUT):
        """QMP quit: QEMU flushes, stores its persistent bitmaps, exits 0."""
        try:
            self.qmp("quit")
        except QmpClosed:
            pass
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("%s did not quit in %d s" % (self.what, timeout))
        self._close_monitor()
        assert rc == 0, "%s exited %d after quit\n%s" % (self.what, rc, self.log_tail())

    def kill(self):
        """SIGKILL, by PID: what QEMU has not written to its images is lost."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._close_monitor()

    def _close_monitor(self):
        if self.monitor:
            self.monitor.close()
            self.monitor = None

    def cleanup(self):
        if self.proc is not None:
            self.kill()


class Qsd(QemuProcess):
    """qemu-storage-daemon over IMAGE: format node `disk` on file node
    `disk-file`, QMP on a Unix socket, NBD export `disk` (id `vm`) of node
    `disk`, writable.  CHAIN lists backing images bottom first, opened as
    nodes base0, base1... (file nodes baseN-file) under `disk`; without it
    QEMU opens the image's backing chain by itself (automatic node names).
    UNDER {path: filter options} puts a filter between that layer and its
    file: blkdebug (inject-error, set-state: jobs that meet I/O errors) or
    throttle (slow jobs; its throttle-group among OBJECTS, --object
    arguments).
    Ready when QMP answered and the export serves."""

    what = "qemu-storage-daemon"

    def __init__(self, live, image, chain=(), fmt="qcow2", under=None, objects=()):
        super().__init__(live)
        n = len(live.processes)
        self.qmp_path = live.sock("qsd%d.qmp" % n)
        # A second monitor for the cbt under test: a QMP monitor serves one
        # client at a time, and the harness keeps its own connection.
        self.cbt_qmp = live.sock("qsd%d-cbt.qmp" % n)
        self.nbd_path = live.sock("qsd%d.nbd" % n)
        self.uri = "nbd+unix:///disk?socket=" + self.nbd_path
        self.image = image
        argv = ["qemu-storage-daemon"]
        for o in objects:
            argv += ["--object", o]
        below = None
        for i, path in enumerate(list(chain) + [image]):
            node = "disk" if i == len(chain) else "base%d" % i
            dev = {"driver": fmt if i == len(chain) else "qcow2", "node-name": node,
                   "file": {"driver": "file", "node-name": node + "-file", "filename": path}}
            if under and path in under:
                # A filter between that layer and its file (node NODE-flt):
                # blkdebug (its child is "image"), throttle ("file").
                flt = dict(under[path])
                flt["image" if flt["driver"] == "blkdebug" else "file"] = dev["file"]
                flt.setdefault("node-name", node + "-flt")
                dev["file"] = flt
            if below:
                dev["backing"] = below
            argv += ["--blockdev", json.dumps(dev)]
            below = node
        argv += ["--chardev", "socket,id=qmp0,path=%s,server=on,wait=off" % self.qmp_path,
                 "--monitor", "chardev=qmp0",
                 "--chardev", "socket,id=qmp1,path=%s,server=on,wait=off" % self.cbt_qmp,
                 "--monitor", "chardev=qmp1",
                 "--nbd-server", "addr.type=unix,addr.path=%s" % self.nbd_path,
                 "--export", "type=nbd,id=vm,node-name=disk,name=disk,writable=on"]
        self._spawn(argv)
        self._connect(self.qmp_path)
        try:
            self.size = wait_nbd(self.uri, self.proc)
        except AssertionError as e:
            raise AssertionError("%s\n%s" % (e, self.log_tail()))


class QemuNbd(QemuProcess):
    """qemu-nbd -r over a closed IMAGE, as virtnbdbackup serves an offline
    VM's disk: a read-only export on a Unix socket (URI `uri`), with each of
    BITMAPS as qemu:dirty-bitmap:NAME; ready when it serves.  quit() ends it
    with SIGTERM (the image's lock goes with it).  No QMP."""

    what = "qemu-nbd"

    def __init__(self, live, image, bitmaps=(), fmt="qcow2"):
        super().__init__(live)
        path = live.sock("qemu-nbd%d.sock" % len(live.processes))
        self.uri = "nbd+unix:///?socket=" + path
        argv = ["qemu-nbd", "-r", "-f", fmt, "-t", "-k", path]
        for b in bitmaps:
            argv += ["-B", b]
        self._spawn(argv + [image])
        try:
            self.size = wait_nbd(self.uri, self.proc)
        except AssertionError as e:
            raise AssertionError("%s\n%s" % (e, self.log_tail()))

    def quit(self, timeout=TIMEOUT):
        self.proc.terminate()
        rc = self.proc.wait(timeout)
        assert rc == 0, "qemu-nbd exited %d on SIGTERM\n%s" % (rc, self.log_tail())


def wait_nbd(uri, proc):
    """Wait until the NBD server PROC serves URI (its socket file appears
    before it listens: connect until it answers); the export's size."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
            size = h.get_size()
            h.shutdown()
            return size
        except nbd.Error as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("%s never served %s: %s" % (proc.args[0], uri, e))
            time.sleep(0.01)
        finally:
            del h       # libnbd 1.14's Python handles close when freed


def qemu_nbd_dirty(image, bitmap):
    """[[offset, length]] dirty in IMAGE's persistent BITMAP as QEMU serves
    it (qemu-nbd -r -B, read by nbdinfo --map), neighbours merged."""
    sockdir = tempfile.mkdtemp(prefix="cbt-nbd-", dir="/tmp")
    uri = "nbd+unix:///?socket=%s/nbd.sock" % sockdir
    p = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-t", "-k", sockdir + "/nbd.sock",
                          "-B", bitmap, image], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_nbd(uri, p)
        out = run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:" + bitmap, uri]).out
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
        p.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    ext = []
    for e in json.loads(out):
        if e["type"] & 1:
            if ext and ext[-1][0] + ext[-1][1] == e["offset"]:
                ext[-1][1] += e["length"]
            else:
                ext.append([e["offset"], e["length"]])
    return ext


class QemuVM(QemuProcess):
    """qemu-system-x86_64 -accel tcg -M q35 -S -nodefaults -display none,
    no guest OS: one virtio-blk-pci device per image, ids vda, vdb...  With
    -blockdev (default) the format nodes are `disk`, `disk1`... (file nodes
    `disk-file`...); with drive=True they are -drive if=none (ids
    drive-vda...) and QEMU names the nodes (#blockNNN, see node())."""

    what = "qemu-system-x86_64"

    def __init__(self, live, images, drive=False, fmt="qcow2", extra=()):
        super().__init__(live)
        self.qmp_path = live.sock("vm%d.qmp" % len(live.processes))
        self.cbt_qmp = live.sock("vm%d-cbt.qmp" % len(live.processes))
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-M", "q35", "-S", "-nodefaults",
                "-display", "none", "-m", "64",
                "-chardev", "socket,id=qmp0,path=%s,server=on,wait=off" % self.qmp_path,
                "-mon", "chardev=qmp0,mode=control",
                "-chardev", "socket,id=qmp1,path=%s,server=on,wait=off" % self.cbt_qmp,
                "-mon", "chardev=qmp1,mode=control"]
        self.devices = []
        for i, path in enumerate(images):
            dev = "vd" + chr(ord("a") + i)
            if drive:
                backend = "drive-" + dev
                argv += ["-drive", "file=%s,format=%s,if=none,id=%s" % (
                    path.replace(",", ",,"), fmt, backend)]
            else:
                backend = "disk" if i == 0 else "disk%d" % i
                argv += ["-blockdev", json.dumps({
                    "driver": fmt, "node-name": backend,
                    "file": {"driver": "file", "node-name": backend + "-file",
                             "filename": path}})]
            argv += ["-device", "virtio-blk-pci,id=%s,drive=%s" % (dev, backend)]
            self.devices.append(dev)
        self._spawn(argv + list(extra))
        self._connect(self.qmp_path)

    @staticmethod
    def qdev(dev):
        """The BlockBackend's qdev path HMP qemu-io needs (LIVE.md 4.1.7)."""
        return "/machine/peripheral/%s/virtio-backend" % dev

    def node(self, dev):
        """The format node under device DEV, from query-block."""
        for b in self.qmp("query-block"):
            if b.get("qdev") == self.qdev(dev):
                return b["inserted"]["node-name"]
        raise AssertionError("query-block has no device %s" % dev)

    def hmp(self, line):
        return self.qmp("human-monitor-command", command_line=line)

    def hmp_write(self, dev, offset, length, pattern_file):
        """A guest write through HMP qemu-io, the buffer filled by repeating
        PATTERN_FILE.  QEMU 7.2 prints qemu-io's report and errors on its
        own stdout (our log), not in the HMP reply: the log is checked."""
        start = os.path.getsize(self.log)
        reply = self.hmp('qemu-io -d %s "write -s %s %d %d"' % (
            self.qdev(dev), pattern_file, offset, length))
        with open(self.log, "rb") as f:
            f.seek(start)
            out = f.read().decode("utf-8", "replace")
        want = "wrote %d/%d bytes at offset %d" % (length, length, offset)
        if want not in out:
            raise AssertionError("HMP qemu-io write on %s: %r%r" % (dev, reply, out))


# --------------------------------------------------------------------------
# The tiny real guest (tests/realvm, the company's kit, vendored)


def realvm_kit(work):
    """The vendored realvm module, with its work folder set to WORK (kernel
    from install-deps' unpacked Debian cloud kernel, initramfs built there)."""
    if not os.path.isdir(os.path.join(KERNEL_DIR, "boot")):
        pytest.fail("no guest kernel in %s: run scripts/install-deps.sh" % KERNEL_DIR)
    if REALVM_KIT not in sys.path:
        sys.path.insert(0, REALVM_KIT)
    import realvm
    realvm.WORK = work
    if not os.path.exists(os.path.join(work, "initramfs.cpio.gz")):
        os.makedirs(work, exist_ok=True)
        os.symlink(KERNEL_DIR, os.path.join(work, "kernel"))
        realvm.build_initramfs()
    return realvm


class RealVM(QemuProcess):
    """A real Linux guest under TCG whose /init writes realvm's workload
    (seed, count chunks of 4 KiB..maxlen) to its virtio disk (-drive
    if=virtio: device virtio0's drive) and then hangs (end="hang": the test
    ends it with quit() or kill()) or powers off.  Its console shows each
    chunk once written (REALVM-W); realvm's model predicts every byte and
    dirty extent (expect_extents)."""

    what = "realvm guest"

    def __init__(self, live, disk, seed, count, maxlen=256 * KiB, end="hang", pause=0):
        super().__init__(live)
        self.kit = realvm_kit(os.path.join(live.tmp, "realvm"))
        self.disk, self.seed, self.count, self.maxlen = disk, seed, count, maxlen
        self.size = image_size(disk)
        append = "wl=%d:%d:%d wlend=%s wlio=direct wlpause=%s" % (
            seed, count, maxlen, end, pause)
        # A second QMP monitor for the cbt under test (the harness keeps
        # the kit's): the kit's command line, one option more.
        self.cbt_qmp = live.sock("realvm%d-cbt.qmp" % len(live.processes))
        kit_cmd = self.kit.qemu_cmd
        self.kit.qemu_cmd = lambda *a, **k: kit_cmd(*a, **k) + [
            "-qmp", "unix:%s,server=on,wait=off" % self.cbt_qmp]
        try:
            self.vm = self.kit.Run(disk, append, "live%d" % seed)
        finally:
            self.kit.qemu_cmd = kit_cmd
        self.proc, self.log = self.vm.proc, self.vm.console
        self._connect(self.vm.qmp_sock)

    def written(self):
        """[[offset, length]] of the chunks the guest reported written."""
        return self.kit.writes_of(self.vm.lines())

    def wait_written(self, n, timeout=TIMEOUT):
        """Wait until the guest reported N chunks written."""
        ok = self.vm.wait_for(lambda ls: len(self.kit.writes_of(ls)) >= n or
                              any("REALVM-ERROR" in line for line in ls), timeout)
        if not ok or len(self.written()) < n:
            raise AssertionError("guest wrote %d of %d chunks\n%s" % (
                len(self.written()), n, self.log_tail()))

    def wait_synced(self, timeout=TIMEOUT):
        """Wait until the guest wrote and synced all its chunks."""
        if not self.vm.wait_for(lambda ls: any("REALVM-SYNCED" in line for line in ls),
                                timeout):
            raise AssertionError("guest never synced\n%s" % self.log_tail())

    def chunks(self):
        """[(offset, length, header)] the guest writes, in order (the model)."""
        return self.kit.workload(self.size // SECTOR, self.seed, self.count, self.maxlen)[1]

    def expect_extents(self, first=0, last=None, granularity=BLOCK):
        """[[offset, length]] dirtied by chunks first..last-1, at GRANULARITY."""
        return self.kit.dirty_extents(self.chunks()[first:last], self.size, granularity)

    def model(self, raw):
        """Apply the whole workload to the raw file RAW (the expected disk)."""
        self.kit.cmd_apply(types.SimpleNamespace(
            raw=raw, seed=self.seed, count=self.count, maxlen=self.maxlen, first_n=None,
            discards=0, no_write=False))

    def _close_monitor(self):
        super()._close_monitor()
        if not self.vm.out.closed:
            self.vm.out.close()


# --------------------------------------------------------------------------
# The registry and the fixture


class Live:
    """What one test started; close() ends it all (writers first, then every
    process still running, by PID) and removes the socket folder."""

    def __init__(self, tmp):
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            pytest.fail("live test tools missing: %s (run scripts/install-deps.sh)"
                        % ", ".join(missing))
        self.tmp = str(tmp)
        os.makedirs(self.tmp, exist_ok=True)
        # Unix socket paths are limited to 108 bytes: a short folder of its own.
        self.sockdir = tempfile.mkdtemp(prefix="cbt-live-", dir="/tmp")
        self.processes = []
        self.writers = []

    def sock(self, name):
        return os.path.join(self.sockdir, name)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def qsd(self, image, **kw):
        return Qsd(self, image, **kw)

    def vm(self, images, **kw):
        return QemuVM(self, images, **kw)

    def qemu_nbd(self, image, **kw):
        return QemuNbd(self, image, **kw)

    def realvm(self, disk, seed, count, **kw):
        return RealVM(self, disk, seed, count, **kw)

    def writer(self, peer, nblocks=None, device="vda", **kw):
        """A Writer on PEER: a Qsd (through its NBD export) or a QemuVM (HMP
        qemu-io on DEVICE).  nblocks defaults to the whole disk."""
        if isinstance(peer, Qsd):
            target = NbdTarget(peer.uri)
            size = peer.size
        else:
            target = HmpTarget(peer, device, self.sock("pattern-%d" % len(self.writers)))
            size = image_size(peer.node(device), peer)
        w = Writer(target, nblocks or size // BLOCK, **kw)
        self.writers.append(w)
        return w

    def close(self):
        """End everything (again: closing twice is harmless)."""
        for w in self.writers:
            w.stop(check=False)
        for p in self.processes:
            p.cleanup()
        shutil.rmtree(self.sockdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """cbt's live journal in the test's own folder (CBT_STATE_DIR), for
    every test of a module that imports it."""
    d = str(tmp_path / "state")
    monkeypatch.setenv("CBT_STATE_DIR", d)
    return d


@pytest.fixture
def live(tmp_path):
    reg = Live(tmp_path)
    try:
        yield reg
    finally:
        reg.close()


# --------------------------------------------------------------------------
# Images


def image_size(image, peer=None):
    """Virtual size: of a file (qemu-img info), or of a node of PEER."""
    if peer is None:
        return json.loads(qemu_img("info", "--output=json", "-U", image).out)["virtual-size"]
    for n in peer.qmp("query-named-block-nodes", flat=True):
        if n["node-name"] == image:
            return n["image"]["virtual-size"]
    raise AssertionError("no node %s" % image)


def make_image(path, size, gens=None, backing=None):
    """A qcow2 image of SIZE (over BACKING if given) holding the writer's
    blocks GENS ({block: generation}) and nothing else of its own."""
    if backing:
        qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path, size)
    else:
        qemu_img("create", "-q", "-f", "qcow2", path, size)
    if gens:
        pats = tempfile.mkdtemp(prefix="cbt-pat-")
        try:
            cmds = []
            for b, g in sorted(gens.items()):
                pat = os.path.join(pats, "%d" % b)
                with open(pat, "wb") as f:
                    f.write(block_sector(b, g))
                cmds += ["-c", "write -q -s %s %d %d" % (pat, b * BLOCK, BLOCK)]
            run(["qemu-io", "-f", "qcow2"] + cmds + [path])
        finally:
            shutil.rmtree(pats)
    return path


def bitmaps(image):
    """{name: flags} of IMAGE's persistent bitmaps (qemu-img info -U)."""
    info = json.loads(qemu_img("info", "--output=json", "-U", image).out)
    data = info.get("format-specific", {}).get("data", {})
    return {b["name"]: b["flags"] for b in data.get("bitmaps", [])}


def top_blocks(image):
    """Blocks that IMAGE's own layer allocates (data or zero), not its
    backing files: the blocks a backup file copied (qemu-img map depth 0)."""
    out = set()
    for e in json.loads(qemu_img("map", "--output=json", "-f", "qcow2", image).out):
        if e["depth"] == 0 and e.get("present", e["data"] or e["zero"]):
            out.update(range(e["start"] // BLOCK, (e["start"] + e["length"] - 1) // BLOCK + 1))
    return out


# --------------------------------------------------------------------------
# The writer


def block_sector(block, gen):
    """One 512-byte sector of block BLOCK at generation GEN (>= 1): magic,
    block, generation, then filler derived from them.  A block is this
    sector repeated, so a torn or misplaced block never decodes."""
    head = b"CBTLIVE1" + struct.pack("<QQ", block, gen)
    fill = random.Random(block * 1000003 + gen).randbytes(SECTOR - len(head))
    return head + fill


def block_data(block, gen):
    return block_sector(block, gen) * (BLOCK // SECTOR)


ZERO_BLOCK = bytes(BLOCK)


def decode_block(data, block):
    """The generation BLOCK holds in DATA (0: zeroes, never written), or
    None when DATA is not exactly one generation of that block."""
    if data == ZERO_BLOCK:
        return 0
    if len(data) != BLOCK or data[:8] != b"CBTLIVE1":
        return None
    b, g = struct.unpack_from("<QQ", data, 8)
    if b != block or g == 0 or data != block_data(b, g):
        return None
    return g


class NbdTarget:
    """Writes through an NBD export (the Qsd guest), one request at a time."""

    def __init__(self, uri):
        self.h = nbd.NBD()
        self.h.connect_uri(uri)

    def write(self, block, gen):
        self.h.pwrite(block_data(block, gen), block * BLOCK)

    def close(self):
        try:
            self.h.shutdown()
        except nbd.Error:
            pass      # the server is gone (killed): nothing to flush to
        self.h = None


class HmpTarget:
    """Writes as the guest of a QemuVM: HMP qemu-io on the device's
    BlockBackend, the buffer filled from a one-sector pattern file."""

    def __init__(self, vm, dev, pattern):
        self.vm, self.dev, self.pattern = vm, dev, pattern

    def write(self, block, gen):
        with open(self.pattern, "wb") as f:
            f.write(block_sector(block, gen))
        self.vm.hmp_write(self.dev, block * BLOCK, BLOCK, self.pattern)

    def close(self):
        pass


Write = namedtuple("Write", "block gen submit complete")


class Writer:
    """The guest: writes whole blocks (block_data) to blocks 0..nblocks-1
    chosen by random.Random(seed), each block's generations 1, 2, 3... in
    order (after INITIAL, {block: generation} the disk already holds), one
    write at a time.  log lists every Write with its submit and completion
    times.  Either start() a thread writing RATE blocks a second (pause,
    resume, wait_writes, stop), or write synchronously with step(n)."""

    def __init__(self, target, nblocks, seed=1, rate=200, initial=None):
        self.target, self.nblocks, self.rate = target, nblocks, rate
        self.rng = random.Random(seed)
        self.initial = dict(initial or {})
        self.gens = dict(self.initial)
        self.log = []
        self.cond = threading.Condition()
        self.thread = None
        self.paused = self.stopping = self.busy = False
        self.error = None

    def _write_one(self):
        block = self.rng.randrange(self.nblocks)
        gen = self.gens.get(block, 0) + 1
        t0 = now()
        self.target.write(block, gen)
        w = Write(block, gen, t0, now())
        with self.cond:
            self.gens[block] = gen
            self.log.append(w)
            self.cond.notify_all()
        return w

    def step(self, n=1):
        """N writes in the caller's thread (no background thread running)."""
        assert self.thread is None, "step() while the writer thread runs"
        return [self._write_one() for _ in range(n)]

    def start(self):
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self):
        interval = 10 ** 9 // self.rate
        due = now()
        try:
            while True:
                with self.cond:
                    while self.paused and not self.stopping:
                        self.cond.wait()
                    if self.stopping:
                        return
                    self.busy = True
                try:
                    self._write_one()
                finally:
                    with self.cond:
                        self.busy = False
                        self.cond.notify_all()
                # Steady: one write per interval, no burst after a stall.
                due = max(due + interval, now() - interval)
                with self.cond:
                    left = due - now()
                    if left > 0 and not self.stopping and not self.paused:
                        self.cond.wait(left / 1e9)
        except Exception as e:          # reported by wait_writes / stop
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def pause(self):
        """Stop writing; returns once no write is in flight."""
        with self.cond:
            self.paused = True
            while self.busy:
                self.cond.wait()

    def resume(self):
        with self.cond:
            self.paused = False
            self.cond.notify_all()

    def wait_writes(self, n, timeout=TIMEOUT):
        """Wait until N more writes have completed."""
        with self.cond:
            goal = len(self.log) + n
            deadline = time.monotonic() + timeout
            while len(self.log) < goal:
                if self.error:
                    raise AssertionError("writer failed: %r" % self.error)
                left = deadline - time.monotonic()
                assert left > 0, "writer made %d of %d writes in %d s" % (
                    n - goal + len(self.log), n, timeout)
                self.cond.wait(left)

    def stop(self, check=True):
        """End the thread (after its write in flight) and the connection;
        with check, a write that failed fails the test."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread:
            self.thread.join(TIMEOUT)
            self.thread = None
        if self.target:
            self.target.close()
            self.target = None
        if check and self.error:
            raise AssertionError("writer failed: %r" % self.error)

    def history(self):
        """{block: [Write, ...]} in generation order."""
        hist = {}
        for w in self.log:
            hist.setdefault(w.block, []).append(w)
        return hist


# --------------------------------------------------------------------------
# The cut oracle


class View:
    """A backup's guest view: the raw bytes of an image (its whole backing
    chain), made by qemu-img convert."""

    def __init__(self, image, tmp, fmt="qcow2"):
        self.path = os.path.join(str(tmp), "view-%s.raw" % os.path.basename(image))
        qemu_img("convert", "-U", "-f", fmt, "-O", "raw", image, self.path)

    def block(self, b):
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), BLOCK, b * BLOCK)


class Cut:
    """The cut oracle's answer for one backup.

    ok: the backup equals the disk at some single instant T, and (lo, hi) is
    the window of such instants: lo < T < hi, None meaning unbounded (lo:
    nothing found was written; hi: nothing was overwritten afterwards).
    lo_by / hi_by name the blocks that set each bound.  problems: blocks
    holding no generation of their own (torn, misplaced, foreign data) or
    a generation never written.  gens: {block: generation found}."""

    def __init__(self):
        self.lo = self.hi = None
        self.lo_by = self.hi_by = None
        self.problems = []
        self.gens = {}

    @property
    def ok(self):
        return not self.problems and (self.lo is None or self.hi is None or self.lo < self.hi)

    def overlaps(self, t0, t1):
        """Does the window meet [t0, t1] (e.g. a transaction's send and
        return)?"""
        return self.ok and (self.lo is None or self.lo < t1) and (self.hi is None or self.hi > t0)

    def bounds(self, t0, t1):
        """(lo, hi) narrowed to [t0, t1]: where T lies when the backup was
        taken by a transaction sent at t0 that returned at t1."""
        return (t0 if self.lo is None else max(self.lo, t0),
                t1 if self.hi is None else min(self.hi, t1))

    def __repr__(self):
        s = "Cut(%s, T in (%s, %s), lo by %s, hi by %s" % (
            "ok" if self.ok else "REJECTED", self.lo, self.hi, self.lo_by, self.hi_by)
        if self.problems:
            s += ", problems: %s" % "; ".join(self.problems[:5])
        return s + ")"


def cut_of(writer, view):
    """Decide whether VIEW (a View) equals the disk WRITER wrote at one
    single instant T.  For every block the generation g found must satisfy
    submit(g) < T < complete(g+1): write g was sent before T (a block never
    written, or holding its INITIAL generation, has no lower bound), and
    write g+1 had not completed by T (no upper bound when g is the last).
    The window is the intersection of these intervals over all blocks."""
    cut = Cut()
    hist = writer.history()
    for b in range(writer.nblocks):
        g = decode_block(view.block(b), b)
        base = writer.initial.get(b, 0)
        writes = hist.get(b, [])
        if g is None:
            cut.problems.append("block %d holds no generation (torn or foreign)" % b)
            continue
        cut.gens[b] = g
        if not base <= g <= base + len(writes):
            cut.problems.append("block %d holds generation %d, written: %d..%d" % (
                b, g, base, base + len(writes)))
            continue
        if g > base:
            lo = writes[g - base - 1].submit
            if cut.lo is None or lo > cut.lo:
                cut.lo, cut.lo_by = lo, (b, g)
        if g < base + len(writes):
            hi = writes[g - base].complete
            if cut.hi is None or hi < cut.hi:
                cut.hi, cut.hi_by = hi, (b, g + 1)
    return cut


def must_copy(writer, after, before):
    """The writes an incremental backup must hold when the previous backup's
    instant T is known to be before AFTER and the new one's T' after BEFORE
    (use Cut.bounds: after = previous hi, before = new lo): those sent after
    T and completed before T'.  Writes straddling either instant may or may
    not be in it.  {block: [Write]}"""
    out = {}
    for w in writer.log:
        if w.submit >= after and w.complete <= before:
            out.setdefault(w.block, []).append(w)
    return out


def missing_writes(writer, prev, nxt, copied):
    """must_copy's writes whose block is not in COPIED (the blocks the
    incremental holds, e.g. top_blocks(its file)); prev and nxt are the two
    backups' (lo, hi) bounds."""
    need = must_copy(writer, prev[1], nxt[0])
    return {b: ws for b, ws in need.items() if b not in copied}


def assert_cut(writer, image, tmp, tx, fmt="qcow2"):
    """The backup IMAGE (its chain) is the disk at one instant inside the
    transaction TX = (sent, returned).  Returns the Cut."""
    cut = cut_of(writer, View(image, tmp, fmt))
    assert cut.ok, "%s is no single instant of the disk: %r" % (image, cut)
    assert cut.overlaps(*tx), "%s: %r, not within the transaction %s" % (image, cut, tx)
    return cut


def assert_incremental(writer, cut1, tx1, cut2, tx2, inc):
    """The incremental INC (over the backup of cut1) holds in its own layer
    every write made between the two backups' instants (none of them may
    be vacuous), and every block whose generation differs between the two
    restored views.  Returns the blocks INC copied."""
    prev, nxt = cut1.bounds(*tx1), cut2.bounds(*tx2)
    copied = top_blocks(inc)
    assert must_copy(writer, prev[1], nxt[0]), "no write fell between the backups"
    missing = missing_writes(writer, prev, nxt, copied)
    assert not missing, "writes between the instants missing from %s: %s" % (inc, missing)
    changed = {b for b, g in cut2.gens.items() if g != cut1.gens[b]}
    assert changed <= copied, "changed blocks not in %s: %s" % (inc, sorted(changed - copied))
    return copied


# --------------------------------------------------------------------------
# QEMU's own push backup: the reference the harness is proven against

SLOW = 256 * KiB       # bytes/s: a throttled job cannot end before `during` ran


def push_backup(q, target, size, node="disk", checkpoint=None, since=None,
                backing=None, during=None, job="push0"):
    """A push backup of NODE into a new qcow2 TARGET, as LIVE.md 2.3/2.4:
    blockdev-add of the target (created beforehand: blockdev-add is no
    transaction action), then one transaction adding the new persistent
    CHECKPOINT bitmap (if any) and starting blockdev-backup: sync=full, or
    with SINCE sync=incremental through a temporary disabled copy of that
    bitmap (the checkpoint itself is never cleared), into a TARGET over
    BACKING opened with backing null.  DURING, if given, runs while the job
    is throttled to SLOW, then the job goes at full speed: writes it makes
    meet the job's copy-before-write.  Returns (t0, t1), the transaction's
    send and return times."""
    qemu_img("create", "-q", "-f", "qcow2", *(["-b", backing, "-F", "qcow2"] if backing else []),
             target, size)
    tgt = "tgt-" + job
    dev = {"driver": "qcow2", "node-name": tgt,
           "file": {"driver": "file", "filename": target}}
    if backing:
        dev["backing"] = None
    q.qmp("blockdev-add", dev)
    actions = []
    if checkpoint:
        actions.append(action("block-dirty-bitmap-add", node=node, name=checkpoint,
                              persistent=True))
    backup = dict(device=node, target=tgt, sync="full", job_id=job, auto_dismiss=False)
    if since:
        tmp = "backup-" + since
        actions += [action("block-dirty-bitmap-add", node=node, name=tmp, persistent=False,
                           disabled=True, granularity=BLOCK),
                    action("block-dirty-bitmap-merge", node=node, target=tmp, bitmaps=[since])]
        backup.update(sync="incremental", bitmap=tmp)
    if during:
        backup["speed"] = SLOW
    actions.append(action("blockdev-backup", **backup))
    t0 = now()
    q.qmp("transaction", actions=actions)
    t1 = now()
    if during:
        during()
        try:
            q.qmp("block-job-set-speed", device=job, speed=0)
        except QmpError as e:
            raise AssertionError("job %s ended before `during` did (%s)" % (job, e))
    q.run_job(job)
    if since:
        q.qmp("block-dirty-bitmap-remove", node=node, name=tmp)
    q.qmp("blockdev-del", node_name=tgt)
    return t0, t1


def extents_blocks(ext, granularity=BLOCK):
    """The set of GRANULARITY-sized blocks [[offset, length]] extents cover."""
    return {b for o, n in ext for b in range(o // granularity, (o + n - 1) // granularity + 1)}
