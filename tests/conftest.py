import os
import warnings

import pytest
import torch

# Triton decides at `@triton.jit` time whether to interpret, and torchao / compressed-tensors import
# triton while other test modules are collected: so the switch is set here, before any of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", message=".*Enum subclass.*")


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
