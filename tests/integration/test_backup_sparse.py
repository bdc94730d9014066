"""Backups of large sparse disks (issue 14): unallocated and zero ranges are
copied per extent, not per block, and the .hashes file must not notice.

A 64 GiB disk whose size is not a multiple of the 64 KiB block (the last
block is 3.5 KiB), with a few writes scattered over it (a block at the
start, 8 KiB across two blocks in the middle, a zero write; a hole from
there to the end), is backed up in full, changed (data, a discard over a
large written range, a write past a long hole, the short last block) and
backed up incrementally, as qcow2 and as raw.  After each backup:
  - the .hashes file is byte for byte the model's: SHA-256 of every 64 KiB
    block of the view (docs/backups.md), computed here from the writes
    without reading 64 GiB: a block never written is the digest of 64 KiB
    of zeroes, the short last block the digest of its 3.5 KiB of zeroes;
  - the manifest's root and file digest are that file's SHA-256;
  - qemu-img compare finds the backup chain equal to the disk, and
    cbt verify and cbt restore accept it.
"""
import hashlib
import json
import os

import pytest

import sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "interop"))
from interop_lib import KiB, MiB, cbt_ok, cbt_rc, qemu_img, qemu_io  # noqa: E402

GiB = 1 << 30
B = 64 * KiB
SIZE = 64 * GiB + 256 * KiB + 7 * 512   # a hole of more than a block at the end


class View:
    """The disk's guest view as a sparse set of 64 KiB blocks."""

    def __init__(self, size):
        self.size = size
        self.blocks = {}

    def write(self, off, data):
        while data:
            i, o = divmod(off, B)
            n = min(len(data), B - o)
            blk = self.blocks.setdefault(
                i, bytearray(min(B, self.size - i * B)))
            blk[o:o + n] = data[:n]
            off += n
            data = data[n:]

    def zero(self, off, length):
        self.write(off, bytes(length))

    def leaves(self):
        n = (self.size + B - 1) // B
        zero = hashlib.sha256(bytes(B)).digest()
        last = hashlib.sha256(bytes(self.size - (n - 1) * B)).digest()
        out = bytearray(zero * (n - 1) + last)
        for i, blk in self.blocks.items():
            out[i * 32:(i + 1) * 32] = hashlib.sha256(bytes(blk)).digest()
        return bytes(out)


def io(disk, view, cmds):
    args = []
    for kind, off, length, pat in cmds:
        if kind == "w":
            args += ["-c", "write -P 0x%x %d %d" % (pat, off, length)]
            view.write(off, bytes([pat]) * length)
        elif kind == "z":
            args += ["-c", "write -z %d %d" % (off, length)]
            view.zero(off, length)
        else:  # discard: reads zeroes afterwards (no backing file)
            args += ["-c", "discard %d %d" % (off, length)]
            view.zero(off, length)
    qemu_io("-f", "qcow2", disk, *args)


def check(target, view, disk, fmt):
    with open(target + ".hashes", "rb") as f:
        got = f.read()
    want = view.leaves()
    assert len(got) == len(want)
    if got != want:
        bad = next(i for i in range(0, len(got), 32)
                   if got[i:i + 32] != want[i:i + 32]) // 32
        pytest.fail("%s.hashes: block %d (offset %d) differs from the model"
                    % (target, bad, bad * B))
    with open(target + ".json") as f:
        m = json.load(f)
    sha = hashlib.sha256(got).hexdigest()
    assert m["hash"]["root"] == sha
    assert m["hash"]["file-sha256"] == sha
    assert m["hash"]["blocks"] == len(want) // 32
    if fmt == "qcow2":
        qemu_img("compare", "-q", "-f", "qcow2", "-F", "qcow2", disk, target)
    cbt_ok("verify", target)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_sparse_disk_hashes(tmp_path, fmt):
    disk = str(tmp_path / "disk.qcow2")
    repo = tmp_path / "repo"
    repo.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", disk, str(SIZE))
    view = View(SIZE)
    io(disk, view, [
        ("w", 0, B, 0x11),
        ("w", 5 * GiB + 60 * KiB, 8 * KiB, 0x22),   # across two blocks
        ("w", 9 * GiB, 4 * MiB, 0x44),
        ("z", 9 * GiB + 64 * KiB, 128 * KiB, 0),    # zero clusters in data
    ])                                              # a hole up to the end
    full = str(repo / "full")
    cbt_ok("backup", "--full", "--checkpoint", "c0", "-O", fmt,
           disk, full)
    check(full, view, disk, fmt)

    io(disk, view, [
        ("w", 3 * GiB, 192 * KiB, 0x55),
        ("d", 9 * GiB, 4 * MiB, 0),                 # discard: zeroes now
        ("w", 40 * GiB + 4 * KiB, 4 * KiB, 0x66),
        ("w", SIZE - 512, 512, 0x33),               # in the short block
        ("z", SIZE - 3584, 1024, 0),
    ])
    inc = str(repo / "inc")
    cbt_ok("backup", "--incremental", "--checkpoint", "c1", disk, inc)
    check(inc, view, disk, fmt)

    out = str(tmp_path / "restored.qcow2")
    cbt_ok("restore", "-O", "qcow2", inc, out)
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "qcow2", disk, out)


def forge_leaf(target, block, leaf):
    """Replace one leaf and make the manifest vouch for the new file, so
    that only the walk over the view can find the lie."""
    with open(target + ".hashes", "r+b") as f:
        f.seek(block * 32)
        f.write(leaf)
        f.seek(0)
        sha = hashlib.sha256(f.read()).hexdigest()
    with open(target + ".json") as f:
        m = json.load(f)
    m["hash"]["root"] = m["hash"]["file-sha256"] = sha
    with open(target + ".json", "w") as f:
        json.dump(m, f)


@pytest.mark.parametrize("where", ["hole", "data", "short-tail"])
def test_sparse_disk_bad_leaf_named(tmp_path, where):
    """verify and restore name the block whose leaf does not match, in a
    hole (checked against the digest of zeroes without reading), in data,
    and in the short last block; restore leaves no output."""
    disk = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, str(SIZE))
    qemu_io("-f", "qcow2", disk, "-c", "write -P 0x11 %d 64k" % (2 * GiB))
    full = str(tmp_path / "full")
    cbt_ok("backup", "--full", "--no-checkpoint", disk, full)
    block = {"hole": 20 * GiB // B, "data": 2 * GiB // B,
             "short-tail": (SIZE - 1) // B}[where]
    forge_leaf(full, block, hashlib.sha256(b"forged").digest())
    res = cbt_rc("verify", full)
    assert res.rc == 65, res
    assert "block %d)" % block in res.err, res
    assert "offset %d," % (block * B) in res.err, res
    if where == "data":
        assert "does not match its hash" in res.err, res
    else:
        assert "reads as zeroes in every backup" in res.err, res
    out = str(tmp_path / "out.qcow2")
    res = cbt_rc("restore", full, out)
    assert res.rc == 65, res
    assert "block %d)" % block in res.err, res
    assert not os.path.exists(out) and not os.path.exists(out + ".part")
