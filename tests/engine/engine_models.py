"""Tiny random causal LMs for the engine tests: float32, weights large enough that greedy tokens vary."""

import torch

V = 96


def _finish(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15 if "embed" not in name else 1.0)
    return model.eval()


def tiny(kind="llama", seed=0, **over):
    import transformers as tf

    common = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False,
                  "bos_token_id": 1, "eos_token_id": None, "pad_token_id": 0}  # no EOS unless a test sets one
    common.update(over)
    if kind == "llama":
        cfg, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif kind == "qwen3":
        cfg, cls = tf.Qwen3Config(head_dim=16, **common), tf.Qwen3ForCausalLM
    elif kind == "gemma3":
        common.update(num_hidden_layers=3)
        cfg = tf.Gemma3TextConfig(head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                  **common)
        cls = tf.Gemma3ForCausalLM
    elif kind == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                decoder_sparse_step=1, **common)
        cls = tf.Qwen3MoeForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    return _finish(cls._from_config(cfg, dtype=torch.float32), seed)


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
