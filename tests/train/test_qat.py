"""fp4kit.train.qat: a tiny model's FP4 QAT loss approaches its float loss; a killed run resumes exactly."""

import copy

import pytest
import torch
from helpers import tiny_llama

from fp4kit.formats import MXFP4Config, NVFP4Config, ScaleRule
from fp4kit.nn import quantize_
from fp4kit.nn.fake_quant import QATConfig, convert, prepare_qat
from fp4kit.train.qat import (Loss, TrainConfig, Trainable, batch_for_step, cosine_lr, kd_loss, split_tokens,
                              train_qat)
from fp4kit.train.state import read_jsonl


def char_tokens(n=120_000):
    """Tiny-shakespeare as ASCII codes: a real text a 128-token tiny Llama can learn on CPU in seconds."""
    from fp4kit.data import load_corpus

    text = load_corpus("shakespeare")[:n]
    return torch.tensor([min(ord(c), 127) for c in text], dtype=torch.long)


def held_out(tokens, n=32, seq=64):
    return torch.stack([tokens[i * seq:(i + 1) * seq] for i in range(n)])


@torch.no_grad()
def kl_to(teacher, model, windows):
    return float(kd_loss(model(input_ids=windows).logits, teacher(input_ids=windows).logits))


@pytest.fixture(scope="module")
def float_model():
    """A tiny Llama trained in float32 (CE, 200 steps) on character-level Shakespeare: the 'bf16' model."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train, test = split_tokens(char_tokens())
    model = tiny_llama().float()
    cfg = TrainConfig(steps=200, lr=1e-2, warmup_steps=10, batch_size=16, seq_len=64, loss=Loss.CE,
                      trainable=Trainable.ALL)
    result = train_qat(model, train, cfg, progress=False)
    torch.set_num_threads(threads)
    assert result.final_loss < 2.6  # it learned something beyond letter frequencies (~3.3)
    return model.eval(), train, held_out(test)


@pytest.mark.parametrize("fmt", [NVFP4Config(), MXFP4Config(ScaleRule.RCEIL)], ids=["nvfp4", "mxfp4-rceil"])
def test_qad_brings_the_fp4_model_close_to_the_float_model(float_model, fmt):
    teacher, train, windows = float_model
    rtn = copy.deepcopy(teacher)
    quantize_(rtn, fmt, progress=False)
    kl_rtn = kl_to(teacher, rtn, windows)
    student = copy.deepcopy(teacher)
    prepare_qat(student, QATConfig(fmt))
    assert kl_to(teacher, student, windows) == kl_rtn  # step 0 is the RTN model
    cfg = TrainConfig(steps=30, lr=1e-3, warmup_steps=4, batch_size=16, seq_len=64, loss=Loss.KD)
    result = train_qat(student, train, cfg, teacher=teacher, progress=False)
    convert(student)
    kl_qat = kl_to(teacher, student, windows)
    # The QAD loss (KL to the float model) on held-out text, after 30 steps. Recorded on CPU:
    # nvfp4 0.0036 -> 0.0002, mxfp4-rceil 0.0034 -> 0.0005 (40 steps). Tolerance: a third of RTN's.
    assert kl_rtn > 1e-3, "RTN must move the model for the test to mean anything"
    assert kl_qat < kl_rtn / 3, (kl_rtn, kl_qat)
    assert result.final_loss < kl_rtn  # the training loss went the same way


def test_resume_after_kill_continues_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    tokens = char_tokens(20_000)
    teacher = tiny_llama(seed=1).float().eval()
    cfg = TrainConfig(steps=6, lr=1e-3, warmup_steps=2, batch_size=4, seq_len=32, grad_accum=2, save_every=2,
                      loss=Loss.BOTH)

    def student():
        m = tiny_llama(seed=2).float()
        prepare_qat(m, QATConfig(MXFP4Config(ScaleRule.RCEIL)))
        return m

    train_qat(student(), tokens, cfg, teacher=teacher, out=tmp_path / "straight", progress=False)
    straight = read_jsonl(tmp_path / "straight" / "log.jsonl")

    class Killed(Exception):
        pass

    def kill_at_5(step, metrics):
        if step == 5:
            raise Killed  # after step 5 ran and was logged, before its checkpoint at 6

    with pytest.raises(Killed):
        train_qat(student(), tokens, cfg, teacher=teacher, out=tmp_path / "killed", progress=False, on_step=kill_at_5)
    torch.manual_seed(123)  # a new process
    result = train_qat(student(), tokens, cfg, teacher=teacher, out=tmp_path / "killed", progress=False)
    assert result.resumed_from == 4
    log = read_jsonl(tmp_path / "killed" / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 5, 6]
    for got, want in zip(log[-2:], straight[-2:]):
        for key in ("loss", "ce", "kd", "lr", "grad_norm"):
            assert got[key] == want[key], (got["step"], key)
    assert (tmp_path / "killed" / "loss.png").exists()


def test_cosine_schedule():
    cfg = TrainConfig(steps=11, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [cosine_lr(s, cfg) for s in range(11)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_ranks_take_slices_of_one_global_batch():
    tokens = torch.arange(1000)
    cfg = TrainConfig(batch_size=2, seq_len=8, grad_accum=3, seed=5)
    whole = batch_for_step(tokens, 7, TrainConfig(batch_size=4, seq_len=8, grad_accum=3, seed=5))
    parts = [batch_for_step(tokens, 7, cfg, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat(parts, dim=1), whole)
    assert not torch.equal(batch_for_step(tokens, 8, cfg), batch_for_step(tokens, 7, cfg))
    assert torch.equal(whole[0, 0, 1:] - whole[0, 0, :-1], torch.ones(8, dtype=torch.long))


def test_bos_windows_are_bos_then_the_stream_and_keep_the_draws():
    """With bos_token every window is [BOS, t_s .. t_{s+seq_len-1}]: the same shape, a contiguous stream slice after
    BOS; without it the windows are the ones drawn before the option existed (hand-checked: step 7, seed 5)."""
    tokens = torch.arange(1000) + 10
    plain = batch_for_step(tokens, 7, TrainConfig(batch_size=2, seq_len=8, grad_accum=3, seed=5))
    bos = batch_for_step(tokens, 7, TrainConfig(batch_size=2, seq_len=8, grad_accum=3, seed=5, bos_token=2))
    assert plain.shape == bos.shape == (3, 2, 9)
    assert (bos[..., 0] == 2).all()
    assert torch.equal(bos[..., 2:] - bos[..., 1:-1], torch.ones(3, 2, 7, dtype=torch.long))
    gen = torch.Generator().manual_seed(5 * 1_000_003 + 7)
    starts = torch.randint(0, 1000 - 9, (3, 2), generator=gen)
    assert torch.equal(plain[..., 0], starts + 10)
    tight = batch_for_step(torch.arange(10), 0, TrainConfig(batch_size=1, seq_len=8, bos_token=0))[0, 0]
    assert int(tight[1]) in (0, 1) and torch.equal(tight[1:], torch.arange(8) + tight[1])  # 10 tokens: 2 starts
    with pytest.raises(ValueError, match="fewer than 9"):
        batch_for_step(torch.arange(8), 0, TrainConfig(batch_size=1, seq_len=8, bos_token=0))
    with pytest.raises(ValueError, match="bos_token"):
        TrainConfig(bos_token=-1)


def test_kd_loss_is_the_kl_divergence():
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    p = t.softmax(-1)
    expect = (p * (p.log() - s.log_softmax(-1))).sum(-1).mean()
    assert kd_loss(s, t) == pytest.approx(float(expect), rel=1e-5)
    assert kd_loss(t, t) == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(s / 2, t / 2, temperature=1.0) == pytest.approx(float(kd_loss(s, t, temperature=2.0)) / 4, rel=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(TypeError, match="enums"):
        TrainConfig(loss="kd")
    with pytest.raises(ValueError, match="needs a teacher"):
        train_qat(tiny_llama().float(), torch.arange(100), TrainConfig(steps=1, seq_len=8), progress=False)
