"""QuantConfig: the declarative description of how ``quantize_`` converts a DiT."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .lsq import MODES, STATS, check_bits
from .robust import ROTATIONS
from .ternary import GRANULARITIES

# Every Linear inside diffusers' DiT transformer blocks: attention, MLP and adaLN modulation.
BLOCK_LINEARS = [
    "transformer_blocks.*.attn1.to_q",
    "transformer_blocks.*.attn1.to_k",
    "transformer_blocks.*.attn1.to_v",
    "transformer_blocks.*.attn1.to_out.0",
    "transformer_blocks.*.ff.net.0.proj",
    "transformer_blocks.*.ff.net.2",
    "transformer_blocks.*.norm1.linear",
]
EMBEDDER_LINEARS = ["transformer_blocks.*.norm1.emb.timestep_embedder.linear_*"]
FINAL_LINEARS = ["proj_out_1", "proj_out_2"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to us


# What each field annotation accepts: (in words, check). YAML and plain dicts reach QuantConfig
# untyped, so a string "2", a bool for an int, or "no" for a bool must be refused here.
_TYPES = {
    "int": ("an integer", _is_int),
    "int | None": ("an integer or null", lambda v: v is None or _is_int(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "list[str]": ("a list of strings (fnmatch patterns)",
                  lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v)),
}


@dataclass
class QuantConfig:
    """How to quantize a DiT (defaults: W1.58A2, Hadamard RobustQuantizer, dynamic per-token).

    Layers are chosen by fnmatch patterns on module names (``include`` minus ``exclude``);
    ``quantize_embedders`` / ``quantize_final`` add the timestep-embedder MLPs / final layer,
    which the field keeps in full precision by default. The patch embedding is a Conv2d and
    always stays in full precision.
    """

    act_bits: int = 2  # default activation width; 16 = activations not quantized
    act_mode: str = "dynamic"  # "static" (learned step) | "dynamic" (per-token stat * learned alpha)
    act_stat: str = "rms"  # per-token statistic for dynamic mode: "rms" | "absmax"
    act_signed: bool = True
    timestep_groups: int = 1  # > 1: one learned step per timestep group
    rotation: str = "kronecker"  # "kronecker" (H_m (x) H_2^k) | "block" (power-of-two blocks) | "none"
    block_size: int | None = None  # for rotation="block"; default: largest power of two dividing the dim
    random_signs: bool = True
    seed: int = 0
    weight: str = "ternary"  # "ternary" | "none" (full-precision weights)
    weight_granularity: str = "channel"  # absmean scale per output "channel" | per "tensor"
    include: list[str] = field(default_factory=lambda: list(BLOCK_LINEARS))
    exclude: list[str] = field(default_factory=list)
    quantize_embedders: bool = False
    quantize_final: bool = False

    def __post_init__(self):
        check_bits(self.act_bits, "QuantConfig.act_bits")
        for name, value, allowed in [
            ("act_mode", self.act_mode, MODES),
            ("act_stat", self.act_stat, STATS),
            ("rotation", self.rotation, ROTATIONS),
            ("weight", self.weight, ("ternary", "none")),
            ("weight_granularity", self.weight_granularity, GRANULARITIES),
        ]:
            if value not in allowed:
                raise ValueError(f"QuantConfig.{name} must be one of {allowed}, got {value!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want, ok = _TYPES[f.type]
            if not ok(value):
                raise ValueError(f"QuantConfig.{f.name} must be {want}, got {value!r} ({type(value).__name__})")
        if self.timestep_groups < 1:
            raise ValueError(f"QuantConfig.timestep_groups must be a positive integer, got {self.timestep_groups!r}")

    def patterns(self) -> list[str]:
        extra = (EMBEDDER_LINEARS if self.quantize_embedders else []) + (FINAL_LINEARS if self.quantize_final else [])
        return list(self.include) + extra

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """A QuantConfig from a plain dict (e.g. YAML); unknown keys and wrongly typed values are refused."""
        if not isinstance(d, dict):
            raise ValueError(f"a QuantConfig must be given as a mapping of its fields, got {type(d).__name__}: {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(f"unknown QuantConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "QuantConfig":
        d = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a QuantConfig YAML must be a mapping, got {type(d).__name__}")
        return cls.from_dict(d)
