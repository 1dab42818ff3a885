"""SwiGLU clamp (DeepSeek-V4 / gpt-oss stability option) and keeping chosen layers in bf16 through QAT."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama
from torch import nn

from fp4kit.formats import MXFP4Config, NVFP4Config, ScaleRule
from fp4kit.nn import FP4Linear
from fp4kit.nn.fake_quant import FakeQuantLinear, QATConfig, convert, prepare_qat
from fp4kit.nn.swiglu_clamp import ClampedSwiGLU, apply_swiglu_clamp, clip_fraction, reset_clip_counts, swiglu_clamps
from fp4kit.train.moe_upcycle import UpcycleConfig, upcycle_
from fp4kit.train.qat import Loss, TrainConfig, train_qat


def float_tiny(seed=0):
    model = tiny_llama(seed=seed).float()
    with torch.no_grad():  # larger MLP weights, so gate/up outputs reach a few units
        for layer in model.model.layers:
            for p in layer.mlp.parameters():
                p.mul_(40)
    return model


def gate_up_values(model, ids):
    """All gate_proj / up_proj outputs of the model's MLPs on `ids` (two flat tensors)."""
    got = {"gate": [], "up": []}
    hooks = [layer.mlp.gate_proj.register_forward_hook(lambda m, i, o: got["gate"].append(o.detach().flatten()))
             for layer in model.model.layers]
    hooks += [layer.mlp.up_proj.register_forward_hook(lambda m, i, o: got["up"].append(o.detach().flatten()))
              for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return torch.cat(got["gate"]), torch.cat(got["up"])


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def test_identity_when_nothing_exceeds_the_limit():
    model = float_tiny()
    gate, up = gate_up_values(model, IDS)
    limit = float(torch.maximum(gate.max(), up.abs().max())) * 1.01  # above every value
    clamped = copy.deepcopy(model)
    names = apply_swiglu_clamp(clamped, limit)
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert clamped.state_dict().keys() == model.state_dict().keys()  # checkpoints keep their keys
    with torch.no_grad():
        assert torch.equal(clamped(IDS).logits, model(IDS).logits)  # bit for bit
    assert clip_fraction(clamped) == 0.0


def test_clamp_formula_and_counts_when_the_limit_binds():
    model = float_tiny()
    gate, up = gate_up_values(model, IDS)
    limit = float(up.abs().quantile(0.9))
    assert (gate > limit).any() and (gate < -limit).any() and (up < -limit).any()  # all three cases occur
    mlp = model.model.layers[0].mlp
    clamped = ClampedSwiGLU(copy.deepcopy(mlp), limit)
    x = torch.randn(3, 7, 64) * 3
    g, u = mlp.gate_proj(x), mlp.up_proj(x)
    want = mlp.down_proj(F.silu(torch.clamp(g, max=limit)) * torch.clamp(u, -limit, limit))
    with torch.no_grad():
        assert torch.equal(clamped(x), want)
        assert not torch.allclose(clamped(x), mlp(x))  # the clamp changes the function here
    reset_clip_counts(clamped)
    with torch.no_grad():
        clamped(x)
    expected = int((g > limit).sum() + (u.abs() > limit).sum())
    assert int(clamped.clipped) == expected > 0 and int(clamped.seen) == 2 * g.numel()
    assert clamped.clip_fraction() == pytest.approx(expected / (2 * g.numel()))


def keep_grad(store, key):
    """A forward hook that keeps the module's output and its gradient (returns None: output unchanged)."""
    def hook(module, inputs, out):
        out.retain_grad()
        store[key] = out
    return hook


def test_zero_gradient_beyond_the_limit_and_straight_through_inside():
    mlp = float_tiny().model.layers[0].mlp
    limit = 1.5
    clamped = ClampedSwiGLU(mlp, limit)
    outs = {}
    clamped.gate_proj.register_forward_hook(keep_grad(outs, "gate"))
    clamped.up_proj.register_forward_hook(keep_grad(outs, "up"))
    x = torch.randn(4, 9, 64) * 3
    x[:, :3] *= 0.01  # some tokens stay inside the limits everywhere
    clamped(x).square().sum().backward()
    g, u = outs["gate"], outs["up"]
    over_g, over_u = g.detach() > limit, u.detach().abs() > limit
    assert over_g.any() and over_u.any() and (g.detach() < -limit).any()
    assert torch.all(g.grad[over_g] == 0) and torch.all(u.grad[over_u] == 0)
    assert (g.grad[~over_g] != 0).float().mean() > 0.99  # inside (the gate also below -L): gradient flows
    assert (u.grad[~over_u] != 0).float().mean() > 0.99
    # inside the limits the gradient is the plain SwiGLU's
    ref = float_tiny().model.layers[0].mlp
    ref_outs = {}
    ref.gate_proj.register_forward_hook(keep_grad(ref_outs, "gate"))
    ref(x).square().sum().backward()
    rows = ~(over_g | over_u).any(dim=-1)  # tokens with no clamped unit have the same downstream
    assert 0 < int(rows.sum()) < rows.numel()
    torch.testing.assert_close(g.grad[rows], ref_outs["gate"].grad[rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", [NVFP4Config(), MXFP4Config(ScaleRule.RCEIL)], ids=["nvfp4", "mxfp4-rceil"])
def test_prepare_qat_clamps_and_convert_keeps_it(fmt):
    model = float_tiny()
    gate, up = gate_up_values(model, IDS)
    limit = float(up.abs().quantile(0.8))
    prepare_qat(model, QATConfig(fmt, swiglu_clamp=limit))
    mlp = model.model.layers[1].mlp
    assert isinstance(mlp, ClampedSwiGLU) and isinstance(mlp.up_proj, FakeQuantLinear)
    assert mlp.up_proj.layer_name == "model.layers.1.mlp.up_proj"  # names unchanged: fused gate/up still found
    with torch.no_grad():
        fake = model(IDS).logits
    assert clip_fraction(model) > 0.05
    convert(model)
    mlp = model.model.layers[1].mlp
    assert isinstance(mlp, ClampedSwiGLU) and isinstance(mlp.up_proj, FP4Linear) and mlp.limit == limit
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, fake)  # the converted model computes the fake-quant one, clamp included
    unclamped = float_tiny()
    prepare_qat(unclamped, QATConfig(fmt))
    convert(unclamped)
    with torch.no_grad():
        assert not torch.allclose(unclamped(IDS).logits, fake)


def test_upcycled_experts_are_clamped_and_train():
    torch.manual_seed(0)
    teacher = float_tiny()
    student = copy.deepcopy(teacher)
    upcycle_(student, UpcycleConfig(num_experts=2, top_k=1))
    prepare_qat(student, QATConfig(MXFP4Config(ScaleRule.RCEIL), swiglu_clamp=10.0))
    assert sorted(swiglu_clamps(student)) == [f"model.layers.{i}.mlp.experts.{e}" for i in (0, 1) for e in (0, 1)]
    tokens = torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(steps=3, lr=1e-3, warmup_steps=1, batch_size=2, seq_len=16, loss=Loss.KD)
    result = train_qat(student, tokens, cfg, teacher=teacher, progress=False)
    assert torch.isfinite(torch.tensor(result.final_loss))


def test_clamp_errors():
    with pytest.raises(ValueError, match="swiglu_clamp"):
        QATConfig(NVFP4Config(), swiglu_clamp=0.0)
    with pytest.raises(ValueError, match="swiglu_clamp"):
        QATConfig(NVFP4Config(), swiglu_clamp=float("inf"))
    with pytest.raises(ValueError, match="no gated MLP"):
        apply_swiglu_clamp(nn.Sequential(nn.Linear(4, 4)), 10.0)
    with pytest.raises(ValueError, match="not a gated MLP"):
        ClampedSwiGLU(nn.Linear(4, 4), 10.0)
    model = float_tiny()
    apply_swiglu_clamp(model, 5.0)
    assert apply_swiglu_clamp(model, 5.0) == []  # already clamped: nothing new, no error


def test_layers_kept_in_bf16_stay_unquantized_through_training_and_convert():
    model = float_tiny()
    teacher = copy.deepcopy(model).eval()
    report = prepare_qat(model, QATConfig(NVFP4Config(), ignore=("lm_head", "*.layers.1.mlp.*", "*.o_proj")))
    assert report.excluded["model.layers.1.mlp.down_proj"] == "matches ignore pattern '*.layers.1.mlp.*'"
    assert report.excluded["model.layers.0.self_attn.o_proj"] == "matches ignore pattern '*.o_proj'"
    kept = model.model.layers[1].mlp.down_proj
    before = kept.weight.detach().clone()
    tokens = torch.randint(0, 128, (4000,), generator=torch.Generator().manual_seed(2))
    train_qat(model, tokens, TrainConfig(steps=2, lr=1e-3, warmup_steps=1, batch_size=2, seq_len=16, loss=Loss.KD),
              teacher=teacher, progress=False)
    assert not torch.equal(kept.weight, before)  # it trained, in float
    trained = kept.weight.detach().clone()
    convert(model, dtype=torch.bfloat16)
    kept = model.model.layers[1].mlp.down_proj
    assert type(kept) is nn.Linear and kept.weight.dtype == torch.bfloat16
    assert torch.equal(kept.weight, trained.to(torch.bfloat16))
    assert isinstance(model.model.layers[0].mlp.down_proj, FP4Linear)
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
