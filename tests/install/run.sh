#!/bin/sh
# An outside program against the installed libcbt (docs/api.md):
#   tests/install/run.sh BUILD_DIR
# installs BUILD_DIR with `meson install --destdir` into a temporary folder,
# checks what was installed (headers under include/cbt/, libcbt.so with its
# soname and only the public symbols, libcbt.a, cbt.pc), builds
# examples/backup_example.c with nothing but `pkg-config cbt` pointing there,
# and runs it on a sample disk QEMU writes: a full backup, a cancelled
# incremental that must leave folder and checkpoints as they were, an
# incremental; qemu-img compares the backup chain with the disk.
set -eu
build=$(cd "$1" && pwd)
src=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/cbt-install.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail() { echo "install check: $*" >&2; exit 1; }

dest=$tmp/dest
meson install -C "$build" --destdir "$dest" --quiet >/dev/null
prefix=$(meson introspect "$build" --buildoptions |
    python3 -c 'import json,sys; print([o["value"] for o in json.load(sys.stdin) if o["name"]=="prefix"][0])')
root=$dest$prefix
pc=$(find "$root" -name cbt.pc | head -n 1)
[ -n "$pc" ] || fail "no cbt.pc installed under $root"
so=$(find "$root" -name 'libcbt.so.*.*' | head -n 1)
[ -n "$so" ] || fail "no libcbt.so installed"
[ -n "$(find "$root" -name libcbt.a)" ] || fail "no libcbt.a installed"
libdir=$(dirname "$so")
for h in cbt version error image bitmap chain checkpoint ops backup; do
    [ -f "$root/include/cbt/$h.h" ] || fail "include/cbt/$h.h not installed"
done
readelf -d "$so" | grep -q 'SONAME.*\[libcbt\.so\.[0-9]*\]' ||
    fail "libcbt.so has no soname libcbt.so.N"
"$src/tests/abi/check-exports.sh" "$so" "$root"/include/cbt/*.h

# The example, built as its users would: pkg-config only (prefix moved to
# where the files went), warnings as errors.
export PKG_CONFIG_PATH=$(dirname "$pc")
pkgc() { pkg-config --define-variable=prefix="$root" "$@" cbt; }
[ "$(pkgc --modversion)" = "$(meson introspect "$build" --projectinfo |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')" ] ||
    fail "cbt.pc's version is not the project's"
${CC:-cc} -std=c11 -Wall -Wextra -Werror $(pkgc --cflags) \
    "$src/examples/backup_example.c" -o "$tmp/backup_example" $(pkgc --libs)
readelf -d "$tmp/backup_example" | grep -q 'NEEDED.*libcbt\.so\.' ||
    fail "the example is not linked to the shared libcbt"
example() { LD_LIBRARY_PATH=$libdir "$tmp/backup_example" "$@"; }

disk=$tmp/disk.qcow2
bk=$tmp/backups
mkdir "$bk"
qemu-img create -q -f qcow2 "$disk" 64M
qemu-io -c 'write -P 0x11 0 8M' -c 'write -P 0x12 20M 4M' "$disk" >/dev/null

example "$disk" "$bk" >"$tmp/out1" 2>"$tmp/err1" ||
    fail "first backup failed: $(cat "$tmp/out1" "$tmp/err1")"
grep -q '^full backup' "$tmp/out1" || fail "the first backup was not full"
grep -q '^verified' "$tmp/out1" || fail "the first backup was not verified"

# 32 MiB changed: the backup runs over several chunks, so a cancel at 20%
# lands before the end.  A cancelled backup leaves what a failure leaves.
qemu-io -c 'write -P 0x21 0 32M' "$disk" >/dev/null
ls "$bk" >"$tmp/before"
qemu-img info --output=json "$disk" | grep -c '"name"' >"$tmp/bitmaps-before" || true
status=0
example --cancel-at 20 "$disk" "$bk" >"$tmp/out2" 2>"$tmp/err2" || status=$?
[ $status -eq 3 ] || fail "the cancelled backup exited $status: $(cat "$tmp/err2")"
grep -q 'interrupted' "$tmp/err2" || fail "no interruption reported: $(cat "$tmp/err2")"
ls "$bk" | cmp -s - "$tmp/before" || fail "the cancelled backup left files"
qemu-img info --output=json "$disk" | grep -c '"name"' | cmp -s - "$tmp/bitmaps-before" ||
    fail "the cancelled backup changed the disk's bitmaps"

example "$disk" "$bk" >"$tmp/out3" 2>"$tmp/err3" ||
    fail "incremental failed: $(cat "$tmp/out3" "$tmp/err3")"
grep -q '^incremental backup' "$tmp/out3" || fail "the second backup was not incremental"
grep -q '^verified: 2 backup' "$tmp/out3" || fail "the incremental was not verified"
last=$(ls "$bk"/*.qcow2 | sort | tail -n 1)
qemu-img compare -q "$disk" "$last" || fail "qemu-img: the backup chain differs from the disk"
cat "$tmp/out3"
echo "install check: ok ($(pkgc --modversion), $(basename "$so"))"
