"""Sparse attention: decode form against the masked form, and HF models run through AttentionInterface."""

import pytest
import torch
from helpers import tiny_llama

from fp4kit.nn.indexer import FP4KeyCache, IndexerConfig, IndexPrecision, select_decode, select_mask
from fp4kit.nn.sparse_attention import (attention_implementation, sparse_attention, sparse_attention_function,
                                        sparse_decode_attention, use_sparse_attention)


def dense(q, k, v, scaling):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    T = q.shape[2]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=scaling)


def test_full_selection_is_dense_attention():
    q, k, v = torch.randn(2, 4, 9, 32), torch.randn(2, 2, 9, 32), torch.randn(2, 2, 9, 32)
    mask = select_mask(q, k, IndexerConfig(top_k=16))
    assert torch.allclose(sparse_attention(q, k, v, mask, 0.2), dense(q, k, v, 0.2), atol=1e-5)


def test_decode_form_equals_masked_form():
    B, Hq, Hkv, L, D = 2, 4, 2, 48, 64
    q, k, v = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    cfg = IndexerConfig(top_k=8, rerank=2, sink=2, window=4)
    cache = FP4KeyCache(cfg, B, Hkv, D)
    cache.append(k)
    idx = select_decode(q[:, :, -1], k, cfg, fp4_cache=cache)
    out = sparse_decode_attention(q[:, :, -1], k, v, idx, 0.125)
    mask = torch.zeros(B, Hkv, 1, L, dtype=torch.bool).scatter(-1, idx.unsqueeze(2), True)
    want = sparse_attention(q[:, :, -1:], k, v, mask, 0.125)[:, :, 0]
    assert torch.allclose(out, want, atol=1e-5)
    with pytest.raises(IndexError, match="selected positions"):
        sparse_decode_attention(q[:, :, -1], k, v, idx + L, 0.125)


def test_hf_model_with_large_k_matches_dense():
    model = tiny_llama().float()
    ids = torch.randint(0, 128, (2, 20))
    want = model(ids).logits
    with use_sparse_attention(model, IndexerConfig(top_k=64, precision=IndexPrecision.BF16)):
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert model.config._attn_implementation not in ("", None) and "fp4kit" not in model.config._attn_implementation


def test_hf_model_sparse_changes_logits_and_generates():
    model = tiny_llama().float()
    ids = torch.randint(0, 128, (1, 24))
    dense_logits = model(ids).logits
    calls = []
    fn = sparse_attention_function(IndexerConfig(top_k=2, rerank=2, sink=1, window=2, precision=IndexPrecision.BF16))  # head dim 16

    def counting(module, query, key, *a, **kw):
        calls.append((query.shape[2], key.shape[2]))
        return fn(module, query, key, *a, **kw)

    with attention_implementation(model, counting):
        sparse_logits = model(ids).logits
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    # the first 5 queries see <= 5 causal keys (all selected): identical there, different later
    assert torch.allclose(sparse_logits[:, :5], dense_logits[:, :5], atol=1e-4)
    assert not torch.allclose(sparse_logits[:, 10:], dense_logits[:, 10:], atol=1e-3)
    assert out.shape == (1, 27)
    assert (1, 25) in calls and (1, 26) in calls  # decode steps went through the sparse function


def test_gemma3_sliding_window_layers_with_large_k_match_eager():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64,
                           query_pre_attn_scalar=32)
    model = Gemma3ForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    ids = torch.randint(0, 96, (1, 12))
    want = model(ids).logits
    with use_sparse_attention(model, IndexerConfig(top_k=64, precision=IndexPrecision.MXFP4)):
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_layer_configs_override_the_config_per_layer():
    """`use_sparse_attention(model, config, layer_configs)`: the layers named get their own config (by the attention
    module's layer_idx), the others the shared one; layer by layer the logits equal a run with that config."""
    model = tiny_llama().float()
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(3))
    wide = IndexerConfig(top_k=64, precision=IndexPrecision.BF16)  # >= every causal set: dense
    narrow = IndexerConfig(top_k=2, rerank=1, sink=1, window=2, precision=IndexPrecision.BF16)
    with use_sparse_attention(model, wide):
        dense = model(ids).logits
    with use_sparse_attention(model, narrow):
        both = model(ids).logits
    with use_sparse_attention(model, wide, layer_configs={1: narrow}):
        mixed = model(ids).logits
    with use_sparse_attention(model, narrow, layer_configs={0: narrow, 1: narrow}):
        assert torch.equal(model(ids).logits, both)
    assert not torch.allclose(mixed, dense, atol=1e-3) and not torch.allclose(mixed, both, atol=1e-3)
    # the same split by hand: layer 0 dense (wide), layer 1 narrow
    fw, fn = sparse_attention_function(wide), sparse_attention_function(narrow)
    with attention_implementation(model, lambda m, *a, **kw: (fn if m.layer_idx == 1 else fw)(m, *a, **kw)):
        assert torch.equal(model(ids).logits, mixed)
