"""How good is an FP4 indexer on a real model? Recall of the exact top-k, and perplexity with sparse attention.

Recall, per layer and KV head, for queries that have more than k causal keys:

    set recall   |S ∩ S*| / k                      S* = top-k by float32 scores (the reference), S the variant's
    mass recall  sum_h P_h(S) / sum_h P_h(S*)      P_h(X) = dense softmax mass of query head h on the keys X

averaged over the queries (and over the query heads of the group for the mass). Set recall asks
"did we pick the same keys", mass recall "did we keep the attention that matters": two keys with
nearly equal scores swap places at no cost in mass. Both use the selection with no sink and no
window (pure top-k), so they measure the index scores alone.

The Q and K are the model's own post-RoPE tensors, captured by an attention function registered
through transformers' AttentionInterface (the capture function then runs sdpa, so the forward is
unchanged). Gemma-3's local layers are scored over all causal keys (their 512-token window is
ignored here: the indexer question is the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from fp4kit.nn.indexer import IndexerConfig, IndexPrecision, exact_scores, index_scores, select_from_scores
from fp4kit.nn.sparse_attention import attention_implementation, use_sparse_attention

DEFAULT_VARIANTS = {
    "bf16": IndexerConfig(precision=IndexPrecision.BF16, rotate=False, rerank=1),
    "mxfp4": IndexerConfig(precision=IndexPrecision.MXFP4, rotate=False, rerank=1),
    "mxfp4_rot": IndexerConfig(precision=IndexPrecision.MXFP4, rotate=True, rerank=1),
    "mxfp4_rot_r2": IndexerConfig(precision=IndexPrecision.MXFP4, rotate=True, rerank=2),
    "mxfp4_rot_r4": IndexerConfig(precision=IndexPrecision.MXFP4, rotate=True, rerank=4),
    "nvfp4_rot": IndexerConfig(precision=IndexPrecision.NVFP4, rotate=True, rerank=1),
}
REFERENCE = IndexerConfig(precision=IndexPrecision.FP32, rotate=False, rerank=1)


@dataclass(frozen=True)
class RecallRow:
    layer: int
    kv_head: int
    variant: str
    k: int
    set_recall: float
    mass_recall: float
    queries: int


@dataclass
class CapturedQK:
    """Post-RoPE q [Hq, T, D] and k [Hkv, T, D] (float32, batch 0) per layer, and each layer's scaling."""

    q: dict = field(default_factory=dict)
    k: dict = field(default_factory=dict)
    scaling: dict = field(default_factory=dict)


def capture_qk(model, ids: torch.Tensor, layers=None) -> CapturedQK:
    """Run `model` on ids [1, T] and keep the post-RoPE Q/K of `layers` (all when None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    got = CapturedQK()

    def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        i = module.layer_idx
        if layers is None or i in layers:
            got.q[i], got.k[i] = query[0].detach().float().clone(), key[0].detach().float().clone()
            got.scaling[i] = query.shape[-1] ** -0.5 if scaling is None else scaling
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    with torch.no_grad(), attention_implementation(model, capture, prefix="fp4kit_capture"):
        model(ids)
    return got


def _dense_probs(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """q [G, Tq, D] (the last Tq positions), k [Tk, D] -> causal softmax [G, Tq, Tk] float32."""
    Tq, Tk = q.shape[1], k.shape[0]
    logits = (q.double() @ k.double().T * scaling).float()
    causal = torch.arange(Tk).unsqueeze(0) <= torch.arange(Tk - Tq, Tk).unsqueeze(1)
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


def head_recall(q: torch.Tensor, k: torch.Tensor, scaling: float, ks, variants: dict, *, layer: int = 0,
                kv_head: int = 0) -> list[RecallRow]:
    """Recall rows for one KV head: q [G, Tq, D] (its query heads, last Tq positions), k [Tk, D]."""
    qb, kb = q.unsqueeze(0), k.unsqueeze(0).unsqueeze(0)  # [1, G, Tq, D], [1, 1, Tk, D]
    Tq, Tk = q.shape[1], k.shape[0]
    probs = _dense_probs(q, k, scaling)  # [G, Tq, Tk]
    n_causal = torch.arange(Tk - Tq, Tk) + 1
    ref_scores = index_scores(qb, kb, REFERENCE)
    exact = exact_scores(qb, kb, REFERENCE)
    rows = []
    scored = {name: index_scores(qb, kb, cfg) for name, cfg in variants.items()}
    for kk in ks:
        live = n_causal > kk  # queries with a real choice
        if not live.any():
            continue
        ref = select_from_scores(ref_scores, replace(REFERENCE, top_k=kk))[0, 0]  # [Tq, Tk]
        ref_mass = (probs * ref).sum(-1)  # [G, Tq]
        for name, cfg in variants.items():
            cfg = replace(cfg, top_k=kk)
            sel = select_from_scores(scored[name], cfg, exact=exact if cfg.rerank > 1 else None)[0, 0]
            set_rec = (sel & ref).sum(-1).float() / kk
            mass_rec = ((probs * sel).sum(-1) / ref_mass).mean(0)
            rows.append(RecallRow(layer, kv_head, name, kk, set_rec[live].mean().item(),
                                  mass_rec[live].mean().item(), int(live.sum())))
    return rows


def measure_recall(model, ids: torch.Tensor, *, ks=(64, 256, 1024), variants=None, layers=None,
                   queries: int | None = None, progress: bool = True) -> list[RecallRow]:
    """Recall rows for every (captured layer, KV head, variant, k). ids [1, T]; `queries`: score only
    the last `queries` positions (all when None)."""
    variants = DEFAULT_VARIANTS if variants is None else variants
    cap = capture_qk(model, ids, layers)
    rows = []
    for i in tqdm(sorted(cap.q), desc="recall", disable=not progress):
        q, k = cap.q[i], cap.k[i]
        Hq, T, D = q.shape
        Hkv = k.shape[0]
        tq = T if queries is None else min(queries, T)
        for g in range(Hkv):
            qg = q[g * (Hq // Hkv):(g + 1) * (Hq // Hkv), T - tq:]
            rows.extend(head_recall(qg, k[g], cap.scaling[i], ks, variants, layer=i, kv_head=g))
    return rows


def summarize(rows: list[RecallRow]) -> dict:
    """{(variant, k): mean / min set and mass recall over layers and heads}."""
    out = {}
    for key in sorted({(r.variant, r.k) for r in rows}, key=lambda x: (x[1], x[0])):
        sel = [r for r in rows if (r.variant, r.k) == key]
        s = torch.tensor([r.set_recall for r in sel])
        m = torch.tensor([r.mass_recall for r in sel])
        out[key] = {"set_mean": s.mean().item(), "set_min": s.min().item(), "mass_mean": m.mean().item(),
                    "mass_min": m.min().item(), "heads": len(sel)}
    return out


def sparse_perplexity(model, ids: torch.Tensor, configs: dict, *, context: int = 1024, max_tokens: int = 4096,
                      progress: bool = True) -> dict:
    """{name: perplexity} for dense attention ("dense") and each IndexerConfig in `configs`."""
    from .perplexity import perplexity

    out = {"dense": perplexity(model, ids, context=context, max_tokens=max_tokens, progress=progress).perplexity}
    for name, cfg in configs.items():
        with torch.no_grad(), use_sparse_attention(model, cfg):
            out[name] = perplexity(model, ids, context=context, max_tokens=max_tokens, progress=progress,
                                   desc=name).perplexity
    return out
