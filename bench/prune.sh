#!/bin/bash
# Benchmark cbt repo prune's merge against qemu-img commit doing the same
# job in the same run: a full backup of a BENCH_SIZE disk (every cluster
# data) and one incremental changing BENCH_DIRTY percent of its 64 KiB
# clusters (seeded random clusters); the incremental's clusters are written
# into the full's image.
#   cbt:  cbt repo prune --keep-last 1 --force BK
#         (merges full.qcow2 into inc.qcow2: inc's clusters written into
#         the full's image, which then replaces inc's; manifests rewritten;
#         every step journalled and fsync'ed)
#   qemu: qemu-img commit -d -f qcow2 -t writeback BK/inc.qcow2
#         (inc's clusters written into full.qcow2; -d: inc is not emptied,
#         so both write the same bytes; writeback flushes at the end)
# Each timed run starts from a fresh copy of the two files (copying is not
# timed); the median of BENCH_RUNS runs is reported, and the ratio
# cbt / qemu-img (below 1: cbt is faster).  After the runs both results are
# checked to read as the incremental did (qemu-img compare).
# Usage: bench/prune.sh CBT_BINARY
# Environment: BENCH_SIZE (default 4G), BENCH_DIRTY (percent, default 5),
#   BENCH_RUNS (default 3), BENCH_SEED (default 1).  Needs about
#   4 x BENCH_SIZE of free space in bench/work-prune/ (removed at the end).
set -euo pipefail
CBT=$(readlink -f "${1:?usage: bench/prune.sh CBT_BINARY}")
SIZE=${BENCH_SIZE:-4G}
DIRTY=${BENCH_DIRTY:-5}
RUNS=${BENCH_RUNS:-3}
SEED=${BENCH_SEED:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
W="$HERE/work-prune"
rm -rf "$W"
mkdir -p "$W/src/bk"
trap 'rm -rf "$W"' EXIT
cd "$W"

log() { echo "$*" >&2; }

log "== making a $SIZE disk, every cluster data"
qemu-img create -q -f qcow2 src/disk.qcow2 "$SIZE"
bytes=$(qemu-img info --output=json src/disk.qcow2 |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
python3 - "$bytes" > fill.cmds <<'EOF'
import sys
size = int(sys.argv[1])
step = 64 << 20
for off in range(0, size, step):
    print("write -q -P %d %d %d" % (1 + (off // step) % 250, off, min(step, size - off)))
EOF
qemu-io -f qcow2 src/disk.qcow2 < fill.cmds > /dev/null
"$CBT" backup --full src/disk.qcow2 src/bk/full.qcow2 > /dev/null
python3 - "$bytes" "$DIRTY" "$SEED" > dirty.cmds <<'EOF'
import random, sys
size, pct, seed = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
n = size // 65536
pick = random.Random(seed).sample(range(n), int(n * pct / 100))
for c in sorted(pick):
    print("write -q -P %d %d 65536" % (1 + c % 251, c * 65536))
EOF
qemu-io -f qcow2 src/disk.qcow2 < dirty.cmds > /dev/null
"$CBT" backup --incremental src/disk.qcow2 src/bk/inc.qcow2 > /dev/null
qemu-img convert -O raw src/bk/inc.qcow2 view.raw
ndirty=$(wc -l < dirty.cmds)
log "== $ndirty dirty clusters ($DIRTY%) of $((bytes / 65536))"

fresh() {
    rm -rf "$W/run"
    mkdir -p "$W/run"
    cp --sparse=always src/bk/* "$W/run/"
    sync
}

now() { date +%s.%N; }

cbt_times=()
qemu_times=()
for i in $(seq 1 "$RUNS"); do
    fresh
    t0=$(now)
    "$CBT" repo prune --keep-last 1 --force "$W/run" > /dev/null
    t1=$(now)
    cbt_times+=("$(echo "$t1 - $t0" | bc)")
    qemu-img compare -q -f qcow2 -F raw "$W/run/inc.qcow2" view.raw
    "$CBT" verify "$W/run/inc.qcow2" > /dev/null

    fresh
    t0=$(now)
    qemu-img commit -q -d -f qcow2 -t writeback "$W/run/inc.qcow2"
    t1=$(now)
    qemu_times+=("$(echo "$t1 - $t0" | bc)")
    qemu-img compare -q -f qcow2 -F raw "$W/run/full.qcow2" view.raw
    log "run $i: cbt ${cbt_times[-1]} s, qemu-img ${qemu_times[-1]} s"
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mc=$(median "${cbt_times[@]}")
mq=$(median "${qemu_times[@]}")
ratio=$(echo "scale=2; $mc / $mq" | bc)
echo "merge an incremental ($DIRTY% of clusters) into a $SIZE full, median of $RUNS:"
echo "  cbt repo prune --keep-last 1 --force BK            ${mc} s"
echo "  qemu-img commit -d -f qcow2 -t writeback BK/inc    ${mq} s"
echo "  ratio cbt / qemu-img                               ${ratio}"
