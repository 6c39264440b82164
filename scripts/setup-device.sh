#!/usr/bin/env bash
# Set up the edge runtime on a board (Raspberry Pi 4/5, Jetson Nano/Orin, any Debian/Ubuntu aarch64
# or x86_64 device): build tools, a virtual environment, `pip install .[edge]` (not editable: what
# a device keeps running), then a start-up check of the trainer. The development set-up for an x86
# workstation (every extra, Mosquitto, the test-suite) is scripts/setup.sh. docs/devices.md.
#
#   scripts/setup-device.sh                 Raspberry Pi / any CPU board: PyPI's CPU torch (aarch64)
#   scripts/setup-device.sh --jetson        keep JetPack's CUDA torch (JETSON_TORCH_INDEX, below)
#   scripts/setup-device.sh --no-serving    training only: skip llama-cpp-python (a 20+ min compile on a Pi 4)
#
# Environment: VENV (default /opt/alignfed/venv), PYTHON (default python3),
# JETSON_TORCH_INDEX (default NVIDIA's JetPack 6 index), CMAKE_ARGS (llama.cpp build flags).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/opt/alignfed/venv}
PYTHON=${PYTHON:-python3}
JETSON_TORCH_INDEX=${JETSON_TORCH_INDEX:-https://pypi.jetson-ai-lab.io/jp6/cu126}
jetson=0
serving=1
for arg in "$@"; do
    case "$arg" in
        --jetson) jetson=1 ;;
        --no-serving) serving=0 ;;
        -h|--help) sed -n 2,14p "$0"; exit 0 ;;
        *) echo "setup-device.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
step() { echo "== $1 ($(date +%T))"; }

# A fresh Raspberry Pi OS Lite / JetPack image has Python 3.11 but no venv module, compiler or cmake;
# llama-cpp-python compiles llama.cpp from source and stops with "Could not find the compiler".
pkgs="python3-venv libjemalloc2"  # jemalloc: the daemon's unit preloads it (lower training peaks)
[ "$serving" = 1 ] && pkgs="$pkgs build-essential cmake"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    step "installing$missing (apt-get)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

step "virtual environment $VENV"
[ -d "$(dirname "$VENV")" ] || $SUDO mkdir -p "$(dirname "$VENV")"
[ -w "$(dirname "$VENV")" ] || $SUDO chown "$(id -u):$(id -g)" "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip

extras="edge-base,board-torch"
if [ "$jetson" = 1 ]; then
    # JetPack's torch is built for the board's CUDA; PyPI's aarch64 torch would replace it with a CPU one.
    step "JetPack torch from $JETSON_TORCH_INDEX"
    "$VENV/bin/python" -m pip install -q --index-url "$JETSON_TORCH_INDEX" torch
    extras="edge-base"
fi
[ "$serving" = 1 ] && extras="$extras,serve"
step "pip install .[$extras] (llama-cpp-python, when asked for, compiles here)"
"$VENV/bin/python" -m pip install -q ".[$extras]"

step "checking the trainer on this CPU"
(cd / && "$VENV/bin/python" -c "import torch; from edge.selfcheck import report; print(report(torch))")
if [ "$serving" = 1 ]; then "$VENV/bin/python" -c "import llama_cpp; print('llama.cpp', llama_cpp.__version__)"; fi
echo "== ready: $VENV ($(du -smx "$VENV" | cut -f1) MB); next: alignfed flash (docs/devices.md)"
