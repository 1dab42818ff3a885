"""Triton kernel behind `fp4_moe`: the grouped W4A16 GEMM over routed (token, slot) pairs. Math in `fp4_moe`."""

import triton
import triton.language as tl

from ._fp4_bits import cast_rne
from ._fp4_gemm import decode_weight_tile, pair_order_x


@triton.jit
def _expert_tile_dot(acc, x, w_ptrs, s_ptrs, table, k0, rmask, wcol, bcol, K: tl.constexpr, BS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, MX_BF16: tl.constexpr,
                     ONE_MUL: tl.constexpr, INTERPRET: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] += x[BLOCK_M, BLOCK_K] @ dequant(W[rows, k0:k0+BLOCK_K]).T (the skinny kernel's
    decode, `_fp4_gemm.decode_weight_tile`). EVEN_K: no K masks (every split's K steps are inside K)."""
    if EVEN_K:
        words = tl.load(w_ptrs + k0 // 8, mask=rmask, other=0)
        codes = tl.load(s_ptrs + k0 // BS, mask=rmask, other=0)
    else:
        words = tl.load(w_ptrs + k0 // 8, mask=rmask & (wcol[None, :] < (K - k0) // 8), other=0)
        codes = tl.load(s_ptrs + k0 // BS, mask=rmask & (bcol[None, :] < (K - k0) // BS), other=0)
    w = decode_weight_tile(words, codes, table, x.dtype, BLOCK_N, BLOCK_K, BS, MX_BF16, ONE_MUL, INTERPRET)
    if INTERPRET:  # the interpreter multiplies bf16 bit patterns in tl.dot: give it float32
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        return tl.dot(x, tl.trans(w), acc)


@triton.jit
def fp4_moe_kernel(x_ptr, w_ptr, s_ptr, table_ptr, pairs_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                   pw_ptr, y_ptr, ws_ptr, cnt_ptr, E, P, N_OUT: tl.constexpr, K: tl.constexpr, X_DIV: tl.constexpr,
                   BS: tl.constexpr, SWIGLU: tl.constexpr, HAS_PW: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, MX_BF16: tl.constexpr,
                   ONE_MUL: tl.constexpr, INTERPRET: tl.constexpr):
    """y[p, n] = act(x[p // X_DIV] @ dequant(W[e(p)])[n].T) (* pw[p]) for every routed pair p, in one launch.

    Grid: (tiles of N_OUT, M tiles, SPLIT_K). M tile t holds up to BLOCK_M consecutive entries
    [tile_start[t], tile_end[t]) of the expert-sorted pair list, all routed to expert
    tile_expert[t]; tiles past the routed ones (the grid is an upper bound, so the host never
    waits for the counts) carry expert E and return at once. x rows are gathered by pair id
    (X_DIV = top_k: token = pair // top_k; X_DIV = 1: x is already one row per pair), and y rows
    are scattered back to pair order, so no sorted copy of x or y exists.

    SWIGLU: W is [E, 2 * N_OUT, K] with the gate rows first; the program streams gate row n and up
    row N_OUT + n together and writes silu(gate) * up (float32, one rounding), so the [P, 2I]
    intermediate never reaches memory.

    SPLIT_K > 1 (few tokens: few experts, few programs): as the dense skinny kernel, each split
    writes its float32 partials (gate and up) to ws[s, p, {gate, up}, n], takes a ticket of its
    (M tile, N tile), and the last split sums the partials in split order, applies the epilogue,
    writes y and resets the ticket.
    """
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(tile_expert_ptr + pid_t)
    if e >= E:
        return
    W: tl.constexpr = BLOCK_K // 8
    NB: tl.constexpr = BLOCK_K // BS
    N_W: tl.constexpr = 2 * N_OUT if SWIGLU else N_OUT  # weight rows per expert
    K_SPLIT: tl.constexpr = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K * BLOCK_K
    EVEN_K: tl.constexpr = K % (BLOCK_K * SPLIT_K) == 0
    HALVES: tl.constexpr = 2 if SWIGLU else 1
    start = tl.load(tile_start_ptr + pid_t)
    end = tl.load(tile_end_ptr + pid_t)
    offs_m = start + tl.arange(0, BLOCK_M)
    mmask = offs_m < end
    pairs = tl.load(pairs_ptr + offs_m, mask=mmask, other=0)  # [BLOCK_M] pair ids
    xrow = (pairs // X_DIV).to(tl.int64)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows[:, None] < N_OUT
    wcol = tl.arange(0, W)
    bcol = tl.arange(0, NB)
    kcol = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)
    k_lo = pid_k * K_SPLIT
    w_base = w_ptr + e64 * (N_W * (K // 8))
    s_base = s_ptr + e64 * (N_W * (K // BS))
    table = table_ptr + e64 * 256
    g_w = w_base + rows[:, None] * (K // 8) + wcol[None, :]
    g_s = s_base + rows[:, None] * (K // BS) + bcol[None, :]
    x_ptrs = x_ptr + xrow[:, None] * K + kcol[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, K_SPLIT, BLOCK_K):
        k0 = k_lo + kk
        if EVEN_K:
            x = tl.load(x_ptrs + k0, mask=mmask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs + k0, mask=mmask[:, None] & (kcol[None, :] < K - k0), other=0.0)
        x = pair_order_x(x, MX_BF16)
        acc = _expert_tile_dot(acc, x, g_w, g_s, table, k0, rmask, wcol, bcol, K, BS, BLOCK_N, BLOCK_K, EVEN_K,
                               MX_BF16, ONE_MUL, INTERPRET)
        if SWIGLU:
            acc_up = _expert_tile_dot(acc_up, x, g_w + N_OUT * (K // 8), g_s + N_OUT * (K // BS), table, k0,
                                      rmask, wcol, bcol, K, BS, BLOCK_N, BLOCK_K, EVEN_K, MX_BF16, ONE_MUL,
                                      INTERPRET)
    ymask = mmask[:, None] & (rows[None, :] < N_OUT)
    last = True
    if SPLIT_K > 1:
        part = (pairs.to(tl.int64)[:, None] * HALVES) * N_OUT + rows[None, :]  # [BLOCK_M, BLOCK_N]
        split_stride = P * HALVES * N_OUT
        tl.store(ws_ptr + pid_k * split_stride + part, acc, mask=ymask)
        if SWIGLU:
            tl.store(ws_ptr + pid_k * split_stride + part + N_OUT, acc_up, mask=ymask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        tile = pid_t * tl.num_programs(0) + pid_n
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        last = ticket == SPLIT_K - 1
        if last:  # reduce in split order: the result does not depend on which split came last
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(ws_ptr + s * split_stride + part, mask=ymask, other=0.0, cache_modifier=".cg")
                if SWIGLU:
                    acc_up += tl.load(ws_ptr + s * split_stride + part + N_OUT, mask=ymask, other=0.0,
                                      cache_modifier=".cg")
            tl.store(cnt_ptr + tile, 0)
    if last:
        if SWIGLU:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up, as F.silu(g) * u in float32
        if HAS_PW:
            acc = acc * tl.load(pw_ptr + pairs, mask=mmask, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + pairs.to(tl.int64)[:, None] * N_OUT + rows[None, :]
        tl.store(y_ptrs, cast_rne(acc, y_ptr.dtype.element_ty, INTERPRET), mask=ymask)


@triton.jit
def moe_route_kernel(ids_ptr, pairs_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, P, E, N_TILES,
                     BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, BM: tl.constexpr):
    """`route_topk` in one program (one launch instead of ~20 small torch ops): expert ids [P] ->
    expert-sorted pair ids (stable) and the M-tile map, exactly as `route_topk_torch` builds them.

    Stable sort: the keys expert * BLOCK_P + p are distinct and ordered by (expert, p), so a plain
    bitonic sort of them is the stable sort by expert. Counts by histogram, offsets and first tiles
    by exclusive prefix sums; every tile slot is first marked unused (expert E), then each expert
    writes its own tiles (after a barrier, so the two writes to a slot are ordered).
    """
    p = tl.arange(0, BLOCK_P)
    valid = p < P
    ids = tl.load(ids_ptr + p, mask=valid, other=0).to(tl.int32)
    key = tl.where(valid, ids * BLOCK_P + p, E * BLOCK_P + p)
    skey = tl.sort(key)
    tl.store(pairs_ptr + p, skey % BLOCK_P, mask=valid)
    counts = tl.histogram(ids, BLOCK_E, mask=valid)  # [BLOCK_E]
    offsets = tl.cumsum(counts, 0) - counts
    tiles = (counts + BM - 1) // BM
    first = tl.cumsum(tiles, 0) - tiles
    t = tl.arange(0, BLOCK_T)
    tl.store(tile_expert_ptr + t, tl.full((BLOCK_T,), 0, tl.int32) + E, mask=t < N_TILES)
    tl.debug_barrier()
    e = tl.arange(0, BLOCK_E)
    for j in range(0, (BLOCK_P + BM - 1) // BM):
        m = (j < tiles) & (e < E)
        tl.store(tile_expert_ptr + first + j, e, mask=m)
        tl.store(tile_start_ptr + first + j, offsets + j * BM, mask=m)
        tl.store(tile_end_ptr + first + j, offsets + counts, mask=m)
