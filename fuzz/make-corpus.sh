#!/bin/sh
# Regenerate the fuzzers' seed corpora in fuzz/corpus/<target>/ with QEMU's
# tools: small valid qcow2 images covering the format's variants (v2/v3,
# 512 B/4 KiB/16 KiB clusters, extended L2, refcount widths, zlib/zstd
# compressed clusters, an internal snapshot, a backing file name, an
# external data file, a persistent bitmap, zero clusters), plus damaged
# copies of a few (fuzz/damage-seeds.py).  Trailing zero
# bytes are cut off when `qemu-img check` still passes afterwards, so each
# seed stays a few KiB.  The output is committed; rerun after adding a
# variant.  Usage: fuzz/make-corpus.sh
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out="$here/corpus"
targets="qcow2_open qcow2_check qcow2_write"
work=$(mktemp -d "${TMPDIR:-/tmp}/cbt-corpus.XXXXXX")
trap 'rm -rf "$work"' EXIT

for tool in qemu-img qemu-io python3; do
    command -v "$tool" >/dev/null || {
        echo "make-corpus: $tool not found (run scripts/install-deps.sh)" >&2
        exit 1
    }
done

cd "$work"

# create NAME SIZE OPTIONS: a fresh image with some data, zeroes and a hole.
create() {
    name=$1 size=$2 opts=$3
    qemu-img create -q -f qcow2 -o "$opts" "$name.qcow2" "$size"
    qemu-io -f qcow2 "$name.qcow2" \
        -c "write -q -P 0x11 0 1k" \
        -c "write -q -P 0x22 5k 3k" \
        -c "write -q -z 16k 8k" \
        -c "write -q -P 0x33 40k 512" \
        -c "discard -q 5k 1k" >/dev/null
}

create v3-c512 1M compat=1.1,cluster_size=512
create v3-c4k 4M compat=1.1,cluster_size=4096
create v2-c512 1M compat=0.10,cluster_size=512
create v2-c4k 4M compat=0.10,cluster_size=4096
create v3-c4k-refcount1 4M cluster_size=4096,refcount_bits=1
create v3-c4k-refcount64 4M cluster_size=4096,refcount_bits=64
create v3-c4k-lazy 4M cluster_size=4096,lazy_refcounts=on

# Extended L2 needs clusters of at least 16 KiB (32 subclusters of 512 B).
qemu-img create -q -f qcow2 -o cluster_size=16384,extended_l2=on \
    v3-c16k-extl2.qcow2 1M
qemu-io -f qcow2 v3-c16k-extl2.qcow2 \
    -c "write -q -P 0x44 0 512" -c "write -q -P 0x55 2k 1k" \
    -c "write -q -z 8k 4k" >/dev/null

# Compressed clusters: a compressible raw disk converted with -c.
python3 - raw-in.img <<'PY'
import sys
with open(sys.argv[1], "wb") as f:
    for i in range(16):
        f.write((b"cbt-seed-%02d " % i) * 300 + bytes(4096 - 12 * 300))
    f.truncate(256 * 1024)
PY
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 \
    raw-in.img v3-c4k-zlib.qcow2
qemu-img convert -q -c -f raw -O qcow2 \
    -o cluster_size=4096,compression_type=zstd raw-in.img v3-c4k-zstd.qcow2
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=512,compat=0.10 \
    raw-in.img v2-c512-zlib.qcow2

# An internal snapshot, then more writes on top of it (COW, refcount 2).
create v3-c4k-snapshot 4M cluster_size=4096
qemu-img snapshot -c snap1 v3-c4k-snapshot.qcow2
qemu-io -f qcow2 v3-c4k-snapshot.qcow2 -c "write -q -P 0x77 0 8k" >/dev/null

# A backing file name and format (the backing file is not part of the seed).
qemu-img create -q -f raw base.raw 4M
qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.raw -F raw \
    v3-c4k-backing.qcow2
qemu-io -f qcow2 v3-c4k-backing.qcow2 -c "write -q -P 0x88 4k 4k" >/dev/null

# An external data file (named relative; not part of the seed).
qemu-img create -q -f qcow2 -o cluster_size=4096,data_file=seed-data.raw \
    v3-c4k-datafile.qcow2 1M
qemu-io -f qcow2 v3-c4k-datafile.qcow2 -c "write -q -P 0x99 8k 4k" >/dev/null

# A persistent dirty bitmap (recording, then some writes it records).
qemu-img create -q -f qcow2 -o cluster_size=4096 v3-c4k-bitmap.qcow2 4M
qemu-img bitmap --add -g 65536 v3-c4k-bitmap.qcow2 b0
qemu-io -f qcow2 v3-c4k-bitmap.qcow2 -c "write -q -P 0xaa 0 8k" \
    -c "write -q -P 0xbb 1M 4k" >/dev/null

# Several bitmaps: fine granularity with many dirty runs, a disabled one,
# a merge, and one left in_use by a writer that never closed cleanly.
qemu-img create -q -f qcow2 -o cluster_size=4096 v3-c4k-bitmaps.qcow2 2M
qemu-img bitmap --add -g 512 v3-c4k-bitmaps.qcow2 fine
qemu-img bitmap --add -g 1M v3-c4k-bitmaps.qcow2 coarse
qemu-io -f qcow2 v3-c4k-bitmaps.qcow2 -c "write -q -P 1 0 1k" \
    -c "write -q -P 2 5k 3k" -c "write -q -z 100k 20k" >/dev/null
qemu-img bitmap --add --merge fine --disable v3-c4k-bitmaps.qcow2 frozen
cp v3-c4k-bitmaps.qcow2 v3-c4k-bitmap-inuse.qcow2
python3 - v3-c4k-bitmap-inuse.qcow2 <<'PY'
import struct, sys
# Set in_use on the first directory entry, as a crash would leave it.
f = open(sys.argv[1], "r+b")
hdr = f.read(4096)
hlen = struct.unpack(">I", hdr[100:104])[0]
off = hlen
while off + 8 <= len(hdr):
    typ, ln = struct.unpack(">II", hdr[off:off + 8])
    if typ == 0:
        break
    if typ == 0x23852875:
        dir_off = struct.unpack(">Q", hdr[off + 24:off + 32])[0]
        f.seek(dir_off + 12)
        flags = struct.unpack(">I", f.read(4))[0]
        f.seek(dir_off + 12)
        f.write(struct.pack(">I", flags | 1))
        break
    off += 8 + (ln + 7) // 8 * 8
PY

# Cut trailing zero bytes (keeping 512-byte alignment) when the shorter
# image still checks clean; otherwise keep it whole.
trim() {
    python3 - "$1" "$1.trim" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
end = len(data.rstrip(b"\0"))
end = (end + 511) // 512 * 512
open(sys.argv[2], "wb").write(data[:end])
PY
    if qemu-img check -q -f qcow2 "$1.trim" >/dev/null 2>&1; then
        mv "$1.trim" "$1"
    else
        rm -f "$1.trim"
    fi
}

for img in *.qcow2; do
    qemu-img check -q -f qcow2 "$img"
    trim "$img"
done

for t in $targets; do
    rm -rf "${out:?}/$t"
    mkdir -p "$out/$t"
    cp ./*.qcow2 "$out/$t/"
done
# Damaged variants of some of them (overlapping metadata and the like).
python3 "$here/damage-seeds.py" "$out"
echo "make-corpus: $(ls ./*.qcow2 | wc -l) seeds, $(du -ch ./*.qcow2 | tail -1 | cut -f1) per target, in $out/"
