"""Streaming writeback (src/block/block.c): what a bulk job writes through
the page cache is handed to the disk 32 MiB at a time, over the span of
the file just written and only when the writes fill a good part of it;
scattered writes (a merge in place) and direct writes get no such kicks.
The kicks are seen with libfault's trace of sync_file_range calls on the
target file."""
import os
import re
import subprocess
import sys

from conftest import CBT, cbt, qemu_img, run
from test_direct_io import direct_io_works

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import faultlib as F  # noqa: E402

MiB = 1 << 20
KICK_RE = re.compile(r"libfault: call \d+: sync_file_range\(fd -?\d+, offset (\d+), "
                     r"length (\d+)\)")


def kicks(args, path):
    """Run cbt ARGS (it must succeed); the (offset, length) of every
    sync_file_range call on the file PATH names (libfault's trace)."""
    env = F.fault_env(path, op="flush")
    env["CBT_FAULT_VERBOSE"] = "2"
    proc = subprocess.run([CBT] + [str(a) for a in args], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # The trace is on: the job's own flush of the file is in it.
    assert re.search(r"libfault: call \d+: f(data)?sync\(", proc.stderr), proc.stderr
    return [(int(m.group(1)), int(m.group(2))) for m in KICK_RE.finditer(proc.stderr)]


def data_disk(d, mib):
    """A qcow2 disk whose first MIB MiB are data (0x61)."""
    disk = os.path.join(d, "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "%dM" % max(mib, 128))
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 %dM" % mib, disk])
    return disk


def test_sequential_writes_kick_their_span(tmp):
    """A convert through the cache (-t writeback) of 96 MiB of data: kicks
    every 32 MiB, each over the bytes just written (never the whole file,
    offset 0 length 0, which walks every cached page of it)."""
    d = str(tmp)
    disk = data_disk(d, 96)
    dst = os.path.join(d, "dst.raw")
    got = kicks(["convert", "-O", "raw", "-t", "writeback", disk, dst], "dst.raw")
    assert len(got) >= 2, got
    size = os.path.getsize(dst)
    for off, length in got:
        assert length > 0 and off + length <= size, got
        # One step's span (32 MiB), a little more for a write across it.
        assert length <= 40 * MiB, got
    assert sum(length for _, length in got) >= 64 * MiB, got
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", disk, dst)


def test_scattered_writes_in_place_are_not_kicked(tmp):
    """A commit writing 40 MiB of 64 KiB clusters, one in six, over 240 MiB
    of its base's data in place: no kick (the final flush writes them in
    file order; a kick made the caller wait for the device's queue)."""
    d = str(tmp)
    base = data_disk(d, 240)
    top = os.path.join(d, "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    cmds = []
    for i in range(640):
        cmds += ["-c", "write -P 0x%02x %dk 64k" % (1 + i % 250, i * 6 * 64)]
    run(["qemu-io", "-f", "qcow2"] + cmds + [top])
    view = os.path.join(d, "view.raw")
    qemu_img("convert", "-O", "raw", top, view)
    got = kicks(["commit", top], "disk.qcow2")
    assert got == [], got
    qemu_img("check", "-q", base)
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", base, view)


def test_direct_writes_are_not_kicked(tmp):
    """A backup writes its 96 MiB target around the cache: nothing there for
    a kick to start (it had one every 32 MiB before, and one at the end)."""
    d = str(tmp)
    disk = data_disk(d, 96)
    bk = os.path.join(d, "bk")
    os.mkdir(bk)
    full = os.path.join(bk, "full.qcow2")
    got = kicks(["backup", "--full", disk, full], "full.qcow2.part")
    if direct_io_works(d):
        assert got == [], got
    else:  # a file system without O_DIRECT: written through the cache
        assert len(got) >= 2, got
    cbt("verify", full)
    qemu_img("compare", "-q", disk, full)


def test_buffered_backup_is_kicked(tmp):
    """The same backup with --buffered: kicked as it goes."""
    d = str(tmp)
    disk = data_disk(d, 96)
    bk = os.path.join(d, "bk")
    os.mkdir(bk)
    full = os.path.join(bk, "full.qcow2")
    got = kicks(["backup", "--full", "--buffered", disk, full], "full.qcow2.part")
    assert len(got) >= 2 and all(length > 0 for _, length in got), got
    cbt("verify", full)
    qemu_img("compare", "-q", disk, full)
