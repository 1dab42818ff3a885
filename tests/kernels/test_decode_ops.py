"""Decode-step kernels against their torch twins (CPU: Triton interpreter on small grids; CUDA when present).

Tolerances. add_rmsnorm, silu_mul and rope follow the twins' rounding points: at most one ulp of
the output dtype apart (rsqrt / exp implementations differ in the last float32 bit, which can move
a rounding). decode_attention is an online softmax in float32 against SDPA: float32 inputs agree to
1e-5; bf16 to ~2 bf16 ulps of the output scale (p is rounded to bf16 before P.V, as in flash attention).
"""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl

from fp4kit.kernels import _decode_ops, decode_ops
from fp4kit.kernels.decode_ops import (
    _quantize_kv_fp8,
    add_rmsnorm,
    add_rmsnorm_torch,
    decode_attention,
    decode_attention_torch,
    rope_decode_attention,
    rope_write,
    rope_write_torch,
    silu_mul,
    silu_mul_torch,
)
from fp4kit.nn.kv_cache import quantize_kv_fp8

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KEY_SCALE = 1 if DEV == "cpu" else 4  # attention tiles: 16 keys in the interpreter, 64 on the GPU


@triton.jit
def _encode_e4m3(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(x_ptr + i, mask=i < N, other=0.0)
    tl.store(out_ptr + i, _decode_ops._e4m3_codes(y), mask=i < N)


def _cache(Bmax, H, S, D, dtype, fp8=False):
    k = torch.randn(Bmax, H, S, D, device=DEV) * 2
    v = torch.randn(Bmax, H, S, D, device=DEV)
    if not fp8:
        return k.to(dtype), v.to(dtype), None, None
    kq, ks = quantize_kv_fp8(k)
    vq, vs = quantize_kv_fp8(v)
    return kq, vq, ks, vs


def _ulps(dtype, cuda_bf16):
    """Allowed ulps: float32 outputs 4 (exp / rsqrt / mean differ in the last float32 bits); bf16 on CUDA
    `cuda_bf16`; bf16 in the interpreter 3, because it truncates float32 -> bf16 casts instead of
    rounding to nearest (up to one ulp per rounding; the GPU run checks the real rounding)."""
    if dtype == torch.float32:
        return 4
    return cuda_bf16 if DEV == "cuda" else 3


def _rne_ulps(dtype):
    """add_rmsnorm and silu_mul round with `cast_rne` (nearest even in the interpreter too): one bf16 ulp on
    either device (float32 outputs: 4, as `_ulps`)."""
    return 4 if dtype == torch.float32 else 1


def _ulp_close(a, b, n=1):
    # |a - b| <= n ulps of the dtype at b's magnitude
    eps = torch.finfo(a.dtype).eps
    tol = n * eps * b.float().abs().clamp_min(torch.finfo(a.dtype).tiny) + 1e-30
    return bool(((a.float() - b.float()).abs() <= tol * 1.0001).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
def test_attention_matches_twin(dtype, window):
    B, Hq, Hkv, S, D = 3, 6, 2, 40, 32  # G = 3 (padded to 16), odd kv_len, splits
    k, v, _, _ = _cache(4, Hkv, S, D, dtype)
    q = torch.randn(B, Hq, D, device=DEV).to(dtype)
    pad = torch.tensor([0, 3, 11], device=DEV)
    slot = torch.tensor([29], device=DEV)
    args = (q, k, v, None, None, pad, slot, 33, window, 0.17)
    got, ref = decode_attention(*args), decode_attention_torch(*args)
    assert got.shape == ref.shape == (B, Hq * D) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


def test_attention_fp8_cache_matches_twin():
    B, Hq, Hkv, S, D = 2, 4, 2, 48, 16
    k, v, ks, vs = _cache(2, Hkv, S, D, None, fp8=True)
    q = torch.randn(B, Hq, D, device=DEV)
    pad = torch.tensor([2, 0], device=DEV)
    slot = torch.tensor([44], device=DEV)
    args = (q, k, v, ks, vs, pad, slot, 48, None, 0.25)
    got, ref = decode_attention(*args), decode_attention_torch(*args)
    # float32 q: the only difference is the factored scale (code . q) * s vs (code * s) . q
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("kv_len,single", [(16, 0.0), (33, 0.01)])  # interpreter: 16-key tiles, 132 "SMs"
def test_attention_single_split_writes_the_output_directly(monkeypatch, fp8, kv_len, single):
    """One split (one 16-key tile in the interpreter, or ATTN_SINGLE_SPLIT_WAVES low enough that B x Hkv
    programs count as enough): the split kernel normalises and writes the output, no combine kernel."""
    from fp4kit.kernels import decode_ops

    monkeypatch.setattr(decode_ops, "ATTN_SINGLE_SPLIT_WAVES", single)
    calls = []
    monkeypatch.setattr(decode_ops._decode_ops, "decode_attn_combine_kernel",
                        type("Spy", (), {"__getitem__": lambda self, grid: calls.append(grid)})())
    B, Hq, Hkv, S, D = 3, 6, 2, 40, 32
    k, v, ks, vs = _cache(4, Hkv, S, D, torch.float32, fp8=fp8)
    q = torch.randn(B, Hq, D, device=DEV)
    pad = torch.tensor([0, 3, 11], device=DEV)
    slot = torch.tensor([kv_len - 2], device=DEV)
    for window in (None, 5):
        args = (q, k, v, ks, vs, pad, slot, kv_len, window, 0.17)
        got, ref = decode_attention(*args), decode_attention_torch(*args)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert calls == []  # the combine kernel was never launched


def test_attention_ignores_keys_past_slot_and_in_padding():
    B, Hq, Hkv, S, D = 2, 2, 1, 32, 16
    k, v, _, _ = _cache(B, Hkv, S, D, torch.float32)
    q = torch.randn(B, Hq, D, device=DEV)
    pad, slot = torch.tensor([0, 4], device=DEV), torch.tensor([9], device=DEV)
    before = decode_attention(q, k, v, None, None, pad, slot, 32, None, 0.3)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10:] = 1e4  # past the slot
    v2[1, :, :4] = -1e4  # row 1's padding
    after = decode_attention(q, k2, v2, None, None, pad, slot, 32, None, 0.3)
    assert torch.equal(before, after)


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rmsnorm_matches_twin(gemma, dtype):
    h = torch.randn(5, 96, device=DEV).to(dtype)
    d = torch.randn(5, 96, device=DEV).to(dtype)
    w = (torch.rand(96, device=DEV) + 0.5).to(dtype)
    for delta in (d, None):
        h2, n = add_rmsnorm(h, delta, w, 1e-6, gemma)
        h_ref, n_ref = add_rmsnorm_torch(h, delta, w, 1e-6, gemma)
        assert torch.equal(h2, h_ref)  # one add, rounded to nearest even: exact on both devices
        assert _ulp_close(n, n_ref, _rne_ulps(dtype)), (gemma, dtype, (n.float() - n_ref.float()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_twin(dtype):
    gu = (torch.randn(3, 2, 2 * 300, device=DEV) * 3).to(dtype)
    got, ref = silu_mul(gu), silu_mul_torch(gu)
    assert got.shape == (3, 2, 300)
    assert _ulp_close(got, ref, _rne_ulps(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_write_matches_twin(dtype):
    B, Hq, Hkv, D, S = 3, 4, 2, 16, 8
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, device=DEV).to(dtype).view(B, Hq + 2 * Hkv, D)
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]  # strided views, as the engine passes
    ang = torch.rand(B, D // 2, device=DEV) * 6
    cos = torch.cat([ang.cos()] * 2, -1).to(dtype)
    sin = torch.cat([ang.sin()] * 2, -1).to(dtype)
    slot = torch.tensor([5], device=DEV)
    caches = [torch.zeros(4, Hkv, S, D, device=DEV, dtype=dtype) for _ in range(4)]
    got = rope_write(q, k, v, cos, sin, caches[0], caches[1], slot)
    ref = rope_write_torch(q, k, v, cos, sin, caches[2], caches[3], slot)
    if DEV == "cpu" and dtype == torch.float32:  # numpy rounds each product and the sum, as torch does
        assert torch.equal(got, ref) and torch.equal(caches[0], caches[2])
    else:
        # not bit-exact: the interpreter truncates casts to bf16; on CUDA the compiler contracts
        # x * cos + r * sin into an FMA (bf16 too, measured on the H100: one rounding fewer than torch).
        # Bound: 3 ulps of the products' scale (|x| <= max |qkv|, |cos|, |sin| <= 1)
        eps = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -23
        tol = 3 * eps * qkv.float().abs().max()
        assert (got.float() - ref.float()).abs().max() <= tol
        assert (caches[0].float() - caches[2].float()).abs().max() <= tol
    assert torch.equal(caches[1], caches[3])  # v is copied
    assert caches[0][:, :, 5].abs().sum() > 0 and caches[0][:, :, 4].abs().sum() == 0


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_cache", "fp8_cache"])
@pytest.mark.parametrize("kv_len,slot,window", [(40, 39, None), (40, 20, None), (40, 39, 7), (16, 10, None)],
                         ids=["slot_in_last_split", "slot_in_middle_split", "window", "one_split_direct"])
def test_rope_decode_attention_equals_rope_write_then_attention(monkeypatch, fp8, kv_len, slot, window):
    """The folded launch (rope and the cache write inside the attention kernel) against the two launches it
    replaces: the same output and the same cache, bit for bit. Interpreter: 16-key tiles, so 40 keys are three
    splits (the slot's owner is the last or a middle one) and 16 keys one split (DIRECT; the fold is forced
    on for a bf16 cache there, which the library default leaves to the rope kernel)."""
    monkeypatch.setattr(decode_ops, "ROPE_IN_DIRECT_BF16", True)
    kv_len, slot = kv_len * KEY_SCALE, slot * KEY_SCALE  # the same tile structure on the GPU (64-key tiles)
    B, Hq, Hkv, D, S = 2, 8, 2, 32, 48 * KEY_SCALE
    dtype = torch.bfloat16
    qkv = (torch.randn(B, Hq + 2 * Hkv, D, device=DEV) * 2).to(dtype)
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]  # strided views, as the fused qkv output
    ang = torch.rand(B, D // 2, device=DEV) * 6
    cos = torch.cat([ang.cos()] * 2, -1).to(dtype)
    sin = torch.cat([ang.sin()] * 2, -1).to(dtype)
    kc, vc, ks, vs = _cache(B, Hkv, S, D, dtype, fp8)
    a = [kc, vc, ks, vs]
    b = [t if t is None else t.clone() for t in a]
    pad = torch.tensor([0, 3], device=DEV)
    slot_t = torch.tensor([slot], device=DEV)
    got = rope_decode_attention(q, k, v, cos, sin, *a, pad, slot_t, kv_len, window, 0.2)
    q_rot = rope_write(q, k, v, cos, sin, b[0], b[1], slot_t, b[2], b[3])
    ref = decode_attention(q_rot, *b, pad, slot_t, kv_len, window, 0.2)
    assert torch.equal(got, ref)
    for x, y in zip(a, b):
        if x is not None:
            assert torch.equal(x.view(torch.uint8) if fp8 and x.dim() == 4 else x,
                               y.view(torch.uint8) if fp8 and y.dim() == 4 else y)


@pytest.mark.parametrize("fp8,kv_len,want_rope_kernel", [(False, 16, True), (True, 16, False), (False, 40, False)],
                         ids=["bf16_one_split", "fp8_one_split", "bf16_splits"])
def test_rope_fold_rule(monkeypatch, fp8, kv_len, want_rope_kernel):
    """A bf16 cache in one split keeps the separate rope kernel (measured faster there); else the fold."""
    launched = []
    real = _decode_ops.rope_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(_decode_ops, "rope_kernel", Spy())
    kv_len *= KEY_SCALE
    B, Hq, Hkv, D, S = 2, 8, 2, 32, 48 * KEY_SCALE
    qkv = torch.randn(B, Hq + 2 * Hkv, D, device=DEV).bfloat16()
    cos = torch.ones(B, D, device=DEV).bfloat16()
    sin = torch.zeros(B, D, device=DEV).bfloat16()
    kc, vc, ks, vs = _cache(B, Hkv, S, D, torch.bfloat16, fp8)
    rope_decode_attention(qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:], cos, sin, kc, vc, ks, vs,
                          torch.zeros(B, dtype=torch.long, device=DEV), torch.tensor([kv_len - 1], device=DEV),
                          kv_len, None, 0.2)
    assert bool(launched) == want_rope_kernel


def test_twin_fp8_quantizer_is_kv_caches():
    x = torch.randn(3, 4, 64, device=DEV) * torch.logspace(-3, 3, 64, device=DEV)
    x[0, 0] = 0  # an all-zero vector: scale 1
    a, b = _quantize_kv_fp8(x), quantize_kv_fp8(x)
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def test_rope_write_fp8_cache():
    """FP8 cache: codes and scales equal KVCache.write's bit for bit (IEEE divisions; the codes are rounded in
    integer arithmetic, so the interpreter's broken float -> e4m3 cast is not involved). The rope is the
    identity here (cos 1, sin 0: exact under FMA contraction too), so k reaches the quantizer unchanged
    in both; test_rope_write_matches_twin checks the rotation."""
    B, Hq, Hkv, D, S = 2, 4, 2, 32, 8
    dtype = torch.bfloat16
    qkv = torch.randn(B, Hq + 2 * Hkv, D, device=DEV) * torch.logspace(-4, 2, D, device=DEV)  # subnormal codes too
    qkv[1, Hq + Hkv] = 0  # row 1's first v head all zero: scale 1
    qkv[0, Hq + Hkv, 5] = 1e4  # one outlier: the rest of its vector goes subnormal
    qkv = qkv.to(dtype)
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    cos = torch.ones(B, D, device=DEV, dtype=dtype)
    sin = torch.zeros(B, D, device=DEV, dtype=dtype)
    slot = torch.tensor([3], device=DEV)

    def cache():
        return (torch.zeros(B, Hkv, S, D, device=DEV, dtype=torch.float8_e4m3fn),
                torch.zeros(B, Hkv, S, D, device=DEV, dtype=torch.float8_e4m3fn),
                torch.ones(B, Hkv, S, device=DEV), torch.ones(B, Hkv, S, device=DEV))

    a, b = cache(), cache()
    got = rope_write(q, k, v, cos, sin, *a[:2], slot, *a[2:])
    ref = rope_write_torch(q, k, v, cos, sin, *b[:2], slot, *b[2:])
    assert torch.equal(got, ref) and torch.equal(got, q)
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert b[3][1, 0, 3] == 1 and b[2][0, 0, 3] != 1
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
    assert torch.equal(a[1].view(torch.uint8), b[1].view(torch.uint8))
    sub = b[1].view(torch.uint8)[0, 0, 3] & 0x78
    assert (sub == 0).any() and (sub != 0).any()  # both subnormal and normal codes were produced


def test_e4m3_encoder_matches_torch_cast_at_ties():
    """The integer E4M3 encoder of the FP8 cache write: every code, every midpoint between neighbours (ties to
    even) and the floats just either side of each midpoint, both signs, equal torch's float -> e4m3 cast."""
    vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mid = (vals[1:] + vals[:-1]) / 2
    x = torch.cat([vals, mid, mid.nextafter(torch.tensor(0.0)), mid.nextafter(torch.tensor(1e9))])
    x = torch.cat([x, -x]).to(DEV)
    out = torch.empty(x.shape, dtype=torch.uint8, device=DEV)
    _encode_e4m3[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK=256)
    ref = x.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(out, ref)


def _decode_layer_chain(h, w_norm, k_cache, v_cache, pad, slot, cos, sin, layers):
    """`layers` rounds of the fused decode glue, each reading what the previous kernels wrote:
    add_rmsnorm -> rope_write (cache at `slot`) -> decode_attention -> silu_mul -> add_rmsnorm."""
    B, Hkv, S, D = k_cache.shape
    delta = None
    for _ in range(layers):
        h, n = add_rmsnorm(h, delta, w_norm, 1e-5)
        q = n.view(B, -1, D)
        kv = n.view(B, -1, D)[:, :Hkv]
        q = rope_write(q, kv, kv, cos, sin, k_cache, v_cache, slot)
        att = decode_attention(q, k_cache, v_cache, None, None, pad, slot, S, None, D ** -0.5)  # [B, Hq D]
        delta = silu_mul(torch.cat((att, att), dim=-1))
    return add_rmsnorm(h, delta, w_norm, 1e-5)[1]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs a Hopper (sm_90+) GPU")
def test_decode_ops_pdl_chain_in_a_graph_equals_serial():
    from fp4kit.kernels import fp4_gemm

    B, Hq, Hkv, S, D = 2, 8, 2, 128, 64
    h = torch.randn(B, Hq * D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(Hq * D, device="cuda", dtype=torch.bfloat16) + 0.5
    kc0, vc0, _, _ = _cache(B, Hkv, S, D, torch.bfloat16)
    pad = torch.tensor([0, 3], device="cuda")
    slot = torch.tensor([S - 1], device="cuda")
    ang = torch.randn(B, D, device="cuda")
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    old = fp4_gemm.PDL
    results = {}
    try:
        for pdl in (False, True):
            fp4_gemm.PDL = pdl
            kc, vc = kc0.clone(), vc0.clone()
            ref = _decode_layer_chain(h, w, kc, vc, pad, slot, cos, sin, 6)  # eager (compiles)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = _decode_layer_chain(h, w, kc, vc, pad, slot, cos, sin, 6)
            reps = []
            for _ in range(10):
                out.fill_(float("nan"))
                g.replay()
                reps.append(out.clone())
            torch.cuda.synchronize()
            results[pdl] = (ref, reps, kc.clone())
    finally:
        fp4_gemm.PDL = old
    serial = results[False][0]
    for pdl, (ref, reps, kc) in results.items():
        assert torch.equal(ref, serial), pdl
        assert torch.equal(kc, results[False][2]), pdl
        for r in reps:
            assert torch.equal(r, serial), pdl


def _exact_fp8_attention(q, kq, vq, ks, vs, pad, slot, kv_len, scaling):
    """float64 attention over the exactly dequantized FP8 cache (code * scale, no rounding)."""
    k = kq[:, :, :kv_len].double() * ks[:, :, :kv_len, None].double()
    v = vq[:, :, :kv_len].double() * vs[:, :, :kv_len, None].double()
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    qg = q.double().reshape(B, Hkv, Hq // Hkv, D)
    s = torch.einsum("bhgd,bhld->bhgl", qg, k) * scaling
    j = torch.arange(kv_len, device=q.device)
    vis = ((j[None, :] >= pad[:, None]) & (j[None, :] <= slot)) | (j[None, :] == slot)
    s = s.masked_fill(~vis[:, None, None, :], float("-inf"))
    return torch.einsum("bhgl,bhld->bhgd", s.softmax(-1), v).reshape(B, Hq * D)


def test_attention_fp8_cache_bf16_query():
    """bf16 queries on an FP8 cache (the engine's case) against float64 attention on the exact cache values
    (code * scale, unrounded). CUDA: codes -> bf16 (exact), bf16 dots; the interpreter takes the float32 dots."""
    B, Hq, Hkv, S, D = 3, 8, 2, 72, 32
    k = torch.randn(B, Hkv, S, D, device=DEV) * 3
    v = torch.randn(B, Hkv, S, D, device=DEV)
    (kq, ks), (vq, vs) = quantize_kv_fp8(k), quantize_kv_fp8(v)
    q = (torch.randn(B, Hq, D, device=DEV) * 2).to(torch.bfloat16)
    pad = torch.tensor([0, 5, 17], device=DEV)
    slot = torch.tensor([66], device=DEV)
    got = decode_attention(q, kq, vq, ks, vs, pad, slot, 70, None, D ** -0.5)
    ref = _exact_fp8_attention(q, kq, vq, ks, vs, pad, slot, 70, D ** -0.5)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    # CUDA: P rounded to bf16 before P.V (2^-9 relative) and the output's own rounding (half an ulp); the
    # interpreter truncates float32 -> bf16 (a whole ulp, up to 2^-7 of the largest output)
    tol = 2 ** -8 if DEV == "cuda" else 2 ** -7
    assert (got.double() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.skipif(DEV != "cuda", reason="the FP8 one-split launch settings (ATTN_FP8_SINGLE_SPLIT) apply on CUDA only")
@pytest.mark.parametrize("kv_len", [576, 640, 700])
@pytest.mark.parametrize("setting", [(4, 3, None, 128), (8, 3, None, 64)], ids=["128_key_tiles", "64_key_tiles"])
def test_attention_fp8_one_split_at_the_engine_shape(monkeypatch, kv_len, setting):
    """The 8B engine at batch 32 (32 rows x 8 KV heads of 128, one split): both FP8 one-split settings (64-key
    tiles below ATTN_FP8_LONG_MIN_KEYS, 128-key tiles from there) at every length, against float64 attention on the
    exact cache values (a partial last tile at 576 and 700 keys for 128-key tiles)."""
    monkeypatch.setattr(decode_ops, "ATTN_FP8_SINGLE_SPLIT", setting)
    monkeypatch.setattr(decode_ops, "ATTN_FP8_SINGLE_SPLIT_LONG", None)
    B, Hq, Hkv, S, D = 32, 32, 8, 768, 128
    torch.manual_seed(kv_len)
    k = torch.randn(B, Hkv, S, D, device=DEV) * 3
    v = torch.randn(B, Hkv, S, D, device=DEV)
    (kq, ks), (vq, vs) = quantize_kv_fp8(k), quantize_kv_fp8(v)
    q = (torch.randn(B, Hq, D, device=DEV) * 2).to(torch.bfloat16)
    pad = torch.randint(0, 40, (B,), device=DEV)
    slot = torch.tensor([kv_len - 1], device=DEV)
    got = decode_attention(q, kq, vq, ks, vs, pad, slot, kv_len, None, D ** -0.5)
    ref = _exact_fp8_attention(q, kq, vq, ks, vs, pad, slot, kv_len, D ** -0.5)
    # Rounding analysis: scores are exact products summed in float32; each p_j * scale_j is rounded to bf16 before
    # P.V (relative 2^-9, p_j >= 0), so the normalised sum moves by at most 2^-9 sum_j w_j |v_j| <= 2^-9 max |v|;
    # then the output's own rounding, half an ulp: 2^-9 |out|. (Over 32 x 32 heads the largest |v| is above the
    # largest output, so the small test's 2^-8 max |out| does not cover this shape.)
    v_max = (vq[:, :, :kv_len].float() * vs[:, :, :kv_len, None]).abs().max().double()
    bound = 2 ** -9 * (v_max + ref.abs().max()) * (1 + 2 ** -10)  # the factor: float32 sums and exp2
    assert (got.double() - ref).abs().max() <= bound


def test_attention_split_rule():
    """One split for many rows over a short cache (H100 sweep: faster, no combine); splits otherwise."""
    from fp4kit.kernels.decode_ops import _attn_splits

    assert _attn_splits(32, 8, 576, 64, 132) == (1, 9)  # the 8B engine at batch 32
    assert _attn_splits(32, 8, 2048, 64, 132)[0] > 1  # 32 tiles: an unsplit program is too long
    assert _attn_splits(8, 8, 576, 64, 132)[0] > 1  # 64 programs do not fill 132 SMs
    splits, iters = _attn_splits(1, 8, 8192, 64, 132)
    assert splits > 1 and splits * iters * 64 >= 8192


def test_prefetch_args_rule():
    """The L2 prefetch before the PDL wait runs only with PDL, for contiguous caches whose key rows are 16-byte
    sized; FP8 scales only where their rows are 16-byte aligned."""
    from fp4kit.kernels.decode_ops import _prefetch_args

    kq, vq, ks, vs = _cache(2, 2, 64, 32, None, fp8=True)
    args = _prefetch_args(True, kq, vq, ks, vs, 40, 128)
    assert args == dict(PREFETCH_L=128, kv_len=40, KEY_BYTES=32, PREFETCH_SCALES=True)
    assert _prefetch_args(False, kq, vq, ks, vs, 40, 128) == {}  # no PDL: nothing runs before the loads
    assert _prefetch_args(True, kq, vq, ks, vs, 40, 0) == {}
    # key rows of 8 bytes (D = 8, FP8) are not a bulk request's multiple of 16
    k8, v8, ks8, vs8 = _cache(2, 2, 64, 8, None, fp8=True)
    assert _prefetch_args(True, k8, v8, ks8, vs8, 40, 128) == {}
    # a cache whose slots are not contiguous (a transposed view): no prefetch
    kt = kq.transpose(2, 3).contiguous().transpose(2, 3)
    assert _prefetch_args(True, kt, kt, ks, vs, 40, 128) == {}
    # scale rows of 62 slots (248 bytes): keys prefetched, scales not
    k62, v62, ks62, vs62 = _cache(2, 2, 62, 32, None, fp8=True)
    assert _prefetch_args(True, k62, v62, ks62, vs62, 40, 128)["PREFETCH_SCALES"] is False
    kb, vb, _, _ = _cache(2, 2, 64, 32, torch.bfloat16)
    assert _prefetch_args(True, kb, vb, None, None, 40, 64) == dict(PREFETCH_L=64, kv_len=40, KEY_BYTES=64,
                                                                     PREFETCH_SCALES=False)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="the L2 prefetch runs with programmatic dependent launch, which needs a Hopper (sm_90+) GPU")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_cache", "fp8_cache"])
@pytest.mark.parametrize("B,kv_len,slot", [(32, 640, 639), (32, 576, 100), (1, 4096, 4000), (2, 70, 5)])
def test_attention_prefetch_changes_no_bit(monkeypatch, fp8, B, kv_len, slot):
    """The prefetch is a hint: with and without it (and for a bf16 cache, where it is off by default) the output
    and the cache written at the slot are the same bits, one split or many, the slot in a prefetched tile or not,
    in an eager launch and replayed in a graph after a launch that writes the query."""
    from fp4kit.kernels import fp4_gemm

    monkeypatch.setattr(fp4_gemm, "PDL", True)
    Hq, Hkv, S, D = 32, 8, 4096, 128
    torch.manual_seed(kv_len + slot)
    kc0, vc0, ks0, vs0 = _cache(B, Hkv, S, D, torch.bfloat16, fp8=fp8)
    q0 = (torch.randn(B, Hq, D, device=DEV) * 2).to(torch.bfloat16)
    kn = torch.randn(B, Hkv, D, device=DEV).to(torch.bfloat16)
    vn = torch.randn(B, Hkv, D, device=DEV).to(torch.bfloat16)
    ang = torch.randn(B, D, device=DEV)
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    pad = torch.randint(0, 3, (B,), device=DEV)
    slot_t = torch.tensor([slot], device=DEV)
    outs = {}
    for keys in (0, 128, 256):
        monkeypatch.setattr(decode_ops, "ATTN_PREFETCH_KEYS", keys)
        monkeypatch.setattr(decode_ops, "ATTN_PREFETCH_BF16", True)
        kc, vc = kc0.clone(), vc0.clone()
        ks, vs = (ks0.clone(), vs0.clone()) if fp8 else (None, None)
        q = torch.empty_like(q0)
        q.copy_(q0)
        eager = rope_decode_attention(q, kn, vn, cos, sin, kc, vc, ks, vs, pad, slot_t, kv_len, None, D ** -0.5)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            q.copy_(q0 * 1)  # a kernel that writes the query right before the attention launch
            out = rope_decode_attention(q, kn, vn, cos, sin, kc, vc, ks, vs, pad, slot_t, kv_len, None, D ** -0.5)
        q.zero_()
        g.replay()
        torch.cuda.synchronize()
        outs[keys] = (eager, out.clone(), kc[:B, :, slot].view(torch.uint8 if fp8 else torch.int16).clone(),
                      vc[:B, :, slot].view(torch.uint8 if fp8 else torch.int16).clone())
        if keys == 0:
            assert torch.isfinite(eager.float()).all()
    for keys in (128, 256):
        for a, b in zip(outs[keys], outs[0]):
            assert torch.equal(a, b), keys
