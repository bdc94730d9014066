"""`cbt info` and `cbt map` print what qemu-img prints (--output=json).

Run on the same image files as qemu-img, over a varied set: chains with data
in different layers, plain and allocated zero clusters, compressed clusters,
extended L2 with partially allocated subclusters, raw sparse files, backing
files shorter than the overlay, external data files, v2 images, preallocated
metadata, dirty and corrupt flags, internal snapshots.

info: virtual-size, cluster-size, format, backing-filename,
      backing-filename-format, full-backing-filename, dirty-flag and the
      whole format-specific object; also per layer with --backing-chain.
map:  the entry lists are equal on start, length, depth, present, zero, data,
      and on offset wherever both report one (same file, same host offsets).
"""
import json
import os

import pytest

import interop_lib as L
from interop_lib import KiB, MiB, qemu_img, qemu_io

INFO_KEYS = ("virtual-size", "cluster-size", "format", "backing-filename",
             "backing-filename-format", "full-backing-filename", "dirty-flag",
             "format-specific")


def create(cwd, name, size, opts="", backing=None, bfmt="qcow2"):
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", backing, "-F", bfmt]
    qemu_img(*(args + [name, size]), cwd=cwd)
    return os.path.join(cwd, name)


def qio(path, *cmds, cwd=None):
    qemu_io("-f", "qcow2", *L.io_args(cmds), path, cwd=cwd)


# ---------------------------------------------------------------------------
# Builders return (name to pass, format, cwd)


def i_chain3(d):
    imgs = os.path.join(d, "imgs")
    os.makedirs(os.path.join(imgs, "lower"))
    create(imgs, "lower/base.qcow2", "4M")
    qio(os.path.join(imgs, "lower", "base.qcow2"),
        "write -P 1 0 1M", "write -z 1M 128k", "write -P 2 3M 1M")
    create(imgs, "lower/mid.qcow2", "4M", "cluster_size=4096", backing="base.qcow2")
    qio(os.path.join(imgs, "lower", "mid.qcow2"),
        "write -P 3 256k 8k", "write -z -u 512k 64k", "write -P 4 2M 100k",
        "discard 3M 64k")
    create(imgs, "top.qcow2", "4M", "cluster_size=65536", backing="lower/mid.qcow2")
    qio(os.path.join(imgs, "top.qcow2"),
        "write -P 5 0 64k", "write -P 6 1M 64k", "write -z 2M 64k", "write -P 7 3584k 512k")
    return os.path.join("imgs", "top.qcow2"), "qcow2", d


def i_zeros(d):
    img = create(d, "img.qcow2", "2M")
    qio(img, "write -z -u 0 128k",            # plain zero clusters
        "write -P 1 256k 256k", "write -z 256k 128k",   # allocated zero clusters
        "write -P 2 768k 64k", "write -z 780k 1000",    # partial: explicit zeroes
        "write -P 3 1M 64k", "write -z -u 1M 64k")
    return "img.qcow2", "qcow2", d


def i_compressed(ctype):
    def build(d):
        raw = os.path.join(d, "src.raw")
        L.write_compressible(raw, 1 * MiB, seed=5)
        with open(raw, "r+b") as f:   # a hole and an all-zero cluster
            f.seek(256 * KiB)
            f.write(bytes(128 * KiB))
        opts = "cluster_size=65536" + (",compression_type=%s" % ctype if ctype else "")
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, raw,
                 os.path.join(d, "img.qcow2"))
        qemu_img("resize", "-q", "-f", "qcow2", os.path.join(d, "img.qcow2"), "2M")
        qio(os.path.join(d, "img.qcow2"), "write -P 9 512k 4k", "write -P 8 1536k 64k")
        return "img.qcow2", "qcow2", d
    return build


def i_l2ext(backing):
    def build(d):
        if backing:
            create(d, "base.qcow2", "2M")
            qio(os.path.join(d, "base.qcow2"), "write -P 1 0 1M", "write -z 1M 512k")
        img = create(d, "img.qcow2", "2M", "extended_l2=on,cluster_size=65536",
                     backing="base.qcow2" if backing else None)
        qio(img, "write -P 2 0 2k", "write -P 3 6k 4k", "write -z 64k 8k",
            "write -P 4 130k 1k", "write -z -u 200k 2k", "write -P 5 1M 2k",
            "discard 1M 64k", "write -P 6 1100k 40k", "write -z 1536k 64k",
            "write -P 7 1664k 2k")
        return "img.qcow2", "qcow2", d
    return build


def i_raw_sparse(d):
    path = os.path.join(d, "disk.raw")
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(64 * KiB)
        f.write(b"\x11" * 64 * KiB)
        f.seek(1 * MiB + 4096)
        f.write(b"\x22" * 8192)
        f.seek(3 * MiB)
        f.write(bytes(64 * KiB))   # written zeroes: data, not a hole
    return "disk.raw", "raw", d


def i_raw_backing(d):
    path = os.path.join(d, "base.raw")
    with open(path, "wb") as f:
        f.truncate(2 * MiB)
        f.seek(0)
        f.write(b"\x33" * 256 * KiB)
    img = create(d, "img.qcow2", "3M", backing="base.raw", bfmt="raw")
    qio(img, "write -P 1 128k 64k", "write -P 2 2M 64k")
    return "img.qcow2", "qcow2", d


def i_short_backing(d):
    create(d, "base.qcow2", "1M")
    qio(os.path.join(d, "base.qcow2"), "write -P 1 0 1M")
    img = create(d, "img.qcow2", "4M", backing="base.qcow2")
    qio(img, "write -P 2 512k 64k", "write -P 3 2M 64k", "write -z 3M 64k")
    return "img.qcow2", "qcow2", d


def i_data_file(raw):
    def build(d):
        opts = "data_file=img.data" + (",data_file_raw=on" if raw else "")
        img = create(d, "img.qcow2", "2M", opts)
        qio(img, "write -P 1 0 64k", "write -P 2 1M 128k", "write -z 1536k 64k", cwd=d)
        return "img.qcow2", "qcow2", d
    return build


def i_compat010(d):
    create(d, "base.qcow2", "2M", "compat=0.10")
    qio(os.path.join(d, "base.qcow2"), "write -P 1 0 2M")
    img = create(d, "img.qcow2", "2M", "compat=0.10,cluster_size=4096", backing="base.qcow2")
    qio(img, "write -P 2 4k 4k", "write -z 64k 64k")
    return "img.qcow2", "qcow2", d


def i_prealloc_metadata(d):
    img = create(d, "img.qcow2", "2M", "preallocation=metadata")
    qio(img, "write -P 1 64k 64k")
    return "img.qcow2", "qcow2", d


def i_dirty(d):
    img = create(d, "img.qcow2", "1M", "lazy_refcounts=on")
    qio(img, "write -P 1 0 64k")
    q = L.Qcow2(img)
    q.set_header("incompatible_features", q.incompatible_features | 1)
    return "img.qcow2", "qcow2", d


def i_corrupt_bit(d):
    img = create(d, "img.qcow2", "1M")
    qio(img, "write -P 1 0 64k")
    q = L.Qcow2(img)
    q.set_header("incompatible_features", q.incompatible_features | 2)
    return "img.qcow2", "qcow2", d


def i_snapshots(d):
    img = create(d, "img.qcow2", "1M", "cluster_size=4096")
    qio(img, "write -P 1 0 512k")
    qemu_img("snapshot", "-c", "first", img)
    qio(img, "write -P 2 0 64k")
    qemu_img("snapshot", "-c", "second", img)
    qio(img, "write -z 256k 64k")
    return "img.qcow2", "qcow2", d


def i_cluster(cluster, size, opts=""):
    def build(d):
        img = create(d, "img.qcow2", size, "cluster_size=%d%s" % (cluster, opts))
        qio(img, *L.random_workload(cluster, size, cluster, 40))
        return "img.qcow2", "qcow2", d
    return build


IMAGES = {
    "chain3": i_chain3,
    "zeros": i_zeros,
    "compressed-zlib": i_compressed(None),
    "compressed-zstd": i_compressed("zstd"),
    "l2ext": i_l2ext(False),
    "l2ext-backing": i_l2ext(True),
    "raw-sparse": i_raw_sparse,
    "raw-backing": i_raw_backing,
    "short-backing": i_short_backing,
    "data-file": i_data_file(False),
    "data-file-raw": i_data_file(True),
    "compat010": i_compat010,
    "prealloc-metadata": i_prealloc_metadata,
    "dirty": i_dirty,
    "corrupt-bit": i_corrupt_bit,
    "snapshots": i_snapshots,
    "cs512": i_cluster(512, 1 * MiB),
    "cs2M-rc1": i_cluster(2 * MiB, 6 * MiB, ",refcount_bits=1"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = {}
    for name, build in IMAGES.items():
        d = str(tmp_path_factory.mktemp(name))
        out[name] = build(d)
    return out


def pick(info):
    return {k: info.get(k) for k in INFO_KEYS}


def info_diff(got, want):
    return ["%s: cbt %s, qemu %s" % (k, json.dumps(got.get(k)), json.dumps(want.get(k)))
            for k in INFO_KEYS if got.get(k) != want.get(k)]


@pytest.mark.parametrize("name", list(IMAGES))
def test_info(images, name):
    img, fmt, cwd = images[name]
    want = L.qemu_json("info", "--output=json", "-f", fmt, img, cwd=cwd)
    got = L.cbt_json("info", "--output=json", "-f", fmt, img, cwd=cwd)
    diff = info_diff(got, want)
    assert not diff, "cbt info differs from qemu-img info:\n  " + "\n  ".join(diff)
    # sanity of the oracle side: the flags this image was built for
    spec = want.get("format-specific", {}).get("data", {})
    if name == "dirty":
        assert want["dirty-flag"] is True
    if name == "corrupt-bit":
        assert spec["corrupt"] is True


@pytest.mark.parametrize("name", list(IMAGES))
def test_info_backing_chain(images, name):
    img, fmt, cwd = images[name]
    want = L.qemu_json("info", "--output=json", "--backing-chain", "-f", fmt, img, cwd=cwd)
    got = L.cbt_json("info", "--output=json", "--backing-chain", "-f", fmt, img, cwd=cwd)
    assert isinstance(got, list), "--backing-chain must print a JSON list: %r" % got
    assert len(got) == len(want), "chain length %d, qemu %d" % (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        diff = info_diff(g, w)
        assert not diff, "layer %d differs:\n  %s" % (i, "\n  ".join(diff))
        assert g.get("filename") == w.get("filename"), (i, g.get("filename"), w.get("filename"))


def test_info_snapshots(images):
    """The snapshot list as qemu-img info --output=json prints it."""
    img, fmt, cwd = images["snapshots"]
    want = L.qemu_json("info", "--output=json", "-f", fmt, img, cwd=cwd)["snapshots"]
    got = L.cbt_json("info", "--output=json", "-f", fmt, img, cwd=cwd).get("snapshots")
    assert [s["name"] for s in want] == ["first", "second"]
    assert got == want


def compare_maps(got, want, label):
    g, w = L.map_entries(got), L.map_entries(want)
    if g != w:
        i = next((k for k, (x, y) in enumerate(zip(g, w)) if x != y), min(len(g), len(w)))
        raise AssertionError(
            "%s differs at entry %d (%s)\ncbt  (raw) %s\nqemu (raw) %s" % (
                label, i, L.map_diff(g, w), json.dumps(got[max(0, i - 2):i + 2]),
                json.dumps(want[max(0, i - 2):i + 2])))
    for i, (g, w) in enumerate(zip(got, want)):
        if "offset" in g and "offset" in w:
            assert g["offset"] == w["offset"], "%s: entry %d offset %d, qemu %d (%s)" % (
                label, i, g["offset"], w["offset"], w)


@pytest.mark.parametrize("name", list(IMAGES))
def test_map(images, name):
    img, fmt, cwd = images[name]
    want = L.qemu_json("map", "--output=json", "-f", fmt, img, cwd=cwd)
    got = L.cbt_json("map", "--output=json", "-f", fmt, img, cwd=cwd)
    compare_maps(got, want, "cbt map of %s" % name)


def test_map_reflects_changes(images, tmp):
    """A map that ignores the image would still fail here: write, re-map."""
    d = str(tmp)
    img = create(d, "img.qcow2", "1M")
    first = L.cbt_json("map", "--output=json", "-f", "qcow2", img)
    assert [(e["start"], e["length"], e["data"]) for e in first] == [(0, 1 * MiB, False)]
    qio(img, "write -P 1 128k 64k")
    want = L.qemu_json("map", "--output=json", "-f", "qcow2", img)
    got = L.cbt_json("map", "--output=json", "-f", "qcow2", img)
    compare_maps(got, want, "map after a write")
    assert any(e["data"] for e in got)
