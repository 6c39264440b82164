#!/usr/bin/env bash
# Build (once) a Debian bookworm arm64 root for the aarch64 lane, as a board's fresh image would be:
# Debian's own packages via debootstrap, run through qemu-user (binfmt_misc). Cached outside the
# repository; a rerun with the stamp present returns at once.
set -euo pipefail
ROOT=${ALIGNFED_AARCH64_ROOT:-$HOME/.cache/alignfed-aarch64/rootfs}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi

if ! command -v qemu-aarch64-static >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
    echo "== installing qemu-user-static, debootstrap, binfmt-support (apt-get)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq qemu-user-static debootstrap binfmt-support >/dev/null
fi
# qemu-user runs the root's aarch64 binaries through binfmt_misc (a container may need it mounted).
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    $SUDO update-binfmts --enable qemu-aarch64
fi

if [ -f "$ROOT/.alignfed-rootfs" ]; then
    exit 0
fi
echo "== debootstrap bookworm arm64 into $ROOT (once; about 10 min under emulation)"
$SUDO rm -rf "$ROOT"
mkdir -p "$(dirname "$ROOT")"
start=$(date +%s)
# What a fresh Raspberry Pi OS Lite / JetPack image has: Python 3.11 with venv, CA certificates.
$SUDO debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,ca-certificates,sudo bookworm "$ROOT" "$MIRROR" >"$ROOT.debootstrap.log" 2>&1 \
    || { tail -20 "$ROOT.debootstrap.log" >&2; exit 1; }
echo "== rootfs ready in $(( $(date +%s) - start )) s, $(du -sm "$ROOT" | cut -f1) MB"
touch "$ROOT/.alignfed-rootfs"
