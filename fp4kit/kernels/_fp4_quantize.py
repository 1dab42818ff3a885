"""Triton kernels behind `fp4_quantize`: one pass from high precision to packed FP4 codes + block scales.

Both kernels see the input as a flat run of blocks (the last dim is a multiple of the block size
and the tensor is contiguous, so block b is elements [b*bs, (b+1)*bs)); a program takes BLOCKS
blocks, reduces each to its absolute max, encodes the scale, rounds the elements, and writes bs/2
bytes plus one scale byte per block. MXFP4 loads a [BLOCKS, 32] tile; NVFP4 loads each block's two
8-element halves as two [BLOCKS, 8] tiles so that one thread owns a whole block (no shuffle, the
block's scale arithmetic done once), which with a one-add E2M1 encode brought it from ~33 to ~22
SASS instructions per element (sm_90) and from 61.5% to 89.6% of the H100's copy bandwidth.
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


# Markstein's division needs every live denominator d = s / g >= 2^-60 (see `_quotient`); block scales
# are >= 2^-9 (the smallest UE4M3 subnormal) when live, so g <= 2^51 guarantees it for the whole tensor.
MARKSTEIN_MAX_G = 2251799813685248.0  # 2^51 (written out in the kernel: a jit function reads no globals)


@triton.jit
def _quotient(x, d, r):
    """RN(x / d) for x [BLOCKS, 8] and the block's d, r = RN(1 / d) ([BLOCKS]): 1 FMUL + 2 FFMA per element
    instead of `div_rn`'s ~10 instructions with a MUFU.RCP each.

    q0 = RN(x r) is within 1 ulp of x / d; the residual e = x - q0 d is exact in one fma; q = RN(q0 + e r)
    is then RN(x / d) (Markstein's theorem: r correctly rounded, q0 within an ulp, no underflow or
    overflow in e). Underflow: the caller takes this path only when every live d >= 2^-60 (a check on
    the global scale, uniform over the launch: `MARKSTEIN_MAX_G`); then a residual can underflow only
    for |x| far below d / 4, whose code is 0 whatever the rounding. Overflow: where x r overflows,
    q0 = inf makes e = -inf and q = NaN; the caller's `min(|q|, 6)` returns 6 for NaN (PTX min.f32),
    i.e. code 7, which is what any quotient above 6 gets. The sign of the code is taken from x by the
    caller (the fma steps turn -0 / d into +0). -d is formed per block, so the fma reads q0 as it is
    (negating q0 instead made the compiler recompute x r: 4 instructions per element instead of 3).
    Needs a fused fma: the interpreter takes the per-element division.
    """
    q0 = x * r[:, None]
    e = tl.fma(q0, -d[:, None], x)
    return tl.fma(e, r[:, None], q0)


@triton.jit
def _e2m1_code_i32(mag, sign_src, SIGNED_ZERO: tl.constexpr):
    """E2M1 code (int32 0..15) of mag in [0, 6] (already |.| and clamped) with the sign bit of sign_src:
    round-to-nearest-even on the E2M1 grid by ONE float add, ~6 instructions instead of ~9.

    The grid step is 0.5 below 2 (subnormals 0, 0.5 and the binade [1, 2) alike), 1 on [2, 4), 2 on
    [4, 8): step = 2^(max(e, 0) - 1) with e = floor(log2 mag). M = 2^23 step has ulp(M) = step, so the
    float unit's own RNE in t = mag + M rounds mag to n steps (t = M + n step, same binade as M: the
    integer difference of the bit patterns is n). The code is n plus 2 per binade above [1, 2):
    code = n + 2 max(e, 0) = (bits(t) - bits(M)) + (bits(M) >> 22) - 298, since
    bits(M) = (max(E, 127) + 22) << 23 for the biased exponent field E of mag. Checked against
    `formats.round_to_e2m1_codes` on every float32 in [0, 6] (1,086,324,737 values, CPU, bit for bit).
    """
    bits = mag.to(tl.int32, bitcast=True)
    m_bits = tl.maximum(bits & 0x7F800000, 0x3F800000) + (22 << 23)
    t = mag + m_bits.to(tl.float32, bitcast=True)
    code = t.to(tl.int32, bitcast=True) - m_bits + ((m_bits >> 22) - 298)
    neg = (sign_src.to(tl.int32, bitcast=True) >> 28) & 8
    if not SIGNED_ZERO:
        neg = tl.where(code != 0, neg, 0)
    return code | neg


@triton.jit
def _pack8(codes):
    """codes [BLOCKS, 8] (int32, 0..15) -> int32 [BLOCKS]: code j in bits 4j..4j+3 (little-endian: the
    bytes of the word are the packed pairs, element 2j in the low nibble). The 8 codes sit in one thread,
    so the sum (of disjoint bit fields) is in-thread shifts and adds, no shuffle."""
    shift = tl.arange(0, 8) * 4
    return tl.sum(codes << shift[None, :], axis=1)


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
def _nvfp4_codes(x, denom, r, inv_eff, s32, GS_ENCODE: tl.constexpr, ZERO_SCALE_CODE: tl.constexpr,
                 SIGNED_ZERO: tl.constexpr, MARKSTEIN: tl.constexpr):
    """E2M1 codes of one half of each block (x [BLOCKS, 8]) as the twin rounds x / (s / g) or x * (1/g / s)."""
    if GS_ENCODE:
        if MARKSTEIN:
            mag = tl.minimum(tl.abs(_quotient(x, denom, r)), 6.0)  # NaN (overflow) -> 6
        else:
            mag = tl.minimum(tl.abs(tl.math.div_rn(x, tl.broadcast_to(denom[:, None], x.shape))), 6.0)
    else:
        mag = tl.abs(tl.minimum(tl.maximum(x * inv_eff[:, None], -6.0), 6.0))
    sign_src = x  # s / g > 0, so the quotient has x's sign (-0 included)
    if ZERO_SCALE_CODE == 0:  # a block whose scale is 0 is flushed to +0, as the twin's where(zero, 0, .)
        mag = tl.where((s32 == 0)[:, None], 0.0, mag)
        sign_src = tl.where((s32 == 0)[:, None], 0.0, x)
    return _e2m1_code_i32(mag, sign_src, SIGNED_ZERO)


@triton.jit
def nvfp4_quantize_kernel(x_ptr, amax_ptr, amax_value, gs_out_ptr, packed_ptr, scale_ptr, nblocks,
                          AMAX_FROM_PTR: tl.constexpr, GS_ENCODE: tl.constexpr, MIN_BLOCK_SCALE: tl.constexpr,
                          ZERO_SCALE_CODE: tl.constexpr, SIGNED_ZERO: tl.constexpr, BLOCKS: tl.constexpr,
                          INTERPRET: tl.constexpr, DECODE_BY_RECIPROCAL: tl.constexpr = False,
                          RCP_DIV: tl.constexpr = False, REVERSE: tl.constexpr = False, EVICT: tl.constexpr = ""):
    """NVFP4 (blocks of 16, MAX6) in the arithmetic order of `formats.nvfp4._encode_blocks`.

    Layout: one thread owns whole blocks. x is loaded as two [BLOCKS, 8] tiles (the low and the high
    half of each block, 16 bytes each); both get the same layout (8 contiguous elements per thread,
    lanes and warps along the blocks), so the block max, the scale and the division setup are
    computed once per block in the thread that holds it: no shuffle, no shared memory, no duplicate
    per-block work in a second lane (the round-4 [2, BLOCKS, 8] tile put the halves in neighbour
    lanes: a shuffle per block and all the block-scale arithmetic twice). The 8 codes of a half are
    packed into one int32 in the thread (`_pack8`) and the block's two words stored as one 8-byte
    store (`packed_ptr` is the int32 view); the scale byte is one store per block.

    The global scale g is computed here, in every program, from the tensor amax (`amax_ptr[0]`, a
    float32 on the device, when AMAX_FROM_PTR; else the float32 scalar `amax_value`): a few
    instructions per program instead of ~8 torch launches on the host. Program 0 writes g to
    `gs_out_ptr` (the QuantizedTensor's global_scale).
    RCP_DIV replaces the per-element IEEE division x / denom by `_quotient` (one division per block,
    then a multiply and two fma per element), which yields the same codes (GPU only), whenever
    g <= MARKSTEIN_MAX_G (a test on one scalar, uniform over the launch; else the division).
    REVERSE: programs take the blocks from the end (the no-amax path: the amax pass read x front to
    back, so the tail of x is what L2 still holds). EVICT: eviction policy of the x loads.
    """
    pid = tl.program_id(0)
    if REVERSE:
        pid = tl.num_programs(0) - 1 - pid
    blk = pid * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS]
    bmask = blk < nblocks
    e = tl.arange(0, 8)[None, :]
    xp = x_ptr + blk.to(tl.int64)[:, None] * 16 + e  # [BLOCKS, 8]: the low half of each block
    x_lo = tl.load(xp, mask=bmask[:, None], other=0.0, eviction_policy=EVICT).to(tl.float32)
    x_hi = tl.load(xp + 8, mask=bmask[:, None], other=0.0, eviction_policy=EVICT).to(tl.float32)
    if AMAX_FROM_PTR:
        g1 = nvfp4_global_scale(tl.load(amax_ptr + tl.arange(0, 1)), GS_ENCODE, DECODE_BY_RECIPROCAL)  # [1]
    else:
        g1 = nvfp4_global_scale(amax_value, GS_ENCODE, DECODE_BY_RECIPROCAL)
    tl.store(gs_out_ptr + tl.arange(0, 1), g1, mask=(tl.arange(0, 1) == 0) & (pid == 0))
    g = tl.sum(g1, axis=0)  # the scalar
    amax = tl.maximum(tl.max(tl.abs(x_lo), axis=1), tl.max(tl.abs(x_hi), axis=1))  # [BLOCKS]
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
    one = tl.full(s32.shape, 1.0, tl.float32)
    if GS_ENCODE:
        denom = tl.math.div_rn(s32, one * g)
        inv_eff = denom  # unused
        if RCP_DIV and not INTERPRET:
            if g <= 2251799813685248.0:  # MARKSTEIN_MAX_G
                r = tl.math.div_rn(one, denom)
                lo = _nvfp4_codes(x_lo, denom, r, inv_eff, s32, GS_ENCODE, ZERO_SCALE_CODE, SIGNED_ZERO, True)
                hi = _nvfp4_codes(x_hi, denom, r, inv_eff, s32, GS_ENCODE, ZERO_SCALE_CODE, SIGNED_ZERO, True)
            else:
                lo = _nvfp4_codes(x_lo, denom, denom, inv_eff, s32, GS_ENCODE, ZERO_SCALE_CODE, SIGNED_ZERO, False)
                hi = _nvfp4_codes(x_hi, denom, denom, inv_eff, s32, GS_ENCODE, ZERO_SCALE_CODE, SIGNED_ZERO, False)
        else:
            lo = _nvfp4_codes(x_lo, denom, denom, inv_eff, s32, GS_ENCODE, ZERO_SCALE_CODE, SIGNED_ZERO, False)
            hi = _nvfp4_codes(x_hi, denom, denom, inv_eff, s32, GS_ENCODE, ZERO_SCALE_CODE, SIGNED_ZERO, False)
    else:
        inv_g = tl.math.div_rn(one, one * g)
        inv_eff = tl.math.div_rn(inv_g, s32)
        lo = _nvfp4_codes(x_lo, inv_eff, inv_eff, inv_eff, s32, GS_ENCODE, ZERO_SCALE_CODE, SIGNED_ZERO, False)
        hi = _nvfp4_codes(x_hi, inv_eff, inv_eff, inv_eff, s32, GS_ENCODE, ZERO_SCALE_CODE, SIGNED_ZERO, False)
    words = tl.join(_pack8(lo), _pack8(hi))  # [BLOCKS, 2] int32: the block's 8 bytes
    tl.store(packed_ptr + blk.to(tl.int64)[:, None] * 2 + tl.arange(0, 2)[None, :], words, mask=bmask[:, None])
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
