"""``quantize_(model, config, plan)``: convert a DiT in place, torchao style, in one call."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import QuantConfig
from .context import set_timestep_groups, timestep_group_ids
from .linear import QuantLinear
from .lsq import LSQQuantizer
from .plan import BitPlan, as_bits, check_plan_layers
from .robust import RobustQuantizer
from .ternary import TernaryWeight


@dataclass
class QuantReport:
    """What ``quantize_`` did: converted layers (name -> (in, out, act bits)) and Linears kept FP."""

    converted: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        widths: dict[int, int] = {}
        for _, _, b in self.converted.values():
            widths[b] = widths.get(b, 0) + 1
        summary = ", ".join(f"A{b}: {n}" for b, n in sorted(widths.items()))
        return f"quantized {len(self.converted)} Linear layers ({summary}); kept {len(self.kept)} in full precision"


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _make_layer(name: str, linear: nn.Linear, config: QuantConfig, bits: int) -> QuantLinear:
    try:
        act = RobustQuantizer(
            linear.in_features,
            bits=bits,
            rotation=config.rotation,
            block_size=config.block_size,
            random_signs=config.random_signs,
            seed=config.seed,
            signed=config.act_signed,
            mode=config.act_mode,
            stat=config.act_stat,
            groups=config.timestep_groups,
        )
    except ValueError as e:
        raise ValueError(f"cannot quantize layer {name!r}: {e}") from None
    weight_quant = TernaryWeight(config.weight_granularity) if config.weight == "ternary" else None
    return QuantLinear.from_linear(linear, act, weight_quant)


def quantize_(model: nn.Module, config: QuantConfig | None = None, plan: BitPlan | dict | str | None = None) -> QuantReport:
    """Replace the matching ``nn.Linear`` layers of ``model`` by ``QuantLinear`` (in place).

    ``plan`` overrides ``config.act_bits`` per layer (a BitPlan, a dict or a plan YAML path).
    Everything is validated and built before the first swap, so a refused plan or an
    unsupported width leaves the model untouched.
    """
    config = config or QuantConfig()
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model is already quantized (it contains QuantLinear layers); convert a full-precision model")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    patterns = config.patterns()
    targets = {n: m for n, m in linears.items() if _matches(n, patterns) and not _matches(n, config.exclude)}
    if not targets:
        raise ValueError(f"no nn.Linear matched the include patterns {patterns} (minus exclude {config.exclude})")
    bits = as_bits(plan)
    check_plan_layers(bits, list(targets))

    new = {n: _make_layer(n, m, config, bits.get(n, config.act_bits)) for n, m in targets.items()}
    for name, layer in new.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)

    if config.timestep_groups > 1:
        _set_groups_from_timestep(model, config.timestep_groups)
    report = QuantReport(kept=[n for n in linears if n not in targets])
    for n, layer in new.items():
        report.converted[n] = (layer.in_features, layer.out_features, layer.act.quantizer.bits)
    return report


def _set_groups_from_timestep(model: nn.Module, groups: int) -> None:
    """Make the model publish each sample's timestep group to its quantizers on every call."""

    def before(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        x = kwargs.get("hidden_states", args[0] if args else None)
        if t is None or x is None:
            raise ValueError("per-timestep-group quantizers need the model called as model(x, timestep=t, ...)")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        module._robuq_previous_groups = set_timestep_groups(timestep_group_ids(t, groups))

    def after(module, args, kwargs, output):
        set_timestep_groups(module._robuq_previous_groups)

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True, always_call=True)


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def act_bits(model: nn.Module) -> dict[str, int]:
    """The model's current bit plan: quantized layer name -> activation bits."""
    return {n: m.act.quantizer.bits for n, m in quant_layers(model).items()}


def set_act_bits(model: nn.Module, plan: BitPlan | dict | str, reinit: bool = True) -> None:
    """Change activation widths of an already quantized model (validated first, then applied)."""
    layers = quant_layers(model)
    bits = as_bits(plan)
    check_plan_layers(bits, list(layers))
    for n, b in bits.items():
        layers[n].act.quantizer.set_bits(b, reinit=reinit)


def lsq_quantizers(model: nn.Module) -> dict[str, LSQQuantizer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LSQQuantizer)}
