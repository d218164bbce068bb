#!/usr/bin/env bash
# The AMPN experiment of docs/AMPN.md and the AMPN/third-seed rows of docs/RESULTS.md, in two device calls
# (carry: wheels .data):
#   STAGE=search bash benchmarks/gpu_ampn.sh   # AMPN search (budgets 2 and 3) + third seed of the A2 rows
#   STAGE=plans  bash benchmarks/gpu_ampn.sh   # QAT with the searched plans (configs/plans/), 3 seeds
# Every QAT row uses the recipe of docs/RESULTS.md (300 steps, batch 128, bf16-mixed, EMA 0.99).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python3 -m pip install --no-deps -q wheels/*.whl 2>&1 | tail -1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
DATA=.data/fashion-mnist
ABLATION=(python3 benchmarks/ablation.py --data_root $DATA --steps 300 --fit_timeout 330 --num_samples 1000
          --ema_decay 0.99 --no_teacher)

case "${STAGE:-search}" in
search)
  "${ABLATION[@]}" --out runs/ablation_s2 --parallel 3 --seeds 2 \
    --rows a2_norot_dynamic a2_rq_static a2_rq_dynamic > "$OUT/ablation_s2.log" 2>&1 &
  rows=$!
  search=(python3 -m robuq.ampn.search --config configs/search_fmnist.yaml --warmup_steps ${WARMUP:-500}
          --data.init_args.root $DATA --out_dir runs/search)
  mkdir -p "$OUT/search"
  for run in "avg2 --budget 2.0" "avg3 --budget 3.0" "avg2_uniform --budget 2.0 --weighting uniform"; do
    set -- $run
    name=$1; shift
    start=$SECONDS
    "${search[@]}" "$@" > "$OUT/search/$name.log" 2>&1; echo "search $name rc=$? wall $((SECONDS - start)) s"
    cp runs/search/plan.yaml "$OUT/search/plan_$name.yaml"; cp runs/search/plan.png "$OUT/search/plan_$name.png"
    cp runs/search/plan_ptq.yaml "$OUT/search/plan_${name}_ptq.yaml"; cp runs/search/plan_ptq.png "$OUT/search/plan_${name}_ptq.png"
  done
  cp runs/search/sensitivity.json "$OUT/search/"
  wait $rows
  cp runs/ablation_s2/results.json "$OUT/ablation_s2.json"
  tar czf "$OUT/ablation_s2.tgz" runs/ablation_s2/*.log runs/ablation_s2/*/metrics.csv runs/ablation_s2/*/eval 2>/dev/null
  ;;
plans)
  "${ABLATION[@]}" --out runs/ablation_ampn --parallel 9 --seeds ${SEEDS:-0 1 2} \
    --rows plan:ampn_avg2=configs/plans/fmnist_ampn_avg2.yaml plan:ptq_avg2=configs/plans/fmnist_ptq_avg2.yaml \
           plan:ampn_avg3=configs/plans/fmnist_ampn_avg3.yaml 2>&1 | tee "$OUT/ablation_ampn.log"
  cp runs/ablation_ampn/results.json "$OUT/ablation_ampn.json"
  tar czf "$OUT/ablation_ampn.tgz" runs/ablation_ampn/*.log runs/ablation_ampn/*/metrics.csv runs/ablation_ampn/*/eval 2>/dev/null
  ;;
*) echo "STAGE must be search or plans"; exit 2 ;;
esac
ls -la "$OUT"
