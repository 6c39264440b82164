#!/usr/bin/env bash
# What needs a CUDA GPU, which CI's machines do not have: run it on a machine that has one.
#
#   bash benchmarks/gpu_check.sh OUT [BUNDLE]
#
# 1. The GPU tests (they skip where torch sees no GPU): a Jetson's training path, fp32 and half
#    precision, against ONNX Runtime's numbers (tests/edge/test_torch_trainer.py), and the
#    simulator's batched trainer on CUDA (tests/simulator/test_batched.py).
# 2. With BUNDLE (e.g. SmolLM2-135M exported with `alignfed export`): the simulator's device-steps
#    per wall second, ONNX Runtime on one CPU thread vs the batched trainer on the GPU, side by side
#    in one process (benchmarks/bench_simulator.py).
#
# Needs the project's edge, export and sim dependencies (ONNX Runtime training builds the tests'
# tiny bundles) and a CUDA build of torch. Logs go to OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT [BUNDLE]}
BUNDLE=${2:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: $PY's torch sees no CUDA GPU; this script is for a machine that has one" >&2
    exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee "$OUT/gpu.txt"

rc=0
start=$(date +%s)
"$PY" -m pytest -q -p no:cacheprovider -rs tests/edge/test_torch_trainer.py tests/simulator/test_batched.py \
    2>&1 | tee "$OUT/gpu_tests.log" || rc=1
echo "== GPU tests: $(( $(date +%s) - start )) s, exit $rc" | tee -a "$OUT/gpu.txt"

if [ -n "$BUNDLE" ]; then
    start=$(date +%s)
    read -r -a extra <<< "${BENCH_ARGS:---devices 8}"  # e.g. BENCH_ARGS="--devices 16 --repeats 3"
    "$PY" benchmarks/bench_simulator.py --bundle "$BUNDLE" "${extra[@]}" \
        2>&1 | tee "$OUT/bench_simulator.txt" || rc=1
    echo "== simulator benchmark: $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
fi
exit $rc
