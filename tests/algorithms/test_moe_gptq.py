"""GPTQ for fused MoE experts: per-expert Hessians from routed tokens, GPTQ beats RTN on its objective,
experts without tokens fall back to exactly the RTN weights, the end-to-end recipe and export."""

import pytest
import torch
from helpers import tiny_moe

import fp4kit
from fp4kit.algorithms import PTQMethod, PTQRecipe, apply_ptq
from fp4kit.algorithms.moe_gptq import (eligible_experts, expert_hook, expert_weight_error, gptq_experts,
                                        new_expert_hessians)
from fp4kit.nn import FP4Experts

CONFIGS = [fp4kit.NVFP4Config(), fp4kit.MXFP4Config()]


def _experts(kind="mixtral"):
    model = tiny_moe(kind)
    name, module = next(iter(eligible_experts(model, CONFIGS[0]).items()))
    return model, name, module


def _route(module, tokens=96, live=4, seed=0):
    """Call the experts module directly with every token routed (top-2) among experts 0..live-1 only."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, module.gate_up_proj.shape[2], generator=g)
    index = torch.stack([torch.randperm(live, generator=g)[:2] for _ in range(tokens)])
    weights = torch.full((tokens, 2), 0.5)
    return hidden, index, weights


def test_hessians_are_those_of_the_routed_tokens():
    _, _, module = _experts()
    h = new_expert_hessians(module, torch.float64, None)
    handle = expert_hook(module, h)
    hidden, index, weights = _route(module)
    with torch.no_grad():
        module(hidden, index, weights)
    handle.remove()
    i = module.gate_up_proj.shape[1] // 2
    for e in range(module.gate_up_proj.shape[0]):
        x = hidden[(index == e).any(-1)]  # the expert's tokens, found independently of the hook
        assert h.gate_up[e].tokens == x.shape[0]
        torch.testing.assert_close(h.gate_up[e].sum, x.double().T @ x.double())
        gu = x @ module.gate_up_proj[e].T  # the intermediate in the model's dtype, as the expert computes it
        z = (module.act_fn(gu[:, :i]) * gu[:, i:]).double()
        torch.testing.assert_close(h.down[e].sum, z.T @ z)
    assert sum(h.tokens) == index.numel()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_gptq_beats_rtn_and_idle_experts_get_exactly_rtn(config):
    _, name, module = _experts()
    h = new_expert_hessians(module, torch.float64, None)
    handle = expert_hook(module, h)
    with torch.no_grad():
        module(*_route(module, tokens=128, live=4))
    handle.remove()
    qts = gptq_experts(module, config, h, name=name)
    rtn = FP4Experts.from_experts(module, config, name=name)
    rtn_qts = {e: (rtn.gate_up(e), rtn.down(e)) for e in range(4)}  # NVFP4: gate and up share a global scale
    ours = FP4Experts.from_experts(module, config, name=name, weights=qts)
    for e in range(4, 8):  # no tokens reached these: weight-only, bit for bit what quantize_ gives them
        assert torch.equal(ours.gate_up_packed[e], rtn.gate_up_packed[e])
        assert torch.equal(ours.down_scale[e].view(torch.uint8), rtn.down_scale[e].view(torch.uint8))
    err_gptq = expert_weight_error(module, {e: qts[e] for e in range(4)}, h)
    err_rtn = expert_weight_error(module, rtn_qts, h)
    for e in range(4):
        assert err_gptq[e] < err_rtn[e], (e, err_gptq[e], err_rtn[e])
    assert sum(err_gptq) < 0.9 * sum(err_rtn)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_recipe_gptq_quantizes_experts_and_exports(kind, tmp_path):
    from fp4kit.io import load_checkpoint, save_checkpoint

    model = tiny_moe(kind, dtype=torch.bfloat16)
    reference = tiny_moe(kind, dtype=torch.bfloat16)
    batches = [torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    report = apply_ptq(model, fp4kit.NVFP4Config(), PTQRecipe(PTQMethod.GPTQ), batches=batches, progress=False)
    fp4kit.quantize_(reference, fp4kit.NVFP4Config(), progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, FP4Experts)]
    assert names and set(names) <= set(report.quantized)
    differs = [not torch.equal(model.get_submodule(n).gate_up_packed, reference.get_submodule(n).gate_up_packed)
               for n in names]
    assert all(differs)  # GPTQ, not RTN, decided the expert codes
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before = model(ids).logits
    save_checkpoint(model, tmp_path / "moe", progress=False)
    loaded, _, _ = load_checkpoint(tmp_path / "moe")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_precomputed_expert_weights_must_fit():
    _, name, module = _experts()
    qts = gptq_experts(module, fp4kit.MXFP4Config(), None, name=name)
    with pytest.raises(ValueError, match=r"\.0\.gate_up_proj"):
        FP4Experts.from_experts(module, fp4kit.NVFP4Config(), name=name, weights=qts)
