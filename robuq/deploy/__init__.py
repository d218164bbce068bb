"""Deployment: 2-bit packing of ternary weights, export/load of a packed DiT, inference layers, a diffusers pipeline."""

from .export import export, load_exported, weight_bytes
from .modules import PackedTernaryLinear, pack_model
from .pipeline import CUDAGraphDiT, RobuQDiTPipeline
from .pack import PACK_LAYOUT, pack_ternary, pack_weight, unpack_ternary, unpack_weight

__all__ = [
    "CUDAGraphDiT",
    "PACK_LAYOUT",
    "PackedTernaryLinear",
    "RobuQDiTPipeline",
    "export",
    "load_exported",
    "pack_model",
    "pack_ternary",
    "pack_weight",
    "unpack_ternary",
    "unpack_weight",
    "weight_bytes",
]
