"""Upcycle a dense model into a mixture of experts, then train its experts in MXFP4 the DeepSeek-V4 way.

No mixture-of-experts weights are reachable offline, so we make one from a dense model ("sparse upcycling",
Komatsuzaki et al. 2022): every MLP becomes E copies of itself (the experts) behind a new router that sends
each token to its top-k experts, weighted by the renormalized router probabilities:

    p = softmax(x @ W_router^T)            [tokens, E]
    (w, idx) = top-k of p, w /= sum(w)     [tokens, k]
    y = sum_j w_j * expert_{idx_j}(x)

Since the experts start identical and the weights sum to 1, the upcycled model computes the dense model's
function (up to float rounding), whatever the router does. Small noise on the experts (`expert_noise`) lets
them drift apart under training.

DeepSeek-V4's recipe quantizes only the experts: MXFP4 (E2M1, block 32) with the round-up scale (RCEIL), FP32
master weights, straight-through gradients, attention and router kept in bf16; the FP4 experts are then served
through FP8 kernels, which needs the FP4 -> FP8 dequantization to be lossless (`fp8_tile_report`).

    upcycle_(model, UpcycleConfig(num_experts=4, top_k=2))
    prepare_qat(model, QATConfig(MXFP4Config(ScaleRule.RCEIL)), filter_fn=experts_only)

The experts are plain `nn.Linear` triples (gate/up/down) in an `nn.ModuleList`, so `prepare_qat`,
`convert` and `quantize_` treat them like any other layer (gate/up of each expert share an NVFP4 global
scale when NVFP4 is chosen). The forward loops over experts (no grouped GEMM): right for tiny runs, not
for speed. An upcycled model has no transformers config of its own, so it is trained and evaluated in
memory; exporting it needs a real MoE architecture (e.g. Qwen3-MoE's) to copy the experts into.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class UpcycleConfig:
    num_experts: int = 4
    top_k: int = 2
    expert_noise: float = 0.0  # relative std of noise added to each expert's weights
    router_std: float = 0.02
    seed: int = 0

    def __post_init__(self):
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"UpcycleConfig needs 1 <= top_k <= num_experts, got top_k={self.top_k}, "
                             f"num_experts={self.num_experts}")
        if self.expert_noise < 0 or self.router_std < 0:
            raise ValueError("UpcycleConfig.expert_noise and router_std must be >= 0")


class UpcycledMoE(nn.Module):
    """Top-k routed experts, each a copy of the dense MLP it replaces."""

    def __init__(self, mlp: nn.Module, hidden_size: int, config: UpcycleConfig, generator: torch.Generator):
        super().__init__()
        weight = next(mlp.parameters())
        self.top_k = config.top_k
        self.router = nn.Linear(hidden_size, config.num_experts, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(self.router.weight.shape, generator=generator) * config.router_std)
        self.experts = nn.ModuleList(copy.deepcopy(mlp) for _ in range(config.num_experts))
        if config.expert_noise:
            with torch.no_grad():
                for expert in self.experts:
                    for p in expert.parameters():
                        p.add_(torch.randn(p.shape, generator=generator).to(p) * p.std() * config.expert_noise)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, H] -> weights [T, k], expert ids [T, k]
        probs = self.router(x).float().softmax(dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, H]
        weights, ids = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            hit = ids == e  # [T, k]
            rows = hit.any(dim=-1).nonzero().squeeze(-1)
            if rows.numel():
                w = (weights * hit).sum(dim=-1)[rows].to(x.dtype)
                out.index_add_(0, rows, expert(x[rows]) * w.unsqueeze(-1))
        return out.reshape(shape)


def upcycle_(model: nn.Module, config: UpcycleConfig = UpcycleConfig()) -> list[str]:
    """Replace the `mlp` of every decoder layer (`model.model.layers[i].mlp`) by an UpcycledMoE; return their names."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"upcycle_ expects a decoder with model.layers[i].mlp; {type(model).__name__} has none")
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(config.seed)
    names = []
    for i, layer in enumerate(layers):
        if not hasattr(layer, "mlp"):
            raise ValueError(f"model.layers.{i} has no mlp to upcycle")
        layer.mlp = UpcycledMoE(layer.mlp, hidden, config, gen)
        names.append(f"model.layers.{i}.mlp")
    return names


def experts_only(module: nn.Module, name: str) -> bool:
    """filter_fn for prepare_qat / quantize_: quantize expert weights, keep attention and routers in float."""
    return ".experts." in name
