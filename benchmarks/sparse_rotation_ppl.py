"""Perplexity with the per-layer rotation against the block-32 default (issue 10), paired per token, CPU.

    PYTHONPATH=. nice python benchmarks/sparse_rotation_ppl.py --model gemma3-270m --ks 64 --reranks 1 2

1. `fp4kit.eval.sparse.calibrate_rotation` on the first --calib-tokens tokens of the bundled DROP passages
   (what `fp4kit eval --sparse-calibrate-rotation` does): each layer's rotation, block 32 or the full head dim.
2. CoQA stories (not in the calibration), --tokens tokens in windows of --context (stride = context, no prefix),
   sink 4 + window 32 + top-k, centered MXFP4 keys: the per-token NLL with the default indexer (block 32 on every
   layer) and with the calibrated layer configs, and dense. Paired: mean and standard error over tokens of the
   per-token NLL difference (tokens treated as independent, which they are not: a rough, likely optimistic
   scale, as in sparse_ppl_paired.py).
Writes benchmarks/results/sparse_rotation_ppl_<model>.json (temp file, then rename).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sparse_recall import tokens, write_json  # noqa: E402

from fp4kit.eval.sparse import calibrate_rotation  # noqa: E402
from fp4kit.io.models import load_model  # noqa: E402
from fp4kit.nn.indexer import IndexerConfig, IndexPrecision  # noqa: E402
from fp4kit.nn.sparse_attention import use_sparse_attention  # noqa: E402


def nll(model, ids: torch.Tensor, context: int, config=None, layer_configs=None) -> torch.Tensor:
    """Per-token NLL over windows of `context` tokens (dense when config is None)."""
    out = []
    for start in range(0, ids.numel() - 1, context):
        w = ids[start:start + context].unsqueeze(0)
        if w.shape[1] < 2:
            break
        with torch.no_grad():
            if config is None:
                lg = model(w).logits[0, :-1].float()
            else:
                with use_sparse_attention(model, config, layer_configs):
                    lg = model(w).logits[0, :-1].float()
        out.append(F.cross_entropy(lg, w[0, 1:], reduction="none"))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--ks", type=int, nargs="+", default=[64])
    p.add_argument("--reranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=3072)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model, tok, _ = load_model(a.model)  # float32, eval mode
    base = IndexerConfig(precision=IndexPrecision.MXFP4, sink=4, window=32)  # the defaults: block 32, centered
    calib = tokens(tok, "drop", a.calib_tokens)[: a.calib_tokens].unsqueeze(0)
    layers = calibrate_rotation(model, calib, base, queries=min(1024, a.calib_tokens), local="window")
    chosen = {i: c.rotate_block for i, c in sorted(layers.items())}
    print("chosen on DROP:", {i: b or "full" for i, b in chosen.items()}, f"({time.time() - t0:.0f} s)", flush=True)
    ids = tokens(tok, "coqa", a.tokens)[: a.tokens]
    dense = nll(model, ids, a.context)
    res = {"model": a.model, "corpus": "coqa", "tokens": int(dense.numel()), "context": a.context,
           "calib": {"corpus": "drop", "tokens": a.calib_tokens}, "chosen": {str(i): b for i, b in chosen.items()},
           "ppl_dense": math.exp(dense.mean().item()), "rows": [], "date": time.strftime("%Y-%m-%d"),
           "threads": a.threads}
    for k in a.ks:
        for r in a.reranks:
            cfg = replace(base, top_k=k, rerank=r)
            default = nll(model, ids, a.context, cfg)
            per_layer = nll(model, ids, a.context, cfg, {i: replace(c, top_k=k, rerank=r) for i, c in layers.items()})
            d = per_layer - default
            row = {"k": k, "rerank": r, "ppl_default": math.exp(default.mean().item()),
                   "ppl_per_layer": math.exp(per_layer.mean().item()), "mean_log_diff": d.mean().item(),
                   "se_log_diff": (d.std() / math.sqrt(d.numel())).item(),
                   "tokens_changed_gt_0.01": int((d.abs() > 0.01).sum())}
            res["rows"].append(row)
            print(row, f"({time.time() - t0:.0f} s)", flush=True)
    res["seconds"] = time.time() - t0
    out = pathlib.Path("benchmarks/results") / f"sparse_rotation_ppl_{a.model}.json"
    write_json(out, res)
    print(f"dense {res['ppl_dense']:.3f}; wrote {out}")


if __name__ == "__main__":
    main()
