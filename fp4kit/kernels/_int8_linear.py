"""Triton kernel of `int8_linear`: y = (x @ q.T) * s (+ bias) for INT8 weights with one scale per row.

Why tensor cores at every M. An INT8 weight is one byte per element and one exact conversion to bf16
(I2F then a pack: ~1.5 instructions per weight), so at the H100's ~3 TB/s the kernel has ~10
instructions of issue per weight to spare even at M = 1: unlike FP4 (two weights per byte, ~7
instructions each to build MMA operands), padding one token to the MMA's 16 columns costs nothing that
shows. One kernel serves decode (M = 1..64) and the rare larger M.

Swap-AB. The weight is the big operand, so it is the MMA's M side: a program owns BLOCK_N weight rows
and BLOCK_M tokens and accumulates acc[BLOCK_N, BLOCK_M] = q[BLOCK_N, K] @ x[BLOCK_M, K].T over K in
BLOCK_K steps (Triton pipelines the int8 tile loads through shared memory, `num_stages` deep). Tokens
past M are masked loads (zeros): at M = 1 the x tile is one real column of 16.

Numerics. Codes are exact in bf16/fp16 and code x activation is exact in float32, so the float32
accumulator holds sum_k x_k q_nk up to summation order; then acc * s_n (+ bias_n) in float32 and one
rounding to y's dtype. The twin (`int8_linear_torch`) computes the same expression with torch's
float32 matmul: they differ by the order of the float32 sum only.

Program order: the M tiles of one N tile are neighbours (pid_m fastest), so when M spans several tiles
a weight tile is read from memory once and then from L2.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._fp4_bits import cast_rne


@triton.jit
def int8_linear_kernel(x_ptr, q_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_K: tl.constexpr, PDL: tl.constexpr, INTERPRET: tl.constexpr):
    """Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),). q: int8 [N, K] row-major, s: float32 [N]. The result is
    rounded to x's dtype, then stored in y's (a float32 y holds x-dtype values: the engine's logits, written
    once instead of a bf16 write, a read and a float32 write)."""
    if PDL:  # decode chain: let the next kernel launch; read x only once the previous one is done
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % n_m
    pid_n = pid // n_m

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    nmask = offs_n[:, None] < N
    mmask = offs_m[None, :] < M
    q_ptrs = q_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # the x tile transposed: [BLOCK_K, BLOCK_M]

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        q = tl.load(q_ptrs + k0, mask=nmask & (offs_k[None, :] < K - k0), other=0)
        xt = tl.load(x_ptrs + k0, mask=mmask & (offs_k[:, None] < K - k0), other=0.0)
        if INTERPRET:  # the interpreter multiplies bf16 bit patterns in tl.dot: give it float32
            acc = tl.dot(q.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(q.to(xt.dtype), xt, acc)

    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    acc = acc * s[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    y = cast_rne(acc, x_ptr.dtype.element_ty, INTERPRET)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=nmask & mmask)
