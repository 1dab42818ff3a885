"""Triton kernels behind `fp4_moe`: the routing map, the grouped W4A16 GEMM over routed (token, slot)
pairs, and the slot combine. Math in `fp4_moe`.

PDL (programmatic dependent launch, `_fp4_gemv`'s docstring has the rules): the layer is a chain of four
launches (route -> gate_up -> down -> combine) in which each reads what the previous one wrote. Every
program calls `griddepcontrol.wait` before its first read or write of anything a launch writes (routing
tables, x, y, the split-K workspace and tickets), and `griddepcontrol.launch_dependents` right after it
(the next kernel's programs may then launch and wait on the SM). Waiting first makes a stronger
promise to the next launch: when it starts, every program here has passed its wait, so the launch
before this one is complete. The down projection uses that to read the routing (two launches back)
and load its first weights before its own wait (`fp4_moe_kernel`'s PREFETCH). What overlaps is the
next launch's ramp-up (and those first loads) with this one's tail: the ~2 us per launch that a CUDA
graph does not hide. The interpreter cannot run the PTX: the launchers pass PDL=False there.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._fp4_bits import cast_rne
from ._fp4_gemm import decode_weight_tile, decode_weight_tile_lut, pair_order_x


@triton.jit
def _expert_tile_load(w_ptrs, s_ptrs, k0, rmask, wcol, bcol, K: tl.constexpr, BS: tl.constexpr, EVEN_K: tl.constexpr,
                      EVICT: tl.constexpr = ""):
    """The packed words [BLOCK_N, BLOCK_K/8] and scale codes [BLOCK_N, BLOCK_K/BS] of one K step. EVEN_K: no K
    masks (every split's K steps are inside K). EVICT: eviction policy of these streamed-once loads
    ("evict_first" keeps L2 for x)."""
    if EVEN_K:
        words = tl.load(w_ptrs + k0 // 8, mask=rmask, other=0, eviction_policy=EVICT)
        codes = tl.load(s_ptrs + k0 // BS, mask=rmask, other=0, eviction_policy=EVICT)
    else:
        words = tl.load(w_ptrs + k0 // 8, mask=rmask & (wcol[None, :] < (K - k0) // 8), other=0,
                        eviction_policy=EVICT)
        codes = tl.load(s_ptrs + k0 // BS, mask=rmask & (bcol[None, :] < (K - k0) // BS), other=0,
                        eviction_policy=EVICT)
    return words, codes


@triton.jit
def _tile_dot(acc, x, words, codes, table, BS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              MX_BF16: tl.constexpr, ONE_MUL: tl.constexpr, INTERPRET: tl.constexpr, LUT: tl.constexpr = False,
              SCALE_REG: tl.constexpr = False):
    """acc[BLOCK_M, BLOCK_N] += x[BLOCK_M, BLOCK_K] @ dequant(words, codes).T (the skinny kernel's decode,
    `_fp4_gemm.decode_weight_tile`; LUT: fp4_mma's byte-permute table decode, `decode_weight_tile_lut`, with
    the expert's [256, 4] table). The twin's weights bit for bit, except NVFP4's bf16 decode (MX_BF16 with
    POST in `fp4_moe_kernel`), which gives the exact products code x E4M3 x 2^-9 instead."""
    if LUT:
        w = decode_weight_tile_lut(words, codes, table, x.dtype, BLOCK_N, BLOCK_K, BS, INTERPRET)
    else:
        w = decode_weight_tile(words, codes, table, x.dtype, BLOCK_N, BLOCK_K, BS, MX_BF16, ONE_MUL, INTERPRET,
                               SCALE_REG)
    if INTERPRET:  # the interpreter multiplies bf16 bit patterns in tl.dot: give it float32
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        return tl.dot(x, tl.trans(w), acc)


@triton.jit
def fp4_moe_kernel(x_ptr, w_ptr, s_ptr, table_ptr, post_ptr, pairs_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
                   pw_ptr, y_ptr, ws_ptr, cnt_ptr, out_ptr, tcnt_ptr, E, P, N_OUT: tl.constexpr, K: tl.constexpr,
                   X_DIV: tl.constexpr,
                   BS: tl.constexpr, SWIGLU: tl.constexpr, HAS_PW: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, MX_BF16: tl.constexpr,
                   ONE_MUL: tl.constexpr, INTERPRET: tl.constexpr, EVICT: tl.constexpr = "", PDL: tl.constexpr = False,
                   COMBINE_K: tl.constexpr = 0, PREFETCH: tl.constexpr = False, LUT: tl.constexpr = False,
                   POST: tl.constexpr = False, SCALE_REG: tl.constexpr = False):
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

    EVICT: eviction policy of the weight loads. PDL: wait for the previous launch before the first read,
    then let the next launch's programs start (griddepcontrol.wait, then launch_dependents: in this
    order, a launch that follows this one starts only once every program here has passed its wait, so
    whatever the launch before this one wrote is complete when the next one starts: what PREFETCH needs).
    PREFETCH (with PDL; the down projection inside `fp4_moe_mlp`, two launches after the routing): the
    tile map is read and the first K step's weights and scales are prefetched into L2 BEFORE the wait
    (the routing was written two launches back, complete by the rule above; weights never change), so
    they stream in while the previous launch (gate_up) finishes; x (h, the previous launch's output) is
    read after it. A prefetch hint, not a load: a peeled first step held in registers took the kernel
    from 88 to 118 registers (offline sm_90 compile), fewer programs per SM.

    MX_BF16: the bfloat16 pair decode (`_fp4_gemm.decode_weight_tile`), x in its pair k order. MXFP4: the table
    holds the power-of-two block scales, the weights are the twin's bit for bit. NVFP4 (POST): the table holds
    E4M3 x 2^117 (`fp4_gemm.NV_SCALE_SHIFT`), so the MMA sees code x E4M3 x 2^-9 exactly (the twin rounds
    code x effective scale to bfloat16 instead), and the float32 sums are multiplied by the expert's per-tensor
    factor x 2^9 (post[e]) before the epilogue: one bf16x2 multiply per two weights instead of the float32
    decode's convert, multiply and round per weight. SCALE_REG: the bf16 decode's scales computed from the codes
    in registers instead of gathered from the table (one gather per block).

    LUT: decode through per-expert byte-plane tables (`fp4_moe.lut_tables`) instead of the float16-pair
    decode: fewer instructions per weight, gathered table loads (see fp4_mma).

    COMBINE_K = top_k > 0 (the down projection, pairs p = token * top_k + slot): the slot combine in the
    epilogue instead of a separate launch. After writing its y rows, a program takes one ticket per
    (row's token, N tile) (tcnt[token, pid_n]); the program that takes a token's last (top_k-th) ticket
    has every slot's row written (the same barrier + acq_rel ticket as the split-K reduction), sums
    the token's top_k rows of y in float32 in slot order, writes out[token] and resets the ticket:
    the arithmetic of `moe_combine_kernel`, so the result is the same bit for bit.
    """
    WAIT_FIRST: tl.constexpr = PDL and not PREFETCH
    if WAIT_FIRST:
        gdc_wait()
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(tile_expert_ptr + pid_t)
    if e >= E:
        if PREFETCH:
            gdc_wait()  # every program waits: completion stays transitive along the chain
            gdc_launch_dependents()
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
    table = table_ptr + e64 * (1024 if LUT else 256)  # LUT: [E, 256, 4] byte-plane tables
    g_w = w_base + rows[:, None] * (K // 8) + wcol[None, :]
    g_s = s_base + rows[:, None] * (K // BS) + bcol[None, :]
    x_ptrs = x_ptr + xrow[:, None] * K + kcol[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PREFETCH:  # the first K step's weights and scales into L2 (no registers), then wait for the previous launch
        _prefetch_l2(tl.where(rmask, g_w + k_lo // 8, w_base))
        _prefetch_l2(tl.where(rmask, g_s + k_lo // BS, s_base))
        if SWIGLU:
            _prefetch_l2(tl.where(rmask, g_w + N_OUT * (K // 8) + k_lo // 8, w_base))
            _prefetch_l2(tl.where(rmask, g_s + N_OUT * (K // BS) + k_lo // BS, s_base))
        gdc_wait()
        gdc_launch_dependents()
    for kk in range(0, K_SPLIT, BLOCK_K):
        k0 = k_lo + kk
        x = pair_order_x(_x_step(x_ptrs, k0, mmask, kcol, K, EVEN_K), MX_BF16)
        words, codes = _expert_tile_load(g_w, g_s, k0, rmask, wcol, bcol, K, BS, EVEN_K, EVICT)
        acc = _tile_dot(acc, x, words, codes, table, BS, BLOCK_N, BLOCK_K, MX_BF16, ONE_MUL, INTERPRET, LUT, SCALE_REG)
        if SWIGLU:
            words, codes = _expert_tile_load(g_w + N_OUT * (K // 8), g_s + N_OUT * (K // BS), k0, rmask, wcol,
                                             bcol, K, BS, EVEN_K, EVICT)
            acc_up = _tile_dot(acc_up, x, words, codes, table, BS, BLOCK_N, BLOCK_K, MX_BF16, ONE_MUL, INTERPRET,
                               LUT, SCALE_REG)
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
        if POST:  # NVFP4 bfloat16 decode: the expert's per-tensor factor, once per output (float32)
            post = tl.load(post_ptr + e64)
            acc = acc * post
            acc_up = acc_up * post
        if SWIGLU:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up, as F.silu(g) * u in float32
        if HAS_PW:
            acc = acc * tl.load(pw_ptr + pairs, mask=mmask, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + pairs.to(tl.int64)[:, None] * N_OUT + rows[None, :]
        tl.store(y_ptrs, cast_rne(acc, y_ptr.dtype.element_ty, INTERPRET), mask=ymask)
        if COMBINE_K > 0:
            _combine_last(y_ptr, out_ptr, tcnt_ptr, pairs, mmask, rows, pid_n, N_OUT, COMBINE_K, INTERPRET)


@triton.jit
def _prefetch_l2(ptrs):
    """`prefetch.global.L2` of every address in ptrs (a hint: no registers held, nothing waits on it)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _x_step(x_ptrs, k0, mmask, kcol, K: tl.constexpr, EVEN_K: tl.constexpr):
    """x rows of the tile's pairs [BLOCK_M, BLOCK_K] at K offset k0 (masked past K unless EVEN_K)."""
    if EVEN_K:
        return tl.load(x_ptrs + k0, mask=mmask[:, None], other=0.0)
    else:
        return tl.load(x_ptrs + k0, mask=mmask[:, None] & (kcol[None, :] < K - k0), other=0.0)


@triton.jit
def _combine_last(y_ptr, out_ptr, tcnt_ptr, pairs, mmask, rows, pid_n, N_OUT: tl.constexpr, TOP_K: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """The fused slot combine of `fp4_moe_kernel` (COMBINE_K): tickets per (token, N tile); the last
    program of a token sums its TOP_K rows of y (float32, slot order; L2 loads) into out[token]."""
    tl.debug_barrier()  # every thread's y rows are written before the tickets are taken
    tok = pairs // TOP_K  # [BLOCK_M]
    tix = tok * tl.num_programs(0) + pid_n
    tickets = tl.atomic_add(tcnt_ptr + tix, 1, mask=mmask, sem="acq_rel")
    done = mmask & (tickets == TOP_K - 1)
    cmask = done[:, None] & (rows[None, :] < N_OUT)
    base = tok.to(tl.int64) * TOP_K
    tot = tl.load(y_ptr + base[:, None] * N_OUT + rows[None, :], mask=cmask, other=0.0, cache_modifier=".cg")
    tot = tot.to(tl.float32)
    for slot in tl.static_range(1, TOP_K):
        tot += tl.load(y_ptr + (base + slot)[:, None] * N_OUT + rows[None, :], mask=cmask, other=0.0,
                       cache_modifier=".cg").to(tl.float32)
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * N_OUT + rows[None, :], cast_rne(tot, out_ptr.dtype.element_ty,
                                                                                    INTERPRET), mask=cmask)
    tl.store(tcnt_ptr + tix, 0, mask=done)


@triton.jit
def moe_route_kernel(ids_ptr, pairs_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, P, E, N_TILES,
                     BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, BM: tl.constexpr,
                     PDL: tl.constexpr = False):
    """`route_topk` in one program (one launch instead of ~20 small torch ops): expert ids [P] ->
    expert-sorted pair ids (stable) and the M-tile map, exactly as `route_topk_torch` builds them.

    Stable sort: the keys expert * BLOCK_P + p are distinct and ordered by (expert, p), so a plain
    bitonic sort of them is the stable sort by expert. Counts by histogram, offsets and first tiles
    by exclusive prefix sums; every tile slot is first marked unused (expert E), then each expert
    writes its own tiles (after a barrier, so the two writes to a slot are ordered).
    """
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
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


@triton.jit
def moe_combine_kernel(y_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr,
                       PDL: tl.constexpr = False):
    """out[t, h] = cast(sum over slots s in order of float32(y[t * TOP_K + s, h])): one launch for what was
    three torch ops (to float32, sum, cast). Grid: (tokens, H tiles). The order is the twin's
    (`fp4_moe._combine`: a running float32 sum over the slots), so the two are bit-identical."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = h < H
    acc = tl.load(y_ptr + (t * TOP_K) * H + h, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(1, TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + s) * H + h, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + h, cast_rne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
