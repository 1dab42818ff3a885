"""Bad input raises a clear error that names the tensor."""

import pytest
import torch

from fp4kit.formats import FP8Config, FP8Granularity, MXFP4Config, NVFP4Config, quantize

FP4 = [NVFP4Config(), MXFP4Config()]


@pytest.mark.parametrize("config", FP4 + [FP8Config()], ids=lambda c: c.name)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises_with_name(config, bad):
    x = torch.randn(2, 64)
    x[1, 5] = bad
    with pytest.raises(ValueError, match=r"layers\.3\.mlp\.weight: .*first at index \(1, 5\)"):
        quantize(x, config, name="layers.3.mlp.weight")


@pytest.mark.parametrize("config,k", [(NVFP4Config(), 40), (MXFP4Config(), 48)], ids=["nvfp4", "mxfp4"])
def test_last_dim_not_divisible_raises(config, k):
    with pytest.raises(ValueError, match=f"w: {config.name.upper()} needs the last dim divisible by {config.block_size}"):
        quantize(torch.randn(3, k), config, name="w")


def test_fp8_block_not_divisible_raises():
    with pytest.raises(ValueError, match="blocks of 128"):
        quantize(torch.randn(2, 100), FP8Config(FP8Granularity.BLOCK), name="act")


@pytest.mark.parametrize("config", FP4 + [FP8Config()], ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_wrong_dtype_raises(config, dtype):
    with pytest.raises(TypeError, match="w: expected a float tensor"):
        quantize(torch.zeros(2, 64, dtype=dtype), config, name="w")


def test_scalar_raises():
    with pytest.raises(ValueError, match="last dim"):
        quantize(torch.tensor(1.0), NVFP4Config(), name="s")


def test_non_tensor_raises():
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        quantize([1.0] * 16, NVFP4Config(), name="lst")


def test_unrepresentable_config_option_raises():
    with pytest.raises(ValueError, match="not representable in UE4M3"):
        NVFP4Config(zero_block_scale=0.1)


def test_fixed_amax_needs_tensor_granularity():
    with pytest.raises(ValueError, match="TENSOR"):
        quantize(torch.randn(2, 8), FP8Config(FP8Granularity.TOKEN), amax=1.0, name="a")
