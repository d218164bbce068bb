#!/usr/bin/env bash
# One device call: the DiT-XL/2 ImageNet-path smoke check and the ablation of docs/RESULTS.md.
#   bash benchmarks/gpu_results.sh [extra ablation.py args]     (carry: wheels .data)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python3 -m pip install --no-deps -q wheels/*.whl 2>&1 | tail -1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
(timeout ${XL_TIMEOUT:-150} python3 scripts/gpu_xl_smoke.py /tmp/xl 2>&1 | grep -v "━" | tail -40) > "$OUT/xl_smoke.log"; echo "xl smoke rc=$?"
timeout ${ABLATION_TIMEOUT:-420} python3 benchmarks/ablation.py --out runs/ablation --data_root .data/fashion-mnist "$@" 2>&1 | tee "$OUT/ablation.log"
tar czf "$OUT/ablation.tgz" runs/ablation/results.json runs/ablation/*.log runs/ablation/*/metrics.csv \
  runs/ablation/*/eval runs/ablation/fp_teacher runs/ablation/*/samples 2>/dev/null
ls -la "$OUT"
