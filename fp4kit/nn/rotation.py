"""Block-Hadamard input rotations as a module property: R = diag(s) (I_{K/b} (x) H_b).

A linear layer y = x W^T computes the same function as y = (x R) (W R)^T for any orthogonal R.
Quantizing W R in place of W spreads each outlier weight over a block of b inputs (MR-GPTQ,
QuaRot): the FP4 grid then fits the block better. The price is that the layer's input must
arrive as x R. Where nothing produces it rotated, the layer rotates it itself, at run time
("online"), and that is what this module gives `FP4Linear` and `RotatedLinear`:

    R     = diag(s) . blockdiag(H_b, ..., H_b)         [K, K], H_b = Sylvester Hadamard / sqrt(b)
    x R   = ((x * s).view(..., K/b, b) @ H_b).view(..., K)   cost: K*b multiply-adds per token

`s` in {-1, +1}^K comes from `torch.Generator().manual_seed(seed)` (all +1 without random signs),
so a layer is rebuilt from (block_size, random_signs, seed) alone: R itself is never stored. H_b is
symmetric (H_b^T = H_b = H_b^-1), which is why the same matrix serves weights and activations.

`RotatedLinear` is the float state in between: an `nn.Linear` whose weight already is W R and whose
forward rotates its input, so a rotated float model computes the original function (up to float
rounding) and calibration hooks see what the quantized layer will see. `quantize_` turns it into an
`FP4Linear` with the same rotation. The primitives live here (not in `fp4kit.algorithms`) because
`nn` modules need them and imports only go down; `fp4kit.algorithms.rotations` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RotationConfig:
    """`block_size`: Hadamard block b (power of two); `random_signs` with `seed`: R = diag(s) (I (x) H_b)."""

    block_size: int = 128
    random_signs: bool = False
    seed: int = 0

    def __post_init__(self):
        b = self.block_size
        if not isinstance(b, int) or isinstance(b, bool) or b < 1 or b & (b - 1):
            raise ValueError(f"RotationConfig.block_size must be a power of two, got {b!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"RotationConfig.seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict:
        return {"block_size": self.block_size, "random_signs": self.random_signs, "seed": self.seed}


def hadamard(n: int, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix [n, n] (n a power of two): entries +-1/sqrt(n)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype)


def rotation_signs(dim: int, config: RotationConfig, dtype=torch.float32) -> torch.Tensor | None:
    """s [dim] in {-1, +1} from the config's seed, or None without random signs."""
    if not config.random_signs:
        return None
    g = torch.Generator().manual_seed(config.seed)
    return (torch.randint(0, 2, (dim,), generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def check_rotatable(dim: int, config: RotationConfig, name: str) -> None:
    if dim % config.block_size:
        raise ValueError(f"{name}: in_features {dim} is not divisible by the rotation block {config.block_size}; "
                         f"choose a block size dividing {dim} or exclude the layer")


def rotation_matrix(dim: int, config: RotationConfig = RotationConfig(), *, dtype=torch.float32,
                    name: str = "rotation") -> torch.Tensor:
    """Block-diagonal R [dim, dim]: I_{dim/b} (x) H_b, rows scaled by random signs if asked."""
    if dim % config.block_size:
        raise ValueError(f"{name}: dim {dim} is not divisible by the rotation block {config.block_size}")
    R = torch.block_diag(*[hadamard(config.block_size, torch.float64)] * (dim // config.block_size))
    signs = rotation_signs(dim, config, torch.float64)
    if signs is not None:
        R = signs.unsqueeze(1) * R
    return R.to(dtype)


def rotate_blocks(x: torch.Tensor, h: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] -> x R in float32 then x's dtype; h [b, b] = H_b, signs [K] or None."""
    b = h.shape[0]
    y = x.float()
    if signs is not None:
        y = y * signs
    return (y.reshape(*x.shape[:-1], x.shape[-1] // b, b) @ h).reshape(x.shape).to(x.dtype)


class InputRotation(nn.Module):
    """Holds H_b and the signs as non-persistent buffers (rebuilt from the config, never saved)."""

    def __init__(self, in_features: int, config: RotationConfig, *, device=None, name: str = "linear"):
        super().__init__()
        if not isinstance(config, RotationConfig):
            raise TypeError(f"{name}: rotation must be a RotationConfig, got {type(config).__name__}")
        check_rotatable(in_features, config, name)
        self.config = config
        self.register_buffer("hadamard", hadamard(config.block_size).to(device), persistent=False)
        signs = rotation_signs(in_features, config)
        self.register_buffer("signs", None if signs is None else signs.to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> x R: [..., K]
        return rotate_blocks(x, self.hadamard, self.signs)

    def extra_repr(self) -> str:
        c = self.config
        return f"block={c.block_size}" + (f", random_signs(seed={c.seed})" if c.random_signs else "")


def rotate_weight(weight: torch.Tensor, config: RotationConfig, name: str = "linear") -> torch.Tensor:
    """W [out, in] -> W R (in float64, back in W's dtype)."""
    check_rotatable(weight.shape[-1], config, name)
    W = weight.double()
    signs = rotation_signs(W.shape[-1], config, torch.float64)
    if signs is not None:
        W = W * signs.to(W.device)
    b = config.block_size
    return (W.reshape(*W.shape[:-1], -1, b) @ hadamard(b, torch.float64).to(W.device)).reshape(W.shape).to(weight.dtype)


class RotatedLinear(nn.Linear):
    """A float linear layer holding W R that rotates its input online: forward(x) = (x R) (W R)^T + b."""

    def __init__(self, in_features: int, out_features: int, rotation: RotationConfig, *, bias: bool = True,
                 device=None, dtype=None, name: str = "linear"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rotation = InputRotation(in_features, rotation, device=device, name=name)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rotation: RotationConfig, *, name: str = "linear") -> "RotatedLinear":
        w = linear.weight
        out = cls(linear.in_features, linear.out_features, rotation, bias=linear.bias is not None, device=w.device,
                  dtype=w.dtype, name=name)
        out.weight.copy_(rotate_weight(w.detach(), rotation, name))
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        return out

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        return F.linear(self.rotate(x), self.weight, self.bias)
