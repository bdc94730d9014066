"""`cbt bitmap --list --chain` and `--dump/--count/--sha256 --chain`: a bitmap
name seen over a whole backing chain (libvirt's qemuBlockBitmapChainIsValid
cases, with cbt's "sealed" resolution).

Chains are built with qemu-img create -b/-F, qemu-img bitmap, qemu-io and
cbt snapshot; the expected dirty bits come from the writes each test made
(BitmapModel, checked against QEMU in tests/interop).  Covered:
  * verdicts: valid (one layer, several layers, sealed copies), not-in-top
    (naming the lower layers that hold it), gap (naming the first layer
    lacking it and the one below holding it), a disabled copy below the top
    (valid as sealed by default, invalid with --strict naming that layer), a
    disabled top copy, an inconsistent copy in a middle layer, the first
    violation from the top winning;
  * --list --chain JSON fields and the human table;
  * the union: writes recorded over two cbt snapshots, different
    granularities per layer, a lower layer smaller (and one larger) than the
    top; --dump --chain of a one-layer chain equals --dump (and --count,
    --sha256);
  * an invalid name: exit 1, one line on stderr with reason and layer,
    nothing on stdout; no layer holding it; a backing loop and a missing
    backing file; usage errors; the views never change the files.
"""
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import KiB, MiB, qemu_img, qemu_io  # noqa: E402

SIZE = 4 * MiB


# ---- helpers ----

def mk(d, name, backing=None, size=SIZE, fmt="qcow2", bfmt="qcow2"):
    """An image in d; backing (a path in d) stored by its basename."""
    p = os.path.join(str(d), name)
    args = ["create", "-q", "-f", fmt]
    if backing:
        args += ["-b", os.path.basename(backing), "-F", bfmt]
    args.append(p)
    if size is not None:
        args.append(size)
    qemu_img(*args)
    return p


def add(img, name, gran=None, disabled=False):
    args = ["bitmap", "--add"]
    if gran:
        args += ["-g", gran]
    if disabled:
        args.append("--disable")
    qemu_img(*(args + [img, name]))


def write(img, off, length, models=()):
    qemu_io("-f", "qcow2", "-c", "write -P 5 %d %d" % (off, length), img)
    for m in models:
        m.dirty(off, length)


def chain_list(top, *extra):
    data = L.cbt_json("bitmap", "--list", "--chain", "--output=json", *extra, top)
    assert isinstance(data, list), data
    return data


def verdicts(top, *extra):
    return {e["name"]: e for e in chain_list(top, *extra)}


def chain_dump(top, name, *extra):
    data = L.cbt_json("bitmap", "--dump", "--chain", "--output=json", *extra, top, name)
    ext = L.ext_normalize(data)
    L.ext_check_cover(ext, L.qemu_json("info", "--output=json", top)["virtual-size"],
                      "cbt bitmap --dump --chain %s" % name)
    return ext


def chain_refused(top, name, *extra, view="--dump"):
    """The view must fail: exit 1, nothing on stdout, one line on stderr."""
    res = L.cbt_rc("bitmap", view, "--chain", *extra, top, name)
    assert res.rc == 1, res
    assert res.out == "", "stdout must stay empty on failure: %r" % res
    lines = res.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbt: "), res
    return lines[0]


def union_extents(ext_lists, size):
    """Byte-wise OR of the dirty ranges of several extent lists, clamped to
    size, as alternating extents covering [0, size)."""
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


def layer(v, depth):
    e = v["layers"][depth]
    assert e["depth"] == depth, v
    return e


def digests(*paths):
    return [L.file_digest(p) for p in paths]


# ---- verdicts ----

def test_some_layers_only(tmp):
    """Names held by all layers, the top only, the lower ones only, the base
    only; listed top names first, then each lower layer's new names."""
    base = mk(tmp, "base.qcow2")
    mid = mk(tmp, "mid.qcow2", base)
    top = mk(tmp, "top.qcow2", mid)
    ma, mlow = L.BitmapModel("all", 65536), L.BitmapModel("low", 65536)
    for img in (base, mid, top):
        add(img, "all")
    add(base, "low")
    add(mid, "low")
    add(base, "baseonly", 4096)
    add(top, "toponly", 512)
    write(base, 0, 70000, [ma, mlow])
    write(mid, 2 * MiB, 1, [ma, mlow])
    mt = L.BitmapModel("toponly", 512)
    write(top, 3 * MiB + 100, 1000, [ma, mt])
    before = digests(base, mid, top)

    lst = chain_list(top)
    assert [e["name"] for e in lst] == ["all", "toponly", "low", "baseonly"], lst
    v = {e["name"]: e for e in lst}

    a = v["all"]
    assert a["valid"] is True and a["reason"] is None and a["reason-depth"] is None, a
    assert a["granularity"] == 65536
    assert a["count"] == L.dirty_count(ma.extents(SIZE), 65536)
    assert [l["filename"] for l in a["layers"]] == [top, mid, base]
    for d, img in enumerate((top, mid, base)):
        l = layer(a, d)
        assert l == {"depth": d, "filename": img, "present": True, "state": "recording",
                     "granularity": 65536, "recording": True, "persistent": True,
                     "inconsistent": False, "count": l["count"]}, l
    assert layer(a, 2)["count"] == 2 * 65536
    assert "valid" in a["message"] and "depths 0 to 2" in a["message"], a

    t = v["toponly"]
    assert t["valid"] is True and t["count"] == 1536 and t["granularity"] == 512, t
    assert [l["present"] for l in t["layers"]] == [True, False, False]
    assert set(layer(t, 1)) == {"depth", "filename", "present"}, layer(t, 1)

    lo = v["low"]
    assert lo["valid"] is False and lo["reason"] == "not-in-top", lo
    assert lo["reason-depth"] == 0 and lo["granularity"] is None and lo["count"] is None
    assert "'%s' (depth 1)" % mid in lo["message"] and "'%s' (depth 2)" % base in lo["message"]
    assert [l["present"] for l in lo["layers"]] == [False, True, True]

    b = v["baseonly"]
    assert b["valid"] is False and b["reason"] == "not-in-top", b
    assert "'%s' (depth 2)" % base in b["message"] and "depth 1" not in b["message"], b
    assert layer(b, 2)["granularity"] == 4096

    # --dump --chain of valid names: the union of the writes.
    L.assert_extents_equal(chain_dump(top, "all"), ma.extents(SIZE), "all")
    L.assert_extents_equal(chain_dump(top, "toponly"), mt.extents(SIZE), "toponly")
    for name in ("low", "baseonly"):
        err = chain_refused(top, name)
        assert "not-in-top" in err and "'%s'" % name in err and base in err, err
        assert err.startswith("cbt: %s: " % top), err
    assert digests(base, mid, top) == before, "a view changed a file"


def test_gap(tmp):
    base = mk(tmp, "base.qcow2")
    mid = mk(tmp, "mid.qcow2", base)
    top = mk(tmp, "top.qcow2", mid)
    add(base, "g")
    add(top, "g")
    write(base, 0, 4096)
    v = verdicts(top)["g"]
    assert v["valid"] is False and v["reason"] == "gap" and v["reason-depth"] == 1, v
    assert v["granularity"] == 65536 and v["count"] is None
    assert [l["present"] for l in v["layers"]] == [True, False, True]
    msg = v["message"]
    assert "'%s' (depth 1)" % mid in msg and "'%s' (depth 2)" % base in msg, msg
    err = chain_refused(top, "g")
    assert "gap" in err and "'%s' (depth 1)" % mid in err and "(depth 2)" in err, err
    # the same verdict for the other views
    for view in ("--count", "--sha256"):
        assert "gap" in chain_refused(top, "g", view=view)
    # --strict changes nothing here
    assert verdicts(top, "--strict")["g"]["reason"] == "gap"


def test_disabled_middle_sealed_or_strict(tmp):
    base = mk(tmp, "base.qcow2")
    mid = mk(tmp, "mid.qcow2", base)
    top = mk(tmp, "top.qcow2", mid)
    models = [L.BitmapModel("d", 65536)]
    for img in (base, mid, top):
        add(img, "d")
    write(base, 65536, 1, models)
    write(mid, 5 * 65536, 65536, models)
    qemu_img("bitmap", "--disable", mid, "d")
    write(top, SIZE - 1, 1, models)

    v = verdicts(top)["d"]
    assert v["valid"] is True and v["reason"] is None, v
    assert [l["state"] for l in v["layers"]] == ["recording", "sealed", "recording"]
    assert layer(v, 1)["recording"] is False
    assert v["count"] == 3 * 65536
    L.assert_extents_equal(chain_dump(top, "d"), models[0].extents(SIZE), "sealed union")

    s = verdicts(top, "--strict")["d"]
    assert s["valid"] is False and s["reason"] == "disabled" and s["reason-depth"] == 1, s
    assert [l["state"] for l in s["layers"]] == ["recording", "disabled", "recording"]
    assert "'%s' (depth 1)" % mid in s["message"] and s["count"] is None, s
    err = chain_refused(top, "d", "--strict")
    assert "disabled" in err and "'%s' (depth 1)" % mid in err, err
    res = L.cbt_ok("bitmap", "--list", "--chain", "--strict", top)
    assert "invalid (disabled)" in res.out, res


def test_disabled_top(tmp):
    base = mk(tmp, "base.qcow2")
    top = mk(tmp, "top.qcow2", base)
    add(base, "x")
    add(top, "x", disabled=True)
    for extra in ((), ("--strict",)):
        v = verdicts(top, *extra)["x"]
        assert v["valid"] is False and v["reason"] == "disabled" and v["reason-depth"] == 0, v
        assert [l["state"] for l in v["layers"]] == ["disabled", "recording"], v
        assert "no longer tracked" in v["message"], v
        err = chain_refused(top, "x", *extra)
        assert "disabled" in err and "top layer" in err and "(depth 0)" in err, err


def test_inconsistent_middle(tmp):
    base = mk(tmp, "base.qcow2")
    mid = mk(tmp, "mid.qcow2", base)
    top = mk(tmp, "top.qcow2", mid)
    for img in (base, mid, top):
        add(img, "i")
        add(img, "ok")
    write(mid, 0, 4096)
    L.set_bitmap_flags(mid, "i", L.BME_FLAG_IN_USE | L.BME_FLAG_AUTO)
    v = verdicts(top)
    i = v["i"]
    assert i["valid"] is False and i["reason"] == "inconsistent" and i["reason-depth"] == 1, i
    li = layer(i, 1)
    assert li["inconsistent"] is True and li["state"] == "inconsistent" and li["count"] == 0, li
    assert "'%s' (depth 1)" % mid in i["message"], i
    err = chain_refused(top, "i")
    assert "inconsistent" in err and "'%s' (depth 1)" % mid in err, err
    # the other name is unaffected
    assert v["ok"]["valid"] is True and v["ok"]["count"] == 65536, v["ok"]


def test_first_violation_from_the_top(tmp):
    """top, l1, l2, base: an inconsistent copy above a gap is reported, and a
    gap above an inconsistent copy is reported."""
    base = mk(tmp, "base.qcow2")
    l2 = mk(tmp, "l2.qcow2", base)
    l1 = mk(tmp, "l1.qcow2", l2)
    top = mk(tmp, "top.qcow2", l1)
    # p: top, l1 (inconsistent), -, base  -> inconsistent at 1
    # q: top, -, l2 (inconsistent), base  -> gap at 1
    # r: top, l1 (disabled), -, base     -> gap at 2 (sealed is fine);
    #                                       --strict: disabled at 1
    for img in (top, l1, base):
        add(img, "p")
    for img in (top, l2, base):
        add(img, "q")
    for img in (top, base):
        add(img, "r")
    add(l1, "r", disabled=True)
    L.set_bitmap_flags(l1, "p", L.BME_FLAG_IN_USE | L.BME_FLAG_AUTO)
    L.set_bitmap_flags(l2, "q", L.BME_FLAG_IN_USE | L.BME_FLAG_AUTO)
    v = verdicts(top)
    assert (v["p"]["reason"], v["p"]["reason-depth"]) == ("inconsistent", 1), v["p"]
    assert (v["q"]["reason"], v["q"]["reason-depth"]) == ("gap", 1), v["q"]
    assert (v["r"]["reason"], v["r"]["reason-depth"]) == ("gap", 2), v["r"]
    assert "'%s' (depth 2)" % l2 in v["r"]["message"] and "(depth 3)" in v["r"]["message"]
    s = verdicts(top, "--strict")
    assert (s["r"]["reason"], s["r"]["reason-depth"]) == ("disabled", 1), s["r"]


def test_only_in_backing(tmp):
    base = mk(tmp, "base.qcow2")
    top = mk(tmp, "top.qcow2", base)
    add(base, "b")
    write(base, 0, 1)
    v = verdicts(top)["b"]
    assert v["reason"] == "not-in-top" and v["granularity"] is None, v
    assert "'%s' (depth 1)" % base in v["message"], v
    err = chain_refused(top, "b")
    assert "not-in-top" in err and base in err, err
    for view in ("--count", "--sha256"):
        assert "not-in-top" in chain_refused(top, "b", view=view)
    # the base alone is a valid one-layer chain
    assert L.cbt_count(base, "b", "--chain") == 65536


def test_not_in_any_layer(tmp):
    base = mk(tmp, "base.qcow2")
    top = mk(tmp, "top.qcow2", base)
    add(base, "b")
    for view in ("--dump", "--count", "--sha256"):
        err = chain_refused(top, "nosuch", view=view)
        assert "'nosuch' not found in any layer" in err, err
    # no bitmaps anywhere: nothing (human), [] (JSON)
    empty = mk(tmp, "e.qcow2")
    assert L.cbt_ok("bitmap", "--list", "--chain", empty).out == ""
    assert chain_list(empty) == []


# ---- the union ----

def test_snapshot_twice(tmp):
    """cbt snapshot twice: the union over the three layers is exactly what
    the writes since the bitmaps were added touched."""
    base = mk(tmp, "base.qcow2")
    add(base, "a")
    add(base, "fine", 4096)
    add(base, "off")
    qemu_img("bitmap", "--disable", base, "off")
    ms = [L.BitmapModel("a", 65536), L.BitmapModel("fine", 4096)]
    write(base, 100000, 200000, ms)
    write(base, SIZE - 700, 700, ms)
    mid = os.path.join(str(tmp), "mid.qcow2")
    L.cbt_ok("snapshot", base, mid)
    write(mid, 1 * MiB + 3, 5000, ms)
    top = os.path.join(str(tmp), "top.qcow2")
    L.cbt_ok("snapshot", mid, top)
    write(top, 3 * MiB, 70000, ms)
    write(top, 150000, 10, ms)

    v = verdicts(top)
    assert list(v) == ["a", "fine", "off"], list(v)
    for m in ms:
        e = v[m.name]
        assert e["valid"] is True, e
        assert [l["state"] for l in e["layers"]] == ["recording", "sealed", "sealed"], e
        assert e["count"] == L.dirty_count(m.extents(SIZE), m.gran), (e, m.extents(SIZE))
        got = chain_dump(top, m.name)
        L.assert_extents_equal(got, m.extents(SIZE), "union of %s" % m.name)
        assert L.cbt_count(top, m.name, "--chain") == e["count"]
        assert L.cbt_sha256(top, m.name, "--chain") == L.bitmap_sha256(m.bits, m.gran, SIZE)
        js = L.cbt_json("bitmap", "--count", "--chain", "--output=json", top, m.name)
        assert js == {"count": e["count"]}
        js = L.cbt_json("bitmap", "--sha256", "--chain", "--output=json", top, m.name)
        assert js == {"sha256": L.bitmap_sha256(m.bits, m.gran, SIZE)}
    # "off" was disabled in base, so snapshot did not copy it
    assert v["off"]["reason"] == "not-in-top"
    # strict: the sealed copies make the names invalid
    s = verdicts(top, "--strict")
    assert (s["a"]["reason"], s["a"]["reason-depth"]) == ("disabled", 1), s["a"]
    # human --dump --chain: nbdinfo --map's layout of the same extents
    text = L.cbt_ok("bitmap", "--dump", "--chain", top, "a").out
    want = "".join("%10d  %10d  %3d  %s\n" % (e["start"], e["length"], int(e["dirty"]),
                                             "dirty" if e["dirty"] else "clean")
                   for e in ms[0].extents(SIZE))
    assert text == want, (text, want)


def test_granularities_and_sizes(tmp):
    """Copies of one name with different granularities; a base smaller than
    the top contributes within its size; a top smaller than its backing file
    clamps the union."""
    bsize = 1 * MiB + 1536             # not granule-aligned
    base = mk(tmp, "base.qcow2", size=bsize)
    mid = mk(tmp, "mid.qcow2", base, size=SIZE)
    top = mk(tmp, "top.qcow2", mid, size=SIZE)
    mb, mm, mt = (L.BitmapModel("u", 1 * MiB), L.BitmapModel("u", 512),
                  L.BitmapModel("u", 65536))
    add(base, "u", 1 * MiB)
    add(mid, "u", 512)
    add(top, "u", 65536)
    write(base, bsize - 10, 10, [mb])  # last granule: [1M, 2M) clamped to bsize
    write(base, 0, 1, [mb])
    write(mid, 2 * MiB + 700, 100, [mm])
    write(top, 3 * MiB + 65536, 1, [mt])
    want = union_extents([mb.extents(bsize), mm.extents(SIZE), mt.extents(SIZE)], SIZE)
    got = chain_dump(top, "u")
    L.assert_extents_equal(got, want, "mixed granularities")
    # the base's last granule ends with the base, inside the top
    assert any(e["dirty"] and e["start"] + e["length"] == bsize for e in got), got
    v = verdicts(top)["u"]
    assert v["valid"] and v["granularity"] == 65536, v
    assert [layer(v, d)["granularity"] for d in range(3)] == [65536, 512, MiB]
    # count and sha256: whole granules of the finest granularity (512)
    assert v["count"] == L.dirty_count(want, 512), (v["count"], want)
    bits = L.bits_from_extents(want, 512)
    assert L.cbt_sha256(top, "u", "--chain") == L.bitmap_sha256(bits, 512, SIZE)

    # a top smaller than the layer below: the union stops at the top's size
    small = mk(tmp, "small.qcow2", top, size=2 * MiB)
    add(small, "u", 4096)
    ms = L.BitmapModel("u", 4096)
    write(small, 4096 * 3, 1, [ms])
    want2 = union_extents([ms.extents(2 * MiB)] + [want], 2 * MiB)
    L.assert_extents_equal(chain_dump(small, "u"), want2, "top smaller than its backing file")


def test_one_layer_equals_plain_views(tmp):
    img = mk(tmp, "one.qcow2", size=SIZE + 512)
    add(img, "a", 65536)
    add(img, "b", 512)
    write(img, SIZE, 512)              # last granule of a overhangs the end
    write(img, 12345, 54321)
    for name in ("a", "b"):
        for out in ("human", "json"):
            plain = L.cbt_ok("bitmap", "--dump", "--output=" + out, img, name).out
            chain = L.cbt_ok("bitmap", "--dump", "--chain", "--output=" + out, img, name).out
            assert chain == plain, (name, out, chain, plain)
        for view in ("--count", "--sha256"):
            plain = L.cbt_ok("bitmap", view, img, name).out
            assert L.cbt_ok("bitmap", view, "--chain", img, name).out == plain, (view, name)
        v = verdicts(img)[name]
        assert v["count"] == L.cbt_count(img, name) and v["message"].endswith(
            "only the top layer holds it"), v


def test_raw_base(tmp):
    base = mk(tmp, "base.raw", fmt="raw")
    top = mk(tmp, "top.qcow2", base, bfmt="raw")
    add(top, "t")
    write(top, 0, 1)
    v = verdicts(top)["t"]
    assert v["valid"] is True and v["count"] == 65536, v
    assert v["layers"][1] == {"depth": 1, "filename": base, "present": False}, v


# ---- the human table ----

def test_human_list(tmp):
    base = mk(tmp, "base.qcow2")
    top = mk(tmp, "top.qcow2", base)
    add(base, "ok")
    add(top, "ok")
    add(base, "low", 4096)
    write(base, 0, 65536)
    write(top, MiB, 1)
    out = L.cbt_ok("bitmap", "--list", "--chain", top).out
    lines = out.splitlines()
    assert re.match(r"NAME/DEPTH +STATE +GRANULARITY +DIRTY +FILE$", lines[0]), lines
    assert re.match(r"ok +valid +65536 +131072$", lines[1]), lines
    assert re.match(r"  0 +recording +65536 +65536  %s$" % re.escape(top), lines[2]), lines
    assert re.match(r"  1 +sealed +65536 +65536  %s$" % re.escape(base), lines[3]) or \
        re.match(r"  1 +recording +65536 +65536  %s$" % re.escape(base), lines[3]), lines
    assert re.match(r"low +invalid \(not-in-top\) +- +-$", lines[4]), lines
    assert re.match(r"  0 +absent +- +-  %s$" % re.escape(top), lines[5]), lines
    assert re.match(r"  1 +recording +4096 +65536  %s$" % re.escape(base), lines[6]), lines
    assert lines[7].startswith("  bitmap 'low' is invalid (not-in-top)"), lines
    assert len(lines) == 8, lines
    # columns line up: STATE starts at the same place on every table line
    col = lines[0].index("STATE")
    for ln in lines[1:7]:
        assert ln[col - 2:col] == "  " and ln[col] != " ", (ln, lines)


# ---- errors ----

def test_backing_loop(tmp):
    a = mk(tmp, "a.qcow2")
    b = mk(tmp, "b.qcow2", a)
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    for args in (["--list", "--chain", b], ["--dump", "--chain", b, "x"]):
        res = L.cbt_rc("bitmap", *args)
        assert res.rc == 1 and res.out == "", res
        assert len(res.err.splitlines()) == 1 and "loops" in res.err, res


def test_missing_backing(tmp):
    top = os.path.join(str(tmp), "top.qcow2")
    qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", top, MiB)
    for args in (["--list", "--chain", top], ["--dump", "--chain", top, "x"],
                 ["--count", "--chain", top, "x"]):
        res = L.cbt_rc("bitmap", *args)
        assert res.rc == 1 and res.out == "", res
        assert len(res.err.splitlines()) == 1, res
        assert "gone.qcow2" in res.err and "No such file" in res.err, res
    # without --chain the top alone is readable
    assert L.cbt_ok("bitmap", "--list", top).out == ""


def test_usage(tmp):
    img = mk(tmp, "img.qcow2")
    add(img, "a")
    for args, msg in (
            (["--diff", "a", "--chain", img, "a"], "--chain only supported with"),
            (["--add", "--chain", img, "b"], "--chain only supported with"),
            (["--remove-all", "--chain", img], "--chain only supported with"),
            (["--list", "--strict", img], "--strict only supported with --chain"),
            (["--dump", "--strict", img, "a"], "--strict only supported with --chain"),
            (["--list", "--chain", img, "a"], "Expecting filename"),
            (["--dump", "--chain", img], "Expecting filename and bitmap name")):
        res = L.cbt_rc("bitmap", *args)
        assert res.rc == 64 and msg in res.err, (args, res)
        assert "cbt bitmap --help" in res.err, res
    help_text = L.cbt_ok("bitmap", "--help").out
    assert "--chain" in help_text and "--strict" in help_text
    # --strict and --chain in any order
    assert L.cbt_ok("bitmap", "--strict", "--list", "--chain", img).out.startswith("NAME/DEPTH")
    json.loads(L.cbt_ok("bitmap", "--chain", "--output=json", "--list", img).out)
