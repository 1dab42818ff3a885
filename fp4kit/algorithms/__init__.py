"""Algorithms: pure tensor functions (scale search, GPTQ, rotations); `calibrate` is the one driver
that walks a model."""

from .scale_search import ScaleSearchConfig, scale_search

__all__ = ["ScaleSearchConfig", "scale_search"]
