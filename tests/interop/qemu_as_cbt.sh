#!/bin/sh
# Stand-in for the cbt binary that forwards to QEMU's own tools.  It is only
# for checking the interop tests themselves: with it every test should pass,
# except the backing-loop cases of test_bad_input.py (QEMU 7.2 hangs on those
# for map/io/check, cbt must not).
#   CBT=$PWD/tests/interop/qemu_as_cbt.sh python3 -m pytest -q tests/interop
sub="$1"
shift
if [ -n "$CBT_SHIM_LOG" ]; then echo "$sub" >>"$CBT_SHIM_LOG"; fi
case "$sub" in
    io) exec qemu-io "$@" ;;
    *) exec qemu-img "$sub" "$@" ;;
esac
