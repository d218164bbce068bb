#!/usr/bin/env bash
# The AMPN experiment of docs/AMPN.md and the AMPN/third-seed rows of docs/RESULTS.md, in three device calls
# (carry: wheels .data):
#   STAGE=search bash benchmarks/gpu_ampn.sh   # AMPN search, plans for budgets 2 and 3 + third seed of the A2 rows
#   STAGE=plans  bash benchmarks/gpu_ampn.sh   # QAT with the searched plans (configs/plans/), 3 seeds
#   STAGE=adapt  bash benchmarks/gpu_ampn.sh   # search with adaptation steps, its plan, QAT with it, 3 seeds
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
  start=$SECONDS
  python3 -m robuq.ampn.search --config configs/search_fmnist.yaml --warmup_steps ${WARMUP:-500} \
    --data.init_args.root $DATA --out_dir runs/search > "$OUT/search.log" 2>&1; echo "search rc=$? wall $((SECONDS - start)) s"
  for spec in "ampn_avg2 2.0 qat" "ampn_avg3 3.0 qat" "ptq_avg2 2.0 ptq"; do  # configs/plans/fmnist_*.yaml
    set -- $spec
    python3 -m robuq.ampn.replan runs/search/sensitivity.json --budget $2 --table $3 --out runs/search/fmnist_$1.yaml
  done
  wait $rows
  tar czf "$OUT/search.tgz" runs/search  # the warm-up is reused by the plans stage (runs/search_adapt/warmup.pt)
  tar czf "$OUT/ablation_s2.tgz" runs/ablation_s2/results.json runs/ablation_s2/*.log runs/ablation_s2/*/metrics.csv runs/ablation_s2/*/eval 2>/dev/null
  ;;
plans)
  "${ABLATION[@]}" --out runs/ablation_ampn --parallel 9 --seeds ${SEEDS:-0 1 2} \
    --rows plan:ampn_avg2=configs/plans/fmnist_ampn_avg2.yaml plan:ptq_avg2=configs/plans/fmnist_ptq_avg2.yaml \
           plan:ampn_avg3=configs/plans/fmnist_ampn_avg3.yaml 2>&1 | tee "$OUT/ablation_ampn.log"
  tar czf "$OUT/ablation_ampn.tgz" runs/ablation_ampn/results.json runs/ablation_ampn/*.log runs/ablation_ampn/*/metrics.csv \
    runs/ablation_ampn/*/eval 2>/dev/null
  ;;
adapt)
  # the search again with ADAPT distillation steps after each width change, training SCOPE (step: the
  # changed layer's LSQ step; model: the whole student, reference adapted alike), its budget-2 plan,
  # and QAT with that plan for 3 seeds
  start=$SECONDS
  python3 -m robuq.ampn.search --config configs/search_fmnist.yaml --warmup_steps ${WARMUP:-500} \
    --data.init_args.root $DATA --out_dir runs/search_adapt --adapt_steps ${ADAPT:-10} --adapt_scope ${SCOPE:-step} > "$OUT/search_adapt.log" 2>&1
  echo "adapted search rc=$? wall $((SECONDS - start)) s"
  python3 -m robuq.ampn.replan runs/search_adapt/sensitivity.json --budget 2.0 --out runs/search_adapt/fmnist_ampn_${SCOPE:-step}adapt_avg2.yaml
  "${ABLATION[@]}" --out runs/ablation_adapt --parallel 3 --seeds ${SEEDS:-0 1 2} \
    --rows plan:ampn_${SCOPE:-step}adapt_avg2=runs/search_adapt/fmnist_ampn_${SCOPE:-step}adapt_avg2.yaml 2>&1 | tee "$OUT/ablation_adapt.log"
  tar czf "$OUT/adapt.tgz" runs/ablation_adapt/results.json runs/ablation_adapt/*.log runs/ablation_adapt/*/metrics.csv \
    runs/ablation_adapt/*/eval runs/search_adapt/sensitivity.json runs/search_adapt/*.yaml runs/search_adapt/*.png 2>/dev/null
  ;;
*) echo "STAGE must be search, plans or adapt"; exit 2 ;;
esac
ls -la "$OUT"
