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
- Online (not here yet): where a nonlinearity or a norm sits in between (down_proj's input after
  SiLU*up), the activation must be multiplied by R at run time; that is a kernel's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RotationConfig:
    """`block_size`: Hadamard block (power of two); `random_signs` with `seed`: R = diag(s) H."""

    block_size: int = 128
    random_signs: bool = False
    seed: int = 0

    def __post_init__(self):
        b = self.block_size
        if not isinstance(b, int) or b < 1 or b & (b - 1):
            raise ValueError(f"RotationConfig.block_size must be a power of two, got {b!r}")


def hadamard(n: int, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix [n, n] (n a power of two): entries +-1/sqrt(n)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype)


def rotation_matrix(dim: int, config: RotationConfig = RotationConfig(), *, dtype=torch.float32,
                    name: str = "rotation") -> torch.Tensor:
    """Block-diagonal R [dim, dim]: I_{dim/b} (x) H_b, rows scaled by random signs if asked."""
    if dim % config.block_size:
        raise ValueError(f"{name}: dim {dim} is not divisible by the rotation block {config.block_size}")
    R = torch.block_diag(*[hadamard(config.block_size, torch.float64)] * (dim // config.block_size))
    if config.random_signs:
        g = torch.Generator().manual_seed(config.seed)
        signs = torch.randint(0, 2, (dim,), generator=g, dtype=torch.float64) * 2 - 1
        R = signs.unsqueeze(1) * R
    return R.to(dtype)


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
