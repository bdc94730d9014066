"""Images written by QEMU read identically in cbt.

Each builder makes a qcow2 (or chain) with qemu-img / qemu-io and returns the
image to open plus regions whose pattern it knows.  For each image:
  * REF.raw = `qemu-img convert -O raw IMG REF.raw` (QEMU's view of the guest
    data) and `cbt compare IMG REF.raw` must exit 0;
  * `cbt io -r -c 'read -P N off len'` passes on every known region, and a
    wrong pattern on one of them fails (exit 1, as qemu-io);
  * one changed byte in a copy of REF.raw (in a data region, and in a
    zero/unallocated region) makes `cbt compare` exit 1.
"""
import os
import random
import shutil

import pytest

import interop_lib as L
from interop_lib import KiB, MiB, qemu_img, qemu_io


def create(d, name, size, opts="", backing=None, bfmt="qcow2", cwd=None):
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", backing, "-F", bfmt]
    qemu_img(*(args + [name, size]), cwd=cwd or d)
    return os.path.join(cwd or d, name)


def qio(path, cmds, cwd=None):
    for b in L.batches(cmds, 50):
        qemu_io("-f", "qcow2", *L.io_args(b), path, cwd=cwd)


def known_writes(size, seed, n=6, avoid=()):
    """Non-overlapping pattern writes (unaligned), returned as commands and
    (pattern, off, len) regions.  Done last, so they are what must be read."""
    r = random.Random(seed)
    regions = []
    span = size // n
    for i in range(n):
        off = i * span + r.randrange(0, span // 2)
        length = r.randrange(1, span // 2)
        regions.append((r.randint(1, 255), off, length))
    return ["write -P %d %d %d" % reg for reg in regions], regions


# ---------------------------------------------------------------------------
# Builders: return dict(img=path, cwd=dir to run in, regions=[...])


def b_cluster(cluster, size):
    def build(d):
        img = create(d, "img.qcow2", size, "cluster_size=%d" % cluster)
        qio(img, L.random_workload(cluster, size, cluster, 80))
        cmds, regions = known_writes(size, cluster)
        qio(img, cmds)
        return dict(img=img, regions=regions)
    return build


def b_refcount(bits):
    def build(d):
        img = create(d, "img.qcow2", 4 * MiB, "refcount_bits=%d" % bits)
        qio(img, L.random_workload(bits, 4 * MiB, 64 * KiB, 60))
        cmds, regions = known_writes(4 * MiB, bits)
        qio(img, cmds)
        return dict(img=img, regions=regions)
    return build


def b_l2ext(cluster, size, backing):
    def build(d):
        sub = cluster // 32
        bimg = None
        if backing:
            bimg = create(d, "base.qcow2", size)
            qio(bimg, ["write -P 0x77 0 %d" % size])
        img = create(d, "img.qcow2", size, "extended_l2=on,cluster_size=%d" % cluster,
                     backing="base.qcow2" if backing else None)
        # subcluster-sized and sub-subcluster writes, zeroes and discards;
        # with a backing file the last cluster is kept for the check below
        work = size - cluster if backing else size
        cmds = []
        r = random.Random(cluster + backing)
        for _ in range(60):
            s = r.randrange(work // sub)
            k = r.choice(["w", "w", "wpart", "z", "d"])
            if k == "w":
                n = min(sub * r.randint(1, 3), work - s * sub)
                cmds.append("write -P %d %d %d" % (r.randint(1, 255), s * sub, n))
            elif k == "wpart":
                off = s * sub + r.randrange(sub)
                n = min(r.randint(1, sub), work - off)
                cmds.append("write -P %d %d %d" % (r.randint(1, 255), off, n))
            elif k == "z":
                n = min(sub * r.randint(1, 2), work - s * sub)
                cmds.append("write -z %d %d" % (s * sub, n))
            else:
                n = min(sub * r.randint(1, 4), work - s * sub)
                cmds.append("discard %d %d" % (s * sub, n))
        qio(img, cmds)
        kcmds, regions = known_writes(work, cluster + 1, n=8)
        qio(img, kcmds)
        if backing:
            # the last cluster's upper subclusters stay untouched above the
            # base: they must read the base's 0x77 through the overlay
            last = size - cluster
            qio(img, ["write -P 0x99 %d %d" % (last, sub)])
            regions.append((0x99, last, sub))
            regions.append((0x77, last + sub, cluster - sub))
        return dict(img=img, regions=regions)
    return build


def b_compressed(ctype, cluster, extra_writes):
    def build(d):
        raw = os.path.join(d, "src.raw")
        L.write_compressible(raw, 2 * MiB, seed=cluster)
        img = os.path.join(d, "img.qcow2")
        opts = "cluster_size=%d" % cluster
        if ctype:
            opts += ",compression_type=%s" % ctype
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, raw, img)
        data = L.qemu_json("check", "--output=json", "-f", "qcow2", img)
        assert data.get("compressed-clusters", 0) >= (2 * MiB // cluster) // 2, \
            "builder produced too few compressed clusters: %s" % data
        regions = []
        if extra_writes:
            # partial overwrites of compressed clusters (COW from compressed)
            cmds, regions = known_writes(2 * MiB, cluster, n=5)
            qio(img, cmds + ["write -z %d %d" % (cluster, cluster)])
            # keep the regions the zero-write did not touch, and add it
            regions = [r for r in regions if r[1] >= 2 * cluster or r[1] + r[2] <= cluster]
            regions.append((0, cluster, cluster))
        return dict(img=img, regions=regions)
    return build


def b_compat010(d):
    base = create(d, "base.qcow2", 4 * MiB, "compat=0.10,cluster_size=4096")
    qio(base, ["write -P 0x31 0 4M"])
    img = create(d, "img.qcow2", 4 * MiB, "compat=0.10", backing="base.qcow2")
    qio(img, L.random_workload(10, 4 * MiB, 64 * KiB, 60))
    cmds, regions = known_writes(4 * MiB, 10)
    qio(img, cmds)
    return dict(img=img, regions=regions)


def b_chain(layers, opened_from):
    """base <- mid <- top in sub folders with relative names, opened from
    another cwd.  Layout: d/imgs/base.qcow2, d/imgs/mid/mid.qcow2 (backing
    ../base.qcow2), d/imgs/top.qcow2 (backing mid/mid.qcow2)."""
    def build(d):
        imgs = os.path.join(d, "imgs")
        os.makedirs(os.path.join(imgs, "mid"))
        size = 4 * MiB
        regions = []
        base = create(imgs, "base.qcow2", "3M", "cluster_size=4096")
        qio(base, ["write -P 0x10 0 3M", "write -z 1M 256k", "discard 2M 64k"])
        regions += [(0x10, 0, 64 * KiB), (0x10, 96 * KiB, 512 * KiB - 96 * KiB),
                    (0x10, 512 * KiB + 100000, 512 * KiB - 100000),
                    (0, 1 * MiB, 256 * KiB), (0, 2 * MiB, 64 * KiB)]
        below = "base.qcow2"
        if layers == 3:
            create(imgs, "mid/mid.qcow2", size, "cluster_size=65536",
                   backing="../base.qcow2")
            qio(os.path.join(imgs, "mid", "mid.qcow2"),
                ["write -P 0x20 1536k 128k", "write -z 2560k 64k", "write -P 0x21 3M 512k"])
            regions += [(0x20, 1536 * KiB, 128 * KiB), (0, 2560 * KiB, 64 * KiB),
                        (0x21, 3 * MiB, 512 * KiB)]
            below = "mid/mid.qcow2"
        top = create(imgs, "top.qcow2", size, "cluster_size=16384", backing=below)
        qio(top, ["write -P 0x30 512k 100000", "write -P 0x31 3600k 10000",
                  "write -z 64k 32k"])
        regions += [(0x30, 512 * KiB, 100000), (0x31, 3600 * KiB, 10000),
                    (0, 64 * KiB, 32 * KiB), (0, 3 * MiB + 512 * KiB, 16 * KiB)]
        if layers == 2:
            regions.append((0, 3 * MiB, 512 * KiB))  # past the base's end
        # the cbt process runs from `cwd`, naming the image relative to it
        if opened_from == "parent":
            return dict(img=top, cwd=d, name=os.path.join("imgs", "top.qcow2"),
                        regions=regions)
        return dict(img=top, cwd="/", name=top, regions=regions)
    return build


def b_raw_backing(d):
    raw = os.path.join(d, "base.raw")
    L.write_random(raw, 2 * MiB, 7)
    img = create(d, "img.qcow2", 3 * MiB, backing="base.raw", bfmt="raw")
    qio(img, ["write -P 0x44 1M 64k", "write -P 0x45 2M 4096", "write -z 100k 4k"])
    return dict(img=img, regions=[(0x44, 1 * MiB, 64 * KiB), (0x45, 2 * MiB, 4096),
                                  (0, 2 * MiB + 4096, 1 * MiB - 4096)])


def b_data_file(raw_flag):
    def build(d):
        opts = "data_file=img.data" + (",data_file_raw=on" if raw_flag else "")
        img = create(d, "img.qcow2", 4 * MiB, opts)
        # QEMU resolves the relative data file name against the cwd: run in d
        qio(img, L.random_workload(3, 4 * MiB, 64 * KiB, 50), cwd=d)
        cmds, regions = known_writes(4 * MiB, 3)
        qio(img, cmds, cwd=d)
        return dict(img=img, cwd=d, name="img.qcow2", regions=regions)
    return build


def b_snapshots(d):
    img = create(d, "img.qcow2", 4 * MiB, "cluster_size=4096")
    qio(img, ["write -P 0x51 0 4M"])
    qemu_img("snapshot", "-c", "s1", img)
    qio(img, ["write -P 0x52 1M 1M", "write -z 3M 128k", "discard 3584k 64k"])
    qemu_img("snapshot", "-c", "s2", img)
    qio(img, ["write -P 0x53 1536k 5000", "write -P 0x54 0 8192"])
    return dict(img=img, regions=[(0x54, 0, 8192), (0x51, 8192, 1 * MiB - 8192),
                                  (0x52, 1 * MiB, 512 * KiB), (0x53, 1536 * KiB, 5000),
                                  (0, 3 * MiB, 128 * KiB), (0, 3584 * KiB, 64 * KiB)])


def b_snapshot_applied(d):
    img = create(d, "img.qcow2", 2 * MiB)
    qio(img, ["write -P 0x61 0 2M"])
    qemu_img("snapshot", "-c", "s1", img)
    qio(img, ["write -P 0x62 0 1M"])
    qemu_img("snapshot", "-a", "s1", img)
    qio(img, ["write -P 0x63 1M 4096"])
    return dict(img=img, regions=[(0x61, 0, 1 * MiB), (0x63, 1 * MiB, 4096)])


def b_short_backing(d):
    base = create(d, "base.qcow2", "1M")
    qio(base, ["write -P 0x71 0 1M"])
    img = create(d, "img.qcow2", "3M", backing="base.qcow2")
    qio(img, ["write -P 0x72 512k 4096"])
    return dict(img=img, regions=[(0x71, 0, 512 * KiB), (0x72, 512 * KiB, 4096),
                                  (0x71, 512 * KiB + 4096, 512 * KiB - 4096),
                                  (0, 1 * MiB, 2 * MiB)])


BUILDERS = {
    "cs512": b_cluster(512, 1 * MiB),
    "cs1k": b_cluster(1024, 2 * MiB),
    "cs4k": b_cluster(4096, 4 * MiB),
    "cs64k": b_cluster(65536, 4 * MiB),
    "cs512k": b_cluster(512 * KiB, 6 * MiB),
    "cs2M": b_cluster(2 * MiB, 8 * MiB),
    "rc1": b_refcount(1),
    "rc2": b_refcount(2),
    "rc4": b_refcount(4),
    "rc8": b_refcount(8),
    "rc16": b_refcount(16),
    "rc32": b_refcount(32),
    "rc64": b_refcount(64),
    "l2ext-64k": b_l2ext(64 * KiB, 2 * MiB, False),
    "l2ext-64k-backing": b_l2ext(64 * KiB, 2 * MiB, True),
    "l2ext-16k-backing": b_l2ext(16 * KiB, 1 * MiB, True),
    "l2ext-2M-backing": b_l2ext(2 * MiB, 4 * MiB, True),
    "zlib-64k": b_compressed(None, 64 * KiB, False),
    "zlib-4k-overwritten": b_compressed("zlib", 4 * KiB, True),
    "zstd-64k": b_compressed("zstd", 64 * KiB, False),
    "zstd-64k-overwritten": b_compressed("zstd", 64 * KiB, True),
    "zstd-512": b_compressed("zstd", 512, False),
    "compat010-backing": b_compat010,
    "chain2-from-parent": b_chain(2, "parent"),
    "chain3-from-parent": b_chain(3, "parent"),
    "chain3-from-root": b_chain(3, "root"),
    "raw-backing": b_raw_backing,
    "data_file": b_data_file(False),
    "data_file_raw": b_data_file(True),
    "snapshots": b_snapshots,
    "snapshot-applied": b_snapshot_applied,
    "short-backing": b_short_backing,
}


def regions_ok(size, regions):
    return [r for r in regions if r[2] > 0 and r[1] + r[2] <= size]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_read_identically(tmp, name):
    d = str(tmp)
    spec = BUILDERS[name](d)
    img = spec["img"]
    cwd = spec.get("cwd", d)
    name_in_cwd = spec.get("name", img)
    ref = os.path.join(d, "REF.raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", name_in_cwd, ref, cwd=cwd)
    size = os.path.getsize(ref)

    # whole-image comparison against QEMU's view
    res = L.cbt_rc("compare", "-f", "qcow2", "-F", "raw", name_in_cwd, ref, cwd=cwd)
    assert res.rc == 0, "cbt compare says the image differs from qemu's view:\n%r" % res

    # known regions, through cbt io's read verification
    regions = regions_ok(size, spec["regions"])
    if regions:
        cmds = ["read -P %d %d %d" % reg for reg in regions]
        res = L.cbt_rc("io", "-f", "qcow2", "-r", *L.io_args(cmds), name_in_cwd, cwd=cwd)
        assert res.rc == 0, "cbt io read -P failed on a known region:\n%r" % res
        pat, off, length = regions[0]
        res = L.cbt_rc("io", "-f", "qcow2", "-r", "-c",
                       "read -P %d %d %d" % ((pat + 1) % 256, off, length), name_in_cwd, cwd=cwd)
        assert res.rc == 1, "cbt io accepted a wrong pattern:\n%r" % res

    # the comparison can fail: one changed byte in the reference
    with open(ref, "rb") as f:
        data = f.read()
    r = random.Random(name)
    nonzero = [i for i in range(0, size, 4093) if data[i] != 0]
    zero = [i for i in range(0, size, 4093) if data[i] == 0]
    for label, cands in (("data", nonzero), ("zero", zero)):
        if not cands:
            continue
        pos = r.choice(cands)
        bad = os.path.join(d, "BAD-%s.raw" % label)
        shutil.copyfile(ref, bad)
        with open(bad, "r+b") as f:
            f.seek(pos)
            f.write(bytes([data[pos] ^ 0x5A]))
        q = qemu_img("compare", "-f", "qcow2", "-F", "raw", name_in_cwd, bad,
                     cwd=cwd, check=False)
        assert q.rc == 1, q
        res = L.cbt_rc("compare", "-f", "qcow2", "-F", "raw", name_in_cwd, bad, cwd=cwd)
        assert res.rc == 1, "cbt compare missed a changed byte at %d (%s region):\n%r" % (
            pos, label, res)
