"""The `cbt` command line: help, errors, and create/info/resize round trips.

qemu-img 7.2 defines the expected behaviour: sizes take k/M/G/T suffixes
(powers of 1024) and fractions ("1.5G"), a qcow2 size is rounded up to 512
bytes, the size defaults to the backing file's, resize takes +/- relative
sizes and refuses to shrink without --shrink, and `info --output=json`
prints qemu-img's fields with the same values.
"""
import json
import os

import pytest

from conftest import CBT, cbt, qemu_check_clean, qemu_img, qemu_io

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

COMMANDS = ["create", "info", "check", "map", "compare", "io", "resize"]


def virtual_size(path):
    """As QEMU sees it."""
    return qemu_img("info", "--output=json", path).json()["virtual-size"]


def cbt_info(path, *extra):
    res = cbt("info", "--output=json", *extra, path)
    try:
        return json.loads(res.out)
    except ValueError as e:
        raise AssertionError("cbt info --output=json printed invalid JSON (%s):\n%s"
                             % (e, res.out[:2000]))


# ---- help and errors ----

@pytest.mark.parametrize("cmd", COMMANDS)
def test_command_help(cmd):
    res = cbt(cmd, "--help", check=False, input="")
    assert res.rc == 0, "cbt %s --help: %r" % (cmd, res)
    assert "usage" in res.out.lower(), "no usage line on stdout: %r" % res
    assert cmd in res.out, "usage does not name the command: %r" % res


def test_toplevel_help_lists_commands():
    res = cbt("--help", check=False)
    assert res.rc == 0, res
    assert "usage" in res.out.lower(), res
    missing = [c for c in COMMANDS if c not in res.out]
    assert not missing, "cbt --help does not list %s:\n%s" % (missing, res.out)


def test_unknown_command():
    res = cbt("frobnicate", "x.img", check=False)
    assert res.rc != 0, res
    assert "frobnicate" in res.err, "error does not name the command: %r" % res


@pytest.mark.parametrize("cmd", COMMANDS)
def test_unknown_option(cmd, tmp):
    img = tmp / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    res = cbt(cmd, "--no-such-option", img, check=False, input="")
    assert res.rc != 0, res
    assert "no-such-option" in res.err, "error does not name the option: %r" % res


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c != "io"])  # io: interactive
def test_missing_arguments(cmd):
    res = cbt(cmd, check=False, input="")
    assert res.rc != 0, res
    assert res.err.strip(), "no message on stderr: %r" % res


def test_missing_file(tmp):
    missing = tmp / "does-not-exist.qcow2"
    res = cbt("info", missing, check=False)
    assert res.rc != 0, res
    assert "does-not-exist.qcow2" in res.err, res


# ---- create and info ----

@pytest.mark.parametrize("spec,size", [
    ("512", 512), ("1000", 1024), ("1k", KiB), ("64K", 64 * KiB), ("3M", 3 * MiB),
    ("1G", GiB), ("1.5G", GiB + GiB // 2), ("2T", 2 * TiB), ("1048576", MiB),
])
def test_create_qcow2_sizes(tmp, spec, size):
    img = tmp / "s.qcow2"
    cbt("create", "-q", "-f", "qcow2", img, spec)
    assert virtual_size(img) == size
    assert cbt_info(img)["virtual-size"] == size
    qemu_check_clean(img)


@pytest.mark.parametrize("spec,size", [("1k", KiB), ("3M", 3 * MiB), ("1G", GiB)])
def test_create_raw_sizes(tmp, spec, size):
    img = tmp / "s.raw"
    cbt("create", "-q", "-f", "raw", img, spec)
    assert os.path.getsize(img) == size
    assert virtual_size(img) == size
    info = cbt_info(img)
    assert info["virtual-size"] == size and info["format"] == "raw", info


@pytest.mark.parametrize("spec", ["12Q", "abc", "-1", "1.5"])
def test_create_bad_size(tmp, spec):
    img = tmp / "bad.qcow2"
    res = cbt("create", "-q", "-f", "qcow2", img, "--", spec, check=False)
    assert res.rc != 0, res
    assert res.err.strip(), res
    assert not img.exists(), "a file was created despite the bad size %r" % spec


def test_create_needs_a_size(tmp):
    img = tmp / "nosize.qcow2"
    res = cbt("create", "-q", "-f", "qcow2", img, check=False)
    assert res.rc != 0, res
    assert "size" in res.err.lower(), res


def test_create_default_format_is_raw_like_qemu_img(tmp):
    """qemu-img create without -f makes a raw image."""
    img = tmp / "plain.img"
    cbt("create", "-q", img, "2M")
    assert qemu_img("info", "--output=json", img).json()["format"] == "raw"
    assert os.path.getsize(img) == 2 * MiB


def test_size_defaults_to_backing(tmp):
    base = tmp / "base.qcow2"
    top = tmp / "top.qcow2"
    bsize = 3 * MiB + 512
    qemu_img("create", "-q", "-f", "qcow2", base, bsize)
    qemu_io("-f", "qcow2", "-c", "write -P 0x42 0 64k", "-c", "write -P 0x43 3M 512", base)
    cbt("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    assert virtual_size(top) == bsize
    info = qemu_img("info", "--output=json", top).json()
    assert info.get("backing-filename") == "base.qcow2", info
    assert info.get("backing-filename-format") == "qcow2", info
    qemu_io("-r", "-f", "qcow2", "-c", "read -P 0x42 0 64k", "-c", "read -P 0 64k 64k",
            "-c", "read -P 0x43 3M 512", top)
    qemu_check_clean(top)
    # With an explicit size, larger than the backing file.
    top2 = tmp / "top2.qcow2"
    cbt("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top2, "5M")
    assert virtual_size(top2) == 5 * MiB
    qemu_io("-r", "-f", "qcow2", "-c", "read -P 0x43 3M 512", "-c", "read -P 0 4M 1M", top2)


CREATE_VARIANTS = {
    "default": "",
    "c4k-rb8-lazy": "cluster_size=4096,refcount_bits=8,lazy_refcounts=on",
    "xl2-c32k": "cluster_size=32k,extended_l2=on",
    "compat-0.10": "compat=0.10",
    "zstd-rb1": "compression_type=zstd,refcount_bits=1",
    "c2m-rb64": "cluster_size=2M,refcount_bits=64",
    "c512": "cluster_size=512",
}


def _parse_opts(opts):
    return dict(kv.split("=", 1) for kv in opts.split(",")) if opts else {}


@pytest.mark.parametrize("variant", sorted(CREATE_VARIANTS))
def test_create_options_and_info_json(tmp, variant):
    opts = CREATE_VARIANTS[variant]
    img = tmp / "o.qcow2"
    args = ["create", "-q", "-f", "qcow2"] + (["-o", opts] if opts else []) + [img, "5M"]
    cbt(*args)
    qemu_check_clean(img)
    q = qemu_img("info", "--output=json", img).json()
    want = _parse_opts(opts)
    sizes = {"4096": 4096, "32k": 32 * KiB, "2M": 2 * MiB, "512": 512}
    assert q["cluster-size"] == sizes.get(want.get("cluster_size"), 65536), q
    data = q["format-specific"]["data"]
    assert data["compat"] == want.get("compat", "1.1"), data
    assert data["refcount-bits"] == int(want.get("refcount_bits", 16)), data
    if data["compat"] != "0.10":
        assert data["lazy-refcounts"] == (want.get("lazy_refcounts") == "on"), data
        assert data["extended-l2"] == (want.get("extended_l2") == "on"), data
    assert data["compression-type"] == want.get("compression_type", "zlib"), data
    _assert_info_matches_qemu(img)


def _assert_info_matches_qemu(img, *extra):
    q = qemu_img("info", "--output=json", *extra, img).json()
    c = cbt_info(img, *extra)
    _assert_superset(c, q, "")


def _assert_superset(got, want, path):
    """Every field qemu-img prints, cbt prints with the same value."""
    for k, v in want.items():
        if k == "actual-size":
            assert isinstance(got.get(k), int), "%s%s missing or not a number: %r" % (path, k, got)
            continue
        assert k in got, "cbt info lacks %s%s (qemu-img: %r)" % (path, k, v)
        if isinstance(v, dict):
            assert isinstance(got[k], dict), "%s%s: %r != %r" % (path, k, got[k], v)
            _assert_superset(got[k], v, path + k + ".")
        else:
            assert got[k] == v, "cbt info %s%s = %r, qemu-img says %r" % (path, k, got[k], v)


def test_info_json_backing_and_data_file(tmp):
    base = tmp / "base.qcow2"
    top = tmp / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    cbt("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    _assert_info_matches_qemu(top)
    info = cbt_info(top)
    assert info["backing-filename"] == "base.qcow2", info
    assert info["full-backing-filename"] == str(base), info

    ext = tmp / "ext.qcow2"
    cbt("create", "-q", "-f", "qcow2", "-o", "data_file=%s" % (tmp / "ext.data"), ext, "2M")
    assert (tmp / "ext.data").exists()
    qemu_check_clean(ext)
    _assert_info_matches_qemu(ext)
    assert cbt_info(ext)["format-specific"]["data"]["data-file"] == str(tmp / "ext.data")


def test_info_json_raw(tmp):
    img = tmp / "r.raw"
    qemu_img("create", "-q", "-f", "raw", img, "3M")
    _assert_info_matches_qemu(img)
    _assert_info_matches_qemu(img, "-f", "raw")


def test_info_json_after_writes(tmp):
    """Fields stay right on an image with data (dirty-flag, sizes)."""
    img = tmp / "w.qcow2"
    cbt("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "8M")
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 2 5M 3M", img)
    _assert_info_matches_qemu(img)


# ---- resize ----

def test_resize_qcow2_round_trip(tmp):
    img = tmp / "r.qcow2"
    cbt("create", "-q", "-f", "qcow2", img, "1M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 1M", img)

    cbt("resize", img, "+1M")
    assert virtual_size(img) == 2 * MiB
    assert cbt_info(img)["virtual-size"] == 2 * MiB
    qemu_io("-r", "-f", "qcow2", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0 1M 1M", img)
    qemu_check_clean(img)

    res = cbt("resize", img, "-512k", check=False)
    assert res.rc != 0, "qcow2 shrink without --shrink was accepted: %r" % res
    assert "shrink" in res.err, res
    assert virtual_size(img) == 2 * MiB

    cbt("resize", "--shrink", img, "-512k")
    assert virtual_size(img) == 1536 * KiB
    qemu_io("-r", "-f", "qcow2", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0 1M 512k", img)
    qemu_check_clean(img)

    cbt("resize", "-f", "qcow2", img, "3M")
    assert virtual_size(img) == 3 * MiB
    cbt("resize", "-q", "--shrink", img, "768k")
    assert virtual_size(img) == 768 * KiB
    qemu_io("-r", "-f", "qcow2", "-c", "read -P 0x5a 0 768k", img)
    qemu_check_clean(img)

    # Growing past what one L1 table cluster maps.
    cbt("resize", img, "+1G")
    assert virtual_size(img) == GiB + 768 * KiB
    qemu_io("-f", "qcow2", "-c", "write -P 0x77 1G 64k", img)
    qemu_io("-r", "-f", "qcow2", "-c", "read -P 0x5a 0 768k", "-c", "read -P 0x77 1G 64k", img)
    qemu_check_clean(img)


def test_resize_shrink_drops_data(tmp):
    """Data beyond a shrink is gone, and reads zero after growing again."""
    img = tmp / "d.qcow2"
    cbt("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 4M", img)
    cbt("resize", "--shrink", img, "1M")
    cbt("resize", img, "4M")
    qemu_io("-r", "-f", "qcow2", "-c", "read -P 0x11 0 1M", "-c", "read -P 0 1M 3M", img)
    qemu_check_clean(img)


def test_resize_raw(tmp):
    img = tmp / "r.raw"
    cbt("create", "-q", "-f", "raw", img, "1M")
    cbt("resize", "-f", "raw", img, "+1M")
    assert os.path.getsize(img) == 2 * MiB
    cbt("resize", "-f", "raw", "--shrink", img, "-1536k")
    assert os.path.getsize(img) == 512 * KiB
    assert cbt_info(img)["virtual-size"] == 512 * KiB


def test_resize_bad_size(tmp):
    img = tmp / "b.qcow2"
    cbt("create", "-q", "-f", "qcow2", img, "1M")
    for spec in ("+12Q", "banana"):
        res = cbt("resize", img, spec, check=False)
        assert res.rc != 0, res
    res = cbt("resize", "--shrink", img, "-2M", check=False)
    assert res.rc != 0, "shrinking below zero was accepted: %r" % res
    assert virtual_size(img) == MiB


def test_check_raw_unsupported_like_qemu_img(tmp):
    """raw has nothing to check: exit 63 and qemu-img's message, while a
    qcow2 whose open fails for an unsupported reason is a failed check
    (exit 1, naming the reason), not 'unsupported'."""
    raw = str(tmp / "r.raw")
    cbt("create", "-q", "-f", "raw", raw, "1M")
    ours = cbt("check", raw, check=False)
    theirs = qemu_img("check", "-f", "raw", raw, check=False)
    assert ours.rc == theirs.rc == 63, (ours, theirs)
    assert "does not support checks" in ours.err
    bad = str(tmp / "v4.qcow2")
    cbt("create", "-q", "-f", "qcow2", bad, "1M")
    with open(bad, "r+b") as f:
        f.seek(4)
        f.write((4).to_bytes(4, "big"))  # version 4: unsupported
    res = cbt("check", bad, check=False)
    assert res.rc == 1, res
    assert "version" in res.err and "does not support checks" not in res.err


def test_check_json_names_format(tmp):
    img = str(tmp / "a.qcow2")
    cbt("create", "-q", "-f", "qcow2", img, "1M")
    assert cbt("check", "--output=json", img).json()["format"] == "qcow2"


def test_openssl_configuration_is_never_read(tmp):
    """cbt hashes with libcrypto's SHA-256 only: OpenSSL's configuration
    file and providers (about 1 ms of every run, through the one-shot
    SHA256()) are never loaded.  OPENSSL_CONF names a FIFO nobody writes:
    opening it would block the run until the timeout."""
    import subprocess
    fifo = os.path.join(str(tmp), "openssl.cnf")
    os.mkfifo(fifo)
    disk = os.path.join(str(tmp), "d.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", disk, "16M")
    qemu_io("-c", "write -P 7 0 1M", disk)
    env = dict(os.environ, OPENSSL_CONF=fifo)
    for args in (["backup", "--full", disk, os.path.join(str(tmp), "f.qcow2")],
                 ["checkpoint", "list", disk],
                 ["verify", os.path.join(str(tmp), "f.qcow2")]):
        try:
            p = subprocess.run([CBT] + args, capture_output=True, text=True,
                               timeout=20, env=env)
        except subprocess.TimeoutExpired:
            pytest.fail("cbt %s opened OPENSSL_CONF" % args[0])
        assert p.returncode == 0, (args, p.stderr)
