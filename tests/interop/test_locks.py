"""Image locks: cbt beside QEMU's programs and beside itself.

cbt takes QEMU's OFD byte-range locks (bytes 100+n for each permission
held, 200+n for each permission not shared) on every file it opens.  These
tests hold images with the real peers (qemu-nbd read-write and -r, qemu-io
through a pipe, qemu-storage-daemon, another cbt) and check every command:
writers are refused with QEMU's wording and exit 75 (image in use) and
change nothing on disk; readers are refused only by writers; -U reads a
held image with a warning; QEMU's programs are refused while cbt holds an
image; two cbt processes on one disk never both succeed.
"""
import contextlib
import hashlib
import json
import os
import subprocess
import time

import pytest

from conftest import CBT, cbt, qemu_img, run

IN_USE = 75
CONFLICT = "Is another process using the image"

# ---- who holds which lock bytes ----


def lock_bytes(path):
    """The OFD lock bytes held on path's inode, from /proc/locks."""
    ino = os.stat(path).st_ino
    found = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            # "1: OFDLCK ADVISORY READ -1 08:01:1234 100 101"
            if len(parts) < 8 or parts[1] != "OFDLCK":
                continue
            if int(parts[5].split(":")[2]) != ino:
                continue
            lo, hi = int(parts[6]), int(parts[7])
            found.update(range(lo, hi + 1))
    return found


def wait_locked(path, proc, timeout=20.0):
    """Wait until some process holds lock byte 100 on path."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("holder exited early: rc=%s %s" % (
                proc.returncode, proc.stderr.read() if proc.stderr else ""))
        if 100 in lock_bytes(path):
            return
        time.sleep(0.02)
    raise AssertionError("%s never got locked by %r" % (path, proc.args))


def wait_ready(proc, ready):
    """Wait until the holder has finished opening: its socket exists,
    (qemu-io) it printed its prompt, or (cbt io, no prompt on a pipe) it
    answered a command.  QEMU and cbt write the image while they open it
    (bitmaps marked in use) after taking its locks."""
    deadline = time.time() + 20
    if ready == "reply":
        proc.stdin.write("help quit\n")
        proc.stdin.flush()
        if not proc.stdout.readline():
            raise AssertionError("cbt io never answered: %s" %
                                 proc.stderr.read())
        return
    if ready == "prompt":
        buf = ""
        while "qemu-io>" not in buf:
            c = proc.stdout.read(1)
            if not c or time.time() > deadline:
                raise AssertionError("no qemu-io prompt: %r" % buf)
            buf += c
        return
    # An NBD URI: the export answers once the image is fully open.
    while ready:
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError("holder never served %s: %s" % (
                ready, proc.stderr.read() if proc.poll() is not None else ""))
        if subprocess.run(["nbdinfo", "--size", ready],
                          stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0:
            return
        time.sleep(0.02)


@contextlib.contextmanager
def holding(argv, path, stdin_pipe=False, ready=None):
    """Run a holder process until the block ends; wait for its locks and
    until it is ready (wait_ready)."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_pipe else
                            subprocess.DEVNULL,
                            stdout=subprocess.PIPE if ready in ("prompt",
                                                                "reply") else
                            subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_locked(path, proc)
        wait_ready(proc, ready)
        yield proc
    finally:
        if stdin_pipe and proc.poll() is None:
            # End of input: the holder closes the image cleanly.
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()


def hold(kind, path, tmp):
    """The holders of the issue: (argv, needs a stdin pipe, writes?)."""
    sock = os.path.join(str(tmp), "h-%s.sock" % kind)
    uri = "nbd+unix:///?socket=%s" % sock
    if kind == "qemu-nbd":
        return holding(["qemu-nbd", "-t", "-f", "qcow2", "-k", sock, path],
                       path, ready=uri)
    if kind == "qemu-nbd-r":
        return holding(["qemu-nbd", "-t", "-r", "-f", "qcow2", "-k", sock,
                        path], path, ready=uri)
    if kind == "qemu-io":
        return holding(["qemu-io", "-f", "qcow2", path], path, stdin_pipe=True,
                       ready="prompt")
    if kind == "qemu-io-r":
        return holding(["qemu-io", "-r", "-f", "qcow2", path], path,
                       stdin_pipe=True, ready="prompt")
    if kind == "qsd":
        return holding([
            "qemu-storage-daemon",
            "--blockdev", "file,node-name=f,filename=%s" % path,
            "--blockdev", "qcow2,node-name=disk,file=f",
            "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
            "--export", "nbd,id=e,node-name=disk,writable=on"], path,
            ready="nbd+unix:///disk?socket=%s" % sock)
    if kind == "cbt":
        return holding([CBT, "io", path], path, stdin_pipe=True,
                       ready="reply")
    if kind == "cbt-r":
        return holding([CBT, "io", "-r", path], path, stdin_pipe=True,
                       ready="reply")
    raise ValueError(kind)


WRITERS = ("qemu-nbd", "qemu-io", "qsd", "cbt")
READERS = ("qemu-nbd-r", "qemu-io-r", "cbt-r")

# ---- the disk the commands run on ----


def make_disk(tmp):
    """d.qcow2 with data, a bitmap, a checkpoint with a full backup, and a
    second image and a plain copy for the commands that need them."""
    d = os.path.join(str(tmp), "d.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", d, "16M")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M",
         "-c", "write -P 0x33 4M 64k", d])
    cbt("bitmap", "--add", d, "b1")
    cbt("checkpoint", "create", d, "c1")
    bk = os.path.join(str(tmp), "bk")
    os.mkdir(bk)
    cbt("backup", "--full", d, os.path.join(bk, "full.qcow2"))
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 8M 64k", d])
    other = os.path.join(str(tmp), "other.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", other, "16M")
    return d, bk, other


def tree_digest(tmp):
    """{path: SHA-256} of every regular file under tmp."""
    out = {}
    for root, dirs, files in os.walk(str(tmp)):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.isfile(p):
                continue
            with open(p, "rb") as f:
                out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


def write_commands(d, bk, other, tmp):
    """Every command that changes d (or writes d as its target)."""
    t = str(tmp)
    return [
        ("bitmap --add", ["bitmap", "--add", d, "b9"]),
        ("bitmap --remove", ["bitmap", "--remove", d, "b1"]),
        ("bitmap --remove-all", ["bitmap", "--remove-all", d]),
        ("checkpoint create", ["checkpoint", "create", d, "c9"]),
        ("checkpoint delete", ["checkpoint", "delete", d, "c1"]),
        ("checkpoint reconcile --fix",
         ["checkpoint", "reconcile", "--fix", d]),
        ("backup --full", ["backup", "--full", d,
                           os.path.join(bk, "full2.qcow2")]),
        ("backup --incremental", ["backup", "--incremental", d,
                                  os.path.join(bk, "inc1.qcow2")]),
        ("io write", ["io", "-c", "write -P 0x11 0 64k", d]),
        ("resize", ["resize", d, "32M"]),
        ("snapshot", ["snapshot", d, os.path.join(t, "ov.qcow2")]),
        ("check -r all", ["check", "-r", "all", d]),
        ("create over it", ["create", "-q", "-f", "qcow2", d, "1G"]),
        ("convert onto it", ["convert", "-n", "-O", "qcow2", other, d]),
        ("rebase", ["rebase", "-u", "-b", "", d]),
    ]


def read_commands(d, bk, other, force_share=False):
    """Every command that only reads d; with force_share, -U added."""
    u = ["-U"] if force_share else []
    return [
        ("info", ["info"] + u + [d]),
        ("info --backing-chain", ["info", "--backing-chain"] + u + [d]),
        ("map", ["map"] + u + [d]),
        ("compare", ["compare"] + u + [d, other]),
        ("check", ["check"] + u + [d]),
        ("bitmap --list", ["bitmap", "--list"] + u + [d]),
        ("bitmap --dump", ["bitmap", "--dump"] + u + [d, "b1"]),
        ("bitmap --count", ["bitmap", "--count"] + u + [d, "b1"]),
        ("bitmap --sha256", ["bitmap", "--sha256"] + u + [d, "b1"]),
        ("bitmap --list --chain", ["bitmap", "--list", "--chain"] + u + [d]),
        ("checkpoint list", ["checkpoint", "list"] + u + [d]),
        ("checkpoint show", ["checkpoint", "show"] + u + [d, "c1"]),
        ("io -r", ["io", "-r"] + u + ["-c", "read -P 0x5a 0 64k", d]),
    ]


def assert_refused(res, what, holder):
    assert res.rc == IN_USE, "%s beside %s: expected exit %d\n%r" % (
        what, holder, IN_USE, res)
    assert CONFLICT in res.err and "lock" in res.err, (what, holder, res)
    assert "d.qcow2" in res.err, (what, holder, res)
    # The command's advice for the error's remedy (the library names none).
    assert "(cbt --wait)" in res.err, (what, holder, res)


# ---- cbt against each holder ----


@pytest.mark.parametrize("holder", WRITERS + READERS)
def test_write_commands_refused_and_nothing_changes(tmp, holder):
    d, bk, other = make_disk(tmp)
    for what, argv in write_commands(d, bk, other, tmp):
        with hold(holder, d, tmp):
            before = tree_digest(tmp)
            res = cbt(*argv, check=False)
            after = tree_digest(tmp)
        assert_refused(res, what, holder)
        changed = sorted(p for p in set(before) | set(after)
                         if before.get(p) != after.get(p))
        assert not changed, "%s beside %s changed %s" % (what, holder, changed)
    # The holders did not change anything either, and the image is sound.
    res = qemu_img("check", d, check=False)
    assert res.rc == 0, res


@pytest.mark.parametrize("holder", WRITERS)
def test_read_commands_refused_beside_a_writer(tmp, holder):
    d, bk, other = make_disk(tmp)
    with hold(holder, d, tmp):
        for what, argv in read_commands(d, bk, other):
            res = cbt(*argv, check=False)
            assert_refused(res, what, holder)
            assert "-U" in res.err, "the hint names -U: %r" % res


@pytest.mark.parametrize("holder", READERS)
def test_read_commands_run_beside_a_reader(tmp, holder):
    d, bk, other = make_disk(tmp)
    with hold(holder, d, tmp):
        for what, argv in read_commands(d, bk, other):
            res = cbt(*argv, check=False)
            # compare exits 1 for "different": d and other differ.
            want = 1 if what == "compare" else 0
            assert res.rc == want, "%s beside %s\n%r" % (what, holder, res)


# Bitmap contents live in the writer's memory while it runs: -U shows the
# bitmap as in use (exit 75), never as damaged or to be removed.
BITMAP_CONTENTS = ("bitmap --dump", "bitmap --count", "bitmap --sha256")


@pytest.mark.parametrize("holder", WRITERS)
def test_force_share_reads_beside_a_writer(tmp, holder):
    d, bk, other = make_disk(tmp)
    with hold(holder, d, tmp):
        for what, argv in read_commands(d, bk, other, force_share=True):
            res = cbt(*argv, check=False)
            assert "open for writing in another process" in res.err, \
                "%s -U: no warning\n%r" % (what, res)
            if what in BITMAP_CONTENTS and holder != "cbt":
                assert res.rc == IN_USE and "in use by the process" in \
                    res.err and "remov" not in res.err, (what, holder, res)
                continue
            want = 1 if what == "compare" else 0
            assert res.rc == want, "%s -U beside %s\n%r" % (what, holder, res)


def test_force_share_without_writer_is_quiet(tmp):
    d, bk, other = make_disk(tmp)
    res = cbt("info", "-U", d)
    assert res.err == "", res
    with hold("qemu-io-r", d, tmp):
        res = cbt("map", "-U", d)
        assert res.err == "", res


def test_force_share_refused_for_writes(tmp):
    d, bk, other = make_disk(tmp)
    before = tree_digest(tmp)
    for argv in (["io", "-U", "-c", "write 0 4k", d],
                 ["bitmap", "--add", "-U", d, "b9"],
                 ["checkpoint", "create", "-U", d, "c9"],
                 ["checkpoint", "reconcile", "--fix", "-U", d]):
        res = cbt(*argv, check=False)
        assert res.rc != 0 and "force-share" in res.err, (argv, res)
    assert tree_digest(tmp) == before


def test_backing_file_held_for_writing(tmp):
    """A backing file a writer holds: reading the overlay is refused (its
    data may change underneath), commit into it too."""
    base = os.path.join(str(tmp), "base.qcow2")
    top = os.path.join(str(tmp), "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    with hold("qemu-io", base, tmp):
        before = tree_digest(tmp)
        res = cbt("info", "--backing-chain", top, check=False)
        assert res.rc == IN_USE and "base.qcow2" in res.err, res
        res = cbt("commit", top, check=False)
        assert res.rc == IN_USE and "base.qcow2" in res.err, res
        assert tree_digest(tmp) == before
    # A VM reading the base as a backing file (qemu-io -r on the overlay)
    # lets cbt read the base, but not write it.
    with hold("qemu-io-r", top, tmp):
        assert 100 in lock_bytes(base)
        assert cbt("info", base).rc == 0
        res = cbt("bitmap", "--add", base, "x", check=False)
        assert res.rc == IN_USE, res


def test_data_file_held(tmp):
    """The external data file is locked with its image."""
    img = os.path.join(str(tmp), "meta.qcow2")
    data = os.path.join(str(tmp), "data.raw")
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             "data_file=%s,data_file_raw=on" % data, img, "16M")
    with hold("cbt", img, tmp) as proc:
        # The image is locked first, its data file a moment later.
        wait_locked(data, proc)
        assert lock_bytes(data) >= {100, 101}, lock_bytes(data)
        res = run(["qemu-io", "-f", "raw", "-c", "write 0 4k", data],
                  check=False)
        assert res.rc != 0 and "lock" in res.err, res
    # A raw writer holding the data file keeps cbt from writing the image.
    with holding(["qemu-io", "-f", "raw", data], data, stdin_pipe=True,
                 ready="prompt"):
        res = cbt("bitmap", "--add", img, "b", check=False)
        assert res.rc == IN_USE and "data.raw" in res.err, res


# ---- the lock bytes are QEMU's ----


@pytest.mark.parametrize("mode", ["rw", "ro", "force-share"])
def test_lock_bytes_match_qemu(tmp, mode):
    """cbt holds the same bytes on an image and its backing file as qemu-io
    in the same mode (read-write, -r, -r -U)."""
    base = os.path.join(str(tmp), "base.qcow2")
    top = os.path.join(str(tmp), "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    flags = {"rw": [], "ro": ["-r"], "force-share": ["-r", "-U"]}[mode]
    with holding(["qemu-io"] + flags + ["-f", "qcow2", top], top,
                 stdin_pipe=True, ready="prompt"):
        want = (lock_bytes(top), lock_bytes(base))
    with holding([CBT, "io"] + flags + [top], top, stdin_pipe=True,
                 ready="reply"):
        got = (lock_bytes(top), lock_bytes(base))
    assert got == want, "cbt %s holds %s, qemu-io %s" % (mode, got, want)
    if mode == "rw":
        assert want[0] == {100, 101, 103, 201, 203}


# ---- QEMU's programs while cbt holds an image ----


def qemu_openers(d, tmp):
    """QEMU programs opening d: (name, argv, writes?)."""
    sock = os.path.join(str(tmp), "q.sock")
    return [
        ("qemu-img info", ["qemu-img", "info", d], False),
        ("qemu-img check", ["qemu-img", "check", d], False),
        ("qemu-io -r", ["qemu-io", "-r", "-c", "read 0 4k", d], False),
        ("qemu-io", ["qemu-io", "-c", "write 0 4k", d], True),
        ("qemu-img bitmap", ["qemu-img", "bitmap", "--add", d, "q1"], True),
        ("qemu-img resize", ["qemu-img", "resize", d, "32M"], True),
        ("qemu-nbd", ["qemu-nbd", "--fork", "-k", sock, d], True),
        ("qemu-storage-daemon", [
            "qemu-storage-daemon", "--daemonize",
            "--blockdev", "file,node-name=f,filename=%s" % d,
            "--blockdev", "qcow2,node-name=disk,file=f"], True),
    ]


def kill_forked(tmp):
    """Stop a qemu-nbd or qemu-storage-daemon a successful opener left."""
    sock = os.path.join(str(tmp), "q.sock")
    subprocess.run(["pkill", "-f", sock], check=False)


@pytest.mark.parametrize("mode", ["rw", "ro"])
def test_qemu_refused_while_cbt_holds(tmp, mode):
    d, bk, other = make_disk(tmp)
    holder = "cbt" if mode == "rw" else "cbt-r"
    for name, argv, writes in qemu_openers(d, tmp):
        with hold(holder, d, tmp):
            res = run(argv, check=False, timeout=60)
        if writes or mode == "rw":
            assert res.rc != 0 and "lock" in res.err, \
                "%s beside cbt %s\n%r" % (name, mode, res)
        else:
            assert res.rc == 0, "%s beside cbt %s\n%r" % (name, mode, res)
        if res.rc == 0 and argv[0] in ("qemu-nbd", "qemu-storage-daemon"):
            kill_forked(tmp)
    if mode == "ro":
        # qemu-storage-daemon --daemonize without an export stays until
        # killed; make sure none is left.
        subprocess.run(["pkill", "-f", "filename=%s" % d], check=False)


# ---- two cbt at once ----


def test_two_backups_never_both_succeed(tmp):
    d, bk, other = make_disk(tmp)
    for i in range(6):
        a = subprocess.Popen([CBT, "backup", "--auto", d,
                              os.path.join(bk, "a%d.qcow2" % i)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        b = subprocess.Popen([CBT, "backup", "--auto", d,
                              os.path.join(bk, "b%d.qcow2" % i)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        ra, rb = a.wait(timeout=300), b.wait(timeout=300)
        ea, eb = a.stderr.read(), b.stderr.read()
        a.stdout.close(), b.stdout.close(), a.stderr.close(), b.stderr.close()
        if ra == 0 and rb == 0:
            # Both may succeed only one after the other (a loaded machine
            # can finish one before the other starts): then the later one
            # is built on the earlier one's checkpoint.
            pa, pb = (json.load(open(os.path.join(bk, "%s%d.qcow2.json"
                                                  % (x, i))))
                      .get("parent", {}).get("file") for x in "ab")
            assert pa == "b%d.qcow2" % i or pb == "a%d.qcow2" % i, \
                ("both backups ran at once", pa, pb)
        for rc, err in ((ra, ea), (rb, eb)):
            assert rc in (0, IN_USE), (rc, err)
            if rc == IN_USE:
                assert CONFLICT in err, err
    res = qemu_img("check", d, check=False)
    assert res.rc == 0, res
    # Every backup that succeeded verifies, and the checkpoints chain up.
    for name in sorted(os.listdir(bk)):
        if name.endswith(".qcow2"):
            cbt("verify", os.path.join(bk, name))
    cbt("checkpoint", "reconcile", d)


def test_backup_beside_cbt_writer_is_refused(tmp):
    """A cbt writing the disk (io from a pipe) keeps a backup out, and the
    writes it makes after the refusal land in the next incremental."""
    d, bk, other = make_disk(tmp)
    with hold("cbt", d, tmp) as w:
        res = cbt("backup", "--incremental", d,
                  os.path.join(bk, "inc1.qcow2"), check=False)
        assert_refused(res, "backup --incremental", "cbt io")
        w.stdin.write("write -P 0x99 12M 64k\nflush\n")
        w.stdin.flush()
    assert not os.path.exists(os.path.join(bk, "inc1.qcow2"))
    cbt("backup", "--incremental", d, os.path.join(bk, "inc1.qcow2"))
    out = os.path.join(str(tmp), "restored.qcow2")
    cbt("restore", os.path.join(bk, "inc1.qcow2"), out)
    res = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", d, out,
                   check=False)
    assert res.rc == 0, res


# ---- --wait ----


def test_wait_for_a_holder_to_leave(tmp):
    """cbt --wait waits while qemu-io holds the disk and runs once it has
    closed it; --wait=SECONDS gives up with exit 75."""
    d, bk, other = make_disk(tmp)
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", d],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_locked(d, holder)
        wait_ready(holder, "prompt")
        res = cbt("--wait=1", "bitmap", "--add", d, "w1", check=False)
        assert res.rc == IN_USE and "waiting for it" in res.err, res
        waiter = subprocess.Popen([CBT, "--wait", "bitmap", "--add", d, "w2"],
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        assert waiter.poll() is None, "did not wait: %s" % waiter.stderr.read()
        holder.stdin.write("write -P 0x66 12M 64k\n")
        holder.stdin.close()
        holder.wait(timeout=20)
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()
    res = cbt("bitmap", "--list", "--output=json", d)
    names = {b["name"] for b in res.json()}
    assert "w2" in names and "w1" not in names, names
    # The write qemu-io made before leaving is in the recording bitmaps.
    res = cbt("bitmap", "--dump", "--output=json", d, "b1")
    assert any(e["dirty"] and e["start"] <= 12 << 20 < e["start"] +
               e["length"] for e in res.json()), res.out


def test_two_backups_with_wait_both_succeed_in_turn(tmp):
    d, bk, other = make_disk(tmp)
    procs = [subprocess.Popen([CBT, "--wait=120", "backup", "--incremental",
                               d, os.path.join(bk, "w%d.qcow2" % i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for i in range(2):
        cbt("verify", os.path.join(bk, "w%d.qcow2" % i))
    cbt("checkpoint", "reconcile", d)
    res = qemu_img("check", d, check=False)
    assert res.rc == 0, res


def test_verify_of_a_held_backup(tmp):
    """A backup image another process writes: verify says it is in use
    (75, never 'corrupt'); with -U it reads it and warns."""
    d, bk, other = make_disk(tmp)
    full = os.path.join(bk, "full.qcow2")
    with holding(["qemu-io", "-f", "qcow2", full], full, stdin_pipe=True,
                 ready="prompt"):
        res = cbt("verify", full, check=False)
        assert res.rc == IN_USE and CONFLICT in res.err, res
        res = cbt("verify", "-U", full, check=False)
        assert res.rc == 0 and "open for writing in another process" in \
            res.err, res
    with hold("qemu-io-r", full, tmp):
        cbt("verify", full)
