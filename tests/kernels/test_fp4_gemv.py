"""The CUDA-core FP4 GEMV (`_fp4_gemv`, `fp4_matmul(..., path=DecodePath.GEMV)`) and its plane layout.

Error bounds. The GEMV never rounds a decoded weight to x's dtype: it sums x * code * s_eff in
float32 (the code times 2^-14 is exact, the block scale times 2^14 multiplies a 16-product group
sum) and rounds once at the output. So against a float64 reference on the float32 (unrounded)
weights it carries only the output cast (half an ulp: 2^-8 relative for bf16, 2^-11 for fp16) and
float32 summation (~K 2^-24 of sum |x w|): the bounds of test_fp4_gemm (max error 1.1 x the cast
bound, RMS error the cast bound, both normalised by the reference). Against the twin, which rounds
every weight to bf16 first (relative error up to 2^-9 each, random sign), the normalised max
difference stays within 2^-7 (test_fp4_gemm's bound for fp4_linear vs the twin). With x one-hot
the sum has one term, so y is the twin's weight bit for bit: that checks the decode exactly.
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'fp4kit[test]')")

from fp4kit.formats import MXFP4Config, NVFP4Config, quantize  # noqa: E402
from fp4kit.kernels import fp4_matmul, fp4_matmul_torch, prepare_fp4_weight  # noqa: E402
from fp4kit.kernels.fp4_gemm import (GEMV_BIT_POSITIONS, DecodePath, GemvConfig, _launch_gemv,  # noqa: E402
                                     gemv_layout, gemv_unlayout, use_triton)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_kernels = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                   reason="no CUDA and TRITON_INTERPRET != 1: the kernels cannot run here")
CONFIGS = {"nvfp4": NVFP4Config(), "nvfp4_torchao": NVFP4Config.torchao(), "mxfp4": MXFP4Config()}
TOL = {torch.bfloat16: (1.1 * 2**-8, 2**-8), torch.float16: (1.1 * 2**-11, 2**-11)}


def _weight(n, k, scale=0.05):
    """Rows of different magnitudes, so block scales differ along N and K."""
    return torch.randn(n, k, device=DEVICE) * scale * torch.logspace(-2, 2, n, device=DEVICE)[:, None]


def _errors(y, x, qt, bias):
    """(max |y - ref| / max |ref|, ||y - ref|| / ||ref||), ref in float64 on the float32 weights."""
    ref = x.double() @ qt.dequantize(torch.float32).double().T
    if bias is not None:
        ref = ref + bias.double()
    err = y.double() - ref
    return (err.abs().max() / ref.abs().max()).item(), (err.norm() / ref.norm()).item()


# ----------------------------------------------------------------------------------------------
# the layout (pure torch)


@pytest.mark.parametrize("lanes", [1, 2, 8, 16])
@pytest.mark.parametrize("name,K", [("nvfp4", 256), ("nvfp4", 384), ("mxfp4", 512), ("mxfp4", 1024),
                                    ("nvfp4", 2048), ("mxfp4", 4096)])
def test_gemv_layout_round_trip(name, K, lanes):
    qt = quantize(_weight(24, K), CONFIGS[name])
    lay = gemv_layout(qt, lanes=lanes)
    assert lay.words.dtype == torch.int32 and lay.words.shape == (24, K // 8)
    assert lay.scales.shape == (24, K // (8 * qt.config.block_size), 8)
    data, scales = gemv_unlayout(lay, qt.config.block_size)
    assert torch.equal(data, qt.data) and torch.equal(scales, qt.scale.view(torch.uint8))


@pytest.mark.parametrize("rows", [1, 5, 24])
def test_gemv_layout_in_row_chunks_is_the_same(rows):
    """The words are built a few rows at a time (an 8B model's 128256 x 4096 head at once needed 16.8 GB of int64
    temporaries and ran out of memory on an 80 GB GPU beside the model): any chunking gives the same layout."""
    qt = quantize(_weight(24, 512), CONFIGS["nvfp4"])
    whole, chunked = gemv_layout(qt, rows_per_chunk=10 ** 6), gemv_layout(qt, rows_per_chunk=rows)
    assert torch.equal(whole.words, chunked.words) and torch.equal(whole.scales, chunked.scales)


def test_gemv_layout_bits_independent_reference():
    """Element by element, written from the layout's definition (not through the inverse): the code
    of k = j K/8 + i sits in logical word i at GEMV_BIT_POSITIONS[j % 4] (+ 16 for j >= 4), and
    logical word 16 lane + 4 r + c of chunk ch is stored at ch 16 L + 4 L r + 4 lane + c."""
    N, K, L = 3, 512, 2
    qt = quantize(_weight(N, K), NVFP4Config())
    lay = gemv_layout(qt, lanes=L)
    words = lay.words.cpu().tolist()
    data = qt.data.cpu().tolist()
    K8 = K // 8
    for n in range(N):
        for k in range(K):
            code = (data[n][k // 2] >> (4 * (k % 2))) & 15
            j, i = divmod(k, K8)
            ch, rest = divmod(i, 16 * L)
            lane, rc = divmod(rest, 16)
            r, c = divmod(rc, 4)
            w = words[n][ch * 16 * L + 4 * L * r + 4 * lane + c] & 0xFFFFFFFF
            pos = [p + 16 * (j >= 4) for p in GEMV_BIT_POSITIONS[j % 4]]
            assert sum(((w >> p) & 1) << b for b, p in enumerate(pos)) == code, (n, k)
    codes = qt.scale.view(torch.uint8).cpu()
    for n in range(N):
        for b in range(K // 16):
            j, g = divmod(b, K // 128)
            assert lay.scales[n, g, j].item() == codes[n, b].item()


def test_gemv_layout_rejects_misaligned_k():
    with pytest.raises(ValueError, match="in_features % 256"):
        gemv_layout(quantize(_weight(8, 128), MXFP4Config()))
    with pytest.raises(ValueError, match="in_features % 128"):
        gemv_layout(quantize(_weight(8, 160), NVFP4Config()))


# ----------------------------------------------------------------------------------------------
# the kernel


@needs_kernels
@pytest.mark.parametrize("m,has_bias", [(1, False), (2, True), (3, False), (4, True)])
@pytest.mark.parametrize("name,K", [("nvfp4", 256), ("nvfp4_torchao", 384), ("mxfp4", 512)])
def test_gemv_matches_reference(name, K, m, has_bias):
    """N = 48 (three 16-row tiles), M = 1..4 (M = 3 masks a token), both formats, bias or not."""
    qt = quantize(_weight(48, K), CONFIGS[name])
    x = torch.randn(m, K, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(48, device=DEVICE, dtype=torch.bfloat16) if has_bias else None
    y = fp4_matmul(x, qt, bias, path=DecodePath.GEMV)
    assert y.shape == (m, 48) and y.dtype == torch.bfloat16
    max_err, rms_err = _errors(y, x, qt, bias)
    assert max_err <= TOL[torch.bfloat16][0] and rms_err <= TOL[torch.bfloat16][1], (max_err, rms_err)
    twin = fp4_matmul_torch(x, qt, bias).float()
    assert ((y.float() - twin).abs().max() / twin.abs().max()).item() <= 2**-7


@needs_kernels
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("m", [1, 2])
def test_gemv_16_lanes_matches_reference(name, m):
    """The 16-lane layout (the tuned shapes', `GEMV_TUNED`): K = 2048 is one chunk of 256 words per row."""
    qt = quantize(_weight(40, 2048), CONFIGS[name])
    prepared = prepare_fp4_weight(qt)
    prepared.gemv = gemv_layout(qt, lanes=16)
    assert prepared.gemv.lanes == 16
    x = torch.randn(m, 2048, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(40, device=DEVICE, dtype=torch.bfloat16)
    y = _launch_gemv(x, prepared, bias)
    max_err, rms_err = _errors(y, x, qt, bias)
    assert max_err <= TOL[torch.bfloat16][0] and rms_err <= TOL[torch.bfloat16][1], (max_err, rms_err)
    eight = prepare_fp4_weight(qt)
    eight.gemv = gemv_layout(qt, lanes=8)
    y8 = _launch_gemv(x, eight, bias)  # the same sums in another order: within float32 rounding of each other
    assert ((y.float() - y8.float()).abs().max() / y8.float().abs().max()).item() <= 2**-7


def test_gemv_tuned_lanes():
    """Tuned shapes get their lanes where the format's blocks allow them; any other shape the default."""
    from fp4kit.kernels.fp4_gemm import GEMV_LANES, GEMV_TUNED, gemv_tuned_lanes

    assert GEMV_TUNED[(28672, 4096)][0] == 16
    assert gemv_tuned_lanes(28672, 4096, 16) == 16 and gemv_tuned_lanes(28672, 4096, 32) == 16
    assert gemv_tuned_lanes(6144, 4096, 16) == 16
    assert gemv_tuned_lanes(4096, 14336, 16) == GEMV_LANES == 8
    assert gemv_tuned_lanes(1000, 4096, 16) == GEMV_LANES


@needs_kernels
def test_gemv_fp16_rows_not_multiple_of_tile():
    """fp16 x, N = 40 (the last 16-row tile is half masked), 3-D input."""
    qt = quantize(_weight(40, 256), NVFP4Config())
    x = torch.randn(1, 2, 256, device=DEVICE, dtype=torch.float16)
    y = fp4_matmul(x, qt, path=DecodePath.GEMV)
    assert y.shape == (1, 2, 40) and y.dtype == torch.float16
    max_err, rms_err = _errors(y.reshape(2, 40), x.reshape(2, 256), qt, None)
    assert max_err <= TOL[torch.float16][0] and rms_err <= TOL[torch.float16][1], (max_err, rms_err)


@needs_kernels
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_gemv_one_hot_x_gives_twin_weights_bit_exact(name):
    """x rows one-hot at k in all 8 planes: y[m, n] = w[n, k] exactly (one product: code * 2^-14 times
    s_eff * 2^14 is the twin's float32 product, then one rounding to bf16), so every decoded weight is
    compared bit for bit with the formats' dequantizer. 48 random rows cover all 16 codes."""
    N, K = 48, 256
    qt = quantize(_weight(N, K), CONFIGS[name])
    K8 = K // 8
    ks = [j * K8 + (5 * j + 3) % K8 for j in range(8)]
    want = (qt.dequantize(torch.bfloat16)[:, ks] + 0.0).T  # a sum turns -0 into +0
    for part in (ks[:4], ks[4:]):
        x = torch.zeros(4, K, device=DEVICE, dtype=torch.bfloat16)
        x[torch.arange(4), torch.tensor(part)] = 1.0
        y = fp4_matmul(x, qt, path=DecodePath.GEMV)
        assert torch.equal(y.view(torch.int16), want[ks.index(part[0]): ks.index(part[0]) + 4].contiguous()
                           .view(torch.int16))


@needs_kernels
@pytest.mark.parametrize("split,prefetch", [(2, False), (2, True), (1, True)], ids=["split2", "split2_prefetch",
                                                                                  "prefetch"])
def test_gemv_split_k_and_prefetch(split, prefetch):
    """Two K chunks (lanes = 2 at K = 512): split-K with the in-kernel reduction (run twice: the
    tickets are reset and the result is bit-identical) and the register prefetch of the next chunk."""
    qt = quantize(_weight(40, 512), NVFP4Config())
    prepared = prepare_fp4_weight(qt)
    prepared.gemv = gemv_layout(qt, lanes=2)
    x = torch.randn(3, 512, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(40, device=DEVICE, dtype=torch.bfloat16)
    cfg = GemvConfig(block_n=16, split_k=split, num_warps=4, prefetch=prefetch)
    first = _launch_gemv(x, prepared, bias, config=cfg)
    assert torch.equal(first, _launch_gemv(x, prepared, bias, config=cfg))
    max_err, rms_err = _errors(first, x, qt, bias)
    assert max_err <= TOL[torch.bfloat16][0] and rms_err <= TOL[torch.bfloat16][1], (max_err, rms_err)


@needs_kernels
@pytest.mark.parametrize("cfg", [GemvConfig(block_n=16, split_k=1, stages=2),
                                 GemvConfig(block_n=16, split_k=1, stages=4, evict="evict_first"),
                                 GemvConfig(block_n=16, split_k=2, cache=".cg")],
                         ids=["stages2", "stages4_evict_first", "split2_cg"])
def test_gemv_load_levers_same_result(cfg):
    """Round-4 launch levers (software pipelining of the K loop, cache modifier, eviction policy) change
    how the words are loaded, not the arithmetic: bit-identical to the plain launch. Four K chunks
    (lanes = 2 at K = 1024), so stages = 4 has a full pipeline; 40 rows leave a ragged tile."""
    qt = quantize(_weight(40, 1024), NVFP4Config())
    prepared = prepare_fp4_weight(qt)
    prepared.gemv = gemv_layout(qt, lanes=2)
    x = torch.randn(1, 1024, device=DEVICE, dtype=torch.bfloat16)
    want = _launch_gemv(x, prepared, None, config=GemvConfig(block_n=16, split_k=cfg.split_k))
    got = _launch_gemv(x, prepared, None, config=cfg)
    assert torch.equal(got, want)
    max_err, rms_err = _errors(got, x, qt, None)
    assert max_err <= TOL[torch.bfloat16][0] and rms_err <= TOL[torch.bfloat16][1], (max_err, rms_err)


@needs_kernels
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("m,programs", [(1, 1), (3, 2), (4, 64)], ids=["m1_one_program", "m3_two", "m4_grid"])
def test_gemv_persistent_equals_split_kernel(name, m, programs):
    """The persistent kernel (programs take items p, p + P, ... and prefetch the next item's chunk) computes
    the split kernel's partials and reduces them in the same order: bit-identical, run twice (the tickets
    are reset). 40 rows leave a ragged tile (3 tiles x 4 or 8 chunks); in the interpreter (one "SM")
    one program walks every item, two programs interleave them, 64 are capped at the item count."""
    K = 2048 if name == "mxfp4" else 1024
    qt = quantize(_weight(40, K), CONFIGS[name])
    prepared = prepare_fp4_weight(qt)
    prepared.gemv = gemv_layout(qt, lanes=2)  # 4 (NVFP4) / 8 (MXFP4) chunks
    chunks = (K // 8) // 32
    x = torch.randn(m, K, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(40, device=DEVICE, dtype=torch.bfloat16)
    want = _launch_gemv(x, prepared, bias, config=GemvConfig(block_n=16, split_k=chunks))
    cfg = GemvConfig(block_n=16, split_k=chunks, persistent=programs if INTERPRETING else 1)
    got = _launch_gemv(x, prepared, bias, config=cfg)
    assert torch.equal(got, want)
    assert torch.equal(_launch_gemv(x, prepared, bias, config=cfg), _launch_gemv(x, prepared, bias, config=cfg))


@needs_kernels
def test_gemv_split_must_divide_chunks():
    qt = quantize(_weight(16, 256), NVFP4Config())
    prepared = prepare_fp4_weight(qt)
    with pytest.raises(ValueError, match="must divide"):
        _launch_gemv(torch.randn(1, 256, device=DEVICE, dtype=torch.bfloat16), prepared, None,
                     config=GemvConfig(block_n=16, split_k=2))


@needs_kernels
def test_gemv_path_rejects_what_it_cannot_run():
    qt = quantize(_weight(16, 160), NVFP4Config())
    with pytest.raises(ValueError, match="path=GEMV"):
        fp4_matmul(torch.randn(1, 160, device=DEVICE, dtype=torch.bfloat16), qt, path=DecodePath.GEMV)
    qt = quantize(_weight(16, 256), NVFP4Config())
    with pytest.raises(ValueError, match="path=GEMV"):
        fp4_matmul(torch.randn(5, 256, device=DEVICE, dtype=torch.bfloat16), qt, path=DecodePath.GEMV)


@needs_kernels
@pytest.mark.parametrize("name,m,want_gemv", [("nvfp4", 1, True), ("nvfp4", 2, True), ("nvfp4", 3, False),
                                              ("mxfp4", 1, True), ("mxfp4", 2, True),
                                              ("mxfp4", 3, False)])
def test_auto_path_takes_gemv_where_it_won(name, m, want_gemv):
    """The default rule (GEMV_AUTO_MAX_M): GEMV at M = 1 and 2 (both formats), bit-identical
    to asking for it, except where the warp-specialised kernel beat it on an H100 (`fp4_ws.ws_beats_gemv`:
    NVFP4 at 2 rows on any shape); otherwise the warp-specialised kernel where it can run (an H100) or the
    skinny kernel, and no GEMV whenever K does not line up (K = 160)."""
    from fp4kit.kernels.fp4_gemm import _prepared_for
    from fp4kit.kernels.fp4_ws import ws_beats_gemv, ws_supported

    qt = quantize(_weight(16, 256), CONFIGS[name])
    x = torch.randn(m, 256, device=DEVICE, dtype=torch.bfloat16)
    want_gemv = want_gemv and not (ws_beats_gemv(m, 16, 256, qt.config.block_size) and ws_supported(x, qt, min_m=1))
    y = fp4_matmul(x, qt)
    assert (_prepared_for(qt).gemv is not None) == want_gemv

    other = DecodePath.WS if ws_supported(x, qt, min_m=1) else DecodePath.SKINNY  # the WS kernel, where it can run
    want = fp4_matmul(x, qt, path=DecodePath.GEMV if want_gemv else other)
    assert torch.equal(y, want)
    odd = quantize(_weight(16, 160), CONFIGS[name])
    fp4_matmul(x[:, :160].contiguous(), odd)
    assert _prepared_for(odd).gemv is None


@needs_kernels
def test_gemv_layout_rebuilt_after_in_place_update():
    """An in-place change of the packed codes re-prepares the weight, so the GEMV reads a fresh layout."""
    qt = quantize(_weight(16, 256), NVFP4Config())
    x = torch.randn(1, 256, device=DEVICE, dtype=torch.bfloat16)
    fp4_matmul(x, qt, path=DecodePath.GEMV)
    qt.data.copy_(torch.flip(qt.data, dims=[0]))  # rows reversed, in place
    max_err, rms_err = _errors(fp4_matmul(x, qt, path=DecodePath.GEMV), x, qt, None)
    assert max_err <= TOL[torch.bfloat16][0] and rms_err <= TOL[torch.bfloat16][1], (max_err, rms_err)


def test_gemv_config_validates():
    with pytest.raises(ValueError, match="power of two"):
        GemvConfig(block_n=24)
    with pytest.raises(ValueError, match="stages"):
        GemvConfig(block_n=16, stages=0)
    with pytest.raises(ValueError, match="cache"):
        GemvConfig(block_n=16, cache=".cs")
    with pytest.raises(ValueError, match="eviction policy together"):
        GemvConfig(block_n=16, cache=".cg", evict="evict_first")
    with pytest.raises(ValueError, match="persistent"):
        GemvConfig(block_n=16, persistent=2, prefetch=True)


# ----------------------------------------------------------------------------------------------
# GPU only: real shapes, default launch rule, graph capture


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Llama-sized shapes and CUDA graphs need the GPU")
@pytest.mark.parametrize("N,K", [(6144, 4096), (4096, 14336)])
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_gemv_gpu_llama_shapes(name, N, K):
    qt = quantize(torch.randn(N, K, device="cuda") * 0.02, CONFIGS[name])
    for m in (1, 2, 4):
        x = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        max_err, rms_err = _errors(fp4_matmul(x, qt, path=DecodePath.GEMV), x, qt, None)
        assert max_err <= TOL[torch.bfloat16][0] and rms_err <= TOL[torch.bfloat16][1], (m, max_err, rms_err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need the GPU")
def test_gemv_gpu_cuda_graph_replay():
    qt = quantize(torch.randn(4096, 4096, device="cuda") * 0.02, NVFP4Config())
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = fp4_matmul(x, qt, path=DecodePath.GEMV)  # builds the layout and compiles
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fp4_matmul(x, qt, path=DecodePath.GEMV)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)


def _gemv_chain(x, weights, n_rep):
    """x through the weights n_rep times (each output the next input): consecutive launches share the
    split-K workspace and tickets of the stream, the case PDL must keep ordered."""
    for _ in range(n_rep):
        for qt in weights:
            x = fp4_matmul(x, qt, path=DecodePath.GEMV)
    return x


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs a Hopper (sm_90+) GPU")
def test_gemv_gpu_pdl_chain_in_a_graph_equals_serial():
    from fp4kit.kernels import fp4_gemm

    K = 4096
    weights = [quantize(torch.randn(K, K, device="cuda") / K**0.5, NVFP4Config()) for _ in range(3)]
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    old = fp4_gemm.PDL
    try:
        fp4_gemm.PDL = False
        serial = _gemv_chain(x, weights, 4)  # eager, no PDL: the reference
        outs = {}
        for pdl in (False, True):
            fp4_gemm.PDL = pdl
            _gemv_chain(x, weights, 4)  # compiles this variant outside the capture
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y = _gemv_chain(x, weights, 4)
            reps = []
            for _ in range(10):
                y.fill_(float("nan"))
                g.replay()
                reps.append(y.clone())
            torch.cuda.synchronize()
            outs[pdl] = reps
        launches = [c for w in weights for c in fp4_gemm._prepared_for(w).launches.values()]
        assert any(c.metadata.launch_pdl for c in launches) and any(not c.metadata.launch_pdl for c in launches)
    finally:
        fp4_gemm.PDL = old
    for pdl, reps in outs.items():
        for r in reps:
            assert torch.equal(r, serial), pdl
