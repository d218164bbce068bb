"""The ablation of docs/RESULTS.md: QAT rows from the shipped Fashion-MNIST teacher, all with the
same steps, batch and seed, evaluated with the same sampler, N and seed.

    python benchmarks/ablation.py --out runs/ablation --steps 1500 --parallel 6 [--rows a2_rq_dynamic ...]

Rows run as concurrent `train.py fit` processes (a 4.6M-parameter DiT leaves a GPU mostly idle),
then each EMA student is evaluated; results go to OUT/results.json and OUT/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (overrides of configs/fmnist_w158a2.yaml, seeds)
ROWS: dict[str, tuple[list[str], list[int]]] = {
    "w158a16": (["--model.quant.act_bits", "16"], [0]),
    "w158a8": (["--model.quant.act_bits", "8"], [0]),
    "w158a4": (["--model.quant.act_bits", "4"], [0]),
    "w158a3": (["--model.quant.act_bits", "3"], [0]),
    "a2_norot_dynamic": (["--model.quant.rotation", "none"], [0, 1]),
    "a2_rq_static": (["--model.quant.act_mode", "static"], [0, 1]),
    "a2_rq_dynamic": ([], [0, 1]),
    "a2_rq_dynamic_groups10": (["--model.quant.timestep_groups", "10"], [0]),
    "a2_rq_static_groups10": (["--model.quant.act_mode", "static", "--model.quant.timestep_groups", "10"], [0]),
}


def fit(name: str, overrides: list[str], seed: int, args) -> dict:
    run = Path(args.out) / f"{name}_s{seed}"
    cmd = [sys.executable, "train.py", "fit", "--config", "configs/fmnist_w158a2.yaml",
           "--trainer.default_root_dir", str(run), "--trainer.max_steps", str(args.steps),
           "--trainer.val_check_interval", str(args.steps // 2), "--trainer.limit_val_batches", "8",
           "--trainer.precision", args.precision, "--data.init_args.batch_size", str(args.batch_size),
           "--data.init_args.num_workers", "2", "--model.ema_decay", str(args.ema_decay),
           "--model.warmup_steps", "100", "--seed_everything", str(seed), "--model.seed", str(seed),
           *args.data_args, *overrides]
    start = time.time()
    with open(run.with_suffix(".log"), "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.fit_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"  # evaluated at its last checkpoint; the report records the step reached
    wall = time.time() - start
    distill = None
    metrics = run / "metrics.csv"
    if metrics.exists():
        vals = [r["val/distill"] for r in csv.DictReader(open(metrics)) if r.get("val/distill")]
        distill = float(vals[-1]) if vals else None
    return dict(row=name, seed=seed, rc=rc, fit_wall_s=round(wall, 1), val_distill=distill,
                checkpoint=str(run / "checkpoints" / "last.ckpt"))


def evaluate(result: dict, args) -> dict:
    from robuq.evaluation.evaluate import evaluate as run_eval

    if not Path(result["checkpoint"]).exists():
        return result
    out = Path(result["checkpoint"]).parents[1] / "eval" if result["row"] != "fp_teacher" else Path(args.out) / "fp_teacher"
    report = run_eval(result["checkpoint"], num_samples=args.num_samples, scheduler=args.scheduler, steps=args.sampler_steps,
                      cfg_scale=args.cfg_scale, seed=0, batch_size=1000, device="auto", out_dir=str(out),
                      reference_size=args.reference_size, progress=False, **args.eval_data)
    step = report["checkpoint_info"].get("global_step") if isinstance(report.get("checkpoint_info"), dict) else None
    return {**result, **report["metrics"], "grid": report["grid"], "step": step}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--rows", nargs="*", default=list(ROWS), help=f"subset of {list(ROWS)} or plan:NAME=PATH")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--parallel", type=int, default=6)
    p.add_argument("--fit_timeout", type=float, default=None, help="seconds; a row still running is evaluated at its last checkpoint")
    p.add_argument("--seeds", type=int, nargs="*", help="override every row's seeds")
    p.add_argument("--num_samples", type=int, default=5000)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--sampler_steps", type=int, default=50)
    p.add_argument("--cfg_scale", type=float, default=1.5)
    p.add_argument("--reference_size", type=int, default=10000)
    p.add_argument("--data_root", default=None)
    p.add_argument("--no_teacher", action="store_true")
    args = p.parse_args()
    args.data_args = ["--data.init_args.root", args.data_root] if args.data_root else []
    args.eval_data = {"data_root": args.data_root} if args.data_root else {}
    Path(args.out).mkdir(parents=True, exist_ok=True)

    jobs = []
    for row in args.rows:
        if row.startswith("plan:"):  # plan:ampn_avg2=path/to/plan.yaml
            name, path = row[5:].split("=", 1)
            overrides, seeds = ["--model.plan", path], [0]
        else:
            overrides, seeds = ROWS[row]
            name = row
        for seed in args.seeds or seeds:
            jobs.append((name, overrides, seed))
    start = time.time()
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda j: fit(*j, args), jobs))
    print(f"fit: {len(jobs)} runs in {time.time() - start:.0f} s", flush=True)
    if not args.no_teacher:
        results.insert(0, dict(row="fp_teacher", seed=0, checkpoint=str(ROOT / "checkpoints" / "fmnist_dit_teacher")))
    done = []
    for r in results:
        done.append(evaluate(r, args))
        (Path(args.out) / "results.json").write_text(json.dumps(dict(args=vars(args), results=done), indent=2, default=str))
        print(json.dumps({k: done[-1].get(k) for k in ("row", "seed", "rc", "step", "fit_wall_s", "val_distill", "fid", "is_mean", "precision", "recall")}), flush=True)


if __name__ == "__main__":
    main()
