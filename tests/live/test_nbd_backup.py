"""cbt backup --nbd: backups read from an NBD export someone else set up.

cbt makes no checkpoint and sends no QMP here: the tests play the export's
owner.  qemu-nbd -r -B on a closed image whose checkpoints cbt made offline
(virtnbdbackup's offline mode), and libvirt's pull-mode backup-begin done by
hand on qemu-storage-daemon with the guest writing (LIVE.md 2.5: one
transaction makes the new checkpoint, a temporary disabled copy of the old
one on a scratch node and the sync=none freeze; then the scratch node is
exported read-only with that bitmap).  Every chain must verify and restore
to the disk (qemu-img compare) or to the instant of the export (the cut
oracle); an incremental must hold exactly what QEMU's bitmap says changed,
and every write between the two instants.  Refusals: exit 79 (--auto: a
full backup) when no incremental can be trusted, clean errors for a server
that is no NBD server or cannot be reached, 64 for mistakes in the options.
"""
import json
import os
import socket
import threading

from conftest import cbt, qemu_img, qemu_io
from livelib import (BLOCK, MiB, View, action, assert_cut,  # noqa: F401
                     assert_incremental, cut_of, extents_blocks, live,
                     make_image, now, qemu_nbd_dirty, top_blocks)
from livelib import state_dir  # noqa: F401 (autouse: a journal per test)

SIZE = 32 * MiB


def manifest(path):
    with open(path + ".json") as f:
        return json.load(f)


def backup(uri, target, *args):
    """cbt backup --nbd URI ARGS TARGET; its JSON output."""
    return cbt("backup", "--nbd", uri, "--output=json", *args, target).json()


def restores_to(backup_file, disk, tmp):
    """cbt verify passes on BACKUP_FILE's chain and its restore equals DISK."""
    cbt("verify", backup_file)
    out = os.path.join(str(tmp), "restored-%s" % os.path.basename(backup_file))
    cbt("restore", backup_file, out)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", out, disk)


def offline_step(live, disk, checkpoint, writes):
    """Change the closed DISK with qemu-io WRITES, then make CHECKPOINT on it
    (cbt checkpoint create, offline); the export's owner's part."""
    args = []
    for w in writes:
        args += ["-c", w]
    qemu_io("-f", "qcow2", *args, disk)
    cbt("checkpoint", "create", disk, checkpoint)


# --------------------------------------------------------------------------
# qemu-nbd -r -B on a closed image


def test_qemu_nbd_full_incremental_differential(live, tmp_path):
    disk = make_image(live.path("d.qcow2"), SIZE, gens={0: 1, 7: 1, 100: 1})
    cbt("checkpoint", "create", disk, "c1")
    bk = live.path("bk")
    os.mkdir(bk)
    full, inc, diff = (os.path.join(bk, n) for n in ("full.qcow2", "inc.qcow2",
                                                       "diff.qcow2"))
    srv = live.qemu_nbd(disk)
    full_uri = srv.uri
    res = backup(srv.uri, full, "--full", "--checkpoint", "c1")
    srv.quit()
    assert res["kind"] == "full" and res["checkpoint"] == "c1", res
    restores_to(full, disk, tmp_path)

    # Data, a zero write over data and a discard: the incremental must hold
    # what changed (zeroes as zero clusters), on top of the full.
    offline_step(live, disk, "c2", ["write -P 7 1M 192k", "write -z 0 64k",
                                    "discard 6400k 64k", "write -P 9 20M 4k"])
    changed = extents_blocks(qemu_nbd_dirty(disk, "c1"))
    srv = live.qemu_nbd(disk, bitmaps=["c1"])
    res = backup(srv.uri, inc, "--since", "c1", "--checkpoint", "c2")
    srv.quit()
    assert (res["kind"], res["since"], res["parent"]) == \
        ("incremental", "c1", full), res
    assert top_blocks(inc) == changed, (sorted(top_blocks(inc)), sorted(changed))
    restores_to(inc, disk, tmp_path)

    # A differential since c1 through the same export of c1's bitmap.
    offline_step(live, disk, "c3", ["write -P 5 30M 64k"])
    changed = extents_blocks(qemu_nbd_dirty(disk, "c1"))
    srv = live.qemu_nbd(disk, bitmaps=["c1"])
    res = backup(srv.uri, diff, "--since", "c1", "--checkpoint", "c3")
    srv.quit()
    assert (res["kind"], res["parent"]) == ("differential", full), res
    assert top_blocks(diff) == changed
    restores_to(diff, disk, tmp_path)

    # One disk id, chosen by the full; orders one more than the folder's
    # highest; the checkpoints named as the owner made them.
    ms = [manifest(b) for b in (full, inc, diff)]
    assert len({m["disk"]["id"] for m in ms}) == 1
    assert [(m["checkpoint"]["name"], m["checkpoint"]["order"]) for m in ms] == \
        [("c1", 1), ("c2", 2), ("c3", 3)]
    assert ms[0]["disk"]["path"] == full_uri


def test_qemu_nbd_joins_the_disks_own_chain(live, tmp_path):
    """With --disk-id set to the disk's own id, backups read over NBD and
    offline backups of the disk are one chain."""
    disk = make_image(live.path("d.qcow2"), SIZE, gens={3: 1})
    cbt("checkpoint", "create", disk, "c1")
    disk_id = cbt("checkpoint", "list", "--output=json", disk).json()["disk-id"]
    bk = live.path("bk")
    os.mkdir(bk)
    full, inc = os.path.join(bk, "full.qcow2"), os.path.join(bk, "inc.qcow2")
    srv = live.qemu_nbd(disk)
    backup(srv.uri, full, "--full", "--checkpoint", "c1", "--disk-id",
           disk_id.upper())
    srv.quit()
    assert manifest(full)["disk"]["id"] == disk_id
    qemu_io("-f", "qcow2", "-c", "write -P 3 2M 64k", disk)
    res = cbt("backup", "--incremental", "--output=json", disk, inc).json()
    assert (res["kind"], res["parent"]) == ("incremental", full), res
    restores_to(inc, disk, tmp_path)


# --------------------------------------------------------------------------
# libvirt's pull mode, by hand, on qemu-storage-daemon


def pull_begin(q, checkpoint, since=None, n=0):
    """libvirt's backup-begin in pull mode (qemuBackupDiskPrepareDataOnePull,
    LIVE.md 2.5): a scratch qcow2 over the disk; ONE transaction adding the
    new persistent CHECKPOINT to the disk, for an incremental a temporary
    disabled bitmap backup-vda on the scratch node with SINCE merged into
    it, and blockdev-backup sync=none disk -> scratch; then the scratch
    node exported read-only as `vda` with that bitmap on QSD's NBD server.
    Returns (uri, (t0, t1) around the transaction, end) where end() is
    libvirt's teardown."""
    scratch = os.path.join(os.path.dirname(q.image), "scratch%d.qcow2" % n)
    qemu_img("create", "-q", "-f", "qcow2", scratch, q.size)
    node, job, exp = "scratch%d" % n, "backup-vda-%d" % n, "export%d" % n
    q.qmp("blockdev-add", {"driver": "qcow2", "node-name": node, "backing": "disk",
                           "file": {"driver": "file", "filename": scratch}})
    actions = [action("block-dirty-bitmap-add", node="disk", name=checkpoint,
                      persistent=True)]
    if since:
        actions += [action("block-dirty-bitmap-add", node=node, name="backup-vda",
                           persistent=False, disabled=True, granularity=BLOCK),
                    action("block-dirty-bitmap-merge", node=node, target="backup-vda",
                           bitmaps=[{"node": "disk", "name": since}])]
    actions.append(action("blockdev-backup", device="disk", target=node,
                          sync="none", job_id=job))
    t0 = now()
    q.qmp("transaction", actions=actions)
    t1 = now()
    export = {"type": "nbd", "id": exp, "node-name": node, "name": "vda",
              "writable": False}
    if since:
        export["bitmaps"] = ["backup-vda"]
    q.qmp("block-export-add", export)

    def end():
        q.qmp("block-export-del", id=exp)
        q.wait_event("BLOCK_EXPORT_DELETED", id=exp)
        q.qmp("block-job-cancel", device=job, force=True)
        q.wait_event("BLOCK_JOB_CANCELLED", device=job)
        q.qmp("blockdev-del", node_name=node)
        os.unlink(scratch)

    return "nbd+unix:///vda?socket=" + q.nbd_path, (t0, t1), end


def test_libvirt_pull_mode_export(live, tmp_path):
    q = live.qsd(make_image(live.path("d.qcow2"), SIZE))
    w = live.writer(q, seed=21).start()
    w.wait_writes(20)
    bk = live.path("bk")
    os.mkdir(bk)
    full, inc = os.path.join(bk, "full.qcow2"), os.path.join(bk, "inc.qcow2")

    # The guest writes between the export's instant and cbt's reading, and
    # while it reads: a backup of anything but the frozen view fails.
    uri, tx1, end = pull_begin(q, "c1", n=1)
    w.wait_writes(30)
    backup(uri, full, "--full", "--checkpoint", "c1")
    end()
    cut1 = assert_cut(w, full, tmp_path, tx1)

    w.wait_writes(30)
    uri, tx2, end = pull_begin(q, "c2", since="c1", n=2)
    w.wait_writes(30)
    res = backup(uri, inc, "--since", "c1", "--bitmap", "backup-vda",
                 "--checkpoint", "c2")
    end()
    w.stop()
    assert (res["kind"], res["parent"]) == ("incremental", full), res
    cut2 = assert_cut(w, inc, tmp_path, tx2)
    assert_incremental(w, cut1, tx1, cut2, tx2, inc)
    cbt("verify", inc)
    out = live.path("restored.qcow2")
    cbt("restore", inc, out)
    assert cut_of(w, View(out, str(tmp_path))).gens == cut2.gens
    # The checkpoints are the owner's, untouched; cbt added no bitmap.
    nodes = {n["node-name"]: n for n in q.qmp("query-named-block-nodes", flat=True)}
    assert sorted(b["name"] for b in nodes["disk"]["dirty-bitmaps"]) == ["c1", "c2"]


def test_writable_export_is_warned_about(live, tmp_path):
    """A writable export (here QSD's own export of the running disk) shows
    no single instant unless nothing writes: cbt says so."""
    q = live.qsd(make_image(live.path("d.qcow2"), SIZE, gens={1: 1}))
    os.mkdir(live.path("bk"))
    res = cbt("backup", "--nbd", q.uri, "--full", "--checkpoint", "c1",
              live.path("bk/full.qcow2"))
    assert "the export is writable" in res.err, res


# --------------------------------------------------------------------------
# Refusals


def chain_of_one(live):
    """A closed disk with checkpoint c1, its full backup in bk/ read over
    qemu-nbd; (disk, bk)."""
    disk = make_image(live.path("d.qcow2"), SIZE, gens={2: 1})
    cbt("checkpoint", "create", disk, "c1")
    bk = live.path("bk")
    os.mkdir(bk)
    srv = live.qemu_nbd(disk)
    backup(srv.uri, os.path.join(bk, "full.qcow2"), "--full", "--checkpoint", "c1")
    srv.quit()
    offline_step(live, disk, "c2", ["write -P 4 3M 64k"])
    return disk, bk


def files(bk):
    return sorted(os.listdir(bk))


def test_no_incremental_without_bitmap_parent_or_same_size(live, tmp_path):
    disk, bk = chain_of_one(live)
    before = files(bk)
    inc = os.path.join(bk, "inc.qcow2")
    srv = live.qemu_nbd(disk, bitmaps=["c1"])
    cases = [
        # the export lacks the bitmap named
        (["--since", "c1", "--bitmap", "nosuch"], "no dirty bitmap 'nosuch'"),
        # no backup in the folder created the checkpoint
        (["--since", "c0"], "no backup in %s created it" % bk),
    ]
    for args, why in cases:
        res = cbt("backup", "--nbd", srv.uri, *args, "--checkpoint", "c2", inc,
                  check=False)
        assert res.rc == 79 and why in res.err, (args, res)
        assert files(bk) == before
    # A default bitmap name the export lacks is named, with the hint.
    srv.quit()
    srv = live.qemu_nbd(disk, bitmaps=["c2"])
    res = cbt("backup", "--nbd", srv.uri, "--since", "c1", "--checkpoint", "c2",
              inc, check=False)
    assert res.rc == 79 and "no dirty bitmap 'c1'" in res.err and \
        "--bitmap" in res.err, res
    # --auto rescans instead (c1's backup knows every block), and says why.
    res = backup(srv.uri, inc, "--auto", "--since", "c1", "--checkpoint", "c2")
    srv.quit()
    assert res["kind"] == "incremental" and res["rescan"] is True, res
    assert "no dirty bitmap 'c1'" in res["fallback"], res
    restores_to(inc, disk, tmp_path)

    # Another size than the parent's disk: a resize no bitmap describes.
    other = make_image(live.path("big.qcow2"), 2 * SIZE, gens={2: 1})
    cbt("checkpoint", "create", other, "c1")
    srv = live.qemu_nbd(other, bitmaps=["c1"])
    res = cbt("backup", "--nbd", srv.uri, "--since", "c1", "--checkpoint", "c9",
              os.path.join(bk, "big.qcow2"), check=False)
    assert res.rc == 79 and "size" in res.err and "%d bytes" % SIZE in res.err, res
    res = backup(srv.uri, os.path.join(bk, "big.qcow2"), "--auto", "--since", "c1",
                 "--checkpoint", "c9")
    srv.quit()
    # a resize is no obstacle to a rescan: every block is compared (c1 is
    # no longer the newest checkpoint there: a differential)
    assert res["kind"] == "differential" and res["rescan"] is True, res
    assert "size" in res["fallback"], res
    restores_to(os.path.join(bk, "big.qcow2"), other, tmp_path)


def test_missing_parent_backup_and_auto(live, tmp_path):
    disk, bk = chain_of_one(live)
    os.unlink(os.path.join(bk, "full.qcow2.json"))
    srv = live.qemu_nbd(disk, bitmaps=["c1"])
    inc = os.path.join(bk, "inc.qcow2")
    res = cbt("backup", "--nbd", srv.uri, "--since", "c1", "--checkpoint", "c2",
              inc, check=False)
    assert res.rc == 79 and "no backup in" in res.err, res
    res = backup(srv.uri, inc, "--auto", "--since", "c1", "--checkpoint", "c2")
    srv.quit()
    assert res["kind"] == "full" and res["parent"] is None, res
    assert "no backup in" in res["fallback"], res
    restores_to(inc, disk, tmp_path)


def test_checkpoint_names_and_disks(live, tmp_path):
    disk, bk = chain_of_one(live)
    srv = live.qemu_nbd(disk, bitmaps=["c1"])
    # The folder as TARGET.
    res = cbt("backup", "--nbd", srv.uri, "--since", "c1", "--checkpoint", "c2",
              bk, check=False)
    assert res.rc == 64 and "is a folder" in res.err, res
    # A checkpoint a backup of the disk recorded already.
    res = cbt("backup", "--nbd", srv.uri, "--since", "c1", "--checkpoint", "c1",
              os.path.join(bk, "again.qcow2"), check=False)
    assert res.rc == 1 and "created checkpoint 'c1' already" in res.err, res
    # A second chain in the folder with a checkpoint c1 of its own (given
    # its own disk id): c1 alone no longer says which disk.
    other = "0f0e0d0c-0b0a-4908-8706-050403020100"
    backup(srv.uri, os.path.join(bk, "other.qcow2"), "--full", "--checkpoint",
           "c1", "--disk-id", other)
    res = cbt("backup", "--nbd", srv.uri, "--since", "c1", "--checkpoint", "c2",
              os.path.join(bk, "inc.qcow2"), check=False)
    assert res.rc == 64 and "--disk-id" in res.err, res
    res = backup(srv.uri, os.path.join(bk, "inc.qcow2"), "--since", "c1",
                 "--checkpoint", "c2", "--disk-id", other)
    srv.quit()
    assert res["parent"] == os.path.join(bk, "other.qcow2"), res
    assert manifest(os.path.join(bk, "inc.qcow2"))["disk"]["id"] == other


class SilentServer:
    """A Unix socket that accepts connections and never says a word."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.conns = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        try:
            while True:
                self.conns.append(self.sock.accept()[0])
        except OSError:
            pass

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)
        for c in self.conns:
            c.close()


def test_server_that_is_not_nbd_or_not_there(live, tmp_path):
    bk = live.path("bk")
    os.mkdir(bk)
    target = os.path.join(bk, "full.qcow2")
    path = live.sock("silent.sock")
    srv = SilentServer(path)
    try:
        res = cbt("backup", "--nbd", "nbd+unix:///?socket=" + path, "--full",
                  "--checkpoint", "c1", target, check=False)
    finally:
        srv.close()
    assert srv.conns, "cbt never connected"
    assert res.rc == 1 and "no NBD server answered within" in res.err, res
    for uri in ("nbd+unix:///?socket=" + live.sock("nobody.sock"),
                "nbd://127.0.0.1:1/"):
        res = cbt("backup", "--nbd", uri, "--full", "--checkpoint", "c1",
                  target, check=False)
        assert res.rc == 1 and "cannot connect" in res.err, (uri, res)
    assert files(bk) == []


def test_option_mistakes(live, tmp_path):
    uri = "nbd+unix:///?socket=" + live.sock("unused.sock")
    t = live.path("t.qcow2")
    cases = [
        (["--nbd", uri, "--full", "--checkpoint", "c1", "disk.qcow2", t], "TARGET alone"),
        (["--nbd", uri, "--full", t], "--checkpoint"),
        (["--nbd", uri, "--incremental", "--checkpoint", "c2", t], "--since"),
        (["--nbd", uri, "--auto", "--checkpoint", "c2", t], "--since"),
        (["--nbd", uri, "--full", "--bitmap", "b", "--checkpoint", "c1", t], "--bitmap"),
        (["--nbd", uri, "--full", "-g", "1M", "--checkpoint", "c1", t], "-g"),
        (["--nbd", uri, "--qmp", "x", "--full", "--checkpoint", "c1", t], "--qmp"),
        (["--full", "--disk-id", "x", "d.qcow2", t], "--nbd"),
        (["--nbd", uri, "--full", "--checkpoint", "c1", "--disk-id", "nope", t],
         "not a UUID"),
    ]
    for args, why in cases:
        res = cbt("backup", *args, check=False)
        assert res.rc == 64 and why in res.err, (args, res)
