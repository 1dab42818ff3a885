"""Training over FP4 models: checkpoints that resume exactly, logs and plots (`state`), and
quantization-aware training with distillation (`qat`)."""

from .qat import Loss, TrainConfig, Trainable, TrainResult, split_tokens, train_qat
from .state import JsonlLogger, latest_checkpoint, list_checkpoints, load_state, plot_metrics, read_jsonl, save_state

__all__ = ["JsonlLogger", "Loss", "TrainConfig", "TrainResult", "Trainable", "latest_checkpoint", "list_checkpoints",
           "load_state", "plot_metrics", "read_jsonl", "save_state", "split_tokens", "train_qat"]
