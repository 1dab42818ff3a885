"""Triton code of the decode-step kernels; the launchers, twins and the why are in `decode_ops`.

    decode_attn_split_kernel   one query token per row, GQA, over a key range of the static cache
    decode_attn_combine_kernel the split results merged with their running max and sum
    add_rmsnorm_kernel         h = h + delta (optional), n = RMSNorm(h), Llama or Gemma form
    silu_mul_kernel            silu(gate) * up from the fused gate_up output
    rope_kernel                rotate_half rope on q and k; k and v written into the cache (bf16, or FP8 + scales)

Arithmetic order follows the twins (each rounding to the activation dtype where torch rounds).

PDL (constexpr, set by the launchers on Hopper and later, never under the interpreter): each kernel
first lets the next kernel of the chain launch (`griddepcontrol.launch_dependents`), loads what no
earlier kernel writes (the norm weight), then waits for the previous kernel to complete
(`griddepcontrol.wait`) before it reads activations, the cache or the slot, or writes anything; see
`_fp4_gemv`'s docstring for the rules. Every program waits, so completion stays ordered along the chain.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._fp4_bits import cast_rne


@triton.jit
def _chain_wait(PDL: tl.constexpr):
    """PDL: let the next kernel launch, then wait for the previous one (no-op without PDL)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def decode_attn_split_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, pad_ptr, slot_ptr, part_ptr, ml_ptr,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_sb, stride_sh,
                             window, qk_scale, out_ptr, stride_ob,
                             G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_L: tl.constexpr, ITERS: tl.constexpr, N_SPLITS: tl.constexpr,
                             IS_FP8: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_F32: tl.constexpr,
                             PDL: tl.constexpr = False, DIRECT: tl.constexpr = False, ROPE: tl.constexpr = False,
                             kn_ptr=None, vn_ptr=None, cos_ptr=None, sin_ptr=None, stride_knb=0, stride_knh=0,
                             stride_vnb=0, stride_vnh=0, RECIP_448: tl.constexpr = False,
                             PREFETCH_L: tl.constexpr = 0, kv_len=0, KEY_BYTES: tl.constexpr = 0,
                             PREFETCH_SCALES: tl.constexpr = False):
    # grid (B, Hkv, N_SPLITS): row b, kv head h, keys [s * ITERS * BLOCK_L, (s + 1) * ITERS * BLOCK_L).
    # DIRECT (one split): the normalised output goes straight to out [B, Hq * D], no partials, no combine.
    # ROPE: q is not yet rotated; every program rotates its G query heads (as rope_kernel), and the program
    # whose keys hold the slot rotates the new key kn [B, Hkv, D] and stores it and vn into the cache at the
    # slot (as rope_kernel) before its loop reads them: rope_write's launch folded into this one.
    # PREFETCH_L (with PDL, a contiguous cache): before the wait, one thread asks for the program's first
    # PREFETCH_L keys of K and V (and their FP8 scales) to be brought into L2, so the cache streams in while
    # the previous launch finishes. A hint, not a load: nothing is read before the wait, so it cannot see a
    # stale value (L2 is the point of coherence) and the slot this step writes is read after the wait.
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    if PREFETCH_L > 0:
        j0 = s * ITERS * BLOCK_L
        n_pf = tl.maximum(tl.minimum(kv_len - j0, PREFETCH_L), 0)
        kv0 = b * stride_kb + h * stride_kh + j0 * stride_ks
        _prefetch_l2_bulk(k_ptr + kv0, n_pf * KEY_BYTES, 0)
        _prefetch_l2_bulk(v_ptr + kv0, n_pf * KEY_BYTES, 32)
        if PREFETCH_SCALES:
            sc0 = b * stride_sb + h * stride_sh + j0
            _prefetch_l2_bulk(ks_ptr + sc0, (n_pf // 4) * 16, 64)
            _prefetch_l2_bulk(vs_ptr + sc0, (n_pf // 4) * 16, 96)
    _chain_wait(PDL)
    n_kv = tl.num_programs(1)
    pad = tl.load(pad_ptr + b)
    slot = tl.load(slot_ptr)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < D
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                mask=gm[:, None] & dm[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    kv_base = b * stride_kb + h * stride_kh
    sc_base = b * stride_sb + h * stride_sh
    if ROPE:
        partner, sign = _rope_partner(d, D)
        cos = tl.load(cos_ptr + b * D + d, mask=dm, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * D + d, mask=dm, other=0.0).to(tl.float32)
        qp = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + partner[None, :],
                     mask=gm[:, None] & dm[None, :], other=0.0)
        q = _rope(q, qp, cos[None, :], sin[None, :], sign[None, :])
        if s == slot // (ITERS * BLOCK_L):  # this program's keys hold the slot: write the new k and v first
            kn = kn_ptr + b * stride_knb + h * stride_knh
            k_rot = _rope(tl.load(kn + d, mask=dm, other=0.0), tl.load(kn + partner, mask=dm, other=0.0), cos, sin,
                          sign)
            dst = kv_base + slot * stride_ks + d
            _store_kv(k_ptr, ks_ptr, dst, sc_base + slot, k_rot, dm, IS_FP8, RECIP_448)
            v_new = tl.load(vn_ptr + b * stride_vnb + h * stride_vnh + d, mask=dm, other=0.0)
            _store_kv(v_ptr, vs_ptr, dst, sc_base + slot, v_new, dm, IS_FP8, RECIP_448)
            tl.debug_barrier()  # the stores are visible to the whole program before the loop loads the slot
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)  # finite: a split with no visible key stays NaN-free
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for it in range(ITERS):
        j = (s * ITERS + it) * BLOCK_L + tl.arange(0, BLOCK_L)  # key slots [BLOCK_L]
        vis = ((j >= pad) & (j <= slot)) | (j == slot)  # causal, left padding; the own slot always
        if HAS_WINDOW:
            vis = vis & ((slot - j < window) | (j == slot))
        offs = kv_base + j[:, None] * stride_ks + d[None, :]
        lm = vis[:, None] & dm[None, :]
        if IS_FP8:  # codes read as bytes (the interpreter cannot mask fp8 loads), decoded exactly
            kc = tl.load(k_ptr + offs, mask=lm, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            vc = tl.load(v_ptr + offs, mask=lm, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            ksc = tl.load(ks_ptr + sc_base + j, mask=vis, other=0.0)
            vsc = tl.load(vs_ptr + sc_base + j, mask=vis, other=0.0)
            if not DOT_F32:
                kc = kc.to(q.dtype)  # E4M3 values are exact in bf16 / fp16
                vc = vc.to(q.dtype)
        else:
            kc = tl.load(k_ptr + offs, mask=lm, other=0.0)
            vc = tl.load(v_ptr + offs, mask=lm, other=0.0)
            if DOT_F32:
                kc = kc.to(tl.float32)
                vc = vc.to(tl.float32)
        if DOT_F32:
            scores = tl.dot(q, tl.trans(kc), input_precision="ieee")  # [BLOCK_G, BLOCK_L]
        else:
            scores = tl.dot(q, tl.trans(kc))
        if IS_FP8:
            scores = scores * ksc[None, :]  # q . (code * scale) = (q . code) * scale
        scores = tl.where(vis[None, :], scores * qk_scale, float("-inf"))  # log2 domain
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IS_FP8:
            p = p * vsc[None, :]  # sum_j p_j (code_j * scale_j) = sum_j (p_j scale_j) code_j
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, vc, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vc.dtype), vc)
        m_i = m_new
    if DIRECT:
        o = acc / l_i[:, None]  # l_i >= 1: the own slot is always visible
        tl.store(out_ptr + b * stride_ob + (h * G + g[:, None]) * D + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=gm[:, None] & dm[None, :])
    else:
        # partials: part [B, Hkv, N_SPLITS, G, BLOCK_D] float32; ml [B, Hkv, N_SPLITS, 2, BLOCK_G]
        cell = (b * n_kv + h) * N_SPLITS + s
        tl.store(part_ptr + (cell * G + g[:, None]) * BLOCK_D + d[None, :], acc, mask=gm[:, None])
        tl.store(ml_ptr + cell * 2 * BLOCK_G + g, m_i)
        tl.store(ml_ptr + cell * 2 * BLOCK_G + BLOCK_G + g, l_i)


@triton.jit
def _prefetch_l2_bulk(ptr, nbytes, tid: tl.constexpr):
    """`cp.async.bulk.prefetch.L2` of nbytes (a multiple of 16, at a 16-byte aligned address; 0: nothing)
    from ptr, issued by thread `tid` of the program only (one bulk request, not one per thread)."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .pred q; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, $3; "
        "setp.ne.u32 q, $2, 0; and.pred p, p, q; @p cp.async.bulk.prefetch.L2.global [$1], $2; } mov.u32 $0, 0;",
        "=r,l,r,r", [ptr, nbytes.to(tl.int32), tl.full([], tid, tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def decode_attn_combine_kernel(part_ptr, ml_ptr, out_ptr, stride_ob, n_kv,
                               G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                               N_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
    # grid (B, Hq): out[b, hq D + d] = sum_s 2^(m_s - M) acc_s[d] / sum_s 2^(m_s - M) l_s, hq = h G + gi
    _chain_wait(PDL)
    b = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // G
    gi = hq % G
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    sm = sp < N_SPLITS
    cell = (b * n_kv + h) * N_SPLITS + sp  # [BLOCK_S]
    m = tl.load(ml_ptr + cell * 2 * BLOCK_G + gi, mask=sm, other=-1.0e30)
    l_s = tl.load(ml_ptr + cell * 2 * BLOCK_G + BLOCK_G + gi, mask=sm, other=0.0)
    w = tl.math.exp2(m - tl.max(m, axis=0))  # [BLOCK_S]
    denom = tl.sum(w * l_s, axis=0)
    acc = tl.load(part_ptr + (cell[:, None] * G + gi) * BLOCK_D + d[None, :], mask=sm[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / denom  # [BLOCK_D]
    tl.store(out_ptr + b * stride_ob + hq * D + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def add_rmsnorm_kernel(h_ptr, delta_ptr, w_ptr, h_out_ptr, n_out_ptr, N, eps,
                       HAS_DELTA: tl.constexpr, GEMMA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                       INTERPRET: tl.constexpr = False):
    # one program per row of N features
    r = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    cm = c < N
    if PDL:
        gdc_launch_dependents()
    w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)  # the norm weight: no earlier kernel writes it
    if PDL:
        gdc_wait()
    x = tl.load(h_ptr + r * N + c, mask=cm, other=0.0)
    if HAS_DELTA:
        x = cast_rne(x.to(tl.float32) + tl.load(delta_ptr + r * N + c, mask=cm, other=0.0).to(tl.float32), x.dtype,
                     INTERPRET)
        tl.store(h_out_ptr + r * N + c, x, mask=cm)  # the new residual, rounded as torch's add
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    y = xf * (1.0 / tl.sqrt(var + eps))
    if GEMMA:
        out = y * (1.0 + w)  # Gemma: float32 throughout, one rounding
    else:
        out = w * cast_rne(y, x.dtype, INTERPRET).to(tl.float32)  # Llama: round the normalised x, then the product
    tl.store(n_out_ptr + r * N + c, cast_rne(out, n_out_ptr.dtype.element_ty, INTERPRET), mask=cm)


@triton.jit
def silu_mul_kernel(gu_ptr, out_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                    INTERPRET: tl.constexpr = False):
    # gu [R, 2N] (gate | up) -> out [R, N]; grid (R, cdiv(N, BLOCK))
    _chain_wait(PDL)
    r = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cm = c < N
    gate = tl.load(gu_ptr + r * 2 * N + c, mask=cm, other=0.0)
    up = tl.load(gu_ptr + r * 2 * N + N + c, mask=cm, other=0.0)
    gf = gate.to(tl.float32)
    act = cast_rne(gf / (1.0 + tl.exp(-gf)), gate.dtype, INTERPRET)  # torch's silu in float32, rounded
    tl.store(out_ptr + r * N + c, cast_rne(act.to(tl.float32) * up.to(tl.float32), gate.dtype, INTERPRET), mask=cm)


@triton.jit
def _e4m3_codes(y):
    # float32 y, |y| <= 448 -> E4M3 codes (uint8), round to nearest even, in integer arithmetic: the same bits
    # as a float -> float8_e4m3fn cast, also under the interpreter (whose cast rounds wrongly, shared/GPU.md).
    # Normal range (|y| >= 2^-6): round the float32 mantissa to 3 bits (add 0x7FFFF + the kept lsb, clear
    # the low 20 bits; a carry bumps the exponent), then rebias the exponent 127 -> 7.
    # Subnormals (|y| < 2^-6, steps of 2^-9): the code is |y| * 512 rounded to nearest even (2^23 trick).
    a = tl.abs(y)
    bits = a.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20  # (biased exponent << 3) | 3 mantissa bits
    normal = rounded - (120 << 3)
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    sign = (y.to(tl.int32, bitcast=True) >> 24) & 0x80
    return (code | sign).to(tl.uint8)


@triton.jit
def _store_kv(dst_ptr, scale_ptr, dst, scale_off, x, dm, IS_FP8: tl.constexpr, RECIP_448: tl.constexpr):
    # one head vector x [BLOCK_D] into the cache: as it is, or as FP8 E4M3 codes (uint8 view) with its scale
    # (KVCache.quantize_kv_fp8: scale = amax / 448, 1 when zero; codes = clamp(x / scale) -> e4m3). torch
    # divides a tensor by a Python scalar with IEEE division on the CPU but as a product with the float32
    # reciprocal on CUDA (RECIP_448 follows the device); x / scale is an IEEE division on both.
    if IS_FP8:
        xf = tl.where(dm, x.to(tl.float32), 0.0)
        amax = tl.max(tl.abs(xf), axis=0)
        if RECIP_448:
            scale = amax * (1.0 / 448.0)
        else:
            scale = tl.math.div_rn(amax, 448.0)
        scale = tl.where(scale > 0, scale, 1.0)
        codes = _e4m3_codes(tl.clamp(tl.math.div_rn(xf, scale), -448.0, 448.0))
        tl.store(dst_ptr + dst, codes, mask=dm)
        tl.store(scale_ptr + scale_off, scale)
    else:
        tl.store(dst_ptr + dst, x.to(dst_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _rope_partner(d, D: tl.constexpr):
    """rotate_half's source column of each column d < D, and its sign: (d + D/2, -1) below D/2, (d - D/2, +1) above."""
    half: tl.constexpr = D // 2
    return tl.where(d < half, d + half, d - half), tl.where(d < half, -1.0, 1.0)


@triton.jit
def _rope(x, xp, cos, sin, sign):
    """x * cos + rotate_half(x) * sin with xp = x at the partner columns (float32 cos, sin, sign; broadcast):
    each product rounded to x's dtype as torch does, then the sum rounded (rotate_half itself is exact)."""
    xr = xp.to(tl.float32) * sign
    return ((x.to(tl.float32) * cos).to(x.dtype).to(tl.float32) + (xr * sin).to(x.dtype).to(tl.float32)).to(x.dtype)


@triton.jit
def rope_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, v_out_ptr, ks_ptr, vs_ptr, slot_ptr,
                stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                stride_ob, stride_oh, stride_os, stride_sb, stride_sh,
                HQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP8: tl.constexpr,
                RECIP_448: tl.constexpr, PDL: tl.constexpr = False):
    # grid (B, HQ + HKV). Heads < HQ: q rotated into q_out [B, HQ, D]. Others: k rotated and v stored into the
    # cache k_out / v_out [Bmax, HKV, S, D] at [b, head, slot] (FP8: codes through a uint8 view, scales into
    # ks / vs [Bmax, HKV, S] with strides (stride_sb, stride_sh, 1))
    _chain_wait(PDL)
    b = tl.program_id(0)
    hd = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    partner, sign = _rope_partner(d, D)
    cos = tl.load(cos_ptr + b * D + d, mask=dm, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * D + d, mask=dm, other=0.0).to(tl.float32)
    if hd < HQ:
        base = q_ptr + b * stride_qb + hd * stride_qh
    else:
        base = k_ptr + b * stride_kb + (hd - HQ) * stride_kh
    y = _rope(tl.load(base + d, mask=dm, other=0.0), tl.load(base + partner, mask=dm, other=0.0), cos, sin, sign)
    if hd < HQ:
        tl.store(q_out_ptr + (b * HQ + hd) * D + d, y, mask=dm)
    else:
        kh = hd - HQ
        slot = tl.load(slot_ptr)
        dst = b * stride_ob + kh * stride_oh + slot * stride_os + d
        sc = b * stride_sb + kh * stride_sh + slot
        _store_kv(k_out_ptr, ks_ptr, dst, sc, y, dm, IS_FP8, RECIP_448)
        v = tl.load(v_ptr + b * stride_vb + kh * stride_vh + d, mask=dm, other=0.0)
        _store_kv(v_out_ptr, vs_ptr, dst, sc, v, dm, IS_FP8, RECIP_448)
