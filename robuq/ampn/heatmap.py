"""A bit plan as a picture: rows = transformer blocks, columns = layer kinds, colour = bits; and
``save_plan``, which writes a searched plan with its picture."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from robuq.quant import BitPlan

KINDS = {
    "attn1.to_q": "q",
    "attn1.to_k": "k",
    "attn1.to_v": "v",
    "attn1.to_out.0": "out",
    "ff.net.0.proj": "fc1",
    "ff.net.2": "fc2",
    "norm1.linear": "adaLN",
}


def cell(name: str) -> tuple[str, str]:
    """(row, column) of a layer: its block and kind; layers outside the blocks go to row "other"."""
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
    return (f"block {m[1]}", KINDS.get(m[2], m[2])) if m else ("other", name)


def plan_grid(bits: dict[str, int]) -> tuple[list[str], list[str], np.ndarray]:
    """(row labels, column labels, bits matrix with NaN where no layer)."""
    cells: dict[tuple[str, str], int] = {}
    rows, cols = [], list(KINDS.values())
    for name, b in bits.items():
        row, col = cell(name)
        rows += [row] if row not in rows else []
        cols += [col] if col not in cols else []
        cells[row, col] = b
    rows.sort(key=lambda r: (r == "other", int(r.split()[1]) if r != "other" else 0))
    cols = [c for c in cols if any(col == c for _, col in cells)]
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), b in cells.items():
        grid[rows.index(r), cols.index(c)] = b
    return rows, cols, grid


def save_heatmap(bits: dict[str, int], path: str | Path, candidates: list[int], title: str = "",
                 weights: dict[str, float] | None = None) -> None:
    """PNG heatmap of a plan, the width written in every cell; with ``weights`` (MACs) each column
    is labelled with its share of the total."""
    rows, cols, grid = plan_grid(bits)
    widths = sorted(set(candidates) | set(bits.values()))
    cmap = ListedColormap(matplotlib.colormaps["viridis"](np.linspace(0.05, 0.95, len(widths))))
    index = np.where(np.isnan(grid), np.nan, np.searchsorted(widths, np.nan_to_num(grid)))  # colour = rank of width
    fig = Figure(figsize=(1.6 + 0.75 * len(cols), 1.2 + 0.38 * len(rows)))  # no pyplot: no global backend state
    ax = fig.subplots()
    image = ax.imshow(index, cmap=cmap, norm=BoundaryNorm(np.arange(len(widths) + 1) - 0.5, len(widths)), aspect="auto")
    for (i, j), b in np.ndenumerate(grid):
        if not np.isnan(b):
            dark = index[i, j] < len(widths) / 2
            ax.text(j, i, f"{int(b)}", ha="center", va="center", fontsize=9, color="white" if dark else "black")
    labels = cols
    if weights is not None:
        total = sum(weights[n] for n in bits)
        share = {c: sum(weights[n] for n in bits if cell(n)[1] == c) / total for c in cols}
        labels = [f"{c}\n{share[c]:.1%}" for c in cols]
    ax.set_xticks(range(len(cols)), labels)
    ax.set_yticks(range(len(rows)), rows)
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    bar = fig.colorbar(image, ax=ax, ticks=range(len(widths)), fraction=0.05, pad=0.03)
    bar.ax.set_yticklabels([f"A{b}" for b in widths])
    if title:
        ax.set_title(title, fontsize=9, pad=24)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def save_plan(bits: dict[str, int], path: str | Path, *, label: str, budget: float, weighting: str,
              candidates: list[int] | None, method: str, source: str, average_bits: float, report: dict,
              weights: dict[str, float], note: str = "") -> None:
    """Write a searched plan (``fit --model.plan``) to ``path`` and its heatmap beside it (``.png``),
    titled "<label> <method>: budget, weighting, average bits" (+ ``note`` on a second line)."""
    BitPlan(bits=bits, budget=budget, weighting=weighting, candidates=candidates, method=method, source=source,
            extra={"search": report}).save(path)
    title = f"{label} {method}: budget {budget:g} ({weighting}), average {average_bits:.3f} bits"
    save_heatmap(bits, Path(path).with_suffix(".png"), candidates or sorted(set(bits.values())),
                 title + (f"\n{note}" if note else ""), weights if weighting == "macs" else None)
