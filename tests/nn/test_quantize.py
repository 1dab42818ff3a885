"""quantize_: swaps modules, reports what it quantized and what it excluded and why."""

import pytest
import torch
from torch import nn

from fp4kit.formats import MXFP4Config, NVFP4Config
from fp4kit.nn import FP4Linear, quantize_


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.blocks = nn.ModuleList([nn.ModuleDict({"up": nn.Linear(64, 128), "down": nn.Linear(128, 64)})
                                     for _ in range(2)])
        self.odd = nn.Linear(40, 64)
        self.lm_head = nn.Linear(64, 10, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["down"](torch.relu(b["up"](h)))
        return self.lm_head(h)


def test_report_lists_every_linear_once():
    model = Tiny()
    report = quantize_(model, NVFP4Config(), progress=False)
    assert report.quantized == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert report.excluded == {"odd": "in_features 40 not divisible by block size 16",
                               "lm_head": "matches ignore pattern 'lm_head'"}
    assert "excluded odd" in report.summary()


def test_modules_are_swapped_not_patched():
    model = Tiny()
    original_forward = nn.Linear.forward
    quantize_(model, MXFP4Config(), progress=False)
    assert isinstance(model.blocks[0]["up"], FP4Linear)
    assert type(model.lm_head) is nn.Linear and nn.Linear.forward is original_forward


def test_model_still_runs_and_stays_close():
    model = Tiny().eval()
    ids = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        ref = model(ids)
        quantize_(model, NVFP4Config(), progress=False)
        out = model(ids)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 0.15


def test_filter_fn_excludes_with_reason():
    model = Tiny()
    report = quantize_(model, NVFP4Config(), filter_fn=lambda m, name: "down" not in name, progress=False)
    assert report.excluded["blocks.0.down"] == "filter_fn returned False"
    assert "blocks.0.up" in report.quantized


def test_ignore_patterns_glob():
    model = Tiny()
    report = quantize_(model, NVFP4Config(), ignore=("blocks.1.*",), progress=False)
    assert "blocks.1.up" in report.excluded and "lm_head" in report.quantized


def test_nan_weight_raises_with_layer_name():
    model = Tiny()
    with torch.no_grad():
        model.blocks[1]["down"].weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.1\.down\.weight: 1 NaN"):
        quantize_(model, NVFP4Config(), progress=False)
    assert type(model.blocks[0]["up"]) is nn.Linear  # nothing was swapped


def test_rejects_non_fp4_config():
    from fp4kit.formats import FP8Config

    with pytest.raises(TypeError):
        quantize_(Tiny(), FP8Config(), progress=False)


def test_fused_siblings_share_global_scale():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 32)
            self.o_proj = nn.Linear(64, 64)

    attn = Attn()
    with torch.no_grad():
        attn.k_proj.weight *= 10  # k holds the group max
    quantize_(attn, NVFP4Config(), progress=False)
    g = [m.weight_global_scale.item() for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert g[0] == g[1] == g[2] != attn.o_proj.weight_global_scale.item()


def test_moe_w1_w3_share_global_scale_but_w2_does_not():
    """Mixtral-style experts as nn.Linear (w1 gate, w3 up, w2 down): vLLM fuses w1/w3 into one w13."""
    experts = nn.ModuleList()
    for _ in range(2):
        e = nn.Module()
        e.w1, e.w2, e.w3 = nn.Linear(64, 96, bias=False), nn.Linear(96, 64, bias=False), nn.Linear(64, 96, bias=False)
        experts.append(e)
    with torch.no_grad():
        experts[0].w3.weight *= 8
    quantize_(experts, NVFP4Config(), progress=False)
    g = lambda m: m.weight_global_scale.item()  # noqa: E731
    assert g(experts[0].w1) == g(experts[0].w3) != g(experts[0].w2)
    assert g(experts[1].w1) == g(experts[1].w3) != g(experts[0].w1)  # per expert, not across experts
