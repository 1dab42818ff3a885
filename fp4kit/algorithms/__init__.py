"""Algorithms: pure tensor functions (scale search, GPTQ, rotations); `calibrate` is the one driver
that walks a model."""

from .calibrate import CalibrationConfig, GPTQResult, Hessian, apply_gptq, apply_scale_search, collect_hessians
from .gptq import GPTQConfig, gptq
from .rotations import RotationConfig, hadamard, rotate_input, rotate_linear_pair, rotate_output, rotation_matrix
from .scale_search import ScaleSearchConfig, scale_search
from .sequential import sequential_gptq

__all__ = [
    "CalibrationConfig", "GPTQConfig", "GPTQResult", "Hessian", "RotationConfig", "ScaleSearchConfig", "apply_gptq",
    "apply_scale_search", "collect_hessians", "gptq", "hadamard", "rotate_input", "rotate_linear_pair",
    "rotate_output", "rotation_matrix", "scale_search", "sequential_gptq",
]
