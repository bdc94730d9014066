"""Bitmaps made by QEMU are read by cbt exactly as QEMU exports them.

Each case builds an image with `qemu-img create`, adds several persistent
bitmaps with `qemu-img bitmap --add [-g G]` (granularities 512 B .. 2 GiB,
disk sizes that are not a multiple of them), dirties them with seeded
`qemu-io` workloads (writes, zero-writes with and without unmap, discards,
some touching the last byte), disables and re-enables some between
workloads, and merges bitmaps of different granularities (also in one
multi-action call, and from another file with -b/-F).  A Python model
tracks the expected bits; QEMU's own view is checked against the model
first (so the model is validated by the oracle), then:
  * `cbt bitmap --dump --output=json` == the extents of
    `qemu-nbd -r -B NAME` + `nbdinfo --map=qemu:dirty-bitmap:NAME --json`,
    and the human `--dump` is nbdinfo --map's text line for line,
  * `--sha256` == sha256 of the bit stream rebuilt from QEMU's extents,
  * `cbt bitmap --list --output=json` and `cbt info` (JSON and human)
    agree with `qemu-img info` on names, order, granularities and flags,
  * count == dirty granules x granularity (the dirty extents rounded out to
    whole granules), `--count` agrees, disk bytes match the tables on disk,
  * none of these cbt reads changes a byte of the image.
A last case hand-edits bitmap table entries to QEMU's "all ones" encoding
(which QEMU honours on load but never writes).
"""
import os
import random

import pytest

import interop_lib as L
from interop_lib import GiB, KiB, MiB, qemu_img

# id: cluster, extended_l2, size, bitmaps [(name, granularity or None)],
#     io commands per phase, longest io command
CASES = {
    "c512": (512, False, 5 * MiB + 1536,
             [("fine", 512), ("def", None), ("g1k", 1024), ("g64k", 64 * KiB), ("g1M", MiB)],
             12, 128 * KiB),
    "c4k": (4 * KiB, False, 40 * MiB + 512,
            [("g512", 512), ("def", None), ("g32k", 32 * KiB), ("g8M", 8 * MiB)],
            15, 512 * KiB),
    "c64k": (64 * KiB, False, 10000384,
             [("def", None), ("g512", 512), ("g16k", 16 * KiB), ("g128k", 128 * KiB),
              ("g4M", 4 * MiB)],
             15, 256 * KiB),
    "c16k-l2ext": (16 * KiB, True, 3 * MiB + 2560,
                   [("def", None), ("g512", 512), ("g2k", 2 * KiB), ("g256k", 256 * KiB)],
                   15, 96 * KiB),
    "c1M-l2ext": (MiB, True, 64 * MiB + 512,
                  [("g512", 512), ("def", None), ("g16M", 16 * MiB), ("g32M", 32 * MiB)],
                  12, 3 * MiB),
    "c2M-5G": (2 * MiB, False, 5 * GiB + 3584,
               [("g2G", 2 * GiB), ("g1G", GiB), ("def", None), ("g512", 512)],
               10, 64 * KiB),
    "c64k-many": (64 * KiB, False, 4 * MiB + 512,
                  [("b%02d" % i, 512 << (i % 9)) for i in range(12)],
                  10, 128 * KiB),
}


def build(d, case, seed):
    """The image, its models (directory order), and the other file."""
    cluster, l2ext, size, bitmaps, nio, maxlen = CASES[case]
    rng = random.Random(seed)
    img = os.path.join(d, "img.qcow2")
    opts = "cluster_size=%d" % cluster + (",extended_l2=on" if l2ext else "")
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, img, size)
    models = []
    for name, g in bitmaps:
        qemu_img(*(["bitmap", "--add"] + (["-g", g] if g else []) + [img, name]))
        models.append(L.BitmapModel(name, g or L.default_granularity(cluster)))

    def io():
        cmds = L.bitmap_io_workload(rng, size, nio, maxlen)
        L.run_qemu_io(img, cmds)
        L.model_apply_io(models, cmds)

    def op(action, m, *extra):
        qemu_img("bitmap", action, *extra, img, m.name)

    io()
    # disabled bitmaps miss the next workload
    off = rng.sample(models, max(1, len(models) // 3))
    for m in off:
        op("--disable", m)
        m.recording = False
    io()
    # one comes back, another stops
    op("--enable", off[0])
    off[0].recording = True
    on = [m for m in models if m.recording and m is not off[0]]
    stop = rng.choice(on)
    op("--disable", stop)
    stop.recording = False
    io()
    # clear one, merge across granularities (both directions)
    clr = rng.choice(models)
    op("--clear", clr)
    clr.bits = 0
    by_gran = sorted(models, key=lambda m: (m.gran, m.name))
    fine, coarse = by_gran[0], by_gran[-1]
    mid = by_gran[len(by_gran) // 2]
    op("--merge", coarse, mid.name)            # finer into coarser
    coarse.merge_from(mid, size)
    op("--merge", fine, coarse.name)           # coarser into finer
    fine.merge_from(coarse, size)
    # a new bitmap built by one multi-action call, left disabled
    g = rng.choice([512, 4096, 65536, 1 << 20])
    a, b = rng.sample(models, 2)
    new = L.BitmapModel("merged", g)
    qemu_img("bitmap", "--add", "-g", g, "--merge", a.name, "--merge", b.name,
             "--disable", img, "merged")
    new.merge_from(a, size)
    new.merge_from(b, size)
    new.recording = False
    models.append(new)
    # merge from another file of the same size (-b/-F)
    other = os.path.join(d, "other.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", other, size)
    og = rng.choice([512, 8192, 1 << 20])
    qemu_img("bitmap", "--add", "-g", og, other, "o")
    om = L.BitmapModel("o", og)
    ocmds = L.bitmap_io_workload(rng, size, nio, maxlen)
    L.run_qemu_io(other, ocmds)
    L.model_apply_io([om], ocmds)
    tgt = rng.choice(models)
    qemu_img("bitmap", "--merge", "o", "-b", other, "-F", "qcow2", img, tgt.name)
    tgt.merge_from(om, size)
    io()
    return img, size, models


@pytest.mark.parametrize("case", list(CASES))
def test_cbt_reads_qemu_bitmaps(tmp, case):
    img, size, models = build(str(tmp), case, sum(map(ord, case)))
    L.qemu_check_clean(img)
    before = L.file_digest(img)
    qext = L.assert_bitmaps_agree(img, size, models, case)
    assert any(L.dirty_ranges(e) for e in qext.values()), "workload dirtied nothing"
    # the human --dump is nbdinfo --map's text, line for line
    with L.qemu_nbd_bitmaps(img, [m.name for m in models]) as uri:
        for m in models:
            want = L.nbd_bitmap_map_text(uri, m.name)
            got = L.cbt_ok("bitmap", "--dump", img, m.name).out
            assert got == want, "cbt bitmap --dump %r (human) differs from nbdinfo --map:\n" \
                "cbt:\n%s\nnbdinfo:\n%s" % (m.name, got[:1500], want[:1500])
    # sha256 of the serialized bits, rebuilt from QEMU's extents
    for m in models:
        want = L.bitmap_sha256(L.bits_from_extents(qext[m.name], m.gran), m.gran, size)
        assert L.cbt_sha256(img, m.name) == want, "cbt --sha256 of %r" % m.name
    assert L.file_digest(img) == before, "a read-only cbt command changed %s" % img


def test_all_ones_table_entries(tmp):
    """Table entries with offset 0 and bit 0 set read as all dirty (QEMU
    honours this on load; it never writes it).  The middle entry and the
    last, partial one are turned into all-ones entries."""
    d = str(tmp)
    img = os.path.join(d, "ones.qcow2")
    size = 5 * MiB + 1536         # 3 bitmap clusters at 512 B/bit, 512 B clusters
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, size)
    qemu_img("bitmap", "--add", "-g", 512, img, "ones")
    qemu_img("bitmap", "--add", "-g", 4096, img, "plain")
    L.qemu_io("-f", "qcow2", "-c", "write -P 7 4096 8192", img)
    e = next(e for e in L.bitmap_directory(img) if e["name"] == "ones")
    tab = L.bitmap_table(img, e)
    assert len(tab) == 3 and tab[1] == 0 and tab[2] == 0, tab
    q = L.Qcow2(img)
    q.put_u64(e["table_offset"] + 8, 1)
    q.put_u64(e["table_offset"] + 16, 1)
    L.qemu_check_clean(img)
    cover = 512 * 8 * 512
    m = L.BitmapModel("ones", 512)
    m.dirty(4096, 8192)
    m.dirty(cover, size - cover)
    p = L.BitmapModel("plain", 4096)
    p.dirty(4096, 8192)
    qext = L.assert_bitmaps_agree(img, size, [m, p], "all-ones entries")
    want = L.bitmap_sha256(L.bits_from_extents(qext["ones"], 512), 512, size)
    assert L.cbt_sha256(img, "ones") == want, "cbt --sha256 with all-ones entries"
