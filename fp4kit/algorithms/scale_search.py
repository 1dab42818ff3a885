"""Scale search: pick each block's scale to minimise its squared error, not to map its max to 6.

Round-to-nearest (RTN, `fp4kit.formats`) sets a block's scale from its absolute max, s = amax/6
rounded to the scale format. That is rarely the best scale: a slightly smaller one clips the
largest element a little and represents the other fifteen (or thirty-one) on a finer grid, a
slightly larger one can land the max on an exact E2M1 value. Scale search tries a few candidate
scales per block and keeps the one whose dequantized block is closest (squared error, optionally
weighted per input column by `importance`, e.g. the diagonal of a calibration Hessian):

    NVFP4   candidates: the UE4M3 codes c-down .. c+up around RTN's code c. Positive UE4M3 codes
            are ordered like their values, so "neighbouring code" is "next representable scale";
            c+4 is about 1.5 x s, which is where four-over-six's "map the max to 4" lands.
    MXFP4   candidates: exponents e-down .. e+up around the scale rule's exponent e (scale 2^e).

RTN's own choice is always a candidate and a candidate replaces it only if strictly better, so
the search is never worse than RTN, block by block (tests/algorithms/test_scale_search.py).
Each candidate is encoded with the same arithmetic as `fp4kit.formats` (same divisions, same
clamp-then-round), so the candidate at offset 0 reproduces RTN's bytes exactly.

Global scale (NVFP4 only): the per-tensor scale decides where block scales fall on the UE4M3
grid. `global_steps > 1` also tries amax * 2^(k/global_steps), k = 0..global_steps-1 (a shift of
the grid within one octave; factors >= 1 so the largest block never clips at 448) and keeps the
tensor-wide best. A caller that passes `amax` (fused q/k/v shards share one global scale) fixes it.

Result: a `QuantizedTensor` in the formats' layout, so FP4Linear, kernels and export work unchanged.
Trade-off against the big libraries: ModelOpt searches a continuous multiplier of amax/6 per block
then rounds; searching the representable codes directly is cheaper and cannot be worse than RTN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4kit.formats import (E2M1_MAX, MXFP4Config, NVFP4Config, QuantizedTensor, check_quantizable,
                            e2m1_codes_to_float, pack_codes, quantize, round_to_e2m1_codes,
                            shared_exponent)
from fp4kit.formats.nvfp4 import GlobalScale
from fp4kit.formats.scales import pow2

UE4M3_MAX_CODE = 0x7E  # 448; 0x7F is NaN in float8_e4m3fn


@dataclass(frozen=True)
class ScaleSearchConfig:
    """How far to search: `down`/`up` candidates below/above RTN's scale; `global_steps` NVFP4 global scales."""

    down: int = 4
    up: int = 6
    global_steps: int = 1

    def __post_init__(self):
        for field in ("down", "up"):
            v = getattr(self, field)
            if not isinstance(v, int) or not 0 <= v <= 32:
                raise ValueError(f"ScaleSearchConfig.{field} must be an int in [0, 32], got {v!r}")
        if not isinstance(self.global_steps, int) or not 1 <= self.global_steps <= 64:
            raise ValueError(f"ScaleSearchConfig.global_steps must be an int in [1, 64], got {self.global_steps!r}")


# ---- encoding one candidate scale (formats' arithmetic, per block) -------------------------------

def nvfp4_block_factor(s8: torch.Tensor, g: torch.Tensor, config: NVFP4Config) -> torch.Tensor:
    """The float32 factor a block's E2M1 values are multiplied by when dequantizing."""
    return config.effective_block_scale(s8, g)


def nvfp4_codes(x: torch.Tensor, s8: torch.Tensor, g: torch.Tensor, config: NVFP4Config) -> torch.Tensor:
    """E2M1 codes of `x` [..., n] under fixed UE4M3 scales `s8` [...] (one per row of x).

    Same operations as `formats.nvfp4._encode_blocks`: divide by s/g (ENCODE) or multiply by
    (1/g)/s (DECODE), zero scale -> zero codes, clamp to +-6, round.
    """
    s32 = s8.float().unsqueeze(-1)
    if config.global_scale is GlobalScale.ENCODE:
        scaled = x / (s32 / g)
    else:
        scaled = x * ((1.0 / g) / s32)
    scaled = torch.where(s32 == 0, torch.zeros_like(scaled), scaled)
    return round_to_e2m1_codes(scaled.clamp(-E2M1_MAX, E2M1_MAX), signed_zero=config.signed_zero)


def mxfp4_codes(x: torch.Tensor, e: torch.Tensor, config: MXFP4Config) -> torch.Tensor:
    """E2M1 codes of `x` [..., n] under fixed exponents `e` [...] (int32), as `quantize_mxfp4` does."""
    scaled = x * pow2(-e).unsqueeze(-1)
    return round_to_e2m1_codes(scaled.clamp(-E2M1_MAX, E2M1_MAX), signed_zero=config.signed_zero)


def _block_error(blocks, codes, factor, importance):
    # blocks, codes: [..., nb, bs]; factor: [..., nb]; importance: [nb, bs] or None -> [..., nb]
    err = (e2m1_codes_to_float(codes) * factor.unsqueeze(-1) - blocks).square()
    return (err if importance is None else err * importance).sum(dim=-1)


def _keep_better(best, cand):
    """best/cand: (error, scale, codes); cand wins only where its error is strictly lower."""
    win = cand[0] < best[0]
    return (torch.where(win, cand[0], best[0]), torch.where(win, cand[1], best[1]),
            torch.where(win.unsqueeze(-1), cand[2], best[2]))


# ---- NVFP4 ----------------------------------------------------------------------------------------

def _search_nvfp4_blocks(blocks, rtn_s8, g, config, search, importance):
    """Best UE4M3 scale per block around RTN's; returns (error, s8, codes)."""
    lowest = 1 if config.min_block_scale == 0 else int(torch.tensor(config.min_block_scale)
                                                       .to(torch.float8_e4m3fn).view(torch.uint8))
    rtn_code = rtn_s8.view(torch.uint8).to(torch.int32)
    codes = nvfp4_codes(blocks, rtn_s8, g, config)
    best = (_block_error(blocks, codes, nvfp4_block_factor(rtn_s8, g, config), importance), rtn_s8, codes)
    for d in [d for d in range(-search.down, search.up + 1) if d]:
        c = (rtn_code + d).clamp(lowest, UE4M3_MAX_CODE).to(torch.uint8).view(torch.float8_e4m3fn)
        cand_codes = nvfp4_codes(blocks, c, g, config)
        err = _block_error(blocks, cand_codes, nvfp4_block_factor(c, g, config), importance)
        best = _keep_better(best, (err, c, cand_codes))
    return best


def search_nvfp4(x, config: NVFP4Config, search: ScaleSearchConfig, *, amax=None, importance=None,
                 name="tensor") -> QuantizedTensor:
    shape = tuple(x.shape)
    blocks = x.float().reshape(*shape[:-1], -1, config.block_size)
    tensor_amax = blocks.abs().amax() if amax is None else torch.as_tensor(amax, dtype=torch.float32)
    factors = [1.0] if amax is not None else [2.0 ** (k / search.global_steps) for k in range(search.global_steps)]
    best = None
    for f in factors:
        rtn = quantize(x, config, amax=tensor_amax * f, name=name)
        g = rtn.global_scale.reshape(())
        err, s8, codes = _search_nvfp4_blocks(blocks, rtn.scale, g, config, search, importance)
        total = err.double().sum().item()
        if best is None or total < best[0]:
            best = (total, s8, codes, rtn.global_scale)
    _, s8, codes, gs = best
    return QuantizedTensor(pack_codes(codes.reshape(shape)), s8, gs, shape, config)


# ---- MXFP4 ----------------------------------------------------------------------------------------

def search_mxfp4(x, config: MXFP4Config, search: ScaleSearchConfig, *, importance=None) -> QuantizedTensor:
    shape = tuple(x.shape)
    blocks = x.float().reshape(*shape[:-1], -1, config.block_size)
    e0 = shared_exponent(blocks.abs().amax(dim=-1), config.scale_rule).clamp(-127, 127)
    best = None
    for d in [0] + [d for d in range(-search.down, search.up + 1) if d]:
        e = (e0 + d).clamp(-127, 127)
        codes = mxfp4_codes(blocks, e, config)
        cand = (_block_error(blocks, codes, pow2(e), importance), e, codes)
        best = cand if best is None else _keep_better(best, cand)
    _, e, codes = best
    return QuantizedTensor(pack_codes(codes.reshape(shape)), (e + 127).to(torch.uint8), None, shape, config)


# ---- public entry point ---------------------------------------------------------------------------

def scale_search(x: torch.Tensor, config: NVFP4Config | MXFP4Config, search: ScaleSearchConfig = ScaleSearchConfig(),
                 *, amax=None, importance: torch.Tensor | None = None, name: str = "tensor") -> QuantizedTensor:
    """Quantize `x` [..., K] with per-block MSE-optimal scales (see the module docstring).

    `importance` [K] >= 0 weights each input column's squared error (None: all equal).
    `amax` fixes the NVFP4 global scale (fused shards); MXFP4 has none and ignores it.
    """
    if not isinstance(config, (NVFP4Config, MXFP4Config)):
        raise TypeError(f"{name}: scale search needs an NVFP4Config or MXFP4Config, got {type(config).__name__}")
    check_quantizable(x, config.block_size, name, config.name.upper())
    if importance is not None:
        importance = _check_importance(importance, x.shape[-1], config.block_size, name).to(x.device)
    if isinstance(config, NVFP4Config):
        return search_nvfp4(x, config, search, amax=amax, importance=importance, name=name)
    return search_mxfp4(x, config, search, importance=importance)


def _check_importance(importance, K, block_size, name):
    if importance.shape != (K,):
        raise ValueError(f"{name}: importance must have shape ({K},), got {tuple(importance.shape)}")
    if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
        raise ValueError(f"{name}: importance must be finite and >= 0")
    return importance.float().reshape(-1, block_size)
