"""Grouped MoE W4A16 GEMM: every routed (token, slot) pair times its expert's FP4 weight, in one launch.

A mixture-of-experts layer sends each of T tokens to top_k of E experts. Decoding touches at most
min(E, T * top_k) experts, and for each of them the whole weight must stream from memory for a
handful of rows: like the dense decode GEMM, the cost is bytes, so FP4 weights (0.5625 bytes per
weight for NVFP4, 0.53125 for MXFP4, against bf16's 2) can make it up to ~3.6x faster, if all the
touched experts stream in one launch instead of one small launch per expert.

The data (all experts of one projection stacked, each expert exactly what `fp4kit.formats`
produces for its own [N, K] weight):

    packed        uint8 [E, N, K/2]     two E2M1 codes per byte, element 2j in the low nibble
    block_scale   [E, N, K/bs]          UE4M3 (NVFP4, bs = 16) or E8M0 codes (MXFP4, bs = 32)
    global_scale  float32 [E]           NVFP4 only: one per expert (None for MXFP4)

Routing (`route_topk`, torch ops on the device, no host synchronisation). Pairs are numbered
p = token * top_k + slot. They are sorted by expert (stable), and each expert's run of pairs is
cut into M tiles of at most BLOCK_M pairs; the tile map gives each tile its expert and its
[start, end) in the sorted list. The number of tiles is bounded without reading the counts:
sum_e ceil(c_e / BM) <= min(E, P) + P // BM, so the grid is fixed by (T, top_k, E) alone, tiles
beyond the real ones exit at once, and the whole layer can be captured in a CUDA graph.

The kernel (`_fp4_moe.fp4_moe_kernel`) is the dense skinny kernel's inner loop (int32 word loads,
a nibble decode, bf16 tensor-core MMA) with three changes: the weight, scale and table base
pointers come from the tile's expert; x rows are gathered by pair (token = p // top_k); y rows
are scattered to pair order. The decode, with bf16 x, is the bfloat16 pair decode: each pair of
codes placed as bfloat16 and multiplied by the block's bf16x2 scale in one instruction. For MXFP4
the scale is a power of two (the twin's weights bit for bit); for NVFP4 it is E4M3 x 2^117, so
the MMA sees code x E4M3 x 2^-9 exactly and the float32 sums take the expert's per-tensor factor
x 2^9 once (`MOE_NV_BF16_DECODE`; the twin rounds code x effective scale to bfloat16 instead, so
the two differ within the GEMM tolerance, the kernel on the side of the exact product). Otherwise
(fp16 x, or the switch off) the float16-pair decode: one float32 multiply by the tabled effective
block scale and one rounding to x's dtype per weight. Optional epilogues, in float32 before the
single rounding:

    SwiGLU     W = [gate; up] ([E, 2I, H], gate rows first, as transformers' Qwen3-MoE
               `gate_up_proj`): y = silu(x @ gate.T) * (x @ up.T), the [P, 2I] never written
    pair weight  y *= topk_weight[p]   (the down projection: the router's weights)

The torch twins (`fp4_moe_gemm_torch`, `fp4_moe_mlp_torch`) loop over experts with the formats'
dequantizer and float32 matmuls: the same function up to float32 summation order, which is the
GEMM tolerance of `fp4_gemm`. `fp4_moe_mlp` chains gate_up (SwiGLU) and down (pair weights) and
sums each token's top_k rows in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from fp4kit.formats import MXFP4Config, NVFP4Config, QuantizedTensor
from fp4kit.formats.scales import e8m0_to_float

from . import fp4_gemm
from .fp4_gemm import (HAS_TRITON, _bf16x2_e4m3_table, _bf16x2_pow2_table, _cdiv, _interpreting, _pow2, _raw_stream,
                       hooks_idle, nv_post_factor, use_pdl, use_triton)
from .fp4_mma import lut_table

if HAS_TRITON:
    import triton

    from . import _fp4_moe


# ----------------------------------------------------------------------------------------------
# stacked expert weights


@dataclass(frozen=True, eq=False)
class FP4Experts:
    """E experts' FP4 weights [E, N, K], each quantized on its own (its own NVFP4 global scale)."""

    packed: torch.Tensor  # uint8 [E, N, K/2]
    block_scale: torch.Tensor  # float8_e4m3fn or uint8 [E, N, K/bs]
    global_scale: torch.Tensor | None  # float32 [E] (NVFP4), None (MXFP4)
    config: NVFP4Config | MXFP4Config

    def __post_init__(self):
        if not isinstance(self.config, (NVFP4Config, MXFP4Config)):
            raise TypeError(f"FP4Experts: expected an NVFP4 or MXFP4 config, got {type(self.config).__name__}")
        if self.packed.dtype != torch.uint8 or self.packed.dim() != 3:
            raise ValueError(f"FP4Experts: packed must be uint8 [E, N, K/2], got {self.packed.dtype} "
                             f"{tuple(self.packed.shape)}")
        E, N, half_k = self.packed.shape
        bs = self.config.block_size
        if tuple(self.block_scale.shape) != (E, N, 2 * half_k // bs):
            raise ValueError(f"FP4Experts: block_scale {tuple(self.block_scale.shape)} does not match packed "
                             f"{tuple(self.packed.shape)} with block size {bs}")
        is_nv = isinstance(self.config, NVFP4Config)
        if is_nv and (self.global_scale is None or self.global_scale.numel() != E):
            raise ValueError(f"FP4Experts: NVFP4 needs one global scale per expert ({E})")

    @property
    def shape(self) -> tuple[int, int, int]:
        E, N, half_k = self.packed.shape
        return E, N, 2 * half_k

    @property
    def nbytes(self) -> int:
        gs = 0 if self.global_scale is None else self.global_scale.numel() * 4
        return self.packed.numel() + self.block_scale.numel() + gs

    def expert(self, e: int) -> QuantizedTensor:
        """Expert e as the 2-D QuantizedTensor the formats produced (views, no copy)."""
        gs = None if self.global_scale is None else self.global_scale[e].reshape(1)
        return QuantizedTensor(self.packed[e], self.block_scale[e], gs, tuple(self.shape[1:]), self.config)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[E, N, K] in dtype, expert by expert with the formats' dequantizer."""
        return torch.stack([self.expert(e).dequantize(dtype) for e in range(self.shape[0])])

    def to(self, device) -> "FP4Experts":
        gs = None if self.global_scale is None else self.global_scale.to(device)
        return FP4Experts(self.packed.to(device), self.block_scale.to(device), gs, self.config)


def stack_experts(qts: Sequence[QuantizedTensor]) -> FP4Experts:
    """Stack per-expert 2-D QuantizedTensors (one format config, one shape) into FP4Experts."""
    if not qts:
        raise ValueError("stack_experts: no experts given")
    cfg, shape = qts[0].config, tuple(qts[0].shape)
    for i, qt in enumerate(qts):
        if qt.config != cfg or tuple(qt.shape) != shape or len(shape) != 2:
            raise ValueError(f"stack_experts: expert {i} has config {qt.config} shape {tuple(qt.shape)}; "
                             f"expert 0 has {cfg} {shape} (all must match, 2-D)")
    gs = None if qts[0].global_scale is None else torch.cat([qt.global_scale.float().reshape(1) for qt in qts])
    return FP4Experts(torch.stack([qt.data for qt in qts]).contiguous(),
                      torch.stack([qt.scale for qt in qts]).contiguous(), gs, cfg)


def quantize_experts(w: torch.Tensor, config: NVFP4Config | MXFP4Config) -> FP4Experts:
    """w [E, N, K] -> FP4Experts, each expert quantized on its own by `config` (own amax, own global scale)."""
    if w.dim() != 3:
        raise ValueError(f"quantize_experts: expected [E, N, K], got {tuple(w.shape)}")
    return stack_experts([config.quantize(w[e], name=f"expert {e}") for e in range(w.shape[0])])


def experts_from_quantized(qt: QuantizedTensor) -> FP4Experts:
    """A 3-D QuantizedTensor [E, N, K] (one global scale for all experts) as FP4Experts (scale repeated)."""
    if len(qt.shape) != 3:
        raise ValueError(f"experts_from_quantized: expected a 3-D [E, N, K] tensor, got {tuple(qt.shape)}")
    E = qt.shape[0]
    gs = None if qt.global_scale is None else qt.global_scale.float().reshape(-1)[:1].expand(E).contiguous()
    return FP4Experts(qt.data.contiguous(), qt.scale.contiguous(), gs, qt.config)


# ----------------------------------------------------------------------------------------------
# routing


@dataclass(frozen=True, eq=False)
class MoERouting:
    """Expert-sorted pairs and the M-tile map of one routing (see the module docstring)."""

    expert_ids: torch.Tensor  # int64 [P]: expert of pair p = token * top_k + slot
    pairs: torch.Tensor  # int32 [P]: pair ids sorted by expert (stable)
    tile_expert: torch.Tensor  # int32 [tiles]: expert of each M tile; num_experts for unused tiles
    tile_start: torch.Tensor  # int32 [tiles]: first sorted position of the tile
    tile_end: torch.Tensor  # int32 [tiles]: end of the tile's expert run (rows >= end are masked)
    num_experts: int
    top_k: int
    block_m: int

    @property
    def num_pairs(self) -> int:
        return self.expert_ids.numel()


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """An upper bound on sum_e ceil(c_e / block_m) over any routing of num_pairs pairs."""
    return min(num_experts, num_pairs) + num_pairs // block_m


def default_block_m(num_pairs: int, num_experts: int) -> int:
    """16 rows while experts average <= 16 pairs (decode), then 32, then 64."""
    per_expert = num_pairs / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64


# Programmatic dependent launch for the layer's chain of launches (route, gate_up, down, combine; see
# `_fp4_moe`'s docstring), where `fp4_gemm.use_pdl` allows it (CUDA, sm_90+, FP4KIT_PDL not 0), from
# MOE_PDL_MIN_TOKENS tokens: on the H100 (round 6, graph) PDL took 1-5 us off the layer at T = 2..64
# but added 1-6 us at T = 1. Read at every call, so a benchmark can compare both in one process.
MOE_PDL = True
MOE_PDL_MIN_TOKENS = 2


def _moe_pdl(t: torch.Tensor, tokens: int) -> bool:
    return MOE_PDL and tokens >= MOE_PDL_MIN_TOKENS and use_pdl(t)


# Up to this many pairs (and experts) `route_topk` is one Triton program (`_fp4_moe.moe_route_kernel`).
ROUTE_KERNEL_MAX_PAIRS = 4096
ROUTE_KERNEL_MAX_EXPERTS = 1024
_ROUTE_LAUNCHES: dict = {}


def route_topk(topk_ids: torch.Tensor, num_experts: int, block_m: int | None = None) -> MoERouting:
    """topk_ids [T, top_k] (the router's chosen experts) -> MoERouting, on topk_ids' device, no host sync.

    One Triton launch on CUDA (and under TRITON_INTERPRET=1) for up to ROUTE_KERNEL_MAX_PAIRS pairs;
    `route_topk_torch`, its twin, otherwise. Both give the same pairs and the same tiles.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"route_topk: topk_ids must be [tokens, top_k], got {tuple(topk_ids.shape)}")
    T, top_k = topk_ids.shape
    P = T * top_k
    if (not use_triton(topk_ids) or P == 0 or P > ROUTE_KERNEL_MAX_PAIRS
            or num_experts > ROUTE_KERNEL_MAX_EXPERTS):
        return route_topk_torch(topk_ids, num_experts, block_m)
    block_m = block_m or default_block_m(P, num_experts)
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()  # [P]
    n_tiles = max_tiles(P, num_experts, block_m)
    i32 = torch.int32
    pairs = torch.empty(P, dtype=i32, device=dev)
    tile_expert, tile_start, tile_end = (torch.empty(n_tiles, dtype=i32, device=dev) for _ in range(3))
    BLOCK_P, BLOCK_E, BLOCK_T = (_pow2(v) for v in (P, num_experts, n_tiles))
    pdl = _moe_pdl(flat, T)
    args = (flat, pairs, tile_expert, tile_start, tile_end, P, num_experts, n_tiles, BLOCK_P, BLOCK_E, BLOCK_T, block_m,
            pdl)
    key = (BLOCK_P, BLOCK_E, BLOCK_T, block_m, P == 1, num_experts == 1, n_tiles == 1, dev.index, pdl)
    compiled = _ROUTE_LAUNCHES.get(key)
    if compiled is not None and hooks_idle():
        compiled.run(1, 1, 1, _raw_stream(dev.index), compiled.function, compiled.packed_metadata,
                     None, None, None, *args)
    else:
        compiled = _fp4_moe.moe_route_kernel[(1,)](*args, num_warps=4, **({"launch_pdl": True} if pdl else {}))
        if not _interpreting() and compiled is not None:
            _ROUTE_LAUNCHES[key] = compiled
    return MoERouting(flat, pairs, tile_expert, tile_start, tile_end, num_experts, top_k, block_m)


def route_topk_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int | None = None) -> MoERouting:
    """Twin of `route_topk` in torch ops (any size, any device)."""
    if topk_ids.dim() != 2:
        raise ValueError(f"route_topk: topk_ids must be [tokens, top_k], got {tuple(topk_ids.shape)}")
    T, top_k = topk_ids.shape
    P = T * top_k
    block_m = block_m or default_block_m(P, num_experts)
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()  # [P]
    order = torch.argsort(flat, stable=True)  # [P] pair ids by expert
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    tiles = (counts + block_m - 1) // block_m  # [E]
    tile_cum = torch.cumsum(tiles, 0)
    offsets = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each expert
    t = torch.arange(max_tiles(P, num_experts, block_m), device=dev)
    e = torch.searchsorted(tile_cum, t, right=True)  # [tiles] in 0..E (E: past the last real tile)
    ec = e.clamp(max=num_experts - 1)
    start = offsets[ec] + (t - (tile_cum[ec] - tiles[ec])) * block_m
    end = offsets[ec] + counts[ec]
    i32 = torch.int32
    return MoERouting(flat, order.to(i32), e.to(i32), start.to(i32), end.to(i32), num_experts, top_k, block_m)


# ----------------------------------------------------------------------------------------------
# prepared experts and the launcher


def _scale_tables(ex: FP4Experts) -> torch.Tensor:
    """float32 [E, 256]: each expert's effective block scale per scale code, times 2^14 (see fp4_gemm)."""
    E = ex.shape[0]
    codes = torch.arange(256, dtype=torch.uint8, device=ex.packed.device)
    if isinstance(ex.config, NVFP4Config):
        s = codes.view(torch.float8_e4m3fn)
        eff = torch.stack([ex.config.effective_block_scale(s, ex.global_scale[e].float()) for e in range(E)])
    else:
        eff = e8m0_to_float(codes).float()
        eff = torch.where(codes.int() <= 240, eff, torch.full_like(eff, float("nan"))).expand(E, 256)
    return (eff * 16384.0).contiguous()


@dataclass
class PreparedFP4Experts:
    """FP4Experts made ready for the kernel: int32 word view, uint8 scale codes, per-expert scale tables."""

    experts: FP4Experts
    words: torch.Tensor  # int32 [E, N, K/8]
    scale_codes: torch.Tensor  # uint8 [E, N, K/bs]
    tables: torch.Tensor  # float32 [E, 256]
    tables_bf16x2: torch.Tensor | None = None  # int32 [E, 256]: the bfloat16 decode's scales (MXFP4: powers of
    #                                              two; NVFP4: E4M3 x 2^117, the same for every expert)
    one_mul: bool = True
    post: torch.Tensor | None = None  # float32 [E] (NVFP4): the bfloat16 decode's output factor per expert
    launches: dict = field(default_factory=dict)
    configs: dict = field(default_factory=dict)  # (pairs, N_out, swiglu, bf16 decode) -> MoEGemmConfig


def prepare_fp4_experts(ex: FP4Experts) -> PreparedFP4Experts:
    """Precompute what every call would redo; keep it beside the weights (it snapshots the global scales)."""
    E, N, K = ex.shape
    if K % 8:
        raise ValueError(f"fp4 MoE: K must be a multiple of 8, got {K}")
    packed = ex.packed.contiguous()
    if packed.data_ptr() % 16:
        packed = packed.clone()
    codes = ex.block_scale.contiguous().view(torch.uint8)
    post, one_mul = None, True
    if isinstance(ex.config, MXFP4Config):
        table2, one_mul = _bf16x2_pow2_table(codes)
    else:
        table2 = _bf16x2_e4m3_table(codes.device)
        post = nv_post_factor(ex.config, ex.global_scale.reshape(E)).contiguous()
    return PreparedFP4Experts(ex, packed.view(torch.int32), codes, _scale_tables(ex), table2.expand(E, 256).contiguous(),
                              one_mul, post=post)


def lut_tables(ex: FP4Experts, dtype: torch.dtype) -> torch.Tensor:
    """int32 [E, 256, 4]: each expert's byte-plane decode table for x's dtype (`fp4_mma.lut_table`: the eight
    magnitudes dtype(e2m1(j) * s_eff(c)) per scale code, as the twin rounds them)."""
    return torch.stack([lut_table(ex.expert(e), dtype) for e in range(ex.shape[0])]).contiguous()


def _lut_for(prep: "PreparedFP4Experts", dtype: torch.dtype) -> torch.Tensor:
    """The experts' decode tables for dtype, built on first use and kept in `prep.configs`."""
    key = ("lut", dtype)
    lut = prep.configs.get(key)
    if lut is None:
        if prep.words.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fp4 MoE (lut=True): the decode tables were not built before CUDA graph capture; "
                               "call it once eagerly first")
        lut = prep.configs[key] = lut_tables(prep.experts, dtype)
    return lut


@dataclass(frozen=True)
class MoEGemmConfig:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 1
    evict: str = ""  # eviction policy of the weight loads: "" or "evict_first"
    lut: bool = False  # byte-permute table decode (`lut_tables`) instead of the float16-pair decode

    def __post_init__(self):
        if self.block_n < 16 or self.block_k < 32 or self.block_k % 32 or self.split_k < 1:
            raise ValueError(f"MoEGemmConfig: block_n >= 16, block_k a multiple of 32, split_k >= 1; got {self}")
        if self.evict not in ("", "evict_first", "evict_last"):
            raise ValueError(f"MoEGemmConfig.evict must be '', 'evict_first' or 'evict_last', got {self.evict!r}")


# Split K (doubling, at most MOE_MAX_SPLIT) while the expected programs (N tiles x touched experts) are
# fewer than this many per SM and every split keeps >= 2 K steps: decoding one to a few tokens.
MOE_SPLIT_PROGRAMS_PER_SM = 4
MOE_MAX_SPLIT = 4


def _moe_config(N_out: int, K: int, swiglu: bool, mx_bf16: bool = False, num_pairs: int = 0, num_experts: int = 1,
                sm_count: int = 132) -> MoEGemmConfig:
    """H100 sweeps, Qwen3-30B-A3B shapes (GPU time in a CUDA graph).

    2026-11-22 (T = 1, 8, 64; results/fp4_moe_sweep_h100.json): 64-row tiles won everywhere; 128-wide K
    tiles with 5 stages for the float32 decode, 256-wide with 3 stages for the MXFP4 bfloat16 decode.
    2026-11-23 round 6 (T = 2, 8, 16, 64; results/fp4_moe_round6_sweep_h100.json): evict_first weight
    loads at or slightly below the plain loads everywhere (T = 64 NVFP4 down 83.0 -> 78.1 us with 3
    stages); the down projection (K = 768) prefers 128-wide K tiles with 3 stages (NVFP4 T = 16 55.2 ->
    52.7 us; MXFP4 T = 64 82.7 -> 81.3) except MXFP4 with few programs (T = 2: 12.8 us at 256 vs 15.4 at
    128); second sweep (T = 4, 16, 64; results/fp4_moe_round6_sweep2_h100.json): MXFP4 down 2 stages
    (T = 16 54.6 -> 53.9, T = 64 81.0 -> 80.0), MXFP4 gate_up with few programs 5 stages (T = 4
    43.9 -> 41.5). The interpreter gets small tiles."""
    if _interpreting():
        return MoEGemmConfig(16, 64, num_warps=1, num_stages=1)
    block_n, block_k, stages = (64, 256, 3) if mx_bf16 and K >= 256 else (64, 128, 5)
    programs = triton.cdiv(N_out, block_n) * min(num_pairs, num_experts)
    split = 1
    while (split < MOE_MAX_SPLIT and programs * split < MOE_SPLIT_PROGRAMS_PER_SM * sm_count
           and K // (block_k * split * 2) >= 2):
        split *= 2
    few = programs < MOE_SPLIT_PROGRAMS_PER_SM * sm_count  # few tokens: few experts, few programs
    if not swiglu and not (mx_bf16 and few):
        block_k, stages = 128, 2 if mx_bf16 else 3
    elif swiglu and mx_bf16 and few:
        stages = 5
    lut = MOE_LUT_NVFP4 and not mx_bf16  # only where the float16-pair decode would run
    return MoEGemmConfig(block_n, block_k, num_warps=4, num_stages=stages, split_k=split, evict=MOE_EVICT, lut=lut)


# Eviction policy of the grouped GEMM's weight loads (round 6 sweep: evict_first at or below plain loads).
MOE_EVICT = "evict_first"
# The table decode (MoEGemmConfig.lut) by default where the float16-pair decode would run (NVFP4).
MOE_LUT_NVFP4 = False
# NVFP4 through the bfloat16 pair decode (exact code x E4M3 products, the per-tensor factor on the float32 sums;
# see `_fp4_moe.fp4_moe_kernel`) instead of the float16-pair decode, with bfloat16 x.
MOE_NV_BF16_DECODE = True
# The bfloat16 decode's block scales (NVFP4 E4M3 x 2^117, MXFP4 powers of two) computed in registers
# (`_fp4_bits.e4m3_bf16x2_shifted`, `e8m0_bf16x2`) instead of gathered from the table, one load per block.
MOE_SCALE_REGS = True


def _check_call(x: torch.Tensor, ex: FP4Experts, routing: MoERouting, swiglu: bool, x_per_pair: bool) -> int:
    E, N, K = ex.shape
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"fp4 MoE: x must be bfloat16 or float16, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"fp4 MoE: x must be [rows, {K}] for experts of shape {ex.shape}, got {tuple(x.shape)}")
    rows = routing.num_pairs if x_per_pair else routing.num_pairs // routing.top_k
    if x.shape[0] != rows:
        raise ValueError(f"fp4 MoE: x has {x.shape[0]} rows, the routing expects {rows} "
                         f"({'pairs' if x_per_pair else 'tokens'})")
    if routing.num_experts != E:
        raise ValueError(f"fp4 MoE: routing is over {routing.num_experts} experts, the weights have {E}")
    if swiglu and N % 2:
        raise ValueError(f"fp4 MoE: SwiGLU needs an even number of weight rows (gate; up), got {N}")
    return N // 2 if swiglu else N


def fp4_moe_gemm(x: torch.Tensor, experts: FP4Experts | PreparedFP4Experts, routing: MoERouting, *,
                 swiglu: bool = False, pair_weights: torch.Tensor | None = None, x_per_pair: bool = False,
                 config: MoEGemmConfig | None = None, combine: bool = False, _prefetch: bool = False
                 ) -> torch.Tensor:
    """y [P, N_out]: y[p] = act(x[row(p)] @ dequant(W[expert(p)]).T) (* pair_weights[p]); see the module docstring.

    x is [T, K] (row(p) = p // top_k) or, with x_per_pair, [P, K] (row(p) = p). Pass a
    PreparedFP4Experts (from `prepare_fp4_experts`) to skip the per-call preparation. Runs the
    Triton kernel on CUDA (or under TRITON_INTERPRET=1), the torch twin elsewhere.
    combine: return [T, N_out], each token's top_k rows summed as `_combine` does, fused into the
    kernel's epilogue (the last program of each token sums; no extra launch).
    _prefetch (internal, `fp4_moe_mlp`'s down projection): with PDL, read the routing and the first
    weights before waiting for the previous launch; only valid when that launch is an fp4 MoE GEMM
    (which waits before letting this one start) and the routing was written before it.
    """
    ex = experts.experts if isinstance(experts, PreparedFP4Experts) else experts
    N_out = _check_call(x, ex, routing, swiglu, x_per_pair)
    if not use_triton(x):
        y = fp4_moe_gemm_torch(x, ex, routing, swiglu=swiglu, pair_weights=pair_weights, x_per_pair=x_per_pair)
        return _combine(y, routing.num_pairs // routing.top_k, routing.top_k) if combine else y
    prep = experts if isinstance(experts, PreparedFP4Experts) else prepare_fp4_experts(ex)
    x = x.contiguous()
    P = routing.num_pairs
    y = torch.empty(P, N_out, dtype=x.dtype, device=x.device)
    T = P // routing.top_k
    out = torch.empty(T, N_out, dtype=x.dtype, device=x.device) if combine else y
    if P == 0:
        return out
    if pair_weights is not None:
        pair_weights = pair_weights.reshape(-1).contiguous()
        if pair_weights.numel() != P:
            raise ValueError(f"fp4 MoE: pair_weights has {pair_weights.numel()} entries for {P} pairs")
    E, _, K = ex.shape
    # the bfloat16 pair decode (bf16 x): MXFP4 bit for bit with the twin; NVFP4 with its output factor (POST)
    nv = prep.post is not None
    mx_bf16 = x.dtype == torch.bfloat16 and (MOE_NV_BF16_DECODE if nv else fp4_gemm.MXFP4_BF16_DECODE)
    if config is not None and config.lut:
        mx_bf16 = False  # the table decode gives the weights in natural k order, for any format
    key = (P, N_out, swiglu, mx_bf16, MOE_LUT_NVFP4)
    cfg = config or prep.configs.get(key) or prep.configs.setdefault(key, _moe_config(N_out, K, swiglu, mx_bf16, P, E,
                                                 132 if _interpreting() else fp4_gemm._sm_count(x.device)))
    grid = (_cdiv(N_out, cfg.block_n), routing.tile_expert.numel(), cfg.split_k)
    stream = 0 if _interpreting() else _raw_stream(x.device.index)
    split_tiles = grid[0] * grid[1] if cfg.split_k > 1 else 0
    if cfg.split_k > 1 or combine:  # split-K tickets first, then the combine's tickets [T, N tiles]
        ws, cnt = fp4_gemm._splitk_buffers(x.device, stream, cfg.split_k * P * (2 if swiglu else 1) * N_out,
                                           split_tiles + (T * grid[0] if combine else 0))
    else:
        ws, cnt = y, y
    tcnt = cnt[split_tiles:] if combine else cnt
    table = _lut_for(prep, x.dtype) if cfg.lut else prep.tables_bf16x2 if mx_bf16 else prep.tables
    pdl = _moe_pdl(x, T)
    prefetch = _prefetch and pdl
    post = mx_bf16 and nv
    scale_reg = mx_bf16 and not cfg.lut and MOE_SCALE_REGS
    args = (x, prep.words, prep.scale_codes, table, prep.post if post else table, routing.pairs, routing.tile_expert, routing.tile_start,
            routing.tile_end, x if pair_weights is None else pair_weights, y, ws, cnt, out, tcnt, E, P, N_out, K,
            1 if x_per_pair else routing.top_k, ex.config.block_size, swiglu, pair_weights is not None,
            routing.block_m, cfg.block_n, cfg.block_k, cfg.split_k, mx_bf16, prep.one_mul, _interpreting(),
            cfg.evict, pdl, routing.top_k if combine else 0, prefetch, cfg.lut, post, scale_reg)
    _launch(prep, grid, args, cfg, (cfg, mx_bf16, scale_reg, routing.block_m, x.dtype, x.data_ptr() % 16 == 0, swiglu,
                                    x_per_pair, routing.top_k, None if pair_weights is None else
                                    (pair_weights.dtype, pair_weights.data_ptr() % 16 == 0), x.device.index,
                                    P == 1, P % 16 == 0, pdl, combine, prefetch), stream, pdl)
    return out


def _launch(prep: PreparedFP4Experts, grid, args, cfg: MoEGemmConfig, key, stream: int, pdl: bool = False) -> None:
    """Launch fp4_moe_kernel; after the first call per key the compiled kernel is launched directly."""
    compiled = prep.launches.get(key)
    if compiled is not None and hooks_idle():
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function,
                     compiled.packed_metadata, None, None, None, *args)
        return
    compiled = _fp4_moe.fp4_moe_kernel[grid](*args, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                             **({"launch_pdl": True} if pdl else {}))
    if not _interpreting() and compiled is not None:
        prep.launches[key] = compiled


def fp4_moe_gemm_torch(x: torch.Tensor, experts: FP4Experts | PreparedFP4Experts, routing: MoERouting, *,
                       swiglu: bool = False, pair_weights: torch.Tensor | None = None,
                       x_per_pair: bool = False) -> torch.Tensor:
    """Twin of `fp4_moe_gemm`: per expert, its pairs' rows times the formats' dequantized weight, in float32."""
    ex = experts.experts if isinstance(experts, PreparedFP4Experts) else experts
    N_out = _check_call(x, ex, routing, swiglu, x_per_pair)
    P = routing.num_pairs
    row = torch.arange(P, device=x.device) // (1 if x_per_pair else routing.top_k)
    y = torch.empty(P, N_out, dtype=x.dtype, device=x.device)
    for e in routing.expert_ids.unique().tolist():
        idx = (routing.expert_ids == e).nonzero().squeeze(1)
        w = ex.expert(e).dequantize(x.dtype).float()  # the weight the kernel sees: one rounding to x's dtype
        h = x[row[idx]].float() @ w.T
        if swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        if pair_weights is not None:
            h = h * pair_weights.reshape(-1)[idx].float()[:, None]
        y[idx] = h.to(x.dtype)
    return y


# ----------------------------------------------------------------------------------------------
# the whole expert MLP


def _combine(y: torch.Tensor, T: int, top_k: int) -> torch.Tensor:
    """[P, H] pair rows -> [T, H]: each token's top_k rows summed in float32 (a running sum in slot order),
    one rounding. The twin of `_fp4_moe.moe_combine_kernel`, bit for bit."""
    y3 = y.view(T, top_k, -1)
    acc = y3[:, 0].float()
    for s in range(1, top_k):
        acc = acc + y3[:, s].float()
    return acc.to(y.dtype)


# The combine as one Triton launch (`_fp4_moe.moe_combine_kernel`) where the kernels run; False: torch ops.
MOE_COMBINE_KERNEL = True
# `fp4_moe_mlp`: the combine fused into the down GEMM's epilogue (tickets per token; no extra launch).
# Off: on the H100 (round 6, graph) it was 1-10 us slower than the separate combine launch at T >= 4
# (the ticket atomics and the last program's reads sit on the down GEMM's critical tail).
MOE_FUSED_COMBINE = False
# `fp4_moe_mlp`, with PDL, up to MOE_PREFETCH_MAX_TOKENS tokens: the down GEMM reads the routing and
# prefetches its first K step of weights into L2 before waiting for gate_up (`_fp4_moe.fp4_moe_kernel`'s
# PREFETCH). H100, final round-6 run (layer in a graph, same run): T = 2 NVFP4 46.0 -> 44.6 us, MXFP4
# 40.9 -> 39.4; T = 4 -0.3 us; from T = 8 it cost 0-5 us (MXFP4 T = 64 213.3 -> 218.3: the prefetches of
# ~2000 programs compete with gate_up's last loads), hence the limit.
MOE_PREFETCH = True
MOE_PREFETCH_MAX_TOKENS = 4
_COMBINE_LAUNCHES: dict = {}
COMBINE_BLOCK_H = 1024


def combine_slots(y: torch.Tensor, T: int, top_k: int) -> torch.Tensor:
    """`_combine` in one launch on CUDA (or the interpreter): [P, H] -> [T, H]."""
    if not (MOE_COMBINE_KERNEL and use_triton(y)) or T == 0:
        return _combine(y, T, top_k)
    H = y.shape[1]
    y = y.contiguous()
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    block_h = min(COMBINE_BLOCK_H, _pow2(H))
    grid = (T, _cdiv(H, block_h))
    pdl = _moe_pdl(y, T)
    args = (y, out, H, top_k, block_h, _interpreting(), pdl)
    key = (y.dtype, top_k, block_h, H % 16 == 0, y.device.index, pdl)
    compiled = _COMBINE_LAUNCHES.get(key)
    if compiled is not None and hooks_idle():
        compiled.run(grid[0], grid[1], 1, _raw_stream(y.device.index), compiled.function, compiled.packed_metadata,
                     None, None, None, *args)
        return out
    compiled = _fp4_moe.moe_combine_kernel[grid](*args, num_warps=4, **({"launch_pdl": True} if pdl else {}))
    if not _interpreting() and compiled is not None:
        _COMBINE_LAUNCHES[key] = compiled
    return out


def fp4_moe_mlp(x: torch.Tensor, gate_up: FP4Experts | PreparedFP4Experts, down: FP4Experts | PreparedFP4Experts,
                topk_ids: torch.Tensor, topk_weights: torch.Tensor, *, routing: MoERouting | None = None
                ) -> torch.Tensor:
    """A SwiGLU MoE expert block: x [T, H] -> [T, H] = sum_slots w * down_e(silu(gate_e x) * up_e x).

    gate_up [E, 2I, H] (gate rows first), down [E, H, I]; topk_ids / topk_weights [T, top_k] from
    the router. Two launches (gate_up with the SwiGLU epilogue, down with the router weights), the
    routing built once (or passed in) and shared.
    """
    T = x.shape[0]
    ex = gate_up.experts if isinstance(gate_up, PreparedFP4Experts) else gate_up
    routing = routing or route_topk(topk_ids, ex.shape[0])
    h = fp4_moe_gemm(x, gate_up, routing, swiglu=True)  # [P, I]
    prefetch = MOE_PREFETCH and T <= MOE_PREFETCH_MAX_TOKENS
    if MOE_FUSED_COMBINE:  # the combine in the down GEMM's epilogue: [T, H]
        return fp4_moe_gemm(h, down, routing, x_per_pair=True, pair_weights=topk_weights, combine=True,
                            _prefetch=prefetch)
    y = fp4_moe_gemm(h, down, routing, x_per_pair=True, pair_weights=topk_weights, _prefetch=prefetch)  # [P, H]
    return combine_slots(y, T, routing.top_k)


def fp4_moe_mlp_torch(x: torch.Tensor, gate_up: FP4Experts, down: FP4Experts, topk_ids: torch.Tensor,
                      topk_weights: torch.Tensor) -> torch.Tensor:
    """Twin of `fp4_moe_mlp`: the same chain through `fp4_moe_gemm_torch`."""
    routing = route_topk(topk_ids, gate_up.shape[0])
    h = fp4_moe_gemm_torch(x, gate_up, routing, swiglu=True)
    y = fp4_moe_gemm_torch(h, down, routing, x_per_pair=True, pair_weights=topk_weights)
    return _combine(y, x.shape[0], routing.top_k)
