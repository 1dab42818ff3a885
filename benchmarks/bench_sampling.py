"""Fused sampling kernel vs the torch sampler, and GRPO-shaped rollouts before/after (issues 8, 9).

    python benchmarks/bench_sampling.py kernel  --out results/sampling_kernel_h100.json
    python benchmarks/bench_sampling.py rollout --out results/sampling_rollout_h100.json
    python benchmarks/bench_sampling.py kernel --device cpu --smoke      # a sign of life on the CPU

`kernel`. logits float32 [B, V] (what the engine's head returns), B in {1, 32, 256}, V in {49,152
(SmolLM2), 128,256 (Llama-3)}, four samplers: greedy, temperature 0.8, top-k 50, top-p 0.9 (all at
temperature 0.8 but greedy). Implementations:
    previous   the engine's sampler before the kernel (commit 96cd479, copied below): filter_logits
               (topk / sort + softmax + cumsum + scatter), Gumbel noise from ~50 int64 torch ops and
               torch.log, argmax
    twin       the kernel's torch twin (`keep_threshold` + `gumbel_argmax_torch`)
    kernel     `keep_threshold` + the fused Triton kernel (what `fp4kit.engine.sample` runs on CUDA)
Greedy: `previous` and `twin` are torch.argmax, `kernel` the kernel without noise. Each variant is
captured R times in one CUDA graph, replayed after a warm-up; the time is the median replay / R. The
same logits buffer is reused (B=1 rows stay in L2, as the head's fresh output would). Roofline:
B * V * 4 bytes read / measured copy bandwidth. The kernel's tokens are checked against the twin's.

`rollout`. GRPO's rollout workload on SmolLM2-135M's shapes with random weights (the real checkpoint
was not staged: speed depends on shapes, not on what the weights mean), NVFP4 (RTN) layers as in the
GRPO runs: 256 prompts x 64 prompt tokens, 64 sampled tokens, temperature 1.0, EOS ignored, the engine
with CUDA graphs, median of 3 after a warm-up. Decode step time = (full - time to first token) / 63.
Greedy, the previous sampler and the kernel, same process. For `previous` the benchmark swaps the
engine module's `sample` name for the copied previous sampler (a benchmark harness, not library code).
"""

# ruff: noqa: B023  (the timed lambdas run inside the loop iteration that builds them)
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fp4kit.engine import SamplingParams
from fp4kit.engine.bench import copy_bandwidth
from fp4kit.kernels.sampling import (
    gumbel_argmax,
    gumbel_argmax_torch,
    gumbel_noise,
    hash32,
    inverse_temperature,
    keep_threshold,
    sort_filter,
)

SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0,
                "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
MODES = {"greedy": SamplingParams(temperature=0), "temperature": SamplingParams(temperature=0.8),
         "top_k50": SamplingParams(temperature=0.8, top_k=50), "top_p0.9": SamplingParams(temperature=0.8, top_p=0.9)}


# ------------------------------------------------------------------------------------------ the previous sampler


def _previous_noise(shape, seed, slot, rows, device):
    B, V = shape
    m = 0xFFFFFFFF
    seed = torch.as_tensor(seed, dtype=torch.long, device=device).reshape(1, 1) & m
    slot = torch.as_tensor(slot, dtype=torch.long, device=device).reshape(1, 1) & m
    key = hash32(hash32(hash32(seed) ^ slot) ^ (rows.reshape(B, 1) & m))
    v = torch.arange(V, device=device, dtype=torch.long)[None, :]
    h = hash32(hash32((key + v) & m) ^ key)
    u = ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


def previous_sample(logits, params, seed=0, slot=0, rows=None):
    """The engine's sampler at commit 96cd479 (before the kernel)."""
    if params.greedy:
        return logits.argmax(-1)
    B, V = logits.shape
    if rows is None:
        rows = torch.arange(B, device=logits.device)
    scores = sort_filter(logits / params.temperature, params.top_k, params.top_p)
    return (scores + _previous_noise((B, V), seed, slot, rows, logits.device)).argmax(-1)


def twin_sample(logits, params, seed, slot, rows):
    if params.greedy:
        return logits.argmax(-1)
    inv_t = inverse_temperature(params.temperature)
    return gumbel_argmax_torch(logits, inv_t, keep_threshold(logits, params.top_k, params.top_p, inv_t), seed, slot,
                               rows)


def kernel_sample(logits, params, seed, slot, rows):
    if params.greedy:
        return gumbel_argmax(logits, None)
    inv_t = inverse_temperature(params.temperature)
    return gumbel_argmax(logits, inv_t, keep_threshold(logits, params.top_k, params.top_p, inv_t), seed, slot, rows)


IMPLS = {"previous": previous_sample, "twin": twin_sample, "kernel": kernel_sample}


# ------------------------------------------------------------------------------------------ timing


def time_graph(fn, repeats_in_graph: int, replays: int, warmup: int = 3) -> float:
    """Seconds per call: `fn` captured `repeats_in_graph` times in one CUDA graph, median of `replays`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats_in_graph):
            fn()
    times = []
    for i in range(warmup + replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / repeats_in_graph


def time_eager(fn, replays: int) -> float:
    fn()
    times = []
    for _ in range(replays):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_kernel(args) -> dict:
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    bandwidth = copy_bandwidth(dev)
    shapes = [(B, V) for V in (49152, 128256) for B in (1, 32, 256)] if not args.smoke else [(2, 1000)]
    rows_out, mismatches = [], {}
    for B, V in shapes:
        gen = torch.Generator(dev).manual_seed(B * 7 + V)
        logits = torch.randn(B, V, device=dev, generator=gen) * 3
        rows = torch.arange(B, device=dev)
        seed = torch.tensor([5], device=dev)
        slot = torch.tensor([77], device=dev)
        floor = B * V * 4 / bandwidth
        for mode, params in MODES.items():
            if args.only and mode not in args.only.split(","):
                continue
            rec = {"B": B, "V": V, "mode": mode, "roofline_us": floor * 1e6}
            for name, impl in IMPLS.items():
                if not cuda and name == "kernel":
                    continue
                fn = lambda: impl(logits, params, seed, slot, rows)
                reps = max(1, min(20, int(2e6 // (B * V))))
                t = time_graph(fn, reps, args.replays) if cuda else time_eager(fn, 3)
                rec[f"{name}_us"] = t * 1e6
            if cuda:
                a = kernel_sample(logits, params, seed, slot, rows)
                b = twin_sample(logits, params, seed, slot, rows)
                mismatches[f"{B}x{V}:{mode}"] = int((a != b).sum())
                rec["speedup_vs_previous"] = rec["previous_us"] / rec["kernel_us"]
                rec["roofline_frac"] = rec["roofline_us"] / rec["kernel_us"]
            rows_out.append(rec)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
    extra = token_agreement(dev) if cuda else {}
    if cuda:
        extra["threshold"] = bench_threshold(args)
    if cuda and args.sweep:
        extra["blocks"] = bench_blocks(args)
    return {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "copy_bandwidth_Bps": bandwidth,
            "rows": rows_out, "token_mismatches_kernel_vs_twin": mismatches, **extra}


def token_agreement(dev, seeds: int = 64) -> dict:
    """Kernel vs twin over many seeds and slots at B=256, V=49,152: token and score mismatches counted."""
    from fp4kit.kernels.sampling import gumbel_scores, gumbel_scores_torch

    B, V = 256, 49152
    logits = torch.randn(B, V, device=dev) * 3
    rows = torch.arange(B, device=dev)
    tok_diff = score_diff = 0
    details = []
    for s in range(seeds):
        inv_t = inverse_temperature((0.6, 0.8, 1.0, 1.3)[s % 4])
        thr = keep_threshold(logits, (0, 50)[s % 2], (1.0, 0.9)[(s // 2) % 2], inv_t)
        slot = torch.tensor([s * 31 + 1], device=dev)
        tok_diff += int((gumbel_argmax(logits, inv_t, thr, s, slot, rows)
                         != gumbel_argmax_torch(logits, inv_t, thr, s, slot, rows)).sum())
        if s < 8:
            a = gumbel_scores(logits, inv_t, thr, s, slot, rows)
            b = gumbel_scores_torch(logits, inv_t, thr, s, slot, rows)
            bad = (a.view(torch.int32) != b.view(torch.int32)).nonzero().tolist()
            score_diff += len(bad)
            for r, v in bad[:5]:
                cpu = gumbel_scores_torch(logits[r:r + 1].cpu(), inv_t, None if thr is None else thr[r:r + 1].cpu(), s,
                                          slot.cpu(), rows[r:r + 1].cpu())[0, v]
                g = gumbel_noise((1, V), s, slot, rows[r:r + 1], dev)[0, v]
                details.append({"seed": s, "row": r, "v": v, "x": logits[r, v].item(), "inv_t": inv_t,
                                "thr": None if thr is None else thr[r].item(), "kernel": a[r, v].item(),
                                "twin_cuda": b[r, v].item(), "twin_cpu": cpu.item(), "g_twin_cuda": g.item(),
                                "x_times_inv_t": (logits[r, v] * inv_t).item()})
    return {"agreement": {"draws": seeds * B, "token_mismatches": tok_diff, "score_elements": 8 * B * V,
                          "score_bit_mismatches": score_diff, "score_mismatch_details": details}}


def bench_threshold(args) -> list[dict]:
    """keep_threshold: torch (topk / sort + softmax + cumsum) vs the radix-select kernel, time and rows whose
    threshold differs (top-k must be 0; top-p may differ by summation order)."""
    out = []
    for B, V in [(1, 49152), (32, 49152), (256, 49152), (1, 128256), (32, 128256), (256, 128256)]:
        x = torch.randn(B, V, device="cuda") * 3
        for k, p in ((50, 1.0), (0, 0.9), (50, 0.9)):
            rec = {"B": B, "V": V, "top_k": k, "top_p": p}
            for name, kernel in (("torch", False), ("radix", True)):
                rec[f"{name}_us"] = time_graph(lambda: keep_threshold(x, k, p, 1.25, kernel=kernel), 3,
                                               args.replays) * 1e6
            a, b = keep_threshold(x, k, p, 1.25, kernel=True), keep_threshold(x, k, p, 1.25, kernel=False)
            rec["rows_differing"] = int((a != b).sum())
            rec["kept_tokens_torch"] = int((x >= b[:, None]).sum())
            rec["kept_tokens_radix"] = int((x >= a[:, None]).sum())
            out.append(rec)
            print(json.dumps({k_: round(v, 2) if isinstance(v, float) else v for k_, v in rec.items()}), flush=True)
    return out


def bench_blocks(args) -> list[dict]:
    """The fused kernel's tile size (temperature 0.8, no threshold)."""
    out = []
    for B, V in [(1, 128256), (32, 49152), (256, 49152), (256, 128256)]:
        x = torch.randn(B, V, device="cuda") * 3
        seed, slot, rows = torch.tensor([1], device="cuda"), torch.tensor([2], device="cuda"), torch.arange(B,
                                                                                                         device="cuda")
        rec = {"B": B, "V": V}
        for block in (512, 1024, 2048, 4096):
            rec[f"block_{block}_us"] = time_graph(lambda: gumbel_argmax(x, 1.25, None, seed, slot, rows, block=block),
                                                  5, args.replays) * 1e6
        out.append(rec)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
    return out


# ------------------------------------------------------------------------------------------ rollouts


def bench_rollout(args) -> dict:
    import fp4kit.engine.engine as engine_mod
    from fp4kit.engine import Engine
    from fp4kit.engine.random_model import random_llama
    from fp4kit.formats import NVFP4Config
    from fp4kit.nn import quantize_

    B, P, N = (256, 64, 64) if not args.smoke else (4, 8, 8)
    model = random_llama(args.device, **SMOLLM2_135M)
    quantize_(model, NVFP4Config(), progress=False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SMOLLM2_135M["vocab_size"], (B, P), generator=gen).tolist()
    cuda = torch.device(args.device).type == "cuda"
    engine = Engine(model, max_batch=B, max_seq_len=P + N + 1, cuda_graphs=cuda)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = []
    for label, params, sampler in [("greedy", SamplingParams(max_new_tokens=N, temperature=0, ignore_eos=True), None),
                                   ("previous T=1.0", SamplingParams(max_new_tokens=N, temperature=1.0,
                                                                     ignore_eos=True), previous_sample),
                                   ("kernel T=1.0", SamplingParams(max_new_tokens=N, temperature=1.0,
                                                                   ignore_eos=True), None)]:
        engine.reset_graphs()
        patch = mock.patch.object(engine_mod, "sample", sampler) if sampler else mock.patch.object(engine_mod, "sample",
                                                                                                   engine_mod.sample)
        with patch:
            engine.generate(ids, params)  # warm-up: compile, capture
            runs = []
            for _ in range(args.repeats):
                first: list[float] = []
                sync()
                t0 = time.perf_counter()
                outs = engine.generate(ids, params, stream=lambda *_: first or first.append(time.perf_counter()))
                sync()
                runs.append((first[0] - t0, time.perf_counter() - t0))
        ttft = statistics.median(r[0] for r in runs)
        full = statistics.median(r[1] for r in runs)
        step = (full - ttft) / (N - 1)
        tokens = sum(len(o.token_ids) for o in outs)
        rec = {"label": label, "batch": B, "prompt_len": P, "new_tokens": N, "ttft_ms": ttft * 1e3,
               "step_ms": step * 1e3, "decode_tok_s": B / step, "e2e_tok_s": tokens / full}
        out.append(rec)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
    return {"device": torch.cuda.get_device_name() if cuda else "cpu",
            "model": "SmolLM2-135M shapes, random weights, NVFP4 RTN layers (model's own head)", "runs": out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["kernel", "rollout"])
    ap.add_argument("--only", default="", help="kernel: comma-separated modes to time (default: all)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="kernel: also time tile sizes")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (a sign of life on the CPU)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = {"what": args.what, "date": time.strftime("%Y-%m-%d"),
              **(bench_kernel(args) if args.what == "kernel" else bench_rollout(args))}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.rename(args.out)


if __name__ == "__main__":
    main()
