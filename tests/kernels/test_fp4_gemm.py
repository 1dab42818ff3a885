"""Dequantize and GEMM kernels against their torch twins (CUDA, or the CPU interpreter)."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'fp4kit[test]')")

from fp4kit.formats import MXFP4Config, NVFP4Config, ScaleRule, quantize  # noqa: E402
from fp4kit.kernels import GemmConfig, fp4_dequantize, fp4_linear, fp4_matmul, fp4_matmul_torch  # noqa: E402
from fp4kit.kernels.fp4_gemm import use_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                reason="no CUDA and TRITON_INTERPRET != 1: the kernels cannot run here")

CONFIGS = {
    "nvfp4": NVFP4Config(),
    "nvfp4_torchao": NVFP4Config.torchao(),
    "mxfp4_rceil": MXFP4Config(),
    "mxfp4_floor": MXFP4Config(scale_rule=ScaleRule.FLOOR),
}


def _weight(n, k, scale=0.05):
    """Rows of different magnitudes, so block scales differ along N and K."""
    return torch.randn(n, k, device=DEVICE) * scale * torch.logspace(-2, 2, n, device=DEVICE)[:, None]


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", CONFIGS)
def test_dequantize_bit_exact(name, dtype):
    qt = quantize(_weight(40, 160), CONFIGS[name])
    got, want = fp4_dequantize(qt, dtype), qt.dequantize(dtype)
    assert got.dtype == dtype
    assert torch.equal(_bits(got), _bits(want))


def test_dequantize_nvfp4_subnormal_block_scales_bit_exact():
    """Tiny rows get UE4M3 subnormal block scales (< 2^-6 after the global scale)."""
    w = _weight(8, 64)
    w[0] *= 0.1  # about 1e-5 of the largest row: block scales of 2^-9..2^-6
    qt = quantize(w, NVFP4Config())
    assert (qt.scale.view(torch.uint8) < 8).any()
    assert torch.equal(_bits(fp4_dequantize(qt, torch.float32)), _bits(qt.dequantize(torch.float32)))


def test_dequantize_mxfp4_scale_codes_above_240_are_nan():
    """The folded 2^14 decode is exact up to E8M0 code 240; larger codes decode to NaN, not garbage."""
    qt = quantize(_weight(4, 64), MXFP4Config())
    scale = qt.scale.clone()
    scale[0, 0], scale[1, 1] = 240, 241
    qt = type(qt)(qt.data, scale, None, qt.shape, qt.config)
    got, want = fp4_dequantize(qt, torch.float32), qt.dequantize(torch.float32)
    assert torch.equal(got[0, :32], want[0, :32])
    assert torch.isnan(got[1, 32:64]).all()
    assert not torch.isnan(got[1, :32]).any()


def _gemm_errors(y, x, qt, bias):
    """(max |y - ref| / max |ref|, ||y - ref|| / ||ref||), ref in float64 on the dtype-rounded weight."""
    ref = x.double() @ qt.dequantize(x.dtype).double().T
    if bias is not None:
        ref = ref + bias.double()
    err = y.double() - ref
    return (err.abs().max() / ref.abs().max()).item(), (err.norm() / ref.norm()).item()


# The only rounding the kernel adds to the float64 reference is the output cast, at most half an
# ulp: 2^-8 of |y| for bf16 (8 significant bits), 2^-11 for fp16, plus float32 summation
# (~K * 2^-24 of sum |x w|, far smaller). Max error: the cast bound with 10% for summation; RMS
# error: the cast bound itself (uniform rounding errors average ~0.4 of it).
TOL = {torch.bfloat16: (1.1 * 2**-8, 2**-8), torch.float16: (1.1 * 2**-11, 2**-11)}


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("m", [1, 17, 33])
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4_rceil"])
def test_matmul_odd_shapes(name, m, has_bias):
    qt = quantize(_weight(48, 160), CONFIGS[name])
    x = torch.randn(m, 160, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(48, device=DEVICE, dtype=torch.bfloat16) if has_bias else None
    y = fp4_matmul(x, qt, bias)
    assert y.shape == (m, 48) and y.dtype == torch.bfloat16
    max_err, rms_err = _gemm_errors(y, x, qt, bias)
    assert max_err <= TOL[torch.bfloat16][0] and rms_err <= TOL[torch.bfloat16][1], (max_err, rms_err)


@pytest.mark.parametrize("cfg", [GemmConfig(16, 16, 32, split_k=1, group_m=2, num_warps=1, num_stages=1),
                                 GemmConfig(32, 32, 64, split_k=3, group_m=1, num_warps=1, num_stages=1)],
                         ids=["no_split", "split3"])
def test_matmul_explicit_configs(cfg):
    """Both epilogues (direct store, float32 atomics) and a split count that does not divide K's tiles."""
    qt = quantize(_weight(40, 224), NVFP4Config())
    x = torch.randn(33, 224, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(40, device=DEVICE)
    max_err, rms_err = _gemm_errors(fp4_matmul(x, qt, bias, config=cfg), x, qt, bias)
    assert max_err <= TOL[torch.bfloat16][0] and rms_err <= TOL[torch.bfloat16][1], (max_err, rms_err)


@pytest.mark.parametrize("m", [65, 130, 257], ids=["prefill_65", "prefill_130", "dequant_cublas_257"])
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4_rceil"])
def test_matmul_large_m_path(name, m):
    """SKINNY_MAX_M < M < DEQUANT_CUBLAS_MIN_M: fp4_mma's kernel as a tiled GEMM (prefill; MXFP4 through the
    float32 decode); M >= DEQUANT_CUBLAS_MIN_M: on CUDA the bit-exact dequantizer + cuBLAS, in the interpreter
    the prefill kernel again. K = 160 leaves a K tail, N = 48 a row tail; 65 and 130 a token tail."""
    from fp4kit.kernels.fp4_gemm import DEQUANT_CUBLAS_MIN_M, SKINNY_MAX_M

    assert SKINNY_MAX_M < 65 < 130 < DEQUANT_CUBLAS_MIN_M <= 257
    qt = quantize(_weight(48, 160), CONFIGS[name])
    x = torch.randn(m, 160, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(48, device=DEVICE, dtype=torch.bfloat16)
    max_err, rms_err = _gemm_errors(fp4_matmul(x, qt, bias), x, qt, bias)
    assert max_err <= TOL[torch.bfloat16][0] and rms_err <= TOL[torch.bfloat16][1], (max_err, rms_err)


def test_matmul_fp16_and_3d_input():
    qt = quantize(_weight(32, 96), MXFP4Config())
    x = torch.randn(2, 5, 96, device=DEVICE, dtype=torch.float16)
    y = fp4_matmul(x, qt)
    assert y.shape == (2, 5, 32) and y.dtype == torch.float16
    max_err, rms_err = _gemm_errors(y.reshape(10, 32), x.reshape(10, 96), qt, None)
    assert max_err <= TOL[torch.float16][0] and rms_err <= TOL[torch.float16][1], (max_err, rms_err)


def test_fp4_linear_matches_twin():
    qt = quantize(_weight(48, 160), NVFP4Config())
    x = torch.randn(3, 160, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(48, device=DEVICE, dtype=torch.bfloat16)
    got, want = fp4_linear(x, qt, bias).float(), fp4_matmul_torch(x, qt, bias).float()
    assert ((got - want).abs().max() / want.abs().max()).item() <= 2**-7
    x32 = x.float()  # float32 activations take the twin
    assert torch.equal(fp4_linear(x32, qt, bias), fp4_matmul_torch(x32, qt, bias))


def test_matmul_rejects_bad_input():
    qt = quantize(_weight(16, 64), NVFP4Config())
    with pytest.raises(ValueError, match="features"):
        fp4_matmul(torch.randn(2, 32, device=DEVICE, dtype=torch.bfloat16), qt)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        fp4_matmul(torch.randn(2, 64, device=DEVICE), qt)


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("m", [1, 5, 17, 33])
@pytest.mark.parametrize("name", ["nvfp4", "nvfp4_torchao", "mxfp4_floor"])
def test_skinny_path_odd_shapes(name, m, has_bias):
    """M <= SKINNY_MAX_M takes the decode kernel (per-code scale table, no split-K); K=160 leaves a K tail."""
    from fp4kit.kernels.fp4_gemm import SKINNY_MAX_M

    assert m <= SKINNY_MAX_M
    qt = quantize(_weight(40, 160), CONFIGS[name])
    x = torch.randn(m, 160, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(40, device=DEVICE, dtype=torch.bfloat16) if has_bias else None
    y = fp4_matmul(x, qt, bias)
    assert y.shape == (m, 40) and not torch.isnan(y).any()
    max_err, rms_err = _gemm_errors(y, x, qt, bias)
    assert max_err <= TOL[torch.bfloat16][0] and rms_err <= TOL[torch.bfloat16][1], (max_err, rms_err)


def test_prepared_weight_is_reused_and_refreshed():
    """fp4_linear with an explicit PreparedFP4Weight equals the cached path; an in-place change re-prepares."""
    from fp4kit.kernels import prepare_fp4_weight
    from fp4kit.kernels.fp4_gemm import _prepared_for

    qt = quantize(_weight(32, 96), NVFP4Config())
    x = torch.randn(2, 96, device=DEVICE, dtype=torch.bfloat16)
    prepared = prepare_fp4_weight(qt)
    assert torch.equal(fp4_linear(x, qt, prepared=prepared), fp4_linear(x, qt))
    first = _prepared_for(qt)
    assert _prepared_for(qt) is first
    qt.global_scale.mul_(2.0)  # an in-place update bumps the version: the cache rebuilds its table
    assert _prepared_for(qt) is not first
    max_err, rms_err = _gemm_errors(fp4_linear(x, qt), x, qt, None)
    assert max_err <= TOL[torch.bfloat16][0] and rms_err <= TOL[torch.bfloat16][1], (max_err, rms_err)


@pytest.mark.parametrize("m,split,block_k,has_bias", [(1, 2, 32, False), (17, 3, 32, True), (5, 4, 64, True)],
                         ids=["even_split2", "uneven_split3_two_m_tiles", "split4_last_split_empty"])
def test_skinny_split_k(m, split, block_k, has_bias):
    """Split-K with the in-kernel reduction: K = 160 split unevenly (with block_k = 64 and 4 splits the
    last split has no K left), two M tiles, bias added once; called twice to check that the tickets
    were reset to zero, and bit-identical both times (the reduction runs in split order)."""
    from fp4kit.kernels import prepare_fp4_weight
    from fp4kit.kernels.fp4_gemm import _launch_skinny

    qt = quantize(_weight(40, 160), NVFP4Config())
    x = torch.randn(m, 160, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(40, device=DEVICE, dtype=torch.bfloat16) if has_bias else None
    prepared = prepare_fp4_weight(qt)
    cfg = GemmConfig(16, 16, block_k, split_k=split, num_warps=1 if DEVICE.type == "cpu" else 4, num_stages=1)
    first = _launch_skinny(x, prepared, bias, config=cfg)
    second = _launch_skinny(x, prepared, bias, config=cfg)
    assert torch.equal(first, second)
    max_err, rms_err = _gemm_errors(first, x, qt, bias)
    assert max_err <= TOL[torch.bfloat16][0] and rms_err <= TOL[torch.bfloat16][1], (max_err, rms_err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the default split-K choice needs the GPU's SM count")
def test_skinny_default_config_splits_few_tile_layers():
    """On the GPU an N = 4096 decode layer takes the split-K path by default; the result is the same function."""
    from fp4kit.kernels.fp4_gemm import DecodePath, _skinny_config

    assert _skinny_config(1, 4096, 4096, 16, 132).split_k > 1
    qt = quantize(_weight(4096, 1024), NVFP4Config())
    x = torch.randn(3, 1024, device=DEVICE, dtype=torch.bfloat16)
    max_err, rms_err = _gemm_errors(fp4_matmul(x, qt, path=DecodePath.SKINNY), x, qt, None)
    assert max_err <= TOL[torch.bfloat16][0] and rms_err <= TOL[torch.bfloat16][1], (max_err, rms_err)


@pytest.mark.parametrize("bf16_decode", [True, False], ids=["bf16_decode", "f32_decode"])
@pytest.mark.parametrize("codes", [(2, 3, 100, 119, 127, 128), (2, 3, 127, 129, 200, 240)], ids=["one_mul", "two_mul"])
def test_skinny_mxfp4_weights_bit_exact_through_gemm(codes, bf16_decode, monkeypatch):
    """x = identity makes y = W.T exactly (one product per output), so the weights the MMA saw are compared
    bit for bit with the formats' dequantizer: every E2M1 code (0.5 is a bfloat16 subnormal before scaling)
    under E8M0 scales through the one-multiply (codes <= 128) and two-multiply bfloat16 decodes and the
    float32 decode. Codes 0 and 1 are left out: their weights are subnormal, and the interpreter's dot
    flushes subnormal outputs (a property of the sum, not of the decode)."""
    from fp4kit.formats import QuantizedTensor
    from fp4kit.kernels import fp4_gemm

    monkeypatch.setattr(fp4_gemm, "MXFP4_BF16_DECODE", bf16_decode)
    N, K = 16, 64
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    data[0] = (torch.arange(K // 2) % 16 * 17).to(torch.uint8)  # (i, i) nibble pairs: all 16 codes
    scale = torch.tensor(codes, dtype=torch.uint8)[torch.randint(0, len(codes), (N, K // 32), generator=gen)]
    qt = QuantizedTensor(data.to(DEVICE), scale.to(DEVICE), None, (N, K), MXFP4Config())
    x = torch.eye(K, device=DEVICE, dtype=torch.bfloat16)  # M = 64: the skinny path
    y = fp4_matmul(x, qt)
    want = qt.dequantize(torch.bfloat16) + 0.0  # a sum turns the weight -0 into +0; everything else is exact
    assert torch.equal(y.T.contiguous().view(torch.int16), want.view(torch.int16))


def test_hooks_idle_follows_installed_launch_hooks():
    """The direct launch passes no hooks, so it may run only while none is installed: `hooks_idle` must see an
    empty HookChain (Triton >= 3.4) or None (<= 3.3) as idle and anything installed, on either side, as not."""
    from triton import knobs

    from fp4kit.kernels.fp4_gemm import hooks_idle

    rt = knobs.runtime
    saved = rt.launch_enter_hook, rt.launch_exit_hook
    calls = []

    def hook(metadata):
        calls.append(metadata)

    try:
        assert hooks_idle()
        if hasattr(rt.launch_enter_hook, "add"):  # a HookChain: hooks come and go through add/remove
            for chain in (rt.launch_enter_hook, rt.launch_exit_hook):
                chain.add(hook)
                assert not hooks_idle()
                chain.remove(hook)
                assert hooks_idle()
        rt.launch_enter_hook = hook  # a plain callable (older Triton, or a user's assignment)
        assert not hooks_idle()
        rt.launch_enter_hook = None
        assert hooks_idle()
    finally:
        rt.launch_enter_hook, rt.launch_exit_hook = saved
    assert hooks_idle()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter never caches compiled launches")
@pytest.mark.parametrize("m", [1, 16, 128])
def test_cached_direct_launch_runs_and_respects_hooks(m):
    """After the first call the compiled kernel is launched directly (no Triton dispatch, so an installed launch
    hook is the witness): with a hook installed every call goes through Triton and calls it; once the hook is
    removed no call reaches it, and the direct launch gives the same bits."""
    from triton import knobs

    qt = quantize(_weight(256, 512), NVFP4Config())
    x = torch.randn(m, 512, device=DEVICE, dtype=torch.bfloat16)
    first = fp4_linear(x, qt)
    seen = []

    def hook(metadata):
        seen.append(metadata)

    chain = knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip("this Triton keeps a plain launch hook, not a HookChain")
    chain.add(hook)
    try:
        hooked = fp4_linear(x, qt)
        assert len(seen) >= 1
    finally:
        chain.remove(hook)
    n = len(seen)
    direct = [fp4_linear(x, qt) for _ in range(3)]
    torch.cuda.synchronize()
    assert len(seen) == n
    for y in [hooked, *direct]:
        assert torch.equal(y, first)


def test_plain_python_grid_helpers_equal_triton():
    """The launchers size grids with `_cdiv` / `_pow2` (Triton 3.6's helpers cost microseconds per call)."""
    import triton

    from fp4kit.kernels.fp4_gemm import _cdiv, _pow2

    for a in [0, 1, 2, 3, 15, 16, 17, 127, 128, 129, 4095, 4096, 4097, 28672, 128256]:
        assert _pow2(a) == triton.next_power_of_2(a), a
        for b in (1, 3, 16, 64, 128, 1024):
            assert _cdiv(a, b) == triton.cdiv(a, b), (a, b)
