"""silu(gate) * up in the FP4 GEMV's epilogue (`fp4kit.kernels.fp4_glu`).

What must hold. The interleaved weight decodes to the original rows exactly (codes and block scales
move together). Where the fused GEMV runs, its output equals the unfused chain (the same GEMV on the
plain layout, then `silu_mul`) bit for bit: the epilogue rounds where that chain rounds, through the
same Triton operations (`cast_rne`, `tl.exp`). Against the torch twin (which rounds each decoded
weight to bf16 and computes silu with torch's exp) the gate and up values carry the GEMV's stated
error (test_fp4_gemv), so the twin check is a bound on the result, not bits.
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'fp4kit[test]')")

from fp4kit.formats import MXFP4Config, NVFP4Config, quantize  # noqa: E402
from fp4kit.kernels import prepare_fp4_weight  # noqa: E402
from fp4kit.kernels.decode_ops import silu_mul, silu_mul_torch  # noqa: E402
from fp4kit.kernels.fp4_gemm import DecodePath, fp4_matmul, use_triton  # noqa: E402
from fp4kit.kernels.fp4_glu import (fused_gemv_runs, fused_ws_runs, gate_up_silu, gate_up_silu_torch,  # noqa: E402
                                    glu_interleave, glu_layout, glu_order, ws_glu_weight)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_kernels = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                   reason="no CUDA and TRITON_INTERPRET != 1: the kernels cannot run here")
CONFIGS = {"nvfp4": NVFP4Config(), "mxfp4": MXFP4Config()}


def _pair(i, k, name, seed=0):
    """A quantized [gate | up] weight [2i, k]; gate and up of different magnitudes, rows of varied scale."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(2 * i, k, generator=g) * 0.05 * torch.logspace(-1, 1, 2 * i)[:, None]
    w[i:] *= 3.0
    return quantize(w.to(DEVICE), CONFIGS[name])


def test_glu_order_interleaves():
    assert glu_order(6).tolist() == [0, 3, 1, 4, 2, 5]
    with pytest.raises(ValueError, match="divisible by 2"):
        glu_order(5)


def test_glu_order_in_groups_of_8():
    """The warp-specialised layout: 8 gate rows, then the 8 up rows of the same pairs, and so on."""
    assert glu_order(32, group=8).tolist() == [*range(0, 8), *range(16, 24), *range(8, 16), *range(24, 32)]
    assert sorted(glu_order(64, group=8).tolist()) == list(range(64))
    with pytest.raises(ValueError, match="groups of 8 needs rows divisible by 16"):
        glu_order(24, group=8)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("group", [1, 8])
def test_interleaved_weight_decodes_to_the_original_rows(name, group):
    qt = _pair(16, 256, name)
    inter = glu_interleave(qt, group)
    assert torch.equal(inter.dequantize(torch.float32),
                       qt.dequantize(torch.float32)[glu_order(32, DEVICE, group)])


@needs_kernels
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("m,has_bias", [(1, False), (2, True)])
def test_fused_equals_gemv_then_silu_mul_bit_exact(name, m, has_bias):
    """The one-launch GEMV against the unfused kernel chain on the same weight: identical bits."""
    I, K = 40, 512  # 80 rows: the interpreter's 16-row tiles leave a partial last tile
    qt = _pair(I, K, name)
    x = torch.randn(m, K, device=DEVICE).bfloat16()
    bias = torch.randn(2 * I, device=DEVICE).bfloat16() if has_bias else None
    assert fused_gemv_runs(x, qt)
    prepared = prepare_fp4_weight(qt)
    got = gate_up_silu(x, qt, bias, prepared=prepared)
    assert prepared.gemv_glu is not None and prepared.gemv is None  # the fused path ran, not the plain GEMV
    chain = silu_mul(fp4_matmul(x, qt, bias, path=DecodePath.GEMV))
    assert got.shape == (m, I) and got.dtype == torch.bfloat16
    assert torch.equal(got, chain)


@needs_kernels
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_fused_against_the_torch_twin(name):
    """Against the twin: gate and up differ by the GEMV's rounding of the weights (normalised max 2^-7 in
    test_fp4_gemv); silu(g) * u then moves by at most its derivative times that, relative to the output's
    scale. Checked as that normalised bound on the result."""
    I, K = 48, 1024
    qt = _pair(I, K, name, seed=1)
    x = torch.randn(1, K, device=DEVICE).bfloat16()
    got = gate_up_silu(x, qt).float()
    ref = gate_up_silu_torch(x, qt).float()
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 2 ** -6


@needs_kernels
def test_silu_mul_kernel_rounds_to_nearest_even_in_the_interpreter_too():
    """silu_mul's kernel rounds with `cast_rne`: the interpreter's own float -> bf16 cast truncates, which
    would make the fused epilogue (RNE) and the unfused chain differ there. Against torch's silu * up on the
    same values: equal wherever torch's and the kernel's float32 exp agree (all but a few elements)."""
    gu = (torch.randn(4, 2 * 1000, device=DEVICE) * 4).bfloat16()
    got, ref = silu_mul(gu), silu_mul_torch(gu)
    assert (got == ref).float().mean().item() >= 0.99
    ulp = 2.0 ** (torch.floor(torch.log2(ref.float().abs().clamp_min(1e-30))) - 7)
    assert ((got.float() - ref.float()).abs() <= ulp).all()


def test_falls_back_off_the_gemv():
    """M beyond the GEMV's range (or a CPU tensor without the interpreter) takes GEMM + silu_mul: same function."""
    qt = _pair(16, 256, "nvfp4")
    x = torch.randn(3, 5, 256, device=DEVICE).bfloat16()
    assert not fused_gemv_runs(x, qt)
    got = gate_up_silu(x, qt)
    assert got.shape == (3, 5, 16)
    ref = gate_up_silu_torch(x, qt)
    assert ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item() <= 2 ** -6


def test_rejects_wrong_features():
    qt = _pair(16, 256, "nvfp4")
    with pytest.raises(ValueError, match="512 features, the weight expects 256"):
        gate_up_silu(torch.randn(1, 512, device=DEVICE).bfloat16(), qt)


@needs_kernels
def test_glu_layout_built_once():
    qt = _pair(16, 256, "nvfp4")
    prepared = prepare_fp4_weight(qt)
    lay = glu_layout(prepared)
    assert glu_layout(prepared) is lay
    assert lay.words.shape == (32, 256 // 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Llama-sized shapes need the GPU")
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("m", [1, 2])
def test_gpu_llama_gate_up_bit_exact_with_the_chain(name, m, monkeypatch):
    """28672 x 4096 (Llama-3-8B gate_up: the tuned 16-lane layout and launch): fused == GEMV + silu_mul (with
    the warp-specialised kernel kept off 1-2 rows, where it otherwise takes this shape: `ws_beats_gemv`)."""
    from fp4kit.kernels import fp4_ws

    monkeypatch.setattr(fp4_ws, "WS_SMALL_M", 0)
    qt = _pair(14336, 4096, name, seed=2)
    x = torch.randn(m, 4096, device=DEVICE).bfloat16()
    assert fused_gemv_runs(x, qt) and not fused_ws_runs(x, qt)
    got = gate_up_silu(x, qt)
    assert torch.equal(got, silu_mul(fp4_matmul(x, qt, path=DecodePath.GEMV)))


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="the warp-specialised GEMM needs an sm_90 GPU")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need the GPU")
@pytest.mark.parametrize("i,m", [(2048, 1), pytest.param(8192, 32, marks=needs_hopper)])  # GEMV; WS fold
def test_gpu_graph_replay_equals_eager(i, m):
    qt = _pair(i, 1024, "nvfp4", seed=3)
    prepared = prepare_fp4_weight(qt)
    x = torch.randn(m, 1024, device=DEVICE).bfloat16()
    eager = gate_up_silu(x, qt, prepared=prepared)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gate_up_silu(x, qt, prepared=prepared)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(out, gate_up_silu(x, qt, prepared=prepared))
    assert not torch.equal(out, eager)


# The same fold in the warp-specialised GEMM (3-64 rows on sm_90): rows in groups of 8 gate / 8 up, so each
# accumulator thread holds both rows of its pairs (`_fp4_ws._glu_epilogue`). Its output must equal that
# kernel on the plain weight followed by `silu_mul`, bit for bit (a row's sums do not depend on its tile).
def test_ws_fold_not_taken_off_the_gpu():
    qt = _pair(8192, 512, "nvfp4")
    x = torch.randn(16, 512, device=DEVICE).bfloat16()
    assert fused_ws_runs(x, qt) == HOPPER


@needs_hopper
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("m", [3, 16, 17, 32, 64])
def test_gpu_ws_fold_bit_exact_with_the_chain(name, m):
    """N = 16400 (128-row tiles, no K split, a partial last tile): fused == WS GEMM + silu_mul."""
    qt = _pair(8200, 512, name, seed=4)
    x = torch.randn(m, 512, device=DEVICE).bfloat16()
    assert fused_ws_runs(x, qt)
    got = gate_up_silu(x, qt)
    assert got.shape == (m, 8200)
    assert torch.equal(got, silu_mul(fp4_matmul(x, qt)))  # AUTO: the WS kernel on the plain weight
    ref = gate_up_silu_torch(x, qt)
    assert ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item() <= 2 ** -6


@needs_hopper
@pytest.mark.parametrize("bn", [64, 128])
def test_gpu_ws_fold_any_tile_and_its_errors(bn):
    """64- and 128-row tiles over N = 400 (last tile partial), against the same config on the plain weight."""
    from fp4kit.kernels.fp4_ws import WsConfig, fp4_ws_matmul, prepare_ws

    qt = _pair(200, 512, "nvfp4", seed=5)
    x = torch.randn(5, 512, device=DEVICE).bfloat16()
    cfg = WsConfig(block_n=bn, stages=2, split_k=1)
    prepared = prepare_fp4_weight(qt)
    got = fp4_ws_matmul(x, ws_glu_weight(prepared), config=cfg, glu=True)
    assert torch.equal(got, silu_mul(fp4_ws_matmul(x, prepare_ws(qt), config=cfg)))
    assert ws_glu_weight(prepared) is ws_glu_weight(prepared)  # built once
    with pytest.raises(ValueError, match="one K split"):
        fp4_ws_matmul(x, ws_glu_weight(prepared), config=WsConfig(block_n=bn, split_k=2), glu=True)




@needs_hopper
@pytest.mark.parametrize("name,m", [("nvfp4", 1), ("nvfp4", 2), ("mxfp4", 2)])
def test_gpu_llama_gate_up_at_one_and_two_rows_takes_the_ws_fold(name, m):
    """Where the WS kernel beat the GEMV at 1-2 rows (`ws_beats_gemv`), the fold runs there: == WS + silu_mul."""
    from fp4kit.kernels.fp4_ws import fp4_ws_matmul, prepare_ws

    qt = _pair(14336, 4096, name, seed=2)
    x = torch.randn(m, 4096, device=DEVICE).bfloat16()
    assert fused_ws_runs(x, qt)
    assert torch.equal(gate_up_silu(x, qt), silu_mul(fp4_ws_matmul(x, prepare_ws(qt))))
