"""Deployment: 2-bit packing of ternary weights, export/load of a packed DiT, inference layers."""

from .export import export, load_exported, weight_bytes
from .modules import PackedTernaryLinear, pack_model
from .pack import PACK_LAYOUT, pack_ternary, pack_weight, unpack_ternary, unpack_weight

__all__ = [
    "PACK_LAYOUT",
    "PackedTernaryLinear",
    "export",
    "load_exported",
    "pack_model",
    "pack_ternary",
    "pack_weight",
    "unpack_ternary",
    "unpack_weight",
    "weight_bytes",
]
