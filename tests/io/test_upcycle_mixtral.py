"""Upcycling a dense Llama into a transformers Mixtral: same function, per-expert FP4 export round trip."""

import pytest
import torch
from helpers import tiny_llama

import fp4kit
from fp4kit.io import load_checkpoint, save_checkpoint
from fp4kit.io.upcycle import MixtralUpcycle, upcycle_to_mixtral
from fp4kit.nn import FP4Experts


def _float_llama(tie=True):
    return tiny_llama(tie=tie).float()


@pytest.mark.parametrize("tie", [True, False])
def test_identical_experts_compute_the_dense_function(tie):
    dense = _float_llama(tie)
    moe = upcycle_to_mixtral(dense, MixtralUpcycle(num_experts=4, top_k=2, router_std=1.0))
    assert type(moe).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = dense(ids).logits, moe(ids).logits
    # renormalised top-k weights sum to 1 up to float32 rounding, so the two differ by rounding only
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
    if tie:
        assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()


def test_noise_makes_experts_differ_and_routing_matters():
    dense = _float_llama()
    moe = upcycle_to_mixtral(dense, MixtralUpcycle(num_experts=4, top_k=1, noise=0.1, router_std=1.0, seed=3))
    w = moe.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(w[0], w[1])
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert not torch.allclose(dense(ids).logits, moe(ids).logits, atol=1e-4)


def test_fp4_export_round_trip(tmp_path):
    # built in bf16 from the start: .to(bfloat16) afterwards would also round the rotary inv_freq buffer,
    # which load_checkpoint builds in float32
    moe = upcycle_to_mixtral(tiny_llama(), MixtralUpcycle(num_experts=4, top_k=2, noise=0.05))
    fp4kit.quantize_(moe, fp4kit.NVFP4Config(), progress=False)
    assert isinstance(moe.model.layers[0].mlp.experts, FP4Experts)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = moe(ids).logits
    save_checkpoint(moe, tmp_path / "out", progress=False)
    from safetensors import safe_open

    with safe_open(next((tmp_path / "out").glob("*.safetensors")), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight_packed" in keys  # vLLM's Mixtral names
    loaded, _, _ = load_checkpoint(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_bad_inputs():
    with pytest.raises(ValueError, match="top_k"):
        MixtralUpcycle(num_experts=2, top_k=3)
    dense = _float_llama()
    fp4kit.quantize_(dense, fp4kit.NVFP4Config(), progress=False)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp"):
        upcycle_to_mixtral(dense)
