import pytest

import fp4kit
from helpers import tiny_llama


@pytest.fixture(params=["nvfp4", "mxfp4"])
def quantized_tiny(request):
    config = fp4kit.NVFP4Config() if request.param == "nvfp4" else fp4kit.MXFP4Config()
    model = tiny_llama()
    fp4kit.quantize_(model, config, progress=False)
    return model, config
