"""Exact-match generation: greedy completions, cut at stop strings, answers extracted and compared.

Extraction rules (tested on tricky strings in tests/eval/test_extract.py):
    gsm8k             the number after the last "answer is", else the last number in the text
    basic_arithmetic  the first number in the completion (passkey too)
    math500           the last \\boxed{...} (braces balanced), else the text after "answer is"
Numbers are normalized before comparing: thousands separators, "$" and a trailing "." dropped,
and "18.0" equals "18".
"""

from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(t)
    except ValueError:
        return None
    return str(int(v)) if v == int(v) else repr(v)


def _numbers(text: str) -> list[str]:
    return [n for n in (normalize_number(m) for m in _NUMBER.findall(text)) if n is not None]


def extract_gsm8k(text: str) -> str | None:
    tail = text.rsplit("answer is", 1)[-1] if "answer is" in text else text
    nums = _numbers(tail) if "answer is" in text else _numbers(text)
    if not nums:
        return None
    return nums[0] if "answer is" in text else nums[-1]


def extract_first_number(text: str) -> str | None:
    nums = _numbers(text)
    return nums[0] if nums else None


def extract_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return text.rsplit("answer is", 1)[-1].strip().strip("$. ") if "answer is" in text else None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j].strip()
            depth -= 1
    return None


EXTRACTORS = {"gsm8k": extract_gsm8k, "basic_arithmetic": extract_first_number, "math500": extract_boxed,
              "passkey": extract_first_number}


def matches(task: str, prediction: str | None, answer: str) -> bool:
    if prediction is None:
        return False
    if task == "math500":
        return prediction.replace(" ", "") == answer.replace(" ", "")
    return prediction == normalize_number(answer)


def cut_at_stop(text: str, stops) -> str:
    for s in stops:
        k = text.find(s)
        if k >= 0:
            text = text[:k]
    return text


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], stops, *, max_new_tokens: int = 256,
                       batch_size: int = 16, progress: bool = True, desc: str = "generate") -> list[str]:
    """Batched greedy decoding (left-padded), each completion cut at its first stop string."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    outs = []
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
            batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
            gen = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, stop_strings=list(stops), tokenizer=tokenizer)
            texts = tokenizer.batch_decode(gen[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
            outs += [cut_at_stop(t, stops) for t in texts]
    finally:
        tokenizer.padding_side = side
    return outs


def score_generation(model, tokenizer, task: str, items, **kw) -> dict[str, list[float]]:
    completions = greedy_completions(model, tokenizer, [it.prompt for it in items], items[0].stop, **kw)
    extract = EXTRACTORS[task]
    return {"exact_match": [float(matches(task, extract(c), it.answer)) for c, it in zip(completions, items)]}
