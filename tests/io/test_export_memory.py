"""Export streams: its memory stays near one shard plus one layer, not the size of the model."""

import threading
import time

from torch import nn
from transformers import PretrainedConfig

from fp4kit.formats import NVFP4Config
from fp4kit.io import save_checkpoint
from fp4kit.nn import FP4Linear

MB = 1024**2


class Stack(nn.Module):
    """40 float32 layers of 2048 x 1024 (8 MB each, exported as 4 MB bf16 copies) and one NVFP4 layer.

    The bf16 copies are what export allocates: a writer that kept them all would grow by 160 MB.
    """

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig()
        self.dense = nn.ModuleList(nn.Linear(1024, 2048, bias=False) for _ in range(40))
        self.fp4 = FP4Linear(1024, 2048, NVFP4Config(), bias=False)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_export_peak_memory_is_one_shard_not_the_model(tmp_path):
    model = Stack()
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    shard = 16 * MB
    peak, done = [rss()], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(rss())
            time.sleep(0.002)

    base = rss()
    t = threading.Thread(target=sample)
    t.start()
    try:
        res = save_checkpoint(model, tmp_path / "ck", max_shard_bytes=shard, progress=False)
    finally:
        done.set()
        t.join()
    growth = max(peak) - base
    layer = 2048 * 1024 * 4
    assert len(res.shards) >= res.total_bytes // shard
    # a shard is held once as tensors and once as serialized bytes; allow 24 MB for the interpreter
    assert growth < 2 * shard + layer + 24 * MB, f"export grew RSS by {growth / MB:.0f} MB (model {model_bytes / MB:.0f} MB)"
