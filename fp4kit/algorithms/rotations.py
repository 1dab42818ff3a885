"""Rotations: spread outliers across a block before quantizing, with an orthogonal matrix R.

A linear layer computes y = x W^T. For any orthogonal R (R R^T = I),

    y = x W^T = (x R) (W R)^T

so quantizing W R in place of W changes nothing in exact arithmetic as long as the layer's input
arrives as x R. A heavy-tailed row of W (a few large weights) quantizes badly: the outlier sets
its block's scale and the small weights round to zero. Multiplying by a Hadamard matrix spreads
each outlier over the whole rotation block, so the rotated row is closer to Gaussian and its FP4
error drops (MR-GPTQ, Egiazarian et al. 2025; QuaRot; SpinQuant).

The rotations here are block Hadamard: R = I_{K/b} (x) H_b / sqrt(b), b in {16, 32, 128} (or any
power of two), optionally with random signs R = diag(s) R (s in {-1, +1}^K, from a seed), which
breaks the structure a plain Hadamard can line up with. A block the size of the FP4 block (16
NVFP4, 32 MXFP4) mixes only within a scale block; 128 mixes across blocks.

Where the rotation goes:
- Folded into weights (free at inference): the input side of a layer, W' = W R, whenever the
  producer of its input is linear and can emit x R: `rotate_output` turns the producer's
  W_p into R^T W_p (and b_p into b_p R). `rotate_linear_pair` does both for a pair with nothing
  nonlinear between them (attention's v_proj -> o_proj per head, when the rotation block divides
  the head dim: attention mixes tokens, not features within a head).
- Online: where a nonlinearity or a norm sits in between (q/k/v and gate/up read the RMSNorm's
  output, down_proj reads SiLU(gate) * up), the layer rotates its own input at run time:
  `RotatedLinear` in float, `FP4Linear(rotation=...)` once quantized (`fp4kit.nn.rotation`).

`rotate_model_` applies MR-GPTQ's placement to a transformers decoder: every layer `quantize_`
would quantize gets an input rotation; o_proj's is folded into v_proj when the rotation block
divides the head dim (one sign pattern per head, repeated over the heads, so grouped-query
attention, where several query heads read one value head, stays exact), and every other layer
(q/k/v, gate/up, down, and o_proj when the block does not divide the head dim) is online.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fp4kit.nn import DEFAULT_IGNORE
from fp4kit.nn.quantize import exclusion_reason, is_plain_linear
from fp4kit.nn.rotation import (RotatedLinear, RotationConfig, check_rotatable, hadamard, rotate_blocks,  # noqa: F401
                                rotation_matrix, rotation_signs)


def rotate_input(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """W [out, in] -> W R: the layer then expects its input as x R."""
    return (W.double() @ R.double()).to(W.dtype)


def rotate_output(W: torch.Tensor, bias: torch.Tensor | None, R: torch.Tensor):
    """W [out, in], bias [out] -> (R^T W, bias R): the layer then emits y R in place of y."""
    W2 = (R.double().T @ W.double()).to(W.dtype)
    return W2, None if bias is None else (bias.double() @ R.double()).to(bias.dtype)


@torch.no_grad()
def rotate_linear_pair(producer: nn.Linear, consumer: nn.Linear, R: torch.Tensor) -> None:
    """In place: producer emits y R, consumer reads it with W_c R; consumer(producer(x)) is unchanged.

    Only valid when what runs between them commutes with R (nothing, a head reshape whose head
    dim R's blocks divide, or attention's token mixing).
    """
    if producer.out_features != R.shape[0] or consumer.in_features != R.shape[0]:
        raise ValueError(f"rotation [{R.shape[0]}] does not fit producer out_features {producer.out_features} "
                         f"and consumer in_features {consumer.in_features}")
    W, b = rotate_output(producer.weight, producer.bias, R)
    producer.weight.copy_(W)
    if b is not None:
        producer.bias.copy_(b)
    consumer.weight.copy_(rotate_input(consumer.weight, R))


def head_rotation(heads: int, head_dim: int, config: RotationConfig) -> torch.Tensor:
    """R [heads * head_dim] = I_heads (x) R_head: the same per-head rotation (signs included) in every head."""
    return torch.block_diag(*[rotation_matrix(head_dim, config, dtype=torch.float64)] * heads)


@torch.no_grad()
def fold_attention(attn: nn.Module, config: RotationConfig) -> bool:
    """Fold o_proj's input rotation into v_proj's output, per head; False when it cannot be folded.

    v_proj emits v R_kv (R_kv = I_{kv heads} (x) R_head); attention mixes tokens within each head and
    each query head reads one value head, so o_proj receives (attention output) R_q with
    R_q = I_{heads} (x) R_head, and o_proj's weight becomes W_o R_q.
    """
    v, o = getattr(attn, "v_proj", None), getattr(attn, "o_proj", None)
    head_dim = getattr(attn, "head_dim", None)
    if not (isinstance(v, nn.Linear) and isinstance(o, nn.Linear) and head_dim) or head_dim % config.block_size:
        return False
    if v.out_features % head_dim or o.in_features % head_dim:
        return False
    R_v = head_rotation(v.out_features // head_dim, head_dim, config).to(v.weight.device)
    R_o = head_rotation(o.in_features // head_dim, head_dim, config).to(o.weight.device)
    W, b = rotate_output(v.weight, v.bias, R_v)
    v.weight.copy_(W)
    if b is not None:
        v.bias.copy_(b)
    o.weight.copy_(rotate_input(o.weight, R_o))
    return True


def rotate_model_(model: nn.Module, format_config, rotation: RotationConfig, *,
                  filter_fn: Callable[[nn.Module, str], bool] | None = None,
                  ignore: tuple[str, ...] = DEFAULT_IGNORE, fold: bool = True) -> dict[str, str]:
    """Rotate the inputs of every layer `quantize_(model, format_config, filter_fn, ignore=ignore)` would
    quantize, in place, keeping the model's function: o_proj folded into v_proj where possible, the rest
    swapped for `RotatedLinear`. Returns {layer: "online" | "folded into <v_proj>"}.

    Every chosen layer's in_features must be divisible by the block: a ValueError names the first that is
    not, before anything is changed."""
    chosen = {n: m for n, m in model.named_modules()
              if is_plain_linear(m) and exclusion_reason(n, m, format_config, filter_fn, ignore) is None}
    for name, m in chosen.items():
        if isinstance(m, RotatedLinear):
            raise ValueError(f"{name}: already rotated; rotate a model once")
        check_rotatable(m.in_features, rotation, name)
    plan = {}
    if fold:
        for name, attn in model.named_modules():
            prefix = f"{name}." if name else ""
            v, o = f"{prefix}v_proj", f"{prefix}o_proj"
            if o in chosen and fold_attention(attn, rotation):
                plan[o] = f"folded into {v}"
    for name, m in chosen.items():
        if name in plan:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                RotatedLinear.from_linear(m, rotation, name=name))
        plan[name] = "online"
    return plan
