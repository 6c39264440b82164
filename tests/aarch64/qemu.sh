#!/usr/bin/env bash
# Print the path of a qemu-aarch64 (user mode) that models CPU $1, fetching a newer one if the
# machine's cannot. Debian bookworm's qemu 7.2 (and bookworm-backports' 10.0) lack the Cortex-A78AE
# of a Jetson Orin; Debian testing's qemu-user (11.1 as of 2026-11) has it. Its qemu-aarch64 is a
# static executable, so it runs here as it is: the .deb is fetched from the Debian mirror, checked
# against the SHA256 of the mirror's package index, and unpacked into the lane's cache, not installed.
set -euo pipefail
CPU=${1:?usage: qemu.sh CPU_MODEL}
CACHE=${ALIGNFED_AARCH64_CACHE:-$HOME/.cache/alignfed-aarch64}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${QEMU_SUITE:-testing}

knows() { local models; models=$("$1" -cpu help 2>/dev/null || true); grep -qw -- "$CPU" <<<"$models"; }  # `-cpu help` exits 1

system=$(command -v qemu-aarch64-static || command -v qemu-aarch64 || true)
if [ -n "$system" ] && knows "$system"; then echo "$system"; exit 0; fi
for have in "$CACHE"/qemu-*/qemu-aarch64; do
    if [ -x "$have" ] && knows "$have"; then echo "$have"; exit 0; fi
done

index=$(curl -fsSL "$MIRROR/dists/$SUITE/main/binary-amd64/Packages.xz" | xz -d | awk '/^Package: qemu-user$/,/^$/')
version=$(sed -n 's/^Version: //p' <<<"$index")
file=$(sed -n 's/^Filename: //p' <<<"$index")
sha=$(sed -n 's/^SHA256: //p' <<<"$index")
[ -n "$file" ] && [ -n "$sha" ] || { echo "qemu.sh: no qemu-user in $MIRROR $SUITE" >&2; exit 1; }
dir="$CACHE/qemu-${version//[:+~]/_}"
mkdir -p "$dir"
echo "== fetching qemu-user $version from Debian $SUITE for $CPU" >&2
curl -fsSL -o "$dir/qemu-user.deb" "$MIRROR/$file"
echo "$sha  $dir/qemu-user.deb" | sha256sum -c --quiet - >&2
dpkg-deb --fsys-tarfile "$dir/qemu-user.deb" | tar -xOf - ./usr/bin/qemu-aarch64 >"$dir/qemu-aarch64"
chmod +x "$dir/qemu-aarch64"
rm -f "$dir/qemu-user.deb"
knows "$dir/qemu-aarch64" || { echo "qemu.sh: qemu-user $version does not model $CPU either" >&2; exit 1; }
echo "$dir/qemu-aarch64"
