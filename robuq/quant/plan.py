"""Bit plans: per-layer activation widths (layer name -> bits), as AMPN writes and ``fit`` reads."""

from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PLAN_BITS = range(1, 9)


@dataclass
class BitPlan:
    bits: dict[str, int]
    budget: float | None = None  # target average activation bits
    weighting: str | None = None  # "macs" (bit-operations budget) | "uniform"
    candidates: list[int] | None = None
    method: str | None = None  # e.g. "dp", "lagrangian", "uniform"
    source: str | None = None  # checkpoint the sensitivities came from
    extra: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """Write YAML atomically (temp file + rename)."""
        d = {k: v for k, v in self.__dict__.items() if k != "extra" and v is not None}
        d.update(self.extra)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                yaml.safe_dump(d, f, sort_keys=False)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)  # a failed dump (e.g. a non-YAML value) must not leave the temp file
            raise

    @classmethod
    def load(cls, path: str | Path) -> "BitPlan":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"bit plan {path} does not exist")
        try:
            d = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"bit plan {path} is not valid YAML: {e}") from None
        if not isinstance(d, dict) or not isinstance(d.get("bits"), dict):
            raise ValueError(f"bit plan {path} must be a mapping with a 'bits' mapping of layer name -> bits")
        known = {"bits", "budget", "weighting", "candidates", "method", "source"}
        extra = {k: v for k, v in d.items() if k not in known}
        plan = cls(**{k: v for k, v in d.items() if k in known}, extra=extra)
        for name, b in plan.bits.items():
            check_plan_bits(name, b, path)
        return plan


def check_plan_bits(name: str, bits, where="bit plan") -> None:
    if not isinstance(name, str):
        raise ValueError(f"{where}: layer names must be strings (module names), got {name!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in PLAN_BITS:
        raise ValueError(f"{where}: layer {name!r} has activation width {bits!r}; widths must be integers in 1..8")


def as_bits(plan: "BitPlan | dict[str, int] | str | Path | None") -> dict[str, int]:
    """Normalise a plan given as a BitPlan, a dict or a YAML path."""
    if plan is None:
        return {}
    if isinstance(plan, (str, Path)):
        plan = BitPlan.load(plan)
    if not isinstance(plan, (BitPlan, dict)):
        raise ValueError(f"a bit plan must map layer names to bits, got a {type(plan).__name__}")
    bits = plan.bits if isinstance(plan, BitPlan) else dict(plan)
    for name, b in bits.items():
        check_plan_bits(name, b)
    return bits


def check_plan_layers(bits: dict[str, int], layers: list[str]) -> None:
    """Refuse a plan that names layers the model does not quantize (with close matches as hints)."""
    known = set(layers)
    unknown = [n for n in bits if n not in known]
    if unknown:
        hints = {n: difflib.get_close_matches(n, layers, n=1) for n in unknown[:5]}
        hint = "; ".join(f"{n!r} (did you mean {h[0]!r}?)" if h else repr(n) for n, h in hints.items())
        raise ValueError(
            f"bit plan names {len(unknown)} layer(s) this model does not quantize: {hint}. "
            f"The plan was made for another model or config; quantized layers look like {layers[0]!r}."
        )
