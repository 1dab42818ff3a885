"""Asymmetric GPTQ (GPTQConfig.asymmetric): fit Q on the drifted input X~ to the float output X W^T.

The pure function is pinned by its algebra (the least-squares target, the objective's decomposition, the
reduction to GPTQ of the target); the sequential driver by what it collects (layer 0 sees no drift, so it
is plain GPTQ there), by a killed run resuming bit-identically, and by the objective it exists for."""

import json

import pytest
import torch

import fp4kit
from fp4kit.algorithms import GPTQConfig, PTQMethod, PTQRecipe
from fp4kit.algorithms.calibrate import Hessian, apply_gptq, collect_hessians
from fp4kit.algorithms.gptq import asymmetric_target, gptq
from fp4kit.algorithms.sequential import sequential_gptq
from helpers import tiny_llama

G = torch.Generator().manual_seed(11)


def _drifted(tokens=512, K=64, drift=0.3):
    X = torch.randn(tokens, K, generator=G, dtype=torch.float64) @ torch.randn(K, K, generator=G, dtype=torch.float64)
    Xq = X + drift * torch.randn(tokens, K, generator=G, dtype=torch.float64) * X.std(0)
    return X, Xq


def test_target_is_the_least_squares_fit_without_damping():
    X, Xq = _drifted()
    W = torch.randn(24, 64, generator=G, dtype=torch.float64)
    H, delta = Xq.T @ Xq, Xq.T @ (X - Xq)
    got = asymmetric_target(W.float(), H, delta, damp=0.0)
    ref = torch.linalg.lstsq(Xq, X @ W.T).solution.T  # argmin_Q ||X W^T - X~ Q^T||, independent of our algebra
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max())


def test_no_drift_gives_the_weight_back_exactly():
    X, _ = _drifted()
    W = torch.randn(24, 64, generator=G)
    assert torch.equal(asymmetric_target(W, X.T @ X, torch.zeros(64, 64, dtype=torch.float64), damp=0.01), W)


def test_objective_splits_into_gptq_of_the_target():
    """f(Q) + lambda ||Q - W||^2 - tr((W* - Q)(H~ + lambda I)(W* - Q)^T) is the same for every Q: so minimising
    the damped asymmetric objective is minimising GPTQ's objective on W* (the module docstring's claim)."""
    X, Xq = _drifted()
    W = torch.randn(24, 64, generator=G, dtype=torch.float64)
    H, delta = Xq.T @ Xq, Xq.T @ (X - Xq)
    lam = 0.01 * H.diagonal().mean()
    Ws = asymmetric_target(W.float(), H, delta, damp=0.01).double()
    Hd = H + lam * torch.eye(64, dtype=torch.float64)

    def rest(Q):
        f = ((X @ W.T - Xq @ Q.T) ** 2).sum() + lam * ((Q - W) ** 2).sum()
        D = Ws - Q
        return f - ((D @ Hd) * D).sum()

    values = torch.stack([rest(W + 0.1 * torch.randn(24, 64, generator=G, dtype=torch.float64)) for _ in range(5)])
    assert (values - values[0]).abs().max() <= 1e-6 * values[0].abs()


@pytest.mark.parametrize("config", [fp4kit.NVFP4Config(), fp4kit.MXFP4Config()], ids=["nvfp4", "mxfp4"])
def test_asymmetric_gptq_is_gptq_of_the_target_and_fits_the_float_output(config):
    X, Xq = _drifted(K=128)
    W = torch.randn(32, 128, generator=G)
    H, delta = Xq.T @ Xq, Xq.T @ (X - Xq)
    asym = gptq(W, H, config, delta=delta, asymmetric_damp=0.01)
    same = gptq(asymmetric_target(W, H, delta, 0.01), H, config)
    assert torch.equal(asym.data, same.data) and torch.equal(asym.scale.view(torch.uint8), same.scale.view(torch.uint8))

    def f(qt):  # the objective asymmetric calibration is for: the float model's output
        return float(((X @ W.double().T - Xq @ qt.dequantize().double().T) ** 2).sum())

    sym = gptq(W, H, config)
    rtn = config.quantize(W) if hasattr(config, "quantize") else fp4kit.quantize(W, config)
    print(config.name, "asymmetric / symmetric / RTN:", f(asym), f(sym), f(rtn))
    assert f(asym) < 0.8 * f(sym) and f(asym) < f(rtn)


def test_delta_shape_and_finiteness_are_checked():
    W, H = torch.randn(8, 32), torch.eye(32)
    with pytest.raises(ValueError, match="w.weight: delta must be"):
        asymmetric_target(W, H, torch.zeros(16, 16), 0.01, name="w.weight")
    bad = torch.zeros(32, 32)
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="asymmetric delta: 1 NaN"):
        asymmetric_target(W, H, bad, 0.01)


def test_asymmetric_needs_the_float_inputs():
    model = tiny_llama()
    batches = [torch.randint(0, 128, (2, 16), generator=G)]
    hessians = collect_hessians(model, batches, fp4kit.NVFP4Config(), progress=False)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn.*asymmetric needs the float model's inputs"):
        apply_gptq(model, fp4kit.NVFP4Config(), hessians, GPTQConfig(asymmetric=True), progress=False)
    with pytest.raises(ValueError, match="asymmetric needs method gptq or mr-gptq with sequential"):
        PTQRecipe(PTQMethod.GPTQ, gptq=GPTQConfig(asymmetric=True))
    PTQRecipe(PTQMethod.MR_GPTQ, gptq=GPTQConfig(asymmetric=True), sequential=True)  # accepted


def test_add_pair_sums():
    h = Hessian(torch.zeros(4, 4, dtype=torch.float64))
    x, xf = torch.randn(3, 5, 4, generator=G), torch.randn(3, 5, 4, generator=G)
    h.add_pair(x, xf)
    x2, xf2 = x.reshape(-1, 4).double(), xf.reshape(-1, 4).double()
    assert h.tokens == 15 and torch.allclose(h.sum, x2.T @ x2) and torch.allclose(h.delta, x2.T @ (xf2 - x2))
    with pytest.raises(ValueError, match="differ in shape"):
        h.add_pair(x, xf[:, :2])


BATCHES = [torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(7)) for _ in range(3)]


def _layer_state(model, i):
    return {k: v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v
            for k, v in model.model.layers[i].state_dict().items()}


def test_sequential_asymmetric_layer0_is_plain_gptq_and_later_layers_differ():
    config = fp4kit.NVFP4Config()
    sym, asym = tiny_llama(seed=3).float(), tiny_llama(seed=3).float()
    sequential_gptq(sym, BATCHES, config, GPTQConfig(), progress=False)
    sequential_gptq(asym, BATCHES, config, GPTQConfig(asymmetric=True), progress=False)
    a0, b0 = _layer_state(sym, 0), _layer_state(asym, 0)
    assert all(torch.equal(a0[k], b0[k]) for k in a0)  # no quantized layer before it: X~ = X, delta = 0
    a1, b1 = _layer_state(sym, 1), _layer_state(asym, 1)
    assert any(not torch.equal(a1[k], b1[k]) for k in a1 if k.endswith("weight_packed") or k.endswith("weight"))


def test_killed_asymmetric_run_resumes_bit_identically(tmp_path):
    config, opts = fp4kit.NVFP4Config(), GPTQConfig(asymmetric=True)
    whole = tiny_llama(seed=3).float()
    sequential_gptq(whole, BATCHES, config, opts, progress=False)

    class Killed(Exception):
        pass

    def kill(i):
        if i == 0:
            raise Killed

    with pytest.raises(Killed):
        sequential_gptq(tiny_llama(seed=3).float(), BATCHES, config, opts, state_dir=tmp_path, progress=False,
                        on_layer_done=kill)
    assert json.loads((tmp_path / "progress.json").read_text())["done"] == 0
    resumed = tiny_llama(seed=3).float()
    sequential_gptq(resumed, BATCHES, config, opts, state_dir=tmp_path, progress=False)
    for i in range(len(whole.model.layers)):
        a, b = _layer_state(whole, i), _layer_state(resumed, i)
        assert all(torch.equal(a[k], b[k]) for k in a), i
