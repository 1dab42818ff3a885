"""Scoring against hand-computed cases on a bigram model whose logits are a fixed table."""

import math

import pytest
import torch
from torch import nn

from fp4kit.data import MultipleChoice
from fp4kit.eval import loglikelihoods, mean_stderr, multiple_choice_metrics, perplexity, score_multiple_choice
from fp4kit.eval.scoring import Scored

VOCAB = "abcd xyz"


class CharTokenizer:
    """One token per character; no special tokens."""

    class Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, return_tensors=None):
        ids = [VOCAB.index(c) for c in text]
        return self.Out(torch.tensor([ids]) if return_tensors == "pt" else ids)


class Bigram(nn.Module):
    """logits[t] = TABLE[token t]: p(next | prev) is a known softmax row."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(len(VOCAB), len(VOCAB), generator=g) * 2)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def hand_ll(model, context, continuation):
    logp = torch.log_softmax(model.table.detach(), dim=-1)
    text = context + continuation
    ll, greedy = 0.0, True
    for i in range(len(context), len(text)):
        prev, nxt = VOCAB.index(text[i - 1]), VOCAB.index(text[i])
        ll += logp[prev, nxt].item()
        greedy &= bool(logp[prev].argmax() == nxt)
    return ll, greedy


PAIRS = [("ab", "cd"), ("a", "b"), ("dcba x", "yz"), ("zz", " a b c"), ("x", "xxxxxxx")]


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_loglikelihood_matches_hand_computation(batch_size):
    model = Bigram()
    got = loglikelihoods(model, CharTokenizer(), PAIRS, batch_size=batch_size, progress=False)
    for (c, x), s in zip(PAIRS, got):
        ll, greedy = hand_ll(model, c, x)
        assert s.loglikelihood == pytest.approx(ll, abs=1e-5) and s.is_greedy == greedy and s.tokens == len(x)


def test_batching_and_padding_do_not_change_scores():
    model = Bigram()
    a = loglikelihoods(model, CharTokenizer(), PAIRS, batch_size=1, progress=False)
    b = loglikelihoods(model, CharTokenizer(), PAIRS, batch_size=5, progress=False)
    assert [s.loglikelihood for s in a] == pytest.approx([s.loglikelihood for s in b], abs=1e-6)


def test_greedy_continuation_is_detected():
    model = Bigram()
    logp = torch.log_softmax(model.table.detach(), -1)
    best = VOCAB[int(logp[VOCAB.index("a")].argmax())]
    s = loglikelihoods(model, CharTokenizer(), [("a", best)], progress=False)[0]
    assert s.is_greedy


def test_acc_and_acc_norm_follow_lm_eval_definitions():
    item = MultipleChoice("t/0", ("q",) * 2, (" short", " a much longer one"), gold=1)
    # raw: choice 0 wins (-3 > -6); per character: -3/6 = -0.5 < -6/18 = -0.333, so choice 1 wins
    scores = [[Scored(-3.0, False, 5), Scored(-6.0, False, 17)]]
    m = multiple_choice_metrics([item], scores)
    assert m == {"acc": [0.0], "acc_norm": [1.0]}


def test_single_choice_acc_is_greedy():
    item = MultipleChoice("l/0", ("ctx",), (" word",), 0)
    assert multiple_choice_metrics([item] * 2, [[Scored(-1, True, 1)], [Scored(-1, False, 1)]]) == {"acc": [1.0, 0.0]}


def test_partial_scoring_reports_acc_only():
    item = MultipleChoice("w/0", ("A went", "B went"), (" home", " home"), 0)
    assert set(multiple_choice_metrics([item], [[Scored(-1, 0, 1), Scored(-2, 0, 1)]])) == {"acc"}


def test_score_multiple_choice_end_to_end_deterministic():
    model = Bigram()
    items = [MultipleChoice(f"t/{i}", ("ab",) * 3, ("cd", "xy", " a"), i % 3) for i in range(6)]
    a = score_multiple_choice(model, CharTokenizer(), items, progress=False)
    b = score_multiple_choice(model, CharTokenizer(), items, progress=False, batch_size=4)
    assert a == b and len(a["acc"]) == 6


def test_mean_stderr_is_sample_std_over_sqrt_n():
    mean, se = mean_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and se == pytest.approx(math.sqrt((3 * 0.0625 + 0.5625) / 3 / 4))


def test_perplexity_matches_hand_computation_and_counts_tokens():
    model = Bigram()
    text = "abcd xyzabcd xyz"
    ids = torch.tensor(CharTokenizer()(text).input_ids)
    r = perplexity(model, ids, context=len(ids), progress=False)
    ll, _ = hand_ll(model, text[0], text[1:])
    assert r.tokens == len(text) - 1 and r.perplexity == pytest.approx(math.exp(-ll / (len(text) - 1)), rel=1e-5)


def test_perplexity_sliding_window_scores_each_token_once():
    ids = torch.tensor(CharTokenizer()("abcd xyz" * 4).input_ids)
    r = perplexity(Bigram(), ids, context=8, stride=4, progress=False)
    assert r.tokens == len(ids) - 1  # overlapping windows: every token after the first, once
    with pytest.raises(ValueError, match="stride"):
        perplexity(Bigram(), ids, context=4, stride=8, progress=False)


def test_perplexity_with_prefix_scores_every_token_and_matches_hand():
    model = Bigram()
    text = "abcd xyzabcd"
    ids = torch.tensor(CharTokenizer()(text).input_ids)
    prefix = VOCAB.index(" ")
    r = perplexity(model, ids, context=5, prefix_token=prefix, progress=False)  # 4 text tokens per window
    logp = torch.log_softmax(model.table.detach(), -1)
    ll = 0.0
    for k, ch in enumerate(text):  # each window restarts from the prefix
        prev = prefix if k % 4 == 0 else VOCAB.index(text[k - 1])
        ll += logp[prev, VOCAB.index(ch)].item()
    assert r.tokens == len(text) and r.perplexity == pytest.approx(math.exp(-ll / len(text)), rel=1e-5)


def test_item_string_and_paired_stderr_by_hand():
    from fp4kit.eval import item_string, paired_stderr

    assert item_string([1.0, 0.0, True, 0]) == "1010"
    assert item_string([0.5, 1.0]) is None
    # differences (0, -1, 0, 0): mean -0.25, sample variance (3 * 0.0625 + 0.5625) / 3 = 0.25, se sqrt(0.25 / 4)
    assert paired_stderr("1000", "1100") == pytest.approx(0.25)
    assert paired_stderr("1100", "1100") == 0.0
    assert paired_stderr("100", "1100") is None and paired_stderr(None, "1100") is None
