"""Skinny FP4 weight GEMM with the weight tile as the MMA's M side (`fp4_mma_matmul`), for 3 <= M <= 64.

Decoding with a batch of M = 16..64 tokens is still a pass over the weights: the bytes are the
same as at M = 1 (NVFP4: 0.5625 byte per weight), and the arithmetic (2 M flops per weight) is far
below what the tensor cores do. So the kernel's job is the GEMV's: keep enough weight bytes in flight
to stream at the copy bandwidth, and decode them cheaply.

What changes against `fp4_gemm`'s skinny kernel (`_fp4_gemm.fp4_skinny_kernel`):

    skinny:  acc[BLOCK_M, BLOCK_N] = x[BLOCK_M, K] @ w[BLOCK_N, K].T     tokens on the MMA's M side
    here:    acc[BLOCK_N, BLOCK_M] = w[BLOCK_N, K] @ x[BLOCK_M, K].T     weight rows on the M side

On Hopper a warpgroup MMA (`wgmma`) has 64 rows on its M side and 8..256 on N; the M = 16..64 tokens
fit N, the 64 or 128 weight rows of a tile fit M. The decoded weights are the A operand, which wgmma
reads from registers (where the decode leaves them), and x.T is the B operand in shared memory.
With the tokens on M (the skinny kernel) Triton emits `mma.sync` m16n8k16 per warp. The decode
(`_fp4_gemm.decode_weight_tile`) is the same: the weights the MMA multiplies are the torch twin's
(`fp4_matmul_torch`: `qt.dequantize(x.dtype)`) bit for bit, and the result differs from the twin only
by float32 summation order and the final rounding, as for the skinny kernel.

Launch levers (`MmaConfig`, chosen per shape by `mma_config` from the H100 sweep of
benchmarks/bench_fp4_gemm.py --mma-sweep): tile rows, K width, K split with the skinny kernel's
in-launch ticket reduction, software-pipelining depth (cp.async stages), warps, the weight loads'
eviction policy, and programmatic dependent launch (PDL: the next kernel's programs start while
this one drains). Weights are prepared once as for the skinny kernel (`PreparedFP4Weight`: int32
words, scale table) and the compiled kernel is launched directly after the first call.

Measured (H100, 2026-11-23, BENCHMARKS.md "Skinny FP4 GEMM round 5"): about as fast as the skinny kernel
on average (M = 16: 1.36x cuBLAS bf16 vs 1.39x; M = 32: 1.12x vs 1.14x; faster on some shapes, slower on
others), so `fp4_gemm.fp4_matmul` does not dispatch here; the swap was never the limit (see the notes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4kit.formats import NVFP4Config, QuantizedTensor
from fp4kit.formats.e2m1 import e2m1_codes_to_float
from fp4kit.formats.scales import e8m0_to_float

from . import fp4_gemm
from .fp4_gemm import (
    PreparedFP4Weight,
    _check_fp4,
    _grid,
    _interpreting,
    _launch_cached,
    _launch_workspace,
    _prepared_for,
    _sm_count,
    use_pdl,
    use_triton,
)

try:
    import triton

    from . import _fp4_gemm
except ImportError:  # CPU installs without triton: fp4_mma_matmul is not available there
    triton = None

MMA_MIN_M = 3  # below this the CUDA-core GEMV is the faster path (fp4_gemm.GEMV_AUTO_MAX_M)
MMA_MAX_M = 64


@dataclass(frozen=True)
class MmaConfig:
    """Launch shape of `fp4_mma_kernel`.

    block_n: weight rows per program (the MMA's M side; wgmma needs 64 per warpgroup), block_m: tokens
    per program (the MMA's N side), block_k: K per loop step, split_k: K splits reduced in the launch,
    num_stages: cp.async pipelining depth (1: plain loads into registers), evict: the weight loads'
    eviction policy, pdl: programmatic dependent launch where `fp4_gemm.use_pdl` allows it (CUDA, sm_90+,
    `fp4_gemm.PDL` on; never in the interpreter), lut: the byte-permute table decode
    (`_fp4_gemm.decode_weight_tile_lut`) instead of the skinny kernel's float16-pair decode, prefetch: the
    next K step's weights loaded into registers before this step's decode (for num_stages=1), maxnreg: a
    register cap per thread (ptxas .maxnreg; more programs per SM, possibly spills), None for none.
    """
    block_n: int = 64
    block_m: int = 16
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    evict: str = "evict_first"
    pdl: bool = True
    lut: bool = False
    prefetch: bool = False
    maxnreg: int | None = None
    m_fast: bool = False

    def __post_init__(self):
        for name in ("block_n", "block_m", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"MmaConfig.{name} must be a power of two >= 1, got {v}")
        if self.split_k < 1:
            raise ValueError(f"MmaConfig.split_k must be >= 1, got {self.split_k}")
        if self.block_m < 16 or self.block_n < 16 or self.block_k < 32:
            raise ValueError(f"MmaConfig: block_m and block_n must be >= 16 and block_k >= 32 (tl.dot's minimum "
                             f"and one MXFP4 block), got {self.block_m}, {self.block_n}, {self.block_k}")
        if self.num_stages < 1:
            raise ValueError(f"MmaConfig.num_stages must be >= 1, got {self.num_stages}")
        if self.evict not in ("", "evict_first", "evict_last"):
            raise ValueError(f"MmaConfig.evict must be '', 'evict_first' or 'evict_last', got {self.evict!r}")


# The default launch, from the H100 sweep of 2026-11-23 (benchmarks/results/fp4_mma_sweep2_h100.*, GPU time in a
# graph, NVFP4 and MXFP4 at M = 16 and 32): the float16-pair decode (the table decode was slower in every
# column: its four gathered table loads per block cost more than the instructions they save), plain loads
# (num_stages 1: cp.async pipelining was slower at every split), 64 weight rows x 128 K with 4 warps, and K
# split until the grid has MMA_PROGRAMS_PER_SM programs per SM while each split keeps MMA_MIN_STEPS K steps
# (best splits found: qkv 8, o 16 (M = 16) / 8 (M = 32), gate_up 4, down 16; this rule gives 8, 8, 4, 16).
MMA_PROGRAMS_PER_SM = 12
MMA_MAX_SPLIT = 16
MMA_MIN_STEPS = 4
LUT_DECODE = False  # the default decode: byte-permute table (True) or the skinny kernel's (False)
PREFETCH = False  # register double buffer of the next K step's weights (see fp4_mma_kernel)


def mma_config(M: int, N: int, K: int, block_size: int, sm_count: int = 132, mx_bf16: bool = False) -> MmaConfig:
    """The default launch for one call (the rule above; mx_bf16 is MXFP4's bf16x2 decode, same launch)."""
    if _interpreting():
        return MmaConfig(block_n=16, block_m=16, block_k=64, num_warps=1, num_stages=1, evict="", lut=LUT_DECODE)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n, block_k = 64, 128
    programs = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    steps = triton.cdiv(K, block_k)
    split = 1
    while (split < MMA_MAX_SPLIT and programs * split < MMA_PROGRAMS_PER_SM * sm_count
           and steps // (split * 2) >= MMA_MIN_STEPS):
        split *= 2
    return MmaConfig(block_n, block_m, block_k, split, num_warps=4, num_stages=1, lut=LUT_DECODE, prefetch=PREFETCH)


# Prefill (M > MMA_MAX_M): the same kernel as a plain tiled GEMM, used by `fp4_gemm.fp4_matmul` for
# SKINNY_MAX_M < M < DEQUANT_CUBLAS_MIN_M. Token tiles run fastest in the grid (`m_fast`: the programs that
# share a weight tile run together, so each weight byte should come from DRAM once; measured, it is within
# +-3% of the other order on the Llama-3-8B shapes). The rule below is the H100 sweep's
# (benchmarks/bench_fp4_prefill.py, rounds 1-2, BENCHMARKS.md "Prefill GEMM"): 128 tokens per program up to
# M = 128, 256 beyond (the MMA's N side), 64 weight rows with 4 warps, or 128 with 8 warps on wide layers
# (N >= PREFILL_WIDE_N), 64-wide K steps, 3 cp.async stages, and a K split while the grid is under two
# programs per SM and each split keeps >= PREFILL_MIN_SPLIT_K of K (the N = 4096 layers: 64-96 tiles for
# 132 SMs; down at M = 256: 128.6 -> 86.9 us with 4 splits).
PREFILL_WIDE_N = 16384
PREFILL_MX_BF16 = False  # MXFP4's bf16x2 decode at prefill sizes (off: see _launch_mma)
PREFILL_MIN_SPLIT_K = 2048
PREFILL_MAX_SPLIT = 4


def prefill_config(M: int, N: int, K: int, block_size: int, sm_count: int = 132) -> MmaConfig:
    """The default launch for M > MMA_MAX_M (the rule above)."""
    if _interpreting():
        return MmaConfig(block_n=16, block_m=16, block_k=64, num_warps=1, num_stages=1, evict="", pdl=False,
                         m_fast=True)
    block_m = 128 if M <= 128 else 256
    block_n, warps = (128, 8) if N >= PREFILL_WIDE_N else (64, 4)
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    split = 1
    while (split < PREFILL_MAX_SPLIT and tiles * split * 2 <= 2 * sm_count
           and K // (split * 2) >= PREFILL_MIN_SPLIT_K):
        split *= 2
    return MmaConfig(block_n=block_n, block_m=block_m, block_k=64, split_k=split, num_warps=warps, num_stages=3,
                     evict="", pdl=False, m_fast=True)


def lut_table(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 [256, 4]: for each scale code c the eight magnitudes dtype(e2m1(j) * s_eff(c)), j = 0..7, as the
    bytes `decode_weight_tile_lut` permutes: [c, 0] low bytes of entries 0..3 (entry j in byte j), [c, 1]
    low bytes of 4..7, [c, 2] and [c, 3] the high bytes. s_eff and the product are the formats' own
    (`effective_block_scale`, `e8m0_to_float`; one float32 product rounded once to dtype), so a weight
    looked up here is the twin's (`qt.dequantize(dtype)`) bit for bit; the kernel adds the code's sign."""
    device = qt.data.device
    codes = torch.arange(256, dtype=torch.uint8, device=device)
    if isinstance(qt.config, NVFP4Config):
        eff = qt.config.effective_block_scale(codes.view(torch.float8_e4m3fn), qt.global_scale.float().reshape(()))
    else:
        eff = e8m0_to_float(codes).float()
    mags = e2m1_codes_to_float(torch.arange(8, dtype=torch.uint8, device=device))  # [8] float32
    bits = (mags[None, :] * eff[:, None]).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF  # [256, 8]
    lo, hi = bits & 0xFF, bits >> 8
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=device)
    regs = torch.stack([(t[:, 4 * i:4 * i + 4] << shifts).sum(-1) for t in (lo, hi) for i in (0, 1)], dim=1)
    return (regs - ((regs >> 31) << 32)).to(torch.int32).contiguous()  # the same 32 bits as signed int32


def _lut_for(prepared: PreparedFP4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight's LUT for x's dtype, built on first use and kept in the prepared weight's per-weight cache
    (`configs`, keyed ("mma_lut", dtype)); the prepared weight is rebuilt when the QuantizedTensor changes."""
    key = ("mma_lut", dtype)
    lut = prepared.configs.get(key)
    if lut is None:
        if prepared.qt.data.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fp4_mma_matmul: this weight's decode table was not built before CUDA graph "
                               "capture; call it once eagerly first")
        lut = prepared.configs[key] = lut_table(prepared.qt, dtype)
    return lut


def _launch_mma(x2: torch.Tensor, prepared: PreparedFP4Weight, bias: torch.Tensor | None,
                config: MmaConfig | None = None) -> torch.Tensor:
    """One launch of fp4_mma_kernel; the compiled kernel is cached on `prepared` per launch key."""
    M = x2.shape[0]
    N, K = prepared.N, prepared.K
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    # fp4_gemm.MXFP4_BF16_DECODE is read per call: tests and benchmarks toggle it. Prefill sizes take the
    # float32 decode: the bf16x2 one puts x (the big operand there) in pair order, a register permutation
    # per K step that cost up to 64% (median 27%) at M >= 128 on the H100 (sweep round 1 vs 2).
    mx_bf16 = (fp4_gemm.MXFP4_BF16_DECODE and prepared.table_bf16x2 is not None and x2.dtype == torch.bfloat16
               and (M <= MMA_MAX_M or PREFILL_MX_BF16))
    cfg = config or prepared.configs.get(("mma", M, mx_bf16))
    if cfg is None:
        sms = 132 if _interpreting() else _sm_count(x2.device)
        cfg = (mma_config(M, N, K, prepared.block_size, sms, mx_bf16) if M <= MMA_MAX_M
               else prefill_config(M, N, K, prepared.block_size, sms))
        prepared.configs[("mma", M, mx_bf16)] = cfg
    pdl = cfg.pdl and use_pdl(x2)
    grid = _grid(M, N, cfg.block_m, cfg.block_n, cfg.split_k, cfg.m_fast)
    stream, ws, cnt = _launch_workspace(x2, y, cfg.split_k, grid)
    if cfg.lut:
        table, mx_bf16 = _lut_for(prepared, x2.dtype), False
    else:
        table = prepared.table_bf16x2 if mx_bf16 else prepared.table
    args = (x2, prepared.words, prepared.scale_codes, table, x2 if bias is None else bias, y, ws, cnt, M,
            N, K, prepared.block_size, bias is not None, cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k,
            mx_bf16, prepared.one_mul, cfg.lut, cfg.evict, pdl, cfg.prefetch, _interpreting(), cfg.m_fast)
    key = ("mma", cfg, pdl, mx_bf16, x2.dtype, None if bias is None else bias.dtype, x2.data_ptr() % 16 == 0,
           bias is None or bias.data_ptr() % 16 == 0, M % 16 == 0, x2.device.index)
    launch = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg is not None and not _interpreting():
        launch["maxnreg"] = cfg.maxnreg
    if pdl:
        launch["launch_pdl"] = True
    _launch_cached(prepared, key, _fp4_gemm.fp4_mma_kernel, grid, stream, args, **launch)
    return y


def fp4_mma_matmul(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None, *,
                   config: MmaConfig | None = None, prepared: PreparedFP4Weight | None = None) -> torch.Tensor:
    """y[..., N] = x[..., K] @ dequant(qt)[N, K].T (+ bias) with the swapped-operand tensor-core kernel.

    x: bfloat16 or float16 with M >= 1 rows: up to MMA_MAX_M the decode launch (`mma_config`), beyond it
    the prefill launch (`prefill_config`, a plain tiled GEMM with the token tiles fastest in the grid);
    qt: a 2-D NVFP4 or MXFP4 weight. `prepared` (from `fp4_gemm.prepare_fp4_weight`) skips the cache
    lookup on qt.data; `config` forces a launch shape.
    """
    N, K = qt.shape
    if x.shape[-1] != K:
        raise ValueError(f"fp4_mma_matmul: x has {x.shape[-1]} features, the weight expects {K}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"fp4_mma_matmul: x must be bfloat16 or float16, got {x.dtype}")
    if not use_triton(x) or triton is None:
        raise RuntimeError("fp4_mma_matmul needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M < 1:
        raise ValueError(f"fp4_mma_matmul: M (rows of x) must be >= 1, got {M}")
    if prepared is None or not prepared.is_current(qt):
        _check_fp4(qt, "fp4_mma_matmul")
        prepared = _prepared_for(qt)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()
    return _launch_mma(x2, prepared, bias, config).reshape(*lead, N)
