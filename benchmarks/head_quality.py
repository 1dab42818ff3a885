"""What a quantized output head costs in perplexity: the model's head against INT8 / FP8 / NVFP4 copies (CPU).

    python benchmarks/head_quality.py smollm2-135m --out benchmarks/results/head_quality_smollm2_cpu.json
    python benchmarks/head_quality.py gemma3-270m --out benchmarks/results/head_quality_gemma3_cpu.json

The embedded model (GGUF dequantized; its layers as they are) with lm_head replaced by an untied nn.Linear holding
the dequantized copy of its weight (the input embedding stays: both models tie them), HF forward, perplexity over
`--windows` non-overlapping 512-token windows of tiny-shakespeare from character 200,000. Copies: INT8 per row
(`Int8Config`, what `Engine(lm_head="int8")` runs), FP8 E4M3 per row (`FP8Config(TOKEN)`), NVFP4 RTN
(`Engine(lm_head="nvfp4")`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from torch import nn

from fp4kit.data import load_corpus
from fp4kit.eval import perplexity
from fp4kit.formats import FP8Config, FP8Granularity, Int8Config, NVFP4Config, quantize
from fp4kit.io import load_model

HEADS = {"model": None, "int8": Int8Config(), "fp8_row": FP8Config(FP8Granularity.TOKEN), "nvfp4": NVFP4Config()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="embedded model name (smollm2-135m, gemma3-270m)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok, _ = load_model(args.model)
    text = load_corpus("shakespeare")[200_000:200_000 + 6000 * args.windows]
    ids = tok(text, return_tensors="pt").input_ids[0][: args.windows * 512]
    w = base.lm_head.weight.detach().float().clone()
    out = {"model": args.model, "windows": args.windows, "window": 512, "dtype": str(base.dtype),
           "date": time.strftime("%Y-%m-%d"), "ppl": {}}
    for label, cfg in HEADS.items():
        m = base
        if cfg is not None:
            m = copy.deepcopy(base)
            m.lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False).to(base.dtype)
            m.lm_head.weight.data.copy_(quantize(w, cfg, name="lm_head.weight").dequantize(torch.float32))
        out["ppl"][label] = perplexity(m, ids, context=512, progress=False).perplexity
        print(f"{label:8s} {out['ppl'][label]:.3f}", flush=True)
    out["change"] = {k: v / out["ppl"]["model"] - 1 for k, v in out["ppl"].items()}
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(out["change"], indent=1))


if __name__ == "__main__":
    main()
