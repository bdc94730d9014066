"""The live harness proven against QEMU itself (no cbt live command yet).

QEMU's own push backups, taken while the writer goes, must pass the cut
oracle; copies made without a freeze, and an incremental whose checkpoint
came a transaction too late, must fail it; the peers start, quit (bitmaps
stored), die (live bitmaps lost) and are cleaned up as the harness says.
"""
import os

import nbd
import pytest

from conftest import qemu_img
from livelib import (BLOCK, Live, MiB, View, action, assert_cut, assert_incremental,
                     bitmaps, cut_of, extents_blocks, live, make_image,  # noqa: F401
                     missing_writes, now, push_backup, qemu_nbd_dirty, top_blocks)

SIZE = 32 * MiB
NBLOCKS = SIZE // BLOCK


def test_push_full_is_one_instant(live, tmp_path):
    disk = make_image(live.path("disk.qcow2"), SIZE)
    q = live.qsd(disk)
    w = live.writer(q, seed=1).start()
    w.wait_writes(20)
    mark = now()
    w.wait_writes(10)
    full = live.path("full.qcow2")
    tx = push_backup(q, full, SIZE, checkpoint="c1", during=lambda: w.wait_writes(20))
    w.wait_writes(5)
    w.stop()
    cut = assert_cut(w, full, tmp_path, tx)
    # Writes before and after the instant bound the window on both sides,
    # and it excludes an instant before writes the backup holds.
    assert cut.lo is not None and cut.hi is not None, cut
    assert not cut.overlaps(0, mark), cut
    q.quit()
    assert bitmaps(disk) == {"c1": ["auto"]}
    final = cut_of(w, View(disk, tmp_path))
    assert final.ok and final.hi is None and final.gens == {
        b: w.gens.get(b, 0) for b in range(NBLOCKS)}, final


def copy_without_freeze(q, w, raw, interleave):
    """Read the live export block by block into RAW; with INTERLEAVE, let
    the writer complete that many writes after every 1/16 of the disk."""
    h = nbd.NBD()
    h.connect_uri(q.uri)
    with open(raw, "wb") as f:
        for b in range(NBLOCKS):
            if interleave and b % (NBLOCKS // 16) == 0:
                w.wait_writes(interleave)
            f.write(h.pread(BLOCK, b * BLOCK))
    h.shutdown()


def test_copy_without_freeze_is_rejected(live, tmp_path):
    disk = make_image(live.path("disk.qcow2"), SIZE)
    q = live.qsd(disk)
    gens = {}
    for seed in (1, 2, 3):
        w = live.writer(q, seed=seed, initial=gens).start()
        w.wait_writes(20)
        raw = live.path("copy%d.raw" % seed)
        copy_without_freeze(q, w, raw, interleave=4)
        w.stop()
        cut = cut_of(w, View(raw, tmp_path, fmt="raw"))
        assert not cut.ok, "seed %d: a copy made while writing passed: %r" % (seed, cut)
        gens = dict(w.gens)
    # The control: the same copy with the writer paused is an instant.
    w = live.writer(q, seed=4, initial=gens).start()
    w.wait_writes(20)
    w.pause()
    t0 = now()
    raw = live.path("paused.raw")
    copy_without_freeze(q, w, raw, interleave=0)
    t1 = now()
    w.resume()
    w.wait_writes(5)
    w.stop()
    cut = cut_of(w, View(raw, tmp_path, fmt="raw"))
    assert cut.ok and cut.overlaps(t0, t1), cut


def test_push_incremental_over_a_chain(live, tmp_path):
    """Full then incremental push backups of a disk over a backing file,
    the writer going through both."""
    prefill = {b: 1 for b in range(0, NBLOCKS, 4)}
    base = make_image(live.path("base.qcow2"), SIZE, prefill)
    disk = make_image(live.path("disk.qcow2"), SIZE, backing=base)
    q = live.qsd(disk, chain=[base])
    w = live.writer(q, seed=7, initial=prefill).start()
    w.wait_writes(20)
    full, inc = live.path("full.qcow2"), live.path("inc1.qcow2")
    tx1 = push_backup(q, full, SIZE, checkpoint="c1", during=lambda: w.wait_writes(20))
    w.wait_writes(30)
    tx2 = push_backup(q, inc, SIZE, checkpoint="c2", since="c1", backing=full,
                      during=lambda: w.wait_writes(20))
    w.wait_writes(5)
    w.stop()
    cut1 = assert_cut(w, full, tmp_path, tx1)
    cut2 = assert_cut(w, inc, tmp_path, tx2)
    assert_incremental(w, cut1, tx1, cut2, tx2, inc)
    q.quit()
    assert bitmaps(disk) == {"c1": ["auto"], "c2": ["auto"]}
    assert bitmaps(base) == {}


def test_late_checkpoint_loses_writes(live, tmp_path):
    """The pitfall of LIVE.md 0.2: the checkpoint added in a transaction of
    its own after the full backup's misses the writes in between; the
    chain is then no instant inside the incremental's transaction, and the
    complement check names the lost writes."""
    disk = make_image(live.path("disk.qcow2"), SIZE)
    q = live.qsd(disk)
    w = live.writer(q, seed=5).start()
    w.wait_writes(20)
    full, inc = live.path("full.qcow2"), live.path("inc1.qcow2")
    tx1 = push_backup(q, full, SIZE, during=lambda: w.wait_writes(10))
    w.wait_writes(10)
    w.pause()
    q.qmp("transaction", actions=[{"type": "block-dirty-bitmap-add",
                                   "data": {"node": "disk", "name": "c1", "persistent": True}}])
    tx2 = push_backup(q, inc, SIZE, since="c1", backing=full)
    w.stop()
    cut1 = assert_cut(w, full, tmp_path, tx1)
    cut2 = cut_of(w, View(inc, tmp_path))
    assert not cut2.overlaps(*tx2), cut2
    lost = missing_writes(w, cut1.bounds(*tx1), cut2.bounds(*tx2), top_blocks(inc))
    assert lost, "the late checkpoint lost nothing?"


@pytest.mark.parametrize("drive", [False, True], ids=["blockdev", "drive"])
def test_push_on_qemu_system_with_hmp_writes(live, tmp_path, drive):
    size = 8 * MiB
    disk = make_image(live.path("disk.qcow2"), size)
    vm = live.vm([disk], drive=drive)
    node = vm.node("vda")
    assert (node == "disk") != drive, node      # -drive: QEMU's #blockNNN
    w = live.writer(vm, seed=3)
    w.step(12)
    full, inc = live.path("full.qcow2"), live.path("inc1.qcow2")
    tx1 = push_backup(vm, full, size, node=node, checkpoint="c1", during=lambda: w.step(6))
    w.step(6)
    tx2 = push_backup(vm, inc, size, node=node, checkpoint="c2", since="c1", backing=full,
                      during=lambda: w.step(6))
    w.step(3)
    cut1 = assert_cut(w, full, tmp_path, tx1)
    cut2 = assert_cut(w, inc, tmp_path, tx2)
    assert_incremental(w, cut1, tx1, cut2, tx2, inc)
    vm.quit()
    assert bitmaps(disk) == {"c1": ["auto"], "c2": ["auto"]}


def test_quit_stores_bitmaps_kill_loses_them_cleanup_ends_all(live, tmp_path):
    """The peers' lifecycle as LIVE.md 3 says, and the registry's promise."""
    disk = make_image(live.path("disk.qcow2"), SIZE)
    qemu_img("bitmap", "--add", disk, "old")
    q = live.qsd(disk)
    q.qmp("block-dirty-bitmap-add", node="disk", name="live1", persistent=True)
    assert bitmaps(disk) == {"old": ["in-use", "auto"]}     # live ones: not yet
    q.quit()
    assert bitmaps(disk) == {"old": ["auto"], "live1": ["auto"]}
    q = live.qsd(disk)
    q.qmp("block-dirty-bitmap-add", node="disk", name="live2", persistent=True)
    w = live.writer(q).start()
    w.wait_writes(5)
    q.kill()
    with pytest.raises(AssertionError, match="writer failed"):
        w.wait_writes(1)
    assert bitmaps(disk) == {"old": ["in-use", "auto"], "live1": ["in-use", "auto"]}

    other = Live(tmp_path / "other")     # what the fixture does, by hand
    try:
        q = other.qsd(make_image(live.path("d2.qcow2"), SIZE))
        vm = other.vm([make_image(live.path("d3.qcow2"), SIZE)])
        w = other.writer(q).start()
        w.wait_writes(5)
        other.close()
        assert q.proc.poll() is not None and vm.proc.poll() is not None
        assert w.thread is None and not os.path.exists(other.sockdir)
    finally:
        other.close()


def test_real_guest_workload_and_bitmaps(live, tmp_path):
    """A real guest writes realvm's workload over a bitmap made offline; the
    test pauses it mid-way to add a checkpoint.  QEMU's bitmaps, live and
    stored, match realvm's model of the writes, and so does the disk."""
    disk = live.path("guest.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, 64 * MiB)
    qemu_img("bitmap", "--add", disk, "b0")
    g = live.realvm(disk, seed=11, count=10, pause=0.2)
    g.wait_written(3)
    g.qmp("stop")
    n = len(g.written())        # chunk n may be half written; n+1.. follow
    node = g.qmp("query-block")[0]["inserted"]["node-name"]
    g.qmp("transaction", actions=[action("block-dirty-bitmap-add", node=node, name="c1",
                                         persistent=True)])
    g.qmp("cont")
    assert n + 1 < g.count, "the guest finished before the checkpoint"
    g.wait_synced()
    live_counts = {b["name"]: b["count"] for b in
                   g.qmp("query-block")[0]["inserted"]["dirty-bitmaps"]}
    assert live_counts["b0"] == sum(n for _, n in g.expect_extents()), live_counts
    g.quit()
    assert qemu_nbd_dirty(disk, "b0") == g.expect_extents()
    c1 = extents_blocks(qemu_nbd_dirty(disk, "c1"))
    assert extents_blocks(g.expect_extents(n + 1)) <= c1 <= extents_blocks(g.expect_extents(n))
    assert live_counts["c1"] == len(c1) * BLOCK
    model = live.path("model.raw")
    with open(model, "wb") as f:
        f.truncate(64 * MiB)
    g.model(model)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", model, disk)
