"""PTQ recipes: one call that quantizes a model the way `fp4kit quantize --method ...` does.

    report = apply_ptq(model, NVFP4Config(), PTQRecipe(PTQMethod.MR_GPTQ), batches=batches)

| method   | weights                                                                 | needs batches |
|----------|-------------------------------------------------------------------------|---------------|
| RTN      | round to nearest, scales from each block's max                          | no            |
| MSE      | per-block scale search (`scale_search`)                                 | no            |
| GPTQ     | GPTQ on the input Hessians, RTN scales fixed before the sweep           | yes           |
| MR_GPTQ  | block-Hadamard input rotation, then GPTQ on the rotated Hessians with   | yes           |
|          | MSE-searched scales fixed before the sweep (Egiazarian et al. 2025)      |               |
| SIGNROUND| per decoder block, learned rounding offsets and scale clipping by signSGD| yes           |
|          | on the block's output error (Cheng et al. 2023, `signround`), from RTN   |               |
| MR_SIGNROUND | MR-GPTQ's rotation and MSE scales as the start, then SignRound       | yes           |

MR-GPTQ, step by step (Egiazarian, Castro, Kurtic, Alistarh et al., "Bridging the Gap Between
Promise and Performance for Microscaling FP4 Quantization", arXiv 2509.23202):
1. Rotate (`rotations.rotate_model_`): every layer to be quantized computes (x R)(W R)^T with
   R = diag(s)(I (x) H_b). o_proj's R is folded into v_proj per head; the other layers
   (q/k/v, gate/up, down) become `RotatedLinear`s that rotate their input online. The float
   model still computes the same function.
2. Calibrate: the hooks see x R, so each Hessian is R^T H R, the Hessian of W R.
3. Scales: per-block MSE scale search on W R (importance-free), fixed before the sweep.
4. GPTQ sweeps the columns of W R against R^T H R; `FP4Linear(rotation=...)` keeps R online.
A `rotation` set on RTN, MSE or GPTQ rotates the same way without the other MR-GPTQ choices.
SignRound (`signround.sequential_signround`) walks the decoder blocks itself (always sequential, resumable
with `state_dir`); it simulates W4A16 only, so it takes no `activations`.

Activations: `activations` is the input config of every quantized layer (None: W4A16; the weight
format: W4A4; `FP8Config(FP8Granularity.TOKEN)`: W4A8). NVFP4 inputs need static per-tensor input
scales: pass `input_amax` ({layer: amax}, observed on what the weight multiplies, i.e. x R when
rotating), or pass `batches` and they are observed here after the rotation.

Runs on CPU or CUDA: every tensor stays on the model's device (Hessians on the layer's device).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from fp4kit.formats import FP8Config, MXFP4Config, NVFP4Config
from fp4kit.nn import DEFAULT_IGNORE, QuantizeReport, quantize_

from .calibrate import (apply_gptq, apply_scale_search, collect_hessians, eligible_linears, input_rounding,
                        observe_layer_input_amax)
from .gptq import GPTQConfig
from .rotations import RotationConfig, rotate_model_
from .scale_search import ScaleSearchConfig
from .sequential import sequential_gptq
from .signround import SignRoundConfig, sequential_signround


def default_rotation(config: NVFP4Config | MXFP4Config) -> RotationConfig:
    """MR-GPTQ's default block: the format's own (16 NVFP4, 32 MXFP4). It divides every layer the format
    can quantize (128 does not fit SmolLM2's hidden size 576), and the SmolLM2 sweep in docs/ptq.md
    (benchmarks/ptq_smollm2.py --mr-gptq) backs the choice."""
    return RotationConfig(block_size=config.block_size)


class PTQMethod(enum.Enum):
    """RTN: round to nearest. MSE: per-block scale search. GPTQ: Hessian-aware rounding with fixed
    scales. MR_GPTQ: block-Hadamard rotation + MSE scales + GPTQ on the rotated Hessian."""

    RTN = "rtn"
    MSE = "mse"
    GPTQ = "gptq"
    MR_GPTQ = "mr-gptq"
    SIGNROUND = "signround"
    MR_SIGNROUND = "mr-signround"

    @property
    def needs_calibration(self) -> bool:
        return self not in (PTQMethod.RTN, PTQMethod.MSE)

    @property
    def rotates(self) -> bool:
        """Methods that rotate by default (`default_rotation`) when the recipe gives no rotation."""
        return self in (PTQMethod.MR_GPTQ, PTQMethod.MR_SIGNROUND)

    @property
    def signround(self) -> bool:
        return self in (PTQMethod.SIGNROUND, PTQMethod.MR_SIGNROUND)


@dataclass(frozen=True)
class PTQRecipe:
    """`method`; `rotation`: block-Hadamard input rotation (MR_GPTQ: None means `default_rotation(format)`);
    `gptq`: GPTQ settings (MR_GPTQ adds the MSE scale search when `gptq.scale_search` is None);
    `scale_search`: the MSE method's search; `sequential`: GPTQ decoder layer by decoder layer;
    `state_dir`: where a sequential run saves finished layers (resumable); `signround`: SignRound settings
    (MR_SIGNROUND starts from `scale_search`'s MSE scales when `signround.init_scales` is None)."""

    method: PTQMethod = PTQMethod.RTN
    rotation: RotationConfig | None = None
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    scale_search: ScaleSearchConfig = field(default_factory=ScaleSearchConfig)
    sequential: bool = False
    state_dir: str | None = None
    signround: SignRoundConfig = field(default_factory=SignRoundConfig)

    def __post_init__(self):
        if not isinstance(self.method, PTQMethod):
            raise TypeError(f"PTQRecipe.method must be a PTQMethod, got {self.method!r}")
        if self.rotation is not None and not isinstance(self.rotation, RotationConfig):
            raise TypeError(f"PTQRecipe.rotation must be a RotationConfig or None, got {type(self.rotation).__name__}")
        if not isinstance(self.gptq, GPTQConfig):
            raise TypeError(f"PTQRecipe.gptq must be a GPTQConfig, got {type(self.gptq).__name__}")
        if not isinstance(self.scale_search, ScaleSearchConfig):
            raise TypeError(f"PTQRecipe.scale_search must be a ScaleSearchConfig, got {type(self.scale_search).__name__}")
        if not isinstance(self.signround, SignRoundConfig):
            raise TypeError(f"PTQRecipe.signround must be a SignRoundConfig, got {type(self.signround).__name__}")
        if (self.sequential or self.state_dir) and not self.method.needs_calibration:
            raise ValueError(f"PTQRecipe: sequential/state_dir apply to calibrated methods, not {self.method.name}")
        if self.method is PTQMethod.MR_SIGNROUND and self.signround.init_scales is None:
            object.__setattr__(self, "signround", replace(self.signround, init_scales=self.scale_search))
        if self.method is PTQMethod.MR_GPTQ:
            if self.gptq.scale_search is None:
                object.__setattr__(self, "gptq", replace(self.gptq, scale_search=self.scale_search))


def apply_ptq(model: nn.Module, config: NVFP4Config | MXFP4Config, recipe: PTQRecipe = PTQRecipe(), *,
              batches: list | None = None, activations: NVFP4Config | MXFP4Config | FP8Config | None = None,
              input_amax: dict | None = None, filter_fn: Callable[[nn.Module, str], bool] | None = None,
              ignore: tuple[str, ...] = DEFAULT_IGNORE, progress: bool = True) -> QuantizeReport:
    """Quantize `model` in place with `recipe`; return the report (quantized, excluded, rotated layers).

    `batches`: calibration token ids [B, S] (or dicts of model kwargs) on the model's device; needed by
    GPTQ/MR_GPTQ and by NVFP4 activations without `input_amax`. See the module docstring.
    """
    if not isinstance(recipe, PTQRecipe):
        raise TypeError(f"apply_ptq needs a PTQRecipe, got {type(recipe).__name__}")
    batches = None if batches is None else list(batches)
    needs_amax = isinstance(activations, NVFP4Config) and input_amax is None
    if (recipe.method.needs_calibration or needs_amax) and not batches:
        what = recipe.method.name if recipe.method.needs_calibration else "NVFP4 activations without input_amax"
        raise ValueError(f"apply_ptq: {what} needs calibration batches")
    select = dict(filter_fn=filter_fn, ignore=ignore)
    rotated = {}
    rotation = recipe.rotation
    if recipe.gptq.rounded_inputs and (activations is None or not recipe.method.needs_calibration
                                       or recipe.method.signround):
        raise ValueError("apply_ptq: GPTQConfig.rounded_inputs builds GPTQ Hessians from the rounded activations; it "
                         "needs method gptq or mr-gptq and activations (W4A4 / W4A8)")
    if recipe.method.signround and activations is not None:
        raise ValueError(f"apply_ptq: {recipe.method.value} simulates W4A16 only; activations must be None, "
                         f"got {type(activations).__name__}")
    if rotation is None and recipe.method.rotates:
        rotation = default_rotation(config)
    if rotation is not None:
        rotated = rotate_model_(model, config, rotation, **select)
    extra = {} if activations is None else {"activations": activations}
    if isinstance(activations, NVFP4Config):
        if input_amax is None:
            names = list(eligible_linears(model, config, filter_fn, ignore))
            input_amax = observe_layer_input_amax(model, lambda: _run(model, batches), names)
        extra["input_amax"] = input_amax
    report = _quantize(model, config, recipe, batches, select, extra, progress)
    report.rotated = rotated
    return report


def _run(model, batches):
    with torch.no_grad():
        for b in batches:
            model(**b) if isinstance(b, dict) else model(b)


def _quantize(model, config, recipe: PTQRecipe, batches, select, extra, progress) -> QuantizeReport:
    if recipe.method is PTQMethod.RTN:
        return quantize_(model, config, progress=progress, **select, **extra)
    if recipe.method is PTQMethod.MSE:
        return apply_scale_search(model, config, recipe.scale_search, progress=progress, **select, **extra)
    if (recipe.sequential or recipe.state_dir or recipe.method.signround) and select["filter_fn"] is not None:
        raise ValueError(f"apply_ptq: sequential {recipe.method.value} does not take a filter_fn; use ignore patterns")
    if recipe.method.signround:
        result = sequential_signround(model, batches, config, recipe.signround, state_dir=recipe.state_dir,
                                      ignore=select["ignore"], progress=progress)
        if progress:
            print(result.summary())
        return result.report
    if recipe.sequential or recipe.state_dir:
        return sequential_gptq(model, batches, config, recipe.gptq, state_dir=recipe.state_dir,
                               ignore=select["ignore"], progress=progress, **extra).report
    rounding = {}
    if recipe.gptq.rounded_inputs:
        names = eligible_linears(model, config, select["filter_fn"], select["ignore"])
        rounding = input_rounding(extra.get("activations"), extra.get("input_amax"), names)
    hessians = collect_hessians(model, batches, config, progress=progress, round_inputs=rounding, **select)
    return apply_gptq(model, config, hessians, recipe.gptq, progress=progress, **select, **extra).report
