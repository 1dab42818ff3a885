"""Sequential GPTQ: one decoder layer at a time, on the outputs of the layers already quantized;
bounded memory, and a run that is killed resumes from its last finished layer.

    result = sequential_gptq(model, batches, NVFP4Config(), GPTQConfig(), state_dir="out/calib-state")

1. Capture. Each calibration batch runs through the model once while forward pre-hooks record the
   hidden states the first decoder layer receives and the keyword arguments transformers passes to
   each layer (position embeddings, attention mask, positions: per layer, since Gemma-3's sliding-window
   and full-attention layers get different ones). The forward runs to its
   end (no exception as control flow); the cost is one model pass per batch.
2. For each decoder layer i: pre-hooks on its eligible linear layers add x^T x to their Hessians while
   the recorded inputs run through layer i alone; GPTQ quantizes the layer (`apply_gptq` restricted to
   it); then the same inputs run through the quantized layer to give layer i+1 its inputs. So each
   layer's Hessian sees the error of the layers before it, as GPTQ's own sequential mode does, and
   memory is the model, one layer's Hessians and the calibration hidden states [B, T, H].
3. Resume. After layer i, `state_dir` receives the layer's state dict and layer i+1's inputs
   (safetensors), then `progress.json` (the last finished layer and a fingerprint of the settings) is
   replaced atomically. A rerun with the same folder and settings rebuilds the finished layers from
   their saved state and continues at i+1; different settings are an error, not a silent mix.

Linear layers outside the decoder stack (none by default: lm_head is ignored) are quantized from
their weights (RTN) at the end; fused MoE experts inside a layer get RTN as in `apply_gptq`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from fp4kit.formats import MXFP4Config, NVFP4Config
from fp4kit.nn import DEFAULT_IGNORE, QuantizeReport, quantize_
from fp4kit.nn.rotation import RotatedLinear

from .calibrate import GPTQResult, Hessian, apply_gptq, eligible_linears, input_hook, input_rounding
from .gptq import GPTQConfig


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, modules) of the model's decoder stack: the longest ModuleList whose name ends in 'layers'."""
    stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.endswith("layers")]
    if not stacks:
        raise ValueError(f"{type(model).__name__}: no decoder layer stack (a ModuleList named '*layers') found")
    return max(stacks, key=lambda s: len(s[1]))


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list) -> tuple[list, list[list[dict]]]:
    """(hidden states entering layer 0, one [B, T, H] per batch; the keyword arguments of every layer, one dict per
    batch). Every layer's own kwargs are recorded, not layer 0's for all: Gemma-3 passes its sliding-window layers
    other rotary tables and masks than its full-attention layers (the kwargs are references to the model's own
    tensors, so this costs no memory beyond what layer 0's would)."""
    hidden, kwargs = [], [[] for _ in layers]

    def hook_for(i):
        def hook(_module, args, kw):
            if i == 0:
                hidden.append((args[0] if args else kw["hidden_states"]).detach())
            kwargs[i].append({k: v for k, v in kw.items()
                              if k not in ("hidden_states", "past_key_values", "past_key_value")})
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch, use_cache=False) if isinstance(batch, dict) else model(batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hidden, kwargs


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _fingerprint(config, gptq_config, ignore, batches) -> str:
    shapes = [tuple(b.shape) if isinstance(b, torch.Tensor) else sorted(b) for b in batches]
    first = batches[0] if isinstance(batches[0], torch.Tensor) else None
    text = repr((config, gptq_config, tuple(ignore), shapes, None if first is None else first.flatten()[:64].tolist()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_layer(state_dir: pathlib.Path, i: int, layer: nn.Module, hidden: list[torch.Tensor], fingerprint: str):
    from safetensors.torch import save_file

    for name, tensors in ((f"layer_{i:04d}.safetensors", layer.state_dict()),
                          (f"inputs_{i + 1:04d}.safetensors", {f"h{j}": h for j, h in enumerate(hidden)})):
        tmp = state_dir / (name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, state_dir / name)
    _write_atomic(state_dir / "progress.json", json.dumps({"done": i, "fingerprint": fingerprint}) + "\n")
    stale = state_dir / f"inputs_{i:04d}.safetensors"
    if stale.exists():
        stale.unlink()


def _resume_point(state_dir: pathlib.Path | None, fingerprint: str) -> int:
    """Index of the last finished layer in `state_dir` (-1 for a fresh run)."""
    if state_dir is None or not (state_dir / "progress.json").exists():
        return -1
    progress = json.loads((state_dir / "progress.json").read_text())
    if progress.get("fingerprint") != fingerprint:
        raise ValueError(f"{state_dir}: holds a calibration run with other settings or data "
                         f"({progress.get('fingerprint')} != {fingerprint}); use a new folder or delete it")
    return int(progress["done"])


def sequential_gptq(model: nn.Module, batches: Iterable, config: NVFP4Config | MXFP4Config,
                    gptq_config: GPTQConfig = GPTQConfig(), *, state_dir: str | pathlib.Path | None = None,
                    ignore: tuple[str, ...] = DEFAULT_IGNORE, progress: bool = True,
                    on_layer_done: Callable[[int], None] | None = None, **quantize_kwargs) -> GPTQResult:
    """Quantize `model` in place with GPTQ, decoder layer by decoder layer (see the module docstring).

    `batches`: token ids [B, S] or dicts of model kwargs. `on_layer_done(i)` is called after layer i
    is quantized and saved (progress reporting; a test uses it to stop a run). Extra keyword arguments
    go to `quantize_` (activations=, input_amax= for W4A4/W4A8)."""
    from safetensors.torch import load_file

    batches = list(batches)
    if not batches:
        raise ValueError("sequential_gptq needs at least one calibration batch")
    stack_name, layers = decoder_layers(model)
    rotations = sorted({repr(m.rotation.config) for m in model.modules() if isinstance(m, RotatedLinear)})
    fingerprint = _fingerprint(config, gptq_config, (*ignore, repr(quantize_kwargs.get("activations")), *rotations),
                               batches)
    state_dir = pathlib.Path(state_dir) if state_dir is not None else None
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
    done = _resume_point(state_dir, fingerprint)
    hidden, kwargs = capture_layer_inputs(model, layers, batches)
    result = GPTQResult(QuantizeReport())

    def in_layer(i):
        return lambda _m, name: name.startswith(f"{stack_name}.{i}.")

    for i in range(done + 1):  # rebuild finished layers: same modules, then their saved state
        report = quantize_(model, config, in_layer(i), ignore=ignore, progress=False, **quantize_kwargs)
        layers[i].load_state_dict(load_file(str(state_dir / f"layer_{i:04d}.safetensors")))
        result.report.quantized += report.quantized
    if done >= 0:
        saved = load_file(str(state_dir / f"inputs_{done + 1:04d}.safetensors"))
        hidden = [saved[f"h{j}"].to(h.device, h.dtype) for j, h in enumerate(hidden)]

    for i in tqdm(range(done + 1, len(layers)), desc=f"sequential gptq {config.name}", disable=not progress,
                  initial=done + 1, total=len(layers)):
        layer, select = layers[i], in_layer(i)
        targets = eligible_linears(model, config, select, ignore)
        hessians = {n: Hessian(torch.zeros(m.in_features, m.in_features, device=m.weight.device))
                    for n, m in targets.items()}
        rounding = (input_rounding(quantize_kwargs.get("activations"), quantize_kwargs.get("input_amax"), targets)
                    if gptq_config.rounded_inputs else {})
        handles = [input_hook(m, hessians[n], rounding.get(n)) for n, m in targets.items()]
        try:
            with torch.no_grad():
                for h, kw in zip(hidden, kwargs[i]):
                    _run_layer(layer, h, kw)
        finally:
            for handle in handles:
                handle.remove()
        step = apply_gptq(model, config, hessians, gptq_config, filter_fn=select, ignore=ignore, progress=False,
                          **quantize_kwargs)
        result.report.quantized += step.report.quantized
        result.weight_only |= step.weight_only
        result.output_error |= step.output_error
        with torch.no_grad():
            hidden = [_run_layer(layer, h, kw) for h, kw in zip(hidden, kwargs[i])]
        if state_dir is not None:
            _save_layer(state_dir, i, layer, hidden, fingerprint)
        if on_layer_done is not None:
            on_layer_done(i)

    rest = quantize_(model, config, ignore=ignore, progress=False, **quantize_kwargs)  # outside the stack: RTN
    result.report.quantized += rest.quantized
    result.report.excluded = rest.excluded
    return result
