"""FP8 E4M3 quantization with a float32 scale per tensor, per token or per block.

    scale = amax / 448        x_q = fp8(clamp(x / scale, -448, 448))        x ~= x_q * scale

Granularity decides what one scale covers:
    TENSOR  the whole tensor                      (static activation scales, the KV cache)
    TOKEN   each row (all dims but the last)      (dynamic per-token activations, W4A8)
    BLOCK   each run of `block_size` along the last dim (DeepSeek-style 1x128 activation tiles)
An all-zero group gets scale 1. E4M3 here is `torch.float8_e4m3fn` (no Inf, max 448, RNE cast).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

import torch

from .checks import check_blocks, check_finite, check_float
from .qtensor import QuantizedTensor
from .scales import E4M3_MAX


class FP8Granularity(enum.Enum):
    TENSOR = "tensor"
    TOKEN = "token"
    BLOCK = "block"


@dataclass(frozen=True)
class FP8Config:
    granularity: FP8Granularity = FP8Granularity.TOKEN
    block_size: int = 128

    name: ClassVar[str] = "fp8"

    def __post_init__(self):
        if self.block_size <= 0:
            raise ValueError(f"FP8Config.block_size must be positive, got {self.block_size}")

    def quantize(self, x: torch.Tensor, *, amax=None, name: str = "tensor") -> QuantizedTensor:
        return quantize_fp8(x, self, amax=amax, name=name)

    def dequantize(self, qt: QuantizedTensor, dtype=torch.float32) -> torch.Tensor:
        return dequantize_fp8(qt, dtype)


def _groups(x: torch.Tensor, config: FP8Config) -> torch.Tensor:
    if config.granularity is FP8Granularity.TENSOR:
        return x.reshape(1, -1)
    if config.granularity is FP8Granularity.TOKEN:
        return x.reshape(-1, x.shape[-1])
    return x.reshape(-1, config.block_size)


def quantize_fp8(x: torch.Tensor, config: FP8Config = FP8Config(), *, amax=None, name: str = "tensor") -> QuantizedTensor:
    """`amax` (TENSOR only) fixes the scale from calibration instead of from `x` (static scales)."""
    check_float(x, name)
    check_finite(x, name)
    if config.granularity is FP8Granularity.BLOCK:
        check_blocks(x, config.block_size, name, f"FP8 with blocks of {config.block_size}")
    groups = _groups(x.float(), config)
    if amax is not None:
        if config.granularity is not FP8Granularity.TENSOR:
            raise ValueError(f"{name}: a fixed amax needs FP8Granularity.TENSOR")
        group_amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device).reshape(1)
    else:
        group_amax = groups.abs().amax(dim=-1)
    scale = group_amax / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    data = (groups / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return QuantizedTensor(data.reshape(x.shape), scale, None, tuple(x.shape), config)


def dequantize_fp8(qt: QuantizedTensor, dtype=torch.float32) -> torch.Tensor:
    groups = _groups(qt.data.float(), qt.config)
    return (groups * qt.scale.unsqueeze(-1)).reshape(qt.shape).to(dtype)
