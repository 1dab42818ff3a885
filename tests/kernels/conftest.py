"""Kernel tests run on CUDA when present, else on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported (it decides at `@triton.jit` time),
so it is set here, at collection, only when there is no GPU. Test modules skip when triton is
not importable.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
