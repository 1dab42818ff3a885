"""FP4 storage for weights that are not `nn.Linear`: fused 3-D expert tensors of MoE layers.

Transformers' MoE classes keep all experts in one parameter (gpt-oss: `gate_up_proj` [E, H, 2I];
Qwen3-MoE in transformers 5: [E, 2I, H]) and index it in their own `forward`. Rather than rewrite
each class's forward, we use PyTorch's parametrization mechanism (`torch.nn.utils.parametrize`):
the parameter becomes a computed attribute whose value is the dequantized FP4 tensor, and the
module's forward runs unchanged. Storage is the packed codes and scales (buffers of the
parametrization); the original parameter is replaced by an empty placeholder.

    FP4Parametrization(qt, transpose)   value = dequantize(qt) (then .transpose(-1, -2) if asked)

`transpose` exists because FP4 blocks run along the reduction dim (the input features) and
gpt-oss stores its expert weights as [E, in, out]: the quantized tensor is [E, out, in] and the
module sees its transpose.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from fp4kit.formats import MXFP4Config, NVFP4Config, QuantizedTensor


class FP4Parametrization(nn.Module):
    def __init__(self, qt: QuantizedTensor, *, transpose: bool = False, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.config, self.shape, self.transpose, self.dtype = qt.config, qt.shape, transpose, dtype
        self.register_buffer("packed", qt.data)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("global_scale", qt.global_scale)

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.packed, self.scale, self.global_scale, self.shape, self.config)

    def forward(self, _placeholder: torch.Tensor) -> torch.Tensor:
        w = self.quantized().dequantize(self.dtype)
        return w.transpose(-1, -2) if self.transpose else w

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value.new_empty(0)  # the FP4 buffers are the storage; keep no float copy


def register_fp4(module: nn.Module, name: str, qt: QuantizedTensor, *, transpose: bool = False,
                 dtype: torch.dtype | None = None) -> FP4Parametrization:
    """Make `module.<name>` the dequantized value of `qt` (FP4 storage, module code unchanged)."""
    if not isinstance(qt.config, (NVFP4Config, MXFP4Config)):
        raise TypeError(f"{name}: FP4 storage needs an NVFP4 or MXFP4 quantized tensor")
    current = getattr(module, name)
    expect = tuple(current.shape[:-2]) + (current.shape[-1], current.shape[-2]) if transpose else tuple(current.shape)
    if tuple(qt.shape) != expect:
        raise ValueError(f"{name}: quantized shape {qt.shape} does not fit parameter {tuple(current.shape)} "
                         f"(transpose={transpose})")
    p = FP4Parametrization(qt, transpose=transpose, dtype=dtype or current.dtype)
    parametrize.register_parametrization(module, name, p, unsafe=True)
    return p
