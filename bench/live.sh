#!/bin/bash
# Benchmark cbt's live backup (cbt backup --qmp, a pull over NBD) against
# QEMU doing the same job, in the same run, with a guest writing during
# every job; report medians and ratios (cbt / reference: below 1 means
# cbt is faster):
#   1. cbt's live incremental vs QEMU's own push job (blockdev-backup
#      sync=incremental into a qcow2 overlay, transaction to durable target);
#   2. vs a libnbd pull reader of the same dirty extents from the same kind
#      of export (no hashing, nothing written): 16 requests in flight, and
#      one at a time;
#   3. vs dd conv=fdatasync of the dirty byte count (the machine's durable
#      copy bandwidth);
#   4. the guest's write latency during each job and with no job.
# Usage: bench/live.sh CBT_BINARY
# Environment:
#   BENCH_SIZE        virtual disk size (default 4G; a multiple of 64M)
#   BENCH_RUNS        runs per job and route; the median is reported (3)
#   BENCH_WARMUP      untimed rounds before the timed ones (1)
#   BENCH_DIRTY       dirty percentages, increasing (default "1 10")
#   BENCH_WRITE_RATE  the guest's 64 KiB writes per second (200)
#   BENCH_IDLE        seconds of the no-job latency window per round (2)
#   BENCH_SEED        seed of the content, the dirty set, the guest (1)
#   PYTHON            an interpreter with the libnbd bindings
#                     (default /usr/bin/python3; package python3-libnbd)
# The work is done by bench/live.py.  This wrapper makes the work folders
# and, whatever happens (an error, Ctrl-C, SIGTERM), ends every process the
# benchmark started (by PID, from the list live.py keeps) and removes its
# files.  See bench/README.md.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 CBT_BINARY" >&2
    exit 2
fi
CBT=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
PY=${PYTHON:-/usr/bin/python3}
here=$(cd "$(dirname "$0")" && pwd)

for tool in qemu-img qemu-storage-daemon dd "$PY"; do
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

work="$here/work/live"                 # bench/work/ is git-ignored
rm -rf "$work"
mkdir -p "$work"
# Unix socket paths are limited to 108 bytes: a short folder for them.
sockdir=$(mktemp -d "${TMPDIR:-/tmp}/cbt-live-bench.XXXXXX")
pidfile="$work/pids"
: >"$pidfile"
pid=""

cleanup() {
    local p
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    # What live.py could not end itself (it was killed): its children,
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

# In the background so that the traps run at once; live.py turns SIGTERM
# into its own orderly cleanup (the finally of its main).
"$PY" "$here/live.py" main "$CBT" "$work" "$sockdir" "$pidfile" &
pid=$!
wait "$pid"
