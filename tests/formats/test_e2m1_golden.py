"""Golden tables for the E2M1 codec, one case per test."""

import pytest
import torch

from fp4kit.formats import E2M1_VALUES, e2m1_codes_to_float, pack_codes, round_to_e2m1_codes, unpack_codes

CODE_VALUES = [(0, 0.0), (1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0), (5, 3.0), (6, 4.0), (7, 6.0),
               (8, -0.0), (9, -0.5), (10, -1.0), (11, -1.5), (12, -2.0), (13, -3.0), (14, -4.0), (15, -6.0)]


def code(x, **kw):
    return int(round_to_e2m1_codes(torch.tensor([x], dtype=torch.float32), **kw)[0])


@pytest.mark.parametrize("c,value", CODE_VALUES)
def test_decode_code(c, value):
    got = e2m1_codes_to_float(torch.tensor([c], dtype=torch.uint8))[0]
    assert got.item() == value and torch.signbit(got) == (c >= 8)


@pytest.mark.parametrize("c,value", CODE_VALUES)
def test_encode_exact_value(c, value):
    assert code(value) == c


def test_fp4_0_25_ties_to_0():
    assert code(0.25) == 0


def test_fp4_0_75_ties_to_1():
    assert code(0.75) == 2


def test_fp4_1_25_ties_to_1():
    assert code(1.25) == 2


def test_fp4_1_75_ties_to_2():
    assert code(1.75) == 4


def test_fp4_2_5_ties_to_2():
    assert code(2.5) == 4


def test_fp4_3_5_ties_to_4():
    assert code(3.5) == 6


def test_fp4_5_ties_to_4():
    assert code(5.0) == 6


def test_fp4_negative_tie_mirrors():
    assert code(-2.5) == 12 and code(-3.5) == 14


def test_fp4_just_above_tie_rounds_up():
    assert code(torch.nextafter(torch.tensor(5.0), torch.tensor(6.0)).item()) == 7


def test_fp4_saturates_positive():
    assert code(6.5) == 7 and code(1e30) == 7


def test_fp4_saturates_negative():
    assert code(-100.0) == 15


def test_negative_zero_keeps_sign_by_default():
    assert code(-0.0) == 8 and code(-0.1) == 8


def test_negative_zero_canonical_option():
    assert code(-0.0, signed_zero=False) == 0 and code(-0.1, signed_zero=False) == 0
    assert code(-0.5, signed_zero=False) == 9


def test_table_constant_matches_decoder():
    assert e2m1_codes_to_float(torch.arange(16, dtype=torch.uint8)).tolist() == list(E2M1_VALUES)


def test_pack_low_nibble_first():
    packed = pack_codes(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0x0F]]


def test_unpack_inverts_pack_for_every_byte():
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 256)
    assert torch.equal(pack_codes(unpack_codes(every_byte)), every_byte)


def test_pack_odd_length_raises():
    with pytest.raises(ValueError, match="even last dim"):
        pack_codes(torch.zeros(3, dtype=torch.uint8))


def test_matches_torch_float4_x2_layout():
    """PyTorch's float4_e2m1fn_x2 stores element 2j in the low nibble too (same bytes, other dtype)."""
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("torch has no float4_e2m1fn_x2")
    packed = pack_codes(torch.tensor([[3, 12]], dtype=torch.uint8))
    assert packed.view(torch.float4_e2m1fn_x2).view(torch.uint8).item() == 0xC3
