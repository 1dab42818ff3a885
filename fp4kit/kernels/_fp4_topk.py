"""Triton code for `fp4_topk`: index scores over a key cache, written as sortable int32 keys, and the rerank.

Read `fp4_topk.py` first: it holds the launchers, the torch twins (the specification) and the
layouts. Here the arithmetic follows the twins:

- FP4 keys: a [BLOCK_T, NB, BS/2] tile of packed bytes decodes to (low, high) E2M1 values times
  2^-14 (`e2m1_pair_to_f32`), each multiplied by the even / odd query elements and summed inside a
  scale block; the block sums are multiplied by the block scale times 2^14 and summed over blocks.
  For MXFP4 (power-of-two scales) with an FP4-dequantized query every product is exact and so is
  every partial sum while the block exponents of a vector span less than ~10 binades, so the
  float32 score equals the twin's float64 score rounded once: bit for bit, in any summation order.
- FP8 keys: float32(sum_d q_d k_d) times the key's float32 scale.
- bf16 keys: float32(sum_d q_d k_d).

The score is rounded to bf16, -0 is turned into +0, and written as the int32 sort key

    key = (m << 16) | (0xFFFF - (t & 0xFFFF)),   m = bf16 bits as int16, with m ^ 0x7FFF when m < 0

so a larger key is a larger score, and among equal scores the lower position t (within a chunk of
65,536 positions) wins. Keys of positions outside [lo, hi) are INT32_MIN.
"""

import triton
import triton.language as tl

from ._fp4_bits import e2m1_pair_to_f32, mxfp4_scale14, nvfp4_scale14

FMT_BF16 = 0
FMT_FP8 = 1
FMT_MXFP4 = 2
FMT_NVFP4 = 3
INT32_MIN = -2147483648


@triton.jit
def _fp4_tile_scores(q_ptr, k_ptr, s_ptr, gs_ptr, offs_t, valid, row, stride_kr, stride_kt, stride_sr, stride_st,
                     D: tl.constexpr, BS: tl.constexpr, IS_NVFP4: tl.constexpr, GS_ENCODE: tl.constexpr,
                     INTERPRET: tl.constexpr):
    NB: tl.constexpr = D // BS
    HB: tl.constexpr = BS // 2
    offs_b = tl.arange(0, NB)
    offs_j = tl.arange(0, HB)
    kp = (k_ptr + row * stride_kr + offs_t[:, None, None] * stride_kt + offs_b[None, :, None] * HB
          + offs_j[None, None, :])
    byte = tl.load(kp, mask=valid[:, None, None], other=0)  # [BLOCK_T, NB, HB] uint8
    lo, hi = e2m1_pair_to_f32(byte)
    qe = tl.load(q_ptr + offs_b[:, None] * BS + 2 * offs_j[None, :])  # [NB, HB] even elements
    qo = tl.load(q_ptr + offs_b[:, None] * BS + 2 * offs_j[None, :] + 1)
    part = tl.sum(lo * qe[None, :, :] + hi * qo[None, :, :], axis=2)  # [BLOCK_T, NB]
    code = tl.load(s_ptr + row * stride_sr + offs_t[:, None] * stride_st + offs_b[None, :], mask=valid[:, None],
                   other=0)
    if IS_NVFP4:
        scale14 = nvfp4_scale14(code, tl.load(gs_ptr), GS_ENCODE, INTERPRET)
    else:
        scale14 = mxfp4_scale14(code)
    scale14 = tl.where(valid[:, None], scale14, 0.0)
    return tl.sum(part * scale14, axis=1)


@triton.jit
def index_key_kernel(q_ptr, k_ptr, s_ptr, gs_ptr, out_ptr, lo, hi, n_out,
                     stride_qr, stride_kr, stride_kt, stride_sr, stride_st, stride_or,
                     D: tl.constexpr, FMT: tl.constexpr, BS: tl.constexpr, GS_ENCODE: tl.constexpr,
                     BLOCK_T: tl.constexpr, INTERPRET: tl.constexpr):
    """One program: BLOCK_T positions of one row. Writes int32 sort keys (INT32_MIN outside [lo, hi))."""
    row = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = (offs_t >= lo) & (offs_t < hi)
    q_row = q_ptr + row * stride_qr
    if FMT == 2:
        score = _fp4_tile_scores(q_row, k_ptr, s_ptr, gs_ptr, offs_t, valid, row, stride_kr, stride_kt, stride_sr,
                                 stride_st, D, BS, False, GS_ENCODE, INTERPRET)
    elif FMT == 3:
        score = _fp4_tile_scores(q_row, k_ptr, s_ptr, gs_ptr, offs_t, valid, row, stride_kr, stride_kt, stride_sr,
                                 stride_st, D, BS, True, GS_ENCODE, INTERPRET)
    else:
        offs_d = tl.arange(0, D)
        kp = k_ptr + row * stride_kr + offs_t[:, None] * stride_kt + offs_d[None, :]
        q = tl.load(q_row + offs_d)
        if FMT == 1:
            raw = tl.load(kp, mask=valid[:, None], other=0)  # uint8 view of float8_e4m3fn
            k = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            dot = tl.sum(k * q[None, :], axis=1)
            scale = tl.load(s_ptr + row * stride_sr + offs_t * stride_st, mask=valid, other=0.0)
            score = dot * scale
        else:
            k = tl.load(kp, mask=valid[:, None], other=0.0).to(tl.float32)
            score = tl.sum(k * q[None, :], axis=1)
    # round to bf16 (nearest, ties to even) on the integer bits: the interpreter's cast truncates
    b32 = score.to(tl.int32, bitcast=True)
    bits = (b32 + 0x7FFF + ((b32 >> 16) & 1)) >> 16  # arithmetic shift: the bf16 bits as a signed int16
    bits = tl.where(bits == -32768, 0, bits)  # -0 -> +0
    m = tl.where(bits < 0, bits ^ 0x7FFF, bits)
    key = (m << 16) | (0xFFFF - (offs_t & 0xFFFF))
    key = tl.where(valid, key, -2147483648)
    tl.store(out_ptr + row * stride_or + offs_t, key, mask=offs_t < n_out)


@triton.jit
def rerank_kernel(q_ptr, k_ptr, cand_ptr, out_ptr, n_cand, stride_qr, stride_kr, stride_kt, stride_cr, stride_or,
                  D: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: BLOCK_C candidates of one row. out = float32(q . k_bf16), -inf for padding (-1)."""
    row = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_range = offs_c < n_cand
    t = tl.load(cand_ptr + row * stride_cr + offs_c, mask=in_range, other=-1)
    ok = in_range & (t >= 0)
    offs_d = tl.arange(0, D)
    k = tl.load(k_ptr + row * stride_kr + t[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=ok[:, None],
                other=0.0).to(tl.float32)
    q = tl.load(q_ptr + row * stride_qr + offs_d)
    score = tl.sum(k * q[None, :], axis=1)
    tl.store(out_ptr + row * stride_or + offs_c, tl.where(ok, score, float("-inf")), mask=in_range)
