"""cbt repo verify: every point of a folder, each stored block hashed once,
naming each bad file and block (issue 13, section 1).

Oracles: `qemu-img map` says which clusters each image stores (so how many
bytes a verify that hashes each stored block once must read) and where a
guest block lives on the host (to flip a byte of it); `cbt verify` of each
point separately must agree with repo verify's verdict on that point."""
import json
import os

import pytest

from conftest import cbt, qemu_img
from repolib import Repo

BLOCK = 65536


@pytest.fixture
def repo(tmp):
    r = Repo(tmp)
    r.write("write -P 1 0 6M")
    r.backup("f.img", "--full")
    r.write("write -P 2 1M 1M", "write -z 3M 64k")
    r.backup("i1.img")
    r.write("write -P 3 2M 128k")
    r.backup("i2.img")
    r.write("write -P 4 5M 64k")
    r.backup("i3.img")
    return r


def stored(path):
    """qemu-img map: the guest ranges the image's own layer stores as data,
    with their host offsets."""
    out = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", path).out)
    return [(e["start"], e["length"], e["offset"]) for e in out
            if e["depth"] == 0 and e["data"] and not e["zero"]]


def flip(path, guest):
    for start, length, host in stored(path):
        if start <= guest < start + length:
            with open(path, "r+b") as f:
                f.seek(host + guest - start + 100)
                b = f.read(1)
                f.seek(host + guest - start + 100)
                f.write(bytes([b[0] ^ 0x40]))
            return
    raise AssertionError("%s stores no data at %d" % (path, guest))


def verify(r):
    res = cbt("repo", "verify", "--output=json", r.bk, check=False)
    assert res.rc in (0, 65), res
    out = json.loads(res.out)
    assert (res.rc == 65) == (not out["ok"])
    return out, {p["file"]: p for p in out["points"]}


def agrees_with_cbt_verify(r, by):
    for name, p in by.items():
        rc = cbt("verify", r.bk / name, check=False).rc
        assert rc == (0 if p["ok"] else 65), (name, p)


def test_sound_folder_reads_each_stored_block_once(repo):
    out, by = verify(repo)
    assert out["ok"] and out["bad-points"] == 0
    want = sum(l for n in ("f.img", "i1.img", "i2.img", "i3.img")
               for _, l, _ in stored(repo.bk / n))
    assert out["bytes-read"] == want
    n = 16 * 1024 * 1024 // BLOCK
    for p in by.values():
        assert p["blocks-hashed"] + p["blocks-shared"] == n
    assert by["f.img"]["blocks-shared"] == 0
    # i2 stores 2 blocks; everything else is its parent's, checked by
    # comparing digests.
    assert by["i2.img"]["blocks-hashed"] == 2
    res = cbt("repo", "verify", repo.bk)
    assert res.out.strip().splitlines()[-1].startswith("OK: ")
    agrees_with_cbt_verify(repo, by)


def test_bad_block_in_the_full_reaches_the_points_above(repo):
    flip(repo.bk / "f.img", 4 * 1024 * 1024)        # no incremental holds it
    flip(repo.bk / "f.img", 1 * 1024 * 1024)        # i1 overwrote it
    out, by = verify(repo)
    assert not out["ok"] and out["bad-points"] == 4
    f = by["f.img"]
    assert [(b["offset"], b["length"]) for b in f["problems"]] == \
        [(1024 * 1024, BLOCK), (4 * 1024 * 1024, BLOCK)]
    assert all(b["file"].endswith("bk/f.img") for b in f["problems"])
    for name in ("i1.img", "i2.img", "i3.img"):
        p = by[name]
        assert [(b["offset"], b["file"].split("/")[-1]) for b in p["problems"]] == \
            [(4 * 1024 * 1024, "f.img")], (name, p)
        assert "bad data of its parent" in p["problems"][0]["problem"]
    agrees_with_cbt_verify(repo, by)
    res = cbt("repo", "verify", repo.bk, check=False)
    assert res.rc == 65
    assert "i3.img: guest range at offset 4194304, length 65536 (data in " in res.err
    assert "f.img: guest range at offset 1048576, length 65536: does not match" in res.err


def test_bad_block_in_an_incremental(repo):
    flip(repo.bk / "i2.img", 2 * 1024 * 1024 + BLOCK)
    out, by = verify(repo)
    assert by["f.img"]["ok"] and by["i1.img"]["ok"]
    for name in ("i2.img", "i3.img"):
        b = by[name]["problems"]
        assert [(x["offset"], x["file"].split("/")[-1]) for x in b] == \
            [(2 * 1024 * 1024 + BLOCK, "i2.img")]
    agrees_with_cbt_verify(repo, by)


def test_damaged_hashes_and_missing_files(repo):
    with open(repo.bk / "i1.img.tree", "r+b") as f:
        f.seek(64 + 20)       # inside the first record's digest
        f.write(b"\xff")
    out, by = verify(repo)
    assert "SHA-256" in by["i1.img"]["problems"][0]["problem"]
    assert by["i1.img"]["problems"][0]["file"].endswith("i1.img.tree")
    assert "not checked: its parent i1.img" in by["i2.img"]["problems"][0]["problem"]
    assert by["f.img"]["ok"]
    agrees_with_cbt_verify(repo, by)
    os.unlink(repo.bk / "i2.img")
    out, by = verify(repo)
    assert "its image i2.img" in by["i2.img"]["problems"][0]["problem"]
    assert "broken at i2.img" in by["i3.img"]["problems"][0]["problem"]


def test_raw_chain(tmp):
    r = Repo(tmp, fmt="raw")
    r.write("write -P 1 0 6M")
    r.backup("f.img", "--full")
    r.write("write -P 2 1M 1M")
    r.backup("i1.img")
    out, by = verify(r)
    assert out["ok"]
    with open(r.bk / "i1.img", "r+b") as f:
        f.seek(1024 * 1024 + 5)
        f.write(b"\xee")
    out, by = verify(r)
    assert by["f.img"]["ok"] and not by["i1.img"]["ok"]
    assert by["i1.img"]["problems"][0]["offset"] == 1024 * 1024
    agrees_with_cbt_verify(r, by)


def test_list_shows_when_each_point_was_verified(repo):
    assert all(p["verified"] is None for p in repo.list()["points"])
    verify(repo)
    pts = repo.list()["points"]
    when = {p["file"]: p["verified"] for p in pts}
    assert all(when.values()) and len(set(when.values())) == 1
    assert "VERIFIED" in cbt("repo", "list", repo.bk).out
    # A bad point loses its record at the next verify; the others keep one.
    flip(repo.bk / "i2.img", 2 * 1024 * 1024)
    verify(repo)
    when = {p["file"]: p["verified"] for p in repo.list()["points"]}
    assert when["f.img"] and when["i1.img"]
    assert when["i2.img"] is None and when["i3.img"] is None


def test_a_rewritten_manifest_drops_its_record(repo):
    verify(repo)
    cbt("repo", "prune", "--keep-last", "3", "--force", repo.bk)   # f into i1
    when = {p["file"]: p["verified"] for p in repo.list()["points"]}
    # Every manifest from i1 up was rewritten: no record counts for them.
    assert when == {"i1.img": None, "i2.img": None, "i3.img": None}


def test_a_damaged_record_is_only_a_warning(repo):
    (repo.bk / "cbt-verified.json").write_text('{"format": "cbt-verified", "version": 1, '
                                              '"points": {"../x": {}}}')
    res = cbt("repo", "list", "--output=json", repo.bk)
    assert "ignoring" in res.err and "cbt-verified.json" in res.err
    assert all(p["verified"] is None for p in res.json()["points"])
    assert res.json()["leftovers"] == [] and res.json()["damaged"] == []


def test_raw_chain_shares_too(tmp):
    r = Repo(tmp, fmt="raw")
    r.write("write -P 1 0 6M")
    r.backup("f.img", "--full")
    r.write("write -P 2 1M 1M", "write -z 3M 64k")
    r.backup("i1.img")
    r.write("write -P 3 5M 64k")
    r.backup("i2.img")
    out, by = verify(r)
    assert out["ok"]
    n = 16 * 1024 * 1024 // BLOCK
    assert by["i1.img"]["blocks-shared"] == n - 17
    assert by["i2.img"]["blocks-shared"] == n - 1
    # A flipped byte of the full, in a block no incremental carries.
    with open(r.bk / "f.img", "r+b") as f:
        f.seek(4 * 1024 * 1024 + 7)
        f.write(b"\xee")
    out, by = verify(r)
    for name in ("f.img", "i1.img", "i2.img"):
        assert [(b["offset"], b["file"].split("/")[-1]) for b in by[name]["problems"]] \
            == [(4 * 1024 * 1024, "f.img")], (name, by[name])
    agrees_with_cbt_verify(r, by)


def test_raw_resized_disk(tmp):
    r = Repo(tmp, size=5 * 1024 * 1024 + 4096, fmt="raw")
    r.write("write -P 1 0 5M")
    r.backup("f.img", "--full")
    cbt("resize", r.disk, 8 * 1024 * 1024)
    r.write("write -P 2 6M 64k")
    r.backup("i1.img")
    out, by = verify(r)
    assert out["ok"], out
    agrees_with_cbt_verify(r, by)
