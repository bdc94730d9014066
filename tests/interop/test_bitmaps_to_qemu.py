"""Bitmaps made by cbt are seen by QEMU exactly as cbt sees them.

Each case creates an image with `cbt create`, then drives it only with cbt:
`cbt bitmap --add [-g G]`, `cbt io` workloads (writes, zero-writes with and
without unmap, discards, some at the last byte), `--disable`/`--enable`,
`--clear`, `--merge` across granularities, `--merge` from another file
(-b/-F; that file must stay byte-identical), `--rename`, one multi-action
call, `--remove` and finally `--remove-all`.  A Python model (validated
against QEMU by test_bitmaps_from_qemu.py) holds the expected bits.  After
every step:
  * `qemu-img check` finds no corruption and no leak,
  * `qemu-img info` lists the expected names (in order), granularities and
    flags (no bitmap left "in-use" after cbt exits),
  * `qemu-nbd -r -B NAME` + `nbdinfo --map` show the expected extents, and
    `cbt bitmap --dump` shows the same,
  * `cbt bitmap --list` / `cbt info` agree with qemu-img info; disk bytes
    match the tables on disk.
After --remove-all the image has no bitmaps extension and autoclear bit 0
is clear, as QEMU leaves an image whose last bitmap was removed.
"""
import os
import random

import pytest

import interop_lib as L
from interop_lib import GiB, KiB, MiB, qemu_img

# id: create options, size, big granularity, io commands per phase, longest
CASES = {
    "c64k": ("cluster_size=65536", 10000384, MiB, 15, 256 * KiB),
    # 130 MiB at 512 B/bit: 66 bitmap data clusters, a 2-cluster table
    "c512": ("cluster_size=512", 130 * MiB + 512, 64 * KiB, 15, 64 * KiB),
    "c16k-l2ext": ("cluster_size=16384,extended_l2=on", 3 * MiB + 2560, 256 * KiB, 15, 96 * KiB),
    "c2M-3G": ("cluster_size=2097152", 3 * GiB + 512, 2 * GiB, 10, 64 * KiB),
    "c4k-refcount1": ("cluster_size=4096,refcount_bits=1", 8 * MiB + 512, 8 * MiB, 12, 128 * KiB),
}


class Session:
    def __init__(self, d, case):
        opts, size, big, nio, maxlen = CASES[case]
        self.d, self.case, self.size, self.nio, self.maxlen = d, case, size, nio, maxlen
        self.rng = random.Random(sum(map(ord, case)) * 7)
        self.img = os.path.join(d, "img.qcow2")
        L.cbt_ok("create", "-q", "-f", "qcow2", "-o", opts, self.img, size)
        self.cluster = L.Qcow2(self.img).cluster_size
        self.models = []
        self.step = 0

    def model(self, name):
        return next(m for m in self.models if m.name == name)

    def bitmap(self, *args):
        """`cbt bitmap ARGS[:-1] FILE ARGS[-1]`, then every check."""
        L.cbt_ok("bitmap", *args[:-1], self.img, args[-1])
        self.check("cbt bitmap " + " ".join(str(a) for a in args))

    def io(self):
        cmds = L.bitmap_io_workload(self.rng, self.size, self.nio, self.maxlen)
        L.run_cbt_io(self.img, cmds)
        L.model_apply_io(self.models, cmds)
        self.check("cbt io (%d commands, first %r)" % (len(cmds), cmds[0]))

    def check(self, what, counts=False):
        self.step += 1
        label = "%s, step %d: after %s" % (self.case, self.step, what)
        res = qemu_img("check", "--output=json", "-f", "qcow2", self.img, check=False)
        assert res.rc == 0, "qemu-img check not clean %s:\n%r" % (label, res)
        data = res.json()
        assert data.get("corruptions", 0) == 0 and data.get("leaks", 0) == 0, (label, data)
        L.assert_bitmaps_agree(self.img, self.size, self.models, label, counts=counts)


@pytest.mark.parametrize("case", list(CASES))
def test_qemu_reads_cbt_bitmaps(tmp, case):
    s = Session(str(tmp), case)
    _, size, big, _, _ = CASES[case]
    s.check("cbt create")

    s.models.append(L.BitmapModel("a", L.default_granularity(s.cluster)))
    s.bitmap("--add", "a")
    s.models.append(L.BitmapModel("b", 512))
    s.bitmap("--add", "-g", 512, "b")
    s.models.append(L.BitmapModel("c", big))
    s.bitmap("--add", "-g", big, "c")
    s.io()

    s.model("b").recording = False
    s.bitmap("--disable", "b")
    s.io()
    s.model("b").recording = True
    s.bitmap("--enable", "b")
    s.model("c").recording = False
    s.bitmap("--disable", "c")
    s.io()

    s.model("a").bits = 0
    s.bitmap("--clear", "a")
    s.io()

    # merges: finer into coarser (a disabled target), coarser into finer
    s.model("c").merge_from(s.model("b"), size)
    s.bitmap("--merge", "b", "c")
    s.model("a").merge_from(s.model("c"), size)
    s.bitmap("--merge", "c", "a")

    # merge from another file, made by QEMU; that file must not change
    other = os.path.join(str(tmp), "other.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", other, size)
    qemu_img("bitmap", "--add", "-g", 8192, other, "o")
    om = L.BitmapModel("o", 8192)
    ocmds = L.bitmap_io_workload(s.rng, size, s.nio, s.maxlen)
    L.run_qemu_io(other, ocmds)
    L.model_apply_io([om], ocmds)
    odigest = L.file_digest(other)
    s.model("b").merge_from(om, size)
    s.bitmap("--merge", "o", "-b", other, "-F", "qcow2", "b")
    assert L.file_digest(other) == odigest, "cbt bitmap -b changed the source file"
    L.assert_extents_equal(L.cbt_dump(other, "o"), om.extents(size), "cbt --dump of the -b source")

    # rename keeps place, granularity, flags and bits
    s.model("c").name = "c2"
    s.bitmap("--rename", "c2", "c")

    # several actions in one call
    d = L.BitmapModel("d", 4096)
    d.merge_from(s.model("a"), size)
    d.merge_from(s.model("b"), size)
    d.recording = False
    s.models.append(d)
    s.bitmap("--add", "-g", 4096, "--merge", "a", "--merge", "b", "--disable", "d")

    s.models.remove(s.model("b"))
    s.bitmap("--remove", "b")
    s.io()
    s.check("the last io, with counts", counts=True)

    # remove everything: no extension, autoclear bit 0 clear (as QEMU)
    L.cbt_ok("bitmap", "--remove-all", s.img)
    s.models = []
    s.check("cbt bitmap --remove-all")
    q = L.Qcow2(s.img)
    assert not q.autoclear_features & L.AUTOCLEAR_BITMAPS, \
        "autoclear bit 0 still set after --remove-all: 0x%x" % q.autoclear_features
    assert not [e for e in L.header_extensions(s.img) if e[0] == L.BITMAPS_EXT], \
        "bitmaps extension left after --remove-all"
    # and a bitmap can be added again, seen by QEMU
    s.models.append(L.BitmapModel("again", 65536))
    s.bitmap("--add", "-g", 65536, "again")
    s.io()


@pytest.mark.parametrize("new_size", ["3G", "+1M", "2049M"])
def test_grow_keeps_bitmaps_valid_for_qemu(tmp, new_size):
    """cbt resize growing an image whose 4 KiB-granularity bitmap needs a
    longer table (3G: one cluster of bits covers 2 GiB) or not (+1M):
    QEMU loads every bitmap (no in-use flag), sees the same dirty extents
    as before in the old area and a clean grown area, and qemu-img check
    finds neither corruption nor leaks."""
    img = str(tmp / "g.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, str(4 * MiB))
    L.cbt_ok("bitmap", "--add", "-g", "4k", img, "b")
    L.cbt_ok("bitmap", "--add", "-g", "1M", img, "big")
    L.cbt_ok("bitmap", "--add", img, "off")
    L.cbt_ok("bitmap", "--disable", img, "off")
    L.cbt_ok("io", "-c", "write -P 1 100k 300k", "-c", "write -P 2 4092k 4k",
             img)
    before = L.qemu_bitmap_extents(img, ["b", "big", "off"])
    L.cbt_ok("resize", img, new_size)
    size = json_size(img)
    assert size > 4 * MiB
    info = L.qemu_json("info", "--output=json", img)
    flags = {b["name"]: b["flags"]
             for b in info["format-specific"]["data"]["bitmaps"]}
    assert flags == {"b": ["auto"], "big": ["auto"], "off": []}, flags
    after = L.qemu_bitmap_extents(img, ["b", "big", "off"])
    for name in ("b", "big", "off"):
        dirty0 = [(e["start"], e["length"]) for e in before[name] if e["dirty"]]
        dirty1 = [(e["start"], e["length"]) for e in after[name] if e["dirty"]]
        assert dirty1 == dirty0, (name, before[name], after[name])
        assert sum(e["length"] for e in after[name]) == size
        assert L.cbt_dump(img, name) == after[name]
    L.qemu_check_clean(img)


def json_size(img):
    return L.qemu_json("info", "--output=json", img)["virtual-size"]
