"""`FP4Experts`: FP4 storage and forward for the fused experts of transformers' MoE layers.

Transformers 5 keeps all experts of a layer in two 3-D parameters and loops over them in its own
`forward(hidden_states, top_k_index, top_k_weights)` (Qwen2/3-MoE, Mixtral, DeepSeek-V3, ...):

    gate_up_proj  [E, 2I, H]   rows 0..I-1 are expert e's gate_proj (w1), rows I..2I-1 its up_proj (w3)
    down_proj     [E, H, I]

`FP4Experts` replaces such a module (swapped on its parent, nothing patched) and keeps the same
forward contract. Each expert's weights are quantized on their own, blocks along the input
features exactly as an `FP4Linear` would, and stored stacked:

    gate_up_packed  uint8 [E, 2I, H/2]      gate_up_scale  [E, 2I, H/bs]    gate_up_global_scale  f32 [E, 2]
    down_packed     uint8 [E, H, I/2]       down_scale     [E, H, I/bs]     down_global_scale     f32 [E]

NVFP4 global scales are per expert (an expert's weights have their own range) and, as vLLM fuses an
expert's w1 and w3 into one matrix with one per-tensor scale, gate and up of one expert share theirs:
quantizing uses the amax of both halves. The [E, 2] layout still holds two different values when a
checkpoint from another tool has them, so import is lossless. MXFP4 has no global scale.

Scales come from the weights alone, so an expert that no calibration token reaches is quantized as
well as any other: there is no calibration hole.

The forward has two paths. On CUDA (SiLU experts, gate and up sharing their global scale, which is
what fp4kit writes) it calls the grouped MoE kernel `fp4kit.kernels.fp4_moe_mlp`: every routed
(token, slot) pair in two launches, gate_up with a fused SwiGLU epilogue and down with the router
weights, straight from these buffers. Elsewhere it dequantizes only the experts the router picked
and runs transformers' own loop: the torch reference, exact against the float module run on the
dequantized weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fp4kit.formats import MXFP4Config, NVFP4Config, QuantizedTensor, check_finite, quantize
from fp4kit.kernels.fp4_moe import FP4Experts as StackedExperts
from fp4kit.kernels.fp4_moe import fp4_moe_mlp


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with bias-free 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3):
        return False
    e, two_i, h = gu.shape
    return tuple(down.shape) == (e, h, two_i // 2) and two_i % 2 == 0 and hasattr(module, "act_fn")


def experts_exclusion_reason(module: nn.Module, config) -> str | None:
    """Why a fused experts module cannot be stored in `config`, or None."""
    if any(n.endswith("_bias") for n, _ in module.named_parameters(recurse=False)):
        return "experts with biases (gpt-oss layout) are read from gpt-oss MXFP4 checkpoints, not quantized here"
    e, two_i, h = module.gate_up_proj.shape
    if h % config.block_size or (two_i // 2) % config.block_size:
        return f"hidden {h} / expert width {two_i // 2} not divisible by block size {config.block_size}"
    return None


class FP4Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, config: NVFP4Config | MXFP4Config,
                 act_fn: nn.Module, *, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if hidden % config.block_size or intermediate % config.block_size:
            raise ValueError(f"FP4Experts: hidden {hidden} and width {intermediate} must divide {config.block_size}")
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, intermediate
        self.config, self.act_fn, self.dtype = config, act_fn, dtype
        e, h, i, bs = num_experts, hidden, intermediate, config.block_size
        scale_dtype = torch.float8_e4m3fn if isinstance(config, NVFP4Config) else torch.uint8
        kw = {"device": device}
        self.register_buffer("gate_up_packed", torch.zeros(e, 2 * i, h // 2, dtype=torch.uint8, **kw))
        self.register_buffer("gate_up_scale", torch.zeros(e, 2 * i, h // bs, dtype=scale_dtype, **kw))
        self.register_buffer("down_packed", torch.zeros(e, h, i // 2, dtype=torch.uint8, **kw))
        self.register_buffer("down_scale", torch.zeros(e, h, i // bs, dtype=scale_dtype, **kw))
        if isinstance(config, NVFP4Config):
            self.register_buffer("gate_up_global_scale", torch.ones(e, 2, **kw))
            self.register_buffer("down_global_scale", torch.ones(e, **kw))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_experts(cls, module: nn.Module, config: NVFP4Config | MXFP4Config, *, name: str = "experts",
                     weights: dict | None = None) -> "FP4Experts":
        """Quantize a transformers experts module (see `is_fused_experts`), expert by expert.

        `weights` maps expert indices to (gate_up, down) QuantizedTensors an algorithm already computed
        (GPTQ, `fp4kit.algorithms.moe_gptq`); the other experts are quantized round-to-nearest."""
        gu, down = module.gate_up_proj.detach(), module.down_proj.detach()
        check_finite(gu, f"{name}.gate_up_proj")
        check_finite(down, f"{name}.down_proj")
        e, two_i, h = gu.shape
        out = cls(e, h, two_i // 2, config, module.act_fn, dtype=gu.dtype, device=gu.device)
        for x in range(e):
            given = (weights or {}).get(x)
            if given is not None:
                expected = ((given[0], (two_i, h), "gate_up_proj"), (given[1], (h, two_i // 2), "down_proj"))
                for qt, shape, what in expected:
                    if tuple(qt.shape) != shape or qt.config != config:
                        raise ValueError(f"{name}.{x}.{what}: precomputed weight {tuple(qt.shape)} "
                                         f"{qt.config.name} does not fit {shape} {config.name}")
            # NVFP4: one amax (global scale) for gate and up together
            qt = given[0] if given is not None else quantize(gu[x], config, name=f"{name}.{x}.gate_up_proj")
            out.gate_up_packed[x], out.gate_up_scale[x] = qt.data, qt.scale
            if qt.global_scale is not None:
                out.gate_up_global_scale[x] = qt.global_scale.reshape(())
            qt = given[1] if given is not None else quantize(down[x], config, name=f"{name}.{x}.down_proj")
            out.down_packed[x], out.down_scale[x] = qt.data, qt.scale
            if qt.global_scale is not None:
                out.down_global_scale[x] = qt.global_scale.reshape(())
        return out

    # ------------------------------------------------------------------ per-expert views
    def gate_up(self, e: int, half: int | None = None) -> QuantizedTensor:
        """Expert e's gate_up [2I, H] (half=None), its gate [I, H] (half=0) or its up [I, H] (half=1)."""
        i, h = self.intermediate_dim, self.hidden_dim
        rows = slice(None) if half is None else slice(half * i, (half + 1) * i)
        g = None
        if isinstance(self.config, NVFP4Config):
            pair = self.gate_up_global_scale[e]
            if half is None and pair[0] != pair[1]:
                raise ValueError(f"expert {e}: gate and up have different global scales; view them one half at a time")
            g = pair[0 if half is None else half].reshape(1)
        n = 2 * i if half is None else i
        return QuantizedTensor(self.gate_up_packed[e, rows], self.gate_up_scale[e, rows], g, (n, h), self.config)

    def down(self, e: int) -> QuantizedTensor:
        g = self.down_global_scale[e].reshape(1) if isinstance(self.config, NVFP4Config) else None
        return QuantizedTensor(self.down_packed[e], self.down_scale[e], g, (self.hidden_dim, self.intermediate_dim),
                               self.config)

    def dequantized(self, e: int, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of expert e in `dtype` (default: the module's dtype)."""
        dtype = dtype or self.dtype
        gu = torch.cat([self.gate_up(e, 0).dequantize(dtype), self.gate_up(e, 1).dequantize(dtype)])
        return gu, self.down(e).dequantize(dtype)

    # ------------------------------------------------------------------ forward (transformers' contract)
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states: [T, H]; top_k_index, top_k_weights: [T, k]
        if hidden_states.is_cuda and self.kernel_ready():
            return self.forward_kernel(hidden_states, top_k_index, top_k_weights)
        return self.forward_reference(hidden_states, top_k_index, top_k_weights)

    def kernel_ready(self) -> bool:
        """The grouped kernel fuses SiLU-gated experts whose gate and up share one global scale."""
        if "silu" not in type(self.act_fn).__name__.lower():  # transformers' SiLUActivation / nn.SiLU
            return False
        if isinstance(self.config, NVFP4Config):
            g = self.gate_up_global_scale
            return bool(torch.equal(g[:, 0], g[:, 1]))
        return True

    def stacked(self) -> tuple[StackedExperts, StackedExperts]:
        """(gate_up [E, 2I, H], down [E, H, I]) as the kernel's stacked-experts views (no copy of codes)."""
        nv = isinstance(self.config, NVFP4Config)
        gate_up = StackedExperts(self.gate_up_packed, self.gate_up_scale,
                                 self.gate_up_global_scale[:, 0].contiguous() if nv else None, self.config)
        down = StackedExperts(self.down_packed, self.down_scale, self.down_global_scale if nv else None, self.config)
        return gate_up, down

    def forward_kernel(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        gate_up, down = self.stacked()
        return fp4_moe_mlp(hidden_states, gate_up, down, top_k_index, top_k_weights.to(hidden_states.dtype))

    def forward_reference(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:  # transformers marks dropped slots with index E
                continue
            token, slot = torch.where(top_k_index == e)
            w_gu, w_down = self.dequantized(e, hidden_states.dtype)
            gate, up = F.linear(hidden_states[token], w_gu).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, w_down) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_dim}, width={self.intermediate_dim}, "
                f"config={self.config.name}")

