"""cbt checkpoint: create, list, show, delete, reconcile (issue 5 §1).

Checked here, with QEMU's tools as oracles where they apply:
  * create/list/show: order, parent, creation time, size and granularity at
    creation, dirty bytes since (union over the chain), health, disk id; the
    bitmap is a real persistent recording bitmap qemu-img sees;
  * names: empty, over-long, duplicate, clashing with a bitmap of any layer
    are refused with a clear message and the files stay byte-identical; so
    does a create whose metadata does not fit in the header (512-byte
    clusters): bitmap and metadata land together or not at all;
  * delete: relinks the children, removes the bitmap in every layer, a
    missing checkpoint is a warning with exit 0, a vanished or inconsistent
    bitmap never blocks it;
  * copies carry checkpoints (cp), cbt snapshot moves them to the overlay,
    cbt convert --bitmaps copies them (not those whose bitmap
    --skip-broken-bitmaps left behind);
  * drift: a bitmap removed behind cbt's back, metadata whose bitmap is only
    below the top, an inconsistent bitmap after SIGKILL, a replaced bitmap
    (other granularity), bitmaps without metadata, corrupt metadata:
    reconcile explains, --fix repairs, then list is healthy;
  * usage errors.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time

import pytest

from conftest import CBT, cbt, qemu_check_clean, qemu_img, qemu_io

KiB = 1024
MiB = 1024 * 1024
EXT_TYPE = 0x63627463


# ---- helpers ----

def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_disk(tmp, name="disk.qcow2", size="64M", opts=None):
    path = str(tmp / name)
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    qemu_img(*args, path, size)
    return path


def ck_list(path):
    return cbt("checkpoint", "list", "--output=json", path).json()


def names(path):
    return [c["name"] for c in ck_list(path)["checkpoints"]]


def by_name(path):
    return {c["name"]: c for c in ck_list(path)["checkpoints"]}


def reconcile(path, fix=False):
    args = ["checkpoint", "reconcile", "--output=json"]
    if fix:
        args.append("--fix")
    return cbt(*args, path).json()


def qemu_bitmaps(path):
    info = json.loads(qemu_img("info", "--output=json", "-U", path).out)
    bms = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: (b["granularity"], sorted(b["flags"])) for b in bms}


def header_ext(path, want=EXT_TYPE):
    """(data offset, length) of header extension `want` of a v3 image."""
    with open(path, "rb") as f:
        hdr = f.read(65536)
    hlen = struct.unpack(">I", hdr[100:104])[0]
    off = hlen
    while off + 8 <= len(hdr):
        t, n = struct.unpack(">II", hdr[off:off + 8])
        if t == 0:
            break
        if t == want:
            return off + 8, n
        off += 8 + (n + 7) // 8 * 8
    return None


def set_bitmap_in_use(path, name):
    """Set the in_use flag of bitmap `name` in the directory (offline)."""
    with open(path, "r+b") as f:
        hdr = f.read(65536)
        hlen = struct.unpack(">I", hdr[100:104])[0]
        off = hlen
        while True:
            t, n = struct.unpack(">II", hdr[off:off + 8])
            assert t != 0, "no bitmaps extension"
            if t == 0x23852875:
                nb, _, dsize, doff = struct.unpack(">IIQQ", hdr[off + 8:off + 32])
                break
            off += 8 + (n + 7) // 8 * 8
        f.seek(doff)
        d = f.read(dsize)
        pos = 0
        for _ in range(nb):
            _, _, flags, _, _, nsize, xsize = struct.unpack_from(">QIIBBHI", d, pos)
            nm = d[pos + 24 + xsize:pos + 24 + xsize + nsize].decode()
            if nm == name:
                f.seek(doff + pos + 12)
                f.write(struct.pack(">I", flags | 1))
                return
            pos += (24 + nsize + xsize + 7) // 8 * 8
    raise AssertionError("bitmap %s not found" % name)


def sigkill_after_write(path):
    """Write through `cbt io` and SIGKILL it before it closes: the
    recording bitmaps stay in_use on disk (inconsistent)."""
    proc = subprocess.Popen([CBT, "io", "-f", "qcow2", path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        proc.stdin.write("write -P 7 0 64k\nflush\nread 0 1\n")
        proc.stdin.flush()
        seen = []
        while True:
            line = proc.stdout.readline()
            assert line, "cbt io ended early: %r %s" % (seen, proc.stderr.read())
            seen.append(line)
            if line.startswith("read 1/1"):
                break
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def expect_fail(args, pattern, files=()):
    """cbt fails with a one-line message matching pattern; files unchanged."""
    before = {f: digest(f) for f in files}
    res = cbt(*args, check=False)
    assert res.rc == 1, res
    assert re.search(pattern, res.err), res
    assert "Sanitizer" not in res.err and "runtime error" not in res.err, res
    for f in files:
        assert digest(f) == before[f], "%s changed by a failing command" % f
    return res


UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


# ---- create, list, show ----

def test_create_list_show(tmp):
    d = make_disk(tmp)
    t0 = time.time()
    cbt("checkpoint", "create", d, "c1")
    qemu_io("-c", "write -P 1 0 1M", d)
    cbt("checkpoint", "create", "-g", "1M", d, "c2")
    qemu_io("-c", "write -P 2 4M 64k", d)
    t1 = time.time()

    data = ck_list(d)
    assert UUID_RE.match(data["disk-id"]), data
    c1, c2 = data["checkpoints"]
    assert (c1["order"], c1["name"], c1["parent"]) == (1, "c1", None)
    assert (c2["order"], c2["name"], c2["parent"]) == (2, "c2", "c1")
    for c in (c1, c2):
        assert t0 - 1 <= c["created-sec"] <= t1 + 1, c
        assert 0 <= c["created-nsec"] < 10**9
        assert c["created"].endswith("Z") and c["created"].startswith(
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(c["created-sec"])))
        assert c["virtual-size"] == 64 * MiB
        assert c["usable"] is True and c["problem"] is None, c
    assert c1["granularity"] == 64 * KiB and c2["granularity"] == MiB
    assert c1["dirty-bytes"] == MiB + 64 * KiB     # both writes
    assert c2["dirty-bytes"] == MiB                # the second, 1 MiB granules

    # The bitmaps are ordinary recording persistent bitmaps to QEMU.
    assert qemu_bitmaps(d) == {"c1": (64 * KiB, ["auto"]), "c2": (MiB, ["auto"])}
    qemu_check_clean(d)

    human = cbt("checkpoint", "list", d).out.splitlines()
    assert re.match(r"\s*ORDER\s+NAME\s+CREATED\s+PARENT\s+SIZE\s+GRANULARITY\s+DIRTY\s+HEALTH$",
                    human[0]), human
    assert re.match(r"\s*1\s+c1\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d\s+-\s+64 MiB\s+"
                    r"64 KiB\s+1\.06 MiB\s+ok$", human[1]), human
    assert re.match(r"\s*2\s+c2\s+\S+\s+c1\s+64 MiB\s+1 MiB\s+1 MiB\s+ok$", human[2]), human
    assert len(human) == 3

    show = cbt("checkpoint", "show", "--output=json", d, "c2").json()
    assert show["disk-id"] == data["disk-id"]
    del show["disk-id"]
    assert show == c2
    text = cbt("checkpoint", "show", d, "c1").out
    assert re.search(r"^name:\s+c1$", text, re.M), text
    assert re.search(r"^parent:\s+-$", text, re.M), text
    assert re.search(r"^dirty since:\s+1\.06 MiB \(1114112 bytes\)$", text, re.M), text
    assert re.search(r"^health:\s+ok$", text, re.M), text
    assert re.search(r"^disk id:\s+%s$" % data["disk-id"], text, re.M), text

    expect_fail(["checkpoint", "show", d, "nope"], r"disk\.qcow2: no checkpoint named 'nope'")
    # No checkpoints: empty list, no disk id.
    e = make_disk(tmp, "empty.qcow2")
    assert ck_list(e) == {"disk-id": None, "checkpoints": []}
    assert cbt("checkpoint", "list", e).out == ""


def test_orders_never_reused(tmp):
    d = make_disk(tmp)
    for n in ("a", "b", "c"):
        cbt("checkpoint", "create", d, n)
    cbt("checkpoint", "delete", d, "c")
    cbt("checkpoint", "create", d, "c")
    got = [(c["name"], c["order"], c["parent"]) for c in ck_list(d)["checkpoints"]]
    assert got == [("a", 1, None), ("b", 2, "a"), ("c", 4, "b")]


# ---- names and atomicity ----

def test_name_errors_leave_files_unchanged(tmp):
    base = make_disk(tmp, "base.qcow2")
    qemu_img("bitmap", "--add", base, "lower")
    top = str(tmp / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    cbt("checkpoint", "create", top, "c1")
    qemu_img("bitmap", "--add", top, "plain")
    files = (base, top)
    expect_fail(["checkpoint", "create", top, ""], r"top\.qcow2: a checkpoint name must not be empty",
                files)
    expect_fail(["checkpoint", "create", top, "x" * 1024],
                r"top\.qcow2: checkpoint name is 1024 bytes long, at most 1023", files)
    expect_fail(["checkpoint", "create", top, "c1"], r"top\.qcow2: checkpoint 'c1' already exists",
                files)
    expect_fail(["checkpoint", "create", top, "plain"],
                r"top\.qcow2: a bitmap named 'plain' already exists in layer '.*top\.qcow2' "
                r"\(depth 0\)", files)
    expect_fail(["checkpoint", "create", top, "lower"],
                r"top\.qcow2: a bitmap named 'lower' already exists in layer '.*base\.qcow2' "
                r"\(depth 1\)", files)
    expect_fail(["checkpoint", "create", "-g", "3k", top, "g"], r"[Gg]ranularity", files)
    expect_fail(["checkpoint", "delete", top, ""], r"must not be empty", files)
    # The longest name is fine.
    cbt("checkpoint", "create", top, "n" * 1023)
    assert names(top) == ["c1", "n" * 1023]
    qemu_check_clean(top)
    qemu_check_clean(base)


def test_raw_disk_refused(tmp):
    raw = str(tmp / "disk.raw")
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    expect_fail(["checkpoint", "create", raw, "c1"], r"disk\.raw: checkpoints need a qcow2 disk",
                [raw])
    assert ck_list(raw) == {"disk-id": None, "checkpoints": []}


def test_header_full_is_all_or_nothing(tmp):
    """With 512-byte clusters the header holds a few checkpoints only; the
    create that would overflow it changes nothing (not even the bitmap)."""
    d = make_disk(tmp, opts="cluster_size=512", size="16M")
    # The very first one: the bitmaps extension must fit too.
    expect_fail(["checkpoint", "create", d, "n" * 330],
                r"disk\.qcow2: the checkpoint metadata \(\d+ bytes for 1 checkpoint\) does not "
                r"fit in the image header \(one cluster of 512 bytes\)", [d])
    assert qemu_bitmaps(d) == {}
    made = []
    for i in range(40):
        name = "checkpoint-%02d-%s" % (i, "x" * 16)
        res = cbt("checkpoint", "create", d, name, check=False)
        if res.rc != 0:
            break
        made.append(name)
    else:
        pytest.fail("the header never filled up")
    assert len(made) >= 2
    res = expect_fail(["checkpoint", "create", d, "one-more-%s" % ("y" * 16)],
                      r"does not fit in the image header.*delete old checkpoints", [d])
    assert "\n" not in res.err.strip()
    assert names(d) == made
    assert sorted(qemu_bitmaps(d)) == sorted(made)
    qemu_check_clean(d)
    # Deleting makes room again.
    cbt("checkpoint", "delete", d, made[0])
    cbt("checkpoint", "create", d, "one-more-%s" % ("y" * 16))
    assert names(d) == made[1:] + ["one-more-%s" % ("y" * 16)]
    qemu_check_clean(d)


# ---- delete ----

def test_delete(tmp):
    d = make_disk(tmp)
    for n in ("a", "b", "c"):
        cbt("checkpoint", "create", d, n)
    cbt("checkpoint", "delete", d, "b")
    got = by_name(d)
    assert list(got) == ["a", "c"] and got["c"]["parent"] == "a"
    assert sorted(qemu_bitmaps(d)) == ["a", "c"]
    res = cbt("checkpoint", "delete", d, "b")
    assert re.search(r"warning: .*disk\.qcow2: no checkpoint named 'b'", res.err), res
    assert res.out == ""
    # The bitmap vanished behind cbt's back: delete still works.
    qemu_img("bitmap", "--remove", d, "a")
    res = cbt("checkpoint", "delete", d, "a")
    assert "warning" not in res.err, res
    got = by_name(d)
    assert list(got) == ["c"] and got["c"]["parent"] is None and got["c"]["usable"]
    # A bitmap of that name without metadata is removed too.
    qemu_img("bitmap", "--add", d, "orphan")
    res = cbt("checkpoint", "delete", d, "orphan")
    assert "warning" in res.err
    assert sorted(qemu_bitmaps(d)) == ["c"]
    qemu_check_clean(d)


def test_delete_every_layer_and_inconsistent(tmp):
    base = make_disk(tmp, "base.qcow2")
    cbt("checkpoint", "create", base, "a")
    cbt("checkpoint", "create", base, "b")
    top = str(tmp / "top.qcow2")
    cbt("snapshot", base, top)
    assert sorted(qemu_bitmaps(base)) == ["a", "b"] and sorted(qemu_bitmaps(top)) == ["a", "b"]
    # b's copy in the (read-only) base is inconsistent: delete removes it all.
    set_bitmap_in_use(base, "b")
    assert by_name(top)["b"]["usable"] is False
    cbt("checkpoint", "delete", top, "b")
    assert sorted(qemu_bitmaps(base)) == ["a"] and sorted(qemu_bitmaps(top)) == ["a"]
    cbt("checkpoint", "delete", top, "a")
    assert qemu_bitmaps(base) == {} and qemu_bitmaps(top) == {}
    assert names(top) == []
    for f in (base, top):
        qemu_check_clean(f)
    # A full restart from scratch is never blocked.
    cbt("checkpoint", "create", top, "a")
    assert by_name(top)["a"]["usable"]


# ---- propagation ----

def test_copy_snapshot_convert_carry_checkpoints(tmp):
    d = make_disk(tmp)
    cbt("checkpoint", "create", d, "c1")
    qemu_io("-c", "write -P 1 0 128k", d)
    cbt("checkpoint", "create", d, "c2")
    qemu_io("-c", "write -P 2 1M 64k", d)
    before = ck_list(d)

    cp = str(tmp / "copy.qcow2")
    shutil.copyfile(d, cp)
    assert ck_list(cp) == before

    ov = str(tmp / "ov.qcow2")
    cbt("snapshot", d, ov)
    after = ck_list(ov)
    assert after == before                   # union over the chain
    qemu_io("-c", "write -P 3 2M 64k", ov)
    got = by_name(ov)
    assert got["c1"]["dirty-bytes"] == 256 * KiB and got["c2"]["dirty-bytes"] == 128 * KiB
    cbt("checkpoint", "create", ov, "c3")
    assert names(ov) == ["c1", "c2", "c3"] and by_name(ov)["c3"]["parent"] == "c2"
    assert names(d) == ["c1", "c2"]          # the old top keeps its own

    out = str(tmp / "out.qcow2")
    cbt("convert", "--bitmaps", "-O", "qcow2", ov, out)
    conv = ck_list(out)
    assert conv["disk-id"] == before["disk-id"]
    assert [(c["name"], c["order"], c["parent"], c["usable"], c["dirty-bytes"])
            for c in conv["checkpoints"]] == \
        [(c["name"], c["order"], c["parent"], c["usable"], c["dirty-bytes"])
         for c in ck_list(ov)["checkpoints"]]
    # Without --bitmaps nothing follows (no metadata without its bitmaps).
    plain = str(tmp / "plain.qcow2")
    cbt("convert", "-O", "qcow2", ov, plain)
    assert ck_list(plain) == {"disk-id": None, "checkpoints": []}
    # --no-bitmaps overlays are scratch: no metadata of their own; listed,
    # they show the chain's checkpoints, none usable (writes to the
    # overlay are not tracked).
    scratch = str(tmp / "scratch.qcow2")
    cbt("snapshot", "--no-bitmaps", ov, scratch)
    assert header_ext(scratch) is None
    assert names(scratch) == ["c1", "c2", "c3"]
    assert not any(c["usable"] for c in ck_list(scratch)["checkpoints"])
    for f in (d, cp, ov, out, plain):
        qemu_check_clean(f)


def test_convert_skip_broken_leaves_its_checkpoint(tmp):
    """convert --bitmaps --skip-broken-bitmaps: the skipped bitmap's
    checkpoint does not travel without it; its child gets its parent."""
    d = make_disk(tmp)
    for i, name in enumerate(("c1", "c2", "c3")):
        cbt("checkpoint", "create", d, name)
        qemu_io("-c", "write -P %d %dM 64k" % (i + 1, i), d)
    set_bitmap_in_use(d, "c2")
    out = str(tmp / "out.qcow2")
    res = cbt("convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2",
              d, out)
    assert "c2" in res.err
    assert names(out) == ["c1", "c3"]
    got = by_name(out)
    assert got["c3"]["parent"] == "c1" and got["c1"]["parent"] is None
    assert reconcile(out)["drift"] == []
    assert sorted(qemu_bitmaps(out)) == ["c1", "c3"]
    qemu_check_clean(out)


# ---- drift ----

def kinds(rec):
    return [(i["kind"], i["name"], i["fixed"]) for i in rec["drift"]]


def test_reconcile_bitmap_removed_behind_back(tmp):
    d = make_disk(tmp)
    for n in ("a", "b", "c"):
        cbt("checkpoint", "create", d, n)
    assert reconcile(d) == {"fix": False, "drift": []}
    assert "No drift" in cbt("checkpoint", "reconcile", d).out
    qemu_img("bitmap", "--remove", d, "b")
    lst = by_name(d)
    assert lst["b"]["usable"] is False and lst["b"]["dirty-bytes"] is None
    assert "no layer holds its bitmap" in lst["b"]["problem"]
    human = cbt("checkpoint", "list", d).out
    assert re.search(r"\bb\b.*BROKEN", human) and "b: no layer holds its bitmap" in human
    before = digest(d)
    rec = reconcile(d)
    assert digest(d) == before
    assert kinds(rec) == [("metadata-without-bitmap", "b", False)]
    item = rec["drift"][0]
    assert "checkpoint 'b'" in item["explanation"] and "full" in item["fix"]
    text = cbt("checkpoint", "reconcile", d).out
    assert "metadata-without-bitmap: checkpoint 'b'" in text and "run with --fix" in text
    rec = reconcile(d, fix=True)
    assert kinds(rec) == [("metadata-without-bitmap", "b", True)]
    got = by_name(d)
    assert list(got) == ["a", "c"] and got["c"]["parent"] == "a"
    assert all(c["usable"] for c in got.values())
    assert reconcile(d)["drift"] == []
    qemu_check_clean(d)


def test_reconcile_bitmap_only_below_top(tmp):
    base = make_disk(tmp, "base.qcow2")
    cbt("checkpoint", "create", base, "a")
    top = str(tmp / "top.qcow2")
    cbt("snapshot", base, top)
    qemu_img("bitmap", "--remove", top, "a")
    rec = reconcile(top)
    assert kinds(rec) == [("metadata-without-bitmap", "a", False)]
    assert "not-in-top" in rec["drift"][0]["explanation"]
    reconcile(top, fix=True)
    assert names(top) == [] and qemu_bitmaps(base) == {}
    assert reconcile(top)["drift"] == []
    qemu_check_clean(base)
    qemu_check_clean(top)


def test_reconcile_inconsistent_after_sigkill(tmp):
    d = make_disk(tmp)
    cbt("checkpoint", "create", d, "a")
    cbt("checkpoint", "create", d, "b")
    sigkill_after_write(d)
    flags = qemu_bitmaps(d)
    assert flags["a"][1] == ["auto", "in-use"] and flags["b"][1] == ["auto", "in-use"], flags
    lst = by_name(d)
    assert not lst["a"]["usable"] and "inconsistent" in lst["a"]["problem"]
    rec = reconcile(d)
    assert kinds(rec) == [("bitmap-unusable", "a", False), ("bitmap-unusable", "b", False)]
    assert "found in use" in rec["drift"][0]["explanation"]
    rec = reconcile(d, fix=True)
    assert [i["fixed"] for i in rec["drift"]] == [True, True]
    assert names(d) == [] and qemu_bitmaps(d) == {}
    assert reconcile(d)["drift"] == []
    res = qemu_img("check", d, check=False)
    assert res.rc in (0, 3), res            # leaks from the killed writer are allowed
    # The next checkpoint (a full backup's) is not blocked; orders go on.
    cbt("checkpoint", "create", d, "a")
    assert [(c["name"], c["order"], c["usable"]) for c in ck_list(d)["checkpoints"]] == \
        [("a", 3, True)]


def test_reconcile_adopt_mismatch_disabled(tmp):
    d = make_disk(tmp)
    cbt("checkpoint", "create", d, "keep")
    cbt("checkpoint", "create", d, "replaced")
    qemu_img("bitmap", "--remove", d, "replaced")
    qemu_img("bitmap", "--add", "-g", "128k", d, "replaced")
    qemu_img("bitmap", "--add", d, "foreign")
    qemu_img("bitmap", "--add", "--disable", d, "off")
    rec = reconcile(d)
    assert kinds(rec) == [("mismatch", "replaced", False),
                          ("bitmap-without-metadata", "foreign", False),
                          ("bitmap-without-metadata", "off", False)]
    assert "granularity 131072" in rec["drift"][0]["explanation"]
    assert "adopt" in rec["drift"][1]["fix"]
    assert "disabled" in rec["drift"][2]["explanation"] and rec["drift"][2]["fix"].startswith("none")
    rec = reconcile(d, fix=True)
    assert kinds(rec) == [("mismatch", "replaced", True),
                          ("bitmap-without-metadata", "foreign", True),
                          ("bitmap-without-metadata", "off", False)]
    got = ck_list(d)["checkpoints"]
    assert [(c["name"], c["order"], c["parent"], c["usable"]) for c in got] == \
        [("keep", 1, None, True), ("foreign", 3, "keep", True)]
    assert sorted(qemu_bitmaps(d)) == ["foreign", "keep", "off"]
    # What cannot be fixed stays reported.
    assert kinds(reconcile(d)) == [("bitmap-without-metadata", "off", False)]
    qemu_check_clean(d)


def test_corrupt_metadata(tmp):
    d = make_disk(tmp)
    cbt("checkpoint", "create", d, "a")
    cbt("checkpoint", "create", d, "b")
    old_id = ck_list(d)["disk-id"]
    off, n = header_ext(d)
    with open(d, "r+b") as f:
        f.seek(off + 45)                       # inside the first record
        b = f.read(1)
        f.seek(off + 45)
        f.write(bytes([b[0] ^ 0x10]))
    for args in (["list", d], ["show", d, "a"], ["create", d, "c"], ["delete", d, "a"]):
        res = expect_fail(["checkpoint"] + args,
                          r"^cbt: .*disk\.qcow2: the checkpoint metadata \(qcow2 header extension "
                          r"0x63627463\) is corrupt: checksum mismatch", [d])
        assert len(res.err.strip().splitlines()) == 1, res
    rec = reconcile(d)
    assert kinds(rec) == [("metadata-corrupt", "", False),
                          ("bitmap-without-metadata", "a", False),
                          ("bitmap-without-metadata", "b", False)]
    reconcile(d, fix=True)
    lst = ck_list(d)
    assert lst["disk-id"] != old_id and UUID_RE.match(lst["disk-id"])
    assert [(c["name"], c["usable"]) for c in lst["checkpoints"]] == [("a", True), ("b", True)]
    qemu_check_clean(d)
    # Other broken encodings: truncated, unknown version.
    for mutate, why in ((lambda x: x[:30], r"shorter than its 40-byte header"),
                        (lambda x: b"\x00\x09" + x[2:], r"version 9 \(this cbt reads version 1\)")):
        e = make_disk(tmp, "e.qcow2")
        cbt("checkpoint", "create", e, "a")
        off, n = header_ext(e)
        with open(e, "r+b") as f:
            f.seek(off)
            data = f.read(n)
            new = mutate(data)
            f.seek(off - 4)
            f.write(struct.pack(">I", len(new)) + new)
        expect_fail(["checkpoint", "list", e], why, [e])
        os.unlink(e)


# ---- usage ----

@pytest.mark.parametrize("args,pattern", [
    ([], r"Expecting a subcommand"),
    (["frobnicate", "d"], r"unknown subcommand 'frobnicate'"),
    (["create", "d"], r"create: expecting DISK and NAME"),
    (["list"], r"list: expecting DISK"),
    (["list", "d", "x"], r"list: unexpected argument 'x'"),
    (["list", "--fix", "d"], r"--fix is only supported with reconcile"),
    (["show", "-g", "64k", "d", "x"], r"-g is only supported with create"),
    (["delete", "--output=json", "d", "x"], r"--output is only supported with"),
    (["list", "--output=xml", "d"], r"xml"),
    (["create", "-g", "bogus", "d", "x"], r"invalid granularity"),
])
def test_usage_errors(tmp, args, pattern):
    res = cbt("checkpoint", *args, check=False)
    assert res.rc == 64, res
    assert re.search(pattern, res.err), res
    assert "cbt checkpoint --help" in res.err


def test_help_and_missing_file(tmp):
    out = cbt("checkpoint", "--help").out
    assert "Usage: cbt checkpoint create" in out and "Examples:" in out
    assert cbt("help", "checkpoint").out == out
    expect_fail(["checkpoint", "list", str(tmp / "nope.qcow2")], r"nope\.qcow2")
