"""cbt repo prune under faults: SIGKILL at any moment, a full disk, a
failed flush (issue 13, section 2: "Crash-safe").

The folder: a full backup and four incrementals of a 16 MiB disk (qemu-io
writes, zero-writes and discards between them), each backup's state saved
from the disk with `qemu-img convert` at backup time.  `cbt repo prune
--keep-daily 2 --force` (creation times set so that i2 and i4 are the
newest points of two days) merges f and i1 into i2 in one step and i3 into
i4 in another (each: new manifests, journal, data merged into the bottom
retired image, renames, removals; raw chains: one point a step).  Faults land on the files of the folder:

  * SIGKILL as soon as libfault's trace shows the Nth write or flush call
    in the folder (every N up to 10, then 10 more sampled up to the last),
    and after a random delay;
  * a kill of the cbt that finishes the interrupted step (the replay), at
    a random call of its own;
  * ENOSPC on every write from the Nth on (a full disk), EIO on one flush.

After each: every point `cbt repo list` shows is sound (no broken point, no
leftover but a prune's own new manifests when the kill came before the
journal), every kept point -- and every point the prune had not retired yet
-- restores (`cbt restore`, which first finishes a step the kill
interrupted) to exactly its saved state (`qemu-img compare`) and passes
`cbt verify`, and no image in the folder has corruption (`qemu-img check`).
Then the same prune, run again without faults, ends with exactly the kept
points, still right.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import faultlib as F  # noqa: E402
from conftest import cbt, qemu_img  # noqa: E402
from repolib import Repo, set_created  # noqa: E402

KEPT = ["i2.img", "i4.img"]
# Two steps: f and i1 go into i2 at once, i3 into i4 (creation times are
# set so that i2 is the newest point of its day, i4 of the next).
PRUNE = ["repo", "prune", "--keep-daily", "2", "--force"]
TIMES = {"f.img": "2026-05-01T08:00:00Z", "i1.img": "2026-05-01T09:00:00Z",
         "i2.img": "2026-05-01T10:00:00Z", "i3.img": "2026-05-02T08:00:00Z",
         "i4.img": "2026-05-02T09:00:00Z"}
SEED = 1313


_PRISTINE = {}


def make_pristine(tmp_path_factory, fmt):
    if fmt not in _PRISTINE:
        tmp = tmp_path_factory.mktemp("repo-faults-" + fmt)
        r = Repo(tmp, fmt=fmt)
        r.write("write -P 1 0 6M", "write -P 7 12M 1M")
        r.backup("f.img", "--full")
        for k in range(1, 5):
            r.write("write -P %d %dM 1M" % (10 + k, k),
                    "write -z %dM 64k" % (12 + k % 3), "discard %dM 128k" % (4 + k))
            r.backup("i%d.img" % k)
        set_created(r.bk, TIMES)
        _PRISTINE[fmt] = r
    return _PRISTINE[fmt]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_pristine(tmp_path_factory, "qcow2")


def case(pristine, tmp):
    """A fresh copy of the folder in tmp/bk, sharing the saved states."""
    bk = tmp / "bk"
    if bk.exists():
        shutil.rmtree(bk)
    shutil.copytree(pristine.bk, bk)
    r = Repo.__new__(Repo)
    r.tmp, r.bk, r.fmt, r.states, r.disk = tmp, bk, pristine.fmt, pristine.states, None
    return r


def check_after(r, what):
    """Every kept point restores right (restore first finishes a step the
    kill interrupted), every point still there verifies, the folder is
    sound; the prune then finishes and leaves the kept points."""
    for name in KEPT:
        r.assert_point(name, leaks_ok=True)
    listing = r.list()
    assert listing["broken"] == 0, (what, listing)
    kinds = {l["kind"] for l in listing["leftovers"]}
    assert kinds <= {"prune-new"}, (what, listing["leftovers"])
    for p in listing["points"]:
        if p["file"] not in KEPT:
            cbt("verify", r.bk / p["file"])
    for n in os.listdir(r.bk):
        if n.endswith(".img") and r.fmt == "qcow2":
            res = qemu_img("check", "-f", "qcow2", r.bk / n, check=False)
            assert res.rc in (0, 3), (what, n, res)   # leaks are no damage
    cbt(*PRUNE, r.bk)
    listing = r.list()
    assert sorted(p["file"] for p in listing["points"]) == KEPT, what
    assert listing["leftovers"] == [] and listing["broken"] == 0, what
    for name in KEPT:
        cbt("verify", r.bk / name)


def folder_calls(r, op):
    """Write or flush calls a clean prune makes on the folder's files."""
    res, counts = F.run_faulty(PRUNE + [r.bk], str(r.bk), op=op)
    assert res.rc == 0, res
    return counts["matching"]


def test_sigkill_at_every_step(pristine, tmp):
    op = "any"
    r = case(pristine, tmp)
    total = folder_calls(r, op)
    assert total > 20, total      # both steps' calls
    rng = random.Random(SEED)
    after_commit = before_commit = 0
    for n in F.sample_ns(total, first=10, extra=10, seed=SEED):
        r = case(pristine, tmp)
        acted, rc, seen, err = F.run_traced(PRUNE + [r.bk], str(r.bk), n,
                                            lambda p: p.send_signal(signal.SIGKILL),
                                            op=op)
        what = "kill at %s call %d of %d" % (op, n, total)
        assert acted or rc == 0, (what, rc, err)
        names = os.listdir(r.bk)
        journal = "cbt-prune.journal" in names
        after_commit += journal
        before_commit += not journal and any(x.endswith(".prune-new") for x in names)
        if journal and rng.random() < 0.5:
            # Kill the replay too, at a random call of its own.
            m = rng.randrange(1, 40)
            F.run_traced(["repo", "list", r.bk], str(r.bk), m,
                         lambda p: p.send_signal(signal.SIGKILL))
            what += ", replay killed at call %d" % m
        check_after(r, what)
    # The sample reaches both sides of the commit point.
    assert after_commit >= 3 and before_commit >= 1, (after_commit, before_commit)


def test_sigkill_after_a_random_delay(pristine, tmp):
    r = case(pristine, tmp)
    t0 = time.monotonic()
    cbt(*PRUNE, r.bk)
    clean = time.monotonic() - t0
    rng = random.Random(SEED + 1)
    for i in range(6):
        r = case(pristine, tmp)
        delay = rng.uniform(0, 1.2 * clean)
        p = subprocess.Popen([F.CBT] + [str(a) for a in PRUNE + [r.bk]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        check_after(r, "kill after %.3f s" % delay)


@pytest.mark.parametrize("fmt,err,op,sticky", [("qcow2", "ENOSPC", "write", True),
                                               ("qcow2", "EIO", "flush", False),
                                               ("raw", "EIO", "flush", False)])
def test_full_disk_and_failed_flush(tmp_path_factory, tmp, fmt, err, op, sticky):
    """A failed flush stops the prune exactly there: every flush call is
    tried, so among them are the ones right after a step's data rename,
    where the chain is whole again only through the journal's replay."""
    pristine = make_pristine(tmp_path_factory, fmt)
    r = case(pristine, tmp)
    total = folder_calls(r, op)
    ns = (range(1, total + 1) if op == "flush"
          else F.sample_ns(total, first=6, extra=6, seed=SEED))
    pending = 0
    for n in ns:
        r = case(pristine, tmp)
        res, c = F.run_faulty(PRUNE + [r.bk], str(r.bk), op=op, nth=n,
                              sticky=sticky, err=err)
        what = "%s on %s call %d of %d" % (err, op, n, total)
        assert c["injected"] >= 1, what
        assert res.rc == 74, (what, res)
        assert F.ERRTEXT[err] in res.err, (what, res)
        if os.path.exists(r.bk / "cbt-prune.journal"):
            pending += 1
            assert "finished when cbt next opens the folder" in res.err, (what, res)
        check_after(r, what)
    assert pending >= 3, pending
