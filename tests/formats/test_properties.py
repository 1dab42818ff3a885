"""Property tests (hypothesis): grid round trips, error bounds, determinism."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4kit.formats import (E2M1_VALUES, MXFP4Config, NVFP4Config, ScaleRule, e2m1_codes_to_float,
                            quantize_mxfp4, quantize_nvfp4)

SETTINGS = settings(max_examples=60, deadline=None)
rows = st.integers(1, 5)
seeds = st.integers(0, 2**31 - 1)
exponents = st.integers(-40, 40)


def grid_tensor(rows, blocks, block, seed, exps):
    """Values on an FP4 grid: E2M1 codes times one power of two per block (including the block max 6)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, blocks, block), generator=g, dtype=torch.int32).to(torch.uint8)
    codes[..., 0] = 7  # the block max maps to 6
    scale = torch.pow(2.0, torch.tensor(exps, dtype=torch.float32)).reshape(1, blocks, 1)
    return (e2m1_codes_to_float(codes) * scale).reshape(rows, blocks * block)


@SETTINGS
@given(rows, seeds, st.lists(exponents, min_size=1, max_size=4), st.sampled_from(list(ScaleRule)))
def test_mxfp4_grid_values_round_trip_exactly(r, seed, exps, rule):
    x = grid_tensor(r, len(exps), 32, seed, exps)
    expected_exact = rule in (ScaleRule.FLOOR, ScaleRule.EVEN, ScaleRule.RCEIL)  # CEIL picks 2^(e+1) for max 6
    deq = quantize_mxfp4(x, MXFP4Config(rule)).dequantize()
    if expected_exact:
        assert torch.equal(deq, x)
    else:
        assert torch.allclose(deq, x, rtol=0, atol=float(x.abs().max()) * 0.25)


@SETTINGS
@given(rows, seeds, st.lists(st.integers(-3, 3), min_size=1, max_size=4))
def test_nvfp4_grid_values_round_trip_exactly(r, seed, exps):
    """With a per-tensor scale of exactly 1 and power-of-two block scales, grid values are exact."""
    x = grid_tensor(r, len(exps), 16, seed, exps)
    cfg = NVFP4Config.torchao()
    qt = quantize_nvfp4(x, cfg, amax=448.0 * 6.0)
    assert torch.equal(qt.dequantize(), x)


@SETTINGS
@given(rows, st.integers(1, 4), seeds, st.floats(1e-6, 1e6), st.sampled_from(list(ScaleRule)))
def test_mxfp4_error_within_half_step_times_scale(r, blocks, seed, mag, rule):
    """|x - deq| <= half the grid step at x's magnitude (1 at 4..6, times 2^e), unless x was clipped to 6."""
    x = torch.randn(r, blocks * 32, generator=torch.Generator().manual_seed(seed)) * mag
    qt = quantize_mxfp4(x, MXFP4Config(rule))
    scale = torch.pow(2.0, qt.scale.float() - 127).repeat_interleave(32, dim=-1)
    scaled = (x / scale).abs()
    step = torch.where(scaled < 2, 0.5, torch.where(scaled < 4, 1.0, 2.0))
    err = (qt.dequantize() - x).abs()
    clipped = scaled > 6
    assert bool((err[~clipped] <= (step / 2 * scale)[~clipped]).all())
    if rule in (ScaleRule.CEIL, ScaleRule.RCEIL):
        assert not bool(clipped.any())


@SETTINGS
@given(rows, st.integers(1, 4), seeds, st.floats(1e-3, 1e3))
def test_nvfp4_error_within_half_step_times_block_scale(r, blocks, seed, mag):
    x = torch.randn(r, blocks * 16, generator=torch.Generator().manual_seed(seed)) * mag
    qt = quantize_nvfp4(x)
    factor = NVFP4Config().effective_block_scale(qt.scale, qt.global_scale).repeat_interleave(16, dim=-1)
    scaled = (x / factor).abs()
    step = torch.where(scaled < 2, 0.5, torch.where(scaled < 4, 1.0, 2.0))
    err = (qt.dequantize() - x).abs()
    ok = scaled <= 6 * (1 + 2**-20)  # the UE4M3 rounding of the scale may push the block max slightly over 6
    bound = step / 2 * factor * (1 + 1e-6)
    assert bool((err[ok] <= bound[ok]).all())
    assert bool((err[~ok] <= (scaled[~ok] - 6 + 1e-6) * factor[~ok] * 1.01 + 1e-30).all())


@SETTINGS
@given(rows, seeds)
def test_quantization_is_deterministic(r, seed):
    x = torch.randn(r, 64, generator=torch.Generator().manual_seed(seed))
    for cfg in (NVFP4Config(), NVFP4Config.torchao(), MXFP4Config()):
        a, b = cfg.quantize(x.clone()), cfg.quantize(x.clone())
        assert torch.equal(a.data, b.data) and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))


def test_every_dequantized_value_is_on_the_grid():
    x = torch.randn(8, 64)
    qt = quantize_mxfp4(x)
    scale = torch.pow(2.0, qt.scale.float() - 127).repeat_interleave(32, dim=-1)
    assert set((qt.dequantize() / scale).abs().unique().tolist()) <= set(abs(v) for v in E2M1_VALUES)
