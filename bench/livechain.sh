#!/bin/bash
# Benchmark cbt's live chain operations (cbt snapshot|commit|stream|copy
# --qmp) against the same QEMU job driven by a plain QMP client without any
# bitmap handling, in the same run on the same state; report medians, the
# ratio cbt / plain QMP and the difference in milliseconds (what cbt's
# bitmap work, its own connection and the disk's lookup add).
# Usage: bench/livechain.sh CBT_BINARY
# Environment:
#   BENCH_SIZE         virtual disk size (default 1G; a multiple of 1M)
#   BENCH_LAYER_DATA   the guest's writes into each of two overlays (64M)
#   BENCH_CHECKPOINTS  checkpoints on the disk (4)
#   BENCH_RUNS         runs per operation and route; the median (3)
#   BENCH_OPS          the operations (snapshot commit commit-mid stream copy)
#   PYTHON             an interpreter with the libnbd bindings
#                      (default /usr/bin/python3; package python3-libnbd)
# The work is done by bench/livechain.py.  This wrapper makes the work
# folders and, whatever happens, ends every process the benchmark started
# (by PID, from the list livechain.py keeps) and removes its files.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 CBT_BINARY" >&2
    exit 2
fi
CBT=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
PY=${PYTHON:-/usr/bin/python3}
here=$(cd "$(dirname "$0")" && pwd)

for tool in qemu-img qemu-io qemu-storage-daemon "$PY"; do
    command -v "$tool" >/dev/null || {
        echo "bench: $tool not found (run scripts/install-deps.sh)" >&2
        exit 1
    }
done
[ -x "$CBT" ] || { echo "bench: $CBT is not executable" >&2; exit 1; }
"$PY" -c 'import nbd' 2>/dev/null || {
    echo "bench: $PY has no libnbd bindings (python3-libnbd; set PYTHON)" >&2
    exit 1
}

work="$here/work/livechain"                 # bench/work/ is git-ignored
rm -rf "$work"
mkdir -p "$work"
# Unix socket paths are limited to 108 bytes: a short folder for them.
sockdir=$(mktemp -d "${TMPDIR:-/tmp}/cbt-lc-bench.XXXXXX")
pidfile="$work/pids"
: >"$pidfile"
pid=""

cleanup() {
    local p
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    # What livechain.py could not end itself (it was killed): its children,
    # each only if its PID still names the process it started.
    if [ -f "$pidfile" ]; then
        while read -r p start; do
            stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
            # shellcheck disable=SC2086
            set -- ${stat##*) }
            if [ "${20:-}" = "$start" ]; then
                kill -KILL "$p" 2>/dev/null || true
            fi
        done <"$pidfile"
    fi
    rm -rf "$work" "$sockdir"
    rmdir "$here/work" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# In the background so that the traps run at once; livechain.py turns SIGTERM
# into its own orderly cleanup (the finally of its main).
"$PY" "$here/livechain.py" "$CBT" "$work" "$sockdir" "$pidfile" &
pid=$!
wait "$pid"
