"""GPTQ for W4A4 with Hessians of the rounded inputs (`GPTQConfig.rounded_inputs`).

A W4A4 layer multiplies its input after rounding it to FP4, so the Hessian GPTQ should use is the one of
the rounded inputs. These tests pin that `apply_ptq` computes exactly the pure function on that Hessian,
for NVFP4 (static global input scale from the observed amax) and MXFP4 activations, with and without
the rotation, and that the option is refused where there is nothing to round.
"""

import copy

import pytest
import torch
from torch import nn

from fp4kit.algorithms import GPTQConfig, Hessian, PTQMethod, PTQRecipe, RotationConfig, apply_ptq, gptq
from fp4kit.algorithms.calibrate import input_rounding
from fp4kit.formats import MXFP4Config, NVFP4Config, nvfp4_global_scale, quantize_mxfp4, quantize_nvfp4
from fp4kit.nn import FP4Linear
from fp4kit.nn.rotation import RotatedLinear


def _round(x, config, amax):
    if isinstance(config, NVFP4Config):
        return quantize_nvfp4(x, config, global_scale=nvfp4_global_scale(amax, config)).dequantize(x.dtype)
    return quantize_mxfp4(x, config).dequantize(x.dtype)


@pytest.mark.parametrize("config", [NVFP4Config(), MXFP4Config()], ids=lambda c: c.name)
@pytest.mark.parametrize("method", [PTQMethod.GPTQ, PTQMethod.MR_GPTQ])
def test_w4a4_gptq_uses_the_hessian_of_the_rounded_inputs(config, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    batches = [torch.randn(8, 64) * torch.linspace(0.1, 4, 64) for _ in range(3)]
    rot = RotationConfig(32)
    twin = RotatedLinear.from_linear(copy.deepcopy(model[0]), rot) if method is PTQMethod.MR_GPTQ else model[0]
    W = twin.weight.detach().clone()  # (W R for MR-GPTQ) before apply_ptq swaps the layer
    seen = [twin.rotate(b) if method is PTQMethod.MR_GPTQ else b for b in batches]  # what the weight multiplies
    amax = torch.stack([s.abs().amax() for s in seen]).amax()
    H_round, H_float = Hessian(torch.zeros(64, 64)), Hessian(torch.zeros(64, 64))
    for s in seen:
        H_round.add(_round(s, config, amax))
        H_float.add(s)
    assert not torch.equal(H_round.sum, H_float.sum)  # the rounding changes the Hessian here
    recipe = PTQRecipe(method, rot if method is PTQMethod.MR_GPTQ else None, gptq=GPTQConfig(rounded_inputs=True))
    apply_ptq(model, config, recipe, batches=batches, activations=config, progress=False)
    assert isinstance(model[0], FP4Linear) and model[0].input_config == config
    assert recipe.gptq.rounded_inputs  # MR-GPTQ's added scale search keeps the option
    expect = gptq(W, H_round.sum, config, scale_search_config=recipe.gptq.scale_search)
    got = model[0].quantized_weight()
    assert torch.equal(got.data, expect.data)
    assert torch.equal(got.scale.view(torch.uint8), expect.scale.view(torch.uint8))


def test_input_rounding_matches_the_layers_own_input_rounding():
    # the Hessian's rounding is FP4Linear.quantize_input's, bit for bit
    torch.manual_seed(1)
    x = torch.randn(5, 64) * 3
    for config in (NVFP4Config(), MXFP4Config()):
        model = nn.Sequential(nn.Linear(64, 16, bias=False))
        amax = {"0": x.abs().amax()}
        apply_ptq(model, config, PTQRecipe(PTQMethod.RTN), activations=config,
                  input_amax=amax if isinstance(config, NVFP4Config) else None, progress=False)
        fn = input_rounding(config, amax, ["0"])["0"]
        assert torch.equal(fn(x), model[0].quantize_input(x))


def test_rounded_inputs_needs_activations_and_a_gptq_method():
    model = nn.Sequential(nn.Linear(64, 16, bias=False))
    batches = [torch.randn(4, 64)]
    with pytest.raises(ValueError, match="rounded_inputs"):
        apply_ptq(model, NVFP4Config(), PTQRecipe(PTQMethod.GPTQ, gptq=GPTQConfig(rounded_inputs=True)),
                  batches=batches, progress=False)
    with pytest.raises(ValueError, match="rounded_inputs"):
        apply_ptq(model, NVFP4Config(), PTQRecipe(PTQMethod.RTN, gptq=GPTQConfig(rounded_inputs=True)),
                  batches=batches, activations=NVFP4Config(), progress=False)
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], FP4Linear)  # nothing half-done
