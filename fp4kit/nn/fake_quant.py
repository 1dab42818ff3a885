"""Fake quantization for FP4 quantization-aware training (QAT): train float weights that will be FP4.

The training weight stays a float ("master") tensor, FP32 by default. Each forward rounds it to the
FP4 grid and back, so the network computes with exactly the values it will hold after export:

    forward:   w_q = dequantize(quantize(w))        NVFP4 or MXFP4, the same code quantize_() runs
    backward:  dL/dw = dL/dw_q                       straight-through estimator (STE)

Rounding has zero gradient almost everywhere, so the STE passes the gradient through as if the
rounding were the identity; the master weight accumulates updates far smaller than one FP4 step
until they flip a code. The identity is applied everywhere, also to the rare values a scale rule
clips (MXFP4 FLOOR/EVEN): DeepSeek-V4's recipe (MXFP4, RCEIL, which never clips) has none.

Scales (`ScaleMode`):

    DYNAMIC  block scales (and the NVFP4 per-tensor scale) are recomputed from the current weight at
             every forward. `convert()` then gives bit for bit what `quantize_()` gives for the final
             weights: fake-quant training *is* PTQ of whatever the weights end at.
    FROZEN   scales are fixed at `prepare_qat` time, from RTN or from a PTQ result (GPTQ, scale
             search) passed as `start`; only the E2M1 codes move. Starting from GPTQ, step 0
             reproduces GPTQ's weights exactly, and `convert()` keeps those scales.

Fused siblings (q/k/v, gate/up, w1/w3) share one NVFP4 per-tensor scale, as vLLM needs and as
`quantize_` does: in DYNAMIC mode each forward takes the joint amax of the group's current weights.

Activations (optional, W4A4): the layer input is fake-quantized the way `FP4Linear` quantizes it at
inference. MXFP4 inputs use per-block scales computed on the fly. NVFP4 inputs use a static
per-tensor scale: the layer tracks the running max of its inputs in training (`input_amax`) and
`convert()` hands it to `FP4Linear.set_input_amax`, so the converted layer sees the same scale.

    model = prepare_qat(model, QATConfig(NVFP4Config()))   # nn.Linear -> FakeQuantLinear
    ... train ...
    report = convert(model)                                  # FakeQuantLinear -> FP4Linear

Expert weights stored as 3-D parameters (MoE) get the same treatment through a parametrization
(`FakeQuantParametrization`), so the expert module's own forward runs unchanged.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fp4kit.formats import (E2M1_MAX, GlobalScale, MXFP4Config, NVFP4Config, QuantizedTensor, check_finite,
                            e8m0_to_float, nvfp4_global_scale, pack_codes, quantize,
                            round_to_e2m1_codes)

from .linear import round_input
from .parametrize import register_fp4
from .quantize import DEFAULT_IGNORE, FUSED_GROUPS, QuantizeReport, exclusion_reason, quantize_, shared_amax
from .swiglu_clamp import apply_swiglu_clamp


class ScaleMode(enum.Enum):
    """Where the FP4 scales of a fake-quantized weight come from (see the module docstring)."""

    DYNAMIC = "dynamic"  # recomputed from the current weight at every forward
    FROZEN = "frozen"  # fixed at prepare time (RTN or a PTQ start), only the codes move


@dataclass(frozen=True)
class QATConfig:
    """What to fake-quantize and how.

    weight        the FP4 format of the weights (NVFP4Config, or MXFP4Config(ScaleRule.RCEIL) for DeepSeek-V4)
    activations   also fake-quantize layer inputs (W4A4); None for weight-only (W4A16)
    scales        ScaleMode.DYNAMIC or FROZEN
    ignore        layer-name patterns kept in float (lm_head by default; add layers to keep in bf16)
    swiglu_clamp  None, or the limit L of a SwiGLU clamp put on every gated MLP (`fp4kit.nn.swiglu_clamp`:
                  down(act(min(gate(x), L)) * clamp(up(x), -L, L)), DeepSeek-V4's stability option, L = 10)
    """

    weight: NVFP4Config | MXFP4Config
    activations: NVFP4Config | MXFP4Config | None = None
    scales: ScaleMode = ScaleMode.DYNAMIC
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    swiglu_clamp: float | None = None

    def __post_init__(self):
        if not isinstance(self.weight, (NVFP4Config, MXFP4Config)):
            raise TypeError(f"QATConfig.weight must be an NVFP4Config or MXFP4Config, got {type(self.weight).__name__}")
        if self.activations is not None and not isinstance(self.activations, (NVFP4Config, MXFP4Config)):
            raise TypeError(f"QATConfig.activations must be NVFP4Config, MXFP4Config or None, "
                            f"got {type(self.activations).__name__}")
        if not isinstance(self.scales, ScaleMode):
            raise TypeError(f"QATConfig.scales must be a ScaleMode, got {self.scales!r}")
        if isinstance(self.ignore, str):
            raise TypeError("QATConfig.ignore must be a tuple of patterns, not one string")
        if self.swiglu_clamp is not None and not (isinstance(self.swiglu_clamp, (int, float))
                                                  and math.isfinite(self.swiglu_clamp) and self.swiglu_clamp > 0):
            raise ValueError(f"QATConfig.swiglu_clamp must be a finite limit > 0 or None, got {self.swiglu_clamp!r}")


class _STE(torch.autograd.Function):
    """Forward: the fake-quantized value (computed outside, no graph). Backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
        return x_q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def ste(x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """`x_q` in the forward pass, gradient straight through to `x` in the backward pass."""
    return _STE.apply(x, x_q.to(x.dtype))


def quantize_with_scales(x: torch.Tensor, like: QuantizedTensor, *, name: str = "tensor") -> QuantizedTensor:
    """Quantize `x` on the scales of `like` (same shape and format): new E2M1 codes, the same scales.

    The arithmetic is the quantizer's own (NVFP4: divide by s/g or multiply by (1/g)/s per the
    GlobalScale convention; MXFP4: multiply by the exact power of two 2^-e), so quantizing the
    weight a scale was computed from gives back that quantizer's bytes.
    """
    if tuple(x.shape) != tuple(like.shape):
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not match its frozen scales' {tuple(like.shape)}")
    config = like.config
    bs = config.block_size
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // bs, bs)
    if isinstance(config, NVFP4Config):
        g = like.global_scale.float().reshape(())
        s32 = like.scale.float()
        if config.global_scale is GlobalScale.ENCODE:
            scaled = blocks / (s32 / g).unsqueeze(-1)
        else:
            scaled = blocks * ((1.0 / g) / s32).unsqueeze(-1)
        scaled = torch.where((s32 == 0).unsqueeze(-1), torch.zeros_like(scaled), scaled)
    else:
        scaled = blocks * (1.0 / e8m0_to_float(like.scale)).unsqueeze(-1)  # 1/2^e is exact
    codes = round_to_e2m1_codes(scaled.clamp(-E2M1_MAX, E2M1_MAX), signed_zero=config.signed_zero)
    return QuantizedTensor(pack_codes(codes.reshape(x.shape)), like.scale, like.global_scale, tuple(x.shape), config)


def fake_quantize_input(x: torch.Tensor, config: NVFP4Config | MXFP4Config, global_scale=None) -> torch.Tensor:
    """What `FP4Linear.quantize_input` computes, with a straight-through gradient."""
    with torch.no_grad():
        x_q = round_input(x.detach(), config, global_scale)
    return ste(x, x_q)


class FakeQuantLinear(nn.Linear):
    """An `nn.Linear` whose forward uses the FP4-rounded weight (and input), with STE gradients.

    It keeps the original layer's `weight` and `bias` Parameters (an optimizer built before the swap
    still holds them). Buffers: `weight_scale` / `weight_global_scale` in FROZEN mode, and
    `input_amax` with NVFP4 activations.
    """

    def __init__(self, linear: nn.Linear, config: QATConfig, *, name: str = "linear",
                 siblings: list[nn.Parameter] | None = None, start: QuantizedTensor | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.qat_config, self.layer_name = config, name
        # fused siblings' weights (this one included): plain references, not registered twice
        self._siblings = list(siblings) if siblings else [self.weight]
        if config.scales is ScaleMode.FROZEN:
            start = start if start is not None else self._quantize_dynamic()
            self.register_buffer("weight_scale", start.scale.clone())
            self.register_buffer("weight_global_scale", None if start.global_scale is None else start.global_scale.clone())
        if isinstance(config.activations, NVFP4Config):
            self.register_buffer("input_amax", torch.zeros((), dtype=torch.float32, device=linear.weight.device))

    @property
    def weight_config(self) -> NVFP4Config | MXFP4Config:
        return self.qat_config.weight

    def group_amax(self) -> torch.Tensor | None:
        """Joint |max| of the fused group (NVFP4 only; None when the layer stands alone)."""
        if len(self._siblings) < 2 or not isinstance(self.weight_config, NVFP4Config):
            return None
        return torch.stack([w.detach().abs().max().float() for w in self._siblings]).max()

    def _quantize_dynamic(self) -> QuantizedTensor:
        return quantize(self.weight.detach(), self.weight_config, amax=self.group_amax(), name=f"{self.layer_name}.weight")

    def quantized_weight(self) -> QuantizedTensor:
        """The FP4 tensor this layer computes with now (what `convert` stores)."""
        with torch.no_grad():
            if self.qat_config.scales is ScaleMode.DYNAMIC:
                return self._quantize_dynamic()
            frozen = QuantizedTensor(self.weight_scale, self.weight_scale, self.weight_global_scale,
                                     tuple(self.weight.shape), self.weight_config)
            return quantize_with_scales(self.weight.detach(), frozen, name=f"{self.layer_name}.weight")

    def fake_weight(self) -> torch.Tensor:
        return ste(self.weight, self.quantized_weight().dequantize(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        act = self.qat_config.activations
        if isinstance(act, NVFP4Config):
            if self.training:
                with torch.no_grad():
                    self.input_amax.copy_(torch.maximum(self.input_amax, x.detach().abs().max().float()))
            x = fake_quantize_input(x, act, nvfp4_global_scale(self.input_amax, act))
        elif act is not None:
            x = fake_quantize_input(x, act)
        return F.linear(x, self.fake_weight(), self.bias)

    def extra_repr(self) -> str:
        act = f", input={self.qat_config.activations.name}" if self.qat_config.activations is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.weight_config.name}, scales={self.qat_config.scales.value}{act}")


class FakeQuantParametrization(nn.Module):
    """A 3-D (expert) weight seen through FP4 rounding, STE in the backward; blocks along the last dim
    of the quantized layout ([E, out, in]); `transpose` for parameters stored [E, in, out]."""

    def __init__(self, config: NVFP4Config | MXFP4Config, *, transpose: bool = False):
        super().__init__()
        self.config, self.transpose = config, transpose

    def quantized(self, w: torch.Tensor, name: str = "experts") -> QuantizedTensor:
        w = w.detach().transpose(-1, -2) if self.transpose else w.detach()
        return quantize(w, self.config, name=name)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            w_q = self.quantized(w).dequantize(w.dtype)
            w_q = w_q.transpose(-1, -2) if self.transpose else w_q
        return ste(w, w_q)


def fake_quantize_param(module: nn.Module, name: str, config: NVFP4Config | MXFP4Config, *,
                        transpose: bool = False) -> FakeQuantParametrization:
    """Fake-quantize `module.<name>` (a 3-D expert tensor) in place; the float master stays the parameter."""
    p = FakeQuantParametrization(config, transpose=transpose)
    parametrize.register_parametrization(module, name, p)
    return p


def _eligible(model: nn.Module, config: QATConfig, filter_fn, report: QuantizeReport) -> list[tuple[str, nn.Linear]]:
    chosen = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        reason = exclusion_reason(name, module, config.weight, filter_fn, config.ignore)
        if reason:
            report.excluded[name] = reason
        else:
            check_finite(module.weight.detach(), f"{name}.weight")
            chosen.append((name, module))
    return chosen


def _fused_groups(chosen: list[tuple[str, nn.Linear]]) -> dict[str, list[nn.Parameter]]:
    """For each layer in a fused group of two or more chosen siblings: the siblings' weights."""
    by_name = dict(chosen)
    grouped = shared_amax(chosen)  # names of layers that share a per-tensor scale
    out = {}
    for name in grouped:
        parent, _, child = name.rpartition(".")
        for group in FUSED_GROUPS:
            if child in group:
                members = [f"{parent}.{c}" if parent else c for c in group]
                out[name] = [by_name[m].weight for m in members if m in by_name]
    return out


def prepare_qat(model: nn.Module, config: QATConfig, filter_fn: Callable[[nn.Module, str], bool] | None = None, *,
                start: dict[str, QuantizedTensor] | None = None) -> QuantizeReport:
    """Swap every eligible `nn.Linear` for a `FakeQuantLinear`, in place; report what was swapped and why not.

    `start` maps layer names to PTQ results (GPTQ, scale search). Each such layer's master weight is
    set to the dequantized PTQ weight, and in FROZEN mode its scales are taken from it, so the
    prepared model computes exactly the PTQ model. Other layers start from their own weights.
    With `config.swiglu_clamp`, every gated MLP (dense or expert) is first swapped for a
    `ClampedSwiGLU` holding the same projections (layer names unchanged); `convert` keeps it.
    """
    if not isinstance(config, QATConfig):
        raise TypeError(f"prepare_qat needs a QATConfig, got {type(config).__name__}")
    if config.swiglu_clamp is not None:
        apply_swiglu_clamp(model, config.swiglu_clamp)
    report = QuantizeReport()
    chosen = _eligible(model, config, filter_fn, report)
    start = start or {}
    unknown = sorted(set(start) - {n for n, _ in chosen})
    if unknown:
        raise ValueError(f"prepare_qat: start has layers that are not being prepared: {unknown[:5]}")
    with torch.no_grad():
        for name, module in chosen:
            if name in start:
                module.weight.copy_(start[name].dequantize(torch.float32).to(module.weight.dtype))
    groups = _fused_groups(chosen) if isinstance(config.weight, NVFP4Config) else {}
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        fq = FakeQuantLinear(module, config, name=name, siblings=groups.get(name), start=start.get(name))
        setattr(parent, child, fq)
        report.quantized.append(name)
    return report


def convert(model: nn.Module, *, dtype: torch.dtype | None = None, progress: bool = False) -> QuantizeReport:
    """Swap every `FakeQuantLinear` for the `FP4Linear` holding the weight it computes with, in place.

    DYNAMIC scales: exactly `quantize_()` of the final master weights (same function, same shared
    amax of fused groups). FROZEN scales: the codes on the frozen scales. Either way the converted
    layer's dequantized weight equals the fake-quantized weight of the last forward, bit for bit.
    With `dtype` the whole model is cast to it afterwards (`cast_except_fp4`): the master weights are
    quantized in their own precision first, the FP4 buffers stay as they are.
    """
    fakes = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not fakes:
        raise ValueError("convert: the model has no FakeQuantLinear layers (run prepare_qat first)")
    configs = {m.qat_config for _, m in fakes}
    if len(configs) > 1:
        raise ValueError(f"convert: layers were prepared with different QATConfigs: {configs}")
    config = configs.pop()
    weights = {n: m.quantized_weight() for n, m in fakes}  # before the swap: fused groups still see siblings
    input_amax = {n: m.input_amax.detach().clone() for n, m in fakes if hasattr(m, "input_amax")}
    names = set(weights)
    for name, module in fakes:  # back to plain nn.Linear (same Parameters), then the PTQ path
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight, plain.bias = module.weight, module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    frozen = config.scales is ScaleMode.FROZEN
    report = quantize_(model, config.weight, lambda m, n: n in names, ignore=(), activations=config.activations,
                       input_amax=input_amax, weights=weights if frozen else None, progress=progress)
    if dtype is not None:
        cast_except_fp4(model, dtype)
    return report


def cast_except_fp4(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`model.to(dtype)` that leaves FP4 storage alone: `Module.to` would cast the float8 block
    scales and the float32 global scales of FP4Linear (they are floating point). FP4Linear layers
    get `dtype` as their compute dtype and their bias in it; every other parameter and floating
    buffer is cast."""
    from .linear import FP4Linear

    for module in model.modules():
        if isinstance(module, FP4Linear):
            module.dtype = dtype
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                module._buffers[name] = b.to(dtype)
    return model


def fake_quant_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def convert_param(module: nn.Module, name: str, *, dtype: torch.dtype | None = None) -> QuantizedTensor:
    """Replace a fake-quantized 3-D parameter by FP4 storage (`register_fp4`) of its final value."""
    plist = module.parametrizations[name]
    fq = next(p for p in plist if isinstance(p, FakeQuantParametrization))
    master = plist.original.detach()
    qt = fq.quantized(master, name=name)
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)
    register_fp4(module, name, qt, transpose=fq.transpose, dtype=dtype or master.dtype)
    return qt


__all__ = ["FakeQuantLinear", "FakeQuantParametrization", "QATConfig", "ScaleMode", "convert", "convert_param",
           "fake_quant_layers", "fake_quantize_input", "fake_quantize_param", "prepare_qat", "quantize_with_scales",
           "ste", "cast_except_fp4", "FP8TileCheck", "fp8_tile_check", "fp8_tile_report"]


# ---------------------------------------------------------------------------------------------- DeepSeek-V4 check

@dataclass(frozen=True)
class FP8TileCheck:
    """Can this FP4 weight be dequantized to FP8 E4M3 with one power-of-two scale per tile, exactly?

    lossless        every tile round-trips bit for bit
    tiles           tiles checked; lossy_tiles how many did not round-trip
    max_scale_span  max over tiles of log2(largest / smallest nonzero FP4 block scale in the tile)
    """

    lossless: bool
    tiles: int
    lossy_tiles: int
    max_scale_span: float


def fp8_tile_check(qt: QuantizedTensor, tile: int = 128) -> FP8TileCheck:
    """DeepSeek-V4 trains MXFP4 experts but runs its existing FP8 kernels on them: each 128x128 tile of
    the FP4 weight is dequantized to E4M3 with one scale per tile. That is lossless when every
    value q * s_block / S_tile lands on the E4M3 grid. With S_tile = 2^ceil(log2(amax_tile / 448))
    (a power of two, so the tile max fits under 448), an MXFP4 value q * 2^e_b becomes q * 2^(e_b -
    log2 S); E2M1 values need two significant bits, so the smallest block's values stay exact while
    they are >= E4M3's subnormal step 2^-9. For MXFP4 that holds when the blocks of a tile span at
    most about 14 binades (2^14 between the largest and smallest block scale), so the check is
    about the ratio of the FP4 sub-block scales inside each tile. This function does the conversion
    itself and compares, for any FP4 format (NVFP4's scales are not powers of two and rarely pass).

    Works on [N, K] and on stacked experts [..., N, K] (each expert's matrix tiled separately).
    """
    from fp4kit.formats.scales import ceil_log2, pow2

    w = qt.dequantize(torch.float32)
    w = w.reshape(-1, *w.shape[-2:])  # [E, N, K]
    e_, n, k = w.shape
    pn, pk = (-n) % tile, (-k) % tile
    w = F.pad(w, (0, pk, 0, pn))
    tiles = w.reshape(e_, (n + pn) // tile, tile, (k + pk) // tile, tile).transpose(2, 3)  # [E, Nt, Kt, t, t]
    amax = tiles.abs().amax(dim=(-1, -2))
    exp = torch.where(amax > 0, ceil_log2(amax / 448.0), torch.zeros_like(amax, dtype=torch.int32))
    scale = pow2(exp.clamp(-127, 127))[..., None, None]
    back = (tiles / scale).to(torch.float8_e4m3fn).float() * scale
    exact = (back == tiles).flatten(-2).all(dim=-1)
    # span of the nonzero block scales inside each tile
    bs = qt.config.block_size
    blocks = tiles.reshape(*tiles.shape[:-1], tile // bs, bs).abs().amax(-1)  # [E, Nt, Kt, t, t/bs]
    block_scale = _block_scales(qt).reshape(-1, n, k // bs)
    block_scale = F.pad(block_scale, (0, pk // bs, 0, pn))
    block_scale = block_scale.reshape(e_, (n + pn) // tile, tile, (k + pk) // tile, tile // bs).transpose(2, 3)
    live = blocks > 0
    big = torch.where(live, block_scale, torch.zeros_like(block_scale)).flatten(-2).amax(-1)
    small = torch.where(live, block_scale, torch.full_like(block_scale, float("inf"))).flatten(-2).amin(-1)
    has = live.flatten(-2).any(-1)
    span = torch.where(has, torch.log2(big / small), torch.zeros_like(big))
    return FP8TileCheck(bool(exact.all()), exact.numel(), int((~exact).sum()), float(span.max()) if span.numel() else 0.0)


def _block_scales(qt: QuantizedTensor) -> torch.Tensor:
    """The float32 factor of each block: 2^e (MXFP4) or the NVFP4 effective scale s/g or s*g."""
    if isinstance(qt.config, NVFP4Config):
        return qt.config.effective_block_scale(qt.scale, qt.global_scale.reshape(()))
    return e8m0_to_float(qt.scale)


def fp8_tile_report(model: nn.Module, tile: int = 128) -> dict[str, FP8TileCheck]:
    """`fp8_tile_check` of every FP4 weight in the model: fake-quant layers (their current FP4 weight),
    FP4Linear layers and FP4 expert parametrizations, by layer name."""
    from .linear import FP4Linear
    from .parametrize import FP4Parametrization

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (FakeQuantLinear, FP4Linear)):
            out[name] = fp8_tile_check(m.quantized_weight(), tile)
        elif isinstance(m, FP4Parametrization):
            out[name] = fp8_tile_check(m.quantized(), tile)
    return out
