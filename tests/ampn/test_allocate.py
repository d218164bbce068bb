"""Allocation: DP optimal vs brute force, Lagrangian vs DP, budgets, constraints."""

import itertools
import random
from fractions import Fraction

import pytest

from robuq.ampn.allocate import (
    InfeasibleBudget,
    allocate,
    allocate_dp,
    allocate_lagrangian,
    average_bits,
    constrain,
)

CANDIDATES = [1, 2, 3, 4, 8]


def instance(rng: random.Random, layers: int, convex: bool = False):
    """A random table (layer -> {bits: loss increase}) and integer MAC-like weights."""
    table = {}
    for i in range(layers):
        if convex:  # decreasing and convex in bits: s(b) = a * 2^(-c b)
            a, c = rng.uniform(0.1, 5), rng.uniform(0.3, 1.5)
            table[f"l{i}"] = {b: a * 2 ** (-c * b) for b in CANDIDATES}
        else:
            table[f"l{i}"] = {b: rng.uniform(-0.2, 3) for b in rng.sample(CANDIDATES, rng.randint(1, 4))}
    weights = {n: rng.choice([1, 3, 12, 48, 64, 100]) for n in table}
    return table, weights


def brute_force(table, weights, budget):
    """min sum s over all width combinations with sum w b <= budget * sum w (exact), or None."""
    names = list(table)
    total = sum(weights.values())
    best = None
    for combo in itertools.product(*(sorted(table[n]) for n in names)):
        if sum(Fraction(weights[n]) * b for n, b in zip(names, combo)) <= Fraction(budget) * total:
            loss = sum(table[n][b] for n, b in zip(names, combo))
            best = loss if best is None else min(best, loss)
    return best


def test_dp_is_optimal_on_random_instances():
    rng = random.Random(0)
    for _ in range(150):
        table, weights = instance(rng, rng.randint(1, 5))
        budget = rng.choice([1.0, 1.5, 2.0, 2.25, 3.0, 4.5, 8.0])
        expected = brute_force(table, weights, budget)
        if expected is None:
            with pytest.raises(InfeasibleBudget):
                allocate_dp(table, weights, budget)
            continue
        got = allocate_dp(table, weights, budget)
        assert got.detail["exact"]
        assert got.predicted == pytest.approx(expected, abs=1e-9)
        assert got.average_bits <= budget + 1e-12
        assert got.predicted == pytest.approx(sum(table[n][b] for n, b in got.bits.items()))
        assert list(got.bits) == list(table)


def test_lagrangian_never_beats_dp_and_its_gap_is_bounded():
    rng = random.Random(1)
    for _ in range(150):
        table, weights = instance(rng, rng.randint(1, 6), convex=rng.random() < 0.5)
        budget = rng.choice([1.5, 2.0, 2.5, 3.0, 4.0, 8.0])
        try:
            dp = allocate_dp(table, weights, budget)
        except InfeasibleBudget:
            continue
        lag = allocate_lagrangian(table, weights, budget)
        assert lag.average_bits <= budget + 1e-12
        assert lag.predicted >= dp.predicted - 1e-9
        # weak duality: the optimum is at least the Lagrangian's loss minus lam * unused budget
        assert lag.predicted - dp.predicted <= lag.detail["gap_bound"] + 1e-9


def test_lagrangian_is_close_on_large_convex_instances():
    rng = random.Random(2)
    for budget in (1.5, 2.0, 2.5, 3.0):
        table, weights = instance(rng, 42, convex=True)
        dp, lag = allocate_dp(table, weights, budget), allocate_lagrangian(table, weights, budget)
        assert dp.predicted <= lag.predicted <= dp.predicted + 0.02 * sum(max(r.values()) for r in table.values())


def test_budget_met_exactly_when_every_bit_helps():
    table = {f"l{i}": {b: 10.0 / b for b in (1, 2, 3, 4)} for i in range(4)}  # strictly decreasing
    weights = dict.fromkeys(table, 1)
    for method in ("dp", "lagrangian"):
        for budget in (1.0, 1.5, 2.0, 2.75, 4.0):
            got = allocate(table, weights, budget, method)
            assert got.average_bits == budget  # 4 layers: every multiple of 1/4 is attainable
    assert allocate_dp(table, weights, 2.1).average_bits == 2.0  # never over budget
    assert allocate_dp(table, weights, 99).bits == dict.fromkeys(table, 4)


def test_infeasible_budget_names_the_minimum():
    table = {f"l{i}": {b: 0.0 for b in (1, 2, 3)} for i in range(3)}
    weights = {"l0": 1, "l1": 1, "l2": 2}
    for method in ("dp", "lagrangian"):
        with pytest.raises(InfeasibleBudget, match=r"smallest average .* is 2\.2500"):
            allocate(table, weights, 2.0, method, min_bits={"l2": 3, "l0": 2})
        with pytest.raises(InfeasibleBudget, match="is 1.0000"):
            allocate(table, weights, 0.5, method)


def test_pinned_and_min_bits_are_honoured():
    rng = random.Random(3)
    names = [f"transformer_blocks.{b}.{k}" for b in range(2) for k in ("attn1.to_q", "ff.net.2", "norm1.linear")]
    table = {n: {b: rng.uniform(0, 2) / b for b in CANDIDATES} for n in names}
    weights = {n: rng.randint(1, 50) for n in names}
    pinned = {"transformer_blocks.0.attn1.to_q": 8, "*.norm1.linear": 4}
    min_bits = {"*.ff.net.2": 3}
    for method in ("dp", "lagrangian"):
        got = allocate(table, weights, 4.0, method, pinned=pinned, min_bits=min_bits)
        assert got.bits["transformer_blocks.0.attn1.to_q"] == 8
        assert got.bits["transformer_blocks.0.norm1.linear"] == got.bits["transformer_blocks.1.norm1.linear"] == 4
        assert all(got.bits[n] >= 3 for n in names if n.endswith("ff.net.2"))
        assert got.average_bits <= 4.0
    options = constrain(table, pinned, min_bits)
    expected = brute_force(options, weights, 4.0)
    assert allocate_dp(table, weights, 4.0, pinned, min_bits).predicted == pytest.approx(expected)


@pytest.mark.parametrize(
    "pinned,min_bits,match",
    [
        ({"nope.*": 2}, None, "pinned entry 'nope.*' matches no quantized layer"),
        (None, {"x": 2}, "min_bits entry 'x' matches no quantized layer"),
        ({"a": 5}, None, "pinned to 5 bits, which is not a measured candidate"),
        ({"a": 2}, {"a": 3}, "pinned to 2 bits but its min_bits is 3"),
        (None, {"a": 5}, "no candidate width >= its min_bits 5"),
    ],
)
def test_bad_constraints_are_refused_with_the_layer_name(pinned, min_bits, match):
    table = {"a": {1: 1.0, 2: 0.5, 4: 0.0}, "b": {1: 1.0, 2: 0.0}}
    with pytest.raises(ValueError, match=match):
        allocate_dp(table, {"a": 1, "b": 1}, 2.0, pinned, min_bits)


def test_coarse_grid_still_meets_the_budget():
    rng = random.Random(4)
    table, _ = instance(rng, 12, convex=True)
    weights = {n: rng.randint(1000, 3000) for n in table}  # gcd 1: ~30k exact states
    coarse = allocate_dp(table, weights, 2.3, max_states=500)
    exact = allocate_dp(table, weights, 2.3)
    assert exact.detail["exact"]
    assert not coarse.detail["exact"] and coarse.detail["states"] == 501
    assert coarse.average_bits <= 2.3 and coarse.predicted >= exact.predicted - 1e-12
    assert exact.predicted <= allocate_lagrangian(table, weights, 2.3).predicted + 1e-12


def test_macs_weights_are_discretised_exactly_by_their_gcd():
    # the shipped teacher's shapes: q/k/v/out 256 x 192 x 192, fc1/fc2 256 x 192 x 768, adaLN 192 x 1152
    macs = {"q": 256 * 192 * 192, "fc1": 256 * 192 * 768, "adaLN": 192 * 1152}
    table = {n: {b: 1.0 / b for b in CANDIDATES} for n in macs}
    got = allocate_dp(table, macs, 2.0)
    assert got.detail["exact"] and got.detail["resolution"] == 192 * 1152 // 3  # gcd of w_i (b - 1)
    assert average_bits(got.bits, macs) <= 2.0
    assert got.predicted == pytest.approx(brute_force(table, macs, 2.0))


def test_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        allocate({"a": {1: 0.0}}, {"a": 1}, 1.0, "greedy")
