"""Backups and restores write their data around the page cache (O_DIRECT)
unless --buffered: the file they write is not left in the host's cache
(docs/cli.md, "--buffered"; CBT_OPEN_DIRECT in include/cbt/image.h).

What is asserted is what a user of the host sees: how much of the new
file the page cache holds right after the command (mincore(2) over a
mapping of it), against the same command with --buffered, and that the
result is right (QEMU reads it as the disk; cbt verify).  On a file system
without direct I/O the command must still work, through the cache.
"""
import ctypes
import errno
import mmap
import os
import sys
import tempfile

import pytest

from conftest import cbt, qemu_img, run

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import faultlib as F  # noqa: E402

MiB = 1 << 20
PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident(path):
    """Bytes of PATH the page cache holds now (mincore(2) over a mapping of
    it; mapping reads nothing in)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), \
            os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer((size + PAGE - 1) // PAGE)
            r = _libc.mincore(addr, size, vec)
            assert r == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw[:(size + PAGE - 1) // PAGE]) * PAGE
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def direct_io_works(folder):
    """Does FOLDER's file system take an aligned O_DIRECT write?"""
    path = os.path.join(folder, "probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, 4096)
        os.pwrite(fd, buf, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


def make_disk(d, size=96 * MiB):
    disk = os.path.join(d, "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, size)
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 64M",
         "-c", "write -P 0x62 80M 8M", disk])
    return disk


def check_cache(path, data, buffered, direct):
    """PATH holds DATA bytes of data: cached all but its metadata unless
    written around the cache."""
    held = resident(path)
    if buffered or not direct:
        assert held >= data // 2, "%s: only %d of %d bytes cached" % (path, held, data)
    else:
        assert held <= data // 16, "%s: %d of %d bytes left in the page cache" % (
            path, held, data)


def setup_case(tmp):
    """(folder, does it take direct I/O, a disk with 72 MiB of data, an
    empty backup folder)"""
    d = str(tmp)
    bk = os.path.join(d, "bk")
    os.mkdir(bk)
    return d, direct_io_works(d), make_disk(d), bk


@pytest.mark.parametrize("buffered", [False, True], ids=["direct", "buffered"])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_backup_full_and_incremental(tmp, fmt, buffered):
    d, direct, disk, bk = setup_case(tmp)
    extra = ["--buffered"] if buffered else []
    full = os.path.join(bk, "f." + fmt)
    cbt("backup", "--full", "-O", fmt, *extra, disk, full)
    check_cache(full, 72 * MiB, buffered, direct)
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x63 4M 24M", disk])
    inc = os.path.join(bk, "i." + fmt)
    cbt("backup", "--incremental", *extra, disk, inc)
    check_cache(inc, 24 * MiB, buffered, direct)
    cbt("verify", inc)
    if fmt == "qcow2":
        qemu_img("compare", "-q", "-f", "qcow2", "-F", "qcow2", disk, inc)
    out = os.path.join(d, "out.qcow2")
    cbt("restore", inc, out)
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "qcow2", disk, out)


@pytest.mark.parametrize("buffered", [False, True], ids=["direct", "buffered"])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_restore(tmp, fmt, buffered):
    d, direct, disk, bk = setup_case(tmp)
    full = os.path.join(bk, "f.qcow2")
    cbt("backup", "--full", "--buffered", disk, full)
    out = os.path.join(d, "out." + fmt)
    cbt("restore", "-O", fmt, *(["--buffered"] if buffered else []), full, out)
    check_cache(out, 72 * MiB, buffered, direct)
    qemu_img("compare", "-q", "-f", "qcow2", "-F", fmt, disk, out)


def test_without_direct_io(tmp):
    """/dev/shm (tmpfs; direct I/O only since Linux 6.6): whatever the
    kernel says, the backup and the restore are right."""
    d = str(tmp)
    disk = make_disk(d)
    shm = tempfile.mkdtemp(prefix="cbt-direct-", dir="/dev/shm")
    try:
        full = os.path.join(shm, "f.qcow2")
        cbt("backup", "--full", "--no-checkpoint", disk, full)
        cbt("verify", full)
        out = os.path.join(shm, "out.raw")
        cbt("restore", "-O", "raw", full, out)
        qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", disk, out)
    finally:
        run(["rm", "-rf", shm])


def test_target_flush_syncs_once_for_all_l2_tables(tmp):
    """An incremental whose blocks lie under eight L2 tables (4 GiB, 64 KiB
    clusters: 512 MiB per table) flushes its target with one sync for all
    the tables, not one each: the tables only need the refcounts and the
    data before them, not one another.  Counted with libfault (flush
    calls on the target: fsync, fdatasync, sync_file_range)."""
    d = str(tmp)
    disk = os.path.join(d, "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "4G")
    bk = os.path.join(d, "bk")
    os.mkdir(bk)
    cbt("backup", "--full", disk, os.path.join(bk, "f.qcow2"))
    run(["qemu-io", "-f", "qcow2"] +
        sum((["-c", "write -P 9 %dM 64k" % (i * 512 + 7)] for i in range(8)), []) +
        [disk])
    inc = os.path.join(bk, "i.qcow2")
    res, counts = F.run_faulty(["backup", "--incremental", disk, inc],
                               "i.qcow2.part", op="flush")
    assert res.rc == 0, res
    # Before: one fdatasync per dirty L2 table (8) plus the refcounts',
    # the L1's and the header's, and the streaming writeback's kicks.
    assert counts["flush"] <= 5, counts
    qemu_img("check", "-q", inc)
    qemu_img("compare", "-q", disk, inc)
    cbt("verify", inc)


@pytest.mark.parametrize("cache", ["none", "writeback", None])
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_convert_cache_mode(tmp, fmt, cache):
    """cbt convert -t none writes DST around the cache, as qemu-img's -t
    none; the default is -t writeback, as qemu-img's."""
    d = str(tmp)
    direct = direct_io_works(d)
    disk = make_disk(d)
    dst = os.path.join(d, "dst." + fmt)
    cbt("convert", "-O", fmt, *(["-t", cache] if cache else []), disk, dst)
    check_cache(dst, 72 * MiB, cache != "none", direct)
    qemu_img("compare", "-q", "-f", "qcow2", "-F", fmt, disk, dst)


def test_convert_unknown_cache_mode(tmp):
    d = str(tmp)
    disk = make_disk(d)
    res = cbt("convert", "-t", "sometimes", disk, os.path.join(d, "x.raw"), check=False)
    assert res.rc == 64 and "unknown cache mode 'sometimes'" in res.err, res
    assert not os.path.exists(os.path.join(d, "x.raw"))


def test_direct_write_refused_later_falls_back(tmp):
    """A file system that takes O_DIRECT at open but refuses a write with
    EINVAL (an alignment rule statx did not tell): the node goes through
    the cache from then on, rewriting the refused bytes, and the backup is
    right.  libfault fails one write call of the target with EINVAL, at
    every N: where N is a direct write the backup succeeds and verifies;
    where it is a write through the cache (metadata) the backup fails
    naming the error and leaves nothing."""
    d, direct, disk, bk = setup_case(tmp)
    argv = ["backup", "--full", "--no-checkpoint", disk, os.path.join(bk, "f.qcow2")]
    res, counts = F.run_faulty(argv, "f.qcow2.part", op="write")
    assert res.rc == 0, res
    os.unlink(os.path.join(bk, "f.qcow2"))
    os.unlink(os.path.join(bk, "f.qcow2.json"))
    os.unlink(os.path.join(bk, "f.qcow2.tree"))
    recovered = 0
    for n in range(1, counts["matching"] + 1):
        res, c = F.run_faulty(argv, "f.qcow2.part", op="write", nth=n, err=str(errno.EINVAL))
        assert c["injected"] == 1, (n, c)
        if res.rc == 0:
            recovered += 1
            out = os.path.join(bk, "f.qcow2")
            cbt("verify", out)
            qemu_img("compare", "-q", disk, out)
            qemu_img("check", "-q", out)
            for suffix in ("", ".json", ".tree"):
                os.unlink(out + suffix)
        else:
            assert "Invalid argument" in res.err, (n, res)
            assert os.listdir(bk) == [], (n, os.listdir(bk))
    if direct:
        assert recovered > 0, "no EINVAL landed on a direct write"
