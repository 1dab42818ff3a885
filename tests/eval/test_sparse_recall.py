"""Recall measurement on constructed cases, and Q/K capture on a tiny model."""

import math
from dataclasses import replace

import pytest
import torch
from helpers import tiny_llama

from fp4kit.eval.sparse import (REFERENCE, RecallRow, calibrate_rotation, capture_qk, choose_per_layer, head_recall,
                                measure_recall, summarize)
from fp4kit.nn.indexer import IndexerConfig, IndexPrecision


def keys_along_axis(values, D=32):
    k = torch.zeros(len(values), D)
    k[:, 0] = torch.tensor(values)
    return k


def test_reference_variant_has_full_recall():
    q, k = torch.randn(2, 6, 32), torch.randn(10, 32)
    rows = head_recall(q, k, 0.3, [3], {"ref": REFERENCE})
    assert rows[0].set_recall == 1.0 and abs(rows[0].mass_recall - 1.0) < 1e-6
    assert rows[0].queries == 6  # positions 4..9 all have more than 3 causal keys


def test_bf16_ties_lose_the_set_but_little_mass():
    # scores 1.0, 1.001, 1.002, 0.5 round to 1, 1, 1, 0.5 in bf16: the tie goes to key 0, fp32 picks key 2
    k = keys_along_axis([1.0, 1.001, 1.002, 0.5])
    q = torch.zeros(1, 1, 32)
    q[0, 0, 0] = 1.0
    scale = 2.0
    # uncentered: centering on the mean key would move the scores off the bf16 tie this case is built on
    bf16 = IndexerConfig(precision=IndexPrecision.BF16, rotate=False, rerank=1, center_keys=False)
    (row,) = head_recall(q, k, scale, [1], {"bf16": bf16})
    assert row.set_recall == 0.0
    assert math.isclose(row.mass_recall, math.exp(scale * (1.0 - 1.002)), rel_tol=1e-5)
    # the rerank reads bf16 keys: it cannot split what bf16 merged
    (row2,) = head_recall(q, k, scale, [1], {"r4": IndexerConfig(precision=IndexPrecision.BF16, rotate=False,
                                                                    rerank=4, center_keys=False)})
    assert row2.set_recall == 0.0


def test_two_stage_recovers_what_fp4_merged():
    # MXFP4 (RCEIL) rounds 1.0, 1.125, 1.25 all to 1.0 (4.0, 4.5, 5.0 times 2^-2 -> code 4): a three-way tie
    # that single-stage FP4 gives to key 0; the rerank over exact bf16 keys finds key 2
    k = keys_along_axis([1.0, 1.125, 1.25, 0.5])
    q = torch.zeros(1, 1, 32)
    q[0, 0, 0] = 1.0
    fp4 = IndexerConfig(precision=IndexPrecision.MXFP4, rotate=False, rerank=1, center_keys=False)  # the tie as built
    (one,) = head_recall(q, k, 1.0, [1], {"fp4": fp4})
    (two,) = head_recall(q, k, 1.0, [1], {"fp4_r2": IndexerConfig(precision=IndexPrecision.MXFP4, rotate=False,
                                                                   rerank=3, center_keys=False)})
    assert one.set_recall == 0.0 and math.isclose(one.mass_recall, math.exp(-0.25), rel_tol=1e-5)
    assert two.set_recall == 1.0 and math.isclose(two.mass_recall, 1.0, rel_tol=1e-6)


def test_k_at_least_the_context_has_no_live_queries():
    rows = head_recall(torch.randn(1, 4, 32), torch.randn(4, 32), 1.0, [4, 8], {"ref": REFERENCE})
    assert rows == []


def test_capture_keeps_the_forward_and_shapes():
    model = tiny_llama().float()
    ids = torch.randint(0, 128, (1, 12))
    want = model(ids).logits
    cap = capture_qk(model, ids)
    assert sorted(cap.q) == [0, 1]
    assert cap.q[0].shape == (4, 12, 16) and cap.k[0].shape == (2, 12, 16)
    assert torch.allclose(model(ids).logits, want)  # the model is back on its own attention
    rows = measure_recall(model, ids, ks=[4], variants={"bf16": IndexerConfig(precision=IndexPrecision.BF16,
                                                                               rotate=False, rerank=1)},
                          progress=False)
    assert len(rows) == 2 * 2 and all(0.0 <= r.set_recall <= 1.0 for r in rows)


def test_summarize_means_and_mins():
    rows = [RecallRow(0, 0, "a", 64, 1.0, 1.0, 5), RecallRow(1, 0, "a", 64, 0.5, 0.9, 5)]
    s = summarize(rows)[("a", 64)]
    assert s["set_mean"] == 0.75 and s["set_min"] == 0.5 and abs(s["mass_min"] - 0.9) < 1e-7 and s["heads"] == 2


def test_centered_reference_has_full_recall_on_exact_data():
    # keys on a 1/4 grid with a shared offset: the mean of the first 4 keys (a 1/16 grid) and every centered score are
    # exact, so centering moves each query's scores by one constant and the fp32 top-k (ties included) is the same
    torch.manual_seed(0)
    q = torch.round(torch.randn(2, 12, 32) * 4) / 4
    k = torch.round(torch.randn(30, 32) * 4) / 4 + 7.0
    centered = IndexerConfig(precision=IndexPrecision.FP32, rotate=False, rerank=1, center_keys=True,
                             center_tokens=4)
    rows = head_recall(q, k, 0.2, [1, 3, 8], {"fp32_c": centered})
    assert len(rows) == 3 and all(r.set_recall == 1.0 for r in rows)
    # and the FP4 variant does benefit: centered MXFP4 keeps more of the top-8 set than plain MXFP4
    mx = IndexerConfig(precision=IndexPrecision.MXFP4, rotate=False, rerank=1, center_keys=False)
    plain, cent = (head_recall(q, k, 0.2, [8], {"v": c})[0].set_recall
                   for c in (mx, IndexerConfig(precision=IndexPrecision.MXFP4, rotate=False, rerank=1, center_tokens=4)))
    assert cent > plain


def test_choose_per_layer_takes_each_layers_best_option():
    R = RecallRow
    rows = [R(0, 0, "b32", 64, 0.90, 1, 5), R(0, 0, "full", 64, 0.80, 1, 5),  # layer 0: block 32
            R(0, 1, "b32", 64, 0.70, 1, 5), R(0, 1, "full", 64, 0.75, 1, 5),  # (mean over heads: 0.80 vs 0.775)
            R(1, 0, "b32", 64, 0.60, 1, 5), R(1, 0, "full", 64, 0.95, 1, 5),  # layer 1: full
            R(1, 0, "b32_r2", 64, 0.99, 1, 5), R(1, 0, "full_r2", 64, 0.98, 1, 5),  # both stages count
            R(2, 0, "b32", 64, 0.50, 1, 5), R(2, 0, "full", 64, 0.50, 1, 5),  # tie: the first option
            R(3, 0, "b32", 64, 0.10, 1, 5)]  # no row for "full": left to the default
    got = choose_per_layer(rows, {32: ["b32", "b32_r2"], None: ["full", "full_r2"]})
    assert got == {0: 32, 1: None, 2: 32}
    assert choose_per_layer(rows, {None: ["full"], 32: ["b32"]})[2] is None  # ties follow the listed order
    with pytest.raises(ValueError, match="two options"):
        choose_per_layer(rows, {32: ["b32"], None: ["b32"]})


def test_calibrate_rotation_picks_the_measured_argmax_per_layer():
    model = tiny_llama().float()
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(1))
    base = IndexerConfig(precision=IndexPrecision.NVFP4, rerank=1, center_keys=False)  # head dim 16
    chosen = calibrate_rotation(model, ids, base, blocks=(8, None), ks=(4, 8), progress=False)
    assert sorted(chosen) == [0, 1]
    assert chosen[0] != chosen[1]  # with this seed the two layers prefer different blocks: both branches run
    rows = measure_recall(model, ids, ks=(4, 8), progress=False,
                          variants={"b8": replace(base, rotate_block=8), "full": replace(base, rotate_block=None)})
    for layer, cfg in chosen.items():
        mean = {v: sum(r.set_recall for r in rows if r.layer == layer and r.variant == v) for v in ("b8", "full")}
        want = 8 if mean["b8"] >= mean["full"] else None
        assert cfg == replace(base, rotate_block=want)
    with pytest.raises(ValueError, match="does not rotate"):
        calibrate_rotation(model, ids, replace(base, rotate=False), progress=False)
