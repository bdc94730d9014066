"""`cbt snapshot [--no-bitmaps] TOP OVERLAY`: an external snapshot that moves
bitmap recording onto the new overlay.  QEMU's tools are the oracles:

  * qemu-img info: OVERLAY's backing-filename is TOP's basename (same
    folder) or TOP's absolute path, backing-filename-format is TOP's format;
    TOP's copied bitmaps lose "auto", OVERLAY's twins have it (same names,
    granularities); a disabled bitmap of TOP is not copied;
  * qemu-img check is clean on both; qemu-img compare: same guest data;
  * writes through `cbt io` on OVERLAY dirty OVERLAY's bitmaps only (cbt
    bitmap --dump on both, qemu-nbd -B + nbdinfo on OVERLAY);
  * --no-bitmaps: TOP keeps recording, OVERLAY has no bitmaps;
  * failures exit 1 and leave the files as they were: OVERLAY existing
    (both byte-identical), TOP missing (no OVERLAY left behind);
  * an inconsistent bitmap of TOP is warned about, left alone, not copied.
"""
import filecmp
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import KiB, MiB, qemu_img, qemu_io  # noqa: E402

SIZE = 4 * MiB


def make_top(d, name="top.qcow2"):
    """Recording a (64 KiB) and b (4 KiB) with dirty bits, disabled d."""
    top = os.path.join(str(d), name)
    qemu_img("create", "-q", "-f", "qcow2", top, SIZE)
    qemu_img("bitmap", "--add", top, "a")
    qemu_img("bitmap", "--add", "-g", 4096, top, "b")
    qemu_img("bitmap", "--add", top, "d")
    qemu_io("-f", "qcow2", "-c", "write -P 7 100000 200000", top)
    qemu_img("bitmap", "--disable", top, "d")
    return top


def bitmaps(path):
    return {b["name"]: (b["granularity"], sorted(b["flags"])) for b in L.qemu_bitmaps(path)}


def check_clean(path):
    rc, data, res = L.qemu_check(path)
    assert rc == 0, res


def clean_extents():
    return [{"start": 0, "length": SIZE, "dirty": False}]


def test_snapshot_moves_recording(tmp_path):
    top = make_top(tmp_path)
    ov = os.path.join(str(tmp_path), "ov.qcow2")
    top_a_before = L.cbt_dump(top, "a")
    top_b_before = L.cbt_dump(top, "b")
    res = L.cbt_ok("snapshot", top, ov)
    assert res.err == ""

    info = L.qemu_json("info", "--output=json", ov)
    assert info["backing-filename"] == "top.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == SIZE
    check_clean(top)
    check_clean(ov)

    assert bitmaps(top) == {"a": (65536, []), "b": (4096, []), "d": (65536, [])}
    assert bitmaps(ov) == {"a": (65536, ["auto"]), "b": (4096, ["auto"])}

    # OVERLAY shows TOP's data before any write.
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", top, ov)
    # The copies start empty; TOP keeps its bits.
    for n in ("a", "b"):
        assert L.cbt_dump(ov, n) == clean_extents()
    assert L.cbt_dump(top, "a") == top_a_before
    assert L.cbt_dump(top, "b") == top_b_before

    L.cbt_ok("io", "-f", "qcow2", "-c", "write -P 9 1048576 5000",
             "-c", "write -z 3000000 70000", ov)
    check_clean(ov)
    check_clean(top)
    assert L.cbt_dump(top, "a") == top_a_before
    assert L.cbt_dump(top, "b") == top_b_before
    assert bitmaps(top) == {"a": (65536, []), "b": (4096, []), "d": (65536, [])}

    want = {}
    for n, g in (("a", 64 * KiB), ("b", 4 * KiB)):
        m = L.BitmapModel(n, g)
        m.dirty(1048576, 5000)
        m.dirty(3000000, 70000)
        want[n] = m.extents(SIZE)
        L.assert_extents_equal(L.cbt_dump(ov, n), want[n], "cbt dump " + n)
    nbd = L.qemu_bitmap_extents(ov, ["a", "b"])
    for n in ("a", "b"):
        L.assert_extents_equal(nbd[n], want[n], "qemu-nbd " + n)


def test_snapshot_other_folder_absolute(tmp_path):
    top = make_top(tmp_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    ov = str(sub / "ov.qcow2")
    # TOP given relative to the working directory.
    L.cbt_ok("snapshot", "top.qcow2", ov, cwd=str(tmp_path))
    info = L.qemu_json("info", "--output=json", ov)
    assert info["backing-filename"] == os.path.join(str(tmp_path), "top.qcow2")
    assert info["backing-filename-format"] == "qcow2"
    check_clean(ov)


def test_snapshot_raw_top(tmp_path):
    top = str(tmp_path / "top.raw")
    qemu_img("create", "-q", "-f", "raw", top, SIZE)
    ov = str(tmp_path / "ov.qcow2")
    L.cbt_ok("snapshot", top, ov)
    info = L.qemu_json("info", "--output=json", ov)
    assert info["backing-filename"] == "top.raw"
    assert info["backing-filename-format"] == "raw"
    assert L.qemu_bitmaps(ov) == []
    check_clean(ov)


def test_no_bitmaps(tmp_path):
    top = make_top(tmp_path)
    ov = str(tmp_path / "ov.qcow2")
    before = bitmaps(top)
    L.cbt_ok("snapshot", "--no-bitmaps", top, ov)
    assert bitmaps(top) == before
    assert before["a"][1] == ["auto"]
    assert L.qemu_bitmaps(ov) == []
    info = L.qemu_json("info", "--output=json", ov)
    assert info["backing-filename"] == "top.qcow2"
    check_clean(top)
    check_clean(ov)


def test_overlay_exists(tmp_path):
    top = make_top(tmp_path)
    ov = str(tmp_path / "ov.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", ov, MiB)
    L.copy(top, top + ".orig")
    L.copy(ov, ov + ".orig")
    res = L.cbt_rc("snapshot", top, ov)
    assert res.rc == 1
    assert "ov.qcow2" in res.err and "exists" in res.err
    assert filecmp.cmp(top, top + ".orig", shallow=False)
    assert filecmp.cmp(ov, ov + ".orig", shallow=False)


def test_top_missing(tmp_path):
    ov = str(tmp_path / "ov.qcow2")
    res = L.cbt_rc("snapshot", str(tmp_path / "nope.qcow2"), ov)
    assert res.rc == 1
    assert "nope.qcow2" in res.err
    assert not os.path.exists(ov)


def test_overlay_dir_missing_leaves_top(tmp_path):
    top = make_top(tmp_path)
    L.copy(top, top + ".orig")
    ov = str(tmp_path / "no-such-dir" / "ov.qcow2")
    res = L.cbt_rc("snapshot", top, ov)
    assert res.rc == 1
    assert "ov.qcow2" in res.err
    assert filecmp.cmp(top, top + ".orig", shallow=False)
    assert not os.path.exists(ov)


def test_inconsistent_not_copied(tmp_path):
    top = make_top(tmp_path)
    L.set_bitmap_flags(top, "b", L.BME_FLAG_IN_USE | L.BME_FLAG_AUTO)
    ov = str(tmp_path / "ov.qcow2")
    res = L.cbt_ok("snapshot", top, ov)
    assert "warning" in res.err and "'b'" in res.err and "inconsistent" in res.err
    got = bitmaps(top)
    assert got["a"] == (65536, [])
    assert got["b"] == (4096, sorted(["auto", "in-use"]))
    assert bitmaps(ov) == {"a": (65536, ["auto"])}
    check_clean(ov)


def test_usage(tmp_path):
    res = L.cbt_ok("snapshot", "--help")
    assert res.out.startswith("Usage: cbt snapshot")
    for args in ([], ["one"], ["a", "b", "c"], ["--bogus", "a", "b"]):
        res = L.cbt_rc("snapshot", *args)
        assert res.rc == 64, args
        assert "cbt snapshot --help" in res.err
