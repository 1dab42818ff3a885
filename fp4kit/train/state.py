"""Training state that survives a kill: checkpoints with exact resume, JSONL logs and loss plots.

A run killed at any moment must continue as if it had never stopped: the next step after a resume
computes the same loss, bit for bit on CPU. That needs more than the weights. A checkpoint holds

    step_00000120/
      meta.json            {"step": 120, "trainable_only": true, "params": [...names...]}
      model.safetensors    the (trainable) parameters, by name; tied parameters stored once
      optimizer.pt         optimizer.state_dict()            (torch.load(weights_only=True) reads it)
      scheduler.pt         scheduler.state_dict(), when a scheduler is given
      rng.safetensors      torch CPU RNG state, CUDA RNG state of every device, numpy's MT19937 keys
      rng.json             python `random` state, numpy's position and gaussian cache
      extra.json           whatever the loop needs to resume (data cursor, config), JSON only

Nothing is pickled: tensors go through safetensors, state dicts through `torch.load(weights_only=True)`
(which accepts only tensors, numbers, strings and containers of them), the rest through JSON.

Writes are atomic: the folder is written under a temporary name and renamed when complete, so a
kill mid-save leaves the previous checkpoint intact and `latest_checkpoint` never returns a partial
one. `save_state(..., keep=3)` then deletes all but the newest three.

`trainable_only=True` (the default) saves only parameters with `requires_grad`: for QAT and
LoRA-style runs the frozen rest is rebuilt from the base model, and the checkpoint stays small.

`JsonlLogger` appends one JSON object per step and flushes it at once (a killed run keeps its
log); `plot_metrics` draws chosen keys of such a log against the step into a PNG (matplotlib Agg,
no display needed).
"""

from __future__ import annotations

import json
import math
import pathlib
import random
import re
import shutil
import time

import torch
from torch import nn

from fp4kit.io.files import atomic_directory, load_tensors, read_json

STEP_DIR = re.compile(r"^step_(\d{8})$")


class JsonlLogger:
    """Append `{"step": .., "time": .., **metrics}` lines to `path`; each line is flushed when written."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, **metrics) -> dict:
        record = {"step": int(step), "time": time.time()} | {k: _plain(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        return record


def _plain(v):
    """Tensors and numpy scalars -> python numbers (JSON cannot hold them); NaN/Inf -> strings JSON accepts."""
    if isinstance(v, torch.Tensor):
        v = v.detach().item() if v.numel() == 1 else v.detach().tolist()
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    """The records of a JSONL log; a last line cut by a kill is skipped."""
    records = []
    for line in pathlib.Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# ---------------------------------------------------------------------------------------------- checkpoints

def step_dir(root: str | pathlib.Path, step: int) -> pathlib.Path:
    return pathlib.Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | pathlib.Path) -> list[pathlib.Path]:
    """Complete checkpoints under `root`, oldest first (temporary folders of an interrupted save are ignored)."""
    root = pathlib.Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | pathlib.Path) -> pathlib.Path | None:
    """The newest complete checkpoint folder under `root`, or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def _saved_params(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    # named_parameters() yields a tied parameter once, under its first name
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()
            if p.requires_grad or not trainable_only}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    meta = {"python": _json_ready(random.getstate())}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
        meta["numpy"] = {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:
        pass
    return tensors, meta


def _json_ready(x):
    return [_json_ready(v) for v in x] if isinstance(x, (tuple, list)) else x


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list) else x


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k[11:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    random.setstate(_as_tuple(meta["python"]))
    if "numpy" in meta:
        import numpy as np

        n = meta["numpy"]
        np.random.set_state((n["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))


def save_state(root: str | pathlib.Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler=None, extra: dict | None = None, trainable_only: bool = True, keep: int = 3) -> pathlib.Path:
    """Write checkpoint `root/step_{step:08d}` atomically; keep the newest `keep` checkpoints (0 keeps all)."""
    from safetensors.torch import save_file

    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    params = _saved_params(model, trainable_only)
    if not params:
        raise ValueError("save_state: the model has no trainable parameters to save (pass trainable_only=False?)")
    rng_tensors, rng_meta = _rng_state()
    out = step_dir(root, step)
    with atomic_directory(out, overwrite=True) as tmp:
        save_file(params, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "rng.json").write_text(json.dumps(rng_meta))
        (tmp / "extra.json").write_text(json.dumps(extra or {}))
        # meta.json last: its presence marks the folder complete
        (tmp / "meta.json").write_text(json.dumps({"step": step, "trainable_only": trainable_only,
                                                   "params": sorted(params)}))
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return out


def _load_pt(path: pathlib.Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: refused to load (weights_only=True): {e}") from None


def load_state(path: str | pathlib.Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
               scheduler=None) -> tuple[int, dict]:
    """Restore a checkpoint folder (or the newest one under a root folder); return (step, extra).

    Parameters, optimizer and scheduler state and every RNG are restored, so the next step is the one
    the killed run would have taken. A saved parameter the model lacks, or a trainable parameter of the
    model the checkpoint lacks, is an error naming it.
    """
    path = pathlib.Path(path)
    if not (path / "meta.json").exists():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoint (no meta.json, no complete step_* folder)")
        path = found
    meta = read_json(path / "meta.json")
    saved = load_tensors(path / "model.safetensors")
    own = dict(model.named_parameters())
    unknown = sorted(set(saved) - set(own))
    if unknown:
        raise ValueError(f"{path}: checkpoint holds parameters the model lacks: {unknown[:5]}")
    missing = sorted(n for n, p in own.items() if p.requires_grad and n not in saved)
    if missing:
        raise ValueError(f"{path}: the model's trainable parameters {missing[:5]} are not in the checkpoint")
    with torch.no_grad():
        for name, t in saved.items():
            if own[name].shape != t.shape:
                raise ValueError(f"{path}: parameter {name} has shape {tuple(t.shape)}, model has {tuple(own[name].shape)}")
            own[name].copy_(t)
    if optimizer is not None:
        optimizer.load_state_dict(_load_pt(path / "optimizer.pt"))
    if scheduler is not None:
        if not (path / "scheduler.pt").exists():
            raise FileNotFoundError(f"{path}: a scheduler was given but the checkpoint has no scheduler.pt")
        scheduler.load_state_dict(_load_pt(path / "scheduler.pt"))
    _set_rng_state(load_tensors(path / "rng.safetensors"), read_json(path / "rng.json"))
    return int(meta["step"]), read_json(path / "extra.json")


# ---------------------------------------------------------------------------------------------- plots

def plot_metrics(jsonl_path: str | pathlib.Path, keys: list[str] | tuple[str, ...], png_path: str | pathlib.Path,
                 *, title: str | None = None) -> pathlib.Path:
    """Plot `keys` of a JSONL log against `step`, one panel per key, into `png_path` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(jsonl_path)
    if not keys:
        raise ValueError("plot_metrics needs at least one key")
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.4 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not pts:
            raise ValueError(f"{jsonl_path}: no numeric values for key {key!r}")
        ax.plot(*zip(*pts), lw=1.2)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    png_path = pathlib.Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path
