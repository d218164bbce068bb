"""Quantizers, the Hadamard transform and one-call model conversion."""

from .config import QuantConfig
from .context import timestep_group_ids, timestep_groups
from .convert import QuantReport, act_bits, lsq_quantizers, quant_layers, quantize_, set_act_bits
from .hadamard import HadamardRotation, hadamard_matrix, hadamard_transform, supported_bases
from .linear import QuantLinear
from .lsq import LSQQuantizer
from .plan import BitPlan
from .robust import RobustQuantizer
from .ternary import TernaryWeight, ternary_codes

__all__ = [
    "BitPlan",
    "HadamardRotation",
    "LSQQuantizer",
    "QuantConfig",
    "QuantLinear",
    "QuantReport",
    "RobustQuantizer",
    "TernaryWeight",
    "act_bits",
    "hadamard_matrix",
    "hadamard_transform",
    "lsq_quantizers",
    "quant_layers",
    "quantize_",
    "set_act_bits",
    "supported_bases",
    "ternary_codes",
    "timestep_group_ids",
    "timestep_groups",
]
