"""Compressed writes (`cbt io -c 'write -c ...'`) against QEMU's tools.

  * The same `write -c` commands through qemu-io and through cbt io on two
    byte-identical fresh images: the same output line by line (timings
    aside), including qemu-io's errors; `qemu-img compare` identical;
    `qemu-io read -P` verifies cbt's image; `qemu-img map --output=json`
    agrees on present/zero/data (host offsets dropped); `qemu-img check`
    is clean and `cbt check` reports the same counts (allocated, compressed,
    fragmented clusters).
  * Images compressed by `qemu-img convert -c` (QEMU's byte-packed layout)
    overwritten by cbt with normal, zero, discard and compressed writes stay
    clean and hold what a raw twin holds.
  * Internal snapshots (made by qemu-img) keep their data when cbt writes
    compressed over clusters they share, and normally over shared
    compressed clusters.
  * A seeded random series mixing compressed writes with normal writes,
    zero writes and discards equals the same series applied by qemu-io to a
    twin.  QEMU refuses compressed writes over clusters allocated in the
    layer (EIO) where cbt replaces them: for those the qemu twin gets the
    same data as a normal write, and cbt's image is also checked against a
    byte model of the series.
"""
import os
import random
import re

import pytest

import interop_lib as L
from interop_lib import KiB, MiB, qemu_img, qemu_io

TIMING = re.compile(r"^.*ops; .*$", re.M)


def norm_out(text):
    """qemu-io/cbt io output without the timing lines."""
    return TIMING.sub("<timing>", text)


def create(path, size, cluster, extra="", backing=None):
    opts = "cluster_size=%d" % cluster + ("," + extra if extra else "")
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    qemu_img(*(args + [path, size]))


def twins(d, size, cluster, extra="", backing=None):
    q, c = os.path.join(d, "q.qcow2"), os.path.join(d, "c.qcow2")
    create(q, size, cluster, extra, backing)
    L.copy(q, c)
    return q, c


def check_counts(path):
    """qemu-img check is clean and cbt check reports the same counts."""
    want = L.qemu_check_clean(path)
    got = L.cbt_json("check", "--output=json", path)
    for k in ("allocated-clusters", "total-clusters", "compressed-clusters",
              "fragmented-clusters", "check-errors"):
        assert got.get(k, 0) == want.get(k, 0), \
            "%s: cbt check %s=%r, qemu-img check %r" % (path, k, got.get(k), want.get(k))
    assert got.get("corruptions", 0) == 0 and got.get("leaks", 0) == 0, got
    return want


def compare_maps(cimg, qimg, keys=("depth", "present", "zero", "data")):
    want = L.coalesce(L.qemu_map(qimg), keys)
    got = L.coalesce(L.qemu_map(cimg), keys)
    L.assert_maps_equal(got, want, "qemu-img map (cbt-written vs qemu-written)")
    got_cbt = L.coalesce(L.cbt_map(cimg), keys)
    L.assert_maps_equal(got_cbt, want, "cbt map vs qemu-img map of the twin")


def model_bytes(path, d, name="model.raw"):
    out = os.path.join(d, name)
    qemu_img("convert", "-f", "qcow2", "-O", "raw", path, out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


# --------------------------------------------------------------------------
# write -c alone, command by command

# id: (cluster_size, virtual size, extra create options)
WRITE_C = {
    "c512": (512, 256 * KiB, ""),
    "c4k-tail": (4 * KiB, 1 * MiB + 1536, ""),
    "c64k": (64 * KiB, 4 * MiB, ""),
    "c64k-zstd-tail": (64 * KiB, 4 * MiB + 4096, "compression_type=zstd"),
    "c64k-v2": (64 * KiB, 2 * MiB, "compat=0.10"),
    "c32k-l2ext": (32 * KiB, 2 * MiB + 512, "extended_l2=on"),
    "c64k-rb1": (64 * KiB, 2 * MiB, "refcount_bits=1"),
    "c2M-l2ext-zstd": (2 * MiB, 6 * MiB + 64 * KiB,
                       "extended_l2=on,compression_type=zstd"),
}


def write_c_commands(size, cluster, seed):
    """Compressed writes to distinct unallocated clusters (so qemu-io accepts
    them all), plus qemu-io's error cases."""
    r = random.Random(seed)
    n = -(-size // cluster)
    free = list(range(n))
    r.shuffle(free)
    cmds = []
    # Runs of 1..3 clusters, starting anywhere free.
    taken = set()
    for c in free[: max(2, n // 3)]:
        if c in taken:
            continue
        k = 1
        while k < 3 and c + k < n and c + k not in taken and r.random() < 0.5:
            k += 1
        for i in range(c, c + k):
            taken.add(i)
        off = c * cluster
        length = min(k * cluster, size - off)
        cmds.append("write -c -P %d %d %d" % (r.randint(0, 255), off, length))
    # The tail (if short and still free) by itself.
    if size % cluster and (n - 1) not in taken:
        cmds.append("write -c -P 0x5a %d %d" % ((n - 1) * cluster, size % cluster))
    cmds += [
        "write -c -P 1 100 %d" % cluster,           # offset not sector-aligned
        "write -c -P 1 0 1000",                     # count not sector-aligned
        "write -c -P 1 %d %d" % (size, cluster),    # past the end
        "write -cq -P 7 %d 0" % (cluster,),         # empty
    ]
    if cluster > 512:
        cmds += ["write -c 512 %d" % cluster,       # not cluster-aligned
                 "write -c 0 %d" % (cluster // 2)]  # short, not at the end
    return cmds


@pytest.mark.parametrize("name", list(WRITE_C))
def test_write_c_like_qemu_io(tmp, name):
    cluster, size, extra = WRITE_C[name]
    d = str(tmp)
    qimg, cimg = twins(d, size, cluster, extra)
    cmds = write_c_commands(size, cluster, sum(map(ord, name)))
    for b in L.batches(cmds, 40):
        q = qemu_io("-f", "qcow2", *L.io_args(b), qimg, check=False)
        c = L.cbt_rc("io", "-f", "qcow2", *L.io_args(b), cimg)
        assert norm_out(c.out) == norm_out(q.out), \
            "output differs\ncbt:\n%s\nqemu-io:\n%s" % (c.out, q.out)
        assert (c.rc == 0) == (q.rc == 0), (c, q)

    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", qimg, cimg, check=False)
    assert cmp.rc == 0, "contents differ:\n%r" % cmp
    # qemu-io reads back every pattern from cbt's image.
    reads = []
    for c in cmds:
        m = re.match(r"write -c -P (\S+) (\d+) (\d+)$", c)
        if m and int(m.group(2)) + int(m.group(3)) <= size and \
                int(m.group(2)) % cluster == 0 and \
                (int(m.group(3)) % cluster == 0 or
                 int(m.group(2)) + int(m.group(3)) == size):
            reads.append("read -q -P %s %s %s" % m.groups())
    assert reads
    for b in L.batches(reads, 50):
        res = qemu_io("-f", "qcow2", "-r", *L.io_args(b), cimg, check=False)
        assert res.rc == 0 and "failed" not in res.out, res
    compare_maps(cimg, qimg)
    # Nothing compressed in a map means nothing was compressed: check it is.
    want = check_counts(qimg)
    got = check_counts(cimg)
    assert got["compressed-clusters"] == want["compressed-clusters"] > 0


def test_write_c_long_requests(tmp):
    """Requests longer than cbt io's 4 MiB chunk: a bad end fails the whole
    request before anything is written, as in qemu-io."""
    d = str(tmp)
    size = 12 * MiB + 4096
    qimg, cimg = twins(d, size, 64 * KiB)
    cmds = ["write -c -P 1 0 %d" % (5 * MiB - 64 * KiB + 512),   # EINVAL
            "write -c -P 2 %d %d" % (6 * MiB, 6 * MiB + 4096),  # to the end
            "write -c -P 3 0 %d" % (5 * MiB),
            "write -c -P 4 %d 4M" % (12 * MiB)]                  # past the end
    q = qemu_io("-f", "qcow2", *L.io_args(cmds), qimg, check=False)
    c = L.cbt_rc("io", "-f", "qcow2", *L.io_args(cmds), cimg)
    assert norm_out(c.out) == norm_out(q.out), (c, q)
    assert "write failed: Invalid argument" in c.out
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", qimg, cimg, check=False)
    assert cmp.rc == 0, cmp
    compare_maps(cimg, qimg)
    check_counts(cimg)


def test_write_c_refusals(tmp):
    """Raw images and external data files refuse like qemu-io."""
    d = str(tmp)
    raw_q, raw_c = os.path.join(d, "q.raw"), os.path.join(d, "c.raw")
    qemu_img("create", "-q", "-f", "raw", raw_q, 1 * MiB)
    qemu_img("create", "-q", "-f", "raw", raw_c, 1 * MiB)
    df_q, df_c = os.path.join(d, "q.qcow2"), os.path.join(d, "c.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             "data_file=" + os.path.join(d, "q.data"), df_q, 1 * MiB)
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             "data_file=" + os.path.join(d, "c.data"), df_c, 1 * MiB)
    for fmt, q, c in (("raw", raw_q, raw_c), ("qcow2", df_q, df_c)):
        cmd = ["-c", "write -c 0 64k", "-c", "write -c -P 3 64k 64k"]
        qo = qemu_io("-f", fmt, *cmd, q, check=False)
        co = L.cbt_rc("io", "-f", fmt, *cmd, c)
        assert "write failed: Operation not supported" in qo.out
        assert norm_out(co.out) == norm_out(qo.out), (co, qo)
        assert co.rc != 0
    # Read-only: like any write.
    res = L.cbt_rc("io", "-r", "-c", "write -c 0 64k", df_c)
    assert res.rc != 0 and "read-only" in res.err


# --------------------------------------------------------------------------
# Images compressed by qemu-img convert -c, then written by cbt

@pytest.mark.parametrize("cluster,extra", [(64 * KiB, ""), (4 * KiB, "compression_type=zstd"),
                                           (16 * KiB, "extended_l2=on")])
def test_overwrite_qemu_compressed(tmp, cluster, extra):
    d = str(tmp)
    size = 2 * MiB
    src = os.path.join(d, "src.raw")
    L.write_compressible(src, size, 7)
    with open(src, "r+b") as f:  # some incompressible clusters too
        f.seek(size // 2)
        f.write(random.Random(3).randbytes(3 * cluster))
    img = os.path.join(d, "img.qcow2")
    opts = "cluster_size=%d" % cluster + ("," + extra if extra else "")
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, src, img)
    before = check_counts(img)
    assert before["compressed-clusters"] > 0

    ref = os.path.join(d, "ref.raw")
    L.copy(src, ref)
    r = random.Random(11)
    n = size // cluster
    cmds, ref_cmds = [], []
    for _ in range(120):
        c = r.randrange(n)
        k = r.randint(1, min(3, n - c))
        off, length = c * cluster, k * cluster
        pat = r.randint(0, 255)
        kind = r.choice(["c", "c", "c", "w", "wu", "z", "zu", "d"])
        if kind == "c":
            cmds.append("write -c -P %d %d %d" % (pat, off, length))
            ref_cmds.append("write -P %d %d %d" % (pat, off, length))
        elif kind == "w":
            cmds.append("write -P %d %d %d" % (pat, off, length))
        elif kind == "wu":  # unaligned: copy-on-write of compressed clusters
            o2 = off + r.randrange(cluster)
            l2 = r.randint(1, length - (o2 - off))
            cmds.append("write -P %d %d %d" % (pat, o2, l2))
        elif kind == "z":
            cmds.append("write -z %d %d" % (off, length))
        elif kind == "zu":
            o2 = off + r.randrange(0, cluster, 512)
            cmds.append("write -z -u %d %d" % (o2, length - (o2 - off)))
        else:
            cmds.append("discard %d %d" % (off, length))
        if kind != "c":
            ref_cmds.append(cmds[-1])
    L.run_cbt_io(img, cmds)
    L.run_qemu_io(ref, ref_cmds, fmt="raw")
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, ref, check=False)
    assert cmp.rc == 0, "contents differ from the raw twin:\n%r" % cmp
    after = check_counts(img)
    assert after["compressed-clusters"] > 0


# --------------------------------------------------------------------------
# Internal snapshots share clusters with the active layer

@pytest.mark.parametrize("extra", ["", "extended_l2=on"])
def test_internal_snapshot_keeps_data(tmp, extra):
    d = str(tmp)
    cluster, size = 64 * KiB, 2 * MiB
    img = os.path.join(d, "img.qcow2")
    create(img, size, cluster, extra)
    # Compressed clusters in the first half, normal ones in the second.
    qemu_io("-f", "qcow2", "-c", "write -c -P 0x11 0 1M",
            "-c", "write -P 0x22 1M 1M", img)
    qemu_img("snapshot", "-c", "s1", img)
    snap_before = model_bytes(img, d)
    # cbt: compressed over shared normal clusters and over shared compressed
    # ones; normal over shared compressed; zeroes and discards.
    L.run_cbt_io(img, [
        "write -c -P 0x33 1M 256k",
        "write -c -P 0x44 0 128k",
        "write -P 0x55 256k 64k",
        "write -P 0x66 300k 10k",
        "write -z 512k 128k",
        "discard 1536k 128k",
        "write -c -P 0x77 1536k 64k",
    ])
    check_counts(img)
    model = bytearray(snap_before)
    for pat, off, length in ((0x33, 1 * MiB, 256 * KiB), (0x44, 0, 128 * KiB),
                             (0x55, 256 * KiB, 64 * KiB), (0x66, 300 * KiB, 10 * KiB),
                             (0, 512 * KiB, 128 * KiB), (0, 1536 * KiB, 128 * KiB),
                             (0x77, 1536 * KiB, 64 * KiB)):
        model[off:off + length] = bytes([pat]) * length
    assert model_bytes(img, d) == bytes(model)
    # The snapshot still reads as before.
    snap = os.path.join(d, "snap.raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=s1", img, snap)
    with open(snap, "rb") as f:
        assert f.read() == snap_before
    # Dropping the snapshot leaves a clean image with cbt's data.
    qemu_img("snapshot", "-d", "s1", img)
    check_counts(img)
    assert model_bytes(img, d) == bytes(model)


# --------------------------------------------------------------------------
# Random mixes against a qemu-io twin and a model

# id: (cluster_size, extended_l2, backing, compat, zstd, virtual size)
MIX = {
    "c4k": (4 * KiB, False, False, "1.1", False, 1 * MiB + 2048),
    "c64k-backing": (64 * KiB, False, True, "1.1", False, 4 * MiB),
    "c64k-zstd": (64 * KiB, False, False, "1.1", True, 4 * MiB),
    "c16k-l2ext-backing": (16 * KiB, True, True, "1.1", False, 2 * MiB),
    "c64k-v2": (64 * KiB, False, False, "0.10", False, 2 * MiB),
    "c512-rb2": (512, False, False, "1.1", False, 512 * KiB),
}
NOPS = 160


def mix_workload(seed, size, cluster):
    r = random.Random(seed)
    base = L.random_workload(seed, size, cluster, NOPS)
    n = -(-size // cluster)
    out = []
    for cmd in base:
        out.append(cmd)
        if r.random() < 0.4:
            c = r.randrange(n)
            k = r.randint(1, min(4, n - c))
            off = c * cluster
            out.append("write -c -P %d %d %d" % (r.randint(0, 255), off,
                                                 min(k * cluster, size - off)))
    return out


def apply_model(model, cmd, cluster, v2_backing):
    parts = cmd.split()
    off, length = int(parts[-2]), int(parts[-1])
    if parts[0] == "discard":
        L._ct.qcow2_discard(model, off, length, cluster, v2_backing)
    elif "-z" in parts:
        model[off:off + length] = bytes(length)
    else:
        pat = int(parts[parts.index("-P") + 1], 0) if "-P" in parts else 0xcd
        model[off:off + length] = bytes([pat]) * length


@pytest.mark.parametrize("name", list(MIX))
def test_random_mix(tmp, name):
    cluster, l2ext, backing, compat, zstd, size = MIX[name]
    d = str(tmp)
    seed = sum(map(ord, name)) * 7
    extra = "compat=%s" % compat
    if l2ext:
        extra += ",extended_l2=on"
    if zstd:
        extra += ",compression_type=zstd"
    if name.endswith("rb2"):
        extra += ",refcount_bits=2"
    model = bytearray(size)
    back = None
    if backing:
        back = os.path.join(d, "base.qcow2")
        create(back, size, 64 * KiB)
        bcmds = L.random_workload(seed + 1, size, 64 * KiB, 40, discards=False)
        L.run_qemu_io(back, bcmds)
        model = bytearray(model_bytes(back, d, "base.raw"))
    qimg, cimg = twins(d, size, cluster, extra, "base.qcow2" if backing else None)
    cmds = mix_workload(seed, size, cluster)
    v2_backing = compat == "0.10" and backing

    # qemu twin: each compressed write on its own, replaced by a normal
    # write of the same data where qemu refuses it (cluster allocated).
    pending, replaced = [], 0
    for cmd in cmds:
        apply_model(model, cmd, cluster, v2_backing)
        if not cmd.startswith("write -c"):
            pending.append(cmd)
            continue
        if pending:
            L.run_qemu_io(qimg, pending)
            pending = []
        res = qemu_io("-f", "qcow2", "-c", cmd, qimg, check=False)
        if "write failed: Input/output error" in res.out:
            qemu_io("-f", "qcow2", "-c", cmd.replace("write -c", "write"), qimg)
            replaced += 1
        else:
            assert res.rc == 0 and "failed" not in res.out, res
    if pending:
        L.run_qemu_io(qimg, pending)
    L.run_cbt_io(cimg, cmds)
    assert replaced > 0  # the series does overwrite allocated clusters

    assert model_bytes(cimg, d) == bytes(model), "cbt's image differs from the model"
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", qimg, cimg, check=False)
    assert cmp.rc == 0, "contents differ from the qemu twin:\n%r" % cmp
    got = check_counts(cimg)
    assert got["compressed-clusters"] > 0
    # Where qemu wrote normally, cbt has compressed clusters; with extended
    # L2 a partial zero write then differs (qemu sets zero bits in a normal
    # cluster, cbt rewrites the compressed one as data), so only allocation
    # is compared there.
    keys = ("depth", "present") if l2ext else ("depth", "present", "zero", "data")
    compare_maps(cimg, qimg, keys)
