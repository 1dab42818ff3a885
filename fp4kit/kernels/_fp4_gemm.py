"""Triton kernels behind `fp4_gemm`: FP4 weight dequantize and the W4A16 GEMM. See `fp4_gemm` for the math."""

import triton
import triton.language as tl

from ._fp4_bits import cast_rne, e2m1_pair_to_f32, mxfp4_scale14, nvfp4_scale14


@triton.jit
def _block_scale14(code, gs_ptr, IS_NVFP4: tl.constexpr, GS_ENCODE: tl.constexpr, INTERPRET: tl.constexpr):
    if IS_NVFP4:
        return nvfp4_scale14(code, tl.load(gs_ptr), GS_ENCODE, INTERPRET)
    else:
        return mxfp4_scale14(code)


@triton.jit
def _dequant_tile(wq, ws, gs_ptr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BS: tl.constexpr,
                  IS_NVFP4: tl.constexpr, GS_ENCODE: tl.constexpr, INTERPRET: tl.constexpr):
    """wq [ROWS, BLOCK_K/2] packed bytes, ws [ROWS, BLOCK_K/BS] scale codes -> float32 [ROWS, BLOCK_K].

    Each byte holds elements 2j (low nibble) and 2j+1 (high): joining (low, high) on a new last
    axis and flattening restores the natural order. A block of BS elements is BS/2 bytes, so the
    scale is applied on the [ROWS, BLOCK_K/BS, BS/2] view of each nibble plane.
    """
    scale = _block_scale14(ws, gs_ptr, IS_NVFP4, GS_ENCODE, INTERPRET)  # [ROWS, BLOCK_K/BS]
    lo, hi = e2m1_pair_to_f32(wq)
    lo = tl.reshape(lo, (ROWS, BLOCK_K // BS, BS // 2)) * scale[:, :, None]
    hi = tl.reshape(hi, (ROWS, BLOCK_K // BS, BS // 2)) * scale[:, :, None]
    w = tl.join(lo, hi)  # [ROWS, BLOCK_K/BS, BS/2, 2]
    return tl.reshape(w, (ROWS, BLOCK_K))


@triton.jit
def fp4_dequant_kernel(wq_ptr, ws_ptr, gs_ptr, out_ptr, R, K,
                       BS: tl.constexpr, IS_NVFP4: tl.constexpr, GS_ENCODE: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    """out[R, K] = codes * effective block scale, rounded once to out's dtype."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    kb = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    ks = pid_k * (BLOCK_K // BS) + tl.arange(0, BLOCK_K // BS)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows[:, None] < R
    wq = tl.load(wq_ptr + rows[:, None] * (K // 2) + kb[None, :], mask=rmask & (kb[None, :] < K // 2), other=0)
    ws = tl.load(ws_ptr + rows[:, None] * (K // BS) + ks[None, :], mask=rmask & (ks[None, :] < K // BS), other=0)
    w = _dequant_tile(wq, ws, gs_ptr, BLOCK_R, BLOCK_K, BS, IS_NVFP4, GS_ENCODE, INTERPRET)
    tl.store(out_ptr + rows[:, None] * K + k[None, :], cast_rne(w, out_ptr.dtype.element_ty, INTERPRET),
             mask=rmask & (k[None, :] < K))


@triton.jit
def fp4_matmul_kernel(x_ptr, wq_ptr, ws_ptr, gs_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                      BS: tl.constexpr, IS_NVFP4: tl.constexpr, GS_ENCODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      GROUP_M: tl.constexpr, INTERPRET: tl.constexpr):
    """y[M, N] (+)= x[M, K] @ dequant(W)[N, K].T (+ bias), float32 accumulation.

    Grid: (tiles of M x tiles of N, SPLIT_K). With SPLIT_K == 1 the tile is written in y's dtype;
    with SPLIT_K > 1, y is a zeroed float32 workspace that each split adds into atomically.
    Tiles are visited in groups of GROUP_M rows of tiles so that neighbouring programs share weight
    tiles in L2 when M is large.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 2)
    offs_ks = tl.arange(0, BLOCK_K // BS)
    mmask = offs_m[:, None] < M
    nmask = offs_n[:, None] < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    wq_ptrs = wq_ptr + offs_n[:, None] * (K // 2) + offs_kb[None, :]
    ws_ptrs = ws_ptr + offs_n[:, None] * (K // BS) + offs_ks[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        x = tl.load(x_ptrs + k0, mask=mmask & (offs_k[None, :] < K - k0), other=0.0)
        wq = tl.load(wq_ptrs + k0 // 2, mask=nmask & (offs_kb[None, :] < (K - k0) // 2), other=0)
        ws = tl.load(ws_ptrs + k0 // BS, mask=nmask & (offs_ks[None, :] < (K - k0) // BS), other=0)
        w = _dequant_tile(wq, ws, gs_ptr, BLOCK_N, BLOCK_K, BS, IS_NVFP4, GS_ENCODE, INTERPRET)
        w = cast_rne(w, x.dtype, INTERPRET)
        if INTERPRET:  # the interpreter multiplies bf16 bit patterns in tl.dot: give it float32
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)

    ym = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    yn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + yn, mask=yn < N, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(pid_k == 0, bias, 0.0)
        acc += bias[None, :]
    y_ptrs = y_ptr + ym[:, None] * stride_ym + yn[None, :]
    ymask = (ym[:, None] < M) & (yn[None, :] < N)
    if SPLIT_K > 1:
        tl.atomic_add(y_ptrs, acc, mask=ymask, sem="relaxed")
    else:
        tl.store(y_ptrs, cast_rne(acc, y_ptr.dtype.element_ty, INTERPRET), mask=ymask)


@triton.jit
def _e2m1_word_pair(words, J: tl.constexpr):
    """int32 words of 8 packed codes -> float32 values of nibbles J and J + 4, each times 2^-14.

    The float16 placement of `_fp4_bits` done on both 16-bit halves of the word at once: after
    the shifts, nibble J's magnitude bits sit at 11..9 and its sign at 15, nibble J + 4's at
    27..25 and 31, so one word holds two float16s (on sm_90: two shifts, two LOP3, and a HADD2.F32
    per half to reach float32). 0x80008000 is written as a signed int32 literal.
    """
    if J == 3:
        h = ((words >> 3) & 0x0E000E00) | (words & -2147450880)
    else:
        h = ((words << (9 - 4 * J)) & 0x0E000E00) | ((words << (12 - 4 * J)) & -2147450880)
    lo = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (h >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _e2m1_words_to_f32(words):
    """int32 words [R, W] -> float32 [R, W, 8] (code values times 2^-14), element 8w + e at [:, w, e].

    Joins put the new axis last and inside each thread, so the planes are assembled without
    moving data between threads: element e = 4a + 2b + c is built a first (the two halves of one
    float16 pair, nibbles j and j + 4), then b, then c.
    """
    w0, w4 = _e2m1_word_pair(words, 0)
    w1, w5 = _e2m1_word_pair(words, 1)
    w2, w6 = _e2m1_word_pair(words, 2)
    w3, w7 = _e2m1_word_pair(words, 3)
    b0 = tl.join(tl.join(w0, w4), tl.join(w2, w6))  # [R, W, a, b] for c = 0
    b1 = tl.join(tl.join(w1, w5), tl.join(w3, w7))
    w = tl.join(b0, b1)  # [R, W, a, b, c]
    return tl.reshape(w, (words.shape[0], words.shape[1], 8))


@triton.jit
def fp4_skinny_kernel(x_ptr, w_ptr, s_ptr, table_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M,
                      N: tl.constexpr, K: tl.constexpr, BS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      INTERPRET: tl.constexpr):
    """y[M, N] = x[M, K] @ dequant(W)[N, K].T (+ bias) for small M (decoding).

    Grid: (tiles of N, tiles of M, SPLIT_K). Each program owns BLOCK_N output columns for BLOCK_M
    tokens and streams its rows' share of K. The packed weight is read as int32 words (8 codes
    each; a thread loads 4 words = 16 bytes), decoded with `_e2m1_words_to_f32`, multiplied by
    the block's effective scale looked up in `table` (the float32 scale of each code times 2^14,
    built once per weight by `prepare_fp4_weight`, so no division happens here), rounded once to
    x's dtype and fed to the tensor cores. The weight each MMA sees is the twin's weight bit for
    bit; only the float32 summation order differs.

    SPLIT_K > 1 (layers with few output tiles: N = 4096 gives 128 programs for 132 SMs): split s
    covers K range [s * K_SPLIT, (s + 1) * K_SPLIT) and writes its float32 partial tile to the
    workspace ws[s, M, N]; then one atomic ticket per output tile (cnt, int32, zero between
    launches) elects the last split to finish, which sums the SPLIT_K partials in split order (so
    the result does not depend on which split came last: deterministic), adds the bias, writes y,
    and resets the ticket to zero for the next launch. One launch, no zero-fill, no second kernel.
    Ordering: a CTA barrier, then the ticket's acq_rel atomic (release of this CTA's partial,
    acquire of the others'), then L2-only loads (.cg) of the partials.
    """
    W: tl.constexpr = BLOCK_K // 8
    NB: tl.constexpr = BLOCK_K // BS
    WPB: tl.constexpr = BS // 8
    K_SPLIT: tl.constexpr = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K * BLOCK_K
    EVEN_K: tl.constexpr = K % (BLOCK_K * SPLIT_K) == 0
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows[:, None] < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m[:, None] < M
    wcol = tl.arange(0, W)
    bcol = tl.arange(0, NB)
    kcol = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_SPLIT
    w_ptrs = w_ptr + rows[:, None] * (K // 8) + wcol[None, :] + k_lo // 8
    s_ptrs = s_ptr + rows[:, None] * (K // BS) + bcol[None, :] + k_lo // BS
    x_ptrs = x_ptr + offs_m[:, None] * K + kcol[None, :] + k_lo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, K_SPLIT, BLOCK_K):
        if EVEN_K:
            words = tl.load(w_ptrs + kk // 8, mask=rmask, other=0)
            codes = tl.load(s_ptrs + kk // BS, mask=rmask, other=0)
            x = tl.load(x_ptrs + kk, mask=mmask, other=0.0)
        else:
            left = K - k_lo - kk  # may be <= 0 in the last split: everything masked
            words = tl.load(w_ptrs + kk // 8, mask=rmask & (wcol[None, :] < left // 8), other=0)
            codes = tl.load(s_ptrs + kk // BS, mask=rmask & (bcol[None, :] < left // BS), other=0)
            x = tl.load(x_ptrs + kk, mask=mmask & (kcol[None, :] < left), other=0.0)
        scale = tl.load(table_ptr + codes.to(tl.int32))  # [BLOCK_N, NB] float32, times 2^14
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, NB, WPB)), (BLOCK_N, W))
        w = _e2m1_words_to_f32(words) * scale[:, :, None]  # [BLOCK_N, W, 8]: code * s_eff, one rounding
        w = cast_rne(tl.reshape(w, (BLOCK_N, BLOCK_K)), x.dtype, INTERPRET)
        if INTERPRET:  # the interpreter multiplies bf16 bit patterns in tl.dot: give it float32
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    ymask = mmask & (rows[None, :] < N)
    if SPLIT_K > 1:
        part = offs_m[:, None] * N + rows[None, :]
        tl.store(ws_ptr + pid_k * M * N + part, acc, mask=ymask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        tile = pid_m * tl.num_programs(0) + pid_n
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # the last split of this tile: reduce in split order
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(ws_ptr + s * M * N + part, mask=ymask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + part, cast_rne(acc, y_ptr.dtype.element_ty, INTERPRET), mask=ymask)
            tl.store(cnt_ptr + tile, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * N + rows[None, :]
        tl.store(y_ptrs, cast_rne(acc, y_ptr.dtype.element_ty, INTERPRET), mask=ymask)
