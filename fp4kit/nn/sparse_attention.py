"""Sparse attention over the keys the FP4 indexer selects, and a way to run Hugging Face models with it.

    out[h, t] = sum_{j in S(t)} softmax_j(q_h[t] . k_g[j] * scaling) v_g[j]      S(t) = selected keys

S(t) is shared by the query heads of one KV head (GQA) and comes from `fp4kit.nn.indexer`: the top
k keys by the index score, plus the first `sink` and newest `window` keys. With k >= t + 1 it is
the full causal set and the result is dense attention.

Two forms:
- `sparse_decode_attention`: one query per sequence (a decode step) over gathered keys and values,
  [B, Hkv, n, D]: the work is O(n), not O(L). The selection comes from `select_decode` (Triton
  scan of the packed FP4 key cache, then the exact rerank).
- `sparse_attention`: many queries (prefill, perplexity), dense logits with everything outside the
  selection mask set to -inf. O(L^2) like eager attention; it is the evaluation path.

Running a model. `sparse_attention_function(config)` returns an attention function with the
signature transformers' `AttentionInterface` expects (module, query, key, value, attention_mask,
scaling, dropout, **kwargs; post-RoPE query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D] with the cache
included). `use_sparse_attention(model, config)` registers it under its own name through that
supported extension point, registers the sdpa boolean mask for the name (padding and Gemma's sliding
windows arrive as a mask), and switches the model to it; a context manager switches back. Prefill
and every decode step then select and attend sparsely, inside `model(...)` and `model.generate(...)`.
The keys are rounded to FP4 on every call in this path (an FP4 key cache holds the same values:
MXFP4 blocks lie inside one key vector; with `center_keys` at the prefill only: each later call
centers on the mean of all the keys it is passed, which moves a little with every step, and a
sliding-window cache passes only its newest keys; the exact top-k is unchanged either way, the
bytes are not the cache's); it measures quality, not speed.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Mapping

import torch

from .indexer import IndexerConfig, select_mask

_names = itertools.count()


def _group(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """[B, Hq, ..., D] -> [B, Hkv, G, ..., D]."""
    B, Hq = q.shape[:2]
    return q.reshape(B, n_kv_heads, Hq // n_kv_heads, *q.shape[2:])


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float,
                     *, softcap: float | None = None) -> torch.Tensor:
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], mask bool [B, Hkv or 1, Tq, Tk] (True = attend) -> [B, Hq, Tq, D].
    Softmax in float32; a query with no selected key gets zeros."""
    Hkv = k.shape[1]
    qg = _group(q.float(), Hkv)  # [B, Hkv, G, Tq, D]
    logits = torch.einsum("bgiqd,bgkd->bgiqk", qg, k.float()) * scaling
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~mask.unsqueeze(2), float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bgiqk,bgkd->bgiqd", p, v.float())
    return out.reshape(q.shape[0], q.shape[1], q.shape[2], v.shape[-1]).to(q.dtype)


def sparse_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                            scaling: float) -> torch.Tensor:
    """One decode step. q [B, Hq, D], k/v [B, Hkv, L, D], idx int64 [B, Hkv, n] -> [B, Hq, D]."""
    B, Hkv, L, D = k.shape
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= L):
        raise IndexError(f"selected positions must lie in [0, {L}), got {int(idx.min())}..{int(idx.max())}")
    gather = idx.unsqueeze(-1).expand(-1, -1, -1, D)
    ks, vs = torch.gather(k, 2, gather).float(), torch.gather(v, 2, gather).float()  # [B, Hkv, n, D]
    qg = _group(q.float(), Hkv)  # [B, Hkv, G, D]
    p = torch.softmax(torch.einsum("bgid,bgnd->bgin", qg, ks) * scaling, dim=-1)
    return torch.einsum("bgin,bgnd->bgid", p, vs).reshape(B, -1, D).to(q.dtype)


def sparse_attention_function(config: IndexerConfig, layer_configs: Mapping[int, IndexerConfig] | None = None):
    """An attention function for transformers' AttentionInterface that attends to the indexer's selection.

    `layer_configs` {layer index: IndexerConfig} overrides `config` for those layers (the attention module's
    `layer_idx`), e.g. a per-layer rotation chosen on calibration text (`fp4kit.eval.sparse.choose_per_layer`)."""
    layer_configs = dict(layer_configs or {})

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                  softcap=None, **kwargs):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        cfg = layer_configs.get(getattr(module, "layer_idx", None), config)
        with torch.no_grad():  # the selection is discrete: no gradient flows through it
            mask = select_mask(query, key, cfg, sliding_window=sliding_window)  # [B, Hkv, Tq, Tk]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
            mask = mask & attention_mask[..., -key.shape[-2]:]
        out = sparse_attention(query, key, value, mask, scaling, softcap=softcap)
        return out.transpose(1, 2).contiguous(), None

    return attention


def register_attention(fn, prefix: str = "fp4kit_sparse") -> str:
    """Register `fn` (and the sdpa boolean mask) under a fresh name in transformers' interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    name = f"{prefix}_{next(_names)}"
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


@contextlib.contextmanager
def attention_implementation(model, fn, prefix: str = "fp4kit_sparse"):
    """Run `model` with attention function `fn` inside the block; the previous implementation after."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(register_attention(fn, prefix))
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def use_sparse_attention(model, config: IndexerConfig, layer_configs: Mapping[int, IndexerConfig] | None = None):
    """Context manager: `with use_sparse_attention(model, IndexerConfig(top_k=256)): model(ids)`;
    `layer_configs` as in `sparse_attention_function`."""
    return attention_implementation(model, sparse_attention_function(config, layer_configs))
