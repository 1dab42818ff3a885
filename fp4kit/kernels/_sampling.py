"""Triton kernel of `fp4kit.kernels.sampling`: temperature, hash, Gumbel noise and a running argmax in one pass.

The arithmetic follows the torch twin (`gumbel_scores_torch`) op for op: uint32 hashes here, int64 masked
to 32 bits there (the same integers); every float op a single IEEE-rounded add, multiply or divide
(`div_rn`), launched with `enable_fp_fusion=False` so that no multiply-add is contracted into an FMA.
Program (b, s) scans chunk s of row b (TILES tiles of BLOCK tokens) and writes the chunk's best score
and the first index reaching it; the launcher merges the chunks.
"""

import triton
import triton.language as tl

_LN2 = tl.constexpr(0.6931471824645996)  # float32(ln 2)
_SQRT2 = tl.constexpr(1.4142135381698608)  # float32(sqrt 2)
_C3 = tl.constexpr(0.3333333432674408)  # float32(1/3) ... float32(1/9): the atanh series
_C5 = tl.constexpr(0.20000000298023224)
_C7 = tl.constexpr(0.1428571492433548)
_C9 = tl.constexpr(0.1111111119389534)
_INV_2_23 = tl.constexpr(1.1920928955078125e-07)  # 2^-23


@triton.jit
def _hash32(x):
    """lowbias32 on uint32 (products wrap mod 2^32; shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _log_f32(x):
    """log of a positive normal float32, `log_f32` of the twin: x = 2^e m, m in [sqrt(1/2), sqrt(2)),
    log x = e ln2 + 2 atanh(z), z = (m - 1) / (m + 1), the series to z^9."""
    bits = x.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # [1, 2)
    big = m > _SQRT2
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    f = m - 1.0
    z = tl.math.div_rn(f, f + 2.0)
    z2 = z * z
    p = z2 * _C9 + _C7
    p = p * z2 + _C5
    p = p * z2 + _C3
    p = p * z2 + 1.0
    return e.to(tl.float32) * _LN2 + (z + z) * p


@triton.jit
def gumbel_argmax_kernel(logits_ptr, stride_b, V, inv_t, thr_ptr, seed_ptr, slot_ptr, rows_ptr, pval_ptr,
                         pidx_ptr, scores_ptr, n_split, BLOCK: tl.constexpr, TILES: tl.constexpr,
                         NOISE: tl.constexpr, HAS_THR: tl.constexpr, SCORES: tl.constexpr):
    # logits [B, V] (row stride stride_b, any float dtype); thr [B] float32; seed, slot [1], rows [B] int64;
    # pval [B, n_split] float32, pidx [B, n_split] int32; scores [B, V] float32 (written only when SCORES,
    # for the bit-exact check against the twin)
    b = tl.program_id(0)
    s = tl.program_id(1)
    lane = tl.arange(0, BLOCK)
    start = s * (BLOCK * TILES)
    row_ptr = logits_ptr + b.to(tl.int64) * stride_b
    key = tl.zeros([], tl.uint32)
    thr = float("-inf")
    if NOISE:
        seed = (tl.load(seed_ptr) & 0xFFFFFFFF).to(tl.uint32)
        slot = (tl.load(slot_ptr) & 0xFFFFFFFF).to(tl.uint32)
        row = (tl.load(rows_ptr + b) & 0xFFFFFFFF).to(tl.uint32)
        key = _hash32(_hash32(_hash32(seed) ^ slot) ^ row)
        if HAS_THR:
            thr = tl.load(thr_ptr + b)
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = start + lane  # a row of -inf answers its first index, as torch.argmax does
    for t in range(TILES):
        v = start + t * BLOCK + lane
        mask = v < V
        x = tl.load(row_ptr + v, mask=mask, other=float("-inf")).to(tl.float32)
        score = x
        if NOISE:
            h = _hash32(_hash32(key + v.to(tl.uint32)) ^ key)
            u = ((h >> 9).to(tl.float32) + 0.5) * _INV_2_23  # (0, 1): 23 bits + 0.5 are exact in float32
            g = 0.0 - _log_f32(0.0 - _log_f32(u))  # Triton's unary minus is 0 - x: the twin writes it out too
            score = x * inv_t + g
            if HAS_THR:
                score = tl.where(x >= thr, score, float("-inf"))
        if SCORES:
            tl.store(scores_ptr + b.to(tl.int64) * V + v, score, mask=mask)
        better = score > best_v  # strict: the earlier token keeps a tie
        best_v = tl.where(better, score, best_v)
        best_i = tl.where(better, v, best_i)
    top = tl.max(best_v, 0)
    first = tl.min(tl.where(best_v == top, best_i, 2147483647), 0)
    tl.store(pval_ptr + b * n_split + s, top)
    tl.store(pidx_ptr + b * n_split + s, first)


@triton.jit
def pick_split_kernel(pval_ptr, pidx_ptr, out_ptr, n_split, BLOCK_S: tl.constexpr):
    # grid (B,): out[b] (int64) = pidx[b, s] of the first split s holding the row's best pval (the lowest
    # token index on ties, as the splits are in token order): torch's argmax + gather + long in one launch
    b = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    m = s < n_split
    v = tl.load(pval_ptr + b * n_split + s, mask=m, other=float("-inf"))
    top = tl.max(v, 0)
    first = tl.min(tl.where((v == top) & m, s, BLOCK_S), 0)
    tl.store(out_ptr + b, tl.load(pidx_ptr + b * n_split + first).to(tl.int64))



@triton.jit
def _order_key(x):
    """float32 -> uint32 whose unsigned order is the float order (-inf lowest)."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)  # (not ~: the interpreter)


@triton.jit
def radix_select_kernel(x_ptr, stride_b, V, inv_t, goal, lo_ptr, rowmax_ptr, hist_ptr, prefix_ptr, mass_ptr,
                        thr_ptr, B, n_split, level, BLOCK: tl.constexpr, TILES: tl.constexpr,
                        NSPLIT: tl.constexpr, MASS: tl.constexpr, HAS_LO: tl.constexpr):
    # One level of a 4-bit radix select of the threshold key of row b (8 levels + a final select).
    # x [B, V] float32; hist [8, B, n_split, 16] float32 (partial per-digit weights of each level);
    # prefix [9, B] int64 (the key's fixed high bits after each level); mass [9, B, 2] float32 (weight of
    # keys above the prefix, goal weight); thr [B] float32 (written at level 8).
    # Weight: 1 per token (top-k: goal = k) or exp((x - rowmax) * inv_t) of tokens >= lo (top-p: goal =
    # p times the total, known after level 0). The key t kept is the largest with weight(key >= t) >= goal.
    b = tl.program_id(0)
    s = tl.program_id(1)
    digits = tl.arange(0, 16)
    prefix = tl.zeros([], tl.int64)
    above = tl.zeros([], tl.float32)
    target = goal + tl.zeros([], tl.float32)
    if level > 0:  # select the previous level's digit from its per-program partial histograms
        prefix = tl.load(prefix_ptr + (level - 1) * B + b)
        above = tl.load(mass_ptr + ((level - 1) * B + b) * 2)
        target = tl.load(mass_ptr + ((level - 1) * B + b) * 2 + 1)
        parts = tl.arange(0, NSPLIT)
        h = tl.load(hist_ptr + (((level - 1) * B + b) * n_split + parts[:, None]) * 16 + digits[None, :],
                    mask=parts[:, None] < n_split, other=0.0)
        h = tl.sum(h, 0)  # [16]
        if MASS:  # noqa: SIM102 (a constexpr test around a run-time one)
            if level == 1:
                target = goal * tl.sum(h, 0)
        at_or_above = tl.cumsum(h, 0, reverse=True)  # weight of digits >= d
        d = tl.maximum(tl.sum((above + at_or_above >= target).to(tl.int32), 0) - 1, 0)
        above = above + tl.sum(tl.where(digits > d, h, 0.0), 0)
        prefix = prefix | (d.to(tl.int64) << (32 - 4 * level))
    if s == 0:
        tl.store(prefix_ptr + level * B + b, prefix)
        tl.store(mass_ptr + (level * B + b) * 2, above)
        tl.store(mass_ptr + (level * B + b) * 2 + 1, target)
    if level == 8:
        key = prefix.to(tl.uint32)
        bits = tl.where((key >> 31) == 1, key & 0x7FFFFFFF, key ^ 0xFFFFFFFF)
        tl.store(thr_ptr + b, bits.to(tl.float32, bitcast=True))
    else:
        shift = 28 - 4 * level
        hi = (prefix >> (shift + 4)).to(tl.uint32)
        row_ptr = x_ptr + b.to(tl.int64) * stride_b
        lane = tl.arange(0, BLOCK)
        lo = float("-inf")
        if HAS_LO:
            lo = tl.load(lo_ptr + b)
        rowmax = 0.0
        if MASS:
            rowmax = tl.load(rowmax_ptr + b)
        acc = tl.zeros([BLOCK, 16], tl.float32)
        for t in range(TILES):
            v = (s * TILES + t) * BLOCK + lane
            x = tl.load(row_ptr + v, mask=v < V, other=float("-inf"))
            key = _order_key(x)
            live = v < V
            if level > 0:
                live = live & ((key >> (shift + 4)) == hi)
            if tl.sum(live.to(tl.int32), 0) > 0:  # past the first levels most tiles hold no key of the prefix
                if MASS:
                    w = tl.where(live & (x >= lo), tl.exp((x - rowmax) * inv_t), 0.0)
                else:
                    w = tl.where(live, 1.0, 0.0)
                digit = ((key >> shift) & 15).to(tl.int32)
                acc += tl.where(digit[:, None] == digits[None, :], w[:, None], 0.0)
        tl.store(hist_ptr + ((level * B + b) * n_split + s) * 16 + digits, tl.sum(acc, 0))
