"""cbt backup --qmp: pull backups of running VMs, with the guest writing.

Every backup must be the disk at one single instant within cbt's run (the
cut oracle), the next incremental must hold every write made between the
two instants, and the chain must restore to exactly that instant.  To be
sure the guest writes while cbt copies, cbt is stopped (SIGSTOP) as soon as
QEMU shows its point-in-time job, the writer writes, and cbt goes on.
Failures leave nothing in QEMU and the old checkpoints intact; a cbt killed
mid-backup leaves objects a later cbt removes.
"""
import json
import os
import random
import signal
import subprocess
import time

import pytest

from conftest import CBT, cbt, qemu_img
from livelib import (BLOCK, MiB, View, assert_cut, assert_incremental,  # noqa: F401
                     cut_of, decode_block, live, make_image, now)
from livelib import state_dir  # noqa: F401 (autouse: a journal per test)

SIZE = 32 * MiB



def cbt_objects(peer):
    """What cbt has in QEMU: exports, jobs, nodes and bitmaps named cbt-*."""
    found = [e["id"] for e in peer.qmp("query-block-exports")
             if e["id"].startswith("cbt-")]
    found += [j["id"] for j in peer.qmp("query-jobs") if j["id"].startswith("cbt-")]
    for n in peer.qmp("query-named-block-nodes", flat=True):
        if n["node-name"].startswith("cbt-"):
            found.append(n["node-name"])
        found += [b["name"] for b in n.get("dirty-bitmaps", [])
                  if b.get("name", "").startswith("cbt-")
                  and not b["name"].startswith("cbt-2")]   # checkpoints: cbt-2026...
    return found


def wait_for_job(peer, p=None):
    """Until QEMU runs a cbt job (the point in time is held): True; False
    when process P ended first, or after a minute."""
    deadline = time.time() + 60
    while time.time() < deadline and (p is None or p.poll() is None):
        if any(j["id"].startswith("cbt-") for j in peer.qmp("query-jobs")):
            return True
        time.sleep(0.001)
    return False


def backup_while_writing(peer, w, disk, target, *args, writes=30,
                         stopped_at=None):
    """Run cbt backup --qmp; once QEMU holds the point in time (the
    fleecing job exists), stop cbt, let the writer make WRITES more writes
    (and call STOPPED_AT(), when given), then let cbt finish.  Returns
    (t0, t1) around the whole run."""
    t0 = now()
    p = subprocess.Popen([CBT, "backup", "--qmp", peer.cbt_qmp] + list(args) +
                         [disk, target], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    stopped = False
    try:
        if wait_for_job(peer, p):
            os.kill(p.pid, signal.SIGSTOP)
            stopped = True
            w.wait_writes(writes)
            if stopped_at:
                stopped_at()
            os.kill(p.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.wait()
    t1 = now()
    assert p.returncode == 0, "cbt backup failed: %s%s" % (out, err)
    assert stopped, "the backup ended before cbt could be stopped: %s" % out
    return t0, t1


def qsd_writing(live, seed):
    """qemu-storage-daemon holding a fresh disk, a writer going on it."""
    q = live.qsd(make_image(live.path("d.qcow2"), SIZE))
    w = live.writer(q, seed=seed).start()
    w.wait_writes(20)
    return q, w


def chain_start(live, peer, w, tmp_path, *how, disk="vm", stopped_at=None):
    """The folder bk and a full backup in it taken while the writer goes
    on (backup_while_writing, HOW its extra options): (bk, full, (tx,
    cut))."""
    bk = live.path("bk")
    os.mkdir(bk)
    full = os.path.join(bk, "full.qcow2")
    tx = backup_while_writing(peer, w, disk, full, *how, "--full",
                              stopped_at=stopped_at)
    return bk, full, (tx, assert_cut(w, full, tmp_path, tx))


def incremental_after(peer, w, tmp_path, full_cut, inc, *how, disk="vm",
                      stopped_at=None):
    """An incremental INC while the writer goes on: it must hold exactly
    what changed after the full's instant (full_cut: the full's (tx,
    cut)).  Its cut."""
    w.wait_writes(20)
    tx = backup_while_writing(peer, w, disk, inc, *how, "--incremental",
                              stopped_at=stopped_at)
    cut = assert_cut(w, inc, tmp_path, tx)
    assert_incremental(w, full_cut[1], full_cut[0], cut, tx, inc)
    return cut


def check_chain(live, w, tmp_path, peer, *how, disk="vm", stopped_at=None):
    """A full and an incremental while the writer goes on, each exact;
    both verify, the chain restores to the incremental's instant, and
    nothing of cbt's stays in QEMU or beside the backups."""
    bk, full, full_cut = chain_start(live, peer, w, tmp_path, *how,
                                     disk=disk, stopped_at=stopped_at)
    inc = os.path.join(bk, "inc1.qcow2")
    cut2 = incremental_after(peer, w, tmp_path, full_cut, inc, *how,
                             disk=disk, stopped_at=stopped_at)
    for b in (full, inc):
        cbt("verify", b)
    out = live.path("restored.qcow2")
    cbt("restore", inc, out)
    assert cut_of(w, View(out, str(tmp_path))).gens == cut2.gens
    assert cbt_objects(peer) == [], cbt_objects(peer)
    assert not [f for f in os.listdir(bk) if f.endswith(".scratch")]
    return cut2


def test_pull_full_and_incremental_on_qsd(live, tmp_path):
    q, w = qsd_writing(live, 11)
    check_chain(live, w, tmp_path, q)
    w.stop()
    # The checkpoints of the two backups are in QEMU, recording, and listed.
    res = cbt("checkpoint", "list", "--qmp", q.cbt_qmp, "--output=json", "vm")
    cps = res.json()["checkpoints"]
    assert len(cps) == 2 and all(c["usable"] for c in cps), cps


def test_pull_on_qemu_system(live, tmp_path):
    """qemu-system has no NBD server: cbt starts one on a private socket
    and stops it again."""
    a = make_image(live.path("a.qcow2"), SIZE)
    vm = live.vm([a])
    w = live.writer(vm, seed=12, rate=50).start()
    w.wait_writes(5)
    check_chain(live, w, tmp_path, vm, disk="vda")
    w.stop()
    # cbt's server is gone: a new one can start.
    vm.qmp("nbd-server-start", addr={"type": "unix", "data": {
        "path": live.sock("again.nbd")}})


def test_failed_backup_leaves_nothing(live, tmp_path):
    q = live.qsd(make_image(live.path("d.qcow2"), SIZE))
    bk = live.path("bk")
    os.mkdir(bk)
    cbt("backup", "--qmp", q.cbt_qmp, "--full", "vm",
        os.path.join(bk, "full.qcow2"))
    before = cbt("checkpoint", "list", "--qmp", q.cbt_qmp, "--output=json",
                 "vm").json()
    # A target whose scratch file cannot be made: a folder in the way.
    os.mkdir(os.path.join(bk, "inc.qcow2.scratch"))
    res = cbt("backup", "--qmp", q.cbt_qmp, "--incremental", "vm",
              os.path.join(bk, "inc.qcow2"), check=False)
    assert res.rc != 0 and "scratch" in res.err, res
    after = cbt("checkpoint", "list", "--qmp", q.cbt_qmp, "--output=json",
                "vm").json()
    assert [c["name"] for c in after["checkpoints"]] == \
        [c["name"] for c in before["checkpoints"]]
    assert cbt_objects(q) == []
    assert sorted(os.listdir(bk)) == ["full.qcow2", "full.qcow2.json",
                                      "full.qcow2.tree", "inc.qcow2.scratch"]


def test_new_checkpoint_removed_behind_cbt(live, tmp_path):
    """The new checkpoint's bitmap removed from QEMU while cbt copies: at
    the commit cbt finds it gone (one query of the disk's node), fails
    naming it, keeps no backup and no record of it, and the next
    incremental builds on the checkpoint before it."""
    q, w = qsd_writing(live, 47)
    bk, full, full_cut = chain_start(live, q, w, tmp_path)
    gone = os.path.join(bk, "gone.qcow2")
    p = subprocess.Popen([CBT, "backup", "--qmp", q.cbt_qmp, "--incremental",
                          "--checkpoint", "gone", "vm", gone],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert wait_for_job(q, p), p.communicate()
    os.kill(p.pid, signal.SIGSTOP)
    q.qmp("block-dirty-bitmap-remove", node="disk", name="gone")
    os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0, (out, err)
    assert "the new bitmap 'gone' is not there" in err, err
    assert not [f for f in os.listdir(bk) if f.startswith("gone.")]
    assert cbt_objects(q) == []
    names = [c["name"] for c in cbt("checkpoint", "list", "--qmp", q.cbt_qmp,
                                    "--output=json", "vm").json()
             ["checkpoints"]]
    assert "gone" not in names and len(names) == 1, names
    incremental_after(q, w, tmp_path, full_cut, os.path.join(bk, "inc.qcow2"))
    w.stop()


def test_killed_cbt_leaves_what_the_next_removes(live, tmp_path):
    q, w = qsd_writing(live, 13)
    bk, full, full_cut = chain_start(live, q, w, tmp_path)
    # An incremental killed once QEMU holds its point in time.
    p = subprocess.Popen([CBT, "backup", "--qmp", q.cbt_qmp, "--incremental",
                          "vm", os.path.join(bk, "dead.qcow2")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_job(q, p), "the backup ended before QEMU held its instant"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert cbt_objects(q), "the killed cbt left nothing to clean"
    incremental_after(q, w, tmp_path, full_cut, os.path.join(bk, "inc1.qcow2"))
    w.stop()
    assert cbt_objects(q) == []
    assert not os.path.exists(os.path.join(bk, "dead.qcow2.scratch"))
    # The killed backup's new checkpoint went too: QEMU has the full's
    # and the incremental's, nothing else.
    kept = {c["name"] for c in cbt(
        "checkpoint", "list", "--qmp", q.cbt_qmp, "--output=json",
        "vm").json()["checkpoints"]}
    assert qemu_bitmaps(q)["disk"] == kept and len(kept) == 2, \
        (qemu_bitmaps(q), kept)


def checkpoint_kept(q, target):
    """Is TARGET a backup whose checkpoint QEMU's disk keeps?"""
    if not os.path.exists(target + ".json"):
        return False
    with open(target + ".json") as f:
        name = json.load(f)["checkpoint"]["name"]
    return name in {c["name"] for c in cbt(
        "checkpoint", "list", "--qmp", q.cbt_qmp, "--output=json",
        "vm").json()["checkpoints"]}


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_killed_at_random_moments(live, tmp_path, mode):
    """SIGKILL of cbt at random moments of incrementals (before, during,
    after the transaction, while reading, while writing the target); each
    next run cleans up, and the final incremental, over the last backup
    that completed, is exact.  CBT_KILL_SEED repeats a run."""
    seed = int(os.environ.get("CBT_KILL_SEED", int(time.time() * 1000)))
    rnd = random.Random(seed)
    extra = ["--push"] if mode == "push" else []
    q = live.qsd(make_image(live.path("d.qcow2"), SIZE))
    w = live.writer(q, seed=seed % 1000).start()
    bk = live.path("bk")
    os.mkdir(bk)
    last = os.path.join(bk, "full.qcow2")
    cbt("backup", "--qmp", q.cbt_qmp, "--full", *extra, "vm", last)
    # An incremental run to the end: how long one takes.
    w.wait_writes(5)
    last = os.path.join(bk, "inc0.qcow2")
    t0 = now()
    cbt("backup", "--qmp", q.cbt_qmp, "--incremental", *extra, "vm", last)
    tx = (t0, now())
    cut = assert_cut(w, last, tmp_path, tx)
    took = (tx[1] - tx[0]) / 1e9
    moments = []
    for i in range(10):
        target = os.path.join(bk, "k%d.qcow2" % i)
        delay = rnd.uniform(0, took * 1.3)
        t0 = now()
        p = subprocess.Popen([CBT, "backup", "--qmp", q.cbt_qmp,
                              "--incremental", *extra, "vm", target],
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        t1 = now()
        moments.append((round(delay, 3), p.returncode))
        if p.returncode == 0 or checkpoint_kept(q, target):
            # It ended before the kill, or was killed once its checkpoint
            # was kept: the next parent.
            cut = assert_cut(w, target, tmp_path, (t0, t1))
            tx, last = (t0, t1), target
        elif os.path.exists(target + ".json"):
            # Killed between its manifest and its checkpoint's record: a
            # complete backup, whose checkpoint the next run removes.
            cbt("verify", target)
        w.wait_writes(5)
    note = "seed %d, one run %.3fs, (kind, delay, status) %s" % (seed, took, moments)
    print(note)
    w.wait_writes(20)
    inc = os.path.join(bk, "inc.qcow2")
    tx2 = backup_while_writing(q, w, "vm", inc, "--incremental", *extra)
    w.stop()
    cut2 = assert_cut(w, inc, tmp_path, tx2)
    assert_incremental(w, cut, tx, cut2, tx2, inc)
    assert cbt_objects(q) == [], note
    assert not [f for f in os.listdir(bk) if f.endswith(".scratch")], note
    kept = {c["name"] for c in cbt(
        "checkpoint", "list", "--qmp", q.cbt_qmp, "--output=json",
        "vm").json()["checkpoints"]}
    assert qemu_bitmaps(q)["disk"] == kept, (note, qemu_bitmaps(q), kept)
    cbt("verify", inc)
    out = live.path("r.qcow2")
    cbt("restore", inc, out)


def disk_gens(disk, tmp):
    """{block: generation} the closed DISK holds (its blocks written by a
    Writer); a QEMU killed mid-write may have kept or lost that write."""
    v = View(disk, tmp)
    gens = {}
    for b in range(SIZE // BLOCK):
        g = decode_block(v.block(b), b)
        assert g is not None, "block %d of %s is torn" % (b, disk)
        if g:
            gens[b] = g
    os.unlink(v.path)
    return gens


def test_qemu_killed_at_random_moments(live, tmp_path):
    """SIGKILL of QEMU at random moments of --auto backups, the guest
    writing: cbt fails clearly or completes, and what it completed is the
    disk at one instant of its run; once QEMU runs again the next --auto
    backups (a full or a rescan: the killed QEMU's checkpoints are void;
    then an incremental) restore to exactly the disk.  CBT_KILL_SEED repeats a
    run."""
    seed = int(os.environ.get("CBT_KILL_SEED", int(time.time() * 1000)))
    rnd = random.Random(seed)
    # Every block holds data: a full backup has all of it to read.
    disk = make_image(live.path("d.qcow2"), SIZE,
                      gens={b: 1 for b in range(SIZE // BLOCK)})
    bk = live.path("bk")
    os.mkdir(bk)

    def start(n):
        q = live.qsd(disk)
        return q, live.writer(q, seed=(seed + n) % 1000,
                              initial=disk_gens(disk, tmp_path)).start()

    q, w = start(0)
    w.wait_writes(5)
    t0 = now()
    cbt("backup", "--qmp", q.cbt_qmp, "--full", "vm",
        os.path.join(bk, "first.qcow2"))
    took = (now() - t0) / 1e9
    moments = []
    for i in range(6):
        w.wait_writes(5)
        if rnd.random() < 0.5:
            # A clean stop now and then: QEMU stores its bitmaps, the next
            # one opens them (in use), and its kill leaves them so.
            w.stop()
            q.quit()
            q, w = start(100 + i)
            w.wait_writes(5)
        target = os.path.join(bk, "k%d.qcow2" % i)
        kind = rnd.choice(["--auto", "--full"])   # a full reads for longer
        t0 = now()
        p = subprocess.Popen([CBT, "backup", "--qmp", q.cbt_qmp, kind,
                              "vm", target], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        delay = rnd.uniform(0, took * 1.3)
        time.sleep(delay)
        q.kill()
        w.stop(check=False)
        out, err = p.communicate(timeout=120)
        t1 = now()
        moments.append((kind[2], round(delay, 3), p.returncode))
        note = "seed %d, one run %.3fs, (kind, delay, status) %s" % (seed, took,
                                                               moments)
        if p.returncode == 0:
            # Done before QEMU died: the disk at one instant of the run.
            assert_cut(w, target, tmp_path, (t0, t1))
        else:
            # Failed: clearly, and no backup left behind under the name.
            assert err.strip() and "\x00" not in err, (note, err)
            assert not os.path.exists(target + ".json"), note
        for f in sorted(os.listdir(bk)):
            if f.endswith(".qcow2") and os.path.exists(
                    os.path.join(bk, f + ".json")):
                cbt("verify", os.path.join(bk, f))
        q, w = start(i + 1)
    print(note)
    w.wait_writes(10)
    # The last QEMU was never killed while cbt ran: --auto knows the old
    # checkpoints are void and takes a full, or a rescan when the newest
    # one's backup is in the folder; then an incremental follows.
    full = os.path.join(bk, "again.qcow2")
    res = cbt("backup", "--qmp", q.cbt_qmp, "--auto", "vm", full)
    assert ("full backup instead" in res.out + res.err or
            "rescanned the whole disk instead" in res.err), (note, res)
    w.wait_writes(20)
    w.stop()
    inc = os.path.join(bk, "after.qcow2")
    res = cbt("backup", "--qmp", q.cbt_qmp, "--auto", "--output=json", "vm",
              inc)
    assert res.json()["kind"] == "incremental", (note, res.out)
    assert not [f for f in os.listdir(bk) if f.endswith(".scratch")], note
    q.quit()
    out_img = live.path("r.qcow2")
    cbt("restore", inc, out_img)
    res = qemu_img("compare", disk, out_img, check=False)
    assert res.rc == 0, (note, res)


# ---- every disk at one instant (--all-disks) ----


def qemu_bitmaps(peer):
    """{node: {bitmap names}} as QEMU has them."""
    return {n["node-name"]: {b["name"] for b in n.get("dirty-bitmaps", [])
                             if b.get("name")}
            for n in peer.qmp("query-named-block-nodes", flat=True)
            if n["drv"] == "qcow2"}


def test_all_disks_at_one_instant(live, tmp_path):
    a = make_image(live.path("a.qcow2"), SIZE)
    b = make_image(live.path("b.qcow2"), SIZE)
    vm = live.vm([a, b])
    wa = live.writer(vm, device="vda", seed=21, rate=40).start()
    wb = live.writer(vm, device="vdb", seed=22, rate=40).start()
    wa.wait_writes(3)
    wb.wait_writes(3)
    bk = live.path("bk")
    os.mkdir(bk)
    cuts = {}
    for kind, name in (("--full", "c1"), ("--incremental", "c2")):
        t0 = now()
        res = cbt("backup", "--qmp", vm.cbt_qmp, "--all-disks", kind,
                  "--checkpoint", name, "--output=json", bk)
        t1 = now()
        got = {r["disk"]: r for r in res.json()}
        assert set(got) == {"vda", "vdb"}, got
        for dev, w in (("vda", wa), ("vdb", wb)):
            cuts[dev, name] = assert_cut(w, got[dev]["target"], tmp_path,
                                         (t0, t1))
        # One instant for both disks: their windows meet.
        lo = max(c.lo or 0 for (d, n), c in cuts.items() if n == name)
        hi = min(c.hi or t1 for (d, n), c in cuts.items() if n == name)
        assert lo < hi, "the disks' backups are no common instant: %r" % cuts
        wa.wait_writes(3)
        wb.wait_writes(3)
    wa.stop()
    wb.stop()
    for dev in ("vda", "vdb"):
        inc = os.path.join(bk, "%s.c2.qcow2" % dev)
        cbt("verify", inc)
    bms = qemu_bitmaps(vm)
    assert {"c1", "c2"} <= bms["disk"] and {"c1", "c2"} <= bms["disk1"], bms
    assert cbt_objects(vm) == []


def test_all_disks_killed_at_random_moments(live, tmp_path):
    """--all-disks runs killed at random moments: the next run cleans up,
    finds a free checkpoint name although the killed runs' files (and
    perhaps manifests) carry theirs, and backs up every disk at one
    instant again."""
    seed = int(os.environ.get("CBT_KILL_SEED", int(time.time() * 1000)))
    rnd = random.Random(seed)
    a = make_image(live.path("a.qcow2"), SIZE)
    b = make_image(live.path("b.qcow2"), SIZE)
    vm = live.vm([a, b])
    wa = live.writer(vm, device="vda", seed=seed % 997, rate=40).start()
    bk = live.path("bk")
    os.mkdir(bk)
    cbt("backup", "--qmp", vm.cbt_qmp, "--all-disks", "--full", bk)
    t0 = now()
    cbt("backup", "--qmp", vm.cbt_qmp, "--all-disks", "--incremental", bk)
    took = (now() - t0) / 1e9
    moments = []
    for i in range(6):
        delay = rnd.uniform(0, took * 1.3)
        p = subprocess.Popen([CBT, "backup", "--qmp", vm.cbt_qmp,
                              "--all-disks", "--incremental", bk],
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        moments.append((round(delay, 3), p.returncode))
    note = "seed %d, one run %.3fs, (kind, delay, status) %s" % (seed, took, moments)
    print(note)
    t0 = now()
    res = cbt("backup", "--qmp", vm.cbt_qmp, "--all-disks", "--incremental",
              "--output=json", bk)
    t1 = now()
    wa.stop()
    got = {r["disk"]: r for r in res.json()}
    assert set(got) == {"vda", "vdb"}, (note, got)
    assert_cut(wa, got["vda"]["target"], tmp_path, (t0, t1))
    for r in got.values():
        cbt("verify", r["target"])
    assert cbt_objects(vm) == [], note
    assert not [f for f in os.listdir(bk) if f.endswith(".scratch")], note
    for node, dev in (("disk", "vda"), ("disk1", "vdb")):
        kept = {c["name"] for c in cbt(
            "checkpoint", "list", "--qmp", vm.cbt_qmp, "--output=json",
            dev).json()["checkpoints"]}
        assert qemu_bitmaps(vm)[node] == kept, (note, dev, kept)


def test_all_disks_undone_when_one_fails(live):
    a = make_image(live.path("a.qcow2"), SIZE)
    b = make_image(live.path("b.qcow2"), SIZE)
    vm = live.vm([a, b])
    bk = live.path("bk")
    os.mkdir(bk)
    cbt("backup", "--qmp", vm.cbt_qmp, "--all-disks", "--full",
        "--checkpoint", "c1", bk)
    before_bm = qemu_bitmaps(vm)
    before_files = sorted(os.listdir(bk))
    # The second disk's scratch file cannot be made.
    os.mkdir(os.path.join(bk, "vdb.c2.qcow2.scratch"))
    res = cbt("backup", "--qmp", vm.cbt_qmp, "--all-disks", "--incremental",
              "--checkpoint", "c2", bk, check=False)
    assert res.rc != 0 and "vdb" in res.err, res
    assert qemu_bitmaps(vm) == before_bm, "a new checkpoint stayed"
    assert sorted(os.listdir(bk)) == sorted(before_files +
                                            ["vdb.c2.qcow2.scratch"])
    assert cbt_objects(vm) == []
    # Once the way is clear, the same backup runs.
    os.rmdir(os.path.join(bk, "vdb.c2.qcow2.scratch"))
    cbt("backup", "--qmp", vm.cbt_qmp, "--all-disks", "--incremental",
        "--checkpoint", "c2", bk)


def test_all_disks_undone_after_the_instant(live):
    """The transaction made the new checkpoint on both disks; then writing
    the second disk's backup fails (ENOSPC): both new checkpoints go, the
    first disk's finished files too, the old checkpoints stay."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from faultlib import fault_env
    a = make_image(live.path("a.qcow2"), SIZE)
    b = make_image(live.path("b.qcow2"), SIZE)
    vm = live.vm([a, b])
    with open(live.path("pat"), "wb") as f:
        f.write(b"\x5a" * 4096)
    vm.hmp_write("vdb", 0, BLOCK, live.path("pat"))
    bk = live.path("bk")
    os.mkdir(bk)
    cbt("backup", "--qmp", vm.cbt_qmp, "--all-disks", "--full",
        "--checkpoint", "c1", bk)
    before_bm = qemu_bitmaps(vm)
    before_files = sorted(os.listdir(bk))
    env = fault_env("vdb.c2.qcow2.part", op="write", nth=1, sticky=True,
                    err="ENOSPC")
    res = subprocess.run([CBT, "backup", "--qmp", vm.cbt_qmp, "--all-disks",
                          "--full", "--checkpoint", "c2", bk],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 74 and "vdb" in res.stderr, res
    assert qemu_bitmaps(vm) == before_bm, "a new checkpoint stayed"
    assert sorted(os.listdir(bk)) == before_files
    assert cbt_objects(vm) == []
    res = cbt("checkpoint", "list", "--qmp", vm.cbt_qmp, "--output=json",
              "vda")
    assert [c["name"] for c in res.json()["checkpoints"]] == ["c1"]


def test_target_that_cannot_be_made(live):
    """The target file cannot be made (ENOSPC at its first write), after
    QEMU took the point in time: the backup fails with the disk-full
    status, the new checkpoint goes, no file of the backup stays, nothing
    of cbt's stays in QEMU, and the same backup runs once the disk has
    room."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from faultlib import fault_env
    q = live.qsd(make_image(live.path("d.qcow2"), SIZE, gens={3: 1}))
    bk = live.path("bk")
    os.mkdir(bk)
    cbt("backup", "--qmp", q.cbt_qmp, "--full", "--checkpoint", "c1", "vm",
        os.path.join(bk, "full.qcow2"))
    before_bm = qemu_bitmaps(q)
    before_files = sorted(os.listdir(bk))
    env = fault_env("inc.qcow2.part", op="write", nth=1, sticky=True,
                    err="ENOSPC")
    res = subprocess.run([CBT, "backup", "--qmp", q.cbt_qmp, "--incremental",
                          "--checkpoint", "c2", "vm",
                          os.path.join(bk, "inc.qcow2")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 74 and "inc.qcow2" in res.stderr, res
    assert qemu_bitmaps(q) == before_bm, "a new checkpoint stayed"
    assert sorted(os.listdir(bk)) == before_files
    assert cbt_objects(q) == []
    cbt("backup", "--qmp", q.cbt_qmp, "--incremental", "--checkpoint", "c2",
        "vm", os.path.join(bk, "inc.qcow2"))


def test_real_guest(live, tmp_path):
    """A real Linux guest writes realvm's workload (O_DIRECT chunks) while
    cbt takes a full and an incremental backup over QMP; once the guest
    synced, a last incremental: the chain restores to realvm's model of
    every write, so no backup missed a write across its instant."""
    disk = live.path("guest.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, 64 * MiB)
    g = live.realvm(disk, seed=7, count=24, pause=0.1)
    bk = live.path("bk")
    os.mkdir(bk)
    g.wait_written(4)
    cbt("backup", "--qmp", g.cbt_qmp, "--full", disk,
        os.path.join(bk, "full.qcow2"))
    g.wait_written(12)
    cbt("backup", "--qmp", g.cbt_qmp, "--incremental", disk,
        os.path.join(bk, "inc1.qcow2"))
    g.wait_synced()
    cbt("backup", "--qmp", g.cbt_qmp, "--incremental", disk,
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
    for name in ("full.qcow2", "inc1.qcow2", "inc2.qcow2"):
        cbt("verify", os.path.join(bk, name))


# ---- push: QEMU writes the data ----


def test_push_full_and_incremental(live, tmp_path):
    q, w = qsd_writing(live, 41)
    check_chain(live, w, tmp_path, q, "--push")
    w.stop()


@pytest.mark.parametrize("mode", ["pull", "push"])
def test_scratch_node_never_flushes_to_disk(live, tmp_path, mode):
    """The scratch node (and its file node) are added with cache.no-flush:
    what QEMU writes there lives only as long as the backup, so neither
    the job nor the node's deletion makes the host write it to the disk
    (a push's whole dirty set would be fdatasync'd only to be unlinked).
    The backup is exact all the same: QEMU still writes the qcow2
    metadata out to the file, which a push's reading needs."""
    q, w = qsd_writing(live, 43)
    how = ["--push"] if mode == "push" else []
    seen = []

    def look():
        seen.extend((n["node-name"], n["cache"])
                    for n in q.qmp("query-named-block-nodes")
                    if n["node-name"].startswith("cbt-") and
                    "scratch" in n["node-name"])

    check_chain(live, w, tmp_path, q, *how, stopped_at=look)
    w.stop()
    # Each backup: the scratch node and its file node.
    assert len(seen) == 4, seen
    assert all(c["no-flush"] for _, c in seen), seen


def test_push_by_itself_when_the_server_is_tcp(live, tmp_path):
    """qemu-storage-daemon serving NBD on TCP only: cbt cannot read it over
    a Unix socket, says so and lets QEMU push; the backup is exact."""
    import socket as s
    port = s.socket()
    port.bind(("127.0.0.1", 0))
    p = port.getsockname()[1]
    port.close()
    disk = make_image(live.path("d.qcow2"), SIZE, gens={3: 1, 9: 2})
    qmp = live.sock("tcp.qmp")
    proc = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", "file,node-name=disk-file,filename=%s" % disk,
        "--blockdev", "qcow2,node-name=disk,file=disk-file",
        "--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=%d" % p,
        "--export", "type=nbd,id=vm,node-name=disk,name=disk,writable=on",
        "--chardev", "socket,id=q,path=%s,server=on,wait=off" % qmp,
        "--monitor", "chardev=q"], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            if os.path.exists(qmp):
                break
            time.sleep(0.01)
        bk = live.path("bk")
        os.mkdir(bk)
        res = cbt("backup", "--qmp", qmp, "--full", "vm",
                  os.path.join(bk, "full.qcow2"))
        assert "--push" in res.err and "cannot reach" in res.err, res
        out = live.path("r.qcow2")
        cbt("restore", os.path.join(bk, "full.qcow2"), out)
    finally:
        proc.terminate()
        proc.wait()
    res = qemu_img("compare", disk, out, check=False)
    assert res.rc == 0, res
