"""NVFP4: E2M1 elements in blocks of 16 along the last dim, a UE4M3 scale per block, and one
float32 scale per tensor.

    w  ~=  q * s_block * (per-tensor factor)        q in E2M1, s_block in UE4M3 (<= 448)

The per-tensor scale exists because UE4M3 spans only 2^-9..448: it moves the block scales of the
whole tensor into that range. Two published conventions store it differently:

- GlobalScale.ENCODE (compressed-tensors, what vLLM reads as `weight_global_scale`):
      g = 448 * 6 / amax
      s = ue4m3(min((amax_b / 6) * g, 448));   a scale that rounds to 0 becomes `zero_block_scale`
      q = e2m1(x / (s / g));                  w = q * (s / g)
- GlobalScale.DECODE (NVIDIA ModelOpt's `weight_scale_2`, torchao's `per_tensor_scale`):
      g = amax / (448 * 6)
      s = ue4m3(clamp((amax_b / 6) / g, min_block_scale, 448))
      q = e2m1(x * ((1 / g) / s));            w = q * s * g

The two give the same values up to float rounding of the per-tensor factor; they are kept apart
because each library's bytes must be reproduced exactly, down to the order of its divisions.
A tensor of zeros (or any amax whose g is not a finite nonzero float) gets g = 1.

Options that the libraries disagree on:
- `min_block_scale`: torchao clamps block scales to the smallest normal UE4M3, 2^-6; compressed-
  tensors lets them go subnormal (0 here means no clamp).
- `zero_block_scale`: what a block scale that rounds to 0 is stored as. compressed-tensors writes
  0.125 (its "eps" for FP8) so nothing divides by zero; 0.0 stores zero and flushes the block.

Four over six (Cook et al. 2025, "4/6"): for each block try scaling its max to 6 and to 4 and keep
the one whose dequantized block has the lower squared error. Mapping a max to 4 leaves headroom
that the coarse 4..6 step would otherwise waste. Block scales of the "4" choice are 1.5x larger,
so the per-tensor scale uses 256 in place of 448 to keep them inside UE4M3.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

import torch

from .checks import check_quantizable
from .e2m1 import E2M1_MAX, e2m1_codes_to_float, pack_codes, round_to_e2m1_codes, unpack_codes
from .qtensor import QuantizedTensor
from .scales import E4M3_MAX, round_to_ue4m3


class GlobalScale(enum.Enum):
    """How the float32 per-tensor scale is defined (see the module docstring for the formulas)."""

    ENCODE = "encode"  # g = 448*6/amax, applied as s/g        (compressed-tensors, vLLM)
    DECODE = "decode"  # g = amax/(448*6), applied as s*g      (ModelOpt, torchao)


class BlockChoice(enum.Enum):
    """Which FP4 value a block's absolute max maps to."""

    MAX6 = "6"  # always 6: the standard NVFP4 recipe
    FOUR_OVER_SIX = "4/6"  # 4 or 6 per block, whichever has the lower squared error


@dataclass(frozen=True)
class NVFP4Config:
    global_scale: GlobalScale = GlobalScale.ENCODE
    min_block_scale: float = 0.0
    zero_block_scale: float = 0.125
    block_choice: BlockChoice = BlockChoice.MAX6
    signed_zero: bool = True

    name: ClassVar[str] = "nvfp4"
    block_size: ClassVar[int] = 16

    def __post_init__(self):
        for field in ("min_block_scale", "zero_block_scale"):
            v = getattr(self, field)
            if not (0.0 <= v <= E4M3_MAX):
                raise ValueError(f"NVFP4Config.{field} must be in [0, 448], got {v}")
            if float(torch.tensor(v).to(torch.float8_e4m3fn).float()) != v:
                raise ValueError(f"NVFP4Config.{field}={v} is not representable in UE4M3")

    @classmethod
    def compressed_tensors(cls) -> "NVFP4Config":
        """Bit-exact with compressed-tensors / llm-compressor (the default)."""
        return cls()

    @classmethod
    def torchao(cls) -> "NVFP4Config":
        """Bit-exact with torchao's `nvfp4_quantize` with a per-tensor scale (ModelOpt's convention)."""
        return cls(global_scale=GlobalScale.DECODE, min_block_scale=2.0**-6, zero_block_scale=0.0)

    def quantize(self, x: torch.Tensor, *, amax=None, name: str = "tensor") -> QuantizedTensor:
        return quantize_nvfp4(x, self, amax=amax, name=name)

    def dequantize(self, qt: QuantizedTensor, dtype=torch.float32) -> torch.Tensor:
        return dequantize_nvfp4(qt, dtype)

    def effective_block_scale(self, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
        """The float32 factor each block's codes are multiplied by."""
        s = scale.float()
        return s / global_scale if self.global_scale is GlobalScale.ENCODE else s * global_scale


def nvfp4_global_scale(amax: torch.Tensor, config: NVFP4Config) -> torch.Tensor:
    """Per-tensor float32 scale from the tensor's absolute max (shape [])."""
    e4m3_max = 256.0 if config.block_choice is BlockChoice.FOUR_OVER_SIX else E4M3_MAX
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(())
    if config.global_scale is GlobalScale.ENCODE:
        g = (e4m3_max * E2M1_MAX) / amax.clamp(min=torch.finfo(torch.float32).tiny)
    else:
        g = amax / (e4m3_max * E2M1_MAX)
    ok = torch.isfinite(g) & (g != 0)
    return torch.where(ok, g, torch.ones_like(g))


def _encode_blocks(blocks, amax_b, g, config: NVFP4Config, fp4_max: float):
    """One candidate: block scales for `amax_b -> fp4_max`, and the codes under them."""
    if config.global_scale is GlobalScale.ENCODE:
        s = (amax_b / fp4_max) * g
    else:
        s = (amax_b / fp4_max) / g
    if config.min_block_scale > 0:
        s = s.clamp(min=config.min_block_scale)
    s8 = round_to_ue4m3(s)
    s32 = s8.float()
    zero = s32 == 0
    if config.zero_block_scale:
        s8 = torch.where(zero, torch.tensor(config.zero_block_scale).to(s8.dtype), s8)
        s32 = s8.float()
        zero = torch.zeros_like(zero)
    if config.global_scale is GlobalScale.ENCODE:
        scaled = blocks / (s32 / g).unsqueeze(-1)
    else:
        scaled = blocks * ((1.0 / g) / s32).unsqueeze(-1)
    scaled = torch.where(zero.unsqueeze(-1), torch.zeros_like(scaled), scaled)
    codes = round_to_e2m1_codes(scaled.clamp(-E2M1_MAX, E2M1_MAX), signed_zero=config.signed_zero)
    return s8, codes


def quantize_nvfp4(x: torch.Tensor, config: NVFP4Config = NVFP4Config(), *, amax=None,
                   global_scale: torch.Tensor | None = None, name: str = "tensor") -> QuantizedTensor:
    """Quantize `x` (any rank, last dim % 16 == 0) to NVFP4.

    `amax` overrides the tensor's own absolute max for the per-tensor scale: fused shards (q/k/v,
    gate/up) pass their joint amax so they share one global scale, as vLLM requires.
    `global_scale` gives the per-tensor scale itself (a static, calibrated activation scale).
    """
    check_quantizable(x, config.block_size, name, "NVFP4")
    shape = tuple(x.shape)
    blocks = x.float().reshape(*shape[:-1], shape[-1] // config.block_size, config.block_size)
    amax_b = blocks.abs().amax(dim=-1)
    if global_scale is not None:
        g = global_scale.float().reshape(()).to(x.device)
    else:
        g = nvfp4_global_scale(blocks.abs().amax() if amax is None else amax, config).to(x.device)

    s8, codes = _encode_blocks(blocks, amax_b, g, config, E2M1_MAX)
    if config.block_choice is BlockChoice.FOUR_OVER_SIX:
        s8_4, codes_4 = _encode_blocks(blocks, amax_b, g, config, 4.0)
        err6 = _block_sq_error(blocks, codes, s8, g, config)
        err4 = _block_sq_error(blocks, codes_4, s8_4, g, config)
        pick4 = err4 < err6
        s8 = torch.where(pick4, s8_4, s8)
        codes = torch.where(pick4.unsqueeze(-1), codes_4, codes)
    packed = pack_codes(codes.reshape(*shape[:-1], shape[-1]))
    return QuantizedTensor(packed, s8, g.reshape(1), shape, config)


def _block_sq_error(blocks, codes, s8, g, config):
    deq = e2m1_codes_to_float(codes) * config.effective_block_scale(s8, g).unsqueeze(-1)
    return (deq - blocks).square().sum(dim=-1)


def dequantize_nvfp4(qt: QuantizedTensor, dtype=torch.float32) -> torch.Tensor:
    config: NVFP4Config = qt.config
    values = e2m1_codes_to_float(unpack_codes(qt.data))
    values = values.reshape(*qt.shape[:-1], -1, config.block_size)
    factor = config.effective_block_scale(qt.scale, qt.global_scale.reshape(()))
    return (values * factor.unsqueeze(-1)).reshape(qt.shape).to(dtype)
