"""cbt repo prune: retention that keeps every remaining point restorable
(issue 13, section 2).

Every backup's oracle is the disk itself, saved with `qemu-img convert`
right after the backup.  After a prune every kept point must: pass cbt
verify (its original block hashes), restore to exactly its saved state
(qemu-img compare), read as that state through qemu-img itself (qcow2: the
backup chain is a qcow2 chain), pass qemu-img check; and the disk's next
incremental must find its parent and be right too.  Policies by day, week
and month use manifests whose creation times are rewritten (with the
parent digests above them, as cbt would have written them)."""
import json
import os
import subprocess

import pytest

from conftest import CBT, cbt, qemu_img
from repolib import MiB, Repo, set_created


def chain(tmp, n=5, fmt="qcow2"):
    """f.qcow2 (full) and i1..i{n-1} (incrementals) of a 16 MiB disk."""
    r = Repo(tmp, fmt=fmt)
    r.write("write -P 1 0 6M", "write -P 7 12M 1M")
    r.backup("f.img", "--full")
    for k in range(1, n):
        r.write("write -P %d %dM 1M" % (10 + k, k), "write -z %dM 64k" % (12 + k % 3),
                "discard %dM 128k" % (4 + k))
        r.backup("i%d.img" % k)
    return r


def prune(r, *args):
    return cbt("repo", "prune", "--output=json", *args, r.bk).json()


def actions(out):
    return {p["file"]: (p["action"], p["into"]) for p in out["points"]}


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_keep_last_merges_into_the_kept_points(tmp, fmt):
    r = chain(tmp, 5, fmt)
    before = r.files()
    ck3 = r.manifest("i3.img")["checkpoint"]
    root3 = r.manifest("i3.img")["hash"]["root"]
    dry = prune(r, "--keep-last", "2")
    assert dry["dry-run"] is True
    if fmt == "qcow2":
        # One step: the three retired points go into i3 at once.
        want = {"f.img": ("merge", "i3.img"), "i1.img": ("merge", "i3.img"),
                "i2.img": ("merge", "i3.img")}
    else:
        # Raw chains merge one point a step.
        want = {"f.img": ("merge", "i1.img"), "i1.img": ("merge", "i2.img"),
                "i2.img": ("merge", "i3.img")}
    want.update({"i3.img": ("keep", None), "i4.img": ("keep", None)})
    assert actions(dry) == want
    assert r.files() == before, "a dry run changed the folder"
    out = prune(r, "--keep-last", "2", "--force")
    assert out["merged"] == 3 and out["bytes-freed"] > 0
    assert out["steps-done"] == (1 if fmt == "qcow2" else 3)
    assert sorted(os.listdir(r.bk)) == ["i3.img", "i3.img.json", "i3.img.tree",
                                        "i4.img", "i4.img.json", "i4.img.tree"]
    # i4's records are the original ones, byte for byte; i3's are its own
    # with the retired points' folded in (its view and root unchanged:
    # assert_point checks them against tests/treemodel.py).
    assert r.files()["i4.img.tree"] == before["i4.img.tree"]
    assert r.files()["i3.img.tree"] != before["i3.img.tree"]
    assert r.manifest("i3.img")["hash"]["root"] == root3
    m = r.manifest("i3.img")
    assert m["kind"] == "full" and m["parent"] is None and m["since"] is None
    assert m["checkpoint"] == ck3
    for name in ("i3.img", "i4.img"):
        r.assert_point(name)
    listing = r.list()
    assert listing["broken"] == 0 and listing["leftovers"] == []
    assert listing["chains"][0]["full"] == "i3.img"
    # The disk's checkpoints still find their backups: the next
    # incremental has i4 as parent and is right.
    r.write("write -P 99 8M 64k")
    r.backup("i5.img")
    assert r.manifest("i5.img")["parent"]["file"] == "i4.img"
    r.assert_point("i5.img")


def test_merge_in_the_middle_makes_a_differential(tmp):
    r = chain(tmp, 5)
    set_created(r.bk, {"f.img": "2026-01-10T10:00:00Z", "i1.img": "2026-02-01T10:00:00Z",
                       "i2.img": "2026-02-02T10:00:00Z", "i3.img": "2026-02-03T10:00:00Z",
                       "i4.img": "2026-02-04T10:00:00Z"})
    for n in r.states:
        cbt("verify", r.bk / n)  # the rewritten folder is sound
    out = prune(r, "--keep-monthly", "2", "--force")
    assert actions(out) == {"f.img": ("keep", None), "i1.img": ("merge", "i4.img"),
                            "i2.img": ("merge", "i4.img"), "i3.img": ("merge", "i4.img"),
                            "i4.img": ("keep", None)}
    assert out["steps-done"] == 1
    m = r.manifest("i4.img")
    f = r.manifest("f.img")
    assert m["kind"] == "differential"
    assert m["since"] == f["checkpoint"]["name"] and m["parent"]["file"] == "f.img"
    assert m["checkpoint"]["name"] != f["checkpoint"]["name"]
    # qemu-img sees the new chain: i4 directly on f.
    info = json.loads(qemu_img("info", "--output=json", r.bk / "i4.img").out)
    assert info["backing-filename"] == "f.img"
    r.assert_point("f.img")
    r.assert_point("i4.img")


def test_daily_and_weekly_buckets(tmp):
    r = chain(tmp, 6)
    set_created(r.bk, {"f.img": "2026-03-02T08:00:00Z",    # Mon, week 10
                       "i1.img": "2026-03-02T20:00:00Z",   # same day
                       "i2.img": "2026-03-04T08:00:00Z",   # Wed, week 10
                       "i3.img": "2026-03-10T08:00:00Z",   # Tue, week 11
                       "i4.img": "2026-03-11T08:00:00Z",   # Wed, week 11
                       "i5.img": "2026-03-11T09:00:00Z"})  # same day
    out = prune(r, "--keep-daily", "2")
    keep = {p["file"] for p in out["points"] if p["action"] == "keep"}
    assert keep == {"i5.img", "i3.img"}       # 03-11 and 03-10
    out = prune(r, "--keep-weekly", "2")
    keep = {p["file"] for p in out["points"] if p["action"] == "keep"}
    assert keep == {"i5.img", "i2.img"}       # newest of weeks 11 and 10
    why = {p["file"]: p["why"] for p in out["points"]}
    assert "weekly 2026-W10" in why["i2.img"]
    out = prune(r, "--keep-daily", "1", "--keep-weekly", "2", "--force")
    assert [p["file"] for p in r.list()["points"]] == ["i2.img", "i5.img"]
    r.assert_point("i2.img")
    r.assert_point("i5.img")


def test_differentials_on_one_full(tmp):
    """A full with two differentials: the older one goes (no child), then
    the full is merged into the newer one, which becomes the full."""
    r = Repo(tmp)
    r.write("write -P 1 0 4M")
    r.backup("f.img", "--full")
    since = r.manifest("f.img")["checkpoint"]["name"]
    r.write("write -P 2 1M 1M")
    r.backup("d1.img", "--since", since)
    r.write("write -P 3 3M 1M")
    r.backup("d2.img", "--since", since)
    assert r.manifest("d2.img")["parent"]["file"] == "f.img"
    out = prune(r, "--keep-last", "1")
    assert actions(out) == {"f.img": ("merge", "d2.img"), "d1.img": ("remove", None),
                            "d2.img": ("keep", None)}
    # Keeping both differentials keeps the full they need.
    out = prune(r, "--keep-last", "2")
    assert out["points"][0]["action"] == "keep" and "needed by 2" in out["points"][0]["why"]
    prune(r, "--keep-last", "1", "--force")
    assert [p["file"] for p in r.list()["points"]] == ["d2.img"]
    assert r.manifest("d2.img")["kind"] == "full"
    r.assert_point("d2.img")
    r.write("write -P 4 5M 64k")
    r.backup("i.img")
    r.assert_point("i.img")


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_resized_disk(tmp, fmt):
    """Points of different sizes merge into one of the child's size, with
    the child's view (zeroes where it read past its parent's end)."""
    r = Repo(tmp, size=8 * MiB, fmt=fmt)
    r.write("write -P 1 0 8M")
    r.backup("f.img", "--full")
    cbt("resize", "--shrink", r.disk, 5 * MiB + 4096)
    r.write("write -P 2 1M 64k")
    r.backup("i1.img")
    cbt("resize", r.disk, 12 * MiB)
    r.write("write -P 3 11M 64k")
    r.backup("i2.img")
    prune(r, "--keep-last", "2", "--force")
    assert [p["file"] for p in r.list()["points"]] == ["i1.img", "i2.img"]
    r.assert_point("i1.img")
    r.assert_point("i2.img")
    prune(r, "--keep-last", "1", "--force")
    r.assert_point("i2.img")


def test_prune_refuses_an_image_in_use(tmp):
    r = chain(tmp, 3)
    before = r.files()
    holder = subprocess.Popen(["qemu-io", "-r", "-f", "qcow2", str(r.bk / "f.img")],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        # The holder has the image open once it answers a command.
        holder.stdin.write(b"read 0 512\n")
        holder.stdin.flush()
        res = cbt("repo", "prune", "--keep-last", "1", "--force", r.bk, check=False)
    finally:
        holder.stdin.close()
        holder.wait()
    assert res.rc == 75, res
    assert r.files() == before
    prune(r, "--keep-last", "1", "--force")
    r.assert_point("i2.img")


def test_prune_usage(tmp):
    (tmp / "bk").mkdir()
    assert cbt("repo", "prune", tmp / "bk", check=False).rc == 64
    assert cbt("repo", "prune", "--keep-last", "x", tmp / "bk", check=False).rc == 64
    assert cbt("repo", "prune", "--keep-last", "1", "--force", "--dry-run", tmp / "bk",
               check=False).rc == 64
    assert cbt("repo", "list", "--keep-last", "1", tmp / "bk", check=False).rc == 64
    out = cbt("repo", "prune", "--keep-last", "1", "--output=json", tmp / "bk").json()
    assert out["points"] == []


def test_folder_lock_and_replay(tmp):
    """A running prune holds the folder's lock (flock, here taken by the
    test): another prune or clean is refused (75); a reader that finds a
    journal while the lock is held is refused too, rather than replaying
    a step that is being carried out.  Once the lock is free, the first
    reader replays the journal."""
    import fcntl
    r = chain(tmp, 3)
    journal = {"format": "cbt-prune-journal", "version": 1, "merge": None,
               "rename": [], "remove": ["i2.img.json", "i2.img", "i2.img.hashes"]}
    (r.bk / "cbt-prune.journal").write_text(json.dumps(journal))
    fd = os.open(r.bk, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for args in (["repo", "prune", "--keep-last", "1", "--force", r.bk],
                     ["repo", "clean", "--force", r.bk],
                     ["verify", r.bk / "i1.img"],
                     ["repo", "list", r.bk]):
            res = cbt(*args, check=False)
            assert res.rc == 75 and "another cbt" in res.err, (args, res)
        assert os.path.exists(r.bk / "i2.img")
    finally:
        os.close(fd)
    res = cbt("verify", r.bk / "i1.img")
    assert "finished the prune step" in res.err
    assert not os.path.exists(r.bk / "i2.img") and not os.path.exists(r.bk / "cbt-prune.journal")
    assert [p["file"] for p in r.list()["points"]] == ["f.img", "i1.img"]


def test_a_hostile_journal_is_refused(tmp):
    r = chain(tmp, 2)
    (r.bk / "cbt-prune.journal").write_text(json.dumps(
        {"format": "cbt-prune-journal", "version": 1, "merge": None,
         "rename": [], "remove": ["../disk.qcow2"]}))
    res = cbt("repo", "list", r.bk, check=False)
    assert res.rc != 0 and "plain file name" in res.err, res
    assert os.path.exists(r.disk)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_resized_disk_at_once(tmp, fmt):
    """A shrink and a grow between the points merged in one step (qcow2:
    the child's chain is read through the retired points of other sizes)."""
    r = Repo(tmp, size=8 * MiB, fmt=fmt)
    r.write("write -P 1 0 8M")
    r.backup("f.img", "--full")
    cbt("resize", "--shrink", r.disk, 5 * MiB + 4096)
    r.write("write -P 2 1M 64k")
    r.backup("i1.img")
    cbt("resize", r.disk, 12 * MiB)
    r.write("write -P 3 11M 64k")
    r.backup("i2.img")
    r.write("write -P 4 2M 64k")
    r.backup("i3.img")
    out = prune(r, "--keep-last", "1", "--force")
    assert out["merged"] == 3
    assert [p["file"] for p in r.list()["points"]] == ["i3.img"]
    r.assert_point("i3.img")


def test_compressed_and_rescanned_points(tmp):
    """Points written by --compress and --rescan merge too: the merged
    manifest drops what no longer holds (rescan on what becomes a full,
    the file's size) and takes the retired image's compression."""
    r = Repo(tmp)
    r.write("write -P 1 0 6M")
    r.backup("f.img", "--full", "--compress")
    r.write("write -P 2 1M 1M")
    r.backup("i1.img", "--incremental", "--compress=zlib")
    r.write("write -P 3 3M 1M")
    r.backup("i2.img", "--incremental", "--rescan")
    assert r.manifest("i2.img").get("rescan") is True
    assert r.manifest("f.img")["image"]["compression"] == "zstd"
    prune(r, "--keep-last", "2", "--force")                # f into i1
    m = r.manifest("i1.img")
    assert m["kind"] == "full" and m["image"]["compression"] == "zstd"
    assert "file" not in m["bytes"]
    r.assert_point("i1.img")
    r.assert_point("i2.img")
    prune(r, "--keep-last", "1", "--force")                # i1 into i2
    m = r.manifest("i2.img")
    assert m["kind"] == "full" and "rescan" not in m
    assert m["image"]["compression"] == "zstd"
    r.assert_point("i2.img")
    r.write("write -P 4 5M 64k")
    r.backup("i3.img", "--incremental", "--compress")
    r.assert_point("i3.img")


def test_compressed_points_stay_compressed(tmp):
    """Merging into a compressed backup writes the child's clusters
    compressed too: the kept point's file holds only compressed clusters
    (qemu-img check counts them) and is no larger than the two files it
    replaced."""
    r = Repo(tmp)
    r.write("write -P 1 0 6M", "write -P 7 12M 1M")
    r.backup("f.img", "--full", "--compress")
    r.write("write -P 11 1M 1M", "write -P 12 9M 100k")
    r.backup("i1.img", "--incremental", "--compress")
    r.write("write -P 13 3M 1M")
    r.backup("i2.img")
    before = {n: os.path.getsize(r.bk / n) for n in ("f.img", "i1.img")}
    prune(r, "--keep-last", "2", "--force")
    assert sorted(p["file"] for p in r.list()["points"]) == \
        ["i1.img", "i2.img"]
    r.assert_point("i1.img")
    r.assert_point("i2.img")
    res = json.loads(qemu_img("check", "--output=json", r.bk / "i1.img").out)
    stats = res["allocated-clusters"], res["compressed-clusters"]
    assert stats[0] > 0 and stats[0] == stats[1], res
    assert os.path.getsize(r.bk / "i1.img") <= sum(before.values()), before
