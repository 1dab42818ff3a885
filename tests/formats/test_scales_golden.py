"""Golden cases for the block-scale encodings (E8M0, UE4M3) and the exponent helpers."""

import math

import pytest
import torch

from fp4kit.formats.scales import ceil_log2, e8m0_to_float, exponent_to_e8m0, floor_log2, pow2, round_to_ue4m3


def e8m0(c):
    return e8m0_to_float(torch.tensor([c], dtype=torch.uint8))[0].item()


def test_e8m0_code_0_is_2_pow_minus_127():
    assert e8m0(0) == 2.0**-127


def test_e8m0_code_127_is_one():
    assert e8m0(127) == 1.0


def test_e8m0_code_254_is_2_pow_127():
    assert e8m0(254) == 2.0**127


def test_e8m0_code_255_is_nan():
    assert math.isnan(e8m0(255))


def test_e8m0_matches_torch_dtype():
    codes = torch.arange(255, dtype=torch.int32).to(torch.uint8)
    ref = codes.view(torch.float8_e8m0fnu).float()
    assert torch.equal(e8m0_to_float(codes), ref)


def test_exponent_to_e8m0_clamps():
    assert exponent_to_e8m0(torch.tensor([-300, -127, 0, 127, 300])).tolist() == [0, 0, 127, 254, 254]


def test_pow2_exact_at_both_ends():
    assert pow2(torch.tensor([-127, -126, 0, 126, 127])).tolist() == [2.0**-127, 2.0**-126, 1.0, 2.0**126, 2.0**127]


def test_ue4m3_largest_is_448():
    assert round_to_ue4m3(torch.tensor([448.0, 1e6])).float().tolist() == [448.0, 448.0]


def test_ue4m3_smallest_subnormal():
    assert round_to_ue4m3(torch.tensor([2.0**-9])).float().item() == 2.0**-9


def test_ue4m3_subnormal_rounds_to_nearest_even():
    # subnormal step is 2^-9: 2.5 * 2^-9 ties to 2 * 2^-9, 3.5 * 2^-9 ties to 4 * 2^-9
    got = round_to_ue4m3(torch.tensor([2.5 * 2.0**-9, 3.5 * 2.0**-9, 0.0029])).float().tolist()
    assert got == [2 * 2.0**-9, 4 * 2.0**-9, 2.0**-9]  # 0.0029 = 1.48 * 2^-9


def test_ue4m3_below_half_smallest_subnormal_is_zero():
    assert round_to_ue4m3(torch.tensor([2.0**-11])).float().item() == 0.0


def test_ue4m3_smallest_normal():
    assert round_to_ue4m3(torch.tensor([2.0**-6])).float().item() == 2.0**-6


@pytest.mark.parametrize("x,floor,ceil", [(1.0, 0, 0), (1.5, 0, 1), (6.0, 2, 3), (0.75, -1, 0),
                                          (2.0**-140, -140, -140), (3 * 2.0**-140, -139, -138)])
def test_log2_helpers(x, floor, ceil):
    t = torch.tensor([x])
    assert floor_log2(t).item() == floor and ceil_log2(t).item() == ceil


def test_ceil_log2_just_above_power_of_two():
    """log2 in float rounds 1024*(1+2^-23) to exactly 10.0; the bit-level ceil gives 11."""
    x = torch.tensor([1024.0]).nextafter(torch.tensor([2048.0]))
    assert torch.ceil(torch.log2(x)).item() == 10.0
    assert ceil_log2(x).item() == 11
