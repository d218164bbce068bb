"""AMPN: activation-only mixed precision. Per-layer sensitivities on a QAT-adapted student,
bit allocation under an average-bit budget, and the bit plan ``fit`` reads (docs/AMPN.md)."""

from .allocate import Allocation, InfeasibleBudget, allocate, allocate_dp, allocate_lagrangian, average_bits, constrain
from .heatmap import plan_grid, save_heatmap
from .sensitivity import SensitivityCache, layer_macs, measure_layer, ptq_sensitivity, qat_sensitivity

__all__ = [
    "Allocation",
    "InfeasibleBudget",
    "SensitivityCache",
    "allocate",
    "allocate_dp",
    "allocate_lagrangian",
    "average_bits",
    "constrain",
    "layer_macs",
    "measure_layer",
    "plan_grid",
    "ptq_sensitivity",
    "qat_sensitivity",
    "save_heatmap",
]
