#!/bin/bash
# Benchmark cbt's chain operations against qemu-img doing the same jobs in
# the same run: commit, stream (qemu-img rebase -b ''), convert to qcow2 and
# to raw.
# Usage: bench/chains.sh CBT_BINARY
# Environment:
#   BENCH_SIZE         virtual disk size (default 4G; 256M for a quick try)
#   BENCH_RUNS         runs per job and tool; the median is reported (3)
#   BENCH_DROP_CACHES  auto (default): drop the page cache before each timed
#                      run when /proc/sys/vm/drop_caches is writable (root),
#                      else run with a warm cache; 1: drop or fail; 0: never
# Each tool runs as its own process with its default options; stdout and
# stderr go to a file that is shown when the tool fails.  Wall time is
# measured around the whole process.  See bench/README.md.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 CBT_BINARY" >&2
    exit 2
fi
CBT=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
SIZE=${BENCH_SIZE:-4G}
RUNS=${BENCH_RUNS:-3}
DROP=${BENCH_DROP_CACHES:-auto}
here=$(cd "$(dirname "$0")" && pwd)
work="$here/work/chains"   # bench/work/ is git-ignored

for tool in qemu-img qemu-io python3; do
    command -v "$tool" >/dev/null || {
        echo "bench: $tool not found (run scripts/install-deps.sh)" >&2
        exit 1
    }
done
[ -x "$CBT" ] || { echo "bench: $CBT is not executable" >&2; exit 1; }

size_bytes=$(python3 - "$SIZE" <<'PY'
import re, sys
m = re.fullmatch(r"(\d+)([kKMGT]?)", sys.argv[1])
if not m:
    sys.exit("bench: BENCH_SIZE must look like 4G or 256M")
size = int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
if size % (8 << 20) or size == 0:
    sys.exit("bench: BENCH_SIZE must be a positive multiple of 8M")
print(size)
PY
)

case $DROP in
auto)
    if [ -w /proc/sys/vm/drop_caches ] && sync && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
        DROP=1
    else
        DROP=0
    fi ;;
1)
    sync && echo 3 >/proc/sys/vm/drop_caches ||
        { echo "bench: cannot drop the page cache (BENCH_DROP_CACHES=1; root needed)" >&2; exit 1; } ;;
0) ;;
*) echo "bench: BENCH_DROP_CACHES must be auto, 0 or 1" >&2; exit 1 ;;
esac
if [ "$DROP" = 1 ]; then
    CACHE="cold cache (page cache dropped before each timed run)"
else
    CACHE="warm cache (the page cache is not dropped: not root, or BENCH_DROP_CACHES=0)"
fi

rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"; rmdir "$here/work" 2>/dev/null || true' EXIT

now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {
    if (NR % 2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2 }'; }

# Untimed: every write is on disk and, when allowed, out of the page cache.
settle() {
    sync
    if [ "$DROP" = 1 ]; then echo 3 >/proc/sys/vm/drop_caches; fi
}

# fill IMG PATTERN STEP LEN: write LEN bytes of PATTERN at every STEP (qemu-io).
fill() {
    python3 - "$size_bytes" "$2" "$3" "$4" >"$work/fill.cmds" <<'PY'
import sys
size, pat, step, length = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for off in range(0, size, step):
    for o in range(off, min(off + length, size), 1 << 20):
        print("write -q -P %s %d %d" % (pat, o, min(1 << 20, off + length - o, size - o)))
PY
    qemu-io -f qcow2 -t writeback "$1" <"$work/fill.cmds" >"$work/fill.out" 2>&1 ||
        { cat "$work/fill.out" >&2; exit 1; }
    if grep -q -v -E '^(qemu-io> )*$' "$work/fill.out"; then
        head -5 "$work/fill.out" >&2
        exit 1
    fi
}

# ---- templates (untimed, built once) ----
echo "bench: building the templates ($SIZE)..." >&2
t="$work/tmpl"
mkdir -p "$t"
MiB=$((1 << 20))
# A fully written base layer: the streamed layer and the bottom of the chain.
qemu-img create -q -f qcow2 "$t/base.qcow2" "$size_bytes"
fill "$t/base.qcow2" 0x11 "$MiB" "$MiB"
# Three-layer chain for convert: base <- mid (every 4th MiB) <- top
# (256 KiB at +512 KiB of every 8th MiB).
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$t/mid.qcow2"
fill "$t/mid.qcow2" 0x22 $((4 * MiB)) "$MiB"
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$t/top.qcow2"
python3 - "$size_bytes" >"$work/top.cmds" <<'PY'
import sys
size = int(sys.argv[1])
for off in range(0, size, 8 << 20):
    print("write -q -P 0x33 %d 256k" % (off + (512 << 10)))
PY
qemu-io -f qcow2 -t writeback "$t/top.qcow2" <"$work/top.cmds" >/dev/null
# The commit job's layer: fully written, over an empty base (made per run).
qemu-img create -q -f qcow2 "$t/empty.qcow2" "$size_bytes"
qemu-img create -q -f qcow2 -b empty.qcow2 -F qcow2 "$t/layer.qcow2"
fill "$t/layer.qcow2" 0x5a "$MiB" "$MiB"

# ---- jobs ----
declare -A RESULT RUNLOG
# Per job: setup_NAME DIR (untimed), cmd_NAME TOOL DIR (prints argv, one per
# line), verify_NAME (both tools' last results, untimed).
setup_commit() {
    qemu-img create -q -f qcow2 "$1/base.qcow2" "$size_bytes"
    cp "$t/layer.qcow2" "$1/top.qcow2"
    qemu-img rebase -u -f qcow2 -b base.qcow2 -F qcow2 "$1/top.qcow2"
}
argv_commit() {
    if [ "$1" = cbt ]; then A=("$CBT" commit "$2/top.qcow2")
    else A=(qemu-img commit "$2/top.qcow2"); fi
}
verify_commit() {
    for tool in cbt qemu; do
        qemu-img check -q "$work/$tool/base.qcow2" || return 1
        qemu-img check -q "$work/$tool/top.qcow2" || return 1
    done
    qemu-img compare -q -f qcow2 -F qcow2 "$work/cbt/base.qcow2" "$work/qemu/base.qcow2" &&
        qemu-img compare -q -f qcow2 -F qcow2 "$work/cbt/base.qcow2" "$t/layer.qcow2" &&
        qemu-img compare -q -f qcow2 -F qcow2 "$work/cbt/top.qcow2" "$t/layer.qcow2"
}

setup_stream() {
    ln -f "$t/base.qcow2" "$1/base.qcow2"  # only read
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$1/top.qcow2"
}
argv_stream() {
    if [ "$1" = cbt ]; then A=("$CBT" stream "$2/top.qcow2")
    else A=(qemu-img rebase -b '' "$2/top.qcow2"); fi
}
verify_stream() {
    for tool in cbt qemu; do
        qemu-img check -q "$work/$tool/top.qcow2" || return 1
        if qemu-img info "$work/$tool/top.qcow2" | grep -q '^backing file:'; then
            echo "bench: stream: $tool's top still has a backing file" >&2
            return 1
        fi
    done
    qemu-img compare -q -f qcow2 -F qcow2 "$work/cbt/top.qcow2" "$work/qemu/top.qcow2" &&
        qemu-img compare -q -f qcow2 -F qcow2 "$work/cbt/top.qcow2" "$t/base.qcow2"
}

setup_convert() {
    for f in base mid top; do ln -f "$t/$f.qcow2" "$1/$f.qcow2"; done  # only read
}
setup_convert_qcow2() { setup_convert "$@"; }
setup_convert_raw() { setup_convert "$@"; }
argv_convert_qcow2() {
    if [ "$1" = cbt ]; then A=("$CBT" convert -O qcow2 "$2/top.qcow2" "$2/out.qcow2")
    else A=(qemu-img convert -O qcow2 "$2/top.qcow2" "$2/out.qcow2"); fi
}
argv_convert_raw() {
    if [ "$1" = cbt ]; then A=("$CBT" convert -O raw "$2/top.qcow2" "$2/out.raw")
    else A=(qemu-img convert -O raw "$2/top.qcow2" "$2/out.raw"); fi
}
verify_convert_qcow2() {
    qemu-img check -q "$work/cbt/out.qcow2" &&
        qemu-img compare -q -f qcow2 -F qcow2 "$work/cbt/out.qcow2" "$work/qemu/out.qcow2" &&
        qemu-img compare -q -f qcow2 -F qcow2 "$work/cbt/out.qcow2" "$t/top.qcow2"
}
verify_convert_raw() {
    cmp -s "$work/cbt/out.raw" "$work/qemu/out.raw" &&
        qemu-img compare -q -f raw -F qcow2 "$work/cbt/out.raw" "$t/top.qcow2"
}

# job NAME: RUNS runs per tool, alternating which goes first.
job() {
    local name=$1 i tool t0 t1 rc dt
    local -a tc tq
    for ((i = 0; i < RUNS; i++)); do
        local order=(cbt qemu)
        [ $((i % 2)) -eq 1 ] && order=(qemu cbt)
        for tool in "${order[@]}"; do
            local d="$work/$tool"
            rm -rf "$d"
            mkdir -p "$d"
            "setup_$name" "$d"
            "argv_$name" "$tool" "$d"
            settle
            rc=0
            t0=$(now)
            "${A[@]}" >"$work/out.txt" 2>&1 || rc=$?
            t1=$(now)
            if [ $rc -ne 0 ]; then
                echo "bench: $name: $tool failed (exit $rc): ${A[*]}" >&2
                head -5 "$work/out.txt" >&2
                exit 1
            fi
            dt=$(python3 -c "print('%.3f' % ($t1 - $t0))")
            if [ "$tool" = cbt ]; then tc+=("$dt"); else tq+=("$dt"); fi
        done
        echo "  $name run $((i + 1))/$RUNS: cbt ${tc[-1]} s, qemu-img ${tq[-1]} s" >&2
        RUNLOG[$name]+="${RUNLOG[$name]:+ | }${tc[-1]} / ${tq[-1]}"
    done
    # The last results must be right and agree: a fast wrong answer fails.
    if ! "verify_$name"; then
        echo "bench: $name: cbt's result is wrong or differs from qemu-img's" >&2
        exit 1
    fi
    rm -rf "$work/cbt" "$work/qemu"
    RESULT[$name]="$(median "${tc[@]}") $(median "${tq[@]}")"
}

echo "bench: size $SIZE, $RUNS runs per job, $CACHE" >&2
JOBS=(commit stream convert_qcow2 convert_raw)
for name in "${JOBS[@]}"; do job "$name"; done

label() {
    case $1 in
    commit) echo "(e) commit of a fully written $SIZE layer into an empty base" ;;
    stream) echo "(f) stream of a fully written $SIZE backing layer into an empty overlay" ;;
    convert_qcow2) echo "(g) convert of a 3-layer $SIZE chain to qcow2" ;;
    convert_raw) echo "(h) convert of a 3-layer $SIZE chain to raw" ;;
    esac
}

echo
echo "| job | cbt s | qemu-img s | ratio cbt/qemu-img |"
echo "|---|---:|---:|---:|"
for name in "${JOBS[@]}"; do
    read -r c q <<<"${RESULT[$name]}"
    ratio=$(python3 -c "print('%.2f' % ($c / $q) if $q > 0 else 'n/a')")
    echo "| $(label "$name") | $c | $q | $ratio |"
done
echo
echo "Individual runs (cbt / qemu-img, seconds):"
echo
for name in "${JOBS[@]}"; do
    echo "    $name: ${RUNLOG[$name]}"
done
cat <<EOF2

Median wall time of $RUNS runs (the whole process), $CACHE.
Every run gets fresh images (untimed), then sync$([ "$DROP" = 1 ] && echo " and drop_caches");
file names are in the run's folder (bench/work/chains/TOOL/):

    (e) base.qcow2: qemu-img create -f qcow2 base.qcow2 $SIZE (empty)
        top.qcow2:  backed by base.qcow2, every byte written (0x5a)
        $CBT commit top.qcow2
        qemu-img commit top.qcow2
    (f) base.qcow2: every byte written (0x11); top.qcow2: empty, backed by it
        $CBT stream top.qcow2
        qemu-img rebase -b '' top.qcow2
        (qemu-img has no offline stream; a safe rebase onto no backing file
        copies the same data: everything top.qcow2 reads from its chain)
    (g) base.qcow2 (every byte, 0x11) <- mid.qcow2 (every 4th MiB, 0x22)
        <- top.qcow2 (256 KiB at +512 KiB of every 8th MiB, 0x33)
        $CBT convert -O qcow2 top.qcow2 out.qcow2
        qemu-img convert -O qcow2 top.qcow2 out.qcow2
    (h) the same chain
        $CBT convert -O raw top.qcow2 out.raw
        qemu-img convert -O raw top.qcow2 out.raw

Default options for both tools.  qemu-img convert's default cache mode for
the target is "unsafe": it issues no fdatasync for a raw target (strace,
QEMU 7.2), so its data may still be in the page cache when it exits; cbt
convert syncs its target before exiting (so (h) favours qemu-img).
qemu-img commit and rebase use writeback and flush.  Checked in the same
run: qemu-img check on cbt's results, qemu-img compare against qemu-img's
results and the source.
EOF2
