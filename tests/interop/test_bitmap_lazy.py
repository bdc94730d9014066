"""A bitmap's bits are read from the image only when something needs them.

cbt checks every bitmap's directory entry and table when it opens an image
(as QEMU does), but reads a bitmap's bits only when asked: --count and
--sha256 (and the counts of --list / info) stream the bitmap's clusters
without loading it, --dump loads just the one bitmap, and a store carries
the tables of bitmaps it never loaded over unchanged.  These cases check
the decisions and the new paths against QEMU (qemu-img, qemu-io, qemu-nbd
+ nbdinfo) as the oracle:
  * a damaged table of ANOTHER bitmap still fails the open of a view of
    one bitmap, where it failed before (and where QEMU's open fails);
  * a view of one bitmap while another is in_use on disk works and agrees
    with QEMU, and the in_use one is still refused;
  * bits past the bitmap's end in its last data cluster (garbage left by
    another writer) are neither counted nor hashed, as QEMU exports them;
  * bitmaps never loaded (disabled ones on a read-write open) keep their
    bits through rename, clear, enable and stores of the others.
"""
import os

import interop_lib as L
from interop_lib import KiB, MiB, qemu_img

SIZE = 64 * MiB + 4096


def build(d, names=("b1", "b2"), size=SIZE, cluster=64 * KiB):
    """An image with the given 4 KiB bitmaps, each dirtied differently by
    qemu-io (b_i sees the writes made after it was added)."""
    img = os.path.join(d, "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % cluster, img, size)
    models = []
    for i, n in enumerate(names):
        qemu_img("bitmap", "--add", "-g", 4096, img, n)
        models.append(L.BitmapModel(n, 4096))
        cmds = ["write -P %d %d 8192" % (i + 1, (i * 7 + k * 13) % (size // 4096 - 2) * 4096)
                for k in range(40)]
        L.run_qemu_io(img, cmds)
        L.model_apply_io(models, cmds)
    return img, models


def refused_naming(img, args, name):
    res = L.cbt_rc(*args)
    assert res.rc != 0, "cbt %s succeeded on a damaged image: %r" % (args, res)
    assert name in res.err, "cbt %s: the error does not name %r: %r" % (args, name, res.err)
    return res


def test_damaged_table_of_another_bitmap_fails_the_open(tmp):
    """Tables are checked at open, not when their bits are first read: a
    view of b1 fails as before when b2's table holds an invalid entry, and
    QEMU refuses the image too."""
    img, _ = build(str(tmp))
    e = next(e for e in L.bitmap_directory(img) if e["name"] == "b2")
    tab = L.bitmap_table(img, e)
    k = next(i for i, t in enumerate(tab) if t)
    L.Qcow2(img).put_u64(e["table_offset"] + 8 * k, tab[k] + 512)  # not cluster-aligned
    q = L.run(["qemu-img", "info", img], check=False)
    assert q.rc != 0 and "b2" in q.err, "qemu-img info opened the damaged image: %r" % q
    for args in (["bitmap", "--count", img, "b1"], ["bitmap", "--sha256", img, "b1"],
                 ["bitmap", "--dump", img, "b1"], ["info", img]):
        res = refused_naming(img, args, "b2")
        assert "entry %d is invalid" % k in res.err, res.err


def test_data_cluster_past_eof_of_another_bitmap_fails_the_open(tmp):
    """A table entry pointing past the end of the file is found at open as
    well (its cluster is not read then)."""
    img, _ = build(str(tmp))
    e = next(e for e in L.bitmap_directory(img) if e["name"] == "b2")
    tab = L.bitmap_table(img, e)
    k = next(i for i, t in enumerate(tab) if t)
    far = (os.path.getsize(img) + 16 * MiB) // (64 * KiB) * (64 * KiB)
    L.Qcow2(img).put_u64(e["table_offset"] + 8 * k, far)
    for args in (["bitmap", "--count", img, "b1"], ["bitmap", "--sha256", img, "b1"]):
        res = refused_naming(img, args, "b2")
        assert "past the end of the file" in res.err, res.err


def test_view_of_one_bitmap_while_another_is_in_use(tmp):
    """b2 is in_use on disk (a crashed writer): b1's views agree with
    qemu-nbd -B b1 + nbdinfo, and b2's are refused as inconsistent."""
    img, models = build(str(tmp), ("b1", "b2", "b3"))
    L.set_bitmap_flags(img, "b2", 3)  # in_use | auto
    before = L.file_digest(img)
    qext = L.qemu_bitmap_extents(img, ["b1", "b3"])
    for m in (models[0], models[2]):
        L.assert_extents_equal(qext[m.name], m.extents(SIZE), "QEMU's %s" % m.name)
        L.assert_extents_equal(L.cbt_dump(img, m.name), qext[m.name], "cbt --dump %s" % m.name)
        assert L.cbt_count(img, m.name) == L.dirty_count(qext[m.name], 4096)
        assert L.cbt_sha256(img, m.name) == L.bitmap_sha256(m.bits, 4096, SIZE)
    for opt in ("--count", "--sha256", "--dump"):
        res = L.cbt_rc("bitmap", opt, img, "b2")
        assert res.rc != 0 and "inconsistent" in res.err, (opt, res)
    lst = {e["name"]: e for e in L.cbt_bitmap_list(img)}
    assert lst["b2"]["inconsistent"] and lst["b1"]["count"] == L.cbt_count(img, "b1"), lst
    assert L.file_digest(img) == before, "a read-only view changed the image"


def test_bits_past_the_end_are_not_counted_or_hashed(tmp):
    """The last byte of the bit stream holds bits past the disk's end; a
    writer may leave them (and the rest of the cluster) set.  QEMU exports
    only the disk's bits: --count, --sha256 and --dump (streamed or
    loaded) say the same."""
    d = str(tmp)
    size = 5 * MiB + 1536  # 1281 bits of 4 KiB: the last byte has one bit
    img = os.path.join(d, "tail.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, size)
    qemu_img("bitmap", "--add", "-g", 4096, img, "t")
    m = L.BitmapModel("t", 4096)
    cmds = ["write -P 1 0 4096", "write -P 2 %d 512" % (size - 512)]
    L.run_qemu_io(img, cmds)
    L.model_apply_io([m], cmds)
    e = L.bitmap_directory(img)[0]
    tab = L.bitmap_table(img, e)
    assert len(tab) == 1 and tab[0], tab
    q = L.Qcow2(img)
    last = q.pread(tab[0] + 160, 1)[0]
    assert last == 0x01, "the last granule should be dirty: %#x" % last
    q.pwrite(tab[0] + 160, bytes([0xff]) + b"\xa5" * (512 - 161))
    L.qemu_check_clean(img)
    qext = L.qemu_bitmap_extents(img, ["t"])["t"]
    L.assert_extents_equal(qext, m.extents(size), "QEMU's view with tail garbage")
    want_sha = L.bitmap_sha256(m.bits, 4096, size)
    assert L.cbt_count(img, "t") == L.dirty_count(qext, 4096)
    assert L.cbt_sha256(img, "t") == want_sha
    L.assert_extents_equal(L.cbt_dump(img, "t"), qext, "cbt --dump with tail garbage")
    # Loaded (merged into a new bitmap through a read-write open) and
    # stored by cbt: the same bits, the tail now zero.
    L.cbt_ok("bitmap", "--add", "-g", "4096", img, "u")
    L.cbt_ok("bitmap", "--merge", "t", img, "u")
    assert L.cbt_sha256(img, "u") == want_sha
    assert L.cbt_count(img, "u") == L.cbt_count(img, "t")


def test_bitmaps_never_loaded_keep_their_bits(tmp):
    """On a read-write open only the recording bitmaps are loaded.  The
    others go through renames, clears and stores of the others with their
    tables carried over, and an enabled one records writes; QEMU sees the
    expected bits at every step and qemu-img check stays clean."""
    img, models = build(str(tmp), ("r", "d1", "d2", "d3"))
    for n in ("d1", "d2", "d3"):
        qemu_img("bitmap", "--disable", img, n)
    r, d1, d2, d3 = models
    for x in (d1, d2, d3):
        x.recording = False
    tables = {e["name"]: e["table_offset"] for e in L.bitmap_directory(img)}

    # A write through cbt stores r afresh; the disabled ones stay put.
    cmds = ["write -P 9 %d 65536" % (3 * MiB)]
    L.run_cbt_io(img, cmds)
    L.model_apply_io(models, cmds)
    after = {e["name"]: e["table_offset"] for e in L.bitmap_directory(img)}
    assert all(after[n] == tables[n] for n in ("d1", "d2", "d3")), (tables, after)
    L.assert_bitmaps_agree(img, SIZE, models, "after a cbt write")

    # Rename one, clear another, in one call; then enable d3 and write.
    L.cbt_ok("bitmap", "--rename", "e1", img, "d1")
    d1.name = "e1"
    L.cbt_ok("bitmap", "--clear", img, "d2")
    d2.bits = 0
    L.assert_bitmaps_agree(img, SIZE, models, "after rename and clear")
    L.qemu_check_clean(img)
    L.cbt_ok("bitmap", "--enable", img, "d3")
    d3.recording = True
    cmds = ["write -P 10 %d 8192" % (5 * MiB), "write -z %d 4096" % (SIZE - 4096)]
    L.run_cbt_io(img, cmds)
    L.model_apply_io(models, cmds)
    L.assert_bitmaps_agree(img, SIZE, models, "after enable and writes")
    L.qemu_check_clean(img)
    L.cbt_ok("check", img)


def test_merge_writes_only_the_target(tmp):
    """--merge rewrites the target and keeps every other table where it
    was (the bits of a bitmap that did not change are not written again);
    QEMU sees the merged bits, and the image checks clean.  A call whose
    last action fails leaves every table and bit as it was."""
    img, models = build(str(tmp), ("b1", "b2", "b3"))
    b1, b2, b3 = models
    tables = {e["name"]: e["table_offset"] for e in L.bitmap_directory(img)}
    L.cbt_ok("bitmap", "--merge", "b1", img, "b2")
    b2.merge_from(b1, SIZE)
    after = {e["name"]: e["table_offset"] for e in L.bitmap_directory(img)}
    assert after["b1"] == tables["b1"] and after["b3"] == tables["b3"], (tables, after)
    assert after["b2"] != tables["b2"], "the merged bitmap was not written: %s" % after
    L.assert_bitmaps_agree(img, SIZE, models, "after --merge")
    L.qemu_check_clean(img)

    before = L.file_digest(img)
    res = L.cbt_rc("bitmap", "--clear", "--rename", "c3", "--merge", "nosuch", img, "b3")
    assert res.rc != 0 and "nosuch" in res.err, res
    assert L.file_digest(img) == before, "a failed call changed the image"
    L.assert_bitmaps_agree(img, SIZE, models, "after a failed call")
