"""Running cbt with tests/fault/libfault.so preloaded (fault injection).

libfault follows the descriptors opened on one file and fails its Nth
write-like or flush call (see the comment at the top of
tests/fault/libfault.c for the environment variables).  This module:

  * finds the shim: $CBT_FAULT_LIB, else BUILD/tests/fault/libfault.so next
    to $CBT (BUILD/src/cli/cbt), else compiles tests/fault/libfault.c with
    cc into a temporary folder (once per session);
  * runs cbt with it (`run_faulty`), returning the result and the call
    counts the shim wrote at exit;
  * picks the N to try (`sample_ns`), and runs one command once per N on a
    fresh copy of a folder of pristine images (`sweep`).

Import it as a plain module (the test adds tests/ to sys.path).
"""
import atexit
import fcntl
import filecmp
import hashlib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_TESTS, "interop"))
import interop_lib as L  # noqa: E402

CBT = L.CBT
SOURCE = os.path.join(_TESTS, "fault", "libfault.c")
FIRST_NS = 20      # every N up to this
EXTRA_NS = 12      # then this many sampled from the rest
# CBT_FAULT_ALL_NS=1: try every N (slow; for a thorough run by hand).
ALL_NS = os.environ.get("CBT_FAULT_ALL_NS") == "1"
_lib = None


def library():
    """Path of libfault.so (built by meson, or compiled here)."""
    global _lib
    if _lib:
        return _lib
    cands = [os.environ.get("CBT_FAULT_LIB")]
    build = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(CBT))))
    cands.append(os.path.join(build, "tests", "fault", "libfault.so"))
    for c in cands:
        if c and os.path.isfile(c) and os.path.getmtime(c) >= os.path.getmtime(SOURCE):
            _lib = c
            return _lib
    # Not built (or stale): compile it without sanitizers.
    d = tempfile.mkdtemp(prefix="cbt-libfault-")
    atexit.register(shutil.rmtree, d, True)
    out = os.path.join(d, "libfault.so")
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", out, SOURCE, "-ldl"],
                   check=True, capture_output=True, text=True)
    _lib = out
    return _lib


def _asan_options():
    """The caller's ASAN_OPTIONS, plus what preloading needs; leaks and
    errors still fail the run."""
    opts = [o for o in os.environ.get("ASAN_OPTIONS", "").split(":")
            if o and o.split("=")[0] not in ("verify_asan_link_order",
                                             "detect_leaks", "halt_on_error")]
    opts += ["verify_asan_link_order=0", "detect_leaks=1", "halt_on_error=1"]
    return ":".join(opts)


def fault_env(path, op="any", nth=0, sticky=False, err="EIO", count_file=None):
    env = dict(os.environ)
    env["LD_PRELOAD"] = library()
    env["ASAN_OPTIONS"] = _asan_options()
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    env["CBT_FAULT_PATH"] = path
    env["CBT_FAULT_OP"] = op
    env["CBT_FAULT_NTH"] = str(nth)
    env["CBT_FAULT_STICKY"] = "1" if sticky else "0"
    env["CBT_FAULT_ERRNO"] = err
    if count_file:
        env["CBT_FAULT_COUNT_FILE"] = count_file
    else:
        env.pop("CBT_FAULT_COUNT_FILE", None)
    env.pop("CBT_FAULT_VERBOSE", None)
    env.pop("CBT_FAULT_SIGNAL", None)
    return env


def read_counts(path):
    """{"matching": M, "write": W, "flush": F, "injected": I}"""
    with open(path) as f:
        line = f.read().strip()
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split())}


def run_faulty(args, path, op="any", nth=0, sticky=False, err="EIO", cwd=None,
               timeout=120):
    """Run cbt ARGS with faults on PATH; returns (Result, counts).

    The run must not crash or trip a sanitizer (whatever its exit code)."""
    fd, cfile = tempfile.mkstemp(prefix="cbt-fault-count-")
    os.close(fd)
    os.unlink(cfile)
    try:
        proc = subprocess.run([CBT] + [str(a) for a in args], capture_output=True,
                              text=True, timeout=timeout, cwd=cwd,
                              env=fault_env(path, op, nth, sticky, err, cfile))
        res = L._ct.Result(proc)
        L.no_crash(res, "cbt %s [fault %s op=%s nth=%d sticky=%s %s]"
                   % (" ".join(str(a) for a in args), path, op, nth, sticky, err))
        assert os.path.exists(cfile), "libfault wrote no counts: %r" % res
        return res, read_counts(cfile)
    finally:
        if os.path.exists(cfile):
            os.unlink(cfile)


CALL_RE = re.compile(rb"libfault: call (\d+):")


def run_traced(args, path, n, act, op="any", cwd=None, new_session=False):
    """Run cbt ARGS with libfault tracing every OP call on files matching
    PATH (CBT_FAULT_VERBOSE=2) and call act(proc) once, as soon as the
    trace shows call N.  The trace goes through a small pipe read to its
    end, so cbt cannot run far past call N unseen, nor block on stderr.
    Returns (acted, returncode, last call seen, stderr without the trace:
    its last 8000 bytes)."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    except (AttributeError, OSError):
        pass
    env = fault_env(path, op=op, nth=0)
    env["CBT_FAULT_VERBOSE"] = "2"
    p = subprocess.Popen([CBT] + [str(a) for a in args], cwd=cwd,
                         stdout=subprocess.DEVNULL, stderr=w, env=env,
                         start_new_session=new_session)
    os.close(w)
    seen, acted, buf, tail = 0, False, b"", b""
    with os.fdopen(r, "rb", buffering=0) as f:
        while True:
            chunk = f.read(65536)
            if not chunk:
                break
            buf += chunk
            lines = buf.split(b"\n")
            buf = lines.pop()
            for ln in lines:
                m = CALL_RE.match(ln)
                if m:
                    seen = max(seen, int(m.group(1)))
                else:
                    tail = (tail + ln + b"\n")[-8000:]
            if not acted and seen >= n:
                act(p)
                acted = True
    p.wait()
    return acted, p.returncode, seen, (tail + buf).decode(errors="replace")


SIGNAL_RE = re.compile(rb"libfault: call (\d+):.*: signal ")


def run_signalled(args, path, n, sig, op="any", cwd=None, timeout=120):
    """Run cbt ARGS with libfault sending it signal SIG from inside, at
    the Nth OP call on files matching PATH (CBT_FAULT_SIGNAL), so the
    signal lands exactly there even when cbt would otherwise finish first.
    Returns (sent, returncode, stderr without libfault's lines)."""
    env = fault_env(path, op=op, nth=n)
    env["CBT_FAULT_SIGNAL"] = str(int(sig))
    env["CBT_FAULT_VERBOSE"] = "1"
    proc = subprocess.run([CBT] + [str(a) for a in args], cwd=cwd, timeout=timeout,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    lines = proc.stderr.split(b"\n")
    sent = any(SIGNAL_RE.match(ln) for ln in lines)
    rest = b"\n".join(ln for ln in lines if not ln.startswith(b"libfault: "))
    return sent, proc.returncode, rest.decode(errors="replace")


def sample_ns(count, first=FIRST_NS, extra=EXTRA_NS, seed=1):
    """1..min(count, first), then `extra` more drawn from the rest (fixed
    seed), always including count itself."""
    if ALL_NS:
        return list(range(1, count + 1))
    ns = list(range(1, min(count, first) + 1))
    rest = list(range(first + 1, count + 1))
    if len(rest) > extra:
        rest = sorted(random.Random(seed).sample(rest[:-1], extra - 1) + [count])
    return ns + rest


def fresh_copy(pristine, work):
    """Replace folder WORK with a copy of folder PRISTINE."""
    if os.path.exists(work):
        shutil.rmtree(work)
    shutil.copytree(pristine, work)


ERRTEXT = {"ENOSPC": "No space left on device", "EIO": "Input/output error"}


# Soft failures: found during a sweep, reported after it, so the harder
# checks still run for every N.  Each kind is its own class so a known bug
# can be marked xfail(raises=...) without hiding the others.
class LeakOnly(AssertionError):
    """qemu-img check finds leaked clusters (and nothing worse)."""


class UnclearError(AssertionError):
    """The error message lacks the file name or the cause."""


class WrongStatus(AssertionError):
    """An injected I/O or space error did not exit 74 (docs/cli.md)."""


_soft = []
# The soft kinds a test expects (its xfail's raises=, set by the test's
# fixture): only these may end a sweep as that kind.
expected_soft = ()


def soft(exc):
    _soft.append(exc)


def assert_clear_error(res, err, names, what):
    """Non-zero exit (hard), exit status 74 (soft: every injected error is
    an I/O or space error), and a 'cbt: FILE: ...' line naming one of NAMES
    (basenames) with the injected error's text (soft)."""
    assert res.rc != 0, "%s: succeeded despite the fault\n%r" % (what, res)
    if res.rc != 74:
        soft(WrongStatus("%s: exit %d, expected 74 (an I/O or space error)\n%r"
                         % (what, res.rc, res)))
    lines = [ln for ln in res.err.splitlines() if ln.startswith("cbt: ")]
    text = ERRTEXT[err]
    if not any(text in ln and any(n in ln for n in names) for ln in lines):
        soft(UnclearError("%s: no 'cbt: FILE: ...' line naming one of %s with "
                          "%r\n%r" % (what, names, text, res)))


def sweep(pristine, work, args, fault_file, op, check, sticky=False, err="EIO",
          cwd=None, first=FIRST_NS, extra=EXTRA_NS, expect_calls=True):
    """Run cbt ARGS once without faults (to count the matching calls on
    FAULT_FILE), then once per sampled N on a fresh copy of PRISTINE in
    WORK, calling check(res, n, counts) after each faulty run (n is None
    for the counting run).  Hard failures stop at once; soft ones (leaks,
    unclear messages) are raised after the last N, the first of them with
    a count.  Returns the number of matching calls."""
    del _soft[:]
    fresh_copy(pristine, work)
    res, counts = run_faulty(args, fault_file, op, cwd=cwd)
    assert res.rc == 0, "cbt %s without faults failed:\n%r" % (args, res)
    check(res, None, counts)
    assert not _soft, "without faults: %s" % _soft[0]
    total = counts["matching"]
    if expect_calls:
        assert total > 0, "no %s calls on %s: %r" % (op, fault_file, counts)
    ns = sample_ns(total, first, extra)
    for n in ns:
        fresh_copy(pristine, work)
        res, c = run_faulty(args, fault_file, op, n, sticky, err, cwd=cwd)
        assert c["injected"] >= 1, \
            "N=%d of %d: the fault did not fire (%r)\n%r" % (n, total, c, res)
        check(res, n, c)
    if _soft:
        kinds = []
        for e in _soft:
            if type(e) not in kinds:
                kinds.append(type(e))
        firsts = "\n".join("first %s:\n%s" % (k.__name__,
                                              next(e for e in _soft if type(e) is k))
                           for k in kinds)
        msg = "%d of %d runs had soft failures (%s)\n%s" % (
            len(_soft), len(ns), ", ".join(k.__name__ for k in kinds), firsts)
        unexpected = [k for k in kinds if not issubclass(k, expected_soft)]
        if unexpected:
            # A plain AssertionError: no xfail(raises=...) matches it.
            raise AssertionError(msg)
        raise type("SoftFailures", tuple(kinds), {})(msg)
    return total


# ---- what a layer looks like, for before/after comparisons ----

def bitmap_fingerprint(path):
    """The bitmaps of a qcow2 file as stored, read directly: for each
    directory entry (sorted by name) its name, flags, type, granularity and
    table, each table entry as 0/1 (all clean/all dirty) or the SHA-256 of
    its data cluster.  () when the file has no valid bitmaps extension;
    None when it cannot be parsed (then compare with bitmap_state)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:4] != b"QFI\xfb":
            return None
        version, = struct.unpack_from(">I", data, 4)
        if version < 3:
            return ()
        cbits, = struct.unpack_from(">I", data, 20)
        autoclear, = struct.unpack_from(">Q", data, 88)
        off, = struct.unpack_from(">I", data, 100)
        ext = None
        while off + 8 <= len(data):
            t, ln = struct.unpack_from(">II", data, off)
            if t == 0:
                break
            if t == 0x23852875:
                ext = struct.unpack_from(">IIQQ", data, off + 8)
            off += 8 + ((ln + 7) & ~7)
        if ext is None or not autoclear & 1:
            return ()
        nb, _, _, p = ext
        out = []
        for _ in range(nb):
            toff, tsize, flags, typ, gbits, nlen, xlen = \
                struct.unpack_from(">QIIBBHI", data, p)
            name = data[p + 24 + xlen:p + 24 + xlen + nlen]
            p += (24 + xlen + nlen + 7) & ~7
            table = []
            for e in struct.unpack_from(">%dQ" % tsize, data, toff):
                c = e & 0x00fffffffffffe00
                table.append(hashlib.sha256(data[c:c + (1 << cbits)]).hexdigest()
                             if c else e & 1)
            out.append((name, flags, typ, gbits, tsize, tuple(table)))
        return tuple(sorted(out))
    except (struct.error, OSError):
        return None


def bitmap_state(path):
    """{name: (--list entry, sha256)} of every bitmap of PATH (cbt's view)."""
    out = {}
    for b in L.cbt_json("bitmap", "--list", "--output=json", path):
        sha = None
        if not b.get("inconsistent"):
            sha = L.cbt_ok("bitmap", "--sha256", path, b["name"]).out.strip()
        out[b["name"]] = (json.dumps(b, sort_keys=True), sha)
    return out


def check_result(path, fmt="qcow2"):
    """qemu-img check's JSON and exit code, without asserting."""
    res = L.qemu_img("check", "--output=json", "-f", fmt, path, check=False)
    try:
        data = json.loads(res.out)
    except ValueError:
        data = {}
    return res.rc, data, res


def assert_check_clean(path, fmt="qcow2", leaks_ok=False, what=""):
    """qemu-img check: corruption or errors fail at once; leaked clusters
    are a soft failure (LeakOnly) unless leaks_ok."""
    rc, data, res = check_result(path, fmt)
    # qemu-img check exits 3 for leaks only, 2 for corruption.
    assert rc in (0, 3) and data.get("corruptions", 0) == 0 and \
        not data.get("check-errors"), "%s: %s not clean: %r" % (what, path, res)
    if rc == 3 and not leaks_ok:
        soft(LeakOnly("%s: %s has %d leaked clusters:\n%r"
                      % (what, path, data.get("leaks", 0), res)))


def same_bytes(a, b):
    return filecmp.cmp(a, b, shallow=False)


def same_guest_data(a, b, fmt_a="qcow2", fmt_b="qcow2"):
    res = L.qemu_img("compare", "-q", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    return res.rc == 0


def guest_bytes(path, tmpdir, fmt="qcow2"):
    return L._ct.raw_contents(path, tmpdir, fmt)
