"""CUDA-core FP4 GEMV for decoding (M = 1..4): `y = x @ dequant(W).T (+ bias)` without tensor cores.

Why a GEMV. At M <= 4 the tensor-core skinny kernel (`_fp4_gemm.fp4_skinny_kernel`) wastes most
of each MMA (16 rows for 1..4 tokens) and pays ~7.5 SASS instructions per weight, mostly to build
MMA operand registers. Here every weight costs a decode and one float32 FFMA per token, and the
block scale is applied once per 16 products, not once per weight.

The plane layout (built offline by `fp4_gemm.gemv_layout`, torch). Row n of the weight becomes
K/8 int32 words; logical word i holds the 8 codes of k = j * (K/8) + i, j = 0..7, code j in bits
4j..4j+3. So nibble plane j of a run of consecutive words multiplies a contiguous run of x,
x[j * K/8 + i ...]: no permutation of x and no join of decoded planes at run time (the join is
what made an earlier CUDA-core attempt pay 9-13 instructions per weight in layout conversions).

    words (logical)   i:    0    1    2  ...         code j of word i  <->  k = j * K/8 + i
    plane j multiplies x[j*K/8 + 0], x[j*K/8 + 1], ...

Decode: `_fp4_gemm._e2m1_word_pair` places codes j and j + 4 as the two halves of a float16 pair
(value times 2^-14, exact), converted to float32 once per weight; then one FFMA with x per token.

Blocks and scales. A thread owns groups of 16 consecutive logical words. For NVFP4 (block 16,
K % 128 == 0) the 16 codes of plane j in group g are exactly block b = j * (K/128) + g, so the
thread sums 16 products in float32 and adds `s_eff[n, b] * partial` once (s_eff times 2^14 from
the per-weight table of `prepare_fp4_weight`). For MXFP4 (block 32, K % 256 == 0) two neighbour
groups share a block (b = j * (K/256) + g // 2). The scale codes are re-laid [N, K/128, 8] (NVFP4)
or [N, K/256, 8] (MXFP4): a group's 8 plane scales are adjacent (one 8-byte load).

Memory order of the words (what makes the loads coalesced AND keeps a group inside one thread).
A K chunk of 16 L words (L lanes x 16 words) is stored as [4 (r), L (lane), 4 (c)]: logical word
16 lane + 4 r + c sits at r * 4L + 4 lane + c. Loaded as the tile [4, BLOCK_N, L, 4], Triton puts
the 4 contiguous words (16 bytes) of c in one thread, the L lanes of a warp along a contiguous run
of 16 L bytes, the warps along rows, and r in registers: each thread holds the 16 words of one
group for each of its rows, every warp load instruction reads 512 contiguous bytes (L = 32).

Programmatic dependent launch (PDL, `PDL=True`, Hopper and later; the launcher sets Triton's
`launch_pdl`). In a chain of decode kernels each launch normally starts only after the previous one
has finished: its programs ramp up while the GPU idles (~2-5 us per launch at batch 1). With PDL a
kernel may start while its predecessor still runs; `griddepcontrol.launch_dependents` (called first
thing) lets the next kernel launch, and `griddepcontrol.wait` blocks until the previous kernel has
completed and its writes are visible. So a program here issues its first chunk of weight loads
(weights never change during a chain) BEFORE the wait, then reads x and writes y, the split-K
partials and the tickets only after it: a launch must not read what the previous kernel writes, nor
write what it may still read (the workspace and tickets are shared by consecutive launches on a
stream), before the wait. Every program waits, so kernel completion stays transitive along the
chain. The interpreter cannot run the inline PTX: the launcher passes PDL=False there.

Numerics. The decoded weight e2m1 * s_eff is never rounded to x's dtype: the result is the
float32 sum of x * e2m1 * s_eff in a different order and with the products exact, then one
rounding to x's dtype. Against the twin (which rounds each weight to x's dtype first) it differs
by that weight rounding (relative 2^-9 per weight for bf16, random sign) plus the output cast:
tests/kernels/test_fp4_gemv.py states the bounds.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._fp4_bits import cast_rne, half_pair_to_f32


@triton.jit
def _split8(s):
    """[A, B, 8] -> the tuple of 8 tensors s[:, :, e] (register selection: the 8 lie in one thread)."""
    A: tl.constexpr = s.shape[0]
    B: tl.constexpr = s.shape[1]
    s = tl.reshape(s, (A, B, 2, 2, 2))  # e = 4a + 2b + c
    c0, c1 = tl.split(s)  # [A, B, 2(a), 2(b)] for c = 0, 1
    c0b0, c0b1 = tl.split(c0)  # [A, B, 2(a)]
    c1b0, c1b1 = tl.split(c1)
    s0, s4 = tl.split(c0b0)
    s2, s6 = tl.split(c0b1)
    s1, s5 = tl.split(c1b0)
    s3, s7 = tl.split(c1b1)
    return s0, s1, s2, s3, s4, s5, s6, s7


@triton.jit
def _code_pair(words, J: tl.constexpr, INTERPRET: tl.constexpr):
    """Codes of planes J and J + 4 of int32 words (bit order of `fp4_gemm.GEMV_BIT_POSITIONS`) as float32,
    each times 2^-14.

    The float16 placement of `_fp4_bits` (sign to bit 15, e1 e0 m to bits 11..9, in both 16-bit
    halves): pair 0 is stored in place (one AND), pair 1 three bits lower (shift + AND), pairs 2 and
    3 with their magnitude and sign apart (two shifts, two ANDs): 11 integer ops per 8 weights
    instead of 15 for nibbles stored in order. On the GPU each half is converted by one
    `cvt.f32.f16` read straight from the pair's register (HADD2.F32 with a half selector);
    Triton's own int16 split re-packs halves of different words first (a PRMT per two weights).
    0x8E008E00 and 0x80008000 are written as signed int32 literals.
    """
    if J == 0:
        h = words & -1912566272  # 0x8E008E00
    elif J == 1:
        h = (words << 3) & -1912566272
    elif J == 2:
        h = ((words << 9) & 0x0E000E00) | ((words << 2) & -2147450880)
    else:
        h = ((words << 6) & 0x0E000E00) | ((words << 1) & -2147450880)
    return half_pair_to_f32(h, INTERPRET)


@triton.jit
def _dot16(w0, w1, w2, w3, x_ptrs, mask):
    """sum over the group's 16 words of one plane: w_r [L, BN, 4] float32, x at x_ptrs + 4 r ([L, 1, 4])."""
    d = tl.sum(w0 * tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32), axis=2)
    d += tl.sum(w1 * tl.load(x_ptrs + 4, mask=mask, other=0.0).to(tl.float32), axis=2)
    d += tl.sum(w2 * tl.load(x_ptrs + 8, mask=mask, other=0.0).to(tl.float32), axis=2)
    d += tl.sum(w3 * tl.load(x_ptrs + 12, mask=mask, other=0.0).to(tl.float32), axis=2)
    return d  # [L, BN]


@triton.jit
def _token(acc, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, s_lo, s_hi, x_ptrs, mask, J: tl.constexpr,
           K8: tl.constexpr):
    """acc [L, BN] += s_eff(plane J) * (group sum of x * code J) + s_eff(plane J + 4) * (... code J + 4)."""
    d_lo = _dot16(lo0, lo1, lo2, lo3, x_ptrs + J * K8, mask)
    d_hi = _dot16(hi0, hi1, hi2, hi3, x_ptrs + (J + 4) * K8, mask)
    return acc + d_lo * s_lo + d_hi * s_hi


@triton.jit
def _load_chunk(w_ptrs, s_ptr, n3, l3, e3, ch, mask, N: tl.constexpr, L: tl.constexpr, SROW: tl.constexpr,
                PAIRED: tl.constexpr, CACHE: tl.constexpr = "", EVICT: tl.constexpr = ""):
    """Chunk ch of the program's rows: the four word runs [L, BLOCK_N, 4] and the scale codes [L, BLOCK_N, 8].

    CACHE / EVICT: Triton's cache_modifier / eviction_policy for these streamed-once loads (e.g. ".cg":
    L2 only; "evict_first")."""
    wp = w_ptrs + ch * (16 * L)
    w0 = tl.load(wp, mask=mask, other=0, cache_modifier=CACHE, eviction_policy=EVICT)
    w1 = tl.load(wp + 4 * L, mask=mask, other=0, cache_modifier=CACHE, eviction_policy=EVICT)
    w2 = tl.load(wp + 8 * L, mask=mask, other=0, cache_modifier=CACHE, eviction_policy=EVICT)
    w3 = tl.load(wp + 12 * L, mask=mask, other=0, cache_modifier=CACHE, eviction_policy=EVICT)
    g = ch * L + l3
    if PAIRED:
        g = g // 2
    codes = tl.load(s_ptr + n3 * SROW + g * 8 + e3, mask=mask, other=0, cache_modifier=CACHE, eviction_policy=EVICT)
    return w0, w1, w2, w3, codes


@triton.jit
def _chunk(acc0, acc1, acc2, acc3, w0, w1, w2, w3, codes, table_ptr, x_ptrs, ch, m0, M, K: tl.constexpr,
           BLOCK_M: tl.constexpr, L: tl.constexpr, INTERPRET: tl.constexpr):
    """Chunk ch of the K loop: decode its words and scales and add each token's products to its accumulator."""
    K8: tl.constexpr = K // 8
    scales = _split8(tl.load(table_ptr + codes.to(tl.int32)))  # float32 s_eff * 2^14, 8 x [L, BLOCK_N]
    xc = x_ptrs + ch * (16 * L)
    for J in tl.static_range(4):
        lo0, hi0 = _code_pair(w0, J, INTERPRET)  # codes J and J + 4 times 2^-14, float32 [L, BLOCK_N, 4]
        lo1, hi1 = _code_pair(w1, J, INTERPRET)
        lo2, hi2 = _code_pair(w2, J, INTERPRET)
        lo3, hi3 = _code_pair(w3, J, INTERPRET)
        s_lo = scales[J]
        s_hi = scales[J + 4]
        acc0 = _token(acc0, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, s_lo, s_hi, xc, m0 < M, J, K8)
        if BLOCK_M > 1:
            acc1 = _token(acc1, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, s_lo, s_hi, xc + K, m0 + 1 < M, J, K8)
        if BLOCK_M > 2:
            acc2 = _token(acc2, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, s_lo, s_hi, xc + 2 * K, m0 + 2 < M, J, K8)
            acc3 = _token(acc3, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, s_lo, s_hi, xc + 3 * K, m0 + 3 < M, J, K8)
    return acc0, acc1, acc2, acc3


@triton.jit
def fp4_gemv_kernel(x_ptr, w_ptr, s_ptr, table_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M,
                    N: tl.constexpr, K: tl.constexpr, PAIRED: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, L: tl.constexpr, SPLIT_K: tl.constexpr,
                    PREFETCH: tl.constexpr, INTERPRET: tl.constexpr, CACHE: tl.constexpr = "",
                    EVICT: tl.constexpr = "", STAGES: tl.constexpr = 1, PDL: tl.constexpr = False,
                    GLU: tl.constexpr = False):
    """y[M, N] = x[M, K] @ dequant(W)[N, K].T (+ bias), W in the plane layout (module docstring).

    Grid: (tiles of BLOCK_N rows, tiles of BLOCK_M <= 4 tokens, SPLIT_K). Split s covers chunks
    [s * CPS, (s + 1) * CPS) of 16 L words (the launcher makes SPLIT_K divide the chunk count);
    with SPLIT_K > 1 the splits meet as in `fp4_skinny_kernel`: float32 partials in ws[s, M, N],
    a per-tile ticket elects the last split, which sums them in split order (deterministic), adds
    the bias, writes y and resets the ticket. PAIRED: MXFP4 (two groups of 16 words per block).

    Tiles are [L, BLOCK_N, 4] (lane, row, c) so that Triton's load layout puts c (16 bytes) in a
    thread, lanes along L then rows, warps along rows; the word runs r = 0..3 of a group are four
    such tiles (unrolled), x of one token, run and plane is [L, 1, 4] in the same layout (broadcast
    over rows for free). Each token has its own accumulator (BLOCK_M <= 4, unrolled).
    PREFETCH: the next chunk's words and scale codes are loaded (into registers) before this
    chunk is decoded, so a program keeps its loads in flight while it computes.
    CACHE / EVICT: cache modifier and eviction policy of the weight loads; STAGES: Triton's software
    pipelining depth of the K loop (`tl.range(..., num_stages=STAGES)`; 1 = none).
    GLU: W is a gate/up pair with rows interleaved (row 2i = gate i, row 2i + 1 = up i) and y[M, N / 2] is
    silu(gate) * up, each rounded where `decode_ops.silu_mul` rounds (`_glu_store`).
    """
    K8: tl.constexpr = K // 8
    NCH: tl.constexpr = K8 // (16 * L)
    CPS: tl.constexpr = NCH // SPLIT_K
    SROW: tl.constexpr = (K // 256 if PAIRED else K // 128) * 8
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    l3 = tl.arange(0, L)[:, None, None]
    n3 = rows[None, :, None]
    c3 = tl.arange(0, 4)[None, None, :]
    e3 = tl.arange(0, 8)[None, None, :]
    w_ptrs = w_ptr + n3 * K8 + l3 * 4 + c3  # [L, BLOCK_N, 4], run r at + 4 L r
    wmask = n3 < N
    m0 = pid_m * BLOCK_M
    x_ptrs = x_ptr + m0 * K + l3 * 16 + c3  # [L, 1, 4]: token m0, run 0, plane 0 of chunk 0
    acc0 = tl.zeros((L, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((L, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((L, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((L, BLOCK_N), dtype=tl.float32)
    first = pid_k * CPS
    START: tl.constexpr = 1 if PDL else 0  # with PDL the first chunk is peeled off the loop
    if PDL:
        # Programmatic dependent launch (module docstring): let the next kernel's programs launch, put this
        # program's first chunk of weights in flight (weights never depend on an earlier kernel), then wait
        # for the previous kernel to complete before reading x or writing anything (y, and the split-K
        # partials and tickets, which the previous launch may still be using until it completes).
        gdc_launch_dependents()
        w0, w1, w2, w3, codes = _load_chunk(w_ptrs, s_ptr, n3, l3, e3, first, wmask, N, L, SROW, PAIRED,
                                            CACHE, EVICT)
        gdc_wait()
        acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, w0, w1, w2, w3, codes, table_ptr, x_ptrs, first,
                                        m0, M, K, BLOCK_M, L, INTERPRET)
    if PREFETCH:
        nw0, nw1, nw2, nw3, ncodes = _load_chunk(w_ptrs, s_ptr, n3, l3, e3, first + START, wmask & (START < CPS),
                                                 N, L, SROW, PAIRED, CACHE, EVICT)
    for ci in tl.range(START, CPS, num_stages=STAGES):
        ch = first + ci
        if PREFETCH:
            w0, w1, w2, w3, codes = nw0, nw1, nw2, nw3, ncodes
            nw0, nw1, nw2, nw3, ncodes = _load_chunk(w_ptrs, s_ptr, n3, l3, e3, ch + 1, wmask & (ci + 1 < CPS), N,
                                                     L, SROW, PAIRED, CACHE, EVICT)
        else:
            w0, w1, w2, w3, codes = _load_chunk(w_ptrs, s_ptr, n3, l3, e3, ch, wmask, N, L, SROW, PAIRED, CACHE, EVICT)
        acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, w0, w1, w2, w3, codes, table_ptr, x_ptrs, ch,
                                        m0, M, K, BLOCK_M, L, INTERPRET)
    _epilogue(acc0, acc1, acc2, acc3, m0, M, rows, pid_m * tl.num_programs(0) + pid_n, pid_k, bias_ptr, y_ptr,
              ws_ptr, cnt_ptr, N, HAS_BIAS, BLOCK_M, SPLIT_K, INTERPRET, GLU)


@triton.jit
def fp4_gemv_persistent_kernel(x_ptr, w_ptr, s_ptr, table_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M,
                               N: tl.constexpr, K: tl.constexpr, PAIRED: tl.constexpr, HAS_BIAS: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, L: tl.constexpr,
                               SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr, CACHE: tl.constexpr = "",
                               EVICT: tl.constexpr = "", PDL: tl.constexpr = False, GLU: tl.constexpr = False):
    """`fp4_gemv_kernel` as a persistent grid: the same y, the same split-K partials and tickets, bit for bit.

    Work items are (tile of BLOCK_N rows, chunk) pairs, item = tile * SPLIT_K + chunk, with SPLIT_K equal
    to the chunk count (one chunk per item). Grid (P, tiles of BLOCK_M tokens): program p takes items
    p, p + P, p + 2P, ... and loads the words and scale codes of its next item into registers before it
    decodes the current one, so every program keeps one chunk of loads in flight while it computes,
    across tiles (the non-persistent kernel's programs own 1-4 chunks: load, wait, compute, exit).
    """
    K8: tl.constexpr = K // 8
    SROW: tl.constexpr = (K // 256 if PAIRED else K // 128) * 8
    N_TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    ITEMS: tl.constexpr = N_TILES * SPLIT_K
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    pid_m = tl.program_id(1)
    r = tl.arange(0, BLOCK_N)
    l3 = tl.arange(0, L)[:, None, None]
    c3 = tl.arange(0, 4)[None, None, :]
    e3 = tl.arange(0, 8)[None, None, :]
    m0 = pid_m * BLOCK_M
    x_ptrs = x_ptr + m0 * K + l3 * 16 + c3  # [L, 1, 4]: token m0, run 0, plane 0 of chunk 0
    if PDL:
        gdc_launch_dependents()  # weights never depend on an earlier kernel: the first item's loads go first
    n3 = ((pid // SPLIT_K) * BLOCK_N + r)[None, :, None]
    w0, w1, w2, w3, codes = _load_chunk(w_ptr + n3 * K8 + l3 * 4 + c3, s_ptr, n3, l3, e3, pid % SPLIT_K,
                                        (n3 < N) & (pid < ITEMS), N, L, SROW, PAIRED, CACHE, EVICT)
    if PDL:
        gdc_wait()  # x, y, the partials and the tickets only after the previous kernel completed
    for item in range(pid, ITEMS, P):
        nxt = item + P
        nn3 = ((nxt // SPLIT_K) * BLOCK_N + r)[None, :, None]
        nw0, nw1, nw2, nw3, ncodes = _load_chunk(w_ptr + nn3 * K8 + l3 * 4 + c3, s_ptr, nn3, l3, e3, nxt % SPLIT_K,
                                                 (nn3 < N) & (nxt < ITEMS), N, L, SROW, PAIRED, CACHE, EVICT)
        tile = item // SPLIT_K
        ch = item % SPLIT_K
        acc0 = tl.zeros((L, BLOCK_N), dtype=tl.float32)
        acc1 = tl.zeros((L, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((L, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((L, BLOCK_N), dtype=tl.float32)
        acc0, acc1, acc2, acc3 = _chunk(acc0, acc1, acc2, acc3, w0, w1, w2, w3, codes, table_ptr, x_ptrs, ch,
                                        m0, M, K, BLOCK_M, L, INTERPRET)
        _epilogue(acc0, acc1, acc2, acc3, m0, M, tile * BLOCK_N + r, pid_m * N_TILES + tile, ch, bias_ptr, y_ptr,
                  ws_ptr, cnt_ptr, N, HAS_BIAS, BLOCK_M, SPLIT_K, INTERPRET, GLU)
        w0, w1, w2, w3, codes = nw0, nw1, nw2, nw3, ncodes


@triton.jit
def _epilogue(acc0, acc1, acc2, acc3, m0, M, rows, tile, split, bias_ptr, y_ptr, ws_ptr, cnt_ptr, N: tl.constexpr,
              HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr,
              GLU: tl.constexpr = False):
    """Per token: [BLOCK_N] sums over lanes (the one exchange between threads), then y, or this split's
    partials and the tile's ticket (the last split of the tile reduces in split order and resets it)."""
    _finish(tl.sum(acc0, axis=0), m0, M, rows, split, bias_ptr, y_ptr, ws_ptr, N, HAS_BIAS, SPLIT_K, INTERPRET, GLU)
    if BLOCK_M > 1:
        _finish(tl.sum(acc1, axis=0), m0 + 1, M, rows, split, bias_ptr, y_ptr, ws_ptr, N, HAS_BIAS, SPLIT_K,
                INTERPRET, GLU)
    if BLOCK_M > 2:
        _finish(tl.sum(acc2, axis=0), m0 + 2, M, rows, split, bias_ptr, y_ptr, ws_ptr, N, HAS_BIAS, SPLIT_K,
                INTERPRET, GLU)
        _finish(tl.sum(acc3, axis=0), m0 + 3, M, rows, split, bias_ptr, y_ptr, ws_ptr, N, HAS_BIAS, SPLIT_K,
                INTERPRET, GLU)
    if SPLIT_K > 1:
        tl.debug_barrier()  # every thread's partials are written before the ticket is taken
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # the last split of this tile: reduce in split order
            for m in tl.static_range(BLOCK_M):
                _reduce_splits(m0 + m, M, rows, bias_ptr, y_ptr, ws_ptr, N, HAS_BIAS, SPLIT_K, INTERPRET, GLU)
            tl.store(cnt_ptr + tile, 0)


@triton.jit
def _store_y(out, m, M, rows, bias_ptr, y_ptr, N: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
             GLU: tl.constexpr):
    """y[m, rows] = cast(out + bias); GLU: y[m, rows / 2] = silu(gate) * up of the interleaved row pairs."""
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    if GLU:
        _glu_store(out, m, M, rows, y_ptr, N, INTERPRET)
    else:
        tl.store(y_ptr + m * N + rows, cast_rne(out, y_ptr.dtype.element_ty, INTERPRET), mask=(rows < N) & (m < M))


@triton.jit
def _glu_store(out, m, M, rows, y_ptr, N: tl.constexpr, INTERPRET: tl.constexpr):
    """out [BLOCK_N] float32 over interleaved rows (2i: gate i, 2i + 1: up i) -> y[m, i] = silu(gate) * up.

    Rounded as the unfused chain rounds (the GEMV's output cast, then `_decode_ops.silu_mul_kernel`): gate
    and up to y's dtype, silu in float32 rounded to the dtype (torch's silu), the product in float32 rounded.
    So this epilogue equals GEMV + silu_mul bit for bit."""
    BN: tl.constexpr = out.shape[0]
    dt: tl.constexpr = y_ptr.dtype.element_ty
    gate, up = tl.split(tl.reshape(out, (BN // 2, 2)))
    half = tl.split(tl.reshape(rows, (BN // 2, 2)))[0] // 2  # output column i of each pair
    gf = cast_rne(gate, dt, INTERPRET).to(tl.float32)
    act = cast_rne(gf / (1.0 + tl.exp(-gf)), dt, INTERPRET).to(tl.float32)
    val = cast_rne(act * cast_rne(up, dt, INTERPRET).to(tl.float32), dt, INTERPRET)
    tl.store(y_ptr + m * (N // 2) + half, val, mask=(half < N // 2) & (m < M))


@triton.jit
def _finish(out, m, M, rows, split, bias_ptr, y_ptr, ws_ptr, N: tl.constexpr, HAS_BIAS: tl.constexpr,
            SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr, GLU: tl.constexpr = False):
    """Token m's [BLOCK_N] float32 sums: y (`_store_y`), or this split's partial ws[split, m, rows]."""
    if SPLIT_K > 1:
        tl.store(ws_ptr + split * M * N + m * N + rows, out, mask=(rows < N) & (m < M))
    else:
        _store_y(out, m, M, rows, bias_ptr, y_ptr, N, HAS_BIAS, INTERPRET, GLU)


@triton.jit
def _reduce_splits(m, M, rows, bias_ptr, y_ptr, ws_ptr, N: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr, GLU: tl.constexpr = False):
    """y[m, rows] from the sum of the SPLIT_K partials in split order (+ bias; L2 loads: .cg)."""
    mask = (rows < N) & (m < M)
    out = tl.load(ws_ptr + m * N + rows, mask=mask, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT_K):
        out += tl.load(ws_ptr + s * M * N + m * N + rows, mask=mask, other=0.0, cache_modifier=".cg")
    _store_y(out, m, M, rows, bias_ptr, y_ptr, N, HAS_BIAS, INTERPRET, GLU)
