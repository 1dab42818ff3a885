"""Safe file handling: atomic output directories and tensor files that never run pickled code."""

from __future__ import annotations

import contextlib
import json
import pathlib
import shutil
import tempfile

import torch


@contextlib.contextmanager
def atomic_directory(out: str | pathlib.Path, *, overwrite: bool = False):
    """Yield a temporary directory beside `out`; on success rename it to `out`, on error delete it.

    A crash mid-write leaves no partial `out` behind. An existing `out` is an error unless
    `overwrite`, and then it is replaced only once the new directory is complete.
    """
    out = pathlib.Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file, or a .bin/.pt file through torch.load(weights_only=True)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: refused to load (weights_only=True allows tensors only): {e}") from None
    if not (isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise ValueError(f"{path}: expected a dict of tensors")
    return obj


def weight_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The weight files of a Hugging Face folder: the index's shards, one safetensors file, or .bin."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(read_json(index)["weight_map"].values()))
        return [folder / n for n in names]
    single = sorted(folder.glob("*.safetensors"))
    if single:
        return single
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise FileNotFoundError(f"{folder}: no model.safetensors, safetensors index or pytorch_model.bin")
