#!/usr/bin/env bash
# Train the Fashion-MNIST teacher on one GPU and export its EMA weights (run by the device tool:
# the Debian dataset files are carried in .data/, the wheels diffusers/jsonargparse in wheels/).
set -eo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps -q wheels/*.whl 2>&1 | tail -2
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
start=$(date +%s)
python3 train.py fit --config configs/fmnist_teacher.yaml --data.init_args.root .data/fashion-mnist \
  --trainer.default_root_dir runs/fmnist_teacher "$@" 2>&1 | tee "$OUT/teacher_train.log" | grep -v "━" | tail -40
echo "wall_s=$(( $(date +%s) - start ))" | tee -a "$OUT/teacher_train.log"
python3 -m robuq.models --ckpt runs/fmnist_teacher/checkpoints/last.ckpt --out "$OUT/fmnist_dit_teacher"
cp runs/fmnist_teacher/metrics.csv "$OUT/teacher_metrics.csv"
cp "$(ls runs/fmnist_teacher/samples/*.png | tail -1)" "$OUT/teacher_samples.png" || true
