"""Block-scale encodings: UE4M3 (NVFP4) and E8M0 (MX formats).

UE4M3 is FP8 E4M3 (`torch.float8_e4m3fn`) used for positive scales only: exponent bias 7, three
mantissa bits, largest finite 448, smallest normal 2^-6 = 0.015625 and subnormals down to
2^-9 = 0.001953125. Rounding from float32 is round-to-nearest-even (PyTorch's cast); we clamp to
448 first so nothing overflows to NaN.

E8M0 is an unsigned biased exponent: code c in 0..254 means 2^(c - 127), code 255 is NaN. There is
no zero and no mantissa:

    code   0   -> 2^-127        code 127 -> 1.0
    code 254   -> 2^127         code 255 -> NaN

Exponent helpers work on the float32 bit pattern or on `torch.frexp`, never on `log2`, whose
float rounding can land exactly on an integer just above a power of two.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0**-6
E4M3_MIN_SUBNORMAL = 2.0**-9
E8M0_BIAS = 127
E8M0_NAN = 255


def round_to_ue4m3(scale: torch.Tensor) -> torch.Tensor:
    """float32 scales (>= 0) -> float8_e4m3fn, saturating at 448, round-to-nearest-even."""
    return scale.float().clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) for finite x > 0 (subnormals included), int32. x == 0 gives a very small value."""
    mantissa, exponent = torch.frexp(x.float())  # x = m * 2^e, m in [0.5, 1)
    out = exponent - 1
    return torch.where(mantissa == 0, torch.full_like(out, -(2**30)), out)


def ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """ceil(log2(x)) for finite x > 0, int32: floor, plus one unless x is a power of two."""
    mantissa, _ = torch.frexp(x.float())
    return floor_log2(x) + (mantissa.abs() != 0.5).to(torch.int32)


def e8m0_to_float(codes: torch.Tensor) -> torch.Tensor:
    """E8M0 codes (uint8) -> float32 powers of two; 255 -> NaN. Built from bits, so exact."""
    c = codes.to(torch.int32)
    normal = (c << 23).view(torch.float32)  # c in 1..254 is a normal float32 exponent field
    out = torch.where(c == 0, 2.0**-127, normal)  # Python scalars: no host-to-device copy (graph capture)
    return torch.where(c == E8M0_NAN, float("nan"), out)


def exponent_to_e8m0(exponent: torch.Tensor) -> torch.Tensor:
    """Unbiased int exponent -> E8M0 code, clamped to the finite codes 0..254."""
    return (exponent.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact 2^e as float32 for int e in [-127, 127] (2^-127 is a float32 subnormal)."""
    return e8m0_to_float(exponent_to_e8m0(exponent))
