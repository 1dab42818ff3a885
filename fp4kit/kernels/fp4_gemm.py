"""W4A16 GEMM on Hopper: `y = x @ dequant(W).T + bias` with an NVFP4 or MXFP4 weight, bf16/fp16 x.

Why it is fast without FP4 tensor cores. Hopper has none, so the weight is dequantized in
registers and fed to the bf16 tensor cores. At small M (decoding) a linear layer is a pass over
its weight: bf16 moves 2 bytes per weight, NVFP4 0.5 + 1/16 (a UE4M3 scale per 16) = 0.5625,
MXFP4 0.5 + 1/32 = 0.53125. The best a kernel can do is the bytes over the copy bandwidth, up to
3.56x (NVFP4) faster than cuBLAS bf16. At large M (prefill) the GEMM is compute bound and the
dequantization is overhead on top of the same tensor-core work: the aim there is parity.

The arithmetic (the torch twin, `fp4_matmul_torch`, is the specification):

    w[n, k] = dtype(e2m1(q[n, k]) * s_eff[n, k // bs])       one float32 product, one rounding
    s_eff   = ue4m3(s) / g   (NVFP4, GlobalScale.ENCODE)      IEEE division, as `formats`
            = ue4m3(s) * g   (NVFP4, GlobalScale.DECODE)
            = 2^(c - 127)    (MXFP4, E8M0 code c)
    y[m, n] = dtype(sum_k float32(x[m, k] * w[n, k]) + bias[n])

so `fp4_dequantize` equals `QuantizedTensor.dequantize(dtype)` bit for bit, and the GEMM equals
`F.linear(x, qt.dequantize(dtype), bias)` up to float32 summation order.

Layout. The weight stays in the checkpoint layout (compressed-tensors / vLLM): packed codes
[N, K/2] uint8 (element 2j in the low nibble) and scale codes [N, K/bs] (float8_e4m3fn as bytes,
or E8M0 uint8). A [BLOCK_N, BLOCK_K] tile reads BLOCK_K/2 contiguous bytes per row (>= 32 bytes:
16-byte vector loads) and BLOCK_K/bs scale bytes per row; no offline re-layout is needed, so
`FP4Linear` buffers are used as they are.

Paths: M <= SKINNY_MAX_M (decoding) runs `fp4_skinny_kernel` on a `PreparedFP4Weight` (built once
per weight by `prepare_fp4_weight`, cached on `qt.data`): int32-word loads, a 256-entry table of
effective scales (the twin's float32 s / g, so no division in the kernel), and after the first
call the compiled kernel is launched directly. Layers with few output tiles split K (up to 4
ways) and reduce inside the same launch: each split writes a float32 partial tile to a per-stream
workspace, a per-tile ticket elects the last split, which sums the partials in split order
(deterministic), adds the bias and writes y. MXFP4 weights with bf16 activations skip float32:
two codes are placed as bf16 bits and multiplied by the power-of-two block scale with one
`mul.rn.bf16x2` (exact), in a k order shared with x so each result is an MMA operand register
(`MXFP4_BF16_DECODE`). Either way the weights are the twin's bit for bit, so the GEMM tolerance
argument above is unchanged. At M = 1 and 2 (`GEMV_AUTO_MAX_M`) the CUDA-core GEMV
of `_fp4_gemv` runs instead, on a re-laid copy of the weight (`gemv_layout`: K split into 8 planes
so each plane of a word run meets a contiguous run of x; built once, kept on the prepared weight):
float32 FFMAs, the block scale applied once per 16 products, and no rounding of the decoded weight
to x's dtype (so it differs from the twin by that rounding; bounds in tests/kernels/test_fp4_gemv.py).
On an sm_90 GPU with bf16 x, M = 3..64 goes to the warp-specialised Gluon kernel of `fp4_ws` instead
(DecodePath.WS: a TMA loader warp, the codes re-laid so they decode straight into the wgmma operand registers;
1.3-1.9x faster than the skinny kernel on the Llama shapes at M = 16-32; `WS_AUTO = False` keeps the skinny kernel).
`fp4_matmul(..., path=DecodePath.SKINNY / GEMV / WS)` forces one. Prefill (SKINNY_MAX_M < M <
DEQUANT_CUBLAS_MIN_M) runs `fp4_mma`'s swapped-operand kernel as a tiled GEMM (decoded weights as the
wgmma's register operand, tokens on its N side, K split on narrow layers); from DEQUANT_CUBLAS_MIN_M rows
on, `fp4_matmul` dequantizes the weight once with `fp4_dequantize` (bit-exact, at the memory roofline)
and calls cuBLAS, which is faster there. On the H100 the fused path runs at 0.5-1.0x cuBLAS bf16 (M = 65-256)
and dequantize + cuBLAS at 0.6-1.0x (M = 257-4096): the work is the same bf16 tensor-core flops, and at
M = 256 the flops already take about as long as bf16's bytes (benchmarks/bench_fp4_prefill.py derives the
bound). Passing `config=` forces the older tiled kernel.
Measurements: BENCHMARKS.md and benchmarks/NOTES_fp4_gemm.md.
"""

from __future__ import annotations

import enum
import os
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fp4kit.formats import GlobalScale, MXFP4Config, NVFP4Config, QuantizedTensor
from fp4kit.formats.scales import e8m0_to_float

try:
    import triton
    from triton import knobs as _knobs

    from . import _fp4_gemm, _fp4_gemv

    HAS_TRITON = True
except ImportError:  # CPU installs without triton use the torch twins
    HAS_TRITON = False


def _raw_stream(device_index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device_index)


# Triton decides at `@triton.jit` time (when the kernel modules are imported, just above) whether to interpret,
# so the switch is read once here too: reading os.environ on every launch cost ~1 us of host time per read.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreting() -> bool:
    return _INTERPRET


def _cdiv(a: int, b: int) -> int:
    """`triton.cdiv` in plain Python: Triton 3.6 routes its helpers through a constexpr-function wrapper that
    costs a few microseconds per call, and each launch computes several grids."""
    return -(-a // b)


def _pow2(n: int) -> int:
    """`triton.next_power_of_2` in plain Python (see `_cdiv`); 0 for n = 0, as Triton's."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def use_triton(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors when triton is importable, and anywhere under TRITON_INTERPRET=1."""
    return HAS_TRITON and (t.is_cuda or _interpreting())


def _check_fp4(qt: QuantizedTensor, name: str) -> None:
    if not isinstance(qt.config, (NVFP4Config, MXFP4Config)):
        raise TypeError(f"{name}: expected an NVFP4 or MXFP4 QuantizedTensor, got {type(qt.config).__name__}")
    if len(qt.shape) != 2:
        raise ValueError(f"{name}: the weight must be 2-D [out, in], got shape {qt.shape}")
    if qt.data.dtype != torch.uint8 or not qt.data.is_contiguous() or not qt.scale.is_contiguous():
        raise ValueError(f"{name}: packed data must be contiguous uint8 and scales contiguous")


def _format_args(qt: QuantizedTensor):
    """(block size, is_nvfp4, global-scale-encode, scale codes as uint8, global scale tensor)."""
    cfg = qt.config
    scale_codes = qt.scale.view(torch.uint8)
    if isinstance(cfg, NVFP4Config):
        return cfg.block_size, True, cfg.global_scale is GlobalScale.ENCODE, scale_codes, qt.global_scale.float()
    return cfg.block_size, False, True, scale_codes, scale_codes  # gs unused for MXFP4


# ----------------------------------------------------------------------------------------------
# dequantize


def fp4_dequantize_torch(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Twin of `fp4_dequantize`: the formats' own dequantizer."""
    return qt.dequantize(dtype)


def fp4_dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize a 2-D FP4 weight with the GEMM's decoder; bit-exact with `qt.dequantize(dtype)`."""
    _check_fp4(qt, "fp4_dequantize")
    if not use_triton(qt.data):
        return fp4_dequantize_torch(qt, dtype)
    R, K = qt.shape
    bs, is_nv, enc, ws, gs = _format_args(qt)
    out = torch.empty(R, K, dtype=dtype, device=qt.data.device)
    block_r, block_k = (16, 64) if _interpreting() else (32, 256)
    grid = (triton.cdiv(R, block_r), triton.cdiv(K, block_k))
    _fp4_gemm.fp4_dequant_kernel[grid](qt.data, ws, gs, out, R, K, BS=bs, IS_NVFP4=is_nv, GS_ENCODE=enc,
                                       BLOCK_R=block_r, BLOCK_K=block_k,
                                       INTERPRET=_interpreting(), num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------
# GEMM


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    m_fast: bool = False  # skinny kernel: grid with the token tiles fastest (prefill; see _fp4_gemm._tile_ids)


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# Programmatic dependent launch (see `_fp4_gemv`'s docstring) for the decode-chain kernels: the GEMV here
# and the kernels of `decode_ops`. Read at every launch, so a benchmark can compare both in one process
# (`FP4KIT_PDL=0` in the environment turns it off). Needs compute capability 9.0 (Hopper) or later.
PDL = os.environ.get("FP4KIT_PDL", "1") != "0"
_PDL_DEVICES: dict = {}


def use_pdl(t: torch.Tensor) -> bool:
    """Whether a decode-chain kernel on `t`'s device launches with PDL: `PDL` on, CUDA (not the interpreter),
    compute capability >= 9.0."""
    if not PDL or not t.is_cuda or _interpreting():
        return False
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _PDL_DEVICES:
        _PDL_DEVICES[idx] = torch.cuda.get_device_capability(idx) >= (9, 0)
    return _PDL_DEVICES[idx]


def _config(M: int, N: int, K: int, device) -> GemmConfig:
    """Tile shapes, from the H100 sweep in benchmarks/bench_fp4_gemm.py --sweep (2026-11-22).

    M <= 16: 16 x 32 x 128 tiles; split K while the grid stays within ~4 programs per SM (the
    sweep's best at all four Llama shapes: split 1 for gate_up, 2 for qkv, 4 for down).
    Larger M: 64 x 64 or 128 x 64 tiles (used below DEQUANT_CUBLAS_MIN_M only).
    """
    if _interpreting():
        return GemmConfig(16, 16, 64, split_k=2 if K >= 128 else 1, group_m=2, num_warps=1, num_stages=1)
    if M <= 16:
        block_n, block_k = 32, 128
        tiles, split = triton.cdiv(N, block_n), 1
        while tiles * split * 2 <= 4 * _sm_count(device) and K // (block_k * split * 2) >= 2:
            split *= 2
        return GemmConfig(16, block_n, block_k, split_k=split, num_warps=4, num_stages=4)
    if M <= 64:
        return GemmConfig(64, 64, 128, num_warps=4, num_stages=4)
    return GemmConfig(128, 64, 128, num_warps=8, num_stages=3)


# Prefill. Above SKINNY_MAX_M rows and below DEQUANT_CUBLAS_MIN_M, `fp4_mma`'s kernel runs as a tiled GEMM
# (`fp4_mma.prefill_config`); from DEQUANT_CUBLAS_MIN_M rows on, dequantizing the weight once (a bit-exact
# Triton pass at the memory roofline) and calling cuBLAS is faster. H100 sweep (BENCHMARKS.md "Prefill
# GEMM"), sum of the four Llama-3-8B layers, NVFP4: fused 213 / 320 us against dequant + cuBLAS 393 / 423
# at M = 128 / 256; at M = 320, 384 and 512 dequant + cuBLAS was faster on 11 of the 12 layer measurements (a
# third token tile of 128, or a half-empty second tile of 256, costs the fused kernel more than the dequantize).
DEQUANT_CUBLAS_MIN_M = 257


def fp4_matmul_torch(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of `fp4_matmul`: dequantize to x's dtype (one rounding per weight), then `F.linear`."""
    return F.linear(x, qt.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------------------------
# prepared weights: what the decode path precomputes once per layer


def _scale_table(qt: QuantizedTensor) -> torch.Tensor:
    """float32 [256]: the effective block scale of each scale code, times 2^14 (exact: a power of two).

    Computed with the formats' own arithmetic (`effective_block_scale`: IEEE s / g for NVFP4
    ENCODE), so the kernel multiplies by exactly the twin's factor without dividing. E8M0 codes
    above 240 are NaN, as in `_fp4_bits.mxfp4_scale14` (the 2^14 fold would overflow).
    """
    codes = torch.arange(256, dtype=torch.uint8, device=qt.data.device)
    if isinstance(qt.config, NVFP4Config):
        eff = qt.config.effective_block_scale(codes.view(torch.float8_e4m3fn), qt.global_scale.float().reshape(()))
    else:
        eff = e8m0_to_float(codes).float()
        eff = torch.where(codes.int() <= 240, eff, torch.full_like(eff, float("nan")))
    return (eff * 16384.0).contiguous()


# MXFP4 weights with bfloat16 activations build their weights in bfloat16 directly (power-of-two
# scales make the product exact: see `_fp4_gemm._mxfp4_words_to_bf16`); False forces the float32 decode.
MXFP4_BF16_DECODE = True


def _bf16x2_pow2_table(scale_codes: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """int32 [256] bf16x2 pairs for the MXFP4 bfloat16 decode, and whether one multiply suffices.

    One multiply (every E8M0 code <= 128): entry c is 2^(c-1), applied to the code pair placed as
    bfloat16 times 2^-126. Otherwise entry c is 2^(c-127) (code 0: the subnormal 2^-127, code 255:
    NaN, as E8M0) and the kernel multiplies by 2^126 first.
    """
    one_mul = scale_codes.numel() == 0 or int(scale_codes.max()) <= 128
    c = torch.arange(256, dtype=torch.int32, device=scale_codes.device)
    if one_mul:
        v = torch.where(c <= 128, (c + 126) << 7, torch.full_like(c, 0x7FC0))
    else:
        v = torch.where(c == 0, torch.full_like(c, 0x0040), c << 7)
        v = torch.where(c == 255, torch.full_like(c, 0x7FC0), v)
    return (v | (v << 16)).contiguous(), one_mul


# NVFP4 in the bfloat16 pair decode: each placed pair (E2M1 value x 2^-126) is multiplied by E4M3 x 2^NV_SCALE_SHIFT
# in one bf16x2 multiply: the product is the E2M1 value x the E4M3 scale x 2^-9, exact (<= 2 and <= 4 significant
# bits) and normal (>= 0.5 x 2^-9 x 2^-9); E4M3 x 2^117 <= 448 x 2^117 < 2^126 fits bfloat16. The output is
# multiplied once by the per-tensor factor x 2^9 (`nv_post_factor`).
NV_SCALE_SHIFT = 117


def _bf16x2_e4m3_table(device) -> torch.Tensor:
    """int32 [256] bf16x2 pairs for the NVFP4 bfloat16 decode: entry c is E4M3(c) x 2^NV_SCALE_SHIFT (exact;
    the NaN codes stay NaN)."""
    c = torch.arange(256, dtype=torch.uint8, device=device)
    v = (c.view(torch.float8_e4m3fn).float() * 2.0**NV_SCALE_SHIFT).to(torch.bfloat16)
    v = v.view(torch.int16).to(torch.int32) & 0xFFFF
    return (v | (v << 16)).contiguous()


def nv_post_factor(config, global_scale: torch.Tensor) -> torch.Tensor:
    """float32 [...]: what the NVFP4 bfloat16 decode's output is multiplied by, per global scale: the
    per-tensor factor of `NVFP4Config.effective_block_scale` (its value at E4M3 = 1) times 2^(126 - 117)."""
    ones = torch.ones_like(global_scale, dtype=torch.float32)
    return config.effective_block_scale(ones, global_scale.float()) * 2.0 ** (126 - NV_SCALE_SHIFT)


@dataclass
class PreparedFP4Weight:
    """A 2-D FP4 weight made ready for the decode kernel: build once (`prepare_fp4_weight`), call often.

    Holds the packed codes as int32 words (a view, no copy), the scale codes as uint8, the
    per-code scale table, and the compiled kernels already launched for this weight, keyed by the
    call's shape and dtypes. It snapshots the global scale: if the QuantizedTensor's tensors are
    modified in place, prepare again (the cache in `fp4_linear` does so by itself). The GEMV's
    plane layout (`gemv`, a re-laid copy of codes and scales) is added on the first GEMV call.
    """
    qt: QuantizedTensor
    words: torch.Tensor  # int32 [N, K/8]
    scale_codes: torch.Tensor  # uint8 [N, K/bs]
    table: torch.Tensor  # float32 [256]
    N: int
    K: int
    block_size: int
    versions: tuple
    table_bf16x2: torch.Tensor | None = None  # int32 [256] (MXFP4 only), see _bf16x2_pow2_table
    one_mul: bool = True
    launches: dict = field(default_factory=dict)
    configs: dict = field(default_factory=dict)  # (M, bf16 decode) -> the skinny kernel's GemmConfig
    gemv: GemvLayout | None = None  # the CUDA-core GEMV's plane layout, built on its first use
    gemv_glu: GemvLayout | None = None  # the same for a [gate | up] pair, rows interleaved (`fp4_glu`)

    def is_current(self, qt: QuantizedTensor) -> bool:
        return (qt.data is self.qt.data and qt.scale is self.qt.scale and qt.global_scale is self.qt.global_scale
                and (qt.config is self.qt.config or qt.config == self.qt.config) and _versions(qt) == self.versions)


def _versions(qt: QuantizedTensor) -> tuple:
    gs = qt.global_scale
    return qt.data._version, qt.scale._version, None if gs is None else gs._version


def prepare_fp4_weight(qt: QuantizedTensor) -> PreparedFP4Weight:
    """Precompute what every `fp4_linear` call on this weight would otherwise redo (see PreparedFP4Weight)."""
    _check_fp4(qt, "prepare_fp4_weight")
    N, K = qt.shape
    data = qt.data if qt.data.data_ptr() % 16 == 0 else qt.data.clone()
    codes = qt.scale.view(torch.uint8)
    table2, one_mul = _bf16x2_pow2_table(codes) if isinstance(qt.config, MXFP4Config) else (None, True)
    return PreparedFP4Weight(qt, data.view(torch.int32), codes, _scale_table(qt), N, K, qt.config.block_size,
                             _versions(qt), table2, one_mul)


_PREPARED: dict[int, tuple] = {}  # id(qt.data) -> (weakref to qt.data, PreparedFP4Weight)


def _prepared_for(qt: QuantizedTensor) -> PreparedFP4Weight:
    """The cached PreparedFP4Weight of qt (keyed on its packed-data tensor, which FP4Linear keeps)."""
    key = id(qt.data)
    hit = _PREPARED.get(key)
    if hit is not None and hit[0]() is qt.data and hit[1].is_current(qt):
        return hit[1]
    if qt.data.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fp4_linear: this weight was not prepared before CUDA graph capture; call it once "
                           "eagerly first (or keep a prepare_fp4_weight(qt) and pass it as prepared=)")
    prepared = prepare_fp4_weight(qt)
    cache = _PREPARED  # bound now: the callback may run at interpreter exit, after module globals are cleared
    _PREPARED[key] = (weakref.ref(qt.data, lambda _, key=key, cache=cache: cache.pop(key, None)), prepared)
    return prepared


# Up to this many rows the skinny (decode) kernel runs; tiles from the H100 sweep (--sweep).
SKINNY_MAX_M = 64
# Split K (doubling, at most SKINNY_MAX_SPLIT) while the grid has fewer programs than this many per SM
# and each split keeps >= 2 K tiles.
SKINNY_SPLIT_PROGRAMS_PER_SM = 4
SKINNY_MAX_SPLIT = 4


def _skinny_config(M: int, N: int, K: int, block_size: int, sm_count: int = 132, mx_bf16: bool = False) -> GemmConfig:
    """From the H100 sweeps at M = 1 (2026-11-22, GPU time in a graph, benchmarks/NOTES_fp4_gemm.md and
    results/fp4_gemm_skinny_splitk_sweep_h100.json): 64-row tiles everywhere; 128-wide K tiles and 5
    stages for the float32 decode (NVFP4, and MXFP4 with fp16 x), 256-wide K tiles and 4 stages for the
    MXFP4 bfloat16 decode (its per-K-step cost of reordering x is amortised over more weights); split K
    4 ways on the N = 4096-6144 layers and 2 ways on gate_up (N = 28672), which the rule below gives.
    NVFP4 best vs split-free 32 x 256: qkv 23.4 -> 16.0 us, o 14.5 -> 12.7, down 43.6 -> 31.4, gate_up
    62.6 -> 53.3 (64 x 128 unsplit)."""
    if _interpreting():
        return GemmConfig(16, 16, 64, num_warps=1, num_stages=1)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n, block_k, stages = (64, 256, 4) if mx_bf16 else (64, 128, 5)
    programs = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    split = 1
    while (split < SKINNY_MAX_SPLIT and programs * split < SKINNY_SPLIT_PROGRAMS_PER_SM * sm_count
           and K // (block_k * split * 2) >= 2):
        split *= 2
    return GemmConfig(block_m, block_n, block_k, split_k=split, num_warps=4, num_stages=stages)


_SPLITK_BUFFERS: dict = {}  # (device, stream) -> (float32 workspace, int32 tickets); see fp4_skinny_kernel
_RETIRED: list = []  # outgrown buffers stay alive: CUDA graphs captured earlier may still point at them


def _splitk_buffers(device: torch.device, stream: int, ws_elems: int, tiles: int):
    """The split-K workspace and tickets of one stream (tickets start at zero; the kernel leaves them zero).

    Per stream, because launches on one stream run in order, so two launches never share a ticket."""
    key = (device.index, stream)
    ws, cnt = _SPLITK_BUFFERS.get(key, (None, None))
    if ws is None or ws.numel() < ws_elems or cnt.numel() < tiles:
        if ws is not None:
            _RETIRED.append((ws, cnt))
        ws = torch.empty(max(ws_elems, 1 << 20), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _SPLITK_BUFFERS[key] = ws, cnt
    return ws, cnt


def _grid(M: int, N: int, block_m: int, block_n: int, split_k: int, m_fast: bool) -> tuple:
    """Launch grid of the skinny / MMA kernels: (tiles of N, tiles of M, splits), token tiles first with m_fast."""
    n_tiles, m_tiles = _cdiv(N, block_n), _cdiv(M, block_m)
    return (m_tiles, n_tiles, split_k) if m_fast else (n_tiles, m_tiles, split_k)


def _launch_workspace(x2: torch.Tensor, y: torch.Tensor, split_k: int, grid: tuple):
    """(stream, workspace, tickets) of one split-K launch writing y [M, N] on `grid` (n tiles x m tiles x splits);
    without a split the kernel never touches them, so y stands in for both."""
    stream = 0 if _interpreting() else _raw_stream(x2.device.index)
    if split_k > 1:
        ws, cnt = _splitk_buffers(x2.device, stream, split_k * y.shape[0] * y.shape[1], grid[0] * grid[1])
        return stream, ws, cnt
    return stream, y, y


def hooks_idle() -> bool:
    """True when no Triton launch hook is installed, so a cached kernel may be launched directly.

    Triton up to 3.3 keeps `None` in `knobs.runtime.launch_enter_hook` / `launch_exit_hook` when nothing is
    installed; 3.4+ keeps a `HookChain` whose `calls` list is empty. Testing `is None` alone (as this module
    did until 2026-11-23) never passes on 3.6, and every call then took Triton's full dispatch: ~50 us of host
    time per `fp4_linear` against ~15 us for `torch.matmul` (H100, benchmarks/host_overhead.py). Anything else
    found there (a plain callable, an unknown object) counts as installed."""
    if not HAS_TRITON:
        return False
    for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _launch_cached(prepared: PreparedFP4Weight, key: tuple, kernel, grid, stream: int, args: tuple, **launch) -> None:
    """Launch `kernel` on `grid`; after the first (compiling) launch, run the cached compiled kernel directly,
    skipping Triton's Python dispatch (a few microseconds per call that decode cannot afford).

    The direct launch passes no launch hooks, so it runs only while `hooks_idle()` says no hook is installed
    (a profiler such as Proton installs one; then every call takes Triton's dispatch, which calls the hooks)."""
    compiled = prepared.launches.get(key)
    if compiled is not None and hooks_idle():
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None,
                     None, *args)
        return
    compiled = kernel[grid](*args, **launch)
    if not _interpreting() and compiled is not None:
        prepared.launches[key] = compiled


def _launch_skinny(x2: torch.Tensor, prepared: PreparedFP4Weight, bias: torch.Tensor | None,
                   config: GemmConfig | None = None) -> torch.Tensor:
    """One launch of fp4_skinny_kernel; after the first call per (shape, dtype, alignment) the compiled
    kernel is launched directly, skipping Triton's argument binding and cache lookup."""
    M = x2.shape[0]
    N, K = prepared.N, prepared.K
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    mx_bf16 = MXFP4_BF16_DECODE and prepared.table_bf16x2 is not None and x2.dtype == torch.bfloat16
    cfg = config or prepared.configs.get((M, mx_bf16)) or prepared.configs.setdefault(
        (M, mx_bf16), _skinny_config(M, N, K, prepared.block_size,
                                     132 if _interpreting() else _sm_count(x2.device), mx_bf16))
    grid = _grid(M, N, cfg.block_m, cfg.block_n, cfg.split_k, cfg.m_fast)
    stream, ws, cnt = _launch_workspace(x2, y, cfg.split_k, grid)
    table = prepared.table_bf16x2 if mx_bf16 else prepared.table
    args = (x2, prepared.words, prepared.scale_codes, table, x2 if bias is None else bias, y, ws, cnt, M,
            N, K, prepared.block_size, bias is not None, cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k,
            mx_bf16, prepared.one_mul, _interpreting(), cfg.m_fast)
    key = (cfg, mx_bf16, x2.dtype, None if bias is None else bias.dtype, x2.data_ptr() % 16 == 0,
           bias is None or bias.data_ptr() % 16 == 0, M == 1, M % 16 == 0, x2.device.index)
    _launch_cached(prepared, key, _fp4_gemm.fp4_skinny_kernel, grid, stream, args, num_warps=cfg.num_warps,
                   num_stages=cfg.num_stages)
    return y


# ----------------------------------------------------------------------------------------------
# CUDA-core GEMV for M <= GEMV_MAX_M: the plane layout (see _fp4_gemv for the kernel and the why)


class DecodePath(enum.Enum):
    """Which kernel `fp4_matmul` runs for small M.

    AUTO: the default rule (`_auto_path`). SKINNY: the tensor-core decode kernel (M <= SKINNY_MAX_M).
    GEMV: the CUDA-core GEMV on the plane layout (M <= GEMV_MAX_M; NVFP4 needs K % 128 == 0,
    MXFP4 K % 256 == 0). WS: the warp-specialised Gluon kernel of `fp4_ws` (sm_90, bf16 x,
    `fp4_ws.ws_supported`).
    """
    AUTO = "auto"
    SKINNY = "skinny"
    GEMV = "gemv"
    WS = "ws"


GEMV_MAX_M = 4
GEMV_LANES = 8  # lanes per row in a chunk (a chunk is 16 * lanes words): 128 contiguous bytes per row and r


def gemv_lanes(K: int, block_size: int, max_lanes: int = GEMV_LANES) -> int | None:
    """Lanes L of the plane layout for this K (the largest power of two <= max_lanes with K/8 % 16 L == 0),
    or None when the format's blocks do not line up with the planes (K % 8 bs != 0)."""
    if K % (8 * block_size) != 0:
        return None
    lanes = max_lanes
    while (K // 8) % (16 * lanes):
        lanes //= 2
    return lanes


@dataclass(frozen=True)
class GemvLayout:
    """A weight in the GEMV's plane layout (`gemv_layout`); about the size of the packed weight."""
    words: torch.Tensor  # int32 [N, K/8]: logical word i holds codes of k = j K/8 + i, j = 0..7, chunk order
    scales: torch.Tensor  # uint8 [N, K/(8 bs), 8]: the 8 plane scales of a word group adjacent
    lanes: int


def _codes(qt: QuantizedTensor) -> torch.Tensor:
    """uint8 [N, K] E2M1 codes (element 2j is the low nibble of byte j)."""
    d = qt.data
    return torch.stack((d & 15, d >> 4), dim=-1).reshape(d.shape[0], -1)


# Where the GEMV word keeps the bits (m, e0, e1, s) of the code of plane J (low half) and of plane
# J + 4 (the same positions + 16): chosen so that each pair decodes to a float16 pair (sign at 15,
# e1 e0 m at 11..9) with few shifts: pair 0 in place, pair 1 three bits lower, pairs 2 and 3 split
# (see `_fp4_gemv._code_pair`). Together the four patterns fill the 16 bits of a half.
GEMV_BIT_POSITIONS = ((9, 10, 11, 15), (6, 7, 8, 12), (0, 1, 2, 13), (3, 4, 5, 14))


def _gemv_bit_positions(device) -> torch.Tensor:
    """int64 [8 planes, 4 code bits]: the word bit of each code bit (m, e0, e1, s) of each plane."""
    low = torch.tensor(GEMV_BIT_POSITIONS, dtype=torch.int64, device=device)
    return torch.cat((low, low + 16))


def gemv_layout(qt: QuantizedTensor, lanes: int = GEMV_LANES, rows_per_chunk: int | None = None) -> GemvLayout:
    """Re-lay a 2-D FP4 weight for `_fp4_gemv.fp4_gemv_kernel` (pure torch, exact, any device).

    words: plane j of logical word i is the code of k = j * K/8 + i, its bits at
    GEMV_BIT_POSITIONS; a chunk of 16 L logical words [L (lane), 4 (r), 4 (c)] is stored as
    [4 (r), L (lane), 4 (c)]. scales: block b = j * K/(8 bs) + g of row n goes to [n, g, j].
    The words are built `rows_per_chunk` rows at a time (default: ~128 MB of int64 temporaries).
    """
    _check_fp4(qt, "gemv_layout")
    N, K = qt.shape
    bs = qt.config.block_size
    L = gemv_lanes(K, bs, lanes)
    if L is None:
        raise ValueError(f"gemv_layout: {type(qt.config).__name__} (block {bs}) needs in_features % {8 * bs} == 0; "
                         f"the weight has {K}")
    K8 = K // 8
    codes = _codes(qt)
    pos = _gemv_bit_positions(codes.device)[None, :, None, :]  # [1, j, 1, bit]
    bit = torch.arange(4, dtype=torch.int64, device=codes.device)
    words = torch.empty(N, K8, dtype=torch.int32, device=codes.device)
    # rows in chunks: the int64 bit expansion is 32 bytes per weight (16.8 GB for a 128256 x 4096 head at once)
    step = rows_per_chunk or max(1, (1 << 27) // (32 * K))
    for r0 in range(0, N, step):
        planes = codes[r0:r0 + step].view(-1, 8, K8, 1).to(torch.int64)  # [rows, j, i, 1]
        w = (((planes >> bit) & 1) << pos).sum(dim=(1, 3))  # disjoint bits: the sum is the OR, < 2^32
        words[r0:r0 + step] = (w - ((w >> 31) << 32)).to(torch.int32)  # the same 32 bits as a signed int32
    words = words.view(N, K8 // (16 * L), L, 4, 4).transpose(2, 3).reshape(N, K8).contiguous()
    scales = qt.scale.view(torch.uint8).view(N, 8, K // (8 * bs)).transpose(1, 2).contiguous()
    return GemvLayout(words, scales, L)


def gemv_unlayout(layout: GemvLayout, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `gemv_layout`: (packed codes uint8 [N, K/2], scale codes uint8 [N, K/bs])."""
    N, K8 = layout.words.shape
    L = layout.lanes
    words = layout.words.view(N, K8 // (16 * L), 4, L, 4).transpose(2, 3).reshape(N, 1, K8, 1).to(torch.int64)
    pos = _gemv_bit_positions(words.device)[None, :, None, :]  # [1, j, 1, bit]
    bit = torch.arange(4, dtype=torch.int64, device=words.device)
    codes = (((words >> pos) & 1) << bit).sum(dim=3).to(torch.uint8).reshape(N, 8 * K8)  # k = j K/8 + i
    data = codes[:, 0::2] | (codes[:, 1::2] << 4)
    scales = layout.scales.transpose(1, 2).reshape(N, -1)
    return data, scales


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of the GEMV: rows per program, K splits (dividing the chunk count), warps, and
    whether the next chunk is loaded before this one is decoded (see `_fp4_gemv.fp4_gemv_kernel`)."""
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    prefetch: bool = False
    cache: str = ""  # cache_modifier of the weight loads: "", ".ca", ".cg" (L2 only), ".cv"
    evict: str = ""  # eviction_policy of the weight loads: "", "evict_first", "evict_last"
    stages: int = 1  # software pipelining depth of the K loop (tl.range num_stages)
    persistent: int = 0  # > 0: `fp4_gemv_persistent_kernel` with this many programs per SM (split_k = chunks)

    def __post_init__(self):
        if self.cache not in ("", ".ca", ".cg", ".cv"):
            raise ValueError(f"GemvConfig.cache must be '', '.ca', '.cg' or '.cv', got {self.cache!r}")
        if self.cache == ".cg" and self.evict:
            raise ValueError("GemvConfig: ptxas rejects an eviction policy together with the .cg cache modifier")
        if self.evict not in ("", "evict_first", "evict_last"):
            raise ValueError(f"GemvConfig.evict must be '', 'evict_first' or 'evict_last', got {self.evict!r}")
        if self.stages < 1:
            raise ValueError(f"GemvConfig.stages must be >= 1, got {self.stages}")
        for name in ("block_n", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two >= 1, got {v}")
        if self.split_k < 1:
            raise ValueError(f"GemvConfig.split_k must be >= 1, got {self.split_k}")
        if self.persistent < 0 or (self.persistent and (self.prefetch or self.stages > 1)):
            raise ValueError("GemvConfig.persistent must be >= 0 and needs prefetch=False, stages=1 (the persistent "
                             f"kernel prefetches across its items itself); got {self}")


@dataclass(frozen=True)
class GemvLaunchRule:
    """How `_gemv_config` shapes a launch for one M: rows each thread owns (each x value it converts is
    reused by that many rows), and how many programs per SM the K split aims for."""
    rows_per_thread: int
    programs_per_sm: int


# From the H100 sweeps of benchmarks/bench_fp4_gemv.py (2026-11-23, results/fp4_gemv_h100.json and
# fp4_gemv_h100_defaults.json, NVFP4, GPU time in a CUDA graph). M = 1: 2 rows per thread (96
# registers: ~5 programs per SM resident) and a K split up to ~12 programs per SM were best (gate_up
# 42.7 -> 35.3 us, down 21.7 -> 19.9 us against 4 rows and 4 programs per SM). M = 2: the same rule
# (gate_up 53.5 -> 44.3 us; down 28.6 -> 29.7 us). M >= 3: 2 rows (4 rows spill at M = 4), 4
# programs per SM; the GEMV loses to the skinny kernel there and is not the default.
# Round 4 (results/fp4_gemv_round4_sweep2_h100.json): the weight loads with L1::evict_first took
# gate_up M = 1 from 35.8 to 32.2 us and helped every shape by 0-0.7 us at M = 1 (GEMV_EVICT); at
# M = 2 fewer K splits won (qkv 15.0 -> 12.4, down 29.1 -> 24.9, o 10.9 -> 10.6 us): 2 programs per SM.
GEMV_LAUNCH = {1: GemvLaunchRule(2, 12), 2: GemvLaunchRule(2, 2)}
GEMV_LAUNCH_DEFAULT = GemvLaunchRule(2, 4)
GEMV_EVICT = "evict_first"  # eviction policy of the streamed weight loads (keeps x in L1)


# Round 8 (benchmarks/bench_fp4_gemv.py --round8 / --round8b, H100, 2026-11-23, NVFP4, M = 1, GPU time in a
# CUDA graph with PDL, results/fp4_gemv_round8{,b}_h100.json): the rule above is not the best launch for every
# shape, and the plane layout's lane count matters. At 16 lanes (256 contiguous bytes per row and run) gate_up
# 28672 x 4096 ran 29.5-30.0 us against 31.8-32.2 at 8 lanes (two runs), qkv 6144 x 4096 8.6 us (32 rows, split
# 2) against 9.2-9.4 (8.6-9.1 over three runs); down, o, 12288 / 16384 x 4096 and the 128256 x 4096 head gained
# < 4% or lost, so they keep the rule. Tuned shapes: (N, K) -> (lanes, M = 1 launch). The layout is built once per
# weight, so its lanes serve M = 2 too, with the rule's launch (measured faster there as well: gate_up 45.2 ->
# 42.1 us, qkv 10.7 -> 9.9; results/fp4_gemv_chain_tuned2_h100.json).
GEMV_TUNED = {
    (28672, 4096): (16, GemvConfig(block_n=16, split_k=1, num_warps=4, evict=GEMV_EVICT)),
    (6144, 4096): (16, GemvConfig(block_n=32, split_k=2, num_warps=4, evict=GEMV_EVICT)),
}


def gemv_tuned_lanes(N: int, K: int, block_size: int) -> int:
    """Lanes of the plane layout for an N x K weight: the tuned shapes' (where the format's blocks allow
    it), else GEMV_LANES."""
    tuned = GEMV_TUNED.get((N, K))
    if tuned is not None and gemv_lanes(K, block_size, tuned[0]) == tuned[0]:
        return tuned[0]
    return GEMV_LANES


def _gemv_config(M: int, N: int, K: int, lanes: int, sm_count: int = 132) -> GemvConfig:
    """Rows per program from the launch rule (4 warps of 32 / L row lanes each; rows halved when even
    one program per chunk would leave fewer than 4 programs per SM), then the smallest K split (a
    divisor of the chunk count) that reaches the rule's programs per SM, or one program per chunk."""
    if _interpreting():
        return GemvConfig(block_n=16, split_k=1, num_warps=1)
    tuned = GEMV_TUNED.get((N, K))
    if M == 1 and tuned is not None and tuned[0] == lanes:
        return tuned[1]
    rule = GEMV_LAUNCH.get(M, GEMV_LAUNCH_DEFAULT)
    num_warps = 4
    chunks = (K // 8) // (16 * lanes)
    rows = rule.rows_per_thread
    if rows > 2 and triton.cdiv(N, rows * num_warps * (32 // lanes)) * chunks < 4 * sm_count:
        rows = 2
    block_n = rows * num_warps * (32 // lanes)
    programs = triton.cdiv(N, block_n)
    target = rule.programs_per_sm * sm_count
    split = next((d for d in range(1, chunks + 1) if chunks % d == 0 and programs * d >= target), chunks)
    return GemvConfig(block_n, split, num_warps, evict=GEMV_EVICT)


def _gemv_layout_for(prepared: PreparedFP4Weight) -> GemvLayout:
    if prepared.gemv is None:
        if prepared.qt.data.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fp4_matmul(path=GEMV): this weight's plane layout was not built before CUDA graph "
                               "capture; call it once eagerly first")
        prepared.gemv = gemv_layout(prepared.qt, gemv_tuned_lanes(prepared.N, prepared.K, prepared.block_size))
    return prepared.gemv


def gemv_supported(qt: QuantizedTensor, M: int) -> bool:
    """Whether the GEMV path can run this call (M <= GEMV_MAX_M and K lines up with the format's blocks)."""
    return 0 < M <= GEMV_MAX_M and gemv_lanes(qt.shape[1], qt.config.block_size) is not None


def _launch_gemv(x2: torch.Tensor, prepared: PreparedFP4Weight, bias: torch.Tensor | None,
                 config: GemvConfig | None = None, layout: GemvLayout | None = None, glu: bool = False) -> torch.Tensor:
    """One launch of fp4_gemv_kernel, or of fp4_gemv_persistent_kernel when `config.persistent` (compiled
    kernel cached per key and launched directly, as the skinny path). `layout`: another plane layout of
    the same weight (e.g. other lanes, for the benchmark's sweep) instead of the prepared one. `glu`: the
    layout's rows are an interleaved gate/up pair and y [M, N / 2] is silu(gate) * up (`fp4_glu`)."""
    M = x2.shape[0]
    N, K = prepared.N, prepared.K
    lay = layout or _gemv_layout_for(prepared)
    y = torch.empty(M, N // 2 if glu else N, dtype=x2.dtype, device=x2.device)
    sms = 132 if _interpreting() else _sm_count(x2.device)
    cfg = config or prepared.configs.get(("gemv", M, lay.lanes)) or prepared.configs.setdefault(
        ("gemv", M, lay.lanes), _gemv_config(M, N, K, lay.lanes, sms))
    chunks = (K // 8) // (16 * lay.lanes)
    if chunks % cfg.split_k or (cfg.persistent and cfg.split_k != chunks):
        raise ValueError(f"GemvConfig.split_k={cfg.split_k} must divide the {chunks} chunks of K = {K} "
                         "(and equal it for the persistent kernel)")
    block_m = _pow2(M)
    tiles = (_cdiv(N, cfg.block_n), _cdiv(M, block_m), cfg.split_k)
    # the interpreter counts one SM for the persistent grid, so there `persistent` is the program count
    # (tests walk many items per program); on the GPU it is programs per SM
    programs = cfg.persistent * (1 if _interpreting() else sms)
    grid = (min(programs, tiles[0] * cfg.split_k), tiles[1], 1) if cfg.persistent else tiles
    stream, ws, cnt = _launch_workspace(x2, y, cfg.split_k, tiles)
    pdl = use_pdl(x2)
    common = (x2, lay.words, lay.scales, prepared.table, x2 if bias is None else bias, y, ws, cnt, M, N, K,
              prepared.block_size == 32, bias is not None, block_m, cfg.block_n, lay.lanes, cfg.split_k)
    if cfg.persistent:
        kernel = _fp4_gemv.fp4_gemv_persistent_kernel
        args = common + (_interpreting(), cfg.cache, cfg.evict, pdl, glu)
    else:
        kernel = _fp4_gemv.fp4_gemv_kernel
        args = common + (cfg.prefetch, _interpreting(), cfg.cache, cfg.evict, cfg.stages, pdl, glu)
    key = ("gemv", glu, cfg, lay.lanes, block_m, x2.dtype, None if bias is None else bias.dtype, x2.data_ptr() % 16 == 0,
           bias is None or bias.data_ptr() % 16 == 0, M == 1, M % 16 == 0, x2.device.index, pdl)
    _launch_cached(prepared, key, kernel, grid, stream, args, num_warps=cfg.num_warps,
                   num_stages=1, **({"launch_pdl": True} if pdl else {}))
    return y


# AUTO takes the GEMV up to this many rows, per format (0 turns it off). Measured on the H100
# (BENCHMARKS.md, "CUDA-core FP4 GEMV"): at M = 1 the GEMV beats the skinny kernel on all four
# Llama-3-8B shapes in both formats; at M = 2 it did for NVFP4 only until round 4 (evict_first loads,
# 2 programs per SM at M = 2), after which MXFP4 wins there too: 1.74x vs the skinny kernel's 1.49x
# cuBLAS mean in a graph, every shape (results/fp4_gemv_round4_h100.json); at M = 4 it loses (4 float32
# FFMAs per weight make it issue-bound). Cost: the
# plane layout is a second copy of the packed weight and scales, kept on the PreparedFP4Weight.
GEMV_AUTO_MAX_M = {NVFP4Config: 2, MXFP4Config: 2}


# AUTO takes the warp-specialised kernel (fp4_ws) wherever it can run (ws_supported: sm_90, bf16 x,
# fp4_ws.WS_MIN_M <= M <= WS_MAX_M, K % 256 NVFP4 / % 512 MXFP4), and at 1-2 rows where `ws_beats_gemv`;
# False keeps the skinny kernel (and the GEMV at 1-2 rows).
WS_AUTO = True


def _auto_path(M: int, qt: QuantizedTensor, x2: torch.Tensor | None = None) -> DecodePath:
    """The default small-M kernel: the GEMV where it measured faster and can run (1-2 rows, except the shapes
    where the warp-specialised kernel beat it: `fp4_ws.ws_beats_gemv`), then the warp-specialised kernel where
    it can run (on an H100 it beat the skinny kernel at M = 3..64 on the Llama shapes), else the skinny kernel."""
    ws = WS_AUTO and x2 is not None and x2.is_cuda and not _interpreting()
    if M <= GEMV_AUTO_MAX_M.get(type(qt.config), 0) and gemv_supported(qt, M):
        if ws:
            from .fp4_ws import ws_beats_gemv, ws_supported  # the sibling module builds on this one

            if ws_beats_gemv(M, qt.shape[0], qt.shape[1], qt.config.block_size) and ws_supported(x2, qt, min_m=1):
                return DecodePath.WS
        return DecodePath.GEMV
    if ws:
        from .fp4_ws import ws_supported

        if ws_supported(x2, qt):
            return DecodePath.WS
    return DecodePath.SKINNY


def fp4_matmul(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None, *,
               config: GemmConfig | None = None, prepared: PreparedFP4Weight | None = None,
               path: DecodePath = DecodePath.AUTO) -> torch.Tensor:
    """y[..., N] = x[..., K] @ dequant(qt)[N, K].T (+ bias), x bf16 or fp16, through Triton.

    M <= SKINNY_MAX_M: the skinny kernel on `prepared` (looked up in, or added to, the cache on
    `qt.data` when None), or the CUDA-core GEMV where `path` (or for AUTO the default rule) picks it.
    Below DEQUANT_CUBLAS_MIN_M: `fp4_mma`'s kernel as a tiled GEMM (prefill). From there on:
    dequantize + cuBLAS. `config` forces the older tiled kernel (`fp4_matmul_kernel`) with that config.
    """
    N, K = qt.shape
    if x.shape[-1] != K:
        raise ValueError(f"fp4_matmul: x has {x.shape[-1]} features, the weight expects {K}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"fp4_matmul: x must be bfloat16 or float16, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if path is DecodePath.GEMV:
        _check_fp4(qt, "fp4_matmul")
        if config is not None or not gemv_supported(qt, M):
            raise ValueError(f"fp4_matmul(path=GEMV) needs M <= {GEMV_MAX_M} and in_features % "
                             f"{8 * qt.config.block_size} == 0 and no config; got M = {M}, K = {K}")
    elif path is DecodePath.WS:
        from .fp4_ws import ws_supported

        if config is not None or not ws_supported(x2, qt, min_m=1):
            raise ValueError("fp4_matmul(path=WS) needs bf16 x on an sm_90 GPU, 1 <= M <= 64, NVFP4 with "
                             f"in_features % 256 == 0 or MXFP4 with % 512, and no config; got M = {M}, K = {K}, "
                             f"{x.dtype} on {x.device}")
    elif path is DecodePath.AUTO and config is None and 0 < M <= SKINNY_MAX_M:
        path = _auto_path(M, qt, x2)
    if config is None and 0 < M <= SKINNY_MAX_M and path in (DecodePath.SKINNY, DecodePath.GEMV, DecodePath.WS):
        if prepared is None or not prepared.is_current(qt):
            prepared = _prepared_for(qt)  # checks qt when it builds
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
            bias = bias.to(x.dtype).contiguous()
        if path is DecodePath.WS:
            from .fp4_ws import launch_ws

            return launch_ws(x2, prepared, bias).reshape(*lead, N)
        launch = _launch_gemv if path is DecodePath.GEMV else _launch_skinny
        return launch(x2, prepared, bias).reshape(*lead, N)
    _check_fp4(qt, "fp4_matmul")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if config is None and M >= DEQUANT_CUBLAS_MIN_M and not _interpreting():
        y = F.linear(x2, fp4_dequantize(qt, x.dtype), None if bias is None else bias.to(x.dtype))
        return y.reshape(*lead, N)
    if config is None and M > SKINNY_MAX_M:
        from .fp4_mma import _launch_mma  # the sibling module builds on this one (PreparedFP4Weight, launches)

        if prepared is None or not prepared.is_current(qt):
            prepared = _prepared_for(qt)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
            bias = bias.to(x.dtype).contiguous()
        return _launch_mma(x2, prepared, bias).reshape(*lead, N)
    cfg = config or _config(M, N, K, x.device)
    bs, is_nv, enc, ws, gs = _format_args(qt)
    if cfg.split_k > 1:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.to(x.dtype).reshape(*lead, N)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), cfg.split_k)
    _fp4_gemm.fp4_matmul_kernel[grid](
        x2, qt.data, ws, gs, bias if bias is not None else x2, y, M, N, K, x2.stride(0), y.stride(0),
        BS=bs, IS_NVFP4=is_nv, GS_ENCODE=enc, HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m,
        INTERPRET=_interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.split_k > 1:
        y = y.to(x.dtype)
    return y.reshape(*lead, N)


def fp4_linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None,
               prepared: PreparedFP4Weight | None = None) -> torch.Tensor:
    """What `FP4Linear.forward` calls: the Triton GEMM on CUDA, the torch twin elsewhere.

    `prepared` (from `prepare_fp4_weight(qt)`) skips the per-call cache lookup; without it the
    prepared weight is cached on `qt.data`. Falls back to the twin (same function, within GEMM
    rounding) when triton is missing, the tensor is on the CPU, or x is float32.
    """
    if use_triton(x) and x.dtype in (torch.bfloat16, torch.float16):
        return fp4_matmul(x, qt, bias, prepared=prepared)
    return fp4_matmul_torch(x, qt, bias)
