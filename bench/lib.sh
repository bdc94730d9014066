# Shell helpers of the bench wrappers (sourced, after `set -euo pipefail`):
# the CBT_BINARY argument, the tools a benchmark needs, and running a
# Python driver (live.py, livechain.py) in its own work folder with, whatever
# happens (an error, Ctrl-C, SIGTERM), every process it started ended and
# its files removed.

bench_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-/usr/bin/python3}

# bench_cbt_arg "$@": the one argument, CBT_BINARY, as an absolute path in
# CBT; a usage error (exit 2) otherwise.
bench_cbt_arg() {
    if [ $# -ne 1 ]; then
        echo "usage: $0 CBT_BINARY" >&2
        exit 2
    fi
    CBT=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
}

# bench_need TOOL...: every TOOL on the PATH and $CBT executable, else
# exit 1 saying which is missing.
bench_need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || {
            echo "bench: $tool not found (run scripts/install-deps.sh)" >&2
            exit 1
        }
    done
    [ -x "$CBT" ] || { echo "bench: $CBT is not executable" >&2; exit 1; }
}

# bench_need_nbd: $PY has the libnbd bindings, else exit 1.
bench_need_nbd() {
    "$PY" -c 'import nbd' 2>/dev/null || {
        echo "bench: $PY has no libnbd bindings (python3-libnbd; set PYTHON)" >&2
        exit 1
    }
}

bench_pid=""

bench_cleanup() {
    local p stat
    if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
        kill -TERM "$bench_pid" 2>/dev/null || true
        wait "$bench_pid" 2>/dev/null || true
    fi
    # What the driver could not end itself (it was killed): its children,
    # each only if its PID still names the process it started.
    if [ -f "$bench_pidfile" ]; then
        while read -r p start; do
            stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
            # shellcheck disable=SC2086
            set -- ${stat##*) }
            if [ "${20:-}" = "$start" ]; then
                kill -KILL "$p" 2>/dev/null || true
            fi
        done <"$bench_pidfile"
    fi
    rm -rf "$bench_work" "$bench_sockdir"
    rmdir "$bench_here/work" 2>/dev/null || true
}

# bench_run_driver NAME SCRIPT [ARG...]: run $PY SCRIPT ARG... CBT WORK
# SOCKDIR PIDFILE, WORK being bench/work/NAME (git-ignored), SOCKDIR a short
# temporary folder for its unix sockets (their paths are limited to 108
# bytes), PIDFILE where the driver lists "PID STARTTIME" of the processes it
# starts.  Its exit status is the script's; call it last.
bench_run_driver() {
    local name=$1 script=$2
    shift 2
    bench_work="$bench_here/work/$name"
    rm -rf "$bench_work"
    mkdir -p "$bench_work"
    bench_sockdir=$(mktemp -d "${TMPDIR:-/tmp}/cbt-$name-bench.XXXXXX")
    bench_pidfile="$bench_work/pids"
    : >"$bench_pidfile"
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    # In the background so that the traps run at once; the driver turns
    # SIGTERM into its own orderly cleanup (the finally of its main).
    "$PY" "$script" "$@" "$CBT" "$bench_work" "$bench_sockdir" \
        "$bench_pidfile" &
    bench_pid=$!
    wait "$bench_pid"
}
