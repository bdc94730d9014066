"""cbt repo clean: the leftovers of interrupted cbt runs go, nothing else
(issue 13, section 1).  Files another process holds stay: qemu-io keeps a
work file open (with QEMU's locks), this test process locks a scratch
file's owner byte as a running live backup does."""
import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import faultlib as F  # noqa: E402
from conftest import cbt, qemu_img  # noqa: E402
from repolib import Repo  # noqa: E402

SCRATCH_OWNER_BYTE = 0x636274


@pytest.fixture
def repo(tmp):
    r = Repo(tmp)
    r.write("write -P 1 0 4M")
    r.backup("f.qcow2", "--full")
    r.write("write -P 2 1M 1M")
    r.backup("i1.qcow2")
    return r


def plant(bk):
    old = time.time() - 3600
    qemu_img("create", "-f", "qcow2", bk / "x.qcow2.part", "1M")
    (bk / "y.qcow2").write_bytes(b"QFI\xfb")
    (bk / "y.qcow2.hashes").write_bytes(b"\0" * 64)
    (bk / "z.qcow2.hashes").write_bytes(b"\0" * 32)
    qemu_img("create", "-f", "qcow2", bk / "s.qcow2.scratch", "1M")
    (bk / "i1.qcow2.json.tmp-ab12cd").write_bytes(b"{")
    os.utime(bk / "i1.qcow2.json.tmp-ab12cd", (old, old))
    (bk / "f.qcow2.json.tmp-zz99zz").write_bytes(b"{")        # fresh: stays
    (bk / "i1.qcow2.json.prune-new").write_bytes(b"{")
    # Not cbt's, or damage: never removed.
    (bk / "notes.txt").write_text("mine")
    (bk / "other.json").write_text("{}")
    (bk / "w.scratch").write_text("not a qcow2 file")
    (bk / "d.qcow2").write_bytes(b"QFI\xfb")
    (bk / "d.qcow2.json").write_text('{"format": "cbt-backup", ')


POINTS = ["f.qcow2", "f.qcow2.json", "f.qcow2.tree",
          "i1.qcow2", "i1.qcow2.json", "i1.qcow2.tree"]
KEPT = POINTS + ["notes.txt", "other.json", "w.scratch", "d.qcow2", "d.qcow2.json",
                 "f.qcow2.json.tmp-zz99zz"]


def test_clean_removes_exactly_the_leftovers(repo):
    plant(repo.bk)
    before = repo.files()
    out = cbt("repo", "clean", "--output=json", repo.bk).json()
    assert out["dry-run"] is True
    assert repo.files() == before, "a dry run changed the folder"
    going = {i["file"] for i in out["leftovers"] if i["kept"] is None}
    assert going == {"x.qcow2.part", "y.qcow2", "y.qcow2.hashes", "z.qcow2.hashes",
                     "s.qcow2.scratch", "i1.qcow2.json.tmp-ab12cd",
                     "i1.qcow2.json.prune-new"}
    res = cbt("repo", "clean", "--force", repo.bk)
    assert "Removed 7 files" in res.out, res
    assert sorted(os.listdir(repo.bk)) == sorted(KEPT)
    assert {k: v for k, v in repo.files().items()} == {k: before[k] for k in KEPT}
    for p in ("f.qcow2", "i1.qcow2"):
        repo.assert_point(p)


def test_clean_keeps_what_is_in_use(repo):
    bk = repo.bk
    qemu_img("create", "-f", "qcow2", bk / "x.qcow2.part", "1M")
    qemu_img("create", "-f", "qcow2", bk / "s.qcow2.scratch", "1M")
    holder = subprocess.Popen(["qemu-io", "-f", "qcow2", str(bk / "x.qcow2.part")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    fd = os.open(bk / "s.qcow2.scratch", os.O_RDWR)
    try:
        holder.stdin.write(b"read 0 512\n")
        holder.stdin.flush()
        holder.stdout.readline()                 # the image is open
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, SCRATCH_OWNER_BYTE)
        out = cbt("repo", "clean", "--force", "--output=json", bk).json()
        kept = {i["file"]: i["kept"] for i in out["leftovers"]}
        assert "in use" in kept["x.qcow2.part"] and "in use" in kept["s.qcow2.scratch"]
        assert os.path.exists(bk / "x.qcow2.part") and os.path.exists(bk / "s.qcow2.scratch")
    finally:
        os.close(fd)
        holder.stdin.close()
        holder.wait()
    cbt("repo", "clean", "--force", bk)
    assert sorted(os.listdir(bk)) == sorted(POINTS)


def test_clean_after_a_killed_backup(repo):
    repo.write("write -P 5 0 16M")
    target = repo.bk / "k.qcow2"
    sent, rc, err = F.run_signalled(
        ["backup", "--incremental", repo.disk, target], "k.qcow2.part", 3,
        signal.SIGKILL, op="write")
    assert sent and rc == -signal.SIGKILL, (sent, rc, err)
    assert os.path.exists(repo.bk / "k.qcow2.part")
    # The backup refuses the name until the leftovers go.
    assert cbt("backup", "--incremental", repo.disk, target, check=False).rc != 0
    cbt("repo", "clean", "--force", repo.bk)
    assert sorted(os.listdir(repo.bk)) == sorted(POINTS)
    repo.backup("k.qcow2")
    repo.assert_point("k.qcow2")


def test_clean_empty_and_usage(tmp):
    (tmp / "bk").mkdir()
    assert "no leftovers" in cbt("repo", "clean", tmp / "bk").out
    assert cbt("repo", "clean", "--keep-last", "1", tmp / "bk", check=False).rc == 64
    assert cbt("repo", "verify", "--force", tmp / "bk", check=False).rc == 64
