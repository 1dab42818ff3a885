"""MXFP4 (OCP Microscaling): E2M1 elements in blocks of 32 along the last dim, one E8M0 scale
(a power of two) per block, no per-tensor scale.

    w  ~=  q * 2^e        q in E2M1, e the block's shared exponent, stored as code e + 127

The OCP v1.0 spec fixes the format but libraries pick the exponent differently. All four rules in
use are here (`ScaleRule`); each is computed on the float32 bit pattern (exact, no log2 rounding).
The element step is then `q = e2m1(clamp(x * 2^-e, -6, 6))`; 2^-e is exact, so multiplying by it
equals dividing by 2^e. A zero block gets code 0 (2^-127) and zero codes.

Known divergences from torchao's `to_mx` (documented, tested): for FLOOR/EVEN/CEIL torchao divides
by max(2^e, 2^-126), so a block whose code is 0 (amax below ~2^-124) is scaled by 2^126 there and
2^127 here; for RCEIL it takes ceil(log2(amax/6)) in float, which can miss by one when amax/6 lies
within a few ulps above a power of two, and scales code-0 blocks by 1.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

import torch

from .checks import check_quantizable
from .e2m1 import E2M1_MAX, e2m1_codes_to_float, pack_codes, round_to_e2m1_codes, unpack_codes
from .qtensor import QuantizedTensor
from .scales import ceil_log2, e8m0_to_float, exponent_to_e8m0, floor_log2, pow2

E2M1_EMAX = 2  # floor(log2(6)): the largest power of two in E2M1


class ScaleRule(enum.Enum):
    """How a block's shared exponent e (scale 2^e) follows from its absolute max `amax`.

    FLOOR  e = floor(log2(amax)) - 2          OCP MX v1.0. amax/2^e lands in [4, 8): values above
                                              6 in scaled units saturate (clipping error).
    EVEN   e = floor(log2(round1(amax))) - 2  round1 rounds amax to one mantissa bit, half up on
                                              the float32 bits (add 2^21, clear the mantissa), as
                                              torchao EVEN and compressed-tensors do. Less clipping.
    CEIL   e = ceil(log2(amax)) - 2           never clips, but often leaves the top code unused.
    RCEIL  e = ceil(log2(amax / 6))           "round up" of the ideal scale amax/6: never clips and
                                              uses 6 when it can. NVIDIA's cvt.rp...ue8m0, gpt-oss's
                                              runtime and DeepSeek-V4 use it.

    The default is EVEN: compressed-tensors (hence vLLM checkpoints) uses it, and it had the best
    SQNR of the four on Gaussian, Laplace and Student-t(3) weights (tests/formats/test_sqnr.py:
    19.0 / 18.2 / 17.3 dB against FLOOR 18.8 / 18.0 / 17.0, RCEIL 18.8 / 17.6 / 16.6, CEIL 16.8 /
    15.4 / 14.4). RCEIL is the DeepSeek-V4 QAT recipe's choice: it never clips, which matters for
    gradients and activations more than for weights.
    """

    FLOOR = "floor"
    EVEN = "even"
    CEIL = "ceil"
    RCEIL = "rceil"


@dataclass(frozen=True)
class MXFP4Config:
    scale_rule: ScaleRule = ScaleRule.EVEN
    signed_zero: bool = True

    name: ClassVar[str] = "mxfp4"
    block_size: ClassVar[int] = 32

    def quantize(self, x: torch.Tensor, *, amax=None, name: str = "tensor") -> QuantizedTensor:
        return quantize_mxfp4(x, self, name=name)

    def dequantize(self, qt: QuantizedTensor, dtype=torch.float32) -> torch.Tensor:
        return dequantize_mxfp4(qt, dtype)


def shared_exponent(amax: torch.Tensor, rule: ScaleRule) -> torch.Tensor:
    """Unbiased block exponent (int32) for float32 block maxima `amax` >= 0, before clamping."""
    amax = amax.float()
    if rule is ScaleRule.FLOOR:
        e = floor_log2(amax) - E2M1_EMAX
    elif rule is ScaleRule.EVEN:
        bits = amax.view(torch.int32).to(torch.int64)
        rounded = ((bits + (1 << 21)) & 0xFF800000).to(torch.int32)
        field = (rounded >> 23) & 0xFF  # 255 when rounding carried past the largest float
        e = torch.where(field > 0, field - 127, floor_log2(rounded.view(torch.float32))) - E2M1_EMAX
    elif rule is ScaleRule.CEIL:
        e = ceil_log2(amax) - E2M1_EMAX
    elif rule is ScaleRule.RCEIL:
        e = ceil_log2(amax / E2M1_MAX)
    else:  # pragma: no cover - enum is closed
        raise ValueError(f"unknown scale rule {rule}")
    return torch.where(amax == 0, torch.full_like(e, -127), e)


def quantize_mxfp4(x: torch.Tensor, config: MXFP4Config = MXFP4Config(), *, name: str = "tensor") -> QuantizedTensor:
    """Quantize `x` (any rank, last dim % 32 == 0) to MXFP4: packed codes and E8M0 scale codes."""
    check_quantizable(x, config.block_size, name, "MXFP4")
    shape = tuple(x.shape)
    blocks = x.float().reshape(*shape[:-1], shape[-1] // config.block_size, config.block_size)
    e = shared_exponent(blocks.abs().amax(dim=-1), config.scale_rule).clamp(-127, 127)
    scaled = blocks * pow2(-e).unsqueeze(-1)
    codes = round_to_e2m1_codes(scaled.clamp(-E2M1_MAX, E2M1_MAX), signed_zero=config.signed_zero)
    packed = pack_codes(codes.reshape(shape))
    return QuantizedTensor(packed, exponent_to_e8m0(e), None, shape, config)


def dequantize_mxfp4(qt: QuantizedTensor, dtype=torch.float32) -> torch.Tensor:
    bs = qt.config.block_size
    values = e2m1_codes_to_float(unpack_codes(qt.data)).reshape(*qt.shape[:-1], -1, bs)
    return (values * e8m0_to_float(qt.scale).unsqueeze(-1)).reshape(qt.shape).to(dtype)
