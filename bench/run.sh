#!/bin/bash
# Benchmark `cbt io` against `qemu-io` doing the same jobs in the same run.
# Usage: bench/run.sh CBT_BINARY
# Environment:
#   BENCH_SIZE        virtual disk size (default 4G; 256M for a quick try)
#   BENCH_RUNS        runs per job and tool; the median is reported (5)
#   BENCH_RANDOM_OPS  random 4 KiB writes in jobs c and d (100000)
#   BENCH_SEED        seed of the random offsets (1)
# Both tools read the same command file on stdin and write their output to
# /dev/null.  Wall time is measured around the whole process (open, the
# commands, flush and close).  See bench/README.md.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 CBT_BINARY" >&2
    exit 2
fi
CBT=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
SIZE=${BENCH_SIZE:-4G}
RUNS=${BENCH_RUNS:-5}
RANDOM_OPS=${BENCH_RANDOM_OPS:-100000}
SEED=${BENCH_SEED:-1}
here=$(cd "$(dirname "$0")" && pwd)
work="$here/work"
# qemu-io's default cache mode is writethrough (an fdatasync after every
# write); writeback matches cbt, which does plain pwrite() and flushes once
# at close.
QEMU_IO=(qemu-io -f qcow2 -t writeback)
CBT_IO=("$CBT" io -f qcow2)

for tool in qemu-img qemu-io python3; do
    command -v "$tool" >/dev/null || {
        echo "bench: $tool not found (run scripts/install-deps.sh)" >&2
        exit 1
    }
done
[ -x "$CBT" ] || { echo "bench: $CBT is not executable" >&2; exit 1; }

rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

# ---- command files (both tools read the same ones) ----
python3 - "$work" "$SIZE" "$RANDOM_OPS" "$SEED" <<'PY'
import os, random, re, sys
work, size_s, nops, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
m = re.fullmatch(r"(\d+)([kKMGT]?)", size_s)
if not m:
    sys.exit("bench: BENCH_SIZE must look like 4G or 256M")
size = int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
if size % (1 << 20) or size == 0:
    sys.exit("bench: BENCH_SIZE must be a positive multiple of 1M")
mib = 1 << 20
with open(os.path.join(work, "seq-write.cmds"), "w") as f:
    for off in range(0, size, mib):
        f.write("write -q -P 0x5a %d 1M\n" % off)
with open(os.path.join(work, "seq-read.cmds"), "w") as f:
    for off in range(0, size, mib):
        f.write("read -q -P 0x5a %d 1M\n" % off)
rng = random.Random(seed)
slots = size // 4096
with open(os.path.join(work, "rand-write.cmds"), "w") as f:
    for i in range(nops):
        f.write("write -q -P 0x%02x %d 4k\n" % (i % 255 + 1, rng.randrange(slots) * 4096))
with open(os.path.join(work, "size"), "w") as f:
    f.write("%d\n" % size)
PY
size_bytes=$(cat "$work/size")

now() { date +%s.%N; }

# run_timed OUTVAR TOOL IMAGE CMDFILE: time one tool process; fail loudly.
run_timed() {
    local -n _out=$1
    local tool=$2 img=$3 cmds=$4 t0 t1 rc=0
    local -a argv
    if [ "$tool" = cbt ]; then argv=("${CBT_IO[@]}"); else argv=("${QEMU_IO[@]}"); fi
    t0=$(now)
    "${argv[@]}" "$img" <"$cmds" >"$work/out.txt" 2>&1 || rc=$?
    t1=$(now)
    # Both tools print nothing for -q commands that succeed; anything else
    # (an error, a failed pattern check) means the run is not valid.
    if [ $rc -ne 0 ] || grep -q -v -E '^(qemu-io> |cbt> )*$' "$work/out.txt"; then
        echo "bench: $tool failed on $(basename "$cmds") (exit $rc):" >&2
        grep -v -E '^(qemu-io> |cbt> )*$' "$work/out.txt" | head -5 >&2
        exit 1
    fi
    _out=$(python3 -c "print('%.3f' % ($t1 - $t0))")
}

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {
    if (NR % 2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2 }'; }

# Image setup for each job, untimed.  $1 = image path.
setup_empty() { qemu-img create -q -f qcow2 "$1" "$size_bytes"; }
setup_prealloc() {
    qemu-img create -q -f qcow2 -o preallocation=metadata "$1" "$size_bytes"
}
# Reads need no fresh copy: both tools read the one image qemu-io wrote.
setup_readsrc() { ln -f "$work/read-src.qcow2" "$1"; }

declare -A RESULT
# job NAME SETUP CMDFILE: RUNS runs per tool, alternating which goes first.
job() {
    local name=$1 setup=$2 cmds=$3 i t tool
    local -a tc tq
    for ((i = 0; i < RUNS; i++)); do
        local order=(cbt qemu)
        [ $((i % 2)) -eq 1 ] && order=(qemu cbt)
        for tool in "${order[@]}"; do
            rm -f "$work/$tool.qcow2"
            $setup "$work/$tool.qcow2"
            run_timed t "$tool" "$work/$tool.qcow2" "$work/$cmds"
            if [ "$tool" = cbt ]; then tc+=("$t"); else tq+=("$t"); fi
        done
        echo "  $name run $((i + 1))/$RUNS: cbt ${tc[-1]} s, qemu-io ${tq[-1]} s" >&2
    done
    # The last images must agree and cbt's must pass qemu-img check.
    qemu-img check -q -f qcow2 "$work/cbt.qcow2" ||
        { echo "bench: $name: cbt's image fails qemu-img check" >&2; exit 1; }
    qemu-img compare -q -f qcow2 -F qcow2 "$work/cbt.qcow2" "$work/qemu.qcow2" ||
        { echo "bench: $name: cbt's and qemu-io's images differ" >&2; exit 1; }
    RESULT[$name]="$(median "${tc[@]}") $(median "${tq[@]}")"
}

echo "bench: size $SIZE, $RUNS runs per job, $RANDOM_OPS random writes, seed $SEED" >&2
job "a" setup_empty seq-write.cmds
mv "$work/qemu.qcow2" "$work/read-src.qcow2"
cat "$work/read-src.qcow2" >/dev/null # hot page cache for both tools
job "b" setup_readsrc seq-read.cmds
job "c" setup_empty rand-write.cmds
job "d" setup_prealloc rand-write.cmds

label() {
    case $1 in
    a) echo "(a) sequential write, $SIZE in 1 MiB writes, fresh image" ;;
    b) echo "(b) sequential read, $SIZE in 1 MiB reads (hot cache)" ;;
    c) echo "(c) $RANDOM_OPS random 4 KiB writes, fresh $SIZE image" ;;
    d) echo "(d) $RANDOM_OPS random 4 KiB writes, preallocated $SIZE image" ;;
    esac
}

echo
echo "| job | cbt s | qemu-io s | ratio cbt/qemu-io |"
echo "|---|---:|---:|---:|"
for name in a b c d; do
    read -r c q <<<"${RESULT[$name]}"
    ratio=$(python3 -c "print('%.2f' % ($c / $q) if $q > 0 else 'n/a')")
    echo "| $(label $name) | $c | $q | $ratio |"
done
cat <<EOF2

Median wall time of $RUNS runs (whole process: open, commands, flush, close).
Commands (IMG is a fresh copy per run; command files are regenerated by
bench/run.sh with seed $SEED):

    ${CBT_IO[*]} IMG < CMDS > /dev/null
    ${QEMU_IO[*]} IMG < CMDS > /dev/null

    (a) IMG: qemu-img create -f qcow2 IMG $SIZE
        CMDS: write -q -P 0x5a OFF 1M     for OFF = 0, 1M, ... $SIZE-1M
    (b) IMG: the image qemu-io wrote in (a), read with a hot page cache
        CMDS: read -q -P 0x5a OFF 1M      (reads and verifies the pattern)
    (c) IMG: qemu-img create -f qcow2 IMG $SIZE
        CMDS: write -q -P 0xNN OFF 4k     $RANDOM_OPS times, OFF uniform over 4 KiB slots
    (d) IMG: qemu-img create -f qcow2 -o preallocation=metadata IMG $SIZE
        CMDS: same as (c)

qemu-io runs with -t writeback (its default is writethrough, an fdatasync
per write); cbt does plain pread/pwrite and flushes once at close.
EOF2
