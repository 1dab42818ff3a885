"""Fake-quant (STE) modules: the gradient passes straight through, and convert() is PTQ bit for bit."""

import copy

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from fp4kit.formats import GlobalScale, MXFP4Config, NVFP4Config, ScaleRule, quantize
from fp4kit.nn import FP4Linear, quantize_
from fp4kit.nn.fake_quant import (FakeQuantLinear, QATConfig, ScaleMode, convert, convert_param, fake_quantize_param,
                                  prepare_qat, quantize_with_scales)

FORMATS = [NVFP4Config(), NVFP4Config.torchao(), MXFP4Config(), MXFP4Config(ScaleRule.RCEIL)]
IDS = ["nvfp4", "nvfp4-torchao", "mxfp4-even", "mxfp4-rceil"]


def same_bytes(a, b):
    assert torch.equal(a.data, b.data)
    assert torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))
    assert (a.global_scale is None) == (b.global_scale is None)
    if a.global_scale is not None:
        assert torch.equal(a.global_scale, b.global_scale)


def trained_tiny(seed=0):
    """A float tiny Llama whose weights moved off their start the way a few optimizer steps would."""
    model = tiny_llama(seed=seed).float()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.003)
    return model


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_ste_gradient_is_identity_on_a_toy_layer(fmt):
    lin = nn.Linear(64, 24)
    x = torch.randn(5, 64, requires_grad=True)
    fq = FakeQuantLinear(copy.deepcopy(lin), QATConfig(fmt))
    w_q = fq.quantized_weight().dequantize(torch.float32)
    assert not torch.equal(w_q, lin.weight)  # the forward really rounds
    ref = nn.Linear(64, 24)
    with torch.no_grad():
        ref.weight.copy_(w_q), ref.bias.copy_(lin.bias)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(5, 24)
    fq(x).backward(g)
    ref(x_ref).backward(g)
    # dL/dw = dL/dw_q exactly (identity), and the input gradient uses the rounded weight
    assert torch.equal(fq.weight.grad, ref.weight.grad)
    assert torch.equal(fq.bias.grad, ref.bias.grad)
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_quantize_with_its_own_scales_gives_the_quantizer_bytes(fmt):
    w = torch.randn(48, 96) * torch.rand(48, 1) * 3
    w[3, :32] = 0  # a zero block
    qt = quantize(w, fmt)
    same_bytes(quantize_with_scales(w, qt), qt)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_convert_with_dynamic_scales_equals_quantize_of_the_final_weights(fmt):
    model = tiny_llama().float()
    prepare_qat(model, QATConfig(fmt))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.003)  # "training"
    ids = torch.randint(0, 128, (2, 9))
    fake_logits = model(ids).logits
    ptq = copy.deepcopy(model)
    for name, m in list(ptq.named_modules()):  # the final master weights as a plain float model
        if isinstance(m, FakeQuantLinear):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            plain.weight, plain.bias = m.weight, m.bias
            parent, _, child = name.rpartition(".")
            setattr(ptq.get_submodule(parent), child, plain)
    ptq_report = quantize_(ptq, fmt, progress=False)
    report = convert(model)
    assert report.quantized == ptq_report.quantized and len(report.quantized) == 14
    ptq_layers = dict(ptq.named_modules())
    for name in report.quantized:
        same_bytes(model.get_submodule(name).quantized_weight(), ptq_layers[name].quantized_weight())
    assert torch.equal(model(ids).logits, fake_logits)  # the fake-quant forward was the FP4 model


def test_fused_siblings_share_the_nvfp4_global_scale_during_training():
    model = tiny_llama().float()
    prepare_qat(model, QATConfig(NVFP4Config()))
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.mul_(3)  # k now holds the group max: q and v must follow it
    g = {c: getattr(attn, c).quantized_weight().global_scale for c in ("q_proj", "k_proj", "v_proj")}
    assert torch.equal(g["q_proj"], g["k_proj"]) and torch.equal(g["v_proj"], g["k_proj"])
    alone = quantize(attn.q_proj.weight.detach(), NVFP4Config()).global_scale
    assert not torch.equal(alone, g["q_proj"])


@pytest.mark.parametrize("fmt", [NVFP4Config(), MXFP4Config(ScaleRule.RCEIL)], ids=["nvfp4", "mxfp4-rceil"])
def test_frozen_scales_from_a_ptq_start_reproduce_it_then_only_codes_move(fmt):
    model = tiny_llama().float()
    name = "model.layers.1.mlp.down_proj"
    w = model.get_submodule(name).weight.detach()
    start = quantize(w * 0.9 + 0.001, fmt)  # stands for a GPTQ result: other codes than RTN of w
    prepare_qat(model, QATConfig(fmt, scales=ScaleMode.FROZEN), start={name: start})
    layer = model.get_submodule(name)
    same_bytes(layer.quantized_weight(), start)  # step 0 computes exactly the PTQ weights
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight) * 0.01)
    moved = layer.quantized_weight()
    assert not torch.equal(moved.data, start.data)
    assert torch.equal(moved.scale.view(torch.uint8), start.scale.view(torch.uint8))
    fake = layer.fake_weight().detach()
    convert(model)
    assert torch.equal(model.get_submodule(name).dequantize_weight(torch.float32), fake)
    same_bytes(model.get_submodule(name).quantized_weight(), moved)


def test_nvfp4_activations_track_input_amax_and_convert_keeps_it():
    model = trained_tiny()
    cfg = QATConfig(NVFP4Config(), activations=NVFP4Config())
    prepare_qat(model, cfg)
    ids = torch.randint(0, 128, (2, 9))
    model.train()
    model(ids)
    model.eval()
    fake_logits = model(ids).logits
    layer = model.model.layers[0].mlp.down_proj
    amax = layer.input_amax.clone()
    assert amax > 0
    convert(model)
    converted = model.model.layers[0].mlp.down_proj
    assert isinstance(converted, FP4Linear) and converted.input_config == NVFP4Config()
    assert torch.equal(model(ids).logits, fake_logits)


def test_prepare_reports_exclusions_and_keeps_parameters():
    model = tiny_llama().float()
    q = model.model.layers[0].self_attn.q_proj.weight
    report = prepare_qat(model, QATConfig(MXFP4Config(), ignore=("lm_head", "*.layers.1.*")))
    assert report.excluded["lm_head"] == "matches ignore pattern 'lm_head'"
    assert "model.layers.1.mlp.up_proj" in report.excluded and len(report.quantized) == 7
    assert model.model.layers[0].self_attn.q_proj.weight is q  # an optimizer made before still holds it
    with pytest.raises(ValueError, match="not being prepared"):
        prepare_qat(tiny_llama().float(), QATConfig(MXFP4Config()), start={"lm_head": quantize(q.detach(), MXFP4Config())})


def test_convert_dtype_and_errors():
    model = trained_tiny()
    prepare_qat(model, QATConfig(NVFP4Config(global_scale=GlobalScale.DECODE)))
    convert(model, dtype=torch.bfloat16)
    up = model.model.layers[0].mlp.up_proj
    assert up.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    assert up.weight_scale.dtype == torch.float8_e4m3fn and up.weight_global_scale.dtype == torch.float32
    assert model(torch.randint(0, 128, (1, 5))).logits.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="no FakeQuantLinear"):
        convert(model)
    with pytest.raises(TypeError, match="QATConfig.weight"):
        QATConfig("nvfp4")
    with pytest.raises(TypeError, match="ScaleMode"):
        QATConfig(NVFP4Config(), scales="frozen")


def test_expert_parameter_fake_quant_and_convert():
    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.randn(3, 64, 96))  # [E, in, out], gpt-oss layout
    fmt = MXFP4Config(ScaleRule.RCEIL)
    fake_quantize_param(experts, "gate_up_proj", fmt, transpose=True)
    master = experts.parametrizations.gate_up_proj.original
    w_q = experts.gate_up_proj
    expect = quantize(master.detach().transpose(-1, -2), fmt).dequantize().transpose(-1, -2)
    assert torch.equal(w_q, expect)
    g = torch.randn_like(w_q)
    (w_q * g).sum().backward()
    assert torch.equal(master.grad, g)  # straight through
    final = master.detach().clone()
    qt = convert_param(experts, "gate_up_proj")
    assert torch.equal(experts.gate_up_proj, expect)
    same_bytes(qt, quantize(final.transpose(-1, -2), fmt))


def mx_tile(span: int, small_code: float):
    """A 128x128 MXFP4 tile: one block at scale 2^0 with a 6, one block at 2^-span holding `small_code`."""
    w = torch.zeros(128, 128)
    w[0, 0] = 6.0
    w[1, 32] = small_code * 2.0**-span
    w[1, 33] = 6.0 * 2.0**-span  # fixes that block's scale at 2^-span
    return quantize(w, MXFP4Config(ScaleRule.RCEIL))


@pytest.mark.parametrize("span,lossless", [(0, True), (13, True), (14, True), (15, False), (20, False)])
def test_fp8_tile_dequant_is_lossless_up_to_a_scale_span_of_14_binades(span, lossless):
    from fp4kit.nn.fake_quant import fp8_tile_check

    check = fp8_tile_check(mx_tile(span, 0.5))  # 0.5 is the smallest nonzero E2M1 value
    assert check.max_scale_span == span and check.tiles == 1
    assert check.lossless is lossless and check.lossy_tiles == (0 if lossless else 1)


def test_fp8_tile_report_per_layer_on_real_shapes():
    from fp4kit.nn.fake_quant import fp8_tile_check, fp8_tile_report

    model = trained_tiny()
    prepare_qat(model, QATConfig(MXFP4Config(ScaleRule.RCEIL)))
    report = fp8_tile_report(model)
    assert len(report) == 14 and all(r.lossless for r in report.values())  # smooth weights: small spans
    convert(model)
    assert fp8_tile_report(model) == report  # the converted layers hold the same FP4 weights
    experts = quantize(torch.randn(3, 200, 96), MXFP4Config(ScaleRule.RCEIL))  # stacked, ragged tiles
    assert fp8_tile_check(experts).tiles == 3 * 2 * 1
