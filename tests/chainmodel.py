"""A model of qcow2 backing chains with persistent dirty bitmaps, for the
random-chain property tests (tests/integration/test_chain_invariants.py).

A chain is built with QEMU's tools only (qemu-img create -b/-F, qemu-img
bitmap --add/--disable/--remove, qemu-io write -P / write -z / discard) or,
for some layers, `cbt snapshot`.  Every write is recorded per layer with the
bitmaps that were recording in that layer when it ran; the expected bits of
each bitmap are computed from that log alone:

  * a write, zero-write or discard of [off, off+len) dirties every granule
    it overlaps, in every bitmap of the layer that records at that moment;
  * a bitmap added later sees only later writes; a disabled one sees none.

From the per-layer bitmaps the model derives what the chain operations must
leave behind (the "since X seen from the top" view, the result of a commit,
of a stream, of a convert --bitmaps).  Guest data is not modelled byte by
byte: the tests compare guest views with `qemu-img compare` against a copy
made before the operation.

Chains are indexed bottom (0) to top (-1); a layer is a file name in one
directory (backing links are relative, so a directory copy is a chain copy).
"""
import copy
import json
import os
import random
import shutil
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.join(_HERE, "interop") not in sys.path:
    sys.path.insert(0, os.path.join(_HERE, "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import KiB, MiB, qemu_img, qemu_io  # noqa: E402

GRAN_BITS = range(9, 21)  # 512 B .. 1 MiB


# --------------------------------------------------------------------------
# Byte ranges


def granule_ranges(bits, gran, size):
    """[(start, end)] byte ranges of the set bits, clamped to size."""
    out = []
    for first, n in L.bit_runs(bits):
        s, e = first * gran, min((first + n) * gran, size)
        if s >= size:
            break
        out.append((s, e))
    return out


def union_ranges(ranges):
    out = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def extents_of(ranges, size):
    """Dirty/clean extents covering [0, size) for sorted disjoint ranges."""
    out, pos = [], 0
    for s, e in union_ranges(ranges):
        if s > pos:
            out.append({"start": pos, "length": s - pos, "dirty": False})
        out.append({"start": s, "length": e - s, "dirty": True})
        pos = e
    if pos < size:
        out.append({"start": pos, "length": size - pos, "dirty": False})
    return out


def ranges_of(ext):
    return [(e["start"], e["start"] + e["length"]) for e in ext if e["dirty"]]


# --------------------------------------------------------------------------
# The model


_uids = iter(range(1, 1 << 62))


class Bmp:
    """One bitmap of one layer (uid: this copy, distinct from a later one
    of the same name)."""

    def __init__(self, name, gran, recording=True, bits=0):
        self.name, self.gran, self.recording, self.bits = name, gran, recording, bits
        self.uid = next(_uids)

    def dirty(self, off, length):
        if self.recording and length > 0:
            lo, hi = off // self.gran, (off + length - 1) // self.gran + 1
            self.bits |= ((1 << (hi - lo)) - 1) << lo

    def merge_ranges(self, ranges):
        """Every granule touching a dirty byte becomes dirty (QEMU's merge)."""
        for s, e in ranges:
            lo, hi = s // self.gran, (e - 1) // self.gran + 1
            self.bits |= ((1 << (hi - lo)) - 1) << lo

    def ranges(self, size):
        return granule_ranges(self.bits, self.gran, size)

    def extents(self, size):
        return extents_of(self.ranges(size), size)

    def flags(self):
        return ["auto"] if self.recording else []

    def __repr__(self):
        return "Bmp(%s, g=%d, %s)" % (self.name, self.gran,
                                      "rec" if self.recording else "off")


class Layer:
    def __init__(self, fname):
        self.fname = fname
        self.bitmaps = {}   # name -> Bmp, in directory order
        self.log = []       # (op, off, len, pattern, uids recording)

    def apply(self, op, off, length, pattern=None):
        rec = tuple(b.uid for b in self.bitmaps.values() if b.recording)
        self.log.append((op, off, length, pattern, rec))
        for b in self.bitmaps.values():
            b.dirty(off, length)

    def recompute(self):
        """The bits of every bitmap from the log alone (a cross-check of the
        eager updates: both must agree)."""
        by_uid = {b.uid: b for b in self.bitmaps.values()}
        out = {b.uid: 0 for b in self.bitmaps.values()}
        for op, off, length, pat, rec in self.log:
            for u in rec:
                if u in out:
                    g = by_uid[u].gran
                    lo, hi = off // g, (off + length - 1) // g + 1
                    out[u] |= ((1 << (hi - lo)) - 1) << lo
        return {b.name: out[b.uid] for b in self.bitmaps.values()}


class Invalid(Exception):
    """The chain view of a bitmap is invalid: code is cbt's reason code
    ("not-in-top", "gap", "disabled"), str() says why."""

    def __init__(self, code, msg):
        Exception.__init__(self, msg)
        self.code = code


class Chain:
    def __init__(self, seed, size, cluster):
        self.seed, self.size, self.cluster = seed, size, cluster
        self.layers = []    # bottom .. top
        self.story = []     # how it was built, for failure messages

    def clone(self):
        return copy.deepcopy(self)

    def index(self, fname):
        return next(i for i, ly in enumerate(self.layers) if ly.fname == fname)

    @property
    def top(self):
        return self.layers[-1]

    def names(self):
        out = []
        for ly in self.layers:
            for n in ly.bitmaps:
                if n not in out:
                    out.append(n)
        return out

    def describe(self):
        lines = ["seed %d: size %d, cluster %d, %d layers (bottom first)"
                 % (self.seed, self.size, self.cluster, len(self.layers))]
        for ly in self.layers:
            lines.append("  %s: %s, %d writes" % (ly.fname, list(ly.bitmaps.values()),
                                                  len(ly.log)))
        return "\n".join(lines)

    # ---- the "since X seen from the top" oracle ----

    def view(self, name, layers=None):
        """Dirty byte ranges of `name` seen from the top of `layers`
        (default: the whole chain), or raise Invalid.  The checks run in
        the order of cbt's views (libvirt's): top holds it, no gap, top
        copy recording; copies below the top may be disabled (sealed)."""
        layers = self.layers if layers is None else layers
        top = layers[-1]
        if name not in top.bitmaps:
            raise Invalid("not-in-top", "the top layer %s does not hold %r"
                          % (top.fname, name))
        i = len(layers) - 1
        ranges = []
        while i >= 0 and name in layers[i].bitmaps:
            ranges += layers[i].bitmaps[name].ranges(self.size)
            i -= 1
        for j in range(i - 1, -1, -1):
            if name in layers[j].bitmaps:
                raise Invalid("gap", "%r has a gap: %s lacks it, %s below holds it"
                              % (name, layers[i].fname, layers[j].fname))
        if not top.bitmaps[name].recording:
            raise Invalid("disabled", "the copy of %r in the top layer %s is disabled"
                          % (name, top.fname))
        return union_ranges(ranges)

    def run_from_top(self, name, layers=None):
        """The layers holding `name` contiguously from the top of `layers`."""
        layers = self.layers if layers is None else layers
        out = []
        for ly in reversed(layers):
            if name not in ly.bitmaps:
                break
            out.append(ly)
        return out

    def view_or_reason(self, name, layers=None):
        """(True, ranges) or (False, Invalid)."""
        try:
            return True, self.view(name, layers)
        except Invalid as e:
            return False, e

    # ---- operations, as specified ----

    def commit_plan(self, t, b, chain_stays=False):
        """What committing layers t..b+1 into b must do.  Returns
        (refusal, names) where refusal is None or (reason, {file names an
        error may name}); names maps each bitmap name of t..b to the
        expected Bmp in base afterwards.  chain_stays: qemu-img's form (t is
        the active layer and the layers between stay in its chain): a name
        base lacks is created there only when every layer from its topmost
        holder down to b+1 holds it (else base's copy would be a gap)."""
        base = self.layers[b]
        result = {}
        for name in self.names():
            holders = [j for j in range(b, t + 1) if name in self.layers[j].bitmaps]
            if not holders:
                continue
            if chain_stays and name not in base.bitmaps and \
                    any(name not in self.layers[j].bitmaps
                        for j in range(b + 1, holders[-1] + 1)):
                continue
            lacking = [j for j in range(holders[0], holders[-1] + 1) if j not in holders]
            if lacking:
                return (("gap in %r: %s" % (name, [self.layers[j].fname for j in lacking]),
                         {self.layers[j].fname for j in lacking}), None)
            topmost = self.layers[holders[-1]].bitmaps[name]
            if name in base.bitmaps:
                dst = copy.deepcopy(base.bitmaps[name])
                if dst.gran != topmost.gran:
                    return (("granularity of %r: %d in %s, %d in %s"
                             % (name, dst.gran, base.fname, topmost.gran,
                                self.layers[holders[-1]].fname),
                             {base.fname, self.layers[holders[-1]].fname}), None)
            else:
                dst = Bmp(name, topmost.gran, topmost.recording)
            for j in holders:
                if j != b:
                    dst.merge_ranges(self.layers[j].bitmaps[name].ranges(self.size))
            result[name] = dst
        return None, result

    def after_commit(self, t, b, drop, chain_stays=False):
        """The model after a successful commit of t into b.  Returns (model,
        active layers list of the new chain).  Intermediate commit: the
        layers t..b+1 leave the chain.  Active commit with drop: base is the
        new active (the files above it keep their links).  Active commit
        without drop: top is emptied, the chain stays."""
        refusal, plan = self.commit_plan(t, b, chain_stays)
        assert refusal is None
        m = self.clone()
        base = m.layers[b]
        for name, bmp in plan.items():
            base.bitmaps[name] = bmp
        if t < len(m.layers) - 1:
            chain = m.layers[:b + 1] + m.layers[t + 1:]
        elif drop:
            chain = m.layers[:b + 1]
        else:
            chain = list(m.layers)
        return m, chain


    def after_pull(self, f, b, merge):
        """The model after the data of the layers b+1..f-1 moved into layer
        f and f was relinked onto b (None: no backing file): `cbt stream -b
        Lb Lf` or `cbt rebase -b Lb Lf` (safe).  The guest view is kept.
        merge False: every file's bitmaps are unchanged (what ops.h says),
        so the copies of the layers leaving the chain no longer count.
        merge True: "since X seen from the top" is kept for every X valid
        before: f's copy of X gains the copies of the layers that leave the
        chain (merged at f's granularity, as libvirt does on block-pull).
        Returns (model, new chain, names whose f copy is exactly known;
        the others must only keep their bits)."""
        m = self.clone()
        lo = 0 if b is None else b + 1
        dropped = m.layers[lo:f]
        fl = m.layers[f]
        exact = list(fl.bitmaps) if not merge else []
        for name in self.names() if merge else []:
            ok, _ = self.view_or_reason(name)
            if not ok:
                continue
            if name in fl.bitmaps and all(name in ly.bitmaps for ly in m.layers[f:]):
                for ly in dropped:
                    if name in ly.bitmaps:
                        fl.bitmaps[name].merge_ranges(ly.bitmaps[name].ranges(self.size))
            if name in fl.bitmaps:
                exact.append(name)
        chain = ([] if b is None else m.layers[:b + 1]) + m.layers[f:]
        return m, chain, exact

    def pull_loses(self, f, b):
        """Names valid before whose view from the top loses bits when the
        layers b+1..f-1 leave the chain with every bitmap unchanged."""
        m, chain, _ = self.after_pull(f, b, merge=False)
        out = []
        for name in self.names():
            ok, r = self.view_or_reason(name)
            if ok:
                a_ok, a_r = m.view_or_reason(name, chain)
                if not a_ok or a_r != r:
                    out.append(name)
        return out

    def after_convert(self):
        """The single-layer model of `cbt convert --bitmaps` of the top:
        every name of the chain, as the union over all layers holding it,
        with the topmost copy's granularity and recording state."""
        out = Layer("out.qcow2")
        for name in self.names():
            holders = [ly for ly in reversed(self.layers) if name in ly.bitmaps]
            t = holders[0].bitmaps[name]
            dst = Bmp(name, t.gran, t.recording)
            for ly in holders:
                dst.merge_ranges(ly.bitmaps[name].ranges(self.size))
            out.bitmaps[name] = dst
        m = Chain(self.seed, self.size, self.cluster)
        m.layers = [out]
        return m


# --------------------------------------------------------------------------
# Building random chains with QEMU's tools


def rand_io(rng, size, cluster):
    """One (op, off, len, pattern): a write with a pattern, a zero-write
    (with or without unmap) or a discard; offsets cluster-aligned,
    sector-aligned or unaligned, some touching the last byte."""
    r = rng.randrange(10)
    if r < 3:
        off = rng.randrange(size // cluster) * cluster
    elif r < 6:
        off = rng.randrange(size // 512) * 512
    elif r < 9:
        off = rng.randrange(size)
    else:
        off = max(0, size - rng.randint(1, 3 * cluster))
    length = rng.choice([rng.randint(1, 4096), 512 * rng.randint(1, 64),
                         cluster * rng.randint(1, 3), rng.randint(1, 4 * cluster)])
    length = max(1, min(length, size - off))
    k = rng.randrange(10)
    if k < 6:
        return ("write", off, length, rng.randint(1, 255))
    if k < 7:
        return ("zero", off, length, None)
    if k < 8:
        return ("zero-unmap", off, length, None)
    return ("discard", off, length, None)


def io_cmd(op, off, length, pattern):
    if op == "write":
        return "write -P %d %d %d" % (pattern, off, length)
    if op == "zero":
        return "write -z %d %d" % (off, length)
    if op == "zero-unmap":
        return "write -z -u %d %d" % (off, length)
    return "discard %d %d" % (off, length)


class Builder:
    """Builds a random chain in directory d and its model."""

    def __init__(self, seed, d, cbt_snapshot=True):
        self.rng = random.Random(seed)
        self.d = d
        self.cbt_snapshot = cbt_snapshot
        rng = self.rng
        size = rng.choice([4, 8, 12, 16]) * MiB
        if rng.random() < 0.5:
            size += 512 * rng.randint(1, 127)     # not cluster aligned
        self.m = Chain(seed, size, 64 * KiB)
        self.next_name = 0

    def path(self, fname):
        return os.path.join(self.d, fname)

    def note(self, s):
        self.m.story.append(s)

    def io(self, layer, n):
        ops = [rand_io(self.rng, self.m.size, self.m.cluster) for _ in range(n)]
        args = []
        for op in ops:
            args += ["-c", io_cmd(*op)]
            layer.apply(*op)
        qemu_io("-f", "qcow2", *args, self.path(layer.fname))
        self.note("%s: qemu-io %s" % (layer.fname, " ; ".join(io_cmd(*o) for o in ops)))

    def add_bitmap(self, layer, name=None, gran=None, recording=True):
        if name is None:
            name = "b%d" % self.next_name
            self.next_name += 1
        if gran is None:
            gran = 1 << self.rng.choice(GRAN_BITS)
        args = ["bitmap", "--add", "-g", gran]
        if not recording:
            args.append("--disable")
        qemu_img(*(args + [self.path(layer.fname), name]))
        layer.bitmaps[name] = Bmp(name, gran, recording)
        self.note("%s: add %s g=%d%s" % (layer.fname, name, gran, "" if recording else " disabled"))
        return name

    def disable(self, layer, name):
        qemu_img("bitmap", "--disable", self.path(layer.fname), name)
        layer.bitmaps[name].recording = False
        self.note("%s: disable %s" % (layer.fname, name))

    def remove(self, layer, name):
        qemu_img("bitmap", "--remove", self.path(layer.fname), name)
        del layer.bitmaps[name]
        self.note("%s: remove %s" % (layer.fname, name))

    def new_layer(self, k):
        m = self.m
        fname = "L%d.qcow2" % k
        ly = Layer(fname)
        if k == 0:
            qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % m.cluster,
                     self.path(fname), m.size)
            self.note("%s: qemu-img create" % fname)
        else:
            below = m.layers[-1]
            if self.cbt_snapshot and self.rng.random() < 0.35:
                L.cbt_ok("snapshot", self.path(below.fname), self.path(fname))
                for n, b in list(below.bitmaps.items()):
                    if b.recording:
                        ly.bitmaps[n] = Bmp(n, b.gran, True)
                        b.recording = False
                self.note("%s: cbt snapshot %s" % (fname, below.fname))
            else:
                qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % m.cluster,
                         "-b", below.fname, "-F", "qcow2", self.path(fname))
                self.note("%s: qemu-img create -b %s" % (fname, below.fname))
                m.layers.append(ly)
                for n, b in list(below.bitmaps.items()):
                    if b.recording:
                        self.add_bitmap(ly, n, b.gran)
                        self.disable(below, n)
                return ly
        m.layers.append(ly)
        return ly

    def build(self, depth=None, invalid=None):
        rng, m = self.rng, self.m
        depth = depth or rng.randint(1, 5)
        for k in range(depth):
            ly = self.new_layer(k)
            for _ in range(rng.randint(1, 5)):
                r = rng.randrange(10)
                if r < 6:
                    self.io(ly, rng.randint(1, 4))
                elif r < 9 or not ly.bitmaps:
                    self.add_bitmap(ly)
                else:
                    rec = [n for n, b in ly.bitmaps.items() if b.recording]
                    if rec and rng.random() < 0.3:
                        # stops recording: not copied upward (a lower layer)
                        # or a disabled top copy (the top layer)
                        self.disable(ly, rng.choice(rec))
                    else:
                        self.io(ly, 1)
            if k == 0 and not ly.bitmaps:
                self.add_bitmap(ly)
                self.io(ly, 2)
        if invalid:
            self.make_invalid(invalid)
        for ly in m.layers:
            assert ly.recompute() == {n: b.bits for n, b in ly.bitmaps.items()}, ly.fname
        return m

    def make_invalid(self, kind):
        """Break one bitmap's chain validity: 'gap' (a middle layer loses
        it), 'missing' (the top loses it), 'gran' (one upper copy is
        re-added with another granularity: valid for the views, refused by
        commit into a base holding the other granularity)."""
        m, rng = self.m, self.rng
        if kind == "gap":
            cands = [(n, i) for n in m.names() for i in range(1, len(m.layers) - 1)
                     if n in m.layers[i].bitmaps and n in m.layers[i - 1].bitmaps
                     and n in m.layers[i + 1].bitmaps]
            if not cands:
                return False
            n, i = rng.choice(cands)
            self.remove(m.layers[i], n)
        elif kind == "missing":
            cands = [n for n in m.top.bitmaps if len(m.layers) > 1
                     and n in m.layers[-2].bitmaps]
            if not cands:
                return False
            self.remove(m.top, rng.choice(cands))
        elif kind == "gran":
            cands = [(n, i) for n in m.names() for i in range(1, len(m.layers))
                     if n in m.layers[i].bitmaps and n in m.layers[i - 1].bitmaps]
            if not cands:
                return False
            n, i = rng.choice(cands)
            ly = m.layers[i]
            old = ly.bitmaps[n]
            g = old.gran
            while g == old.gran:
                g = 1 << rng.choice(GRAN_BITS)
            self.remove(ly, n)
            self.add_bitmap(ly, n, g, old.recording)
            # the new copy sees later writes only
            self.io(ly, 2)
        return True


def build_chain(seed, d, depth=None, invalid=None, cbt_snapshot=True):
    os.makedirs(d, exist_ok=True)
    b = Builder(seed, d, cbt_snapshot)
    return b.build(depth, invalid)


def copy_chain(src, dst):
    """A directory copy (the links are relative: a chain copy)."""
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------
# Observing images


def qemu_layer_bitmaps(path):
    """{name: (granularity, sorted flags)} from qemu-img info."""
    return {b["name"]: (b["granularity"], sorted(b["flags"])) for b in L.qemu_bitmaps(path)}


def cbt_layer_dump(path, name):
    return L.cbt_dump(path, name)


def qemu_layer_extents(path, names):
    """QEMU's view (qemu-nbd -B + nbdinfo --map) of bitmaps of one file
    (opened alone: its backing file is not needed to read bitmaps, but
    qemu-nbd opens it; the directory must hold the chain)."""
    return L.qemu_bitmap_extents(path, names)


def backing_of(path):
    info = L.qemu_json("info", "--output=json", path)
    return info.get("backing-filename"), info.get("backing-filename-format")


def json_short(x, n=1500):
    s = json.dumps(x)
    return s if len(s) <= n else s[:n] + "..."
