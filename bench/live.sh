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
#   BENCH_CBT_BASE    another cbt binary (main before a change, say): one
#                     more route, its pull incremental, in the same rounds
#   PYTHON            an interpreter with the libnbd bindings
#                     (default /usr/bin/python3; package python3-libnbd)
# The work is done by bench/live.py.  This wrapper (with bench/lib.sh)
# makes the work folders and, whatever happens (an error, Ctrl-C, SIGTERM),
# ends every process the benchmark started (by PID, from the list live.py
# keeps) and removes its files.  See bench/README.md.
set -euo pipefail

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

bench_cbt_arg "$@"
bench_need qemu-img qemu-storage-daemon dd "$PY"
bench_need_nbd
bench_run_driver live "$bench_here/live.py" main
