"""`cbt backup`: full, incremental and differential backups, with QEMU's
tools as oracles (issue 5, section 2; docs/backups.md).

  * a story on one disk (qemu-io writes with patterns, zero writes and
    discards between backups): full, incremental, incremental, differential
    since the full, incremental again.  Before each backup a reference is
    taken by another route (`qemu-img convert -O raw DISK ref.raw`); then
      - `qemu-img compare` of the backup (a qcow2 chain qemu-img reads
        through its relative backing names) with the reference;
      - `qemu-img check` clean on every backup file;
      - the incremental alone (`qemu-img map` without its backing file)
        allocates exactly the 64 KiB blocks of the checkpoint's dirty
        extents (`cbt bitmap --dump --chain` before the backup); blocks
        that now read as zeroes are zero clusters, not data;
      - the manifest: fields, parent link and its manifest's SHA-256, the
        record file (.tree): a full backup's byte for byte the model's
        (tests/treemodel.py, from docs/backups.md: records exactly for the
        nodes that are not zeroes), an incremental's exactly the nodes
        that differ from its parent's view, the chain's view node for
        node the model's tree of the reference, and the root the model's;
      - the checkpoints: one more each time, since -> new as reported;
  * the same story with raw targets: sparse files (SEEK_DATA finds data
    only inside "data" extents), the extents list exactly the dirty
    blocks, and the chain rebuilt here from the extents equals the
    references;
  * disks of other cluster sizes (4 KiB, 1 MiB) and a bitmap of 512 KiB
    granularity: blocks still 64 KiB, chains still equal;
  * resizes (grow, shrink, grow to a size that is not a block multiple)
    between incrementals: the backup has the new size and equals the
    reference, for qcow2 and raw;
  * --auto: a full backup with the reason when there is no checkpoint,
    when its backup is missing from the folder, a rescan when the
    checkpoint's bitmap is disabled; without --auto the same cases are
    refused with it;
  * refusals that leave the disk byte-identical and create no file: no
    mode, an existing TARGET (also one left by an interrupted backup), a
    TARGET in the disk's chain, a checkpoint name in use (checkpoint or
    bitmap), an unknown --since, a raw disk, a format other than the
    parent's, a damaged parent record file, bad options;
  * failures after files were written (the manifest cannot be written, the
    target's folder is read-only) remove every file and leave the disk's
    checkpoints as before, also for the disk's first checkpoint;
  * --output=json and the human summary; -p prints nothing without a
    terminal.
"""
import hashlib
import json
import os
import random
import stat
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import KiB, MiB, cbt, qemu_img, qemu_io, no_crash  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import faultlib as F  # noqa: E402
import treemodel as T  # noqa: E402

B = 64 * KiB
SIZE = 8 * MiB


# ---- helpers ----

def root_of(view):
    """docs/backups.md's recipe (sha256-tree-v2, tests/treemodel.py)."""
    return T.root_of_bytes(view).hex(), None


def read(path):
    with open(path, "rb") as f:
        return f.read()


def sha_file(path):
    return hashlib.sha256(read(path)).hexdigest()


def reference(disk, path):
    qemu_img("convert", "-O", "raw", disk, path)
    return read(path)


def backup(*args):
    res = no_crash(cbt("backup", "--output=json", *args))
    return res.json()


# exit statuses (docs/cli.md, "Exit status")
FAILED, USAGE, CORRUPT, NEED_FULL = 1, 64, 65, 79


def backup_fails(*args, rc=FAILED):
    res = no_crash(cbt("backup", *args, check=False))
    assert res.rc == rc, res
    assert res.out == "", res
    assert res.err.count("\n") <= 2, res
    return res.err


def checkpoints(disk):
    return json.loads(cbt("checkpoint", "list", "--output=json", disk).out)


def manifest(target):
    with open(target + ".json") as f:
        return json.load(f)


def dirty_blocks(disk, name, size):
    """Block indexes the checkpoint's union over the chain touches."""
    out = cbt("bitmap", "--dump", "--chain", "--output=json", disk, name).out
    blocks = set()
    for e in json.loads(out):
        if e["dirty"]:
            end = min(e["start"] + e["length"], size)
            blocks.update(range(e["start"] // B, (end + B - 1) // B))
    return blocks


def map_alone(path):
    """qemu-img map of one qcow2 file without its backing file."""
    spec = 'json:{"driver":"qcow2","backing":null,' \
           '"file":{"driver":"file","filename":"%s"}}' % path
    return json.loads(qemu_img("map", "--output=json", spec).out)


def blocks_of(entries, pred, size):
    out = set()
    for e in entries:
        if pred(e):
            end = min(e["start"] + e["length"], size)
            out.update(range(e["start"] // B, (end + B - 1) // B))
    return out


def random_io(rng, size, n, align=512, maxlen=256 * KiB):
    """Writes with patterns, zero writes and discards (qemu-io syntax)."""
    cmds = []
    for _ in range(n):
        off = rng.randrange(0, size // align) * align
        length = min(rng.randrange(1, maxlen // align + 1) * align, size - off)
        kind = rng.random()
        if kind < 0.55:
            cmds.append("write -P %d %d %d" % (rng.randrange(1, 255), off, length))
        elif kind < 0.8:
            cmds.append("write -z %d %d" % (off, length))
        else:
            cmds.append("discard %d %d" % (off, length))
    return cmds


def apply_io(disk, cmds):
    if cmds:
        qemu_io("-f", "qcow2", *L.io_args(cmds), disk)


def raw_view(chain, size):
    """The guest view of a raw backup chain (full first), rebuilt from the
    files and their manifests' extents."""
    view = bytearray()
    for i, t in enumerate(chain):
        m = manifest(t)
        data = read(t)
        assert len(data) == m["image"]["virtual-size"]
        vs = m["image"]["virtual-size"]
        if i == 0:
            view = bytearray(data)
            continue
        if len(view) < vs:
            view += bytes(vs - len(view))
        del view[vs:]
        for start, length, kind in m["extents"]:
            view[start:start + length] = (data[start:start + length]
                                          if kind == "data" else bytes(length))
    assert len(view) == size
    return bytes(view)


def data_regions(path):
    """(start, end) of the file's data per SEEK_DATA / SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h))
            pos = h
    finally:
        os.close(fd)
    return out


def check_manifest(m, target, kind, since, parent, size, view, ckpt,
                   parent_view=None):
    root, _ = root_of(view)
    assert m["format"] == "cbt-backup" and m["version"] == 2
    assert m["complete"] is True
    assert m["kind"] == kind
    assert m["since"] == since
    assert m["checkpoint"]["name"] == ckpt["name"]
    assert m["checkpoint"]["order"] == ckpt["order"]
    assert m["checkpoint"]["created"] == ckpt["created"]
    assert m["image"] == {"file": os.path.basename(target),
                          "format": m["image"]["format"], "virtual-size": size}
    if parent is None:
        assert m["parent"] is None
    else:
        assert m["parent"] == {"file": os.path.basename(parent),
                               "manifest-sha256": sha_file(parent + ".json")}
    h = m["hash"]
    assert h["algorithm"] == "sha256-tree-v2" and h["block-size"] == B
    assert h["fanout"] == 256
    assert h["blocks"] == (size + B - 1) // B
    assert h["file"] == os.path.basename(target) + ".tree"
    assert h["file-sha256"] == sha_file(target + ".tree")
    assert h["root"] == root, "manifest root differs from the reference's"
    T.check_backup(target, view, h["root"])
    recs = read(target + ".tree")
    if parent is None:
        assert recs == T.record_file(size, T.leaves_of(view))
    elif parent_view is not None and len(parent_view) == size:
        # exactly the nodes that differ from the parent's view
        pnodes, proot = T.tree(size, T.leaves_of(parent_view))
        assert recs == T.record_file(size, T.leaves_of(view), proot, pnodes)
    assert not any(".tmp" in n or n.endswith(".part")
                   for n in os.listdir(os.path.dirname(target)))


def check_qcow2_incremental(target, expect_blocks, view, size):
    """The incremental alone allocates exactly the dirty blocks; blocks
    reading as zeroes are zero clusters."""
    ents = map_alone(target)
    allocated = blocks_of(ents, lambda e: e["present"], size)
    assert allocated == expect_blocks, (
        "allocated %s, dirty %s" % (sorted(allocated - expect_blocks)[:10],
                                    sorted(expect_blocks - allocated)[:10]))
    zero_blocks = {i for i in expect_blocks
                   if view[i * B:(i + 1) * B] == bytes(len(view[i * B:(i + 1) * B]))}
    data_blocks = blocks_of(ents, lambda e: e["present"] and e["data"], size)
    assert not (zero_blocks & data_blocks), "zeroes stored as data"
    zero_clusters = blocks_of(ents, lambda e: e["present"] and e["zero"]
                              and not e["data"], size)
    assert zero_blocks <= zero_clusters


class Story:
    """A disk and its backups in one folder."""

    def __init__(self, tmp, fmt="qcow2", cluster=None, size=SIZE, seed=1):
        self.tmp = str(tmp)
        self.repo = os.path.join(self.tmp, "repo")
        os.mkdir(self.repo)
        self.disk = os.path.join(self.tmp, "disk.qcow2")
        opts = ["-f", "qcow2"]
        if cluster:
            opts += ["-o", "cluster_size=%d" % cluster]
        qemu_img("create", "-q", *opts, self.disk, size)
        self.fmt = fmt
        self.rng = random.Random(seed)
        self.n = 0
        self.backups = []   # (target, kind, ref view)

    def io(self, n=12, **kw):
        size = json.loads(qemu_img("info", "--output=json", self.disk).out)["virtual-size"]
        apply_io(self.disk, random_io(self.rng, size, n, **kw))

    def take(self, mode_args, kind, since=None, parent=None, name=None):
        self.n += 1
        target = os.path.join(self.repo, "b%d.%s" % (self.n, self.fmt))
        ref = os.path.join(self.tmp, "ref%d.raw" % self.n)
        view = reference(self.disk, ref)
        size = len(view)
        before = checkpoints(self.disk)["checkpoints"]
        ck_since = None
        if kind != "full":
            ck_since = since or before[-1]["name"]
            expect_blocks = dirty_blocks(self.disk, ck_since, size)
            psize = manifest(parent)["image"]["virtual-size"]
            # the smallest size since the checkpoint, as its successors saw it
            order = next(c["order"] for c in before if c["name"] == ck_since)
            low = min([psize, size] + [c["virtual-size"] for c in before
                                       if c["order"] >= order])
            if psize != size or low < size:
                expect_blocks |= set(range(low // B, (size + B - 1) // B))
        args = list(mode_args) + ["-O", self.fmt]
        if name:
            args += ["--checkpoint", name]
        res = backup(*(args + [self.disk, target]))
        after = checkpoints(self.disk)["checkpoints"]
        assert [c["name"] for c in after] == [c["name"] for c in before] + [res["checkpoint"]]
        ckpt = after[-1]
        assert res["kind"] == kind and res["since"] == ck_since
        assert res["virtual-size"] == size
        assert res["root"] == root_of(view)[0]
        m = manifest(target)
        pview = next((v for t, _, v in self.backups if t == parent), None)
        check_manifest(m, target, kind, ck_since, parent, size, view, ckpt,
                       pview)
        assert m["bytes"] == {"dirty": res["dirty-bytes"], "copied": res["bytes-copied"],
                              "zeroed": res["bytes-zeroed"],
                              "file": os.path.getsize(target)}
        assert res["file-bytes"] == os.path.getsize(target)
        if self.fmt == "qcow2":
            qemu_img("check", "-q", target)
            qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", target, ref)
            if kind != "full":
                # past the parent's end a qcow2 chain reads zeroes: zero
                # blocks there need no zero clusters
                past = {i for i in expect_blocks if i * B >= psize
                        and not view[i * B:(i + 1) * B].strip(b"\0")}
                check_qcow2_incremental(target, expect_blocks - past, view, size)
                info = json.loads(qemu_img("info", "--output=json", target).out)
                assert info["backing-filename"] == os.path.basename(parent)
                assert info["backing-filename-format"] == "qcow2"
                assert info["cluster-size"] == B
            else:
                assert m["extents"] is None
                # as thin as the disk: only non-zero data is stored
                ents = map_alone(target)
                stored = blocks_of(ents, lambda e: e["data"], size)
                nz = {i for i in range(len(view) // B + 1)
                      if view[i * B:(i + 1) * B].strip(b"\0")}
                assert stored == nz
        else:
            assert m["image"]["format"] == "raw"
            ext = m["extents"]
            carried = set()
            for start, length, k in ext:
                assert k in ("data", "zero")
                carried.update(range(start // B, (start + length + B - 1) // B))
            if kind == "full":
                assert sum(e[1] for e in ext) == size
            else:
                assert carried == expect_blocks
            data_ext = [(st, st + n) for st, n, k in ext if k == "data"]
            for d0, d1 in data_regions(target):
                assert any(a <= d0 and d1 <= (b + 4095) // 4096 * 4096
                           for a, b in data_ext), \
                    "raw target holds data outside its data extents"
            chain = self.chain_of(target)
            assert raw_view(chain, size) == view
        os.unlink(ref)
        self.backups.append((target, kind, view))
        return target, res

    def chain_of(self, target):
        chain = [target]
        while True:
            m = manifest(chain[-1])
            if m["parent"] is None:
                return list(reversed(chain))
            chain.append(os.path.join(self.repo, m["parent"]["file"]))


# ---- the story ----

@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_full_incremental_differential(tmp, fmt):
    s = Story(tmp, fmt=fmt, seed=7 if fmt == "qcow2" else 8)
    s.io(20)
    full, r = s.take(["--full"], "full", name="c0")
    assert r["parent"] is None and r["fallback"] is None
    s.io(10)
    inc1, r = s.take(["--incremental"], "incremental", parent=full, name="c1")
    assert r["parent"] == full and r["since"] == "c0"
    assert r["dirty-bytes"] < SIZE
    s.io(10)
    inc2, _ = s.take(["--incremental"], "incremental", parent=inc1)
    s.io(6)
    diff, r = s.take(["--since", "c0"], "differential", since="c0", parent=full)
    assert r["parent"] == full
    s.io(6)
    # an incremental after the differential builds on it
    s.take(["--incremental"], "incremental", parent=diff)
    # and nothing written: an empty incremental
    empty, r = s.take(["--incremental"], "incremental", parent=os.path.join(
        s.repo, "b5." + fmt))
    assert r["dirty-bytes"] == 0 and r["bytes-copied"] == 0


def test_zero_and_discard_ranges(tmp):
    """Whole blocks zeroed or discarded are zero clusters in the
    incremental; a partly zeroed block is data; nothing else is allocated."""
    s = Story(tmp)
    apply_io(s.disk, ["write -P 5 0 2M", "write -P 6 4M 1M"])
    full, _ = s.take(["--full"], "full")
    apply_io(s.disk, ["write -z 0 256k", "discard 1M 128k", "write -z 4M 4k",
                      "write -P 0 4608k 64k"])
    inc, r = s.take(["--incremental"], "incremental", parent=full)
    ents = map_alone(inc)
    zero = blocks_of(ents, lambda e: e["present"] and e["zero"] and not e["data"], SIZE)
    data = blocks_of(ents, lambda e: e["present"] and e["data"], SIZE)
    assert set(range(0, 4)) | set(range(16, 18)) | {72} <= zero
    assert 64 in data  # 4 KiB zeroed inside data: the block is data
    assert r["bytes-copied"] == B
    assert r["bytes-zeroed"] == 7 * B


@pytest.mark.parametrize("cluster,gran", [(4 * KiB, None), (1 * MiB, None),
                                          (64 * KiB, 512 * KiB)])
def test_other_granularities(tmp, cluster, gran):
    s = Story(tmp, cluster=cluster, seed=cluster)
    s.io(12, maxlen=40 * KiB)
    full_args = ["--full"] + (["-g", str(gran)] if gran else [])
    full, _ = s.take(full_args, "full")
    s.io(12, maxlen=40 * KiB)
    inc, _ = s.take(["--incremental"], "incremental", parent=full)
    s.io(8, maxlen=20 * KiB)
    s.take(["--incremental"], "incremental", parent=inc)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_resize_between_backups(tmp, fmt):
    s = Story(tmp, fmt=fmt, size=4 * MiB, seed=11)
    apply_io(s.disk, ["write -P 1 0 4M"])
    full, _ = s.take(["--full"], "full")
    # grow: the new tail reads zeroes, then some of it is written
    cbt("resize", s.disk, 6 * MiB + 512)
    apply_io(s.disk, ["write -P 2 5M 100k", "write -P 3 4M 512"])
    inc1, r = s.take(["--incremental"], "incremental", parent=full)
    assert r["virtual-size"] == 6 * MiB + 512
    # shrink to a size inside a block
    cbt("resize", "--shrink", s.disk, 3 * MiB + 1536)
    apply_io(s.disk, ["write -P 4 1M 8k"])
    inc2, r = s.take(["--incremental"], "incremental", parent=inc1)
    assert r["virtual-size"] == 3 * MiB + 1536
    # grow again: past the parent's end the chain must read zeroes, not the
    # older, larger backups' data
    cbt("resize", s.disk, 7 * MiB)
    inc3, r = s.take(["--incremental"], "incremental", parent=inc2)
    assert r["virtual-size"] == 7 * MiB
    c0 = manifest(full)["checkpoint"]["name"]
    diff, r = s.take(["--since", c0], "differential", since=c0, parent=full)
    assert r["virtual-size"] == 7 * MiB


# ---- --auto and refusals ----

def disk_state(disk):
    return sha_file(disk), checkpoints(disk)


def assert_no_files(folder, keep=()):
    left = sorted(set(os.listdir(folder)) - set(keep))
    assert left == [], left


def test_auto_and_impossible_incrementals(tmp):
    s = Story(tmp)
    s.io(6)
    target = os.path.join(s.repo, "x.qcow2")
    state = disk_state(s.disk)
    err = backup_fails("--incremental", s.disk, target, rc=NEED_FULL)
    assert "has no checkpoint" in err
    assert disk_state(s.disk) == state
    assert_no_files(s.repo)
    # --auto: a full backup, saying why
    res = no_crash(cbt("backup", "--auto", s.disk, target))
    assert "Note: full backup instead of incremental" in res.out
    assert "has no checkpoint" in res.out
    j = manifest(target)
    assert j["kind"] == "full"
    first = j["checkpoint"]["name"]

    # the checkpoint's bitmap disabled behind cbt's back
    s.io(4)
    qemu_img("bitmap", "--disable", s.disk, first)
    t2 = os.path.join(s.repo, "y.qcow2")
    state = disk_state(s.disk)
    err = backup_fails("--incremental", s.disk, t2, rc=NEED_FULL)
    assert first in err and "cannot be used" in err
    assert disk_state(s.disk) == state
    assert not os.path.exists(t2)
    # --auto: the bitmap is lost but the backup of the checkpoint is
    # there: a rescan (test_backup_rescan.py) on top of it, not a full
    r = backup("--auto", s.disk, t2)
    assert r["kind"] == "incremental" and r["rescan"] is True
    assert r["parent"] == target and "cannot be used" in r["fallback"]
    ref = reference(s.disk, os.path.join(s.tmp, "r.raw"))
    assert r["root"] == root_of(ref)[0]

    # the backup of the newest checkpoint missing from the folder
    newest = r["checkpoint"]
    for suffix in ("", ".json", ".tree"):
        os.unlink(t2 + suffix)
    t3 = os.path.join(s.repo, "z.qcow2")
    err = backup_fails("--incremental", s.disk, t3, rc=NEED_FULL)
    assert "no backup of checkpoint '%s'" % newest in err
    r = backup("--auto", s.disk, t3)
    assert r["kind"] == "full" and "no backup" in r["fallback"]

    # a differential since the first checkpoint (its bitmap is disabled:
    # refused), with --auto a rescan on top of its backup
    err = backup_fails("--since", first, s.disk, os.path.join(s.repo, "d.qcow2"),
                       rc=NEED_FULL)
    assert "cannot be used" in err
    r = backup("--since", first, "--auto", s.disk, os.path.join(s.repo, "d.qcow2"))
    assert r["kind"] == "differential" and r["rescan"] is True
    assert r["parent"] == target
    err = backup_fails("--since", "nope", s.disk, os.path.join(s.repo, "e.qcow2"),
                       rc=NEED_FULL)
    assert "no checkpoint 'nope'" in err


def test_refusals_touch_nothing(tmp):
    s = Story(tmp)
    s.io(6)
    full = os.path.join(s.repo, "full.qcow2")
    backup("--full", "--checkpoint", "mon", s.disk, full)
    s.io(3)
    qemu_img("bitmap", "--add", s.disk, "plain")
    base = os.path.join(s.tmp, "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, SIZE)
    before = sorted(os.listdir(s.repo))
    state = disk_state(s.disk)
    t = os.path.join(s.repo, "t.qcow2")

    def refused(args, msg, target=t, rc=FAILED):
        err = backup_fails(*(args + [s.disk, target]), rc=rc)
        assert msg in err, err
        assert disk_state(s.disk) == state
        assert sorted(os.listdir(s.repo)) == before

    refused([], "say which backup", rc=USAGE)
    refused(["--full", "--incremental"], "exclude each other", rc=USAGE)
    refused(["--full", "-O", "vmdk"], "unknown backup format", rc=USAGE)
    refused(["--full", "-g", "1000"], "power of two", rc=USAGE)
    refused(["--full"], "already exists", target=full)
    refused(["--full", "--checkpoint", "mon"], "already exists")
    refused(["--full", "--checkpoint", "plain"], "already exists")
    refused(["--full", "--checkpoint", "x" * 1024], "1 to 1023 bytes", rc=USAGE)
    refused(["--incremental", "-O", "raw"], "share one format", rc=NEED_FULL)
    refused(["--full"], "layer 0 of the disk's chain", target=s.disk, rc=USAGE)
    # a TARGET that is not cbt's (no manifest): never advised to remove it
    # (test_backup_mistakes.py has the leftovers cbt does name)
    with open(t, "wb") as f:
        f.write(b"partial")
    err = backup_fails("--full", s.disk, t)
    assert "not a backup made by cbt" in err and "remove" not in err
    os.unlink(t)
    for comp in (".json", ".tree", ".hashes"):
        with open(t + comp, "w") as f:
            f.write("{}")
        err = backup_fails("--full", s.disk, t)
        assert "already exists" in err and comp in err
        os.unlink(t + comp)
    assert disk_state(s.disk) == state

    # a damaged parent record file: refused, not built upon
    with open(full + ".tree", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    refused(["--incremental"], "differs from", rc=CORRUPT)

    # a raw disk cannot hold checkpoints
    rawdisk = os.path.join(s.tmp, "d.raw")
    qemu_img("create", "-q", "-f", "raw", rawdisk, MiB)
    err = backup_fails("--full", rawdisk, t)
    assert "cannot hold checkpoints" in err
    assert sorted(os.listdir(s.repo)) == before


def manifest_write_fails(*args):
    """cbt backup ARGS with the manifest's write failing (ENOSPC): the
    hashes and the manifest are written to unnamed files in the folder
    (O_TMPFILE, opened on the folder 'repo'), hashes first."""
    res, cnt = F.run_faulty(["backup"] + list(args), "repo", "write", 2,
                            False, "ENOSPC")
    assert cnt["injected"] == 1, (cnt, res)
    assert res.rc == 74 and res.out == "", res
    return res.err


def test_failure_after_writing_removes_everything(tmp):
    s = Story(tmp)
    s.io(6)
    # the disk's first checkpoint: the manifest cannot be written
    t = os.path.join(s.repo, "full.qcow2")
    state = disk_state(s.disk)
    err = manifest_write_fails("--full", s.disk, t)
    assert "full.qcow2.json" in err
    assert checkpoints(s.disk)["checkpoints"] == state[1]["checkpoints"] == []
    assert_no_files(s.repo)

    backup("--full", s.disk, t)
    s.io(4)
    t2 = os.path.join(s.repo, "inc.qcow2")
    state = disk_state(s.disk)
    err = manifest_write_fails("--incremental", s.disk, t2)
    assert "inc.qcow2.json" in err
    assert disk_state(s.disk) == state
    assert_no_files(s.repo, keep=["full.qcow2", "full.qcow2.json", "full.qcow2.tree"])
    # then it works, and is complete
    ref = reference(s.disk, os.path.join(s.tmp, "r.raw"))
    r = backup("--incremental", s.disk, t2)
    assert r["root"] == root_of(ref)[0]
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", t2, os.path.join(s.tmp, "r.raw"))

    if os.geteuid() != 0:
        os.chmod(s.repo, stat.S_IRUSR | stat.S_IXUSR)
        try:
            state = disk_state(s.disk)
            backup_fails("--incremental", s.disk, os.path.join(s.repo, "ro.qcow2"))
            assert disk_state(s.disk) == state
        finally:
            os.chmod(s.repo, stat.S_IRWXU)


def test_output(tmp):
    s = Story(tmp)
    s.io(6)
    full = os.path.join(s.repo, "full.qcow2")
    res = no_crash(cbt("backup", "--full", "-p", s.disk, full))
    assert res.err == ""
    lines = res.out.splitlines()
    assert lines[0] == "full backup of %s -> %s" % (s.disk, full)
    assert any(l.split()[:1] == ["checkpoint"] and "(none) ->" in l for l in lines)
    assert any(l.split()[:2] == ["root", "hash"] for l in lines)
    s.io(3)
    res = no_crash(cbt("backup", "--incremental", "--checkpoint", "two", s.disk,
                       os.path.join(s.repo, "inc.qcow2")))
    text = res.out
    assert "incremental backup of" in text
    assert "-> two" in text and "dirty" in text and "%" in text and "time" in text
    j = backup("--incremental", s.disk, os.path.join(s.repo, "inc2.qcow2"))
    for key in ("kind", "disk", "target", "checkpoint", "since", "parent", "fallback",
                "virtual-size", "dirty-bytes", "bytes-copied", "bytes-zeroed",
                "milliseconds", "root"):
        assert key in j
    assert j["since"] == "two"
    assert j["parent"] == os.path.join(s.repo, "inc.qcow2")
    h = no_crash(cbt("backup", "--help"))
    assert h.out.startswith("Usage: cbt backup")


def test_shrink_and_grow_asks_the_whole_parent_chain(tmp):
    """The parent's data blocks come from every backup of its chain, the
    newest record first: a tail that held data only since an incremental
    is found when a shrink and a grow cut it off, and blocks an
    incremental zeroed are not taken for data."""
    s = Story(tmp, size=4 * MiB, seed=3)
    apply_io(s.disk, ["write -P 1 0 1M", "write -P 1 2M 512k"])
    full, _ = s.take(["--full"], "full")
    apply_io(s.disk, ["write -P 3 3M 1M", "write -z 2M 512k"])
    inc, _ = s.take(["--incremental"], "incremental", parent=full)
    cbt("resize", "--shrink", s.disk, 2 * MiB)
    cbt("resize", s.disk, 4 * MiB)
    target = os.path.join(s.repo, "inc2.qcow2")
    ref = reference(s.disk, os.path.join(s.tmp, "ref.raw"))
    res = no_crash(cbt("backup", "--incremental", "--output=json", s.disk,
                       target))
    # [3M, 4M) from the incremental's records; [2M, 2.5M) zeroed there
    assert "16 blocks of 64 KiB read as zeroes" in res.err
    assert res.json()["root"] == root_of(ref)[0]
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", target,
             os.path.join(s.tmp, "ref.raw"))
    assert blocks_of(map_alone(target), lambda e: e["present"], 4 * MiB) \
        == set(range(48, 64))


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_shrink_and_grow_between_checkpoints(tmp, fmt):
    """A shrink and a grow with no checkpoint between leave no bit in the
    bitmap (QEMU's resize semantics): the blocks that read as zeroes now
    but not in the parent are found by block status and backed up too."""
    s = Story(tmp, fmt=fmt, size=4 * MiB, seed=3)
    apply_io(s.disk, ["write -P 1 0 4M"])
    full, _ = s.take(["--full"], "full")
    cbt("resize", "--shrink", s.disk, 3 * MiB)
    cbt("resize", s.disk, 4 * MiB)
    apply_io(s.disk, ["write -P 2 64k 4k"])
    target = os.path.join(s.repo, "inc." + fmt)
    ref = reference(s.disk, os.path.join(s.tmp, "ref.raw"))
    res = no_crash(cbt("backup", "--incremental", "--output=json", "-O", fmt,
                       s.disk, target))
    assert "not marked in checkpoint" in res.err
    assert res.json()["root"] == root_of(ref)[0]
    if fmt == "qcow2":
        qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", target,
                 os.path.join(s.tmp, "ref.raw"))
        ents = map_alone(target)
        # block 1 (the write) and the cut-off tail [3M, 4M)
        assert blocks_of(ents, lambda e: e["present"], 4 * MiB) == \
            {1} | set(range(48, 64))
    else:
        assert raw_view(s.chain_of(target), 4 * MiB) == ref
