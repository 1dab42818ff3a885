"""Checkpoints and model loading, offline: embedded models, local folders and GGUF files, and the
compressed-tensors layout that vLLM serves."""

from .checkpoint import (CheckpointInfo, SaveResult, checkpoint_summary, detect_format, export_bytes, load_checkpoint,
                         quantization_config, save_checkpoint)
from .models import DEFAULT_MODEL, EMBEDDED, ModelNotFound, load_model, resolve

__all__ = ["CheckpointInfo", "DEFAULT_MODEL", "EMBEDDED", "ModelNotFound", "SaveResult", "checkpoint_summary",
           "detect_format", "export_bytes", "load_checkpoint", "load_model", "quantization_config", "resolve", "save_checkpoint"]
