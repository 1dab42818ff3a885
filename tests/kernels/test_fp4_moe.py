"""Grouped MoE GEMM: routing map, kernel against a float64 reference and against its torch twin."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'fp4kit[test]')")

from fp4kit.formats import MXFP4Config, NVFP4Config, quantize  # noqa: E402
from fp4kit.kernels.fp4_gemm import use_triton  # noqa: E402
from fp4kit.kernels.fp4_moe import (experts_from_quantized, fp4_moe_gemm, fp4_moe_gemm_torch, fp4_moe_mlp,  # noqa: E402
                                    fp4_moe_mlp_torch, max_tiles, prepare_fp4_experts, quantize_experts, route_topk)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernels = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                   reason="no CUDA and TRITON_INTERPRET != 1: the kernels cannot run here")
CONFIGS = {"nvfp4": NVFP4Config(), "mxfp4": MXFP4Config()}
# as tests/kernels/test_fp4_gemm.py: the output cast (half a bf16 ulp) plus float32 summation
TOL_MAX, TOL_RMS = 1.1 * 2**-8, 2**-8


if use_triton(torch.empty(0, device=DEVICE)):
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402

    from fp4kit.kernels._fp4_bits import e4m3_bf16x2_shifted, e8m0_bf16x2  # noqa: E402

    @triton.jit
    def _e4m3_pairs_kernel(c_ptr, o_ptr):
        offs = tl.arange(0, 256)
        tl.store(o_ptr + offs, e4m3_bf16x2_shifted(tl.load(c_ptr + offs)))

    @triton.jit
    def _e8m0_pairs_kernel(c_ptr, o_ptr, ONE_MUL: tl.constexpr):
        offs = tl.arange(0, 256)
        tl.store(o_ptr + offs, e8m0_bf16x2(tl.load(c_ptr + offs), ONE_MUL))


def _experts(E, N, K, name, seed=0):
    """Experts of different magnitudes (different NVFP4 global scales), rows of different magnitudes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(E, N, K, generator=g) * torch.logspace(-1, 1, N)[None, :, None]
    w = w * torch.logspace(-2, 1, E)[:, None, None] * 0.05
    return quantize_experts(w.to(DEVICE), CONFIGS[name])


def _routing_ids(T, top_k, E, seed=0, skew=False):
    """Distinct experts per token; skew sends every token to expert 0 (many tiles) and leaves others empty."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:top_k] + 1 for _ in range(T)])
    if skew:
        ids[:, 0] = 0
    return ids.to(DEVICE)


def _mma_weights_dtype(ex, x):
    """What the kernel's MMA multiplies: the weights dequantized to x's dtype, except NVFP4 with bf16 x through the
    bfloat16 pair decode (`MOE_NV_BF16_DECODE`): code x E4M3 exactly, the per-tensor factor on the float32 sums,
    so its reference is the exactly dequantized weight (float32 holds code x E4M3 / global scale to 2^-24)."""
    from fp4kit.kernels import fp4_moe

    nv_exact = isinstance(ex.config, NVFP4Config) and x.dtype == torch.bfloat16 and fp4_moe.MOE_NV_BF16_DECODE
    return torch.float32 if nv_exact and use_triton(x) else x.dtype


def _reference(x, ex, ids, swiglu=False, pair_weights=None, x_per_pair=False):
    """float64 per pair, on the weights as the kernel's MMA sees them (`_mma_weights_dtype`)."""
    T, top_k = ids.shape
    w = ex.dequantize(_mma_weights_dtype(ex, x)).double()  # [E, N, K]
    flat = ids.reshape(-1)
    rows = x.double() if x_per_pair else x.double().repeat_interleave(top_k, 0)  # [P, K]
    h = torch.einsum("pk,pnk->pn", rows, w[flat])
    if swiglu:
        gate, up = h.chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
    if pair_weights is not None:
        h = h * pair_weights.reshape(-1, 1).double()
    return h


def _reference_twin(x, ex, ids):
    """float64 per pair on the weights dequantized to x's dtype: what the torch twin multiplies."""
    T, top_k = ids.shape
    w = ex.dequantize(x.dtype).double()
    return torch.einsum("pk,pnk->pn", x.double().repeat_interleave(top_k, 0), w[ids.reshape(-1)])


def _reference_mlp(x, gate_up, down, ids, pw, wdtype):
    """The expert block in float64 on weights dequantized to wdtype, h rounded to x's dtype between the GEMMs
    (as the kernel writes it), the slots summed in float64."""
    T, top_k = ids.shape
    flat = ids.reshape(-1)
    h = torch.einsum("pk,pnk->pn", x.double().repeat_interleave(top_k, 0), gate_up.dequantize(wdtype).double()[flat])
    gate, up = h.chunk(2, dim=-1)
    h = (torch.nn.functional.silu(gate) * up).to(x.dtype).double()
    y = torch.einsum("pk,pnk->pn", h, down.dequantize(wdtype).double()[flat]) * pw.reshape(-1, 1).double()
    return y.reshape(T, top_k, -1).sum(1)


def _errors(y, ref):
    err = y.double() - ref
    return (err.abs().max() / ref.abs().max()).item(), (err.norm() / ref.norm()).item()


def test_route_topk_covers_every_pair_once():
    E, T, top_k, bm = 8, 37, 3, 4
    ids = _routing_ids(T, top_k, E, skew=True)
    r = route_topk(ids, E, block_m=bm)
    assert r.tile_expert.numel() == max_tiles(T * top_k, E, bm)
    seen = torch.zeros(T * top_k, dtype=torch.int32)
    for t in range(r.tile_expert.numel()):
        e = int(r.tile_expert[t])
        if e == E:  # unused tile
            continue
        start, end = int(r.tile_start[t]), int(r.tile_end[t])
        rows = r.pairs[start:min(start + bm, end)].long().cpu()
        assert len(rows) > 0 and (ids.reshape(-1).cpu()[rows] == e).all()
        seen[rows] += 1
    assert (seen == 1).all()
    assert not (r.tile_expert == 1 + E).any() and int((r.tile_expert < E).sum()) >= (T + bm - 1) // bm


def test_max_tiles_is_a_bound_for_extreme_routings():
    """All pairs on one expert, and one pair per expert: the bound holds and is reached where it should."""
    for E, T, top_k, bm in [(4, 1, 1, 16), (64, 8, 8, 16), (3, 50, 1, 16), (128, 64, 8, 16)]:
        for ids in (torch.zeros(T, top_k, dtype=torch.long), torch.arange(T * top_k).reshape(T, top_k) % E):
            r = route_topk(ids, E, block_m=bm)
            real = int((r.tile_expert < E).sum())
            counts = torch.bincount(ids.reshape(-1), minlength=E)
            assert real == int(((counts + bm - 1) // bm).sum()) <= r.tile_expert.numel()


def test_quantize_experts_matches_formats_per_expert():
    w = torch.randn(3, 16, 64, device=DEVICE)
    ex = quantize_experts(w, NVFP4Config())
    for e in range(3):
        want = quantize(w[e], NVFP4Config())
        assert torch.equal(ex.expert(e).dequantize(), want.dequantize())
    assert ex.global_scale.shape == (3,) and len(set(ex.global_scale.tolist())) == 3


@needs_kernels
@pytest.mark.parametrize("T", [1, 17, 64])
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_moe_gemm_plain_vs_reference_and_twin(name, T):
    """K = 160 leaves a K tail, N = 40 an N tail; experts with zero pairs; T = 64 puts > 16 pairs on some."""
    E, N, K, top_k = 6, 40, 160, 2
    ex = _experts(E, N, K, name)
    ids = _routing_ids(T, top_k, E, seed=T)
    x = torch.randn(T, K, device=DEVICE, dtype=torch.bfloat16)
    r = route_topk(ids, E)
    y = fp4_moe_gemm(x, ex, r)
    assert y.shape == (T * top_k, N) and y.dtype == torch.bfloat16
    ref = _reference(x, ex, ids)
    max_err, rms_err = _errors(y, ref)
    assert max_err <= TOL_MAX and rms_err <= TOL_RMS, (max_err, rms_err)
    twin = fp4_moe_gemm_torch(x, ex, r)
    max_err, rms_err = _errors(twin, _reference_twin(x, ex, ids))
    assert max_err <= TOL_MAX and rms_err <= TOL_RMS, (max_err, rms_err)


@needs_kernels
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_moe_gemm_swiglu_and_pair_weights_skewed(name):
    """Every token on expert 0 (3 M tiles of 16), the other experts sparse or empty, fused SwiGLU."""
    E, I, K, T, top_k = 5, 24, 96, 40, 2
    ex = _experts(E, 2 * I, K, name, seed=1)
    ids = _routing_ids(T, top_k, E, seed=2, skew=True)
    x = torch.randn(T, K, device=DEVICE, dtype=torch.bfloat16)
    pw = torch.rand(T, top_k, device=DEVICE)
    r = route_topk(ids, E, block_m=16)
    y = fp4_moe_gemm(x, prepare_fp4_experts(ex), r, swiglu=True, pair_weights=pw)
    assert y.shape == (T * top_k, I)
    max_err, rms_err = _errors(y, _reference(x, ex, ids, swiglu=True, pair_weights=pw))
    assert max_err <= TOL_MAX and rms_err <= TOL_RMS, (max_err, rms_err)


@needs_kernels
def test_moe_gemm_x_per_pair_fp16():
    E, N, K, T, top_k = 4, 32, 64, 5, 3
    ex = _experts(E, N, K, "nvfp4", seed=3)
    ids = _routing_ids(T, top_k, E, seed=4)
    h = torch.randn(T * top_k, K, device=DEVICE, dtype=torch.float16)
    y = fp4_moe_gemm(h, ex, route_topk(ids, E), x_per_pair=True)
    max_err, rms_err = _errors(y, _reference(h, ex, ids, x_per_pair=True))
    assert max_err <= 1.1 * 2**-11 and rms_err <= 2**-11, (max_err, rms_err)


@needs_kernels
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_moe_mlp_matches_twin(name):
    """The whole block (gate_up SwiGLU, down with router weights, float32 combine) against its twin."""
    E, H, I, T, top_k = 6, 64, 32, 9, 2
    gate_up, down = _experts(E, 2 * I, H, name, seed=5), _experts(E, H, I, name, seed=6)
    ids = _routing_ids(T, top_k, E, seed=7)
    pw = torch.softmax(torch.randn(T, top_k, device=DEVICE), -1)
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    got = fp4_moe_mlp(x, gate_up, down, ids, pw)
    want = fp4_moe_mlp_torch(x, gate_up, down, ids, pw)
    assert got.shape == (T, H)
    if _mma_weights_dtype(gate_up, x) != x.dtype:  # NVFP4 bfloat16 decode: the block on the exact weights
        want = _reference_mlp(x, gate_up, down, ids, pw, _mma_weights_dtype(gate_up, x))
        # the twin against the same reference: its bf16-rounded weights are the larger error of the two
        twin = fp4_moe_mlp_torch(x, gate_up, down, ids, pw)
        assert (got.double() - want).norm() < (twin.double() - want).norm()
    # both round h to bf16 between the GEMMs; a 1-ulp flip there moves the output by ~2^-8 relative
    err = (got.double() - want.double())
    assert (err.abs().max() / want.double().abs().max()).item() <= 2**-6
    assert (err.norm() / want.double().norm()).item() <= 2**-8


@needs_kernels
def test_experts_from_quantized_3d():
    """A 3-D QuantizedTensor (one global scale) runs through the same kernel."""
    w = torch.randn(4, 32, 64, device=DEVICE) * 0.1
    qt = quantize(w, NVFP4Config())
    ex = experts_from_quantized(qt)
    assert torch.equal(ex.dequantize(), qt.dequantize())
    ids = _routing_ids(3, 2, 4, seed=8)
    x = torch.randn(3, 64, device=DEVICE, dtype=torch.bfloat16)
    max_err, rms_err = _errors(fp4_moe_gemm(x, ex, route_topk(ids, 4)), _reference(x, ex, ids))
    assert max_err <= TOL_MAX and rms_err <= TOL_RMS, (max_err, rms_err)


def test_moe_gemm_rejects_bad_input():
    ex = _experts(4, 16, 64, "mxfp4")
    r = route_topk(torch.zeros(2, 2, dtype=torch.long, device=DEVICE), 4)
    with pytest.raises(ValueError, match="rows"):
        fp4_moe_gemm(torch.randn(3, 64, device=DEVICE, dtype=torch.bfloat16), ex, r)
    with pytest.raises(ValueError, match=r"\[rows, 64\]"):
        fp4_moe_gemm(torch.randn(2, 32, device=DEVICE, dtype=torch.bfloat16), ex, r)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        fp4_moe_gemm(torch.randn(2, 64, device=DEVICE), ex, r)
    with pytest.raises(ValueError, match="8 experts"):
        r8 = route_topk(r.expert_ids.view(2, 2), 8)
        fp4_moe_gemm(torch.randn(2, 64, device=DEVICE, dtype=torch.bfloat16), ex, r8)


@needs_kernels
@pytest.mark.parametrize("split,block_k", [(2, 32), (3, 32)], ids=["even_split2", "uneven_split3"])
def test_moe_gemm_split_k_swiglu(split, block_k):
    """Split-K with the in-kernel reduction of gate and up partials (K = 96: 3 K steps of 32, split 2 is
    uneven, split 3 even), skewed routing (several M tiles on expert 0); twice, bit-identical."""
    from fp4kit.kernels.fp4_moe import MoEGemmConfig

    E, I, K, T, top_k = 5, 24, 96, 20, 2
    ex = _experts(E, 2 * I, K, "nvfp4", seed=9)
    ids = _routing_ids(T, top_k, E, seed=10, skew=True)
    x = torch.randn(T, K, device=DEVICE, dtype=torch.bfloat16)
    pw = torch.rand(T, top_k, device=DEVICE)
    r = route_topk(ids, E, block_m=16)
    prep = prepare_fp4_experts(ex)
    cfg = MoEGemmConfig(16, block_k, num_warps=1 if DEVICE.type == "cpu" else 4, num_stages=1, split_k=split)
    first = fp4_moe_gemm(x, prep, r, swiglu=True, pair_weights=pw, config=cfg)
    second = fp4_moe_gemm(x, prep, r, swiglu=True, pair_weights=pw, config=cfg)
    assert torch.equal(first, second)
    max_err, rms_err = _errors(first, _reference(x, ex, ids, swiglu=True, pair_weights=pw))
    assert max_err <= TOL_MAX and rms_err <= TOL_RMS, (max_err, rms_err)


@needs_kernels
@pytest.mark.parametrize("T,top_k,E,bm,skew", [(1, 8, 128, 16, False), (37, 3, 8, 4, True), (64, 8, 128, 16, False),
                                               (5, 2, 6, 16, True)])
def test_route_kernel_matches_torch_twin(T, top_k, E, bm, skew):
    """The one-program routing kernel gives the twin's sorted pairs and tile map (unused tiles: expert E)."""
    from fp4kit.kernels.fp4_moe import route_topk_torch

    ids = _routing_ids(T, top_k, E, seed=T, skew=skew)
    got, want = route_topk(ids, E, block_m=bm), route_topk_torch(ids, E, block_m=bm)
    assert torch.equal(got.pairs, want.pairs) and torch.equal(got.tile_expert, want.tile_expert)
    real = want.tile_expert < E
    assert torch.equal(got.tile_start[real], want.tile_start[real])
    assert torch.equal(got.tile_end[real], want.tile_end[real])


# ---- round 6: the combine kernel, evict_first weight loads, PDL through the layer's chain of launches


@needs_kernels
@pytest.mark.parametrize("T,top_k,H", [(1, 8, 2048), (5, 3, 160), (3, 1, 48)])
def test_combine_kernel_equals_twin(T, top_k, H):
    """The one-launch slot combine equals its torch twin bit for bit (a running float32 sum in slot order)."""
    from fp4kit.kernels.fp4_moe import _combine, combine_slots

    y = (torch.randn(T * top_k, H, device=DEVICE) * torch.logspace(-3, 3, H, device=DEVICE)).bfloat16()
    got = combine_slots(y, T, top_k)
    want = _combine(y, T, top_k)
    assert got.dtype == y.dtype and torch.equal(got.view(torch.int16), want.view(torch.int16))
    # and within float32 rounding of a float64 sum
    ref = y.double().view(T, top_k, H).sum(1)
    assert ((got.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-30).all()


@needs_kernels
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_moe_gemm_evict_first_same_result(name):
    """evict_first on the weight loads changes where bytes live in L2, never the result: bit-identical."""
    from fp4kit.kernels.fp4_moe import MoEGemmConfig

    E, I, K, T, top_k = 4, 32, 128, 6, 2
    ex = _experts(E, 2 * I, K, name, seed=11)
    ids = _routing_ids(T, top_k, E, seed=12)
    x = torch.randn(T, K, device=DEVICE, dtype=torch.bfloat16)
    r = route_topk(ids, E, block_m=16)
    prep = prepare_fp4_experts(ex)
    w, st = (1, 1) if DEVICE.type == "cpu" else (4, 3)
    plain = fp4_moe_gemm(x, prep, r, swiglu=True, config=MoEGemmConfig(16, 64, num_warps=w, num_stages=st))
    evict = fp4_moe_gemm(x, prep, r, swiglu=True, config=MoEGemmConfig(16, 64, num_warps=w, num_stages=st,
                                                                       evict="evict_first"))
    assert torch.equal(plain, evict)
    max_err, rms_err = _errors(evict, _reference(x, ex, ids, swiglu=True))
    assert max_err <= TOL_MAX and rms_err <= TOL_RMS, (max_err, rms_err)


def test_moe_gemm_config_rejects_bad_evict():
    from fp4kit.kernels.fp4_moe import MoEGemmConfig

    with pytest.raises(ValueError, match="evict"):
        MoEGemmConfig(16, 64, evict="first")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PDL and CUDA graphs need a GPU")
@pytest.mark.parametrize("fused", [False, True], ids=["combine_launch", "fused_combine"])
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_moe_mlp_pdl_graph_equals_eager_without_pdl(name, fused, monkeypatch):
    """The layer's launches with PDL (and the down GEMM's routing read + weight prefetch before its wait),
    captured in a CUDA graph and replayed over changing inputs, equal the same layer launched eagerly
    without PDL, bit for bit (a missing wait would read stale routing tables, h or y)."""
    from fp4kit.kernels import fp4_moe

    monkeypatch.setattr(fp4_moe, "MOE_FUSED_COMBINE", fused)
    monkeypatch.setattr(fp4_moe, "MOE_PREFETCH", True)

    E, H, I, T, top_k = 16, 256, 128, 4, 4
    gate_up, down = _experts(E, 2 * I, H, name, seed=13), _experts(E, H, I, name, seed=14)
    gu, dn = prepare_fp4_experts(gate_up), prepare_fp4_experts(down)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = _routing_ids(T, top_k, E, seed=15)
    pw = torch.softmax(torch.randn(T, top_k, device="cuda"), -1)
    monkeypatch.setattr(fp4_moe, "MOE_PDL", True)
    fp4_moe.fp4_moe_mlp(x, gu, dn, ids, pw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp4_moe.fp4_moe_mlp(x, gu, dn, ids, pw)
    for seed in range(3):
        x.copy_(torch.randn_like(x))
        ids.copy_(_routing_ids(T, top_k, E, seed=16 + seed))
        pw.copy_(torch.softmax(torch.randn_like(pw), -1))
        graph.replay()
        monkeypatch.setattr(fp4_moe, "MOE_PDL", False)
        want = fp4_moe.fp4_moe_mlp(x, gu, dn, ids, pw)
        monkeypatch.setattr(fp4_moe, "MOE_PDL", True)
        assert torch.equal(out, want), seed


@needs_kernels
@pytest.mark.parametrize("name,split", [("nvfp4", 1), ("mxfp4", 1), ("nvfp4", 2)])
def test_moe_gemm_fused_combine_equals_separate(name, split):
    """The combine fused into the down GEMM's epilogue (tickets per token) equals the GEMM followed by
    the separate combine, bit for bit, twice in a row (the tickets are left at zero), split-K included."""
    from fp4kit.kernels.fp4_moe import MoEGemmConfig, _combine

    E, H, I, T, top_k = 6, 48, 64, 7, 3
    down = _experts(E, H, I, name, seed=17)
    ids = _routing_ids(T, top_k, E, seed=18, skew=True)
    h = torch.randn(T * top_k, I, device=DEVICE, dtype=torch.bfloat16)
    pw = torch.rand(T, top_k, device=DEVICE)
    r = route_topk(ids, E, block_m=16)
    prep = prepare_fp4_experts(down)
    cfg = MoEGemmConfig(16, 32, num_warps=1 if DEVICE.type == "cpu" else 4, num_stages=1, split_k=split)
    y = fp4_moe_gemm(h, prep, r, x_per_pair=True, pair_weights=pw, config=cfg)
    want = _combine(y, T, top_k)
    for _ in range(2):
        got = fp4_moe_gemm(h, prep, r, x_per_pair=True, pair_weights=pw, config=cfg, combine=True)
        assert got.shape == (T, H) and torch.equal(got, want)


@needs_kernels
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_moe_gemm_lut_decode_same_weights(name, monkeypatch):
    """The table decode (MoEGemmConfig.lut) feeds the MMA the same weights in the same k order as the float
    decode: bit-identical outputs (MXFP4 against its float decode; the bf16 decode permutes k)."""
    from fp4kit.kernels import fp4_gemm
    from fp4kit.kernels.fp4_moe import MoEGemmConfig

    from fp4kit.kernels import fp4_moe

    monkeypatch.setattr(fp4_gemm, "MXFP4_BF16_DECODE", False)
    monkeypatch.setattr(fp4_moe, "MOE_NV_BF16_DECODE", False)  # NVFP4's bf16 decode has exact-product weights
    E, I, K, T, top_k = 4, 32, 128, 6, 2
    ex = _experts(E, 2 * I, K, name, seed=19)
    ids = _routing_ids(T, top_k, E, seed=20, skew=True)
    x = torch.randn(T, K, device=DEVICE, dtype=torch.bfloat16)
    r = route_topk(ids, E, block_m=16)
    prep = prepare_fp4_experts(ex)
    w, st = (1, 1) if DEVICE.type == "cpu" else (4, 3)
    plain = fp4_moe_gemm(x, prep, r, swiglu=True, config=MoEGemmConfig(16, 64, num_warps=w, num_stages=st))
    lut = fp4_moe_gemm(x, prep, r, swiglu=True, config=MoEGemmConfig(16, 64, num_warps=w, num_stages=st, lut=True))
    assert torch.equal(plain, lut)


@needs_kernels
def test_moe_nvfp4_bf16_decode_bits():
    """NVFP4's bfloat16 pair decode, bit for bit: with one-hot x rows each output is one weight, so the kernel
    must return bf16(float32(code x E4M3 x 2^-9) x post[e]), the product taken from the formats' own dequantizer
    (global scale 1: code x E4M3 exactly) and post from `nv_post_factor`. Split K on, every expert in turn."""
    from fp4kit.kernels import fp4_moe
    from fp4kit.kernels.fp4_gemm import nv_post_factor

    assert fp4_moe.MOE_NV_BF16_DECODE
    E, N, K = 3, 32, 128
    ex = _experts(E, N, K, "nvfp4", seed=23)
    unit = fp4_moe.FP4Experts(ex.packed, ex.block_scale, torch.ones_like(ex.global_scale), ex.config)
    prod = unit.dequantize(torch.float32)  # code x E4M3, exact
    post = nv_post_factor(ex.config, ex.global_scale)
    prep = prepare_fp4_experts(ex)
    assert torch.equal(prep.post, post)
    x = torch.eye(K, device=DEVICE, dtype=torch.bfloat16)  # token k selects weight column k
    for e in range(E):
        ids = torch.full((K, 1), e, device=DEVICE, dtype=torch.long)
        w, st = (1, 1) if DEVICE.type == "cpu" else (4, 3)
        y = fp4_moe_gemm(x, prep, route_topk(ids, E, block_m=16),
                         config=fp4_moe.MoEGemmConfig(16, 64, num_warps=w, num_stages=st, split_k=2))
        want = ((prod[e] * 2.0**-9) * post[e]).to(torch.bfloat16).T  # [K, N]
        # as values: a -0 weight comes out +0 (the MMA adds the zero products of the other columns)
        assert torch.equal(y.float(), want.float()), e
        assert (y != 0).sum() > 0.9 * y.numel()


@needs_kernels
def test_e4m3_scale_pairs_in_registers_equal_the_table():
    """`_fp4_bits.e4m3_bf16x2_shifted` (the NVFP4 bf16 decode's scales computed in registers) equals the table
    `fp4_gemm._bf16x2_e4m3_table` (torch: E4M3 -> float32 x 2^117 -> bfloat16) for all 256 codes, bit for bit
    (the two NaN codes as NaN)."""
    from fp4kit.kernels.fp4_gemm import _bf16x2_e4m3_table

    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    got = torch.empty(256, dtype=torch.int32, device=DEVICE)
    _e4m3_pairs_kernel[(1,)](codes, got)
    want = _bf16x2_e4m3_table(DEVICE)
    nan = (codes & 127) == 127
    assert torch.equal(got[~nan], want[~nan])
    assert torch.equal(got & 0xFFFF, (got >> 16) & 0xFFFF)  # both halves hold the same scale
    assert ((got[nan] & 0x7FFF) == 0x7FC0).all()


@needs_kernels
@pytest.mark.parametrize("one_mul", [True, False])
def test_e8m0_scale_pairs_in_registers_equal_the_table(one_mul):
    """`_fp4_bits.e8m0_bf16x2` (the MXFP4 bf16 decode's scales computed in registers) equals
    `fp4_gemm._bf16x2_pow2_table` for all 256 codes, bit for bit, in both modes."""
    from fp4kit.kernels.fp4_gemm import _bf16x2_pow2_table

    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    got = torch.empty(256, dtype=torch.int32, device=DEVICE)
    _e8m0_pairs_kernel[(1,)](codes, got, ONE_MUL=one_mul)
    probe = torch.tensor([128 if one_mul else 200], dtype=torch.uint8, device=DEVICE)  # picks the table's mode
    want, mode = _bf16x2_pow2_table(probe)
    assert mode == one_mul and torch.equal(got, want)
