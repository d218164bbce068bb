"""Allocate again from a saved sensitivity table: a new budget or constraints, no model, no GPU.

    python -m robuq.ampn.replan out/search_fmnist/sensitivity.json --budget 3.0 --out plan_avg3.yaml
    python -m robuq.ampn.replan out/search_fmnist/sensitivity.json --table ptq --out plan_ptq.yaml

Writes the plan YAML (``fit --model.plan``) and its heatmap next to it (same name, ``.png``).
"""

from __future__ import annotations

import json
from pathlib import Path

from robuq.ampn.allocate import METHODS, allocate
from robuq.ampn.heatmap import save_plan

TABLES = ("qat", "ptq")


def replan(table_path: str, out: str | None = None, budget: float = 2.0, table: str = "qat", weighting: str = "macs",
           method: str = "dp", pinned: dict[str, int] | None = None, min_bits: dict[str, int] | None = None) -> dict:
    """Allocate widths from ``table_path`` (a ``sensitivity.json`` of ``search``) and write ``out`` + its heatmap.

    Args:
        table_path: sensitivity.json written by ``python -m robuq.ampn.search``.
        out: the plan YAML to write (default: ``plan_{table}_avg{budget}.yaml`` beside the table).
        budget: average activation bits allowed (<=).
        table: "qat" (the search's sensitivity) or "ptq" (the PTQ comparison table, for the PTQ-guided plan).
        weighting: "macs" (bit-operations budget) or "uniform".
        method: "dp" (exact) or "lagrangian".
        pinned: layer name or fnmatch pattern -> fixed width.
        min_bits: layer name or fnmatch pattern -> smallest allowed width.
    """
    if table not in TABLES:
        raise ValueError(f"table must be one of {TABLES}, got {table!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    path = Path(table_path)
    out = out or str(path.with_name(f"plan_{table}_avg{budget:g}.yaml"))
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: run `python -m robuq.ampn.search` first") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a sensitivity table ({e})") from None
    rows, macs = saved.get(table), saved.get("macs")
    if not rows or not macs or (table == "qat" and len(rows) < len(macs)):
        raise ValueError(f"{path} has no complete {table!r} table (was the search interrupted, or run with ptq: false?); "
                         "rerun the search with the same out_dir to finish it")
    sens = {n: {int(b): s for b, s in row.items()} for n, row in rows.items()}
    weights = macs if weighting == "macs" else dict.fromkeys(macs, 1)
    best = allocate(sens, weights, budget, method, pinned, min_bits)
    qat = {n: {int(b): s for b, s in row.items()} for n, row in saved["qat"].items()}
    report = dict(table=table, predicted_loss_increase=best.predicted,
                  qat_predicted_loss_increase=sum(qat[n][b] for n, b in best.bits.items()) if len(qat) == len(macs) else None,
                  average_bits=best.average_bits, base_bits=saved.get("base_bits"), base_loss=saved.get("base_loss"),
                  **best.detail)
    save_plan(best.bits, out, label="AMPN" if table == "qat" else "PTQ-guided", budget=budget, weighting=weighting,
              candidates=saved.get("candidates"), method=method, source=f"{saved.get('source')} ({table} table of {path})",
              average_bits=best.average_bits, report=report, weights=weights)
    return dict(plan=str(out), **report)


def main(args: list[str] | None = None) -> dict:
    from jsonargparse import auto_cli
    from rich.console import Console

    summary = auto_cli(replan, args=args, as_positional=True)
    Console(stderr=True).print_json(data=summary)
    return summary


if __name__ == "__main__":
    main()
