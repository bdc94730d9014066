#!/bin/sh
# Install the Debian packages cbt needs to build and to run its tests
# (QEMU's tools are the test oracles).  Installs only what is missing; does
# nothing, quickly, when everything is present.  Needs root (or sudo) only
# when something is missing.
#
# The live tests also need a Linux kernel for the tiny real guest of
# tests/realvm/ (vmlinuz and the virtio modules).  It comes from Debian's
# cloud kernel package, unpacked (not installed: no initramfs hooks run and
# /boot is left alone) into $CBT_REALVM_KERNEL, default
# /var/cache/cbt/realvm/kernel, which tests/live/livelib.py reads.
set -eu

PACKAGES="
gcc make meson ninja-build pkg-config
libjansson-dev zlib1g-dev libzstd-dev libcmocka-dev libssl-dev libnbd-dev
clang libclang-rt-dev
qemu-utils libnbd-bin python3 python3-libnbd python3-pytest
qemu-system-common qemu-system-x86 busybox-static
"
KERNEL_META_PKG=linux-image-cloud-amd64
KERNEL_DIR=${CBT_REALVM_KERNEL:-/var/cache/cbt/realvm/kernel}

missing=""
for p in $PACKAGES; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing="$missing $p"
done
need_kernel=yes
for k in "$KERNEL_DIR"/boot/vmlinuz-*; do
    [ -f "$k" ] && need_kernel=""
done

if [ -z "$missing" ] && [ -z "$need_kernel" ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-deps: not root and no sudo; install these yourself:$missing" \
            "${need_kernel:+(and unpack $KERNEL_META_PKG into $KERNEL_DIR)}" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
if [ -n "$missing" ]; then
    echo "install-deps: installing missing Debian packages:$missing" >&2
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -q --no-install-recommends $missing
fi
if [ -n "$need_kernel" ]; then
    # The meta package only depends on the versioned image package.
    pkg=$(apt-cache depends "$KERNEL_META_PKG" |
          sed -n 's/^ *Depends: \(linux-image-[^ ]*\).*/\1/p' | head -n 1)
    pkg=${pkg:-$KERNEL_META_PKG}
    echo "install-deps: unpacking $pkg into $KERNEL_DIR (realvm guest kernel)" >&2
    debs=$(mktemp -d)
    chmod 755 "$debs"          # apt-get download runs as _apt
    (cd "$debs" && apt-get download -q "$pkg")
    $SUDO rm -rf "$KERNEL_DIR.tmp"
    $SUDO mkdir -p "$KERNEL_DIR.tmp"
    $SUDO dpkg-deb -x "$debs"/"$pkg"_*.deb "$KERNEL_DIR.tmp"
    rm -rf "$debs"
    $SUDO rm -rf "$KERNEL_DIR"
    $SUDO mv "$KERNEL_DIR.tmp" "$KERNEL_DIR"
fi
