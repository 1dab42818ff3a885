"""`fp4kit eval` and `fp4kit compare`: bundled tasks on a model or checkpoint, and tables/plots of result files."""

from __future__ import annotations

import torch

import fp4kit

from .common import SCHEMES, SCALE_RULES, format_config, load_any, resolve_device


def _indexer(args):
    """The sparse-attention indexer the flags ask for, or None (dense attention)."""
    if not args.sparse_top_k:
        return None
    from fp4kit.nn.indexer import IndexerConfig, IndexPrecision

    block = {} if args.sparse_rotate_block is None else {"rotate_block": args.sparse_rotate_block or None}
    return IndexerConfig(top_k=args.sparse_top_k, precision=IndexPrecision(args.sparse_index),
                         rotate=args.sparse_index in ("mxfp4", "nvfp4"), rerank=args.sparse_rerank,
                         sink=args.sparse_sink, window=args.sparse_window, center_keys=args.sparse_center, **block)


def _attention_label(cfg) -> str:
    if cfg is None:
        return "dense"
    return (f"sparse k={cfg.top_k} {cfg.precision.value}" + (f" r={cfg.rerank}" if cfg.rerank > 1 else "")
            + f" sink={cfg.sink} window={cfg.window}"
            + (f" rot{cfg.rotate_block or 'full'}" if cfg.rotate else "") + (" centered" if cfg.center_keys else ""))


def _calibrated_rotation(model, tok, indexer, tokens: int, device) -> dict:
    """{layer: IndexerConfig} with each layer's better rotation (the indexer's block, or the whole head dim) on
    the first `tokens` tokens of the bundled DROP passages (not an evaluated text), or {} when not asked for."""
    if not tokens:
        return {}
    if indexer is None or not indexer.rotate:
        raise ValueError("--sparse-calibrate-rotation needs an FP4 sparse indexer (--sparse-top-k and "
                         "--sparse-index mxfp4 or nvfp4)")
    from fp4kit.data import load_corpus
    from fp4kit.eval.sparse import calibrate_rotation

    ids = tok(load_corpus("drop")[: 12 * tokens], return_tensors="pt")["input_ids"][:, :tokens].to(device)
    if ids.shape[1] < tokens:
        raise ValueError(f"--sparse-calibrate-rotation: the DROP text holds only {ids.shape[1]} tokens")
    blocks = (indexer.rotate_block, None) if indexer.rotate_block else (32, None)  # the flag's block vs the full one
    return calibrate_rotation(model, ids, indexer, blocks=blocks, queries=min(1024, tokens), local="window")


def cmd_eval(args) -> int:
    import contextlib

    from fp4kit.eval import evaluate, parse_tasks, write_jsonl
    from fp4kit.nn.sparse_attention import use_sparse_attention

    tasks = parse_tasks(args.tasks)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tok, meta = load_any(args.model, dtype)
    if args.quantize != "none":
        report = fp4kit.quantize_(model, format_config(args.quantize, args.scale_rule))
        meta |= {"format": args.quantize + (f"-{args.scale_rule}" if args.scale_rule else ""), "method": "rtn",
                 "quantized_layers": len(report.quantized)}
    model = model.to(device).eval()
    indexer = _indexer(args)
    layer_configs = _calibrated_rotation(model, tok, indexer, args.sparse_calibrate_rotation, device)
    meta |= {"attention": _attention_label(indexer) + (
        f" rotation per layer (calibrated on {args.sparse_calibrate_rotation} DROP tokens: "
        + ",".join(f"{i}:{c.rotate_block or 'full'}" for i, c in sorted(layer_configs.items())) + ")"
        if layer_configs else "")}
    sparse = use_sparse_attention(model, indexer, layer_configs) if indexer else contextlib.nullcontext()
    with sparse:
        records = evaluate(model, tok, tasks, limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                           ppl_tokens=args.ppl_tokens, context=args.context, meta=meta)
    print("| task | metric | value | stderr | n |\n|---|---|---|---|---|")
    for r in records:
        se = f"{r['stderr']:.4f}" if r["stderr"] else "-"
        print(f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {se} | {r['n']} |")
    if args.json:
        write_jsonl(records, args.json)
        print(f"appended {len(records)} records to {args.json}")
    return 0


def cmd_compare(args) -> int:
    from fp4kit.eval import read_jsonl
    from fp4kit.eval.report import compare_plot, compare_table, group_runs

    records = []
    for path in args.files:
        recs = read_jsonl(path)
        if not recs:
            raise ValueError(f"{path}: no records")
        records += recs
    runs = group_runs(records)
    print(compare_table(runs))
    if args.plot:
        compare_plot(runs, args.plot)
        print(f"wrote {args.plot}")
    return 0


def register(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model or checkpoint on bundled tasks")
    e.add_argument("model", help="embedded name, HF folder, .gguf file or fp4kit/compressed-tensors checkpoint")
    e.add_argument("--tasks", default="ppl:shakespeare,hellaswag,arc_easy,arc_challenge,piqa,winogrande",
                   help="comma list: ppl:shakespeare|coqa|drop, hellaswag, arc_easy, arc_challenge, piqa, "
                        "winogrande, mmlu, lambada, basic_arithmetic, gsm8k, math500, passkey (long context)")
    e.add_argument("--limit", type=int, help="items per task (a fixed-seed sample)")
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    e.add_argument("--quantize", choices=("none",) + SCHEMES, default="none", help="RTN-quantize in memory first")
    e.add_argument("--scale-rule", choices=SCALE_RULES, help="MXFP4 shared-exponent rule")
    e.add_argument("--ppl-tokens", type=int, default=16384)
    e.add_argument("--context", type=int, default=1024, help="perplexity window")
    e.add_argument("--json", help="append result records (JSON lines) to this file")
    s = e.add_argument_group("sparse attention (every query attends to sink + window + its top-k keys)")
    s.add_argument("--sparse-top-k", type=int, default=0, help="keys chosen per query and KV head (0: dense)")
    s.add_argument("--sparse-index", choices=("mxfp4", "nvfp4", "bf16", "fp32"), default="mxfp4",
                   help="precision of the indexer's Q and K (FP4 ones are Hadamard-rotated first)")
    s.add_argument("--sparse-rerank", type=int, default=2, help="two-stage: FP4 top-(r*k), exact rerank (1: off)")
    s.add_argument("--sparse-sink", type=int, default=4, help="first keys always attended")
    s.add_argument("--sparse-window", type=int, default=32, help="newest keys always attended")
    s.add_argument("--sparse-rotate-block", type=int, default=None,
                   help="Hadamard block size of the FP4 indexer's rotation (default 32; 0: the whole head dim)")
    s.add_argument("--no-sparse-center", dest="sparse_center", action="store_false",
                   help="do not subtract the mean key (of the prefill) before rounding the indexer's keys")
    s.add_argument("--sparse-calibrate-rotation", type=int, default=0, metavar="TOKENS",
                   help="choose each layer's rotation (--sparse-rotate-block's or the whole head dim) by the "
                        "top-k recall on this many tokens of bundled DROP text before evaluating (e.g. 2048; "
                        "0: one rotation for all)")
    e.set_defaults(func=cmd_eval)
    c = sub.add_parser("compare", help="table (and plot) of result files; runs are grouped by model, format "
                                       "and method, in order of appearance, and the first is the base")
    c.add_argument("files", nargs="+")
    c.add_argument("--plot", help="write a PNG plot here")
    c.set_defaults(func=cmd_compare)
