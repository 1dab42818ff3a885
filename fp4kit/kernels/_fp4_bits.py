"""Triton helpers shared by the FP4 kernels: the format codecs written as integer bit operations.

Why bits and not casts: the kernels must reproduce `fp4kit.formats` bit for bit, on the GPU and in
the CPU interpreter (CI). Triton's float -> fp8 cast rounds wrongly in the interpreter, and its
`/` on float32 is the approximate `div.full.f32` on NVIDIA GPUs, so every division that the torch
twin performs is `tl.math.div_rn` here, and every cast to a narrow float is built from integers.

Decoding an E2M1 nibble in three integer ops (the "float16 placement" trick):

    nibble  s e1 e0 m           float16 bits  s 0 0 0 e1 e0 m 0 ... 0   = (n & 7) << 9 | (n & 8) << 12

A float16 with exponent field e (bias 15) and top mantissa bit m is 2^(e-15) (1 + m/2) for e > 0
and 2^-14 (m/2) for e = 0 (a subnormal), which is exactly the E2M1 value (2^(e-1) (1 + m/2), or
m/2) times 2^-14, zero and sign included. The 2^-14 is folded into the block scale (`scale * 2^14`,
exact: a power of two), so `value = f16(bits) * (scale * 2^14)` is ONE rounding of the exact
product `code_value * scale`: the same float32 the twin computes as `value * scale`.

UE4M3 scales decode the same way: the 7 bits e3..e0 m2..m0 shifted left by 7 form a float16 equal
to the UE4M3 value times 2^-8 (subnormals too). E8M0 code c is the float32 2^(c-127); times 2^14
it is the float32 with exponent field c + 14, valid for c <= 240 (block amax below ~2^114). Codes
241..255 are outside the kernels' domain: they decode to NaN, loudly, instead of a wrong number.
"""

import triton
import triton.language as tl

TWO_POW_14 = 16384.0
E8M0_MAX_CODE = 240  # the largest E8M0 code the folded-scale decode handles exactly


@triton.jit
def e2m1_pair_to_f32(byte):
    """uint8 tensor of packed pairs -> (low, high) float32 E2M1 values, each times 2^-14."""
    b = byte.to(tl.uint16)
    lo = ((b & 0x07) << 9) | ((b & 0x08) << 12)
    hi = ((b & 0x70) << 5) | ((b & 0x80) << 8)
    return lo.to(tl.float16, bitcast=True).to(tl.float32), hi.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def ue4m3_to_f32(code):
    """uint8 UE4M3 codes (0..126, positive) -> float32, exact."""
    half = (code.to(tl.uint16) << 7).to(tl.float16, bitcast=True)
    return half.to(tl.float32) * 256.0


@triton.jit
def e4m3_bf16x2_shifted(code):
    """E4M3 codes -> int32 bf16x2 pairs of E4M3 x 2^117 (`fp4_gemm.NV_SCALE_SHIFT`), exact: the NVFP4 bfloat16
    pair decode's block scales computed in registers (`fp4_gemm._bf16x2_e4m3_table` without the table load).
    The magnitude bits shifted into a float16 are E4M3 x 2^-8 exactly (subnormals included); x 2^125 in float32
    is exact and below 2^126; its top half is the bfloat16 (three mantissa bits: nothing is cut). The NaN codes
    (0x7F, 0xFF) give NaN, the sign bit the sign."""
    c = code.to(tl.int32)
    mag = c & 127
    half = (mag.to(tl.uint16) << 7).to(tl.float16, bitcast=True)
    v = half.to(tl.float32) * 4.253529586511730793e37  # 2^125
    b = (v.to(tl.int32, bitcast=True) >> 16) & 0x7FFF
    b = tl.where(mag == 127, 0x7FC0, b) | ((c & 128) << 8)
    return b | (b << 16)


@triton.jit
def e8m0_bf16x2(code, ONE_MUL: tl.constexpr):
    """E8M0 codes -> int32 bf16x2 pairs of the MXFP4 bfloat16 decode's power-of-two scales, computed in registers
    exactly as `fp4_gemm._bf16x2_pow2_table` lists them: ONE_MUL 2^(c - 1) (codes <= 128; above: NaN), else
    2^(c - 127) (code 0 the subnormal 2^-127, 255 NaN)."""
    c = code.to(tl.int32)
    if ONE_MUL:
        b = tl.where(c <= 128, (c + 126) << 7, 0x7FC0)
    else:
        b = tl.where(c == 0, 0x0040, tl.where(c == 255, 0x7FC0, c << 7))
    return b | (b << 16)


@triton.jit
def nvfp4_scale14(code, global_scale, GS_ENCODE: tl.constexpr, INTERPRET: tl.constexpr):
    """NVFP4 effective block scale times 2^14: (s / g or s * g) * 2^14, as the twin rounds it.

    s / g is IEEE division (div.rn.f32), once per block. A reciprocal with one fma correction
    (Markstein) was tried and was NOT bit-exact on the H100 (2026-11-22), so it is not used.
    """
    s = ue4m3_to_f32(code)
    if GS_ENCODE:
        eff = tl.math.div_rn(s, tl.full(s.shape, 1.0, tl.float32) * global_scale)
    else:
        eff = s * global_scale
    return eff * 16384.0


@triton.jit
def mxfp4_scale14(code):
    """E8M0 code -> 2^(c - 127) * 2^14 as float32 (exact for c <= 240, NaN above)."""
    c = code.to(tl.int32)
    bits = (c + 14) << 23
    s = bits.to(tl.float32, bitcast=True)
    return tl.where(c <= 240, s, float("nan"))


@triton.jit
def f32_to_ue4m3_code(s):
    """float32 scales in [0, 448] (already clamped) -> UE4M3 code (uint8), round-to-nearest-even.

    Normal range (s >= 2^-6): round the float32 mantissa from 23 to 3 bits in the integer domain
    (add 0x7FFFF plus the lowest kept bit, then truncate) and rebias the exponent 127 -> 7.
    Subnormal range (s < 2^-6): the value is k * 2^-9 with k = rne(s * 2^9) in 0..8; adding and
    subtracting 2^23 rounds to an integer with the float unit's own ties-to-even. k = 8 is 2^-6,
    whose code (exponent 1, mantissa 0) is also 8, so the two ranges meet without a special case.
    """
    bits = s.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20  # sign 0 | exponent (8 bits) | 3 mantissa bits
    normal = r - ((127 - 7) << 3)
    k = ((s * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(s >= 0.015625, normal, k)
    return code.to(tl.uint8)


@triton.jit
def f32_to_e2m1_code(x, SIGNED_ZERO: tl.constexpr):
    """float32 values already in [-6, 6] -> E2M1 codes 0..15 (uint8), round-to-nearest-even.

    The thresholds of `formats.e2m1` (> 0.25, >= 0.75, > 1.25, >= 1.75, > 2.5, >= 3.5, > 5) are
    round-to-nearest-even on the E2M1 grid, so the code comes from the float bits instead of seven
    compares. |x| >= 1: round the float32 mantissa to 1 bit in the integer domain (add 0x1FFFFF plus
    the lowest kept bit, truncate) and rebias the exponent 127 -> 1; the code is (exponent, mantissa
    bit) = r - (126 << 1). |x| < 1: the value is k * 0.5 with k = rne(2|x|) in 0..2, and adding 2^23
    makes the float unit round it (its low mantissa bits are k). k = 2 is 1.0, code 2 in both forms.
    """
    return e2m1_code_from_mag(tl.abs(x), x, SIGNED_ZERO)


@triton.jit
def e2m1_code_from_mag(mag, sign_src, SIGNED_ZERO: tl.constexpr):
    """`f32_to_e2m1_code` split: the magnitude (already |.| and <= 6) and the float whose sign bit the
    code takes (so a quotient's sign can come from its dividend rather than from the quotient)."""
    bits = mag.to(tl.int32, bitcast=True)
    normal = ((bits + 0x1FFFFF + ((bits >> 22) & 1)) >> 22) - (126 << 1)
    k = (mag * 2.0 + 8388608.0).to(tl.int32, bitcast=True) & 3
    code = tl.where(mag >= 1.0, normal, k)
    neg = (sign_src.to(tl.int32, bitcast=True) >> 31) & 1
    if not SIGNED_ZERO:
        neg = tl.where(code != 0, neg, 0)
    return (code | (neg << 3)).to(tl.uint8)


@triton.jit
def f32_to_bf16_rne_bits(x):
    """float32 -> bfloat16 with round-to-nearest-even, from integer ops.

    Only for the interpreter, whose `.to(tl.bfloat16)` truncates; on the GPU the hardware cast
    (cvt.rn.bf16x2.f32) rounds the same way and is cheaper.
    """
    bits = x.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_rne(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype) with round-to-nearest-even in the interpreter too (see f32_to_bf16_rne_bits)."""
    if INTERPRET and dtype == tl.bfloat16:
        return f32_to_bf16_rne_bits(x)
    else:
        return x.to(dtype)


@triton.jit
def floor_log2_f32(x):
    """floor(log2(x)) as int32 for finite x >= 0 (subnormals included); x == 0 gives -2^30, as `formats`.

    Normal floats: the exponent field minus 127. Subnormals are scaled by 2^64 first (exact).
    """
    field = (x.to(tl.int32, bitcast=True) >> 23) & 0xFF
    y = x * 18446744073709551616.0  # 2^64
    field_y = (y.to(tl.int32, bitcast=True) >> 23) & 0xFF
    out = tl.where(field > 0, field - 127, field_y - 127 - 64)
    return tl.where(x == 0, -(1 << 30), out)


@triton.jit
def ceil_log2_f32(x):
    """ceil(log2(x)) for finite x >= 0: floor, plus one unless x is a power of two (x == 0: -2^30 + 1)."""
    bits = x.to(tl.int32, bitcast=True)
    y = x * 18446744073709551616.0
    mant = tl.where(((bits >> 23) & 0xFF) > 0, bits, y.to(tl.int32, bitcast=True)) & 0x7FFFFF
    return floor_log2_f32(x) + ((mant != 0) | (x == 0)).to(tl.int32)


@triton.jit
def pow2_f32(e):
    """Exact 2^e as float32 for int32 e in [-127, 127]; 2^-127 is the subnormal 0x00400000."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    sub = tl.full(e.shape, 0x00400000, tl.int32).to(tl.float32, bitcast=True)
    return tl.where(e == -127, sub, normal)


@triton.jit
def e2m1_word_pair_bf16(words, J: tl.constexpr):
    """int32 words of 8 packed codes -> int32 holding two bfloat16s: nibbles J (low half) and J + 4 (high).

    The float16 placement of `_fp4_bits` moved to bfloat16's field widths: magnitude bits e1 e0 m go
    to bits 8..6 (and 24..22), the sign to bit 15 (and 31). A bfloat16 with exponent field e and
    top mantissa bit m is 2^(e-127) (1 + m/2), or 2^-126 (m/2) when e = 0 (subnormal): exactly the
    E2M1 value times 2^-126. Two shifts and two masks per pair of weights, no conversion.
    """
    if J == 0:
        h = ((words << 6) & 0x01C001C0) | ((words << 12) & -2147450880)
    elif J == 1:
        h = ((words << 2) & 0x01C001C0) | ((words << 8) & -2147450880)
    elif J == 2:
        h = ((words >> 2) & 0x01C001C0) | ((words << 4) & -2147450880)
    else:
        h = ((words >> 6) & 0x01C001C0) | (words & -2147450880)
    return h


@triton.jit
def half_pair_to_f32(h, INTERPRET: tl.constexpr):
    """int32 holding a float16 pair -> (low, high) float32. On the GPU one `cvt.f32.f16` per half, read
    straight from the pair's register (Triton's own int16 split would re-pack halves first); the
    interpreter takes the bitcast route."""
    if INTERPRET:
        lo = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (h >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, hi
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 a, b; mov.b32 {a, b}, $2; cvt.f32.f16 $0, a; cvt.f32.f16 $1, b; }",
            "=f,=f,r", [h], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
