"""FP4Experts: fused MoE experts (transformers 5 layout) quantized expert by expert."""

import copy

import pytest
import torch

import fp4kit
from fp4kit.formats import nvfp4_global_scale, quantize, sqnr_db
from fp4kit.nn import FP4Experts, is_fused_experts
from helpers import tiny_moe

CONFIGS = {"nvfp4": fp4kit.NVFP4Config(), "mxfp4": fp4kit.MXFP4Config()}


def experts_of(model, layer=0):
    return model.model.layers[layer].mlp.experts


@pytest.mark.parametrize("scheme", CONFIGS)
def test_each_expert_is_the_core_quantizer_of_its_weights(scheme):
    config = CONFIGS[scheme]
    ref = experts_of(tiny_moe())
    fp4 = FP4Experts.from_experts(ref, config)
    for e in range(ref.gate_up_proj.shape[0]):
        expect = quantize(ref.gate_up_proj[e].detach(), config)
        assert torch.equal(fp4.gate_up_packed[e], expect.data)
        assert torch.equal(fp4.gate_up_scale[e].view(torch.uint8), expect.scale.view(torch.uint8))
        down = quantize(ref.down_proj[e].detach(), config)
        assert torch.equal(fp4.down_packed[e], down.data)
        if scheme == "nvfp4":  # gate and up share the global scale of their joint amax, as vLLM's w13 needs
            g = nvfp4_global_scale(ref.gate_up_proj[e].detach().abs().amax(), config)
            assert torch.equal(fp4.gate_up_global_scale[e], torch.stack([g, g]).reshape(2))
            assert torch.equal(fp4.down_global_scale[e], down.global_scale.reshape(()))


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("scheme", CONFIGS)
def test_forward_equals_float_module_on_dequantized_weights(kind, scheme):
    ref = experts_of(tiny_moe(kind))
    fp4 = FP4Experts.from_experts(ref, CONFIGS[scheme])
    with torch.no_grad():
        ref.gate_up_proj.copy_(torch.stack([fp4.dequantized(e, torch.float32)[0] for e in range(8)]))
        ref.down_proj.copy_(torch.stack([fp4.dequantized(e, torch.float32)[1] for e in range(8)]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 64, generator=g)
    idx = torch.randint(0, 6, (13, 2), generator=g)  # experts 6 and 7 get no token
    idx[:, 1] = (idx[:, 0] + 1) % 6
    w = torch.rand(13, 2, generator=g)
    torch.testing.assert_close(fp4(x, idx, w), ref(x, idx, w), rtol=0, atol=1e-6)


def test_expert_without_tokens_still_has_weight_derived_scales():
    model = tiny_moe()
    fp4kit.quantize_(model, CONFIGS["nvfp4"], progress=False)
    fp4 = experts_of(model)
    for e in range(fp4.num_experts):  # every expert, routed or not, round-trips at FP4 quality
        orig = experts_of(tiny_moe()).gate_up_proj[e].detach()
        assert sqnr_db(orig, fp4.dequantized(e, torch.float32)[0]) > 17


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_quantize_reports_and_swaps_experts(kind):
    model = tiny_moe(kind)
    report = fp4kit.quantize_(model, CONFIGS["nvfp4"], progress=False)
    assert {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"} <= set(report.quantized)
    assert isinstance(experts_of(model), FP4Experts) and not any(is_fused_experts(m) for m in model.modules()
                                                                   if not isinstance(m, FP4Experts))


def test_quantized_moe_model_tracks_the_float_model():
    model = tiny_moe()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        fp4kit.quantize_(model, CONFIGS["nvfp4"], progress=False)
        out = model(ids).logits
    assert sqnr_db(ref, out) > 15


def test_ignore_pattern_keeps_experts_in_float():
    model = tiny_moe()
    report = fp4kit.quantize_(model, CONFIGS["nvfp4"], ignore=("lm_head", "model.layers.1.mlp.experts"),
                              progress=False)
    assert "ignore pattern" in report.excluded["model.layers.1.mlp.experts"]
    assert not isinstance(experts_of(model, 1), FP4Experts) and isinstance(experts_of(model, 0), FP4Experts)


def test_nan_in_an_expert_names_it_and_leaves_model_untouched():
    model = tiny_moe()
    with torch.no_grad():
        experts_of(model, 1).down_proj[5, 3, 7] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.down_proj"):
        fp4kit.quantize_(model, CONFIGS["nvfp4"], progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k], ) or k.endswith("down_proj")
                                                 for k in before)
    assert not any(isinstance(m, FP4Experts) for m in model.modules())


def test_activation_quantization_of_experts_is_refused_clearly():
    model = tiny_moe()
    with pytest.raises(ValueError, match="fused MoE experts"):
        fp4kit.quantize_(model, CONFIGS["mxfp4"], activations=CONFIGS["mxfp4"], progress=False)


def test_block_size_mismatch_is_an_exclusion():
    model = tiny_moe()
    report = fp4kit.quantize_(model, fp4kit.MXFP4Config(), progress=False)  # width 32 fits MXFP4's 32
    assert "model.layers.0.mlp.experts" in report.quantized
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=48, moe_intermediate_size=24,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                         num_experts_per_tok=2, head_dim=16)
    odd = Qwen3MoeForCausalLM._from_config(cfg)
    report = fp4kit.quantize_(odd, fp4kit.NVFP4Config(), progress=False)
    assert "not divisible by block size 16" in report.excluded["model.layers.0.mlp.experts"]


@pytest.mark.parametrize("scheme", CONFIGS)
def test_kernel_path_matches_reference_path(scheme):
    """The grouped MoE kernel wired to FP4Experts' buffers (run by the Triton interpreter on CPU, natively
    on CUDA) computes what the reference loop computes, within the GEMM tolerance of fp4kit.kernels."""
    fp4 = FP4Experts.from_experts(experts_of(tiny_moe(dtype=torch.bfloat16)), CONFIGS[scheme])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fp4 = fp4.to(device)
    assert fp4.kernel_ready()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, generator=g).bfloat16().to(device)
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(5)]).to(device)
    w = torch.rand(5, 2, generator=g).to(device)
    ref = fp4.forward_reference(x, idx, w).float()
    out = fp4.forward_kernel(x, idx, w).float()
    err = (out - ref).abs().max() / ref.abs().max()
    rms = (out - ref).square().mean().sqrt() / ref.square().mean().sqrt()
    assert err < 2e-2 and rms < 1e-2, (err, rms)
