"""A residual branch's FP4 GEMV with the residual add + RMSNorm after it, in one launch.

In a pre-norm decoder block the output projection and the MLP's down projection each feed a
residual add and the next RMSNorm:

    h <- h + o_proj(attn)        x <- RMSNorm(h)    (post-attention norm; qkv / gate_up read x)
    h <- h + down(act)           x <- RMSNorm(h)    (the next layer's input norm, or the final norm)

At batch 1 the decode engine ran each "add + norm" as its own kernel (`decode_ops.add_rmsnorm`: one
program, 4096 features): two launches per layer, each waiting on its predecessor for a few
microseconds of work. Here the GEMV does it. A norm needs the whole row of y, which no single GEMV
program computes, so the program that finishes the LAST tile does it: every program that completes
a tile of y (the last split of it, with split-K) takes a ticket from a per-token-tile counter; the
one that draws the final ticket sees every tile written (acquire/release on the ticket, as the
split-K reduction) and runs add_rmsnorm's arithmetic on the row (`_fp4_gemv._norm_tail`):

    h_out = round(h + y)                         (torch's bf16 add)
    n_out = w * round(h_out * rsqrt(mean(h_out^2) + eps))      Llama form
          = round(h_out * rsqrt(...) * (1 + w))                Gemma form

Numerics. y is the GEMV's own output (rounded as always), h_out is exact against the unfused chain.
n_out differs from `add_rmsnorm` only by the float32 order of the sum of squares (the norm tail's
reduction runs on the GEMV's warps, the norm kernel on its own): at most one ulp where that moves a
rounding boundary, which the tests bound.
"""

from __future__ import annotations

import torch

from fp4kit.formats import QuantizedTensor

from .decode_ops import add_rmsnorm, add_rmsnorm_torch
from .fp4_gemm import (GEMV_AUTO_MAX_M, GemvNorm, PreparedFP4Weight, _gemv_config, _interpreting, _launch_gemv,
                       _prepared_for, _sm_count, fp4_linear, fp4_matmul_torch, gemv_supported, gemv_tuned_lanes,
                       use_triton)

# False: always the GEMM and then add_rmsnorm (the benchmark's "before" in the same process).
FUSED_ADDNORM = True


def linear_add_rmsnorm_torch(x: torch.Tensor, qt: QuantizedTensor, h: torch.Tensor, weight: torch.Tensor, eps: float,
                             gemma: bool = False, bias: torch.Tensor | None = None):
    """Twin of `linear_add_rmsnorm`: (h + x W^T, RMSNorm(h + x W^T)) through the torch GEMM and norm."""
    return add_rmsnorm_torch(h, fp4_matmul_torch(x, qt, bias), weight, eps, gemma)


def fused_tail_runs(x: torch.Tensor, qt: QuantizedTensor, h: torch.Tensor, weight: torch.Tensor,
                    gemma: bool = False) -> bool:
    """Whether `linear_add_rmsnorm` takes the one-launch GEMV: FUSED_ADDNORM, Triton on x's device, bf16/fp16
    x, the GEMV's decode range of M for the format, h [..., N] contiguous in x's dtype, a 1-D contiguous weight
    (in x's dtype for the Llama form), and the GEMV's launch for this shape not the persistent kernel."""
    N, K = qt.shape
    M = x.numel() // max(1, x.shape[-1])
    if not (FUSED_ADDNORM and use_triton(x) and x.dtype in (torch.bfloat16, torch.float16)
            and 0 < M <= GEMV_AUTO_MAX_M.get(type(qt.config), 0) and gemv_supported(qt, M)):
        return False
    if h.dtype != x.dtype or h.shape[-1] != N or h.numel() != M * N or not h.is_contiguous():
        return False
    if weight.shape != (N,) or not weight.is_contiguous() or not (gemma or weight.dtype == x.dtype):
        return False  # add_rmsnorm's Llama form multiplies in the activation dtype
    sms = 132 if _interpreting() else _sm_count(x.device)
    return not _gemv_config(M, N, K, gemv_tuned_lanes(N, K, qt.config.block_size), sms).persistent


def linear_add_rmsnorm(x: torch.Tensor, qt: QuantizedTensor, h: torch.Tensor, weight: torch.Tensor, eps: float,
                       gemma: bool = False, bias: torch.Tensor | None = None,
                       prepared: PreparedFP4Weight | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K], qt [N, K], h [..., N] -> (h + x W^T (+ bias), RMSNorm(h + x W^T)), each [..., N].

    One GEMV launch where `fused_tail_runs` (decode), else `fp4_linear` then `decode_ops.add_rmsnorm` (whose
    own fallbacks apply). h is not modified."""
    N, K = qt.shape
    if x.shape[-1] != K:
        raise ValueError(f"linear_add_rmsnorm: x has {x.shape[-1]} features, the weight expects {K}")
    if h.shape[:-1] != x.shape[:-1] or h.shape[-1] != N:
        raise ValueError(f"linear_add_rmsnorm: the residual h is {tuple(h.shape)}; the GEMM gives "
                         f"{tuple(x.shape[:-1]) + (N,)}")
    if not fused_tail_runs(x, qt, h, weight, gemma):
        return add_rmsnorm(h, fp4_linear(x, qt, bias, prepared=prepared), weight, eps, gemma)
    if prepared is None or not prepared.is_current(qt):
        prepared = _prepared_for(qt)
    x2 = x.reshape(-1, K).contiguous()
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()
    norm = GemvNorm(h, weight, float(eps), gemma, torch.empty_like(h), torch.empty_like(h))
    _launch_gemv(x2, prepared, bias, norm=norm)
    return norm.h_out, norm.n_out
