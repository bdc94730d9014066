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
# The work is done by bench/livechain.py.  This wrapper (with bench/lib.sh)
# makes the work folders and, whatever happens, ends every process the
# benchmark started (by PID, from the list livechain.py keeps) and removes
# its files.
set -euo pipefail

# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

bench_cbt_arg "$@"
bench_need qemu-img qemu-io qemu-storage-daemon "$PY"
bench_need_nbd
bench_run_driver livechain "$bench_here/livechain.py"
