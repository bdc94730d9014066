"""Backups that fail, and checkpoints that drifted (issue 5, section 6).

The disk (a two-layer qcow2 chain, 16 MiB: disk0.qcow2 <- disk1.qcow2 made
by cbt snapshot) has two checkpoints, c1 (full backup b1) and c2
(incremental b2), and changes written after c2.  It is built once; every
case works on a fresh copy of its folder (disk/ and repo/), so the guest
view of the disk is always the reference made once with `qemu-img convert`.

Faults (the backup being checked makes checkpoint c3 into repo/b3):
  * SIGKILL after a random delay (0 .. 1.2 times a clean run), and at about
    the Nth write or flush call on any file of the case (disk or repo;
    tests/fault/libfault.so's trace mode tells the calls as they happen,
    the test kills the process group when it has seen call N, so the kill
    lands at or shortly after call N);
  * the repository out of space (libfault: ENOSPC on every write to repo/
    from the Nth on), one failed flush there (EIO), and failed writes to
    the disk's top (where the checkpoint is written).
After each: the disk's checkpoints are exactly as before (`cbt checkpoint
list --output=json`, every layer's bitmaps by `cbt bitmap --list` and
`--sha256`), or -- the checkpoint landed: a kill after its store, or an
error too late to undo on a full disk -- as before plus a usable c3 with b3
complete; `qemu-img check` finds no corruption in the disk; no complete
manifest is left for a failed b3 (an injected error: no b3 files at all;
a kill may leave a complete b3.json no checkpoint points to, which must
still verify); the NEXT incremental (b4, checkpoint c4) succeeds, has the right
parent, and is correct: its manifest root is the reference's and
`qemu-img compare` of the b4 chain with the reference finds them equal.

Drift (section "Checkpoint drift"): a checkpoint bitmap removed behind
cbt's back (qemu-img bitmap --remove), disabled behind its back, re-added
with another granularity, a bitmap without checkpoint metadata, bitmaps
left inconsistent (in-use) by a SIGKILLed `cbt io` writer, an overlay made
by qemu-img (no checkpoints).  `cbt checkpoint reconcile` explains each
(names the checkpoint and the problem), `cbt backup --incremental` refuses
with the reason and changes nothing, `--auto` takes a full backup and says
why (the JSON result's "fallback"), `reconcile --fix` repairs, and the
chain of backups goes on correctly afterwards.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_TESTS, os.path.join(_TESTS, "interop"), _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)
import faultlib as F  # noqa: E402
import interop_lib as L  # noqa: E402
import test_backup_random as R  # noqa: E402
from interop_lib import KiB, MiB, qemu_img  # noqa: E402

SIZE = 16 * MiB
SEED = 7300 + R.SEED_BASE
LAYERS = ["disk0.qcow2", "disk1.qcow2"]
TOP = LAYERS[-1]


def qio(path, *cmds):
    L.qemu_io("-f", "qcow2", *L.io_args(cmds), path)


def rand_cmds(rng, n, size=SIZE):
    return L.random_workload(rng.randrange(1 << 30), size, 64 * KiB, n)


# --------------------------------------------------------------------------
# The pristine case folder, built once


_PRISTINE = {}


def pristine(tmp_path_factory):
    """Folder with disk/ (two layers, checkpoints c1 c2, changes since c2),
    repo/ (b1 full, b2 incremental) and ref.raw (the disk's guest view),
    plus the reference root."""
    if "d" in _PRISTINE:
        return _PRISTINE["d"]
    root = str(tmp_path_factory.mktemp("bkfaults") / "pristine")
    disk, repo = os.path.join(root, "disk"), os.path.join(root, "repo")
    os.makedirs(disk)
    os.makedirs(repo)
    rng = random.Random(SEED)
    d0 = os.path.join(disk, LAYERS[0])
    qemu_img("create", "-q", "-f", "qcow2", d0, SIZE)
    qio(d0, "write -P 0x11 0 6M", "write -P 0x12 8M 3M", *rand_cmds(rng, 30))
    L.cbt_ok("backup", "--full", "--checkpoint", "c1", "disk0.qcow2", "../repo/b1.qcow2",
             cwd=disk)
    qio(d0, *rand_cmds(rng, 20))
    L.cbt_ok("snapshot", "disk0.qcow2", TOP, cwd=disk)
    qio(os.path.join(disk, TOP), *rand_cmds(rng, 20))
    L.cbt_ok("backup", "--incremental", "--checkpoint", "c2", TOP, "../repo/b2.qcow2",
             cwd=disk)
    qio(os.path.join(disk, TOP), "write -P 0x33 12M 1M", *rand_cmds(rng, 40))
    ref = os.path.join(root, "ref.raw")
    qemu_img("convert", "-O", "raw", os.path.join(disk, TOP), ref)
    _PRISTINE["d"] = root
    _PRISTINE["root"] = R.block_root(ref)[0]
    _PRISTINE["state"] = disk_state(disk)
    return root


@pytest.fixture(scope="module")
def pristine_dir(tmp_path_factory):
    return pristine(tmp_path_factory)


class Case:
    """A fresh copy of the pristine folder."""

    def __init__(self, pristine_dir, dest):
        self.root = str(dest)
        if os.path.exists(self.root):
            shutil.rmtree(self.root)
        shutil.copytree(pristine_dir, self.root)
        self.disk = os.path.join(self.root, "disk")
        self.repo = os.path.join(self.root, "repo")
        self.ref = os.path.join(self.root, "ref.raw")

    def top(self):
        return os.path.join(self.disk, TOP)

    def target(self, n, fmt="qcow2"):
        return os.path.join(self.repo, "b%d.%s" % (n, fmt))

    def repo_files(self):
        return sorted(os.listdir(self.repo))


def disk_state(disk):
    """The checkpoints and every layer's bitmaps (list entries, sha256)."""
    cps = L.cbt_json("checkpoint", "list", "--output=json", TOP, cwd=disk)
    layers = {n: F.bitmap_state(os.path.join(disk, n)) for n in LAYERS}
    return {"checkpoints": cps, "layers": layers}


def names_of(state):
    return [c["name"] for c in state["checkpoints"]["checkpoints"]]


def without(state, name):
    """STATE without checkpoint NAME (its metadata and its bitmaps)."""
    cps = dict(state["checkpoints"])
    cps["checkpoints"] = [c for c in cps["checkpoints"] if c["name"] != name]
    layers = {n: {b: v for b, v in bm.items() if b != name}
              for n, bm in state["layers"].items()}
    return {"checkpoints": cps, "layers": layers}


def disk_check(c, what):
    for n in LAYERS:
        rc, data, res = L.qemu_check(os.path.join(c.disk, n))
        assert rc in (0, 3) and data and not data.get("corruptions") and \
            not data.get("check-errors"), "%s: qemu-img check %s: %r" % (what, n, res)


def next_incremental(c, expect_parent, what, n=4):
    """The next incremental (bN, checkpoint cN) succeeds and is correct."""
    t = c.target(n)
    res = L.cbt_rc("backup", "--incremental", "--checkpoint", "c%d" % n, "--output=json",
                   TOP, t, cwd=c.disk)
    label = "%s; then the next incremental into %s" % (what, os.path.basename(t))
    assert res.rc == 0, "%s failed: %r" % (label, res)
    man = R.manifest_of(t)
    assert man["kind"] == "incremental" and man["complete"] is True, "%s: %s" % (label, man)
    par = (man.get("parent") or {}).get("file")
    assert par == expect_parent, "%s: parent %r, expected %r" % (label, par, expect_parent)
    assert man["hash"]["root"] == _PRISTINE["root"], \
        "%s: manifest root differs from the reference's" % label
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", t, c.ref, check=False)
    assert cmp.rc == 0, "%s: the backup chain differs from the disk: %r" % (label, cmp)
    return t


def check_after_failure(c, what, injected, killed_state=None):
    """The disk's checkpoints as before (or as before plus c3, b3 complete,
    after a kill), disk clean, no complete b3 manifest; the next
    incremental is correct.  Returns "before" or "after" (c3 landed)."""
    before = _PRISTINE["state"]
    after = disk_state(c.disk)
    disk_check(c, what)
    b3 = c.target(3)
    names = names_of(after)
    if "c3" in names:
        # the checkpoint landed (a kill after its store, or a failure too
        # late to undo it on a full disk): then b3 must be complete and c3
        # usable, or the next incremental is impossible
        assert without(after, "c3") == before, \
            "%s: the old checkpoints changed:\nbefore %s\nafter  %s" % (
                what, json.dumps(before)[:3000], json.dumps(after)[:3000])
        c3 = [x for x in after["checkpoints"]["checkpoints"] if x["name"] == "c3"][0]
        assert c3["usable"], "%s: c3 was left on the disk broken: %s" % (what, c3)
        assert os.path.exists(b3 + ".json"), \
            "%s: c3 is on the disk but its backup was removed (%s)" % (what, c.repo_files())
        man = R.manifest_of(b3)
        assert man["complete"] is True and man["hash"]["root"] == _PRISTINE["root"], what
        res, data = R.verify_json(b3)
        assert data.get("ok") is True, "%s: b3 exists with c3 but does not verify: %r" % (
            what, res)
        next_incremental(c, "b3.qcow2", what)
        return "after"
    assert after == before, "%s: the checkpoints changed:\nbefore %s\nafter  %s" % (
        what, json.dumps(before)[:3000], json.dumps(after)[:3000])
    left = [f for f in c.repo_files() if f.startswith("b3")]
    if injected:
        assert not left, "%s: the failed backup left %s in the repository" % (what, left)
    elif os.path.exists(b3 + ".json"):
        # killed between the manifest's rename and the checkpoint's store:
        # a complete backup nobody's checkpoint points to; it must still
        # be right, and it must not disturb the next incremental
        res, data = R.verify_json(b3)
        assert data.get("ok") is True, "%s: b3.json left complete but b3 does not " \
            "verify: %r" % (what, res)
    next_incremental(c, "b2.qcow2", what)
    return "before"


# --------------------------------------------------------------------------
# SIGKILL


MODES = {
    "incremental": ["--incremental"],
    "full": ["--full"],
    "differential": ["--since", "c1"],
    "full-raw": ["--full", "-O", "raw"],
}


def backup_argv(mode, target):
    """The disk by its absolute path (libfault matches opened paths)."""
    disk = os.path.join(os.path.dirname(os.path.dirname(target)), "disk", TOP)
    return ["backup"] + MODES[mode] + ["--checkpoint", "c3", disk, target]


def run_killed_after(argv, cwd, delay):
    p = subprocess.Popen([L.CBT] + argv, cwd=cwd, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        p.wait(delay)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        killed = True
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    return killed, p.returncode, err


def run_killed_at_call(argv, cwd, path, n, op="any"):
    """Run cbt with libfault tracing every write/flush call on files whose
    path contains PATH; SIGKILL the process group once call N is seen.
    Returns (killed, rc, last call seen, stderr tail)."""
    return F.run_traced(argv, path, n, lambda p: os.killpg(p.pid, signal.SIGKILL),
                        op=op, cwd=cwd, new_session=True)


def clean_run(pristine_dir, tmp_path, mode):
    """A backup without faults: it succeeds, c3 and b3 are right; returns
    its duration and the number of write/flush calls on the case folder."""
    c = Case(pristine_dir, tmp_path / "clean")
    t0 = time.monotonic()
    res, counts = F.run_faulty(backup_argv(mode, c.target(3, "raw" if "raw" in mode
                                                          else "qcow2")),
                               "/clean/", cwd=c.disk)
    took = time.monotonic() - t0
    assert res.rc == 0, res
    assert "c3" in names_of(disk_state(c.disk)), res
    shutil.rmtree(c.root)
    return took, counts["matching"]


class Ran:
    """What a killed (or finished) run left, in conftest.Result's shape."""

    def __init__(self, rc, err):
        self.rc, self.out, self.err = rc, "", err

    def __repr__(self):
        return "rc=%s\nstderr:\n%s" % (self.rc, self.err[-3000:])


def kill_outcome(c, mode, what, killed, rc, err):
    L.no_crash(Ran(0 if killed else rc, err), what)
    if not killed:
        assert rc == 0, "%s: finished by itself with rc %s: %s" % (what, rc, err)
    if "raw" in mode:
        # the next incremental needs a qcow2 parent chain: only the state
        # checks apply when b3 is raw and landed
        state = disk_state(c.disk)
        before = _PRISTINE["state"]
        if "c3" in names_of(state):
            assert without(state, "c3") == before, what
            res, data = R.verify_json(c.target(3, "raw"))
            assert data.get("ok") is True, "%s: %r" % (what, res)
            return "after"
        assert state == before, "%s: the checkpoints changed" % what
        disk_check(c, what)
        next_incremental(c, "b2.qcow2", what)
        return "before"
    return check_after_failure(c, what, injected=False)


@pytest.mark.parametrize("mode", ["incremental", "full", "differential", "full-raw"])
def test_sigkill_after_random_delay(pristine_dir, tmp_path, mode):
    clean_run(pristine_dir, tmp_path, mode)
    # The delays come from plain runs (no fault library), timed the way the
    # killed runs are: the fastest of three, which can be only a few
    # milliseconds long (the first run after setting up is often slower).
    took = None
    for i in range(3):
        c = Case(pristine_dir, tmp_path / ("timed%d" % i))
        argv = backup_argv(mode, c.target(3, "raw" if "raw" in mode else "qcow2"))
        t0 = time.monotonic()
        killed, rc, err = run_killed_after(argv, c.disk, 60)
        t = time.monotonic() - t0
        assert not killed and rc == 0, err
        shutil.rmtree(c.root)
        took = t if took is None else min(took, t)
    rng = random.Random(SEED + len(mode))
    kills = 0
    for i in range(10):
        delay = rng.uniform(0.05, 0.9) * took
        c = Case(pristine_dir, tmp_path / "kill")
        t = c.target(3, "raw" if "raw" in mode else "qcow2")
        argv = backup_argv(mode, t)
        killed, rc, err = run_killed_after(argv, c.disk, delay)
        what = "cbt %s SIGKILLed after %.3f s (a clean run takes %.3f s)" % (
            " ".join(argv), delay, took)
        kill_outcome(c, mode, what, killed, rc, err)
        kills += killed
        if kills == 4:
            break
    assert kills, "no run was killed (a clean run takes %.3f s)" % took


@pytest.mark.parametrize("mode", ["incremental", "differential"])
def test_sigkill_at_nth_call(pristine_dir, tmp_path, mode):
    """Kills spread over every write and flush call the backup makes on the
    case's files (the repository's and the disk's)."""
    _, total = clean_run(pristine_dir, tmp_path, mode)
    assert total > 0
    ns = F.sample_ns(total, first=3, extra=7, seed=SEED)
    outcomes = []
    for n in ns:
        c = Case(pristine_dir, tmp_path / "kill")
        argv = backup_argv(mode, c.target(3))
        killed, rc, seen, err = run_killed_at_call(argv, c.disk, "/kill/", n)
        what = "cbt %s SIGKILLed at call %d of %d (last call seen %d)" % (
            " ".join(argv), n, total, seen)
        if n < total:
            assert killed, "%s: the run ended before call %d" % (what, n)
        outcomes.append(kill_outcome(c, mode, what, killed, rc, err))
    assert "before" in outcomes, outcomes


# --------------------------------------------------------------------------
# Injected errors: a full repository, a failing flush, a failing disk


@pytest.mark.parametrize("where,op,sticky,err", [
    ("repo", "write", True, "ENOSPC"),
    ("repo", "flush", False, "EIO"),
    ("disk", "write", False, "EIO"),
    pytest.param("disk", "write", True, "ENOSPC"),
], ids=["repo-full", "repo-flush", "disk-write", "disk-full"])
def test_backup_fails_cleanly(pristine_dir, tmp_path, where, op, sticky, err):
    """Every sampled N: cbt fails with a clear message, the checkpoints are
    as before, nothing of b3 is left, the next incremental is correct."""
    fault_path = "/work/repo/" if where == "repo" else TOP
    c = Case(pristine_dir, tmp_path / "work")
    argv = backup_argv("incremental", c.target(3))
    res, counts = F.run_faulty(argv, fault_path, op, cwd=c.disk)
    assert res.rc == 0, res
    total = counts["matching"]
    assert total > 0, "no %s calls on %s during a backup: %r" % (op, fault_path, counts)
    unclear = []
    for n in F.sample_ns(total, first=6, extra=6, seed=SEED):
        c = Case(pristine_dir, tmp_path / "work")
        res, cnt = F.run_faulty(argv, fault_path, op, n, sticky, err, cwd=c.disk)
        what = "cbt %s with %s on %s call %d of %d%s" % (
            " ".join(argv), err, op, n, total, " and after" if sticky else "")
        assert cnt["injected"] >= 1, "%s: the fault did not fire: %r" % (what, cnt)
        if res.rc == 0:
            # a failure cbt may ignore (e.g. an error while removing a
            # temporary file) must not leave a wrong backup
            assert check_after_failure(c, what, injected=False) == "after", \
                "%s: exit 0 but no checkpoint c3: %r" % (what, res)
            continue
        # an I/O or space error of the host: exit status 74 (docs/cli.md)
        assert res.rc == 74, "%s: exit %d, expected 74: %r" % (what, res.rc, res)
        text = F.ERRTEXT[err]
        if not any(ln.startswith("cbt: ") and text in ln for ln in res.err.splitlines()):
            unclear.append("%s: %r" % (what, res.err))
        check_after_failure(c, what, injected=True)
    assert not unclear, "no 'cbt: FILE: %s' line in %d runs; first:\n%s" % (
        F.ERRTEXT[err], len(unclear), unclear[0])


# --------------------------------------------------------------------------
# Checkpoint drift


def reconcile(c, fix=False):
    argv = ["checkpoint", "reconcile"] + (["--fix"] if fix else []) + ["--output=json", TOP]
    res = L.cbt_rc(*argv, cwd=c.disk)
    data = R.result_json(res, "cbt " + " ".join(argv))
    data = data["drift"]
    human = L.cbt_rc("checkpoint", "reconcile", TOP, cwd=c.disk) if not fix else None
    return res, data, human


def assert_explained(items, human, name, words, what):
    """An item for NAME whose explanation holds one of WORDS, and a human
    line naming NAME with one of WORDS."""
    mine = [i for i in items if i.get("name") == name]
    assert mine, "%s: reconcile does not report %r: %s" % (what, name, items)
    text = " ".join(str(i.get("explanation", "")) + " " + str(i.get("kind", ""))
                    for i in mine).lower()
    assert any(w in text for w in words), \
        "%s: reconcile's explanation of %r says none of %s: %s" % (what, name, words, mine)
    if human is not None:
        lines = [ln for ln in (human.out + human.err).splitlines() if name in ln]
        assert lines and any(any(w in ln.lower() for w in words) for ln in lines), \
            "%s: reconcile's text has no line naming %r with one of %s:\n%r" % (
                what, name, words, human)


def refuses(c, argv_mode, name, words, what):
    """cbt backup (MODE) refuses, naming NAME and the reason, and changes
    nothing (no target, checkpoints as before)."""
    before = disk_state(c.disk)
    files = c.repo_files()
    t = c.target(9)
    argv = ["backup"] + argv_mode + ["--checkpoint", "c9", TOP, t]
    res = L.cbt_rc(*argv, cwd=c.disk)
    what = "%s; cbt %s" % (what, " ".join(argv))
    assert res.rc != 0, "%s must be refused: %r" % (what, res)
    assert name in res.err and any(w in res.err.lower() for w in words), \
        "%s: the refusal should name %r and say %s: %r" % (what, name, words, res)
    assert c.repo_files() == files, "%s: the refused backup left %s" % (
        what, sorted(set(c.repo_files()) - set(files)))
    assert disk_state(c.disk) == before, "%s: the refused backup changed checkpoints" % what


def auto_full(c, n, name, what, rescan=False):
    """--incremental --auto takes a full backup (with rescan: a rescan on
    top of the newest checkpoint's backup, docs/backups.md), says why
    (naming NAME), and the backup is right.  Returns its target's
    basename."""
    t = c.target(n)
    argv = ["backup", "--incremental", "--auto", "--output=json", "--checkpoint",
            "c%d" % n, TOP, t]
    res = L.cbt_rc(*argv, cwd=c.disk)
    what = "%s; cbt %s" % (what, " ".join(argv))
    assert res.rc == 0, "%s: %r" % (what, res)
    out = R.result_json(res, what)
    fb = out.get("fallback")
    assert fb and name in str(fb), \
        "%s: the result should say why a full backup was taken (naming %r): %s" % (
            what, name, out)
    man = R.manifest_of(t)
    if rescan:
        assert out.get("kind") == "incremental" and out.get("rescan") is True, \
            "%s: result %s" % (what, out)
        assert man["kind"] == "incremental" and man["parent"], "%s: %s" % (what, man)
    else:
        assert out.get("kind") == "full", "%s: result %s" % (what, out)
        assert man["kind"] == "full" and man["parent"] is None and man["since"] is None, \
            "%s: %s" % (what, man)
    ref = os.path.join(c.root, "ref_%d.raw" % n)
    qemu_img("convert", "-O", "raw", c.top(), ref)
    assert man["hash"]["root"] == R.block_root(ref)[0], what
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", t, ref, check=False)
    assert cmp.rc == 0, "%s: %r" % (what, cmp)
    return os.path.basename(t)


def goes_on(c, parent, n, what, rng):
    """After more writes the next incremental has PARENT and restores to
    the disk."""
    qio(c.top(), *rand_cmds(rng, 15))
    ref = os.path.join(c.root, "ref_%d.raw" % n)
    qemu_img("convert", "-O", "raw", c.top(), ref)
    t = c.target(n)
    argv = ["backup", "--incremental", "--checkpoint", "c%d" % n, TOP, t]
    res = L.cbt_rc(*argv, cwd=c.disk)
    what = "%s; writes; cbt %s" % (what, " ".join(argv))
    assert res.rc == 0, "%s: %r" % (what, res)
    man = R.manifest_of(t)
    assert (man.get("parent") or {}).get("file") == parent, \
        "%s: parent %s, expected %s" % (what, man.get("parent"), parent)
    out = os.path.join(c.root, "restored.raw")
    L.cbt_ok("restore", "-O", "raw", t, out)
    cmp = qemu_img("compare", "-f", "raw", "-F", "raw", out, ref, check=False)
    assert cmp.rc == 0, "%s: the restore differs from the disk: %r" % (what, cmp)
    assert man["hash"]["root"] == R.block_root(ref)[0], what
    res, data = R.verify_json(t)
    assert data.get("ok") is True, "%s: %r" % (what, res)
    os.unlink(out)


MISSING = ("missing", "no bitmap", "without", "lacks", "does not hold", "not found",
           "gone", "removed", "absent")
UNUSABLE = ("disabled", "not recording", "unusable", "inconsistent", "in-use", "in use")
GRAN = ("granularity",)
NO_META = ("without", "no checkpoint", "metadata", "unknown", "not a checkpoint")


def tamper(c, how):
    """Break the disk behind cbt's back; returns (checkpoint named, words
    an explanation uses, whether the incremental since the newest
    checkpoint is impossible)."""
    top = c.top()
    if how == "removed-newest":
        qemu_img("bitmap", "--remove", top, "c2")
        return "c2", MISSING
    if how == "removed-older":
        qemu_img("bitmap", "--remove", top, "c1")
        return "c1", MISSING
    if how == "disabled":
        qemu_img("bitmap", "--disable", top, "c2")
        return "c2", UNUSABLE
    if how == "granularity":
        g = [b["granularity"] for b in L.qemu_bitmaps(top) if b["name"] == "c2"][0]
        qemu_img("bitmap", "--remove", top, "c2")
        qemu_img("bitmap", "--add", "-g", g * 2, top, "c2")
        return "c2", GRAN + MISSING + UNUSABLE
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["removed-newest", "disabled", "granularity"])
def test_drift_newest_checkpoint_broken(pristine_dir, tmp_path, how):
    rng = random.Random(SEED + 17)
    c = Case(pristine_dir, tmp_path / "case")
    name, words = tamper(c, how)
    what = "checkpoint %s %s behind cbt's back" % (name, how)
    res, items, human = reconcile(c)
    assert_explained(items, human, name, words, what)
    listed = {x["name"]: x for x in R.checkpoint_list(TOP, cwd=c.disk)}
    assert listed.get(name, {}).get("usable") is False, \
        "%s: checkpoint list should call %s unusable: %s" % (what, name, listed.get(name))
    refuses(c, ["--incremental"], name, words, what)
    inc = auto_full(c, 3, name, what, rescan=True)
    goes_on(c, inc, 4, what + "; --auto rescan " + inc, rng)


@pytest.mark.parametrize("how", ["removed-newest", "disabled"])
def test_drift_fix_then_incremental(pristine_dir, tmp_path, how):
    """reconcile --fix drops the broken checkpoint; the newest one left
    (c1) is usable, so an incremental since it has b1 as parent."""
    rng = random.Random(SEED + 19)
    c = Case(pristine_dir, tmp_path / "case")
    name, words = tamper(c, how)
    what = "checkpoint %s %s behind cbt's back; reconcile --fix" % (name, how)
    res, items, _ = reconcile(c, fix=True)
    assert res.rc == 0, "%s: %r" % (what, res)
    assert_explained(items, None, name, words, what)
    assert any(i.get("name") == name and i.get("fixed") is True for i in items), \
        "%s: %s" % (what, items)
    assert R.checkpoint_names(TOP, cwd=c.disk) == ["c1"], what
    assert name not in [b["name"] for b in L.qemu_bitmaps(c.top())], what
    res2, items2, _ = reconcile(c)
    assert items2 == [], "%s: reconcile still reports %s" % (what, items2)
    goes_on(c, "b1.qcow2", 3, what, rng)


def test_drift_older_checkpoint_broken(pristine_dir, tmp_path):
    """c1's bitmap removed from the top: the incremental (since c2) still
    works; a differential since c1 is refused, --auto falls back."""
    rng = random.Random(SEED + 23)
    c = Case(pristine_dir, tmp_path / "case")
    name, words = tamper(c, "removed-older")
    what = "checkpoint c1's bitmap removed from the top behind cbt's back"
    res, items, human = reconcile(c)
    assert_explained(items, human, "c1", words, what)
    refuses(c, ["--since", "c1"], "c1", words, what)
    t = c.target(3)
    res = L.cbt_rc("backup", "--since", "c1", "--auto", "--output=json", "--checkpoint",
                   "c3", TOP, t, cwd=c.disk)
    assert res.rc == 0, "%s; --since c1 --auto: %r" % (what, res)
    fb = R.result_json(res, what).get("fallback")
    assert fb and "c1" in str(fb), "%s: %r" % (what, res)
    # b1, c1's backup, knows every block: a differential by rescan
    assert R.result_json(res, what).get("rescan") is True, "%s: %r" % (what, res)
    assert R.manifest_of(t)["kind"] == "differential", what
    assert R.manifest_of(t)["parent"]["file"] == "b1.qcow2", what
    goes_on(c, "b3.qcow2", 4, what + "; --since c1 --auto", rng)


def test_drift_bitmap_without_checkpoint(pristine_dir, tmp_path):
    """A bitmap added by qemu-img is reported, not used by backups; --fix
    adopts it as the newest checkpoint, which no backup created: the
    incremental since it is refused, --auto falls back to full."""
    rng = random.Random(SEED + 29)
    c = Case(pristine_dir, tmp_path / "case")
    qemu_img("bitmap", "--add", c.top(), "extra")
    what = "bitmap 'extra' added by qemu-img"
    res, items, human = reconcile(c)
    assert_explained(items, human, "extra", NO_META, what)
    assert R.checkpoint_names(TOP, cwd=c.disk) == ["c1", "c2"], what
    # backups are not disturbed by it
    t = c.target(3)
    L.cbt_ok("backup", "--incremental", "--checkpoint", "c3", TOP, t, cwd=c.disk)
    assert (R.manifest_of(t)["parent"] or {}).get("file") == "b2.qcow2", what
    res, items, _ = reconcile(c, fix=True)
    assert any(i.get("name") == "extra" and i.get("fixed") is True for i in items), \
        "%s; reconcile --fix: %s" % (what, items)
    assert R.checkpoint_names(TOP, cwd=c.disk) == ["c1", "c2", "c3", "extra"], what
    what += "; reconcile --fix adopted it"
    refuses(c, ["--incremental"], "extra", ("backup", "no ", "not found", "none"), what)
    full = auto_full(c, 4, "extra", what)
    goes_on(c, full, 5, what + "; --auto full", rng)


def test_drift_no_checkpoints_on_a_qemu_overlay(pristine_dir, tmp_path):
    """An overlay made with qemu-img create -b: the checkpoints it lists
    from its base are unusable: the incremental is refused, --auto takes a
    rescan on top of the newest one's backup."""
    c = Case(pristine_dir, tmp_path / "case")
    ov = os.path.join(c.disk, "ov.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", TOP, "-F", "qcow2", ov)
    t = c.target(3)
    res = L.cbt_rc("backup", "--incremental", "--checkpoint", "c3", "ov.qcow2", t,
                   cwd=c.disk)
    assert res.rc != 0 and "checkpoint" in res.err.lower(), res
    assert not os.path.exists(t), res
    res = L.cbt_rc("backup", "--incremental", "--auto", "--checkpoint", "c3", "ov.qcow2", t,
                   cwd=c.disk)
    assert res.rc == 0, res
    # the human output says so, on its own line: the checkpoints listed
    # from the base are unusable (nothing tracked the overlay's writes),
    # but the backup of the newest one knows every block: a rescan
    why = [ln for ln in res.out.splitlines() + res.err.splitlines()
           if "rescan" in ln.lower() and "checkpoint" in ln.lower()]
    assert why, "--auto should say why it took a rescan: %r" % res
    assert R.manifest_of(t)["kind"] == "incremental"
    assert R.manifest_of(t)["hash"]["root"] == _PRISTINE["root"]
    # and the JSON result's "fallback" (a second overlay, a second rescan)
    ov2 = os.path.join(c.disk, "ov2.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", TOP, "-F", "qcow2", ov2)
    res = L.cbt_rc("backup", "--incremental", "--auto", "--output=json", "--checkpoint",
                   "c4", "ov2.qcow2", c.target(4), cwd=c.disk)
    assert res.rc == 0, res
    out = R.result_json(res, "auto")
    assert out.get("fallback") and out.get("rescan") is True, out


class IoWriter:
    """`cbt io` reading commands from stdin (test_sigkill.py's way)."""

    def __init__(self, img):
        self.p = subprocess.Popen([L.CBT, "io", "-f", "qcow2", img], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)

    def command(self, cmd):
        self.p.stdin.write((cmd + "\n").encode())
        self.p.stdin.flush()
        return self.p.stdout.readline().decode()

    def kill(self):
        os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            f.close()


def test_drift_inconsistent_after_sigkilled_writer(pristine_dir, tmp_path):
    """A `cbt io` writer killed after a write leaves the top's bitmaps
    in-use (inconsistent): reconcile explains each checkpoint, the
    incremental is refused, --auto takes a rescan (b2 knows every block),
    and the backups go on from there."""
    rng = random.Random(SEED + 31)
    c = Case(pristine_dir, tmp_path / "case")
    w = IoWriter(c.top())
    line = w.command("write -P 0x5a 5M 200k")
    assert "wrote" in line, line
    w.kill()
    flags = {b["name"]: b["flags"] for b in L.qemu_bitmaps(c.top())}
    assert all("in-use" in flags[n] for n in ("c1", "c2")), \
        "the killed writer should leave the bitmaps in-use: %s" % flags
    what = "cbt io SIGKILLed after a write (c1, c2 in-use)"
    ref = os.path.join(c.root, "ref.raw")
    qemu_img("convert", "-O", "raw", c.top(), ref)
    res, items, human = reconcile(c)
    for n in ("c1", "c2"):
        assert_explained(items, human, n, ("inconsistent", "in-use", "in use"), what)
    refuses(c, ["--incremental"], "c2", ("inconsistent", "in-use", "in use"), what)
    inc = auto_full(c, 3, "c2", what, rescan=True)
    goes_on(c, inc, 4, what + "; --auto rescan " + inc, rng)
    rc, data, res = L.qemu_check(c.top())
    assert rc in (0, 3) and not (data or {}).get("corruptions"), res
