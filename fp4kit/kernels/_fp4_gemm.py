"""Triton kernels behind `fp4_gemm`: FP4 weight dequantize and the W4A16 GEMM. See `fp4_gemm` for the math."""

import triton
import triton.language as tl

from ._fp4_bits import (cast_rne, e2m1_pair_to_f32, e2m1_word_pair_bf16, e4m3_bf16x2_shifted, e8m0_bf16x2, mxfp4_scale14,
                        nvfp4_scale14)


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
def _bf16_halves(h):
    """int32 holding two bfloat16s -> (low, high) bfloat16 tensors (register halves, no arithmetic)."""
    lo = h.to(tl.int16).to(tl.bfloat16, bitcast=True)
    hi = (h >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return lo, hi


@triton.jit
def _bf16_scaled_pair(h, scale2, ONE_MUL: tl.constexpr, INTERPRET: tl.constexpr):
    """(code pair times 2^-126) * power-of-two scale pair -> (low, high) bfloat16, exact.

    ONE_MUL: scale2 holds 2^(c-1) (E8M0 code c <= 128), one mul.rn.bf16x2 per two weights.
    Otherwise scale2 holds 2^(c-127) and the pair is first multiplied by 2^126 (0x7E80).
    Multiplying by a power of two is exact unless the result leaves bfloat16's range, where the
    hardware's round-to-nearest-even gives what the twin's float32 product rounded to bfloat16
    gives. The interpreter has no inline PTX: it multiplies the halves as float32 and rounds
    (the same numbers; the products are exact).
    """
    if INTERPRET:
        lo_a = (h << 16).to(tl.float32, bitcast=True)
        hi_a = (h & -65536).to(tl.float32, bitcast=True)
        lo_s = (scale2 << 16).to(tl.float32, bitcast=True)
        hi_s = (scale2 & -65536).to(tl.float32, bitcast=True)
        if not ONE_MUL:
            lo_a = lo_a * 8.507059173023462e37  # 2^126
            hi_a = hi_a * 8.507059173023462e37
        return cast_rne(lo_a * lo_s, tl.bfloat16, INTERPRET), cast_rne(hi_a * hi_s, tl.bfloat16, INTERPRET)
    else:
        if ONE_MUL:
            m = tl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [h, scale2],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            m = tl.inline_asm_elementwise(
                "{ .reg .b32 t, c; mov.b32 c, 0x7E807E80; mul.rn.bf16x2 t, $1, c; mul.rn.bf16x2 $0, t, $2; }",
                "=r,r,r", [h, scale2], dtype=tl.int32, is_pure=True, pack=1)
        return _bf16_halves(m)


@triton.jit
def _mxfp4_words_to_bf16(words, scale2, ONE_MUL: tl.constexpr, INTERPRET: tl.constexpr):
    """int32 words [R, W] + bf16x2 power-of-two scales [R, W] -> bfloat16 [R, W * 8] in pair order: position
    8w + 2J + a holds element 8w + J + 4a, so each mul.rn.bf16x2 result is one MMA operand register as it is
    (no PRMT); x is put in the same k order by `pair_order_x`."""
    w0, w4 = _bf16_scaled_pair(e2m1_word_pair_bf16(words, 0), scale2, ONE_MUL, INTERPRET)
    w1, w5 = _bf16_scaled_pair(e2m1_word_pair_bf16(words, 1), scale2, ONE_MUL, INTERPRET)
    w2, w6 = _bf16_scaled_pair(e2m1_word_pair_bf16(words, 2), scale2, ONE_MUL, INTERPRET)
    w3, w7 = _bf16_scaled_pair(e2m1_word_pair_bf16(words, 3), scale2, ONE_MUL, INTERPRET)
    lo = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [R, W, 2, 2]: nibble J at J
    hi = tl.join(tl.join(w4, w6), tl.join(w5, w7))  # nibble J + 4 at J
    w = tl.join(lo, hi)  # [R, W, 4, 2]: position 2J + a holds nibble J + 4a (a register's two halves adjacent)
    return tl.reshape(w, (words.shape[0], words.shape[1] * 8))


@triton.jit
def pair_order_x(x, MX_BF16: tl.constexpr):
    """x [BM, BK] in the k order of `_mxfp4_words_to_bf16` (position 8w + 2J + a holds k = 8w + J + 4a) when
    MX_BF16, unchanged otherwise. The MMA sums over k, so permuting k in both operands changes nothing."""
    if MX_BF16:
        BM: tl.constexpr = x.shape[0]
        BK: tl.constexpr = x.shape[1]
        x4 = tl.reshape(x, (BM, BK // 8, 2, 4))
        return tl.reshape(tl.permute(x4, (0, 1, 3, 2)), (BM, BK))
    else:
        return x


@triton.jit
def decode_weight_tile(words, codes, table_ptr, x_dtype: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, BS: tl.constexpr, MX_BF16: tl.constexpr, ONE_MUL: tl.constexpr,
                       INTERPRET: tl.constexpr, SCALE_REG: tl.constexpr = False):
    """Packed words [BLOCK_N, BLOCK_K/8] + scale codes [BLOCK_N, BLOCK_K/BS] -> weights [BLOCK_N, BLOCK_K] in x_dtype.

    General path: float16-pair decode to float32, times the tabled float32 scale (times 2^14),
    one rounding to x's dtype. MX_BF16 (MXFP4 weight, bfloat16 x): table holds bf16x2 powers of
    two and the weights are built in bfloat16 directly (`_mxfp4_words_to_bf16`): the same bits,
    about half the instructions per weight. The same bf16 decode serves NVFP4 with the table of E4M3 x 2^117
    (the caller multiplies the sums by the per-tensor factor x 2^9). SCALE_REG (bf16 decode): the bf16x2 scales
    computed from the codes in registers (`e4m3_bf16x2_shifted`, `e8m0_bf16x2`), the table's entries bit for
    bit, instead of one gathered load per block.
    """
    W: tl.constexpr = BLOCK_K // 8
    NB: tl.constexpr = BLOCK_K // BS
    WPB: tl.constexpr = BS // 8
    if SCALE_REG and BS == 16:
        scale = e4m3_bf16x2_shifted(codes)  # [BLOCK_N, NB] int32 bf16x2
    elif SCALE_REG:
        scale = e8m0_bf16x2(codes, ONE_MUL)
    else:
        scale = tl.load(table_ptr + codes.to(tl.int32))  # [BLOCK_N, NB]
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, NB, WPB)), (BLOCK_N, W))
    if MX_BF16:
        return _mxfp4_words_to_bf16(words, scale, ONE_MUL, INTERPRET)
    else:
        w = _e2m1_words_to_f32(words) * scale[:, :, None]  # [BLOCK_N, W, 8]: code * s_eff, one rounding
        return cast_rne(tl.reshape(w, (BLOCK_N, BLOCK_K)), x_dtype, INTERPRET)


@triton.jit
def fp4_skinny_kernel(x_ptr, w_ptr, s_ptr, table_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M,
                      N: tl.constexpr, K: tl.constexpr, BS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                      MX_BF16: tl.constexpr, ONE_MUL: tl.constexpr, INTERPRET: tl.constexpr,
                      M_FAST: tl.constexpr = False):
    """y[M, N] = x[M, K] @ dequant(W)[N, K].T (+ bias) for small M (decoding), and any M with M_FAST.

    Grid: (tiles of N, tiles of M, SPLIT_K), or (tiles of M, tiles of N, SPLIT_K) with M_FAST (prefill:
    see `_tile_ids`). Each program owns BLOCK_N output columns for BLOCK_M tokens and streams its rows'
    share of K. The packed weight is read as int32 words (8 codes
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
    K_SPLIT: tl.constexpr = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K * BLOCK_K
    EVEN_K: tl.constexpr = K % (BLOCK_K * SPLIT_K) == 0
    pid_n, pid_m, tile = _tile_ids(M_FAST)
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
        w = decode_weight_tile(words, codes, table_ptr, x.dtype, BLOCK_N, BLOCK_K, BS, MX_BF16, ONE_MUL, INTERPRET)
        x = pair_order_x(x, MX_BF16)
        if INTERPRET:  # the interpreter multiplies bf16 bit patterns in tl.dot: give it float32
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    ymask = mmask & (rows[None, :] < N)
    _splitk_store(acc, offs_m[:, None] * N + rows[None, :], ymask, rows[None, :], bias_ptr, y_ptr, ws_ptr, cnt_ptr,
                  pid_k * M * N, M * N, tile, N, SPLIT_K, HAS_BIAS, INTERPRET)


@triton.jit
def _tile_ids(M_FAST: tl.constexpr):
    """(tile of N, tile of M, linear tile id) of this program.

    Default grid (tiles of N, tiles of M, splits): neighbouring programs own neighbouring weight rows,
    which is what decoding wants (one or two token tiles; every program streams different weight bytes).
    M_FAST grid (tiles of M, tiles of N, splits), for prefill: the programs that share one weight tile
    run back to back, so each weight tile comes from DRAM once and the other token tiles read it from L2
    (x, re-read by every weight tile, is the small operand there: 2 M K bytes against the weight's
    K N / 2 + scales).
    """
    if M_FAST:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        tile = pid_n * tl.num_programs(0) + pid_m
    else:
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        tile = pid_m * tl.num_programs(0) + pid_n
    return pid_n, pid_m, tile


@triton.jit
def _splitk_store(acc, part, ymask, cols, bias_ptr, y_ptr, ws_ptr, cnt_ptr, ws_off, ws_stride, tile, N,
                  SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    """Write a float32 output tile: y[part] = acc (+ bias[cols]), rounded once to y's dtype.

    With SPLIT_K > 1 the tile is one split's partial: it goes to the workspace at ws_off, then the
    split takes a ticket for its tile; the last one to arrive sums the SPLIT_K partials in split
    order (deterministic, whatever order the splits finished in), adds the bias, writes y and puts
    the ticket back to zero for the next launch. `cols` is the output column of each acc element
    (broadcastable to acc; the skinny kernel's acc is [M, N], fp4_mma's [N, M])."""
    if SPLIT_K > 1:
        tl.store(ws_ptr + ws_off + part, acc, mask=ymask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # the last split of this tile: reduce in split order
            acc = tl.zeros_like(acc)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(ws_ptr + s * ws_stride + part, mask=ymask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
            tl.store(y_ptr + part, cast_rne(acc, y_ptr.dtype.element_ty, INTERPRET), mask=ymask)
            tl.store(cnt_ptr + tile, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + part, cast_rne(acc, y_ptr.dtype.element_ty, INTERPRET), mask=ymask)


@triton.jit
def _prmt_byte(a, b, nib):
    """Interpreter model of one output byte of PTX `prmt.b32` (default mode): nibble bits 2..0 pick byte
    0..7 of {b, a} (a holds bytes 0..3), bit 3 replicates that byte's sign bit into all eight bits."""
    idx = nib & 7
    byte = (tl.where(idx < 4, a, b) >> ((idx & 3) * 8)) & 0xFF
    return tl.where((nib & 8) != 0, tl.where((byte & 0x80) != 0, 0xFF, 0), byte)


@triton.jit
def _prmt(a, b, sel, INTERPRET: tl.constexpr):
    """PTX `prmt.b32 d, a, b, sel`: byte i of d is chosen by nibble i of sel (see `_prmt_byte`); int32."""
    if INTERPRET:
        return (_prmt_byte(a, b, sel & 15) | (_prmt_byte(a, b, (sel >> 4) & 15) << 8)
                | (_prmt_byte(a, b, (sel >> 8) & 15) << 16) | (_prmt_byte(a, b, (sel >> 12) & 15) << 24))
    else:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _lut_pair(lo, hi, words, w4, VSEL: tl.constexpr, SSEL: tl.constexpr, INTERPRET: tl.constexpr):
    """One register of two decoded 16-bit weights: the magnitudes' low and high bytes interleaved (VSEL),
    OR the two codes' sign bits (SSEL picks, with sign replication, the byte of w4 = words << 4 or of
    words whose bit 7 is the code's sign, into bytes 1 and 3; the mask keeps bits 15 and 31)."""
    mag = _prmt(lo, hi, tl.full(lo.shape, VSEL, tl.int32), INTERPRET)
    sign = _prmt(w4, words, tl.full(lo.shape, SSEL, tl.int32), INTERPRET)
    return mag | (sign & -2147450880)  # 0x80008000 as a signed int32


@triton.jit
def decode_weight_tile_lut(words, codes, lut_ptr, x_dtype: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, BS: tl.constexpr, INTERPRET: tl.constexpr):
    """Packed words [BLOCK_N, BLOCK_K/8] + scale codes [BLOCK_N, BLOCK_K/BS] -> weights [BLOCK_N, BLOCK_K] in
    x_dtype by byte permutes from a per-scale-code table (any FP4 format, bfloat16 or float16 x).

    The table (`fp4_mma.lut_table`, int32 [256, 4]) holds, for each scale code c, the eight magnitudes
    x_dtype(e2m1(j) * s_eff(c)), j = 0..7, computed by torch exactly as the twin computes its weights
    (one float32 product, one rounding), as four registers: the low bytes of entries 0..3 and 4..7, then
    the high bytes. A code's magnitude bits are a byte index 0..7, so `prmt` with the word's nibbles
    (sign bits masked off) as selectors looks up four weights' low bytes (or high bytes) at once: per
    word of 8 codes, 4 look-ups, 4 permutes interleaving low and high bytes into pairs of weights, and
    the sign of each code (bit 3 of its nibble) moved to bit 15 of its half by a sign-replicating
    permute and an AND/OR: ~2.5 instructions per weight and no float arithmetic, against ~5 for the
    float16-pair decode with its float32 scale multiply. The weights are the twin's bit for bit for
    every scale code (NaN and overflow included), and come out in natural k order (x is not permuted).
    """
    W: tl.constexpr = BLOCK_K // 8
    NB: tl.constexpr = BLOCK_K // BS
    WPB: tl.constexpr = BS // 8
    base = codes.to(tl.int32) * 4  # [BLOCK_N, NB]
    t0 = tl.reshape(tl.broadcast_to(tl.load(lut_ptr + base)[:, :, None], (BLOCK_N, NB, WPB)), (BLOCK_N, W))
    t1 = tl.reshape(tl.broadcast_to(tl.load(lut_ptr + base + 1)[:, :, None], (BLOCK_N, NB, WPB)), (BLOCK_N, W))
    t2 = tl.reshape(tl.broadcast_to(tl.load(lut_ptr + base + 2)[:, :, None], (BLOCK_N, NB, WPB)), (BLOCK_N, W))
    t3 = tl.reshape(tl.broadcast_to(tl.load(lut_ptr + base + 3)[:, :, None], (BLOCK_N, NB, WPB)), (BLOCK_N, W))
    sel_a = words & 0x7777  # nibbles of codes 0..3, sign bits off
    sel_b = (words >> 16) & 0x7777  # codes 4..7
    lo_a = _prmt(t0, t1, sel_a, INTERPRET)  # low bytes of weights 0..3
    hi_a = _prmt(t2, t3, sel_a, INTERPRET)  # high bytes
    lo_b = _prmt(t0, t1, sel_b, INTERPRET)
    hi_b = _prmt(t2, t3, sel_b, INTERPRET)
    w4 = words << 4  # bit 7 of byte i: the sign of code 2i (bit 7 of words' byte i: code 2i + 1)
    p0 = _lut_pair(lo_a, hi_a, words, w4, 0x5140, 0xC080, INTERPRET)  # weights 0, 1
    p1 = _lut_pair(lo_a, hi_a, words, w4, 0x7362, 0xD090, INTERPRET)  # weights 2, 3
    p2 = _lut_pair(lo_b, hi_b, words, w4, 0x5140, 0xE0A0, INTERPRET)  # weights 4, 5
    p3 = _lut_pair(lo_b, hi_b, words, w4, 0x7362, 0xF0B0, INTERPRET)  # weights 6, 7
    q0 = tl.join(_halves(p0, x_dtype), _halves(p1, x_dtype))  # [BLOCK_N, W, 2 (half h), 2 (pair p)]
    q1 = tl.join(_halves(p2, x_dtype), _halves(p3, x_dtype))
    w = tl.join(q0, q1)  # [BLOCK_N, W, h, p, q]: element 8w + 4q + 2p + h (joins add the last axis)
    return tl.reshape(tl.permute(w, (0, 1, 4, 3, 2)), (BLOCK_N, BLOCK_K))  # natural k order


@triton.jit
def _halves(h, x_dtype: tl.constexpr):
    """int32 holding two 16-bit floats -> [..., 2] tensor of x_dtype (low half first)."""
    lo = h.to(tl.int16).to(x_dtype, bitcast=True)
    hi = (h >> 16).to(tl.int16).to(x_dtype, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def _mma_weights(w_ptrs, s_ptrs, kk, left, rmask, wcol, bcol, BS: tl.constexpr, EVEN_K: tl.constexpr,
                 EVICT: tl.constexpr):
    """One K step's packed words [BLOCK_N, BLOCK_K/8] and scale codes [BLOCK_N, BLOCK_K/BS] (left: K left;
    rmask may carry a scalar condition that switches the whole step off)."""
    if EVEN_K:
        words = tl.load(w_ptrs + kk // 8, mask=rmask, other=0, eviction_policy=EVICT)
        codes = tl.load(s_ptrs + kk // BS, mask=rmask, other=0, eviction_policy=EVICT)
    else:
        words = tl.load(w_ptrs + kk // 8, mask=rmask & (wcol[None, :] < left // 8), other=0, eviction_policy=EVICT)
        codes = tl.load(s_ptrs + kk // BS, mask=rmask & (bcol[None, :] < left // BS), other=0, eviction_policy=EVICT)
    return words, codes


@triton.jit
def _mma_step(acc, words, codes, x_ptrs, kk, left, mmask, kcol, table_ptr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, BS: tl.constexpr, EVEN_K: tl.constexpr, MX_BF16: tl.constexpr,
              ONE_MUL: tl.constexpr, LUT: tl.constexpr, INTERPRET: tl.constexpr):
    """acc[BLOCK_N, BLOCK_M] += decode(words, codes) @ x[:, kk:kk + BLOCK_K].T."""
    if EVEN_K:
        x = tl.load(x_ptrs + kk, mask=mmask, other=0.0)
    else:
        x = tl.load(x_ptrs + kk, mask=mmask & (kcol[None, :] < left), other=0.0)
    if LUT:
        w = decode_weight_tile_lut(words, codes, table_ptr, x.dtype, BLOCK_N, BLOCK_K, BS, INTERPRET)
        xt = tl.trans(x)  # [BLOCK_K, BLOCK_M]
    else:
        w = decode_weight_tile(words, codes, table_ptr, x.dtype, BLOCK_N, BLOCK_K, BS, MX_BF16, ONE_MUL, INTERPRET)
        xt = tl.trans(pair_order_x(x, MX_BF16))
    if INTERPRET:  # the interpreter multiplies bf16 bit patterns in tl.dot: give it float32
        return tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(w, xt, acc)


@triton.jit
def fp4_mma_kernel(x_ptr, w_ptr, s_ptr, table_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr, M,
                   N: tl.constexpr, K: tl.constexpr, BS: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                   MX_BF16: tl.constexpr, ONE_MUL: tl.constexpr, LUT: tl.constexpr, EVICT: tl.constexpr,
                   PDL: tl.constexpr, PREFETCH: tl.constexpr, INTERPRET: tl.constexpr,
                   M_FAST: tl.constexpr = False):
    """y[M, N] = x[M, K] @ dequant(W)[N, K].T (+ bias) for 3 <= M <= 64, with the MMA's operands swapped.

    The skinny kernel computes acc[BLOCK_M, BLOCK_N] = x @ w.T: the tokens are the MMA's M side, so
    on Hopper the product is an `mma.sync` m16n8k16 per warp (wgmma needs 64 rows per warpgroup).
    Here the weight tile is the M side instead: acc[BLOCK_N, BLOCK_M] = w @ x.T with BLOCK_N = 64 or
    128 weight rows, the tokens the MMA's N side (8..256 on Hopper). Every row of every MMA is then a
    useful weight row, and the dot qualifies for `wgmma` with its A operand (the weights, decoded in
    registers) read from registers and B (x.T, small) from shared memory (checked in the TTGIR:
    `warp_group_dot` with a `dot_op` A). The decode is the skinny kernel's (`decode_weight_tile`), or
    with LUT the byte-permute table decode (`decode_weight_tile_lut`; table_ptr is then the int32
    [256, 4] table): either way the weights the MMA sees are the twin's, bit for bit; only the float32
    summation order differs.

    Grid (tiles of N, tiles of M, SPLIT_K; M_FAST swaps the first two, see `_tile_ids`) and the split-K
    ticket reduction are the skinny kernel's (see `fp4_skinny_kernel`); the workspace holds [SPLIT_K, M, N] partials as there.
    EVICT: eviction policy of the streamed weight loads ("" or "evict_first": the weights are read
    once, x is re-read by every program). PDL (programmatic dependent launch, as in `_fp4_gemv`): let
    the next kernel launch first thing, put the first K step's weights in flight (weights never
    depend on an earlier kernel), then `griddepcontrol.wait` for the previous kernel before reading x
    or writing y, the partials or the tickets. The interpreter has no inline PTX: PDL is False there.
    PREFETCH (meant for num_stages=1, plain loads into registers): the next K step's words and scale
    codes are loaded before this step's are decoded (a register double buffer: one step of weight
    bytes more in flight per program, without the shared-memory round trip of Triton's pipelining).
    """
    W: tl.constexpr = BLOCK_K // 8
    NB: tl.constexpr = BLOCK_K // BS
    K_SPLIT: tl.constexpr = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K * BLOCK_K
    EVEN_K: tl.constexpr = K % (BLOCK_K * SPLIT_K) == 0
    START: tl.constexpr = BLOCK_K if PDL else 0  # with PDL the first K step is peeled off the loop
    pid_n, pid_m, tile = _tile_ids(M_FAST)
    pid_k = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # weight rows = output columns
    rmask = rows[:, None] < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m[:, None] < M
    wcol = tl.arange(0, W)
    bcol = tl.arange(0, NB)
    kcol = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_SPLIT
    w_ptrs = w_ptr + rows[:, None] * (K // 8) + wcol[None, :] + k_lo // 8  # [BLOCK_N, W]
    s_ptrs = s_ptr + rows[:, None] * (K // BS) + bcol[None, :] + k_lo // BS  # [BLOCK_N, NB]
    x_ptrs = x_ptr + offs_m[:, None] * K + kcol[None, :] + k_lo  # [BLOCK_M, BLOCK_K]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if PREFETCH or PDL:  # the first step's weights, before the wait (they never depend on an earlier kernel)
        words, codes = _mma_weights(w_ptrs, s_ptrs, 0, K - k_lo, rmask, wcol, bcol, BS, EVEN_K, EVICT)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if PREFETCH:
        for kk in range(0, K_SPLIT, BLOCK_K):
            left = K - k_lo - kk  # may be <= 0 in the last split: everything masked
            live = rmask & (kk + BLOCK_K < K_SPLIT)  # the next step exists in this split
            nwords, ncodes = _mma_weights(w_ptrs, s_ptrs, kk + BLOCK_K, left - BLOCK_K, live, wcol, bcol, BS,
                                          EVEN_K, EVICT)
            acc = _mma_step(acc, words, codes, x_ptrs, kk, left, mmask, kcol, table_ptr, BLOCK_N, BLOCK_K, BS,
                            EVEN_K, MX_BF16, ONE_MUL, LUT, INTERPRET)
            words, codes = nwords, ncodes
    else:
        if PDL:
            acc = _mma_step(acc, words, codes, x_ptrs, 0, K - k_lo, mmask, kcol, table_ptr, BLOCK_N, BLOCK_K, BS,
                            EVEN_K, MX_BF16, ONE_MUL, LUT, INTERPRET)
        for kk in range(START, K_SPLIT, BLOCK_K):
            left = K - k_lo - kk  # may be <= 0 in the last split: everything masked
            words, codes = _mma_weights(w_ptrs, s_ptrs, kk, left, rmask, wcol, bcol, BS, EVEN_K, EVICT)
            acc = _mma_step(acc, words, codes, x_ptrs, kk, left, mmask, kcol, table_ptr, BLOCK_N, BLOCK_K, BS,
                            EVEN_K, MX_BF16, ONE_MUL, LUT, INTERPRET)
    part = offs_m[None, :] * N + rows[:, None]  # [BLOCK_N, BLOCK_M]: y[m, n] = acc[n, m]
    ymask = (offs_m[None, :] < M) & (rows[:, None] < N)
    _splitk_store(acc, part, ymask, rows[:, None], bias_ptr, y_ptr, ws_ptr, cnt_ptr, pid_k * M * N, M * N,
                  tile, N, SPLIT_K, HAS_BIAS, INTERPRET)
