"""`QuantizedTensor`: what a quantizer returns, and the one object the rest of fp4kit passes around.

    data          FP4: uint8 [..., K/2], two E2M1 codes per byte (see `e2m1`); FP8: float8_e4m3fn [..., K]
    scale         one per block: float8_e4m3fn (NVFP4), uint8 E8M0 codes (MXFP4), float32 (FP8)
    global_scale  float32 scalar (NVFP4 only; its meaning depends on the config's GlobalScale)
    shape         the original tensor's shape
    config        the format config that produced it; it knows how to dequantize

It is a frozen value: quantize once, then dequantize, store, or hand it to a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    data: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None
    shape: tuple[int, ...]
    config: Any

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.config.dequantize(self, dtype)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        extra = 0 if self.global_scale is None else self.global_scale.numel() * self.global_scale.element_size()
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size() + extra

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)

    def to(self, device) -> "QuantizedTensor":
        gs = None if self.global_scale is None else self.global_scale.to(device)
        return QuantizedTensor(self.data.to(device), self.scale.to(device), gs, self.shape, self.config)
