"""INT8 weights with one float32 scale per row (symmetric, per output channel): W8A16's weight format.

    scale_n = amax_n / 127.5        q = clamp(round(w / scale_n), -128, 127)        w ~= q * scale_n

This is compressed-tensors' symmetric integer rule (`calculate_qparams`: scale = max|w| / (bit_range / 2)
with bit_range = 255; torchao's symmetric mapping is the same), so a row's largest magnitude lands on
+-127.5 and rounds to 127 or -128; `round` is torch's round-half-to-even, as theirs. An all-zero row gets
scale 1 (its codes are 0 whatever the scale).

Why fp4kit has it: the output head. An LLM's lm_head is the one large matrix where FP4's error shows
(perplexity of SmolLM2-135M / Gemma-3-270M with a quantized head: NVFP4 +9.7% / +7.6%, FP8 E4M3 per row
+1.4% / +0.5%, INT8 per row -0.1% / +0.1%; BENCHMARKS.md), and at decode it is a large share of the
bytes (Llama-3-8B: 1.05 GB of bf16 in a ~4.5 GB NVFP4 step). INT8 per row halves those bytes at a cost
the measurement cannot tell from noise; `fp4kit.kernels.int8_linear` runs it. A code times a bf16 activation is exact in
float32 (8 x 8 significant bits), and int8 codes are exact in bf16, so the kernel can feed the codes to
bf16 tensor cores unchanged and apply the scale once per output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .checks import check_finite, check_float
from .qtensor import QuantizedTensor

INT8_HALF_RANGE = 127.5  # (127 - (-128)) / 2


@dataclass(frozen=True)
class Int8Config:
    """Symmetric INT8 with one float32 scale per row (all dims but the last); no options yet."""

    name: ClassVar[str] = "int8"

    def quantize(self, x: torch.Tensor, *, amax=None, name: str = "tensor") -> QuantizedTensor:
        return quantize_int8(x, self, amax=amax, name=name)

    def dequantize(self, qt: QuantizedTensor, dtype=torch.float32) -> torch.Tensor:
        return dequantize_int8(qt, dtype)


def quantize_int8(x: torch.Tensor, config: Int8Config = Int8Config(), *, amax=None,
                  name: str = "tensor") -> QuantizedTensor:
    """x [..., K] float -> int8 codes [..., K] and float32 scales [rows] (`amax` is not supported: the
    scale is the row's own)."""
    if amax is not None:
        raise ValueError(f"{name}: INT8 per-row scales come from the rows; a fixed amax is not supported")
    check_float(x, name)
    check_finite(x, name)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: INT8 per-row quantization needs a tensor with a non-empty last dim, "
                         f"got shape {tuple(x.shape)}")
    rows = x.float().reshape(-1, x.shape[-1])
    scale = rows.abs().amax(dim=-1) / INT8_HALF_RANGE
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(rows / scale.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return QuantizedTensor(codes.reshape(x.shape), scale, None, tuple(x.shape), config)


def dequantize_int8(qt: QuantizedTensor, dtype=torch.float32) -> torch.Tensor:
    rows = qt.data.float().reshape(-1, qt.shape[-1])
    return (rows * qt.scale.unsqueeze(-1)).reshape(qt.shape).to(dtype)
