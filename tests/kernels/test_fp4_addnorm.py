"""The FP4 GEMV with the residual add + RMSNorm in its tail (`fp4kit.kernels.fp4_addnorm`).

What must hold. The GEMV's y is the plain GEMV's y (same kernel, same launch); h_out = round(h + y) is
exact against torch's add of the same bf16 values; n_out follows add_rmsnorm's arithmetic, so against
the torch twin of the norm on the same h_out it differs only where the float32 sum of squares, summed
in another order, moves a rounding: at most one ulp, and rarely. The grid-wide ticket must see every
tile (several tiles per launch, with and without split-K) and be left at zero for the next launch.
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'fp4kit[test]')")

from fp4kit.formats import MXFP4Config, NVFP4Config, quantize  # noqa: E402
from fp4kit.kernels import prepare_fp4_weight  # noqa: E402
from fp4kit.kernels import fp4_gemm  # noqa: E402
from fp4kit.kernels.decode_ops import add_rmsnorm, add_rmsnorm_torch  # noqa: E402
from fp4kit.kernels.fp4_addnorm import (fused_tail_runs, linear_add_rmsnorm,  # noqa: E402
                                        linear_add_rmsnorm_torch)
from fp4kit.kernels.fp4_gemm import DecodePath, GemvConfig, GemvNorm, _launch_gemv, fp4_matmul, use_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_kernels = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                   reason="no CUDA and TRITON_INTERPRET != 1: the kernels cannot run here")
CONFIGS = {"nvfp4": NVFP4Config(), "mxfp4": MXFP4Config()}


def _case(n, k, m, name, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    qt = quantize(w.to(DEVICE), CONFIGS[name])
    x = torch.randn(m, k, generator=g).to(DEVICE).bfloat16()
    h = (torch.randn(m, n, generator=g) * 2).to(DEVICE).bfloat16()
    nw = (1 + 0.1 * torch.randn(n, generator=g)).to(DEVICE).bfloat16()
    return qt, x, h, nw


def _ulps(a, b):
    """|a - b| in units of b's bf16 ulp (b's exponent), elementwise."""
    e = torch.floor(torch.log2(b.float().abs().clamp_min(2.0 ** -126)))
    return (a.float() - b.float()).abs() / 2.0 ** (e - 7)


def _check(h_out, n_out, h, y, nw, eps, gemma):
    """h_out exact; n_out within one ulp of the twin norm on the same values, and mostly equal."""
    ref_h, ref_n = add_rmsnorm_torch(h, y, nw, eps, gemma)
    assert torch.equal(h_out, ref_h)
    assert _ulps(n_out, ref_n).max().item() <= 1
    assert (n_out == ref_n).float().mean().item() >= 0.97


@needs_kernels
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_fused_tail_against_gemv_and_norm(name, m, gemma):
    qt, x, h, nw = _case(96, 512, m, name)  # 96 rows: 6 tiles of 16 in the interpreter, the last one full
    if gemma:
        nw = nw.float() - 1
    assert fused_tail_runs(x, qt, h, nw, gemma)
    h_before = h.clone()
    h_out, n_out = linear_add_rmsnorm(x, qt, h, nw, 1e-5, gemma)
    assert torch.equal(h, h_before)  # the residual input is not modified
    y = fp4_matmul(x, qt, path=DecodePath.GEMV)
    _check(h_out, n_out, h, y, nw, 1e-5, gemma)


@needs_kernels
@pytest.mark.parametrize("split", [1, 2, 4])
def test_tail_sees_every_tile_with_split_k_and_leaves_tickets_zero(split):
    """Several row tiles and K splits: only the program that finishes the last tile normalises; run it three
    times on the same stream (tickets must be back at zero after each)."""
    qt, x, h, nw = _case(80, 4096, 2, "nvfp4", seed=1)  # 5 tiles of 16 rows, 4 chunks of K at 8 lanes
    prepared = prepare_fp4_weight(qt)
    cfg = GemvConfig(block_n=16, split_k=split, num_warps=1 if INTERPRETING else 4)
    y = fp4_matmul(x, qt, path=DecodePath.GEMV)
    for _ in range(3):
        norm = GemvNorm(h, nw, 1e-6, False, torch.empty_like(h), torch.empty_like(h))
        y2 = _launch_gemv(x, prepared, None, config=cfg, norm=norm)
        assert torch.equal(y2, y)  # the GEMV's own output is unchanged by the tail
        _check(norm.h_out, norm.n_out, h, y, nw, 1e-6, False)
        assert not fp4_gemm._NORM_TICKETS or all(int(t.abs().sum()) == 0 for t in fp4_gemm._NORM_TICKETS.values())


@needs_kernels
def test_against_the_torch_twin_bound():
    """The whole function against its twin (torch GEMM on bf16-rounded weights, then the norm): h_out carries
    the GEMV's difference from the twin (normalised max 2^-7, test_fp4_gemv); n_out the same, scaled."""
    qt, x, h, nw = _case(64, 1024, 1, "mxfp4", seed=2)
    h_out, n_out = linear_add_rmsnorm(x, qt, h, nw, 1e-5)
    ref_h, ref_n = linear_add_rmsnorm_torch(x, qt, h, nw, 1e-5)
    for got, ref in ((h_out, ref_h), (n_out, ref_n)):
        assert ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item() <= 2 ** -6


@needs_kernels
def test_add_rmsnorm_kernel_rounds_to_nearest_even_in_the_interpreter_too():
    """add_rmsnorm's kernel rounds with cast_rne (the interpreter's own bf16 cast truncates): its h_out equals
    torch's add, its norm within one ulp of the twin."""
    g = torch.Generator(device="cpu").manual_seed(3)
    h = torch.randn(3, 512, generator=g).to(DEVICE).bfloat16()
    d = torch.randn(3, 512, generator=g).to(DEVICE).bfloat16()
    w = (1 + 0.1 * torch.randn(512, generator=g)).to(DEVICE).bfloat16()
    got_h, got_n = add_rmsnorm(h, d, w, 1e-6)
    ref_h, ref_n = add_rmsnorm_torch(h, d, w, 1e-6, False)
    assert torch.equal(got_h, ref_h)
    assert _ulps(got_n, ref_n).max().item() <= 1


def test_falls_back_when_the_tail_cannot_run():
    """M past the GEMV range, a residual in another dtype, or a float32 Llama-form weight: GEMM + add_rmsnorm."""
    qt, x, h, nw = _case(64, 256, 3, "nvfp4", seed=4)
    assert not fused_tail_runs(x, qt, h, nw)
    h_out, n_out = linear_add_rmsnorm(x, qt, h, nw, 1e-5)
    ref_h, ref_n = linear_add_rmsnorm_torch(x, qt, h, nw, 1e-5)
    assert ((h_out.float() - ref_h.float()).abs().max() / ref_h.float().abs().max()).item() <= 2 ** -6
    x1, h1 = x[:1], h[:1]
    assert not fused_tail_runs(x1, qt, h1.float(), nw)
    assert not fused_tail_runs(x1, qt, h1, nw.float())


def test_rejects_mismatched_shapes():
    qt, x, h, nw = _case(64, 256, 1, "nvfp4", seed=5)
    with pytest.raises(ValueError, match="the residual h is"):
        linear_add_rmsnorm(x, qt, h[:, :32], nw, 1e-5)
    with pytest.raises(ValueError, match="512 features"):
        linear_add_rmsnorm(torch.randn(1, 512, device=DEVICE).bfloat16(), qt, h, nw, 1e-5)


@needs_kernels
def test_tail_refuses_persistent_and_glu():
    qt, x, h, nw = _case(32, 256, 1, "nvfp4", seed=6)
    norm = GemvNorm(h, nw, 1e-5, False, torch.empty_like(h), torch.empty_like(h))
    with pytest.raises(ValueError, match="non-persistent kernel without glu"):
        _launch_gemv(x, prepare_fp4_weight(qt), None, config=GemvConfig(block_n=16, split_k=1, persistent=1),
                     norm=norm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Llama-sized shapes need the GPU")
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("N,K", [(4096, 4096), (4096, 14336)])
def test_gpu_llama_o_and_down(name, N, K):
    """o (4096 x 4096) and down (4096 x 14336) at M = 1 with the library's launch: against the GEMV + the
    add_rmsnorm kernel (the unfused chain the engine ran)."""
    qt, x, h, nw = _case(N, K, 1, name, seed=7)
    h_out, n_out = linear_add_rmsnorm(x, qt, h, nw, 1e-5)
    chain_h, chain_n = add_rmsnorm(h, fp4_matmul(x, qt, path=DecodePath.GEMV), nw, 1e-5)
    assert torch.equal(h_out, chain_h)
    assert _ulps(n_out, chain_n).max().item() <= 1
    assert (n_out == chain_n).float().mean().item() >= 0.97


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need the GPU")
def test_gpu_graph_replay_equals_eager():
    qt, x, h, nw = _case(4096, 4096, 1, "nvfp4", seed=8)
    prepared = prepare_fp4_weight(qt)
    linear_add_rmsnorm(x, qt, h, nw, 1e-5, prepared=prepared)  # eager first: layouts and tickets exist
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_h, out_n = linear_add_rmsnorm(x, qt, h, nw, 1e-5, prepared=prepared)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        h.copy_(torch.randn_like(h))
        graph.replay()
        ref_h, ref_n = linear_add_rmsnorm(x, qt, h, nw, 1e-5, prepared=prepared)
        assert torch.equal(out_h, ref_h) and torch.equal(out_n, ref_n)
