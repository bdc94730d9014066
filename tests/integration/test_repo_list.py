"""cbt repo list: every chain and point of a backup folder, what is broken
and why, and the leftovers of interrupted cbt runs (issue 13, section 1).

The folder is made by real cbt backups of a disk qemu-io writes; the
manifests are read back independently (json) to check every field the
listing shows, and damage is made by hand the way it happens (a file
deleted, a manifest edited, a hashes file truncated, a backup killed)."""
import json
import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import faultlib as F  # noqa: E402
from conftest import cbt  # noqa: E402
from repolib import MiB, Repo  # noqa: E402


@pytest.fixture
def repo(tmp):
    r = Repo(tmp)
    r.write("write -P 1 0 4M")
    r.backup("f.qcow2", "--full")
    r.write("write -P 2 1M 1M")
    r.backup("i1.qcow2")
    r.write("write -P 3 2M 64k", "write -z 0 64k")
    r.backup("i2.qcow2")
    return r


def test_list_json_describes_every_point(repo):
    out = repo.list()
    assert out["broken"] == 0 and out["leftovers"] == [] and out["damaged"] == []
    names = [p["file"] for p in out["points"]]
    assert names == ["f.qcow2", "i1.qcow2", "i2.qcow2"]
    assert out["chains"] == [{"full": "f.qcow2", "disk-id": out["points"][0]["disk"]["id"],
                              "points": names}]
    for p in out["points"]:
        m = repo.manifest(p["file"])
        assert p["created"] == m["created"]
        assert p["kind"] == m["kind"]
        assert p["checkpoint"] == m["checkpoint"]
        assert p["since"] == m["since"]
        assert p["parent"] == (m["parent"]["file"] if m["parent"] else None)
        assert p["disk"] == {"id": m["disk"]["id"], "path": m["disk"]["path"]}
        assert p["virtual-size"] == m["image"]["virtual-size"] == 16 * MiB
        assert p["data-bytes"] == m["bytes"]["copied"]
        assert p["chain"] == "f.qcow2"
        assert p["ok"] is True and p["problem"] is None
        # Host bytes of the image, manifest and hashes file.
        want = sum(os.stat(repo.bk / n).st_blocks * 512
                   for n in (p["file"], p["file"] + ".json", p["file"] + ".tree"))
        assert p["file-bytes"] == want
    assert [p["children"] for p in out["points"]] == [1, 1, 0]
    assert out["points"][1]["data-bytes"] == 1 * MiB


def test_list_human(repo):
    res = cbt("repo", "list", repo.bk)
    assert "3 points in 1 chain, 0 broken" in res.out
    for n in ("f.qcow2", "i1.qcow2", "i2.qcow2", "full", "incremental"):
        assert n in res.out
    assert "BROKEN" not in res.out


def test_list_names_what_is_broken_and_why(repo):
    repo.write("write -P 4 3M 64k")
    repo.backup("i3.qcow2")
    # i1's manifest edited (still valid JSON): i2 no longer trusts it.
    m = repo.manifest("i1.qcow2")
    m["tool"] = "edited"
    (repo.bk / "i1.qcow2.json").write_text(json.dumps(m, indent=2) + "\n")
    out = repo.list()
    by = {p["file"]: p for p in out["points"]}
    assert by["f.qcow2"]["ok"] and by["i1.qcow2"]["ok"]
    assert "not the one it recorded" in by["i2.qcow2"]["problem"]
    assert "broken at i2.qcow2" in by["i3.qcow2"]["problem"]
    assert out["broken"] == 2
    res = cbt("repo", "list", repo.bk)
    assert res.rc == 0 and "Broken points" in res.out and "i2.qcow2: its parent" in res.out


def test_list_missing_parent_and_truncated_hashes(repo):
    os.unlink(repo.bk / "f.qcow2")
    os.unlink(repo.bk / "f.qcow2.json")
    with open(repo.bk / "i2.qcow2.tree", "r+b") as f:
        f.truncate(100)
    out = repo.list()
    by = {p["file"]: p for p in out["points"]}
    assert set(by) == {"i1.qcow2", "i2.qcow2"}
    assert "its parent f.qcow2 is missing" in by["i1.qcow2"]["problem"]
    assert by["i1.qcow2"]["chain"] is None
    assert "block hashes" in by["i2.qcow2"]["problem"]
    # f.qcow2.tree is left alone: hashes without their backup.
    left = {l["file"]: l for l in out["leftovers"]}
    assert left["f.qcow2.tree"]["kind"] == "orphan-hashes"


def test_list_leftovers_and_nothing_else(repo):
    bk = repo.bk
    (bk / "x.qcow2.part").write_bytes(b"QFI\xfb")
    (bk / "y.qcow2").write_bytes(b"QFI\xfb")
    (bk / "y.qcow2.hashes").write_bytes(b"\0" * 64)
    (bk / "z.qcow2.hashes").write_bytes(b"\0" * 32)
    (bk / "v.qcow2.tree").write_bytes(b"\0" * 112)
    (bk / "u.qcow2").write_bytes(b"QFI\xfb")
    (bk / "u.qcow2.tree").write_bytes(b"\0" * 112)
    (bk / "i2.qcow2.tree.prune-new").write_bytes(b"\0" * 112)
    (bk / "s.qcow2.scratch").write_bytes(b"")
    (bk / "i2.qcow2.json.tmp-ab12cd").write_bytes(b"{")
    (bk / "i1.qcow2.json.prune-new").write_bytes(b"{")
    # Not cbt's: never mentioned.
    (bk / "notes.txt").write_text("mine")
    (bk / "other.json").write_text("{}")
    (bk / "photo.qcow2.bak").write_bytes(b"x")
    # cbt's manifest, damaged: reported, never removable.
    (bk / "d.qcow2").write_bytes(b"QFI\xfb")
    (bk / "d.qcow2.json").write_text('{"format": "cbt-backup", ')
    out = repo.list()
    left = {l["file"]: l["kind"] for l in out["leftovers"]}
    assert left == {
        "x.qcow2.part": "work-file",
        "y.qcow2": "no-manifest",
        "y.qcow2.hashes": "no-manifest",
        "z.qcow2.hashes": "orphan-hashes",
        "v.qcow2.tree": "orphan-hashes",
        "u.qcow2": "no-manifest",
        "u.qcow2.tree": "no-manifest",
        "i2.qcow2.tree.prune-new": "prune-new",
        "s.qcow2.scratch": "scratch",
        "i2.qcow2.json.tmp-ab12cd": "temporary",
        "i1.qcow2.json.prune-new": "prune-new",
    }
    assert [d["file"] for d in out["damaged"]] == ["d.qcow2.json"]
    assert "not a valid manifest" in out["damaged"][0]["why"]
    text = json.dumps(out)
    for foreign in ("notes.txt", "other.json", "photo.qcow2.bak"):
        assert foreign not in text
    assert [p["file"] for p in out["points"]] == ["f.qcow2", "i1.qcow2", "i2.qcow2"]
    assert out["broken"] == 0


def test_list_a_killed_backup(repo):
    """A backup SIGKILLed while it writes its work file leaves files list
    names as leftovers (the kill lands at the 3rd write to k.qcow2.part:
    libfault sends it)."""
    repo.write("write -P 5 0 16M")
    sent, rc, err = F.run_signalled(
        ["backup", "--incremental", repo.disk, repo.bk / "k.qcow2"],
        "k.qcow2.part", 3, signal.SIGKILL, op="write")
    assert sent and rc == -signal.SIGKILL, (sent, rc, err)
    made = {n for n in os.listdir(repo.bk) if n.startswith("k.qcow2")}
    assert made and "k.qcow2.json" not in made
    out = repo.list()
    assert made == {l["file"] for l in out["leftovers"]}, (made, out["leftovers"])
    assert [p["file"] for p in out["points"]] == ["f.qcow2", "i1.qcow2", "i2.qcow2"]


def test_list_usage(tmp):
    assert cbt("repo", check=False).rc == 64
    assert cbt("repo", "frobnicate", tmp, check=False).rc == 64
    assert cbt("repo", "list", check=False).rc == 64
    assert cbt("repo", "list", tmp / "nope", check=False).rc == 1
    assert "prune" in cbt("repo", "--help").out
