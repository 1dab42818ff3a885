"""INT8 per-row weights (`formats.Int8Config`): golden rows, compressed-tensors' rule bit for bit, bad input."""

import pytest
import torch

from fp4kit.formats import Int8Config, QuantizedTensor, quantize, quantize_int8


def test_golden_rows():
    # amax 127.5 -> scale exactly 1 (codes = round(w)); amax 255 -> scale 2. Ties round to even; +127.5 rounds
    # to 128 and clamps to 127, -127.5 rounds to -128 (in range).
    x = torch.tensor([[127.5, 2.5, -2.5, 3.5, 0.49, -127.5, 126.6, 0.5],
                      [255.0, 5.0, -3.0, 1.0, 7.0, -255.0, 0.0, -1.0]])
    qt = quantize_int8(x)
    assert qt.data.dtype == torch.int8 and qt.scale.dtype == torch.float32
    assert qt.scale.tolist() == [1.0, 2.0]
    assert qt.data.tolist() == [[127, 2, -2, 4, 0, -128, 127, 0], [127, 2, -2, 0, 4, -128, 0, 0]]
    assert qt.dequantize().tolist() == [[127, 2, -2, 4, 0, -128, 127, 0], [254, 4, -4, 0, 8, -256, 0, 0]]


def test_zero_row_and_shapes():
    x = torch.randn(2, 3, 40)
    x[1, 2] = 0
    qt = quantize(x, Int8Config(), name="w")
    assert tuple(qt.data.shape) == (2, 3, 40) and tuple(qt.scale.shape) == (6,) and qt.shape == (2, 3, 40)
    assert qt.scale[5].item() == 1.0 and not qt.data[1, 2].any()
    err = (qt.dequantize() - x).abs() / qt.scale.reshape(2, 3, 1)
    assert err.max().item() <= 0.5 + 1e-5  # half a step (the clamped +127.5 is exactly half); float32 slack
    assert qt.nbytes == 2 * 3 * 40 + 6 * 4


def test_matches_compressed_tensors_channel_rule():
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 96, generator=g) * torch.pow(10.0, torch.empty(64, 1).uniform_(-6, 6, generator=g))
    x[5] = torch.distributions.StudentT(2.0).sample((96,))  # heavy tail
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    scale, zp = calculate_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True), args)
    codes = ct_quantize(x, scale, zp, args, dtype=torch.int8)
    ours = quantize_int8(x)
    assert torch.equal(ours.scale, scale.reshape(-1)), ct.__version__
    assert torch.equal(ours.data, codes), ct.__version__


@pytest.mark.parametrize("bad,match", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_is_named(bad, match):
    x = torch.randn(4, 16)
    x[2, 3] = bad
    with pytest.raises(ValueError, match=rf"lm_head\.weight: .*{match}"):
        quantize_int8(x, name="lm_head.weight")


def test_bad_input_errors():
    with pytest.raises(TypeError, match="w: expected a float tensor"):
        quantize_int8(torch.zeros(4, 8, dtype=torch.int32), name="w")
    with pytest.raises(ValueError, match="w: INT8 per-row quantization needs"):
        quantize_int8(torch.zeros(4, 0), name="w")
    with pytest.raises(ValueError, match="w: INT8 per-row scales come from the rows"):
        quantize(torch.randn(4, 8), Int8Config(), amax=1.0, name="w")
    assert isinstance(quantize_int8(torch.randn(8)), QuantizedTensor)  # a vector is one row
