"""Random-chain property tests: chain operations keep change tracking exact.

Each chain of CHAINS is built from a fixed seed with QEMU's tools (qemu-img
create -b/-F, qemu-img bitmap, qemu-io writes, zero-writes and discards) and
some `cbt snapshot` layers; tests/chainmodel.py records every write and the
bitmaps recording at that moment, and computes the expected bits of every
copy and the oracle of "what changed since X, seen from the top" (the union
of X's copies held contiguously from the top; invalid when the top lacks X,
a layer in the run has a gap, or the top copy is disabled).  Some chains are
made invalid on purpose (a gap, a top without the bitmap, a copy of another
granularity).

Operations checked, each on a fresh copy of the chain:
  * cbt snapshot (twice, with writes on each new top),
  * cbt commit for EVERY (top, base) pair: intermediate (--top/--base/
    --active: the image above top is relinked onto base), active with -b
    (drop), plain (top emptied) and -d; a gap inside top..base or a base copy
    of another granularity must be refused, naming the layer, with every
    file byte-identical,
  * cbt stream and cbt rebase (safe) onto lower layers or none (every file's
    bitmaps unchanged, as ops.h says; "since X" kept where that agrees with
    it, see PULL_KEEPS_VIEWS), cbt rebase -u onto a flattened copy of the
    old backing file,
  * cbt convert -O qcow2 --bitmaps (and -O raw).
After each: qemu-img check is clean on every file; the guest view equals a
reference made with qemu-img convert before the operation (qemu-img
compare); every layer's bitmaps (qemu-img info; cbt bitmap --dump) equal the
model, and the files the operation must not touch are byte-identical;
cbt bitmap --list/--dump --chain equal the oracle; for a sample of the
operations also --count/--sha256 --chain and QEMU's own per-layer bitmaps (qemu-nbd -B + nbdinfo --map),
OR-ed here, equal it too; relinked backing files are what qemu-img info says.

Failure messages name the chain (seed, depth, invalid kind) and the exact
command; rerun one chain with -k CHAIN_ID.
"""
import os
import random
import sys

import pytest

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_TESTS, os.path.join(_TESTS, "interop")):
    if _p not in sys.path:
        sys.path.insert(0, _p)
import chainmodel as M  # noqa: E402
import interop_lib as L  # noqa: E402
from interop_lib import qemu_img, qemu_io  # noqa: E402

# id: (seed, depth, invalid kind injected after building)
CHAINS = {
    "s101-d5": (101, 5, None),
    "s102-d4": (102, 4, None),
    "s103-d3": (103, 3, None),
    "s104-d4-gap": (104, 4, "gap"),
    "s105-d3-missing": (105, 3, "missing"),
    "s106-d5-gran": (106, 5, "gran"),
    "s107-d2": (107, 2, None),
    "s108-d1": (108, 1, None),
}

# The brief (issue 4 §3) says stream and safe rebase keep "since X seen
# from the top" for every X; ops.h and `cbt stream --help` say every file's
# bitmaps are left unchanged.  Both hold only when no layer leaving the
# chain holds dirty bits of a valid X that the remaining copies do not
# cover.  False: test what ops.h says, and the invariant only where the two
# agree (the other cases are checked to lose exactly the dropped layers'
# bits).  True: the invariant everywhere (the leaving copies merged into
# FILE's, as libvirt does on block-pull).
PULL_KEEPS_VIEWS = True

_BUILT = {}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("chains"))


class Case:
    """One chain: its directory (never changed after building), model and
    the guest view of its top (raw)."""

    def __init__(self, work, cid):
        self.cid = cid
        self.seed, depth, invalid = CHAINS[cid]
        self.root = os.path.join(work, cid)
        self.orig = os.path.join(self.root, "orig")
        self.m = M.build_chain(self.seed, self.orig, depth, invalid)
        self.ref = os.path.join(self.root, "ref.raw")
        qemu_img("convert", "-f", "qcow2", "-O", "raw",
                 os.path.join(self.orig, self.m.top.fname), self.ref)
        self.n = 0

    def fresh(self, tag):
        self.n += 1
        d = os.path.join(self.root, "%02d-%s" % (self.n, tag))
        return M.copy_chain(self.orig, d)

    def label(self, what):
        seed, depth, invalid = CHAINS[self.cid]
        return ("chain %s (seed %d, depth %d, invalid %s), after `%s` in a copy of the "
                "chain (rerun: -k '%s')\n%s"
                % (self.cid, seed, depth, invalid, what, self.cid, self.m.describe()))


def case(work, cid):
    if cid not in _BUILT:
        _BUILT[cid] = Case(work, cid)
    return _BUILT[cid]


# --------------------------------------------------------------------------
# Checks


def digests(d):
    return {f: L.file_digest(os.path.join(d, f)) for f in sorted(os.listdir(d))}


def check_clean(d, label):
    for f in sorted(os.listdir(d)):
        if f.endswith(".qcow2"):
            rc, data, res = L.qemu_check(os.path.join(d, f))
            assert rc == 0 and data is not None and not data.get("corruptions") \
                and not data.get("leaks"), \
                "qemu-img check of %s not clean: %r\n%s" % (f, res, label)


def check_guest(ref, path, label, ref_fmt="raw"):
    res = qemu_img("compare", "-f", ref_fmt, "-F", "qcow2", ref, path, check=False)
    assert res.rc == 0, "guest view of %s changed (qemu-img compare with the copy made " \
        "before): %r\n%s" % (os.path.basename(path), res, label)


def flat_copy(d, fname, out):
    """The guest view of d/fname as raw, made by QEMU."""
    qemu_img("convert", "-f", "qcow2", "-O", "raw", os.path.join(d, fname), out)
    return out


def check_layer(d, m, ly, label, loose=()):
    """One file's bitmaps: names, granularities, flags (qemu-img info) and
    bits (cbt bitmap --dump) as the model says.  For names in `loose` the
    bits only need to include the model's; the model takes what was found."""
    p = os.path.join(d, ly.fname)
    got = M.qemu_layer_bitmaps(p)
    want = {n: (b.gran, b.flags()) for n, b in ly.bitmaps.items()}
    assert got == want, "bitmaps of %s (qemu-img info): got %s, expected %s\n%s" % (
        ly.fname, got, want, label)
    for n, b in ly.bitmaps.items():
        ext = L.cbt_dump(p, n)
        L.ext_check_cover(ext, m.size, "cbt bitmap --dump %s %s" % (ly.fname, n))
        if n in loose:
            gbits = L.bits_from_extents(ext, b.gran)
            assert gbits & b.bits == b.bits, \
                "%s's %r lost bits: got %s, expected at least %s\n%s" % (
                    ly.fname, n, M.json_short(ext), M.json_short(b.extents(m.size)), label)
            b.bits = gbits
        else:
            L.assert_extents_equal(ext, b.extents(m.size), "%s's %r (cbt bitmap --dump)\n%s"
                                   % (ly.fname, n, label))


def check_layers(d, m, label, loose=None, changed=None, before=None):
    """Every layer of the model.  With changed (file names) and before
    (digests of the files before the operation), the other files must be
    byte-identical (their bitmaps were checked on the original chain)."""
    loose = loose or {}
    for ly in m.layers:
        if changed is not None and ly.fname not in changed and ly.fname in before:
            assert L.file_digest(os.path.join(d, ly.fname)) == before[ly.fname], \
                "%s should not have been touched\n%s" % (ly.fname, label)
            continue
        check_layer(d, m, ly, label, loose.get(ly.fname, ()))


def union_bits(ranges, gran):
    bits = 0
    for s, e in ranges:
        lo, hi = s // gran, (e - 1) // gran + 1
        bits |= ((1 << (hi - lo)) - 1) << lo
    return bits


def check_views(d, m, chain, label, qemu=False):
    """cbt's chain views from the top of `chain` against the oracle (the
    verdicts of --list --chain, the extents of --dump --chain); with qemu
    (a sample of the operations), also --count and --sha256 --chain, and
    QEMU's per-layer bitmaps OR-ed here.  Returns {name: (valid,
    ranges or Invalid)} (the oracle)."""
    top = os.path.join(d, chain[-1].fname)
    names = []
    for ly in reversed(chain):
        names += [n for n in ly.bitmaps if n not in names]
    listing = L.cbt_json("bitmap", "--list", "--chain", "--output=json", top)
    verdict = {e["name"]: e for e in listing}
    assert sorted(verdict) == sorted(names), \
        "cbt bitmap --list --chain %s: names %s, expected %s\n%s" % (
            chain[-1].fname, sorted(verdict), sorted(names), label)
    out = {}
    for n in names:
        ok, r = m.view_or_reason(n, chain)
        out[n] = (ok, r)
        v = verdict[n]
        what = "cbt bitmap --chain %s %s" % (chain[-1].fname, n)
        if not ok:
            assert not v["valid"] and v["reason"] == r.code, \
                "%s: verdict %s (%s), expected invalid (%s: %s)\n%s" % (
                    what, v["valid"], v["message"], r.code, r, label)
            res = L.cbt_rc("bitmap", "--dump", "--chain", "--output=json", top, n)
            assert res.rc == 1 and res.out == "" and n in res.err, \
                "%s --dump of an invalid bitmap: %r\n%s" % (what, res, label)
            continue
        assert v["valid"], "%s: invalid (%s), expected valid\n%s" % (what, v["message"], label)
        want = M.extents_of(r, m.size)
        got = L.ext_normalize(L.cbt_json("bitmap", "--dump", "--chain", "--output=json", top, n))
        L.assert_extents_equal(got, want, "%s --dump vs the oracle\n%s" % (what, label))
        if not qemu:
            continue
        g = min(ly.bitmaps[n].gran for ly in m.run_from_top(n, chain))
        bits = union_bits(r, g)
        assert v["count"] == bin(bits).count("1") * g, \
            "%s: count %s, expected %d (granules of %d)\n%s" % (
                what, v["count"], bin(bits).count("1") * g, g, label)
        sha = L.cbt_ok("bitmap", "--sha256", "--chain", top, n).out.strip()
        assert sha == L.bitmap_sha256(bits, g, m.size), "%s --sha256\n%s" % (what, label)
    if qemu:
        check_views_qemu(d, m, chain, out, label)
    return out


def check_views_qemu(d, m, chain, oracle, label):
    """QEMU's bitmaps of each layer (qemu-nbd -B, nbdinfo --map), OR-ed
    over the run from the top, equal the oracle of every valid name."""
    valid = [n for n, (ok, _) in oracle.items() if ok]
    if not valid:
        return
    per_layer = {}
    for ly in reversed(chain):
        p = os.path.join(d, ly.fname)
        held = [n for n in valid if n in M.qemu_layer_bitmaps(p)]
        per_layer[ly.fname] = L.qemu_bitmap_extents(p, held)
    for n in valid:
        ranges = []
        for ly in reversed(chain):
            if n not in per_layer[ly.fname]:
                break
            ranges += M.ranges_of(per_layer[ly.fname][n])
        L.assert_extents_equal(M.extents_of(ranges, m.size),
                               M.extents_of(oracle[n][1], m.size),
                               "QEMU's copies of %r OR-ed from %s vs the oracle\n%s"
                               % (n, chain[-1].fname, label))


def check_same_views(before, after, label, names=None):
    """The brief's invariant: every name valid before is valid after with
    the same dirty ranges; invalid names stay invalid."""
    for n, (ok, r) in before.items():
        if names is not None and n not in names:
            continue
        a_ok, a_r = after.get(n, (False, "gone"))
        if ok:
            assert a_ok and a_r == r, \
                "since %r seen from the top changed: before %s, after %s\n%s" % (
                    n, M.json_short(r), M.json_short(a_r if a_ok else str(a_r)), label)
        else:
            assert not a_ok, "%r was invalid (%s), is valid after\n%s" % (n, r, label)


def cbt_op(label_of, d, *argv):
    res = L.cbt_rc(*argv, cwd=d)
    what = "cbt " + " ".join(str(a) for a in argv)
    assert res.rc == 0, "%r\n%s" % (res, label_of(what))
    return what


# --------------------------------------------------------------------------
# The model against QEMU (every chain, every layer)


@pytest.mark.parametrize("cid", list(CHAINS))
def test_built_chain_matches_model(work, cid):
    c = case(work, cid)
    m = c.m
    label = c.label("building")
    seed, depth, invalid = CHAINS[cid]
    assert len(m.layers) == depth, label
    for ly in m.layers:
        p = os.path.join(c.orig, ly.fname)
        q = L.qemu_bitmap_extents(p, list(ly.bitmaps))
        for n, b in ly.bitmaps.items():
            L.assert_extents_equal(q[n], b.extents(m.size),
                                   "QEMU's %s %r vs the model\n%s" % (ly.fname, n, label))
    check_clean(c.orig, label)
    check_layers(c.orig, m, label)
    views = check_views(c.orig, m, m.layers, label, qemu=True)
    kinds = {r.code for ok, r in views.values() if not ok}
    if invalid in ("gap", "missing"):
        assert {"gap": "gap", "missing": "not-in-top"}[invalid] in kinds, label
    if invalid is None:
        assert any(ok for ok, _ in views.values()), label


# --------------------------------------------------------------------------
# cbt snapshot


@pytest.mark.parametrize("cid", list(CHAINS))
def test_snapshot_keeps_views(work, cid):
    c = case(work, cid)
    d = c.fresh("snapshot")
    m = c.m.clone()
    rng = random.Random(c.seed * 7 + 1)
    before = {n: m.view_or_reason(n) for n in m.names()}
    for rnd in range(2):
        top = m.top
        ref = flat_copy(d, top.fname, os.path.join(c.root, "snap%d.raw" % rnd))
        files = digests(d)
        new = "S%d.qcow2" % rnd
        what = cbt_op(c.label, d, "snapshot", top.fname, new)
        ly = M.Layer(new)
        for n, b in top.bitmaps.items():
            if b.recording:
                ly.bitmaps[n] = M.Bmp(n, b.gran, True)
                b.recording = False
        m.layers.append(ly)
        label = c.label(what)
        assert M.backing_of(os.path.join(d, new)) == (top.fname, "qcow2"), label
        check_clean(d, label)
        check_guest(ref, os.path.join(d, new), label)
        check_layers(d, m, label, changed={top.fname, new}, before=files)
        after = check_views(d, m, m.layers, label, qemu=rnd == 0)
        check_same_views(before, after, label)
        # writes on the new top are tracked there only
        ops = [M.rand_io(rng, m.size, m.cluster) for _ in range(rng.randint(1, 4))]
        args = []
        for op in ops:
            args += ["-c", M.io_cmd(*op)]
            ly.apply(*op)
        qemu_io("-f", "qcow2", *args, os.path.join(d, new))
        label = c.label(what + " ; qemu-io " + " ; ".join(M.io_cmd(*o) for o in ops))
        check_layer(d, m, ly, label)
        before = check_views(d, m, m.layers, label)


# --------------------------------------------------------------------------
# cbt commit, every (top, base) pair


def commit_cases(m):
    n = len(m.layers)
    a = n - 1
    out = []
    for t in range(1, n):
        for b in range(t):
            out.append((t, b, "intermediate" if t < a else "-b"))
    if n >= 2:
        out += [(a, a - 1, "plain"), (a, a - 1, "-d")]
    return out


def commit_argv(m, t, b, mode):
    lt, lb, la = m.layers[t].fname, m.layers[b].fname, m.top.fname
    if mode == "intermediate":
        return ["commit", "--top", lt, "--base", lb, "--active", la]
    if mode == "-b":
        return ["commit", "-b", lb, lt]
    if mode == "-d":
        return ["commit", "-d", lt]
    return ["commit", lt]


def run_commit(c, t, b, mode, qemu):
    m0 = c.m
    d = c.fresh("commit-%d-%d%s" % (t, b, mode))
    argv = commit_argv(m0, t, b, mode)
    what = "cbt " + " ".join(argv)
    label = c.label(what)
    stays = mode != "intermediate"
    refusal, _ = m0.commit_plan(t, b, stays)
    before_files = digests(d)
    before = {n: m0.view_or_reason(n) for n in m0.names()}
    res = L.cbt_rc(*argv, cwd=d)
    if refusal is not None:
        reason, files = refusal
        assert res.rc == 1, "commit must be refused (%s): %r\n%s" % (reason, res, label)
        assert any(f in res.err for f in files), \
            "the refusal (%s) should name one of %s: %r\n%s" % (reason, sorted(files), res, label)
        assert digests(d) == before_files, "a refused commit changed files\n%s" % label
        return False
    assert res.rc == 0, "%r\n%s" % (res, label)
    drop = mode in ("-b", "-d")
    m, chain = m0.after_commit(t, b, drop, stays)
    a = len(m0.layers) - 1
    check_clean(d, label)
    if mode == "intermediate":
        assert M.backing_of(os.path.join(d, m.layers[t + 1].fname)) == \
            (m.layers[b].fname, "qcow2"), "relinked backing of %s\n%s" % (
                m.layers[t + 1].fname, label)
    for k in range(1, len(m.layers)):
        if mode == "intermediate" and k == t + 1:
            continue
        assert M.backing_of(os.path.join(d, m.layers[k].fname)) == \
            (m.layers[k - 1].fname, "qcow2"), "backing of %s changed\n%s" % (
                m.layers[k].fname, label)
    check_guest(c.ref, os.path.join(d, m.top.fname), label)
    if t == a:
        check_guest(c.ref, os.path.join(d, m.layers[b].fname), label)
    if mode == "plain":
        top_map = L.qemu_map(os.path.join(d, m.top.fname))
        assert all(e["depth"] >= 1 for e in top_map), \
            "commit without -d must empty %s: %s\n%s" % (
                m.top.fname, M.json_short([e for e in top_map if e["depth"] == 0]), label)
    changed = {m.layers[b].fname, m.top.fname}
    if mode == "intermediate":
        changed.add(m.layers[t + 1].fname)
    check_layers(d, m, label, changed=changed, before=before_files)
    after = check_views(d, m, chain, label, qemu=qemu)
    # the spec's consequence: a valid X stays valid with the same view as
    # long as the chain keeps its run (not -d/-b) and base's granularity
    # is that of every copy merged into it
    if not drop:
        for n, (ok, r) in before.items():
            grans = {ly.bitmaps[n].gran for ly in m0.layers[b:t + 1] if n in ly.bitmaps}
            if ok and len(grans) == 1:
                assert after[n] == (True, r), \
                    "since %r seen from the top changed: %s -> %s\n%s" % (
                        n, M.json_short(r), M.json_short(str(after[n][1])), label)
    return True


@pytest.mark.parametrize("cid", [k for k, v in CHAINS.items() if v[1] >= 2])
def test_commit_every_pair(work, cid):
    c = case(work, cid)
    done = set()
    refused = 0
    for t, b, mode in commit_cases(c.m):
        kind = mode if mode == "intermediate" else "active"
        ok = run_commit(c, t, b, mode, qemu=kind not in done)
        if ok:
            done.add(kind)
        else:
            refused += 1
    seed, depth, invalid = CHAINS[cid]
    if invalid is None:
        assert refused == 0, c.label("commits")


# --------------------------------------------------------------------------
# cbt stream, cbt rebase


def pull_cases(m, rng):
    """FILE = the top with every base (None: no backing file), and one
    intermediate FILE with a random base."""
    n = len(m.layers)
    out = [(n - 1, b) for b in [None] + list(range(n - 1))]
    if n > 2:
        f = rng.randrange(1, n - 1)
        out.append((f, rng.choice([None] + list(range(f)))))
    return out


def pull_refusal(m, f, b):
    """The bitmap of layer f whose run below f stops at a layer that leaves
    the chain while a deeper layer holds it again (a gap the relink would
    close unseen): cbt refuses the stream / safe rebase, naming it."""
    lo = 0 if b is None else b + 1
    for name in m.layers[f].bitmaps:
        for k in range(f - 1, lo - 1, -1):
            if name in m.layers[k].bitmaps:
                continue
            if any(name in m.layers[j].bitmaps for j in range(k)):
                return name, m.layers[k].fname
            break
    return None


def run_pull(c, f, b, argv, qemu):
    m0 = c.m
    d = c.fresh("%s-%d-%s" % (argv[0], f, b))
    what = "cbt " + " ".join(argv)
    label = c.label(what)
    fname = m0.layers[f].fname
    refusal = pull_refusal(m0, f, b)
    if refusal:
        every = {ly.fname: L.file_digest(os.path.join(d, ly.fname))
                 for ly in m0.layers}
        res = L.cbt_rc(*argv, cwd=d)
        name, gap = refusal
        assert res.rc == 1, "%r\n%s" % (res, label)
        assert "bitmap '%s' has a gap" % name in res.err and gap in res.err, \
            "%r\n%s" % (res, label)
        for k, dg in every.items():
            assert L.file_digest(os.path.join(d, k)) == dg, \
                "%s changed by a refused %s\n%s" % (k, what, label)
        return []
    fref = flat_copy(d, fname, os.path.join(d, "..", os.path.basename(d) + ".file.raw"))
    before = {n: m0.view_or_reason(n) for n in m0.names()}
    others = {ly.fname: L.file_digest(os.path.join(d, ly.fname))
              for ly in m0.layers if ly.fname != fname}
    res = L.cbt_rc(*argv, cwd=d)
    assert res.rc == 0, "%r\n%s" % (res, label)
    m, chain, exact = m0.after_pull(f, b, merge=PULL_KEEPS_VIEWS)
    loses = [] if PULL_KEEPS_VIEWS else m0.pull_loses(f, b)
    check_clean(d, label)
    want_backing = (None, None) if b is None else (m.layers[b].fname, "qcow2")
    assert M.backing_of(os.path.join(d, fname)) == want_backing, label
    for k, dg in others.items():
        assert L.file_digest(os.path.join(d, k)) == dg, "%s changed\n%s" % (k, label)
    check_guest(c.ref, os.path.join(d, m.top.fname), label)
    check_guest(fref, os.path.join(d, fname), label)
    loose = {fname: [n for n in m.layers[f].bitmaps if n not in exact]}
    check_layers(d, m, label, loose, changed={fname}, before=others)
    after = check_views(d, m, chain, label, qemu=qemu)
    check_same_views(before, after, label,
                     names=[n for n, (ok, _) in before.items() if ok and n not in loses])
    return loses


@pytest.mark.parametrize("cid", [k for k, v in CHAINS.items() if v[1] >= 2])
def test_stream_keeps_views(work, cid):
    c = case(work, cid)
    rng = random.Random(c.seed * 7 + 2)
    for i, (f, b) in enumerate(pull_cases(c.m, rng)):
        argv = ["stream"] + ([] if b is None else ["-b", c.m.layers[b].fname]) + \
            [c.m.layers[f].fname]
        run_pull(c, f, b, argv, qemu=i == 0)


@pytest.mark.parametrize("cid", [k for k, v in CHAINS.items() if v[1] >= 2])
def test_rebase_safe_keeps_views(work, cid):
    c = case(work, cid)
    rng = random.Random(c.seed * 7 + 3)
    for i, (f, b) in enumerate(pull_cases(c.m, rng)):
        if b is None:
            argv = ["rebase", "-b", "", c.m.layers[f].fname]
        else:
            argv = ["rebase", "-b", c.m.layers[b].fname, "-F", "qcow2", c.m.layers[f].fname]
        run_pull(c, f, b, argv, qemu=i == 0)


@pytest.mark.parametrize("cid", [k for k, v in CHAINS.items() if v[1] >= 2])
def test_rebase_unsafe_only_relinks(work, cid):
    """rebase -u onto a flat copy of the old backing view: guest data the
    same, no file's bitmaps touched, views follow the new (shorter) chain."""
    c = case(work, cid)
    rng = random.Random(c.seed * 7 + 4)
    m0 = c.m
    f = rng.randrange(1, len(m0.layers))
    d = c.fresh("rebase-u-%d" % f)
    files = digests(d)
    qemu_img("convert", "-f", "qcow2", "-O", "qcow2",
             os.path.join(d, m0.layers[f - 1].fname), os.path.join(d, "flat.qcow2"))
    fname = m0.layers[f].fname
    argv = ["rebase", "-u", "-b", "flat.qcow2", "-F", "qcow2", fname]
    what = cbt_op(c.label, d, *argv)
    label = c.label(what)
    check_clean(d, label)
    assert M.backing_of(os.path.join(d, fname)) == ("flat.qcow2", "qcow2"), label
    check_guest(c.ref, os.path.join(d, m0.top.fname), label)
    check_layers(d, m0, label, changed={fname}, before=files)
    chain = [M.Layer("flat.qcow2")] + m0.layers[f:]
    check_views(d, m0, chain, label, qemu=True)


# --------------------------------------------------------------------------
# cbt convert


@pytest.mark.parametrize("cid", list(CHAINS))
def test_convert_bitmaps_keeps_views(work, cid):
    c = case(work, cid)
    m0 = c.m
    d = c.fresh("convert")
    src = digests(d)
    argv = ["convert", "-O", "qcow2", "--bitmaps", m0.top.fname, "out.qcow2"]
    what = cbt_op(c.label, d, *argv)
    label = c.label(what)
    out = dict(digests(d))
    del out["out.qcow2"]
    assert out == src, "convert changed its source\n%s" % label
    m = m0.after_convert()
    check_clean(d, label)
    check_guest(c.ref, os.path.join(d, "out.qcow2"), label)
    check_layer(d, m, m.top, label)
    after = check_views(d, m, m.layers, label, qemu=True)
    before = {n: m0.view_or_reason(n) for n in m0.names()}
    check_same_views(before, after, label, names=[n for n, (ok, _) in before.items() if ok])
    what = cbt_op(c.label, d, "convert", "-O", "raw", m0.top.fname, "out.raw")
    res = qemu_img("compare", "-f", "raw", "-F", "raw", c.ref, os.path.join(d, "out.raw"),
                   check=False)
    assert res.rc == 0, "%r\n%s" % (res, c.label(what))
