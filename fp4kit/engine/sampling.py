"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, with a counter-based RNG.

    temperature == 0    greedy: argmax of the logits (top_k, top_p and seed are then unused)
    temperature > 0     p = softmax(logits / temperature), restricted to
                        the top_k most likely tokens (top_k = 0: no limit), then to the smallest set
                        whose probability reaches top_p (nucleus; the most likely token always stays),
                        renormalised, and drawn by the Gumbel-max trick:
                            token = argmax_v (logits_v / temperature + g_v),  g_v = -log(-log u_v)
                        which draws v with probability p_v exactly (u uniform in (0, 1)).

The uniforms are a pure function of (seed, slot, row, v): 32-bit integer hashes (`hash32`, Wellons'
"lowbias32" finaliser) of the four, no generator state. So sampling has fixed shapes and no host
work, and runs inside the engine's CUDA graph (the slot, the seed and the rows are device tensors
that the graph reads), like a Philox seed + offset; the same call with the same seed gives the same
tokens on any device, graph or eager; and a prompt's draws do not depend on the other prompts in
its batch (`row` is the prompt's index in the `generate` call), nor on the batch size. The slot
(the cache slot of the query whose logits are sampled) is the offset: every step draws fresh
uniforms. 24 bits of each hash make u = (h + 0.5) / 2^24, so the Gumbel noise is resolved to
~2^-24 in u: draws are exact to that resolution (tests/engine/test_stops_sampling.py checks the
frequencies).
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


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32): in 16-bit halves, so no int64 product overflows."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 integer hash of int64 x in [0, 2^32) -> int64 in [0, 2^32) (any device)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(shape: tuple[int, int], seed, slot, rows: torch.Tensor, device) -> torch.Tensor:
    """float32 [B, V] Gumbel(0, 1) noise, a pure function of (seed, slot, row, v) (module docstring).
    seed, slot: ints or int64 tensors of one element; rows: int64 [B]."""
    B, V = shape
    seed = torch.as_tensor(seed, dtype=torch.long, device=device).reshape(1, 1) & _MASK32
    slot = torch.as_tensor(slot, dtype=torch.long, device=device).reshape(1, 1) & _MASK32
    key = hash32(hash32(hash32(seed) ^ slot) ^ (rows.reshape(B, 1) & _MASK32))  # [B, 1]
    v = torch.arange(V, device=device, dtype=torch.long)[None, :]
    h = hash32(hash32((key + v) & _MASK32) ^ key)  # [B, V]; the outer key breaks shifts between rows' keys
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))  # (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def sample(logits: torch.Tensor, params: SamplingParams, seed=0, slot=0, rows: torch.Tensor | None = None
           ) -> torch.Tensor:
    """logits float32 [B, V] -> token ids long [B]. seed, slot (ints or one-element int64 tensors) and rows
    (int64 [B], default 0..B-1) key the random draws (module docstring); greedy ignores them."""
    if params.greedy:
        return logits.argmax(-1)
    B, V = logits.shape
    if rows is None:
        rows = torch.arange(B, device=logits.device)
    scores = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    return (scores + gumbel_noise((B, V), seed, slot, rows, logits.device)).argmax(-1)
