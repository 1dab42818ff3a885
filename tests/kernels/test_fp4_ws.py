"""The warp-specialised skinny GEMM (`fp4kit.kernels.fp4_ws`): its offline layout on the CPU, the kernel on Hopper.

Gluon kernels have no CPU interpreter, so the kernel tests run only on a CUDA device of compute capability
>= 9.0 (skipped elsewhere with that reason); the pair layout and the scale tables are plain torch and run
everywhere.
"""

import pytest
import torch

from fp4kit.formats import MXFP4Config, NVFP4Config, quantize
from fp4kit.kernels.fp4_ws import (
    PAIR_ORDER,
    WsConfig,
    pair_tables,
    pair_words,
    unpack_pair_words,
    ws_config,
)

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
FORMATS = {"nvfp4": NVFP4Config(), "mxfp4": MXFP4Config()}


def _codes(qt):
    N, K = qt.shape
    d = qt.data.view(torch.uint8).reshape(N, K // 2)
    return torch.stack((d & 0xF, d >> 4), dim=-1).reshape(N, K)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pair_words_round_trip(fmt):
    torch.manual_seed(0)
    qt = quantize(torch.randn(48, 512), FORMATS[fmt])
    words = pair_words(qt)
    assert words.dtype == torch.int32 and words.shape == (48, 64)
    assert torch.equal(unpack_pair_words(words), _codes(qt))


def test_pair_words_nibble_positions_golden():
    # one row, K = 8: codes 0..7 at elements 0..7; nibble j must hold element PAIR_ORDER[j]
    qt = quantize(torch.zeros(1, 32), NVFP4Config())
    codes = torch.arange(32, dtype=torch.uint8) % 8
    qt.data.view(torch.uint8).copy_((codes[0::2] | (codes[1::2] << 4)).reshape(qt.data.shape))
    w = int(pair_words(qt)[0, 0]) & 0xFFFFFFFF
    assert [(w >> (4 * j)) & 0xF for j in range(8)] == list(PAIR_ORDER) == [0, 2, 4, 6, 1, 3, 5, 7]
    assert w == 0x75316420  # hand-written: nibbles 0,2,4,6,1,3,5,7 from the lowest


def test_nvfp4_pair_table_is_the_e4m3_value_in_bf16_and_post_is_the_global_factor():
    torch.manual_seed(1)
    qt = quantize(torch.randn(16, 64), NVFP4Config())
    table, two_mul, post = pair_tables(qt, qt.scale.view(torch.uint8))
    assert two_mul and table.dtype == torch.int32
    codes = torch.arange(256, dtype=torch.uint8)
    want = codes.view(torch.float8_e4m3fn).float()
    lo = (table & 0xFFFF).to(torch.int16).view(torch.bfloat16).float()
    hi = ((table >> 16) & 0xFFFF).to(torch.int16).view(torch.bfloat16).float()
    finite = torch.isfinite(want)
    assert torch.equal(lo[finite], want[finite]) and torch.equal(hi[finite], want[finite])
    assert torch.isnan(lo[~finite]).all()
    # the kernel's weight is (code * s) exactly, times post: s * post is the twin's effective scale
    eff = qt.config.effective_block_scale(want[finite], qt.global_scale.float().reshape(()))
    assert torch.allclose(want[finite] * post, eff, rtol=2 ** -23, atol=0)


def test_prepare_ws_refuses_mxfp4_with_a_clear_error():
    from fp4kit.kernels.fp4_ws import prepare_ws

    with pytest.raises(ValueError, match="NVFP4"):
        prepare_ws(quantize(torch.randn(16, 256), MXFP4Config()))


def test_mxfp4_pair_table_has_no_post():
    qt = quantize(torch.randn(16, 64), MXFP4Config())
    table, two_mul, post = pair_tables(qt, qt.scale.view(torch.uint8))
    assert post is None and table.dtype == torch.int32


def test_ws_config_rules():
    assert ws_config(16, 28672, 4096) == WsConfig(block_n=128, stages=2, split_k=1)  # the r4 sweep's gate_up
    assert ws_config(16, 4096, 14336) == WsConfig(block_n=64, stages=4, split_k=4)  # down
    assert ws_config(16, 6144, 4096).split_k == 4 and ws_config(16, 4096, 4096).split_k == 4
    assert ws_config(16, 64, 256).split_k == 1  # never more splits than K steps
    with pytest.raises(ValueError, match="unsupported"):
        WsConfig(block_n=32)


@pytest.mark.skipif(not HOPPER, reason="Gluon warp-specialised kernel: needs a CUDA GPU with compute capability >= 9.0")
@pytest.mark.parametrize("fmt", ["nvfp4"])
@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("M,N,K,split", [(16, 512, 1024, 1), (3, 384, 2048, 4), (33, 256, 512, 2), (64, 128, 256, 1)])
def test_ws_against_float64_reference(fmt, pairs, M, N, K, split):
    from fp4kit.kernels.fp4_ws import fp4_ws_matmul, prepare_ws

    torch.manual_seed(2)
    qt = quantize(torch.randn(N, K, device="cuda") * 0.02, FORMATS[fmt])
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    y = fp4_ws_matmul(x, prepare_ws(qt, pairs), bias, config=WsConfig(split_k=split))
    exact = (x.double() @ qt.dequantize(torch.float32).double().T) + bias.double()
    twin = (x.float() @ qt.dequantize(torch.bfloat16).float().T + bias.float()).double()
    err = (y.double() - exact).abs().max() / exact.abs().max()
    # bf16 output rounding (2^-9) plus float32 summation; NVFP4 pairs skip the twin's per-weight bf16 rounding
    assert err < 2 ** -8, err
    assert (y.double() - twin).abs().max() / twin.abs().max() < 2 ** -7


@pytest.mark.skipif(not HOPPER, reason="Gluon warp-specialised kernel: needs a CUDA GPU with compute capability >= 9.0")
def test_ws_rejects_bad_input():
    from fp4kit.kernels.fp4_ws import fp4_ws_matmul, prepare_ws

    qt = quantize(torch.randn(128, 256, device="cuda"), NVFP4Config())
    w = prepare_ws(qt)
    with pytest.raises(ValueError, match="bf16"):
        fp4_ws_matmul(torch.randn(4, 256, device="cuda"), w)
    with pytest.raises(ValueError, match="M <= 64"):
        fp4_ws_matmul(torch.randn(65, 256, device="cuda", dtype=torch.bfloat16), w)
