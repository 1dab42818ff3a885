"""GPTQ time with fused siblings quantized in one sweep (q/k/v, gate/up) against one sweep per layer.

    python benchmarks/bench_gptq_groups.py [--model smollm2-135m] [--device cpu] [--threads 1]
        [--out benchmarks/results/gptq_groups_<model>_<device>.json]

Both paths quantize the same weights against the same Hessians (16 x 256 tokens of tiny-shakespeare,
as `fp4kit quantize --method gptq`): "per layer" calls `fp4kit.algorithms.gptq` once per linear layer
(what `apply_gptq` did before grouping), "grouped" runs `calibrate.quantize_group` over
`calibrate.sibling_groups` (what `apply_gptq` does now). The run checks that every layer's codes and
scales are identical between the two, then reports the wall time of each (median of `--repeats`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from fp4kit.algorithms.calibrate import (GPTQResult, collect_hessians, eligible_linears, quantize_group,
                                        sibling_groups)
from fp4kit.algorithms.gptq import GPTQConfig, gptq
from fp4kit.data import load_corpus
from fp4kit.formats import MXFP4Config, NVFP4Config
from fp4kit.io import load_model
from fp4kit.nn import QuantizeReport
from fp4kit.nn.quantize import shared_amax


def calibration(tokenizer, samples=16, seq_len=256):
    text = load_corpus("shakespeare")[200_000:]
    ids = tokenizer(text[: samples * seq_len * 8], return_tensors="pt").input_ids[0]
    return [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in range(samples)]


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, _ = load_model(args.model, dtype=torch.float32)
    model.to(args.device).eval()
    batches = [b.to(args.device) for b in calibration(tok)]
    rows = []
    for config in (NVFP4Config(), MXFP4Config()):
        hessians = collect_hessians(model, batches, config, progress=False)
        layers = eligible_linears(model, config)
        amax = shared_amax(list(layers.items())) if isinstance(config, NVFP4Config) else {}
        groups = sibling_groups(layers, hessians)

        def per_layer():
            return {n: gptq(m.weight.detach(), hessians[n].sum, config, amax=amax.get(n), name=n)
                    for n, m in layers.items()}

        def grouped():
            result, out = GPTQResult(QuantizeReport()), {}
            for g in groups:
                out |= quantize_group(g, layers, config, hessians, GPTQConfig(), amax, result)
            return out

        t_layer, all_layer, a = timed(per_layer, args.repeats)
        t_group, all_group, b = timed(grouped, args.repeats)
        same = all(torch.equal(a[n].data, b[n].data) and torch.equal(a[n].scale, b[n].scale) for n in layers)
        row = {"format": config.name, "layers": len(layers), "sweeps_grouped": len(groups),
               "per_layer_s": t_layer, "grouped_s": t_group, "speedup": t_layer / t_group, "identical_codes": same,
               "per_layer_all_s": all_layer, "grouped_all_s": all_group}
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if not k.endswith("all_s")}), flush=True)
        rows.append(row)
    if args.out:
        meta = {"date": datetime.date.today().isoformat(), "model": args.model, "device": args.device,
                "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
                "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
