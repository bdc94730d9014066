#!/bin/sh
# The dynamic symbols libcbt.so defines must be exactly the functions the
# public headers declare: nothing private leaks (a program could come to
# depend on it), nothing public is missing (src/libcbt.map hides it), and
# every export sits under the version node CBT_*.
#   check-exports.sh LIBCBT_SO HEADER...
set -eu
so=$1
shift
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Declared: every cbt_NAME( in the headers that is not a function type.
cat "$@" | sed 's,/\*.*\*/,,' |
    grep -v '^ *typedef' |
    grep -oE '\bcbt_[a-z0-9_]+ *\(' | sed 's/ *($//' | sort -u >"$tmp/declared"

# Exported: defined dynamic symbols (functions or data), without versions.
nm -D --defined-only "$so" | awk '$2 ~ /^[TDBR]$/ {print $3}' |
    sed 's/@.*//' | sort -u >"$tmp/exported"

status=0
if ! cmp -s "$tmp/declared" "$tmp/exported"; then
    echo "check-exports: $so exports differ from the public headers" >&2
    echo "(< declared but not exported: add to src/libcbt.map or define it;" >&2
    echo " > exported but not declared: make it static or list it local)" >&2
    diff "$tmp/declared" "$tmp/exported" >&2 || true
    status=1
fi
# Every export is versioned (CBT_1, CBT_1.1, ...).
if nm -D --defined-only --with-symbol-versions "$so" 2>/dev/null |
        awk '$2 ~ /^[TDBR]$/ {print $3}' | grep -v '@@*CBT_' | grep .; then
    echo "check-exports: the symbols above carry no CBT_ version" >&2
    status=1
fi
exit $status
