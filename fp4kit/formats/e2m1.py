"""E2M1: the 4-bit floating-point element shared by NVFP4 and MXFP4.

An E2M1 code is 4 bits: bit 3 is the sign, bits 2..1 the exponent (bias 1), bit 0 the mantissa.
The eight magnitudes are

    code  0    1    2    3    4    5    6    7
    value 0   0.5  1.0  1.5  2.0  3.0  4.0  6.0

and codes 8..15 are their negatives (code 8 is -0.0). There is no Inf and no NaN: values beyond
+-6 saturate to +-6.

Rounding is round-to-nearest, ties-to-even on the code's mantissa bit. Written as thresholds on |x|:

    |x| <= 0.25 -> 0     (0.25 is a tie between 0 and 0.5; 0 is even)
    |x| <  0.75 -> 0.5   (0.75 ties 0.5/1.0 -> 1.0)
    |x| <= 1.25 -> 1.0   (1.25 ties 1.0/1.5 -> 1.0)
    |x| <  1.75 -> 1.5   (1.75 ties 1.5/2.0 -> 2.0)
    |x| <= 2.5  -> 2.0   (2.5 ties 2/3 -> 2)
    |x| <  3.5  -> 3.0   (3.5 ties 3/4 -> 4)
    |x| <= 5.0  -> 4.0   (5 ties 4/6 -> 4)
    otherwise   -> 6.0

so a code is the number of thresholds passed, with `>` at ties that go down and `>=` at ties
that go up. This is what ml_dtypes' float4_e2m1fn, torchao and compressed-tensors compute.

Negative zero: a negative input that rounds to zero keeps its sign (code 8), as IEEE rounding,
ml_dtypes, torchao and compressed-tensors do. `signed_zero=False` maps it to code 0 instead; both
dequantize to 0, so only the stored bytes differ.

Packing: two codes per byte, element 2j in the low nibble and element 2j+1 in the high nibble
(compressed-tensors, torchao, vLLM and PyTorch's float4_e2m1fn_x2 all agree on this order).
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# (threshold, inclusive): the code rises by one once |x| passes each threshold.
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def e2m1_table(device=None) -> torch.Tensor:
    """The 16 code values as float32, indexed by code.

    Built on the device from the code bits (sign = bit 3, exponent = bits 2-1, mantissa = bit 0; exponent 0 is
    subnormal: 0.5 * m, else (1 + m / 2) * 2^(e - 1)) rather than copied from the host, so that a dequantize inside
    CUDA-graph capture needs no host-to-device copy. Equal to E2M1_VALUES (tested)."""
    c = torch.arange(16, dtype=torch.int32, device=device)
    e, m = (c >> 1) & 3, (c & 1).float()
    mag = torch.where(e == 0, 0.5 * m, torch.ldexp(1.0 + 0.5 * m, e - 1))
    return torch.where(c >= 8, -mag, mag)


def round_to_e2m1_codes(x: torch.Tensor, *, signed_zero: bool = True) -> torch.Tensor:
    """Round float values (already divided by their scale) to E2M1 codes, uint8 in 0..15.

    Values beyond +-6 saturate. NaN has no code: callers reject it before (see `checks`).
    """
    x = x.float()
    mag = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for threshold, inclusive in _THRESHOLDS:
        code += (mag >= threshold) if inclusive else (mag > threshold)
    negative = torch.signbit(x)
    if not signed_zero:
        negative &= code != 0
    return code | (negative.to(torch.uint8) << 3)


def e2m1_codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    """Decode uint8 codes 0..15 to float32."""
    return e2m1_table(codes.device)[codes.long()]


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes along the last dim, two per byte: element 2j low nibble, 2j+1 high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing needs an even last dim, got shape {tuple(codes.shape)}")
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_codes`: [..., K/2] uint8 -> [..., K] codes."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed FP4 data must be uint8, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)
