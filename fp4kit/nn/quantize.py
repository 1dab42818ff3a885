"""`quantize_(model, config)`: swap every eligible `nn.Linear` for an `FP4Linear`, in place.

Nothing is patched: each layer is replaced by a new module on its parent. Every linear layer ends
up in exactly one list of the returned `QuantizeReport`, quantized or excluded with its reason:

    "matches ignore pattern 'lm_head'"     (lm_head is ignored by default: it is tied to the
                                            embedding in many models and is the most sensitive)
    "filter_fn returned False"
    "in_features 100 not divisible by block size 16"

Fused shards share one NVFP4 global scale: vLLM fuses q/k/v (and gate/up, and MoE w1/w3) into one
matrix with one per-tensor scale, so siblings in a `FUSED_GROUPS` entry are quantized with the
amax of the whole group.

MoE experts that transformers keeps fused in 3-D parameters (Qwen3-MoE, Mixtral, ...) become
`FP4Experts` (see experts.py): every expert quantized, gate and up of each expert sharing one
global scale. They are listed in the report under the experts module's name.

A `RotatedLinear` (a float layer holding W R that rotates its input online, see rotation.py) is
quantized like an nn.Linear and becomes an FP4Linear with the same rotation.

A weight holding NaN or Inf raises, naming the layer: quantizing it would silently corrupt it. All
weights are checked before the first swap, so a failure leaves the model untouched.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

from torch import nn
from tqdm.auto import tqdm

from fp4kit.formats import FP8Config, MXFP4Config, NVFP4Config, check_finite

from .experts import FP4Experts, experts_exclusion_reason, is_fused_experts
from .linear import FP4Linear
from .rotation import RotatedLinear

DEFAULT_IGNORE = ("lm_head",)
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))
LINEAR_TYPES = (nn.Linear, RotatedLinear)  # exact types quantize_ swaps (not subclasses such as LoRA or QAT)


def is_plain_linear(module: nn.Module) -> bool:
    return type(module) in LINEAR_TYPES


@dataclass
class QuantizeReport:
    quantized: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    rotated: dict[str, str] = field(default_factory=dict)  # name -> "online" or "folded into <producer>"

    def summary(self) -> str:
        lines = [f"quantized {len(self.quantized)} layers, excluded {len(self.excluded)}"]
        lines += [f"  excluded {name}: {reason}" for name, reason in self.excluded.items()]
        if self.rotated:
            online = sum(v == "online" for v in self.rotated.values())
            lines.append(f"rotated {len(self.rotated)} layers: {online} online, {len(self.rotated) - online} folded")
        return "\n".join(lines)


def matches(name: str, pattern: str) -> bool:
    """A layer matches a pattern by glob on its full name or by being that name's last part(s)."""
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.endswith("." + pattern)


def exclusion_reason(name: str, module: nn.Module, config, filter_fn, ignore) -> str | None:
    for pattern in ignore:
        if matches(name, pattern):
            return f"matches ignore pattern {pattern!r}"
    if filter_fn is not None and not filter_fn(module, name):
        return "filter_fn returned False"
    if not isinstance(module, nn.Linear):
        return experts_exclusion_reason(module, config)
    if module.in_features % config.block_size:
        return f"in_features {module.in_features} not divisible by block size {config.block_size}"
    return None


def shared_amax(chosen: list[tuple[str, nn.Linear]]) -> dict:
    """Joint absolute max of each fused group of sibling layers (only groups with two or more members)."""
    by_name = dict(chosen)
    out = {}
    for name in by_name:
        parent, _, child = name.rpartition(".")
        for group in FUSED_GROUPS:
            members = [f"{parent}.{c}" if parent else c for c in group]
            members = [m for m in members if m in by_name]
            if child in group and len(members) > 1:
                out[name] = max(by_name[m].weight.detach().abs().max() for m in members).float()
    return out


def quantize_(model: nn.Module, config: NVFP4Config | MXFP4Config,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, *,
              ignore: tuple[str, ...] = DEFAULT_IGNORE,
              activations: NVFP4Config | MXFP4Config | FP8Config | None = None,
              input_amax: dict | None = None, weights: dict | None = None, progress: bool = True) -> QuantizeReport:
    """Replace eligible linear layers of `model` by `FP4Linear`; return what was done and why not.

    `activations` also quantizes each layer's input: W4A4 (NVFP4Config / MXFP4Config) or W4A8
    (FP8Config(FP8Granularity.TOKEN), dynamic per-token scales). NVFP4 inputs need a static per-tensor
    scale: `input_amax` maps layer names to calibrated input maxima (see `observe_input_amax`).
    `weights` maps layer names to weights an algorithm already quantized (GPTQ, scale search): a
    QuantizedTensor for a linear layer, {expert: (gate_up, down)} for fused experts; layers (and
    experts) not in it are quantized round-to-nearest.
    """
    if not isinstance(config, (NVFP4Config, MXFP4Config)):
        raise TypeError(f"quantize_ needs an NVFP4Config or MXFP4Config, got {type(config).__name__}")
    report = QuantizeReport()
    chosen, experts = [], []
    for name, module in model.named_modules():
        fused = is_fused_experts(module)
        if not is_plain_linear(module) and not fused:
            continue
        reason = exclusion_reason(name, module, config, filter_fn, ignore)
        if reason:
            report.excluded[name] = reason
        elif fused:
            if activations is not None:
                raise ValueError(f"{name}: input (activation) quantization of fused MoE experts is not supported; "
                                 f"quantize weights only, or pass ignore=(..., {name!r}) to keep them in float")
            experts.append((name, module))
        else:
            check_finite(module.weight.detach(), f"{name}.weight")  # before any swap: all or nothing
            if isinstance(activations, NVFP4Config) and name not in (input_amax or {}):
                raise ValueError(f"{name}: NVFP4 activations need a calibrated input amax (input_amax[{name!r}])")
            chosen.append((name, module))
    for name, module in experts:
        check_finite(module.gate_up_proj.detach(), f"{name}.gate_up_proj")
        check_finite(module.down_proj.detach(), f"{name}.down_proj")
    amax = shared_amax(chosen) if isinstance(config, NVFP4Config) else {}
    todo = chosen + experts
    for name, module in tqdm(todo, desc=f"quantize {config.name}", disable=not progress, leave=False):
        if isinstance(module, nn.Linear):
            new = FP4Linear.from_linear(module, config, name=name, amax=amax.get(name), input_config=activations,
                                        weight=(weights or {}).get(name))
            if isinstance(activations, NVFP4Config):
                new.set_input_amax(input_amax[name])
        else:
            new = FP4Experts.from_experts(module, config, name=name, weights=(weights or {}).get(name))
        _replace(model, name, new)
        report.quantized.append(name)
    return report


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
