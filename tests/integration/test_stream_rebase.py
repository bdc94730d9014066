"""`cbt stream` and `cbt rebase`, with QEMU's tools as oracles.

Chains are built with qemu-img/qemu-io (random writes, zero writes,
discards; one layer shorter than the top; bitmaps in the top image, one
of them disabled).  After each operation:
  * the guest view equals a qemu-img convert copy made before (qemu-img
    compare) and qemu-img check is clean;
  * the backing link and format are what qemu-img info should show;
  * the image's bitmaps are unchanged (sha256 of every bitmap, and qemu-img
    info's flags, so nothing was left in_use); other files byte-identical;
  * allocation against a twin chain on which qemu-img rebase did the same
    job (stream -b BASE is rebase onto BASE): for rebase the same clusters
    are allocated in the image (qemu-img map, depth 0) and every range QEMU
    zeroes reads as zeroes in cbt's map too; for stream cbt allocates at
    least what QEMU does and nothing that was not allocated above BASE;
  * rebase -u changes only the header cluster; refusals change nothing.
"""
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import KiB, MiB, qemu_img, qemu_io  # noqa: E402

SIZES = [4 * MiB, 4 * MiB, 3 * MiB, 4 * MiB]   # L2 shorter than the top
SECTOR = 512


def name(i):
    return "L%d.qcow2" % i


def build_chain(d, seed, sizes=SIZES, writes=25):
    d = str(d)
    os.makedirs(d, exist_ok=True)
    rng = random.Random(seed)
    for i, size in enumerate(sizes):
        p = os.path.join(d, name(i))
        if i == 0:
            qemu_img("create", "-q", "-f", "qcow2", p, size)
        else:
            qemu_img("create", "-q", "-f", "qcow2", "-b", name(i - 1), "-F", "qcow2", p, size)
        if i == len(sizes) - 1:
            qemu_img("bitmap", "--add", p, "a")
            qemu_img("bitmap", "--add", "-g", 4096, p, "d")
        L.run_qemu_io(p, L.bitmap_io_workload(rng, size, writes, maxlen=192 * KiB))
        if i == len(sizes) - 1:
            qemu_img("bitmap", "--disable", p, "d")
    return d


def top_of(d, sizes=SIZES):
    return os.path.join(d, name(len(sizes) - 1))


def bitmap_state(path):
    return ([(b["name"], b["granularity"], sorted(b["flags"])) for b in L.qemu_bitmaps(path)],
            {b["name"]: L.cbt_sha256(path, b["name"]) for b in L.qemu_bitmaps(path)})


def sectors(entries, pred):
    """Int bitset of 512-byte sectors whose map entry satisfies pred."""
    bits = 0
    for e in entries:
        if pred(e):
            lo, hi = e["start"] // SECTOR, -(-(e["start"] + e["length"]) // SECTOR)
            bits |= ((1 << (hi - lo)) - 1) << lo
    return bits


def own(e):
    return e["present"] and e["depth"] == 0


def own_zero(e):
    return own(e) and e["zero"]


def twin(d, tmp_path, label="qemu"):
    q = str(tmp_path / label)
    shutil.copytree(d, q)
    return q


def snapshot_state(d, top):
    view = str(os.path.join(os.path.dirname(d), os.path.basename(d) + "-before.raw"))
    qemu_img("convert", "-O", "raw", top, view)
    digests = {f: L.file_digest(os.path.join(d, f)) for f in os.listdir(d)}
    return view, bitmap_state(top), digests


def assert_same_view_and_bitmaps(view, top, bitmaps_before):
    qemu_img("compare", "-f", "raw", "-F", "qcow2", view, top)
    L.qemu_check_clean(top)
    assert bitmap_state(top) == bitmaps_before


def assert_others_unchanged(d, top, digests):
    for f, h in digests.items():
        if os.path.join(d, f) != top:
            assert L.file_digest(os.path.join(d, f)) == h, "%s changed" % f


def backing_of(path):
    info = L.qemu_json("info", "--output=json", path)
    return info.get("backing-filename"), info.get("backing-filename-format")


# ---- stream -------------------------------------------------------------

def check_stream(tmp_path, base):
    d = build_chain(tmp_path / "cbt", seed=31 + (base or 0))
    q = twin(d, tmp_path)
    top = top_of(d)
    orig_map = L.qemu_map(top)
    view, bms, digests = snapshot_state(d, top)
    args = ["-b", name(base)] if base is not None else []
    res = L.cbt_ok("stream", *args, "-p", name(3), cwd=d)
    assert res.out == "" and res.err == ""
    assert_same_view_and_bitmaps(view, top, bms)
    assert_others_unchanged(d, top, digests)
    if base is None:
        assert backing_of(top) == (None, None)
    else:
        assert backing_of(top) == (name(base), "qcow2")

    qemu_img("rebase", "-b", name(base) if base is not None else "", "-F", "qcow2", name(3),
             cwd=q)
    qemu_img("compare", top, os.path.join(q, name(3)))
    ours = sectors(L.qemu_map(top), own)
    theirs = sectors(L.qemu_map(os.path.join(q, name(3))), own)
    assert theirs & ~ours == 0, "QEMU allocated sectors that cbt stream did not"
    # Nothing beyond what the layers above base decided (or the whole chain
    # without base).
    b = base if base is not None else -1
    above = sectors(orig_map, lambda e: (e["present"] or e["zero"]) and e["depth"] < 3 - b)
    assert ours & ~above == 0, "cbt stream allocated sectors no upper layer decided"


def test_stream_to_base(tmp_path):
    check_stream(tmp_path, 1)


def test_stream_to_bottom(tmp_path):
    check_stream(tmp_path, 0)


def test_stream_whole_chain(tmp_path):
    check_stream(tmp_path, None)


def test_stream_noop_and_errors(tmp_path):
    d = build_chain(tmp_path, seed=5, sizes=[1 * MiB] * 3, writes=5)
    before = {f: L.file_digest(os.path.join(d, f)) for f in os.listdir(d)}
    L.cbt_ok("stream", "-b", name(1), name(2), cwd=d)     # already linked: no-op
    other = os.path.join(d, "other.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", other, 1 * MiB)
    before["other.qcow2"] = L.file_digest(other)
    for args, msg in ((["-b", "other.qcow2", name(2)],
                       "Did not find 'other.qcow2' in the backing chain of 'L2.qcow2'"),
                      (["-b", name(2), name(2)], "Did not find 'L2.qcow2'"),
                      (["-b", "nothere", name(2)], "nothere: No such file"),
                      (["nothere.qcow2"], "nothere.qcow2")):
        res = L.cbt_rc("stream", *args, cwd=d)
        assert res.rc == 1 and msg in res.err, res
    assert {f: L.file_digest(os.path.join(d, f)) for f in os.listdir(d)} == before


# ---- rebase -------------------------------------------------------------

def check_rebase_like_qemu(tmp_path, new_backing, make_new=None, seed=41):
    d = build_chain(tmp_path / "cbt", seed=seed)
    if make_new:
        make_new(d)
    q = twin(d, tmp_path)
    top = top_of(d)
    view, bms, digests = snapshot_state(d, top)
    args = ["-b", new_backing] + (["-F", "qcow2"] if new_backing else [])
    res = L.cbt_ok("rebase", *args, name(3), cwd=d)
    assert res.out == ""
    assert_same_view_and_bitmaps(view, top, bms)
    assert_others_unchanged(d, top, digests)
    assert backing_of(top) == ((new_backing, "qcow2") if new_backing else (None, None))

    qemu_img("rebase", *(["-b", new_backing, "-F", "qcow2"] if new_backing else ["-b", ""]),
             name(3), cwd=q)
    qt = os.path.join(q, name(3))
    qemu_img("compare", top, qt)
    ours, theirs = L.qemu_map(top), L.qemu_map(qt)
    assert sectors(ours, own) == sectors(theirs, own), \
        "cbt and qemu-img rebase allocated different clusters:\ncbt  %s\nqemu %s" % (
            L.coalesce(ours), L.coalesce(theirs))
    assert sectors(theirs, own_zero) & ~sectors(ours, own_zero) == 0


def make_other(size, pattern):
    def make(d):
        p = os.path.join(d, "other.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", p, size)
        qemu_io("-c", "write -P %d 0 %d" % (pattern, size // 2), p)
    return make


def test_rebase_onto_shorter_image(tmp_path):
    check_rebase_like_qemu(tmp_path, "other.qcow2", make_other(3 * MiB, 0x11))


def test_rebase_onto_longer_image(tmp_path):
    check_rebase_like_qemu(tmp_path, "other.qcow2", make_other(6 * MiB, 0x22))


def test_rebase_onto_lower_layer(tmp_path):
    check_rebase_like_qemu(tmp_path, name(0))


def test_rebase_onto_current_backing(tmp_path):
    check_rebase_like_qemu(tmp_path, name(2))


def test_rebase_to_no_backing(tmp_path):
    check_rebase_like_qemu(tmp_path, "")


def test_rebase_probes_backing_format(tmp_path):
    d = build_chain(tmp_path, seed=3, sizes=[1 * MiB] * 2, writes=5)
    raw = os.path.join(d, "b.raw")
    qemu_img("create", "-q", "-f", "raw", raw, 1 * MiB)
    L.cbt_ok("rebase", "-b", "b.raw", name(1), cwd=d)
    assert backing_of(os.path.join(d, name(1))) == ("b.raw", "raw")
    L.qemu_check_clean(os.path.join(d, name(1)))


def test_rebase_unsafe_only_changes_the_link(tmp_path):
    d = build_chain(tmp_path, seed=8, sizes=[2 * MiB] * 3, writes=10)
    top = os.path.join(d, name(2))
    cs = 64 * KiB
    before = L.file_bytes(top)
    bms = bitmap_state(top)
    L.cbt_ok("rebase", "-u", "-b", "/elsewhere/missing.qcow2", "-F", "qcow2", top)
    after = L.file_bytes(top)
    assert after[cs:] == before[cs:], "-u changed more than the header cluster"
    assert backing_of(top) == ("/elsewhere/missing.qcow2", "qcow2")
    L.cbt_ok("rebase", "-u", "-b", name(0), "-F", "qcow2", top)
    assert backing_of(top) == (name(0), "qcow2")
    assert L.file_bytes(top)[cs:] == before[cs:]
    L.cbt_ok("rebase", "-u", top)                      # -u without -b: no link
    assert backing_of(top) == (None, None)
    L.cbt_ok("rebase", "-u", "-b", name(1), "-F", "qcow2", top)
    assert L.file_bytes(top)[cs:] == before[cs:]
    assert bitmap_state(top) == bms
    L.qemu_check_clean(top)


def test_rebase_refusals(tmp_path):
    d = build_chain(tmp_path, seed=2, sizes=[1 * MiB] * 3, writes=5)
    raw = os.path.join(d, "x.raw")
    qemu_img("create", "-q", "-f", "raw", raw, 1 * MiB)
    before = {f: L.file_digest(os.path.join(d, f)) for f in os.listdir(d)}
    for args, msg in (
            (["-b", name(0), "-F", "qcow2", "x.raw"], "format 'raw' cannot store a backing file"),
            (["-b", name(2), "-F", "qcow2", name(0)], "(a loop)"),
            (["-b", name(1), "-F", "qcow2", name(1)], "(a loop)"),
            (["-b", "nothere.qcow2", "-F", "qcow2", name(2)],
             "Could not open new backing file"),
            (["-b", name(0), "-F", "vmdk", name(2)], "Unknown file format 'vmdk'"),
            ([name(2)], "Must specify backing file (-b) or use unsafe mode (-u)"),
            (["-b", name(0)], "Expecting one image file name")):
        res = L.cbt_rc("rebase", *args, cwd=d)
        usage = msg.startswith(("Must specify", "Expecting"))
        assert res.rc == (64 if usage else 1) and msg in res.err, (args, res)
    assert {f: L.file_digest(os.path.join(d, f)) for f in os.listdir(d)} == before
