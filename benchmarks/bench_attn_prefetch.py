"""Decode step time against the attention's L2 prefetch depth (`decode_ops.ATTN_PREFETCH_KEYS`), on the GPU.

    python benchmarks/bench_attn_prefetch.py --keys 0 128 256 640 --rounds 2 --out results/x.json

The Llama-3-8B shape with random weights (`llama3-8b-random`), prompt 512 + 256 greedy tokens, batch 1 and 32,
CUDA graphs, `fp4kit.engine.bench`'s measurement. bf16 weights with a bf16 cache (the baseline; prefetch 0 and
128, `ATTN_PREFETCH_BF16` on for the 128 row), then NVFP4 weights with the INT8 head: FP8 cache at every
`--keys`, bf16 cache at 0 and 128. The settings alternate in one process, each round in the opposite order of the
last, so drift shows up as a difference between rounds rather than between settings.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, nargs="+", default=[0, 128, 256, 640])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from fp4kit.engine import Engine
    from fp4kit.engine.bench import BenchConfig, bench_engine, copy_bandwidth
    from fp4kit.engine.random_model import random_llama
    from fp4kit.formats import NVFP4Config
    from fp4kit.kernels import decode_ops
    from fp4kit.nn import quantize_

    cfg = BenchConfig(tuple(args.batch), 512, 256, 3)
    model = random_llama("cuda", torch.bfloat16)
    bw = copy_bandwidth("cuda")
    res = {"device": torch.cuda.get_device_name(), "bandwidth_Bps": bw, "date": time.strftime("%Y-%m-%d"),
           "config": vars(args), "rows": []}

    def run(weights: str, kv: str, head: str, keys: int) -> None:
        decode_ops.ATTN_PREFETCH_KEYS, decode_ops.ATTN_PREFETCH_BF16 = keys, kv == "bf16" and keys > 0
        eng = Engine(model, max_batch=max(cfg.batches), max_seq_len=cfg.prompt_len + cfg.gen_len,
                     kv_dtype=torch.bfloat16 if kv == "bf16" else torch.float8_e4m3fn, lm_head=head)
        for r in bench_engine(eng, cfg, bw):
            row = {"weights": weights, "kv": kv, "lm_head": head, "prefetch_keys": keys, "batch": r["batch"],
                   "step_ms": r["step_ms"], "ttft_ms": r["ttft_ms"]}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)

    defaults = decode_ops.ATTN_PREFETCH_KEYS, decode_ops.ATTN_PREFETCH_BF16
    try:
        for rnd in range(args.rounds):
            for keys in ([0, 128] if rnd % 2 == 0 else [128, 0]):
                run("bf16", "bf16", "model", keys)
        quantize_(model, NVFP4Config(), progress=False)
        for rnd in range(args.rounds):
            for keys in (args.keys if rnd % 2 == 0 else args.keys[::-1]):
                run("nvfp4", "fp8", "int8", keys)
                if keys in (0, 128):
                    run("nvfp4", "bf16", "int8", keys)
    finally:
        decode_ops.ATTN_PREFETCH_KEYS, decode_ops.ATTN_PREFETCH_BF16 = defaults
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
