"""Exit statuses a script can act on, the same for every command
(docs/cli.md, "Exit status"): one test per kind.

  * 64, a usage mistake: every command with an unknown option, with an
    option missing its value, without its arguments, with one argument too
    many; `cbt` alone and an unknown command; bad values and option
    combinations that commands refuse after getopt;
  * 79, a full backup is needed: --incremental and --since without a
    checkpoint, without a backup of it in the folder, with a broken
    checkpoint; --auto takes a full backup instead (exit 0);
  * 65, verification failed: verify and restore of a chain whose image,
    manifest or hashes file was altered; restore leaves nothing behind;
  * 74, an I/O or space error of the host: ENOSPC and EIO injected into
    backup, restore, convert and bitmap --add (libfault);
  * 1 for other failures (a missing file), and qemu-img's own codes kept
    by check (2, 3, 63) and compare (1 different, 2 open failure).
"""
import os
import sys

import pytest

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _TESTS)
import faultlib as F  # noqa: E402
from faultlib import L  # noqa: E402
from interop_lib import MiB, cbt, qemu_img, qemu_io  # noqa: E402

USAGE, CORRUPT, IO, NEED_FULL = 64, 65, 74, 79

COMMANDS = ["create", "info", "check", "map", "compare", "io", "resize",
            "bitmap", "snapshot", "commit", "stream", "rebase", "convert",
            "checkpoint", "backup", "restore", "verify", "copy"]


def rc_of(*args, **kw):
    return cbt(*args, check=False, **kw)


def assert_usage(res, what):
    assert res.rc == USAGE, "%s: expected exit %d: %r" % (what, USAGE, res)
    assert res.out == "", "%s: printed on stdout: %r" % (what, res)
    assert res.err.strip(), "%s: no message" % what


# ---- 64: usage mistakes ----

@pytest.mark.parametrize("cmd", COMMANDS)
def test_unknown_option(cmd):
    res = rc_of(cmd, "--no-such-option", "a", "b")
    assert_usage(res, "cbt %s --no-such-option" % cmd)
    assert "Try 'cbt %s --help'" % cmd in res.err, res


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c != "checkpoint"])
def test_missing_arguments(cmd):
    assert_usage(rc_of(cmd), "cbt %s without arguments" % cmd)


@pytest.mark.parametrize("argv", [
    ["info", "a", "b"], ["check", "a", "b"], ["map", "a", "b"],
    ["compare", "a", "b", "c"], ["io", "a", "b"], ["resize", "a", "1M", "x"],
    ["snapshot", "a", "b", "c"], ["commit", "a", "b"], ["stream", "a", "b"],
    ["rebase", "-u", "-b", "x", "a", "b"], ["convert", "a", "b", "c"],
    ["checkpoint", "list", "a", "b"], ["backup", "--full", "a", "b", "c"],
    ["restore", "a", "b", "c"], ["verify", "a", "b"], ["create", "a", "1M", "x"],
    ["bitmap", "--add", "a", "b", "c"], ["copy", "--qmp", "s", "a", "b", "c"],
    ["snapshot", "--qmp", "s", "a", "b", "c"], ["commit", "--qmp", "s", "a", "b"],
])
def test_extra_argument(argv):
    assert_usage(rc_of(*argv), "cbt " + " ".join(argv))


@pytest.mark.parametrize("argv", [
    ["create", "-f", "qcow2", "x.qcow2", "12Q"],
    ["create", "-f", "vmdk", "x.img", "1M"],
    ["create", "-f", "qcow2", "-o", "cluster_size=abc", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "-o", "size=1M", "x.qcow2", "1M"],
    ["create", "-f", "qcow2", "x.qcow2"],
    ["map", "-s", "zz", "x"],
    ["info", "--output=yaml", "x"],
    ["check", "-r", "some", "x"],
    ["bitmap", "--add", "-g", "abc", "x", "b"],
    ["bitmap", "--list", "--chain", "--strict", "--dump", "x", "b"],
    ["checkpoint", "frobnicate", "x"],
    ["checkpoint", "list", "--fix", "x"],
    ["backup", "x", "y"],
    ["backup", "--full", "--incremental", "x", "y"],
    ["backup", "--full", "-O", "vmdk", "x", "y"],
    ["restore", "-O", "vmdk", "x", "y"],
    ["convert", "-O", "vmdk", "x", "y"],
    ["convert", "--skip-broken-bitmaps", "x", "y"],
    ["convert", "-n", "-o", "cluster_size=4k", "x", "y"],
    ["commit", "--active", "x"],
    ["rebase", "x"],
    ["copy", "a", "b"],
    ["copy", "--qmp", "s", "-r", "fast", "a", "b"],
    ["commit", "-r", "1M", "x"],
    ["commit", "--qmp", "s", "-d", "x"],
    ["commit", "--qmp", "s", "-r", "fast", "x"],
    ["stream", "-r", "1M", "x"],
    ["snapshot", "--qmp", "s", "--no-bitmaps", "a", "b"],
])
def test_bad_values_and_combinations(tmp, argv):
    """Refused before any file is touched (none of these files exist)."""
    assert_usage(rc_of(*argv, cwd=tmp), "cbt " + " ".join(argv))
    assert os.listdir(tmp) == [], "a refused command left %s" % os.listdir(tmp)


def test_resize_mistakes(tmp):
    img = tmp / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    assert_usage(rc_of("resize", img, "512k"), "shrink without --shrink")
    assert_usage(rc_of("resize", img, "-2M"), "a negative size")
    assert qemu_img("info", "--output=json", img).json()["virtual-size"] == MiB


def test_top_level():
    res = L.run([L.CBT], check=False)
    assert res.rc == USAGE, res
    assert_usage(rc_of("no-such-command"), "an unknown command")
    assert_usage(rc_of("--no-such-option"), "an unknown top-level option")
    assert rc_of("help", "no-such-command").rc == USAGE


def test_help_is_not_a_mistake():
    for cmd in COMMANDS:
        res = rc_of(cmd, "--help")
        assert res.rc == 0 and res.out, (cmd, res)
    assert "Exit status" in cbt("--help").out


# ---- 79: an incremental is impossible ----

def make_disk(tmp):
    disk = tmp / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", disk, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 1M", disk)
    os.mkdir(tmp / "bk")
    return str(disk), str(tmp / "bk")


def test_need_full(tmp):
    disk, bk = make_disk(tmp)
    for mode in (["--incremental"], ["--since", "nope"]):
        res = rc_of("backup", *mode, disk, os.path.join(bk, "i.qcow2"))
        assert res.rc == NEED_FULL, res
        assert "full" in res.err, res
    cbt("backup", "--full", "--checkpoint", "c1", disk, os.path.join(bk, "f.qcow2"))
    # The folder without the backup of c1: no parent.
    other = tmp / "other"
    os.mkdir(other)
    res = rc_of("backup", "--incremental", disk, other / "i.qcow2")
    assert res.rc == NEED_FULL, res
    assert os.listdir(other) == []
    # A checkpoint whose bitmap is disabled cannot be used.
    cbt("bitmap", "--disable", disk, "c1")
    res = rc_of("backup", "--since", "c1", disk, os.path.join(bk, "d.qcow2"))
    assert res.rc == NEED_FULL, res
    # --auto: a rescan on top of c1's backup (the bitmap is not needed)
    res = cbt("backup", "--since", "c1", "--auto", "--output=json", disk,
              os.path.join(bk, "d.qcow2"))
    assert res.json()["kind"] == "differential" and res.json()["rescan"], res
    assert res.json()["fallback"], res
    # --rescan without a backup of c1 in the folder: 79, nothing written
    res = rc_of("backup", "--since", "c1", "--rescan", disk, other / "r.qcow2")
    assert res.rc == NEED_FULL, res
    assert os.listdir(other) == []


# ---- 65: verification failed ----

@pytest.mark.parametrize("what", ["image", "hashes", "parent-manifest"])
def test_corrupt(tmp, what):
    disk, bk = make_disk(tmp)
    full = os.path.join(bk, "f.qcow2")
    inc = os.path.join(bk, "i.qcow2")
    cbt("backup", "--full", disk, full)
    qemu_io("-f", "qcow2", "-c", "write -P 2 1M 64k", disk)
    cbt("backup", "--incremental", disk, inc)
    cbt("verify", inc)
    if what == "image":
        # a guest data byte of the full backup (its first data cluster)
        m = [e for e in qemu_img("map", "--output=json", full).json() if e["data"]]
        L.flip_byte(full, m[0]["offset"] + 100, 0x20)
    elif what == "hashes":
        L.flip_byte(inc + ".tree", 40, 0x20)
    else:
        L.flip_byte(full + ".json", 20, 0x20)
    res = rc_of("verify", inc)
    assert res.rc == CORRUPT, res
    out = tmp / "out.qcow2"
    res = rc_of("restore", inc, out)
    assert res.rc == CORRUPT, res
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".part")


# ---- 74: I/O and space errors ----

def test_io_errors(tmp):
    disk, bk = make_disk(tmp)
    full = os.path.join(bk, "f.qcow2")
    res, cnt = F.run_faulty(["backup", "--full", disk, full], "/bk/", "write",
                            1, True, "ENOSPC")
    assert cnt["injected"] >= 1 and res.rc == IO, res
    assert os.listdir(bk) == [], os.listdir(bk)
    cbt("backup", "--full", disk, full)
    out = str(tmp / "out.qcow2")
    res, cnt = F.run_faulty(["restore", full, out], "out.qcow2.part", "flush", 1,
                            False, "EIO")
    assert cnt["injected"] >= 1 and res.rc == IO, res
    assert not os.path.exists(out) and not os.path.exists(out + ".part")
    res, cnt = F.run_faulty(["convert", "-O", "qcow2", disk, out], "out.qcow2",
                            "write", 1, True, "ENOSPC")
    assert cnt["injected"] >= 1 and res.rc == IO, res
    # bitmap --add stores its change in one header update: a full disk
    res, cnt = F.run_faulty(["bitmap", "--add", disk, "b9"], "disk.qcow2",
                            "write", 1, True, "ENOSPC")
    assert cnt["injected"] >= 1 and res.rc == IO, res


# ---- 1, and qemu-img's own codes ----

def test_other_failures_and_qemu_codes(tmp):
    assert rc_of("info", tmp / "missing.qcow2").rc == 1
    assert rc_of("verify", tmp / "missing.qcow2").rc == 1
    a, b = tmp / "a.qcow2", tmp / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", a, "1M")
    qemu_img("create", "-q", "-f", "qcow2", b, "1M")
    qemu_io("-f", "qcow2", "-c", "write -P 3 0 4k", b)
    assert rc_of("compare", a, b).rc == 1
    assert rc_of("compare", a, tmp / "missing.qcow2").rc == 2
    raw = tmp / "r.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    assert rc_of("check", raw).rc == 63
