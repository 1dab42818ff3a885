"""GRPO on basic_arithmetic with SmolLM2-135M-Instruct: FP4 (NVFP4) base vs bf16 base, LoRA adapters.

Per base, from the same loaded weights: greedy exact match on the fixed held-out 500 before, GRPO
on the other 2,497 prompts, exact match after; the bf16 run gets as many steps as the FP4 run
managed within --time-limit ("the same budget" in steps). Then rollout throughput of the trained
policies on a fixed workload: 256 prompts x 64 sampled tokens (EOS ignored), median of 3 after a
warm-up, bf16 and FP4 in the same process.

    python benchmarks/grpo_smollm2.py --model smollm2-135m --out /tmp/grpo --steps 200 --time-limit 150
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import shutil
import statistics
import time

import torch

from fp4kit.formats import MXFP4Config, NVFP4Config
from fp4kit.io import load_model
from fp4kit.nn.lora import LoRAConfig
from fp4kit.train.grpo import (
    GRPOConfig,
    NoiseSchedule,
    encode,
    prepare_policy,
    run_task,
    task_split,
)


def rollout_throughput(model, tokenizer, prompts: list[str], new_tokens: int, repeats: int = 3) -> dict:
    from fp4kit.engine import Engine, SamplingParams

    ids = [encode(tokenizer, p) for p in prompts]
    engine = Engine(model, tokenizer, max_batch=len(ids), max_seq_len=max(map(len, ids)) + new_tokens + 1)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True, seed=0)
    engine.generate(ids, params)  # warm-up: kernels compiled, graphs captured
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = engine.generate(ids, params)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = sum(len(o.token_ids) for o in outs)
    return {"batch": len(ids), "new_tokens": new_tokens, "tokens": tokens, "seconds_median": statistics.median(times),
            "tokens_per_s": tokens / statistics.median(times)}


def gptq_base_(model, tokenizer, fmt, samples: int = 64, seq_len: int = 256) -> dict:
    """Quantize the base with GPTQ, calibrated on the training split's prompts and answers (never the
    held-out 500): the FP4 base GRPO then starts from is closer to bf16 than the RTN one."""
    from fp4kit.algorithms import PTQMethod, PTQRecipe, apply_ptq

    train_rows, _, _ = task_split("basic_arithmetic")
    text = "\n\n".join(f"{r.prompt} {r.answer}" for r in train_rows)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    samples = min(samples, ids.numel() // seq_len)
    device = next(model.parameters()).device
    batches = [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0).to(device) for i in range(samples)]
    t0 = time.perf_counter()
    report = apply_ptq(model, fmt, PTQRecipe(PTQMethod.GPTQ), batches=batches, progress=False)
    return {"gptq_layers": len(report.quantized), "gptq_calib": f"{samples}x{seq_len} training-split tokens",
            "gptq_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=150.0, help="seconds of GRPO for the FP4 run")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=500)
    ap.add_argument("--bases", default="fp4,bf16",
                    help="comma list of fp4 (NVFP4 RTN), fp4-gptq (NVFP4 GPTQ), mxfp4, fp4-aqn, bf16")
    ap.add_argument("--fixed-steps", action="store_true", help="every base runs --steps (no time limit)")
    ap.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    t0 = time.perf_counter()
    pristine, tok, src = load_model(args.model, dtype=dtype)
    pristine.to(args.device)
    result = {"model": src.label, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "load_seconds": time.perf_counter() - t0, "runs": {}}
    config = GRPOConfig(num_generations=args.num_generations, prompts_per_step=args.prompts_per_step,
                        max_completion_length=8, learning_rate=args.lr, max_steps=args.steps, save_steps=50,
                        micro_batch_size=128, loss_type="dapo", scale_rewards="group", temperature=1.0)
    lora = LoRAConfig(rank=16, alpha=32)
    policies = {}
    steps = args.steps
    for base in args.bases.split(","):
        model = copy.deepcopy(pristine)
        fmt = MXFP4Config() if base == "mxfp4" else NVFP4Config()
        gptq = gptq_base_(model, tok, fmt) if base == "fp4-gptq" else {}
        info = prepare_policy(model, "bf16" if base == "bf16" else "fp4", fmt, lora) | gptq
        run_dir = pathlib.Path("/tmp/grpo_runs") / base
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = GRPOConfig(**{**config.__dict__, "max_steps": steps,
                            "noise": NoiseSchedule() if base.endswith("aqn") else None})
        first = base == args.bases.split(",")[0]
        limit = args.time_limit if first and not args.fixed_steps else None
        summary = run_task(model, tok, "basic_arithmetic", cfg, run_dir, eval_limit=args.eval_limit,
                           base_model_name=src.label, resume=False, progress=False, time_limit=limit)
        steps = summary["steps"]  # the next base gets the same number of steps
        result["runs"][base] = info | summary
        for name in ("metrics.jsonl", "reward.png"):
            shutil.copy(run_dir / name, out / f"grpo_{base}_{name}")
        print(json.dumps({base: {k: summary.get(k) for k in ("steps", "before", "after", "train_seconds",
                                                               "rollout_tokens_per_s")}}), flush=True)
        policies[base] = model
        (out / "grpo_smollm2.json").write_text(json.dumps(result, indent=2))  # partial results survive a timeout
    if args.device == "cuda" and args.throughput:
        _, eval_rows, _ = task_split("basic_arithmetic")
        prompts = [r.prompt for r in eval_rows[:256]]
        result["rollout_throughput"] = {base: rollout_throughput(m, tok, prompts, 64) for base, m in policies.items()}
        print(json.dumps(result["rollout_throughput"]), flush=True)
    result["total_seconds"] = time.perf_counter() - t0
    (out / "grpo_smollm2.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
