"""NVFP4 and MXFP4 bytes against compressed-tensors' own compressors, bit for bit.

compressed-tensors is what llm-compressor writes and vLLM reads. Every installed version is
checked: the newest in site-packages, and each under .deps/ct-* (install.sh puts 0.17.0, vLLM's
pin, there). Each version runs in its own subprocess (tests/reference/ct_reference.py).

Its conventions are fp4kit's defaults: NVFP4Config() (GlobalScale.ENCODE, subnormal block scales,
zero block scale 0.125) and, for MXFP4, ScaleRule.EVEN. One documented difference: an input of
exactly -0.0 becomes code 0 there (torch.sign(-0.0) is +0) and code 8 here; the inputs below
hold no -0.0.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import IN_CI
from fp4kit.formats import MXFP4Config, NVFP4Config, ScaleRule, quantize_mxfp4, quantize_nvfp4

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "reference" / "ct_reference.py"
PINNED = "0.17.0"


def ct_paths():
    paths = [("site-packages", None)]
    deps = sorted((ROOT / ".deps").glob("ct-*"))
    paths += [(p.name, str(p)) for p in deps]
    return paths


def inputs():
    g = torch.Generator().manual_seed(7)
    row_mag = torch.pow(10.0, torch.empty(33, 1).uniform_(-20, 20, generator=g))
    heavy = torch.distributions.StudentT(2.0).sample((17, 160)) * 0.02
    zero_blocks = torch.randn(5, 96, generator=g)
    zero_blocks[1] = 0.0
    zero_blocks[3, 32:64] = 0.0
    zero_blocks[4, :16] = 1e-9  # a block whose NVFP4 scale underflows UE4M3
    return {
        "gauss": torch.randn(64, 224, generator=g),
        "one_row": torch.randn(1, 32, generator=g),
        "rows_1e-20_to_1e20": torch.randn(33, 96, generator=g) * row_mag,
        "heavy_tail": heavy,
        "zero_blocks": zero_blocks,
        "bf16_values": torch.randn(19, 128, generator=g).bfloat16().float(),
    }


@pytest.fixture(scope="module", params=ct_paths(), ids=lambda p: p[0])
def ct_output(request, tmp_path_factory):
    label, path = request.param
    tmp = tmp_path_factory.mktemp(label)
    save_file(inputs(), str(tmp / "in.safetensors"))
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp / "in.safetensors"), str(tmp / "out.safetensors")],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode and "No module named 'compressed_tensors'" in proc.stderr and not IN_CI:
        pytest.skip("compressed-tensors is not installed (pip install -e '.[test]')")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(tmp / "out.safetensors"))


def test_pinned_version_is_checked():
    """vLLM pins compressed-tensors 0.17.0: CI must check it, not only the newest."""
    if not (ROOT / ".deps" / f"ct-{PINNED}").exists():
        if IN_CI:
            pytest.fail(f"install.sh should put compressed-tensors {PINNED} in .deps/ct-{PINNED}")
        pytest.skip(f"compressed-tensors {PINNED} not in .deps (run install.sh)")


@pytest.mark.parametrize("name", list(inputs()))
def test_nvfp4_bytes_match(ct_output, name):
    x = inputs()[name]
    qt = quantize_nvfp4(x, NVFP4Config.compressed_tensors())
    assert torch.equal(qt.data, ct_output[f"{name}.nvfp4.weight_packed"])
    assert torch.equal(qt.scale.view(torch.uint8), ct_output[f"{name}.nvfp4.weight_scale"].view(torch.uint8))
    assert torch.equal(qt.global_scale, ct_output[f"{name}.nvfp4.weight_global_scale"])


@pytest.mark.parametrize("name", list(inputs()))
def test_nvfp4_dequantize_matches_decompress(ct_output, name):
    """compressed-tensors decompresses to bf16; ours, asked for bf16, must give the same values."""
    qt = quantize_nvfp4(inputs()[name])
    assert torch.equal(qt.dequantize(torch.bfloat16).float(), ct_output[f"{name}.nvfp4.weight"])


@pytest.mark.parametrize("name", list(inputs()))
def test_mxfp4_bytes_match(ct_output, name):
    x = inputs()[name]
    qt = quantize_mxfp4(x, MXFP4Config(ScaleRule.EVEN))
    assert torch.equal(qt.data, ct_output[f"{name}.mxfp4.weight_packed"])
    assert torch.equal(qt.scale, ct_output[f"{name}.mxfp4.weight_scale"])
    assert torch.equal(qt.dequantize(torch.bfloat16).float(), ct_output[f"{name}.mxfp4.weight"])


def test_version_reported(ct_output):
    version = bytes(ct_output["__version__"].tolist()).decode()
    assert version[0].isdigit()
