#!/bin/bash
# Recreate this folder: a backup chain made by cbt before issue 14 (main at
# 23b3ff6, format sha256-blocks-v1), kept so that later code is tested
# against files it did not write.  Usage: make.sh OLD_CBT_BINARY
# The disk is 2 MiB + 7.5 KiB (a short last block), with pattern writes;
# full backup (checkpoint c0), writes, incremental (c1); disk.qcow2 is kept
# with its checkpoints so that a new incremental can be taken on top.
set -euo pipefail
CBT=$1
cd "$(dirname "$0")"
rm -f disk.qcow2 full.qcow2* inc.qcow2*
qemu-img create -q -f qcow2 disk.qcow2 $((2 * 1024 * 1024 + 7680))
qemu-io -f qcow2 disk.qcow2 -c "write -P 0x11 0 64k" \
    -c "write -P 0x22 300k 100k" -c "write -P 0x33 2096640 7680" >/dev/null
"$CBT" backup --full --checkpoint c0 disk.qcow2 full.qcow2 >/dev/null
qemu-io -f qcow2 disk.qcow2 -c "write -P 0x44 64k 64k" \
    -c "write -z 300k 8k" -c "write -P 0x55 1M 4k" >/dev/null
"$CBT" backup --incremental --checkpoint c1 disk.qcow2 inc.qcow2 >/dev/null
