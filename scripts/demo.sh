#!/bin/bash
# A tour of cbt's main job on a generated sample disk: a full backup, random
# writes, an incremental backup, more writes, a differential backup, the
# bitmap removed behind cbt's back and an --auto backup that rescans; then
# every backup point is verified, restored and compared with a reference
# copy that qemu-img took of the disk at that point.  Prints a summary
# table; exits non-zero if any step or check fails.  Everything happens in
# a scratch folder that is removed at the end.
# Usage: scripts/demo.sh CBT_BINARY   (run by `make demo`)
# Environment: DEMO_SIZE (virtual disk size in MiB, default 256),
#              DEMO_SEED (seed of the content and the writes, default 1),
#              DEMO_KEEP=1 keeps the scratch folder (its path is printed).
set -eu -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 CBT_BINARY" >&2
    exit 2
fi
case $1 in
/*) CBT=$1 ;;
*) CBT=$(pwd)/$1 ;;
esac
[ -x "$CBT" ] || { echo "demo: $CBT is not executable (run make build)" >&2; exit 1; }
# /usr/bin/python3 when there is one: it starts fastest (a python3 on PATH
# may be a version-manager shim).
PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3
for tool in qemu-img qemu-io "$PY"; do
    command -v "$tool" >/dev/null || {
        echo "demo: $tool not found (run scripts/install-deps.sh)" >&2
        exit 1
    }
done
SIZE_MIB=${DEMO_SIZE:-256}
SEED=${DEMO_SEED:-1}

dir=$(mktemp -d "${TMPDIR:-/tmp}/cbt-demo.XXXXXX")
if [ "${DEMO_KEEP:-0}" = 1 ]; then
    trap 'echo "demo: scratch folder kept: $dir"' EXIT
else
    trap 'rm -rf "$dir"' EXIT
fi
cd "$dir"
mkdir backups

# Progress bars: cbt draws them with -p, and only when stderr is a terminal.
P=()
[ -t 2 ] && P=(-p)

section() { printf '\n== %s ==\n' "$*"; }
# show CMD...: print the command as one would type it.
show() {
    local line="\$" a
    for a in "$@"; do
        [ "$a" = "$CBT" ] && a=cbt
        [ "$a" = "-p" ] && continue
        case $a in
        *" "*) line="$line '$a'" ;;
        *) line="$line $a" ;;
        esac
    done
    echo "$line"
}
# run CMD...: show it, run it with stdout to out.txt (stderr stays on the
# terminal, for progress bars and errors); stop the demo if it fails.
# Sets SECS to its wall time.
run() {
    show "$@"
    local t0=$EPOCHREALTIME
    if ! "$@" >out.txt; then
        cat out.txt
        echo "demo: FAILED: $(show "$@" | cut -c3-)" >&2
        exit 1
    fi
    SECS=$(elapsed "$t0")
}
# quiet CMD...: run without showing; output only on failure.
quiet() {
    if ! "$@" >out.txt 2>&1; then
        cat out.txt
        echo "demo: FAILED: $(show "$@" | cut -c3-)" >&2
        exit 1
    fi
}
# elapsed T0: seconds since $EPOCHREALTIME was T0, two decimals.
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }
mib() { awk -v n="$1" 'BEGIN { printf "%.1f MiB", n / 1048576 }'; }
pct() { awk -v n="$1" -v d="$2" 'BEGIN { printf "%.1f%%", n * 100 / d }'; }
# data_bytes IMG: bytes qemu-img map reports as data in the whole chain.
data_bytes() {
    qemu-img map --output=json "$1" | "$PY" -c '
import json, sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))'
}

FAILED=0
# check NAME CMD...: a verification; record it, keep going on failure.
check() {
    local name=$1
    shift
    if "$@" >check.txt 2>&1; then
        echo "   $name: ok"
        return 0
    fi
    echo "   $name: FAILED"
    sed 's/^/     /' check.txt
    FAILED=1
    return 1
}

SUMMARY=()   # one line per backup point, tab separated

# reference NAME: the point-in-time reference, taken by another route.
reference() { quiet qemu-img convert -f qcow2 -O qcow2 disk.qcow2 "ref-$1.qcow2"; }

# backup NAME ARGS...: cbt backup ARGS disk.qcow2 backups/NAME.qcow2,
# then one line: dirty, copied vs disk size, zeroed, file size, time.
backup() {
    local name=$1
    shift
    run "$CBT" backup "${P[@]}" "$@" --checkpoint "$name" disk.qcow2 "backups/$name.qcow2"
    local secs=$SECS m="backups/$name.qcow2.json"
    local kind since dirty copied zeroed fsize size
    read -r kind since dirty copied zeroed size < <("$PY" -c '
import json, sys
j = json.load(open(sys.argv[1]))
b = j["bytes"]
print(j["kind"] + ("-rescan" if j.get("rescan") else ""), j["since"],
      b["dirty"], b["copied"], b["zeroed"],
      j["image"]["virtual-size"])' "$m")
    fsize=$(stat -c %s "backups/$name.qcow2")
    local dpct cpct
    dpct=$(pct "$dirty" "$size")
    cpct=$(pct "$copied" "$size")
    if [ "$kind" = full ]; then
        dpct="-"
        echo "   $kind: copied $(mib "$copied") of the $(mib "$size") disk ($cpct)," \
            "zeroes recorded: $(mib "$zeroed"); file $(mib "$fsize"); $secs s"
    else
        echo "   $kind since $since: $dpct of the disk dirty" \
            "($(mib "$dirty")); copied $(mib "$copied") ($cpct), zeroes" \
            "recorded: $(mib "$zeroed"); file $(mib "$fsize"); $secs s"
    fi
    reference "$name"
    SUMMARY+=("$name	$kind	$dpct	$(mib "$copied") ($cpct)	$(mib "$fsize")	$secs")
}

# writes SEED COUNT: random writes to the disk with qemu-io: COUNT data
# writes of 4-64 KiB, plus some zero writes and discards (seeded).
writes() {
    "$PY" - "$1" "$2" "$SIZE_MIB" >writes.cmds <<'PY'
import random, sys
rng = random.Random(int(sys.argv[1]))
count, size = int(sys.argv[2]), int(sys.argv[3]) << 20
for i in range(count):
    length = rng.choice((4, 8, 16, 64)) << 10
    off = rng.randrange(size // length) * length
    print("write -q -P 0x%02x %d %d" % (rng.randrange(1, 256), off, length))
for i in range(count // 20):
    print("write -q -z %d 64k" % (rng.randrange(size >> 16) << 16))
    print("discard -q %d 64k" % (rng.randrange(size >> 16) << 16))
PY
    echo "\$ qemu-io -f qcow2 disk.qcow2 < writes.cmds   ($2 random writes of 4-64 KiB, $(($2 / 20)) zero writes, $(($2 / 20)) discards)"
    quiet qemu-io -f qcow2 disk.qcow2 <writes.cmds
    if grep -v -E '^(qemu-io> )*$' out.txt >/dev/null; then
        cat out.txt
        echo "demo: FAILED: qemu-io writes" >&2
        exit 1
    fi
}

T0=$EPOCHREALTIME
echo "cbt demo: backups of a ${SIZE_MIB} MiB sample disk, in $dir"

section "A sample disk: random data, text, zeroes and holes"
"$PY" - "$SIZE_MIB" "$SEED" <<'PY'
import random, sys
size_mib, seed = int(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
words = ("backup checkpoint cluster bitmap qcow2 disk restore verify the a of "
         "to and data block guest chain image zero snapshot").split()
kinds = {"random data": 0, "text": 0, "zeroes (written)": 0, "never written": 0}
lines, n = [], 0
while n < 2 << 20:
    lines.append((" ".join(rng.choice(words) for _ in range(10)) + ".\n").encode())
    n += len(lines[-1])
text = b"".join(lines)
zero_cmds = []
with open("content.raw", "wb") as f:
    f.truncate(size_mib << 20)
    for mib in range(size_mib):
        r = rng.random()
        f.seek(mib << 20)
        if r < 0.40:
            kinds["random data"] += 1
            f.write(rng.randbytes(1 << 20))
        elif r < 0.60:
            kinds["text"] += 1
            start = rng.randrange(1 << 20)
            f.write(text[start:start + (1 << 20)])
        elif r < 0.70:
            kinds["zeroes (written)"] += 1
            zero_cmds.append("write -q -P 0 %d 1M\n" % (mib << 20))
        else:
            kinds["never written"] += 1
with open("zeroes.cmds", "w") as f:
    f.writelines(zero_cmds)
print("   " + ", ".join("%s %d MiB" % (k, v) for k, v in kinds.items()))
PY
quiet qemu-img convert -f raw -O qcow2 content.raw disk.qcow2
rm -f content.raw
quiet qemu-io -f qcow2 disk.qcow2 <zeroes.cmds
echo "   disk.qcow2: $SIZE_MIB MiB virtual, file $(mib "$(stat -c %s disk.qcow2)")"

section "1. Full backup (creates checkpoint mon)"
backup mon --full

section "2. Random writes"
writes "$((SEED + 1))" 400

section "3. Incremental backup: what changed since mon (creates tue)"
backup tue --incremental

section "4. More random writes"
writes "$((SEED + 2))" 600

section "5. Differential backup: everything since mon (creates wed)"
backup wed --since mon

section "6. Bitmap lost (qemu-img bitmap --remove wed), more writes; --auto rescans (creates thu)"
show qemu-img bitmap --remove disk.qcow2 wed
quiet qemu-img bitmap --remove disk.qcow2 wed
writes "$((SEED + 3))" 200
backup thu --auto

section "Checkpoints of the disk"
run "$CBT" checkpoint list disk.qcow2
sed 's/^/   /' out.txt

section "7. Verify, restore and compare every point"
RESULTS=()
for name in mon tue wed thu; do
    ok=ok
    echo "-- $name"
    show "$CBT" verify "backups/$name.qcow2"
    if "$CBT" verify "${P[@]}" "backups/$name.qcow2" >out.txt; then
        tail -n 1 out.txt | sed 's/^/   /'
    else
        sed 's/^/   /' out.txt
        echo "   cbt verify: FAILED"
        FAILED=1
        ok=FAILED
    fi
    run "$CBT" restore "${P[@]}" "backups/$name.qcow2" "restored-$name.qcow2"
    rsecs=$SECS
    echo "   restored in $rsecs s, file $(mib "$(stat -c %s "restored-$name.qcow2")")"
    check "restore equals the reference (qemu-img compare)" \
        qemu-img compare -f qcow2 -F qcow2 "restored-$name.qcow2" "ref-$name.qcow2" || ok=FAILED
    check "qemu-img reads the backup chain as the same disk" \
        qemu-img compare -f qcow2 -F qcow2 "backups/$name.qcow2" "ref-$name.qcow2" || ok=FAILED
    check "qemu-img check of the restore and of the backup" \
        sh -c "qemu-img check -q restored-$name.qcow2 && qemu-img check -q backups/$name.qcow2" || ok=FAILED
    rdata=$(data_bytes "restored-$name.qcow2")
    fdata=$(data_bytes "ref-$name.qcow2")
    check "restore no thicker than the reference ($(mib "$rdata") vs $(mib "$fdata") data)" \
        test "$rdata" -le "$fdata" || ok=FAILED
    RESULTS+=("$rsecs	$ok")
done

section "8. The backup folder: list it, then prune it to the newest point"
run "$CBT" repo list backups
sed 's/^/   /' out.txt
run "$CBT" repo prune --keep-last 1 backups
sed 's/^/   /' out.txt
run "$CBT" repo prune --keep-last 1 --force backups
sed 's/^/   /' out.txt
PRUNE_LINE=$(tail -n 1 out.txt)
prune_ok=ok
check "thu (now the full) verifies against its original hashes" \
    "$CBT" verify backups/thu.qcow2 || prune_ok=FAILED
check "qemu-img reads thu as its reference" \
    qemu-img compare -f qcow2 -F qcow2 backups/thu.qcow2 ref-thu.qcow2 || prune_ok=FAILED
rm -f restored-thu2.qcow2
check "thu restores to its reference" sh -c \
    "'$CBT' restore backups/thu.qcow2 restored-thu2.qcow2 >/dev/null && qemu-img compare -f qcow2 -F qcow2 restored-thu2.qcow2 ref-thu.qcow2" \
    || prune_ok=FAILED
rm -f restored-thu2.qcow2
[ "$prune_ok" = ok ] || FAILED=1

section "Summary"
"$PY" - "${SUMMARY[@]}" "${RESULTS[@]}" <<'PY'
import sys
rows = sys.argv[1:]
n = len(rows) // 2
head = ("point", "kind", "dirty", "copied (of disk)", "backup file",
        "backup s", "restore s", "verify + compare")
table = [head]
for b, r in zip(rows[:n], rows[n:]):
    table.append(tuple(b.split("\t")) + tuple(r.split("\t")))
w = [max(len(t[i]) for t in table) for i in range(len(head))]
for k, t in enumerate(table):
    print("  " + "  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i])
                           for i, c in enumerate(t)).rstrip())
    if k == 0:
        print("  " + "  ".join("-" * x for x in w))
PY
total=$(elapsed "$T0")
echo
if [ "$FAILED" -ne 0 ]; then
    echo "demo: some checks FAILED (see above); $total s" >&2
    exit 1
fi
echo "Every backup verified, restored and equal to its reference; $total s."
echo "(The full is mon; tue's parent is mon; wed is a differential on mon;"
echo " thu, after wed's bitmap was removed, an incremental on wed found by a"
echo " rescan: only the blocks whose hash differs from wed's were written.)"
echo "Prune --keep-last 1: tue removed, mon and wed merged into thu in one"
echo "step; thu is now the full backup and still equal to its reference"
echo "($prune_ok): $PRUNE_LINE"
