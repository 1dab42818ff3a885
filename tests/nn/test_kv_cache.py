"""KVCache: bf16/FP8 storage, slot writes, reads of a prefix, FP8 codes bit-exact with formats.quantize_fp8."""

import pytest
import torch

from fp4kit.formats import FP8Config, FP8Granularity, quantize_fp8
from fp4kit.nn.kv_cache import KVCache, dequantize_kv_fp8, quantize_kv_fp8


def test_fp8_codes_and_scales_match_formats_bit_for_bit():
    x = torch.randn(3, 2, 7, 32) * torch.logspace(-3, 3, 7)[None, None, :, None]
    x[0, 0, 0] = 0  # an all-zero vector gets scale 1
    codes, scale = quantize_kv_fp8(x)
    ref = quantize_fp8(x, FP8Config(FP8Granularity.TOKEN))
    assert torch.equal(codes.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(scale.reshape(-1), ref.scale)
    assert scale[0, 0, 0] == 1


def test_fp8_round_trip_error_bound():
    """Each element within half an E4M3 ulp of its vector's grid: |err| <= 2^-4 |x| for normal codes,
    and at most half the smallest subnormal step (2^-10 * scale) below them."""
    x = torch.randn(4, 2, 64, 128) * 3
    codes, scale = quantize_kv_fp8(x)
    back = dequantize_kv_fp8(codes, scale, torch.float32)
    bound = torch.maximum(x.abs() * 2**-4, scale[..., None] * 2**-10)
    assert ((back - x).abs() <= bound).all()
    rel = ((back - x).norm() / x.norm()).item()
    assert 0.005 < rel < 2**-4  # recorded 0.026: it quantizes, and stays within the bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_write_at_slots_then_read_prefix(dtype):
    cache = KVCache(3, 2, 16, 8, dtype=dtype, compute_dtype=torch.float32)
    k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    cache.write(k, v, torch.tensor([4, 5, 6]))
    keys, values = cache.read(2, 7)
    assert keys.shape == (2, 2, 7, 8) and keys.dtype == torch.float32
    tol = 2**-4 if dtype == torch.float8_e4m3fn else 2**-8
    torch.testing.assert_close(keys[:, :, 4:7], k, rtol=tol, atol=1e-6)
    torch.testing.assert_close(values[:, :, 4:7], v, rtol=tol, atol=1e-6)
    assert (keys[:, :, :4] == 0).all()  # untouched slots
    assert (cache.k[2] == 0).all()  # untouched row


def test_fp8_cache_halves_memory():
    bf16 = KVCache(2, 8, 64, 128, dtype=torch.bfloat16)
    fp8 = KVCache(2, 8, 64, 128, dtype=torch.float8_e4m3fn)
    assert fp8.nbytes() / bf16.nbytes() == pytest.approx((128 + 4) / 256)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="dtype"):
        KVCache(1, 1, 4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="positive"):
        KVCache(0, 1, 4, 8)
    cache = KVCache(1, 1, 4, 8)
    with pytest.raises(ValueError, match="max_batch"):
        cache.write(torch.zeros(2, 1, 1, 8), torch.zeros(2, 1, 1, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match="max_seq_len"):
        cache.read(1, 5)
