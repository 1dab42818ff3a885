"""Long-context retrieval with sparse attention: the passkey task (fp4kit.data, ~3.3K tokens) at several k.

Every query of the prompt and of the answer attends to `sink` + `window` + its top-k keys chosen by the
indexer (`use_sparse_attention`); the answer must copy a 5-digit key stated once at a random depth.
Variants per k: exact (float32 index scores: what top-k attention itself can do), bf16, MXFP4 single stage,
MXFP4 two-stage (r=2). Dense attention first.

    python benchmarks/sparse_passkey.py --model smollm2-135m --n 50 --ks 64,256,1024 --out results.json
    # old (full rotation, uncentered) against current (block-32, centered) indexer defaults
    python benchmarks/sparse_passkey.py --n 40 --ks 256 --variants fp32,mxfp4,mxfp4_r2,mxfp4_old,mxfp4_r2_old --out ...
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import pathlib
import time

import torch

from fp4kit.data import load_task
from fp4kit.eval.generation import score_generation
from fp4kit.io import load_model
from fp4kit.nn.indexer import IndexerConfig, IndexPrecision
from fp4kit.nn.sparse_attention import use_sparse_attention

# name: IndexerConfig fields. fp32 / bf16 / mxfp4 / mxfp4_r2 take the current IndexerConfig defaults for the rest
# (block-32 rotation and key centering since issue 10); "_old" pins the indexer of the 2026-11-23 H100 rows
# (full head-dim rotation, no centering)
_OLD = dict(rotate_block=None, center_keys=False)
VARIANTS = {"fp32": dict(precision=IndexPrecision.FP32, rotate=False, rerank=1),
            "bf16": dict(precision=IndexPrecision.BF16, rotate=False, rerank=1),
            "mxfp4": dict(precision=IndexPrecision.MXFP4, rotate=True, rerank=1),
            "mxfp4_r2": dict(precision=IndexPrecision.MXFP4, rotate=True, rerank=2),
            "fp32_old": dict(precision=IndexPrecision.FP32, rotate=False, rerank=1, **_OLD),
            "mxfp4_old": dict(precision=IndexPrecision.MXFP4, rotate=True, rerank=1, **_OLD),
            "mxfp4_r2_old": dict(precision=IndexPrecision.MXFP4, rotate=True, rerank=2, **_OLD)}
DEFAULT_VARIANTS = "fp32,bf16,mxfp4,mxfp4_r2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--ks", default="64,256,1024")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {','.join(VARIANTS)}")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--out", type=pathlib.Path, required=True)
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, src = load_model(a.model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = model.to(device).eval()
    items = load_task("passkey", limit=a.n)
    result = {"model": src.label, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "date": datetime.date.today().isoformat(), "n": len(items), "sink": a.sink, "window": a.window,
              "prompt_tokens": [len(tok(it.prompt).input_ids) for it in items[:3]], "runs": []}

    def run(label, cfg):
        if cfg is not None:
            result.setdefault("variants", {})[label] = {f.name: str(getattr(cfg, f.name))
                                                        for f in dataclasses.fields(cfg)}
        t0 = time.time()
        with torch.no_grad(), (use_sparse_attention(model, cfg) if cfg else contextlib.nullcontext()):
            em = score_generation(model, tok, "passkey", items, batch_size=a.batch_size, max_new_tokens=8,
                                  progress=False)["exact_match"]
        row = {"attention": label, "exact_match": sum(em) / len(em), "seconds": round(time.time() - t0, 1),
               "per_item": [int(x) for x in em]}
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        a.out.write_text(json.dumps(result, indent=1))

    run("dense", None)
    for k in map(int, a.ks.split(",")):
        for v in a.variants.split(","):
            cfg = IndexerConfig(top_k=k, sink=a.sink, window=a.window, **VARIANTS[v])
            run(f"k={k} {v}", cfg)


if __name__ == "__main__":
    main()
