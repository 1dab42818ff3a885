"""A random-weight model of Llama-3-8B's shape, built in memory, for speed runs (`llama3-8b-random`).

Speed depends on shapes and bytes, not on what the weights mean, so an 8B model needs no download:
the config below is Llama-3-8B's (32 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 14336,
vocabulary 128256, untied lm_head). Weights are drawn N(0, 0.02) directly on the target device in
bf16 (16 GB on an 80 GB H100), norms are ones, so activations stay finite and greedy decoding
produces varied tokens. `quantize_` then turns it into FP4 on the same device.

No tokenizer: prompts are token ids.
"""

from __future__ import annotations

import torch

LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0,
                 "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                 "bos_token_id": 128000, "eos_token_id": 128001}
RANDOM_MODELS = ("llama3-8b-random",)


def random_llama(device="cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0, **overrides):
    """LlamaForCausalLM of Llama-3-8B's config (with `overrides`), random weights, on `device`, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**LLAMA3_8B, **overrides})
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
    model.generation_config.eos_token_id = None  # speed runs generate the full length
    return model.eval()
