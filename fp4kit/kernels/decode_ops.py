"""Fused kernels for one decode step (T = 1 token per row), each launcher beside its torch twin.

A decode step of an 8B model at batch 1 moves ~4.5 GB of NVFP4 weights: ~1.5 ms at the H100's
3 TB/s. Before these kernels the step took 6.2 ms, half of it in ~45 small kernels per layer
(HF RMSNorm ~7 kernels, rope ~10, mask + SDPA + transposes, residual adds, silu * mul) and in the
separate q/k/v and gate/up GEMMs. Here each piece of glue is one kernel:

    decode_attention   q [B, Hq, D] against the static cache [Bmax, Hkv, S, D] (bf16, or FP8 E4M3
                       with one float32 scale per (row, head, slot)), GQA without repeating K/V,
                       the visibility rule of the engine's mask evaluated in registers:
                           key j visible  <=>  pad[b] <= j <= slot (and slot - j < window)  or j = slot
                       Split-KV (flash-decoding): program (b, h, s) runs an online softmax over its
                       key range for the G = Hq / Hkv query heads of kv head h (one tl.dot with the
                       G rows padded to 16), writes its unnormalised output, max and sum; a second
                       small kernel merges the splits. With one split (many rows, or a short cache)
                       the split kernel normalises and writes the output itself (no combine).
                       FP8: codes are read as bytes and decoded in registers; the scales factor out
                       of the dot products,
                           q . (c_j s_j) = (q . c_j) s_j      sum_j p_j (c_j s_j) = sum_j (p_j s_j) c_j
                       so the FP8 cache moves ~half the bytes of bf16 and is never dequantized in
                       memory. Keys past `slot` are masked loads: no bytes move for them.
                       With PDL and an FP8 cache, each program first asks for its first
                       ATTN_PREFETCH_KEYS keys to be brought into L2 (one bulk prefetch for K, one
                       for V) and only then waits for the q/k/v GEMM: the old keys were written by
                       earlier steps, so their bytes move during the GEMM's tail.
    add_rmsnorm        h = h + delta; n = RMSNorm(h) in float32 as HF computes it, Llama's
                       `w * x_hat.to(dtype)` or Gemma's `(x_hat * (1 + w)).to(dtype)`
    silu_mul           silu(gate) * up from the fused gate_up GEMM's output [.., 2I]
    rope_write         rotate_half rope on q and k (each product rounded to the activation dtype, as
                       torch's bf16 ops round), k and v stored straight into the cache at `slot`, for
                       an FP8 cache quantized per vector on the way (KVCache's arithmetic as torch
                       runs it on the device: amax / 448 is a product with the float32 reciprocal on
                       CUDA and an IEEE division on the CPU; x / scale an IEEE division via div_rn)
    rope_decode_attention
                       rope_write + decode_attention in the attention launch (what the engine calls):
                       each program rotates its G query heads itself, and the program whose key range
                       holds the slot rotates k and stores k and v (rope_write's code) before its loop
                       reads them; the same bits as the two launches. A bf16 cache read in one split
                       keeps the separate rope kernel (ROPE_IN_DIRECT_BF16: measured faster there)

Twins are the specification (`*_torch`): the engine's previous torch path. The kernels follow
their rounding points, except attention, whose float32 online softmax differs from SDPA by
summation order and by rounding p to bf16 before the P.V product (as flash attention does):
tests/kernels/test_decode_ops.py states the tolerances. Launchers run Triton on CUDA tensors
(and anywhere under TRITON_INTERPRET=1); otherwise they call the twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp4_gemm import _interpreting, use_pdl, use_triton

try:
    import triton

    from . import _decode_ops
except ImportError:  # CPU installs without triton use the twins
    pass

ATTN_BLOCK_L = 64  # keys per tile on the GPU (16 in the interpreter)
ATTN_PROGRAMS_PER_SM = 4  # split the keys until the grid has about this many programs per SM
ATTN_MAX_SPLITS = 64
ATTN_NUM_WARPS = 4
ATTN_NUM_STAGES = 2
# Registers per thread cap for the split kernel (None: the compiler's ~145-168): 128 measured faster at
# batch 1-8 (FP8 at 32K keys 43.8 -> 35.9 us, 8K 16.4 -> 13.5) and for bf16 everywhere; not for an FP8 cache
# in one split (ATTN_FP8_SINGLE_SPLIT below). BENCHMARKS.md, "Decode attention over the FP8 cache".
ATTN_MAXNREG = 128
# One split (and no combine kernel: the split kernel writes the output) once B x Hkv >= this x the SM count
# and the cache is at most ATTN_SINGLE_SPLIT_MAX_TILES tiles long (bf16, 32 rows x 576 keys: 36.4 -> 30.9 us;
# longer caches are slower unsplit). 0: split by ATTN_PROGRAMS_PER_SM always. One split never runs the combine.
ATTN_SINGLE_SPLIT_WAVES = 1.0
ATTN_SINGLE_SPLIT_MAX_TILES = 16
# An FP8 cache in one split over at most this many waves of (row, kv head) programs runs with (warps, stages,
# register cap, keys per tile) ATTN_FP8_SINGLE_SPLIT instead: 8 warps, 3 stages, no cap took the batch-32 step's
# attention from 33.0 to 22.4 us (576 keys) and 56.3 to 36.8 (1,024); with 64 rows the defaults stay better (36.3
# vs 41.7 us). None: the defaults everywhere (the bench's sweeps). From ATTN_FP8_LONG_MIN_KEYS keys on,
# ATTN_FP8_SINGLE_SPLIT_LONG: 128-key tiles with 4 warps (H100, 32 rows: 640 keys 24.5 -> 23.5 us, 768 keys
# 28.7 -> 27.1, 1,024 36.7 -> 32.8; at 576 keys 22.5 -> 23.2, slower: 4.5 tiles of 128).
ATTN_FP8_SINGLE_SPLIT = (8, 3, None, 64)
ATTN_FP8_SINGLE_SPLIT_LONG = (4, 3, None, 128)
ATTN_FP8_LONG_MIN_KEYS = 600
ATTN_FP8_SINGLE_SPLIT_MAX_WAVES = 2.0
# (benchmarks/bench_decode_attention.py sweeps these; BENCHMARKS.md has the H100 results)
# With PDL, an FP8 cache: keys per program whose K and V (and scales) are prefetched into L2 before the kernel
# waits for the previous launch (one bulk request each, issued by one thread; 0: none). The cache's old keys were
# written by earlier steps, so their bytes can move while the q/k/v GEMM finishes. Engine, Llama-3-8B shape, NVFP4,
# FP8 cache, INT8 head, prompt 512 + 256 tokens, H100 (BENCHMARKS.md, "Cache bytes before the PDL wait"): batch 32
# 3.617-3.629 -> 3.560-3.566 ms per step with 128 keys (256: 3.607-3.616, 640: 3.680-3.688), batch 1 2.349-2.353
# -> 2.324. A bf16 cache measured slower at batch 32 in one split (NVFP4 3.966-3.973 -> 3.981-3.986 ms, bf16
# weights 7.251-7.254 -> 7.291-7.292), hence ATTN_PREFETCH_BF16 off.
ATTN_PREFETCH_KEYS = 128
ATTN_PREFETCH_BF16 = False


# ----------------------------------------------------------------------------------------------
# decode attention


def decode_mask(pad: torch.Tensor, slot: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """bool [B, 1, 1, L]: the engine's visibility rule for one query at `slot` (pad [B], slot long [1])."""
    j = torch.arange(length, device=pad.device)
    vis = (j[None, :] >= pad[:, None]) & (j[None, :] <= slot)  # [B, L]
    if window is not None:
        vis = vis & (slot - j[None, :] < window)
    vis = vis | (j[None, :] == slot)
    return vis[:, None, None, :]


def _dequantized(codes: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return codes.to(dtype)
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)  # KVCache's dequantize_kv_fp8


def decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, pad: torch.Tensor,
                           slot: torch.Tensor, kv_len: int, window: int | None, scaling: float) -> torch.Tensor:
    """Twin of `decode_attention`: dequantize the live prefix, mask, SDPA. Returns [B, Hq * D] in q's dtype."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    k = _dequantized(k_cache[:B, :, :kv_len], None if k_scale is None else k_scale[:B, :, :kv_len], q.dtype)
    v = _dequantized(v_cache[:B, :, :kv_len], None if v_scale is None else v_scale[:B, :, :kv_len], q.dtype)
    mask = decode_mask(pad, slot, kv_len, window)  # [B, 1, 1, L], the same for the G heads of a kv head
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, Hq // Hkv, D), k, v, attn_mask=mask, scale=scaling)
    return out.reshape(B, Hq * D)


def _attn_splits(B: int, Hkv: int, kv_len: int, block_l: int, sm_count: int) -> tuple[int, int]:
    """(splits, tiles per split): enough programs to fill the GPU, every split a whole number of tiles; one
    split when the (row, kv head) programs alone number ATTN_SINGLE_SPLIT_WAVES x the SMs or more and the
    cache is short (ATTN_SINGLE_SPLIT_MAX_TILES)."""
    tiles = triton.cdiv(kv_len, block_l)
    if (ATTN_SINGLE_SPLIT_WAVES and B * Hkv >= ATTN_SINGLE_SPLIT_WAVES * sm_count
            and tiles <= ATTN_SINGLE_SPLIT_MAX_TILES):
        return 1, tiles
    want = triton.cdiv(ATTN_PROGRAMS_PER_SM * sm_count, B * Hkv)
    splits = max(1, min(tiles, want, ATTN_MAX_SPLITS))
    iters = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, iters), iters


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, pad: torch.Tensor,
                     slot: torch.Tensor, kv_len: int, window: int | None, scaling: float) -> torch.Tensor:
    """Attention of one query token per row over the static cache -> [B, Hq * D] in q's dtype.

    q [B, Hq, D] (last dim contiguous); k_cache, v_cache [Bmax, Hkv, S, D] in q's dtype or
    float8_e4m3fn with k_scale, v_scale float32 [Bmax, Hkv, S]; pad long [B]; slot long [1] (the
    query's slot, already written); keys 0..kv_len-1 are considered; window None or the sliding
    window; scaling the softmax scale."""
    return _decode_attention(q, k_cache, v_cache, k_scale, v_scale, pad, slot, kv_len, window, scaling)


# False: rope_decode_attention always runs rope_write and decode_attention as two launches (the benchmark's
# "before" in the same process).
ROPE_IN_ATTENTION = True
# The fold in one regime: a bf16 cache read in one split (DIRECT). Engine, Llama-3-8B shape, batch 32, H100,
# NVFP4 weights (BENCHMARKS.md, "Two launches fewer per layer"): bf16 cache 4.20 -> 4.24 ms per step with the
# fold, FP8 cache 4.03 -> 3.97, in two alternating runs; so a bf16 cache in one split keeps the rope kernel.
ROPE_IN_DIRECT_BF16 = False


def rope_decode_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, pad: torch.Tensor,
                                slot: torch.Tensor, kv_len: int, window: int | None, scaling: float) -> torch.Tensor:
    """Twin of `rope_decode_attention`: `rope_write_torch`, then `decode_attention_torch`."""
    q = rope_write_torch(q, k, v, cos, sin, k_cache, v_cache, slot, k_scale, v_scale)
    return decode_attention_torch(q, k_cache, v_cache, k_scale, v_scale, pad, slot, kv_len, window, scaling)


def rope_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                          v_scale: torch.Tensor | None, pad: torch.Tensor, slot: torch.Tensor, kv_len: int,
                          window: int | None, scaling: float) -> torch.Tensor:
    """`rope_write` then `decode_attention` (q, k, v not yet rotated; the arguments of both), in one launch
    of the attention kernel where both kernels would run: every program rotates its query heads, and the
    program whose keys hold the slot rotates and stores the new k and v before reading them. The same
    bits as the two launches (the same rope and store code). Returns [B, Hq * D] in q's dtype."""
    if not (ROPE_IN_ATTENTION and _rope_fits(q, k, v, cos, sin, k_cache, k_scale, v_scale)
            and _attention_runs(q, k_cache)):
        q = rope_write(q, k, v, cos, sin, k_cache, v_cache, slot, k_scale, v_scale)
        return decode_attention(q, k_cache, v_cache, k_scale, v_scale, pad, slot, kv_len, window, scaling)
    return _decode_attention(q, k_cache, v_cache, k_scale, v_scale, pad, slot, kv_len, window, scaling,
                             rope=(k, v, cos, sin))


def _attention_runs(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `decode_attention`'s kernel (not its torch twin) runs for this query and cache."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    return use_triton(q) and (fp8 or k_cache.dtype == q.dtype) and q.stride(-1) == 1


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, pad: torch.Tensor,
                      slot: torch.Tensor, kv_len: int, window: int | None, scaling: float,
                      rope: tuple | None = None) -> torch.Tensor:
    """decode_attention; `rope` = (k, v, cos, sin): q is not rotated yet and k, v are not yet in the cache
    (`rope_decode_attention`, whose caller checked `_rope_fits`)."""
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    if Hq % Hkv or k_cache.shape[-1] != D or kv_len > k_cache.shape[2] or B > k_cache.shape[0]:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)} "
                         f"at kv_len {kv_len}")
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("decode_attention: an FP8 cache needs k_scale and v_scale")
    if not _attention_runs(q, k_cache):
        return decode_attention_torch(q, k_cache, v_cache, k_scale, v_scale, pad, slot, kv_len, window, scaling)
    G = Hq // Hkv
    interp = _interpreting()
    block_l = 16 if interp else ATTN_BLOCK_L
    sm = 132 if interp else _sm_count(q.device)
    splits, iters = _attn_splits(B, Hkv, kv_len, block_l, sm)
    block_g, block_d = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(D))
    direct = splits == 1
    warps, stages, maxnreg = ATTN_NUM_WARPS, ATTN_NUM_STAGES, ATTN_MAXNREG
    if fp8 and direct and ATTN_FP8_SINGLE_SPLIT and not interp and B * Hkv <= ATTN_FP8_SINGLE_SPLIT_MAX_WAVES * sm:
        long = ATTN_FP8_SINGLE_SPLIT_LONG and kv_len >= ATTN_FP8_LONG_MIN_KEYS
        warps, stages, maxnreg, fp8_block_l = ATTN_FP8_SINGLE_SPLIT_LONG if long else ATTN_FP8_SINGLE_SPLIT
        if fp8_block_l != block_l:  # one split over the same keys in tiles of another width
            block_l, iters = fp8_block_l, triton.cdiv(kv_len, fp8_block_l)
    if rope is not None and direct and not fp8 and not ROPE_IN_DIRECT_BF16:
        k_new, v_new, cos, sin = rope  # this regime measured faster with the rope kernel beside (see the flag)
        q, rope = rope_write(q, k_new, v_new, cos, sin, k_cache, v_cache, slot, k_scale, v_scale), None
    out = torch.empty(B, Hq * D, dtype=q.dtype, device=q.device)
    # one split: no partials (the kernel's part / ml pointers are then unused; `out` stands in for them)
    part = out if direct else torch.empty(B * Hkv * splits * G * block_d, dtype=torch.float32, device=q.device)
    ml = out if direct else torch.empty(B * Hkv * splits * 2 * block_g, dtype=torch.float32, device=q.device)
    kc, vc = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if fp8 else (k_cache, v_cache)
    ks, vs = (k_scale, v_scale) if fp8 else (q, q)
    LOG2E = 1.4426950408889634
    rope_args = {}
    if rope is not None:
        k_new, v_new, cos, sin = rope
        rope_args = dict(ROPE=True, kn_ptr=k_new, vn_ptr=v_new, cos_ptr=cos, sin_ptr=sin, stride_knb=k_new.stride(0),
                         stride_knh=k_new.stride(1), stride_vnb=v_new.stride(0), stride_vnh=v_new.stride(1),
                         RECIP_448=q.is_cuda)
    keys = min(ATTN_PREFETCH_KEYS, iters * block_l) if fp8 or ATTN_PREFETCH_BF16 else 0
    pf = _prefetch_args(bool(_pdl_args(q)), k_cache, v_cache, k_scale, v_scale, kv_len, keys)
    _decode_ops.decode_attn_split_kernel[(B, Hkv, splits)](
        q, kc, vc, ks, vs, pad, slot, part, ml, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), ks.stride(0) if fp8 else 0, ks.stride(1) if fp8 else 0,
        window if window is not None else 0, scaling * LOG2E, out, out.stride(0),
        G=G, BLOCK_G=block_g, D=D, BLOCK_D=block_d, BLOCK_L=block_l, ITERS=iters, N_SPLITS=splits,
        IS_FP8=fp8, HAS_WINDOW=window is not None, DOT_F32=interp or q.dtype == torch.float32,
        num_warps=warps, num_stages=stages, **_pdl_args(q),
        DIRECT=direct, **rope_args, **pf, **({"maxnreg": maxnreg} if maxnreg and not interp else {}))
    if not direct:
        _decode_ops.decode_attn_combine_kernel[(B, Hq)](
            part, ml, out, out.stride(0), Hkv, G=G, BLOCK_G=block_g, D=D, BLOCK_D=block_d, N_SPLITS=splits,
            BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4, **_pdl_args(q))
    return out


def _prefetch_args(pdl: bool, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                   v_scale: torch.Tensor | None, kv_len: int, keys: int) -> dict:
    """The split kernel's L2 prefetch arguments for `keys` keys per program (ATTN_PREFETCH_KEYS): only with PDL
    (without it nothing runs before the loads), for caches whose key rows are contiguous, 16-byte sized and
    aligned (one bulk request per program covers the range); the FP8 scales too where their rows are 16-byte
    aligned. {} where the prefetch does not apply (the kernel then has no prefetch code)."""
    if keys <= 0 or not pdl:
        return {}
    key_bytes = k_cache.shape[-1] * k_cache.element_size()

    def rows_ok(c: torch.Tensor) -> bool:
        e = c.element_size()
        return (c.stride(3) == 1 and c.stride(2) == c.shape[-1] and (c.stride(1) * e) % 16 == 0
                and (c.stride(0) * e) % 16 == 0 and c.data_ptr() % 16 == 0)

    if key_bytes % 16 or k_cache.stride() != v_cache.stride() or not (rows_ok(k_cache) and rows_ok(v_cache)):
        return {}
    scales = (k_scale is not None and v_scale is not None and k_scale.stride() == v_scale.stride()
              and all(s.stride(2) == 1 and s.stride(1) % 4 == 0 and s.stride(0) % 4 == 0 and s.data_ptr() % 16 == 0
                      for s in (k_scale, v_scale)))
    return dict(PREFETCH_L=keys, kv_len=kv_len, KEY_BYTES=key_bytes, PREFETCH_SCALES=scales)


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pdl_args(t: torch.Tensor) -> dict:
    """The kernel's PDL constexpr and Triton's launch option (programmatic dependent launch, `fp4_gemm.PDL`)."""
    return {"PDL": True, "launch_pdl": True} if use_pdl(t) else {}


# ----------------------------------------------------------------------------------------------
# residual add + RMSNorm


def add_rmsnorm_torch(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                      gemma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of `add_rmsnorm`: (h + delta, RMSNorm(h + delta)) with HF's LlamaRMSNorm / Gemma3RMSNorm arithmetic."""
    if delta is not None:
        h = h + delta
    x = h.float()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return h, (y * (1.0 + weight.float())).to(h.dtype)
    return h, weight * y.to(h.dtype)


def add_rmsnorm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """h, delta [..., N] -> (h + delta, RMSNorm(h + delta)): one kernel, one pass over each row.

    Llama form (`gemma=False`): w * (x * rsqrt(mean(x^2) + eps)).to(dtype); Gemma form:
    (x * rsqrt(mean(x^2) + eps) * (1 + w)).to(dtype); float32 statistics either way. `delta` None
    skips the add (h is returned as it is)."""
    N = h.shape[-1]
    ok = (use_triton(h) and h.is_contiguous() and (delta is None or (delta.is_contiguous() and delta.dtype == h.dtype
                                                                     and delta.shape == h.shape))
          and weight.shape == (N,) and weight.is_contiguous() and (gemma or weight.dtype == h.dtype))
    if not ok:
        return add_rmsnorm_torch(h, delta, weight, eps, gemma)
    rows = h.numel() // N
    h_out = torch.empty_like(h) if delta is not None else h
    n_out = torch.empty_like(h)
    block = triton.next_power_of_2(N)
    _decode_ops.add_rmsnorm_kernel[(rows,)](h, h if delta is None else delta, weight, h_out, n_out, N, eps,
                                            HAS_DELTA=delta is not None, GEMMA=gemma, BLOCK=block,
                                            INTERPRET=_interpreting(),
                                            num_warps=1 if _interpreting() else min(16, max(1, block // 512)),
                                            **_pdl_args(h))
    return h_out, n_out


# ----------------------------------------------------------------------------------------------
# silu(gate) * up


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """Twin of `silu_mul`: HF's `act_fn(gate) * up` with act_fn = SiLU, gate_up = [..., gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2 I] -> silu(gate) * up [..., I], the silu rounded to the dtype first (as torch does)."""
    I2 = gate_up.shape[-1]
    if not use_triton(gate_up) or not gate_up.is_contiguous() or I2 % 2:
        return silu_mul_torch(gate_up)
    N = I2 // 2
    rows = gate_up.numel() // I2
    out = torch.empty(*gate_up.shape[:-1], N, dtype=gate_up.dtype, device=gate_up.device)
    block = 256 if _interpreting() else 1024
    _decode_ops.silu_mul_kernel[(rows, triton.cdiv(N, block))](gate_up, out, N, BLOCK=block, num_warps=4,
                                                                       INTERPRET=_interpreting(),
                                                                       **_pdl_args(gate_up))
    return out


# ----------------------------------------------------------------------------------------------
# rope on q and k, k and v into the cache


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_write_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Twin of `rope_write`: HF's apply_rotary_pos_emb on q, k [B, H, D] (cos, sin [B, D]); k and v stored
    at `slot` of k_cache, v_cache [Bmax, Hkv, S, D] (FP8: KVCache's per-vector quantization, scales into
    k_scale, v_scale [Bmax, Hkv, S]). Returns the rotated q [B, Hq, D]."""
    B = q.shape[0]
    c, s = cos[:, None], sin[:, None]
    q_rot = q * c + rotate_half(q) * s
    k_rot = k * c + rotate_half(k) * s
    for x, cache, scale in ((k_rot, k_cache, k_scale), (v, v_cache, v_scale)):
        if cache.dtype == torch.float8_e4m3fn:
            codes, sc = _quantize_kv_fp8(x)
            cache.view(torch.uint8)[:B].index_copy_(2, slot, codes[:, :, None].view(torch.uint8))
            scale[:B].index_copy_(2, slot, sc[:, :, None])
        else:
            cache[:B].index_copy_(2, slot, x[:, :, None].to(cache.dtype))
    return q_rot


def _quantize_kv_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp4kit.nn.kv_cache.quantize_kv_fp8` (kernels sit below nn, so the few lines are repeated; a test
    checks the two agree bit for bit): x [..., D] -> (E4M3 codes, float32 scale [...])."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 448.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (xf / scale.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def _rope_fits(q, k, v, cos, sin, k_cache, k_scale, v_scale) -> bool:
    """Whether the rope kernels can read these tensors: last dims contiguous (q, k, v may be strided views of
    the fused qkv output), cos / sin [B, D] contiguous in q's dtype, an even head dim, an FP8 cache's scales."""
    B, _, D = q.shape
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    return (q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and cos.is_contiguous()
            and sin.is_contiguous() and cos.shape == (B, D) and k_cache.stride(-1) == 1 and D % 2 == 0
            and cos.dtype == q.dtype and k.shape[0] == B and k.shape[-1] == D
            and (not fp8 or (k_scale is not None and v_scale is not None and k_scale.stride(-1) == 1)))


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor,
               k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One kernel for rope on q [B, Hq, D] and k [B, Hkv, D], with the rotated k and v [B, Hkv, D] stored
    at `slot` (long [1]) of k_cache, v_cache [Bmax, Hkv, S, D]: cast to the cache's dtype, or for a
    float8_e4m3fn cache quantized per vector (scale = amax / 448, IEEE divisions, as KVCache.write)
    with the scales stored in k_scale, v_scale [Bmax, Hkv, S]. q, k, v may be strided views of the
    fused qkv output (last dim contiguous). Returns q rotated, [B, Hq, D] contiguous."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if not use_triton(q) or not _rope_fits(q, k, v, cos, sin, k_cache, k_scale, v_scale):
        return rope_write_torch(q, k, v, cos, sin, k_cache, v_cache, slot, k_scale, v_scale)
    q_out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    kc, vc = (k_cache.view(torch.uint8), v_cache.view(torch.uint8)) if fp8 else (k_cache, v_cache)
    ks, vs = (k_scale, v_scale) if fp8 else (q, q)
    _decode_ops.rope_kernel[(B, Hq + Hkv)](
        q, k, v, cos, sin, q_out, kc, vc, ks, vs, slot, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        ks.stride(0) if fp8 else 0, ks.stride(1) if fp8 else 0,
        HQ=Hq, D=D, BLOCK_D=triton.next_power_of_2(D), IS_FP8=fp8, RECIP_448=q.is_cuda, num_warps=1,
        **_pdl_args(q))
    return q_out
