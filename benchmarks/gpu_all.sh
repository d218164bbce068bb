#!/usr/bin/env bash
# All GPU checks and benchmarks of robuq's kernels in one call (run from the repository root):
#   bash benchmarks/gpu_all.sh                # stages: tests inference qat
#   STAGES="qat_compile" bash benchmarks/gpu_all.sh
#   STAGES="sweep" bash benchmarks/gpu_all.sh   # launch settings of the rotate+quantize kernels
#   STAGES="fit" bash benchmarks/gpu_all.sh     # the train.py fit loop of DiT-XL/2, QAT and full precision
#   STAGES="fit_blocks" bash benchmarks/gpu_all.sh  # the same with graph_blocks (what a DDP run uses)
# Logs and JSON go to $OUT (the device tool's output folder) or ./out. Needs a CUDA GPU, torch,
# triton; diffusers is installed from wheels/*.whl when the machine lacks it.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
if ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
} 2>&1 | tee "$OUT/env.log"

STAGES=${STAGES:-"tests inference qat"}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-300}
rc=0
for stage in $STAGES; do
    echo "=== stage $stage ($(date +%T))"
    case $stage in
        tests)
            timeout "$STAGE_TIMEOUT" python3 -m pytest -q -rf -p no:cacheprovider tests/kernels/test_kernels_gpu.py tests/deploy -k "not fused_qat" 2>&1 | tee "$OUT/tests.log" || rc=1
            timeout "$STAGE_TIMEOUT" python3 -m pytest -q -rf -p no:cacheprovider tests/kernels/test_kernels_gpu.py -k "fused_qat" 2>&1 | tee -a "$OUT/tests.log" || rc=1 ;;
        inference)
            timeout "$STAGE_TIMEOUT" python3 benchmarks/inference.py --json "$OUT/inference.json" ${INFER_ARGS:-} 2>&1 | tee "$OUT/inference.log" || rc=1 ;;
        qat)
            timeout "$STAGE_TIMEOUT" python3 benchmarks/qat_step.py --json "$OUT/qat.json" ${QAT_ARGS:-} 2>&1 | tee "$OUT/qat.log" || rc=1 ;;
        sweep)
            timeout "$STAGE_TIMEOUT" python3 benchmarks/quant_sweep.py --json "$OUT/sweep.json" ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep.log" || rc=1 ;;
        fit)  # the real `train.py fit` loop (scripts/gpu_xl_smoke.py): the QAT fit and a full-precision fine-tune, each profiled
            prof='{"class_path": "benchmarks.loop_profile.LoopProfile", "init_args": {"start": '${PROFILE_START:-28}'}}'
            for task in qat pretrain; do
                args=(--steps "${FIT_STEPS:-34}" --model.cuda_graph true --trainer.val_check_interval 1000 --trainer.callbacks+="$prof")
                [ $task = pretrain ] && args+=(--model.task pretrain --model.model null --model.fused_kernels false)
                timeout "$STAGE_TIMEOUT" python3 scripts/gpu_xl_smoke.py /tmp/xl "${args[@]}" ${FIT_ARGS:-} 2>&1 | tee "$OUT/fit_$task.log" || rc=1
            done ;;
        fit_blocks)  # the same two fits with graph_blocks (each block and the teacher replayed as CUDA graphs; DDP-capable)
            for task in qat pretrain; do
                args=(--steps "${FIT_STEPS:-34}" --model.graph_blocks true --model.compile_blocks false --trainer.val_check_interval 1000)
                [ $task = pretrain ] && args+=(--model.task pretrain --model.model null --model.fused_kernels false)
                timeout "$STAGE_TIMEOUT" python3 scripts/gpu_xl_smoke.py /tmp/xl "${args[@]}" ${FIT_ARGS:-} 2>&1 | tee "$OUT/fit_blocks_$task.log" || rc=1
            done ;;
        qat_compile)
            timeout "$STAGE_TIMEOUT" python3 benchmarks/qat_step.py --no-kernels --modes compile-regional --rows ${COMPILE_ROWS:-a c d} --json "$OUT/qat_compile.json" 2>&1 | tee "$OUT/qat_compile.log" || rc=1 ;;
        *) echo "unknown stage $stage"; rc=1 ;;
    esac
done
echo "=== done rc=$rc ($(date +%T))"
exit $rc
