"""Sequential (layer-by-layer) GPTQ: better than RTN, and a killed run resumes from its last finished layer."""

import json

import pytest
import torch

import fp4kit
from fp4kit.algorithms import GPTQConfig
from fp4kit.algorithms.sequential import sequential_gptq
from fp4kit.nn import FP4Linear
from helpers import tiny_llama

G = torch.Generator().manual_seed(7)
BATCHES = [torch.randint(0, 128, (2, 24), generator=G) for _ in range(3)]


def fp4_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config", [fp4kit.NVFP4Config(), fp4kit.MXFP4Config()], ids=["nvfp4", "mxfp4"])
def test_sequential_gptq_beats_rtn(config):
    """Same model and data as test_calibrate's one-pass GPTQ test (4 x 8 x 64 calibration tokens)."""
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 128, (8, 64), generator=g) for _ in range(4)]
    test = torch.randint(0, 128, (8, 64), generator=g)
    base = tiny_llama()
    with torch.no_grad():
        ref = base(test).logits.float()

    def error(model):
        with torch.no_grad():
            return float((model(test).logits.float() - ref).norm() / ref.norm())

    rtn = tiny_llama()
    fp4kit.quantize_(rtn, config, progress=False)
    seq = tiny_llama()
    result = sequential_gptq(seq, calib, config, GPTQConfig(), progress=False)
    assert sum(isinstance(m, FP4Linear) for m in seq.modules()) == 14 == len(result.report.quantized)
    assert "lm_head" in result.report.excluded and len(result.output_error) == 14
    print(config.name, "sequential / RTN logit error", error(seq) / error(rtn))
    assert error(seq) < 0.9 * error(rtn)


def test_killed_run_resumes_from_last_finished_layer(tmp_path):
    config = fp4kit.NVFP4Config()
    whole = tiny_llama(seed=3).float()
    sequential_gptq(whole, BATCHES, config, progress=False)

    class Killed(Exception):
        pass

    def kill_after_first(i):
        if i == 0:
            raise Killed

    first = tiny_llama(seed=3).float()
    with pytest.raises(Killed):
        sequential_gptq(first, BATCHES, config, state_dir=tmp_path, progress=False, on_layer_done=kill_after_first)
    assert json.loads((tmp_path / "progress.json").read_text())["done"] == 0

    seen = []
    resumed = tiny_llama(seed=3).float()  # a fresh process: the float model again, same folder
    sequential_gptq(resumed, BATCHES, config, state_dir=tmp_path, progress=False, on_layer_done=seen.append)
    assert seen == [1]  # layer 0 was not redone
    a, b = fp4_state(whole), fp4_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]), k


def test_other_settings_in_the_state_folder_are_refused(tmp_path):
    sequential_gptq(tiny_llama(seed=3).float(), BATCHES, fp4kit.NVFP4Config(), state_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        sequential_gptq(tiny_llama(seed=3).float(), BATCHES, fp4kit.MXFP4Config(), state_dir=tmp_path,
                        progress=False)
