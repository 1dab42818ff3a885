"""FP8 E4M3 quantization: scale placement per granularity, and the cast against ml_dtypes."""

import ml_dtypes
import numpy as np
import pytest
import torch

from fp4kit.formats import FP8Config, FP8Granularity, quantize_fp8


@pytest.mark.parametrize("gran,scale_shape", [(FP8Granularity.TENSOR, (1,)), (FP8Granularity.TOKEN, (6,)),
                                              (FP8Granularity.BLOCK, (12,))])
def test_scale_shapes(gran, scale_shape):
    qt = quantize_fp8(torch.randn(2, 3, 256), FP8Config(gran))
    assert tuple(qt.scale.shape) == scale_shape and qt.data.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("gran", list(FP8Granularity))
def test_codes_match_ml_dtypes(gran):
    x = torch.randn(5, 256) * torch.pow(10.0, torch.empty(5, 1).uniform_(-3, 3))
    qt = quantize_fp8(x, FP8Config(gran))
    groups = {FP8Granularity.TENSOR: x.reshape(1, -1), FP8Granularity.TOKEN: x, FP8Granularity.BLOCK: x.reshape(-1, 128)}[gran]
    scaled = (groups / qt.scale.unsqueeze(-1)).clamp(-448, 448)
    ref = scaled.numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    assert np.array_equal(qt.data.view(torch.uint8).reshape(ref.shape).numpy(), ref)


def test_group_max_maps_to_448():
    x = torch.randn(4, 64)
    qt = quantize_fp8(x, FP8Config(FP8Granularity.TOKEN))
    assert torch.equal(qt.data.float().abs().amax(dim=-1), torch.full((4,), 448.0))


def test_zero_group_gets_unit_scale():
    x = torch.randn(3, 64)
    x[1] = 0
    qt = quantize_fp8(x, FP8Config(FP8Granularity.TOKEN))
    assert qt.scale[1].item() == 1.0 and torch.equal(qt.dequantize()[1], torch.zeros(64))


def test_static_amax_saturates_outliers():
    x = torch.tensor([[1.0, -2.0, 10.0]])
    qt = quantize_fp8(x, FP8Config(FP8Granularity.TENSOR), amax=2.0)
    assert qt.dequantize().tolist() == [[1.0, -2.0, 2.0]]


def test_round_trip_relative_error_bound():
    """E4M3 has 3 mantissa bits: relative error <= 2^-4 for values in the normal range."""
    x = torch.randn(64, 128)
    deq = quantize_fp8(x, FP8Config(FP8Granularity.TOKEN)).dequantize()
    big = x.abs() > x.abs().amax(dim=-1, keepdim=True) * 2.0**-6
    assert bool(((deq - x).abs()[big] <= x.abs()[big] * 2.0**-4 * (1 + 1e-6)).all())
