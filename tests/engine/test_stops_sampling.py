"""Stop strings (split across tokens), streaming deltas, and the sampler (greedy, top-k, top-p, seeds)."""

import pytest
import torch
from engine_models import V, hf_greedy, tiny

from fp4kit.engine import Engine, SamplingParams, filter_logits, sample
from fp4kit.engine.sampling import hash32
from fp4kit.engine.text import held_back

ALPHABET = "abcdefghij\n .,"


class CharTokenizer:
    """One character per token id (ids cycle through a small alphabet), so multi-character stop strings
    are always split across tokens."""
    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(ALPHABET[i % len(ALPHABET)] for i in ids)

    def __call__(self, text):
        return {"input_ids": [ALPHABET.index(c) for c in text]}


PROMPT = [1, 5, 9, 20, 3]


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


@pytest.fixture(scope="module")
def engine(llama):
    return Engine(llama, CharTokenizer(), max_batch=4, max_seq_len=64)


def test_stop_string_split_across_tokens(llama, engine):
    ref = hf_greedy(llama, PROMPT, 20)
    full = CharTokenizer().decode(ref)
    stop = full[6:9]  # three tokens' worth of text
    first = full.find(stop)
    out = engine.generate([PROMPT], SamplingParams(max_new_tokens=20, temperature=0, stop=(stop, "never!")))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:first]
    assert out.token_ids == ref[:first + len(stop)]  # up to and including the token that completed it


def test_no_stop_runs_to_length(engine, llama):
    out = engine.generate([PROMPT], SamplingParams(max_new_tokens=10, temperature=0, stop=("zzz",)))[0]
    assert out.finish_reason == "length" and out.text == CharTokenizer().decode(hf_greedy(llama, PROMPT, 10))


def test_stream_deltas_add_up_to_the_text_and_never_show_the_stop(engine, llama):
    full = CharTokenizer().decode(hf_greedy(llama, PROMPT, 20))
    stop = full[6:9]
    seen = []
    outs = engine.generate([PROMPT, [7, 8]], SamplingParams(max_new_tokens=20, temperature=0, stop=(stop,)),
                           stream=lambda i, tok, delta: seen.append((i, delta)))
    for i, o in enumerate(outs):
        streamed = "".join(d for j, d in seen if j == i)
        assert streamed == o.text
    assert stop not in "".join(d for j, d in seen if j == 0)


def test_held_back_tail():
    assert held_back("abc\n", ("\n\n",)) == 1
    assert held_back("abc", ("\n\n",)) == 0
    assert held_back("ab\ufffd", ()) == 1
    assert held_back("xyAns", ("Answer:",)) == 3


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    greedy = engine.generate([PROMPT], SamplingParams(max_new_tokens=8, temperature=0))[0].token_ids
    for p in (SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1, seed=3),
              SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=4)):
        assert engine.generate([PROMPT], p)[0].token_ids == greedy


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    p = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)
    a = [o.token_ids for o in engine.generate([PROMPT, PROMPT], p)]
    b = [o.token_ids for o in engine.generate([PROMPT, PROMPT], p)]
    c = [o.token_ids for o in engine.generate([PROMPT, PROMPT], SamplingParams(max_new_tokens=16, seed=8))]
    assert a == b and a != c and a[0] != a[1]


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, 0, 0.8))  # 0.5 + 0.3 reaches 0.8: two tokens
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(filter_logits(logits, 0, 0.81))
    assert kept.tolist() == [[True, True, True, False]]


def test_sample_frequencies_follow_temperature():
    """20000 rows (each its own key) of one distribution: the Gumbel-max draws follow softmax(logits / T)."""
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(20000, 1)
    freq = torch.bincount(sample(logits, SamplingParams(temperature=1.0), seed=0, slot=3), minlength=3) / 20000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.015, rtol=0)
    hot = torch.softmax(torch.log(torch.tensor([0.7, 0.2, 0.1])) / 0.5, 0)  # temperature 0.5 sharpens
    freq = torch.bincount(sample(logits, SamplingParams(temperature=0.5), seed=1, slot=3), minlength=3) / 20000
    torch.testing.assert_close(freq, hot, atol=0.015, rtol=0)
    freq = torch.bincount(sample(logits, SamplingParams(temperature=1.0, top_k=2), seed=2, slot=3), minlength=3)
    torch.testing.assert_close(freq / 20000, torch.tensor([0.7 / 0.9, 0.2 / 0.9, 0.0]), atol=0.015, rtol=0)


def test_sampler_draws_are_a_function_of_seed_slot_and_row():
    logits = torch.randn(64, 500)
    p = SamplingParams(temperature=1.0)
    a = sample(logits, p, seed=5, slot=9)
    assert torch.equal(a, sample(logits, p, seed=torch.tensor([5]), slot=torch.tensor([9])))  # ints or tensors
    assert not torch.equal(a, sample(logits, p, seed=5, slot=10))  # each step draws afresh
    assert not torch.equal(a, sample(logits, p, seed=6, slot=9))
    rows = torch.arange(100, 164)
    b = sample(logits, p, seed=5, slot=9, rows=rows)
    assert torch.equal(b[10:20], sample(logits[10:20], p, seed=5, slot=9, rows=rows[10:20]))  # rows are independent


def test_hash32_is_lowbias32():
    def ref(v):  # the C reference in uint32 arithmetic
        m = 0xFFFFFFFF
        v ^= v >> 16
        v = (v * 0x7FEB352D) & m
        v ^= v >> 15
        v = (v * 0x846CA68B) & m
        return v ^ (v >> 16)

    xs = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 123456789, 3735928559]
    assert hash32(torch.tensor(xs)).tolist() == [ref(x) for x in xs]


def test_bad_sampling_params_are_named():
    for kw, word in [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                     ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"), ({"stop": ("",)}, "stop")]:
        with pytest.raises(ValueError, match=word):
            SamplingParams(**kw)
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert V > len(ALPHABET)
