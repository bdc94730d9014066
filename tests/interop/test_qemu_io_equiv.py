"""`cbt io` against `qemu-io`: the same seeded workload gives the same image.

Two byte-identical copies of a fresh qcow2 (optionally over a backing file)
get the same random command list: one through qemu-io, one through cbt io,
in batches of 50 `-c` commands per invocation.  Afterwards:
  * `qemu-img compare` says the guest contents are identical (exit 0),
  * `qemu-img map --output=json` agrees on start/length/depth/present/zero/
    data once host offsets are dropped (neighbours re-merged, since qemu-img
    map splits runs whose host clusters are not contiguous),
  * the cbt-written image passes `qemu-img check` (no corruption, no leaks).
"""
import os

import pytest

import interop_lib as L
from interop_lib import KiB, MiB, qemu_img, qemu_io

# id: (cluster_size, extended_l2, backing, compat, virtual size)
CONFIGS = {
    "c512": (512, False, False, "1.1", 1 * MiB),
    "c4k-backing": (4 * KiB, False, True, "1.1", 2 * MiB),
    "c8k": (8 * KiB, False, False, "1.1", 2 * MiB),
    "c64k": (64 * KiB, False, False, "1.1", 4 * MiB),
    "c64k-backing": (64 * KiB, False, True, "1.1", 4 * MiB),
    "c1M": (1 * MiB, False, False, "1.1", 8 * MiB),
    "c16k-l2ext-backing": (16 * KiB, True, True, "1.1", 2 * MiB),
    "c32k-l2ext": (32 * KiB, True, False, "1.1", 2 * MiB),
    "c64k-l2ext": (64 * KiB, True, False, "1.1", 4 * MiB),
    "c64k-l2ext-backing": (64 * KiB, True, True, "1.1", 4 * MiB),
    "c2M-l2ext-backing": (2 * MiB, True, True, "1.1", 8 * MiB),
    "c64k-v2-backing": (64 * KiB, False, True, "0.10", 4 * MiB),
}
NOPS = 250


def make_backing(d, size, seed):
    """A qcow2 base holding patterns, explicit zeroes and holes.

    It is 3/4 of the overlay's size, so the overlay's tail has no backing.
    """
    path = os.path.join(d, "base.qcow2")
    bsize = (size * 3 // 4) // 512 * 512
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", path, bsize)
    cmds = L.random_workload(seed, bsize, 64 * KiB, 40, discards=False)
    L.run_qemu_io(path, cmds)
    return path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_workload_same_image(tmp, name):
    cluster, l2ext, backing, compat, size = CONFIGS[name]
    d = str(tmp)
    seed = sum(map(ord, name))
    opts = "cluster_size=%d,compat=%s" % (cluster, compat)
    if l2ext:
        opts += ",extended_l2=on"
    create = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        make_backing(d, size, seed + 1)
        create += ["-b", "base.qcow2", "-F", "qcow2"]
    qemu_img(*(create + ["q.qcow2", size]), cwd=d)
    L.copy(os.path.join(d, "q.qcow2"), os.path.join(d, "c.qcow2"))

    cmds = L.random_workload(seed, size, cluster, NOPS)
    qimg, cimg = os.path.join(d, "q.qcow2"), os.path.join(d, "c.qcow2")
    L.run_qemu_io(qimg, cmds)
    L.run_cbt_io(cimg, cmds)

    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", qimg, cimg, check=False)
    assert cmp.rc == 0, "contents differ after the same workload:\n%r" % cmp

    want = L.coalesce(L.qemu_map(qimg))
    got = L.coalesce(L.qemu_map(cimg))
    L.assert_maps_equal(got, want, "allocation map (cbt-written vs qemu-written)")

    L.qemu_check_clean(cimg)
    info = L.qemu_json("info", "--output=json", "-f", "qcow2", cimg)
    assert info["virtual-size"] == size
    assert info["cluster-size"] == cluster
    assert info["format-specific"]["data"]["compat"] == compat


def test_read_verification_fails_on_mismatch(tmp):
    """cbt io read -P must verify, and report a mismatch in its exit status
    like qemu-io does (exit 1, "Pattern verification failed")."""
    img = os.path.join(str(tmp), "a.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x41 4096 8192", img)
    L.cbt_ok("io", "-f", "qcow2", "-r", "-c", "read -P 0x41 4096 8192", img)
    L.cbt_ok("io", "-f", "qcow2", "-r", "-c", "read -P 0 0 4096",
             "-c", "read -P 0 12288 4096", img)
    q = qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x42 4096 8192", img, check=False)
    assert q.rc == 1
    res = L.cbt_rc("io", "-f", "qcow2", "-r", "-c", "read -P 0x42 4096 8192", img)
    assert res.rc == q.rc, "cbt io did not fail a wrong pattern: %r" % res
    # off by one byte at the end of the written range
    res = L.cbt_rc("io", "-f", "qcow2", "-r", "-c", "read -P 0x41 4096 8193", img)
    assert res.rc != 0, "cbt io accepted a byte outside the pattern: %r" % res
