"""`cbt commit`: data and bitmaps of upper layers committed into a base.
QEMU's tools are the oracles:

  * every (top, base) pair of a 5-layer chain (random writes, zero writes
    and discards by qemu-io; bitmaps of several granularities in several
    layers; one layer shorter than the top): afterwards qemu-img check is
    clean on every image, the guest view of the active image equals a
    qemu-img convert copy made before (qemu-img compare), base's bitmaps
    equal the union computed here from the recorded writes (both `cbt
    bitmap --dump` and qemu-nbd -B + nbdinfo --map), base's other bitmaps
    and every other layer's bitmaps are unchanged, the relinked image's
    backing file is base (qemu-img info), untouched layers are
    byte-identical;
  * twin chains: `cbt commit FILE`, `-d`, `-b BASE` against `qemu-img
    commit` with the same options: same guest views and allocation
    (qemu-img map, host offsets ignored);
  * refusals (gap, inconsistent copy, granularity collision, base not in
    the chain, base above top, same image, raw base that cannot hold the
    bitmaps, a backing loop, a wrong -f): exit 1, the
    error names what is wrong, every file byte-identical afterwards;
  * --skip-broken-bitmaps: the broken name is left alone with a warning,
    the rest is committed.
"""
import os
import random
import shutil
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import KiB, MiB, qemu_img, qemu_io  # noqa: E402

# Layer i is "L<i>.qcow2"; L4 is the active image.  L2 is shorter than the
# layers above it, so the top reads zeroes there whatever L1 and L0 hold.
SIZES = [3 * MiB, 4 * MiB, 3 * MiB + 512 * KiB, 4 * MiB, 4 * MiB]
# name -> {layer: granularity}; 'c' is disabled after its layer's writes.
BITMAPS = {
    "a": {0: 64 * KiB, 1: 64 * KiB, 2: 64 * KiB, 3: 64 * KiB, 4: 64 * KiB},
    "b": {2: 4 * KiB, 3: 4 * KiB},
    "c": {4: 128 * KiB},
    "e": {1: 32 * KiB},
    "u": {0: 16 * KiB},
}
DISABLED = {("c", 4)}
NLAYERS = len(SIZES)


def name(i):
    return "L%d.qcow2" % i


class Chain:
    """A chain built in `d` with qemu-img/qemu-io, and the expected bits of
    every bitmap of every layer (L.BitmapModel)."""

    def __init__(self, d, seed, sizes=SIZES, bitmaps=BITMAPS, writes=25):
        self.d = str(d)
        os.makedirs(self.d, exist_ok=True)
        self.sizes = list(sizes)
        self.models = {}   # layer -> [BitmapModel] in directory order
        rng = random.Random(seed)
        for i, size in enumerate(self.sizes):
            p = self.path(i)
            if i == 0:
                qemu_img("create", "-q", "-f", "qcow2", p, size)
            else:
                qemu_img("create", "-q", "-f", "qcow2", "-b", name(i - 1), "-F", "qcow2",
                         p, size)
            ms = []
            for n, layers in bitmaps.items():
                if i in layers:
                    qemu_img("bitmap", "--add", "-g", layers[i], p, n)
                    ms.append(L.BitmapModel(n, layers[i]))
            cmds = L.bitmap_io_workload(rng, size, writes, maxlen=192 * KiB)
            L.run_qemu_io(p, cmds)
            L.model_apply_io(ms, cmds)
            for m in ms:
                if (m.name, i) in DISABLED:
                    qemu_img("bitmap", "--disable", p, m.name)
                    m.recording = False
            self.models[i] = ms

    def path(self, i):
        return os.path.join(self.d, name(i))

    def model(self, i, n):
        return next((m for m in self.models[i] if m.name == n), None)


def guest_raw(path, out):
    qemu_img("convert", "-O", "raw", path, out)
    return out


def layer_state(path):
    """Bitmap names, flags, granularities and extents of one image."""
    out = {}
    for b in L.qemu_bitmaps(path):
        out[b["name"]] = (b["granularity"], sorted(b["flags"]), L.cbt_dump(path, b["name"]))
    return out


def expected_union(chain, top, base, base_size, chain_stays=False):
    """{name: BitmapModel} expected in base after committing top..base.
    chain_stays: qemu-img's form, where the layers between stay in the
    chain: a name base lacks is created only when every layer from its
    topmost holder down to base holds it (else it would be a gap)."""
    out = {}
    for n in BITMAPS:
        holders = [i for i in range(base, top + 1) if chain.model(i, n)]
        if not holders:
            continue
        if chain_stays and base not in holders and \
                any(not chain.model(i, n) for i in range(base + 1, max(holders) + 1)):
            continue
        topmost = chain.model(max(holders), n)
        if base in holders:
            dst = chain.model(base, n).copy()
        else:
            dst = L.BitmapModel(n, topmost.gran, topmost.recording)
        for i in holders:
            if i != base:
                dst.merge_from(chain.model(i, n), base_size)
        out[n] = dst
    return out


@pytest.fixture(scope="module")
def chain5(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain5")
    c = Chain(d / "orig", seed=4242)
    # The model must be right before it can judge cbt: check it once.
    for i in range(NLAYERS):
        for m in c.models[i]:
            L.assert_extents_equal(L.cbt_dump(c.path(i), m.name), m.extents(c.sizes[i]),
                                   "model of %r in L%d" % (m.name, i))
    view = guest_raw(c.path(NLAYERS - 1), str(d / "before.raw"))
    states = {i: layer_state(c.path(i)) for i in range(NLAYERS)}
    digests = {i: L.file_digest(c.path(i)) for i in range(NLAYERS)}
    return c, str(d), view, states, digests


PAIRS = [(t, b) for t in range(1, NLAYERS) for b in range(t)]


@pytest.mark.parametrize("top,base", PAIRS, ids=["L%d-into-L%d" % p for p in PAIRS])
def test_commit_pair(chain5, top, base):
    c, root, view, states, digests = chain5
    d = os.path.join(root, "t%d-b%d" % (top, base))
    os.makedirs(d)
    for i in range(NLAYERS):
        shutil.copy(c.path(i), os.path.join(d, name(i)))
    p = lambda i: os.path.join(d, name(i))  # noqa: E731
    active = NLAYERS - 1
    emptied = None
    if top == active:
        if base == top - 1:
            res = L.cbt_ok("commit", p(top))
            emptied = top
        else:
            # relative spellings, resolved from the folder
            res = L.cbt_ok("commit", "-b", name(base), name(top), cwd=d)
        above = None
    else:
        res = L.cbt_ok("commit", "--top", p(top), "--base", "./" + name(base),
                       "--active", name(active), cwd=d)
        above = top + 1
    assert res.out == "Image committed.\n"

    for i in range(NLAYERS):
        L.qemu_check_clean(p(i))
    # Guest view of the active image: unchanged.
    qemu_img("compare", "-f", "raw", "-F", "qcow2", view, p(active))
    if above is not None:
        info = L.qemu_json("info", "--output=json", p(above))
        assert info["backing-filename"] == name(base)
        assert info["backing-filename-format"] == "qcow2"
        # TOP and the layers between are out of the active chain now.
        chain = L.qemu_json("info", "--output=json", "--backing-chain", p(active))
        got = [os.path.basename(e["filename"]) for e in chain]
        want = [name(i) for i in range(active, top, -1)] + [name(i) for i in range(base, -1, -1)]
        assert got == want
    if emptied is not None:
        m = L.coalesce(L.qemu_map(p(emptied)))
        assert all(e["depth"] > 0 or not e["present"] for e in m), m

    # Files never opened for writing are byte-identical.
    written = {base, above, emptied}
    for i in range(NLAYERS):
        if i not in written:
            assert L.file_digest(p(i)) == digests[i], "L%d changed" % i

    # Base's bitmaps: the union over top..base; its other bitmaps unchanged.
    base_size = max(c.sizes[base], c.sizes[top])
    assert L.qemu_json("info", "--output=json", p(base))["virtual-size"] == base_size
    want = expected_union(c, top, base, base_size,
                          chain_stays=top == active)
    qb = {b["name"]: b for b in L.qemu_bitmaps(p(base))}
    assert set(qb) == set(want) | set(states[base]), (sorted(qb), sorted(want))
    qext = L.qemu_bitmap_extents(p(base), sorted(qb))
    for n, m in want.items():
        assert qb[n]["granularity"] == m.gran, (n, qb[n])
        assert sorted(qb[n]["flags"]) == m.flags(), (n, qb[n])
        L.assert_extents_equal(L.cbt_dump(p(base), n), m.extents(base_size),
                               "cbt --dump of %r in base vs the union" % n)
        L.assert_extents_equal(qext[n], m.extents(base_size),
                               "qemu-nbd/nbdinfo of %r in base vs the union" % n)
    for n, (gran, flags, ext) in states[base].items():
        if n in want:
            continue
        assert (qb[n]["granularity"], sorted(qb[n]["flags"])) == (gran, flags)
        if base_size == c.sizes[base]:
            L.assert_extents_equal(L.cbt_dump(p(base), n), ext, "untouched %r" % n)
        else:
            # grown: the new area is clean
            grown = L.ext_coalesce(ext + [{"start": c.sizes[base],
                                           "length": base_size - c.sizes[base],
                                           "dirty": False}])
            L.assert_extents_equal(L.cbt_dump(p(base), n), grown, "untouched %r" % n)
    # Every other layer's bitmaps are as they were.
    for i in range(NLAYERS):
        if i != base:
            assert layer_state(p(i)) == states[i], "bitmaps of L%d changed" % i


# ---- against qemu-img commit on twin chains ----------------------------

UNIFORM = [4 * MiB] * NLAYERS


@pytest.mark.parametrize("args,base", [([], 3), (["-d"], 3), (["-b", "L1.qcow2"], 1)],
                         ids=["empty", "drop", "base"])
def test_commit_like_qemu_img(tmp_path, args, base):
    c = Chain(tmp_path / "cbt", seed=7, sizes=UNIFORM, bitmaps={})
    q = str(tmp_path / "qemu")
    shutil.copytree(c.d, q)
    top = NLAYERS - 1
    view = guest_raw(c.path(top), str(tmp_path / "before.raw"))
    res = L.cbt_ok("commit", *args, name(top), cwd=c.d)
    assert res.out == "Image committed.\n"
    qres = qemu_img("commit", *args, name(top), cwd=q)
    assert qres.out == res.out
    for d in (c.d, q):
        qemu_img("compare", "-f", "raw", "-F", "qcow2", view, os.path.join(d, name(top)))
        for i in range(NLAYERS):
            L.qemu_check_clean(os.path.join(d, name(i)))
    for i in (base, top):
        got = L.coalesce(L.qemu_map(os.path.join(c.d, name(i))))
        want = L.coalesce(L.qemu_map(os.path.join(q, name(i))))
        L.assert_maps_equal(got, want, "qemu-img map of L%d after commit %s" % (i, args))
        qemu_img("compare", os.path.join(c.d, name(i)), os.path.join(q, name(i)))


def test_commit_quiet_and_progress(tmp_path):
    c = Chain(tmp_path, seed=9, sizes=[2 * MiB] * 2, bitmaps={})
    res = L.cbt_ok("commit", "-q", "-p", c.path(1))
    assert res.out == "" and res.err == ""   # -p draws only on a terminal


# ---- refusals: nothing changed ------------------------------------------

def digests_of(d):
    return {f: L.file_digest(os.path.join(d, f)) for f in sorted(os.listdir(d))}


def refuse(d, args, pattern, cwd=None):
    before = digests_of(d)
    res = L.cbt_rc("commit", *args, cwd=cwd or d)
    assert res.rc == 1, res
    assert res.out == ""
    assert pattern in res.err, "expected %r in: %r" % (pattern, res.err)
    assert len(res.err.strip().splitlines()) == 1, res.err
    assert digests_of(d) == before, "files changed by a refused commit"
    return res


def small_chain(d, bitmaps):
    return Chain(d, seed=11, sizes=[2 * MiB] * 3, bitmaps=bitmaps, writes=8)


def test_refuse_gap(tmp_path):
    c = small_chain(tmp_path, {"g": {0: 64 * KiB, 2: 64 * KiB}})
    refuse(c.d, ["-b", "L0.qcow2", "L2.qcow2"],
           "bitmap 'g': 'L1.qcow2' does not hold it")
    refuse(c.d, ["--top", "L2.qcow2", "--base", "L0.qcow2"], "'L1.qcow2' does not hold it")
    # Committing only L1 into L0 is fine: L1 does not hold 'g', L0 keeps it.
    L.cbt_ok("commit", "--top", "L1.qcow2", "--active", "L2.qcow2", cwd=c.d)
    assert L.cbt_dump(c.path(0), "g") == c.model(0, "g").extents(2 * MiB)


def test_refuse_inconsistent_then_skip(tmp_path):
    c = small_chain(tmp_path, {"a": {0: 64 * KiB, 1: 64 * KiB, 2: 64 * KiB},
                               "k": {1: 64 * KiB, 2: 64 * KiB}})
    L.set_bitmap_flags(c.path(1), "a", 3)        # in_use + auto: inconsistent
    res = refuse(c.d, ["-b", "L0.qcow2", "L2.qcow2"], "bitmap 'a' in 'L1.qcow2' is inconsistent")
    assert "--skip-broken-bitmaps" in res.err
    a0 = L.cbt_dump(c.path(0), "a")
    res = L.cbt_ok("commit", "--skip-broken-bitmaps", "-b", "L0.qcow2", "L2.qcow2", cwd=c.d)
    assert "bitmap 'a' in 'L1.qcow2' is inconsistent" in res.err
    assert "left alone" in res.err
    assert L.cbt_dump(c.path(0), "a") == a0      # left alone
    k = L.BitmapModel("k", 64 * KiB)
    k.merge_from(c.model(1, "k"), 2 * MiB)
    k.merge_from(c.model(2, "k"), 2 * MiB)
    assert L.cbt_dump(c.path(0), "k") == k.extents(2 * MiB)
    L.qemu_check_clean(c.path(0))


def test_refuse_inconsistent_in_base(tmp_path):
    c = small_chain(tmp_path, {"a": {0: 64 * KiB, 1: 64 * KiB}})
    L.set_bitmap_flags(c.path(0), "a", 3)
    refuse(c.d, ["--top", "L1.qcow2", "--active", "L2.qcow2"],
           "bitmap 'a' in 'L0.qcow2' is inconsistent")


def test_refuse_granularity_collision(tmp_path):
    c = small_chain(tmp_path, {"a": {0: 64 * KiB, 1: 4 * KiB, 2: 4 * KiB}})
    res = refuse(c.d, ["-b", "L0.qcow2", "L2.qcow2"], "bitmap 'a': granularity 4096 in 'L2.qcow2'")
    assert "65536 in 'L0.qcow2'" in res.err
    # Not even --skip-broken-bitmaps lets it through.
    refuse(c.d, ["--skip-broken-bitmaps", "-b", "L0.qcow2", "L2.qcow2"], "granularity 4096")


def test_refuse_bad_layers(tmp_path):
    c = small_chain(tmp_path, {"a": {1: 64 * KiB, 2: 64 * KiB}})
    other = os.path.join(c.d, "other.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", other, 2 * MiB)
    refuse(c.d, ["-b", "other.qcow2", "L2.qcow2"],
           "Did not find 'other.qcow2' in the backing chain of 'L2.qcow2'")
    refuse(c.d, ["-b", "L2.qcow2", "L1.qcow2"],          # base above top
           "Did not find 'L2.qcow2' in the backing chain of 'L1.qcow2'")
    refuse(c.d, ["-b", "L1.qcow2", "L1.qcow2"], "Did not find 'L1.qcow2'")
    refuse(c.d, ["-b", "nothere.qcow2", "L2.qcow2"], "nothere.qcow2: No such file")
    refuse(c.d, ["nothere.qcow2"], "nothere.qcow2")
    refuse(c.d, ["L0.qcow2"], "Image 'L0.qcow2' does not have a backing file")
    refuse(c.d, ["--top", "other.qcow2", "--active", "L2.qcow2"],
           "'other.qcow2' is not in the backing chain of 'L2.qcow2'")
    # The --top form never empties TOP, so this one is allowed.
    L.cbt_ok("commit", "--top", "L2.qcow2", "--base", "L0.qcow2", cwd=c.d)
    L.qemu_check_clean(c.path(0))


def test_refuse_raw_base_with_bitmaps(tmp_path):
    d = str(tmp_path)
    raw = os.path.join(d, "base.raw")
    qemu_img("create", "-q", "-f", "raw", raw, 2 * MiB)
    top = os.path.join(d, "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top)
    qemu_img("bitmap", "--add", top, "a")
    qemu_io("-c", "write -P 1 0 100k", top)
    refuse(d, ["top.qcow2"], "cannot carry bitmap 'a' of 'top.qcow2' into the base")
    # Without bitmaps a raw base is fine (and is what qemu-img does).
    qemu_img("bitmap", "--remove", top, "a")
    L.cbt_ok("commit", "top.qcow2", cwd=d)
    with open(raw, "rb") as f:
        assert f.read(100 * KiB) == b"\x01" * (100 * KiB)


def test_refuse_backing_loop(tmp_path):
    d = str(tmp_path)
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, "a.qcow2"), 1 * MiB)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2",
             os.path.join(d, "b.qcow2"))
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", os.path.join(d, "a.qcow2"))
    refuse(d, ["b.qcow2"], "loops back")


def test_usage_errors(tmp_path):
    for args, msg in ((["--active", "x", "y"], "--active needs --top"),
                      (["--top", "x", "y"], "unexpected argument 'y'"),
                      ([], "missing image file name")):
        res = L.cbt_rc("commit", *args)
        assert res.rc == 64 and msg in res.err, res
    c = small_chain(tmp_path, {})
    refuse(c.d, ["-f", "raw", "L2.qcow2"], "L2.qcow2: the image is in format 'qcow2', not 'raw'")
    L.cbt_ok("commit", "-f", "qcow2", "L2.qcow2", cwd=c.d)


def test_pivot_makes_base_record_again(tmp_path):
    """--top on the active layer (no --active above it): base takes top's
    place, so a copy that cbt snapshot sealed in base records again, and
    the view from base is the union; the qemu-img form keeps base sealed."""
    for form in ("pivot", "qemu-img"):
        d = tmp_path / form
        d.mkdir()
        base, top = str(d / "base.qcow2"), str(d / "top.qcow2")
        qemu_img("create", "-f", "qcow2", base, "4M")
        qemu_img("bitmap", "--add", "-g", "64k", base, "x")
        qemu_io("-c", "write -P 1 0 64k", base)
        L.cbt_ok("snapshot", base, top)
        qemu_io("-c", "write -P 2 1M 64k", top)
        before = L.cbt_json("bitmap", "--dump", "--chain", "--output=json",
                            top, "x")
        if form == "pivot":
            L.cbt_ok("commit", "--top", top, "--base", base)
        else:
            L.cbt_ok("commit", "-d", top)
        info = {b["name"]: b for b in
                L.cbt_json("bitmap", "--list", "--output=json", base)}
        assert info["x"]["recording"] is (form == "pivot"), info
        if form == "pivot":
            # base alone now shows what the chain showed.
            after = L.cbt_json("bitmap", "--dump", "--chain", "--output=json",
                               base, "x")
            assert after == before
        else:
            after = L.cbt_json("bitmap", "--dump", "--chain", "--output=json",
                               top, "x")
            assert after == before
        qemu_img("check", base)
