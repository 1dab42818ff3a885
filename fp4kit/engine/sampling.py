"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, with a seeded generator.

    temperature == 0    greedy: argmax of the logits (top_k, top_p and seed are then unused)
    temperature > 0     p = softmax(logits / temperature), restricted to
                        the top_k most likely tokens (top_k = 0: no limit), then to the smallest set
                        whose probability reaches top_p (nucleus; the most likely token always stays),
                        renormalised, and drawn with `torch.multinomial` from a generator seeded with
                        `seed`: the same call with the same seed gives the same tokens.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class FinishReason(str, enum.Enum):
    """Why a completion ended; compares equal to its string value ("stop", "length", "eos")."""
    STOP = "stop"  # a stop string appeared (the text is cut before it)
    LENGTH = "length"  # max_new_tokens reached, or the cache is full
    EOS = "eos"  # the model emitted an end-of-sequence token (kept in token_ids, not in text)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = 0
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, V] -> logits with the tokens outside top-k / the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits float32 [B, V] -> token ids long [B]."""
    if params.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits / params.temperature, params.top_k, params.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
