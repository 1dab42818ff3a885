"""SignRound for FP4: learn each weight's rounding direction and each block's scale clipping by signed
gradient descent on a whole decoder block's output (Cheng et al. 2023, "Optimize Weight Rounding via
Signed Gradient Descent for the Quantization of LLMs", arXiv 2309.05516; Intel's auto-round).

GPTQ and MR-GPTQ fix one linear layer at a time against its own input Hessian. SignRound instead
optimises the rounding of every linear layer of a decoder block *jointly*, on what the block outputs:

    scaled = W / f + V                       V [N, K] in [-0.5, 0.5]: a rounding offset per weight
    q      = e2m1(clamp(scaled, -6, 6))      round to the FP4 grid (straight-through gradient)
    W_q    = q * f                           f [N, K/bs] = repr(alpha * s0): the block's scale
    loss   = mean || block_float(x_f) - block_q(x_q) ||^2     over calibration tokens

`s0` is the initial block scale (RTN's, or the MSE scale search's) and alpha [N, K/bs] in
[min_clip, max_clip] rescales it (off by default: see SignRoundConfig); `repr` rounds the product to what the format can store, with a
straight-through gradient: NVFP4 a UE4M3 code under the tensor's fixed global scale (never 0 for a
nonzero block), MXFP4 the nearest power of two in the log domain (E8M0: with alpha in [0.5, 1] the
exponent stays or drops by one). `x_f` is the float model's input to the block and `x_q` the
quantized model's (the blocks before it already quantized), as auto-round's default: the target is
the float model's own output, so each block also corrects what the blocks before it got wrong.

The optimiser is signSGD, p <- p - lr_t * sign(dL/dp), lr_t decaying linearly from `lr` (default
1/iters) to 0, on mini-batches of `batch_size` calibration sequences: with lr = 1/iters the steps sum
to 0.5, exactly the range V may cover, and the sign makes the step size independent of the loss's
scale (Gemma's residual stream is large, SmolLM2's small). V and alpha start at 0 and 1, where the
codes and scales are the initial quantizer's bytes (bit for bit: same divisions, same clamp-then-round
as `fp4kit.formats`).

Export: the learned result is an ordinary `QuantizedTensor` (E2M1 codes, UE4M3 or E8M0 block scales,
the unchanged NVFP4 global scale), so FP4Linear, the kernels, the checkpoint and vLLM see nothing new;
its dequantized value equals the last forward pass of the optimisation exactly.

Rotations compose (MR-SignRound, `PTQMethod.MR_SIGNROUND`): a `RotatedLinear` holds W R, which is just a
weight; the block's forward rotates the input online as the quantized layer will.

Simplifications against auto-round (documented, not hidden): per-iteration "best loss" tracking is
replaced by the last iterate (the step size has decayed to 0 there) plus a safeguard: at the end the
learned and the initial quantizer are both scored on all calibration sequences and the lower block loss
wins, so a block is never worse than its initial quantizer on the calibration data. No learning-rate
warm-up, no AMP autocast (the model's own dtype is used; the fake-quant arithmetic is float32), no
min/max clipping of asymmetric integer ranges (FP4 is symmetric: one alpha per block).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fp4kit.formats import (
    E2M1_MAX,
    MXFP4Config,
    NVFP4Config,
    QuantizedTensor,
    e2m1_codes_to_float,
    pack_codes,
    round_to_e2m1_codes,
)
from fp4kit.formats.nvfp4 import GlobalScale
from fp4kit.formats.scales import (
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    exponent_to_e8m0,
    pow2,
    round_to_ue4m3,
)
from fp4kit.nn import QuantizeReport
from fp4kit.nn.fake_quant import ste
from fp4kit.nn.rotation import RotatedLinear

from .scale_search import ScaleSearchConfig
from .sequential import _run_layer, capture_layer_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignRoundConfig:
    """`iters`: signSGD steps per decoder block; `lr`: first step size (None: 1/iters), decaying linearly to 0;
    `batch_size`: calibration sequences per step; `min_clip`/`max_clip`: range of the per-block scale factor
    alpha (default 1, 1: the rounding only, SignRound v1; auto-round's min-max tuning is min_clip=0.5, which
    made the block loss worse on the tiny Llama of tests/algorithms/test_signround.py in both formats: with
    UE4M3 / E8M0 scales a clip moves the scale by a whole 6-12% / 2x step); `init_scales`: None starts from RTN scales, a ScaleSearchConfig from
    the MSE scale search; `seed`: mini-batch order; `safeguard`: keep the initial quantizer of a block where it
    scores a lower block loss on all calibration sequences."""

    iters: int = 200
    lr: float | None = None
    batch_size: int = 8
    min_clip: float = 1.0
    max_clip: float = 1.0
    init_scales: ScaleSearchConfig | None = None
    seed: int = 0
    safeguard: bool = True

    def __post_init__(self):
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 0:
            raise ValueError(f"SignRoundConfig.iters must be an int >= 0, got {self.iters!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr <= 1):
            raise ValueError(f"SignRoundConfig.lr must be in (0, 1] or None, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"SignRoundConfig.batch_size must be a positive int, got {self.batch_size!r}")
        if not 0 < self.min_clip <= 1 <= self.max_clip <= 2:
            raise ValueError("SignRoundConfig needs 0 < min_clip <= 1 <= max_clip <= 2, got "
                             f"min_clip={self.min_clip!r}, max_clip={self.max_clip!r}")
        if self.init_scales is not None and not isinstance(self.init_scales, ScaleSearchConfig):
            raise TypeError(f"SignRoundConfig.init_scales must be a ScaleSearchConfig or None, "
                            f"got {type(self.init_scales).__name__}")

    @property
    def step(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)

    @property
    def learns_scales(self) -> bool:
        return self.min_clip < 1 or self.max_clip > 1


# ---- the learnable quantizer: pure tensor functions -------------------------------------------------

def learned_factor(init: QuantizedTensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor [..., nb] float32 with a straight-through gradient to alpha, stored scale [..., nb]).

    The stored scale is what the format writes: NVFP4 UE4M3 codes of alpha * s0 (clamped to
    [min_block_scale or 2^-9, 448]; a zero s0 stays 0), MXFP4 E8M0 codes of 2^round(log2(alpha) + e0)."""
    config = init.config
    if isinstance(config, NVFP4Config):
        s0 = init.scale.float()
        cont = alpha * s0  # [..., nb]
        lowest = max(config.min_block_scale, E4M3_MIN_SUBNORMAL)
        s8 = round_to_ue4m3(cont.detach().clamp(lowest, E4M3_MAX))
        s8 = torch.where(s0 == 0, init.scale, s8)
        s = ste(cont, s8.float())
        g = init.global_scale.reshape(()).float()
        return (s / g if config.global_scale is GlobalScale.ENCODE else s * g), s8
    e0 = init.scale.to(torch.int32) - 127
    cont = alpha * pow2(e0)
    e = (e0 + torch.round(torch.log2(alpha.detach())).to(torch.int32)).clamp(-127, 127)
    return ste(cont, pow2(e)), exponent_to_e8m0(e)


def scaled_weight(W: torch.Tensor, factor: torch.Tensor, init: QuantizedTensor) -> torch.Tensor:
    """W [..., K] divided by its block factor, blocked [..., nb, bs], in the formats' arithmetic (so V = 0 and
    the initial factor give the initial codes bit for bit). Blocks with factor 0 (a flushed NVFP4 block) -> 0."""
    config = init.config
    blocks = W.float().reshape(*W.shape[:-1], -1, config.block_size)
    f = factor.unsqueeze(-1)
    if isinstance(config, NVFP4Config) and config.global_scale is GlobalScale.DECODE:
        g = init.global_scale.reshape(()).float()
        s = f / g  # the stored block scale (f = s * g), differentiable
        out = blocks * ((1.0 / g) / torch.where(s == 0, torch.ones_like(s), s))
    else:  # NVFP4 ENCODE: blocks / (s / g); MXFP4: blocks / 2^e (exact, = blocks * 2^-e)
        out = blocks / torch.where(f == 0, torch.ones_like(f), f)
    return torch.where(f == 0, torch.zeros_like(out), out)


def _codes(scaled: torch.Tensor, config) -> torch.Tensor:
    return round_to_e2m1_codes(scaled.detach().clamp(-E2M1_MAX, E2M1_MAX), signed_zero=config.signed_zero)


def fake_quantize(W: torch.Tensor, V: torch.Tensor, alpha: torch.Tensor, init: QuantizedTensor) -> torch.Tensor:
    """W_q [N, K] float32: W rounded to FP4 with offset V [N, K] and scale factors alpha [N, K/bs] (see the
    module docstring); gradients reach V and alpha straight through the rounding."""
    factor, _ = learned_factor(init, alpha)
    scaled = (scaled_weight(W, factor, init) + V.reshape(*V.shape[:-1], -1, init.config.block_size))
    scaled = scaled.clamp(-E2M1_MAX, E2M1_MAX)
    q = ste(scaled, e2m1_codes_to_float(_codes(scaled, init.config)))
    return (q * factor.unsqueeze(-1)).reshape(W.shape)


@torch.no_grad()
def export(W: torch.Tensor, V: torch.Tensor, alpha: torch.Tensor, init: QuantizedTensor) -> QuantizedTensor:
    """The learned quantizer as a QuantizedTensor in `init`'s layout; dequantizes to `fake_quantize`'s value."""
    factor, stored = learned_factor(init, alpha)
    scaled = scaled_weight(W, factor, init) + V.reshape(*V.shape[:-1], -1, init.config.block_size)
    codes = _codes(scaled, init.config).reshape(W.shape)
    return QuantizedTensor(pack_codes(codes), stored, init.global_scale, tuple(W.shape), init.config)


def sign_step(params: list[torch.Tensor], lr: float, bounds: list[tuple[float, float]]) -> None:
    """signSGD: p <- clamp(p - lr * sign(grad), lo, hi); the gradients are cleared."""
    with torch.no_grad():
        for p, (lo, hi) in zip(params, bounds):
            if p.grad is not None:
                p.sub_(lr * torch.sign(p.grad)).clamp_(lo, hi)
                p.grad = None


# ---- the module swapped in while a block is optimised ------------------------------------------------

class SignRoundLinear(nn.Module):
    """Wraps a float linear layer (or a RotatedLinear) during SignRound: forward uses the learned FP4 weight.

    `V` [N, K] and `alpha` [N, K/bs] are the only trainable parameters; the wrapped layer is frozen and
    restored after the block is done (`SignRoundLinear.linear`)."""

    def __init__(self, linear: nn.Linear, init: QuantizedTensor):
        super().__init__()
        self.linear, self.init = linear, init
        N, K = linear.weight.shape
        dev = linear.weight.device
        self.V = nn.Parameter(torch.zeros(N, K, device=dev))
        self.alpha = nn.Parameter(torch.ones(N, K // init.config.block_size, device=dev))

    def weight_q(self) -> torch.Tensor:
        return fake_quantize(self.linear.weight.detach(), self.V, self.alpha, self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        if isinstance(self.linear, RotatedLinear):
            x = self.linear.rotate(x)
        w = self.weight_q().to(x.dtype)
        return F.linear(x, w, None if self.linear.bias is None else self.linear.bias.detach())

    def reset(self) -> None:
        with torch.no_grad():
            self.V.zero_()
            self.alpha.fill_(1.0)

    def quantized(self) -> QuantizedTensor:
        return export(self.linear.weight.detach(), self.V, self.alpha, self.init)


# ---- the driver: decoder block by decoder block -----------------------------------------------------

def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def _batchable(hidden: list[torch.Tensor], kwargs: list[dict]) -> bool:
    """Sequences can share one forward when they all have batch 1, one length and equal layer kwargs (masks,
    positions, rotary tables broadcast over the batch)."""
    return (all(h.shape[0] == 1 and h.shape == hidden[0].shape for h in hidden)
            and all(_same(kw, kwargs[0]) for kw in kwargs[1:]))


def _block_loss(layer, inputs, targets, kwargs, group) -> float:
    """Mean squared error of the block's output against the targets over all calibration sequences."""
    total, count = 0.0, 0
    with torch.no_grad():
        for idx in group:
            x = torch.cat([inputs[j] for j in idx])
            y = torch.cat([targets[j] for j in idx])
            out = _run_layer(layer, x, kwargs[idx[0]])
            total += float((out.float() - y.float()).square().sum())
            count += y.numel()
    return total / max(count, 1)


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def optimize_block(layer: nn.Module, wrappers: dict[str, SignRoundLinear], inputs: list[torch.Tensor],
                   targets: list[torch.Tensor], kwargs: list[dict], config: SignRoundConfig) -> dict:
    """signSGD on the wrappers' V and alpha so that layer(inputs) approaches targets (the wrappers are already
    swapped into `layer`). Returns {"init": loss, "final": loss, "kept": "learned"|"init", "losses": [...]}."""
    batch = config.batch_size if _batchable(inputs, kwargs) else 1
    params, bounds = [], []
    for w in wrappers.values():
        params.append(w.V)
        bounds.append((-0.5, 0.5))
        if config.learns_scales:
            params.append(w.alpha)
            bounds.append((config.min_clip, config.max_clip))
    frozen = [p for p in layer.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(config.seed)
    groups = _chunks(len(inputs), batch)
    init_loss = _block_loss(layer, inputs, targets, kwargs, groups)
    losses = []
    try:
        with torch.enable_grad():
            for it in range(config.iters):
                idx = torch.randperm(len(inputs), generator=gen)[:batch].tolist()
                x = torch.cat([inputs[j] for j in idx])
                y = torch.cat([targets[j] for j in idx])
                loss = F.mse_loss(_run_layer(layer, x, kwargs[idx[0]]).float(), y.float())
                loss.backward()
                sign_step(params, config.step * (1 - it / config.iters), bounds)
                losses.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    final_loss = _block_loss(layer, inputs, targets, kwargs, groups)
    kept = "learned"
    if config.safeguard and final_loss > init_loss:
        for w in wrappers.values():
            w.reset()
        kept = "init"
    return {"init": init_loss, "final": final_loss, "kept": kept, "losses": losses}


@dataclass
class SignRoundResult:
    report: QuantizeReport
    blocks: dict[int, dict]  # decoder layer -> {"init", "final", "kept", "losses"} (block output MSE)

    def summary(self) -> str:
        learned = sum(b["kept"] == "learned" for b in self.blocks.values())
        gain = [b["final"] / b["init"] for b in self.blocks.values() if b["init"] > 0 and b["kept"] == "learned"]
        mean = f", block loss x{sum(gain) / len(gain):.3f} of the initial quantizer's on average" if gain else ""
        return (f"{self.report.summary()}\nSignRound on {len(self.blocks)} decoder blocks: learned rounding kept in "
                f"{learned}{mean}")


def _initial(name: str, W: torch.Tensor, config, sr: SignRoundConfig, amax) -> QuantizedTensor:
    from fp4kit.formats import quantize

    from .scale_search import scale_search

    if sr.init_scales is None:
        return quantize(W, config, amax=amax, name=f"{name}.weight")
    return scale_search(W, config, sr.init_scales, amax=amax, name=f"{name}.weight")


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def sequential_signround(model: nn.Module, batches, config: NVFP4Config | MXFP4Config,
                         sr_config: SignRoundConfig = SignRoundConfig(), *, state_dir=None, ignore=None,
                         progress: bool = True, on_layer_done=None) -> SignRoundResult:
    """Quantize `model` in place with SignRound, decoder block by decoder block (see the module docstring).

    `batches`: calibration token ids [B, S] (or dicts of model kwargs) on the model's device. `state_dir`:
    each finished block and both hidden-state streams are saved there and a rerun with the same settings
    resumes after the last finished block (as `sequential_gptq`). Layers outside the decoder stack get RTN."""
    import pathlib

    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from fp4kit.nn import DEFAULT_IGNORE, quantize_
    from fp4kit.nn.quantize import shared_amax

    from .calibrate import eligible_linears, swap_in
    from .sequential import _fingerprint, _resume_point, _save_layer, decoder_layers

    if not isinstance(config, (NVFP4Config, MXFP4Config)):
        raise TypeError(f"SignRound needs an NVFP4Config or MXFP4Config, got {type(config).__name__}")
    if not isinstance(sr_config, SignRoundConfig):
        raise TypeError(f"sequential_signround needs a SignRoundConfig, got {type(sr_config).__name__}")
    ignore = DEFAULT_IGNORE if ignore is None else ignore
    batches = list(batches)
    if not batches:
        raise ValueError("sequential_signround needs at least one calibration batch")
    stack, layers = decoder_layers(model)
    rotations = sorted({repr(m.rotation.config) for m in model.modules() if isinstance(m, RotatedLinear)})
    fingerprint = _fingerprint(config, sr_config, (*ignore, "signround", *rotations), batches)
    state_dir = pathlib.Path(state_dir) if state_dir is not None else None
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
    done = _resume_point(state_dir, fingerprint)
    x_q, kwargs = capture_layer_inputs(model, layers, batches)
    x_f = list(x_q)
    result = SignRoundResult(QuantizeReport(), {})

    def in_layer(i):
        return lambda _m, name: name.startswith(f"{stack}.{i}.")

    for i in range(done + 1):  # rebuild finished blocks: same modules, then their saved state
        report = quantize_(model, config, in_layer(i), ignore=ignore, progress=False)
        layers[i].load_state_dict(load_file(str(state_dir / f"layer_{i:04d}.safetensors")))
        result.report.quantized += report.quantized
    if done >= 0:
        saved = load_file(str(state_dir / f"inputs_{done + 1:04d}.safetensors"))
        n = len(x_q)
        x_q = [saved[f"h{j}"].to(h.device, h.dtype) for j, h in enumerate(x_q)]
        x_f = [saved[f"h{n + j}"].to(h.device, h.dtype) for j, h in enumerate(x_f)]

    bar = tqdm(range(done + 1, len(layers)), desc=f"signround {config.name}", disable=not progress,
               initial=done + 1, total=len(layers))
    for i in bar:
        t0, layer = time.time(), layers[i]
        with torch.no_grad():
            targets = [_run_layer(layer, h, kw) for h, kw in zip(x_f, kwargs[i])]  # float block, float input
        linears = eligible_linears(model, config, in_layer(i), ignore)
        amax = shared_amax(list(linears.items())) if isinstance(config, NVFP4Config) else {}
        wrappers = {n: SignRoundLinear(m, _initial(n, m.weight.detach(), config, sr_config, amax.get(n)))
                    for n, m in linears.items()}
        for n, w in wrappers.items():
            _swap(model, n, w)
        try:
            stats = optimize_block(layer, wrappers, x_q, targets, kwargs[i], sr_config)
            qts = {n: w.quantized() for n, w in wrappers.items()}
        finally:
            for n, w in wrappers.items():
                _swap(model, n, w.linear)
        result.blocks[i] = stats
        result.report.quantized += swap_in(model, config, qts, filter_fn=in_layer(i), ignore=ignore).quantized
        with torch.no_grad():
            x_q = [_run_layer(layer, h, kw) for h, kw in zip(x_q, kwargs[i])]
        x_f = targets
        bar.set_postfix(loss=f"{stats['init']:.3g}->{stats['final']:.3g}")
        log.info("signround %s block %d: output MSE %.4g -> %.4g (%s kept), %.1fs", config.name, i, stats["init"],
                 stats["final"], stats["kept"], time.time() - t0)
        if state_dir is not None:
            _save_layer(state_dir, i, layer, x_q + x_f, fingerprint)
        if on_layer_done is not None:
            on_layer_done(i)

    rest = quantize_(model, config, ignore=ignore, progress=False)  # outside the stack: RTN
    result.report.quantized += rest.quantized
    result.report.excluded = rest.excluded
    return result
