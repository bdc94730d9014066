"""cbt convert against qemu-img convert on the same sources.

For a matrix of sources (qcow2 chains of depth 1..3 made by qemu-io with
random writes, zero-pattern writes, zero-writes and discards; a compressed
qcow2 made by qemu-img convert -c; a sparse raw file; extended L2; 512 B and
2 MiB clusters) and targets (qcow2, qcow2 with other cluster sizes, raw, -c,
-B base), cbt's target must:
  * read as the source (qemu-img compare),
  * be clean (qemu-img check),
  * have the allocation qemu-img convert's target has on the same source
    (qemu-img map --output=json: present/zero/data and depth per range,
    host offsets left out), except that QEMU always allocates the first
    4 KiB of a raw file it creates (file-posix probes the block size there),
    which cbt does not;
  * with -c, hold exactly as many compressed clusters as qemu-img's.

And --bitmaps: cbt unions each bitmap over the chain where qemu-img copies
the top layer's only; inconsistent copies are refused before any file is
made, or skipped with --skip-broken-bitmaps.
"""
import json
import os
import random

import pytest

import interop_lib as L
from interop_lib import KiB, MiB, cbt, qemu_img, qemu_io, no_crash

SIZE = 6 * MiB


def workload(seed, size, cluster, n):
    """qemu-io commands: random writes, zero-writes and discards (as the
    shared generator makes them) plus data writes of zeroes, and writes
    whose data holds sub-4 KiB and multi-4 KiB zero holes, so that the
    sparse detection of both tools is exercised."""
    r = random.Random(seed * 7919 + 1)
    cmds = L.random_workload(seed, size, cluster, n)
    for _ in range(n // 3):
        off = r.randrange(size // 512) * 512
        length = min(size - off, 512 * r.randint(1, 64))
        cmds.insert(r.randrange(len(cmds) + 1),
                    "write -P 0 %d %d" % (off, length))
    for _ in range(n // 4):
        # pattern, then a zero hole of 512 B .. 12 KiB inside it
        off = r.randrange(size // 512 - 64) * 512
        length = 512 * r.randint(16, 64)
        hole = 512 * r.randint(1, 24)
        hoff = off + 512 * r.randrange(max(1, (length - hole) // 512))
        cmds.append("write -P %d %d %d" % (r.randint(1, 255), off, length))
        cmds.append("write -P 0 %d %d" % (hoff, min(hole, off + length - hoff)))
    return cmds


def make_chain(d, name, depth, seed, opts="", size=SIZE, cluster=64 * KiB,
               n=40):
    """base <- ... <- top (depth layers), each changed by its own workload.
    Returns the paths, top first."""
    paths = []
    prev = None
    for i in range(depth):
        p = os.path.join(d, "%s.%d.qcow2" % (name, i))
        args = ["create", "-q", "-f", "qcow2"]
        if opts:
            args += ["-o", opts]
        if prev:
            args += ["-b", os.path.basename(prev), "-F", "qcow2", p]
        else:
            args += [p, size]
        qemu_img(*args)
        L.run_qemu_io(p, workload(seed + i, size, cluster, n))
        paths.insert(0, p)
        prev = p
    return paths


def make_raw(d, seed):
    """A sparse raw file: data, zero-filled data blocks and holes."""
    r = random.Random(seed)
    p = os.path.join(d, "src.raw")
    with open(p, "wb") as f:
        f.truncate(SIZE)
        for _ in range(30):
            off = r.randrange(SIZE // 512) * 512
            length = min(SIZE - off, 512 * r.randint(1, 200))
            f.seek(off)
            if r.random() < 0.3:
                f.write(bytes(length))
            else:
                f.write(bytes([r.randint(1, 255)]) * length)
    return p


def make_compressed(d, seed):
    raw = os.path.join(d, "compressible.raw")
    L.write_compressible(raw, 2 * MiB, seed)
    with open(raw, "r+b") as f:
        f.seek(512 * KiB)
        f.write(bytes(300 * KiB))  # zero data inside
        f.truncate(SIZE)           # a hole at the end
    p = os.path.join(d, "compressed.qcow2")
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", raw, p)
    return p


# name -> (builder(dir) -> [paths top first], format)
SOURCES = {
    "chain1": (lambda d: make_chain(d, "c1", 1, 11), "qcow2"),
    "chain2": (lambda d: make_chain(d, "c2", 2, 21), "qcow2"),
    "chain3": (lambda d: make_chain(d, "c3", 3, 31), "qcow2"),
    "ext_l2": (lambda d: make_chain(d, "xl2", 2, 41, "extended_l2=on"), "qcow2"),
    "c512": (lambda d: make_chain(d, "s512", 2, 51, "cluster_size=512",
                                  size=2 * MiB, cluster=512, n=60), "qcow2"),
    "c1k": (lambda d: make_chain(d, "s1k", 2, 94, "cluster_size=1k",
                                 size=2 * MiB, cluster=1024, n=80), "qcow2"),
    "c2m": (lambda d: make_chain(d, "s2m", 2, 61, "cluster_size=2M",
                                 size=8 * MiB, cluster=2 * MiB), "qcow2"),
    "compressed": (lambda d: [make_compressed(d, 71)], "qcow2"),
    "raw": (lambda d: [make_raw(d, 81)], "raw"),
}

# name -> (extra convert args, target format)
TARGETS = {
    "qcow2": (["-O", "qcow2"], "qcow2"),
    "qcow2_512": (["-O", "qcow2", "-o", "cluster_size=512"], "qcow2"),
    "qcow2_4k": (["-O", "qcow2", "-o", "cluster_size=4k"], "qcow2"),
    "qcow2_2m": (["-O", "qcow2", "-o", "cluster_size=2M"], "qcow2"),
    "qcow2_xl2": (["-O", "qcow2", "-o", "extended_l2=on"], "qcow2"),
    "raw": (["-O", "raw"], "raw"),
    "compress": (["-O", "qcow2", "-c"], "qcow2"),
    "backing": (["-O", "qcow2"], "qcow2"),  # -B added per source
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("convsrc"))
    return {name: (build(d), fmt) for name, (build, fmt) in SOURCES.items()}


def norm_map(path, fmt, skip_first=0):
    entries = L.coalesce(L.qemu_map(path, fmt), ("depth", "present", "zero",
                                                 "data"))
    out = []
    for e in entries:
        end = e["start"] + e["length"]
        if end <= skip_first:
            continue
        if e["start"] < skip_first:
            e = dict(e, start=skip_first, length=end - skip_first)
        out.append(e)
    return out


def check_json(path):
    res = qemu_img("check", "--output=json", path, check=False)
    assert res.rc == 0, res
    data = json.loads(res.out)
    assert data.get("corruptions", 0) == 0 and data.get("leaks", 0) == 0, data
    return data


CASES = [(s, t) for s in SOURCES for t in TARGETS
         if not (t == "backing" and SOURCES[s][1] == "raw")
         and not (t == "backing" and s in ("compressed",))]


@pytest.mark.parametrize("src_name,tgt_name", CASES,
                         ids=["%s-%s" % c for c in CASES])
def test_convert_matches_qemu(sources, tmp_path, src_name, tgt_name):
    paths, sfmt = sources[src_name]
    src = paths[0]
    args, tfmt = TARGETS[tgt_name]
    args = list(args)
    if tgt_name == "backing":
        if len(paths) > 1:
            base = paths[1]
        else:
            # A standalone source over an unrelated base: what the top does
            # not allocate reads as zeroes, so everything is copied.
            base = os.path.join(str(tmp_path), "other-base.qcow2")
            qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
            qemu_io("-c", "write -P 9 0 1M", base)
        args += ["-B", os.path.abspath(base), "-F", "qcow2"]
    ours = os.path.join(str(tmp_path), "cbt." + tfmt)
    theirs = os.path.join(str(tmp_path), "qemu." + tfmt)

    res = no_crash(cbt("convert", "-f", sfmt, *args, src, ours, check=False))
    assert res.rc == 0 and res.out == "" and res.err == "", res
    qemu_img("convert", "-f", sfmt, *args, src, theirs)

    cmp = qemu_img("compare", "-f", sfmt, "-F", tfmt, src, ours, check=False)
    assert cmp.rc == 0, cmp
    if tfmt == "qcow2":
        ours_check = check_json(ours)
        assert ours_check.get("check-errors", 0) == 0
    skip = 4 * KiB if tfmt == "raw" else 0
    got = norm_map(ours, tfmt, skip)
    want = norm_map(theirs, tfmt, skip)
    L.assert_maps_equal(got, want, "%s -> %s" % (src_name, tgt_name))
    if tgt_name == "compress":
        theirs_check = check_json(theirs)
        assert ours_check.get("compressed-clusters", 0) == \
            theirs_check.get("compressed-clusters", 0), (ours_check, theirs_check)
        assert ours_check.get("compressed-clusters", 0) > 0
    if tgt_name == "backing":
        info = json.loads(qemu_img("info", "--output=json", ours).out)
        assert info["backing-filename"] == args[args.index("-B") + 1]
        assert info["backing-filename-format"] == "qcow2"


def test_compressed_source_to_compressed(sources, tmp_path):
    """A compressed source converted with -c: qemu-img map shows the
    clusters as data, qemu-img check counts them compressed."""
    paths, _ = sources["compressed"]
    ours = os.path.join(str(tmp_path), "c.qcow2")
    cbt("convert", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
        paths[0], ours)
    qemu_img("compare", paths[0], ours)
    data = check_json(ours)
    assert data["compressed-clusters"] >= 20, data
    info = json.loads(qemu_img("info", "--output=json", ours).out)
    assert info["format-specific"]["data"]["compression-type"] == "zstd"


def test_no_create_matches_qemu(sources, tmp_path):
    """-n into an existing, larger, dirty target: zero ranges of the source
    are written as zeroes, data copied, the tail past the source left."""
    paths, _ = sources["chain2"]
    targets = []
    for who in ("cbt", "qemu"):
        t = os.path.join(str(tmp_path), who + ".qcow2")
        qemu_img("create", "-q", "-f", "qcow2", t, SIZE + 2 * MiB)
        qemu_io("-c", "write -P 0x77 0 %d" % (SIZE + 2 * MiB), t)
        targets.append(t)
    cbt("convert", "-n", "-O", "qcow2", paths[0], targets[0])
    qemu_img("convert", "-n", "-O", "qcow2", paths[0], targets[1])
    qemu_img("compare", targets[0], targets[1])
    L.assert_maps_equal(norm_map(targets[0], "qcow2"),
                        norm_map(targets[1], "qcow2"), "-n")
    # without -O the target's format is probed (qemu-img would assume raw)
    qemu_io("-c", "write -P 0x77 0 %d" % SIZE, targets[0])
    cbt("convert", "-n", paths[0], targets[0])
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", targets[0], targets[1])


# ---- bitmaps ----

# (layer size, granularity of 'a') from the base up; 'b' only in the base,
# 'c' only in the top (disabled, filled by a merge).
LAYERS = [(4 * MiB, 64 * KiB), (SIZE, 128 * KiB), (SIZE, 512 * KiB)]


def bitmap_chain(d):
    """Returns (paths top first, {layer index: {name: BitmapModel}})."""
    r = random.Random(5)
    paths, models, prev = [], {}, None
    for i, (size, gran) in enumerate(LAYERS):
        p = os.path.join(d, "bm.%d.qcow2" % i)
        if prev:
            qemu_img("create", "-q", "-f", "qcow2", "-b",
                     os.path.basename(prev), "-F", "qcow2", p, size)
        else:
            qemu_img("create", "-q", "-f", "qcow2", p, size)
        m = {"a": L.BitmapModel("a", gran)}
        if i == 0:
            m["b"] = L.BitmapModel("b", 64 * KiB)
        for bm in m.values():
            qemu_img("bitmap", "--add", "-g", bm.gran, p, bm.name)
        cmds = []
        for _ in range(6):
            off = r.randrange(size // 512) * 512
            length = min(size - off, r.randint(1, 300 * KiB))
            cmds.append("write -P %d %d %d" % (i + 1, off, length))
            for bm in m.values():
                bm.dirty(off, length)
        L.run_qemu_io(p, cmds)
        if i == len(LAYERS) - 1:
            qemu_img("bitmap", "--add", "--disable", p, "c")
            qemu_img("bitmap", "--merge", "a", p, "c")
            m["c"] = L.BitmapModel("c", 64 * KiB, recording=False)
            a = m["a"]
            for first, n in L.bit_runs(a.bits):
                s0, e0 = first * a.gran, min((first + n) * a.gran, size)
                m["c"].recording = True
                m["c"].dirty(s0, e0 - s0)
                m["c"].recording = False
        models[i] = m
        paths.insert(0, p)
        prev = p
    return paths, models


def union_extents(models, name, layers, gran, size):
    """What the target's bitmap `name` (granularity gran) must hold: every
    target granule overlapping a dirty granule of a layer's copy."""
    tgt = L.BitmapModel(name, gran)
    for i in layers:
        bm = models[i].get(name)
        if not bm:
            continue
        lsize = LAYERS[i][0]
        for first, n in L.bit_runs(bm.bits):
            s0, e0 = first * bm.gran, min((first + n) * bm.gran, lsize)
            tgt.dirty(s0, e0 - s0)
    return L.extents_from_bits(tgt.bits, gran, size)


@pytest.fixture(scope="module")
def bm_chain(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("convbm"))
    return bitmap_chain(d)


def test_bitmaps_union(bm_chain, tmp_path):
    paths, models = bm_chain
    ours = os.path.join(str(tmp_path), "cbt.qcow2")
    theirs = os.path.join(str(tmp_path), "qemu.qcow2")
    res = no_crash(cbt("convert", "-O", "qcow2", "--bitmaps", paths[0], ours,
                       check=False))
    assert res.rc == 0 and res.out == "" and res.err == "", res
    qemu_img("convert", "-O", "qcow2", "--bitmaps", paths[0], theirs)
    qemu_img("compare", paths[0], ours)
    check_json(ours)

    info = {b["name"]: b for b in L.qemu_bitmaps(ours)}
    assert sorted(info) == ["a", "b", "c"], info
    assert info["a"]["granularity"] == 512 * KiB      # the topmost copy's
    assert info["b"]["granularity"] == 64 * KiB
    assert "auto" in info["a"]["flags"] and "auto" in info["b"]["flags"]
    assert "auto" not in info["c"]["flags"]           # disabled on top

    nbd = L.qemu_bitmap_extents(ours, ["a", "b", "c"])
    for name in ("a", "b", "c"):
        want = union_extents(models, name, range(3), info[name]["granularity"],
                             SIZE)
        L.assert_extents_equal(L.ext_coalesce(L.cbt_dump(ours, name)), want,
                               "cbt --dump " + name)
        L.assert_extents_equal(nbd[name], want, "qemu-nbd " + name)

    # qemu-img convert --bitmaps copies the top layer's bitmaps only: no
    # 'b', and 'a' without the bits of the lower layers.
    qinfo = {b["name"]: b for b in L.qemu_bitmaps(theirs)}
    assert sorted(qinfo) == ["a", "c"], qinfo
    qa = L.qemu_bitmap_extents(theirs, ["a"])["a"]
    assert qa == union_extents(models, "a", [2], 512 * KiB, SIZE)
    assert qa != nbd["a"]


def test_bitmaps_shallow_copies_top_only(bm_chain, tmp_path):
    """With -B the lower layers stay with the backing file: only the top
    layer's bitmaps are copied (as qemu-img)."""
    paths, models = bm_chain
    ours = os.path.join(str(tmp_path), "cbt.qcow2")
    cbt("convert", "-O", "qcow2", "--bitmaps", "-B", os.path.abspath(paths[1]),
        "-F", "qcow2", paths[0], ours)
    qemu_img("compare", paths[0], ours)
    info = {b["name"]: b for b in L.qemu_bitmaps(ours)}
    assert sorted(info) == ["a", "c"], info
    want = union_extents(models, "a", [2], 512 * KiB, SIZE)
    L.assert_extents_equal(L.ext_coalesce(L.cbt_dump(ours, "a")), want, "a")


def test_bitmaps_inconsistent(bm_chain, tmp_path):
    paths, models = bm_chain
    d = str(tmp_path)
    copies = []
    for p in paths[::-1]:
        q = os.path.join(d, os.path.basename(p))
        L.copy(p, q)
        copies.insert(0, q)
    L.set_bitmap_flags(copies[1], "a", 1)  # in_use, not auto: inconsistent
    dst = os.path.join(d, "out.qcow2")

    res = no_crash(cbt("convert", "-O", "qcow2", "--bitmaps", copies[0], dst,
                       check=False))
    assert res.rc == 1, res
    assert "'a'" in res.err and os.path.basename(copies[1]) in res.err, res
    assert "inconsistent" in res.err, res
    assert not os.path.exists(dst)

    res = no_crash(cbt("convert", "-O", "qcow2", "--bitmaps",
                       "--skip-broken-bitmaps", copies[0], dst, check=False))
    assert res.rc == 0, res
    assert "warning" in res.err and "'a'" in res.err, res
    qemu_img("compare", copies[0], dst)
    info = {b["name"]: b for b in L.qemu_bitmaps(dst)}
    assert sorted(info) == ["b", "c"], info
    nbd = L.qemu_bitmap_extents(dst, ["b"])
    L.assert_extents_equal(nbd["b"], union_extents(models, "b", [0], 64 * KiB,
                                                   SIZE), "b")
