"""The FP4 lightning indexer: which keys each query attends to, chosen by cheap FP4 scores.

Sparse attention (DeepSeek-V3.2 / V4) lets each query attend to k keys out of L. A cheap indexer
scores every key, the top k are kept, and attention runs over those alone. Here the indexer is
the model's own attention, so existing models need no retraining:

    DOT   score[t, j] = sum_{h in group g} q_h[t] . k_g[j] = (sum_h q_h[t]) . k_g[j]
    RELU  score[t, j] = sum_{h in group g} w_h relu(q_h[t] . k_g[j])      (DeepSeek's index form)

with post-RoPE queries and keys (the ones attention uses), one selection per KV head shared by its
query heads (GQA). DOT sums the group's queries first: one index query per KV head, one dot per key.

FP4, as DeepSeek-V4 runs its indexer: rotate Q and K by the orthonormal Hadamard matrix H over the
head dim (q H . k H = q . k, but the rotation spreads outlier channels over the whole vector so FP4
loses less), quantize both to MXFP4 (blocks of 32, E8M0 scale rounded up: `ScaleRule.RCEIL`) or
NVFP4, and keep the scores in bf16. FP4 keys cost D/2 + D/32 bytes against 2D for bf16, and the
key scan is what a long-context decode step pays for (see `fp4kit.kernels.fp4_topk`).

Selection for the query at position t (keys j <= t are causal):

    forced    j < sink  or  j > t - window        always kept (first tokens, a sliding window)
    stage 1   the top r*k of the other causal keys by the (FP4, bf16) index score
    stage 2   the top k of those candidates by the exact score (float32 query . bf16 keys)
    r = 1     single stage: the top k by the index score

Equal scores go to the lower position, in both stages, so a selection is a function of its inputs.
Measured on SmolLM2 (the issue): FP4 single-stage keeps 88-94% of the exact top-k set but 99.2-99.95%
of its attention mass; the rerank with r = 2 recovers >= 99.7% of the set, for r*k bf16 keys read.

Two paths compute the same selection: `select_mask` (all queries of a prefill at once, a boolean
mask [B, Hkv, Tq, Tk] for evaluation) and `select_decode` (one query per sequence over an
`FP4KeyCache`, through the Triton kernels: the decode path).

Rotation size (`rotate_block`). The full head-dim Hadamard (None) spreads every channel over all D; a
block Hadamard R = I_{D/b} (x) H_b (`fp4kit.nn.rotation`'s construction; b = 32, one MXFP4 block, the
default) spreads a channel only within its own block. Both are orthonormal (q R . k R = q . k). The full
one also evens out the blocks' scales; that hurts when the keys' variance and the query's energy sit in
*different* blocks: Gemma-3's global layer 11 keeps 95% of its key variance in two blocks (the
lowest-frequency RoPE dims, theta 1e6) while its index query reads a third, and the full rotation moves
those blocks' FP4 error into it (score noise 0.27 -> 0.47; benchmarks/sparse_rotation_diag.py).

Key centering (`center_keys`). Keys share a large mean (Gemma-3: 63-67% of the key energy on its
global layers 5/11, SmolLM2 45-61%): a bias that sets the FP4 block scales but does not rank keys.
Subtract a per-(sequence, KV head) mean key mu before rounding:

    q . (k_j - mu) = q . k_j - q . mu        q . mu is the same for every key j of one query

so the exact top-k is unchanged (ties included: every score of a query moves by one constant) and
only the quantization error changes: the FP4 step now follows the part of k that differs between
keys. The exact rerank reads the uncentered bf16 keys, unchanged. It holds for DOT only: RELU's
relu(q_h . k - q_h . mu) is not a shift of relu(q_h . k), so RELU rejects `center_keys`.

Which mean. Keys already in the packed cache were quantized against some mu; a running mean over all
cached keys would move with every appended token and invalidate them (or leave keys centered on
different means, whose scores then differ by q . (mu_i - mu_j) and are no longer comparable). So mu is
fixed once, at the first `FP4KeyCache.append` (the prefill, as NVFP4's global scale is): the mean of
the prefill's keys (its first `center_tokens` when set), or passed in (`FP4KeyCache(..., key_mean=...)`,
e.g. a per-layer/head mean from calibration text). Any mu keeps the top-k exact, but a wrong mu adds
error instead of removing it, and post-RoPE keys make "wrong" position-dependent: their shared part
rotates with position (a RoPE pair of frequency w turns by w * (j - i)), so a mean over one stretch
of positions fits keys near it and the slow pairs only. Over positions 0..L-1 the plain mean is the mu
that minimizes the mean squared residual (and it averages fast-turning pairs to ~0 by itself), hence
the whole prefill by default. Measured at 8,192 tokens (benchmarks/sparse_center_mean.py; CoQA, block-32
MXFP4 top-64 set recall, queries after a 6,144-key prefill): the mean of the first 1,024 keys lost
SmolLM2 2.2 points (88.6 -> 86.4); the whole-prefill mean is within -0.3..+0.4 there and +4.7 on
Gemma-3's global layers (77.4 -> 82.1); the mean of the prefill's last 1,024 keys scored best on
SmolLM2 (89.2) but goes stale the same way as decoding moves on. `select_mask` centers on the mean
of the keys it is given (their first `center_tokens`), i.e. the cache's mean at the prefill; pass
`key_mean` to reproduce a cache during decode. Costs: one D-vector per (sequence, KV head) and one
subtraction per key on append; the kernels read packed keys and are unchanged (centering happens
before packing).

The defaults (b = 32, centering on the prefill's mean) are measured (CoQA, 2,048 tokens, the last
1,024 queries after a 1,024-key prefill, MXFP4 top-64 set recall, mean over layers and heads):
SmolLM2 87.4 (full rotation, uncentered) -> 89.0 (b = 32, centered), r = 2: 99.27 -> 99.49; Gemma-3
global layers 71.6 -> 80.8, r = 2: 90.8 -> 96.8; Gemma-3 local layers 91.3 -> 92.2. At 2K centering
raised every rotated FP4 variant on both models (bf16: -0.05..+0.20); b = 32 is level with the full
rotation on SmolLM2 and on Gemma-3's local layers and better on its global ones on average, though
not on every layer (Gemma-3 layer 17 prefers the full rotation: 79.6 against 74.6 centered).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import torch

from fp4kit.formats import MXFP4Config, NVFP4Config, ScaleRule, quantize_mxfp4, quantize_nvfp4
from fp4kit.kernels.fp4_topk import KeyCacheView, KeyFormat, index_topk, index_topk_rerank, topk_order_torch
from fp4kit.nn.rotation import hadamard


class IndexScore(enum.Enum):
    """The index form (formulas in the module docstring)."""

    DOT = "dot"  # (sum_h q_h) . k: the model's own attention logits summed over the group
    RELU = "relu"  # sum_h w_h relu(q_h . k): DeepSeek's lightning indexer


class IndexPrecision(enum.Enum):
    """What Q and K are rounded to before the index scores (scores are bf16 unless FP32)."""

    FP32 = "fp32"  # the reference: float32 Q, K and scores
    BF16 = "bf16"  # bf16 Q and K, bf16 scores
    MXFP4 = "mxfp4"  # MXFP4 (block 32, RCEIL) Q and K, bf16 scores: DeepSeek-V4
    NVFP4 = "nvfp4"  # NVFP4 (block 16, UE4M3 scales, per-tensor global scale) Q and K, bf16 scores


@dataclass(frozen=True)
class IndexerConfig:
    """top_k: keys chosen by score per query and KV head; rerank: r (stage one keeps r*top_k, 1 = off);
    sink / window: first / newest keys always kept on top of top_k; rotate: Hadamard before rounding;
    rotate_block: its size b (block-diagonal H_b; None or b >= head dim: the full head-dim rotation);
    center_keys: subtract the mean of the prefill's keys (its first `center_tokens`, None: all) before
    rounding (DOT only).
    Defaults (b = 32, centering on) from the recall measurements in the module docstring."""

    top_k: int = 256
    precision: IndexPrecision = IndexPrecision.MXFP4
    rotate: bool = True
    rerank: int = 2
    sink: int = 0
    window: int = 0
    score: IndexScore = IndexScore.DOT
    rotate_block: int | None = 32
    center_keys: bool = True
    center_tokens: int | None = None

    def __post_init__(self):
        if not isinstance(self.precision, IndexPrecision) or not isinstance(self.score, IndexScore):
            raise TypeError("IndexerConfig.precision / score must be IndexPrecision / IndexScore members")
        for name in ("top_k", "rerank"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.center_tokens is not None and self.center_tokens < 1:
            raise ValueError(f"IndexerConfig.center_tokens must be None (all) or >= 1, got {self.center_tokens}")
        for name in ("sink", "window"):
            if getattr(self, name) < 0:
                raise ValueError(f"IndexerConfig.{name} must be >= 0, got {getattr(self, name)}")
        b = self.rotate_block
        if b is not None:
            if not isinstance(b, int) or isinstance(b, bool) or b < 2 or b & (b - 1):
                raise ValueError(f"IndexerConfig.rotate_block must be None or a power of two >= 2, got {b!r}")
        if self.center_keys and self.score is IndexScore.RELU:
            raise ValueError("IndexerConfig.center_keys keeps the top-k exact only for IndexScore.DOT (relu does not "
                             "pass a per-query shift through); set center_keys=False with IndexScore.RELU")

    @property
    def candidates(self) -> int:
        return self.top_k * self.rerank

    @property
    def fp4_config(self) -> MXFP4Config | NVFP4Config | None:
        if self.precision is IndexPrecision.MXFP4:
            return MXFP4Config(ScaleRule.RCEIL)
        if self.precision is IndexPrecision.NVFP4:
            return NVFP4Config()
        return None


# ----------------------------------------------------------------------------------------------
# rotation and rounding


@functools.lru_cache(maxsize=8)
def _hadamard64(n: int) -> torch.Tensor:
    return hadamard(n, torch.float64)


def hadamard_rotate(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """x [..., D] -> x R (float32): R = I_{D/b} (x) H_b, H_b the orthonormal Sylvester-Hadamard matrix of size
    b = min(`block`, D) (None: b = D, the full rotation). Computed in float64, rounded once."""
    D = x.shape[-1]
    b = D if block is None else min(block, D)
    if b & (b - 1) or D % b:
        raise ValueError(f"Hadamard rotation of block {b} needs a power-of-two block dividing the head dim {D}")
    h = _hadamard64(b).to(x.device)
    if b == D:
        return (x.double() @ h).float()
    return (x.double().reshape(*x.shape[:-1], D // b, b) @ h).reshape(x.shape).float()


def key_mean(k: torch.Tensor, config: IndexerConfig) -> torch.Tensor:
    """k [..., T, D] -> the centering mean [..., 1, D] float32: the mean of the first `center_tokens` keys (all
    T when None), summed in float64 (so the value does not depend on how the keys are laid out)."""
    return k[..., : config.center_tokens, :].double().mean(-2, keepdim=True).float()


def subtract_key_mean(k: torch.Tensor, config: IndexerConfig, mean: torch.Tensor | None = None) -> torch.Tensor:
    """k [..., T, D] -> float32 keys, minus `mean` [..., 1, D] (default `key_mean(k)`) if the config centers."""
    if not config.center_keys:
        return k.float()
    return k.float() - (key_mean(k, config) if mean is None else mean.float())


def round_index(x: torch.Tensor, config: IndexerConfig, *, name: str = "index tensor") -> torch.Tensor:
    """x [..., D] -> the float32 values the index scores see: rotated if asked, rounded to the precision.
    FP4 is the core codecs' quantize then dequantize (NVFP4: one global scale for all of x)."""
    x = x.float()
    if config.rotate:
        x = hadamard_rotate(x, config.rotate_block)
    if config.precision is IndexPrecision.BF16:
        return x.bfloat16().float()
    if config.precision is IndexPrecision.MXFP4:
        return quantize_mxfp4(x, config.fp4_config, name=name).dequantize()
    if config.precision is IndexPrecision.NVFP4:
        return quantize_nvfp4(x, config.fp4_config, name=name).dequantize()
    return x


def group_queries(q: torch.Tensor, n_kv_heads: int, score: IndexScore) -> torch.Tensor:
    """q [B, Hq, T, D] -> index queries [B, Hkv, Hi, T, D] float32: DOT sums each group (Hi = 1)."""
    B, Hq, T, D = q.shape
    if Hq % n_kv_heads:
        raise ValueError(f"{Hq} query heads do not split into {n_kv_heads} KV heads")
    q = q.float().reshape(B, n_kv_heads, Hq // n_kv_heads, T, D)
    return q.sum(dim=2, keepdim=True) if score is IndexScore.DOT else q


def _combine(dots: torch.Tensor, score: IndexScore, head_weights) -> torch.Tensor:
    """dots [B, Hkv, Hi, Tq, Tk] float64 -> [B, Hkv, Tq, Tk]."""
    if score is IndexScore.DOT:
        return dots[:, :, 0]
    w = torch.ones(dots.shape[2], dtype=dots.dtype, device=dots.device) if head_weights is None else head_weights
    return torch.einsum("bghqk,h->bgqk", dots.relu(), w.to(dots))


def index_keys(k: torch.Tensor, config: IndexerConfig, *, mean: torch.Tensor | None = None) -> torch.Tensor:
    """k [..., T, D] -> the keys the index scores see (float32): centered if asked, then `round_index`."""
    return round_index(subtract_key_mean(k, config, mean), config, name="index keys")


def index_scores(q: torch.Tensor, k: torch.Tensor, config: IndexerConfig, head_weights=None, *,
                 key_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Index scores [B, Hkv, Tq, Tk]: bf16 (float32 for FP32). q [B, Hq, Tq, D], k [B, Hkv, Tk, D] post-RoPE;
    key_mean [B, Hkv, 1, D]: the centering mean (default: `key_mean(k)`; unused without center_keys).
    The dot products are exact (float64) over the rounded Q and K, then rounded once to float32."""
    qi = round_index(group_queries(q, k.shape[1], config.score), config, name="index queries")
    ki = index_keys(k, config, mean=key_mean)
    s = _combine(torch.einsum("bghqd,bgkd->bghqk", qi.double(), ki.double()), config.score, head_weights).float()
    return s if config.precision is IndexPrecision.FP32 else s.bfloat16()


def exact_scores(q: torch.Tensor, k: torch.Tensor, config: IndexerConfig, head_weights=None) -> torch.Tensor:
    """The rerank's scores [B, Hkv, Tq, Tk] float32: float32 index queries against the bf16 keys."""
    qi = group_queries(q, k.shape[1], config.score)
    dots = torch.einsum("bghqd,bgkd->bghqk", qi.double(), k.bfloat16().double())
    return _combine(dots, config.score, head_weights).float()


# ----------------------------------------------------------------------------------------------
# prefill / evaluation path: a boolean mask for every query


def causal_masks(Tq: int, Tk: int, config: IndexerConfig, *, sliding_window: int | None = None, device=None):
    """(eligible, forced) bool [Tq, Tk]: queries at positions Tk-Tq..Tk-1. `sliding_window` restricts
    the causal keys to the newest `sliding_window` (Gemma's local layers)."""
    t = torch.arange(Tk - Tq, Tk, device=device).unsqueeze(1)
    j = torch.arange(Tk, device=device).unsqueeze(0)
    causal = j <= t
    if sliding_window is not None:
        causal &= j > t - sliding_window
    forced = causal & ((j < config.sink) | (j > t - config.window))
    return causal & ~forced, forced


def _rank(values: torch.Tensor, ok: torch.Tensor, n: int) -> torch.Tensor:
    return topk_order_torch(torch.where(ok, values, torch.full_like(values, float("-inf"))), n)


def select_from_scores(scores: torch.Tensor, config: IndexerConfig, *, exact: torch.Tensor | None = None,
                       sliding_window: int | None = None) -> torch.Tensor:
    """Selection mask [B, Hkv, Tq, Tk] (True = attend) from index scores (and exact scores for r > 1)."""
    Tq, Tk = scores.shape[-2:]
    eligible, forced = causal_masks(Tq, Tk, config, sliding_window=sliding_window, device=scores.device)
    eligible = eligible.expand_as(scores)
    n1 = min(config.candidates if exact is not None else config.top_k, Tk)
    cand = _rank(scores, eligible, n1)  # [.., Tq, n1] best first
    if exact is not None and config.rerank > 1:
        cand = cand.sort(dim=-1).values  # by position, so equal exact scores go to the lower position
        ok = eligible.gather(-1, cand)
        order = _rank(exact.gather(-1, cand), ok, min(config.top_k, n1))
        cand = cand.gather(-1, order)
    cand = cand[..., : config.top_k]
    chosen = torch.zeros_like(eligible).scatter(-1, cand, eligible.gather(-1, cand))
    return chosen | forced


def select_mask(q: torch.Tensor, k: torch.Tensor, config: IndexerConfig, *, head_weights=None,
                sliding_window: int | None = None, key_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each query attends to: bool [B, Hkv, Tq, Tk] (q [B, Hq, Tq, D], k [B, Hkv, Tk, D]);
    key_mean [B, Hkv, 1, D] as in `index_scores`."""
    scores = index_scores(q, k, config, head_weights, key_mean=key_mean)
    exact = exact_scores(q, k, config, head_weights) if config.rerank > 1 else None
    return select_from_scores(scores, config, exact=exact, sliding_window=sliding_window)


# ----------------------------------------------------------------------------------------------
# decode path: a packed FP4 key cache and the kernels


class FP4KeyCache:
    """The indexer's keys for one layer, packed FP4, beside the attention KV cache; grows by doubling.

        data   uint8 [B * Hkv, capacity, D/2]    rotated keys' E2M1 codes, two per byte
        scale  uint8 [B * Hkv, capacity, D/bs]   E8M0 codes (MXFP4) or UE4M3 bits (NVFP4)

        key_mean float32 [B, Hkv, 1, D]           the centering mean (center_keys), else None

    Each key vector is quantized on `append` (MXFP4 blocks lie inside one vector, so appending a
    token at a time gives the bytes of quantizing the whole sequence at once). NVFP4's per-tensor
    global scale is fixed by the first append (the prefill) and reused after: keys larger than the
    prefill's saturate their block scale at 448. So is the centering mean (the mean of the prefill's
    first `center_tokens` keys), unless `key_mean` ([Hkv, D] or [B, Hkv, D], e.g. from calibration
    text) is given: every stored key is k - key_mean, rotated and rounded."""

    def __init__(self, config: IndexerConfig, batch: int, n_kv_heads: int, head_dim: int, *, capacity: int = 256,
                 device=None, key_mean: torch.Tensor | None = None):
        if config.fp4_config is None:
            raise ValueError(f"FP4KeyCache needs an FP4 precision, got {config.precision}")
        if key_mean is not None and not config.center_keys:
            raise ValueError("FP4KeyCache: key_mean given but the config has center_keys=False")
        if key_mean is not None and key_mean.shape[-2:] != (n_kv_heads, head_dim):
            raise ValueError(f"FP4KeyCache: key_mean must be [Hkv={n_kv_heads}, D={head_dim}] or "
                             f"[B, Hkv, D], got {tuple(key_mean.shape)}")
        self.config, self.fp4 = config, config.fp4_config
        self.batch, self.n_kv_heads, self.head_dim, self.length = batch, n_kv_heads, head_dim, 0
        R, bs = batch * n_kv_heads, self.fp4.block_size
        self.data = torch.zeros(R, capacity, head_dim // 2, dtype=torch.uint8, device=device)
        self.scale = torch.zeros(R, capacity, head_dim // bs, dtype=torch.uint8, device=device)
        self.global_scale = None
        self.key_mean = None
        if key_mean is not None:
            self.key_mean = key_mean.float().to(device).expand(batch, n_kv_heads, head_dim).unsqueeze(2).clone()

    def _grow(self, need: int) -> None:
        cap = self.data.shape[1]
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        for name in ("data", "scale"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], cap, old.shape[2])
            new[:, : self.length] = old[:, : self.length]
            setattr(self, name, new)

    def append(self, k: torch.Tensor) -> None:
        """k [B, Hkv, T, D] post-RoPE keys (any float dtype)."""
        B, H, T, D = k.shape
        if (B, H, D) != (self.batch, self.n_kv_heads, self.head_dim):
            raise ValueError(f"FP4KeyCache holds [B={self.batch}, Hkv={self.n_kv_heads}, D={self.head_dim}] "
                             f"keys, got {tuple(k.shape)}")
        if self.config.center_keys and self.key_mean is None:
            self.key_mean = key_mean(k, self.config)  # fixed by the prefill: keys stored before stay valid
        x = subtract_key_mean(k, self.config, self.key_mean)
        x = hadamard_rotate(x, self.config.rotate_block) if self.config.rotate else x
        x = x.reshape(B * H, T, D)
        if isinstance(self.fp4, NVFP4Config):
            if self.global_scale is None:
                qt = quantize_nvfp4(x, self.fp4, name="index keys")
                self.global_scale = qt.global_scale
            else:
                qt = quantize_nvfp4(x, self.fp4, global_scale=self.global_scale, name="index keys")
        else:
            qt = quantize_mxfp4(x, self.fp4, name="index keys")
        self._grow(self.length + T)
        self.data[:, self.length: self.length + T] = qt.data
        self.scale[:, self.length: self.length + T] = qt.scale.view(torch.uint8)
        self.length += T

    def view(self) -> KeyCacheView:
        fmt = KeyFormat.NVFP4 if isinstance(self.fp4, NVFP4Config) else KeyFormat.MXFP4
        L = self.length
        return KeyCacheView(fmt, self.data[:, :L], self.scale[:, :L], self.global_scale, self.fp4)

    @property
    def nbytes(self) -> int:
        return self.length * self.data.shape[0] * (self.data.shape[2] + self.scale.shape[2])


def _round_query(q_index: torch.Tensor, config: IndexerConfig, cache: FP4KeyCache | None) -> torch.Tensor:
    """Index query [R, D] as the kernels read it: rotated and rounded like the keys."""
    x = hadamard_rotate(q_index, config.rotate_block) if config.rotate else q_index
    if config.precision is IndexPrecision.MXFP4:
        return quantize_mxfp4(x, config.fp4_config, name="index query").dequantize()
    if config.precision is IndexPrecision.NVFP4:
        return quantize_nvfp4(x, config.fp4_config, name="index query").dequantize()
    return x.bfloat16().float() if config.precision is IndexPrecision.BF16 else x


def select_decode(q: torch.Tensor, keys: torch.Tensor, config: IndexerConfig, *,
                  fp4_cache: FP4KeyCache | None = None) -> torch.Tensor:
    """Keys one decode step attends to: int64 [B, Hkv, n] positions (forced keys included), for the
    query at the last position. q [B, Hq, D] post-RoPE; keys [B, Hkv, L, D] the attention cache's keys.
    FP4 precisions read `fp4_cache` (which must hold the same L keys, centered on its own mean); BF16 and
    FP32 score bf16 copies of `index_keys(keys)` (centered on the mean of their first `center_tokens`,
    as `select_mask` does); the rerank reads the uncentered bf16 keys. DOT only on this path."""
    B, Hkv, L, D = keys.shape
    if config.score is not IndexScore.DOT:
        raise NotImplementedError("select_decode runs the DOT index form; use select_mask for RELU")
    if config.fp4_config is not None and (fp4_cache is None or fp4_cache.length != L):
        raise ValueError(f"{config.precision.name} selection needs an FP4KeyCache holding the {L} keys")
    q_index = group_queries(q.unsqueeze(2), Hkv, config.score).reshape(B * Hkv, D)
    lo = min(config.sink, L)
    hi = max(lo, L - config.window)
    rows = keys.reshape(B * Hkv, L, D)
    n = min(config.top_k, hi - lo)
    if n > 0:
        view = (fp4_cache.view() if fp4_cache is not None
                else KeyCacheView(KeyFormat.BF16, index_keys(keys, config).reshape(B * Hkv, L, D).bfloat16()))
        q_round = _round_query(q_index, config, fp4_cache)
        if config.rerank > 1:
            chosen = index_topk_rerank(q_round, view, q_index, rows.bfloat16(), n, config.candidates, lo=lo, hi=hi)
        else:
            chosen = index_topk(q_round, view, n, lo=lo, hi=hi)
    else:
        chosen = torch.empty(B * Hkv, 0, dtype=torch.long, device=keys.device)
    rng = functools.partial(torch.arange, device=keys.device)
    forced = torch.cat([rng(0, lo), rng(hi, L)]).expand(B * Hkv, -1)
    return torch.cat([forced[:, :lo], chosen, forced[:, lo:]], dim=1).reshape(B, Hkv, -1)
