"""GPTQ for fused MoE experts: every expert calibrated on the tokens the router sends it.

transformers' fused experts (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]; see `fp4kit.nn.experts`)
are called as `experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`. A forward pre-hook on
the module sees which tokens go to which expert, so for every expert e

    X_e = hidden[tokens routed to e]                        [n_e, H]
    H_gate_up[e] += X_e^T X_e                               [H, H]
    Z_e = act(X_e gate_e^T) * (X_e up_e^T)                  [n_e, I]   the float expert's own intermediate
    H_down[e]    += Z_e^T Z_e                               [I, I]

The router weight scales the expert's output after down_proj, so it enters neither Hessian (GPTQ's
objective for an expert is its own output on its own tokens). The hook recomputes Z_e from the float
weights, once per routed token, so calibration costs about one extra expert forward.

An expert that no calibration token reached has n_e = 0: it is quantized from its weights alone (RTN, or
the scale search if the GPTQ config asks for one), exactly what `quantize_` gives it, so routing leaves
no calibration holes. NVFP4: gate and up of an expert keep one global scale (the amax of the whole
gate_up, as `FP4Experts.from_experts`), which vLLM's fused w13 needs.

Memory: E x (H^2 + I^2) accumulators per MoE layer (Qwen3-30B-A3B: 128 x (2048^2 + 768^2) float32 = 2.4 GB
per layer): pass `store_device="cpu"` through `CalibrationConfig` for large models, or quantize layer
by layer. Rotations (MR-GPTQ) do not apply to experts; their weights are GPTQ'd unrotated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fp4kit.formats import MXFP4Config, NVFP4Config, QuantizedTensor, quantize
from fp4kit.nn.experts import is_fused_experts
from fp4kit.nn.quantize import exclusion_reason

from .gptq import GPTQConfig, gptq
from .scale_search import scale_search


@dataclass
class ExpertHessians:
    """Per expert: Hessians of gate_up's input and of down's input (see the module docstring)."""

    gate_up: list  # [E] of calibrate.Hessian
    down: list

    @property
    def tokens(self) -> list[int]:
        return [h.tokens for h in self.gate_up]


def eligible_experts(model: nn.Module, config, filter_fn=None, ignore=()) -> dict[str, nn.Module]:
    """The fused experts modules `quantize_` would quantize, by name."""
    return {name: m for name, m in model.named_modules()
            if is_fused_experts(m) and exclusion_reason(name, m, config, filter_fn, ignore) is None}


def new_expert_hessians(module: nn.Module, dtype: torch.dtype, device) -> ExpertHessians:
    from .calibrate import Hessian

    e, two_i, h = module.gate_up_proj.shape
    device = device or module.gate_up_proj.device
    return ExpertHessians([Hessian(torch.zeros(h, h, dtype=dtype, device=device)) for _ in range(e)],
                          [Hessian(torch.zeros(two_i // 2, two_i // 2, dtype=dtype, device=device)) for _ in range(e)])


def expert_hook(module: nn.Module, hessians: ExpertHessians):
    """Forward pre-hook accumulating every expert's two Hessians from the tokens routed to it."""

    @torch.no_grad()
    def hook(m, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        i = m.gate_up_proj.shape[1] // 2
        for e in torch.unique(index).tolist():
            if not 0 <= e < m.gate_up_proj.shape[0]:
                continue  # transformers marks dropped slots with E
            x = hidden[(index == e).any(-1)]  # [n_e, H]
            hessians.gate_up[e].add(x)
            gu = x @ m.gate_up_proj[e].T.to(x.dtype)  # [n_e, 2I]
            hessians.down[e].add(m.act_fn(gu[:, :i]) * gu[:, i:])

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def gptq_experts(module: nn.Module, config: NVFP4Config | MXFP4Config, hessians: ExpertHessians | None,
                 gptq_config: GPTQConfig = GPTQConfig(), *, name: str = "experts") -> dict[int, tuple]:
    """{expert: (gate_up QuantizedTensor [2I, H], down QuantizedTensor [H, I])} for every expert: GPTQ where
    calibration tokens reached it, weight-only (RTN / scale search) where none did."""
    gu_all, down_all = module.gate_up_proj.detach(), module.down_proj.detach()
    out = {}
    for e in range(gu_all.shape[0]):
        pair = []
        for which, w, h in (("gate_up_proj", gu_all[e], hessians and hessians.gate_up[e]),
                            ("down_proj", down_all[e], hessians and hessians.down[e])):
            label = f"{name}.{e}.{which}"
            w = w.float()
            amax = w.abs().amax() if isinstance(config, NVFP4Config) else None  # gate and up: one global scale
            if h is not None and h.tokens > 0:
                qt = gptq(w, h.sum.to(w.device).float(), config, block_size=gptq_config.block_size,
                          damp=gptq_config.damp, act_order=gptq_config.act_order,
                          scale_search_config=gptq_config.scale_search, amax=amax,
                          dynamic_scales=gptq_config.dynamic_scales, name=label)
            elif gptq_config.scale_search is not None:
                qt = scale_search(w, config, gptq_config.scale_search, amax=amax, name=label)
            else:
                qt = quantize(w, config, name=label)
            pair.append(qt)
        out[e] = tuple(pair)
    return out


def expert_weight_error(module: nn.Module, qts: dict[int, tuple[QuantizedTensor, QuantizedTensor]],
                        hessians: ExpertHessians) -> list[float]:
    """Per expert, tr(dW H dW^T) of gate_up + down: GPTQ's objective, summed over the expert's tokens."""
    errs = []
    for e, (qgu, qdown) in qts.items():
        err = 0.0
        for w, q, h in ((module.gate_up_proj[e], qgu, hessians.gate_up[e]), (module.down_proj[e], qdown,
                                                                            hessians.down[e])):
            d = w.detach().float() - q.dequantize(torch.float32)
            err += float(torch.einsum("nk,kl,nl->", d, h.sum.float(), d))
        errs.append(err)
    return errs
