"""-p draws a percentage on a terminal, and nothing otherwise.

The long operations (commit, stream, rebase, convert) report progress
through the library's callback; the CLI draws it only when stderr is a
terminal.  A pseudo-terminal stands in for one here.
"""
import os
import pty
import re
import subprocess

import pytest

from conftest import CBT, qemu_img, qemu_io

PCT = re.compile(rb"\((\d+)\.(\d)/100%\)")


def run_on_pty(argv, cwd):
    """Run argv with stderr on a pseudo-terminal; return (rc, pty bytes)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            out += chunk
        proc.wait(timeout=600)
        proc.stdout.close()
        return proc.returncode, out
    finally:
        os.close(master)


def chain(tmp):
    """base <- mid <- top, 32 MiB, data in every layer."""
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        args = ["create", "-f", "qcow2"]
        if backing:
            args += ["-b", backing + ".qcow2", "-F", "qcow2"]
        qemu_img(*args, str(tmp / (name + ".qcow2")), "32M")
    qemu_io("-c", "write -P 1 0 16M", str(tmp / "base.qcow2"))
    qemu_io("-c", "write -P 2 8M 8M", str(tmp / "mid.qcow2"))
    qemu_io("-c", "write -P 3 20M 4M", str(tmp / "top.qcow2"))


OPS = {
    "commit": ["commit", "-p", "top.qcow2"],
    "commit-top": ["commit", "-p", "--top", "mid.qcow2", "--base",
                   "base.qcow2", "--active", "top.qcow2"],
    "stream": ["stream", "-p", "top.qcow2"],
    "rebase": ["rebase", "-p", "-b", "", "top.qcow2"],
    "convert": ["convert", "-p", "-O", "qcow2", "top.qcow2", "out.qcow2"],
    "convert-raw": ["convert", "-p", "-O", "raw", "top.qcow2", "out.raw"],
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_progress_on_terminal(tmp_path, op):
    chain(tmp_path)
    rc, out = run_on_pty([CBT] + OPS[op], str(tmp_path))
    assert rc == 0, out
    pcts = [int(a) * 10 + int(b) for a, b in PCT.findall(out)]
    assert pcts, "no progress drawn: %r" % out
    assert pcts == sorted(pcts), "progress went backwards: %r" % pcts
    assert pcts[-1] == 1000, "progress did not reach 100%%: %r" % pcts
    qemu_img("check", str(tmp_path / "top.qcow2"))


@pytest.mark.parametrize("op", ["commit", "convert"])
def test_no_progress_without_terminal(tmp_path, op):
    chain(tmp_path)
    res = subprocess.run([CBT] + OPS[op], cwd=str(tmp_path),
                         capture_output=True)
    assert res.returncode == 0, res.stderr
    assert not PCT.search(res.stderr), res.stderr
