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


def test_backup_progress_shows_rate_and_time_left(tmp_path):
    """cbt's own long jobs add the rate and the time left once a second of
    work tells them: the backup is held stopped for over a second after
    its first line, so the next line must carry them."""
    import signal
    import time
    disk = str(tmp_path / "d.qcow2")
    qemu_img("create", "-f", "qcow2", disk, "256M")
    qemu_io("-c", "write -P 7 0 256M", disk)
    os.mkdir(str(tmp_path / "bk"))
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([CBT, "backup", "-p", "--full", disk,
                                 str(tmp_path / "bk" / "f.qcow2")],
                                stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        out = b""
        while b"/100%)" not in out:
            out += os.read(master, 65536)
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(1.5)
        os.kill(proc.pid, signal.SIGCONT)
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=600) == 0
        proc.stdout.close()
    finally:
        os.close(master)
    assert re.search(rb"/100%\)  [0-9.]+ [KMG]?i?B/s, \d+:\d\d left", out), out
