"""`KVCache`: a static, preallocated key/value cache for one attention layer, bf16 or FP8 E4M3.

Layout (gpt-fast style, one module per layer, allocated once for the largest batch and sequence):

    k, v        [max_batch, n_kv_heads, max_seq_len, head_dim]   bf16/fp16/fp32, or float8_e4m3fn
    k_scale,    [max_batch, n_kv_heads, max_seq_len]             float32, FP8 only: one scale per
    v_scale                                                       head per token position

Nothing is ever reallocated, so the tensors keep their addresses: a CUDA graph captured over
`write` and `read` replays correctly on the next step. Writes go through `index_copy_` with the
slot indices in a tensor (no Python int crosses the graph boundary); reads take a Python int
`length` (a graph is captured per length bucket, so attention reads only the live prefix instead of
all `max_seq_len` slots).

FP8 E4M3 with a scale per (row, head, position). Each key/value vector of `head_dim` numbers is
quantized on write with its own scale, the arithmetic of `fp4kit.formats.quantize_fp8` with
`FP8Granularity.TOKEN` (tested bit for bit):

    scale = amax(|x|) / 448   (1 when the vector is all zero)
    x_q   = fp8_e4m3(clamp(x / scale, -448, 448))          x ~= x_q * scale

Why per head and per position rather than one static scale per head (vLLM's choice): it needs no
calibration pass and nothing can saturate (a static scale clips outlier tokens), and it costs
4 bytes per head_dim bytes (3% at head_dim 128). E4M3 keeps 3 mantissa bits, so each element's
relative error is at most 2^-4 (half an ulp) above the subnormal range; the attention output
error is measured in tests/nn/test_kv_cache.py. The FP8 path halves the cache's memory; its speed
depends on who reads it: `read` dequantizes to the compute dtype in torch (what prefill uses);
the engine's decode attention (`fp4kit.kernels.decode_ops.decode_attention`) reads `storage()` in
place and applies the scales in registers, so there it moves about half the bytes of bf16.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = 448.0
KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)


def quantize_kv_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., D] float -> (codes float8_e4m3fn [..., D], scale float32 [...]), one scale per vector.

    Graph-safe (no host sync, no checks): the formats' arithmetic without its NaN check."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (xf / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def dequantize_kv_fp8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., D], scale [...] -> [..., D] in `dtype` (one float32 product, one rounding)."""
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)


class KVCache(nn.Module):
    """Static key/value cache of one layer (see the module docstring for layout and FP8 scales)."""

    def __init__(self, max_batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.bfloat16, compute_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if dtype not in KV_DTYPES:
            raise ValueError(f"KVCache dtype must be one of {KV_DTYPES}, got {dtype}")
        if min(max_batch, n_kv_heads, max_seq_len, head_dim) <= 0:
            raise ValueError(f"KVCache sizes must be positive, got batch={max_batch}, heads={n_kv_heads}, "
                             f"seq={max_seq_len}, head_dim={head_dim}")
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.dtype, self.compute_dtype = dtype, compute_dtype
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        if self.is_fp8:
            self.register_buffer("k_scale", torch.ones(shape[:3], dtype=torch.float32, device=device), persistent=False)
            self.register_buffer("v_scale", torch.ones(shape[:3], dtype=torch.float32, device=device), persistent=False)

    @property
    def is_fp8(self) -> bool:
        return self.dtype == torch.float8_e4m3fn

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: [B, H, T, D] for rows 0..B-1; slots: long [T], the positions they go to."""
        B = k.shape[0]
        if B > self.max_batch:
            raise ValueError(f"KVCache: batch {B} exceeds max_batch {self.max_batch}")
        if self.is_fp8:
            kq, ks = quantize_kv_fp8(k)
            vq, vs = quantize_kv_fp8(v)
            # index_copy_ has no float8 kernel on the CPU: copy the codes as bytes
            self.k.view(torch.uint8)[:B].index_copy_(2, slots, kq.view(torch.uint8))
            self.v.view(torch.uint8)[:B].index_copy_(2, slots, vq.view(torch.uint8))
            self.k_scale[:B].index_copy_(2, slots, ks)
            self.v_scale[:B].index_copy_(2, slots, vs)
        else:
            self.k[:B].index_copy_(2, slots, k.to(self.dtype))
            self.v[:B].index_copy_(2, slots, v.to(self.dtype))

    def read(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows 0..batch-1 at positions 0..length-1: [batch, H, length, D], compute dtype."""
        if length > self.max_seq_len:
            raise ValueError(f"KVCache: length {length} exceeds max_seq_len {self.max_seq_len}")
        k, v = self.k[:batch, :, :length], self.v[:batch, :, :length]
        if self.is_fp8:
            return (dequantize_kv_fp8(k, self.k_scale[:batch, :, :length], self.compute_dtype),
                    dequantize_kv_fp8(v, self.v_scale[:batch, :, :length], self.compute_dtype))
        return k.to(self.compute_dtype), v.to(self.compute_dtype)

    def storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The raw buffers for a kernel that reads the cache in place: (k, v, k_scale, v_scale), the scales
        None unless FP8. Shapes and dtypes as in the module docstring; the full allocation, not a prefix."""
        if self.is_fp8:
            return self.k, self.v, self.k_scale, self.v_scale
        return self.k, self.v, None, None

    def extra_repr(self) -> str:
        b, h, s, d = self.k.shape
        return f"batch={b}, kv_heads={h}, seq={s}, head_dim={d}, dtype={self.dtype}"
