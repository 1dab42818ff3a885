"""Numerics: exact, pure-torch encoders and decoders for FP4 (NVFP4, MXFP4), FP8 and INT8 (per-row weights).

Everything else in fp4kit is built on these functions; they are the specification that kernels
and checkpoints are tested against, bit for bit.
"""

from .checks import check_finite, check_float, check_quantizable
from .e2m1 import E2M1_MAX, E2M1_VALUES, e2m1_codes_to_float, e2m1_table, pack_codes, round_to_e2m1_codes, unpack_codes
from .fp8 import FP8Config, FP8Granularity, dequantize_fp8, quantize_fp8
from .int8 import Int8Config, dequantize_int8, quantize_int8
from .mxfp4 import MXFP4Config, ScaleRule, dequantize_mxfp4, quantize_mxfp4, shared_exponent
from .nvfp4 import BlockChoice, GlobalScale, NVFP4Config, dequantize_nvfp4, nvfp4_global_scale, quantize_nvfp4
from .qtensor import QuantizedTensor
from .scales import E4M3_MAX, E8M0_BIAS, e8m0_to_float, round_to_ue4m3

FP4Config = NVFP4Config | MXFP4Config


def quantize(x, config, *, amax=None, name: str = "tensor") -> QuantizedTensor:
    """Quantize `x` with any format config (NVFP4Config, MXFP4Config, FP8Config, Int8Config)."""
    return config.quantize(x, amax=amax, name=name)


def sqnr_db(reference, approx) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    import math

    ref = reference.double()
    noise = (ref - approx.double()).square().sum().item()
    signal = ref.square().sum().item()
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


__all__ = [
    "BlockChoice", "E2M1_MAX", "E2M1_VALUES", "E4M3_MAX", "E8M0_BIAS", "FP4Config", "FP8Config", "FP8Granularity",
    "GlobalScale", "Int8Config", "MXFP4Config", "NVFP4Config", "QuantizedTensor", "ScaleRule", "check_finite", "check_float",
    "check_quantizable", "dequantize_fp8", "dequantize_int8", "dequantize_mxfp4", "dequantize_nvfp4", "e2m1_codes_to_float",
    "e2m1_table", "e8m0_to_float", "nvfp4_global_scale", "pack_codes", "quantize", "quantize_fp8", "quantize_int8", "quantize_mxfp4",
    "quantize_nvfp4", "round_to_e2m1_codes", "round_to_ue4m3", "shared_exponent", "sqnr_db", "unpack_codes",
]
