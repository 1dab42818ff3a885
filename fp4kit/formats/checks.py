"""Input validation shared by every quantizer: errors name the tensor they are about."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float tensor (float32/bfloat16/float16/float64), got {x.dtype}")


def check_finite(x: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(bad.sum()) - n_nan
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: {n_nan} NaN and {n_inf} Inf values (first at index {first}); "
                         "FP4 has no encoding for them")


def check_blocks(x: torch.Tensor, block_size: int, name: str, fmt: str) -> None:
    if x.dim() == 0 or x.shape[-1] % block_size:
        last = x.shape[-1] if x.dim() else "a scalar"
        raise ValueError(f"{name}: {fmt} needs the last dim divisible by {block_size}; shape is "
                         f"{tuple(x.shape)} (last dim {last})")


def check_quantizable(x: torch.Tensor, block_size: int, name: str, fmt: str) -> None:
    check_float(x, name)
    check_blocks(x, block_size, name, fmt)
    check_finite(x, name)
