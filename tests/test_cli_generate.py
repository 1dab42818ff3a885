"""`fp4kit generate`, `chat` (piped stdin) and `bench` on a tiny random Llama folder with a character tokenizer."""

import io
import json

import pytest
import torch

from fp4kit.cli import main

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?\n<>|/"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    return str(path)


def test_generate_prints_each_completion(folder, capsys):
    assert main(["generate", folder, "--prompt", "hello", "--prompt", "to be or", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- ") == 2 and "8 tokens" in out or "eos" in out


def test_generate_fp4_fp8_stream(folder, capsys):
    assert main(["generate", folder, "--prompt", "hello", "--scheme", "nvfp4", "--kv-cache", "fp8",
                 "--max-new-tokens", "6", "--stream", "--chat"]) == 0
    captured = capsys.readouterr()
    assert "nvfp4: quantized 14 linear layers" in captured.err and captured.out.endswith("\n")


def test_chat_reads_piped_stdin_and_keeps_history(folder, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi there\n\nhow are you\n/exit\nnever read\n"))
    seen = []
    from fp4kit.engine import engine as engine_mod

    real = engine_mod.Engine.generate

    def spy(self, prompts, params=None, stream=None):
        seen.append(prompts[0])
        return real(self, prompts, params, stream)

    monkeypatch.setattr(engine_mod.Engine, "generate", spy)
    assert main(["chat", folder, "--max-new-tokens", "5", "--system", "be brief"]) == 0
    out = capsys.readouterr().out
    assert len(seen) == 2 and len(out.splitlines()) == 2  # two replies, one line each
    assert len(seen[1]) > len(seen[0])  # the second turn carries the first turn and its reply


def test_generate_errors_are_one_line(folder, capsys):
    assert main(["generate", folder, "--prompt", "", "--max-new-tokens", "4"]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["generate", "llama3-8b-random", "--prompt", "x"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


# the bench's baseline weights: bf16 on CUDA, float32 on the CPU (fp4kit.cli.generate)
BASELINE = "bf16" if torch.cuda.is_available() else "fp32"


def test_bench_runs_both_weight_formats(folder, capsys, tmp_path):
    path = tmp_path / "b.json"
    assert main(["bench", folder, "--batch", "1,2", "--prompt-len", "8", "--gen-len", "12", "--repeats", "1",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"| {BASELINE} | bf16 | 2 |" in out and "| nvfp4 | bf16 | 1 |" in out and "roofline" in out
    rows = json.loads(path.read_text())["results"]
    assert len(rows) == 4, rows
    assert all(r["decode_tok_s"] > 0 and r["roofline_frac"] > 0 and r["ttft_ms"] > 0 for r in rows), rows


def test_bench_fp4_head_and_unfused(folder, capsys, tmp_path):
    """--lm-head nvfp4 applies to the FP4 run only (the baseline keeps the model's head); --unfused is recorded."""
    path = tmp_path / "b.json"
    assert main(["bench", folder, "--batch", "1", "--prompt-len", "8", "--gen-len", "6", "--repeats", "1",
                 "--lm-head", "nvfp4", "--unfused", "--json", str(path)]) == 0
    assert "FP4 run's head nvfp4, unfused" in capsys.readouterr().out
    rows = json.loads(path.read_text())["results"]
    assert [(r["weights"], r["lm_head"], r["fused"]) for r in rows] == [(BASELINE, "model", False),
                                                                       ("nvfp4", "nvfp4", False)]


def test_generate_with_fp4_head(folder, capsys):
    assert main(["generate", folder, "--prompt", "hello", "--max-new-tokens", "6", "--lm-head", "nvfp4"]) == 0
    assert capsys.readouterr().out.strip()


def test_generate_with_int8_head(folder, capsys):
    assert main(["generate", folder, "--prompt", "hello", "--max-new-tokens", "6", "--lm-head", "int8"]) == 0
    assert capsys.readouterr().out.strip()


def test_bench_baseline_keeps_its_own_kv_cache(folder, capsys, tmp_path):
    """--baseline-kv-cache bf16 with --kv-cache fp8: the unquantized run keeps a bf16 cache, the FP4 run gets FP8."""
    path = tmp_path / "b.json"
    assert main(["bench", folder, "--batch", "1", "--prompt-len", "8", "--gen-len", "4", "--repeats", "1",
                 "--kv-cache", "fp8", "--baseline-kv-cache", "bf16", "--lm-head", "int8", "--json", str(path)]) == 0
    assert "kv fp8 (baseline bf16)" in capsys.readouterr().out
    rows = json.loads(path.read_text())["results"]
    assert [(r["weights"], r["kv_cache"], r["lm_head"]) for r in rows] == [(BASELINE, "bf16", "model"),
                                                                          ("nvfp4", "fp8", "int8")]
