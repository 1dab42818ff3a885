"""Verifiable rewards for GRPO: exact numeric answers and answer format, in TRL's calling convention.

A reward function is any callable

    reward(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float | None]

with one entry per completion, where `columns` are the dataset's other fields (here `answer`),
repeated to line up with the completions. `None` means "this reward does not apply here"; a
completion for which every reward says None gets advantage 0 (TRL's rule). Several rewards combine
as a weighted sum (`GRPOConfig.reward_weights`).

Answer extraction (the part that decides whether a model is "right") is strict about numbers and
loose about their dress:

    FINAL   (GSM8K)             the number after the last "####", else inside the last \\boxed{...},
                                else the first number after the last "answer is", else the last number
    FIRST   (basic_arithmetic)  the first number of the completion (the model continues "Calculate 18 + 37 =")

Numbers may carry thousands separators (1,234), a sign (-5, or the Unicode minus), a currency sign,
a trailing period ("is 42.") and trailing zeros ("18.00" equals "18"); they are compared as exact
decimals, never as floats. "1,2,3" is three numbers, not 123 (a separator needs groups of three).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from enum import Enum

_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_BOXED = "\\boxed{"


class Extraction(Enum):
    """Where the answer sits in a completion: FINAL (GSM8K-style reasoning) or FIRST (a bare continuation)."""

    FINAL = "final"
    FIRST = "first"


def parse_number(text: str) -> Decimal | None:
    """'1,234.50' -> Decimal('1234.5'); '-5.' -> -5; anything not a single number -> None."""
    t = text.strip().rstrip(".").strip()
    if not _NUMBER.fullmatch(t):
        return None
    t = t.replace("\u2212", "-").replace("$", "").replace(",", "")
    try:
        value = Decimal(t)
    except InvalidOperation:
        return None
    return value.normalize() if value.is_finite() else None


def numbers(text: str) -> list[Decimal]:
    """All numbers in `text`, in order of appearance."""
    return [n for n in (parse_number(m) for m in _NUMBER.findall(text)) if n is not None]


def boxed_content(text: str) -> str | None:
    """The text inside the last \\boxed{...}, braces balanced; None when there is none or it is unclosed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 0, start + len(_BOXED)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j]
            depth -= 1
    return None


def extract_answer(text: str, mode: Extraction = Extraction.FINAL) -> Decimal | None:
    """The number a completion commits to, by the rules in the module docstring."""
    if mode is Extraction.FIRST:
        found = numbers(text)
        return found[0] if found else None
    if "####" in text:
        found = numbers(text.rsplit("####", 1)[1])
        return found[0] if found else None
    boxed = boxed_content(text)
    if boxed is not None:
        found = numbers(boxed)
        return found[-1] if found else None
    if "answer is" in text:
        found = numbers(text.rsplit("answer is", 1)[1])
        if found:
            return found[0]
    found = numbers(text)
    return found[-1] if found else None


def is_correct(completion: str, answer: str, mode: Extraction = Extraction.FINAL) -> bool:
    truth = parse_number(answer)
    if truth is None:
        raise ValueError(f"reference answer {answer!r} is not a number")
    got = extract_answer(completion, mode)
    return got is not None and got == truth


class AccuracyReward:
    """1.0 when the extracted number equals the `answer` column exactly, else 0.0; None without an answer."""

    def __init__(self, mode: Extraction = Extraction.FINAL):
        self.mode = mode
        self.__name__ = f"accuracy_{mode.value}"

    def __call__(self, prompts, completions, answer=None, **columns) -> list[float | None]:
        if answer is None:
            return [None] * len(completions)
        return [None if a is None else float(is_correct(c, str(a), self.mode)) for c, a in zip(completions, answer)]


class FormatReward:
    """1.0 when the completion matches `pattern` (re.fullmatch on the stripped text), else 0.0."""

    def __init__(self, pattern: str, name: str):
        self.pattern = re.compile(pattern, re.DOTALL)
        self.__name__ = f"format_{name}"

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return [float(self.pattern.fullmatch(c.strip()) is not None) for c in completions]


# a bare number (what "Calculate 18 + 37 =" should be continued with); GSM8K's "... #### 72"
NUMBER_ONLY = FormatReward(r"[-\u2212]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\.?", "number_only")
GSM8K_FINAL_LINE = FormatReward(r".*####\s*[-\u2212]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\.?", "final_line")


def task_rewards(task: str, format_weight: float = 0.0) -> tuple[list, list[float]]:
    """(reward functions, weights) for a bundled task: exact answer, plus answer format if weighted."""
    if task == "basic_arithmetic":
        funcs = [AccuracyReward(Extraction.FIRST), NUMBER_ONLY]
    elif task == "gsm8k":
        funcs = [AccuracyReward(Extraction.FINAL), GSM8K_FINAL_LINE]
    else:
        raise ValueError(f"no verifiable reward for task {task!r}; GRPO tasks: basic_arithmetic, gsm8k")
    if format_weight == 0.0:
        return funcs[:1], [1.0]
    return funcs, [1.0, format_weight]
