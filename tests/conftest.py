"""Shared fixtures for cbt's integration and interop tests.

The tests drive the real `cbt` binary (path in $CBT, default build/src/cli/cbt)
and use QEMU's tools as oracles.  The oracles are required: a missing tool is
a failure, never a skip.
"""
import json
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CBT = os.environ.get("CBT", os.path.join(ROOT, "build", "src", "cli", "cbt"))
ORACLES = ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")


def pytest_sessionstart(session):
    missing = [t for t in ORACLES if shutil.which(t) is None]
    if missing:
        raise pytest.UsageError(
            "oracle tools missing: %s (run scripts/install-deps.sh)" % ", ".join(missing))
    if not os.access(CBT, os.X_OK):
        raise pytest.UsageError("cbt binary not found at %s (set $CBT or build)" % CBT)


class Result:
    def __init__(self, proc):
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return "rc=%d\nstdout:\n%s\nstderr:\n%s" % (self.rc, self.out, self.err)


def run(argv, check=True, input=None, timeout=600, cwd=None):
    """Run a command; with check=True a non-zero exit fails the test."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    res = Result(proc)
    if check and res.rc != 0:
        raise AssertionError("command failed: %s\n%r" % (" ".join(argv), res))
    return res


def cbt(*args, **kw):
    return run([CBT] + [str(a) for a in args], **kw)


def qemu_img(*args, **kw):
    return run(["qemu-img"] + [str(a) for a in args], **kw)


def qemu_io(*args, **kw):
    return run(["qemu-io"] + [str(a) for a in args], **kw)


def qemu_check_clean(path, fmt="qcow2"):
    """qemu-img check must report no corruption and no leaks."""
    res = qemu_img("check", "--output=json", "-f", fmt, path, check=False)
    assert res.rc == 0, "qemu-img check not clean on %s: %r" % (path, res)
    data = json.loads(res.out)
    assert data.get("corruptions", 0) == 0 and data.get("leaks", 0) == 0, data
    return data


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


# ---- helpers for model-based tests (test_io_model.py, test_sigkill.py) ----

import re as _re

IO_DONE_RE = _re.compile(r"(wrote|read|discard) (\d+)/(\d+) bytes at offset (\d+)")


def qcow2_discard(model, off, length, cluster_size, v2_with_backing=False):
    """Apply a qcow2 discard to a bytearray model the way qemu 7.2 does.

    Only whole clusters inside [off, off+length) are discarded, plus the
    partial last cluster of an image whose size is not cluster-aligned when
    the range covers it up to the end.  A discarded cluster reads as zeroes
    (v3 sets the zero flag even over a backing file).  On a v2 image with a
    backing file qemu refuses to discard at all.  Checked against qemu-io.
    """
    if v2_with_backing:
        return
    size = len(model)
    end = off + length
    c = -(-off // cluster_size) * cluster_size
    while c < end:
        cend = c + cluster_size
        if cend <= end or end == size:
            e = min(cend, size)
            model[c:e] = bytes(e - c)
        c = cend


def byte_runs(data, start=0, end=None):
    """Yield (offset, length, value) for each maximal run of one byte value."""
    end = len(data) if end is None else end
    view = bytes(data[start:end])
    for m in _re.finditer(rb"(.)\1*", view, _re.S):
        yield start + m.start(), m.end() - m.start(), view[m.start()]


def rand_offset(rng, size, cluster_size, sub=512):
    """An offset biased toward cluster and sub-cluster boundaries."""
    r = rng.randrange(8)
    if r < 3:
        off = rng.randrange(size)
    elif r < 5:
        off = rng.randrange(-(-size // cluster_size)) * cluster_size
    elif r == 5:
        off = rng.randrange(size // cluster_size + 1) * cluster_size
        off += rng.choice((-1, 1)) * rng.randrange(1, 512)
    elif r == 6:
        off = rng.randrange(size // sub + 1) * sub
    else:
        off = size - 1 - rng.randrange(min(size, 2 * cluster_size))
    if not 0 <= off < size:
        off = rng.randrange(size)
    return off


def rand_length(rng, size, off, cluster_size, sub=512):
    """A length: tiny, sub-cluster, whole clusters, a few clusters, or large."""
    r = rng.randrange(20)
    if r < 4:
        n = rng.randint(1, 512)
    elif r < 8:
        n = sub * rng.randint(1, 4)
    elif r < 13:
        n = cluster_size * rng.randint(1, 3)
    elif r < 18:
        n = rng.randint(1, 3 * cluster_size + 1)
    elif r < 19:
        n = rng.randint(1, max(1, size // 3))
    else:
        n = size - off
    return max(1, min(n, size - off))


def raw_contents(path, tmpdir, fmt="qcow2"):
    """The guest-visible bytes of an image (whole chain), read by qemu-img."""
    out = os.path.join(str(tmpdir), os.path.basename(str(path)) + ".flat.raw")
    qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def first_difference(got, want, base=0):
    """Describe the first differing run of two byte strings, or None.
    base: the offset of got[0] in the image, added to reported offsets."""
    if got == want:
        return None
    if len(got) != len(want):
        return "length %d != expected %d" % (len(got), len(want))
    i = next(k for k in range(len(got)) if got[k] != want[k]) \
        if len(got) < 4096 else _first_diff_fast(got, want)
    j = i
    while j < len(got) and got[j] != want[j]:
        j += 1
    return ("first difference at offset %d (0x%x), %d bytes: got 0x%02x, "
            "expected 0x%02x" % (base + i, base + i, j - i, got[i], want[i]))


def _first_diff_fast(a, b):
    lo, hi = 0, len(a)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next(k for k in range(lo, hi) if a[k] != b[k])
