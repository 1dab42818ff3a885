"""Modules: FP4Linear and the `quantize_` tree walk that swaps it in."""

from .linear import FP4Linear
from .quantize import DEFAULT_IGNORE, QuantizeReport, quantize_

__all__ = ["DEFAULT_IGNORE", "FP4Linear", "QuantizeReport", "quantize_"]
