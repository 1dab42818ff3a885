"""Rotated (MR-GPTQ) checkpoints: bit-exact round trip, compressed-tensors' transform_config builds our
matrix, what cannot be expressed is ours alone, and configs fp4kit cannot apply are refused."""

import copy
import json
import pathlib

import pytest
import torch
from torch import nn

import fp4kit
from fp4kit.algorithms import PTQMethod, PTQRecipe, RotationConfig, apply_ptq, rotate_model_
from fp4kit.io import load_checkpoint, save_checkpoint
from fp4kit.io.transforms import ct_transform_config
from fp4kit.nn.rotation import RotatedLinear, hadamard
from helpers import tiny_llama

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def mr_gptq_tiny(config, rotation, method=PTQMethod.MR_GPTQ):
    model = tiny_llama()
    batches = [torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    apply_ptq(model, config, PTQRecipe(method, rotation), batches=batches, progress=False)
    return model


@pytest.mark.parametrize("config", [fp4kit.NVFP4Config(), fp4kit.MXFP4Config()], ids=lambda c: c.name)
@pytest.mark.parametrize("signs", [False, True])
def test_rotated_checkpoint_round_trips_bit_exactly(tmp_path, config, signs):
    """RTN on rotated weights (the export does not depend on how the codes were chosen; the MR-GPTQ
    export is the `saved` fixture's, checked below)."""
    model = mr_gptq_tiny(config, RotationConfig(16, signs, seed=4), PTQMethod.RTN)
    save_checkpoint(model, tmp_path / "q", progress=False)
    loaded, _, info = load_checkpoint(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert loaded.model.layers[1].mlp.down_proj.rotation_config == RotationConfig(16, signs, seed=4)
    assert loaded.model.layers[1].self_attn.o_proj.rotation is None  # folded into v_proj
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    (group,) = cfg["fp4kit_rotation"]["groups"]
    assert len(group["targets"]) == 12 and group["block_size"] == 16 and group["random_signs"] == signs
    assert ("transform_config" in cfg["quantization_config"]) != signs
    card = (tmp_path / "q" / "README.md").read_text()
    assert ("vLLM cannot serve this checkpoint yet" in card) == signs


def test_transform_config_is_compressed_tensors_and_builds_our_matrix():
    """CT 0.20 parses the config we write, fuses the same W R into the weight and applies the same x R online;
    its transform weight is the +-1 tensor we export."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    ours = copy.deepcopy(model)
    rot = RotationConfig(16)
    ours[0], ours[2] = (RotatedLinear.from_linear(model[i], rot, name=str(i)) for i in (0, 2))
    ct = copy.deepcopy(model)
    apply_transform_config(ct, TransformConfig.model_validate(ct_transform_config({"0": rot, "2": rot})))
    x = torch.randn(5, 64)
    for i in (0, 2):
        torch.testing.assert_close(ct[i].weight, ours[i].weight, rtol=0, atol=1e-6)
        t = getattr(ct[i], "fp4kit_hadamard_16_input")
        assert torch.equal(t.weight.double(), hadamard(16, torch.float64) * 4)
    torch.testing.assert_close(getattr(ct[0], "fp4kit_hadamard_16_input")(x), ours[0].rotate(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(ct(x), ours(x), rtol=0, atol=1e-6)


def test_exported_transform_tensors_are_what_compressed_tensors_names_them(saved):
    from safetensors.torch import load_file

    tensors = load_file(saved[1] / "model.safetensors")
    t = tensors["model.layers.0.mlp.down_proj.fp4kit_hadamard_16_input.weight"]
    assert t.dtype == torch.bfloat16 and torch.equal(t.double(), hadamard(16, torch.float64) * 4)
    assert "model.layers.0.self_attn.o_proj.fp4kit_hadamard_16_input.weight" not in tensors  # folded: no transform


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An MR-GPTQ NVFP4 tiny Llama (block 16, no signs) and its checkpoint folder, built once."""
    model = mr_gptq_tiny(fp4kit.NVFP4Config(), RotationConfig(16))
    folder = tmp_path_factory.mktemp("rot") / "q"
    save_checkpoint(model, folder, progress=False)
    return model, folder


def _copy(folder, tmp_path):
    import shutil

    return pathlib.Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit_config(folder, edit):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def test_mr_gptq_checkpoint_round_trips_and_reads_from_transform_config_alone(saved, tmp_path):
    model, folder = saved
    with torch.no_grad():
        assert torch.equal(load_checkpoint(folder)[0](IDS).logits, model(IDS).logits)
    folder = _copy(folder, tmp_path)
    _edit_config(folder, lambda c: c.pop("fp4kit_rotation"))
    loaded, _, _ = load_checkpoint(folder)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["quantization_config"]["transform_config"]["config_groups"]["fp4kit_hadamard_16"]
     .update(type="random-hadamard"), "'random-hadamard'.*not supported"),
    (lambda c: c["quantization_config"]["transform_config"]["config_groups"]["fp4kit_hadamard_16"]["apply"][0]
     .update(location="output"), "location 'output'.*not supported"),
    (lambda c: c["fp4kit_rotation"].update(version=9), "fp4kit_rotation format .* version 9 is not supported"),
], ids=["type", "location", "version"])
def test_unsupported_rotation_configs_are_refused(saved, tmp_path, edit, match):
    folder = _copy(saved[1], tmp_path)
    _edit_config(folder, lambda c: (c.pop("fp4kit_rotation") if "version" not in match else None, edit(c)))
    with pytest.raises(ValueError, match=match):
        load_checkpoint(folder)


def test_float_rotated_layers_cannot_be_exported(tmp_path):
    model = tiny_llama()
    rotate_model_(model, fp4kit.NVFP4Config(), RotationConfig(16))
    fp4kit.quantize_(model, fp4kit.NVFP4Config(), ignore=("lm_head", "down_proj"), progress=False)
    with pytest.raises(ValueError, match=r"down_proj is a float RotatedLinear"):
        save_checkpoint(model, tmp_path / "q", progress=False)
