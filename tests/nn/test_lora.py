"""LoRA adapters: identity at init, the low-rank formula, FP4 bases, freezing, and PEFT-compatible export."""

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from fp4kit import NVFP4Config, quantize_
from fp4kit.nn import FP4Linear
from fp4kit.nn.lora import LoRAConfig, LoRALinear, add_lora, adapter_state_dict, load_adapter, save_adapter


def _randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_fresh_adapter_leaves_function_unchanged():
    lin = nn.Linear(32, 48)
    x = torch.randn(3, 5, 32)
    ref = lin(x)
    lora = LoRALinear(lin, rank=4, alpha=8)
    torch.testing.assert_close(lora(x), ref, rtol=0, atol=0)


def test_formula_matches_explicit_update():
    lin = nn.Linear(32, 48, bias=False)
    lora = LoRALinear(lin, rank=4, alpha=8)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(7, 32)
    delta = lora.lora_B @ lora.lora_A * (8 / 4)  # [out, in]
    torch.testing.assert_close(lora(x), x @ (lin.weight + delta).t(), rtol=1e-5, atol=1e-5)


def test_fp4_base_frozen_and_grads_reach_adapter_only():
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    fp4 = FP4Linear.from_linear(lin, NVFP4Config())
    lora = LoRALinear(fp4, rank=2, alpha=4)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    base_out = fp4(x)
    lora(x).float().sum().backward()
    assert lora.lora_A.grad is None or lora.lora_A.grad.abs().sum() == 0  # B = 0: no gradient into A yet
    assert lora.lora_B.grad.abs().sum() > 0
    assert fp4.bias.grad is None
    torch.testing.assert_close(lora(x), base_out, rtol=0, atol=0)


def test_add_lora_wraps_targets_and_freezes_rest():
    model = tiny_llama()
    quantize_(model, NVFP4Config(), progress=False)
    report = add_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8, dropout=0.0)
    assert report.wrapped == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{w}.lora_{ab}" for w in report.wrapped for ab in "AB")
    assert isinstance(model.model.layers[0].self_attn.q_proj.base, FP4Linear)


def test_train_norms_and_unknown_target():
    model = tiny_llama()
    report = add_lora(model, config=LoRAConfig(targets=("q_proj",), rank=2, train_norms=True))
    assert "model.norm" in report.trainable_norms and len(report.trainable_norms) == 5
    with pytest.raises(ValueError, match="matches no"):
        add_lora(tiny_llama(), ["qproj"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, ["q_proj"], rank=2, alpha=2)


def test_config_validation():
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout=1.0)


def test_export_loads_in_peft_with_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama().float()
    add_lora(model, config=LoRAConfig(targets=("q_proj", "down_proj"), rank=4, alpha=8, train_norms=True))
    _randomize_b(model)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    ids = torch.randint(0, 128, (2, 9))
    ours = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_llama().float(), tmp_path / "adapter").eval()(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    keys = set(adapter_state_dict(model))
    assert keys == set(peft.get_peft_model_state_dict(
        peft.PeftModel.from_pretrained(tiny_llama().float(), tmp_path / "adapter")))


def test_save_load_roundtrip(tmp_path):
    a = tiny_llama()
    add_lora(a, ["q_proj"], rank=2, alpha=4)
    _randomize_b(a)
    save_adapter(a, tmp_path / "ad")
    b = tiny_llama()
    add_lora(b, ["q_proj"], rank=2, alpha=4)
    load_adapter(b, tmp_path / "ad")
    for k, v in adapter_state_dict(a).items():
        assert torch.equal(adapter_state_dict(b)[k], v), k
    c = tiny_llama()
    add_lora(c, ["v_proj"], rank=2, alpha=4)
    with pytest.raises(ValueError, match="do not match"):
        load_adapter(c, tmp_path / "ad")


def test_input_gradient_through_fp4_base_equals_dequantized_autograd():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    lora = LoRALinear(FP4Linear.from_linear(lin, NVFP4Config()), rank=2, alpha=4)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(5, 32, dtype=torch.bfloat16)
    (gx,) = torch.autograd.grad(lora(x), x, g)
    w = lora.base.dequantize_weight(torch.bfloat16).float()
    delta = (lora.lora_B.float() @ lora.lora_A.float()) * lora.scaling
    want = g.float() @ (w + delta)
    torch.testing.assert_close(gx.float(), want, rtol=2e-2, atol=2e-2)  # bf16 products, differently rounded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton FP4 GEMM (no backward of its own) runs on CUDA")
def test_input_gradient_passes_the_cuda_kernel():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).to(torch.bfloat16).cuda()
    lora = LoRALinear(FP4Linear.from_linear(lin, NVFP4Config()), rank=4, alpha=8)
    x = torch.randn(16, 256, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    g = torch.randn(16, 128, dtype=torch.bfloat16, device="cuda")
    (gx,) = torch.autograd.grad(lora(x), x, g)
    want = g.float() @ lora.base.dequantize_weight(torch.bfloat16).float()  # B = 0: the base alone
    torch.testing.assert_close(gx.float(), want, rtol=2e-2, atol=5e-2)
