"""cbt restore and cbt verify against backup chains.

The chains are built here by hand, from docs/backups.md alone (qemu-img and
qemu-io write the images, this file writes the manifests and block hashes),
so the tests also check that restore and verify read the documented layout
and nothing else.  Every backup point has a reference copy of the disk taken
by another route (qemu-img convert of the disk at that moment).

The oracles: qemu-img compare (restored == reference), qemu-img map (the
restored image is no thicker than qemu-img convert of the same chain),
qemu-img check (clean).
"""
import datetime
import hashlib
import json
import os
import random
import shutil
import sys
import uuid

import pytest

from conftest import cbt, qemu_img, qemu_io, qemu_check_clean

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "interop"))
import interop_lib as L  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB
SECTOR = 512
# exit statuses (docs/cli.md, "Exit status")
USAGE, CORRUPT = 64, 65


# ---- building backup chains by hand (docs/backups.md) ----

def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def leaves_of(view):
    return b"".join(hashlib.sha256(view[i:i + BLOCK]).digest()
                    for i in range(0, len(view), BLOCK))


def iso_now():
    t = datetime.datetime.now(datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + "%06d000Z" % t.microsecond


def runs(kinds, size):
    """(start, length, kind) runs of a per-sector kind map, clipped to size."""
    out = []
    i, n = 0, len(kinds)
    while i < n:
        j = i
        while j < n and kinds[j] == kinds[i]:
            j += 1
        start, end = i * SECTOR, min(j * SECTOR, size)
        if kinds[i] and end > start:
            out.append((start, end - start, kinds[i]))
        i = j
    return out


class Repo:
    """A disk (qcow2, written with qemu-io) and a folder of its backups.

    For every backup B an accumulator records what changes after it: a
    qcow2 overlay of B receiving the same qemu-io commands as the disk
    (qcow2 backups), or a per-sector map of data/zero writes (raw backups).
    An incremental or differential since B is then B's accumulator.
    """

    def __init__(self, tmp, fmt, size, seed=1):
        self.tmp = str(tmp)
        self.dir = os.path.join(self.tmp, "bk")
        os.mkdir(self.dir)
        self.fmt = fmt
        self.ext = "qcow2" if fmt == "qcow2" else "raw"
        self.disk = os.path.join(self.tmp, "disk.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", self.disk, size)
        self.size = size
        self.disk_id = str(uuid.uuid4())
        self.order = 0
        self.points = []      # dicts: file, ref, kind, checkpoint, size
        self.acc = {}         # backup file -> overlay path | kind bytearray
        self.rng = random.Random(seed)

    # -- the workload --

    def io(self, cmds):
        args = []
        for c in cmds:
            args += ["-c", c]
        qemu_io("-f", "qcow2", *args, self.disk)
        for name, acc in self.acc.items():
            if self.fmt == "qcow2":
                qemu_io("-f", "qcow2", *args, acc)
            else:
                for c in cmds:
                    mark(acc, c)

    def random_writes(self, n, zero_share=0.2):
        cmds = []
        for _ in range(n):
            length = self.rng.choice([512, 4096, 3000, BLOCK, 2 * BLOCK,
                                      3 * BLOCK + 777])
            off = self.rng.randrange(0, self.size - length)
            if self.rng.random() < 0.5:
                off -= off % 4096
            if self.rng.random() < zero_share:
                cmds.append("write -z %d %d" % (off, length))
            else:
                cmds.append("write -P %d %d %d"
                            % (self.rng.randrange(1, 256), off, length))
        self.io(cmds)

    def resize(self, new_size):
        qemu_img("resize", "-q", "-f", "qcow2", self.disk, new_size)
        for name, acc in self.acc.items():
            if self.fmt == "qcow2":
                qemu_img("resize", "-q", "-f", "qcow2", acc, new_size)
            else:
                want = -(-new_size // SECTOR)
                if len(acc) < want:
                    # Bytes past the old end read as zeroes: carried as
                    # zeroes by every later backup (its parent is shorter).
                    acc.extend(b"\x02" * (want - len(acc)))
                else:
                    del acc[want:]
        self.size = new_size

    # -- backups --

    def path(self, name):
        return os.path.join(self.dir, name)

    def reference(self, k):
        ref = os.path.join(self.tmp, "ref%d.raw" % k)
        qemu_img("convert", "-f", "qcow2", "-O", "raw", self.disk, ref)
        return ref

    def backup(self, kind, since=None):
        """kind: full, incremental (since the newest), differential (since
        the backup file `since`)."""
        k = len(self.points) + 1
        name = "b%d.%s" % (k, self.ext)
        parent = None
        if kind == "incremental":
            parent = self.points[-1]
        elif kind == "differential":
            parent = next(p for p in self.points if p["file"] == since)
        target = self.path(name)
        extents = None
        if self.fmt == "qcow2":
            if parent is None:
                qemu_img("convert", "-f", "qcow2", "-O", "qcow2", self.disk,
                         target)
            else:
                shutil.copyfile(self.acc[parent["file"]], target)
        else:
            qemu_img("convert", "-f", "qcow2", "-O", "raw", self.disk, target)
            if parent is None:
                extents = [[0, self.size, "data"]]
            else:
                # Keep only the carried data; punch the rest out.
                kinds = self.acc[parent["file"]]
                extents = [[s, n, "data" if t == 1 else "zero"]
                           for s, n, t in runs(kinds, self.size)]
                carried = bytearray(self.size)
                with open(target, "rb") as f:
                    full = f.read()
                for s, n, t in extents:
                    if t == "data":
                        carried[s:s + n] = full[s:s + n]
                with open(target, "wb") as f:
                    f.truncate(self.size)
                    for s, n, t in extents:
                        if t == "data":
                            f.seek(s)
                            f.write(carried[s:s + n])
        ref = self.reference(k)
        with open(ref, "rb") as f:
            view = f.read()
        leaves = leaves_of(view)
        with open(target + ".hashes", "wb") as f:
            f.write(leaves)
        self.order += 1
        cp = "cp%d" % self.order
        m = {
            "format": "cbt-backup",
            "version": 1,
            "complete": True,
            "tool": "hand-made test fixture",
            "created": iso_now(),
            "disk": {"path": self.disk, "id": self.disk_id},
            "kind": kind,
            "checkpoint": {"name": cp, "order": self.order,
                           "created": iso_now()},
            "since": parent["checkpoint"] if parent else None,
            "parent": None if parent is None else {
                "file": parent["file"],
                "manifest-sha256": sha256_file(self.path(parent["file"])
                                               + ".json")},
            "image": {"file": name, "format": self.fmt,
                      "virtual-size": self.size},
            "bytes": {"dirty": 0, "copied": 0, "zeroed": 0},
            "extents": extents,
            "hash": {"algorithm": "sha256-blocks-v1", "block-size": BLOCK,
                     "blocks": -(-self.size // BLOCK),
                     "file": name + ".hashes",
                     "file-sha256": hashlib.sha256(leaves).hexdigest(),
                     "root": hashlib.sha256(leaves).hexdigest()},
        }
        with open(target + ".json", "w") as f:
            json.dump(m, f, indent=2)
        point = {"file": name, "ref": ref, "kind": kind, "checkpoint": cp,
                 "size": self.size, "k": k}
        self.points.append(point)
        # From now on, record what changes after this backup.
        if self.fmt == "qcow2":
            qemu_img("create", "-q", "-f", "qcow2", "-b", name, "-F", "qcow2",
                     os.path.join(self.dir, "acc.tmp"), self.size)
            os.rename(os.path.join(self.dir, "acc.tmp"),
                      os.path.join(self.dir, "acc-" + name))
            self.acc[name] = os.path.join(self.dir, "acc-" + name)
        else:
            self.acc[name] = bytearray(-(-self.size // SECTOR))
        return point

    def finish(self):
        """Drop the accumulators (the folder holds only backups)."""
        if self.fmt == "qcow2":
            for acc in self.acc.values():
                os.unlink(acc)
        self.acc = {}


def mark(kinds, cmd):
    """Record a qemu-io command in a raw accumulator: 1 data, 2 zeroes."""
    parts = cmd.split()
    off, length = int(parts[-2]), int(parts[-1])
    first, last = off // SECTOR, (off + length - 1) // SECTOR
    zero = "-z" in parts
    for s in range(first, last + 1):
        whole = s * SECTOR >= off and (s + 1) * SECTOR <= off + length
        kinds[s] = 2 if zero and whole else 1


def standard_chain(tmp, fmt, seed=7):
    """full, inc, inc, diff (since the full), inc, grow, inc, inc."""
    r = Repo(tmp, fmt, 4 * MiB, seed)
    r.random_writes(12)
    r.backup("full")
    r.random_writes(6)
    r.backup("incremental")
    r.random_writes(6)
    r.backup("incremental")
    r.random_writes(4)
    r.backup("differential", since="b1." + r.ext)
    r.random_writes(6)
    r.backup("incremental")
    r.resize(5 * MiB + 64 * KiB)
    r.random_writes(4)
    r.io(["write -P 0x5a %d 4096" % (5 * MiB)])
    r.backup("incremental")
    r.random_writes(5)
    r.backup("incremental")
    r.finish()
    return r


def three_chain(tmp, fmt, seed=3):
    """full, inc, inc: each with data the top of the chain still shows."""
    r = Repo(tmp, fmt, 2 * MiB, seed)
    r.io(["write -P 0x11 0 %d" % (2 * MiB)])
    r.backup("full")
    r.io(["write -P 0x22 %d %d" % (512 * KiB, 256 * KiB)])
    r.backup("incremental")
    r.io(["write -P 0x33 %d %d" % (1024 * KiB, 128 * KiB)])
    r.backup("incremental")
    r.finish()
    return r


class CbtChain:
    """The three_chain layout made by cbt backup instead of by hand."""

    def __init__(self, tmp, fmt):
        self.tmp = str(tmp)
        self.dir = os.path.join(self.tmp, "bk")
        os.mkdir(self.dir)
        self.disk = os.path.join(self.tmp, "disk.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", self.disk, 2 * MiB)
        self.points = []
        steps = [("write -P 0x11 0 %d" % (2 * MiB), ["--full", "-O", fmt]),
                 ("write -P 0x22 %d %d" % (512 * KiB, 256 * KiB),
                  ["--incremental"]),
                 ("write -P 0x33 %d %d" % (1024 * KiB, 128 * KiB),
                  ["--incremental"])]
        for k, (io, how) in enumerate(steps, 1):
            qemu_io("-f", "qcow2", "-c", io, self.disk)
            name = "b%d.%s" % (k, fmt)
            cbt("backup", *how, "--checkpoint", "cp%d" % k, self.disk,
                self.path(name))
            ref = os.path.join(self.tmp, "ref%d.raw" % k)
            qemu_img("convert", "-f", "qcow2", "-O", "raw", self.disk, ref)
            self.points.append({"file": name, "ref": ref, "k": k,
                                "checkpoint": "cp%d" % k, "size": 2 * MiB})

    def path(self, name):
        return os.path.join(self.dir, name)


MAKERS = {"hand": three_chain, "cbt": CbtChain}


# ---- oracles ----

def data_bytes(path, fmt):
    """Bytes qemu-img map reports as data (allocated, not zero)."""
    res = qemu_img("map", "--output=json", "-f", fmt, path)
    return sum(e["length"] for e in json.loads(res.out)
               if e.get("data") and not e.get("zero"))


def verify_json(backup, check_rc=None):
    res = cbt("verify", "--output=json", backup, check=False)
    assert res.rc in (0, CORRUPT), res
    data = json.loads(res.out)
    assert (res.rc == 0) == data["ok"], res
    if check_rc is not None:
        assert res.rc == check_rc, res
    return data, res


def flip(path, offset):
    L.flip_byte(path, offset, 0x40)


# ---- the fixtures are what docs/backups.md says (qemu reads them) ----

def test_fixture_chain_reads_in_qemu(tmp):
    r = three_chain(tmp, "qcow2")
    top = r.path(r.points[-1]["file"])
    qemu_img("compare", "-f", "qcow2", "-F", "raw", top, r.points[-1]["ref"])


# ---- every point restores exactly and thinly, and verifies ----

def check_point(backup, fmt, ref, size, workdir, nbackups):
    """verify passes; restore to qcow2 and to raw equals the reference, is
    clean and no thicker than qemu-img convert of the same point."""
    data, res = verify_json(backup, check_rc=0)
    assert data["backups"] == nbackups, data
    assert len(data["chain"]) == nbackups, data
    assert data["chain"][-1]["file"] == backup
    assert data["bytes-checked"] == size, data
    assert data["problem"] is None and data["bad-file"] is None
    for out_fmt in ("qcow2", "raw"):
        out = os.path.join(workdir, "out." + out_fmt)
        cbt("restore", "-O", out_fmt, backup, out)
        assert not os.path.exists(out + ".part")
        qemu_img("compare", "-f", out_fmt, "-F", "raw", out, ref)
        info = json.loads(qemu_img("info", "--output=json", out).out)
        assert info["format"] == out_fmt
        assert info["virtual-size"] == size
        if out_fmt == "qcow2":
            qemu_check_clean(out)
        # No thicker than qemu-img convert of the same point.
        conv = os.path.join(workdir, "conv." + out_fmt)
        src, src_fmt = (backup, "qcow2") if fmt == "qcow2" else (ref, "raw")
        qemu_img("convert", "-f", src_fmt, "-O", out_fmt, src, conv)
        assert data_bytes(out, out_fmt) <= data_bytes(conv, out_fmt), \
            (backup, out_fmt)
        os.unlink(out)
        os.unlink(conv)
    return data


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_restore_and_verify_every_point(tmp, fmt):
    r = standard_chain(tmp, fmt)
    for p in r.points:
        backup = r.path(p["file"])
        data = check_point(backup, fmt, p["ref"], p["size"], r.tmp,
                           len(chain_of(r, p)))
        assert [e["file"] for e in data["chain"]] == \
            [r.path(q["file"]) for q in reversed(chain_of(r, p))]


def chain_of(r, point):
    """The points of point's chain, newest first."""
    by_file = {p["file"]: p for p in r.points}
    out = [point]
    with open(r.path(point["file"]) + ".json") as f:
        m = json.load(f)
    while m["parent"]:
        parent = by_file[m["parent"]["file"]]
        out.append(parent)
        with open(r.path(parent["file"]) + ".json") as f:
            m = json.load(f)
    return out


def test_verify_human_output(tmp):
    r = three_chain(tmp, "qcow2")
    top = r.path("b3.qcow2")
    res = cbt("verify", top)
    lines = res.out.splitlines()
    assert lines[0].split()[:3] == ["KIND", "CHECKPOINT", "FILE"]
    assert [l.split()[:3] for l in lines[1:4]] == [
        ["full", "cp1", r.path("b1.qcow2")],
        ["incremental", "cp2", r.path("b2.qcow2")],
        ["incremental", "cp3", r.path("b3.qcow2")]]
    assert lines[4].startswith("OK: %s: 3 backups, 2 MiB" % top), res
    assert res.err == ""


def test_restore_sparse_zero_writes(tmp):
    """Zero writes and data that are zeroes stay holes in the restore."""
    r = Repo(tmp, "qcow2", 4 * MiB)
    r.io(["write -P 0x61 0 %d" % (4 * MiB)])
    r.backup("full")
    r.io(["write -z %d %d" % (MiB, 2 * MiB),
          "write -P 0 %d %d" % (3 * MiB, 512 * KiB)])
    r.backup("incremental")
    r.finish()
    for fmt in ("qcow2", "raw"):
        out = os.path.join(r.tmp, "o." + fmt)
        cbt("restore", "-O", fmt, r.path("b2.qcow2"), out)
        qemu_img("compare", "-f", fmt, "-F", "raw", out, r.points[-1]["ref"])
        assert data_bytes(out, fmt) == 4 * MiB - 2 * MiB - 512 * KiB


# ---- verify catches damage, naming the file ----

def qcow2_visible_data(top, depth):
    """(guest start, host offset) of a data extent at `depth` in top's
    chain, from qemu-img map."""
    res = qemu_img("map", "--output=json", "-f", "qcow2", top)
    for e in json.loads(res.out):
        if e["depth"] == depth and e.get("data") and "offset" in e:
            return e["start"], e["offset"]
    raise AssertionError("no data at depth %d in %s" % (depth, top))


@pytest.mark.parametrize("maker", sorted(MAKERS))
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_verify_names_flipped_byte_in_every_file(tmp, fmt, maker):
    r = MAKERS[maker](tmp, fmt)
    names = [p["file"] for p in r.points]       # oldest first
    top = r.path(names[-1])
    pristine = os.path.join(r.tmp, "pristine")
    shutil.copytree(r.dir, pristine)
    # Guest data of each backup that the top still shows (three_chain).
    visible = {names[0]: 0, names[1]: 512 * KiB + 3 * BLOCK,
               names[2]: 1024 * KiB + BLOCK}
    cases = []
    for depth, name in enumerate(reversed(names)):
        path = r.path(name)
        # The image: a byte of guest data the top shows.
        if fmt == "qcow2":
            start, host = qcow2_visible_data(top, depth)
            guest = start
        else:
            guest = visible[name] + 1234
            host = guest
        cases.append((path, host, guest))
        # The manifest: for the top, a digit of its root hash (nothing
        # vouches for the rest of it); a parent's anywhere.
        mpath = path + ".json"
        with open(mpath, "rb") as f:
            text = f.read()
        if depth == 0:
            at = text.index(b'"root"')
            at = text.index(b'"', at + 6 + 1) + 5
        else:
            at = len(text) // 2
        cases.append((mpath, at, None))
        # The block hashes: a hand-made v1 .hashes file, or the record file
        # (sha256-tree-v2) of a backup cbt made.
        if os.path.exists(path + ".tree"):
            cases.append((path + ".tree", os.path.getsize(path + ".tree") // 2,
                          None))
        else:
            cases.append((path + ".hashes", 32 * 5 + 7, None))

    for path, off, guest in cases:
        flip(path, off)
        data, res = verify_json(top, check_rc=CORRUPT)
        assert data["bad-file"] == path, (path, data)
        assert path in res.err and res.err.count("\n") == 1, res
        assert res.err.startswith("cbt: " + path), res
        if guest is not None:
            assert data["bad-offset"] == guest - guest % BLOCK, (path, data)
            assert data["bad-length"] == BLOCK
            assert "offset %d" % data["bad-offset"] in res.err
        # restore refuses and leaves nothing behind
        out = os.path.join(r.tmp, "out.qcow2")
        res = cbt("restore", top, out, check=False)
        assert res.rc == CORRUPT and path in res.err, res
        assert not os.path.exists(out) and not os.path.exists(out + ".part")
        shutil.rmtree(r.dir)
        shutil.copytree(pristine, r.dir)
    verify_json(top, check_rc=0)


@pytest.mark.parametrize("maker", sorted(MAKERS))
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_verify_truncated_image(tmp, fmt, maker):
    r = MAKERS[maker](tmp, fmt)
    mid = r.path(r.points[1]["file"])
    size = os.path.getsize(mid)
    with open(mid, "r+b") as f:
        f.truncate(size // 2 if fmt == "raw" else size - 64 * KiB)
    data, res = verify_json(r.path(r.points[2]["file"]), check_rc=CORRUPT)
    assert data["bad-file"] == mid, data
    assert mid in res.err
    res = cbt("restore", r.path(r.points[2]["file"]),
              os.path.join(r.tmp, "o"), check=False)
    assert res.rc == CORRUPT and mid in res.err
    assert os.listdir(r.tmp).count("o") == 0


@pytest.mark.parametrize("what", ["image", "manifest", "hashes"])
def test_verify_missing_middle_backup(tmp, what):
    r = three_chain(tmp, "qcow2")
    mid = r.path("b2.qcow2")
    victim = {"image": mid, "manifest": mid + ".json",
              "hashes": mid + (".tree" if os.path.exists(mid + ".tree")
                               else ".hashes")}[what]
    os.unlink(victim)
    top = r.path("b3.qcow2")
    data, res = verify_json(top, check_rc=CORRUPT)
    assert data["bad-file"] == victim, data
    assert victim in res.err
    # the human output still lists what it could read, and says FAILED
    res = cbt("verify", top, check=False)
    assert res.rc == CORRUPT
    assert res.out.splitlines()[-1].startswith("FAILED: %s" % top)
    out = os.path.join(r.tmp, "o.qcow2")
    res = cbt("restore", top, out, check=False)
    assert res.rc == CORRUPT and victim in res.err
    assert not os.path.exists(out)


def test_verify_chain_rules(tmp):
    """Manifests that are each intact but do not form a chain."""
    r = three_chain(tmp, "qcow2")
    top = r.path("b3.qcow2")

    def rewrite(name, change):
        p = r.path(name) + ".json"
        with open(p) as f:
            m = json.load(f)
        change(m)
        with open(p, "w") as f:
            json.dump(m, f)
        return p

    def relink(child, parent):
        # keep the child's record of its parent's manifest honest
        def fix(m):
            m["parent"]["manifest-sha256"] = sha256_file(
                r.path(parent) + ".json")
        return rewrite(child, fix)

    pristine = os.path.join(r.tmp, "pristine")
    shutil.copytree(r.dir, pristine)

    def reset():
        shutil.rmtree(r.dir)
        shutil.copytree(pristine, r.dir)

    # another disk's backup as parent
    rewrite("b2.qcow2", lambda m: m["disk"].update(id=str(uuid.uuid4())))
    relink("b3.qcow2", "b2.qcow2")
    data, res = verify_json(top, check_rc=CORRUPT)
    assert data["bad-file"] == r.path("b2.qcow2.json")
    assert "disk" in data["problem"]
    reset()

    # checkpoint order not increasing
    rewrite("b2.qcow2", lambda m: m["checkpoint"].update(order=9))
    relink("b3.qcow2", "b2.qcow2")
    data, res = verify_json(top, check_rc=CORRUPT)
    assert data["bad-file"] == r.path("b3.qcow2.json")
    assert "order" in data["problem"]
    reset()

    # the child starts from a checkpoint its parent did not create
    rewrite("b3.qcow2", lambda m: m.update(since="cp1"))
    data, res = verify_json(top, check_rc=CORRUPT)
    assert data["bad-file"] == r.path("b3.qcow2.json")
    assert "cp1" in data["problem"]
    reset()

    # the qcow2 backing link names another file than the manifest's parent
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b1.qcow2", "-F", "qcow2",
             top)
    data, res = verify_json(top, check_rc=CORRUPT)
    assert data["bad-file"] == top
    assert "backing" in data["problem"]
    reset()

    # a chain that does not reach a full backup
    def orphan(m):
        m["parent"] = None
        m["kind"] = "incremental"
    rewrite("b1.qcow2", orphan)
    relink("b2.qcow2", "b1.qcow2")
    relink("b3.qcow2", "b2.qcow2")
    data, res = verify_json(top, check_rc=CORRUPT)
    assert data["bad-file"] is not None and "b1.qcow2" in data["bad-file"]
    reset()
    verify_json(top, check_rc=0)


# ---- restore refusals ----

def test_restore_refusals(tmp):
    r = three_chain(tmp, "qcow2")
    top = r.path("b3.qcow2")
    out = os.path.join(r.tmp, "exists.qcow2")
    with open(out, "w") as f:
        f.write("keep me")
    res = cbt("restore", top, out, check=False)
    assert res.rc == 1 and "already exists" in res.err, res
    with open(out) as f:
        assert f.read() == "keep me"

    res = cbt("restore", "-O", "vmdk", top, os.path.join(r.tmp, "x"),
              check=False)
    assert res.rc == USAGE and "vmdk" in res.err
    res = cbt("restore", "-O", "raw", "--seed-checkpoint", "cp3", top,
              os.path.join(r.tmp, "x"), check=False)
    assert res.rc == USAGE and "qcow2" in res.err
    res = cbt("restore", "--seed-checkpoint", "other", top,
              os.path.join(r.tmp, "x"), check=False)
    assert res.rc == USAGE and "cp3" in res.err
    assert not os.path.exists(os.path.join(r.tmp, "x"))
    res = cbt("restore", os.path.join(r.tmp, "nope.qcow2"),
              os.path.join(r.tmp, "x"), check=False)
    assert res.rc == 1 and "nope.qcow2" in res.err
    res = cbt("restore", r.disk, os.path.join(r.tmp, "x"), check=False)
    assert res.rc == 1 and "not a backup" in res.err
    assert not os.path.exists(os.path.join(r.tmp, "x"))


def test_restore_stops_at_bad_block(tmp):
    """Data damage passes the integrity checks and is caught while
    writing: the restore names the range and the file, leaves no OUT."""
    r = three_chain(tmp, "qcow2")
    top = r.path("b3.qcow2")
    start, host = qcow2_visible_data(top, 1)   # b2's data
    flip(r.path("b2.qcow2"), host + 100)
    out = os.path.join(r.tmp, "o.qcow2")
    res = cbt("restore", top, out, check=False)
    assert res.rc == CORRUPT, res
    assert r.path("b2.qcow2") in res.err
    assert "offset %d" % (start - start % BLOCK) in res.err
    assert not os.path.exists(out) and not os.path.exists(out + ".part")


# ---- seeding a checkpoint ----

def test_restore_seed_checkpoint(tmp):
    r = three_chain(tmp, "qcow2")
    top = r.path("b3.qcow2")
    out = os.path.join(r.tmp, "restored.qcow2")
    cbt("restore", "--seed-checkpoint", "cp3", top, out)
    qemu_img("compare", "-f", "qcow2", "-F", "raw", out, r.points[-1]["ref"])
    qemu_check_clean(out)
    info = json.loads(qemu_img("info", "--output=json", out).out)
    bitmaps = info["format-specific"]["data"].get("bitmaps", [])
    assert [b["name"] for b in bitmaps] == ["cp3"], info
    assert "auto" in bitmaps[0]["flags"]
    res = cbt("checkpoint", "list", "--output=json", out)
    listed = json.loads(res.out)
    text = json.dumps(listed)
    assert "cp3" in text and r.disk_id in text.lower(), listed


# ---- -p ----

def run_on_pty(argv):
    """Run argv with stderr on a pseudo-terminal: (rc, what it drew)."""
    import pty
    import subprocess
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        drawn = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            drawn += chunk
        proc.wait(timeout=600)
        proc.stdout.close()
        return proc.returncode, drawn
    finally:
        os.close(master)


@pytest.mark.parametrize("cmd", ["restore", "verify"])
def test_progress(tmp, cmd):
    import re
    from conftest import CBT
    r = three_chain(tmp, "qcow2")
    argv = [CBT, cmd, "-p", r.path("b3.qcow2")]
    if cmd == "restore":
        argv.append(os.path.join(r.tmp, "o.qcow2"))
    rc, drawn = run_on_pty(argv)
    assert rc == 0, drawn
    pcts = [int(a) * 10 + int(b)
            for a, b in re.findall(rb"\((\d+)\.(\d)/100%\)", drawn)]
    assert pcts and pcts == sorted(pcts) and pcts[-1] == 1000, drawn
    # without a terminal nothing is drawn
    res = cbt(*argv[1:-1], os.path.join(r.tmp, "o2.qcow2")
              if cmd == "restore" else argv[-1])
    assert res.err == ""


# ---- backups made by cbt backup ----

@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_cbt_backup_chain_restores(tmp, fmt):
    """Full, incrementals, a differential and a resize, made by cbt backup;
    every point verifies and restores to the disk as it was then."""
    tmp = str(tmp)
    disk = os.path.join(tmp, "disk.qcow2")
    bk = os.path.join(tmp, "bk")
    os.mkdir(bk)
    qemu_img("create", "-q", "-f", "qcow2", disk, 4 * MiB)
    rng = random.Random(11 if fmt == "qcow2" else 12)
    size = 4 * MiB
    points = []   # (backup, ref, size, chain length)
    depth = {}    # checkpoint -> chain length of its backup

    def writes(n):
        cmds = []
        for _ in range(n):
            length = rng.choice([512, 4096, BLOCK, 3 * BLOCK + 100])
            off = rng.randrange(0, size - length)
            if rng.random() < 0.2:
                cmds.append("write -z %d %d" % (off, length))
            else:
                cmds.append("write -P %d %d %d"
                            % (rng.randrange(1, 256), off, length))
        args = []
        for c in cmds:
            args += ["-c", c]
        qemu_io("-f", "qcow2", *args, disk)

    def backup(cp, *how):
        k = len(points) + 1
        target = os.path.join(bk, "b%d.%s" % (k, fmt))
        args = list(how) + ["--checkpoint", cp]
        if k == 1:
            args += ["-O", fmt]
        cbt("backup", *args, disk, target)
        ref = os.path.join(tmp, "ref%d.raw" % k)
        qemu_img("convert", "-f", "qcow2", "-O", "raw", disk, ref)
        with open(target + ".json") as f:
            m = json.load(f)
        n = 1 if m["parent"] is None else depth[m["since"]] + 1
        depth[cp] = n
        points.append((target, ref, size, n))

    writes(12)
    backup("c1", "--full")
    writes(6)
    backup("c2", "--incremental")
    writes(6)
    backup("c3", "--incremental")
    writes(4)
    backup("c4", "--since", "c1")
    writes(5)
    backup("c5", "--incremental")
    size = 5 * MiB
    qemu_img("resize", "-q", "-f", "qcow2", disk, size)
    qemu_io("-c", "write -P 0x5a %d 4096" % (4 * MiB + 64 * KiB), disk)
    writes(3)
    backup("c6", "--incremental")
    writes(3)
    backup("c7", "--incremental")

    for target, ref, sz, n in points:
        if fmt == "qcow2":
            # qemu-img reads the backup chain, and every file is clean
            qemu_img("compare", "-f", "qcow2", "-F", "raw", target, ref)
            qemu_check_clean(target)
        check_point(target, fmt, ref, sz, tmp, n)


def test_verify_names_damaged_qcow2_metadata(tmp):
    """A flipped bit in an L2 entry of the middle backup: named, whichever
    check finds it first."""
    import struct
    r = three_chain(tmp, "qcow2")
    mid = r.path("b2.qcow2")
    with open(mid, "r+b") as f:
        h = f.read(104)
        l1_off = struct.unpack(">Q", h[40:48])[0]
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
        f.seek(l2_off)
        l2 = f.read(64 * KiB)
        i = next(k for k in range(8192) if l2[8 * k:8 * k + 8] != bytes(8))
        f.seek(l2_off + 8 * i + 6)
        b = f.read(1)
        f.seek(l2_off + 8 * i + 6)
        f.write(bytes([b[0] ^ 1]))
    data, res = verify_json(r.path("b3.qcow2"), check_rc=CORRUPT)
    assert data["bad-file"] == mid, data
    assert res.err.startswith("cbt: " + mid), res
