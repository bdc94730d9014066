"""A seeded random series of bitmap operations and I/O, done by QEMU on one
copy and by cbt on another, ends in the same bitmaps.

Two byte-identical fresh images (qemu-img create; several cluster sizes,
with and without extended L2) get the same series of steps:
  * bitmap operations, qemu-img bitmap on one copy and cbt bitmap on the
    other: --add (default or random granularity 512 B .. 2 GiB, sometimes
    with --disable or --merge in the same call), --remove, --clear,
    --enable, --disable, --merge (same file, or another file via -b/-F),
    several actions in one call; and now and then an operation that must
    fail (duplicate name, missing bitmap, bad granularity): both tools must
    fail, and the cbt copy must stay byte-identical (cbt calls are atomic);
  * I/O batches: the same writes/zero-writes/discards through qemu-io and
    through cbt io.
After every step qemu-img info lists the same bitmaps (names in order,
granularities, flags) for both copies.  Halfway and at the end, for every
bitmap, QEMU's NBD export of the cbt copy == QEMU's NBD export of the QEMU
copy == cbt bitmap --dump of the cbt copy, cbt's counts match, and
qemu-img check finds the cbt copy clean.
"""
import os
import random

import pytest

import interop_lib as L
from interop_lib import KiB, MiB, qemu_img

SEED_BASE = int(os.environ.get("CBT_TEST_SEED", "0"), 0)
# (cluster size, extended L2, disk size) by seed
GEOMETRY = [
    (64 * KiB, False, 6 * MiB + 1536),
    (4 * KiB, False, 3 * MiB + 512),
    (16 * KiB, True, 4 * MiB + 2560),
    (512, False, 2 * MiB + 1536),
    (64 * KiB, True, 6 * MiB + 512),
    (2 * MiB, True, 64 * MiB + 512),
]
NSTEPS = 32
MAX_BITMAPS = 7


def rand_gran(rng):
    r = rng.randrange(10)
    if r < 3:
        return None
    if r < 9:
        return 1 << rng.randint(9, 20)
    return 1 << rng.randint(21, 31)


class Twin:
    def __init__(self, d, seed):
        self.seed = seed
        self.rng = random.Random(seed)
        cluster, l2ext, size = GEOMETRY[seed % len(GEOMETRY)]
        self.size = size
        self.q = os.path.join(d, "q.qcow2")
        self.c = os.path.join(d, "c.qcow2")
        opts = "cluster_size=%d" % cluster + (",extended_l2=on" if l2ext else "")
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, self.q, size)
        L.copy(self.q, self.c)
        # the -b source, shared read-only by both sides
        self.other = os.path.join(d, "other.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", self.other, size)
        for name, g in (("o1", 4096), ("o2", 1 << 20)):
            qemu_img("bitmap", "--add", "-g", g, self.other, name)
        L.run_qemu_io(self.other, L.bitmap_io_workload(self.rng, size, 12, 256 * KiB))
        self.other_digest = L.file_digest(self.other)
        self.names = []         # expected directory order
        self.counter = 0
        self.history = []

    def where(self):
        return "seed %d, geometry %s, last steps:\n  %s" % (
            self.seed, GEOMETRY[self.seed % len(GEOMETRY)], "\n  ".join(self.history[-12:]))

    def fresh_name(self):
        self.counter += 1
        return "bm%d" % self.counter

    def io(self):
        cmds = L.bitmap_io_workload(self.rng, self.size, self.rng.randint(1, 8), 192 * KiB)
        self.history.append("io: " + "; ".join(cmds))
        L.run_qemu_io(self.q, cmds)
        L.run_cbt_io(self.c, cmds)

    def bitmap(self, args, name, must_fail=False):
        """The same qemu-img bitmap / cbt bitmap call on both copies."""
        self.history.append("bitmap %s FILE %s%s" % (
            " ".join(map(str, args)), name, " (must fail)" if must_fail else ""))
        before = L.file_digest(self.c)
        q = qemu_img(*(["bitmap"] + args + [self.q, name]), check=False)
        c = L.cbt_rc(*(["bitmap"] + args + [self.c, name]))
        assert q.rc == c.rc, "qemu-img exit %d, cbt exit %d; %s\nqemu-img: %r\ncbt: %r" % (
            q.rc, c.rc, self.where(), q, c)
        assert (q.rc != 0) == must_fail, "unexpected result %s\n%r" % (self.where(), q)
        if must_fail:
            assert L.file_digest(self.c) == before, \
                "a failed cbt bitmap call changed the image; %s" % self.where()
        return q.rc == 0

    def random_op(self):
        r = self.rng
        names = self.names
        k = r.randrange(100)
        if not names or (k < 22 and len(names) < MAX_BITMAPS):
            name = self.fresh_name()
            g = rand_gran(r)
            args = ["--add"] + (["-g", g] if g else [])
            extra = r.randrange(4)
            if extra == 1:
                args += ["--disable"]
            elif extra == 2 and names:
                args += ["--merge", r.choice(names)]
            self.bitmap(args, name)
            names.append(name)
        elif k < 30:
            name = r.choice(names)
            self.bitmap(["--remove"], name)
            names.remove(name)
        elif k < 40:
            self.bitmap(["--clear"], r.choice(names))
        elif k < 50:
            self.bitmap(["--enable"], r.choice(names))
        elif k < 62:
            self.bitmap(["--disable"], r.choice(names))
        elif k < 76:
            src = r.choice(names) if r.random() < 0.9 else None
            dst = r.choice(names)
            self.bitmap(["--merge", src or dst], dst)
        elif k < 82:
            self.bitmap(["--merge", r.choice(["o1", "o2"]), "-b", self.other, "-F", "qcow2"],
                        r.choice(names))
        elif k < 90:
            # several actions on one bitmap
            acts = []
            for _ in range(r.randint(2, 4)):
                a = r.choice(["--clear", "--enable", "--disable", "--merge"])
                acts += [a, r.choice(names)] if a == "--merge" else [a]
            self.bitmap(acts, r.choice(names))
        else:
            kind = r.randrange(5)
            if kind == 0:
                self.bitmap(["--add"], r.choice(names), must_fail=True)
            elif kind == 1:
                self.bitmap([r.choice(["--remove", "--clear", "--enable", "--disable"])],
                            "missing", must_fail=True)
            elif kind == 2:
                self.bitmap(["--merge", "missing"], r.choice(names), must_fail=True)
            elif kind == 3:
                self.bitmap(["--add", "-g", r.choice([256, 1000, 3 << 20, 1 << 32])],
                            self.fresh_name(), must_fail=True)
            else:
                # a failing action after successful ones: qemu-img commits
                # each action on its own, cbt all or none, so only cbt runs
                # it, and its copy must stay byte-identical
                tgt = r.choice(names)
                self.history.append("cbt only: bitmap --clear --disable --merge missing FILE %s"
                                    % tgt)
                before = L.file_digest(self.c)
                c = L.cbt_rc("bitmap", "--clear", "--disable", "--merge", "missing", self.c, tgt)
                assert c.rc == 1, "cbt accepted a merge from a missing bitmap: %r" % c
                assert L.file_digest(self.c) == before, \
                    "a cbt call whose 3rd action failed changed the image; %s" % self.where()

    def compare(self, full):
        qb, cb = L.qemu_bitmaps(self.q), L.qemu_bitmaps(self.c)
        assert cb == qb, "qemu-img info bitmaps differ; %s\n  cbt copy:  %s\n  qemu copy: %s" % (
            self.where(), cb, qb)
        assert [b["name"] for b in qb] == self.names, (self.names, qb)
        if not full:
            return
        L.qemu_check_clean(self.c)
        want = L.qemu_bitmap_extents(self.q, self.names)
        got = L.assert_bitmaps_agree(self.c, self.size, None, "seed %d" % self.seed)
        for n in self.names:
            L.assert_extents_equal(got[n], want[n],
                                   "bitmap %r: cbt copy vs QEMU copy (both read by QEMU); %s"
                                   % (n, self.where()))
        assert L.file_digest(self.other) == self.other_digest, "the -b source file changed"


@pytest.mark.parametrize("seed", range(len(GEOMETRY)))
def test_random_series_same_bitmaps(tmp, seed):
    seed += SEED_BASE
    t = Twin(str(tmp), seed)
    for step in range(NSTEPS):
        if step and t.rng.random() < 0.4:
            t.io()
        else:
            t.random_op()
        t.compare(full=(step == NSTEPS // 2))
    t.io()
    t.compare(full=True)
