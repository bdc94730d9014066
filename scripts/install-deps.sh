#!/bin/sh
# Install the Debian packages cbt needs to build and to run its tests
# (QEMU's tools are the test oracles).  Installs only what is missing; does
# nothing, quickly, when everything is present.  Needs root (or sudo) only
# when something is missing.
set -eu

PACKAGES="
gcc make meson ninja-build pkg-config
libjansson-dev zlib1g-dev libzstd-dev libcmocka-dev libssl-dev libnbd-dev
clang libclang-rt-dev
qemu-utils libnbd-bin python3 python3-libnbd python3-pytest
qemu-system-common
"

missing=""
for p in $PACKAGES; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing="$missing $p"
done

if [ -z "$missing" ]; then
    exit 0
fi

echo "install-deps: installing missing Debian packages:$missing" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-deps: not root and no sudo; install these yourself:$missing" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# shellcheck disable=SC2086
$SUDO apt-get install -y -q --no-install-recommends $missing
