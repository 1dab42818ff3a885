"""What the engine fuses: one GEMM for q/k/v and one for gate/up, and which norms have a kernel.

Fused projections. Three linear layers reading the same input cost three launches and three
passes of Python dispatch; one GEMM over the concatenated weight [Nq + Nk + Nv, K] costs one,
and at M = 1 it is also faster on the GPU (one longer pass over memory). `fuse_linears` builds a
`FusedLinear` only when the layers compute exactly what one GEMM computes:

    all plain nn.Linear (exact type): same in_features, dtype, device, all with or all without bias
    all plain FP4Linear (exact type): the same format config, no online rotation, no input
        quantization, and for NVFP4 the same global scale (quantize_ shares it across q/k/v and
        across gate/up, as vLLM needs), so the concatenated codes and block scales decode to the
        rows of each weight exactly

Anything else (LoRA wrappers, rotated or W4A4 layers, mixed types) returns None and the engine
calls the modules one by one. The fused weight is a copy (the concatenation): bf16 adds the size
of the q/k/v and gate/up weights, FP4 adds their packed size, and FP4's GEMV layout is built once
from the concatenation (`prepare_fp4_weight`, kept here and passed as `prepared=`, so no
per-module prepared copy is made by the engine). `is_current` notices when a source tensor was
changed in place (or a module replaced); the engine then rebuilds (at prefill, never inside a graph).

Quantized output head (`quantize_head`, `Engine(lm_head=...)`). At batch 1 the bf16 lm_head of
Llama-3-8B (128256 x 4096, 1.05 GB) is ~20% of the bytes of an NVFP4 step. The engine can run a COPY of
`lm_head.weight` instead, for the head only (with tied embeddings, as SmolLM2's, the input embedding
stays as it is; the model itself is never changed):

    HeadFormat.INT8    INT8 codes with one scale per row (`formats.Int8Config`, 0.53 GB) through
                       `kernels.int8_linear`; perplexity within 0.2% of the model's head (SmolLM2, Gemma-3)
    HeadFormat.NVFP4   RTN NVFP4 with a per-tensor global scale (0.30 GB) through the FP4 GEMV / GEMM;
                       +10% perplexity on SmolLM2-135M: the format's cost (BENCHMARKS.md, "What a
                       quantized output head costs in quality")

Both are opt-in because they change the model's logits; a head that already is an FP4Linear is used
as it is.

Known norms. `norm_kind` says whether a norm module is one of transformers' RMSNorm classes whose
arithmetic `fp4kit.kernels.decode_ops.add_rmsnorm` reproduces (Llama form or Gemma form), by exact
class; anything else is called as a module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fp4kit.formats import Int8Config, NVFP4Config, QuantizedTensor, quantize
from fp4kit.kernels import PreparedFP4Weight, fp4_linear, prepare_fp4_weight
from fp4kit.kernels.decode_ops import silu_mul
from fp4kit.kernels.fp4_glu import gate_up_silu
from fp4kit.kernels.int8_linear import int8_linear
from fp4kit.nn import FP4Linear

LLAMA_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen2MoeRMSNorm",
               "Qwen3MoeRMSNorm", "MixtralRMSNorm")
GEMMA_NORMS = ("Gemma3RMSNorm",)
# MLPs computing down(act(gate(x)) * up(x)): gate/up can be one GEMM (silu * up one kernel when act is SiLU)
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma3MLP", "Qwen2MoeMLP", "Qwen3MoeMLP")


@dataclass(frozen=True)
class NormKind:
    gemma: bool  # (1 + w) * x_hat in float32, else w * x_hat.to(dtype)
    eps: float


def norm_kind(module: nn.Module) -> NormKind | None:
    """The kernel form of a transformers RMSNorm (exact class, float eps, 1-D weight), else None."""
    cls = type(module)
    if not cls.__module__.startswith("transformers."):
        return None
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return None
    if cls.__name__ in LLAMA_NORMS and isinstance(getattr(module, "variance_epsilon", None), float):
        return NormKind(False, module.variance_epsilon)
    if cls.__name__ in GEMMA_NORMS and isinstance(getattr(module, "eps", None), float):
        return NormKind(True, module.eps)
    return None


def is_silu(act: nn.Module) -> bool:
    """torch's SiLU, or transformers' SiLUActivation (`F.silu(x)`, what ACT2FN["silu"] gives)."""
    cls = type(act)
    return cls is nn.SiLU or (cls.__name__ == "SiLUActivation" and cls.__module__ == "transformers.activations")


def _tensors(m: nn.Module) -> tuple:
    if isinstance(m, FP4Linear):
        return (m.weight_packed, m.weight_scale, m.weight_global_scale, m.bias)
    return (m.weight, m.bias)


def _versions(mods) -> tuple:
    return tuple((id(t), t._version) if t is not None else None for m in mods for t in _tensors(m))


@dataclass
class FusedLinear:
    """y = x @ cat(W_i).T (+ cat(b_i)); `split(y)` gives each source's output (views)."""
    sources: tuple[nn.Module, ...]
    sizes: tuple[int, ...]
    versions: tuple
    weight: torch.Tensor | None = None  # nn.Linear sources: [sum N_i, K]
    qt: QuantizedTensor | None = None  # FP4Linear sources (or an INT8 / NVFP4 head copy)
    bias: torch.Tensor | None = None
    prepared: PreparedFP4Weight | None = field(default=None, repr=False)

    def __call__(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        # x: [..., K] -> [..., sum N_i] in x's dtype; `out_dtype=torch.float32`: those values as float32 (one
        # write for the INT8 head's logits, a cast elsewhere)
        if self.weight is not None:
            y = F.linear(x, self.weight, self.bias)
            return y if out_dtype is None else y.to(out_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if isinstance(self.qt.config, Int8Config):  # an INT8 head copy: the kernel, or its twin off CUDA
            return int8_linear(x, self.qt, bias, name="lm_head", out_dtype=out_dtype)
        if out_dtype is not None:
            return self(x).to(out_dtype)
        if x.is_cuda:  # FP4Linear.forward's two paths
            if self.prepared is None and x.dtype in (torch.bfloat16, torch.float16):
                self.prepared = prepare_fp4_weight(self.qt)
            return fp4_linear(x, self.qt, bias, prepared=self.prepared)
        return F.linear(x, self.qt.dequantize(x.dtype), bias)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for a [gate | up] pair of sources: for FP4 on CUDA `kernels.fp4_glu.gate_up_silu`
        (at decode one GEMV with the product in its epilogue), else this GEMM then `decode_ops.silu_mul`."""
        if self.qt is None or not x.is_cuda:
            return silu_mul(self(x))
        if self.prepared is None and x.dtype in (torch.bfloat16, torch.float16):
            self.prepared = prepare_fp4_weight(self.qt)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return gate_up_silu(x, self.qt, bias, prepared=self.prepared)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(self.sizes, dim=-1)

    def is_current(self, modules) -> bool:
        return all(a is b for a, b in zip(modules, self.sources)) and _versions(modules) == self.versions


def _same(values) -> bool:
    return all(v == values[0] for v in values[1:])


def fuse_linears(modules) -> FusedLinear | None:
    """A FusedLinear over `modules` when one GEMM computes exactly what they compute (module docstring), else None."""
    mods = tuple(modules)
    if not mods or not _same([type(m) for m in mods]) or type(mods[0]) not in (nn.Linear, FP4Linear):
        return None  # exact types only: wrappers (LoRA, ...) and subclasses are called as they are
    if not _same([m.in_features for m in mods]):
        return None
    if not _same([m.bias is None for m in mods]):
        return None
    sizes = tuple(m.out_features for m in mods)
    with torch.no_grad():
        bias = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods])
        if type(mods[0]) is nn.Linear:
            w = [m.weight.detach() for m in mods]
            if not (_same([t.dtype for t in w]) and _same([t.device for t in w])):
                return None
            return FusedLinear(mods, sizes, _versions(mods), weight=torch.cat(w), bias=bias)
        if any(m.rotation is not None or m.input_config is not None for m in mods):
            return None
        if not (_same([m.config for m in mods]) and _same([m.dtype for m in mods])):
            return None
        gs = None
        if isinstance(mods[0].config, NVFP4Config):
            gs = mods[0].weight_global_scale
            if not all(torch.equal(m.weight_global_scale, gs) for m in mods[1:]):
                return None
            gs = gs.clone()
        qt = QuantizedTensor(torch.cat([m.weight_packed for m in mods]), torch.cat([m.weight_scale for m in mods]),
                             gs, (sum(sizes), mods[0].in_features), mods[0].config)
        return FusedLinear(mods, sizes, _versions(mods), qt=qt, bias=bias)


class HeadFormat(enum.Enum):
    """What the engine runs as the output head: the model's own `lm_head` (MODEL, the default), or a
    quantized copy of its weight: INT8 per row (`kernels.int8_linear`) or NVFP4 (the FP4 GEMV / GEMM)."""
    MODEL = "model"
    INT8 = "int8"
    NVFP4 = "nvfp4"


def quantize_head(head: nn.Module, fmt: HeadFormat | str = HeadFormat.NVFP4,
                  config: NVFP4Config | None = None) -> FusedLinear | None:
    """A quantized copy (`fmt`: INT8 or NVFP4; RTN, NVFP4's global scale from the weight's amax) of a plain
    nn.Linear head as a one-source FusedLinear, or None when the head already is an FP4Linear."""
    fmt = HeadFormat(fmt)
    if fmt is HeadFormat.MODEL:
        raise ValueError("quantize_head: HeadFormat.MODEL runs the model's own head; there is nothing to quantize")
    if type(head) is not nn.Linear:
        if isinstance(head, FP4Linear):
            return None
        raise TypeError(f"quantize_head: lm_head is a {type(head).__name__}; a quantized copy needs a plain "
                        "nn.Linear")
    with torch.no_grad():
        w = head.weight.detach()
        cfg = Int8Config() if fmt is HeadFormat.INT8 else config or NVFP4Config()
        qt = quantize(w, cfg, name="lm_head.weight")
        bias = None if head.bias is None else head.bias.detach().clone()
    return FusedLinear((head,), (head.out_features,), _versions((head,)), qt=qt, bias=bias)
