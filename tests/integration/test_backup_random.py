"""Random workloads over many backups (issue 5, section 6).

For each seed a disk (a qcow2 chain of 8-32 MiB) lives through a random
story: qemu-io (and some `cbt io`) writes, zero-writes and discards on the
chain's top, resizes both ways (qemu-img resize and cbt resize, a grow
after a shrink included), chain operations (cbt snapshot, cbt commit plain,
-d and --top/--base/--active, cbt stream with and without a base),
checkpoint deletions (old ones, the newest, a missing one) -- and at least
12 backups into one
folder (the repository), mixing full, incremental and differential backups,
qcow2 and raw targets.  Right before each backup a reference copy of the
disk is made by another route (`qemu-img convert -O raw TOP ref_K.raw`).

While building, every backup must succeed and its manifest must say what
the model says (kind, checkpoint, since, parent, virtual size, hash root
computed here from the reference with docs/backups.md's recipe, the
.tree record file), the checkpoints listed must be the model's, and a qcow2
incremental or differential target must allocate nothing outside what
changed since its checkpoint (at the bitmap's and the target's
granularity; the tail past the smallest size since the checkpoint is
allowed too).

Then, each in its own test so that one failure does not hide the others:
  * every backup restores (-O qcow2, and -O raw for some) to its reference
    (qemu-img compare, same virtual size), and the restore is no thicker
    than `qemu-img convert -O qcow2` of the reference (data bytes in
    `qemu-img map --output=json`);
  * qemu-img reads every qcow2 backup chain: `qemu-img info
    --backing-chain` lists the expected parents (relative names), and
    `qemu-img compare BACKUP REF` finds them identical; a raw full backup
    equals its reference;
  * `qemu-img check` is clean on every qcow2 file (backups, restores, every
    layer the disk ever had);
  * `cbt verify` passes on every backup;
  * verify catches damage in a random chain: one flipped byte in a random
    backup's data (verify of that backup, and of a later one reading that
    byte through its chain, names the file and the 64 KiB block), a
    truncated .tree record file and a missing middle backup.

Failure messages carry the seed and the story so far; rerun one seed with
-k SEED_ID.  CBT_TEST_SEED shifts every seed (soak runs).
"""
import hashlib
import json
import os
import random
import shutil
import sys

import pytest

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_TESTS, os.path.join(_TESTS, "interop")):
    if _p not in sys.path:
        sys.path.insert(0, _p)
import chainmodel as M  # noqa: E402
import treemodel as T  # noqa: E402
import interop_lib as L  # noqa: E402
from interop_lib import KiB, MiB, qemu_img  # noqa: E402

SEED_BASE = int(os.environ.get("CBT_TEST_SEED", "0"), 0)
# id: (seed, disk cluster size, number of backups)
RUNS = {
    "s504-c64k": (504, 64 * KiB, 12),
    "s502-c4k": (502, 4 * KiB, 12),
    "s503-c32k": (503, 32 * KiB, 13),
}
BLOCK = 65536           # sha256-blocks-v1 block size
MIN_SIZE, MAX_SIZE = 8 * MiB, 32 * MiB
MAX_DEPTH = 4           # layers in the disk's chain


# --------------------------------------------------------------------------
# Small helpers (shared with test_backup_faults.py, which imports this module)


def block_root(path, size=None, block=BLOCK):
    """(root hex, view bytes) of docs/backups.md's sha256-tree-v2
    (tests/treemodel.py) over the first SIZE bytes of a raw file (default:
    all of it)."""
    if size is None:
        size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read(size)
    assert len(data) == size, "%s shorter than %d" % (path, size)
    return T.root_of_bytes(data).hex(), data


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def vsize(path, fmt=None):
    args = ["info", "--output=json"] + (["-f", fmt] if fmt else []) + [path]
    return L.qemu_json(*args)["virtual-size"]


def data_bytes(path, fmt):
    """Bytes `qemu-img map` says hold data in this file alone."""
    return sum(e["length"] for e in L.qemu_map(path, fmt)
               if e.get("data") and e.get("depth", 0) == 0)


def manifest_of(target):
    with open(target + ".json") as f:
        return json.load(f)


def checkpoint_list(disk, cwd=None):
    """The "checkpoints" of `cbt checkpoint list --output=json`."""
    data = L.cbt_json("checkpoint", "list", "--output=json", disk, cwd=cwd)
    return data["checkpoints"]


def checkpoint_names(disk, cwd=None):
    return [c["name"] for c in checkpoint_list(disk, cwd)]


def result_json(res, what):
    try:
        return json.loads(res.out)
    except ValueError as e:
        raise AssertionError("%s: stdout is not JSON (%s)\n%r" % (what, e, res))


def ranges_union(ranges):
    return M.union_ranges([r for r in ranges if r[1] > r[0]])


def expand(ranges, g, size):
    """Every g-granule touching a range, clamped to size."""
    return ranges_union([(s // g * g, min(-(-e // g) * g, size)) for s, e in ranges])


def outside(ranges, allowed):
    """The parts of ranges not covered by allowed (both sorted, disjoint)."""
    out = []
    for s, e in ranges:
        pos = s
        for a, b in allowed:
            if b <= pos or a >= e:
                continue
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
            if pos >= e:
                break
        if pos < e:
            out.append((pos, e))
    return out


def verify_json(backup, cwd=None):
    res = L.cbt_rc("verify", "--output=json", backup, cwd=cwd)
    data = result_json(res, "cbt verify --output=json %s" % backup)
    return res, data


# --------------------------------------------------------------------------
# The story


class Story:
    """One seed's disk, repository, model and log."""

    def __init__(self, work, rid):
        self.rid = rid
        seed, self.cluster, self.nbackups = RUNS[rid]
        self.seed = seed + SEED_BASE
        self.rng = random.Random(self.seed)
        self.root = os.path.join(work, rid)
        self.d = os.path.join(self.root, "disk")
        self.repo = os.path.join(self.root, "repo")
        self.refs = os.path.join(self.root, "refs")
        for p in (self.d, self.repo, self.refs):
            os.makedirs(p)
        self.chain = []          # disk layer file names, bottom .. top
        self.all_layers = []     # every layer file ever made
        self.nlayer = 0
        self.seq = 0             # events (guest writes, resizes) so far
        self.writes = []         # (seq, start, end) of every guest write
        self.sizes = []          # (seq, size): the size from event seq on
        self.ckpts = []          # existing checkpoints, oldest first: dicts
        self.backups = []        # dicts, in order
        self.log = []
        self.nckpt = 0

    # ---- bookkeeping ----

    def note(self, s):
        self.log.append(s)

    def label(self, what=""):
        tail = self.log[-40:]
        return ("seed %d (%s, cluster %d), %s\nstory (last %d of %d steps):\n  %s\n"
                "rerun: -k %s" % (self.seed, self.rid, self.cluster, what, len(tail),
                                  len(self.log), "\n  ".join(tail), self.rid))

    def p(self, *names):
        return os.path.join(self.d, *names)

    @property
    def top(self):
        return self.chain[-1]

    @property
    def size(self):
        return self.sizes[-1][1]

    def cbt(self, *argv):
        res = L.cbt_rc(*argv, cwd=self.d)
        what = "cbt " + " ".join(str(a) for a in argv)
        assert res.rc == 0, "%s failed: %r\n%s" % (what, res, self.label(what))
        self.note(what)
        return res

    # ---- the disk ----

    def new_layer_name(self):
        self.nlayer += 1
        n = "disk%d.qcow2" % self.nlayer
        self.all_layers.append(n)
        return n

    def create(self):
        size = self.rng.randrange(MIN_SIZE, MAX_SIZE // 2, 512)
        n = self.new_layer_name()
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % self.cluster,
                 self.p(n), size)
        self.chain = [n]
        self.sizes.append((0, size))
        self.note("qemu-img create %s %d (cluster %d)" % (n, size, self.cluster))
        self.io(self.rng.randint(8, 20))

    def io(self, n):
        ops = [M.rand_io(self.rng, self.size, self.cluster) for _ in range(n)]
        cmds = [M.io_cmd(*o) for o in ops]
        use_cbt = self.rng.random() < 0.3
        if use_cbt:
            L.cbt_ok("io", "-f", "qcow2", *L.io_args(cmds), self.p(self.top))
        else:
            L.qemu_io("-f", "qcow2", *L.io_args(cmds), self.p(self.top))
        for op, off, length, _ in ops:
            self.seq += 1
            self.writes.append((self.seq, off, off + length))
        self.note("%s %s: %s" % ("cbt io" if use_cbt else "qemu-io", self.top,
                                 " ; ".join(cmds)))

    def resize(self):
        rng = self.rng
        old = self.size
        grow = rng.random() < 0.6 or old <= MIN_SIZE + MiB
        if old >= MAX_SIZE - MiB:
            grow = False
        if not grow and old - 512 < MIN_SIZE:
            return
        if grow:
            new = rng.randrange(old + 512, min(MAX_SIZE, old + 8 * MiB) + 1, 512)
        else:
            new = rng.randrange(max(MIN_SIZE, old - 8 * MiB), old, 512)
        if rng.random() < 0.5:
            argv = ["resize"] + ([] if grow else ["--shrink"]) + ["-q", self.top, new]
            self.cbt(*argv)
        else:
            qemu_img(*(["resize", "-q"] + ([] if grow else ["--shrink"]) +
                       ["-f", "qcow2", self.p(self.top), new]))
            self.note("qemu-img resize %s%s %d" % ("" if grow else "--shrink ",
                                                    self.top, new))
        assert vsize(self.p(self.top)) == new, self.label("resize")
        self.seq += 1
        self.sizes.append((self.seq, new))

    def chain_op(self):
        rng, ch = self.rng, self.chain
        depth = len(ch)
        choices = []
        if depth < MAX_DEPTH:
            choices += ["snapshot"] * 3
        if depth >= 2:
            choices += ["commit", "commit-d", "stream", "stream-b"]
        if depth >= 3:
            # not commit -b BASE TOP with layers between: it leaves TOP's
            # checkpoints with a gap (test_commit_b_keeps_checkpoints)
            choices += ["commit-top"]
        op = rng.choice(choices)
        if op == "snapshot":
            n = self.new_layer_name()
            self.cbt("snapshot", self.top, n)
            self.chain.append(n)
        elif op == "commit":
            self.cbt("commit", "-q", self.top)
        elif op == "commit-d":
            self.cbt("commit", "-q", "-d", self.top)
        elif op == "commit-top":
            t = rng.randrange(1, depth - 1)
            b = rng.randrange(t)
            self.cbt("commit", "-q", "--top", ch[t], "--base", ch[b], "--active", self.top)
            self.chain = ch[:b + 1] + ch[t + 1:]
        elif op == "stream":
            self.cbt("stream", self.top)
            self.chain = [self.top]
        else:
            b = rng.randrange(depth - 1)
            self.cbt("stream", "-b", ch[b], self.top)
            self.chain = ch[:b + 1] + [self.top]

    def delete_checkpoint(self):
        """Delete an old checkpoint, or the newest (the next incremental
        starts from the one before it), or a name that does not exist (a
        warning, exit 0)."""
        r = self.rng.random()
        if (len(self.ckpts) >= 3 and r < 0.5) or (len(self.ckpts) >= 2 and r < 0.75):
            c = self.rng.choice(self.ckpts[:-1]) if r < 0.5 else self.ckpts[-1]
            res = self.cbt("checkpoint", "delete", self.top, c["name"])
            assert "warning" not in res.err, self.label("delete of an existing checkpoint")
            self.ckpts.remove(c)
        else:
            res = self.cbt("checkpoint", "delete", self.top, "never-was")
            assert "warning" in res.err and "never-was" in res.err, \
                "deleting a missing checkpoint must warn: %r\n%s" % (res, self.label())

    def between(self):
        """Random changes between two backups."""
        rng = self.rng
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            if r < 0.45:
                self.io(rng.randint(1, 12))
            elif r < 0.6:
                self.resize()
            elif r < 0.9:
                self.chain_op()
            else:
                self.delete_checkpoint()
        if rng.random() < 0.7:
            self.io(rng.randint(1, 6))

    # ---- backups ----

    def min_size_since(self, seq):
        """The smallest size the disk had from event seq on."""
        at = [s for q, s in self.sizes if q <= seq][-1]
        return min([at] + [s for q, s in self.sizes if q > seq])

    def choose(self, k):
        """(kind, since checkpoint dict or None, format)."""
        rng = self.rng
        if k == 0 or not self.ckpts:
            return "full", None, "qcow2"
        r = rng.random()
        if r < 0.12:
            return "full", None, "raw" if rng.random() < 0.4 else "qcow2"
        if r < 0.4 and len(self.ckpts) >= 2:
            c = rng.choice(self.ckpts[:-1])
            return "differential", c, c["format"]
        c = self.ckpts[-1]
        return "incremental", c, c["format"]

    def backup(self, k):
        kind, since, fmt = self.choose(k)
        name = "c%02d" % k
        target = "b%02d.%s" % (k, fmt)
        ref = os.path.join(self.refs, "ref_%02d.raw" % k)
        qemu_img("convert", "-f", "qcow2", "-O", "raw", self.p(self.top), ref)
        size = self.size
        assert os.path.getsize(ref) == size, self.label("reference size")
        argv = ["backup", "--output=json"]
        if kind == "full":
            argv.append("--full")
        elif kind == "incremental":
            argv.append("--incremental")
        else:
            argv += ["--since", since["name"]]
        argv += ["--checkpoint", name, "-O", fmt, self.top,
                 os.path.join(self.repo, target)]
        res = L.cbt_rc(*argv, cwd=self.d)
        what = "cbt " + " ".join(str(a) for a in argv)
        assert res.rc == 0, "%s failed: %r\n%s" % (what, res, self.label(what))
        self.note(what)
        out = result_json(res, what)
        parent = None
        chain = [target]
        if since is not None:
            pb = since["backup"]
            parent = pb["target"]
            chain = pb["chain"] + [target]
        b = {"k": k, "target": target, "path": os.path.join(self.repo, target),
             "format": fmt, "kind": kind, "since": since and since["name"],
             "parent": parent, "chain": chain, "ref": ref, "size": size,
             "checkpoint": name, "result": out, "what": what,
             "allowed": None}
        if since is not None:
            changed = [(s, e) for q, s, e in self.writes if q > since["seq"]]
            lo = self.min_size_since(since["seq"])
            if any(q > since["seq"] for q, _ in self.sizes):
                # resized: the last (partial) block at the new end may be
                # rewritten (its digest changes with the size)
                lo = min(lo, (size - 1) // BLOCK * BLOCK)
            b["changed"] = ranges_union(changed + [(lo, size)])
        self.backups.append(b)
        self.ckpts.append({"name": name, "seq": self.seq, "format": fmt, "backup": b})
        self.nckpt += 1
        self.check_backup(b)
        return b

    def check_backup(self, b):
        label = self.label(b["what"])
        man = manifest_of(b["path"])
        assert man.get("format") == "cbt-backup" and man.get("complete") is True, \
            "%s\n%s" % (json.dumps(man)[:2000], label)
        assert man["kind"] == b["kind"], "manifest kind %r, expected %r\n%s" % (
            man["kind"], b["kind"], label)
        assert man["checkpoint"]["name"] == b["checkpoint"], label
        assert man["since"] == b["since"], "manifest since %r, expected %r\n%s" % (
            man["since"], b["since"], label)
        if b["parent"] is None:
            assert man["parent"] is None, "%s\n%s" % (man["parent"], label)
        else:
            par = man["parent"]
            assert par and par["file"] == b["parent"], \
                "manifest parent %r, expected %r\n%s" % (par, b["parent"], label)
            assert par["manifest-sha256"] == file_sha256(
                os.path.join(self.repo, b["parent"] + ".json")), label
        img = man["image"]
        assert img["file"] == b["target"] and img["format"] == b["format"], \
            "%s\n%s" % (img, label)
        assert img["virtual-size"] == b["size"], \
            "manifest virtual-size %d, the disk's is %d\n%s" % (img["virtual-size"],
                                                               b["size"], label)
        root, data = block_root(b["ref"])
        h = man["hash"]
        assert h["algorithm"] == "sha256-tree-v2" and h["block-size"] == BLOCK, label
        assert h["blocks"] == -(-b["size"] // BLOCK), label
        assert h["root"] == root, \
            "manifest root %s, the reference's is %s\n%s" % (h["root"], root, label)
        hashes = os.path.join(self.repo, h["file"])
        assert h["file"] == b["target"] + ".tree" and os.path.isfile(hashes), label
        with open(hashes, "rb") as f:
            got = f.read()
        # the chain's view, node for node, is the model's tree of the
        # reference (tests/treemodel.py)
        try:
            T.check_backup(os.path.join(self.repo, b["target"]), data, h["root"])
        except AssertionError as e:
            raise AssertionError("%s: %s\n%s" % (h["file"], e, label))
        assert h["file-sha256"] == hashlib.sha256(got).hexdigest(), label
        by = man["bytes"]
        assert by["copied"] + by["zeroed"] <= max(b["size"], 0) + BLOCK, \
            "bytes %s for a disk of %d\n%s" % (by, b["size"], label)
        if b["format"] == "qcow2":
            assert man["extents"] is None, label
        else:
            ext = man["extents"]
            assert isinstance(ext, list), label
            pos = 0
            for s, ln, kind in ext:
                assert s >= pos and ln > 0 and kind in ("data", "zero") and \
                    s + ln <= b["size"], "bad extents %s\n%s" % (ext[:20], label)
                pos = s + ln
            if b["kind"] == "full":
                assert os.path.getsize(b["path"]) == b["size"], label
        # the checkpoints the model expects, oldest first
        want = [c["name"] for c in self.ckpts]
        got = checkpoint_names(self.top, cwd=self.d)
        assert got == want, "checkpoints %s, expected %s\n%s" % (got, want, label)
        if "changed" in b:
            self.check_sparse(b, label)

    def check_sparse(self, b, label):
        """An incremental or differential carries nothing outside what
        changed since its checkpoint."""
        ck = [c for c in checkpoint_list(self.top, cwd=self.d)
              if c["name"] == b["since"]]
        gran = ck[0].get("granularity", BLOCK) if ck else BLOCK
        if b["format"] == "qcow2":
            cl = L.Qcow2(b["path"]).cluster_size
            carried = [(e["start"], e["start"] + e["length"])
                       for e in L.qemu_map(b["path"], "qcow2") if e["depth"] == 0]
        else:
            cl = 1
            carried = [(s, s + ln) for s, ln, _ in manifest_of(b["path"])["extents"]]
        g = max(gran, cl)
        allowed = expand(b["changed"], g, b["size"])
        extra = outside(ranges_union(carried), allowed)
        assert not extra, "%s carries %s outside what changed since %s (granule %d)\n%s" % (
            b["target"], extra[:8], b["since"], g, label)


_BUILT = {}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("backups"))


def story(work, rid):
    if rid not in _BUILT:
        s = Story(work, rid)
        _BUILT[rid] = s
        s.create()
        for k in range(s.nbackups):
            if k:
                s.between()
            s.backup(k)
        s.built = True
    s = _BUILT[rid]
    if not getattr(s, "built", False):
        pytest.fail("building %s failed (see the first test of this seed)" % rid)
    return s


# --------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("rid", list(RUNS))
def test_build(work, rid):
    """Every backup succeeds and its manifest, hashes and the checkpoints
    are what the model says (checked while building)."""
    s = story(work, rid)
    kinds = {b["kind"] for b in s.backups}
    assert len(s.backups) >= 10 and kinds == {"full", "incremental", "differential"}, \
        "the story should mix every kind: %s\n%s" % (
            [b["kind"] for b in s.backups], s.label())


@pytest.mark.parametrize("rid", list(RUNS))
def test_restore_equals_reference(work, rid):
    s = story(work, rid)
    out = os.path.join(s.root, "restore")
    os.makedirs(out, exist_ok=True)
    for i, b in enumerate(s.backups):
        fmts = ["qcow2"] + (["raw"] if i % 3 == 1 or b["format"] == "raw" else [])
        ref_q = os.path.join(out, "ref_%02d.qcow2" % b["k"])
        qemu_img("convert", "-f", "raw", "-O", "qcow2", b["ref"], ref_q)
        ref_data = data_bytes(ref_q, "qcow2")
        for fmt in fmts:
            o = os.path.join(out, "r%02d.%s" % (b["k"], fmt))
            what = "cbt restore -O %s %s %s" % (fmt, b["path"], o)
            label = s.label(what)
            res = L.cbt_rc("restore", "-O", fmt, b["path"], o)
            assert res.rc == 0, "%r\n%s" % (res, label)
            assert vsize(o, fmt) == b["size"], "restored size %d, expected %d\n%s" % (
                vsize(o, fmt), b["size"], label)
            cmp = qemu_img("compare", "-f", fmt, "-F", "raw", o, b["ref"], check=False)
            assert cmp.rc == 0, "restore differs from the reference: %r\n%s" % (cmp, label)
            got = data_bytes(o, fmt)
            assert got <= ref_data, \
                "restore holds %d data bytes, qemu-img convert of the reference %d\n%s" % (
                    got, ref_data, label)
            if fmt == "qcow2":
                L.qemu_check_clean(o)
            os.unlink(o)


@pytest.mark.parametrize("rid", list(RUNS))
def test_qemu_reads_backup_chains(work, rid):
    s = story(work, rid)
    for b in s.backups:
        label = s.label("backup %s" % b["target"])
        if b["format"] == "raw":
            if b["kind"] == "full":
                cmp = qemu_img("compare", "-f", "raw", "-F", "raw", b["path"], b["ref"],
                               check=False)
                assert cmp.rc == 0, "raw full backup differs: %r\n%s" % (cmp, label)
            continue
        info = L.qemu_json("info", "--backing-chain", "--output=json", "-f", "qcow2",
                           b["path"])
        files = [os.path.basename(e["filename"]) for e in info]
        assert files == list(reversed(b["chain"])), \
            "backing chain %s, expected %s\n%s" % (files, list(reversed(b["chain"])), label)
        for e, f in zip(info[:-1], files[1:]):
            assert e.get("backing-filename") == f, \
                "backing name %r should be the relative %r\n%s" % (
                    e.get("backing-filename"), f, label)
            assert e.get("backing-filename-format", "qcow2") == "qcow2", label
        assert info[0]["virtual-size"] == b["size"], label
        cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", b["path"], b["ref"],
                       check=False)
        assert cmp.rc == 0, "qemu-img compare of the backup chain: %r\n%s" % (cmp, label)


@pytest.mark.parametrize("rid", list(RUNS))
def test_qemu_check_clean(work, rid):
    s = story(work, rid)
    for b in s.backups:
        if b["format"] == "qcow2":
            rc, data, res = L.qemu_check(b["path"])
            assert rc == 0, "qemu-img check %s: %r\n%s" % (b["target"], res, s.label())
    for n in s.all_layers:
        p = s.p(n)
        if os.path.exists(p):
            rc, data, res = L.qemu_check(p)
            assert rc == 0, "qemu-img check %s: %r\n%s" % (n, res, s.label())


@pytest.mark.parametrize("rid", list(RUNS))
def test_verify_ok(work, rid):
    s = story(work, rid)
    for b in s.backups:
        res, data = verify_json(b["path"])
        assert res.rc == 0 and data.get("ok") is True, \
            "cbt verify %s: %r\n%s" % (b["target"], res, s.label())
        n = data.get("backups")
        assert n == len(b["chain"]), "verify checked %s backups, the chain has %d\n%s" % (
            n, len(b["chain"]), s.label())


def copy_repo(s, tag):
    d = os.path.join(s.root, "damaged-" + tag)
    if os.path.exists(d):
        shutil.rmtree(d)
    shutil.copytree(s.repo, d)
    return d


def assert_names(data, res, fname, off, what, label):
    """verify failed, naming FNAME and a range that holds guest byte OFF."""
    assert res.rc != 0 and data.get("ok") is False, \
        "%s: verify passed: %r\n%s" % (what, res, label)
    bad = data.get("bad-file")
    assert bad is not None and os.path.basename(bad) == fname, \
        "%s: verify blames %r, expected %s: %r\n%s" % (what, bad, fname, res, label)
    if off is not None:
        bo, bl = data.get("bad-offset"), data.get("bad-length")
        assert bo is not None and bl and bo <= off < bo + bl, \
            "%s: verify's bad range %s+%s does not hold offset %d: %r\n%s" % (
                what, bo, bl, off, res, label)
        assert bo % BLOCK == 0 and bl <= BLOCK, \
            "%s: the bad range %s+%s is not one block\n%s" % (what, bo, bl, label)
    assert fname in res.out + res.err, label


def source_depth(path, off):
    """The chain depth qemu-img map says guest byte OFF comes from, and
    whether it is data there."""
    for e in L.qemu_map(path, "qcow2"):
        if e["start"] <= off < e["start"] + e["length"]:
            return e.get("depth"), e.get("data"), e.get("offset")
    return None, False, None


@pytest.mark.parametrize("rid", list(RUNS))
def test_verify_catches_a_flipped_byte(work, rid):
    """Flip one byte in a random backup's data; verify names the file and
    the block, for that backup and for every later one whose chain reads
    the byte; restore refuses and leaves no output."""
    s = story(work, rid)
    rng = random.Random(s.seed * 11 + 1)
    cands = []
    for b in s.backups:
        if b["format"] == "qcow2":
            ext = [e for e in L.qemu_map(b["path"], "qcow2")
                   if e["depth"] == 0 and e.get("data") and e.get("offset") is not None]
        else:
            ext = [{"start": st, "length": ln, "offset": st}
                   for st, ln, k in manifest_of(b["path"])["extents"] if k == "data"]
        if ext:
            cands.append((b, ext))
    assert cands, s.label("no backup holds data")
    for rnd in range(3):
        b, ext = rng.choice(cands)
        e = rng.choice(ext)
        goff = e["start"] + rng.randrange(e["length"])
        d = copy_repo(s, "flip%d" % rnd)
        fpath = os.path.join(d, b["target"])
        L.flip_byte(fpath, e["offset"] + goff - e["start"])
        what = "flip guest byte %d of %s (file offset %d)" % (
            goff, b["target"], e["offset"] + goff - e["start"])
        label = s.label(what)
        res, data = verify_json(fpath)
        assert_names(data, res, b["target"], goff, what + "; verify " + b["target"], label)
        for later in s.backups:
            if later is b or b["target"] not in later["chain"] or later["format"] != "qcow2":
                continue
            lpath = os.path.join(d, later["target"])
            depth, isdata, _ = source_depth(lpath, goff)
            chain = list(reversed(later["chain"]))
            if depth is None or depth >= len(chain) or chain[depth] != b["target"]:
                continue
            res, data = verify_json(lpath)
            assert_names(data, res, b["target"], goff,
                         what + "; verify " + later["target"], label)
        out = os.path.join(d, "restored.qcow2")
        res = L.cbt_rc("restore", fpath, out)
        assert res.rc != 0 and not os.path.exists(out), \
            "restore of a damaged backup must fail and leave nothing: %r\n%s" % (res, label)
        shutil.rmtree(d)


@pytest.mark.parametrize("rid", list(RUNS))
def test_verify_catches_truncation_and_a_missing_middle(work, rid):
    s = story(work, rid)
    rng = random.Random(s.seed * 11 + 2)
    longs = [b for b in s.backups if len(b["chain"]) >= 3]
    if longs:
        last = rng.choice(longs)
        mid = last["chain"][rng.randrange(1, len(last["chain"]) - 1)]
        d = copy_repo(s, "missing")
        os.rename(os.path.join(d, mid), os.path.join(d, "moved-away"))
        what = "%s removed; verify %s" % (mid, last["target"])
        res, data = verify_json(os.path.join(d, last["target"]))
        assert res.rc != 0 and data.get("ok") is False, "%s: %r\n%s" % (what, res, s.label(what))
        assert mid in res.out + res.err, "%s: verify does not name %s: %r\n%s" % (
            what, mid, res, s.label(what))
        shutil.rmtree(d)
    qs = [b for b in s.backups if b["format"] == "qcow2" and
          os.path.getsize(b["path"]) > 4 * BLOCK]
    if qs:
        b = rng.choice(qs)
        d = copy_repo(s, "truncated-image")
        p = os.path.join(d, b["target"])
        with open(p, "r+b") as f:
            f.truncate(os.path.getsize(p) // 2)
        for later in s.backups:
            if b["target"] not in later["chain"]:
                continue
            what = "%s cut to half its length; verify %s" % (b["target"], later["target"])
            res, data = verify_json(os.path.join(d, later["target"]))
            assert res.rc != 0 and data.get("ok") is False, "%s: %r\n%s" % (
                what, res, s.label(what))
            assert os.path.basename(data.get("bad-file") or "") == b["target"], \
                "%s: verify blames %r: %r\n%s" % (what, data.get("bad-file"), res,
                                                  s.label(what))
        shutil.rmtree(d)
    b = rng.choice(s.backups)
    d = copy_repo(s, "truncated")
    h = os.path.join(d, b["target"] + ".tree")
    with open(h, "r+b") as f:
        f.truncate(max(0, os.path.getsize(h) - 41))
    what = "%s.tree cut by one record; verify %s" % (b["target"], b["target"])
    res, data = verify_json(os.path.join(d, b["target"]))
    assert res.rc != 0 and data.get("ok") is False, "%s: %r\n%s" % (what, res, s.label(what))
    assert b["target"] in res.out + res.err, "%s: verify does not name it: %r\n%s" % (
        what, res, s.label(what))
    shutil.rmtree(d)


# --------------------------------------------------------------------------
# A resize the bitmaps cannot see: shrink, then grow, between two backups


@pytest.mark.parametrize("tool", ["cbt", "qemu-img"])
def test_shrink_then_grow(tmp_path, tool):
    """Between two backups the disk shrinks (dropping data at its end) and
    grows back to its old size.  No bitmap bit records the dropped tail
    (QEMU's bitmaps are cut and regrown clean), yet the guest now reads
    zeroes there: the incremental must carry them."""
    d = str(tmp_path)
    disk = os.path.join(d, "disk.qcow2")
    repo = os.path.join(d, "repo")
    os.makedirs(repo)
    qemu_img("create", "-q", "-f", "qcow2", disk, 8 * MiB)
    L.qemu_io("-f", "qcow2", "-c", "write -P 7 0 8M", disk)
    L.cbt_ok("backup", "--full", "--checkpoint", "c1", disk, os.path.join(repo, "b1.qcow2"))
    if tool == "cbt":
        L.cbt_ok("resize", "--shrink", "-q", disk, 4 * MiB)
        L.cbt_ok("resize", "-q", disk, 8 * MiB)
    else:
        qemu_img("resize", "-q", "--shrink", disk, 4 * MiB)
        qemu_img("resize", "-q", disk, 8 * MiB)
    ref = os.path.join(d, "ref.raw")
    qemu_img("convert", "-O", "raw", disk, ref)
    res = L.cbt_rc("backup", "--incremental", "--checkpoint", "c2", disk,
                   os.path.join(repo, "b2.qcow2"))
    if res.rc != 0:
        # refusing (the checkpoint cannot be trusted) is acceptable; a
        # wrong backup is not
        assert "c1" in res.err, res
        return
    out = os.path.join(d, "r2.raw")
    L.cbt_ok("restore", "-O", "raw", os.path.join(repo, "b2.qcow2"), out)
    cmp = qemu_img("compare", "-f", "raw", "-F", "raw", out, ref, check=False)
    assert cmp.rc == 0, "the shrunk and regrown tail must read zeroes in the backup " \
        "(%s resize): %r" % (tool, cmp)
    assert manifest_of(os.path.join(repo, "b2.qcow2"))["hash"]["root"] == block_root(ref)[0]


# --------------------------------------------------------------------------
# commit -b BASE TOP with layers between, TOP staying the disk


def test_commit_b_keeps_checkpoints(tmp_path):
    """qemu-img's `commit -b` (implies -d): TOP keeps its data and its
    chain, so the disk is still TOP; its checkpoints must stay usable and
    the next incremental be correct."""
    d = str(tmp_path)
    repo = os.path.join(d, "repo")
    os.makedirs(repo)
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, "d0.qcow2"), 8 * MiB)
    L.cbt_ok("snapshot", "d0.qcow2", "d1.qcow2", cwd=d)
    L.cbt_ok("snapshot", "d1.qcow2", "d2.qcow2", cwd=d)
    L.qemu_io("-f", "qcow2", "-c", "write -P 1 0 1M", os.path.join(d, "d2.qcow2"))
    L.cbt_ok("backup", "--full", "--checkpoint", "c1", "d2.qcow2", "repo/b1.qcow2", cwd=d)
    L.qemu_io("-f", "qcow2", "-c", "write -P 2 0 64k", os.path.join(d, "d2.qcow2"))
    L.cbt_ok("commit", "-q", "-b", "d0.qcow2", "d2.qcow2", cwd=d)
    cps = checkpoint_list("d2.qcow2", cwd=d)
    assert [c["name"] for c in cps] == ["c1"] and cps[0]["usable"], cps
    ref = os.path.join(d, "ref.raw")
    qemu_img("convert", "-O", "raw", os.path.join(d, "d2.qcow2"), ref)
    L.cbt_ok("backup", "--incremental", "--checkpoint", "c2", "d2.qcow2", "repo/b2.qcow2",
             cwd=d)
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", os.path.join(repo, "b2.qcow2"),
                   ref, check=False)
    assert cmp.rc == 0, cmp
