"""The FP4 lightning indexer: rotation, FP4 Q/K against the core codecs, selection rules, decode path."""

import pytest
import torch

from fp4kit.algorithms.rotations import hadamard
from fp4kit.formats import MXFP4Config, NVFP4Config, ScaleRule, quantize_mxfp4, quantize_nvfp4
from fp4kit.nn.indexer import (FP4KeyCache, IndexerConfig, IndexPrecision, IndexScore, exact_scores,
                               hadamard_rotate, index_keys, index_scores, round_index, select_decode,
                               select_from_scores, select_mask)

MX = MXFP4Config(ScaleRule.RCEIL)


def test_rotation_is_the_orthonormal_hadamard_and_keeps_dots():
    x = torch.randn(5, 64)
    assert torch.allclose(hadamard_rotate(x), x @ hadamard(64), atol=1e-6)
    y = torch.randn(7, 64)
    assert torch.allclose(hadamard_rotate(x) @ hadamard_rotate(y).T, x @ y.T, atol=1e-4)


def test_mxfp4_index_keys_bit_exact_with_codec():
    k = torch.randn(2, 3, 9, 64)
    # the full head-dim rotation, uncentered (block rotation and centering: test_centered_cache_round_trip)
    cfg = IndexerConfig(precision=IndexPrecision.MXFP4, center_keys=False, rotate_block=None)
    cache = FP4KeyCache(cfg, 2, 3, 64, capacity=2)  # forces growth
    cache.append(k[:, :, :5])
    for t in range(5, 9):  # then one token at a time, as decoding does
        cache.append(k[:, :, t: t + 1])
    ref = quantize_mxfp4((k.double() @ hadamard(64, torch.float64)).float().reshape(6, 9, 64), MX)
    view = cache.view()
    assert torch.equal(view.data, ref.data) and torch.equal(view.scale, ref.scale)
    assert torch.equal(view.dequantize(), round_index(k, cfg).reshape(6, 9, 64))
    assert cache.nbytes == 6 * 9 * (32 + 2)


def test_nvfp4_index_keys_bit_exact_with_codec():
    k = torch.randn(1, 2, 6, 32)
    cfg = IndexerConfig(precision=IndexPrecision.NVFP4, rotate=False, center_keys=False)
    cache = FP4KeyCache(cfg, 1, 2, 32)
    cache.append(k[:, :, :4])
    cache.append(k[:, :, 4:])  # the prefill's global scale is reused
    first = quantize_nvfp4(k[:, :, :4].reshape(2, 4, 32), NVFP4Config())
    rest = quantize_nvfp4(k[:, :, 4:].reshape(2, 2, 32), NVFP4Config(), global_scale=first.global_scale)
    assert torch.equal(cache.view().data, torch.cat([first.data, rest.data], 1))
    assert torch.equal(cache.view().scale, torch.cat([first.scale, rest.scale], 1).view(torch.uint8))


def test_dot_scores_sum_the_group_and_round_to_bf16():
    q, k = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 5, 64)
    s = index_scores(q, k, IndexerConfig(precision=IndexPrecision.BF16, rotate=False, center_keys=False))
    kb = k.bfloat16().double()
    # the group's queries are summed in float32, then rounded to bf16 like the keys
    qs = q.reshape(1, 2, 2, 3, 64).sum(2).bfloat16().double()
    want = torch.einsum("gqd,gkd->gqk", qs[0], kb[0]).float().bfloat16()
    assert s.dtype == torch.bfloat16 and torch.equal(s[0], want)


def test_relu_form_by_brute_force():
    q, k = torch.randn(1, 4, 3, 32), torch.randn(1, 1, 6, 32)
    w = torch.tensor([0.5, 1.0, -2.0, 0.25])
    s = index_scores(q, k, IndexerConfig(precision=IndexPrecision.FP32, rotate=False, score=IndexScore.RELU,
                                      center_keys=False), w)
    for t in range(3):
        for j in range(6):
            ref = sum(w[h].item() * max(0.0, (q[0, h, t].double() @ k[0, 0, j].double()).item()) for h in range(4))
            assert abs(s[0, 0, t, j].item() - ref) < 1e-4


def test_selection_rules_on_a_constructed_case():
    # one head, 6 keys, 3 queries at positions 3, 4, 5; scores rise with position except two ties
    scores = torch.tensor([[5.0, 1.0, 1.0, 1.0, 2.0, 0.0]]).expand(3, 6).reshape(1, 1, 3, 6)
    cfg = IndexerConfig(top_k=2, rerank=1)
    m = select_from_scores(scores, cfg)[0, 0]
    # query 3 sees keys 0..3: 5 wins, then the tie 1/1/1 goes to key 1
    assert m[0].tolist() == [True, True, False, False, False, False]
    assert m[1].tolist() == [True, False, False, False, True, False]
    forced = select_from_scores(scores, IndexerConfig(top_k=1, rerank=1, sink=1, window=2))[0, 0]
    # query 5: sink key 0 and window keys 4, 5 forced; top-1 of the rest (1, 2, 3 tie) -> key 1
    assert forced[2].tolist() == [True, True, False, False, True, True]


def test_fewer_keys_than_k_keeps_all_causal_keys():
    m = select_mask(torch.randn(1, 2, 5, 32), torch.randn(1, 1, 5, 32), IndexerConfig(top_k=8))
    assert torch.equal(m[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())


def test_two_stage_reranks_by_exact_scores():
    # index scores put key 3 first, exact scores key 1; with r=2 the rerank must pick key 1
    idx = torch.tensor([0.0, 2.0, 1.0, 3.0]).reshape(1, 1, 1, 4)
    exact = torch.tensor([0.0, 3.0, 1.0, 2.0]).reshape(1, 1, 1, 4)
    one = select_from_scores(idx, IndexerConfig(top_k=1, rerank=1))
    two = select_from_scores(idx, IndexerConfig(top_k=1, rerank=2), exact=exact)
    assert one[0, 0, 0].tolist() == [False, False, False, True]
    assert two[0, 0, 0].tolist() == [False, True, False, False]


def test_exact_scores_use_bf16_keys():
    q, k = torch.randn(1, 2, 2, 32), torch.randn(1, 1, 4, 32)
    e = exact_scores(q, k, IndexerConfig())
    want = (q.sum(1).double() @ k[0].bfloat16().double().transpose(-1, -2)).float()
    assert torch.equal(e[0, 0], want[0])


@pytest.mark.parametrize("rerank,sink,window", [(1, 0, 0), (2, 2, 3), (4, 0, 5)])
def test_decode_path_matches_mask_path(rerank, sink, window):
    B, Hq, Hkv, L, D = 2, 4, 2, 40, 64
    q, k = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, L, D)
    cfg = IndexerConfig(top_k=6, rerank=rerank, sink=sink, window=window)
    cache = FP4KeyCache(cfg, B, Hkv, D)
    cache.append(k)
    idx = select_decode(q[:, :, -1], k, cfg, fp4_cache=cache)
    mask = select_mask(q[:, :, -1:], k, cfg)[:, :, 0]  # [B, Hkv, L]
    got = torch.zeros_like(mask).scatter(-1, idx, True)
    assert torch.equal(got, mask)
    assert idx.shape[-1] == 6 + sink + window


def test_config_is_validated():
    with pytest.raises(ValueError, match="top_k"):
        IndexerConfig(top_k=0)
    with pytest.raises(ValueError, match="window"):
        IndexerConfig(window=-1)
    with pytest.raises(TypeError):
        IndexerConfig(precision="mxfp4")
    with pytest.raises(ValueError, match="FP4KeyCache"):
        FP4KeyCache(IndexerConfig(precision=IndexPrecision.BF16), 1, 1, 32)


# ----------------------------------------------------------------------------------------------
# key centering and block rotation


def integer_case(T=12, D=32, offset=40.0, seed=0):
    """q [1, 2, T, D], k [1, 1, T, D] on a coarse grid (many equal scores) with a shared key offset: every score
    and the mean of the first 4 keys are exact in float32, so centered and plain scores can be compared exactly."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (1, 2, T, D), generator=g).float()
    k = torch.randint(-2, 3, (1, 1, T, D), generator=g).float() + offset
    return q, k


def test_centering_shifts_each_querys_scores_by_one_constant():
    q, k = integer_case()
    plain = IndexerConfig(precision=IndexPrecision.FP32, rotate=False, center_keys=False)
    cent = IndexerConfig(precision=IndexPrecision.FP32, rotate=False, center_keys=True, center_tokens=4)
    mu = k[:, :, :4].mean(2, keepdim=True)  # multiples of 1/4: exact
    shift = (q.sum(1, keepdim=True) * mu).sum(-1, keepdim=True)  # q_index . mu per query, [1, 1, T, 1]
    s_plain, s_cent = index_scores(q, k, plain), index_scores(q, k, cent)
    assert shift.abs().min() > 0  # the shift is real, so equal masks below are not a no-op
    assert torch.equal(s_plain - s_cent, shift.expand_as(s_plain))


@pytest.mark.parametrize("top_k,rerank", [(1, 1), (3, 1), (5, 1), (3, 2)])
def test_centering_keeps_the_exact_top_k_ties_included(top_k, rerank):
    q, k = integer_case()
    kw = dict(precision=IndexPrecision.FP32, rotate=False, top_k=top_k, rerank=rerank)
    plain = select_mask(q, k, IndexerConfig(center_keys=False, **kw))
    cent = select_mask(q, k, IndexerConfig(center_keys=True, center_tokens=4, **kw))
    assert torch.equal(plain, cent)


def test_centering_cuts_fp4_score_error_with_a_shared_key_offset():
    # keys = a large shared offset in the first MXFP4 block + unit noise: the offset sets that block's scale
    torch.manual_seed(0)
    D, T = 64, 512
    k = torch.randn(1, 1, T, D)
    k[..., :32] += 30.0 * torch.randn(32).sign()
    q = torch.randn(1, 1, 64, D)
    exact = (q[0, 0].double() @ k[0, 0].double().T)

    def noise(cfg):  # median over queries of std over keys of the score error / std over keys of the exact score
        err = index_scores(q, k, cfg).double()[0, 0] - exact
        return (err.std(-1) / exact.std(-1)).median().item()

    for rotate in (False, True):
        plain = noise(IndexerConfig(rotate=rotate, center_keys=False))
        cent = noise(IndexerConfig(rotate=rotate, center_keys=True))
        assert cent < 0.5 * plain, (rotate, plain, cent)


def test_block_rotation_is_blockdiag_hadamard_and_keeps_dots():
    from fp4kit.nn.rotation import RotationConfig, rotation_matrix

    x, y = torch.randn(5, 64), torch.randn(7, 64)
    R = rotation_matrix(64, RotationConfig(block_size=32), dtype=torch.float64)
    assert torch.allclose(hadamard_rotate(x, 32).double(), x.double() @ R, atol=1e-6)
    assert torch.equal(hadamard_rotate(x, 64), hadamard_rotate(x))
    assert torch.allclose(hadamard_rotate(x, 32) @ hadamard_rotate(y, 32).T, x @ y.T, atol=1e-4)
    with pytest.raises(ValueError, match="dividing the head dim 48"):
        hadamard_rotate(torch.randn(2, 48), 32)


@pytest.mark.parametrize("precision", [IndexPrecision.MXFP4, IndexPrecision.NVFP4])
def test_centered_cache_round_trip(precision):
    k = torch.randn(2, 3, 9, 64) + 5 * torch.randn(1, 3, 1, 64)
    cfg = IndexerConfig(precision=precision, rotate_block=32, center_keys=True, center_tokens=3)
    cache = FP4KeyCache(cfg, 2, 3, 64, capacity=2)
    cache.append(k[:, :, :5])  # the prefill fixes the mean: keys 0..2
    for t in range(5, 9):
        cache.append(k[:, :, t: t + 1])
    mu = k[:, :, :3].double().mean(2, keepdim=True).float()
    assert torch.equal(cache.key_mean, mu)
    x = hadamard_rotate(k - mu, 32).reshape(6, 9, 64)
    if precision is IndexPrecision.MXFP4:
        ref = quantize_mxfp4(x, MX)
    else:
        first = quantize_nvfp4(x[:, :5], NVFP4Config())
        rest = quantize_nvfp4(x[:, 5:], NVFP4Config(), global_scale=first.global_scale)
        assert torch.equal(cache.view().data, torch.cat([first.data, rest.data], 1))
        assert torch.equal(cache.view().scale, torch.cat([first.scale, rest.scale], 1).view(torch.uint8))
        return
    assert torch.equal(cache.view().data, ref.data) and torch.equal(cache.view().scale, ref.scale)
    # what the mask path rounds (mean of the first 3 keys of the full sequence) is what the cache holds
    assert torch.equal(cache.view().dequantize(), index_keys(k, cfg).reshape(6, 9, 64))


def test_cache_with_a_calibrated_mean():
    k, mu = torch.randn(1, 2, 6, 32), torch.randn(2, 32)
    cfg = IndexerConfig(rotate=False, center_keys=True)
    cache = FP4KeyCache(cfg, 1, 2, 32, key_mean=mu)
    cache.append(k)
    want = quantize_mxfp4((k - mu.unsqueeze(1)).reshape(2, 6, 32), MX)
    assert torch.equal(cache.view().data, want.data) and torch.equal(cache.view().scale, want.scale)


@pytest.mark.parametrize("precision", [IndexPrecision.MXFP4, IndexPrecision.BF16])
@pytest.mark.parametrize("rerank", [1, 2])
def test_centered_decode_matches_mask_path_after_appends(precision, rerank):
    # prefill of 20 keys (>= center_tokens), then 4 decode steps: the cache's mean is the mask path's mean
    torch.manual_seed(3)
    B, Hq, Hkv, L, D = 2, 4, 2, 24, 64
    q, k = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, L, D) + 3 * torch.randn(1, Hkv, 1, D)
    cfg = IndexerConfig(top_k=5, precision=precision, rerank=rerank, rotate_block=32, center_keys=True,
                        center_tokens=16, sink=1, window=2)
    cache = FP4KeyCache(cfg, B, Hkv, D) if precision is IndexPrecision.MXFP4 else None
    if cache is not None:
        cache.append(k[:, :, :20])
    for t in range(20, L):
        if cache is not None:
            cache.append(k[:, :, t: t + 1])
        idx = select_decode(q[:, :, t], k[:, :, : t + 1], cfg, fp4_cache=cache)
        mask = select_mask(q[:, :, t: t + 1], k[:, :, : t + 1], cfg)[:, :, 0]
        assert torch.equal(torch.zeros_like(mask).scatter(-1, idx, True), mask)


def test_default_mean_is_the_whole_prefill_and_the_mask_path_takes_it():
    # center_tokens=None: the cache centers on all prefill keys; select_mask given that mean selects the same keys
    torch.manual_seed(4)
    B, Hq, Hkv, L, D = 1, 2, 2, 30, 64
    q, k = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, L, D) + 4 * torch.randn(1, Hkv, 1, D)
    cfg = IndexerConfig(top_k=4, rerank=1)
    assert cfg.center_keys and cfg.center_tokens is None and cfg.rotate_block == 32  # the measured defaults
    cache = FP4KeyCache(cfg, B, Hkv, D)
    cache.append(k[:, :, :25])
    assert torch.equal(cache.key_mean, k[:, :, :25].double().mean(2, keepdim=True).float())
    for t in range(25, L):
        cache.append(k[:, :, t: t + 1])
        idx = select_decode(q[:, :, t], k[:, :, : t + 1], cfg, fp4_cache=cache)
        mask = select_mask(q[:, :, t: t + 1], k[:, :, : t + 1], cfg, key_mean=cache.key_mean)[:, :, 0]
        assert torch.equal(torch.zeros_like(mask).scatter(-1, idx, True), mask)
    assert torch.equal(cache.view().dequantize(), index_keys(k, cfg, mean=cache.key_mean).reshape(2, L, D))


def test_centering_and_rotation_config_is_validated():
    with pytest.raises(ValueError, match="rotate_block"):
        IndexerConfig(rotate_block=24)
    with pytest.raises(ValueError, match="rotate_block"):
        IndexerConfig(rotate_block=1)
    x = torch.randn(3, 16)
    assert torch.equal(hadamard_rotate(x, 32), hadamard_rotate(x))  # a block of at least the head dim: the full one
    with pytest.raises(ValueError, match="center_tokens"):
        IndexerConfig(center_tokens=0)
    with pytest.raises(ValueError, match="center_keys"):
        IndexerConfig(score=IndexScore.RELU)  # centering is on by default; RELU must turn it off
    IndexerConfig(score=IndexScore.RELU, center_keys=False)
    with pytest.raises(ValueError, match="center_keys=False"):
        FP4KeyCache(IndexerConfig(center_keys=False), 1, 2, 32, key_mean=torch.zeros(2, 32))
    with pytest.raises(ValueError, match="key_mean must be"):
        FP4KeyCache(IndexerConfig(), 1, 2, 32, key_mean=torch.zeros(3, 32))
    with pytest.raises(ValueError, match="dividing the head dim"):
        select_mask(torch.randn(1, 1, 2, 48), torch.randn(1, 1, 2, 48), IndexerConfig(rotate_block=32))
