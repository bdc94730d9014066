"""Helpers shared by the interop tests (tests/interop/test_*.py).

Imported as a plain module (pytest puts tests/interop on sys.path).  Holds:
  * access to tests/conftest.py's runners (run/cbt/qemu_img/qemu_io),
  * a crash detector for cbt runs (signals, sanitizer reports),
  * `qemu-img map --output=json` normalisation,
  * a seeded qemu-io workload generator,
  * a small qcow2 header / L1 / L2 / refcount editor for damaging images.

Nothing here depends on cbt's implementation; the QEMU tools are the oracles.
"""
import importlib.util
import json
import os
import random
import shutil
import struct
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFTEST = os.path.join(os.path.dirname(_HERE), "conftest.py")


def _load_conftest():
    """tests/conftest.py, even if another conftest module shadows the name."""
    mod = sys.modules.get("conftest")
    if mod is not None and os.path.abspath(getattr(mod, "__file__", "")) == _CONFTEST:
        return mod
    spec = importlib.util.spec_from_file_location("cbt_tests_conftest", _CONFTEST)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_ct = _load_conftest()
run = _ct.run
cbt = _ct.cbt
qemu_img = _ct.qemu_img
qemu_io = _ct.qemu_io
qemu_check_clean = _ct.qemu_check_clean
CBT = _ct.CBT

KiB = 1024
MiB = 1024 * 1024

# --------------------------------------------------------------------------
# Running cbt


def no_crash(res, what=""):
    """cbt must never die of a signal, trip a sanitizer, or leak (ASan)."""
    msg = "%s\n%r" % (what, res)
    assert res.rc >= 0, "killed by signal %d: %s" % (-res.rc, msg)
    assert res.rc < 128, "exit code %d looks like a signal: %s" % (res.rc, msg)
    for marker in ("Sanitizer", "runtime error:", "AddressSanitizer",
                   "LeakSanitizer", "Segmentation fault", "core dumped"):
        assert marker not in res.err, "%r in stderr: %s" % (marker, msg)
    return res


def cbt_ok(*args, **kw):
    """Run cbt, require exit 0 and no sanitizer noise."""
    kw.setdefault("timeout", 120)
    res = cbt(*args, check=False, **kw)
    no_crash(res, "cbt " + " ".join(str(a) for a in args))
    assert res.rc == 0, "cbt %s failed:\n%r" % (" ".join(str(a) for a in args), res)
    return res


def cbt_rc(*args, **kw):
    """Run cbt, return the result whatever the exit code (but never a crash)."""
    kw.setdefault("timeout", 120)
    res = cbt(*args, check=False, **kw)
    no_crash(res, "cbt " + " ".join(str(a) for a in args))
    return res


def cbt_json(*args, **kw):
    res = cbt_ok(*args, **kw)
    try:
        return json.loads(res.out)
    except ValueError as e:
        raise AssertionError("cbt %s: stdout is not JSON (%s):\n%r"
                             % (" ".join(str(a) for a in args), e, res))


def qemu_json(*args, **kw):
    return json.loads(qemu_img(*args, **kw).out)


# --------------------------------------------------------------------------
# Maps

MAP_KEYS = ("start", "length", "depth", "present", "zero", "data")


def map_entries(data, keys=MAP_KEYS):
    return [{k: e.get(k) for k in keys} for e in data]


def coalesce(entries, keys=("depth", "present", "zero", "data")):
    """Drop host offsets and merge neighbours with the same status.

    qemu-img map splits runs whose host offsets are not contiguous, so two
    images with the same guest-visible allocation but different host layouts
    print different lists; after this they compare equal.
    """
    out = []
    for e in entries:
        e = {k: e[k] for k in ("start", "length") + tuple(keys)}
        if out and all(out[-1][k] == e[k] for k in keys) \
                and out[-1]["start"] + out[-1]["length"] == e["start"]:
            out[-1]["length"] += e["length"]
        else:
            out.append(e)
    return out


def qemu_map(path, fmt=None, keys=MAP_KEYS):
    args = ["map", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    return qemu_json(*(args + [path]))


def cbt_map(path, fmt=None, **kw):
    args = ["map", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    return cbt_json(*(args + [path]), **kw)


def map_diff(a, b):
    """Human-readable first difference between two entry lists."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return "entry %d: %s != %s" % (i, x, y)
    if len(a) != len(b):
        return "lengths differ: %d vs %d (extra: %s)" % (
            len(a), len(b), (a[len(b):] or b[len(a):])[:3])
    return "equal"


def assert_maps_equal(got, want, label="map"):
    assert got == want, "%s differs: %s\ncbt: %s\nqemu: %s" % (
        label, map_diff(got, want), json.dumps(got)[:3000], json.dumps(want)[:3000])


# --------------------------------------------------------------------------
# Workloads


def random_workload(seed, size, cluster, n, patterns=True, zeroes=True,
                    discards=True, unmap=True):
    """qemu-io commands: writes with patterns, zero-writes, discards.

    Offsets and lengths mix cluster-aligned, 512-aligned and byte-unaligned
    values so head/tail handling of partial clusters is exercised.
    """
    r = random.Random(seed)
    cmds = []
    kinds = ["write"] * 5 + (["zero"] * 2 if zeroes else []) + \
        (["discard"] * 2 if discards else [])
    for _ in range(n):
        kind = r.choice(kinds)
        align = r.choice(["cluster", "cluster", "sector", "byte"])
        maxlen = min(size, cluster * r.choice([1, 2, 3, 5]))
        if align == "cluster":
            ncl = size // cluster
            off = r.randrange(ncl) * cluster
            length = cluster * r.randint(1, max(1, maxlen // cluster))
        elif align == "sector":
            off = r.randrange(size // 512) * 512
            length = 512 * r.randint(1, max(1, maxlen // 512))
        else:
            off = r.randrange(size - 1)
            length = r.randint(1, maxlen)
        length = min(length, size - off)
        if length <= 0:
            continue
        if kind == "write":
            if patterns:
                cmds.append("write -P %d %d %d" % (r.randint(1, 255), off, length))
            else:
                cmds.append("write %d %d" % (off, length))
        elif kind == "zero":
            if unmap and r.random() < 0.5:
                cmds.append("write -z -u %d %d" % (off, length))
            else:
                cmds.append("write -z %d %d" % (off, length))
        else:
            cmds.append("discard %d %d" % (off, length))
    return cmds


def io_args(cmds):
    args = []
    for c in cmds:
        args += ["-c", c]
    return args


def batches(cmds, n=50):
    for i in range(0, len(cmds), n):
        yield cmds[i:i + n]


def run_qemu_io(path, cmds, fmt="qcow2", batch=50):
    for b in batches(cmds, batch):
        qemu_io("-f", fmt, *io_args(b), path, timeout=120)


def run_cbt_io(path, cmds, fmt="qcow2", batch=50):
    for b in batches(cmds, batch):
        cbt_ok("io", "-f", fmt, *io_args(b), path)


def write_compressible(path, size, seed):
    """Random but compressible data (small alphabet), so convert -c compresses."""
    r = random.Random(seed)
    alpha = bytes(r.sample(range(256), 4))
    with open(path, "wb") as f:
        chunk = 64 * KiB
        for _ in range(size // chunk):
            f.write(bytes(r.choice(alpha) for _ in range(chunk // 16)) * 16)


def write_random(path, size, seed):
    r = random.Random(seed)
    with open(path, "wb") as f:
        f.write(r.randbytes(size))


# --------------------------------------------------------------------------
# qcow2 editing

QCOW2_MAGIC = 0x514649FB
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

HEADER_FIELDS = [
    # name, offset, struct format
    ("magic", 0, ">I"),
    ("version", 4, ">I"),
    ("backing_file_offset", 8, ">Q"),
    ("backing_file_size", 16, ">I"),
    ("cluster_bits", 20, ">I"),
    ("size", 24, ">Q"),
    ("crypt_method", 32, ">I"),
    ("l1_size", 36, ">I"),
    ("l1_table_offset", 40, ">Q"),
    ("refcount_table_offset", 48, ">Q"),
    ("refcount_table_clusters", 56, ">I"),
    ("nb_snapshots", 60, ">I"),
    ("snapshots_offset", 64, ">Q"),
    ("incompatible_features", 72, ">Q"),
    ("compatible_features", 80, ">Q"),
    ("autoclear_features", 88, ">Q"),
    ("refcount_order", 96, ">I"),
    ("header_length", 100, ">I"),
]
_FIELD = {name: (off, fmt) for name, off, fmt in HEADER_FIELDS}


class Qcow2:
    """Minimal on-disk qcow2 editor (big-endian, per FORMATS.md §1)."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.hdr = f.read(112)
        self.h = {}
        for name, off, fmt in HEADER_FIELDS:
            if self.version < 3 and off >= 72:
                continue
            self.h[name] = struct.unpack_from(fmt, self.hdr, off)[0]
        if self.version < 3:
            self.h["refcount_order"] = 4
            self.h["header_length"] = 72
            self.h["incompatible_features"] = 0
        assert self.h["magic"] == QCOW2_MAGIC, "not qcow2: %s" % path

    @property
    def version(self):
        return struct.unpack_from(">I", self.hdr, 4)[0]

    def __getattr__(self, name):
        h = self.__dict__.get("h", {})
        if name in h:
            return h[name]
        raise AttributeError(name)

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    @property
    def extended_l2(self):
        return bool(self.incompatible_features & (1 << 4))

    @property
    def l2_entry_size(self):
        return 16 if self.extended_l2 else 8

    @property
    def refcount_bits(self):
        return 1 << self.refcount_order

    def file_size(self):
        return os.path.getsize(self.path)

    # raw access
    def pread(self, off, n):
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def pwrite(self, off, data):
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(data)

    def u64(self, off):
        return struct.unpack(">Q", self.pread(off, 8))[0]

    def put_u64(self, off, v):
        self.pwrite(off, struct.pack(">Q", v))

    def set_header(self, name, value):
        off, fmt = _FIELD[name]
        self.pwrite(off, struct.pack(fmt, value))
        self.h[name] = value

    # L1 / L2
    def l1_entry_off(self, i):
        return self.l1_table_offset + 8 * i

    def l1(self, i):
        return self.u64(self.l1_entry_off(i))

    def l2_entries_per_table(self):
        return self.cluster_size // self.l2_entry_size

    def l2_entry_off(self, guest_off):
        """File offset of the L2 entry for guest_off (its L2 table must exist)."""
        cl = guest_off // self.cluster_size
        per = self.l2_entries_per_table()
        l1e = self.l1(cl // per)
        l2 = l1e & L1E_OFFSET_MASK
        assert l2, "no L2 table for guest offset %d" % guest_off
        return l2 + (cl % per) * self.l2_entry_size

    def l2(self, guest_off):
        return self.u64(self.l2_entry_off(guest_off))

    def host_cluster(self, guest_off):
        e = self.l2(guest_off)
        assert not e & OFLAG_COMPRESSED
        return e & L2E_OFFSET_MASK

    # refcounts
    def _rc_locate(self, cluster_index):
        bits = self.refcount_bits
        per_block = self.cluster_size * 8 // bits
        ti, bi = divmod(cluster_index, per_block)
        assert ti < self.refcount_table_clusters * self.cluster_size // 8
        block = self.u64(self.refcount_table_offset + 8 * ti) & ~0x1FF
        assert block, "no refcount block for cluster %d" % cluster_index
        return block, bi, bits

    def refcount(self, cluster_index):
        block, bi, bits = self._rc_locate(cluster_index)
        if bits >= 8:
            n = bits // 8
            return int.from_bytes(self.pread(block + bi * n, n), "big")
        per_byte = 8 // bits
        byte = self.pread(block + bi // per_byte, 1)[0]
        shift = (bi % per_byte) * bits
        return (byte >> shift) & ((1 << bits) - 1)

    def set_refcount(self, cluster_index, value):
        block, bi, bits = self._rc_locate(cluster_index)
        if bits >= 8:
            n = bits // 8
            self.pwrite(block + bi * n, value.to_bytes(n, "big"))
            return
        per_byte = 8 // bits
        pos = block + bi // per_byte
        byte = self.pread(pos, 1)[0]
        shift = (bi % per_byte) * bits
        mask = ((1 << bits) - 1) << shift
        byte = (byte & ~mask) | ((value << shift) & mask)
        self.pwrite(pos, bytes([byte]))


def copy(src, dst):
    shutil.copyfile(src, dst)
    return dst


def flip_byte(path, off, mask=0xFF):
    """XOR the byte at off of the file with mask (damage for tests)."""
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ mask]))


def qemu_check(path, *extra, fmt="qcow2"):
    """qemu-img check --output=json: (rc, dict-or-None)."""
    res = qemu_img("check", "--output=json", "-f", fmt, *extra, path, check=False)
    try:
        data = json.loads(res.out) if res.out.strip() else None
    except ValueError:
        data = None
    return res.rc, data, res


# --------------------------------------------------------------------------
# Persistent dirty bitmaps (test_bitmaps_*.py, integration/test_bitmap_cli.py)
#
# Extents are lists of {"start", "length", "dirty"} covering [0, size).  The
# oracle view is `qemu-nbd -r -B NAME` + `nbdinfo --map=qemu:dirty-bitmap:NAME`;
# cbt's is `cbt bitmap --dump --output=json`.  A Python model of bitmaps
# (BitmapModel) gives the expected bits; test_bitmaps_from_qemu.py checks the
# model itself against QEMU.

import contextlib as _contextlib
import hashlib as _hashlib
import re as _re
import socket as _socket
import subprocess as _subprocess
import tempfile as _tempfile
import time as _time

GiB = 1024 * MiB
BITMAPS_EXT = 0x23852875
BME_FLAG_IN_USE = 1
BME_FLAG_AUTO = 2
AUTOCLEAR_BITMAPS = 1


def ext_normalize(entries):
    """Extents as {"start","length","dirty": bool}, from cbt or nbdinfo JSON."""
    out = []
    for e in entries:
        if "offset" in e:           # nbdinfo --json
            out.append({"start": e["offset"], "length": e["length"],
                        "dirty": bool(e["type"] & 1)})
        else:
            out.append({"start": e["start"], "length": e["length"],
                        "dirty": bool(e["dirty"])})
    return out


def ext_coalesce(ext):
    """Merge neighbours with the same state (nbdinfo may split at request
    boundaries; the meaning is unchanged)."""
    out = []
    for e in ext:
        if out and out[-1]["dirty"] == e["dirty"] and \
                out[-1]["start"] + out[-1]["length"] == e["start"]:
            out[-1]["length"] += e["length"]
        else:
            out.append(dict(e))
    return out


def ext_check_cover(ext, size, label="extents"):
    """Extents must be non-empty, contiguous from 0 to size, alternating."""
    pos = 0
    for i, e in enumerate(ext):
        assert e["start"] == pos, "%s: extent %d starts at %d, expected %d: %s" % (
            label, i, e["start"], pos, ext[:i + 2])
        assert e["length"] > 0, "%s: extent %d is empty: %s" % (label, i, e)
        if i:
            assert e["dirty"] != ext[i - 1]["dirty"], \
                "%s: extents %d and %d have the same state (not merged): %s" % (
                    label, i - 1, i, ext[i - 1:i + 1])
        pos += e["length"]
    assert pos == size, "%s: extents end at %d, disk size is %d" % (label, pos, size)


def ext_diff(got, want):
    for i, (x, y) in enumerate(zip(got, want)):
        if x != y:
            return "extent %d: got %s, expected %s" % (i, x, y)
    if len(got) != len(want):
        return "%d extents, expected %d (extra: %s)" % (
            len(got), len(want), (got[len(want):] or want[len(got):])[:3])
    return "equal"


def assert_extents_equal(got, want, label):
    assert got == want, "%s: %s\ngot:      %s\nexpected: %s" % (
        label, ext_diff(got, want), json.dumps(got)[:2000], json.dumps(want)[:2000])


def dirty_ranges(ext):
    return [(e["start"], e["start"] + e["length"]) for e in ext if e["dirty"]]


def bits_from_extents(ext, gran):
    """The bitmap (int, bit n = granule n) whose dirty extents these are."""
    bits = 0
    for s, e in dirty_ranges(ext):
        lo, hi = s // gran, -(-e // gran)
        bits |= ((1 << (hi - lo)) - 1) << lo
    return bits


def bit_runs(bits):
    """(first, count) for each run of set bits, ascending."""
    pos = 0
    while bits:
        low = (bits & -bits).bit_length() - 1
        bits >>= low
        pos += low
        inv = ~bits
        n = (inv & -inv).bit_length() - 1
        yield pos, n
        bits >>= n
        pos += n


def extents_from_bits(bits, gran, size):
    """Dirty/clean extents covering [0, size), granule-rounded and clamped
    to size (what QEMU's NBD server reports)."""
    out = []
    pos = 0
    for first, n in bit_runs(bits):
        s, e = first * gran, min((first + n) * gran, size)
        if s >= size:
            break
        if s > pos:
            out.append({"start": pos, "length": s - pos, "dirty": False})
        out.append({"start": s, "length": e - s, "dirty": True})
        pos = e
    if pos < size:
        out.append({"start": pos, "length": size - pos, "dirty": False})
    return out


def bitmap_sha256(bits, gran, size):
    """sha256 of the ceil(nbits/8)-byte LSB-first bit stream, bit n = granule n."""
    nbits = -(-size // gran)
    bits &= (1 << nbits) - 1
    return _hashlib.sha256(bits.to_bytes(-(-nbits // 8), "little")).hexdigest()


def dirty_count(ext, gran):
    """Dirty bytes as QEMU counts them: whole granules."""
    return bin(bits_from_extents(ext, gran)).count("1") * gran


class BitmapModel:
    """Expected state of one bitmap: name, granularity, recording, bits."""

    def __init__(self, name, gran, recording=True, bits=0):
        self.name, self.gran, self.recording, self.bits = name, gran, recording, bits

    def dirty(self, off, length):
        if self.recording and length > 0:
            lo, hi = off // self.gran, (off + length - 1) // self.gran + 1
            self.bits |= ((1 << (hi - lo)) - 1) << lo

    def merge_from(self, src, size):
        """QEMU's merge: every granule of self touching a dirty byte of src
        (src ranges clamped to the disk size) becomes dirty."""
        for s, e in dirty_ranges(extents_from_bits(src.bits, src.gran, size)):
            lo, hi = s // self.gran, (e - 1) // self.gran + 1
            self.bits |= ((1 << (hi - lo)) - 1) << lo

    def extents(self, size):
        return extents_from_bits(self.bits, self.gran, size)

    def flags(self):
        return ["auto"] if self.recording else []

    def copy(self):
        return BitmapModel(self.name, self.gran, self.recording, self.bits)


def io_range(cmd):
    """(offset, length) of a write/zero-write/discard qemu-io command."""
    toks = cmd.split()
    return int(toks[-2]), int(toks[-1])


def model_apply_io(models, cmds):
    for c in cmds:
        off, n = io_range(c)
        for m in models:
            m.dirty(off, n)


def bitmap_io_workload(rng, size, n, maxlen=256 * KiB, near_end=True):
    """qemu-io commands (writes with patterns, zero-writes with and without
    unmap, discards) with byte-unaligned, 512-aligned and large offsets,
    some touching the last byte of the disk."""
    cmds = []
    for _ in range(n):
        r = rng.randrange(10)
        if near_end and r == 0:
            off = max(0, size - rng.randint(1, min(size, 3 * maxlen)))
        elif r < 5:
            off = rng.randrange(size // 512) * 512
        else:
            off = rng.randrange(size)
        length = rng.choice([1, rng.randint(1, 4096), 512 * rng.randint(1, 128),
                             rng.randint(1, maxlen)])
        length = max(1, min(length, size - off))
        k = rng.randrange(10)
        if k < 5:
            cmds.append("write -P %d %d %d" % (rng.randint(1, 255), off, length))
        elif k < 7:
            cmds.append("write -z %d %d" % (off, length))
        elif k < 8:
            cmds.append("write -z -u %d %d" % (off, length))
        else:
            cmds.append("discard %d %d" % (off, length))
    return cmds


# ---- oracle: qemu-nbd + nbdinfo ----

@_contextlib.contextmanager
def qemu_nbd_bitmaps(path, names, fmt="qcow2", timeout=20):
    """A read-only qemu-nbd on a unix socket exporting bitmaps `names`;
    yields the NBD URI.  Always killed on exit."""
    d = _tempfile.mkdtemp(prefix="cbtnbd")
    sock = os.path.join(d, "s")
    errf = os.path.join(d, "err")
    argv = ["qemu-nbd", "-r", "-t", "-k", sock, "-f", fmt]
    for n in names:
        argv += ["-B", n]
    argv.append(str(path))
    with open(errf, "w") as ef:
        proc = _subprocess.Popen(argv, stdin=_subprocess.DEVNULL,
                                 stdout=_subprocess.DEVNULL, stderr=ef)
    try:
        deadline = _time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                with open(errf) as f:
                    raise AssertionError("qemu-nbd exited (rc %s) before serving %s: %s"
                                         % (proc.returncode, path, f.read()))
            if os.path.exists(sock):
                s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                try:
                    s.connect(sock)
                    break
                except OSError:
                    pass
                finally:
                    s.close()
            assert _time.monotonic() < deadline, \
                "qemu-nbd did not listen on %s within %ds" % (sock, timeout)
            _time.sleep(0.01)
        yield "nbd+unix:///?socket=" + sock
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(10)
        finally:
            shutil.rmtree(d, ignore_errors=True)


def nbd_bitmap_map(uri, name, timeout=120):
    res = run(["nbdinfo", "--map=qemu:dirty-bitmap:" + name, "--json", uri],
              timeout=timeout)
    return ext_normalize(json.loads(res.out))


def qemu_bitmap_extents(path, names, fmt="qcow2"):
    """{name: extents} as QEMU exports them (coalesced)."""
    names = list(names)
    if not names:
        return {}
    with qemu_nbd_bitmaps(path, names, fmt) as uri:
        return {n: ext_coalesce(nbd_bitmap_map(uri, n)) for n in names}


# ---- cbt's views ----

def cbt_dump(path, name, *extra):
    """cbt bitmap --dump --output=json, checked to cover the disk."""
    data = cbt_json("bitmap", "--dump", "--output=json", *extra, path, name)
    assert isinstance(data, list), "cbt bitmap --dump --output=json: not a list: %r" % data
    return ext_normalize(data)


def _pick(entry, *keys):
    for k in keys:
        if k in entry:
            return entry[k]
    raise AssertionError("cbt bitmap --list --output=json: none of %s in %s" % (keys, entry))


def cbt_bitmap_list(path, *extra):
    """cbt bitmap --list --output=json as a list of dicts with the keys
    name, granularity, recording, persistent, in_use, inconsistent, count,
    disk_bytes ('-' or '_' spellings accepted)."""
    data = cbt_json("bitmap", "--list", "--output=json", *extra, path)
    if isinstance(data, dict) and "bitmaps" in data:
        data = data["bitmaps"]
    assert isinstance(data, list), "cbt bitmap --list --output=json: %r" % data
    out = []
    for e in data:
        out.append({
            "name": _pick(e, "name"),
            "granularity": _pick(e, "granularity"),
            "recording": _pick(e, "recording"),
            "persistent": _pick(e, "persistent"),
            "in_use": _pick(e, "in_use", "in-use"),
            "inconsistent": e.get("inconsistent", False),
            "count": _pick(e, "count"),
            "disk_bytes": _pick(e, "disk_bytes", "disk-bytes", "disk_size", "disk-size"),
        })
    return out


def qemu_bitmaps(path, fmt="qcow2"):
    """qemu-img info's bitmaps ([{"name","granularity","flags"}], directory
    order), [] when there are none."""
    info = qemu_json("info", "--output=json", "-f", fmt, path)
    return info.get("format-specific", {}).get("data", {}).get("bitmaps", [])


def cbt_info_bitmaps(path, fmt="qcow2"):
    info = cbt_json("info", "--output=json", "-f", fmt, path)
    return info.get("format-specific", {}).get("data", {}).get("bitmaps", [])


def human_bitmaps_block(text):
    """The 'bitmaps:' block of `qemu-img info` human output (lines)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "bitmaps:":
            ind = len(line) - len(line.lstrip())
            block = [line]
            for nxt in lines[i + 1:]:
                if len(nxt) - len(nxt.lstrip()) <= ind:
                    break
                block.append(nxt)
            return block
    return []


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def file_digest(path):
    h = _hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def qemu_msg_regex(stderr):
    """A regex for the first line of a qemu-img error, program prefix
    dropped and QEMU's internal node names ('#block123') free."""
    line = stderr.strip().splitlines()[0]
    if line.startswith("qemu-img: "):
        line = line[len("qemu-img: "):]
    parts = _re.split(r"'?#block\d+'?", line)
    return ".+?".join(_re.escape(p) for p in parts)


# ---- on-disk bitmap directory ----

def header_extensions(path):
    """[(type, data offset, length)] of a v3 qcow2 header."""
    q = Qcow2(path)
    end = q.backing_file_offset or q.cluster_size
    off = q.header_length
    out = []
    while off + 8 <= end:
        t, n = struct.unpack(">II", q.pread(off, 8))
        if t == 0:
            break
        out.append((t, off + 8, n))
        off += 8 + (n + 7) // 8 * 8
    return out


def bitmap_directory(path):
    """Entries of the bitmap directory: dicts with entry_offset (in the
    file), table_offset, table_size, flags, type, granularity_bits, name."""
    q = Qcow2(path)
    ext = [e for e in header_extensions(path) if e[0] == BITMAPS_EXT]
    if not ext:
        return []
    nb, _, dsize, doff = struct.unpack(">IIQQ", q.pread(ext[0][1], 24))
    data = q.pread(doff, dsize)
    out, pos = [], 0
    for _ in range(nb):
        toff, tsize, flags, typ, gbits, nsize, xsize = struct.unpack_from(">QIIBBHI", data, pos)
        name = data[pos + 24 + xsize:pos + 24 + xsize + nsize].decode(errors="replace")
        out.append({"entry_offset": doff + pos, "table_offset": toff, "table_size": tsize,
                    "flags": flags, "type": typ, "granularity_bits": gbits, "name": name})
        pos += (24 + nsize + xsize + 7) // 8 * 8
    return out


def bitmap_table(path, entry):
    q = Qcow2(path)
    raw = q.pread(entry["table_offset"], 8 * entry["table_size"])
    return list(struct.unpack(">%dQ" % entry["table_size"], raw))


def set_bitmap_flags(path, name, flags):
    e = next(e for e in bitmap_directory(path) if e["name"] == name)
    Qcow2(path).pwrite(e["entry_offset"] + 12, struct.pack(">I", flags))


def bitmap_disk_bytes(path, name):
    """Bytes of the bitmap's table clusters plus its allocated data clusters."""
    q = Qcow2(path)
    cs = q.cluster_size
    e = next(e for e in bitmap_directory(path) if e["name"] == name)
    tab = bitmap_table(path, e)
    return (-(-8 * e["table_size"] // cs) + sum(1 for t in tab if t & L1E_OFFSET_MASK)) * cs


def default_granularity(cluster_size):
    """QEMU's default: the cluster size clamped to [4 KiB, 64 KiB]."""
    return min(max(cluster_size, 4 * KiB), 64 * KiB)


def cbt_count(path, name, *extra):
    """cbt bitmap --count: a bare integer (or JSON {"count": N})."""
    res = cbt_ok("bitmap", "--count", *extra, path, name)
    m = _re.match(r"\s*(\d+)\s*$", res.out)
    if m:
        return int(m.group(1))
    try:
        return int(json.loads(res.out)["count"])
    except (ValueError, KeyError, TypeError):
        raise AssertionError("cbt bitmap --count printed no count: %r" % res)


def cbt_sha256(path, name, *extra):
    res = cbt_ok("bitmap", "--sha256", *extra, path, name)
    m = _re.search(r"\b([0-9a-f]{64})\b", res.out)
    assert m, "cbt bitmap --sha256 printed no hex digest: %r" % res
    return m.group(1)


def assert_bitmaps_agree(img, size, models=None, label="", counts=True):
    """Every view of img's bitmaps agrees with QEMU's (and with `models`,
    a list of BitmapModel in directory order, when given):
      * qemu-img info's list == the models' names, granularities, flags;
      * QEMU's NBD extents == the models' extents;
      * cbt bitmap --dump == QEMU's NBD extents (and covers the disk);
      * cbt bitmap --list and cbt info (JSON and human) == qemu-img info;
      * cbt's count == dirty granules x granularity, disk bytes == what the
        directory and tables on disk say.
    Returns {name: QEMU extents}."""
    where = (" [%s]" % label) if label else ""
    qb = qemu_bitmaps(img)
    if models is not None:
        want = [{"flags": m.flags(), "name": m.name, "granularity": m.gran} for m in models]
        assert qb == want, "qemu-img info bitmaps%s:\n  got      %s\n  expected %s" % (
            where, qb, want)
    names = [b["name"] for b in qb]
    qext = qemu_bitmap_extents(img, names)
    if models is not None:
        for m in models:
            assert_extents_equal(qext[m.name], m.extents(size),
                                 "QEMU's extents of %r vs the expected bits%s" % (m.name, where))
    for b in qb:
        got = cbt_dump(img, b["name"])
        ext_check_cover(got, size, "cbt bitmap --dump %r%s" % (b["name"], where))
        assert_extents_equal(got, qext[b["name"]],
                             "cbt --dump vs qemu-nbd/nbdinfo for %r%s" % (b["name"], where))
    cl = cbt_bitmap_list(img)
    assert [e["name"] for e in cl] == names, "cbt bitmap --list names%s: %s, qemu-img info: %s" % (
        where, [e["name"] for e in cl], names)
    for e, b in zip(cl, qb):
        n = b["name"]
        assert e["granularity"] == b["granularity"], (n, e, b, where)
        assert e["recording"] == ("auto" in b["flags"]), (n, e, b, where)
        assert e["in_use"] == ("in-use" in b["flags"]), (n, e, b, where)
        assert e["persistent"] is True, (n, e, where)
        assert not e["inconsistent"], (n, e, where)
        assert e["count"] == dirty_count(qext[n], b["granularity"]), \
            "cbt --list count of %r%s: %d, QEMU's extents give %d" % (
                n, where, e["count"], dirty_count(qext[n], b["granularity"]))
        assert e["disk_bytes"] == bitmap_disk_bytes(img, n), \
            "cbt --list disk bytes of %r%s: %d, on disk %d" % (
                n, where, e["disk_bytes"], bitmap_disk_bytes(img, n))
        if counts:
            c = cbt_count(img, n)
            assert c == e["count"], "cbt --count %r%s: %d, --list says %d" % (n, where, c, e["count"])
    ci = cbt_info_bitmaps(img)
    assert ci == qb, "cbt info --output=json bitmaps%s:\n  cbt  %s\n  qemu %s" % (where, ci, qb)
    hq = human_bitmaps_block(qemu_img("info", "-f", "qcow2", img).out)
    hc = human_bitmaps_block(cbt_ok("info", "-f", "qcow2", img).out)
    assert hc == hq, "cbt info (human) bitmaps block%s:\n%s\nqemu-img info:\n%s" % (
        where, "\n".join(hc), "\n".join(hq))
    return qext


def nbd_bitmap_map_text(uri, name, timeout=120):
    """nbdinfo --map's human lines for a bitmap (what `cbt bitmap --dump`
    prints without --output=json)."""
    return run(["nbdinfo", "--map=qemu:dirty-bitmap:" + name, uri], timeout=timeout).out
