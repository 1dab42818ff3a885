"""Algorithms: pure tensor functions (scale search, GPTQ, rotations); `calibrate` is the one driver
that walks a model."""

from .gptq import GPTQConfig, gptq
from .scale_search import ScaleSearchConfig, scale_search

__all__ = ["GPTQConfig", "ScaleSearchConfig", "gptq", "scale_search"]
