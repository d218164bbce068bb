"""Bit allocation under an average-bit budget: pure functions over a sensitivity table.

Layer i takes a width b_i from its options, at a loss increase s_i(b_i) (the sensitivity
table). With layer weights w_i (MACs per forward, or 1 for an unweighted average):

    minimise  sum_i s_i(b_i)   subject to   avg(b) = sum_i w_i b_i / sum_i w_i  <=  B

a multiple-choice knapsack. ``allocate_dp`` solves it exactly by dynamic programming over a
discretised cost; ``allocate_lagrangian`` is the equal-slope rule (minimise s_i(b) + lam w_i b / W
per layer, bisection on lam), fast and a cross-check: by weak duality its excess over the optimum
is at most lam * (B - avg(b_lam)), reported as ``gap_bound``.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

Table = dict[str, dict[int, float]]  # layer -> {bits: loss increase}


class InfeasibleBudget(ValueError):
    """The budget is below the smallest average the constraints allow."""


@dataclass
class Allocation:
    bits: dict[str, int]
    predicted: float  # sum_i s_i(b_i): the predicted loss increase
    average_bits: float  # sum_i w_i b_i / sum_i w_i
    budget: float
    method: str
    detail: dict = field(default_factory=dict)


def _matching(pattern: str, names: list[str], what: str) -> list[str]:
    hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        raise ValueError(f"{what} entry {pattern!r} matches no quantized layer; names look like {names[0]!r} "
                         "(fnmatch patterns such as '*.norm1.linear' are allowed)")
    return hits


def constrain(table: Table, pinned: dict[str, int] | None = None, min_bits: dict[str, int] | None = None) -> Table:
    """Each layer's allowed options: widths >= its min_bits, or only its pinned width.

    Keys of ``pinned``/``min_bits`` are layer names or fnmatch patterns; later keys override earlier ones.
    """
    names = list(table)
    low, pin = {}, {}
    for pattern, b in (min_bits or {}).items():
        low.update(dict.fromkeys(_matching(pattern, names, "min_bits"), b))
    for pattern, b in (pinned or {}).items():
        pin.update(dict.fromkeys(_matching(pattern, names, "pinned"), b))
    options = {}
    for n, row in table.items():
        if n in pin:
            if pin[n] not in row:
                raise ValueError(f"layer {n!r} is pinned to {pin[n]} bits, which is not a measured candidate "
                                 f"{sorted(row)}; add it to the candidates or pin another width")
            if pin[n] < low.get(n, 0):
                raise ValueError(f"layer {n!r} is pinned to {pin[n]} bits but its min_bits is {low[n]}; drop one of them")
            options[n] = {pin[n]: row[pin[n]]}
        else:
            options[n] = {b: s for b, s in sorted(row.items()) if b >= low.get(n, 0)}
            if not options[n]:
                raise ValueError(f"layer {n!r} has no candidate width >= its min_bits {low[n]} (candidates {sorted(row)})")
    return options


def average_bits(bits: dict[str, int], weights: dict[str, float]) -> float:
    return sum(weights[n] * b for n, b in bits.items()) / sum(weights[n] for n in bits)


def _check_weights(options: Table, weights: dict[str, float]) -> None:
    missing = [n for n in options if n not in weights]
    if missing:
        raise ValueError(f"no weight (MACs) for layers {missing[:3]}")
    bad = [n for n in options if not weights[n] > 0]
    if bad:
        raise ValueError(f"layer weights must be positive, got {[(n, weights[n]) for n in bad[:3]]}")


def check_feasible(options: Table, weights: dict[str, float], budget: float) -> None:
    """Raise InfeasibleBudget if even the smallest allowed widths exceed the budget."""
    _check_weights(options, weights)
    lowest = {n: min(row) for n, row in options.items()}
    total = sum(Fraction(weights[n]) for n in options)
    if sum(Fraction(weights[n]) * b for n, b in lowest.items()) > Fraction(budget) * total:
        raise InfeasibleBudget(
            f"budget {budget} average bits is infeasible: the smallest average the candidates, pinned and "
            f"min_bits allow is {average_bits(lowest, weights):.4f}; raise the budget or relax pinned/min_bits"
        )


def _result(bits: dict[str, int], table: Table, weights, budget: float, method: str, **detail) -> Allocation:
    predicted = sum(table[n][b] for n, b in bits.items())
    return Allocation(bits, predicted, average_bits(bits, weights), budget, method, detail)


def allocate_dp(table: Table, weights: dict[str, float], budget: float, pinned=None, min_bits=None,
                max_states: int = 1 << 20) -> Allocation:
    """Exact multiple-choice knapsack by dynamic programming.

    Discretisation: the extra cost of width b over layer i's lowest allowed width m_i is
    e_i(b) = w_i (b - m_i), the slack is S = B sum_i w_i - sum_i w_i m_i. With r = gcd of all
    e_i(b) (as exact rationals; for MACs weights an integer, for uniform weights 1), costs
    e / r and capacity floor(S / r) are integers and the DP is exact. If that needs more than
    ``max_states`` cost states, r is coarsened to S / max_states and costs rounded up: every
    solution found still meets the budget, but optimality is then only approximate
    (``detail["exact"]`` is False). Table: best[c] = min sum of s over the layers so far with
    total cost <= c; best'[c] = min_b best[c - e_i(b)/r] + s_i(b).
    """
    options = constrain(table, pinned, min_bits)
    check_feasible(options, weights, budget)
    names = list(options)
    lowest = {n: min(options[n]) for n in names}
    extra = {n: {b: Fraction(weights[n]) * (b - lowest[n]) for b in options[n]} for n in names}
    slack = Fraction(budget) * sum(Fraction(weights[n]) for n in names) - sum(
        Fraction(weights[n]) * lowest[n] for n in names)
    nonzero = [e for row in extra.values() for e in row.values() if e > 0]
    r = _rational_gcd(nonzero) if nonzero else Fraction(1)
    most = sum(max(row.values()) for row in extra.values())  # beyond this every width fits
    exact = math.floor(min(slack, most) / r) <= max_states
    if not exact:
        r = min(slack, most) / max_states
    capacity = math.floor(min(slack, most) / r)
    units = {n: [(b, math.ceil(e / r)) for b, e in row.items()] for n, row in extra.items()}

    best = np.zeros(capacity + 1)
    choice = np.zeros((len(names), capacity + 1), dtype=np.int8)
    for i, n in enumerate(names):
        new = np.full(capacity + 1, np.inf)
        for j, (b, u) in enumerate(units[n]):  # widths ascending: ties keep the cheaper width
            if u > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[u:] = best[: capacity + 1 - u] + table[n][b]
            better = cand < new
            new[better], choice[i, better] = cand[better], j
        best = new
    bits, c = {}, capacity
    for i in reversed(range(len(names))):
        b, u = units[names[i]][choice[i, c]]
        bits[names[i]], c = b, c - u
    bits = {n: bits[n] for n in names}
    return _result(bits, table, weights, budget, "dp", resolution=float(r), states=capacity + 1, exact=exact)


def _rational_gcd(values: list[Fraction]) -> Fraction:
    den = math.lcm(*(v.denominator for v in values))
    return Fraction(math.gcd(*(int(v * den) for v in values)), den)


def _hull(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Vertices (cost, loss, bits) of the lower convex hull, from the cheapest point to the first
    point of least loss: the only widths the Lagrangian rule can pick for lam >= 0."""
    hull: list[tuple[float, float, int]] = []
    for p in sorted(points):
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (x1 - x0) * (p[1] - y0) - (y1 - y0) * (p[0] - x0) > 0:  # left turn: keep
                break
            hull.pop()
        hull.append(p)
    end = min(range(len(hull)), key=lambda k: (hull[k][1], k))
    return hull[: end + 1]


def allocate_lagrangian(table: Table, weights: dict[str, float], budget: float, pinned=None,
                        min_bits=None) -> Allocation:
    """Equal-slope rule: each layer takes the hull vertex minimising s_i(b) + lam w_i b / W.

    On layer i's lower convex hull, with slopes g_ik = (s_i,k-1 - s_i,k) / (c_ik - c_i,k-1)
    (loss saved per average bit, decreasing in k), the choice at lam is the last vertex whose
    slope exceeds lam, so all layers sit where their slopes cross lam. The average bits fall as
    lam grows; bisection over the finitely many slopes finds the smallest lam that meets B. Layers
    tied at that lam (next slope == lam) then step up, in order, while the budget allows.
    """
    options = constrain(table, pinned, min_bits)
    check_feasible(options, weights, budget)
    names = list(options)
    total = sum(weights[n] for n in names)
    hulls = {n: _hull([(weights[n] * b / total, s, b) for b, s in options[n].items()]) for n in names}
    slopes = {n: [(h[k - 1][1] - h[k][1]) / (h[k][0] - h[k - 1][0]) for k in range(1, len(h))] for n, h in hulls.items()}

    def pick(lam: float) -> dict[str, int]:
        return {n: hulls[n][sum(g > lam for g in slopes[n])][2] for n in names}

    def fits(bits: dict[str, int]) -> bool:
        return sum(Fraction(weights[n]) * b for n, b in bits.items()) <= Fraction(budget) * sum(
            Fraction(weights[n]) for n in names)

    lams = sorted({0.0, *(g for gs in slopes.values() for g in gs)})
    lo, hi = 0, len(lams) - 1  # pick(lams[-1]) is all-cheapest, feasible by check_feasible
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(pick(lams[mid])) else (mid + 1, hi)
    lam, bits = lams[lo], pick(lams[lo])
    for n in names:  # layers whose next vertex has slope exactly lam tie there: take it while the budget allows
        k = sum(g > lam for g in slopes[n])
        if k < len(slopes[n]) and slopes[n][k] == lam and fits({**bits, n: hulls[n][k + 1][2]}):
            bits[n] = hulls[n][k + 1][2]
    gap = lam * max(0.0, budget - average_bits(bits, weights))
    return _result(bits, table, weights, budget, "lagrangian", lam=lam, gap_bound=gap)


METHODS = ("dp", "lagrangian")


def allocate(table: Table, weights: dict[str, float], budget: float, method: str = "dp", pinned=None, min_bits=None,
             max_states: int = 1 << 20) -> Allocation:
    """``allocate_dp`` or ``allocate_lagrangian`` by name."""
    if method == "dp":
        return allocate_dp(table, weights, budget, pinned, min_bits, max_states)
    if method == "lagrangian":
        return allocate_lagrangian(table, weights, budget, pinned, min_bits)
    raise ValueError(f"allocation method must be one of {METHODS}, got {method!r}")
