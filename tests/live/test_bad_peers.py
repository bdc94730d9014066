"""Bad QMP peers and a QEMU that dies mid-backup.

A socket that is not QEMU, one that answers garbage or hangs up, a QEMU too
old for a step: cbt fails with an error naming the socket and the step (or
the QEMU version needed), never hangs or crashes.  A qemu-storage-daemon
killed while cbt reads its backup view: cbt fails cleanly, leaves no file
of the backup behind, and the disk's next backup after a restart is a full
one (--auto says why) that restores exactly.
"""
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import CBT, cbt, qemu_img
from livelib import MiB, live, make_image  # noqa: F401
from livelib import state_dir  # noqa: F401 (autouse: a journal per test)

SIZE = 32 * MiB



class FakePeer:
    """A Unix socket server playing a would-be QEMU monitor: it sends
    `greeting`, then answers each command line with `answer(cmd, id)`
    (None: hang up)."""

    def __init__(self, path, greeting, answer):
        self.path = path
        if os.path.exists(path):
            os.unlink(path)
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(path)
        self.srv.listen(1)
        self.greeting, self.answer = greeting, answer
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        with conn:
            if self.greeting is not None:
                conn.sendall(self.greeting)
            f = conn.makefile("rb")
            for line in f:
                try:
                    msg = json.loads(line)
                except ValueError:
                    return
                out = self.answer(msg.get("execute"), msg.get("id"))
                if out is None:
                    return
                conn.sendall(out)

    def close(self):
        self.srv.close()


def greeting(major, minor, micro=0):
    return (json.dumps({"QMP": {"version": {"qemu": {
        "major": major, "minor": minor, "micro": micro}, "package": ""},
        "capabilities": []}}) + "\r\n").encode()


def ok(cmd, cid):
    return (json.dumps({"return": {}, "id": cid}) + "\r\n").encode()


def run_against(tmp_path, greet, answer, *args):
    path = str(tmp_path / "fake.qmp")
    peer = FakePeer(path, greet, answer)
    try:
        return cbt(*args, "--qmp", path, check=False, timeout=120), path
    finally:
        peer.close()


@pytest.mark.parametrize("case", ["garbage", "not-json-object", "hang-up",
                                  "no-greeting-fields", "bad-reply"])
def test_peers_that_are_not_qemu(tmp_path, case):
    greet, answer = {
        "garbage": (b"\x00\xffSSH-2.0-x\r\n", ok),
        "not-json-object": (b"[1, 2, 3]\r\n", ok),
        "hang-up": (greeting(7, 2), lambda c, i: None),
        "no-greeting-fields": (b'{"QMP": {}}\r\n', ok),
        "bad-reply": (greeting(7, 2),
                      lambda c, i: ok(c, i) if c == "qmp_capabilities"
                      else b'{"return": {}, "id": "someone-else"}\r\n'),
    }[case]
    res, path = run_against(tmp_path, greet, answer, "checkpoint", "list",
                            "vda")
    assert res.rc != 0 and path in res.err, res
    assert "Traceback" not in res.err and len(res.err) < 2000, res


def test_events_before_the_greeting(tmp_path):
    """QEMU may flush a previous client's events to the next one before its
    greeting: skipped, the greeting still read (its version is seen).  Only
    events: anything else before the greeting is no QMP server."""
    ev = b'{"event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "null"}}\r\n'
    res, path = run_against(tmp_path, ev * 3 + greeting(3, 1), ok,
                            "checkpoint", "list", "vda")
    assert res.rc != 0 and "QEMU 3.1.0" in res.err, res
    res, path = run_against(tmp_path, b'{"return": {}}\r\n' + greeting(3, 1),
                            ok, "checkpoint", "list", "vda")
    assert res.rc != 0 and "not a QMP server" in res.err, res


def test_qemu_too_old(tmp_path):
    res, path = run_against(tmp_path, greeting(3, 1), ok, "checkpoint",
                            "list", "vda")
    assert res.rc != 0 and "QEMU 3.1.0" in res.err and "4.0" in res.err, res
    bk = tmp_path / "bk"
    bk.mkdir()
    res, path = run_against(tmp_path, greeting(5, 1), ok, "backup", "--full",
                            "vda", str(bk / "f.qcow2"))
    assert res.rc != 0 and "QEMU 5.1.0" in res.err and "5.2" in res.err, res
    assert os.listdir(str(bk)) == []


def test_qemu_killed_during_the_backup(live, tmp_path):
    disk = make_image(live.path("d.qcow2"), SIZE)
    q = live.qsd(disk)
    bk = live.path("bk")
    os.mkdir(bk)
    cbt("backup", "--qmp", q.cbt_qmp, "--full", "vm",
        os.path.join(bk, "full.qcow2"))
    w = live.writer(q, seed=31)
    w.step(20)
    # Kill QEMU once it holds the incremental's view, cbt stopped meanwhile.
    p = subprocess.Popen([CBT, "backup", "--qmp", q.cbt_qmp, "--incremental",
                          "vm", os.path.join(bk, "inc.qcow2")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None:
        if any(j["id"].startswith("cbt-") for j in q.qmp("query-jobs")):
            break
        time.sleep(0.001)
    os.kill(p.pid, signal.SIGSTOP)
    w.stop()
    q.kill()
    os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and err, (out, err)
    assert b"\x00" not in err, err
    err.decode()  # the message is text (nothing the server sent raw)
    assert sorted(os.listdir(bk)) == ["full.qcow2", "full.qcow2.json",
                                      "full.qcow2.tree"], os.listdir(bk)
    # QEMU again: the checkpoint it had is void (its bitmap was in use
    # when QEMU died); --auto rescans the disk against full.qcow2 (whose
    # hashes say what every block held), saying why, and it restores to
    # the disk: an incremental of the writer's 20 blocks at most (fewer
    # when QEMU died before their qcow2 metadata reached the file).
    q2 = live.qsd(disk)
    res = cbt("backup", "--qmp", q2.cbt_qmp, "--auto", "--output=json", "vm",
              os.path.join(bk, "again.qcow2"))
    assert "rescanned the whole disk instead" in res.err, res
    r = res.json()
    assert r["kind"] == "incremental" and r["rescan"] is True, r
    assert r["parent"] == os.path.join(bk, "full.qcow2"), r
    assert r["bytes-copied"] <= 20 * 64 * 1024, r
    q2.quit()
    out_img = live.path("r.qcow2")
    cbt("restore", os.path.join(bk, "again.qcow2"), out_img)
    res = qemu_img("compare", disk, out_img, check=False)
    assert res.rc == 0, res


# ---- guest quiescing (--qga) through a guest agent played here ----


class FakeAgent:
    """qemu-guest-agent's protocol: guest-sync-delimited answered after a
    0xFF byte, guest-fsfreeze-freeze/thaw answered with a count (or an
    error when fail_freeze); every command is logged with its time."""

    def __init__(self, path, fail_freeze=False):
        if os.path.exists(path):
            os.unlink(path)
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(path)
        self.srv.listen(4)
        self.log = []
        self.fail_freeze = fail_freeze
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn:
                for line in conn.makefile("rb"):
                    msg = json.loads(line)
                    cmd, cid = msg.get("execute"), msg.get("id")
                    self.log.append((cmd, time.time()))
                    if cmd == "guest-sync-delimited":
                        out = b"\xff" + json.dumps(
                            {"return": msg["arguments"]["id"], "id": cid}).encode()
                    elif cmd == "guest-fsfreeze-freeze" and self.fail_freeze:
                        out = json.dumps({"error": {"class": "GenericError",
                                          "desc": "fsfreeze is busy"},
                                          "id": cid}).encode()
                    else:
                        out = json.dumps({"return": 1, "id": cid}).encode()
                    conn.sendall(out + b"\n")

    def close(self):
        self.srv.close()


def test_guest_frozen_for_the_instant(live, tmp_path):
    q = live.qsd(make_image(live.path("d.qcow2"), SIZE))
    agent = FakeAgent(str(tmp_path / "qga.sock"))
    bk = live.path("bk")
    os.mkdir(bk)
    try:
        cbt("backup", "--qmp", q.cbt_qmp, "--qga", str(tmp_path / "qga.sock"),
            "--full", "vm", os.path.join(bk, "f.qcow2"))
    finally:
        agent.close()
    cmds = [c for c, _ in agent.log if c != "guest-sync-delimited"]
    assert cmds == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"], agent.log
    # The fleecing job (the instant) started while the guest was frozen.
    ev = q.wait_event("JOB_STATUS_CHANGE", status="created")
    t = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
    frozen = dict((c, ts) for c, ts in agent.log)
    assert frozen["guest-fsfreeze-freeze"] <= t <= frozen["guest-fsfreeze-thaw"], \
        (agent.log, t)


def test_guest_freeze_failing_stops_the_backup(live, tmp_path):
    q = live.qsd(make_image(live.path("d.qcow2"), SIZE))
    agent = FakeAgent(str(tmp_path / "qga.sock"), fail_freeze=True)
    bk = live.path("bk")
    os.mkdir(bk)
    try:
        res = cbt("backup", "--qmp", q.cbt_qmp, "--qga",
                  str(tmp_path / "qga.sock"), "--full", "vm",
                  os.path.join(bk, "f.qcow2"), check=False)
    finally:
        agent.close()
    assert res.rc != 0 and "fsfreeze is busy" in res.err, res
    assert ("guest-fsfreeze-thaw" in [c for c, _ in agent.log]), agent.log
    assert os.listdir(bk) == []
    assert not [b for n in q.qmp("query-named-block-nodes", flat=True)
                for b in n.get("dirty-bitmaps", [])], "a checkpoint stayed"
