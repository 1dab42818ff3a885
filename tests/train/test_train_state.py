"""fp4kit.train.state: a resumed run takes bit-for-bit the step the killed run would have taken."""

import json
import random

import pytest
import torch
from helpers import tiny_llama

from fp4kit.train.state import JsonlLogger, latest_checkpoint, list_checkpoints, load_state, plot_metrics, read_jsonl, save_state


def fresh(seed=0):
    """A float tiny Llama with frozen embeddings (trainable_only must rebuild them from the base), AdamW, schedule."""
    model = tiny_llama(seed=seed).float().train()
    model.config.attention_dropout = 0.0
    model.model.embed_tokens.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def step(model, opt, sched):
    """One step whose batch and noise come from torch, python and numpy RNGs: a resume must restore all three."""
    import numpy as np

    ids = torch.randint(0, 128, (2, 12))
    noise = random.random() + float(np.random.rand())
    loss = model(input_ids=ids, labels=ids).loss * (1 + 1e-3 * noise)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def test_resume_after_kill_gives_the_same_next_losses_bitwise(tmp_path):
    import numpy as np

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    model, opt, sched = fresh()
    straight = [step(model, opt, sched) for _ in range(5)]
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    model, opt, sched = fresh()
    for s in range(3):
        step(model, opt, sched)
    save_state(tmp_path, 3, model, opt, sched, extra={"cursor": 36})
    del model, opt, sched  # the "kill": nothing survives but the folder
    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # a new process has other RNG states

    model, opt, sched = fresh()
    got_step, extra = load_state(tmp_path, model, opt, sched)
    assert (got_step, extra) == (3, {"cursor": 36})
    resumed = [step(model, opt, sched) for _ in range(2)]
    assert torch.equal(torch.stack(resumed), torch.stack(straight[3:]))
    for n, p in model.named_parameters():
        assert torch.equal(p, final[n]), n


def test_only_trainable_parameters_are_saved_and_tied_ones_once(tmp_path):
    model, opt, _ = fresh()
    path = save_state(tmp_path, 1, model, opt)
    meta = json.loads((path / "meta.json").read_text())
    assert "model.embed_tokens.weight" not in meta["params"]
    assert meta["params"] == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    full = save_state(tmp_path / "all", 1, model, opt, trainable_only=False)
    # lm_head is tied to the embedding: named_parameters yields it once
    assert "lm_head.weight" not in json.loads((full / "meta.json").read_text())["params"]


def test_keep_last_n_and_latest(tmp_path):
    model, opt, _ = fresh()
    for s in (10, 20, 30, 40):
        save_state(tmp_path, s, model, opt, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    assert latest_checkpoint(tmp_path).name == "step_00000040"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, _ = fresh()
    save_state(tmp_path, 5, model, opt)

    def boom(*a, **k):
        raise KeyboardInterrupt  # a kill arriving mid-write

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_state(tmp_path, 6, model, opt)
    assert latest_checkpoint(tmp_path).name == "step_00000005"
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]  # no temporary folder left


def test_load_state_names_what_does_not_fit(tmp_path):
    model, opt, _ = fresh()
    save_state(tmp_path, 1, model, opt)
    other, opt2, _ = fresh()
    other.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="embed_tokens"):
        load_state(tmp_path, other, opt2)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_state(tmp_path / "empty", model, opt)


def test_jsonl_logger_and_plot(tmp_path):
    log = JsonlLogger(tmp_path / "log.jsonl")
    for s in range(5):
        log.log(s, loss=torch.tensor(2.0 - 0.1 * s), lr=1e-3)
    with (tmp_path / "log.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 1.')  # a line cut by a kill
    records = read_jsonl(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert records[2]["loss"] == pytest.approx(1.8)
    png = plot_metrics(tmp_path / "log.jsonl", ["loss", "lr"], tmp_path / "plots" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no numeric values for key 'kl'"):
        plot_metrics(tmp_path / "log.jsonl", ["kl"], tmp_path / "x.png")
