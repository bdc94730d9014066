"""sha256-tree-v2 (docs/backups.md "Block hashes: sha256-tree-v2", issue
14) against an independent model: tests/treemodel.py, written from the
documented layout with hashlib only.

  * roots from restored images: a full backup, two incrementals and a
    prune that folds the full and the first incremental into the second;
    each point restored by `cbt restore`, read back as raw by `qemu-img
    convert`, and the model's root of those bytes must be the manifest's;
    the chain's record files must define the model's tree node for node;
    a record changed with its file vouched for again (file-sha256) is
    caught by the root check, which names the record file;
  * metadata proportional to the data: on a 1 TiB disk, a full backup of
    a few blocks and then an incremental of 100 MiB (1600 blocks of 64
    KiB spread over 1 GiB) write record files of under 1% of the bytes
    they store (sha256-blocks-v1 wrote 512 MiB for each), the
    incremental's records exactly the nodes that differ from its parent's
    view (the model's, computed from the known writes), and cbt verify
    accepts the chain.
"""
import hashlib
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import KiB, MiB, cbt_ok, qemu_img  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import treemodel as T  # noqa: E402

B = 64 * KiB
GiB = 1 << 30
TiB = 1 << 40


def manifest(target):
    with open(target + ".json") as f:
        return json.load(f)


def restored_root(target, tmp):
    """The model's root of what `cbt restore` gives back, read as raw by
    qemu-img (an oracle route independent of cbt's reader)."""
    out = os.path.join(tmp, "r.qcow2")
    raw = os.path.join(tmp, "r.raw")
    for p in (out, raw):
        if os.path.exists(p):
            os.unlink(p)
    cbt_ok("restore", "-O", "qcow2", target, out)
    qemu_img("convert", "-f", "qcow2", "-O", "raw", out, raw)
    with open(raw, "rb") as f:
        data = f.read()
    return T.root_of_bytes(data).hex(), data


def test_roots_of_restored_points_and_after_prune(tmp_path):
    tmp = str(tmp_path)
    disk = os.path.join(tmp, "disk.qcow2")
    bk = os.path.join(tmp, "bk")
    os.mkdir(bk)
    size = 40 * MiB + 3 * KiB        # a short last block
    qemu_img("create", "-q", "-f", "qcow2", disk, size)
    rng = random.Random(14)

    def scribble(n):
        cmds = []
        for _ in range(n):
            off = rng.randrange(0, size - 8 * KiB) // 512 * 512
            kind = rng.choice(["w", "w", "w", "z"])
            ln = rng.choice([512, 4 * KiB, 64 * KiB, 200 * KiB])
            ln = min(ln, size - off) // 512 * 512
            cmds.append("write -z %d %d" % (off, ln) if kind == "z" else
                        "write -P %d %d %d" % (rng.randrange(1, 255), off, ln))
        cmds.append("write -P 9 %d 512" % (size - 512))
        L.run_qemu_io(disk, cmds)

    points = []
    for i, mode in enumerate(["--full", "--incremental", "--incremental"]):
        scribble(40)
        t = os.path.join(bk, "p%d.qcow2" % i)
        cbt_ok("backup", mode, disk, t)
        points.append(t)
        root, data = restored_root(t, tmp)
        m = manifest(t)
        assert m["version"] == 2 and m["hash"]["algorithm"] == "sha256-tree-v2"
        assert m["hash"]["root"] == root, "point %d" % i
        T.check_backup(t, data, root)
    # the full and the first incremental folded into the second
    cbt_ok("repo", "prune", "--keep-last", "1", "--force", bk)
    assert sorted(os.listdir(bk)) == ["p2.qcow2", "p2.qcow2.json", "p2.qcow2.tree"]
    m = manifest(points[2])
    root, data = restored_root(points[2], tmp)
    assert m["hash"]["root"] == root and m["parent"] is None
    assert len(T.chain_files(points[2])) == 1
    T.check_backup(points[2], data, root)
    with open(points[2] + ".tree", "rb") as f:
        # a point with no parent holds exactly the nodes that are not zeroes
        assert f.read() == T.record_file(size, T.leaves_of(data))
    cbt_ok("verify", points[2])

    # A record file changed and vouched for again by its manifest
    # (file-sha256 updated, root not): the records no longer recompute
    # the root, and verify and restore name the record file.
    with open(points[2] + ".tree", "rb") as f:
        buf = bytearray(f.read())
    _, recs, _ = T.parse_records(bytes(buf))
    k1 = next(n for n, (k, _, _) in enumerate(recs) if k == 1)
    buf[64 + 41 * k1 + 20] ^= 1
    with open(points[2] + ".tree", "wb") as f:
        f.write(buf)
    m["hash"]["file-sha256"] = hashlib.sha256(bytes(buf)).hexdigest()
    with open(points[2] + ".json", "w") as f:
        json.dump(m, f)
    for args in (["verify", points[2]],
                 ["restore", points[2], os.path.join(tmp, "bad.qcow2")]):
        res = L.cbt_rc(*args)
        assert res.rc == 65, res
        assert "p2.qcow2.tree" in res.err and "level 1" in res.err, res
    assert not os.path.exists(os.path.join(tmp, "bad.qcow2"))


def test_metadata_follows_the_data_on_a_1tib_disk(tmp_path):
    tmp = str(tmp_path)
    disk = os.path.join(tmp, "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, str(TiB))
    leaves = {}

    def put(block, pat):
        leaves[block] = hashlib.sha256(bytes([pat]) * B).digest()
        return "write -P %d %d %d" % (pat, block * B, B)

    L.run_qemu_io(disk, [put(b, 0x11) for b in (0, 12345, TiB // B - 1)])
    full = os.path.join(tmp, "full.qcow2")
    r = json.loads(cbt_ok("backup", "--full", "--output=json", disk, full).out)
    tree_full = os.path.getsize(full + ".tree")
    assert tree_full < 0.01 * r["bytes-copied"], (tree_full, r)
    pnodes, proot = T.tree(TiB, leaves)
    with open(full + ".tree", "rb") as f:
        assert f.read() == T.record_file(TiB, leaves)

    # 100 MiB: 1600 blocks of 64 KiB spread over the first GiB
    rng = random.Random(1600)
    blocks = sorted(rng.sample(range(GiB // B), 1600))
    L.run_qemu_io(disk, [put(b, 0x22 + i % 100) for i, b in enumerate(blocks)])
    inc = os.path.join(tmp, "inc.qcow2")
    r = json.loads(cbt_ok("backup", "--incremental", "--output=json", disk,
                          inc).out)
    assert r["bytes-copied"] == 1600 * B, r
    meta = os.path.getsize(inc + ".tree") + os.path.getsize(inc + ".json")
    assert meta < 0.01 * r["bytes-copied"], (meta, r["bytes-copied"])
    with open(inc + ".tree", "rb") as f:
        assert f.read() == T.record_file(TiB, leaves, proot, pnodes)
    root = T.check_leaves(T.chain_files(inc), TiB, leaves,
                          manifest(inc)["hash"]["root"])
    assert r["root"] == root
    cbt_ok("verify", inc)
