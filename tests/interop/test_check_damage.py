"""`cbt check` finds what `qemu-img check` finds, and `-r all` repairs it.

Images are written by qemu-io, then damaged on purpose by editing their
metadata with interop_lib.Qcow2 (header, L1, L2 and refcount parsing done in
Python).  For each damage, on separate copies:
  * `cbt check --output=json` has qemu-img check's exit code and the same
    corruptions / leaks counts, and does not modify the file;
  * `cbt check -r all`: where `qemu-img check -r all` can repair the damage
    (verified on a copy), qemu-img check is clean afterwards and the guest
    data equals what QEMU's own repair kept; where QEMU cannot, cbt must
    still report it and must not leave the image worse (fewer problems or
    equal, still openable, undamaged data intact).
"""
import hashlib
import os
import re

import pytest

import interop_lib as L
from interop_lib import MiB, qemu_img, qemu_io


def base_image(path, cluster=65536, refcount_bits=16):
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             "cluster_size=%d,refcount_bits=%d" % (cluster, refcount_bits), path, "4M")
    cs = cluster
    # guest cluster 0 first, filled with zeroes: its host cluster directly
    # follows the first L2 table (used by the unaligned-L1 case)
    qemu_io("-f", "qcow2", "-c", "write -P 0 0 %d" % cs,
            "-c", "write -P 0x61 %d %d" % (cs, 3 * cs),
            "-c", "write -P 0x62 %d %d" % (1 * MiB, cs),
            "-c", "write -P 0x63 %d %d" % (3 * MiB, 2 * cs), path)
    return L.Qcow2(path)


# Each damage edits the image and returns a guest range (pattern, off, len)
# that it leaves intact, to be read back after repairs.

def d_leak_past_end(q):
    """A refcount of 1 for a cluster nothing references, past the old end."""
    cs = q.cluster_size
    n = (q.file_size() + cs - 1) // cs
    with open(q.path, "r+b") as f:
        f.truncate((n + 1) * cs)
    assert q.refcount(n) == 0
    q.set_refcount(n, 1)
    return (0x61, q.cluster_size, 3 * q.cluster_size)


def d_leak_l2_cleared(q):
    """A data cluster whose L2 entry was zeroed: still refcounted, unused."""
    q.put_u64(q.l2_entry_off(1 * MiB), 0)
    return (0x61, q.cluster_size, 3 * q.cluster_size)


def d_refcount_zero_data(q):
    """A used data cluster with refcount 0."""
    host = q.host_cluster(3 * MiB)
    assert q.refcount(host // q.cluster_size) == 1
    q.set_refcount(host // q.cluster_size, 0)
    return (0x61, q.cluster_size, 3 * q.cluster_size)


def d_refcount_zero_l2(q):
    """An L2 table with refcount 0."""
    l2 = q.l1(0) & L.L1E_OFFSET_MASK
    assert q.refcount(l2 // q.cluster_size) == 1
    q.set_refcount(l2 // q.cluster_size, 0)
    return (0x62, 1 * MiB, q.cluster_size)


def d_l2_past_eof(q):
    """An L2 entry pointing 10 clusters past the end of the file."""
    cs = q.cluster_size
    entry = q.l2(1 * MiB)
    past = ((q.file_size() + cs - 1) // cs + 10) * cs
    q.put_u64(q.l2_entry_off(1 * MiB), (entry & ~L.L2E_OFFSET_MASK) | past)
    return (0x63, 3 * MiB, 2 * cs)


def d_l1_unaligned(q):
    """An L1 entry whose L2 table offset is not cluster aligned (+512)."""
    e = q.l1(0)
    l2 = e & L.L1E_OFFSET_MASK
    # the cluster after the L2 table holds guest cluster 0: all zeroes
    assert q.host_cluster(0) == l2 + q.cluster_size
    assert q.pread(l2 + q.cluster_size, 512) == bytes(512)
    q.put_u64(q.l1_entry_off(0), e + 512)
    return None


def d_reftable_past_eof(q):
    """The refcount table offset points 1 TiB past the end of the file."""
    q.set_header("refcount_table_offset", 1 << 40)
    return (0x62, 1 * MiB, q.cluster_size)


def d_snapshots_past_eof(q):
    """One snapshot claimed, its table 1 TiB past the end of the file."""
    q.set_header("nb_snapshots", 1)
    q.set_header("snapshots_offset", 1 << 40)
    return (0x63, 3 * MiB, 2 * q.cluster_size)


DAMAGES = {
    "leak-past-end": (d_leak_past_end, [(65536, 16), (65536, 1), (4096, 64), (512, 8)]),
    "leak-l2-cleared": (d_leak_l2_cleared, [(65536, 16), (4096, 2)]),
    "refcount-zero-data": (d_refcount_zero_data, [(65536, 16), (65536, 1), (4096, 32)]),
    "refcount-zero-l2": (d_refcount_zero_l2, [(65536, 16)]),
    "l2-past-eof": (d_l2_past_eof, [(65536, 16), (4096, 16)]),
    "l1-unaligned": (d_l1_unaligned, [(65536, 16)]),
    "reftable-past-eof": (d_reftable_past_eof, [(65536, 16)]),
    "snapshots-past-eof": (d_snapshots_past_eof, [(65536, 16)]),
}
# cbt deliberately refuses to check these (exit 1, message naming the
# structure) where qemu-img reports corruptions (exit 2) and -r all drops the
# unreadable snapshot: with the snapshot table unreadable, the clusters of
# its snapshots cannot be told from leaks (see CHECK_REFUSES in
# test_bad_input.py).  cbt must then leave the file untouched, even with -r.
REFUSED = {"snapshots-past-eof": r"snapshot"}

PARAMS = [(name, cs, rb) for name, (_, variants) in DAMAGES.items() for cs, rb in variants]


def counts(data):
    return {k: (data or {}).get(k, 0) for k in ("corruptions", "leaks", "check-errors")}


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("name,cluster,rbits", PARAMS,
                         ids=["%s-cs%d-rc%d" % p for p in PARAMS])
def test_check_and_repair(tmp, name, cluster, rbits):
    d = str(tmp)
    damaged = os.path.join(d, "damaged.qcow2")
    q = base_image(damaged, cluster, rbits)
    L.qemu_check_clean(damaged)
    intact = DAMAGES[name][0](q)

    # --- detection: same exit code and counts as qemu-img check
    qcopy = L.copy(damaged, os.path.join(d, "q.qcow2"))
    qrc, qdata, qres = L.qemu_check(qcopy)
    assert qrc in (2, 3), "damage not seen by qemu-img check (case mis-built): %r" % qres
    ccopy = L.copy(damaged, os.path.join(d, "c.qcow2"))
    before = sha(ccopy)
    res = L.cbt_rc("check", "--output=json", "-f", "qcow2", ccopy)
    if name in REFUSED:
        assert res.rc == 1 and re.search(REFUSED[name], res.err, re.I), \
            "cbt check should refuse %s naming it: %r" % (name, res)
        res = L.cbt_rc("check", "--output=json", "-r", "all", "-f", "qcow2", ccopy)
        assert res.rc == 1, "cbt check -r all on %s: %r" % (name, res)
        assert sha(ccopy) == before, "cbt check -r all modified an image it refused"
        return
    assert res.rc == qrc, "cbt check exit %d, qemu-img check %d\ncbt: %r\nqemu: %s" % (
        res.rc, qrc, res, qdata)
    cdata = res.json()
    assert counts(cdata) == counts(qdata), "counts: cbt %s, qemu %s\ncbt stderr: %s" % (
        counts(cdata), counts(qdata), res.err[-2000:])
    assert sha(ccopy) == before, "cbt check without -r modified the image"

    # --- repair: what can QEMU do?
    qfix = L.copy(damaged, os.path.join(d, "qfix.qcow2"))
    qemu_img("check", "-q", "-r", "all", "-f", "qcow2", qfix, check=False)
    qafter_rc, qafter, _ = L.qemu_check(qfix)

    res = L.cbt_rc("check", "--output=json", "-r", "all", "-f", "qcow2", ccopy)
    after_rc, after, after_res = L.qemu_check(ccopy)
    assert after_rc != 1, "image no longer checkable after cbt check -r all: %r" % after_res
    if qafter_rc == 0:
        assert res.rc == 0, "cbt check -r all did not report success: %r" % res
        assert after_rc == 0 and counts(after) == counts(None), \
            "qemu-img check after cbt check -r all: rc=%d %s\n%r" % (after_rc, after, after_res)
        cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ccopy, qfix, check=False)
        assert cmp.rc == 0, "guest data after cbt's repair differs from QEMU's repair: %r" % cmp
    else:
        # QEMU cannot repair it: cbt must still say it is damaged, and not
        # make it worse than it was.
        assert res.rc != 0, "cbt check -r all claims success on unrepairable damage: %r" % res
        cb, ca = counts(qdata), counts(after)
        assert ca["corruptions"] <= cb["corruptions"] and ca["leaks"] <= cb["leaks"], \
            "worse after cbt repair: before %s, after %s" % (cb, ca)
    if intact:
        pat, off, length = intact
        qemu_io("-f", "qcow2", "-r", "-c", "read -P %d %d %d" % (pat, off, length), ccopy)


def test_check_clean_image_reports_clean(tmp):
    """The baseline: cbt check on an undamaged image agrees with qemu-img."""
    img = os.path.join(str(tmp), "ok.qcow2")
    base_image(img)
    qrc, qdata, _ = L.qemu_check(img)
    res = L.cbt_rc("check", "--output=json", "-f", "qcow2", img)
    assert qrc == 0 and res.rc == 0, res
    data = res.json()
    assert counts(data) == counts(qdata)
    for k in ("image-end-offset", "total-clusters", "allocated-clusters"):
        assert data.get(k) == qdata.get(k), (k, data, qdata)
