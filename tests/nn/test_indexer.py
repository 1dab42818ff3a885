"""The FP4 lightning indexer: rotation, FP4 Q/K against the core codecs, selection rules, decode path."""

import pytest
import torch

from fp4kit.algorithms.rotations import hadamard
from fp4kit.formats import MXFP4Config, NVFP4Config, ScaleRule, quantize_mxfp4, quantize_nvfp4
from fp4kit.nn.indexer import (FP4KeyCache, IndexerConfig, IndexPrecision, IndexScore, exact_scores,
                               hadamard_rotate, index_scores, round_index, select_decode, select_from_scores,
                               select_mask)

MX = MXFP4Config(ScaleRule.RCEIL)


def test_rotation_is_the_orthonormal_hadamard_and_keeps_dots():
    x = torch.randn(5, 64)
    assert torch.allclose(hadamard_rotate(x), x @ hadamard(64), atol=1e-6)
    y = torch.randn(7, 64)
    assert torch.allclose(hadamard_rotate(x) @ hadamard_rotate(y).T, x @ y.T, atol=1e-4)


def test_mxfp4_index_keys_bit_exact_with_codec():
    k = torch.randn(2, 3, 9, 64)
    cfg = IndexerConfig(precision=IndexPrecision.MXFP4)
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
    cfg = IndexerConfig(precision=IndexPrecision.NVFP4, rotate=False)
    cache = FP4KeyCache(cfg, 1, 2, 32)
    cache.append(k[:, :, :4])
    cache.append(k[:, :, 4:])  # the prefill's global scale is reused
    first = quantize_nvfp4(k[:, :, :4].reshape(2, 4, 32), NVFP4Config())
    rest = quantize_nvfp4(k[:, :, 4:].reshape(2, 2, 32), NVFP4Config(), global_scale=first.global_scale)
    assert torch.equal(cache.view().data, torch.cat([first.data, rest.data], 1))
    assert torch.equal(cache.view().scale, torch.cat([first.scale, rest.scale], 1).view(torch.uint8))


def test_dot_scores_sum_the_group_and_round_to_bf16():
    q, k = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 5, 64)
    s = index_scores(q, k, IndexerConfig(precision=IndexPrecision.BF16, rotate=False))
    kb = k.bfloat16().double()
    # the group's queries are summed in float32, then rounded to bf16 like the keys
    qs = q.reshape(1, 2, 2, 3, 64).sum(2).bfloat16().double()
    want = torch.einsum("gqd,gkd->gqk", qs[0], kb[0]).float().bfloat16()
    assert s.dtype == torch.bfloat16 and torch.equal(s[0], want)


def test_relu_form_by_brute_force():
    q, k = torch.randn(1, 4, 3, 32), torch.randn(1, 1, 6, 32)
    w = torch.tensor([0.5, 1.0, -2.0, 0.25])
    s = index_scores(q, k, IndexerConfig(precision=IndexPrecision.FP32, rotate=False, score=IndexScore.RELU), w)
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
