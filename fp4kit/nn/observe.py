"""Observe what flows into linear layers: the calibration data for static activation scales.

    amax = observe_input_amax(model, lambda: model(calibration_ids))

registers a forward pre-hook on every `nn.Linear` (or the names `filter_fn` keeps), runs the
callable, removes the hooks (also on error), and returns {layer name: max |input|} as float32
scalars. NVFP4 activations use it for their static per-tensor `input_global_scale`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


@torch.no_grad()
def observe_input_amax(model: nn.Module, run: Callable[[], object],
                       filter_fn: Callable[[nn.Module, str], bool] | None = None) -> dict[str, torch.Tensor]:
    amax: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def record(_module, args):
            a = args[0].detach().abs().amax().float().cpu()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return record

    try:
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(m, name)):
                handles.append(m.register_forward_pre_hook(hook(name)))
        run()
    finally:
        for h in handles:
            h.remove()
    return amax
