#!/usr/bin/env python3
"""Damaged seeds for the qcow2 fuzz targets, made from the clean ones.

Usage: fuzz/damage-seeds.py CORPUS_DIR   (fuzz/make-corpus.sh runs it)

Each seed is a clean seed with a few bytes patched, as the hostile-image
tests do (tests/interop/test_hostile_images.py): structures that share a
cluster, a referenced cluster with refcount 0, an incomplete snapshot
table entry, bitmap metadata past the end of the file.  They start the
fuzzers inside the overlap checks, the corrupt state and check's repairs,
which clean seeds reach only after many mutations.  Deterministic: the
same clean seeds give the same damaged ones.
"""
import os
import struct
import sys

BITMAPS_EXT = 0x23852875


class Image:
    def __init__(self, data):
        self.b = bytearray(data)
        self.cs = 1 << self.u32(20)

    def u32(self, off):
        return struct.unpack_from(">I", self.b, off)[0]

    def u64(self, off):
        return struct.unpack_from(">Q", self.b, off)[0]

    def put64(self, off, v):
        struct.pack_into(">Q", self.b, off, v)

    def put32(self, off, v):
        struct.pack_into(">I", self.b, off, v)

    @property
    def l1(self):
        return self.u64(40)

    @property
    def reftable(self):
        return self.u64(48)

    def l2(self, i=0):
        return self.u64(self.l1 + 8 * i) & 0x00FFFFFFFFFFFE00

    def refblock(self):
        return self.u64(self.reftable) & ~0x1FF

    def ext(self, typ):
        off = self.u32(100)
        while off + 8 <= self.cs:
            t, n = struct.unpack_from(">II", self.b, off)
            if t == 0:
                return None
            if t == typ:
                return off + 8
            off += 8 + (n + 7) // 8 * 8
        return None

    def set_refcount(self, cluster, v):  # 16-bit refcounts
        self.b[self.refblock() + 2 * cluster:self.refblock() + 2 * cluster + 2] = \
            struct.pack(">H", v)


def l2_is_refblock(img):
    img.put64(img.l1, img.refblock() | 1 << 63)


def refblock_is_l2(img):
    img.put64(img.reftable, img.l2())


def data_is_l1(img):
    img.put64(img.l2(), img.l1 | 1 << 63)


def data_refcount_0(img):
    host = img.u64(img.l2()) & 0x00FFFFFFFFFFFE00
    img.set_refcount(host // img.cs, 0)


def bitmap_table_on_reftable(img):
    e = img.ext(BITMAPS_EXT)
    img.put64(img.u64(e + 16), img.reftable)


def bitmap_dir_past_eof(img):
    e = img.ext(BITMAPS_EXT)
    img.put64(e + 16, (len(img.b) // img.cs + 4) * img.cs)


def snapshot_incomplete(img):
    off = img.u64(64)
    extra = img.u32(off + 36)
    ids = struct.unpack_from(">HH", img.b, off + 12)
    rest = bytes(img.b[off + 40 + extra:off + 40 + extra + sum(ids)])
    img.put32(off + 36, 0)
    img.b[off + 40:off + 40 + len(rest) + extra] = rest + bytes(extra)


DAMAGE = [
    ("v3-c4k.qcow2", l2_is_refblock),
    ("v3-c4k.qcow2", refblock_is_l2),
    ("v3-c4k.qcow2", data_is_l1),
    ("v3-c4k.qcow2", data_refcount_0),
    ("v3-c4k-bitmap.qcow2", bitmap_table_on_reftable),
    ("v3-c4k-bitmap.qcow2", bitmap_dir_past_eof),
    ("v3-c4k-snapshot.qcow2", snapshot_incomplete),
]


def main():
    corpus = sys.argv[1]
    for target in ("qcow2_open", "qcow2_check", "qcow2_write"):
        d = os.path.join(corpus, target)
        for seed, fn in DAMAGE:
            with open(os.path.join(d, seed), "rb") as f:
                img = Image(f.read())
            fn(img)
            name = "damaged-%s.qcow2" % fn.__name__.replace("_", "-")
            with open(os.path.join(d, name), "wb") as f:
                f.write(img.b)


if __name__ == "__main__":
    main()
