"""Triton code for `fp4_topk`: index scores over a key cache, written as sortable int32 keys, and the rerank.

Read `fp4_topk.py` first: it holds the launchers, the torch twins (the specification) and the
layouts. Here the arithmetic follows the twins:

- MXFP4 keys: int32 words, two nibbles at a time placed as a float16 pair (the "word" section
  below); NVFP4 keys: a [BLOCK_T, NB, BS/2] tile of packed bytes decodes to (low, high) E2M1 values
  times 2^-14 (`e2m1_pair_to_f32`). Each value is multiplied by its query element and summed inside
  a scale block; the block sums are multiplied by the block scale times 2^14 and summed over blocks.
  For MXFP4 (power-of-two scales) with an FP4-dequantized query every product is exact and so is
  every partial sum while the block exponents of a vector span less than ~10 binades, so the
  float32 score equals the twin's float64 score rounded once: bit for bit, in any summation order.
- FP8 keys: float32(sum_d q_d k_d) times the key's float32 scale.
- bf16 keys: float32(sum_d q_d k_d).

The score is rounded to bf16, -0 is turned into +0, and written as the monotone int16

    m = bf16 bits as int16, with m ^ 0x7FFF when m < 0         (-32768 outside [lo, hi))

so a larger m is a larger score. Selection is a two-level radix select on u = m + 32768 (0..65535):
a 256-bin histogram of u's high byte, the bin holding the n-th best, a histogram of the low byte
inside that bin, then u* (the n-th best score) and need = n - #(u > u*). Each tile counts its
positions above and equal to u*, and writes every position with u > u* and the first `need` with
u == u* at offsets summed from the tiles before it, in ascending position: ties go to the lower
position, and nothing is sorted. `fused_select_kernel` runs all of it in one launch (per-row
barriers); `fine_hist_kernel` / `tile_count_kernel` / `tile_write_kernel` are the unfused passes.
"""

import triton
import triton.language as tl

from ._fp4_bits import (
    cast_rne,
    e2m1_pair_to_f32,
    e2m1_word_pair_bf16,
    half_pair_to_f32,
    mxfp4_scale14,
    nvfp4_scale14,
)

FMT_BF16 = 0
FMT_FP8 = 1
FMT_MXFP4 = 2
FMT_NVFP4 = 3
FMT_MXFP4_TC = 4  # MXFP4 keys decoded to bf16 pairs, scored on the tensor cores
INT32_MIN = -2147483648
# the select's per-row int32 workspace (zeroed by one memset): [0:256] coarse histogram of u's high byte,
# [256:512] fine histogram of the low byte, [WS_BARRIER:+3] the fused kernel's two arrival counters and its
# departure counter, then
# one word per tile: PUBLISHED | #(u > u*) << 15 | #(u == u*) (tiles of at most 2^15 - 1 positions)
WS_BARRIER = tl.constexpr(512)
WS_TILES = tl.constexpr(516)
PUBLISHED = tl.constexpr(1 << 30)


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


# ----------------------------------------------------------------------------------------------
# MXFP4 keys read as int32 words (FMT 2)
#
# A key of D elements is D/8 int32 words; word w of block b (4 words per block of 32) holds
# elements 32b + 8w + i in nibble i (bits 4i..4i+3: magnitude e1 e0 m at 4i..4i+2, sign at 4i+3).
# Nibbles i and i + 4 sit exactly 16 bits apart, so ONE pair of shifts places both as the two
# halves of a float16 pair (the placement of `_fp4_bits`: sign to bit 15, e1 e0 m to bits 11..9,
# value = E2M1 value * 2^-14, exact, subnormal for 0.5):
#
#     h_i = ((w << (9 - 4i)) & 0x0E000E00) | ((w << (12 - 4i)) & 0x80008000)     i = 0..3
#
# 2 shifts + 2 logic ops per two elements (the old byte path paid ~7 integer/convert ops per
# element). Two ways to use the pairs:
#
# float32 (any query): cvt.f32.f16 per half (read straight from the pair's register), one FFMA
#   with q per element, float32 block sums times the block scale * 2^14.
#
# packed half2 (a query whose every 32-block is an MXFP4 vector, checked per program): the query
#   is re-scaled per block to x = q / 2^e (e = floor(log2 max|q_b|) - 2, so x is a multiple of 0.5
#   with |x| < 8) and stored as float16 pairs x * 2^10 matching h_i's elements. Then per word
#   one mul.rn.f16x2 and three fma.rn.f16x2 sum the 8 products in two float16 lanes, and one
#   cvt.f32.f16 per lane. Exact: every product is a multiple of 2^-6 (0.5 * 0.5 * 2^10 * 2^-14)
#   below 48 * 2^-4, a lane sums 4 of them (< 768 units of 2^-6 < 2^11), and float16 holds any
#   multiple of 2^-6 below 2^5 exactly (normal range, 11-bit significand). The block sum is then
#   multiplied by 2^(c - 113) * 2^(e - 10) in float32: the same score as the float32 path, bit
#   for bit, with ~3 instead of ~4.5 instructions per element. A query that is not MXFP4 (or whose
#   block exponent e is outside [-100, 100]) takes the float32 path: the check is a runtime branch,
#   uniform per program.
#
# integer dp4a (`fp4_topk.MXFP4_DP4A`, a query whose blocks are MXFP4 vectors, checked per program):
#   no float16 pairs at all. PRMT's byte select is a 16-entry lookup: with the table bytes
#   0x03020100 / 0x0C080604 (2 x the E2M1 magnitudes 0 0.5 1 1.5 2 3 4 6) and a word's low 16 bits as
#   the selector, nibble i picks byte (i & 7) of the table, and its bit 3 (the FP4 sign) asks for the
#   selected byte's sign bit replicated, which is 0: so PRMT gives the magnitudes of the POSITIVE
#   nibbles as four bytes. On the word with its sign bits flipped (one xor with 0x88888888) it gives
#   those of the negative ones. IDP4A multiplies four bytes with the query's integers
#   y = q * 2^(1 - e) (|y| < 16) and -y and accumulates in int32:
#       acc = dp4a(prmt(w), y[0..3]) + dp4a(prmt(w ^ 0x8888...), -y[0..3]) + (the same on w >> 16, y[4..7])
#   4 PRMT + 4 IDP4A + 1 LOP3 + 2 SHF per 8 elements. Exact: a block sum is an integer below
#   32 * 12 * 15 < 2^13; times 2^(c - 113) * 2^(e - 16) it is the float32 path's block sum bit for bit.
#   Measured on the H100 (2026-11-23): the scan's loop went from ~6 to ~3 instructions per element,
#   its time from 40.2 to 39.4 us at 128K x 8 keys (roofline 25.5): it is not issue-bound.


@triton.jit
def _e2m1_half_pair(words, I: tl.constexpr):
    """Nibbles I (low half) and I + 4 (high half) of int32 words as a float16 pair: E2M1 value * 2^-14."""
    if I == 0:
        h = ((words << 9) & 0x0E000E00) | ((words << 12) & -2147450880)  # 0x80008000 as int32
    elif I == 1:
        h = ((words << 5) & 0x0E000E00) | ((words << 8) & -2147450880)
    elif I == 2:
        h = ((words << 1) & 0x0E000E00) | ((words << 4) & -2147450880)
    else:
        h = ((words >> 3) & 0x0E000E00) | (words & -2147450880)
    return h


@triton.jit
def _hfma2_word(h0, h1, h2, h3, q0, q1, q2, q3, INTERPRET: tl.constexpr):
    """sum_i h_i * q_i over four float16 pairs in packed half2 arithmetic -> (low lane, high lane) float32.
    Exact in the domain the module comment states, so the interpreter's float32 emulation is identical."""
    if INTERPRET:
        a0, b0 = half_pair_to_f32(h0, True)
        a1, b1 = half_pair_to_f32(h1, True)
        a2, b2 = half_pair_to_f32(h2, True)
        a3, b3 = half_pair_to_f32(h3, True)
        c0, d0 = half_pair_to_f32(q0, True)
        c1, d1 = half_pair_to_f32(q1, True)
        c2, d2 = half_pair_to_f32(q2, True)
        c3, d3 = half_pair_to_f32(q3, True)
        return a0 * c0 + a1 * c1 + a2 * c2 + a3 * c3, b0 * d0 + b1 * d1 + b2 * d2 + b3 * d3
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 a; .reg .b16 x, y; mul.rn.f16x2 a, $2, $6; fma.rn.f16x2 a, $3, $7, a; "
            "fma.rn.f16x2 a, $4, $8, a; fma.rn.f16x2 a, $5, $9, a; mov.b32 {x, y}, a; "
            "cvt.f32.f16 $0, x; cvt.f32.f16 $1, y; }",
            "=f,=f,r,r,r,r,r,r,r,r", [h0, h1, h2, h3, q0, q1, q2, q3], dtype=(tl.float32, tl.float32),
            is_pure=True, pack=1)


@triton.jit
def _pow2(e):
    """2^e as float32 for int32 e in [-126, 127] (built from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _twice_int(y):
    """y (= 2x, |y| < 16 when the block is MXFP4) is an integer."""
    return y.to(tl.int32).to(tl.float32) == y


@triton.jit
def _half_bits(x):
    """float32 values exact in float16 -> their float16 bits in the low 16 bits of an int32."""
    return x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _f32_word_scores(h0, h1, h2, h3, ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3, scale14, INTERPRET: tl.constexpr):
    """float32 products: pairs h_i [NB, BLOCK_T, 4] against q's elements 32b + 8w + i (ql_i) and + 4 (qh_i)."""
    l0, u0 = half_pair_to_f32(h0, INTERPRET)
    l1, u1 = half_pair_to_f32(h1, INTERPRET)
    l2, u2 = half_pair_to_f32(h2, INTERPRET)
    l3, u3 = half_pair_to_f32(h3, INTERPRET)
    acc = l0 * ql0[:, None, :] + u0 * qh0[:, None, :]
    acc += l1 * ql1[:, None, :] + u1 * qh1[:, None, :]
    acc += l2 * ql2[:, None, :] + u2 * qh2[:, None, :]
    acc += l3 * ql3[:, None, :] + u3 * qh3[:, None, :]
    return tl.sum(tl.sum(acc, axis=2) * scale14, axis=0)


@triton.jit
def _query_words(q_row, D: tl.constexpr):
    """ql_i / qh_i [NB, 4] = q[32b + 8w + i] / q[32b + 8w + i + 4], i = 0..3 (the word layout)."""
    NB: tl.constexpr = D // 32
    offs_b = tl.arange(0, NB)
    offs_w = tl.arange(0, 4)
    qp = q_row + offs_b[:, None] * 32 + offs_w[None, :] * 8  # [NB, 4]: element 32b + 8w (+ i)
    return (tl.load(qp + 0), tl.load(qp + 1), tl.load(qp + 2), tl.load(qp + 3), tl.load(qp + 4), tl.load(qp + 5),
            tl.load(qp + 6), tl.load(qp + 7))


@triton.jit
def _pack_i8(a, b, c, d):
    """Four int32 in [-128, 127] as the bytes (low to high) of one int32."""
    return (a & 255) | ((b & 255) << 8) | ((c & 255) << 16) | ((d & 255) << 24)


@triton.jit
def _query_block_exponents(ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3):
    """Per 32-element block of the query words [NB, 4]: e = floor(log2 max|q_b|) - 2 (0 for an all-zero block or
    one out of range), ok = the block's exponent is in range, and up = 2^(1 - e) [NB, 1]: an MXFP4 block scaled
    by `up` holds integers (twice its E2M1 values)."""
    amax = tl.maximum(tl.maximum(tl.maximum(tl.abs(ql0), tl.abs(ql1)), tl.maximum(tl.abs(ql2), tl.abs(ql3))),
                      tl.maximum(tl.maximum(tl.abs(qh0), tl.abs(qh1)), tl.maximum(tl.abs(qh2), tl.abs(qh3))))
    amax = tl.max(amax, axis=1)  # [NB]
    field = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.where(amax == 0, 0, field - 129)  # floor(log2 amax) - 2 for normal amax
    ok = (amax == 0) | ((e >= -100) & (e <= 100))
    e = tl.where(ok, e, 0)
    return e, ok, _pow2(1 - e)[:, None]


@triton.jit
def _mxfp4_query_i8(q_row, D: tl.constexpr):
    """The dp4a query: per block e = floor(log2 max|q_b|) - 2 and the integers y = q * 2^(1 - e) (|y| < 16,
    integers exactly when the block is an MXFP4 vector: ex), packed four to a word as the key bytes come:
    qa = y[8w + 0..3], qb = y[8w + 4..7] and their negatives nqa, nqb [NB, 4]; sq = 2^(e - 16) [NB]."""
    ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3 = _query_words(q_row, D)
    e, ok, up = _query_block_exponents(ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3)
    y0, y1, y2, y3 = ql0 * up, ql1 * up, ql2 * up, ql3 * up
    y4, y5, y6, y7 = qh0 * up, qh1 * up, qh2 * up, qh3 * up
    good = ok[:, None] & _is_int(y0) & _is_int(y1) & _is_int(y2) & _is_int(y3)
    good = good & _is_int(y4) & _is_int(y5) & _is_int(y6) & _is_int(y7)
    ex = tl.min(tl.min(good.to(tl.int32), axis=1), axis=0)
    i0, i1, i2, i3 = y0.to(tl.int32), y1.to(tl.int32), y2.to(tl.int32), y3.to(tl.int32)
    i4, i5, i6, i7 = y4.to(tl.int32), y5.to(tl.int32), y6.to(tl.int32), y7.to(tl.int32)
    qa = _pack_i8(i0, i1, i2, i3)
    qb = _pack_i8(i4, i5, i6, i7)
    nqa = _pack_i8(-i0, -i1, -i2, -i3)
    nqb = _pack_i8(-i4, -i5, -i6, -i7)
    return ex, _pow2(e - 16), qa, qb, nqa, nqb


@triton.jit
def _is_int(y):
    """y is an integer with |y| < 16 (so it fits a signed byte and its products stay exact)."""
    return (y.to(tl.int32).to(tl.float32) == y) & (tl.abs(y) < 16)


@triton.jit
def _prmt_emul(sel):
    """The interpreter's `prmt.b32 d, 0x03020100, 0x0C080604, sel`: byte i = table[nibble i & 7] (2 x the E2M1
    magnitude: 0 1 2 3 4 6 8 12), or 0 when nibble i's bit 3 (the sign) is set (sign replication of a byte < 128)."""
    out = tl.zeros(sel.shape, tl.int32)
    for i in tl.static_range(4):
        nib = (sel >> (4 * i)) & 15
        j = nib & 7
        mag = tl.where(j < 2, j, (2 | (j & 1)) << tl.maximum((j >> 1) - 1, 0))
        out = out | (tl.where(nib >= 8, 0, mag) << (8 * i))
    return out


@triton.jit
def _dp4a_emul(a, b, c):
    """The interpreter's `dp4a.s32.s32`: c + sum over the 4 bytes of a_i * b_i, both as signed bytes."""
    for i in tl.static_range(4):
        c += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
    return c


@triton.jit
def _dp4a_word(words, qa, qb, nqa, nqb, INTERPRET: tl.constexpr):
    """int32 sum over a word's 8 elements of (2 x E2M1 key) * y: PRMT looks up the magnitudes of the positive
    nibbles (negative ones give 0) and, on the word with flipped signs, of the negative ones; four dp4a
    multiply them with y and -y. 4 PRMT + 4 IDP4A + 1 LOP3 + 2 SHF per 8 elements, exact in int32."""
    if INTERPRET:
        wf = words ^ -2004318072  # 0x88888888
        acc = _dp4a_emul(_prmt_emul(words), qa, tl.zeros(words.shape, tl.int32))
        acc = _dp4a_emul(_prmt_emul(wf), nqa, acc)
        acc = _dp4a_emul(_prmt_emul((words >> 16) & 0xFFFF), qb, acc)
        return _dp4a_emul(_prmt_emul((wf >> 16) & 0xFFFF), nqb, acc)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 ta, tb, wf, s, p, acc; mov.b32 ta, 0x03020100; mov.b32 tb, 0x0C080604; "
            "xor.b32 wf, $1, 0x88888888; "
            "prmt.b32 p, ta, tb, $1; dp4a.s32.s32 acc, p, $2, 0; "
            "prmt.b32 p, ta, tb, wf; dp4a.s32.s32 acc, p, $4, acc; "
            "shr.u32 s, $1, 16; prmt.b32 p, ta, tb, s; dp4a.s32.s32 acc, p, $3, acc; "
            "shr.u32 s, wf, 16; prmt.b32 p, ta, tb, s; dp4a.s32.s32 acc, p, $5, acc; mov.b32 $0, acc; }",
            "=r,r,r,r,r,r", [words, qa, qb, nqa, nqb], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _mxfp4_query(q_row, D: tl.constexpr, PACKED: tl.constexpr):
    """The query in the word layout, once per program: ql_i / qh_i [NB, 4] = q[32b + 8w + i] / q[... + 4];
    with PACKED 1, whether every block is MXFP4 (ex), the block exponents e [NB] and the float16 pairs
    p_i = (x_lo, x_hi) * 2^10 of x = q / 2^e (see the comment above); with PACKED 2 the dp4a words
    (`_mxfp4_query_i8`: p0..p3 = qa, qb, nqa, nqb) and no float32 query (its fallback reloads it)."""
    NB: tl.constexpr = D // 32
    if PACKED == 2:
        ex, sq, p0, p1, p2, p3 = _mxfp4_query_i8(q_row, D)
        ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    elif PACKED == 1:
        ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3 = _query_words(q_row, D)
        e, ok, up = _query_block_exponents(ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3)  # x * 2 must be an integer
        good = ok[:, None] & _twice_int(ql0 * up) & _twice_int(ql1 * up) & _twice_int(ql2 * up)
        good = good & _twice_int(ql3 * up) & _twice_int(qh0 * up) & _twice_int(qh1 * up) & _twice_int(qh2 * up)
        good = good & _twice_int(qh3 * up)
        ex = tl.min(tl.min(good.to(tl.int32), axis=1), axis=0)
        s10 = _pow2(10 - e)[:, None]
        p0 = _half_bits(ql0 * s10) | (_half_bits(qh0 * s10) << 16)  # [NB, 4] float16 pairs of x * 2^10
        p1 = _half_bits(ql1 * s10) | (_half_bits(qh1 * s10) << 16)
        p2 = _half_bits(ql2 * s10) | (_half_bits(qh2 * s10) << 16)
        p3 = _half_bits(ql3 * s10) | (_half_bits(qh3 * s10) << 16)
        sq = _pow2(e - 10)
    else:
        ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3 = _query_words(q_row, D)
        ex = tl.full([], 0, tl.int32)
        p0 = tl.zeros([NB, 4], tl.int32)
        p1 = p0
        p2 = p0
        p3 = p0
        sq = tl.zeros([NB], tl.float32)
    return ex, sq, ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3, p0, p1, p2, p3


@triton.jit
def _mxfp4_word_load(w_ptr, s_ptr, offs_t, valid, row, stride_wr, stride_wt, stride_sr, stride_st,
                     D: tl.constexpr):
    """The words [NB, BLOCK_T, 4] int32 and scale codes [NB, BLOCK_T] uint8 of a tile of MXFP4 keys (0 where
    not valid: those lanes issue no load)."""
    NB: tl.constexpr = D // 32
    offs_b = tl.arange(0, NB)
    offs_w = tl.arange(0, 4)
    # [NB, BLOCK_T, 4]: blocks outermost, so a thread's words all belong to one block and it needs only that
    # block's 32 query values (positions-outermost put a whole key, hence all of q, in each thread)
    words = tl.load(w_ptr + row * stride_wr + offs_b[:, None, None] * 4 + offs_t[None, :, None] * stride_wt
                    + offs_w[None, None, :], mask=valid[None, :, None], other=0)
    code = tl.load(s_ptr + row * stride_sr + offs_b[:, None] + offs_t[None, :] * stride_st, mask=valid[None, :],
                   other=0)
    return words, code


@triton.jit
def _mxfp4_word_tile(w_ptr, s_ptr, q_row, offs_t, valid, row, stride_wr, stride_wt, stride_sr, stride_st, ex, sq,
                     ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3, p0, p1, p2, p3,
                     D: tl.constexpr, PACKED: tl.constexpr, INTERPRET: tl.constexpr):
    """Scores [BLOCK_T] float32 of MXFP4 keys read as int32 words against the prepared query (`_mxfp4_query`)."""
    words, code = _mxfp4_word_load(w_ptr, s_ptr, offs_t, valid, row, stride_wr, stride_wt, stride_sr, stride_st, D)
    return _mxfp4_word_scores(words, code, q_row, valid, ex, sq, ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3,
                              p0, p1, p2, p3, D, PACKED, INTERPRET)


@triton.jit
def _mxfp4_word_scores(words, code, q_row, valid, ex, sq, ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3, p0, p1, p2, p3,
                       D: tl.constexpr, PACKED: tl.constexpr, INTERPRET: tl.constexpr):
    """Scores [BLOCK_T] float32 of a loaded tile of MXFP4 words (`_mxfp4_word_load`)."""
    scale14 = tl.where(valid[None, :], mxfp4_scale14(code), 0.0)  # [NB, BLOCK_T]
    if PACKED == 2:
        if ex == 1:  # uniform per program: integer products
            acc = _dp4a_word(words, p0[:, None, :], p1[:, None, :], p2[:, None, :], p3[:, None, :], INTERPRET)
            part = tl.sum(acc, axis=2).to(tl.float32)  # [NB, BLOCK_T] exact (|part| < 2^13)
            score = tl.sum(part * scale14 * sq[:, None], axis=0)
        else:  # not an MXFP4 query: float32 products, the query reloaded (not kept live through the loop)
            f0, f1, f2, f3, f4, f5, f6, f7 = _query_words(q_row, D)
            score = _f32_word_scores(_e2m1_half_pair(words, 0), _e2m1_half_pair(words, 1), _e2m1_half_pair(words, 2),
                                     _e2m1_half_pair(words, 3), f0, f1, f2, f3, f4, f5, f6, f7, scale14, INTERPRET)
        return score
    h0 = _e2m1_half_pair(words, 0)
    h1 = _e2m1_half_pair(words, 1)
    h2 = _e2m1_half_pair(words, 2)
    h3 = _e2m1_half_pair(words, 3)
    if PACKED == 1:
        if ex == 1:  # uniform per program
            lo, hi = _hfma2_word(h0, h1, h2, h3, p0[:, None, :], p1[:, None, :], p2[:, None, :], p3[:, None, :],
                                 INTERPRET)
            part = tl.sum(lo + hi, axis=2)  # [NB, BLOCK_T] exact
            score = tl.sum(part * scale14 * sq[:, None], axis=0)
        else:
            score = _f32_word_scores(h0, h1, h2, h3, ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3, scale14, INTERPRET)
    else:
        score = _f32_word_scores(h0, h1, h2, h3, ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3, scale14, INTERPRET)
    return score


@triton.jit
def index_score_kernel(q_ptr, k_ptr, s_ptr, gs_ptr, out_ptr, hist_ptr, mx_ptr, lo, hi, n_out,
                       stride_qr, stride_kr, stride_kt, stride_sr, stride_st, stride_or, stride_hr, stride_xr,
                       D: tl.constexpr, FMT: tl.constexpr, BS: tl.constexpr, GS_ENCODE: tl.constexpr,
                       BLOCK_T: tl.constexpr, ITERS: tl.constexpr, HIST: tl.constexpr, PACKED: tl.constexpr,
                       G: tl.constexpr, INTERPRET: tl.constexpr):
    """One program: ITERS tiles of BLOCK_T positions of one row (the query prepared once). Writes the
    monotone int16 score m (-32768 outside [lo, hi)); with HIST, adds each tile's histogram of the
    high byte of u = m + 32768 to hist[row, 0:256]; with G > 0, the maximum m of every G consecutive
    positions to mx[row, t // G] (the threshold select's lower bound, see below)."""
    row = tl.program_id(0)
    q_row = q_ptr + row * stride_qr
    if FMT == 2:
        ex, sq, ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3, p0, p1, p2, p3 = _mxfp4_query(q_row, D, PACKED)
    else:  # unused by the other formats
        ex, sq, ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3, p0, p1, p2, p3 = 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, \
            0.0, 0, 0, 0, 0
    for it in range(ITERS):
        offs_t = (tl.program_id(1) * ITERS + it) * BLOCK_T + tl.arange(0, BLOCK_T)
        m = _score_tile(q_ptr, k_ptr, s_ptr, gs_ptr, out_ptr, hist_ptr, lo, hi, n_out, stride_qr, stride_kr, stride_kt,
                    stride_sr, stride_st, stride_or, stride_hr, row, q_row, offs_t, ex, sq, ql0, ql1, ql2, ql3,
                    qh0, qh1, qh2, qh3, p0, p1, p2, p3, D, FMT, BS, GS_ENCODE, BLOCK_T, HIST, PACKED, INTERPRET)
        if G > 0:
            _store_maxima(mx_ptr + row * stride_xr, m, (tl.program_id(1) * ITERS + it) * BLOCK_T, BLOCK_T, G)


@triton.jit
def _store_maxima(mx_row, m, start, BLOCK_T: tl.constexpr, G: tl.constexpr):
    """mx[t // G] = max of m over the G positions of group t // G (groups inside this tile)."""
    if G == BLOCK_T:
        tl.store(mx_row + start // G, tl.max(m, 0).to(tl.int16))
    else:
        mg = tl.max(tl.reshape(m, (BLOCK_T // G, G)), 1)
        tl.store(mx_row + start // G + tl.arange(0, BLOCK_T // G), mg.to(tl.int16))


@triton.jit
def _score_tile(q_ptr, k_ptr, s_ptr, gs_ptr, out_ptr, hist_ptr, lo, hi, n_out, stride_qr, stride_kr, stride_kt,
                stride_sr, stride_st, stride_or, stride_hr, row, q_row, offs_t, ex, sq, ql0, ql1, ql2, ql3,
                qh0, qh1, qh2, qh3, p0, p1, p2, p3, D: tl.constexpr, FMT: tl.constexpr, BS: tl.constexpr,
                GS_ENCODE: tl.constexpr, BLOCK_T: tl.constexpr, HIST: tl.constexpr, PACKED: tl.constexpr,
                INTERPRET: tl.constexpr):
    valid = (offs_t >= lo) & (offs_t < hi)
    if FMT == 2:
        score = _mxfp4_word_tile(k_ptr, s_ptr, q_row, offs_t, valid, row, stride_kr, stride_kt, stride_sr, stride_st, ex, sq,
                                 ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3, p0, p1, p2, p3, D, PACKED, INTERPRET)
    elif FMT == 3:
        score = _fp4_tile_scores(q_row, k_ptr, s_ptr, gs_ptr, offs_t, valid, row, stride_kr, stride_kt, stride_sr,
                                 stride_st, D, BS, True, GS_ENCODE, INTERPRET)
    elif FMT == 4:
        score = _mxfp4_tc_scores(q_ptr, k_ptr, s_ptr, offs_t, valid, row, stride_qr, stride_kr, stride_kt,
                                 stride_sr, stride_st, D, BLOCK_T, INTERPRET)
    else:
        a, b = _dense_load(k_ptr, s_ptr, offs_t, valid, row, stride_kr, stride_kt, stride_sr, stride_st, D, FMT)
        score = _dense_scores(a, b, tl.load(q_row + tl.arange(0, D)), FMT)
    m = _finish_tile(score, valid, out_ptr, hist_ptr, row, offs_t, n_out, stride_or, stride_hr, HIST)
    return m


@triton.jit
def _dense_load(k_ptr, s_ptr, offs_t, valid, row, stride_kr, stride_kt, stride_sr, stride_st, D: tl.constexpr,
                FMT: tl.constexpr):
    """A tile of bf16 keys [BLOCK_T, D] (returned twice), or of FP8 keys as raw bytes and their float32 scales."""
    offs_d = tl.arange(0, D)
    kp = k_ptr + row * stride_kr + offs_t[:, None] * stride_kt + offs_d[None, :]
    if FMT == 1:
        raw = tl.load(kp, mask=valid[:, None], other=0)  # uint8 view of float8_e4m3fn
        scale = tl.load(s_ptr + row * stride_sr + offs_t * stride_st, mask=valid, other=0.0)
        return raw, scale
    else:
        k = tl.load(kp, mask=valid[:, None], other=0.0)
        return k, k


@triton.jit
def _dense_scores(a, b, q, FMT: tl.constexpr):
    """float32 scores [BLOCK_T] of a tile from `_dense_load` against q [D] float32."""
    if FMT == 1:
        k = a.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        return tl.sum(k * q[None, :], axis=1) * b
    else:
        return tl.sum(a.to(tl.float32) * q[None, :], axis=1)


@triton.jit
def _finish_tile(score, valid, out_ptr, hist_ptr, row, offs_t, n_out, stride_or, stride_hr, HIST: tl.constexpr):
    """Round the float32 scores to bf16, write them as the monotone int16 m (-32768 where not valid), add the
    high-byte histogram with HIST; returns m (int32)."""
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
        tl.atomic_add(hist_ptr + row * stride_hr + offs_h, hist, mask=hist > 0, sem="relaxed")
    return m


# ----------------------------------------------------------------------------------------------
# The persistent scan (bf16, FP8 and MXFP4 keys)
#
# `index_score_kernel` gives each program ITERS tiles and loads a tile only when it is about to
# score it, so a program's loads and its arithmetic alternate: while a tile's products run, that
# program has no bytes in flight, and every program pays the query preparation (for MXFP4 ~500
# instructions, a chain of dependent loads and reductions) before its first load. Here a grid of
# a few programs per SM walks the row's tiles with stride P (program p scores tiles p, p + P, ...)
# and loads tile t + P into registers BEFORE it scores tile t: the next tile's bytes are in flight
# during this tile's arithmetic, and the query is prepared once per program rather than once per
# ITERS tiles. Same arithmetic, same output as `index_score_kernel`, bit for bit.


@triton.jit
def index_scan_kernel(q_ptr, k_ptr, s_ptr, out_ptr, hist_ptr, mx_ptr, lo, hi, n_out, n_tiles,
                      stride_qr, stride_kr, stride_kt, stride_sr, stride_st, stride_or, stride_hr, stride_xr,
                      D: tl.constexpr, FMT: tl.constexpr, BLOCK_T: tl.constexpr, HIST: tl.constexpr,
                      PACKED: tl.constexpr, G: tl.constexpr, INTERPRET: tl.constexpr):
    """Program (row, p) of a (R, P) grid, P <= n_tiles: tiles p, p + P, ... < n_tiles of BLOCK_T positions,
    the next one's loads issued before this one is scored. Writes what `index_score_kernel` writes."""
    row = tl.program_id(0)
    p = tl.program_id(1)
    P = tl.num_programs(1)
    q_row = q_ptr + row * stride_qr
    # the first tile's loads go out before the query is prepared, so its latency hides behind that work
    offs_t = p * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = (offs_t >= lo) & (offs_t < hi)
    if FMT == 2:
        a, b = _mxfp4_word_load(k_ptr, s_ptr, offs_t, valid, row, stride_kr, stride_kt, stride_sr, stride_st, D)
        ex, sq, ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3, p0, p1, p2, p3 = _mxfp4_query(q_row, D, PACKED)
        qd = tl.zeros([D], tl.float32)
    else:
        a, b = _dense_load(k_ptr, s_ptr, offs_t, valid, row, stride_kr, stride_kt, stride_sr, stride_st, D, FMT)
        qd = tl.load(q_row + tl.arange(0, D))
        ex, sq, ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3, p0, p1, p2, p3 = 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, \
            0.0, 0, 0, 0, 0
    hist = tl.zeros([256], tl.int32)  # HIST: this program's high-byte histogram, added to the row's once at the end
    for t in range(p, n_tiles, P):
        offs_n = offs_t + P * BLOCK_T
        valid_n = (offs_n >= lo) & (offs_n < hi)  # all false past the last tile: no loads issued
        if FMT == 2:
            a_n, b_n = _mxfp4_word_load(k_ptr, s_ptr, offs_n, valid_n, row, stride_kr, stride_kt, stride_sr,
                                        stride_st, D)
            score = _mxfp4_word_scores(a, b, q_row, valid, ex, sq, ql0, ql1, ql2, ql3, qh0, qh1, qh2, qh3,
                                       p0, p1, p2, p3, D, PACKED, INTERPRET)
        else:
            a_n, b_n = _dense_load(k_ptr, s_ptr, offs_n, valid_n, row, stride_kr, stride_kt, stride_sr, stride_st,
                                   D, FMT)
            score = _dense_scores(a, b, qd, FMT)
        m = _finish_tile(score, valid, out_ptr, hist_ptr, row, offs_t, n_out, stride_or, stride_hr, False)
        if HIST:
            hist += tl.histogram((m + 32768) >> 8, 256, mask=valid)
        if G > 0:
            _store_maxima(mx_ptr + row * stride_xr, m, t * BLOCK_T, BLOCK_T, G)
        a, b, offs_t, valid = a_n, b_n, offs_n, valid_n
    if HIST:
        tl.atomic_add(hist_ptr + row * stride_hr + tl.arange(0, 256), hist, mask=hist > 0, sem="relaxed")


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
def coarse_hist_kernel(m_ptr, hist_ptr, stride_mr, stride_hr, n_out, BLOCK: tl.constexpr):
    """The high-byte histogram from the written scores (when the scan kernel does not build it)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = tl.load(m_ptr + row * stride_mr + offs, mask=offs < n_out, other=-32768).to(tl.int32)
    h = tl.histogram((m + 32768) >> 8, 256, mask=(offs < n_out) & (m != -32768))
    tl.atomic_add(hist_ptr + row * stride_hr + tl.arange(0, 256), h, mask=h > 0, sem="relaxed")


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
def _coarse_bin(ws, n):
    """(b1, #above b1): the high-byte bin holding the n-th best score, from the row's coarse histogram ws[0:256].
    Volatile loads: the histogram was built by other programs' atomics (never read through L1)."""
    h = tl.load(ws + tl.arange(0, 256), volatile=True)
    return _suffix_threshold(h, 0, n)


@triton.jit
def _threshold(ws, n):
    """(u*, need): the n-th best u and how many positions equal to it are taken (fine histogram at ws[256:512])."""
    b1, above = _coarse_bin(ws, n)
    return _fine_threshold(ws, b1, above, n)


@triton.jit
def _fine_threshold(ws, b1, above, n):
    """`_threshold` with the coarse bin b1 and the count above it already known."""
    h = tl.load(ws + 256 + tl.arange(0, 256), volatile=True)
    f, above_f = _suffix_threshold(h, above, n)
    return b1 * 256 + f, n - above_f


@triton.jit
def fine_hist_kernel(m_ptr, ws_ptr, stride_mr, stride_wr, n_out, n, BLOCK: tl.constexpr):
    """Histogram of the low byte of u over the positions whose high byte is b1, into ws[row, 256:512]
    (each program finds b1 from the coarse histogram itself: no separate threshold launch)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    u = tl.load(m_ptr + row * stride_mr + offs, mask=offs < n_out, other=-32768).to(tl.int32) + 32768
    ws = ws_ptr + row * stride_wr
    b1, _above = _coarse_bin(ws, n)
    sel = (offs < n_out) & ((u >> 8) == b1)
    h = tl.histogram(u & 255, 256, mask=sel)
    tl.atomic_add(ws + 256 + tl.arange(0, 256), h, mask=h > 0, sem="relaxed")


@triton.jit
def tile_count_kernel(m_ptr, ws_ptr, stride_mr, stride_wr, n_out, n, BLOCK: tl.constexpr):
    """Per tile: #(u > u*) and #(u == u*), packed as PUBLISHED | gt << 15 | eq into ws[row, 512 + tile]."""
    row = tl.program_id(0)
    tile = tl.program_id(1)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    u = tl.load(m_ptr + row * stride_mr + offs, mask=offs < n_out, other=-32768).to(tl.int32) + 32768
    ws = ws_ptr + row * stride_wr
    ustar, _need = _threshold(ws, n)
    ok = offs < n_out
    _publish(ws, tile, tl.sum((ok & (u > ustar)).to(tl.int32), 0), tl.sum((ok & (u == ustar)).to(tl.int32), 0))


@triton.jit
def _publish(ws, tile, gt, eq):
    tl.atomic_xchg(ws + WS_TILES + tile, PUBLISHED | (gt << 15) | eq, sem="release")


@triton.jit
def _write_selected(gt, eq, n_gt, n_eq, offs, out_row, tile, gt_eq, need, TILES: tl.constexpr):
    """Write the tile's selected positions in ascending order: all above u* (gt: 1 where), then the first
    `need` equal to it overall (eq: 1 where; n_gt / n_eq their counts in this tile). gt_eq: the packed
    counts of tiles 0..TILES-1 (only those before `tile` are used). Returns (first slot, positions written)."""
    before = tl.arange(0, TILES) < tile
    gt_before = tl.sum(tl.where(before, (gt_eq >> 15) & 0x7FFF, 0), 0)
    eq_before = tl.sum(tl.where(before, gt_eq & 0x7FFF, 0), 0)
    take = tl.minimum(tl.maximum(need - eq_before, 0), n_eq)  # this tile's ties taken: its first `take`
    if take == n_eq:  # all of them (the usual case): no rank among the ties needed
        sel = gt | eq
    else:
        sel = gt | (eq & ((tl.cumsum(eq, 0) - eq) < take).to(tl.int32))
    base = gt_before + tl.minimum(eq_before, need)
    slot = base + tl.cumsum(sel, 0) - sel
    tl.store(out_row + slot, offs.to(tl.int64), mask=sel != 0)
    return base, n_gt + take


@triton.jit
def tile_write_kernel(m_ptr, ws_ptr, out_ptr, stride_mr, stride_wr, stride_or, n_out, n,
                      BLOCK: tl.constexpr, TILES: tl.constexpr):
    """Write the selected positions (after `tile_count_kernel` published every tile's counts)."""
    row = tl.program_id(0)
    tile = tl.program_id(1)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_out
    u = tl.load(m_ptr + row * stride_mr + offs, mask=ok, other=-32768).to(tl.int32) + 32768
    ws = ws_ptr + row * stride_wr
    ustar, need = _threshold(ws, n)
    gt_eq = tl.load(ws + WS_TILES + tl.arange(0, TILES), mask=tl.arange(0, TILES) < tile, other=0)
    gt = (ok & (u > ustar)).to(tl.int32)
    eq = (ok & (u == ustar)).to(tl.int32)
    _write_selected(gt, eq, tl.sum(gt, 0), tl.sum(eq, 0), offs, out_ptr + row * stride_or, tile, gt_eq, need, TILES)


@triton.jit
def _row_barrier(counter, n_tiles, MAX_SPINS: tl.constexpr):
    """Arrive at the row's counter (release) and wait (acquire) until all n_tiles programs of the row have
    arrived. Needs every program of the grid resident at once (the launcher checks the occupancy); the
    spin is bounded so a broken assumption gives a wrong selection (caught by the checks), never a hang."""
    tl.atomic_add(counter, 1, sem="release")
    # spin on plain volatile loads (served by L2 without serialising like same-address atomics), then one
    # acquire atomic, which orders this program's later reads after every arrival it has seen
    v = tl.load(counter, volatile=True)
    i = tl.full([], 0, tl.int32)
    while (v < n_tiles) & (i < MAX_SPINS):
        v = tl.load(counter, volatile=True)
        i += 1
    tl.atomic_add(counter, 0, sem="acquire")


@triton.jit
def fused_select_kernel(m_ptr, ws_ptr, out_ptr, stride_mr, stride_wr, stride_or, n_out, n, n_tiles,
                        q_ptr, kb_ptr, sc_ptr, fin_ptr, k_fin, stride_qr, stride_kr, stride_kt, stride_sr, stride_fr,
                        BLOCK: tl.constexpr, TILES: tl.constexpr, COARSE: tl.constexpr, PHASE: tl.constexpr,
                        MAX_SPINS: tl.constexpr, RERANK: tl.constexpr = False, D: tl.constexpr = 16,
                        BLOCK_C: tl.constexpr = 16, SEL_BLOCK: tl.constexpr = 16, SEL_SORT: tl.constexpr = False):
    """The whole radix select in one launch: each program loads its BLOCK scores once and keeps them in
    registers through (coarse histogram ->) barrier -> fine histogram -> barrier -> counts -> wait for
    the tiles before it -> write. The barriers are per row (an arrival counter in the zeroed workspace).

    With RERANK (the two-stage selection in one launch): each program also scores the candidates it has
    just written against the exact bf16 keys kb [R, L, D] (float32 q . k, q: q_ptr [R, D]) into
    sc [R, n], and the row's last program to leave (its departure ticket is acq_rel, so every other
    program's candidates and scores are visible to it) keeps the k_fin best of the n (`_select_row`) in
    fin [R, k_fin]: the rerank's launch, and its re-read of the candidates, are gone.

    PHASE 0 runs everything (the GPU). The interpreter runs programs one after another, so a barrier
    would wait forever: there the launcher runs PHASE 1 (coarse), 2 (fine), 3 (counts), 4 (write) as
    four launches of the same code, which is what the barriers separate."""
    row = tl.program_id(0)
    tile = tl.program_id(1)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_out
    u = tl.load(m_ptr + row * stride_mr + offs, mask=ok, other=-32768).to(tl.int32) + 32768
    ws = ws_ptr + row * stride_wr
    offs_h = tl.arange(0, 256)
    if COARSE and (PHASE == 0 or PHASE == 1):
        h = tl.histogram(u >> 8, 256, mask=ok & (u != 0))
        tl.atomic_add(ws + offs_h, h, mask=h > 0, sem="relaxed")
        if PHASE == 0:
            _row_barrier(ws + WS_BARRIER, n_tiles, MAX_SPINS)
    if PHASE == 0 or PHASE == 2:
        b1, _above = _coarse_bin(ws, n)
        hf = tl.histogram(u & 255, 256, mask=ok & ((u >> 8) == b1))
        tl.atomic_add(ws + 256 + offs_h, hf, mask=hf > 0, sem="relaxed")
        if PHASE == 0:
            _row_barrier(ws + WS_BARRIER + 1, n_tiles, MAX_SPINS)
    if PHASE == 3 or PHASE == 4:  # separate launches (the interpreter): recompute what PHASE 0 carries over
        b1, _above = _coarse_bin(ws, n)
    if PHASE == 0 or PHASE >= 3:
        ustar, need = _fine_threshold(ws, b1, _above, n)
        gt = (ok & (u > ustar)).to(tl.int32)
        eq = (ok & (u == ustar)).to(tl.int32)
        n_gt = tl.sum(gt, 0)
        n_eq = tl.sum(eq, 0)
    if PHASE == 0 or PHASE == 3:
        _publish(ws, tile, n_gt, n_eq)
    if PHASE == 0 or PHASE == 4:
        offs_tiles = tl.arange(0, TILES)
        before = offs_tiles < tile
        gt_eq = tl.load(ws + WS_TILES + offs_tiles, mask=before, other=PUBLISHED, volatile=True)
        if PHASE == 0:  # wait until every tile before this one has published its counts
            i = tl.full([], 0, tl.int32)
            while (tl.min(gt_eq & PUBLISHED, 0) == 0) & (i < MAX_SPINS):
                gt_eq = tl.load(ws + WS_TILES + offs_tiles, mask=before, other=PUBLISHED, volatile=True)
                i += 1
        base, cnt = _write_selected(gt, eq, n_gt, n_eq, offs, out_ptr + row * stride_or, tile, gt_eq, need, TILES)
        if RERANK:
            tl.debug_barrier()  # this program's candidate stores are visible to all its threads
            _rerank_written(q_ptr + row * stride_qr, kb_ptr + row * stride_kr, out_ptr + row * stride_or,
                            sc_ptr + row * stride_sr, base, cnt, stride_kt, D, BLOCK_C)
        # the last program of the row to leave zeroes its workspace: the next launch on this stream finds it clean
        if tl.atomic_add(ws + WS_BARRIER + 2, 1, sem="acq_rel") == n_tiles - 1:
            if RERANK:
                if SEL_SORT:
                    _select_row_sorted(sc_ptr + row * stride_sr, out_ptr + row * stride_or, fin_ptr + row * stride_fr,
                                       n, k_fin, SEL_BLOCK)
                else:
                    _select_row(sc_ptr + row * stride_sr, out_ptr + row * stride_or, fin_ptr + row * stride_fr, n,
                                k_fin, SEL_BLOCK, False, False)
            tl.store(ws + tl.arange(0, 512), tl.zeros([512], tl.int32))
            tl.store(ws + WS_BARRIER + tl.arange(0, 4), tl.zeros([4], tl.int32))
            tl.store(ws + WS_TILES + tl.arange(0, TILES), tl.zeros([TILES], tl.int32))


@triton.jit
def _rerank_written(q_row, kb_row, cand_row, sc_row, base, cnt, stride_kt, D: tl.constexpr, BLOCK_C: tl.constexpr):
    """sc[i] = float32(q . kb[cand[i]]) for i in [base, base + cnt): the candidates this program wrote."""
    offs_d = tl.arange(0, D)
    q = tl.load(q_row + offs_d)
    for c0 in range(0, cnt, BLOCK_C):
        idx = base + c0 + tl.arange(0, BLOCK_C)
        okc = idx < base + cnt
        t = tl.load(cand_row + idx, mask=okc, other=0)
        kk = tl.load(kb_row + t[:, None] * stride_kt + offs_d[None, :], mask=okc[:, None], other=0.0).to(tl.float32)
        tl.store(sc_row + idx, tl.sum(kk * q[None, :], axis=1), mask=okc)


@triton.jit
def rerank_kernel(q_ptr, k_ptr, cand_ptr, out_ptr, n_cand, stride_qr, stride_kr, stride_kt, stride_cr, stride_or,
                  D: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program: BLOCK_C candidates of one row. out = float32(q . k_bf16), -inf for padding (-1)."""
    _rerank_scores(q_ptr, k_ptr, cand_ptr, out_ptr, n_cand, stride_qr, stride_kr, stride_kt, stride_cr, stride_or,
                   D, BLOCK_C)


@triton.jit
def _rerank_scores(q_ptr, k_ptr, cand_ptr, out_ptr, n_cand, stride_qr, stride_kr, stride_kt, stride_cr, stride_or,
                   D: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's BLOCK_C candidates of row program_id(0): out = float32(q . k_bf16), -inf for padding (-1)."""
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
def _select_row(score_row, cand_row, out_row, n_cand, k, BLOCK: tl.constexpr, BYTE_RADIX: tl.constexpr,
                DIGITS: tl.constexpr):
    """The k best of n_cand float32 scores of one row (candidates in ascending position, so equal scores go
    to the earlier one), written in ascending position. The k-th best monotone 32-bit key T is found by
    a 32-step bitwise search (count the keys >= each candidate prefix), or with BYTE_RADIX a byte at a
    time (four 256-bin histograms over the keys that share T's higher bytes, each followed by the suffix
    search of the radix select: measured slower on the H100 at 4096 candidates, 2026-11-23), or with
    DIGITS four bits at a time (8 steps of 16 prefixes counted at once, `_kth_largest`); then all keys
    above T and the first (k - #above) equal to it."""
    offs = tl.arange(0, BLOCK)
    ok = offs < n_cand
    s = tl.load(score_row + offs, mask=ok, other=float("-inf"), volatile=True)
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)  # -0 -> +0
    key = tl.where(bits < 0, ~bits, bits ^ -2147483648).to(tl.uint32, bitcast=True)  # unsigned, monotone
    if BYTE_RADIX:
        prefix = tl.full([], 0, tl.uint32)  # T's bytes found so far
        above = tl.full([], 0, tl.int32)  # keys above the current prefix group
        for step in tl.static_range(4):
            shift = 24 - 8 * step
            digit = ((key >> shift) & 255).to(tl.int32)
            if step == 0:
                same = ok
            else:
                same = ok & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            b, above = _suffix_threshold(tl.histogram(digit, 256, mask=same), above, k)
            prefix = prefix | (b.to(tl.uint32) << shift)
        key = tl.where(ok, key, 0)
    elif DIGITS:  # 8 steps of 16 candidate prefixes (`_kth_largest`)
        key = tl.where(ok, key, 0)
        prefix = _kth_largest(key, k, 32)
    else:
        key = tl.where(ok, key, 0)
        t = tl.zeros([1], dtype=tl.uint32)
        for bit in tl.static_range(31, -1, -1):
            cand = t | tl.full([1], 1 << bit, tl.uint32)
            cnt = tl.sum((key[None, :] >= cand[:, None]).to(tl.int32), 1)
            t = tl.where(cnt >= k, cand, t)
        prefix = tl.sum(t, 0)
    gt = (ok & (key > prefix)).to(tl.int32)
    eq = (ok & (key == prefix)).to(tl.int32)
    need = k - tl.sum(gt, 0)
    sel = gt | (eq & ((tl.cumsum(eq, 0) - eq) < need).to(tl.int32))
    slot = tl.cumsum(sel, 0) - sel
    pos = tl.load(cand_row + offs, mask=ok, other=0)
    tl.store(out_row + slot, pos, mask=sel != 0)


@triton.jit
def _select_row_sorted(score_row, cand_row, out_row, n_cand, k, BLOCK: tl.constexpr):
    """`_select_row` by one sort instead of a 32-step search: each candidate i gets the unique int64 key
    (signed monotone float32 bits << 32) | (BLOCK - 1 - i), so a descending sort puts the higher score first and, among
    equal scores, the earlier candidate (the lower position) first; the k-th key K is the threshold, and the
    selection is every candidate whose key is >= K (no ties left to break), written in ascending position."""
    offs = tl.arange(0, BLOCK)
    ok = offs < n_cand
    s = tl.load(score_row + offs, mask=ok, other=float("-inf"), volatile=True)
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)  # -0 -> +0
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # signed and monotone in the score
    comp = tl.where(ok, (key << 32) | (BLOCK - 1 - offs).to(tl.int64), -9223372036854775808)
    kth = tl.sum(tl.where(offs == k - 1, tl.sort(comp, descending=True), 0), 0)
    sel = (ok & (comp >= kth)).to(tl.int32)
    slot = tl.cumsum(sel, 0) - sel
    pos = tl.load(cand_row + offs, mask=ok, other=0)
    tl.store(out_row + slot, pos, mask=sel != 0)


@triton.jit
def select_kernel(score_ptr, cand_ptr, out_ptr, n_cand, k, stride_sr, stride_cr, stride_or, BLOCK: tl.constexpr,
                  BYTE_RADIX: tl.constexpr, DIGITS: tl.constexpr):
    """One program per row: `_select_row`."""
    row = tl.program_id(0)
    _select_row(score_ptr + row * stride_sr, cand_ptr + row * stride_cr, out_ptr + row * stride_or, n_cand, k, BLOCK,
                BYTE_RADIX, DIGITS)


@triton.jit
def rerank_select_kernel(q_ptr, k_ptr, cand_ptr, score_ptr, out_ptr, ticket_ptr, n_cand, k, stride_qr, stride_kr,
                         stride_kt, stride_cr, stride_sr, stride_or, D: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK: tl.constexpr, BYTE_RADIX: tl.constexpr, DIGITS: tl.constexpr):
    """The rerank in one launch: each program scores BLOCK_C candidates (as `rerank_kernel`) and takes a
    ticket; the row's last program (every score written: the ticket is acq_rel) selects the k best
    (`_select_row`) and resets the ticket to 0 for the next launch on this stream."""
    row = tl.program_id(0)
    _rerank_scores(q_ptr, k_ptr, cand_ptr, score_ptr, n_cand, stride_qr, stride_kr, stride_kt, stride_cr, stride_sr,
                   D, BLOCK_C)
    if tl.atomic_add(ticket_ptr + row, 1, sem="acq_rel") == tl.num_programs(1) - 1:
        tl.store(ticket_ptr + row, 0)
        _select_row(score_ptr + row * stride_sr, cand_ptr + row * stride_cr, out_ptr + row * stride_or, n_cand, k,
                    BLOCK, BYTE_RADIX, DIGITS)


# ----------------------------------------------------------------------------------------------
# the threshold select (`fp4_topk.SelectMethod.THRESHOLD`)
#
# No histograms. The scan also writes mx[g] = max of m over each group of G consecutive positions
# (M = n_out / G >= 2n groups). Let T be the n-th largest group maximum: n groups hold a score >= T,
# so at least n positions do, so T <= u* (the n-th best score) and every selected position has
# u >= T. For scores that do not cluster by position, #(u >= T) is about 1.4 n at M = 2n (the
# chance that a group's maximum passes T is n/M = 1/2, so a score passes with p ~ ln 2 / G).
#   1. `maxima_threshold_kernel` (one program per row): T by a 4-bit digit search over the M maxima.
#   2. `compact_select_kernel` (many programs per row): each counts its positions with u >= T,
#      publishes the count, adds the counts of the tiles before it (a look-back: tile ids are taken
#      from a per-row atomic counter, so a tile only waits on tiles that have started), and writes
#      those positions and their u, in ascending position, into a per-row candidate buffer. The
#      row's last program to leave takes the exact n best of the c candidates (digit search for u*,
#      then all above and the first `need` ties, which the ascending order makes the lowest
#      positions), writes them ascending, and zeroes the workspace for the next launch.
# If c exceeds the buffer (scores that cluster: many groups above T), the last program selects from
# all the row's scores instead, in chunks: exact, slow (tens of us), never wrong.
#
# The digit search finds the largest t with #(u >= t) >= n four bits at a time: 16 candidate
# prefixes per step counted at once (a [16, BLOCK] compare and one reduction), 4 steps for 16-bit u,
# 8 for the rerank's 32-bit float keys (the bitwise search needs 16 / 32 serial reductions).

WS_T = tl.constexpr(0)  # threshold-select workspace: [0] T, [1] departures, [2] tile-id counter, [4:] tile counts
WS_TICKET = tl.constexpr(1)
WS_TILE_ID = tl.constexpr(2)
WS_COUNTS = tl.constexpr(4)


@triton.jit
def _digit_step(cnt, t, shift, n):
    """cnt[j] = #(u >= t + j << shift), j = 0..15 (cnt[0] >= n): the new prefix t."""
    d = tl.arange(0, 16)
    j = tl.max(tl.where(cnt >= n, d, 0), 0)
    return t + (j << shift)


@triton.jit
def _count_above(u, t, shift):
    """[16] counts of u (1-D, int32 or uint32) >= t + j << shift."""
    d = tl.arange(0, 16).to(u.dtype)
    thr = t + (d << shift)
    return tl.sum((u[None, :] >= thr[:, None]).to(tl.int32), 1)


@triton.jit
def _kth_largest(u, n, BITS: tl.constexpr, STEP: tl.constexpr = 4):
    """The largest t with #(u >= t) >= n (u: 1-D int32 >= 0 or uint32, BITS wide; n <= #(u >= 0)): STEP 4,
    16 prefixes counted per step; STEP 1 (int32 u only), one prefix per step (BITS serial reductions)."""
    t = tl.zeros([], u.dtype)
    if STEP == 1:
        for s in tl.static_range(BITS):
            cand = t + (1 << (BITS - 1 - s))
            t = tl.where(tl.sum((u >= cand).to(tl.int32), 0) >= n, cand, t)
    else:
        for s in tl.static_range(BITS // 4):
            shift = BITS - 4 * (s + 1)
            t = _digit_step(_count_above(u, t, shift), t, shift, n).to(u.dtype)
    return t


@triton.jit
def _load_u(src, idx, count, FROM_M: tl.constexpr):
    """u = m + 32768 of entries idx < count (0 past count): from the int16 scores (FROM_M) or the int32
    candidate buffer.

    Past `count` u is set by a `where`, not by the load's `other`: a masked int16 load with other=-32768
    returned -1 in half of its masked lanes on the H100 (Triton 3.6, vectorised int16 loads; exact in the
    interpreter; benchmarks/probe_threshold_overflow.py, part 3), so those lanes counted as u = 32767 in
    the k-th search and the overflow tier wrote nothing for rows whose tied score was below that. The
    other int16 score loads of this file are safe: their consumers mask with the same bound. The scores
    come from an earlier launch, so their load needs no `volatile`; the candidates, written by other
    programs of this launch, do."""
    ok = idx < count
    if FROM_M:
        m = tl.load(src + idx, mask=ok, other=0)
        u = tl.where(ok, m.to(tl.int32) + 32768, 0)
    else:
        u = tl.load(src + idx, mask=ok, other=0, volatile=True)
    return u


@triton.jit
def _kth_chunked(src, count, n, FROM_M: tl.constexpr, CH: tl.constexpr, STEP: tl.constexpr):
    """`_kth_largest` (16-bit u) over `count` entries read CH at a time (each step re-reads them)."""
    t = tl.zeros([], tl.int32)
    if STEP == 1:
        for s in tl.static_range(16):
            cand = t + (1 << (15 - s))
            cnt = tl.zeros([], tl.int32)
            for start in range(0, count, CH):
                cnt += tl.sum((_load_u(src, start + tl.arange(0, CH), count, FROM_M) >= cand).to(tl.int32), 0)
            t = tl.where(cnt >= n, cand, t)
    else:
        for s in tl.static_range(4):
            shift = 12 - 4 * s
            cnt = tl.zeros([16], tl.int32)
            for start in range(0, count, CH):
                cnt += _count_above(_load_u(src, start + tl.arange(0, CH), count, FROM_M), t, shift)
            t = _digit_step(cnt, t, shift, n)
    return t


@triton.jit
def _write_best(u, pos, ok, ustar, need, eq_before, sel_before, out_row):
    """Write the positions with u > u* and the ties whose rank (eq_before + rank here) < need at
    slots sel_before + rank; returns the updated (eq_before, sel_before)."""
    gt = (ok & (u > ustar)).to(tl.int32)
    eq = (ok & (u == ustar)).to(tl.int32)
    sel = gt | (eq & ((eq_before + tl.cumsum(eq, 0) - eq) < need).to(tl.int32))
    slot = sel_before + tl.cumsum(sel, 0) - sel
    tl.store(out_row + slot, pos.to(tl.int64), mask=sel != 0)
    return eq_before + tl.sum(eq, 0), sel_before + tl.sum(sel, 0)


@triton.jit
def _select_chunked(src, pos_src, count, n, out_row, FROM_M: tl.constexpr, CH: tl.constexpr, STEP: tl.constexpr):
    """The n best of `count` entries (in ascending position) read CH at a time: u*, #(u > u*), the writes."""
    ustar = _kth_chunked(src, count, n, FROM_M, CH, STEP)
    gt = tl.zeros([], tl.int32)
    for start in range(0, count, CH):
        gt += tl.sum((_load_u(src, start + tl.arange(0, CH), count, FROM_M) > ustar).to(tl.int32), 0)
    eq_before = tl.zeros([], tl.int32)
    sel_before = tl.zeros([], tl.int32)
    for start in range(0, count, CH):
        idx = start + tl.arange(0, CH)
        u = _load_u(src, idx, count, FROM_M)
        if FROM_M:
            pos = idx
        else:
            pos = tl.load(pos_src + idx, mask=idx < count, other=0, volatile=True)
        eq_before, sel_before = _write_best(u, pos, idx < count, ustar, n - gt, eq_before, sel_before, out_row)


@triton.jit
def maxima_threshold_kernel(mx_ptr, ws_ptr, M, n, stride_xr, stride_wr, BLOCK: tl.constexpr,
                            CHUNKED: tl.constexpr, STEP: tl.constexpr):
    """One program per row: T = the n-th largest of the M group maxima (as u = m + 32768) into ws[row, 0]."""
    row = tl.program_id(0)
    src = mx_ptr + row * stride_xr
    if CHUNKED:
        t = _kth_chunked(src, M, n, True, BLOCK, STEP)
    else:
        t = _kth_largest(_load_u(src, tl.arange(0, BLOCK), M, True), n, 16, STEP)
    tl.store(ws_ptr + row * stride_wr + WS_T, t)


@triton.jit
def compact_select_kernel(m_ptr, ws_ptr, cu_ptr, cp_ptr, out_ptr, stride_mr, stride_wr, stride_cr, stride_or, n_out,
                          n, n_tiles, cap, BLOCK: tl.constexpr, TILES: tl.constexpr, FB: tl.constexpr,
                          CH: tl.constexpr, STEP: tl.constexpr, PHASE: tl.constexpr, MAX_SPINS: tl.constexpr):
    """Compaction of the positions with u >= T (ws[row, 0]) and, in the row's last program, the exact
    n best of them (see the section comment). PHASE 0 on the GPU; the interpreter runs PHASE 1 (counts)
    then PHASE 2 (the rest) as two launches, tile = program id."""
    row = tl.program_id(0)
    ws = ws_ptr + row * stride_wr
    if PHASE == 0:  # tiles in the order programs start, so a tile never waits on one that is not running
        tile = tl.atomic_add(ws + WS_TILE_ID, 1, sem="relaxed")
    else:
        tile = tl.program_id(1)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_out
    u = tl.load(m_ptr + row * stride_mr + offs, mask=ok, other=-32768).to(tl.int32) + 32768
    thr = tl.maximum(tl.load(ws + WS_T, volatile=True), 1)  # u = 0: outside [lo, hi)
    cand = (ok & (u >= thr)).to(tl.int32)
    if PHASE == 0 or PHASE == 1:
        tl.atomic_xchg(ws + WS_COUNTS + tile, PUBLISHED | tl.sum(cand, 0), sem="release")
    if PHASE == 0 or PHASE == 2:
        offs_tiles = tl.arange(0, TILES)
        before = offs_tiles < tile
        words = tl.load(ws + WS_COUNTS + offs_tiles, mask=before, other=PUBLISHED, volatile=True)
        if PHASE == 0:
            i = tl.full([], 0, tl.int32)
            while (tl.min(words & PUBLISHED, 0) == 0) & (i < MAX_SPINS):
                words = tl.load(ws + WS_COUNTS + offs_tiles, mask=before, other=PUBLISHED, volatile=True)
                i += 1
        slot = tl.sum(tl.where(before, words & (PUBLISHED - 1), 0), 0) + tl.cumsum(cand, 0) - cand
        keep = (cand != 0) & (slot < cap)
        tl.store(cu_ptr + row * stride_cr + slot, u, mask=keep)
        tl.store(cp_ptr + row * stride_cr + slot, offs, mask=keep)
        if tl.atomic_add(ws + WS_TICKET, 1, sem="acq_rel") == n_tiles - 1:  # every tile has written
            words = tl.load(ws + WS_COUNTS + offs_tiles, mask=offs_tiles < n_tiles, other=0, volatile=True)
            c = tl.sum(words & (PUBLISHED - 1), 0)
            out_row = out_ptr + row * stride_or
            cu_row = cu_ptr + row * stride_cr
            cp_row = cp_ptr + row * stride_cr
            if c <= FB:  # the usual case: the candidates in registers
                idx = tl.arange(0, FB)
                uc = _load_u(cu_row, idx, c, False)
                ustar = _kth_largest(uc, n, 16, STEP)
                need = n - tl.sum((uc > ustar).to(tl.int32), 0)
                pos = tl.load(cp_row + idx, mask=idx < c, other=0, volatile=True)
                _write_best(uc, pos, idx < c, ustar, need, 0, 0, out_row)
            elif c <= cap:
                _select_chunked(cu_row, cp_row, c, n, out_row, False, CH, STEP)
            else:  # the candidates overflowed: select from all the row's scores
                _select_chunked(m_ptr + row * stride_mr, cp_row, n_out, n, out_row, True, CH, STEP)
            tl.store(ws + tl.arange(0, 4), tl.zeros([4], tl.int32))
            tl.store(ws + WS_COUNTS + offs_tiles, tl.zeros([TILES], tl.int32), mask=offs_tiles < n_tiles)
