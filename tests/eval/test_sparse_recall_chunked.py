"""The chunked, rank-once recall (`head_recall`) against a direct, unchunked computation through the
indexer's own `index_scores` / `exact_scores` / `select_from_scores`: same selections, so the same recall."""

import math
from dataclasses import replace

import pytest
import torch

from fp4kit.eval.sparse import DEFAULT_VARIANTS, REFERENCE, expand_variants, head_recall
from fp4kit.nn.indexer import exact_scores, index_scores, key_mean, select_from_scores

KS = [2, 5, 16, 40]  # 40: more than some queries' eligible keys


def direct(q, k, scaling, ks, variants, window=None):
    """{(variant, k): (set recall [Tq], mass recall [Tq], live [Tq])} for the last Tq positions, all at once."""
    qb, kb = q.unsqueeze(0), k.unsqueeze(0).unsqueeze(0)
    Tq, Tk = q.shape[1], k.shape[0]
    t, j = torch.arange(Tk - Tq, Tk).unsqueeze(1), torch.arange(Tk).unsqueeze(0)
    allowed = j <= t
    if window is not None:
        allowed &= j > t - window
    logits = (q.double() @ k.double().T * scaling).float()
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    ref_scores, exact = index_scores(qb, kb, REFERENCE), exact_scores(qb, kb, REFERENCE)
    out = {}
    for kk in ks:
        ref = select_from_scores(ref_scores, replace(REFERENCE, top_k=kk), sliding_window=window)[0, 0]
        ref_mass = (probs * ref).sum(-1)
        for name, cfg in variants.items():
            cfg = replace(cfg, top_k=kk)
            mean = key_mean(kb[..., : Tk - Tq, :], cfg)  # centered variants: the keys before the first query
            sel = select_from_scores(index_scores(qb, kb, cfg, key_mean=mean), cfg,
                                     exact=exact if cfg.rerank > 1 else None, sliding_window=window)[0, 0]
            out[name, kk] = ((sel & ref).sum(-1).double() / kk, ((probs * sel).sum(-1) / ref_mass).double().mean(0),
                             allowed.sum(-1) > kk)
    return out


def check(rows, want, pick=slice(None)):
    got = {(r.variant, r.k): r for r in rows}
    assert set(got) == {key for key, (_, _, live) in want.items() if live[pick].any()}
    for key, r in got.items():
        s, m, live = (x[pick] for x in want[key])
        assert r.queries == int(live.sum())
        assert math.isclose(r.set_recall, s[live].mean().item(), rel_tol=1e-9, abs_tol=1e-9), key
        assert math.isclose(r.mass_recall, m[live].mean().item(), rel_tol=1e-6), key


def coarse(*shape):
    """Values on a 1/4 grid: many exact score ties, so the tie rule (lower position first) is exercised."""
    return torch.round(torch.randn(*shape) * 4) / 4


@pytest.mark.parametrize("make, window, chunk", [(torch.randn, None, 1000), (coarse, None, 4), (coarse, 12, 7),
                                                 (torch.randn, 12, 1)])
def test_chunked_equals_direct(make, window, chunk):
    torch.manual_seed(0)
    q, k = make(3, 24, 32), make(44, 32)  # 3 query heads of one KV head, the last 24 of 44 positions
    rows = head_recall(q, k, 0.2, KS, DEFAULT_VARIANTS, window=window, chunk=chunk)
    check(rows, direct(q, k, 0.2, KS, DEFAULT_VARIANTS, window=window))


def test_centered_and_block_rotated_variants_chunked_equals_direct():
    # centered twins and rotate_block=16 copies: the chunked path centers on the same mean (the first 8 of the
    # 20 keys before the first scored query), and with center_tokens=None on all 20 of them
    torch.manual_seed(2)
    variants = expand_variants({n: DEFAULT_VARIANTS[n] for n in ("bf16", "mxfp4_rot", "mxfp4_rot_r2", "nvfp4_rot")},
                               rotation_blocks=[16], center=True, center_tokens=8)
    assert {"mxfp4_rot16_r2", "mxfp4_rot16_r2_c", "bf16_c", "nvfp4_rot16_c"} <= set(variants)
    q, k = coarse(3, 24, 32), coarse(44, 32) + 3.0
    check(head_recall(q, k, 0.2, KS, variants, chunk=5), direct(q, k, 0.2, KS, variants))
    all_prefill = expand_variants({"mxfp4_rot": DEFAULT_VARIANTS["mxfp4_rot"]}, rotation_blocks=[16], center=True)
    assert all_prefill["mxfp4_rot16_c"].center_tokens is None
    check(head_recall(q, k, 0.2, KS, all_prefill, chunk=5), direct(q, k, 0.2, KS, all_prefill))


def test_strided_queries_are_a_subset_of_the_direct_rows():
    # NVFP4's per-tensor scale depends on which queries are rounded together, so it is left out here
    torch.manual_seed(1)
    variants = {n: c for n, c in DEFAULT_VARIANTS.items() if not n.startswith("nvfp4")}
    q, k = coarse(2, 24, 32), coarse(44, 32)
    pick = torch.arange(23, -1, -4).flip(0)  # every 4th of the last 24, ending at the last
    rows = head_recall(q[:, pick], k, 0.2, KS, variants, positions=pick + 20, chunk=3)
    check(rows, direct(q, k, 0.2, KS, variants), pick)


def test_sliding_window_layers_local_modes():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from fp4kit.eval.sparse import capture_qk, measure_recall

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
    model = Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 16))
    assert capture_qk(model, ids).window == {0: 4, 1: None}
    variants = {"bf16": DEFAULT_VARIANTS["bf16"]}
    kw = dict(ks=[2, 8], variants=variants, progress=False)
    windowed = measure_recall(model, ids, local="window", **kw)
    # the local layer sees at most 4 keys: a k = 2 row, no k = 8 row; the global layer has both
    assert {(r.layer, r.k, r.window) for r in windowed} == {(0, 2, 4), (1, 2, None), (1, 8, None)}
    assert next(r for r in windowed if r.layer == 0).queries == 16 - 2  # positions 2..15 have 3 or 4 keys in the window
    assert {r.layer for r in measure_recall(model, ids, local="skip", **kw)} == {1}
    ignored = measure_recall(model, ids, local="ignore", **kw)
    assert {(r.layer, r.k, r.window) for r in ignored} == {(0, 2, None), (0, 8, None), (1, 2, None), (1, 8, None)}
