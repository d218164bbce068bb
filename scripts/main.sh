#!/usr/bin/env bash
# The main job on the embedded default, end to end: set up, W1.58A2 QAT of the shipped
# Fashion-MNIST teacher (configs/fmnist_w158a2.yaml), then evaluate the EMA student.
# Extra arguments go to `fit`, e.g. --trainer.max_steps 20000 --trainer.precision bf16-mixed on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/fmnist_w158a2}
python3 train.py fit --config configs/fmnist_w158a2.yaml --trainer.default_root_dir "$RUN" "$@"
# The DiT protocol (10k samples, 250 DDPM steps) on a GPU; a quick, noisy look on a CPU.
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  EVAL_ARGS=${EVAL_ARGS:-}
else
  EVAL_ARGS=${EVAL_ARGS:---num_samples 100 --scheduler ddim --steps 25 --reference_size 2000}
fi
python3 -m robuq.evaluation.evaluate --config configs/evaluate_fmnist.yaml \
  --checkpoint "$RUN/checkpoints/last.ckpt" --out_dir "$RUN/eval" $EVAL_ARGS
echo
echo "checkpoint:  $RUN/checkpoints/last.ckpt"
echo "report:      $RUN/eval/report.json"
echo "sample grid: $RUN/eval/samples.png"
