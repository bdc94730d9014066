"""Bitmaps of 4 KiB granularity on a 4 TiB disk (2^30 bits, 128 MiB each),
changed by cbt and by qemu-img from the same image, compared through QEMU
(qemu-nbd -B + nbdinfo --map) -- issue 14: copies of bitmaps share pages
until one side changes them, so an action that changes a shared page must
change only its own bitmap, and a rollback must find the old bits.

The dirty granules are scattered over the first 256 GiB and the last
64 GiB (every few hundred MiB, so many 32768-bit pages hold memory in cbt)
and a long dirty run in the middle (whole pages), written with qemu-io
zero writes (2 MiB clusters keep the image small).  Then:
  - --merge b1 into b2 by cbt and by qemu-img: QEMU exports the same b2,
    b1 unchanged, and cbt's --dump and --count of qemu-img's result agree;
  - several actions in one command (--merge, --disable, --clear of another
    bitmap, --enable): the same result as qemu-img running them one by one;
  - an action that fails after a merge (--rename to a taken name): the
    file is byte-identical and QEMU exports the bitmaps as before.
"""
import hashlib
import os
import random
import shutil

import pytest

from interop_lib import (GiB, MiB, cbt_ok, cbt_rc, cbt_dump, dirty_count,
                         ext_coalesce, qemu_bitmap_extents, qemu_img, qemu_io)

TiB = 1024 * GiB
SIZE = 4 * TiB
G = 4096


def sha_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return h.hexdigest()


def writes(rng, n, lo, hi):
    return ["write -z %d %d" % (rng.randrange(lo, hi) // G * G,
                                G * rng.randint(1, 3))
            for _ in range(n)]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    d = tmp_path_factory.mktemp("bmscale")
    img = str(d / "tmpl.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", img,
             str(SIZE))
    rng = random.Random(14)
    qemu_img("bitmap", "--add", "-g", "4K", img, "b1")
    cmds = (writes(rng, 600, 0, 256 * GiB) +
            writes(rng, 100, SIZE - 64 * GiB, SIZE - G * 3) +
            ["write -z %d %d" % (100 * GiB, 256 * MiB)])
    qemu_io("-f", "qcow2", img, *sum((["-c", c] for c in cmds), []))
    qemu_img("bitmap", "--add", "-g", "4K", img, "b2")
    qemu_img("bitmap", "--add", "-g", "4K", img, "b3")
    cmds = writes(rng, 300, 0, 256 * GiB) + writes(rng, 50, SIZE - 64 * GiB,
                                                   SIZE - G * 3)
    qemu_io("-f", "qcow2", img, *sum((["-c", c] for c in cmds), []))
    return img


def copies(template, tmp_path):
    a, b = str(tmp_path / "cbt.qcow2"), str(tmp_path / "qemu.qcow2")
    shutil.copyfile(template, a)
    shutil.copyfile(template, b)
    return a, b


def test_merge_like_qemu_img(template, tmp_path):
    a, b = copies(template, tmp_path)
    before = qemu_bitmap_extents(template, ["b1", "b2"])
    cbt_ok("bitmap", "--merge", "b1", a, "b2")
    qemu_img("bitmap", "--merge", "b1", b, "b2")
    got = qemu_bitmap_extents(a, ["b1", "b2"])
    want = qemu_bitmap_extents(b, ["b1", "b2"])
    assert got == want
    assert got["b1"] == before["b1"]
    assert got["b2"] != before["b2"]
    # cbt reads what qemu-img wrote
    assert ext_coalesce(cbt_dump(b, "b2")) == want["b2"]
    count = cbt_ok("bitmap", "--count", b, "b2").out.strip()
    assert int(count) == dirty_count(want["b2"], G)
    qemu_img("check", a)


def test_several_actions_like_qemu_img(template, tmp_path):
    a, b = copies(template, tmp_path)
    cbt_ok("bitmap", "--merge", "b1", "--disable", a, "b2")
    cbt_ok("bitmap", "--clear", "--merge", "b2", a, "b3")
    qemu_img("bitmap", "--merge", "b1", "--disable", b, "b2")
    qemu_img("bitmap", "--clear", "--merge", "b2", b, "b3")
    names = ["b1", "b2", "b3"]
    assert qemu_bitmap_extents(a, names) == qemu_bitmap_extents(b, names)
    qemu_img("check", a)


def test_failed_action_after_merge_changes_nothing(template, tmp_path):
    a, _ = copies(template, tmp_path)
    names = ["b1", "b2", "b3"]
    before = qemu_bitmap_extents(a, names)
    digest = sha_file(a)
    res = cbt_rc("bitmap", "--merge", "b1", "--rename", "b3", a, "b2")
    assert res.rc != 0
    assert "b3" in res.err
    assert sha_file(a) == digest
    assert qemu_bitmap_extents(a, names) == before
