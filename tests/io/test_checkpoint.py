"""Export to the compressed-tensors layout and import it back; conformance with the real readers."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import fp4kit
from helpers import tiny_llama
from fp4kit.io import load_checkpoint, quantization_config, save_checkpoint
from fp4kit.nn import FP4Linear

ROOT = pathlib.Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 127, 64, 3, 8, 15, 99]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_round_trip_is_bit_identical(quantized_tiny, tmp_path):
    model, _ = quantized_tiny
    save_checkpoint(model, tmp_path / "ck", progress=False)
    loaded, _, info = load_checkpoint(tmp_path / "ck")
    assert info.quantized == sorted(n for n, m in model.named_modules() if isinstance(m, FP4Linear))
    for name in info.quantized:
        a, b = model.get_submodule(name), loaded.get_submodule(name)
        assert torch.equal(a.weight_packed, b.weight_packed)
        assert torch.equal(a.weight_scale.view(torch.uint8), b.weight_scale.view(torch.uint8))
    assert torch.equal(logits(model), logits(loaded))


def test_transformers_loads_export_with_same_logits(quantized_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = quantized_tiny
    save_checkpoint(model, tmp_path / "ck", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16).eval()
    assert torch.equal(logits(hf), logits(model))


def ct_versions():
    return [("site-packages", None)] + [(p.name, str(p)) for p in sorted((ROOT / ".deps").glob("ct-*"))]


@pytest.mark.parametrize("label,path", ct_versions(), ids=[v[0] for v in ct_versions()])
def test_compressed_tensors_decompresses_to_our_weights(quantized_tiny, tmp_path, label, path):
    model, _ = quantized_tiny
    save_checkpoint(model, tmp_path / "ck", max_shard_bytes=30_000, progress=False)
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(ROOT / "tests/reference/ct_decompress.py"), str(tmp_path / "ck"),
                           str(tmp_path / "dense.safetensors")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dense = load_file(str(tmp_path / "dense.safetensors"))
    fp4_layers = [n for n, m in model.named_modules() if isinstance(m, FP4Linear)]
    assert sorted(dense) == sorted(fp4_layers)
    for name in fp4_layers:
        assert torch.equal(dense[name], model.get_submodule(name).dequantize_weight(torch.bfloat16)), name


def test_config_matches_compressed_tensors_presets(quantized_tiny):
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    _, config = quantized_tiny
    ours = QuantizationConfig.model_validate(quantization_config(config, ["lm_head"]))
    preset = "NVFP4A16" if config.name == "nvfp4" else "MXFP4A16"
    theirs = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])},
                                format=f"{config.name}-pack-quantized", ignore=["lm_head"],
                                quantization_status="compressed")
    assert ours.model_dump() == theirs.model_dump()


def test_sharded_export_writes_index(quantized_tiny, tmp_path):
    model, _ = quantized_tiny
    res = save_checkpoint(model, tmp_path / "ck", max_shard_bytes=20_000, progress=False)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert len(res.shards) > 1 and set(index["weight_map"].values()) == set(res.shards)
    assert index["metadata"]["total_size"] == res.total_bytes
    assert not (tmp_path / "ck" / "model.safetensors").exists()


def test_fused_shards_share_global_scale_in_export(tmp_path):
    model = tiny_llama()
    fp4kit.quantize_(model, fp4kit.NVFP4Config(), progress=False)
    save_checkpoint(model, tmp_path / "ck", progress=False)
    t = load_file(str(tmp_path / "ck" / "model.safetensors"))
    p = "model.layers.0."
    qkv = [t[f"{p}self_attn.{x}_proj.weight_global_scale"] for x in "qkv"]
    gu = [t[f"{p}mlp.{x}_proj.weight_global_scale"] for x in ("gate", "up")]
    assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[1], qkv[2]) and torch.equal(gu[0], gu[1])


def test_reads_checkpoint_written_by_compressed_tensors(tmp_path):
    """Layers compressed by compressed-tensors' own NVFP4 compressor, config from its QuantizationConfig."""
    from compressed_tensors.compressors import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    model = tiny_llama(seed=3)
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    state, expected = {}, {}
    for name, t in model.state_dict().items():
        mod = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and "proj" in name:
            w = t.float()
            g = w.reshape(w.shape[0], -1, 16)
            gs = generate_gparam(w.min(), w.max())
            scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), scheme.weights, global_scale=gs)
            c = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": gs}, scheme)
            state.update({f"{mod}.{k}": c[k] for k in ("weight_packed", "weight_scale", "weight_global_scale")})
            expected[mod] = NVFP4PackedCompressor.decompress(dict(c), scheme)["weight"]
        elif not name.startswith("lm_head"):
            state[name] = t
    folder = tmp_path / "ct"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format="nvfp4-pack-quantized", ignore=["lm_head"],
                            quantization_status="compressed")
    cfg = model.config.to_dict() | {"quantization_config": json.loads(qc.model_dump_json())}
    (folder / "config.json").write_text(json.dumps(cfg))
    loaded, _, info = load_checkpoint(folder)
    assert info.format == "nvfp4-pack-quantized" and len(info.quantized) == len(expected) == 14
    for mod, w in expected.items():
        assert torch.equal(loaded.get_submodule(mod).dequantize_weight(torch.bfloat16), w.to(torch.bfloat16))


def test_reads_modelopt_nvfp4(tmp_path):
    """ModelOpt's layout: packed `weight`, `weight_scale` (fp8), `weight_scale_2` = amax/(6*448)."""
    model = tiny_llama(seed=4)
    config = fp4kit.NVFP4Config.torchao()  # the DECODE convention that ModelOpt stores
    state, expected = {}, {}
    for name, t in model.state_dict().items():
        mod = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and "proj" in name:
            qt = fp4kit.quantize(t, config)
            state.update({f"{mod}.weight": qt.data, f"{mod}.weight_scale": qt.scale,
                          f"{mod}.weight_scale_2": qt.global_scale.reshape(()), f"{mod}.input_scale": torch.ones(())})
            expected[mod] = qt.dequantize(torch.bfloat16)
        elif not name.startswith("lm_head"):
            state[name] = t
    folder = tmp_path / "modelopt"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    (folder / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                            "exclude_modules": ["lm_head"]}}))
    loaded, _, info = load_checkpoint(folder)
    assert info.format == "modelopt-nvfp4"
    for mod, w in expected.items():
        assert torch.equal(loaded.get_submodule(mod).dequantize_weight(torch.bfloat16), w)


def tiny_gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(5)
    cfg = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                       num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"], sliding_window=32,
                       max_position_embeddings=64)
    model = GptOssForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def write_gpt_oss_mxfp4(model, folder):
    """gpt-oss's own MXFP4 layout: experts [E, out, in/32, 16] bytes and [E, out, in/32] scales."""
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            qt = fp4kit.quantize(t.transpose(-1, -2).contiguous(), fp4kit.MXFP4Config())  # [E, out, in]
            e, n, k = qt.shape
            state[f"{name}_blocks"] = qt.data.reshape(e, n, k // 32, 16)
            state[f"{name}_scales"] = qt.scale
        else:
            state[name] = t
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    cfg = model.config.to_dict() | {"quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    (folder / "config.json").write_text(json.dumps(cfg))


def test_reads_gpt_oss_mxfp4_like_transformers(tmp_path):
    """transformers' own gpt-oss MXFP4 loader (dequantizing on CPU) and ours give the same logits."""
    from transformers import AutoModelForCausalLM

    write_gpt_oss_mxfp4(tiny_gpt_oss(), tmp_path / "oss")
    ours, _, info = load_checkpoint(tmp_path / "oss")
    assert info.format == "gpt-oss-mxfp4" and len(info.quantized) == 4
    experts = ours.model.layers[0].mlp.experts
    assert experts.parametrizations.gate_up_proj.original.numel() == 0  # stored as FP4 only
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "oss", dtype=torch.bfloat16).eval()
    for i in range(2):
        for p in ("gate_up_proj", "down_proj"):
            a = getattr(ours.model.layers[i].mlp.experts, p)
            b = getattr(hf.model.layers[i].mlp.experts, p)
            assert torch.equal(a, b), (i, p)
    assert torch.equal(logits(ours), logits(hf))
