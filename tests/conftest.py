import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*Enum subclass.*")


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def odd_shapes():
    """Shapes with odd leading dims and last dims that are multiples of 32 but not powers of two."""
    return [(1, 32), (3, 96), (17, 160), (2, 5, 64), (33, 224)]


def wide_range(shape, generator=None, lo=-30, hi=30):
    """Values spanning 10^lo..10^hi in magnitude, both signs: extreme ranges for codec tests."""
    mag = torch.empty(shape).uniform_(lo, hi, generator=generator)
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    return sign * torch.pow(10.0, mag) * torch.rand(shape, generator=generator)


IN_CI = os.environ.get("CI") == "true"
