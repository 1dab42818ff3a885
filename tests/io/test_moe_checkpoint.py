"""MoE export: fused in-memory experts written one expert at a time under the checkpoint names vLLM
reads (Qwen3-MoE `mlp.experts.E.gate_proj`, Mixtral `block_sparse_moe.experts.E.w1`), and read back."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fp4kit
from fp4kit.io import load_checkpoint, save_checkpoint
from fp4kit.nn import FP4Experts
from helpers import tiny_moe

ROOT = pathlib.Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 127, 64, 3, 8, 15, 99]])
CONFIGS = {"nvfp4": fp4kit.NVFP4Config(), "mxfp4": fp4kit.MXFP4Config()}
NAMES = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
         "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}


@pytest.fixture(scope="module", params=[(k, s) for k in NAMES for s in CONFIGS], ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request, tmp_path_factory):
    kind, scheme = request.param
    model = tiny_moe(kind, dtype=torch.bfloat16)
    fp4kit.quantize_(model, CONFIGS[scheme], progress=False)
    out = tmp_path_factory.mktemp("moe") / "ck"
    save_checkpoint(model, out, max_shard_bytes=40_000, progress=False)
    return kind, scheme, model, out


def all_keys(folder):
    keys = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            keys.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    return keys


def test_experts_written_per_expert_under_checkpoint_names(exported):
    kind, scheme, model, out = exported
    block, gate, up, down = NAMES[kind]
    keys = all_keys(out)
    suffixes = ["weight_packed", "weight_scale"] + (["weight_global_scale"] if scheme == "nvfp4" else [])
    for layer in range(2):
        for e in range(8):
            for proj in (gate, up, down):
                for s in suffixes:
                    assert f"model.layers.{layer}.{block}.experts.{e}.{proj}.{s}" in keys
        assert f"model.layers.{layer}.{block}.gate.weight" in keys  # the router, dense
    assert not any(".experts.gate_up" in k or ".experts.down_" in k for k in keys)  # no fused leftovers
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert f"model.layers.0.{block}.gate" in qc["ignore"] and "lm_head" in qc["ignore"]
    assert (out / "model.safetensors.index.json").exists()  # sharded: experts stream into several files


def test_gate_and_up_of_each_expert_share_the_global_scale(exported):
    kind, scheme, _, out = exported
    if scheme != "nvfp4":
        pytest.skip("MXFP4 has no global scale")
    block, gate, up, _ = NAMES[kind]
    t = {}
    for f in out.glob("*.safetensors"):
        t.update(load_file(str(f)))
    for e in range(8):
        p = f"model.layers.1.{block}.experts.{e}"
        assert torch.equal(t[f"{p}.{gate}.weight_global_scale"], t[f"{p}.{up}.weight_global_scale"])
    assert len({t[f"model.layers.1.{block}.experts.{e}.{gate}.weight_global_scale"].item() for e in range(8)}) > 1


def test_round_trip_is_bit_identical(exported):
    _, _, model, out = exported
    loaded, _, info = load_checkpoint(out)
    assert "model.layers.0.mlp.experts" in info.quantized
    for layer in range(2):
        a, b = model.model.layers[layer].mlp.experts, loaded.model.layers[layer].mlp.experts
        assert isinstance(b, FP4Experts)
        for k, v in a.state_dict().items():
            assert torch.equal(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
                               b.state_dict()[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn
                               else b.state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)


@pytest.mark.parametrize("ct", ["site-packages"] + [p.name for p in sorted((ROOT / ".deps").glob("ct-*"))])
def test_compressed_tensors_decompresses_each_expert_to_our_weights(exported, tmp_path, ct):
    kind, scheme, model, out = exported
    if (kind, scheme) not in (("qwen3_moe", "nvfp4"), ("mixtral", "mxfp4")):
        pytest.skip("two of the four layouts cover both formats and both namings")
    if ct == "site-packages" and importlib.util.find_spec("compressed_tensors") is None:
        pytest.skip("compressed-tensors is not installed here (install.sh installs it; the GPU image has none)")
    block, gate, up, down = NAMES[kind]
    env = dict(os.environ)
    if ct != "site-packages":
        env["PYTHONPATH"] = str(ROOT / ".deps" / ct) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(ROOT / "tests/reference/ct_decompress.py"), str(out),
                           str(tmp_path / "dense.safetensors")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dense = load_file(str(tmp_path / "dense.safetensors"))
    for layer in range(2):
        experts = model.model.layers[layer].mlp.experts
        for e in range(8):
            gu, dn = experts.dequantized(e, torch.bfloat16)
            p = f"model.layers.{layer}.{block}.experts.{e}"
            assert torch.equal(dense[f"{p}.{gate}"], gu[:32])
            assert torch.equal(dense[f"{p}.{up}"], gu[32:])
            assert torch.equal(dense[f"{p}.{down}"], dn)


def test_missing_expert_is_named(exported, tmp_path):
    kind, scheme, _, out = exported
    if (kind, scheme) != ("qwen3_moe", "nvfp4"):
        pytest.skip("one layout is enough")
    import shutil

    from safetensors.torch import save_file

    dst = tmp_path / "broken"
    shutil.copytree(out, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.experts.5.up_proj.weight_packed"
    shard = dst / index["weight_map"].pop(victim)
    t = load_file(str(shard))
    del t[victim]
    save_file(t, str(shard), metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts.*experts \[5\].*up_proj\.weight_packed"):
        load_checkpoint(dst)


def test_float_experts_in_checkpoint_are_fused_back(tmp_path):
    """A checkpoint whose experts were left in float (ignored) stores them per expert; loading fuses them."""
    model = tiny_moe(dtype=torch.bfloat16)
    fp4kit.quantize_(model, CONFIGS["nvfp4"], ignore=("lm_head", "model.layers.1.mlp.experts"), progress=False)
    save_checkpoint(model, tmp_path / "ck", progress=False)
    keys = all_keys(tmp_path / "ck")
    assert not any(".experts.gate_up_proj" in k for k in keys)
    assert keys["model.layers.1.mlp.experts.7.up_proj.weight"] == "BF16"
    assert "model.layers.0.mlp.experts.7.up_proj.weight_packed" in keys
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)
