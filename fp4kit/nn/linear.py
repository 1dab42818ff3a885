"""`FP4Linear`: a linear layer whose weight is stored in NVFP4 or MXFP4.

Buffers carry compressed-tensors' names, so a state dict is already in the layout vLLM loads:

    weight_packed        uint8 [out, in/2]        two E2M1 codes per byte, low nibble first
    weight_scale         [out, in/block]          float8_e4m3fn (NVFP4) or uint8 E8M0 codes (MXFP4)
    weight_global_scale  float32 [1]              NVFP4 only (its meaning: the config's GlobalScale)
    bias                 kept from the original layer, in its dtype
    input_global_scale   float32 [1], only with NVFP4 input quantization (a static, calibrated scale)

With `input_config` set, the layer's input is quantized and dequantized before the matmul,
exactly as the serving engine will quantize it:
    W4A4 NVFP4  static per-tensor `input_global_scale`, per-block scales computed on the fly
                ("local" dynamic in compressed-tensors)
    W4A4 MXFP4  per-block E8M0 scales computed on the fly
    W4A8 FP8    E4M3 with one scale per token (row) computed on the fly: amax/448
                (compressed-tensors' FP8_DYNAMIC activations)

With `rotation` set (a `RotationConfig`), the layer computes (x R) Q(W R)^T: its input is rotated
online by the block Hadamard R = diag(s) (I (x) H_b) (see `rotation.py`), before the input
quantization and the matmul, and the stored weight is the quantized W R. R is rebuilt from
(block_size, random_signs, seed), kept as non-persistent buffers, so the state dict holds only the
compressed-tensors tensors above; the checkpoint's config carries the rotation (see `fp4kit.io`).

`forward` on CUDA calls the Triton W4A16 GEMM (`fp4kit.kernels.fp4_linear`, which reads these
buffers as they are); elsewhere it dequantizes the weight and calls `F.linear`, the torch twin the
kernels are tested against (same function up to the GEMM's accumulation order). Build one with
`FP4Linear.from_linear(linear, config)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fp4kit.formats import (FP8Config, FP8Granularity, MXFP4Config, NVFP4Config, QuantizedTensor, nvfp4_global_scale,
                            quantize, quantize_fp8, quantize_mxfp4, quantize_nvfp4)

InputConfig = NVFP4Config | MXFP4Config | FP8Config
from fp4kit.kernels import fp4_linear

from .rotation import InputRotation, RotatedLinear, RotationConfig


def round_input(x: torch.Tensor, config: InputConfig, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x rounded to the input format and back to x's dtype: what a W4A4 / W4A8 layer multiplies. NVFP4 uses
    the static per-tensor `global_scale` (calibrated); MXFP4 and FP8 (per token) need none."""
    if isinstance(config, NVFP4Config):
        qt = quantize_nvfp4(x, config, global_scale=global_scale, name="input")
    elif isinstance(config, FP8Config):
        qt = quantize_fp8(x, config, name="input")
    else:
        qt = quantize_mxfp4(x, config, name="input")
    return qt.dequantize(x.dtype)


class FP4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, config: NVFP4Config | MXFP4Config, *, bias: bool = True,
                 dtype: torch.dtype = torch.bfloat16, device=None, input_config: InputConfig | None = None,
                 rotation: RotationConfig | None = None, name: str = "linear"):
        super().__init__()
        if not isinstance(config, (NVFP4Config, MXFP4Config)):
            raise TypeError(f"FP4Linear needs an NVFP4Config or MXFP4Config, got {type(config).__name__}")
        bs = config.block_size
        if in_features % bs:
            raise ValueError(f"{name}: {config.name.upper()} needs in_features % {bs} == 0; got in_features={in_features}")
        self.in_features, self.out_features, self.config, self.dtype = in_features, out_features, config, dtype
        scale_dtype = torch.float8_e4m3fn if isinstance(config, NVFP4Config) else torch.uint8
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, in_features // bs, dtype=scale_dtype, device=device))
        if isinstance(config, NVFP4Config):
            self.register_buffer("weight_global_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.weight_global_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.input_config = input_config
        if input_config is not None and not isinstance(input_config, (NVFP4Config, MXFP4Config, FP8Config)):
            raise TypeError(f"input_config must be NVFP4Config, MXFP4Config, FP8Config or None, "
                            f"got {type(input_config).__name__}")
        if isinstance(input_config, FP8Config) and input_config.granularity is not FP8Granularity.TOKEN:
            raise ValueError("FP8 inputs (W4A8) are dynamic per token: use FP8Config(FP8Granularity.TOKEN)")
        if isinstance(input_config, NVFP4Config):
            self.register_buffer("input_global_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.input_global_scale = None
        self.rotation = None if rotation is None else InputRotation(in_features, rotation, device=device, name=name)

    @property
    def rotation_config(self) -> RotationConfig | None:
        return None if self.rotation is None else self.rotation.config

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: NVFP4Config | MXFP4Config, *, name: str = "linear",
                    amax=None, input_config: InputConfig | None = None,
                    weight: QuantizedTensor | None = None) -> "FP4Linear":
        """Quantize `linear.weight` with `config` (RTN), or take `weight` already quantized (GPTQ, scale
        search). `amax` sets a shared per-tensor amax (fused shards). A `RotatedLinear` (weight W R)
        gives an FP4Linear with the same online input rotation."""
        w = linear.weight.detach()
        rotation = linear.rotation.config if isinstance(linear, RotatedLinear) else None
        out = cls(linear.in_features, linear.out_features, config, bias=linear.bias is not None,
                  dtype=w.dtype if w.is_floating_point() else torch.bfloat16, device=w.device,
                  input_config=input_config, rotation=rotation, name=name)
        out.load_quantized(weight if weight is not None else quantize(linear.weight.detach(), config, amax=amax,
                                                                       name=f"{name}.weight"))
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.detach())
        return out

    def set_input_amax(self, amax) -> None:
        """Calibrated absolute max of this layer's inputs -> its static NVFP4 input_global_scale."""
        if not isinstance(self.input_config, NVFP4Config):
            raise ValueError("only NVFP4 input quantization has a static input_global_scale")
        self.input_global_scale.copy_(nvfp4_global_scale(amax, self.input_config).reshape(1))

    def load_quantized(self, qt: QuantizedTensor) -> None:
        if qt.shape != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight has shape {qt.shape}, layer is {(self.out_features, self.in_features)}")
        self.weight_packed.copy_(qt.data)
        self.weight_scale.copy_(qt.scale)
        if self.weight_global_scale is not None:
            self.weight_global_scale.copy_(qt.global_scale)

    def quantized_weight(self) -> QuantizedTensor:
        return QuantizedTensor(self.weight_packed, self.weight_scale, self.weight_global_scale,
                               (self.out_features, self.in_features), self.config)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype or self.dtype)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the activations (W4A4, W4A8); identity when the layer has no input_config."""
        if self.input_config is None:
            return x
        return round_input(x, self.input_config, self.input_global_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        if self.rotation is not None:
            x = self.rotation(x)  # x R, online (W R is what is stored)
        x = self.quantize_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.is_cuda:
            return fp4_linear(x, self.quantized_weight(), bias)
        return F.linear(x, self.dequantize_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        act = f", input={self.input_config.name}" if self.input_config is not None else ""
        act += "" if self.rotation is None else f", rotation={self.rotation.extra_repr()}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.config.name}{act}")
