"""Triton kernel behind `fp4_moe`: the grouped W4A16 GEMM over routed (token, slot) pairs. Math in `fp4_moe`."""

import triton
import triton.language as tl

from ._fp4_bits import cast_rne
from ._fp4_gemm import decode_weight_tile, pair_order_x


@triton.jit
def _expert_tile_dot(acc, x, w_ptrs, s_ptrs, table, k0, rmask, wcol, bcol, K: tl.constexpr, BS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MX_BF16: tl.constexpr, ONE_MUL: tl.constexpr,
                     INTERPRET: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] += x[BLOCK_M, BLOCK_K] @ dequant(W[rows, k0:k0+BLOCK_K]).T (the skinny kernel's
    decode: int32 words, float16-pair nibble placement, one float32 multiply by the tabled scale, one rounding)."""
    if K % BLOCK_K == 0:
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
                   pw_ptr, y_ptr, E, N_OUT: tl.constexpr, K: tl.constexpr, X_DIV: tl.constexpr, BS: tl.constexpr,
                   SWIGLU: tl.constexpr, HAS_PW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, MX_BF16: tl.constexpr, ONE_MUL: tl.constexpr, INTERPRET: tl.constexpr):
    """y[p, n] = act(x[p // X_DIV] @ dequant(W[e(p)])[n].T) (* pw[p]) for every routed pair p, in one launch.

    Grid: (tiles of N_OUT, M tiles). M tile t holds up to BLOCK_M consecutive entries
    [tile_start[t], tile_end[t]) of the expert-sorted pair list, all routed to expert
    tile_expert[t]; tiles past the routed ones (the grid is an upper bound, so the host never
    waits for the counts) carry expert E and return at once. x rows are gathered by pair id
    (X_DIV = top_k: token = pair // top_k; X_DIV = 1: x is already one row per pair), and y rows
    are scattered back to pair order, so no sorted copy of x or y exists.

    SWIGLU: W is [E, 2 * N_OUT, K] with the gate rows first; the program streams gate row n and up
    row N_OUT + n together and writes silu(gate) * up (float32, one rounding), so the [P, 2I]
    intermediate never reaches memory.
    """
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_t)
    if e >= E:
        return
    W: tl.constexpr = BLOCK_K // 8
    NB: tl.constexpr = BLOCK_K // BS
    N_W: tl.constexpr = 2 * N_OUT if SWIGLU else N_OUT  # weight rows per expert
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
    w_base = w_ptr + e64 * (N_W * (K // 8))
    s_base = s_ptr + e64 * (N_W * (K // BS))
    table = table_ptr + e64 * 256
    g_w = w_base + rows[:, None] * (K // 8) + wcol[None, :]
    g_s = s_base + rows[:, None] * (K // BS) + bcol[None, :]
    x_ptrs = x_ptr + xrow[:, None] * K + kcol[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if K % BLOCK_K == 0:
            x = tl.load(x_ptrs + k0, mask=mmask[:, None], other=0.0)
        else:
            x = tl.load(x_ptrs + k0, mask=mmask[:, None] & (kcol[None, :] < K - k0), other=0.0)
        x = pair_order_x(x, MX_BF16)
        acc = _expert_tile_dot(acc, x, g_w, g_s, table, k0, rmask, wcol, bcol, K, BS, BLOCK_N, BLOCK_K,
                               MX_BF16, ONE_MUL, INTERPRET)
        if SWIGLU:
            acc_up = _expert_tile_dot(acc_up, x, g_w + N_OUT * (K // 8), g_s + N_OUT * (K // BS), table, k0,
                                      rmask, wcol, bcol, K, BS, BLOCK_N, BLOCK_K, MX_BF16, ONE_MUL, INTERPRET)
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up, as F.silu(g) * u in float32
    if HAS_PW:
        acc = acc * tl.load(pw_ptr + pairs, mask=mmask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + pairs.to(tl.int64)[:, None] * N_OUT + rows[None, :]
    tl.store(y_ptrs, cast_rne(acc, y_ptr.dtype.element_ty, INTERPRET), mask=mmask[:, None] & (rows[None, :] < N_OUT))
