"""`cbt bitmap`: errors, atomicity, read-only views, digests, damaged images.

qemu-img 7.2 is the oracle for every error: the same call is made with
qemu-img bitmap on a copy of the image and cbt must fail with the same exit
status and the same message (qemu-img's text, its internal node names such
as '#block123' matching any name cbt uses), leaving its copy byte-identical.

  * usage errors: no action, -g without --add, -F without -b, -b without
    --merge, 0/1/3 positionals, a bad -g value, an unknown option;
  * name errors: empty, 1024 bytes (1023 is accepted), duplicate, missing;
  * granularity: not a power of two, < 512, > 2^31 (512 and 2^31 accepted);
  * a v2 image and a raw image are refused;
  * inconsistent bitmaps (in_use on disk), made by SIGKILLing a `cbt io`
    writer that reads commands from stdin, or by setting the flag by hand:
    everything but --remove is refused with QEMU's message; --list shows
    them as in_use/inconsistent; --remove works and the image is clean;
  * atomicity: a call whose 3rd action fails changes no byte (qemu-img, which
    commits action by action, shows the first two actions did apply);
  * read-only views (--list, --dump, --count, --sha256, --diff, info, check,
    map, io -r) change no byte of an image with recording bitmaps;
  * --sha256 == sha256 of the bit stream rebuilt in Python from --dump
    (bit n = granule n, LSB first), and it changes with one dirty granule;
  * --diff == the Python set difference of two --dump outputs;
  * --rename refuses an existing, empty, too long or missing name;
  * autoclear bit 0 cleared by hand: cbt warns and ignores the bitmaps (as
    QEMU), `cbt check` counts their clusters as the leaks qemu-img check
    counts, `cbt check -r leaks` reclaims them and qemu-img check is clean.
"""
import hashlib
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import KiB, MiB, qemu_img, qemu_io  # noqa: E402

F = "{FILE}"
SIZE = 4 * MiB + 1536
INCONSISTENT = "Bitmap '%s' is inconsistent and cannot be used"


def make_image(d, name="img.qcow2", size=SIZE, opts="cluster_size=65536"):
    """Bitmaps: a (recording, 64 KiB), b (disabled, 4 KiB), c (recording,
    512 B), each with a different set of dirty granules."""
    img = os.path.join(str(d), name)
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, img, size)
    qemu_img("bitmap", "--add", img, "a")
    qemu_img("bitmap", "--add", "-g", 4096, img, "b")
    qemu_img("bitmap", "--add", "-g", 512, img, "c")
    qemu_io("-f", "qcow2", "-c", "write -P 1 70000 5000", "-c", "write -z 1048576 65536",
            "-c", "discard %d 1536" % (size - 1536), img)
    qemu_img("bitmap", "--disable", img, "b")
    qemu_img("bitmap", "--clear", img, "c")
    qemu_io("-f", "qcow2", "-c", "write -P 2 2000000 100000", "-c", "write -P 3 513 1", img)
    return img


def other_file(d, size=SIZE):
    path = os.path.join(str(d), "other.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    qemu_img("bitmap", "--add", "-g", 8192, path, "o1")
    qemu_io("-f", "qcow2", "-c", "write 3000000 9000", path)
    return path


def subst(args, path):
    return [path if a == F else str(a) for a in args]


def twins(img):
    q, c = img + ".q", img + ".c"
    L.copy(img, q)
    L.copy(img, c)
    return q, c


def same_error(img, args, alt=None, usage=False):
    """qemu-img bitmap ARGS and cbt bitmap ARGS (FILE replaced by a copy of
    img) both fail, with the same status and message; cbt's copy is
    unchanged.  alt: another regex cbt's message may match instead.
    usage: a usage mistake, which qemu-img exits 1 for and cbt 64 (every
    cbt command does; docs/cli.md, "Exit status").
    Returns (qemu result, qemu's copy)."""
    q, c = twins(img)
    before = L.file_bytes(c)
    rq = qemu_img(*(["bitmap"] + subst(args, q)), check=False)
    assert rq.rc != 0, "qemu-img accepted %s: %r" % (args, rq)
    rc = L.cbt_rc(*(["bitmap"] + subst(args, c)))
    want_rc = 64 if usage else rq.rc
    assert not usage or rq.rc == 1, rq
    assert rc.rc == want_rc, "cbt bitmap %s: exit %d, expected %d (qemu-img " \
        "exits %d)\n%r" % (" ".join(subst(args, "FILE")), rc.rc, want_rc, rq.rc, rc)
    want = L.qemu_msg_regex(rq.err)
    ok = re.search(want, rc.err) or (alt and re.search(alt, rc.err))
    assert ok, ("cbt bitmap %s: message differs from qemu-img's\n  qemu-img: %s\n  cbt: %s"
                % (" ".join(subst(args, "FILE")), rq.err.strip(), rc.err.strip()))
    assert L.file_bytes(c) == before, "failed cbt bitmap %s changed the image" % args
    return rq, q


# ---- usage errors ----

USAGE = {
    "no-action": [F, "a"],
    "g-without-add": ["-g", 65536, "--clear", F, "a"],
    "F-without-b": ["-F", "qcow2", "--clear", F, "a"],
    "b-without-merge": ["-b", "OTHER", "--clear", F, "a"],
    "b-F-without-merge": ["-b", "OTHER", "-F", "qcow2", "--enable", F, "a"],
    "no-positional": ["--clear"],
    "one-positional": ["--clear", F],
    "three-positionals": ["--clear", F, "a", "extra"],
    "bad-g-value": ["--add", "-g", "abc", F, "x"],
    "negative-g": ["--add", "-g", "-1", F, "x"],
    "unknown-option": ["--frobnicate", "--clear", F, "a"],
}


@pytest.mark.parametrize("case", list(USAGE))
def test_usage_errors(tmp, case):
    img = make_image(tmp)
    other = other_file(tmp)
    args = [other if a == "OTHER" else a for a in USAGE[case]]
    same_error(img, args, usage=True)


# ---- names ----

@pytest.mark.parametrize("case", ["empty", "1024-bytes", "duplicate", "duplicate-disabled",
                                  "remove-missing", "clear-missing", "enable-missing",
                                  "disable-missing", "merge-missing-source",
                                  "merge-into-missing"])
def test_name_errors(tmp, case):
    img = make_image(tmp)
    args = {
        "empty": ["--add", F, ""],
        "1024-bytes": ["--add", F, "n" * 1024],
        "duplicate": ["--add", F, "a"],
        "duplicate-disabled": ["--add", "-g", 4096, F, "b"],
        "remove-missing": ["--remove", F, "nosuch"],
        "clear-missing": ["--clear", F, "nosuch"],
        "enable-missing": ["--enable", F, "nosuch"],
        "disable-missing": ["--disable", F, "nosuch"],
        "merge-missing-source": ["--merge", "nosuch", F, "a"],
        "merge-into-missing": ["--merge", "a", F, "nosuch"],
    }[case]
    same_error(img, args)


def test_name_1023_bytes_accepted(tmp):
    img = make_image(tmp)
    name = "x" * 1023
    L.cbt_ok("bitmap", "--add", img, name)
    L.qemu_check_clean(img)
    names = [b["name"] for b in L.qemu_bitmaps(img)]
    assert names == ["a", "b", "c", name], [n[:20] for n in names]


# ---- granularity ----

@pytest.mark.parametrize("g", [1000, 256, 511, 3 << 20, 3 << 30, 1 << 32, 1 << 33])
def test_granularity_errors(tmp, g):
    img = make_image(tmp)
    # QEMU 7.2 reports a power of two above 2^31 with its "power of 2"
    # message; the can-store message is the same meaning
    alt = re.escape("Granularity exceeds maximum (2147483648 bytes)") if g > 1 << 31 else None
    same_error(img, ["--add", "-g", g, F, "x"], alt=alt)


@pytest.mark.parametrize("g", [512, 1 << 31])
def test_granularity_limits_accepted(tmp, g):
    img = make_image(tmp)
    L.cbt_ok("bitmap", "--add", "-g", g, img, "x")
    L.qemu_check_clean(img)
    assert L.qemu_bitmaps(img)[-1] == {"flags": ["auto"], "name": "x", "granularity": g}


def test_default_granularity_and_g0(tmp):
    """No -g and -g 0 both mean the default (qemu-img passes 0 as 'unset')."""
    for cs in (512, 16 * KiB, 2 * MiB):
        img = os.path.join(str(tmp), "g%d.qcow2" % cs)
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % cs, img, SIZE)
        q, c = twins(img)
        for path, tool in ((q, None), (c, "cbt")):
            for args in (["--add"], ["--add", "-g", 0]):
                name = "g0" if len(args) > 1 else "def"
                if tool:
                    L.cbt_ok("bitmap", *(args + [path, name]))
                else:
                    qemu_img(*(["bitmap"] + args + [path, name]))
        assert L.qemu_bitmaps(c) == L.qemu_bitmaps(q)
        assert L.qemu_bitmaps(c)[0]["granularity"] == L.default_granularity(cs)


# ---- formats that cannot hold bitmaps ----

@pytest.mark.parametrize("action", [["--add"], ["--add", "-g", 4096], ["--clear"],
                                    ["--remove"], ["--merge", "x"]])
def test_v2_image_refused(tmp, action):
    img = os.path.join(str(tmp), "v2.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", img, SIZE)
    same_error(img, action + [F, "b"])


@pytest.mark.parametrize("action", [["--add"], ["--clear"], ["--enable"]])
def test_raw_image_refused(tmp, action):
    img = os.path.join(str(tmp), "disk.raw")
    qemu_img("create", "-q", "-f", "raw", img, SIZE)
    same_error(img, action + ["-f", "raw", F, "b"])


# ---- inconsistent bitmaps ----

def kill_cbt_writer(img):
    """Start `cbt io` reading commands from stdin, wait for one write to be
    acknowledged, then SIGKILL it."""
    proc = subprocess.Popen([L.CBT, "io", "-f", "qcow2", img], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    out = b""
    try:
        proc.stdin.write(b"write -P 9 131072 4096\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 20
        while b"wrote 4096/4096 bytes at offset 131072" not in out:
            left = deadline - time.monotonic()
            assert left > 0, "cbt io did not acknowledge the write within 20 s: %r" % out
            r, _, _ = select.select([proc.stdout], [], [], left)
            if r:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, "cbt io exited early (rc %s): %r %r" % (
                    proc.wait(5), out, proc.stderr.read())
                out += chunk
        assert proc.poll() is None, "cbt io exited by itself"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            try:
                f.close()
            except OSError:
                pass
    assert proc.returncode == -signal.SIGKILL, proc.returncode


def check_inconsistent(img, name, others):
    """`name` is in_use on disk: every action but --remove is refused with
    QEMU's message; the read-only views refuse it too; --remove works."""
    qb = L.qemu_bitmaps(img)
    entry = next(b for b in qb if b["name"] == name)
    assert "in-use" in entry["flags"], qb
    assert L.cbt_info_bitmaps(img) == qb, "cbt info bitmaps differ from qemu-img info"
    lst = {e["name"]: e for e in L.cbt_bitmap_list(img)}
    assert lst[name]["in_use"] is True and lst[name]["inconsistent"] is True, lst[name]
    assert lst[name]["recording"] is False, "an inconsistent bitmap cannot record: %s" % lst[name]
    assert lst[name]["count"] == 0, lst[name]

    other = others[0]
    msg = re.escape(INCONSISTENT % name)
    for args in (["--clear", F, name], ["--enable", F, name], ["--disable", F, name],
                 ["--merge", other, F, name], ["--merge", name, F, other],
                 ["--add", F, name]):
        same_error(img, args)
    before = L.file_bytes(img)
    for args in (["--rename", "renamed", img, name], ["--dump", img, name],
                 ["--dump", "--output=json", img, name], ["--sha256", img, name],
                 ["--count", img, name], ["--diff", other, img, name],
                 ["--diff", name, img, other]):
        res = L.cbt_rc("bitmap", *args)
        assert res.rc != 0, "cbt bitmap %s accepted an inconsistent bitmap: %r" % (args, res)
        assert re.search(msg, res.err), "cbt bitmap %s: %r" % (args, res)
        assert L.file_bytes(img) == before, "cbt bitmap %s changed the image" % args

    keep = L.qemu_bitmap_extents(img, others)
    q, c = twins(img)
    qemu_img("bitmap", "--remove", q, name)
    L.cbt_ok("bitmap", "--remove", c, name)
    L.qemu_check_clean(c)
    assert L.qemu_bitmaps(c) == L.qemu_bitmaps(q)
    assert name not in [b["name"] for b in L.qemu_bitmaps(c)]
    after = L.qemu_bitmap_extents(c, others)
    assert after == keep, "removing %r changed the other bitmaps" % name


def test_inconsistent_after_sigkill(tmp):
    img = make_image(tmp)
    dis_before = L.qemu_bitmap_extents(img, ["b"])["b"]
    kill_cbt_writer(img)
    res = qemu_img("check", "--output=json", "-f", "qcow2", img, check=False)
    assert res.rc in (0, 3) and res.json().get("corruptions", 0) == 0, res
    flags = {b["name"]: b["flags"] for b in L.qemu_bitmaps(img)}
    # the recording bitmaps were in use when the writer died
    assert "in-use" in flags["a"] and "in-use" in flags["c"], flags
    # a disabled bitmap may be left in use (QEMU does) or stay consistent,
    # but then its bits must not have changed
    others = ["fresh"]
    if "in-use" not in flags["b"]:
        assert L.qemu_bitmap_extents(img, ["b"])["b"] == dis_before
        others.append("b")
    # leaks a killed writer may leave are not this test's subject
    qemu_img("check", "-r", "leaks", "-f", "qcow2", img, check=False)
    qemu_img("bitmap", "--add", img, "fresh")
    qemu_io("-f", "qcow2", "-c", "write 0 1", img)
    check_inconsistent(img, "a", others)


def test_inconsistent_set_by_hand(tmp):
    img = make_image(tmp)
    L.set_bitmap_flags(img, "c", L.BME_FLAG_IN_USE | L.BME_FLAG_AUTO)
    L.qemu_check_clean(img)
    check_inconsistent(img, "c", ["a", "b"])


def test_inconsistent_disabled_by_hand(tmp):
    img = make_image(tmp)
    L.set_bitmap_flags(img, "b", L.BME_FLAG_IN_USE)
    check_inconsistent(img, "b", ["a", "c"])


def test_inconsistent_kept_by_cbt_io(tmp):
    """Writing through cbt io leaves an inconsistent bitmap in use (QEMU
    keeps it until removed) and still dirties the others."""
    img = make_image(tmp)
    L.set_bitmap_flags(img, "c", L.BME_FLAG_IN_USE | L.BME_FLAG_AUTO)
    q, c = twins(img)
    qemu_io("-f", "qcow2", "-c", "write -P 4 3500000 70000", q)
    L.cbt_ok("io", "-f", "qcow2", "-c", "write -P 4 3500000 70000", c)
    L.qemu_check_clean(c)
    assert L.qemu_bitmaps(c) == L.qemu_bitmaps(q)
    assert L.qemu_bitmap_extents(c, ["a", "b"]) == L.qemu_bitmap_extents(q, ["a", "b"])


# ---- atomicity ----

ATOMIC = {
    # args, what qemu-img's copy shows after its first two actions
    "add-clear-merge-missing": (["--add", "-g", 4096, "--clear", "--merge", "nosuch", F, "new"],
                                lambda bm: "new" in bm),
    "clear-disable-add-duplicate": (["--clear", "--disable", "--add", F, "a"],
                                    lambda bm: bm["a"] == []),
    "disable-remove-add-bad-granularity": (["--disable", "--remove", "--add", "-g", 1000, F, "a"],
                                           lambda bm: "a" not in bm),
    "merge-enable-merge-missing": (["--merge", "a", "--enable", "--merge", "nosuch", F, "b"],
                                   lambda bm: bm["b"] == ["auto"]),
    "b-disable-merge-merge-missing": (["--disable", "--merge", "o1", "--merge", "nosuch",
                                       "-b", "OTHER", "-F", "qcow2", F, "a"],
                                      lambda bm: bm["a"] == []),
}


@pytest.mark.parametrize("case", list(ATOMIC))
def test_third_action_fails_nothing_changes(tmp, case):
    img = make_image(tmp)
    other = other_file(tmp)
    args, qemu_partial = ATOMIC[case]
    args = [other if a == "OTHER" else a for a in args]
    rq, q = same_error(img, args)
    bm = {b["name"]: b["flags"] for b in L.qemu_bitmaps(q)}
    assert qemu_partial(bm), "qemu-img did not apply the first actions (test premise): %s" % bm


# ---- read-only views ----

def test_read_only_views_leave_file_identical(tmp):
    img = make_image(tmp)
    before = L.file_bytes(img)
    views = [
        ["bitmap", "--list", img], ["bitmap", "--list", "--output=json", img],
        ["bitmap", "--dump", img, "a"], ["bitmap", "--dump", "--output=json", img, "c"],
        ["bitmap", "--count", img, "a"], ["bitmap", "--sha256", img, "b"],
        ["bitmap", "--diff", "b", img, "a"],
        ["info", img], ["info", "--output=json", img], ["check", img],
        ["check", "--output=json", img], ["map", "--output=json", img],
        ["io", "-r", "-f", "qcow2", "-c", "read 0 65536", img],
    ]
    for v in views:
        L.cbt_ok(*v)
        assert L.file_bytes(img) == before, "cbt %s changed the image" % " ".join(v)


# ---- digests ----

@pytest.mark.parametrize("gran", [512, 4096, 65536, 1 << 20, 1 << 31])
def test_sha256_matches_bit_stream(tmp, gran):
    img = os.path.join(str(tmp), "s.qcow2")
    size = 3 * MiB + 1536
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, size)
    qemu_img("bitmap", "--add", "-g", gran, img, "x")
    nbits = -(-size // gran)
    empty = L.cbt_sha256(img, "x")
    assert empty == hashlib.sha256(bytes(-(-nbits // 8))).hexdigest(), "sha256 of an empty bitmap"
    qemu_io("-f", "qcow2", "-c", "write 700000 3", "-c", "write -z %d 1" % (size - 1), img)
    got = L.cbt_sha256(img, "x")
    ext = L.cbt_dump(img, "x")
    assert L.ext_coalesce(L.qemu_bitmap_extents(img, ["x"])["x"]) == ext
    assert got == L.bitmap_sha256(L.bits_from_extents(ext, gran), gran, size)
    assert got != empty
    # one more granule
    clean = next(e for e in ext if not e["dirty"]) if any(not e["dirty"] for e in ext) else None
    if clean is None:
        return      # one-bit bitmap, already all dirty
    L.cbt_ok("io", "-f", "qcow2", "-c", "write %d 1" % clean["start"], img)
    ext2 = L.cbt_dump(img, "x")
    got2 = L.cbt_sha256(img, "x")
    assert got2 != got, "sha256 did not change with one more dirty granule"
    assert got2 == L.bitmap_sha256(L.bits_from_extents(ext2, gran), gran, size)
    assert L.cbt_json("bitmap", "--sha256", "--output=json", img, "x") == {"sha256": got2}
    assert L.cbt_json("bitmap", "--count", "--output=json", img, "x") == {
        "count": L.dirty_count(ext2, gran)}
    b1, b2 = L.bits_from_extents(ext, gran), L.bits_from_extents(ext2, gran)
    assert b2 ^ b1 == 1 << (clean["start"] // gran), "not exactly one new granule"


def test_diff_is_set_difference(tmp):
    img = make_image(tmp)
    L.cbt_ok("bitmap", "--add", "-g", 1 << 20, img, "big")
    L.cbt_ok("io", "-f", "qcow2", "-c", "write 2050000 10", "-c", "write 70000 1", img)
    size = SIZE
    dumps = {n: L.cbt_dump(img, n) for n in ("a", "b", "c", "big")}
    for x, y in (("a", "b"), ("b", "a"), ("a", "c"), ("c", "a"), ("c", "big"),
                 ("big", "c"), ("a", "a")):
        res = L.cbt_json("bitmap", "--diff", y, "--output=json", img, x)
        got = L.ext_normalize(res)
        want = range_difference(L.dirty_ranges(dumps[x]), L.dirty_ranges(dumps[y]))
        assert merged(L.dirty_ranges(got)) == want, \
            "--diff %s FILE %s: dirty %s, expected %s" % (y, x, L.dirty_ranges(got), want)
        if any(not e["dirty"] for e in got):     # extents covering the disk
            L.ext_check_cover(L.ext_coalesce(got), size, "--diff extents")
        if any("only-in" in e for e in res):     # the other direction, when shown
            other = merged([(e["start"], e["start"] + e["length"]) for e in res
                            if e.get("only-in") == "other"])
            want2 = range_difference(L.dirty_ranges(dumps[y]), L.dirty_ranges(dumps[x]))
            assert other == want2, "--diff %s FILE %s: only in %s: %s, expected %s" % (
                y, x, y, other, want2)
    assert any(range_difference(L.dirty_ranges(dumps["a"]), L.dirty_ranges(dumps["b"]))), \
        "test premise: a and b differ"


def merged(ranges):
    out = []
    for s, e in sorted(ranges):
        if out and out[-1][1] >= s:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def range_difference(a, b):
    """Byte ranges in a and not in b."""
    out = []
    b = merged(b)
    for s, e in merged(a):
        pos = s
        for bs, be in b:
            if be <= pos or bs >= e:
                continue
            if bs > pos:
                out.append((pos, bs))
            pos = max(pos, be)
        if pos < e:
            out.append((pos, e))
    return merged(out)


# ---- rename ----

@pytest.mark.parametrize("new", ["b", "", "r" * 1024], ids=["taken", "empty", "1024-bytes"])
def test_rename_refused(tmp, new):
    img = make_image(tmp)
    before = L.file_bytes(img)
    res = L.cbt_rc("bitmap", "--rename", new, img, "a")
    assert res.rc != 0, "cbt bitmap --rename %r accepted: %r" % (new[:20], res)
    assert res.err.strip(), "no message"
    assert L.file_bytes(img) == before


def test_rename_missing(tmp):
    img = make_image(tmp)
    before = L.file_bytes(img)
    res = L.cbt_rc("bitmap", "--rename", "x", img, "nosuch")
    assert res.rc == 1 and "Dirty bitmap 'nosuch' not found" in res.err, res
    assert L.file_bytes(img) == before


# ---- autoclear bit cleared by a program without bitmap support ----

def test_autoclear_cleared_bitmaps_ignored_and_reclaimed(tmp):
    img = make_image(tmp)
    q = L.Qcow2(img)
    assert q.autoclear_features & 1
    q.set_header("autoclear_features", q.autoclear_features & ~1)
    qc, c = twins(img)

    # QEMU ignores the bitmaps
    assert L.qemu_bitmaps(qc) == []
    rq, dq, _ = L.qemu_check(qc)
    assert rq == 3 and dq["leaks"] > 0 and dq.get("corruptions", 0) == 0, dq
    # cbt too, with a warning
    res = L.cbt_ok("info", "--output=json", c)
    assert "bitmap" in res.err.lower(), "no warning from cbt info: %r" % res
    assert res.json().get("format-specific", {}).get("data", {}).get("bitmaps", []) == []
    lst = L.cbt_ok("bitmap", "--list", "--output=json", c)
    assert "bitmap" in lst.err.lower(), "no warning from cbt bitmap --list: %r" % lst
    assert lst.out.strip() and L.cbt_bitmap_list(c) == []
    r = L.cbt_rc("bitmap", "--dump", c, "a")
    assert r.rc == 1 and "Dirty bitmap 'a' not found" in r.err, r
    chk = L.cbt_rc("check", "--output=json", c)
    assert chk.rc == 3 and chk.json()["leaks"] == dq["leaks"], (chk, dq)

    # repair: the clusters come back, the extension is gone
    L.cbt_ok("check", "-r", "leaks", c)
    L.qemu_check_clean(c)
    assert not [e for e in L.header_extensions(c) if e[0] == L.BITMAPS_EXT]
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", img, c, check=False).rc == 0
    qemu_img("check", "-r", "leaks", "-f", "qcow2", qc)
    assert L.qemu_bitmaps(c) == L.qemu_bitmaps(qc) == []
    # and the image takes bitmaps again
    L.cbt_ok("bitmap", "--add", c, "fresh")
    L.qemu_check_clean(c)
    assert [b["name"] for b in L.qemu_bitmaps(c)] == ["fresh"]
