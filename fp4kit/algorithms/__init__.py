"""Algorithms: pure tensor functions (scale search, GPTQ, rotations, SignRound's learned rounding); `calibrate`
and `sequential` walk a model (`signround.sequential_signround` walks its decoder blocks)."""

from .calibrate import CalibrationConfig, GPTQResult, Hessian, apply_gptq, apply_scale_search, collect_hessians
from .gptq import GPTQConfig, gptq
from .recipe import PTQMethod, PTQRecipe, apply_ptq
from .rotations import (RotationConfig, fold_attention, hadamard, rotate_input, rotate_linear_pair, rotate_model_,
                        rotate_output, rotation_matrix)
from .scale_search import ScaleSearchConfig, scale_search
from .sequential import sequential_gptq
from .signround import SignRoundConfig, SignRoundResult, sequential_signround

__all__ = [
    "CalibrationConfig", "GPTQConfig", "GPTQResult", "Hessian", "PTQMethod", "PTQRecipe", "RotationConfig",
    "apply_ptq", "fold_attention", "rotate_model_", "ScaleSearchConfig", "apply_gptq",
    "apply_scale_search", "collect_hessians", "gptq", "hadamard", "rotate_input", "rotate_linear_pair",
    "rotate_output", "rotation_matrix", "scale_search", "sequential_gptq", "SignRoundConfig", "SignRoundResult",
    "sequential_signround",
]
