"""Run a list of task specs on a model and produce result records (one JSON line per metric).

Task specs: `ppl:CORPUS` (perplexity over a named corpus: shakespeare, coqa, drop) or a task id
from `fp4kit.data.TASKS`. Each record holds

    model, checkpoint_hash, format, method, task, metric, value, n, stderr, device, date, limit, seed, items

so that files from different runs (an original and its quantized versions) can be compared.
`checkpoint_hash` is a SHA-256 over the model's state dict (names, dtypes, shapes and bytes); `items` the per-item 0/1
scores in item order (`scoring.item_string`; None for perplexity and non-binary metrics), which `compare` pairs.
"""

from __future__ import annotations

import datetime
import hashlib
import json

import torch

from fp4kit.data import TASKS, Generation, load_corpus, load_task

from .generation import score_generation
from .perplexity import bos_prefix, perplexity
from .scoring import item_string, mean_stderr, score_multiple_choice

MAX_NEW_TOKENS = {"basic_arithmetic": 16, "gsm8k": 256, "math500": 512, "passkey": 8}


def model_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        t = t.detach().cpu().contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def parse_tasks(spec: str) -> list[str]:
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    for t in tasks:
        if t.startswith("ppl:"):
            continue
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; known: ppl:shakespeare, ppl:coqa, ppl:drop, {', '.join(TASKS)}")
    return tasks


def evaluate(model, tokenizer, tasks: list[str], *, limit: int | None = None, seed: int = 1234, batch_size: int = 16,
             ppl_tokens: int = 16384, context: int = 1024, meta: dict | None = None, progress: bool = True) -> list[dict]:
    torch.manual_seed(seed)
    base = {"model": "?", "checkpoint_hash": model_hash(model), "format": "bf16", "method": "none",
            "device": str(next(model.parameters()).device), "date": datetime.date.today().isoformat(),
            "limit": limit, "seed": seed} | (meta or {})
    records = []
    for task in tasks:
        if task.startswith("ppl:"):
            corpus = task[4:]
            ids = tokenizer(load_corpus(corpus)[: ppl_tokens * 8], return_tensors="pt").input_ids[0][:ppl_tokens]
            ids, prefix = bos_prefix(tokenizer, ids)
            r = perplexity(model, ids, context=context, prefix_token=prefix, desc=task, progress=progress)
            records.append(base | {"task": task, "metric": "perplexity", "value": r.perplexity, "n": r.tokens,
                                   "stderr": None, "context": r.context, "stride": r.stride})
            continue
        items = load_task(task, limit=limit, seed=seed)
        if isinstance(items[0], Generation):
            per = score_generation(model, tokenizer, task, items, batch_size=batch_size, progress=progress,
                                   max_new_tokens=MAX_NEW_TOKENS.get(task, 256), desc=task)
        else:
            per = score_multiple_choice(model, tokenizer, items, batch_size=batch_size, progress=progress, desc=task)
        for metric, values in per.items():
            mean, se = mean_stderr(values)
            records.append(base | {"task": task, "metric": metric, "value": mean, "n": len(values), "stderr": se,
                                   "items": item_string(values)})
    return records


def write_jsonl(records: list[dict], path) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
