"""Backups of large sparse disks (issue 14): unallocated and zero ranges are
copied per extent, not per block, and the block hashes must not notice.

A 64 GiB disk whose size is not a multiple of the 64 KiB block (the last
block is 3.5 KiB), with a few writes scattered over it (a block at the
start, 8 KiB across two blocks in the middle, a zero write; a hole from
there to the end), is backed up in full, changed (data, a discard over a
large written range, a write past a long hole, the short last block) and
backed up incrementally, as qcow2 and as raw.  After each backup:
  - the record file (.tree, sha256-tree-v2) is the model's
    (tests/treemodel.py, docs/backups.md), computed here from the writes
    without reading 64 GiB: the full backup's byte for byte (records for
    exactly the blocks written and the nodes above them; never-written
    blocks, the short last block included, and the subtrees of zeroes
    have none), the incremental's chain node for node;
  - the manifest's root is the model's and its file digest the file's
    SHA-256;
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
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import treemodel as T  # noqa: E402

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
        """{block: digest} of the blocks that are not zeroes."""
        return {i: hashlib.sha256(bytes(blk)).digest()
                for i, blk in self.blocks.items() if any(blk)}


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


def check(target, view, disk, fmt, full=False):
    with open(target + ".tree", "rb") as f:
        got = f.read()
    leaves = view.leaves()
    if full:
        assert got == T.record_file(view.size, leaves), \
            "%s.tree differs from the model's" % target
    with open(target + ".json") as f:
        m = json.load(f)
    root = T.check_leaves(T.chain_files(target), view.size, leaves,
                          m["hash"]["root"])
    assert m["hash"]["root"] == root
    assert m["hash"]["file-sha256"] == hashlib.sha256(got).hexdigest()
    assert m["hash"]["blocks"] == (view.size + B - 1) // B
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
    check(full, view, disk, fmt, full=True)

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
    """Replace one leaf of a full backup and rebuild its record file around
    it (every node above it recomputed by the model), with the manifest
    vouching for the new file and root, so that only the walk over the
    view can find the lie."""
    with open(target + ".json") as f:
        m = json.load(f)
    with open(target + ".tree", "rb") as f:
        _, recs, _ = T.parse_records(f.read())
    leaves = {i: d for k, i, d in recs if k == 0}
    leaves[block] = leaf
    size = m["image"]["virtual-size"]
    buf = T.record_file(size, leaves)
    with open(target + ".tree", "wb") as f:
        f.write(buf)
    m["hash"]["root"] = T.tree(size, leaves)[1].hex()
    m["hash"]["file-sha256"] = hashlib.sha256(buf).hexdigest()
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
