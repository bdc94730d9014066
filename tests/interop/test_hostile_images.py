"""Hostile and damaged images: cbt never makes them worse.

Each case is built with qemu-img and qemu-io, then damaged by patching bytes
in Python (interop_lib.Qcow2).  QEMU's tools are the oracles: `qemu-img
check` counts the damage before and after, `qemu-img compare` tells whether
the guest's data changed, `qemu-img info` shows the corrupt bit.

  * header extensions: thousands of them are bounded and refused clearly;
"""
import os
import struct
import time

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
