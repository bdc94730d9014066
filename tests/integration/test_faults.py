"""Failing writes and flushes (tests/fault/libfault.so, tests/faultlib.py).

Each test runs one cbt command once without faults (to count the write or
flush calls it makes on one file), then once per N (every N up to 20, then
a fixed-seed sample of 12 more; 10 and 10 for the chain commands;
CBT_FAULT_ALL_NS=1: every N) on a fresh copy of the images, failing the
Nth call on that file (and, "sticky", every call after it: a full disk).
After each faulty run:

  * cbt exits non-zero with a "cbt: FILE: ..." line carrying the error;
  * no crash, no sanitizer report, no leak (ASan);
  * qemu-img check: no corruption (leaked clusters are tolerated only where
    a data write failed part way, as QEMU leaks them too);
  * the images are as before or as after the command, as the command
    promises:
      snapshot   - the overlay does not exist, TOP as before (bytes, or
                   bitmaps by --list and --sha256 plus the guest data);
      bitmap     - the bitmaps all as before or all as after;
      io         - data outside the writes unchanged, inside old or new,
                   data flushed before the failure new;
      commit     - every layer's bitmaps as before or as after, the guest
                   view of the original chain unchanged;
      stream     - FILE's bitmaps as before or after, guest view unchanged,
                   the other layers untouched;
      rebase     - the same, and the link old or new;
      convert    - the target removed, the source untouched;
      resize     - (growing) the bitmaps as before or as after and never
                   in_use on disk.
"""
import os
import shutil
import sys

import pytest

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _TESTS)
import faultlib as F  # noqa: E402
from faultlib import L  # noqa: E402

KiB, MiB = L.KiB, L.MiB
SIZE = 4 * MiB

# op, sticky, errno
MODES = [("write", False, "ENOSPC"), ("write", True, "ENOSPC"),
         ("flush", False, "EIO")]
MODE_IDS = ["write-nth", "write-sticky", "flush-nth"]


class TrackingLost(AssertionError):
    """A failed snapshot left TOP's bitmaps disabled and no overlay."""


@pytest.fixture(autouse=True)
def _expected_soft(request):
    """Tell faultlib.sweep which soft failure kinds this case's xfail
    expects; any other kind fails the case for real."""
    m = request.node.get_closest_marker("xfail")
    raises = m.kwargs.get("raises", ()) if m else ()
    F.expected_soft = raises if isinstance(raises, tuple) else (raises,)
    yield
    F.expected_soft = ()


def cases(keys, known=None):
    """pytest params (key, op, sticky, err) for every key and mode, with an
    xfail(strict, raises=KIND) mark on the (key, mode id) pairs in KNOWN
    (one bug, or a list of them)."""
    known = known or {}
    out = []
    for k in keys:
        for mode, mid in zip(MODES, MODE_IDS):
            bugs = known.get((k, mid), [])
            bugs = [bugs] if isinstance(bugs, tuple) else bugs
            marks = [pytest.mark.xfail(strict=True,
                                       raises=tuple(b[0] for b in bugs),
                                       reason="; ".join(b[1] for b in bugs))] \
                if bugs else []
            out.append(pytest.param(k, *mode, id="%s-%s" % (mid, k), marks=marks))
    return out


def leaks_tolerated(n, op, sticky):
    """Leaked clusters are tolerated after a failed flush (what it covered
    may or may not be on disk, so nothing it may reference is given back)
    and on a full disk (freeing needs refcount writes); one failed write
    must leave no leak."""
    return n is not None and (op == "flush" or sticky)


def qimg(*args):
    L.qemu_img(*args)


def qio(path, *cmds, fmt="qcow2"):
    args = ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    L.qemu_io(*(args + [path]))


def add_bitmaps(path, names_gran, disabled=()):
    for name, gran in names_gran:
        qimg("bitmap", "--add", "-g", gran, path, name)
    return disabled


class Layers:
    """Before (pristine), after (a successful run) and now (work) of the
    files of one test folder, compared cheaply: bytes first, then the
    bitmaps (--list + --sha256) and, for the chain, the guest view."""

    def __init__(self, pristine, after, work):
        self.pristine, self.after, self.work = pristine, after, work
        self._states = {}

    def _state(self, folder, name, how=F.bitmap_state):
        key = (folder, name, how)
        if key not in self._states:
            self._states[key] = how(os.path.join(folder, name))
        return self._states[key]

    def tags(self, name, what):
        """The set of 'before'/'after' whose bitmaps NAME has now (bytes
        equal, or the stored bitmaps equal, or cbt's view equal); fails
        when neither."""
        w = os.path.join(self.work, name)
        sides = [(tag, folder) for tag, folder in (("before", self.pristine),
                                                   ("after", self.after))
                 if folder and os.path.exists(os.path.join(folder, name))]
        # Bytes, or the on-disk bitmaps parsed directly (fast); cbt's view
        # (slow) only when neither side matches that way.
        got = {tag for tag, folder in sides if F.same_bytes(w, os.path.join(folder, name))}
        fp = F.bitmap_fingerprint(w)
        if fp is not None:
            got |= {tag for tag, folder in sides
                    if fp == self._state(folder, name, F.bitmap_fingerprint)}
        now = None
        if not got:
            now = F.bitmap_state(w)
            got = {tag for tag, folder in sides if now == self._state(folder, name)}
        if got:
            return got
        raise AssertionError(
            "%s: bitmaps of %s neither as before nor as after:\nnow: %s\n%s"
            % (what, name, now, "\n".join("%s: %s" % (tag, self._state(folder, name))
                                         for tag, folder in sides)))

    def changed(self, name):
        """NAME differs in bytes from both its before and after copies."""
        w = os.path.join(self.work, name)
        return not any(F.same_bytes(w, os.path.join(folder, name))
                       for folder in (self.pristine, self.after)
                       if folder and os.path.exists(os.path.join(folder, name)))


_made = {}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """images(maker, dest): DEST gets a copy of the folder MAKER builds,
    built once per module (the makers are deterministic)."""
    def get(maker, dest):
        if maker not in _made:
            d = str(tmp_path_factory.mktemp(maker.__name__) / "images")
            maker(d)
            _made[maker] = d
        shutil.copytree(_made[maker], dest)
    yield get
    _made.clear()


def snapshot_after(work, after):
    """Keep the result of the successful (counting) run."""
    if os.path.exists(after):
        shutil.rmtree(after)
    shutil.copytree(work, after)


# --------------------------------------------------------------------------
# cbt snapshot


def make_snapshot_images(d):
    os.makedirs(d)
    base = os.path.join(d, "base.qcow2")
    top = os.path.join(d, "top.qcow2")
    qimg("create", "-q", "-f", "qcow2", base, SIZE)
    qio(base, "write -P 0x11 0 2M")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    add_bitmaps(top, [("a", 65536), ("b", 4096), ("d", 65536)])
    qio(top, "write -P 0x22 1M 300k", "write -z 3M 64k")
    qimg("bitmap", "--disable", top, "d")
    qio(top, "write -P 0x33 2M 10k")


@pytest.mark.parametrize("target,op,sticky,err", cases(
    ["ov.qcow2", "top.qcow2"]))
def test_snapshot(tmp_path, images, target, op, sticky, err):
    pristine = str(tmp_path / "pristine")
    work = str(tmp_path / "work")
    after = str(tmp_path / "after")
    images(make_snapshot_images, pristine)
    layers = Layers(pristine, after, work)
    args = ["snapshot", "top.qcow2", "ov.qcow2"]
    ov = os.path.join(work, "ov.qcow2")
    top = os.path.join(work, "top.qcow2")

    def check(res, n, counts):
        what = "snapshot, %s %s #%s %s%s" % (target, op, n, err,
                                             " sticky" if sticky else "")
        assert F.same_bytes(os.path.join(work, "base.qcow2"),
                            os.path.join(pristine, "base.qcow2"))
        if n is None:
            F.assert_check_clean(ov, what=what)
            snapshot_after(work, after)
            return
        leaks_ok = leaks_tolerated(n, op, sticky)
        F.assert_check_clean(top, what=what, leaks_ok=leaks_ok)
        if not F.same_bytes(top, os.path.join(pristine, "top.qcow2")):
            assert F.same_guest_data(top, os.path.join(pristine, "top.qcow2")), \
                "%s: TOP's guest data changed" % what
        if res.rc == 0:
            # A failed call that has a fallback (punching a hole falls back
            # to writing zeroes): the snapshot is complete.
            assert "after" in layers.tags("top.qcow2", what), what
            assert "after" in layers.tags("ov.qcow2", what), what
            F.assert_check_clean(ov, what=what, leaks_ok=leaks_ok)
            return
        F.assert_clear_error(res, err, ["ov.qcow2", "top.qcow2"], what)
        if os.path.exists(ov):
            # TOP's copies stopped recording and could not be restarted
            # (the disk stayed full): cbt keeps the overlay, whose copies
            # record, so the snapshot is complete ("after") and said so.
            assert "after" in layers.tags("top.qcow2", what), \
                "%s: the overlay was left behind\n%r" % (what, res)
            assert "after" in layers.tags("ov.qcow2", what), what
            F.assert_check_clean(ov, what=what, leaks_ok=leaks_ok)
            return
        if "before" not in layers.tags("top.qcow2", what):
            raise TrackingLost("%s: TOP's bitmaps stopped recording, and no "
                               "overlay records\n%r" % (what, res))

    F.sweep(pristine, work, args, target, op, check, sticky, err, cwd=work)


# --------------------------------------------------------------------------
# cbt bitmap


BITMAP_OPS = {
    "add": ["--add", "-g", "4k", "bm.qcow2", "new"],
    "add-merge": ["--add", "--merge", "a", "bm.qcow2", "m"],
    "merge-other-file": ["--merge", "a", "-b", "src.qcow2", "--disable",
                         "bm.qcow2", "b"],
    "remove": ["--remove", "bm.qcow2", "b"],
    "remove-all": ["--remove-all", "bm.qcow2"],
}


def make_bitmap_images(d):
    os.makedirs(d)
    bm = os.path.join(d, "bm.qcow2")
    qimg("create", "-q", "-f", "qcow2", bm, SIZE)
    add_bitmaps(bm, [("a", 65536), ("b", 4096), ("d", 1 << 20)])
    qio(bm, "write -P 0x22 100k 300k", "write -P 0x23 3M 5000")
    qimg("bitmap", "--disable", bm, "d")
    qio(bm, "write -P 0x33 2M 10k")
    src = os.path.join(d, "src.qcow2")
    qimg("create", "-q", "-f", "qcow2", src, SIZE)
    add_bitmaps(src, [("a", 65536)])
    qio(src, "write 1500k 70k")


def bm_sweep(tmp_path, images, args, label, op, sticky, err, extra):
    """Fault bm.qcow2 (make_bitmap_images' folder) while cbt ARGS runs;
    after each run: bm.qcow2 clean, extra(what) holds, its bitmaps as
    before or as after (after on exit 0, else a clear error), its guest
    data unchanged."""
    pristine = str(tmp_path / "pristine")
    work = str(tmp_path / "work")
    after = str(tmp_path / "after")
    images(make_bitmap_images, pristine)
    layers = Layers(pristine, after, work)
    bm = os.path.join(work, "bm.qcow2")

    def check(res, n, counts):
        what = "%s, %s #%s %s%s" % (label, op, n, err, " sticky" if sticky else "")
        F.assert_check_clean(bm, what=what, leaks_ok=leaks_tolerated(n, op, sticky))
        extra(work, pristine, what)
        if n is None:
            snapshot_after(work, after)
            return
        state = layers.tags("bm.qcow2", what)
        if res.rc == 0:
            assert "after" in state, "%s: exit 0 but bitmaps as before" % what
        else:
            F.assert_clear_error(res, err, ["bm.qcow2"], what)
        assert F.same_guest_data(bm, os.path.join(pristine, "bm.qcow2")), what

    F.sweep(pristine, work, args, "bm.qcow2", op, check, sticky, err, cwd=work)


@pytest.mark.parametrize("name,op,sticky,err", cases(
    sorted(BITMAP_OPS)))
def test_bitmap(tmp_path, images, name, op, sticky, err):
    def src_untouched(work, pristine, what):
        assert F.same_bytes(os.path.join(work, "src.qcow2"),
                            os.path.join(pristine, "src.qcow2")), what

    bm_sweep(tmp_path, images, ["bitmap"] + BITMAP_OPS[name], "bitmap " + name,
             op, sticky, err, src_untouched)


# --------------------------------------------------------------------------
# cbt resize: growing keeps the bitmaps valid at every moment


RESIZES = {
    # 3 GiB: the 4 KiB-granularity bitmap needs a second table entry (one
    # cluster of bits covers 2 GiB), and the L1 table grows.
    "grow-tables": ["resize", "bm.qcow2", "3G"],
    "grow-small": ["resize", "bm.qcow2", "+1M"],
}


def bitmap_flags(path):
    info = L.qemu_json("info", "--output=json", "-U", path)
    bms = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: sorted(b["flags"]) for b in bms}


@pytest.mark.parametrize("name,op,sticky,err", cases(sorted(RESIZES)))
def test_resize_grow(tmp_path, images, name, op, sticky, err):
    flags0 = {}

    def never_in_use(work, pristine, what):
        # Never in_use on disk: valid for the old size or for the new one.
        if not flags0:
            flags0.update(bitmap_flags(os.path.join(pristine, "bm.qcow2")))
        now = bitmap_flags(os.path.join(work, "bm.qcow2"))
        assert now == flags0, "%s: %r" % (what, now)

    bm_sweep(tmp_path, images, RESIZES[name], "resize " + name, op, sticky, err,
             never_in_use)


# --------------------------------------------------------------------------
# cbt io: plain data writes on a full disk


IO_OLD = [(0, 1 * MiB, 0x11), (2 * MiB, 512 * KiB, 0x44)]
# Non-overlapping writes: new allocations, overwrites of allocated
# clusters, partial clusters, a zero write.  A flush after the first one.
IO_NEW = [(512 * KiB, 1 * MiB, 0x22), "flush", (3 * MiB, 100 * KiB, 0x33),
          (1700001, 1000, 0x55), (2200 * KiB, 64 * KiB, 0)]


def io_cmds():
    cmds = []
    for w in IO_NEW:
        if w == "flush":
            cmds.append("flush")
        elif w[2] == 0:
            cmds.append("write -z %d %d" % (w[0], w[1]))
        else:
            cmds.append("write -P 0x%02x %d %d" % (w[2], w[0], w[1]))
    return cmds


def io_expect():
    old = bytearray(SIZE)
    for off, ln, v in IO_OLD:
        old[off:off + ln] = bytes([v]) * ln
    new = bytearray(old)
    for w in IO_NEW:
        if w != "flush":
            new[w[0]:w[0] + w[1]] = bytes([w[2]]) * w[1]
    return bytes(old), bytes(new)


@pytest.mark.parametrize("cluster", [65536, 4096])
def test_io_writes_enospc(tmp_path, cluster):
    pristine = str(tmp_path / "pristine")
    work = str(tmp_path / "work")
    os.makedirs(pristine)
    img = os.path.join(pristine, "d.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % cluster, img, SIZE)
    qio(img, *["write -P 0x%02x %d %d" % (v, o, ln) for o, ln, v in IO_OLD])
    old, new = io_expect()
    args = ["io", "-f", "qcow2"] + sum((["-c", c] for c in io_cmds()), []) + ["d.qcow2"]
    path = os.path.join(work, "d.qcow2")
    first = IO_NEW[0]

    def check(res, n, counts):
        what = "io, write #%s ENOSPC sticky (cluster %d)" % (n, cluster)
        F.assert_check_clean(path, leaks_ok=n is not None, what=what)
        got = F.guest_bytes(path, str(tmp_path))
        if n is None:
            assert got == new, L._ct.first_difference(got, new)
            return
        assert res.rc != 0, "%s: exit 0 after a failed write\n%r" % (what, res)
        assert "No space left on device" in res.out + res.err, "%s\n%r" % (what, res)
        # Outside the writes: exactly as before.  Inside: each 512-byte
        # piece old or new (a write may land in part).
        pos = 0
        for w in sorted(w for w in IO_NEW if w != "flush") + [(SIZE, 0, 0)]:
            assert got[pos:w[0]] == old[pos:w[0]], "%s: data outside the writes " \
                "changed: %s" % (what, L._ct.first_difference(got[pos:w[0]], old[pos:w[0]], pos))
            for s in range(w[0], w[0] + w[1], 512):
                e = min(s + 512, w[0] + w[1])
                assert got[s:e] in (old[s:e], new[s:e]), \
                    "%s: bytes %d..%d are neither old nor new" % (what, s, e)
            pos = w[0] + w[1]
        # The first write was flushed before anything failed: it is there.
        lines = res.out.splitlines()
        if lines and lines[0].startswith("wrote ") and \
                not any(ln.startswith("flush failed") for ln in lines[:4]):
            s, e = first[0], first[0] + first[1]
            assert got[s:e] == new[s:e], "%s: flushed data lost: %s" % (
                what, L._ct.first_difference(got[s:e], new[s:e], s))

    F.sweep(pristine, work, args, "d.qcow2", "write", check, True, "ENOSPC", cwd=work)


# --------------------------------------------------------------------------
# Chains: base <- mid <- top, with bitmaps in every layer.


def make_chain(d):
    os.makedirs(d)
    base, mid, top = (os.path.join(d, n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    qimg("create", "-q", "-f", "qcow2", base, SIZE)
    add_bitmaps(base, [("a", 65536)])
    qio(base, "write -P 0x11 0 3M")
    qimg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    add_bitmaps(mid, [("a", 65536), ("m", 4096)])
    qio(mid, "write -P 0x22 512k 1M", "write -z 2M 128k")
    qimg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    add_bitmaps(top, [("a", 65536), ("m", 4096), ("t", 65536)])
    qio(top, "write -P 0x33 1M 700k", "write -P 0x34 3500k 10000",
        "write -z 100k 64k")


CHAIN = ("base.qcow2", "mid.qcow2", "top.qcow2")
# Chain commands make more calls and each check opens three images: fewer N.
CHAIN_FIRST, CHAIN_EXTRA = 10, 10


def chain_sweep(tmp_path, images, args, target, op, sticky, err, check_extra=None,
                files=CHAIN, view="top.qcow2"):
    """Fault TARGET while cbt ARGS runs on the chain; after each faulty run:
    a clear error (or exit 0 and everything as after), every layer opens
    and is clean (leaks: see leaks_tolerated), its bitmaps as before or as
    after, and the guest view from VIEW as it was."""
    pristine = str(tmp_path / "pristine")
    work = str(tmp_path / "work")
    after = str(tmp_path / "after")
    images(make_chain, pristine)
    layers = Layers(pristine, after, work)

    def check(res, n, counts):
        what = "%s, %s %s #%s %s%s" % (" ".join(args), target, op, n, err,
                                      " sticky" if sticky else "")
        if n is None:
            snapshot_after(work, after)
        assert F.same_guest_data(os.path.join(work, view),
                                 os.path.join(pristine, view)), \
            "%s: the guest view of %s changed" % (what, view)
        for f in files:
            if n is None or layers.changed(f):
                p = os.path.join(work, f)
                L.cbt_ok("info", p)
                tags = layers.tags(f, what)
                if res.rc == 0:
                    assert "after" in tags, "%s: exit 0, but %s's bitmaps as " \
                        "before" % (what, f)
                F.assert_check_clean(p, what=what,
                                     leaks_ok=leaks_tolerated(n, op, sticky))
        if check_extra:
            check_extra(res, n, work, pristine, layers, what)
        if n is not None and res.rc != 0:
            F.assert_clear_error(res, err, list(files), what)

    F.sweep(pristine, work, args, target, op, check, sticky, err, cwd=work,
            first=CHAIN_FIRST, extra=CHAIN_EXTRA)


COMMITS = {
    "active": (["commit", "top.qcow2"], "mid.qcow2"),
    "active-b-base": (["commit", "-b", "base.qcow2", "top.qcow2"], "base.qcow2"),
    "intermediate": (["commit", "--top", "mid.qcow2", "--base", "base.qcow2",
                      "--active", "top.qcow2"], "base.qcow2"),
    # The relink of the image above TOP.
    "intermediate-relink": (["commit", "--top", "mid.qcow2", "--base", "base.qcow2",
                             "--active", "top.qcow2"], "top.qcow2"),
}


@pytest.mark.parametrize("name,op,sticky,err", cases(
    sorted(COMMITS)))
def test_commit(tmp_path, images, name, op, sticky, err):
    args, target = COMMITS[name]
    chain_sweep(tmp_path, images, args, target, op, sticky, err)


STREAMS = {
    "all": ["stream", "top.qcow2"],
    "to-base": ["stream", "-b", "base.qcow2", "top.qcow2"],
}


def others_untouched(res, n, work, pristine, layers, what):
    """The layers below are only read.  (FILE's bitmaps take in the bits of
    the layers leaving the chain: checked as before-or-after.)"""
    for f in ("base.qcow2", "mid.qcow2"):
        assert F.same_bytes(os.path.join(work, f), os.path.join(pristine, f)), \
            "%s: %s changed" % (what, f)


@pytest.mark.parametrize("name,op,sticky,err", cases(
    sorted(STREAMS)))
def test_stream(tmp_path, images, name, op, sticky, err):
    chain_sweep(tmp_path, images, STREAMS[name], "top.qcow2", op, sticky, err,
                check_extra=others_untouched)


@pytest.mark.parametrize("name,op,sticky,err", cases(
    ["safe"]))
def test_rebase(tmp_path, images, name, op, sticky, err):

    def link(res, n, work, pristine, layers, what):
        info = L.qemu_json("info", "--output=json", os.path.join(work, "top.qcow2"))
        want = ("base.qcow2",) if res.rc == 0 else ("mid.qcow2", "base.qcow2")
        assert info.get("backing-filename") in want, (what, info)
        others_untouched(res, n, work, pristine, layers, what)

    chain_sweep(tmp_path, images, ["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
                "top.qcow2", op, sticky, err, check_extra=link)


CONVERTS = {
    "qcow2": ["convert", "-O", "qcow2", "top.qcow2", "out.img"],
    "qcow2-bitmaps": ["convert", "-O", "qcow2", "--bitmaps", "top.qcow2", "out.img"],
    "raw": ["convert", "-O", "raw", "top.qcow2", "out.img"],
}


@pytest.mark.parametrize("name,op,sticky,err", cases(sorted(CONVERTS)))
def test_convert(tmp_path, images, name, op, sticky, err):
    pristine = str(tmp_path / "pristine")
    work = str(tmp_path / "work")
    after = str(tmp_path / "after")
    images(make_chain, pristine)
    out = os.path.join(work, "out.img")
    fmt = "raw" if name == "raw" else "qcow2"
    layers = Layers(pristine, after, work)

    def check(res, n, counts):
        what = "convert %s, out.img %s #%s %s%s" % (name, op, n, err,
                                                   " sticky" if sticky else "")
        for f in CHAIN:
            assert F.same_bytes(os.path.join(work, f), os.path.join(pristine, f)), \
                "%s: source %s changed" % (what, f)
        if n is None or res.rc == 0:
            if fmt == "qcow2":
                F.assert_check_clean(out, what=what)
            assert F.same_guest_data(out, os.path.join(pristine, "top.qcow2"),
                                     fmt_a=fmt), what
            if n is None:
                snapshot_after(work, after)
            elif fmt == "qcow2":
                assert "after" in layers.tags("out.img", what), what
            return
        assert not os.path.exists(out), "%s: the target was left behind" % what
        F.assert_clear_error(res, err, ["out.img", "top.qcow2"], what)

    F.sweep(pristine, work, CONVERTS[name], "out.img", op, check, sticky, err,
            cwd=work, first=CHAIN_FIRST, extra=CHAIN_EXTRA)
