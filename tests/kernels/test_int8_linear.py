"""The W8A16 kernel (`kernels.int8_linear`) against its twin and a float64 reference.

Error bounds. Codes are exact in bf16/fp16 and x * code is exact in float32, so the kernel and the twin
sum the same float32 products in different orders and round once: they differ by at most one ulp of the
output's dtype plus float32 summation error (K 2^-23 of sum |x| |w|, tiny), and against a float64
reference on the dequantized weights the kernel carries the output cast (2^-8 relative for bf16, 2^-11
for fp16, normalised by the reference's max; 1.1x for the max) like test_fp4_gemv. With x one-hot the sum
has one term: y is code * scale rounded once, bit for bit the twin's.
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'fp4kit[test]')")

from fp4kit.formats import Int8Config, NVFP4Config, quantize  # noqa: E402
from fp4kit.kernels.fp4_gemm import use_triton  # noqa: E402
from fp4kit.kernels.int8_linear import int8_config, int8_linear, int8_linear_torch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_kernels = pytest.mark.skipif(not use_triton(torch.empty(0, device=DEVICE)),
                                   reason="no CUDA and TRITON_INTERPRET != 1: the kernels cannot run here")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-sized shapes and CUDA graphs need CUDA")
TOL = {torch.bfloat16: (1.1 * 2**-8, 2**-8), torch.float16: (1.1 * 2**-11, 2**-11)}
MANT = {torch.bfloat16: 7, torch.float16: 10}


def _weight(n, k):
    """Rows of different magnitudes (per-row scales differ) with some large entries."""
    return torch.randn(n, k, device=DEVICE) * torch.logspace(-3, 1, n, device=DEVICE)[:, None]


def _check_against_twin(y, x, qt, bias):
    t = int8_linear_torch(x, qt, bias)
    assert y.dtype == t.dtype == x.dtype and y.shape == t.shape
    spacing = torch.exp2(torch.floor(torch.log2(t.float().abs().clamp_min(1e-30))) - MANT[x.dtype])
    mag = (x.float().abs() @ qt.data.float().abs().T) * qt.scale
    bound = spacing + qt.shape[1] * 2**-23 * mag + (0 if bias is None else 2**-23 * bias.float().abs())
    assert ((y.float() - t.float()).abs() <= bound).all(), ((y.float() - t.float()).abs() / bound).max()


def _check_against_float64(y, x, qt, bias):
    ref = x.double() @ qt.dequantize(torch.float64).T
    if bias is not None:
        ref = ref + bias.double()
    err = y.double() - ref
    tmax, trms = TOL[x.dtype]
    assert (err.abs().max() / ref.abs().max()).item() <= tmax
    assert (err.norm() / ref.norm()).item() <= trms


@needs_kernels
@pytest.mark.parametrize("M,N,K", [(1, 48, 96), (2, 40, 64), (17, 33, 160), (33, 64, 128)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_twin_and_reference(M, N, K, bias, dtype):
    torch.manual_seed(M * 1000 + N + K)
    qt = quantize(_weight(N, K), Int8Config())
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    y = int8_linear(x, qt, b)
    _check_against_twin(y, x, qt, b)
    _check_against_float64(y, x, qt, b)


@needs_kernels
def test_one_hot_inputs_give_the_weights_bit_for_bit():
    N, K = 40, 64
    qt = quantize(_weight(N, K), Int8Config())
    x = torch.eye(K, device=DEVICE)[:17].bfloat16()  # row i picks column i of every weight row
    y = int8_linear(x, qt)
    assert torch.equal(y, (qt.dequantize(torch.float32)[:, :17].T).bfloat16())
    assert torch.equal(y, int8_linear_torch(x, qt))


@needs_kernels
def test_leading_dims_strides_and_empty():
    N, K = 24, 64
    qt = quantize(_weight(N, K), Int8Config())
    x = torch.randn(2, 3, 2 * K, device=DEVICE).bfloat16()[..., ::2]  # not contiguous in the last dim
    y = int8_linear(x, qt)
    assert y.shape == (2, 3, N)
    _check_against_twin(y.reshape(-1, N), x.reshape(-1, K), qt, None)
    assert int8_linear(torch.empty(0, K, device=DEVICE).bfloat16(), qt).shape == (0, N)


def test_float32_input_takes_the_twin():
    qt = quantize(torch.randn(8, 32), Int8Config())
    x = torch.randn(3, 32)
    assert torch.equal(int8_linear(x, qt), int8_linear_torch(x, qt))


def test_bad_inputs_name_the_weight():
    qt = quantize(torch.randn(8, 32), Int8Config())
    x = torch.randn(2, 32).bfloat16()
    with pytest.raises(TypeError, match="lm_head: expected an INT8 QuantizedTensor"):
        int8_linear(x, quantize(torch.randn(8, 32), NVFP4Config()), name="lm_head")
    with pytest.raises(ValueError, match="lm_head: input's last dim is 16, the weight's in_features is 32"):
        int8_linear(torch.randn(2, 16).bfloat16(), qt, name="lm_head")
    with pytest.raises(ValueError, match=r"lm_head: bias must have shape \(8,\)"):
        int8_linear(x, qt, torch.zeros(9).bfloat16(), name="lm_head")
    with pytest.raises(ValueError, match="weight must be 2-D"):
        int8_linear(x, quantize(torch.randn(2, 8, 32), Int8Config()))


def test_config_rule():
    if INTERPRETING:
        assert int8_config(1).block_m == 16
        return
    assert [int8_config(m).block_m for m in (1, 16, 17, 32, 33, 64, 500)] == [16, 16, 32, 32, 64, 64, 64]


@needs_gpu
@pytest.mark.parametrize("M", [1, 2, 32, 65])
def test_gpu_head_shape(M):
    """A head-sized weight (N not a multiple of the tile, K 4096) on the GPU, and under a CUDA graph."""
    torch.manual_seed(M)
    N, K = 4000 + 72, 4096
    qt = quantize(torch.randn(N, K, device="cuda") * 0.02, Int8Config())
    x = torch.randn(M, K, device="cuda").bfloat16()
    y = int8_linear(x, qt)
    _check_against_twin(y, x, qt, None)
    _check_against_float64(y, x, qt, None)
    out = torch.empty_like(y)
    int8_linear(x, qt)  # compiled before the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out.copy_(int8_linear(x, qt))
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, int8_linear(x, qt))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_output_holds_the_rounded_values(dtype):
    qt = quantize(_weight(40, 96), Int8Config())
    x = torch.randn(3, 96, device=DEVICE).to(dtype)
    b = torch.randn(40, device=DEVICE).to(dtype)
    y32 = int8_linear(x, qt, b, out_dtype=torch.float32)
    assert y32.dtype == torch.float32 and torch.equal(y32, int8_linear(x, qt, b).float())
    with pytest.raises(ValueError, match="out_dtype must be"):
        int8_linear(x, qt, out_dtype=torch.float64)
