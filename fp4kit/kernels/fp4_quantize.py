"""Fused quantizers: a bf16/fp16/fp32 tensor -> NVFP4 or MXFP4 packed codes + block scales, one pass.

The torch twins are `fp4kit.formats.quantize_nvfp4` / `quantize_mxfp4`; the kernels reproduce them
bit for bit (tests compare the uint8 views with no tolerance). What that takes, beyond copying the
formulas:

- every division the twin does is reproduced with its own rounding: torch's `2688 / amax` is
  `amax.reciprocal() * 2688` (`Tensor.__rtruediv__`), and `amax / 2688` is a true division on the CPU
  but a multiplication by RN(1/2688) on CUDA (a CPU-scalar divisor), so the kernel computes the
  global scale by the rule of the device the twin would use (that of the amax tensor). The NVFP4
  ENCODE per-element quotient x / (s / g) is RN(x / d) through a per-block reciprocal and one
  Markstein correction on the GPU (`_fp4_quantize._quotient`), an IEEE division (`div_rn`) per
  element in the interpreter (which does not fuse fma);
- UE4M3 rounding of the block scale is done on the float32 bits (`_fp4_bits.f32_to_ue4m3_code`),
  not by a cast: the interpreter's fp8 cast is wrong, and the bits make the rule visible;
- E8M0 exponents (floor/ceil log2) come from the exponent field, subnormals included.

The NVFP4 kernel gives each thread whole blocks (`_fp4_quantize.nvfp4_quantize_kernel`): on the
H100 it runs at ~90% of the copy bandwidth in a CUDA graph (64.2 us for 64M bf16 elements, 2026-11-23).

NVFP4 needs the tensor's absolute max for its global scale before any block can be encoded. Pass
`amax` (a calibrated, static value: the usual case for activations) to keep it one pass over x: a
float32 tensor on x's device is read by the kernel itself, a number travels as a kernel argument,
so the call is three `torch.empty`s and one launch, with no host sync (CUDA-graph capturable).
Without it, `nvfp4_amax` (a memset and one atomic-max reduction launch) reads x once more.

Not covered by the kernels (the twin is used, see `fp4_quantize`): NVFP4's FOUR_OVER_SIX block
choice. Unlike the twins, the kernels do not check x for NaN/Inf (that would cost a pass and a
host sync): such inputs produce unspecified codes.
"""

from __future__ import annotations

import functools

import torch

from fp4kit.formats import (BlockChoice, GlobalScale, MXFP4Config, NVFP4Config, QuantizedTensor, ScaleRule,
                            quantize_mxfp4, quantize_nvfp4)
from fp4kit.formats.checks import check_blocks, check_float

from .fp4_gemm import HAS_TRITON, _interpreting, use_triton

if HAS_TRITON:
    import triton

    from . import _fp4_quantize

# NVFP4 ENCODE: True divides each element by its block's s / g through a per-block reciprocal and
# a Markstein correction (`_fp4_quantize._quotient`: 1 FMUL + 2 FFMA per element) instead of an
# IEEE division per element (~10 SASS instructions with a MUFU.RCP each). Bit-exact with the twin on
# the H100 (kernel tests, and every finite bf16 value under several global scales in
# bench_fp4_gemm.py); the interpreter, which does not fuse fma, always divides.
NVFP4_RCP_DIV = True

_RULES = {ScaleRule.FLOOR: 0, ScaleRule.EVEN: 1, ScaleRule.CEIL: 2, ScaleRule.RCEIL: 3}


QUANT_ELEMS_PER_PROGRAM = {16: 2048, 32: 4096}  # by block size; H100 measurements in benchmarks/NOTES_fp4_gemm.md
QUANT_WARPS = 4  # NVFP4 kernel: warps per program (one thread per block; 2048 elements = 1 block per thread)
# Eviction policy of the NVFP4 kernel's x loads ("" or "evict_first"). Round 6 on the H100: evict_first
# was 2-3 us faster eager but not in a CUDA graph (64.5 vs 64.2 us), so it stays off.
NVFP4_EVICT = ""
# No amax given: the quantize launch takes x from the end (what the amax pass read last is still in L2):
# 106.7 vs 112.9 us in a graph on the H100 (round 6).
NVFP4_REVERSE_AFTER_AMAX = True


def _blocks_per_program(block_size: int) -> int:
    """4 in the interpreter; on the GPU QUANT_ELEMS_PER_PROGRAM[block_size] elements per program."""
    return 4 if _interpreting() else QUANT_ELEMS_PER_PROGRAM[block_size] // block_size


def _flat(x: torch.Tensor, block_size: int, name: str, fmt: str) -> torch.Tensor:
    check_float(x, name)
    check_blocks(x, block_size, name, fmt)
    return x.contiguous().reshape(-1)


@functools.cache
def _ue4m3_code(value: float) -> int:
    """The UE4M3 byte of a config constant (cached: a torch cast per call was one of the host ops)."""
    return int(torch.tensor(value).to(torch.float8_e4m3fn).view(torch.uint8))


AMAX_ELEMS_PER_PROGRAM = 16384  # abs-max pass: elements per program (one atomic each)


def nvfp4_amax(flat: torch.Tensor) -> torch.Tensor:
    """max |x| of a flat tensor as a float32 [1] on its device: a memset and one reduction launch
    (each program folds its max in with an atomic max), no host sync."""
    amax = torch.zeros(1, dtype=torch.float32, device=flat.device)
    elems = 1024 if _interpreting() else AMAX_ELEMS_PER_PROGRAM
    _fp4_quantize.abs_max_kernel[(triton.cdiv(flat.numel(), elems),)](
        flat, amax, flat.numel(), ELEMS=elems, TILE=min(elems, 4096), num_warps=8)
    return amax


def _amax_args(amax, flat: torch.Tensor):
    """(pointer tensor, float32 scalar, read-from-pointer flag) for the kernel, without a host sync.

    A float32 tensor on x's device is read by the kernel (no torch op); a Python number or a CPU
    tensor travels as a float32 kernel argument (rounded to float32 as the twin's as_tensor does)."""
    if isinstance(amax, torch.Tensor):
        if amax.numel() != 1:
            raise ValueError(f"amax must hold one value, got shape {tuple(amax.shape)}")
        if amax.device == flat.device:
            return (amax if amax.dtype == torch.float32 else amax.float()), 0.0, True
        amax = float(amax.float())
    return flat, float(torch.tensor(float(amax), dtype=torch.float32)), False


def quantize_nvfp4_triton(x: torch.Tensor, config: NVFP4Config = NVFP4Config(), *, amax=None,
                          name: str = "tensor") -> QuantizedTensor:
    """`formats.quantize_nvfp4` in one kernel (plus the `nvfp4_amax` pass when `amax` is None).

    The global scale is computed inside the kernel from `amax` (a float32 device tensor, a number,
    or None for the tensor's own max), so a call is three `torch.empty`s and one launch."""
    if config.block_choice is not BlockChoice.MAX6:
        raise NotImplementedError(f"{name}: the NVFP4 quantize kernel does MAX6 blocks only, not {config.block_choice}")
    flat = _flat(x, config.block_size, name, "NVFP4")
    amax_t, amax_v, from_ptr = _amax_args(nvfp4_amax(flat) if amax is None else amax, flat)
    nblocks = flat.numel() // 16
    packed = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=x.device)
    scale = torch.empty(nblocks, dtype=torch.uint8, device=x.device)
    g = torch.empty(1, dtype=torch.float32, device=x.device)
    blocks = _blocks_per_program(16)
    _fp4_quantize.nvfp4_quantize_kernel[(triton.cdiv(nblocks, blocks),)](
        flat, amax_t, amax_v, g, packed.view(torch.int32), scale, nblocks, AMAX_FROM_PTR=from_ptr,
        GS_ENCODE=config.global_scale is GlobalScale.ENCODE, MIN_BLOCK_SCALE=float(config.min_block_scale),
        ZERO_SCALE_CODE=_ue4m3_code(config.zero_block_scale), SIGNED_ZERO=config.signed_zero,
        BLOCKS=blocks, INTERPRET=_interpreting(), DECODE_BY_RECIPROCAL=from_ptr and amax_t.is_cuda,
        RCP_DIV=NVFP4_RCP_DIV, REVERSE=amax is None and NVFP4_REVERSE_AFTER_AMAX, EVICT=NVFP4_EVICT,
        num_warps=QUANT_WARPS)
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
