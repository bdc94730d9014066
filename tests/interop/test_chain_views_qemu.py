"""`cbt bitmap --dump/--count/--sha256 --chain` against QEMU.

Chains are made only by QEMU's tools (qemu-img create -b/-F, qemu-img
bitmap, qemu-io with seeded workloads) and by `cbt snapshot`.  For every
valid bitmap name of the chain:
  * oracle 1: each layer exported by `qemu-nbd -r -B NAME`, read with
    `nbdinfo --map`, the layers' extents OR-ed here (clamped to the top's
    size) == `cbt bitmap --dump --chain --output=json`;
  * oracle 2 (layers of one size): QEMU merges the copies itself into a
    fresh bitmap of the finest granularity (`qemu-img bitmap --merge NAME
    -b LAYER`); `nbdinfo --map` of it is byte-identical to the human
    `cbt bitmap --dump --chain`, and its bits give `--count --chain` (whole
    granules) and `--sha256 --chain`;
  * the writes recorded while each layer was on top (BitmapModel) give the
    same union;
  * `cbt bitmap --list --chain` agrees with `qemu-img info` about which
    layers hold the name, their granularities and recording flags;
  * qemu-img check stays clean and no view changes a file.
"""
import os
import random

import pytest

import interop_lib as L
from interop_lib import KiB, MiB, qemu_img

SIZE = 6 * MiB + 512


def chain_layers(top):
    """The chain's files from the top down, as qemu-img info sees it."""
    info = L.qemu_json("info", "--output=json", "--backing-chain", top)
    return [e["filename"] for e in info]


def union(ext_lists, size):
    rs = sorted((s, min(e, size)) for ext in ext_lists
                for s, e in L.dirty_ranges(ext) if s < size)
    merged = []
    for s, e in rs:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    out, pos = [], 0
    for s, e in merged:
        if s > pos:
            out.append({"start": pos, "length": s - pos, "dirty": False})
        out.append({"start": s, "length": e - s, "dirty": True})
        pos = e
    if pos < size:
        out.append({"start": pos, "length": size - pos, "dirty": False})
    return out


def qemu_io_batch(img, cmds, models):
    L.run_qemu_io(img, cmds)
    L.model_apply_io(models, cmds)


def check_chain(tmp, top, models=None):
    """Every valid name of top's chain against the oracles.  models: {name:
    [BitmapModel per layer, top first, None where absent]} or None."""
    files = chain_layers(top)
    before = [L.file_digest(f) for f in files]
    sizes = [L.qemu_json("info", "--output=json", f)["virtual-size"] for f in files]
    size = sizes[0]
    held = [{b["name"]: b for b in L.qemu_bitmaps(f)} for f in files]
    # oracle 1: per-layer extents from qemu-nbd + nbdinfo
    qext = [L.qemu_bitmap_extents(f, list(h)) for f, h in zip(files, held)]

    verdicts = {v["name"]: v for v in
                L.cbt_json("bitmap", "--list", "--chain", "--output=json", top)}
    names = []
    for h in held:
        names += [n for n in h if n not in names]
    assert list(verdicts) == names, (list(verdicts), names)
    checked = 0
    for name, v in verdicts.items():
        # the layers as qemu-img info describes them
        for d, (f, h) in enumerate(zip(files, held)):
            lay = v["layers"][d]
            assert lay["filename"] == f and lay["present"] == (name in h), (name, d, lay)
            if name in h:
                assert lay["granularity"] == h[name]["granularity"], (name, d, lay)
                assert lay["recording"] == ("auto" in h[name]["flags"]), (name, d, lay)
                assert lay["count"] == L.dirty_count(qext[d][name], lay["granularity"])
        if not v["valid"]:
            continue
        run = 0
        while run < len(files) and name in held[run]:
            run += 1
        want = union([qext[d][name] for d in range(run)], size)
        got = L.ext_normalize(L.cbt_json("bitmap", "--dump", "--chain", "--output=json",
                                         top, name))
        L.assert_extents_equal(got, want, "union of %r over %d layers vs qemu-nbd" % (name, run))
        if models and name in models:
            want_m = union([m.extents(sizes[d]) for d, m in enumerate(models[name][:run])],
                           size)
            L.assert_extents_equal(got, want_m, "union of %r vs the recorded writes" % name)

        gmin = min(held[d][name]["granularity"] for d in range(run))
        count = L.cbt_count(top, name, "--chain")
        sha = L.cbt_sha256(top, name, "--chain")
        assert count == v["count"], (name, count, v)
        text = L.cbt_ok("bitmap", "--dump", "--chain", top, name).out
        if all(s == size for s in sizes[:run]):
            # oracle 2: QEMU's own merge into one bitmap of granularity gmin
            u = os.path.join(str(tmp), "union-%s.qcow2" % name)
            qemu_img("create", "-q", "-f", "qcow2", u, size)
            qemu_img("bitmap", "--add", "-g", gmin, "--disable", u, "U")
            for d in range(run):
                qemu_img("bitmap", "--merge", name, "-b", files[d], "-F", "qcow2", u, "U")
            with L.qemu_nbd_bitmaps(u, ["U"]) as uri:
                qtext = L.nbd_bitmap_map_text(uri, "U")
                mext = L.ext_coalesce(L.nbd_bitmap_map(uri, "U"))
            L.assert_extents_equal(got, mext, "union of %r vs QEMU's merge" % name)
            assert text == qtext, "human --dump --chain %r differs from nbdinfo --map:\n" \
                "cbt:\n%s\nnbdinfo:\n%s" % (name, text[:1500], qtext[:1500])
            os.unlink(u)
        bits = L.bits_from_extents(want, gmin)
        assert count == bin(bits).count("1") * gmin, (name, count, gmin)
        assert sha == L.bitmap_sha256(bits, gmin, size), name
        checked += 1
    for f in files:
        L.qemu_check_clean(f)
    assert [L.file_digest(f) for f in files] == before, "a view changed a file"
    return verdicts, checked


def test_snapshots_with_random_writes(tmp):
    """cbt snapshot twice; qemu-io workloads on each layer while on top."""
    rng = random.Random(4242)
    d = str(tmp)
    base = os.path.join(d, "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    grans = {"a": 65536, "f": 512, "m": MiB}
    for n, g in grans.items():
        qemu_img("bitmap", "--add", "-g", g, base, n)
    layers = [base]
    models = {n: [] for n in grans}
    for i in range(3):
        ms = [L.BitmapModel(n, g) for n, g in grans.items()]
        for n, m in zip(grans, ms):
            models[n].insert(0, m)
        qemu_io_batch(layers[0], L.bitmap_io_workload(rng, SIZE, 12, 300 * KiB), ms)
        if i < 2:
            nxt = os.path.join(d, "s%d.qcow2" % (i + 1))
            L.cbt_ok("snapshot", layers[0], nxt)
            layers.insert(0, nxt)
    verdicts, checked = check_chain(tmp, layers[0], models)
    assert checked == 3
    for n in grans:
        assert [l["state"] for l in verdicts[n]["layers"]] == ["recording", "sealed", "sealed"]


def test_granularity_per_layer(tmp):
    """qemu-img made chain: one name with another granularity in each layer,
    names held by some layers only, a gap, a disabled middle copy."""
    rng = random.Random(99)
    d = str(tmp)
    files = [os.path.join(d, n) for n in ("top.qcow2", "mid.qcow2", "base.qcow2")]
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", files[2], SIZE)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", files[1])
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2097152",
             "-b", "mid.qcow2", "-F", "qcow2", files[0])
    plan = {  # name: granularity per layer (top first), None = absent
        "x": [4096, 65536, 512],
        "y": [2 * MiB, 512, None],
        "gap": [65536, None, 65536],
        "low": [None, 65536, 4096],
        "sealed": [65536, 65536, 65536],
    }
    models = {n: [None] * 3 for n in plan}
    for depth in (2, 1, 0):
        for n, gs in plan.items():
            if gs[depth]:
                qemu_img("bitmap", "--add", "-g", gs[depth], files[depth], n)
                models[n][depth] = L.BitmapModel(n, gs[depth])
        live = [models[n][depth] for n in plan if models[n][depth]]
        qemu_io_batch(files[depth], L.bitmap_io_workload(rng, SIZE, 10, 200 * KiB), live)
        if depth == 1:
            qemu_img("bitmap", "--disable", files[1], "sealed")
    verdicts, checked = check_chain(tmp, files[0], models)
    assert checked == 3
    assert verdicts["gap"]["reason"] == "gap" and verdicts["low"]["reason"] == "not-in-top"
    assert verdicts["sealed"]["layers"][1]["state"] == "sealed"


def test_smaller_base(tmp):
    """A base smaller than the overlays (not granule-aligned): it adds its
    dirty bits within its own size."""
    rng = random.Random(7)
    d = str(tmp)
    bsize = 2 * MiB + 1536
    base = os.path.join(d, "base.qcow2")
    top = os.path.join(d, "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, bsize)
    qemu_img("bitmap", "--add", "-g", MiB, base, "b")
    mb = L.BitmapModel("b", MiB)
    qemu_io_batch(base, ["write -P 1 %d 100" % (bsize - 100)]
                  + L.bitmap_io_workload(rng, bsize, 4, 64 * KiB), [mb])
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, SIZE)
    qemu_img("bitmap", "--add", "-g", 4096, top, "b")
    mt = L.BitmapModel("b", 4096)
    qemu_io_batch(top, L.bitmap_io_workload(rng, SIZE, 8, 64 * KiB), [mt])
    verdicts, checked = check_chain(tmp, top, {"b": [mt, mb]})
    assert checked == 1
    got = L.ext_normalize(L.cbt_json("bitmap", "--dump", "--chain", "--output=json", top, "b"))
    assert any(e["dirty"] and e["start"] + e["length"] == bsize for e in got) or \
        any(e["dirty"] and e["start"] < bsize < e["start"] + e["length"] for e in got), got
