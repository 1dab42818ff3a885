"""Fused Gumbel-max sampling: temperature, counter-based noise and argmax in one pass over the logits.

The engine samples a token per row with the Gumbel-max trick,

    token = argmax_v  score_v,   score_v = x_v * inv_t + g_v   if x_v >= thr (else -inf)
    g_v   = -log(-log u_v),      u_v = (m_v + 0.5) * 2^-23,  m_v = hash(seed, slot, row, v) >> 9

which draws v with probability softmax(x * inv_t)_v restricted to the kept tokens (x_v >= thr, the
top-k / top-p threshold of `keep_threshold`). x is the float32 logit, inv_t = float32(1 / temperature).

The definition, exactly (both implementations compute these same bits):

    hash32      Wellons' lowbias32 on 32-bit integers: x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15;
                x *= 0x846CA68B; x ^= x >> 16 (products mod 2^32)
    key         hash32(hash32(hash32(seed) ^ slot) ^ row)       (seed, slot, row taken mod 2^32)
    m_v         hash32(hash32(key + v) ^ key) >> 9              (23 bits; the outer key breaks shifts
                                                                 between neighbouring rows' keys)
    u_v         (float32(m_v) + 0.5) * 2^-23, exact: in [2^-24, 1 - 2^-24], never 0 or 1. (24 bits,
                (m + 0.5) * 2^-24, would round m = 2^24 - 1 up to u = 1: log u = 0 and infinite noise,
                a uniformly random token once in ~2^24 draws per token; the engine's first sampler did that.)
    log_f32     log of a positive normal float32 from IEEE float32 ops alone (no library log, whose
                last bit differs between CPU libm, CUDA's logf and Triton's lowering):
                    x = 2^e m with m in [sqrt(1/2), sqrt(2)]  (exponent and mantissa bits; m halved
                                                               and e + 1 when m > float32(sqrt 2))
                    f = m - 1 (exact), z = f / (f + 2) (IEEE divide), z2 = z * z
                    p = ((((z2 * c9 + c7) * z2 + c5) * z2 + c3) * z2 + 1)     c_k = float32(1/k)
                    log x = e * float32(ln 2) + (z + z) * p
                each operation rounded to float32 in this order (no fused multiply-add); 2 atanh(z)
                truncated after z^9 leaves < 3e-9 relative error, so log_f32 is within ~2 ulp of log.
    g_v         0 - log_f32(0 - log_f32(u_v))   (written as subtractions from +0: Triton's unary minus is
                                                  one, and a negation would differ in the sign of zero)
    score       (x_v * inv_t) + g_v, two roundings

Temperature is a product with the float32 reciprocal (not a division): torch on CUDA turns
`x / python_float` into that product anyway, and on the CPU it divides, so the product is the one
formulation that every device computes alike. The threshold comes from `keep_threshold`, shared by
the kernel and the twin (torch.topk / a sort + softmax + cumsum, or on CUDA the radix-select kernel
`radix_threshold`), so the kernel only compares against it; ties at the threshold are all kept.

Argmax ties go to the lowest index (torch.argmax's rule). The kernel splits a row into chunks
(program (b, s) scans chunk s with a per-lane running best, strict `>` so earlier tokens keep ties),
writes each chunk's best score and first index, and a torch argmax over the chunks picks the first
chunk holding the row's best: the two stages answer what one argmax over the row answers.

Cost: the logits are read once; per token two hashes (~16 integer ops) and two logs (~35 instructions
each with the IEEE divide) make the kernel compute-bound: on the H100, B = 256, V = 49,152, it takes
~60 us against a 17 us read floor, where the twin (and the engine's previous sampler) spends 4-6 ms on
~50 int64 passes over [B, V] (BENCHMARKS.md, "Fused sampling"). Logits must be finite or -inf (a NaN
row is undefined).
"""

from __future__ import annotations

import struct

import torch

from .fp4_gemm import _interpreting, use_triton

try:
    from . import _sampling  # imports triton
except ImportError:  # CPU installs without triton use the twins
    pass

_MASK32 = 0xFFFFFFFF
_LN2 = 0.6931471824645996  # float32(ln 2): every constant is an exact float32, the same value in Triton
_SQRT2 = 1.4142135381698608
_C3, _C5, _C7, _C9 = 0.3333333432674408, 0.20000000298023224, 0.1428571492433548, 0.1111111119389534
_INV_2_23 = 1.0 / (1 << 23)

BLOCK = 1024  # tokens per tile on the GPU (64 in the interpreter)
PROGRAMS_PER_SM = 4  # split rows into chunks until the grid has about this many programs per SM
RADIX_BLOCK = 256  # tokens per tile of the radix-select threshold kernel ([BLOCK, 16] accumulators)
RADIX_TOPK_MAX_B = 8  # top-k alone: the radix kernel up to this batch, torch.topk above (H100)


def inverse_temperature(temperature: float) -> float:
    """float32(1 / temperature) as a Python float (exactly representable in float32)."""
    if not temperature > 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    return struct.unpack("f", struct.pack("f", 1.0 / temperature))[0]


# ----------------------------------------------------------------------------------------------
# the twin (the specification)


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


def log_f32(x: torch.Tensor) -> torch.Tensor:
    """float32 x > 0 (normal) -> log x by the module docstring's definition (IEEE float32 ops in order)."""
    bits = x.view(torch.int32)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)  # [1, 2)
    big = m > _SQRT2
    m = torch.where(big, m * 0.5, m)
    e = e + big.to(torch.int32)
    f = m - 1.0
    z = f / (f + 2.0)
    z2 = z * z
    p = z2 * _C9 + _C7
    p = p * z2 + _C5
    p = p * z2 + _C3
    p = p * z2 + 1.0
    return e.float() * _LN2 + (z + z) * p


def _as_key(x, device) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.long, device=device).reshape(-1)[:1]


def row_keys(seed, slot, rows: torch.Tensor) -> torch.Tensor:
    """int64 [B] keys hash32(hash32(hash32(seed) ^ slot) ^ row); seed, slot: ints or one-element tensors."""
    seed = _as_key(seed, rows.device) & _MASK32
    slot = _as_key(slot, rows.device) & _MASK32
    return hash32(hash32(hash32(seed) ^ slot) ^ (rows.long() & _MASK32))


def gumbel_noise(shape: tuple[int, int], seed, slot, rows: torch.Tensor, device) -> torch.Tensor:
    """float32 [B, V] Gumbel(0, 1) noise g = 0 - log_f32(0 - log_f32(u)), a pure function of (seed, slot, row, v)."""
    B, V = shape
    key = row_keys(seed, slot, rows.to(device).reshape(B))[:, None]  # [B, 1]
    v = torch.arange(V, device=device, dtype=torch.long)[None, :]
    h = hash32(hash32((key + v) & _MASK32) ^ key)  # [B, V]
    return 0.0 - log_f32(0.0 - log_f32(uniform_from_hash(h)))


def uniform_from_hash(h: torch.Tensor) -> torch.Tensor:
    """int64 hashes in [0, 2^32) -> float32 u = (h >> 9 + 0.5) * 2^-23 in [2^-24, 1 - 2^-24] (exact)."""
    return ((h >> 9).float() + 0.5) * _INV_2_23


def sort_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Reference top-k / top-p filter by sort and scatter (the engine's path before `keep_threshold`): logits
    [B, V] (already times 1/T) with the tokens outside the top-k / the nucleus set to -inf. The tests hold the
    threshold to it; the sampling benchmark times it as the previous sampler."""
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


def keep_threshold(logits: torch.Tensor, top_k: int, top_p: float, inv_t: float, kernel: bool | None = None
                   ) -> torch.Tensor | None:
    """float32 [B] threshold: token v stays iff logits[b, v] >= thr[b]; None when nothing is filtered.

    top-k: the k-th largest logit (k = 0 or k >= V: no limit). top-p: over the candidates sorted
    descending (the top-k list when top_k limits, else the whole row), p = softmax(candidates * inv_t),
    n = #{i : sum_{j < i} p_j < top_p} (the most likely token always counts), thr = candidate n - 1.
    Ties with the threshold stay (possibly more than k tokens, or a little more mass than top_p).

    kernel: True runs the radix-select kernel (`radix_threshold`) instead of torch.topk / sort: the same
    top-k value exactly; the same nucleus up to float32 summation order (its sums run in the kernel's
    fixed order, not along a sorted cumsum), with the tokens tied at the top-k value all in top-p's
    normalisation. None (default) picks by the H100 measurements (BENCHMARKS.md, "Fused sampling"): on
    CUDA, the kernel for top-p alone (0.03-1.3 ms where the sort takes 0.09-3.7 ms) and for top-k alone
    at B <= RADIX_TOPK_MAX_B (torch.topk wins above); torch for top-k with top-p (the nucleus is then
    sorted among the k candidates only). Either way the sampling kernel and its twin, given one
    threshold, draw the same tokens."""
    B, V = logits.shape
    limit_k = 0 < top_k < V
    if not limit_k and top_p >= 1:
        return None
    x = logits.float()
    if kernel is None:
        kernel = logits.is_cuda and (top_p >= 1 and B <= RADIX_TOPK_MAX_B if limit_k else True)
    if kernel and use_triton(x):
        thr_k = radix_threshold(x, top_k, mass=False) if limit_k else None
        if top_p >= 1:
            return thr_k
        thr_p = radix_threshold(x, top_p, mass=True, inv_t=inv_t, lo=thr_k)
        return thr_p if thr_k is None else torch.maximum(thr_p, thr_k)
    if limit_k:
        cand = torch.topk(x, top_k, dim=-1).values  # [B, k], descending
    else:
        cand = torch.sort(x, dim=-1, descending=True).values  # [B, V]
    if top_p >= 1:
        return cand[:, -1].contiguous()
    probs = (cand * inv_t).softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the more likely candidates
    n = (before < top_p).sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
    return cand.gather(1, n - 1).squeeze(1).contiguous()


def radix_threshold(x: torch.Tensor, goal: float, *, mass: bool, inv_t: float = 1.0,
                    lo: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """float32 [B, V] -> float32 [B]: per row the largest logit value t with weight(x >= t) >= goal.

    mass=False: weight 1 per token, goal = k: t is the k-th largest logit, exactly torch.topk's value.
    mass=True: weight exp((x - max) * inv_t) of the tokens with x >= lo[b] (all without lo), goal = top_p
    times their total: t is the nucleus threshold (the most likely tokens whose mass reaches top_p; ties at
    t stay), by float32 sums in the kernel's fixed order rather than a sorted cumsum.

    A 4-bit radix select over the order-preserving 32-bit key of each logit: 8 launches, each reading the
    row once and writing per-program 16-bin weight histograms of the keys that match the prefix fixed so
    far; the next launch sums them (fixed order: deterministic), picks the digit, and so on. No sort, no
    atomics, no host sync (CUDA-graph capturable)."""
    B, V = x.shape
    dev = x.device
    x = x.float()
    x = x if x.stride(-1) == 1 else x.contiguous()
    block = block or (32 if _interpreting() else RADIX_BLOCK)
    tiles, n_split = split_plan(B, V, block, _sm_count(x))
    hist = torch.empty(8, B, n_split, 16, dtype=torch.float32, device=dev)
    prefix = torch.empty(9, B, dtype=torch.long, device=dev)
    state = torch.empty(9, B, 2, dtype=torch.float32, device=dev)
    thr = torch.empty(B, dtype=torch.float32, device=dev)
    rowmax = x.amax(-1) if mass else thr  # unread when counting
    lo_t = lo.float().contiguous() if lo is not None else thr
    nsplit = max(2, 1 << (n_split - 1).bit_length())
    for level in range(9):
        grid = (B, n_split if level < 8 else 1)
        _sampling.radix_select_kernel[grid](x, x.stride(0), V, float(inv_t), float(goal), lo_t, rowmax, hist, prefix,
                                            state, thr, B, n_split, level, BLOCK=block, TILES=tiles, NSPLIT=nsplit,
                                            MASS=mass, HAS_LO=lo is not None, num_warps=4)
    return thr


def gumbel_scores_torch(logits: torch.Tensor, inv_t: float, thr: torch.Tensor | None, seed, slot,
                        rows: torch.Tensor) -> torch.Tensor:
    """float32 [B, V] scores x * inv_t + g (or -inf where x < thr): what the kernel takes the argmax of."""
    B, V = logits.shape
    x = logits.float()
    scores = x * inv_t + gumbel_noise((B, V), seed, slot, rows, logits.device)
    if thr is not None:
        scores = scores.masked_fill(x < thr[:, None], float("-inf"))
    return scores


def gumbel_argmax_torch(logits: torch.Tensor, inv_t: float, thr: torch.Tensor | None, seed, slot,
                        rows: torch.Tensor) -> torch.Tensor:
    """Twin of `gumbel_argmax`: long [B] tokens (module docstring)."""
    return gumbel_scores_torch(logits, inv_t, thr, seed, slot, rows).argmax(-1)


# ----------------------------------------------------------------------------------------------
# the launcher


_SM_COUNT: dict[int, int] = {}


def _sm_count(t: torch.Tensor) -> int:
    if not t.is_cuda:
        return 4
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def split_plan(B: int, V: int, block: int, n_sm: int) -> tuple[int, int]:
    """(tiles per chunk, chunks per row): rows split until B * chunks reaches ~PROGRAMS_PER_SM per SM."""
    tiles = -(-V // block)
    want = max(1, -(-PROGRAMS_PER_SM * n_sm // B))
    per_chunk = -(-tiles // min(want, tiles))
    return per_chunk, -(-tiles // per_chunk)


def _device_key(x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1)[:1].to(device=device, dtype=torch.long)
    return torch.tensor([x], dtype=torch.long, device=device)


def gumbel_argmax(logits: torch.Tensor, inv_t: float | None, thr: torch.Tensor | None = None, seed=0, slot=0,
                  rows: torch.Tensor | None = None, block: int | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (float32, bf16 or fp16) -> long [B]: argmax of x * inv_t + Gumbel noise over the
    tokens with x >= thr[b] (all of them when thr is None), keyed by (seed, slot, rows[b]) as the module
    docstring defines; inv_t = None gives the greedy argmax of the logits (no noise). Triton on CUDA
    (and under TRITON_INTERPRET=1), else the twin. No host synchronisation: capturable in a CUDA graph
    when seed and slot are device tensors. `out` (long [B], e.g. a view of the decode state's tokens):
    the tokens are written there (returned too)."""
    tokens = _launch(logits, inv_t, thr, seed, slot, rows, block, scores=None, out=out)
    if out is not None and tokens is not out:
        out.copy_(tokens)
        return out
    return tokens


def gumbel_scores(logits: torch.Tensor, inv_t: float, thr: torch.Tensor | None = None, seed=0, slot=0,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [B, V]: the scores the kernel maximises, written out (for the bit-exact check against
    `gumbel_scores_torch`; the sampler never materialises them). Twin on devices without triton."""
    B, V = logits.shape
    if rows is None:
        rows = torch.arange(B, device=logits.device)
    if not use_triton(logits):
        return gumbel_scores_torch(logits, inv_t, thr, seed, slot, rows)
    scores = torch.empty(B, V, dtype=torch.float32, device=logits.device)
    _launch(logits, inv_t, thr, seed, slot, rows, None, scores=scores)
    return scores


def _launch(logits, inv_t, thr, seed, slot, rows, block, scores, out=None):
    """The kernel launch behind `gumbel_argmax` and `gumbel_scores` (scores: a [B, V] buffer or None; out:
    long [B] for the tokens, contiguous, or None)."""
    B, V = logits.shape
    dev = logits.device
    if rows is None and inv_t is not None:
        rows = torch.arange(B, device=dev)
    if scores is None and not use_triton(logits):
        if inv_t is None:
            return logits.argmax(-1)
        return gumbel_argmax_torch(logits, inv_t, thr, seed, slot, rows)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if rows is not None and rows.shape != (B,):
        raise ValueError(f"gumbel_argmax: rows must be [B] = [{B}], got {tuple(rows.shape)}")
    if thr is not None and thr.shape != (B,):
        raise ValueError(f"gumbel_argmax: thr must be [B] = [{B}], got {tuple(thr.shape)}")
    block = block or (64 if _interpreting() else BLOCK)
    tiles, n_split = split_plan(B, V, block, _sm_count(logits))
    pval = torch.empty(B, n_split, dtype=torch.float32, device=dev)
    pidx = torch.empty(B, n_split, dtype=torch.int32, device=dev)
    noise = inv_t is not None
    seed_t, slot_t = (_device_key(seed, dev), _device_key(slot, dev)) if noise else (pidx, pidx)  # greedy: unread
    rows_t = rows.long().contiguous() if noise else pidx
    thr_t = thr.float().contiguous() if thr is not None else pval  # unread without a threshold
    _sampling.gumbel_argmax_kernel[(B, n_split)](
        logits, logits.stride(0), V, float(inv_t or 1.0), thr_t, seed_t, slot_t, rows_t, pval, pidx, scores if scores is not None else pval, n_split, BLOCK=block, TILES=tiles, NOISE=noise,
        HAS_THR=noise and thr is not None, SCORES=scores is not None, num_warps=4, enable_fp_fusion=False)
    if out is None or out.shape != (B,) or out.dtype != torch.long or out.stride(0) != 1:
        out = torch.empty(B, dtype=torch.long, device=dev)
    # first chunk holding the row's best (the lowest index on ties), as a long, in one launch
    _sampling.pick_split_kernel[(B,)](pval, pidx, out, n_split, BLOCK_S=max(2, 1 << (n_split - 1).bit_length()),
                                      num_warps=1)
    return out
