"""W8A16 linear layer: y = x @ (q * s).T (+ bias) for INT8 weights with one float32 scale per row.

fp4kit uses it for the decode engine's output head (`Engine(lm_head="int8")`): Llama-3-8B's lm_head is
128256 x 4096, 1.05 GB in bf16 and 0.53 GB as INT8 codes (+ 0.5 MB of scales), read once per decode
step. The weight is `formats.Int8Config`'s QuantizedTensor: int8 codes [N, K], float32 scales [N].

    int8_linear        the launcher: `_int8_linear.int8_linear_kernel` for bf16/fp16 activations on CUDA
                       (and anywhere under TRITON_INTERPRET=1), else the twin
    int8_linear_torch  the twin and the specification: (x.float() @ q.float().T) * s (+ bias) in float32,
                       one rounding to x's dtype. The kernel sums the same exact products in another
                       order (its docstring), so the two agree to float32 summation error, then one rounding

Launch settings (`Int8LinearConfig`) come from `int8_config(M)`: small programs, many of them (the H100 sweep
in benchmarks/bench_int8_linear.py, BENCHMARKS.md "INT8 output head"): at M <= 16, 32 weight rows x 256 of K
per step, 2 warps, 3 stages (Llama-3-8B's head at M = 1: 173 us, the byte roofline; the first guess, 128 rows
and 4 warps, took 231); at 17-32 tokens 64 rows, 2 warps, 2 stages (M = 32: 191-196 us, 91-93%); above, 64 x 64 x
128 tiles, 4 warps, 3 stages (M = 64: 265 us, 68%: the bf16 MMAs and code conversions start to count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4kit.formats import Int8Config, QuantizedTensor

from .fp4_gemm import _cdiv, _interpreting, use_pdl, use_triton

try:
    from . import _int8_linear
except ImportError:  # CPU installs without triton use the twin
    pass


@dataclass(frozen=True)
class Int8LinearConfig:
    block_n: int = 32  # weight rows per program (the MMA's M side)
    block_m: int = 16  # tokens per program (the MMA's N side; >= 16)
    block_k: int = 256
    num_warps: int = 2
    num_stages: int = 3


# Overrides of int8_config's choice (the bench's sweeps set this; None: the rule below).
CONFIG: Int8LinearConfig | None = None


def int8_config(M: int) -> Int8LinearConfig:
    """Tile shape for M tokens: BLOCK_M the smallest of 16 / 32 / 64 that holds M (64 above); the module
    docstring gives the H100 sweep's choices. 16 x 16 x 32 tiles in the interpreter (small grids for CI)."""
    if _interpreting():
        return Int8LinearConfig(block_n=16, block_m=16, block_k=32, num_warps=1, num_stages=1)
    if CONFIG is not None:
        return CONFIG
    if M <= 16:
        return Int8LinearConfig()
    if M <= 32:
        return Int8LinearConfig(block_n=64, block_m=32, num_stages=2)
    return Int8LinearConfig(block_n=64, block_m=64, block_k=128, num_warps=4)


def _check(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, name: str) -> None:
    if not isinstance(qt.config, Int8Config):
        raise TypeError(f"{name}: expected an INT8 QuantizedTensor (formats.Int8Config), got {type(qt.config).__name__}")
    if len(qt.shape) != 2:
        raise ValueError(f"{name}: the weight must be 2-D [out, in], got shape {qt.shape}")
    N, K = qt.shape
    if qt.data.dtype != torch.int8 or tuple(qt.data.shape) != (N, K) or not qt.data.is_contiguous():
        raise ValueError(f"{name}: codes must be a contiguous int8 [{N}, {K}] tensor, got {qt.data.dtype} "
                         f"{tuple(qt.data.shape)}")
    if qt.scale.dtype != torch.float32 or qt.scale.numel() != N:
        raise ValueError(f"{name}: scales must be float32 with one per row ({N}), got {qt.scale.dtype} "
                         f"{tuple(qt.scale.shape)}")
    if x.shape[-1] != K:
        raise ValueError(f"{name}: input's last dim is {x.shape[-1]}, the weight's in_features is {K}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"{name}: bias must have shape ({N},), got {tuple(bias.shape)}")
    if x.device != qt.data.device:
        raise ValueError(f"{name}: input on {x.device}, weight on {qt.data.device}")


def int8_linear_torch(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                      name: str = "weight") -> torch.Tensor:
    """The twin: (x @ q.T) * s (+ bias) in float32, rounded once to x's dtype. x: [..., K] -> [..., N]."""
    _check(x, qt, bias, name)
    y = (x.float() @ qt.data.float().T) * qt.scale.reshape(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                name: str = "weight", out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x @ (q * s).T (+ bias); x: [..., K] bf16/fp16 on the kernel path -> [..., N], rounded to x's dtype.
    `out_dtype=torch.float32` returns those same values as float32 (`twin(...).float()` bit for bit, in one
    write: what the engine's sampler reads)."""
    _check(x, qt, bias, name)
    if out_dtype not in (None, x.dtype, torch.float32):
        raise ValueError(f"{name}: out_dtype must be None, the input's dtype or torch.float32, got {out_dtype}")
    if not use_triton(x) or x.dtype not in (torch.bfloat16, torch.float16):
        y = int8_linear_torch(x, qt, bias, name)
        return y if out_dtype is None else y.to(out_dtype)
    N, K = qt.shape
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    if M == 0:
        return y.reshape(*x.shape[:-1], N)
    cfg = int8_config(M)
    pdl = use_pdl(x)
    grid = (_cdiv(M, cfg.block_m) * _cdiv(N, cfg.block_n),)
    _int8_linear.int8_linear_kernel[grid](
        x2, qt.data, qt.scale, bias if bias is not None else qt.scale, y, M, N, K, x2.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, PDL=pdl,
        INTERPRET=_interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"launch_pdl": True} if pdl else {}))
    return y.reshape(*x.shape[:-1], N)
