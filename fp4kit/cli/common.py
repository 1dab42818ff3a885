"""Shared pieces of the subcommands: scheme names, format configs, loading tensors and models."""

from __future__ import annotations

import torch

from fp4kit.formats import MXFP4Config, NVFP4Config, ScaleRule

SCHEMES = ("nvfp4", "mxfp4")
SCALE_RULES = [r.value for r in ScaleRule]


def format_config(scheme: str, scale_rule: str | None = None):
    if scheme == "nvfp4":
        return NVFP4Config()
    if scheme == "mxfp4":
        return MXFP4Config(ScaleRule(scale_rule)) if scale_rule else MXFP4Config()
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")


def resolve_device(spec: str | None) -> torch.device:
    """--device: None -> cuda when present, else cpu; a CUDA device asked for where there is none is an error."""
    device = torch.device(spec or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
    return device


def load_tensor_file(path: str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a .pt/.bin file loaded with weights_only=True (no pickle code)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")


def load_any(spec: str, dtype):
    """An exported/quantized checkpoint folder through load_checkpoint, anything else through load_model."""
    import pathlib

    from fp4kit.io import detect_format, load_checkpoint, load_model

    path = pathlib.Path(spec)
    if path.is_dir() and (path / "config.json").exists() and detect_format(path)[0] != "dense":
        model, tok, info = load_checkpoint(path, dtype=dtype)
        return model, tok, {"model": path.name, "format": info.format, "method": "checkpoint"}
    model, tok, src = load_model(spec, dtype=dtype)
    return model, tok, {"model": src.label, "format": "bf16" if dtype == torch.bfloat16 else "fp32", "method": "none"}
