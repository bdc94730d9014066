"""Helpers of the cbt repo tests: a disk written by qemu-io, a folder of
backups made by cbt, and the disk's contents saved at each backup (the
oracle every restored or merged point is compared with, by qemu-img)."""
import hashlib
import json
import os

from conftest import cbt, qemu_img, run
import treemodel as T

MiB = 1024 * 1024
KiB = 1024


def qio(path, *cmds, fmt="qcow2"):
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(args + [str(path)])


class Repo:
    """A disk (qcow2) and its backup folder bk/; `states[name]` is the
    disk's guest view (raw) saved right after backup `name`."""

    def __init__(self, tmp, size=16 * MiB, fmt="qcow2"):
        self.tmp = tmp
        self.disk = tmp / "disk.qcow2"
        self.bk = tmp / "bk"
        self.bk.mkdir()
        self.fmt = fmt
        self.states = {}
        qemu_img("create", "-f", "qcow2", self.disk, size)

    def write(self, *cmds):
        qio(self.disk, *cmds)

    def backup(self, name, mode="--incremental", *extra):
        target = self.bk / name
        args = ["backup", mode, *extra]
        if self.fmt == "raw":
            args += ["-O", "raw"]
        cbt(*args, self.disk, target)
        state = self.tmp / ("state-" + name + ".raw")
        qemu_img("convert", "-U", "-O", "raw", self.disk, state)
        self.states[name] = state
        return target

    def manifest(self, name):
        with open(self.bk / (name + ".json")) as f:
            return json.load(f)

    def assert_point(self, name, leaks_ok=False):
        """Point `name` verifies, restores to the saved state, and (qcow2)
        its chain reads as that state through qemu-img itself and passes
        qemu-img check (leaked clusters allowed with leaks_ok: a write
        killed between allocating a cluster and linking it leaks it, as in
        QEMU).  A sha256-tree-v2 point's chain of record files defines, node
        for node, the tree tests/treemodel.py computes from the saved
        state, and its root is the manifest's (after a prune too)."""
        cbt("verify", self.bk / name)
        m = self.manifest(name)
        if m["hash"]["algorithm"] == "sha256-tree-v2":
            with open(self.states[name], "rb") as f:
                T.check_backup(str(self.bk / name), f.read(), m["hash"]["root"])
        out = self.tmp / ("restored-" + name + ".qcow2")
        if out.exists():
            out.unlink()
        cbt("restore", self.bk / name, out)
        qemu_img("compare", "-f", "qcow2", "-F", "raw", out, self.states[name])
        out.unlink()
        if self.fmt == "qcow2":
            qemu_img("compare", "-f", "qcow2", "-F", "raw", self.bk / name,
                     self.states[name])
            res = qemu_img("check", "--output=json", self.bk / name, check=False)
            assert res.rc == 0 or (leaks_ok and res.rc == 3), res
            assert json.loads(res.out).get("corruptions", 0) == 0

    def list(self):
        return cbt("repo", "list", "--output=json", self.bk).json()

    def files(self):
        """Every file of the folder with the SHA-256 of its bytes."""
        out = {}
        for n in sorted(os.listdir(self.bk)):
            with open(self.bk / n, "rb") as f:
                out[n] = hashlib.sha256(f.read()).hexdigest()
        return out


def set_created(bk, times):
    """Rewrite the `created` time of the manifests named in `times` (image
    file -> ISO time) and the parent digests above them, as if the backups
    had been made then: parents first (by checkpoint order)."""
    mans = {}
    for n in os.listdir(bk):
        if n.endswith(".json"):
            with open(os.path.join(bk, n)) as f:
                m = json.load(f)
            mans[m["image"]["file"]] = m
    order = sorted(mans, key=lambda k: mans[k]["checkpoint"]["order"])
    digest = {}
    for k in order:
        m = mans[k]
        if k in times:
            m["created"] = times[k]
        if m["parent"]:
            m["parent"]["manifest-sha256"] = digest[m["parent"]["file"]]
        text = (json.dumps(m, indent=2) + "\n").encode()
        digest[k] = hashlib.sha256(text).hexdigest()
        with open(os.path.join(bk, k + ".json"), "wb") as f:
            f.write(text)
