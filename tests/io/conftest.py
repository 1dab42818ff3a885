import pytest
import torch

import fp4kit


def tiny_llama(tie=True, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=64)
    # built the way load_checkpoint builds models, so non-persistent buffers (rotary) agree
    return LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()


@pytest.fixture(params=["nvfp4", "mxfp4"])
def quantized_tiny(request):
    config = fp4kit.NVFP4Config() if request.param == "nvfp4" else fp4kit.MXFP4Config()
    model = tiny_llama()
    fp4kit.quantize_(model, config, progress=False)
    return model, config
