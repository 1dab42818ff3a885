"""Recall of the FP4 indexer on real Q/K (CPU), and perplexity with sparse attention.

    nice python benchmarks/sparse_recall.py recall --model smollm2-135m --corpus coqa --tokens 2048 \
        --queries 1024 --layer-step 4
    nice python benchmarks/sparse_recall.py ppl --model smollm2-135m --corpus coqa --context 1024 --max-tokens 3072
    python benchmarks/sparse_recall.py table      # all recorded recall runs as one markdown table

Writes benchmarks/results/sparse_recall_<model>_<corpus>.json (per layer/head rows and a summary) or
sparse_ppl_<model>_<corpus>.json, through a temp file then rename, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import tempfile
import time

import torch

from fp4kit.data import load_corpus
from fp4kit.eval.sparse import measure_recall, sparse_perplexity, summarize
from fp4kit.io.models import load_model
from fp4kit.nn.indexer import IndexerConfig, IndexPrecision

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def tokens(tokenizer, corpus: str, n: int) -> torch.Tensor:
    text = load_corpus(corpus)[: 12 * n]  # plenty of characters for n tokens
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n:
        raise ValueError(f"{corpus}: only {ids.numel()} tokens, asked for {n}")
    return ids[:n]


def run_recall(args) -> None:
    torch.set_num_threads(args.threads)
    model, tok, _ = load_model(args.model)
    n_layers = model.config.num_hidden_layers
    layers = set(range(0, n_layers, args.layer_step)) | {n_layers - 1}
    ids = tokens(tok, args.corpus, args.tokens).unsqueeze(0)
    t0 = time.time()
    rows = measure_recall(model, ids, ks=args.ks, layers=layers, queries=args.queries)
    summary = summarize(rows)
    out = {"model": args.model, "corpus": args.corpus, "tokens": args.tokens, "queries": args.queries,
           "layers": sorted(layers), "ks": args.ks, "seconds": time.time() - t0, "device": "cpu",
           "date": time.strftime("%Y-%m-%d"),
           "summary": [{"variant": v, "k": k, **s} for (v, k), s in summary.items()],
           "rows": [dataclasses.asdict(r) for r in rows]}
    write_json(RESULTS / f"sparse_recall_{args.model}_{args.corpus}.json", out)
    print(f"\n{args.model} {args.corpus} T={args.tokens} last {args.queries} queries, layers {sorted(layers)}")
    print("| variant | k | set recall mean (min) | mass recall mean (min) |\n|---|---|---|---|")
    for (v, k), s in summary.items():
        print(f"| {v} | {k} | {100 * s['set_mean']:.2f}% ({100 * s['set_min']:.2f}%) | "
              f"{100 * s['mass_mean']:.3f}% ({100 * s['mass_min']:.3f}%) |")


def run_ppl(args) -> None:
    torch.set_num_threads(args.threads)
    model, tok, _ = load_model(args.model)
    ids = tokens(tok, args.corpus, args.max_tokens)
    configs = {}
    for k in args.ks:
        configs[f"bf16_k{k}"] = IndexerConfig(top_k=k, precision=IndexPrecision.BF16, rotate=False, rerank=1,
                                             sink=4, window=32)
        configs[f"mxfp4_rot_k{k}"] = IndexerConfig(top_k=k, rerank=1, sink=4, window=32)
        configs[f"mxfp4_rot_r2_k{k}"] = IndexerConfig(top_k=k, rerank=2, sink=4, window=32)
    t0 = time.time()
    ppl = sparse_perplexity(model, ids, configs, context=args.context, max_tokens=args.max_tokens)
    out = {"model": args.model, "corpus": args.corpus, "context": args.context, "tokens": args.max_tokens,
           "sink": 4, "window": 32, "seconds": time.time() - t0, "device": "cpu",
           "date": time.strftime("%Y-%m-%d"), "perplexity": ppl}
    write_json(RESULTS / f"sparse_ppl_{args.model}_{args.corpus}.json", out)
    print(f"\n{args.model} {args.corpus} context {args.context}, {args.max_tokens} tokens (sink 4, window 32)")
    print("| attention | perplexity |\n|---|---|")
    for name, v in ppl.items():
        print(f"| {name} | {v:.3f} |")


def run_table(args) -> None:
    """One markdown table from every sparse_recall_*.json: set / mass recall (mean over layers and heads)."""
    files = sorted(RESULTS.glob("sparse_recall_*.json"))
    runs = [json.loads(f.read_text()) for f in files]
    variants = ["bf16", "mxfp4", "mxfp4_rot", "nvfp4_rot", "mxfp4_rot_r2", "mxfp4_rot_r4"]
    print("| model / text | k | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for run in runs:
        by = {(r["variant"], r["k"]): r for r in run["summary"]}
        for k in run["ks"]:
            cells = []
            for v in variants:
                r = by.get((v, k))
                cells.append("-" if r is None else f"{100 * r['set_mean']:.2f} / {100 * r['mass_mean']:.3f}")
            print(f"| {run['model']} {run['corpus']} | {k} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["recall", "ppl", "table"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="coqa")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--layer-step", type=int, default=4)
    p.add_argument("--ks", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=3072)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    {"recall": run_recall, "ppl": run_ppl, "table": run_table}[args.what](args)


if __name__ == "__main__":
    main()
