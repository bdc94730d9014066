"""Every image cbt creates, writes and resizes is clean for qemu-img check.

For each `cbt create -o ...` variant a twin is made with `qemu-img create`
and the same options.  Then, in order:
  1. created:  qemu-img check clean; qemu-img info shows what was asked and
               the same format-specific data / backing fields as the twin;
               the allocation map equals the twin's (preallocation modes).
  2. written:  the same seeded workload through `cbt io` (cbt image) and
               `qemu-io` (twin): check clean, `qemu-img compare` equal.
  3. grown:    `cbt resize` vs `qemu-img resize`: check clean, new virtual
               size, the new tail reads as zeroes, compare equal.
  4. shrunk:   `cbt resize --shrink`: same checks.
"""
import os

import pytest

import interop_lib as L
from interop_lib import KiB, MiB, qemu_img, qemu_io

SIZE = 4 * MiB

# id: (-o options, virtual size, extra flags)
VARIANTS = {
    "default": ("", SIZE, {}),
    "cs512": ("cluster_size=512", 1 * MiB, {}),
    "cs4k": ("cluster_size=4096", SIZE, {}),
    "cs64k": ("cluster_size=65536", SIZE, {}),
    "cs256k": ("cluster_size=262144", SIZE, {}),
    "cs2M": ("cluster_size=2097152", 8 * MiB, {}),
    "rc1": ("refcount_bits=1", SIZE, {}),
    "rc2": ("refcount_bits=2", SIZE, {}),
    "rc4": ("refcount_bits=4", SIZE, {}),
    "rc8": ("refcount_bits=8", SIZE, {}),
    "rc32": ("refcount_bits=32", SIZE, {}),
    "rc64": ("refcount_bits=64", SIZE, {}),
    "rc1-cs512": ("refcount_bits=1,cluster_size=512", 1 * MiB, {}),
    "l2ext": ("extended_l2=on", SIZE, {}),
    "l2ext-cs16k": ("extended_l2=on,cluster_size=16384", SIZE, {}),
    "l2ext-cs2M-rc64": ("extended_l2=on,cluster_size=2097152,refcount_bits=64", 8 * MiB, {}),
    "zstd": ("compression_type=zstd", SIZE, {}),
    "lazy": ("lazy_refcounts=on", SIZE, {}),
    "data_file": ("data_file=ext.raw", SIZE, {}),
    "data_file_raw": ("data_file=ext.raw,data_file_raw=on", SIZE, {}),
    "compat010": ("compat=0.10", SIZE, {}),
    "compat010-cs4k": ("compat=0.10,cluster_size=4096", SIZE, {}),
    "prealloc-off": ("preallocation=off", SIZE, {}),
    "prealloc-metadata": ("preallocation=metadata", SIZE, {}),
    "prealloc-falloc": ("preallocation=falloc", SIZE, {}),
    "prealloc-full": ("preallocation=full", SIZE, {}),
    "prealloc-metadata-l2ext": ("preallocation=metadata,extended_l2=on", SIZE, {}),
    "backing-relative": ("", None, {"backing": "relative"}),
    "backing-absolute": ("", None, {"backing": "absolute"}),
    "backing-relative-l2ext": ("extended_l2=on,cluster_size=32768", None,
                               {"backing": "relative"}),
}


def parse_opts(opts):
    out = {}
    for kv in filter(None, opts.split(",")):
        k, v = kv.split("=", 1)
        out[k] = v
    return out


def expected_specific(opts):
    """format-specific.data fields implied by the -o options."""
    o = parse_opts(opts)
    exp = {
        "compat": o.get("compat", "1.1"),
        "refcount-bits": int(o.get("refcount_bits", 16)),
        "compression-type": o.get("compression_type", "zlib"),
    }
    if exp["compat"] == "1.1":
        exp["corrupt"] = False
        exp["lazy-refcounts"] = o.get("lazy_refcounts", "off") == "on"
        exp["extended-l2"] = o.get("extended_l2", "off") == "on"
    else:
        # QEMU prints no corrupt / lazy-refcounts / extended-l2 for v2 images
        exp.update({"corrupt": None, "lazy-refcounts": None, "extended-l2": None})
    if "data_file" in o:
        exp["data-file"] = o["data_file"]
        exp["data-file-raw"] = o.get("data_file_raw", "off") == "on"
    return exp


def make_images(d, name):
    """Create cbt's image and qemu's twin.  Returns (cbt path, twin path, size)."""
    opts, size, extra = VARIANTS[name]
    sub = os.path.join(d, "sub")
    os.makedirs(sub, exist_ok=True)
    args = ["-f", "qcow2"]
    bsize = None
    if extra.get("backing"):
        # base in sub/, overlays in sub/ too; commands run from d (not sub/),
        # so a relative backing name only works if resolved against the
        # overlay's directory, as QEMU does.
        bsize = 3 * MiB
        base = os.path.join(sub, "base.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", base, bsize)
        qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 2M 512k",
                "-c", "write -z 1M 64k", base)
        bname = "base.qcow2" if extra["backing"] == "relative" else base
        args += ["-b", bname, "-F", "qcow2"]
    if opts:
        # QEMU 7.2 resolves a relative data_file against the cwd (not the
        # image's directory, unlike backing files): use an absolute name.
        args += ["-o", opts.replace("ext.raw", os.path.join(sub, "cbt-ext.raw"))]
    cimg = os.path.join("sub", "cbt.qcow2")
    tail = [cimg] + ([str(size)] if size else [])
    L.cbt_ok("create", *(args + tail), cwd=d)
    qargs = [a.replace("cbt-ext.raw", "qemu-ext.raw") for a in args]
    qimg = os.path.join("sub", "qemu.qcow2")
    qemu_img("create", "-q", *(qargs + [qimg] + ([str(size)] if size else [])), cwd=d)
    return os.path.join(d, cimg), os.path.join(d, qimg), size or bsize


def info(path, **kw):
    return L.qemu_json("info", "--output=json", "-f", "qcow2", path, **kw)


def specific_without_datafile_name(data):
    return {k: v for k, v in data.items() if k != "data-file"}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_create_write_resize(tmp, name):
    d = str(tmp)
    opts, _, extra = VARIANTS[name]
    o = parse_opts(opts)
    cimg, qimg, size = make_images(d, name)
    cluster = int(o.get("cluster_size", 65536))

    # 1. created
    L.qemu_check_clean(cimg)
    ci, qi = info(cimg), info(qimg)
    assert ci["format"] == "qcow2"
    assert ci["virtual-size"] == size, ci
    assert ci["cluster-size"] == cluster, ci
    exp = expected_specific(opts)
    if "data_file" in o:
        exp["data-file"] = os.path.join(d, "sub", "cbt-ext.raw")
    got = ci["format-specific"]["data"]
    for k, v in exp.items():
        assert got.get(k) == v, "format-specific %s: got %r want %r (%s)" % (k, got.get(k), v, got)
    assert specific_without_datafile_name(got) == \
        specific_without_datafile_name(qi["format-specific"]["data"]), (got, qi)
    assert ci.get("dirty-flag") is False
    for k in ("backing-filename", "backing-filename-format"):
        assert ci.get(k) == qi.get(k), (k, ci, qi)
    if extra.get("backing") == "relative":
        assert ci["backing-filename"] == "base.qcow2"
    elif extra.get("backing") == "absolute":
        assert ci["backing-filename"] == os.path.join(d, "sub", "base.qcow2")
    L.assert_maps_equal(L.coalesce(L.qemu_map(cimg)), L.coalesce(L.qemu_map(qimg)),
                        "map right after create")
    prealloc = o.get("preallocation", "off")
    if prealloc in ("falloc", "full"):
        st = os.stat(cimg)
        assert st.st_blocks * 512 >= size, \
            "preallocation=%s but only %d bytes allocated" % (prealloc, st.st_blocks * 512)
        assert os.path.getsize(cimg) >= size
    elif prealloc == "metadata":
        assert os.path.getsize(cimg) >= size, "metadata preallocation: file too short"

    # 2. written
    cmds = L.random_workload(len(name) * 7919, size, cluster, 60)
    L.run_cbt_io(cimg, cmds)
    L.run_qemu_io(qimg, cmds)
    L.qemu_check_clean(cimg)
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", cimg, qimg, check=False)
    assert cmp.rc == 0, "after workload: %r" % cmp
    assert info(cimg).get("dirty-flag") is False

    # 3. grown (absolute size, then relative +)
    new = size + 1 * MiB + 512
    L.cbt_ok("resize", "-f", "qcow2", cimg, str(new))
    qemu_img("resize", "-q", "-f", "qcow2", qimg, str(new))
    L.cbt_ok("resize", "-f", "qcow2", cimg, "+1M")
    qemu_img("resize", "-q", "-f", "qcow2", qimg, "+1M")
    new += 1 * MiB
    L.qemu_check_clean(cimg)
    assert info(cimg)["virtual-size"] == new
    qemu_io("-f", "qcow2", "-r", "-c", "read -P 0 %d %d" % (size, new - size), cimg)
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", cimg, qimg, check=False)
    assert cmp.rc == 0, "after grow: %r" % cmp

    # 4. shrunk below the original size (cuts written data)
    small = size // 2 + 512
    L.cbt_ok("resize", "-f", "qcow2", "--shrink", cimg, str(small))
    qemu_img("resize", "-q", "-f", "qcow2", "--shrink", qimg, str(small))
    L.qemu_check_clean(cimg)
    assert info(cimg)["virtual-size"] == small
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", cimg, qimg, check=False)
    assert cmp.rc == 0, "after shrink: %r" % cmp
    # a write after shrink+grow must not resurrect old data
    L.cbt_ok("resize", "-f", "qcow2", cimg, str(size))
    qemu_img("resize", "-q", "-f", "qcow2", qimg, str(size))
    L.qemu_check_clean(cimg)
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", cimg, qimg, check=False)
    assert cmp.rc == 0, "after shrink then grow: %r" % cmp

    # 5. the external data file follows the virtual size, as QEMU's does
    if "data_file" in o:
        got = os.path.getsize(os.path.join(d, "sub", "cbt-ext.raw"))
        want = os.path.getsize(os.path.join(d, "sub", "qemu-ext.raw"))
        assert want == size
        assert got == want, "data file is %d bytes, QEMU's %d (virtual size %d)" % (
            got, want, size)


def test_shrink_requires_flag(tmp):
    """Like qemu-img, shrinking without --shrink is refused and changes nothing."""
    d = str(tmp)
    img = os.path.join(d, "a.qcow2")
    L.cbt_ok("create", "-f", "qcow2", img, "4M")
    L.cbt_ok("io", "-f", "qcow2", "-c", "write -P 7 0 4M", img)
    q = qemu_img("resize", "-f", "qcow2", img, "2M", check=False)
    assert q.rc != 0
    res = L.cbt_rc("resize", "-f", "qcow2", img, "2M")
    assert 0 < res.rc < 128 and res.err.strip(), res
    assert info(img)["virtual-size"] == 4 * MiB
    qemu_io("-f", "qcow2", "-r", "-c", "read -P 7 0 4M", img)
    L.qemu_check_clean(img)


def test_size_from_backing_and_suffixes(tmp):
    """Size omitted: taken from the backing file; suffixes as qemu-img's."""
    d = str(tmp)
    qemu_img("create", "-q", "-f", "qcow2", os.path.join(d, "b.qcow2"), "3M")
    L.cbt_ok("create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "o.qcow2", cwd=d)
    assert info(os.path.join(d, "o.qcow2"))["virtual-size"] == 3 * MiB
    for spec, want in (("1G", 1 << 30), ("1536k", 1536 * KiB), ("1000", 1024),
                       ("65536", 65536), ("2M", 2 * MiB)):
        p = os.path.join(d, "s%s.qcow2" % spec)
        L.cbt_ok("create", "-f", "qcow2", p, spec)
        qp = os.path.join(d, "q%s.qcow2" % spec)
        qemu_img("create", "-q", "-f", "qcow2", qp, spec)
        assert info(qp)["virtual-size"] == want  # the oracle's rounding
        assert info(p)["virtual-size"] == want, spec
        L.qemu_check_clean(p)
