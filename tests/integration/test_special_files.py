"""Images that are not regular files, and chains too long to print.

A FIFO or /dev/zero where an image (or one of its backing files) should be
used to hang cbt forever; every open now refuses anything that is neither
a regular file nor a block device, naming the file and what it is.  A
chain of hundreds of layers with a missing base used to produce one
11.6 KB error line; the message now names the top, the failing layer and
its overlay, on one short line.
"""
import os

from conftest import cbt, qemu_img

# Every command here must end well within this (a hang is the bug).
QUICK = 60


def make_chain(tmp, n, name="l"):
    """l0 <- l1 <- ... <- l{n}; returns the paths."""
    paths = []
    for i in range(n + 1):
        p = os.path.join(str(tmp), "%s%d.qcow2" % (name, i))
        if i == 0:
            qemu_img("create", "-q", "-f", "qcow2", p, "1M")
        else:
            qemu_img("create", "-q", "-f", "qcow2", "-u", "-b",
                     os.path.basename(paths[-1]), "-F", "qcow2", p, "1M")
        paths.append(p)
    return paths


def test_backing_file_is_a_fifo(tmp):
    base, top = make_chain(tmp, 1)
    os.unlink(base)
    os.mkfifo(base)
    for argv in (["info", "--backing-chain", top], ["map", top],
                 ["io", "-r", "-c", "read 0 4k", top],
                 ["bitmap", "--list", "--chain", top],
                 ["checkpoint", "list", top]):
        res = cbt(*argv, check=False, timeout=QUICK)
        assert res.rc != 0 and "a FIFO" in res.err and "l0.qcow2" in res.err, \
            (argv, res)


def test_image_is_dev_zero_or_a_directory(tmp):
    zero = os.path.join(str(tmp), "zero.qcow2")
    os.symlink("/dev/zero", zero)
    res = cbt("info", zero, check=False, timeout=QUICK)
    assert res.rc != 0 and "character device" in res.err, res
    res = cbt("backup", "--full", zero, os.path.join(str(tmp), "b.qcow2"),
              check=False, timeout=QUICK)
    assert res.rc != 0 and "character device" in res.err, res
    d = os.path.join(str(tmp), "dir.qcow2")
    os.mkdir(d)
    res = cbt("info", d, check=False, timeout=QUICK)
    assert res.rc != 0 and "a directory" in res.err, res


def test_create_over_a_fifo_refused(tmp):
    fifo = os.path.join(str(tmp), "f.qcow2")
    os.mkfifo(fifo)
    res = cbt("create", "-q", "-f", "qcow2", fifo, "1M", check=False,
              timeout=QUICK)
    assert res.rc != 0 and "not a regular file" in res.err, res


def test_deep_chain_missing_base_is_one_short_line(tmp):
    paths = make_chain(tmp, 255)
    os.unlink(paths[0])
    res = cbt("info", "--backing-chain", paths[-1], check=False, timeout=QUICK)
    assert res.rc != 0, res
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 400, res.err[:2000]
    # the top, the failing layer and its overlay
    assert "l255.qcow2" in res.err and "l0.qcow2" in res.err and \
        "l1.qcow2" in res.err and "layer 255" in res.err, res


def test_chain_deeper_than_the_limit(tmp):
    paths = make_chain(tmp, 260)
    res = cbt("info", "--backing-chain", paths[-1], check=False, timeout=QUICK)
    assert res.rc != 0 and "deeper than 256 layers" in res.err, res
    assert len(res.err) < 400, res.err[:2000]
