"""GPTQ for FP4: RTN when inputs are uncorrelated, the closed-form OBS update, lower output error.

Measured 2026-11-22 on CPU (W 64 x 256 randn, X = Z A with 1,024 tokens, A = randn/16 + 0.3 I,
seed 0), output error tr((W-Q) H (W-Q)^T) relative to RTN's:

                  GPTQ     GPTQ act_order
    nvfp4         0.530    0.513
    mxfp4         0.489    0.451

The test asserts each below its measured value + 0.02.
"""

import pytest
import torch

from fp4kit.algorithms import GPTQConfig, ScaleSearchConfig, gptq, scale_search
from fp4kit.algorithms.gptq import ColumnQuantizer, output_error
from fp4kit.formats import MXFP4Config, NVFP4Config, quantize, unpack_codes

CONFIGS = {"nvfp4": NVFP4Config(), "nvfp4_torchao": NVFP4Config.torchao(), "mxfp4": MXFP4Config()}
RATIO_CEILING = {("nvfp4", False): 0.55, ("nvfp4", True): 0.533, ("mxfp4", False): 0.509, ("mxfp4", True): 0.471}


def correlated(N=64, K=256, T=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    A = torch.randn(K, K, generator=g) / K**0.5 + 0.3 * torch.eye(K)
    X = torch.randn(T, K, generator=g) @ A
    return W, X.T @ X


def same_bytes(a, b):
    return (a.scale.dtype == b.scale.dtype and torch.equal(a.data, b.data)
            and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8)))


@pytest.mark.parametrize("key", CONFIGS)
def test_identity_hessian_is_rtn_bit_for_bit(key):
    W = torch.randn(17, 160 if key != "mxfp4" else 224) * 5
    assert same_bytes(gptq(W, torch.eye(W.shape[1]), CONFIGS[key], block_size=32), quantize(W, CONFIGS[key]))


@pytest.mark.parametrize("key", CONFIGS)
def test_act_order_on_diagonal_hessian_restores_column_order(key):
    """Diagonal H propagates nothing, so any sweep order must give RTN's bytes in place."""
    K = 128
    W = torch.randn(8, K)
    H = torch.diag(torch.rand(K) + 0.1)
    assert same_bytes(gptq(W, H, CONFIGS[key], act_order=True, block_size=16), quantize(W, CONFIGS[key]))


def obs_reference(W, H, qt, damp):
    """Brute force: quantize column j, apply OBS with an explicit inverse of the remaining H block."""
    W, H = W.double().clone(), H.double().clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    quant = ColumnQuantizer(qt)
    codes = []
    for j in range(W.shape[1]):
        Hinv = torch.linalg.inv(H[j:, j:])
        c, q = quant(j, W[:, j].float())
        codes.append(c)
        W[:, j:] -= ((W[:, j] - q.double()) / Hinv[0, 0]).unsqueeze(1) * Hinv[0:1, :]
    return torch.stack(codes, dim=1)


@pytest.mark.parametrize("key", ["nvfp4", "mxfp4"])
def test_matches_closed_form_obs_update(key):
    W, H = correlated(N=8, K=64, T=256, seed=1)
    ref = obs_reference(W, H, quantize(W, CONFIGS[key]), damp=0.01)
    for bs in (1, 16, 128):  # lazy batches must not change the result
        assert torch.equal(unpack_codes(gptq(W, H, CONFIGS[key], block_size=bs).data), ref), bs


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("key", ["nvfp4", "mxfp4"])
def test_output_error_below_rtn(key, act_order):
    W, H = correlated()
    cfg = CONFIGS[key]
    ratio = (output_error(W, gptq(W, H, cfg, act_order=act_order).dequantize(), H)
             / output_error(W, quantize(W, cfg).dequantize(), H))
    assert ratio < RATIO_CEILING[(key, act_order)], ratio


def test_scale_search_scales_are_kept():
    W, H = correlated(N=16, K=64, T=256)
    search = ScaleSearchConfig()
    got = gptq(W, H, NVFP4Config(), scale_search_config=search)
    assert torch.equal(got.scale.view(torch.uint8), scale_search(W, NVFP4Config(), search).scale.view(torch.uint8))
    assert output_error(W, got.dequantize(), H) < output_error(W, quantize(W, NVFP4Config()).dequantize(), H)


def test_dead_columns_get_no_update_and_stay_finite():
    W, H = correlated(N=16, K=64, T=256)
    dead = torch.tensor([3, 17, 40])
    H[dead, :] = 0
    H[:, dead] = 0
    got = gptq(W, H, NVFP4Config(), act_order=True)
    deq = got.dequantize()
    assert bool(torch.isfinite(deq).all())
    assert torch.equal(unpack_codes(got.data)[:, dead], unpack_codes(quantize(W, NVFP4Config()).data)[:, dead])
    assert output_error(W, deq, H) < output_error(W, quantize(W, NVFP4Config()).dequantize(), H)


def test_fixed_amax_sets_the_global_scale():
    W, H = correlated(N=8, K=64, T=256)
    got = gptq(W, H, NVFP4Config(), amax=torch.tensor(20.0))
    assert torch.equal(got.global_scale, quantize(W, NVFP4Config(), amax=torch.tensor(20.0)).global_scale)


def test_not_positive_definite_names_the_layer():
    H = -torch.eye(32)
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight: the damped Hessian"):
        gptq(torch.randn(4, 32), H, NVFP4Config(), name="model.layers.0.mlp.up_proj.weight")


@pytest.mark.parametrize("H, match", [(torch.eye(16), r"Hessian must be \[32, 32\]"),
                                      (torch.full((32, 32), float("nan")), "NaN")])
def test_bad_hessian_names_the_layer(H, match):
    with pytest.raises(ValueError, match=f"q_proj.*{match}"):
        gptq(torch.randn(4, 32), H, NVFP4Config(), name="q_proj")


@pytest.mark.parametrize("kwargs", [dict(block_size=0), dict(damp=-0.1), dict(damp=2.0)])
def test_config_is_validated(kwargs):
    with pytest.raises(ValueError, match="GPTQConfig"):
        GPTQConfig(**kwargs)


# ---- dynamic scales: each block's scale picked when the sweep reaches it --------------------------------------

def dynamic_reference(W, H, config, damp, search=None):
    """Brute force with dynamic scales: the OBS sweep of `obs_reference` (explicit inverse per column, no lazy
    batches, float64), and at each block's first column the block's scale refitted from the columns as they are
    now, by quantizing them alone (under the original weights' global scale for NVFP4)."""
    amax = W.abs().amax() if isinstance(config, NVFP4Config) else None

    def fit(w):
        return quantize(w, config, amax=amax) if search is None else scale_search(w, config, search, amax=amax)

    W, H = W.double().clone(), H.double().clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    bs = config.block_size
    codes, scales = [], []
    for j in range(W.shape[1]):
        if j % bs == 0:
            block = fit(W[:, j:j + bs].float())
            quant = ColumnQuantizer(block)
            scales.append(block.scale)
        Hinv = torch.linalg.inv(H[j:, j:])
        c, q = quant(j % bs, W[:, j].float())
        codes.append(c)
        W[:, j:] -= ((W[:, j] - q.double()) / Hinv[0, 0]).unsqueeze(1) * Hinv[0:1, :]
    return torch.stack(codes, dim=1), torch.cat(scales, dim=1)


@pytest.mark.parametrize("search", [None, ScaleSearchConfig()])
@pytest.mark.parametrize("key", ["nvfp4", "mxfp4"])
def test_dynamic_scales_match_the_brute_force_sweep(key, search):
    cfg = CONFIGS[key]
    W, H = correlated(N=8, K=128, T=512, seed=2)
    want_codes, want_scales = dynamic_reference(W, H, cfg, 0.01, search)
    for lazy in (cfg.block_size, 64, 128):  # lazy batches holding 1, 2-4 or 4-8 blocks: same result
        got = gptq(W, H, cfg, block_size=lazy, scale_search_config=search, dynamic_scales=True)
        assert torch.equal(unpack_codes(got.data), want_codes), lazy
        assert torch.equal(got.scale.view(torch.uint8), want_scales.view(torch.uint8)), lazy
    W, H = correlated()  # 64 x 256: some blocks' scales do move (MXFP4's power-of-two ones rarely)
    dyn, static = (gptq(W, H, cfg, scale_search_config=search, dynamic_scales=d) for d in (True, False))
    assert not torch.equal(dyn.scale.view(torch.uint8), static.scale.view(torch.uint8))


@pytest.mark.parametrize("key", CONFIGS)
def test_dynamic_scales_with_identity_hessian_are_rtn(key):
    """Nothing moves when H = I, so every refitted scale is the static one: RTN's bytes (and the search's)."""
    W = torch.randn(17, 160 if key != "mxfp4" else 224) * 5
    H = torch.eye(W.shape[1])
    assert same_bytes(gptq(W, H, CONFIGS[key], block_size=32, dynamic_scales=True), quantize(W, CONFIGS[key]))
    search = ScaleSearchConfig()
    assert same_bytes(gptq(W, H, CONFIGS[key], block_size=32, scale_search_config=search, dynamic_scales=True),
                      scale_search(W, CONFIGS[key], search))


def test_dynamic_scales_lower_the_output_error_of_nvfp4_gptq():
    """Measured on `correlated()` seeds 0-2 (output error relative to RTN's, static -> dynamic): NVFP4 with RTN
    scales 0.530/0.518/0.507 -> 0.484/0.462/0.455, with the scale search 0.465/0.453/0.457 -> 0.361/0.350/0.342;
    MXFP4 (power-of-two scales, few candidates) 0.489/0.476/0.479 -> 0.486/0.474/0.480 and with the search
    0.489/0.482/0.483 -> 0.484/0.476/0.471. Asserted: seed 0, NVFP4, each below its measured value + 0.02."""
    W, H = correlated()
    cfg = NVFP4Config()
    rtn = output_error(W, quantize(W, cfg).dequantize(), H)
    for search, ceiling in ((None, 0.504), (ScaleSearchConfig(), 0.381)):
        got = gptq(W, H, cfg, scale_search_config=search, dynamic_scales=True)
        assert output_error(W, got.dequantize(), H) / rtn < ceiling


def test_dynamic_scales_need_column_order_and_whole_blocks():
    with pytest.raises(ValueError, match="act_order"):
        GPTQConfig(dynamic_scales=True, act_order=True)
    with pytest.raises(ValueError, match="up_proj.weight: dynamic_scales needs block_size"):
        gptq(torch.randn(4, 64), torch.eye(64), NVFP4Config(), block_size=24, dynamic_scales=True,
             name="up_proj.weight")
