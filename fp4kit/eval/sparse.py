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
unchanged). Sliding-window layers (Gemma-3's local layers, window 512) are handled by `local`:
"ignore" (the default) scores them over all causal keys as if they were global, "window" scores them
within their window (the keys their attention really sees: selection and dense softmax both), "skip"
leaves them out. At long context only "window" or "skip" answer a real question: a local layer
never reads a key more than 512 back.

Long contexts: queries are scored in chunks (memory O(chunk x T), not O(T^2)), optionally every
`stride`-th of the last `queries` positions, so an 8K-token run stays within CPU memory and time.

Variants. `DEFAULT_VARIANTS` are the indexers of the first tables (full head-dim rotation, no key
centering: not `IndexerConfig`'s present defaults); `expand_variants` adds block-rotation copies
("_rot" -> "_rot32") and key-centered twins ("_c"). A centered variant's keys are centered on the mean of
the keys before the first scored query (its first `center_tokens` when set): what an `FP4KeyCache` filled by
a prefill of that text holds while the scored queries decode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from fp4kit.kernels.fp4_topk import topk_order_torch
from fp4kit.nn.indexer import (IndexerConfig, IndexPrecision, IndexScore, exact_scores, group_queries, index_keys,
                               key_mean, round_index)
from fp4kit.nn.sparse_attention import attention_implementation, use_sparse_attention

_PLAIN = {"center_keys": False, "rotate_block": None}  # the first tables' indexers: full rotation, no centering
DEFAULT_VARIANTS = {
    "bf16": IndexerConfig(precision=IndexPrecision.BF16, rotate=False, rerank=1, **_PLAIN),
    "mxfp4": IndexerConfig(precision=IndexPrecision.MXFP4, rotate=False, rerank=1, **_PLAIN),
    "mxfp4_rot": IndexerConfig(precision=IndexPrecision.MXFP4, rotate=True, rerank=1, **_PLAIN),
    "mxfp4_rot_r2": IndexerConfig(precision=IndexPrecision.MXFP4, rotate=True, rerank=2, **_PLAIN),
    "mxfp4_rot_r4": IndexerConfig(precision=IndexPrecision.MXFP4, rotate=True, rerank=4, **_PLAIN),
    "nvfp4_rot": IndexerConfig(precision=IndexPrecision.NVFP4, rotate=True, rerank=1, **_PLAIN),
}
REFERENCE = IndexerConfig(precision=IndexPrecision.FP32, rotate=False, rerank=1, **_PLAIN)


def expand_variants(base: dict, *, rotation_blocks=(), center: bool = False, center_tokens: int | None = None) -> dict:
    """`base` plus, for every rotated variant and block b in `rotation_blocks`, a copy with `rotate_block=b`
    ("mxfp4_rot_r2" -> "mxfp4_rot32_r2"); then with `center`, a key-centered twin of every variant (name + "_c",
    mean of the first `center_tokens` keys, the config's default when None)."""
    out = dict(base)
    for name, cfg in base.items():
        for b in rotation_blocks:
            if cfg.rotate and "_rot" in name:
                out[name.replace("_rot", f"_rot{b}", 1)] = replace(cfg, rotate_block=b)
    if center:
        extra = {} if center_tokens is None else {"center_tokens": center_tokens}
        out.update({f"{name}_c": replace(cfg, center_keys=True, **extra) for name, cfg in list(out.items())})
    return out


@dataclass(frozen=True)
class RecallRow:
    layer: int
    kv_head: int
    variant: str
    k: int
    set_recall: float
    mass_recall: float
    queries: int
    window: int | None = None  # keys within this many positions back only (a sliding-window layer); None: all causal


@dataclass
class CapturedQK:
    """Post-RoPE q [Hq, T, D] and k [Hkv, T, D] (float32, batch 0) per layer, each layer's scaling, and its
    sliding window (None for full attention)."""

    q: dict = field(default_factory=dict)
    k: dict = field(default_factory=dict)
    scaling: dict = field(default_factory=dict)
    window: dict = field(default_factory=dict)


def capture_qk(model, ids: torch.Tensor, layers=None) -> CapturedQK:
    """Run `model` on ids [1, T] and keep the post-RoPE Q/K of `layers` (all when None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    got = CapturedQK()

    def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        i = module.layer_idx
        if layers is None or i in layers:
            got.q[i], got.k[i] = query[0].detach().float().clone(), key[0].detach().float().clone()
            got.scaling[i] = query.shape[-1] ** -0.5 if scaling is None else scaling
            got.window[i] = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    # logits_to_keep=1: the logits are not needed, and at 8K tokens Gemma-3's 262K vocabulary would cost 8.6 GB
    with torch.no_grad(), attention_implementation(model, capture, prefix="fp4kit_capture"):
        model(ids, logits_to_keep=1)
    return got


def _rounded_dot(qi: torch.Tensor, ki: torch.Tensor, config: IndexerConfig) -> torch.Tensor:
    """DOT index scores [Tq, Tk] from already rounded index queries [Tq, D] and keys [Tk, D]: what
    `index_scores` computes after its rounding (exact float64 dots, rounded once to float32, then bf16)."""
    s = (qi.double() @ ki.double().T).float()
    return s if config.precision is IndexPrecision.FP32 else s.bfloat16()


def head_recall(q: torch.Tensor, k: torch.Tensor, scaling: float, ks, variants: dict, *, layer: int = 0,
                kv_head: int = 0, positions: torch.Tensor | None = None, window: int | None = None,
                chunk: int = 256) -> list[RecallRow]:
    """Recall rows for one KV head: q [G, Tq, D] its query heads at `positions` (int64 [Tq], ascending; the
    last Tq positions of the keys when None), k [Tk, D] the keys at positions 0..Tk-1. `window`: each query t
    sees only keys t - window < j <= t (selection and dense softmax), as a sliding-window layer; None: all
    causal keys. A k is reported over the queries with more than k eligible keys (none: no row).

    Queries go `chunk` at a time against the keys up to the chunk's last position, so memory is
    O(G x chunk x Tk). Each variant's index queries and keys are rounded once for the whole head (so NVFP4's
    per-tensor scale sees every scored query, as an unchunked `index_scores` call would), and each variant's
    scores are ranked once per chunk: `select_from_scores` takes its top k (and its two-stage candidates, the
    top r*k) as a prefix of one stable descending sort, so one sort serves every k. The selections are the
    ones `select_from_scores` makes (tests/test_sparse_recall_chunked.py checks this against it)."""
    G, Tq, D = q.shape
    Tk = k.shape[0]
    positions = torch.arange(Tk - Tq, Tk) if positions is None else positions.long()
    configs = {None: REFERENCE, **variants}  # None: the reference, never a variant name
    if any(cfg.score is not IndexScore.DOT for cfg in configs.values()):
        raise NotImplementedError("head_recall measures the DOT index form")
    # index queries (the group's sum) and keys, rotated and rounded per variant, once
    q_index = group_queries(q.unsqueeze(0), 1, IndexScore.DOT)  # [1, 1, 1, Tq, D]
    kb = k.unsqueeze(0).unsqueeze(0)  # [1, 1, Tk, D]
    rq = {n: round_index(q_index, c, name="index queries")[0, 0, 0] for n, c in configs.items()}
    # centered variants: on the mean of the keys before the first scored query (the "prefill"; all keys if none)
    prefill = kb[..., : int(positions[0]), :] if int(positions[0]) > 0 else kb
    rk = {n: index_keys(kb, c, mean=key_mean(prefill, c))[0, 0] for n, c in configs.items()}
    depth = {n: max(ks) * c.rerank for n, c in configs.items()}  # how far down each ranking is read
    keys = [(name, kk) for kk in ks for name in variants]
    set_sum = dict.fromkeys(keys, 0.0)
    mass_sum = dict.fromkeys(keys, 0.0)
    count = dict.fromkeys(ks, 0)
    neg_inf = float("-inf")
    for c0 in range(0, Tq, chunk):
        pos = positions[c0:c0 + chunk]
        lo, hi = (0 if window is None else max(0, int(pos[0]) - window + 1)), int(pos[-1]) + 1
        t, j = pos.unsqueeze(1), torch.arange(lo, hi).unsqueeze(0)
        eligible = j <= t
        if window is not None:
            eligible &= j > t - window
        n_eligible = eligible.sum(-1)
        qc, kc = q[:, c0:c0 + chunk], k[lo:hi]
        logits = (qc.double() @ kc.double().T * scaling).float()
        probs = torch.softmax(logits.masked_fill(~eligible, neg_inf), dim=-1)  # [G, c, n] the real attention
        order = {}
        for name, cfg in configs.items():
            s = _rounded_dot(rq[name][c0:c0 + chunk], rk[name][lo:hi], cfg)
            order[name] = topk_order_torch(torch.where(eligible, s, torch.full_like(s, neg_inf)),
                                           min(depth[name], hi - lo))
        if any(cfg.rerank > 1 for cfg in variants.values()):
            exact = exact_scores(qc.unsqueeze(0), kc.unsqueeze(0).unsqueeze(0), REFERENCE)[0, 0]
        for kk in ks:
            live = n_eligible > kk  # queries with a real choice
            if not live.any():
                continue
            count[kk] += int(live.sum())
            top_ref = order[None][:, :kk]
            ref = torch.zeros_like(eligible).scatter(-1, top_ref, eligible.gather(-1, top_ref))
            ref_mass = (probs * ref).sum(-1)  # [G, c]
            for name, cfg in variants.items():
                top = order[name][:, :kk * cfg.rerank]
                if cfg.rerank > 1:  # stage two: the best k of the candidates by the exact score
                    top = top.sort(dim=-1).values  # by position, so equal exact scores go to the lower one
                    ok = eligible.gather(-1, top)
                    ranked = exact.gather(-1, top)
                    top = top.gather(-1, topk_order_torch(torch.where(ok, ranked, torch.full_like(ranked, neg_inf)),
                                                          min(kk, top.shape[-1])))
                # top's ineligible entries (fewer eligible keys than k) are never in ref and carry no mass
                set_rec = ref.gather(-1, top).sum(-1).double() / kk
                mass_rec = (probs.gather(-1, top.expand(G, -1, -1)).sum(-1) / ref_mass).double().mean(0)
                set_sum[name, kk] += set_rec[live].sum().item()
                mass_sum[name, kk] += mass_rec[live].sum().item()
    return [RecallRow(layer, kv_head, name, kk, set_sum[name, kk] / count[kk], mass_sum[name, kk] / count[kk],
                      count[kk], window) for name, kk in keys if count[kk]]


def measure_recall(model, ids: torch.Tensor, *, ks=(64, 256, 1024), variants=None, layers=None,
                   queries: int | None = None, stride: int = 1, chunk: int = 256, local: str = "ignore",
                   progress: bool = True) -> list[RecallRow]:
    """Recall rows for every (captured layer, KV head, variant, k). ids [1, T]; `queries`: score only
    the last `queries` positions (all when None), every `stride`-th of them ending at the last position;
    `chunk`: queries per step; `local`: sliding-window layers "ignore"d (scored over all causal keys),
    scored within their "window", or "skip"ped (module docstring)."""
    if local not in ("ignore", "window", "skip"):
        raise ValueError(f"local must be 'ignore', 'window' or 'skip', got {local!r}")
    variants = DEFAULT_VARIANTS if variants is None else variants
    cap = capture_qk(model, ids, layers)
    rows = []
    for i in tqdm(sorted(cap.q), desc="recall", disable=not progress):
        window = cap.window[i] if local == "window" else None
        if local == "skip" and cap.window[i] is not None:
            continue
        q, k = cap.q[i], cap.k[i]
        Hq, T, D = q.shape
        Hkv = k.shape[0]
        tq = T if queries is None else min(queries, T)
        positions = torch.arange(T - 1, T - 1 - tq, -stride).flip(0)
        for g in range(Hkv):
            qg = q[g * (Hq // Hkv):(g + 1) * (Hq // Hkv), positions]
            rows.extend(head_recall(qg, k[g], cap.scaling[i], ks, variants, layer=i, kv_head=g,
                                    positions=positions, window=window, chunk=chunk))
    return rows


def choose_per_layer(rows: list[RecallRow], options: Mapping[object, Sequence[str]]) -> dict[int, object]:
    """{layer: the option whose variants score the highest mean set recall there}, from recall rows measured on
    calibration text. `options` maps each choice (e.g. a rotate_block: 32, None) to the names of its variants
    in `rows` (several: the choice is judged over all of them, e.g. single stage and rerank); the mean runs
    over those variants, every k and every KV head of the layer. Ties go to the first option listed (the
    default). A layer without rows for some option is left out (it keeps the caller's default).

    Why per layer: the best rotation depends on where a layer's key variance and query energy sit (the
    indexer's docstring): Gemma-3's global layer 11 wants the block-32 Hadamard, layers 5 and 17 the full one."""
    names = {name: opt for opt, group in options.items() for name in group}
    if len(names) != sum(len(g) for g in options.values()):
        raise ValueError("choose_per_layer: a variant name is listed under two options")
    score: dict[int, dict[object, list[float]]] = {}
    for r in rows:
        if r.variant in names:
            score.setdefault(r.layer, {}).setdefault(names[r.variant], []).append(r.set_recall)
    out = {}
    for layer, by_opt in sorted(score.items()):
        if len(by_opt) == len(options):
            out[layer] = max(options, key=lambda o: (sum(by_opt[o]) / len(by_opt[o]), -list(options).index(o)))
    return out


def calibrate_rotation(model, ids: torch.Tensor, config: IndexerConfig, *, blocks=(32, None), ks=(64, 256),
                       progress: bool = True, **recall) -> dict[int, IndexerConfig]:
    """Per-layer indexer configs with the rotation block (`blocks`, first = the default on ties) that keeps the
    most of the exact top-k on calibration text ids [1, T]: {layer: replace(config, rotate_block=b)} for use as
    `use_sparse_attention(model, config, layer_configs=...)`. `recall` goes to `measure_recall` (queries,
    stride, local, layers). Measured choice and its effect on held-out text: BENCHMARKS.md (issue 10)."""
    if not config.rotate:
        raise ValueError("calibrate_rotation: the config does not rotate (rotate=False): nothing to choose")
    variants = {f"rot{b or 'full'}": replace(config, rotate_block=b) for b in blocks}
    rows = measure_recall(model, ids, ks=ks, variants=variants, progress=progress, **recall)
    chosen = choose_per_layer(rows, {b: [f"rot{b or 'full'}"] for b in blocks})
    return {layer: variants[f"rot{b or 'full'}"] for layer, b in chosen.items()}


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
