"""`cbt backup --compress[=zstd|zlib]` (issue 13, section 3;
docs/backups.md, "Compression"), with QEMU's tools as oracles.

A disk of 64 KiB blocks of known kinds: compressible text, random bytes
(which do not shrink), zeroes written as data, never written, and a short
last cluster.  Then:
  * a full backup with --compress (zstd): `qemu-img check` is clean and
    counts exactly the text blocks (and the short tail) as compressed
    clusters and the random ones as plain allocated clusters; `qemu-img
    info` says the compression type; `qemu-img compare` and `qemu-img
    convert` read it as the disk; its hashes (root) are those of the data,
    equal to an uncompressed backup's; the manifest records the
    compression and the file's size; the file is smaller than the
    uncompressed backup's;
  * an incremental with --compress=zlib on top: only the changed blocks,
    compressed, the chain read by qemu-img (compare, convert) as the disk;
    `cbt restore` and `cbt verify` read the chain;
  * refusals before any file is written: -O raw, an unknown method, a raw
    chain; a write failure (ENOSPC) removes every file of the backup.
"""
import hashlib
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import KiB, MiB, cbt, qemu_img, no_crash  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import faultlib as F  # noqa: E402
import treemodel as T  # noqa: E402

B = 64 * KiB
NBLOCKS = 128
SIZE = NBLOCKS * B + 4 * KiB       # a short last cluster
USAGE, IO = 64, 74


def text_block(rng):
    words = [b"cbt", b"backs", b"up", b"disks", b"qcow2", b"clusters", b"lorem",
             b"ipsum", b"dolor", b"\n"]
    out = b" ".join(rng.choice(words) for _ in range(B // 4))
    return out[:B]


def make_disk(tmp, seed=1):
    """disk.qcow2 and the kinds of its blocks."""
    rng = random.Random(seed)
    raw = bytearray(SIZE)
    kinds = []
    for i in range(NBLOCKS):
        k = rng.choice(["text", "text", "random", "zero", "none"])
        if k == "text":
            raw[i * B:(i + 1) * B] = text_block(rng)
        elif k == "random":
            raw[i * B:(i + 1) * B] = rng.randbytes(B)
        kinds.append(k)
    raw[NBLOCKS * B:] = text_block(rng)[:SIZE - NBLOCKS * B]
    rawp = os.path.join(str(tmp), "content.raw")
    with open(rawp, "wb") as f:
        f.write(raw)
    disk = os.path.join(str(tmp), "disk.qcow2")
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", rawp, disk)
    # zero blocks written as data (allocated, reading zeroes)
    cmds = ["write -P 0 %d %d" % (i * B, B) for i, k in enumerate(kinds) if k == "zero"]
    L.run_qemu_io(disk, cmds)
    return disk, kinds, bytes(raw)


def root_of(view):
    """docs/backups.md's sha256-tree-v2 root (tests/treemodel.py)."""
    return T.root_of_bytes(view).hex()


def check_json(path):
    res = qemu_img("check", "--output=json", path, check=False)
    assert res.rc == 0, res
    data = json.loads(res.out)
    assert data.get("corruptions", 0) == 0 and data.get("leaks", 0) == 0, data
    return data


def backup(*args):
    res = no_crash(cbt("backup", "--output=json", *args, check=False))
    assert res.rc == 0, res
    return res.json()


def manifest(target):
    with open(target + ".json") as f:
        return json.load(f)


def same_view(a, b, tmp):
    """qemu-img compare, and qemu-img convert of both to raw, equal."""
    qemu_img("compare", "-U", a, b)
    ra, rb = os.path.join(str(tmp), "a.raw"), os.path.join(str(tmp), "b.raw")
    qemu_img("convert", "-U", "-O", "raw", a, ra)
    qemu_img("convert", "-U", "-O", "raw", b, rb)
    with open(ra, "rb") as f, open(rb, "rb") as g:
        assert f.read() == g.read()


def test_full_and_incremental_compressed(tmp):
    disk, kinds, raw = make_disk(tmp)
    repo = os.path.join(str(tmp), "repo")
    os.mkdir(repo)
    full = os.path.join(repo, "full.qcow2")
    r = backup("--full", "--compress", disk, full)
    assert r["compression"] == "zstd"
    data = check_json(full)
    n_text = kinds.count("text") + 1          # + the short tail
    n_random = kinds.count("random")
    assert data["compressed-clusters"] == n_text, (data, n_text)
    assert data["allocated-clusters"] == n_text + n_random, data
    info = json.loads(qemu_img("info", "--output=json", full).out)
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    same_view(disk, full, tmp)
    assert r["root"] == root_of(raw)
    m = manifest(full)
    assert m["image"]["compression"] == "zstd"
    assert m["bytes"]["file"] == os.path.getsize(full) == r["file-bytes"]
    # data bytes: every non-zero block, whole (compressed clusters are not
    # cut into 4 KiB pieces)
    assert r["bytes-copied"] == (n_text - 1 + n_random) * B + (SIZE - NBLOCKS * B)

    # the same disk uncompressed: same hashes, a bigger file
    plain = os.path.join(str(tmp), "plain.qcow2")
    rp = backup("--full", "--no-checkpoint", disk, plain)
    assert rp["root"] == r["root"]
    with open(full + ".tree", "rb") as f, open(plain + ".tree", "rb") as g:
        assert f.read() == g.read()
    assert "compression" not in manifest(plain)["image"]
    assert os.path.getsize(full) < os.path.getsize(plain)

    # an incremental, zlib: the changed blocks only, compressed
    rng = random.Random(7)
    changed = [3, 40, 41, 90]
    cmds = []
    for i in changed:
        path = os.path.join(str(tmp), "blk%d" % i)
        with open(path, "wb") as f:
            f.write(text_block(rng))
        cmds.append("write -s %s %d %d" % (path, i * B, B))
    L.run_qemu_io(disk, cmds)
    inc = os.path.join(repo, "inc.qcow2")
    r2 = backup("--incremental", "--compress=zlib", disk, inc)
    assert r2["bytes-copied"] == len(changed) * B
    data = check_json(inc)
    assert data["compressed-clusters"] == len(changed) == data["allocated-clusters"]
    info = json.loads(qemu_img("info", "--output=json", inc).out)
    assert info["format-specific"]["data"]["compression-type"] == "zlib"
    same_view(disk, inc, tmp)
    out = os.path.join(str(tmp), "restored.qcow2")
    no_crash(cbt("restore", inc, out))
    qemu_img("compare", out, disk)
    res = no_crash(cbt("verify", inc, check=False))
    assert res.rc == 0, res
    # an uncompressed incremental on a compressed chain
    L.run_qemu_io(disk, ["write -P 9 %d %d" % (100 * B, B)])
    inc2 = os.path.join(repo, "inc2.qcow2")
    r3 = backup("--incremental", disk, inc2)
    assert r3["compression"] is None and "compression" not in manifest(inc2)["image"]
    same_view(disk, inc2, tmp)


def test_compress_refusals(tmp):
    disk, _, _ = make_disk(tmp)
    repo = os.path.join(str(tmp), "repo")
    os.mkdir(repo)
    for args in (["--full", "--compress", "-O", "raw"], ["--full", "--compress=lz4"]):
        res = no_crash(cbt("backup", *args, disk, os.path.join(repo, "x"), check=False))
        assert res.rc == USAGE, res
        assert os.listdir(repo) == []
    # a raw chain cannot take a compressed incremental
    backup("--full", "-O", "raw", disk, os.path.join(repo, "full.raw"))
    L.run_qemu_io(disk, ["write -P 5 0 64k"])
    before = sorted(os.listdir(repo))
    res = no_crash(cbt("backup", "--incremental", "--compress", disk,
                       os.path.join(repo, "inc.qcow2"), check=False))
    assert res.rc == USAGE and "raw" in res.err, res
    assert sorted(os.listdir(repo)) == before


def test_compress_write_failure_removes_everything(tmp):
    disk, _, _ = make_disk(tmp)
    repo = os.path.join(str(tmp), "bk")
    os.mkdir(repo)
    full = os.path.join(repo, "full.qcow2")
    for nth in (2, 5, 9):
        res, cnt = F.run_faulty(["backup", "--full", "--compress", disk, full], "/bk/",
                                "write", nth, True, "ENOSPC")
        assert cnt["injected"] >= 1 and res.rc == IO, res
        assert os.listdir(repo) == [], os.listdir(repo)
    backup("--full", "--compress", disk, full)
    same_view(disk, full, tmp)
