#!/usr/bin/env bash
# The aarch64 lane (`make test-aarch64`; not part of `make test`, CI need not run it):
#   1. a Debian bookworm arm64 root, built once with debootstrap (tests/aarch64/rootfs.sh);
#   2. the edge runtime installed in it as a Pi does it: scripts/setup-device.sh (pip install .[...]);
#   3. bundles and ORT reference numbers made natively (tests/aarch64/prepare.py);
#   4. per emulated CPU model: the torch-backend tests, and one emulated device joining a federation
#      whose broker and coordinator run natively (tests/aarch64/federation.py).
# The root, the device's venv and the prepared bundles are cached in ALIGNFED_AARCH64_CACHE
# (~/.cache/alignfed-aarch64), so a rerun only re-installs the package and reruns the checks.
#
# Environment: LANE_K (pytest -k of the torch-backend tests; see below); AARCH64_CPUS (default
# "cortex-a72 cortex-a76 cortex-a78ae max": a Pi 4, a Pi 5, a Jetson Orin, qemu's default; Debian
# bookworm's qemu 7.2 has no cortex-a78ae, so tests/aarch64/qemu.sh fetches Debian testing's static
# qemu-aarch64 for that model and the lane routes aarch64 executables to it while that model runs);
# ALIGNFED_LANE_SERVING=1 to also compile llama-cpp-python under emulation (slow, measured in
# docs/devices.md); PYTHON (native).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
CACHE=${ALIGNFED_AARCH64_CACHE:-$HOME/.cache/alignfed-aarch64}
export ALIGNFED_AARCH64_ROOT=${ALIGNFED_AARCH64_ROOT:-$CACHE/rootfs}
ROOT=$ALIGNFED_AARCH64_ROOT
CPUS=${AARCH64_CPUS:-cortex-a72 cortex-a76 cortex-a78ae max}
# Which torch-backend tests run per model: Llama and Qwen2 cases by default. Qwen3, Gemma 3 and Phi-3
# quadruple the file (about 23 min per model under emulation here); they run natively in `make test`,
# and here with LANE_K="" (every case).
LANE_K=${LANE_K-not qwen3 and not gemma3 and not phi3}
PYTHON=${PYTHON:-$REPO/${VENV:-.venv}/bin/python}
SRC=/opt/alignfed-src     # in the root
WORK=/opt/alignfed-work   # in the root: prepared bundles, federation runs
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
lane_start=$(date +%s)
say() { echo "== [$(( $(date +%s) - lane_start )) s] $*"; }
[ -x "$PYTHON" ] || { echo "error: $PYTHON missing: run make setup first (bundles are made natively)" >&2; exit 1; }

bash tests/aarch64/rootfs.sh
say "arm64 root at $ROOT"

# A fake /sys per CPU model: with the host's x86 /sys, torch's cpuinfo reads no MIDR_EL1 and segfaults.
# (MIDR values: ARM TRMs, implementer 0x41, part numbers D08 A72, D0B A76, D0C N1, D07 A57.)
midr() {
    case "$1" in
        cortex-a57) echo 0x00000000411fd070 ;; cortex-a72) echo 0x00000000410fd083 ;;
        cortex-a76) echo 0x00000000414fd0b1 ;; neoverse-n1) echo 0x00000000414fd0c1 ;;
        cortex-a78ae) echo 0x00000000410fd423 ;;
        cortex-a710) echo 0x00000000412fd470 ;; neoverse-v1) echo 0x00000000411fd400 ;;
        *) echo 0x00000000000f0510 ;;  # qemu's max / a64fx: any valid MIDR will do
    esac
}
fake_sys() {
    $SUDO mountpoint -q "$ROOT/sys" && $SUDO umount "$ROOT/sys"
    $SUDO rm -rf "$ROOT/sys"; $SUDO mkdir -p "$ROOT/sys/devices/system/cpu"
    local d="$ROOT/sys/devices/system/cpu" i
    for f in possible present online; do echo 0-3 | $SUDO tee "$d/$f" >/dev/null; done
    for i in 0 1 2 3; do
        $SUDO mkdir -p "$d/cpu$i/regs/identification"
        midr "$1" | $SUDO tee "$d/cpu$i/regs/identification/midr_el1" >/dev/null
    done
}
mountpoint -q "$ROOT/proc" || $SUDO mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/dev" || $SUDO mount --bind /dev "$ROOT/dev"
# Which qemu runs aarch64 executables: binfmt_misc's entry for the system's qemu, or, for a model it
# lacks, an entry of the lane's own for the fetched one ('F': opened now, so it works in the chroot).
BINFMT=/proc/sys/fs/binfmt_misc
SYSTEM_QEMU=$(command -v qemu-aarch64-static)
use_qemu() {
    [ -e $BINFMT/alignfed-aarch64 ] && echo -1 | $SUDO tee $BINFMT/alignfed-aarch64 >/dev/null
    if [ "$1" = "$SYSTEM_QEMU" ]; then
        echo 1 | $SUDO tee $BINFMT/qemu-aarch64 >/dev/null
        return
    fi
    echo 0 | $SUDO tee $BINFMT/qemu-aarch64 >/dev/null
    local magic='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
    local mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
    printf ':alignfed-aarch64:M::%s:%s:%s:F' "$magic" "$mask" "$1" | $SUDO tee $BINFMT/register >/dev/null
}
trap 'use_qemu "$SYSTEM_QEMU"; $SUDO umount "$ROOT/proc" "$ROOT/dev" 2>/dev/null || true' EXIT
$SUDO cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# Behind a TLS-intercepting proxy the host trusts an extra CA: the root's pip must trust it too.
ca_env=()
host_ca=${PIP_CERT:-${SSL_CERT_FILE:-}}
if [ -n "$host_ca" ] && [ -f "$host_ca" ]; then
    $SUDO cp "$host_ca" "$ROOT/etc/ssl/host-ca-bundle.crt"
    ca_env=(PIP_CERT=/etc/ssl/host-ca-bundle.crt SSL_CERT_FILE=/etc/ssl/host-ca-bundle.crt)
fi
fake_sys cortex-a72

# The working tree (tracked and new files, not ignored ones) is what the device installs.
say "copying the source tree to $SRC"
$SUDO rm -rf "$ROOT$SRC"; $SUDO mkdir -p "$ROOT$SRC"
git ls-files -co --exclude-standard -z | xargs -0 tar -cf - | $SUDO tar -xf - -C "$ROOT$SRC"

serving_flag="--no-serving"
[ "${ALIGNFED_LANE_SERVING:-0}" = 1 ] && serving_flag=""
key=$(cat pyproject.toml scripts/setup-device.sh | sha256sum | cut -c1-16)$serving_flag
chroot_run() { $SUDO chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "${ca_env[@]}" "$@"; }
if [ "$(cat "$ROOT/opt/alignfed/.lane-installed" 2>/dev/null)" != "$key" ]; then
    say "device set-up: scripts/setup-device.sh $serving_flag (emulated; first time: tens of minutes)"
    t0=$(date +%s)
    chroot_run /bin/bash -c "cd $SRC && VENV=/opt/alignfed/venv scripts/setup-device.sh $serving_flag"
    chroot_run /opt/alignfed/venv/bin/python -m pip install -q pytest
    echo "$key" | $SUDO tee "$ROOT/opt/alignfed/.lane-installed" >/dev/null
    say "device set-up took $(( $(date +%s) - t0 )) s; venv $(du -smx "$ROOT/opt/alignfed/venv" | cut -f1) MB"
else
    say "device venv current; re-installing the package only"
    chroot_run /bin/bash -c "cd $SRC && /opt/alignfed/venv/bin/python -m pip install -q --no-deps --force-reinstall ."
fi
# Defect 6: the installed package (not the source tree) carries the profiles.
chroot_run /bin/sh -c "cd / && /opt/alignfed/venv/bin/python -c \"from alignfed.profiles import load_profile, PROFILE_DIR; p = load_profile('rpi4-4gb'); assert p.arch == 'aarch64'; print('installed profiles:', PROFILE_DIR)\""
# Defect 7: an x86_64 profile is refused by flash on the device.
if chroot_run /bin/sh -c "cd / && /opt/alignfed/venv/bin/python -m alignfed.cli flash --profile x86-laptop --device-id d --broker mqtt://x:1 --bundle /nonexistent --data /x --target /tmp/f --key 00" 2>"$ROOT/tmp/flash.err"; then
    echo "FAIL: flash accepted an x86_64 profile on aarch64" >&2; exit 1
fi
grep -q "is for x86_64 devices, this machine is aarch64" "$ROOT/tmp/flash.err" || { cat "$ROOT/tmp/flash.err" >&2; exit 1; }
say "installed package: profiles load, flash refuses an x86_64 profile"
# Defect 2: no CUDA wheels on a Pi.
if chroot_run /opt/alignfed/venv/bin/python -m pip list 2>/dev/null | grep -i -E "^nvidia-|^triton"; then
    echo "FAIL: the device venv holds CUDA wheels" >&2; exit 1
fi
# Defect 5: the x86_64 development set-up says to use the device script instead of failing later.
if chroot_run /bin/bash -c "cd $SRC && VENV=/tmp/x scripts/setup.sh" 2>"$ROOT/tmp/setup.err"; then
    echo "FAIL: scripts/setup.sh ran on aarch64" >&2; exit 1
fi
grep -q "run scripts/setup-device.sh" "$ROOT/tmp/setup.err" || { cat "$ROOT/tmp/setup.err" >&2; exit 1; }
say "device venv: no CUDA wheels ($(du -smx "$ROOT/opt/alignfed/venv" | cut -f1) MB); setup.sh points to setup-device.sh"

say "native: bundles and ORT reference numbers"
$SUDO mkdir -p "$ROOT$WORK"
PYTHONPATH=$REPO "$PYTHON" -m tests.aarch64.prepare "$ROOT$WORK"

status=0
summary=""
for cpu in $CPUS; do
    fake_sys "$cpu"
    qcpu=$cpu; [ "$cpu" = max ] && qcpu=""  # qemu's default model is max
    qemu=$(bash tests/aarch64/qemu.sh "$cpu")
    use_qemu "$qemu"
    say "QEMU_CPU=${cpu}: $qemu ($("$qemu" --version | head -1))"
    t0=$(date +%s)
    say "QEMU_CPU=${cpu}: torch-backend tests"
    rc=0
    chroot_run ${qcpu:+QEMU_CPU=$qcpu} ALIGNFED_PREEXPORTED=$WORK PYTHONPATH=$SRC /bin/sh -c \
        "cd $SRC && ALIGNFED_PARTIAL_ENV=1 /opt/alignfed/venv/bin/python -m pytest -q -p no:cacheprovider tests/edge/test_torch_trainer.py -k '$LANE_K'" || rc=$?
    say "QEMU_CPU=${cpu}: emulated device in a native federation"
    PYTHONPATH=$REPO "$PYTHON" -m tests.aarch64.federation --root "$ROOT" --work "$WORK" --cpu "$qcpu" || rc=$?
    took=$(( $(date +%s) - t0 ))
    summary="$summary\n  $cpu: $([ $rc = 0 ] && echo pass || echo FAIL) in $took s"
    [ $rc = 0 ] || status=1
done
say "lane done"
echo -e "== aarch64 lane:$summary"
exit $status
