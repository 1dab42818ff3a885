"""The decoder forward of the engine: the model's own modules, our attention, rope and static cache.

What runs where. Every weight-bearing module is the Hugging Face model's own and is called as a
module: the embedding, each norm, `self_attn.q_proj/k_proj/v_proj/o_proj` (an `FP4Linear`, a LoRA
wrapper around one, or a plain `nn.Linear`: whatever sits there), `q_norm/k_norm`, the whole MLP
or MoE block, the final norm and `lm_head`. So weights are never copied: training and generation
share them. What is ours is what HF does through its cache and mask machinery, rewritten in the
gpt-fast style so that one decode step has fixed shapes and can be captured in a CUDA graph:

    rope         cos/sin from the model's own `rotary_emb` module, applied as HF does (rotate_half)
    attention    F.scaled_dot_product_attention over the static cache, GQA without repeating K/V:
                 q [B, Hq, T, D] is viewed as [B, Hkv, G*T, D] (G = Hq / Hkv query heads per KV head)
    cache        fp4kit.nn.KVCache per layer (bf16 or FP8), written at `slots`, read up to `kv_len`
    mask         bool [B, 1, T, L]: key j is visible to the query in slot s when
                 pad[b] <= j <= s  (and s - j < window on sliding-window layers)

Batched prompts are left-padded to a common length P, so all rows share slot numbers: row b's
token at slot s has position s - pad[b]. A padded query sees only itself (no empty softmax rows);
its output is never used.

Fused mode (`fused=True`, the default). The same forward with fewer, larger kernels (the torch
path above stays as `fused=False`, and is the twin the fused path is tested against):

    q/k/v and gate/up   one GEMM each where `fused.fuse_linears` allows (plain nn.Linear or plain
                        FP4Linear with a shared format and global scale), then silu * up in one kernel
    norms               residual add + RMSNorm in one kernel for transformers' RMSNorm classes
                        (the residual add of the previous block is carried into the next norm)
    decode (T = 1)      `rope_decode_attention`: rope on q and k, the cache write (bf16, or FP8 with
                        its scales) and attention reading the cache directly (FP8 scales applied in
                        registers) in one attention launch (+ the split combine): no mask tensor,
                        no dequantized copy of the cache

Kernels run on CUDA (`fp4kit.kernels.decode_ops`); elsewhere their torch twins run, unless
`use_kernels` is set (the tests do, under the Triton interpreter).

Supported families (`config.model_type`): llama, mistral, qwen2, qwen3 (pre-norm blocks, qwen3 with
q/k norms), gemma3_text (sandwich norms, q/k norms, scaled embedding, query_pre_attn_scalar,
sliding-window layers with their own rope), and MoE models whose block is the model's own module
(qwen2_moe, qwen3_moe, mixtral). Anything else raises `UnsupportedModel`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fp4kit.kernels import decode_ops
from fp4kit.nn.kv_cache import KVCache

from .fused import (
    GATED_MLPS,
    FusedLinear,
    HeadFormat,
    NormKind,
    fuse_linears,
    is_silu,
    norm_kind,
    quantize_head,
)

DENSE = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
MOE = ("qwen2_moe", "qwen3_moe", "mixtral")


class UnsupportedModel(ValueError):
    pass


@dataclass(frozen=True)
class LayerSpec:
    scaling: float  # softmax scale of q.k
    window: int | None  # sliding window (keys with s - j < window), None for global attention
    rope_type: str  # which cos/sin this layer uses ("full_attention" or "sliding_attention")


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    sandwich_norms: bool  # Gemma-3: norm after attention and around the MLP
    mlp_attr: str  # "mlp" or "block_sparse_moe"
    is_moe: bool
    final_softcap: float | None
    layers: tuple[LayerSpec, ...]


def unwrap(model: nn.Module) -> nn.Module:
    """A PEFT model's underlying causal LM (its LoRA-wrapped layers stay in place and are used as they are)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def arch_spec(model: nn.Module) -> ArchSpec:
    """Read what the forward needs from a transformers causal LM, or raise UnsupportedModel."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in DENSE + MOE:
        raise UnsupportedModel(f"the engine supports model_type {DENSE + MOE}; got {mtype!r} "
                               f"({type(model).__name__})")
    if not (hasattr(model, "model") and hasattr(model, "lm_head") and hasattr(model.model, "layers")):
        raise UnsupportedModel(f"{type(model).__name__}: expected a *ForCausalLM with .model.layers and .lm_head")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise UnsupportedModel(f"{mtype}: attention logit softcapping is not supported")
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    layers = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        window = getattr(attn, "sliding_window", None)
        if window is None and layer_types[i] == "sliding_attention":
            window = cfg.sliding_window
        layers.append(LayerSpec(float(attn.scaling), window, layer_types[i]))
    first = model.model.layers[0]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ArchSpec(mtype, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim,
                    sandwich_norms=hasattr(first, "pre_feedforward_layernorm"),
                    mlp_attr="block_sparse_moe" if hasattr(first, "block_sparse_moe") else "mlp",
                    is_moe=mtype in MOE, final_softcap=getattr(cfg, "final_logit_softcapping", None),
                    layers=tuple(layers))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [B, T, D]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def attention_mask(pad: torch.Tensor, slots: torch.Tensor, length: int, window: int | None = None) -> torch.Tensor:
    """bool [B, 1, T, L]: pad [B] left-padding per row, slots [T] the queries' slots, L keys."""
    j = torch.arange(length, device=slots.device)
    causal = j[None, :] <= slots[:, None]  # [T, L]
    if window is not None:
        causal = causal & (slots[:, None] - j[None, :] < window)
    mask = causal[None] & (j[None, None, :] >= pad[:, None, None])  # [B, T, L]
    mask = mask | (j[None, :] == slots[:, None])[None]  # a padded query sees itself: no empty rows
    return mask[:, None]


def gqa_attention(q, k, v, mask, scaling: float) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, L, D], mask bool [B, 1, G*T, L] (repeated per query head) -> [B, T, Hq*D]."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    q = q.reshape(B, k.shape[1], G * T, D)  # query head h = kv_head * G + g; row g*T + t
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.reshape(B, Hq, T, D).transpose(1, 2).reshape(B, T, Hq * D)


@dataclass
class LayerPlan:
    """What the fused forward runs for one layer (None: call the model's modules)."""
    qkv: FusedLinear | None
    gate_up: FusedLinear | None
    silu: bool  # the MLP's activation is SiLU: silu * up in one kernel


def static_rope(rot: nn.Module) -> bool:
    """Whether a transformers rotary module gives each position the same cos / sin whatever else it saw:
    every rope type but the dynamic ones (`dynamic_rope_update` rescales them with the sequence length)."""
    kind = getattr(rot, "rope_type", "default")
    kinds = list(kind.values()) if isinstance(kind, dict) else [kind]
    return all(isinstance(k, str) and "dynamic" not in k and k != "longrope" for k in kinds)


class DecoderRunner:
    """The forward pass over a HF causal LM's modules with static caches (see the module docstring)."""

    def __init__(self, model: nn.Module, fused: bool = True, head: HeadFormat = HeadFormat.MODEL):
        self.model = unwrap(model)
        self.head_format = HeadFormat(head)
        self._head: FusedLinear | None = None
        self.spec = arch_spec(self.model)
        rot = self.model.model.rotary_emb
        self._rope_takes_type = "layer_type" in inspect.signature(rot.forward).parameters
        self.rope_types = sorted({s.rope_type for s in self.spec.layers})
        self.fused = fused
        self.use_kernels: bool | None = None  # None: the Triton kernels on CUDA, their twins elsewhere
        self._plans: list[LayerPlan] | None = None
        self._norms: dict[int, NormKind | None] = {}
        self.rope_static = static_rope(rot) and not hasattr(self.model.model, "rotary_emb_local")
        self._max_positions = 0  # set by make_caches: the decode rope tables cover positions below it
        self._rope_tables: dict[tuple, dict] = {}

    @property
    def n_layers(self) -> int:
        return len(self.spec.layers)

    def make_caches(self, max_batch: int, max_seq_len: int, kv_dtype: torch.dtype, compute_dtype: torch.dtype,
                    device) -> list[KVCache]:
        s = self.spec
        self._max_positions = max(self._max_positions, max_seq_len)
        return [KVCache(max_batch, s.n_kv_heads, max_seq_len, s.head_dim, dtype=kv_dtype,
                        compute_dtype=compute_dtype, device=device) for _ in range(self.n_layers)]

    def rope(self, h: torch.Tensor, positions: torch.Tensor) -> dict:
        inner = self.model.model
        out = {}
        for t in self.rope_types:
            if self._rope_takes_type:
                out[t] = inner.rotary_emb(h, positions, t)
            elif t == "sliding_attention" and hasattr(inner, "rotary_emb_local"):
                out[t] = inner.rotary_emb_local(h, positions)
            else:
                out[t] = inner.rotary_emb(h, positions)
        return out

    def decode_rope(self, h: torch.Tensor, positions: torch.Tensor) -> dict:
        """{rope type: (cos, sin) [B, D] contiguous} for one token per row (positions [B, 1]).

        With a static rope (`static_rope`) and known cache length: rows of a table of every position,
        built once per device and dtype by the model's own rotary module (so each row is the value the
        module computes for that position), then two gathers per type: 2 kernels instead of the
        module's ~8 small ones in every decode step. Otherwise, and when the table is missing under
        CUDA graph capture, the module per step."""
        key = (h.device, h.dtype, self._max_positions)
        tables = self._rope_tables.get(key)
        if tables is None and self.rope_static and self._max_positions and not (
                h.is_cuda and torch.cuda.is_current_stream_capturing()):
            every = torch.arange(self._max_positions, device=h.device)[None]  # [1, S]
            full = self.rope(h[:1, :1], every)
            tables = {t: (cos[0].contiguous(), sin[0].contiguous()) for t, (cos, sin) in full.items()}
            self._rope_tables = {key: tables}
        if tables is None:
            per_step = self.rope(h, positions)
            return {t: (cos[:, 0].contiguous(), sin[:, 0].contiguous()) for t, (cos, sin) in per_step.items()}
        idx = positions[:, 0]
        return {t: (cos.index_select(0, idx), sin.index_select(0, idx)) for t, (cos, sin) in tables.items()}

    def masks(self, pad, slots, kv_len: int) -> dict:
        """One mask per distinct window, built once per forward and already repeated for the G query
        heads of each KV head (gqa_attention's row order): {window: bool [B, 1, G*T, L]}."""
        G = self.spec.n_heads // self.spec.n_kv_heads
        windows = {layer.window for layer in self.spec.layers}
        return {w: attention_mask(pad, slots, kv_len, w).repeat(1, 1, G, 1) for w in windows}

    def attention(self, i: int, attn: nn.Module, x, rope, masks, slots, kv_len: int, cache: KVCache):
        # x: [B, T, hidden]
        B, T, _ = x.shape
        s = self.spec
        q = attn.q_proj(x).view(B, T, s.n_heads, s.head_dim)
        k = attn.k_proj(x).view(B, T, s.n_kv_heads, s.head_dim)
        v = attn.v_proj(x).view(B, T, s.n_kv_heads, s.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        layer = s.layers[i]
        cos, sin = rope[layer.rope_type]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.write(k, v, slots)
        keys, values = cache.read(B, kv_len)
        return attn.o_proj(gqa_attention(q, keys, values, masks[layer.window], layer.scaling))

    def mlp(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = getattr(layer, self.spec.mlp_attr)(x)
        return out[0] if isinstance(out, tuple) else out  # some MoE blocks also return router logits

    # ------------------------------------------------------------------ fused mode

    def plans(self) -> list[LayerPlan]:
        """The fused projections of every layer, built on first use (a copy of the fused weights)."""
        if self._plans is None:
            self._plans = [self._plan(layer) for layer in self.model.model.layers]
        return self._plans

    def _plan(self, layer: nn.Module) -> LayerPlan:
        a = layer.self_attn
        qkv = fuse_linears((a.q_proj, a.k_proj, a.v_proj)) if all(
            hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj")) else None
        mlp = getattr(layer, self.spec.mlp_attr)
        gate_up, silu = None, False
        if type(mlp).__name__ in GATED_MLPS and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            gate_up = fuse_linears((mlp.gate_proj, mlp.up_proj))
            silu = is_silu(getattr(mlp, "act_fn", None))
        return LayerPlan(qkv, gate_up, silu)

    def head_copy(self) -> FusedLinear | None:
        """The quantized copy of lm_head this runner runs (HeadFormat.INT8 / NVFP4; built on first use), else
        None (HeadFormat.MODEL, or a head that already is an FP4Linear)."""
        if self.head_format is not HeadFormat.MODEL and self._head is None:
            self._head = quantize_head(self.model.lm_head, self.head_format)
        return self._head

    def head(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., hidden] -> float32 logits [..., V] holding the head's model-dtype values: the model's lm_head
        # then a cast, or its quantized copy (the INT8 kernel writes them as float32 directly: one pass fewer)
        copy = self.head_copy()
        return self.model.lm_head(x).float() if copy is None else copy(x, out_dtype=torch.float32)

    def refresh(self) -> bool:
        """Rebuild the fused weights if a source changed in place or was replaced; True when rebuilt
        (captured graphs then point at dropped tensors: the engine recaptures)."""
        if self._head is not None and not self._head.is_current((self.model.lm_head,)):
            self.drop_fused()
            return True
        if self._plans is None:
            return False
        for plan, layer in zip(self._plans, self.model.model.layers):
            a, mlp = layer.self_attn, getattr(layer, self.spec.mlp_attr)
            stale = (plan.qkv is not None and not plan.qkv.is_current((a.q_proj, a.k_proj, a.v_proj))) or (
                plan.gate_up is not None and not plan.gate_up.is_current((mlp.gate_proj, mlp.up_proj)))
            if stale:
                self.drop_fused()
                return True
        return False

    def drop_fused(self) -> None:
        self._plans = None
        self._head = None
        self._norms.clear()

    def kernels_on(self, x: torch.Tensor) -> bool:
        return x.is_cuda if self.use_kernels is None else self.use_kernels

    def _ops(self, x: torch.Tensor, name: str):
        return getattr(decode_ops, name if self.kernels_on(x) else name + "_torch")

    def norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.add_norm(x, None, module)[1]

    def add_norm(self, h, delta, module: nn.Module):
        """(h + delta, norm(h + delta)); delta None: (h, norm(h)). One kernel for known RMSNorm classes."""
        key = id(module)
        if key not in self._norms:
            self._norms[key] = norm_kind(module)
        kind = self._norms[key]
        if kind is None:
            if delta is not None:
                h = h + delta
            return h, module(h)
        return self._ops(h, "add_rmsnorm")(h, delta, module.weight, kind.eps, kind.gemma)

    def attention_fused(self, i: int, attn: nn.Module, plan: LayerPlan, x, rope, masks, pad, slots, kv_len: int,
                        cache: KVCache):
        # x: [B, T, hidden]
        B, T, _ = x.shape
        s = self.spec
        if plan.qkv is not None:
            q, k, v = plan.qkv.split(plan.qkv(x))
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(B, T, s.n_heads, s.head_dim)  # views of the fused output: no copy
        k = k.view(B, T, s.n_kv_heads, s.head_dim)
        v = v.view(B, T, s.n_kv_heads, s.head_dim)
        if hasattr(attn, "q_norm"):
            q, k = self.norm(attn.q_norm, q.contiguous()), self.norm(attn.k_norm, k.contiguous())
        layer = s.layers[i]
        cos, sin = rope[layer.rope_type]  # [B, T, D], or [B, D] contiguous when T = 1
        if T > 1:  # prefill: the torch path (SDPA over the mask)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            cache.write(k, v, slots)
            keys, values = cache.read(B, kv_len)
            return attn.o_proj(gqa_attention(q, keys, values, masks[layer.window], layer.scaling))
        k_store, v_store, k_scale, v_scale = cache.storage()
        q, k, v = q[:, 0], k[:, 0], v[:, 0]  # [B, H, D]; cos, sin are already [B, D] (forward_fused)
        attend = self._ops(x, "rope_decode_attention")
        out = attend(q, k, v, cos, sin, k_store, v_store, k_scale, v_scale, pad, slots, kv_len, layer.window,
                     layer.scaling)  # [B, Hq * D]
        return attn.o_proj(out[:, None])

    def mlp_fused(self, layer: nn.Module, plan: LayerPlan, x: torch.Tensor) -> torch.Tensor:
        if plan.gate_up is None:
            return self.mlp(layer, x)
        mlp = getattr(layer, self.spec.mlp_attr)
        if plan.silu:  # kernels: one launch at decode (the GEMV's epilogue), else GEMM + silu_mul
            act = plan.gate_up.silu_mul(x) if self.kernels_on(x) else decode_ops.silu_mul_torch(plan.gate_up(x))
            return mlp.down_proj(act)
        gu = plan.gate_up(x)  # [..., 2 I]
        gate, up = plan.gate_up.split(gu)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def forward_fused(self, tokens, positions, pad, slots, kv_len: int, caches, last_only: bool) -> torch.Tensor:
        inner = self.model.model
        plans = self.plans()
        h = inner.embed_tokens(tokens)  # [B, T, hidden]
        T = tokens.shape[1]
        rope = self.decode_rope(h, positions) if T == 1 else self.rope(h, positions)  # once per step
        masks = self.masks(pad, slots, kv_len) if T > 1 else None
        pending = None  # the block output not yet added to the residual stream
        for i, layer in enumerate(inner.layers):
            h, x = self.add_norm(h, pending, layer.input_layernorm)
            a = self.attention_fused(i, layer.self_attn, plans[i], x, rope, masks, pad, slots, kv_len, caches[i])
            if self.spec.sandwich_norms:
                h, x = self.add_norm(h, self.norm(layer.post_attention_layernorm, a), layer.pre_feedforward_layernorm)
                pending = self.norm(layer.post_feedforward_layernorm, self.mlp_fused(layer, plans[i], x))
            else:
                h, x = self.add_norm(h, a, layer.post_attention_layernorm)
                pending = self.mlp_fused(layer, plans[i], x)
        if last_only:
            h, pending = h[:, -1:].contiguous(), pending[:, -1:].contiguous()
        return self.head(self.add_norm(h, pending, inner.norm)[1])

    def block(self, i: int, layer: nn.Module, h, rope, masks, slots, kv_len, cache):
        a = self.attention(i, layer.self_attn, layer.input_layernorm(h), rope, masks, slots, kv_len, cache)
        if self.spec.sandwich_norms:
            h = h + layer.post_attention_layernorm(a)
            return h + layer.post_feedforward_layernorm(self.mlp(layer, layer.pre_feedforward_layernorm(h)))
        h = h + a
        return h + self.mlp(layer, layer.post_attention_layernorm(h))

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, pad: torch.Tensor, slots: torch.Tensor,
                kv_len: int, caches: list[KVCache], last_only: bool = True) -> torch.Tensor:
        """tokens, positions [B, T]; pad [B]; slots [T]; keys 0..kv_len-1 -> float32 logits [B, V] of the last
        position (the only ones generation needs), or [B, T, V] with last_only=False (perplexity)."""
        if self.fused:
            logits = self.forward_fused(tokens, positions, pad, slots, kv_len, caches, last_only).float()
        else:
            inner = self.model.model
            h = inner.embed_tokens(tokens)  # [B, T, hidden]
            rope = self.rope(h, positions)
            masks = self.masks(pad, slots, kv_len)
            for i, layer in enumerate(inner.layers):
                h = self.block(i, layer, h, rope, masks, slots, kv_len, caches[i])
            logits = self.head(inner.norm(h[:, -1:] if last_only else h)).float()
        logits = logits[:, 0] if last_only else logits
        if self.spec.final_softcap:
            logits = torch.tanh(logits / self.spec.final_softcap) * self.spec.final_softcap
        return logits
