"""silu(gate) * up of an FP4 gate/up pair in one GEMV: the activation in the GEMV's epilogue.

A gated MLP computes down(silu(x Wg^T) * (x Wu^T)). The decode engine runs gate and up as one GEMM
over the concatenated weight [Wg; Wu] ([2I, K]) and then `decode_ops.silu_mul` over its [gate | up]
output. At batch 1 that second kernel moves only 3 x 2I bytes, yet it is one more launch per layer
in a chain where every launch costs microseconds of ramp-up and of waiting on its predecessor
(BENCHMARKS.md, "Decode chain round 5"). Here the GEMV itself finishes the job.

Layout. The GEMV reduces each output row in one program, so a program can apply silu(gate) * up
only if it owns both rows of a pair. The plane layout of this weight (`glu_layout`) is built from
the rows interleaved, [g_0, u_0, g_1, u_1, ...]: any tile of an even number of rows holds whole
pairs. The row permutation moves packed codes and block scales together (FP4 blocks lie along K,
inside a row) and the NVFP4 global scale is shared by gate and up (`fuse_linears` requires it), so
the interleaved weight decodes to exactly the rows of the original. The layout is a second copy of
the packed weight beside the plain one (which the prefill and batch paths keep using), built once
on the first call and kept on the PreparedFP4Weight (`gemv_glu`).

Numerics. The epilogue (`_fp4_gemv._glu_store`) rounds where the unfused chain rounds: gate and up
to the activation dtype (the GEMV's output cast), silu in float32 rounded to the dtype (torch's
F.silu), the product in float32 rounded. So `gate_up_silu` equals `silu_mul(fp4_linear(x, W))`
bit for bit wherever the GEMV runs; elsewhere it is that chain.
"""

from __future__ import annotations

import torch

from fp4kit.formats import QuantizedTensor

from .decode_ops import silu_mul, silu_mul_torch
from .fp4_gemm import (GEMV_AUTO_MAX_M, GemvLayout, PreparedFP4Weight, _check_fp4, _launch_gemv, _prepared_for,
                       fp4_linear, fp4_matmul_torch, gemv_layout, gemv_supported, gemv_tuned_lanes, use_triton)


def glu_order(n: int, device=None) -> torch.Tensor:
    """int64 [n]: the row order [g_0, u_0, g_1, u_1, ...] of a [gate | up] weight with n = 2I rows."""
    if n % 2:
        raise ValueError(f"glu_order: a gate/up pair has an even number of rows, got {n}")
    half = torch.arange(n // 2, device=device)
    return torch.stack((half, half + n // 2), dim=1).reshape(-1)


def glu_interleave(qt: QuantizedTensor) -> QuantizedTensor:
    """The [gate | up] FP4 weight with its rows interleaved (packed codes and block scales moved together)."""
    _check_fp4(qt, "glu_interleave")
    order = glu_order(qt.shape[0], qt.data.device)
    return QuantizedTensor(qt.data[order], qt.scale[order], qt.global_scale, qt.shape, qt.config)


def glu_layout(prepared: PreparedFP4Weight) -> GemvLayout:
    """The GEMV plane layout of the interleaved pair, built on first use and kept on `prepared`."""
    if prepared.gemv_glu is None:
        if prepared.qt.data.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("gate_up_silu: this weight's interleaved plane layout was not built before CUDA "
                               "graph capture; call it once eagerly first")
        qt = glu_interleave(prepared.qt)
        prepared.gemv_glu = gemv_layout(qt, gemv_tuned_lanes(prepared.N, prepared.K, prepared.block_size))
    return prepared.gemv_glu


def gate_up_silu_torch(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of `gate_up_silu`: the torch GEMM over [gate | up], then silu(gate) * up."""
    return silu_mul_torch(fp4_matmul_torch(x, qt, bias))


# False: always the GEMM and then silu_mul (the benchmark's "before" in the same process).
FUSED_GLU = True


def fused_gemv_runs(x: torch.Tensor, qt: QuantizedTensor) -> bool:
    """Whether `gate_up_silu(x, qt)` takes the one-launch GEMV (FUSED_GLU, Triton on x's device, bf16/fp16 x,
    an even row count, M within the GEMV's default range for the format, K lined up with the plane layout)."""
    M = x.numel() // max(1, x.shape[-1])
    return (FUSED_GLU and use_triton(x) and x.dtype in (torch.bfloat16, torch.float16) and qt.shape[0] % 2 == 0
            and 0 < M <= GEMV_AUTO_MAX_M.get(type(qt.config), 0) and gemv_supported(qt, M))


def gate_up_silu(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                 prepared: PreparedFP4Weight | None = None) -> torch.Tensor:
    """x [..., K], qt the FP4 [gate | up] weight [2I, K] (+ bias [2I]) -> silu(gate) * up [..., I].

    One GEMV launch where `fused_gemv_runs` (decode: M <= 2), else `fp4_linear` then `silu_mul` (whose
    own fallbacks apply: the torch twin on the CPU). A bias (Llama, Qwen and Gemma MLPs have none) is
    interleaved on every call: correct, one small gather more."""
    N, K = qt.shape
    if x.shape[-1] != K:
        raise ValueError(f"gate_up_silu: x has {x.shape[-1]} features, the weight expects {K}")
    if not fused_gemv_runs(x, qt):
        return silu_mul(fp4_linear(x, qt, bias, prepared=prepared))
    if prepared is None or not prepared.is_current(qt):
        prepared = _prepared_for(qt)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).contiguous()
    if bias is not None:
        bias = bias.to(x.dtype)[glu_order(N, bias.device)].contiguous()
    return _launch_gemv(x2, prepared, bias, layout=glu_layout(prepared), glu=True).reshape(*lead, N // 2)
