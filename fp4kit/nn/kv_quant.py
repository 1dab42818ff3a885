"""FP8 KV cache with static, calibrated scales: what a serving engine runs with an FP8 KV cache.

vLLM (`kv_cache_dtype="fp8"`) stores keys and values as E4M3 with one scale per layer read from the
checkpoint (`self_attn.k_scale`, `self_attn.v_scale`; compressed-tensors' `kv_cache_scheme`). The
scale is fixed before serving, so it comes from calibration:

    k_scale = amax(|K|) / 448        K_q = e4m3(clamp(K / k_scale, -448, 448))        K ~= K_q * k_scale

with K the post-RoPE keys as the attention sees them (the same for V). Two granularities:

    TENSOR     one scale per layer for K and one for V          (vLLM; compressed-tensors "tensor")
    HEAD       one scale per KV head                             (compressed-tensors "attn_head")

Per-head scales help when heads differ in range (a few outlier heads would otherwise push every
other head's values down into E4M3's coarse low range). Tokens beyond the calibrated range clip.

For evaluation the quantization is simulated in transformers' attention: `enable_fp8_kv(model)`
registers an attention function (transformers' `AttentionInterface`, its extension point) that
fake-quantizes the key and value states with the layer's scales and then runs sdpa. The scales live
as buffers `k_scale` / `v_scale` on each attention module, so the state dict, and the exported
checkpoint, carry them under the names vLLM reads. fp4kit's own decode engine keeps a dynamic
per-token FP8 cache instead (`kv_cache.py`: nothing to calibrate, nothing clips).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .sparse_attention import attention_implementation, register_attention

E4M3_MAX = 448.0


class KVScaleGranularity(enum.Enum):
    TENSOR = "tensor"
    HEAD = "attn_head"


@dataclass(frozen=True)
class KVCacheConfig:
    granularity: KVScaleGranularity = KVScaleGranularity.TENSOR

    def __post_init__(self):
        if not isinstance(self.granularity, KVScaleGranularity):
            raise TypeError(f"KVCacheConfig.granularity must be a KVScaleGranularity, got {self.granularity!r}")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's attention modules: those with k_proj and v_proj children (Llama, Qwen, Gemma, ...)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj")}


def _amax(x: torch.Tensor, granularity: KVScaleGranularity) -> torch.Tensor:
    # x: [B, H, T, D] -> [] (TENSOR) or [H] (HEAD), float32
    x = x.detach().float().abs()
    return x.amax() if granularity is KVScaleGranularity.TENSOR else x.amax(dim=(0, 2, 3))


def observe_kv_amax(model: nn.Module, run: Callable[[], object],
                    config: KVCacheConfig = KVCacheConfig()) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run `run()` (calibration forwards) and return {attention module name: (K amax, V amax)}."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    names = {id(m): n for n, m in attention_modules(model).items()}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        name = names[id(module)]
        k, v = _amax(key, config.granularity), _amax(value, config.granularity)
        if name in seen:
            k, v = torch.maximum(seen[name][0], k), torch.maximum(seen[name][1], v)
        seen[name] = (k, v)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    with torch.no_grad(), attention_implementation(model, capture, "fp4kit_kv_observe"):
        run()
    missing = sorted(set(names.values()) - set(seen))
    if missing:
        raise ValueError(f"calibration never reached the attention of {missing[:4]}")
    return seen


def scale_shape(config: KVCacheConfig, num_kv_heads: int) -> tuple[int, ...]:
    """Scale shape as compressed-tensors stores it: [1] per tensor, [H, 1, 1] per head."""
    return (1,) if config.granularity is KVScaleGranularity.TENSOR else (num_kv_heads, 1, 1)


def add_kv_scale_buffers(model: nn.Module, config: KVCacheConfig, num_kv_heads: int) -> None:
    """Give every attention module float32 `k_scale` / `v_scale` buffers (ones) of the config's shape."""
    for module in attention_modules(model).values():
        device = next(itertools.chain(module.parameters(), module.buffers())).device
        for key in ("k_scale", "v_scale"):
            module.register_buffer(key, torch.ones(scale_shape(config, num_kv_heads), device=device))


def set_kv_scales(model: nn.Module, amax: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  config: KVCacheConfig = KVCacheConfig()) -> None:
    """Store calibrated scales (amax / 448; an all-zero range gets 1) on the attention modules."""
    modules = attention_modules(model)
    heads = next(iter(amax.values()))[0].numel()
    add_kv_scale_buffers(model, config, heads)
    for name, (k, v) in amax.items():
        for key, a in (("k_scale", k), ("v_scale", v)):
            s = a.float() / E4M3_MAX
            s = torch.where(s > 0, s, torch.ones_like(s))
            getattr(modules[name], key).copy_(s.reshape(scale_shape(config, heads)))


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] through E4M3 with `scale` ([1] or [H, 1, 1]); returned in x's dtype."""
    s = scale.to(x.device)
    q = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


def fp8_kv_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa over keys and values that went through the FP8 cache with the layer's static scales."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key, value = fake_quant_fp8(key, module.k_scale), fake_quant_fp8(value, module.v_scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def enable_fp8_kv(model: nn.Module) -> str:
    """Run the model's attention through `fp8_kv_attention` (scales must be set); returns the name."""
    missing = [n for n, m in attention_modules(model).items() if not hasattr(m, "k_scale")]
    if missing:
        raise ValueError(f"{missing[0]}: no k_scale / v_scale: run set_kv_scales (or load a checkpoint with them)")
    name = register_attention(fp8_kv_attention, "fp4kit_fp8_kv")
    model.set_attn_implementation(name)
    return name


def kv_config_of(model: nn.Module) -> KVCacheConfig | None:
    """The KV cache config the model's scale buffers imply (None when it has none)."""
    scales = [m.k_scale for m in attention_modules(model).values() if hasattr(m, "k_scale")]
    if not scales:
        return None
    per_head = scales[0].numel() > 1 or scales[0].dim() == 3
    return KVCacheConfig(KVScaleGranularity.HEAD if per_head else KVScaleGranularity.TENSOR)
