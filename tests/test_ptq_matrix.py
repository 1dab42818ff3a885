"""benchmarks/ptq_matrix.py: calibration windows (BOS handling, text mixes), the deadline estimate and the
recovery summary, on a character-level fake tokenizer and synthetic records (no model needed)."""

import importlib.util
import pathlib
from types import SimpleNamespace

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("ptq_matrix_script", ROOT / "benchmarks" / "ptq_matrix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pm = _load()


class CharTokenizer:
    """ids = code points; with `bos` set, a leading BOS like Gemma-3's tokenizer (SmolLM2's adds none)."""

    def __init__(self, bos=None):
        self.bos_token_id = bos

    def __call__(self, text, return_tensors=None):
        ids = ([self.bos_token_id] if self.bos_token_id is not None else []) + [ord(c) for c in text]
        return SimpleNamespace(input_ids=torch.tensor([ids]))


TEXT = "".join(chr(97 + i % 26) for i in range(1000))


def test_windows_without_bos_are_consecutive_slices():
    w = pm.windows(CharTokenizer(), TEXT, 4, 50, "t")
    ids = torch.tensor([ord(c) for c in TEXT])
    assert [x.shape for x in w] == [torch.Size([1, 50])] * 4
    for i, x in enumerate(w):
        assert torch.equal(x[0], ids[i * 50:(i + 1) * 50])


def test_windows_with_bos_start_with_bos_and_cover_the_text_without_overlap():
    w = pm.windows(CharTokenizer(bos=2), TEXT, 3, 50, "t")
    assert all(x.shape == (1, 50) and int(x[0, 0]) == 2 for x in w)
    text_ids = torch.cat([x[0, 1:] for x in w])  # 3 x 49 text tokens, in order
    assert torch.equal(text_ids, torch.tensor([ord(c) for c in TEXT[:147]]))


def test_windows_refuse_short_text_naming_it():
    with pytest.raises(ValueError, match=r"drop \(draw 0\): 1000 tokens < 30 windows x 50 tokens"):
        pm.windows(CharTokenizer(), TEXT, 30, 50, "drop")


def test_mix_alternates_sources(tmp_path):
    (tmp_path / "shakespeare.txt").write_text("s" * 200_000 + "S" * 1000)
    (tmp_path / "drop.txt").write_text("D" * 1000)
    w = pm.calibration(CharTokenizer(), tmp_path, 5, 40, "cpu", "mix")
    assert [chr(int(x[0, 0])) for x in w] == ["S", "D", "S", "D", "S"]  # 3 shakespeare, 2 drop
    only = pm.calibration(CharTokenizer(), tmp_path, 2, 40, "cpu")
    assert all(chr(int(x[0, 0])) == "S" for x in only)  # shakespeare after character 200,000


def test_expected_seconds():
    assert pm.expected_seconds({}, "gptq") == 0.0
    took = {"none": 30.0, "rtn": 33.0}
    assert pm.expected_seconds(took, "rtn") == 33.0
    assert pm.expected_seconds(took, "gptq") == 33.0  # no GPTQ-family history: the slowest so far
    took["mr-gptq"] = 120.0
    took["mse"] = 40.0
    assert pm.expected_seconds(took, "gptq") == 120.0  # the other GPTQ method
    assert pm.expected_seconds(took, "mse") == 40.0


def _records(fmt, method, values, ppl, calib="64x512", se=0.02):
    base = {"model": "m", "format": fmt, "method": method, "calib": calib}
    recs = [base | {"task": t, "metric": pm.MAIN_METRIC[t], "value": v, "stderr": se} for t, v in values.items()]
    recs.append(base | {"task": "ppl:shakespeare", "metric": "perplexity", "value": ppl, "stderr": None})
    return recs


def test_summarize_recovery_gap_and_stderr():
    tasks = list(pm.MAIN_METRIC)
    bf16 = dict(zip(tasks, [0.4, 0.4, 0.3, 0.6, 0.5, 0.2]))
    rtn = dict(bf16, basic_arithmetic=0.1)
    gptq = dict(bf16, basic_arithmetic=0.15)
    recs = (_records("bf16", "none", bf16, 40.0) + _records("nvfp4", "rtn", rtn, 50.0)
            + _records("nvfp4", "gptq", gptq, 44.0) + _records("nvfp4", "gptq", bf16, 41.0, calib="64x512 drop"))
    rows = {(r["format"], r["method"], r["calib"]): r for r in pm.summarize(recs)}
    b, g = rows[("bf16", "none", "")], rows[("nvfp4", "gptq", "64x512")]
    assert b["avg"] == pytest.approx(2.4 / 6)
    assert b["avg_se"] == pytest.approx((6 * 0.02 ** 2) ** 0.5 / 6)
    assert g["recovery"] == pytest.approx(2.35 / 2.4)
    assert g["recovery5"] == pytest.approx(1.0)
    assert g["ppl_gap_closed"] == pytest.approx(0.6)  # (50 - 44) / (50 - 40)
    d = rows[("nvfp4", "gptq", "64x512 drop")]  # other calibration: own row, RTN of any calibration as reference
    assert d["recovery"] == pytest.approx(1.0) and d["ppl_gap_closed"] == pytest.approx(0.9)
    assert "ppl_gap_closed" not in rows[("nvfp4", "rtn", "64x512")]


def test_variants_parse_and_reject():
    assert pm.variants("nvfp4:gptq:none,mxfp4:rtn:fp4") == [("nvfp4", "gptq", "none"), ("mxfp4", "rtn", "fp4")]
    assert len(pm.variants("all")) == 16
    with pytest.raises(ValueError, match="bad variant 'nvfp4:awq:none'"):
        pm.variants("nvfp4:awq:none")
    assert pm.variants("mxfp4:gptq:fp4-ri") == [("mxfp4", "gptq", "fp4-ri")]
    assert pm.variants("nvfp4:mr-gptq-seq:none") == [("nvfp4", "mr-gptq-seq", "none")]
    with pytest.raises(ValueError, match="need gptq or mr-gptq"):
        pm.variants("mxfp4:rtn:fp4-ri")


def test_paired_recovery_se_by_hand():
    """Two tasks of four items; bf16 '1100' / '1010' (avg 0.5), quantized '1000' / '1011'. Per-item differences
    (0,-1,0,0) and (0,0,0,1): each task's sample variance 0.25, over n = 4 -> 0.0625; se of the two-task mean
    sqrt(0.125) / 2, over bf16's average 0.5."""
    base = {"a": "1100", "b": "1010"}
    assert pm.paired_recovery_se({"a": "1000", "b": "1011"}, base, 0.5) == pytest.approx(0.125 ** 0.5 / 2 / 0.5)
    assert pm.paired_recovery_se(dict(base), base, 0.5) == 0.0  # same answers: no uncertainty about the ratio
    assert pm.paired_recovery_se({"a": "100", "b": "1011"}, base, 0.5) is None  # not the same items
    assert pm.paired_recovery_se({"a": "1000"}, base, 0.5) is None
    assert pm.paired_recovery_se(None, base, 0.5) is None


def test_summarize_pairs_per_item_scores():
    tasks = list(pm.MAIN_METRIC)
    b_items, q_items = "1100", "1000"
    bf16 = _records("bf16", "none", {t: 0.5 for t in tasks}, 40.0)
    q = _records("nvfp4", "rtn", {t: 0.25 for t in tasks}, 50.0)
    for r in bf16[:-1]:
        r["items"] = b_items
    for r in q[:-1]:
        r["items"] = q_items
    rows = {(r["format"], r["method"]): r for r in pm.summarize(bf16 + q)}
    # six tasks, each with per-item differences (0,-1,0,0): variance 0.25 / 4 each
    assert rows[("nvfp4", "rtn")]["recovery_paired_se"] == pytest.approx((6 * 0.0625) ** 0.5 / 6 / 0.5)
    assert "recovery_paired_se" not in rows[("bf16", "none")]


def test_rotation_suffix_labels_only_non_default_rotations_of_rotating_methods():
    assert pm.rotation_suffix("mr-gptq", None, False) == ""
    assert pm.rotation_suffix("mr-gptq", 128, False) == "@r128"
    assert pm.rotation_suffix("mr-gptq-seq", 64, True) == "@r64s"
    assert pm.rotation_suffix("mr-signround", None, True) == "@rfmts"
    assert pm.rotation_suffix("gptq", 128, True) == ""  # plain GPTQ never rotates here


@pytest.mark.parametrize("size, signs", [(None, False), (16, False), (32, True)])
def test_quantize_applies_the_requested_rotation(size, signs):
    """The rotation options reach apply_ptq: every quantized layer's online rotation has the asked block and
    signs (MXFP4 MR-GPTQ on a tiny random Gemma-3, hidden 64, intermediate 96)."""
    from fp4kit.nn.linear import FP4Linear
    from tests.algorithms.test_sequential_gemma3 import tiny_gemma3

    model = tiny_gemma3()
    batches = [torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    report = pm.quantize(model, "mxfp4", "mr-gptq", "none", batches, rotation_size=size, random_signs=signs)
    online = [m for m in model.modules() if isinstance(m, FP4Linear) and m.rotation_config is not None]
    assert report.rotated and online
    assert {(m.rotation_config.block_size, m.rotation_config.random_signs) for m in online} == {(size or 32, signs)}


def test_calibration_draws_are_disjoint_and_labelled(tmp_path):
    (tmp_path / "shakespeare.txt").write_text("s" * 200_000 + TEXT)
    (tmp_path / "drop.txt").write_text(TEXT[::-1])
    d0 = pm.calibration(CharTokenizer(), tmp_path, 4, 40, "cpu", "mix")
    d1 = pm.calibration(CharTokenizer(), tmp_path, 4, 40, "cpu", "mix", draw=1)
    # draw 1 starts where draw 0 ended, in each source: shakespeare windows 2-3 and drop windows 2-3
    assert torch.equal(d1[0], pm.windows(CharTokenizer(), TEXT, 4, 40, "t")[2])
    assert torch.equal(d1[1], pm.windows(CharTokenizer(), TEXT[::-1], 4, 40, "t")[2])
    assert not {tuple(w[0].tolist()) for w in d0} & {tuple(w[0].tolist()) for w in d1}
    with pytest.raises(ValueError, match="draw 13"):
        pm.windows(CharTokenizer(), TEXT, 2, 40, "shakespeare", draw=13)  # 1,000 tokens hold 25 windows of 40
    a = SimpleNamespace(calib_samples=64, calib_seq_len=512, calib_text="mix", calib_draw=2)
    assert pm.calib_label(a) == "64x512 mix draw2"
    assert pm.calib_label(SimpleNamespace(calib_samples=64, calib_seq_len=512, calib_text="mix", calib_draw=0)) \
        == "64x512 mix"


def test_qad_variant_trains_toward_the_teacher_and_converts():
    """`qad` (QAD reference point): after training, every quantized layer is a real FP4Linear and the model is
    closer to its float teacher (KL on fresh windows) than RTN of the same weights; windows start with BOS."""
    import copy

    import torch.nn.functional as F

    from fp4kit.nn import FP4Linear
    from tests.algorithms.test_sequential_gemma3 import tiny_gemma3

    teacher = tiny_gemma3()
    stream = torch.randint(3, 128, (4000,), generator=torch.Generator().manual_seed(0))
    held = torch.cat([torch.full((4, 1), 2), torch.randint(3, 128, (4, 31), generator=torch.Generator().manual_seed(1))], 1)
    rtn = copy.deepcopy(teacher)
    pm.quantize(rtn, "mxfp4", "rtn", "none", None)
    student = copy.deepcopy(teacher)
    pm.quantize(student, "mxfp4", "qad", "none", None,
                qad_args=dict(teacher=teacher, tokens=stream, bos=2, steps=30, lr=1e-4, batch_size=4, seq_len=32))
    assert all(isinstance(m, FP4Linear) for n, m in student.named_modules() if n.endswith(("q_proj", "down_proj")))

    def kl(m):
        with torch.no_grad():
            t, s = teacher(held).logits.log_softmax(-1), m(held).logits.log_softmax(-1)
        return F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean").item()

    assert kl(student) < 0.7 * kl(rtn), (kl(student), kl(rtn))


def test_qad_tokens_never_include_the_evaluated_text(tmp_path):
    (tmp_path / "shakespeare.txt").write_text("e" * 200_000 + "abc")
    (tmp_path / "drop.txt").write_text("xyz")
    ids, bos = pm.qad_tokens(CharTokenizer(bos=2), tmp_path, "mix")
    assert bos == 2 and ids.tolist() == [ord(c) for c in "abcxyz"]
