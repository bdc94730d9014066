"""Checkpoints and QEMU: the metadata is a qcow2 header extension of cbt's
own (type 0x63627463, docs/checkpoints.md), which QEMU keeps as an unknown
extension whenever it rewrites the header.

After each QEMU operation on a disk with checkpoints -- qemu-img bitmap
--add/--remove/--disable of other bitmaps, qemu-io writes (the bitmaps are
marked in use and cleared again), qemu-img resize, qemu-img amend,
qemu-img snapshot -c/-d (internal snapshots), qemu-img rebase -u,
qemu-img check -r all -- the extension is byte-identical, `cbt checkpoint
list` shows every checkpoint healthy with the bytes QEMU wrote counted,
qemu-img check is clean and qemu-img info works.  QEMU's own routes that do
not know the metadata (qemu-img convert --bitmaps, qemu-img amend to v2)
are checked too: reconcile explains what they leave and --fix repairs it.
"""
import json
import os
import struct

from interop_lib import KiB, MiB, cbt, cbt_ok, no_crash, qemu_check_clean, qemu_img, qemu_io

EXT_TYPE = 0x63627463


def ext_bytes(path):
    with open(path, "rb") as f:
        hdr = f.read(65536)
    assert struct.unpack(">I", hdr[4:8])[0] == 3
    off = struct.unpack(">I", hdr[100:104])[0]
    while off + 8 <= len(hdr):
        t, n = struct.unpack(">II", hdr[off:off + 8])
        if t == 0:
            return None
        if t == EXT_TYPE:
            return hdr[off + 8:off + 8 + n]
        off += 8 + (n + 7) // 8 * 8
    return None


def ck_list(path):
    return json.loads(cbt_ok("checkpoint", "list", "--output=json", path).out)


def reconcile(path, fix=False):
    args = ["checkpoint", "reconcile", "--output=json"] + (["--fix"] if fix else []) + [path]
    return json.loads(cbt_ok(*args).out)


def qemu_bitmap_names(path):
    info = json.loads(qemu_img("info", "--output=json", path).out)
    return sorted(b["name"] for b in
                  info.get("format-specific", {}).get("data", {}).get("bitmaps", []))


def assert_healthy(path, want):
    """want: [(name, dirty bytes)] in order."""
    lst = ck_list(path)
    got = [(c["name"], c["dirty-bytes"]) for c in lst["checkpoints"]]
    assert got == want, lst
    assert all(c["usable"] for c in lst["checkpoints"]), lst
    qemu_check_clean(path)
    qemu_img("info", path)


def test_qemu_keeps_the_extension(tmp):
    d = str(tmp / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", d, "32M")
    cbt_ok("checkpoint", "create", d, "a")
    qemu_io("-c", "write -P 1 0 256k", d)
    cbt_ok("checkpoint", "create", d, "b")
    ext = ext_bytes(d)
    assert ext is not None and len(ext) == 40 + 2 * 51
    disk_id = ck_list(d)["disk-id"]

    steps = [
        ("bitmap --add", lambda: qemu_img("bitmap", "--add", d, "other"),
         [("a", 256 * KiB), ("b", 0)]),
        ("qemu-io write", lambda: qemu_io("-c", "write -P 2 1M 128k", "-c", "write -z 4M 64k", d),
         [("a", 448 * KiB), ("b", 192 * KiB)]),
        ("bitmap --disable", lambda: qemu_img("bitmap", "--disable", d, "other"),
         [("a", 448 * KiB), ("b", 192 * KiB)]),
        ("resize", lambda: qemu_img("resize", d, "48M"),
         [("a", 448 * KiB), ("b", 192 * KiB)]),
        ("amend lazy", lambda: qemu_img("amend", "-o", "lazy_refcounts=on", d),
         [("a", 448 * KiB), ("b", 192 * KiB)]),
        ("snapshot -c", lambda: qemu_img("snapshot", "-c", "snap1", d),
         [("a", 448 * KiB), ("b", 192 * KiB)]),
        ("write after resize", lambda: qemu_io("-c", "write -P 3 40M 64k", d),
         [("a", 512 * KiB), ("b", 256 * KiB)]),
        ("snapshot -d", lambda: qemu_img("snapshot", "-d", "snap1", d),
         [("a", 512 * KiB), ("b", 256 * KiB)]),
        ("amend back", lambda: qemu_img("amend", "-o", "lazy_refcounts=off", d),
         [("a", 512 * KiB), ("b", 256 * KiB)]),
        ("rebase -u", lambda: qemu_img("rebase", "-u", "-b", "", d),
         [("a", 512 * KiB), ("b", 256 * KiB)]),
        ("check -r all", lambda: qemu_img("check", "-r", "all", d),
         [("a", 512 * KiB), ("b", 256 * KiB)]),
        ("bitmap --remove", lambda: qemu_img("bitmap", "--remove", d, "other"),
         [("a", 512 * KiB), ("b", 256 * KiB)]),
    ]
    for what, step, want in steps:
        step()
        assert ext_bytes(d) == ext, "%s changed the extension" % what
        assert_healthy(d, want)
    assert ck_list(d)["disk-id"] == disk_id
    c = {x["name"]: x for x in ck_list(d)["checkpoints"]}
    assert c["a"]["virtual-size"] == 32 * MiB     # the size at creation
    # cbt goes on after QEMU: a new checkpoint, then a clean image for QEMU.
    cbt_ok("checkpoint", "create", d, "c")
    assert [x["name"] for x in ck_list(d)["checkpoints"]] == ["a", "b", "c"]
    assert qemu_bitmap_names(d) == ["a", "b", "c"]
    qemu_check_clean(d)


def test_qemu_convert_bitmaps_then_adopt(tmp):
    """qemu-img convert --bitmaps copies the bitmaps, not cbt's metadata:
    reconcile --fix adopts them on the copy (new disk id, time now)."""
    d = str(tmp / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", d, "16M")
    cbt_ok("checkpoint", "create", d, "a")
    qemu_io("-c", "write -P 1 0 64k", d)
    out = str(tmp / "out.qcow2")
    qemu_img("convert", "--bitmaps", "-O", "qcow2", d, out)
    assert ext_bytes(out) is None
    assert ck_list(out) == {"disk-id": None, "checkpoints": []}
    rec = reconcile(out)
    assert [(i["kind"], i["name"]) for i in rec["drift"]] == [("bitmap-without-metadata", "a")]
    reconcile(out, fix=True)
    assert_healthy(out, [("a", 64 * KiB)])
    assert ck_list(out)["disk-id"] != ck_list(d)["disk-id"]


def test_qemu_amend_to_v2_breaks_bitmaps(tmp):
    """Downgrading to qcow2 v2 leaves the bitmaps stale (QEMU's rule); the
    checkpoints are then reported broken and reconcile --fix drops them."""
    d = str(tmp / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", d, "16M")
    cbt_ok("checkpoint", "create", d, "a")
    qemu_img("amend", "-o", "compat=0.10", d)
    lst = ck_list(d)
    assert [(c["name"], c["usable"]) for c in lst["checkpoints"]] == [("a", False)]
    res = no_crash(cbt("checkpoint", "reconcile", "--output=json", d))
    assert res.rc == 0
    assert [(i["kind"], i["name"]) for i in json.loads(res.out)["drift"]] == \
        [("metadata-without-bitmap", "a")]
    # A v2 image cannot hold bitmaps: a new checkpoint is refused cleanly.
    res = no_crash(cbt("checkpoint", "create", d, "b", check=False))
    assert res.rc == 1 and "v2" in res.err, res
    res = no_crash(cbt("checkpoint", "reconcile", "--fix", "--output=json", d))
    assert res.rc == 0, res
    assert ck_list(d)["checkpoints"] == []
    assert os.path.exists(d)
    qemu_img("info", d)
