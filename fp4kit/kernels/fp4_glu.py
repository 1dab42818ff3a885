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

The batch path (3-64 rows on sm_90, and 1-2 rows where that kernel beat the GEMV: `fp4_ws.ws_beats_gemv`):
the warp-specialised GEMM (`fp4_ws`) finishes the pair the same way. Its accumulator is the wgmma layout, where a thread holds rows r and r + 8 of every 16 weight
rows, so its copy of the weight (`ws_glu_weight`) takes the rows in groups of 8 (`glu_order(group=8)`:
8 gate rows, the same pairs' 8 up rows, ...) and the epilogue (`_fp4_ws._glu_epilogue`) pairs them in
registers with a reshape and split that move no data. It runs where that kernel runs without a K split
(the wide gate/up layers: `ws_config`) and without a bias, and equals the WS GEMM + `silu_mul` bit for bit.
"""

from __future__ import annotations

import torch

from fp4kit.formats import QuantizedTensor

from .decode_ops import silu_mul, silu_mul_torch
from .fp4_gemm import (GEMV_AUTO_MAX_M, GemvLayout, PreparedFP4Weight, _check_fp4, _interpreting, _launch_gemv,
                       _prepared_for, fp4_linear, fp4_matmul_torch, gemv_layout, gemv_supported, gemv_tuned_lanes,
                       use_triton)


# False: always the GEMM and then silu_mul (the benchmark's "before" in the same process).
FUSED_GLU = True
# The same fold in the warp-specialised GEMM (3-64 rows on sm_90). False: its GEMM, then silu_mul.
FUSED_GLU_WS = True
WS_GROUP = 8  # gate / up row groups of the warp-specialised layout (see `glu_order`)


def glu_order(n: int, device=None, group: int = 1) -> torch.Tensor:
    """int64 [n]: the row order of a [gate | up] weight with n = 2I rows, gate and up alternating in groups of
    `group` rows: group 1 [g_0, u_0, g_1, u_1, ...] (the GEMV), group 8 [g_0..g_7, u_0..u_7, g_8..] (the
    warp-specialised GEMM, whose accumulator holds rows r and r + 8 of every 16 in one thread)."""
    if n % (2 * group):
        raise ValueError(f"glu_order: a gate/up pair in groups of {group} needs rows divisible by {2 * group}, "
                         f"got {n}")
    half = torch.arange(n // 2, device=device).view(-1, 1, group)
    return torch.cat((half, half + n // 2), dim=1).reshape(-1)


def glu_interleave(qt: QuantizedTensor, group: int = 1) -> QuantizedTensor:
    """The [gate | up] FP4 weight with its rows interleaved (packed codes and block scales moved together)."""
    _check_fp4(qt, "glu_interleave")
    order = glu_order(qt.shape[0], qt.data.device, group)
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


def fused_ws_runs(x: torch.Tensor, qt: QuantizedTensor) -> bool:
    """Whether `gate_up_silu(x, qt)` (no bias) takes the warp-specialised GEMM with the product in its epilogue:
    FUSED_GLU_WS, fp4_matmul's AUTO would take that kernel here (`fp4_gemm.WS_AUTO`, `fp4_ws.ws_supported`:
    bf16 x, 3-64 rows, or 1-2 where `ws_beats_gemv`, sm_90), rows in whole groups of 8 pairs, and its config
    has no K split."""
    from . import fp4_gemm
    from .fp4_ws import WS_MIN_M, ws_beats_gemv, ws_config, ws_supported

    if not (FUSED_GLU_WS and fp4_gemm.WS_AUTO and x.is_cuda and not _interpreting()):
        return False
    N, K = qt.shape
    x2 = x.reshape(-1, K)
    M, bs = x2.shape[0], qt.config.block_size
    small = M < WS_MIN_M and ws_beats_gemv(M, N, K, bs)  # 1-2 rows where it beat the GEMV (fp4_ws_h100_m1)
    return (N % (2 * WS_GROUP) == 0 and ws_supported(x2, qt, min_m=1 if small else WS_MIN_M)
            and ws_config(M, N, K, block_size=bs).split_k == 1)


def ws_glu_weight(prepared: PreparedFP4Weight):
    """The warp-specialised kernel's fragment layout of the pair in groups of 8, built on first use and kept in
    the prepared weight's per-weight cache (another copy of the packed codes, like the GEMV's `gemv_glu`)."""
    from .fp4_ws import WsDecode, cached_ws, prepare_ws

    return cached_ws(prepared, ("ws_glu", WsDecode.FRAG),
                     lambda: prepare_ws(glu_interleave(prepared.qt, WS_GROUP), WsDecode.FRAG),
                     "gate_up_silu: this weight's grouped fragment layout")


def gate_up_silu_torch(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of `gate_up_silu`: the torch GEMM over [gate | up], then silu(gate) * up."""
    return silu_mul_torch(fp4_matmul_torch(x, qt, bias))


def fused_gemv_runs(x: torch.Tensor, qt: QuantizedTensor) -> bool:
    """Whether `gate_up_silu(x, qt)` takes the one-launch GEMV (FUSED_GLU, Triton on x's device, bf16/fp16 x,
    an even row count, M within the GEMV's default range for the format, K lined up with the plane layout)."""
    M = x.numel() // max(1, x.shape[-1])
    return (FUSED_GLU and use_triton(x) and x.dtype in (torch.bfloat16, torch.float16) and qt.shape[0] % 2 == 0
            and 0 < M <= GEMV_AUTO_MAX_M.get(type(qt.config), 0) and gemv_supported(qt, M))


def gate_up_silu(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                 prepared: PreparedFP4Weight | None = None) -> torch.Tensor:
    """x [..., K], qt the FP4 [gate | up] weight [2I, K] (+ bias [2I]) -> silu(gate) * up [..., I].

    One warp-specialised GEMM launch where `fused_ws_runs` (sm_90, no bias), else one GEMV launch where
    `fused_gemv_runs` (decode: M <= 2), else `fp4_linear` then `silu_mul` (whose own fallbacks apply: the
    torch twin on the CPU). A bias (Llama, Qwen and Gemma MLPs have none) is interleaved on every call for
    the GEMV: correct, one small gather more."""
    N, K = qt.shape
    if x.shape[-1] != K:
        raise ValueError(f"gate_up_silu: x has {x.shape[-1]} features, the weight expects {K}")
    lead = x.shape[:-1]
    if bias is None and fused_ws_runs(x, qt):  # 3-64 rows, and 1-2 on the shapes where it beat the GEMV
        if prepared is None or not prepared.is_current(qt):
            prepared = _prepared_for(qt)
        from .fp4_ws import fp4_ws_matmul
        y = fp4_ws_matmul(x.reshape(-1, K).contiguous(), ws_glu_weight(prepared), glu=True)
        return y.reshape(*lead, N // 2)
    if not fused_gemv_runs(x, qt):
        return silu_mul(fp4_linear(x, qt, bias, prepared=prepared))
    if prepared is None or not prepared.is_current(qt):
        prepared = _prepared_for(qt)
    x2 = x.reshape(-1, K).contiguous()
    if bias is not None:
        bias = bias.to(x.dtype)[glu_order(N, bias.device)].contiguous()
    return _launch_gemv(x2, prepared, bias, layout=glu_layout(prepared), glu=True).reshape(*lead, N // 2)
