"""`quantize_(model, config)`: swap every eligible `nn.Linear` for an `FP4Linear`, in place.

Nothing is patched: each layer is replaced by a new module on its parent. Every linear layer ends
up in exactly one list of the returned `QuantizeReport`, quantized or excluded with its reason:

    "matches ignore pattern 'lm_head'"     (lm_head is ignored by default: it is tied to the
                                            embedding in many models and is the most sensitive)
    "filter_fn returned False"
    "in_features 100 not divisible by block size 16"

A weight holding NaN or Inf raises, naming the layer: quantizing it would silently corrupt it. All
weights are checked before the first swap, so a failure leaves the model untouched.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

from torch import nn
from tqdm.auto import tqdm

from fp4kit.formats import MXFP4Config, NVFP4Config, check_finite

from .linear import FP4Linear

DEFAULT_IGNORE = ("lm_head",)


@dataclass
class QuantizeReport:
    quantized: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"quantized {len(self.quantized)} linear layers, excluded {len(self.excluded)}"]
        lines += [f"  excluded {name}: {reason}" for name, reason in self.excluded.items()]
        return "\n".join(lines)


def matches(name: str, pattern: str) -> bool:
    """A layer matches a pattern by glob on its full name or by being that name's last part(s)."""
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.endswith("." + pattern)


def exclusion_reason(name: str, module: nn.Linear, config, filter_fn, ignore) -> str | None:
    for pattern in ignore:
        if matches(name, pattern):
            return f"matches ignore pattern {pattern!r}"
    if filter_fn is not None and not filter_fn(module, name):
        return "filter_fn returned False"
    if module.in_features % config.block_size:
        return f"in_features {module.in_features} not divisible by block size {config.block_size}"
    return None


def quantize_(model: nn.Module, config: NVFP4Config | MXFP4Config,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, *,
              ignore: tuple[str, ...] = DEFAULT_IGNORE, progress: bool = True) -> QuantizeReport:
    """Replace eligible linear layers of `model` by `FP4Linear`; return what was done and why not."""
    if not isinstance(config, (NVFP4Config, MXFP4Config)):
        raise TypeError(f"quantize_ needs an NVFP4Config or MXFP4Config, got {type(config).__name__}")
    report = QuantizeReport()
    chosen = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        reason = exclusion_reason(name, module, config, filter_fn, ignore)
        if reason:
            report.excluded[name] = reason
        else:
            check_finite(module.weight.detach(), f"{name}.weight")  # before any swap: all or nothing
            chosen.append((name, module))
    for name, module in tqdm(chosen, desc=f"quantize {config.name}", disable=not progress, leave=False):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP4Linear.from_linear(module, config, name=name))
        report.quantized.append(name)
    return report
