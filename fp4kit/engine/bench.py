"""Decode benchmark: time to first token, decode tokens/s, and the weight-bandwidth roofline.

At small batch a decode step reads every weight once, so its floor is

    step_floor = weight_bytes / copy_bandwidth        tokens/s roofline = batch / step_floor

with `weight_bytes` what the step reads: every parameter and buffer of the model except the input
embedding (a step reads only `batch` of its rows; when the embedding is tied to `lm_head` it is read
in full and counted), FP4 weights at their packed size plus scales. `copy_bandwidth` is measured
in the same process (a 1 GiB device-to-device copy, bytes read plus bytes written, median). The KV
cache adds `kv_bytes` per step (the slots attention reads, for all rows of the batch bucket), which
matters at large batch; `roofline_kv` includes it.

Timing: one warm-up generation (captures the graphs), then `repeats` generations of `gen_len` tokens,
each giving its time to first token (prefill plus the first sampled tokens on the host, seen by the
stream callback) and its full time; medians of each. Decode tokens/s = batch * (gen_len - 1) /
(full - TTFT). (The H100 table of 2026-11-22 in BENCHMARKS.md was taken with TTFT from separate
prefill runs instead; on an idle GPU the two agree, on a loaded CPU only this one is never negative.)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .engine import Engine, batch_bucket
from .sampling import SamplingParams


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 8, 32)
    prompt_len: int = 512
    gen_len: int = 256
    repeats: int = 3
    seed: int = 0

    def __post_init__(self):
        if not self.batches or min(self.batches) < 1 or self.prompt_len < 1 or self.gen_len < 2 or self.repeats < 1:
            raise ValueError(f"BenchConfig needs batches >= 1, prompt_len >= 1, gen_len >= 2, repeats >= 1; got {self}")


def weight_bytes(model, head_copy=None) -> int:
    """Bytes a decode step reads from the weights (see the module docstring). `head_copy`: the
    QuantizedTensor the engine runs instead of lm_head's weight (Engine(lm_head="int8" / "nvfp4")): its packed
    bytes and scales count, lm_head's own weight does not (nor a tied embedding, read only per row)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_w = getattr(head, "weight", None)
    tied = head is not None and head_w is embed
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or (t is embed and not tied) or (head_copy is not None and t is head_w):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    if head_copy is not None:
        total += head_copy.nbytes
    return total


def engine_weight_bytes(engine: Engine) -> int:
    """`weight_bytes` of what this engine's decode step reads (its quantized head copy, when it runs one)."""
    copy = engine.runner.head_copy()
    return weight_bytes(engine.model, None if copy is None else copy.qt)


def copy_bandwidth(device, nbytes: int | None = None, repeats: int = 20, warmup: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + written), median of `repeats` after `warmup` copies;
    1 GiB on a GPU, timed by CUDA events (host timing added ~5% and a cold first copy once read 2.53 TB/s on an
    H100 that copies at ~2.95), 64 MiB on the CPU (a sign of life there, not a roofline)."""
    on_gpu = torch.device(device).type == "cuda"
    nbytes = nbytes or (1 << 30 if on_gpu else 1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(_timed(lambda: dst.copy_(src), device))
    return 2 * nbytes / statistics.median(times)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def kv_bytes_per_step(engine: Engine, batch: int, kv_len: int) -> int:
    rows = batch_bucket(batch) if engine.use_graphs else batch
    per_slot = sum(b[0, :, 0].numel() * b.element_size() for c in engine.caches for b in c.buffers())
    return rows * kv_len * per_slot


def bench_batch(engine: Engine, batch: int, cfg: BenchConfig, bandwidth: float) -> dict:
    vocab = engine.model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed + batch)
    ids = torch.randint(0, vocab, (batch, cfg.prompt_len), generator=gen, device="cpu").tolist()
    params = SamplingParams(max_new_tokens=cfg.gen_len, temperature=0, ignore_eos=True)
    dev = engine.device

    def run() -> tuple[float, float]:
        """(TTFT, full time) of one generation: the first stream callback comes right after the first
        sampled tokens reach the host, so both times come from the same run."""
        first: list[float] = []
        _sync(dev)
        t0 = time.perf_counter()
        engine.generate(ids, params, stream=lambda *_: first or first.append(time.perf_counter()))
        _sync(dev)
        return first[0] - t0, time.perf_counter() - t0

    engine.generate(ids, params)  # warm-up: compiles kernels, captures graphs
    runs = [run() for _ in range(cfg.repeats)]
    ttft = statistics.median(r[0] for r in runs)
    full = statistics.median(r[1] for r in runs)
    step = (full - ttft) / (cfg.gen_len - 1)
    wbytes = engine_weight_bytes(engine)
    kv = kv_bytes_per_step(engine, batch, engine.kv_len(cfg.prompt_len + cfg.gen_len - 2))
    return {"batch": batch, "prompt_len": cfg.prompt_len, "gen_len": cfg.gen_len, "ttft_ms": ttft * 1e3,
            "step_ms": step * 1e3, "decode_tok_s": batch / step, "e2e_tok_s": batch * cfg.gen_len / full,
            "weight_bytes": wbytes, "kv_bytes_per_step": kv, "roofline_tok_s": batch * bandwidth / wbytes,
            "roofline_frac": (wbytes / bandwidth) / step, "roofline_kv_frac": ((wbytes + kv) / bandwidth) / step}


def bench_engine(engine: Engine, cfg: BenchConfig, bandwidth: float) -> list[dict]:
    return [bench_batch(engine, b, cfg, bandwidth) for b in cfg.batches]
