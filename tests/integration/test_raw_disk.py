"""A raw disk tracked through a qcow2 metadata image (QEMU's data_file with
data_file_raw=on): the raw file stays a plain raw disk anyone can use,
and the qcow2 file beside it holds the bitmaps and checkpoints, so cbt
checkpoint and cbt backup take it as the disk.
"""
import hashlib
import os

from conftest import cbt, qemu_img, run


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def adopt(tmp, size="16M"):
    """An existing raw disk with data, adopted by cbt create.  The data
    file is named by its absolute path: QEMU resolves a relative one from
    its working directory, cbt from the image's folder."""
    raw = os.path.join(str(tmp), "vm.raw")
    meta = os.path.join(str(tmp), "vm.qcow2")
    qemu_img("create", "-q", "-f", "raw", raw, size)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M",
         "-c", "write -P 0x17 9M 192k", raw])
    before = sha(raw)
    cbt("create", "-q", "-f", "qcow2", "-o",
        "data_file=%s,data_file_raw=on" % raw, meta, size)
    return raw, meta, before


def test_adopting_a_raw_disk_keeps_its_data(tmp):
    raw, meta, before = adopt(tmp)
    assert sha(raw) == before, "cbt create changed the raw disk"
    res = qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, meta,
                   check=False)
    assert res.rc == 0, res
    res = qemu_img("check", meta, check=False)
    assert res.rc == 0, res


def test_data_file_larger_than_the_disk_refused(tmp):
    raw = os.path.join(str(tmp), "vm.raw")
    qemu_img("create", "-q", "-f", "raw", raw, "32M")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 30M 1M", raw])
    before = sha(raw)
    res = cbt("create", "-q", "-f", "qcow2", "-o",
              "data_file=%s,data_file_raw=on" % raw,
              os.path.join(str(tmp), "vm.qcow2"), "16M", check=False)
    assert res.rc != 0 and "more than the virtual size" in res.err, res
    assert sha(raw) == before


def test_checkpoints_and_backups_of_a_raw_disk(tmp):
    """Writes made by QEMU through the metadata image land in the raw
    file and in the checkpoint bitmaps; incrementals restore the raw disk
    exactly."""
    raw, meta, _ = adopt(tmp)
    bk = os.path.join(str(tmp), "bk")
    os.mkdir(bk)
    cbt("backup", "--full", meta, os.path.join(bk, "full.qcow2"))
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 4M 64k",
         "-c", "write -z 9M 64k", meta])
    res = cbt("backup", "--incremental", "--output=json", meta,
              os.path.join(bk, "inc1.qcow2"))
    assert res.json()["dirty-bytes"] == 128 * 1024, res.out
    for name in ("full.qcow2", "inc1.qcow2"):
        cbt("verify", os.path.join(bk, name))
    out = os.path.join(str(tmp), "restored.raw")
    cbt("restore", "-O", "raw", os.path.join(bk, "inc1.qcow2"), out)
    res = qemu_img("compare", "-f", "raw", "-F", "raw", raw, out, check=False)
    assert res.rc == 0, res
    # The raw file is still a usable raw disk on its own.
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x99 4M 64k", raw])


# ---- copy-only backups (--full --no-checkpoint) ----

import json  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402

from conftest import CBT  # noqa: E402


def raw_disk(tmp, name="plain.raw"):
    raw = os.path.join(str(tmp), name)
    qemu_img("create", "-q", "-f", "raw", raw, "16M")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M",
         "-c", "write -P 0x17 9M 192k", raw])
    return raw


def restore_equals(tmp, backup, disk, fmt):
    out = os.path.join(str(tmp), "r-" + os.path.basename(backup))
    cbt("restore", backup, out)
    res = qemu_img("compare", "-f", fmt, "-F", "qcow2", disk, out, check=False)
    assert res.rc == 0, res


def test_copy_only_backup_of_a_raw_disk(tmp):
    raw = raw_disk(tmp)
    before = sha(raw)
    bk = os.path.join(str(tmp), "bk")
    os.mkdir(bk)
    res = cbt("backup", "--full", "--no-checkpoint", "--output=json", raw,
              os.path.join(bk, "full.qcow2"))
    assert res.json()["checkpoint"] is None, res.out
    assert sha(raw) == before
    cbt("verify", os.path.join(bk, "full.qcow2"))
    restore_equals(tmp, os.path.join(bk, "full.qcow2"), raw, "raw")
    with open(os.path.join(bk, "full.qcow2.json")) as f:
        assert json.load(f)["checkpoint"] is None
    # Without --no-checkpoint a raw disk is refused, naming the ways out.
    res = cbt("backup", "--full", raw, os.path.join(bk, "x.qcow2"),
              check=False)
    assert res.rc != 0 and "--no-checkpoint" in res.err, res
    # Nothing can follow a copy-only backup.
    res = cbt("backup", "--incremental", "--no-checkpoint", raw,
              os.path.join(bk, "i.qcow2"), check=False)
    assert res.rc == 64, res


def test_copy_only_backup_of_a_read_only_qcow2(tmp):
    disk = os.path.join(str(tmp), "ro.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "16M")
    run(["qemu-io", "-c", "write -P 0x33 2M 64k", disk])
    cbt("checkpoint", "create", disk, "c1")
    os.chmod(disk, stat.S_IRUSR | stat.S_IRGRP)
    listed = cbt("checkpoint", "list", "--output=json", disk).out
    before = sha(disk)
    bk = os.path.join(str(tmp), "bk")
    os.mkdir(bk)
    cbt("backup", "--full", "--no-checkpoint", disk,
        os.path.join(bk, "full.qcow2"))
    assert sha(disk) == before
    assert cbt("checkpoint", "list", "--output=json", disk).out == listed
    restore_equals(tmp, os.path.join(bk, "full.qcow2"), disk, "qcow2")


def test_copy_only_backup_beside_readers_not_writers(tmp):
    """Shared reading: qemu-nbd -r may hold the disk; a writer may not."""
    raw = raw_disk(tmp)
    bk = os.path.join(str(tmp), "bk")
    os.mkdir(bk)
    sock = os.path.join(str(tmp), "n.sock")
    for ro, want in ((True, 0), (False, 75)):
        argv = ["qemu-nbd", "-t", "-f", "raw", "-k", sock, raw]
        if ro:
            argv.insert(1, "-r")
        p = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                if subprocess.run(["nbdinfo", "--size", "nbd+unix:///?socket="
                                   + sock], capture_output=True).returncode == 0:
                    break
                __import__("time").sleep(0.02)
            target = os.path.join(bk, "f-%s.qcow2" % ("ro" if ro else "rw"))
            res = cbt("backup", "--full", "--no-checkpoint", raw, target,
                      check=False)
            assert res.rc == want, (ro, res)
            assert os.path.exists(target) == (want == 0)
        finally:
            p.terminate()
            p.wait()
