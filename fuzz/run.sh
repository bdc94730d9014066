#!/bin/sh
# Run every libFuzzer target for SECONDS each, starting from its seed corpus.
# Usage: fuzz/run.sh BUILD_DIR SECONDS   (BUILD_DIR configured with
# -Dfuzz=true; see HACKING.md).  `make check` runs it for 20 s a target,
# `make fuzz` for 300 s.
#
# The committed corpus (fuzz/corpus/<target>/) is copied into the scratch
# folder fuzz/corpus-run/<target>/ (git-ignored) so new inputs never dirty
# the tree.  Exit status 1 when any target crashes, leaks, times out or runs
# out of memory; the reproducer's path is printed.  Reproduce with
#   BUILD_DIR/fuzz/fuzz_<target> REPRODUCER
set -u

if [ $# -ne 2 ]; then
    echo "usage: $0 BUILD_DIR SECONDS" >&2
    exit 2
fi
build=$1 seconds=$2
here=$(cd "$(dirname "$0")" && pwd)
scratch="$here/corpus-run"
# Every folder of fuzz/corpus/ is a target (FUZZ_TARGETS="a b" picks some).
targets=${FUZZ_TARGETS:-$(cd "$here/corpus" && ls -d -- */ | tr -d /)}

# Keep the sanitizers' settings from make if set; sensible ones otherwise.
: "${ASAN_OPTIONS:=detect_leaks=1:abort_on_error=0:halt_on_error=1}"
: "${UBSAN_OPTIONS:=print_stacktrace=1:halt_on_error=1}"
export ASAN_OPTIONS UBSAN_OPTIONS

failed=0
mkdir -p "$scratch"
for t in $targets; do
    bin="$build/fuzz/fuzz_$t"
    if [ ! -x "$bin" ]; then
        echo "fuzz: $bin not built (configure $build with -Dfuzz=true)" >&2
        exit 1
    fi
    corpus="$scratch/$t"
    artifacts="$scratch/artifacts-$t"
    log="$scratch/$t.log"
    rm -rf "$corpus" "$artifacts"
    mkdir -p "$corpus" "$artifacts"
    cp "$here/corpus/$t"/* "$corpus/"

    printf 'fuzz: %-12s %4s s ... ' "$t" "$seconds"
    "$bin" -max_total_time="$seconds" -max_len=262144 -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "$corpus" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    repro=$(ls "$artifacts" 2>/dev/null | head -1)
    if [ $rc -eq 0 ] && [ -z "$repro" ]; then
        echo "ok (${execs:-?} runs, ${cov:-cov: ?})"
        continue
    fi
    failed=1
    echo "FAILED (exit $rc)"
    # The report: from the sanitizer's (or libFuzzer's) first error line to
    # its SUMMARY, without the shadow-memory dump.
    awk '/ERROR:|^fuzz: |runtime error:/ { on = 1 }
         on && /^Shadow bytes/ { exit }
         on { print; if (/^SUMMARY:/) exit }' "$log" | head -40 |
        sed 's/^/    /'
    echo "fuzz: full log: $log"
    if [ -n "$repro" ]; then
        for f in "$artifacts"/*; do
            echo "fuzz: reproducer: $f"
            echo "fuzz: reproduce with: $bin $f"
        done
    else
        echo "fuzz: no reproducer written; full log in $log"
    fi
done
exit $failed
