"""GPTQ for FP4: quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized, in the direction the layer's inputs make cheapest.

A linear layer y = x W^T sees calibration inputs X [tokens, K]; the output error of a quantized
Q is ||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T) with H = X^T X [K, K]. GPTQ (Frantar et al.
2022) minimises it greedily. Quantizing column j with error e_j = w_j - q(w_j), the optimal
correction of the remaining columns F is the Optimal Brain Surgeon update

    W[:, F] -= (e_j / [H_F^-1]_jj) * [H_F^-1]_{j, F}

and the rows [H_F^-1]_{j, F} for every step are the rows of the upper Cholesky factor U of
H^-1 (scaled by U_jj), so one factorisation serves the whole sweep:

    H    <- H + damp * mean(diag H) * I           damping: H is often near-singular
    U     = cholesky(H^-1, upper=True)
    for each column j:  q_j = quantize(w_j);  err = (w_j - q_j) / U_jj;  W[:, j+1:] -= err U_{j, j+1:}

Lazy batches: the updates inside a block of `block_size` columns are applied at once to the
columns after the block (one matmul), which is what makes it fast; the result is the same.

FP4 specifics (this is where fp4kit departs from integer GPTQ):
- Scales are fixed from the weights before the sweep, by RTN or by the scale search
  (`scale_search`), and never revised: an NVFP4/MXFP4 block's scale must fit its 16/32 elements
  after they have all been moved, and fixing it first keeps the checkpoint layout identical to
  RTN's. Each column is then rounded with the formats' arithmetic against its block's scale.
- So with H = I (no correlation between inputs) no error propagates and GPTQ returns RTN's bytes.
- `dynamic_scales` (option, off by default): instead, choose each block's scale (RTN or the scale
  search, same candidates) when the sweep reaches the block's first column, from the block's weights as
  the updates so far have moved them (what integer GPTQ does with its groups when they are not static).
  The NVFP4 global scale stays the one fixed from the original weights' amax (or the fused shards'; the
  scale search's `global_steps` does not apply here); a block that has grown past it saturates its UE4M3
  scale, as the formats do. With H = I nothing moves and the result is again RTN's (or the search's)
  bytes. Needs the sweep in column order (no act_order) and lazy batches that hold whole blocks
  (block_size a multiple of the format's block). Measured: lower output error and perplexity, not higher
  task accuracy (docs/ptq.md), so off by default.
- act_order: process columns by decreasing H_jj (most active inputs first). Because scales are
  fixed per original block, the permutation only changes the order of the sweep; codes are
  written back at their original column, so the output layout is unchanged.
- Dead inputs (H_jj = 0: never active in calibration) get H_jj = 1. Their columns receive no
  updates and are rounded as RTN would (the reference zeroes them; we keep them, in case the
  calibration set simply missed them).

Simplifications against IST-DASLab's gptq.py: no static grouping or zero-points (the FP4 format
fixes the groups), no in-place layer mutation; a pure function of (W, H, format config).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4kit.formats import (MXFP4Config, NVFP4Config, QuantizedTensor, check_finite, check_quantizable,
                            e2m1_codes_to_float, pack_codes, quantize)
from fp4kit.formats.scales import pow2

from .scale_search import ScaleSearchConfig, mxfp4_codes, nvfp4_codes, scale_search


@dataclass(frozen=True)
class GPTQConfig:
    """`block_size`: columns per lazy batch; `damp`: fraction of mean(diag H) added to the diagonal;
    `act_order`: sweep by decreasing H_jj; `scale_search`: None for RTN scales, else search them;
    `rounded_inputs`: with quantized activations (W4A4 / W4A8), build each layer's Hessian from its inputs
    rounded as the quantized layer rounds them (the X it will multiply) instead of the float inputs;
    `dynamic_scales`: pick each block's scale when the sweep reaches it (module docstring)."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    scale_search: ScaleSearchConfig | None = None
    rounded_inputs: bool = False
    dynamic_scales: bool = False

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"GPTQConfig.block_size must be a positive int, got {self.block_size!r}")
        if not 0.0 <= self.damp <= 1.0:
            raise ValueError(f"GPTQConfig.damp must be in [0, 1], got {self.damp!r}")
        if self.scale_search is not None and not isinstance(self.scale_search, ScaleSearchConfig):
            raise TypeError(f"GPTQConfig.scale_search must be a ScaleSearchConfig or None, "
                            f"got {type(self.scale_search).__name__}")
        if self.dynamic_scales and self.act_order:
            raise ValueError("GPTQConfig: dynamic_scales picks each block's scale as the sweep reaches the block, "
                             "which needs the sweep in column order; act_order permutes it")


class ColumnQuantizer:
    """Round single columns of W [N, K] against the fixed block scales of `qt`."""

    def __init__(self, qt: QuantizedTensor):
        self.config, self.bs = qt.config, qt.config.block_size
        if isinstance(self.config, NVFP4Config):
            self.s8, self.g = qt.scale.clone(), qt.global_scale.reshape(())
            self.factor = self.config.effective_block_scale(self.s8, self.g)  # [N, K/bs]
        else:
            self.exponent = qt.scale.to(torch.int32) - 127  # [N, K/bs]
            self.factor = pow2(self.exponent)
        self.scale_dtype = qt.scale.dtype

    def refit(self, b: int, block: QuantizedTensor) -> None:
        """Replace block column `b`'s scales with those of `block` (the block's columns quantized alone,
        [N, bs] -> one scale per row; NVFP4: under the same global scale)."""
        if isinstance(self.config, NVFP4Config):
            if not torch.equal(block.global_scale.reshape(()), self.g):
                raise AssertionError("refit: the block was quantized under another global scale")
            self.s8[:, b] = block.scale[:, 0]
            self.factor[:, b] = self.config.effective_block_scale(block.scale[:, 0], self.g)
        else:
            self.exponent[:, b] = block.scale[:, 0].to(torch.int32) - 127
            self.factor[:, b] = pow2(self.exponent[:, b])

    def scale(self) -> torch.Tensor:
        """The block scales in the QuantizedTensor layout (as revised by `refit`)."""
        if isinstance(self.config, NVFP4Config):
            return self.s8
        return (self.exponent + 127).to(self.scale_dtype)

    def __call__(self, j: int, w: torch.Tensor):
        """Column `j` (original index) with values w [N] -> (codes [N] uint8, dequantized [N])."""
        b = j // self.bs
        if isinstance(self.config, NVFP4Config):
            codes = nvfp4_codes(w.unsqueeze(-1), self.s8[:, b], self.g, self.config).squeeze(-1)
        else:
            codes = mxfp4_codes(w.unsqueeze(-1), self.exponent[:, b], self.config).squeeze(-1)
        return codes, e2m1_codes_to_float(codes) * self.factor[:, b]


def upper_cholesky_of_inverse(H: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """U with U^T U = (H + damp * mean(diag H) * I)^-1, in float64. H [K, K] is modified in place."""
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0:
        raise ValueError(f"{name}: the damped Hessian is not positive definite (damp={damp}); "
                         "raise damp or calibrate on more tokens")
    return U


def gptq(W: torch.Tensor, H: torch.Tensor, config: NVFP4Config | MXFP4Config, *, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False, scale_search_config: ScaleSearchConfig | None = None,
         amax=None, dynamic_scales: bool = False, name: str = "weight") -> QuantizedTensor:
    """Quantize W [N, K] with GPTQ against the input Hessian H [K, K] (sum of x^T x over tokens).

    Returns a QuantizedTensor in the layout of `config.quantize(W)`. `amax` fixes the NVFP4
    global scale (fused shards); `scale_search_config` picks the block scales by MSE search;
    `dynamic_scales` picks them as the sweep reaches each block (module docstring).
    """
    opts = GPTQConfig(block_size, damp, act_order, scale_search_config, dynamic_scales=dynamic_scales)
    if not isinstance(config, (NVFP4Config, MXFP4Config)):
        raise TypeError(f"{name}: GPTQ needs an NVFP4Config or MXFP4Config, got {type(config).__name__}")
    check_quantizable(W, config.block_size, name, config.name.upper())
    N, K = _check_shapes(W, H, name)
    bs = config.block_size
    if opts.dynamic_scales and opts.block_size % bs:
        raise ValueError(f"{name}: dynamic_scales needs block_size (lazy batch, {opts.block_size}) to be a multiple "
                         f"of the format's block ({bs})")
    if opts.dynamic_scales and isinstance(config, NVFP4Config) and amax is None:
        amax = W.detach().float().abs().amax()  # one global scale for every block (not searched here)

    def fit(w, label):
        return (quantize(w, config, amax=amax, name=label) if opts.scale_search is None
                else scale_search(w, config, opts.scale_search, amax=amax, name=label))

    qt = fit(W, name)
    quant = ColumnQuantizer(qt)

    W = W.detach().float().clone()
    H = H.detach().to(device=W.device, dtype=torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if opts.act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    U = upper_cholesky_of_inverse(H, opts.damp, name).float()

    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    for i1 in range(0, K, opts.block_size):
        i2 = min(i1 + opts.block_size, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]  # W1: [N, B], U1: [B, B]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if opts.dynamic_scales and col % bs == 0:  # the block's columns, as the sweep has moved them
                quant.refit(col // bs, fit(W1[:, i:i + bs], f"{name}[:, {col}:{col + bs}]"))
            codes[:, col], q = quant(col, W1[:, i])  # written at the original column
            err1[:, i] = (W1[:, i] - q) / U1[i, i]
            W1[:, i + 1:] -= err1[:, i:i + 1] * U1[i:i + 1, i + 1:]
        W[:, i2:] -= err1 @ U[i1:i2, i2:]  # lazy batch update of the columns after the block
    return QuantizedTensor(pack_codes(codes), quant.scale(), qt.global_scale, qt.shape, config)


def _check_shapes(W, H, name):
    if W.dim() != 2:
        raise ValueError(f"{name}: GPTQ needs a 2-D weight [out, in], got shape {tuple(W.shape)}")
    N, K = W.shape
    if tuple(H.shape) != (K, K):
        raise ValueError(f"{name}: Hessian must be [{K}, {K}] for weight {tuple(W.shape)}, got {tuple(H.shape)}")
    check_finite(H, f"{name} Hessian")
    return N, K


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) = ||X W^T - X Q^T||^2 for H = X^T X (the quantity GPTQ minimises)."""
    D = (W.double() - Q.double())
    return float(((D @ H.double()) * D).sum())
