"""cbt checkpoint create|list|show|delete --qmp on running QEMUs.

The disk is named every way the live mode accepts; checkpoints made live
appear in QEMU (a persistent recording bitmap) and in cbt's journal, never
in the image while QEMU holds it; their health and dirty counts come from
QEMU; a QEMU killed after a live checkpoint leaves it (and the image's own
checkpoints) broken, and cbt says so.
"""
import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

from conftest import CBT, cbt, qemu_img
from livelib import BLOCK, MiB, bitmaps, live, make_image  # noqa: F401
from livelib import state_dir  # noqa: F401 (autouse: a journal per test)

SIZE = 32 * MiB



def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def listing(sock, disk):
    res = cbt("checkpoint", "list", "--qmp", sock, "--output=json", disk)
    return {c["name"]: c for c in res.json()["checkpoints"]}


def qsd_with_checkpoint(live):
    disk = make_image(live.path("d.qcow2"), SIZE)
    cbt("checkpoint", "create", disk, "off1")
    return disk, live.qsd(disk)


def test_create_list_show_delete_on_qsd(live, state_dir):
    disk, q = qsd_with_checkpoint(live)
    before = sha(disk)
    cps = listing(q.cbt_qmp, "vm")
    assert set(cps) == {"off1"} and cps["off1"]["usable"], cps

    cbt("checkpoint", "create", "--qmp", q.cbt_qmp, "vm", "live1")
    # QEMU has the bitmap, persistent and recording; the image is untouched.
    bms = {b["name"]: b for n in q.qmp("query-named-block-nodes", flat=True)
           if n["node-name"] == "disk" for b in n.get("dirty-bitmaps", [])}
    assert bms["live1"]["persistent"] and bms["live1"]["recording"], bms
    assert sha(disk) == before
    journals = os.listdir(os.path.join(state_dir, "live"))
    assert len(journals) == 1, journals

    w = live.writer(q, seed=3)
    w.step(5)
    cps = listing(q.cbt_qmp, "vm")
    assert cps["live1"]["order"] == cps["off1"]["order"] + 1, cps
    assert cps["live1"]["parent"] == "off1", cps
    assert bms["live1"]["count"] == 0, bms
    assert cps["live1"]["usable"] and \
        cps["live1"]["dirty-bytes"] == len(w.history()) * BLOCK, cps
    # Every way of naming the disk gives the same view.
    for name in ("disk", "disk-file", disk, os.path.relpath(disk)):
        assert listing(q.cbt_qmp, name) == cps, name
    res = cbt("checkpoint", "show", "--qmp", q.cbt_qmp, "disk", "live1")
    assert "health:        ok" in res.out and "parent:        off1" in res.out, res

    cbt("checkpoint", "delete", "--qmp", q.cbt_qmp, "vm", "live1")
    assert set(listing(q.cbt_qmp, "vm")) == {"off1"}
    assert "live1" not in {b["name"] for n in q.qmp(
        "query-named-block-nodes", flat=True) for b in n.get("dirty-bitmaps", [])}
    res = cbt("checkpoint", "delete", "--qmp", q.cbt_qmp, "vm", "live1")
    assert "nothing to delete" in res.err, res


def test_refusals(live):
    disk, q = qsd_with_checkpoint(live)
    res = cbt("checkpoint", "create", "--qmp", q.cbt_qmp, "vm", "off1",
              check=False)
    assert res.rc != 0 and "already has a checkpoint" in res.err, res
    res = cbt("checkpoint", "create", "--qmp", q.cbt_qmp, "nosuch", "x",
              check=False)
    assert res.rc == 64 and "no disk 'nosuch'" in res.err and "vm" in res.err, res
    # Offline on the held image: refused, pointing at the running QEMU.
    res = cbt("checkpoint", "create", disk, "x", check=False)
    assert res.rc == 75 and "lock" in res.err, res
    # A socket that is not QMP (the NBD server).
    res = cbt("checkpoint", "list", "--qmp", q.nbd_path, "vm", check=False,
              timeout=120)
    assert res.rc != 0 and q.nbd_path in res.err, res
    res = cbt("checkpoint", "list", "-U", "--qmp", q.cbt_qmp, "vm",
              check=False)
    assert res.rc == 64 and "--qmp needs no -U" in res.err, res


def test_devices_of_qemu_system(live):
    a = make_image(live.path("a.qcow2"), SIZE)
    b = make_image(live.path("b.qcow2"), SIZE)
    vm = live.vm([a, b])
    cbt("checkpoint", "create", "--qmp", vm.cbt_qmp, "vdb", "cb")
    cbt("checkpoint", "create", "--qmp", vm.cbt_qmp,
        "/machine/peripheral/vda/virtio-backend", "ca")
    assert set(listing(vm.cbt_qmp, "vda")) == {"ca"}
    assert set(listing(vm.cbt_qmp, b)) == {"cb"}
    w = live.writer(vm, device="vdb", seed=4)
    w.step(3)
    cps = listing(vm.cbt_qmp, "vdb")
    assert cps["cb"]["dirty-bytes"] == len(w.history()) * BLOCK
    assert listing(vm.cbt_qmp, "vda")["ca"]["dirty-bytes"] == 0
    vm.quit()
    assert "ca" in bitmaps(a) and "cb" in bitmaps(b)


def test_drive_node_names(live):
    a = make_image(live.path("a.qcow2"), SIZE)
    vm = live.vm([a], drive=True)
    node = vm.node("vda")
    assert node.startswith("#block"), node
    for i, name in enumerate(("vda", "drive-vda", node, a)):
        cbt("checkpoint", "create", "--qmp", vm.cbt_qmp, name, "c%d" % i)
    assert len(listing(vm.cbt_qmp, "vda")) == 4


def test_chain_union_counted_by_qemu(live):
    """A checkpoint whose bitmap has copies in two layers: its dirty bytes
    are the union, counted by QEMU (a temporary bitmap, removed)."""
    base = make_image(live.path("base.qcow2"), SIZE)
    run_io = ["qemu-io", "-f", "qcow2", "-c"]
    cbt("checkpoint", "create", base, "c1")
    os.system(" ".join(run_io + ["'write 0 192k'", base]) + " >/dev/null")
    top = live.path("top.qcow2")
    cbt("snapshot", base, top)
    os.system(" ".join(run_io + ["'write 128k 128k'", top]) + " >/dev/null")
    q = live.qsd(top, chain=[base])
    cps = listing(q.cbt_qmp, "vm")
    # 0..192k in the base, 128k..256k in the top: 256 KiB in all.
    assert cps["c1"]["dirty-bytes"] == 256 * 1024, cps
    names = {b["name"] for n in q.qmp("query-named-block-nodes", flat=True)
             for b in n.get("dirty-bitmaps", [])}
    assert not any(x.startswith("cbt-") for x in names), names


def test_qemu_killed_voids_live_checkpoints(live):
    disk, q = qsd_with_checkpoint(live)
    cbt("checkpoint", "create", "--qmp", q.cbt_qmp, "vm", "live1")
    q.kill()
    q2 = live.qsd(disk)
    cps = listing(q2.cbt_qmp, "vm")
    assert not cps["live1"]["usable"] and "missing" in cps["live1"]["problem"]
    assert not cps["off1"]["usable"] and "inconsistent" in cps["off1"]["problem"]


def offline_list(disk):
    res = cbt("checkpoint", "list", "--output=json", disk)
    return {c["name"]: c for c in res.json()["checkpoints"]}


def test_fold_after_a_clean_shutdown(live, state_dir):
    """After QEMU closed the image, offline cbt sees the live checkpoints
    (the journal applied), and its first change to the disk's metadata
    folds the journal into the image and removes it."""
    disk, q = qsd_with_checkpoint(live)
    cbt("checkpoint", "create", "--qmp", q.cbt_qmp, "vm", "live1")
    w = live.writer(q, seed=5)
    w.step(4)
    live_view = listing(q.cbt_qmp, "vm")
    q.quit()
    cps = offline_list(disk)
    assert set(cps) == {"off1", "live1"}, cps
    for name in cps:
        for k in ("order", "parent", "created", "granularity", "usable",
                  "dirty-bytes"):
            assert cps[name][k] == live_view[name][k], (name, k, cps, live_view)
    assert os.listdir(os.path.join(state_dir, "live")), "folded too early"
    bk = live.path("bk")
    os.mkdir(bk)
    cbt("backup", "--full", disk, os.path.join(bk, "full.qcow2"))
    assert not os.listdir(os.path.join(state_dir, "live")), "journal left"
    # The metadata is in the image now: without the state folder too.
    os.environ["CBT_STATE_DIR"] = state_dir + "-empty"
    try:
        cps = offline_list(disk)
    finally:
        os.environ["CBT_STATE_DIR"] = state_dir
    assert {"off1", "live1"} <= set(cps) and cps["live1"]["usable"], cps
    res = qemu_img("check", disk, check=False)
    assert res.rc == 0, res


def test_fold_after_qemu_was_killed(live):
    disk, q = qsd_with_checkpoint(live)
    cbt("checkpoint", "create", "--qmp", q.cbt_qmp, "vm", "live1")
    q.kill()
    cps = offline_list(disk)
    assert not cps["live1"]["usable"] and not cps["off1"]["usable"], cps
    bk = live.path("bk")
    os.mkdir(bk)
    res = cbt("backup", "--incremental", disk, os.path.join(bk, "i.qcow2"),
              check=False)
    assert res.rc == 79, res
    res = cbt("backup", "--auto", disk, os.path.join(bk, "f.qcow2"))
    assert "full backup instead" in res.out + res.err, res
    cbt("checkpoint", "reconcile", "--fix", disk)
    cbt("backup", "--incremental", disk, os.path.join(bk, "i2.qcow2"))


def qemu_bitmaps(q, node="disk"):
    return {b["name"]: b for n in q.qmp("query-named-block-nodes", flat=True)
            if n["node-name"] == node for b in n.get("dirty-bitmaps", [])
            if b.get("name")}


def drift(q, *args):
    res = cbt("checkpoint", "reconcile", "--qmp", q.cbt_qmp,
              "--output=json", *args, "vm")
    return {(d["kind"], d["name"]): d for d in res.json()["drift"]}


def test_reconcile(live, tmp_path):
    """reconcile --qmp finds what a killed cbt left (objects, the new
    checkpoint it never kept), a broken checkpoint and bitmaps without a
    checkpoint; --fix repairs all of it, after which an incremental since
    the surviving checkpoint works."""
    disk, q = qsd_with_checkpoint(live)
    cbt("checkpoint", "create", "--qmp", q.cbt_qmp, "vm", "live1")
    cbt("checkpoint", "create", "--qmp", q.cbt_qmp, "vm", "live2")
    q.qmp("block-dirty-bitmap-disable", node="disk", name="live2")
    q.qmp("block-dirty-bitmap-add", node="disk", name="foreign",
          persistent=True)
    q.qmp("block-dirty-bitmap-add", node="disk", name="transient")
    res = cbt("checkpoint", "reconcile", "--qmp", q.cbt_qmp, "vm")
    assert "No drift" not in res.out, res
    bk = tmp_path / "bk"
    bk.mkdir()
    p = subprocess.Popen([CBT, "backup", "--qmp", q.cbt_qmp, "--full",
                          "--checkpoint", "dead", "vm", str(bk / "dead.qcow2")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(
            j["id"].startswith("cbt-") for j in q.qmp("query-jobs")):
        time.sleep(0.001)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert "dead" in qemu_bitmaps(q)

    before = qemu_bitmaps(q)
    found = drift(q)
    assert set(found) == {
        ("leftover", ""), ("bitmap-without-metadata", "dead"),
        ("bitmap-unusable", "live2"), ("bitmap-without-metadata", "foreign"),
        ("bitmap-without-metadata", "transient")}, found
    assert not any(d["fixed"] for d in found.values()), found
    assert "not persistent" in found[("bitmap-without-metadata",
                                      "transient")]["explanation"]
    # Without --fix nothing changed.
    assert qemu_bitmaps(q).keys() == before.keys()
    assert [j for j in q.qmp("query-jobs") if j["id"].startswith("cbt-")]

    fixed = drift(q, "--fix")
    assert {k for k, d in fixed.items() if d["fixed"]} == set(found) - {
        ("bitmap-without-metadata", "transient")}, fixed
    assert not [j for j in q.qmp("query-jobs") if j["id"].startswith("cbt-")]
    assert not [n for n in q.qmp("query-named-block-nodes", flat=True)
                if n["node-name"].startswith("cbt-")]
    assert not os.path.exists(str(bk / "dead.qcow2.scratch"))
    assert set(qemu_bitmaps(q)) == {"off1", "live1", "foreign", "transient"}
    cps = listing(q.cbt_qmp, "vm")
    assert set(cps) == {"off1", "live1", "foreign"}, cps
    assert cps["foreign"]["usable"] and cps["foreign"]["parent"] == "live1"
    # Only the bitmap it may not touch is left.
    assert set(drift(q)) == {("bitmap-without-metadata", "transient")}
    w = live.writer(q, seed=5)
    w.step(4)
    cbt("backup", "--qmp", q.cbt_qmp, "--full", "vm", str(bk / "full.qcow2"))
    w.step(4)
    cbt("backup", "--qmp", q.cbt_qmp, "--incremental", "vm",
        str(bk / "inc.qcow2"))
    out = str(tmp_path / "r.qcow2")
    cbt("restore", str(bk / "inc.qcow2"), out)
    q.quit()
    assert qemu_img("compare", disk, out, check=False).rc == 0
