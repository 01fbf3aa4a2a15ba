#!/usr/bin/env bash
# The headline III on a GPU machine (issue 27), one prepared run of about 15 minutes, in an environment
# where `python` and `exitserve` are the installed package's (pip install -e ".[cpu,train]", torch with CUDA):
#   bash benchmarks/gpu_cascade.sh [OUT]        (DEVICE=cpu EPOCHS=1 LIMIT=300 to try it out on a CPU)
#
# 1. trains the cascade and the static networks of its family with the fast recipe, three seeds,
#    every (model, seed) run in its own process at once (these networks are launch-bound on a GPU);
# 2. exports seed 0's bundles (the cascade with TorchScript twins) and runs the headline on them;
# 3. runs benchmarks/cuda_check.py on the cascade: the torch runner and CUDA graphs on the GPU, and
#    ONNX Runtime's CUDA provider where the installed onnxruntime has it (onnxruntime-gpu), with
#    decisions compared to the CPU's and device-to-host copies counted.
# Everything lands under OUT (default runs/gpu-cascade); copy OUT/*.json back as the record.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-cascade}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-10}
LIMIT=${LIMIT:-}
MODELS=cascade-large,cascade-w16,cascade-w32,cascade-w48,cascade-w64
RUNS=$(echo "$MODELS" | sed 's/\([^,]*\)/\1:fast/g')
limit_flag=()
[ -n "$LIMIT" ] && limit_flag=(--train-limit "$LIMIT")
serial_flag=()
[ "$DEVICE" = cpu ] && serial_flag=(--serial)
mkdir -p "$OUT"
started=$(date +%s)
pids=()
for seed in 0 1 2; do
  python benchmarks/train_headline.py --device "$DEVICE" --epochs "$EPOCHS" --runs "$RUNS" --seed "$seed" \
    --deadline 600 "${limit_flag[@]}" "${serial_flag[@]}" --out "$OUT/train" > "$OUT/train-seed$seed.log" 2>&1 &
  pids+=($!)
  [ "$DEVICE" = cpu ] && wait "${pids[-1]}"
done
wait "${pids[@]}"
echo "trained in $(( $(date +%s) - started )) s on $DEVICE" | tee "$OUT/timing.txt"
smalls=()
for model in ${MODELS//,/ }; do
  extra=()
  [ "$model" = cascade-large ] && extra=(--torchscript)
  exitserve export "$OUT/train/$model-fast/checkpoint.pt" --out "$OUT/bundles/cifar10-$model" --name "cifar10-$model" "${extra[@]}"
  [ "$model" != cascade-large ] && smalls+=("$OUT/bundles/cifar10-$model")
done
exitserve calibrate "$OUT/bundles/cifar10-cascade-large" --data cifar10:val --no-progress
python benchmarks/headline_cascade.py --large "$OUT/bundles/cifar10-cascade-large" --small "${smalls[@]}" --out "$OUT/headline"
python benchmarks/cuda_check.py --bundle "$OUT/bundles/cifar10-cascade-large" --out "$OUT/cuda-check.json" \
  $([ "$DEVICE" = cpu ] && echo --device cpu)
for seed in 1 2; do  # the other seeds' last-exit accuracy, from their training histories
  for model in ${MODELS//,/ }; do
    python -c "import json,sys; h=json.load(open(sys.argv[1])); print(sys.argv[2], h['epochs'][-1]['val_accuracy'])" \
      "$OUT/train/$model-fast-s$seed/history.json" "$model seed $seed"
  done
done | tee "$OUT/seeds.txt"
echo "done in $(( $(date +%s) - started )) s" | tee -a "$OUT/timing.txt"
