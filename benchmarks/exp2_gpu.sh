#!/usr/bin/env bash
# Experiment 2 (strong drift, docs/results.md §7 and §11) on a machine with a CUDA GPU: every run at
# once, each on the batched trainer and each stopped by --wall-limit where it got, so one call
# fits a fixed slot of GPU time.
#
#   bash benchmarks/exp2_gpu.sh OUT BUNDLE DATASETS
#
# BUNDLE: SmolLM2-135M exported with LoRA on all seven projections, r = 16, fp32 base
#   (alignfed export --model SmolLM2-135M-Instruct.Q4_1.gguf --out BUNDLE --targets q,k,v,o,gate,up,down
#    --rank 16 --alpha 32 --quant fp32 --no-gguf)
# DATASETS: the folder holding gsm8k/train.jsonl and codealpaca/code_alpaca_2k.json
# Environment: LRS (learning rates, default "0.003"), SEEDS ("0 1 2"), STRATEGIES ("alignfed
#   alignfed-no-alignment fedbuff"), WALL (wall seconds per run, default 400), EXTRA (more runs as
#   "strategy:lr:seed" words, e.g. "alignfed:0.001:0").
# Each run writes OUT/<strategy>-lr<lr>-s<seed>/ (report.md, results.csv, curves.csv, events.csv).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/exp2_gpu.sh OUT BUNDLE DATASETS}
BUNDLE=${2:?usage: bash benchmarks/exp2_gpu.sh OUT BUNDLE DATASETS}
DATA=${3:?usage: bash benchmarks/exp2_gpu.sh OUT BUNDLE DATASETS}
PY=${PYTHON:-python3}
LRS=${LRS:-0.003}
SEEDS=${SEEDS:-0 1 2}
STRATEGIES=${STRATEGIES:-alignfed alignfed-no-alignment fedbuff}
WALL=${WALL:-400}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"

# the slow class: the laptop profile 20× slower (step_speed 0.05 against the fast class's 1.0)
PROFILES=alignfed/firmware_profiles
sed -e 's/name = "x86-laptop"/name = "slow"/' -e 's/step_speed = 1.0/step_speed = 0.05/' \
    "$PROFILES/x86-laptop.toml" > "$OUT/slow.toml"

runs=()
for lr in $LRS; do
    for seed in $SEEDS; do
        for s in $STRATEGIES; do runs+=("$s:$lr:$seed"); done
    done
done
for r in $EXTRA; do runs+=("$r"); done

pids=()
for r in "${runs[@]}"; do
    IFS=: read -r s lr seed <<< "$r"
    name="$s-lr$lr-s$seed"
    "$PY" -m alignfed.cli simulate --bundle "$BUNDLE" \
        --data "gsm8k=$DATA/gsm8k/train.jsonl" --data "code=$DATA/codealpaca/code_alpaca_2k.json" \
        --partition dirichlet --alpha 0.5 --devices 8 --profiles "$OUT/slow.toml,$PROFILES/x86-laptop.toml" \
        --classes 2 --local-steps 1 --batch 2 --seq-len 64 --lr "$lr" --eval-examples 8 --eval-interval 5 \
        --set alignfed.tau_max=32 --strategies "$s" --trainer batched --threads 1 --seed "$seed" \
        --horizon 600 --wall-limit "$WALL" --out "$OUT/$name" > "$OUT/$name.log" 2>&1 &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for r in "${runs[@]}"; do
    IFS=: read -r s lr seed <<< "$r"
    echo "== $s-lr$lr-s$seed"; tail -n 3 "$OUT/$s-lr$lr-s$seed.log"
done
exit $rc
