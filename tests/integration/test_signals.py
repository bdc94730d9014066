"""SIGINT, SIGTERM and SIGHUP during backup, restore, convert, commit and
stream
(issue 10, section 4; docs/cli.md, "Exit status").

Each command runs with libfault tracing its write calls on the file it
writes (the backup folder, restore's OUT.part, convert's DST, commit's
BASE); once the trace shows call N, the command gets the signal -- at
several N spread over the run, so the signal lands before, during and
after the copy.  Whatever the moment, the command must:
  * die of that signal (the parent sees WIFSIGNALED, as a shell does);
  * leave exactly what its documented failure path leaves, or -- when the
    signal came after its point of no return -- the complete result:
      backup:  nothing new in the folder (no TARGET.part, no hashes, no
               temporary file) and the disk's checkpoints as before; or a
               complete backup that verifies, equals the disk, and one
               checkpoint more;
      restore: no OUT and no OUT.part; or OUT equal to the backup's view;
      convert: no DST; or DST equal to the source;
      commit:  the chain reads as before, qemu-img check clean, the
               bitmaps (checkpoints) as before; or as after a complete
               commit;
      stream:  TOP still on its backing file, reading as before; or TOP
               alone (no backing file), reading the same;
  * leave the disk (and every image) clean for qemu-img check.
No timing is asserted: the moment only decides which outcome is seen.
"""
import json
import os
import signal
import sys

import pytest

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _TESTS)
import faultlib as F  # noqa: E402
from faultlib import L  # noqa: E402
from interop_lib import MiB, cbt, qemu_img, qemu_io  # noqa: E402

SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
MOMENTS = 7


def trace_run(argv, path, cwd=None):
    """cbt ARGV once, counting the write calls on PATH: the count."""
    res, counts = F.run_faulty(argv, path, "write", cwd=cwd)
    assert res.rc == 0, res
    return counts["matching"]


def signalled_run(argv, path, n, sig, cwd=None):
    """cbt ARGV, sent SIG from inside at its Nth write call on PATH.
    Returns (returncode, stderr without libfault's lines)."""
    sent, rc, err = F.run_signalled(argv, path, n, sig, op="write", cwd=cwd)
    assert sent, "call %d never came: %s" % (n, err)
    assert "Sanitizer" not in err and "runtime error" not in err, err
    return rc, err


def moments(total):
    """Call numbers spread over 1..total, the first and the last included."""
    return sorted({max(1, min(total, 1 + (total - 1) * k // (MOMENTS - 1)))
                   for k in range(MOMENTS)})


def died_of(rc, sig, err, what):
    assert rc == -sig, "%s: exit %r, expected death by %s\n%s" % (
        what, rc, signal.Signals(sig).name, err)


def check_clean(path):
    rc, data, res = L.qemu_check(path)
    assert rc == 0 and data and not data.get("corruptions") and \
        not data.get("leaks"), "%s: %r" % (path, res)


def same_view(a, b, fa="qcow2", fb="qcow2"):
    res = qemu_img("compare", "-q", "-f", fa, "-F", fb, a, b, check=False)
    assert res.rc == 0, "%s and %s differ: %r" % (a, b, res)


def checkpoints(disk):
    return [c["name"] for c in json.loads(cbt("checkpoint", "list", "--output=json",
                                               disk).out)["checkpoints"]]


def make_disk(d, size=64 * MiB):
    disk = os.path.join(d, "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, size)
    qemu_io("-f", "qcow2", "-c", "write -P 5 0 %d" % (size * 3 // 4),
            "-c", "write -P 6 %d 1M" % (size - MiB), disk)
    return disk


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_backup(tmp, mode):
    d = str(tmp)
    pristine = os.path.join(d, "pristine")
    os.mkdir(pristine)
    disk = make_disk(pristine)
    bk = os.path.join(pristine, "bk")
    os.mkdir(bk)
    if mode == "incremental":
        cbt("backup", "--full", "--checkpoint", "c1", disk, os.path.join(bk, "f.qcow2"))
        qemu_io("-f", "qcow2", "-c", "write -P 7 1M 30M", disk)
    work = os.path.join(d, "work")
    argv = ["backup", "--" + mode, "--checkpoint", "c2", os.path.join(work, "disk.qcow2"),
            os.path.join(work, "bk", "b.qcow2")]
    F.fresh_copy(pristine, work)
    total = trace_run(argv, "/bk")
    before = sorted(os.listdir(bk))
    ckpts = checkpoints(disk)
    seen = set()
    for i, n in enumerate(moments(total)):
        sig = SIGNALS[i % len(SIGNALS)]
        F.fresh_copy(pristine, work)
        rc, err = signalled_run(argv, "/bk", n, sig)
        what = "backup --%s, %s at write %d of %d" % (mode, signal.Signals(sig).name,
                                                     n, total)
        died_of(rc, sig, err, what)
        wdisk = os.path.join(work, "disk.qcow2")
        check_clean(wdisk)
        files = sorted(os.listdir(os.path.join(work, "bk")))
        if files == before:
            assert checkpoints(wdisk) == ckpts, what
            assert "interrupted" in err, (what, err)
            seen.add("before")
        else:
            b = os.path.join(work, "bk", "b.qcow2")
            assert files == sorted(before + ["b.qcow2", "b.qcow2.json", "b.qcow2.tree"]), \
                "%s: left %s" % (what, files)
            assert checkpoints(wdisk) == ckpts + ["c2"], what
            cbt("verify", b)
            same_view(b, wdisk)
            seen.add("after")
    assert "before" in seen, "no signal landed before the checkpoint: %s" % seen


def test_restore(tmp):
    d = str(tmp)
    disk = make_disk(d)
    bk = os.path.join(d, "bk")
    os.mkdir(bk)
    b = os.path.join(bk, "f.qcow2")
    cbt("backup", "--full", disk, b)
    out = os.path.join(d, "out.qcow2")
    argv = ["restore", b, out]
    total = trace_run(argv, "out.qcow2.part")
    os.unlink(out)
    seen = set()
    for i, n in enumerate(moments(total)):
        sig = SIGNALS[i % len(SIGNALS)]
        rc, err = signalled_run(argv, "out.qcow2.part", n, sig)
        what = "restore, %s at write %d of %d" % (signal.Signals(sig).name, n, total)
        died_of(rc, sig, err, what)
        left = sorted(f for f in os.listdir(d) if f.startswith("out"))
        if left == []:
            assert "interrupted" in err, (what, err)
            seen.add("before")
        else:
            assert left == ["out.qcow2"], "%s: left %s" % (what, left)
            check_clean(out)
            same_view(out, disk)
            os.unlink(out)
            seen.add("after")
    assert "before" in seen, seen


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_convert(tmp, fmt):
    d = str(tmp)
    disk = make_disk(d)
    dst = os.path.join(d, "dst." + fmt)
    argv = ["convert", "-O", fmt, disk, dst]
    total = trace_run(argv, "dst." + fmt)
    os.unlink(dst)
    seen = set()
    for i, n in enumerate(moments(total)):
        sig = SIGNALS[i % len(SIGNALS)]
        rc, err = signalled_run(argv, "dst." + fmt, n, sig)
        what = "convert, %s at write %d of %d" % (signal.Signals(sig).name, n, total)
        died_of(rc, sig, err, what)
        if not os.path.exists(dst):
            assert "interrupted" in err, (what, err)
            seen.add("before")
        else:
            if fmt == "qcow2":
                check_clean(dst)
            same_view(dst, disk, fb="qcow2", fa=fmt)
            os.unlink(dst)
            seen.add("after")
        assert sorted(os.listdir(d)) == ["disk.qcow2"], (what, os.listdir(d))
    assert "before" in seen, seen


def test_commit(tmp):
    """qemu-img's form: TOP into its backing file, then TOP emptied."""
    d = str(tmp)
    pristine = os.path.join(d, "pristine")
    os.mkdir(pristine)
    base = make_disk(pristine)
    cbt("checkpoint", "create", base, "c1")
    top = os.path.join(pristine, "top.qcow2")
    cbt("snapshot", base, top)
    cbt("checkpoint", "create", top, "c2")
    qemu_io("-f", "qcow2", "-c", "write -P 8 0 40M", top)
    ref = os.path.join(d, "ref.raw")
    qemu_img("convert", "-O", "raw", top, ref)
    work = os.path.join(d, "work")
    F.fresh_copy(pristine, work)
    bitmaps_before = cbt("bitmap", "--list", "--chain", "--output=json",
                         os.path.join(work, "top.qcow2")).out
    argv = ["commit", os.path.join(work, "top.qcow2")]
    total = trace_run(argv, "disk.qcow2")
    bitmaps_after = cbt("bitmap", "--list", "--chain", "--output=json",
                        os.path.join(work, "top.qcow2")).out
    assert bitmaps_after != bitmaps_before
    seen = set()
    for i, n in enumerate(moments(total)):
        sig = SIGNALS[i % len(SIGNALS)]
        F.fresh_copy(pristine, work)
        rc, err = signalled_run(argv, "disk.qcow2", n, sig)
        what = "commit, %s at write %d of %d" % (signal.Signals(sig).name, n, total)
        died_of(rc, sig, err, what)
        wtop = os.path.join(work, "top.qcow2")
        check_clean(wtop)
        check_clean(os.path.join(work, "disk.qcow2"))
        same_view(wtop, ref, fb="raw")
        now = cbt("bitmap", "--list", "--chain", "--output=json", wtop).out
        if now == bitmaps_before:
            seen.add("before")
        else:
            assert now == bitmaps_after, "%s: bitmaps neither before nor after:\n%s" % (
                what, now)
            seen.add("after")
        assert sorted(os.listdir(work)) == ["disk.qcow2", "top.qcow2"], what
    assert "before" in seen, seen


def backing_of(path):
    info = json.loads(qemu_img("info", "--output=json", "-U", path).out)
    return info.get("backing-filename")


def signalled_unlink(tmp, cmd, pattern):
    """cbt CMD... TOP, which copies the backing file's data into TOP and
    then drops TOP's link, signalled at sampled writes: TOP always reads
    as before, and is either still on its backing file (the command said
    it was interrupted) or on none."""
    d = str(tmp)
    pristine = os.path.join(d, "pristine")
    os.mkdir(pristine)
    make_disk(pristine)
    top = os.path.join(pristine, "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", pattern, top)
    ref = os.path.join(d, "ref.raw")
    qemu_img("convert", "-O", "raw", top, ref)
    work = os.path.join(d, "work")
    F.fresh_copy(pristine, work)
    argv = cmd + [os.path.join(work, "top.qcow2")]
    total = trace_run(argv, "top.qcow2")
    seen = set()
    for i, n in enumerate(moments(total)):
        sig = SIGNALS[i % len(SIGNALS)]
        F.fresh_copy(pristine, work)
        rc, err = signalled_run(argv, "top.qcow2", n, sig)
        what = "%s, %s at write %d of %d" % (cmd[0], signal.Signals(sig).name,
                                             n, total)
        died_of(rc, sig, err, what)
        wtop = os.path.join(work, "top.qcow2")
        check_clean(wtop)
        same_view(wtop, ref, fb="raw")
        if backing_of(wtop) == "disk.qcow2":
            assert "interrupted" in err, (what, err)
            seen.add("before")
        else:
            assert backing_of(wtop) is None, what
            seen.add("after")
        assert sorted(os.listdir(work)) == ["disk.qcow2", "top.qcow2"], what
    assert "before" in seen, seen


def test_stream(tmp):
    """cbt stream TOP: the backing chain's data copied into TOP, then TOP
    relinked onto nothing."""
    signalled_unlink(tmp, ["stream"], "write -P 8 8M 4M")


def test_rebase(tmp):
    """cbt rebase -b "" TOP (safe mode): the same copy, then the link
    removed."""
    signalled_unlink(tmp, ["rebase", "-b", ""], "write -P 9 2M 3M")


def test_ignored_signal_stays_ignored(tmp):
    """A signal the parent ignores (nohup, a background job) is not caught
    by cbt either: the backup runs to its end and exits 0."""
    d = str(tmp)
    disk = make_disk(d)
    bk = os.path.join(d, "bk")
    os.mkdir(bk)
    argv = ["backup", "--full", disk, os.path.join(bk, "b.qcow2")]
    hup = signal.signal(signal.SIGHUP, signal.SIG_IGN)   # inherited by cbt
    try:
        sent, rc, _, err = F.run_traced(argv, "/bk", 1,
                                        lambda p: p.send_signal(signal.SIGHUP),
                                        op="write")
    finally:
        signal.signal(signal.SIGHUP, hup)
    assert sent and rc == 0, (rc, err)
    cbt("verify", os.path.join(bk, "b.qcow2"))
