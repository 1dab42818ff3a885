"""Evaluate bf16, NVFP4-RTN and MXFP4-RTN versions of a model on the evaluation issue's task set.

Runs where the evaluation data packages are not installed (the lent GPU) by splitting the work:

    # here, with install.sh done: freeze the task items and corpora into a folder
    python benchmarks/eval_matrix.py export-items .stage/items --limit 1000
    # on the GPU (after staging the model's GGUF, see benchmarks/stage_model.py)
    python benchmarks/eval_matrix.py run MODEL .stage/items --out results.jsonl

`run` uses fp4kit.eval's scoring functions on the frozen items, so the numbers are those
`fp4kit eval` computes; each variant's records carry model, format, method, checkpoint hash,
device and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys
import time

import torch

TASKS = ["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "basic_arithmetic"]
CORPORA = ["shakespeare", "coqa"]
CALIBRATION_CORPORA = ["drop"]  # exported for ptq_matrix.py --calib-text, never evaluated


def export_items(folder: pathlib.Path, limit: int, seed: int) -> None:
    from fp4kit.data import load_corpus, load_task

    folder.mkdir(parents=True, exist_ok=True)
    for t in TASKS:
        items = load_task(t, limit=limit, seed=seed)
        kind = type(items[0]).__name__
        (folder / f"{t}.json").write_text(json.dumps({"kind": kind, "limit": limit, "seed": seed,
                                                      "items": [dataclasses.asdict(i) for i in items]}))
    for c in CORPORA:
        (folder / f"{c}.txt").write_text(load_corpus(c)[:400_000])
    for c in CALIBRATION_CORPORA:
        (folder / f"{c}.txt").write_text(load_corpus(c))
    print("exported", sorted(p.name for p in folder.iterdir()))


def load_items(folder: pathlib.Path) -> dict:
    """{task: (header dict, items)} from an export-items folder."""
    from fp4kit.data import Generation, MultipleChoice

    tasks = {}
    for t in TASKS:
        d = json.loads((folder / f"{t}.json").read_text())
        cls = {"MultipleChoice": MultipleChoice, "Generation": Generation}[d["kind"]]
        tasks[t] = (d, [cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in i.items()}) for i in d["items"]])
    return tasks


def evaluate_items(model, tok, folder: pathlib.Path, tasks: dict, base: dict, batch_size: int, ppl_tokens: int,
                   context: int, gen_batch_size: int | None = None) -> list[dict]:
    """Records (base + task, metric, value, n, stderr) for the corpora and the frozen task items.

    `gen_batch_size` (default `batch_size`): prompts per `generate` call. Each call rebuilds transformers'
    stop-string tables over the whole vocabulary (3.7 s for Gemma-3's 262K tokens on one CPU core), so a large
    vocabulary wants few, large calls."""
    from fp4kit.eval import bos_prefix, item_string, mean_stderr, perplexity, score_multiple_choice
    from fp4kit.eval.generation import score_generation
    from fp4kit.eval.runner import MAX_NEW_TOKENS

    records = []
    for c in CORPORA:
        ids = tok((folder / f"{c}.txt").read_text(), return_tensors="pt").input_ids[0][:ppl_tokens]
        ids, prefix = bos_prefix(tok, ids)
        r = perplexity(model, ids, context=context, prefix_token=prefix, progress=False)
        records.append(base | {"task": f"ppl:{c}", "metric": "perplexity", "value": r.perplexity, "n": r.tokens,
                               "stderr": None, "context": context})
    for t, (d, items) in tasks.items():
        if d["kind"] == "Generation":
            per = score_generation(model, tok, t, items, batch_size=gen_batch_size or batch_size, progress=False,
                                   max_new_tokens=MAX_NEW_TOKENS.get(t, 256))
        else:
            per = score_multiple_choice(model, tok, items, batch_size=batch_size, progress=False)
        for metric, values in per.items():
            mean, se = mean_stderr(values)
            records.append(base | {"task": t, "metric": metric, "value": mean, "n": len(values), "stderr": se,
                                   "limit": d["limit"], "seed": d["seed"], "items": item_string(values)})
    return records


def run(model_spec: str, folder: pathlib.Path, out: pathlib.Path, batch_size: int, ppl_tokens: int, context: int,
        label: str | None = None):
    import fp4kit
    from fp4kit.eval import model_hash
    from fp4kit.io import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tasks = load_items(folder)
    for variant in ("bf16", "nvfp4", "mxfp4"):
        t0 = time.time()
        model, tok, src = load_model(model_spec, dtype=dtype)
        if variant != "bf16":
            fp4kit.quantize_(model, fp4kit.NVFP4Config() if variant == "nvfp4" else fp4kit.MXFP4Config(), progress=False)
        model = model.to(device).eval()
        base = {"model": label or src.label, "checkpoint_hash": model_hash(model), "format": variant,
                "method": "none" if variant == "bf16" else "rtn", "device": torch.cuda.get_device_name() if
                device.type == "cuda" else "cpu", "date": datetime.date.today().isoformat()}
        records = evaluate_items(model, tok, folder, tasks, base, batch_size, ppl_tokens, context)
        with open(out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        print(f"{model_spec} {variant}: {time.time() - t0:.0f}s", flush=True)
        for r in records:
            print(f"  {r['task']:<18} {r['metric']:<12} {r['value']:.4f}  n={r['n']}", flush=True)
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export-items")
    e.add_argument("folder", type=pathlib.Path)
    e.add_argument("--limit", type=int, default=1000)
    e.add_argument("--seed", type=int, default=1234)
    r = sub.add_parser("run")
    r.add_argument("model")
    r.add_argument("folder", type=pathlib.Path)
    r.add_argument("--out", type=pathlib.Path, required=True)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--ppl-tokens", type=int, default=16384)
    r.add_argument("--context", type=int, default=1024)
    r.add_argument("--label", help="model name for the records (default: the model argument)")
    a = p.parse_args(argv)
    if a.cmd == "export-items":
        export_items(a.folder, a.limit, a.seed)
    else:
        run(a.model, a.folder, a.out, a.batch_size, a.ppl_tokens, a.context, a.label)


if __name__ == "__main__":
    sys.exit(main())
