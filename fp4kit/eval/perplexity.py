"""Sliding-window perplexity.

The token stream is cut into windows of `context` tokens whose starts are `stride` apart. Each
window scores only the tokens no earlier window scored (the last `stride` of it, all of the first
one), each conditioned on up to `context - 1` tokens before it:

    ppl = exp( sum of -log p(token | its context) / tokens counted )

stride == context gives disjoint windows (fast, less context per token; the first token of each
window has no context inside it and is not scored, as in Hugging Face's perplexity recipe); a
smaller stride gives every token more context at more compute. The result reports the tokens it
counted.

Models trained to always see a BOS token first (Gemma) degrade badly on windows that start
mid-text without one: with `prefix_token` every window is [prefix] + its tokens, each window's
first token is scored too (conditioned on the prefix), and the windows hold `context - 1` text
tokens. `bos_prefix(tokenizer, ids)` picks this up from a tokenizer that adds BOS. `max_tokens` limits the stream for quick checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int
    context: int
    stride: int


@torch.no_grad()
def bos_prefix(tokenizer, ids: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """(stream without its leading BOS, BOS id) when the tokenizer put one there, else (ids, None)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids.numel() and int(ids[0]) == bos:
        return ids[1:], bos
    return ids, None


def perplexity(model, token_ids: torch.Tensor, *, context: int = 512, stride: int | None = None,
               max_tokens: int | None = None, prefix_token: int | None = None, progress: bool = True,
               desc: str = "perplexity") -> PerplexityResult:
    """token_ids: [T] int. Returns the perplexity over the tokens scored."""
    span = context - (prefix_token is not None)  # text tokens per window
    stride = stride or span
    if not 0 < stride <= span:
        raise ValueError(f"need 0 < stride <= context, got stride={stride}, context={context}")
    ids = token_ids.reshape(-1)[:max_tokens] if max_tokens else token_ids.reshape(-1)
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    device = next(model.parameters()).device
    prefix = [] if prefix_token is None else [prefix_token]
    # without a prefix, token 0 has no context and is never scored
    nll, counted, scored_to = 0.0, 0, 0 if prefix else 1
    starts = list(range(0, ids.numel() - (0 if prefix else 1), stride))
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        end = min(start + span, ids.numel())
        window = torch.cat([torch.tensor(prefix, dtype=ids.dtype), ids[start:end]]).to(device).unsqueeze(0)
        logits = model(window).logits[0, :-1].float()  # predicts window[1:]
        targets = window[0, 1:]
        text_start = start - len(prefix)  # stream index of window position 0
        first = max(scored_to - text_start - 1, 0)  # skip targets an earlier window already scored
        losses = F.cross_entropy(logits[first:], targets[first:], reduction="sum")
        nll += losses.item()
        counted += targets.numel() - first
        scored_to = end
        if end == ids.numel():
            break
    return PerplexityResult(math.exp(nll / counted), nll, counted, context, stride)
