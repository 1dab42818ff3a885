"""Index-score top-k and rerank kernels against their torch twins (interpreter on CPU, real on CUDA)."""

import pytest
import torch

from fp4kit.formats import MXFP4Config, NVFP4Config, ScaleRule, quantize_mxfp4, quantize_nvfp4
from fp4kit.kernels.fp4_topk import (KeyCacheView, KeyFormat, index_keys, index_scores_torch, index_topk,
                                     index_topk_torch, order_key64, rerank_topk, rerank_topk_torch, topk_order_torch)

MX = MXFP4Config(ScaleRule.RCEIL)


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


@pytest.mark.parametrize("L,D", [(37, 64), (100, 128)])
def test_mxfp4_scores_bit_exact_with_twin(L, D):
    k = torch.randn(3, L, D)
    q = mx_query(torch.randn(3, D))
    keys = mx_keys(k)
    got = index_keys(q, keys)[:, :L]
    want = index_scores_torch(q, keys)
    m = (got >> 16).to(torch.int16)  # back from monotone int16 to bf16 bits
    bits = torch.where(m < 0, m ^ 0x7FFF, m).view(torch.bfloat16)
    assert torch.equal(bits.float(), torch.where(want == 0, 0.0, want.float()))
    pos = 0xFFFF - (got & 0xFFFF)
    assert torch.equal(pos, torch.arange(L).expand(3, -1).int())


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
    k = torch.randn(1, 1, 64).expand(2, 50, 64).contiguous()
    q = mx_query(torch.randn(2, 64))
    got = index_topk(q, mx_keys(k), 6, lo=3)
    assert got.tolist() == [[3, 4, 5, 6, 7, 8]] * 2


@pytest.mark.parametrize("fmt", [KeyFormat.BF16, KeyFormat.FP8, KeyFormat.NVFP4])
def test_other_formats_scores_match_twin(fmt):
    # these round inside the float32 sum: equal up to summation order (1 bf16 ulp at most, rarely)
    k = torch.randn(2, 80, 64)
    q = torch.randn(2, 64)
    keys = keys_of(fmt, k)
    got = index_keys(q, keys)[:, :80]
    m = (got >> 16).to(torch.int16)
    s = torch.where(m < 0, m ^ 0x7FFF, m).view(torch.bfloat16).float()
    want = index_scores_torch(q, keys).float()
    ulp = want.abs().clamp(min=1e-30) * 2**-7
    assert bool(((s - want).abs() <= ulp).all())
    assert (s == want).float().mean() > 0.95


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
    cand = torch.stack([torch.randperm(60)[:24] for _ in range(2)])
    cand[1, -3:] = -1  # padding
    got = rerank_topk(q, keys, cand, 8)
    want = rerank_topk_torch(q, keys, cand, 8)
    assert torch.equal(got, want)
    exact = (keys.float() @ q.unsqueeze(-1)).squeeze(-1)  # [R, L]
    for r in range(2):
        c = cand[r][cand[r] >= 0]
        ref = c[topk_order_torch(exact[r, c], 8)]
        s_ref = exact[r, ref]
        assert torch.equal(exact[r, got[r]], s_ref)  # same scores; ties by lower position
        order = sorted(c.tolist(), key=lambda t: (-exact[r, t].item(), t))[:8]
        assert got[r].tolist() == order


def test_chunked_merge_matches_twin(monkeypatch):
    import fp4kit.kernels.fp4_topk as m

    monkeypatch.setattr(m, "CHUNK", 32)  # force the multi-chunk merge on a small cache
    # with 32-position chunks the low 16 bits still hold 0xFFFF - (t mod 65536): emulate by keys from torch
    k = torch.randn(2, 100, 64)
    q = mx_query(torch.randn(2, 64))
    keys = mx_keys(k)
    keys32 = index_keys(q, keys)
    # rebuild keys with the chunk-local position the merge expects
    t = torch.arange(keys32.shape[1])
    keys32 = (keys32 & ~0xFFFF) | (0xFFFF - (t % 32)).int()
    keys32[:, 100:] = -(2**31)
    got = m._chunk_topk(keys32, 0, 12)
    assert torch.equal(got, index_topk_torch(q, keys, 12))


def test_bad_query_shape_names_it():
    keys = mx_keys(torch.randn(2, 10, 64))
    with pytest.raises(ValueError, match=r"\[R=2, D=64\]"):
        index_topk(torch.randn(3, 64), keys, 4)
