"""Checkpoints across snapshots and chain operations (issue 10, sections 2
and 3; docs/checkpoints.md "History across snapshots").

The guarantee under test: a backup that misses writes since its checkpoint
is impossible, whatever is done to the chain with documented commands.
Every incremental or differential below is either refused (exit status 79,
"a full backup is needed"), falls back to a full one or a rescan (the
bitmap unused) with --auto saying why, or restores to exactly the disk (`cbt restore`, then `qemu-img
compare` against the disk's chain); `qemu-img check` is clean on every
layer and backup.

Section 2, history across snapshots:
  * the issue's reproducer: the base listed alone says "sealed" (not
    BROKEN), reconcile --fix leaves its sealed copies alone, and the
    overlay's differential restores exactly;
  * the overlay notices its history in the base removed (qemu-img bitmap
    --remove, cbt checkpoint delete on the base), altered (qemu-img bitmap
    --clear, removed and made again) or missing (backing file replaced by
    an older copy, dropped with qemu-img rebase -u), and refuses; an
    identical copy of the base (qemu-img convert --bitmaps) keeps it
    usable and exact;
  * overlays made by QEMU: qemu-img create -b lists the chain's checkpoints
    (unusable: nothing tracks the overlay's writes); bitmaps added on the
    overlay (libvirt's way) make them usable, and the first backup writes
    the view into the overlay with seals of the copies below; a live
    blockdev-snapshot in qemu-storage-daemon with bitmaps added on the
    overlay in the same transaction;
  * a checkpoint that is unusable when a snapshot is taken is not carried
    over, so a bitmap of its name added later cannot revive it.

Section 3, folding an overlay back:
  * cbt commit --top (the pivot): the base takes over every checkpoint,
    those made on the overlay too; the next incremental continues the
    chain with a new order;
  * cbt commit FILE (qemu-img's form): FILE and its base are both usable
    disks afterwards;
  * an overlay without bitmaps (qemu-img create -b), committed: what it
    brought is set in the base's checkpoint bitmaps; in qemu-img's form,
    the pivot, an intermediate commit, -b over two such overlays and over
    a cbt snapshot, the base's bitmaps equal bit for bit (qemu-nbd -B +
    nbdinfo --map) its old ones united with each committed layer's copy,
    or its allocation (qemu-img map) where it has none;
  * qemu-img's form with -b over a layer older than a checkpoint: warned
    about before acting, naming --top, which then works;
  * stream and safe rebase that drop the layer holding the metadata
    (an overlay QEMU made on top) carry the checkpoints into the overlay;
    of a cbt overlay they stay exact; rebase -u that drops the history is
    refused by the seals.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import KiB, MiB, cbt, qemu_img, qemu_io, no_crash  # noqa: E402
from conftest import qemu_check_clean  # noqa: E402

NEED_FULL = 79          # exit status: an incremental is impossible
SIZE = 64 * MiB


# ---- helpers ----

def io(path, *cmds):
    for c in cmds:
        qemu_io("-f", "qcow2", "-c", c, path)


def ck(path):
    """`cbt checkpoint list --output=json`, by name."""
    res = no_crash(cbt("checkpoint", "list", "--output=json", path))
    return {c["name"]: c for c in json.loads(res.out)["checkpoints"]}


def bitmaps(path):
    info = json.loads(qemu_img("info", "-U", "--output=json", path).out)
    return sorted(b["name"] for b in
                  info.get("format-specific", {}).get("data", {}).get("bitmaps", []))


def check_clean(*paths):
    for p in paths:
        qemu_check_clean(p)


def backup(*args):
    res = no_crash(cbt("backup", "--output=json", *[str(a) for a in args]))
    return json.loads(res.out)


def refused(disk, since, target):
    """An incremental or differential that must be refused: exit 79, no
    file left behind; --auto then takes a full one, or a rescan on top of
    the checkpoint's backup (the bitmap unused), and says why.  Returns
    the reason."""
    args = ["--since", since] if since else ["--incremental"]
    res = no_crash(cbt("backup", *args, disk, target, check=False))
    assert res.rc == NEED_FULL, res
    assert not os.path.exists(target), res
    r = backup("--auto", *args, disk, target)
    assert r["fallback"], r
    assert r["kind"] == "full" or r["rescan"] is True, r
    assert_restores(target, disk)
    return res.err


def assert_restores(target, disk):
    """The backup restores to exactly the disk's guest view."""
    out = target + ".restored.qcow2"
    if os.path.exists(out):
        os.unlink(out)
    no_crash(cbt("restore", target, out))
    res = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", out, disk,
                   check=False)
    assert res.rc == 0, "restore of %s differs from %s: %r" % (target, disk, res)
    check_clean(out, target)
    os.unlink(out)


def start(tmp, wed=True, name="vm1.qcow2"):
    """A disk NAME with checkpoint mon (a full backup into bk/ after 4 MiB
    of data) and, with wed, checkpoint wed (an incremental after 8 MiB
    more at 40 MiB).  Returns (disk, bk)."""
    d, bk = str(tmp / name), tmp / "bk"
    bk.mkdir(exist_ok=True)
    qemu_img("create", "-q", "-f", "qcow2", d, SIZE)
    io(d, "write -P 1 0 4M")
    backup("--full", "--checkpoint", "mon", d, bk / "full.qcow2")
    io(d, "write -P 2 40M 8M")
    if wed:
        backup("--incremental", "--checkpoint", "wed", d, bk / "i1.qcow2")
    return d, bk


def qemu_overlay(tmp, disk, name, bitmaps=()):
    """An overlay made by qemu-img on disk, with these bitmaps added
    (libvirt's way: the copies below keep recording)."""
    q = str(tmp / name)
    qemu_img("create", "-q", "-f", "qcow2", "-b", os.path.basename(disk),
             "-F", "qcow2", q)
    for b in bitmaps:
        qemu_img("bitmap", "--add", q, b)
    return q


def story(tmp, early=None):
    """start(), writes after wed, a cbt snapshot, writes in the overlay.
    early: where to copy the base right after wed's backup."""
    d, bk = start(tmp)
    ov = str(tmp / "vm1.snap1.qcow2")
    if early:
        shutil.copyfile(d, early)
    io(d, "write -P 3 40M 6M")        # since wed, in the base
    no_crash(cbt("snapshot", d, ov))
    io(ov, "write -P 4 0 3M")         # since wed, in the overlay
    return d, ov, bk


# ---- section 2: history across snapshots ----

def test_issue_reproducer_sealed_history(tmp_path):
    d, ov, bk = story(tmp_path)
    base = ck(d)
    for name in ("mon", "wed"):
        assert base[name].get("sealed") and not base[name]["usable"], base
    human = no_crash(cbt("checkpoint", "list", d)).out
    assert "BROKEN" not in human and "sealed" in human, human
    # Nothing offers to drop them, and --fix leaves them.
    rec = json.loads(no_crash(cbt("checkpoint", "reconcile", "--output=json", d)).out)
    assert rec["drift"] == [], rec
    no_crash(cbt("checkpoint", "reconcile", "--fix", d))
    assert bitmaps(d) == ["mon", "wed"]
    top = ck(ov)
    # wed: 6 MiB in the base since wed, 3 MiB in the overlay.
    assert top["wed"]["usable"] and top["wed"]["dirty-bytes"] == 9 * MiB, top
    assert top["mon"]["usable"] and top["mon"]["dirty-bytes"] == 11 * MiB, top
    r = backup("--since", "wed", ov, bk / "x1.qcow2")
    assert r["kind"] == "differential" and r["dirty-bytes"] == 9 * MiB, r
    assert_restores(str(bk / "x1.qcow2"), ov)
    io(ov, "write -P 5 60M 1M")
    r = backup("--incremental", ov, bk / "x2.qcow2")
    assert r["kind"] == "incremental", r
    assert_restores(str(bk / "x2.qcow2"), ov)
    check_clean(d, ov)


def test_history_removed_by_qemu_img(tmp_path):
    d, ov, bk = story(tmp_path)
    qemu_img("bitmap", "--remove", d, "wed")
    got = ck(ov)
    assert not got["wed"]["usable"] and "gone" in got["wed"]["problem"], got
    assert "vm1.qcow2" in got["wed"]["problem"]
    err = refused(ov, "wed", str(bk / "x.qcow2"))
    assert "wed" in err and "vm1.qcow2" in err, err
    # mon's history is intact.
    r = backup("--since", "mon", ov, bk / "y.qcow2")
    assert r["kind"] == "differential"
    assert_restores(str(bk / "y.qcow2"), ov)
    check_clean(d, ov)


def test_history_deleted_with_cbt_on_the_base(tmp_path):
    d, ov, bk = story(tmp_path)
    res = no_crash(cbt("checkpoint", "delete", d, "wed"))
    assert "sealed" in res.err and "overlay" in res.err, res
    assert bitmaps(d) == ["mon"]
    got = ck(ov)
    assert not got["wed"]["usable"], got
    refused(ov, "wed", str(bk / "x.qcow2"))
    # The overlay's own reconcile drops it, the next incremental is exact.
    no_crash(cbt("checkpoint", "reconcile", "--fix", ov))
    assert "wed" not in ck(ov)
    check_clean(d, ov)


@pytest.mark.parametrize("how", ["clear", "recreate"])
def test_history_altered(tmp_path, how):
    d, ov, bk = story(tmp_path)
    if how == "clear":
        qemu_img("bitmap", "--clear", d, "wed")
    else:
        qemu_img("bitmap", "--remove", d, "wed")
        qemu_img("bitmap", "--add", "--disable", d, "wed")
    got = ck(ov)
    assert not got["wed"]["usable"], got
    assert "changed since" in got["wed"]["problem"], got
    refused(ov, "wed", str(bk / "x.qcow2"))
    check_clean(d, ov)


def test_backing_file_replaced_by_an_older_copy(tmp_path):
    """A copy of the base taken before the last writes to it, moved into
    its place: its bitmaps are not what the snapshot sealed."""
    early = str(tmp_path / "early.qcow2")
    d, ov, bk = story(tmp_path, early=early)
    shutil.copyfile(early, d)
    got = ck(ov)
    assert not got["wed"]["usable"], got
    assert "changed since" in got["wed"]["problem"], got
    refused(ov, "wed", str(bk / "x.qcow2"))
    # mon's copy in the older file has the same bits as the sealed one (the
    # writes after wed fell inside mon's dirty range): the same history, so
    # mon stays usable -- and exact, as the data that differs lies in it.
    assert got["mon"]["usable"], got
    backup("--since", "mon", ov, bk / "y.qcow2")
    assert_restores(str(bk / "y.qcow2"), ov)
    check_clean(d, ov)


def test_backing_file_dropped_or_swapped(tmp_path):
    d, ov, bk = story(tmp_path)
    # An identical copy of the base (qemu-img copies the bitmaps, not cbt's
    # metadata) is the same history: still usable, still exact.
    same = str(tmp_path / "same.qcow2")
    qemu_img("convert", "--bitmaps", "-f", "qcow2", "-O", "qcow2", d, same)
    qemu_img("rebase", "-u", "-b", "same.qcow2", "-F", "qcow2", ov)
    got = ck(ov)
    assert got["wed"]["usable"] and got["mon"]["usable"], got
    backup("--since", "wed", ov, bk / "same.qcow2")
    assert_restores(str(bk / "same.qcow2"), ov)
    # Flattened by qemu-img: the history below is gone.
    qemu_img("rebase", "-b", "", ov)
    got = ck(ov)
    assert not any(c["usable"] for n, c in got.items() if n in ("mon", "wed")), got
    assert "shorter" in got["wed"]["problem"], got
    refused(ov, "wed", str(bk / "x.qcow2"))
    check_clean(d, ov, same)


def test_qemu_overlay_without_bitmaps_lists_the_chain(tmp_path):
    d, ov, bk = story(tmp_path)
    q = qemu_overlay(tmp_path, ov, "q.qcow2")
    io(q, "write -P 7 20M 2M")
    got = ck(q)
    assert sorted(got) == sorted(ck(ov)), got
    assert not any(c["usable"] for c in got.values()), got
    res = no_crash(cbt("checkpoint", "list", q))
    assert "wed" in res.out and "BROKEN" in res.out, res
    disk_id = json.loads(cbt("checkpoint", "list", "--output=json", q).out)["disk-id"]
    assert disk_id == json.loads(cbt("checkpoint", "list", "--output=json", ov).out)["disk-id"]
    refused(q, None, str(bk / "q1.qcow2"))
    # The full backup adopted the chain's lineage: same disk id, the next
    # incremental is exact.
    got = ck(q)
    assert "wed" not in got and len(got) == 1, got
    io(q, "write -P 8 30M 1M")
    r = backup("--incremental", q, bk / "q2.qcow2")
    assert r["kind"] == "incremental" and r["dirty-bytes"] == 1 * MiB, r
    assert_restores(str(bk / "q2.qcow2"), q)
    check_clean(d, ov, q)


def test_qemu_overlay_with_bitmaps_is_usable(tmp_path):
    """libvirt's external snapshot offline (docs/kbase/internals/
    incremental-backup.rst): an overlay made by qemu-img with the
    checkpoints' bitmaps added in it, the base's left recording."""
    d, bk = start(tmp_path)
    io(d, "write -P 3 40M 6M")
    q = qemu_overlay(tmp_path, d, "q.qcow2", ("mon", "wed"))
    io(q, "write -P 4 0 3M")
    got = ck(q)
    assert got["wed"]["usable"] and got["wed"]["dirty-bytes"] == 9 * MiB, got
    r = backup("--since", "wed", q, bk / "x1.qcow2")
    assert r["kind"] == "differential" and r["dirty-bytes"] == 9 * MiB, r
    assert_restores(str(bk / "x1.qcow2"), q)
    # The backup wrote the view into the overlay, sealing the base's
    # copies: the base's history is now checked too.
    qemu_img("bitmap", "--remove", d, "wed")
    got = ck(q)
    assert not got["wed"]["usable"] and "gone" in got["wed"]["problem"], got
    refused(q, "wed", str(bk / "x2.qcow2"))
    check_clean(d, q)


def test_qemu_overlay_trusts_recording_copies_only(tmp_path):
    """Under an overlay made without cbt, a copy that does not record may
    have missed writes to its layer: disabled by hand, or sealed by a cbt
    snapshot whose base was then written (qemu-img commit into it, the
    base kept as the disk).  Such checkpoints are refused; a reconcile
    --fix of the overlay leaves the sealed copies to the overlay that
    continues them."""
    d, ov, bk = story(tmp_path)
    qemu_img("commit", "-q", ov)               # QEMU's commit into vm1
    io(d, "write -P 8 50M 1M")                 # vm1 kept as the disk
    backup("--full", "--checkpoint", "fri", d, bk / "fri.qcow2")
    io(d, "write -P 9 52M 1M")
    q = qemu_overlay(tmp_path, d, "q.qcow2", ("mon", "wed", "fri"))
    io(q, "write -P 10 54M 1M")
    got = ck(q)
    for name in ("mon", "wed"):
        assert not got[name]["usable"] and "sealed" in got[name]["problem"], got
    assert got["fri"]["usable"] and got["fri"]["dirty-bytes"] == 2 * MiB, got
    refused(q, "wed", str(bk / "x.qcow2"))
    r = backup("--since", "fri", q, bk / "y.qcow2")
    assert_restores(str(bk / "y.qcow2"), q)
    no_crash(cbt("checkpoint", "reconcile", "--fix", q))
    assert sorted(bitmaps(d)) == ["fri", "mon", "wed"], bitmaps(d)
    # A copy disabled by hand under such an overlay.
    (tmp_path / "other").mkdir()
    d2, _ = start(tmp_path / "other", wed=False)
    q2 = qemu_overlay(tmp_path / "other", d2, "q2.qcow2", ("mon",))
    qemu_img("bitmap", "--disable", d2, "mon")
    got = ck(q2)
    assert not got["mon"]["usable"] and "does not record" in got["mon"]["problem"], got
    check_clean(d, ov, q, d2, q2)
    del r


def test_unusable_checkpoint_is_not_carried(tmp_path):
    """A checkpoint whose bitmap stopped recording (writes went untracked)
    is not carried into the overlay: a bitmap of its name added there
    later cannot bring it back to life."""
    d, bk = start(tmp_path, wed=False)
    ov = str(tmp_path / "ov.qcow2")
    qemu_img("bitmap", "--disable", d, "mon")
    io(d, "write -P 3 16M 1M")                  # tracked by nothing
    res = no_crash(cbt("snapshot", d, ov))
    assert "'mon'" in res.err and "not carried" in res.err, res
    qemu_img("bitmap", "--add", ov, "mon")
    io(ov, "write -P 4 24M 1M")
    assert "mon" not in ck(ov)
    refused(ov, "mon", str(bk / "x.qcow2"))
    check_clean(d, ov)


class Qmp:
    """A minimal QMP client over a unix socket."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        for _ in range(200):
            try:
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise AssertionError("QMP %s: %s" % (name, msg["error"]))


def test_live_blockdev_snapshot_in_qemu_storage_daemon(tmp_path):
    """A live external snapshot the way libvirt takes one: blockdev-snapshot
    and the checkpoints' bitmaps added on the overlay in one transaction,
    writes through an NBD export before and after."""
    d, bk = start(tmp_path)
    q = qemu_overlay(tmp_path, d, "q.qcow2")
    qmp_sock, nbd_sock = str(tmp_path / "qmp.sock"), str(tmp_path / "nbd.sock")
    qsd = subprocess.Popen(
        ["qemu-storage-daemon",
         "--blockdev", "driver=file,node-name=f0,filename=%s" % d,
         "--blockdev", "driver=qcow2,node-name=d0,file=f0",
         "--chardev", "socket,id=m,path=%s,server=on,wait=off" % qmp_sock,
         "--monitor", "chardev=m"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        m = Qmp(qmp_sock)
        m.cmd("nbd-server-start",
              addr={"type": "unix", "data": {"path": nbd_sock}})
        m.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "d0"},
              writable=True)
        uri = "nbd+unix:///d0?socket=%s" % nbd_sock
        qemu_io("-f", "raw", "-c", "write -P 3 40M 6M", uri)
        m.cmd("blockdev-add", driver="file", **{"node-name": "f1"}, filename=q)
        m.cmd("blockdev-add", driver="qcow2", **{"node-name": "d1"}, file="f1",
              backing=None)
        actions = [{"type": "blockdev-snapshot",
                    "data": {"node": "d0", "overlay": "d1"}}]
        for name in ("mon", "wed"):
            actions.append({"type": "block-dirty-bitmap-add",
                            "data": {"node": "d1", "name": name,
                                     "persistent": True}})
        m.cmd("transaction", actions=actions)
        qemu_io("-f", "raw", "-c", "write -P 4 0 3M", uri)
        m.cmd("quit")
        qsd.wait(timeout=30)
    finally:
        if qsd.poll() is None:
            qsd.kill()
            qsd.wait()
    got = ck(q)
    assert got["wed"]["usable"] and got["wed"]["dirty-bytes"] == 9 * MiB, got
    r = backup("--since", "wed", q, bk / "x1.qcow2")
    assert r["kind"] == "differential", r
    assert_restores(str(bk / "x1.qcow2"), q)
    io(q, "write -P 5 50M 1M")
    r = backup("--incremental", q, bk / "x2.qcow2")
    assert r["kind"] == "incremental" and r["dirty-bytes"] == 1 * MiB, r
    assert_restores(str(bk / "x2.qcow2"), q)
    check_clean(d, q)


# ---- section 3: folding an overlay back ----

def week(tmp):
    """vm1.qcow2 with mon (full backup), writes, cbt snapshot to s1, writes,
    checkpoint tue on s1 (incremental backup), writes on s1."""
    d, bk = start(tmp, wed=False)
    s1 = str(tmp / "s1.qcow2")
    no_crash(cbt("snapshot", d, s1))
    io(s1, "write -P 3 10M 2M")
    backup("--incremental", "--checkpoint", "tue", s1, bk / "tue.qcow2")
    io(s1, "write -P 4 20M 2M", "write -z 42M 1M")
    return d, s1, bk


def orders(bk):
    """The checkpoint order of every backup in the folder."""
    got = []
    for f in sorted(os.listdir(str(bk))):
        if f.endswith(".qcow2.json"):
            with open(os.path.join(str(bk), f)) as fp:
                got.append(json.load(fp)["checkpoint"]["order"])
    return got


def test_commit_top_pivot_keeps_checkpoints(tmp_path):
    """cbt commit --top on the active layer: the base takes its place with
    every checkpoint, those made on the overlay included."""
    d, s1, bk = week(tmp_path)
    no_crash(cbt("commit", "--top", s1))
    got = ck(d)
    assert sorted(got) == ["mon", "tue"], got
    assert all(c["usable"] for c in got.values()), got
    assert got["tue"]["dirty-bytes"] == 3 * MiB, got
    r = backup("--incremental", d, bk / "wed.qcow2")
    assert r["since"] == "tue" and r["parent"].endswith("tue.qcow2"), r
    assert_restores(str(bk / "wed.qcow2"), d)
    o = orders(bk)
    assert len(o) == len(set(o)) == 3, o        # no two backups share one
    io(d, "write -P 5 30M 1M")
    r = backup("--since", "mon", d, bk / "thu.qcow2")
    assert_restores(str(bk / "thu.qcow2"), d)
    check_clean(d, s1)


def test_commit_qemu_form_keeps_both_usable(tmp_path):
    """cbt commit OVERLAY (qemu-img's form): the overlay, emptied, stays the
    disk with usable checkpoints; the base, used as the disk instead (the
    overlay thrown away), has them too."""
    d, s1, bk = week(tmp_path)
    no_crash(cbt("commit", s1))
    # Keep the base as the disk (a copy of the folder: the other choice
    # follows on the original).
    alt = tmp_path / "alt"
    shutil.copytree(str(tmp_path), str(alt), ignore=shutil.ignore_patterns("alt"))
    ad, abk = str(alt / "vm1.qcow2"), alt / "bk"
    got = ck(ad)
    assert sorted(got) == ["mon", "tue"], got
    assert all(c["usable"] for c in got.values()), got
    io(ad, "write -P 6 50M 1M")
    r = backup("--incremental", ad, abk / "wed.qcow2")
    assert r["kind"] == "incremental" and r["since"] == "tue", r
    assert_restores(str(abk / "wed.qcow2"), ad)
    # Keep the overlay.
    got = ck(s1)
    assert all(c["usable"] for c in got.values()), got
    io(s1, "write -P 7 52M 1M")
    r = backup("--incremental", s1, bk / "wed.qcow2")
    assert r["kind"] == "incremental", r
    assert_restores(str(bk / "wed.qcow2"), s1)
    check_clean(d, s1, ad)


def test_commit_overlay_without_bitmaps_marks_the_base(tmp_path):
    """An overlay made by qemu-img create -b has no bitmaps: what cbt commit
    carries into the base are changes since the base's checkpoints (as
    qemu-img commit's writes dirty the base's recording bitmaps)."""
    d, bk = start(tmp_path, wed=False)
    backup("--incremental", "--checkpoint", "tue", d, bk / "i0.qcow2")
    ov = qemu_overlay(tmp_path, d, "ov.qcow2")
    io(ov, "write -P 3 10M 2M", "write -z 1M 64k")
    no_crash(cbt("commit", ov))
    got = ck(d)
    assert got["tue"]["usable"] and got["tue"]["dirty-bytes"] == 2 * MiB + 64 * KiB, got
    assert got["mon"]["dirty-bytes"] == 10 * MiB + 64 * KiB, got
    r = backup("--incremental", d, bk / "i.qcow2")
    assert r["dirty-bytes"] == 2 * MiB + 64 * KiB, r
    assert_restores(str(bk / "i.qcow2"), d)
    check_clean(d, ov)


# Chains for test_commit_marks_base_bitmaps_exactly on vm1.qcow2 (the base,
# holding checkpoints mon and tue): the layers above it, bottom up, each
# made by qemu-img create -b (no bitmaps) or by cbt snapshot (copies of
# both, the base's sealed: disabled); the cbt commit; the layers it commits.
MARK_FORMS = {
    # The base becomes a disk of its own: its copies record.
    "qemu-img-form": ((("mid", "qemu"),), ("commit", "{mid}"), ("mid",)),
    "pivot": ((("mid", "qemu"),), ("commit", "--top", "{mid}"), ("mid",)),
    # The base stays history top continues: nothing but the mark step
    # changes its bitmaps.
    "intermediate": ((("mid", "qemu"), ("top", "qemu")),
                     ("commit", "--top", "{mid}", "--active", "{top}"), ("mid",)),
    "b-over-two": ((("mid", "qemu"), ("top", "qemu")),
                   ("commit", "-b", "{d}", "{top}"), ("mid", "top")),
    # The holder is mid, above the base: its copies merge into the base's
    # disabled ones, top's allocation is marked there.
    "over-snapshot": ((("mid", "cbt"), ("top", "qemu")),
                      ("commit", "--top", "{top}", "--base", "{d}"), ("mid", "top")),
}
MARK_WRITES = {
    "mid": ("write -P 3 8M 2M", "write -z 1M 64k", "write -P 4 40M 1M"),
    "top": ("write -P 5 20M 1M", "write -z 30M 128k"),
}


def written(cmds):
    """[(start, end)] of qemu-io commands 'write [-P N|-z] OFF LEN' in M/k."""
    unit = {"M": MiB, "k": KiB}
    out = []
    for c in cmds:
        off, length = (int(x[:-1]) * unit[x[-1]] for x in c.split()[-2:])
        out.append((off, off + length))
    return sorted(out)


def layer_allocation(path):
    """[(start, end)] allocated in this layer itself (qemu-img map, depth 0:
    its own data or zero clusters), neighbours joined."""
    out = []
    for e in json.loads(qemu_img("map", "--output=json", "-f", "qcow2", path).out):
        if e["depth"] != 0:
            continue
        if out and out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], e["start"] + e["length"])
        else:
            out.append((e["start"], e["start"] + e["length"]))
    return out


@pytest.mark.parametrize("form", sorted(MARK_FORMS))
def test_commit_marks_base_bitmaps_exactly(tmp_path, form):
    """The base's checkpoint bitmaps after cbt commit, bit for bit as QEMU
    reads them (qemu-nbd -B + nbdinfo --map): the base's bitmap before,
    united with, for each committed layer, its copy when it holds one and
    else what it allocates (what the test wrote there, which qemu-img map
    confirms).  In every form but over-snapshot only the mark step changes
    the bits of the base's bitmaps (only the base holds them, the data
    copy dirties none), so those fail when the marked bits are not stored;
    the intermediate form changes nothing else of the base's bitmaps at
    all (the others enable them), so the store must not skip the image."""
    d, bk = start(tmp_path, wed=False)
    backup("--incremental", "--checkpoint", "tue", d, bk / "i0.qcow2")
    io(d, "write -P 2 48M 1M")                  # since tue, in the base
    names = ["mon", "tue"]
    layers, argv, committed = MARK_FORMS[form]
    paths = {"d": d}
    below = d
    for n, made_by in layers:
        paths[n] = str(tmp_path / (n + ".qcow2"))
        if made_by == "cbt":
            no_crash(cbt("snapshot", below, paths[n]))
        else:
            qemu_overlay(tmp_path, below, n + ".qcow2")
        io(paths[n], *MARK_WRITES[n])
        below = paths[n]
    base_bitmaps = {b["name"]: b for b in L.qemu_bitmaps(d)}
    assert sorted(base_bitmaps) == names, base_bitmaps
    sealed = layers[0][1] == "cbt"
    assert all(("auto" in b["flags"]) != sealed for b in base_bitmaps.values()), \
        base_bitmaps
    gran = {n: b["granularity"] for n, b in base_bitmaps.items()}
    before = L.qemu_bitmap_extents(d, names)
    # What each committed layer brings to each name: its copy's bits, or
    # (it lacks the bitmap) its allocation.
    brings = {n: 0 for n in names}
    for layer in committed:
        held = L.qemu_bitmap_extents(paths[layer],
                                     [b["name"] for b in L.qemu_bitmaps(paths[layer])])
        alloc = layer_allocation(paths[layer])
        if sorted(held) != names:
            assert not held, held
            assert alloc == written(MARK_WRITES[layer]), (layer, alloc)
        for n in names:
            ext = held.get(n) or [{"start": s, "length": e - s, "dirty": True}
                                  for s, e in alloc]
            brings[n] |= L.bits_from_extents(ext, gran[n])
    no_crash(cbt(*[a.format(**paths) for a in argv]))
    got = L.qemu_bitmap_extents(d, names)
    for n in names:
        bits = L.bits_from_extents(before[n], gran[n])
        assert brings[n] & ~bits, "%s: the layers add no bit, the test proves nothing" % n
        want = L.extents_from_bits(bits | brings[n], gran[n], SIZE)
        L.assert_extents_equal(got[n], want, "%s of %s after %s" % (n, d, form))
    check_clean(*paths.values())


def test_commit_b_says_which_form_keeps_them(tmp_path):
    """qemu-img's form with -b over a layer older than a checkpoint: the
    base cannot hold its bitmap without a gap under the kept chain.  The
    command says so before it acts and names the form that can; that form
    then makes the base a disk with the checkpoint."""
    d0, d1, d2 = (str(tmp_path / n) for n in ("d0.qcow2", "d1.qcow2", "d2.qcow2"))
    bk = tmp_path / "bk"
    bk.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", d0, SIZE)
    io(d0, "write -P 1 0 4M")
    no_crash(cbt("snapshot", d0, d1))
    io(d1, "write -P 2 8M 1M")
    no_crash(cbt("snapshot", d1, d2))
    io(d2, "write -P 3 16M 1M")
    backup("--full", "--checkpoint", "c1", d2, bk / "full.qcow2")
    io(d2, "write -P 4 24M 1M")
    saved = tmp_path / "saved"
    saved.mkdir()
    for f in (d0, d1, d2):
        shutil.copy(f, str(saved))
    res = no_crash(cbt("commit", "-b", d0, d2))
    assert "'c1' stays with" in res.err and "pivots" in res.err, res
    assert "c1" not in ck(d0)
    assert ck(d2)["c1"]["usable"]
    r = backup("--incremental", d2, bk / "i.qcow2")
    assert_restores(str(bk / "i.qcow2"), d2)
    # The named form, on the chain as it was.
    for f in (d0, d1, d2):
        shutil.copy(os.path.join(str(saved), os.path.basename(f)), f)
    os.unlink(str(bk / "i.qcow2"))
    for ext in (".json", ".tree"):
        os.unlink(str(bk / "i.qcow2") + ext)
    res = no_crash(cbt("commit", "--top", d2, "--base", d0))
    assert "stays with" not in res.err, res
    got = ck(d0)
    assert got["c1"]["usable"] and got["c1"]["dirty-bytes"] == 1 * MiB, got
    r = backup("--incremental", d0, bk / "i.qcow2")
    assert r["since"] == "c1", r
    assert_restores(str(bk / "i.qcow2"), d0)
    check_clean(d0, d1, d2)


def qemu_overlay_with_bitmaps(tmp):
    """vm1.qcow2 with mon (full backup) and writes; q.qcow2 made by qemu-img
    on it with mon's bitmap added (no cbt metadata), written."""
    d, bk = start(tmp, wed=False)
    q = qemu_overlay(tmp, d, "q.qcow2", ("mon",))
    io(q, "write -P 3 10M 2M")
    assert ck(q)["mon"]["usable"]
    return d, q, bk


@pytest.mark.parametrize("how", ["stream", "rebase"])
@pytest.mark.parametrize("made_by", ["qemu", "cbt"])
def test_pull_keeps_checkpoints(tmp_path, how, made_by):
    """cbt stream / safe cbt rebase onto nothing drop every layer below the
    disk.  An overlay QEMU made takes over the checkpoints of the layer
    holding their metadata; a cbt overlay's are sealed again for its new
    chain.  Either way the next backup is exact."""
    if made_by == "qemu":
        d, disk, bk = qemu_overlay_with_bitmaps(tmp_path)
        since, dirty = "mon", 10 * MiB
    else:
        d, disk, bk = story(tmp_path)
        since, dirty = "wed", 9 * MiB
    if how == "stream":
        no_crash(cbt("stream", disk))
    else:
        no_crash(cbt("rebase", "-b", "", disk))
    got = ck(disk)
    assert got[since]["usable"] and got[since]["dirty-bytes"] == dirty, got
    r = backup("--since", since, disk, bk / "x.qcow2")
    assert r["kind"] != "full", r
    assert_restores(str(bk / "x.qcow2"), disk)
    check_clean(d, disk)


def test_unsafe_rebase_that_drops_history_is_refused(tmp_path):
    """cbt rebase -u onto nothing changes no bitmap: the history the
    overlay's checkpoints need is gone, and the seals say so."""
    d, ov, bk = story(tmp_path)
    no_crash(cbt("rebase", "-u", "-b", "", ov))
    got = ck(ov)
    assert not got["wed"]["usable"] and "shorter" in got["wed"]["problem"], got
    refused(ov, "wed", str(bk / "x.qcow2"))
    check_clean(ov)
