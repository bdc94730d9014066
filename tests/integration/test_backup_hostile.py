"""Hostile and damaged backup folders (issue 10, sections 4 and 5): cbt
never hangs on them, never builds on them, never writes outside them.

  * hangs: a manifest, a block hashes file or a backup image replaced by
    a symlink to a FIFO or to /dev/zero; verify and restore refuse it
    naming the file (exit 65, nothing left behind), backup --incremental
    refuses it or falls back to a full backup with --auto; every command
    runs under a timeout, and a run that does not finish fails the test;
  * writes outside the folder: symlinks planted at the names cbt used to
    write through (NAME.json.tmp, NAME.hashes.tmp) change nothing, links
    at the names a backup or restore creates (TARGET, TARGET.part, .json,
    .tree, OUT.part) are refused, and the files they point to stay
    untouched.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_TESTS, "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import MiB, qemu_img, qemu_io  # noqa: E402

CORRUPT, NEED_FULL = 65, 79
# A command that has not finished by then hangs (a FIFO waiting for a
# writer, /dev/zero read to its end); ASan runs take a second or two.
HANG = 120


def run(*args, cwd=None):
    """cbt ARGS; a hang fails the test."""
    try:
        proc = subprocess.run([L.CBT] + [str(a) for a in args], cwd=cwd,
                              capture_output=True, text=True, timeout=HANG)
    except subprocess.TimeoutExpired:
        pytest.fail("cbt %s did not finish in %d s (it hangs)"
                    % (" ".join(str(a) for a in args), HANG))
    return L.no_crash(L._ct.Result(proc), "cbt " + " ".join(map(str, args)))


class Chain:
    """disk.qcow2 with checkpoints c1..c3 and their backups in bk/:
    f.qcow2 (full), i1.qcow2, i2.qcow2 (incrementals)."""

    def __init__(self, tmp, fmt="qcow2"):
        self.tmp = str(tmp)
        self.disk = os.path.join(self.tmp, "disk.qcow2")
        self.bk = os.path.join(self.tmp, "bk")
        self.ext = "qcow2" if fmt == "qcow2" else "raw"
        os.mkdir(self.bk)
        qemu_img("create", "-q", "-f", "qcow2", self.disk, 4 * MiB)
        extra = [] if fmt == "qcow2" else ["-O", "raw"]
        for i, (mode, name) in enumerate([("--full", "f"), ("--incremental", "i1"),
                                          ("--incremental", "i2")]):
            qemu_io("-f", "qcow2", "-c", "write -P %d %dk 128k" % (i + 1, 512 * i),
                    self.disk)
            run_ok("backup", mode, *extra, "--checkpoint", "c%d" % (i + 1),
                   self.disk, self.path(name))

    def path(self, name, suffix=""):
        return os.path.join(self.bk, "%s.%s%s" % (name, self.ext, suffix))

    def files(self):
        return sorted(os.listdir(self.bk))


def run_ok(*args):
    res = run(*args)
    assert res.rc == 0, res
    return res


def plant(path, kind, tmp):
    """Replace path by a symlink to a FIFO or to /dev/zero."""
    os.unlink(path)
    if kind == "fifo":
        target = os.path.join(str(tmp), "fifo-%s" % os.path.basename(path))
        os.mkfifo(target)
    else:
        target = "/dev/zero"
    os.symlink(target, path)


# ---- hangs ----

SUFFIXES = {"manifest": ".json", "hashes": ".tree", "image": ""}


@pytest.mark.parametrize("kind", ["fifo", "zero"])
@pytest.mark.parametrize("what", sorted(SUFFIXES))
@pytest.mark.parametrize("name", ["f", "i1", "i2"])
def test_verify_and_restore_refuse_special_files(tmp, name, what, kind):
    c = Chain(tmp)
    victim = c.path(name, SUFFIXES[what])
    plant(victim, kind, tmp)
    top = c.path("i2")
    res = run("verify", top)
    assert res.rc == CORRUPT, res
    assert victim in res.err and "not a regular file" in res.err, res
    out = os.path.join(c.tmp, "out.qcow2")
    res = run("restore", top, out)
    assert res.rc == CORRUPT, res
    assert victim in res.err, res
    assert not os.path.exists(out) and not os.path.exists(out + ".part")


def refused_then_auto_full(c, rc, words):
    """backup --incremental is refused with exit rc, the message naming
    `words`, nothing created; --auto takes a full backup saying why, which
    verifies and equals the disk."""
    before = c.files()
    res = run("backup", "--incremental", c.disk, c.path("i3"))
    assert res.rc == rc, res
    for w in words:
        assert w in res.err, "%r not in %r" % (w, res.err)
    assert "--full" in res.err and "--auto" in res.err, res
    assert c.files() == before
    res = run("backup", "--incremental", "--auto", "--output=json", c.disk,
              c.path("i3"))
    assert res.rc == 0, res
    j = res.json()
    assert j["kind"] == "full" and j["fallback"], res
    for w in words:
        assert w in j["fallback"], (w, j)
    run_ok("verify", c.path("i3"))
    cmp = qemu_img("compare", "-q", c.disk, c.path("i3"), check=False)
    assert cmp.rc == 0, cmp


@pytest.mark.parametrize("kind", ["fifo", "zero"])
@pytest.mark.parametrize("what", sorted(SUFFIXES))
@pytest.mark.parametrize("name", ["f", "i1", "i2"])
def test_backup_refuses_special_parent_files(tmp, name, what, kind):
    """The files of the parent backup's chain: the incremental is refused
    (or, with --auto, a full backup is taken instead), never built on
    them."""
    c = Chain(tmp)
    victim = c.path(name, SUFFIXES[what])
    plant(victim, kind, tmp)
    if name == "i2" and what == "manifest":
        # the parent's own manifest does not read: no backup of c3 here
        refused_then_auto_full(c, NEED_FULL, ["no backup of checkpoint 'c3'"])
    else:
        refused_then_auto_full(c, CORRUPT, [victim, "not a regular file"])


# ---- rotation: old backups deleted ----

@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("gone", ["full", "full-image", "full-manifest",
                                  "full-hashes", "middle"])
def test_rotation(tmp, fmt, gone):
    """Deleting old backups makes the next incremental impossible: it is
    refused naming the missing file and the way out (exit 79), and --auto
    takes a full backup saying why."""
    c = Chain(tmp, fmt)
    name = "i1" if gone == "middle" else "f"
    suffixes = {"full-image": [""], "full-manifest": [".json"],
                "full-hashes": [".tree"]}.get(gone, ["", ".json", ".tree"])
    for sfx in suffixes:
        os.unlink(c.path(name, sfx))
    missing = c.path(name, suffixes[0]) if len(suffixes) == 1 else c.path(name)
    refused_then_auto_full(c, NEED_FULL, [missing, "incomplete"])


# ---- a parent chain that cbt verify rejects ----

def load(path):
    with open(path) as f:
        return json.load(f)


def save(path, m):
    with open(path, "w") as f:
        json.dump(m, f, indent=2)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def reseal(c, upto="i2"):
    """Record every manifest's new digest in its child, so that the damage
    crafted is the only problem (and not caught as a changed digest)."""
    for parent, child in (("f", "i1"), ("i1", "i2")):
        m = load(c.path(child, ".json"))
        m["parent"]["manifest-sha256"] = sha(c.path(parent, ".json"))
        save(c.path(child, ".json"), m)
        if child == upto:
            break


def edit(c, name, change, seal=True):
    m = load(c.path(name, ".json"))
    change(m)
    save(c.path(name, ".json"), m)
    if seal:
        reseal(c)


def truncate(path, delta):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if delta < 0:
            f.truncate(size + delta)
        else:
            f.seek(size)
            f.write(bytes(delta))


HOSTILE = {
    # manifests with wrong types or sizes (each digest re-recorded)
    "size-type": (lambda c: edit(c, "f", lambda m: m["image"].__setitem__(
        "virtual-size", "big")), "f", "'image.virtual-size' is a string"),
    "blocks": (lambda c: edit(c, "i1", lambda m: m["hash"].__setitem__(
        "blocks", m["hash"]["blocks"] + 1)), "i1", "'hash.blocks'"),
    "virtual-size": (lambda c: edit(c, "i1", lambda m: (
        m["image"].__setitem__("virtual-size", 2 * MiB),
        m["hash"].__setitem__("blocks", 32))), "i1", "its manifest says 32"),
    "incomplete": (lambda c: edit(c, "f", lambda m: m.__setitem__(
        "complete", False)), "f", "incomplete"),
    "other-disk": (lambda c: edit(c, "f", lambda m: m["disk"].__setitem__(
        "id", "00000000-0000-4000-8000-000000000000")), "f", "of disk"),
    "order": (lambda c: edit(c, "f", lambda m: m["checkpoint"].__setitem__(
        "order", 9)), "i1", "not newer"),
    "since": (lambda c: edit(c, "i1", lambda m: m.__setitem__(
        "since", "c0")), "i1", "since checkpoint 'c0'"),
    "no-full": (lambda c: edit(c, "f", lambda m: (
        m.__setitem__("kind", "incremental"), m.__setitem__("since", "c0"),
        m.__setitem__("parent", {"file": "nothere.qcow2",
                                 "manifest-sha256": "0" * 64}))),
        "f.qcow2", "nothere.qcow2"),
    # the digest a child recorded: a manifest changed behind its back
    "changed-manifest": (lambda c: edit(c, "f", lambda m: m.__setitem__(
        "tool", "someone else"), seal=False), "f", "changed or replaced"),
    # loops: a parent named below its child (digests cannot all agree)
    "loop": (lambda c: edit(c, "f", lambda m: (
        m.__setitem__("kind", "incremental"), m.__setitem__("since", "c3"),
        m.__setitem__("parent", {"file": "i2.qcow2",
                                 "manifest-sha256": sha(c.path("i2", ".json"))}))),
        "f.qcow2", "i2.qcow2"),
    "self-loop": (lambda c: edit(c, "i1", lambda m: m["parent"].__setitem__(
        "file", "i1.qcow2")), "i1", "names the backup itself"),
    # record files truncated or too long (by whole records, so that only
    # the trailer shows it)
    "hashes-short": (lambda c: truncate(c.path("f", ".tree"), -41),
                     "f.qcow2.tree", "tree record file"),
    "hashes-long": (lambda c: truncate(c.path("i1", ".tree"), 41),
                    "i1.qcow2.tree", "tree record file"),
    "hashes-empty": (lambda c: truncate(c.path("f", ".tree"),
                                        -os.path.getsize(c.path("f", ".tree"))),
                     "f.qcow2.tree", "shorter than a header"),
    # images: a backing link to another file, a truncated raw image
    "backing-link": (lambda c: qemu_img("rebase", "-u", "-b", "other.qcow2", "-F",
                                        "qcow2", c.path("i1")), "i1", "backing file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_parent_chain(tmp, case):
    """cbt verify rejects the parent's chain, so backup --incremental must
    not build on it: refused with the reason (exit 65), --auto takes a full
    backup instead.  Each case exits 0 on 5c6f132."""
    c = Chain(tmp)
    craft, where, words = HOSTILE[case]
    if case == "backing-link":
        shutil.copy(c.path("f"), os.path.join(c.bk, "other.qcow2"))
    craft(c)
    res = run("verify", c.path("i2"))
    assert res.rc == CORRUPT, "cbt verify accepts the crafted chain: %r" % res
    refused_then_auto_full(c, CORRUPT, [where, words, "damaged"])


# ---- writes outside the folder ----

def victims(tmp):
    """Files outside the backup folder that planted links point to."""
    out = {}
    for name in ("victim-json", "victim-hashes", "victim-part", "victim-out"):
        p = os.path.join(str(tmp), name)
        with open(p, "w") as f:
            f.write("keep " + name)
        out[name] = p
    return out


def assert_kept(v):
    for name, p in v.items():
        with open(p) as f:
            assert f.read() == "keep " + name, "%s was written through a link" % p


def test_planted_links_are_never_followed(tmp):
    """Symlinks planted at the names cbt used to write through (NAME.tmp)
    change nothing: the backup's files are new regular files, no file
    outside the folder is written."""
    c = Chain(tmp)
    v = victims(tmp)
    nxt = c.path("next")
    os.symlink(v["victim-json"], nxt + ".json.tmp")
    os.symlink(v["victim-hashes"], nxt + ".hashes.tmp")
    qemu_io("-f", "qcow2", "-c", "write -P 9 1M 64k", c.disk)
    run_ok("backup", "--incremental", c.disk, nxt)
    assert_kept(v)
    for suffix in ("", ".json", ".tree"):
        st = os.lstat(nxt + suffix)
        assert not os.path.islink(nxt + suffix) and st.st_mode & 0o170000 == 0o100000
    run_ok("verify", nxt)
    # nothing else appeared: no temporary, no work file
    assert sorted(f for f in c.files() if f.startswith("next")) == \
        ["next.qcow2", "next.qcow2.hashes.tmp", "next.qcow2.json",
         "next.qcow2.json.tmp", "next.qcow2.tree"], c.files()


@pytest.mark.parametrize("where", ["target", "part", "hashes", "json"])
def test_links_at_new_names_are_refused(tmp, where):
    """A link (also a dangling one) at a name the backup would create is
    refused before anything is written; what it points to is untouched."""
    c = Chain(tmp)
    v = victims(tmp)
    nxt = c.path("next")
    link = nxt + {"target": "", "part": ".part", "hashes": ".tree", "json": ".json"}[where]
    os.symlink(v["victim-part"], link)
    dangling = c.path("other") + {"target": "", "part": ".part", "hashes": ".tree",
                                  "json": ".json"}[where]
    os.symlink(os.path.join(str(tmp), "nowhere"), dangling)
    before = c.files()
    qemu_io("-f", "qcow2", "-c", "write -P 9 1M 64k", c.disk)
    for target in (nxt, c.path("other")):
        res = run("backup", "--incremental", c.disk, target)
        assert res.rc != 0 and "exists" in res.err, res
    assert c.files() == before
    assert not os.path.exists(os.path.join(str(tmp), "nowhere"))
    assert_kept(v)


def test_restore_work_file_is_exclusive(tmp):
    c = Chain(tmp)
    v = victims(tmp)
    out = os.path.join(c.tmp, "out.qcow2")
    os.symlink(v["victim-out"], out + ".part")
    res = run("restore", c.path("i2"), out)
    assert res.rc != 0 and "out.qcow2.part" in res.err, res
    assert "not a regular file" in res.err and "remove" not in res.err, res
    assert not os.path.exists(out)
    assert_kept(v)
    os.unlink(out + ".part")
    # a regular OUT.part is what a killed restore leaves: named as such
    with open(out + ".part", "wb") as f:
        f.write(b"partial")
    res = run("restore", c.path("i2"), out)
    assert res.rc != 0 and "interrupted cbt restore" in res.err, res
    assert "remove it" in res.err and not os.path.exists(out), res
    os.unlink(out + ".part")
    run_ok("restore", c.path("i2"), out)
    assert sorted(f for f in os.listdir(c.tmp) if f.startswith("out")) == ["out.qcow2"]
    cmp = qemu_img("compare", "-q", c.disk, out, check=False)
    assert cmp.rc == 0, cmp
