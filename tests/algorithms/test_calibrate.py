"""Calibration driver: Hessians are sum x^T x, hooks come off, GPTQ beats RTN on a tiny Llama.

Measured 2026-11-22 on CPU: tiny random Llama (tests/helpers.tiny_llama), calibration 4 x 8 x 64
random tokens, evaluation on 8 x 64 other random tokens; relative logit error against bf16:

              RTN      GPTQ     GPTQ act_order + scale search
    nvfp4     0.0754   0.0578   0.0552
    mxfp4     0.0848   0.0700   0.0665

The test asserts GPTQ's error below 0.80 x RTN's for NVFP4 (measured 0.77) and 0.85 x for MXFP4
(measured 0.83).
"""

import copy

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from fp4kit.algorithms import GPTQConfig, ScaleSearchConfig
from fp4kit.algorithms.calibrate import (CalibrationConfig, Hessian, apply_gptq, apply_scale_search, collect_hessians,
                                        eligible_linears, sibling_groups)
from fp4kit.algorithms.gptq import gptq
from fp4kit.formats import MXFP4Config, NVFP4Config, quantize
from fp4kit.nn import FP4Linear, quantize_
from fp4kit.nn.quantize import shared_amax

RATIO_CEILING = {"nvfp4": 0.80, "mxfp4": 0.85}


class TwoPaths(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x):
        return self.used(x)


def test_hessian_is_sum_of_x_transpose_x():
    model = TwoPaths()
    xs = [torch.randn(3, 5, 32), torch.randn(2, 4, 32)]
    hs = collect_hessians(model, xs, NVFP4Config(), calibration=CalibrationConfig(torch.float64), progress=False)
    X = torch.cat([x.reshape(-1, 32) for x in xs]).double()
    assert torch.allclose(hs["used"].sum, X.T @ X, rtol=1e-12, atol=1e-12)
    assert hs["used"].tokens == 23 and hs["unused"].tokens == 0


def test_hooks_are_removed_even_when_a_batch_fails():
    model = TwoPaths()
    with pytest.raises(RuntimeError):
        collect_hessians(model, [torch.randn(2, 32), torch.randn(2, 7)], NVFP4Config(), progress=False)
    assert not model.used._forward_pre_hooks and not model.unused._forward_pre_hooks


def test_layer_without_tokens_is_weight_only_and_listed():
    model = TwoPaths()
    w_unused = model.unused.weight.detach().clone()
    hs = collect_hessians(model, [torch.randn(64, 32)], NVFP4Config(), progress=False)
    result = apply_gptq(model, NVFP4Config(), hs, progress=False)
    assert result.weight_only == {"unused": "no calibration tokens reached it"}
    assert set(result.output_error) == {"used"} and result.report.quantized == ["used", "unused"]
    assert torch.equal(model.unused.weight_packed, quantize(w_unused, NVFP4Config()).data)
    assert "weight-only unused" in result.summary()


def test_failure_names_the_layer_and_leaves_the_model_untouched():
    model = TwoPaths()
    hs = collect_hessians(model, [torch.randn(64, 32)], NVFP4Config(), progress=False)
    hs["used"].sum.fill_(float("nan"))
    with pytest.raises(ValueError, match="used.weight Hessian"):
        apply_gptq(model, NVFP4Config(), hs, progress=False)
    assert type(model.used) is nn.Linear and type(model.unused) is nn.Linear


@pytest.fixture(scope="module")
def llama_and_data():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (8, 64), generator=g) for _ in range(4)]
    test = torch.randint(0, 128, (8, 64), generator=g)
    with torch.no_grad():
        ref = model(test).logits.float()
    hessians = collect_hessians(model, calib, MXFP4Config(), progress=False)  # same layers for NVFP4 (K = 64, 96)
    return model, hessians, test, ref


def logit_error(model, test, ref):
    with torch.no_grad():
        return float((model(test).logits.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("config", [NVFP4Config(), MXFP4Config()], ids=["nvfp4", "mxfp4"])
def test_gptq_logits_closer_to_float_than_rtn(llama_and_data, config):
    base, hessians, test, ref = llama_and_data
    rtn, model = copy.deepcopy(base), copy.deepcopy(base)
    quantize_(rtn, config, progress=False)
    result = apply_gptq(model, config, hessians, progress=False)
    assert all(isinstance(model.get_submodule(n), FP4Linear) for n in result.report.quantized)
    assert len(result.output_error) == 14 and not result.weight_only
    ratio = logit_error(model, test, ref) / logit_error(rtn, test, ref)
    assert ratio < RATIO_CEILING[config.name], ratio


def test_act_order_with_scale_search_runs_on_the_llama(llama_and_data):
    base, hessians, test, ref = llama_and_data
    rtn, model = copy.deepcopy(base), copy.deepcopy(base)
    quantize_(rtn, NVFP4Config(), progress=False)
    apply_gptq(model, NVFP4Config(), hessians, GPTQConfig(act_order=True, scale_search=ScaleSearchConfig()), progress=False)
    assert logit_error(model, test, ref) < 0.80 * logit_error(rtn, test, ref)


def test_calibration_config_is_validated():
    with pytest.raises(ValueError, match="CalibrationConfig.accumulate_dtype"):
        CalibrationConfig(torch.bfloat16)


def test_fused_siblings_share_the_nvfp4_global_scale(llama_and_data):
    base, hessians, _, _ = llama_and_data
    model = copy.deepcopy(base)
    apply_gptq(model, NVFP4Config(), hessians, progress=False)
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight_global_scale, attn.k_proj.weight_global_scale)
    assert torch.equal(attn.q_proj.weight_global_scale, attn.v_proj.weight_global_scale)


def test_apply_scale_search_logits_closer_than_rtn(llama_and_data):
    """Measured 2026-11-22: NVFP4 relative logit error 0.0754 (RTN) -> 0.0648 (ratio 0.86). MXFP4 got
    0.0848 -> 0.0869: its +0.03 dB weight SQNR gain does not carry to this model's logits (not asserted)."""
    base, _, test, ref = llama_and_data
    rtn, model = copy.deepcopy(base), copy.deepcopy(base)
    quantize_(rtn, NVFP4Config(), progress=False)
    report = apply_scale_search(model, NVFP4Config(), progress=False)
    assert report.excluded == {"lm_head": "matches ignore pattern 'lm_head'"} and len(report.quantized) == 14
    ratio = logit_error(model, test, ref) / logit_error(rtn, test, ref)
    assert ratio < 0.88, ratio


def test_siblings_with_equal_hessians_are_grouped(llama_and_data):
    base, hessians, _, _ = llama_and_data
    layers = eligible_linears(base, NVFP4Config())
    groups = sibling_groups(layers, hessians)
    p = "model.layers.0."
    assert [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"] in groups
    assert [p + "mlp.gate_proj", p + "mlp.up_proj"] in groups and [p + "self_attn.o_proj"] in groups
    assert sorted(n for g in groups for n in g) == sorted(layers) and len(groups) == 2 * 4
    changed = dict(hessians)  # a sibling whose Hessian differs (e.g. its own random-sign rotation) stands alone
    changed[p + "self_attn.k_proj"] = Hessian(hessians[p + "self_attn.k_proj"].sum * 2, hessians[p + "self_attn.k_proj"].tokens)
    groups = sibling_groups(layers, changed)
    assert [p + "self_attn.q_proj"] in groups and [p + "self_attn.k_proj"] in groups


@pytest.mark.parametrize("opts", [GPTQConfig(), GPTQConfig(act_order=True, scale_search=ScaleSearchConfig())],
                         ids=["rtn-scales", "act-order+mse"])
@pytest.mark.parametrize("config", [NVFP4Config(), MXFP4Config()], ids=["nvfp4", "mxfp4"])
def test_group_gptq_equals_one_gptq_per_layer(llama_and_data, config, opts):
    """One sweep over the stacked q/k/v (gate/up) rows gives each layer the codes, scales and global scale
    of its own GPTQ run with the group's shared amax (rows are independent in GPTQ)."""
    base, hessians, _, _ = llama_and_data
    model = copy.deepcopy(base)
    layers = eligible_linears(base, config)
    amax = shared_amax(list(layers.items())) if isinstance(config, NVFP4Config) else {}
    expect = {n: gptq(m.weight.detach(), hessians[n].sum, config, act_order=opts.act_order,
                      scale_search_config=opts.scale_search, amax=amax.get(n), name=n) for n, m in layers.items()}
    apply_gptq(model, config, hessians, opts, progress=False)
    for n, qt in expect.items():
        got = model.get_submodule(n)
        assert torch.equal(got.weight_packed, qt.data), n
        assert torch.equal(got.weight_scale, qt.scale), n
        if qt.global_scale is not None:
            assert torch.equal(got.weight_global_scale.reshape(()), qt.global_scale.reshape(())), n
