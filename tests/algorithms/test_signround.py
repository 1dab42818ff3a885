"""SignRound: the learned quantizer starts at RTN's bytes, exports exactly, learns (block loss falls below RTN's
and the model lands closer than GPTQ's on a tiny Llama), is deterministic, resumes, composes with rotations,
and handles Gemma-3's per-layer-type kwargs."""

import pytest
import torch
from helpers import tiny_llama

import fp4kit
from fp4kit.algorithms import (
    GPTQConfig,
    PTQMethod,
    PTQRecipe,
    ScaleSearchConfig,
    apply_ptq,
    scale_search,
)
from fp4kit.algorithms.sequential import sequential_gptq
from fp4kit.algorithms.signround import (
    SignRoundConfig,
    capture_layer_inputs,
    export,
    fake_quantize,
    sequential_signround,
    sign_step,
)
from fp4kit.nn import FP4Linear

CONFIGS = {"nvfp4": fp4kit.NVFP4Config(), "nvfp4-decode": fp4kit.NVFP4Config.torchao(), "mxfp4": fp4kit.MXFP4Config()}
G = torch.Generator().manual_seed(3)
CALIB = [torch.randint(0, 128, (1, 32), generator=G) for _ in range(8)]
TEST = torch.randint(0, 128, (4, 32), generator=G)
CALIB_16X64 = [torch.randint(0, 128, (1, 64), generator=G) for _ in range(16)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster than two, and leaves the other core to a parallel test run."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weight(shape=(24, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[:, 5] *= 20  # an outlier column spreads the block scales
    return w


def _params(W, block, V_seed=None):
    N, K = W.shape
    if V_seed is None:
        return torch.zeros(N, K), torch.ones(N, K // block)
    g = torch.Generator().manual_seed(V_seed)
    return torch.rand(N, K, generator=g) - 0.5, 0.5 + 0.5 * torch.rand(N, K // block, generator=g)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_offset_and_unit_alpha_give_rtn_bytes(name):
    config = CONFIGS[name]
    W = _weight()
    rtn = fp4kit.quantize(W, config)
    V, alpha = _params(W, config.block_size)
    qt = export(W, V, alpha, rtn)
    assert torch.equal(qt.data, rtn.data)
    assert torch.equal(qt.scale.view(torch.uint8), rtn.scale.view(torch.uint8))
    assert torch.equal(fake_quantize(W, V, alpha, rtn), rtn.dequantize())


def test_zero_offset_from_searched_scales_gives_their_bytes():
    config = fp4kit.NVFP4Config()
    W = _weight(seed=1)
    init = scale_search(W, config, ScaleSearchConfig())
    V, alpha = _params(W, config.block_size)
    assert torch.equal(export(W, V, alpha, init).data, init.data)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_learned_quantizer_exports_exactly_with_valid_scales(name):
    """Any V, alpha: the exported QuantizedTensor dequantizes to the forward pass's weight, bit for bit, and its
    scales are the format's: UE4M3 codes (finite, > 0) under the unchanged global scale, or E8M0 codes <= 254."""
    config = CONFIGS[name]
    W = _weight(seed=2)
    init = fp4kit.quantize(W, config)
    V, alpha = _params(W, config.block_size, V_seed=5)
    qt = export(W, V, alpha, init)
    assert torch.equal(qt.dequantize(), fake_quantize(W, V, alpha, init))
    if isinstance(config, fp4kit.NVFP4Config):
        assert qt.scale.dtype == torch.float8_e4m3fn and torch.equal(qt.global_scale, init.global_scale)
        s = qt.scale.float()
        assert bool(torch.isfinite(s).all()) and bool((s > 0).all()) and bool((s <= 448).all())
        assert bool((s <= init.scale.float()).all())  # alpha <= 1 only lowers scales
    else:
        assert qt.scale.dtype == torch.uint8 and int(qt.scale.max()) <= 254
        assert bool(((init.scale.int() - qt.scale.int()) >= 0).all() & ((init.scale.int() - qt.scale.int()) <= 1).all())
    assert not torch.equal(qt.data, init.data)  # the offsets changed some codes
    again = type(qt)(qt.data.clone(), qt.scale.clone(), qt.global_scale, qt.shape, config)
    assert torch.equal(again.dequantize(), qt.dequantize())


def test_offsets_move_codes_one_grid_step_at_most():
    config = fp4kit.NVFP4Config()
    W = _weight(seed=4)
    init = fp4kit.quantize(W, config)
    V, _ = _params(W, config.block_size, V_seed=1)
    q0 = fp4kit.formats.e2m1_codes_to_float(fp4kit.formats.unpack_codes(init.data))
    q1 = fp4kit.formats.e2m1_codes_to_float(fp4kit.formats.unpack_codes(export(W, V, torch.ones(24, 4), init).data))
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    steps = (torch.bucketize(q1.abs(), grid) - torch.bucketize(q0.abs(), grid)).abs()
    assert int(steps.max()) <= 1 and int(steps.sum()) > 0


def test_gradients_reach_offsets_and_scales_and_sign_step_clamps():
    config = fp4kit.NVFP4Config()
    W = _weight()
    init = fp4kit.quantize(W, config)
    V = torch.zeros(24, 64, requires_grad=True)
    alpha = torch.ones(24, 4, requires_grad=True)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    loss = (x @ fake_quantize(W, V, alpha, init).T - x @ W.T).square().mean()
    loss.backward()
    assert V.grad.abs().sum() > 0 and alpha.grad.abs().sum() > 0
    sign_step([V, alpha], 0.7, [(-0.5, 0.5), (0.5, 1.0)])
    assert V.grad is None and float(V.detach().abs().max()) == 0.5 and float(alpha.min()) >= 0.5 and float(alpha.max()) <= 1


def _logit_error(model, ref):
    with torch.no_grad():
        return float((model(TEST).logits.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_signround_block_loss_below_rtn_and_model_closer_than_gptq(name):
    """The paper's claim on a small case: every block's output error ends below RTN's (its start), the
    loss falls during the optimisation, and the whole model lands closer to the float logits than RTN, and
    for NVFP4 than sequential GPTQ on the same calibration data (MXFP4: on par with it)."""
    config = CONFIGS[name]
    with torch.no_grad():
        ref = tiny_llama().float()(TEST).logits.float()
    rtn = tiny_llama().float()
    fp4kit.quantize_(rtn, config, progress=False)
    gptq = tiny_llama().float()
    sequential_gptq(gptq, CALIB_16X64, config, GPTQConfig(), progress=False)
    model = tiny_llama().float()
    result = sequential_signround(model, CALIB_16X64, config, SignRoundConfig(iters=40, batch_size=4), progress=False)
    assert sum(isinstance(m, FP4Linear) for m in model.modules()) == 14 == len(result.report.quantized)
    for block in result.blocks.values():
        assert block["kept"] == "learned" and block["final"] < 0.8 * block["init"]
        first, last = block["losses"][:10], block["losses"][-10:]  # mini-batch losses: noisy, but falling
        assert sum(last) < sum(first)
    err = {k: _logit_error(m, ref) for k, m in (("rtn", rtn), ("gptq", gptq), ("signround", model))}
    print(name, err)
    assert err["gptq"] < err["rtn"] and err["signround"] < 0.9 * err["rtn"]
    if name == "nvfp4":
        assert err["signround"] < err["gptq"]  # measured 0.92x GPTQ's error
    else:  # MXFP4: on par with GPTQ on this case (measured 1.007x), not better
        assert err["signround"] < 1.05 * err["gptq"]


def test_seeded_runs_are_identical_and_the_seed_matters():
    config = fp4kit.NVFP4Config()
    runs = []
    for seed in (0, 0, 1):
        model = tiny_llama().float()
        sequential_signround(model, CALIB, config, SignRoundConfig(iters=8, batch_size=2, seed=seed), progress=False)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_safeguard_keeps_the_initial_quantizer_when_learning_hurts():
    """With a step so large that signSGD overshoots, the safeguard keeps RTN's bytes: never worse than the start."""
    config = fp4kit.NVFP4Config()
    rtn = tiny_llama().float()
    fp4kit.quantize_(rtn, config, progress=False)
    model = tiny_llama().float()
    bad = SignRoundConfig(iters=1, lr=1.0, batch_size=2, min_clip=0.5)  # V to +-0.5, alpha to 0.5 at once
    result = sequential_signround(model, CALIB, config, bad, progress=False)
    kept = {i: b["kept"] for i, b in result.blocks.items()}
    for i, b in result.blocks.items():
        assert (b["kept"] == "init") == (b["final"] > b["init"])
    assert "init" in kept.values()
    i = next(i for i, k in kept.items() if k == "init")
    a, b = rtn.model.layers[i].mlp.up_proj, model.model.layers[i].mlp.up_proj
    assert torch.equal(a.weight_packed, b.weight_packed)


def test_killed_run_resumes_to_the_same_model(tmp_path):
    config = fp4kit.MXFP4Config()
    sr = SignRoundConfig(iters=6, batch_size=2)
    whole = tiny_llama(seed=2).float()
    sequential_signround(whole, CALIB, config, sr, progress=False)

    class Killed(Exception):
        pass

    def kill(i):
        raise Killed

    with pytest.raises(Killed):
        sequential_signround(tiny_llama(seed=2).float(), CALIB, config, sr, state_dir=tmp_path, progress=False,
                             on_layer_done=kill)
    resumed = tiny_llama(seed=2).float()
    result = sequential_signround(resumed, CALIB, config, sr, state_dir=tmp_path, progress=False)
    assert list(result.blocks) == [1] and len(result.report.quantized) == 14
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())
    with pytest.raises(ValueError, match="other settings"):
        sequential_signround(tiny_llama(seed=2).float(), CALIB, config, SignRoundConfig(iters=7), state_dir=tmp_path,
                             progress=False)


def test_mr_signround_recipe_rotates_and_beats_rtn():
    config = fp4kit.MXFP4Config()
    with torch.no_grad():
        ref = tiny_llama().float()(TEST).logits.float()
    rtn = tiny_llama().float()
    fp4kit.quantize_(rtn, config, progress=False)
    model = tiny_llama().float()
    recipe = PTQRecipe(PTQMethod.MR_SIGNROUND, signround=SignRoundConfig(iters=30, batch_size=4))
    assert recipe.signround.init_scales == ScaleSearchConfig()  # MR-GPTQ's MSE scales as the start
    report = apply_ptq(model, config, recipe, batches=CALIB, progress=False)
    assert len(report.quantized) == 14 and len(report.rotated) == 14
    assert model.model.layers[0].mlp.down_proj.rotation is not None
    assert _logit_error(model, ref) < _logit_error(rtn, ref)


def test_gemma3_layers_get_their_own_kwargs():
    """Gemma-3 passes sliding-window layers other rotary tables and masks than full-attention layers: SignRound
    must run each block with its own (layer 0's would be wrong for the global layer)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
    model = Gemma3ForCausalLM(cfg).eval()
    batches = [torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    _, stack = fp4kit.algorithms.sequential.decoder_layers(model)
    _, kwargs = capture_layer_inputs(model, stack, batches)
    assert not torch.equal(kwargs[0][0]["position_embeddings"][0], kwargs[1][0]["position_embeddings"][0])
    result = sequential_signround(model, batches, fp4kit.NVFP4Config(), SignRoundConfig(iters=20, batch_size=2),
                                  progress=False)
    assert len(result.report.quantized) == 14
    assert all(b["final"] <= b["init"] for b in result.blocks.values())


@pytest.mark.parametrize("kwargs,match", [({"iters": -1}, "iters"), ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch"),
                                          ({"min_clip": 0.0}, "min_clip"), ({"max_clip": 0.9}, "max_clip"),
                                          ({"min_clip": 1.2, "max_clip": 1.5}, "min_clip"),
                                          ({"init_scales": "mse"}, "init_scales")])
def test_bad_configs_are_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SignRoundConfig(**kwargs)


def test_signround_rejects_activations_filters_and_missing_batches():
    model = tiny_llama().float()
    config = fp4kit.NVFP4Config()
    with pytest.raises(ValueError, match="W4A16 only"):
        apply_ptq(model, config, PTQRecipe(PTQMethod.SIGNROUND), batches=CALIB, activations=config)
    with pytest.raises(ValueError, match="filter_fn"):
        apply_ptq(model, config, PTQRecipe(PTQMethod.SIGNROUND), batches=CALIB, filter_fn=lambda m, n: True)
    with pytest.raises(ValueError, match="needs calibration batches"):
        apply_ptq(model, config, PTQRecipe(PTQMethod.SIGNROUND))
    with pytest.raises(TypeError, match="SignRoundConfig"):
        PTQRecipe(PTQMethod.SIGNROUND, signround={"iters": 3})
    with pytest.raises(TypeError, match="NVFP4Config or MXFP4Config"):
        sequential_signround(model, CALIB, fp4kit.FP8Config())


def test_scale_clipping_option_learns_valid_scales():
    """min_clip < 1 (auto-round's min-max tuning): the scales move, stay representable, and export exactly."""
    config = fp4kit.NVFP4Config()
    model = tiny_llama().float()
    sequential_signround(model, CALIB, config, SignRoundConfig(iters=20, batch_size=4, min_clip=0.5), progress=False)
    rtn = tiny_llama().float()
    fp4kit.quantize_(rtn, config, progress=False)
    a, b = rtn.model.layers[0].mlp.down_proj, model.model.layers[0].mlp.down_proj
    assert not torch.equal(a.weight_scale.view(torch.uint8), b.weight_scale.view(torch.uint8))
    assert bool((b.weight_scale.float() <= a.weight_scale.float()).all())


def test_signround_checkpoint_round_trips_exactly(tmp_path):
    """The learned codes and scales go through the compressed-tensors checkpoint unchanged (same layout as RTN)."""
    from fp4kit.io import load_checkpoint, save_checkpoint

    model = tiny_llama()
    apply_ptq(model, fp4kit.NVFP4Config(), PTQRecipe(PTQMethod.SIGNROUND, signround=SignRoundConfig(iters=10)),
              batches=CALIB, progress=False)
    with torch.no_grad():
        before = model(TEST).logits
    save_checkpoint(model, tmp_path / "sr", progress=False)
    loaded, _, _ = load_checkpoint(tmp_path / "sr")
    for name, m in model.named_modules():
        if isinstance(m, FP4Linear):
            other = loaded.get_submodule(name)
            assert torch.equal(m.weight_packed, other.weight_packed)
            assert torch.equal(m.weight_scale.view(torch.uint8), other.weight_scale.view(torch.uint8))
    with torch.no_grad():
        assert torch.equal(loaded(TEST).logits, before)
