"""SQNR floors per format on Gaussian, Laplace and heavy-tailed (Student-t, 3 dof) inputs.

The floors are the values measured on 2026-11-22 (256 x 4096, seed 0) less 0.2 dB, so a change
that makes any format noisier fails here. Measured (dB):

                 nvfp4  nvfp4 4/6  mx floor  mx even  mx ceil  mx rceil  fp8 tensor  fp8 token  fp8 block
    gauss        20.43    21.21     18.79     19.03    16.82    18.75     31.56       31.55      31.80
    laplace      20.66    21.19     17.95     18.15    15.39    17.58     31.55       31.57      32.10
    student_t3   21.34    21.70     16.99     17.25    14.43    16.59     31.95       32.44      33.54
"""

import pytest
import torch

from fp4kit.formats import (BlockChoice, FP8Config, FP8Granularity, MXFP4Config, NVFP4Config, ScaleRule,
                            quantize, sqnr_db)

CONFIGS = {
    "nvfp4": NVFP4Config(), "nvfp4_torchao": NVFP4Config.torchao(),
    "nvfp4_4over6": NVFP4Config(block_choice=BlockChoice.FOUR_OVER_SIX),
    **{f"mxfp4_{r.value}": MXFP4Config(r) for r in ScaleRule},
    **{f"fp8_{g.value}": FP8Config(g) for g in FP8Granularity},
}
MEASURED = {
    "gauss": dict(nvfp4=20.43, nvfp4_torchao=20.43, nvfp4_4over6=21.21, mxfp4_floor=18.79, mxfp4_even=19.03,
                  mxfp4_ceil=16.82, mxfp4_rceil=18.75, fp8_tensor=31.56, fp8_token=31.55, fp8_block=31.80),
    "laplace": dict(nvfp4=20.66, nvfp4_torchao=20.66, nvfp4_4over6=21.19, mxfp4_floor=17.95, mxfp4_even=18.15,
                    mxfp4_ceil=15.39, mxfp4_rceil=17.58, fp8_tensor=31.55, fp8_token=31.57, fp8_block=32.10),
    "student_t3": dict(nvfp4=21.34, nvfp4_torchao=21.34, nvfp4_4over6=21.70, mxfp4_floor=16.99, mxfp4_even=17.25,
                       mxfp4_ceil=14.43, mxfp4_rceil=16.59, fp8_tensor=31.95, fp8_token=32.44, fp8_block=33.54),
}


def sample(dist):
    torch.manual_seed(0)
    if dist == "gauss":
        return torch.randn(256, 4096)
    if dist == "laplace":
        return torch.distributions.Laplace(0.0, 1.0).sample((256, 4096))
    return torch.distributions.StudentT(3.0).sample((256, 4096))


@pytest.fixture(scope="module", params=list(MEASURED))
def measured(request):
    x = sample(request.param)
    return request.param, {k: sqnr_db(x, quantize(x, c).dequantize()) for k, c in CONFIGS.items()}


def test_sqnr_floors(measured):
    dist, got = measured
    low = {k: round(v, 2) for k, v in got.items() if v < MEASURED[dist][k] - 0.2}
    assert not low, f"{dist}: SQNR fell below the recorded floor: {low}"


def test_four_over_six_beats_plain_nvfp4(measured):
    _, got = measured
    assert got["nvfp4_4over6"] > got["nvfp4"] + 0.3


def test_nvfp4_beats_mxfp4(measured):
    _, got = measured
    assert got["nvfp4"] > max(v for k, v in got.items() if k.startswith("mxfp4")) + 1.0
