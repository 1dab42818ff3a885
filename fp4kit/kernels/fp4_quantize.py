"""Fused quantizers: a bf16/fp16/fp32 tensor -> NVFP4 or MXFP4 packed codes + block scales, one pass.

The torch twins are `fp4kit.formats.quantize_nvfp4` / `quantize_mxfp4`; the kernels reproduce them
bit for bit (tests compare the uint8 views with no tolerance). What that takes, beyond copying the
formulas:

- every division the twin does is an IEEE division here (`div_rn`, div.rn.f32), in the same
  order (NVFP4 ENCODE: `x / (s / g)`, never `x * (g / s)`). That per-element division is what
  makes the NVFP4 kernel slower than the MXFP4 one (which multiplies by 2^-e). A reciprocal with
  one fma correction was tried and differed from the twin in a few bytes per 10^4 on the H100;
  `INTERPRET` is accepted for symmetry with the GEMM kernels;
- UE4M3 rounding of the block scale is done on the float32 bits (`_fp4_bits.f32_to_ue4m3_code`),
  not by a cast: the interpreter's fp8 cast is wrong, and the bits make the rule visible;
- E8M0 exponents (floor/ceil log2) come from the exponent field, subnormals included.

NVFP4 needs the tensor's absolute max for its global scale before any block can be encoded: pass
`amax` (a calibrated, static value: the usual case for activations) to keep it one pass over x;
without it `x.abs().amax()` is one more read of x.

Not covered by the kernels (the twin is used, see `fp4_quantize`): NVFP4's FOUR_OVER_SIX block
choice. Unlike the twins, the kernels do not check x for NaN/Inf (that would cost a pass and a
host sync): such inputs produce unspecified codes.
"""

from __future__ import annotations

import torch

from fp4kit.formats import (BlockChoice, GlobalScale, MXFP4Config, NVFP4Config, QuantizedTensor, ScaleRule,
                            nvfp4_global_scale, quantize_mxfp4, quantize_nvfp4)
from fp4kit.formats.checks import check_blocks, check_float

from .fp4_gemm import HAS_TRITON, _interpreting, use_triton

if HAS_TRITON:
    import triton

    from . import _fp4_quantize

# NVFP4 ENCODE: True divides each element by its block's s / g through a per-block reciprocal and
# a Markstein correction (`_fp4_quantize._div_by_block`) instead of an IEEE division per element.
# Bit-exact with the twin on the H100 (every finite bf16 value under four global scales, and the
# kernel tests), but not measurably faster there (146 vs 151 us on 64M elements: the NVFP4 call is
# dominated by its host-side global-scale ops, see BENCHMARKS.md), so the plain division stays.
NVFP4_RCP_DIV = False

_RULES = {ScaleRule.FLOOR: 0, ScaleRule.EVEN: 1, ScaleRule.CEIL: 2, ScaleRule.RCEIL: 3}


QUANT_ELEMS_PER_PROGRAM = {16: 4096, 32: 4096}  # by block size; H100 measurement in benchmarks/NOTES_fp4_gemm.md


def _blocks_per_program(block_size: int) -> int:
    """4 in the interpreter; on the GPU QUANT_ELEMS_PER_PROGRAM[block_size] elements per program."""
    return 4 if _interpreting() else QUANT_ELEMS_PER_PROGRAM[block_size] // block_size


def _flat(x: torch.Tensor, block_size: int, name: str, fmt: str) -> torch.Tensor:
    check_float(x, name)
    check_blocks(x, block_size, name, fmt)
    return x.contiguous().reshape(-1)


def quantize_nvfp4_triton(x: torch.Tensor, config: NVFP4Config = NVFP4Config(), *, amax=None,
                          name: str = "tensor") -> QuantizedTensor:
    """`formats.quantize_nvfp4` in one kernel (plus an amax reduction when `amax` is None)."""
    if config.block_choice is not BlockChoice.MAX6:
        raise NotImplementedError(f"{name}: the NVFP4 quantize kernel does MAX6 blocks only, not {config.block_choice}")
    flat = _flat(x, config.block_size, name, "NVFP4")
    tensor_amax = flat.abs().amax().float() if amax is None else torch.as_tensor(amax, dtype=torch.float32)
    g = nvfp4_global_scale(tensor_amax, config).to(x.device).reshape(1)
    nblocks = flat.numel() // 16
    packed = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=x.device)
    scale = torch.empty(nblocks, dtype=torch.uint8, device=x.device)
    zero_code = int(torch.tensor(config.zero_block_scale).to(torch.float8_e4m3fn).view(torch.uint8))
    blocks = _blocks_per_program(16)
    _fp4_quantize.nvfp4_quantize_kernel[(triton.cdiv(nblocks, blocks),)](
        flat, g, packed, scale, nblocks, GS_ENCODE=config.global_scale is GlobalScale.ENCODE,
        MIN_BLOCK_SCALE=float(config.min_block_scale), ZERO_SCALE_CODE=zero_code, SIGNED_ZERO=config.signed_zero,
        BLOCKS=blocks, INTERPRET=_interpreting(), RCP_DIV=NVFP4_RCP_DIV, num_warps=4)
    shape = tuple(x.shape)
    return QuantizedTensor(packed.reshape(*shape[:-1], shape[-1] // 2),
                           scale.view(torch.float8_e4m3fn).reshape(*shape[:-1], shape[-1] // 16), g, shape, config)


def quantize_mxfp4_triton(x: torch.Tensor, config: MXFP4Config = MXFP4Config(), *, name: str = "tensor") -> QuantizedTensor:
    """`formats.quantize_mxfp4` in one kernel."""
    flat = _flat(x, config.block_size, name, "MXFP4")
    nblocks = flat.numel() // 32
    packed = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=x.device)
    scale = torch.empty(nblocks, dtype=torch.uint8, device=x.device)
    blocks = _blocks_per_program(32)
    _fp4_quantize.mxfp4_quantize_kernel[(triton.cdiv(nblocks, blocks),)](
        flat, packed, scale, nblocks, RULE=_RULES[config.scale_rule], SIGNED_ZERO=config.signed_zero,
        BLOCKS=blocks, num_warps=4)
    shape = tuple(x.shape)
    return QuantizedTensor(packed.reshape(*shape[:-1], shape[-1] // 2),
                           scale.reshape(*shape[:-1], shape[-1] // 32), None, shape, config)


def fp4_quantize(x: torch.Tensor, config: NVFP4Config | MXFP4Config, *, amax=None, name: str = "tensor") -> QuantizedTensor:
    """Quantize with the kernel where it runs (CUDA, or the interpreter) and the format's twin elsewhere."""
    kernel_ok = use_triton(x) and not (isinstance(config, NVFP4Config) and config.block_choice is not BlockChoice.MAX6)
    if isinstance(config, NVFP4Config):
        if kernel_ok:
            return quantize_nvfp4_triton(x, config, amax=amax, name=name)
        return quantize_nvfp4(x, config, amax=amax, name=name)
    if isinstance(config, MXFP4Config):
        return quantize_mxfp4_triton(x, config, name=name) if kernel_ok else quantize_mxfp4(x, config, name=name)
    raise TypeError(f"{name}: fp4_quantize needs an NVFP4Config or MXFP4Config, got {type(config).__name__}")
