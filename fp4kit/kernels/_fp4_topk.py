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

The score is rounded to bf16, -0 is turned into +0, and written as the monotone int16

    m = bf16 bits as int16, with m ^ 0x7FFF when m < 0         (-32768 outside [lo, hi))

so a larger m is a larger score. Selection is a two-level radix select on u = m + 32768 (0..65535):
a 256-bin histogram of u's high byte (built by the scan kernel with atomics), the bin holding the
n-th best, a histogram of the low byte inside that bin, then u* (the n-th best score) and
need = n - #(u > u*). A counting pass and a writing pass (each tile adds up the counts of the tiles
before it) write every position with u > u* and the first `need` with u == u*, in ascending
position: ties go to the lower position, and nothing is sorted.
"""

import triton
import triton.language as tl

from ._fp4_bits import cast_rne, e2m1_pair_to_f32, e2m1_word_pair_bf16, mxfp4_scale14, nvfp4_scale14

FMT_BF16 = 0
FMT_FP8 = 1
FMT_MXFP4 = 2
FMT_NVFP4 = 3
FMT_MXFP4_TC = 4  # MXFP4 keys decoded to bf16 pairs, scored on the tensor cores
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
def index_score_kernel(q_ptr, k_ptr, s_ptr, gs_ptr, out_ptr, hist_ptr, lo, hi, n_out,
                       stride_qr, stride_kr, stride_kt, stride_sr, stride_st, stride_or,
                       D: tl.constexpr, FMT: tl.constexpr, BS: tl.constexpr, GS_ENCODE: tl.constexpr,
                       BLOCK_T: tl.constexpr, HIST: tl.constexpr, INTERPRET: tl.constexpr):
    """One program: BLOCK_T positions of one row. Writes the monotone int16 score m (-32768 outside
    [lo, hi)) and adds the tile's histogram of the high byte of u = m + 32768 to hist[row, 0:256]."""
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
    elif FMT == 4:
        score = _mxfp4_tc_scores(q_ptr, k_ptr, s_ptr, offs_t, valid, row, stride_qr, stride_kr, stride_kt,
                                 stride_sr, stride_st, D, BLOCK_T, INTERPRET)
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
    m = tl.where(valid, m, -32768)
    tl.store(out_ptr + row * stride_or + offs_t, m.to(tl.int16), mask=offs_t < n_out)
    if HIST:
        hist = tl.histogram((m + 32768) >> 8, 256, mask=valid)
        offs_h = tl.arange(0, 256)
        tl.atomic_add(hist_ptr + row * 512 + offs_h, hist, mask=hist > 0, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# MXFP4 keys on the tensor cores (FMT 4)
#
# The decode of `_fp4_tile_scores` spends ~7 integer/convert ops per element and leaves the FP4
# scan compute bound on Hopper. Here a 32-bit word of 8 codes becomes four bf16 pairs with two
# shifts and two masks per pair (the bf16 placement of `_fp4_gemm`: magnitude bits e1 e0 m at bits
# 8..6 and 24..22, sign at 15 and 31, so a pair holds two E2M1 values times 2^-126), two
# mul.rn.bf16x2 apply 2^126 and the block scale 2^(c - 127) (exact: powers of two), and the dot
# products run as tl.dot(keys [BLOCK_T, D] bf16, Q [D, 16] bf16) with float32 accumulation. Q's
# columns 0..2 hold q split into three bf16 parts (q0 = bf16(q), q1 = bf16(q - q0), q2 = bf16(q - q0 - q1)),
# so an arbitrary float32 q is represented to 24 bits, and an MXFP4-dequantized q (3-bit significands)
# lives entirely in column 0: every product and partial sum is then exact and the score equals the
# twin's bit for bit. The keys come out in "pair order" (position 8w + 2J + a holds element
# 8w + J + 4a); the launcher permutes q the same way, which leaves every dot product unchanged.
# Measured on the H100 (2026-11-22, 128K keys x 8 rows, D = 128): bit-exact, but 108 us against the
# FMA path's 72 us: the joins/reshape into the MMA layout and the 16-wide output cost more than the
# decode saves. Kept behind `fp4_topk.MXFP4_TENSOR_CORES` (off) for the next attempt.


@triton.jit
def _scaled_pair(h, scale2, INTERPRET: tl.constexpr):
    """bf16 pair (times 2^-126) * 2^126 * bf16x2 scale pair -> (low, high) bf16, exact (powers of two)."""
    if INTERPRET:
        lo = (h << 16).to(tl.float32, bitcast=True) * 8.507059173023462e37
        hi = (h & -65536).to(tl.float32, bitcast=True) * 8.507059173023462e37
        lo = lo * (scale2 << 16).to(tl.float32, bitcast=True)
        hi = hi * (scale2 & -65536).to(tl.float32, bitcast=True)
        return cast_rne(lo, tl.bfloat16, INTERPRET), cast_rne(hi, tl.bfloat16, INTERPRET)
    else:
        m = tl.inline_asm_elementwise(
            "{ .reg .b32 t, c; mov.b32 c, 0x7E807E80; mul.rn.bf16x2 t, $1, c; mul.rn.bf16x2 $0, t, $2; }",
            "=r,r,r", [h, scale2], dtype=tl.int32, is_pure=True, pack=1)
        lo = m.to(tl.int16).to(tl.bfloat16, bitcast=True)
        hi = (m >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return lo, hi


@triton.jit
def _mxfp4_tc_scores(q_ptr, w_ptr, s_ptr, offs_t, valid, row, stride_qr, stride_wr, stride_wt, stride_sr,
                     stride_st, D: tl.constexpr, BLOCK_T: tl.constexpr, INTERPRET: tl.constexpr):
    """Scores [BLOCK_T] float32 of MXFP4 keys (int32 words) against q parts [3, D] bf16 in pair order."""
    W: tl.constexpr = D // 8
    NB: tl.constexpr = D // 32
    offs_w = tl.arange(0, W)
    words = tl.load(w_ptr + row * stride_wr + offs_t[:, None] * stride_wt + offs_w[None, :], mask=valid[:, None],
                    other=0)  # [BLOCK_T, W] int32
    codes = tl.load(s_ptr + row * stride_sr + offs_t[:, None] * stride_st + tl.arange(0, NB)[None, :],
                    mask=valid[:, None], other=0).to(tl.int32)  # [BLOCK_T, NB]
    codes = tl.reshape(tl.broadcast_to(codes[:, :, None], (BLOCK_T, NB, 4)), (BLOCK_T, W))
    scale2 = (codes << 7) | (codes << 23)  # bf16x2 of 2^(c - 127)
    w0, w4 = _scaled_pair(e2m1_word_pair_bf16(words, 0), scale2, INTERPRET)
    w1, w5 = _scaled_pair(e2m1_word_pair_bf16(words, 1), scale2, INTERPRET)
    w2, w6 = _scaled_pair(e2m1_word_pair_bf16(words, 2), scale2, INTERPRET)
    w3, w7 = _scaled_pair(e2m1_word_pair_bf16(words, 3), scale2, INTERPRET)
    lo = tl.join(tl.join(w0, w2), tl.join(w1, w3))
    hi = tl.join(tl.join(w4, w6), tl.join(w5, w7))
    k = tl.reshape(tl.join(lo, hi), (BLOCK_T, D))  # pair order: position 8w + 2J + a holds 8w + J + 4a
    offs_d = tl.arange(0, D)
    cols = tl.arange(0, 16)
    qp = q_ptr + row * stride_qr + cols[None, :] * D + offs_d[:, None]
    qm = tl.load(qp, mask=(cols[None, :] < 3) & (offs_d[:, None] < D), other=0.0)  # [D, 16] bf16
    if INTERPRET:  # the interpreter's bf16 dot multiplies raw bits: float32 products (exact) instead
        acc = tl.dot(k.to(tl.float32), qm.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(k, qm)  # [BLOCK_T, 16] float32
    s0 = tl.sum(tl.where(cols[None, :] == 0, acc, 0.0), 1)
    s1 = tl.sum(tl.where(cols[None, :] == 1, acc, 0.0), 1)
    s2 = tl.sum(tl.where(cols[None, :] == 2, acc, 0.0), 1)
    return (s0 + s1) + s2


@triton.jit
def coarse_hist_kernel(m_ptr, hist_ptr, stride_mr, n_out, BLOCK: tl.constexpr):
    """The high-byte histogram from the written scores (when the scan kernel does not build it)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = tl.load(m_ptr + row * stride_mr + offs, mask=offs < n_out, other=-32768).to(tl.int32)
    h = tl.histogram((m + 32768) >> 8, 256, mask=(offs < n_out) & (m != -32768))
    tl.atomic_add(hist_ptr + row * 512 + tl.arange(0, 256), h, mask=h > 0, sem="relaxed")


@triton.jit
def _suffix_threshold(counts, above, n):
    """counts [256] per bin, `above` counted in higher bins already: the highest bin b with
    above + sum_{b' >= b} counts >= n, and the count strictly above b."""
    offs = tl.arange(0, 256)
    rev = tl.flip(counts, 0)  # rev[i] = counts[255 - i]
    c = tl.cumsum(rev, 0) + above
    i = tl.min(tl.where(c >= n, offs, 256), 0)
    at_i = tl.sum(tl.where(offs == i, c - rev, 0), 0)  # count strictly above bin 255 - i
    return 255 - i, at_i


@triton.jit
def coarse_threshold_kernel(hist_ptr, state_ptr, n):
    """Per row: the high-byte bin b1 holding the n-th best score; state[row] = (b1, count above b1)."""
    row = tl.program_id(0)
    h = tl.load(hist_ptr + row * 512 + tl.arange(0, 256))
    b1, above = _suffix_threshold(h, 0, n)
    tl.store(state_ptr + row * 4, b1)
    tl.store(state_ptr + row * 4 + 1, above)


@triton.jit
def fine_hist_kernel(m_ptr, hist_ptr, state_ptr, stride_mr, n_out, BLOCK: tl.constexpr):
    """Histogram of the low byte of u over the positions whose high byte is b1, into hist[row, 256:512]."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    u = tl.load(m_ptr + row * stride_mr + offs, mask=offs < n_out, other=-32768).to(tl.int32) + 32768
    b1 = tl.load(state_ptr + row * 4)
    sel = (offs < n_out) & ((u >> 8) == b1)
    h = tl.histogram(u & 255, 256, mask=sel)
    tl.atomic_add(hist_ptr + row * 512 + 256 + tl.arange(0, 256), h, mask=h > 0, sem="relaxed")


@triton.jit
def fine_threshold_kernel(hist_ptr, state_ptr, n):
    """Per row: u* (the n-th best score) and need = n - count(u > u*); state[row, 2:4]."""
    row = tl.program_id(0)
    h = tl.load(hist_ptr + row * 512 + 256 + tl.arange(0, 256))
    b1 = tl.load(state_ptr + row * 4)
    above = tl.load(state_ptr + row * 4 + 1)
    f, above_f = _suffix_threshold(h, above, n)
    tl.store(state_ptr + row * 4 + 2, b1 * 256 + f)
    tl.store(state_ptr + row * 4 + 3, n - above_f)


@triton.jit
def tile_count_kernel(m_ptr, state_ptr, cnt_ptr, stride_mr, stride_cr, n_out, BLOCK: tl.constexpr):
    """Per tile: how many positions score above u* (cnt[row, 0, tile]) and equal to it (cnt[row, 1, tile])."""
    row = tl.program_id(0)
    tile = tl.program_id(1)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    u = tl.load(m_ptr + row * stride_mr + offs, mask=offs < n_out, other=-32768).to(tl.int32) + 32768
    ustar = tl.load(state_ptr + row * 4 + 2)
    ok = offs < n_out
    tl.store(cnt_ptr + row * stride_cr + tile, tl.sum((ok & (u > ustar)).to(tl.int32), 0))
    tl.store(cnt_ptr + row * stride_cr + stride_cr // 2 + tile, tl.sum((ok & (u == ustar)).to(tl.int32), 0))


@triton.jit
def tile_write_kernel(m_ptr, state_ptr, cnt_ptr, out_ptr, stride_mr, stride_cr, stride_or, n_out, n_tiles,
                      BLOCK: tl.constexpr, TILES: tl.constexpr):
    """Write the selected positions in ascending order: all above u*, then the first `need` equal to it."""
    row = tl.program_id(0)
    tile = tl.program_id(1)
    offs_tiles = tl.arange(0, TILES)
    before = offs_tiles < tile
    gt_before = tl.sum(tl.load(cnt_ptr + row * stride_cr + offs_tiles, mask=before, other=0), 0)
    eq_before = tl.sum(tl.load(cnt_ptr + row * stride_cr + stride_cr // 2 + offs_tiles, mask=before, other=0), 0)
    ustar = tl.load(state_ptr + row * 4 + 2)
    need = tl.load(state_ptr + row * 4 + 3)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_out
    u = tl.load(m_ptr + row * stride_mr + offs, mask=ok, other=-32768).to(tl.int32) + 32768
    gt = (ok & (u > ustar)).to(tl.int32)
    eq = (ok & (u == ustar)).to(tl.int32)
    tie_rank = eq_before + tl.cumsum(eq, 0) - eq
    sel = gt | (eq & (tie_rank < need).to(tl.int32))
    slot = gt_before + tl.minimum(eq_before, need) + tl.cumsum(sel, 0) - sel
    tl.store(out_ptr + row * stride_or + slot, offs.to(tl.int64), mask=sel != 0)


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


@triton.jit
def select_kernel(score_ptr, cand_ptr, out_ptr, n_cand, k, stride_sr, stride_cr, stride_or, BLOCK: tl.constexpr):
    """One program per row: the k best of n_cand float32 scores (candidates in ascending position, so
    equal scores go to the earlier one), written in ascending position. A 32-step bitwise search finds
    the k-th best monotone key T; then all keys above T and the first (k - #above) equal to it."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < n_cand
    s = tl.load(score_ptr + row * stride_sr + offs, mask=ok, other=float("-inf"))
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)  # -0 -> +0
    key = tl.where(bits < 0, ~bits, bits ^ -2147483648).to(tl.uint32, bitcast=True)  # unsigned, monotone
    key = tl.where(ok, key, 0)
    t = tl.zeros([1], dtype=tl.uint32)
    for bit in tl.static_range(31, -1, -1):
        cand = t | tl.full([1], 1 << bit, tl.uint32)
        cnt = tl.sum((key[None, :] >= cand[:, None]).to(tl.int32), 1)
        t = tl.where(cnt >= k, cand, t)
    thr = tl.sum(t, 0)
    gt = (key > thr).to(tl.int32)
    eq = (key == thr).to(tl.int32)
    need = k - tl.sum(gt, 0)
    sel = gt | (eq & ((tl.cumsum(eq, 0) - eq) < need).to(tl.int32))
    slot = tl.cumsum(sel, 0) - sel
    pos = tl.load(cand_ptr + row * stride_cr + offs, mask=ok, other=0)
    tl.store(out_ptr + row * stride_or + slot, pos, mask=sel != 0)
