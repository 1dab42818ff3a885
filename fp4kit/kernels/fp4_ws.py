"""Warp-specialised FP4 weight GEMM for Hopper decode batches (`fp4_ws_matmul`, Gluon), 3 <= M <= 64.

What `fp4_matmul` runs (DecodePath.WS, chosen by AUTO) for bf16 activations with 3..64 rows on an sm_90 GPU,
NVFP4 (K % 256 == 0) or MXFP4 (K % 512 == 0); the skinny kernel covers everything else. The weight is on the
MMA's M side (rows of W), the tokens on its N side, so a 16-token batch fills a wgmma m64n16k16:

    loader warp:   for each K stage: wait empty[s]; TMA the stage's scale codes [BN, BK/bs], weight words
                   [BN, 8] x BK/64 and x [BM, 64] x BK/64 into shared memory; ready[s] counts the bytes
    consumer:      for each stage: scale codes -> bf16x2 scales, once per code into a shared-memory table
                   (`scale_smem`); for each 64-wide slice: decode the words into the wgmma A operand registers,
                   wgmma with x.T from shared memory; arrive empty[s]
    epilogue:      all warps: acc x (per-tensor factor) (+ bias) -> y; split K through a float32 workspace and a
                   ticket per tile (the last split sums the partials in split order: deterministic, one launch)

The fragment layout (`FRAG_OFFSETS`, `relayout_words`, built once per weight: a second copy of the packed
codes, kept on the prepared weight). A wgmma A fragment gives lane 4 g + tig of each warp rows g and g + 8 and,
in every 16-wide k chunk, k = 2 tig + {0, 1} and 2 tig + 8 + {0, 1}. The codes are re-laid offline so that the
two 32-bit words a thread loads per row and 64-wide slice (columns 2 tig + h) hold exactly its 16 codes, each
word as four bf16 pairs: nibble J and J + 4 are the pair (k, k + 1) with k = 32 h + 16 (J // 2) + 8 (J % 2) +
2 tig. Decoding is then element-wise in registers and the result already is the A operand (the layout
conversion is checked trivial at compile time, `assert_trivial`): no shared-memory round trip, which the first
version of this kernel paid on every slice.

The decode of one pair (bit-exact arithmetic, no float32):

    placement:  two shifts and masks put the E2M1 sign and magnitude bits into a bf16 pair: value x 2^-126
                (`_fp4_bits.e2m1_word_pair_bf16`; 0.5 lands on a bf16 subnormal, exactly)
    NVFP4:      one mul.rn.bf16x2 by (E4M3 scale x 2^117): = code x scale x 2^-9, exact (<= 2 and <= 4 significant
                bits) and normal; the output is multiplied once by (1 / global scale) x 2^9 (`pair_tables`)
    MXFP4:      x 2^(c - 1) in one multiply when every E8M0 code <= 128, else x 2^126 then x 2^(c - 127)

So MXFP4 weights are the twin's bit for bit, and NVFP4 weights are the exact products code x E4M3 scale (the twin
rounds code x s_eff to bf16 per weight; the difference is that rounding, bounded in tests/kernels/test_fp4_ws.py).
`WsDecode.FLOAT32` keeps the twin's NVFP4 weights bit for bit (float32 scale, natural packing, and the shared-
memory trip): slower, for checks.

The tiled copy (`tile_rows`, `WsConfig.tiled` and `wide`, built on the first call per tile height): the fragment
words and the scale codes re-laid tile by tile, so a stage's 16 KB of words and 2 KB of codes are each contiguous
and arrive in ONE TMA box of 128-byte rows (unswizzled shared memory) instead of four boxes of 128 32-byte rows
and one of 16-byte rows. With the scale table (each stage's codes converted once, by one thread each, instead of
per slice by the four lanes that share a row: ~95 instead of ~129 SASS per slice) gate_up at 16 tokens went from
31.6 to 27.0 us. Two other explanations were measured and ruled out first: a balanced persistent (stream-K) grid
was slower on every shape (`fp4_ws_h100_streamk_r1`), the contiguous copy read in the old narrow boxes no faster
(`fp4_ws_h100_tiled_r1`): the number of TMA row requests and the per-slice scale work were the limits.

With programmatic dependent launch (`fp4_gemm.PDL`, `WS_PDL_TRIGGER`) each program lets the next kernel launch
first thing, and the loader loads the first stages' weights and scales before `griddepcontrol.wait` (weights
never depend on an earlier kernel) and x after it.

Measured (H100, 2026-11-24, BENCHMARKS.md "Tiled copy in wide boxes and a shared-memory scale table"; GPU time
in a CUDA graph, weights rotated through 256 MB, cuBLAS bf16 in the same run): NVFP4 M = 16 mean of the
Llama-3-8B shapes 2.46x cuBLAS (2.18x without the tiled copy and the scale table; skinny kernel 1.39x), gate_up
27.0 us (3.05x, 83% of copy bandwidth), M = 32 2.00x, MXFP4 2.24x / 1.98x. The decode engine at batch 32:
4.55 ms per step (4.24 with the FP8 KV cache) against 6.78 with the skinny kernel (bf16: 7.51).
The history that led here: warp specialisation alone (float32 decode) was no faster than the skinny kernel; the
bf16x2 pair decode took gate_up from 56 to 46 us, the fragment layout to 36, one multiply per pair and PDL to 32;
in-kernel split K (instead of torch's sum and cast) took 2-3 us off each split layer (q/k/v, o, down); decoding
the next slice while the previous wgmma runs (`WS_MMA_OVERLAP`) 0-3 us more; the tiled copy in wide boxes and the
scale table 27.

Requirements: CUDA sm_90 (wgmma), Triton with Gluon (3.5+), bf16 x, 16-byte aligned rows; `fp4_ws_matmul`
raises otherwise and `ws_supported` says whether AUTO may take it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
from dataclasses import dataclass, field

import torch

from fp4kit.formats import MXFP4Config, NVFP4Config, QuantizedTensor

from .fp4_gemm import (
    PreparedFP4Weight,
    _bf16x2_e4m3_table,
    _bf16x2_pow2_table,
    _check_fp4,
    _raw_stream,
    _splitk_buffers,
    nv_post_factor,
    prepare_fp4_weight,
    use_pdl,
)


class WsDecode(enum.Enum):
    """How the consumer turns codes into the MMA's bf16 operand (the value is the kernel's MODE)."""
    FLOAT32 = 0  # natural packing, float32 scale, then a shared-memory trip into the wgmma layout: the twin's
    #              weights bit for bit (NVFP4; slower, for checks)
    FRAG = 4  # fragment layout: bf16 pairs decoded straight into the wgmma A registers (the default)


def _frag_offsets() -> tuple:
    # word 2 tig + h, nibble j < 4 (pair J = j): k = 32 h + 16 (J // 2) + 8 (J % 2) + 2 tig, nibble j + 4: k + 1.
    # Thread tig of a wgmma A fragment holds k = 2 tig + {0, 1} and 2 tig + 8 + {0, 1} of each 16-wide chunk.
    out = []
    for w in range(8):
        tig, h = w // 2, w % 2
        out.append(tuple(32 * h + 16 * (j % 4 // 2) + 8 * (j % 2) + 2 * tig + j // 4 for j in range(8)))
    return tuple(out)


FRAG_OFFSETS = _frag_offsets()  # [word][nibble] -> element of the 64-element slice


@dataclass(frozen=True)
class WsConfig:
    block_n: int = 64  # weight rows per program (64: one consumer warpgroup of 4 warps; 128: 8 warps)
    block_k: int = 256  # K per stage (multiple of 256: NVFP4's scale codes are >= 16 bytes per row for TMA;
    #                     MXFP4 needs 512; NVFP4 128 with the tiled copy in wide boxes, whose rows are 128 bytes)
    stages: int = 2  # shared-memory ring depth
    split_k: int = 1
    maxnreg: int = 80  # registers per thread before the partitions' reallocation (sets CTAs per SM)
    tiled: bool = False  # read a copy of the words and scale codes laid tile by tile (`tile_rows`): each stage's
    #                      bytes contiguous in memory instead of 32-byte (words) and 8-16-byte (codes) row pieces
    wide: bool = False  # with tiled: each stage's words and codes in one TMA box of 128-byte rows (unswizzled)
    scale_smem: bool = False  # fragment decode: convert each stage's scale codes to bf16x2 once, cooperatively,
    #                           into a shared-memory table (instead of per slice by every lane of a row)

    def __post_init__(self):
        if self.block_n not in (64, 128) or self.block_k % 128 or self.stages < 1 or self.split_k < 1:
            raise ValueError(f"WsConfig: unsupported {self}")


def ws_config(M: int, N: int, K: int, sm_count: int = 132, block_size: int = 16) -> WsConfig:
    """The H100 sweeps' choice for the fragment decode (benchmarks/bench_fp4_ws.py --sweep,
    results/fp4_ws_h100_frag_sweep.json, _r3_sweep, _r9_sweep; NVFP4 M = 16, 32, 64): wide layers (N >= 16384,
    gate_up) 128-row tiles, 2 stages, no split; the others 64-row tiles, 2 stages (4 stages lost up to 22% at
    M = 32-64: the bigger ring costs programs per SM) and K split for ~3 programs per SM (4 splits at N = 4096
    and 6144; 1, 2 and 8 splits were slower), except NVFP4 with long K (down, K = 14336) at M <= 32: 128-row
    tiles and 8 splits.
    MXFP4 (block 32): 512-wide stages (TMA's 16-byte rows of scale codes), 1 stage on wide layers and 2 on the
    others (results/fp4_ws_h100_frag_r1.json); long K (down) at 1-16 tokens 128-row tiles, 2 stages, 4 splits
    (results/fp4_ws_h100_mx_sweep1.json: the first MXFP4 sweep; gate_up's default was within 3% of its best),
    the short layers at 1-16 tokens one stage (fp4_ws_h100_mx_sweep2).
    Then (`_layout_switches`, results/fp4_ws_h100_wide_r1.json): the tiled copy read in wide boxes wherever the
    K steps divide among the splits, and the shared-memory scale table except on 128-row tiles at > 32 tokens.
    NVFP4 at 17-32 tokens (`MID_M_RING`; results/fp4_ws_h100_sweep_m32.json): every layer but gate_up takes
    64-row tiles, a 3-stage ring and the most K splits that fit one wave at 2 programs per SM (the ring's x
    stages double with the tokens); 2 stages and 3 programs per SM lost there by 0.2-1.5 us per layer. Output
    heads (N >= 65536) at 17-32 tokens: 128-wide stages, 6 deep (results/fp4_ws_h100_sweep_m32_wide.json)."""
    bk = 256 if block_size == 16 else 512
    if N >= 65536 and HEAD_RING and bk == 256 and 16 < M <= 32:  # output heads (128256 rows) at 17-32 tokens:
        # 128-wide stages, 6 deep (fp4_ws_h100_sweep_m32_wide, M = 32: 130.5 -> 121.9 us; gate_up kept its 29.6)
        return _layout_switches(WsConfig(block_n=128, block_k=128, stages=6, split_k=1), M, K)
    if N >= 16384:  # (96 registers at 64 tokens: gate_up 43.7 -> 52.4 us, MXFP4 46.3 -> 68.4; fp4_ws_h100_frag_r5_m64)
        return _layout_switches(WsConfig(block_n=128, block_k=bk, stages=2 if bk == 256 else 1, split_k=1), M, K)
    regs = 96 if M > 32 else 80  # a 64-token tile of 64 rows spilled at 80 (sm_90 offline compile); with 96
    #                               q/k/v 24.4 -> 23.2 us, down 27.2 -> 26.2 at M = 64 (fp4_ws_h100_frag_r5_m64)
    tiles = -(-N // 64)
    if MID_M_RING and bk == 256 and 16 < M <= 32:  # NVFP4 at 17-32 tokens: a 3-stage ring and as many K splits as
        # fill one wave at 2 programs per SM (the 3-stage ring's shared memory): q/k/v 2, o and down 4
        # (fp4_ws_h100_sweep_m32, M = 32: o 10.9 -> 10.0 us, down 21.3 -> 19.8, q/k/v 12.7 -> 12.5)
        want = max(1, (2 * sm_count) // tiles)
        split = min(1 << (want.bit_length() - 1), max(1, K // bk))
        return _layout_switches(WsConfig(block_n=64, block_k=bk, stages=3, split_k=split, maxnreg=regs), M, K)
    want = max(1, round(3 * sm_count / tiles))
    split = min(1 << (want.bit_length() - 1), max(1, K // bk))
    if K >= 8192 and M <= 16 and bk == 512:  # MXFP4, long K (down) at 1-16 tokens: 128-row tiles, 2 stages, the
        # 64-row rule's splits (fp4_ws_h100_mx_sweep1, M = 16: 19.1 -> 17.4 us, M = 1: 18.2 -> 15.7, GEMV 16.4)
        return _layout_switches(WsConfig(block_n=128, block_k=bk, stages=2, split_k=split), M, K)
    if K >= 8192 and M <= 32 and bk == 256:  # NVFP4, long K (down): 128-row tiles and twice the splits
        # (down M = 16: 23.6 -> 21.0 us, M = 32: 26.7 -> 24.4, fp4_ws_h100_frag_r9_sweep; MXFP4 with its 512-wide
        # stages lost: M = 32 19.9 -> 30.8 us, fp4_ws_h100_frag_r10_down)
        return _layout_switches(WsConfig(block_n=128, block_k=bk, stages=2, split_k=min(2 * split, max(1, K // bk))),
                                M, K)
    # MXFP4 at <= 16 tokens on the short layers (q/k/v, o): one 512-wide stage; a split holds only 2 K steps, and
    # the second stage cost programs per SM (fp4_ws_h100_mx_sweep2, M = 16: q/k/v 10.7 -> 9.7 us, o 8.9 -> 8.5)
    stages = 1 if bk == 512 and M <= 16 else 2
    return _layout_switches(WsConfig(block_n=64, block_k=bk, stages=stages, split_k=split, maxnreg=regs), M, K)


def check_stage_width(cfg: WsConfig, block_size: int) -> None:
    """TMA reads rows of >= 16 bytes: a stage's scale codes per weight row are block_k / block_size bytes, so
    NVFP4 needs block_k % 256 == 0 and MXFP4 % 512, except where the tiled copy in wide boxes reads the codes as
    128-byte rows: there NVFP4 may also take 128-wide stages (H100, `fp4_ws_h100_sweep_bk128`: equal at
    16 tokens, o 11.1 -> 10.4 us at 32; not a default)."""
    if cfg.block_k % 256 and not (cfg.block_k == 128 and cfg.tiled and cfg.wide and block_size == 16):
        raise ValueError(f"fp4_ws_matmul: block_k {cfg.block_k} needs the tiled copy in wide boxes (a 128-wide "
                         "stage has 8 bytes of NVFP4 scale codes per row, below TMA's 16-byte rows)")
    if block_size == 32 and cfg.block_k % 512:
        raise ValueError(f"fp4_ws_matmul: MXFP4 needs block_k % 512 == 0 (TMA reads >= 16 bytes of scale codes "
                         f"per row), got {cfg.block_k}")


def _layout_switches(cfg: WsConfig, M: int, K: int) -> WsConfig:
    """The tile-by-tile copy in wide boxes (fp4_ws_h100_wide_r1: never slower; gate_up 31.7 -> 30.7 us alone) where
    the K steps divide among the splits; the shared-memory scale table (with it: gate_up NVFP4 M = 16 27.5 us,
    down 18.8) except on 128-row tiles at > 32 tokens (gate_up M = 64: 40.7 -> 47-52 us)."""
    steps = K // cfg.block_k
    tiled = K % cfg.block_k == 0 and steps % cfg.split_k == 0
    return dataclasses.replace(cfg, tiled=tiled, wide=tiled, scale_smem=not (cfg.block_n == 128 and M > 32))


# Programmatic dependent launch: where a program lets the next kernel launch. 1: first thing (as the GEMV);
# 2: after its main loop. Either way the loader prefetches the first stages' weights before griddepcontrol.wait
# and loads x after it. 0: no PDL.
WS_PDL_TRIGGER = int(os.environ.get("FP4KIT_WS_PDL_TRIGGER", "1"))
# Decode the next 64-wide slice while the previous slice's wgmma runs (two A fragments live, wait(1) between
# slices, wait(0) before a stage is released) instead of waiting for each MMA.
WS_MMA_OVERLAP = os.environ.get("FP4KIT_WS_OVERLAP", "1") == "1"  # on: 0-3 us faster per GEMM (r8)

# NVFP4 at 17-32 tokens on the N < 16384 layers: 64-row tiles with a 3-stage ring, one wave of programs (`ws_config`);
# off: the 2-stage / 3-programs-per-SM rule of 16 tokens (and 128-row tiles for down). A switch for A/B runs.
MID_M_RING = True
HEAD_RING = True  # output heads (N >= 65536) at 17-32 tokens: 128-wide stages, 6 deep (`ws_config`)

# 1-2 rows: 1 on the shapes where this kernel beat the GEMV (`ws_beats_gemv`); 0 the GEMV takes 1-2 rows;
# 2 every shape (for A/B runs in the engine).
WS_SMALL_M = 1

# The range of rows `fp4_matmul`'s AUTO path sends here (with bf16 x on an sm_90 GPU; see `ws_supported`).
WS_MIN_M = 3
WS_MAX_M = 64


@functools.cache
def _sm90(device_index: int) -> bool:
    """wgmma is sm_90a only (Blackwell has its own MMA), and the kernel needs Gluon's Hopper modules."""
    if torch.cuda.get_device_capability(device_index) != (9, 0):
        return False
    try:
        from triton.experimental.gluon.language.nvidia import hopper  # noqa: F401
    except ImportError:
        return False
    return True


def ws_beats_gemv(M: int, N: int, K: int, block_size: int) -> bool:
    """At 1-2 rows, whether this kernel (its 16-row tile mostly empty) measured faster than the CUDA-core GEMV
    for the shape (results/fp4_ws_h100_m1.json, H100, GPU time in a CUDA graph, us GEMV -> WS):
    NVFP4, 1 row: the wide layers and long K (gate_up 29.6 -> 26.9, down 16.7 -> 15.8, the 128256-row head
    115.3 -> 106.5; q/k/v 8.5 vs 8.7 and o 7.1 vs 7.4 stay on the GEMV); 2 rows: every shape (q/k/v 9.9 -> 8.9,
    o 9.4 -> 8.2, gate_up 41.9 -> 27.0, down 24.7 -> 17.0, head 175 -> 106).
    MXFP4, 1 row: heads and long K (114.8 -> 109.8; down 16.4 -> 15.7 with its 128-row tiles, fp4_ws_h100_mx_sweep1;
    gate_up 29.1 vs 30.6 stays); 2 rows: the wide layers and long K (gate_up 41.6 -> 30.4, down 24.6 -> 18.5; q/k/v
    9.3 vs 10.5 stays, o 9.3 vs 8.5 too).
    WS_SMALL_M = 0: never (the GEMV takes 1-2 rows, as before); 2: always."""
    if not WS_SMALL_M or M > 2:
        return False
    if WS_SMALL_M == 2:
        return True
    wide, long_k = N >= 16384, K >= 8192
    if block_size == 16:
        return M == 2 or wide or long_k
    return (N >= 65536 or long_k) if M == 1 else (wide or long_k)


def ws_supported(x2: torch.Tensor, qt: QuantizedTensor, min_m: int = WS_MIN_M) -> bool:
    """Whether this call can run the warp-specialised kernel: bf16 x [M, K] on an sm_90 GPU with
    min_m <= M <= WS_MAX_M, 16-byte aligned, and NVFP4 (block 16, K % 256 == 0) or MXFP4 (block 32,
    K % 512 == 0). `fp4_matmul`'s AUTO asks for WS_MIN_M rows, or 1 where `ws_beats_gemv`."""
    if not (x2.is_cuda and x2.dtype == torch.bfloat16 and x2.dim() == 2 and min_m <= x2.shape[0] <= WS_MAX_M):
        return False
    cfg = qt.config
    if isinstance(cfg, NVFP4Config) and cfg.block_size == 16:
        need = 256
    elif isinstance(cfg, MXFP4Config) and cfg.block_size == 32:
        need = 512
    else:
        return False
    if qt.shape[1] % need or x2.data_ptr() % 16 or not x2.is_contiguous():
        return False
    return _sm90(x2.device.index if x2.device.index is not None else torch.cuda.current_device())


def relayout_words(qt: QuantizedTensor, offsets=FRAG_OFFSETS) -> torch.Tensor:
    """int32 [N, K/8]: the packed codes re-laid per 64-element slice so that nibble j of word w of the slice
    holds element offsets[w][j] (K % 64 == 0)."""
    N, K = qt.shape
    if K % 64:
        raise ValueError(f"relayout_words: in_features {K} is not a multiple of 64")
    data = qt.data.view(torch.uint8).reshape(N, K // 2)
    codes = torch.stack((data & 0xF, data >> 4), dim=-1).reshape(N, K // 64, 64)  # element 64 s + e
    idx = torch.tensor(offsets, dtype=torch.long, device=codes.device).reshape(64)
    new = codes[..., idx].reshape(N, K // 64, 8, 8).to(torch.int64)
    shifts = torch.arange(0, 32, 4, device=new.device, dtype=torch.int64)
    word = (new << shifts).sum(-1)
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32).reshape(N, K // 8).contiguous()


def unpack_words(words: torch.Tensor, offsets=FRAG_OFFSETS) -> torch.Tensor:
    """Inverse of `relayout_words` (tests): uint8 codes [N, K] in element order."""
    N = words.shape[0]
    w = words.to(torch.int64).reshape(N, -1, 8) & 0xFFFFFFFF
    nib = torch.stack([(w >> (4 * j)) & 0xF for j in range(8)], dim=-1).reshape(N, -1, 64)  # word w, nibble j
    out = torch.empty_like(nib)
    out[..., torch.tensor(offsets, dtype=torch.long, device=w.device).reshape(64)] = nib
    return out.reshape(N, -1).to(torch.uint8)


def tile_rows(t: torch.Tensor, block_n: int, chunk: int) -> torch.Tensor:
    """[N, C] -> [ceil(N / block_n) x C / chunk x block_n, chunk]: the rows of each block_n-row tile, chunk
    columns at a time, made contiguous (tile-major, then chunk, then row); N padded with zero rows. Row
    (tile x C / chunk + c) x block_n + r holds t[tile x block_n + r, c x chunk:(c + 1) x chunk]."""
    N, C = t.shape
    if C % chunk:
        raise ValueError(f"tile_rows: {C} columns are not a multiple of the chunk {chunk}")
    pad = -N % block_n
    if pad:
        t = torch.cat([t, t.new_zeros(pad, C)])
    tiles = (N + pad) // block_n
    return t.reshape(tiles, block_n, C // chunk, chunk).permute(0, 2, 1, 3).reshape(-1, chunk).contiguous()


def pair_tables(qt: QuantizedTensor, scale_codes: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """What the fragment decode multiplies by, per scale code: (int32 [256] bf16x2 scale, two multiplies per
    pair?, float32 [1] per-tensor output factor or None). The kernel computes these in registers; tests
    compare them with the formats' scales."""
    if isinstance(qt.config, MXFP4Config):
        table, one_mul = _bf16x2_pow2_table(scale_codes)
        return table, not one_mul, None
    post = nv_post_factor(qt.config, qt.global_scale.reshape(())).reshape(1)
    return _bf16x2_e4m3_table(scale_codes.device), False, post.contiguous()


@dataclass
class WsWeight:
    """What the kernel reads besides x: built once per weight by `prepare_ws`."""
    prepared: PreparedFP4Weight
    decode: WsDecode
    words: torch.Tensor  # int32 [N, K/8]: natural packing (FLOAT32) or the fragment layout (FRAG)
    table: torch.Tensor  # float32 (x 2^14) per scale code (FLOAT32), or the int32 bf16x2 table (FRAG: unused
    #                      by the kernel, which computes it in registers)
    two_mul: bool
    post: torch.Tensor | None
    tiled: dict = field(default_factory=dict)  # (block_n, block_k) -> (words, scale codes) by `tile_rows`


def tiled_copy(w: WsWeight, block_n: int, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The words and scale codes of `w` laid tile by tile for (block_n, block_k), built once and kept."""
    key = (block_n, block_k)
    got = w.tiled.get(key)
    if got is None:
        if w.words.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"fp4_ws_matmul: the tiled copy for block_n {block_n}, block_k {block_k} was not "
                               "built before CUDA graph capture; call it once eagerly first")
        bs = w.prepared.block_size
        got = w.tiled[key] = (tile_rows(w.words, block_n, 8), tile_rows(w.prepared.scale_codes, block_n, block_k // bs))
    return got


def prepare_ws(qt: QuantizedTensor, decode: WsDecode = WsDecode.FRAG,
               prepared: PreparedFP4Weight | None = None) -> WsWeight:
    """Re-lay one weight for `fp4_ws_matmul`. NVFP4 with every decode; MXFP4 with the fragment decode only."""
    _check_fp4(qt, "prepare_ws")
    decode = WsDecode(decode)
    nv = isinstance(qt.config, NVFP4Config) and qt.config.block_size == 16
    mx = isinstance(qt.config, MXFP4Config) and qt.config.block_size == 32
    if not (nv or (mx and decode is WsDecode.FRAG)):
        raise ValueError(f"prepare_ws: the warp-specialised kernel reads NVFP4 (block 16) with any decode and "
                         f"MXFP4 (block 32) with the fragment decode; got {type(qt.config).__name__} block "
                         f"{qt.config.block_size} with {decode.name}")
    if qt.shape[1] % 256:
        raise ValueError(f"prepare_ws: in_features {qt.shape[1]} is not a multiple of 256")
    prepared = prepared or prepare_fp4_weight(qt)
    if decode is WsDecode.FLOAT32:
        return WsWeight(prepared, decode, prepared.words, prepared.table, True, None)
    table, two_mul, post = pair_tables(qt, prepared.scale_codes)
    words = relayout_words(qt, FRAG_OFFSETS)
    return WsWeight(prepared, decode, words, table, two_mul, post)


def fp4_ws_matmul(x: torch.Tensor, w: WsWeight, bias: torch.Tensor | None = None, *,
                  config: WsConfig | None = None, out: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """y = x @ dequant(W).T (+ bias) with the warp-specialised kernel. x bf16 [M, K] (3 <= M <= 64 is the
    intended range; any M <= 64 works), contiguous, on a Hopper GPU.

    glu: W is a gate/up pair with its rows in groups of 8 (`fp4_glu.glu_order(N, group=8)`); the epilogue
    writes silu(gate) * up, y [M, N / 2] (no K split, no bias: `fp4_glu.gate_up_silu` checks)."""
    import triton
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from . import _fp4_ws

    prep = w.prepared
    N, K = prep.N, prep.K
    if x.dim() != 2 or x.shape[1] != K or x.dtype != torch.bfloat16 or not x.is_cuda or not x.is_contiguous():
        raise ValueError(f"fp4_ws_matmul: x must be a contiguous CUDA bf16 [M, {K}] tensor, got {tuple(x.shape)} "
                         f"{x.dtype} on {x.device}")
    M = x.shape[0]
    if M > 64 or K % 256:
        raise ValueError(f"fp4_ws_matmul: needs M <= 64 and K % 256 == 0 (M {M}, K {K})")
    bs = prep.block_size
    cfg = config or ws_config(M, N, K, block_size=bs)
    check_stage_width(cfg, bs)
    if glu and (cfg.split_k > 1 or bias is not None or N % 16):
        raise ValueError(f"fp4_ws_matmul(glu=True): needs one K split, no bias and N % 16 == 0 (split_k "
                         f"{cfg.split_k}, bias {bias is not None}, N {N})")
    block_m = max(16, triton.next_power_of_2(M))
    wl, xl, sl = _fp4_ws.layouts(cfg.block_n, block_m, cfg.block_k, bs)
    x_desc = TensorDescriptor.from_tensor(x, [block_m, 64], xl)
    words, codes = w.words, prep.scale_codes
    if cfg.tiled:
        steps = K // cfg.block_k
        if K % cfg.block_k or steps % cfg.split_k:
            raise ValueError(f"fp4_ws_matmul: the tiled layout needs K % block_k == 0 and the K steps ({K} / "
                             f"{cfg.block_k}) divisible by split_k {cfg.split_k}")
        words, codes = tiled_copy(w, cfg.block_n, cfg.block_k)
    if cfg.tiled and cfg.wide:
        from triton.experimental.gluon import language as gl

        nc = cfg.block_k // bs
        w_desc = TensorDescriptor.from_tensor(words.view(-1, 32), [cfg.block_k // 64 * cfg.block_n // 4, 32],
                                              gl.NVMMASharedLayout(0, 32))
        s_desc = TensorDescriptor.from_tensor(codes.view(-1, 128), [cfg.block_n * nc // 128, 128],
                                              gl.NVMMASharedLayout(0, 8))
    else:
        w_desc = TensorDescriptor.from_tensor(words, [cfg.block_n, 8], wl)
        s_desc = TensorDescriptor.from_tensor(codes, [cfg.block_n, cfg.block_k // bs], sl)
    y = out if out is not None else torch.empty(M, N // 2 if glu else N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, cfg.block_n), cfg.split_k)
    if cfg.split_k > 1:  # the skinny kernel's per-stream workspace and tickets (left zero by every launch)
        ws, cnt = _splitk_buffers(x.device, _raw_stream(x.device.index), cfg.split_k * M * N, grid[0])
    else:
        ws, cnt = y, y
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()
    post = w.post if w.post is not None else w.table
    pdl = WS_PDL_TRIGGER if use_pdl(x) else 0  # programmatic dependent launch (fp4_gemm.PDL), see WS_PDL_TRIGGER
    _fp4_ws.fp4_ws_kernel[grid](
        x_desc, w_desc, s_desc, w.table, post, y if bias is None else bias, y, ws, cnt, M, N, K=K,
        BLOCK_N=cfg.block_n, BLOCK_M=block_m, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, STAGES=cfg.stages,
        num_warps=cfg.block_n // 16, maxnreg=cfg.maxnreg, MODE=w.decode.value, TWO_MUL=w.two_mul,
        HAS_POST=w.post is not None, IS_NVFP4=bs == 16, HAS_BIAS=bias is not None, PDL=pdl, OVERLAP=WS_MMA_OVERLAP, TILED=(2 if cfg.wide else 1) if cfg.tiled else 0, SCALE_SMEM=cfg.scale_smem,
        GLU=glu, **({"launch_pdl": True} if pdl else {}))
    return y


def cached_ws(prepared: PreparedFP4Weight, key: tuple, build, what: str) -> WsWeight:
    """prepared.configs[key], built by `build()` on first use; never inside a CUDA graph capture (a clear error
    naming `what`: building copies the weight, which must happen eagerly)."""
    ws = prepared.configs.get(key)
    if ws is None:
        if prepared.qt.data.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{what} was not built before CUDA graph capture; call it once eagerly first")
        ws = prepared.configs[key] = build()
    return ws


def launch_ws(x2: torch.Tensor, prepared: PreparedFP4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`fp4_matmul`'s WS path: the fragment-layout copy of the weight is built on the first call and kept in
    the prepared weight's per-weight cache (like the GEMV's plane layout: a second copy of the packed codes)."""
    ws = cached_ws(prepared, ("ws", WsDecode.FRAG), lambda: prepare_ws(prepared.qt, WsDecode.FRAG, prepared),
                   "fp4_matmul(path=WS): this weight's fragment layout")
    return fp4_ws_matmul(x2, ws, bias)
