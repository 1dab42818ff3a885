"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, with a counter-based RNG.

    temperature == 0    greedy: argmax of the logits (top_k, top_p and seed are then unused)
    temperature > 0     p = softmax(logits / temperature), restricted to
                        the top_k most likely tokens (top_k = 0: no limit), then to the smallest set
                        whose probability reaches top_p (nucleus; the most likely token always stays),
                        renormalised, and drawn by the Gumbel-max trick:
                            token = argmax_v (logits_v * inv_t + g_v),  g_v = -log(-log u_v)
                        which draws v with probability p_v exactly (u uniform in (0, 1));
                        inv_t = float32(1 / temperature).

The uniforms are a pure function of (seed, slot, row, v): 32-bit integer hashes (`hash32`, Wellons'
"lowbias32" finaliser) of the four, no generator state. So sampling has fixed shapes and no host
work, and runs inside the engine's CUDA graph (the slot, the seed and the rows are device tensors
that the graph reads), like a Philox seed + offset; a prompt's draws do not depend on the other
prompts in its batch (`row` is the prompt's index in the `generate` call), nor on the batch size.
The slot (the cache slot of the query whose logits are sampled) is the offset: every step draws
fresh uniforms. 23 bits of each hash make u = (m + 0.5) / 2^23 (exact in float32, never 0 or 1), so
the Gumbel noise is resolved to ~2^-23 in u: draws are exact to that resolution
(tests/engine/test_stops_sampling.py checks the frequencies).

The arithmetic is defined to the bit in `fp4kit.kernels.sampling` (its log is built from IEEE
float32 ops, not a library log), where a fused Triton kernel (temperature, hash, noise and argmax
in one pass over the logits) sits beside its torch twin. `sample` runs the kernel on CUDA and the
twin elsewhere, both comparing against one top-k / top-p threshold (`keep_threshold`): given the
same logits, a seed gives the same tokens on either path, graph or eager
(tests/kernels/test_sampling_kernel.py), except that on CUDA top-p's boundary comes from a radix
select whose float32 sums may round a token differently from the CPU's sorted cumsum.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from fp4kit.kernels.sampling import (  # noqa: F401
    gumbel_argmax,
    gumbel_argmax_torch,
    gumbel_noise,
    hash32,
    inverse_temperature,
    keep_threshold,
)


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


GREEDY_KERNEL_MAX_B = 32


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, temperature: float = 1.0) -> torch.Tensor:
    """logits [B, V] -> logits with the tokens outside top-k / the top-p nucleus of softmax(logits / T)
    set to -inf (`keep_threshold`: ties with the threshold stay)."""
    thr = keep_threshold(logits, top_k, top_p, inverse_temperature(temperature))
    return logits if thr is None else logits.masked_fill(logits < thr[:, None].to(logits.dtype), float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, seed=0, slot=0, rows: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """logits float32 [B, V] -> token ids long [B]. seed, slot (ints or one-element int64 tensors) and rows
    (int64 [B], default 0..B-1) key the random draws (module docstring); greedy ignores them. On CUDA the
    fused Triton kernel draws the tokens, elsewhere its torch twin: the same tokens either way. `out`
    (long [B]): the tokens are written there (the decode step's token buffer: no copy kernel)."""
    B = logits.shape[0]
    if params.greedy:  # the kernel's plain argmax beats torch's up to B = 32 on the H100 (BENCHMARKS.md)
        if logits.is_cuda and B <= GREEDY_KERNEL_MAX_B:
            return gumbel_argmax(logits, None, out=out)
        return _into(logits.argmax(-1), out)
    if rows is None:
        rows = torch.arange(B, device=logits.device)
    inv_t = inverse_temperature(params.temperature)
    thr = keep_threshold(logits, params.top_k, params.top_p, inv_t)
    if logits.is_cuda:
        return gumbel_argmax(logits, inv_t, thr, seed, slot, rows, out=out)
    return _into(gumbel_argmax_torch(logits, inv_t, thr, seed, slot, rows), out)


def _into(tokens: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return tokens
    out.copy_(tokens)
    return out
