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


def qemu_check(path, *extra, fmt="qcow2"):
    """qemu-img check --output=json: (rc, dict-or-None)."""
    res = qemu_img("check", "--output=json", "-f", fmt, *extra, path, check=False)
    try:
        data = json.loads(res.out) if res.out.strip() else None
    except ValueError:
        data = None
    return res.rc, data, res
