"""Issue 13, section 4, as the issue states it: QEMU (qemu-storage-daemon
with the disk and its checkpoint's persistent bitmap, stored by an earlier
QEMU and so flagged in use in the image while this one runs) is killed with
SIGKILL while the guest writes, so the bitmap stays in use (inconsistent)
in the image; `cbt backup --auto` then takes an incremental by rescan (not
a full backup) that holds exactly the blocks the guest changed and
restores to the disk; once QEMU runs again, a live `--auto` over QMP goes
on with ordinary incrementals.

The disk is written whole first, so the guest's writes land in clusters
that are allocated already and reach the file even though QEMU dies
without flushing its metadata; which blocks changed is read from the
writer's log, independently of cbt.
"""
import json
import os

from conftest import cbt, qemu_img
from livelib import BLOCK, MiB, live, make_image  # noqa: F401
from livelib import state_dir  # noqa: F401 (autouse: a journal per test)

SIZE = 16 * MiB


def top_blocks(path):
    """Blocks the image's own layer allocates (qemu-img map depth 0)."""
    spec = 'json:{"driver":"qcow2","backing":null,' \
           '"file":{"driver":"file","filename":"%s"}}' % path
    out = set()
    for e in json.loads(qemu_img("map", "--output=json", spec).out):
        if e["present"]:
            out.update(range(e["start"] // BLOCK,
                             (e["start"] + e["length"] + BLOCK - 1) // BLOCK))
    return out


def test_auto_rescans_after_qemu_killed(live, tmp_path):
    disk = make_image(live.path("d.qcow2"), SIZE,
                      gens={b: 1 for b in range(SIZE // BLOCK)})
    bk = live.path("bk")
    os.mkdir(bk)
    q = live.qsd(disk)
    full = os.path.join(bk, "full.qcow2")
    cbt("backup", "--qmp", q.cbt_qmp, "--full", "--checkpoint", "c1", "vm", full)
    # A clean stop stores the bitmap; the next QEMU opens it (in use)
    q.quit()
    q = live.qsd(disk)
    w = live.writer(q, seed=5, initial={b: 1 for b in range(SIZE // BLOCK)})
    w.step(30)
    q.kill()
    changed = {x.block for x in w.log}
    info = json.loads(qemu_img("info", "-U", "--output=json", disk).out)
    flags = {b["name"]: b["flags"] for b in info["format-specific"]["data"]["bitmaps"]}
    assert "in-use" in flags["c1"], flags

    # offline, the disk as QEMU left it
    inc = os.path.join(bk, "inc.qcow2")
    res = cbt("backup", "--auto", "--output=json", disk, inc)
    r = res.json()
    assert r["kind"] == "incremental" and r["rescan"] is True, r
    assert r["parent"] == full and "c1" in r["fallback"], r
    assert "rescanned the whole disk instead" in res.err, res
    assert top_blocks(inc) == changed
    assert r["bytes-copied"] == len(changed) * BLOCK, r
    out = live.path("r.qcow2")
    cbt("restore", inc, out)
    assert qemu_img("compare", disk, out, check=False).rc == 0
    cbt("verify", inc)

    # QEMU again: the chain goes on live, with a bitmap
    q = live.qsd(disk)
    w = live.writer(q, seed=6, initial=w.gens)
    w.step(5)
    inc2 = os.path.join(bk, "inc2.qcow2")
    r = cbt("backup", "--qmp", q.cbt_qmp, "--auto", "--output=json", "vm",
            inc2).json()
    assert r["kind"] == "incremental" and r["rescan"] is False, r
    assert r["parent"] == inc and r["fallback"] is None, r
    assert top_blocks(inc2) == {x.block for x in w.log}
    q.quit()
    out2 = live.path("r2.qcow2")
    cbt("restore", inc2, out2)
    assert qemu_img("compare", disk, out2, check=False).rc == 0
