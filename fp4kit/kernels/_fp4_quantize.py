"""Triton kernels behind `fp4_quantize`: one pass from high precision to packed FP4 codes + block scales.

Both kernels see the input as a flat run of blocks (the last dim is a multiple of the block size
and the tensor is contiguous, so block b is elements [b*bs, (b+1)*bs)); a program takes BLOCKS
blocks as a [BLOCKS, bs] tile, reduces each row to its absolute max, encodes the scale, rounds the
elements, and writes bs/2 bytes plus one scale byte per block.
"""

import triton
import triton.language as tl

from ._fp4_bits import ceil_log2_f32, e2m1_code_from_mag, f32_to_e2m1_code, f32_to_ue4m3_code, floor_log2_f32, pow2_f32, ue4m3_to_f32


@triton.jit
def _pack_store(out_ptr, codes, blk, nblocks, BLOCKS: tl.constexpr, BS: tl.constexpr):
    """codes [BLOCKS, BS] -> bytes [BLOCKS, BS/2], element 2j in the low nibble."""
    lo, hi = tl.split(tl.reshape(codes, (BLOCKS, BS // 2, 2)))
    packed = lo | (hi << 4)
    j = tl.arange(0, BS // 2)
    tl.store(out_ptr + blk[:, None] * (BS // 2) + j[None, :], packed, mask=blk[:, None] < nblocks)


@triton.jit
def e_neg(v):
    return -v


@triton.jit
def _div_by_block(x, denom, s32):
    """x [2, BLOCKS, 8] (the two halves of each block) / denom [BLOCKS], correctly rounded wherever the E2M1 code depends on it, with one
    IEEE division per block instead of one per element (`div_rn` expands to ~10 instructions with a
    MUFU.RCP each; this is 1 FMUL + 2 FFMA per element).

    r = RN(1 / d) (div_rn, per block); q0 = RN(x r) is within 1 ulp of x / d; the residual
    e = x - q0 d is exact in one fma; q = RN(q0 + e r) is then RN(x / d) (Markstein's theorem:
    r correctly rounded, q0 within an ulp, no underflow or overflow in e). Underflow: a program
    whose smallest live denominator is below 2^-60 (only under extreme global scales) takes the
    per-element division instead, a branch uniform over the program; with d >= 2^-60, a residual
    can underflow only for |x| far below d / 4, whose code is 0 whatever the rounding. Overflow:
    where x r overflows, q0 = inf makes e = -inf and q = NaN; the caller's `min(|q|, 6)` returns
    6 for NaN (PTX min.f32), i.e. code 7, which is what any quotient above 6 gets. The sign of the
    code is taken from x by the caller (the fma steps turn -0 / d into +0).
    Needs a fused fma: the interpreter uses the per-element division.
    """
    dmin = tl.min(tl.where(s32 > 0, denom, 1.0), axis=0)
    d3 = tl.broadcast_to(denom[None, :, None], x.shape)
    if dmin >= 8.673617379884035e-19:  # 2^-60
        r3 = tl.broadcast_to(tl.math.div_rn(tl.full(denom.shape, 1.0, tl.float32), denom)[None, :, None], x.shape)
        q0 = x * r3
        q = tl.fma(e_neg(q0), d3, x)
        q = tl.fma(q, r3, q0)
    else:
        q = tl.math.div_rn(x, d3)
    return q


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
    block, then a multiply and two fma per element), which yields the same codes (GPU only).
    """
    pid = tl.program_id(0)
    blk = pid * BLOCKS + tl.arange(0, BLOCKS)
    bmask = blk < nblocks
    # x as [2 (half), BLOCKS, 8]: Triton gives each thread 8 contiguous elements (16 bytes) of dim 2,
    # lanes and warps along the blocks, and both halves in registers: one thread owns a whole block,
    # so its max and scale need no shuffle and are computed once per 16 elements, not per 8.
    h3 = tl.arange(0, 2)[:, None, None]
    b3 = blk[None, :, None]
    e3 = tl.arange(0, 8)[None, None, :]
    x = tl.load(x_ptr + b3 * 16 + h3 * 8 + e3, mask=b3 < nblocks, other=0.0).to(tl.float32)
    if AMAX_FROM_PTR:
        g1 = nvfp4_global_scale(tl.load(amax_ptr + tl.arange(0, 1)), GS_ENCODE, DECODE_BY_RECIPROCAL)  # [1]
    else:
        g1 = nvfp4_global_scale(amax_value, GS_ENCODE, DECODE_BY_RECIPROCAL)
    tl.store(gs_out_ptr + tl.arange(0, 1), g1, mask=(tl.arange(0, 1) == 0) & (pid == 0))
    g = tl.sum(g1, axis=0)  # the scalar
    amax = tl.max(tl.max(tl.abs(x), axis=2), axis=0)  # [BLOCKS]
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
        if RCP_DIV and not INTERPRET:
            mag = tl.minimum(tl.abs(_div_by_block(x, denom, s32)), 6.0)  # NaN (overflow) -> 6
        else:
            mag = tl.minimum(tl.abs(tl.math.div_rn(x, tl.broadcast_to(denom[None, :, None], x.shape))), 6.0)
    else:
        inv_g = tl.math.div_rn(tl.full(s32.shape, 1.0, tl.float32), tl.full(s32.shape, 1.0, tl.float32) * g)
        mag = tl.abs(tl.minimum(tl.maximum(x * tl.math.div_rn(inv_g, s32)[None, :, None], -6.0), 6.0))
    sign_src = x  # s / g > 0, so the quotient has x's sign (-0 included)
    if ZERO_SCALE_CODE == 0:  # a block whose scale is 0 is flushed to +0, as the twin's where(zero, 0, .)
        mag = tl.where((s32 == 0)[None, :, None], 0.0, mag)
        sign_src = tl.where((s32 == 0)[None, :, None], 0.0, x)
    codes = e2m1_code_from_mag(mag, sign_src, SIGNED_ZERO)  # [2, BLOCKS, 8]
    lo, hi = tl.split(tl.reshape(codes, (2, BLOCKS, 4, 2)))
    j3 = tl.arange(0, 4)[None, None, :]
    tl.store(packed_ptr + b3 * 8 + h3 * 4 + j3, lo | (hi << 4), mask=b3 < nblocks)
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
