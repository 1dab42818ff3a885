"""Triton kernels behind `fp4_quantize`: one pass from high precision to packed FP4 codes + block scales.

Both kernels see the input as a flat run of blocks (the last dim is a multiple of the block size
and the tensor is contiguous, so block b is elements [b*bs, (b+1)*bs)); a program takes BLOCKS
blocks as a [BLOCKS, bs] tile, reduces each row to its absolute max, encodes the scale, rounds the
elements, and writes bs/2 bytes plus one scale byte per block.
"""

import triton
import triton.language as tl

from ._fp4_bits import ceil_log2_f32, f32_to_e2m1_code, f32_to_ue4m3_code, floor_log2_f32, pow2_f32, ue4m3_to_f32


@triton.jit
def _pack_store(out_ptr, codes, blk, nblocks, BLOCKS: tl.constexpr, BS: tl.constexpr):
    """codes [BLOCKS, BS] -> bytes [BLOCKS, BS/2], element 2j in the low nibble."""
    lo, hi = tl.split(tl.reshape(codes, (BLOCKS, BS // 2, 2)))
    packed = lo | (hi << 4)
    j = tl.arange(0, BS // 2)
    tl.store(out_ptr + blk[:, None] * (BS // 2) + j[None, :], packed, mask=blk[:, None] < nblocks)


@triton.jit
def _div_by_block(x, denom, BLOCKS: tl.constexpr):
    """x [BLOCKS, 16] / denom [BLOCKS] correctly rounded, with one division per block (Markstein).

    r = RN(1 / d) (div_rn, per block); q0 = RN(x r) is within 1 ulp of x / d; the residual
    e = x - q0 d is exact in one fma; q = RN(q0 + e r) is then RN(x / d) (Markstein's theorem:
    r correctly rounded, q0 within an ulp, no underflow or overflow in e). Underflow is kept out
    by scaling a block whose denom is below 2^-60 by 2^64 on both sides (exact; an x that then
    overflows gives inf where the twin gives a finite quotient far above 6: both clamp to code 7).
    Quotients that underflow are far below the first E2M1 threshold (0.25), so any error there
    cannot change a code; where |q0| >= 8 the quotient is above 6 and clamps to code 7 whatever
    its rounding, so q0 is kept (x r overflowing to inf would otherwise make e = inf - inf = NaN;
    that overflow is what the first GPU check, with a static amax far below the tensor's max, hit). The sign is taken from x: the fma steps turn -0 / d into +0.
    """
    small = denom < 8.673617379884035e-19  # 2^-60
    d = tl.where(small, denom * 18446744073709551616.0, denom)  # 2^64
    r = tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), d)
    xs = tl.where(small[:, None], x * 18446744073709551616.0, x)
    q0 = xs * r[:, None]
    e = tl.fma(-q0, tl.broadcast_to(d[:, None], (BLOCKS, 16)), xs)
    q = tl.fma(e, tl.broadcast_to(r[:, None], (BLOCKS, 16)), q0)
    q = tl.where(tl.abs(q0) < 8.0, q, q0)  # |x / d| > 6 clamps to code 7 anyway; q0 = inf would make e NaN
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def nvfp4_global_scale(amax, GS_ENCODE: tl.constexpr, DECODE_BY_RECIPROCAL: tl.constexpr):
    """`formats.nvfp4_global_scale` for MAX6 on a float32 amax ([1]), as torch evaluates it:

    ENCODE  g = 2688 / max(amax, FLT_MIN): a Python number over a tensor is `reciprocal() * 2688` in
            torch (`Tensor.__rtruediv__`), so RN(RN(1 / a) * 2688), not one division;
    DECODE  g = amax / 2688: a true division on the CPU, but on CUDA torch divides by a CPU scalar as
            a multiplication by its float32 reciprocal, RN(a * RN(1 / 2688)): DECODE_BY_RECIPROCAL
            follows the device on which the twin computes g (that of the amax tensor).
    448 * 6 = 2688 is exact. A g that is not finite or is 0 becomes 1 (a NaN amax ends there too:
    the max below drops NaN and RN(1 / FLT_MIN) * 2688 overflows to inf)."""
    a = tl.full((1,), 1.0, tl.float32) * amax
    one = tl.full((1,), 1.0, tl.float32)
    if GS_ENCODE:
        g = tl.math.div_rn(one, tl.maximum(a, 1.1754943508222875e-38)) * 2688.0
    elif DECODE_BY_RECIPROCAL:
        g = a * tl.math.div_rn(one, tl.full((1,), 2688.0, tl.float32))
    else:
        g = tl.math.div_rn(a, tl.full((1,), 2688.0, tl.float32))
    ok = (tl.abs(g) < float("inf")) & (g != 0.0)
    return tl.where(ok, g, 1.0)


@triton.jit
def abs_max_kernel(x_ptr, amax_ptr, n, ELEMS: tl.constexpr, TILE: tl.constexpr):
    """amax_ptr[0] (float32, zeroed by the caller) = max |x| over n elements: each program reduces
    ELEMS elements in tiles of TILE and folds its max in with one atomic max on the float's bits
    (non-negative floats order like their int32 bits; NaN bits order above inf, so a NaN wins)."""
    base = tl.program_id(0).to(tl.int64) * ELEMS
    m = tl.zeros((TILE,), dtype=tl.float32)
    for t in tl.static_range(ELEMS // TILE):
        offs = base + t * TILE + tl.arange(0, TILE)
        m = tl.maximum(m, tl.abs(tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)))
    bits = tl.max(m.to(tl.int32, bitcast=True), axis=0)
    tl.atomic_max(amax_ptr.to(tl.pointer_type(tl.int32)), bits, sem="relaxed")


@triton.jit
def nvfp4_quantize_kernel(x_ptr, amax_ptr, amax_value, gs_out_ptr, packed_ptr, scale_ptr, nblocks,
                          AMAX_FROM_PTR: tl.constexpr, GS_ENCODE: tl.constexpr, MIN_BLOCK_SCALE: tl.constexpr,
                          ZERO_SCALE_CODE: tl.constexpr, SIGNED_ZERO: tl.constexpr, BLOCKS: tl.constexpr,
                          INTERPRET: tl.constexpr, DECODE_BY_RECIPROCAL: tl.constexpr = False,
                          RCP_DIV: tl.constexpr = False):
    """NVFP4 (blocks of 16, MAX6) in the arithmetic order of `formats.nvfp4._encode_blocks`.

    The global scale g is computed here, in every program, from the tensor amax (`amax_ptr[0]`, a
    float32 on the device, when AMAX_FROM_PTR; else the float32 scalar `amax_value`): a few
    instructions per program instead of ~8 torch launches on the host. Program 0 writes g to
    `gs_out_ptr` (the QuantizedTensor's global_scale).
    RCP_DIV replaces the per-element IEEE division x / denom by `_div_by_block` (one division per
    block, then a multiply and two fma per element), which yields the same codes.
    """
    pid = tl.program_id(0)
    blk = pid * BLOCKS + tl.arange(0, BLOCKS)
    e = tl.arange(0, 16)
    bmask = blk < nblocks
    x = tl.load(x_ptr + blk[:, None] * 16 + e[None, :], mask=bmask[:, None], other=0.0).to(tl.float32)
    if AMAX_FROM_PTR:
        g1 = nvfp4_global_scale(tl.load(amax_ptr + tl.arange(0, 1)), GS_ENCODE, DECODE_BY_RECIPROCAL)  # [1]
    else:
        g1 = nvfp4_global_scale(amax_value, GS_ENCODE, DECODE_BY_RECIPROCAL)
    tl.store(gs_out_ptr + tl.arange(0, 1), g1, mask=(tl.arange(0, 1) == 0) & (pid == 0))
    g = tl.sum(g1, axis=0)  # the scalar
    amax = tl.max(tl.abs(x), axis=1)
    s = tl.math.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32))
    if GS_ENCODE:
        s = s * g
    else:
        s = tl.math.div_rn(s, tl.full(s.shape, 1.0, tl.float32) * g)
    if MIN_BLOCK_SCALE > 0:
        s = tl.maximum(s, MIN_BLOCK_SCALE)
    code = f32_to_ue4m3_code(tl.minimum(s, 448.0))
    if ZERO_SCALE_CODE > 0:  # a scale that rounds to 0 is stored as `zero_block_scale`
        code = tl.where(code == 0, ZERO_SCALE_CODE, code).to(tl.uint8)
    s32 = ue4m3_to_f32(code)
    if GS_ENCODE:
        denom = tl.math.div_rn(s32, tl.full(s32.shape, 1.0, tl.float32) * g)
        if RCP_DIV:
            scaled = _div_by_block(x, denom, BLOCKS)
        else:
            scaled = tl.math.div_rn(x, tl.broadcast_to(denom[:, None], (BLOCKS, 16)))
    else:
        inv_g = tl.math.div_rn(tl.full(s32.shape, 1.0, tl.float32), tl.full(s32.shape, 1.0, tl.float32) * g)
        scaled = x * tl.math.div_rn(inv_g, s32)[:, None]
    scaled = tl.where((s32 == 0)[:, None], 0.0, scaled)
    codes = f32_to_e2m1_code(tl.minimum(tl.maximum(scaled, -6.0), 6.0), SIGNED_ZERO)
    _pack_store(packed_ptr, codes, blk, nblocks, BLOCKS, 16)
    tl.store(scale_ptr + blk, code, mask=bmask)


@triton.jit
def mxfp4_quantize_kernel(x_ptr, packed_ptr, scale_ptr, nblocks,
                          RULE: tl.constexpr, SIGNED_ZERO: tl.constexpr, BLOCKS: tl.constexpr):
    """MXFP4 (blocks of 32, E8M0) as `formats.mxfp4`; RULE 0 FLOOR, 1 EVEN, 2 CEIL, 3 RCEIL."""
    blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    e = tl.arange(0, 32)
    bmask = blk < nblocks
    x = tl.load(x_ptr + blk[:, None] * 32 + e[None, :], mask=bmask[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    if RULE == 0:
        exp = floor_log2_f32(amax) - 2
    elif RULE == 1:
        rounded = (amax.to(tl.int32, bitcast=True) + (1 << 21)) & -8388608  # 0xFF800000
        field = (rounded >> 23) & 0xFF
        exp = tl.where(field > 0, field - 127, floor_log2_f32(rounded.to(tl.float32, bitcast=True))) - 2
    elif RULE == 2:
        exp = ceil_log2_f32(amax) - 2
    else:
        exp = ceil_log2_f32(tl.math.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32)))
    exp = tl.where(amax == 0, -127, exp)
    exp = tl.minimum(tl.maximum(exp, -127), 127)
    scaled = x * pow2_f32(-exp)[:, None]
    codes = f32_to_e2m1_code(tl.minimum(tl.maximum(scaled, -6.0), 6.0), SIGNED_ZERO)
    _pack_store(packed_ptr, codes, blk, nblocks, BLOCKS, 32)
    tl.store(scale_ptr + blk, (exp + 127).to(tl.uint8), mask=bmask)
