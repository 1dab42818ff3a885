"""LoRA adapters on any linear layer, FP4 ones included, kept unmerged; PEFT-style export.

A LoRA layer adds a trainable low-rank update to a frozen base layer:

    y = base(x) + (alpha / r) * dropout(x) @ A^T @ B^T        A: [r, in]   B: [out, r]

A starts random (Kaiming-uniform with a = sqrt(5), as `nn.Linear` and PEFT initialise it) and B
starts at zero, so a fresh adapter leaves the model's function unchanged.

Why unmerged ("merge-free"): an FP4 base cannot absorb `B @ A` without re-quantizing, which would
move every weight to a new point of the FP4 grid and throw away the update's precision. So the base
stays packed (`FP4Linear`, served by the W4A16 kernel on CUDA) and the adapter runs beside it as two
skinny bf16 matmuls. Rollouts and training then see the very same function.

Precision: the adapter computes in the input's dtype (bf16 in a bf16 model); its parameters are
stored in `dtype`, float32 by default. Adam steps of ~1e-5 on A (entries ~1/sqrt(in) ~ 0.05, whose
bf16 spacing is ~2e-4) would round away in bf16 storage; pass `dtype=torch.bfloat16` for pure bf16.

`add_lora(model, targets, rank, alpha, dropout)` swaps each matching `nn.Linear` or `FP4Linear` for a
`LoRALinear` wrapping it (matching as `quantize_` does: glob on the full name, or its last part(s)),
freezes every other parameter, and optionally leaves the norm weights trainable. `save_adapter`
writes the folder PEFT's `PeftModel.from_pretrained` loads:

    adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules",
                                  "modules_to_save" (trainable norms), "bias": "none", ...}
    adapter_model.safetensors    base_model.model.<layer>.lora_A.weight  [r, in]
                                 base_model.model.<layer>.lora_B.weight  [out, r]
                                 base_model.model.<norm>.weight           (trainable norms only)
"""

from __future__ import annotations

import json
import math
import pathlib
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn

from .linear import FP4Linear
from .quantize import matches

NORM_SUFFIXES = ("norm",)  # RMSNorm/LayerNorm modules are named *norm / *layernorm in HF models


class _FrozenFP4Base(torch.autograd.Function):
    """y = fp4_layer(x) with the fast kernel; dL/dx = dL/dy @ W (W dequantized in the gradient's dtype).

    The Triton W4A16 GEMM has no backward, so without this an FP4 base layer on CUDA would cut the
    gradient path through the input (QLoRA's trick: the frozen 4-bit weight is dequantized only in the
    backward pass). W4A4 input quantization is treated as straight-through.
    """

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.layer.dequantize_weight(grad_out.dtype)  # [out, in]
        return grad_out @ w, None


class LoRALinear(nn.Module):
    """A frozen base layer (`nn.Linear` or `FP4Linear`) plus a trainable low-rank update, never merged."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        device = next(iter(base.buffers()), None)
        device = device.device if device is not None else next(base.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        if isinstance(self.base, FP4Linear) and torch.is_grad_enabled() and x.requires_grad:
            y = _FrozenFP4Base.apply(x, self.base)
        else:
            y = self.base(x)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        update = (self.dropout(x) @ a.t()) @ b.t()  # [..., r] -> [..., out]
        return y + update * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"


@dataclass(frozen=True)
class LoRAConfig:
    """What `add_lora` does: which layers get adapters, their rank and scale, and what else trains."""

    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    train_norms: bool = False
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if not self.targets:
            raise ValueError("LoRAConfig.targets is empty: name at least one layer (e.g. 'q_proj')")
        if self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"LoRAConfig.dtype must be a float dtype, got {self.dtype}")


@dataclass
class LoRAReport:
    wrapped: list[str] = field(default_factory=list)
    trainable_norms: list[str] = field(default_factory=list)

    def trainable_parameters(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_norm(name: str, module: nn.Module) -> bool:
    last = name.rpartition(".")[2].lower()
    return last.endswith(NORM_SUFFIXES) and isinstance(getattr(module, "weight", None), nn.Parameter)


def add_lora(model: nn.Module, targets=None, rank: int | None = None, alpha: float | None = None,
             dropout: float | None = None, *, config: LoRAConfig | None = None) -> LoRAReport:
    """Wrap matching linear layers of `model` in `LoRALinear`, in place; freeze all else (norms optionally).

    Either pass `config`, or `targets`/`rank`/`alpha`/`dropout` (the rest from `LoRAConfig`'s defaults).
    A target that matches no layer is an error: a typo must not silently train nothing.
    """
    if config is None:
        kw = {k: v for k, v in dict(targets=tuple(targets) if targets else None, rank=rank, alpha=alpha,
                                    dropout=dropout).items() if v is not None}
        config = LoRAConfig(**kw)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("add_lora: the model already has LoRA adapters")
    chosen = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, FP4Linear)) and any(matches(n, t) for t in config.targets)]
    for t in config.targets:
        if not any(matches(n, t) for n, _ in chosen):
            raise ValueError(f"add_lora: target {t!r} matches no nn.Linear/FP4Linear layer of the model")
    for p in model.parameters():
        p.requires_grad_(False)
    report = LoRAReport()
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, config.rank, config.alpha, config.dropout, config.dtype))
        report.wrapped.append(name)
    if config.train_norms:
        for name, module in model.named_modules():
            if is_norm(name, module):
                module.weight.requires_grad_(True)
                report.trainable_norms.append(name)
    model._fp4kit_lora = (config, report)  # read by save_adapter
    return report


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names (`base_model.model.` + module path)."""
    config, report = _lora_info(model)
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        out[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    for name in report.trainable_norms:
        out[f"base_model.model.{name}.weight"] = model.get_submodule(name).weight.detach().contiguous().cpu()
    return out


def _lora_info(model: nn.Module) -> tuple[LoRAConfig, LoRAReport]:
    info = getattr(model, "_fp4kit_lora", None)
    if info is None:
        raise ValueError("the model has no LoRA adapters (call add_lora first)")
    return info


def adapter_config(model: nn.Module, base_model_name: str | None = None) -> dict:
    """PEFT's `adapter_config.json` contents for this model's adapters."""
    config, report = _lora_info(model)
    norms = sorted({n.rpartition(".")[2] for n in report.trainable_norms}) or None
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
            "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": sorted({n.rpartition(".")[2] for n in report.wrapped}),
            "modules_to_save": norms, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False}


def save_adapter(model: nn.Module, out: str | pathlib.Path, *, base_model_name: str | None = None,
                 overwrite: bool = True) -> pathlib.Path:
    """Write `out/adapter_config.json` and `out/adapter_model.safetensors` (PEFT's layout), atomically."""
    from safetensors.torch import save_file

    out = pathlib.Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    save_file(adapter_state_dict(model), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_config(model, base_model_name), indent=2))
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        out.rename(old)
        tmp.rename(out)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(out)
    return out


def load_adapter(model: nn.Module, folder: str | pathlib.Path) -> None:
    """Load an adapter folder written by `save_adapter` (or PEFT) into a model prepared with `add_lora`."""
    from safetensors.torch import load_file

    folder = pathlib.Path(folder)
    path = folder / "adapter_model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: not an adapter folder")
    saved = load_file(str(path))
    own = adapter_state_dict(model)
    missing, unknown = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unknown:
        raise ValueError(f"{folder}: adapter tensors do not match the model (missing {missing[:3]}, "
                         f"unknown {unknown[:3]})")
    with torch.no_grad():
        for key, t in saved.items():
            name = key.removeprefix("base_model.model.")
            if name.endswith((".lora_A.weight", ".lora_B.weight")):
                layer_name, _, which = name.rpartition(".lora_")
                param = getattr(model.get_submodule(layer_name), "lora_" + which.split(".")[0])
            else:
                param = model.get_submodule(name.removesuffix(".weight")).weight
            if param.shape != t.shape:
                raise ValueError(f"{folder}: {key} has shape {tuple(t.shape)}, model has {tuple(param.shape)}")
            param.copy_(t)
