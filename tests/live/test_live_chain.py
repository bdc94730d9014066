"""cbt snapshot|commit|stream --qmp: chain operations on a running VM with
every checkpoint kept exact.

The guest (a Writer through qemu-storage-daemon's NBD export, or HMP
qemu-io in qemu-system) keeps writing while QEMU's jobs run.  The oracle
is the writer's log: the changes since a checkpoint are exactly the blocks
written after it was made (one block = one 64 KiB granule), so after every
operation each checkpoint's view from the top (QEMU's count through `cbt
checkpoint list --qmp`, and once QEMU has quit, the union of its copies
over the chain by `cbt bitmap --dump --chain`) must be exactly that set;
the guest view must be the writer's last generations; and a live
incremental backup taken afterwards must hold exactly the blocks written
since the previous backup and restore to the disk (qemu-img compare).
"""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import CBT, cbt, qemu_img, run
from livelib import BLOCK, MiB, View, cut_of, live, make_image, top_blocks  # noqa: F401
from livelib import state_dir  # noqa: F401 (autouse: a journal per test)

SIZE = 16 * MiB
NBLOCKS = SIZE // BLOCK


class Tracker:
    """Where each checkpoint starts in the writer's log."""

    def __init__(self, w):
        self.w = w
        self.start = {}

    def mark(self, name):
        self.start[name] = len(self.w.log)

    def since(self, name):
        return {x.block for x in self.w.log[self.start[name]:]}


def checkpoint_here(q, w, t, name):
    """A live checkpoint made while the writer is held (its start in the
    log is exact)."""
    w.pause()
    cbt("checkpoint", "create", "--qmp", q.cbt_qmp, "vm", name)
    t.mark(name)
    w.resume()


def live_list(q, disk="vm"):
    res = cbt("checkpoint", "list", "--qmp", q.cbt_qmp, "--output=json", disk)
    return {c["name"]: c for c in res.json()["checkpoints"]}


def assert_live_views(q, t, disk="vm"):
    """Each tracked checkpoint usable, QEMU's count of its union exactly
    the blocks written since it (the writer held)."""
    cps = live_list(q, disk)
    for name in t.start:
        c = cps.get(name)
        assert c and c["usable"], (name, cps)
        assert c["dirty-bytes"] == len(t.since(name)) * BLOCK, (
            name, c["dirty-bytes"] // BLOCK, len(t.since(name)))


def chain_dirty(image, name):
    """The blocks of checkpoint NAME's union over IMAGE's chain (offline)."""
    out = cbt("bitmap", "--dump", "--chain", "--output=json", image, name).out
    blocks = set()
    for e in json.loads(out):
        if e["dirty"]:
            blocks.update(range(e["start"] // BLOCK,
                                (e["start"] + e["length"]) // BLOCK))
    return blocks


def assert_offline(image, t, tmp):
    """QEMU has quit: every checkpoint usable offline, its union exactly the
    writes since it; the image's view the writer's last generations."""
    cps = {c["name"]: c for c in cbt("checkpoint", "list", "--output=json",
                                     image).json()["checkpoints"]}
    for name in t.start:
        assert cps.get(name, {}).get("usable"), (name, cps)
        assert chain_dirty(image, name) == t.since(name), name
    assert_guest_view(image, t.w, tmp)
    qemu_img("check", image)


def assert_guest_view(image, w, tmp):
    cut = cut_of(w, View(image, str(tmp)))
    assert cut.ok, cut.problems[:5]
    assert cut.gens == {b: w.gens.get(b, 0) for b in range(w.nblocks)}


def image_file(name):
    """An image's file from QEMU's filename (a json: pseudo-filename for a
    node added with options)."""
    if not name.startswith("json:"):
        return name
    d = json.loads(name[5:])
    while "filename" not in d:
        d = d.get("file") or d["image"]      # through blkdebug
    return d["filename"]


def layers(q):
    """The disk's chain, top first, as image file names (QEMU's view)."""
    out = []
    if hasattr(q, "devices"):           # qemu-system: the device's medium
        img = q.qmp("query-block")[0]["inserted"]["image"]
    else:
        img = q.qmp("query-named-block-nodes", flat=False)
        exp = q.qmp("query-block-exports")[0]["node-name"]
        img = next(n for n in img if n["node-name"] == exp)["image"]
    while img:
        out.append(os.path.basename(image_file(img["filename"])))
        img = img.get("backing-image")
    return out


def start(live, tmp_path, gens=None):
    """base.qcow2 with checkpoint c1 (offline) under qemu-storage-daemon, a
    writer, and a full live backup (its checkpoint tracked as 'full')."""
    base = make_image(live.path("base.qcow2"), SIZE,
                      gens=gens or {b: 1 for b in range(0, NBLOCKS, 3)})
    cbt("checkpoint", "create", base, "c1")
    q = live.qsd(base)
    w = live.writer(q, seed=7, rate=150,
                    initial=gens or {b: 1 for b in range(0, NBLOCKS, 3)})
    t = Tracker(w)
    t.mark("c1")
    w.step(20)
    bk = live.path("bk")
    os.mkdir(bk)
    cbt("backup", "--qmp", q.cbt_qmp, "--full", "--checkpoint", "full", "vm",
        os.path.join(bk, "full.qcow2"))
    t.mark("full")
    return q, w, t, bk


def incremental_restores(live, q, w, t, bk, name):
    """A live incremental since the last backup: exactly the blocks written
    since it, and it restores to the disk (writer held)."""
    target = os.path.join(bk, name + ".qcow2")
    last = [k for k in t.start if k == "full" or k.startswith("inc")][-1]
    cbt("backup", "--qmp", q.cbt_qmp, "--since", last, "--checkpoint", name,
        "vm", target)
    assert top_blocks(target) == t.since(last)
    t.mark(name)
    out = live.path("restored-%s.qcow2" % name)
    cbt("restore", target, out)
    # The disk as the guest sees it (through the export: QEMU's caches
    # make the files themselves no view while it runs).
    qemu_img("compare", "-f", "qcow2", "-F", "raw", out, q.uri)


def test_snapshot_then_commits_keep_checkpoints(live, tmp_path, state_dir):
    """Three live snapshots, an intermediate commit and an active commit,
    the guest writing all along; checkpoints made before and between."""
    q, w, t, bk = start(live, tmp_path)
    checkpoint_here(q, w, t, "c2")
    w.start()
    w.wait_writes(10)
    for i in (1, 2, 3):
        cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o%d.qcow2" % i))
        w.wait_writes(15)
        if i == 2:
            checkpoint_here(q, w, t, "c3")
    w.pause()
    assert layers(q) == ["o3.qcow2", "o2.qcow2", "o1.qcow2", "base.qcow2"]
    assert_live_views(q, t)
    w.resume()

    # Intermediate: o2 and o1 into base, the guest writing into o3.
    cbt("commit", "--qmp", q.cbt_qmp, "--top", live.path("o2.qcow2"),
        "--base", live.path("base.qcow2"), "vm")
    w.wait_writes(10)
    w.pause()
    assert layers(q) == ["o3.qcow2", "base.qcow2"]
    assert_live_views(q, t)
    incremental_restores(live, q, w, t, bk, "inc1")
    w.resume()
    w.wait_writes(10)

    # Active: o3 into base, base the top again.
    cbt("commit", "--qmp", q.cbt_qmp, "vm")
    w.wait_writes(10)
    w.pause()
    assert layers(q) == ["base.qcow2"]
    assert_live_views(q, t)
    incremental_restores(live, q, w, t, bk, "inc2")
    # The overlays' journals went with them: base's alone is left.
    assert len(os.listdir(os.path.join(state_dir, "live"))) == 1
    w.stop()
    q.quit()
    assert_offline(live.path("base.qcow2"), t, tmp_path)


def test_stream_keeps_checkpoints(live, tmp_path):
    q, w, t, bk = start(live, tmp_path)
    w.start()
    for i in (1, 2, 3):
        cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o%d.qcow2" % i))
        w.wait_writes(15)
        if i == 1:
            checkpoint_here(q, w, t, "c2")
    # o2 and o1 streamed into o3, base kept.
    cbt("stream", "--qmp", q.cbt_qmp, "-b", live.path("base.qcow2"), "vm")
    w.wait_writes(10)
    w.pause()
    assert layers(q) == ["o3.qcow2", "base.qcow2"]
    assert_live_views(q, t)
    incremental_restores(live, q, w, t, bk, "inc1")
    w.resume()
    # Everything into o3.
    cbt("stream", "--qmp", q.cbt_qmp, "vm")
    w.wait_writes(10)
    w.pause()
    assert layers(q) == ["o3.qcow2"]
    assert_live_views(q, t)
    incremental_restores(live, q, w, t, bk, "inc2")
    w.stop()
    q.quit()
    assert_offline(live.path("o3.qcow2"), t, tmp_path)


def test_commit_adds_no_bits_of_its_own(live):
    """The commit job writes whole clusters into base, which dirties base's
    recording bitmaps; with a 4 KiB granularity and 4 KiB guest writes that
    is 16 times the changes.  cbt's rebuild of base's copies leaves exactly
    the guest's granules: intermediate and active commit."""
    import nbd
    base = make_image(live.path("base.qcow2"), SIZE)
    cbt("checkpoint", "create", "-g", "4096", base, "fine")
    q = live.qsd(base)
    h = nbd.NBD()
    h.connect_uri(q.uri)
    dirty = set()

    def write(off):
        h.pwrite(b"\x5a" * 4096, off)
        dirty.add(off // 4096)

    def count():
        c = live_list(q)["fine"]
        assert c["usable"], c
        return c["dirty-bytes"] // 4096

    write(0)
    for i in (1, 2):
        cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o%d.qcow2" % i))
        for k in range(5):
            write((i * 100 + k * 7) * 65536 + 8192)
    assert count() == len(dirty)
    cbt("commit", "--qmp", q.cbt_qmp, "--top", live.path("o1.qcow2"), "vm")
    assert layers(q) == ["o2.qcow2", "base.qcow2"]
    assert count() == len(dirty)
    cbt("commit", "--qmp", q.cbt_qmp, "vm")
    assert layers(q) == ["base.qcow2"]
    assert count() == len(dirty)
    write(3 * 4096)
    assert count() == len(dirty)
    h.shutdown()
    q.quit()
    assert len(chain_dirty4k(base, "fine")) == len(dirty)


def chain_dirty4k(image, name):
    out = cbt("bitmap", "--dump", "--chain", "--output=json", image, name).out
    return {s for e in json.loads(out) if e["dirty"]
            for s in range(e["start"] // 4096, (e["start"] + e["length"]) // 4096)}


def node_bitmaps(q):
    """{node: {bitmap: (count, recording, persistent)}} of QEMU's named
    bitmaps, cbt's temporary ones included."""
    return {n["node-name"]: {b["name"]: (b["count"], b["recording"], b["persistent"])
                             for b in n.get("dirty-bitmaps", []) if "name" in b}
            for n in q.qmp("query-named-block-nodes", flat=True)}


def cbt_objects(q):
    found = [j["id"] for j in q.qmp("query-jobs")]
    for node, bms in node_bitmaps(q).items():
        found += [b for b in bms if b.startswith("cbt-")]
    return found


@pytest.mark.parametrize("top", ["active", "intermediate"])
def test_commit_failing_on_io_error_changes_nothing(live, tmp_path, top):
    """The job's second write into base fails (blkdebug): QEMU stops the
    job (on-error=stop), cbt puts base's bitmaps back (its first write
    dirtied them) and cancels it.  The chain, every bitmap and every
    checkpoint are as before; the next incremental is exact."""
    gens = {b: 1 for b in range(0, NBLOCKS, 2)}
    base = make_image(live.path("base.qcow2"), SIZE, gens=gens)
    cbt("checkpoint", "create", base, "c1")
    # write_aio: qcow2's data writes.  State 1 -> 2 at the first, errors
    # from then on: one write lands, the next fails.
    dbg = {"driver": "blkdebug", "inject-error": [{"event": "write_aio", "errno": 5, "state": 2,
                            "iotype": "write", "immediately": True}],
           "set-state": [{"event": "write_aio", "state": 1, "new_state": 2}]}
    q = live.qsd(base, under={base: dbg})
    w = live.writer(q, seed=9, initial=gens)
    t = Tracker(w)
    t.mark("c1")
    cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o1.qcow2"))
    w.step(30)
    args = []
    if top == "intermediate":
        cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o2.qcow2"))
        w.step(10)
        args = ["--top", live.path("o1.qcow2")]
    chain, before = layers(q), node_bitmaps(q)
    w.start()
    res = cbt("commit", "--qmp", q.cbt_qmp, *args, "vm", check=False)
    w.pause()
    assert res.rc != 0 and "I/O error" in res.err and "so are its bitmaps" in res.err, res
    assert layers(q) == chain
    after = node_bitmaps(q)
    # Base's copy got the first write and lost it again; the others only
    # gained the guest's writes.
    assert after["disk"]["c1"] == before["disk"]["c1"], res.err
    assert {n: set(b) for n, b in after.items()} == \
        {n: set(b) for n, b in before.items()}
    assert cbt_objects(q) == []
    assert_live_views(q, t)
    w.stop()
    assert_guest_view_live(q, w, tmp_path)


def assert_guest_view_live(q, w, tmp):
    """The guest view through the export: the writer's last generations."""
    out = os.path.join(str(tmp), "export.raw")
    qemu_img("convert", "-f", "raw", "-O", "raw", q.uri, out)
    cut = cut_of(w, View(out, str(tmp), fmt="raw"))
    assert cut.ok, cut.problems[:5]
    assert cut.gens == {b: w.gens.get(b, 0) for b in range(w.nblocks)}


def bitmap_state(image):
    """{name: (granularity, recording, sha256)} of IMAGE's own bitmaps."""
    out = {}
    for b in cbt("bitmap", "--list", "--output=json", image).json():
        sha = cbt("bitmap", "--sha256", image, b["name"]).out.split()[0]
        out[b["name"]] = (b["granularity"], b["recording"], sha)
    return out


def test_live_commit_equals_offline_commit(live, tmp_path):
    """The same commits, live (QEMU's jobs and cbt's bitmap handling) and
    offline (cbt commit on a copy of the chain), leave the same bitmaps:
    names, granularities, recording states and bits.  The chain: two live
    snapshots with a checkpoint between, then an offline one (which stops
    the copies below it recording)."""
    base = make_image(live.path("base.qcow2"), SIZE,
                      gens={b: 1 for b in range(0, NBLOCKS, 3)})
    cbt("checkpoint", "create", base, "c1")
    q = live.qsd(base)
    w = live.writer(q, seed=21, initial={b: 1 for b in range(0, NBLOCKS, 3)})
    w.step(15)
    cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o1.qcow2"))
    w.step(15)
    cbt("checkpoint", "create", "--qmp", q.cbt_qmp, "vm", "c2")
    w.step(10)
    cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o2.qcow2"))
    w.step(15)
    w.stop()
    q.quit()
    names = [live.path(f + ".qcow2") for f in ("base", "o1", "o2", "o3")]
    cbt("snapshot", names[2], names[3])
    q = live.qsd(names[3], chain=names[:3])
    w = live.writer(q, seed=22, initial=w.gens)
    w.step(15)
    w.stop()
    q.quit()
    off = tmp_path / "off"
    off.mkdir()
    o = [str(off / os.path.basename(n)) for n in names]
    for a, b in zip(names, o):
        shutil.copy(a, b)

    # Intermediate: o2 and o1 into base, under o3.
    q = live.qsd(names[3], chain=names[:3])
    cbt("commit", "--qmp", q.cbt_qmp, "--top", names[2], "--base", names[0],
        "vm")
    q.quit()
    cbt("commit", "--top", o[2], "--base", o[0], "--active", o[3])
    assert bitmap_state(names[0]) == bitmap_state(o[0])
    assert bitmap_state(names[3]) == bitmap_state(o[3])
    # Active: o3 into base (cbt commit --top without --active: the pivot).
    q = live.qsd(names[3], chain=names[:1])
    cbt("commit", "--qmp", q.cbt_qmp, "vm")
    q.quit()
    cbt("commit", "--top", o[3], "--base", o[0])
    assert bitmap_state(names[0]) == bitmap_state(o[0])
    qemu_img("compare", names[0], o[0])


@pytest.mark.parametrize("op", ["commit-active", "commit-intermediate", "stream"])
def test_ctrl_c_cancels_leaving_everything_as_before(live, tmp_path, op):
    """SIGINT while QEMU's job runs (slowed by -r, and caught with some
    progress made: base's copies already dirtied by the
    commit's first writes): cbt cancels the job, puts base's bitmaps back,
    dies of the signal; the chain and every bitmap are as before."""
    gens = {b: 1 for b in range(0, NBLOCKS, 3)}
    base = make_image(live.path("base.qcow2"), SIZE, gens=gens)
    cbt("checkpoint", "create", base, "c1")
    q = live.qsd(base)
    w = live.writer(q, seed=7, initial=gens)
    t = Tracker(w)
    t.mark("c1")
    w.step(5)
    bk = live.path("bk")
    os.mkdir(bk)
    cbt("backup", "--qmp", q.cbt_qmp, "--full", "--checkpoint", "full", "vm",
        os.path.join(bk, "full.qcow2"))
    t.mark("full")
    for i in (1, 2):
        cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o%d.qcow2" % i))
        w.step(60)
    args = {"commit-active": ["commit"],
            "commit-intermediate": ["commit", "--top", live.path("o1.qcow2")],
            "stream": ["stream"]}[op]
    chain, before = layers(q), node_bitmaps(q)
    p = subprocess.Popen([CBT] + args[:1] + ["--qmp", q.cbt_qmp, "-p", "-r", "1M"] + args[1:] + ["vm"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        moved = False
        while time.time() < deadline and p.poll() is None and not moved:
            moved = any(j["id"].startswith("cbt-") and j["current-progress"] > 0
                        for j in q.qmp("query-jobs"))
            time.sleep(0.01)
        assert moved, "the job made no progress"
        w.start()
        w.wait_writes(5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        w.pause()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGINT, (p.returncode, err)
    assert "cancelled" in err and "so are its bitmaps" in err, err
    assert layers(q) == chain
    after = node_bitmaps(q)
    # Base's copies as they were (the commit's writes gone from them).
    assert after["disk"] == before["disk"]
    assert {n: set(b) for n, b in after.items()} == \
        {n: set(b) for n, b in before.items()}
    assert cbt_objects(q) == []
    assert_live_views(q, t)
    incremental_restores(live, q, w, t, bk, "inc1")
    w.stop()


def test_snapshot_refused_changes_nothing(live, tmp_path):
    """QEMU refuses the snapshot's transaction (another tool's mirror job
    runs on the disk): no overlay file, no node, the chain and every bitmap
    as before; then, the job gone, the snapshot works."""
    q, w, t, bk = start(live, tmp_path)
    mirror = live.path("mirror.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", mirror, str(SIZE))
    q.qmp("blockdev-add", {"driver": "qcow2", "node-name": "mir",
                           "file": {"driver": "file", "filename": mirror}})
    q.qmp("blockdev-mirror", job_id="other", device="disk", target="mir",
          sync="full", speed=1)
    chain, before = layers(q), node_bitmaps(q)
    ov = live.path("o1.qcow2")
    res = cbt("snapshot", "--qmp", q.cbt_qmp, "vm", ov, check=False)
    assert res.rc != 0 and "'transaction' failed" in res.err, res
    assert not os.path.exists(ov)
    assert layers(q) == chain
    assert node_bitmaps(q) == before
    assert not [n for n in q.qmp("query-named-block-nodes", flat=True)
                if n["node-name"].startswith("cbt-")]
    q.qmp("job-cancel", id="other")
    q.wait_event("BLOCK_JOB_CANCELLED", device="other")
    cbt("snapshot", "--qmp", q.cbt_qmp, "vm", ov)
    w.step(10)
    assert layers(q) == ["o1.qcow2", "base.qcow2"]
    assert_live_views(q, t)
    incremental_restores(live, q, w, t, bk, "inc1")


def test_qemu_system_drive(live, tmp_path):
    """qemu-system with -drive (QEMU names the nodes): snapshots, an
    intermediate and an active commit and a stream, the guest writing
    through HMP qemu-io; every checkpoint exact, the overlays cbt added
    deleted from QEMU once they left the chain."""
    gens = {b: 1 for b in range(0, NBLOCKS, 4)}
    base = make_image(live.path("base.qcow2"), SIZE, gens=gens)
    cbt("checkpoint", "create", base, "c1")
    vm = live.vm([base], drive=True)
    w = live.writer(vm, seed=31, initial=gens)
    t = Tracker(w)
    t.mark("c1")
    w.step(8)
    for i in (1, 2, 3):
        cbt("snapshot", "--qmp", vm.cbt_qmp, "vda", live.path("o%d.qcow2" % i))
        w.step(8)
        if i == 1:
            cbt("checkpoint", "create", "--qmp", vm.cbt_qmp, "vda", "c2")
            t.mark("c2")
    assert layers(vm) == ["o3.qcow2", "o2.qcow2", "o1.qcow2", "base.qcow2"]
    assert_live_views(vm, t, "vda")
    cbt("commit", "--qmp", vm.cbt_qmp, "--top", live.path("o1.qcow2"), "vda")
    w.step(8)
    assert layers(vm) == ["o3.qcow2", "o2.qcow2", "base.qcow2"]
    assert_live_views(vm, t, "vda")
    cbt("stream", "--qmp", vm.cbt_qmp, "-b", live.path("base.qcow2"), "vda")
    w.step(8)
    assert layers(vm) == ["o3.qcow2", "base.qcow2"]
    assert_live_views(vm, t, "vda")
    cbt("commit", "--qmp", vm.cbt_qmp, "vda")
    w.step(8)
    assert layers(vm) == ["base.qcow2"]
    assert_live_views(vm, t, "vda")
    assert not [n["node-name"] for n in vm.qmp("query-named-block-nodes", flat=True)
                if n["node-name"].startswith("cbt-")]
    vm.quit()
    assert_offline(base, t, tmp_path)


@pytest.mark.parametrize("shallow", [False, True])
def test_copy_keeps_checkpoints(live, tmp_path, shallow):
    """cbt copy --qmp (blockdev-mirror, pivot) with the guest writing: the
    disk moves to DEST, every checkpoint stays exact there, incremental
    backups continue; the old images are left as they are."""
    q, w, t, bk = start(live, tmp_path)
    w.start()
    for i in (1, 2):
        cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o%d.qcow2" % i))
        w.wait_writes(15)
        if i == 1:
            checkpoint_here(q, w, t, "c2")
    dest = live.path("moved.qcow2")
    cbt("copy", "--qmp", q.cbt_qmp, *(["--shallow"] if shallow else []), "vm", dest)
    w.wait_writes(10)
    w.pause()
    assert layers(q) == (["moved.qcow2", "o1.qcow2", "base.qcow2"] if shallow
                         else ["moved.qcow2"])
    assert_live_views(q, t)
    incremental_restores(live, q, w, t, bk, "inc1")
    assert cbt_objects(q) == []
    w.stop()
    q.quit()
    assert_offline(dest, t, tmp_path)


def test_copy_failing_removes_dest(live, tmp_path):
    """The mirror's job fails (DEST's folder is full... simulated: the job
    is cancelled by SIGINT once it moved): DEST is gone, the disk as
    before."""
    q, w, t, bk = start(live, tmp_path)
    cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o1.qcow2"))
    w.step(60)
    chain, before = layers(q), node_bitmaps(q)
    dest = live.path("moved.qcow2")
    p = subprocess.Popen([CBT, "copy", "--qmp", q.cbt_qmp, "-r", "1M", "vm", dest],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        moved = False
        while time.time() < deadline and p.poll() is None and not moved:
            moved = any(j["id"].startswith("cbt-") and j["current-progress"] > 0
                        for j in q.qmp("query-jobs"))
            time.sleep(0.01)
        assert moved, "the job made no progress"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGINT, (p.returncode, err)
    assert not os.path.exists(dest)
    assert layers(q) == chain
    assert node_bitmaps(q) == before
    assert cbt_objects(q) == []
    assert not [n for n in q.qmp("query-named-block-nodes", flat=True)
                if n["node-name"].startswith("cbt-") and "o1" not in
                image_file(n.get("file", ""))]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_sequence(live, tmp_path, seed):
    """A random sequence of snapshot, commit (active and intermediate, any
    top and base), stream (any base), copy (shallow or full), live
    checkpoints and live incremental backups, the guest writing during
    every operation: after each, the chain is the one expected, every
    checkpoint's view exact; each backup restores to the disk; offline at
    the end, every checkpoint exact over the final chain."""
    import random
    rng = random.Random(int(os.environ.get("CBT_CHAIN_SEED", seed)))
    q, w, t, bk = start(live, tmp_path)
    model = ["base.qcow2"]
    made = 0
    w.start()
    for step in range(12):
        n = len(model)
        choices = ["snapshot", "checkpoint", "backup"] * (1 if n > 1 else 2)
        if n >= 2:
            choices += ["commit", "stream", "copy"]
        if n >= 3:
            choices += ["commit-mid", "commit-mid"]
        op = rng.choice(choices)
        path = lambda name: live.path(name)  # noqa: E731
        if op == "snapshot":
            made += 1
            name = "s%d.qcow2" % made
            cbt("snapshot", "--qmp", q.cbt_qmp, "vm", path(name))
            model.insert(0, name)
        elif op == "checkpoint":
            checkpoint_here(q, w, t, "k%d" % step)
        elif op == "backup":
            w.pause()
            incremental_restores(live, q, w, t, bk, "inc%d" % step)
            w.resume()
        elif op == "commit":
            base = rng.randrange(1, n)
            cbt("commit", "--qmp", q.cbt_qmp, "--base", path(model[base]), "vm")
            model = model[base:]
        elif op == "commit-mid":
            top = rng.randrange(1, n - 1)
            base = rng.randrange(top + 1, n)
            cbt("commit", "--qmp", q.cbt_qmp, "--top", path(model[top]),
                "--base", path(model[base]), "vm")
            model = model[:top] + model[base:]
        elif op == "stream":
            base = rng.randrange(1, n + 1)
            args = ["-b", path(model[base])] if base < n else []
            cbt("stream", "--qmp", q.cbt_qmp, *args, "vm")
            model = model[:1] + model[base:]
        elif op == "copy":
            made += 1
            name = "s%d.qcow2" % made
            shallow = rng.random() < 0.5
            cbt("copy", "--qmp", q.cbt_qmp, *(["--shallow"] if shallow else []),
                "vm", path(name))
            model = [name] + (model[1:] if shallow else [])
        w.wait_writes(5)
        w.pause()
        assert layers(q) == model, (step, op)
        assert_live_views(q, t)
        w.resume()
    w.pause()
    incremental_restores(live, q, w, t, bk, "inclast")
    w.stop()
    q.quit()
    assert_offline(live.path(model[0]), t, tmp_path)


@pytest.mark.parametrize("op", ["commit", "commit-mid", "copy"])
def test_killed_cbt_leaves_what_the_next_removes(live, tmp_path, op):
    """cbt SIGKILLed while QEMU's job runs: the next live command cancels
    the job and removes the temporary bitmaps; the chain is as before and
    openable, no checkpoint lost a write (base's copies may keep the job's
    bits: more, never fewer), and the next incremental restores the disk."""
    q, w, t, bk = start(live, tmp_path)
    for i in (1, 2):
        cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o%d.qcow2" % i))
        w.step(60)
    args = {"commit": ["commit"],
            "commit-mid": ["commit", "--top", live.path("o1.qcow2")],
            "copy": ["copy"]}[op]
    extra = [live.path("moved.qcow2")] if op == "copy" else []
    chain = layers(q)
    p = subprocess.Popen([CBT] + args[:1] + ["--qmp", q.cbt_qmp, "-r", "1M"] +
                         args[1:] + ["vm"] + extra,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        moved = False
        while time.time() < deadline and p.poll() is None and not moved:
            moved = any(j["id"].startswith("cbt-") and j["current-progress"] > 0
                        for j in q.qmp("query-jobs"))
            time.sleep(0.01)
        assert moved, "the job made no progress"
        p.kill()
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert cbt_objects(q), "nothing left to clean up?"
    w.start()
    w.wait_writes(10)
    w.pause()
    # The next live command sweeps; the incremental is exact after it.
    incremental_restores(live, q, w, t, bk, "inc1")
    assert cbt_objects(q) == []
    assert layers(q) == chain
    # The copy's destination node is gone too (its file is left).
    assert {os.path.basename(image_file(n["file"]))
            for n in q.qmp("query-named-block-nodes", flat=True)
            if n["drv"] == "qcow2"} == set(chain)
    cps = live_list(q)
    names = [n for n in t.start if n != "inc1"]
    for name in names:
        assert cps[name]["usable"], (name, cps[name])
        assert cps[name]["dirty-bytes"] >= len(t.since(name)) * BLOCK
    w.stop()
    q.quit()
    for name in t.start:
        assert chain_dirty(live.path(chain[0]), name) >= t.since(name)
    qemu_img("check", live.path(chain[0]))


def test_qemu_killed_after_snapshot_trusts_no_checkpoint(live, tmp_path):
    """QEMU SIGKILLed after a live snapshot: the overlay's bitmaps (added
    live) are gone and the old top's are left in use; reopened, the chain
    opens, every checkpoint is reported unusable, and --auto takes a backup
    that does not trust them (a full one, or a rescan) and restores the disk (as QEMU left it: writes it had not
    flushed are lost with it)."""
    q, w, t, bk = start(live, tmp_path)
    ov = live.path("o1.qcow2")
    cbt("snapshot", "--qmp", q.cbt_qmp, "vm", ov)
    w.step(20)
    w.stop()
    q.kill()
    qemu_img("check", ov)
    q = live.qsd(ov)
    cps = live_list(q)
    assert cps and not any(c["usable"] for c in cps.values()), cps
    res = cbt("backup", "--qmp", q.cbt_qmp, "--auto", "--since", "full",
              "vm", os.path.join(bk, "after.qcow2"))
    # No bitmap can say what changed: a full backup, or (cbt backup
    # --rescan's way, which --auto takes when it can) every block compared
    # with the parent's hashes.
    assert "full backup instead" in res.out or "(rescan)" in res.out, res
    out = live.path("restored.qcow2")
    cbt("restore", os.path.join(bk, "after.qcow2"), out)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", out, q.uri)


def test_real_guest(live, tmp_path):
    """A real Linux guest writes realvm's workload (O_DIRECT chunks) while
    cbt takes a full backup, a live snapshot, an incremental, an active
    commit of the snapshot, and once the guest synced, a last incremental:
    the chain restores to realvm's model of every write, so neither the
    snapshot nor the commit lost a change to any checkpoint."""
    disk = live.path("guest.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, 64 * MiB)
    g = live.realvm(disk, seed=11, count=32, pause=0.1)
    bk = live.path("bk")
    os.mkdir(bk)
    g.wait_written(4)
    cbt("backup", "--qmp", g.cbt_qmp, "--full", "virtio0",
        os.path.join(bk, "full.qcow2"))
    g.wait_written(8)
    cbt("snapshot", "--qmp", g.cbt_qmp, "virtio0", live.path("o1.qcow2"))
    g.wait_written(14)
    cbt("backup", "--qmp", g.cbt_qmp, "--incremental", "virtio0",
        os.path.join(bk, "inc1.qcow2"))
    g.wait_written(18)
    cbt("commit", "--qmp", g.cbt_qmp, "virtio0")
    g.wait_synced()
    cbt("backup", "--qmp", g.cbt_qmp, "--incremental", "virtio0",
        os.path.join(bk, "inc2.qcow2"))
    g.quit()
    out = live.path("restored.qcow2")
    cbt("restore", os.path.join(bk, "inc2.qcow2"), out)
    model = live.path("model.raw")
    with open(model, "wb") as f:
        f.truncate(64 * MiB)
    g.model(model)
    res = qemu_img("compare", "-f", "raw", "-F", "qcow2", model, out,
                   check=False)
    assert res.rc == 0, res
    res = qemu_img("compare", "-f", "raw", "-F", "qcow2", model, disk,
                   check=False)
    assert res.rc == 0, res


def four_layers(live, tmp_path):
    """base <- o1 <- o2 <- o3 (live snapshots), a checkpoint made in each
    layer's time, the guest having written in each."""
    q, w, t, bk = start(live, tmp_path)
    for i in (1, 2, 3):
        cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o%d.qcow2" % i))
        w.step(12)
        checkpoint_here(q, w, t, "k%d" % i)
        w.step(6)
    return q, w, t, bk


CHAIN = ["o3.qcow2", "o2.qcow2", "o1.qcow2", "base.qcow2"]


@pytest.mark.parametrize("top,base", [(t, b) for t in range(3) for b in range(t + 1, 4)])
def test_commit_every_position(live, tmp_path, top, base):
    """Every (top, base) pair of a 4-layer chain, the guest writing during
    the job: the chain QEMU shows, every checkpoint exact live and offline,
    the next incremental exact."""
    q, w, t, bk = four_layers(live, tmp_path)
    args = ["--base", live.path(CHAIN[base])]
    if top:
        args += ["--top", live.path(CHAIN[top])]
    w.start()
    cbt("commit", "--qmp", q.cbt_qmp, *args, "vm")
    w.wait_writes(5)
    w.pause()
    assert layers(q) == CHAIN[:top] + CHAIN[base:]
    assert_live_views(q, t)
    incremental_restores(live, q, w, t, bk, "inc1")
    w.stop()
    q.quit()
    assert_offline(live.path((CHAIN[:top] + CHAIN[base:])[0]), t, tmp_path)


@pytest.mark.parametrize("base", [1, 2, 3, 4])
def test_stream_every_position(live, tmp_path, base):
    """Every base of a 4-layer chain (4: none, all data into the top)."""
    q, w, t, bk = four_layers(live, tmp_path)
    args = ["-b", live.path(CHAIN[base])] if base < 4 else []
    w.start()
    cbt("stream", "--qmp", q.cbt_qmp, *args, "vm")
    w.wait_writes(5)
    w.pause()
    assert layers(q) == CHAIN[:1] + CHAIN[base:]
    assert_live_views(q, t)
    incremental_restores(live, q, w, t, bk, "inc1")
    w.stop()
    q.quit()
    assert_offline(live.path(CHAIN[0]), t, tmp_path)


def test_relative_names_are_cbts_not_qemus(live, tmp_path):
    """OVERLAY, DEST, --top and --base relative to cbt's working folder,
    which is not QEMU's."""
    q, w, t, bk = start(live, tmp_path)
    here = dict(cwd=live.tmp)
    cbt("snapshot", "--qmp", q.cbt_qmp, "vm", "o1.qcow2", **here)
    w.step(5)
    cbt("snapshot", "--qmp", q.cbt_qmp, "vm", "o2.qcow2", **here)
    w.step(5)
    cbt("commit", "--qmp", q.cbt_qmp, "--top", "o1.qcow2", "--base", "base.qcow2",
        "vm", **here)
    w.step(5)
    cbt("copy", "--qmp", q.cbt_qmp, "--shallow", "vm", "moved.qcow2", **here)
    w.step(5)
    assert layers(q) == ["moved.qcow2", "base.qcow2"]
    assert_live_views(q, t)
    incremental_restores(live, q, w, t, bk, "inc1")
    w.stop()
    q.quit()
    assert_offline(live.path("moved.qcow2"), t, tmp_path)


def test_job_cancelled_by_someone_else(live, tmp_path):
    """Another QMP client cancels cbt's commit job: cbt says so and fails,
    leaves no temporary bitmap, the chain as before, no checkpoint lost a
    write (base's copies may keep the job's bits: more, never fewer)."""
    q, w, t, bk = start(live, tmp_path)
    for i in (1, 2):
        cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o%d.qcow2" % i))
        w.step(60)
    chain = layers(q)
    p = subprocess.Popen([CBT, "commit", "--qmp", q.cbt_qmp, "-r", "1M", "--top",
                          live.path("o1.qcow2"), "vm"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        job = None
        while time.time() < deadline and p.poll() is None and not job:
            job = next((j["id"] for j in q.qmp("query-jobs")
                        if j["id"].startswith("cbt-") and j["current-progress"] > 0), None)
            time.sleep(0.01)
        assert job, "the job made no progress"
        q.qmp("job-cancel", id=job)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 74 and "Operation canceled" in err, err
    assert "may hold extra changes" in err, err
    assert layers(q) == chain
    assert cbt_objects(q) == [], cbt_objects(q)
    names = list(t.start)
    cps = live_list(q)
    for name in names:
        assert cps[name]["usable"], cps[name]
        assert cps[name]["dirty-bytes"] >= len(t.since(name)) * BLOCK
    incremental_restores(live, q, w, t, bk, "inc1")


def test_progress_shows_rate_and_time_left(live, tmp_path):
    """-p on a terminal: QEMU's job progress, with the rate and the time
    left once a second of the job told them (-r slows it to a few
    seconds)."""
    import pty
    import re
    q, w, t, bk = start(live, tmp_path)
    for i in (1, 2):
        cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o%d.qcow2" % i))
        w.step(60)
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([CBT, "commit", "--qmp", q.cbt_qmp, "-p", "-r", "2M",
                              "vm"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        p.wait(timeout=120)
        p.stdout.close()
    finally:
        os.close(master)
    assert p.returncode == 0, out
    assert re.search(rb"/100%\)  [0-9.]+ [KMG]?i?B/s, \d+:\d\d left", out), out
    assert layers(q) == ["o1.qcow2", "base.qcow2"]
    assert_live_views(q, t)


def test_live_stream_equals_offline_stream(live, tmp_path):
    """The same streams live and offline (cbt stream on a copy of the
    chain) leave the same bitmaps in the top and the same guest view."""
    base = make_image(live.path("base.qcow2"), SIZE,
                      gens={b: 1 for b in range(0, NBLOCKS, 3)})
    cbt("checkpoint", "create", base, "c1")
    q = live.qsd(base)
    w = live.writer(q, seed=23, initial={b: 1 for b in range(0, NBLOCKS, 3)})
    w.step(15)
    cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o1.qcow2"))
    w.step(15)
    cbt("checkpoint", "create", "--qmp", q.cbt_qmp, "vm", "c2")
    w.step(10)
    cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o2.qcow2"))
    w.step(15)
    cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o3.qcow2"))
    w.step(15)
    w.stop()
    q.quit()
    names = [live.path(f + ".qcow2") for f in ("base", "o1", "o2", "o3")]
    off = tmp_path / "off"
    off.mkdir()
    o = [str(off / os.path.basename(n)) for n in names]
    for a, b in zip(names, o):
        shutil.copy(a, b)
    # o2 and o1 into o3, base kept; then the rest.
    for args_live, args_off in ((["-b", names[0]], ["-b", o[0]]), ([], [])):
        q = live.qsd(names[3], chain=names[:3] if args_live else names[:1])
        cbt("stream", "--qmp", q.cbt_qmp, *args_live, "vm")
        q.quit()
        cbt("stream", *args_off, o[3])
        assert bitmap_state(names[3]) == bitmap_state(o[3])
        qemu_img("compare", names[3], o[3])


def test_live_copy_equals_offline_convert(live, tmp_path):
    """cbt copy --qmp (full) leaves in DEST the bitmaps cbt convert --bitmaps
    of a copy of the chain makes offline, and the same data."""
    base = make_image(live.path("base.qcow2"), SIZE,
                      gens={b: 1 for b in range(0, NBLOCKS, 3)})
    cbt("checkpoint", "create", base, "c1")
    q = live.qsd(base)
    w = live.writer(q, seed=29, initial={b: 1 for b in range(0, NBLOCKS, 3)})
    w.step(15)
    cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o1.qcow2"))
    w.step(15)
    cbt("checkpoint", "create", "--qmp", q.cbt_qmp, "vm", "c2")
    w.step(10)
    cbt("snapshot", "--qmp", q.cbt_qmp, "vm", live.path("o2.qcow2"))
    w.step(15)
    w.stop()
    q.quit()
    names = [live.path(f + ".qcow2") for f in ("base", "o1", "o2")]
    off = tmp_path / "off"
    off.mkdir()
    o = [str(off / os.path.basename(n)) for n in names]
    for a, b in zip(names, o):
        shutil.copy(a, b)
    q = live.qsd(names[2], chain=names[:2])
    dest = live.path("moved.qcow2")
    cbt("copy", "--qmp", q.cbt_qmp, "vm", dest)
    q.quit()
    conv = str(off / "converted.qcow2")
    cbt("convert", "--bitmaps", "-O", "qcow2", o[2], conv)
    assert bitmap_state(dest) == bitmap_state(conv)
    qemu_img("compare", dest, conv)
