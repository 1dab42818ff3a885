"""FP4Linear: buffers named as compressed-tensors names them, forward = dequantize then matmul."""

import pytest
import torch
from torch import nn

from fp4kit.formats import BlockChoice, MXFP4Config, NVFP4Config, quantize
from fp4kit.nn import FP4Linear

CONFIGS = [NVFP4Config(), NVFP4Config.torchao(), NVFP4Config(block_choice=BlockChoice.FOUR_OVER_SIX), MXFP4Config()]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: repr(c)[:40])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_dequantize_then_linear(config, bias, device):
    lin = nn.Linear(160, 48, bias=bias, device=device)
    q = FP4Linear.from_linear(lin, config, name="proj")
    x = torch.randn(3, 7, 160, device=device)
    w = quantize(lin.weight.detach(), config).dequantize().to(device)
    expected = nn.functional.linear(x, w, lin.bias)
    assert torch.equal(q(x), expected)


def test_buffer_names_and_dtypes_nvfp4():
    q = FP4Linear.from_linear(nn.Linear(64, 8), NVFP4Config())
    sd = q.state_dict()
    assert set(sd) == {"weight_packed", "weight_scale", "weight_global_scale", "bias"}
    assert sd["weight_packed"].dtype == torch.uint8 and sd["weight_packed"].shape == (8, 32)
    assert sd["weight_scale"].dtype == torch.float8_e4m3fn and sd["weight_scale"].shape == (8, 4)
    assert sd["weight_global_scale"].dtype == torch.float32 and sd["weight_global_scale"].shape == (1,)


def test_buffer_names_and_dtypes_mxfp4():
    q = FP4Linear.from_linear(nn.Linear(64, 8, bias=False), MXFP4Config())
    sd = q.state_dict()
    assert set(sd) == {"weight_packed", "weight_scale"}
    assert sd["weight_scale"].dtype == torch.uint8 and sd["weight_scale"].shape == (8, 2)


def test_state_dict_round_trip():
    src = FP4Linear.from_linear(nn.Linear(64, 8), NVFP4Config())
    dst = FP4Linear(64, 8, NVFP4Config(), dtype=torch.float32)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(2, 64)
    assert torch.equal(src(x), dst(x))


def test_bf16_model_keeps_bf16():
    lin = nn.Linear(64, 16).to(torch.bfloat16)
    q = FP4Linear.from_linear(lin, MXFP4Config())
    y = q(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16


def test_shared_amax_gives_shared_global_scale():
    a, b = nn.Linear(64, 8), nn.Linear(64, 8)
    amax = torch.maximum(a.weight.abs().max(), b.weight.abs().max())
    qa = FP4Linear.from_linear(a, NVFP4Config(), amax=amax)
    qb = FP4Linear.from_linear(b, NVFP4Config(), amax=amax)
    assert torch.equal(qa.weight_global_scale, qb.weight_global_scale)


def test_indivisible_in_features_raises():
    with pytest.raises(ValueError, match="in_features % 16"):
        FP4Linear(40, 8, NVFP4Config())


def test_wrong_config_type_raises():
    with pytest.raises(TypeError, match="NVFP4Config or MXFP4Config"):
        FP4Linear(64, 8, "nvfp4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton GEMM path)")
@pytest.mark.parametrize("config", [NVFP4Config(), MXFP4Config()], ids=["nvfp4", "mxfp4"])
def test_cuda_forward_uses_kernel_within_gemm_tolerance(config):
    lin = nn.Linear(256, 96, device="cuda", dtype=torch.bfloat16)
    q = FP4Linear.from_linear(lin, config)
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ q.dequantize_weight(torch.float64).T + lin.bias.double()
    err = (q(x).double() - ref).abs().max() / ref.abs().max()
    assert err < 8e-3  # bf16 output rounding (2^-8) plus fp32 accumulation


# ---- online input rotation (MR-GPTQ) --------------------------------------------------------------

def _rotated(config, rotation, *, bias=True, input_config=None, device="cpu"):
    from fp4kit.nn.rotation import RotatedLinear

    torch.manual_seed(0)
    lin = nn.Linear(160, 48, bias=bias, device=device)
    return lin, FP4Linear.from_linear(RotatedLinear.from_linear(lin, rotation, name="proj"), config, name="proj",
                                      input_config=input_config)


@pytest.mark.parametrize("config", [NVFP4Config(), MXFP4Config()], ids=lambda c: c.name)
@pytest.mark.parametrize("signs", [False, True])
def test_rotated_layer_is_dequant_w_r_applied_to_x_r(config, signs, device):
    """Reference: dense R [K, K] in float64 (not the block-wise product), dequant(quantize(W R))."""
    from fp4kit.algorithms import RotationConfig, rotation_matrix

    rot = RotationConfig(32, signs, seed=11)
    lin, q = _rotated(config, rot, device=device)
    R = rotation_matrix(160, rot, dtype=torch.float64).to(device)
    w_r = quantize((lin.weight.detach().double() @ R).float(), config)
    assert torch.equal(q.weight_packed, w_r.data) and torch.equal(q.weight_scale.view(torch.uint8),
                                                                   w_r.scale.view(torch.uint8))
    x = torch.randn(17, 160, device=device)
    ref = nn.functional.linear((x.double() @ R).float(), w_r.dequantize().to(device), lin.bias)
    err = (q(x) - ref).abs().max() / ref.abs().max()
    assert err < (1e-6 if device.type == "cpu" else 2e-2), err  # CPU: fp32 rounding of x R only; CUDA: GEMM tolerance


def test_rotated_w4a4_quantizes_the_rotated_input():
    from fp4kit.algorithms import RotationConfig
    from fp4kit.formats import quantize_nvfp4

    lin, q = _rotated(NVFP4Config(), RotationConfig(16, True), input_config=NVFP4Config())
    x = torch.randn(5, 160) * torch.linspace(0.1, 8, 160)  # uneven channels
    xr = q.rotation(x)
    q.set_input_amax(xr.abs().amax())
    xq = quantize_nvfp4(xr, NVFP4Config(), global_scale=q.input_global_scale).dequantize(torch.float32)
    expected = nn.functional.linear(xq, q.dequantize_weight(torch.float32), q.bias)
    assert torch.equal(q(x), expected)


def test_rotation_buffers_are_not_saved_and_rebuild_from_the_config():
    from fp4kit.algorithms import RotationConfig

    _, q = _rotated(MXFP4Config(), RotationConfig(32, True, seed=3))
    assert set(q.state_dict()) == {"weight_packed", "weight_scale", "bias"}
    fresh = FP4Linear(160, 48, MXFP4Config(), dtype=torch.float32, rotation=RotationConfig(32, True, seed=3))
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(4, 160)
    assert torch.equal(fresh(x), q(x)) and "rotation=block=32, random_signs(seed=3)" in repr(q)


def test_rotation_block_not_dividing_in_features_names_the_layer():
    from fp4kit.algorithms import RotationConfig

    with pytest.raises(ValueError, match="down_proj: in_features 96 is not divisible by the rotation block 64"):
        FP4Linear(96, 8, NVFP4Config(), rotation=RotationConfig(64), name="down_proj")
