"""PTQ variants on SmolLM2-135M (the embedded default), perplexity on the README's 2,048 tokens of
tiny-shakespeare (512-token windows): RTN, one-pass GPTQ, sequential GPTQ, W4A8, static FP8 KV cache.

    python benchmarks/ptq_smollm2.py [--out benchmarks/results/ptq_smollm2.json] [--device cpu]
    python benchmarks/ptq_smollm2.py --mr-gptq --out benchmarks/results/ptq_mr_gptq_smollm2.json

`--mr-gptq` runs the MR-GPTQ set instead, every variant through `fp4kit.algorithms.apply_ptq`: per
format (NVFP4, MXFP4; W4A16) RTN, GPTQ, GPTQ with MSE scales (no rotation: isolates the rotation's
share), MR-GPTQ with Hadamard blocks 16/32/64 (the sweep that picks the CLI default; SmolLM2's
hidden size 576 admits no 128 block), then W4A4 RTN vs MR-GPTQ. The JSON is rewritten after every
row, so a cut-off run keeps what it finished; `--resume` skips the rows the JSON already holds.

Calibration: 16 x 256 tokens of tiny-shakespeare taken after the evaluated span (as `fp4kit quantize`).

Other models: `--model gemma3-270m` (any `load_model` spec); `--upcycle 8,2,0.02` first turns the model into a
transformers Mixtral with 8 experts, top-2 routing and 2% expert noise (`fp4kit.io.upcycle`), so the rows measure
PTQ of fused 3-D experts (experts always RTN; GPTQ and rotations apply to attention).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import time

import torch

import fp4kit
from fp4kit.algorithms import (GPTQConfig, PTQMethod, PTQRecipe, RotationConfig, apply_gptq, apply_ptq,
                               collect_hessians, sequential_gptq)
from fp4kit.algorithms.scale_search import ScaleSearchConfig
from fp4kit.data import load_corpus
from fp4kit.eval import perplexity
from fp4kit.formats import FP8Config, FP8Granularity, MXFP4Config, NVFP4Config
from fp4kit.io import load_model
from fp4kit.nn.kv_quant import KVCacheConfig, KVScaleGranularity, enable_fp8_kv, observe_kv_amax, set_kv_scales


def calibration(tokenizer, samples=16, seq_len=256):
    text = load_corpus("shakespeare")[200_000:]
    ids = tokenizer(text[: samples * seq_len * 8], return_tensors="pt").input_ids[0]
    return [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in range(samples)]


def kv(model, batches, granularity):
    cfg = KVCacheConfig(granularity)
    set_kv_scales(model, observe_kv_amax(model, lambda: [model(b) for b in batches], cfg), cfg)
    enable_fp8_kv(model)


def variants(batches):
    nv, mx = NVFP4Config(), MXFP4Config()
    fp8 = FP8Config(FP8Granularity.TOKEN)
    return {
        "bf16": lambda m: None,
        "bf16 + KV FP8/tensor": lambda m: kv(m, batches, KVScaleGranularity.TENSOR),
        "bf16 + KV FP8/head": lambda m: kv(m, batches, KVScaleGranularity.HEAD),
        "NVFP4 RTN": lambda m: fp4kit.quantize_(m, nv, progress=False),
        "NVFP4 RTN W4A8": lambda m: fp4kit.quantize_(m, nv, activations=fp8, progress=False),
        "NVFP4 RTN + KV FP8/tensor": lambda m: (fp4kit.quantize_(m, nv, progress=False),
                                                kv(m, batches, KVScaleGranularity.TENSOR)),
        "NVFP4 GPTQ (one pass)": lambda m: apply_gptq(m, nv, collect_hessians(m, batches, nv, progress=False),
                                                      GPTQConfig(), progress=False),
        "NVFP4 GPTQ (sequential)": lambda m: sequential_gptq(m, batches, nv, GPTQConfig(), progress=False),
        "MXFP4 RTN": lambda m: fp4kit.quantize_(m, mx, progress=False),
        "MXFP4 GPTQ (sequential)": lambda m: sequential_gptq(m, batches, mx, GPTQConfig(), progress=False),
    }


def mr_gptq_variants(batches):
    out = {}

    def ptq(config, recipe, activations=None):
        return lambda m: apply_ptq(m, config, recipe, batches=batches, activations=activations, progress=False)

    nv, mx = NVFP4Config(), MXFP4Config()
    out["NVFP4 RTN"] = ptq(nv, PTQRecipe(PTQMethod.RTN))
    out["NVFP4 GPTQ (one pass)"] = ptq(nv, PTQRecipe(PTQMethod.GPTQ))
    out["NVFP4 MR-GPTQ b=16"] = ptq(nv, PTQRecipe(PTQMethod.MR_GPTQ, RotationConfig(16)))
    out["MXFP4 RTN"] = ptq(mx, PTQRecipe(PTQMethod.RTN))
    out["MXFP4 GPTQ (one pass)"] = ptq(mx, PTQRecipe(PTQMethod.GPTQ))
    out["MXFP4 MR-GPTQ b=32"] = ptq(mx, PTQRecipe(PTQMethod.MR_GPTQ, RotationConfig(32)))
    # SmolLM2's hidden size 576 = 9 x 64: 64 is the largest power-of-two block every layer admits (128 does not fit)
    for label, cfg, blocks in (("NVFP4", nv, (32, 64)), ("MXFP4", mx, (16, 64))):
        for b in blocks:
            out[f"{label} MR-GPTQ b={b}"] = ptq(cfg, PTQRecipe(PTQMethod.MR_GPTQ, RotationConfig(b)))
    for label, cfg in (("NVFP4", NVFP4Config()), ("MXFP4", MXFP4Config())):
        out[f"{label} GPTQ + MSE scales (no rotation)"] = ptq(
            cfg, PTQRecipe(PTQMethod.GPTQ, gptq=GPTQConfig(scale_search=ScaleSearchConfig())))
    for label, cfg in (("NVFP4", nv), ("MXFP4", mx)):  # block scales picked as the sweep reaches each block
        out[f"{label} MR-GPTQ b={cfg.block_size} dynamic scales"] = ptq(cfg, PTQRecipe(
            PTQMethod.MR_GPTQ, RotationConfig(cfg.block_size), gptq=GPTQConfig(dynamic_scales=True)))
    for label, cfg in (("NVFP4", NVFP4Config()), ("MXFP4", MXFP4Config())):
        out[f"{label} W4A4 RTN"] = ptq(cfg, PTQRecipe(PTQMethod.RTN), activations=cfg)
        out[f"{label} W4A4 MR-GPTQ b={cfg.block_size}"] = ptq(cfg, PTQRecipe(PTQMethod.MR_GPTQ, RotationConfig(
            cfg.block_size)), activations=cfg)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/ptq_smollm2.json")
    p.add_argument("--model", default="smollm2-135m", help="embedded name, HF folder or .gguf")
    p.add_argument("--upcycle", metavar="E,K,NOISE", help="upcycle to a Mixtral MoE first (see the docstring)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", help="comma list of variant names to run")
    p.add_argument("--mr-gptq", action="store_true", help="run the MR-GPTQ set (see the docstring)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and skip those variants")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); on a shared machine 1 is far faster for GPTQ's "
                        "small per-column ops (measured 1.1 s vs 14 s for one 576x1536 layer under load)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok, src = load_model(args.model)
    if args.upcycle:
        from fp4kit.io.upcycle import MixtralUpcycle, upcycle_to_mixtral

        e, k, noise = args.upcycle.split(",")
        base = upcycle_to_mixtral(base, MixtralUpcycle(int(e), int(k), float(noise)))
    ids = tok(load_corpus("shakespeare")[: 2048 * 8], return_tensors="pt").input_ids[0][:2048]
    batches = calibration(tok)
    rows = json.load(open(args.out))["rows"] if args.resume and os.path.exists(args.out) else []
    table = mr_gptq_variants(batches) if args.mr_gptq else variants(batches)
    bf16 = perplexity(base.to(args.device), ids.to(args.device), context=512, progress=False).perplexity
    print(f"| bf16/float (this run) | {bf16:.3f} | - |", flush=True)
    for name, apply in table.items():
        if (args.only and name not in args.only.split(",")) or name in {r["variant"] for r in rows}:
            continue
        model = copy.deepcopy(base)
        t0 = time.time()
        with torch.no_grad():
            apply(model)
        seconds = time.time() - t0
        ppl = perplexity(model.to(args.device), ids.to(args.device), context=512, progress=False).perplexity
        rows.append({"variant": name, "perplexity": ppl, "quantize_seconds": round(seconds, 1)})
        print(f"| {name} | {ppl:.3f} | {seconds:.0f} s |", flush=True)
        write(args, src, ids, bf16, rows)
    print(f"wrote {args.out}")


def write(args, src, ids, bf16, rows):
    label = src.label + (f" upcycled to Mixtral ({args.upcycle})" if args.upcycle else "")
    result = {"model": label, "tokens": int(ids.numel()), "context": 512, "device": args.device,
              "host": platform.node(), "date": datetime.date.today().isoformat(), "float_perplexity": bf16,
              "torch_threads": torch.get_num_threads(), "rows": rows}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
