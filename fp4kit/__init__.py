"""fp4kit: LLMs in 4-bit floating point (NVFP4, MXFP4).

Layers, bottom up (imports only go down): formats (exact numerics) < kernels < nn < algorithms <
io < data < train < eval < cli.
"""

__version__ = "0.1.0"

from fp4kit.formats import (  # noqa: E402
    BlockChoice, FP8Config, FP8Granularity, GlobalScale, MXFP4Config, NVFP4Config, QuantizedTensor, ScaleRule,
    quantize,
)
from fp4kit.nn import FP4Linear, QuantizeReport, quantize_  # noqa: E402

__all__ = [
    "BlockChoice", "FP4Linear", "FP8Config", "FP8Granularity", "GlobalScale", "MXFP4Config", "NVFP4Config",
    "QuantizeReport", "QuantizedTensor", "ScaleRule", "__version__", "quantize", "quantize_",
]
