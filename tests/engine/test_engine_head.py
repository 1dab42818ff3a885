"""The quantized output heads (`Engine(lm_head="nvfp4" | "int8")`): a copy of lm_head's weight, the model untouched."""

import copy

import pytest
import torch
from engine_models import hf_greedy, tiny
from torch import nn

from fp4kit.engine import Engine, HeadFormat, SamplingParams
from fp4kit.engine.bench import engine_weight_bytes, weight_bytes
from fp4kit.formats import Int8Config, NVFP4Config, quantize

PROMPTS = [[1, 5, 9, 20, 3], [7, 8]]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)


def _head_twin(model, config=NVFP4Config()):
    """A copy whose lm_head is an nn.Linear holding the dequantized weight (what the engine's copy computes)."""
    twin = copy.deepcopy(model)
    w = quantize(model.lm_head.weight.detach(), config).dequantize(torch.float32)
    head = nn.Linear(w.shape[1], w.shape[0], bias=False)
    head.weight.data.copy_(w)
    twin.lm_head = head
    return twin


@pytest.mark.parametrize("fused", [True, False])
def test_fp4_head_equals_the_dequantized_twin(fused):
    model = tiny("llama", seed=3)
    before = model.lm_head.weight.detach().clone()
    outs = Engine(model, max_batch=2, max_seq_len=48, lm_head="nvfp4", fused=fused).generate(PROMPTS, GREEDY)
    twin = _head_twin(model)
    assert [o.token_ids for o in outs] == [hf_greedy(twin, p, 10) for p in PROMPTS]
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, before)  # the model is untouched


def test_fp4_head_changes_logits_and_default_does_not():
    model = tiny("llama", seed=3)
    ids = [1, 5, 9, 20, 3, 7]
    base = Engine(model, max_batch=1, max_seq_len=32).prompt_logits(ids)
    fp4 = Engine(model, max_batch=1, max_seq_len=32, lm_head=HeadFormat.NVFP4).prompt_logits(ids)
    ref = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(base, ref, rtol=1e-4, atol=1e-4)
    err = ((fp4 - base).norm() / base.norm()).item()
    assert 0 < err < 0.2, err  # NVFP4 RTN of a random head: a few percent


def test_tied_embedding_stays_and_bytes_count_the_copy():
    model = tiny("llama", seed=1, tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    embed = model.get_input_embeddings().weight.detach().clone()
    eng = Engine(model, max_batch=1, max_seq_len=32, lm_head="nvfp4")
    eng.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, temperature=0))
    assert torch.equal(model.get_input_embeddings().weight, embed)
    qt = eng.runner.head_copy().qt
    # tied: the full bf16/fp32 embedding no longer counts (the step reads only its rows), the FP4 copy does
    assert engine_weight_bytes(eng) == weight_bytes(model) - embed.numel() * embed.element_size() + qt.nbytes
    untied = tiny("llama", seed=1)
    eng = Engine(untied, max_batch=1, max_seq_len=32, lm_head="nvfp4")
    w = untied.lm_head.weight
    assert engine_weight_bytes(eng) == weight_bytes(untied) - w.numel() * w.element_size() + eng.runner.head_copy().qt.nbytes
    assert engine_weight_bytes(Engine(untied, max_batch=1, max_seq_len=32)) == weight_bytes(untied)


def test_fp4_head_is_rebuilt_after_an_in_place_change():
    model = tiny("llama", seed=3)
    eng = Engine(model, max_batch=2, max_seq_len=48, lm_head="nvfp4")
    eng.generate(PROMPTS, GREEDY)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    outs = eng.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [hf_greedy(_head_twin(model), p, 10) for p in PROMPTS]


def test_head_format_is_validated():
    with pytest.raises(ValueError, match="bogus"):
        Engine(tiny("llama"), max_batch=1, max_seq_len=16, lm_head="bogus")


@pytest.mark.parametrize("fused", [True, False])
def test_int8_head_equals_the_dequantized_twin(fused):
    model = tiny("llama", seed=5)
    before = model.lm_head.weight.detach().clone()
    eng = Engine(model, max_batch=2, max_seq_len=48, lm_head=HeadFormat.INT8, fused=fused)
    outs = eng.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [hf_greedy(_head_twin(model, Int8Config()), p, 10) for p in PROMPTS]
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, before)
    qt = eng.runner.head_copy().qt
    assert isinstance(qt.config, Int8Config) and qt.data.dtype == torch.int8
    w = model.lm_head.weight
    assert engine_weight_bytes(eng) == weight_bytes(model) - w.numel() * w.element_size() + qt.nbytes


def test_int8_head_is_closer_than_nvfp4():
    model = tiny("llama", seed=3)
    ids = [1, 5, 9, 20, 3, 7]
    base = Engine(model, max_batch=1, max_seq_len=32).prompt_logits(ids)
    err = {}
    for head in ("int8", "nvfp4"):
        logits = Engine(model, max_batch=1, max_seq_len=32, lm_head=head).prompt_logits(ids)
        err[head] = ((logits - base).norm() / base.norm()).item()
    assert 0 < err["int8"] < 0.02 and err["int8"] < err["nvfp4"] / 4, err


def test_quantize_head_errors_name_the_problem():
    from fp4kit.engine.fused import quantize_head

    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_head(nn.Linear(16, 32), "model")
    with pytest.raises(TypeError, match="lm_head is a Sequential; a quantized copy needs a plain nn.Linear"):
        quantize_head(nn.Sequential(nn.Linear(16, 32)), "int8")
    copy_ = quantize_head(nn.Linear(16, 32, bias=True), "int8")
    assert isinstance(copy_.qt.config, Int8Config) and copy_.bias is not None and copy_.qt.shape == (32, 16)
