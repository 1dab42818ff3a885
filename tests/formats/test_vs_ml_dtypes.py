"""Element and scale rounding against ml_dtypes, an independent implementation, bit for bit."""

import ml_dtypes
import numpy as np
import pytest
import torch

from helpers import wide_range
from fp4kit.formats import round_to_e2m1_codes, round_to_ue4m3
from fp4kit.formats.scales import e8m0_to_float


def ml_e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8).copy())


@pytest.mark.parametrize("scale", [1.0, 0.01, 3.0, 1000.0])
def test_e2m1_rounding_matches_ml_dtypes_random(scale):
    g = torch.Generator().manual_seed(int(scale * 100))
    x = torch.randn(4096, generator=g) * scale
    assert torch.equal(round_to_e2m1_codes(x), ml_e2m1_codes(x))


def test_e2m1_rounding_matches_ml_dtypes_wide_range():
    x = wide_range((17, 161), torch.Generator().manual_seed(1))
    assert torch.equal(round_to_e2m1_codes(x), ml_e2m1_codes(x))


def test_e2m1_rounding_matches_ml_dtypes_on_every_tie_and_neighbour():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    around = torch.cat([ties, ties.nextafter(torch.zeros(7)), ties.nextafter(torch.full((7,), 10.0))])
    x = torch.cat([around, -around])
    assert torch.equal(round_to_e2m1_codes(x), ml_e2m1_codes(x))


def test_ue4m3_rounding_matches_ml_dtypes():
    x = torch.pow(2.0, torch.empty(20000).uniform_(-12, 9)).clamp(max=448.0)
    ours = round_to_ue4m3(x).view(torch.uint8)
    ref = torch.from_numpy(x.numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8).copy())
    assert torch.equal(ours, ref)


def test_e8m0_decode_matches_ml_dtypes():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ref = torch.from_numpy(codes.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    ours = e8m0_to_float(codes)
    assert torch.equal(ours[:255], ref[:255]) and torch.isnan(ours[255]) and torch.isnan(ref[255])
