"""`cbt convert`: options, output and every refusal.

  * success prints nothing (like qemu-img), also with -p when stderr is no
    terminal; -q too;
  * the default output format is raw (as qemu-img); -O qcow2 -o ... passes
    the creation options (checked with qemu-img info); size= is overridden
    by the source's size, as qemu-img does;
  * an existing DST is overwritten (as qemu-img);
  * -n: DST must exist and be large enough; its tail past the source is
    kept; without -O its format is probed;
  * bad input exits 1 with one line naming the file or option, and leaves
    no DST behind: missing source, missing backing file in the source
    chain, unknown -O, bad -o key or value, -o with -n, -B without -F, -c
    or --bitmaps with a raw target, --skip-broken-bitmaps without
    --bitmaps, DST being a layer of the source chain;
  * a failure after DST was created (a source read error) removes DST; with
    -n, DST is left as the copy left it.
"""
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "interop"))
import interop_lib as L  # noqa: E402
from interop_lib import KiB, MiB, cbt, qemu_img, qemu_io, no_crash  # noqa: E402

SIZE = 4 * MiB


def src_image(d, name="src.qcow2"):
    p = os.path.join(str(d), name)
    qemu_img("create", "-q", "-f", "qcow2", p, SIZE)
    qemu_io("-c", "write -P 3 0 300k", "-c", "write -P 0 1M 64k",
            "-c", "write -P 4 3M 4k", p)
    return p


def fails(*args, rc=1):
    res = no_crash(cbt("convert", *args, check=False))
    assert res.rc == rc, res
    assert res.out == "", res
    return res


def info(path):
    return json.loads(qemu_img("info", "--output=json", path).out)


def test_default_raw_and_silent(tmp):
    src = src_image(tmp)
    dst = os.path.join(str(tmp), "out.img")
    res = no_crash(cbt("convert", "-p", src, dst))
    assert res.out == "" and res.err == "", res
    assert info(dst)["format"] == "raw"
    assert info(dst)["virtual-size"] == SIZE
    qemu_img("compare", "-f", "qcow2", "-F", "raw", src, dst)
    # sparse: only the data written is allocated
    assert os.stat(dst).st_blocks * 512 < 1 * MiB


def test_create_options_and_quiet(tmp):
    src = src_image(tmp)
    dst = os.path.join(str(tmp), "out.qcow2")
    res = cbt("convert", "-q", "-O", "qcow2", "-o",
              "cluster_size=16k,compat=v3,lazy_refcounts=on,extended_l2=on,"
              "compression_type=zstd,refcount_bits=8,size=1M", src, dst)
    assert res.out == "" and res.err == "", res
    i = info(dst)
    data = i["format-specific"]["data"]
    assert i["cluster-size"] == 16384 and i["virtual-size"] == SIZE
    assert data["lazy-refcounts"] and data["extended-l2"]
    assert data["compression-type"] == "zstd" and data["refcount-bits"] == 8
    qemu_img("compare", src, dst)


def test_options_help(tmp):
    res = cbt("convert", "-O", "qcow2", "-o", "help")
    assert "cluster_size=<size>" in res.out
    assert res.out == cbt("create", "-f", "qcow2", "-o", "help").out


def test_overwrites_existing_target(tmp):
    src = src_image(tmp)
    dst = os.path.join(str(tmp), "out.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", dst, 16 * MiB)
    qemu_io("-c", "write -P 9 8M 1M", dst)
    cbt("convert", "-O", "qcow2", src, dst)
    assert info(dst)["virtual-size"] == SIZE
    qemu_img("compare", src, dst)


def test_backing_target(tmp):
    base = src_image(tmp, "base.qcow2")
    top = os.path.join(str(tmp), "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io("-c", "write -P 8 2M 64k", "-c", "write -z 0 64k", top)
    dst = os.path.join(str(tmp), "new.qcow2")
    cbt("convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", top, dst)
    i = info(dst)
    assert i["backing-filename"] == "base.qcow2"
    qemu_img("compare", top, dst)
    m = L.coalesce(L.qemu_map(dst))
    top_only = [e for e in m if e["depth"] == 0 and e["present"]]
    assert [(e["start"], e["length"], e["zero"]) for e in top_only] == \
        [(0, 64 * KiB, True), (2 * MiB, 64 * KiB, False)], m


def test_no_create(tmp):
    src = src_image(tmp)
    dst = os.path.join(str(tmp), "big.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", dst, 2 * SIZE)
    qemu_io("-c", "write -P 0x55 0 %d" % (2 * SIZE), dst)
    cbt("convert", "-n", src, dst)          # format probed
    assert info(dst)["virtual-size"] == 2 * SIZE
    qemu_io("-c", "read -P 0x55 %d %d" % (SIZE, SIZE), dst)
    qemu_io("-c", "read -P 0 1M 64k", "-c", "read -P 0 400k 600k",
            "-c", "read -P 3 0 300k", dst)
    small = os.path.join(str(tmp), "small.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", small, SIZE // 2)
    before = L.file_digest(small)
    res = fails("-n", "-O", "qcow2", src, small)
    assert "small.qcow2" in res.err and "smaller" in res.err, res
    assert L.file_digest(small) == before
    res = fails("-n", src, os.path.join(str(tmp), "absent.qcow2"))
    assert "absent.qcow2" in res.err
    assert not os.path.exists(os.path.join(str(tmp), "absent.qcow2"))


def test_bad_input(tmp):
    d = str(tmp)
    src = src_image(tmp)
    dst = os.path.join(d, "out.qcow2")

    res = fails("-O", "qcow2", os.path.join(d, "missing.qcow2"), dst)
    assert "missing.qcow2" in res.err

    orphan = os.path.join(d, "orphan.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F",
             "qcow2", orphan, SIZE)
    res = fails("-O", "qcow2", orphan, dst)
    assert "gone.qcow2" in res.err

    res = fails("-O", "vmdk", src, dst, rc=64)
    assert "vmdk" in res.err
    res = fails("-O", "qcow2", "-o", "colour=blue", src, dst, rc=64)
    assert "colour" in res.err
    res = fails("-O", "qcow2", "-o", "cluster_size=3000", src, dst)
    assert "cluster" in res.err
    res = fails("-O", "qcow2", "-o", "compat=0.10", "--bitmaps", src, dst)
    assert "bitmaps" in res.err
    res = fails("-n", "-o", "cluster_size=4k", src, dst, rc=64)
    assert "-o" in res.err
    res = fails("-O", "qcow2", "-B", "base.qcow2", src, dst, rc=64)
    assert "backing format" in res.err
    res = fails("-O", "raw", "-c", src, dst)
    assert "compress" in res.err
    res = fails("-O", "raw", "--bitmaps", src, dst)
    assert "bitmaps" in res.err
    res = fails("-O", "qcow2", "--skip-broken-bitmaps", src, dst, rc=64)
    assert "--bitmaps" in res.err
    res = fails("-O", "qcow2", src, rc=64)
    res = fails("-O", "qcow2", src, dst, dst + "2", rc=64)
    assert not os.path.exists(dst)

    # the target is the source, or a layer of its chain: refused untouched
    top = os.path.join(d, "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "src.qcow2", "-F", "qcow2", top)
    before = L.file_digest(src)
    res = fails("-O", "qcow2", top, src)
    assert "src.qcow2" in res.err
    res = fails("-O", "qcow2", top, top)
    assert L.file_digest(src) == before
    qemu_io("-c", "read -P 3 0 300k", top)


def corrupt_compressed(d):
    """A compressed image whose compressed data is garbage past 64 KiB."""
    raw = os.path.join(d, "c.raw")
    L.write_compressible(raw, 1 * MiB, 3)
    p = os.path.join(d, "c.qcow2")
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", raw, p)
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.seek(size - 256 * KiB)
        f.write(random.Random(3).randbytes(128 * KiB))
    return p


def test_failure_removes_created_target(tmp):
    d = str(tmp)
    src = corrupt_compressed(d)
    dst = os.path.join(d, "out.qcow2")
    # a cluster that does not decompress reads as EIO, as in QEMU: the I/O
    # error status (docs/cli.md)
    res = fails("-O", "qcow2", src, dst, rc=74)
    assert "error while reading" in res.err and "c.qcow2" in res.err, res
    assert not os.path.exists(dst)
    # an existing file is overwritten, so it goes too
    with open(dst, "wb") as f:
        f.write(b"old")
    fails("-O", "qcow2", src, dst, rc=74)
    assert not os.path.exists(dst)
    # -n: the target stays
    qemu_img("create", "-q", "-f", "qcow2", dst, 4 * MiB)
    fails("-n", "-O", "qcow2", src, dst, rc=74)
    assert os.path.exists(dst)
    assert L.qemu_check(dst)[0] == 0


def test_odd_sizes(tmp):
    """A source whose size is no multiple of 512 or of the cluster size:
    raw keeps the exact size, qcow2 rounds up to 512 (as qemu-img), -c
    compresses the last partial cluster too."""
    d = str(tmp)
    src = os.path.join(d, "odd.raw")
    with open(src, "wb") as f:
        f.write(bytes([7]) * 150000 + bytes(20000) + bytes([9]) * 3)
    for args, fmt in ((["-O", "raw"], "raw"), (["-O", "qcow2"], "qcow2"),
                      (["-O", "qcow2", "-c"], "qcow2"),
                      (["-O", "qcow2", "-c", "-o", "cluster_size=512"], "qcow2")):
        dst = os.path.join(d, "out." + fmt)
        cbt("convert", "-f", "raw", *args, src, dst)
        qemu_img("compare", "-f", "raw", "-F", fmt, src, dst)
        if fmt == "raw":
            assert os.path.getsize(dst) == 170003
        else:
            assert info(dst)["virtual-size"] == 170496
            assert L.qemu_check(dst)[0] == 0
        if "-c" in args:
            assert L.qemu_check(dst)[1]["compressed-clusters"] > 0
    empty = os.path.join(d, "empty.raw")
    open(empty, "wb").close()
    cbt("convert", "-f", "raw", "-O", "qcow2", empty, os.path.join(d, "e.qcow2"))
    assert info(os.path.join(d, "e.qcow2"))["virtual-size"] == 0
