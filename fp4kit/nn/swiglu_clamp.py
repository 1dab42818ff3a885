"""SwiGLU clamp: bound the gate and up projections of a gated MLP, a stability option for FP4 training.

A Llama/Qwen/Mistral/Gemma MLP computes `down(act(gate(x)) * up(x))`. Rare huge activations in that
product (outliers that grow during training) blow up FP4/FP8 scales and destabilize low-precision
training. DeepSeek-V4 and gpt-oss bound them with a fixed limit L on the projections' outputs:

    g = min(gate(x), L)                   gate input: clamped from above only (act(g) ~ 0 for g << 0 anyway)
    u = clamp(up(x), -L, L)               up input: clamped on both sides
    y = down(act(g) * u)

This is exactly transformers' `DeepseekV4MLP.forward` / `DeepseekV4Experts._apply_gate`
(`models/deepseek_v4/modeling_deepseek_v4.py`, `config.swiglu_limit`, default 10.0). gpt-oss
(`models/gpt_oss/modeling_gpt_oss.py`, `swiglu_limit = 7.0`) applies the same two clamps but its own
activation, `g * sigmoid(1.702 g) * (u + 1)`; here the model's own `act_fn` (SiLU for SwiGLU) is kept,
so below the limit the module computes the original MLP bit for bit.

Gradient: `clamp` passes the gradient where the value is inside [lo, hi] (boundary included) and
gives zero beyond it, so a clamped unit stops pushing its weights further out.

The clamp is part of the function. Train with it and the model must also run with it: this module
stays in place through `fake_quant.convert` (it only holds the projections, which are swapped under
it). An exported Llama checkpoint has no place for a limit, so a runtime that loads it (vLLM,
transformers) runs *unclamped*; `clip_fraction()` counts how often the limit bound on data, and
where it never binds the two functions are equal.

    names = apply_swiglu_clamp(model, 10.0)    # every gated MLP (dense, or upcycled experts) swapped
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


class ClampedSwiGLU(nn.Module):
    """`down(act(min(gate(x), L)) * clamp(up(x), -L, L))`, holding the original MLP's projections.

    The submodule names (`gate_proj`, `up_proj`, `down_proj`) are the original ones, so state-dict
    keys, layer names for quantization and fused-group detection are unchanged. Buffers `seen` and
    `clipped` count the gate/up values computed and those beyond the limit (under no_grad).
    """

    def __init__(self, mlp: nn.Module, limit: float):
        super().__init__()
        if not limit > 0:
            raise ValueError(f"SwiGLU clamp limit must be > 0, got {limit}")
        missing = [p for p in GATED_MLP_PARTS if not hasattr(mlp, p)]
        if missing:
            raise ValueError(f"{type(mlp).__name__} is not a gated MLP: it lacks {missing}")
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.limit = float(limit)
        device = next(mlp.parameters()).device
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("clipped", torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., hidden] -> gate, up: [..., intermediate] -> [..., hidden]
        gate, up = self.gate_proj(x), self.up_proj(x)
        with torch.no_grad():
            self.seen += 2 * gate.numel()
            self.clipped += (gate > self.limit).sum() + (up.abs() > self.limit).sum()
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return self.down_proj(self.act_fn(gate) * up)

    def clip_fraction(self) -> float:
        """Share of gate/up values beyond the limit since the last `reset_counts` (0 when none seen)."""
        seen = int(self.seen)
        return int(self.clipped) / seen if seen else 0.0

    def reset_counts(self) -> None:
        self.seen.zero_()
        self.clipped.zero_()

    def extra_repr(self) -> str:
        return f"limit={self.limit:g}"


def is_gated_mlp(module: nn.Module) -> bool:
    return not isinstance(module, ClampedSwiGLU) and all(hasattr(module, p) for p in GATED_MLP_PARTS)


def apply_swiglu_clamp(model: nn.Module, limit: float,
                       filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[str]:
    """Swap every gated MLP (`gate_proj`, `up_proj`, `down_proj`, `act_fn`) for a `ClampedSwiGLU`, in place.

    Finds dense MLPs and the upcycled MoE's experts alike (each expert is such an MLP). Returns the
    names swapped; raises if there is none (a clamp asked for and silently not applied would be a lie).
    Already clamped modules are left alone. Transformers' fused 3-D experts (`gate_up_proj`
    parameters) are not gated-MLP modules and are not handled here.
    """
    if not limit > 0:
        raise ValueError(f"SwiGLU clamp limit must be > 0, got {limit}")
    chosen = [(n, m) for n, m in model.named_modules()
              if n and is_gated_mlp(m) and (filter_fn is None or filter_fn(m, n))]
    if not chosen and not swiglu_clamps(model):
        raise ValueError(f"apply_swiglu_clamp: {type(model).__name__} has no gated MLP "
                         f"(a module with {', '.join(GATED_MLP_PARTS)})")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ClampedSwiGLU(module, limit))
    return [n for n, _ in chosen]


def swiglu_clamps(model: nn.Module) -> dict[str, ClampedSwiGLU]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ClampedSwiGLU)}


def clip_fraction(model: nn.Module) -> float:
    """Share of gate/up values beyond the limit over all clamped MLPs since their counts were reset."""
    clamps = swiglu_clamps(model).values()
    seen = sum(int(m.seen) for m in clamps)
    return sum(int(m.clipped) for m in clamps) / seen if seen else 0.0


def reset_clip_counts(model: nn.Module) -> None:
    for m in swiglu_clamps(model).values():
        m.reset_counts()


__all__ = ["ClampedSwiGLU", "apply_swiglu_clamp", "clip_fraction", "is_gated_mlp", "reset_clip_counts",
           "swiglu_clamps"]
