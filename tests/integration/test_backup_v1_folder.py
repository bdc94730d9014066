"""A backup folder written by cbt before issue 14 (data/backup-v1, made by
its make.sh with main at 23b3ff6: format sha256-blocks-v1, a full and an
incremental backup, and the disk with checkpoints c0 and c1) must still
verify, restore, and carry an incremental: the code that streams .hashes
files and reads chains differently since then is checked against files it
did not write.

The expected view is rebuilt here from the writes make.sh did, and the
leaves and root of every backup from it by docs/backups.md's recipe.  The
first incremental on the old folder writes sha256-tree-v2 (manifest
version 2) holding its whole tree (byte for byte tests/treemodel.py's
record file of the view, built on the v1 parent's root); the next one
continues the chain in v2 with only what changed; both verify and restore
through the mixed chain.
"""
import hashlib
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "interop"))
from interop_lib import KiB, cbt_ok, qemu_img, qemu_io  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import treemodel as T  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                    "backup-v1")
B = 64 * KiB
SIZE = 2 * 1024 * 1024 + 7680


def view(writes):
    v = bytearray(SIZE)
    for pat, off, n in writes:
        v[off:off + n] = bytes([pat]) * n
    return bytes(v)


FULL = [(0x11, 0, 64 * KiB), (0x22, 300 * KiB, 100 * KiB),
        (0x33, 2096640, 7680)]
INC = FULL + [(0x44, 64 * KiB, 64 * KiB), (0, 300 * KiB, 8 * KiB),
              (0x55, 1024 * KiB, 4 * KiB)]


def leaves(v):
    return b"".join(hashlib.sha256(v[i:i + B]).digest()
                    for i in range(0, len(v), B))


def folder(tmp_path):
    d = tmp_path / "bk"
    shutil.copytree(HERE, d)
    return d


def test_old_folder_verifies_and_restores(tmp_path):
    d = folder(tmp_path)
    for name, writes in (("full.qcow2", FULL), ("inc.qcow2", INC)):
        want = leaves(view(writes))
        with open(d / (name + ".hashes"), "rb") as f:
            assert f.read() == want, name  # the fixture is what we think
        with open(d / (name + ".json")) as f:
            assert json.load(f)["hash"]["root"] == \
                hashlib.sha256(want).hexdigest()
        cbt_ok("verify", str(d / name))
        out = str(tmp_path / ("restored-" + name + ".raw"))
        cbt_ok("restore", "-O", "raw", str(d / name), out)
        with open(out, "rb") as f:
            assert f.read() == view(writes), name


def test_new_incremental_on_old_folder(tmp_path):
    d = folder(tmp_path)
    disk = str(d / "disk.qcow2")
    qemu_io("-f", "qcow2", disk, "-c", "write -P 0x66 1536k 64k",
            "-c", "discard 0 64k")
    cbt_ok("backup", "--incremental", "--checkpoint", "c2", disk,
           str(d / "inc2.qcow2"))
    v = bytearray(view(INC))
    v[1536 * KiB:1600 * KiB] = b"\x66" * (64 * KiB)
    v[0:64 * KiB] = bytes(64 * KiB)
    with open(d / "inc.qcow2.json") as f:
        v1root = bytes.fromhex(json.load(f)["hash"]["root"])
    with open(d / "inc2.qcow2.json") as f:
        m = json.load(f)
    assert m["version"] == 2 and m["hash"]["algorithm"] == "sha256-tree-v2"
    assert m["hash"]["file"] == "inc2.qcow2.tree"
    with open(d / "inc2.qcow2.tree", "rb") as f:
        assert f.read() == T.record_file(SIZE, T.leaves_of(bytes(v)), v1root)
    assert m["hash"]["root"] == T.root_of_bytes(bytes(v)).hex()
    cbt_ok("verify", str(d / "inc2.qcow2"))
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "qcow2", disk,
             str(d / "inc2.qcow2"))

    # the chain goes on in v2: only what changed is recorded
    qemu_io("-f", "qcow2", disk, "-c", "write -P 0x77 128k 4k")
    cbt_ok("backup", "--incremental", "--checkpoint", "c3", disk,
           str(d / "inc3.qcow2"))
    v2 = bytearray(v)
    v2[128 * KiB:132 * KiB] = b"\x77" * (4 * KiB)
    pnodes, proot = T.tree(SIZE, T.leaves_of(bytes(v)))
    with open(d / "inc3.qcow2.tree", "rb") as f:
        assert f.read() == T.record_file(SIZE, T.leaves_of(bytes(v2)), proot,
                                         pnodes)
    assert len(T.chain_files(str(d / "inc3.qcow2"))) == 2
    T.check_backup(str(d / "inc3.qcow2"), bytes(v2))
    cbt_ok("verify", str(d / "inc3.qcow2"))
    out = str(tmp_path / "restored-inc3.raw")
    cbt_ok("restore", "-O", "raw", str(d / "inc3.qcow2"), out)
    with open(out, "rb") as f:
        assert f.read() == bytes(v2)

    # The mixed folder as one repository: every point verifies; a prune
    # that keeps only inc3 folds inc2's records (the whole tree) into it.
    res = cbt_ok("repo", "verify", "--output=json", str(d))
    pts = json.loads(res.out)["points"]
    assert sorted(p["file"] for p in pts if p["ok"]) == \
        ["full.qcow2", "inc.qcow2", "inc2.qcow2", "inc3.qcow2"], pts
    cbt_ok("repo", "prune", "--keep-last", "1", "--force", str(d))
    assert sorted(n for n in os.listdir(d)
                  if n not in ("disk.qcow2", "make.sh", "cbt-verified.json")) == \
        ["inc3.qcow2", "inc3.qcow2.json", "inc3.qcow2.tree"]
    with open(d / "inc3.qcow2.tree", "rb") as f:
        assert f.read() == T.record_file(SIZE, T.leaves_of(bytes(v2)))
    cbt_ok("verify", str(d / "inc3.qcow2"))
    os.unlink(out)
    cbt_ok("restore", "-O", "raw", str(d / "inc3.qcow2"), out)
    with open(out, "rb") as f:
        assert f.read() == bytes(v2)
