"""Answer extraction on tricky strings."""

import pytest

from fp4kit.eval.generation import cut_at_stop, extract_boxed, extract_first_number, extract_gsm8k, matches


@pytest.mark.parametrize("text,expected", [
    ("She has 3 apples and buys 5 more. So the answer is 8.", "8"),
    ("Total is $1,234.00. So the answer is $1,234.", "1234"),
    ("First 12, then 7 ... the answer is -4 dollars", "-4"),
    ("We get 3 + 4 = 7 and then 7 * 2 = 14", "14"),       # no "answer is": last number
    ("The answer is 2.5 hours", "2.5"),
    ("So the answer is 18.0", "18"),
    ("no digits here", None),
])
def test_gsm8k(text, expected):
    assert extract_gsm8k(text) == expected


@pytest.mark.parametrize("text,expected", [(" 96\nCalculate", "96"), (" -42", "-42"), (" = 1,000", "1000"),
                                           (" nothing", None)])
def test_first_number(text, expected):
    assert extract_first_number(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{\\frac{1}{2}} is it", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\left(3,\\frac{\\pi}{2}\\right)}", "\\left(3,\\frac{\\pi}{2}\\right)"),
    ("The final answer is $5$.", "5"),
    ("\\boxed{unclosed", None),
])
def test_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_matches_normalizes_numbers():
    assert matches("gsm8k", "1234", "1,234") and not matches("gsm8k", None, "3")
    assert matches("math500", "\\frac{1}{2}", "\\frac{1} {2}")


def test_cut_at_stop():
    assert cut_at_stop("42\n\nQuestion: next", ("\n\n", "Question:")) == "42"
