"""GRPO with verifiable rewards on a frozen FP4 (or bf16) base with LoRA adapters.

Group Relative Policy Optimization (DeepSeekMath; DeepSeek-R1) needs no value model: for each
prompt it samples G completions, scores them with verifiable rewards, and uses each completion's
reward relative to its own group as the advantage of every one of its tokens. One step here:

    1. rollout    P prompts x G completions through `fp4kit.engine.Engine`, which runs the model's own
                  modules, so rollouts see exactly the FP4 base + LoRA being trained (no weight sync)
    2. reward     r_i = sum_k w_k r_ik over the reward functions (None -> NaN, ignored; all None -> A_i = 0)
    3. advantage  A_i = (r_i - mean_group(r)) / (std + 1e-4), where std is the group's (scale_rewards=group),
                  the whole batch's (batch), or no scaling at all (none); std is Bessel-corrected
    4. loss       per token t of completion i, with ratio rho = exp(logp - logp_old):
                      l_it = -min(rho A_i, clip(rho, 1 - epsilon, 1 + epsilon_high) A_i) + beta KL_it
                      KL_it = exp(ref - logp) - (ref - logp) - 1        (k3 estimator, vs the base model)
                  reduced by `loss_type` (mask m_it = 1 on real completion tokens):
                      grpo     mean_i ( sum_t m l / sum_t m )               per-sequence mean, then mean
                      bnpo     sum m l / sum m                              over the micro-batch's tokens
                      dr_grpo  sum m l / (B * max_completion_length)        a constant normaliser
                      dapo     sum m l / (tokens of the whole generation batch)
                  and, with a batch split into k micro-batches, grpo/bnpo/dr_grpo divide by k
                  (gradient accumulation). This is TRL 1.16's `GRPOTrainer._compute_loss` for
                  token-level importance sampling, no vLLM correction and no entropy terms; the
                  tests compare loss and gradient against TRL's own method.
    5. update     AdamW on the LoRA parameters (and norms, if trainable), gradient clipping; with
                  num_iterations = mu, mu updates on the same rollouts (then old != current logps and
                  the clip matters; with mu = 1 the ratio is 1 and old logps are the detached current ones)

Configuration field names and meanings follow TRL's `GRPOConfig`. Where we differ from TRL:
    - a "step" is one rollout batch (TRL counts optimizer steps; with num_iterations > 1 a step here makes
      num_iterations optimizer updates);
    - the batch of a step is `prompts_per_step` prompts (TRL's generation_batch_size / num_generations),
      split into micro-batches of `micro_batch_size` completions for the backward passes;
    - the reference model for KL is the base with adapters switched off (as TRL does with PEFT), and KL
      is logged even when beta = 0 (`log_kl`, one extra no-grad forward).

Optional QeRL adaptive quantization noise (AQN, Huang et al. 2025): during rollouts only, Gaussian
noise N(0, sigma^2) is added to every RMSNorm weight (noise in the norm scales acts like a
channel-wise weight perturbation of the next linear layer, without touching the FP4 weights);
sigma follows QeRL's staged exponential decay: the run is cut into `num_stages` equal intervals,
the first has no noise, interval k >= 1 uses sigma_start * (sigma_end / sigma_start)^((k-1)/(num_stages-2)).

Resuming: the prompts of step s and the sampling seed of step s are functions of s alone; dropout
and any other randomness come from the RNG states that `save_state` stores. So a killed run
resumed from its last checkpoint continues exactly as if it had not stopped.
"""

from __future__ import annotations

import contextlib
import pathlib
import random
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from fp4kit.nn import FP4Linear
from fp4kit.nn.lora import LoRALinear, save_adapter

from .state import JsonlLogger, latest_checkpoint, load_state, plot_metrics, save_state


class LossType(str, Enum):
    GRPO = "grpo"
    DAPO = "dapo"
    DR_GRPO = "dr_grpo"
    BNPO = "bnpo"


class ScaleRewards(str, Enum):
    GROUP = "group"
    BATCH = "batch"
    NONE = "none"


class LRSchedule(str, Enum):
    LINEAR = "linear"  # warm up, then decay linearly to 0 at max_steps (transformers' default)
    CONSTANT = "constant"  # warm up, then constant


@dataclass(frozen=True)
class NoiseSchedule:
    """QeRL's adaptive quantization noise on the norm weights, during rollouts (see the module docstring)."""

    sigma_start: float = 1e-2
    sigma_end: float = 1e-4
    num_stages: int = 10

    def __post_init__(self):
        if not 0 < self.sigma_end <= self.sigma_start:
            raise ValueError(f"NoiseSchedule needs 0 < sigma_end <= sigma_start, got {self.sigma_end}, {self.sigma_start}")
        if self.num_stages < 2:
            raise ValueError(f"NoiseSchedule.num_stages must be >= 2, got {self.num_stages}")

    def sigma(self, step: int, total_steps: int) -> float:
        """Noise std at 0-based `step` of `total_steps`."""
        n = self.num_stages - 1  # noisy stages
        trend = [self.sigma_start * (self.sigma_end / self.sigma_start) ** (k / max(n - 1, 1)) for k in range(n)]
        stage = int(min(step, total_steps) // (total_steps / self.num_stages))
        return 0.0 if stage == 0 else trend[min(stage - 1, n - 1)]


@dataclass(frozen=True)
class GRPOConfig:
    # --- TRL GRPOConfig names and meanings
    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: equal to epsilon
    loss_type: LossType = LossType.DAPO
    scale_rewards: ScaleRewards = ScaleRewards.GROUP
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    reward_weights: tuple[float, ...] | None = None  # None: all 1
    learning_rate: float = 1e-5  # TRL's default 1e-6 is for full fine-tuning; LoRA wants ~10x more
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    max_steps: int = 100
    save_steps: int = 25
    seed: int = 0
    # --- ours
    prompts_per_step: int = 8
    micro_batch_size: int = 64  # completions per forward/backward
    stop: tuple[str, ...] = ()  # stop strings of the task (the completing token stays in the completion)
    log_kl: bool = True
    noise: NoiseSchedule | None = None

    def __post_init__(self):
        for name in ("num_generations", "max_completion_length", "num_iterations", "max_steps", "prompts_per_step",
                     "micro_batch_size", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError("GRPOConfig.num_generations must be >= 2: advantages compare completions of a group")
        if self.temperature <= 0:
            raise ValueError(f"GRPOConfig.temperature must be > 0 for sampled rollouts, got {self.temperature}")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError(f"GRPOConfig.epsilon and epsilon_high must be > 0, got {self.epsilon}, {self.epsilon_high}")
        if self.beta < 0 or self.learning_rate <= 0:
            raise ValueError(f"GRPOConfig.beta must be >= 0 and learning_rate > 0, got {self.beta}, {self.learning_rate}")
        object.__setattr__(self, "loss_type", LossType(self.loss_type))
        object.__setattr__(self, "scale_rewards", ScaleRewards(self.scale_rewards))
        object.__setattr__(self, "lr_schedule", LRSchedule(self.lr_schedule))
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.reward_weights is not None:
            object.__setattr__(self, "reward_weights", tuple(float(w) for w in self.reward_weights))

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("loss_type", "scale_rewards", "lr_schedule"):
            d[k] = d[k].value
        d["stop"] = list(self.stop)
        return d


# ---------------------------------------------------------------------------------------------- advantages

def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (NaN with fewer than two values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    out = var.sqrt()
    return out.squeeze(dim) if dim is not None else out.reshape(())


@dataclass
class Advantages:
    advantages: torch.Tensor  # [N]
    rewards: torch.Tensor  # [N] weighted sum, NaN where every reward function returned None
    frac_zero_std: float  # share of completions whose group (or batch) std is 0: no learning signal


def compute_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int,
                       scale: ScaleRewards) -> Advantages:
    """rewards_per_func [N, F] (NaN = None), N = prompts x num_generations grouped consecutively -> advantages."""
    if rewards_per_func.shape[0] % num_generations:
        raise ValueError(f"{rewards_per_func.shape[0]} completions are not whole groups of {num_generations}")
    scale = ScaleRewards(scale)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights[None, :]).nansum(dim=1)
    rewards[unscorable] = float("nan")
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if scale is ScaleRewards.BATCH:
        std = nanstd(rewards).expand_as(rewards)
    else:  # with NONE the std only feeds the zero-std statistic
        std = nanstd(groups, dim=1).repeat_interleave(num_generations)
    adv = rewards - mean
    if scale is not ScaleRewards.NONE:
        adv = adv / (std + 1e-4)
    zero = torch.isclose(std, torch.zeros_like(std)).float().mean().item()
    return Advantages(torch.nan_to_num(adv, nan=0.0), rewards, zero)


# ---------------------------------------------------------------------------------------------- loss

def token_logps(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `ids`: logits [B, T, V], ids [B, T] -> [B, T] float32."""
    logits = logits.float() / temperature
    return torch.gather(logits, -1, ids[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)


def completion_logps(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     completion_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token log-probs of the completions: prompts left-padded [B, P], completions right-padded [B, T] -> [B, T].

    Positions count real tokens only (cumsum of the mask), as the engine numbers them, so a padded row
    is scored at the positions it was sampled at.
    """
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, torch.ones_like(completion_mask)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    T = completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=T + 1).logits
    return token_logps(logits[:, :-1], completion_ids, temperature)  # position j predicts token j + 1


@dataclass
class LossParts:
    loss: torch.Tensor
    policy_loss: float
    kl: float | None  # masked token mean of the k3 estimator (when reference logps are given)
    clip_low: float  # share of tokens whose ratio is clipped below (A < 0)
    clip_high: float  # ... clipped above (A > 0)
    clip_region: float


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
              config: GRPOConfig, *, ref_logps: torch.Tensor | None = None, num_items_in_batch: float | None = None,
              accumulation_steps: int = 1) -> LossParts:
    """The clipped surrogate of one micro-batch, reduced as TRL 1.16 reduces it (module docstring).

    logps, old_logps, ref_logps, mask: [B, T]; advantages: [B]. `num_items_in_batch` (dapo) counts the
    real completion tokens of the whole generation batch; `accumulation_steps` is the number of
    micro-batches the other loss types average over.
    """
    mask = mask.to(logps.dtype)
    adv = advantages[:, None]
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - config.epsilon_low, 1 + config.epsilon_upper)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref_logps is not None:
        per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        kl = ((per_token_kl * mask).sum() / mask.sum().clamp(min=1.0)).item()
        if config.beta != 0.0:
            per_token = per_token + config.beta * per_token_kl
    elif config.beta != 0.0:
        raise ValueError("grpo_loss: beta > 0 needs ref_logps")
    lt = config.loss_type
    if lt is LossType.GRPO:
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif lt is LossType.BNPO:
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif lt is LossType.DR_GRPO:
        loss = (per_token * mask).sum() / (per_token.shape[0] * config.max_completion_length)
    else:  # DAPO
        if num_items_in_batch is None:
            raise ValueError("grpo_loss: loss_type dapo needs num_items_in_batch (tokens of the generation batch)")
        loss = (per_token * mask).sum() / max(float(num_items_in_batch), 1.0)
    policy_loss = loss.item()
    if lt is not LossType.DAPO:
        loss = loss / accumulation_steps
    low = ((ratio < 1 - config.epsilon_low) & (adv < 0)).to(mask.dtype)
    high = ((ratio > 1 + config.epsilon_upper) & (adv > 0)).to(mask.dtype)
    n = mask.sum().clamp(min=1.0)
    return LossParts(loss, policy_loss, kl, ((low * mask).sum() / n).item(), ((high * mask).sum() / n).item(),
                     (((low + high).clamp(max=1) * mask).sum() / n).item())


# ---------------------------------------------------------------------------------------------- rollouts

@dataclass
class Rollouts:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]  # ended by the length budget, not by EOS or a stop string
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(engine, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
             top_k: int = 0, stop: Sequence[str] = (), seed: int = 0) -> Rollouts:
    """Sample (temperature > 0) or greedy-decode (temperature == 0) completions through the engine."""
    from fp4kit.engine import FinishReason, SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop=tuple(stop), seed=seed)
    _sync(engine.device)
    t0 = time.perf_counter()
    outs = engine.generate(prompt_ids, params)
    _sync(engine.device)
    seconds = time.perf_counter() - t0
    return Rollouts([list(o.prompt_ids) for o in outs], [list(o.token_ids) for o in outs], [o.text for o in outs],
                    [o.finish_reason == FinishReason.LENGTH for o in outs], seconds)


def pad_batch(rollouts: Rollouts, rows: slice, device) -> tuple[torch.Tensor, ...]:
    """(prompt_ids [B, P] left-padded, prompt_mask, completion_ids [B, T] right-padded, completion_mask)."""
    prompts, comps = rollouts.prompt_ids[rows], rollouts.completion_ids[rows]
    P, T = max(map(len, prompts)), max(1, max(map(len, comps)))
    pi = torch.zeros(len(prompts), P, dtype=torch.long)
    pm = torch.zeros_like(pi)
    ci = torch.zeros(len(comps), T, dtype=torch.long)
    cm = torch.zeros_like(ci)
    for b, (p, c) in enumerate(zip(prompts, comps)):
        pi[b, P - len(p):], pm[b, P - len(p):] = torch.tensor(p), 1
        if c:
            ci[b, :len(c)], cm[b, :len(c)] = torch.tensor(c), 1
    return pi.to(device), pm.to(device), ci.to(device), cm.to(device)


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Run the base model: every LoRALinear's update scaled by 0 for the duration."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    saved = [m.scaling for m in layers]
    for m in layers:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m.scaling = s


def norm_weights(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for n, m in model.named_modules()
            if n.rpartition(".")[2].lower().endswith("norm") and isinstance(getattr(m, "weight", None), nn.Parameter)]


@contextlib.contextmanager
def norm_noise(model: nn.Module, sigma: float, seed: int):
    """Add N(0, sigma^2) to every norm weight for the duration (QeRL AQN), then restore the exact weights."""
    if sigma <= 0:
        yield
        return
    weights = norm_weights(model)
    saved = [w.detach().clone() for w in weights]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in weights:
            w.add_((torch.randn(w.shape, generator=gen) * sigma).to(w.device, w.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s)


# ---------------------------------------------------------------------------------------------- data

@dataclass(frozen=True)
class PromptRow:
    prompt: str
    answer: str | None = None
    columns: dict = field(default_factory=dict)  # further dataset columns passed to the reward functions


def task_split(task: str, n_eval: int = 500, seed: int = 1234) -> tuple[list[PromptRow], list[PromptRow], tuple]:
    """(train rows, held-out eval rows, stop strings) of a bundled task: a fixed-seed split, the same every run."""
    from fp4kit.data import load_task

    items = load_task(task)
    if n_eval >= len(items):
        raise ValueError(f"task {task!r} has {len(items)} items; cannot hold out {n_eval}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    rows = [PromptRow(it.prompt, it.answer, {"id": it.id}) for it in items]
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held],
            tuple(items[0].stop))


def step_rows(rows: Sequence[PromptRow], step: int, per_step: int, seed: int) -> list[PromptRow]:
    """The prompts of 0-based `step`: consecutive slices of a per-epoch shuffle (a function of step alone)."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, len(rows))
        order = list(range(len(rows)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(rows[order[i]])
    return out


def score(reward_funcs: Sequence[Callable], prompts: list[str], completions: list[str],
          completion_ids: list[list[int]], rows: list[PromptRow]) -> torch.Tensor:
    """[N, F] rewards, None -> NaN; each function gets TRL's keyword arguments."""
    columns = {"answer": [r.answer for r in rows]}
    for key in rows[0].columns:
        columns[key] = [r.columns.get(key) for r in rows]
    out = torch.full((len(completions), len(reward_funcs)), float("nan"))
    for j, fn in enumerate(reward_funcs):
        values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if len(values) != len(completions):
            raise ValueError(f"reward {getattr(fn, '__name__', fn)!r} returned {len(values)} values for "
                             f"{len(completions)} completions")
        out[:, j] = torch.tensor([float("nan") if v is None else float(v) for v in values])
    return out


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(engine, tokenizer, rows: Sequence[PromptRow], reward_fn: Callable, *, max_new_tokens: int,
             stop: Sequence[str] = ()) -> dict:
    """Greedy completions of `rows` scored by `reward_fn` (exact match): {"accuracy", "n", "tokens_per_s"}."""
    was_training = engine.model.training
    engine.model.eval()
    ro = generate(engine, [encode(tokenizer, r.prompt) for r in rows], max_new_tokens=max_new_tokens,
                  temperature=0.0, stop=stop)
    engine.model.train(was_training)
    values = score([reward_fn], [r.prompt for r in rows], ro.texts, ro.completion_ids, list(rows))[:, 0]
    return {"accuracy": torch.nan_to_num(values, nan=0.0).mean().item(), "n": len(rows),
            "tokens_per_s": ro.tokens / max(ro.seconds, 1e-9)}


# ---------------------------------------------------------------------------------------------- the loop

def check_gradient_path(model: nn.Module, device: torch.device) -> None:
    """On CUDA an FP4Linear outside a LoRALinear cuts the backward path (its kernel has no backward)."""
    if device.type != "cuda":
        return
    bare = [n for n, m in model.named_modules() if isinstance(m, FP4Linear) and not n.endswith(".base")]
    if bare:
        raise ValueError(f"FP4 layers without a LoRA adapter would stop gradients on CUDA: {bare[:3]}... "
                         f"target every FP4 layer in add_lora (the default targets do for Llama-style models)")


def make_optimizer(model: nn.Module, config: GRPOConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("GRPO needs trainable parameters: call fp4kit.nn.add_lora(model, ...) first")
    opt = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                            weight_decay=config.weight_decay)

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_schedule is LRSchedule.CONSTANT:
            return 1.0
        total = config.max_steps * config.num_iterations
        return max(0.0, (total - step) / max(1, total - config.warmup_steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class StepBatch:
    rollouts: Rollouts
    advantages: Advantages
    rewards_per_func: torch.Tensor
    rows: list[PromptRow]


def rollout_step(engine, tokenizer, model, rows: list[PromptRow], reward_funcs, weights: torch.Tensor,
                 config: GRPOConfig, step: int) -> StepBatch:
    """Sample G completions per prompt (with AQN noise if configured), score them, compute advantages."""
    group_rows = [r for r in rows for _ in range(config.num_generations)]
    prompt_ids = [encode(tokenizer, r.prompt) for r in group_rows]
    sigma = config.noise.sigma(step, config.max_steps) if config.noise else 0.0
    model.eval()
    with torch.no_grad(), norm_noise(model, sigma, seed=config.seed * 7919 + step):
        ro = generate(engine, prompt_ids, max_new_tokens=config.max_completion_length, temperature=config.temperature,
                      top_p=config.top_p, top_k=config.top_k, stop=config.stop, seed=config.seed * 1_000_003 + step)
    per_func = score(reward_funcs, [r.prompt for r in group_rows], ro.texts, ro.completion_ids, group_rows)
    adv = compute_advantages(per_func, weights, config.num_generations, config.scale_rewards)
    return StepBatch(ro, adv, per_func, group_rows)


def optimize_step(model, batch: StepBatch, config: GRPOConfig, optimizer, scheduler, device) -> dict:
    """num_iterations AdamW updates on one rollout batch; returns averaged loss metrics and the train time."""
    ro, N = batch.rollouts, len(batch.rollouts.completion_ids)
    slices = [slice(i, min(i + config.micro_batch_size, N)) for i in range(0, N, config.micro_batch_size)]
    tensors = [pad_batch(ro, s, device) for s in slices]
    if config.mask_truncated_completions:
        keep = torch.tensor([not t for t in ro.truncated], dtype=torch.long)
        tensors = [(pi, pm, ci, cm * keep[s].to(device)[:, None]) for (pi, pm, ci, cm), s in zip(tensors, slices)]
    n_items = float(sum(cm.sum().item() for *_, cm in tensors))
    advantages = batch.advantages.advantages.to(device)
    t0 = time.perf_counter()
    model.eval()
    with torch.no_grad():  # old (if reused) and reference logps, before any update
        old = [completion_logps(model, *t, config.temperature) for t in tensors] if config.num_iterations > 1 else None
        ref = None
        if config.beta != 0.0 or config.log_kl:
            with adapters_off(model):
                ref = [completion_logps(model, *t, config.temperature) for t in tensors]
    model.train()
    metrics: dict[str, list[float]] = {k: [] for k in ("loss", "kl", "clip_low", "clip_high", "clip_region", "grad_norm")}
    train_tokens = 0
    for _ in range(config.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for k, (t, s) in enumerate(zip(tensors, slices)):
            logps = completion_logps(model, *t, config.temperature)
            parts = grpo_loss(logps, None if old is None else old[k], advantages[s], t[3], config,
                              ref_logps=None if ref is None else ref[k], num_items_in_batch=n_items,
                              accumulation_steps=len(tensors))
            parts.loss.backward()
            train_tokens += int(t[1].sum() + t[3].numel())
            metrics["loss"].append(parts.policy_loss)
            for key in ("clip_low", "clip_high", "clip_region"):
                metrics[key].append(getattr(parts, key))
            if parts.kl is not None:
                metrics["kl"].append(parts.kl)
        params = [p for p in model.parameters() if p.requires_grad]
        metrics["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)))
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    _sync(device)
    seconds = time.perf_counter() - t0
    out = {k: sum(v) / len(v) for k, v in metrics.items() if v}
    return out | {"train_seconds": seconds, "train_tokens_per_s": train_tokens / max(seconds, 1e-9)}


def step_metrics(batch: StepBatch, reward_funcs, train: dict, lr: float, sigma: float) -> dict:
    ro, adv = batch.rollouts, batch.advantages
    r = adv.rewards
    out = {"reward": torch.nanmean(r).item(), "reward_std": nanstd(r).item(),
           "frac_reward_zero_std": adv.frac_zero_std,
           "completion_length": ro.tokens / len(ro.completion_ids),
           "truncated": sum(ro.truncated) / len(ro.truncated),
           "rollout_tokens": ro.tokens, "rollout_seconds": ro.seconds,
           "rollout_tokens_per_s": ro.tokens / max(ro.seconds, 1e-9), "lr": lr, "noise_sigma": sigma}
    for j, fn in enumerate(reward_funcs):
        name = getattr(fn, "__name__", f"reward_{j}")
        out[f"rewards/{name}"] = torch.nanmean(batch.rewards_per_func[:, j]).item()
        if name.startswith("accuracy"):
            out.setdefault("accuracy", out[f"rewards/{name}"])
    return out | train


def train_grpo(model: nn.Module, tokenizer, rows: Sequence[PromptRow], reward_funcs: Sequence[Callable],
               config: GRPOConfig, out_dir: str | pathlib.Path, *, engine=None, resume: bool = True,
               base_model_name: str | None = None, progress: bool = True, on_step: Callable | None = None,
               time_limit: float | None = None) -> list[dict]:
    """Run GRPO for config.max_steps steps on `model` (LoRA already added); write logs, checkpoints, adapter.

    out_dir/metrics.jsonl      one record per step (see step_metrics)
    out_dir/reward.png         reward and accuracy curves
    out_dir/checkpoints/       save_state folders every save_steps (resumed from when resume=True)
    out_dir/adapter/           PEFT-style adapter folder at the end
    `time_limit` (seconds) ends the run early, after the step that crosses it, with a checkpoint and the adapter.
    Returns the records logged by this call.
    """
    from fp4kit.engine import Engine

    out_dir = pathlib.Path(out_dir)
    if not rows:
        raise ValueError("train_grpo: no prompts")
    weights = torch.tensor(config.reward_weights or [1.0] * len(reward_funcs), dtype=torch.float32)
    if weights.numel() != len(reward_funcs):
        raise ValueError(f"{len(reward_funcs)} reward functions but {weights.numel()} reward_weights")
    device = next(model.parameters()).device
    check_gradient_path(model, device)
    optimizer, scheduler = make_optimizer(model, config)
    start = 0
    ckpt_root = out_dir / "checkpoints"
    if resume and latest_checkpoint(ckpt_root) is not None:
        start, _ = load_state(ckpt_root, model, optimizer, scheduler)
    if engine is None:
        longest = max(len(encode(tokenizer, r.prompt)) for r in rows)
        engine = Engine(model, tokenizer, max_batch=min(256, config.prompts_per_step * config.num_generations),
                        max_seq_len=longest + config.max_completion_length + 1)
    logger = JsonlLogger(out_dir / "metrics.jsonl")
    records = []
    t_start = time.perf_counter()
    for step in tqdm(range(start, config.max_steps), desc="grpo", disable=not progress, initial=start,
                     total=config.max_steps):
        batch = rollout_step(engine, tokenizer, model, step_rows(rows, step, config.prompts_per_step, config.seed),
                             reward_funcs, weights, config, step)
        lr = scheduler.get_last_lr()[0]
        train = optimize_step(model, batch, config, optimizer, scheduler, device)
        sigma = config.noise.sigma(step, config.max_steps) if config.noise else 0.0
        record = logger.log(step + 1, **step_metrics(batch, reward_funcs, train, lr, sigma))
        records.append(record)
        out_of_time = time_limit is not None and time.perf_counter() - t_start > time_limit
        if (step + 1) % config.save_steps == 0 or step + 1 == config.max_steps or out_of_time:
            save_state(ckpt_root, step + 1, model, optimizer, scheduler,
                       extra={"config": config.to_json(), "step": step + 1})
        if on_step is not None:
            on_step(step + 1, record)
        if out_of_time:
            break
    if (out_dir / "metrics.jsonl").exists():
        keys = ["reward"] + (["accuracy"] if any("accuracy" in r for r in records) else [])
        plot_metrics(out_dir / "metrics.jsonl", keys, out_dir / "reward.png", title="GRPO")
    save_adapter(model, out_dir / "adapter", base_model_name=base_model_name)
    return records


# ---------------------------------------------------------------------------------------------- a bundled task end to end

class Base(str, Enum):
    """The frozen base the adapters train on."""

    FP4 = "fp4"  # every targeted linear layer quantized (quantize_), then wrapped by LoRA
    BF16 = "bf16"  # the model as loaded


def prepare_policy(model: nn.Module, base: Base, fmt, lora) -> dict:
    """Quantize (for an FP4 base) and add LoRA adapters; returns what was done."""
    from fp4kit.nn import add_lora, quantize_

    info = {"base": Base(base).value}
    if Base(base) is Base.FP4:
        report = quantize_(model, fmt, progress=False)
        info |= {"format": fmt.name, "quantized_layers": len(report.quantized)}
    lora_report = add_lora(model, config=lora)
    info |= {"lora_layers": len(lora_report.wrapped), "trainable_params": lora_report.trainable_parameters(model)}
    return info


def run_task(model: nn.Module, tokenizer, task: str, config: GRPOConfig, out_dir: str | pathlib.Path, *,
             eval_limit: int = 500, train_limit: int | None = None, format_weight: float = 0.0,
             base_model_name: str | None = None, resume: bool = True, progress: bool = True,
             cuda_graphs: bool = True, time_limit: float | None = None) -> dict:
    """GRPO on a bundled task (fixed train/held-out split), greedy exact match before and after.

    Returns (and writes to out_dir/summary.json) {"before", "after", "steps", "train_rows", ...}.
    """
    import json

    from fp4kit.engine import Engine

    from .rewards import task_rewards

    train_rows, eval_rows, stops = task_split(task, n_eval=500)  # the same held-out 500 whatever eval_limit is
    train_rows = train_rows[:train_limit] if train_limit else train_rows
    eval_rows = eval_rows[:eval_limit] if eval_limit else []
    config = GRPOConfig(**{**config.__dict__, "stop": config.stop or stops})
    funcs, weights = task_rewards(task, format_weight)
    if config.reward_weights is None:
        config = GRPOConfig(**{**config.__dict__, "reward_weights": tuple(weights)})
    longest = max(len(encode(tokenizer, r.prompt)) for r in train_rows + eval_rows)
    engine = Engine(model, tokenizer, max_batch=min(512, max(config.prompts_per_step * config.num_generations,
                                                              len(eval_rows) or 1)),
                    max_seq_len=longest + config.max_completion_length + 1, cuda_graphs=cuda_graphs)
    accuracy = funcs[0]
    summary = {"task": task, "train_rows": len(train_rows), "eval_rows": len(eval_rows), "config": config.to_json()}
    eval_kw = dict(max_new_tokens=config.max_completion_length, stop=config.stop)
    if eval_rows:
        summary["before"] = evaluate(engine, tokenizer, eval_rows, accuracy, **eval_kw)
    t0 = time.perf_counter()
    records = train_grpo(model, tokenizer, train_rows, funcs, config, out_dir, engine=engine, resume=resume,
                         base_model_name=base_model_name, progress=progress, time_limit=time_limit)
    summary["train_seconds"] = time.perf_counter() - t0
    summary["steps"] = records[-1]["step"] if records else config.max_steps
    if records:
        n = len(records)
        summary["rollout_tokens_per_s"] = sum(r["rollout_tokens"] for r in records) / sum(r["rollout_seconds"] for r in records)
        summary["reward_first"] = sum(r["reward"] for r in records[: max(1, n // 10)]) / max(1, n // 10)
        summary["reward_last"] = sum(r["reward"] for r in records[-max(1, n // 10):]) / max(1, n // 10)
    if eval_rows:
        summary["after"] = evaluate(engine, tokenizer, eval_rows, accuracy, **eval_kw)
    out = pathlib.Path(out_dir) / "summary.json"
    tmp = out.with_name(".summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out)
    return summary
