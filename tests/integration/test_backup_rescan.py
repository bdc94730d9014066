"""`cbt backup --rescan` and `--auto` after a lost bitmap (issue 13,
section 4; docs/backups.md, "Rescan").

When the checkpoint's bitmap is gone (removed with `qemu-img bitmap
--remove`) or inconsistent (a QEMU tool killed with SIGKILL while it held
the image: the bitmap stays flagged in-use), the previous backup's
.hashes still say what every block held.  The oracle for what changed is
independent of cbt: the disk's guest view read by `qemu-img convert -O raw`
before the first backup's successor and now, compared block by block.

  * --auto takes an incremental by rescan (not a full backup), says so on
    stderr; the incremental alone (`qemu-img map` without its backing
    file) allocates exactly the blocks whose contents differ, its data
    bytes are exactly those blocks' (a block rewritten with the same bytes
    is not copied); the chain equals the disk (`qemu-img compare`), `cbt
    restore` of it too, `qemu-img check` is clean, `cbt verify` passes;
    the chain goes on: a new checkpoint, the next --incremental uses it;
  * the same for an in-use bitmap left by a killed qemu-io;
  * raw targets (the chain rebuilt from the extents), resizes (grow and
    shrink since the previous backup), a differential by rescan;
  * --rescan where no previous backup exists: exit 79 with a clear
    message, no file written, the disk untouched; --auto then takes a
    full backup and says why both ways failed; --rescan --full is a usage
    mistake.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "interop"))
import interop_lib as L  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from interop_lib import KiB, MiB, cbt, qemu_img, qemu_io, no_crash  # noqa: E402

B = 64 * KiB
SIZE = 16 * MiB
USAGE, NEED_FULL = 64, 79


def read(path):
    with open(path, "rb") as f:
        return f.read()


def view_of(disk, tmp, name):
    out = os.path.join(str(tmp), name)
    qemu_img("convert", "-U", "-O", "raw", disk, out)
    return read(out)


def changed_blocks(old, new):
    """Blocks of `new` whose bytes differ from `old` at the same place
    (past old's end: every block)."""
    out = set()
    for i in range((len(new) + B - 1) // B):
        if new[i * B:(i + 1) * B] != old[i * B:(i + 1) * B]:
            out.add(i)
    return out


def is_zero(view, i):
    blk = view[i * B:(i + 1) * B]
    return blk == bytes(len(blk))


def map_alone(path):
    spec = 'json:{"driver":"qcow2","backing":null,' \
           '"file":{"driver":"file","filename":"%s"}}' % path
    return json.loads(qemu_img("map", "--output=json", spec).out)


def allocated_blocks(path, size):
    out = set()
    for e in map_alone(path):
        if e["present"]:
            end = min(e["start"] + e["length"], size)
            out.update(range(e["start"] // B, (end + B - 1) // B))
    return out


def backup(*args):
    res = no_crash(cbt("backup", "--output=json", *args, check=False))
    assert res.rc == 0, res
    return res.json(), res.err


def backup_fails(*args, rc):
    res = no_crash(cbt("backup", *args, check=False))
    assert res.rc == rc, res
    assert res.out == "", res
    return res.err


def manifest(target):
    with open(target + ".json") as f:
        return json.load(f)


def checkpoints(disk):
    return json.loads(cbt("checkpoint", "list", "--output=json", disk).out)["checkpoints"]


def newest(disk):
    return checkpoints(disk)[-1]["name"]


def make_disk(tmp, size=SIZE):
    disk = os.path.join(str(tmp), "disk.qcow2")
    repo = os.path.join(str(tmp), "repo")
    os.mkdir(repo)
    qemu_img("create", "-q", "-f", "qcow2", disk, size)
    # data over most of the disk, each 1 MiB its own pattern
    cmds = ["write -P %d %d %d" % (i + 1, i * MiB, MiB)
            for i in range(size // MiB - 2)]
    qemu_io("-f", "qcow2", *L.io_args(cmds), disk)
    return disk, repo


# A change: new data, a zero write over data, a discard, and a rewrite of
# 1 MiB with the bytes it already held (a bitmap marks it; a rescan sees
# it did not change).  Offsets are not block-aligned on purpose.
CHANGE = ["write -P 200 %d %d" % (3 * MiB + 4096, 100 * KiB),
          "write -z %d %d" % (6 * MiB, 128 * KiB),
          "discard %d %d" % (9 * MiB, 64 * KiB),
          "write -P 5 %d %d" % (4 * MiB, MiB)]


def check_chain(disk, target, tmp, fmt="qcow2"):
    """The chain equals the disk, by qemu-img and after cbt restore; cbt
    verify passes; qemu-img check is clean on the new file."""
    if fmt == "qcow2":
        L.qemu_check_clean(target)
        qemu_img("compare", "-U", disk, target)
    out = os.path.join(str(tmp), "restored.qcow2")
    if os.path.exists(out):
        os.unlink(out)
    no_crash(cbt("restore", target, out))
    qemu_img("compare", "-U", disk, out)
    res = no_crash(cbt("verify", target, check=False))
    assert res.rc == 0, res


def assert_rescan_incremental(r, err, disk, target, parent, before, now, fmt="qcow2"):
    size = len(now)
    assert r["kind"] == "incremental" and r["rescan"] is True, r
    assert r["parent"] == parent
    assert "rescanned the whole disk instead of taking a full backup" in err, err
    assert os.path.basename(parent) in err
    changed = changed_blocks(before, now)
    assert changed, "the test must change something"
    psize = len(before)
    data = {i for i in changed if not is_zero(now, i)}
    want_copied = sum(min(B, size - i * B) for i in data)
    assert r["bytes-copied"] == want_copied, (r, sorted(data))
    assert r["dirty-bytes"] == sum(min(B, size - i * B) for i in changed)
    m = manifest(target)
    assert m["kind"] == "incremental" and m["parent"]["file"] == os.path.basename(parent)
    assert m["rescan"] is True
    assert m["bytes"]["copied"] == want_copied
    if fmt == "qcow2":
        # zero blocks past the parent's end need no cluster
        want_alloc = {i for i in changed if i * B < psize or i in data}
        assert allocated_blocks(target, size) == want_alloc
    else:
        carried = set()
        for start, length, _ in m["extents"]:
            carried.update(range(start // B, (start + length + B - 1) // B))
        assert carried == changed
    # a new checkpoint: the chain goes on from it
    assert r["checkpoint"] == newest(disk)
    assert m["checkpoint"]["name"] == r["checkpoint"]


def test_auto_rescans_after_bitmap_removed(tmp):
    disk, repo = make_disk(tmp)
    full = os.path.join(repo, "full.qcow2")
    backup("--full", disk, full)
    before = view_of(disk, tmp, "v0.raw")
    L.run_qemu_io(disk, CHANGE)
    ck = newest(disk)
    qemu_img("bitmap", "--remove", disk, ck)
    now = view_of(disk, tmp, "v1.raw")

    inc = os.path.join(repo, "inc.qcow2")
    disk_sha = hashlib.sha256(read(disk)).hexdigest()
    err = backup_fails("--incremental", disk, inc, rc=NEED_FULL)
    assert "cannot be used" in err and "--rescan" in err, err
    assert hashlib.sha256(read(disk)).hexdigest() == disk_sha
    assert not os.path.exists(inc)

    r, err = backup("--auto", disk, inc)
    assert_rescan_incremental(r, err, disk, inc, full, before, now)
    assert "no layer holds its bitmap" in r["fallback"]
    # the rewrite with the same bytes was not copied: less than the bitmap
    # would have said
    assert r["bytes-copied"] < 3 * B
    check_chain(disk, inc, tmp)

    # the chain continues with an ordinary incremental
    L.run_qemu_io(disk, ["write -P 77 %d %d" % (12 * MiB, B)])
    inc2 = os.path.join(repo, "inc2.qcow2")
    r2, err2 = backup("--incremental", disk, inc2)
    assert r2["rescan"] is False and r2["parent"] == inc and err2 == ""
    assert r2["bytes-copied"] == B
    assert "rescan" not in manifest(inc2)
    check_chain(disk, inc2, tmp)


def hold_and_kill(disk, cmds, marker):
    """qemu-io holds the disk read-write (its persistent bitmaps flagged
    in-use), runs cmds and flushes, then dies of SIGKILL.  `marker` is an
    offset in an unallocated cluster: 4 KiB written there after the flush
    show (to a reader sharing the image) once the flush is done, since its
    L2 entry reaches the file only with a second flush."""
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds + ["flush", "write -P 99 %d 4096" % marker, "flush",
                     "sleep 600000"]:
        argv += ["-c", c]
    p = subprocess.Popen(argv + [disk], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert p.poll() is None, "qemu-io ended early"
            assert time.monotonic() < deadline, "qemu-io did not write"
            r = qemu_io("-U", "-r", "-f", "qcow2", "-c",
                        "read -P 99 %d 4096" % marker, disk, check=False)
            if r.rc == 0 and "verification failed" not in r.out:
                break
            time.sleep(0.1)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL


def test_auto_rescans_after_qemu_killed(tmp):
    disk, repo = make_disk(tmp)
    full = os.path.join(repo, "full.qcow2")
    backup("--full", disk, full)
    before = view_of(disk, tmp, "v0.raw")
    ck = newest(disk)
    hold_and_kill(disk, CHANGE, SIZE - MiB)
    info = json.loads(qemu_img("info", "-U", "--output=json", disk).out)
    bms = {b["name"]: b["flags"] for b in info["format-specific"]["data"]["bitmaps"]}
    assert "in-use" in bms[ck], bms
    now = view_of(disk, tmp, "v1.raw")

    inc = os.path.join(repo, "inc.qcow2")
    r, err = backup("--auto", disk, inc)
    assert_rescan_incremental(r, err, disk, inc, full, before, now)
    assert "in use" in r["fallback"]
    check_chain(disk, inc, tmp)
    # the old checkpoint stays broken (reconcile --fix would drop it); the
    # new one is sound: the next incremental uses its bitmap
    cks = {c["name"]: c for c in checkpoints(disk)}
    assert cks[ck]["usable"] is False and cks[r["checkpoint"]]["usable"] is True
    L.run_qemu_io(disk, ["write -P 66 %d %d" % (2 * MiB, B)])
    inc2 = os.path.join(repo, "inc2.qcow2")
    r2, _ = backup("--incremental", disk, inc2)
    assert r2["rescan"] is False and r2["bytes-copied"] == B
    check_chain(disk, inc2, tmp)


def test_rescan_raw_target_and_resize(tmp):
    disk, repo = make_disk(tmp)
    full = os.path.join(repo, "full.raw")
    backup("--full", "-O", "raw", disk, full)
    before = view_of(disk, tmp, "v0.raw")
    L.run_qemu_io(disk, CHANGE)
    # grow by a size that is not a block multiple, data in the new tail
    qemu_img("resize", "-q", disk, str(SIZE + 3 * B + 4096))
    L.run_qemu_io(disk, ["write -P 9 %d %d" % (SIZE + B, B)])
    qemu_img("bitmap", "--remove", disk, newest(disk))
    now = view_of(disk, tmp, "v1.raw")
    inc = os.path.join(repo, "inc.raw")
    r, err = backup("--auto", disk, inc)
    assert_rescan_incremental(r, err, disk, inc, full, before, now, fmt="raw")
    check_chain(disk, inc, tmp, fmt="raw")

    # explicit --rescan with a sound bitmap, after a shrink, qcow2 chain
    os.mkdir(tmp / "b")
    disk2, repo2 = make_disk(tmp / "b")
    full2 = os.path.join(repo2, "full.qcow2")
    backup("--full", disk2, full2)
    before = view_of(disk2, tmp, "w0.raw")
    L.run_qemu_io(disk2, CHANGE)
    qemu_img("resize", "-q", "--shrink", disk2, str(SIZE - 2 * MiB - 512))
    now = view_of(disk2, tmp, "w1.raw")
    inc2 = os.path.join(repo2, "inc.qcow2")
    r = json.loads(no_crash(cbt("backup", "--rescan", "--output=json", disk2,
                                inc2)).out)
    assert r["rescan"] is True and r["fallback"] is None
    changed = changed_blocks(before, now)
    assert r["bytes-copied"] == sum(min(B, len(now) - i * B) for i in changed
                                    if not is_zero(now, i))
    check_chain(disk2, inc2, tmp)


def test_differential_by_rescan(tmp):
    disk, repo = make_disk(tmp)
    full = os.path.join(repo, "full.qcow2")
    backup("--full", "--checkpoint", "mon", disk, full)
    before = view_of(disk, tmp, "v0.raw")
    L.run_qemu_io(disk, CHANGE[:1])
    backup("--incremental", "--checkpoint", "tue", disk, os.path.join(repo, "tue.qcow2"))
    L.run_qemu_io(disk, CHANGE[1:])
    qemu_img("bitmap", "--remove", disk, "mon")
    now = view_of(disk, tmp, "v1.raw")
    diff = os.path.join(repo, "diff.qcow2")
    err = backup_fails("--since", "mon", disk, diff, rc=NEED_FULL)
    assert "'mon' cannot be used" in err
    r, err = backup("--since", "mon", "--auto", disk, diff)
    assert r["kind"] == "differential" and r["since"] == "mon"
    assert r["rescan"] is True and r["parent"] == full
    changed = changed_blocks(before, now)
    assert allocated_blocks(diff, len(now)) == changed
    check_chain(disk, diff, tmp)


def test_rescan_without_previous_backup(tmp):
    disk, repo = make_disk(tmp)
    target = os.path.join(repo, "x.qcow2")
    sha = hashlib.sha256(read(disk)).hexdigest()
    # a disk never backed up
    err = backup_fails("--rescan", disk, target, rc=NEED_FULL)
    assert "has no checkpoint" in err and "previous backup" in err, err
    assert os.listdir(repo) == []
    assert hashlib.sha256(read(disk)).hexdigest() == sha
    assert backup_fails("--rescan", "--full", disk, target, rc=USAGE)

    # backed up into another folder: none in this one
    other = os.path.join(str(tmp), "other")
    os.mkdir(other)
    backup("--full", disk, os.path.join(other, "full.qcow2"))
    qemu_img("bitmap", "--remove", disk, newest(disk))
    sha = hashlib.sha256(read(disk)).hexdigest()
    err = backup_fails("--rescan", disk, target, rc=NEED_FULL)
    assert "no backup of checkpoint" in err and "previous backup" in err, err
    assert os.listdir(repo) == []
    assert hashlib.sha256(read(disk)).hexdigest() == sha
    # --auto: neither the bitmap nor a rescan, so a full backup, saying both
    r, err = backup("--auto", disk, target)
    assert r["kind"] == "full" and r["rescan"] is False
    assert "cannot be used" in r["fallback"] and "no rescan" in r["fallback"]
    check_chain(disk, target, tmp)


def test_rescan_write_failure_leaves_everything_as_before(tmp):
    """ENOSPC at any of several writes of a rescan: exit 74, the folder
    and the disk's checkpoints as before; then the rescan succeeds."""
    import faultlib as F
    disk, repo = make_disk(tmp)
    full = os.path.join(repo, "full.qcow2")
    backup("--full", disk, full)
    L.run_qemu_io(disk, CHANGE)
    qemu_img("bitmap", "--remove", disk, newest(disk))
    before = (sorted(os.listdir(repo)), checkpoints(disk))
    inc = os.path.join(repo, "inc.qcow2")
    # how many writes a rescan makes in the folder (on a copy), then fail
    # the first, one in the middle and the last
    import shutil
    cdir = os.path.join(str(tmp), "count")
    os.mkdir(cdir)
    shutil.copy(disk, cdir)
    shutil.copytree(repo, os.path.join(cdir, "repo"))
    _, cnt = F.run_faulty(["backup", "--rescan", os.path.join(cdir, "disk.qcow2"),
                           os.path.join(cdir, "repo", "inc.qcow2")], "/repo/", "write")
    last = cnt["matching"]
    assert last > 3, cnt
    for nth in sorted({1, last // 2, last}):
        res, cnt = F.run_faulty(["backup", "--rescan", disk, inc], "/repo/",
                                "write", nth, True, "ENOSPC")
        assert cnt["injected"] >= 1 and res.rc == 74, res
        assert (sorted(os.listdir(repo)), checkpoints(disk)) == before
    r, _ = backup("--rescan", disk, inc)
    assert r["rescan"] is True
    check_chain(disk, inc, tmp)
