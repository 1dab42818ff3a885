"""The swapped-operand skinny kernel (`fp4_mma_matmul`) against the float64 reference and the formats' dequantizer.

Runs on CUDA when present, else in Triton's interpreter on small grids (see conftest.py).
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'fp4kit[test]')")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fp4kit.formats import (
    MXFP4Config,
    NVFP4Config,
    QuantizedTensor,
    ScaleRule,
    quantize,
)
from fp4kit.kernels import fp4_gemm, prepare_fp4_weight
from fp4kit.kernels._fp4_gemm import _tile_ids
from fp4kit.kernels.fp4_gemm import use_triton
from fp4kit.kernels.fp4_mma import (
    MMA_MAX_M,
    MmaConfig,
    _launch_mma,
    fp4_mma_matmul,
    mma_config,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
pytestmark = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                reason="no CUDA and TRITON_INTERPRET != 1: the kernels cannot run here")

CONFIGS = {
    "nvfp4": NVFP4Config(),
    "nvfp4_torchao": NVFP4Config.torchao(),
    "mxfp4_rceil": MXFP4Config(),
    "mxfp4_floor": MXFP4Config(scale_rule=ScaleRule.FLOOR),
}
# The output cast's half ulp with 10% for float32 summation (max), the cast bound (RMS): as test_fp4_gemm.
TOL = {torch.bfloat16: (1.1 * 2**-8, 2**-8), torch.float16: (1.1 * 2**-11, 2**-11)}


def _weight(n, k, scale=0.05):
    """Rows of different magnitudes, so block scales differ along N and K."""
    return torch.randn(n, k, device=DEVICE) * scale * torch.logspace(-2, 2, n, device=DEVICE)[:, None]


def _errors(y, x, qt, bias):
    """(max |y - ref| / max |ref|, ||y - ref|| / ||ref||), ref in float64 on the dtype-rounded weight."""
    ref = x.double() @ qt.dequantize(x.dtype).double().T
    if bias is not None:
        ref = ref + bias.double()
    err = y.double() - ref
    return (err.abs().max() / ref.abs().max()).item(), (err.norm() / ref.norm()).item()


def _assert_close(y, x, qt, bias):
    max_err, rms_err = _errors(y, x, qt, bias)
    tol = TOL[x.dtype]
    assert max_err <= tol[0] and rms_err <= tol[1], (max_err, rms_err)


def _cfg(**kw):
    """A small launch for the interpreter (one warp, no pipelining), the GPU's usual 4 warps otherwise."""
    base = {"block_n": 16, "block_m": 16, "block_k": 32, "num_warps": 4 if GPU else 1, "num_stages": 2 if GPU else 1,
                "evict": "evict_first" if GPU else ""}
    base.update(kw)
    return MmaConfig(**base)


@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("m", [3, 16, 17, 33])
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4_rceil"])
def test_mma_odd_shapes(name, m, has_bias):
    """Default launch; K = 160 leaves a K tail, N = 40 a row tail, M = 17 and 33 a token tail."""
    qt = quantize(_weight(40, 160), CONFIGS[name])
    x = torch.randn(m, 160, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(40, device=DEVICE, dtype=torch.bfloat16) if has_bias else None
    y = fp4_mma_matmul(x, qt, bias)
    assert y.shape == (m, 40) and y.dtype == torch.bfloat16 and not torch.isnan(y).any()
    _assert_close(y, x, qt, bias)


@pytest.mark.parametrize("lut", [True, False], ids=["table_decode", "pair_decode"])
@pytest.mark.parametrize("name", ["nvfp4_torchao", "mxfp4_floor"])
def test_mma_fp16_and_3d_input(name, lut):
    """float16 x (a float16 table; without it MXFP4 takes the float32 decode) and a leading batch shape."""
    qt = quantize(_weight(32, 96), CONFIGS[name])
    x = torch.randn(2, 5, 96, device=DEVICE, dtype=torch.float16)
    y = fp4_mma_matmul(x, qt, config=_cfg(lut=lut))
    assert y.shape == (2, 5, 32) and y.dtype == torch.float16
    _assert_close(y.reshape(10, 32), x.reshape(10, 96), qt, None)


@pytest.mark.parametrize("prefetch", [False, True], ids=["", "prefetch"])
@pytest.mark.parametrize("m,split,block_k,has_bias", [(16, 2, 32, False), (17, 3, 32, True), (5, 4, 64, True)],
                         ids=["even_split2", "uneven_split3_two_m_tiles", "split4_last_split_empty"])
def test_mma_split_k(m, split, block_k, has_bias, prefetch):
    """Split-K with the in-launch ticket reduction: K = 160 split unevenly (block_k = 64, 4 splits: the last
    split has no K), two token tiles, bias added once; called twice: the tickets were reset to zero and the
    result is bit-identical (the reduction runs in split order). With the register prefetch the last step
    of each split must not load past the split (or past the last row)."""
    qt = quantize(_weight(40, 160), NVFP4Config())
    x = torch.randn(m, 160, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(40, device=DEVICE, dtype=torch.bfloat16) if has_bias else None
    prepared = prepare_fp4_weight(qt)
    cfg = _cfg(block_k=block_k, split_k=split, prefetch=prefetch, num_stages=1)
    first = _launch_mma(x, prepared, bias, config=cfg)
    second = _launch_mma(x, prepared, bias, config=cfg)
    assert torch.equal(first, second)
    _assert_close(first, x, qt, bias)


@pytest.mark.parametrize("lut", [True, False], ids=["table_decode", "pair_decode"])
@pytest.mark.parametrize("name", ["nvfp4", "nvfp4_torchao", "mxfp4_rceil"])
def test_mma_weights_bit_exact_through_gemm(name, lut):
    """One-hot rows of x make y[m, n] = W[n, k_m] exactly (one product by 1.0 per output), so the weights the
    MMA multiplied are compared bit for bit with the formats' dequantizer, across three 32-wide K steps and
    two token tiles (M = 48 one-hot rows, in the k order the MXFP4 bfloat16 decode permutes)."""
    N, K = 32, 96
    qt = quantize(_weight(N, K), CONFIGS[name])
    ks = torch.arange(48, device=DEVICE) * 2 % K
    x = torch.zeros(48, K, device=DEVICE, dtype=torch.bfloat16)
    x[torch.arange(48, device=DEVICE), ks] = 1.0
    y = fp4_mma_matmul(x, qt, config=_cfg(block_m=32, lut=lut))
    want = qt.dequantize(torch.bfloat16)[:, ks].T + 0.0  # a sum turns -0 into +0; everything else is exact
    if not GPU:  # the interpreter's dot flushes subnormal outputs: compare those as zero
        tiny = want.abs() < torch.finfo(torch.bfloat16).tiny
        want = torch.where(tiny, torch.zeros_like(want), want)
    assert torch.equal(y.view(torch.int16), want.contiguous().view(torch.int16))


@pytest.mark.parametrize("lut", [True, False], ids=["table_decode", "bf16x2_decode"])
def test_mma_mxfp4_two_multiply_scales_bit_exact(lut):
    """E8M0 codes above 128 (the two-multiply bfloat16 decode without the table; every code's magnitudes
    with it) with x = identity: y = W.T exactly."""
    N, K = 16, 64
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    codes = torch.tensor((2, 3, 127, 129, 200, 240), dtype=torch.uint8)
    scale = codes[torch.randint(0, len(codes), (N, K // 32), generator=gen)]
    qt = QuantizedTensor(data.to(DEVICE), scale.to(DEVICE), None, (N, K), MXFP4Config())
    x = torch.eye(K, device=DEVICE, dtype=torch.bfloat16)[:MMA_MAX_M]
    y = fp4_mma_matmul(x, qt, config=_cfg(block_m=64 if GPU else 16, lut=lut))
    want = qt.dequantize(torch.bfloat16)[:, :MMA_MAX_M].T + 0.0
    if not GPU:
        tiny = want.abs() < torch.finfo(torch.bfloat16).tiny
        want = torch.where(tiny, torch.zeros_like(want), want)
    assert torch.equal(y.view(torch.int16), want.contiguous().view(torch.int16))


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("m_fast", [False, True], ids=["n_fast", "m_fast"])
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4_rceil"])
def test_mma_prefill_grid_order(name, m_fast, split):
    """Beyond MMA_MAX_M rows (prefill): four token tiles (the last one partial) x three weight tiles (the last
    one partial), a K tail, bias. The grid order (token tiles fastest or weight tiles fastest) only changes
    which program runs when: the results are bit-identical, and with a K split the tickets of the 12
    output tiles are distinct in both orders (a clash would mix two tiles' partials)."""
    qt = quantize(_weight(40, 160), CONFIGS[name])
    m = MMA_MAX_M + 1 if GPU else 61  # the interpreter: fewer programs, same four token tiles of 16
    x = torch.randn(m, 160, device=DEVICE, dtype=torch.bfloat16)
    bias = torch.randn(40, device=DEVICE, dtype=torch.bfloat16)
    prepared = prepare_fp4_weight(qt)
    block_m = 32 if GPU else 16
    out = {}
    for f in (True, False):
        _launch_mma(x, prepared, bias, config=_cfg(block_m=block_m, split_k=split, num_stages=1))  # buffers exist
        for ws, _ in fp4_gemm._SPLITK_BUFFERS.values():  # a partial read before it is written shows as NaN
            ws.fill_(float("nan"))
        out[f] = _launch_mma(x, prepared, bias, config=_cfg(block_m=block_m, split_k=split, m_fast=f, num_stages=1))
        assert all(int(cnt.count_nonzero()) == 0 for _, cnt in fp4_gemm._SPLITK_BUFFERS.values())  # tickets reset
    assert torch.equal(out[False], out[True])
    _assert_close(out[m_fast], x, qt, bias)


@triton.jit
def _ids_kernel(out_ptr, M_FAST: tl.constexpr):
    """Writes (tile of N, tile of M, linear tile id) of every program (test_tile_ids_are_a_bijection)."""
    pid_n, pid_m, tile = _tile_ids(M_FAST)
    slot = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(out_ptr + 3 * slot, pid_n)
    tl.store(out_ptr + 3 * slot + 1, pid_m)
    tl.store(out_ptr + 3 * slot + 2, tile)


@pytest.mark.parametrize("m_fast", [False, True], ids=["n_fast", "m_fast"])
def test_tile_ids_are_a_bijection(m_fast):
    """Every program of a (tiles of N) x (tiles of M) grid, in either order, gets its own split-K ticket slot:
    the linear tile ids are exactly 0..tiles-1, and (tile of N, tile of M) covers the grid once."""
    n_tiles, m_tiles = 5, 3
    grid = fp4_gemm._grid(3 * 16, 5 * 16, 16, 16, 1, m_fast)
    assert grid == ((m_tiles, n_tiles, 1) if m_fast else (n_tiles, m_tiles, 1))
    out = torch.full((n_tiles * m_tiles, 3), -1, dtype=torch.int32, device=DEVICE)
    _ids_kernel[grid[:2]](out, M_FAST=m_fast)
    out = out.cpu()
    assert sorted(out[:, 2].tolist()) == list(range(n_tiles * m_tiles))
    assert sorted(map(tuple, out[:, :2].tolist())) == [(n, m) for n in range(n_tiles) for m in range(m_tiles)]


def test_mma_prefill_default_launch():
    """M > MMA_MAX_M through the public entry point: the prefill launch, against the reference."""
    qt = quantize(_weight(48, 128), NVFP4Config())
    x = torch.randn(MMA_MAX_M + 3, 128, device=DEVICE, dtype=torch.bfloat16)
    _assert_close(fp4_mma_matmul(x, qt), x, qt, None)


def test_mma_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        MmaConfig(block_n=48)
    with pytest.raises(ValueError, match="block_m and block_n must be >= 16"):
        MmaConfig(block_m=8)
    with pytest.raises(ValueError, match="num_stages"):
        MmaConfig(num_stages=0)
    with pytest.raises(ValueError, match="evict"):
        MmaConfig(evict="first")


def test_mma_default_config_rule(monkeypatch):
    """Token tiles follow M; the K split reaches MMA_PROGRAMS_PER_SM programs per SM unless a split would keep
    fewer than MMA_MIN_STEPS K steps (the sweep's best splits on the Llama-3-8B shapes)."""
    from fp4kit.kernels import fp4_mma

    monkeypatch.setattr(fp4_mma, "_interpreting", lambda: False)
    assert mma_config(16, 4096, 4096, 16).block_m == 16 and mma_config(33, 4096, 4096, 16).block_m == 64
    splits = {n: mma_config(16, N, K, 16, 132).split_k
              for n, (N, K) in {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
                                "down": (4096, 14336)}.items()}
    assert splits == {"qkv": 8, "o": 8, "gate_up": 4, "down": 16}


def test_prefill_config_rule(monkeypatch):
    """The prefill rule gives the H100 sweep's winners on the Llama-3-8B shapes (BENCHMARKS.md "Prefill GEMM"):
    K split 2 on qkv/o, 4 on down, none on gate_up with 128-row, 8-warp tiles; 128 tokens per tile up to M = 128."""
    from fp4kit.kernels import fp4_mma

    monkeypatch.setattr(fp4_mma, "_interpreting", lambda: False)
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    got = {(n, M): (c.block_n, c.block_m, c.split_k, c.num_warps)
           for n, (N, K) in shapes.items() for M in (128, 256)
           for c in [fp4_mma.prefill_config(M, N, K, 16, 132)]}
    assert got == {("qkv", 128): (64, 128, 2, 4), ("o", 128): (64, 128, 2, 4), ("gate_up", 128): (128, 128, 1, 8),
                   ("down", 128): (64, 128, 4, 4), ("qkv", 256): (64, 256, 2, 4), ("o", 256): (64, 256, 2, 4),
                   ("gate_up", 256): (128, 256, 1, 8), ("down", 256): (64, 256, 4, 4)}
    assert [fp4_mma.prefill_config(M, 4096, 4096, 16).block_m for M in (65, 128, 129, 256)] == [128, 128, 256, 256]
    assert all(fp4_mma.prefill_config(256, 4096, 4096, 16).__dict__[k] == v
               for k, v in {"m_fast": True, "block_k": 64, "num_stages": 3, "pdl": False}.items())


def test_mma_rejects_bad_input():
    qt = quantize(_weight(16, 64), NVFP4Config())
    with pytest.raises(ValueError, match="features"):
        fp4_mma_matmul(torch.randn(4, 32, device=DEVICE, dtype=torch.bfloat16), qt)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        fp4_mma_matmul(torch.randn(4, 64, device=DEVICE), qt)
    with pytest.raises(ValueError, match="M \\(rows of x\\)"):
        fp4_mma_matmul(torch.randn(0, 64, device=DEVICE, dtype=torch.bfloat16), qt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programmatic dependent launch needs a GPU")
def test_mma_pdl_in_a_cuda_graph():
    """PDL launches back to back in a CUDA graph (each reading the previous output) give the eager results."""
    qt = quantize(_weight(4096, 512), NVFP4Config())
    qt2 = quantize(_weight(512, 4096), NVFP4Config())
    cfg = MmaConfig(block_n=64, block_m=16, block_k=128, split_k=2, pdl=True)
    serial = MmaConfig(block_n=64, block_m=16, block_k=128, split_k=2, pdl=False)
    x = torch.randn(16, 512, device=DEVICE, dtype=torch.bfloat16)
    want = fp4_mma_matmul(fp4_mma_matmul(x, qt, config=serial), qt2, config=serial)
    assert torch.equal(fp4_mma_matmul(fp4_mma_matmul(x, qt, config=cfg), qt2, config=cfg), want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = fp4_mma_matmul(fp4_mma_matmul(x, qt, config=cfg), qt2, config=cfg)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["nvfp4", "mxfp4_rceil"])
def test_lut_table_holds_the_twins_weights(name, dtype):
    """Every scale code's eight magnitudes, read back out of the table's byte planes, equal the formats'
    dequantizer on a weight that uses that code (all 256 codes; NaN codes compared as NaN)."""
    from fp4kit.kernels.fp4_mma import lut_table

    cfg = CONFIGS[name]
    bs = cfg.block_size
    qt0 = quantize(_weight(16, 64), cfg)
    data = torch.tensor([0x10, 0x32, 0x54, 0x76], dtype=torch.uint8, device=DEVICE).repeat(256, bs // 8)
    scale = torch.arange(256, dtype=torch.uint8, device=DEVICE)[:, None].view(qt0.scale.dtype)
    qt = QuantizedTensor(data, scale.contiguous(), qt0.global_scale, (256, bs), cfg)  # row c: codes 0..7, scale c
    regs = lut_table(qt, dtype).to(torch.int64) & 0xFFFFFFFF  # [256, 4]
    byte = torch.stack([(regs >> (8 * i)) & 0xFF for i in range(4)], dim=-1)  # [256, reg, byte]
    lo = torch.cat((byte[:, 0], byte[:, 1]), dim=1)  # entry j's low byte
    hi = torch.cat((byte[:, 2], byte[:, 3]), dim=1)
    got = (lo | (hi << 8)).to(torch.int32).to(torch.int16).view(dtype)
    want = qt.dequantize(dtype)[:, :8]
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
