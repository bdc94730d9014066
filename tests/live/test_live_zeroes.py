"""Zeroes and data over NBD: what a pull backup copies, and as what.

The live backup learns which blocks read as zeroes from the export's block
status (base:allocation), walked once and kept (src/live/livebackup.c),
and reads the others several requests at a time.  Whatever the disk holds
(data, zero clusters, zero bytes written as data, never-written ranges, a
short last block), the full backup is the disk and holds data clusters
only where the disk has non-zero data, and the incremental holds exactly
the changed blocks, as zero clusters where they read as zeroes now.
"""
import json
import os

import nbd
import pytest

from conftest import cbt, qemu_img, qemu_io
from livelib import BLOCK, MiB, live, top_blocks  # noqa: F401

SIZE = 32 * MiB + 20 * 1024       # the last block is 20 KiB long
LAST = SIZE // BLOCK              # its index


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CBT_STATE_DIR", str(tmp_path / "state"))


def blocks(first, n):
    return set(range(first, first + n))


def zero_clusters(image):
    """Blocks IMAGE's own layer holds as zero clusters."""
    out = set()
    for e in json.loads(qemu_img("map", "--output=json", "-f", "qcow2",
                                 image).out):
        if e["depth"] == 0 and e["zero"] and not e["data"]:
            out.update(range(e["start"] // BLOCK,
                             (e["start"] + e["length"] - 1) // BLOCK + 1))
    return out


def manifest(image):
    with open(image + ".json") as f:
        return json.load(f)


def test_zeroes_and_data(live):
    disk = live.path("d.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, SIZE)
    # Data in runs of every length from 1 to 6 blocks (reads of several
    # blocks, and many reads in flight), zero clusters, zero bytes written
    # as data, data in the short last block; the rest never written.
    data = set()
    cmds = []
    pos = 0
    for run in range(1, 7):
        for _ in range(4):
            cmds += ["-c", "write -q -P 0x%02x %d %d" % (0x10 + run, pos * BLOCK,
                                                         run * BLOCK)]
            data |= blocks(pos, run)
            pos += run + 1
    cmds += ["-c", "write -q -z %d %d" % (200 * BLOCK, 8 * BLOCK),
             "-c", "write -q -P 0 %d %d" % (220 * BLOCK, 3 * BLOCK),
             "-c", "write -q -P 0x5a %d %d" % (LAST * BLOCK, SIZE - LAST * BLOCK)]
    data.add(LAST)
    qemu_io("-f", "qcow2", *cmds, disk)
    q = live.qsd(disk)
    bk = live.path("bk")
    os.mkdir(bk)
    full, inc = os.path.join(bk, "full.qcow2"), os.path.join(bk, "inc.qcow2")

    cbt("backup", "--qmp", q.cbt_qmp, "--full", "vm", full)
    qemu_img("compare", "-U", disk, full)
    assert top_blocks(full) == data
    assert manifest(full)["bytes"]["copied"] == \
        (len(data) - 1) * BLOCK + SIZE - LAST * BLOCK

    # Changes: data zeroed (write zeroes), zero clusters and zero bytes
    # overwritten with data, data overwritten with zero bytes, a
    # never-written block written, the short last block zeroed.
    h = nbd.NBD()
    h.connect_uri(q.uri)
    h.zero(2 * BLOCK, 0)
    h.pwrite(b"\x77" * BLOCK, 203 * BLOCK)
    h.pwrite(b"\x78" * BLOCK, 221 * BLOCK)
    h.pwrite(bytes(2 * BLOCK), 3 * BLOCK)
    h.pwrite(b"\x79" * BLOCK, 300 * BLOCK)
    h.zero(SIZE - LAST * BLOCK, LAST * BLOCK)
    h.flush()
    h.shutdown()
    del h
    changed_zero = {0, 1, 3, 4, LAST}
    changed_data = {203, 221, 300}

    cbt("backup", "--qmp", q.cbt_qmp, "--incremental", "vm", inc)
    qemu_img("compare", "-U", disk, inc)
    assert top_blocks(inc) == changed_zero | changed_data
    assert zero_clusters(inc) == changed_zero
    m = manifest(inc)
    assert m["bytes"]["copied"] == len(changed_data) * BLOCK
    cbt("verify", inc)
    out = live.path("restored.qcow2")
    cbt("restore", inc, out)
    qemu_img("compare", "-U", disk, out)
