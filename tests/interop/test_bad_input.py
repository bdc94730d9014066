"""Hostile images: cbt must fail cleanly, never crash or hang.

Each case builds a damaged qcow2 (or chain) with Python, then runs cbt info,
cbt map, cbt io -r and cbt check on it.  Where the case makes QEMU refuse the
image, cbt must refuse it too: non-zero exit below 128, a non-empty stderr
that names the problem, no sanitizer report, within 30 s.

A few cases are accepted by QEMU 7.2 for some commands (it zero-fills short
reads of the L1 table; `qemu-img info` and `qemu-img check` do not open the
backing chain).  There cbt may either refuse cleanly or behave as QEMU does;
what it may never do is crash, hang, or return different data.  Each such
expectation is written next to its case and was checked against QEMU.
"""
import os
import re
import struct

import pytest

import interop_lib as L
from interop_lib import qemu_img, qemu_io

TIMEOUT = 30


def make_base(path, size="4M", opts="", data=True):
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    qemu_img(*(args + [path, size]))
    if data:
        qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 128k", path)
    return L.Qcow2(path)


# ---------------------------------------------------------------------------
# Case builders: each returns the path to open (relative names are resolved in
# the test's directory, which is the cwd for every command).


def case_trunc_header(d):
    q = make_base(os.path.join(d, "full.qcow2"))
    data = q.pread(0, 50)
    with open(os.path.join(d, "img.qcow2"), "wb") as f:
        f.write(data)
    return "img.qcow2"


def case_trunc_l1(d):
    # 64 GiB with 64 KiB clusters: L1 has 128 entries (1 KiB).  Data at 40 GiB
    # puts a live L2 pointer at L1 index 80 (byte 640 of the table); the file
    # is then cut 100 bytes into the L1 table, so the table, the L2 table
    # and the data are all gone.
    path = os.path.join(d, "img.qcow2")
    q = make_base(path, size="64G", data=False)
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 40G 64k", path)
    q = L.Qcow2(path)
    assert q.l1(80) != 0
    os.truncate(path, q.l1_table_offset + 100)
    return "img.qcow2"


def _edit(d, **fields):
    path = os.path.join(d, "img.qcow2")
    q = make_base(path)
    for k, v in fields.items():
        q.set_header(k, v)
    return "img.qcow2"


def case_bad_magic(d):
    path = os.path.join(d, "img.qcow2")
    make_base(path)
    with open(path, "r+b") as f:
        f.write(b"QFI\xfa")
    return "img.qcow2"


def case_version1(d):
    return _edit(d, version=1)


def case_version4(d):
    return _edit(d, version=4)


def case_cluster_bits_8(d):
    return _edit(d, cluster_bits=8)


def case_cluster_bits_22(d):
    return _edit(d, cluster_bits=22)


def case_cluster_bits_63(d):
    return _edit(d, cluster_bits=63)


def case_l1_size_huge(d):
    return _edit(d, l1_size=0xFFFFFFFF)


def case_l1_size_too_small(d):
    # 4 GiB needs 8 L1 entries with 64 KiB clusters; header says 1.
    path = os.path.join(d, "img.qcow2")
    make_base(path, size="4G")
    q = L.Qcow2(path)
    assert q.l1_size == 8
    q.set_header("l1_size", 1)
    return "img.qcow2"


def case_huge_size_tiny_l1(d):
    # 2^60 bytes would need an L1 of 2^60/(64K*8K) = 2^31 entries; it has 1.
    return _edit(d, size=1 << 60)


def case_reftable_past_eof(d):
    return _edit(d, refcount_table_offset=1 << 40)


def case_ext_too_long(d):
    path = os.path.join(d, "img.qcow2")
    q = make_base(path)
    off = q.header_length
    typ, length = struct.unpack(">II", q.pread(off, 8))
    assert typ != 0, "expected a header extension (feature table) after the header"
    q.pwrite(off + 4, struct.pack(">I", 0x10000))  # far past the first cluster
    return "img.qcow2"


def case_unknown_incompat(d):
    return _edit(d, incompatible_features=1 << 10)


def case_backing_name_too_long(d):
    path = os.path.join(d, "img.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, "base.qcow2"), "4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             path, cwd=d)
    q = L.Qcow2(path)
    assert q.backing_file_offset
    q.set_header("backing_file_size", 2000)
    return "img.qcow2"


def case_backing_loop2(d):
    # a -> b -> a
    qemu_img("create", "-q", "-f", "qcow2", "b.qcow2", "4M", cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2",
             "a.qcow2", cwd=d)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2",
             "b.qcow2", cwd=d)
    return "a.qcow2"


def case_backing_loop1(d):
    # a -> a
    qemu_img("create", "-q", "-f", "qcow2", "a.qcow2", "4M", cwd=d)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2",
             "a.qcow2", cwd=d)
    return "a.qcow2"


def case_backing_missing(d):
    qemu_img("create", "-q", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2",
             "-u", "a.qcow2", "4M", cwd=d)
    return "a.qcow2"


def case_snapshots_past_eof(d):
    return _edit(d, nb_snapshots=1, snapshots_offset=1 << 40)


# ---------------------------------------------------------------------------
# Expectations.  For each case: a regex the error message must match (the
# message has to say what is wrong), and per command whether it must fail
# ("fail"), may either fail cleanly or succeed like QEMU ("either"), or may
# fail cleanly or succeed whatever QEMU does ("any").
# Commands: info, chain (info --backing-chain), map, io, check.

F, E, A = "fail", "either", "any"
ALL_FAIL = dict(info=F, chain=F, map=F, io=F, check=F)
# Backing-chain problems.  `check` examines one file: cbt may check it
# without opening the backing chain (qemu-img check refuses to open it), so
# there either outcome is fine ("any"), as long as it is clean.
CHAIN_ONLY = dict(info=E, chain=F, map=F, io=F, check=A)
# QEMU 7.2 reads these (zero-filled short reads); only check objects.
CHECK_ONLY = dict(info=E, chain=E, map=E, io=E, check=F)

CASES = {
    "trunc_header": (case_trunc_header,
                     r"trunc|short|end of file|eof|too small",
                     ALL_FAIL),
    "bad_magic": (case_bad_magic, r"magic|not (a |in )?qcow2", ALL_FAIL),
    "version1": (case_version1, r"version", ALL_FAIL),
    "version4": (case_version4, r"version", ALL_FAIL),
    "cluster_bits_8": (case_cluster_bits_8, r"cluster", ALL_FAIL),
    "cluster_bits_22": (case_cluster_bits_22, r"cluster", ALL_FAIL),
    "cluster_bits_63": (case_cluster_bits_63, r"cluster", ALL_FAIL),
    "l1_size_huge": (case_l1_size_huge, r"l1|L1", ALL_FAIL),
    "l1_size_too_small": (case_l1_size_too_small, r"l1|L1", ALL_FAIL),
    "huge_size_tiny_l1": (case_huge_size_tiny_l1, r"l1|L1|size|too big|too large", ALL_FAIL),
    "reftable_past_eof": (case_reftable_past_eof, r"refcount|reftable", CHECK_ONLY),
    "ext_too_long": (case_ext_too_long, r"extension", ALL_FAIL),
    "unknown_incompat": (case_unknown_incompat, r"feature|incompatible", ALL_FAIL),
    "backing_name_too_long": (case_backing_name_too_long, r"backing", ALL_FAIL),
    "backing_loop2": (case_backing_loop2, r"loop|cycle|recurs|chain|backing", CHAIN_ONLY),
    "backing_loop1": (case_backing_loop1, r"loop|cycle|recurs|chain|backing", CHAIN_ONLY),
    "backing_missing": (case_backing_missing,
                        r"gone\.qcow2|no such file|not found|missing|backing", CHAIN_ONLY),
    "snapshots_past_eof": (case_snapshots_past_eof, r"snapshot", CHECK_ONLY),
    # QEMU zero-fills the missing part of the L1 table and reads zeroes.
    "trunc_l1": (case_trunc_l1, r"l1|L1|trunc|short|end of file|eof",
                 dict(info=E, chain=E, map=E, io=E, check=E)),
}

# Damage where cbt deliberately stops with "check failed" (exit 1) although
# qemu-img reports corruptions (exit 2): the snapshot table cannot be read,
# so its clusters cannot be told from leaks and any repair could free them.
CHECK_REFUSES = {"snapshots_past_eof"}

# QEMU 7.2 itself hangs on these (backing loops are only detected by
# `qemu-img info --backing-chain`), so there is no oracle run for them.
QEMU_HANGS = {(c, cmd) for c in ("backing_loop1", "backing_loop2")
              for cmd in ("map", "io", "check")}

COMMANDS = {
    "info": ["info", "-f", "qcow2", "--output=json"],
    "chain": ["info", "-f", "qcow2", "--backing-chain", "--output=json"],
    "map": ["map", "-f", "qcow2", "--output=json"],
    # 64 KiB at 2 MiB: never written by any builder, so it must read as zeroes
    # (every case image claims at least 4 MiB).
    "io": ["io", "-f", "qcow2", "-r", "-c", "read -P 0 2M 64k"],
    "check": ["check", "-f", "qcow2"],
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for name, (builder, _, _) in CASES.items():
        d = str(tmp_path_factory.mktemp(name))
        out[name] = (d, builder(d))
    return out


def _run_cbt(d, argv):
    res = L.run([L.CBT] + argv, check=False, timeout=TIMEOUT, cwd=d)
    L.no_crash(res, "cbt " + " ".join(argv))
    return res


@pytest.mark.parametrize("cmd", list(COMMANDS))
@pytest.mark.parametrize("name", list(CASES))
def test_bad_image(built, name, cmd):
    d, img = built[name]
    _, pattern, expect = CASES[name]
    argv = COMMANDS[cmd] + [img]
    q = None
    if (name, cmd) not in QEMU_HANGS:
        q = L.run((["qemu-io"] + argv[1:]) if cmd == "io" else (["qemu-img"] + argv),
                  check=False, timeout=TIMEOUT, cwd=d)
    res = _run_cbt(d, argv)
    want = expect[cmd]
    if want == F and q is not None:
        # The oracle must refuse it too, or the case is mis-built.
        assert q.rc != 0, "case %s: QEMU accepted it (%s): %r" % (name, cmd, q)
    if want == F or res.rc != 0:
        assert 0 < res.rc < 128, "cbt %s exit %d on %s:\n%r" % (cmd, res.rc, name, res)
        assert res.err.strip() or (cmd == "check" and res.out.strip()), \
            "cbt %s on %s: exit %d with no message" % (cmd, name, res.rc)
        # check reports findings on stdout and stderr, as qemu-img check does
        msg = res.err + (res.out if cmd == "check" else "")
        assert re.search(pattern, msg, re.I), \
            "cbt %s on %s: message does not name the problem (/%s/): %r" % (
                cmd, name, pattern, msg)
        if cmd == "check" and q is not None and q.rc in (2, 3) \
                and name not in CHECK_REFUSES:
            # QEMU could run the check and found damage: so must cbt.
            assert res.rc in (2, 3), "cbt check on %s: exit %d, qemu-img check %d:\n%r" % (
                name, res.rc, q.rc, res)
    else:
        # cbt accepted what QEMU also accepts: it must then agree with QEMU.
        if q is None or want == A:
            return
        assert q.rc == 0, "cbt %s accepted %s, QEMU refused it: %r\ncbt: %r" % (
            cmd, name, q, res)
        if cmd == "io":
            pass  # read -P 0 verified the content, and the exit status is 0
        elif cmd == "map":
            L.assert_maps_equal(L.map_entries(res.json()), L.map_entries(q.json()),
                                "map of %s" % name)
        elif cmd == "info":
            got, want_ = res.json(), q.json()
            for k in ("virtual-size", "cluster-size", "format"):
                assert got.get(k) == want_.get(k), (name, k, got, want_)
        elif cmd == "chain":
            got, want_ = res.json(), q.json()
            assert [g.get("virtual-size") for g in got] == \
                [w.get("virtual-size") for w in want_], (name, got, want_)
