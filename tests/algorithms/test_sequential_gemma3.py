"""Sequential GPTQ on Gemma-3: each decoder layer runs with its own keyword arguments. Gemma-3 gives its
sliding-window layers other rotary tables and masks than its full-attention layers; running every layer with
layer 0's (the earlier driver) fed the later layers hidden states the model never computes."""

import torch
from safetensors.torch import load_file

import fp4kit
from fp4kit.algorithms.sequential import decoder_layers, sequential_gptq


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           max_position_embeddings=64)
    return Gemma3ForCausalLM(cfg).eval()


def test_sequential_inputs_match_the_quantized_models_own(tmp_path):
    """The hidden states sequential GPTQ hands layer 2 (saved for resuming) are exactly what the finished
    quantized model feeds layer 2 (before the fix: off by up to 3.4 at a max of 5.8)."""
    batches = [torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model = tiny_gemma3()
    handed = {}

    def grab(i):
        if i == 1:
            handed.update(load_file(str(tmp_path / "inputs_0002.safetensors")))

    sequential_gptq(model, batches, fp4kit.NVFP4Config(), state_dir=tmp_path, progress=False, on_layer_done=grab)
    _, layers = decoder_layers(model)
    seen = []
    hook = layers[2].register_forward_pre_hook(
        lambda m, args, kw: seen.append((args[0] if args else kw["hidden_states"]).detach()), with_kwargs=True)
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    assert len(seen) == 3
    for j, x in enumerate(seen):
        assert torch.equal(handed[f"h{j}"], x)
