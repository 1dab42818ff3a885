"""Calibration: run token batches through a model, collect each linear layer's input Hessian,
then quantize every layer with GPTQ against it.

    hessians = collect_hessians(model, batches)             # {name: Hessian}, one [K, K] per layer
    result = apply_gptq(model, NVFP4Config(), hessians)     # swaps nn.Linear -> FP4Linear

`collect_hessians` registers a forward pre-hook on every eligible `nn.Linear` (the same eligibility
as `quantize_`: ignore patterns, filter_fn, block divisibility), runs each batch under no_grad and
adds x^T x of the layer's input (flattened to [tokens, K], in `accumulate_dtype`) to a running
sum. Memory is bounded by the accumulators (one K x K per layer, kept on `store_device` if given,
e.g. "cpu" for a model on the GPU) plus one batch of activations; the hooks are removed even when
a batch fails. A tqdm bar counts batches.

`apply_gptq` is a thin layer over `fp4kit.nn.quantize_`: it computes every layer's GPTQ result
first (so a failure, such as a Hessian that is not positive definite, names the layer and leaves
the model untouched), then lets `quantize_` do the swap and its report, and loads the GPTQ codes
into the new FP4Linear modules. Fused siblings (q/k/v, gate/up) share one NVFP4 global scale, as
`quantize_` gives them. A layer that no calibration token reached has no Hessian: it is quantized
from its weights alone (RTN, or the scale search if the GPTQ config asks for it) and listed in
`GPTQResult.weight_only` with the reason, never skipped silently. `apply_scale_search` is the same
swap with scale-searched weights and no calibration.

A `RotatedLinear` (MR-GPTQ, `rotations.rotate_model_`) holds W R and rotates its input online: the
hooks add (x R)^T (x R) = R^T H R, the Hessian of the weight GPTQ quantizes.

Siblings that read the same input (q/k/v, gate/up) have the same Hessian. When their Hessians are
equal (bit for bit, and from the same token count: not so when each has its own random-sign
rotation), `apply_gptq` runs GPTQ once on the rows stacked [N_q + N_k + N_v, K] and splits the
result: GPTQ's updates act on each row independently (the column sweep is the same for all rows,
and the block scales and the shared NVFP4 global scale are per row block), so the codes are those
of three separate runs up to the float32 summation order of the lazy-batch matmul, for one column
sweep instead of three (the sweep's per-column Python work dominates GPTQ's time).

Simplifications (left for the full driver of issue 6): Hessians are taken from the float model in
one pass, not layer by layer on the outputs of already-quantized layers; siblings each keep their
own copy of the same Hessian during collection; no resuming of a killed run (`sequential_gptq` has it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from fp4kit.formats import MXFP4Config, NVFP4Config, QuantizedTensor, quantize
from fp4kit.nn import DEFAULT_IGNORE, FP4Experts, QuantizeReport, quantize_
from fp4kit.nn.quantize import (
    FUSED_GROUPS,
    exclusion_reason,
    is_plain_linear,
    shared_amax,
)
from fp4kit.nn.rotation import RotatedLinear

from .gptq import GPTQConfig, gptq, output_error
from .scale_search import ScaleSearchConfig, scale_search


@dataclass(frozen=True)
class CalibrationConfig:
    """`accumulate_dtype`: float32 or float64 sums; `store_device`: where Hessians live (None: with the layer)."""

    accumulate_dtype: torch.dtype = torch.float32
    store_device: str | None = None

    def __post_init__(self):
        if self.accumulate_dtype not in (torch.float32, torch.float64):
            raise ValueError("CalibrationConfig.accumulate_dtype must be float32 or float64, "
                             f"got {self.accumulate_dtype}")


@dataclass
class Hessian:
    """Sum over calibration tokens of x^T x for one layer's input x [K], and the token count."""

    sum: torch.Tensor
    tokens: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=self.sum.dtype)  # [tokens, K]
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]


def eligible_linears(model: nn.Module, config, filter_fn=None, ignore=DEFAULT_IGNORE) -> dict[str, nn.Linear]:
    """The layers `quantize_` would quantize, by name."""
    return {name: m for name, m in model.named_modules()
            if is_plain_linear(m) and exclusion_reason(name, m, config, filter_fn, ignore) is None}


def layer_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the layer's weight multiplies: x, or x R for a RotatedLinear (its Hessian is R^T H R)."""
    return module.rotate(x) if isinstance(module, RotatedLinear) else x


def input_hook(module: nn.Module, hessian: "Hessian", round_input: Callable | None = None):
    """Add the layer's input (rotated for a RotatedLinear, then `round_input` if given) to `hessian`."""
    def hook(m, args):
        x = layer_input(m, args[0].detach())
        hessian.add(x if round_input is None else round_input(x))
    return module.register_forward_pre_hook(hook)


def input_rounding(activations, input_amax: dict | None, names) -> dict[str, Callable]:
    """{layer name: x -> x rounded as the quantized layer will round its input} (`fp4kit.nn.linear.round_input`,
    NVFP4 with the static global scale from `input_amax[name]`), for Hessians of the inputs a W4A4 / W4A8 layer
    actually multiplies (`GPTQConfig.rounded_inputs`). Empty without activations."""
    from fp4kit.formats import nvfp4_global_scale
    from fp4kit.nn.linear import round_input

    if activations is None:
        return {}
    out = {}
    for name in names:
        gs = None
        if isinstance(activations, NVFP4Config):
            if name not in (input_amax or {}):
                raise ValueError(f"{name}: NVFP4 activations need a calibrated input amax (input_amax[{name!r}])")
            gs = nvfp4_global_scale(torch.as_tensor(input_amax[name], dtype=torch.float32), activations)
        out[name] = (lambda g: lambda x: round_input(x, activations, None if g is None else g.to(x.device)))(gs)
    return out


@torch.no_grad()
def observe_layer_input_amax(model: nn.Module, run: Callable[[], object], names) -> dict[str, torch.Tensor]:
    """Absolute max of what each named layer's weight multiplies (rotated for a RotatedLinear): the
    static NVFP4 input scale of W4A4 must be calibrated on the rotated input."""
    amax: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(m, args):
            a = layer_input(m, args[0].detach()).abs().amax().float().cpu()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return amax


@torch.no_grad()
def collect_hessians(model: nn.Module, batches: Iterable, config: NVFP4Config | MXFP4Config, *,
                     calibration: CalibrationConfig = CalibrationConfig(),
                     filter_fn: Callable[[nn.Module, str], bool] | None = None,
                     ignore: tuple[str, ...] = DEFAULT_IGNORE, progress: bool = True,
                     round_inputs: dict[str, Callable] | None = None) -> dict[str, Hessian]:
    """Run `batches` (token ids [B, S], or dicts of model kwargs) through `model`; return input Hessians.
    `round_inputs` {name: fn} rounds a layer's input before it is added (see `input_rounding`)."""
    from .moe_gptq import eligible_experts, expert_hook, new_expert_hessians

    layers = eligible_linears(model, config, filter_fn, ignore)
    hessians = {name: Hessian(torch.zeros(m.in_features, m.in_features, dtype=calibration.accumulate_dtype,
                                          device=calibration.store_device or m.weight.device))
                for name, m in layers.items()}
    experts = eligible_experts(model, config, filter_fn, ignore)
    hessians |= {name: new_expert_hessians(m, calibration.accumulate_dtype, calibration.store_device)
                 for name, m in experts.items()}
    handles = [input_hook(m, hessians[name], (round_inputs or {}).get(name)) for name, m in layers.items()]
    handles += [expert_hook(m, hessians[name]) for name, m in experts.items()]
    try:
        for batch in tqdm(batches, desc="calibrate", disable=not progress, leave=False):
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in handles:
            h.remove()
    return hessians


@dataclass
class GPTQResult:
    report: QuantizeReport
    weight_only: dict[str, str] = field(default_factory=dict)  # name -> why it has no Hessian
    output_error: dict[str, float] = field(default_factory=dict)  # name -> tr(dW H dW^T) / tokens

    def summary(self) -> str:
        lines = [self.report.summary(), f"GPTQ on {len(self.output_error)} layers, weight-only {len(self.weight_only)}"]
        lines += [f"  weight-only {name}: {reason}" for name, reason in self.weight_only.items()]
        return "\n".join(lines)


def quantize_layer(name: str, W: torch.Tensor, config, hessian: Hessian | None, opts: GPTQConfig, amax,
                   result: GPTQResult) -> QuantizedTensor:
    """GPTQ of one weight W [N, K] (RTN or scale search when no token reached it); records its output error."""
    if hessian is None or hessian.tokens == 0:
        result.weight_only[name] = "no calibration tokens reached it"
        if opts.scale_search is None:
            return quantize(W, config, amax=amax, name=f"{name}.weight")
        return scale_search(W, config, opts.scale_search, amax=amax, name=f"{name}.weight")
    H = hessian.sum.to(W.device)
    qt = gptq(W, H, config, block_size=opts.block_size, damp=opts.damp, act_order=opts.act_order,
              scale_search_config=opts.scale_search, amax=amax, dynamic_scales=opts.dynamic_scales,
              name=f"{name}.weight")
    result.output_error[name] = output_error(W.float(), qt.dequantize(), H.float()) / hessian.tokens
    return qt


def sibling_groups(layers: dict[str, nn.Module], hessians: dict) -> list[list[str]]:
    """Layers that GPTQ can quantize in one sweep: fused siblings (`FUSED_GROUPS`, same parent), all
    eligible, of the same input width and with equal Hessians from the same number of tokens. Every
    other layer is a group of one. Order follows `layers`."""
    grouped, out = set(), []
    for name in layers:
        if name in grouped:
            continue
        parent, _, child = name.rpartition(".")
        group = [name]
        for members in FUSED_GROUPS:
            if child != members[0]:
                continue
            names = [f"{parent}.{c}" if parent else c for c in members]
            hs = [hessians.get(n) for n in names]
            if (all(n in layers for n in names) and all(isinstance(h, Hessian) and h.tokens > 0 for h in hs)
                    and len({layers[n].in_features for n in names}) == 1
                    and all(h.tokens == hs[0].tokens and torch.equal(h.sum, hs[0].sum) for h in hs[1:])):
                group = names
        grouped.update(group)
        out.append(group)
    return out


def quantize_group(names: list[str], layers: dict[str, nn.Module], config, hessians: dict, opts: GPTQConfig,
                   amax: dict, result: GPTQResult) -> dict[str, QuantizedTensor]:
    """GPTQ of a sibling group in one sweep over the stacked rows, split back per layer."""
    if len(names) == 1:
        name = names[0]
        return {name: quantize_layer(name, layers[name].weight.detach(), config, hessians.get(name), opts,
                                     amax.get(name), result)}
    parent = names[0].rpartition(".")[0]
    label = f"{parent}.{{{','.join(n.rpartition('.')[2] for n in names)}}}"  # e.g. model.layers.0.self_attn.{q_proj,...}
    stacked = torch.cat([layers[n].weight.detach() for n in names])  # [sum N, K]
    qt = quantize_layer(label, stacked, config, hessians[names[0]], opts, amax.get(names[0]), result)
    H = hessians[names[0]]
    del result.output_error[label]  # recorded per layer below
    out, start = {}, 0
    for n in names:
        rows = layers[n].out_features
        out[n] = QuantizedTensor(qt.data[start:start + rows], qt.scale[start:start + rows], qt.global_scale,
                                 (rows, qt.shape[1]), config)
        W = layers[n].weight.detach().float()
        result.output_error[n] = output_error(W, out[n].dequantize(), H.sum.to(W.device).float()) / H.tokens
        start += rows
    return out


def apply_gptq(model: nn.Module, config: NVFP4Config | MXFP4Config, hessians: dict[str, Hessian],
               gptq_config: GPTQConfig = GPTQConfig(), *, filter_fn: Callable[[nn.Module, str], bool] | None = None,
               ignore: tuple[str, ...] = DEFAULT_IGNORE, progress: bool = True, **quantize_kwargs) -> GPTQResult:
    """Swap eligible nn.Linear layers for FP4Linear holding GPTQ-quantized weights (see the module docstring).

    Extra keyword arguments go to `quantize_` (e.g. `activations=` for W4A4).
    """
    layers = eligible_linears(model, config, filter_fn, ignore)
    amax = shared_amax(list(layers.items())) if isinstance(config, NVFP4Config) else {}
    result = GPTQResult(QuantizeReport())
    qts = {}
    for group in tqdm(sibling_groups(layers, hessians), desc=f"gptq {config.name}", disable=not progress,
                      leave=False):
        qts |= quantize_group(group, layers, config, hessians, gptq_config, amax, result)
    from .moe_gptq import ExpertHessians, eligible_experts, gptq_experts

    for name, m in eligible_experts(model, config, filter_fn, ignore).items():  # fused MoE experts
        h = hessians.get(name)
        if isinstance(h, ExpertHessians):
            qts[name] = gptq_experts(m, config, h, gptq_config, name=name)
            idle = [e for e, n in enumerate(h.tokens) if n == 0]
            if idle:
                result.weight_only[name] = f"experts {idle} got no calibration tokens: quantized from their weights"
    result.report = swap_in(model, config, qts, filter_fn=filter_fn, ignore=ignore, **quantize_kwargs)
    return result


def apply_scale_search(model: nn.Module, config: NVFP4Config | MXFP4Config,
                       search: ScaleSearchConfig = ScaleSearchConfig(), *,
                       filter_fn: Callable[[nn.Module, str], bool] | None = None, ignore: tuple[str, ...] = DEFAULT_IGNORE,
                       progress: bool = True, **quantize_kwargs) -> QuantizeReport:
    """Like `quantize_`, with each layer's block scales chosen by `scale_search` (no calibration data)."""
    layers = eligible_linears(model, config, filter_fn, ignore)
    amax = shared_amax(list(layers.items())) if isinstance(config, NVFP4Config) else {}
    qts = {name: scale_search(m.weight.detach(), config, search, amax=amax.get(name), name=f"{name}.weight")
           for name, m in tqdm(layers.items(), desc=f"scale search {config.name}", disable=not progress, leave=False)}
    return swap_in(model, config, qts, filter_fn=filter_fn, ignore=ignore, **quantize_kwargs)


def swap_in(model, config, qts: dict[str, QuantizedTensor], **quantize_kwargs) -> QuantizeReport:
    """Let `quantize_` swap and report, with the precomputed weights in place of its RTN ones.

    Fused MoE experts (FP4Experts) that the algorithm did not quantize (no Hessians collected, or the
    scale search) are quantized round-to-nearest from their own weights by quantize_."""
    report = quantize_(model, config, progress=False, weights=qts, **quantize_kwargs)
    rtn_only = {n for n in set(report.quantized) - set(qts) if isinstance(model.get_submodule(n), FP4Experts)}
    if set(report.quantized) - rtn_only != set(qts):
        raise RuntimeError("quantize_ and the algorithm disagree on the layers to quantize")
    return report
