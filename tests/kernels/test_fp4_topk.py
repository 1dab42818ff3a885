"""Index-score top-k and rerank kernels against their torch twins (interpreter on CPU, real on CUDA)."""

import pytest
import torch

from fp4kit.formats import MXFP4Config, NVFP4Config, ScaleRule, quantize_mxfp4, quantize_nvfp4
from fp4kit.kernels.fp4_topk import (KeyCacheView, KeyFormat, bits_to_bf16, index_score_bits, index_scores_torch,
                                     index_topk, index_topk_torch, order_key64, rerank_topk, rerank_topk_torch,
                                     topk_order_torch)

MX = MXFP4Config(ScaleRule.RCEIL)


@pytest.fixture(autouse=True)
def _on_the_gpu_when_present():
    """On a CUDA machine every tensor in these tests is created on the GPU, so the kernels run (on a CPU
    machine the interpreter runs them); the launchers leave CPU tensors to the twins."""
    if not torch.cuda.is_available():
        yield
        return
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        # None, not "cpu": a "cpu" default stays an active device mode, and a later test's
        # `torch.arange(..., out=cuda_tensor)` without device= then fails (seen on the H100 in the engine tests)
        torch.set_default_device(None)


def mx_keys(k):  # k: [R, L, D] float -> KeyCacheView (MXFP4)
    qt = quantize_mxfp4(k, MX)
    return KeyCacheView(KeyFormat.MXFP4, qt.data, qt.scale, fp4_config=MX)


def mx_query(q):  # FP4-dequantized float32 query, as the indexer feeds it
    return quantize_mxfp4(q, MX).dequantize()


def keys_of(fmt, k):
    if fmt is KeyFormat.MXFP4:
        return mx_keys(k)
    if fmt is KeyFormat.NVFP4:
        cfg = NVFP4Config()
        qt = quantize_nvfp4(k, cfg)
        return KeyCacheView(fmt, qt.data, qt.scale.view(torch.uint8), qt.global_scale, cfg)
    if fmt is KeyFormat.FP8:
        scale = k.abs().amax(-1) / 448
        return KeyCacheView(fmt, (k / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale)
    return KeyCacheView(fmt, k.bfloat16())


def test_order_ties_go_to_the_lower_position():
    s = torch.tensor([[1.0, 3.0, 3.0, -0.0, 0.0, 3.0, float("-inf")]])
    assert topk_order_torch(s, 6).tolist() == [[1, 2, 5, 0, 3, 4]]
    key = order_key64(s, torch.arange(7).unsqueeze(0))
    assert torch.argsort(key, descending=True)[0, :6].tolist() == [1, 2, 5, 0, 3, 4]


@pytest.mark.parametrize("L,D,tensor_cores", [(37, 64, True), (100, 128, True), (37, 64, False)])
def test_mxfp4_scores_bit_exact_with_twin(L, D, tensor_cores, monkeypatch):
    import fp4kit.kernels.fp4_topk as m

    monkeypatch.setattr(m, "MXFP4_TENSOR_CORES", tensor_cores)
    k = torch.randn(3, L, D)
    q = mx_query(torch.randn(3, D))
    keys = mx_keys(k)
    hist = torch.zeros(3, 512, dtype=torch.int32)
    got = index_score_bits(q, keys, hist=hist)
    want = index_scores_torch(q, keys)
    assert torch.equal(bits_to_bf16(got[:, :L]).float(), torch.where(want == 0, 0.0, want.float()))
    assert bool((got[:, L:] == -32768).all())  # padding past L
    # the scan's high-byte histogram counts every valid position once
    u = got[:, :L].int() + 32768
    assert torch.equal(hist[:, :256], torch.stack([torch.bincount(r >> 8, minlength=256) for r in u]).int())


@pytest.mark.parametrize("lo,hi,n", [(0, None, 8), (4, 90, 20), (10, 13, 8)])
def test_mxfp4_topk_equals_twin(lo, hi, n):
    k = torch.randn(2, 97, 64)
    q = mx_query(torch.randn(2, 64))
    keys = mx_keys(k)
    got = index_topk(q, keys, n, lo=lo, hi=hi)
    want = index_topk_torch(q, keys, n, lo=lo, hi=hi)
    assert torch.equal(got, want)
    hi = 97 if hi is None else hi
    assert got.shape == (2, min(n, hi - lo)) and bool(((got >= lo) & (got < hi)).all())


def test_topk_ties_deterministic_in_kernel():
    # every key identical: all scores tie, so the lowest positions in [lo, hi) must win, in order
    # rows with q and -q: the tied score is positive in one row and negative in the other
    k = torch.randn(1, 1, 64).expand(2, 50, 64).contiguous()
    qv = torch.randn(1, 64)
    q = mx_query(torch.cat([qv, -qv]))
    got = index_topk(q, mx_keys(k), 6, lo=3)
    assert got.tolist() == [[3, 4, 5, 6, 7, 8]] * 2


@pytest.mark.parametrize("method", ["RADIX", "THRESHOLD"])
def test_topk_many_ties_at_the_threshold(method, monkeypatch):
    # keys from a set of 3 vectors: scores take 3 values, so the n-th best sits in a large tie
    import fp4kit.kernels.fp4_topk as m

    monkeypatch.setattr(m, "SELECT_METHOD", m.SelectMethod[method])
    base = torch.randn(3, 64)
    k = base[torch.randint(0, 3, (2, 150))]
    q = mx_query(torch.randn(2, 64))
    keys = mx_keys(k)
    for n in (1, 77):
        assert torch.equal(index_topk(q, keys, n, lo=1), index_topk_torch(q, keys, n, lo=1))


@pytest.mark.parametrize("fmt", [KeyFormat.BF16, KeyFormat.FP8, KeyFormat.NVFP4])
def test_other_formats_scores_match_twin(fmt):
    # these round inside the float32 sum: equal up to summation order (1 bf16 ulp at most, rarely)
    k = torch.randn(2, 80, 64)
    q = torch.randn(2, 64)
    keys = keys_of(fmt, k)
    s = bits_to_bf16(index_score_bits(q, keys)[:, :80]).float()
    want = index_scores_torch(q, keys).float()
    # 1 bf16 ulp of the score, plus the float32 summation-order error bound (cancellation near 0)
    tol = want.abs() * 2**-7 + torch.einsum("rd,rld->rl", q.abs(), keys.dequantize().abs()) * 2**-16
    assert bool(((s - want).abs() <= tol).all())
    assert (s == want).float().mean() > 0.95


def test_mxfp4_tensor_core_path_with_a_float32_query(monkeypatch):
    import fp4kit.kernels.fp4_topk as m

    monkeypatch.setattr(m, "MXFP4_TENSOR_CORES", True)
    # q split into three bf16 parts keeps 24 bits: scores within 1 bf16 ulp + float32 sum error of the twin
    k = torch.randn(2, 70, 64)
    q = torch.randn(2, 64)
    keys = mx_keys(k)
    s = bits_to_bf16(index_score_bits(q, keys)[:, :70]).float()
    want = index_scores_torch(q, keys).float()
    tol = want.abs() * 2**-7 + torch.einsum("rd,rld->rl", q.abs(), keys.dequantize().abs()) * 2**-16
    assert bool(((s - want).abs() <= tol).all())


@pytest.mark.parametrize("fused", [True, False])
def test_every_histogram_place_and_select_path_selects_the_same(fused, monkeypatch):
    import fp4kit.kernels.fp4_topk as m

    k = torch.randn(2, 150, 64)
    q = mx_query(torch.randn(2, 64))
    keys = mx_keys(k)
    want = index_topk_torch(q, keys, 30, lo=2)
    monkeypatch.setattr(m, "SELECT_METHOD", m.SelectMethod.RADIX)
    monkeypatch.setattr(m, "FUSED_SELECT", fused)
    for persistent in (False, True):  # the tiled scan adds a histogram per tile, the persistent one per program
        monkeypatch.setitem(m.SCAN_PERSISTENT, "mxfp4", persistent)
        for place in m.CoarseHist:
            monkeypatch.setattr(m, "COARSE_HIST", place)
            assert torch.equal(index_topk(q, keys, 30, lo=2), want), (place, persistent)


def test_strided_cache_slice_reads_in_place():
    cap = torch.randn(2, 64, 64)  # capacity 64, live length 40
    full = mx_keys(cap)
    view = KeyCacheView(KeyFormat.MXFP4, full.data[:, :40], full.scale[:, :40], fp4_config=MX)
    q = mx_query(torch.randn(2, 64))
    assert torch.equal(index_topk(q, view, 10), index_topk_torch(q, mx_keys(cap[:, :40].contiguous()), 10))


def test_rerank_equals_twin_with_exact_sums():
    # small integers: every float32 sum is exact, so kernel and twin order identically (ties included)
    keys = torch.randint(-3, 4, (2, 60, 64)).bfloat16()
    q = torch.randint(-2, 3, (2, 64)).float()
    cand = torch.stack([torch.randperm(60)[:24].sort().values for _ in range(2)])
    cand[1, -3:] = -1  # padding
    got = rerank_topk(q, keys, cand, 8)
    want = rerank_topk_torch(q, keys, cand, 8)
    assert torch.equal(got, want)
    exact = (keys.float() @ q.unsqueeze(-1)).squeeze(-1)  # [R, L]
    for r in range(2):
        c = cand[r][cand[r] >= 0]
        best = sorted(c.tolist(), key=lambda t: (-exact[r, t].item(), t))[:8]  # ties by lower position
        assert got[r].tolist() == sorted(best)


def test_radix_select_beyond_one_tile_and_odd_lengths():
    # several select tiles (64 positions each in the interpreter) and a cache length that is no multiple
    k = torch.randn(2, 201, 64)
    q = mx_query(torch.randn(2, 64))
    keys = mx_keys(k)
    for n, lo, hi in ((1, 0, None), (150, 7, 190)):
        assert torch.equal(index_topk(q, keys, n, lo=lo, hi=hi), index_topk_torch(q, keys, n, lo=lo, hi=hi))


@pytest.mark.parametrize("fused,byte_radix", [(False, False), (True, True)])
def test_rerank_select_with_ties_and_fp32_keys(fused, byte_radix, monkeypatch):
    import fp4kit.kernels.fp4_topk as m

    monkeypatch.setattr(m, "FUSED_RERANK", fused)
    monkeypatch.setattr(m, "RERANK_BYTE_RADIX", byte_radix)
    keys = torch.randint(-1, 2, (3, 200, 32)).bfloat16()  # many exact ties
    q = torch.randint(-1, 2, (3, 32)).float()
    cand = torch.stack([torch.randperm(200)[:130].sort().values for _ in range(3)])
    for k in (1, 17, 64, 130):
        assert torch.equal(rerank_topk(q, keys, cand, k), rerank_topk_torch(q, keys, cand, k))


def test_bad_query_shape_names_it():
    keys = mx_keys(torch.randn(2, 10, 64))
    with pytest.raises(ValueError, match=r"\[R=2, D=64\]"):
        index_topk(torch.randn(3, 64), keys, 4)


# ----------------------------------------------------------------------------------------------
# the MXFP4 word scan: integer (dp4a) or packed-half2 products for MXFP4 queries, float32 products otherwise

PRODUCT_PATHS = {"dp4a": (True, False), "half2": (False, True), "f32": (False, False)}


def _product_path(m, monkeypatch, path):
    dp4a, half2 = PRODUCT_PATHS[path]
    monkeypatch.setattr(m, "MXFP4_DP4A", dp4a)
    monkeypatch.setattr(m, "MXFP4_PACKED_HALF", half2)


@pytest.mark.parametrize("path", list(PRODUCT_PATHS))
def test_mxfp4_word_scan_bit_exact_with_block_scales_apart(path, monkeypatch):
    import fp4kit.kernels.fp4_topk as m

    _product_path(m, monkeypatch, path)
    # query blocks 2^-6 .. 2^3 apart, keys with per-block magnitudes apart too: still exact (< 10 binades)
    q = mx_query(torch.randn(2, 128) * torch.tensor([2.0**-6, 1.0, 8.0, 0.25]).repeat_interleave(32))
    k = torch.randn(2, 40, 128) * torch.tensor([1.0, 4.0, 0.125, 2.0]).repeat_interleave(32)
    keys = mx_keys(k)
    want = index_scores_torch(q, keys).float()
    got = bits_to_bf16(index_score_bits(q, keys)[:, :40]).float()
    assert torch.equal(got, torch.where(want == 0, 0.0, want))


@pytest.mark.parametrize("path", list(PRODUCT_PATHS))
def test_mxfp4_word_scan_with_a_non_fp4_query_takes_the_float32_path(path, monkeypatch):
    # q1 = q0 (1 + 2^-12) is off the FP4 grid (and below float16's precision): against the key (1, -1, 0, ...)
    # the score is q0 - q1 = -q0 2^-12 in float32, while packed-half products would give 0. The per-program
    # check must send this query to the float32 path (and so must dp4a's: q1 * 2^(1 - e) is no integer).
    import fp4kit.kernels.fp4_topk as m

    _product_path(m, monkeypatch, path)
    q = mx_query(torch.randn(2, 64))
    q[:, 0] = 2.0
    q[:, 1] = 2.0 * (1 + 2**-12)
    k = torch.zeros(2, 10, 64)
    k[:, 4, 0], k[:, 4, 1] = 1.0, -1.0
    keys = mx_keys(k)
    got = bits_to_bf16(index_score_bits(q, keys)[:, :10]).float()
    want = index_scores_torch(q, keys).float()
    assert want[0, 4].item() == -(2**-11)
    assert torch.equal(got, torch.where(want == 0, 0.0, want))


def test_mxfp4_word_scan_zero_query_block_and_zero_keys():
    q = mx_query(torch.randn(1, 64))
    q[:, 32:] = 0  # an all-zero block (its exponent is taken as 0)
    k = torch.randn(1, 20, 64)
    k[:, 3] = 0
    keys = mx_keys(k)
    want = index_scores_torch(q, keys).float()
    assert torch.equal(bits_to_bf16(index_score_bits(q, keys)[:, :20]).float(), torch.where(want == 0, 0.0, want))


@pytest.mark.parametrize("fused,method", [(True, "RADIX"), (False, "RADIX"), (True, "THRESHOLD")])
def test_fused_kernels_leave_their_workspaces_zero(fused, method, monkeypatch):
    # the fused select, the threshold select and the fused rerank keep per-stream workspaces that they must
    # leave zero: run each twice on different data, compare with the twins, then look at the buffers
    import fp4kit.kernels.fp4_topk as m

    monkeypatch.setattr(m, "SELECT_METHOD", m.SelectMethod[method])
    monkeypatch.setattr(m, "FUSED_SELECT", fused)
    monkeypatch.setattr(m, "FUSED_RERANK", fused)
    for seed in (0, 1):
        torch.manual_seed(seed)
        keys_f = torch.randn(2, 140, 64)
        q = mx_query(torch.randn(2, 64))
        keys = mx_keys(keys_f)
        cand = index_topk(q, keys, 40, lo=1)
        assert torch.equal(cand, index_topk_torch(q, keys, 40, lo=1))
        assert torch.equal(rerank_topk(q, keys_f.bfloat16(), cand, 9),
                           rerank_topk_torch(q, keys_f.bfloat16(), cand, 9))
        # FP8 keys: the coarse histogram in the scan (`COARSE_HIST_FORMAT`) selects what the select's own does
        fp8, per_format = keys_of(KeyFormat.FP8, keys_f), m.COARSE_HIST_FORMAT
        assert m._coarse_place(fp8) is m.CoarseHist.SCAN
        in_scan = index_topk(keys_f[:, 0], fp8, 40, lo=1)
        monkeypatch.setattr(m, "COARSE_HIST_FORMAT", {})
        assert torch.equal(in_scan, index_topk(keys_f[:, 0], fp8, 40, lo=1))
        monkeypatch.setattr(m, "COARSE_HIST_FORMAT", per_format)
    for buf in m._STREAM_BUFFERS.values():
        assert int(buf.abs().sum()) == 0


# ----------------------------------------------------------------------------------------------
# the threshold select: group maxima -> lower bound T -> compaction -> exact select (every tier)


def _candidates_twin(m: torch.Tensor, n: int, group: int) -> torch.Tensor:
    """#(u >= max(T, 1)) per row, T = the n-th largest maximum of `group` consecutive u = m + 32768."""
    u = m.int() + 32768
    t = u.view(u.shape[0], -1, group).amax(-1).sort(-1, descending=True).values[:, n - 1]
    return (u >= t.clamp(min=1).unsqueeze(-1)).sum(-1)


def _monotone_keys(R, L, D=64):
    """Keys whose scores rise with position (clustered at the end: many groups pass T)."""
    v = torch.randn(D)
    q = mx_query(v.expand(R, D).contiguous())
    k = torch.linspace(0.1, 4.0, L).view(1, L, 1) * v.view(1, 1, D) + 0.01 * torch.randn(R, L, D)
    return q, mx_keys(k)


@pytest.mark.parametrize("step", [4, 1])
@pytest.mark.parametrize("L,n,tier", [(200, 8, "overflow"), (250, 20, "chunked"), (97, 8, "registers")])
def test_threshold_select_every_tier_equals_twin(L, n, tier, step, monkeypatch):
    import fp4kit.kernels.fp4_topk as m

    monkeypatch.setattr(m, "SELECT_METHOD", m.SelectMethod.THRESHOLD)
    monkeypatch.setattr(m, "THRESH_SEARCH_STEP", step)
    q, keys = _monotone_keys(2, L) if tier != "registers" else (mx_query(torch.randn(2, 64)),
                                                                 mx_keys(torch.randn(2, L, 64)))
    if not torch.cuda.is_available():  # the interpreter's sizes: buffer next_pow2(4n), first 64 in registers
        bits = index_score_bits(q, keys)
        block_t, _, _, n_out = m._scan_tile(keys)
        c = _candidates_twin(bits, n, m._group_size(n, n_out, block_t))
        cap = 1 << (4 * n - 1).bit_length()
        want_tier = ["registers" if x <= min(cap, 64) else "chunked" if x <= cap else "overflow" for x in c.tolist()]
        assert want_tier == [tier] * 2, (c, want_tier)
    assert torch.equal(index_topk(q, keys, n, lo=1), index_topk_torch(q, keys, n, lo=1))


@pytest.mark.parametrize("step", [4, 1])
@pytest.mark.parametrize("L,n,lo", [(50, 6, 3), (300, 20, 0)])
def test_threshold_select_at_gpu_block_sizes_with_all_ties(L, n, lo, step, monkeypatch):
    # every score equal (identical keys), the GPU's compaction block and chunk sizes in the interpreter too
    import fp4kit.kernels.fp4_topk as m

    monkeypatch.setattr(m, "SELECT_METHOD", m.SelectMethod.THRESHOLD)
    monkeypatch.setattr(m, "THRESH_SEARCH_STEP", step)
    monkeypatch.setattr(m, "INTERPRETER_GPU_SIZES", True)
    # rows with q and -q: one row's tied score is negative (the H100 failure was on such rows only)
    k = torch.randn(1, 1, 64).expand(2, L, 64).contiguous()
    qv = torch.randn(1, 64)
    q, keys = mx_query(torch.cat([qv, -qv])), mx_keys(k)
    assert index_topk(q, keys, n, lo=lo).tolist() == [list(range(lo, lo + n))] * 2


def test_threshold_select_lower_bound_holds_with_few_valid_groups(monkeypatch):
    # a window narrower than n groups: T is 0 (fewer than n groups hold a valid score), every valid position is
    # a candidate, and positions outside [lo, hi) are never written
    import fp4kit.kernels.fp4_topk as m

    monkeypatch.setattr(m, "SELECT_METHOD", m.SelectMethod.THRESHOLD)
    q, keys = mx_query(torch.randn(2, 64)), mx_keys(torch.randn(2, 200, 64))
    for lo, hi, n in ((100, 120, 15), (5, 200, 40), (190, 200, 10)):
        assert torch.equal(index_topk(q, keys, n, lo=lo, hi=hi), index_topk_torch(q, keys, n, lo=lo, hi=hi))


@pytest.mark.parametrize("fmt", [KeyFormat.FP8, KeyFormat.BF16])
def test_threshold_select_exact_on_the_kernels_own_scores(fmt, monkeypatch):
    # bf16 / FP8 scores may differ from the twin's by summation order: the selection must still be exactly the
    # top-n of the scores the scan wrote (ties to the lower position)
    import fp4kit.kernels.fp4_topk as m

    monkeypatch.setattr(m, "SELECT_METHOD", m.SelectMethod.THRESHOLD)
    q, keys = torch.randn(2, 64), keys_of(fmt, torch.randn(2, 180, 64))
    s = bits_to_bf16(index_score_bits(q, keys)[:, 3:170]).float()
    want = (topk_order_torch(s, 33) + 3).sort(-1).values
    assert torch.equal(index_topk(q, keys, 33, lo=3, hi=170), want)


def test_scan_group_maxima_equal_torch():
    # the scan's group maxima (both the whole-tile max and the reshaped groups) against torch on its own scores
    import fp4kit.kernels.fp4_topk as m

    q, keys = mx_query(torch.randn(2, 64)), mx_keys(torch.randn(2, 90, 64))
    block_t, warps, iters, n_out = m._scan_tile(keys)
    for group in (block_t, 4, 1):
        mx = torch.zeros(2, n_out // group, dtype=torch.int16)
        ws = torch.zeros(2, 8, dtype=torch.int32)
        bits = m._scan(q, keys, 2, 85, ws, n_out, block_t, warps, iters, False, mx, group)
        assert torch.equal(mx, bits.view(2, -1, group).amax(-1)), group


@pytest.mark.parametrize("digits", [True, False])
def test_rerank_digit_search_equals_bitwise_and_twin(digits, monkeypatch):
    import fp4kit.kernels.fp4_topk as m

    monkeypatch.setattr(m, "RERANK_DIGITS", digits)
    monkeypatch.setattr(m, "FUSED_RERANK", False)
    keys = torch.randn(3, 300, 32).bfloat16()
    keys[:, ::7] = keys[:, :1]  # exact ties
    q = torch.randn(3, 32)
    q[2] = -q[2]
    cand = torch.stack([torch.randperm(300)[:180].sort().values for _ in range(3)])
    for k in (1, 50, 180):
        assert torch.equal(rerank_topk(q, keys, cand, k), rerank_topk_torch(q, keys, cand, k))


def test_dp4a_scan_every_e2m1_code_and_sign(monkeypatch):
    # keys holding every 4-bit code (both zeros, all magnitudes, both signs) in every nibble slot, against a
    # query with every E2M1 value and mixed block scales: the integer products must equal the twin bit for bit
    import fp4kit.kernels.fp4_topk as m

    _product_path(m, monkeypatch, "dp4a")
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    k = torch.stack([grid.roll(s).repeat(8) for s in range(16)]).view(1, 16, 128) * 2.0
    k = k * torch.tensor([1.0, 0.25, 8.0, 2.0**-5]).repeat_interleave(32)
    q = grid.roll(3).repeat(8).view(1, 128) * torch.tensor([2.0**-3, 1.0, 4.0, 0.5]).repeat_interleave(32)
    q = mx_query(q)
    keys = mx_keys(k)
    want = index_scores_torch(q, keys).float()
    got = bits_to_bf16(index_score_bits(q, keys)[:, :16]).float()
    assert torch.equal(got, torch.where(want == 0, 0.0, want))
    assert torch.equal(index_topk(q, keys, 5), index_topk_torch(q, keys, 5))


@pytest.mark.parametrize("fmt", [KeyFormat.BF16, KeyFormat.FP8, KeyFormat.MXFP4])
@pytest.mark.parametrize("lo,hi", [(0, None), (5, 203)])
def test_persistent_scan_equals_tiled_scan(fmt, lo, hi, monkeypatch):
    """The persistent scan (programs stride over the tiles, the next tile loaded before this one is scored) writes
    the same int16 scores, high-byte histogram and group maxima as the one-program-per-tile scan, bit for bit,
    also past hi and in the padding; its grid has fewer programs than tiles, so the stride is exercised."""
    import fp4kit.kernels.fp4_topk as m

    if not m.HAS_TRITON:
        pytest.skip("needs triton (the interpreter on CPU)")
    L = 70_000 if torch.cuda.is_available() else 250  # more tiles than the grid has programs, on either
    k = torch.randn(2, L, 64)
    q = torch.randn(2, 64)
    q = mx_query(q) if fmt is KeyFormat.MXFP4 else q
    keys = keys_of(fmt, k)
    hi = keys.length if hi is None else hi
    block_t, warps, iters, n_out = m._scan_tile(keys)
    ws = torch.zeros(2, 512, dtype=torch.int32)
    grid = m._persistent_launch(q, keys, lo, hi, ws, torch.empty(2, n_out, dtype=torch.int16), block_t, warps,
                                True)[0]
    assert grid[1] < n_out // block_t  # programs stride over several tiles each
    got = {}
    for persistent in (False, True):
        monkeypatch.setitem(m.SCAN_PERSISTENT, fmt.value, persistent)
        ws = torch.zeros(2, 512, dtype=torch.int32)
        mx = torch.full((2, n_out // 8), 7, dtype=torch.int16)
        scores = m._scan(q, keys, lo, hi, ws, n_out, block_t, warps, iters, True, mx, 8)
        got[persistent] = scores, ws, mx
    for a, b in zip(got[False], got[True]):
        assert torch.equal(a, b)
    scores = got[True][0]
    assert bool((scores[:, :lo] == -32768).all()) and bool((scores[:, hi:] == -32768).all())
    assert int(got[True][1][:, :256].sum()) == 2 * (hi - lo)


# sort=True is the default k-of-n (one sort) and runs every shape; the 32-step search (sort=False, an option) keeps
# the two cases that exercise it most: several tiles with a window, under both coarse-histogram places.
@pytest.mark.parametrize("n,k,lo,hi,place,sort", [(24, 8, 0, None, "FUSED", True), (150, 40, 7, 390, "FUSED", True),
                                                  (300, 300, 0, None, "FUSED", True), (5, 3, 2, 6, "FUSED", True),
                                                  (150, 40, 7, 390, "FUSED", False), (150, 40, 7, 390, "SCAN", False)])
def test_two_stage_in_one_launch_equals_the_two_calls(n, k, lo, hi, place, sort, monkeypatch):
    """`index_topk_rerank` with the rerank inside the fused select (each program scores the candidates it writes,
    the row's last program keeps the k best) returns what index_topk + rerank_topk return, and what the twins
    return: small-integer bf16 keys, so every float32 exact score is exact and has ties; FP4 index keys that tie
    too. Several select tiles per row, a [lo, hi) window, k = n, and fewer positions in the window than n."""
    import fp4kit.kernels.fp4_topk as m
    from fp4kit.kernels.fp4_topk import index_topk_rerank

    torch.manual_seed(3)
    exact_keys = torch.randint(-2, 3, (2, 400, 64)).bfloat16()
    q_exact = torch.randint(-2, 3, (2, 64)).float()
    keys = mx_keys(exact_keys.float() + 0.3 * torch.randn(2, 400, 64))
    q_index = mx_query(q_exact)
    want_twin = rerank_topk_torch(q_exact, exact_keys, index_topk_torch(q_index, keys, n, lo=lo, hi=hi), k)
    monkeypatch.setattr(m, "COARSE_HIST", m.CoarseHist[place])  # the coarse histogram in the select or the scan
    monkeypatch.setattr(m, "RERANK_IN_SELECT_SORT", sort)  # the last program's k-of-n: one sort or the search
    monkeypatch.setattr(m, "RERANK_IN_SELECT", False)
    two_calls = index_topk_rerank(q_index, keys, q_exact, exact_keys, k, n, lo=lo, hi=hi)
    monkeypatch.setattr(m, "RERANK_IN_SELECT", True)

    def no_second_launch(*a, **kw):
        raise AssertionError("the one-launch path fell back to rerank_topk")

    if m.HAS_TRITON:  # the kernels run (interpreter or GPU): the fused path must not fall back
        monkeypatch.setattr(m, "rerank_topk", no_second_launch)
    one_launch = index_topk_rerank(q_index, keys, q_exact, exact_keys, k, n, lo=lo, hi=hi)
    assert torch.equal(two_calls, want_twin)
    assert torch.equal(one_launch, want_twin)
    if m.HAS_TRITON:  # its last programs leave the select's workspace zero for the next launch
        assert int(m._stream_buffer(q_index.device, "select", 2, 1).abs().sum()) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="residency of a compiled binary: needs a GPU")
def test_select_residency_cache_matches_the_binary(monkeypatch):
    """`_resident_for` caches per Triton specialisation: for launches that differ in row count, length, n and
    workspace stride (aligned and not), the cached answer equals what the exact binary's warmup says, and a repeated
    specialisation does not compile or look up the JIT again."""
    import fp4kit.kernels.fp4_topk as m

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for R, n_out, n, w in [(8, 131072, 512, 2200), (1, 4096, 1, 600), (3, 131072, 17, 1033)]:
        scores = torch.zeros(R, n_out, dtype=torch.int16, device=dev)
        ws = torch.zeros(R, w, dtype=torch.int32, device=dev)[:, :w - 7]
        for block, warps in m.FUSED_BLOCKS:
            args, meta, _ = m._fused_args(scores, ws, n, block, warps, True)
            got = m._resident_for(args, meta, dev)
            k = m._fp4_topk.fused_select_kernel.warmup(*args, grid=(1,), PHASE=0, launch_cooperative_grid=True,
                                                       **meta)
            assert got == m._fits_per_sm(k, warps, dev) * sms, (R, n_out, n, block)
    calls = []
    warmup = m._fp4_topk.fused_select_kernel.warmup
    monkeypatch.setattr(m._fp4_topk.fused_select_kernel, "warmup", lambda *a, **kw: calls.append(1) or warmup(*a, **kw))
    args, meta, _ = m._fused_args(scores, ws, n, *m.FUSED_BLOCKS[0], True)
    m._resident_for(args, meta, dev)
    assert calls == []
