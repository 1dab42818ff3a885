"""Reward functions on tricky strings: separators, signs, periods, \\boxed{}, several numbers, None."""

from decimal import Decimal

import pytest

from fp4kit.train.rewards import (
    GSM8K_FINAL_LINE, NUMBER_ONLY, AccuracyReward, Extraction, extract_answer, numbers, parse_number, task_rewards,
)

FINAL, FIRST = Extraction.FINAL, Extraction.FIRST


@pytest.mark.parametrize("text,want", [
    ("1,234", "1234"), ("-5", "-5"), ("\u22125", "-5"), ("42.", "42"), ("18.00", "18"), ("$1,000.50", "1000.5"),
    ("0.5", "0.5"), ("abc", None), ("1,2", None),
])
def test_parse_number(text, want):
    assert parse_number(text) == (None if want is None else Decimal(want))


def test_numbers_keep_lists_apart_and_join_thousands():
    assert numbers("1,2,3 and 1,234 and -7") == [1, 2, 3, 1234, -7]
    assert numbers("v2 x3 7") == [7]  # digits glued to a word are not numbers


@pytest.mark.parametrize("text,want", [
    ("So she pays 18 + 2 = 20 dollars.\n#### 20", "20"),
    ("#### 1,234.", "1234"),
    ("It is 5. #### -3", "-3"),
    ("Thus \\boxed{\\frac{1}{2}} hmm \\boxed{7}.", "7"),
    ("We get \\boxed{x = 12}", "12"),
    ("The answer is 12, not 13.", "12"),
    ("3 apples and 4 pears make 7", "7"),
    ("The answer is -42.", "-42"),
    ("no digits here", None),
    ("#### none", None),
])
def test_extract_final(text, want):
    assert extract_answer(text, FINAL) == (None if want is None else Decimal(want))


@pytest.mark.parametrize("text,want", [(" 55", "55"), (" -11\nCalculate 3 + 4 = 7", "-11"), (" 1,000 or so", "1000"),
                                       ("", None)])
def test_extract_first(text, want):
    assert extract_answer(text, FIRST) == (None if want is None else Decimal(want))


def test_accuracy_reward_trl_convention():
    r = AccuracyReward(FIRST)
    out = r(prompts=["p"] * 4, completions=[" 55", " 55.0", " 56", " -55"], answer=["55", "55", "55", "-55"], id=[1] * 4)
    assert out == [1.0, 1.0, 0.0, 1.0]
    assert r(prompts=["p"], completions=["5"]) == [None]  # no answer column: does not apply
    assert r(prompts=["p", "p"], completions=["5", "5"], answer=[None, "5"]) == [None, 1.0]
    with pytest.raises(ValueError, match="not a number"):
        r(prompts=["p"], completions=["5"], answer=["five"])


def test_format_rewards():
    assert NUMBER_ONLY(prompts=None, completions=[" 55", "-3.", "55 apples", "1,234", ""]) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert GSM8K_FINAL_LINE(prompts=None, completions=["a\nb\n#### 7", "#### 7 dollars", "7"]) == [1.0, 0.0, 0.0]


def test_task_rewards():
    funcs, w = task_rewards("basic_arithmetic", format_weight=0.5)
    assert [f.__name__ for f in funcs] == ["accuracy_first", "format_number_only"] and w == [1.0, 0.5]
    assert len(task_rewards("gsm8k")[0]) == 1
    with pytest.raises(ValueError, match="no verifiable reward"):
        task_rewards("hellaswag")
