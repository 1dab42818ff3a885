"""Shared test helpers (imported as `helpers`; conftest files hold fixtures only)."""

import os

import torch


def odd_shapes():
    """Shapes with odd leading dims and last dims that are multiples of 32 but not powers of two."""
    return [(1, 32), (3, 96), (17, 160), (2, 5, 64), (33, 224)]


def wide_range(shape, generator=None, lo=-30, hi=30):
    """Values spanning 10^lo..10^hi in magnitude, both signs: extreme ranges for codec tests."""
    mag = torch.empty(shape).uniform_(lo, hi, generator=generator)
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    return sign * torch.pow(10.0, mag) * torch.rand(shape, generator=generator)


IN_CI = os.environ.get("CI") == "true"


def tiny_llama(tie=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=64)
    # built the way load_checkpoint builds models, so non-persistent buffers (rotary) agree
    return LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()


def hide_package(monkeypatch, name):
    """Make importlib.util.find_spec report `name` as not installed (for missing-package errors)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


def tiny_moe(kind="qwen3_moe", seed=0, dtype=torch.float32, experts=8, top_k=2):
    """A tiny transformers MoE model (Qwen3-MoE or Mixtral) with fused 3-D expert parameters."""
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        cfg = Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32, num_experts=experts,
                             num_experts_per_tok=top_k, head_dim=16, decoder_sparse_step=1, mlp_only_layers=[])
        model = Qwen3MoeForCausalLM._from_config(cfg, dtype=dtype)
    elif kind == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        cfg = MixtralConfig(**common, intermediate_size=32, num_local_experts=experts, num_experts_per_tok=top_k)
        model = MixtralForCausalLM._from_config(cfg, dtype=dtype)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # _from_config leaves 3-D expert params uninitialised on some versions
        for name, p in model.named_parameters():
            if p.dim() == 3:
                p.normal_(0, 0.05)
    return model.eval()


def tiny_llama_folder(folder, *, seed=0):
    """A tiny random Llama with the embedded SmolLM2 tokenizer, saved as a Hugging Face folder (CLI tests)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fp4kit.io.models import EMBEDDED, resolve

    src = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src.folder, gguf_file=EMBEDDED["smollm2-135m"].gguf_name)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
