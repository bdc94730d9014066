"""Helpers the benchmarks share (bench/backup.sh, bench/rescan.sh,
bench/live.py): errors, commands, sizes, the test disk's content and its
changes, a QMP client for qemu-storage-daemon, and a walk of NBD block
status over several metadata contexts at once."""
import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import time

MIB = 1 << 20
CLUSTER = 65536


def die(msg):
    print("bench: " + msg, file=sys.stderr)
    sys.exit(1)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(argv, **kw):
    """Run a command; on failure show its output and stop the benchmark."""
    p = subprocess.run(argv, stdin=kw.pop("stdin", subprocess.DEVNULL),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       **kw)
    if p.returncode != 0:
        out = p.stdout.decode(errors="replace").strip().splitlines()
        die("%s failed (exit %d)%s" % (
            shlex.join(argv), p.returncode,
            (":\n  " + "\n  ".join(out[-8:])) if out else ""))
    return p.stdout.decode(errors="replace")


def parse_size(s, multiple=MIB):
    """BENCH_SIZE: a positive multiple of `multiple` (4G, 256M...)."""
    m = re.fullmatch(r"(\d+)([kKMGT]?)", s)
    if not m:
        die("BENCH_SIZE must look like 4G or 256M")
    n = int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
    if n == 0 or n % multiple:
        die("BENCH_SIZE must be a positive multiple of %dM"
            % (multiple // MIB))
    return n


def human(n):
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return "%.1f %s" % (n / k, unit)
    return "%d B" % n


TEXT = (b"The quick brown fox jumps over the lazy dog. cbt backs up disks. "
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do "
        b"eiusmod tempor incididunt ut labore et dolore magna aliqua.\n")


def make_disk(work, path, size, seed):
    """A disk with mixed content, per 1 MiB chunk: 50% random data, 15%
    text, 10% zero bytes written as data, 25% never written."""
    rng = random.Random(seed)
    raw = os.path.join(work, "content.raw")
    kinds = {"random": 0, "text": 0, "zero-data": 0, "unallocated": 0}
    zero_cmds = []
    words = TEXT.split(b" ")
    with open(raw, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MIB):
            r = rng.random()
            if r < 0.50:
                kinds["random"] += 1
                f.seek(off)
                f.write(rng.randbytes(MIB))
            elif r < 0.65:
                kinds["text"] += 1
                lines = []
                n = 0
                while n < MIB:
                    ln = b" ".join(rng.choice(words)
                                   for _ in range(12)).strip() + b"\n"
                    lines.append(ln)
                    n += len(ln)
                f.seek(off)
                f.write(b"".join(lines)[:MIB])
            elif r < 0.75:
                kinds["zero-data"] += 1
                zero_cmds.append("write -q -P 0 %d 1M\n" % off)
            else:
                kinds["unallocated"] += 1
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path])
    os.unlink(raw)
    with open(os.path.join(work, "zero.cmds"), "w") as f:
        f.writelines(zero_cmds)
    with open(os.path.join(work, "zero.cmds")) as f:
        run(["qemu-io", "-f", "qcow2", path], stdin=f)
    return kinds


def dirty_commands(size, percent, seed):
    """qemu-io commands dirtying percent% of the 64 KiB clusters at random
    (seeded) offsets: 90% pattern writes, 10% zero writes."""
    rng = random.Random(seed)
    clusters = size // CLUSTER
    n = max(1, clusters * percent // 100)
    picked = sorted(rng.sample(range(clusters), n))
    cmds = []
    for i, c in enumerate(picked):
        if rng.random() < 0.1:
            cmds.append("write -q -z %d 64k\n" % (c * CLUSTER))
        else:
            cmds.append("write -q -P 0x%02x %d 64k\n"
                        % (i % 255 + 1, c * CLUSTER))
    return cmds, n


def top_layer(path):
    """The clusters a qcow2 image's own layer holds (qemu-img map):
    [(start, length, True for data / False for zero clusters)]."""
    out = []
    for e in json.loads(run(["qemu-img", "map", "--output=json", "-f",
                             "qcow2", path])):
        if e["depth"] == 0 and (e["data"] or e["zero"]):
            out.append((e["start"], e["length"], bool(e["data"])))
    return out


class QMP:
    """One QMP connection to a qemu-storage-daemon this script started
    (proc): commands run one at a time (keyword names dashed: node_name=
    is node-name), events are queued until wait_event takes them."""

    def __init__(self, path, proc):
        deadline = time.monotonic() + 30
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    die("qemu-storage-daemon did not start (exit %s)"
                        % proc.poll())
                time.sleep(0.001)
        self.f = self.sock.makefile("rwb")
        self.events = []
        self.id = 0
        self.recv()  # greeting
        self.cmd("qmp_capabilities")

    def recv(self):
        line = self.f.readline()
        if not line:
            die("qemu-storage-daemon closed the QMP connection")
        return json.loads(line)

    def cmd(self, command, /, **arguments):
        self.id += 1
        msg = {"execute": command, "id": self.id}
        if arguments:
            msg["arguments"] = {k.replace("_", "-"): v
                                for k, v in arguments.items()}
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = self.recv()
            if "event" in r:
                self.events.append(r)
            elif r.get("id") == self.id:
                if "error" in r:
                    die("QMP %s: %s" % (command, r["error"].get("desc")))
                return r["return"]

    def wait_event(self, event, /, **match):
        """The first queued event EVENT whose data has the given values."""
        while True:
            for i, e in enumerate(self.events):
                d = e.get("data", {})
                if e["event"] == event and all(d.get(k) == v
                                               for k, v in match.items()):
                    return self.events.pop(i)
            self.events.append(self.recv())

    def close(self):
        self.sock.close()


def nbd_extents(h, size, contexts):
    """Walk block status over [0, size) (requests of up to 1 GiB) and yield
    (start, end, {ctx: flags}) segments where every context's flags are
    constant."""
    off = 0
    while off < size:
        got = {c: [] for c in contexts}

        def cb(meta, start, entries, err, got=got):
            if meta in got:
                pos = start
                for i in range(0, len(entries), 2):
                    got[meta].append((pos, pos + entries[i], entries[i + 1]))
                    pos += entries[i]
            return 0

        h.block_status(min(size - off, 1 << 30), off, cb)
        if any(not got[c] for c in contexts):
            raise RuntimeError("server sent no extents at %d" % off)
        end = min(got[c][-1][1] for c in contexts)
        # Split at every boundary of every context.
        cuts = sorted({off, end} | {e for c in contexts for (_, e, _) in got[c]
                                    if off < e < end})
        idx = {c: 0 for c in contexts}
        for a, b in zip(cuts, cuts[1:]):
            flags = {}
            for c in contexts:
                lst = got[c]
                while lst[idx[c]][1] <= a:
                    idx[c] += 1
                flags[c] = lst[idx[c]][2]
            yield a, b, flags
        off = end
