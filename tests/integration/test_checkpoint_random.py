"""Random stories of a disk through snapshots, overlays, commits, streams
and bitmap edits, with a backup attempt after most steps (issue 10,
sections 2 and 3).

The property, after every step: an incremental or differential backup is
either refused with exit status 79 (then --auto takes a full backup and
says why), or it succeeds -- and every backup that succeeds restores to
exactly the disk's guest view at that moment (`cbt restore`, then
`qemu-img compare` against the disk's chain).  A backup that misses writes
since its checkpoint is the failure this hunts for.

And after every documented cbt way of folding an overlay back (cbt commit
--top, cbt commit FILE keeping FILE or keeping its base, cbt stream) the
newest checkpoint that was usable before is usable after, unless the
command said beforehand that the base cannot hold it.

Steps (weights in STEPS): qemu-io writes, zero writes and discards on the
disk; cbt snapshot; an overlay made by qemu-img create -b, with or without
the checkpoints' bitmaps added (libvirt's way); cbt commit FILE (then the
disk is FILE or its base), cbt commit --top, cbt stream (with or without a
base); qemu-img commit (then FILE or its base); qemu-img bitmap --remove of
a copy in any layer, --clear of a copy below the top; cbt checkpoint delete
on a layer below the top; growing the disk (cbt resize).  Not included: writing into a backing file or
qemu-img rebase -u onto other data, which change the disk's view with no
write any bitmap could see (docs/checkpoints.md, "History across
snapshots").

`qemu-img check` is clean on every layer at the end and on every restore;
at least half of the incrementals and differentials tried are taken (a
cbt that refused them all would pass the property).
Failure messages carry the seed and the story; CBT_TEST_SEED shifts the
seeds.
"""
import json
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import KiB, MiB, cbt, qemu_img, qemu_io, no_crash  # noqa: E402
from conftest import qemu_check_clean  # noqa: E402

SEED_BASE = int(os.environ.get("CBT_TEST_SEED", "0"), 0)
SEEDS = [1001, 1002, 1003, 1004]
STEPS_PER_SEED = 22
SIZE = 16 * MiB
NEED_FULL = 79

STEPS = [("write", 6), ("snapshot", 3), ("qemu_overlay", 2),
         ("commit", 2), ("commit_top", 2), ("stream", 2), ("qemu_commit", 1),
         ("remove_copy", 1), ("clear_copy", 1), ("delete_below", 1),
         ("resize", 1)]


class Story:
    def __init__(self, tmp, seed):
        self.dir = str(tmp)
        self.rng = random.Random(SEED_BASE + seed)
        self.seed = seed
        self.log = []
        self.n = 0
        self.nb = 0
        self.nck = 0
        self.tried = self.took = 0  # incrementals/differentials: tried, taken
        self.bk = os.path.join(self.dir, "bk")
        os.makedirs(self.bk)
        self.disk = self.new_name()
        qemu_img("create", "-q", "-f", "qcow2", self.path(self.disk), SIZE)
        self.note("qemu-img create %s" % self.disk)

    # -- helpers --

    def new_name(self):
        self.n += 1
        return "l%02d.qcow2" % self.n

    def path(self, name):
        return os.path.join(self.dir, name)

    def note(self, s):
        self.log.append(s)

    def label(self):
        return "seed %d, story:\n  %s" % (self.seed, "\n  ".join(self.log))

    def cbt(self, *args, rc=(0,)):
        res = no_crash(cbt(*args, check=False, cwd=self.dir))
        self.note("cbt %s -> %d%s" % (" ".join(str(a) for a in args), res.rc,
                                      (": " + res.err.strip().replace("\n", " | "))
                                      if res.err.strip() else ""))
        assert res.rc in rc, "%r\n%s" % (res, self.label())
        return res

    def chain(self):
        """Layer file names of the disk, top first."""
        info = json.loads(qemu_img("info", "-U", "--output=json", "--backing-chain",
                                   self.path(self.disk)).out)
        return [os.path.basename(i["filename"]) for i in info]

    def checkpoints(self):
        res = no_crash(cbt("checkpoint", "list", "--output=json", self.disk,
                           cwd=self.dir))
        return json.loads(res.out)["checkpoints"]

    def newest_usable(self):
        cks = self.checkpoints()
        return cks[-1]["name"] if cks and cks[-1]["usable"] else None

    def bitmaps(self, layer):
        info = json.loads(qemu_img("info", "-U", "--output=json", self.path(layer)).out)
        return [b["name"] for b in
                info.get("format-specific", {}).get("data", {}).get("bitmaps", [])]

    # -- steps --

    def write(self):
        cmds = []
        for _ in range(self.rng.randint(1, 4)):
            size = json.loads(qemu_img("info", "-U", "--output=json",
                                       self.path(self.disk)).out)["virtual-size"]
            off = self.rng.randrange(0, size // (64 * KiB)) * 64 * KiB
            off += self.rng.choice([0, 0, 512, 4096])
            n = min(self.rng.choice([4 * KiB, 64 * KiB, 200 * KiB, 1 * MiB]), size - off)
            kind = self.rng.random()
            if kind < 0.7:
                cmds.append("write -P %d %d %d" % (self.rng.randint(1, 255), off, n))
            elif kind < 0.85:
                cmds.append("write -z %d %d" % (off, n))
            else:
                cmds.append("discard %d %d" % (off, n))
        for c in cmds:
            qemu_io("-f", "qcow2", "-c", c, self.path(self.disk))
        self.note("qemu-io %s: %s" % (self.disk, " ; ".join(cmds)))

    def snapshot(self):
        new = self.new_name()
        self.cbt("snapshot", self.disk, new)
        self.disk = new

    def qemu_overlay(self):
        new = self.new_name()
        qemu_img("create", "-q", "-f", "qcow2", "-b", self.disk, "-F", "qcow2",
                 self.path(new))
        added = []
        disabled = []
        if self.rng.random() < 0.6:
            # libvirt's way: the checkpoints' bitmaps in the new overlay;
            # sometimes one disabled in the old top by hand.
            for c in self.checkpoints():
                if c["name"] in self.bitmaps(self.disk):
                    qemu_img("bitmap", "--add", "-g", str(c["granularity"]),
                             self.path(new), c["name"])
                    added.append(c["name"])
                    if self.rng.random() < 0.15:
                        qemu_img("bitmap", "--disable", self.path(self.disk), c["name"])
                        disabled.append(c["name"])
        self.note("qemu-img create -b %s %s (bitmaps added: %s, disabled below: %s)"
                  % (self.disk, new, added, disabled))
        self.disk = new

    def fold(self, argv, new_disk):
        """A cbt fold: the newest checkpoint usable before stays usable,
        unless the command said the base cannot hold it."""
        before = self.newest_usable()
        res = self.cbt(*argv)
        self.disk = new_disk
        if before and "stays with" not in res.err:
            cks = {c["name"]: c for c in self.checkpoints()}
            assert before in cks and cks[before]["usable"], \
                "checkpoint %s no longer usable after cbt %s: %r\n%s" % (
                    before, " ".join(argv), cks.get(before), self.label())

    def commit(self):
        chain = self.chain()
        if len(chain) < 2:
            return self.write()
        keep_base = self.rng.random() < 0.5
        self.fold(["commit", "-q", self.disk], chain[1] if keep_base else self.disk)
        self.note("  (the disk is now %s)" % self.disk)

    def commit_top(self):
        chain = self.chain()
        if len(chain) < 2:
            return self.write()
        base = self.rng.randrange(1, len(chain))
        self.fold(["commit", "-q", "--top", self.disk, "--base", chain[base]], chain[base])

    def stream(self):
        chain = self.chain()
        if len(chain) < 2:
            return self.write()
        b = self.rng.randrange(1, len(chain) + 1)
        argv = ["stream", self.disk] + (["-b", chain[b]] if b < len(chain) else [])
        self.fold(argv, self.disk)

    def qemu_commit(self):
        chain = self.chain()
        if len(chain) < 2:
            return self.write()
        qemu_img("commit", "-q", self.path(self.disk))
        keep_base = self.rng.random() < 0.5
        self.note("qemu-img commit %s (the disk is now %s)" % (
            self.disk, chain[1] if keep_base else self.disk))
        if keep_base:
            self.disk = chain[1]

    def lower_copy(self, depth_from):
        chain = self.chain()
        found = [(l, b) for l in chain[depth_from:] for b in self.bitmaps(l)]
        return self.rng.choice(found) if found else (None, None)

    def remove_copy(self):
        layer, name = self.lower_copy(0)
        if layer:
            qemu_img("bitmap", "--remove", self.path(layer), name)
            self.note("qemu-img bitmap --remove %s %s" % (layer, name))

    def clear_copy(self):
        layer, name = self.lower_copy(1)
        if layer:
            qemu_img("bitmap", "--clear", self.path(layer), name)
            self.note("qemu-img bitmap --clear %s %s" % (layer, name))

    def delete_below(self):
        chain = self.chain()
        if len(chain) < 2:
            return self.write()
        layer = self.rng.choice(chain[1:])
        res = no_crash(cbt("checkpoint", "list", "--output=json", layer, cwd=self.dir))
        names = [c["name"] for c in json.loads(res.out)["checkpoints"]]
        if names:
            self.cbt("checkpoint", "delete", layer, self.rng.choice(names))

    def resize(self):
        size = json.loads(qemu_img("info", "-U", "--output=json",
                                   self.path(self.disk)).out)["virtual-size"]
        new = size + self.rng.choice([64 * KiB, 1 * MiB, 3 * MiB + 512])
        self.cbt("resize", "-q", self.disk, new)

    # -- the property --

    def backup(self):
        self.nb += 1
        target = os.path.join("bk", "b%02d.qcow2" % self.nb)
        cks = self.checkpoints()
        r = self.rng.random()
        if not cks or r < 0.15:
            mode = ["--full"]
        elif r < 0.7:
            mode = ["--incremental"]
        else:
            mode = ["--since", self.rng.choice(cks)["name"]]
        self.nck += 1
        ck = ["--checkpoint", "c%02d" % self.nck]
        res = self.cbt("backup", "--output=json", *(mode + ck), self.disk, target,
                       rc=(0, NEED_FULL))
        if mode != ["--full"]:
            self.tried += 1
            self.took += res.rc == 0
        if res.rc == NEED_FULL:
            assert not os.path.exists(self.path(target)), self.label()
            res = self.cbt("backup", "--output=json", "--auto", *(mode + ck),
                           self.disk, target)
            got = json.loads(res.out)
            # a full backup, or a rescan on top of the checkpoint's backup
            # (its bitmap unusable); either restores to the disk (below)
            assert got["fallback"], "%r\n%s" % (got, self.label())
            assert got["kind"] == "full" or got["rescan"] is True, \
                "%r\n%s" % (got, self.label())
        self.check_restore(target)

    def check_restore(self, target):
        out = self.path(target + ".restored.qcow2")
        no_crash(cbt("restore", target, out, cwd=self.dir))
        res = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", out,
                       self.path(self.disk), check=False)
        assert res.rc == 0, "backup %s does not restore to %s: %r\n%s" % (
            target, self.disk, res, self.label())
        qemu_check_clean(out)
        os.unlink(out)

    def run(self):
        self.write()
        self.backup()
        names = [s for s, _ in STEPS]
        weights = [w for _, w in STEPS]
        for _ in range(STEPS_PER_SEED):
            step = self.rng.choices(names, weights)[0]
            getattr(self, step)()
            if step != "write" or self.rng.random() < 0.5:
                self.write()
            if self.rng.random() < 0.7:
                self.backup()
        self.backup()
        for f in sorted(os.listdir(self.dir)):
            if f.endswith(".qcow2"):
                qemu_check_clean(self.path(f))
        # Refusing everything would pass the property: most must be taken.
        assert self.took * 2 >= self.tried, "only %d of %d incrementals taken\n%s" % (
            self.took, self.tried, self.label())


@pytest.mark.parametrize("seed", SEEDS)
def test_random_story(tmp_path, seed):
    Story(tmp_path, seed).run()
