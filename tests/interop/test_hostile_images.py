"""Hostile and damaged images: cbt never makes them worse.

Each case is built with qemu-img and qemu-io, then damaged by patching bytes
in Python (interop_lib.Qcow2).  QEMU's tools are the oracles: `qemu-img
check` counts the damage before and after, `qemu-img compare` tells whether
the guest's data changed, `qemu-img info` shows the corrupt bit.

  * header extensions: thousands of them are bounded and refused clearly;
  * checkpoint metadata (cbt's header extension 0x63627463): an order
    counter at its end, or two copies of the extension, are refused before
    anything is written, and reconcile --fix repairs the copies;
  * overlapping metadata (an L2 table that is a refcount block, a bitmap
    table on the refcount table, a data cluster that is the L1 table...):
    a write command refuses, marks the image corrupt as QEMU does, and
    leaves the guest's data and `qemu-img check`'s count as they were;
    `check -r all` then repairs what qemu-img check -r all repairs;
  * a data cluster whose refcount is 0: jobs that only change metadata
    (bitmaps, checkpoints, a backup's checkpoint, growing the L1 table)
    never take it for their own clusters, so the guest's data stays;
  * snapshot table entries QEMU repairs (incomplete v3 entries, too much
    extra data): `cbt check` reports them as qemu-img check does, and
    `-r all` writes the same table qemu-img check -r all writes;
  * messages: a damaged table met by `cbt map` or `cbt io` is named as QEMU
    names it (file, structure, offsets), and a bitmap directory, table or
    data cluster past the end of the file is reported as such (and dropped
    by `check -r all`), never read as zeroes.
"""
import json
import os
import re
import shutil
import struct
import time
import zlib

import pytest

import interop_lib as L
from interop_lib import MiB, qemu_img, qemu_io

TIMEOUT = 60

# A header extension type QEMU and cbt know nothing of (kept verbatim).
UNKNOWN_EXT = 0x7E57E470


def fill_header_extensions(path, count=None):
    """Append empty unknown extensions after the last one of the header
    cluster: `count` of them, or as many as fit.  Returns how many."""
    q = L.Qcow2(path)
    exts = L.header_extensions(path)
    pos = q.header_length
    for _, data_off, n in exts:
        pos = data_off + (n + 7) // 8 * 8
    end = q.backing_file_offset or q.cluster_size
    room = (end - pos - 8) // 8
    n = room if count is None else count
    assert 0 < n <= room
    rec = struct.pack(">II", UNKNOWN_EXT, 0)
    q.pwrite(pos, rec * n + struct.pack(">II", 0, 0))
    return n


def test_header_extension_flood_is_refused_quickly(tmp):
    """~262,000 empty extensions in a 2 MiB header cluster: cbt refuses the
    image at once with the limit named (it used to take minutes growing
    an array one element at a time)."""
    img = os.path.join(str(tmp), "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", img, "4M")
    n = fill_header_extensions(img)
    assert n > 260000, n
    qemu_img("info", img)  # QEMU still opens it
    for args in (["info", img], ["map", img], ["check", img],
                 ["io", "-c", "write 0 64k", img]):
        t0 = time.monotonic()
        res = L.cbt_rc(*args, timeout=TIMEOUT)
        took = time.monotonic() - t0
        assert res.rc != 0, "cbt %s accepted the image: %r" % (args[0], res)
        assert "header extensions" in res.err and "4096" in res.err, res
        assert took < 20, "cbt %s took %.1f s" % (args[0], took)


def test_many_header_extensions_are_kept(tmp):
    """Below the limit, unknown extensions are kept verbatim when cbt
    rewrites the header (a bitmap is added), and QEMU agrees the image is
    sound."""
    img = os.path.join(str(tmp), "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    fill_header_extensions(img, 2000)
    before = [e for e in L.header_extensions(img) if e[0] == UNKNOWN_EXT]
    assert len(before) == 2000
    L.cbt_ok("bitmap", "--add", img, "b1")
    after = [e for e in L.header_extensions(img) if e[0] == UNKNOWN_EXT]
    assert len(after) == 2000
    assert [b["name"] for b in L.qemu_bitmaps(img)] == ["b1"]
    L.qemu_check_clean(img)


# ---------------------------------------------------------------------------
# Checkpoint metadata (docs/checkpoints.md: version, header size, CRC-32 of
# bytes 0..3 and 8.., count, flags, disk id, next order at byte 32).

CKPT_EXT = 0x63627463


def ckpt_ext(path):
    """(data offset, length) of every checkpoint extension in the header."""
    return [(off, n) for t, off, n in L.header_extensions(path) if t == CKPT_EXT]


def ckpt_crc(buf):
    return zlib.crc32(buf[8:], zlib.crc32(buf[:4])) & 0xFFFFFFFF


def set_next_order(path, value):
    q = L.Qcow2(path)
    (off, n), = ckpt_ext(path)
    buf = bytearray(q.pread(off, n))
    struct.pack_into(">Q", buf, 32, value)
    struct.pack_into(">I", buf, 4, ckpt_crc(bytes(buf)))
    q.pwrite(off, bytes(buf))


def duplicate_ckpt_ext(path):
    """Insert a second copy of the checkpoint extension right after the
    first (the header cluster has room to spare)."""
    q = L.Qcow2(path)
    (off, n), = ckpt_ext(path)
    rec_len = 8 + (n + 7) // 8 * 8
    rec = q.pread(off - 8, rec_len)
    end = q.backing_file_offset or q.cluster_size
    tail = q.pread(off - 8 + rec_len, end - (off - 8 + rec_len) - rec_len)
    q.pwrite(off - 8 + rec_len, rec + tail)


def checkpoint_disk(d):
    disk = os.path.join(d, "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 256k", disk)
    os.mkdir(os.path.join(d, "bk"))
    L.cbt_ok("backup", "--full", "--checkpoint", "mon", disk,
             os.path.join(d, "bk", "full.qcow2"))
    return disk


def ckpt_names(disk):
    data = L.cbt_json("checkpoint", "list", "--output=json", disk)
    if isinstance(data, dict):
        data = data.get("checkpoints", [])
    return [c["name"] for c in data]


def test_checkpoint_order_counter_at_its_end(tmp):
    """next_order 2^64-1: the next checkpoint would wrap the counter to 0,
    which every reader rejects.  Backups and checkpoint create refuse,
    saying why, and leave the disk's metadata readable and unchanged."""
    d = str(tmp)
    disk = checkpoint_disk(d)
    set_next_order(disk, 2**64 - 1)
    assert ckpt_names(disk) == ["mon"]
    before = L.file_digest(disk)
    qemu_io("-f", "qcow2", "-c", "write -P 0x22 1M 64k", disk)
    data_written = L.file_digest(disk)
    assert data_written != before
    target = os.path.join(d, "bk", "inc.qcow2")
    for args in (["backup", "--incremental", disk, target],
                 ["backup", "--full", "--checkpoint", "tue", disk, target],
                 ["checkpoint", "create", disk, "tue"]):
        res = L.cbt_rc(*args)
        assert res.rc != 0, "cbt %s wrapped the order counter: %r" % (args[:2], res)
        assert "next order" in res.err and str(2**64 - 1) in res.err, res
        assert not os.path.exists(target), os.listdir(os.path.join(d, "bk"))
        assert ckpt_names(disk) == ["mon"]
    L.qemu_check_clean(disk)


def test_two_checkpoint_extensions(tmp):
    """Two copies of the checkpoint extension: readers used the first,
    writers changed the last, so a new checkpoint was invisible.  Now
    every checkpoint command refuses, naming the problem, and writes
    nothing; reconcile --fix replaces the copies with one."""
    d = str(tmp)
    disk = checkpoint_disk(d)
    duplicate_ckpt_ext(disk)
    assert len(ckpt_ext(disk)) == 2
    L.qemu_check_clean(disk)
    before = L.file_digest(disk)
    for args in (["checkpoint", "list", disk],
                 ["checkpoint", "show", disk, "mon"],
                 ["checkpoint", "create", disk, "tue"],
                 ["checkpoint", "delete", disk, "mon"],
                 ["backup", "--full", "--checkpoint", "tue", disk,
                  os.path.join(d, "bk", "f2.qcow2")],
                 ["backup", "--incremental", disk, os.path.join(d, "bk", "i.qcow2")]):
        res = L.cbt_rc(*args)
        assert res.rc != 0, "cbt %s accepted two extensions: %r" % (args[:2], res)
        assert "more than one checkpoint metadata extension" in res.err, res
        assert L.file_digest(disk) == before, "cbt %s changed the disk" % args[:2]
    assert sorted(os.listdir(os.path.join(d, "bk"))) == \
        ["full.qcow2", "full.qcow2.json", "full.qcow2.tree"]
    res = L.cbt_rc("checkpoint", "reconcile", disk)
    assert "more than one checkpoint metadata extension" in res.out + res.err, res
    assert L.file_digest(disk) == before
    L.cbt_ok("checkpoint", "reconcile", "--fix", disk)
    assert len(ckpt_ext(disk)) == 1
    assert ckpt_names(disk) == ["mon"]  # the bitmap adopted, a new disk id
    L.cbt_ok("checkpoint", "create", disk, "tue")
    assert ckpt_names(disk) == ["mon", "tue"]
    L.qemu_check_clean(disk)


# ---------------------------------------------------------------------------
# Overlapping metadata.  A 4 MiB image with 64 KiB clusters: header 0,
# refcount table 0x10000, refcount block 0x20000, L1 0x30000, L2 0x40000,
# data for guest 0 and 64k, then for 1M.


def damaged_base(path, bitmap=False):
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    if bitmap:
        qemu_img("bitmap", "--add", path, "old")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 128k",
            "-c", "write -P 0x22 1M 64k", path)
    return L.Qcow2(path)


def o_l2_is_refblock(path):
    """L1[0] points at the refcount block: the L2 table is a refcount block."""
    q = damaged_base(path)
    q.put_u64(q.l1_entry_off(0),
              q.u64(q.refcount_table_offset) | L.OFLAG_COPIED)
    return 0


def o_refblock_is_l2(path):
    """The refcount table points at the L2 table: a refcount block that is
    an L2 table (its refcounts say the refcount table is free)."""
    q = damaged_base(path)
    q.put_u64(q.refcount_table_offset, q.l1(0) & L.L1E_OFFSET_MASK)
    return 2 * MiB


def o_bitmap_table_on_reftable(path):
    """A bitmap's table is the refcount table (its entry points at the
    refcount block, so the bitmap's data is the refcount block)."""
    q = damaged_base(path, bitmap=True)
    e = L.bitmap_directory(path)[0]
    q.put_u64(e["entry_offset"], q.refcount_table_offset)
    return 2 * MiB


def o_data_is_l1(path):
    """The data cluster of guest 1M is the L1 table."""
    q = damaged_base(path)
    q.put_u64(q.l2_entry_off(1 * MiB), q.l1_table_offset | L.OFLAG_COPIED)
    return 1 * MiB


OVERLAPS = {
    "l2-is-refblock": o_l2_is_refblock,
    "refblock-is-l2": o_refblock_is_l2,
    "bitmap-table-on-reftable": o_bitmap_table_on_reftable,
    "data-is-l1": o_data_is_l1,
}

# The commands of the issue; WOFF is a guest offset whose write reaches the
# damage.  For each case, the commands whose job touches damaged metadata
# and must be refused; the others may succeed, changing no guest data.
COMMANDS = {
    "bitmap": ["bitmap", "--add", "IMG", "b1"],
    "io": ["io", "-c", "write -P 0x77 WOFF 64k", "IMG"],
    "backup": ["backup", "--full", "IMG", "BK/full.qcow2"],
}
REFUSED = {
    "l2-is-refblock": {"bitmap", "io", "backup"},
    "refblock-is-l2": {"bitmap", "io", "backup"},
    "bitmap-table-on-reftable": {"bitmap", "io", "backup"},
    "data-is-l1": {"io"},
}
# What the warning may name (QEMU's names): one of the structures that share
# the cluster, or the one the write was about to destroy.
STRUCTURE = {
    "l2-is-refblock": ("active L2 table", "refcount block"),
    "refblock-is-l2": ("refcount table", "refcount block", "active L2 table"),
    "bitmap-table-on-reftable": ("refcount table", "refcount block"),
    "data-is-l1": ("active L1 table",),
}


def check_counts(path):
    rc, data, res = L.qemu_check(path)
    assert data is not None, "qemu-img check gave no result: %r" % res
    return data.get("corruptions", 0), data.get("leaks", 0)


def qemu_corrupt(path):
    info = L.qemu_json("info", "--output=json", "-f", "qcow2", path)
    return info["format-specific"]["data"].get("corrupt", False)


OVERLAP_PARAMS = [(c, cmd) for c in OVERLAPS for cmd in COMMANDS]


@pytest.mark.parametrize("case,command", OVERLAP_PARAMS,
                         ids=["%s-%s" % p for p in OVERLAP_PARAMS])
def test_overlapping_metadata_is_never_written(tmp, case, command):
    d = str(tmp)
    img = os.path.join(d, "img.qcow2")
    woff = OVERLAPS[case](img)
    orig = L.copy(img, os.path.join(d, "orig.qcow2"))
    before = check_counts(img)
    assert before[0] > 0, "the damage is not seen by qemu-img check"
    os.mkdir(os.path.join(d, "bk"))
    args = [a.replace("IMG", img).replace("BK", os.path.join(d, "bk"))
            .replace("WOFF", str(woff)) for a in COMMANDS[command]]
    res = L.cbt_rc(*args)
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", orig, img,
                   check=False)
    assert cmp.rc == 0, "guest data changed: %s\n%r" % (cmp.out, res)
    after = check_counts(img)
    assert after[0] <= before[0] and after[1] <= before[1], \
        "qemu-img check: %s before, %s after\n%r" % (before, after, res)
    if command not in REFUSED[case]:
        assert res.rc == 0, res
        return
    assert res.rc != 0, "cbt %s did not refuse: %r" % (command, res)
    assert "Marking image as corrupt" in res.err, res
    assert any("overlaps with %s" % n in res.err for n in STRUCTURE[case]), res
    assert "img.qcow2" in res.err, res
    assert qemu_corrupt(img), "the corrupt bit is not set"
    # Read-write opens are refused from now on, reads still work.
    res = L.cbt_rc("io", "-c", "write 3M 4k", img)
    assert res.rc != 0 and "marked corrupt" in res.err, res
    L.cbt_ok("info", img)
    assert check_counts(img) == after


@pytest.mark.parametrize("case", list(OVERLAPS))
def test_check_repairs_what_qemu_repairs_after_corruption(tmp, case):
    """After cbt marked an image corrupt, `cbt check -r all` leaves it as
    `qemu-img check -r all` does: the same counts, the corrupt bit cleared
    exactly when QEMU clears it."""
    d = str(tmp)
    img = os.path.join(d, "img.qcow2")
    woff = OVERLAPS[case](img)
    res = L.cbt_rc("io", "-c", "write -P 0x77 %d 64k" % woff, img)
    assert res.rc != 0 and qemu_corrupt(img), res
    q = L.copy(img, os.path.join(d, "q.qcow2"))
    qemu_img("check", "-r", "all", "-f", "qcow2", q, check=False)
    L.cbt_rc("check", "-r", "all", "-f", "qcow2", img)
    assert qemu_corrupt(img) == qemu_corrupt(q)
    assert check_counts(img) == check_counts(q)
    if not qemu_corrupt(img):
        L.cbt_ok("io", "-c", "write -P 0x33 3M 64k", img)
        L.qemu_check_clean(img)


# ---------------------------------------------------------------------------
# A data cluster still referenced by an L2 entry, its refcount 0.

METADATA_JOBS = {
    "bitmap-add": ["bitmap", "--add", "IMG", "b1"],
    "checkpoint": ["checkpoint", "create", "IMG", "c1"],
    "backup": ["backup", "--full", "IMG", "BK/full.qcow2"],
    "resize": ["resize", "IMG", "1T"],  # the L1 table grows and moves
}


@pytest.mark.parametrize("job", list(METADATA_JOBS))
def test_metadata_job_never_takes_a_referenced_cluster(tmp, job):
    d = str(tmp)
    img = os.path.join(d, "img.qcow2")
    q = damaged_base(img, bitmap=True)
    host = q.host_cluster(0)
    q.set_refcount(host // q.cluster_size, 0)
    orig = L.copy(img, os.path.join(d, "orig.qcow2"))
    before = check_counts(img)
    assert before[0] > 0
    os.mkdir(os.path.join(d, "bk"))
    args = [a.replace("IMG", img).replace("BK", os.path.join(d, "bk"))
            for a in METADATA_JOBS[job]]
    L.cbt_ok(*args)
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", orig, img,
                   check=False)
    assert cmp.rc == 0, "guest data changed: %s" % cmp.out
    assert q.host_cluster(0) == host
    after = check_counts(img)
    assert after[0] <= before[0] and after[1] <= before[1], (before, after)


# ---------------------------------------------------------------------------
# Snapshot table entries: 40 fixed bytes (extra_data_size at 36), the
# extra data, the id, the name; entries 8-byte aligned.


def snapshot_entries(q):
    """[(offset, fixed bytes, extra, id, name)] of the table."""
    out, off = [], q.snapshots_offset
    for _ in range(q.nb_snapshots):
        off = (off + 7) // 8 * 8
        fx = q.pread(off, 40)
        extra = struct.unpack(">I", fx[36:40])[0]
        idl, nl = struct.unpack(">HH", fx[12:16])
        ex = q.pread(off + 40, extra)
        ident = q.pread(off + 40 + extra, idl)
        name = q.pread(off + 40 + extra + idl, nl)
        out.append((off, fx, ex, ident, name))
        off += 40 + extra + idl + nl
    return out


def snapshot_table_bytes(path):
    q = L.Qcow2(path)
    return b"".join(fx + ex + i + n for _, fx, ex, i, n in snapshot_entries(q))


def rewrite_entry(path, index, extra):
    """Give entry `index` `extra` as its extra data (the entries after it
    move; the table's clusters have room)."""
    q = L.Qcow2(path)
    ents = snapshot_entries(q)
    base = ents[0][0]
    buf = b""
    for k, (_, fx, ex, ident, name) in enumerate(ents):
        if k == index:
            ex = extra
            fx = fx[:36] + struct.pack(">I", len(ex))
        buf += b"\0" * ((-len(buf)) % 8) + fx + ex + ident + name
    assert len(buf) <= q.cluster_size
    q.pwrite(base, buf)


def snapshot_image(path):
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 128k", path)
    qemu_img("snapshot", "-c", "first", path)
    qemu_io("-f", "qcow2", "-c", "write -P 0x22 64k 128k", path)
    qemu_img("snapshot", "-c", "second", path)
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 1M 64k", path)
    return L.Qcow2(path)


def s_incomplete(path):
    """Entry 0 with no extra data (v3 wants 16 bytes: the disk size)."""
    snapshot_image(path)
    rewrite_entry(path, 0, b"")


def s_short(path):
    """Entry 1 with 8 bytes of extra data: the VM state size only."""
    q = snapshot_image(path)
    ex = snapshot_entries(q)[1][2]
    rewrite_entry(path, 1, ex[:8])


def s_too_much_extra(path):
    """Entry 1 with 2000 bytes of extra data (QEMU reads at most 1 KiB)."""
    q = snapshot_image(path)
    ex = snapshot_entries(q)[1][2]
    rewrite_entry(path, 1, ex + bytes(range(256)) * 7 + b"\xab" * (2000 - len(ex) - 1792))


SNAPSHOT_DAMAGE = {"incomplete": s_incomplete, "short": s_short,
                   "too-much-extra": s_too_much_extra}


@pytest.mark.parametrize("case", list(SNAPSHOT_DAMAGE))
def test_snapshot_table_repair_matches_qemu(tmp, case):
    d = str(tmp)
    img = os.path.join(d, "img.qcow2")
    SNAPSHOT_DAMAGE[case](img)
    q = L.copy(img, os.path.join(d, "q.qcow2"))
    c = L.copy(img, os.path.join(d, "c.qcow2"))
    # Detection: qemu-img check's exit status and counts.
    qrc, qdata, qres = L.qemu_check(q)
    assert qrc != 0, "the damage is not seen by qemu-img check: %r" % qres
    res = L.cbt_rc("check", "--output=json", "-f", "qcow2", c)
    assert res.rc == qrc, "cbt check: %r\nqemu-img check: %r" % (res, qres)
    if qdata is not None:
        cdata = json.loads(res.out)
        for k in ("corruptions", "leaks", "check-errors"):
            assert cdata.get(k, 0) == qdata.get(k, 0), (k, cdata, qdata)
    assert L.file_digest(c) == L.file_digest(img), "cbt check changed the file"
    # Repair: the same table, the same snapshots, the same data.
    qemu_img("check", "-r", "all", "-f", "qcow2", q)
    L.cbt_ok("check", "-r", "all", "-f", "qcow2", c)
    L.qemu_check_clean(q)
    L.qemu_check_clean(c)
    assert snapshot_table_bytes(c) == snapshot_table_bytes(q)
    def snaps(p):
        info = L.qemu_json("info", "--output=json", "-f", "qcow2", p)
        return info.get("snapshots")
    assert snaps(c) == snaps(q)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", q, c)
    for sn in ("first", "second"):
        a = os.path.join(d, "a-%s.raw" % sn)
        b = os.path.join(d, "b-%s.raw" % sn)
        qemu_img("convert", "-O", "raw", "-l", "snapshot.name=" + sn, q, a)
        qemu_img("convert", "-O", "raw", "-l", "snapshot.name=" + sn, c, b)
        assert L.file_digest(a) == L.file_digest(b), sn


# ---------------------------------------------------------------------------
# Messages for damaged tables.


def m_l1_unaligned(path):
    q = damaged_base(path)
    q.put_u64(q.l1_entry_off(0), q.l1(0) + 512)


def m_data_unaligned(path):
    q = damaged_base(path)
    q.put_u64(q.l2_entry_off(64 * 1024), q.l2(64 * 1024) + 512)


MAP_DAMAGE = {"l1-unaligned": m_l1_unaligned,
              "data-unaligned": m_data_unaligned}


def qemu_detail(stderr):
    m = re.search(r"(?:Image is corrupt|Marking image as corrupt): (.*?); "
                  r"further", stderr)
    assert m, "no corruption event from QEMU: %r" % stderr
    return m.group(1)


@pytest.mark.parametrize("case", list(MAP_DAMAGE))
def test_damaged_table_is_named(tmp, case):
    """cbt map names the file, the table and the offsets (QEMU's words for
    the damage); a read-write cbt io marks the image corrupt as qemu-io
    does."""
    d = str(tmp)
    img = os.path.join(d, "img.qcow2")
    MAP_DAMAGE[case](img)
    q = L.copy(img, os.path.join(d, "q.qcow2"))
    c = L.copy(img, os.path.join(d, "c.qcow2"))
    qres = qemu_img("map", "-f", "qcow2", q, check=False)
    assert qres.rc != 0
    detail = qemu_detail(qres.err)
    res = L.cbt_rc("map", "-f", "qcow2", img)
    assert res.rc != 0, res
    assert detail in res.err and "img.qcow2" in res.err, \
        "QEMU says %r:\n%r" % (detail, res)
    assert re.search(r"Could not read file metadata: .*img\.qcow2, guest offset "
                     r"(0|0x[0-9a-f]+): Input/output error", res.err), res
    qio = qemu_io("-f", "qcow2", "-c", "read 0 128k", q, check=False)
    res = L.cbt_rc("io", "-f", "qcow2", "-c", "read 0 128k", c)
    assert qemu_corrupt(q) and qemu_corrupt(c), (qio, res)
    assert "Marking image as corrupt: " + qemu_detail(qio.out + qio.err) in res.err, res


def b_dir_past_eof(path):
    q = damaged_base(path, bitmap=True)
    ext, = [e for e in L.header_extensions(path) if e[0] == L.BITMAPS_EXT]
    q.pwrite(ext[1] + 16, struct.pack(">Q", 1 << 30))
    return r"the bitmap directory \(offset 0x40000000, \d+ bytes\) lies past " \
        r"the end of the file \(\d+ bytes\)"


def b_table_past_eof(path):
    q = damaged_base(path, bitmap=True)
    e = L.bitmap_directory(path)[0]
    q.put_u64(e["entry_offset"], 1 << 30)
    return r"bitmap 'old' .*its table \(offset 0x40000000, 1 entries\) lies " \
        r"past the end of the file \(\d+ bytes\)"


def b_data_past_eof(path):
    q = damaged_base(path, bitmap=True)
    e = L.bitmap_directory(path)[0]
    assert L.bitmap_table(path, e)[0], "the bitmap has no data cluster"
    q.put_u64(e["table_offset"], 1 << 30)
    return r"bitmap 'old' .*table entry 0 points at 0x40000000, past the end " \
        r"of the file \(\d+ bytes\)"


BITMAP_EOF = {"directory": b_dir_past_eof, "table": b_table_past_eof,
              "data": b_data_past_eof}


@pytest.mark.parametrize("case", list(BITMAP_EOF))
def test_bitmap_metadata_past_eof(tmp, case):
    """Read past the end of the file, bitmap metadata is zeroes: an empty
    directory entry, or bits that all read as clean.  cbt says where it
    lies instead, counts it as qemu-img check does, and check -r all
    drops the bitmap."""
    d = str(tmp)
    img = os.path.join(d, "img.qcow2")
    want = BITMAP_EOF[case](img)
    orig = L.copy(img, os.path.join(d, "orig.qcow2"))
    for args in (["info", img], ["bitmap", "--list", img],
                 ["io", "-c", "write 0 4k", img]):
        res = L.cbt_rc(*args)
        assert res.rc != 0, res
        assert re.search(want, res.err) and "img.qcow2" in res.err, res
    qrc, qdata, _ = L.qemu_check(orig)
    res = L.cbt_rc("check", "--output=json", "-f", "qcow2", img)
    if qdata is not None:  # QEMU opens all but the directory case
        assert res.rc == qrc, res
        cdata = json.loads(res.out)
        for k in ("corruptions", "leaks"):
            assert cdata.get(k, 0) == qdata.get(k, 0), (k, cdata, qdata)
    L.cbt_ok("check", "-r", "all", "-f", "qcow2", img)
    L.qemu_check_clean(img)
    assert L.qemu_bitmaps(img) == []
    L.cbt_ok("info", img)
    qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x11 0 128k",
            "-c", "read -P 0x22 1M 64k", img)
