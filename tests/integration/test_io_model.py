"""Random workloads through `cbt io` on qcow2 images, checked against a model.

Each workload is a seeded random sequence of `write -P N`, `write -z`,
`write -z -u`, `discard`, `flush` and checking `read -P` commands, given to
`cbt io -c ...` in a few separate invocations (so the image is closed and
reopened between them) while a bytearray tracks what the guest should see.
Discards follow qemu 7.2 (see conftest.qcow2_discard).

Afterwards:
  - every command printed its qemu-io style line ("wrote N/N bytes at
    offset X", "discard ...", "read ...") with the right numbers, in order;
  - `cbt io -r` reads every maximal run of one byte value with `read -P`;
  - a deliberately wrong pattern makes `cbt io` fail (the check can fail);
  - `qemu-img convert -O raw` of the image equals the model byte for byte;
  - `qemu-img check` finds no corruption and no leaks.
"""
import os
import random

import pytest

from conftest import (IO_DONE_RE, byte_runs, cbt, first_difference, qemu_check_clean,
                      qemu_img, qemu_io, qcow2_discard, rand_length, rand_offset,
                      raw_contents)

KiB = 1024
MiB = 1024 * 1024

# (id, cluster_size, extended_l2, compat, backing, virtual size, seeds)
CONFIGS = [
    ("c64k", 64 * KiB, False, "1.1", False, 4 * MiB + 512, (1, 2, 3)),
    ("c4k", 4 * KiB, False, "1.1", False, 3 * MiB + 1536, (4, 5)),
    ("c512", 512, False, "1.1", False, 1 * MiB, (6,)),
    ("c2m", 2 * MiB, False, "1.1", False, 6 * MiB + 4096, (7,)),
    ("v2-c64k", 64 * KiB, False, "0.10", False, 3 * MiB + 512, (8,)),
    ("xl2-c32k", 32 * KiB, True, "1.1", False, 4 * MiB + 8192, (9, 10)),
    ("xl2-c2m", 2 * MiB, True, "1.1", False, 5 * MiB, (11,)),
    ("c4k-backing", 4 * KiB, False, "1.1", True, 3 * MiB, (12,)),
    ("c64k-backing", 64 * KiB, False, "1.1", True, 4 * MiB, (13, 14)),
    ("xl2-c64k-backing", 64 * KiB, True, "1.1", True, 4 * MiB + 512, (15,)),
    ("xl2-c16k-backing", 16 * KiB, True, "1.1", True, 2 * MiB, (16,)),
    ("v2-c64k-backing", 64 * KiB, False, "0.10", True, 3 * MiB, (17,)),
]

CASES = [pytest.param(c, s, id="%s-seed%d" % (c[0], s))
         for c in CONFIGS for s in c[6]]

# CBT_TEST_SEED shifts every seed (for soak runs); failures print the seed.
SEED_BASE = int(os.environ.get("CBT_TEST_SEED", "0"), 0)
CHUNKS = 3          # separate cbt io invocations
OPS_PER_CHUNK = 80


def make_backing(tmp, rng, cluster_size, size):
    """A base image made and filled by QEMU's tools; returns (path, model)."""
    base = tmp / "base.qcow2"
    bsize = size - size // 4 if rng.random() < 0.5 else size  # sometimes shorter
    bsize -= bsize % 512
    qemu_img("create", "-q", "-f", "qcow2", "-o",
             "cluster_size=%d" % max(4096, cluster_size // 2), base, bsize)
    model = bytearray(bsize)
    cmds = []
    for _ in range(25):
        off = rand_offset(rng, bsize, cluster_size)
        n = rand_length(rng, bsize, off, cluster_size)
        pat = rng.randrange(0xc0, 0x100)
        cmds += ["-c", "write -P %d %d %d" % (pat, off, n)]
        model[off:off + n] = bytes([pat]) * n
    qemu_io("-f", "qcow2", *cmds, base)
    return base, model


def gen_chunk(rng, model, cluster_size, sub, v2_with_backing, pat_state):
    """Commands for one cbt io invocation; updates model.  Returns a list of
    (command, expected output line or None)."""
    size = len(model)
    out = []
    for _ in range(OPS_PER_CHUNK):
        off = rand_offset(rng, size, cluster_size, sub)
        n = rand_length(rng, size, off, cluster_size, sub)
        r = rng.randrange(100)
        if r < 45:
            pat_state[0] = pat_state[0] % 0xbf + 1   # 1..0xbf: never the base's
            p = pat_state[0]
            out.append(("write -P %d %d %d" % (p, off, n),
                        ("wrote", n, off)))
            model[off:off + n] = bytes([p]) * n
        elif r < 60:
            unmap = r >= 53
            out.append(("write -z%s %d %d" % (" -u" if unmap else "", off, n),
                        ("wrote", n, off)))
            model[off:off + n] = bytes(n)
        elif r < 75:
            out.append(("discard %d %d" % (off, n), ("discard", n, off)))
            qcow2_discard(model, off, n, cluster_size, v2_with_backing)
        elif r < 80:
            out.append(("flush", None))
        else:
            # Check a piece of the current contents within this process.
            o, length, v = next(byte_runs(model, off, min(size, off + n)))
            out.append(("read -P %d %d %d" % (v, o, length), ("read", length, o)))
    return out


def explain(res, chunk):
    """A short account of a failed cbt io run: which commands failed, how."""
    cmds = [c for c, e in chunk if e is not None]
    done, notes = 0, []
    for line in res.out.splitlines():
        if IO_DONE_RE.search(line):
            done += 1
        elif "fail" in line.lower() or "error" in line.lower():
            cmd = cmds[done] if done < len(cmds) else "?"
            notes.append("  after %d completed commands, at `%s`: %s" % (done, cmd, line))
    return "rc=%d, %d/%d commands reported done\n%s\nstderr (tail): %s" % (
        res.rc, done, len(cmds), "\n".join(notes[:10]), res.err[-1500:])


def check_output_lines(res, chunk):
    """Every command but flush printed its qemu-io style line, in order."""
    got = [(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))
           for m in IO_DONE_RE.finditer(res.out)]
    want = [(e[0], e[1], e[1], e[2]) for _, e in chunk if e is not None]
    same = got == want
    assert same, (
        "cbt io output lines differ from the commands given\n"
        "first mismatch (index, got, expected): %s\nstdout (head): %s\nstderr (tail): %s"
        % (next(((i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w),
                ("count", len(got), len(want))), res.out[:2000], res.err[-1500:]))


@pytest.mark.parametrize("config,seed", CASES)
def test_io_workload(tmp, config, seed):
    name, cluster_size, xl2, compat, backing, size, _ = config
    seed += SEED_BASE
    rng = random.Random(seed * 7919 + cluster_size)
    sub = cluster_size // 32 if xl2 else 512
    img = tmp / "top.qcow2"

    opts = "cluster_size=%d,compat=%s" % (cluster_size, compat)
    if xl2:
        opts += ",extended_l2=on"
    if backing:
        base, base_model = make_backing(tmp, rng, cluster_size, size)
        model = bytearray(size)
        n = min(size, len(base_model))
        model[:n] = base_model[:n]
        cbt("create", "-q", "-f", "qcow2", "-o", opts, "-b", base.name,
            "-F", "qcow2", img, size)
    else:
        model = bytearray(size)
        cbt("create", "-q", "-f", "qcow2", "-o", opts, img, size)
    assert qemu_img("info", "--output=json", img).json()["virtual-size"] == size

    v2_with_backing = backing and compat == "0.10"
    pat_state = [rng.randrange(0xbf)]
    log = []
    for i in range(CHUNKS):
        chunk = gen_chunk(rng, model, cluster_size, sub, v2_with_backing, pat_state)
        args = []
        for cmd, _ in chunk:
            args += ["-c", cmd]
        res = cbt("io", "-f", "qcow2", *args, img, check=False)
        log.append(chunk)
        ok = res.rc == 0 and "verification failed" not in res.out + res.err
        assert ok, (
            "cbt io workload chunk %d failed (seed %d)\n%s" % (i, seed, explain(res, chunk)))
        check_output_lines(res, chunk)

    # Every maximal run of one byte value reads back with its pattern.
    runs = list(byte_runs(model))
    args = []
    for off, n, v in runs:
        args += ["-c", "read -P %d %d %d" % (v, off, n)]
    res = cbt("io", "-r", "-f", "qcow2", *args, img, check=False)
    readback = [(args[2 * i + 1], ("read", n, off)) for i, (off, n, _) in enumerate(runs)]
    ok = res.rc == 0 and "verification failed" not in res.out + res.err
    assert ok, (
        "read-back of %d runs failed (seed %d)\n%s" % (len(runs), seed, explain(res, readback)))
    check_output_lines(res, readback)

    # The verification itself must be able to fail: a wrong pattern.
    off, n, v = max(runs, key=lambda r: r[1])
    bad = cbt("io", "-r", "-f", "qcow2", "-c", "read -P %d %d %d" % ((v + 1) % 256, off, n),
              img, check=False)
    assert bad.rc != 0, "cbt io accepted a wrong pattern at %d+%d: %r" % (off, n, bad)
    assert "Pattern verification failed" in bad.out + bad.err, bad

    # QEMU sees the same bytes.
    data = raw_contents(img, tmp)
    diff = first_difference(data, bytes(model))
    assert diff is None, "qemu-img convert of the image differs from the model: %s" % diff

    qemu_check_clean(img)
    if backing:
        qemu_check_clean(base)
        # The backing file was not written to.
        bdata = raw_contents(base, tmp)
        bdiff = first_difference(bdata, bytes(base_model))
        assert bdiff is None, "the backing file changed: %s" % bdiff


def test_io_reads_backing_beyond_its_end(tmp):
    """A backing file shorter than the overlay: the tail reads as zeroes."""
    base = tmp / "short.qcow2"
    top = tmp / "long.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, 1 * MiB)
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 0 1M", base)
    cbt("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, 2 * MiB)
    res = cbt("io", "-r", "-f", "qcow2",
              "-c", "read -P 0x33 0 1M", "-c", "read -P 0 1M 1M",
              "-c", "read -P 0x33 1040000 8576", "-c", "read -P 0 1048576 4096", top)
    assert "verification failed" not in res.out + res.err, res
    bad = cbt("io", "-r", "-f", "qcow2", "-c", "read -P 0x33 1048000 1000", top, check=False)
    assert bad.rc != 0 and "Pattern verification failed" in bad.out + bad.err, bad


def test_io_commands_from_stdin(tmp):
    """Without -c, cbt io reads the same commands from stdin, one per line."""
    rng = random.Random(4242 + SEED_BASE)
    cluster_size = 64 * KiB
    img = tmp / "stdin.qcow2"
    cbt("create", "-q", "-f", "qcow2", img, 2 * MiB)
    model = bytearray(2 * MiB)
    chunk = gen_chunk(rng, model, cluster_size, 512, False, [0])
    text = "".join(c + "\n" for c, _ in chunk)
    res = cbt("io", "-f", "qcow2", img, input=text, check=False)
    ok = res.rc == 0 and "verification failed" not in res.out + res.err
    assert ok, "cbt io from stdin failed\n%s" % explain(res, chunk)
    check_output_lines(res, chunk)
    data = raw_contents(img, tmp)
    diff = first_difference(data, bytes(model))
    assert diff is None, "image differs from the model after stdin commands: %s" % diff
    qemu_check_clean(img)
