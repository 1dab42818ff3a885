"""Fused quantize kernels against `fp4kit.formats`, bit for bit (CUDA, or the CPU interpreter)."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'fp4kit[test]')")

from fp4kit.formats import (BlockChoice, MXFP4Config, NVFP4Config, ScaleRule, quantize_mxfp4,  # noqa: E402
                            quantize_nvfp4)
from fp4kit.kernels.fp4_gemm import use_triton  # noqa: E402
from fp4kit.kernels.fp4_quantize import fp4_quantize, quantize_mxfp4_triton, quantize_nvfp4_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                reason="no CUDA and TRITON_INTERPRET != 1: the kernels cannot run here")


def _wide(shape, lo, hi):
    """Magnitudes 10^lo..10^hi, both signs: subnormal, tiny, huge block maxima in one tensor."""
    mag = torch.empty(shape).uniform_(lo, hi)
    sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    return (sign * torch.pow(10.0, mag) * torch.rand(shape)).to(DEVICE)


def _inputs():
    torch.manual_seed(20261122)  # fixed inputs, whatever ran before this module was collected
    zeros = torch.zeros(4, 160)
    zeros[1] = -0.0  # negative zero rounds to code 8 (signed_zero) or 0
    zeros[2, :16] = torch.randn(16) * 1e-3  # one live block among zero blocks
    zeros[3] = torch.randn(160) * 1e-30
    return {
        "randn_bf16_17x160": torch.randn(17, 160, device=DEVICE).bfloat16(),
        "wide_f32_3x5x64": _wide((3, 5, 64), -30, 30),
        "wide_bf16_subnormals": _wide((6, 96), -41, 38).bfloat16(),
        "zeros_and_tiny_bf16": zeros.to(DEVICE).bfloat16(),
        "randn_fp16": torch.randn(9, 64, device=DEVICE).half(),
    }


INPUTS = _inputs()


def _assert_same(got, want):
    assert got.data.shape == want.data.shape and got.scale.shape == want.scale.shape
    assert got.scale.dtype == want.scale.dtype
    assert torch.equal(got.data, want.data), f"{(got.data != want.data).sum().item()} packed bytes differ"
    assert torch.equal(got.scale.view(torch.uint8), want.scale.view(torch.uint8)), "block scales differ"
    if want.global_scale is not None:
        assert torch.equal(got.global_scale.view(torch.int32), want.global_scale.view(torch.int32))


NV_CONFIGS = {"compressed_tensors": NVFP4Config(), "torchao": NVFP4Config.torchao(),
              "unsigned_zero": NVFP4Config(signed_zero=False), "zero_scale_0": NVFP4Config(zero_block_scale=0.0)}


@pytest.mark.parametrize("rcp_div", [False, True], ids=["div_rn", "rcp_markstein"])
@pytest.mark.parametrize("inp", INPUTS)
@pytest.mark.parametrize("cfg", NV_CONFIGS)
def test_nvfp4_bit_exact(cfg, inp, rcp_div, monkeypatch):
    """Both ways of dividing by the block scale (IEEE per element, or reciprocal + Markstein) match."""
    from fp4kit.kernels import fp4_quantize as fq

    if rcp_div and not torch.cuda.is_available():
        pytest.skip("reciprocal + Markstein is exact only with a fused tl.fma; the interpreter does not fuse "
                    "(checked bit-exact on the H100 instead)")

    monkeypatch.setattr(fq, "NVFP4_RCP_DIV", rcp_div)
    x = INPUTS[inp]
    _assert_same(quantize_nvfp4_triton(x, NV_CONFIGS[cfg]), quantize_nvfp4(x, NV_CONFIGS[cfg]))


def test_nvfp4_rcp_div_static_amax_overflow():
    """A static amax far below the data: x * (1/d) overflows to inf; the code must still be 7 (clamped)."""
    from fp4kit.kernels import fp4_quantize as fq

    x = torch.tensor([3e38, -3e38, 1.0, -0.0] * 16, device=DEVICE).reshape(4, 16)
    default = fq.NVFP4_RCP_DIV
    for rcp in (False, True):
        fq.NVFP4_RCP_DIV = rcp
        try:
            _assert_same(quantize_nvfp4_triton(x, amax=1.0), quantize_nvfp4(x, amax=1.0))
        finally:
            fq.NVFP4_RCP_DIV = default


def test_nvfp4_static_amax_saturates_like_twin():
    """A calibrated amax below the tensor's max pushes block scales past 448: both clamp there."""
    x = torch.randn(4, 64, device=DEVICE).bfloat16() * 10
    _assert_same(quantize_nvfp4_triton(x, amax=1.0), quantize_nvfp4(x, amax=1.0))


@pytest.mark.parametrize("inp", INPUTS)
@pytest.mark.parametrize("rule", list(ScaleRule), ids=lambda r: r.value)
def test_mxfp4_bit_exact(rule, inp):
    x = INPUTS[inp]
    if x.shape[-1] % 32:
        pytest.skip("MXFP4 needs the last dim % 32")
    cfg = MXFP4Config(scale_rule=rule)
    _assert_same(quantize_mxfp4_triton(x, cfg), quantize_mxfp4(x, cfg))


def test_mxfp4_unsigned_zero():
    x = INPUTS["zeros_and_tiny_bf16"]
    cfg = MXFP4Config(signed_zero=False)
    _assert_same(quantize_mxfp4_triton(x, cfg), quantize_mxfp4(x, cfg))


def test_four_over_six_uses_twin():
    cfg = NVFP4Config(block_choice=BlockChoice.FOUR_OVER_SIX)
    x = INPUTS["randn_bf16_17x160"]
    with pytest.raises(NotImplementedError, match="MAX6"):
        quantize_nvfp4_triton(x, cfg)
    _assert_same(fp4_quantize(x, cfg), quantize_nvfp4(x, cfg))


def test_rejects_bad_last_dim():
    with pytest.raises(ValueError, match="divisible by 16"):
        quantize_nvfp4_triton(torch.randn(2, 24, device=DEVICE))


# ---- the global scale computed in the kernel (round 4): every way of passing amax, edge amaxes


def _amax_forms(value: float):
    """The same amax as a Python float, a CPU float32 tensor and a float32 tensor on the kernel's device."""
    return {"float": value, "cpu_tensor": torch.tensor(value), "device_tensor": torch.tensor(value, device=DEVICE)}


@pytest.mark.parametrize("cfg", ["compressed_tensors", "torchao"])
def test_nvfp4_in_kernel_global_scale_many_amaxes(cfg):
    """g from 48 random amaxes (30 decades) in each form: ENCODE is reciprocal * 2688 in torch, DECODE a
    division (CPU) or a multiplication by RN(1/2688) (CUDA); a one-ulp slip in g fails the int32 compare."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 32, generator=gen).to(DEVICE).bfloat16()
    amaxes = (torch.rand(48, generator=gen) * torch.pow(10.0, torch.randint(-15, 15, (48,), generator=gen))).tolist()
    for value in amaxes:
        for form, amax in _amax_forms(value).items():
            got = quantize_nvfp4_triton(x, NV_CONFIGS[cfg], amax=amax)
            want = quantize_nvfp4(x, NV_CONFIGS[cfg], amax=amax)
            assert torch.equal(got.global_scale.view(torch.int32), want.global_scale.view(torch.int32)), (value, form)
            assert torch.equal(got.data, want.data) and torch.equal(got.scale.view(torch.uint8),
                                                                    want.scale.view(torch.uint8)), (value, form)


@pytest.mark.parametrize("value", [0.0, 1e-45, 1e-38, 3e38, float("inf")],
                         ids=["zero", "subnormal", "near_tiny", "near_max", "inf"])
@pytest.mark.parametrize("cfg", ["compressed_tensors", "torchao"])
def test_nvfp4_in_kernel_global_scale_edges(cfg, value):
    """amax 0 / inf / subnormal: g not finite or 0 falls back to 1, as in `nvfp4_global_scale`."""
    x = INPUTS["randn_bf16_17x160"][:2, :32]
    for amax in _amax_forms(value).values():
        _assert_same(quantize_nvfp4_triton(x, NV_CONFIGS[cfg], amax=amax),
                     quantize_nvfp4(x, NV_CONFIGS[cfg], amax=amax))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nvfp4_amax_pass_exact(dtype):
    """The abs-max reduction kernel equals torch's, on a length that leaves a ragged last program."""
    from fp4kit.kernels.fp4_quantize import nvfp4_amax

    x = _wide((3 * 1024 + 48,), -20, 20).to(dtype)
    x[1234] = -7e20 if dtype == torch.float32 else -3e20  # the max, negative, in the middle
    got = nvfp4_amax(x)
    assert got.dtype == torch.float32 and got.shape == (1,)
    assert torch.equal(got.view(torch.int32), x.abs().amax().float().reshape(1).view(torch.int32))


def test_nvfp4_amax_pass_odd_shape_bit_exact():
    """No amax: the fused reduction + quantize equals the twin (which takes the max itself)."""
    x = _wide((2, 3 * 1024 + 48), -8, 8).bfloat16()  # 6240 elements: the last amax program is ragged
    for cfg in ("compressed_tensors", "torchao"):
        _assert_same(quantize_nvfp4_triton(x, NV_CONFIGS[cfg]), quantize_nvfp4(x, NV_CONFIGS[cfg]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_nvfp4_static_amax_graph_capturable():
    """A device amax: the call makes no host sync (capture would fail) and replays bit-exact."""
    x = torch.randn(64, 256, device="cuda").bfloat16()
    amax = x.abs().amax().float()
    quantize_nvfp4_triton(x, amax=amax)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qt = quantize_nvfp4_triton(x, amax=amax)
    x.copy_(torch.randn_like(x) * 3)
    amax.copy_(x.abs().amax().float())
    graph.replay()
    _assert_same(qt, quantize_nvfp4(x, amax=amax))


# ---- round 6: one thread per block, the one-add E2M1 encode, the launch-wide Markstein guard


def _all_finite_bf16(seed: int) -> torch.Tensor:
    """Every finite bfloat16 value once, shuffled into rows of 512 (blocks of 16 get every kind of scale)."""
    allbf = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    allbf = allbf[torch.isfinite(allbf)]
    allbf = allbf[torch.randperm(allbf.numel(), generator=torch.Generator().manual_seed(seed))]
    n = (allbf.numel() // 512) * 512
    return allbf[:n].reshape(-1, 512).to(DEVICE)


@pytest.mark.parametrize("amax", [None, 1.0, 7e5], ids=["own_amax", "amax_1", "amax_7e5"])
@pytest.mark.parametrize("cfg", ["compressed_tensors", "torchao"])
def test_nvfp4_every_finite_bf16(cfg, amax, monkeypatch):
    """Every finite bf16 value through the kernel (CUDA: the Markstein quotient; interpreter: the division),
    in large programs so the interpreter runs few of them."""
    from fp4kit.kernels import fp4_quantize as fq

    if not torch.cuda.is_available():
        monkeypatch.setattr(fq, "_blocks_per_program", lambda bs: 1024)
    x = _all_finite_bf16(6)
    _assert_same(quantize_nvfp4_triton(x, NV_CONFIGS[cfg], amax=amax), quantize_nvfp4(x, NV_CONFIGS[cfg], amax=amax))


@pytest.mark.parametrize("side", [0.5, 1.0, 2.0], ids=["g_below_2^51", "g_at_2^51", "g_above_2^51"])
def test_nvfp4_markstein_guard_boundary(side):
    """g = 2688 / amax around MARKSTEIN_MAX_G = 2^51 (amax ~1.2e-12): the launch takes the Markstein quotient
    at and below it and the IEEE division above; both sides equal the twin on data near that amax."""
    from fp4kit.kernels._fp4_quantize import MARKSTEIN_MAX_G

    amax = 2688.0 / MARKSTEIN_MAX_G / side
    gen = torch.Generator().manual_seed(51)
    x = (torch.randn(8, 64, generator=gen) * amax * torch.pow(10.0, torch.empty(8, 64).uniform_(-3, 0, generator=gen)))
    x = x.to(DEVICE)
    for value in (amax, float(x.abs().max())):
        _assert_same(quantize_nvfp4_triton(x, amax=value), quantize_nvfp4(x, amax=value))
