"""Log-likelihood scoring and multiple-choice metrics, defined as lm-eval-harness defines them.

For a context c and a continuation x (tokens x_1..x_m, found by tokenizing c + x and dropping the
tokens of c, as lm-eval does):

    ll(x | c)   = sum_i log p(x_i | c, x_<i)
    is_greedy   = every x_i is the argmax of its distribution

Multiple-choice metrics over choices j with gold g:

    acc       = 1 if argmax_j ll_j == g
    acc_norm  = 1 if argmax_j ll_j / len(x_j) == g      len in characters of the continuation string
    (one-choice tasks such as LAMBADA: acc = is_greedy; tasks whose choices share one continuation,
    WinoGrande's partial scoring, report acc only, as lm-eval does)

A task's value is the mean over items; its stderr is the sample standard deviation / sqrt(n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Scored:
    loglikelihood: float
    is_greedy: bool
    tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """(tokens of context + continuation, number of continuation tokens)."""
    if not continuation:
        raise ValueError(f"empty continuation for context {context[:60]!r}")
    whole = tokenizer(context + continuation).input_ids
    n_ctx = len(tokenizer(context).input_ids)
    n_cont = len(whole) - n_ctx
    if n_cont <= 0:
        raise ValueError(f"continuation {continuation!r} adds no tokens after {context[-40:]!r}")
    return whole, n_cont


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = 16, max_length: int = 2048,
                   progress: bool = True, desc: str = "loglikelihood") -> list[Scored]:
    """Score continuation given context for each pair, batched (longest first) and right-padded."""
    device = next(model.parameters()).device
    encoded = [encode_pair(tokenizer, c, x) for c, x in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out: list[Scored | None] = [None] * len(encoded)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        seqs = [encoded[i][0][-(max_length + 1):] for i in batch]
        n_conts = [min(encoded[i][1], len(s) - 1) for i, s in zip(batch, seqs)]
        width = max(len(s) for s in seqs) - 1
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s) - 1] = torch.tensor(s[:-1])
            mask[r, : len(s) - 1] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = F.log_softmax(logits, dim=-1)
        for r, (i, s, n) in enumerate(zip(batch, seqs, n_conts)):
            end = len(s) - 1  # positions 0..end-1 predict tokens 1..end
            target = torch.tensor(s[end - n + 1: end + 1], device=device)
            lp = logp[r, end - n: end]
            chosen = lp.gather(-1, target[:, None])[:, 0]
            out[i] = Scored(chosen.sum().item(), bool((lp.argmax(-1) == target).all()), n)
    return out


def mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def item_string(values) -> str | None:
    """Per-item 0/1 scores as one string ('0110...', in item order), stored in a result record so that two runs on
    the same items can be compared pairwise (`paired_stderr`); None when a metric is not 0/1 per item."""
    vals = [float(v) for v in values]
    if any(v not in (0.0, 1.0) for v in vals):
        return None
    return "".join("1" if v else "0" for v in vals)


def paired_stderr(items: str | None, base_items: str | None) -> float | None:
    """Standard error of mean(x_i - b_i) for two runs' per-item 0/1 strings on the same items (None if absent or of
    different lengths). Both runs get the easy items right and the hard ones wrong together, so this is smaller
    than the two runs' separate standard errors combined, which count the items' difficulty twice."""
    if not items or not base_items or len(items) != len(base_items) or len(items) < 2:
        return None
    d = [int(x) - int(y) for x, y in zip(items, base_items)]
    _, se = mean_stderr(d)
    return se


def multiple_choice_metrics(items, scores_per_item: list[list[Scored]]) -> dict[str, list[float]]:
    """Per-item 0/1 values of acc (and acc_norm when items have several choices)."""
    acc, acc_norm = [], []
    for item, scores in zip(items, scores_per_item):
        if len(scores) == 1:
            acc.append(float(scores[0].is_greedy))
            continue
        lls = [s.loglikelihood for s in scores]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == item.gold))
        if len(set(item.continuations)) == 1:  # partial scoring (WinoGrande): lengths equal, acc_norm == acc
            continue
        normed = [ll / len(x) for ll, x in zip(lls, item.continuations)]
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == item.gold))
    return {"acc": acc, **({"acc_norm": acc_norm} if acc_norm else {})}


def score_multiple_choice(model, tokenizer, items, **kw) -> dict[str, list[float]]:
    pairs = [(c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
    flat = loglikelihoods(model, tokenizer, pairs, **kw)
    per_item, k = [], 0
    for it in items:
        per_item.append(flat[k: k + len(it.continuations)])
        k += len(it.continuations)
    return multiple_choice_metrics(items, per_item)
