"""An upcycled MoE (tiny Llama) whose experts are trained in MXFP4 RCEIL, the DeepSeek-V4 way."""

import copy

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from fp4kit.formats import MXFP4Config, ScaleRule
from fp4kit.nn import FP4Linear
from fp4kit.nn.fake_quant import QATConfig, convert, fp8_tile_report, prepare_qat
from fp4kit.train.moe_upcycle import UpcycleConfig, UpcycledMoE, experts_only, upcycle_
from fp4kit.train.qat import Loss, TrainConfig, Trainable, kd_loss, train_qat


def test_upcycling_keeps_the_dense_function():
    dense = tiny_llama().float()
    moe = copy.deepcopy(dense)
    names = upcycle_(moe, UpcycleConfig(num_experts=4, top_k=2))
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert isinstance(moe.model.layers[0].mlp, UpcycledMoE)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)
        _, chosen = moe.model.layers[0].mlp.route(torch.randn(64, 64))
    assert chosen.unique().numel() > 2  # the router spreads tokens over experts


def test_deepseek_v4_recipe_mxfp4_experts_qad_from_the_dense_model():
    from test_qat import char_tokens

    torch.manual_seed(0)
    tokens = char_tokens(60_000)
    teacher = tiny_llama().float()
    dense_cfg = TrainConfig(steps=100, lr=1e-2, warmup_steps=5, batch_size=16, seq_len=64, loss=Loss.CE,
                            trainable=Trainable.ALL)
    train_qat(teacher, tokens[:50_000], dense_cfg, progress=False)  # a dense model that knows some text
    teacher.eval()
    student = copy.deepcopy(teacher)
    upcycle_(student, UpcycleConfig(num_experts=4, top_k=2, expert_noise=0.01))
    report = prepare_qat(student, QATConfig(MXFP4Config(ScaleRule.RCEIL)), filter_fn=experts_only)
    assert len(report.quantized) == 2 * 4 * 3 and all(".experts." in n for n in report.quantized)
    assert report.excluded["model.layers.0.self_attn.q_proj"] == "filter_fn returned False"  # attention stays float
    assert report.excluded["model.layers.0.mlp.router"] == "filter_fn returned False"
    ids = torch.stack([tokens[50_000 + i * 64:50_000 + (i + 1) * 64] for i in range(16)])  # held out
    with torch.no_grad():
        kl_start = float(kd_loss(student(ids).logits, teacher(ids).logits))
    router_before = student.model.layers[0].mlp.router.weight.detach().clone()
    cfg = TrainConfig(steps=25, lr=1e-3, warmup_steps=2, batch_size=8, seq_len=64, loss=Loss.KD)
    train_qat(student, tokens[:50_000], cfg, teacher=teacher, progress=False)
    convert(student)
    with torch.no_grad():
        kl_end = float(kd_loss(student(ids).logits, teacher(ids).logits))
    print(f"upcycled MoE, MXFP4 RCEIL experts: KL to dense {kl_start:.5f} (RTN) -> {kl_end:.5f} (QAD)")
    assert kl_start > 5e-5 and kl_end < kl_start / 2, (kl_start, kl_end)
    assert not torch.equal(student.model.layers[0].mlp.router.weight, router_before)  # routers train too
    expert = student.model.layers[1].mlp.experts[3]
    assert isinstance(expert.gate_proj, FP4Linear) and type(student.model.layers[1].self_attn.o_proj) is nn.Linear
    tiles = fp8_tile_report(student)
    assert len(tiles) == 24 and all(t.lossless for t in tiles.values())  # FP8 kernels could serve these experts


def test_upcycle_errors():
    with pytest.raises(ValueError, match="top_k"):
        UpcycleConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="model.layers"):
        upcycle_(nn.Linear(4, 4))
