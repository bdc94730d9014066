#!/bin/sh
# A short tour of what cbt does today, on built-in sample data: create a
# qcow2 overlay on a base image, write patterns with `cbt io`, look at the
# result with `cbt info`, `cbt map`, `cbt check` and `cbt compare`, and
# cross-check every result with QEMU's own tools.
# Usage: scripts/demo.sh CBT_BINARY   (run by `make demo`)
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 CBT_BINARY" >&2
    exit 2
fi
case $1 in
/*) CBT=$1 ;;
*) CBT=$(pwd)/$1 ;;
esac
[ -x "$CBT" ] || { echo "demo: $CBT is not executable (run make build)" >&2; exit 1; }
for tool in qemu-img qemu-io python3; do
    command -v "$tool" >/dev/null || {
        echo "demo: $tool not found (run scripts/install-deps.sh)" >&2
        exit 1
    }
done

dir=$(mktemp -d "${TMPDIR:-/tmp}/cbt-demo.XXXXXX")
trap 'rm -rf "$dir"' EXIT
cd "$dir"

section() { printf '\n== %s ==\n' "$*"; }
# show CMD...: print the command as one would type it.
show() {
    line="\$"
    for a in "$@"; do
        [ "$a" = "$CBT" ] && a=cbt
        case $a in
        *" "*) line="$line '$a'" ;;
        *) line="$line $a" ;;
        esac
    done
    echo "$line"
}
# run CMD...: show the command, run it, stop the demo if it fails.
run() {
    show "$@"
    if ! "$@"; then
        echo "demo: FAILED: $*" >&2
        exit 1
    fi
}
# quiet CMD...: as run, but show the output only on failure.
quiet() {
    show "$@"
    if ! "$@" >out.txt 2>&1; then
        cat out.txt
        echo "demo: FAILED: $*" >&2
        exit 1
    fi
}

section "1. A base image and a qcow2 overlay on top of it"
run "$CBT" create -f qcow2 base.qcow2 64M
quiet "$CBT" io -c "write -P 0xaa 0 1M" -c "write -P 0xcc 8M 64k" base.qcow2
run "$CBT" create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2

section "2. Writes to the overlay; reads see through to the base"
quiet "$CBT" io -c "write -P 0xbb 512k 256k" -c "write -z 8M 64k" \
    -c "discard 16M 1M" top.qcow2
quiet "$CBT" io -c "read -P 0xaa 0 512k" -c "read -P 0xbb 512k 256k" \
    -c "read -P 0xaa 768k 256k" -c "read -P 0 8M 64k" top.qcow2
echo "(read-back verified: base pattern 0xaa, overlay pattern 0xbb, zeroes)"

section "3. What the images look like"
run "$CBT" info top.qcow2
echo
run "$CBT" map top.qcow2
echo
run "$CBT" check top.qcow2

section "4. Cross-check with QEMU's tools"
# The same guest view built independently, as a raw file.
quiet qemu-img create -f raw expected.raw 64M
quiet qemu-io -f raw -c "write -P 0xaa 0 1M" -c "write -P 0xbb 512k 256k" \
    expected.raw
run qemu-img check -f qcow2 base.qcow2
run qemu-img check -f qcow2 top.qcow2
run qemu-img compare -f qcow2 -F raw top.qcow2 expected.raw
run "$CBT" compare -f qcow2 -F raw top.qcow2 expected.raw
quiet qemu-io -f qcow2 -r -c "read -P 0xaa 0 512k" -c "read -P 0xbb 512k 256k" \
    -c "read -P 0 8M 64k" top.qcow2
echo "(qemu-io reads cbt's chain back with the expected patterns)"
# `cbt map --output=json` must mean what qemu-img map means (host offsets
# may differ: each tool allocates its own clusters).
"$CBT" map --output=json top.qcow2 >cbt-map.json
qemu-img map --output=json -f qcow2 top.qcow2 >qemu-map.json
echo "\$ cbt map --output=json top.qcow2  vs  qemu-img map --output=json top.qcow2"
if ! python3 - cbt-map.json qemu-map.json <<'PY'
import json, sys
keys = ("start", "length", "depth", "present", "zero", "data")
a, b = ([tuple(e.get(k) for k in keys) for e in json.load(open(f))]
        for f in sys.argv[1:3])
if a != b:
    print("maps differ:\n  cbt:     %s\n  qemu-img: %s" % (a, b))
    sys.exit(1)
print("same %d extents (start, length, depth, present, zero, data)" % len(a))
PY
then
    echo "demo: FAILED: cbt map and qemu-img map disagree" >&2
    exit 1
fi

section "Done"
echo "Every step passed; the scratch folder $dir is removed now."
