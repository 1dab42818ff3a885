"""FP4 quantization-aware training (QAT) and distillation (QAD), on one GPU or several.

The student is a model prepared with `fp4kit.nn.fake_quant.prepare_qat`: float master weights
(FP32), every forward on the FP4 grid, straight-through gradients. The loss is one of

    CE     next-token cross-entropy on the text:          -log p_s(x_t | x_<t)
    KD     distillation (QAD): KL from the teacher         T^2 * KL(p_t^T || p_s^T), mean over tokens
           (the float/bf16 model) to the student, both at temperature T
    BOTH   ce_weight * CE + (1 - ce_weight) * KD

KD needs no labels and matches the whole distribution the float model had, which is what a
quantized model should recover; NVIDIA's QAD recipe uses it, with the bf16 model as teacher.

One optimizer step: `grad_accum` micro-batches of `batch_size` windows of `seq_len` tokens,
each forward under bf16 autocast on CUDA (FP32 master weights, bf16 matmuls); gradients
clipped to `clip_grad` (global L2 norm); AdamW; learning rate warmed up linearly for
`warmup_steps`, then a cosine from `lr` down to `lr * min_lr_ratio` at the last step.

Data: windows start at random offsets of a token stream, drawn from a generator seeded by
(seed, step). A step's batch is thus a function of the step number alone, so a resumed run sees
the batches the killed one would have, and with DDP every rank draws the same global batch and
takes its own slice: N GPUs see exactly the batches one GPU sees (the loss curves can be
compared step for step).

Checkpoints (`fp4kit.train.state`) every `save_every` steps (and at the last) under
`out/checkpoints/`, resumed automatically; `out/log.jsonl` gets one line per step (loss, ce, kd, lr, grad_norm, tokens/s)
and `out/loss.png` the curves. Multi-GPU: launch with `torchrun --nproc-per-node N`; the loop
wraps the student in DistributedDataParallel when a process group is initialized, rank 0 alone
writes logs and checkpoints.

Simplifications: the teacher runs in full each micro-batch (no cached logits); the data are
random windows of one stream (no document boundaries); evaluation happens outside the loop.
"""

from __future__ import annotations

import contextlib
import enum
import math
import pathlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fp4kit.nn.fake_quant import FakeQuantLinear

from .state import JsonlLogger, latest_checkpoint, load_state, plot_metrics, save_state


class Loss(enum.Enum):
    """What the student is trained to match (see the module docstring for the formulas)."""

    CE = "ce"  # the text's next tokens
    KD = "kd"  # the teacher's distribution (QAD)
    BOTH = "both"  # ce_weight * CE + (1 - ce_weight) * KD


class Trainable(enum.Enum):
    """Which parameters of the student are trained."""

    QUANTIZED = "quantized"  # the fake-quantized linear layers' weights and biases
    NON_EMBEDDING = "non-embedding"  # everything but the token embeddings (and a head tied to them)
    ALL = "all"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    lr: float = 1e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    clip_grad: float = 1.0
    loss: Loss = Loss.KD
    kd_temperature: float = 1.0
    ce_weight: float = 0.5
    trainable: Trainable = Trainable.NON_EMBEDDING
    bf16_autocast: bool = True  # on CUDA only; CPU runs in the master weights' precision
    save_every: int = 0  # 0: no checkpoints
    keep: int = 2
    seed: int = 0
    bos_token: int | None = None  # models that always see a BOS first (Gemma-3): every window starts with it

    def __post_init__(self):
        positive = ("steps", "batch_size", "seq_len", "grad_accum")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.ce_weight <= 1:
            raise ValueError(f"TrainConfig.ce_weight must be in [0, 1], got {self.ce_weight}")
        if self.warmup_steps < 0 or self.save_every < 0 or self.keep < 0:
            raise ValueError("TrainConfig.warmup_steps, save_every and keep must be >= 0")
        if not self.kd_temperature > 0:
            raise ValueError(f"TrainConfig.kd_temperature must be > 0, got {self.kd_temperature}")
        if not isinstance(self.loss, Loss) or not isinstance(self.trainable, Trainable):
            raise TypeError("TrainConfig.loss must be a Loss and trainable a Trainable (enums, not strings)")
        if self.bos_token is not None and (isinstance(self.bos_token, bool) or not isinstance(self.bos_token, int)
                                           or self.bos_token < 0):
            raise ValueError(f"TrainConfig.bos_token must be a token id >= 0 or None, got {self.bos_token!r}")

    def as_json(self) -> dict:
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float
    tokens_per_s: float
    seconds: float
    log_path: pathlib.Path | None
    plot_path: pathlib.Path | None
    resumed_from: int


# ------------------------------------------------------------------------------------------------ pieces

def cosine_lr(step: int, config: TrainConfig) -> float:
    """Multiplier of `lr` at optimizer step `step` (0-based): linear warm-up, then cosine to min_lr_ratio."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps - 1, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def split_tokens(ids: torch.Tensor, eval_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) parts of a token stream: the held-out part is its last `eval_fraction`."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    cut = int(ids.numel() * (1 - eval_fraction))
    return ids[:cut], ids[cut:]


def batch_for_step(tokens: torch.Tensor, step: int, config: TrainConfig, *, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's windows for optimizer step `step`: [grad_accum, batch_size, seq_len + 1] int64.

    The global batch (world * batch_size windows per micro-batch) depends on (seed, step) only. With
    `config.bos_token` each window is BOS followed by seq_len tokens of the stream (the first is predicted from
    BOS alone), as a model trained with a BOS at every sequence start sees its text; else seq_len + 1 tokens.
    """
    body = config.seq_len + (config.bos_token is None)  # stream tokens per window
    n = tokens.numel() - body
    if n < 1:
        raise ValueError(f"the training text has {tokens.numel()} tokens, fewer than {body + 1} (seq_len "
                         f"{config.seq_len} + {1 + (config.bos_token is None)})")
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    starts = torch.randint(0, n, (config.grad_accum, world * config.batch_size), generator=gen)
    starts = starts[:, rank * config.batch_size:(rank + 1) * config.batch_size]
    windows = tokens[starts.unsqueeze(-1) + torch.arange(body)]
    if config.bos_token is not None:
        windows = torch.cat([windows.new_full((*windows.shape[:-1], 1), config.bos_token), windows], dim=-1)
    return windows


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, mean over tokens. logits: [..., V]."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def select_trainable(model: nn.Module, which: Trainable) -> list[nn.Parameter]:
    """Set requires_grad by `which` and return the trainable parameters (each once)."""
    fake = {id(p) for m in model.modules() if isinstance(m, FakeQuantLinear) for p in m.parameters(recurse=False)}
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embed_ids = {id(p) for p in embed.parameters()} if embed is not None else set()
    chosen = []
    for p in model.parameters():
        if which is Trainable.QUANTIZED:
            keep = id(p) in fake
        elif which is Trainable.NON_EMBEDDING:
            keep = id(p) not in embed_ids
        else:
            keep = True
        p.requires_grad_(keep)
        if keep:
            chosen.append(p)
    if not chosen:
        raise ValueError(f"no parameter is trainable with trainable={which.value} (was prepare_qat run?)")
    return chosen


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def micro_step_loss(student, teacher, window: torch.Tensor, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Loss of one micro-batch window [B, S+1]: {"loss", "ce"?, "kd"?}."""
    inputs, targets = window[:, :-1], window[:, 1:]
    logits = student(input_ids=inputs).logits  # [B, S, V]
    out = {}
    if config.loss in (Loss.CE, Loss.BOTH):
        out["ce"] = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    if config.loss in (Loss.KD, Loss.BOTH):
        with torch.no_grad():
            teacher_logits = teacher(input_ids=inputs).logits
        out["kd"] = kd_loss(logits, teacher_logits, config.kd_temperature)
    if config.loss is Loss.CE:
        out["loss"] = out["ce"]
    elif config.loss is Loss.KD:
        out["loss"] = out["kd"]
    else:
        out["loss"] = config.ce_weight * out["ce"] + (1 - config.ce_weight) * out["kd"]
    return out


# ------------------------------------------------------------------------------------------------ the loop

def train_qat(student: nn.Module, tokens: torch.Tensor, config: TrainConfig, *, teacher: nn.Module | None = None,
              out: str | pathlib.Path | None = None, resume: bool = True, progress: bool = True,
              on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train `student` (prepared with prepare_qat, on its device) on the token stream `tokens` [T].

    `out` (rank 0) receives log.jsonl, loss.png and checkpoints/; with `resume` a run continues
    from the newest checkpoint there. `on_step(step, metrics)` is called after each step.
    """
    if config.loss is not Loss.CE and teacher is None:
        raise ValueError(f"loss={config.loss.value} needs a teacher model")
    rank, world = _dist()
    device = next(student.parameters()).device
    params = select_trainable(student, config.trainable)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, config))
    out = pathlib.Path(out) if out is not None else None
    ckpt_root = out / "checkpoints" if out is not None else None
    start = 0
    if resume and ckpt_root is not None and latest_checkpoint(ckpt_root) is not None:
        done, _extra = load_state(ckpt_root, student, optimizer, scheduler)
        start = done
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    model = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    logger = JsonlLogger(out / "log.jsonl") if out is not None and rank == 0 else None
    tokens_per_step = config.grad_accum * config.batch_size * config.seq_len * world
    t_begin, last, tok_s = time.perf_counter(), {"loss": float("nan")}, 0.0
    for step in tqdm(range(start, config.steps), desc="qat", disable=not progress or rank != 0, initial=start,
                     total=config.steps):
        t0 = time.perf_counter()
        windows = batch_for_step(tokens, step, config, rank=rank, world=world).to(device)
        sums: dict[str, float] = {}
        for i in range(config.grad_accum):
            sync = i == config.grad_accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()), _autocast(device, config.bf16_autocast):
                parts = micro_step_loss(model, teacher, windows[i], config)
            (parts["loss"] / config.grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / config.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            for v in sums.values():  # SUM then divide: gloo (CPU) has no AVG
                torch.distributed.all_reduce(v)
                v.div_(world)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tok_s = tokens_per_step / (time.perf_counter() - t0)
        last = {k: float(v) for k, v in sums.items()} | {"lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s}
        if logger is not None:
            logger.log(step + 1, **last)
        done = step + 1
        if ckpt_root is not None and rank == 0 and config.save_every and (
                done % config.save_every == 0 or done == config.steps):
            save_state(ckpt_root, done, student, optimizer, scheduler, extra={"config": config.as_json()},
                       keep=config.keep)
        if on_step is not None:
            on_step(done, last)
    seconds = time.perf_counter() - t_begin
    plot = None
    if logger is not None and logger.path.exists():
        keys = ["loss", "lr"] + [k for k in ("ce", "kd") if k in last]
        plot = plot_metrics(logger.path, keys, out / "loss.png", title=f"FP4 QAT ({config.loss.value})")
    model.eval()
    steps_run = config.steps - start
    return TrainResult(config.steps, last["loss"], tokens_per_step * steps_run / seconds if steps_run else 0.0, seconds,
                       logger.path if logger else None, plot, start)
