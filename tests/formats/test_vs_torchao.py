"""NVFP4 and MX quantization against torchao's reference quantizers, bit for bit.

torchao's conventions: NVFP4 with a per-tensor scale = NVFP4Config.torchao() (GlobalScale.DECODE,
block scales clamped to 2^-6); its single-level NVFP4 is the same with a global scale of exactly
1 (amax = 448 * 6). MX: its four ScaleCalculationModes are our four ScaleRules. The inputs keep
block maxima above 2^-100, away from the code-0 corner where torchao scales differently
(see fp4kit/formats/mxfp4.py); that corner has its own test below.
"""

import pytest
import torch

from helpers import odd_shapes

torchao_mx = pytest.importorskip("torchao.prototype.mx_formats", reason="torchao is not installed")
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402
from torchao.prototype.mx_formats.mx_tensor import to_mx  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale  # noqa: E402

from fp4kit.formats import MXFP4Config, NVFP4Config, ScaleRule, quantize_mxfp4, quantize_nvfp4  # noqa: E402

MODES = {ScaleRule.FLOOR: ScaleCalculationMode.FLOOR, ScaleRule.EVEN: ScaleCalculationMode.EVEN,
         ScaleRule.CEIL: ScaleCalculationMode.CEIL, ScaleRule.RCEIL: ScaleCalculationMode.RCEIL}


def make(shape, kind, dtype=torch.float32):
    g = torch.Generator().manual_seed(hash((shape, kind)) % 2**31)
    x = torch.randn(shape, generator=g)
    if kind == "rows_wide":
        x = x * torch.pow(10.0, torch.empty(*shape[:-1], 1).uniform_(-20, 20, generator=g))
    elif kind == "heavy":
        x = x / torch.rand(shape, generator=g).clamp(min=1e-3)
    return x.to(dtype).contiguous()


CASES = [(s, k, d) for s in odd_shapes() for k in ("gauss", "rows_wide", "heavy") for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("shape,kind,dtype", CASES)
def test_nvfp4_two_level_matches_torchao(shape, kind, dtype):
    x = make(shape, kind, dtype)
    scales, packed = nvfp4_quantize(x.reshape(x.shape[0], -1) if x.dim() > 2 else x,
                                    per_tensor_scale=per_tensor_amax_to_scale(x.float().abs().amax()))
    qt = quantize_nvfp4(x, NVFP4Config.torchao())
    assert torch.equal(qt.data.reshape(packed.shape), packed)
    assert torch.equal(qt.scale.view(torch.uint8).reshape(-1), scales.view(torch.uint8).reshape(-1))


@pytest.mark.parametrize("shape,kind,dtype", CASES[:6])
def test_nvfp4_single_level_matches_torchao(shape, kind, dtype):
    x = make(shape, kind, dtype)
    x2 = x.reshape(x.shape[0], -1)
    scales, packed = nvfp4_quantize(x2)
    qt = quantize_nvfp4(x2, NVFP4Config.torchao(), amax=448.0 * 6.0)  # global scale exactly 1
    assert qt.global_scale.item() == 1.0
    assert torch.equal(qt.data, packed)
    assert torch.equal(qt.scale.view(torch.uint8).reshape(-1), scales.view(torch.uint8).reshape(-1))


@pytest.mark.parametrize("rule", list(MODES), ids=lambda r: r.value)
@pytest.mark.parametrize("shape,kind,dtype", CASES)
def test_mxfp4_matches_torchao(rule, shape, kind, dtype):
    x = make(shape, kind, dtype)
    scale, packed = to_mx(x, torch.float4_e2m1fn_x2, 32, MODES[rule])
    qt = quantize_mxfp4(x, MXFP4Config(rule))
    assert torch.equal(qt.scale.reshape(-1), scale.view(torch.uint8).reshape(-1))
    assert torch.equal(qt.data.reshape(-1), packed.view(torch.uint8).reshape(-1))


def test_mxfp4_code0_corner_differs_from_torchao_as_documented():
    """A block whose max is 2^-126: FLOOR gives code 0 (2^-127). torchao divides by 2^-126, we by 2^-127."""
    x = torch.zeros(1, 32)
    x[0, 0] = 2.0**-126
    scale, packed = to_mx(x, torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.FLOOR)
    qt = quantize_mxfp4(x, MXFP4Config(ScaleRule.FLOOR))
    assert qt.scale.item() == scale.view(torch.uint8).item() == 0
    assert packed.view(torch.uint8)[0, 0].item() & 0xF == 2  # 2^-126 / 2^-126 = 1.0 -> code 2
    assert qt.data[0, 0].item() & 0xF == 4  # 2^-126 / 2^-127 = 2.0 -> code 4: dequantizes back exactly
    assert qt.dequantize()[0, 0].item() == 2.0**-126
