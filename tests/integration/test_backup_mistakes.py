"""Mistakes on the command line of `cbt backup` (issue 10, section 4):
swapped arguments, a folder as TARGET, an existing file that is not cbt's.
cbt says what it sees and never advises removing a file it did not leave
behind; what it leaves behind (docs/backups.md: TARGET.part, or TARGET
with TARGET.tree and no manifest) is named as such.  Nothing is written:
the disk, the backups and the other files stay byte for byte as they were.
"""
import hashlib
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import MiB, cbt, qemu_img, qemu_io, no_crash  # noqa: E402

FAILED, USAGE = 1, 64


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(*folders):
    out = {}
    for d in folders:
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            out[p] = digest(p) if os.path.isfile(p) and not os.path.islink(p) \
                else os.readlink(p) if os.path.islink(p) else "dir"
    return out


@pytest.fixture
def setup(tmp):
    """vm.qcow2 with checkpoint c1, its full backup bk/full.qcow2."""
    d = str(tmp)
    vm = os.path.join(d, "vm.qcow2")
    bk = os.path.join(d, "bk")
    os.mkdir(bk)
    qemu_img("create", "-q", "-f", "qcow2", vm, 4 * MiB)
    qemu_io("-f", "qcow2", "-c", "write -P 7 0 1M", vm)
    cbt("backup", "--full", "--checkpoint", "c1", vm, os.path.join(bk, "full.qcow2"))
    return d, vm, bk


def refused(argv, rc, must, must_not=("remove",), folders=()):
    before = snapshot(*folders)
    res = no_crash(cbt("backup", *argv, check=False))
    assert res.rc == rc, res
    assert res.out == "", res
    for w in must:
        assert w in res.err, "%r not in %r" % (w, res.err)
    for w in must_not:
        assert w not in res.err, "%r in %r" % (w, res.err)
    assert snapshot(*folders) == before, "a refused backup changed files"
    return res.err


def test_swapped_arguments(setup):
    d, vm, bk = setup
    full = os.path.join(bk, "full.qcow2")
    # the reproducer: the backup first, the disk second
    err = refused(["--full", full, vm], USAGE, [full, "swapped"], folders=(d, bk))
    refused(["--incremental", full, vm], USAGE, ["swapped"], folders=(d, bk))
    # a backup is not a disk, also when TARGET is new
    refused(["--full", full, os.path.join(d, "new.qcow2")], USAGE,
            [full, "is a backup made by cbt", "not a disk"], folders=(d, bk))
    # the disk as TARGET of another disk's backup: it has checkpoints
    other = os.path.join(d, "other.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", other, MiB)
    refused(["--full", other, vm], USAGE, [vm, "disk image with checkpoints", "swapped"],
            folders=(d, bk))
    # a disk with bitmaps only (made by qemu-img) counts too
    qemu_img("bitmap", "--add", other, "b0")
    refused(["--full", vm, other], USAGE, [other, "swapped"], folders=(d, bk))
    assert "remove" not in err
    res = cbt("verify", full)
    assert res.rc == 0, res
    qemu_img("check", vm)


def test_folder_as_target(setup):
    d, vm, bk = setup
    for target in (bk, bk + "/"):
        refused(["--full", vm, target], USAGE, ["is a folder", "NAME.qcow2"],
                folders=(d, bk))
    refused(["--incremental", vm, bk], USAGE, ["is a folder"], folders=(d, bk))


def test_existing_files_that_are_not_cbts(setup):
    d, vm, bk = setup
    plain = os.path.join(bk, "notes.txt")
    with open(plain, "w") as f:
        f.write("my notes")
    refused(["--full", vm, plain], FAILED, [plain, "not a backup made by cbt",
                                            "choose another name"], folders=(d, bk))
    # an image without checkpoints or bitmaps: not a disk cbt knows of
    img = os.path.join(bk, "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, MiB)
    refused(["--full", vm, img], FAILED, ["not a backup made by cbt"], folders=(d, bk))
    # a record file shorter than any cbt writes beside it: not cbt's
    with open(img + ".tree", "wb") as f:
        f.write(b"x" * 33)
    refused(["--full", vm, img], FAILED, ["not a backup made by cbt"], folders=(d, bk))
    # a link at TARGET.part is no work file of cbt
    os.symlink(plain, os.path.join(bk, "n.qcow2.part"))
    refused(["--full", vm, os.path.join(bk, "n.qcow2")], FAILED,
            ["n.qcow2.part", "not a regular file"], folders=(d, bk))


def test_leftovers_are_named(setup):
    """What an interrupted backup leaves (docs/backups.md, order of the
    steps) is recognised and may be removed."""
    d, vm, bk = setup
    t = os.path.join(bk, "b2.qcow2")
    # killed while writing the image: TARGET.part (+ TARGET.tree)
    with open(t + ".part", "wb") as f:
        f.write(b"partial image")
    refused(["--full", vm, t], FAILED, [t + ".part", "interrupted cbt backup",
                                        "remove it"], must_not=(), folders=(d, bk))
    with open(t + ".tree", "wb") as f:
        f.write(bytes(112))
    err = refused(["--full", vm, t], FAILED, ["remove it and " + t + ".tree"],
                  must_not=(), folders=(d, bk))
    # killed after the rename, before the manifest: TARGET + TARGET.tree
    os.rename(t + ".part", t)
    err = refused(["--incremental", vm, t], FAILED,
                  ["interrupted cbt backup", "remove %s and %s.tree" % (t, t)],
                  must_not=(), folders=(d, bk))
    assert "swapped" not in err
    # once removed, the backup goes on
    os.unlink(t)
    os.unlink(t + ".tree")
    qemu_io("-f", "qcow2", "-c", "write -P 8 1M 64k", vm)
    res = cbt("backup", "--incremental", "--output=json", vm, t)
    assert res.json()["kind"] == "incremental"
    cbt("verify", t)
    assert L.qemu_img("compare", "-q", vm, t, check=False).rc == 0
