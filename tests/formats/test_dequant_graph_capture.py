"""Dequantizing inside CUDA-graph capture: no host-to-device copies (the E2M1 table and the E8M0 constants are built
on the device), so a float32 model with FP4 layers can run in the engine's decode graphs."""

import pytest
import torch

from fp4kit.formats import MXFP4Config, NVFP4Config


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
@pytest.mark.parametrize("config", [NVFP4Config(), MXFP4Config()], ids=["nvfp4", "mxfp4"])
def test_dequantize_captures_in_a_cuda_graph(config):
    w = torch.randn(64, 128, device="cuda")
    w[0, :32] = 0  # zero blocks: MXFP4's E8M0 code 0 path
    qt = config.quantize(w)
    eager = qt.dequantize(torch.float32)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # no warm-up call on purpose: the first call is the captured one
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = qt.dequantize(torch.float32)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int32), eager.view(torch.int32))
