"""How much of the FP4 quantization gap QAD recovers on SmolLM2-135M (one GPU, one run).

For each scheme (NVFP4, MXFP4 W4A16) and start (RTN, GPTQ):

    bf16 teacher  ->  PTQ start (RTN or GPTQ)  ->  QAD (KL to the bf16 teacher), `--steps` steps  ->  convert

and evaluate the bf16 model, each PTQ model and each QAD model (converted to real FP4Linear layers)
on the same held-out data:

    ppl     perplexity on the held-out last 10% of tiny-shakespeare (training used the first 90%)
    tasks   multiple-choice accuracy (acc_norm) on fixed samples of hellaswag / arc_easy / piqa

    recovered = (metric_ptq - metric_qad) / (metric_ptq - metric_bf16)   (1 = back to bf16, 0 = no gain)

Results are written after every stage to OUT/qat_smollm2.json (a killed run keeps what it finished),
with the device, the date, seconds per stage and the training throughput.

    python benchmarks/qat_smollm2.py --dump-tasks .stage/qat/tasks.json --limit 200      # on a machine with the data
    python benchmarks/qat_smollm2.py --model FILE.gguf --text .stage/qat/shakespeare.txt \\
        --tasks-json .stage/qat/tasks.json --out $OUT                                     # on the GPU
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import pathlib
import time

import torch

from fp4kit.eval import perplexity
from fp4kit.formats import MXFP4Config, NVFP4Config, ScaleRule
from fp4kit.nn import quantize_
from fp4kit.nn.fake_quant import QATConfig, ScaleMode, cast_except_fp4, convert, prepare_qat
from fp4kit.train.qat import Loss, TrainConfig, split_tokens, train_qat

SCHEMES = {"nvfp4": NVFP4Config(), "mxfp4": MXFP4Config(), "mxfp4-rceil": MXFP4Config(ScaleRule.RCEIL)}
TASKS = ("hellaswag", "arc_easy", "piqa")


def dump_tasks(path: str, limit: int, seed: int = 1234) -> None:
    from dataclasses import asdict

    from fp4kit.data import load_task

    out = {t: [asdict(it) for it in load_task(t, limit=limit, seed=seed)] for t in TASKS}
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(json.dumps(out))
    print(f"wrote {path}: " + ", ".join(f"{t} {len(v)}" for t, v in out.items()))


def load_tasks(path: str | None) -> dict:
    from fp4kit.data import MultipleChoice

    if not path:
        return {}
    raw = json.loads(pathlib.Path(path).read_text())
    return {t: [MultipleChoice(it["id"], tuple(it["contexts"]), tuple(it["continuations"]), it["gold"]) for it in items]
            for t, items in raw.items()}


def evaluate(model, tokenizer, held_out, tasks, args) -> dict:
    """Evaluate as deployed (bf16 activations, the Triton FP4 GEMM on CUDA); should the kernel fail,
    record why and evaluate with float32 activations (the torch twin, same weights)."""
    try:
        return _evaluate(model, tokenizer, held_out, tasks, args)
    except Exception as e:  # a measurement run should still report the rest
        cast_except_fp4(model, torch.float32)
        return _evaluate(model, tokenizer, held_out, tasks, args) | {"note": f"fp32 twin, kernel failed: {e!r}"[:300]}


@torch.no_grad()
def _evaluate(model, tokenizer, held_out: torch.Tensor, tasks: dict, args) -> dict:
    from fp4kit.eval import mean_stderr, score_multiple_choice

    model.eval()
    r = {"ppl": perplexity(model, held_out[: args.ppl_tokens], context=args.context, progress=False).perplexity}
    for task, items in tasks.items():
        per = score_multiple_choice(model, tokenizer, items, batch_size=32, progress=False)
        metric = "acc_norm" if "acc_norm" in per else "acc"
        r[task] = mean_stderr(per[metric])[0]
    return r


def recovered(ptq: dict, qad: dict, ref: dict) -> dict:
    out = {}
    for k in ref:
        gap = ptq[k] - ref[k]
        out[k] = (ptq[k] - qad[k]) / gap if abs(gap) > 1e-9 else None
    return out


def gptq_start(model, config, tokens: torch.Tensor, args) -> dict:
    """GPTQ results per layer (the PTQ start), computed on a copy; calibration from the training text."""
    from fp4kit.algorithms import GPTQConfig, apply_gptq, collect_hessians

    work = copy.deepcopy(model)
    n, s = args.calib_samples, args.calib_seq_len
    batches = [tokens[i * s:(i + 1) * s].unsqueeze(0).to(args.device) for i in range(n)]
    hessians = collect_hessians(work, batches, config, progress=False)
    result = apply_gptq(work, config, hessians, GPTQConfig(), progress=False)
    return {name: work.get_submodule(name).quantized_weight() for name in result.report.quantized}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--text", help="training/evaluation text file (default: the bundled tiny-shakespeare)")
    p.add_argument("--tasks-json", help="task items written by --dump-tasks")
    p.add_argument("--dump-tasks", help="write task items (hellaswag, arc_easy, piqa) to this file and exit")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--schemes", default="nvfp4,mxfp4")
    p.add_argument("--starts", default="rtn,gptq")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--gptq-scales", choices=["frozen", "dynamic"], default="frozen",
                   help="QAD from GPTQ: keep GPTQ's scales (frozen) or recompute them each step (dynamic)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip stages that would start after this many seconds")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--runs-dir", default="/tmp/qat_runs", help="training logs (merged into the JSON at the end)")
    args = p.parse_args()
    if args.dump_tasks:
        return dump_tasks(args.dump_tasks, args.limit)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.perf_counter()
    out_path = pathlib.Path(args.out) / "qat_smollm2.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "date": datetime.date.today().isoformat(), "torch": torch.__version__, "args": {
                  k: v for k, v in vars(args).items() if k not in ("device",)}, "runs": {}, "seconds": {}}

    def save():
        report["seconds"]["total"] = time.perf_counter() - t_start
        out_path.write_text(json.dumps(report, indent=1))

    from fp4kit.data import load_corpus
    from fp4kit.io import load_model

    t = time.perf_counter()
    model, tokenizer, _ = load_model(args.model, dtype=torch.float32)
    model.to(args.device)
    text = pathlib.Path(args.text).read_text() if args.text else load_corpus("shakespeare")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    train, held_out = split_tokens(ids, 0.1)
    tasks = load_tasks(args.tasks_json)
    report["tokens"] = {"train": train.numel(), "held_out": held_out.numel(), "ppl": min(args.ppl_tokens, held_out.numel())}
    report["tasks_n"] = {t_: len(v) for t_, v in tasks.items()}
    report["seconds"]["load"] = time.perf_counter() - t

    t = time.perf_counter()
    teacher = copy.deepcopy(model).to(torch.bfloat16).eval()
    report["runs"]["bf16"] = evaluate(teacher, tokenizer, held_out, tasks, args)
    report["seconds"]["eval_bf16"] = time.perf_counter() - t
    save()
    print("bf16", report["runs"]["bf16"], flush=True)

    for start in args.starts.split(","):  # RTN starts first: they are the headline numbers
        for scheme in args.schemes.split(","):
            config = SCHEMES[scheme]
            if time.perf_counter() - t_start > args.budget_s:
                report.setdefault("skipped", []).append(f"{scheme}/{start}: time budget")
                save()
                continue
            key = f"{scheme}/{start}"
            t = time.perf_counter()
            starts = gptq_start(model, config, train, args) if start == "gptq" else None
            ptq = copy.deepcopy(model)
            if starts is None:
                quantize_(ptq, config, progress=False)
            else:
                from fp4kit.algorithms.calibrate import swap_in

                swap_in(ptq, config, starts)
            cast_except_fp4(ptq, torch.bfloat16)  # evaluated like the teacher: bf16 activations, FP4 weights
            report["runs"][f"{key}/ptq"] = evaluate(ptq, tokenizer, held_out, tasks, args)
            del ptq
            report["seconds"][f"{key}/ptq"] = time.perf_counter() - t
            save()
            print(key, "ptq", report["runs"][f"{key}/ptq"], flush=True)

            t = time.perf_counter()
            student = copy.deepcopy(model)
            mode = ScaleMode(args.gptq_scales) if start == "gptq" else ScaleMode.DYNAMIC
            prepare_qat(student, QATConfig(config, scales=mode), start=starts)
            cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=max(args.steps // 20, 1),
                              batch_size=args.batch_size, seq_len=args.seq_len, loss=Loss.KD)
            run_dir = pathlib.Path(args.runs_dir) / f"{scheme}_{start}"
            result = train_qat(student, train, cfg, teacher=teacher, out=run_dir, resume=False, progress=False)
            report["seconds"][f"{key}/train"] = result.seconds
            from fp4kit.train.state import read_jsonl

            log = read_jsonl(result.log_path)
            report["train"] = report.get("train", {}) | {key: {
                "steps": result.steps, "final_kd": result.final_loss, "tokens_per_s": result.tokens_per_s,
                "seconds": result.seconds, "config": cfg.as_json(), "kd_curve": [r["kd"] for r in log],
                "grad_norm": [r["grad_norm"] for r in log]}}
            student.eval()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda"):
                fake_ppl = perplexity(student, held_out[: args.ppl_tokens], context=args.context,
                                      progress=False).perplexity
            convert(student, dtype=torch.bfloat16)
            t2 = time.perf_counter()
            report["runs"][f"{key}/qad"] = evaluate(student, tokenizer, held_out, tasks, args) | {"ppl_fake_quant": fake_ppl}
            report["seconds"][f"{key}/eval_qad"] = time.perf_counter() - t2
            report["recovered"] = report.get("recovered", {}) | {
                key: recovered(report["runs"][f"{key}/ptq"], report["runs"][f"{key}/qad"], report["runs"]["bf16"])}
            del student
            torch.cuda.empty_cache() if args.device == "cuda" else None
            save()
            print(key, "qad", report["runs"][f"{key}/qad"], "recovered", report["recovered"][key], flush=True)
    save()
    plot_curves(report, pathlib.Path(args.out) / "qat_smollm2_kd.png")
    print(json.dumps(report.get("recovered", {}), indent=1))


def plot_curves(report: dict, png: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not report.get("train"):
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, run in report["train"].items():
        ax.plot(range(1, len(run["kd_curve"]) + 1), run["kd_curve"], label=key, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("KL to bf16 teacher (train batch)")
    ax.set_title(f"QAD, {report['model']} on {report['device']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
